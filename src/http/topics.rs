//! `GET /v1/topics` (optionally `?pattern=P&limit=N`) and `GET /v1/topics/{topic}`.

use std::sync::Arc;

use http::{Response, StatusCode};

use super::{json_response, query_pairs, ApiError, AppState, Body};
use crate::topic::{Pattern, Topic};

/// Default and largest number of topics one list answer holds.
const LIST_LIMIT: usize = 1000;
const LIST_MAX: usize = 10_000;

/// Lists topics in name order with their statistics.
pub async fn list(state: &Arc<AppState>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut pattern = None;
    let mut limit = LIST_LIMIT;
    for (k, v) in query_pairs(query) {
        match &*k {
            "pattern" => {
                pattern = Some(Pattern::parse(&v).map_err(|e| ApiError::invalid_pattern(&v, e))?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ApiError::bad_request("limit must be a positive integer"))?
                    .min(LIST_MAX)
            }
            _ => {}
        }
    }
    let topics = state.log().await?.topics(pattern.as_ref(), limit);
    let body = serde_json::json!({ "topics": topics }).to_string();
    Ok(json_response(StatusCode::OK, body))
}

/// One topic's statistics, 404 when nothing was ever published to it.
pub async fn one(state: &Arc<AppState>, name: &str) -> Result<Response<Body>, ApiError> {
    let topic = Topic::parse_with_limit(name, state.config.max_topic_len)
        .map_err(|e| ApiError::invalid_topic(name, e))?;
    let stats = state.log().await?.topic(&topic).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            format!("nothing was ever published to {name:?}"),
        )
    })?;
    let body = serde_json::to_string(&stats)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(json_response(StatusCode::OK, body))
}
