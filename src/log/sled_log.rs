//! The embedded log on sled: one tree, keys prefixed by kind (see [`record`](super::record)),
//! one writer thread that owns id assignment and group commit.
//!
//! An event, its per-topic index entry and its topic's statistics are written in one atomic
//! `apply_batch`, so a crash never leaves an index entry without its event or the reverse.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use super::record::{self, TopicRecord};
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
        let db = sled::Config::new()
            .path(&opts.dir)
            .cache_capacity(opts.cache_bytes)
            .open()
            .map_err(|e| LogError::Open(format!("{}: {e}", opts.dir.display())))?;
        let tree = db.open_tree("log").map_err(storage)?;
        match tree.get(record::FORMAT_KEY).map_err(storage)? {
            Some(v) if v.as_ref() == record::FORMAT_VERSION => {}
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
        // the newest event key is checked too, so a topic-less log still never reuses an id.
        if let Some(item) = tree.scan_prefix([record::EVENT_PREFIX]).next_back() {
            let (k, _) = item.map_err(storage)?;
            let id = record::event_id_of_key(&k).map_err(|e| LogError::Corrupt(e.0))?;
            high_water = high_water.max(id.0);
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

fn read_page(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
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
    let mut ids: Vec<EventId> = Vec::new();
    let mut full = false;
    if live.len() <= MAX_MERGED_TOPICS {
        // Merge the per-topic index ranges (after, head] in id order.
        let mut iters: Vec<_> = live
            .iter()
            .map(|&tid| {
                tree.range(
                    record::index_key(tid, EventId(after + 1))
                        ..=record::index_key(tid, EventId(head)),
                )
                .keys()
            })
            .collect();
        let mut heap = BinaryHeap::new();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(k) = it.next() {
                let id = record::event_id_of_index_key(&k.map_err(storage)?)
                    .map_err(|e| LogError::Corrupt(e.0))?;
                heap.push(Reverse((id, i)));
            }
        }
        while let Some(Reverse((id, i))) = heap.pop() {
            if ids.len() == limit {
                full = true;
                break;
            }
            ids.push(id);
            if let Some(k) = iters[i].next() {
                let next = record::event_id_of_index_key(&k.map_err(storage)?)
                    .map_err(|e| LogError::Corrupt(e.0))?;
                heap.push(Reverse((next, i)));
            }
        }
        for id in ids {
            let Some(v) = tree.get(record::event_key(id)).map_err(storage)? else {
                return Err(LogError::Corrupt(format!("index names missing event {id}")));
            };
            let (time, body) = record::decode_event(&v).map_err(|e| LogError::Corrupt(e.0))?;
            page.events.push(Arc::new(Event::new(id, time, body)));
        }
    } else {
        // Many topics: walk the events after the cursor, which costs what lies after it.
        for item in
            tree.range(record::event_key(EventId(after + 1))..=record::event_key(EventId(head)))
        {
            let (k, v) = item.map_err(storage)?;
            let id = record::event_id_of_key(&k).map_err(|e| LogError::Corrupt(e.0))?;
            let (time, body) = record::decode_event(&v).map_err(|e| LogError::Corrupt(e.0))?;
            if patterns.matches(&body.topic) {
                if page.events.len() == limit {
                    full = true;
                    break;
                }
                page.events.push(Arc::new(Event::new(id, time, body)));
            }
        }
    }
    if full {
        page.complete = false;
        page.through = page.events.last().map(|e| e.id).unwrap_or(EventId(after));
    }
    Ok(page)
}

/// The single writer: assigns ids, writes, flushes, then publishes and acknowledges.
struct Writer {
    db: sled::Db,
    shared: Arc<Shared>,
    hub: Hub,
    metrics: Metrics,
    next_id: u64,
    next_topic_id: u64,
}

struct Pending {
    reply: AppendReply,
    result: Appended,
}

impl Writer {
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
        if let Err(e) = self.db.flush() {
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
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut committed: Vec<SharedEvent> = Vec::new();
        let mut pending = Vec::with_capacity(appends.len());
        let mut id = self.next_id;
        {
            let Ok(reg) = self.shared.registry.read() else {
                for (_, reply) in appends {
                    let _ = reply.send(Err(LogError::Closed));
                }
                return;
            };
            for (events, reply) in appends {
                let first = id;
                let count = events.len() as u64;
                for ev in events {
                    let eid = EventId(id);
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
                        rec.first_id = eid.0;
                    }
                    rec.last_id = eid.0;
                    rec.count += 1;
                    rec.bytes += ev.data.len() as u64;
                    batch.insert(&record::event_key(eid), record::encode_event(time, &ev));
                    batch.insert(&record::index_key(rec.topic_id, eid), &[][..]);
                    committed.push(Arc::new(Event::new(eid, time, ev)));
                }
                pending.push(Pending {
                    reply,
                    result: Appended {
                        first: EventId(first),
                        last: EventId(id - 1),
                        count,
                    },
                });
            }
        }
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
        let flushed = self.db.flush();
        self.metrics.observe_flush(flush_started.elapsed());
        if let Err(e) = flushed {
            // The events are written but not known durable: they are not acknowledged and
            // not published. They may surface after a later flush; their ids are never reused.
            let err = storage(e);
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

    fn remove_through(&mut self, through: EventId) -> Result<u64, LogError> {
        let head = self.shared.head.load(Ordering::Acquire);
        let through = through.0.min(head);
        let tree = &self.shared.tree;
        let mut batch = sled::Batch::default();
        let mut delta: HashMap<Topic, TopicRecord> = HashMap::new();
        let mut removed = 0u64;
        {
            let reg = self.shared.registry.read().map_err(|_| LogError::Closed)?;
            for item in
                tree.range(record::event_key(EventId(1))..=record::event_key(EventId(through)))
            {
                let (k, v) = item.map_err(storage)?;
                let id = record::event_id_of_key(&k).map_err(|e| LogError::Corrupt(e.0))?;
                let (_, body) = record::decode_event(&v).map_err(|e| LogError::Corrupt(e.0))?;
                let Some(mut rec) = delta
                    .get(&body.topic)
                    .or_else(|| reg.get(&body.topic))
                    .copied()
                else {
                    return Err(LogError::Corrupt(format!("event {id} has no topic record")));
                };
                rec.count = rec.count.saturating_sub(1);
                rec.bytes = rec.bytes.saturating_sub(body.data.len() as u64);
                rec.removed_through = rec.removed_through.max(id.0);
                batch.remove(&k);
                batch.remove(&record::index_key(rec.topic_id, id));
                delta.insert(body.topic, rec);
                removed += 1;
            }
        }
        for (t, r) in delta.iter_mut() {
            if r.count > 0 {
                // The new oldest retained id is the first index entry after the removed ones.
                let start = record::index_key(r.topic_id, EventId(through + 1));
                let end = record::index_key(r.topic_id, EventId(u64::MAX));
                if let Some(item) = tree.range(start..=end).keys().next() {
                    let k = item.map_err(storage)?;
                    r.first_id = record::event_id_of_index_key(&k)
                        .map_err(|e| LogError::Corrupt(e.0))?
                        .0;
                }
            }
            batch.insert(record::topic_key(t.as_str()), record::encode_topic(r));
        }
        tree.apply_batch(batch).map_err(storage)?;
        self.db.flush().map_err(storage)?;
        self.publish(delta, Vec::new());
        Ok(removed)
    }
}
