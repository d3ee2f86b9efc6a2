//! One webhook call: connect to the address the allow-list approved (never resolving the
//! name again), send the signed batch, and classify the answer into "delivered" or a failure
//! with its retry rule (see [`super::backoff`]). Redirects are never followed. A connection
//! is kept alive between calls of the same webhook to the same address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::backoff::retry_after;
use super::spec::Spec;

/// Most response body bytes read (and thrown away) so the connection can be reused.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the batch is delivered.
    Delivered,
    /// `410 Gone`: the receiver asks never to be called again.
    Gone,
    /// Anything else: try again (see [`Retry`]).
    Failed {
        /// The `reason` label of the failure metric.
        reason: &'static str,
        /// When to try again.
        retry: Retry,
        /// For a person (`last_error`).
        message: String,
    },
}

/// When a failed call is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Exponential backoff with jitter.
    Backoff,
    /// After exactly this long (`Retry-After`).
    After(Duration),
    /// After the longest backoff delay (a 4xx: the receiver refuses this batch).
    Slowly,
}

/// Opens connections for calls, over TLS for `https` urls.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<std::sync::OnceLock<Result<tokio_rustls::TlsConnector, String>>>,
}

impl Default for Connector {
    fn default() -> Self {
        Self::new()
    }
}

impl Connector {
    /// A connector; TLS trust (the system's root certificates) is loaded on the first
    /// `https` call.
    pub fn new() -> Connector {
        Connector {
            tls: Arc::new(std::sync::OnceLock::new()),
        }
    }

    fn tls(&self) -> Result<tokio_rustls::TlsConnector, String> {
        self.tls
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err("no trusted root certificates found on this system".into());
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
            })
            .clone()
    }
}

/// A kept-alive connection to one address.
pub struct Connection {
    addr: SocketAddr,
    send: SendRequest<Full<Bytes>>,
}

/// Sends `body` to `spec`'s url at `addr`, signed with `webhook_id` and the current time,
/// within `spec.timeout_ms` (connecting included). `conn` is the kept-alive connection, reused
/// when it goes to `addr` and still open, replaced otherwise, dropped after a failure.
pub async fn send(
    connector: &Connector,
    conn: &mut Option<Connection>,
    addr: SocketAddr,
    spec: &Spec,
    webhook_id: &str,
    body: Bytes,
) -> Outcome {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let attempt = async {
        let reuse = conn
            .as_ref()
            .is_some_and(|c| c.addr == addr && !c.send.is_closed());
        if !reuse {
            *conn = None;
            *conn = Some(connect(connector, addr, spec).await?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(failure("connect", "no connection".into()));
        };
        c.send
            .ready()
            .await
            .map_err(|e| failure("connect", format!("connection: {e}")))?;
        let request = build(spec, webhook_id, body)?;
        let response = c
            .send
            .send_request(request)
            .await
            .map_err(|e| failure("connect", format!("request: {e}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, SystemTime::now()));
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Read what the receiver said (a little of it) so the connection can carry the next
        // call; a receiver that says more loses the connection instead.
        let mut body = response.into_body();
        let mut read = 0usize;
        let mut keep = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    read += f.data_ref().map_or(0, |d| d.len());
                    if read > MAX_RESPONSE_BODY {
                        keep = false;
                        break;
                    }
                }
                Err(_) => {
                    keep = false;
                    break;
                }
            }
        }
        Ok((status, retry_after, location, keep))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => {
            *conn = None;
            failure(
                "timeout",
                format!("no answer within timeout_ms = {}", spec.timeout_ms),
            )
        }
        Ok(Err(outcome)) => {
            *conn = None;
            outcome
        }
        Ok(Ok((status, retry_after, location, keep))) => {
            if !keep {
                *conn = None;
            }
            let outcome = classify(status, retry_after, location.as_deref());
            if outcome != Outcome::Delivered {
                // A receiver in trouble may keep a broken connection open: start afresh.
                *conn = None;
            }
            outcome
        }
    }
}

/// The outcome of a call answered with `status` (pure).
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    location: Option<&str>,
) -> Outcome {
    let code = status.as_u16();
    let failed = |reason: &'static str, retry: Retry, message: String| Outcome::Failed {
        reason,
        retry,
        message,
    };
    match code {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Gone,
        429 => failed(
            "status_429",
            retry_after.map_or(Retry::Backoff, Retry::After),
            format!("{status}"),
        ),
        503 => failed(
            "status_5xx",
            retry_after.map_or(Retry::Backoff, Retry::After),
            format!("{status}"),
        ),
        300..=399 => failed(
            "status_3xx",
            Retry::Backoff,
            format!(
                "{status} (redirects are not followed{})",
                location.map_or(String::new(), |l| format!("; Location: {l}"))
            ),
        ),
        // A receiver that timed out reading the request is a transient failure.
        408 => failed("status_4xx", Retry::Backoff, format!("{status}")),
        400..=499 => failed("status_4xx", Retry::Slowly, format!("{status}")),
        _ => failed("status_5xx", Retry::Backoff, format!("{status}")),
    }
}

fn failure(reason: &'static str, message: String) -> Outcome {
    Outcome::Failed {
        reason,
        retry: Retry::Backoff,
        message,
    }
}

async fn connect(
    connector: &Connector,
    addr: SocketAddr,
    spec: &Spec,
) -> Result<Connection, Outcome> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| failure("connect", format!("connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let send = if spec.target.tls {
        let tls = connector
            .tls()
            .map_err(|e| failure("connect", format!("TLS: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(spec.target.dest.host.clone())
            .map_err(|e| failure("connect", format!("TLS server name: {e}")))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| failure("connect", format!("TLS handshake with {addr}: {e}")))?;
        handshake(TokioIo::new(stream)).await?
    } else {
        handshake(TokioIo::new(tcp)).await?
    };
    Ok(Connection { addr, send })
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, Outcome>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| failure("connect", format!("HTTP handshake: {e}")))?;
    // The connection task ends when the `SendRequest` is dropped or the peer closes.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

fn build(spec: &Spec, webhook_id: &str, body: Bytes) -> Result<Request<Full<Bytes>>, Outcome> {
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signature = spec.secret.sign(webhook_id, timestamp, &body);
    let mut req = Request::post(spec.target.path_and_query.as_str())
        .header(header::HOST, spec.target.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tidewire/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(body))
        .map_err(|e| failure("connect", format!("request: {e}")))?;
    for (name, value) in &spec.headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    req.headers_mut()
        .entry(header::ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_the_delivery_rules() {
        let s = |c: u16| StatusCode::from_u16(c).unwrap();
        assert_eq!(classify(s(200), None, None), Outcome::Delivered);
        assert_eq!(classify(s(204), None, None), Outcome::Delivered);
        assert_eq!(classify(s(410), None, None), Outcome::Gone);
        let retry = |o: Outcome| match o {
            Outcome::Failed { retry, reason, .. } => (reason, retry),
            other => panic!("{other:?}"),
        };
        let after = Some(Duration::from_secs(3));
        assert_eq!(
            retry(classify(s(429), after, None)),
            ("status_429", Retry::After(Duration::from_secs(3)))
        );
        assert_eq!(
            retry(classify(s(429), None, None)),
            ("status_429", Retry::Backoff)
        );
        assert_eq!(
            retry(classify(s(503), after, None)),
            ("status_5xx", Retry::After(Duration::from_secs(3)))
        );
        assert_eq!(
            retry(classify(s(500), after, None)),
            ("status_5xx", Retry::Backoff)
        );
        assert_eq!(
            retry(classify(s(302), None, Some("/x"))),
            ("status_3xx", Retry::Backoff)
        );
        assert_eq!(
            retry(classify(s(400), None, None)),
            ("status_4xx", Retry::Slowly)
        );
        assert_eq!(
            retry(classify(s(404), None, None)),
            ("status_4xx", Retry::Slowly)
        );
        assert_eq!(
            retry(classify(s(408), None, None)),
            ("status_4xx", Retry::Backoff)
        );
    }
}
