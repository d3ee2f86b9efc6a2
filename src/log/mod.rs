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
//! - readers, and the hub, only ever see durable events, in id order.

use std::future::Future;
use std::pin::Pin;

use crate::envelope::{EventId, Gap, NewEvent, SharedEvent};
use crate::topic::{Pattern, PatternSet, Topic};

mod blobs;
pub mod record;
mod sled_log;

pub use sled_log::{DedupeOptions, LogOptions, SledLog};

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
    /// A stored record could not be decoded.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// The data directory cannot be used (foreign content, wrong format, cannot open).
    #[error("cannot open the data directory: {0}")]
    Open(String),
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
    /// Retained payload bytes.
    pub bytes: u64,
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

    /// Statistics of the topics matching `filter` (all when `None`), in name order, at most `limit`.
    fn topics(&self, filter: Option<&Pattern>, limit: usize) -> Vec<TopicStats>;

    /// Statistics of one topic, `None` when nothing was ever published to it.
    fn topic(&self, topic: &Topic) -> Option<TopicStats>;

    /// Finishes every accepted append, flushes, and stops. Later appends fail with `Closed`.
    fn close(&self) -> BoxFuture<'_, Result<(), LogError>>;
}
