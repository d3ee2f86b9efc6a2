//! What a verified token allows ([`Grants`]) and what one request may do ([`Access`]: either
//! the server is open, or a token's grants apply).
//!
//! Every check goes through [`covers`], so publish, subscribe, poll, WebSocket and the topics
//! API agree on what a grant means.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::coverage::covers;
use super::AuthError;
use crate::topic::{Pattern, Topic};

/// The grants of one verified token, and until when the server accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    subject: Option<String>,
    exp: Option<u64>,
    leeway: Duration,
    admin: bool,
}

impl Grants {
    /// Grants from a token's claims: `exp` is the token's claim (Unix seconds), `leeway` the
    /// clock-skew allowance the server accepts past it.
    pub fn new(
        publish: Vec<Pattern>,
        subscribe: Vec<Pattern>,
        subject: Option<String>,
        exp: Option<u64>,
        leeway: Duration,
    ) -> Self {
        Grants {
            publish,
            subscribe,
            subject,
            exp,
            leeway,
            admin: false,
        }
    }

    /// The same grants, plus operator rights when `admin` (the claim `"admin": true`).
    pub fn with_admin(mut self, admin: bool) -> Self {
        self.admin = admin;
        self
    }

    /// Whether the token carries operator rights (managing webhooks).
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether the token may publish to `topic`: some publish grant matches it.
    pub fn may_publish(&self, topic: &Topic) -> bool {
        self.publish.iter().any(|g| g.matches(topic))
    }

    /// Whether the token may subscribe to `pattern`: some subscribe grant covers it, i.e.
    /// matches every topic the pattern can ever match.
    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|g| covers(g, pattern))
    }

    /// Whether the token may read `topic` (its events or its statistics).
    pub fn may_read(&self, topic: &Topic) -> bool {
        self.subscribe.iter().any(|g| g.matches(topic))
    }

    /// The subscribe grants, as written in the token.
    pub fn subscribe_grants(&self) -> &[Pattern] {
        &self.subscribe
    }

    /// The publish grants, as written in the token.
    pub fn publish_grants(&self) -> &[Pattern] {
        &self.publish
    }

    /// The token's `sub` claim, when it has one.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// The token's `exp` claim (Unix seconds), when it has one.
    pub fn exp(&self) -> Option<u64> {
        self.exp
    }

    /// The instant from which the server refuses this token: `exp` plus the leeway. `None`
    /// for a token without `exp` (only accepted when `jwt_require_exp` is off).
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.exp
            .map(|e| UNIX_EPOCH + Duration::from_secs(e).saturating_add(self.leeway))
    }
}

/// What one request (or one WebSocket, until it presents a new token) may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No key is configured: everything is allowed and nothing expires.
    Open,
    /// A verified token's grants.
    Token(Grants),
}

impl Access {
    /// `Ok` when the request may publish to `topic`, else [`AuthError::Forbidden`].
    pub fn check_publish(&self, topic: &Topic) -> Result<(), AuthError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(g) if g.may_publish(topic) => Ok(()),
            Access::Token(_) => Err(AuthError::Forbidden {
                action: "publish",
                target: topic.as_str().to_string(),
            }),
        }
    }

    /// `Ok` when the request may subscribe to `pattern`, else [`AuthError::Forbidden`].
    pub fn check_subscribe(&self, pattern: &Pattern) -> Result<(), AuthError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(g) if g.may_subscribe(pattern) => Ok(()),
            Access::Token(_) => Err(AuthError::Forbidden {
                action: "subscribe",
                target: pattern.as_str().to_string(),
            }),
        }
    }

    /// `Ok` when the request may read `topic`'s statistics (a subscribe grant matches it).
    pub fn check_read(&self, topic: &Topic) -> Result<(), AuthError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(g) if g.may_read(topic) => Ok(()),
            Access::Token(_) => Err(AuthError::Forbidden {
                action: "subscribe",
                target: topic.as_str().to_string(),
            }),
        }
    }

    /// `Ok` when the request may manage webhooks (an open server, or a token with the admin
    /// claim), else [`AuthError::Forbidden`].
    pub fn check_admin(&self) -> Result<(), AuthError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(g) if g.is_admin() => Ok(()),
            Access::Token(_) => Err(AuthError::Forbidden {
                action: "admin",
                target: "webhooks".to_string(),
            }),
        }
    }

    /// The token's grants, `None` on an open server.
    pub fn grants(&self) -> Option<&Grants> {
        match self {
            Access::Open => None,
            Access::Token(g) => Some(g),
        }
    }

    /// How long from now until the token is refused; `None` when it never is (open server,
    /// or no `exp`). Zero when it already is. Streams end by then.
    pub fn remaining(&self) -> Option<Duration> {
        let at = self.grants()?.expires_at()?;
        Some(
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// [`Access::remaining`] as a tokio deadline.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.remaining().map(|d| tokio::time::Instant::now() + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(publish: &[&str], subscribe: &[&str], exp: Option<u64>) -> Grants {
        let ps = |v: &[&str]| {
            v.iter()
                .map(|s| Pattern::parse(s).expect("pattern"))
                .collect()
        };
        Grants::new(ps(publish), ps(subscribe), None, exp, Duration::ZERO)
    }

    #[test]
    fn publish_and_subscribe_grants_are_separate() {
        let a = Access::Token(grants(&["sensors/**"], &["dash/**"], None));
        let t = |s: &str| Topic::parse(s).expect("topic");
        let pat = |s: &str| Pattern::parse(s).expect("pattern");
        assert!(a.check_publish(&t("sensors/a/t")).is_ok());
        assert!(a.check_publish(&t("dash/a")).unwrap_err().is_forbidden());
        assert!(a.check_subscribe(&pat("dash/*/x")).is_ok());
        assert!(a.check_subscribe(&pat("sensors/**")).is_err());
        assert!(a.check_subscribe(&pat("**")).is_err());
        assert!(a.check_read(&t("dash")).is_ok());
        assert!(Access::Open.check_subscribe(&pat("**")).is_ok());
    }

    #[test]
    fn expiry_is_exp_plus_leeway() {
        let g = Grants::new(
            Vec::new(),
            Vec::new(),
            None,
            Some(100),
            Duration::from_secs(5),
        );
        assert_eq!(g.expires_at(), Some(UNIX_EPOCH + Duration::from_secs(105)));
        assert_eq!(
            Access::Token(g).remaining(),
            Some(Duration::ZERO),
            "long past"
        );
        assert_eq!(Access::Open.remaining(), None);
        assert_eq!(Access::Token(grants(&[], &[], None)).remaining(), None);
    }
}
