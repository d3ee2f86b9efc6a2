//! `GET /v1/stats`: the server-wide counters the web console charts (events stored, and per
//! transport the events delivered and the subscribers open now), with the log's head and the
//! server's clock. Rates are the client's to compute from two samples.
//!
//! It is a subset of `/metrics` that also describes all topics at once, so it never lets
//! anyone read more than they already may: with `metrics_token` set it needs what `/metrics`
//! needs (that bearer), and with authorization on it also needs a token whose subscribe
//! grants cover every topic (`**`) unless the bearer is the metrics token itself.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use super::{json_response, ApiError, AppState, Body};
use crate::auth::{extract, Access, AuthError};
use crate::topic::Pattern;

/// Whether the request may read the server-wide counters (see the module header).
fn authorize(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    let metrics_bearer = match &state.config.metrics_token {
        None => false,
        Some(expected) => match extract::bearer(headers)? {
            Some(t) if extract::constant_time_eq(t.as_bytes(), expected.expose().as_bytes()) => {
                true
            }
            // With a metrics token set, /metrics is closed: so is this, unless the token is
            // one that could read every event anyway.
            _ if state.authenticator().is_none() => return Err(AuthError::Missing.into()),
            _ => false,
        },
    };
    if metrics_bearer {
        return Ok(());
    }
    let access = state.access(headers, query)?;
    if matches!(access, Access::Open) {
        return Ok(());
    }
    let everything = Pattern::parse("**").map_err(|e| ApiError::invalid_pattern("**", e))?;
    access.check_subscribe(&everything)?;
    Ok(())
}

/// `{"time", "head", "events_stored", "publishes", "transports": {"sse"|"ws"|"poll":
/// {"delivered", "subscribers"}}}`.
pub async fn stats(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    authorize(state, headers, query)?;
    // Never waits for a log that is still opening: the console asks again in a second.
    let head = state.log.get().ok_or_else(ApiError::not_ready)?.head().0;
    let t = state.metrics.totals();
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let body = serde_json::json!({
        "time": time,
        "head": head,
        "events_stored": t.events_stored,
        "publishes": t.publishes,
        "transports": { "sse": t.sse, "ws": t.ws, "poll": t.poll },
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
