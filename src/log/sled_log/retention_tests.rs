//! Retention against the real sled log: per-topic limits keep the newest, the global budget
//! removes the oldest prefix, dead chunks are reclaimed, statistics stay exact, a cursor
//! behind what went gets the gap, and readers racing a pass never fail.

use super::*;
use crate::envelope::Data;
use crate::log::retention::{Limits, RetentionPolicy, RuleConfig};

fn open_with(dir: &std::path::Path, retention: RetentionPolicy) -> Arc<SledLog> {
    let opts = LogOptions {
        retention,
        ..super::tests::opts(dir)
    };
    SledLog::open(&opts, Hub::new(16), Metrics::new()).expect("open")
}

fn policy(rules: &[(&str, Limits)], default: Limits, max_total_bytes: u64) -> RetentionPolicy {
    let rules: Vec<RuleConfig> = rules
        .iter()
        .map(|(p, l)| RuleConfig {
            pattern: (*p).into(),
            limits: *l,
        })
        .collect();
    // A long period: the tests run passes themselves with `compact_now`.
    RetentionPolicy::new(&rules, default, max_total_bytes, Duration::from_secs(3600)).unwrap()
}

fn events(limit: u64) -> Limits {
    Limits {
        max_events: limit,
        ..Limits::default()
    }
}

fn ev(topic: &str, n: u64) -> NewEvent {
    NewEvent {
        topic: Topic::parse(topic).unwrap(),
        event_type: None,
        msg_id: None,
        data: Data::Json(format!("\"{n:08}\"").into()),
    }
}

fn pats(ps: &[&str]) -> PatternSet {
    PatternSet::new(ps.iter().map(|p| Pattern::parse(p).unwrap()).collect()).unwrap()
}

/// (gap, ids) of everything matching after `after`.
async fn read(log: &SledLog, ps: &[&str], after: u64) -> (Option<Gap>, Vec<u64>) {
    let page = log.read(pats(ps), EventId(after), 1_000_000).await.unwrap();
    (page.gap, page.events.iter().map(|e| e.id.0).collect())
}

/// Appends `n` events round-robin over `topics`, one commit each; returns their ids by topic.
async fn fill(log: &SledLog, topics: &[&str], n: u64) -> HashMap<String, Vec<u64>> {
    let mut ids: HashMap<String, Vec<u64>> = HashMap::new();
    for k in 0..n {
        let t = topics[(k as usize) % topics.len()];
        let a = log.append(vec![ev(t, k)]).await.unwrap();
        ids.entry(t.to_string()).or_default().push(a.first.0);
    }
    ids
}

fn stats(log: &SledLog, topic: &str) -> TopicStats {
    log.topic_now(&Topic::parse(topic).unwrap()).unwrap()
}

fn chunk_count(log: &SledLog) -> usize {
    log.shared.tree.scan_prefix([record::CHUNK_PREFIX]).count()
}

#[tokio::test]
async fn a_topic_over_its_event_limit_keeps_its_newest_and_a_cursor_behind_gets_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        policy(&[("busy/**", events(10))], Limits::default(), 0),
    );
    let ids = fill(&log, &["busy/a", "busy/a", "busy/a", "calm/b"], 200).await;
    let busy = &ids["busy/a"];
    let calm = &ids["calm/b"];
    let done = log.compact_now().await.unwrap();
    assert_eq!(done.trimmed, busy.len() as u64 - 10);

    let kept = &busy[busy.len() - 10..];
    let s = stats(&log, "busy/a");
    assert_eq!(
        (s.count, s.first_id, s.last_id),
        (10, Some(kept[0]), kept[9])
    );
    let bytes: u64 = 10 * 10; // each payload is a 10-byte JSON string
    assert_eq!(s.bytes, Some(bytes));
    assert_eq!(
        stats(&log, "calm/b").count,
        calm.len() as u64,
        "no rule: untouched"
    );

    // Cursor 0: the oldest retained, no gap. A cursor behind what went: a gap, then the rest.
    assert_eq!(read(&log, &["busy/a"], 0).await, (None, kept.to_vec()));
    let removed = busy[busy.len() - 11];
    assert_eq!(
        read(&log, &["busy/a"], busy[3]).await,
        (
            Some(Gap {
                requested: busy[3],
                oldest: removed + 1
            }),
            kept.to_vec()
        )
    );
    assert_eq!(read(&log, &["busy/a"], removed).await.0, None);
    // The calm topic alone still replays all of its history.
    assert_eq!(read(&log, &["calm/b"], 0).await, (None, calm.clone()));

    // A second pass has nothing more to do; the state survives reopening.
    assert_eq!(log.compact_now().await.unwrap().trimmed, 0);
    log.close().await.unwrap();
    drop(log);
    let log = open_with(
        dir.path(),
        policy(&[("busy/**", events(10))], Limits::default(), 0),
    );
    assert_eq!(stats(&log, "busy/a").count, 10);
    assert_eq!(read(&log, &["busy/a"], 0).await.1, kept.to_vec());
}

#[tokio::test]
async fn events_past_the_age_limit_go_and_their_chunks_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let age = Limits {
        max_age_secs: 1,
        ..Limits::default()
    };
    let log = open_with(dir.path(), policy(&[], age, 0));
    fill(&log, &["a", "b"], 40).await;
    let chunks_before = chunk_count(&log);
    assert_eq!(chunks_before, 40, "one chunk per commit");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = fill(&log, &["a"], 3).await;
    let done = log.compact_now().await.unwrap();
    assert_eq!(done.trimmed, 40);
    assert_eq!(
        done.chunks_reclaimed, 40,
        "every old chunk held only removed events"
    );
    assert_eq!(chunk_count(&log), 3);
    assert_eq!(read(&log, &["**"], 0).await.1, fresh["a"]);
    let b = stats(&log, "b");
    assert_eq!((b.count, b.first_id, b.bytes), (0, None, Some(0)));
}

#[tokio::test]
async fn a_chunk_with_one_retained_event_stays_until_that_event_goes() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        policy(&[("noisy", events(1))], Limits::default(), 0),
    );
    // One commit holding both topics: the chunk is shared.
    log.append(vec![ev("noisy", 1), ev("keep", 2), ev("noisy", 3)])
        .await
        .unwrap();
    fill(&log, &["noisy"], 5).await;
    let done = log.compact_now().await.unwrap();
    assert_eq!(done.trimmed, 6);
    // Chunks of 4..=7 go; the shared chunk is pinned by `keep`, the last holds noisy's newest.
    assert_eq!(done.chunks_reclaimed, 4);
    assert_eq!(chunk_count(&log), 2);
    assert_eq!(read(&log, &["keep"], 0).await.1, [2]);
    assert_eq!(read(&log, &["**"], 0).await.1, [2, 8]);
}

#[tokio::test]
async fn the_global_budget_removes_the_oldest_prefix_of_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    // Payloads of 10 bytes: a budget of 100 keeps the newest 10 events, whatever the topic.
    let log = open_with(dir.path(), policy(&[], Limits::default(), 100));
    fill(&log, &["a", "b", "c"], 30).await;
    let done = log.compact_now().await.unwrap();
    assert_eq!(done.over_budget, 20);
    let total: u64 = log
        .topics_now(None, 100)
        .iter()
        .map(|t| t.bytes.unwrap_or(0))
        .sum();
    assert_eq!(total, 100);
    assert_eq!(
        read(&log, &["**"], 0).await.1,
        (21..=30).collect::<Vec<_>>()
    );
    let (gap, _) = read(&log, &["a"], 1).await;
    assert!(gap.is_some(), "a cursor behind the budget's cut gets a gap");
}

#[tokio::test]
async fn a_prefix_removal_after_a_topic_trim_counts_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        policy(&[("t", events(2))], Limits::default(), 0),
    );
    // Shared chunks: each commit holds t and u events.
    for k in 0..5 {
        log.append(vec![ev("t", k), ev("u", k)]).await.unwrap();
    }
    log.compact_now().await.unwrap();
    assert_eq!(stats(&log, "t").count, 2);
    // Remove ids ..=7: t lost 1,3,5 already (counted then), 7 now; u loses 2,4,6.
    let removed = log.remove_through(EventId(7)).await.unwrap();
    assert_eq!(removed, 4);
    let t = stats(&log, "t");
    assert_eq!((t.count, t.first_id, t.bytes), (1, Some(9), Some(10)));
    let u = stats(&log, "u");
    assert_eq!((u.count, u.first_id, u.bytes), (2, Some(8), Some(20)));
    assert_eq!(read(&log, &["**"], 0).await.1, [8, 9, 10]);
    // The straddling chunk was rewritten without re-indexing what t had already lost.
    assert_eq!(read(&log, &["t"], 0).await.1, [9]);
}

#[tokio::test]
async fn readers_racing_retention_passes_never_fail_and_never_go_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        policy(&[("r/**", events(50))], Limits::default(), 0),
    );
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for round in 0..40u64 {
                let batch = (0..20).map(|k| ev(&format!("r/{}", k % 3), round * 20 + k));
                log.append(batch.collect()).await.unwrap();
                log.compact_now().await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        for after in [0, 10, 300, 700] {
            let (gap, ids) = read(&log, &["r/**"], after).await;
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
            if let (Some(g), Some(&first)) = (gap, ids.first()) {
                assert!(
                    first >= g.oldest,
                    "delivered {first} below the gap's oldest"
                );
            }
            assert!(ids.iter().all(|&id| id > after));
            reads += 1;
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert!(reads > 0);
    for t in ["r/0", "r/1", "r/2"] {
        assert_eq!(stats(&log, t).count, 50);
    }
}

#[tokio::test]
async fn a_read_walking_many_topics_from_cursor_zero_skips_what_retention_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        policy(&[("m/0", events(1))], Limits::default(), 0),
    );
    // More topics than a read merges by index: it walks the chunks, which still hold m/0's
    // removed events (each chunk is pinned by the other topics' retained ones).
    for round in 0..3u64 {
        let batch = (0..=MAX_MERGED_TOPICS as u64).map(|k| ev(&format!("m/{k}"), round));
        log.append(batch.collect()).await.unwrap();
    }
    assert_eq!(log.compact_now().await.unwrap().trimmed, 2);
    let per_round = MAX_MERGED_TOPICS as u64 + 1;
    let (gap, ids) = read(&log, &["m/*"], 0).await;
    assert_eq!(gap, None);
    assert_eq!(ids.len() as u64, 3 * per_round - 2);
    assert!(
        !ids.contains(&1) && !ids.contains(&(per_round + 1)),
        "removed events returned"
    );
    assert_eq!(read(&log, &["m/0"], 0).await.1, [2 * per_round + 1]);
}
