//! Helpers the auth tests share (tests/auth.rs, tests/auth_interop.rs, tests/auth_grants.rs).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::PATIENCE;

/// A response's status, `WWW-Authenticate` header and JSON body.
pub async fn answer(r: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, challenge, body)
}

/// An HTTP client that gives up after the tests' patience.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// A file of tests/fixtures/auth/ (test-only key pairs).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

/// Now, in Unix seconds (for `exp`, `nbf`, `iat`).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub fn says_invalid_token(c: &Option<String>) -> bool {
    c.as_deref()
        .is_some_and(|c| c.starts_with("Bearer") && c.contains(r#"error="invalid_token""#))
}
