//! `GET /v1/sse`: Server-Sent Events, exactly as the contract says.
//!
//! Resume cursor from `Last-Event-ID`, else `last_event_id`; without one, `start=latest` or
//! `start_time=T` (see [`super::start`]); `retry:` first; a `:` heartbeat
//! comment when the stream has been quiet for the configured interval; `event:` only for typed
//! events; one-line JSON `data:`; `event: gap` first when retention dropped what the client
//! asked for. The stream ends when the server shuts down, so clients reconnect and resume.
//! With authorization on, every pattern needs a covering subscribe grant (403 otherwise), and
//! the stream ends when its token expires (after a `: token expired` comment): the client
//! reconnects with a fresh token and resumes by `Last-Event-ID`. With `sse_gzip` on and a
//! client that accepts gzip, the stream is gzip'd as it goes and flushed whenever no further
//! event is ready, so compression never holds an event back.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_compression::tokio::bufread::GzipEncoder;
use async_compression::Level;
use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_stream::StreamExt;
use tokio_util::io::{ReaderStream, StreamReader};

use super::start::StartOptions;
use super::{query_pairs, ApiError, AppState, Body};
use crate::auth::Access;
use crate::envelope::EventId;
use crate::metrics::SubscriberGuard;
use crate::subscription::{Delivery, Start, Subscription};
use crate::topic::{parse_cursor, Pattern, PatternSet};

/// Frames of one write are coalesced up to this many bytes when events arrive in a burst.
const MAX_CHUNK: usize = 64 * 1024;

/// Largest gzip'd write: a burst compresses into writes of at most this many bytes. The
/// buffer lives as long as the stream, beside the compressor's own state.
const GZIP_OUT: usize = 16 * 1024;

/// One SSE response body, before any compression.
struct Stream {
    /// The deliveries, a burst per item, with a heartbeat comment whenever they are quiet.
    live: Pin<Box<dyn tokio_stream::Stream<Item = Bytes> + Send>>,
    stop: watch::Receiver<bool>,
    preamble: Option<Bytes>,
    /// When the token stops being accepted; `None` for an open server or a token without `exp`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// Set once the expiry comment is written: the stream ends next.
    expired: bool,
    _gauge: SubscriberGuard,
}

/// The patterns and start of a subscription request, validated.
pub fn subscription_request<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(PatternSet, Start), ApiError> {
    let mut patterns = Vec::new();
    let mut query_cursor = None;
    let mut start = StartOptions::default();
    for (k, v) in query_pairs(req.uri().query()) {
        match &*k {
            "topic" => {
                patterns.push(
                    Pattern::parse_with_limit(&v, state.config.max_topic_len)
                        .map_err(|e| ApiError::invalid_pattern(&v, e))?,
                );
            }
            "last_event_id" => query_cursor = Some(v.into_owned()),
            "start" => start.set_start(&v)?,
            "start_time" => start.set_time(&v)?,
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
    Ok((patterns, start.start(cursor)?))
}

/// Opens an SSE stream for the request, if `access` covers every pattern.
pub async fn subscribe<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let (patterns, start) = subscription_request(state, req)?;
    for p in patterns.patterns() {
        access.check_subscribe(p)?;
    }
    let log = state.log().await?;
    let cfg = &state.config;
    let gzip = cfg.sse_gzip && super::accepts_gzip(req.headers());
    let mut sub = Subscription::open_at(
        log,
        &state.hub,
        patterns,
        start,
        cfg.replay_page,
        state.metrics.clone(),
    );
    sub.prepare().await?;
    // A `:` comment once the stream has been quiet for the interval, and again every interval
    // while it stays quiet (the interval restarts with each burst). Validated to be at least
    // a second; never zero, which an interval cannot have.
    let every = Duration::from_secs(cfg.sse_heartbeat_secs.max(1));
    let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
    // A client that stopped reading for a while gets one heartbeat, not the missed ones.
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let live = bursts(sub, state.metrics.delivered("sse"))
        .timeout_repeating(heartbeat)
        .map(|burst| burst.unwrap_or(Bytes::from_static(b":\n\n")));
    let st = Stream {
        live: Box::pin(live),
        stop: state.stop_signal(),
        preamble: Some(Bytes::from(format!("retry: {}\n\n", cfg.sse_retry_ms))),
        expiry: access
            .deadline()
            .map(|at| Box::pin(tokio::time::sleep_until(at))),
        expired: false,
        _gauge: state.metrics.track_subscriber("sse"),
    };
    let chunks = stream::unfold(st, |mut st| async move {
        let chunk = next_chunk(&mut st).await?;
        Some((chunk, st))
    });
    let mut resp = Response::new(if gzip {
        gzipped(chunks)
    } else {
        BodyExt::boxed_unsync(StreamBody::new(chunks.map(|c| Ok(Frame::data(c)))))
    });
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
async fn until(deadline: &mut Option<Pin<Box<Sleep>>>) {
    match deadline {
        Some(d) => d.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The gzip'd body of a stream of `chunks`: compressed as they come, and sync-flushed whenever
/// the next chunk is not ready yet (async-compression's encoder flushes when its input is
/// pending), so every event and heartbeat reaches the client as soon as it is written, never
/// held back; chunks that are ready together share one flush. The gzip trailer follows the
/// last chunk, so a client sees a complete stream when the server ends it.
fn gzipped(chunks: impl tokio_stream::Stream<Item = Bytes> + Send + 'static) -> Body {
    let plain = StreamReader::new(chunks.map(Ok::<Bytes, std::io::Error>));
    let encoder = GzipEncoder::with_quality(plain, Level::Fastest);
    // Compressing in memory cannot fail; if it ever did, the stream ends there.
    let out = ReaderStream::with_capacity(encoder, GZIP_OUT)
        .map_while(Result::ok)
        .map(|c| Ok(Frame::data(c)));
    BodyExt::boxed_unsync(StreamBody::new(out))
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
    // `next` on a stream is cancel-safe: a burst being read when another branch wins stays in
    // `live` for the next call.
    tokio::select! {
        _ = st.stop.changed() => None,
        _ = until(&mut st.expiry) => {
            st.expired = true;
            Some(Bytes::from_static(b": token expired\n\n"))
        }
        chunk = st.live.next() => chunk,
    }
}

/// The subscription's deliveries as SSE text, one item per burst: what is ready at once is
/// coalesced into one write of up to about [`MAX_CHUNK`] bytes. Ends when the subscription
/// cannot continue (log failure, the hub gone).
fn bursts(sub: Subscription, delivered: Counter) -> impl tokio_stream::Stream<Item = Bytes> {
    stream::unfold((sub, delivered), |(mut sub, delivered)| async move {
        let first = match sub.next().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "SSE stream ends");
                return None;
            }
        };
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
                next = sub.next_ready();
            }
        }
        delivered.inc_by(events);
        Some((chunk.freeze(), (sub, delivered)))
    })
}
