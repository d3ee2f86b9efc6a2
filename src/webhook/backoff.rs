//! When a failed webhook call is tried again. Pure functions, free of I/O.
//!
//! - Timeouts, connection errors, 3xx and 5xx: exponential backoff with jitter. The n-th
//!   consecutive failure waits a uniformly random time in `[d/2, d]` where
//!   `d = min(max, min · 2^(n-1))`, so a fleet of webhooks that failed together does not
//!   retry together.
//! - `429` and `503` with `Retry-After` (seconds or an HTTP date): exactly that, at most
//!   [`RETRY_AFTER_CAP`]; without it, the backoff above.
//! - Other 4xx: the receiver refuses the batch as it is, which a retry will not change soon:
//!   the longest delay (`max`), every time, until someone fixes the receiver.
//! - `410 Gone`: no retry; the webhook is disabled.

use std::time::{Duration, SystemTime};

/// Longest `Retry-After` honoured.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// The bounds of the backoff (`webhook_retry_min_ms`, `webhook_retry_max_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first retry's delay (before jitter).
    pub min: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before attempt `failures + 1` after `failures` consecutive failures (at least
    /// 1), before jitter: `min(max, min · 2^(failures-1))`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.min
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max)
            .max(self.min.min(self.max))
    }

    /// The jittered delay: `unit` (uniform in `[0, 1)`) places it in `[ceiling/2, ceiling]`.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let d = self.ceiling(failures);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// Reads a `Retry-After` value: delay-seconds, or an HTTP date (the time from `now` until
/// then, zero when past). At most [`RETRY_AFTER_CAP`]; `None` when unreadable.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        min: Duration::from_millis(1000),
        max: Duration::from_millis(300_000),
    };

    #[test]
    fn the_ceiling_doubles_from_min_up_to_max() {
        let secs: Vec<u64> = (1..=11).map(|n| B.ceiling(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(B.ceiling(u32::MAX), B.max);
        assert_eq!(B.ceiling(0), B.min);
    }

    #[test]
    fn jitter_stays_between_half_and_the_whole_ceiling() {
        for n in 1..20 {
            let c = B.ceiling(n);
            assert_eq!(B.delay(n, 0.0), c / 2);
            assert_eq!(B.delay(n, 1.0), c);
            let mid = B.delay(n, 0.5);
            assert!(mid > c / 2 && mid < c);
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates_and_is_capped() {
        let now = httpdate::parse_http_date("Sun, 06 Dec 2026 08:00:00 GMT").unwrap();
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Sun, 06 Dec 2026 08:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 06 Dec 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("999999", now), Some(RETRY_AFTER_CAP));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-1", now), None);
    }
}
