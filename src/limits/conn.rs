//! Caps on concurrent TCP connections: in total (`max_connections`) and per client address
//! (`max_connections_per_ip`, see [`super::client::client_key`]).
//!
//! A connection holds a [`ConnPermit`] from accept until its socket closes. The server keeps
//! the permit inside the connection's I/O object, so a connection upgraded to a WebSocket
//! stays counted for as long as the socket lives. A connection over a cap is not reset: the
//! server answers its first request with the [`Refusal`]'s error and closes it
//! (`http::refuse_connection`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::gauge::Gauge;

use super::client::client_key;
use crate::metrics::Metrics;

/// Counts open connections against the caps.
pub struct ConnectionLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    gauge: Gauge,
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Only kept when a per-address cap is set; an entry exists while its count is above 0,
    /// so the map never holds more entries than there are open connections.
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `max_connections` already: 503 `server_at_capacity`.
    Total(usize),
    /// The client address holds `max_connections_per_ip` already: 429 `too_many_connections`.
    PerIp(usize),
}

impl Refusal {
    /// The error this refusal is (503 or 429 on the wire, both with `Retry-After`).
    pub fn error(&self) -> super::LimitError {
        match *self {
            Refusal::Total(max) => super::LimitError::ServerAtCapacity(max),
            Refusal::PerIp(max) => super::LimitError::TooManyConnections(max),
        }
    }

    /// The `reason` label of `connections_refused`: `total` or `per_ip`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Total(_) => "total",
            Refusal::PerIp(_) => "per_ip",
        }
    }
}

/// One counted connection; gives its place back when dropped, however the connection ends.
pub struct ConnPermit {
    inner: Arc<Inner>,
    key: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if self.inner.max_per_ip > 0 {
            if let Some(n) = c.per_ip.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&self.key);
                }
            }
        }
        self.inner.gauge.dec();
    }
}

impl ConnectionLimiter {
    /// Caps of `max_total` connections and `max_per_ip` per client address (0: no cap).
    pub fn new(max_total: usize, max_per_ip: usize, metrics: &Metrics) -> Self {
        ConnectionLimiter {
            inner: Arc::new(Inner {
                max_total,
                max_per_ip,
                counts: Mutex::new(Counts::default()),
                gauge: metrics.limits().connections_open.clone(),
            }),
        }
    }

    /// Counts a new connection from `ip`, or says which cap it would break (and counts
    /// nothing). Guarantees: while permits are held, at most `max_total` exist, and at most
    /// `max_per_ip` for one client key.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let key = client_key(ip);
        let inner = &self.inner;
        let mut c = inner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.max_total > 0 && c.total >= inner.max_total {
            return Err(Refusal::Total(inner.max_total));
        }
        if inner.max_per_ip > 0 {
            let n = c.per_ip.entry(key).or_insert(0);
            if *n >= inner.max_per_ip {
                return Err(Refusal::PerIp(inner.max_per_ip));
            }
            *n += 1;
        }
        c.total += 1;
        inner.gauge.inc();
        Ok(ConnPermit {
            inner: inner.clone(),
            key,
        })
    }

    /// Connections counted now.
    pub fn open(&self) -> usize {
        self.inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_places_come_back_when_permits_drop() {
        let m = Metrics::new();
        let l = ConnectionLimiter::new(3, 2, &m);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = l.try_acquire(a).unwrap();
        let _a2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).err(), Some(Refusal::PerIp(2)));
        let _b1 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).err(), Some(Refusal::Total(3)));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.try_acquire(a).unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn zero_means_no_cap() {
        let l = ConnectionLimiter::new(0, 0, &Metrics::new());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let permits: Vec<_> = (0..1000).map(|_| l.try_acquire(ip).unwrap()).collect();
        assert_eq!(l.open(), permits.len());
    }
}
