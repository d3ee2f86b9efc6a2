//! The hub: fans committed events out to live subscribers.
//!
//! The log hands the hub every committed batch, in id order, after it is durable; the hub
//! never sees anything a crash could take back. Each subscriber reads the shared ring at its
//! own pace. The ring is bounded: a subscriber that falls more than its capacity behind is
//! told it lagged (and how far), and goes back to the log from its cursor — so a slow
//! subscriber never costs memory beyond the ring, never slows publishers, and is never
//! disconnected for being slow. See [`Subscription`](crate::subscription::Subscription).

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::envelope::SharedEvent;

/// A batch of committed events in strictly increasing id order, shared by every subscriber.
pub type CommittedBatch = Arc<[SharedEvent]>;

/// Live fan-out of committed events. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<CommittedBatch>,
}

impl Hub {
    /// A hub whose ring holds the last `capacity` committed batches.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Hub { tx }
    }

    /// Hands a committed batch to every live subscriber. Never waits on subscribers.
    /// Must be called in id order, with durable events only (the log's writer does).
    pub fn publish(&self, batch: CommittedBatch) {
        // No receiver is not an error: nobody is listening right now.
        let _ = self.tx.send(batch);
    }

    /// Registers a subscriber: every batch published from now on reaches it, or it learns
    /// that it lagged.
    pub fn subscribe(&self) -> broadcast::Receiver<CommittedBatch> {
        self.tx.subscribe()
    }

    /// Number of registered subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}
