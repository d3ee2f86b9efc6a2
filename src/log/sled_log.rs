//! The embedded log on sled: one tree, keys prefixed by kind (see [`record`](super::record)),
//! one writer thread that owns id assignment and group commit.
//!
//! Storage is chunked (format `tidewire-log-v2`): each group commit writes its events as one
//! or a few chunks (a contiguous run of ids per key) and one index entry per (topic, chunk),
//! so a commit costs a few sled keys instead of two per event. The chunks, their index
//! entries and the topics' statistics are written in one atomic `apply_batch`, so a crash
//! never leaves an index entry without its chunk or the reverse.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sled::IVec;
use tokio::sync::{mpsc, oneshot};

use super::blobs::BlobSync;
use super::record::{self, Chunk, ChunkBuilder, CorruptRecord, TopicRecord};
use super::{Appended, BoxFuture, EventLog, LogError, Page, TopicStats};
use crate::envelope::{Event, EventId, Gap, NewEvent, SharedEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::topic::{Pattern, PatternSet, Topic};

/// Most events one group commit takes from the queue before it writes and flushes.
const MAX_ROUND_EVENTS: usize = 50_000;
/// When a read matches more topics than this, it walks the log from the cursor instead of
/// merging that many per-topic index ranges.
const MAX_MERGED_TOPICS: usize = 64;
/// Publishes waiting for the writer before publishers are made to wait.
const QUEUE_DEPTH: usize = 4096;

/// How big the writer lets a chunk grow.
#[derive(Debug, Clone, Copy)]
struct ChunkCaps {
    /// Most events in one chunk.
    events: usize,
    /// Most bytes of an encoded chunk, unless it holds a single event.
    bytes: usize,
}

/// The chunk caps of the server.
///
/// The size cap is set by durability, not speed: sled 0.34 writes any page bigger than a
/// quarter of its 512 KiB segments (~128 KiB) to a separate "blob" file that `flush` never
/// fsyncs (only the main log file is synced), so an acknowledged event in such a page could
/// be lost by a power failure or an OS crash (a killed process loses nothing). A leaf page
/// holds 16 values before it splits (17 until the split, about 20 after a merge), so chunks
/// of at most 6 KiB keep every page (~20 × 6 KiB < 128 KiB) inline in the synced log. An
/// event bigger than that gets a chunk of its own, in the same position as any value that
/// big was in the v1 format.
const CHUNK_CAPS: ChunkCaps = ChunkCaps {
    events: 4096,
    bytes: 6 * 1024,
};

/// Tunables of the sled log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Directory of the sled database (created when missing).
    pub dir: PathBuf,
    /// sled's page cache size, bytes.
    pub cache_bytes: u64,
}

/// Where the writer sends the outcome of one append.
type AppendReply = oneshot::Sender<Result<Appended, LogError>>;

enum Command {
    Append {
        events: Vec<NewEvent>,
        reply: AppendReply,
    },
    RemoveThrough {
        through: EventId,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
}

/// State shared by the writer thread and the readers.
struct Shared {
    tree: sled::Tree,
    /// Newest durable id: readers never look past it.
    head: AtomicU64,
    /// Durable topic statistics; updated by the writer after each flush.
    registry: RwLock<BTreeMap<Topic, TopicRecord>>,
}

/// The sled-backed [`EventLog`].
pub struct SledLog {
    shared: Arc<Shared>,
    queue: Mutex<Option<mpsc::Sender<Command>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl std::borrow::Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

fn storage(e: sled::Error) -> LogError {
    LogError::Storage(e.to_string())
}

fn corrupt(e: CorruptRecord) -> LogError {
    LogError::Corrupt(e.0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SledLog {
    /// Opens (or creates) the log in `opts.dir` and starts its writer. Committed batches go
    /// to `hub`. Refuses a directory that holds something other than a tidewire log.
    pub fn open(opts: &LogOptions, hub: Hub, metrics: Metrics) -> Result<Arc<Self>, LogError> {
        Self::open_with_caps(opts, hub, metrics, CHUNK_CAPS)
    }

    fn open_with_caps(
        opts: &LogOptions,
        hub: Hub,
        metrics: Metrics,
        caps: ChunkCaps,
    ) -> Result<Arc<Self>, LogError> {
        let db = sled::Config::new()
            .path(&opts.dir)
            .cache_capacity(opts.cache_bytes)
            .open()
            .map_err(|e| LogError::Open(format!("{}: {e}", opts.dir.display())))?;
        let tree = db.open_tree("log").map_err(storage)?;
        match tree.get(record::FORMAT_KEY).map_err(storage)? {
            Some(v) if v.as_ref() == record::FORMAT_VERSION => {}
            Some(v) if v.as_ref() == record::FORMAT_V1 => {
                return Err(LogError::Open(format!(
                    "{}: holds a log in the old format {:?} (one key per event); this build \
                     reads and writes only {:?} and does not convert: move the directory \
                     away or delete it",
                    opts.dir.display(),
                    String::from_utf8_lossy(record::FORMAT_V1),
                    String::from_utf8_lossy(record::FORMAT_VERSION),
                )))
            }
            Some(v) => {
                return Err(LogError::Open(format!(
                    "{}: unknown log format {:?}",
                    opts.dir.display(),
                    String::from_utf8_lossy(&v)
                )))
            }
            None if tree.is_empty() => {
                tree.insert(record::FORMAT_KEY, record::FORMAT_VERSION)
                    .map_err(storage)?;
                db.flush().map_err(storage)?;
            }
            None => {
                return Err(LogError::Open(format!(
                    "{}: not a tidewire log",
                    opts.dir.display()
                )))
            }
        }

        let mut registry = BTreeMap::new();
        let mut high_water = 0u64;
        let mut next_topic_id = 1u64;
        for item in tree.scan_prefix([record::TOPIC_PREFIX]) {
            let (k, v) = item.map_err(storage)?;
            let name = std::str::from_utf8(&k[1..])
                .map_err(|_| LogError::Corrupt("topic key is not UTF-8".into()))?;
            let topic = Topic::parse(name).map_err(|e| LogError::Corrupt(format!("topic {e}")))?;
            let rec = record::decode_topic(&v).map_err(|e| LogError::Corrupt(e.0))?;
            high_water = high_water.max(rec.last_id);
            next_topic_id = next_topic_id.max(rec.topic_id + 1);
            registry.insert(topic, rec);
        }
        // The topic records already cover every id (they are written with the events), but
        // the newest chunk is checked too, so a topic-less log still never reuses an id.
        if let Some(item) = tree.scan_prefix([record::CHUNK_PREFIX]).next_back() {
            let (k, v) = item.map_err(storage)?;
            let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
            let n = Chunk::parse(&v).map_err(corrupt)?.len() as u64;
            high_water = high_water.max(first.saturating_add(n - 1));
        }

        let shared = Arc::new(Shared {
            tree,
            head: AtomicU64::new(high_water),
            registry: RwLock::new(registry),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            db,
            shared: shared.clone(),
            hub,
            metrics,
            next_id: high_water + 1,
            next_topic_id,
            chunk: OpenChunk::new(caps),
            blobs: BlobSync::new(opts.dir.clone()),
        };
        std::thread::Builder::new()
            .name("tidewire-log-writer".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| LogError::Open(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(SledLog {
            shared,
            queue: Mutex::new(Some(tx)),
            done: Mutex::new(Some(done_rx)),
        }))
    }

    fn sender(&self) -> Result<mpsc::Sender<Command>, LogError> {
        self.queue
            .lock()
            .map_err(|_| LogError::Closed)?
            .clone()
            .ok_or(LogError::Closed)
    }

    /// Removes every event with id up to `through` (retention), with their index entries,
    /// and records in each topic that it lost them, so readers behind it get a gap signal.
    /// Returns the number of events removed.
    pub async fn remove_through(&self, through: EventId) -> Result<u64, LogError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Command::RemoveThrough { through, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Number of topics ever published to.
    pub fn topic_count(&self) -> usize {
        self.shared.registry.read().map(|r| r.len()).unwrap_or(0)
    }

    /// Number of retained events (sum over topics).
    pub fn event_count(&self) -> u64 {
        self.shared
            .registry
            .read()
            .map(|r| r.values().map(|t| t.count).sum())
            .unwrap_or(0)
    }
}

impl EventLog for SledLog {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Appended, LogError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Err(LogError::Storage("empty append".into()));
            }
            let (reply, rx) = oneshot::channel();
            self.sender()?
                .send(Command::Append { events, reply })
                .await
                .map_err(|_| LogError::Closed)?;
            rx.await.map_err(|_| LogError::Closed)?
        })
    }

    fn read(
        &self,
        patterns: PatternSet,
        after: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Page, LogError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_page(&shared, &patterns, after, limit))
                .await
                .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
        })
    }

    fn head(&self) -> EventId {
        EventId(self.shared.head.load(Ordering::Acquire))
    }

    fn topics(&self, filter: Option<&Pattern>, limit: usize) -> Vec<TopicStats> {
        let Ok(reg) = self.shared.registry.read() else {
            return Vec::new();
        };
        let prefix = filter.map(Pattern::literal_prefix).unwrap_or("");
        reg.range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(t, _)| t.as_str().starts_with(prefix))
        .filter(|(t, _)| filter.is_none_or(|p| p.matches(t)))
        .take(limit)
        .map(|(t, r)| stats(t, r))
        .collect()
    }

    fn topic(&self, topic: &Topic) -> Option<TopicStats> {
        let reg = self.shared.registry.read().ok()?;
        reg.get(topic).map(|r| stats(topic, r))
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            // Dropping the only sender lets the writer finish what is queued, flush and stop.
            let tx = self.queue.lock().map_err(|_| LogError::Closed)?.take();
            drop(tx);
            let done = self.done.lock().map_err(|_| LogError::Closed)?.take();
            if let Some(done) = done {
                let _ = done.await;
            }
            Ok(())
        })
    }
}

fn stats(t: &Topic, r: &TopicRecord) -> TopicStats {
    TopicStats {
        topic: t.as_str().to_string(),
        first_id: (r.count > 0).then_some(r.first_id),
        last_id: r.last_id,
        count: r.count,
        bytes: r.bytes,
    }
}

/// The topics a pattern set matches: (topic id, newest id, removed-through), deduplicated.
fn matching_topics(
    reg: &BTreeMap<Topic, TopicRecord>,
    patterns: &PatternSet,
) -> Vec<(u64, u64, u64)> {
    let mut out: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for p in patterns.patterns() {
        if let Some(t) = p.as_topic() {
            if let Some(r) = reg.get(&t) {
                out.insert(r.topic_id, (r.last_id, r.removed_through));
            }
            continue;
        }
        let prefix = p.literal_prefix();
        for (t, r) in reg
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(t, _)| t.as_str().starts_with(prefix))
        {
            if p.matches(t) {
                out.insert(r.topic_id, (r.last_id, r.removed_through));
            }
        }
    }
    out.into_iter().map(|(id, (l, rm))| (id, l, rm)).collect()
}

/// What one read touched, so tests can check that a read costs what it returns.
#[derive(Debug, Default, Clone, Copy)]
struct ReadCost {
    /// Chunks fetched.
    chunks: u64,
    /// Index entries decoded.
    index_entries: u64,
}

fn read_page(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
) -> Result<Page, LogError> {
    read_page_costed(shared, patterns, after, limit, &mut ReadCost::default())
}

fn read_page_costed(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
    cost: &mut ReadCost,
) -> Result<Page, LogError> {
    let head = shared.head.load(Ordering::Acquire);
    let limit = limit.max(1);
    let topics = {
        let reg = shared.registry.read().map_err(|_| LogError::Closed)?;
        matching_topics(&reg, patterns)
    };
    let mut after = after.0;
    let mut gap = None;
    // Removal so far takes a prefix of the whole log, so every event up to the largest
    // removed-through of the matching topics is gone from all of them.
    let removed = topics.iter().map(|t| t.2).max().unwrap_or(0);
    if removed > after {
        // Cursor 0 asks for "the oldest retained event": it has lost nothing it asked for.
        if after > 0 {
            gap = Some(Gap {
                requested: after,
                oldest: removed + 1,
            });
        }
        after = removed;
    }
    let mut page = Page {
        gap,
        events: Vec::new(),
        through: EventId(head.max(after)),
        complete: true,
    };
    if after >= head {
        return Ok(page);
    }
    let live: Vec<u64> = topics
        .iter()
        .filter(|(_, last, _)| *last > after)
        .map(|t| t.0)
        .collect();
    if live.is_empty() {
        return Ok(page);
    }
    let tree = &shared.tree;
    let mut full = false;
    if live.len() <= MAX_MERGED_TOPICS {
        // Merge the topics' index entries from the chunk holding `after + 1` up to the head,
        // in id order. Ids only grow, so chunks are needed in order: one is fetched at a time.
        let mut cursors = Vec::with_capacity(live.len());
        for &tid in &live {
            cursors.push(TopicCursor::open(tree, tid, after, head)?);
        }
        let mut heap = BinaryHeap::with_capacity(cursors.len());
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some((id, first)) = c.next(after, head, cost)? {
                heap.push(Reverse((id, first, i)));
            }
        }
        let mut chunks = ChunkCache::new(tree);
        let mut last = after;
        while let Some(Reverse((id, first, i))) = heap.pop() {
            if page.events.len() == limit {
                full = true;
                break;
            }
            if id <= last {
                return Err(LogError::Corrupt(format!(
                    "index entries overlap: event {id} after {last}"
                )));
            }
            last = id;
            page.events.push(chunks.event(first, id, cost)?);
            if let Some((id, first)) = cursors[i].next(after, head, cost)? {
                heap.push(Reverse((id, first, i)));
            }
        }
    } else {
        // Many topics: walk the chunks from the one holding `after + 1`, which costs what
        // lies after the cursor.
        let start = last_key_at_most(tree, &record::chunk_key(0), &record::chunk_key(after + 1))?;
        'walk: for item in tree.range(start..=IVec::from(&record::chunk_key(head)[..])) {
            let (k, v) = item.map_err(storage)?;
            cost.chunks += 1;
            let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
            let chunk = Chunk::parse(&v).map_err(corrupt)?;
            let skip = if first > after {
                0
            } else {
                usize::try_from(after - first + 1).unwrap_or(usize::MAX)
            };
            for i in skip..chunk.len() {
                let id = first.saturating_add(i as u64);
                if id > head {
                    break 'walk;
                }
                let rec = chunk.record(i).map_err(corrupt)?;
                let topic = record::peek_event(rec).map_err(corrupt)?.topic;
                if !patterns.patterns().iter().any(|p| p.matches_str(topic)) {
                    continue;
                }
                if page.events.len() == limit {
                    full = true;
                    break 'walk;
                }
                let (time, body) = record::decode_event(rec).map_err(corrupt)?;
                page.events
                    .push(Arc::new(Event::new(EventId(id), time, body)));
            }
        }
    }
    if full {
        page.complete = false;
        page.through = page.events.last().map(|e| e.id).unwrap_or(EventId(after));
    }
    Ok(page)
}

/// The key to start a forward scan at so that it includes the entry holding `probe`: the
/// last key in `floor ..= probe`, or `probe` itself when there is none.
fn last_key_at_most(tree: &sled::Tree, floor: &[u8], probe: &[u8]) -> Result<IVec, LogError> {
    match tree.range(floor..=probe).keys().next_back() {
        Some(k) => k.map_err(storage),
        None => Ok(IVec::from(probe)),
    }
}

/// One topic's ids after a cursor, read from its index entries in order.
struct TopicCursor {
    entries: sled::Iter,
    chunk_first: u64,
    offsets: Vec<u32>,
    pos: usize,
    done: bool,
}

impl TopicCursor {
    /// Positions at the index entry of the chunk that may hold `after + 1` (the last entry of
    /// the topic starting at or before it), bounded by the chunks starting up to `head`.
    fn open(tree: &sled::Tree, tid: u64, after: u64, head: u64) -> Result<Self, LogError> {
        let start = last_key_at_most(
            tree,
            &record::index_key(tid, 0),
            &record::index_key(tid, after + 1),
        )?;
        Ok(TopicCursor {
            entries: tree.range(start..=IVec::from(&record::index_key(tid, head)[..])),
            chunk_first: 0,
            offsets: Vec::new(),
            pos: 0,
            done: false,
        })
    }

    /// The next (id, chunk first id) of the topic in `after + 1 ..= head`.
    fn next(
        &mut self,
        after: u64,
        head: u64,
        cost: &mut ReadCost,
    ) -> Result<Option<(u64, u64)>, LogError> {
        loop {
            while let Some(&off) = self.offsets.get(self.pos) {
                self.pos += 1;
                let id = self
                    .chunk_first
                    .checked_add(u64::from(off))
                    .ok_or_else(|| LogError::Corrupt("index offset past the id space".into()))?;
                if id > head {
                    self.done = true;
                    return Ok(None);
                }
                if id > after {
                    return Ok(Some((id, self.chunk_first)));
                }
            }
            if self.done {
                return Ok(None);
            }
            let Some(item) = self.entries.next() else {
                self.done = true;
                return Ok(None);
            };
            let (k, v) = item.map_err(storage)?;
            let (_, first) = record::index_key_parts(&k).map_err(corrupt)?;
            record::decode_index_into(&v, &mut self.offsets).map_err(corrupt)?;
            cost.index_entries += 1;
            self.chunk_first = first;
            self.pos = 0;
        }
    }
}

/// The chunk last read, so that a read fetches each chunk it needs once.
struct ChunkCache<'t> {
    tree: &'t sled::Tree,
    current: Option<(u64, IVec)>,
}

impl<'t> ChunkCache<'t> {
    fn new(tree: &'t sled::Tree) -> Self {
        ChunkCache {
            tree,
            current: None,
        }
    }

    /// Event `id` of the chunk starting at `first`.
    fn event(&mut self, first: u64, id: u64, cost: &mut ReadCost) -> Result<SharedEvent, LogError> {
        let bytes = match &self.current {
            Some((f, b)) if *f == first => b,
            _ => {
                let Some(b) = self.tree.get(record::chunk_key(first)).map_err(storage)? else {
                    return Err(LogError::Corrupt(format!(
                        "an index entry names the missing chunk {first}"
                    )));
                };
                cost.chunks += 1;
                &self.current.insert((first, b)).1
            }
        };
        let chunk = Chunk::parse(bytes).map_err(corrupt)?;
        let i = usize::try_from(id - first).unwrap_or(usize::MAX);
        let (time, body) = chunk.event(i).map_err(corrupt)?;
        Ok(Arc::new(Event::new(EventId(id), time, body)))
    }
}

/// The single writer: assigns ids, writes, flushes, then publishes and acknowledges.
struct Writer {
    db: sled::Db,
    shared: Arc<Shared>,
    hub: Hub,
    metrics: Metrics,
    next_id: u64,
    next_topic_id: u64,
    /// The chunk being filled, kept between commits so its buffers are reused.
    chunk: OpenChunk,
    blobs: BlobSync,
}

struct Pending {
    reply: AppendReply,
    result: Appended,
}

/// The chunk a group commit is filling, with its topics' index entries.
struct OpenChunk {
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
}

/// Most emptied offset lists kept for reuse.
const SPARE_OFFSET_LISTS: usize = 64;

impl OpenChunk {
    fn new(caps: ChunkCaps) -> Self {
        OpenChunk {
            caps,
            builder: ChunkBuilder::new(),
            first: 0,
            topics: HashMap::new(),
            scratch: Vec::new(),
            out: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Adds event `id` (the next id after the previous one), closing the chunk into `batch`
    /// first when the event would take it over its caps (an event too big for any chunk gets
    /// one of its own).
    fn push(
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
    fn clear(&mut self) {
        self.builder.clear();
        self.topics.clear();
    }

    /// Writes the chunk and its index entries into `batch`; the chunk is left empty.
    fn close(&mut self, batch: &mut sled::Batch) {
        if !self.builder.finish_into(&mut self.out) {
            return;
        }
        batch.insert(&record::chunk_key(self.first), self.out.as_slice());
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

impl Writer {
    /// Makes everything written so far durable: sled's log, then the blob files sled's
    /// flush leaves unsynced (see [`BlobSync`]).
    fn flush(&mut self) -> Result<(), LogError> {
        self.db.flush().map_err(storage)?;
        let synced = self
            .blobs
            .sync()
            .map_err(|e| LogError::Storage(format!("syncing the log's blob files: {e}")))?;
        self.metrics.observe_blobs_synced(synced);
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
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
                }
                if queued < MAX_ROUND_EVENTS {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(appends);
        }
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "final flush of the log failed");
        }
    }

    /// One group commit: every queued append in one atomic batch and one flush.
    fn commit(&mut self, appends: Vec<(Vec<NewEvent>, AppendReply)>) {
        if appends.is_empty() {
            return;
        }
        let started = Instant::now();
        let time = now_ms();
        let total: usize = appends.iter().map(|(e, _)| e.len()).sum();
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut committed: Vec<SharedEvent> = Vec::with_capacity(total);
        let mut pending = Vec::with_capacity(appends.len());
        let chunk = &mut self.chunk;
        let mut failed = None;
        let mut id = self.next_id;
        {
            let Ok(reg) = self.shared.registry.read() else {
                for (_, reply) in appends {
                    let _ = reply.send(Err(LogError::Closed));
                }
                return;
            };
            'appends: for (events, reply) in appends {
                let first = id;
                let count = events.len() as u64;
                pending.push(Pending {
                    reply,
                    result: Appended {
                        first: EventId(first),
                        last: EventId(first + count.max(1) - 1),
                        count,
                    },
                });
                for ev in events {
                    let eid = id;
                    id += 1;
                    let rec = delta.entry(ev.topic.clone()).or_insert_with(|| {
                        reg.get(&ev.topic).copied().unwrap_or_else(|| {
                            let r = TopicRecord {
                                topic_id: self.next_topic_id,
                                ..TopicRecord::default()
                            };
                            self.next_topic_id += 1;
                            r
                        })
                    });
                    if rec.count == 0 {
                        rec.first_id = eid;
                    }
                    rec.last_id = eid;
                    rec.count += 1;
                    rec.bytes += ev.data.len() as u64;
                    if let Err(e) = chunk.push(&mut batch, eid, rec.topic_id, time, &ev) {
                        failed = Some(e);
                        break 'appends;
                    }
                    committed.push(Arc::new(Event::new(EventId(eid), time, ev)));
                }
            }
        }
        if let Some(err) = failed {
            // Nothing was written: these ids were never seen by anyone.
            chunk.clear();
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        chunk.close(&mut batch);
        for (t, r) in &delta {
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        if let Err(e) = self.shared.tree.apply_batch(batch) {
            // Nothing of the batch was applied: its ids were never seen by anyone.
            let err = storage(e);
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        self.next_id = id;
        let flush_started = Instant::now();
        let flushed = self.flush();
        self.metrics.observe_flush(flush_started.elapsed());
        if let Err(err) = flushed {
            // The events are written but not known durable: they are not acknowledged and
            // not published. They may surface after a later flush; their ids are never reused.
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        self.publish(delta, committed);
        self.metrics.observe_commit(started.elapsed());
        for p in pending {
            let _ = p.reply.send(Ok(p.result));
        }
    }

    /// Makes durable state visible: registry first, then the head, then the hub, so a reader
    /// never sees an id the registry does not yet cover.
    fn publish(&self, delta: HashMap<Topic, TopicRecord>, committed: Vec<SharedEvent>) {
        if let Ok(mut reg) = self.shared.registry.write() {
            for (t, r) in delta {
                reg.insert(t, r);
            }
        }
        if let Some(last) = committed.last() {
            self.shared.head.store(last.id.0, Ordering::Release);
        }
        if !committed.is_empty() {
            self.hub.publish(committed.into());
        }
    }

    /// Removes the events `..= through`: every chunk that ends at or before it, with its index
    /// entries; the chunk straddling it (at most one, since removal takes a prefix) is
    /// rewritten under the key of its first kept event, with new index entries.
    fn remove_through(&mut self, through: EventId) -> Result<u64, LogError> {
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
                    if i < cut {
                        rec.count = rec.count.saturating_sub(1);
                        rec.bytes = rec.bytes.saturating_sub(peek.data_len as u64);
                        rec.removed_through = rec.removed_through.max(id);
                        delta.insert(topic, rec);
                        removed += 1;
                    } else {
                        if kept.builder.is_empty() {
                            kept.first = id;
                        }
                        if !kept.builder.push_record(bytes) {
                            return Err(LogError::Storage(format!(
                                "chunk {first} cannot be rewritten"
                            )));
                        }
                        kept.topics
                            .entry(rec.topic_id)
                            .or_default()
                            .push((id - kept.first) as u32);
                        kept_first.entry(rec.topic_id).or_insert(id);
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
        self.flush()?;
        self.publish(delta, Vec::new());
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Data;

    /// What the tests expect the log to hold: (id, topic, payload) in id order.
    #[derive(Default)]
    struct Model {
        events: Vec<(u64, String, String)>,
    }

    impl Model {
        fn matching(&self, patterns: &PatternSet, after: u64) -> Vec<u64> {
            self.events
                .iter()
                .filter(|(id, t, _)| *id > after && patterns.matches(&Topic::parse(t).unwrap()))
                .map(|e| e.0)
                .collect()
        }

        fn remove_through(&mut self, through: u64) -> u64 {
            let before = self.events.len();
            self.events.retain(|e| e.0 > through);
            (before - self.events.len()) as u64
        }
    }

    fn opts(dir: &std::path::Path) -> LogOptions {
        LogOptions {
            dir: dir.join("data"),
            cache_bytes: 16 << 20,
        }
    }

    fn open(dir: &std::path::Path) -> Arc<SledLog> {
        SledLog::open(&opts(dir), Hub::new(16), Metrics::new()).expect("open")
    }

    fn open_caps(dir: &std::path::Path, caps: ChunkCaps) -> Arc<SledLog> {
        SledLog::open_with_caps(&opts(dir), Hub::new(16), Metrics::new(), caps).expect("open")
    }

    /// How many stored chunks hold `ids`.
    fn chunks_holding(log: &SledLog, ids: &[u64]) -> u64 {
        chunks(log)
            .iter()
            .filter(|&&(f, n)| ids.iter().any(|id| (f..f + n).contains(id)))
            .count() as u64
    }

    fn pats(ps: &[&str]) -> PatternSet {
        PatternSet::new(ps.iter().map(|p| Pattern::parse(p).unwrap()).collect()).unwrap()
    }

    fn payload(id: u64, size: usize) -> String {
        format!("\"{id}:{}\"", "x".repeat(size))
    }

    /// Appends events to `topics[k]` with payloads of `size`, in one append, recording them.
    async fn append(log: &SledLog, model: &mut Model, topics: &[String], size: usize) -> Appended {
        let first = log.head().0 + 1;
        let events = topics
            .iter()
            .enumerate()
            .map(|(k, t)| NewEvent {
                topic: Topic::parse(t).unwrap(),
                event_type: None,
                msg_id: None,
                data: Data::Json(payload(first + k as u64, size).into()),
            })
            .collect();
        let done = log.append(events).await.expect("append");
        assert_eq!(done.first.0, first, "ids continue from the head");
        for (k, t) in topics.iter().enumerate() {
            let id = first + k as u64;
            model.events.push((id, t.clone(), payload(id, size)));
        }
        done
    }

    /// Reads everything matching after `after`, page by page; checks every event's payload.
    async fn read_all(
        log: &SledLog,
        model: &Model,
        patterns: &PatternSet,
        after: u64,
        limit: usize,
    ) -> (Option<Gap>, Vec<u64>) {
        let mut cursor = EventId(after);
        let mut ids = Vec::new();
        let mut gap = None;
        for round in 0..100_000 {
            let page = log
                .read(patterns.clone(), cursor, limit)
                .await
                .expect("read");
            if round == 0 {
                gap = page.gap;
            } else {
                assert!(page.gap.is_none(), "a gap after the first page");
            }
            assert!(page.events.len() <= limit);
            for e in &page.events {
                let at = model
                    .events
                    .binary_search_by_key(&e.id.0, |m| m.0)
                    .unwrap_or_else(|_| panic!("read event {} the model does not hold", e.id));
                let (_, t, p) = &model.events[at];
                assert_eq!(e.body.topic.as_str(), t);
                assert_eq!(e.body.data, Data::Json(p.as_str().into()));
                ids.push(e.id.0);
            }
            assert!(page.through >= cursor);
            if !page.complete {
                assert_eq!(page.events.len(), limit, "an incomplete page is full");
                assert_eq!(Some(page.through), page.events.last().map(|e| e.id));
            }
            cursor = page.through;
            if page.complete {
                assert_eq!(page.through.0, log.head().0.max(after));
                return (gap, ids);
            }
        }
        panic!("read never completed");
    }

    /// (first id, event count) of every stored chunk, in order.
    fn chunks(log: &SledLog) -> Vec<(u64, u64)> {
        log.shared
            .tree
            .scan_prefix([record::CHUNK_PREFIX])
            .map(|item| {
                let (k, v) = item.unwrap();
                let first = record::chunk_first_of_key(&k).unwrap();
                (first, Chunk::parse(&v).unwrap().len() as u64)
            })
            .collect()
    }

    /// (topic id, chunk first id, offsets) of every index entry.
    fn index_entries(log: &SledLog) -> Vec<(u64, u64, Vec<u32>)> {
        log.shared
            .tree
            .scan_prefix([record::INDEX_PREFIX])
            .map(|item| {
                let (k, v) = item.unwrap();
                let (tid, first) = record::index_key_parts(&k).unwrap();
                (tid, first, record::decode_index(&v).unwrap())
            })
            .collect()
    }

    /// Checks the stored layout against the model: chunks are contiguous runs covering exactly
    /// the model's ids, and the index entries name exactly each topic's events per chunk.
    fn check_layout(log: &SledLog, model: &Model, caps: ChunkCaps) {
        for item in log.shared.tree.scan_prefix([record::CHUNK_PREFIX]) {
            let (_, v) = item.unwrap();
            let chunk = Chunk::parse(&v).unwrap();
            assert!(chunk.len() <= caps.events, "{} events", chunk.len());
            assert!(
                v.len() <= caps.bytes || chunk.len() == 1,
                "a chunk of {} bytes",
                v.len()
            );
        }
        let chunks = chunks(log);
        let stored: Vec<u64> = chunks.iter().flat_map(|&(f, n)| f..f + n).collect();
        let expected: Vec<u64> = model.events.iter().map(|e| e.0).collect();
        assert_eq!(stored, expected, "chunks cover exactly the retained events");
        let reg = log.shared.registry.read().unwrap();
        let mut from_index: Vec<(u64, String)> = Vec::new();
        for (tid, first, offsets) in index_entries(log) {
            assert!(
                chunks.iter().any(|c| c.0 == first),
                "index entry of a missing chunk"
            );
            let topic = reg.iter().find(|(_, r)| r.topic_id == tid).unwrap().0;
            for o in offsets {
                from_index.push((first + u64::from(o), topic.as_str().to_string()));
            }
        }
        from_index.sort();
        let expected: Vec<(u64, String)> =
            model.events.iter().map(|e| (e.0, e.1.clone())).collect();
        assert_eq!(
            from_index, expected,
            "the index names every retained event once"
        );
    }

    /// Checks every topic's statistics against the model.
    fn check_stats(log: &SledLog, model: &Model) {
        for stats in log.topics(None, usize::MAX) {
            let mine: Vec<&(u64, String, String)> =
                model.events.iter().filter(|e| e.1 == stats.topic).collect();
            assert_eq!(stats.count, mine.len() as u64, "count of {}", stats.topic);
            assert_eq!(
                stats.bytes,
                mine.iter().map(|e| e.2.len() as u64).sum::<u64>(),
                "bytes of {}",
                stats.topic
            );
            assert_eq!(
                stats.first_id,
                mine.first().map(|e| e.0),
                "first of {}",
                stats.topic
            );
        }
        assert_eq!(log.event_count(), model.events.len() as u64);
    }

    fn names(prefix: &str, n: usize, topic_of: impl Fn(usize) -> usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{prefix}/{}", topic_of(i)))
            .collect()
    }

    #[tokio::test]
    async fn a_commit_over_the_cap_writes_several_contiguous_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = ChunkCaps {
            events: 500,
            bytes: 64 * 1024,
        };
        let log = open_caps(tmp.path(), caps);
        let mut model = Model::default();
        // Over the event cap: 1,200 small events of 3 topics, interleaved.
        let done = append(&log, &mut model, &names("a", 1200, |i| i % 3), 1).await;
        assert_eq!((done.first.0, done.last.0, done.count), (1, 1200, 1200));
        let c = chunks(&log);
        assert_eq!(
            c,
            [(1, 500), (501, 500), (1001, 200)],
            "split by event count"
        );
        // Over the byte cap: 300 events of ~1 KiB.
        append(&log, &mut model, &names("b", 300, |i| i % 2), 1000).await;
        let c = chunks(&log);
        assert_eq!(c.len(), 3 + 5, "split by size: {c:?}");
        // One index entry per (topic, chunk).
        assert_eq!(index_entries(&log).len(), 3 * 3 + 2 * 5);
        check_layout(&log, &model, caps);
        check_stats(&log, &model);
        for p in [&["a/0"][..], &["a/1", "b/1"], &["a/*"], &["**"]] {
            let p = pats(p);
            assert_eq!(
                read_all(&log, &model, &p, 0, 1000).await.1,
                model.matching(&p, 0)
            );
        }
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn reads_start_anywhere_inside_a_chunk_and_merge_topics_interleaved_in_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = ChunkCaps {
            events: 1000,
            bytes: 32 * 1024,
        };
        let log = open_caps(tmp.path(), caps);
        let mut model = Model::default();
        // Irregular interleaving of 5 topics, several commits of several chunks.
        for round in 0..4 {
            let n = 3000 + round * 1111;
            append(
                &log,
                &mut model,
                &names("m", n, |i| (i * i + round) % 5),
                40,
            )
            .await;
        }
        let head = log.head().0;
        let boundaries: Vec<u64> = chunks(&log).iter().map(|c| c.0).collect();
        assert!(boundaries.len() > 8, "{boundaries:?}");
        let mut cursors: Vec<u64> = vec![0, 1, 2, head - 1, head, head + 5];
        for b in &boundaries {
            cursors.extend([b - 1, *b, b + 1, b + 17]);
        }
        let sets = [
            pats(&["m/3"]),
            pats(&["m/0", "m/4"]),
            pats(&["m/*"]),
            pats(&["m/1", "m/2", "m/3"]),
        ];
        for p in &sets {
            for &after in &cursors {
                let expected = model.matching(p, after);
                for limit in [1usize, 7, 500] {
                    // One page: exactly the next `limit` matching events.
                    let page = log.read(p.clone(), EventId(after), limit).await.unwrap();
                    let got: Vec<u64> = page.events.iter().map(|e| e.id.0).collect();
                    assert_eq!(got, expected[..limit.min(expected.len())], "after {after}");
                    assert!(page.gap.is_none());
                    assert_eq!(page.complete, expected.len() <= limit);
                }
            }
            // Whole reads, paged, from a few cursors.
            for after in [0, boundaries[3] + 2, head - 10] {
                let (gap, ids) = read_all(&log, &model, p, after, 613).await;
                assert!(gap.is_none());
                assert_eq!(ids, model.matching(p, after));
            }
        }
        check_layout(&log, &model, caps);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn more_topics_than_the_merge_limit_walk_the_chunks_and_filter() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = ChunkCaps {
            events: 1000,
            bytes: 64 * 1024,
        };
        let log = open_caps(tmp.path(), caps);
        let mut model = Model::default();
        // 100 topics under w/ and 3 under x/, interleaved, over several chunks.
        for _ in 0..3 {
            let topics: Vec<String> = (0..3000)
                .map(|i| {
                    if i % 4 == 3 {
                        format!("x/{}", i % 3)
                    } else {
                        format!("w/{}", (i * 13) % 100)
                    }
                })
                .collect();
            append(&log, &mut model, &topics, 60).await;
        }
        assert!(chunks(&log).len() > 5);
        let p = pats(&["w/*"]);
        let boundary = chunks(&log)[2].0;
        for after in [0, 1, boundary - 1, boundary, boundary + 3, log.head().0 - 2] {
            let (gap, ids) = read_all(&log, &model, &p, after, 997).await;
            assert!(gap.is_none());
            assert_eq!(ids, model.matching(&p, after), "after {after}");
            let page = log.read(p.clone(), EventId(after), 5).await.unwrap();
            let got: Vec<u64> = page.events.iter().map(|e| e.id.0).collect();
            let expected = model.matching(&p, after);
            assert_eq!(got, expected[..5.min(expected.len())]);
        }
        // The walk starts at the chunk holding the cursor and stops when the page is full.
        let mut cost = ReadCost::default();
        let page = read_page_costed(&log.shared, &p, EventId(boundary + 3), 50, &mut cost).unwrap();
        let got: Vec<u64> = page.events.iter().map(|e| e.id.0).collect();
        assert_eq!(got.len(), 50);
        assert_eq!(cost.chunks, chunks_holding(&log, &got), "{cost:?}");
        check_layout(&log, &model, caps);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_quiet_topic_resumes_at_the_cost_of_what_it_returns_behind_many_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = ChunkCaps {
            events: 1000,
            bytes: 64 * 1024,
        };
        let log = open_caps(tmp.path(), caps);
        let mut model = Model::default();
        append(&log, &mut model, &names("q", 5, |_| 0), 10).await;
        for round in 0..60 {
            append(&log, &mut model, &names("noise", 4000, |i| i % 16), 30).await;
            if round % 10 == 9 {
                append(&log, &mut model, &names("q", 1, |_| 0), 10).await;
            }
        }
        assert!(chunks(&log).len() > 150, "{} chunks", chunks(&log).len());
        let quiet = pats(&["q/0"]);
        let all = model.matching(&quiet, 0);
        assert_eq!(all.len(), 11);
        for (after, returned) in [(0, 11), (3, 8), (all[5], 5), (all[10], 0)] {
            let mut cost = ReadCost::default();
            let page = read_page_costed(&log.shared, &quiet, EventId(after), 1000, &mut cost)
                .expect("read");
            let got: Vec<u64> = page.events.iter().map(|e| e.id.0).collect();
            assert_eq!(got, model.matching(&quiet, after));
            assert_eq!(got.len(), returned);
            assert!(page.complete);
            // Each chunk holding a returned event is fetched once, and no other; the index
            // entries read are those chunks' (the first five events share one).
            assert_eq!(cost.chunks, chunks_holding(&log, &got), "{cost:?}");
            assert!(cost.index_entries <= cost.chunks + 1, "{cost:?}");
        }
        // The noise itself, read from the middle, costs its chunks, not the whole log.
        let noise = pats(&["noise/3"]);
        let mut cost = ReadCost::default();
        let after = log.head().0 - 10_000;
        let page = read_page_costed(&log.shared, &noise, EventId(after), 100, &mut cost).unwrap();
        assert_eq!(page.events.len(), 100);
        let got: Vec<u64> = page.events.iter().map(|e| e.id.0).collect();
        assert_eq!(cost.chunks, chunks_holding(&log, &got), "{cost:?}");
        assert!(
            cost.chunks <= 3 && cost.index_entries <= cost.chunks + 1,
            "{cost:?}"
        );
        check_layout(&log, &model, caps);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn remove_through_on_a_chunk_boundary_and_inside_a_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = CHUNK_CAPS;
        let log = open(tmp.path());
        let mut model = Model::default();
        // Three commits of ten: ids 1..=10, 11..=20, 21..=30, one chunk each. r/c has events
        // only in the first half of the second chunk.
        let topic = |id: u64| {
            if (11..=13).contains(&id) {
                "r/c".to_string()
            } else if id % 2 == 0 {
                "r/a".to_string()
            } else {
                "r/b".to_string()
            }
        };
        for c in 0..3u64 {
            let topics: Vec<String> = (1..=10).map(|k| topic(c * 10 + k)).collect();
            append(&log, &mut model, &topics, c as usize * 3 + 1).await;
        }
        assert_eq!(chunks(&log), [(1, 10), (11, 10), (21, 10)]);
        let all = pats(&["r/*"]);
        let only_a = pats(&["r/a"]);
        let only_c = pats(&["r/c"]);

        // On a chunk boundary: the first chunk goes whole.
        assert_eq!(log.remove_through(EventId(10)).await.unwrap(), 10);
        model.remove_through(10);
        assert_eq!(chunks(&log), [(11, 10), (21, 10)]);
        check_layout(&log, &model, caps);
        check_stats(&log, &model);
        let (gap, ids) = read_all(&log, &model, &all, 4, 3).await;
        assert_eq!(
            gap,
            Some(Gap {
                requested: 4,
                oldest: 11
            })
        );
        assert_eq!(ids, model.matching(&all, 10));
        assert_eq!(read_all(&log, &model, &all, 10, 3).await.0, None);
        assert_eq!(
            read_all(&log, &model, &all, 0, 3).await.0,
            None,
            "cursor 0: no gap"
        );

        // Inside a chunk: 11..=15 go, 16..=20 are rewritten under key 16. r/c loses all.
        assert_eq!(log.remove_through(EventId(15)).await.unwrap(), 5);
        model.remove_through(15);
        assert_eq!(chunks(&log), [(16, 5), (21, 10)]);
        check_layout(&log, &model, caps);
        check_stats(&log, &model);
        let c = log.topic(&Topic::parse("r/c").unwrap()).unwrap();
        assert_eq!((c.count, c.first_id, c.last_id, c.bytes), (0, None, 13, 0));
        let a = log.topic(&Topic::parse("r/a").unwrap()).unwrap();
        assert_eq!(a.first_id, Some(16));
        // r/a lost up to 14: a cursor before that has a gap, reads resume mid-chunk.
        let (gap, ids) = read_all(&log, &model, &only_a, 12, 2).await;
        assert_eq!(
            gap,
            Some(Gap {
                requested: 12,
                oldest: 15
            })
        );
        assert_eq!(ids, model.matching(&only_a, 15));
        assert_eq!(
            read_all(&log, &model, &only_a, 16, 2).await,
            (None, vec![18, 20, 22, 24, 26, 28, 30])
        );
        assert_eq!(
            read_all(&log, &model, &only_c, 11, 2).await,
            (
                Some(Gap {
                    requested: 11,
                    oldest: 14
                }),
                vec![]
            )
        );
        for after in [0, 15, 16, 17, 20, 21] {
            assert_eq!(
                read_all(&log, &model, &all, after, 4).await.1,
                model.matching(&all, after.max(15))
            );
        }

        // Reopen: the same content and statistics, and ids continue.
        log.close().await.unwrap();
        drop(log);
        let log = open(tmp.path());
        check_layout(&log, &model, caps);
        check_stats(&log, &model);
        assert_eq!(log.head().0, 30);
        append(&log, &mut model, &names("r", 5, |i| i % 2), 2).await;

        // Everything, asked past the head: the head bounds it, topics keep their last id.
        assert_eq!(log.remove_through(EventId(1000)).await.unwrap(), 20);
        model.remove_through(35);
        assert!(chunks(&log).is_empty() && index_entries(&log).is_empty());
        check_stats(&log, &model);
        log.close().await.unwrap();
        drop(log);
        let log = open(tmp.path());
        assert_eq!(
            log.head().0,
            35,
            "ids are never reused after removing everything"
        );
        let (gap, ids) = read_all(&log, &model, &all, 2, 10).await;
        assert_eq!((gap.map(|g| g.oldest), ids), (Some(36), vec![]));
        assert_eq!(
            append(&log, &mut model, &names("r", 1, |_| 7), 1)
                .await
                .first
                .0,
            36
        );
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn remove_through_inside_a_multi_chunk_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = ChunkCaps {
            events: 4096,
            bytes: 1 << 20,
        };
        let log = open_caps(tmp.path(), caps);
        let mut model = Model::default();
        append(&log, &mut model, &names("s", 9000, |i| (i / 7) % 4), 1).await;
        assert_eq!(chunks(&log), [(1, 4096), (4097, 4096), (8193, 808)]);
        assert_eq!(log.remove_through(EventId(5000)).await.unwrap(), 5000);
        model.remove_through(5000);
        assert_eq!(chunks(&log), [(5001, 3192), (8193, 808)]);
        check_layout(&log, &model, caps);
        check_stats(&log, &model);
        let p = pats(&["s/1", "s/2"]);
        for after in [0, 4999, 5000, 5001, 5003, 8192, 8193] {
            let (gap, ids) = read_all(&log, &model, &p, after, 333).await;
            assert_eq!(ids, model.matching(&p, after.max(4999)), "after {after}");
            // The gap names the largest id removed from the matching topics.
            let removed = (1..=5000u64)
                .filter(|id| [1, 2].contains(&(((id - 1) / 7) % 4)))
                .max()
                .unwrap();
            assert_eq!(
                gap,
                (after > 0 && after < removed).then_some(Gap {
                    requested: after,
                    oldest: removed + 1
                })
            );
        }
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn reopen_after_close_preserves_the_next_id_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        let caps = CHUNK_CAPS;
        let mut model = Model::default();
        for round in 0..3u64 {
            let log = open(tmp.path());
            assert_eq!(log.head().0, round * 5000);
            append(&log, &mut model, &names("o", 5000, |i| i % 3), 5).await;
            check_layout(&log, &model, caps);
            check_stats(&log, &model);
            let p = pats(&["o/2"]);
            assert_eq!(
                read_all(&log, &model, &p, 0, 4096).await.1,
                model.matching(&p, 0)
            );
            log.close().await.unwrap();
            assert!(matches!(
                log.append(vec![]).await,
                Err(LogError::Storage(_)) | Err(LogError::Closed)
            ));
        }
    }

    #[tokio::test]
    async fn chunks_of_ordinary_events_never_go_to_sleds_unsynced_blob_files() {
        let tmp = tempfile::tempdir().unwrap();
        let log = open(tmp.path());
        let mut model = Model::default();
        for round in 0..30 {
            append(&log, &mut model, &names("b", 2000, |i| i % 3), 256).await;
            if round == 15 {
                // Removal empties and merges leaves too.
                let through = log.head().0 / 2 + 7;
                log.remove_through(EventId(through)).await.unwrap();
                model.remove_through(through);
            }
        }
        check_layout(&log, &model, CHUNK_CAPS);
        log.close().await.unwrap();
        let blobs = tmp.path().join("data").join("blobs");
        let n = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        assert_eq!(n, 0, "sled wrote {n} blob files (not fsynced by flush)");
    }

    #[tokio::test]
    async fn large_events_land_in_blob_files_that_are_synced_before_the_ack() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let log = SledLog::open(&opts(tmp.path()), Hub::new(16), metrics.clone()).expect("open");
        let mut model = Model::default();
        // Leaves of ~200 KiB events are far beyond what sled keeps in its log segments.
        for _ in 0..4 {
            append(&log, &mut model, &names("big", 3, |i| i % 2), 200_000).await;
        }
        let blobs = tmp.path().join("data").join("blobs");
        let on_disk = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        assert!(
            on_disk > 0,
            "expected sled to write blob files for large pages"
        );
        let synced = metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tidewire_log_blobs_synced_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("blob sync counter");
        assert!(synced > 0, "no blob file was fsynced before the acks");
        let p = pats(&["big/**"]);
        assert_eq!(
            read_all(&log, &model, &p, 0, 4096).await.1,
            model.matching(&p, 0)
        );
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_v1_directory_is_refused_with_a_clear_message() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let db = sled::open(tmp.path().join("data")).unwrap();
            let tree = db.open_tree("log").unwrap();
            tree.insert(record::FORMAT_KEY, record::FORMAT_V1).unwrap();
            db.flush().unwrap();
        }
        let err = SledLog::open(&opts(tmp.path()), Hub::new(4), Metrics::new())
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(matches!(err, LogError::Open(_)), "{err:?}");
        assert!(
            msg.contains("tidewire-log-v1") && msg.contains("tidewire-log-v2"),
            "{msg}"
        );
    }
}
