//! The single writer: assigns ids, groups queued appends into chunks, writes one atomic
//! batch to sled and one record to the write-ahead log, syncs the WAL, then makes the commit
//! visible (registry, head, hub) and acknowledges. sled itself is flushed in the background
//! (see [`super::checkpoint`]).

use super::*;

/// The single writer: assigns ids, writes, syncs the WAL, then publishes and acknowledges.
pub(super) struct Writer {
    /// sled and what its flush must sync.
    pub(super) store: StoreSync,
    /// The write-ahead log: what acknowledging waits for.
    pub(super) wal: Wal,
    /// Events were applied to sled that no WAL record holds (a WAL write failed): until a
    /// flush of sled covers them, durability means flushing sled.
    pub(super) store_behind_wal: bool,
    /// Dropped to stop the spare maker (see [`checkpoint::SpareMaker`]).
    pub(super) spare_stop: Option<std::sync::mpsc::SyncSender<()>>,
    /// The spare maker's thread, joined at shutdown.
    pub(super) spare_maker: Option<std::thread::JoinHandle<()>>,
    /// The checkpoint on disk: sled durably holds every event up to it.
    pub(super) checkpointed: u64,
    /// When the last checkpoint was taken (or the log opened).
    pub(super) last_checkpoint: Instant,
    /// Longest time between checkpoints while events arrive (`storage_checkpoint_ms`).
    pub(super) checkpoint_every: Duration,
    /// WAL bytes appended since the last checkpoint.
    pub(super) wal_since_checkpoint: u64,
    /// WAL bytes that bring the next checkpoint forward (see [`checkpoint::checkpoint_bytes`]).
    pub(super) checkpoint_bytes: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) hub: Hub,
    pub(super) metrics: Metrics,
    pub(super) next_id: u64,
    pub(super) next_topic_id: u64,
    /// The chunk being filled, kept between commits so its buffers are reused.
    pub(super) chunk: OpenChunk,
    pub(super) dedupe: Dedupe,
    pub(super) fsync: FsyncPolicy,
    /// Written but not yet visible (registry, head, hub): what the next flush publishes.
    pub(super) unpublished: Unpublished,
    pub(super) last_flush: Instant,
    pub(super) last_sweep: Instant,
    /// Under a policy that acknowledges before a flush: the highest id that may have been
    /// handed out, stored durably before any id above it is (see [`Writer::reserve_ids`]).
    pub(super) reserved: Option<u64>,
    pub(super) retention: RetentionPolicy,
    pub(super) last_compact: Instant,
    /// A retention step stopped at its bound: the next one follows the next commit round.
    pub(super) compact_more: bool,
    /// Where the next chunk-reclaim step starts (a chunk's first id).
    pub(super) reclaim_cursor: u64,
    /// Removals so far (retention passes and prefix removals that removed something).
    pub(super) removals: u64,
    /// `removals` when the running reclaim cycle began.
    pub(super) reclaim_cycle_start: u64,
    /// Every removal up to this count has had a full reclaim cycle after it.
    pub(super) reclaimed_through: u64,
    /// Every event up to this id is known durable (covered by a WAL sync or a sled flush).
    pub(super) durable_through: u64,
    /// The newest id written to sled (not a reserved one: those may never be used).
    pub(super) last_applied: u64,
    /// What the mark file says (see [`super::mark`]).
    pub(super) marked: u64,
    pub(super) space: SpaceLimits,
    pub(super) dir: std::path::PathBuf,
    /// The data dir's size on disk when it was last found over `max_disk_bytes`.
    pub(super) over_disk_budget: Option<u64>,
    /// What dates commits.
    pub(super) clock: Clock,
    /// The time of the newest event written: no commit is dated before it.
    pub(super) last_time: u64,
}

/// Topic records and events a commit wrote that are not yet visible.
#[derive(Default)]
pub(super) struct Unpublished {
    pub(super) topics: HashMap<Topic, TopicRecord>,
    pub(super) events: Vec<SharedEvent>,
}

pub(super) struct Pending {
    reply: AppendReply,
    result: Appended,
}

/// The chunk a group commit is filling, with its topics' index entries.
pub(super) struct OpenChunk {
    caps: ChunkCaps,
    builder: ChunkBuilder,
    first: u64,
    /// Topic id → offsets of its events in the chunk.
    topics: HashMap<u64, Vec<u32>>,
    /// The record of the event being added.
    scratch: Vec<u8>,
    /// The encoded chunk or index entry being handed to sled (which copies it).
    out: Vec<u8>,
    /// Emptied offset lists, reused by the next chunks.
    spare: Vec<Vec<u32>>,
    /// The WAL record of the commit, gathering every chunk closed (only the writer's own
    /// chunk keeps one; a chunk rewritten by removal is not logged).
    wal: Option<RecordBuilder>,
}

/// Bytes the WAL record buffer is given up front.
///
/// Why: a buffer grown by doubling frees each smaller copy, and glibc answers the free of a
/// large mmapped block by raising its mmap threshold to that size, so later allocations of
/// that size (events, hub batches, sled's values) stay in its arenas instead of going back
/// to the OS: tests/ws.rs saw the server's memory grow by ~10 MB more. Reserved once and
/// never shrunk, untouched pages cost nothing; only commits larger than this grow it.
const RECORD_CAPACITY: usize = 8 << 20;

/// Most emptied offset lists kept for reuse.
pub(super) const SPARE_OFFSET_LISTS: usize = 64;

impl OpenChunk {
    pub(super) fn new(caps: ChunkCaps) -> Self {
        OpenChunk {
            caps,
            builder: ChunkBuilder::new(),
            first: 0,
            topics: HashMap::new(),
            scratch: Vec::new(),
            out: Vec::new(),
            spare: Vec::new(),
            wal: None,
        }
    }

    /// The same, gathering the WAL record of each commit.
    pub(super) fn logged(caps: ChunkCaps) -> Self {
        OpenChunk {
            wal: Some(RecordBuilder::with_capacity(RECORD_CAPACITY)),
            ..Self::new(caps)
        }
    }

    /// Starts the WAL record of a new commit.
    pub(super) fn begin_record(&mut self) {
        if let Some(w) = &mut self.wal {
            w.begin();
        }
    }

    /// The WAL record of the ids `first ..= last` closed since [`Self::begin_record`].
    pub(super) fn finish_record(&mut self, first: u64, last: u64) -> Option<&[u8]> {
        self.wal.as_mut()?.finish(first, last)
    }

    /// Adds event `id` (the next id after the previous one), closing the chunk into `batch`
    /// first when the event would take it over its caps (an event too big for any chunk gets
    /// one of its own).
    pub(super) fn push(
        &mut self,
        batch: &mut sled::Batch,
        id: u64,
        topic_id: u64,
        time: u64,
        ev: &NewEvent,
    ) -> Result<(), LogError> {
        self.scratch.clear();
        record::encode_event_into(&mut self.scratch, time, ev);
        if !self.builder.is_empty()
            && (self.builder.len() >= self.caps.events
                || self.builder.encoded_len_with(self.scratch.len()) > self.caps.bytes)
        {
            self.close(batch);
        }
        // A chunk holds contiguous ids: an import with a hole starts a new one.
        if !self.builder.is_empty() && id != self.first + self.builder.len() as u64 {
            self.close(batch);
        }
        if self.builder.is_empty() {
            self.first = id;
        }
        if !self.builder.push_record(&self.scratch) {
            self.close(batch);
            self.first = id;
            if !self.builder.push_record(&self.scratch) {
                return Err(LogError::Storage(format!(
                    "event {id} is too large to be stored"
                )));
            }
        }
        // At most `caps.events` apart: the offset fits.
        let offset = (id - self.first) as u32;
        let spare = &mut self.spare;
        self.topics
            .entry(topic_id)
            .or_insert_with(|| spare.pop().unwrap_or_default())
            .push(offset);
        Ok(())
    }

    /// Drops what the chunk holds.
    pub(super) fn clear(&mut self) {
        self.builder.clear();
        self.topics.clear();
    }

    /// Writes the chunk and its index entries into `batch`; the chunk is left empty.
    pub(super) fn close(&mut self, batch: &mut sled::Batch) {
        if !self.builder.finish_into(&mut self.out) {
            return;
        }
        batch.insert(&record::chunk_key(self.first), self.out.as_slice());
        if let Some(w) = &mut self.wal {
            w.push_chunk(self.first, &self.out);
        }
        for (tid, mut offsets) in self.topics.drain() {
            record::encode_index_into(&offsets, &mut self.out);
            batch.insert(&record::index_key(tid, self.first), self.out.as_slice());
            if self.spare.len() < SPARE_OFFSET_LISTS {
                offsets.clear();
                self.spare.push(offsets);
            }
        }
    }
}

/// Counts event `id` in its topic's record in `delta`, starting from the newest record the
/// writer has (written but unpublished, else visible), or giving a new topic the next topic id.
pub(super) fn count_event<'d>(
    delta: &'d mut HashMap<Topic, TopicRecord>,
    unpublished: &HashMap<Topic, TopicRecord>,
    visible: &BTreeMap<Topic, TopicRecord>,
    next_topic_id: &mut u64,
    ev: &NewEvent,
    id: u64,
) -> &'d mut TopicRecord {
    let rec = delta.entry(ev.topic.clone()).or_insert_with(|| {
        let known = unpublished
            .get(&ev.topic)
            .or_else(|| visible.get(&ev.topic));
        known.copied().unwrap_or_else(|| {
            let r = TopicRecord {
                topic_id: *next_topic_id,
                ..TopicRecord::default()
            };
            *next_topic_id += 1;
            r
        })
    });
    if rec.count == 0 {
        rec.first_id = id;
    }
    rec.last_id = id;
    rec.count += 1;
    rec.bytes += ev.data.len() as u64;
    rec
}

impl Writer {
    /// Makes everything written to sled so far durable in sled itself (see
    /// [`StoreSync::flush`]); the WAL then holds nothing sled lacks.
    pub(super) fn flush_store(&mut self) -> Result<(), LogError> {
        // Everything applied so far is covered by this flush.
        let applied = self.last_applied;
        let synced = self.store.flush()?;
        self.metrics.observe_blobs_synced(synced);
        self.store_behind_wal = false;
        self.durable_through = self.durable_through.max(applied);
        Ok(())
    }

    /// Makes everything written so far durable: one fsync of the WAL, or a flush of sled
    /// while some applied events are missing from the WAL.
    pub(super) fn sync(&mut self) -> Result<(), LogError> {
        if self.store_behind_wal {
            return self.flush_store();
        }
        let applied = self.last_applied;
        self.wal.sync()?;
        self.durable_through = self.durable_through.max(applied);
        Ok(())
    }

    /// Appends the commit's WAL record. On failure the events stay applied to sled, and
    /// durability falls back to flushing sled until a flush covers them.
    fn log_commit(&mut self, first: u64, last: u64) {
        let Some(record) = self.chunk.finish_record(first, last) else {
            self.store_behind_wal = true;
            return;
        };
        if let Err(e) = self.wal.append(first, record) {
            tracing::warn!(error = %e, "appending to the WAL failed; flushing sled instead");
            self.store_behind_wal = true;
            return;
        }
        self.wal_since_checkpoint += self.wal.take_appended();
    }

    /// Whether sled holds events the checkpoint does not cover, for long enough or in WAL
    /// bytes enough, to flush it now.
    fn checkpoint_due(&self) -> bool {
        self.last_applied > self.checkpointed
            && (self.last_checkpoint.elapsed() >= self.checkpoint_every
                || self.wal_since_checkpoint >= self.checkpoint_bytes)
    }

    /// One checkpoint: flushes sled, records that it holds every applied event, and deletes
    /// the WAL segments that covers. A failure is logged; the WAL keeps everything meanwhile.
    fn checkpoint(&mut self) {
        let started = Instant::now();
        self.last_checkpoint = started;
        let through = self.last_applied;
        if let Err(e) = self.flush_store() {
            tracing::warn!(error = %e, "flushing sled for a checkpoint failed; retrying later");
            return;
        }
        if let Err(e) = checkpoint::write(self.wal.dir(), through) {
            tracing::warn!(error = %e, "writing the WAL checkpoint failed; retrying later");
            return;
        }
        self.checkpointed = through;
        self.wal_since_checkpoint = 0;
        let deleted = self.wal.delete_through(through);
        self.metrics.observe_checkpoint(started.elapsed(), deleted);
    }

    /// Brings the mark file up to what is durable (see [`super::mark`]).
    fn update_mark(&mut self) {
        if self.durable_through <= self.marked {
            return;
        }
        match super::mark::write(&self.dir, self.durable_through) {
            Ok(()) => self.marked = self.durable_through,
            Err(e) => tracing::warn!(error = %e, "writing the durable mark failed"),
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut appends = Vec::new();
            let mut queued = 0usize;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append { events, reply } => {
                        queued += events.len();
                        appends.push((events, reply));
                    }
                    Command::RemoveThrough { through, reply } => {
                        // Keep the order of commands: what was queued before goes first.
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.remove_through(through));
                    }
                    Command::Tick => self.tick(),
                    Command::Import { events, reply } => {
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.import(events));
                    }
                    Command::Compact { reply } => {
                        self.commit(std::mem::take(&mut appends));
                        let _ = reply.send(self.compact());
                    }
                }
                if queued < MAX_ROUND_EVENTS {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(appends);
            if self.dedupe.over_budget() {
                // Unique msg_ids arriving faster than the periodic sweep forgets them.
                self.sweep();
            }
            if self.flush_due() {
                // Under load ticks wait behind appends: the interval is kept here too.
                self.flush_and_publish();
            }
            if self.checkpoint_due() {
                self.checkpoint();
            }
            if self.compact_more {
                // A retention backlog goes in bounded steps between commit rounds.
                self.compact_step();
            }
        }
        self.flush_and_publish();
        if self.reserved.is_some() {
            // A clean stop hands out nothing more: the next start continues at next_id.
            let stored = self.next_id.saturating_sub(1);
            if let Err(e) = self
                .shared
                .tree
                .insert(record::IDS_RESERVED_KEY, &record::encode_count(stored)[..])
            {
                tracing::error!(error = %e, "recording the last id on shutdown failed");
            }
        }
        self.spare_stop = None;
        if let Some(handle) = self.spare_maker.take() {
            let _ = handle.join();
        }
        match self.flush_store() {
            Ok(()) => self.settle_wal(),
            Err(e) => tracing::error!(error = %e, "final flush of the log failed"),
        }
        self.update_mark();
    }

    /// After a flush of sled that covers every applied event: records the checkpoint and
    /// deletes every WAL segment (a failure leaves them, to be replayed idempotently).
    pub(super) fn settle_wal(&mut self) {
        let through = self.last_applied;
        match checkpoint::write(self.wal.dir(), through) {
            Ok(()) => {
                self.checkpointed = through;
                self.wal.delete_all();
            }
            Err(e) => tracing::warn!(error = %e, "writing the WAL checkpoint failed"),
        }
    }

    /// Refuses an append of about `bytes` when it would take the filesystem below the free
    /// space to keep, or while the data dir is over its disk budget (checked by the tick).
    fn check_space(&mut self, bytes: u64) -> Result<(), LogError> {
        if let Some(size) = self.over_disk_budget {
            return Err(LogError::Full(format!(
                "the data directory takes {size} bytes, over its budget of {} \
                 (storage_max_disk_bytes); retention must free room first",
                self.space.max_disk_bytes
            )));
        }
        let min_free = self.space.min_free_bytes;
        if min_free == 0 {
            return Ok(());
        }
        // Stored bytes grow by more than the payload (records, index, sled's own log):
        // twice the payload is a safe bound for one commit.
        let need = min_free.saturating_add(bytes.saturating_mul(2));
        match fs4::available_space(&self.dir) {
            Ok(free) if free < need => Err(LogError::Full(format!(
                "{free} bytes free on the data directory's filesystem, and {min_free} are \
                 kept free (storage_min_free_bytes); publishing resumes once there is room"
            ))),
            Ok(_) => Ok(()),
            // Not knowing is no reason to refuse: sled still reports a real failure.
            Err(_) => Ok(()),
        }
    }

    /// The periodic step: a due interval flush, then a due dedupe sweep.
    pub(super) fn tick(&mut self) {
        self.update_mark();
        if self.space.max_disk_bytes > 0 {
            self.over_disk_budget = match self.store.db.size_on_disk() {
                Ok(size) if size > self.space.max_disk_bytes => Some(size),
                _ => None,
            };
        }
        if self.flush_due() {
            self.flush_and_publish();
        }
        if self.checkpoint_due() {
            self.checkpoint();
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.sweep();
        }
        if self.retention.removes_anything()
            && (self.compact_more || self.last_compact.elapsed() >= self.retention.check_every)
        {
            self.compact_step();
        }
    }

    /// One bounded retention step (see [`Writer::compact`]), measured.
    fn compact_step(&mut self) {
        self.last_compact = Instant::now();
        let started = Instant::now();
        match self.compact() {
            Ok(done) => {
                self.compact_more = done.more;
                self.metrics.observe_retention(
                    done.trimmed + done.over_budget,
                    done.chunks_reclaimed,
                    started.elapsed(),
                );
            }
            Err(e) => {
                self.compact_more = false;
                tracing::warn!(error = %e, "retention pass failed; retrying later");
            }
        }
    }

    /// Whether the interval policy wants a flush now.
    fn flush_due(&self) -> bool {
        match self.fsync {
            FsyncPolicy::Interval(every) => {
                !self.unpublished.events.is_empty() && self.last_flush.elapsed() >= every
            }
            FsyncPolicy::Always | FsyncPolicy::Never => false,
        }
    }

    /// Syncs, then makes everything written visible. On a failed sync nothing is made
    /// visible; the next one tries again.
    pub(super) fn flush_and_publish(&mut self) {
        if self.unpublished.events.is_empty() && self.unpublished.topics.is_empty() {
            return;
        }
        let started = Instant::now();
        let flushed = self.sync();
        self.metrics.observe_flush(started.elapsed());
        self.last_flush = Instant::now();
        match flushed {
            Ok(()) => self.publish_written(),
            Err(e) => tracing::error!(error = %e, "flushing the log failed; retrying later"),
        }
    }

    /// Stores, durably, a new upper bound for the ids this writer may hand out before an id
    /// above the current one is used. Under a policy that acknowledges before a flush, this
    /// keeps an acknowledged id that a crash took back from ever naming another event.
    fn reserve_ids(&mut self, upto: u64) -> Result<(), LogError> {
        let Some(reserved) = self.reserved else {
            return Ok(());
        };
        if upto <= reserved {
            return Ok(());
        }
        let next = upto.saturating_add(ID_RESERVATION);
        self.shared
            .tree
            .insert(record::IDS_RESERVED_KEY, &record::encode_count(next)[..])
            .map_err(storage)?;
        self.flush_store()?;
        self.reserved = Some(next);
        Ok(())
    }

    /// One group commit: every queued append in one atomic batch and one flush.
    pub(super) fn commit(&mut self, appends: Vec<(Vec<NewEvent>, AppendReply)>) {
        if appends.is_empty() {
            return;
        }
        let started = Instant::now();
        // Never below the previous commit, whatever the clock did (stepped back by NTP, a
        // resumed VM): time is non-decreasing in id order, so a time start is one cut.
        let time = self.clock.now_ms().max(self.last_time);
        self.last_time = time;
        let total: usize = appends.iter().map(|(e, _)| e.len()).sum();
        let bytes: u64 = appends
            .iter()
            .flat_map(|(e, _)| e.iter())
            .map(|e| e.data.len() as u64 + e.topic.as_str().len() as u64)
            .sum();
        if let Err(err) = self.check_space(bytes) {
            for (_, reply) in appends {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        if let Err(err) = self.reserve_ids(self.next_id.saturating_add(total as u64)) {
            for (_, reply) in appends {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut committed: Vec<SharedEvent> = Vec::with_capacity(total);
        let mut pending = Vec::with_capacity(appends.len());
        let chunk = &mut self.chunk;
        let mut failed = None;
        let mut id = self.next_id;
        chunk.begin_record();
        {
            let Ok(reg) = self.shared.registry.read() else {
                for (_, reply) in appends {
                    let _ = reply.send(Err(LogError::Closed));
                }
                return;
            };
            'appends: for (events, reply) in appends {
                let mut stored = 0u64;
                let first = id;
                let mut duplicate_of = Vec::new();
                for ev in events {
                    if let Some(m) = ev.msg_id.as_deref() {
                        match self
                            .dedupe
                            .check(&self.shared.tree, ev.topic.as_str(), m, time)
                        {
                            Ok(Some(original)) => {
                                duplicate_of.push(EventId(original));
                                continue;
                            }
                            Ok(None) => self.dedupe.record(&mut batch, id, time),
                            Err(e) => {
                                let _ = reply.send(Err(e.clone()));
                                failed = Some(e);
                                break 'appends;
                            }
                        }
                    }
                    let eid = id;
                    id += 1;
                    stored += 1;
                    let rec = count_event(
                        &mut delta,
                        &self.unpublished.topics,
                        &reg,
                        &mut self.next_topic_id,
                        &ev,
                        eid,
                    );
                    if let Err(e) = chunk.push(&mut batch, eid, rec.topic_id, time, &ev) {
                        let _ = reply.send(Err(e.clone()));
                        failed = Some(e);
                        break 'appends;
                    }
                    committed.push(Arc::new(Event::new(EventId(eid), time, ev)));
                }
                let (first, last) = if stored > 0 {
                    (first, first + stored - 1)
                } else {
                    // Nothing new: the request is answered with the ids it repeats.
                    let ids = duplicate_of.iter().map(|e| e.0);
                    (ids.clone().min().unwrap_or(0), ids.max().unwrap_or(0))
                };
                pending.push(Pending {
                    reply,
                    result: Appended {
                        first: EventId(first),
                        last: EventId(last),
                        count: stored,
                        duplicate_of,
                    },
                });
            }
        }
        if let Some(err) = failed {
            // Nothing was written: these ids were never seen by anyone.
            chunk.clear();
            self.dedupe.abort_round();
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        chunk.close(&mut batch);
        self.dedupe.finish_round(&mut batch, time);
        for (t, r) in &delta {
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        if let Err(e) = self.shared.tree.apply_batch(batch) {
            // Nothing of the batch was applied: its ids were never seen by anyone.
            self.dedupe.abort_round();
            let err = storage(e);
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        let first = self.next_id;
        if id > first {
            self.last_applied = id - 1;
            self.log_commit(first, id - 1);
        }
        self.next_id = id;
        self.dedupe.commit_round();
        self.unpublished.topics.extend(delta);
        self.unpublished.events.extend(committed);
        match self.fsync {
            FsyncPolicy::Always => {
                let flush_started = Instant::now();
                let flushed = self.sync();
                self.metrics.observe_flush(flush_started.elapsed());
                self.last_flush = Instant::now();
                if let Err(err) = flushed {
                    // Written but not known durable: not acknowledged and not visible. They
                    // may surface after a later flush; their ids are never reused.
                    for p in pending {
                        let _ = p.reply.send(Err(err.clone()));
                    }
                    return;
                }
                self.publish_written();
            }
            // Acknowledged now; visible after the WAL sync that makes them durable, so no
            // subscriber ever sees what a crash could take back.
            FsyncPolicy::Interval(_) => {}
            // Nothing waits for a sync: visible at once. The WAL is written (not synced) all
            // the same, so a killed process loses nothing; an OS crash may.
            FsyncPolicy::Never => self.publish_written(),
        }
        self.metrics.observe_commit(started.elapsed());
        let duplicates: usize = pending.iter().map(|p| p.result.duplicate_of.len()).sum();
        if duplicates > 0 {
            self.metrics.observe_duplicates(duplicates as u64);
        }
        self.metrics.observe_dedupe_entries(self.dedupe.count(), 0);
        for p in pending {
            let _ = p.reply.send(Ok(p.result));
        }
    }

    /// One bounded step of forgetting expired dedupe entries. A failure is logged, not
    /// fatal: stale entries are ignored by their time until a later sweep succeeds.
    pub(super) fn sweep(&mut self) {
        match self.dedupe.sweep(&self.shared.tree, now_ms()) {
            Ok(removed) => self
                .metrics
                .observe_dedupe_entries(self.dedupe.count(), removed),
            Err(e) => tracing::warn!(error = %e, "sweeping expired msg_ids failed"),
        }
    }

    /// Makes everything written so far visible (see [`Writer::publish`]).
    fn publish_written(&mut self) {
        let written = std::mem::take(&mut self.unpublished);
        self.publish(written.topics, written.events);
    }

    /// Makes durable state visible: registry first, then the head, then the hub, so a reader
    /// never sees an id the registry does not yet cover.
    pub(super) fn publish(&self, delta: HashMap<Topic, TopicRecord>, committed: Vec<SharedEvent>) {
        // Every committed event was counted in its topic's record: the delta names them all.
        let topics: Vec<Topic> = if committed.is_empty() {
            Vec::new()
        } else {
            delta.keys().cloned().collect()
        };
        if let Ok(mut reg) = self.shared.registry.write() {
            for (t, r) in delta {
                reg.insert(t, r);
            }
        }
        if let Some(last) = committed.last() {
            self.shared.head.store(last.id.0, Ordering::Release);
        }
        if !committed.is_empty() {
            self.hub.publish(committed.into(), &topics);
        }
    }

    /// Removes the events `..= through`: every chunk that ends at or before it, with its index
    /// entries; the chunk straddling it (at most one, since removal takes a prefix) is
    /// rewritten under the key of its first kept event, with new index entries.
    pub(super) fn remove_through(&mut self, through: EventId) -> Result<u64, LogError> {
        // Removal works on visible state: what is written goes first.
        self.flush_and_publish();
        if !self.unpublished.events.is_empty() {
            return Err(LogError::Storage(
                "the log cannot be flushed; nothing was removed".into(),
            ));
        }
        let head = self.shared.head.load(Ordering::Acquire);
        let through = through.0.min(head);
        let tree = &self.shared.tree;
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut removed = 0u64;
        // Topic id → its first event kept in a rewritten chunk.
        let mut kept_first: HashMap<u64, u64> = HashMap::new();
        {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            let record_of = |delta: &HashMap<Topic, TopicRecord>, name: &str, id: u64| {
                if let Some((t, r)) = delta.get_key_value(name) {
                    return Ok((t.clone(), *r));
                }
                reg.get_key_value(name)
                    .map(|(t, r)| (t.clone(), *r))
                    .ok_or_else(|| LogError::Corrupt(format!("event {id} has no topic record")))
            };
            // Unbounded: the kept part of a chunk stays one chunk.
            let mut kept = OpenChunk::new(ChunkCaps {
                events: usize::MAX,
                bytes: usize::MAX,
            });
            let mut topics_in_chunk = Vec::new();
            for item in tree.range(record::chunk_key(0)..=record::chunk_key(through)) {
                let (k, v) = item.map_err(storage)?;
                let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
                let chunk = Chunk::parse(&v).map_err(corrupt)?;
                // first ≤ through: events `..cut` of the chunk go.
                let cut = usize::try_from(through - first + 1)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                topics_in_chunk.clear();
                for i in 0..chunk.len() {
                    let id = first.saturating_add(i as u64);
                    let bytes = chunk.record(i).map_err(corrupt)?;
                    let peek = record::peek_event(bytes).map_err(corrupt)?;
                    let (topic, mut rec) = record_of(&delta, peek.topic, id)?;
                    if !topics_in_chunk.contains(&rec.topic_id) {
                        topics_in_chunk.push(rec.topic_id);
                    }
                    // Already removed by its topic's own retention: not counted again, and
                    // not indexed again if its chunk is rewritten.
                    let live = id > rec.removed_through;
                    if i < cut {
                        if live {
                            rec.count = rec.count.saturating_sub(1);
                            rec.bytes = rec.bytes.saturating_sub(peek.data_len as u64);
                            rec.removed_through = id;
                            delta.insert(topic, rec);
                            removed += 1;
                        }
                    } else {
                        if kept.builder.is_empty() {
                            kept.first = id;
                        }
                        if !kept.builder.push_record(bytes) {
                            return Err(LogError::Storage(format!(
                                "chunk {first} cannot be rewritten"
                            )));
                        }
                        if live {
                            kept.topics
                                .entry(rec.topic_id)
                                .or_default()
                                .push((id - kept.first) as u32);
                            kept_first.entry(rec.topic_id).or_insert(id);
                        }
                    }
                }
                batch.remove(k);
                for &tid in &topics_in_chunk {
                    batch.remove(&record::index_key(tid, first));
                }
                kept.close(&mut batch);
            }
        }
        for (t, r) in delta.iter_mut() {
            if r.count > 0 {
                // The new oldest retained id: in the rewritten chunk, or else the first index
                // entry after the removed range.
                if let Some(&id) = kept_first.get(&r.topic_id) {
                    r.first_id = id;
                } else {
                    let start = record::index_key(r.topic_id, through + 1);
                    let end = record::index_key(r.topic_id, u64::MAX);
                    if let Some(item) = tree.range(start..=end).next() {
                        let (k, v) = item.map_err(storage)?;
                        let (_, first) = record::index_key_parts(&k).map_err(corrupt)?;
                        let offsets = record::decode_index(&v).map_err(corrupt)?;
                        r.first_id = first.saturating_add(u64::from(offsets[0]));
                    }
                }
            }
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        tree.apply_batch(batch).map_err(storage)?;
        self.flush_store()?;
        self.publish(delta, Vec::new());
        if removed > 0 {
            self.removals += 1;
        }
        Ok(removed)
    }
}
