//! The write-ahead log against crash images: sled's files as its last flush left them, with
//! the WAL as it stood when the process died. Every acknowledged event must come back once.

use super::*;
use crate::envelope::Data;

/// Options with background checkpoints out of the way, so sled holds only what a test flushed.
fn opts(dir: &std::path::Path) -> LogOptions {
    LogOptions {
        checkpoint_every: Duration::from_secs(3600),
        wal_segment_bytes: 64 << 10,
        ..super::tests::opts(dir)
    }
}

fn open(dir: &std::path::Path) -> Result<Arc<SledLog>, LogError> {
    SledLog::open(&opts(dir), Hub::new(16), Metrics::new())
}

type Stored = Vec<(u64, String, String)>;

use super::dedupe_tests::stored;

/// One commit of three events with msg ids; returns them as stored.
async fn commit(log: &SledLog, round: usize, size: usize) -> Stored {
    let events: Vec<NewEvent> = (0..3)
        .map(|k| NewEvent {
            topic: Topic::parse(&format!("wal/t{}", (round + k) % 4)).unwrap(),
            event_type: None,
            msg_id: Some(format!("m-{round}-{k}").into()),
            data: Data::Json(format!("\"{round}-{k}-{}\"", "x".repeat(size)).into()),
        })
        .collect();
    let done = log.append(events.clone()).await.expect("append");
    assert_eq!(done.count, 3);
    events
        .into_iter()
        .enumerate()
        .map(|(k, e)| {
            let Data::Json(d) = &e.data else {
                unreachable!()
            };
            (
                done.first.0 + k as u64,
                e.topic.as_str().to_string(),
                d.to_string(),
            )
        })
        .collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path, skip: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == skip {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target, "");
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A crash image in `<root>/image/data`: `before` commits flushed into sled, then `after`
/// acknowledged commits that only the WAL holds. Returns every acknowledged event.
async fn crash_image(root: &std::path::Path, before: usize, after: usize, size: usize) -> Stored {
    let live = root.join("live");
    let log = open(&live).expect("open");
    let mut acked = Vec::new();
    for round in 0..before {
        acked.extend(commit(&log, round, size).await);
    }
    // sled's files as of this flush: what it recovers if nothing later reached its disk.
    log.db.flush().unwrap();
    copy_dir(&live.join("data"), &root.join("image/data"), wal::WAL_DIR);
    for round in before..before + after {
        acked.extend(commit(&log, round, size).await);
    }
    // The WAL as the process left it: every acknowledged record was fsynced.
    copy_dir(
        &live.join("data").join(wal::WAL_DIR),
        &root.join("image/data").join(wal::WAL_DIR),
        "",
    );
    log.close().await.unwrap();
    acked
}

fn segments(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data.join(wal::WAL_DIR))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wal"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn every_acknowledged_event_is_replayed_once_when_sled_lost_its_unflushed_writes() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough after the flush to span several (test-sized) segments.
    let acked = crash_image(tmp.path(), 5, 60, 1000).await;
    let image = tmp.path().join("image");
    assert!(segments(&image.join("data")).len() > 1, "several segments");

    let log = open(&image).expect("open the crash image");
    let r = log.recovery.clone();
    assert_eq!(r.replayed_records, 60, "{r:?}");
    assert_eq!(r.replayed_events, 180, "{r:?}");
    assert_eq!(r.torn_bytes, 0);
    assert_eq!(
        stored(&log).await,
        acked,
        "every acknowledged event, once, in order"
    );
    assert_eq!(log.head().0, acked.last().unwrap().0);
    assert!(
        log.verify().unwrap().healthy(),
        "topic statistics and index agree"
    );

    // The dedupe entries came back with the events: a retry is recognised.
    let retry = NewEvent {
        topic: Topic::parse(&acked[100].1).unwrap(),
        event_type: None,
        msg_id: Some("m-33-1".into()),
        data: Data::Json("\"retry\"".into()),
    };
    let done = log.append(vec![retry]).await.unwrap();
    assert_eq!(done.count, 0);
    assert_eq!(done.duplicate_of, vec![EventId(acked[100].0)]);
    // And ids go on after the replayed ones.
    let next = commit(&log, 1000, 10).await;
    assert_eq!(next[0].0, acked.last().unwrap().0 + 1);

    // Replay settled the WAL: sled holds it all durably, the segments are gone.
    let data = image.join("data");
    log.close().await.unwrap();
    drop(log);
    assert!(segments(&data).is_empty(), "{:?}", segments(&data));
    let again = open(&image).expect("reopen");
    assert_eq!(again.recovery.replayed_records, 0);
    assert_eq!(stored(&again).await.len(), acked.len() + 3);
    again.close().await.unwrap();
}

#[tokio::test]
async fn an_unfinished_last_record_is_dropped_and_everything_before_it_kept() {
    for cut in [1usize, 2, 9, 300] {
        let tmp = tempfile::tempdir().unwrap();
        let acked = crash_image(tmp.path(), 2, 4, 200).await;
        let image = tmp.path().join("image");
        let newest = segments(&image.join("data")).pop().unwrap();
        let mut bytes = std::fs::read(&newest).unwrap();
        let end = crate::log::wal_record::scan(&bytes).valid_len;
        // The crash cut the last write short: it was never acknowledged. In a zero-filled
        // segment the rest stays zeros; in a growing one the file ends there.
        if cut % 2 == 1 {
            bytes[end - cut..end].fill(0);
        } else {
            bytes.truncate(end - cut);
        }
        std::fs::write(&newest, &bytes).unwrap();

        let log = open(&image).expect("open");
        assert_eq!(log.recovery.replayed_records, 3, "cut {cut}");
        assert!(log.recovery.torn_bytes > 0, "cut {cut}");
        assert_eq!(
            stored(&log).await,
            acked[..acked.len() - 3].to_vec(),
            "cut {cut}"
        );
        assert!(log.verify().unwrap().healthy());
        log.close().await.unwrap();
    }
}

#[tokio::test]
async fn damage_before_acknowledged_records_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    crash_image(tmp.path(), 2, 4, 200).await;
    let image = tmp.path().join("image");
    let seg = segments(&image.join("data")).remove(0);
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the first record's body: records after it are whole.
    bytes[40] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();

    let err = open(&image).err().expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, LogError::Open(_)), "{err:?}");
    assert!(msg.contains("write-ahead log is damaged"), "{msg}");
}

#[tokio::test]
async fn a_checkpoint_beyond_what_sled_recovered_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    crash_image(tmp.path(), 2, 2, 10).await;
    let wal = tmp.path().join("image/data").join(wal::WAL_DIR);
    // sled "lost" what a finished flush had made durable.
    checkpoint::write(&wal, 10_000).unwrap();
    let err = open(&tmp.path().join("image")).err().expect("refused");
    assert!(err.to_string().contains("checkpoint"), "{err}");
}

#[tokio::test]
async fn checkpoints_delete_covered_segments_and_a_clean_close_leaves_no_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let o = LogOptions {
        checkpoint_every: Duration::from_millis(20),
        wal_segment_bytes: 64 << 10,
        ..super::tests::opts(tmp.path())
    };
    let data = o.dir.clone();
    let log = SledLog::open(&o, Hub::new(16), metrics.clone()).expect("open");
    let mut acked = Vec::new();
    let mut most = 0;
    for round in 0..120 {
        acked.extend(commit(&log, round, 1000).await);
        most = most.max(segments(&data).len());
    }
    assert!(most > 1, "the commits spanned several segments");
    let deleted = || {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tidewire_log_wal_segments_deleted_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while deleted() == 0 || segments(&data).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint deleted the old segments"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let through = checkpoint::read(&data.join(wal::WAL_DIR)).unwrap();
    assert!(
        through > 0 && through <= acked.last().unwrap().0,
        "checkpoint {through}"
    );
    log.close().await.unwrap();
    drop(log);
    assert!(segments(&data).is_empty());
    assert_eq!(
        checkpoint::read(&data.join(wal::WAL_DIR)).unwrap(),
        acked.last().unwrap().0,
        "a clean close checkpoints everything"
    );
    let again = open(tmp.path()).expect("reopen");
    assert_eq!(again.recovery.segments, 0);
    assert_eq!(stored(&again).await, acked);
    again.close().await.unwrap();
}

#[test]
fn a_spare_fill_asked_to_stop_stops_at_the_next_block_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let asked = std::cell::Cell::new(0u32);
    // Says "stopping" on its third question: two blocks are written, then the fill ends.
    let stopping = || {
        asked.set(asked.get() + 1);
        asked.get() >= 3
    };
    let err = wal::prepare_spare(tmp.path(), 64 << 20, 0, &stopping).expect_err("abandoned");
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "{err}");
    assert_eq!(
        asked.get(),
        3,
        "the fill went on after it was asked to stop"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "an abandoned spare left {left:?}");
    // Not stopping: the spare is made, whole.
    assert!(wal::prepare_spare(tmp.path(), 1 << 20, 0, &|| false).expect("filled"));
    let spare = std::fs::metadata(tmp.path().join("spare")).expect("spare");
    assert_eq!(spare.len(), 1 << 20);
}

#[tokio::test]
async fn closing_a_log_abandons_the_spare_segment_being_filled_instead_of_finishing_it() {
    // A restart on the same directory stops the log first, and the stop used to wait for the
    // spare maker to write and fsync a whole segment of zeros: seconds on a busy disk (a
    // test server's stop ran past its deadline that way). Segments this big cannot be filled
    // in the moment between the fill starting and the close.
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        wal_segment_bytes: 256 << 20,
        ..opts(tmp.path())
    };
    let wal_dir = o.dir.join(wal::WAL_DIR);
    let log = SledLog::open(&o, Hub::new(16), Metrics::new()).expect("open");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !wal_dir.join("spare.tmp").exists() {
        assert!(
            !wal_dir.join("spare").exists(),
            "the spare was finished before the test saw it start"
        );
        assert!(Instant::now() < deadline, "the spare maker never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    log.close().await.expect("close");
    drop(log);
    assert!(
        !wal_dir.join("spare").exists(),
        "the close waited until the spare segment was filled"
    );
    assert!(
        !wal_dir.join("spare.tmp").exists(),
        "a partial spare was left"
    );
    // The directory opens again at once, and makes its spare then.
    let again = SledLog::open(&o, Hub::new(16), Metrics::new()).expect("reopen");
    again.close().await.expect("close");
}
