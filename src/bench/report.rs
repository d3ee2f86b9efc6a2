//! What a bench run prints: a table of its settings and results (or one JSON object), latency
//! percentiles from a log-linear histogram, and progress lines on stderr.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// The settings and results of one run, in the order they were put.
pub(crate) struct Report {
    mode: &'static str,
    rows: Vec<(&'static str, &'static str, Value)>,
}

impl Report {
    /// An empty report of `mode`.
    pub(crate) fn new(mode: &'static str) -> Report {
        Report {
            mode,
            rows: Vec::new(),
        }
    }

    /// Adds `key` (the JSON name) = `value`, described for people by `label`.
    pub(crate) fn put(&mut self, key: &'static str, label: &'static str, value: impl Into<Value>) {
        self.rows.push((key, label, value.into()));
    }

    /// Adds a float rounded to `decimals` places (JSON gets the rounded number too; an integer
    /// when `decimals` is 0).
    pub(crate) fn put_f(&mut self, key: &'static str, label: &'static str, v: f64, decimals: i32) {
        let value = if decimals <= 0 && v.is_finite() && v.abs() < 9e15 {
            Value::from(v.round() as i64)
        } else {
            let scale = 10f64.powi(decimals);
            serde_json::Number::from_f64((v * scale).round() / scale)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        self.rows.push((key, label, value));
    }

    /// Adds p50, p99 and max of `h` in milliseconds as `<prefix>p50_ms` etc.
    pub(crate) fn put_latency(&mut self, h: &Histogram, what: &'static str) {
        let ms = |us: u64| us as f64 / 1000.0;
        let (p50, p99, max) = (h.percentile(0.50), h.percentile(0.99), h.max());
        let label = match what {
            "request" => [
                "request latency p50 (ms)",
                "request latency p99 (ms)",
                "request latency max (ms)",
            ],
            _ => [
                "publish-to-receive latency p50 (ms)",
                "publish-to-receive latency p99 (ms)",
                "publish-to-receive latency max (ms)",
            ],
        };
        self.put_f("p50_ms", label[0], ms(p50), 2);
        self.put_f("p99_ms", label[1], ms(p99), 2);
        self.put_f("max_ms", label[2], ms(max), 2);
        self.put("latency_samples", "latency samples", h.count());
    }

    /// Prints the report on stdout: a table, or one JSON object (keys as given, plus `mode`).
    pub(crate) fn print(&self, json: bool) {
        if json {
            let mut m = Map::new();
            m.insert("mode".into(), Value::String(self.mode.into()));
            for (k, _, v) in &self.rows {
                m.insert((*k).into(), v.clone());
            }
            println!("{}", Value::Object(m));
            return;
        }
        let width = self.rows.iter().map(|(_, l, _)| l.len()).max().unwrap_or(0);
        println!("tidewire bench {}", self.mode);
        for (_, label, v) in &self.rows {
            let shown = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("  {label:<width$}  {shown}");
        }
    }
}

/// Sub-buckets per power of two: values are kept to within 1/128 (0.8%).
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * SUB;

/// A log-linear histogram of microsecond values: exact below 128 µs, within 0.8% above, in a
/// fixed 59 KB whatever the number of samples, with the exact maximum.
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let shift = e - SUB_BITS;
        let m = (v >> shift) as usize;
        SUB + shift as usize * SUB + (m - SUB)
    }

    fn value(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let shift = ((i - SUB) / SUB) as u32;
        let m = ((i - SUB) % SUB + SUB) as u64;
        (m << shift) + ((1u64 << shift) >> 1)
    }

    /// Counts one value.
    pub(crate) fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// How many values were counted.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The largest value counted (0 when empty).
    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    /// The nearest-rank `p` quantile (0 < p ≤ 1), within the bucket precision; 0 when empty.
    pub(crate) fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

/// A histogram shared by many tasks, each recording through its own [`Recorder`].
#[derive(Clone)]
pub(crate) struct Latencies(Arc<Mutex<Histogram>>);

impl Latencies {
    /// An empty shared histogram.
    pub(crate) fn new() -> Latencies {
        Latencies(Arc::new(Mutex::new(Histogram::new())))
    }

    /// A recorder for one task, flushing into this histogram every 256 values and when dropped.
    pub(crate) fn recorder(&self) -> Recorder {
        Recorder {
            buf: Vec::new(),
            into: self.clone(),
        }
    }

    /// Runs `f` on the merged histogram (what recorders have flushed so far).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Histogram) -> T) -> T {
        match self.0.lock() {
            Ok(h) => f(&h),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    fn add(&self, values: &[u64]) {
        let mut h = match self.0.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        for &v in values {
            h.record(v);
        }
    }
}

/// One task's buffered view of a [`Latencies`]: cheap to record into, no lock per value.
pub(crate) struct Recorder {
    buf: Vec<u64>,
    into: Latencies,
}

impl Recorder {
    /// Records one value.
    pub(crate) fn record(&mut self, v: u64) {
        self.buf.push(v);
        if self.buf.len() >= 256 {
            self.flush();
        }
    }

    /// Moves the buffered values into the shared histogram.
    pub(crate) fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.into.add(&self.buf);
            self.buf.clear();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Prints `status()` on stderr every 2 s while alive, when `enabled`; stops when dropped.
pub(crate) struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Progress {
    /// Starts progress lines `[<mode> <elapsed>s] <status>` if `enabled` (runs known to last
    /// over 5 s), the first 2 s from now.
    pub(crate) fn start(
        enabled: bool,
        mode: &'static str,
        status: impl Fn() -> String + Send + 'static,
    ) -> Progress {
        Self::start_after(enabled, Duration::ZERO, mode, status)
    }

    /// Like [`Progress::start`], silent until `quiet` has passed: for phases of unknown length,
    /// so that only those lasting over 5 s print anything.
    pub(crate) fn start_after(
        enabled: bool,
        quiet: Duration,
        mode: &'static str,
        status: impl Fn() -> String + Send + 'static,
    ) -> Progress {
        if !enabled {
            return Progress(None);
        }
        let started = Instant::now();
        Progress(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                if started.elapsed() < quiet {
                    continue;
                }
                eprintln!(
                    "[{mode} {:.0}s] {}",
                    started.elapsed().as_secs_f64(),
                    status()
                );
            }
        })))
    }

    /// Whether a run of `d` gets progress lines.
    pub(crate) fn wanted(d: Duration) -> bool {
        d > Duration::from_secs(5)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_below_128_and_within_one_percent_above() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.percentile(0.5), 50);
        assert_eq!(h.percentile(0.99), 99);
        assert_eq!(h.max(), 100);
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (p, exact) in [(0.5, 500_000f64), (0.99, 990_000f64)] {
            let got = h.percentile(p) as f64;
            assert!((got - exact).abs() / exact < 0.01, "p{p}: {got} vs {exact}");
        }
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.percentile(1.0), 1_000_000);
        assert_eq!(Histogram::new().percentile(0.5), 0);
    }

    #[test]
    fn every_bucket_maps_back_into_itself() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1 << 20,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let i = Histogram::index(v);
            assert!(i < BUCKETS);
            assert_eq!(Histogram::index(Histogram::value(i)), i, "value {v}");
        }
    }

    #[test]
    fn recorders_flush_into_the_shared_histogram() {
        let l = Latencies::new();
        {
            let mut r = l.recorder();
            for v in 0..1000 {
                r.record(v);
            }
        }
        assert_eq!(l.with(|h| h.count()), 1000);
    }
}
