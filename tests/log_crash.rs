//! Crash safety of the chunked log itself: a child process (this test binary, re-run in a
//! child role) appends multi-chunk batches from several tasks and is killed with SIGKILL in
//! the middle; the reopened log holds every acknowledged event, every batch whole or not at
//! all, statistics that match its content, and ids continue after the newest stored one.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidewire::envelope::{Data, EventId, NewEvent};
use tidewire::hub::Hub;
use tidewire::log::{EventLog, LogOptions, SledLog};
use tidewire::metrics::Metrics;
use tidewire::topic::{Pattern, PatternSet, Topic};

const CHILD_ENV: &str = "TIDEWIRE_LOG_CRASH_CHILD_DIR";
const TEST_NAME: &str = "kill_9_while_appending_loses_no_acknowledged_event_and_ids_continue";
/// Events per append: ~40-byte records, so each append spans a few 64 KiB chunks.
const BATCH: u64 = 3000;
const TASKS: u64 = 4;
const TOPICS: u64 = 7;
/// Acknowledged appends to wait for before the kill.
const ACKS_BEFORE_KILL: usize = 40;

fn opts(dir: &std::path::Path) -> LogOptions {
    LogOptions {
        dir: dir.join("data"),
        cache_bytes: 16 << 20,
        dedupe: Default::default(),
        fsync: Default::default(),
        retention: tidewire::log::retention::RetentionPolicy::keep_everything(),
        space: Default::default(),
        checkpoint_every: std::time::Duration::from_millis(500),
        wal_segment_bytes: 32 << 20,
    }
}

fn event(seq: u64, k: u64) -> NewEvent {
    NewEvent {
        topic: Topic::parse(&format!("crash/{}", (seq + k) % TOPICS)).unwrap(),
        event_type: None,
        msg_id: None,
        data: Data::Json(format!("[{seq},{k}]").into()),
    }
}

/// The child role: append until killed (bounded, in case nobody kills it).
async fn child(dir: &str) {
    let log = SledLog::open(
        &opts(std::path::Path::new(dir)),
        Hub::new(4),
        Metrics::new(),
    )
    .expect("child: open");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..10_000u64 {
                let seq = t * 1_000_000 + j;
                let events = (0..BATCH).map(|k| event(seq, k)).collect();
                let done = log.append(events).await.expect("child: append");
                // One line per acknowledgement; the parent keeps what it has read.
                println!("acked {seq} {} {}", done.first.0, done.last.0);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    eprintln!("child: nobody killed me");
    std::process::exit(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_appending_loses_no_acknowledged_event_and_ids_continue() {
    if common::sled_only("drives SledLog directly in a child process") {
        return;
    }
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir).await;
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = proc.stdout.take().unwrap();
    // Read acknowledgements on a thread; the kill happens once enough have arrived.
    let (tx, rx) = std::sync::mpsc::channel::<(u64, u64, u64)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Some(rest) = line.strip_prefix("acked ") else {
                continue;
            };
            let v: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
            if tx.send((v[0], v[1], v[2])).is_err() {
                break;
            }
        }
    });
    let mut acked: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < ACKS_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "the child acknowledged too little"
        );
        if let Ok((seq, first, last)) = rx.recv_timeout(Duration::from_millis(100)) {
            acked.insert(seq, (first, last));
        }
    }
    proc.kill().expect("kill -9 the child");
    proc.wait().unwrap();
    reader.join().unwrap();
    // Acknowledgements printed before the kill are acknowledged too.
    while let Ok((seq, first, last)) = rx.try_recv() {
        acked.insert(seq, (first, last));
    }
    let newest_acked = acked.values().map(|a| a.1).max().unwrap();

    let log = SledLog::open(&opts(tmp.path()), Hub::new(4), Metrics::new()).expect("reopen");
    let head = log.head().0;
    assert!(
        head >= newest_acked,
        "head {head} < acknowledged {newest_acked}"
    );

    // Read everything back.
    let all = PatternSet::new(vec![Pattern::parse("crash/*").unwrap()]).unwrap();
    let mut cursor = EventId(0);
    let mut stored: Vec<(u64, String, u64, u64)> = Vec::new();
    for _ in 0..1_000_000 {
        let page = log.read(all.clone(), cursor, 5000).await.expect("read");
        assert!(page.gap.is_none());
        for e in &page.events {
            let Data::Json(s) = &e.body.data else {
                panic!("event {} is not JSON", e.id)
            };
            let v: Vec<u64> = serde_json::from_str(s).unwrap();
            stored.push((e.id.0, e.body.topic.as_str().to_string(), v[0], v[1]));
        }
        cursor = page.through;
        if page.complete {
            break;
        }
    }
    assert_eq!(stored.last().map(|e| e.0), Some(head));
    assert!(
        stored.windows(2).all(|w| w[0].0 + 1 == w[1].0),
        "ids have holes"
    );

    // Every stored batch is whole and in place; every acknowledged one is stored.
    let mut batches: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    for (id, topic, seq, k) in &stored {
        assert_eq!(topic, &format!("crash/{}", (seq + k) % TOPICS));
        batches.entry(*seq).or_default().push((*id, *k));
    }
    for (seq, evs) in &batches {
        assert_eq!(evs.len() as u64, BATCH, "batch {seq} is not whole");
        let first = evs[0].0;
        assert!(
            evs.iter().all(|&(id, k)| id == first + k),
            "batch {seq} out of place"
        );
        if let Some(&(f, l)) = acked.get(seq) {
            assert_eq!((first, first + BATCH - 1), (f, l), "batch {seq} moved");
        }
    }
    for seq in acked.keys() {
        assert!(batches.contains_key(seq), "acknowledged batch {seq} lost");
    }

    // Statistics agree with the content.
    let mut per_topic: HashMap<String, (u64, u64)> = HashMap::new();
    for (id, topic, _, _) in &stored {
        let e = per_topic.entry(topic.clone()).or_insert((*id, 0));
        e.1 += 1;
    }
    assert_eq!(log.event_count(), stored.len() as u64);
    for stats in log.topics_now(None, 100) {
        let (first, count) = per_topic[&stats.topic];
        assert_eq!(
            (stats.first_id, stats.count),
            (Some(first), count),
            "{stats:?}"
        );
    }

    // Ids continue after the newest stored event.
    let next = log
        .append(vec![event(99, 0)])
        .await
        .expect("append after the crash");
    assert_eq!(next.first.0, head + 1);
    log.close().await.unwrap();
    eprintln!(
        "kill -9: {} batches acknowledged, {} stored, head {head}",
        acked.len(),
        batches.len()
    );
}
