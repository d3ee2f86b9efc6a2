//! Authorization: JWTs whose claims grant topic patterns, checked on every transport.
//!
//! - [`coverage`]: when a granted pattern covers a requested topic or pattern (pure).
//! - [`grants`]: [`Grants`] of a verified token, and [`Access`], what one request may do.
//! - [`jwt`]: the [`Authenticator`]: key, algorithms, `exp`/`nbf`/`aud`/`iss` rules.
//! - [`extract`]: where a request's token comes from (header, cookie, query), and how a
//!   logged query hides it.
//! - [`mint`]: `tidewire token`.
//! - [`error`]: [`AuthError`] (401/403, mapped in `http::error`) and [`KeyError`] (startup).
//!
//! With no key configured the server is open: every request gets [`Access::Open`].

pub mod coverage;
pub mod error;
pub mod extract;
pub mod grants;
pub mod jwt;
pub mod mint;

pub use coverage::{covers, intersect};
pub use error::{AuthError, KeyError};
pub use grants::{Access, Grants};
pub use jwt::Authenticator;
