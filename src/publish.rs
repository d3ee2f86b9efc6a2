//! The publish path: validated events from any transport go through here to the log.
//!
//! Transports decode and validate; this path stores and measures. It answers only after
//! the log says the events are durable, so a receipt always means "stored".

use std::sync::Arc;
use std::time::Instant;

use crate::envelope::{NewEvent, PublishReceipt};
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;

/// Stores validated events and produces the receipt the publisher gets back.
#[derive(Clone)]
pub struct Publisher {
    log: Arc<dyn EventLog>,
    metrics: Metrics,
}

impl Publisher {
    /// A publisher writing to `log`.
    pub fn new(log: Arc<dyn EventLog>, metrics: Metrics) -> Self {
        Publisher { log, metrics }
    }

    /// Stores `events` as one atomic batch with contiguous ids. Resolves once they are
    /// durable; on error nothing of the batch was acknowledged. Repeats of a `(topic, msg_id)`
    /// within the dedupe window are not stored; the receipt names their original ids.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<PublishReceipt, LogError> {
        let started = Instant::now();
        let bytes: u64 = events.iter().map(|e| e.data.len() as u64).sum();
        let appended = self.log.append(events).await?;
        self.metrics
            .observe_publish(appended.count, bytes, started.elapsed());
        Ok(PublishReceipt {
            first_id: appended.first.0,
            last_id: appended.last.0,
            count: appended.count,
            duplicates: appended.duplicate_of.len() as u64,
            duplicate_of: appended.duplicate_of.iter().map(|id| id.0).collect(),
        })
    }
}
