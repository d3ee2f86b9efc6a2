//! What can go wrong in the auth layer: [`AuthError`] for a request (401 or 403, mapped to
//! the contract's bodies in `http::error`, the one place that knows HTTP) and [`KeyError`]
//! for a key configuration the server must refuse to start with.
//!
//! Messages never contain the token itself: they end up in responses and logs.

use std::path::PathBuf;

/// Why a request was not authorized. `Forbidden` is a valid token that does not cover the
/// request (403); every other variant is "who are you?" (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any of the accepted places.
    #[error("a bearer token is required (Authorization: Bearer, the tidewire_token cookie, or access_token)")]
    Missing,
    /// A token was presented but is not a well-formed JWT (or an empty `Bearer`).
    #[error("the token is malformed")]
    Malformed,
    /// The signature does not verify, or the algorithm does not fit the configured key
    /// (`alg: none`, HS256 against a public key, a key of another family).
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    /// The token's `exp` (plus the configured leeway) has passed.
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` (minus the leeway) is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// A claim check failed: audience, issuer, a required claim, a grant that is not a pattern.
    #[error("the token is not accepted: {0}")]
    Rejected(String),
    /// A valid token whose grants do not cover the request.
    #[error("the token does not grant {action} on {target:?}")]
    Forbidden {
        /// `publish`, `subscribe` or `admin`.
        action: &'static str,
        /// The topic or pattern asked for.
        target: String,
    },
}

impl AuthError {
    /// Whether a token was presented and refused (as opposed to none at all, or a valid token
    /// lacking a grant). Such answers carry `error="invalid_token"` (RFC 6750).
    pub fn is_invalid_token(&self) -> bool {
        !matches!(self, AuthError::Missing | AuthError::Forbidden { .. })
    }

    /// Whether this is a 403 (the token is fine, the grants are not enough).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::Forbidden { .. })
    }
}

/// Why the configured key cannot be used: the server refuses to start with it, before it
/// listens, so a typo never leaves an open or locked-out server running.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Keys that exclude each other were both set (e.g. a secret and a public key).
    #[error("auth: {0}")]
    Conflict(String),
    /// A key or secret file could not be read.
    #[error("auth: cannot read {what} {}: {source}", path.display())]
    Unreadable {
        /// Which setting named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An HMAC secret too short to resist brute force.
    #[error("auth: the JWT secret is {len} bytes; at least {min} are required (e.g. `openssl rand -base64 48`)")]
    SecretTooShort {
        /// Its length in bytes.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The public key file is not a usable RSA or P-256 EC public key in PEM.
    #[error("auth: {} is not a usable public key: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A token could not be minted (`tidewire token`).
    #[error("token: {0}")]
    Mint(String),
}
