//! Abuse limits: how much of the server one client may take, and how slowly it may take it.
//!
//! This module owns the limits of issue 6's "Abuse limits" section, each configurable (see
//! [`crate::config::Config`]) and each with metrics ([`crate::metrics::LimitMetrics`]):
//! - [`rate`]: publish rate per token subject (or client address): a token bucket, 429 with
//!   `Retry-After` beyond it;
//! - [`conn`]: concurrent TCP connections, in total and per client address, refused with a
//!   real 503/429 answer rather than a reset;
//! - [`timeouts`]: slow-client defences of one connection (request head read timeout, idle
//!   timeout) that never touch a request in flight, so long-lived streams are safe;
//! - [`client`]: the client address limits are counted under;
//! - [`check_header_size`]: the request-head size limit (431).
//!
//! The body read timeout of publish requests lives with the publish handler
//! (`http/publish.rs`), the subscriptions cap with the WebSocket (`http/ws.rs`), and the
//! `Origin` policy in `http/origin.rs`; each uses the configuration and metrics named above.

use std::sync::Arc;

use http::Request;

use crate::config::Config;
use crate::metrics::Metrics;

pub mod client;
pub mod conn;
pub mod rate;
pub mod timeouts;

pub use client::ClientAddr;
pub use conn::{ConnPermit, ConnectionLimiter, Refusal};
pub use rate::{PublishRateLimiter, RateKey};
pub use timeouts::{ConnWatch, Expiry, RequestGuard, TrackedBody, WatchedIo};

/// Why a limit refused a request or a connection. The HTTP layer maps each onto the
/// contract's status and error body, in its one place (`http::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The request line and headers take more than this many bytes (431).
    #[error("the request line and headers take more than {0} bytes")]
    HeadersTooLarge(usize),
    /// The server holds `max_connections` (this many) already (503).
    #[error("the server holds its most connections ({0})")]
    ServerAtCapacity(usize),
    /// The client address holds `max_connections_per_ip` (this many) already (429).
    #[error("this client address holds its most connections ({0})")]
    TooManyConnections(usize),
}

/// The server-wide limiters, built once from the configuration.
pub struct Limits {
    /// Publish rate per publisher.
    pub rate: PublishRateLimiter,
    /// Concurrent connections, in total and per client address.
    pub connections: ConnectionLimiter,
}

impl Limits {
    /// The limiters `config` describes, reporting to `metrics`.
    pub fn new(config: &Config, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Limits {
            rate: PublishRateLimiter::new(
                config.publish_rate_per_sec,
                config.publish_burst,
                metrics,
            ),
            connections: ConnectionLimiter::new(
                config.max_connections,
                config.max_connections_per_ip,
                metrics,
            ),
        })
    }
}

/// Refuses (431 `headers_too_large`) a request whose request line and headers take more than
/// `max` bytes as HTTP/1.1 would send them. The HTTP parser itself stops at twice `max`
/// (`server.rs`), so every head between the two gets the contract's error body.
pub fn check_header_size<B>(req: &Request<B>, max: usize) -> Result<(), LimitError> {
    // "METHOD SP target SP HTTP/1.1 CRLF", each header "name: value CRLF", then CRLF.
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if line + headers + 2 > max {
        return Err(LimitError::HeadersTooLarge(max));
    }
    Ok(())
}
