//! The latest-per-topic and time starts of the sled log, against what was appended.

use super::tests::opts;
use super::*;
use crate::envelope::Data;

fn pats(ps: &[&str]) -> PatternSet {
    PatternSet::new(ps.iter().map(|p| Pattern::parse(p).unwrap()).collect()).unwrap()
}

fn ev(topic: &str, n: u64) -> NewEvent {
    NewEvent {
        topic: Topic::parse(topic).unwrap(),
        event_type: None,
        msg_id: None,
        data: Data::Json(n.to_string().into()),
    }
}

fn open(dir: &std::path::Path, clock: &Clock) -> Arc<SledLog> {
    SledLog::open_with_clock(&opts(dir), Hub::new(16), Metrics::new(), clock.clone()).expect("open")
}

#[tokio::test]
async fn latest_gives_each_matching_topics_newest_event_in_id_order() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path(), &Clock::system());
    for (i, t) in ["s/a", "s/b", "s/a", "other", "s/c", "s/b"]
        .iter()
        .enumerate()
    {
        log.append(vec![ev(t, i as u64)]).await.unwrap();
    }
    let l = log.latest(pats(&["s/*"]), log.head(), 100).await.unwrap();
    let ids: Vec<u64> = l.events.iter().map(|e| e.id.0).collect();
    assert_eq!(ids, vec![3, 5, 6], "s/a@3, s/c@5, s/b@6");
    assert_eq!(l.cursor, EventId(6));
    assert!(!l.truncated);
    // A topic whose newest event is after `at_most` is left out: reading on delivers it.
    let l = log.latest(pats(&["s/*"]), EventId(4), 100).await.unwrap();
    let ids: Vec<u64> = l.events.iter().map(|e| e.id.0).collect();
    assert_eq!(ids, vec![3]);
    let l = log.latest(pats(&["s/*"]), log.head(), 2).await.unwrap();
    assert!(l.truncated);
    assert_eq!(l.events.len(), 2, "the first two topics by name: s/a, s/b");
    log.close().await.unwrap();
}

#[tokio::test]
async fn time_is_non_decreasing_when_the_clock_steps_back_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let log = open(tmp.path(), &clock);
    log.append(vec![ev("t", 1)]).await.unwrap();
    clock.step(-3_600_000);
    log.append(vec![ev("t", 2)]).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    let log = open(tmp.path(), &clock);
    log.append(vec![ev("t", 3)]).await.unwrap();
    let page = log.read(pats(&["t"]), EventId(0), 10).await.unwrap();
    let times: Vec<u64> = page.events.iter().map(|e| e.time).collect();
    assert_eq!(times.len(), 3);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    log.close().await.unwrap();
}

#[tokio::test]
async fn a_time_start_is_the_first_event_at_or_after_the_time_in_few_lookups() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    clock.step(-10_000_000);
    let log = open(tmp.path(), &clock);
    let base = clock.now_ms();
    // 200 commits, one minute apart on the stepped clock.
    for i in 0..200u64 {
        log.append(vec![ev(if i % 2 == 0 { "a" } else { "b" }, i)])
            .await
            .unwrap();
        clock.step(60_000);
    }
    let page = log.read(pats(&["**"]), EventId(0), 1000).await.unwrap();
    for probe in [0u64, 1, 57, 199] {
        let t = page.events[probe as usize].time;
        let (start, lookups) = start::time_start(&log.shared, &pats(&["**"]), t).unwrap();
        assert_eq!(start.cursor, EventId(probe), "time of event {}", probe + 1);
        assert!(lookups <= 12, "{lookups} lookups for 200 events");
    }
    let (start, _) = start::time_start(&log.shared, &pats(&["**"]), base - 1).unwrap();
    assert_eq!(
        start,
        TimeStart {
            cursor: EventId(0),
            gap: None
        }
    );
    let (start, _) = start::time_start(&log.shared, &pats(&["**"]), u64::MAX).unwrap();
    assert_eq!(
        start.cursor,
        log.head(),
        "after everything: live from the head"
    );
    log.close().await.unwrap();
}
