//! Appending on JetStream: an append is one atomic batch (one publish for a lone event),
//! shared with the appends queued at the same moment.
//!
//! Repeats of a `(topic, msg_id)` are found three ways: within the append itself (before
//! anything is sent); by JetStream for a single publish (`duplicate: true` names the
//! original); and for a batch, where JetStream refuses the whole batch when any message
//! repeats an id. Then each event with a `msg_id` is probed: a publish carrying its
//! `Nats-Msg-Id` and an expectation no stream meets, which JetStream answers with the original
//! for a repeat (the duplicate check comes first) and with an error, storing nothing, for a
//! new one. The repeats are set aside and the rest is sent again as one atomic batch, so the
//! new events of a mixed batch keep contiguous ids.
//!
//! Which expectation depends on where JetStream checks it. A replicated stream (one with a
//! raft group) checks the msg_id, then `Nats-Expected-Last-Sequence`, on the leader before
//! anything is proposed; `Nats-Expected-Last-Msg-Id` it checks only when each replica applies
//! the entry, where a mismatch stops that replica's stream for good. A stream without a raft
//! group checks the expected sequence *before* the msg_id, and the expected msg_id after it.
//!
//! Group commit: concurrent appends are queued and sent together as one atomic batch (up to
//! `nats_max_batch` events), each append's events contiguous within it, so a burst of small
//! publishes costs JetStream one commit (and, with `sync_interval: always`, one fsync) instead
//! of one each. A combined batch that JetStream refuses because some member repeats a
//! `msg_id` is sent again member by member, the slow path above.
//!
//! Elections: while the stream has no leader listening (just created, a node lost, a stepdown)
//! NATS answers "no responders" and nothing is stored, so a publish, a probe or a whole batch
//! is sent again, paced, within one `nats_timeout_ms`; only past it does the caller get
//! `Unavailable`. A request some server took and never answered stays `Unavailable` at once
//! after its timeout: whether it was stored is unknown, and only the client's retry with the
//! same `msg_id` can settle that.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::api::{self, code};
use super::{repeats_within, subject, wire, Inner};
use crate::envelope::{EventId, NewEvent};
use crate::log::{Appended, LogError};

/// A `Nats-Expected-Last-Msg-Id` no stored message has (tidewire's ids all contain `|`).
const NO_SUCH_MSG_ID: &str = "tidewire-dedupe-probe";
/// A `Nats-Expected-Last-Sequence` no stream reaches.
const NO_SUCH_SEQUENCE: &str = "9223372036854775807";
/// Room kept for an event's headers and subject within a NATS message (a topic is at most
/// 200 bytes, a msg_id 256 before base64, a type 128).
const MESSAGE_OVERHEAD: usize = 2048;
/// Rounds of "send the batch, set its repeats aside" before giving up (each round can only
/// find repeats stored concurrently by someone else).
const DEDUPE_ROUNDS: usize = 4;

/// Appends `events` (see [`EventLog::append`](crate::log::EventLog::append)).
pub async fn append(inner: &Arc<Inner>, events: Vec<NewEvent>) -> Result<Appended, LogError> {
    if events.is_empty() {
        return Err(LogError::Storage("empty append".into()));
    }
    inner.check_ready()?;
    let within = repeats_within(&events);
    let unique_count = events.len() - within.iter().flatten().count();
    if unique_count > inner.opts.max_batch {
        return Err(too_large(inner.opts.max_batch, unique_count));
    }
    // Checked before anything is sent: a batch cut short by a refused message would hold one
    // of JetStream's in-flight batch slots until it times out.
    let max_payload = inner.client.server_info().max_payload;
    if let Some(e) = events
        .iter()
        .find(|e| max_payload > 0 && e.data.len() + MESSAGE_OVERHEAD > max_payload)
    {
        return Err(LogError::PayloadTooLarge(format!(
            "an event of {} bytes on {} is larger than the NATS servers take (max_payload {max_payload} \
             bytes, headers included); nothing was stored",
            e.data.len(),
            e.topic.as_str()
        )));
    }
    // The original id of each event found to repeat one stored earlier.
    let mut stored_before: Vec<Option<u64>> = vec![None; events.len()];
    let mut stored: Option<(u64, Vec<usize>)> = None;
    for round in 0.. {
        let send: Vec<usize> = (0..events.len())
            .filter(|i| within[*i].is_none() && stored_before[*i].is_none())
            .collect();
        if send.is_empty() {
            break;
        }
        let messages: Vec<Message> = send.iter().map(|&i| message(inner, &events[i])).collect();
        let outcome = if round == 0 {
            grouped(inner, messages).await?
        } else {
            send_alone(inner, messages).await?
        };
        match outcome {
            Outcome::Stored(first) => {
                stored = Some((first, send));
                break;
            }
            Outcome::Duplicate(seq) => {
                stored_before[send[0]] = Some(seq);
                break;
            }
            Outcome::Conflict if round + 1 < DEDUPE_ROUNDS => {
                // Asked each time: an operator may scale the stream while gateways run.
                let replicated = is_replicated(inner).await?;
                for &i in &send {
                    if events[i].msg_id.is_some() {
                        stored_before[i] = probe(inner, &events[i], replicated).await?;
                    }
                }
            }
            Outcome::Conflict => {
                return Err(LogError::Unavailable(
                    "the batch kept meeting msg_ids stored concurrently; retry it".into(),
                ))
            }
        }
    }
    // Ids of this append's events: stored now, stored before, or those of an earlier event
    // of the append that they repeat.
    let mut ids: Vec<u64> = vec![0; events.len()];
    if let Some((first, sent)) = &stored {
        for (k, i) in sent.iter().enumerate() {
            ids[*i] = first + k as u64;
        }
    }
    for (i, orig) in stored_before.iter().enumerate() {
        if let Some(seq) = orig {
            ids[i] = *seq;
        }
    }
    let mut duplicate_of = Vec::new();
    for (i, earlier) in within.iter().enumerate() {
        if let Some(j) = earlier {
            ids[i] = ids[*j];
        }
        if earlier.is_some() || stored_before[i].is_some() {
            duplicate_of.push(EventId(ids[i]));
        }
    }
    if !duplicate_of.is_empty() {
        inner.metrics.observe_duplicates(duplicate_of.len() as u64);
    }
    let appended = match stored {
        Some((first, sent)) => {
            let last = first + sent.len() as u64 - 1;
            inner.stream_last.fetch_max(last, Ordering::AcqRel);
            // This gateway's subscribers get the events before the publisher hears back, as
            // on the sled log. Past the timeout the ack stands (the events are stored); the
            // follower delivers them when it can.
            if !inner.wait_followed(last).await {
                tracing::warn!(
                    last,
                    head = inner.head(),
                    "acknowledged before this gateway followed the stream that far"
                );
            }
            Appended {
                first: EventId(first),
                last: EventId(last),
                count: sent.len() as u64,
                duplicate_of,
            }
        }
        None => Appended {
            first: duplicate_of.iter().copied().min().unwrap_or_default(),
            last: duplicate_of.iter().copied().max().unwrap_or_default(),
            count: 0,
            duplicate_of,
        },
    };
    Ok(appended)
}

fn too_large(limit: usize, n: usize) -> LogError {
    LogError::TooManyEvents(format!(
        "JetStream stores at most {limit} events atomically in one batch (nats_max_batch); \
         this one has {n}: split it"
    ))
}

/// One event as a NATS message: subject, headers, payload.
type Message = (String, HeaderMap, Bytes);

/// No time goes with it: JetStream's timestamp of the message is the event's `time` (see
/// [`wire::decode`]).
fn message(inner: &Inner, event: &NewEvent) -> Message {
    let (headers, payload) = wire::encode(event);
    (
        subject::topic_subject(&inner.wanted.prefix, &event.topic),
        headers,
        payload,
    )
}

/// What sending some messages came to.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Stored, the first with this id and the rest after it.
    Stored(u64),
    /// One message, not stored again: it repeats this stored id's `msg_id`.
    Duplicate(u64),
    /// Refused whole: some message repeats a stored `msg_id`.
    Conflict,
}

/// An append's messages waiting to go out in a combined batch.
pub struct Pending {
    messages: Vec<Message>,
    reply: oneshot::Sender<Result<Outcome, LogError>>,
}

/// Most payload bytes one combined batch gathers from the queue (one append alone may hold
/// more).
const GROUP_BYTES: usize = 4 << 20;

/// Sends `messages` with whatever other appends are queued now, and says what became of them.
async fn grouped(inner: &Inner, messages: Vec<Message>) -> Result<Outcome, LogError> {
    let (reply, answer) = oneshot::channel();
    inner
        .queue
        .lock()
        .map_err(|_| LogError::Closed)?
        .push_back(Pending { messages, reply });
    inner.queued.notify_one();
    answer.await.map_err(|_| LogError::Closed)?
}

/// Takes queued appends and sends each group as one atomic batch, until the log closes.
/// Several run at once, so batches are pipelined.
pub async fn commit_groups(inner: Arc<Inner>) {
    let mut closed = inner.closed.subscribe();
    loop {
        let group = loop {
            if let Some(group) = take_group(&inner) {
                break group;
            }
            tokio::select! {
                _ = inner.queued.notified() => {}
                _ = closed.changed() => return,
            }
        };
        // Another append queued meanwhile is someone else's to take.
        if inner.queue.lock().is_ok_and(|q| !q.is_empty()) {
            inner.queued.notify_one();
        }
        let started = Instant::now();
        let mut messages: Vec<Message> = Vec::new();
        let mut replies = Vec::with_capacity(group.len());
        for p in group {
            replies.push((p.messages.len() as u64, p.reply));
            messages.extend(p.messages);
        }
        let result = send_alone(&inner, messages).await;
        inner.metrics.observe_commit(started.elapsed());
        match result {
            Ok(Outcome::Stored(mut next)) => {
                for (n, reply) in replies {
                    let _ = reply.send(Ok(Outcome::Stored(next)));
                    next += n;
                }
            }
            Ok(other) => {
                // A repeat (of one message: a group of one) or a conflict somewhere in the
                // group: each append sorts out its own.
                for (_, reply) in replies {
                    let _ = reply.send(Ok(other));
                }
            }
            Err(e) => {
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The queued appends that fit one batch, oldest first; `None` when none is queued.
fn take_group(inner: &Inner) -> Option<Vec<Pending>> {
    let mut q = inner.queue.lock().ok()?;
    let mut group: Vec<Pending> = Vec::new();
    let (mut events, mut bytes) = (0usize, 0usize);
    // Two appends repeating one `(topic, msg_id)` never share a batch: the second must be
    // told it repeats the first, which only a batch of its own finds out.
    let msg_ids = |p: &Pending| -> Vec<String> {
        p.messages
            .iter()
            .filter_map(|m| m.1.get(wire::MSG_ID).map(|v| v.as_str().to_owned()))
            .collect()
    };
    let mut taken_ids: HashSet<String> = HashSet::new();
    while let Some(next) = q.front() {
        let n = next.messages.len();
        let b: usize = next.messages.iter().map(|m| m.2.len()).sum();
        let its_ids = msg_ids(next);
        if !group.is_empty()
            && (events + n > inner.opts.max_batch
                || bytes + b > GROUP_BYTES
                || its_ids.iter().any(|id| taken_ids.contains(id)))
        {
            break;
        }
        events += n;
        bytes += b;
        taken_ids.extend(its_ids);
        group.extend(q.pop_front());
    }

    (!group.is_empty()).then_some(group)
}

/// Sends `messages` now: one publish, or one atomic batch.
async fn send_alone(inner: &Inner, mut messages: Vec<Message>) -> Result<Outcome, LogError> {
    if messages.len() > 1 {
        let n = messages.len() as u64;
        return Ok(match publish_batch(inner, messages).await? {
            Ok(last) => Outcome::Stored(last + 1 - n),
            Err(()) => Outcome::Conflict,
        });
    }
    let Some(one) = messages.pop() else {
        return Err(LogError::Storage("empty batch".into()));
    };
    let ack = publish_one(inner, one).await?;
    Ok(if ack.duplicate {
        Outcome::Duplicate(ack.seq)
    } else {
        Outcome::Stored(ack.seq)
    })
}

/// Maps JetStream's refusal of a publish onto the log's errors.
fn refused(inner: &Inner, e: api::ApiErr) -> LogError {
    match e.err_code {
        code::BATCH_TOO_LARGE => LogError::TooManyEvents(format!(
            "JetStream refused the batch as larger than it commits atomically ({}); at most {} \
             events per publish (nats_max_batch) if the server keeps its default",
            e.description, inner.opts.max_batch
        )),
        code::STREAM_NOT_FOUND => LogError::Unavailable(format!("JetStream: {}", e.description)),
        _ => LogError::Storage(format!("JetStream: {} ({})", e.description, e.err_code)),
    }
}

/// Publishes one message and waits for its acknowledgement.
async fn publish_one(
    inner: &Inner,
    (subject, headers, payload): Message,
) -> Result<api::PubAck, LogError> {
    let answer = api::request(inner, subject, Some(headers), payload).await?;
    api::parse_ack(&answer.payload)?.map_err(|e| refused(inner, e))
}

/// Publishes `messages` as one atomic batch. `Ok(Ok(last))`: stored, the last id;
/// `Ok(Err(()))`: refused whole because a message repeats a stored `msg_id`.
///
/// A commit no one listened to stored nothing (the stream never saw it, so it drops whatever
/// parts it got when the batch times out): the whole batch is sent again under a new id while
/// the request budget lasts.
async fn publish_batch(inner: &Inner, messages: Vec<Message>) -> Result<Result<u64, ()>, LogError> {
    let _slot = inner
        .batches
        .acquire()
        .await
        .map_err(|_| LogError::Closed)?;
    let n = messages.len();
    let mut retry = api::NoRespondersRetry::new(inner);
    loop {
        let answer = match send_batch(inner, &messages, retry.remaining()).await? {
            Ok(answer) => answer,
            Err(api::Unanswered::NoResponders) if retry.again().await => continue,
            Err(api::Unanswered::NoResponders) => return Err(api::no_responders()),
            Err(api::Unanswered::Failed(e)) => return Err(e),
        };
        return match api::parse_ack(&answer.payload)? {
            Ok(ack) => {
                if ack.count != Some(n as u64) {
                    return Err(LogError::Storage(format!(
                        "JetStream committed {:?} messages of a batch of {n}",
                        ack.count
                    )));
                }
                Ok(Ok(ack.seq))
            }
            Err(e) if e.err_code == code::BATCH_HAS_DUPLICATE => Ok(Err(())),
            Err(e) => Err(refused(inner, e)),
        };
    }
}

/// Sends `messages` once as one atomic batch under a fresh batch id; the commit's answer
/// (awaited at most `wait`), or why it had none.
async fn send_batch(
    inner: &Inner,
    messages: &[Message],
    wait: Duration,
) -> Result<Result<async_nats::Message, api::Unanswered>, LogError> {
    let id = batch_id();
    let n = messages.len();
    for (k, (subject, headers, payload)) in messages.iter().enumerate() {
        let mut headers = headers.clone();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (k + 1).to_string());
        if k + 1 < n {
            // JetStream acknowledges only the commit; a lost message makes it refuse the
            // batch at the commit (a gap in Nats-Batch-Sequence), never store part of it.
            inner
                .client
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => api::too_big(&e),
                    _ => api::unavailable(e),
                })?;
            continue;
        }
        headers.insert("Nats-Batch-Commit", "1");
        let commit =
            api::request_once(inner, subject.clone(), Some(headers), payload.clone(), wait);
        return Ok(commit.await);
    }
    Err(LogError::Storage("empty batch".into()))
}

/// Whether the stream is replicated through a raft group (see the module header for why the
/// dedupe probe must know).
async fn is_replicated(inner: &Inner) -> Result<bool, LogError> {
    let stream = inner
        .js
        .get_stream(&inner.wanted.name)
        .await
        .map_err(|e| LogError::Unavailable(format!("NATS JetStream stream info: {e}")))?;
    Ok(stream
        .cached_info()
        .cluster
        .as_ref()
        .is_some_and(|c| c.raft_group.is_some()))
}

/// The original id of `event` when its `(topic, msg_id)` is stored within the window; stores
/// nothing either way. `replicated` is [`is_replicated`]'s answer.
async fn probe(inner: &Inner, event: &NewEvent, replicated: bool) -> Result<Option<u64>, LogError> {
    let Some(msg_id) = event.msg_id.as_deref() else {
        return Ok(None);
    };
    let mut headers = HeaderMap::new();
    headers.insert(wire::MSG_ID, wire::dedupe_id(&event.topic, msg_id));
    let not_stored = if replicated {
        headers.insert("Nats-Expected-Last-Sequence", NO_SUCH_SEQUENCE);
        code::WRONG_LAST_SEQUENCE
    } else {
        headers.insert("Nats-Expected-Last-Msg-Id", NO_SUCH_MSG_ID);
        code::WRONG_LAST_MSG_ID
    };
    let subject = subject::topic_subject(&inner.wanted.prefix, &event.topic);
    let answer = api::request(inner, subject, Some(headers), Bytes::new()).await?;
    match api::parse_ack(&answer.payload)? {
        Ok(ack) if ack.duplicate => Ok(Some(ack.seq)),
        Ok(ack) => Err(LogError::Storage(format!(
            "a dedupe probe was stored as sequence {} (JetStream checked the expectation \
             before the duplicate); refusing to go on",
            ack.seq
        ))),
        Err(e) if e.err_code == not_stored => Ok(None),
        Err(e) => Err(refused(inner, e)),
    }
}

/// A batch id unique across gateways and restarts (JetStream allows 64 characters).
fn batch_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("tw-{:x}-{:x}-{n:x}", std::process::id(), nanos)
}
