//! `GET /v1/ws` from outside: a real server (in-process or the binary), a real sled temp dir,
//! and an independent WebSocket client (tokio-tungstenite's client).

mod common;

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{get_json, metric, post, publish_one, BinServer, TestServer, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const JSON: &str = "tidewire.v1.json";
const MSGPACK: &str = "tidewire.v1.msgpack";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Enc {
    Json,
    Msgpack,
}

async fn connect(addr: SocketAddr, query: &str, proto: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws{query}")
        .into_client_request()
        .expect("request");
    if let Some(p) = proto {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().expect("header"));
    }
    let (ws, resp) = timeout(PATIENCE, connect_async(req))
        .await
        .expect("connect timed out")
        .expect("connect");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string()),
        proto.map(str::to_string),
        "negotiated subprotocol"
    );
    ws
}

fn gunzip(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(frame)
        .read_to_end(&mut out)
        .expect("gzip batch");
    out
}

/// One received data frame: its decoded items (several for a gzip batch), whether it was a
/// gzip batch, and its size on the wire.
struct Frame {
    items: Vec<Value>,
    gzip: bool,
    wire: usize,
}

fn decode(enc: Enc, bytes: &[u8]) -> Value {
    match enc {
        Enc::Json => serde_json::from_slice(bytes).expect("JSON frame"),
        Enc::Msgpack => rmp_serde::from_slice(bytes).expect("MessagePack frame"),
    }
}

/// The next data frame (protocol pings and pongs skipped), within [`PATIENCE`].
async fn recv_frame(ws: &mut Ws, enc: Enc) -> Frame {
    loop {
        let msg = timeout(PATIENCE, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => {
                assert_eq!(enc, Enc::Json, "text frame on the MessagePack subprotocol");
                return Frame {
                    items: vec![decode(enc, t.as_bytes())],
                    gzip: false,
                    wire: t.len(),
                };
            }
            Message::Binary(b) if b.starts_with(&[0x1f, 0x8b]) => {
                let raw = gunzip(&b);
                let v = decode(enc, &raw);
                return Frame {
                    items: v.as_array().expect("batch is an array").clone(),
                    gzip: true,
                    wire: b.len(),
                };
            }
            Message::Binary(b) => {
                assert_eq!(enc, Enc::Msgpack, "binary frame on the JSON subprotocol");
                return Frame {
                    items: vec![decode(enc, &b)],
                    gzip: false,
                    wire: b.len(),
                };
            }
            Message::Close(c) => panic!("socket closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The next single item (an envelope or an op frame).
async fn recv(ws: &mut Ws, enc: Enc) -> Value {
    let f = recv_frame(ws, enc).await;
    assert_eq!(f.items.len(), 1, "expected one item, got a batch");
    f.items.into_iter().next().unwrap()
}

/// Reads until `n` event envelopes arrived; any op frame in between fails the test.
async fn read_events(ws: &mut Ws, enc: Enc, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        for item in recv_frame(ws, enc).await.items {
            assert!(item.get("op").is_none(), "unexpected op frame {item}");
            out.push(item);
        }
    }
    assert_eq!(out.len(), n, "more events than expected");
    out
}

async fn send(ws: &mut Ws, enc: Enc, v: Value) {
    let msg = match enc {
        Enc::Json => Message::text(v.to_string()),
        Enc::Msgpack => Message::binary(rmp_serde::to_vec_named(&v).unwrap()),
    };
    timeout(PATIENCE, ws.send(msg))
        .await
        .expect("send timed out")
        .expect("send");
}

/// Sends a ping op and waits for its pong: everything the server did for earlier frames
/// (opening subscriptions) is in place once this returns.
async fn sync(ws: &mut Ws, enc: Enc) {
    send(ws, enc, json!({"op":"ping","ref":"sync"})).await;
    let v = recv(ws, enc).await;
    assert_eq!(v, json!({"op":"pong","ref":"sync"}));
}

async fn publish_batch(client: &reqwest::Client, base: &str, topic: &str, n: usize) -> (u64, u64) {
    let body: Vec<Value> = (0..n)
        .map(|i| json!({"data": {"i": i, "pad": "x".repeat(64)}}))
        .collect();
    let (status, r) = post(
        client,
        &format!("{base}/v1/topics/{topic}/events"),
        "application/json",
        Value::Array(body).to_string(),
    )
    .await;
    assert_eq!(status, 201, "{r}");
    (
        r["first_id"].as_u64().unwrap(),
        r["last_id"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn live_delivery_then_resume_by_query_since() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let http = reqwest::Client::new();
    let base = server.url("");
    let mut ws = connect(server.addr, "?topic=orders/**", Some(JSON)).await;
    sync(&mut ws, Enc::Json).await;
    let a = publish_one(&http, &base, "orders/eu/1", json!({"n": 1})).await;
    publish_one(&http, &base, "other", json!({"n": 0})).await;
    let b = publish_one(&http, &base, "orders/us", json!({"n": 2})).await;
    let got = read_events(&mut ws, Enc::Json, 2).await;
    assert_eq!(common::ids(&got), [a, b]);
    assert_eq!(got[0]["topic"], "orders/eu/1");
    assert_eq!(got[0]["data"], json!({"n": 1}));
    assert!(got[0]["time"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(got[0].get("type").is_none());
    drop(ws);

    // Missed while away, then live, no gap or duplicate at the seam.
    let c = publish_one(&http, &base, "orders/eu/2", json!({"n": 3})).await;
    let mut ws = connect(server.addr, &format!("?topic=orders/**&since={a}"), None).await;
    let got = read_events(&mut ws, Enc::Json, 2).await;
    assert_eq!(common::ids(&got), [b, c]);
    let d = publish_one(&http, &base, "orders/x", json!(4)).await;
    assert_eq!(common::ids(&read_events(&mut ws, Enc::Json, 1).await), [d]);
    // since=0: everything retained.
    let mut all = connect(server.addr, "?topic=orders/**&since=0", None).await;
    assert_eq!(
        common::ids(&read_events(&mut all, Enc::Json, 4).await),
        [a, b, c, d]
    );
    server.stop().await;
}

#[tokio::test]
async fn subscribe_and_unsubscribe_over_the_socket_with_since_and_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let http = reqwest::Client::new();
    let base = server.url("");
    let s1 = publish_one(&http, &base, "sensors/a", json!(1)).await;
    let s2 = publish_one(&http, &base, "sensors/b", json!(2)).await;
    let o1 = publish_one(&http, &base, "other/x", json!(3)).await;
    let s3 = publish_one(&http, &base, "sensors/a", json!(4)).await;

    let mut ws = connect(server.addr, "", Some(JSON)).await;
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"subscribe","topics":["sensors/**","sensors/a"],"since":0,"ref":"s"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws, Enc::Json).await,
        json!({"op":"ack","ref":"s"})
    );
    // Overlapping patterns: each event once, in id order.
    assert_eq!(
        common::ids(&read_events(&mut ws, Enc::Json, 3).await),
        [s1, s2, s3]
    );

    // A second subscribe whose since is below what was sent: a gap frame says from where
    // the new pattern is complete; order on the socket stays strictly increasing.
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"subscribe","topics":["other/**"],"since":0,"ref":2}),
    )
    .await;
    let mut frames = [
        recv(&mut ws, Enc::Json).await,
        recv(&mut ws, Enc::Json).await,
    ];
    frames.sort_by_key(|f| f["op"].as_str().unwrap_or("").to_string());
    assert_eq!(frames[0], json!({"op":"ack","ref":2}));
    assert_eq!(frames[1], json!({"op":"gap","requested":0,"oldest":s3 + 1}));
    let o2 = publish_one(&http, &base, "other/y", json!(5)).await;
    let s4 = publish_one(&http, &base, "sensors/a", json!(6)).await;
    assert_eq!(
        common::ids(&read_events(&mut ws, Enc::Json, 2).await),
        [o2, s4]
    );
    let _ = o1;

    // Unsubscribe one of two overlapping patterns: sensors/a still arrives (via sensors/**).
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"unsubscribe","topics":["sensors/a"],"ref":"u"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws, Enc::Json).await,
        json!({"op":"ack","ref":"u"})
    );
    let s5 = publish_one(&http, &base, "sensors/a", json!(7)).await;
    assert_eq!(common::ids(&read_events(&mut ws, Enc::Json, 1).await), [s5]);
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"unsubscribe","topics":["sensors/**","other/**"]}),
    )
    .await;
    publish_one(&http, &base, "sensors/a", json!(8)).await;
    let o3 = publish_one(&http, &base, "other/z", json!(9)).await;
    // Resubscribe live (no since) on a socket that has sent events: only new ones.
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"subscribe","topics":["other/z"],"ref":"l"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws, Enc::Json).await,
        json!({"op":"ack","ref":"l"})
    );
    let o4 = publish_one(&http, &base, "other/z", json!(10)).await;
    assert_eq!(common::ids(&read_events(&mut ws, Enc::Json, 1).await), [o4]);
    assert!(o4 > o3);

    // Subscribe with since on a fresh socket: resume exactly.
    let mut ws2 = connect(server.addr, "", None).await;
    send(
        &mut ws2,
        Enc::Json,
        json!({"op":"subscribe","topics":["sensors/a"],"since":s1}),
    )
    .await;
    let got = read_events(&mut ws2, Enc::Json, 4).await;
    assert_eq!(common::ids(&got)[0], s3);
    assert!(common::ids(&got).windows(2).all(|w| w[0] < w[1]));
    server.stop().await;
}

#[tokio::test]
async fn msgpack_subprotocol_keeps_bytes_as_bin_and_acks_publishes() {
    #[derive(serde::Deserialize, Debug)]
    struct BinEnv {
        id: u64,
        topic: String,
        data: serde_bytes::ByteBuf,
    }
    #[derive(serde::Serialize)]
    struct Publish<'a> {
        op: &'a str,
        topic: &'a str,
        data: &'a serde_bytes::Bytes,
        #[serde(rename = "ref")]
        r: &'a str,
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let mut sub = connect(server.addr, "?topic=dev/**", Some(MSGPACK)).await;
    sync(&mut sub, Enc::Msgpack).await;
    let mut pubr = connect(server.addr, "", Some(MSGPACK)).await;
    let payload: Vec<u8> = (0..=255u8).collect();
    let frame = rmp_serde::to_vec_named(&Publish {
        op: "publish",
        topic: "dev/1",
        data: serde_bytes::Bytes::new(&payload),
        r: "p1",
    })
    .unwrap();
    pubr.send(Message::binary(frame)).await.unwrap();
    let ack = recv(&mut pubr, Enc::Msgpack).await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["ref"], "p1");
    let id = ack["id"].as_u64().unwrap();

    // Bytes published over HTTP as octet-stream arrive as bin too.
    let http = reqwest::Client::new();
    let (status, r) = post(
        &http,
        &server.url("/v1/topics/dev/2/events"),
        "application/octet-stream",
        vec![0u8, 1, 2, 255],
    )
    .await;
    assert_eq!(status, 201);
    let id2 = r["first_id"].as_u64().unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = timeout(PATIENCE, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            seen.push(rmp_serde::from_slice::<BinEnv>(&b).expect("envelope with bin data"));
        }
    }
    assert_eq!((seen[0].id, seen[0].topic.as_str()), (id, "dev/1"));
    assert_eq!(seen[0].data.as_ref(), &payload[..]);
    assert_eq!(
        (seen[1].id, seen[1].data.as_ref()),
        (id2, &[0u8, 1, 2, 255][..])
    );

    // The same event over JSON: base64 with encoding.
    let mut j = connect(server.addr, &format!("?topic=dev/1&since={}", id - 1), None).await;
    let e = &read_events(&mut j, Enc::Json, 1).await[0];
    assert_eq!(e["encoding"], "base64");
    server.stop().await;
}

#[tokio::test]
async fn subprotocol_negotiation_and_bad_upgrades() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    // Unknown subprotocol alone: refused with a clear HTTP error before the upgrade.
    let mut req = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat".parse().unwrap());
    match connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unsupported_subprotocol");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    // Plain GET (no upgrade): 426; bad pattern / cursor: the HTTP error before upgrading.
    let http = reqwest::Client::new();
    let r = http.get(server.url("/v1/ws")).send().await.unwrap();
    assert_eq!(r.status(), 426);
    for (q, code) in [
        ("?topic=a/**/b", "invalid_pattern"),
        ("?since=x", "invalid_cursor"),
    ] {
        let req = format!("ws://{}/v1/ws{q}", server.addr)
            .into_client_request()
            .unwrap();
        match connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], code, "{q}");
            }
            other => panic!("expected an HTTP error for {q}, got {other:?}"),
        }
    }
    // JSON preferred when offered first.
    let _ws = connect(server.addr, "", Some(JSON)).await;
    server.stop().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_error_frame_and_the_socket_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.ws_max_frame_bytes = 1024).await;
    let http = reqwest::Client::new();
    let mut ws = connect(server.addr, "?topic=ok", Some(JSON)).await;
    let text_cases: Vec<(String, &str, Option<Value>)> = vec![
        ("{not json".into(), "malformed_frame", None),
        (
            r#"{"op":"dance","ref":"r1"}"#.into(),
            "unknown_op",
            Some(json!("r1")),
        ),
        (
            r#"{"op":"subscribe","topics":["a/**/b"],"ref":"r2"}"#.into(),
            "invalid_pattern",
            Some(json!("r2")),
        ),
        (
            r#"{"op":"publish","topic":"bad topic","data":1,"ref":"r3"}"#.into(),
            "invalid_topic",
            Some(json!("r3")),
        ),
        (
            r#"{"op":"publish","topic":"ok","data":"!!","encoding":"base64","ref":4}"#.into(),
            "invalid_envelope",
            Some(json!(4)),
        ),
        (
            r#"{"op":"publish","topic":"ok","ref":"r5"}"#.into(),
            "invalid_envelope",
            Some(json!("r5")),
        ),
        (
            format!(
                r#"{{"op":"publish","topic":"ok","data":"{}","ref":"r6"}}"#,
                "x".repeat(2000)
            ),
            "payload_too_large",
            None,
        ),
        (r#"[1,2,3]"#.into(), "invalid_frame", None),
    ];
    for (frame, code, r) in text_cases {
        ws.send(Message::text(frame.clone())).await.unwrap();
        let e = recv(&mut ws, Enc::Json).await;
        assert_eq!(e["op"], "error", "{frame}");
        assert_eq!(e["code"], code, "{frame}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(e.get("ref"), r.as_ref(), "{frame}");
        sync(&mut ws, Enc::Json).await;
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let e = recv(&mut ws, Enc::Json).await;
    assert_eq!(e["code"], "unsupported_frame");
    sync(&mut ws, Enc::Json).await;

    // MessagePack socket: malformed bytes and a text frame.
    let mut mp = connect(server.addr, "", Some(MSGPACK)).await;
    mp.send(Message::binary(vec![0x82u8, 0xa2, b'o']))
        .await
        .unwrap();
    assert_eq!(recv(&mut mp, Enc::Msgpack).await["code"], "malformed_frame");
    mp.send(Message::text("{}")).await.unwrap();
    assert_eq!(
        recv(&mut mp, Enc::Msgpack).await["code"],
        "unsupported_frame"
    );
    sync(&mut mp, Enc::Msgpack).await;

    // Nothing was stored; the socket still publishes and receives.
    let r: Value = http
        .get(server.url("/v1/topics"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !r.to_string().contains("\"ok\""),
        "a refused publish stored something: {r}"
    );
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"publish","topic":"ok","data":{"fine":true},"ref":"good"}),
    )
    .await;
    let mut got = [
        recv(&mut ws, Enc::Json).await,
        recv(&mut ws, Enc::Json).await,
    ];
    got.sort_by_key(|v| v.get("op").is_none());
    assert_eq!(got[0]["op"], "ack");
    assert_eq!(got[0]["ref"], "good");
    assert_eq!(got[1]["id"], got[0]["id"]);
    assert_eq!(got[1]["data"], json!({"fine": true}));

    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tidewire_ws_errors_total{code=\"unknown_op\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tidewire_ws_acks_total 1"), "{metrics}");
    assert!(
        metrics.contains("tidewire_live_subscribers{transport=\"ws\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}

/// A MessagePack map with string keys; each value given as its encoded bytes, so a test can
/// put bytes there that no encoder would write.
fn raw_msgpack_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        out.extend(rmp_serde::to_vec(k).expect("a key"));
        out.extend_from_slice(v);
    }
    out
}

/// Sends `frame` (described by `what`) and asserts the error frame with `code` answers it,
/// then that the socket still answers a ping.
async fn assert_frame_refused(ws: &mut Ws, enc: Enc, frame: Message, what: &str, code: &str) {
    timeout(PATIENCE, ws.send(frame))
        .await
        .expect("send timed out")
        .expect("send");
    let e = recv(ws, enc).await;
    assert_eq!(e["op"], "error", "{what}: {e}");
    assert_eq!(e["code"], code, "{what}: {e}");
    sync(ws, enc).await;
}

/// The line an HTTP body has between 400 `malformed_body` and 422, drawn the same way for
/// frames in both encodings: bytes that are not one value are `malformed_frame`, a value that
/// is no op is `invalid_frame`. Nothing refused is stored, and the socket keeps working.
#[tokio::test]
async fn frames_that_are_not_one_value_are_malformed_and_values_that_are_no_op_are_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let http = reqwest::Client::new();

    let mut mp = connect(server.addr, "", Some(MSGPACK)).await;
    let str_of = |s: &str| rmp_serde::to_vec(s).expect("a string");
    let publish = |data: &[u8]| {
        raw_msgpack_map(&[
            ("op", &str_of("publish")),
            ("topic", &str_of("line")),
            ("data", data),
        ])
    };
    let good = publish(&[0x07]);
    let binary_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("the never-used byte alone", vec![0xc1], "malformed_frame"),
        (
            "the never-used byte as data",
            publish(&[0xc1]),
            "malformed_frame",
        ),
        (
            "a byte after the op",
            [good.clone(), vec![0x00]].concat(),
            "malformed_frame",
        ),
        (
            "an op cut short",
            good[..good.len() - 1].to_vec(),
            "malformed_frame",
        ),
        ("a number", vec![0x01], "invalid_frame"),
        (
            "a map with no op",
            raw_msgpack_map(&[("x", &[0x01])]),
            "invalid_frame",
        ),
        ("an array", vec![0x92, 0x01, 0x02], "invalid_frame"),
    ];
    for (what, frame, code) in binary_cases {
        assert_frame_refused(&mut mp, Enc::Msgpack, Message::binary(frame), what, code).await;
    }

    let mut js = connect(server.addr, "", Some(JSON)).await;
    let text_cases = [
        (
            "a word after the op",
            r#"{"op":"publish","topic":"line","data":1} x"#,
            "malformed_frame",
        ),
        (
            "an op cut short",
            r#"{"op":"publish","topic":"line","data":1"#,
            "malformed_frame",
        ),
        ("a number", "42", "invalid_frame"),
        ("an object with no op", r#"{"x":1}"#, "invalid_frame"),
    ];
    for (what, frame, code) in text_cases {
        assert_frame_refused(&mut js, Enc::Json, Message::text(frame), what, code).await;
    }

    // Nothing refused was stored; the well-formed publish still goes through, as id 1.
    let topics = get_json(&http, &server.url("/v1/topics")).await;
    assert!(!topics.to_string().contains("\"line\""), "{topics}");
    let with_ref = raw_msgpack_map(&[
        ("op", &str_of("publish")),
        ("topic", &str_of("line")),
        ("data", &[0x07]),
        ("ref", &str_of("ok")),
    ]);
    mp.send(Message::binary(with_ref)).await.expect("send");
    let ack = recv(&mut mp, Enc::Msgpack).await;
    assert_eq!(ack, json!({"op": "ack", "ref": "ok", "id": 1}));
    server.stop().await;
}

#[tokio::test]
async fn oversized_beyond_the_hard_limit_closes_with_1009() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.ws_max_frame_bytes = 1024).await;
    let mut ws = connect(server.addr, "", None).await;
    ws.send(Message::text("x".repeat(10_000))).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline);
        match timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(CloseFrame { code, .. })))) => {
                assert_eq!(code, CloseCode::Size);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    server.stop().await;
}

async fn replay(addr: SocketAddr, enc: Enc, batch: bool, n: usize) -> (Vec<Value>, usize, usize) {
    let proto = match enc {
        Enc::Json => JSON,
        Enc::Msgpack => MSGPACK,
    };
    let q = if batch {
        "?topic=r/**&since=0&batch=gzip"
    } else {
        "?topic=r/**&since=0"
    };
    let mut ws = connect(addr, q, Some(proto)).await;
    let (mut items, mut wire, mut gz_frames) = (Vec::new(), 0, 0);
    while items.len() < n {
        let f = recv_frame(&mut ws, enc).await;
        wire += f.wire;
        gz_frames += usize::from(f.gzip);
        assert!(!f.gzip || batch, "gzip frame without batch=gzip");
        items.extend(f.items);
    }
    assert_eq!(items.len(), n);
    (items, wire, gz_frames)
}

#[tokio::test]
async fn gzip_batches_replay_exactly_the_unbatched_events_in_both_encodings() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let http = reqwest::Client::new();
    let base = server.url("");
    let n = 6000;
    for i in 0..(n / 1000) {
        publish_batch(&http, &base, &format!("r/{}", i % 3), 1000).await;
    }
    for enc in [Enc::Json, Enc::Msgpack] {
        let (plain, plain_wire, _) = replay(server.addr, enc, false, n).await;
        let (batched, batched_wire, gz) = replay(server.addr, enc, true, n).await;
        assert_eq!(plain, batched, "{enc:?}");
        assert!(common::ids(&plain).windows(2).all(|w| w[0] < w[1]));
        assert!(gz > 0 && gz < n / 10, "{gz} gzip frames for {n} events");
        let ratio = plain_wire as f64 / batched_wire as f64;
        eprintln!("{enc:?}: replay of {n} events: {plain_wire} bytes unbatched, {batched_wire} with batch=gzip ({ratio:.1}x)");
        assert!(ratio > 3.0, "batch=gzip saves too little: {ratio:.1}x");
    }
    // Live trickles may stay single frames.
    let mut ws = connect(server.addr, "?topic=r/**&batch=gzip", None).await;
    sync(&mut ws, Enc::Json).await;
    let id = publish_one(&http, &base, "r/live", json!(1)).await;
    let f = recv_frame(&mut ws, Enc::Json).await;
    assert_eq!(common::ids(&f.items), [id]);
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_pending_acks_then_closes_with_1001() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let mut ws = connect(server.addr, "?topic=t", None).await;
    sync(&mut ws, Enc::Json).await;
    send(
        &mut ws,
        Enc::Json,
        json!({"op":"publish","topic":"t","data":1,"ref":"last"}),
    )
    .await;
    let ack = recv(&mut ws, Enc::Json).await;
    // The ack may come before or after the event itself.
    let ack = if ack.get("op").is_none() {
        recv(&mut ws, Enc::Json).await
    } else {
        ack
    };
    assert_eq!(ack["op"], "ack");
    let stopping = tokio::spawn(server.stop());
    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        assert!(Instant::now() < deadline);
        match timeout(PATIENCE, ws.next()).await.expect("close in time") {
            Some(Ok(Message::Close(Some(f)))) => break f.code,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Away);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed_and_an_answering_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.ws_ping_secs = 1;
        c.ws_unresponsive_secs = 3;
    })
    .await;
    let mut silent = connect(server.addr, "?topic=t", None).await;
    let mut alive = connect(server.addr, "?topic=t", None).await;
    // `alive` is polled (the client answers protocol pings), `silent` is not.
    let mut pings = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(Ok(m))) = timeout(Duration::from_millis(200), alive.next()).await {
            pings += usize::from(matches!(m, Message::Ping(_)));
        }
    }
    assert!(pings >= 3, "protocol pings every second, got {pings}");
    sync(&mut alive, Enc::Json).await;
    // The silent one was closed (with 1008 when the close frame is read before the client's
    // late pong replies hit the closed connection).
    loop {
        match timeout(PATIENCE, silent.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Policy);
                break;
            }
            Some(Ok(Message::Close(None))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        }
    }
    // The socket's task leaves `live_subscribers` when it ends, just after its close frame is
    // out: the client can read that frame first, so wait for the gauge to follow.
    let base = server.url("");
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, "tidewire_live_subscribers{transport=\"ws\"}").await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "live_subscribers never went down to the one answering socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&base, "tidewire_ws_unresponsive_closed_total").await,
        1.0
    );
    sync(&mut alive, Enc::Json).await;
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_sends_but_never_reads_is_closed_once_writes_stall() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        // Pings far apart: only the stalled writes can end this socket.
        c.ws_ping_secs = 600;
        c.ws_unresponsive_secs = 2;
        c.ws_send_queue = 8;
    })
    .await;
    let mut deaf = connect(server.addr, "?topic=s/**", None).await;
    sync(&mut deaf, Enc::Json).await;
    let http = reqwest::Client::new();
    let base = server.url("");
    // ~400 KB per request until the kernel buffers fill and writes make no progress for 2 s.
    let pad = "z".repeat(4000);
    let body: Vec<Value> = (0..100)
        .map(|i| json!({"data": {"i": i, "pad": pad}}))
        .collect();
    let body = Value::Array(body).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut closed = false;
    for r in 0..400 {
        let (status, _) = post(
            &http,
            &format!("{base}/v1/topics/s/x/events"),
            "application/json",
            body.clone(),
        )
        .await;
        assert_eq!(status, 201);
        // The client keeps talking (a pong the server did not ask for), so it is not silent.
        deaf.send(Message::Pong(Vec::new().into())).await.ok();
        if r % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if metric(&base, "tidewire_ws_unresponsive_closed_total").await == 1.0 {
                closed = true;
                break;
            }
        }
        assert!(Instant::now() < deadline, "no close within 60 s");
    }
    assert!(closed, "the deaf socket was never closed");
    // Its task ended: the live WebSocket gauge is back to zero, and the server serves on.
    let until = Instant::now() + PATIENCE;
    while metric(&base, "tidewire_live_subscribers{transport=\"ws\"}").await != 0.0 {
        assert!(Instant::now() < until, "the socket's task never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = connect(server.addr, "?topic=s/**", None).await;
    sync(&mut fresh, Enc::Json).await;
    server.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_socket_that_does_not_read_stays_bounded_and_catches_up_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = common::free_addr();
    let server = BinServer::spawn_on_with_env(
        addr,
        &tmp.path().join("data"),
        &[],
        &[
            ("TIDEWIRE_WS_SEND_QUEUE", "8"),
            ("TIDEWIRE_HUB_CAPACITY", "32"),
            ("TIDEWIRE_CACHE_BYTES", "8388608"),
            ("TIDEWIRE_REPLAY_PAGE", "100"),
        ],
    )
    .await;
    let pid = server.child.id();
    let http = reqwest::Client::new();
    let base = server.url("");
    let mut slow = connect(addr, "?topic=big/**", None).await;
    sync(&mut slow, Enc::Json).await;
    let mut fast = connect(addr, "?topic=big/**", Some(JSON)).await;
    sync(&mut fast, Enc::Json).await;
    let before = rss_kib(pid);
    // 200 requests of 100 events of ~4 KiB: ~80 MB through a socket that does not read.
    let pad = "y".repeat(4096);
    let requests = 200;
    let per = 100;
    let fast_reader = tokio::spawn(async move {
        let got = read_events(&mut fast, Enc::Json, requests * per).await;
        common::ids(&got)
    });
    let mut max_rss = before;
    for r in 0..requests {
        let body: Vec<Value> = (0..per)
            .map(|i| json!({"data": {"r": r, "i": i, "pad": pad}}))
            .collect();
        let (status, _) = post(
            &http,
            &format!("{base}/v1/topics/big/{}/events", r % 4),
            "application/json",
            Value::Array(body).to_string(),
        )
        .await;
        assert_eq!(status, 201);
        if r % 20 == 0 {
            max_rss = max_rss.max(rss_kib(pid));
        }
    }
    let fast_ids = timeout(PATIENCE * 3, fast_reader)
        .await
        .expect("fast socket kept up")
        .unwrap();
    assert!(fast_ids.windows(2).all(|w| w[0] < w[1]));
    max_rss = max_rss.max(rss_kib(pid));
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    eprintln!(
        "RSS before {before} KiB, max {max_rss} KiB while ~80 MB went past a non-reading socket"
    );
    // Measured: the same run with a socket subscribed to nothing grows by ~24 MB (hub ring,
    // sled, debug build); with the non-reading socket ~52 MB, and still ~56 MB when 200 MB go
    // past it (it does not grow with the volume). An unbounded queue would add the ~80 MB.
    assert!(
        max_rss - before < 64 * 1024,
        "server memory grew by {} KiB for a non-reading socket",
        max_rss - before
    );
    assert!(
        metrics.contains("tidewire_ws_lagging_sockets 1"),
        "{metrics}"
    );
    // Reading again: everything, in order, nothing skipped.
    let got = common::ids(&read_events(&mut slow, Enc::Json, requests * per).await);
    assert_eq!(got, fast_ids);
}

/// Publishes over a WebSocket until told to stop; returns the acknowledged ids.
fn spawn_ws_publisher(
    addr: SocketAddr,
    topic: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let Ok(Ok((mut ws, _))) =
            timeout(PATIENCE, connect_async(format!("ws://{addr}/v1/ws"))).await
        else {
            return acked;
        };
        let mut i = 0u64;
        while !*stop.borrow() {
            i += 1;
            let frame = json!({"op":"publish","topic":topic,"data":{"i":i},"ref":i}).to_string();
            if ws.send(Message::text(frame)).await.is_err() {
                break;
            }
            // Wait for this ack (one in flight per socket); a dead server ends the loop.
            let ack = loop {
                match timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        break Some(serde_json::from_str::<Value>(&t).unwrap())
                    }
                    Ok(Some(Ok(_))) => continue,
                    _ => break None,
                }
            };
            match ack {
                Some(a) if a["op"] == "ack" => {
                    assert_eq!(a["ref"], i);
                    acked.push(a["id"].as_u64().unwrap());
                }
                _ => break,
            }
        }
        acked
    })
}

#[tokio::test]
async fn kill_9_during_concurrent_publishing_loses_no_acked_event_and_resume_delivers_each_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let addr = common::free_addr();
    let mut server = BinServer::spawn_on(addr, &data, &[]).await;
    let mut rec = connect(addr, "?topic=k/**", None).await;
    sync(&mut rec, Enc::Json).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pubs: Vec<_> = (0..8)
        .map(|p| spawn_ws_publisher(addr, format!("k/{p}"), stop_rx.clone()))
        .collect();
    // Record what the subscriber sees until the server dies.
    let recorder = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(Ok(m))) = timeout(PATIENCE, rec.next()).await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                seen.push(v["id"].as_u64().unwrap());
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    let _ = stop_tx.send(true);
    let mut acked = BTreeSet::new();
    for p in pubs {
        acked.extend(timeout(PATIENCE, p).await.unwrap().unwrap());
    }
    let seen = timeout(PATIENCE, recorder).await.unwrap().unwrap();
    assert!(
        acked.len() > 50,
        "only {} acks before the kill",
        acked.len()
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "live order");
    let last_seen = seen.last().copied().unwrap_or(0);

    // Restart in place; resume by since: every acked event exactly once, in order.
    let _server = BinServer::spawn_on(addr, &data, &[]).await;
    let mut ws = connect(addr, &format!("?topic=k/**&since={last_seen}"), None).await;
    let max_acked = *acked.iter().max().unwrap();
    let mut resumed = Vec::new();
    while resumed.last().copied().unwrap_or(last_seen) < max_acked {
        resumed.extend(common::ids(&read_events(&mut ws, Enc::Json, 1).await));
    }
    let all: Vec<u64> = seen.iter().chain(resumed.iter()).copied().collect();
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing, no duplicate"
    );
    let all: BTreeSet<u64> = all.into_iter().collect();
    let missing: Vec<_> = acked.difference(&all).collect();
    assert!(missing.is_empty(), "acked but never delivered: {missing:?}");
}

/// Publishes pipelined on several sockets when shutdown begins: each one the server read is
/// answered with an ack (never `not_ready`: the log stays open until the sockets are done),
/// the socket then closes with 1001, and after a restart the store holds exactly the acked
/// events, under the acked ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_acks_every_publish_it_accepted_and_stores_nothing_unacked() {
    const SOCKETS: usize = 8;
    const PER_SOCKET: u64 = 2000;
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let addr = server.addr;
    let mut socks = Vec::new();
    for _ in 0..SOCKETS {
        let mut ws = connect(addr, "", Some(JSON)).await;
        sync(&mut ws, Enc::Json).await;
        socks.push(ws);
    }
    // Every socket pipelines its publishes without waiting for acks; shutdown starts while
    // they are being read and stored.
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let acks_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(s, ws)| {
            let mut go = go_rx.clone();
            let acks_seen = acks_seen.clone();
            tokio::spawn(async move {
                let (mut tx, mut rx) = ws.split();
                let _ = go.wait_for(|g| *g).await;
                let sender = tokio::spawn(async move {
                    for i in 1..=PER_SOCKET {
                        let op = json!({"op":"publish","topic":format!("sd/{s}"),
                                        "data":{"s":s,"i":i},"ref":i});
                        if tx.send(Message::text(op.to_string())).await.is_err() {
                            break;
                        }
                    }
                    tx
                });
                // Every answer until the close frame: (ref, id) of acks, in arrival order.
                let mut acks = Vec::new();
                let close = loop {
                    match timeout(PATIENCE, rx.next())
                        .await
                        .expect("answer or close in time")
                    {
                        Some(Ok(Message::Text(t))) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            assert_eq!(v["op"], "ack", "socket {s}: {v}");
                            acks.push((v["ref"].as_u64().unwrap(), v["id"].as_u64().unwrap()));
                            acks_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(Ok(Message::Close(f))) => break f.map(|f| f.code),
                        Some(Ok(_)) => continue,
                        other => panic!("socket {s}: expected answers then a close, got {other:?}"),
                    }
                };
                let _ = timeout(PATIENCE, sender).await;
                (s, acks, close)
            })
        })
        .collect();
    let _ = go_tx.send(true);
    // Stop once publishing is under way on every socket (a few acks each, on average).
    let deadline = Instant::now() + PATIENCE;
    while acks_seen.load(std::sync::atomic::Ordering::Relaxed) < SOCKETS * 5 {
        assert!(Instant::now() < deadline, "no acks before the shutdown");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    timeout(PATIENCE, server.stop())
        .await
        .expect("stopped in time");

    let mut acked = std::collections::BTreeMap::new();
    let mut total = 0;
    for c in clients {
        let (s, acks, close) = timeout(PATIENCE, c).await.unwrap().unwrap();
        assert_eq!(close, Some(CloseCode::Away), "socket {s} closes with 1001");
        // Acks come in request order: a prefix of the refs sent.
        let refs: Vec<u64> = acks.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            refs,
            (1..=refs.len() as u64).collect::<Vec<_>>(),
            "socket {s}"
        );
        total += acks.len();
        for (r, id) in acks {
            acked.insert(id, json!({"s": s, "i": r}));
        }
    }
    eprintln!(
        "{total} of {} publishes acked across the shutdown",
        SOCKETS as u64 * PER_SOCKET
    );

    // After a restart the log holds exactly the acked events.
    let server = TestServer::start(&tmp).await;
    let http = reqwest::Client::new();
    let mut ws = connect(server.addr, "?topic=sd/**&since=0", Some(JSON)).await;
    let got = read_events(&mut ws, Enc::Json, acked.len()).await;
    let got: std::collections::BTreeMap<u64, Value> = got
        .into_iter()
        .map(|e| (e["id"].as_u64().unwrap(), e["data"].clone()))
        .collect();
    assert_eq!(got, acked, "stored events are exactly the acked ones");
    // Nothing beyond them: a marker published now is the very next event.
    let marker = publish_one(&http, &server.url(""), "sd/marker", json!("end")).await;
    let next = read_events(&mut ws, Enc::Json, 1).await;
    assert_eq!(
        common::ids(&next),
        [marker],
        "an unacked publish was stored"
    );
    server.stop().await;
}
