//! `GET /v1/topics` (optionally `?pattern=P&limit=N`) and `GET /v1/topics/{topic}`.
//!
//! With authorization on, the list holds only topics some subscribe grant of the token
//! matches, and one topic's statistics need such a grant (403 otherwise, before looking the
//! topic up, so a 404 never tells a token what exists outside its grants).

use std::sync::Arc;

use http::{Response, StatusCode};

use super::{json_response, query_pairs, ApiError, AppState, Body};
use crate::auth::{intersect, Access};
use crate::log::TopicStats;
use crate::topic::{Pattern, Topic};

/// Default and largest number of topics one list answer holds.
const LIST_LIMIT: usize = 1000;
const LIST_MAX: usize = 10_000;

/// Lists topics in name order with their statistics: those `access` may subscribe to.
pub async fn list(
    state: &Arc<AppState>,
    query: Option<&str>,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
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
    let log = state.log().await?;
    let topics = match access.grants() {
        None => log.topics(pattern.as_ref(), limit).await?,
        Some(grants) => {
            // One scan per grant, narrowed to what the filter also matches. Each scan's first
            // `limit` names (in name order) include every name of the merged first `limit`.
            let mut all: Vec<TopicStats> = Vec::new();
            for g in grants.subscribe_grants() {
                let scope = match &pattern {
                    None => Some(g.clone()),
                    Some(p) => intersect(g, p),
                };
                if let Some(scope) = scope {
                    all.extend(log.topics(Some(&scope), limit).await?);
                }
            }
            all.sort_by(|a, b| a.topic.cmp(&b.topic));
            all.dedup_by(|a, b| a.topic == b.topic);
            all.truncate(limit);
            all
        }
    };
    let body = serde_json::json!({ "topics": topics }).to_string();
    Ok(json_response(StatusCode::OK, body))
}

/// One topic's statistics, 404 when nothing was ever published to it (on JetStream: when
/// none of its events is retained); 403 when `access` may
/// not subscribe to it.
pub async fn one(
    state: &Arc<AppState>,
    name: &str,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    let topic = Topic::parse_with_limit(name, state.config.max_topic_len)
        .map_err(|e| ApiError::invalid_topic(name, e))?;
    access.check_read(&topic)?;
    let stats = state.log().await?.topic(&topic).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            if state.config.log == crate::config::LogBackend::Nats {
                format!("{name:?} has no retained event (nothing was published to it, or all of its events expired)")
            } else {
                format!("nothing was ever published to {name:?}")
            },
        )
    })?;
    let body = serde_json::to_string(&stats)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(json_response(StatusCode::OK, body))
}
