//! The wall clock that dates events (`time`), with a hook for tests.
//!
//! The log's writer asks a [`Clock`] for the time of every commit and never stamps an event
//! with a time below the previous one (see the sled writer), so `time` is non-decreasing in
//! id order even when the machine's clock steps back (NTP, a VM resumed). Tests step a
//! server's clock through [`Clock::step`] instead of changing the machine's clock. The
//! JetStream log does not read it: there the stream leader's timestamp dates each event (see
//! [`nats_log`](crate::log::nats_log)), so a gateway's clock, stepped or not, dates nothing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system clock plus an offset that only tests move. Cheap to clone; clones share the
/// offset.
#[derive(Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock, not stepped.
    pub fn system() -> Self {
        Self::default()
    }

    /// Unix milliseconds now, as this clock says (0 before 1970 or on overflow).
    pub fn now_ms(&self) -> u64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        sys.saturating_add(self.offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    /// Moves this clock by `delta_ms` (negative: back in time), as a stepping system clock
    /// would. For tests: the machine's clock is never touched.
    pub fn step(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Clock(offset {} ms)",
            self.offset_ms.load(Ordering::Relaxed)
        )
    }
}

/// Every clock is the same setting: configurations that differ only in their clock are equal.
impl PartialEq for Clock {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Clock;

    #[test]
    fn a_stepped_clock_moves_by_the_step_and_its_clones_follow() {
        let c = Clock::system();
        let twin = c.clone();
        let before = c.now_ms();
        c.step(-3_600_000);
        let after = twin.now_ms();
        assert!(after + 3_500_000 < before, "{after} vs {before}");
    }
}
