//! A subscription: history from a cursor, then live, with no gap and no duplicate at the seam.
//!
//! Every streaming transport delivers what a [`Subscription`] yields. The seam works like this:
//! 1. register with the hub first, so nothing committed from then on can be missed;
//! 2. read the log from the cursor, page by page, up to the durable head;
//! 3. take live batches from the hub, dropping every event with an id at or below the last
//!    one delivered.
//!
//! When the subscriber falls further behind than the hub's ring (a slow reader), it goes back
//! to step 2 from its last delivered id. The cursor is the only state; duplicates are removed
//! by id comparison. Memory per subscription is bounded by one log page (a `start=latest`
//! snapshot: by one event per matching topic, at most [`LATEST_MAX_TOPICS`]).
//!
//! The two other starts reuse the same seam ([`Start`]):
//! - **latest**: after registering, the head `H` is read; the snapshot is the newest event of
//!   each matching topic whose newest event is at or below `H`, in id order, and delivery
//!   continues from cursor `H` exactly as a resume from `H` would. A topic with an event
//!   above `H` is not in the snapshot: that event is newer, and comes from the log or live
//!   right after. So nothing committed after the snapshot is missed, and nothing is repeated.
//! - **time**: the log finds the cursor before the first event at or after the time (times
//!   are non-decreasing in id order), and delivery is a resume from that cursor.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::envelope::{EventId, Gap, SharedEvent};
use crate::hub::{CommittedBatch, Hub, Registration};
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;
use crate::topic::PatternSet;

/// Most topics a `start=latest` snapshot covers (the first in name order); a client that
/// needs more narrows its patterns or pages through `GET /v1/latest`.
pub const LATEST_MAX_TOPICS: usize = 10_000;

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Live events only.
    Live,
    /// Every retained matching event after this cursor, then live.
    After(EventId),
    /// The newest retained event of each matching topic, then live.
    Latest,
    /// Every retained matching event whose `time` is at or after this (Unix ms), then live.
    Time(u64),
}

/// A start not yet resolved against the log (it needs a read; `open` does not wait).
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// The snapshot as of this head.
    Latest(EventId),
    Time(u64),
}

/// What a subscription yields next.
#[derive(Debug)]
pub enum Delivery {
    /// Retention dropped events the client never saw; delivery continues from `oldest`.
    Gap(Gap),
    /// The next event, in strictly increasing id order.
    Event(SharedEvent),
}

/// Why a subscription cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Reading history failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The hub is gone (the server is shutting down).
    #[error("the server is shutting down")]
    Closed,
}

/// One client's view of the stream. See the module docs for the guarantees.
pub struct Subscription {
    log: Arc<dyn EventLog>,
    patterns: PatternSet,
    hub: Registration,
    /// Every matching event with an id up to this one has been handed out or queued in
    /// `backlog` (or was before the cursor).
    last: EventId,
    replaying: bool,
    backlog: VecDeque<Delivery>,
    page_size: usize,
    metrics: Metrics,
    /// A start that reads the log before the first delivery.
    pending: Option<Pending>,
    /// Events of a `start=latest` snapshot not yet handed out (their ids are at most
    /// `last`, which is the snapshot's head).
    snapshot: VecDeque<SharedEvent>,
    /// Events dated before this (Unix ms) are not delivered (a time start in the future).
    not_before: u64,
}

impl Subscription {
    /// Opens a subscription to `patterns`. With `cursor` it first delivers every retained
    /// matching event with a greater id; without, it delivers live events only.
    pub fn open(
        log: Arc<dyn EventLog>,
        hub: &Hub,
        patterns: PatternSet,
        cursor: Option<EventId>,
        page_size: usize,
        metrics: Metrics,
    ) -> Self {
        let start = cursor.map_or(Start::Live, Start::After);
        Self::open_at(log, hub, patterns, start, page_size, metrics)
    }

    /// Opens a subscription to `patterns` that starts at `start` (see [`Start`] and the
    /// module docs for the seam). A start that needs the log reads it on the first delivery.
    pub fn open_at(
        log: Arc<dyn EventLog>,
        hub: &Hub,
        patterns: PatternSet,
        start: Start,
        page_size: usize,
        metrics: Metrics,
    ) -> Self {
        // Register before looking at the head: nothing committed after this can be missed.
        let registration = hub.subscribe(&patterns);
        let head = log.head();
        let (last, replaying, pending) = match start {
            // The log makes an event readable and moves its head before the hub sees it, so
            // every id above a head read after registering arrives live: a cursor at or past
            // the head (a poll or a reconnect that is caught up) has no history to read.
            Start::After(c) => (c, c < head, None),
            Start::Live => (head, false, None),
            Start::Latest => (head, false, Some(Pending::Latest(head))),
            Start::Time(t) => (head, false, Some(Pending::Time(t))),
        };
        Subscription {
            log,
            patterns,
            hub: registration,
            last,
            replaying,
            backlog: VecDeque::new(),
            page_size: page_size.max(1),
            metrics,
            pending,
            snapshot: VecDeque::new(),
            not_before: match start {
                Start::Time(t) => t,
                _ => 0,
            },
        }
    }

    /// Resolves a start that needs the log: the snapshot of a `start=latest`, the cursor of
    /// a time start. Runs once, before the first delivery.
    async fn resolve(&mut self) -> Result<(), SubscriptionError> {
        match self.pending {
            None => {}
            Some(Pending::Latest(head)) => {
                let latest = self
                    .log
                    .latest(self.patterns.clone(), head, LATEST_MAX_TOPICS)
                    .await?;
                self.snapshot = latest.events.into();
                // Continue from the snapshot's head: `last` is that head already.
                self.last = latest.cursor;
            }
            Some(Pending::Time(t)) => {
                let start = self.log.time_start(self.patterns.clone(), t).await?;
                if let Some(gap) = start.gap {
                    self.backlog.push_back(Delivery::Gap(gap));
                }
                if start.cursor < self.last {
                    // History to read first; live batches already received are dropped by
                    // id and read again from the log in order.
                    self.last = start.cursor;
                    self.replaying = true;
                }
            }
        }
        self.pending = None;
        Ok(())
    }

    /// Reads what the start needs from the log now (a snapshot, a time's cursor), so a
    /// transport can refuse the request with the log's error before it answers. Optional:
    /// the first delivery does it otherwise.
    pub async fn prepare(&mut self) -> Result<(), SubscriptionError> {
        self.resolve().await
    }

    /// Whether the start still has to read the log (see [`Subscription::prepare`]).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Moves the next part of a `start=latest` snapshot into the backlog.
    fn snapshot_page(&mut self) {
        let n = self.page_size.min(self.snapshot.len());
        self.backlog
            .extend(self.snapshot.drain(..n).map(Delivery::Event));
    }

    /// The next delivery if one is ready without waiting or reading the log, so a transport
    /// can coalesce a burst into one write.
    pub fn next_ready(&mut self) -> Option<Delivery> {
        if self.pending.is_some() {
            return None;
        }
        if self.backlog.is_empty() && !self.snapshot.is_empty() {
            self.snapshot_page();
        }
        if self.backlog.is_empty() && !self.replaying && self.snapshot.is_empty() {
            match self.hub.live.try_recv() {
                Ok(batch) => self.take_live(&batch),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.metrics.observe_lag();
                    self.replaying = true;
                }
                Err(_) => {}
            }
        }
        self.backlog.pop_front()
    }

    fn take_live(&mut self, batch: &CommittedBatch) {
        for ev in batch.iter() {
            if ev.id > self.last && ev.time >= self.not_before && self.patterns.matches(ev.topic())
            {
                self.backlog.push_back(Delivery::Event(ev.clone()));
            }
        }
        if let Some(ev) = batch.last() {
            self.last = self.last.max(ev.id);
        }
    }

    /// Reads the next page of history into the backlog.
    async fn replay_page(&mut self) -> Result<(), SubscriptionError> {
        let page = self
            .log
            .read(self.patterns.clone(), self.last, self.page_size)
            .await?;
        if let Some(gap) = page.gap {
            self.backlog.push_back(Delivery::Gap(gap));
        }
        self.last = self.last.max(page.through);
        if page.complete {
            self.replaying = false;
        }
        let not_before = self.not_before;
        self.backlog.extend(
            page.events
                .into_iter()
                .filter(|e| e.time >= not_before)
                .map(Delivery::Event),
        );
        Ok(())
    }

    /// The next delivery that is available now: queued, already committed live, or in the
    /// log's history, without waiting for new events. `None` when caught up.
    pub async fn next_available(&mut self) -> Result<Option<Delivery>, SubscriptionError> {
        self.resolve().await?;
        loop {
            if let Some(d) = self.next_ready() {
                return Ok(Some(d));
            }
            if !self.replaying {
                return Ok(None);
            }
            self.replay_page().await?;
        }
    }

    /// The cursor that resumes right after what has been handed out: every matching event
    /// up to it has been delivered, so a client that reconnects from it misses nothing and
    /// sees nothing twice.
    pub fn resume_cursor(&self) -> EventId {
        match self.backlog.front() {
            // Within a snapshot: every event after the cursor is read again, which includes
            // the rest of the snapshot (their topics' newest events) and nothing delivered.
            None => match self.snapshot.front() {
                Some(e) => EventId(e.id.0 - 1),
                None => self.last,
            },
            // Nothing matching lies between what was handed out and this event.
            Some(Delivery::Event(e)) => EventId(e.id.0 - 1),
            Some(Delivery::Gap(g)) => EventId(g.requested),
        }
    }

    /// Waits for the next delivery. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Delivery, SubscriptionError> {
        self.resolve().await?;
        loop {
            if let Some(d) = self.backlog.pop_front() {
                return Ok(d);
            }
            if !self.snapshot.is_empty() {
                self.snapshot_page();
                continue;
            }
            if self.replaying {
                self.replay_page().await?;
                continue;
            }
            // Batches that concern this subscription wake it; others wait in the ring and
            // are skipped over when it next reads (or, past the ring, by reading the log).
            match self.hub.live.try_recv() {
                Ok(batch) => self.take_live(&batch),
                Err(broadcast::error::TryRecvError::Empty) => self.hub.woken().await,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.metrics.observe_lag();
                    self.replaying = true;
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Err(SubscriptionError::Closed)
                }
            }
        }
    }
}
