//! Retention applied: the writer's background compaction, in bounded steps between commits.
//!
//! A pass (every `check_every`) does three things, each bounded so commits never wait long:
//! 1. **Per-topic trim**: for each topic over a limit of its rule, the oldest events go: their
//!    index entries are deleted (or rewritten without them) in the same atomic batch as the
//!    topic's new record (`removed_through` raised), so a reader either sees them with their
//!    index or not at all, and a cursor older than what went gets the gap signal.
//! 2. **Global budget**: while all topics together retain more payload bytes than the budget,
//!    the oldest prefix of the whole log goes ([`Writer::remove_through`]).
//! 3. **Chunk reclaim**: a chunk all of whose events are removed is deleted. A chunk still
//!    holding one retained event stays whole (space amplification, reported by `inspect`).
//!
//! Removal is not flushed: a crash can only bring back events the next pass removes again.

use super::*;
use crate::log::retention::Limits;

/// Most events one pass examines for per-topic trimming.
const TRIM_STEP_EVENTS: usize = 20_000;
/// Most chunks one pass examines for reclaiming.
const RECLAIM_STEP_CHUNKS: usize = 512;
/// Most chunks one pass walks to find the prefix the global budget removes.
const BUDGET_STEP_CHUNKS: usize = 4096;

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Events removed by per-topic limits.
    pub trimmed: u64,
    /// Events removed by the global byte budget.
    pub over_budget: u64,
    /// Chunks deleted because nothing in them was retained any more.
    pub chunks_reclaimed: u64,
    /// Whether a step stopped at its bound with work left: the next step follows the next
    /// commit round instead of waiting for the period.
    pub more: bool,
}

impl Writer {
    /// One compaction pass (see the module doc). Written state is made visible first, so
    /// compaction only ever works on what readers can see.
    pub(super) fn compact(&mut self) -> Result<Compacted, LogError> {
        self.flush_and_publish();
        if !self.unpublished.events.is_empty() {
            return Err(LogError::Storage(
                "the log cannot be flushed; retention waits".into(),
            ));
        }
        let now = now_ms();
        let (trimmed, trim_more) = self.trim_topics(now)?;
        let over_budget = self.enforce_budget()?;
        if trimmed + over_budget > 0 {
            self.removals += 1;
        }
        // Chunks only die when events are removed: an idle log is not rescanned.
        let reclaim = self.reclaim_cursor != 0 || self.removals != self.reclaimed_through;
        let (chunks_reclaimed, reclaim_more) = if reclaim {
            if self.reclaim_cursor == 0 {
                self.reclaim_cycle_start = self.removals;
            }
            self.reclaim_chunks()?
        } else {
            (0, false)
        };
        if reclaim && !reclaim_more {
            // A whole cycle from the oldest chunk has seen every removal made before it began.
            self.reclaimed_through = self.reclaim_cycle_start;
        }
        Ok(Compacted {
            trimmed,
            over_budget,
            chunks_reclaimed,
            more: trim_more || reclaim_more,
        })
    }

    /// Step 1: every topic over a limit of its rule loses its oldest events.
    fn trim_topics(&mut self, now: u64) -> Result<(u64, bool), LogError> {
        // When even the oldest stored chunk is younger than the shortest age limit, no age
        // limit can fire: topics within their count and bytes then need no read at all.
        let oldest = match self.shared.tree.scan_prefix([record::CHUNK_PREFIX]).next() {
            Some(item) => {
                let (_, v) = item.map_err(storage)?;
                let chunk = Chunk::parse(&v).map_err(corrupt)?;
                record::peek_event(chunk.record(0).map_err(corrupt)?)
                    .map_err(corrupt)?
                    .time
            }
            None => return Ok((0, false)),
        };
        let candidates: Vec<(Topic, TopicRecord, Limits)> = {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            reg.iter()
                .filter(|(_, r)| r.count > 0)
                .filter_map(|(t, r)| {
                    let limits = self.retention.limits_for(t);
                    let age_may_fire = limits.max_age_secs > 0
                        && oldest.saturating_add(limits.max_age_secs.saturating_mul(1000)) <= now;
                    let may_drop = age_may_fire
                        || (limits.max_events > 0 && r.count > limits.max_events)
                        || (limits.max_bytes > 0 && r.bytes > limits.max_bytes);
                    may_drop.then(|| (t.clone(), *r, limits))
                })
                .collect()
        };
        if candidates.is_empty() {
            return Ok((0, false));
        }
        let tree = self.shared.tree.clone();
        let mut batch = sled::Batch::default();
        let mut delta = HashMap::new();
        let mut budget = TRIM_STEP_EVENTS;
        let mut removed = 0;
        let mut chunks = ChunkTimes::default();
        for (topic, mut rec, limits) in candidates {
            let n = trim_topic(
                &tree,
                &mut batch,
                &mut rec,
                limits,
                now,
                &mut budget,
                &mut chunks,
            )?;
            if n > 0 {
                removed += n;
                delta.insert(topic, rec);
            }
            if budget == 0 {
                break;
            }
        }
        let more = budget == 0;
        if removed == 0 {
            return Ok((0, more));
        }
        for (t, r) in &delta {
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        tree.apply_batch(batch).map_err(storage)?;
        self.publish(delta, Vec::new());
        Ok((removed, more))
    }

    /// Step 2: the oldest prefix of the log goes while the retained bytes exceed the budget.
    fn enforce_budget(&mut self) -> Result<u64, LogError> {
        let max = self.retention.max_total_bytes;
        if max == 0 {
            return Ok(0);
        }
        let (total, removed_through): (u64, HashMap<String, u64>) = {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            (
                reg.values().map(|r| r.bytes).sum(),
                reg.iter()
                    .map(|(t, r)| (t.as_str().to_string(), r.removed_through))
                    .collect(),
            )
        };
        if total <= max {
            return Ok(0);
        }
        let excess = total - max;
        let mut freed = 0u64;
        let mut cut = None;
        'walk: for item in self
            .shared
            .tree
            .scan_prefix([record::CHUNK_PREFIX])
            .take(BUDGET_STEP_CHUNKS)
        {
            let (k, v) = item.map_err(storage)?;
            let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
            let chunk = Chunk::parse(&v).map_err(corrupt)?;
            for i in 0..chunk.len() {
                let id = first.saturating_add(i as u64);
                let peek =
                    record::peek_event(chunk.record(i).map_err(corrupt)?).map_err(corrupt)?;
                if removed_through.get(peek.topic).is_some_and(|&r| id > r) {
                    freed += peek.data_len as u64;
                }
                cut = Some(id);
                if freed >= excess {
                    break 'walk;
                }
            }
        }
        match cut {
            Some(through) => self.remove_through(EventId(through)),
            None => Ok(0),
        }
    }

    /// Step 3: chunks whose every event is removed are deleted. Each step goes on from where
    /// the last one stopped, so chunks pinned by a long-kept event are passed, not rescanned.
    fn reclaim_chunks(&mut self) -> Result<(u64, bool), LogError> {
        let tree = &self.shared.tree;
        let mut batch = sled::Batch::default();
        let mut reclaimed = 0;
        let mut scanned = 0;
        let from = record::chunk_key(self.reclaim_cursor);
        let to = record::chunk_key(u64::MAX);
        {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            for item in tree.range(from..=to).take(RECLAIM_STEP_CHUNKS) {
                let (k, v) = item.map_err(storage)?;
                scanned += 1;
                let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
                self.reclaim_cursor = first.saturating_add(1);
                let chunk = Chunk::parse(&v).map_err(corrupt)?;
                let mut dead = true;
                for i in 0..chunk.len() {
                    let id = first.saturating_add(i as u64);
                    let peek =
                        record::peek_event(chunk.record(i).map_err(corrupt)?).map_err(corrupt)?;
                    if reg.get(peek.topic).is_none_or(|r| id > r.removed_through) {
                        dead = false;
                        break;
                    }
                }
                if dead {
                    batch.remove(k);
                    reclaimed += 1;
                }
            }
        }
        if reclaimed > 0 {
            tree.apply_batch(batch).map_err(storage)?;
        }
        let more = scanned == RECLAIM_STEP_CHUNKS;
        if !more {
            // The end: the next pass starts again from the oldest chunk.
            self.reclaim_cursor = 0;
        }
        Ok((reclaimed, more))
    }
}

/// Commit times of the chunks one pass has looked at (every event of a chunk was committed
/// together, so one time serves the whole chunk).
#[derive(Default)]
struct ChunkTimes {
    chunks: HashMap<u64, IVec>,
}

impl ChunkTimes {
    /// The stored chunk starting at `first`.
    fn get(&mut self, tree: &sled::Tree, first: u64) -> Result<&IVec, LogError> {
        if self.chunks.len() > 256 && !self.chunks.contains_key(&first) {
            self.chunks.clear();
        }
        match self.chunks.entry(first) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let Some(v) = tree.get(record::chunk_key(first)).map_err(storage)? else {
                    return Err(LogError::Corrupt(format!(
                        "an index entry names the missing chunk {first}"
                    )));
                };
                Ok(e.insert(v))
            }
        }
    }
}

/// Removes the oldest events of one topic while its limits say so, writing the index changes
/// into `batch` and updating `rec`. Returns how many events it removed.
fn trim_topic(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    rec: &mut TopicRecord,
    limits: Limits,
    now: u64,
    budget: &mut usize,
    chunks: &mut ChunkTimes,
) -> Result<u64, LogError> {
    let tid = rec.topic_id;
    let mut removed = 0u64;
    let mut next_kept = None;
    let mut offsets = Vec::new();
    let entries = tree.range(record::index_key(tid, 0)..=record::index_key(tid, u64::MAX));
    for item in entries {
        let (k, v) = item.map_err(storage)?;
        let (_, first) = record::index_key_parts(&k).map_err(corrupt)?;
        record::decode_index_into(&v, &mut offsets).map_err(corrupt)?;
        if *budget == 0 {
            next_kept = offsets.first().map(|&o| first + u64::from(o));
            break;
        }
        let chunk_bytes = chunks.get(tree, first)?;
        let chunk = Chunk::parse(chunk_bytes).map_err(corrupt)?;
        let mut dropped = 0;
        for &off in &offsets {
            let id = first + u64::from(off);
            let i = usize::try_from(off).unwrap_or(usize::MAX);
            let peek = record::peek_event(chunk.record(i).map_err(corrupt)?).map_err(corrupt)?;
            if !limits.drops_oldest(peek.time, rec.count, rec.bytes, now) || *budget == 0 {
                next_kept = Some(id);
                break;
            }
            *budget -= 1;
            rec.count -= 1;
            rec.bytes = rec.bytes.saturating_sub(peek.data_len as u64);
            rec.removed_through = rec.removed_through.max(id);
            dropped += 1;
            removed += 1;
        }
        if dropped == offsets.len() {
            batch.remove(k);
        } else if dropped > 0 {
            batch.insert(k, record::encode_index(&offsets[dropped..]));
        }
        if next_kept.is_some() {
            break;
        }
    }
    if let Some(id) = next_kept {
        rec.first_id = id;
    }
    Ok(removed)
}
