//! Dashboards' first paint: `start=latest`, `start_time`, and `GET /v1/latest`, on every
//! transport, against the real server on a loopback port with real clients (reqwest,
//! eventsource-stream, tokio-tungstenite).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{get_json, ids, publish_one, read_ids, TestServer, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tidewire::clock::Clock;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Publishes `(topic, n)` in order; returns the ids.
async fn publish_all(client: &reqwest::Client, base: &str, events: &[&str]) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, t) in events.iter().enumerate() {
        out.push(publish_one(client, base, t, json!(i)).await);
    }
    out
}

/// An error answer: its status and the contract's error code.
async fn error_of(r: reqwest::RequestBuilder) -> (u16, String) {
    let resp = r.timeout(PATIENCE).send().await.expect("request");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message: {body}"
    );
    (status, code)
}

async fn ws_connect(addr: std::net::SocketAddr, query: &str) -> Ws {
    let (ws, _) = timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws{query}")),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    ws
}

/// The next JSON frame (pings skipped).
async fn ws_recv(ws: &mut Ws) -> Value {
    loop {
        let m = timeout(PATIENCE, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).expect("JSON frame");
        }
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

#[tokio::test]
async fn sse_start_latest_sends_each_matching_topics_newest_event_then_live_events() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    // ids 1..=6
    publish_all(
        &client,
        &base,
        &["s/a", "s/b", "s/a", "other", "s/c", "s/b"],
    )
    .await;
    let mut stream = common::sse(&server.url("/v1/sse?topic=s/*&start=latest"), None).await;
    assert_eq!(
        read_ids(&mut stream, 3).await,
        vec![3, 5, 6],
        "s/a@3, s/c@5, s/b@6"
    );
    publish_one(&client, &base, "other", json!(0)).await;
    let live = publish_one(&client, &base, "s/a", json!(1)).await;
    assert_eq!(read_ids(&mut stream, 1).await, vec![live]);
    server.stop().await;
}

#[tokio::test]
async fn sse_start_time_sends_every_event_at_or_after_the_time_then_live_events() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let c2 = clock.clone();
    let server = TestServer::start_with(tmp.path(), move |c| c.clock = c2).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["a", "b", "a"]).await;
    // On sled the server's clock jumps an hour. On JetStream the stream leader's clock dates
    // events and the hook moves nothing: the pause puts the next events in a later
    // millisecond.
    clock.step(3_600_000);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = publish_all(&client, &base, &["b", "a"]).await;
    let events = common::poll_all(&client, &base, "**").await;
    let t4 = events[3]["time"].as_u64().expect("time");
    let apart = match common::backend() {
        common::Backend::Sled => 3_500_000,
        common::Backend::Nats => 1,
    };
    assert!(t4 >= events[2]["time"].as_u64().unwrap() + apart);
    let mut expected = later;
    for start in [t4.to_string(), rfc3339(t4)] {
        let url = server.url(&format!(
            "/v1/sse?topic=**&start_time={}",
            urlencode(&start)
        ));
        let mut stream = common::sse(&url, None).await;
        assert_eq!(
            read_ids(&mut stream, expected.len()).await,
            expected,
            "start_time={start}"
        );
        let live = publish_one(&client, &base, "a", json!("live")).await;
        assert_eq!(read_ids(&mut stream, 1).await, vec![live]);
        expected.push(live);
    }
    server.stop().await;
}

fn rfc3339(ms: u64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("time");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn a_cursor_wins_over_both_start_options_and_two_starts_are_a_400() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["a", "a", "a", "b"]).await;
    // An EventSource reconnecting with its Last-Event-ID resumes, no snapshot again.
    let mut stream = common::sse(&server.url("/v1/sse?topic=**&start=latest"), Some(1)).await;
    assert_eq!(read_ids(&mut stream, 3).await, vec![2, 3, 4]);
    let body = get_json(
        &client,
        &server.url("/v1/poll?topic=**&start=latest&since=2&timeout=0"),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![3, 4]);
    let body = get_json(
        &client,
        &server.url("/v1/poll?topic=**&start_time=0&since=3&timeout=0"),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![4]);
    for path in [
        "/v1/sse?topic=a&start=latest&start_time=0",
        "/v1/poll?topic=a&start=latest&start_time=2026-01-01T00:00:00Z",
        "/v1/sse?topic=a&start=earliest",
        "/v1/poll?topic=a&start_time=yesterday",
        "/v1/ws?topic=a&start=latest&start_time=1",
    ] {
        // A WebSocket handshake, refused before the upgrade (harmless on the other routes).
        let req = client
            .get(server.url(path))
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        let (status, code) = error_of(req).await;
        assert_eq!((status, code.as_str()), (400, "invalid_start"), "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn poll_start_latest_then_next_continues_without_a_gap_or_a_repeat() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["a", "b", "c", "a", "b", "x"]).await;
    let body = get_json(
        &client,
        &server.url("/v1/poll?topic=a&topic=b&topic=c&start=latest&timeout=0"),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![3, 4, 5]);
    let next = body["next"].as_u64().unwrap();
    assert_eq!(next, 6);
    let live = publish_one(&client, &base, "c", json!("new")).await;
    let body = get_json(
        &client,
        &server.url(&format!(
            "/v1/poll?topic=a&topic=b&topic=c&since={next}&timeout=5"
        )),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![live]);
    // A snapshot larger than `limit` goes on in the next poll: nothing of it is missed.
    let body = get_json(
        &client,
        &server.url("/v1/poll?topic=a&topic=b&topic=c&start=latest&timeout=0&limit=1"),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![4]);
    let since = body["next"].as_u64().unwrap();
    let body = get_json(
        &client,
        &server.url(&format!(
            "/v1/poll?topic=a&topic=b&topic=c&since={since}&timeout=0"
        )),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![5, live]);
    let t = get_json(&client, &server.url("/v1/latest/x")).await["time"]
        .as_u64()
        .unwrap();
    let body = get_json(
        &client,
        &server.url(&format!("/v1/poll?topic=**&start_time={}&timeout=0", t + 1)),
    )
    .await;
    assert_eq!(
        ids(body["events"].as_array().unwrap()),
        vec![live],
        "only what is newer"
    );
    server.stop().await;
}

#[tokio::test]
async fn websocket_start_latest_in_the_query_and_start_time_in_the_subscribe_op() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["s/a", "s/b", "s/a", "t"]).await;
    let mut ws = ws_connect(server.addr, "?topic=s/*&start=latest").await;
    let got: Vec<u64> = vec![
        ws_recv(&mut ws).await["id"].as_u64().unwrap(),
        ws_recv(&mut ws).await["id"].as_u64().unwrap(),
    ];
    assert_eq!(got, vec![2, 3]);
    let live = publish_one(&client, &base, "s/b", json!("live")).await;
    assert_eq!(ws_recv(&mut ws).await["id"].as_u64(), Some(live));
    // An op with a start on a socket that holds patterns already: refused, socket open.
    ws_send(
        &mut ws,
        json!({"op":"subscribe","topics":["t"],"start":"latest","ref":1}),
    )
    .await;
    let e = ws_recv(&mut ws).await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_start")),
        "{e}"
    );
    assert_eq!(e["ref"], 1);
    drop(ws);

    let t3 = common::poll_all(&client, &base, "**").await[2]["time"]
        .as_u64()
        .unwrap();
    let mut ws = ws_connect(server.addr, "").await;
    ws_send(
        &mut ws,
        json!({"op":"subscribe","topics":["s/**"],"start_time":t3,"ref":"a"}),
    )
    .await;
    assert_eq!(ws_recv(&mut ws).await["op"], "ack");
    let mut got = Vec::new();
    while got.last() != Some(&live) {
        got.push(ws_recv(&mut ws).await["id"].as_u64().unwrap());
    }
    // Events 1..=2 may share event 3's millisecond: every one from the first at or after
    // that time is delivered, in order.
    assert!(got.ends_with(&[3, live]), "{got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    ws_send(
        &mut ws,
        json!({"op":"subscribe","topics":["x"],"start":"soon","ref":"b"}),
    )
    .await;
    assert_eq!(ws_recv(&mut ws).await["code"], "invalid_start");
    server.stop().await;
}

#[tokio::test]
async fn latest_of_one_topic_has_an_etag_a_304_a_msgpack_form_and_a_404() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["room/1", "room/2", "room/1"]).await;
    let resp = client
        .get(server.url("/v1/latest/room/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"3\"");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let env: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            env["id"].as_u64(),
            env["topic"].as_str(),
            env["data"].as_u64()
        ),
        (Some(3), Some("room/1"), Some(2))
    );
    let resp = client
        .get(server.url("/v1/latest/room/1"))
        .header("if-none-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"], "\"3\"");
    let resp = client
        .get(server.url("/v1/latest/room/1"))
        .header("if-none-match", "\"2\"")
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/msgpack");
    let env: Value = rmp_serde::from_slice(&resp.bytes().await.unwrap()).expect("msgpack");
    assert_eq!(env["id"], 3);
    assert_eq!(
        error_of(client.get(server.url("/v1/latest/room/9"))).await,
        (404, "no_event".into())
    );
    assert_eq!(
        error_of(client.get(server.url("/v1/latest/bad%20topic")))
            .await
            .0,
        422
    );

    let body = get_json(&client, &server.url("/v1/latest?topic=room/*")).await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![2, 3]);
    assert_eq!(
        (body["next"].as_u64(), body["truncated"].as_bool()),
        (Some(3), Some(false))
    );
    let body = get_json(&client, &server.url("/v1/latest?topic=room/*&limit=1")).await;
    assert_eq!(
        ids(body["events"].as_array().unwrap()),
        vec![3],
        "room/1 comes first by name"
    );
    assert_eq!(body["truncated"], true);
    assert_eq!(
        error_of(client.get(server.url("/v1/latest"))).await,
        (400, "bad_request".into())
    );
    assert_eq!(
        error_of(client.get(server.url("/v1/latest?topic=a&limit=0"))).await,
        (400, "bad_request".into())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_snapshot_holds_only_topics_the_token_may_read() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    const SECRET: &str = "tidewire-start-tests-secret-0123456789abcdef";
    let token = |subscribe: &[&str]| {
        let claims = json!({
            "sub": "dash",
            "exp": common::auth::now() + 60,
            "tidewire": {"publish": ["**"], "subscribe": subscribe},
        });
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(tidewire::config::Secret::new(SECRET));
    })
    .await;
    let admin = token(&["**"]);
    let client = reqwest::Client::new();
    for t in ["public/a", "secret/b", "public/c"] {
        let r = client
            .post(server.url(&format!("/v1/topics/{t}/events")))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(r#"{"data":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let reader = token(&["public/**"]);
    let body: Value = client
        .get(server.url("/v1/latest?topic=public/**"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![1, 3]);
    for path in [
        "/v1/latest?topic=**",
        "/v1/latest/secret/b",
        "/v1/sse?topic=**&start=latest",
        "/v1/poll?topic=secret/*&start=latest",
    ] {
        let (status, code) = error_of(client.get(server.url(path)).bearer_auth(&reader)).await;
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{path}");
    }
    let body: Value = client
        .get(server.url("/v1/poll?topic=public/*&start=latest&timeout=0"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![1, 3]);
    server.stop().await;
}

#[tokio::test]
async fn after_retention_and_a_restart_an_expired_topic_has_no_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["a", "gone", "a", "b"]).await;
    server.stop().await;
    common::retain_after(tmp.path(), 2).await;
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    assert_eq!(
        error_of(client.get(server.url("/v1/latest/gone"))).await,
        (404, "no_event".into())
    );
    let body = get_json(&client, &server.url("/v1/latest?topic=**")).await;
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![3, 4]);
    let mut stream = common::sse(&server.url("/v1/sse?topic=**&start=latest"), None).await;
    assert_eq!(read_ids(&mut stream, 2).await, vec![3, 4]);
    let live = publish_one(&client, &base, "gone", json!("back")).await;
    assert_eq!(read_ids(&mut stream, 1).await, vec![live]);
    // A time start before everything retained says that retention took events first.
    let body = get_json(
        &client,
        &server.url("/v1/poll?topic=**&start_time=0&timeout=0"),
    )
    .await;
    assert_eq!(body["gap"], json!({"requested": 0, "oldest": 3}), "{body}");
    assert_eq!(ids(body["events"].as_array().unwrap()), vec![3, 4, live]);
    server.stop().await;
}

#[tokio::test]
async fn the_time_of_events_never_goes_back_when_the_clock_steps_back() {
    // On sled the writer holds time still while its clock is behind; on JetStream the stream
    // leader's timestamp dates events, so the gateway's stepped clock dates nothing.
    let tmp = tempfile::tempdir().unwrap();
    let clock = Clock::system();
    let c2 = clock.clone();
    let server = TestServer::start_with(tmp.path(), move |c| c.clock = c2.clone()).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    publish_all(&client, &base, &["a", "b"]).await;
    clock.step(-3_600_000);
    publish_all(&client, &base, &["a", "b"]).await;
    server.stop().await;
    // Across a restart too: the next commit is not dated before the stored ones.
    let c3 = clock.clone();
    let server = TestServer::start_with(tmp.path(), move |c| c.clock = c3).await;
    let base = server.url("");
    publish_all(&client, &base, &["a"]).await;
    let events = common::poll_all(&client, &base, "**").await;
    let times: Vec<u64> = events.iter().map(|e| e["time"].as_u64().unwrap()).collect();
    assert_eq!(times.len(), 5);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let now = Clock::system().now_ms();
    assert!(
        times.iter().all(|t| t.abs_diff(now) < 600_000),
        "dated an hour back: {times:?} (now {now})"
    );
    // So a time start is one clean cut: from the second event's time, events 2..=5.
    let body = get_json(
        &client,
        &server.url(&format!(
            "/v1/poll?topic=**&start_time={}&timeout=0",
            times[1]
        )),
    )
    .await;
    let got = ids(body["events"].as_array().unwrap());
    assert!(got.ends_with(&[2, 3, 4, 5]), "{got:?}");
    server.stop().await;
}

/// Checks a stream that began with a `start=latest` snapshot while `published` went on:
/// ids strictly increase, and for every topic what arrived is exactly the tail of what was
/// published to it (its newest as of the snapshot, then every later one): nothing between
/// the snapshot and live was missed or repeated.
fn assert_seamless(got: &[Value], published: &[(u64, String)]) {
    let ids = ids(got);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids go back: {ids:?}");
    let mut per_topic: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (id, t) in published {
        per_topic.entry(t).or_default().push(*id);
    }
    let mut seen: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in got {
        seen.entry(e["topic"].as_str().unwrap())
            .or_default()
            .push(e["id"].as_u64().unwrap());
    }
    for (t, all) in per_topic {
        let s = seen.get(t).unwrap_or_else(|| panic!("topic {t} missing"));
        assert!(all.ends_with(s), "{t}: got {s:?} of {all:?}");
    }
}

#[tokio::test]
async fn the_seam_under_concurrent_publishing_delivers_every_event_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let topics: Vec<String> = (0..12).map(|i| format!("dash/{i}")).collect();
    const N: usize = 600;
    let publisher = {
        let base = base.clone();
        let topics = topics.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut out = Vec::new();
            for i in 0..N {
                let t = &topics[(i * 7) % topics.len()];
                out.push((publish_one(&client, &base, t, json!(i)).await, t.clone()));
            }
            out
        })
    };
    // Wait until a third is in, then open every transport while publishing goes on.
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get_json(&client, &server.url("/v1/topics")).await["topics"]
        .as_array()
        .map_or(0, |t| {
            t.iter()
                .map(|t| t["count"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        < (N / 3) as u64
    {
        assert!(tokio::time::Instant::now() < deadline, "publishing stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut sse = common::sse(&server.url("/v1/sse?topic=dash/*&start=latest"), None).await;
    let mut ws = ws_connect(server.addr, "?topic=dash/**&start=latest").await;
    let first_poll = get_json(
        &client,
        &server.url("/v1/poll?topic=dash/*&start=latest&timeout=0&limit=5"),
    )
    .await;
    let published = publisher.await.expect("publisher");
    let last = published.last().unwrap().0;

    let mut got = Vec::new();
    while got.last().and_then(|e: &Value| e["id"].as_u64()) != Some(last) {
        let ev = common::next_event(&mut sse).await;
        got.push(serde_json::from_str::<Value>(&ev.data).unwrap());
    }
    assert_seamless(&got, &published);

    let mut got = Vec::new();
    while got.last().and_then(|e: &Value| e["id"].as_u64()) != Some(last) {
        got.push(ws_recv(&mut ws).await);
    }
    assert_seamless(&got, &published);

    // Long-poll, following `next` from a snapshot cut at 5 events.
    let mut got: Vec<Value> = first_poll["events"].as_array().unwrap().clone();
    let mut next = first_poll["next"].as_u64().unwrap();
    while got.last().and_then(|e: &Value| e["id"].as_u64()) != Some(last) {
        let body = get_json(
            &client,
            &server.url(&format!("/v1/poll?topic=dash/*&since={next}&timeout=5")),
        )
        .await;
        got.extend(body["events"].as_array().unwrap().iter().cloned());
        next = body["next"].as_u64().unwrap();
    }
    // A next inside the snapshot re-reads from there: still each topic's tail, in order.
    assert_seamless(&got, &published);
    let cut = first_poll["next"].as_u64().unwrap();
    let seen = ids(&got);
    for (id, _) in published.iter().filter(|(id, _)| *id > cut) {
        assert!(seen.contains(id), "poll missed {id}");
    }
    server.stop().await;
}
