//! Standard Webhooks signatures: the secret's `whsec_` form and the `webhook-signature`
//! header. Pure functions, free of I/O.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the signature is
//! HMAC-SHA256 under the secret's bytes, base64-encoded, prefixed with the scheme `v1,`.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret in its Standard Webhooks form.
pub const SECRET_PREFIX: &str = "whsec_";
/// Fewest secret bytes accepted (Standard Webhooks asks for 24 to 64).
pub const MIN_SECRET_BYTES: usize = 24;
/// Most secret bytes accepted.
pub const MAX_SECRET_BYTES: usize = 64;

/// Standard base64, lenient about the unused bits of the last symbol (other Standard Webhooks
/// implementations accept such secrets, and so must we).
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// A webhook's signing key: its bytes, and the `whsec_` text it was given as.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    /// Reads a secret in its `whsec_<base64>` form, 24 to 64 bytes once decoded.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let b64 = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| format!("a secret starts with {SECRET_PREFIX:?} (Standard Webhooks)"))?;
        let key = SECRET_BASE64
            .decode(b64)
            .map_err(|e| format!("the secret after {SECRET_PREFIX:?} is not base64: {e}"))?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(format!(
                "the secret holds {} bytes; Standard Webhooks secrets hold {MIN_SECRET_BYTES} to \
                 {MAX_SECRET_BYTES}",
                key.len()
            ));
        }
        Ok(Secret {
            text: text.to_owned(),
            key,
        })
    }

    /// The `whsec_` text (kept so a stored webhook can be written back).
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The `webhook-signature` header value for one attempt: `v1,<base64 HMAC-SHA256>` of
    /// `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_reference_example() {
        // The example of the Standard Webhooks specification (and its reference libraries).
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_outside_the_standard_form_are_refused() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_not base64!",
            "whsec_c2hvcnQ=",
            &format!("whsec_{}", STANDARD.encode([7u8; 65])),
        ] {
            assert!(Secret::parse(bad).is_err(), "{bad}");
        }
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 24]))).is_ok());
        // Unused bits set in the last symbol: still the same 24 bytes.
        let canonical = STANDARD.encode([7u8; 25]);
        let loose = format!("{}B==", &canonical[..canonical.len() - 3]);
        assert_eq!(
            Secret::parse(&format!("whsec_{loose}")).map(|s| s.key.len()),
            Ok(25)
        );
        assert_eq!(
            format!(
                "{:?}",
                Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 32])))
            ),
            "Ok(Secret(redacted))"
        );
    }
}
