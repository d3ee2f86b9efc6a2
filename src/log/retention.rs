//! Retention: how much history each topic keeps. Pure rules, free of I/O; the log applies
//! them in the background (see the sled log's compaction).
//!
//! Guarantees of the rules themselves:
//! - every topic is governed by exactly one set of limits: the first rule whose pattern
//!   matches it, else the default;
//! - a limit of 0 means "no limit" for that measure;
//! - an event is removed only when it is over a limit of its topic (age, count, bytes) or
//!   the global byte budget, and always oldest first, so what is kept is a suffix of the
//!   topic's history and a resuming client is told of the gap.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::{Pattern, Topic};

/// Limits on one topic's retained history. 0 in any field: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Events older than this many seconds are removed.
    pub max_age_secs: u64,
    /// At most this many of the topic's newest events are kept.
    pub max_events: u64,
    /// At most this many payload bytes of the topic's newest events are kept.
    pub max_bytes: u64,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.max_age_secs == 0 && self.max_events == 0 && self.max_bytes == 0
    }

    /// Whether the oldest retained event of a topic, committed at `time` (Unix ms), must go
    /// when the topic retains `count` events holding `bytes` payload bytes, at `now`.
    pub fn drops_oldest(&self, time: u64, count: u64, bytes: u64, now: u64) -> bool {
        let too_old = self.max_age_secs > 0
            && time.saturating_add(self.max_age_secs.saturating_mul(1000)) <= now;
        let too_many = self.max_events > 0 && count > self.max_events;
        let too_big = self.max_bytes > 0 && bytes > self.max_bytes;
        too_old || too_many || too_big
    }
}

/// One retention rule as written in the configuration: a pattern and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The topics the rule governs (`*` and `**` allowed).
    pub pattern: String,
    /// The limits of those topics.
    #[serde(flatten)]
    pub limits: Limits,
}

/// The retention policy of a log: rules, a default and a global budget, validated.
#[derive(Debug, Clone, Default)]
pub struct RetentionPolicy {
    rules: Vec<(Pattern, Limits)>,
    default: Limits,
    /// Most payload bytes retained over all topics (0: unlimited); beyond it the oldest
    /// events of the whole log go first.
    pub max_total_bytes: u64,
    /// How often the log applies the policy.
    pub check_every: Duration,
}

impl RetentionPolicy {
    /// A policy with no limits at all (nothing is ever removed).
    pub fn keep_everything() -> Self {
        RetentionPolicy {
            check_every: Duration::from_secs(10),
            ..Self::default()
        }
    }

    /// Builds the policy; refuses a rule whose pattern is not a valid pattern.
    pub fn new(
        rules: &[RuleConfig],
        default: Limits,
        max_total_bytes: u64,
        check_every: Duration,
    ) -> Result<Self, String> {
        let rules = rules
            .iter()
            .map(|r| {
                Pattern::parse(&r.pattern)
                    .map(|p| (p, r.limits))
                    .map_err(|e| format!("retention rule pattern {:?}: {e}", r.pattern))
            })
            .collect::<Result<_, _>>()?;
        Ok(RetentionPolicy {
            rules,
            default,
            max_total_bytes,
            check_every: check_every.max(Duration::from_millis(10)),
        })
    }

    /// The limits governing `topic`: the first rule matching it, else the default.
    pub fn limits_for(&self, topic: &Topic) -> Limits {
        self.rules
            .iter()
            .find(|(p, _)| p.matches(topic))
            .map(|(_, l)| *l)
            .unwrap_or(self.default)
    }

    /// The limits of topics no rule matches.
    pub fn default_limits(&self) -> Limits {
        self.default
    }

    /// The rules, in the order they are tried.
    pub fn rules(&self) -> &[(Pattern, Limits)] {
        &self.rules
    }

    /// Whether the policy can ever remove anything.
    pub fn removes_anything(&self) -> bool {
        self.max_total_bytes > 0
            || !self.default.is_unlimited()
            || self.rules.iter().any(|(_, l)| !l.is_unlimited())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, max_age_secs: u64, max_events: u64) -> RuleConfig {
        RuleConfig {
            pattern: pattern.into(),
            limits: Limits {
                max_age_secs,
                max_events,
                max_bytes: 0,
            },
        }
    }

    #[test]
    fn the_first_matching_rule_governs_a_topic_else_the_default() {
        let default = Limits {
            max_age_secs: 7 * 86400,
            ..Limits::default()
        };
        let p = RetentionPolicy::new(
            &[rule("sensors/*/raw", 60, 0), rule("sensors/**", 3600, 10)],
            default,
            0,
            Duration::from_secs(1),
        )
        .unwrap();
        let t = |s: &str| Topic::parse(s).unwrap();
        assert_eq!(p.limits_for(&t("sensors/a/raw")).max_age_secs, 60);
        assert_eq!(p.limits_for(&t("sensors/a/avg")).max_events, 10);
        assert_eq!(p.limits_for(&t("audit/x")), default);
        assert!(p.removes_anything());
        assert!(!RetentionPolicy::keep_everything().removes_anything());
    }

    #[test]
    fn an_invalid_rule_pattern_is_refused() {
        let e = RetentionPolicy::new(
            &[rule("a/**/b", 1, 0)],
            Limits::default(),
            0,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("a/**/b"), "{e}");
    }

    #[test]
    fn the_oldest_event_goes_when_over_any_limit_and_zero_means_unlimited() {
        let l = Limits {
            max_age_secs: 10,
            max_events: 100,
            max_bytes: 1000,
        };
        let now = 1_000_000;
        assert!(!l.drops_oldest(now - 9_999, 100, 1000, now));
        assert!(l.drops_oldest(now - 10_000, 1, 1, now), "age");
        assert!(l.drops_oldest(now, 101, 1, now), "count");
        assert!(l.drops_oldest(now, 1, 1001, now), "bytes");
        assert!(!Limits::default().drops_oldest(0, u64::MAX, u64::MAX, u64::MAX));
    }
}
