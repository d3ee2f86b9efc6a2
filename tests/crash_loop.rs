//! The crash loop: rounds of concurrent publishers (single events and batches, several topics,
//! with `msg_id`s) and live SSE and WebSocket subscribers, ended by a `kill -9` of the real
//! server at a random moment, then a restart on the same data dir. After every round and at
//! the end it checks what "acknowledged means stored" promises:
//! - every acknowledged event is stored exactly once, with its acknowledged id and bytes;
//! - ids strictly increase and are never reused across crashes;
//! - no batch is partly stored;
//! - subscribers resuming with their cursor get each event exactly once, in order;
//! - the server starts cleanly every time, and `tidewire verify` finds the log consistent.
//!
//! On the embedded log each round also picks how often sled is checkpointed (15 ms to the
//! default 500 ms) and how big write-ahead log segments grow (64 KiB to the default 32 MiB),
//! so kills land between a WAL fsync and sled's flush, during checkpoints, and while covered
//! segments are deleted.
//!
//! `TIDEWIRE_CRASH_ROUNDS` (default 20) and `TIDEWIRE_CRASH_SEED` choose the rounds and the
//! kill moments; `benches/crash_loop.sh` runs it for longer.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{free_addr, BinServer, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

const TOPICS: [&str; 3] = ["crash/a", "crash/b", "other/c"];

/// A small xorshift generator: the kill moments are reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What was acknowledged: id → the exact data published under it.
type Acked = Arc<Mutex<BTreeMap<u64, String>>>;

/// One publisher until the server dies: alternates single events and 20-event batches,
/// all with msg_ids, and records every acknowledged event with its id.
async fn publisher(base: String, who: u64, round: u64, seq: Arc<AtomicU64>, acked: Acked) {
    let client = reqwest::Client::new();
    loop {
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let topic = TOPICS[(n % 3) as usize];
        let size = if n.is_multiple_of(2) { 1 } else { 20 };
        let data: Vec<String> = (0..size)
            .map(|k| format!("r{round}-p{who}-n{n}-k{k}"))
            .collect();
        let body: String = data
            .iter()
            .map(|d| json!({"data": d, "msg_id": d}).to_string() + "\n")
            .collect();
        let sent = client
            .post(format!("{base}/v1/topics/{topic}/events"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let Ok(resp) = sent else { return };
        if resp.status() != 201 {
            return;
        }
        let Ok(r) = resp.json::<Value>().await else {
            return;
        };
        let first = r["first_id"].as_u64().expect("first_id");
        assert_eq!(r["count"], size, "a fresh batch is stored whole: {r}");
        let mut a = acked.lock().unwrap();
        for (k, d) in data.into_iter().enumerate() {
            assert!(
                a.insert(first + k as u64, d).is_none(),
                "id {first}+{k} acknowledged twice"
            );
        }
    }
}

/// An SSE subscriber that resumes from its cursor every round and collects (id, data).
async fn sse_subscriber(base: String, cursor: u64, got: Arc<Mutex<Vec<(u64, String)>>>) {
    let Ok(resp) = reqwest::Client::new()
        .get(format!("{base}/v1/sse?topic=crash/**&topic=other/*"))
        .header("last-event-id", cursor.to_string())
        .send()
        .await
    else {
        return;
    };
    let mut stream = eventsource_stream::EventStream::new(resp.bytes_stream());
    while let Some(Ok(ev)) = stream.next().await {
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
            if let (Some(id), Some(d)) = (v["id"].as_u64(), v["data"].as_str()) {
                got.lock().unwrap().push((id, d.to_string()));
            }
        }
    }
}

/// A WebSocket subscriber doing the same with `since`.
async fn ws_subscriber(addr: String, cursor: u64, got: Arc<Mutex<Vec<(u64, String)>>>) {
    let url = format!("ws://{addr}/v1/ws?topic=crash/**&topic=other/*&since={cursor}");
    let Ok((mut ws, _)) = connect_async(url).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            if let Ok(v) = serde_json::from_str::<Value>(&t) {
                if let (Some(id), Some(d)) = (v["id"].as_u64(), v["data"].as_str()) {
                    got.lock().unwrap().push((id, d.to_string()));
                }
            }
        }
    }
}

/// Every stored event as id → data, read with long-poll from cursor 0.
async fn stored(base: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for e in common::poll_all(&reqwest::Client::new(), base, "**").await {
        let id = e["id"].as_u64().unwrap();
        assert!(out
            .insert(id, e["data"].as_str().unwrap().to_string())
            .is_none());
    }
    out
}

/// Checks a subscriber's deliveries: strictly increasing ids, each one stored with that data.
fn check_delivered(name: &str, got: &[(u64, String)], stored: &BTreeMap<u64, String>) {
    for w in got.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "{name}: {} then {}: a duplicate or reorder",
            w[0].0,
            w[1].0
        );
    }
    for (id, d) in got {
        assert_eq!(
            stored.get(id),
            Some(d),
            "{name} received {id}, which is not stored as sent"
        );
    }
}

#[tokio::test]
async fn kill_9_rounds_lose_no_acknowledged_event_and_every_subscriber_resumes_exactly() {
    let rounds: u64 = std::env::var("TIDEWIRE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("TIDEWIRE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash loop: {rounds} rounds, TIDEWIRE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let addr = free_addr();
    let base = format!("http://{addr}");
    let acked: Acked = Arc::default();
    let sse_got: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let ws_got: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let mut newest_acked = 0;
    for round in 0..rounds {
        let checkpoint_ms = ["15", "60", "500"][(rng.next() % 3) as usize];
        let segment_bytes = ["65536", "262144", "33554432"][(rng.next() % 3) as usize];
        let mut server = BinServer::spawn_on_with_env(
            addr,
            &dir,
            &[],
            &[
                ("TIDEWIRE_STORAGE_CHECKPOINT_MS", checkpoint_ms),
                ("TIDEWIRE_STORAGE_WAL_SEGMENT_BYTES", segment_bytes),
            ],
        )
        .await;
        // The subscribers resume from the last event they received.
        let sse_cursor = sse_got.lock().unwrap().last().map_or(0, |e| e.0);
        let ws_cursor = ws_got.lock().unwrap().last().map_or(0, |e| e.0);
        let subs = [
            tokio::spawn(sse_subscriber(base.clone(), sse_cursor, sse_got.clone())),
            tokio::spawn(ws_subscriber(addr.to_string(), ws_cursor, ws_got.clone())),
        ];
        let seq = Arc::new(AtomicU64::new(0));
        let pubs: Vec<_> = (0..4)
            .map(|who| {
                tokio::spawn(publisher(
                    base.clone(),
                    who,
                    round,
                    seq.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50 + rng.next() % 400)).await;
        server.kill9();
        for p in pubs {
            timeout(PATIENCE, p).await.expect("publisher hung").unwrap();
        }
        for s in subs {
            timeout(PATIENCE, s)
                .await
                .expect("subscriber hung")
                .unwrap();
        }
        // Ids of this round's acknowledgements come after every earlier round's.
        let a = acked.lock().unwrap();
        let this_round = a.range(newest_acked + 1..).count();
        let older_new = a
            .iter()
            .filter(|(_, d)| d.starts_with(&format!("r{round}-")))
            .filter(|(id, _)| **id <= newest_acked)
            .count();
        assert_eq!(
            older_new, 0,
            "round {round} reused an id of an earlier round"
        );
        newest_acked = a.keys().next_back().copied().unwrap_or(0);
        eprintln!(
            "round {round} (checkpoint {checkpoint_ms} ms, segments of {segment_bytes} bytes): \
             {this_round} events acknowledged, newest id {newest_acked}"
        );
    }

    // The final restart: everything acknowledged is there, exactly once, with its bytes.
    let server = BinServer::spawn_on(addr, &dir, &[]).await;
    let all = stored(&base).await;
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    for (id, d) in &acked {
        assert_eq!(
            all.get(id),
            Some(d),
            "acknowledged event {id} lost or changed"
        );
    }
    // Whatever was stored without an ack (the kill beat the answer) is whole batches only.
    let mut batches: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (id, d) in &all {
        let batch = d
            .rsplit_once("-k")
            .map_or(d.as_str(), |(b, _)| b)
            .to_string();
        batches.entry(batch).or_default().push(*id);
    }
    for (batch, ids) in &batches {
        let n = ids.len();
        assert!(
            n == 1 || n == 20,
            "batch {batch} is partly stored: {n} events"
        );
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "batch {batch} ids not contiguous"
        );
    }
    // Subscribers: in order, no duplicate across all the reconnects, nothing invented; and
    // resuming once more from their cursors brings them exactly to the end.
    for (name, got) in [("sse", &sse_got), ("ws", &ws_got)] {
        let cursor = got.lock().unwrap().last().map_or(0, |e| e.0);
        let rest = if name == "sse" {
            tokio::spawn(sse_subscriber(base.clone(), cursor, got.clone()))
        } else {
            tokio::spawn(ws_subscriber(addr.to_string(), cursor, got.clone()))
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        while got.lock().unwrap().last().map_or(0, |e| e.0) < *all.keys().next_back().unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never caught up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rest.abort();
        let got = got.lock().unwrap();
        check_delivered(name, &got, &all);
        assert_eq!(got.len(), all.len(), "{name} missed events");
    }
    drop(server);
    // `verify` checks a sled data dir; on NATS the checks above are the whole story.
    if common::backend() == common::Backend::Sled {
        let verify = std::process::Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .args(["verify", "--data-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "verify: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
    eprintln!(
        "crash loop: {rounds} rounds, {} acknowledged, {} stored, every check passed",
        acked.len(),
        all.len()
    );
}
