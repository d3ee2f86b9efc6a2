//! Idempotent publish, against the real sled log: what is remembered, for how long, across
//! reopening, and what a repeat is answered with.

use super::*;
use crate::envelope::Data;

fn open_with(dir: &std::path::Path, dedupe: DedupeOptions) -> Arc<SledLog> {
    let opts = LogOptions {
        dedupe,
        ..super::tests::opts(dir)
    };
    SledLog::open(&opts, Hub::new(16), Metrics::new()).expect("open")
}

fn open(dir: &std::path::Path) -> Arc<SledLog> {
    open_with(dir, DedupeOptions::default())
}

fn ev(topic: &str, msg_id: Option<&str>, n: u64) -> NewEvent {
    NewEvent {
        topic: Topic::parse(topic).unwrap(),
        event_type: None,
        msg_id: msg_id.map(Into::into),
        data: Data::Json(n.to_string().into()),
    }
}

/// Every stored event as (id, topic, data).
pub(super) async fn stored(log: &SledLog) -> Vec<(u64, String, String)> {
    let page = log
        .read(
            PatternSet::new(vec![Pattern::parse("**").unwrap()]).unwrap(),
            EventId(0),
            1_000_000,
        )
        .await
        .expect("read");
    page.events
        .iter()
        .map(|e| {
            let Data::Json(d) = &e.body.data else {
                panic!("json data")
            };
            (e.id.0, e.body.topic.as_str().to_string(), d.to_string())
        })
        .collect()
}

fn dedupe_keys(log: &SledLog) -> usize {
    log.shared.tree.scan_prefix([record::DEDUPE_PREFIX]).count()
}

fn ids(v: &[u64]) -> Vec<EventId> {
    v.iter().copied().map(EventId).collect()
}

#[tokio::test]
async fn a_repeated_msg_id_is_not_stored_again_and_names_the_original_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let first = log.append(vec![ev("a", Some("m1"), 1)]).await.unwrap();
    assert_eq!((first.first.0, first.count), (1, 1));
    assert!(first.duplicate_of.is_empty());

    let again = log.append(vec![ev("a", Some("m1"), 2)]).await.unwrap();
    assert_eq!(again.count, 0);
    assert_eq!(again.duplicate_of, ids(&[1]));
    assert_eq!((again.first.0, again.last.0), (1, 1));

    // The same msg_id on another topic, and events without one, are new.
    let other = log
        .append(vec![
            ev("b", Some("m1"), 3),
            ev("a", None, 4),
            ev("a", None, 5),
        ])
        .await
        .unwrap();
    assert_eq!((other.first.0, other.last.0, other.count), (2, 4, 3));
    assert_eq!(
        stored(&log).await,
        [
            (1, "a".into(), "1".into()),
            (2, "b".into(), "3".into()),
            (3, "a".into(), "4".into()),
            (4, "a".into(), "5".into()),
        ]
    );
    assert_eq!(log.head().0, 4, "a repeat takes no id");
}

#[tokio::test]
async fn repeats_inside_one_batch_and_a_partly_repeated_batch_store_the_rest_contiguously() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let one = log
        .append(vec![
            ev("a", Some("x"), 1),
            ev("a", Some("x"), 2),
            ev("a", Some("y"), 3),
        ])
        .await
        .unwrap();
    assert_eq!((one.first.0, one.last.0, one.count), (1, 2, 2));
    assert_eq!(one.duplicate_of, ids(&[1]));

    let mixed = log
        .append(vec![
            ev("a", Some("new-1"), 4),
            ev("a", Some("y"), 5),
            ev("a", Some("new-2"), 6),
            ev("a", Some("x"), 7),
        ])
        .await
        .unwrap();
    assert_eq!((mixed.first.0, mixed.last.0, mixed.count), (3, 4, 2));
    assert_eq!(mixed.duplicate_of, ids(&[2, 1]));
    let data: Vec<String> = stored(&log).await.into_iter().map(|e| e.2).collect();
    assert_eq!(data, ["1", "3", "4", "6"]);
}

#[tokio::test]
async fn concurrent_publishes_of_one_msg_id_store_it_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // Many appends of the same msg_id race into the writer's queue: they land in the same
    // or in successive group commits, and exactly one is stored.
    let mut tasks = Vec::new();
    for n in 0..64u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(vec![ev("race", Some("only-once"), n)]).await
        }));
    }
    let mut originals = Vec::new();
    let mut stored_by = 0;
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        stored_by += a.count;
        originals.push(a.first.0);
    }
    assert_eq!(stored_by, 1);
    assert!(originals.iter().all(|&id| id == originals[0]));
    assert_eq!(stored(&log).await.len(), 1);
}

#[tokio::test]
async fn the_dedupe_memory_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(vec![ev("a", Some("m"), 1), ev("a", None, 2)])
        .await
        .unwrap();
    log.close().await.unwrap();
    drop(log);
    let log = open(dir.path());
    let again = log.append(vec![ev("a", Some("m"), 3)]).await.unwrap();
    assert_eq!(again.duplicate_of, ids(&[1]));
    assert_eq!(stored(&log).await.len(), 2);
}

#[tokio::test]
async fn after_the_window_a_msg_id_is_stored_again_and_its_old_entry_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        DedupeOptions {
            window: Duration::from_secs(3),
            max_ids: 1000,
        },
    );
    let first = log.append(vec![ev("a", Some("m"), 1)]).await.unwrap();
    let others: Vec<NewEvent> = (0..50)
        .map(|n| ev("a", Some(&format!("o{n}")), n))
        .collect();
    log.append(others).await.unwrap();
    assert_eq!(dedupe_keys(&log), 51);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // Expired but not yet swept, or swept: either way the msg_id is new again.
    let later = log.append(vec![ev("a", Some("m"), 2)]).await.unwrap();
    assert_eq!(later.count, 1);
    assert!(later.first.0 > first.first.0);
    // The sweeper runs every second: the 50 others go, and the renewed entry stays although
    // the expired bucket of its first commit still names its key.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dedupe_keys(&log) > 1 {
        assert!(
            Instant::now() < deadline,
            "expired entries were never swept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still inside the renewed entry's window (about a second has passed of three).
    let repeat = log.append(vec![ev("a", Some("m"), 3)]).await.unwrap();
    assert_eq!(repeat.duplicate_of, vec![later.first]);
}

#[tokio::test]
async fn beyond_the_maximum_the_oldest_msg_ids_are_forgotten_first() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_with(
        dir.path(),
        DedupeOptions {
            window: Duration::from_secs(3600),
            max_ids: 100,
        },
    );
    // Separate commits, so the entries have distinct (increasing) commit times.
    for n in 0..300u64 {
        log.append(vec![ev("a", Some(&format!("m{n}")), n)])
            .await
            .unwrap();
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while dedupe_keys(&log) > 102 {
        assert!(Instant::now() < deadline, "the maximum was never enforced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The newest are still recognised; the oldest were forgotten.
    let newest = log.append(vec![ev("a", Some("m299"), 0)]).await.unwrap();
    assert_eq!(newest.count, 0);
    let oldest = log.append(vec![ev("a", Some("m0"), 0)]).await.unwrap();
    assert_eq!(oldest.count, 1);
}

fn open_policy(dir: &std::path::Path, fsync: FsyncPolicy) -> Arc<SledLog> {
    let opts = LogOptions {
        fsync,
        ..super::tests::opts(dir)
    };
    SledLog::open(&opts, Hub::new(16), Metrics::new()).expect("open")
}

#[tokio::test]
async fn under_an_interval_policy_an_acknowledged_event_is_visible_only_after_its_flush() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_policy(dir.path(), FsyncPolicy::Interval(Duration::from_secs(2)));
    let a = log.append(vec![ev("a", None, 1)]).await.unwrap();
    assert_eq!(a.first.0, 1);
    // Acknowledged within the first interval: written, not yet flushed, so not visible.
    assert_eq!(log.head().0, 0, "visible before its flush");
    assert!(stored(&log).await.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.head().0 < 1 {
        assert!(Instant::now() < deadline, "never flushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored(&log).await, [(1, "a".into(), "1".into())]);
    // Topic records built while unflushed continue correctly.
    log.append(vec![ev("a", None, 2)]).await.unwrap();
    log.close().await.unwrap();
    assert_eq!(log.topic_now(&Topic::parse("a").unwrap()).unwrap().count, 2);
}

#[tokio::test]
async fn under_the_never_policy_events_are_visible_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_policy(dir.path(), FsyncPolicy::Never);
    let a = log.append(vec![ev("a", None, 1)]).await.unwrap();
    assert_eq!(log.head(), a.last);
    assert_eq!(stored(&log).await.len(), 1);
}

#[tokio::test]
async fn a_clean_restart_under_an_early_ack_policy_continues_ids_without_a_jump() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let log = open_policy(dir.path(), FsyncPolicy::Interval(Duration::from_millis(20)));
        let a = log.append(vec![ev("a", None, round)]).await.unwrap();
        assert_eq!(a.first.0, round + 1, "round {round}");
        log.close().await.unwrap();
    }
    // Back to `always`: ids continue too.
    let log = open_policy(dir.path(), FsyncPolicy::Always);
    assert_eq!(log.append(vec![ev("a", None, 9)]).await.unwrap().first.0, 4);
}
