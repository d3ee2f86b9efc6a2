//! `GET /v1/sse`: Server-Sent Events, exactly as the contract says.
//!
//! Resume cursor from `Last-Event-ID`, else `last_event_id`; `retry:` first; a `:` heartbeat
//! comment when the stream has been quiet for the configured interval; `event:` only for typed
//! events; one-line JSON `data:`; `event: gap` first when retention dropped what the client
//! asked for. The stream ends when the server shuts down, so clients reconnect and resume.
//! With authorization on, every pattern needs a covering subscribe grant (403 otherwise), and
//! the stream ends when its token expires (after a `: token expired` comment): the client
//! reconnects with a fresh token and resumes by `Last-Event-ID`.

use std::sync::Arc;
use std::time::Duration;

use std::io::Write;

use crate::metrics::SubscriberGuard;
use bytes::{Bytes, BytesMut};
use flate2::write::GzEncoder;
use flate2::Compression;
use futures_util::stream;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::{sleep, Instant, Sleep};

use super::{query_pairs, ApiError, AppState, Body};
use crate::auth::Access;
use crate::envelope::EventId;
use crate::subscription::{Delivery, Subscription};
use crate::topic::{parse_cursor, Pattern, PatternSet};

/// Frames of one write are coalesced up to this many bytes when events arrive in a burst.
const MAX_CHUNK: usize = 64 * 1024;

struct Stream {
    sub: Subscription,
    heartbeat: Duration,
    quiet: std::pin::Pin<Box<Sleep>>,
    stop: watch::Receiver<bool>,
    preamble: Option<Bytes>,
    delivered: Counter,
    /// Set when the client accepts gzip and `sse_gzip` is on: every write is compressed and
    /// sync-flushed, so each event reaches the client when it is sent, never held back.
    gzip: Option<GzEncoder<Vec<u8>>>,
    /// When the token stops being accepted; `None` for an open server or a token without `exp`.
    expiry: Option<std::pin::Pin<Box<Sleep>>>,
    /// Set once the expiry comment is written: the stream ends next.
    expired: bool,
    _gauge: SubscriberGuard,
}

/// The patterns and cursor of a subscription request, validated.
pub fn subscription_request<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(PatternSet, Option<EventId>), ApiError> {
    let mut patterns = Vec::new();
    let mut query_cursor = None;
    for (k, v) in query_pairs(req.uri().query()) {
        match &*k {
            "topic" => {
                patterns.push(
                    Pattern::parse_with_limit(&v, state.config.max_topic_len)
                        .map_err(|e| ApiError::invalid_pattern(&v, e))?,
                );
            }
            "last_event_id" => query_cursor = Some(v.into_owned()),
            _ => {}
        }
    }
    if patterns.len() > state.config.max_patterns {
        return Err(ApiError::too_many_patterns(state.config.max_patterns));
    }
    let patterns = PatternSet::new(patterns)
        .ok_or_else(|| ApiError::bad_request("at least one `topic` query parameter is required"))?;
    // The header wins: it is what a reconnecting EventSource sends. An empty one means none.
    let header = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .filter(|v| !v.trim().is_empty());
    let raw = header.or(query_cursor.filter(|v| !v.is_empty()));
    let cursor = match raw {
        None => None,
        Some(v) => Some(EventId(
            parse_cursor(&v).ok_or_else(|| ApiError::invalid_cursor(&v))?,
        )),
    };
    Ok((patterns, cursor))
}

/// Opens an SSE stream for the request, if `access` covers every pattern.
pub async fn subscribe<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let (patterns, cursor) = subscription_request(state, req)?;
    for p in patterns.patterns() {
        access.check_subscribe(p)?;
    }
    let log = state.log().await?;
    let cfg = &state.config;
    let gzip = cfg.sse_gzip && super::accepts_gzip(req.headers());
    let heartbeat = Duration::from_secs(cfg.sse_heartbeat_secs);
    let st = Stream {
        sub: Subscription::open(
            log,
            &state.hub,
            patterns,
            cursor,
            cfg.replay_page,
            state.metrics.clone(),
        ),
        heartbeat,
        quiet: Box::pin(sleep(heartbeat)),
        stop: state.stop_signal(),
        preamble: Some(Bytes::from(format!("retry: {}\n\n", cfg.sse_retry_ms))),
        delivered: state.metrics.delivered("sse"),
        gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
        expiry: access
            .deadline()
            .map(|at| Box::pin(tokio::time::sleep_until(at))),
        expired: false,
        _gauge: state.metrics.track_subscriber("sse"),
    };
    let body = stream::unfold(st, |mut st| async move {
        let chunk = match next_chunk(&mut st).await {
            Some(chunk) => chunk,
            // The gzip trailer, once, so a client sees a complete stream.
            None => Bytes::from(st.gzip.take()?.finish().ok()?),
        };
        let chunk = match st.gzip.as_mut() {
            Some(gz) => compress(gz, &chunk)?,
            None => chunk,
        };
        Some((Ok(Frame::data(chunk)), st))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(body)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    Ok(resp)
}

/// Resolves at the deadline; never when there is none.
async fn until(deadline: &mut Option<std::pin::Pin<Box<Sleep>>>) {
    match deadline {
        Some(d) => d.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Compresses one write and sync-flushes it, so the client can decode all of it now.
fn compress(gz: &mut GzEncoder<Vec<u8>>, chunk: &[u8]) -> Option<Bytes> {
    gz.write_all(chunk).ok()?;
    gz.flush().ok()?;
    Some(Bytes::from(std::mem::take(gz.get_mut())))
}

/// The next bytes to write, or `None` when the stream ends (shutdown, log failure, token
/// expiry).
async fn next_chunk(st: &mut Stream) -> Option<Bytes> {
    if let Some(p) = st.preamble.take() {
        return Some(p);
    }
    if *st.stop.borrow() || st.expired {
        return None;
    }
    // Checked before any delivery, so nothing is sent once the token is refused.
    if st
        .expiry
        .as_ref()
        .is_some_and(|d| Instant::now() >= d.deadline())
    {
        st.expired = true;
        return Some(Bytes::from_static(b": token expired\n\n"));
    }
    let first = tokio::select! {
        _ = st.stop.changed() => return None,
        _ = until(&mut st.expiry) => {
            st.expired = true;
            return Some(Bytes::from_static(b": token expired\n\n"));
        }
        d = st.sub.next() => match d {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "SSE stream ends");
                return None;
            }
        },
        _ = &mut st.quiet => {
            st.quiet.as_mut().reset(Instant::now() + st.heartbeat);
            return Some(Bytes::from_static(b":\n\n"));
        }
    };
    st.quiet.as_mut().reset(Instant::now() + st.heartbeat);
    let mut chunk = BytesMut::new();
    let mut next = Some(first);
    let mut events = 0u64;
    while let Some(d) = next.take() {
        match d {
            Delivery::Event(e) => {
                chunk.extend_from_slice(e.sse_frame());
                events += 1;
            }
            Delivery::Gap(g) => chunk.extend_from_slice(&g.sse_frame()),
        }
        if chunk.len() < MAX_CHUNK {
            next = st.sub.next_ready();
        }
    }
    st.delivered.inc_by(events);
    Some(chunk.freeze())
}
