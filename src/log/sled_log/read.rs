//! The read path: a pattern set's events after a cursor, merged from the per-topic index
//! (or walked from the log when too many topics match), costing what it returns.

use super::*;

/// The topics matching `patterns`, each once, in name order, with their records.
pub(super) fn matching_records<'r>(
    reg: &'r BTreeMap<Topic, TopicRecord>,
    patterns: &PatternSet,
) -> BTreeMap<&'r Topic, &'r TopicRecord> {
    let mut out = BTreeMap::new();
    for p in patterns.patterns() {
        if let Some(t) = p.as_topic() {
            if let Some((t, r)) = reg.get_key_value(&t) {
                out.insert(t, r);
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
                out.insert(t, r);
            }
        }
    }
    out
}

/// The topics a pattern set matches: (topic id, newest id, removed-through), deduplicated, in
/// topic id order.
pub(super) fn matching_topics(
    reg: &BTreeMap<Topic, TopicRecord>,
    patterns: &PatternSet,
) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = matching_records(reg, patterns)
        .values()
        .map(|r| (r.topic_id, r.last_id, r.removed_through))
        .collect();
    out.sort_unstable();
    out
}

/// What one read touched, so tests can check that a read costs what it returns.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ReadCost {
    /// Chunks fetched.
    pub(super) chunks: u64,
    /// Index entries decoded.
    pub(super) index_entries: u64,
}

pub(super) fn read_page(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
) -> Result<Page, LogError> {
    read_page_costed(shared, patterns, after, limit, &mut ReadCost::default())
}

/// Why one attempt at a read did not produce a page.
pub(super) enum ReadFail {
    /// The log failed.
    Log(LogError),
    /// A chunk named by an index entry was deleted by retention after the read looked at
    /// the registry: the read starts again from the current state (which says so with a gap).
    ChunkGone(u64),
}

impl From<LogError> for ReadFail {
    fn from(e: LogError) -> Self {
        ReadFail::Log(e)
    }
}

/// Attempts a read makes when retention keeps deleting chunks under it.
const READ_ATTEMPTS: usize = 5;

pub(super) fn read_page_costed(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
    cost: &mut ReadCost,
) -> Result<Page, LogError> {
    let mut gone = 0;
    for _ in 0..READ_ATTEMPTS {
        match read_once(shared, patterns, after, limit, cost) {
            Ok(page) => return Ok(page),
            Err(ReadFail::Log(e)) => return Err(e),
            Err(ReadFail::ChunkGone(first)) => {
                gone = first;
                // Retention publishes its new topic records right after deleting: give the
                // writer a moment to finish.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    Err(LogError::Corrupt(format!(
        "an index entry names the missing chunk {gone}"
    )))
}

pub(super) fn read_once(
    shared: &Shared,
    patterns: &PatternSet,
    after: EventId,
    limit: usize,
    cost: &mut ReadCost,
) -> Result<Page, ReadFail> {
    let head = shared.head.load(Ordering::Acquire);
    let limit = limit.max(1);
    let topics = {
        let reg = shared.registry.read().map_err(|_| LogError::Closed)?;
        matching_topics(&reg, patterns)
    };
    let mut after = after.0;
    let mut gap = None;
    // Retention removes each topic's oldest events. When a matching topic lost events after
    // the cursor, the stream is complete again only after the last of them: the gap says so,
    // and delivery continues from there (retained events of other topics below that point
    // are inside the gap: order and the gap's meaning hold over skipping them silently).
    // Cursor 0 asks for "the oldest retained event": it has lost nothing it asked for, and
    // gets every retained event.
    let removed = topics.iter().map(|t| t.2).max().unwrap_or(0);
    if removed > after && after > 0 {
        gap = Some(Gap {
            requested: after,
            oldest: removed + 1,
        });
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
                ))
                .into());
            }
            last = id;
            page.events.push(chunks.event(first, id, cost)?);
            if let Some((id, first)) = cursors[i].next(after, head, cost)? {
                heap.push(Reverse((id, first, i)));
            }
        }
    } else {
        // Many topics: walk the chunks from the one holding `after + 1`, which costs what
        // lies after the cursor. A chunk can still hold events its topic's retention removed
        // (it is reclaimed once all of its events are): those are skipped.
        let removed_through: HashMap<String, u64> = {
            let reg = shared.registry.read().map_err(|_| LogError::Closed)?;
            reg.iter()
                .filter(|(_, r)| r.removed_through > after)
                .map(|(t, r)| (t.as_str().to_string(), r.removed_through))
                .collect()
        };
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
                if !patterns.patterns().iter().any(|p| p.matches_str(topic))
                    || removed_through.get(topic).is_some_and(|&r| id <= r)
                {
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
pub(super) fn last_key_at_most(
    tree: &sled::Tree,
    floor: &[u8],
    probe: &[u8],
) -> Result<IVec, LogError> {
    match tree.range(floor..=probe).keys().next_back() {
        Some(k) => k.map_err(storage),
        None => Ok(IVec::from(probe)),
    }
}

/// One topic's ids after a cursor, read from its index entries in order.
pub(super) struct TopicCursor {
    entries: sled::Iter,
    chunk_first: u64,
    offsets: Vec<u32>,
    pos: usize,
    done: bool,
}

impl TopicCursor {
    /// Positions at the index entry of the chunk that may hold `after + 1` (the last entry of
    /// the topic starting at or before it), bounded by the chunks starting up to `head`.
    pub(super) fn open(
        tree: &sled::Tree,
        tid: u64,
        after: u64,
        head: u64,
    ) -> Result<Self, LogError> {
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
    pub(super) fn next(
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
pub(super) struct ChunkCache<'t> {
    tree: &'t sled::Tree,
    current: Option<(u64, IVec)>,
}

impl<'t> ChunkCache<'t> {
    pub(super) fn new(tree: &'t sled::Tree) -> Self {
        ChunkCache {
            tree,
            current: None,
        }
    }

    /// Event `id` of the chunk starting at `first`.
    pub(super) fn event(
        &mut self,
        first: u64,
        id: u64,
        cost: &mut ReadCost,
    ) -> Result<SharedEvent, ReadFail> {
        let bytes = match &self.current {
            Some((f, b)) if *f == first => b,
            _ => {
                let Some(b) = self.tree.get(record::chunk_key(first)).map_err(storage)? else {
                    return Err(ReadFail::ChunkGone(first));
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
