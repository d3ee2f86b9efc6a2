//! The HTTP surface of the contract: routing, shared request helpers and the per-route
//! handlers (one module each). Handlers know the publish path, the log interface and the hub;
//! they know nothing of sled.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use crate::auth::{Access, AuthError, Authenticator};
use crate::config::Config;
use crate::hub::Hub;
use crate::log::EventLog;
use crate::metrics::Metrics;
use crate::publish::Publisher;

mod client;
pub mod error;
pub mod h1_stream;
mod health;
mod latest;
pub mod origin;
mod poll;
mod publish;
pub mod refuse;
mod sse;
pub mod start;
mod stats;
mod topics;
mod webhooks;
mod ws;

pub use error::ApiError;

/// Every response body: either whole (`Full`) or streamed (SSE).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long a request waits for the log to open before it is answered 503.
pub const LOG_OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a request waits for an open log that is momentarily unavailable (a gateway
/// reconnecting to NATS) before it is answered 503.
pub const LOG_AVAILABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What every handler can reach.
pub struct AppState {
    /// The configuration in force.
    pub config: Config,
    /// The live fan-out.
    pub hub: Hub,
    /// Metrics of this server.
    pub metrics: Metrics,
    /// Verifies tokens; `None` when no key is configured (an open server).
    auth: Option<Arc<Authenticator>>,
    log: OnceLock<Arc<dyn EventLog>>,
    log_opened: watch::Sender<bool>,
    ready: AtomicBool,
    stop: watch::Receiver<bool>,
    /// How many WebSocket tasks are alive. hyper's graceful shutdown does not track upgraded
    /// connections, so the server waits on this before it closes the log.
    sockets: watch::Sender<usize>,
    /// Publish rate and connection caps (src/limits/).
    pub limits: Arc<crate::limits::Limits>,
    webhooks: OnceLock<Arc<crate::webhook::Webhooks>>,
}

/// Counts one live WebSocket task in [`AppState`] until dropped.
pub struct SocketGuard(watch::Sender<usize>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl AppState {
    /// State for a server whose log is not open yet (`/readyz` answers 503 until
    /// [`AppState::set_log`]). `stop` turns true when the server shuts down.
    pub fn new(config: Config, hub: Hub, metrics: Metrics, stop: watch::Receiver<bool>) -> Self {
        let limits = crate::limits::Limits::new(&config, &metrics);
        AppState {
            config,
            hub,
            metrics,
            auth: None,
            log: OnceLock::new(),
            log_opened: watch::Sender::new(false),
            ready: AtomicBool::new(false),
            stop,
            sockets: watch::Sender::new(0),
            limits,
            webhooks: OnceLock::new(),
        }
    }

    /// Checks tokens with `auth` from now on (`None`: the server is open).
    pub fn with_authenticator(mut self, auth: Option<Authenticator>) -> Self {
        self.auth = auth.map(Arc::new);
        self
    }

    /// The token verifier, `None` on an open server.
    pub fn authenticator(&self) -> Option<&Authenticator> {
        self.auth.as_deref()
    }

    /// What a request with these headers and query may do: [`Access::Open`] when no key is
    /// configured, else the grants of its verified token (401 when it has none or a bad one).
    pub fn access(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Access, ApiError> {
        match &self.auth {
            None => Ok(Access::Open),
            Some(auth) => Ok(Access::Token(auth.authorize(headers, query)?)),
        }
    }

    /// `/metrics` is open unless `metrics_token` is set; then it needs exactly that bearer.
    fn check_metrics(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.config.metrics_token else {
            return Ok(());
        };
        match crate::auth::extract::bearer(headers)? {
            None => Err(AuthError::Missing.into()),
            Some(t)
                if crate::auth::extract::constant_time_eq(
                    t.as_bytes(),
                    expected.expose().as_bytes(),
                ) =>
            {
                Ok(())
            }
            Some(_) => Err(AuthError::BadSignature.into()),
        }
    }

    /// Installs the opened log and declares the server ready.
    pub fn set_log(&self, log: Arc<dyn EventLog>) {
        let _ = self.log.set(log);
        self.log_opened.send_replace(true);
        self.ready.store(true, Ordering::Release);
    }

    /// Installs the webhooks (before [`AppState::set_log`]: a ready server serves them).
    pub fn set_webhooks(&self, webhooks: Arc<crate::webhook::Webhooks>) {
        let _ = self.webhooks.set(webhooks);
    }

    /// The webhooks; 503 while they are not started (the log still opening, or a gateway
    /// whose NATS has not answered yet). An operator's API: it does not wait.
    pub fn webhooks(&self) -> Result<Arc<crate::webhook::Webhooks>, ApiError> {
        self.webhooks.get().cloned().ok_or_else(ApiError::not_ready)
    }

    /// The webhooks if started.
    pub fn webhooks_now(&self) -> Option<Arc<crate::webhook::Webhooks>> {
        self.webhooks.get().cloned()
    }

    /// Declares the server not ready (shutting down).
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Whether the server takes requests: the log is open and ready, and the webhooks are
    /// started (over JetStream they start once NATS answers).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !*self.stop.borrow()
            && self.log.get().is_some_and(|log| log.is_ready())
            && self.webhooks.get().is_some()
    }

    /// The log. A request that arrives while the log is still opening (just after a restart)
    /// waits for it, up to [`LOG_OPEN_WAIT`], rather than being refused: a browser's
    /// `EventSource` gives up for good on an error status, so a reconnect that lands in that
    /// window must be held, not answered 503. After the wait: 503.
    ///
    /// A log that is open but not available (a gateway that has lost NATS, or does not follow
    /// its stream yet) is waited for up to [`LOG_AVAILABLE_WAIT`], then refused with its
    /// reason (503 `log_unavailable`, `Retry-After`): a subscription opened before the
    /// gateway follows its stream could miss events, and a publish cannot be acknowledged.
    pub async fn log(&self) -> Result<Arc<dyn EventLog>, ApiError> {
        let log = match self.log.get() {
            Some(log) => log.clone(),
            None => {
                let mut opened = self.log_opened.subscribe();
                let _ = tokio::time::timeout(LOG_OPEN_WAIT, opened.wait_for(|o| *o)).await;
                self.log.get().cloned().ok_or_else(ApiError::not_ready)?
            }
        };
        let deadline = tokio::time::Instant::now() + LOG_AVAILABLE_WAIT;
        loop {
            match log.check_available() {
                Ok(()) => return Ok(log),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
            }
        }
    }

    /// The publish path (waits for the log like [`AppState::log`]).
    pub async fn publisher(&self) -> Result<Publisher, ApiError> {
        Ok(Publisher::new(self.log().await?, self.metrics.clone()))
    }

    /// Counts a WebSocket task as live until the guard is dropped.
    pub fn track_socket(&self) -> SocketGuard {
        self.sockets.send_modify(|n| *n += 1);
        SocketGuard(self.sockets.clone())
    }

    /// Resolves once no WebSocket task is live: each has sent the acks of its publishes in
    /// flight and its close frame (or given up on its peer). The caller bounds the wait.
    pub async fn sockets_closed(&self) {
        let mut rx = self.sockets.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// A receiver that turns true when the server shuts down (streams end then).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }
}

/// Serves one request. Never fails: every error becomes the contract's error response.
pub async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Only ever logged redacted: it may carry `access_token`.
    let query = req
        .uri()
        .query()
        .map(|q| crate::auth::extract::redact_query(q).into_owned());
    let query = query.as_deref().unwrap_or("");
    let origin = req.headers().get(header::ORIGIN).cloned();
    let result =
        if let Err(e) = crate::limits::check_header_size(&req, state.config.max_header_bytes) {
            Err(e.into())
        } else if method == Method::OPTIONS {
            Ok(preflight(&state, origin.as_ref()))
        } else {
            route(&state, req, &method, &path).await
        };
    let mut resp = match result {
        Ok(resp) => {
            // Streams log when their response head is ready, not when they end.
            tracing::debug!(%method, %path, %query, status = resp.status().as_u16(), "request");
            resp
        }
        Err(e) => {
            state.metrics.observe_rejected(e.status.as_u16(), e.code);
            tracing::debug!(%method, %path, %query, status = e.status.as_u16(), code = e.code, "request");
            error_response(&e)
        }
    };
    apply_cors(&state.config, origin.as_ref(), resp.headers_mut());
    resp
}

/// Every `(method, path template)` that [`route`] dispatches; `{topic}` stands for a topic,
/// slashes included. Every `GET` route also answers `HEAD`, and `OPTIONS` (CORS preflight) is
/// answered on every path. `schemas/openapi.yaml` documents exactly these routes
/// (`tests/schemas.rs` checks it both ways; the test below checks each is dispatched).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/topics/{topic}/events"),
    ("POST", "/v1/events"),
    ("GET", "/v1/sse"),
    ("GET", "/v1/ws"),
    ("GET", "/v1/poll"),
    ("GET", "/v1/topics"),
    ("GET", "/v1/topics/{topic}"),
    ("GET", "/v1/latest"),
    ("GET", "/v1/latest/{topic}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/client.js"),
    ("GET", "/v1/client.d.ts"),
    ("GET", "/console"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{name}"),
    ("PUT", "/v1/webhooks/{name}"),
    ("DELETE", "/v1/webhooks/{name}"),
];

async fn route<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    method: &Method,
    path: &str,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let get_only = |m: &Method| {
        if m == Method::GET || m == Method::HEAD {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed("GET"))
        }
    };
    match path {
        "/healthz" => get_only(method).map(|_| health::healthz()),
        "/readyz" => get_only(method).map(|_| health::readyz(state)),
        "/metrics" => {
            get_only(method)?;
            state.check_metrics(req.headers())?;
            Ok(health::metrics(state))
        }
        "/v1/client.js" => get_only(method).map(|_| client::client_js()),
        "/v1/client.d.ts" => get_only(method).map(|_| client::client_dts()),
        "/console" => {
            get_only(method)?;
            client::console(state)
        }
        "/v1/stats" => {
            get_only(method)?;
            stats::stats(state, req.headers(), req.uri().query()).await
        }
        "/v1/poll" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            poll::poll(state, &req, &access).await
        }
        "/v1/sse" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            sse::subscribe(state, &req, &access).await
        }
        "/v1/ws" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            ws::upgrade(state, req, access).await
        }
        "/v1/events" => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let access = state.access(req.headers(), req.uri().query())?;
            publish::publish(state, req, None, &access).await
        }
        "/v1/topics" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            topics::list(state, req.uri().query(), &access).await
        }
        "/v1/latest" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            latest::many(state, &req, &access).await
        }
        "/v1/webhooks" => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            webhooks::list(state, &access).await
        }
        _ if path.starts_with("/v1/webhooks/") => {
            let access = state.access(req.headers(), req.uri().query())?;
            let name = path
                .strip_prefix("/v1/webhooks/")
                .unwrap_or_default()
                .to_owned();
            webhooks::one(state, req, method, &name, &access).await
        }
        _ if path.starts_with("/v1/latest/") => {
            get_only(method)?;
            let access = state.access(req.headers(), req.uri().query())?;
            let topic = path.strip_prefix("/v1/latest/").unwrap_or_default();
            latest::one(state, &req, topic, &access).await
        }
        _ => {
            let Some(rest) = path.strip_prefix("/v1/topics/") else {
                return Err(ApiError::not_found());
            };
            if method == Method::POST {
                let Some(topic) = rest.strip_suffix("/events") else {
                    return Err(ApiError::method_not_allowed("GET"));
                };
                let access = state.access(req.headers(), req.uri().query())?;
                return publish::publish(state, req, Some(topic), &access).await;
            }
            get_only(method).map_err(|_| ApiError::method_not_allowed("GET, POST"))?;
            let access = state.access(req.headers(), req.uri().query())?;
            topics::one(state, rest, &access).await
        }
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A whole (non-streamed) body.
pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// The contract's error response for `e`: its status, JSON body and extra header.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = json_response(e.status, e.body());
    if let Some((name, value)) = &e.header {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

/// The query string's pairs, percent-decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes()).collect()
}

/// Whether `Accept-Encoding` allows gzip (`q=0` refuses it).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

fn origin_allowed(config: &Config, origin: &HeaderValue) -> bool {
    config
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
}

/// Adds CORS headers when the request's origin is allowed by `allowed_origins`.
fn apply_cors(config: &Config, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    if config.allowed_origins.is_empty() {
        return;
    }
    // Appended: a response may vary on other headers too (long-poll: Accept, Accept-Encoding).
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin {
        if origin_allowed(config, origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            if config
                .allowed_origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes())
            {
                // A listed origin may send cookies (EventSource `withCredentials`); `*` may not.
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Content-Type, Retry-After, WWW-Authenticate"),
            );
        }
    }
}

/// Answers a CORS preflight: allowed origins get the methods and headers the API uses.
fn preflight(state: &AppState, origin: Option<&HeaderValue>) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    if let Some(origin) = origin.filter(|o| origin_allowed(&state.config, o)) {
        // `*` allows reads only: POST (publish) is offered to origins listed by name.
        let methods = if origin::is_listed(&state.config, origin) {
            "GET, POST, OPTIONS"
        } else {
            "GET, OPTIONS"
        };
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "Authorization, Content-Type, Content-Encoding, Last-Event-ID",
            ),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

#[cfg(test)]
mod route_table_tests {
    use super::*;

    /// Sends one request to a server state whose log never opens: every request below is
    /// answered before a handler would wait for the log.
    async fn send(method: &str, path: &str) -> (StatusCode, serde_json::Value, HeaderMap) {
        let (_stop_tx, stop) = watch::channel(false);
        let state = Arc::new(AppState::new(
            Config::default(),
            Hub::new(16),
            Metrics::new(),
            stop,
        ));
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), handle(state, req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path} waited for the log"));
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, json, headers)
    }

    /// The template filled in so that the handler answers without the log: an invalid topic
    /// (422) and `limit=0` (400 where `limit` is read).
    fn concrete(template: &str) -> String {
        format!("{}?limit=0", template.replace("{topic}", "a//b"))
    }

    #[tokio::test]
    async fn every_listed_route_reaches_its_handler() {
        for (method, template) in ROUTES {
            let path = concrete(template);
            let (status, body, _) = send(method, &path).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {body}"
            );
            assert_ne!(
                body["error"]["code"], "not_found",
                "{method} {path} is listed but not routed"
            );
        }
    }

    #[tokio::test]
    async fn other_methods_on_listed_paths_are_405_with_allow_and_other_paths_404() {
        for (method, template) in ROUTES {
            let path = concrete(template);
            let other = if *method == "GET" { "PUT" } else { "DELETE" };
            if ROUTES.contains(&(other, template)) {
                continue;
            }
            let (status, body, headers) = send(other, &path).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{other} {path}: {body}"
            );
            assert!(headers.contains_key(header::ALLOW), "{other} {path}");
        }
        for path in ["/", "/v1", "/v2/events", "/v1/topic", "/healthz/x"] {
            let (status, body, _) = send("GET", path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body["error"]["code"], "not_found", "{path}");
        }
    }
}
