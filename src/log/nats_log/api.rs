//! The few JetStream API calls the log makes by hand (the client crate does not offer them,
//! or not with the fields they need): acknowledgements, stream state, per-subject counts,
//! batched direct gets and leader gets.

use std::time::Duration;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use serde::Deserialize;

use super::Inner;
use crate::log::LogError;

/// JetStream's answer to a publish.
#[derive(Debug, Deserialize)]
pub struct PubAck {
    /// The sequence stored (the last of a batch), or the original of a duplicate.
    #[serde(default)]
    pub seq: u64,
    /// Whether the message repeated a `Nats-Msg-Id` within the window.
    #[serde(default)]
    pub duplicate: bool,
    /// Messages committed by an atomic batch.
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    error: Option<ApiErr>,
}

/// An error JetStream answered with.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiErr {
    /// JetStream's error code (`err_code`).
    #[serde(default)]
    pub err_code: u64,
    /// What it said.
    #[serde(default)]
    pub description: String,
}

/// JetStream error codes the log acts on.
pub mod code {
    /// The stream does not exist.
    pub const STREAM_NOT_FOUND: u64 = 10059;
    /// `Nats-Expected-Last-Msg-Id` did not match (the dedupe probe's "not a duplicate" on a
    /// stream without a raft group).
    pub const WRONG_LAST_MSG_ID: u64 = 10070;
    /// `Nats-Expected-Last-Sequence` did not match (the dedupe probe's "not a duplicate" on a
    /// replicated stream).
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// An atomic batch holds more messages than the server commits at once.
    pub const BATCH_TOO_LARGE: u64 = 10199;
    /// An atomic batch holds a `Nats-Msg-Id` already stored within the window.
    pub const BATCH_HAS_DUPLICATE: u64 = 10201;
}

/// Reads a publish acknowledgement: `Ok` with the ack, `Err` with JetStream's error.
pub fn parse_ack(payload: &[u8]) -> Result<Result<PubAck, ApiErr>, LogError> {
    let ack: PubAck = serde_json::from_slice(payload).map_err(|e| {
        LogError::Storage(format!(
            "unreadable JetStream acknowledgement ({e}): {}",
            String::from_utf8_lossy(payload)
        ))
    })?;
    Ok(match ack.error.clone() {
        Some(e) => Err(e),
        None => Ok(ack),
    })
}

/// The error an unanswered request becomes: nothing was acknowledged, a retry is safe.
pub fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("NATS JetStream: {e}"))
}

/// Why one request got no answer.
pub enum Unanswered {
    /// No one listens on the subject yet, so nothing received the request: the stream was
    /// just created, or its leader's interest has not reached this gateway's NATS server.
    /// Sending again is always safe.
    NoResponders,
    /// Anything else (timeout, lost connection, too big), as the log's error.
    Failed(LogError),
}

/// Sends a request once and waits at most `wait` for its one answer.
pub async fn request_once(
    inner: &Inner,
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
    wait: Duration,
) -> Result<Message, Unanswered> {
    let mut req = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(wait));
    if let Some(h) = headers {
        req = req.headers(h);
    }
    inner
        .client
        .send_request(subject, req)
        .await
        .map_err(|e| match e.kind() {
            async_nats::client::RequestErrorKind::NoResponders => Unanswered::NoResponders,
            async_nats::client::RequestErrorKind::MaxPayloadExceeded => {
                Unanswered::Failed(too_big(&e))
            }
            _ => Unanswered::Failed(unavailable(e)),
        })
}

/// Paces sending again while no one listens; every try, waits included, fits within one
/// request timeout.
pub struct NoRespondersRetry {
    deadline: tokio::time::Instant,
    pause: Duration,
}

impl NoRespondersRetry {
    /// Starts the budget now: sending again is allowed for one `nats_timeout_ms`.
    pub fn new(inner: &Inner) -> Self {
        NoRespondersRetry {
            deadline: tokio::time::Instant::now() + inner.opts.timeout,
            pause: Duration::from_millis(20),
        }
    }

    /// How long the next try may wait for its answer: what is left of the budget.
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Waits before the next try and says `true`, or says `false` when the budget is spent.
    pub async fn again(&mut self) -> bool {
        let wake = tokio::time::Instant::now() + self.pause;
        if wake >= self.deadline {
            return false;
        }
        tokio::time::sleep_until(wake).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(500));
        true
    }
}

/// The error a request that never found a listener within its budget becomes.
pub fn no_responders() -> LogError {
    unavailable("no responders (the stream has no leader reachable from this NATS server yet)")
}

/// Sends a request and waits for its one answer, sending it again while no one listens on
/// the subject; at most one request timeout in all.
pub async fn request(
    inner: &Inner,
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
) -> Result<Message, LogError> {
    let mut retry = NoRespondersRetry::new(inner);
    loop {
        let wait = retry.remaining();
        match request_once(
            inner,
            subject.clone(),
            headers.clone(),
            payload.clone(),
            wait,
        )
        .await
        {
            Ok(m) => return Ok(m),
            Err(Unanswered::Failed(e)) => return Err(e),
            Err(Unanswered::NoResponders) => {
                if !retry.again().await {
                    return Err(no_responders());
                }
            }
        }
    }
}

/// The error a message larger than the NATS servers take becomes (nothing was sent).
pub fn too_big(e: &dyn std::fmt::Display) -> LogError {
    LogError::PayloadTooLarge(format!(
        "an event is larger than the NATS servers' max_payload ({e}); nothing was stored"
    ))
}

/// Calls `$JS.API.<what>` with a JSON body and reads the JSON answer, refusing an error
/// answer.
async fn api<T: serde::de::DeserializeOwned>(
    inner: &Inner,
    what: String,
    body: serde_json::Value,
) -> Result<T, LogError> {
    let m = request(
        inner,
        format!("$JS.API.{what}"),
        None,
        body.to_string().into(),
    )
    .await?;
    #[derive(Deserialize)]
    struct Wrapped {
        #[serde(default)]
        error: Option<ApiErr>,
    }
    if let Ok(Wrapped { error: Some(e) }) = serde_json::from_slice::<Wrapped>(&m.payload) {
        return Err(if e.err_code == code::STREAM_NOT_FOUND {
            LogError::Unavailable(format!("JetStream: {}", e.description))
        } else {
            LogError::Storage(format!("JetStream: {} ({})", e.description, e.err_code))
        });
    }
    serde_json::from_slice(&m.payload)
        .map_err(|e| LogError::Storage(format!("unreadable JetStream answer: {e}")))
}

/// The stream's first and last sequence.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct StreamState {
    /// Oldest retained sequence (everything below was removed, or never stored).
    #[serde(default)]
    pub first_seq: u64,
    /// Newest sequence ever stored.
    #[serde(default)]
    pub last_seq: u64,
}

/// The stream's state now (answered by the stream leader).
pub async fn stream_state(inner: &Inner) -> Result<StreamState, LogError> {
    #[derive(Deserialize)]
    struct Info {
        state: StreamState,
    }
    let info: Info = api(
        inner,
        format!("STREAM.INFO.{}", inner.wanted.name),
        serde_json::json!({}),
    )
    .await?;
    Ok(info.state)
}

/// The retained message count of every subject matching `filter`.
pub async fn subject_counts(inner: &Inner, filter: &str) -> Result<Vec<(String, u64)>, LogError> {
    #[derive(Deserialize)]
    struct State {
        #[serde(default)]
        subjects: Option<std::collections::HashMap<String, u64>>,
    }
    #[derive(Deserialize)]
    struct Info {
        state: State,
        #[serde(default)]
        total: usize,
    }
    let mut out = Vec::new();
    // The answer is paged (the server sends a bounded number of subjects per call).
    loop {
        let info: Info = api(
            inner,
            format!("STREAM.INFO.{}", inner.wanted.name),
            serde_json::json!({ "subjects_filter": filter, "offset": out.len() }),
        )
        .await?;
        let page = info.state.subjects.unwrap_or_default();
        let got = page.len();
        out.extend(page);
        if got == 0 || out.len() >= info.total {
            return Ok(out);
        }
    }
}

/// One message of a direct get.
#[derive(Debug)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// The subject it was published on.
    pub subject: String,
    /// JetStream's timestamp of it (`Nats-Time-Stamp`), Unix milliseconds rounded down.
    pub time_ms: u64,
    /// Its headers as published.
    pub headers: HeaderMap,
    /// Its payload.
    pub payload: Bytes,
}

/// What a batched direct get returned.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages in sequence order.
    pub messages: Vec<Stored>,
    /// Whether every matching message after the start is in `messages` (as of a replica
    /// holding at least `min_last_seq`).
    pub exhausted: bool,
}

/// Up to `batch` messages on subjects matching `filter` from sequence `start` on, from
/// whichever replica answers direct gets (any replica that is nearly caught up: it may lack
/// the newest messages, never older ones, since each replica stores the stream in order).
pub async fn direct_batch(
    inner: &Inner,
    filter: &str,
    start: u64,
    batch: usize,
) -> Result<Batch, LogError> {
    use futures_util::StreamExt;
    let body = serde_json::json!({
        "seq": start.max(1),
        "next_by_subj": filter,
        "batch": batch,
    });
    let inbox = inner.client.new_inbox();
    let mut sub = inner
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(unavailable)?;
    inner
        .client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{}", inner.wanted.name),
            inbox,
            body.to_string().into(),
        )
        .await
        .map_err(unavailable)?;
    let mut out = Batch::default();
    loop {
        let m = tokio::time::timeout(inner.opts.timeout, sub.next())
            .await
            .map_err(|_| unavailable("a direct get timed out"))?
            .ok_or_else(|| unavailable("the direct get's subscription ended"))?;
        if let Some(status) = m.status {
            match status.as_u16() {
                // End of batch: `Nats-Num-Pending` says whether more matched.
                204 => {
                    let pending = header_u64(m.headers.as_ref(), "Nats-Num-Pending").unwrap_or(0);
                    out.exhausted = pending == 0;
                    return Ok(out);
                }
                404 => {
                    out.exhausted = true;
                    return Ok(out);
                }
                503 => return Err(unavailable("no responders for a direct get")),
                other => {
                    return Err(LogError::Storage(format!(
                        "direct get answered {other}: {}",
                        m.description.unwrap_or_default()
                    )))
                }
            }
        }
        let headers = m.headers.unwrap_or_default();
        let seq = header_u64(Some(&headers), "Nats-Sequence")
            .ok_or_else(|| LogError::Corrupt("a direct get answer without Nats-Sequence".into()))?;
        let subject = headers
            .get("Nats-Subject")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let time_ms = headers
            .get(TIME_STAMP)
            .and_then(|v| parse_time_ms(v.as_str()))
            .ok_or_else(|| {
                LogError::Corrupt(format!(
                    "a direct get answer without a readable {TIME_STAMP} (sequence {seq})"
                ))
            })?;
        let pending = header_u64(Some(&headers), "Nats-Num-Pending");
        out.messages.push(Stored {
            seq,
            subject,
            time_ms,
            headers,
            payload: m.payload,
        });
        if out.messages.len() >= batch {
            out.exhausted = pending == Some(0);
            return Ok(out);
        }
    }
}

/// JetStream's "no message found" (a get past the last match).
const NO_MESSAGE_FOUND: u64 = 10037;

/// The sequence of one message, asked of the stream leader (`$JS.API.STREAM.MSG.GET`, which
/// only the leader answers, so it never lags): bodies `{"seq": n, "next_by_subj": filter}`
/// (the first match from `n` on) or `{"last_by_subj": subject}`. `None` when none matches.
pub async fn leader_get(inner: &Inner, body: serde_json::Value) -> Result<Option<u64>, LogError> {
    #[derive(Deserialize)]
    struct Msg {
        seq: u64,
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        message: Option<Msg>,
        #[serde(default)]
        error: Option<ApiErr>,
    }
    let m = request(
        inner,
        format!("$JS.API.STREAM.MSG.GET.{}", inner.wanted.name),
        None,
        body.to_string().into(),
    )
    .await?;
    let answer: Answer = serde_json::from_slice(&m.payload)
        .map_err(|e| LogError::Storage(format!("unreadable JetStream answer: {e}")))?;
    match (answer.message, answer.error) {
        (Some(msg), _) => Ok(Some(msg.seq)),
        (None, Some(e)) if e.err_code == NO_MESSAGE_FOUND => Ok(None),
        (None, Some(e)) if e.err_code == code::STREAM_NOT_FOUND => Err(LogError::Unavailable(
            format!("JetStream: {}", e.description),
        )),
        (None, Some(e)) => Err(LogError::Storage(format!(
            "JetStream: {} ({})",
            e.description, e.err_code
        ))),
        (None, None) => Err(LogError::Storage("an empty JetStream answer".into())),
    }
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

/// The header of a direct get's answer holding the message's stored timestamp (RFC 3339,
/// nanoseconds).
const TIME_STAMP: &str = "Nats-Time-Stamp";

/// Unix milliseconds (rounded down, 0 before 1970) of an RFC 3339 timestamp as JetStream
/// writes them; `None` when it is none.
pub fn parse_time_ms(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    let ms = t.unix_timestamp_nanos().div_euclid(1_000_000).max(0);
    u64::try_from(ms).ok()
}

/// `ms` (Unix milliseconds) as the RFC 3339 date-time JetStream's `start_time` takes; `None`
/// past the years RFC 3339 can write (9999), where no message can be.
pub fn format_time_ms(ms: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetstream_timestamps_read_as_milliseconds_rounded_down_and_back() {
        assert_eq!(
            parse_time_ms("2026-12-06T07:41:51.123999999Z"),
            Some(1_796_542_911_123)
        );
        assert_eq!(
            parse_time_ms("2026-12-06T07:41:51Z"),
            Some(1_796_542_911_000)
        );
        assert_eq!(parse_time_ms("1969-12-31T23:59:59.5Z"), Some(0));
        assert_eq!(parse_time_ms("yesterday"), None);
        let text = format_time_ms(1_796_542_911_123).unwrap();
        assert_eq!(parse_time_ms(&text), Some(1_796_542_911_123), "{text}");
        assert_eq!(format_time_ms(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(format_time_ms(u64::MAX), None);
    }
}
