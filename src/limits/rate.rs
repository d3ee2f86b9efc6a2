//! Publish rate limits: one token bucket (GCRA, by the `governor` crate) per publisher.
//!
//! A publisher is the `sub` of its token, or the client address ([`super::client_key`]) when
//! the token has no `sub` or the server is open. One HTTP publish request is one cell, and so
//! is one WebSocket publish op, whatever number of events it carries: the limit bounds
//! requests (the work per request is bounded by `max_batch_events` and the body limits).
//! Buckets hold `publish_burst` cells and refill at `publish_rate_per_sec`.
//!
//! Memory: a publisher's bucket is kept only while it is not full again; every
//! [`SWEEP_EVERY`] a check also drops the full ones (`retain_recent`), so the limiter holds
//! at most the publishers seen within the last refill time plus [`SWEEP_EVERY`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;

use super::client::client_key;
use crate::auth::Access;
use crate::metrics::Metrics;

/// How often the limiter forgets publishers whose bucket is full again.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Whom a publish is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A token's `sub` claim.
    Subject(Arc<str>),
    /// A client address (masked by [`client_key`]): tokens without `sub`, open servers.
    Addr(IpAddr),
}

impl RateKey {
    /// The key of a publish made with `access` from `client` (`None` when the address is not
    /// known, e.g. a request built in a unit test: all such share one bucket).
    pub fn of(access: &Access, client: Option<IpAddr>) -> RateKey {
        match access.grants().and_then(|g| g.subject()) {
            Some(sub) => RateKey::Subject(Arc::from(sub)),
            None => RateKey::Addr(
                client
                    .map(client_key)
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            ),
        }
    }
}

/// The publish rate limiter of one server. Without a rate configured every check passes and
/// nothing is remembered.
pub struct PublishRateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<RateKey>>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last sweep.
    last_sweep: AtomicU64,
    sweeping: Mutex<()>,
    keys: Gauge,
}

impl PublishRateLimiter {
    /// A limiter refilling at `rate_per_sec` cells per second into buckets of `burst` cells
    /// (0: one second's worth, at least 1). `rate_per_sec` 0 (or not a positive number):
    /// unlimited.
    pub fn new(rate_per_sec: f64, burst: u32, metrics: &Metrics) -> Self {
        let limiter = quota(rate_per_sec, burst).map(RateLimiter::keyed);
        PublishRateLimiter {
            limiter,
            epoch: Instant::now(),
            last_sweep: AtomicU64::new(0),
            sweeping: Mutex::new(()),
            keys: metrics.limits().rate_limiter_keys.clone(),
        }
    }

    /// Whether the limiter limits anything.
    pub fn is_enabled(&self) -> bool {
        self.limiter.is_some()
    }

    /// Takes one cell from `key`'s bucket: `Ok` when there was one, else `Err` with how long
    /// until there is (never zero). A refused check takes nothing.
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        self.maybe_sweep(limiter);
        let checked = limiter.check_key(key);
        // The gauge says what the limiter holds whenever it is scraped: the key just checked
        // is in it now (refused or not), until a sweep finds its bucket full again.
        self.keys
            .set(i64::try_from(limiter.len()).unwrap_or(i64::MAX));
        match checked {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until
                .wait_time_from(limiter.clock().now())
                .max(Duration::from_millis(1))),
        }
    }

    fn maybe_sweep(&self, limiter: &DefaultKeyedRateLimiter<RateKey>) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY.as_millis() as u64 {
            return;
        }
        // One sweeper at a time; the others go on checking.
        let Ok(_one) = self.sweeping.try_lock() else {
            return;
        };
        self.last_sweep.store(now, Ordering::Relaxed);
        limiter.retain_recent();
        limiter.shrink_to_fit();
        self.keys
            .set(i64::try_from(limiter.len()).unwrap_or(i64::MAX));
    }

    /// Publishers remembered now (each with a bucket that is not full).
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Whether no publisher is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn quota(rate_per_sec: f64, burst: u32) -> Option<Quota> {
    if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
        return None;
    }
    let period = Duration::try_from_secs_f64(1.0 / rate_per_sec).ok()?;
    let burst = if burst == 0 {
        // One second's worth, at least one cell.
        rate_per_sec.ceil().min(f64::from(u32::MAX)) as u32
    } else {
        burst
    };
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // A period of zero (more than a billion per second) is no limit at all.
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RateKey {
        RateKey::Addr(IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn a_bucket_gives_its_burst_then_refuses_with_a_wait() {
        let l = PublishRateLimiter::new(1.0, 3, &Metrics::new());
        for _ in 0..3 {
            assert!(l.check(&key(1)).is_ok());
        }
        let wait = l.check(&key(1)).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another publisher has its own bucket.
        assert!(l.check(&key(2)).is_ok());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn zero_rate_is_unlimited_and_remembers_nothing() {
        let l = PublishRateLimiter::new(0.0, 0, &Metrics::new());
        assert!(!l.is_enabled());
        for _ in 0..10_000 {
            assert!(l.check(&key(1)).is_ok());
        }
        assert!(l.is_empty());
    }

    #[test]
    fn the_default_burst_is_one_second_of_rate_at_least_one() {
        let l = PublishRateLimiter::new(5.0, 0, &Metrics::new());
        let passed = (0..20).filter(|_| l.check(&key(1)).is_ok()).count();
        assert_eq!(passed, 5);
        let slow = PublishRateLimiter::new(0.1, 0, &Metrics::new());
        assert!(slow.check(&key(1)).is_ok());
        let wait = slow.check(&key(1)).unwrap_err();
        assert!(wait > Duration::from_secs(9), "{wait:?}");
    }

    #[test]
    fn subjects_and_addresses_are_separate_publishers() {
        let open = RateKey::of(&Access::Open, Some(IpAddr::from([192, 0, 2, 1])));
        assert_eq!(open, key(1));
        assert_eq!(
            RateKey::of(&Access::Open, None),
            RateKey::Addr(IpAddr::from([0, 0, 0, 0]))
        );
    }
}
