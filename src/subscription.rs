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
//! by id comparison. Memory per subscription is bounded by one log page.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::envelope::{EventId, Gap, SharedEvent};
use crate::hub::{CommittedBatch, Hub, Registration};
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;
use crate::topic::PatternSet;

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
        // Register before looking at the head: nothing committed after this can be missed.
        let registration = hub.subscribe(&patterns);
        let head = log.head();
        let (last, replaying) = match cursor {
            // The log makes an event readable and moves its head before the hub sees it, so
            // every id above a head read after registering arrives live: a cursor at or past
            // the head (a poll or a reconnect that is caught up) has no history to read.
            Some(c) => (c, c < head),
            None => (head, false),
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
        }
    }

    /// The next delivery if one is ready without waiting or reading the log, so a transport
    /// can coalesce a burst into one write.
    pub fn next_ready(&mut self) -> Option<Delivery> {
        if self.backlog.is_empty() && !self.replaying {
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
            if ev.id > self.last && self.patterns.matches(ev.topic()) {
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
        self.backlog
            .extend(page.events.into_iter().map(Delivery::Event));
        Ok(())
    }

    /// The next delivery that is available now: queued, already committed live, or in the
    /// log's history, without waiting for new events. `None` when caught up.
    pub async fn next_available(&mut self) -> Result<Option<Delivery>, SubscriptionError> {
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
            None => self.last,
            // Nothing matching lies between what was handed out and this event.
            Some(Delivery::Event(e)) => EventId(e.id.0 - 1),
            Some(Delivery::Gap(g)) => EventId(g.requested),
        }
    }

    /// Waits for the next delivery. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Delivery, SubscriptionError> {
        loop {
            if let Some(d) = self.backlog.pop_front() {
                return Ok(d);
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
