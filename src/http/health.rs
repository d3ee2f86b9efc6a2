//! `GET /healthz` (the process answers), `GET /readyz` (the log is open and the server is
//! not shutting down) and `GET /metrics` (Prometheus text).

use http::{header, HeaderValue, Response, StatusCode};

use super::{full, json_response, ApiError, AppState, Body};

/// Always 200 while the process serves requests.
pub fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// 200 once the log is open and the listener is up; 503 before that and while shutting down.
pub fn readyz(state: &AppState) -> Response<Body> {
    if state.is_ready() {
        json_response(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        let e = ApiError::not_ready();
        json_response(e.status, e.body())
    }
}

/// Every metric in the Prometheus text format.
pub fn metrics(state: &AppState) -> Response<Body> {
    let mut resp = Response::new(full(state.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
