//! `GET /v1/latest/{topic}` and `GET /v1/latest?topic=PATTERN&limit=N`: the newest retained
//! event of one topic, or of each matching topic, read from the topics' records (one lookup
//! per topic, never a scan of the log).
//!
//! Not under `/v1/topics/`, where `…/latest` would name a topic. One topic answers its
//! envelope (JSON, or MessagePack for `Accept: application/msgpack`, as long-poll does) with
//! an `ETag` from its id and `304` on a matching `If-None-Match`; `404 no_event` when the
//! topic retains none. The list answers `{"events":[…],"next":n,"truncated":b}` in id order:
//! `next` is the cursor to continue from (a poll's `since`, an SSE `last_event_id`) without
//! missing or repeating anything, as after a `start=latest` snapshot. With authorization on,
//! one topic needs a read grant and a pattern a covering subscribe grant (403 otherwise).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};

use super::{full, query_pairs, ApiError, AppState, Body};
use crate::auth::Access;
use crate::envelope::{write_envelope_array, WireFormat};
use crate::topic::{Pattern, PatternSet, Topic};

/// `limit=` of the list when absent.
const DEFAULT_LIMIT: usize = 100;
/// Largest `limit=` of the list.
const MAX_LIMIT: usize = crate::subscription::LATEST_MAX_TOPICS;

fn format_of(headers: &HeaderMap) -> WireFormat {
    if super::poll::accepts(headers, "application/msgpack") {
        WireFormat::Msgpack
    } else {
        WireFormat::Json
    }
}

fn content_type(format: WireFormat) -> HeaderValue {
    HeaderValue::from_static(match format {
        WireFormat::Json => "application/json",
        WireFormat::Msgpack => "application/msgpack",
    })
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// The newest retained event of one topic.
pub async fn one<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    name: &str,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let topic = Topic::parse_with_limit(name, state.config.max_topic_len)
        .map_err(|e| ApiError::invalid_topic(name, e))?;
    // Before the lookup, so a 404 never tells a token what exists outside its grants.
    access.check_read(&topic)?;
    let pattern = Pattern::parse(topic.as_str()).map_err(|e| ApiError::invalid_topic(name, e))?;
    let patterns = PatternSet::new(vec![pattern]).ok_or_else(ApiError::not_found)?;
    let log = state.log().await?;
    let latest = log.latest(patterns, log.head(), 1).await?;
    let event = latest
        .events
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::no_event(name))?;
    let etag = format!("\"{}\"", event.id.0);
    let etag_value =
        HeaderValue::from_str(&etag).map_err(|_| ApiError::bad_request("unusable event id"))?;
    let format = format_of(req.headers());
    let mut resp = if not_modified(req.headers(), &etag) {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let body = match format {
            WireFormat::Json => event.json().clone(),
            WireFormat::Msgpack => event.msgpack().clone(),
        };
        let mut r = Response::new(full(body));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, content_type(format));
        r
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag_value);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(resp)
}

/// The newest retained event of each topic matching the patterns, at most `limit` topics.
pub async fn many<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let cfg = &state.config;
    let mut patterns = Vec::new();
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in query_pairs(req.uri().query()) {
        match &*k {
            "topic" => patterns.push(
                Pattern::parse_with_limit(&v, cfg.max_topic_len)
                    .map_err(|e| ApiError::invalid_pattern(&v, e))?,
            ),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ApiError::bad_request(format!("limit {v:?} is not 1 or more")))?
                    .min(MAX_LIMIT)
            }
            _ => {}
        }
    }
    if patterns.len() > cfg.max_patterns {
        return Err(ApiError::too_many_patterns(cfg.max_patterns));
    }
    let patterns = PatternSet::new(patterns)
        .ok_or_else(|| ApiError::bad_request("at least one `topic` query parameter is required"))?;
    for p in patterns.patterns() {
        access.check_subscribe(p)?;
    }
    let log = state.log().await?;
    let latest = log.latest(patterns, log.head(), limit).await?;
    let format = format_of(req.headers());
    let mut out = Vec::new();
    match format {
        WireFormat::Json => {
            out.extend_from_slice(b"{\"events\":");
            write_envelope_array(format, &latest.events, &mut out);
            out.extend_from_slice(
                format!(
                    ",\"next\":{},\"truncated\":{}}}",
                    latest.cursor.0, latest.truncated
                )
                .as_bytes(),
            );
        }
        WireFormat::Msgpack => {
            // Writing to a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut out, 3);
            let _ = rmp::encode::write_str(&mut out, "events");
            write_envelope_array(format, &latest.events, &mut out);
            let _ = rmp::encode::write_str(&mut out, "next");
            let _ = rmp::encode::write_uint(&mut out, latest.cursor.0);
            let _ = rmp::encode::write_str(&mut out, "truncated");
            let _ = rmp::encode::write_bool(&mut out, latest.truncated);
        }
    }
    let mut resp = Response::new(full(Bytes::from(out)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type(format));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(resp)
}
