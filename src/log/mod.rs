//! The event log: the one durable record of every acknowledged event, and the only thing
//! that assigns ids.
//!
//! [`EventLog`] is deliberately narrow (append, read by cursor, topic statistics) so that
//! another engine (NATS JetStream is the plan) can stand behind it. The log knows nothing of
//! HTTP; it hands every committed batch, in id order, to the [`Hub`](crate::hub::Hub).
//!
//! Guarantees every implementation keeps:
//! - ids are assigned only here, contiguous within one append, strictly increasing, never reused;
//! - `append` returns only once the events are durable (under the configured flush policy);
//! - an event whose `(topic, msg_id)` was stored within the dedupe window is not stored
//!   again, whichever append or restart lies between (JetStream's `Nats-Msg-Id` window is the
//!   same promise, so it stays behind this trait);
//! - readers, and the hub, only ever see durable events, in id order;
//! - an event's `time` is never below the `time` of an event with a smaller id, so "every
//!   event at or after T" is one cut in id order, found by [`EventLog::time_start`]. One clock
//!   dates every event, where ids are assigned: sled's writer stamps `max(clock, previous
//!   time)`; on JetStream the time is the stream leader's timestamp of the message, taken as
//!   it assigns the sequence (see [`nats_log`]: the gateways' clocks, which need not agree,
//!   date nothing).

use std::future::Future;
use std::pin::Pin;

use crate::envelope::{EventId, Gap, NewEvent, SharedEvent};
use crate::topic::{Pattern, PatternSet, Topic};

mod blobs;
pub mod nats_log;
pub mod record;
pub mod retention;
mod sled_log;
pub mod wal_record;

pub use nats_log::{NatsLog, NatsOptions};
pub use sled_log::{
    Compacted, DedupeOptions, ImportEvent, Inspection, LogOptions, SledLog, SpaceLimits,
    Verification, WalRecovery,
};

/// A boxed future, so the trait can be used as `dyn EventLog`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of the log layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log is shutting down or shut down; nothing more is accepted.
    #[error("the log is closed")]
    Closed,
    /// The storage refused a write or a flush; the events of that append are not acknowledged.
    #[error("storage error: {0}")]
    Storage(String),
    /// The disk, or the configured budget, is full: nothing of the append was stored.
    /// Publishing resumes by itself once there is room again.
    #[error("storage full: {0}")]
    Full(String),
    /// A stored record could not be decoded.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// The data directory cannot be used (foreign content, wrong format, cannot open).
    #[error("cannot open the data directory: {0}")]
    Open(String),
    /// The log cannot be served as configured (a remote stream set up otherwise, a setting
    /// its engine cannot keep); retrying will not help.
    #[error("the log cannot be served as configured: {0}")]
    Config(String),
    /// The log's engine cannot be reached right now (NATS down, no stream leader, no answer
    /// in time). Nothing of the append is acknowledged; a retry with the same `msg_id`s is
    /// stored once whatever happened to this one.
    #[error("the log is unavailable: {0}")]
    Unavailable(String),
    /// The append is larger than the engine commits atomically; nothing was stored.
    #[error("{0}")]
    TooManyEvents(String),
    /// An event is larger than the engine stores (a NATS server's `max_payload`); nothing
    /// was stored.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// This log cannot answer the request (a start option its engine does not serve yet).
    #[error("{0}")]
    Unsupported(String),
}

/// When an append is acknowledged relative to the flush (fsync) that makes it durable.
///
/// Written in configuration as `always`, `interval=100ms` (also `s`) or `never`. What each can
/// lose:
/// - `Always`: nothing acknowledged, on a process crash or a power loss. Group commit shares
///   one flush among every append queued meanwhile.
/// - `Interval(d)`: acknowledged once written; flushed at least every `d`. A crash (of the
///   process, since sled buffers writes in memory, or of the machine) can take back what was
///   acknowledged in the last `d`. Subscribers only see flushed events, so nobody ever sees
///   an event that a crash takes back; those ids are never used again.
/// - `Never`: acknowledged and visible once written; sled writes out in the background
///   (about every 500 ms). A crash can take back events subscribers have already seen;
///   their ids are never used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FsyncPolicy {
    /// Acknowledge after the flush that covers the append.
    #[default]
    Always,
    /// Acknowledge after the write; flush at least this often.
    Interval(std::time::Duration),
    /// Acknowledge after the write; never wait for a flush.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("fsync policy {s:?}: expected always, never or interval=<n>ms|s (e.g. interval=100ms)")
        };
        match s.trim() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let every = other.strip_prefix("interval=").ok_or_else(bad)?;
                let (n, unit) = match every.strip_suffix("ms") {
                    Some(n) => (n, 1u64),
                    None => (every.strip_suffix('s').ok_or_else(bad)?, 1000),
                };
                let ms = n.parse::<u64>().map_err(|_| bad())?.saturating_mul(unit);
                if ms == 0 || ms > 60_000 {
                    return Err(format!(
                        "fsync policy {s:?}: the interval must be 1 ms to 60 s"
                    ));
                }
                Ok(FsyncPolicy::Interval(std::time::Duration::from_millis(ms)))
            }
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "interval={}ms", d.as_millis()),
        }
    }
}

impl TryFrom<String> for FsyncPolicy {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<FsyncPolicy> for String {
    fn from(p: FsyncPolicy) -> String {
        p.to_string()
    }
}

/// What one successful append stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Id of the first event stored; when every event was a duplicate, the smallest
    /// original id.
    pub first: EventId,
    /// Id of the last event stored (`last - first + 1 == count` when `count > 0`); when
    /// every event was a duplicate, the largest original id.
    pub last: EventId,
    /// Number of events stored by this append.
    pub count: u64,
    /// The original ids of the events recognised as repeats of an earlier `(topic, msg_id)`
    /// and not stored again, in the order the append carried them.
    pub duplicate_of: Vec<EventId>,
}

/// One page of a read by cursor.
#[derive(Debug, Default)]
pub struct Page {
    /// Set when the cursor is older than what retention kept of the matching topics:
    /// `events` then start after `gap.oldest - 1`.
    pub gap: Option<Gap>,
    /// Matching events in strictly increasing id order.
    pub events: Vec<SharedEvent>,
    /// Every matching durable event with an id up to `through` is in this page or before
    /// the cursor: the next read continues after `through`.
    pub through: EventId,
    /// Whether the read reached the durable head (nothing more to read right now).
    pub complete: bool,
}

/// The newest retained event of each of a set of topics (see [`EventLog::latest`]).
#[derive(Debug, Default)]
pub struct Latest {
    /// One event per topic, in strictly increasing id order.
    pub events: Vec<SharedEvent>,
    /// Every matching event with an id up to this one is older than an event of its topic in
    /// `events` or newer than none: reading on from `cursor` continues without a gap or a
    /// repeat.
    pub cursor: EventId,
    /// More topics matched than the limit: `events` holds the first `limit` in name order.
    pub truncated: bool,
}

/// Where a start at a point in time begins (see [`EventLog::time_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeStart {
    /// Every matching event with an id above this has `time` at or after the start, and
    /// none at or below it does (apart from what `gap` covers).
    pub cursor: EventId,
    /// Set when the start lies before the oldest retained event and retention removed
    /// events of the matching topics: they may have been at or after the start. `requested`
    /// is 0 (there is no cursor), `oldest` the id after the last removed one.
    pub gap: Option<Gap>,
}

/// Statistics of one topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Oldest retained event id; `None` when retention removed every event.
    pub first_id: Option<u64>,
    /// Newest event id ever stored in the topic.
    pub last_id: u64,
    /// Retained events.
    pub count: u64,
    /// Retained payload bytes; `None` where the log cannot tell (JetStream keeps no
    /// per-subject byte counts).
    pub bytes: Option<u64>,
}

/// The log, as every other part of tidewire sees it.
pub trait EventLog: Send + Sync + 'static {
    /// Stores `events` atomically (all or none) with contiguous ids, and resolves once they
    /// are durable. Events repeating a `(topic, msg_id)` stored within the dedupe window,
    /// or earlier in the same append, are not stored: the result names their original ids. The events are passed to the hub after they are durable, before this
    /// resolves.
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Appended, LogError>>;

    /// Reads at most `limit` durable events matching `patterns` with id greater than `after`,
    /// in id order. Costs in proportion to what it returns and the number of matching topics,
    /// not to the size of the log.
    fn read(
        &self,
        patterns: PatternSet,
        after: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, LogError>>;

    /// The id of the newest durable event (0 when the log has never held one).
    fn head(&self) -> EventId;

    /// The newest retained event of each topic matching `patterns` whose newest event has an
    /// id at most `at_most` (a topic with a newer one is left out: reading on from the
    /// cursor delivers that newer event), for at most `limit` topics in name order. A topic
    /// whose events retention removed has none. Costs one lookup per matching topic, never
    /// the size of the log. `cursor` is `at_most`.
    fn latest(
        &self,
        patterns: PatternSet,
        at_most: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Latest, LogError>> {
        let _ = (patterns, at_most, limit);
        Box::pin(async {
            Err(LogError::Unsupported(
                "this log does not serve start=latest".into(),
            ))
        })
    }

    /// The cursor before the first event whose `time` is at or after `time_ms` (Unix
    /// milliseconds; the head when there is none yet), by binary search over the stored
    /// events: costs the logarithm of the log's size, never a scan of it.
    fn time_start(
        &self,
        patterns: PatternSet,
        time_ms: u64,
    ) -> BoxFuture<'_, Result<TimeStart, LogError>> {
        let _ = (patterns, time_ms);
        Box::pin(async {
            Err(LogError::Unsupported(
                "this log does not serve start_time".into(),
            ))
        })
    }

    /// Statistics of the topics matching `filter` (all when `None`), in name order, at most `limit`.
    fn topics<'a>(
        &'a self,
        filter: Option<&'a Pattern>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<TopicStats>, LogError>>;

    /// Statistics of one topic, `None` when nothing was ever published to it (or, where the
    /// log cannot remember more, when it retains nothing of it).
    fn topic<'a>(&'a self, topic: &'a Topic)
        -> BoxFuture<'a, Result<Option<TopicStats>, LogError>>;

    /// Whether the log can take appends and open subscriptions now (a remote engine may be
    /// unreachable for a while); `Err` says why not ([`LogError::Unavailable`]). A
    /// subscription opened while the log is available misses nothing committed after it.
    fn check_available(&self) -> Result<(), LogError> {
        Ok(())
    }

    /// Whether the server should be in a load balancer's rotation: available, and caught up
    /// with what is stored (`/readyz` answers 503 otherwise).
    fn is_ready(&self) -> bool {
        self.check_available().is_ok()
    }

    /// Finishes every accepted append, flushes, and stops. Later appends fail with `Closed`.
    fn close(&self) -> BoxFuture<'_, Result<(), LogError>>;
}

#[cfg(test)]
mod tests {
    use super::FsyncPolicy;
    use std::time::Duration;

    #[test]
    fn fsync_policies_parse_and_print_back() {
        for (text, policy) in [
            ("always", FsyncPolicy::Always),
            ("never", FsyncPolicy::Never),
            (
                "interval=100ms",
                FsyncPolicy::Interval(Duration::from_millis(100)),
            ),
            ("interval=2s", FsyncPolicy::Interval(Duration::from_secs(2))),
        ] {
            assert_eq!(text.parse::<FsyncPolicy>(), Ok(policy));
            assert_eq!(policy.to_string().parse::<FsyncPolicy>(), Ok(policy));
        }
        for bad in [
            "",
            "sometimes",
            "interval=",
            "interval=0ms",
            "interval=5m",
            "interval=-1s",
            "interval=61s",
        ] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad}");
        }
    }
}
