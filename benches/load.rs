//! A simple load generator for a running tidewire server (loopback by default).
//!
//! Run against a release server started separately, e.g.
//!
//! ```text
//! cargo run --release -- serve --data-dir /tmp/tw-bench &
//! cargo bench --bench load -- publish --conns 64 --size 256 --secs 10
//! cargo bench --bench load -- publish --conns 8 --batch 1000 --secs 10
//! cargo bench --bench load -- fanout --subs 1000 --rate 100 --secs 10
//! cargo bench --bench load -- idle --subs 10000 --pid <server pid>
//! cargo bench --bench load -- resume --events 100000 --noise 1000000
//! ```
//!
//! Every run is bounded in time and count. Results print as one line of `key=value` pairs.
//! Without a subcommand (as under a plain `cargo bench`) it prints its usage and exits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: load <publish|fanout|idle|resume> [--addr 127.0.0.1:7700] [options]
  publish --conns 64 --size 256 --batch 1 --secs 10 --topics 8
  fanout  --subs 1000 --rate 100 --secs 10 --size 256
  idle    --subs 10000 --pid PID [--hold 5]
  resume  --events 100000 [--noise 0]";

struct Args(Vec<String>);

impl Args {
    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

fn main() -> Result<(), Error> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.iter().find(|a| !a.starts_with("--")).cloned() else {
        println!("{USAGE}");
        return Ok(());
    };
    let args = Args(argv);
    let addr: String = args.get("addr", "127.0.0.1:7700".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd.as_str() {
            "publish" => publish(&addr, &args).await,
            "fanout" => fanout(&addr, &args).await,
            "idle" => idle(&addr, &args).await,
            "resume" => resume(&addr, &args).await,
            _ => {
                println!("{USAGE}");
                Ok(())
            }
        }
    })
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A keep-alive HTTP/1.1 connection that POSTs bodies and returns the status.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    async fn post(&mut self, path: &str, content_type: &str, body: Bytes) -> Result<u16, Error> {
        self.sender.ready().await?;
        let req = hyper::Request::post(path)
            .header("host", &self.host)
            .header("content-type", content_type)
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// A JSON envelope whose whole body is `size` bytes, carrying the send time in `ts`.
fn envelope(size: usize) -> String {
    let head = format!("{{\"data\":{{\"ts\":{},\"pad\":\"", now_us());
    let pad = size.saturating_sub(head.len() + 3).max(1);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

async fn publish(addr: &str, args: &Args) -> Result<(), Error> {
    let conns: usize = args.get("conns", 64);
    let size: usize = args.get("size", 256);
    let batch: usize = args.get("batch", 1);
    let secs: u64 = args.get("secs", 10);
    let topics: usize = args.get("topics", 8);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let addr = addr.to_string();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(mut conn) = Conn::open(&addr).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            };
            let path = format!("/v1/topics/bench/p{}/events", c % topics);
            while Instant::now() < deadline {
                let body = if batch == 1 {
                    envelope(size)
                } else {
                    let one = envelope(size);
                    let mut s = String::with_capacity((one.len() + 1) * batch + 2);
                    s.push('[');
                    for i in 0..batch {
                        if i > 0 {
                            s.push(',');
                        }
                        s.push_str(&one);
                    }
                    s.push(']');
                    s
                };
                let started = Instant::now();
                match conn.post(&path, "application/json", body.into()).await {
                    Ok(201) => lat.push(started.elapsed().as_micros() as u64),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match Conn::open(&addr).await {
                            Ok(c) => conn = c,
                            Err(_) => return lat,
                        }
                    }
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let reqs = all.len() as f64;
    println!(
        "publish conns={conns} size={size} batch={batch} secs={elapsed:.1} requests={} req_per_s={:.0} events_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} errors={}",
        all.len(),
        reqs / elapsed,
        reqs * batch as f64 / elapsed,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Opens an SSE stream and returns the socket once the response head has been read.
async fn open_sse(addr: &str, query: &str, last_event_id: Option<u64>) -> Result<TcpStream, Error> {
    let mut s = TcpStream::connect(addr).await?;
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /v1/sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    // Read until the end of the head; the body (chunked) follows.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err("SSE connection closed before the response head".into());
        }
        head.push(byte[0]);
        if head.len() > 8192 {
            return Err("SSE response head too long".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("SSE refused: {}", String::from_utf8_lossy(&head)).into());
    }
    Ok(s)
}

/// Scans complete lines of SSE text for `"ts":N` in `data:` lines and calls `f(ts)`.
/// Chunked-encoding size lines never start with `data:`, so they are skipped naturally.
fn scan_lines(buf: &mut Vec<u8>, mut f: impl FnMut(&[u8])) {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        if line.starts_with(b"data:") {
            f(line);
        }
        start += nl + 1;
    }
    buf.drain(..start);
}

fn ts_of(line: &[u8]) -> Option<u64> {
    let key = b"\"ts\":";
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = line[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn fanout(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 1000);
    let rate: u64 = args.get("rate", 100);
    let secs: u64 = args.get("secs", 10);
    let size: usize = args.get("size", 256);
    let topic = format!("bench/fanout-{}", now_us());
    let total = rate * secs;
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..subs {
        let s = open_sse(addr, &format!("topic={topic}"), None).await?;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut s = s;
            let mut lat = Vec::with_capacity(total as usize);
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut chunk = vec![0u8; 16 * 1024];
            while (lat.len() as u64) < total && !stop.load(Ordering::Relaxed) {
                let n = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => n,
                    Err(_) => continue,
                };
                let now = now_us();
                buf.extend_from_slice(&chunk[..n]);
                scan_lines(&mut buf, |line| {
                    if let Some(ts) = ts_of(line) {
                        lat.push(now.saturating_sub(ts));
                    }
                });
            }
            lat
        }));
    }
    let mut conn = Conn::open(addr).await?;
    let path = format!("/v1/topics/{topic}/events");
    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    let mut tick = tokio::time::interval(interval);
    let started = Instant::now();
    let mut published = 0u64;
    while published < total {
        tick.tick().await;
        if conn
            .post(&path, "application/json", envelope(size).into())
            .await?
            == 201
        {
            published += 1;
        }
    }
    // Give the last events time to arrive, then stop the readers.
    let grace = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    let mut complete = 0usize;
    for r in readers {
        let remaining = grace.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, r).await {
            Ok(Ok(lat)) => {
                if lat.len() as u64 == total {
                    complete += 1;
                }
                all.extend(lat);
            }
            _ => stop.store(true, Ordering::Relaxed),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "fanout subs={subs} rate={rate} secs={elapsed:.1} published={published} delivered={} expected={} complete_subscribers={complete} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        all.len(),
        total * subs as u64,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS in /proc status".into())
}

async fn idle(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 10_000);
    let pid: u32 = args.get("pid", 0);
    let hold: u64 = args.get("hold", 5);
    if pid == 0 {
        return Err("idle needs --pid of the server".into());
    }
    let before = rss_kib(pid)?;
    let mut socks = Vec::with_capacity(subs);
    let started = Instant::now();
    for i in 0..subs {
        socks.push(open_sse(addr, &format!("topic=bench/idle/{}", i % 100), None).await?);
    }
    let opened = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = rss_kib(pid)?;
    println!(
        "idle subs={subs} open_secs={opened:.1} rss_before_kib={before} rss_after_kib={after} per_subscriber_bytes={:.0}",
        (after.saturating_sub(before) as f64 * 1024.0) / subs as f64
    );
    drop(socks);
    Ok(())
}

async fn resume(addr: &str, args: &Args) -> Result<(), Error> {
    let events: u64 = args.get("events", 100_000);
    let noise: u64 = args.get("noise", 0);
    let topic = format!("bench/resume-{}", now_us());
    let mut conn = Conn::open(addr).await?;
    let batch = 1000u64;
    let one = envelope(128);
    let body_of = |n: u64| {
        let mut s = String::from("[");
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&one);
        }
        s.push(']');
        Bytes::from(s)
    };
    // The topic's events go first, then the noise on other topics, so a reader that scanned
    // the whole log would pay for the noise.
    let mut sent = 0;
    while sent < events {
        let n = batch.min(events - sent);
        let st = conn
            .post(
                &format!("/v1/topics/{topic}/events"),
                "application/json",
                body_of(n),
            )
            .await?;
        if st != 201 {
            return Err(format!("publish failed: {st}").into());
        }
        sent += n;
    }
    let mut noisy = 0;
    while noisy < noise {
        let n = batch.min(noise - noisy);
        let path = format!("/v1/topics/bench/noise/{}/events", noisy % 16);
        conn.post(&path, "application/json", body_of(n)).await?;
        noisy += n;
    }
    let started = Instant::now();
    let mut s = open_sse(addr, &format!("topic={topic}&last_event_id=0"), None).await?;
    let mut got = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < events && Instant::now() < deadline {
        let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        scan_lines(&mut buf, |_| got += 1);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "resume events={events} noise={noise} received={got} secs={secs:.3} events_per_s={:.0}",
        got as f64 / secs
    );
    Ok(())
}
