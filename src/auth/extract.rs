//! Where a request's token comes from, in the contract's order: `Authorization: Bearer`, then
//! the `tidewire_token` cookie (EventSource `withCredentials`), then the `access_token` query
//! parameter (EventSource and browser WebSockets cannot set headers) when allowed.
//!
//! Pure functions over headers and the query string. [`redact_query`] is what a log line may
//! show of a query: the token replaced, everything else intact.

use std::borrow::Cow;

use http::{header, HeaderMap};

use super::AuthError;

/// The cookie that may carry the token.
pub const TOKEN_COOKIE: &str = "tidewire_token";
/// The query parameter that may carry the token.
pub const TOKEN_QUERY: &str = "access_token";
/// What a redacted query shows in place of the token.
pub const REDACTED: &str = "REDACTED";

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer …`
    Header,
    /// The `tidewire_token` cookie.
    Cookie,
    /// The `access_token` query parameter.
    Query,
}

/// The request's token and where it came from; `Ok(None)` when there is none.
///
/// Guarantees: the first source in the contract's order that holds a token wins (a header
/// beats a cookie beats the query); the query is ignored unless `allow_query`. An
/// `Authorization: Bearer` with nothing after it is [`AuthError::Malformed`], not "missing".
/// An `Authorization` header of another scheme (e.g. `Basic`) is not ours and is skipped.
pub fn find_token(
    headers: &HeaderMap,
    query: Option<&str>,
    allow_query: bool,
) -> Result<Option<(String, TokenSource)>, AuthError> {
    if let Some(token) = bearer(headers)? {
        return Ok(Some((token, TokenSource::Header)));
    }
    if let Some(token) = cookie(headers, TOKEN_COOKIE) {
        return Ok(Some((token, TokenSource::Cookie)));
    }
    if allow_query {
        let found = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == TOKEN_QUERY)
            .map(|(_, v)| v.into_owned());
        if let Some(token) = found {
            if token.is_empty() {
                return Err(AuthError::Malformed);
            }
            return Ok(Some((token, TokenSource::Query)));
        }
    }
    Ok(None)
}

/// The token of an `Authorization: Bearer` header (scheme case-insensitive), if any.
pub fn bearer(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    for value in headers.get_all(header::AUTHORIZATION) {
        let Ok(text) = value.to_str() else {
            return Err(AuthError::Malformed);
        };
        let text = text.trim();
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            continue;
        }
        let token = rest.trim();
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        return Ok(Some(token.to_string()));
    }
    Ok(None)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    // HTTP/2 may split cookies over several headers; each holds `a=b; c=d`.
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// Whether `presented` equals `expected`, in time that does not depend on where they differ
/// (only on the length), so a static token cannot be guessed byte by byte.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// `query` with the value of every `access_token` parameter replaced by `REDACTED`; the rest
/// is left byte for byte. Borrowed when there is nothing to redact.
pub fn redact_query(query: &str) -> Cow<'_, str> {
    let is_token = |pair: &str| {
        form_urlencoded::parse(pair.as_bytes())
            .next()
            .is_some_and(|(k, _)| k == TOKEN_QUERY)
    };
    if !query.split('&').any(is_token) {
        return Cow::Borrowed(query);
    }
    Cow::Owned(
        query
            .split('&')
            .map(|pair| {
                if is_token(pair) {
                    Cow::Owned(format!("{TOKEN_QUERY}={REDACTED}"))
                } else {
                    Cow::Borrowed(pair)
                }
            })
            .collect::<Vec<_>>()
            .join("&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_static(v));
        }
        h
    }

    fn found(h: &HeaderMap, q: Option<&str>, allow: bool) -> Option<(String, TokenSource)> {
        find_token(h, q, allow).expect("no error")
    }

    #[test]
    fn header_beats_cookie_beats_query() {
        let all = headers(&[
            (header::AUTHORIZATION, "Bearer h"),
            (header::COOKIE, "x=1; tidewire_token=c"),
        ]);
        let q = Some("topic=a&access_token=q");
        assert_eq!(
            found(&all, q, true),
            Some(("h".into(), TokenSource::Header))
        );
        let cookie_only = headers(&[(header::COOKIE, "x=1; tidewire_token=c")]);
        assert_eq!(
            found(&cookie_only, q, true),
            Some(("c".into(), TokenSource::Cookie))
        );
        assert_eq!(
            found(&HeaderMap::new(), q, true),
            Some(("q".into(), TokenSource::Query))
        );
        assert_eq!(found(&HeaderMap::new(), q, false), None);
        assert_eq!(found(&HeaderMap::new(), None, true), None);
    }

    #[test]
    fn scheme_is_case_insensitive_and_other_schemes_are_skipped() {
        let h = headers(&[(header::AUTHORIZATION, "bearer  t1 ")]);
        assert_eq!(
            found(&h, None, true),
            Some(("t1".into(), TokenSource::Header))
        );
        let h = headers(&[(header::AUTHORIZATION, "Basic dXNlcg==")]);
        assert_eq!(found(&h, None, true), None);
        let h = headers(&[(header::AUTHORIZATION, "Bearer ")]);
        assert_eq!(find_token(&h, None, true), Err(AuthError::Malformed));
        assert_eq!(
            find_token(&HeaderMap::new(), Some("access_token="), true),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn cookies_from_several_headers() {
        let h = headers(&[
            (header::COOKIE, "a=1"),
            (header::COOKIE, "b=2; tidewire_token=\"tok\""),
        ]);
        assert_eq!(
            found(&h, None, true),
            Some(("tok".into(), TokenSource::Cookie))
        );
    }

    #[test]
    fn redaction_hides_only_the_token() {
        assert_eq!(redact_query("topic=a%2F**&since=3"), "topic=a%2F**&since=3");
        assert_eq!(
            redact_query("topic=a&access_token=eyJ.x.y&since=1"),
            "topic=a&access_token=REDACTED&since=1"
        );
        // A percent-encoded name is still the token parameter.
        assert_eq!(
            redact_query("access%5Ftoken=s3cret"),
            "access_token=REDACTED"
        );
        assert_eq!(
            redact_query("access_token=a&access_token=b"),
            "access_token=REDACTED&access_token=REDACTED"
        );
    }

    #[test]
    fn static_tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
