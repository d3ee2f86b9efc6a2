//! Which browser origins may do what, from the one setting `allowed_origins` (shared with
//! CORS in `mod.rs`).
//!
//! A request's `Origin` header (browsers send it on cross-origin requests, on every
//! WebSocket handshake, and on POSTs) gives it an [`OriginTrust`]:
//! - no `Origin` (a device, a service, curl) or the server's own origin (the `Origin`'s host
//!   and port equal the `Host` header's; when `Host` carries no port, as behind a proxy that
//!   forwards `$host`, the host names alone): trusted like any non-browser client;
//! - listed in `allowed_origins` exactly (ASCII case aside): may read and write;
//! - allowed only by `*`: may **read** (CORS reads, SSE, long-poll, WebSocket subscriptions)
//!   but not write: a cross-origin publish (HTTP, or a `publish` op on its WebSocket) is
//!   refused with 403 `origin_not_allowed`, and the CORS preflight does not offer POST;
//! - anything else: CORS gives it nothing to read, its WebSocket upgrade is refused with 403
//!   `origin_not_allowed` before upgrading, and its publishes are refused the same way (a
//!   `text/plain` POST needs no preflight, so the server must refuse it itself).

use http::{header, HeaderValue, Request};

use super::ApiError;
use crate::config::Config;

/// What a request's `Origin` entitles it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginTrust {
    /// No `Origin` header: not a browser's cross-origin request.
    Absent,
    /// The `Origin` is the server's own.
    SameOrigin,
    /// The `Origin` is listed in `allowed_origins`.
    Listed,
    /// The `Origin` is allowed only by `*`: reads only.
    Wildcard,
    /// The `Origin` is not allowed.
    Refused,
}

impl OriginTrust {
    /// Whether requests with this trust may subscribe and read.
    pub fn may_read(self) -> bool {
        !matches!(self, OriginTrust::Refused)
    }

    /// Whether requests with this trust may publish.
    pub fn may_write(self) -> bool {
        matches!(
            self,
            OriginTrust::Absent | OriginTrust::SameOrigin | OriginTrust::Listed
        )
    }
}

/// The trust of `req`'s `Origin` under `config.allowed_origins`.
pub fn trust<B>(config: &Config, req: &Request<B>) -> OriginTrust {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return OriginTrust::Absent;
    };
    if is_listed(config, origin) {
        return OriginTrust::Listed;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let (Ok(origin), Some(host)) = (origin.to_str(), host) {
        if same_origin(origin, host) {
            return OriginTrust::SameOrigin;
        }
    }
    if config.allowed_origins.iter().any(|o| o == "*") {
        OriginTrust::Wildcard
    } else {
        OriginTrust::Refused
    }
}

/// Whether `origin` is listed in `allowed_origins` by name (not only by `*`).
pub fn is_listed(config: &Config, origin: &HeaderValue) -> bool {
    config
        .allowed_origins
        .iter()
        .any(|o| o != "*" && o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
}

/// `Ok` with the request's trust when it may open a WebSocket; 403 `origin_not_allowed`
/// for a browser on an origin that may not.
pub fn check_websocket<B>(config: &Config, req: &Request<B>) -> Result<OriginTrust, ApiError> {
    let t = trust(config, req);
    if t.may_read() {
        Ok(t)
    } else {
        Err(refusal(req, "open a WebSocket"))
    }
}

/// `Ok` when the request may publish; 403 `origin_not_allowed` for a browser on an origin
/// that is neither the server's own nor listed by name.
pub fn check_publish<B>(config: &Config, req: &Request<B>) -> Result<(), ApiError> {
    if trust(config, req).may_write() {
        Ok(())
    } else {
        Err(refusal(
            req,
            "publish (allowed_origins must name it; \"*\" allows reads only)",
        ))
    }
}

fn refusal<B>(req: &Request<B>, what: &str) -> ApiError {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
        .unwrap_or_default();
    ApiError::origin_not_allowed(&origin, what)
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_authority(a: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &a[..end + 2];
        match &rest[end + 1..] {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((host, port))
}

/// Whether `origin` (`scheme://host[:port]`) is the origin the client reached as `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" and the like
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => return false,
    };
    let (Some((o_host, o_port)), Some((h_host, h_port))) =
        (split_authority(authority), split_authority(host))
    else {
        return false;
    };
    if !o_host.eq_ignore_ascii_case(h_host) {
        return false;
    }
    match h_port {
        Some(p) => o_port.unwrap_or(default_port) == p,
        // A proxy forwarding `$host` drops the port: the host names decide.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(origin: Option<&str>, host: &str) -> Request<()> {
        let mut b = Request::builder().uri("/v1/ws").header(header::HOST, host);
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(()).unwrap()
    }

    fn config(origins: &[&str]) -> Config {
        Config {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        }
    }

    #[test]
    fn same_origin_compares_host_and_effective_port() {
        assert!(same_origin("http://127.0.0.1:7700", "127.0.0.1:7700"));
        assert!(same_origin("http://Example.com", "example.com:80"));
        assert!(same_origin("https://example.com", "example.com"));
        assert!(same_origin("http://[::1]:7700", "[::1]:7700"));
        assert!(!same_origin("http://127.0.0.1:7701", "127.0.0.1:7700"));
        assert!(!same_origin("https://example.com", "example.com:80"));
        assert!(!same_origin("http://evil.example", "example.com"));
        assert!(!same_origin("null", "example.com"));
        assert!(!same_origin("http://example.com.evil:80", "example.com:80"));
    }

    #[test]
    fn trust_follows_the_allow_list() {
        let none = config(&[]);
        let star = config(&["*"]);
        let listed = config(&["http://dash.example"]);
        let host = "127.0.0.1:7700";
        assert_eq!(trust(&none, &req(None, host)), OriginTrust::Absent);
        assert_eq!(
            trust(&none, &req(Some("http://127.0.0.1:7700"), host)),
            OriginTrust::SameOrigin
        );
        assert_eq!(
            trust(&none, &req(Some("http://dash.example"), host)),
            OriginTrust::Refused
        );
        assert_eq!(
            trust(&star, &req(Some("http://dash.example"), host)),
            OriginTrust::Wildcard
        );
        assert_eq!(
            trust(&listed, &req(Some("http://DASH.example"), host)),
            OriginTrust::Listed
        );
        assert_eq!(
            trust(&listed, &req(Some("http://other.example"), host)),
            OriginTrust::Refused
        );
        assert!(OriginTrust::Wildcard.may_read() && !OriginTrust::Wildcard.may_write());
        assert!(!OriginTrust::Refused.may_read());
        assert!(OriginTrust::Listed.may_write() && OriginTrust::SameOrigin.may_write());
    }
}
