//! `auth::jwt::Authenticator::verify` with an HS256/384/512 secret configured (built through
//! `Authenticator::from_config`, as the server builds it), on:
//!
//! - mode 0: the input as a token string (garbage, and mutations of the signed seeds);
//! - mode 1: `header \0 claims` as raw bytes, base64url-encoded and signed with the right
//!   secret (`jsonwebtoken::crypto::sign`), so claims that are not even JSON get past the
//!   signature;
//! - mode 2: the input as a JSON claims value, signed with `jsonwebtoken::encode`;
//! - mode 3: claims assembled from the input: `exp`/`nbf` drawn from edge values (huge,
//!   fractional, negative, out of every range), `aud`/`iss`, `sub`, and grant lists of
//!   fuzzer-chosen strings, signed with `jsonwebtoken::encode`.
//!
//! Each input is verified by four authenticators (leeway 0 or 30 s, `exp` required or not,
//! with or without an audience and issuer).
//!
//! Properties: `verify` never panics; an accepted token is signed by the secret with the
//! HS algorithm its header names; its grants are valid patterns, exactly the strings of the
//! token's `tidewire.publish`/`tidewire.subscribe` in order; it has an `exp` when one is
//! required, not yet passed beyond the leeway, and `Grants::expires_at` is defined for it.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tidewire::auth::{Authenticator, Grants};
use tidewire::config::{Config, Secret};
use tidewire::topic::Pattern;

use common::Input;
use common::JWT_SECRET as SECRET;
const ALGS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

struct Setup {
    config: Config,
    auth: Authenticator,
}

fn setups() -> &'static [Setup] {
    static S: OnceLock<Vec<Setup>> = OnceLock::new();
    S.get_or_init(|| {
        let base = Config {
            jwt_secret: Some(Secret::new(SECRET)),
            ..Config::default()
        };
        [
            Config {
                jwt_leeway_secs: 0,
                ..base.clone()
            },
            Config {
                jwt_require_exp: false,
                ..base.clone()
            },
            Config {
                jwt_audience: Some("tidewire".into()),
                jwt_issuer: Some("auth.example".into()),
                ..base.clone()
            },
            Config {
                jwt_require_exp: false,
                jwt_leeway_secs: u64::MAX / 4,
                ..base
            },
        ]
        .into_iter()
        .map(|config| Setup {
            auth: Authenticator::from_config(&config)
                .expect("the key loads")
                .expect("a key is configured"),
            config,
        })
        .collect()
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign_raw(header: &[u8], claims: &[u8], alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        alg,
    )
    .expect("HMAC signs anything");
    format!("{message}.{sig}")
}

fn sign(claims: &Value, alg: Algorithm) -> Option<String> {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .ok()
}

/// Reads the input as a little stream of choices.
fn time_value(input: &mut Input<'_>) -> Option<Value> {
    let now = now() as i64;
    Some(match input.byte() % 16 {
        0 => return None,
        1 => json!(now + 3600),
        2 => json!(now - 3600),
        3 => json!(now as f64 + 0.5),
        4 => json!(u64::MAX),
        5 => json!(i64::MAX),
        6 => json!(10_000_000_000_000_000_000u64),
        7 => json!(1e300),
        8 => json!(-1),
        9 => json!(-1e300),
        10 => json!(1.8446744073709552e19),
        11 => json!(9.3e18),
        12 => json!("soon"),
        13 => json!(0),
        14 => json!(now + i64::from(input.byte()) * 1_000_000_000),
        _ => json!(f64::from(input.byte()) * 1e17),
    })
}

fn built_claims(input: &mut Input<'_>) -> Value {
    let mut claims = serde_json::Map::new();
    if let Some(v) = time_value(input) {
        claims.insert("exp".into(), v);
    }
    if let Some(v) = time_value(input) {
        claims.insert("nbf".into(), v);
    }
    let flags = input.byte();
    if flags & 1 != 0 {
        claims.insert("aud".into(), json!("tidewire"));
    }
    if flags & 2 != 0 {
        claims.insert("iss".into(), json!("auth.example"));
    }
    if flags & 4 != 0 {
        claims.insert("sub".into(), json!(input.text(24)));
    }
    if flags & 8 != 0 {
        let mut grants = serde_json::Map::new();
        for key in ["publish", "subscribe"] {
            let n = input.byte() % 4;
            let list: Vec<Value> = (0..n).map(|_| json!(input.text(24))).collect();
            grants.insert(key.into(), Value::Array(list));
        }
        claims.insert("tidewire".into(), Value::Object(grants));
    }
    Value::Object(claims)
}

/// The grant lists a claims value holds, when it holds them as lists of strings.
fn claimed(claims: &Value, key: &str) -> Option<Vec<String>> {
    match claims.get("tidewire")?.get(key) {
        None => Some(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().map(str::to_string)).collect(),
        Some(_) => None,
    }
}

fn check_accepted(token: &str, grants: &Grants, setup: &Setup, claims: Option<&Value>) {
    // Signed by our secret with the HS algorithm its header names.
    let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
    assert!(ALGS.contains(&header.alg), "accepted with {:?}", header.alg);
    let (message, sig) = token.rsplit_once('.').expect("three parts");
    let valid = jsonwebtoken::crypto::verify(
        sig,
        message.as_bytes(),
        &DecodingKey::from_secret(SECRET.as_bytes()),
        header.alg,
    );
    assert!(
        matches!(valid, Ok(true)),
        "accepted a bad signature: {token}"
    );
    // Grants: valid patterns, exactly as claimed.
    for p in grants
        .publish_grants()
        .iter()
        .chain(grants.subscribe_grants())
    {
        assert!(Pattern::parse(p.as_str()).is_ok(), "grant {p:?}");
    }
    if let Some(claims) = claims {
        let texts = |ps: &[Pattern]| {
            ps.iter()
                .map(|p| p.as_str().to_string())
                .collect::<Vec<_>>()
        };
        if let Some(want) = claimed(claims, "publish") {
            assert_eq!(texts(grants.publish_grants()), want);
        }
        if let Some(want) = claimed(claims, "subscribe") {
            assert_eq!(texts(grants.subscribe_grants()), want);
        }
    }
    // Expiry.
    if setup.config.jwt_require_exp {
        assert!(grants.exp().is_some(), "accepted without the required exp");
    }
    if let Some(exp) = grants.exp() {
        let until = exp
            .saturating_add(setup.config.jwt_leeway_secs)
            .saturating_add(1);
        assert!(until > now(), "accepted an expired token (exp {exp})");
    }
    let _ = grants.expires_at();
}

fn verify_all(token: &str, claims: Option<&Value>) {
    for setup in setups() {
        if let Ok(grants) = setup.auth.verify(token) {
            check_accepted(token, &grants, setup, claims);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let alg = ALGS[usize::from(mode >> 2) % 3];
    match mode & 3 {
        0 => verify_all(&String::from_utf8_lossy(rest), None),
        1 => {
            let cut = rest.iter().position(|&b| b == 0).unwrap_or(0);
            let (header, claims) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
            let header: &[u8] = if header.is_empty() {
                br#"{"alg":"HS256","typ":"JWT"}"#
            } else {
                header
            };
            let token = sign_raw(header, claims, alg);
            let value = serde_json::from_slice::<Value>(claims).ok();
            verify_all(&token, value.as_ref());
        }
        2 => {
            if let Ok(claims) = serde_json::from_slice::<Value>(rest) {
                if let Some(token) = sign(&claims, alg) {
                    verify_all(&token, Some(&claims));
                }
            }
        }
        _ => {
            let claims = built_claims(&mut Input(rest));
            if let Some(token) = sign(&claims, alg) {
                verify_all(&token, Some(&claims));
            }
        }
    }
});
