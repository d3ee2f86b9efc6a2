//! What a webhook is: its validated definition, read from a `PUT /v1/webhooks/{name}` body
//! or a `[[webhooks]]` table. Pure functions, free of I/O; everything is checked here, once,
//! and trusted afterwards (apart from the destination's allow-list, which needs a name
//! resolution: see [`super::allow`]).

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use super::allow::Destination;
use super::sign::Secret;
use crate::topic::{Pattern, PatternSet};

/// Longest webhook name.
pub const MAX_NAME_LEN: usize = 64;
/// Default and bounds of `batch_max_events`.
pub const BATCH_MAX_EVENTS: (usize, usize, usize) = (100, 1, 10_000);
/// Default and bounds of `batch_max_bytes`.
pub const BATCH_MAX_BYTES: (usize, usize, usize) = (1 << 20, 1024, 16 << 20);
/// Default and bounds of `timeout_ms`.
pub const TIMEOUT_MS: (u64, u64, u64) = (10_000, 100, 300_000);
/// Most topic patterns one webhook may name.
pub const MAX_TOPICS: usize = 64;
/// Most static headers one webhook may add.
pub const MAX_HEADERS: usize = 32;

/// Longest static header name.
const MAX_HEADER_NAME: usize = 64;
/// Longest static header value.
const MAX_HEADER_VALUE: usize = 4096;

/// A byte of an HTTP token (a header name).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b)
}

/// Headers tidewire sets itself on every call; a webhook cannot replace them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// A webhook's name: 1 to 64 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Validates a name.
    pub fn parse(s: &str) -> Result<Name, String> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(format!(
                "a webhook name is 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9_.-], not {s:?}"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The body of `PUT /v1/webhooks/{name}`, and a `[[webhooks]]` table (which adds `name`).
/// Omitted fields keep their value on an update, or take their default on a create.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The webhook's name (config tables only; the path names it in the API).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// `http://` or `https://` destination.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub url: Option<String>,
    /// Topic patterns whose events are delivered.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub topics: Option<Vec<String>>,
    /// Signing secret, `whsec_<base64>`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret: Option<String>,
    /// Start after this cursor (0: the oldest retained event). Omitted: from now on a create,
    /// unchanged on an update.
    #[serde(
        default,
        deserialize_with = "whole",
        skip_serializing_if = "Option::is_none"
    )]
    pub since: Option<u64>,
    /// Most events per call.
    #[serde(
        default,
        deserialize_with = "whole",
        skip_serializing_if = "Option::is_none"
    )]
    pub batch_max_events: Option<usize>,
    /// Most body bytes per call (a single larger event goes alone).
    #[serde(
        default,
        deserialize_with = "whole",
        skip_serializing_if = "Option::is_none"
    )]
    pub batch_max_bytes: Option<usize>,
    /// Time allowed for one call: connecting, sending and the receiver's answer.
    #[serde(
        default,
        deserialize_with = "whole",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
    /// Static headers added to every call (a function's own auth header).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub headers: Option<BTreeMap<String, String>>,
    /// `false` pauses delivery; `true` (or omitted on a PUT) resumes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub enabled: Option<bool>,
}

/// A field that is given must hold a value: `null` is refused like any other wrong type
/// (leave the field out to keep, or default, its value).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A whole number that is given: `7` or `7.0` (JSON Schema's integers include the latter),
/// never a fraction, a negative number or `null`.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Float(f64),
    }
    let n = match Number::deserialize(d)? {
        Number::Int(n) => n,
        Number::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => f as u64,
        Number::Float(f) => {
            return Err(serde::de::Error::custom(format!(
                "{f} is not a whole number of at least 0"
            )))
        }
    };
    T::try_from(n)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{n} is too large")))
}

/// Where calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The url as given.
    pub text: String,
    /// `https`.
    pub tls: bool,
    /// Host and port.
    pub dest: Destination,
    /// Path and query sent in the request line.
    pub path_and_query: String,
    /// The `Host` header.
    pub authority: String,
}

impl Target {
    /// Reads an `http://` or `https://` url without user information or fragment.
    pub fn parse(text: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("url {text:?}: {why}");
        let uri: Uri = text.parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not allowed (use headers)"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if port == 0 {
            return Err(bad("port 0"));
        }
        let path_and_query = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        Ok(Target {
            text: text.to_owned(),
            tls,
            dest: Destination { host, port },
            path_and_query: if path_and_query.is_empty() {
                "/".into()
            } else {
                path_and_query
            },
            authority: authority.as_str().to_owned(),
        })
    }
}

/// A webhook's validated definition.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its name.
    pub name: Name,
    /// Where calls go.
    pub target: Target,
    /// Topic patterns whose events are delivered.
    pub topics: PatternSet,
    /// Signing secret.
    pub secret: Secret,
    /// Most events per call.
    pub batch_max_events: usize,
    /// Most body bytes per call.
    pub batch_max_bytes: usize,
    /// Time allowed for one call.
    pub timeout_ms: u64,
    /// Static headers added to every call.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether the operator wants it delivering.
    pub enabled: bool,
}

impl Spec {
    /// The definition `req` asks for: applied over `current` on an update, or from the
    /// defaults on a create (where `url`, `topics` and `secret` are required).
    pub fn apply(name: Name, req: &Request, current: Option<&Spec>) -> Result<Spec, String> {
        let required = |what: &str| format!("{what} is required when creating a webhook");
        let target = match (&req.url, current) {
            (Some(u), _) => Target::parse(u)?,
            (None, Some(c)) => c.target.clone(),
            (None, None) => return Err(required("url")),
        };
        let topics = match (&req.topics, current) {
            (Some(list), _) => parse_topics(list)?,
            (None, Some(c)) => c.topics.clone(),
            (None, None) => return Err(required("topics")),
        };
        let secret = match (&req.secret, current) {
            (Some(s), _) => Secret::parse(s)?,
            (None, Some(c)) => c.secret.clone(),
            (None, None) => return Err(required("secret")),
        };
        let pick = |v: Option<usize>,
                    cur: Option<usize>,
                    (default, lo, hi): (usize, usize, usize),
                    what: &str| {
            let v = v.or(cur).unwrap_or(default);
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(format!("{what} must be between {lo} and {hi}, not {v}"))
            }
        };
        let batch_max_events = pick(
            req.batch_max_events,
            current.map(|c| c.batch_max_events),
            BATCH_MAX_EVENTS,
            "batch_max_events",
        )?;
        let batch_max_bytes = pick(
            req.batch_max_bytes,
            current.map(|c| c.batch_max_bytes),
            BATCH_MAX_BYTES,
            "batch_max_bytes",
        )?;
        let timeout_ms = req
            .timeout_ms
            .or(current.map(|c| c.timeout_ms))
            .unwrap_or(TIMEOUT_MS.0);
        if !(TIMEOUT_MS.1..=TIMEOUT_MS.2).contains(&timeout_ms) {
            return Err(format!(
                "timeout_ms must be between {} and {}, not {timeout_ms}",
                TIMEOUT_MS.1, TIMEOUT_MS.2
            ));
        }
        let headers = match (&req.headers, current) {
            (Some(h), _) => parse_headers(h)?,
            (None, Some(c)) => c.headers.clone(),
            (None, None) => Vec::new(),
        };
        Ok(Spec {
            name,
            target,
            topics,
            secret,
            batch_max_events,
            batch_max_bytes,
            timeout_ms,
            headers,
            // A PUT re-enables unless it says otherwise.
            enabled: req.enabled.unwrap_or(true),
        })
    }

    /// The definition as a [`Request`] (with its secret and header values: for storage, never
    /// for display).
    pub fn to_request(&self) -> Request {
        Request {
            name: Some(self.name.as_str().to_owned()),
            url: Some(self.target.text.clone()),
            topics: Some(
                self.topics
                    .patterns()
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect(),
            ),
            secret: Some(self.secret.expose().to_owned()),
            since: None,
            batch_max_events: Some(self.batch_max_events),
            batch_max_bytes: Some(self.batch_max_bytes),
            timeout_ms: Some(self.timeout_ms),
            headers: Some(
                self.headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
            ),
            enabled: Some(self.enabled),
        }
    }

    /// Whether calls would go elsewhere or carry other events than under `other` (a change
    /// that starts a new batch rather than re-sending the one in flight).
    pub fn delivers_differently(&self, other: &Spec) -> bool {
        self.target != other.target
            || self.topics.patterns() != other.topics.patterns()
            || self.batch_max_events != other.batch_max_events
            || self.batch_max_bytes != other.batch_max_bytes
    }
}

fn parse_topics(list: &[String]) -> Result<PatternSet, String> {
    if list.len() > MAX_TOPICS {
        return Err(format!("at most {MAX_TOPICS} topic patterns per webhook"));
    }
    let patterns = list
        .iter()
        .map(|p| Pattern::parse(p).map_err(|e| format!("topic pattern {p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    PatternSet::new(patterns).ok_or_else(|| "topics must name at least one pattern".to_owned())
}

fn parse_headers(map: &BTreeMap<String, String>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    if map.len() > MAX_HEADERS {
        return Err(format!("at most {MAX_HEADERS} headers per webhook"));
    }
    map.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.len() > MAX_HEADER_NAME || !k.bytes().all(is_token_byte) {
                return Err(format!("header name {k:?} is not valid"));
            }
            if v.len() > MAX_HEADER_VALUE
                || !v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return Err(format!(
                    "the value of header {k:?} is not valid (visible ASCII, spaces and tabs, at \
                     most {MAX_HEADER_VALUE} bytes)"
                ));
            }
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("header name {k:?} is not valid"))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(format!("header {k:?} is set by tidewire itself"));
            }
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("the value of header {k:?} is not valid"))?;
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn create(json: serde_json::Value) -> Result<Spec, String> {
        let req: Request = serde_json::from_value(json).map_err(|e| e.to_string())?;
        Spec::apply(Name::parse("w").unwrap(), &req, None)
    }

    #[test]
    fn a_create_needs_url_topics_and_secret_and_takes_defaults_for_the_rest() {
        let s = create(serde_json::json!({
            "url": "http://127.0.0.1:9000/hook?x=1", "topics": ["a/**"], "secret": SECRET
        }))
        .unwrap();
        assert_eq!(s.target.dest.host, "127.0.0.1");
        assert_eq!(s.target.dest.port, 9000);
        assert_eq!(s.target.path_and_query, "/hook?x=1");
        assert_eq!(s.batch_max_events, 100);
        assert_eq!(s.timeout_ms, 10_000);
        let req: Request =
            serde_json::from_value(serde_json::json!({"since": 7.0, "timeout_ms": 500})).unwrap();
        assert_eq!((req.since, req.timeout_ms), (Some(7), Some(500)));
        assert!(s.enabled);
        for missing in ["url", "topics", "secret"] {
            let mut j = serde_json::json!({
                "url": "http://127.0.0.1:9000/", "topics": ["a"], "secret": SECRET
            });
            j.as_object_mut().unwrap().remove(missing);
            assert!(create(j).unwrap_err().contains(missing));
        }
    }

    #[test]
    fn an_update_keeps_what_it_does_not_name() {
        let s = create(serde_json::json!({
            "url": "https://[::1]/h", "topics": ["a"], "secret": SECRET,
            "batch_max_events": 5, "headers": {"authorization": "Bearer x"}
        }))
        .unwrap();
        assert!(s.target.tls);
        assert_eq!(s.target.dest.host, "::1");
        assert_eq!(s.target.dest.port, 443);
        let req = Request {
            topics: Some(vec!["b/*".into()]),
            ..Request::default()
        };
        let u = Spec::apply(s.name.clone(), &req, Some(&s)).unwrap();
        assert_eq!(u.batch_max_events, 5);
        assert_eq!(u.headers.len(), 1);
        assert_eq!(u.topics.patterns()[0].as_str(), "b/*");
        assert!(u.delivers_differently(&s));
        assert!(!s.delivers_differently(&s.clone()));
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let cases = [
            (
                serde_json::json!({"url": "ftp://h/", "topics": ["a"], "secret": SECRET}),
                "scheme",
            ),
            (
                serde_json::json!({"url": "http://u:p@h/", "topics": ["a"], "secret": SECRET}),
                "user",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a//b"], "secret": SECRET}),
                "pattern",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": [], "secret": SECRET}),
                "at least one",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": "x"}),
                "whsec_",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": SECRET, "batch_max_events": 0}),
                "batch_max_events",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": SECRET, "timeout_ms": 1}),
                "timeout_ms",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": SECRET, "headers": {"webhook-id": "x"}}),
                "set by tidewire",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": SECRET, "headers": {"x": "a\nb"}}),
                "not valid",
            ),
            (
                serde_json::json!({"url": "http://h/", "topics": ["a"], "secret": SECRET, "color": 1}),
                "unknown field",
            ),
        ];
        for (json, why) in cases {
            let err = create(json.clone()).unwrap_err();
            assert!(err.contains(why), "{json}: {err}");
        }
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(Name::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Name::parse("orders-fn_v1.2").is_ok());
    }
}
