//! `GET /v1/webhooks`, and `PUT`, `GET`, `DELETE /v1/webhooks/{name}`: managing webhooks.
//! With a key configured, every one needs a token with the admin claim; an open (loopback)
//! server allows them. Secrets and header values are never shown.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use super::{json_response, ApiError, AppState, Body};
use crate::auth::Access;
use crate::webhook::spec::Request as WebhookRequest;

/// `GET /v1/webhooks`: `{"webhooks": [view, …]}` in name order.
pub async fn list(state: &Arc<AppState>, access: &Access) -> Result<Response<Body>, ApiError> {
    access.check_admin()?;
    let hooks = state.webhooks()?;
    let all = hooks.list().await;
    json(StatusCode::OK, &serde_json::json!({ "webhooks": all }))
}

/// One webhook: `PUT` creates (201) or updates (200), `GET` shows, `DELETE` removes (204).
pub async fn one<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    method: &Method,
    name: &str,
    access: &Access,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    access.check_admin()?;
    if *method == Method::GET || *method == Method::HEAD {
        let hooks = state.webhooks()?;
        return json(StatusCode::OK, &hooks.get(name).await?);
    }
    if *method == Method::DELETE {
        let hooks = state.webhooks()?;
        hooks.delete(name).await?;
        let mut resp = Response::new(super::full(Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    }
    if *method != Method::PUT {
        return Err(ApiError::method_not_allowed("GET, PUT, DELETE"));
    }
    let cfg = &state.config;
    let read = super::publish::read_body(req.into_body(), cfg.max_body_bytes, false, 0);
    let body = if cfg.body_read_timeout_secs == 0 {
        read.await?
    } else {
        let limit = std::time::Duration::from_secs(cfg.body_read_timeout_secs);
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| ApiError::request_timeout(cfg.body_read_timeout_secs))??
    };
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let wanted: WebhookRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_webhook",
            e.to_string(),
        )
    })?;
    let hooks = state.webhooks()?;
    let (view, created) = hooks.put(name, wanted).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json(status, &view)
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(json_response(status, bytes))
}
