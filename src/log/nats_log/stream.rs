//! The JetStream stream behind the log: the configuration a gateway creates, and the check
//! that an existing stream is one tidewire can serve. Pure functions, free of I/O.
//!
//! What maps onto the stream, and what is refused:
//! - the dedupe window is the stream's `duplicate_window` (at most `max_age`, as JetStream
//!   requires);
//! - the default `retention_max_age_secs` is the stream's `max_age`, and
//!   `retention_max_total_bytes` its `max_bytes` (oldest first, `discard: old`);
//! - per-topic counts and bytes, and per-pattern rules with limits, have no exact JetStream
//!   counterpart that keeps the gap signal truthful, so a gateway refuses to start with them.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};

use crate::log::retention::RetentionPolicy as Retention;

/// What the stream must be like, from the gateway's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Stream name.
    pub name: String,
    /// Subject prefix; the stream holds `<prefix>.>`.
    pub prefix: String,
    /// Replicas when created.
    pub replicas: usize,
    /// `duplicate_window`.
    pub dedupe_window: Duration,
    /// `max_age` (zero: unlimited).
    pub max_age: Duration,
    /// `max_bytes` (zero: unlimited).
    pub max_bytes: u64,
}

impl Wanted {
    /// The stream settings `retention` asks for, or why it cannot be served by JetStream.
    pub fn new(
        name: &str,
        prefix: &str,
        replicas: usize,
        dedupe_window: Duration,
        retention: &Retention,
    ) -> Result<Wanted, String> {
        let default = retention.default_limits();
        if default.max_events > 0 || default.max_bytes > 0 {
            return Err(
                "retention_max_events and retention_max_bytes (per-topic limits) are not \
                 available with log = \"nats\": JetStream keeps no per-subject byte count, and a \
                 per-subject count limit would remove events without the gap signal saying so; \
                 use retention_max_age_secs and retention_max_total_bytes"
                    .into(),
            );
        }
        if let Some(rule) = retention.rules().iter().find(|(_, l)| !l.is_unlimited()) {
            return Err(format!(
                "retention rule {:?}: per-pattern retention rules are not available with log = \
                 \"nats\" (the stream's limits apply to every topic alike); remove the rule or \
                 use the sled log",
                rule.0.as_str()
            ));
        }
        let max_age = Duration::from_secs(default.max_age_secs);
        Ok(Wanted {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            replicas,
            // JetStream refuses a duplicate window longer than the stream's max_age (an
            // event older than that is gone, and so is what its msg_id could be compared to).
            dedupe_window: if max_age.is_zero() {
                dedupe_window
            } else {
                dedupe_window.min(max_age)
            },
            max_age,
            max_bytes: retention.max_total_bytes,
        })
    }

    /// The subject filter of every event in the stream.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The configuration a gateway creates the stream with.
    pub fn config(&self) -> Config {
        Config {
            name: self.name.clone(),
            description: Some("tidewire event log (one message per event)".into()),
            subjects: vec![self.subjects()],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.dedupe_window,
            max_age: self.max_age,
            max_bytes: limit(self.max_bytes),
            max_messages: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            allow_direct: true,
            allow_atomic_publish: true,
            ..Default::default()
        }
    }

    /// Everything about `existing` that stops tidewire from serving it as configured, one
    /// line each (empty: it can be served).
    pub fn problems(&self, existing: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let subjects = self.subjects();
        if !existing.subjects.iter().any(|s| s == &subjects) {
            out.push(format!(
                "its subjects are {:?}, not {subjects:?} (the prefix of this deployment)",
                existing.subjects
            ));
        }
        if existing.retention != RetentionPolicy::Limits {
            out.push(format!(
                "its retention is {:?}: only limits-based retention keeps every event until the \
                 limits remove it",
                existing.retention
            ));
        }
        if !existing.allow_atomic_publish {
            out.push(
                "allow_atomic is off: a publish batch must be stored whole or not at all".into(),
            );
        }
        if !existing.allow_direct {
            out.push("allow_direct is off: reads by cursor use direct gets".into());
        }
        if existing.sealed {
            out.push("it is sealed: nothing more can be published".into());
        }
        if existing.mirror.is_some() {
            out.push("it is a mirror: gateways publish to the stream itself".into());
        }
        if existing.discard != DiscardPolicy::Old {
            out.push(
                "its discard policy is new: a full stream would refuse publishes instead of \
                 removing the oldest events"
                    .into(),
            );
        }
        if existing.max_messages_per_subject > 0 {
            out.push(format!(
                "max_msgs_per_subject is {}: events would be removed without a gap signal",
                existing.max_messages_per_subject
            ));
        }
        if existing.allow_message_ttl {
            out.push(
                "allow_msg_ttl is on: per-message TTLs would remove events without a gap signal"
                    .into(),
            );
        }
        if existing.duplicate_window != self.dedupe_window {
            out.push(format!(
                "its duplicate_window is {:?}, dedupe_window_secs is {:?}",
                existing.duplicate_window, self.dedupe_window
            ));
        }
        if existing.max_age != self.max_age {
            out.push(format!(
                "its max_age is {:?}, retention_max_age_secs is {:?}",
                existing.max_age, self.max_age
            ));
        }
        if existing.max_bytes != limit(self.max_bytes) {
            out.push(format!(
                "its max_bytes is {}, retention_max_total_bytes is {}",
                existing.max_bytes,
                limit(self.max_bytes)
            ));
        }
        out
    }
}

/// A JetStream limit: -1 for "none" (our 0).
fn limit(n: u64) -> i64 {
    if n == 0 {
        -1
    } else {
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::retention::{Limits, RuleConfig};

    fn retention(default: Limits, rules: Vec<RuleConfig>, total: u64) -> Retention {
        Retention::new(&rules, default, total, Duration::from_secs(10)).unwrap()
    }

    fn wanted() -> Wanted {
        let r = retention(
            Limits {
                max_age_secs: 3600,
                ..Limits::default()
            },
            vec![],
            1 << 30,
        );
        Wanted::new("S", "tidewire.S", 3, Duration::from_secs(120), &r).unwrap()
    }

    #[test]
    fn the_stream_a_gateway_creates_is_one_it_can_serve() {
        let w = wanted();
        let c = w.config();
        assert_eq!(c.subjects, vec!["tidewire.S.>"]);
        assert_eq!(c.max_age, Duration::from_secs(3600));
        assert_eq!(c.max_bytes, 1 << 30);
        assert_eq!(c.num_replicas, 3);
        assert!(w.problems(&c).is_empty(), "{:?}", w.problems(&c));
    }

    #[test]
    fn every_setting_that_breaks_the_contract_is_named() {
        let w = wanted();
        let bad = Config {
            subjects: vec!["other.>".into()],
            allow_atomic_publish: false,
            allow_direct: false,
            max_messages_per_subject: 5,
            duplicate_window: Duration::from_secs(1),
            ..w.config()
        };
        let problems = w.problems(&bad).join("\n");
        for needle in [
            "subjects",
            "allow_atomic",
            "allow_direct",
            "max_msgs_per_subject",
            "duplicate_window",
        ] {
            assert!(
                problems.contains(needle),
                "{needle} missing from {problems}"
            );
        }
    }

    #[test]
    fn retention_jetstream_cannot_keep_truthfully_is_refused() {
        let per_topic = retention(
            Limits {
                max_events: 10,
                ..Limits::default()
            },
            vec![],
            0,
        );
        assert!(Wanted::new("S", "p", 1, Duration::from_secs(1), &per_topic).is_err());
        let rule = retention(
            Limits::default(),
            vec![RuleConfig {
                pattern: "logs/**".into(),
                limits: Limits {
                    max_age_secs: 60,
                    ..Limits::default()
                },
            }],
            0,
        );
        let why = Wanted::new("S", "p", 1, Duration::from_secs(1), &rule).unwrap_err();
        assert!(why.contains("logs/**"), "{why}");
    }
}
