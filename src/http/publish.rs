//! `POST /v1/topics/{topic}/events` and `POST /v1/events`: read the body within its limits
//! (a gzip'd one inflated as it arrives), decode it as a whole, hand it to the publish path,
//! answer `201` once durable.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::{json_response, query_pairs, ApiError, AppState, Body};
use crate::auth::Access;
use crate::codec::{self, BareDefaults, BodyFormat, Limits, Target};
use crate::inflate;
use crate::topic::Topic;

/// Publishes the request's body to `topic` (or, when `None`, to the topics its envelopes name).
/// Every topic must be covered by `access`'s publish grants, else 403 and nothing is stored.
pub async fn publish<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    topic: Option<&str>,
    access: &Access,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let cfg = &state.config;
    let Plan {
        target,
        format,
        gzip,
        bare,
    } = match before_the_body(state, &req, topic, access) {
        Ok(plan) => plan,
        Err(e) => {
            drain_small_h2_body(req).await;
            return Err(e);
        }
    };
    // A slow POST holds a connection and a buffer: the whole body gets a bounded time.
    let read = read_body(
        req.into_body(),
        cfg.max_body_bytes,
        gzip,
        cfg.max_decompressed_bytes,
    );
    let body = if cfg.body_read_timeout_secs == 0 {
        read.await
    } else {
        let limit = std::time::Duration::from_secs(cfg.body_read_timeout_secs);
        match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => {
                state.metrics.limits().body_timeouts.inc();
                return Err(ApiError::request_timeout(cfg.body_read_timeout_secs));
            }
        }
    }?;
    let limits = Limits {
        max_decompressed: cfg.max_decompressed_bytes,
        max_events: cfg.max_batch_events,
        max_topic_len: cfg.max_topic_len,
    };
    // Already inflated (as it arrived, by `read_body`).
    let events = codec::decode_publish(&target, format, false, &body, &limits, &bare)?;
    // A batch is all or nothing: one topic outside the grants refuses the whole request.
    for e in &events {
        access.check_publish(&e.topic)?;
    }
    let receipt = state.publisher().await?.publish(events).await?;
    let json = serde_json::to_vec(&receipt)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(json_response(StatusCode::CREATED, json))
}

/// Reads the body, at most `max_body` bytes of it as sent. A gzip'd body is inflated as its
/// frames arrive, at most `max_inflated` bytes of it: a bomb is refused as soon as it passes
/// the cap, before the rest of it is read.
pub(super) async fn read_body<B>(
    body: B,
    max_body: usize,
    gzip: bool,
    max_inflated: usize,
) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    // The declared length, when there is one: a gzip'd body of that size is given room for
    // four times as much inflated, as the whole-buffer inflate always did.
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    let body = Limited::new(body, max_body);
    let refused = |e: Box<dyn std::error::Error + Send + Sync>| {
        if e.is::<http_body_util::LengthLimitError>() {
            payload_too_large(max_body)
        } else {
            ApiError::bad_request(format!("could not read the body: {e}"))
        }
    };
    if !gzip {
        return Ok(body.collect().await.map_err(refused)?.to_bytes());
    }
    let expected = declared.saturating_mul(4);
    match inflate::gunzip_stream(body.into_data_stream(), max_inflated, expected).await {
        Ok(inflated) => Ok(Bytes::from(inflated)),
        Err(inflate::InflateError::Read(e)) => Err(refused(e)),
        Err(inflate::InflateError::Decode(e)) => Err(e.into()),
    }
}

/// 413 `payload_too_large` for a body over `max` bytes.
fn payload_too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body exceeds the {max}-byte limit"),
    )
}

/// What a publish will do with its body, decided from the request head alone.
struct Plan {
    target: Target,
    format: BodyFormat,
    gzip: bool,
    bare: BareDefaults,
}

/// Everything a publish can refuse before reading its body: origin, grant (of a one-topic
/// publish), rate, content type and encoding, declared length.
fn before_the_body<B>(
    state: &Arc<AppState>,
    req: &Request<B>,
    topic: Option<&str>,
    access: &Access,
) -> Result<Plan, ApiError> {
    let cfg = &state.config;
    // A browser on another origin publishes only when `allowed_origins` names it.
    super::origin::check_publish(cfg, req)?;
    let target = match topic {
        Some(name) => Target::Topic(
            Topic::parse_with_limit(name, cfg.max_topic_len)
                .map_err(|e| ApiError::invalid_topic(name, e))?,
        ),
        None => Target::PerEnvelope,
    };
    // Refused before the body is read: a device without the grant does not upload for nothing.
    if let Target::Topic(t) = &target {
        access.check_publish(t)?;
    }
    // One request, one cell, taken before the body is read: a limited publisher uploads
    // nothing and stores nothing.
    let client = req
        .extensions()
        .get::<crate::limits::ClientAddr>()
        .map(|c| c.0);
    if let Err(wait) = state
        .limits
        .rate
        .check(&crate::limits::RateKey::of(access, client))
    {
        state
            .metrics
            .limits()
            .publish_rate_limited
            .get_or_create(&crate::metrics::ReasonLabel { reason: "http" })
            .inc();
        return Err(ApiError::rate_limited(wait));
    }
    let headers = req.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a Content-Type is required",
            )
        })?;
    let format = BodyFormat::from_content_type(content_type)?;
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("identity") | Some("") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => return Err(codec::DecodeError::UnsupportedEncoding(other.into()).into()),
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > cfg.max_body_bytes as u64 {
            return Err(payload_too_large(cfg.max_body_bytes));
        }
    }
    let mut bare = BareDefaults::default();
    for (k, v) in query_pairs(req.uri().query()) {
        match &*k {
            "type" => bare.event_type = Some(v.into_owned()),
            "msg_id" => bare.msg_id = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(Plan {
        target,
        format,
        gzip,
        bare,
    })
}

/// Most body bytes read and dropped so an early refusal over HTTP/2 ends its stream cleanly.
const DRAIN_MAX: usize = 64 << 10;
/// Longest an early refusal waits for the body it drains.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops the body of a request refused before its body was read, when it came over
/// HTTP/2 and is small. Otherwise the answer goes out while the client still sends, and the
/// stream ends with RST_STREAM, which some clients (curl 7.88) report as a failed transfer
/// (error 92) instead of the status. A larger or slower body is left unread.
async fn drain_small_h2_body<B>(req: Request<B>)
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if req.version() != http::Version::HTTP_2 {
        return;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_MAX as u64) {
        return;
    }
    let read = Limited::new(req.into_body(), DRAIN_MAX).collect();
    let _ = tokio::time::timeout(DRAIN_WAIT, read).await;
}
