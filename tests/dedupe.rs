//! Idempotent publish (`msg_id`), from outside: a device that retries — after a timeout, a
//! dropped connection or a server crash — never gets an event stored twice, and is answered
//! with the id of the original.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::time::{Duration, Instant};

use common::{metric, post, BinServer, TestServer, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// Every stored event of `topic` as (id, data), read with long-poll from cursor 0.
async fn stored(client: &reqwest::Client, base: &str, topic: &str) -> Vec<(u64, Value)> {
    common::poll_all(client, base, topic)
        .await
        .into_iter()
        .map(|e| (e["id"].as_u64().unwrap(), e["data"].clone()))
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn a_retried_publish_is_stored_once_and_answered_with_the_original_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let url = server.url("/v1/topics/dev/1/events");
    let body = json!({"data": {"t": 21.5}, "msg_id": "reading-7"}).to_string();
    let (status, first) = post(&client, &url, "application/json", body.clone()).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["count"], 1);
    assert_eq!(first["duplicates"], 0);
    assert!(first.get("duplicate_of").is_none(), "{first}");
    let id = first["first_id"].as_u64().unwrap();

    let (status, again) = post(&client, &url, "application/json", body).await;
    assert_eq!(status, 201, "a retry is a success, not an error: {again}");
    assert_eq!(
        again,
        json!({"first_id": id, "last_id": id, "count": 0, "duplicates": 1, "duplicate_of": [id]})
    );
    // The msg_id of a bare body comes from the query.
    let bare = server.url("/v1/topics/dev/1/events?msg_id=reading-7");
    let (status, bare_again) = post(&client, &bare, "text/plain", "21.5").await;
    assert_eq!(status, 201);
    assert_eq!(bare_again["duplicate_of"], json!([id]));

    assert_eq!(
        stored(&client, &server.url(""), "dev/1").await,
        [(id, json!({"t": 21.5}))]
    );
    assert_eq!(
        metric(&server.url(""), "tidewire_publish_duplicates_total").await,
        2.0
    );
    server.stop().await;
}

#[tokio::test]
async fn a_gzip_ndjson_batch_with_repeats_stores_only_new_events_with_contiguous_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let url = server.url("/v1/topics/dev/2/events");
    let line = |n: u32| json!({"data": n, "msg_id": format!("r{n}")}).to_string();
    let batch = |ns: &[u32]| {
        let text: Vec<String> = ns.iter().map(|&n| line(n)).collect();
        gzip((text.join("\n") + "\n").as_bytes())
    };
    let send = |body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };
    let r1: Value = send(batch(&[1, 2, 3])).await.unwrap().json().await.unwrap();
    assert_eq!(
        (r1["count"].as_u64(), r1["duplicates"].as_u64()),
        (Some(3), Some(0))
    );
    let base = r1["first_id"].as_u64().unwrap();

    // The device resends its buffer with two new readings, one of them twice.
    let resp = send(batch(&[2, 4, 3, 5, 4])).await.unwrap();
    assert_eq!(resp.status(), 201);
    let r2: Value = resp.json().await.unwrap();
    assert_eq!(r2["count"], 2);
    assert_eq!(r2["duplicates"], 3);
    assert_eq!(r2["duplicate_of"], json!([base + 1, base + 2, base + 3]));
    assert_eq!(r2["first_id"], base + 3);
    assert_eq!(r2["last_id"], base + 4);

    let data: Vec<Value> = stored(&client, &server.url(""), "dev/2")
        .await
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(data, [json!(1), json!(2), json!(3), json!(4), json!(5)]);
    server.stop().await;
}

#[tokio::test]
async fn the_same_msg_id_on_another_topic_is_another_event() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let batch = json!([
        {"topic": "gw/a", "data": 1, "msg_id": "m"},
        {"topic": "gw/b", "data": 2, "msg_id": "m"},
        {"topic": "gw/a", "data": 3, "msg_id": "m"},
    ]);
    let (status, r) = post(
        &client,
        &server.url("/v1/events"),
        "application/json",
        batch.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(
        (r["count"].as_u64(), r["duplicates"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(r["duplicate_of"], json!([r["first_id"]]));
    server.stop().await;
}

#[tokio::test]
async fn concurrent_retries_over_many_connections_store_one_event() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let url = server.url("/v1/topics/dev/3/events");
    let mut tasks = Vec::new();
    for n in 0..32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // A client each: separate connections, racing into the same group commits.
            let client = reqwest::Client::new();
            let body = json!({"data": n, "msg_id": "once"}).to_string();
            post(&client, &url, "application/json", body).await
        }));
    }
    let mut ids = BTreeSet::new();
    let mut stored_count = 0;
    for t in tasks {
        let (status, r) = t.await.unwrap();
        assert_eq!(status, 201, "{r}");
        stored_count += r["count"].as_u64().unwrap();
        ids.insert(r["first_id"].as_u64().unwrap());
    }
    assert_eq!(stored_count, 1);
    assert_eq!(ids.len(), 1, "every answer names the one stored event");
    let client = reqwest::Client::new();
    assert_eq!(stored(&client, &server.url(""), "dev/3").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_publish_repeating_an_http_msg_id_is_acked_with_the_original_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let (status, r) = post(
        &client,
        &server.url("/v1/topics/dev/4/events"),
        "application/json",
        json!({"data": 1, "msg_id": "w1"}).to_string(),
    )
    .await;
    assert_eq!(status, 201);
    let id = r["first_id"].as_u64().unwrap();

    let (mut ws, _) = timeout(
        PATIENCE,
        connect_async(format!("ws://{}/v1/ws", server.addr)),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let repeat = ack(
        &mut ws,
        json!({"op":"publish","topic":"dev/4","data":1,"msg_id":"w1","ref":"a"}),
    )
    .await;
    assert_eq!(
        repeat,
        json!({"op":"ack","ref":"a","id":id,"duplicate":true})
    );
    let fresh = ack(
        &mut ws,
        json!({"op":"publish","topic":"dev/4","data":2,"msg_id":"w2","ref":"b"}),
    )
    .await;
    assert_eq!(fresh["op"], "ack");
    assert!(fresh.get("duplicate").is_none(), "{fresh}");
    let fresh_id = fresh["id"].as_u64().unwrap();
    let again = ack(
        &mut ws,
        json!({"op":"publish","topic":"dev/4","data":2,"msg_id":"w2","ref":"c"}),
    )
    .await;
    assert_eq!(
        again,
        json!({"op":"ack","ref":"c","id":fresh_id,"duplicate":true})
    );
    assert_eq!(stored(&client, &server.url(""), "dev/4").await.len(), 2);
    server.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends one JSON op and returns the next text frame.
async fn ack(ws: &mut Ws, frame: Value) -> Value {
    ws.send(Message::text(frame.to_string())).await.unwrap();
    loop {
        let msg = timeout(PATIENCE, ws.next())
            .await
            .expect("ack timed out")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str::<Value>(&t).unwrap();
        }
    }
}

/// The retry a flaky device makes after a crash: it cannot know whether a publish without an
/// answer was stored, so it sends it again. Whatever moment the server died at, every event
/// ends up stored exactly once, and acknowledged events keep their acknowledged ids.
#[tokio::test]
async fn retrying_every_publish_after_a_kill_9_stores_each_event_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = BinServer::spawn(&dir, &[]).await;
    let addr = server.addr;
    let base = server.url("");
    const PUBLISHERS: u32 = 8;
    // A cap: the server is killed long before the publishers get there.
    const BATCHES: u32 = 5000;
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let batch_body = |p: u32, b: u32| {
        let lines: Vec<String> = (0..5)
            .map(|k| {
                let m = format!("p{p}-b{b}-k{k}");
                json!({"data": m, "msg_id": m}).to_string()
            })
            .collect();
        lines.join("\n")
    };
    // Publishers run until the server dies; they record what was acknowledged.
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let url = format!("{base}/v1/topics/crash/{p}/events");
        let body_of = batch_body;
        let acks = acks.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked = BTreeMap::new();
            let mut attempted = 0;
            for b in 0..BATCHES {
                attempted = b + 1;
                let sent = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body_of(p, b))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                if resp.status() != 201 {
                    break;
                }
                let Ok(r) = resp.json::<Value>().await else {
                    break;
                };
                acked.insert(b, r["first_id"].as_u64().unwrap());
                acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (acked, attempted)
        }));
    }
    // Kill while publishes are in flight: after some acks, with the publishers still going.
    let deadline = Instant::now() + PATIENCE;
    while acks.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "publishes never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let mut acked = Vec::new();
    let mut attempted = Vec::new();
    for t in tasks {
        let (a, n) = t.await.unwrap();
        acked.push(a);
        attempted.push(n);
    }
    let acked_batches: usize = acked.iter().map(BTreeMap::len).sum();
    assert!(acked_batches >= 100);
    assert!(
        attempted.iter().all(|&n| n < BATCHES),
        "a publisher finished before the kill: the crash tested nothing"
    );

    let server = BinServer::spawn_on(addr, &dir, &[]).await;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    for p in 0..PUBLISHERS {
        let url = format!("{base}/v1/topics/crash/{p}/events");
        for b in 0..attempted[p as usize] {
            assert!(Instant::now() < deadline);
            let (status, r) = post(&client, &url, "application/x-ndjson", batch_body(p, b)).await;
            assert_eq!(status, 201, "{r}");
            if let Some(&id) = acked[p as usize].get(&b) {
                assert_eq!(
                    r["duplicates"], 5,
                    "an acknowledged batch is recognised: {r}"
                );
                assert_eq!(r["first_id"], id, "with its acknowledged ids");
            } else {
                // Unacknowledged: stored in full before the crash, or not at all.
                let dups = r["duplicates"].as_u64().unwrap();
                assert!(dups == 0 || dups == 5, "a batch was partly stored: {r}");
            }
        }
        let events = stored(&client, &base, &format!("crash/{p}")).await;
        let data: Vec<String> = events
            .iter()
            .map(|e| e.1.as_str().unwrap().to_string())
            .collect();
        let unique: BTreeSet<&String> = data.iter().collect();
        assert_eq!(unique.len(), data.len(), "an event was stored twice");
        assert_eq!(
            data.len(),
            (attempted[p as usize] * 5) as usize,
            "an event is missing"
        );
    }
    drop(server);
}
