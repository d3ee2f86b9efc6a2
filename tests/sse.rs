//! Server-Sent Events (`GET /v1/sse`): framing, headers, heartbeats, patterns, cursors,
//! slow subscribers and the gap signal. Real server, real sled in a temp dir, independent
//! clients (reqwest + eventsource-stream, or raw TCP).
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// Publishes a JSON batch (array of envelopes) to `topic`; returns `(first_id, last_id)`.
async fn publish_batch(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    envelopes: Vec<Value>,
) -> (u64, u64) {
    let n = envelopes.len() as u64;
    let (status, body) = post(
        client,
        &format!("{base}/v1/topics/{topic}/events"),
        "application/json",
        Value::Array(envelopes).to_string(),
    )
    .await;
    assert_eq!(status, 201, "publish refused: {body}");
    let first = body["first_id"].as_u64().expect("first_id");
    let last = body["last_id"].as_u64().expect("last_id");
    assert_eq!(last - first + 1, n, "batch ids are not contiguous: {body}");
    (first, last)
}

/// Publishes one event with a `type` to `topic`; returns its id.
async fn publish_typed(
    client: &reqwest::Client,
    base: &str,
    topic: &str,
    event_type: &str,
    data: Value,
) -> u64 {
    publish_batch(
        client,
        base,
        topic,
        vec![json!({"type": event_type, "data": data})],
    )
    .await
    .0
}

/// Reads events until one with envelope id `until` arrives; returns the (id, topic) of each.
async fn read_until(
    stream: &mut (impl futures_util::Stream<Item = Result<eventsource_stream::Event, String>> + Unpin),
    until: u64,
) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    for _ in 0..100_000 {
        let ev = next_event(stream).await;
        let env: Value = serde_json::from_str(&ev.data).expect("data is JSON");
        let id = env["id"].as_u64().expect("envelope id");
        assert_eq!(ev.id, id.to_string(), "SSE id line and envelope id differ");
        seen.push((id, env["topic"].as_str().expect("topic").to_string()));
        if id >= until {
            return seen;
        }
    }
    panic!("never saw event {until}");
}

/// Sends a GET with reqwest and returns the status and JSON body (for refusals).
async fn get_json(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client.get(url).timeout(PATIENCE);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("GET");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts the contract's error body: `{"error": {"code": "<snake_case>", "message": "…"}}`.
fn assert_error_body(body: &Value, code: &str) {
    let err = &body["error"];
    assert_eq!(err["code"], code, "unexpected error body {body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message missing in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "error body has extra keys: {body}"
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Collects raw body bytes of a reqwest response until `done(text)` holds or [`PATIENCE`].
async fn read_raw_until(resp: reqwest::Response, done: impl Fn(&str) -> bool) -> String {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + PATIENCE;
    while !done(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .unwrap_or_else(|_| panic!("timed out; raw stream so far: {text:?}"))
            .expect("raw SSE stream ended")
            .expect("raw SSE stream error");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    text
}

/// An SSE request over a plain TCP socket: nothing reads it unless the test says so.
struct RawSse {
    stream: TcpStream,
    buf: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    /// Bytes still expected in the current chunk (+2 for its CRLF), when inside one.
    in_chunk: Option<usize>,
}

impl RawSse {
    /// Connects with a small receive buffer, sends the request and reads the response head.
    async fn open(addr: SocketAddr, path: &str, rcvbuf: u32) -> RawSse {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let mut stream = tokio::time::timeout(PATIENCE, socket.connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write request");
        let mut raw = RawSse {
            stream,
            buf: Vec::new(),
            body: Vec::new(),
            chunked: false,
            in_chunk: None,
        };
        let head_end = loop {
            if let Some(i) = find(&raw.buf, b"\r\n\r\n") {
                break i;
            }
            raw.fill().await;
        };
        let head = String::from_utf8(raw.buf[..head_end].to_vec()).expect("head is UTF-8");
        raw.buf.drain(..head_end + 4);
        assert!(head.starts_with("HTTP/1.1 200"), "SSE refused: {head}");
        raw.chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        raw
    }

    async fn fill(&mut self) {
        let mut tmp = [0u8; 16 * 1024];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut tmp))
            .await
            .expect("raw read timed out")
            .expect("raw read");
        assert!(n > 0, "server closed the raw SSE connection");
        self.buf.extend_from_slice(&tmp[..n]);
    }

    /// Moves decoded body bytes from `buf` to `body`.
    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.buf);
            return;
        }
        loop {
            match self.in_chunk {
                None => {
                    let Some(i) = find(&self.buf, b"\r\n") else {
                        return;
                    };
                    let line = std::str::from_utf8(&self.buf[..i]).expect("chunk size");
                    let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                        .expect("chunk size is hex");
                    assert!(size > 0, "the SSE body ended");
                    self.buf.drain(..i + 2);
                    self.in_chunk = Some(size + 2);
                }
                Some(left) => {
                    if self.buf.is_empty() {
                        return;
                    }
                    let take = left.min(self.buf.len());
                    let data_take = take.min(left.saturating_sub(2));
                    self.body.extend_from_slice(&self.buf[..data_take]);
                    self.buf.drain(..take);
                    self.in_chunk = if take == left {
                        None
                    } else {
                        Some(left - take)
                    };
                }
            }
        }
    }

    /// The next SSE block (text between blank lines), read with [`PATIENCE`].
    async fn next_block(&mut self) -> String {
        loop {
            self.decode();
            if let Some(i) = find(&self.body, b"\n\n") {
                let block = String::from_utf8(self.body[..i].to_vec()).expect("UTF-8 block");
                self.body.drain(..i + 2);
                return block;
            }
            self.fill().await;
        }
    }

    /// The next event block's fields (skips `retry:`-only and comment-only blocks).
    async fn next_event(&mut self) -> HashMap<String, String> {
        for _ in 0..1_000 {
            let block = self.next_block().await;
            let mut fields = HashMap::new();
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (k, v) = line.split_once(':').unwrap_or((line, ""));
                let v = v.strip_prefix(' ').unwrap_or(v);
                assert!(
                    fields.insert(k.to_string(), v.to_string()).is_none(),
                    "field {k} twice in one event: {block:?}"
                );
            }
            if fields.contains_key("data") {
                return fields;
            }
        }
        panic!("no event in 1000 blocks");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Live delivery and framing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn live_subscriber_receives_published_events_with_id_line_equal_to_envelope_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // History before subscribing is not delivered without a cursor.
    publish_one(&client, &base, "sensors/a", json!("before")).await;
    let mut sub = sse(&server.url("/v1/sse?topic=sensors/a"), None).await;
    let before = now_ms();
    let id = publish_one(&client, &base, "sensors/a", json!({"t": 21.5})).await;
    let after = now_ms();

    let ev = next_event(&mut sub).await;
    assert_eq!(ev.id, id.to_string());
    assert!(!ev.data.contains('\n'), "data spans lines: {:?}", ev.data);
    let env: Value = serde_json::from_str(&ev.data).expect("data is a JSON envelope");
    let obj = env.as_object().expect("envelope is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["data", "id", "time", "topic"],
        "untyped envelope keys"
    );
    assert_eq!(env["id"], id);
    assert_eq!(env["topic"], "sensors/a");
    assert_eq!(env["data"], json!({"t": 21.5}));
    let time = env["time"].as_u64().expect("time is Unix ms");
    assert!(
        time + 1_000 >= before && time <= after + 1_000,
        "time {time} not within [{before}, {after}]"
    );
    server.stop().await;
}

#[tokio::test]
async fn typed_events_carry_their_event_name_and_untyped_events_use_the_default_message() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let mut sub = sse(&server.url("/v1/sse?topic=sensors/a"), None).await;
    let typed = publish_typed(&client, &base, "sensors/a", "reading", json!(1)).await;
    let untyped = publish_one(&client, &base, "sensors/a", json!(2)).await;

    let ev = next_event(&mut sub).await;
    assert_eq!(ev.id, typed.to_string());
    assert_eq!(ev.event, "reading");
    let env: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(env["type"], "reading");

    let ev = next_event(&mut sub).await;
    assert_eq!(ev.id, untyped.to_string());
    assert_eq!(ev.event, "message");
    let env: Value = serde_json::from_str(&ev.data).unwrap();
    assert!(
        env.get("type").is_none(),
        "untyped envelope has a type: {env}"
    );
    server.stop().await;
}

#[tokio::test]
async fn raw_frames_are_id_then_event_only_when_typed_then_one_data_line() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let resp = client
        .get(server.url("/v1/sse?topic=raw/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let typed = publish_typed(&client, &base, "raw/t", "reading", json!({"v": "x"})).await;
    let untyped = publish_one(&client, &base, "raw/t", json!([1, 2])).await;
    let marker = format!("id: {untyped}\n");
    let text = read_raw_until(resp, |t| {
        t.find(&marker).is_some_and(|i| t[i..].contains("\n\n"))
    })
    .await;
    let blocks: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.is_empty() && !b.starts_with("retry:") && !b.starts_with(':'))
        .collect();
    assert_eq!(blocks.len(), 2, "unexpected frames: {text:?}");
    let lines: Vec<&str> = blocks[0].lines().collect();
    assert_eq!(lines.len(), 3, "typed frame: {:?}", blocks[0]);
    assert_eq!(lines[0], format!("id: {typed}"));
    assert_eq!(lines[1], "event: reading");
    assert!(
        lines[2].starts_with("data: {"),
        "typed frame: {:?}",
        blocks[0]
    );
    let lines: Vec<&str> = blocks[1].lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "untyped frame has no event line: {:?}",
        blocks[1]
    );
    assert_eq!(lines[0], format!("id: {untyped}"));
    let env: Value = serde_json::from_str(lines[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(env["data"], json!([1, 2]));
    server.stop().await;
}

#[tokio::test]
async fn stream_starts_with_a_retry_line_and_headers_that_stop_proxy_buffering() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let resp = client
        .get(server.url("/v1/sse?topic=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let ct = h["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    // Nothing is published: the first bytes are the retry line, on their own.
    let text = read_raw_until(resp, |t| t.contains("\n\n")).await;
    assert!(text.starts_with("retry: "), "stream starts with {text:?}");
    let first = text.lines().next().unwrap();
    let ms: u64 = first["retry: ".len()..]
        .trim()
        .parse()
        .expect("retry is milliseconds");
    assert_eq!(ms, tidewire::config::Config::default().sse_retry_ms);
    server.stop().await;
}

#[tokio::test]
async fn quiet_stream_gets_a_comment_heartbeat_at_the_configured_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |cfg| cfg.sse_heartbeat_secs = 1).await;
    let client = reqwest::Client::new();
    let resp = client
        .get(server.url("/v1/sse?topic=quiet"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let text = read_raw_until(resp, |t| t.lines().any(|l| l.starts_with(':'))).await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "first heartbeat after {waited:?}, configured 1 s"
    );
    assert!(
        !text.contains("data:"),
        "a quiet stream sent an event: {text:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_coming_while_the_stream_stays_quiet_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |cfg| {
        cfg.sse_heartbeat_secs = 1;
        cfg.sse_gzip = true;
    })
    .await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // Plain: this client does not offer gzip.
    let plain = reqwest::Client::builder().no_gzip().build().unwrap();
    let resp = plain
        .get(server.url("/v1/sse?topic=quiet"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("content-encoding"));
    // Not one heartbeat after the first quiet interval: one every interval.
    let text = read_raw_until(resp, |t| t.matches(":\n\n").count() >= 3).await;
    assert!(!text.contains("data:"), "{text:?}");
    // Gzip'd, each heartbeat reaches the client (here curl's zlib) as it is written, and an
    // event in between does not stop them.
    let mut curl = CurlStream::open(&server.url("/v1/sse?topic=quiet"), &[]);
    curl.until(":").await;
    let id = publish_one(&client, &base, "quiet", json!("between")).await;
    curl.until(&format!("id: {id}")).await;
    curl.until(":").await;
    curl.until(":").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Patterns
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn star_matches_exactly_one_segment_and_double_star_zero_or_more() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let mut star = sse(&server.url("/v1/sse?topic=sensors/*/temperature"), None).await;
    let mut double = sse(&server.url("/v1/sse?topic=sensors/**"), None).await;

    let mut ids = HashMap::new();
    for topic in [
        "sensors",
        "sensors/a/temperature",
        "sensors/temperature",
        "sensors/a/b/temperature",
        "sensors/a/humidity",
        "sensorsX/a",
        "other/sensors/a/temperature",
        "sensors/z/temperature", // the marker: both patterns match it, and it comes last
    ] {
        ids.insert(
            topic,
            publish_one(&client, &base, topic, json!(topic)).await,
        );
    }
    let marker = ids["sensors/z/temperature"];

    let got: Vec<String> = read_until(&mut star, marker)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(got, ["sensors/a/temperature", "sensors/z/temperature"]);

    let got: Vec<String> = read_until(&mut double, marker)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        got,
        [
            "sensors",
            "sensors/a/temperature",
            "sensors/temperature",
            "sensors/a/b/temperature",
            "sensors/a/humidity",
            "sensors/z/temperature",
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn pattern_history_replay_matches_the_same_topics_as_live_delivery() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for topic in [
        "sensors",
        "sensors/a/t",
        "sensorsX/a",
        "sensors/a/b/t",
        "x/y",
    ] {
        publish_one(&client, &base, topic, json!(topic)).await;
    }
    let mut double = sse(&server.url("/v1/sse?topic=sensors/**"), Some(0)).await;
    let mut star = sse(&server.url("/v1/sse?topic=sensors/*/t"), Some(0)).await;
    let marker = publish_one(&client, &base, "sensors/m/t", json!("m")).await;
    let got: Vec<String> = read_until(&mut double, marker)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        got,
        ["sensors", "sensors/a/t", "sensors/a/b/t", "sensors/m/t"]
    );
    let got: Vec<String> = read_until(&mut star, marker)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(got, ["sensors/a/t", "sensors/m/t"]);
    server.stop().await;
}

#[tokio::test]
async fn several_topic_params_form_one_stream_delivering_each_matching_event_once_in_id_order() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // `a/b` is matched by two of the patterns: it must still arrive once.
    let mut sub = sse(&server.url("/v1/sse?topic=a/b&topic=a/*&topic=c"), None).await;
    let mut expected = Vec::new();
    for topic in ["a/b", "c", "d", "a/x", "c/d", "a", "a/b", "c"] {
        let id = publish_one(&client, &base, topic, json!(topic)).await;
        if matches!(topic, "a/b" | "a/x" | "c") {
            expected.push((id, topic.to_string()));
        }
    }
    let last = expected.last().unwrap().0;
    let got = read_until(&mut sub, last).await;
    assert_eq!(got, expected);
    server.stop().await;
}

#[tokio::test]
async fn invalid_pattern_is_refused_with_422_and_the_contract_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let long = "a".repeat(201);
    for bad in [
        "a/**/b",
        "a%20b",
        "a//b",
        "/a",
        "a/",
        "a/b*",
        "",
        long.as_str(),
        "ok&topic=bad%21",
    ] {
        let (status, body) =
            get_json(&client, &server.url(&format!("/v1/sse?topic={bad}")), &[]).await;
        assert_eq!(status, 422, "pattern {bad:?}: {body}");
        assert_error_body(&body, "invalid_pattern");
    }
    server.stop().await;
}

#[tokio::test]
async fn subscription_without_a_topic_is_refused_with_400_and_the_contract_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for query in ["", "?", "?last_event_id=3", "?topics=a"] {
        let (status, body) = get_json(&client, &server.url(&format!("/v1/sse{query}")), &[]).await;
        assert_eq!(status, 400, "query {query:?}: {body}");
        assert_error_body(&body, "bad_request");
    }
    server.stop().await;
}

#[tokio::test]
async fn more_topic_params_than_the_configured_limit_are_refused_with_422() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |cfg| cfg.max_patterns = 3).await;
    let client = reqwest::Client::new();
    let (status, body) = get_json(
        &client,
        &server.url("/v1/sse?topic=a&topic=b&topic=c&topic=d"),
        &[],
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_error_body(&body, "too_many_patterns");
    let resp = client
        .get(server.url("/v1/sse?topic=a&topic=b&topic=c"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the limit itself is allowed");
    drop(resp);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cursor_zero_replays_from_the_oldest_event_then_continues_live() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let (first, last) = publish_batch(
        &client,
        &base,
        "c/z",
        (0..25).map(|i| json!({"data": i})).collect(),
    )
    .await;
    publish_one(&client, &base, "other", json!(0)).await;
    let mut sub = sse(&server.url("/v1/sse?topic=c/z"), Some(0)).await;
    let got = read_ids(&mut sub, 25).await;
    assert_eq!(got, (first..=last).collect::<Vec<_>>());
    let live = publish_one(&client, &base, "c/z", json!("live")).await;
    assert_eq!(read_ids(&mut sub, 1).await, [live]);
    server.stop().await;
}

/// Replays `pattern` from cursor 0 and checks the stream is exactly `expected`, then live.
async fn assert_replay(server: &TestServer, pattern: &str, expected: &[u64]) {
    let mut sub = sse(&server.url(&format!("/v1/sse?topic={pattern}")), Some(0)).await;
    let got = read_ids(&mut sub, expected.len()).await;
    assert_eq!(got, expected, "replay of {pattern}");
}

#[tokio::test]
async fn history_is_replayed_page_by_page_in_id_order_over_few_and_over_many_topics() {
    let tmp = tempfile::tempdir().unwrap();
    // A tiny page makes every replay take many steps.
    let server = TestServer::start_with(tmp.path(), |cfg| cfg.replay_page = 7).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // 80 topics under `many/` (more than a read merges index by index), interleaved with
    // topics the patterns must not match.
    let mut many = Vec::new();
    let mut few = Vec::new();
    let mut all = Vec::new();
    for round in 0..3 {
        for t in 0..80 {
            let id = publish_one(&client, &base, &format!("many/t{t}"), json!([round, t])).await;
            many.push(id);
            all.push(id);
            if t % 10 == 0 {
                let id = publish_one(&client, &base, "few/a", json!(t)).await;
                few.push(id);
                all.push(id);
                let id = publish_one(&client, &base, "manyX/t1", json!(t)).await;
                all.push(id);
            }
        }
    }
    assert_replay(&server, "many/*", &many).await;
    assert_replay(&server, "few/a", &few).await;
    let mut both: Vec<u64> = many.iter().chain(&few).copied().collect();
    both.sort_unstable();
    assert_replay(&server, "many/*&topic=few/**", &both).await;
    assert_replay(&server, "**", &all).await;
    server.stop().await;
}

#[tokio::test]
async fn query_cursor_resumes_after_the_given_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let (first, last) = publish_batch(
        &client,
        &base,
        "q",
        (0..10).map(|i| json!({"data": i})).collect(),
    )
    .await;
    let mut sub = sse(
        &server.url(&format!("/v1/sse?topic=q&last_event_id={}", first + 3)),
        None,
    )
    .await;
    let got = read_ids(&mut sub, (last - first - 3) as usize).await;
    assert_eq!(got, (first + 4..=last).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn last_event_id_header_wins_over_the_query_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    publish_batch(
        &client,
        &base,
        "h",
        (0..6).map(|i| json!({"data": i})).collect(),
    )
    .await;
    // Header says 4, query says 1: delivery starts at 5.
    let mut sub = sse(&server.url("/v1/sse?topic=h&last_event_id=1"), Some(4)).await;
    assert_eq!(read_ids(&mut sub, 2).await, [5, 6]);
    // An empty header counts as none: the query applies.
    let resp = client
        .get(server.url("/v1/sse?topic=h&last_event_id=3"))
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = read_raw_until(resp, |t| t.contains("id: 6\n")).await;
    let ids: Vec<&str> = text.lines().filter(|l| l.starts_with("id: ")).collect();
    assert_eq!(ids, ["id: 4", "id: 5", "id: 6"]);
    server.stop().await;
}

#[tokio::test]
async fn invalid_cursor_is_refused_with_400_and_the_contract_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for bad in ["abc", "-1", "1e3", "18446744073709551616", "0x10", "1.5"] {
        let (status, body) = get_json(
            &client,
            &server.url("/v1/sse?topic=a"),
            &[("last-event-id", bad)],
        )
        .await;
        assert_eq!(status, 400, "header cursor {bad:?}: {body}");
        assert_error_body(&body, "invalid_cursor");
        let (status, body) = get_json(
            &client,
            &server.url(&format!("/v1/sse?topic=a&last_event_id={bad}")),
            &[],
        )
        .await;
        assert_eq!(status, 400, "query cursor {bad:?}: {body}");
        assert_error_body(&body, "invalid_cursor");
    }
    // A bad header is refused even when the query holds a good cursor (the header wins).
    let (status, body) = get_json(
        &client,
        &server.url("/v1/sse?topic=a&last_event_id=1"),
        &[("last-event-id", "nope")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, "invalid_cursor");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Slow subscribers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_subscriber_falls_back_to_the_log_and_misses_nothing_while_fast_ones_keep_up() {
    const TOTAL: u64 = 5_000;
    const BATCH: u64 = 100;
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |cfg| {
        cfg.hub_capacity = 4;
        cfg.replay_page = 64;
    })
    .await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // ~10 MB of frames in all: far more than socket buffers and hyper's write buffer hold, so
    // the slow stream really stalls and its subscription must leave the live ring.
    let pad = "p".repeat(2_000);

    // The slow one: a raw socket with a tiny receive buffer that nobody reads for now.
    let mut slow = RawSse::open(server.addr, "/v1/sse?topic=load/**", 4096).await;
    // The fast one: an independent SSE client that reads as fast as it can.
    let mut fast = sse(&server.url("/v1/sse?topic=load/**"), None).await;
    let fast_task = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(TOTAL as usize);
        let deadline = Instant::now() + PATIENCE;
        while (ids.len() as u64) < TOTAL {
            assert!(Instant::now() < deadline, "fast subscriber fell behind");
            ids.extend(read_ids(&mut fast, 1).await);
        }
        ids
    });

    let mut published = Vec::with_capacity(TOTAL as usize);
    for b in 0..TOTAL / BATCH {
        let topic = format!("load/{}", b % 3);
        let envs = (0..BATCH)
            .map(|i| json!({"data": {"n": b * BATCH + i, "pad": pad}}))
            .collect();
        let (first, last) = publish_batch(&client, &base, &topic, envs).await;
        published.extend(first..=last);
    }
    let fast_ids = tokio::time::timeout(PATIENCE, fast_task)
        .await
        .expect("fast subscriber did not get everything in time")
        .expect("fast subscriber task");
    assert_eq!(
        fast_ids, published,
        "fast subscriber: missing, duplicated or out of order"
    );

    let lags_before = metric(&base, "tidewire_subscriber_lag_fallbacks_total").await;

    // Now the slow one reads: every event exactly once, in order, no gap signal.
    let mut slow_ids = Vec::with_capacity(TOTAL as usize);
    let deadline = Instant::now() + PATIENCE;
    while (slow_ids.len() as u64) < TOTAL {
        assert!(Instant::now() < deadline, "slow subscriber never caught up");
        let ev = slow.next_event().await;
        assert!(!ev.contains_key("event"), "unexpected event type in {ev:?}");
        let env: Value = serde_json::from_str(&ev["data"]).expect("JSON envelope");
        let id = env["id"].as_u64().unwrap();
        assert_eq!(ev["id"], id.to_string());
        let n = env["data"]["n"].as_u64().unwrap();
        assert_eq!(n, slow_ids.len() as u64, "payload out of order at id {id}");
        slow_ids.push(id);
    }
    assert_eq!(
        slow_ids, published,
        "slow subscriber: missing, duplicated or out of order"
    );

    let lags_after = metric(&base, "tidewire_subscriber_lag_fallbacks_total").await;
    assert!(
        lags_after > lags_before,
        "the slow subscriber never fell back to the log ({lags_before} -> {lags_after}): \
         it must have been buffered in memory instead"
    );
    // After the catch-up it is live again: a new event arrives promptly.
    let live = publish_one(&client, &base, "load/9", json!({"n": TOTAL})).await;
    let ev = slow.next_event().await;
    assert_eq!(ev["id"], live.to_string());
    drop(slow);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Gap
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cursor_older_than_retention_gets_one_gap_event_first_then_the_retained_events() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for i in 1..=10u64 {
        let topic = if i % 2 == 0 { "g/even" } else { "g/odd" };
        assert_eq!(publish_one(&client, &base, topic, json!(i)).await, i);
    }
    server.stop().await;
    retain_after(tmp.path(), 5).await;
    let server = TestServer::start(&tmp).await;
    let base = server.url("");

    let mut sub = sse(&server.url("/v1/sse?topic=g/*"), Some(2)).await;
    let gap = next_event(&mut sub).await;
    assert_eq!(gap.event, "gap");
    assert_eq!(gap.id, "5");
    let data: Value = serde_json::from_str(&gap.data).expect("gap data is JSON");
    assert_eq!(data, json!({"requested": 2, "oldest": 6}));
    assert_eq!(read_ids(&mut sub, 5).await, [6, 7, 8, 9, 10]);
    // The gap is said once: live delivery continues without another.
    let live = publish_one(&client, &base, "g/odd", json!(11)).await;
    let ev = next_event(&mut sub).await;
    assert_eq!(ev.event, "message");
    assert_eq!(ev.id, live.to_string());

    // By query cursor too (a browser's first connect).
    let mut sub = sse(&server.url("/v1/sse?topic=g/even&last_event_id=1"), None).await;
    let gap = next_event(&mut sub).await;
    assert_eq!(gap.event, "gap");
    let data: Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(data["requested"], 1);
    assert_eq!(read_ids(&mut sub, 2).await, [6, 8]);
    server.stop().await;
}

#[tokio::test]
async fn cursor_zero_or_at_or_after_the_removed_range_gets_no_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for i in 1..=10u64 {
        assert_eq!(publish_one(&client, &base, "n/a", json!(i)).await, i);
    }
    server.stop().await;
    retain_after(tmp.path(), 5).await;
    let server = TestServer::start(&tmp).await;

    // Cursor 0 means "from the oldest retained event": nothing it asked for is lost.
    for (cursor, expected) in [
        (7u64, vec![8u64, 9, 10]),
        (5, vec![6, 7, 8, 9, 10]),
        (0, vec![6, 7, 8, 9, 10]),
    ] {
        let mut sub = sse(&server.url("/v1/sse?topic=n/a"), Some(cursor)).await;
        // read_ids would fail on a gap frame: its data has no envelope id.
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let ev = next_event(&mut sub).await;
            assert_eq!(ev.event, "message", "cursor {cursor}: unexpected {ev:?}");
            got.push(ev.id.parse::<u64>().unwrap());
        }
        assert_eq!(got, expected, "cursor {cursor}");
    }
    server.stop().await;
}

/// Reads raw chunks of `resp` through a gzip decoder until the decoded text contains `want`.
async fn decode_until(
    resp: &mut reqwest::Response,
    gz: &mut flate2::write::GzDecoder<Vec<u8>>,
    want: &str,
) {
    use std::io::Write;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !String::from_utf8_lossy(gz.get_ref()).contains(want) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| {
                panic!("{want:?} never decoded: the compressed stream held it back")
            })
            .expect("read")
            .expect("stream ended");
        gz.write_all(&chunk).expect("valid gzip");
        gz.flush().expect("flush");
    }
}

#[tokio::test]
async fn gzip_stream_flushes_each_event_to_the_client_as_it_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.sse_gzip = true).await;
    let base = server.url("");
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let mut resp = raw
        .get(server.url("/v1/sse?topic=gz"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let mut gz = flate2::write::GzDecoder::new(Vec::new());
    decode_until(&mut resp, &mut gz, "retry:").await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let id = publish_one(&client, &base, "gz", json!(i)).await;
        // Decodable now, while the stream stays open: not buffered until a block fills.
        decode_until(&mut resp, &mut gz, &format!("id: {id}\n")).await;
    }
    // Without the option, a client that accepts gzip still gets plain text.
    let server2_dir = tempfile::tempdir().unwrap();
    let plain = TestServer::start(&server2_dir).await;
    let resp = raw
        .get(plain.url("/v1/sse?topic=gz"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("content-encoding"));
    drop(resp);
    plain.stop().await;
    server.stop().await;
}

/// `curl -N --compressed` on `url` (plus `extra` flags), its stdout read line by line as curl
/// writes it; the child is killed when dropped.
struct CurlStream {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl CurlStream {
    fn open(url: &str, extra: &[&str]) -> CurlStream {
        use std::io::BufRead;
        let mut child = std::process::Command::new("curl")
            .args(["-sS", "-N", "--compressed", "-i", "--max-time", "60"])
            .args(extra)
            .arg(url)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run curl (is it installed?)");
        let out = child.stdout.take().expect("curl's stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        CurlStream { child, lines }
    }

    /// Every line curl has written up to and including the first equal to `want`.
    async fn until(&mut self, want: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("curl never printed {want:?}; it printed {seen:?}"))
                .unwrap_or_else(|| panic!("curl ended before {want:?}; it printed {seen:?}"));
            let done = line == want;
            seen.push(line);
            if done {
                return seen;
            }
        }
    }
}

impl Drop for CurlStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn gzip_stream_decoded_by_curl_shows_each_event_before_the_next_is_published() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.sse_gzip = true).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    // HTTP/1.1 (the lean stream path) and HTTP/2 (hyper's).
    for (topic, extra) in [
        ("gz/h1", &[][..]),
        ("gz/h2", &["--http2-prior-knowledge"][..]),
    ] {
        let mut curl = CurlStream::open(&server.url(&format!("/v1/sse?topic={topic}")), extra);
        let head = curl.until("retry: 2000").await;
        assert!(
            head.iter()
                .any(|l| l.eq_ignore_ascii_case("content-encoding: gzip")),
            "not gzip'd: {head:?}"
        );
        for i in 0..3 {
            let id = publish_one(&client, &base, topic, json!({"n": i})).await;
            // zlib in curl decodes the event while the stream stays open, and before the next
            // one is even published: nothing waits for a compression block to fill.
            let lines = curl.until(&format!("id: {id}")).await;
            assert!(lines
                .iter()
                .all(|l| !l.starts_with("id: ") || l == &format!("id: {id}")));
            let data = curl.until("").await;
            assert!(
                data.iter()
                    .any(|l| l.starts_with("data: ") && l.contains(&format!("\"n\":{i}"))),
                "{data:?}"
            );
        }
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The connection an event stream runs on (src/http/h1_stream.rs: a fresh cleartext connection
// whose first request is `GET /v1/sse` over HTTP/1.1 is served without hyper's buffers).
// ---------------------------------------------------------------------------------------------

/// Reads from `sock` until `done` holds for everything read (or PATIENCE runs out).
async fn read_socket_until(sock: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + PATIENCE;
    while !done(&String::from_utf8_lossy(&got)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, sock.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("timed out; read so far: {}", String::from_utf8_lossy(&got)))
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Connects to the server and sends `request` (raw bytes: a head, perhaps a body).
async fn send_raw(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    sock
}

/// The body of a chunked HTTP/1.1 message, its chunk framing removed (`None` if malformed).
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size, 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

#[tokio::test]
async fn an_sse_head_sent_byte_by_byte_gets_a_chunked_stream_that_delivers_events() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let first = publish_one(&client, &base, "lean/a", json!({"n": 1})).await;

    let mut sock = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "GET /v1/sse?topic=lean/a&last_event_id=0 HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        server.addr
    );
    for b in head.as_bytes() {
        sock.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = read_socket_until(&mut sock, |s| s.contains(&format!("id: {first}\n"))).await;
    let (resp_head, body) = got.split_once("\r\n\r\n").expect("a response head");
    let lines: Vec<&str> = resp_head.split("\r\n").collect();
    assert_eq!(lines[0], "HTTP/1.1 200 OK", "{resp_head}");
    for want in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "transfer-encoding: chunked",
        "connection: close",
    ] {
        assert!(lines.contains(&want), "{want:?} missing from {resp_head}");
    }
    assert!(lines.iter().any(|l| l.starts_with("date: ")), "{resp_head}");
    // The chunk framing is well formed around the event: the first chunk is the retry line.
    let (size, rest) = body.split_once("\r\n").unwrap();
    let n = usize::from_str_radix(size, 16).expect("a chunk size");
    assert!(rest[..n].starts_with("retry: "), "{body:?}");
    assert_eq!(&rest[n..n + 2], "\r\n");

    // A live event arrives on the same connection.
    let second = publish_one(&client, &base, "lean/a", json!({"n": 2})).await;
    let live = read_socket_until(&mut sock, |s| s.contains(&format!("id: {second}\n"))).await;
    assert!(live.contains(r#""data":{"n":2}"#), "{live}");

    // A graceful shutdown ends the stream with the last chunk, then closes the connection:
    // everything sent is one well-formed chunked body.
    let stopping = tokio::spawn(server.stop());
    let rest = read_socket_until(&mut sock, |_| false).await;
    stopping.await.unwrap();
    let all = format!("{body}{live}{rest}");
    let stream = dechunk(&all).unwrap_or_else(|| panic!("not a chunked body: {all:?}"));
    assert!(stream.starts_with("retry: "), "{stream:?}");
    let ids: Vec<&str> = stream.lines().filter(|l| l.starts_with("id: ")).collect();
    assert_eq!(ids, [format!("id: {first}"), format!("id: {second}")]);
}

#[tokio::test]
async fn an_sse_error_answer_has_its_length_and_closes_the_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let mut sock = send_raw(server.addr, b"GET /v1/sse HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The server closes after the answer, so reading to the end terminates.
    let got = read_socket_until(&mut sock, |_| false).await;
    let (head, body) = got.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), length, "{got}");
    let err: Value = serde_json::from_str(body).expect("a JSON error body");
    assert_error_body(&err, "bad_request");
    server.stop().await;
}

#[tokio::test]
async fn requests_other_than_an_event_stream_keep_their_connection_alive() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let mut sock = TcpStream::connect(server.addr).await.unwrap();
    // Two requests on one connection, the second sent after the first is answered.
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_socket_until(&mut sock, |s| s.contains("\r\n\r\n") && s.ends_with('}')).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    let body = r#"{"data":{"n":1}}"#;
    sock.write_all(
        format!(
            "POST /v1/topics/lean/b/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let second =
        read_socket_until(&mut sock, |s| s.contains("\"last_id\"") && s.ends_with('}')).await;
    assert!(second.starts_with("HTTP/1.1 201 Created\r\n"), "{second}");
    assert!(!second.contains("connection: close"), "{second}");
    // An event stream requested after another request on the same connection still works.
    sock.write_all(b"GET /v1/sse?topic=lean/b&last_event_id=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let third = read_socket_until(&mut sock, |s| s.contains("\"data\":{\"n\":1}")).await;
    assert!(third.starts_with("HTTP/1.1 200 OK\r\n"), "{third}");
    server.stop().await;
}

#[tokio::test]
async fn an_http_1_0_event_stream_is_served_and_ends_with_the_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let id = publish_one(&client, &base, "lean/c", json!({"n": 1})).await;
    let mut sock = send_raw(
        server.addr,
        b"GET /v1/sse?topic=lean/c&last_event_id=0 HTTP/1.0\r\n\r\n",
    )
    .await;
    let got = read_socket_until(&mut sock, |s| s.contains(&format!("id: {id}\n"))).await;
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    // No chunked coding for HTTP/1.0: the body is the stream itself.
    assert!(body.starts_with("retry: "), "{body:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_sse_head_over_the_limit_gets_431_with_the_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.max_header_bytes = 4096).await;
    let resp = reqwest::Client::new()
        .get(server.url("/v1/sse?topic=lean/d"))
        .header("x-padding", "p".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    let err: Value = resp.json().await.unwrap();
    assert_error_body(&err, "headers_too_large");
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_closes_its_connection_is_gone_from_the_live_count() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    let gauge = r#"tidewire_live_subscribers{transport="sse"}"#;
    let mut socks = Vec::new();
    for _ in 0..3 {
        let mut sock = send_raw(
            server.addr,
            b"GET /v1/sse?topic=lean/e HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        read_socket_until(&mut sock, |s| s.contains("retry: ")).await;
        socks.push(sock);
    }
    assert_eq!(metric(&base, gauge).await, 3.0);
    // Closed while the stream is quiet: nothing is being written to notice it with.
    drop(socks.pop());
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, gauge).await != 2.0 {
        assert!(
            Instant::now() < deadline,
            "the closed subscriber is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(socks);
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, gauge).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "closed subscribers are still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
