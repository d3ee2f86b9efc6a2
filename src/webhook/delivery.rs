//! One webhook's delivery task: the only writer of its delivery state, so every step is
//! recorded in order. The loop:
//! 1. with no batch in flight, wait for matching events (a [`Subscription`] from the cursor:
//!    history, then live, with the gap signal) and cut a batch (`batch_max_events`,
//!    `batch_max_bytes`, or a gap, which always opens a batch);
//! 2. record the batch (body and `webhook-id`) durably, before its first attempt;
//! 3. resolve the destination and check the allow-list, then call; on a 2xx the cursor moves
//!    to the batch's last id and is recorded (with the next batch, when one is ready, in the
//!    same write); on a failure wait as [`super::backoff`] says and send the same batch again.
//!
//! Commands (update, delete, stop) are taken while waiting for events, while calling and
//! while backing off; a call cut short by one counts as not delivered (the batch goes again,
//! whole, with its `webhook-id`: a receiver may see a batch twice, never a partial one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::allow;
use super::sender::{self, Connection, Outcome, Retry};
use super::spec::Spec;
use super::store::{InFlight, State, StoreError};
use super::Context;
use crate::envelope::{EventId, Gap, SharedEvent};
use crate::subscription::{Delivery, Subscription};

/// How long a task waits before trying again a step that failed on our side (the store, the
/// log).
const LOCAL_RETRY: Duration = Duration::from_secs(1);

/// What the manager asks of a task.
pub(super) enum Command {
    /// Use this definition from now on. An `epoch` above the state's drops the batch in
    /// flight and moves the cursor to `since` (when given).
    Update {
        spec: Box<Spec>,
        epoch: u64,
        since: Option<u64>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// End (the server is stopping, the webhook was deleted or another server delivers it
    /// now); the state stays as it is.
    Stop,
}

/// What `GET /v1/webhooks/{name}` shows, as the task last left it.
#[derive(Debug, Clone)]
pub struct Status {
    /// The definition in force.
    pub spec: Spec,
    /// The delivery state as last changed (stored, or about to be).
    pub state: State,
}

/// A batch cut from the subscription.
struct Batch {
    in_flight: InFlight,
    /// The events' times, for the delivery-latency histogram.
    times: Vec<u64>,
}

pub(super) struct Task {
    ctx: Arc<Context>,
    spec: Spec,
    state: State,
    /// Whether `state` is stored as it is in memory.
    saved: bool,
    /// Until when (Unix ms) this server may call the webhook: its claim, renewed by the
    /// manager (forever for a store used by one server only).
    lease_until: Arc<AtomicU64>,
    status: Arc<Mutex<Status>>,
    sub: Option<Subscription>,
    /// A delivery read from the subscription that did not fit the batch it was read for.
    pending: Option<Delivery>,
    conn: Option<Connection>,
    /// Times of the events of the batch in flight (empty for a batch recovered from disk).
    times: Vec<u64>,
}

impl Task {
    pub(super) fn new(
        ctx: Arc<Context>,
        spec: Spec,
        state: State,
        status: Arc<Mutex<Status>>,
        lease_until: Arc<AtomicU64>,
    ) -> Task {
        Task {
            ctx,
            spec,
            state,
            saved: true,
            lease_until,
            status,
            sub: None,
            pending: None,
            conn: None,
            times: Vec::new(),
        }
    }

    /// Runs until deleted or stopped.
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            self.publish_status();
            if !self.spec.enabled || self.state.disabled.is_some() {
                self.set_lag(0);
                let cmd = commands.recv().await;
                if !self.handle(cmd).await {
                    return;
                }
                continue;
            }
            if !self.saved {
                if let Err(e) = self.save().await {
                    tracing::warn!(webhook = self.spec.name.as_str(), error = %e, "cannot record the webhook's state; trying again");
                    if !self.pause(&mut commands, LOCAL_RETRY).await {
                        return;
                    }
                    continue;
                }
            }
            if self.state.in_flight.is_none() {
                let first = match self.pending.take() {
                    Some(d) => Ok(d),
                    None => {
                        self.set_lag(0);
                        tokio::select! {
                            // Cancel-safe: a command taken here loses no delivery.
                            d = self.subscription().next() => d,
                            cmd = commands.recv() => {
                                if !self.handle(cmd).await {
                                    return;
                                }
                                continue;
                            }
                        }
                    }
                };
                let batch = match first {
                    Ok(first) => self.cut(first).await,
                    Err(e) => Err(e),
                };
                match batch {
                    Ok(batch) => {
                        self.state.in_flight = Some(batch.in_flight);
                        self.times = batch.times;
                        self.state.progress.attempts = 0;
                        self.saved = false;
                        // Recorded before its first attempt (next turn of the loop).
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(webhook = self.spec.name.as_str(), error = %e, "reading the log for a webhook failed; trying again");
                        self.sub = None;
                        self.pending = None;
                        if !self.pause(&mut commands, LOCAL_RETRY).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(batch) = self.state.in_flight.clone() else {
                continue;
            };
            self.set_lag(self.ctx.log.head().0.saturating_sub(self.state.cursor));
            if now_ms() >= self.lease_until.load(Ordering::Acquire) {
                // Not ours to call now (the claim lapsed; the manager renews or stops us).
                if !self.pause(&mut commands, Duration::from_millis(200)).await {
                    return;
                }
                continue;
            }
            let outcome = tokio::select! {
                o = attempt(&self.ctx, &mut self.conn, &self.spec, &batch) => o,
                cmd = commands.recv() => {
                    // The call is abandoned: not delivered, so the batch goes again.
                    self.conn = None;
                    if !self.handle(cmd).await {
                        return;
                    }
                    continue;
                }
            };
            let wait = self.settle(&batch, outcome).await;
            if let Some(wait) = wait {
                self.publish_status();
                if !self.pause(&mut commands, wait).await {
                    return;
                }
            }
        }
    }

    /// Waits `wait`, or until a command comes (applied); `false` when the task should end.
    async fn pause(&mut self, commands: &mut mpsc::Receiver<Command>, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            cmd = commands.recv() => self.handle(cmd).await,
        }
    }

    /// Applies a call's outcome to the state; how long to wait before the next attempt, if
    /// it failed.
    async fn settle(&mut self, batch: &InFlight, outcome: Outcome) -> Option<Duration> {
        let ctx = self.ctx.clone();
        let m = &ctx.metrics;
        let name = self.spec.name.as_str().to_owned();
        let name = name.as_str();
        match outcome {
            Outcome::Delivered => {
                let now = now_ms();
                for t in self.times.drain(..) {
                    m.observe_webhook_latency(Duration::from_millis(now.saturating_sub(t)));
                }
                m.observe_webhook_delivered(name, batch.events);
                let p = &mut self.state.progress;
                p.delivered_events += batch.events;
                p.delivered_batches += 1;
                p.last_success_at = Some(now);
                p.attempts = 0;
                p.next_attempt_at = None;
                self.state.cursor = batch.last_id;
                self.state.in_flight = None;
                // The next batch, when it is ready now, is recorded in the same write.
                if let Some(next) = self.cut_ready().await {
                    self.state.in_flight = Some(next.in_flight);
                    self.times = next.times;
                }
                self.saved = false;
                if let Err(e) = self.save().await {
                    tracing::warn!(webhook = name, error = %e, "cannot record the webhook's cursor; trying again");
                }
                None
            }
            Outcome::Gone => {
                m.observe_webhook_failure(name, "status_410");
                let why = "the receiver answered 410 Gone: delivery is disabled until the \
                           webhook is put again";
                tracing::warn!(webhook = name, "{why}");
                self.state.disabled = Some(why.into());
                self.note_error("410 Gone".into());
                self.saved = false;
                if let Err(e) = self.save().await {
                    tracing::warn!(webhook = name, error = %e, "cannot record that the webhook is disabled");
                }
                None
            }
            Outcome::Failed {
                reason,
                retry,
                message,
            } => {
                m.observe_webhook_failure(name, reason);
                let p = &mut self.state.progress;
                p.attempts = p.attempts.saturating_add(1);
                let attempts = u32::try_from(p.attempts).unwrap_or(u32::MAX);
                let backoff = self.ctx.backoff;
                let wait = match retry {
                    Retry::Backoff => backoff.delay(attempts, fastrand::f64()),
                    Retry::After(d) => d,
                    Retry::Slowly => backoff.max,
                };
                p.next_attempt_at = Some(now_ms() + wait.as_millis() as u64);
                self.note_error(message.clone());
                tracing::debug!(webhook = name, attempts, reason, %message, wait_ms = wait.as_millis() as u64, "webhook call failed");
                // Best effort, for a person reading the state (from any server); the batch
                // and the cursor are unchanged.
                self.saved = false;
                let _ = self.save().await;
                Some(wait)
            }
        }
    }

    fn note_error(&mut self, message: String) {
        self.state.progress.last_error = Some(message);
        self.state.progress.last_error_at = Some(now_ms());
    }

    /// Applies `cmd`; `false` when the task should end.
    async fn handle(&mut self, cmd: Option<Command>) -> bool {
        match cmd {
            None | Some(Command::Stop) => false,
            Some(Command::Update {
                spec,
                epoch,
                since,
                reply,
            }) => {
                self.spec = *spec;
                if apply_epoch(&mut self.state, epoch, since) {
                    // Another destination, other events or another cursor: the batch in
                    // flight belonged to the old definition.
                    self.sub = None;
                    self.pending = None;
                    self.times.clear();
                    self.conn = None;
                }
                // A put resumes a webhook the receiver disabled, and starts its retries
                // afresh.
                self.state.disabled = None;
                self.state.progress.attempts = 0;
                self.state.progress.next_attempt_at = None;
                self.saved = false;
                // A failed write is tried again by the loop; the definition is in force.
                let _ = reply.send(self.save().await);
                true
            }
        }
    }

    async fn save(&mut self) -> Result<(), StoreError> {
        self.ctx
            .store
            .save_state(self.spec.name.as_str(), &self.state)
            .await?;
        self.saved = true;
        Ok(())
    }

    fn subscription(&mut self) -> &mut Subscription {
        let ctx = &self.ctx;
        let from = self
            .state
            .in_flight
            .as_ref()
            .map_or(self.state.cursor, |b| b.last_id);
        self.sub.get_or_insert_with(|| {
            Subscription::open(
                ctx.log.clone(),
                &ctx.hub,
                self.spec.topics.clone(),
                Some(EventId(from)),
                ctx.page_size,
                ctx.metrics.clone(),
            )
        })
    }

    /// A batch starting with `first`, filled with what is available now.
    async fn cut(
        &mut self,
        first: Delivery,
    ) -> Result<Batch, crate::subscription::SubscriptionError> {
        let mut b = Builder::new(&self.spec, self.ctx.store.max_batch_bytes());
        b.push(first);
        while !b.full() {
            let next = match self.pending.take() {
                Some(d) => Some(d),
                None => self.subscription().next_available().await?,
            };
            let Some(d) = next else { break };
            if let Some(back) = b.try_push(d) {
                self.pending = Some(back);
                break;
            }
        }
        Ok(b.finish())
    }

    /// The next batch if events are available now (without waiting for new ones).
    async fn cut_ready(&mut self) -> Option<Batch> {
        let first = match self.pending.take() {
            Some(d) => d,
            None => self.sub.as_mut()?.next_available().await.ok()??,
        };
        self.cut(first).await.ok()
    }

    fn set_lag(&self, lag: u64) {
        self.ctx
            .metrics
            .set_webhook_lag(self.spec.name.as_str(), lag);
    }

    fn publish_status(&self) {
        if let Ok(mut s) = self.status.lock() {
            s.spec = self.spec.clone();
            s.state = self.state.clone();
        }
    }
}

/// Brings `state` to definition `epoch`: when it is newer, the batch in flight is dropped
/// and the cursor moves to `since` (when given). Whether it was newer.
pub(super) fn apply_epoch(state: &mut State, epoch: u64, since: Option<u64>) -> bool {
    if epoch <= state.epoch {
        return false;
    }
    state.epoch = epoch;
    state.in_flight = None;
    if let Some(c) = since {
        state.cursor = c;
    }
    true
}

/// One attempt of `batch`: resolve and check the destination, then call.
async fn attempt(
    ctx: &Context,
    conn: &mut Option<Connection>,
    spec: &Spec,
    batch: &InFlight,
) -> Outcome {
    let addr = match allow::resolve(&ctx.allow, &spec.target.dest).await {
        Ok(addr) => addr,
        Err(refusal) => {
            return Outcome::Failed {
                reason: "destination_not_allowed",
                retry: Retry::Slowly,
                message: refusal.to_string(),
            }
        }
    };
    let started = Instant::now();
    let outcome = sender::send(
        &ctx.connector,
        conn,
        addr,
        spec,
        &batch.webhook_id,
        Bytes::copy_from_slice(batch.body.get().as_bytes()),
    )
    .await;
    tracing::trace!(
        webhook = spec.name.as_str(),
        ms = started.elapsed().as_millis() as u64,
        ?outcome,
        "webhook call"
    );
    outcome
}

/// Cuts one batch: a gap (only first), then events in id order, within the webhook's
/// limits; a single event larger than `batch_max_bytes` goes alone.
struct Builder {
    max_events: usize,
    max_bytes: usize,
    gap: Option<Gap>,
    events: Vec<SharedEvent>,
    bytes: usize,
}

/// Bytes of the body around the events: `{"events":[]}` and a gap member.
const BODY_OVERHEAD: usize = 96;

impl Builder {
    fn new(spec: &Spec, store_max: Option<usize>) -> Builder {
        Builder {
            max_events: spec.batch_max_events,
            max_bytes: store_max.map_or(spec.batch_max_bytes, |m| m.min(spec.batch_max_bytes)),
            gap: None,
            events: Vec::new(),
            bytes: BODY_OVERHEAD,
        }
    }

    fn full(&self) -> bool {
        self.events.len() >= self.max_events || self.bytes >= self.max_bytes
    }

    /// Adds the first delivery of the batch.
    fn push(&mut self, d: Delivery) {
        match d {
            Delivery::Gap(g) => self.gap = Some(g),
            Delivery::Event(e) => {
                self.bytes += e.json().len() + 1;
                self.events.push(e);
            }
        }
    }

    /// Adds `d` when it fits; gives it back otherwise.
    fn try_push(&mut self, d: Delivery) -> Option<Delivery> {
        match d {
            // A gap opens a batch of its own.
            Delivery::Gap(_) if self.gap.is_some() || !self.events.is_empty() => Some(d),
            Delivery::Event(ref e)
                if !self.events.is_empty()
                    && (self.events.len() >= self.max_events
                        || self.bytes + e.json().len() + 1 > self.max_bytes) =>
            {
                Some(d)
            }
            d => {
                self.push(d);
                None
            }
        }
    }

    fn finish(self) -> Batch {
        let mut body = Vec::with_capacity(self.bytes);
        body.extend_from_slice(b"{\"events\":[");
        for (i, e) in self.events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e.json());
        }
        body.push(b']');
        if let Some(g) = self.gap {
            body.extend_from_slice(
                format!(
                    ",\"gap\":{{\"requested\":{},\"oldest\":{}}}",
                    g.requested, g.oldest
                )
                .as_bytes(),
            );
        }
        body.push(b'}');
        let gap_last = self.gap.map_or(0, |g| g.oldest.saturating_sub(1));
        let first_id = self.events.first().map_or(gap_last, |e| e.id.0);
        let last_id = self
            .events
            .last()
            .map_or(gap_last, |e| e.id.0)
            .max(gap_last);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Batch {
            in_flight: InFlight {
                webhook_id: format!("msg_{first_id}-{last_id}_{nanos:x}"),
                first_id,
                last_id,
                events: self.events.len() as u64,
                body: raw_json(body),
            },
            times: self.events.iter().map(|e| e.time).collect(),
        }
    }
}

/// The body as a raw JSON value (it is JSON: envelopes the log rendered, in an object).
fn raw_json(body: Vec<u8>) -> Box<serde_json::value::RawValue> {
    let text = String::from_utf8(body)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    serde_json::value::RawValue::from_string(text).unwrap_or_else(|_| {
        serde_json::value::RawValue::from_string("{\"events\":[]}".into()).expect("valid JSON")
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
