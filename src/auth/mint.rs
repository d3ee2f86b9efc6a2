//! Minting tokens for operators and tests (`tidewire token`): HS256/384/512 with the same
//! secret the server is configured with. Signing with a private key (RS256/ES256) is left to
//! the identity provider that owns it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::KeyError;
use crate::topic::Pattern;

/// What a minted token says.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Patterns the token may publish to.
    pub publish: Vec<String>,
    /// Patterns the token may subscribe to.
    pub subscribe: Vec<String>,
    /// Lifetime from now (`exp` = now + ttl).
    pub ttl: Duration,
    /// `sub` claim.
    pub sub: Option<String>,
    /// `aud` claim.
    pub aud: Option<String>,
    /// `iss` claim.
    pub iss: Option<String>,
    /// HS256, HS384 or HS512.
    pub alg: Algorithm,
    /// Operator rights (the `admin` claim: managing webhooks).
    pub admin: bool,
}

#[derive(Serialize)]
struct Grants<'a> {
    publish: &'a [String],
    subscribe: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    admin: bool,
}

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    iat: u64,
    exp: u64,
    tidewire: Grants<'a>,
}

/// Signs a token for `spec` with `secret`.
///
/// Guarantees: every grant is a valid pattern (else an error naming it, nothing signed); the
/// token carries `iat` = now and `exp` = now + ttl, and verifies against a server configured
/// with the same secret (and `aud`/`iss`, when it checks them).
pub fn mint(secret: &[u8], spec: &TokenSpec) -> Result<String, KeyError> {
    if !matches!(
        spec.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(KeyError::Mint(format!(
            "{:?} needs a private key; tidewire token signs HS256, HS384 or HS512",
            spec.alg
        )));
    }
    for p in spec.publish.iter().chain(&spec.subscribe) {
        Pattern::parse(p).map_err(|e| KeyError::Mint(format!("pattern {p:?} {e}")))?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| KeyError::Mint(format!("the clock is before 1970: {e}")))?
        .as_secs();
    let claims = Claims {
        sub: spec.sub.as_deref(),
        aud: spec.aud.as_deref(),
        iss: spec.iss.as_deref(),
        iat: now,
        exp: now.saturating_add(spec.ttl.as_secs()),
        tidewire: Grants {
            publish: &spec.publish,
            subscribe: &spec.subscribe,
            admin: spec.admin,
        },
    };
    encode(
        &Header::new(spec.alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| KeyError::Mint(e.to_string()))
}

/// Parses a lifetime: a number with a unit `s`, `m`, `h` or `d` (`30s`, `15m`, `1h`, `7d`),
/// or a bare number of seconds. Zero is refused: such a token is dead on arrival.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("ttl {s:?}: expected a number with s, m, h or d (e.g. 1h)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "ttl {s:?}: unknown unit {other:?}; use s, m, h or d"
            ))
        }
    };
    let secs = n
        .checked_mul(scale)
        .ok_or_else(|| format!("ttl {s:?} is too long"))?;
    if secs == 0 {
        return Err("ttl must be more than zero".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Parses `HS256`, `HS384` or `HS512` (case-insensitive).
pub fn parse_hs_alg(s: &str) -> Result<Algorithm, String> {
    match s.to_ascii_uppercase().as_str() {
        "HS256" => Ok(Algorithm::HS256),
        "HS384" => Ok(Algorithm::HS384),
        "HS512" => Ok(Algorithm::HS512),
        _ => Err(format!(
            "algorithm {s:?}: tidewire token signs HS256, HS384 or HS512"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;
    use crate::config::{Config, Secret};
    use crate::topic::Topic;

    #[test]
    fn ttls_take_the_usual_units() {
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let secret = "a-secret-of-at-least-thirty-two-bytes!";
        let spec = TokenSpec {
            admin: false,
            publish: vec!["sensors/**".into()],
            subscribe: vec!["dash/**".into()],
            ttl: Duration::from_secs(60),
            sub: Some("ops".into()),
            aud: None,
            iss: None,
            alg: parse_hs_alg("hs384").expect("alg"),
        };
        let token = mint(secret.as_bytes(), &spec).expect("mint");
        let c = Config {
            jwt_secret: Some(Secret::new(secret)),
            ..Config::default()
        };
        let a = Authenticator::from_config(&c)
            .expect("loads")
            .expect("configured");
        let g = a.verify(&token).expect("verifies");
        assert!(g.may_publish(&Topic::parse("sensors/x/t").expect("topic")));
        assert!(!g.may_publish(&Topic::parse("dash/x").expect("topic")));
        assert_eq!(g.subject(), Some("ops"));
    }

    #[test]
    fn bad_grants_and_algorithms_are_refused() {
        let spec = TokenSpec {
            admin: false,
            publish: vec!["a/**/b".into()],
            subscribe: vec![],
            ttl: Duration::from_secs(60),
            sub: None,
            aud: None,
            iss: None,
            alg: Algorithm::HS256,
        };
        assert!(mint(b"k", &spec).is_err());
        assert!(parse_hs_alg("RS256").is_err());
    }
}
