//! Long-poll (`GET /v1/poll`): immediate answers from history, waits woken by commits,
//! timeouts, limits, gap, MessagePack and gzip bodies, disconnect cleanup, and a poll loop
//! that stays lossless across a `kill -9` of the server.
mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const POLL_WAITERS: &str = "tidewire_live_subscribers{transport=\"poll\"}";

/// One poll with reqwest: status, headers and the JSON body.
async fn poll(
    client: &reqwest::Client,
    base: &str,
    query: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client
        .get(format!("{base}/v1/poll?{query}"))
        .timeout(Duration::from_secs(70))
        .send()
        .await
        .expect("poll");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body: Value = r.json().await.expect("poll body is JSON");
    (status, headers, body)
}

fn ids(body: &Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| e["id"].as_u64().expect("envelope id"))
        .collect()
}

#[tokio::test]
async fn history_is_answered_at_once_as_a_whole_uncacheable_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for i in 1..=3 {
        publish_one(&client, &base, "lp/a", json!(i)).await;
    }
    publish_one(&client, &base, "other", json!("x")).await;
    let started = Instant::now();
    let (status, headers, body) = poll(&client, &base, "topic=lp/*&since=0&timeout=20").await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "history must not wait"
    );
    assert_eq!(ids(&body), [1, 2, 3]);
    // Event 4 does not match, so the cursor may (and does) move past it.
    assert_eq!(body["next"], 4);
    assert_eq!(body["events"][1]["topic"], "lp/a");
    assert_eq!(body["events"][1]["data"], 2);
    assert!(body.get("gap").is_none());
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("content-length"), "{headers:?}");
    assert!(!headers.contains_key("transfer-encoding"), "{headers:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_poll_wakes_when_a_matching_event_is_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    publish_one(&client, &base, "w/a", json!(0)).await;
    let waiting = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = poll(&client, &base, "topic=w/a&since=1&timeout=30").await;
            (r, started.elapsed())
        })
    };
    // Only once the poll is waiting, publish elsewhere (must not wake it with nothing), then here.
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, POLL_WAITERS).await != 1.0 {
        assert!(Instant::now() < deadline, "the poll never started waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publish_one(&client, &base, "w/b", json!("elsewhere")).await;
    let id = publish_one(&client, &base, "w/a", json!("here")).await;
    let ((status, _, body), waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(ids(&body), [id]);
    assert_eq!(body["next"], id);
    assert!(
        waited < Duration::from_secs(25),
        "woken by the commit, not by the 30 s timeout (waited {waited:?})"
    );
    assert_eq!(metric(&base, POLL_WAITERS).await, 0.0);
    server.stop().await;
}

#[tokio::test]
async fn a_quiet_poll_times_out_empty_with_a_cursor_that_skips_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    publish_one(&client, &base, "q/a", json!(1)).await;
    publish_one(&client, &base, "q/other", json!(2)).await;
    let (status, _, body) = poll(&client, &base, "topic=q/a&since=1&timeout=1").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"events": [], "next": 2}));
    let id = publish_one(&client, &base, "q/a", json!(3)).await;
    let (_, _, body) = poll(&client, &base, "topic=q/a&since=2&timeout=1").await;
    assert_eq!(ids(&body), [id]);
    server.stop().await;
}

#[tokio::test]
async fn without_since_a_poll_is_live_only_and_next_is_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for i in 1..=4 {
        publish_one(&client, &base, "live/a", json!(i)).await;
    }
    let (_, _, body) = poll(&client, &base, "topic=live/a&timeout=1").await;
    assert_eq!(body, json!({"events": [], "next": 4}));
    server.stop().await;
}

#[tokio::test]
async fn a_backlog_drains_over_successive_polls_within_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let events: Vec<Value> = (1..=25).map(|i| json!({"data": i})).collect();
    let (status, _) = post(
        &client,
        &format!("{base}/v1/topics/bl/events"),
        "application/json",
        serde_json::to_vec(&events).unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    let mut seen = Vec::new();
    let mut next = 0;
    for want in [10usize, 10, 5] {
        let (_, _, body) = poll(
            &client,
            &base,
            &format!("topic=bl&since={next}&limit=10&timeout=1"),
        )
        .await;
        let got = ids(&body);
        assert_eq!(got.len(), want, "{body}");
        next = body["next"].as_u64().unwrap();
        assert_eq!(Some(&next), got.last());
        seen.extend(got);
    }
    assert_eq!(seen, (1..=25).collect::<Vec<u64>>());
    server.stop().await;
}

#[tokio::test]
async fn looping_on_next_sees_every_matching_event_once_while_publishers_run() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let publisher = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let mut matching = Vec::new();
            for i in 0..300u64 {
                let topic = if i % 3 == 0 { "mix/noise" } else { "mix/a" };
                let id = publish_one(&client, &base, topic, json!(i)).await;
                if topic == "mix/a" {
                    matching.push(id);
                }
            }
            matching
        })
    };
    let mut seen = Vec::new();
    let mut next = 0u64;
    let deadline = Instant::now() + PATIENCE;
    while seen.len() < 200 {
        assert!(Instant::now() < deadline, "saw only {} of 200", seen.len());
        let (status, _, body) = poll(
            &client,
            &base,
            &format!("topic=mix/a&since={next}&limit=7&timeout=2"),
        )
        .await;
        assert_eq!(status, 200);
        seen.extend(ids(&body));
        next = body["next"].as_u64().unwrap();
    }
    let matching = publisher.await.unwrap();
    assert_eq!(seen, matching, "every matching event once, in order");
    server.stop().await;
}

#[tokio::test]
async fn a_cursor_older_than_retention_gets_the_gap_then_the_retained_events() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for i in 1..=10 {
        publish_one(&client, &base, "g/a", json!(i)).await;
    }
    server.stop().await;
    retain_after(tmp.path(), 5).await;
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let (_, _, body) = poll(&client, &base, "topic=g/a&since=2&timeout=1").await;
    assert_eq!(body["gap"], json!({"requested": 2, "oldest": 6}));
    assert_eq!(ids(&body), [6, 7, 8, 9, 10]);
    assert_eq!(body["next"], 10);
    server.stop().await;
}

#[tokio::test]
async fn msgpack_is_served_when_accepted_and_bytes_stay_bin() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let (status, _) = post(
        &client,
        &format!("{base}/v1/topics/mp/events"),
        "application/octet-stream",
        vec![0u8, 1, 2, 255],
    )
    .await;
    assert_eq!(status, 201);
    publish_one(&client, &base, "mp", json!({"t": 1.5})).await;
    let r = client
        .get(format!("{base}/v1/poll?topic=mp&since=0&timeout=1"))
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/msgpack");
    let raw = r.bytes().await.unwrap();

    // An independent decoder: rmpv reads any MessagePack into a value tree.
    let body = rmpv::decode::read_value(&mut &raw[..]).expect("a MessagePack value");
    let field = |v: &rmpv::Value, k: &str| {
        v.as_map()
            .expect("a map")
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap_or(rmpv::Value::Nil)
    };
    assert_eq!(field(&body, "next"), rmpv::Value::from(2u64));
    let events = field(&body, "events");
    let events = events.as_array().expect("events array");
    assert_eq!(events.len(), 2);
    assert_eq!(
        field(&events[0], "data"),
        rmpv::Value::Binary(vec![0, 1, 2, 255])
    );
    assert_eq!(field(&events[1], "id"), rmpv::Value::from(2u64));
    assert_eq!(
        field(&events[1], "data"),
        rmpv::Value::Map(vec![("t".into(), 1.5f64.into())])
    );
    server.stop().await;
}

#[tokio::test]
async fn gzip_is_served_when_accepted_for_bodies_worth_compressing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::builder().no_gzip().build().unwrap();
    let events: Vec<Value> = (0..1000)
        .map(|i| json!({"data": {"sensor": "room-12", "t": 20 + i % 5, "unit": "C"}}))
        .collect();
    post(
        &client,
        &format!("{base}/v1/topics/z/events"),
        "application/json",
        serde_json::to_vec(&events).unwrap(),
    )
    .await;
    let fetch = |enc: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let r = client
                .get(format!("{base}/v1/poll?topic=z&since=0&timeout=1"))
                .header("accept-encoding", enc)
                .send()
                .await
                .unwrap();
            let gz = r
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_string());
            (gz, r.bytes().await.unwrap())
        }
    };
    let (plain_enc, plain) = fetch("identity").await;
    assert_eq!(plain_enc, None);
    let (gz_enc, gz) = fetch("gzip").await;
    assert_eq!(gz_enc.as_deref(), Some("gzip"));
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut inflated)
        .expect("a gzip body");
    assert_eq!(inflated, plain, "gzip holds exactly the plain body");
    let body: Value = serde_json::from_slice(&inflated).unwrap();
    assert_eq!(ids(&body).len(), 1000);
    assert!(
        gz.len() * 5 < plain.len(),
        "gzip {} vs plain {}",
        gz.len(),
        plain.len()
    );
    // Small bodies are not worth it.
    let (small_enc, _) = {
        let r = client
            .get(format!("{base}/v1/poll?topic=none&timeout=0"))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        (r.headers().get("content-encoding").cloned(), ())
    };
    assert!(small_enc.is_none());
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_wait_leaves_no_waiter_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let mut sock = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    sock.write_all(b"GET /v1/poll?topic=gone&timeout=50 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, POLL_WAITERS).await != 1.0 {
        assert!(Instant::now() < deadline, "the poll never started waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(sock);
    while metric(&base, POLL_WAITERS).await != 0.0 {
        assert!(Instant::now() < deadline, "the waiter outlived its client");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_poll_requests_get_the_contract_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for (query, status, code) in [
        ("topic=a&since=x", 400, "invalid_cursor"),
        ("topic=a&timeout=soon", 400, "bad_request"),
        ("topic=a&limit=0", 400, "bad_request"),
        ("since=0", 400, "bad_request"),
        ("topic=a/**/b", 422, "invalid_pattern"),
    ] {
        let r = client
            .get(format!("{base}/v1/poll?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    let r = client
        .post(format!("{base}/v1/poll?topic=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    server.stop().await;
}

#[tokio::test]
async fn a_poll_loop_continues_losslessly_across_a_kill_9_of_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = BinServer::spawn(&dir, &[]).await;
    let addr = server.addr;
    let base = server.url("");
    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(publish_one(&client, &base, "k/a", json!(i)).await);
    }
    let mut seen = Vec::new();
    let (_, _, body) = poll(&client, &base, "topic=k/a&since=0&limit=8&timeout=1").await;
    seen.extend(ids(&body));
    let mut next = body["next"].as_u64().unwrap();
    server.kill9();
    // The client retries from its cursor until the server is back.
    let server = BinServer::spawn_on(addr, &dir, &[]).await;
    for i in 20..30 {
        acked.push(publish_one(&client, &base, "k/a", json!(i)).await);
    }
    let deadline = Instant::now() + PATIENCE;
    while seen.len() < acked.len() {
        assert!(
            Instant::now() < deadline,
            "saw {} of {}",
            seen.len(),
            acked.len()
        );
        let (_, _, body) = poll(
            &client,
            &base,
            &format!("topic=k/a&since={next}&limit=8&timeout=1"),
        )
        .await;
        seen.extend(ids(&body));
        next = body["next"].as_u64().unwrap();
    }
    assert_eq!(seen, acked);
    drop(server);
}

#[tokio::test]
async fn cross_origin_polls_are_allowed_only_for_configured_origins() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.allowed_origins = vec!["http://dash.example".into()]
    })
    .await;
    let client = reqwest::Client::new();
    let get = |origin: &'static str| {
        client
            .get(server.url("/v1/poll?topic=c&timeout=0"))
            .header("origin", origin)
            .send()
    };
    let r = get("http://dash.example").await.unwrap();
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "http://dash.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let vary: Vec<_> = h
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(vary.contains(&"Origin"), "{vary:?}");
    assert!(
        vary.iter().any(|v| v.contains("Accept-Encoding")),
        "{vary:?}"
    );
    let r = get("http://evil.example").await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    server.stop().await;
}
