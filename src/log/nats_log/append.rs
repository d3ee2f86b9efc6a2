//! Appending on JetStream: one event is one publish, a batch is one atomic batch.
//!
//! Repeats of a `(topic, msg_id)` are found three ways: within the append itself (before
//! anything is sent); by JetStream for a single publish (`duplicate: true` names the
//! original); and for a batch, where JetStream refuses the whole batch when any message
//! repeats an id. Then each event with a `msg_id` is probed: a publish carrying its
//! `Nats-Msg-Id` and an expectation no message meets (`Nats-Expected-Last-Msg-Id`), which
//! JetStream answers with the original for a repeat (the duplicate check comes first) and
//! with an error, storing nothing, for a new one. The repeats are set aside and the rest is
//! sent again as one atomic batch, so the new events of a mixed batch keep contiguous ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;

use super::api::{self, code};
use super::{now_ms, repeats_within, subject, wire, Inner};
use crate::envelope::{EventId, NewEvent};
use crate::log::{Appended, LogError};

/// A `Nats-Expected-Last-Msg-Id` no stored message has (tidewire's ids all contain `|`).
const NO_SUCH_MSG_ID: &str = "tidewire-dedupe-probe";
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
    let unique_count = events.len() - repeats_within(&events).iter().flatten().count();
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
    let started = Instant::now();
    let time = now_ms();
    let within = repeats_within(&events);
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
        if send.len() == 1 {
            let i = send[0];
            let ack = publish_one(inner, &events[i], time).await?;
            if ack.duplicate {
                stored_before[i] = Some(ack.seq);
                break;
            }
            stored = Some((ack.seq, send));
            break;
        }
        match publish_batch(inner, &events, &send, time).await? {
            Ok(last) => {
                let first = last + 1 - send.len() as u64;
                stored = Some((first, send));
                break;
            }
            Err(()) if round + 1 < DEDUPE_ROUNDS => {
                for &i in &send {
                    if events[i].msg_id.is_some() {
                        stored_before[i] = probe(inner, &events[i]).await?;
                    }
                }
            }
            Err(()) => {
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
    inner.metrics.observe_commit(started.elapsed());
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

fn message(inner: &Inner, event: &NewEvent, time: u64) -> (String, HeaderMap, Bytes) {
    let (headers, payload) = wire::encode(event, time);
    (
        subject::topic_subject(&inner.wanted.prefix, &event.topic),
        headers,
        payload,
    )
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

/// Publishes one event and waits for its acknowledgement.
async fn publish_one(inner: &Inner, event: &NewEvent, time: u64) -> Result<api::PubAck, LogError> {
    let (subject, headers, payload) = message(inner, event, time);
    let answer = api::request(inner, subject, Some(headers), payload).await?;
    api::parse_ack(&answer.payload)?.map_err(|e| refused(inner, e))
}

/// Publishes `events[send]` as one atomic batch. `Ok(Ok(last))`: stored, the last id;
/// `Ok(Err(()))`: refused whole because an event repeats a stored `msg_id`.
async fn publish_batch(
    inner: &Inner,
    events: &[NewEvent],
    send: &[usize],
    time: u64,
) -> Result<Result<u64, ()>, LogError> {
    let _slot = inner
        .batches
        .acquire()
        .await
        .map_err(|_| LogError::Closed)?;
    let id = batch_id();
    let n = send.len();
    for (k, &i) in send.iter().enumerate() {
        let (subject, mut headers, payload) = message(inner, &events[i], time);
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (k + 1).to_string());
        if k + 1 < n {
            // JetStream acknowledges only the commit; a lost message makes it refuse the
            // batch at the commit (a gap in Nats-Batch-Sequence), never store part of it.
            inner
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => api::too_big(&e),
                    _ => api::unavailable(e),
                })?;
            continue;
        }
        headers.insert("Nats-Batch-Commit", "1");
        let answer = api::request(inner, subject, Some(headers), payload).await?;
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
    Err(LogError::Storage("empty batch".into()))
}

/// The original id of `event` when its `(topic, msg_id)` is stored within the window; stores
/// nothing either way.
async fn probe(inner: &Inner, event: &NewEvent) -> Result<Option<u64>, LogError> {
    let Some(msg_id) = event.msg_id.as_deref() else {
        return Ok(None);
    };
    let mut headers = HeaderMap::new();
    headers.insert(wire::MSG_ID, wire::dedupe_id(&event.topic, msg_id));
    headers.insert("Nats-Expected-Last-Msg-Id", NO_SUCH_MSG_ID);
    let subject = subject::topic_subject(&inner.wanted.prefix, &event.topic);
    let answer = api::request(inner, subject, Some(headers), Bytes::new()).await?;
    match api::parse_ack(&answer.payload)? {
        Ok(ack) if ack.duplicate => Ok(Some(ack.seq)),
        Ok(ack) => Err(LogError::Storage(format!(
            "a dedupe probe was stored as sequence {} (JetStream checked the expectation \
             before the duplicate); refusing to go on",
            ack.seq
        ))),
        Err(e) if e.err_code == code::WRONG_LAST_MSG_ID => Ok(None),
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
