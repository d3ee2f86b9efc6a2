//! `GET /v1/poll`: the long-poll fallback, for clients behind proxies that buffer or cut streams.
//!
//! `?topic=P[&topic=P2…]&since=c&timeout=T&limit=N`, or instead of `since` a start option:
//! `start=latest` (the newest event of each matching topic, then as usual; a snapshot larger
//! than `limit` goes on in the next polls, whose `next` then lies inside it and re-reads from
//! there, so nothing is missed) or `start_time=T` (see [`super::start`]). Returns at once when events with id > c
//! match; otherwise holds until one is committed (woken by the hub, no sleep loop) or `T`
//! seconds pass. The body is `{"events":[…],"next":n}` (+ `"gap"` when history before the
//! cursor is gone); `next` is the cursor to send next, so a client that loops on it sees every
//! event once, in order, across any number of polls, cut connections and restarts. Without
//! `since` the poll is live only and an empty answer's `next` is the head.
//!
//! Responses are whole (`Content-Length`, never chunked) and `Cache-Control: no-store`, so a
//! proxy that buffers everything passes them intact. `Accept: application/msgpack` gives the
//! same body in MessagePack; `Accept-Encoding: gzip` gzips bodies above a small threshold.
//! A waiting poll is one hub registration and a timer: a client that goes away is dropped
//! with its request, and the `live_subscribers{transport="poll"}` gauge shows the waiters.
//!
//! With authorization on, every pattern needs a covering subscribe grant (403 otherwise), and
//! a poll waits no longer than its token is accepted: at expiry it answers like a timeout (an
//! ordinary 200, empty unless events arrived, `next` as usual), so nothing is lost and the
//! client's next poll with the stale token gets the 401 that tells it to fetch a new one.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};

use super::start::StartOptions;
use super::{full, query_pairs, ApiError, AppState, Body};
use crate::auth::Access;
use crate::envelope::{write_envelope_array, EventId, Gap, SharedEvent, WireFormat};
use crate::subscription::{Delivery, Start, Subscription};
use crate::topic::{parse_cursor, Pattern, PatternSet};

/// `timeout=` when absent, seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 25;
/// `limit=` when absent.
pub const DEFAULT_LIMIT: usize = 1000;
/// Bodies smaller than this are not worth gzipping.
const GZIP_MIN_BYTES: usize = 1024;

/// A validated poll request.
struct PollRequest {
    patterns: PatternSet,
    start: Start,
    timeout: Duration,
    limit: usize,
}

fn parse(state: &AppState, query: Option<&str>) -> Result<PollRequest, ApiError> {
    let cfg = &state.config;
    let mut patterns = Vec::new();
    let mut since = None;
    let mut start = StartOptions::default();
    let mut timeout = DEFAULT_TIMEOUT_SECS;
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in query_pairs(query) {
        match &*k {
            "topic" => patterns.push(
                Pattern::parse_with_limit(&v, cfg.max_topic_len)
                    .map_err(|e| ApiError::invalid_pattern(&v, e))?,
            ),
            "since" if !v.is_empty() => {
                since = Some(EventId(
                    parse_cursor(&v).ok_or_else(|| ApiError::invalid_cursor(&v))?,
                ))
            }
            "start" => start.set_start(&v)?,
            "start_time" => start.set_time(&v)?,
            "timeout" => {
                timeout = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("timeout {v:?} is not a number of seconds"))
                })?
            }
            "limit" => {
                limit =
                    v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        ApiError::bad_request(format!("limit {v:?} is not 1 or more"))
                    })?
            }
            _ => {}
        }
    }
    if patterns.len() > cfg.max_patterns {
        return Err(ApiError::too_many_patterns(cfg.max_patterns));
    }
    let patterns = PatternSet::new(patterns)
        .ok_or_else(|| ApiError::bad_request("at least one `topic` query parameter is required"))?;
    Ok(PollRequest {
        patterns,
        start: start.start(since)?,
        timeout: Duration::from_secs(timeout.min(cfg.poll_max_timeout_secs)),
        limit: limit.min(cfg.poll_max_limit),
    })
}

/// Answers one poll, if `access` covers every pattern; waits at most until its token expires.
pub async fn poll<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let mut p = parse(state, req.uri().query())?;
    for pattern in p.patterns.patterns() {
        access.check_subscribe(pattern)?;
    }
    if let Some(left) = access.remaining() {
        p.timeout = p.timeout.min(left);
    }
    let format = if accepts(req.headers(), "application/msgpack") {
        WireFormat::Msgpack
    } else {
        WireFormat::Json
    };
    let gzip = super::accepts_gzip(req.headers());
    let log = state.log().await?;
    let _waiting = state.metrics.track_subscriber("poll");
    let mut sub = Subscription::open_at(
        log,
        &state.hub,
        p.patterns,
        p.start,
        p.limit.min(state.config.replay_page),
        state.metrics.clone(),
    );
    sub.prepare().await?;
    let mut gap = None;
    let mut events = Vec::new();
    let mut stop = state.stop_signal();
    // Wait for the first delivery (history answers at once), then take what else is ready.
    let first = tokio::select! {
        d = sub.next() => d.ok(),
        _ = tokio::time::sleep(p.timeout) => None,
        _ = stop.wait_for(|s| *s) => None,
    };
    // After a timeout, skip over what was committed meanwhile (it did not match, or it is
    // taken now), so `next` moves as far as it safely can.
    let mut next = match first {
        Some(d) => Some(d),
        None => sub.next_available().await.ok().flatten(),
    };
    while let Some(d) = next.take() {
        match d {
            Delivery::Gap(g) => gap = Some(g),
            Delivery::Event(e) => events.push(e),
        }
        if events.len() >= p.limit {
            break;
        }
        next = sub.next_available().await.ok().flatten();
    }
    let cursor = sub.resume_cursor();
    state.metrics.delivered("poll").inc_by(events.len() as u64);
    Ok(respond(format, gzip, &events, gap, cursor))
}

fn respond(
    format: WireFormat,
    gzip: bool,
    events: &[SharedEvent],
    gap: Option<Gap>,
    next: EventId,
) -> Response<Body> {
    let body = encode_body(format, events, gap, next);
    let (body, gzipped) = if gzip && body.len() >= GZIP_MIN_BYTES {
        match gzip_bytes(&body) {
            Ok(z) => (z, true),
            Err(_) => (body, false),
        }
    } else {
        (body, false)
    };
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match format {
            WireFormat::Json => "application/json",
            WireFormat::Msgpack => "application/msgpack",
        }),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    if gzipped {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

/// The poll body: `{"events":[…],"next":n[,"gap":{"requested":c,"oldest":o}]}` in JSON or
/// as the same MessagePack map. Envelopes are copied from their cached encodings.
pub fn encode_body(
    format: WireFormat,
    events: &[SharedEvent],
    gap: Option<Gap>,
    next: EventId,
) -> Vec<u8> {
    let size: usize = events.iter().map(|e| e.json().len() + 1).sum();
    let mut out = Vec::with_capacity(size + 96);
    match format {
        WireFormat::Json => {
            out.extend_from_slice(b"{\"events\":");
            write_envelope_array(format, events, &mut out);
            out.extend_from_slice(format!(",\"next\":{}", next.0).as_bytes());
            if let Some(g) = gap {
                out.extend_from_slice(
                    format!(
                        ",\"gap\":{{\"requested\":{},\"oldest\":{}}}",
                        g.requested, g.oldest
                    )
                    .as_bytes(),
                );
            }
            out.push(b'}');
        }
        WireFormat::Msgpack => {
            // Writing to a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut out, if gap.is_some() { 3 } else { 2 });
            let _ = rmp::encode::write_str(&mut out, "events");
            write_envelope_array(format, events, &mut out);
            let _ = rmp::encode::write_str(&mut out, "next");
            let _ = rmp::encode::write_uint(&mut out, next.0);
            if let Some(g) = gap {
                let _ = rmp::encode::write_str(&mut out, "gap");
                let _ = rmp::encode::write_map_len(&mut out, 2);
                let _ = rmp::encode::write_str(&mut out, "requested");
                let _ = rmp::encode::write_uint(&mut out, g.requested);
                let _ = rmp::encode::write_str(&mut out, "oldest");
                let _ = rmp::encode::write_uint(&mut out, g.oldest);
            }
        }
    }
    out
}

fn gzip_bytes(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    gz.write_all(body)?;
    gz.finish()
}

/// Whether `Accept` names `media` (parameters ignored).
pub(super) fn accepts(headers: &HeaderMap, media: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            item.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(media))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn gzip_is_offered_unless_refused_with_q_zero() {
        assert!(super::super::accepts_gzip(&headers(
            header::ACCEPT_ENCODING,
            "gzip, deflate, br"
        )));
        assert!(super::super::accepts_gzip(&headers(
            header::ACCEPT_ENCODING,
            "br;q=1.0, GZIP;q=0.5"
        )));
        assert!(super::super::accepts_gzip(&headers(
            header::ACCEPT_ENCODING,
            "*"
        )));
        assert!(!super::super::accepts_gzip(&headers(
            header::ACCEPT_ENCODING,
            "gzip;q=0"
        )));
        assert!(!super::super::accepts_gzip(&headers(
            header::ACCEPT_ENCODING,
            "identity"
        )));
        assert!(!super::super::accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn msgpack_is_chosen_only_when_accepted() {
        assert!(accepts(
            &headers(
                header::ACCEPT,
                "application/json;q=0.5, application/msgpack"
            ),
            "application/msgpack"
        ));
        assert!(!accepts(
            &headers(header::ACCEPT, "*/*"),
            "application/msgpack"
        ));
    }

    #[test]
    fn empty_bodies_name_the_next_cursor_and_the_gap() {
        let body = encode_body(WireFormat::Json, &[], None, EventId(7));
        assert_eq!(body, br#"{"events":[],"next":7}"#);
        let gap = Gap {
            requested: 2,
            oldest: 6,
        };
        let body = encode_body(WireFormat::Json, &[], Some(gap), EventId(5));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"events":[],"next":5,"gap":{"requested":2,"oldest":6}})
        );
        let body = encode_body(WireFormat::Msgpack, &[], Some(gap), EventId(5));
        let v: serde_json::Value = rmp_serde::from_slice(&body).expect("msgpack");
        assert_eq!(
            v,
            serde_json::json!({"events":[],"next":5,"gap":{"requested":2,"oldest":6}})
        );
    }
}
