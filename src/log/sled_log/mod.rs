//! The embedded log on sled: one tree, keys prefixed by kind (see [`record`](super::record)),
//! one writer thread that owns id assignment and group commit.
//!
//! Storage is chunked (format `tidewire-log-v2`): each group commit writes its events as one
//! or a few chunks (a contiguous run of ids per key) and one index entry per (topic, chunk),
//! so a commit costs a few sled keys instead of two per event. The chunks, their index
//! entries and the topics' statistics are written in one atomic `apply_batch`, so a crash
//! never leaves an index entry without its chunk or the reverse.
//!
//! [`writer`] holds the writer thread (ids, chunks, group commit, removal); [`read`] the read
//! path (index merge from a cursor); this file opens the log and serves the [`EventLog`] trait.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sled::IVec;
use tokio::sync::{mpsc, oneshot};

use super::record::{self, Chunk, ChunkBuilder, CorruptRecord, TopicRecord};
use super::retention::RetentionPolicy;
use super::wal_record::RecordBuilder;
use super::{
    Appended, BoxFuture, EventLog, FsyncPolicy, Latest, LogError, Page, TimeStart, TopicStats,
};
use crate::clock::Clock;
use crate::envelope::{Event, EventId, Gap, NewEvent, SharedEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::topic::{Pattern, PatternSet, Topic};

mod checkpoint;
mod compact;
mod dedupe;
#[cfg(test)]
mod dedupe_tests;
mod lock;
mod mark;
mod ops;
#[cfg(test)]
mod ops_tests;
mod read;
mod replay;
#[cfg(test)]
mod retention_tests;
mod start;
#[cfg(test)]
mod start_tests;
#[cfg(test)]
mod tests;
mod wal;
#[cfg(test)]
mod wal_tests;
mod writer;

use checkpoint::StoreSync;
pub use compact::Compacted;
use dedupe::Dedupe;
pub use dedupe::DedupeOptions;
use lock::{open_db, LockWait};
pub use ops::{ImportEvent, Inspection, Verification};
use read::*;
use wal::Wal;
pub use wal::WalRecovery;
use writer::*;

/// Most events one group commit takes from the queue before it writes and flushes.
const MAX_ROUND_EVENTS: usize = 50_000;
/// When a read matches more topics than this, it walks the log from the cursor instead of
/// merging that many per-topic index ranges.
const MAX_MERGED_TOPICS: usize = 64;
/// Reads at most this many events behind the head run on the caller's task (see `read`).
const INLINE_READ_EVENTS: u64 = 256;
/// Publishes waiting for the writer before publishers are made to wait.
const QUEUE_DEPTH: usize = 4096;
/// How often the writer forgets expired `(topic, msg_id)` pairs.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Ids reserved at a time under the fsync policies that acknowledge before a flush: one
/// extra flush per this many events, and at most this many ids skipped after a crash.
const ID_RESERVATION: u64 = 1 << 20;

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
    /// How long, and how many, `(topic, msg_id)` pairs are remembered for idempotent publish.
    pub dedupe: DedupeOptions,
    /// When an append is acknowledged relative to the flush that makes it durable.
    pub fsync: FsyncPolicy,
    /// How much history is kept; applied in the background.
    pub retention: RetentionPolicy,
    /// When appends are refused for lack of room.
    pub space: SpaceLimits,
    /// Longest time between background flushes of sled (checkpoints) while events arrive.
    pub checkpoint_every: Duration,
    /// Bytes after which a WAL segment is closed and the next one started.
    pub wal_segment_bytes: u64,
}

/// When the log refuses appends for lack of room (with [`LogError::Full`]), before the disk
/// itself is full: sled cannot recover from a failed write without a restart, so the log
/// keeps it from ever hitting one. 0 in a field: no such limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceLimits {
    /// Free bytes to keep on the data directory's filesystem.
    pub min_free_bytes: u64,
    /// Most bytes the data directory may take on disk.
    pub max_disk_bytes: u64,
}

impl Default for SpaceLimits {
    fn default() -> Self {
        SpaceLimits {
            min_free_bytes: 64 << 20,
            max_disk_bytes: 0,
        }
    }
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
    /// Periodic work: an interval flush when due, a dedupe sweep when due.
    Tick,
    /// Restore exported events with their ids.
    Import {
        events: Vec<ops::ImportEvent>,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
    /// One retention pass now.
    Compact {
        reply: oneshot::Sender<Result<Compacted, LogError>>,
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
    db: sled::Db,
    /// What the write-ahead log held when the log opened.
    recovery: WalRecovery,
    queue: Mutex<Option<mpsc::Sender<Command>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl std::borrow::Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

fn storage(e: sled::Error) -> LogError {
    match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            LogError::Full(e.to_string())
        }
        _ => LogError::Storage(e.to_string()),
    }
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

/// Refuses a directory that holds something, but not a sled database: opening it would
/// write sled's files among someone else's.
fn refuse_foreign_dir(dir: &std::path::Path) -> Result<(), LogError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Missing (it is created) or unreadable (sled's own error says why).
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "conf") && names.iter().any(|n| n == "db") {
        return Ok(());
    }
    let mut shown: Vec<&str> = names.iter().map(String::as_str).take(5).collect();
    shown.sort_unstable();
    Err(LogError::Open(format!(
        "{}: not a tidewire data directory (it holds {}); refusing to write into it: \
         give an empty or new directory",
        dir.display(),
        shown.join(", ")
    )))
}

impl SledLog {
    /// Makes the next open of the closed log in `dir` fast: the next start reads a snapshot
    /// instead of replaying everything written since the last open. Changes no event.
    ///
    /// Why: sled 0.34 records its page-table snapshot only while it opens a database, so an
    /// open replays every log segment written since the previous open (1.7–5 s after ten
    /// million events here). Opening and closing the directory once at a clean shutdown
    /// moves that replay from the next start to this stop; it is the same recovery every
    /// start runs, so a crash in the middle of it is a crash during a start.
    ///
    /// Call it only after the log is closed and every handle to it dropped: while a log
    /// still holds the directory, sled's lock refuses the open and this fails (after
    /// waiting 2 s for the lock) without touching anything.
    pub fn checkpoint(dir: &std::path::Path) -> Result<(), LogError> {
        let db = open_db(&sled::Config::new().path(dir), dir, LockWait::CHECKPOINT)
            .map_err(|e| LogError::Open(format!("{}: {e}", dir.display())))?;
        db.flush().map_err(storage)?;
        Ok(())
    }

    /// Opens (or creates) the log in `opts.dir` and starts its writer. Committed batches go
    /// to `hub`. Refuses a directory that holds something other than a tidewire log, and
    /// one another open log holds: a lock another process holds is waited for 2 s (a server
    /// still exiting), one this process holds up to 30 s (sled's own threads finishing after
    /// the last close, as long as an fsync takes); the error names the holder.
    pub fn open(opts: &LogOptions, hub: Hub, metrics: Metrics) -> Result<Arc<Self>, LogError> {
        Self::open_with_clock(opts, hub, metrics, Clock::system())
    }

    /// Like [`SledLog::open`], with events dated by `clock` (tests step it). Whatever the
    /// clock says, an event's time is never below the time of the event before it.
    pub fn open_with_clock(
        opts: &LogOptions,
        hub: Hub,
        metrics: Metrics,
        clock: Clock,
    ) -> Result<Arc<Self>, LogError> {
        Self::open_with_caps(opts, hub, metrics, CHUNK_CAPS, clock)
    }

    fn open_with_caps(
        opts: &LogOptions,
        hub: Hub,
        metrics: Metrics,
        caps: ChunkCaps,
        clock: Clock,
    ) -> Result<Arc<Self>, LogError> {
        refuse_foreign_dir(&opts.dir)?;
        let config = sled::Config::new()
            .path(&opts.dir)
            .cache_capacity(opts.cache_bytes);
        let db = open_db(&config, &opts.dir, LockWait::OPEN)
            .map_err(|e| LogError::Open(format!("{}: {e}", opts.dir.display())))?;
        let tree = db.open_tree("log").map_err(storage)?;
        // Synced by every flush, and named durably: the directory is synced once here.
        let log_file = std::fs::File::open(opts.dir.join("db"))
            .and_then(|f| std::fs::File::open(&opts.dir)?.sync_all().map(|()| f))
            .map_err(|e| LogError::Open(format!("{}: sled's log file: {e}", opts.dir.display())))?;
        let durable_mark = mark::read(&opts.dir)?;
        if durable_mark.is_some_and(|m| m > 0)
            && tree.get(record::FORMAT_KEY).map_err(storage)?.is_none()
        {
            // Never initialise a fresh log over one sled could not read back.
            mark::check(&opts.dir, durable_mark, 0)?;
        }
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
        // Its last event's time is where the writer's clock resumes: time never goes back,
        // across restarts too (the WAL's events, replayed below, move it on).
        let mut last_time = 0;
        if let Some(item) = tree.scan_prefix([record::CHUNK_PREFIX]).next_back() {
            let (k, v) = item.map_err(storage)?;
            let first = record::chunk_first_of_key(&k).map_err(corrupt)?;
            let chunk = Chunk::parse(&v).map_err(corrupt)?;
            let n = chunk.len() as u64;
            high_water = high_water.max(first.saturating_add(n - 1));
            let rec = chunk.record(chunk.len() - 1).map_err(corrupt)?;
            last_time = record::peek_event(rec).map_err(corrupt)?.time;
        }

        let dedupe_count = match tree.get(record::DEDUPE_COUNT_KEY).map_err(storage)? {
            Some(v) => record::decode_count(&v).map_err(corrupt)?,
            None => 0,
        };

        // Under a policy that acknowledges before a flush, ids up to the stored reservation
        // may have been handed out (and then lost in a crash): continue above them.
        let stored_reservation = match tree.get(record::IDS_RESERVED_KEY).map_err(storage)? {
            Some(v) => Some(record::decode_count(&v).map_err(corrupt)?),
            None => None,
        };
        let wal = Wal::open(&opts.dir, opts.wal_segment_bytes)?;
        checkpoint::check(&opts.dir, checkpoint::read(wal.dir())?, high_water)?;
        let trimmed_before = registry.values().any(|r| r.removed_through > 0);
        let next_id = high_water.max(stored_reservation.unwrap_or(0)) + 1;
        let reserved = match opts.fsync {
            FsyncPolicy::Always => None,
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Some(next_id - 1),
        };

        let shared = Arc::new(Shared {
            tree,
            head: AtomicU64::new(high_water),
            registry: RwLock::new(registry),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let db_handle = db.clone();
        let store = StoreSync::new(db, log_file, opts.dir.clone());
        let mut writer = Writer {
            store,
            wal,
            store_behind_wal: false,
            spare_stop: None,
            spare_maker: None,
            checkpointed: high_water,
            last_checkpoint: Instant::now(),
            checkpoint_every: opts.checkpoint_every,
            wal_since_checkpoint: 0,
            checkpoint_bytes: checkpoint::checkpoint_bytes(opts.cache_bytes),
            shared: shared.clone(),
            hub,
            metrics: metrics.clone(),
            next_id,
            next_topic_id,
            chunk: OpenChunk::logged(caps),
            dedupe: Dedupe::new(opts.dedupe, dedupe_count),
            fsync: opts.fsync,
            unpublished: Unpublished::default(),
            last_flush: Instant::now(),
            last_sweep: Instant::now(),
            reserved,
            retention: opts.retention.clone(),
            last_compact: Instant::now(),
            durable_through: high_water,
            compact_more: false,
            reclaim_cursor: 0,
            // A reopened log that retention has trimmed may hold chunks that died before it
            // closed: one cycle finds them.
            removals: u64::from(trimmed_before),
            reclaim_cycle_start: 0,
            reclaimed_through: 0,
            last_applied: high_water,
            marked: durable_mark.unwrap_or(0),
            space: opts.space,
            dir: opts.dir.clone(),
            over_disk_budget: None,
            clock,
            last_time,
        };
        let recovery = writer.replay_wal(high_water)?;
        mark::check(&opts.dir, durable_mark, writer.last_applied)?;
        let (stop, stopped) = std::sync::mpsc::sync_channel(1);
        writer.spare_stop = Some(stop);
        writer.spare_maker = Some(
            checkpoint::SpareMaker {
                wal_dir: writer.wal.dir().to_path_buf(),
                segment_bytes: opts.wal_segment_bytes,
                min_free: opts.space.min_free_bytes,
            }
            .spawn(stopped)?,
        );
        let ticks = tx.downgrade();
        let mut tick_every = SWEEP_EVERY;
        if let FsyncPolicy::Interval(every) = opts.fsync {
            tick_every = tick_every.min(every.max(Duration::from_millis(1)));
        }
        if opts.retention.removes_anything() {
            tick_every = tick_every.min(opts.retention.check_every);
        }
        // A quiet log is checkpointed by the tick; a busy one after its commits.
        tick_every = tick_every.min(opts.checkpoint_every.max(Duration::from_millis(1)));
        std::thread::Builder::new()
            .name("tidewire-log-writer".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| LogError::Open(format!("cannot start the writer thread: {e}")))?;
        // A weak sender: the ticker never keeps a closed log's writer alive.
        std::thread::Builder::new()
            .name("tidewire-log-ticker".into())
            .spawn(move || loop {
                std::thread::sleep(tick_every);
                let Some(tx) = ticks.upgrade() else { break };
                // A full queue means a busy writer, which checks the interval after every
                // commit anyway: the next tick asks again.
                let _ = tx.try_send(Command::Tick);
            })
            .map_err(|e| LogError::Open(format!("cannot start the ticker thread: {e}")))?;
        Ok(Arc::new(SledLog {
            shared,
            db: db_handle,
            recovery,
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

    /// Runs one retention pass now (they also run in the background every `check_every`)
    /// and says what it removed. Each pass is bounded; a large backlog takes several.
    pub async fn compact_now(&self) -> Result<Compacted, LogError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Command::Compact { reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Statistics of the topics matching `filter` (all when `None`), in name order, at most
    /// `limit`, from the registry in memory.
    pub fn topics_now(&self, filter: Option<&Pattern>, limit: usize) -> Vec<TopicStats> {
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

    /// Statistics of one topic, from the registry in memory.
    pub fn topic_now(&self, topic: &Topic) -> Option<TopicStats> {
        let reg = self.shared.registry.read().ok()?;
        reg.get(topic).map(|r| stats(topic, r))
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
            // A reader close behind the head (a long-poll or a stream catching up) reads the
            // chunks the writer just wrote, from sled's cache: in place that costs microseconds,
            // less than the two thread switches of a trip through the blocking pool. The work
            // is bounded by the events behind the head; anything else goes to the pool.
            let behind = shared.head.load(Ordering::Acquire).saturating_sub(after.0);
            if behind <= INLINE_READ_EVENTS {
                match read_once(&shared, &patterns, after, limit, &mut ReadCost::default()) {
                    Ok(page) => return Ok(page),
                    Err(ReadFail::Log(e)) => return Err(e),
                    // Retention raced the read: its retries wait, so they go to the pool.
                    Err(ReadFail::ChunkGone(_)) => {}
                }
            }
            tokio::task::spawn_blocking(move || read_page(&shared, &patterns, after, limit))
                .await
                .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
        })
    }

    fn head(&self) -> EventId {
        EventId(self.shared.head.load(Ordering::Acquire))
    }

    fn latest(
        &self,
        patterns: PatternSet,
        at_most: EventId,
        limit: usize,
    ) -> BoxFuture<'_, Result<Latest, LogError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || start::latest(&shared, &patterns, at_most, limit))
                .await
                .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
        })
    }

    fn time_start(
        &self,
        patterns: PatternSet,
        time_ms: u64,
    ) -> BoxFuture<'_, Result<TimeStart, LogError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || start::time_start(&shared, &patterns, time_ms))
                .await
                .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
                .map(|(start, _)| start)
        })
    }

    fn topics<'a>(
        &'a self,
        filter: Option<&'a Pattern>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<TopicStats>, LogError>> {
        Box::pin(async move { Ok(self.topics_now(filter, limit)) })
    }

    fn topic<'a>(
        &'a self,
        topic: &'a Topic,
    ) -> BoxFuture<'a, Result<Option<TopicStats>, LogError>> {
        Box::pin(async move { Ok(self.topic_now(topic)) })
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
        bytes: Some(r.bytes),
    }
}
