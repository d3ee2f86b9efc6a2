//! Operator views of a log at rest: what it holds ([`SledLog::inspect`]), whether every stored
//! structure agrees with every other ([`SledLog::verify`]), and restoring an export with its
//! ids and times ([`SledLog::import`]).
//!
//! These read sled directly (they are the engine's own checks), but never change anything
//! except `import`, which only writes into a log that has never held an event.

use serde::Serialize;

use super::*;

/// What a log holds, as `tidewire inspect` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The on-disk format.
    pub format: String,
    /// Retained events.
    pub events: u64,
    /// Oldest retained id (`None` when nothing is retained).
    pub first_id: Option<u64>,
    /// Newest id ever stored (0 when none ever was).
    pub last_id: u64,
    /// Topics ever published to.
    pub topics: usize,
    /// Retained payload bytes.
    pub bytes: u64,
    /// Stored chunks.
    pub chunks: u64,
    /// Stored per-topic index entries.
    pub index_entries: u64,
    /// Remembered `(topic, msg_id)` pairs.
    pub dedupe_entries: u64,
    /// Topics that retention has trimmed.
    pub trimmed_topics: usize,
    /// Bytes the data directory takes on disk.
    pub disk_bytes: u64,
    /// `disk_bytes / bytes` (space amplification); `None` when nothing is retained.
    pub space_amplification: Option<f64>,
    /// What the write-ahead log held when this log was opened (replayed then, so it is
    /// empty while the log is open).
    pub wal: WalRecovery,
    /// The biggest topics by retained bytes (at most 20).
    pub largest_topics: Vec<TopicStats>,
}

/// What `tidewire verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Chunks read.
    pub chunks: u64,
    /// Event records decoded.
    pub events: u64,
    /// Index entries checked.
    pub index_entries: u64,
    /// Every disagreement found (the first 100).
    pub problems: Vec<String>,
    /// Disagreements found in all (may exceed the list).
    pub problem_count: u64,
    /// The write-ahead log as the open found it: every record's checksums were checked
    /// then (damage before acknowledged records refuses the open itself).
    pub wal: WalRecovery,
}

impl Verification {
    /// Whether the log is consistent.
    pub fn healthy(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < 100 {
            self.problems.push(p);
        }
    }
}

/// One event to import: its original id and commit time.
#[derive(Debug, Clone)]
pub struct ImportEvent {
    /// The id it had (ids must increase).
    pub id: u64,
    /// Its commit time, Unix milliseconds.
    pub time: u64,
    /// The event.
    pub event: NewEvent,
}

/// What verify tallies per topic while walking the chunks.
#[derive(Default)]
struct Tally {
    live: u64,
    bytes: u64,
    first: Option<u64>,
    newest: u64,
    indexed: u64,
}

impl SledLog {
    /// What the log holds. Counts stored keys, so it costs a scan of the chunk and index keys
    /// (not of the events).
    pub fn inspect(&self) -> Result<Inspection, LogError> {
        let tree = &self.shared.tree;
        let format = tree
            .get(record::FORMAT_KEY)
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let chunks = tree.scan_prefix([record::CHUNK_PREFIX]).keys().count() as u64;
        let index_entries = tree.scan_prefix([record::INDEX_PREFIX]).keys().count() as u64;
        let dedupe_entries = match tree.get(record::DEDUPE_COUNT_KEY).map_err(storage)? {
            Some(v) => record::decode_count(&v).map_err(corrupt)?,
            None => 0,
        };
        let mut all = self.topics_now(None, usize::MAX);
        let (events, bytes) = all
            .iter()
            .fold((0, 0), |(n, b), t| (n + t.count, b + t.bytes.unwrap_or(0)));
        let first_id = all.iter().filter_map(|t| t.first_id).min();
        let trimmed_topics = {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            reg.values().filter(|r| r.removed_through > 0).count()
        };
        let disk_bytes = self.db.size_on_disk().map_err(storage)?;
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.topic.cmp(&b.topic)));
        let topics = all.len();
        all.truncate(20);
        Ok(Inspection {
            format,
            events,
            first_id,
            last_id: self.head().0,
            topics,
            bytes,
            chunks,
            index_entries,
            dedupe_entries,
            trimmed_topics,
            disk_bytes,
            space_amplification: (bytes > 0).then(|| disk_bytes as f64 / bytes as f64),
            wal: self.recovery.clone(),
            largest_topics: all,
        })
    }

    /// Checks that every stored structure agrees: every chunk and record decodes, chunks do
    /// not overlap and lie within the head, every index entry points at records of its topic
    /// in an existing chunk, every retained event is indexed exactly once, and each topic's
    /// statistics equal what its events add up to. Reads everything: it costs the size of
    /// the log.
    pub fn verify(&self) -> Result<Verification, LogError> {
        let tree = &self.shared.tree;
        let head = self.head().0;
        let mut v = Verification {
            wal: self.recovery.clone(),
            ..Verification::default()
        };
        let reg = self
            .shared
            .registry
            .read()
            .map_err(|_| LogError::Closed)?
            .clone();
        let by_id: HashMap<u64, (&Topic, &TopicRecord)> =
            reg.iter().map(|(t, r)| (r.topic_id, (t, r))).collect();
        let mut tally: HashMap<&str, Tally> = HashMap::new();
        let mut prev_last: Option<u64> = None;
        for item in tree.scan_prefix([record::CHUNK_PREFIX]) {
            let (k, val) = item.map_err(storage)?;
            v.chunks += 1;
            let first = match record::chunk_first_of_key(&k) {
                Ok(f) => f,
                Err(e) => {
                    v.problem(e.0);
                    continue;
                }
            };
            let chunk = match Chunk::parse(&val) {
                Ok(c) => c,
                Err(e) => {
                    v.problem(format!("chunk {first}: {}", e.0));
                    continue;
                }
            };
            let last = first.saturating_add(chunk.len() as u64).saturating_sub(1);
            if prev_last.is_some_and(|p| first <= p) {
                v.problem(format!("chunk {first} overlaps the chunk before it"));
            }
            if last > head {
                v.problem(format!(
                    "chunk {first} holds ids up to {last}, past the head {head}"
                ));
            }
            prev_last = Some(last);
            for i in 0..chunk.len() {
                let id = first.saturating_add(i as u64);
                let event = chunk.event(i);
                v.events += 1;
                let (_, ev) = match event {
                    Ok(e) => e,
                    Err(e) => {
                        v.problem(format!("event {id}: {}", e.0));
                        continue;
                    }
                };
                let Some((name, rec)) = reg.get_key_value(ev.topic.as_str()) else {
                    v.problem(format!(
                        "event {id} has a topic with no record: {}",
                        ev.topic
                    ));
                    continue;
                };
                let t = tally.entry(name.as_str()).or_default();
                t.newest = t.newest.max(id);
                if id > rec.removed_through {
                    t.live += 1;
                    t.bytes += ev.data.len() as u64;
                    t.first.get_or_insert(id);
                }
            }
        }
        let mut offsets = Vec::new();
        let mut chunk_cache: Option<(u64, IVec)> = None;
        for item in tree.scan_prefix([record::INDEX_PREFIX]) {
            let (k, val) = item.map_err(storage)?;
            v.index_entries += 1;
            let (tid, first) = match record::index_key_parts(&k) {
                Ok(p) => p,
                Err(e) => {
                    v.problem(e.0);
                    continue;
                }
            };
            let Some(&(topic, rec)) = by_id.get(&tid) else {
                v.problem(format!("index entry of unknown topic id {tid}"));
                continue;
            };
            if let Err(e) = record::decode_index_into(&val, &mut offsets) {
                v.problem(format!("index entry ({topic}, {first}): {}", e.0));
                continue;
            }
            if chunk_cache.as_ref().is_none_or(|(f, _)| *f != first) {
                match tree.get(record::chunk_key(first)).map_err(storage)? {
                    Some(c) => chunk_cache = Some((first, c)),
                    None => {
                        v.problem(format!(
                            "index entry ({topic}, {first}) names a missing chunk"
                        ));
                        continue;
                    }
                }
            }
            let Some((_, bytes)) = &chunk_cache else {
                continue;
            };
            let Ok(chunk) = Chunk::parse(bytes) else {
                continue; // already reported with the chunk
            };
            for &off in &offsets {
                let id = first + u64::from(off);
                let rec_topic = chunk
                    .record(off as usize)
                    .and_then(record::peek_event)
                    .map(|p| p.topic == topic.as_str());
                match rec_topic {
                    Ok(true) => {}
                    Ok(false) => v.problem(format!(
                        "index of {topic} names event {id} of another topic"
                    )),
                    Err(e) => v.problem(format!("index of {topic} names event {id}: {}", e.0)),
                }
                if id <= rec.removed_through {
                    v.problem(format!("index of {topic} still names removed event {id}"));
                }
            }
            tally.entry(topic.as_str()).or_default().indexed += offsets.len() as u64;
        }
        for (topic, rec) in &reg {
            let t = tally.remove(topic.as_str()).unwrap_or_default();
            if t.live != rec.count || t.bytes != rec.bytes {
                v.problem(format!(
                    "{topic}: record says {} events / {} bytes, the chunks hold {} / {}",
                    rec.count, rec.bytes, t.live, t.bytes
                ));
            }
            if t.indexed != t.live {
                v.problem(format!(
                    "{topic}: {} retained events but {} index offsets",
                    t.live, t.indexed
                ));
            }
            if rec.count > 0 && t.first != Some(rec.first_id) {
                v.problem(format!(
                    "{topic}: record says the oldest is {}, the chunks say {:?}",
                    rec.first_id, t.first
                ));
            }
            if t.newest > rec.last_id {
                v.problem(format!(
                    "{topic}: holds event {} past its last id {}",
                    t.newest, rec.last_id
                ));
            }
        }
        Ok(v)
    }

    /// Restores exported events with their ids and times, in one atomic, flushed batch per
    /// call. Only into a log whose ids are all below the first imported one (an empty log
    /// for a restore), with ids strictly increasing; ids continue after the last imported.
    pub async fn import(&self, events: Vec<ImportEvent>) -> Result<u64, LogError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Command::Import { events, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }
}

impl Writer {
    /// Writes imported events with their own ids and times (see [`SledLog::import`]).
    pub(super) fn import(&mut self, events: Vec<ImportEvent>) -> Result<u64, LogError> {
        self.flush_and_publish();
        let mut prev = self.next_id.saturating_sub(1);
        for e in &events {
            if e.id <= prev {
                return Err(LogError::Storage(format!(
                    "imported id {} does not come after {prev}: ids must increase, above \
                     every id the log already has",
                    e.id
                )));
            }
            prev = e.id;
        }
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(0);
        };
        let count = events.len() as u64;
        let (delta, committed) = self.write_with_ids(events, now_ms())?;
        self.next_id = last + 1;
        self.last_applied = last;
        self.flush_store()?;
        self.publish(delta, committed);
        Ok(count)
    }

    /// Applies events with their own ids and times to sled in one atomic batch (not synced,
    /// not visible): dedupe entries (their expiry bucket dated `bucket_time`), chunks, index
    /// entries and topic records, as a commit writes them. Returns what [`Writer::publish`]
    /// needs to make them visible.
    pub(super) fn write_with_ids(
        &mut self,
        events: Vec<ImportEvent>,
        bucket_time: u64,
    ) -> Result<(HashMap<Topic, TopicRecord>, Vec<SharedEvent>), LogError> {
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut committed = Vec::with_capacity(events.len());
        {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            for ImportEvent { id, time, event } in events {
                // Replayed and imported events keep their time; later commits never go below.
                self.last_time = self.last_time.max(time);
                if let Some(m) = event.msg_id.as_deref() {
                    if self
                        .dedupe
                        .check(&self.shared.tree, event.topic.as_str(), m, time)?
                        .is_none()
                    {
                        self.dedupe.record(&mut batch, id, time);
                    }
                }
                let rec = count_event(
                    &mut delta,
                    &self.unpublished.topics,
                    &reg,
                    &mut self.next_topic_id,
                    &event,
                    id,
                );
                if let Err(e) = self.chunk.push(&mut batch, id, rec.topic_id, time, &event) {
                    self.chunk.clear();
                    self.dedupe.abort_round();
                    return Err(e);
                }
                committed.push(Arc::new(Event::new(EventId(id), time, event)));
            }
        }
        self.chunk.close(&mut batch);
        self.dedupe.finish_round(&mut batch, bucket_time);
        for (t, r) in &delta {
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        if let Err(e) = self.shared.tree.apply_batch(batch) {
            self.dedupe.abort_round();
            return Err(storage(e));
        }
        self.dedupe.commit_round();
        Ok((delta, committed))
    }
}
