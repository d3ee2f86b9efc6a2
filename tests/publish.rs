//! Publishing over HTTP: every body format, gzip, batches, limits and refusals.
mod common;

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- helpers of this file

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn msgpack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

/// A MessagePack envelope whose `data` is `bin`.
#[derive(serde::Serialize)]
struct BinEnvelope<'a> {
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
}

/// POSTs with arbitrary headers; returns status, the `Allow` header and the JSON body.
async fn post_with(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = client.post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends `method path` without a body; returns status, headers and JSON body.
async fn request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client.request(method, url).send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts the contract's error body `{"error":{"code":..,"message":..}}` with this status and code.
#[track_caller]
fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "unexpected status; body: {body}");
    let obj = body.as_object().expect("error body is a JSON object");
    assert_eq!(obj.len(), 1, "error body has only `error`: {body}");
    let err = body["error"].as_object().expect("`error` is an object");
    assert_eq!(err.len(), 2, "`error` has exactly code and message: {body}");
    assert_eq!(err["code"], want_code, "error code; body: {body}");
    let msg = err["message"].as_str().expect("message is a string");
    assert!(!msg.is_empty(), "message is not empty");
}

/// Asserts a publish receipt for `count` events starting at `first`.
#[track_caller]
fn assert_receipt(status: u16, body: &Value, first: u64, count: u64) {
    assert_eq!(status, 201, "publish refused: {body}");
    assert_eq!(
        *body,
        json!({"first_id": first, "last_id": first + count - 1, "count": count, "duplicates": 0})
    );
}

/// Asserts nothing was ever stored in `topic`: `GET /v1/topics/{topic}` answers 404.
async fn assert_topic_absent(client: &reqwest::Client, server: &TestServer, topic: &str) {
    let (status, _, body) = request(
        client,
        reqwest::Method::GET,
        &server.url(&format!("/v1/topics/{topic}")),
    )
    .await;
    assert_error(status, &body, 404, "unknown_topic");
}

/// Asserts the next id the server hands out is `want` (publishes one probe event).
async fn assert_next_id(client: &reqwest::Client, server: &TestServer, want: u64) {
    let id = publish_one(client, &server.url(""), "probe/next-id", json!("probe")).await;
    assert_eq!(
        id, want,
        "the next id shows something was (or was not) stored"
    );
}

/// One stored event read back over SSE: the SSE `event:` name and the JSON envelope.
struct Stored {
    event: String,
    env: Value,
}

/// Checks `topic` holds exactly `n` events (topic stats) and reads them back over SSE from
/// cursor 0, checking that each `id:` line matches its envelope.
async fn read_back(
    client: &reqwest::Client,
    server: &TestServer,
    topic: &str,
    n: usize,
) -> Vec<Stored> {
    let (status, _, stats) = request(
        client,
        reqwest::Method::GET,
        &server.url(&format!("/v1/topics/{topic}")),
    )
    .await;
    assert_eq!(status, 200, "topic {topic} has no stats: {stats}");
    assert_eq!(stats["count"], n as u64, "stored count of {topic}: {stats}");
    let mut stream = sse(
        &server.url(&format!("/v1/sse?topic={topic}&last_event_id=0")),
        None,
    )
    .await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ev = next_event(&mut stream).await;
        let env: Value = serde_json::from_str(&ev.data).expect("SSE data is a JSON envelope");
        assert_eq!(ev.id, env["id"].as_u64().expect("id").to_string());
        out.push(Stored {
            event: ev.event,
            env,
        });
    }
    out
}

/// Asserts an envelope is exactly `{id, topic, type?, time, data[, encoding]}` with `time`
/// between `before` and `after`.
#[track_caller]
fn assert_envelope(
    got: &Stored,
    id: u64,
    topic: &str,
    event_type: Option<&str>,
    data: Value,
    base64: bool,
    (before, after): (u64, u64),
) {
    let mut env = got.env.clone();
    let time = env["time"].as_u64().expect("time is a u64");
    assert!(
        (before..=after).contains(&time),
        "time {time} is the receive time (between {before} and {after})"
    );
    env["time"] = json!(0);
    let mut want = json!({"id": id, "topic": topic, "time": 0, "data": data});
    if let Some(t) = event_type {
        want["type"] = json!(t);
    }
    if base64 {
        want["encoding"] = json!("base64");
    }
    assert_eq!(env, want);
    assert_eq!(
        got.event,
        event_type.unwrap_or("message"),
        "SSE `event:` line is the type, absent (default `message`) when untyped"
    );
}

/// Asserts `got` holds exactly `want` (type, data) in order, with consecutive ids from `first`.
#[track_caller]
fn assert_stored(
    got: &[Stored],
    first: u64,
    topic: &str,
    want: &[(Option<&str>, Value)],
    window: (u64, u64),
) {
    assert_eq!(got.len(), want.len(), "stored events of {topic}");
    for (i, (t, data)) in want.iter().enumerate() {
        assert_envelope(
            &got[i],
            first + i as u64,
            topic,
            *t,
            data.clone(),
            false,
            window,
        );
    }
}

/// Publishes `body` with `content_type` to `topic` (gzipped when `gz`), asserts the receipt.
#[allow(clippy::too_many_arguments)]
async fn publish_format(
    client: &reqwest::Client,
    server: &TestServer,
    topic: &str,
    query: &str,
    content_type: &str,
    body: &[u8],
    gz: bool,
    first: u64,
    count: u64,
) {
    let url = server.url(&format!("/v1/topics/{topic}/events{query}"));
    let (status, receipt) = if gz {
        post_with(
            client,
            &url,
            &[("content-type", content_type), ("content-encoding", "gzip")],
            gzip(body),
        )
        .await
    } else {
        post(client, &url, content_type, body.to_vec()).await
    };
    assert_receipt(status, &receipt, first, count);
}

fn suffix(gz: bool) -> &'static str {
    if gz {
        "gzip"
    } else {
        "plain"
    }
}

// ---------------------------------------------------------------- formats

#[tokio::test]
async fn single_json_event_is_acknowledged_with_its_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/sensors/room-12/temperature/events"),
        "application/json",
        r#"{"data":{"t":21.5}}"#,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        body,
        json!({"first_id":1,"last_id":1,"count":1,"duplicates":0})
    );
    server.stop().await;
}

#[tokio::test]
async fn json_single_envelope_is_stored_with_type_time_and_data_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let mut next = 1;
    for gz in [false, true] {
        let typed = format!("json-one/{}/typed", suffix(gz));
        let untyped = format!("json-one/{}/untyped", suffix(gz));
        let before = now_ms();
        publish_format(
            &client,
            &server,
            &typed,
            "",
            "application/json",
            br#"{"data":{"t":21.5,"ok":true,"tags":["a","b"]},"type":"reading"}"#,
            gz,
            next,
            1,
        )
        .await;
        publish_format(
            &client,
            &server,
            &untyped,
            "",
            "application/json; charset=utf-8",
            br#"{"data":"just a string"}"#,
            gz,
            next + 1,
            1,
        )
        .await;
        let after = now_ms();
        let got = read_back(&client, &server, &typed, 1).await;
        assert_envelope(
            &got[0],
            next,
            &typed,
            Some("reading"),
            json!({"t":21.5,"ok":true,"tags":["a","b"]}),
            false,
            (before, after),
        );
        let got = read_back(&client, &server, &untyped, 1).await;
        assert!(
            got[0].env.get("type").is_none(),
            "untyped event has no `type` key"
        );
        assert_envelope(
            &got[0],
            next + 1,
            &untyped,
            None,
            json!("just a string"),
            false,
            (before, after),
        );
        next += 2;
    }
    server.stop().await;
}

#[tokio::test]
async fn json_array_is_one_batch_with_contiguous_ids_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let body = br#"[{"data":1},{"data":{"t":2},"type":"reading"},{"data":null},{"data":[3,"x"],"msg_id":"m-4"}]"#;
    let mut next = 1;
    for gz in [false, true] {
        let topic = format!("json-array/{}", suffix(gz));
        let before = now_ms();
        publish_format(
            &client,
            &server,
            &topic,
            "",
            "application/json",
            body,
            gz,
            next,
            4,
        )
        .await;
        let after = now_ms();
        let got = read_back(&client, &server, &topic, 4).await;
        let want = [
            (None, json!(1)),
            (Some("reading"), json!({"t":2})),
            (None, Value::Null),
            (None, json!([3, "x"])),
        ];
        assert_stored(&got, next, &topic, &want, (before, after));
        next += 4;
    }
    server.stop().await;
}

#[tokio::test]
async fn ndjson_lines_are_one_batch_and_blank_lines_are_skipped_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let body = b"{\"data\":{\"t\":1}}\n\n{\"data\":\"two\",\"type\":\"note\"}\r\n{\"data\":3}\n\n";
    let mut next = 1;
    for gz in [false, true] {
        let topic = format!("ndjson/{}", suffix(gz));
        let before = now_ms();
        publish_format(
            &client,
            &server,
            &topic,
            "",
            "application/x-ndjson",
            body,
            gz,
            next,
            3,
        )
        .await;
        let after = now_ms();
        let got = read_back(&client, &server, &topic, 3).await;
        let want = [
            (None, json!({"t":1})),
            (Some("note"), json!("two")),
            (None, json!(3)),
        ];
        assert_stored(&got, next, &topic, &want, (before, after));
        next += 3;
    }
    server.stop().await;
}

#[tokio::test]
async fn msgpack_map_and_array_are_accepted_under_all_three_content_types_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let map = msgpack(&json!({"data": {"t": 21.5, "ok": true, "n": -3}, "type": "reading"}));
    let array = msgpack(&json!([
        {"data": "first"},
        {"data": [1, 2, 3], "type": "list", "msg_id": "abc"},
    ]));
    let mut next = 1;
    for content_type in [
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
    ] {
        let name = content_type.trim_start_matches("application/");
        for gz in [false, true] {
            let map_topic = format!("mp/{name}/{}/map", suffix(gz));
            let array_topic = format!("mp/{name}/{}/array", suffix(gz));
            let before = now_ms();
            publish_format(
                &client,
                &server,
                &map_topic,
                "",
                content_type,
                &map,
                gz,
                next,
                1,
            )
            .await;
            publish_format(
                &client,
                &server,
                &array_topic,
                "",
                content_type,
                &array,
                gz,
                next + 1,
                2,
            )
            .await;
            let after = now_ms();
            let got = read_back(&client, &server, &map_topic, 1).await;
            assert_envelope(
                &got[0],
                next,
                &map_topic,
                Some("reading"),
                json!({"t": 21.5, "ok": true, "n": -3}),
                false,
                (before, after),
            );
            let got = read_back(&client, &server, &array_topic, 2).await;
            let want = [(None, json!("first")), (Some("list"), json!([1, 2, 3]))];
            assert_stored(&got, next + 1, &array_topic, &want, (before, after));
            next += 3;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn text_plain_body_becomes_one_string_event_with_the_query_type_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    // Quotes, a newline and non-ASCII must survive as one JSON string on one SSE data line.
    let text = "line one \"quoted\"\nline two: 21.5 °C";
    let mut next = 1;
    for gz in [false, true] {
        let typed = format!("text/{}/typed", suffix(gz));
        let untyped = format!("text/{}/untyped", suffix(gz));
        let before = now_ms();
        publish_format(
            &client,
            &server,
            &typed,
            "?type=log.line&msg_id=line-1",
            "text/plain; charset=utf-8",
            text.as_bytes(),
            gz,
            next,
            1,
        )
        .await;
        publish_format(
            &client,
            &server,
            &untyped,
            "",
            "text/plain",
            text.as_bytes(),
            gz,
            next + 1,
            1,
        )
        .await;
        let after = now_ms();
        let got = read_back(&client, &server, &typed, 1).await;
        assert_envelope(
            &got[0],
            next,
            &typed,
            Some("log.line"),
            json!(text),
            false,
            (before, after),
        );
        let got = read_back(&client, &server, &untyped, 1).await;
        assert_envelope(
            &got[0],
            next + 1,
            &untyped,
            None,
            json!(text),
            false,
            (before, after),
        );
        next += 2;
    }
    server.stop().await;
}

#[tokio::test]
async fn octet_stream_body_comes_back_as_base64_with_encoding_plain_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    // Every byte value, including ones that are not UTF-8.
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let mut next = 1;
    for gz in [false, true] {
        let typed = format!("octets/{}/typed", suffix(gz));
        let untyped = format!("octets/{}/untyped", suffix(gz));
        let before = now_ms();
        publish_format(
            &client,
            &server,
            &typed,
            "?type=frame",
            "application/octet-stream",
            &bytes,
            gz,
            next,
            1,
        )
        .await;
        publish_format(
            &client,
            &server,
            &untyped,
            "",
            "application/octet-stream",
            &bytes,
            gz,
            next + 1,
            1,
        )
        .await;
        let after = now_ms();
        let got = read_back(&client, &server, &typed, 1).await;
        assert_envelope(
            &got[0],
            next,
            &typed,
            Some("frame"),
            json!(b64(&bytes)),
            true,
            (before, after),
        );
        let got = read_back(&client, &server, &untyped, 1).await;
        assert_envelope(
            &got[0],
            next + 1,
            &untyped,
            None,
            json!(b64(&bytes)),
            true,
            (before, after),
        );
        next += 2;
    }
    server.stop().await;
}

#[tokio::test]
async fn msgpack_bin_data_comes_back_as_base64_with_encoding() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let raw = b"\x00\x01\xfe\xffnot utf-8 \xc3\x28";
    let body = rmp_serde::to_vec_named(&vec![
        BinEnvelope {
            data: raw,
            event_type: Some("blob"),
        },
        BinEnvelope {
            data: b"",
            event_type: None,
        },
    ])
    .unwrap();
    let before = now_ms();
    publish_format(
        &client,
        &server,
        "bin/mp",
        "",
        "application/msgpack",
        &body,
        false,
        1,
        2,
    )
    .await;
    let after = now_ms();
    let got = read_back(&client, &server, "bin/mp", 2).await;
    assert_envelope(
        &got[0],
        1,
        "bin/mp",
        Some("blob"),
        json!(b64(raw)),
        true,
        (before, after),
    );
    assert_envelope(&got[1], 2, "bin/mp", None, json!(""), true, (before, after));
    server.stop().await;
}

#[tokio::test]
async fn json_base64_data_round_trips_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let raw: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    let body = json!({"data": b64(&raw), "encoding": "base64", "type": "blob"}).to_string();
    let (status, receipt) = post(
        &client,
        &server.url("/v1/topics/bin/json/events"),
        "application/json",
        body,
    )
    .await;
    assert_receipt(status, &receipt, 1, 1);
    let got = read_back(&client, &server, "bin/json", 1).await;
    // What comes back is exactly what went in, plus id, topic and time.
    let mut env = got[0].env.clone();
    assert_eq!(env["data"], b64(&raw));
    assert_eq!(env["encoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(env["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, raw);
    env["time"] = json!(0);
    assert_eq!(
        env,
        json!({"id":1,"topic":"bin/json","type":"blob","time":0,"data":b64(&raw),"encoding":"base64"})
    );
    // The stored payload is the bytes, not their base64 text.
    let (_, _, stats) = request(
        &client,
        reqwest::Method::GET,
        &server.url("/v1/topics/bin/json"),
    )
    .await;
    assert_eq!(stats["bytes"], common::stat_bytes(raw.len() as u64));
    server.stop().await;
}

#[tokio::test]
async fn bare_formats_validate_their_type_and_msg_id_query_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let long_msg_id = "m".repeat(257);
    for query in [
        "?type=gap".to_string(),
        "?type=".to_string(),
        "?type=a%0Ab".to_string(),
        "?msg_id=".to_string(),
        format!("?msg_id={long_msg_id}"),
    ] {
        for ct in ["text/plain", "application/octet-stream"] {
            let (status, body) = post(
                &client,
                &server.url(&format!("/v1/topics/bare/q/events{query}")),
                ct,
                "hello",
            )
            .await;
            assert_error(status, &body, 422, "invalid_envelope");
        }
    }
    assert_topic_absent(&client, &server, "bare/q").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn envelope_naming_another_topic_than_the_path_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/a/events"),
        "application/json",
        r#"[{"data":1,"topic":"a"},{"data":2,"topic":"b"}]"#,
    )
    .await;
    assert_error(status, &body, 422, "invalid_envelope");
    assert_topic_absent(&client, &server, "a").await;
    assert_topic_absent(&client, &server, "b").await;
    // Naming the same topic as the path is fine.
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/a/events"),
        "application/json",
        r#"{"data":1,"topic":"a"}"#,
    )
    .await;
    assert_receipt(status, &body, 1, 1);
    server.stop().await;
}

// ---------------------------------------------------------------- multi-topic batch

#[tokio::test]
async fn multi_topic_batch_stores_each_envelope_in_its_topic_with_contiguous_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    publish_one(&client, &server.url(""), "warmup", json!(0)).await;
    let before = now_ms();
    let (status, receipt) = post(
        &client,
        &server.url("/v1/events"),
        "application/json",
        json!([
            {"topic": "gw/1/temp", "data": {"t": 20}},
            {"topic": "gw/2/temp", "data": {"t": 21}, "type": "reading"},
            {"topic": "gw/1/temp", "data": {"t": 22}},
            {"topic": "gw/1/hum", "data": 55},
        ])
        .to_string(),
    )
    .await;
    assert_receipt(status, &receipt, 2, 4);
    // The same over NDJSON + gzip: ids continue right after.
    let ndjson =
        b"{\"topic\":\"gw/2/temp\",\"data\":{\"t\":23}}\n{\"topic\":\"gw/3/x\",\"data\":\"y\"}\n";
    let (status, receipt) = post_with(
        &client,
        &server.url("/v1/events"),
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "gzip"),
        ],
        gzip(ndjson),
    )
    .await;
    assert_receipt(status, &receipt, 6, 2);
    let after = now_ms();
    let t = (before, after);

    let got = read_back(&client, &server, "gw/1/temp", 2).await;
    assert_envelope(&got[0], 2, "gw/1/temp", None, json!({"t":20}), false, t);
    assert_envelope(&got[1], 4, "gw/1/temp", None, json!({"t":22}), false, t);
    let got = read_back(&client, &server, "gw/2/temp", 2).await;
    assert_envelope(
        &got[0],
        3,
        "gw/2/temp",
        Some("reading"),
        json!({"t":21}),
        false,
        t,
    );
    assert_envelope(&got[1], 6, "gw/2/temp", None, json!({"t":23}), false, t);
    let got = read_back(&client, &server, "gw/1/hum", 1).await;
    assert_envelope(&got[0], 5, "gw/1/hum", None, json!(55), false, t);
    let got = read_back(&client, &server, "gw/3/x", 1).await;
    assert_envelope(&got[0], 7, "gw/3/x", None, json!("y"), false, t);
    server.stop().await;
}

#[tokio::test]
async fn multi_topic_batch_with_an_envelope_missing_its_topic_is_422_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &server.url("/v1/events"),
        "application/json",
        r#"[{"topic":"gw/a","data":1},{"data":2}]"#,
    )
    .await;
    assert_error(status, &body, 422, "invalid_envelope");
    // A single envelope without a topic, and bare formats (which cannot name one), too.
    let (status, body) = post(
        &client,
        &server.url("/v1/events"),
        "application/json",
        r#"{"data":2}"#,
    )
    .await;
    assert_error(status, &body, 422, "invalid_envelope");
    let (status, body) = post(&client, &server.url("/v1/events"), "text/plain", "hi").await;
    assert_error(status, &body, 422, "invalid_envelope");
    assert_topic_absent(&client, &server, "gw/a").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

// ---------------------------------------------------------------- batch atomicity

/// 100 envelopes for `topic`, the one at index 57 replaced by `bad`.
fn hundred_with_one_bad(topic: Option<&str>, bad: Value) -> Vec<Value> {
    (0..100)
        .map(|i| {
            if i == 57 {
                bad.clone()
            } else {
                let mut e = json!({"data": {"i": i}});
                if let Some(t) = topic {
                    e["topic"] = json!(t);
                }
                e
            }
        })
        .collect()
}

#[tokio::test]
async fn batch_with_one_reserved_gap_type_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let batch = hundred_with_one_bad(None, json!({"data": 57, "type": "gap"}));
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/atomic/json/events"),
        "application/json",
        serde_json::to_vec(&batch).unwrap(),
    )
    .await;
    assert_error(status, &body, 422, "invalid_envelope");
    // Same batch as MessagePack.
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/atomic/msgpack/events"),
        "application/msgpack",
        msgpack(&Value::Array(batch)),
    )
    .await;
    assert_error(status, &body, 422, "invalid_envelope");
    assert_topic_absent(&client, &server, "atomic/json").await;
    assert_topic_absent(&client, &server, "atomic/msgpack").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn multi_topic_batch_with_one_bad_topic_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let next = publish_one(&client, &server.url(""), "before", json!(1)).await + 1;
    for bad_topic in ["bad topic", "a//b", "a/*", &"x".repeat(201)] {
        let batch =
            hundred_with_one_bad(Some("atomic/gw"), json!({"topic": bad_topic, "data": 57}));
        let (status, body) = post(
            &client,
            &server.url("/v1/events"),
            "application/json",
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        assert_error(status, &body, 422, "invalid_envelope");
    }
    assert_topic_absent(&client, &server, "atomic/gw").await;
    assert_next_id(&client, &server, next).await;
    server.stop().await;
}

#[tokio::test]
async fn batch_with_one_envelope_missing_data_stores_nothing_in_any_format() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let batch = hundred_with_one_bad(None, json!({"type": "reading"}));
    let ndjson: String = batch.iter().map(|e| format!("{e}\n")).collect();
    let cases: [(&str, Vec<u8>); 3] = [
        ("application/json", serde_json::to_vec(&batch).unwrap()),
        ("application/x-ndjson", ndjson.into_bytes()),
        ("application/vnd.msgpack", msgpack(&Value::Array(batch))),
    ];
    for (ct, body) in cases {
        for gz in [false, true] {
            let url = server.url("/v1/topics/atomic/nodata/events");
            let (status, resp) = if gz {
                post_with(
                    &client,
                    &url,
                    &[("content-type", ct), ("content-encoding", "gzip")],
                    gzip(&body),
                )
                .await
            } else {
                post(&client, &url, ct, body.clone()).await
            };
            assert_error(status, &resp, 422, "invalid_envelope");
        }
    }
    assert_topic_absent(&client, &server, "atomic/nodata").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_base64_or_unknown_encoding_in_a_batch_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for bad in [
        json!({"data": "!!not base64!!", "encoding": "base64"}),
        json!({"data": 5, "encoding": "base64"}),
        json!({"data": "AAEC", "encoding": "hex"}),
    ] {
        let batch = hundred_with_one_bad(None, bad);
        let (status, body) = post(
            &client,
            &server.url("/v1/topics/atomic/b64/events"),
            "application/json",
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        assert_error(status, &body, 422, "invalid_envelope");
    }
    assert_topic_absent(&client, &server, "atomic/b64").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

// ---------------------------------------------------------------- limits

#[tokio::test]
async fn body_over_max_body_bytes_is_413_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.max_body_bytes = 1024).await;
    let client = reqwest::Client::new();
    let big = json!({"data": "x".repeat(2000)}).to_string();
    assert!(big.len() > 1024);
    // With a Content-Length.
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/big/events"),
        "application/json",
        big.clone(),
    )
    .await;
    assert_error(status, &body, 413, "payload_too_large");
    // Chunked, without a Content-Length: refused while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(256).map(|c| Ok(c.to_vec())).collect();
    let stream = futures_util::stream::iter(chunks);
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/big/events"),
        "application/json",
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_error(status, &body, 413, "payload_too_large");
    // A gzipped body is measured on the wire: over the limit compressed is refused too.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    assert!(gzip(&noise).len() > 1024, "incompressible");
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/big/events"),
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        gzip(&noise),
    )
    .await;
    assert_error(status, &body, 413, "payload_too_large");
    assert_topic_absent(&client, &server, "big").await;
    // Exactly at the limit is fine.
    let exact = format!(r#"{{"data":"{}"}}"#, "y".repeat(1024 - 11));
    assert_eq!(exact.len(), 1024);
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/big/events"),
        "application/json",
        exact,
    )
    .await;
    assert_receipt(status, &body, 1, 1);
    server.stop().await;
}

#[tokio::test]
async fn gzip_bomb_is_413_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    // 64 MiB of zeros inflate from about 64 KiB: far under max_body_bytes (1 MiB), far over
    // max_decompressed_bytes (16 MiB).
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());
    for ct in ["application/octet-stream", "application/json"] {
        let (status, body) = post_with(
            &client,
            &server.url("/v1/topics/bomb/events"),
            &[("content-type", ct), ("content-encoding", "gzip")],
            bomb.clone(),
        )
        .await;
        assert_error(status, &body, 413, "payload_too_large");
    }
    assert_topic_absent(&client, &server, "bomb").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn body_inflating_past_max_decompressed_bytes_is_413_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.max_decompressed_bytes = 2048).await;
    let client = reqwest::Client::new();
    let over: String = (0..60)
        .map(|i| {
            format!(
                "{}\n",
                json!({"data": {"reading": i, "pad": "p".repeat(30)}})
            )
        })
        .collect();
    assert!(over.len() > 2048);
    let compressed = gzip(over.as_bytes());
    assert!(compressed.len() < 2048);
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/inflate/events"),
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "gzip"),
        ],
        compressed,
    )
    .await;
    assert_error(status, &body, 413, "payload_too_large");
    assert_topic_absent(&client, &server, "inflate").await;
    // Under the limit once inflated: stored.
    let under: String = (0..10)
        .map(|i| format!("{}\n", json!({"data": {"reading": i}})))
        .collect();
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/inflate/events"),
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "gzip"),
        ],
        gzip(under.as_bytes()),
    )
    .await;
    assert_receipt(status, &body, 1, 10);
    server.stop().await;
}

/// One gzip member holding 1 MiB of zeros: about a kilobyte on the wire. Members repeated one
/// after another are one gzip body (RFC 1952), so a bomb of any compressed size is cheap to
/// build.
fn zeros_member() -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![0u8; 1 << 20]).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn gzip_bomb_larger_than_the_body_limit_is_cut_short_with_413_while_it_is_still_being_sent() {
    let tmp = tempfile::tempdir().unwrap();
    // Compressed bodies up to 64 KiB, inflated up to 1 MiB.
    let server = TestServer::start_with(tmp.path(), |c| {
        c.max_body_bytes = 64 << 10;
        c.max_decompressed_bytes = 1 << 20;
    })
    .await;
    let client = reqwest::Client::new();
    let member = zeros_member();
    // 512 MiB inflated from about half a megabyte: far more than the server would take as a
    // whole body, so the only way to refuse it for what it inflates to is to inflate it as it
    // arrives.
    let bomb = member.repeat(512);
    assert!(bomb.len() > 4 * (64 << 10), "bomb is {} bytes", bomb.len());
    // Raw HTTP/1.1, chunked: the client sends the first 8 KiB (8 members, 8 MiB inflated),
    // then stops sending, body unfinished, and waits for the answer.
    let mut sock = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/topics/bomb/events HTTP/1.1\r\nHost: {}\r\ncontent-type: application/octet-stream\r\n\
         content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
        server.addr
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let sent = 8 * member.len();
    for piece in bomb[..sent].chunks(1024) {
        sock.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        sock.write_all(piece).await.unwrap();
        sock.write_all(b"\r\n").await.unwrap();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (status, body) = loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: Option<usize> = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            });
            if length.is_some_and(|n| body.len() >= n) {
                let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                let body: Value = serde_json::from_str(&body[..length.unwrap()]).unwrap();
                break (status, body);
            }
        }
        let n = tokio::time::timeout_at(deadline, sock.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("no answer while the bomb was half sent; read so far: {text:?}")
            })
            .unwrap();
        assert!(n > 0, "connection closed without an answer: {text:?}");
        answer.extend_from_slice(&buf[..n]);
    };
    assert_error(status, &body, 413, "payload_too_large");
    // Refused for what it inflates to, not for its compressed size (it is still under it).
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("inflates beyond"), "{message}");
    assert!(sent < 64 << 10);
    drop(sock);
    // Sent whole, the same bomb is still refused (whichever limit it meets first).
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/bomb/events"),
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        bomb,
    )
    .await;
    assert_error(status, &body, 413, "payload_too_large");
    assert_topic_absent(&client, &server, "bomb").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn gzip_body_split_across_many_small_chunks_is_inflated_and_stored_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let ndjson: String = (0..200)
        .map(|i| {
            format!(
                "{}\n",
                json!({"data": {"reading": i, "pad": "x".repeat(i % 17)}})
            )
        })
        .collect();
    let zipped = gzip(ndjson.as_bytes());
    // Pieces of 1 to 7 bytes, each its own chunk on the wire: the gzip header, deflate blocks
    // and the trailer all arrive split.
    let mut pieces: Vec<Result<Vec<u8>, std::io::Error>> = Vec::new();
    let mut rest = &zipped[..];
    let mut size = 1;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        pieces.push(Ok(rest[..n].to_vec()));
        rest = &rest[n..];
        size = size % 7 + 1;
    }
    assert!(pieces.len() > 100, "{} pieces", pieces.len());
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/split/events"),
        &[
            ("content-type", "application/x-ndjson"),
            ("content-encoding", "gzip"),
        ],
        reqwest::Body::wrap_stream(futures_util::stream::iter(pieces)),
    )
    .await;
    assert_receipt(status, &body, 1, 200);
    let stored = poll_all(&client, &server.url(""), "split").await;
    assert_eq!(stored.len(), 200);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e["data"], json!({"reading": i, "pad": "x".repeat(i % 17)}));
    }
    server.stop().await;
}

#[tokio::test]
async fn truncated_gzip_body_is_400_malformed_body_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let whole = gzip(br#"[{"data":{"reading":1}},{"data":{"reading":2}}]"#);
    // Without the trailer's size, without the whole trailer, cut inside the deflate data, only
    // the header: every one ends before the gzip stream does.
    for cut in [4, 8, whole.len() / 2, whole.len() - 10] {
        let truncated = whole[..whole.len() - cut].to_vec();
        for chunked in [false, true] {
            let body = if chunked {
                let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                    truncated.chunks(3).map(|c| Ok(c.to_vec())).collect();
                reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
            } else {
                reqwest::Body::from(truncated.clone())
            };
            let (status, resp) = post_with(
                &client,
                &server.url("/v1/topics/truncated/events"),
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                body,
            )
            .await;
            assert_error(status, &resp, 400, "malformed_body");
        }
    }
    assert_topic_absent(&client, &server, "truncated").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn batch_over_max_batch_events_is_413_too_many_events_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.max_batch_events = 5).await;
    let client = reqwest::Client::new();
    let six: Vec<Value> = (0..6).map(|i| json!({"data": i})).collect();
    let ndjson: String = six.iter().map(|e| format!("{e}\n")).collect();
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/many/events"),
        "application/json",
        serde_json::to_vec(&six).unwrap(),
    )
    .await;
    assert_error(status, &body, 413, "too_many_events");
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/many/events"),
        "application/x-ndjson",
        ndjson,
    )
    .await;
    assert_error(status, &body, 413, "too_many_events");
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/many/events"),
        "application/msgpack",
        msgpack(&Value::Array(six.clone())),
    )
    .await;
    assert_error(status, &body, 413, "too_many_events");
    assert_topic_absent(&client, &server, "many").await;
    // Exactly the limit is fine.
    let (status, body) = post(
        &client,
        &server.url("/v1/topics/many/events"),
        "application/json",
        serde_json::to_vec(&six[..5]).unwrap(),
    )
    .await;
    assert_receipt(status, &body, 1, 5);
    server.stop().await;
}

#[tokio::test]
async fn topic_longer_than_200_bytes_is_422_and_200_bytes_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let too_long = format!("{}/{}", "a".repeat(100), "b".repeat(100));
    let just_right = format!("{}/{}", "a".repeat(99), "b".repeat(100));
    assert_eq!((too_long.len(), just_right.len()), (201, 200));
    let (status, body) = post(
        &client,
        &server.url(&format!("/v1/topics/{too_long}/events")),
        "application/json",
        r#"{"data":1}"#,
    )
    .await;
    assert_error(status, &body, 422, "invalid_topic");
    assert_next_id(&client, &server, 1).await;
    let (status, body) = post(
        &client,
        &server.url(&format!("/v1/topics/{just_right}/events")),
        "application/json",
        r#"{"data":1}"#,
    )
    .await;
    assert_receipt(status, &body, 2, 1);
    let got = read_back(&client, &server, &just_right, 1).await;
    assert_eq!(got[0].env["topic"], json!(just_right));
    server.stop().await;
}

#[tokio::test]
async fn topic_with_invalid_characters_or_empty_segments_is_422() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for topic in [
        "a%20b",
        "a:b",
        "a/*/c",
        "a/**",
        "a//b",
        "/a",
        "a/",
        "a$b",
        "caf%C3%A9",
    ] {
        let (status, body) = post(
            &client,
            &server.url(&format!("/v1/topics/{topic}/events")),
            "application/json",
            r#"{"data":1}"#,
        )
        .await;
        assert_error(status, &body, 422, "invalid_topic");
    }
    assert_next_id(&client, &server, 1).await;
    let (status, _, topics) =
        request(&client, reqwest::Method::GET, &server.url("/v1/topics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        topics["topics"].as_array().unwrap().len(),
        1,
        "only the probe topic exists: {topics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn missing_or_unsupported_content_type_is_415() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let url = server.url("/v1/topics/ct/events");
    let r = client
        .post(&url)
        .body(r#"{"data":1}"#)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_error(status, &body, 415, "unsupported_media_type");
    for ct in [
        "application/xml",
        "text/html",
        "application/cbor",
        "multipart/form-data; boundary=x",
        "",
    ] {
        let (status, body) = post(&client, &url, ct, r#"{"data":1}"#).await;
        assert_error(status, &body, 415, "unsupported_media_type");
    }
    assert_topic_absent(&client, &server, "ct").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn unsupported_content_encoding_is_415() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for enc in ["br", "deflate", "zstd", "gzip, br"] {
        let (status, body) = post_with(
            &client,
            &server.url("/v1/topics/enc/events"),
            &[
                ("content-type", "application/json"),
                ("content-encoding", enc),
            ],
            r#"{"data":1}"#,
        )
        .await;
        assert_error(status, &body, 415, "unsupported_encoding");
    }
    assert_topic_absent(&client, &server, "enc").await;
    // `identity` is no encoding at all.
    let (status, body) = post_with(
        &client,
        &server.url("/v1/topics/enc/events"),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "identity"),
        ],
        r#"{"data":1}"#,
    )
    .await;
    assert_receipt(status, &body, 1, 1);
    server.stop().await;
}

#[tokio::test]
async fn malformed_bodies_are_400_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("application/json", br#"{"data":"#.to_vec(), false),
        ("application/json", b"{data: 1}".to_vec(), false),
        ("application/json", br#"[{"data":1},"#.to_vec(), false),
        ("application/json", b"".to_vec(), false),
        (
            "application/x-ndjson",
            b"{\"data\":1}\n{oops}\n".to_vec(),
            false,
        ),
        ("application/msgpack", vec![0x81, 0xa4, b'd'], false),
        // 0xc1 is a byte MessagePack never uses: alone, and as the value of `data`.
        ("application/msgpack", vec![0xc1], false),
        (
            "application/msgpack",
            vec![0x81, 0xa4, b'd', b'a', b't', b'a', 0xc1],
            false,
        ),
        ("text/plain", vec![0xff, 0xfe, 0x00], false),
        // Not gzip at all, though it says so.
        ("application/json", br#"{"data":1}"#.to_vec(), true),
        // Malformed JSON inside valid gzip.
        ("application/json", gzip(br#"{"data":"#), true),
    ];
    for (ct, body, claims_gzip) in cases {
        let headers: Vec<(&str, &str)> = if claims_gzip {
            vec![("content-type", ct), ("content-encoding", "gzip")]
        } else {
            vec![("content-type", ct)]
        };
        let (status, resp) = post_with(
            &client,
            &server.url("/v1/topics/malformed/events"),
            &headers,
            body.clone(),
        )
        .await;
        assert_error(status, &resp, 400, "malformed_body");
    }
    assert_topic_absent(&client, &server, "malformed").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn well_formed_json_that_is_not_an_envelope_is_422() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for body in ["42", r#""text""#, "[]", r#"{"nodata":1}"#, "[1,2]", "null"] {
        let (status, resp) = post(
            &client,
            &server.url("/v1/topics/notenv/events"),
            "application/json",
            body,
        )
        .await;
        assert_error(status, &resp, 422, "invalid_envelope");
    }
    assert_topic_absent(&client, &server, "notenv").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn well_formed_ndjson_and_msgpack_that_are_not_envelopes_are_422() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("application/x-ndjson", b"{\"data\":1}\n[1]\n".to_vec()),
        ("application/x-ndjson", b"\"text\"\n".to_vec()),
        // MessagePack: a number, a map without `data`, an array holding a number.
        ("application/msgpack", vec![0x01]),
        (
            "application/msgpack",
            vec![0x81, 0xa4, b'n', b'o', b'p', b'e', 0x01],
        ),
        ("application/msgpack", vec![0x91, 0x01]),
    ];
    for (ct, body) in cases {
        let (status, resp) = post(
            &client,
            &server.url("/v1/topics/notenv/events"),
            ct,
            body.clone(),
        )
        .await;
        assert_error(status, &resp, 422, "invalid_envelope");
    }
    assert_topic_absent(&client, &server, "notenv").await;
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_route_is_404_with_error_body() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for path in ["/", "/nope", "/v1", "/v1/nope", "/v2/topics", "/v1/topicsX"] {
        let (status, _, body) = request(&client, reqwest::Method::GET, &server.url(path)).await;
        assert_error(status, &body, 404, "not_found");
    }
    let (status, body) = post(
        &client,
        &server.url("/v1/publish"),
        "application/json",
        r#"{"data":1}"#,
    )
    .await;
    assert_error(status, &body, 404, "not_found");
    assert_next_id(&client, &server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_method_is_405_with_allow_header() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    use reqwest::Method;
    let cases = [
        (Method::GET, "/v1/events", "POST"),
        (Method::PUT, "/v1/events", "POST"),
        (Method::POST, "/healthz", "GET"),
        (Method::POST, "/readyz", "GET"),
        (Method::DELETE, "/metrics", "GET"),
        (Method::POST, "/v1/sse", "GET"),
        (Method::POST, "/v1/topics", "GET"),
        (Method::PUT, "/v1/topics/a/events", "GET, POST"),
        (Method::DELETE, "/v1/topics/a", "GET, POST"),
        (Method::POST, "/v1/topics/a", "GET"),
    ];
    for (method, path, allow) in cases {
        let (status, headers, body) = request(&client, method.clone(), &server.url(path)).await;
        assert_error(status, &body, 405, "method_not_allowed");
        assert_eq!(
            headers.get("allow").map(|v| v.to_str().unwrap()),
            Some(allow),
            "{method} {path}"
        );
    }
    assert_topic_absent(&client, &server, "a").await;
    server.stop().await;
}

// ---------------------------------------------------------------- ids

#[tokio::test]
async fn ids_strictly_increase_across_interleaved_topics() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    let topics = ["t/a", "t/b", "t/c"];
    let mut ids = Vec::new();
    for round in 0..5 {
        for t in topics {
            ids.push(publish_one(&client, &base, t, json!(round)).await);
        }
        // A multi-topic batch in between takes the next contiguous ids.
        let (status, receipt) = post(
            &client,
            &server.url("/v1/events"),
            "application/json",
            json!([{"topic":"t/c","data":1},{"topic":"t/a","data":2}]).to_string(),
        )
        .await;
        assert_eq!(status, 201);
        ids.push(receipt["first_id"].as_u64().unwrap());
        ids.push(receipt["last_id"].as_u64().unwrap());
    }
    assert_eq!(
        ids,
        (1..=25).collect::<Vec<u64>>(),
        "one server-wide sequence"
    );
    // Concurrent publishers still get distinct, server-wide ids.
    let mut handles = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let base = base.clone();
        handles.push(tokio::spawn(async move {
            publish_one(&client, &base, topics[i % 3], json!(i)).await
        }));
    }
    let mut concurrent = Vec::new();
    for h in handles {
        concurrent.push(h.await.unwrap());
    }
    concurrent.sort_unstable();
    assert_eq!(concurrent, (26..=45).collect::<Vec<u64>>());
    // Each topic's replay is in strictly increasing id order.
    for t in topics {
        let (_, _, stats) = request(
            &client,
            reqwest::Method::GET,
            &server.url(&format!("/v1/topics/{t}")),
        )
        .await;
        let n = stats["count"].as_u64().unwrap() as usize;
        let got = read_back(&client, &server, t, n).await;
        let ids: Vec<u64> = got.iter().map(|s| s.env["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{t}: {ids:?}");
        assert_eq!(stats["last_id"], *ids.last().unwrap());
    }
    server.stop().await;
}

#[tokio::test]
async fn ids_continue_after_a_restart_on_the_same_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = TestServer::start_with(tmp.path(), |_| {}).await;
    let (status, receipt) = post(
        &client,
        &server.url("/v1/topics/r/a/events"),
        "application/json",
        json!([{"data":1},{"data":2},{"data":3}]).to_string(),
    )
    .await;
    assert_receipt(status, &receipt, 1, 3);
    assert_eq!(
        publish_one(&client, &server.url(""), "r/b", json!(4)).await,
        4
    );
    server.stop().await;

    let server = TestServer::start_with(tmp.path(), |_| {}).await;
    assert_eq!(
        publish_one(&client, &server.url(""), "r/c", json!(5)).await,
        5,
        "first id after a restart is the previous last + 1"
    );
    // And history survived, with stats intact.
    let (_, _, stats) = request(&client, reqwest::Method::GET, &server.url("/v1/topics/r/a")).await;
    assert_eq!(
        stats,
        json!({"topic":"r/a","first_id":1,"last_id":3,"count":3,"bytes":common::stat_bytes(3)})
    );
    server.stop().await;

    let server = TestServer::start_with(tmp.path(), |_| {}).await;
    let (status, receipt) = post(
        &client,
        &server.url("/v1/topics/r/a/events"),
        "application/x-ndjson",
        "{\"data\":6}\n{\"data\":7}\n",
    )
    .await;
    assert_receipt(status, &receipt, 6, 2);
    let got = read_back(&client, &server, "r/a", 5).await;
    let ids: Vec<u64> = got.iter().map(|s| s.env["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 6, 7]);
    server.stop().await;
}

// ---------------------------------------------------------------- topics API

#[tokio::test]
async fn topics_api_lists_exact_stats_filters_by_pattern_and_reports_one_topic() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let publish = |topic: &'static str, body: &'static str| {
        let client = client.clone();
        let url = server.url(&format!("/v1/topics/{topic}/events"));
        async move {
            let (status, r) = post(&client, &url, "application/json", body).await;
            assert_eq!(status, 201, "{r}");
        }
    };
    publish("sensors/a/temp", r#"{"data":{"t":21.5}}"#).await; // id 1, 10 bytes
    publish("other", r#"{"data":"hello"}"#).await; // id 2, 7 bytes
    publish("sensors/b/temp", r#"[{"data":1},{"data":22}]"#).await; // ids 3-4, 1+2 bytes
    publish("sensors/a/hum", r#"{"data":[1, 2]}"#).await; // id 5, 6 bytes
    publish("sensors/a/temp", r#"{"data":{"t":22}}"#).await; // id 6, 8 bytes
    let (status, _) = post(
        &client,
        &server.url("/v1/topics/sensors/a/bin/events"),
        "application/octet-stream",
        vec![0u8, 1, 2, 3, 4],
    )
    .await; // id 7, 5 bytes
    assert_eq!(status, 201);

    let get = |path: String| {
        let client = client.clone();
        let url = server.url(&path);
        async move { request(&client, reqwest::Method::GET, &url).await }
    };
    let a_temp = json!({"topic":"sensors/a/temp","first_id":1,"last_id":6,"count":2,"bytes":common::stat_bytes(18)});
    let other =
        json!({"topic":"other","first_id":2,"last_id":2,"count":1,"bytes":common::stat_bytes(7)});
    let b_temp = json!({"topic":"sensors/b/temp","first_id":3,"last_id":4,"count":2,"bytes":common::stat_bytes(3)});
    let a_hum = json!({"topic":"sensors/a/hum","first_id":5,"last_id":5,"count":1,"bytes":common::stat_bytes(6)});
    let a_bin = json!({"topic":"sensors/a/bin","first_id":7,"last_id":7,"count":1,"bytes":common::stat_bytes(5)});

    let (status, headers, body) = get("/v1/topics".into()).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(
        body,
        json!({"topics": [other, a_bin, a_hum, a_temp, b_temp]}),
        "all topics, in name order"
    );

    let (status, _, body) = get("/v1/topics?pattern=sensors/*/temp".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"topics": [a_temp, b_temp]}));
    let (status, _, body) = get("/v1/topics?pattern=sensors/a/**".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"topics": [a_bin, a_hum, a_temp]}));
    let (status, _, body) = get("/v1/topics?pattern=other".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"topics": [other]}));
    let (status, _, body) = get("/v1/topics?pattern=nothing/**".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"topics": []}));
    let (status, _, body) = get("/v1/topics?limit=2".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"topics": [other, a_bin]}));

    let (status, _, body) = get("/v1/topics/sensors/a/temp".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, a_temp);
    let (status, _, body) = get("/v1/topics/sensors/b/temp".into()).await;
    assert_eq!(status, 200);
    assert_eq!(body, b_temp);

    // Refusals.
    let (status, _, body) = get("/v1/topics/sensors/a".into()).await;
    assert_error(status, &body, 404, "unknown_topic");
    let (status, _, body) = get("/v1/topics/never/published".into()).await;
    assert_error(status, &body, 404, "unknown_topic");
    let (status, _, body) = get("/v1/topics/bad%20topic".into()).await;
    assert_error(status, &body, 422, "invalid_topic");
    let (status, _, body) = get("/v1/topics?pattern=a/**/b".into()).await;
    assert_error(status, &body, 422, "invalid_pattern");
    let (status, _, body) = get("/v1/topics?limit=0".into()).await;
    assert_error(status, &body, 400, "bad_request");
    server.stop().await;
}

// ---------------------------------------------------------------- health and metrics

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let (status, headers, body) =
        request(&client, reqwest::Method::GET, &server.url("/healthz")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, json!({"status":"ok"}));
    let (status, _, body) = request(&client, reqwest::Method::GET, &server.url("/readyz")).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status":"ready"}));
    let (status, _, _) = request(&client, reqwest::Method::HEAD, &server.url("/healthz")).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// The value of the sample `name` (with its label set, as rendered) in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn metrics_count_stored_events_bytes_and_rejections_by_code() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();

    let scrape = || async {
        let r = client.get(server.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain"), "Prometheus text: {ct}");
        r.text().await.unwrap()
    };
    let before = scrape().await;
    assert_eq!(sample(&before, "tidewire_events_stored_total"), Some(0.0));
    assert_eq!(
        sample(&before, "tidewire_publish_requests_total"),
        Some(0.0)
    );

    // 3 acknowledged requests, 1 + 4 + 1 = 6 events, 1 + (1+1+1+1) + 5 = 10 payload bytes.
    publish_one(&client, &server.url(""), "m/a", json!(1)).await;
    let (status, _) = post(
        &client,
        &server.url("/v1/events"),
        "application/json",
        r#"[{"topic":"m/a","data":2},{"topic":"m/b","data":3},{"topic":"m/a","data":4},{"topic":"m/c","data":5}]"#,
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = post(
        &client,
        &server.url("/v1/topics/m/d/events"),
        "application/octet-stream",
        b"12345".to_vec(),
    )
    .await;
    assert_eq!(status, 201);

    // Refusals: 2 x 415, 1 x 422 invalid_topic, 1 x 400 malformed, 1 x 404.
    for _ in 0..2 {
        let (status, _) = post(
            &client,
            &server.url("/v1/topics/m/a/events"),
            "text/html",
            "x",
        )
        .await;
        assert_eq!(status, 415);
    }
    let (status, _) = post(
        &client,
        &server.url("/v1/topics/bad%20t/events"),
        "application/json",
        r#"{"data":1}"#,
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = post(
        &client,
        &server.url("/v1/topics/m/a/events"),
        "application/json",
        "{",
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) = request(&client, reqwest::Method::GET, &server.url("/nope")).await;
    assert_eq!(status, 404);

    let text = scrape().await;
    assert!(
        text.contains("# TYPE tidewire_events_stored counter"),
        "{text}"
    );
    assert_eq!(sample(&text, "tidewire_events_stored_total"), Some(6.0));
    assert_eq!(sample(&text, "tidewire_publish_requests_total"), Some(3.0));
    assert_eq!(
        sample(&text, "tidewire_event_bytes_stored_total"),
        Some(10.0)
    );
    let rejected = |status: u16, code: &str| {
        sample(
            &text,
            &format!("tidewire_requests_rejected_total{{status=\"{status}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(rejected(415, "unsupported_media_type"), Some(2.0));
    assert_eq!(rejected(422, "invalid_topic"), Some(1.0));
    assert_eq!(rejected(400, "malformed_body"), Some(1.0));
    assert_eq!(rejected(404, "not_found"), Some(1.0));
    assert_eq!(
        rejected(413, "payload_too_large"),
        None,
        "nothing was too large"
    );
    assert!(
        text.contains("tidewire_publish_latency_seconds_count 3"),
        "{text}"
    );
    server.stop().await;
}
