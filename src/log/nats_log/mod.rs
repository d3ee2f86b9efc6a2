//! The log on NATS JetStream: stateless gateways over one replicated stream.
//!
//! Each event is one message of the stream, on its topic's subject (see [`subject`]); its id
//! is the stream sequence, which JetStream assigns in one order for every gateway. What each
//! guarantee of [`EventLog`] rests on here:
//! - **ids**: the stream sequence; a publish batch is one JetStream atomic batch, so its ids
//!   are contiguous and it is stored whole or not at all;
//! - **ack**: `append` resolves after JetStream's acknowledgement (the stream's replicas hold
//!   the events; on disk as soon as the servers run with `sync_interval: always`), and after
//!   this gateway's own subscribers have been handed the events (waited for at most
//!   `nats_timeout_ms`: the ack stands either way, the events being stored);
//! - **dedupe**: JetStream's `Nats-Msg-Id` window (per stream, so the id names the topic),
//!   which every gateway shares;
//! - **hub**: each gateway follows the stream in sequence order with an ephemeral consumer
//!   whose delivery sequence it checks (a gap or a repeat, or a consumer lost with its node,
//!   makes it follow again from after its head) and feeds its own hub; its head is the last
//!   sequence it handed over, and reads by cursor
//!   (batched direct gets, checked against the stream leader when a replica may lag) are
//!   complete up to that head and stop there;
//! - **time**: an event's `time` is JetStream's timestamp of its message, which the stream
//!   leader takes as it assigns the sequence, so it follows the stream's order whichever
//!   gateway published (the gateways' own clocks play no part); a time start is JetStream's
//!   own lookup by time over those timestamps (see [`read::time_start`]). It holds as long as
//!   the leader's clock does not step back (or leadership does not move to a node whose clock
//!   is behind): the follower warns when it sees a timestamp below an earlier one.
//!
//! The gateway starts even when NATS is unreachable: it then answers 503 (`/readyz`,
//! publishes with `Retry-After`) until it is connected, has checked its stream and follows it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{watch, Semaphore};

use super::retention::RetentionPolicy;
use super::{Appended, BoxFuture, EventLog, Latest, LogError, Page, TimeStart, TopicStats};
use crate::envelope::{EventId, NewEvent, SharedEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::topic::{Pattern, PatternSet, Topic};

mod api;
mod append;
mod read;
pub mod stream;
pub mod subject;
pub mod wire;

use stream::Wanted;

/// Most atomic batches one gateway has in flight at once (JetStream allows 50 per stream).
const BATCHES_IN_FLIGHT: usize = 16;
/// Combined batches one gateway sends at once (each holds every append queued meanwhile).
const COMMITTERS: usize = 8;
/// Most events the follower hands the hub as one batch.
const FOLLOW_BATCH: usize = 1024;
/// A gateway further behind its stream than this many events is not ready.
const READY_LAG: u64 = 1000;
/// Heartbeat the follower's consumer sends while idle; two missed ones (the node holding the
/// consumer died) make the gateway follow again through a new consumer.
const FOLLOW_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long one pull request of the follower stays open.
const FOLLOW_EXPIRES: Duration = Duration::from_secs(10);
/// A follower consumer nobody pulls from any more (its gateway died) is removed after this.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);
/// How often a gateway looks at its stream's state (lag, readiness).
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// How to reach the stream, and what it must be like.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// NATS server URLs; any reachable one is enough.
    pub urls: Vec<String>,
    /// Stream name.
    pub stream: String,
    /// Subject prefix of the stream's events.
    pub prefix: String,
    /// Replicas when a gateway creates the stream.
    pub replicas: usize,
    /// Credentials file (`.creds`).
    pub creds_file: Option<std::path::PathBuf>,
    /// File holding an nkey seed.
    pub nkey_file: Option<std::path::PathBuf>,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// CA certificate for TLS (TLS is then required).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Most events in one atomic batch.
    pub max_batch: usize,
    /// How long one request to JetStream may take.
    pub timeout: Duration,
    /// The `(topic, msg_id)` dedupe window.
    pub dedupe_window: Duration,
    /// The retention policy (mapped onto the stream's limits).
    pub retention: RetentionPolicy,
}

/// The log on a JetStream stream. See the module docs for its guarantees.
pub struct NatsLog {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsOptions,
    wanted: Wanted,
    hub: Hub,
    metrics: Metrics,
    /// The last sequence handed to the hub; every event up to it is readable. Appends wait
    /// on it for this gateway's subscribers to have their events.
    head_tx: watch::Sender<u64>,
    /// Set while the follower runs on a checked stream.
    following: AtomicBool,
    /// The stream's last sequence, as last seen (acks and the watcher).
    stream_last: AtomicU64,
    /// The newest `time` the follower handed over (to notice a timestamp going back).
    followed_time: AtomicU64,
    /// Whether the last message followed was dated before an earlier one (one warning per
    /// stretch of such messages, not one per message).
    time_behind: AtomicBool,
    /// Why the stream cannot be served, once a check found it so (the gateway stays unready).
    refused: Mutex<Option<String>>,
    closed: watch::Sender<bool>,
    batches: Semaphore,
    /// Appends waiting to go out together (see [`append::commit_groups`]).
    queue: Mutex<std::collections::VecDeque<append::Pending>>,
    queued: tokio::sync::Notify,
}

impl NatsLog {
    /// The gateway's NATS connection.
    pub fn client(&self) -> async_nats::Client {
        self.inner.client.clone()
    }

    /// The JetStream context of the gateway's connection (the webhooks keep their shared
    /// state in KV buckets beside the stream).
    pub fn jetstream(&self) -> jetstream::Context {
        self.inner.js.clone()
    }

    /// Connects and starts following the stream. When NATS answers within the first
    /// `timeout`, the stream is created or checked before this returns (an existing stream
    /// tidewire cannot serve is an error that says why); when it does not, this returns at
    /// once and the gateway keeps trying in the background, unready meanwhile.
    pub async fn open(
        opts: NatsOptions,
        hub: Hub,
        metrics: Metrics,
    ) -> Result<Arc<Self>, LogError> {
        let wanted = Wanted::new(
            &opts.stream,
            &opts.prefix,
            opts.replicas,
            opts.dedupe_window,
            &opts.retention,
        )
        .map_err(LogError::Config)?;
        let client = connect(&opts, &metrics).await?;
        let js = jetstream::new(client.clone());
        let (head_tx, _) = watch::channel(0);
        let (closed, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            client,
            js,
            opts,
            wanted,
            hub,
            metrics,
            head_tx,
            following: AtomicBool::new(false),
            stream_last: AtomicU64::new(0),
            followed_time: AtomicU64::new(0),
            time_behind: AtomicBool::new(false),
            refused: Mutex::new(None),
            closed,
            batches: Semaphore::new(BATCHES_IN_FLIGHT),
            queue: Mutex::new(std::collections::VecDeque::new()),
            queued: tokio::sync::Notify::new(),
        });
        // A first check in the foreground, so a misconfigured stream stops the start.
        let first = tokio::time::timeout(inner.opts.timeout, inner.ensure_stream()).await;
        let initial = match first {
            Ok(Ok(last)) => Some(last),
            Ok(Err(Check::Refused(why))) => return Err(LogError::Config(why)),
            Ok(Err(Check::Unavailable(why))) => {
                tracing::warn!(error = %why, "NATS JetStream is not available yet; retrying");
                None
            }
            Err(_) => {
                tracing::warn!("NATS JetStream did not answer in time; retrying");
                None
            }
        };
        if let Some(last) = initial {
            inner.set_head(last);
        }
        for _ in 0..COMMITTERS {
            tokio::spawn(append::commit_groups(inner.clone()));
        }
        tokio::spawn(supervise(inner.clone(), initial.is_some()));
        tokio::spawn(watch_stream(inner.clone()));
        Ok(Arc::new(NatsLog { inner }))
    }
}

/// Connects with the configured authentication; with NATS unreachable the client keeps
/// trying in the background (and every request fails meanwhile).
async fn connect(opts: &NatsOptions, metrics: &Metrics) -> Result<async_nats::Client, LogError> {
    let mut o = async_nats::ConnectOptions::new()
        .name("tidewire")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(opts.timeout)
        .request_timeout(Some(opts.timeout))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64).saturating_mul(100).min(2000))
        });
    if let Some(path) = &opts.creds_file {
        o = o.credentials_file(path).await.map_err(|e| {
            LogError::Config(format!("NATS credentials file {}: {e}", path.display()))
        })?;
    }
    if let Some(path) = &opts.nkey_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| LogError::Config(format!("nkey seed file {}: {e}", path.display())))?;
        o = o.nkey(seed.trim().to_owned());
    }
    if let Some((user, password)) = &opts.user_password {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &opts.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    let m = metrics.nats().clone();
    o = o.event_callback(move |event| {
        let m = m.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    m.connected.set(1);
                    tracing::info!("connected to NATS");
                }
                async_nats::Event::Disconnected => {
                    m.connected.set(0);
                    m.disconnects.inc();
                    tracing::warn!("lost the NATS connection; reconnecting");
                }
                other => tracing::debug!(event = %other, "NATS connection event"),
            }
        }
    });
    let mut addrs = Vec::new();
    for url in &opts.urls {
        addrs.push(
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| LogError::Config(format!("NATS URL {url:?}: {e}")))?,
        );
    }
    o.connect(addrs)
        .await
        .map_err(|e| LogError::Config(format!("NATS: {e}")))
}

/// Why the stream could not be set up.
enum Check {
    /// It exists and cannot be served as configured; retrying will not help.
    Refused(String),
    /// NATS or JetStream did not answer as needed; try again.
    Unavailable(String),
}

impl Inner {
    /// Creates the stream when missing, or checks that it can be served; returns its last
    /// sequence.
    async fn ensure_stream(&self) -> Result<u64, Check> {
        let unavailable = |e: &dyn std::fmt::Display| Check::Unavailable(e.to_string());
        let stream = match self.js.get_stream(&self.wanted.name).await {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                // Missing: create it. Two gateways may race here; the loser reads the winner's.
                match self.js.create_stream(self.wanted.config()).await {
                    Ok(s) => {
                        tracing::info!(
                            stream = %self.wanted.name,
                            subjects = %self.wanted.subjects(),
                            replicas = self.wanted.replicas,
                            "created the JetStream stream"
                        );
                        s
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "creating the stream failed; reading it");
                        self.js
                            .get_stream(&self.wanted.name)
                            .await
                            .map_err(|e| unavailable(&e))?
                    }
                }
            }
            Err(e) => return Err(unavailable(&e)),
        };
        let info = stream.cached_info();
        let problems = self.wanted.problems(&info.config);
        if !problems.is_empty() {
            return Err(Check::Refused(format!(
                "the JetStream stream {:?} cannot serve this gateway: {}",
                self.wanted.name,
                problems.join("; ")
            )));
        }
        Ok(info.state.last_sequence)
    }

    fn set_head(&self, seq: u64) {
        self.head_tx.send_replace(seq);
        let last = self.stream_last.fetch_max(seq, Ordering::AcqRel).max(seq);
        // The lag gauge moves with the head, not only when the watcher looks.
        self.metrics
            .nats()
            .lag_events
            .set(i64::try_from(last - seq).unwrap_or(i64::MAX));
    }

    fn head(&self) -> u64 {
        *self.head_tx.borrow()
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Whether appends and reads may go ahead now; `Err` says why not.
    fn check_ready(&self) -> Result<(), LogError> {
        if self.is_closed() {
            return Err(LogError::Closed);
        }
        if let Ok(guard) = self.refused.lock() {
            if let Some(why) = guard.as_ref() {
                return Err(LogError::Unavailable(why.clone()));
            }
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(LogError::Unavailable("not connected to NATS".into()));
        }
        if !self.following.load(Ordering::Acquire) {
            return Err(LogError::Unavailable(
                "the gateway does not follow its JetStream stream yet".into(),
            ));
        }
        Ok(())
    }

    /// Waits until the follower has handed `seq` to the hub, at most `timeout`.
    async fn wait_followed(&self, seq: u64) -> bool {
        let mut rx = self.head_tx.subscribe();
        tokio::time::timeout(self.opts.timeout, rx.wait_for(|h| *h >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Keeps the gateway following its stream: sets it up (again) whenever NATS is back, and
/// resumes after the last sequence handed to the hub, so no event is skipped or repeated.
async fn supervise(inner: Arc<Inner>, mut checked: bool) {
    let mut closed = inner.closed.subscribe();
    let mut backoff = Duration::from_millis(100);
    loop {
        if inner.is_closed() {
            return;
        }
        if !checked {
            match inner.ensure_stream().await {
                Ok(last) => {
                    // The very first look: what is stored is history, read by cursor.
                    if inner.head() == 0 {
                        inner.set_head(last);
                    }
                    checked = true;
                }
                Err(Check::Refused(why)) => {
                    tracing::error!(error = %why, "not serving");
                    if let Ok(mut r) = inner.refused.lock() {
                        *r = Some(why);
                    }
                    return;
                }
                Err(Check::Unavailable(why)) => {
                    tracing::debug!(error = %why, "JetStream not available yet");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = closed.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        match follow(&inner).await {
            Ok(()) => return,
            Err(why) => {
                inner.following.store(false, Ordering::Release);
                inner.metrics.nats().following.set(0);
                tracing::warn!(error = %why, head = inner.head(), "stopped following the stream; resuming");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closed.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Follows the stream from the head on, handing each run of events to the hub in sequence
/// order. Returns `Ok` when the log closes, `Err` when the consumer fails (the caller starts
/// again from the head).
async fn follow(inner: &Arc<Inner>) -> Result<(), String> {
    let stream = inner
        .js
        .get_stream(&inner.wanted.name)
        .await
        .map_err(|e| e.to_string())?;
    // An ephemeral, unacknowledged, in-memory consumer: what an ordered consumer is, with
    // a short heartbeat of our own, so a consumer lost with its NATS node is noticed in
    // seconds. Any gap or repeat in its sequence ends this run, and the next one starts
    // after the head again: nothing is skipped or handed over twice.
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: inner.wanted.subjects(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: inner.head() + 1,
            },
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            num_replicas: 1,
            memory_storage: true,
            inactive_threshold: CONSUMER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(FOLLOW_BATCH)
        .heartbeat(FOLLOW_HEARTBEAT)
        .expires(FOLLOW_EXPIRES)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    inner.following.store(true, Ordering::Release);
    inner.metrics.nats().following.set(1);
    tracing::info!(from = inner.head() + 1, "following the JetStream stream");
    let mut closed = inner.closed.subscribe();
    // The consumer's own sequence of the last message handed over: each must be the next.
    let mut delivered = 0u64;
    loop {
        let first = tokio::select! {
            m = messages.next() => m,
            _ = closed.changed() => return Ok(()),
        };
        let mut run = match first {
            Some(Ok(m)) => vec![m],
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the consumer ended".into()),
        };
        let mut failed = None;
        while run.len() < FOLLOW_BATCH {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => run.push(m),
                Some(Some(Err(e))) => {
                    failed = Some(e.to_string());
                    break;
                }
                Some(None) => {
                    failed = Some("the consumer ended".into());
                    break;
                }
                None => break,
            }
        }
        let in_order = hand_over(inner, run, &mut delivered);
        if let Some(why) = failed.or(in_order.err()) {
            return Err(why);
        }
    }
}

/// Moves the head over `run` and hands its events to the hub (in that order: a subscriber
/// that registers in between reads them from the log and drops them live by id). `Err` when
/// the consumer skipped or repeated a message: what came before it is handed over, and the
/// caller starts again after the head.
fn hand_over(
    inner: &Inner,
    run: Vec<jetstream::Message>,
    delivered: &mut u64,
) -> Result<(), String> {
    let mut events: Vec<SharedEvent> = Vec::with_capacity(run.len());
    let mut topics: Vec<Topic> = Vec::new();
    let mut last = inner.head();
    let mut broken = None;
    for m in run {
        let info = match m.info() {
            Ok(info) => info,
            Err(e) => {
                broken = Some(format!("a message without its metadata: {e}"));
                break;
            }
        };
        if info.consumer_sequence != *delivered + 1 || info.stream_sequence <= last {
            broken = Some(format!(
                "the consumer delivered {} (stream {}) after {} (stream {})",
                info.consumer_sequence, info.stream_sequence, delivered, last
            ));
            break;
        }
        *delivered = info.consumer_sequence;
        let seq = info.stream_sequence;
        let stored_ms =
            u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let before = inner.followed_time.fetch_max(stored_ms, Ordering::AcqRel);
        let behind = stored_ms < before;
        let was_behind = inner.time_behind.swap(behind, Ordering::AcqRel);
        if behind && !was_behind {
            // Nothing here can re-date a stored message: say so, for the operator to fix the
            // servers' clocks.
            tracing::warn!(
                seq,
                time = stored_ms,
                newest_earlier = before,
                "JetStream dated this message before an earlier one (the stream leader's \
                 clock stepped back, or a new leader's clock is behind): a start_time near \
                 here is only as exact as these times are ordered"
            );
        }
        last = seq;
        let m = m.split().0;
        let Some(event) = wire::decode(
            &inner.wanted.prefix,
            m.subject.as_str(),
            seq,
            m.headers.as_ref(),
            m.payload,
            stored_ms,
        ) else {
            tracing::warn!(seq, subject = %m.subject, "a message of the stream is no tidewire event; skipped");
            continue;
        };
        if !topics.contains(event.topic()) {
            topics.push(event.topic().clone());
        }
        events.push(Arc::new(event));
    }
    inner.set_head(last);
    if !events.is_empty() {
        inner.hub.publish(events.into(), &topics);
    }
    match broken {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Watches the stream's last sequence, so `/readyz` and `/metrics` tell the gateway's lag.
async fn watch_stream(inner: Arc<Inner>) {
    let mut closed = inner.closed.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = closed.changed() => return,
        }
        if let Ok(state) = api::stream_state(&inner).await {
            inner
                .stream_last
                .fetch_max(state.last_seq, Ordering::AcqRel);
        }
        let m = inner.metrics.nats();
        let last = inner.stream_last.load(Ordering::Acquire);
        m.stream_last_seq
            .set(i64::try_from(last).unwrap_or(i64::MAX));
        m.lag_events
            .set(i64::try_from(last.saturating_sub(inner.head())).unwrap_or(i64::MAX));
        m.connected.set(i64::from(
            inner.client.connection_state() == async_nats::connection::State::Connected,
        ));
    }
}

impl EventLog for NatsLog {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Appended, LogError>> {
        Box::pin(append::append(&self.inner, events))
    }

    fn read(
        &self,
        patterns: PatternSet,
        after: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, LogError>> {
        Box::pin(async move { read::read(&self.inner, &patterns, after.0, limit).await })
    }

    fn head(&self) -> EventId {
        EventId(self.inner.head())
    }

    fn latest(
        &self,
        patterns: PatternSet,
        at_most: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Latest, LogError>> {
        Box::pin(async move { read::latest(&self.inner, &patterns, at_most.0, limit).await })
    }

    fn time_start(
        &self,
        patterns: PatternSet,
        time_ms: u64,
    ) -> BoxFuture<'_, Result<TimeStart, LogError>> {
        // The cut is stream-wide (see `read::time_start`): the patterns do not move it.
        let _ = patterns;
        Box::pin(read::time_start(&self.inner, time_ms))
    }

    fn topics<'a>(
        &'a self,
        filter: Option<&'a Pattern>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<TopicStats>, LogError>> {
        Box::pin(read::topics(&self.inner, filter, limit))
    }

    fn topic<'a>(
        &'a self,
        topic: &'a Topic,
    ) -> BoxFuture<'a, Result<Option<TopicStats>, LogError>> {
        Box::pin(read::topic(&self.inner, topic))
    }

    fn check_available(&self) -> Result<(), LogError> {
        self.inner.check_ready()
    }

    fn is_ready(&self) -> bool {
        let caught_up = self
            .inner
            .stream_last
            .load(Ordering::Acquire)
            .saturating_sub(self.inner.head())
            <= READY_LAG;
        self.inner.check_ready().is_ok() && caught_up
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            self.inner.closed.send_replace(true);
            self.inner.following.store(false, Ordering::Release);
            // Nothing is buffered on our side: every append already has its answer.
            let _ = tokio::time::timeout(self.inner.opts.timeout, self.inner.client.flush()).await;
            Ok(())
        })
    }
}

/// For each event of an append, the index of the earlier event of the same append whose
/// `(topic, msg_id)` it repeats (`None`: the first with it, or no `msg_id`).
fn repeats_within(events: &[NewEvent]) -> Vec<Option<usize>> {
    let mut first: HashMap<(&str, &str), usize> = HashMap::new();
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let m = e.msg_id.as_deref()?;
            match first.entry((e.topic.as_str(), m)) {
                std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Data;

    fn event(topic: &str, msg_id: Option<&str>) -> NewEvent {
        NewEvent {
            topic: Topic::parse(topic).unwrap(),
            event_type: None,
            msg_id: msg_id.map(Into::into),
            data: Data::Json("1".into()),
        }
    }

    #[test]
    fn repeats_within_an_append_name_the_first_event_with_their_topic_and_msg_id() {
        let events = [
            event("a", Some("m")),
            event("b", Some("m")),
            event("a", None),
            event("a", Some("m")),
            event("b", Some("m")),
            event("a", None),
        ];
        assert_eq!(
            repeats_within(&events),
            vec![None, None, None, Some(0), Some(1), None]
        );
    }
}
