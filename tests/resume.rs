//! Exact resume over SSE: clean restarts, `kill -9` under load, reconnect seams during a
//! continuous publish stream, and SIGTERM. Every acknowledged event is delivered exactly once,
//! in id order, with its payload; ids are never reused.
mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

type SseStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

/// One delivered event: id, topic and data.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    id: u64,
    topic: String,
    data: Value,
}

fn parse(ev: &eventsource_stream::Event) -> Seen {
    assert_eq!(ev.event, "message", "unexpected event {ev:?}");
    let env: Value = serde_json::from_str(&ev.data).expect("data is a JSON envelope");
    let id = env["id"].as_u64().expect("envelope id");
    assert_eq!(ev.id, id.to_string(), "SSE id line and envelope id differ");
    Seen {
        id,
        topic: env["topic"].as_str().expect("topic").to_string(),
        data: env["data"].clone(),
    }
}

/// Opens an SSE stream from `url` with the cursor sent as `Last-Event-ID`.
async fn open(url: &str, last_event_id: Option<u64>) -> SseStream {
    Box::pin(sse(url, last_event_id).await)
}

/// Reads events until the one with id `until` (inclusive).
async fn read_through(stream: &mut SseStream, until: u64) -> Vec<Seen> {
    let mut out = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "never reached event {until}");
        let s = parse(&next_event(stream).await);
        let id = s.id;
        out.push(s);
        if id >= until {
            return out;
        }
    }
}

/// Asserts ids strictly increase (no duplicate, in order).
fn assert_strictly_increasing(seen: &[Seen]) {
    for w in seen.windows(2) {
        assert!(
            w[0].id < w[1].id,
            "ids not strictly increasing: {} then {}",
            w[0].id,
            w[1].id
        );
    }
}

/// Publishes a JSON batch to `topic`; `Ok((first, last))` on 201, `Err` on anything else
/// (connection refused or reset, 503 while shutting down).
async fn try_publish(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    datas: &[Value],
) -> Result<(u64, u64), String> {
    let body: Vec<Value> = datas.iter().map(|d| json!({ "data": d })).collect();
    let r = client
        .post(format!("{base}/v1/topics/{topic}/events"))
        .header("content-type", "application/json")
        .body(Value::Array(body).to_string())
        .timeout(PATIENCE)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if status != 201 {
        return Err(format!("{status}: {v}"));
    }
    let first = v["first_id"].as_u64().ok_or("first_id")?;
    let last = v["last_id"].as_u64().ok_or("last_id")?;
    assert_eq!(
        last - first + 1,
        datas.len() as u64,
        "batch ids are not contiguous: {v}"
    );
    Ok((first, last))
}

/// Acknowledged events by id: (topic, data).
type Acked = BTreeMap<u64, (String, Value)>;

/// A publisher task: up to `max` requests (single events and small batches over a few
/// topics), until `stop` is set or a request fails. Returns what was acknowledged.
fn spawn_publisher(
    base: String,
    task: u64,
    max: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Acked> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut acked = Acked::new();
        let deadline = Instant::now() + PATIENCE;
        for k in 0..max {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let topic = format!("r/{}", (task + k) % 3);
            let n = if k % 3 == 0 { 1 + (k % 5) } else { 1 };
            let datas: Vec<Value> = (0..n)
                .map(|j| json!({"task": task, "k": k, "j": j}))
                .collect();
            match try_publish(&client, &base, &topic, &datas).await {
                Ok((first, _)) => {
                    for (i, d) in datas.into_iter().enumerate() {
                        let prev = acked.insert(first + i as u64, (topic.clone(), d));
                        assert!(prev.is_none(), "id {} acknowledged twice", first + i as u64);
                    }
                }
                Err(_) => break,
            }
        }
        acked
    })
}

/// How a recorded stream stopped.
#[derive(Debug, PartialEq)]
enum End {
    /// The server ended the response body properly.
    Clean,
    /// The connection broke (reset, truncated body).
    Error(String),
    /// Nothing arrived for [`PATIENCE`], or the overall bound passed.
    Timeout,
}

/// Reads an SSE stream into a vector until it ends or errors; bounded in count and time.
fn spawn_recorder(mut stream: SseStream) -> tokio::task::JoinHandle<(Vec<Seen>, End)> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let deadline = Instant::now() + PATIENCE * 2;
        for _ in 0..10_000_000 {
            if Instant::now() > deadline {
                break;
            }
            match tokio::time::timeout(PATIENCE, stream.next()).await {
                Ok(Some(Ok(ev))) => seen.push(parse(&ev)),
                Ok(Some(Err(e))) => return (seen, End::Error(e)),
                Ok(None) => return (seen, End::Clean),
                Err(_) => break,
            }
        }
        (seen, End::Timeout)
    })
}

fn merge_acked(parts: Vec<Acked>) -> Acked {
    let mut all = Acked::new();
    for part in parts {
        for (id, v) in part {
            assert!(
                all.insert(id, v).is_none(),
                "id {id} acknowledged to two requests"
            );
        }
    }
    all
}

/// Every acknowledged event is in `seen` once, with its topic and payload.
fn assert_all_acked_delivered(acked: &Acked, seen: &[Seen]) {
    let by_id: BTreeMap<u64, &Seen> = seen.iter().map(|s| (s.id, s)).collect();
    for (id, (topic, data)) in acked {
        let s = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged event {id} was never delivered"));
        assert_eq!(
            &s.topic, topic,
            "event {id}: topic differs from the acknowledged one"
        );
        assert_eq!(
            &s.data, data,
            "event {id}: payload differs from the acknowledged one"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Clean restart
// ---------------------------------------------------------------------------------------------

/// Publish, read part, disconnect, restart, publish more, reconnect with the cursor (sent as
/// the header or as the query), then everything missed arrives exactly once, then live.
async fn resume_after_clean_restart(by_header: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let mut published = Vec::new();
    for i in 0..20 {
        published.push(publish_one(&client, &base, "room/a", json!({"n": i})).await);
        // Noise on another topic: ids are global, the stream must skip it.
        publish_one(&client, &base, "room/b", json!({"noise": i})).await;
    }
    let mut sub = open(&server.url("/v1/sse?topic=room/a"), Some(0)).await;
    let first_part = read_through(&mut sub, published[7]).await;
    assert_eq!(
        first_part.iter().map(|s| s.id).collect::<Vec<_>>(),
        published[..8]
    );
    let cursor = first_part.last().unwrap().id;
    drop(sub);
    server.stop().await;

    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    for i in 20..30 {
        let id = publish_one(&client, &base, "room/a", json!({"n": i})).await;
        assert!(
            id > *published.last().unwrap(),
            "id {id} reused after restart"
        );
        published.push(id);
    }
    let mut sub = if by_header {
        open(&server.url("/v1/sse?topic=room/a"), Some(cursor)).await
    } else {
        open(
            &server.url(&format!("/v1/sse?topic=room/a&last_event_id={cursor}")),
            None,
        )
        .await
    };
    let rest = read_through(&mut sub, *published.last().unwrap()).await;
    assert_eq!(
        rest.iter().map(|s| s.id).collect::<Vec<_>>(),
        published[8..]
    );
    for (k, s) in rest.iter().enumerate() {
        assert_eq!(s.data, json!({"n": k + 8}), "payload of event {}", s.id);
    }
    // Then live, with nothing repeated at the seam.
    let live = publish_one(&client, &base, "room/a", json!({"n": 30})).await;
    let next = parse(&next_event(&mut sub).await);
    assert_eq!(next.id, live);
    server.stop().await;
}

#[tokio::test]
async fn resume_by_last_event_id_header_after_a_clean_restart_delivers_every_missed_event_once() {
    resume_after_clean_restart(true).await;
}

#[tokio::test]
async fn resume_by_last_event_id_query_after_a_clean_restart_delivers_every_missed_event_once() {
    resume_after_clean_restart(false).await;
}

/// Takes the exclusive `flock` sled keeps on `data/db`, from this process, once it is free.
fn hold_sled_lock(data: &std::path::Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data.join("db"))
        .expect("open data/db");
    let deadline = Instant::now() + PATIENCE;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(Instant::now() < deadline, "the lock never came free");
        std::thread::sleep(Duration::from_millis(5));
    }
    file
}

/// sled's I/O threads keep the data file, and so its lock, until a write or truncation queued
/// before the last handle dropped is done (an fsync, as long as the disk takes). A restart in
/// place that found the lock still held used to give up, and the server was never ready.
/// Here this process holds the lock for longer than another process would be waited for;
/// the restarted server waits it out and resumes every event.
#[tokio::test]
async fn a_restart_in_place_waits_out_the_lock_the_closed_log_left_behind_and_resumes_every_event()
{
    if sled_only("about the sled directory's lock") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(publish_one(&client, &base, "lock/a", json!({"n": i})).await);
    }
    server.stop().await;

    let held = hold_sled_lock(&tmp.path().join("data"));
    let hold_for = Duration::from_secs(3);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(hold_for);
        drop(held);
    });
    let started = Instant::now();
    let server = TestServer::start(&tmp).await;
    assert!(
        started.elapsed() >= hold_for - Duration::from_millis(500),
        "ready after {:?}, while the lock was still held",
        started.elapsed()
    );
    releaser.join().expect("releaser");
    let mut sub = open(&server.url("/v1/sse?topic=lock/a"), Some(0)).await;
    let seen = read_through(&mut sub, *published.last().unwrap()).await;
    assert_eq!(seen.iter().map(|s| s.id).collect::<Vec<_>>(), published);
    let live = publish_one(&client, &server.url(""), "lock/a", json!({"n": 5})).await;
    assert_eq!(parse(&next_event(&mut sub).await).id, live);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_acknowledged_event_and_resume_delivers_each_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = BinServer::spawn(&data, &[]).await;
    let base = server.url("");

    let sub = open(&server.url("/v1/sse?topic=r/**"), Some(0)).await;
    let recorder = spawn_recorder(sub);

    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..6)
        .map(|t| spawn_publisher(base.clone(), t, 100_000, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill9();
    // In-flight requests fail; nobody acknowledged them.
    let mut parts = Vec::new();
    for p in publishers {
        parts.push(
            tokio::time::timeout(PATIENCE, p)
                .await
                .expect("publisher did not stop after the kill")
                .expect("publisher task"),
        );
    }
    let acked = merge_acked(parts);
    assert!(
        acked.len() >= 10,
        "too few events acknowledged: {}",
        acked.len()
    );
    let (before, end) = tokio::time::timeout(PATIENCE * 3, recorder)
        .await
        .expect("recorder task hung")
        .expect("recorder task");
    assert_ne!(end, End::Timeout, "the subscriber did not notice the kill");
    assert!(!before.is_empty(), "subscriber saw nothing before the kill");
    assert_strictly_increasing(&before);
    let max_before = before
        .last()
        .map(|s| s.id)
        .max(acked.keys().next_back().copied())
        .unwrap();

    let server = BinServer::spawn(&data, &[]).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let marker = publish_one(&client, &base, "r/after", json!("after")).await;
    assert!(
        marker > max_before,
        "id {marker} after the restart is not above every earlier id ({max_before})"
    );

    // Resume from the last id seen before the kill, up to the head.
    let cursor = before.last().unwrap().id;
    let mut sub = open(&server.url("/v1/sse?topic=r/**"), Some(cursor)).await;
    let after = read_through(&mut sub, marker).await;
    eprintln!(
        "kill -9: {} acknowledged, {} delivered before the kill ({end:?}), {} after resuming",
        acked.len(),
        before.len(),
        after.len()
    );
    let mut all = before.clone();
    all.extend(after);
    assert_strictly_increasing(&all);
    assert_all_acked_delivered(&acked, &all);
    for s in &all {
        if s.id != marker {
            if let Some((topic, data)) = acked.get(&s.id) {
                assert_eq!((&s.topic, &s.data), (topic, data), "event {}", s.id);
            }
        }
    }

    // What the subscriber saw before the crash survived it (the hub only sees durable events).
    let mut sub = open(&server.url("/v1/sse?topic=r/**"), Some(0)).await;
    let replay = read_through(&mut sub, marker).await;
    assert_strictly_increasing(&replay);
    let replayed: HashSet<u64> = replay.iter().map(|s| s.id).collect();
    for s in &before {
        assert!(
            replayed.contains(&s.id),
            "event {} was delivered before the kill but is gone after it",
            s.id
        );
    }
    assert_eq!(
        replay, all,
        "a full replay differs from what was delivered live + resumed"
    );
}

// ---------------------------------------------------------------------------------------------
// Reconnect seams
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_reconnects_during_a_continuous_publish_stream_leave_no_gap_and_no_duplicate() {
    const RECONNECTS: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let url = server.url("/v1/sse?topic=seam/*");

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let base = base.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            let deadline = Instant::now() + PATIENCE;
            for k in 0u64..50_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let topic = format!("seam/{}", k % 2);
                let datas: Vec<Value> = (0..1 + k % 4).map(|j| json!([k, j])).collect();
                let (first, last) = try_publish(&client, &base, &topic, &datas)
                    .await
                    .expect("publish");
                ids.extend(first..=last);
            }
            ids
        })
    };

    let mut seen: Vec<u64> = Vec::new();
    let mut cursor = 0u64;
    for round in 0..RECONNECTS {
        let mut sub = open(&url, Some(cursor)).await;
        // Read a few events, then drop the connection mid-stream.
        for _ in 0..(5 + round * 7 % 40) {
            let s = parse(&next_event(&mut sub).await);
            assert!(
                s.id > cursor,
                "round {round}: id {} at or below cursor {cursor}",
                s.id
            );
            cursor = s.id;
            seen.push(s.id);
        }
        drop(sub);
        // Let the publisher run on while nobody is connected.
        tokio::time::sleep(Duration::from_millis(5 * (round as u64 % 4))).await;
    }
    stop.store(true, Ordering::Relaxed);
    let published = tokio::time::timeout(PATIENCE, publisher)
        .await
        .expect("publisher did not stop")
        .expect("publisher task");
    let head = *published.last().expect("something was published");
    assert!(
        head > cursor,
        "the publisher stopped before the reconnects were done: nothing was published during them"
    );
    let mut sub = open(&url, Some(cursor)).await;
    let rest = read_through(&mut sub, head).await;
    seen.extend(rest.iter().map(|s| s.id));
    assert_eq!(
        seen.len(),
        published.len(),
        "count of delivered vs published events"
    );
    assert_eq!(
        seen, published,
        "the union of the reconnected streams differs from what was published"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_cleanly_ends_open_streams_and_keeps_every_acknowledged_event() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = BinServer::spawn(&data, &[]).await;
    let base = server.url("");
    let client = reqwest::Client::new();

    let mut acked_parts = vec![Acked::new()];
    for i in 0..30u64 {
        let topic = format!("r/{}", i % 3);
        let (first, _) = try_publish(&client, &base, &topic, &[json!({"pre": i})])
            .await
            .expect("publish before SIGTERM");
        acked_parts[0].insert(first, (topic, json!({"pre": i})));
    }
    let sub = open(&server.url("/v1/sse?topic=r/**"), Some(0)).await;
    let recorder = spawn_recorder(sub);

    // Publishers still running while the signal arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (10..14)
        .map(|t| spawn_publisher(base.clone(), t, 100_000, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut server = server;
    let (status, _server) = tokio::task::spawn_blocking(move || {
        let st = server.sigterm();
        (st, server)
    })
    .await
    .expect("sigterm task");
    let took = started.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        acked_parts.push(
            tokio::time::timeout(PATIENCE, p)
                .await
                .expect("publisher did not stop after SIGTERM")
                .expect("publisher task"),
        );
    }
    let acked = merge_acked(acked_parts);

    // The open stream ended (cleanly: the recorder saw the end, not a timeout) and what it
    // delivered is in order.
    let (delivered, end) = tokio::time::timeout(PATIENCE * 3, recorder)
        .await
        .expect("recorder task hung")
        .expect("recorder task");
    eprintln!(
        "SIGTERM: {} acknowledged, {} delivered before the stream ended ({end:?}), exit after {took:?}",
        acked.len(),
        delivered.len()
    );
    assert_eq!(
        end,
        End::Clean,
        "the SSE stream did not end cleanly on SIGTERM"
    );
    assert_strictly_increasing(&delivered);

    let server = BinServer::spawn(&data, &[]).await;
    let base = server.url("");
    let marker = publish_one(&client, &base, "r/after", json!("after")).await;
    assert!(marker > *acked.keys().next_back().unwrap());
    let mut sub = open(&server.url("/v1/sse?topic=r/**"), Some(0)).await;
    let all = read_through(&mut sub, marker).await;
    assert_strictly_increasing(&all);
    assert_all_acked_delivered(&acked, &all);
    // Everything delivered before the shutdown is still there, unchanged.
    let by_id: BTreeMap<u64, &Seen> = all.iter().map(|s| (s.id, s)).collect();
    for s in &delivered {
        assert_eq!(
            by_id.get(&s.id).copied(),
            Some(s),
            "event {} changed or vanished",
            s.id
        );
    }
}
