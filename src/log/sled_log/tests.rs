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

/// Test options: a log in `dir/data`, default policies, nothing ever removed.
pub(super) fn opts(dir: &std::path::Path) -> LogOptions {
    LogOptions {
        dir: dir.join("data"),
        cache_bytes: 16 << 20,
        dedupe: Default::default(),
        fsync: Default::default(),
        retention: crate::log::retention::RetentionPolicy::keep_everything(),
        space: Default::default(),
        checkpoint_every: std::time::Duration::from_millis(500),
        wal_segment_bytes: 32 << 20,
    }
}

fn open(dir: &std::path::Path) -> Arc<SledLog> {
    SledLog::open(&opts(dir), Hub::new(16), Metrics::new()).expect("open")
}

fn open_caps(dir: &std::path::Path, caps: ChunkCaps) -> Arc<SledLog> {
    SledLog::open_with_caps(
        &opts(dir),
        Hub::new(16),
        Metrics::new(),
        caps,
        Clock::system(),
    )
    .expect("open")
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
    let expected: Vec<(u64, String)> = model.events.iter().map(|e| (e.0, e.1.clone())).collect();
    assert_eq!(
        from_index, expected,
        "the index names every retained event once"
    );
}

/// Checks every topic's statistics against the model.
fn check_stats(log: &SledLog, model: &Model) {
    for stats in log.topics_now(None, usize::MAX) {
        let mine: Vec<&(u64, String, String)> =
            model.events.iter().filter(|e| e.1 == stats.topic).collect();
        assert_eq!(stats.count, mine.len() as u64, "count of {}", stats.topic);
        assert_eq!(
            stats.bytes,
            Some(mine.iter().map(|e| e.2.len() as u64).sum::<u64>()),
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
        let page =
            read_page_costed(&log.shared, &quiet, EventId(after), 1000, &mut cost).expect("read");
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
        } else if id.is_multiple_of(2) {
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
    let c = log.topic_now(&Topic::parse("r/c").unwrap()).unwrap();
    assert_eq!(
        (c.count, c.first_id, c.last_id, c.bytes),
        (0, None, 13, Some(0))
    );
    let a = log.topic_now(&Topic::parse("r/a").unwrap()).unwrap();
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
async fn a_checkpoint_refuses_an_open_log_and_keeps_every_event_of_a_closed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let all = pats(&["**"]);
    for round in 0..3u64 {
        let log = open(tmp.path());
        assert_eq!(log.head().0, round * 3000);
        assert_eq!(
            read_all(&log, &model, &all, 0, 4096).await.1.len() as u64,
            round * 3000
        );
        append(&log, &mut model, &names("k", 3000, |i| i % 7), 5).await;
        // While the log is open its directory is locked: the checkpoint must not touch it.
        assert!(SledLog::checkpoint(&opts(tmp.path()).dir).is_err());
        let p = pats(&["k/3"]);
        assert_eq!(
            read_all(&log, &model, &p, 0, 4096).await.1,
            model.matching(&p, 0)
        );
        log.close().await.unwrap();
        drop(log);
        SledLog::checkpoint(&opts(tmp.path()).dir).expect("checkpoint of a closed log");
    }
    let log = open(tmp.path());
    check_layout(&log, &model, CHUNK_CAPS);
    check_stats(&log, &model);
    assert_eq!(
        read_all(&log, &model, &all, 0, 4096).await.1,
        model.matching(&all, 0)
    );
    assert_eq!(log.verify().expect("verify").problems, Vec::<String>::new());
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
async fn large_events_land_in_blob_files_that_are_synced_before_a_checkpoint_covers_them() {
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
    let p = pats(&["big/**"]);
    assert_eq!(
        read_all(&log, &model, &p, 0, 4096).await.1,
        model.matching(&p, 0)
    );
    // The acks waited for the WAL; the flush of sled that lets the WAL go (a background
    // checkpoint, or the one at close) must sync the blob files first.
    log.close().await.unwrap();
    let synced = metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("tidewire_log_blobs_synced_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("blob sync counter");
    assert!(
        synced > 0,
        "no blob file was fsynced before the WAL was let go"
    );
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

#[tokio::test]
async fn a_directory_holding_other_files_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"someone else's").unwrap();
    let err = SledLog::open(&opts(tmp.path()), Hub::new(4), Metrics::new())
        .err()
        .expect("refused");
    assert!(matches!(err, LogError::Open(_)), "{err:?}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "sled's files were written beside it");
}

#[tokio::test]
async fn a_log_sled_recovers_short_of_its_durable_mark_refuses_to_open() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path());
    let mut model = Model::default();
    for _ in 0..20 {
        append(&log, &mut model, &names("c", 4, |i| i % 2), 20).await;
    }
    log.close().await.unwrap();
    drop(log);
    let mark =
        std::fs::read_to_string(tmp.path().join("data").join(super::mark::MARK_FILE)).unwrap();
    assert!(mark.trim().ends_with(" 80"), "{mark}");
    // Damage sled's log file the way a bad disk would: sled then recovers only what precedes
    // the damage, and would open that as a complete log.
    let db = tmp.path().join("data").join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    for i in (200..bytes.len().min(4000)).step_by(7) {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = SledLog::open(&opts(tmp.path()), Hub::new(4), Metrics::new())
        .err()
        .expect("a damaged log must not open");
    assert!(matches!(err, LogError::Open(_)), "{err:?}");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[tokio::test]
async fn a_log_closed_and_reopened_at_once_many_times_keeps_every_event() {
    // The directory lock outlives the last handle by a moment (sled's background
    // threads): every reopen here comes right after a close.
    let tmp = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let all = pats(&["**"]);
    for round in 0..20u64 {
        let log = open(tmp.path());
        assert_eq!(log.head().0, round * 50, "round {round}");
        append(&log, &mut model, &names("z", 50, |i| i % 3), 40).await;
        log.close().await.unwrap();
        drop(log);
    }
    let log = open(tmp.path());
    check_stats(&log, &model);
    assert_eq!(
        read_all(&log, &model, &all, 0, 4096).await.1,
        model.matching(&all, 0)
    );
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_chasing_the_head_get_every_event_once_in_order_while_commits_land() {
    // Readers close behind the head read in place; far behind, through the blocking pool.
    // Both, while a writer commits: every matching event once, in order, with its own data.
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path());
    let topic_of = |id: u64| format!("c/{}", id % 3);
    const COMMITS: u64 = 600;
    let total: u64 = (0..COMMITS).map(|i| 1 + i % 7).sum();
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut next = 1u64;
            for i in 0..COMMITS {
                let n = 1 + i % 7;
                let events = (next..next + n)
                    .map(|id| NewEvent {
                        topic: Topic::parse(&topic_of(id)).unwrap(),
                        event_type: None,
                        msg_id: None,
                        data: Data::Json(payload(id, 8).into()),
                    })
                    .collect();
                let done = log.append(events).await.expect("append");
                assert_eq!(done.first.0, next);
                next += n;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut readers = Vec::new();
    for (r, (pattern, limit, start_after)) in [
        ("c/**", 5, 0u64),
        ("c/1", 3, 0),
        ("c/**", 1000, 0),
        ("c/2", 64, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let log = log.clone();
        readers.push(tokio::spawn(async move {
            // Two readers start late, far behind the head: their first pages go to the pool.
            if r % 2 == 1 {
                let until = Instant::now() + Duration::from_secs(60);
                while log.head().0 < 1000 {
                    assert!(Instant::now() < until, "the writer stalled");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let p = pats(&[pattern]);
            let mut cursor = EventId(start_after);
            let mut ids = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let page = log.read(p.clone(), cursor, limit).await.expect("read");
                assert!(page.gap.is_none());
                for e in &page.events {
                    assert_eq!(e.body.topic.as_str(), topic_of(e.id.0));
                    assert_eq!(e.body.data, Data::Json(payload(e.id.0, 8).into()));
                    ids.push(e.id.0);
                }
                cursor = page.through;
                if page.complete && cursor.0 == total {
                    return (pattern, ids);
                }
                assert!(Instant::now() < deadline, "reader {r} stuck at {cursor}");
                if page.complete {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    writer.await.unwrap();
    for reader in readers {
        let (pattern, ids) = reader.await.unwrap();
        let p = pats(&[pattern]);
        let want: Vec<u64> = (1..=total)
            .filter(|id| p.matches(&Topic::parse(&topic_of(*id)).unwrap()))
            .collect();
        assert_eq!(ids, want, "{pattern}");
    }
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_visible_when_acknowledged_and_reach_the_hub_once_in_order() {
    // Many concurrent appenders under `--fsync always`, so group commits take several at a
    // time, some retrying a msg_id: every ack finds its events visible (head, read, topic
    // stats), a retry names its original, and the hub receives every id exactly once, in
    // order, with its data.
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::new(1 << 16);
    let mut registration = hub.subscribe(&pats(&["p/**"]));
    let log = SledLog::open(&opts(tmp.path()), hub, Metrics::new()).expect("open");
    assert_eq!(
        opts(tmp.path()).fsync,
        FsyncPolicy::Always,
        "the default acks after a flush"
    );
    const TASKS: u64 = 16;
    const APPENDS: u64 = 120;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            // (id, topic, data) of every event this task stored.
            let mut mine: Vec<(u64, String, String)> = Vec::new();
            for i in 0..APPENDS {
                let n = 1 + (t + i) % 3;
                let topic = format!("p/{}", (t + i) % 5);
                let data = |k: u64| format!("[{t},{i},{k}]");
                let msg_id = (i % 10 == 0).then(|| format!("m-{t}-{i}"));
                let events = |msg_id: &Option<String>| -> Vec<NewEvent> {
                    (0..n)
                        .map(|k| NewEvent {
                            topic: Topic::parse(&topic).unwrap(),
                            event_type: None,
                            // Only single-event appends carry a msg_id, so a retry repeats one event.
                            msg_id: if n == 1 {
                                msg_id.as_deref().map(Into::into)
                            } else {
                                None
                            },
                            data: Data::Json(data(k).into()),
                        })
                        .collect()
                };
                let done = log.append(events(&msg_id)).await.expect("append");
                assert_eq!(done.count, n);
                assert_eq!(
                    done.last.0 - done.first.0 + 1,
                    n,
                    "ids of a batch are contiguous"
                );
                // Acknowledged means visible: the head covers it and a read returns it.
                assert!(log.head() >= done.last, "acked {} past the head", done.last);
                let page = log
                    .read(pats(&[&topic]), EventId(done.first.0 - 1), n as usize)
                    .await
                    .expect("read");
                let got: Vec<(u64, Data)> = page
                    .events
                    .iter()
                    .map(|e| (e.id.0, e.body.data.clone()))
                    .collect();
                let want: Vec<(u64, Data)> = (0..n)
                    .map(|k| (done.first.0 + k, Data::Json(data(k).into())))
                    .collect();
                assert_eq!(got, want, "an acknowledged batch reads back at once");
                let stats = log
                    .topic_now(&Topic::parse(&topic).unwrap())
                    .expect("stats");
                assert!(stats.last_id >= done.last.0, "topic stats cover the ack");
                for k in 0..n {
                    mine.push((done.first.0 + k, topic.clone(), data(k)));
                }
                if n == 1 && msg_id.is_some() {
                    let again = log.append(events(&msg_id)).await.expect("retry");
                    assert_eq!(again.count, 0, "a retry stores nothing");
                    assert_eq!(again.duplicate_of, vec![done.first]);
                }
            }
            mine
        }));
    }
    let mut stored: Vec<(u64, String, String)> = Vec::new();
    for t in tasks {
        stored.extend(t.await.unwrap());
    }
    stored.sort();
    let total = stored.len() as u64;
    assert_eq!(
        stored.iter().map(|e| e.0).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "ids are contiguous from 1, none reused"
    );
    let mut seen: Vec<(u64, String, String)> = Vec::new();
    while (seen.len() as u64) < total {
        let batch = tokio::time::timeout(Duration::from_secs(30), registration.live.recv())
            .await
            .expect("the hub delivers every committed event")
            .expect("no lag with a ring this size");
        for e in batch.iter() {
            let Data::Json(d) = &e.body.data else {
                panic!("event {} is not JSON", e.id)
            };
            seen.push((e.id.0, e.body.topic.as_str().to_string(), d.to_string()));
        }
    }
    assert_eq!(
        seen, stored,
        "the hub sees every id once, in order, with its data"
    );
    log.close().await.unwrap();
    drop(log);
    let log = open(tmp.path());
    assert_eq!(log.head().0, total, "all of it survives a reopen");
    log.close().await.unwrap();
}
