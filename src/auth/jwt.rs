//! Token verification: the [`Authenticator`] holds the configured key and the rules a token
//! must pass, and turns a token into [`Grants`].
//!
//! Which algorithms are accepted follows from the key alone: a secret accepts HS256, HS384
//! and HS512; an RSA public key RS256; a P-256 EC public key ES256. Anything else (`alg:
//! none`, an HS token against a public key, the other family) is refused before the
//! signature is looked at. A key that cannot work (short secret, unreadable file, bad PEM, a
//! private key where a public one belongs) fails when the authenticator is built, that is
//! before the server listens.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::extract::find_token;
use super::{AuthError, Grants, KeyError};
use crate::config::Config;
use crate::topic::Pattern;

/// The shortest HMAC secret accepted, in bytes: 256 bits, the output size of HS256.
pub const MIN_SECRET_BYTES: usize = 32;

/// The `tidewire` claim: what the token may do.
#[derive(Debug, Default, Deserialize)]
struct TidewireClaim {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    /// Operator rights: managing webhooks.
    #[serde(default)]
    admin: bool,
}

/// The claims tidewire reads; the registered ones are checked by `jsonwebtoken` as well.
#[derive(Debug, Deserialize)]
struct Claims {
    /// A NumericDate may carry a fraction.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    tidewire: TidewireClaim,
}

/// Verifies tokens against the configured key and rules.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
    query_token: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

/// Reads the HMAC secret of the configuration: `jwt_secret` or the file `jwt_secret_file`
/// (trailing `\r`/`\n` dropped, so `echo secret > file` works). `Ok(None)` when neither is
/// set. Shared by the server and `tidewire token`, so both read a secret file alike.
pub fn load_secret(secret: Option<&str>, file: Option<&Path>) -> Result<Option<Vec<u8>>, KeyError> {
    let bytes = match (secret, file) {
        (Some(_), Some(_)) => {
            return Err(KeyError::Conflict(
                "set either jwt_secret or jwt_secret_file, not both".into(),
            ))
        }
        (Some(s), None) => s.as_bytes().to_vec(),
        (None, Some(path)) => {
            let mut b = std::fs::read(path).map_err(|source| KeyError::Unreadable {
                what: "jwt_secret_file",
                path: path.to_path_buf(),
                source,
            })?;
            while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                b.pop();
            }
            b
        }
        (None, None) => return Ok(None),
    };
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(KeyError::SecretTooShort {
            len: bytes.len(),
            min: MIN_SECRET_BYTES,
        });
    }
    Ok(Some(bytes))
}

fn load_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable {
        what: "jwt_public_key",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: &str| KeyError::BadPem {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    // `jsonwebtoken` would take a private key too and then fail on every token; refuse it
    // here, where the mistake is made.
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN PUBLIC KEY-----")
        && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
    {
        return Err(bad(
            "expected a PEM public key (-----BEGIN PUBLIC KEY-----); a private key or \
             certificate does not belong here",
        ));
    }
    let (key, alg) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (k, Algorithm::RS256)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        // ES256 is P-256 only: its uncompressed point is 65 bytes (P-384 is 97).
        if k.as_bytes().len() != 65 {
            return Err(bad("an EC key must be on P-256 (ES256)"));
        }
        (k, Algorithm::ES256)
    } else {
        return Err(bad("neither an RSA nor an EC public key in PEM"));
    };
    // Check now that the crypto backend can parse the key: with a dummy signature it answers
    // "does not verify" for a good key and an error for a broken one.
    match jsonwebtoken::crypto::verify("AAAA", b"probe", &key, alg) {
        Ok(_) => Ok((key, alg)),
        Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature | ErrorKind::Base64(_)) => {
            Ok((key, alg))
        }
        Err(e) => Err(bad(&format!("the key does not load: {e}"))),
    }
}

impl Authenticator {
    /// The authenticator of `config`, or `None` when no key is configured (an open server).
    ///
    /// Fails with a [`KeyError`] naming the problem when the key cannot work: both a secret
    /// and a public key set, a secret shorter than [`MIN_SECRET_BYTES`], an unreadable file,
    /// or a PEM that is not an RSA or P-256 public key.
    pub fn from_config(config: &Config) -> Result<Option<Authenticator>, KeyError> {
        let secret = load_secret(
            config.jwt_secret.as_ref().map(|s| s.expose()),
            config.jwt_secret_file.as_deref(),
        )?;
        let (key, algorithms) =
            match (secret, config.jwt_public_key.as_deref()) {
                (Some(_), Some(_)) => return Err(KeyError::Conflict(
                    "configure a secret (HS256/384/512) or a public key (RS256/ES256), not both"
                        .into(),
                )),
                (Some(secret), None) => (
                    DecodingKey::from_secret(&secret),
                    vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                ),
                (None, Some(path)) => {
                    let (key, alg) = load_public_key(path)?;
                    (key, vec![alg])
                }
                (None, None) => return Ok(None),
            };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = config.jwt_leeway_secs;
        validation.validate_nbf = true;
        // `exp` is checked here, against the same instant streams end at (see `verify`).
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        if config.jwt_require_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        // Without a configured audience a token's `aud` is not ours to judge; with one, the
        // token must name it.
        validation.validate_aud = config.jwt_audience.is_some();
        if let Some(aud) = &config.jwt_audience {
            validation.set_audience(&[aud]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Some(Authenticator {
            key,
            validation,
            leeway: Duration::from_secs(config.jwt_leeway_secs),
            query_token: config.jwt_query_token,
        }))
    }

    /// Verifies `token` and returns its grants.
    ///
    /// Guarantees: `Ok` only for a token signed by the configured key with an algorithm that
    /// fits it, whose `exp` plus leeway has not passed (and is present when required), whose
    /// `nbf` minus leeway has, whose `aud`/`iss` match when configured, and whose grants are
    /// all valid patterns.
    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        let exp = match claims.exp {
            None => None,
            Some(e) if e.is_finite() && e >= 0.0 => {
                // An `exp` (plus leeway) past what the clock can represent is not a time:
                // refused, as the plain arithmetic would panic.
                let expires = Duration::try_from_secs_f64(e)
                    .ok()
                    .and_then(|d| UNIX_EPOCH.checked_add(d))
                    .and_then(|t| t.checked_add(self.leeway))
                    .ok_or_else(|| AuthError::Rejected("exp is not a valid time".into()))?;
                if SystemTime::now() >= expires {
                    return Err(AuthError::Expired);
                }
                // Whole seconds, rounded down: the token is never taken to live longer.
                Some(e.floor() as u64)
            }
            Some(_) => return Err(AuthError::Rejected("exp is not a valid time".into())),
        };
        let parse = |list: Vec<String>, what: &str| -> Result<Vec<Pattern>, AuthError> {
            list.iter()
                .map(|p| {
                    Pattern::parse(p)
                        .map_err(|e| AuthError::Rejected(format!("the {what} grant {p:?} {e}")))
                })
                .collect()
        };
        Ok(Grants::new(
            parse(claims.tidewire.publish, "publish")?,
            parse(claims.tidewire.subscribe, "subscribe")?,
            claims.sub,
            exp,
            self.leeway,
        )
        .with_admin(claims.tidewire.admin))
    }

    /// Finds the request's token (header, cookie, then query when allowed) and verifies it.
    pub fn authorize(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Grants, AuthError> {
        match find_token(headers, query, self.query_token)? {
            Some((token, _)) => self.verify(&token),
            None => Err(AuthError::Missing),
        }
    }
}

/// The refusal for a `jsonwebtoken` error. Details that would help an attacker probe the key
/// (which check failed inside the signature code) are folded into one answer.
fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_) => AuthError::BadSignature,
        ErrorKind::InvalidAudience => AuthError::Rejected("wrong audience (aud)".into()),
        ErrorKind::InvalidIssuer => AuthError::Rejected("wrong issuer (iss)".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            AuthError::Rejected(format!("the {c} claim is required"))
        }
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::Rejected(format!("the {c} claim is malformed"))
        }
        ErrorKind::Json(_) => AuthError::Rejected("the claims are not what tidewire reads".into()),
        _ => AuthError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn config() -> Config {
        Config {
            jwt_secret: Some(Secret::new(SECRET)),
            jwt_leeway_secs: 0,
            ..Config::default()
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn sign(alg: Algorithm, claims: &serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign")
    }

    fn auth(c: &Config) -> Authenticator {
        Authenticator::from_config(c)
            .expect("key loads")
            .expect("key configured")
    }

    #[test]
    fn every_hs_algorithm_is_accepted_with_a_secret() {
        let a = auth(&config());
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = sign(
                alg,
                &json!({"exp": now() + 60, "sub": "dev-1", "tidewire": {"publish": ["s/**"]}}),
            );
            let g = a.verify(&t).expect("valid");
            assert_eq!(g.subject(), Some("dev-1"));
            assert!(g.exp().is_some_and(|e| e >= now() + 59));
            assert!(g.may_publish(&crate::topic::Topic::parse("s/a").expect("topic")));
        }
    }

    #[test]
    fn exp_is_required_unless_configured_otherwise() {
        let t = sign(Algorithm::HS256, &json!({"tidewire": {}}));
        assert!(matches!(
            auth(&config()).verify(&t),
            Err(AuthError::Rejected(_))
        ));
        let lenient = Config {
            jwt_require_exp: false,
            ..config()
        };
        let g = auth(&lenient).verify(&t).expect("valid without exp");
        assert_eq!(g.expires_at(), None);
    }

    #[test]
    fn expired_and_immature_tokens_are_refused() {
        let a = auth(&config());
        let t = sign(Algorithm::HS256, &json!({"exp": now() - 1}));
        assert_eq!(a.verify(&t), Err(AuthError::Expired));
        let t = sign(
            Algorithm::HS256,
            &json!({"exp": now() + 60, "nbf": now() + 30}),
        );
        assert_eq!(a.verify(&t), Err(AuthError::NotYetValid));
        // Leeway forgives small skew in both directions.
        let skewed = Config {
            jwt_leeway_secs: 60,
            ..config()
        };
        assert!(auth(&skewed).verify(&t).is_ok());
        let t = sign(Algorithm::HS256, &json!({"exp": now() - 10}));
        assert!(auth(&skewed).verify(&t).is_ok());
    }

    #[test]
    fn garbage_and_bad_grants_are_refused() {
        let a = auth(&config());
        assert_eq!(a.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(a.verify(""), Err(AuthError::Malformed));
        let t = sign(
            Algorithm::HS256,
            &json!({"exp": now() + 60, "tidewire": {"subscribe": ["a/**/b"]}}),
        );
        assert!(matches!(a.verify(&t), Err(AuthError::Rejected(_))));
        let t = sign(
            Algorithm::HS256,
            &json!({"exp": now() + 60, "tidewire": {"subscribe": "a"}}),
        );
        assert!(matches!(a.verify(&t), Err(AuthError::Rejected(_))));
    }

    #[test]
    fn an_exp_beyond_any_representable_time_is_refused_not_panicked_on() {
        // Found by fuzz/fuzz_targets/jwt.rs: `Duration::from_secs_f64` panicked on an `exp`
        // of u64::MAX (past a Duration as an f64), and `UNIX_EPOCH + exp` overflows past
        // i64::MAX seconds (1e19).
        let a = auth(&config());
        for exp in [
            json!(u64::MAX),
            json!(1e300),
            json!(10_000_000_000_000_000_000u64),
        ] {
            let t = sign(Algorithm::HS256, &json!({ "exp": exp }));
            assert!(
                matches!(a.verify(&t), Err(AuthError::Rejected(_))),
                "exp {exp}"
            );
        }
        let lenient = Config {
            jwt_require_exp: false,
            ..config()
        };
        let t = sign(Algorithm::HS256, &json!({ "exp": 1.8446744073709552e19 }));
        assert!(matches!(
            auth(&lenient).verify(&t),
            Err(AuthError::Rejected(_))
        ));
        // A far but representable expiry is still a valid one.
        let t = sign(Algorithm::HS256, &json!({ "exp": 4_102_444_800u64 }));
        let g = a.verify(&t).expect("valid until 2100");
        assert_eq!(g.exp(), Some(4_102_444_800));
        assert!(g.expires_at().is_some());
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let c = Config {
            jwt_audience: Some("tidewire".into()),
            jwt_issuer: Some("auth.example".into()),
            ..config()
        };
        let a = auth(&c);
        let good = json!({"exp": now() + 60, "aud": "tidewire", "iss": "auth.example"});
        assert!(a.verify(&sign(Algorithm::HS256, &good)).is_ok());
        for bad in [
            json!({"exp": now() + 60, "aud": "other", "iss": "auth.example"}),
            json!({"exp": now() + 60, "aud": "tidewire", "iss": "other"}),
            json!({"exp": now() + 60, "iss": "auth.example"}),
            json!({"exp": now() + 60, "aud": "tidewire"}),
        ] {
            assert!(
                matches!(
                    a.verify(&sign(Algorithm::HS256, &bad)),
                    Err(AuthError::Rejected(_))
                ),
                "{bad}"
            );
        }
        // Unconfigured, an `aud` in the token is not held against it.
        let t = sign(Algorithm::HS256, &json!({"exp": now() + 60, "aud": "x"}));
        assert!(auth(&config()).verify(&t).is_ok());
    }

    #[test]
    fn unusable_keys_fail_to_load() {
        let short = Config {
            jwt_secret: Some(Secret::new("too short")),
            ..Config::default()
        };
        assert!(matches!(
            Authenticator::from_config(&short),
            Err(KeyError::SecretTooShort { len: 9, min: 32 })
        ));
        let missing = Config {
            jwt_secret_file: Some("/nonexistent/tidewire-secret".into()),
            ..Config::default()
        };
        assert!(matches!(
            Authenticator::from_config(&missing),
            Err(KeyError::Unreadable { .. })
        ));
        let both = Config {
            jwt_public_key: Some("/nonexistent/key.pem".into()),
            ..config()
        };
        assert!(matches!(
            Authenticator::from_config(&both),
            Err(KeyError::Conflict(_))
        ));
        assert!(Authenticator::from_config(&Config::default())
            .expect("no key is fine")
            .is_none());
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{SECRET}\n")).expect("write");
        let c = Config {
            jwt_secret_file: Some(path),
            jwt_leeway_secs: 0,
            ..Config::default()
        };
        let t = sign(Algorithm::HS256, &json!({"exp": now() + 60}));
        assert!(auth(&c).verify(&t).is_ok());
    }
}
