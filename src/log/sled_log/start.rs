//! The two starts that do not begin at a cursor: the newest retained event of each matching
//! topic (`start=latest`, `/v1/latest`), and the first event at or after a time
//! (`start_time`). Both cost what they return plus the matching topics (or a binary search
//! over the chunks), never the size of the log.

use super::*;

/// The stored chunk holding `id` or, when `id` lies in no chunk, the last one before it:
/// `(first id, bytes)`.
fn chunk_at_or_before(tree: &sled::Tree, id: u64) -> Result<Option<(u64, IVec)>, LogError> {
    match tree
        .range(record::chunk_key(0)..=record::chunk_key(id))
        .next_back()
    {
        None => Ok(None),
        Some(item) => {
            let (k, v) = item.map_err(storage)?;
            Ok(Some((record::chunk_first_of_key(&k).map_err(corrupt)?, v)))
        }
    }
}

/// See [`EventLog::latest`].
pub(super) fn latest(
    shared: &Shared,
    patterns: &PatternSet,
    at_most: EventId,
    limit: usize,
) -> Result<Latest, LogError> {
    // The registry is updated before the head moves: every topic's record covers every id
    // up to the head read here.
    let at_most = at_most.0.min(shared.head.load(Ordering::Acquire));
    let mut truncated = false;
    let mut ids = Vec::new();
    {
        let reg = shared.registry.read().map_err(|_| LogError::Closed)?;
        for (_, r) in matching_records(&reg, patterns) {
            if r.count == 0 || r.last_id <= r.removed_through || r.last_id > at_most {
                continue;
            }
            if ids.len() == limit {
                truncated = true;
                break;
            }
            ids.push(r.last_id);
        }
    }
    ids.sort_unstable();
    let mut events = Vec::with_capacity(ids.len());
    for id in ids {
        // Retention may have removed the chunk since the registry was read: then the topic
        // retains nothing any more, and has no latest event.
        let Some((first, bytes)) = chunk_at_or_before(&shared.tree, id)? else {
            continue;
        };
        let chunk = Chunk::parse(&bytes).map_err(corrupt)?;
        let i = id - first;
        if i >= chunk.len() as u64 {
            continue;
        }
        let (time, body) = chunk.event(i as usize).map_err(corrupt)?;
        events.push(Arc::new(Event::new(EventId(id), time, body)));
    }
    Ok(Latest {
        events,
        cursor: EventId(at_most),
        truncated,
    })
}

/// The time of the newest stored event with an id at most `id` (`None` when there is none).
fn time_at_or_before(
    tree: &sled::Tree,
    id: u64,
    probes: &mut u32,
) -> Result<Option<u64>, LogError> {
    *probes += 1;
    let Some((first, bytes)) = chunk_at_or_before(tree, id)? else {
        return Ok(None);
    };
    let chunk = Chunk::parse(&bytes).map_err(corrupt)?;
    let i = usize::try_from(id - first)
        .unwrap_or(usize::MAX)
        .min(chunk.len() - 1);
    let rec = chunk.record(i).map_err(corrupt)?;
    Ok(Some(record::peek_event(rec).map_err(corrupt)?.time))
}

/// See [`EventLog::time_start`]. Returns the start and the number of chunk lookups it took.
pub(super) fn time_start(
    shared: &Shared,
    patterns: &PatternSet,
    time_ms: u64,
) -> Result<(TimeStart, u32), LogError> {
    let head = shared.head.load(Ordering::Acquire);
    let tree = &shared.tree;
    let mut probes = 0;
    let oldest = match tree
        .range(record::chunk_key(0)..=record::chunk_key(head))
        .next()
    {
        None => {
            return Ok((
                TimeStart {
                    cursor: EventId(head),
                    gap: None,
                },
                probes,
            ))
        }
        Some(item) => {
            let (k, _) = item.map_err(storage)?;
            record::chunk_first_of_key(&k).map_err(corrupt)?
        }
    };
    let oldest_time = time_at_or_before(tree, oldest, &mut probes)?.unwrap_or(0);
    if oldest_time >= time_ms {
        // Before everything stored: what retention removed of the matching topics may have
        // been at or after the start; the gap says so (delivery resumes after it, as a read
        // from a cursor behind retention does).
        let removed = {
            let reg = shared.registry.read().map_err(|_| LogError::Closed)?;
            matching_records(&reg, patterns)
                .values()
                .map(|r| r.removed_through)
                .max()
                .unwrap_or(0)
        };
        let cursor = oldest.saturating_sub(1);
        let start = if removed > 0 {
            TimeStart {
                cursor: EventId(cursor.max(removed)),
                gap: Some(Gap {
                    requested: 0,
                    oldest: removed + 1,
                }),
            }
        } else {
            TimeStart {
                cursor: EventId(cursor),
                gap: None,
            }
        };
        return Ok((start, probes));
    }
    // time(lo) < T ≤ time(hi), hi = head + 1 standing for "after everything". Times are
    // non-decreasing in id order, so the first id at or after T is the smallest such hi.
    let (mut lo, mut hi) = (oldest, head.saturating_add(1));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match time_at_or_before(tree, mid, &mut probes)? {
            Some(t) if t >= time_ms => hi = mid,
            _ => lo = mid,
        }
    }
    Ok((
        TimeStart {
            cursor: EventId(hi - 1),
            gap: None,
        },
        probes,
    ))
}
