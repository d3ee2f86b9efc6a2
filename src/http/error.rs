//! The one place where errors of every layer become the contract's status codes and bodies:
//! `{"error": {"code": "<snake_case>", "message": "<for a person>"}}`.

use http::{header, HeaderValue, StatusCode};

use crate::auth::AuthError;
use crate::codec::DecodeError;
use crate::log::LogError;
use crate::topic::NameError;

/// An error as the HTTP client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The contract's snake_case code.
    pub code: &'static str,
    /// A sentence for a person.
    pub message: String,
    /// Extra header (e.g. `Allow` on 405).
    pub header: Option<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            header: None,
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 for an unknown route.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 405 listing the allowed methods.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        ApiError {
            header: Some((header::ALLOW, HeaderValue::from_static(allow))),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route accepts {allow}"),
            )
        }
    }

    /// 503 while the log is opening or the server is shutting down.
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is starting or shutting down",
        )
    }

    /// 422 for a topic that breaks the naming rules.
    pub fn invalid_topic(name: &str, e: NameError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_topic",
            format!("topic {name:?} {e}"),
        )
    }

    /// 400 for a resume cursor that is not an event id.
    pub fn invalid_cursor(value: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            format!("the cursor {value:?} is not an event id"),
        )
    }

    /// 400 `invalid_start` for a start option that cannot be read, or two at once.
    pub fn invalid_start(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_start", message)
    }

    /// 404 `no_event` when a topic retains no event.
    pub fn no_event(topic: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no_event",
            format!("topic {topic:?} retains no event"),
        )
    }

    /// 422 when a subscription names more patterns than allowed.
    pub fn too_many_patterns(max: usize) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_patterns",
            format!("at most {max} topic patterns per subscription"),
        )
    }

    /// 422 for a pattern that breaks the naming rules.
    pub fn invalid_pattern(name: &str, e: NameError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_pattern",
            format!("pattern {name:?} {e}"),
        )
    }

    /// 422 when a WebSocket would hold more patterns than `ws_max_subscriptions`.
    pub fn too_many_subscriptions(max: usize) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_subscriptions",
            format!("at most {max} topic patterns per WebSocket"),
        )
    }

    /// 429 `rate_limited` with `Retry-After`: whole seconds, at least 1, rounded up from
    /// `retry_after` (the earliest moment the publisher's bucket holds a cell again).
    pub fn rate_limited(retry_after: std::time::Duration) -> Self {
        let secs = retry_seconds(retry_after);
        ApiError {
            header: Some((header::RETRY_AFTER, HeaderValue::from(secs))),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("publish rate exceeded: retry in {secs} s"),
            )
        }
    }

    /// 429 `too_many_connections` (with `Retry-After: 1`): this client address already holds
    /// `max` connections.
    pub fn too_many_connections(max: usize) -> Self {
        ApiError {
            header: Some((header::RETRY_AFTER, HeaderValue::from_static("1"))),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!("at most {max} concurrent connections per client address"),
            )
        }
    }

    /// 503 `server_at_capacity` (with `Retry-After: 1`): the server holds `max` connections.
    pub fn server_at_capacity(max: usize) -> Self {
        ApiError {
            header: Some((header::RETRY_AFTER, HeaderValue::from_static("1"))),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_at_capacity",
                format!("the server holds its maximum of {max} connections"),
            )
        }
    }

    /// 408 `request_timeout` with `Connection: close`: the request body did not arrive within
    /// `secs` seconds (the rest of it is not read, so the connection cannot be reused).
    pub fn request_timeout(secs: u64) -> Self {
        ApiError {
            header: Some((header::CONNECTION, HeaderValue::from_static("close"))),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {secs} s"),
            )
        }
    }

    /// 431 `headers_too_large`: the request line and headers exceed `max` bytes.
    pub fn headers_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request line and headers exceed {max} bytes"),
        )
    }

    /// 403 `origin_not_allowed`: a browser request from an origin that may not do this
    /// (`what`: "open a WebSocket", "publish").
    pub fn origin_not_allowed(origin: &str, what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin {origin:?} may not {what}: it is not listed in allowed_origins"),
        )
    }

    /// The JSON body of the error.
    pub fn body(&self) -> String {
        serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let (status, code) = match &e {
            DecodeError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            DecodeError::UnsupportedEncoding(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding")
            }
            DecodeError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            DecodeError::InflatesTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            DecodeError::TooManyEvents { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events"),
            DecodeError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_envelope"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    /// 401 `unauthorized` with `WWW-Authenticate: Bearer` (plus `error="invalid_token"` when a
    /// token was presented and refused), or 403 `forbidden` for a valid token whose grants do
    /// not cover the request (RFC 6750's `insufficient_scope`).
    fn from(e: AuthError) -> Self {
        let (status, code, challenge) = if e.is_forbidden() {
            (
                StatusCode::FORBIDDEN,
                "forbidden",
                r#"Bearer realm="tidewire", error="insufficient_scope""#,
            )
        } else if e.is_invalid_token() {
            (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                r#"Bearer realm="tidewire", error="invalid_token""#,
            )
        } else {
            (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                r#"Bearer realm="tidewire""#,
            )
        };
        ApiError {
            header: Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            )),
            ..Self::new(status, code, e.to_string())
        }
    }
}

impl From<crate::limits::LimitError> for ApiError {
    fn from(e: crate::limits::LimitError) -> Self {
        use crate::limits::LimitError as L;
        match e {
            L::HeadersTooLarge(max) => Self::headers_too_large(max),
            L::ServerAtCapacity(max) => Self::server_at_capacity(max),
            L::TooManyConnections(max) => Self::too_many_connections(max),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Closed => Self::not_ready(),
            LogError::Storage(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!("the event was not stored: {m}"),
            ),
            LogError::Full(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_full",
                format!("the event was not stored: {m}"),
            ),
            LogError::Corrupt(m) | LogError::Open(m) | LogError::Config(m) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
            LogError::Unavailable(m) => ApiError {
                header: Some((header::RETRY_AFTER, HeaderValue::from(1u64))),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "log_unavailable",
                    format!("nothing was acknowledged: {m}; retry (with the same msg_id)"),
                )
            },
            LogError::TooManyEvents(m) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_many_events", m)
            }
            LogError::PayloadTooLarge(m) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
            }
            LogError::Unsupported(m) => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", m)
            }
        }
    }
}

impl From<crate::webhook::WebhookError> for ApiError {
    fn from(e: crate::webhook::WebhookError) -> Self {
        use crate::webhook::WebhookError as W;
        match e {
            W::Invalid(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_webhook", m),
            W::NotAllowed(m) => Self::new(StatusCode::FORBIDDEN, "destination_not_allowed", m),
            W::NotFound(name) => Self::new(
                StatusCode::NOT_FOUND,
                "webhook_not_found",
                format!("no webhook named {name:?}"),
            ),
            W::Store(e) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!("nothing was changed: {e}"),
            ),
            W::Log(e) => e.into(),
        }
    }
}

impl From<crate::subscription::SubscriptionError> for ApiError {
    fn from(e: crate::subscription::SubscriptionError) -> Self {
        match e {
            crate::subscription::SubscriptionError::Log(e) => e.into(),
            crate::subscription::SubscriptionError::Closed => Self::not_ready(),
        }
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
fn retry_seconds(d: std::time::Duration) -> u64 {
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    whole.max(1)
}
