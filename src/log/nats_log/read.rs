//! Reads by cursor and topic statistics, from the stream itself.
//!
//! A pattern set becomes a few subject filters; each is read with one batched direct get
//! from the cursor, and the answers are merged by sequence. Any replica may answer a direct
//! get, and a follower may not yet hold the newest messages (never older ones: it stores the
//! stream in order). So when a replica says a filter has nothing more, the stream leader is
//! asked for the filter's next match after what came back: one at or below this gateway's
//! head means the replica lagged, and the filter is read again. A read costs what it returns
//! plus two requests per filter, never the size of the stream.

use std::collections::BTreeMap;

use super::api::{self, Batch};
use super::{subject, wire, Inner};
use crate::envelope::{EventId, Gap, SharedEvent};
use crate::log::{Latest, LogError, Page, TimeStart, TopicStats};
use crate::topic::{Pattern, PatternSet, Topic};

/// Most direct gets of topic statistics in flight at once.
const STATS_IN_FLIGHT: usize = 16;

/// Reads up to `limit` events matching `patterns` after `after`, up to the gateway's head.
pub async fn read(
    inner: &Inner,
    patterns: &PatternSet,
    after: u64,
    limit: usize,
) -> Result<Page, LogError> {
    inner.check_ready()?;
    let head = inner.head();
    let limit = limit.max(1);
    let mut after = after;
    let mut gap = None;
    // Retention removes the stream's oldest events (age, total bytes): a cursor below the
    // stream's first sequence may have missed some, and is told so. Cursor 0 asks for the
    // oldest retained event and has missed nothing.
    if after > 0 && after < head {
        let state = api::stream_state(inner).await?;
        if state.first_seq > after + 1 {
            gap = Some(Gap {
                requested: after,
                oldest: state.first_seq,
            });
            after = state.first_seq - 1;
        }
    }
    if after >= head {
        return Ok(Page {
            gap,
            events: Vec::new(),
            through: EventId(head.max(after)),
            complete: true,
        });
    }
    let mut filters: Vec<String> = patterns
        .patterns()
        .iter()
        .flat_map(|p| subject::pattern_filters(&inner.wanted.prefix, p))
        .collect();
    filters.sort();
    filters.dedup();
    let batches = futures_util::future::try_join_all(
        filters
            .iter()
            .map(|f| read_filter(inner, f, after, limit, head)),
    )
    .await?;
    let (events, through) = merge(&inner.wanted.prefix, batches, after, head, limit);
    Ok(Page {
        gap,
        events,
        through: EventId(through),
        complete: through >= head,
    })
}

/// Times a filter is read again when the replica that answered lagged behind the head.
const LAGGING_REPLICA_TRIES: u32 = 20;

/// One filter's events after `after`: a batch that is complete up to `head` when it says it
/// is exhausted (checked with the stream leader), else up to its last message.
async fn read_filter(
    inner: &Inner,
    filter: &str,
    after: u64,
    limit: usize,
    head: u64,
) -> Result<Batch, LogError> {
    for attempt in 0..LAGGING_REPLICA_TRIES {
        let batch = api::direct_batch(inner, filter, after + 1, limit).await?;
        if !batch.exhausted {
            return Ok(batch);
        }
        let seen = batch.messages.last().map_or(after, |m| m.seq);
        if seen >= head {
            return Ok(batch);
        }
        let next = api::leader_get(
            inner,
            serde_json::json!({ "seq": seen + 1, "next_by_subj": filter }),
        )
        .await?;
        match next {
            Some(n) if n <= head => {
                tracing::debug!(
                    filter,
                    seen,
                    missed = n,
                    head,
                    "a lagging replica answered; reading again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2 * u64::from(attempt + 1)))
                    .await;
            }
            _ => return Ok(batch),
        }
    }
    Err(LogError::Unavailable(format!(
        "the replicas answering reads of {filter} stay behind sequence {head}"
    )))
}

/// Merges the filters' answers: the events up to the highest sequence every filter has
/// answered for (a filter that stopped at its batch size has answered only that far), in
/// sequence order, each once, at most `limit`.
fn merge(
    prefix: &str,
    batches: Vec<Batch>,
    after: u64,
    head: u64,
    limit: usize,
) -> (Vec<SharedEvent>, u64) {
    let mut through = head;
    for b in &batches {
        if !b.exhausted {
            through = through.min(b.messages.last().map_or(after, |m| m.seq));
        }
    }
    let mut by_seq: BTreeMap<u64, api::Stored> = BTreeMap::new();
    for b in batches {
        for m in b.messages {
            if m.seq > after && m.seq <= through {
                by_seq.entry(m.seq).or_insert(m);
            }
        }
    }
    let mut events = Vec::with_capacity(by_seq.len().min(limit));
    for (seq, m) in by_seq {
        if events.len() == limit {
            break;
        }
        if let Some(e) = decode(prefix, seq, m) {
            events.push(e);
        }
        if events.len() == limit {
            through = seq;
        }
    }
    (events, through)
}

/// Statistics of the topics matching `filter`, in name order, at most `limit`.
pub async fn topics(
    inner: &Inner,
    filter: Option<&Pattern>,
    limit: usize,
) -> Result<Vec<TopicStats>, LogError> {
    inner.check_ready()?;
    let filters = match filter {
        Some(p) => subject::pattern_filters(&inner.wanted.prefix, p),
        None => vec![inner.wanted.subjects()],
    };
    let mut counts: BTreeMap<String, (Topic, u64)> = BTreeMap::new();
    for f in &filters {
        for (subject, count) in api::subject_counts(inner, f).await? {
            if let Some(t) = subject::subject_topic(&inner.wanted.prefix, &subject) {
                counts.insert(t.as_str().to_owned(), (t, count));
            }
        }
    }
    use futures_util::StreamExt;
    let wanted: Vec<(Topic, u64)> = counts.into_values().take(limit).collect();
    let stats: Vec<Result<Option<TopicStats>, LogError>> = futures_util::stream::iter(wanted)
        .map(|(t, count)| async move { stats_of(inner, &t, count).await })
        .buffered(STATS_IN_FLIGHT)
        .collect()
        .await;
    let mut out = Vec::new();
    for s in stats {
        out.extend(s?);
    }
    Ok(out)
}

/// The newest retained event of each topic matching `patterns` whose newest event is at
/// most `at_most` (see [`EventLog::latest`](crate::log::EventLog::latest)), for at most
/// `limit` topics by name: the matching subjects from the stream's subject counts, then per
/// topic its last sequence (`last_by_subj`, asked of the leader) and that message (a direct
/// get). Costs two requests per matching topic, never the size of the stream.
pub async fn latest(
    inner: &Inner,
    patterns: &PatternSet,
    at_most: u64,
    limit: usize,
) -> Result<Latest, LogError> {
    inner.check_ready()?;
    let at_most = at_most.min(inner.head());
    let prefix = &inner.wanted.prefix;
    let mut names: BTreeMap<String, Topic> = BTreeMap::new();
    for p in patterns.patterns() {
        for f in subject::pattern_filters(prefix, p) {
            for (subject, count) in api::subject_counts(inner, &f).await? {
                match subject::subject_topic(prefix, &subject) {
                    // A filter may be wider than its pattern: the pattern decides.
                    Some(t) if count > 0 && patterns.matches(&t) => {
                        names.insert(t.as_str().to_owned(), t);
                    }
                    _ => {}
                }
            }
        }
    }
    let truncated = names.len() > limit;
    use futures_util::StreamExt;
    let found: Vec<Result<Option<SharedEvent>, LogError>> =
        futures_util::stream::iter(names.into_values().take(limit))
            .map(|t| async move {
                let subject = subject::topic_subject(prefix, &t);
                let last =
                    api::leader_get(inner, serde_json::json!({ "last_by_subj": subject })).await?;
                let Some(seq) = last.filter(|s| *s <= at_most) else {
                    // None retained, or newer than the snapshot: reading on delivers it.
                    return Ok(None);
                };
                let batch = api::direct_batch(inner, &subject, seq, 1).await?;
                Ok(batch
                    .messages
                    .into_iter()
                    .find(|m| m.seq == seq)
                    .and_then(|m| decode(prefix, seq, m)))
            })
            .buffered(STATS_IN_FLIGHT)
            .collect()
            .await;
    let mut events = Vec::new();
    for f in found {
        events.extend(f?);
    }
    events.sort_by_key(|e| e.id);
    Ok(Latest {
        events,
        cursor: EventId(at_most),
        truncated,
    })
}

/// Where a start at `time_ms` begins (see
/// [`EventLog::time_start`](crate::log::EventLog::time_start)): the first message of the stream
/// whose JetStream timestamp is at or after `time_ms`, by JetStream's own lookup by time
/// (`start_time` with the stream's subjects as `next_by_subj`, asked of the leader, which
/// never lags), a binary search over the stored timestamps that date the events (see
/// [`wire::decode`]), so the cut agrees with the `time` clients see. Then the stream's first
/// sequence, for the gap. Two requests, never a scan.
///
/// The cut is stream-wide, not per pattern: every event after it is at or after the time,
/// whichever topic it is on. The gap is stream-wide too, as for reads by cursor: when the
/// start lies at or before the oldest retained event and the stream's limits removed events
/// (of any topic), those may have been at or after the time.
pub async fn time_start(inner: &Inner, time_ms: u64) -> Result<TimeStart, LogError> {
    inner.check_ready()?;
    let head = inner.head();
    // Past the years RFC 3339 can write no message can be: nothing is at or after it.
    let first_at_or_after =
        match api::format_time_ms(time_ms) {
            Some(at) => api::leader_get(
                inner,
                serde_json::json!({ "start_time": at, "next_by_subj": inner.wanted.subjects() }),
            )
            .await?,
            None => None,
        };
    // What is beyond this gateway's head arrives live; the subscription drops what is dated
    // before the start, so a cut past the head is the head.
    let Some(seq) = first_at_or_after else {
        return Ok(TimeStart {
            cursor: EventId(head),
            gap: None,
        });
    };
    let state = api::stream_state(inner).await?;
    if seq <= state.first_seq && state.first_seq > 1 {
        return Ok(TimeStart {
            cursor: EventId((state.first_seq - 1).min(head)),
            gap: Some(Gap {
                requested: 0,
                oldest: state.first_seq,
            }),
        });
    }
    Ok(TimeStart {
        cursor: EventId((seq - 1).min(head)),
        gap: None,
    })
}

/// Statistics of one topic; `None` when the stream retains none of its events.
pub async fn topic(inner: &Inner, topic: &Topic) -> Result<Option<TopicStats>, LogError> {
    inner.check_ready()?;
    let subject = subject::topic_subject(&inner.wanted.prefix, topic);
    let count = api::subject_counts(inner, &subject)
        .await?
        .into_iter()
        .find(|(s, _)| *s == subject)
        .map_or(0, |(_, n)| n);
    if count == 0 {
        return Ok(None);
    }
    stats_of(inner, topic, count).await
}

async fn stats_of(
    inner: &Inner,
    topic: &Topic,
    count: u64,
) -> Result<Option<TopicStats>, LogError> {
    let subject = subject::topic_subject(&inner.wanted.prefix, topic);
    let first = api::leader_get(
        inner,
        serde_json::json!({ "seq": 1, "next_by_subj": subject }),
    );
    let last = api::leader_get(inner, serde_json::json!({ "last_by_subj": subject }));
    let (first, last) = futures_util::future::try_join(first, last).await?;
    let (Some(first), Some(last)) = (first, last) else {
        // Retention removed the topic's last events between the count and the gets.
        return Ok(None);
    };
    Ok(Some(TopicStats {
        topic: topic.as_str().to_owned(),
        first_id: Some(first),
        last_id: last,
        count,
        bytes: None,
    }))
}

/// The event a direct-get message holds (`None` for one that is not tidewire's), dated by
/// JetStream's stored timestamp.
fn decode(prefix: &str, seq: u64, m: api::Stored) -> Option<SharedEvent> {
    wire::decode(
        prefix,
        &m.subject,
        seq,
        Some(&m.headers),
        m.payload,
        m.time_ms,
    )
    .map(std::sync::Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Data, NewEvent};

    const P: &str = "tidewire.r";

    fn stored(seq: u64, topic: &str) -> api::Stored {
        let event = NewEvent {
            topic: Topic::parse(topic).unwrap(),
            event_type: None,
            msg_id: None,
            data: Data::Json(seq.to_string().into()),
        };
        let (headers, payload) = wire::encode(&event);
        api::Stored {
            seq,
            subject: subject::topic_subject(P, &event.topic),
            time_ms: 1,
            headers,
            payload,
        }
    }

    fn batch(seqs: &[(u64, &str)], exhausted: bool) -> Batch {
        Batch {
            messages: seqs.iter().map(|(s, t)| stored(*s, t)).collect(),
            exhausted,
        }
    }

    fn ids(events: &[SharedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.id.0).collect()
    }

    #[test]
    fn a_filter_cut_short_by_its_batch_size_bounds_what_the_page_claims() {
        // Filter one stopped at its batch size at 5; filter two said it has nothing more.
        let (events, through) = merge(
            P,
            vec![
                batch(&[(2, "a"), (5, "a")], false),
                batch(&[(3, "b"), (9, "b")], true),
            ],
            1,
            20,
            100,
        );
        assert_eq!(
            ids(&events),
            vec![2, 3, 5],
            "9 waits until filter one got past it"
        );
        assert_eq!(through, 5);
    }

    #[test]
    fn overlapping_filters_give_each_event_once_in_order_and_limit_cuts_the_page() {
        let (events, through) = merge(
            P,
            vec![
                batch(&[(4, "a"), (6, "a/b")], true),
                batch(&[(6, "a/b"), (7, "a/c")], true),
            ],
            3,
            10,
            100,
        );
        assert_eq!(ids(&events), vec![4, 6, 7]);
        assert_eq!(through, 10, "complete up to the head");
        let (events, through) = merge(
            P,
            vec![batch(&[(4, "a"), (6, "a/b"), (7, "a/c")], true)],
            3,
            10,
            2,
        );
        assert_eq!(ids(&events), vec![4, 6]);
        assert_eq!(
            through, 6,
            "the next page starts after the last event given"
        );
    }

    #[test]
    fn nothing_past_the_head_is_given() {
        let (events, through) = merge(P, vec![batch(&[(4, "a"), (12, "a")], true)], 0, 10, 100);
        assert_eq!(ids(&events), vec![4]);
        assert_eq!(through, 10);
    }
}
