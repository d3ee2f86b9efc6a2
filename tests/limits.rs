//! Abuse limits against the real server on 127.0.0.1: publish rate limits (HTTP and
//! WebSocket), connection caps answered with real HTTP (not resets), slow-client defences
//! (slowloris, slow body, idle keep-alive, oversized heads) that leave healthy long-lived
//! streams alone, subscription caps, and the `Origin` policy for WebSockets and publishes.
//!
//! Slow clients, caps and oversized heads are driven over raw TCP so the test sees the bytes
//! the server actually answers. Every wait is bounded by `PATIENCE`; timeouts under test are
//! set to a second or two.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{metric, post, publish_one, sse, BinServer, TestServer, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tidewire::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "limits-test-secret-limits-test-secret-0123";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// An answer read off a raw socket: status, headers (lower-cased names) and body.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Reads one HTTP/1.1 response (head, then a `Content-Length` body) from `s`.
async fn read_response(s: &mut TcpStream) -> Option<Raw> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("no answer in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .split(' ')
        .nth(1)?
        .parse()
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().expect("content-length"))
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("body in time")
            .ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Raw {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Whether the server closes `s` (EOF or reset) within `within`; bytes read meanwhile are
/// dropped.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Opens a raw connection and proves it was admitted (a keep-alive `GET /healthz` answered
/// 200); `None` when it was refused.
async fn admitted(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(get_request("/healthz").as_bytes()).await.ok()?;
    let r = read_response(&mut s).await?;
    (r.status == 200).then_some(s)
}

/// Holds `n` admitted connections. Connections the test harness used (the readiness probe)
/// may still be counted for a moment, so a refused one is retried.
async fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + PATIENCE;
    let mut held = Vec::new();
    while held.len() < n {
        match admitted(addr).await {
            Some(s) => held.push(s),
            None => {
                assert!(Instant::now() < deadline, "could not hold {n} connections");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    held
}

/// The answer to one request on a fresh raw connection, and the connection.
async fn one_shot(addr: SocketAddr, request: &[u8]) -> (Raw, TcpStream) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send");
    let r = read_response(&mut s)
        .await
        .expect("an HTTP answer, not a reset");
    (r, s)
}

async fn topic_count(base: &str, topic: &str) -> u64 {
    let r = client()
        .get(format!("{base}/v1/topics/{topic}"))
        .send()
        .await
        .expect("GET topic");
    if r.status() == 404 {
        return 0;
    }
    let v: Value = r.json().await.expect("topic stats");
    v["count"].as_u64().expect("count")
}

fn token(sub: Option<&str>) -> String {
    tidewire::auth::mint::mint(
        SECRET.as_bytes(),
        &tidewire::auth::mint::TokenSpec {
            admin: false,
            publish: vec!["**".into()],
            subscribe: vec!["**".into()],
            ttl: Duration::from_secs(3600),
            sub: sub.map(str::to_string),
            aud: None,
            iss: None,
            alg: jsonwebtoken::Algorithm::HS256,
        },
    )
    .expect("mint")
}

async fn publish_as(base: &str, topic: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut r = client()
        .post(format!("{base}/v1/topics/{topic}/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":1}"#);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    r.send().await.expect("POST")
}

async fn ws_open(addr: SocketAddr, query: &str, origin: Option<&str>) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws{query}")
        .into_client_request()
        .expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", o.parse().expect("origin header"));
    }
    let (ws, _) = timeout(PATIENCE, connect_async(req))
        .await
        .expect("connect in time")
        .expect("WebSocket handshake");
    ws
}

/// The next JSON frame (skipping protocol pings).
async fn ws_frame(ws: &mut Ws) -> Value {
    loop {
        let m = timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a ping op and expects its pong: the socket is open and served.
async fn ws_still_serves(ws: &mut Ws) {
    ws_send(ws, json!({"op": "ping", "ref": "alive"})).await;
    let f = ws_frame(ws).await;
    assert_eq!(f["op"], "pong", "{f}");
    assert_eq!(f["ref"], "alive");
}

// ---- Publish rate limits ----------------------------------------------------------------

#[tokio::test]
async fn a_publisher_over_its_rate_gets_429_with_retry_after_and_nothing_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.publish_rate_per_sec = 1.0;
        c.publish_burst = 2;
    })
    .await;
    let base = s.url("");
    // The burst passes (a batch is one request, one cell).
    let (st, body) = post(
        &client(),
        &s.url("/v1/topics/rl/a/events"),
        "application/json",
        r#"[{"data":1},{"data":2},{"data":3}]"#,
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(publish_as(&base, "rl/a", None).await.status(), 201);
    // Over the rate: 429, whole-second Retry-After, the contract's body, nothing stored.
    let r = publish_as(&base, "rl/a", None).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited", "{v}");
    assert!(v["error"]["message"].is_string());
    // The batch endpoint shares the bucket.
    let (st, v) = post(
        &client(),
        &s.url("/v1/events"),
        "application/json",
        r#"[{"topic":"rl/b","data":1}]"#,
    )
    .await;
    assert_eq!(st, 429, "{v}");
    // The limiter holds this publisher's bucket, and /metrics says so while it refuses.
    assert_eq!(metric(&base, "tidewire_rate_limiter_keys").await, 1.0);
    assert_eq!(topic_count(&base, "rl/a").await, 4);
    assert_eq!(topic_count(&base, "rl/b").await, 0);
    assert!(
        metric(
            &base,
            "tidewire_publish_rate_limited_total{reason=\"http\"}"
        )
        .await
            >= 2.0
    );
    // Retry-After is honest: after it, the publisher may publish again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(publish_as(&base, "rl/a", None).await.status(), 201);
    // Reads are never rate limited.
    for _ in 0..5 {
        assert_eq!(topic_count(&base, "rl/a").await, 5);
    }
    s.stop().await;
}

#[tokio::test]
async fn rate_limits_count_per_token_subject_and_tokens_without_sub_per_client_address() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(tidewire::config::Secret::new(SECRET));
        c.publish_rate_per_sec = 0.05; // one cell per 20 s: nothing refills during the test
        c.publish_burst = 2;
    })
    .await;
    let base = s.url("");
    let (alice, bob) = (token(Some("alice")), token(Some("bob")));
    // Two tokens of the same subject share one bucket.
    let alice2 = tidewire::auth::mint::mint(
        SECRET.as_bytes(),
        &tidewire::auth::mint::TokenSpec {
            admin: false,
            publish: vec!["s/**".into()],
            subscribe: vec![],
            ttl: Duration::from_secs(600),
            sub: Some("alice".into()),
            aud: None,
            iss: None,
            alg: jsonwebtoken::Algorithm::HS384,
        },
    )
    .unwrap();
    assert_eq!(publish_as(&base, "s/a", Some(&alice)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/a", Some(&alice2)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/a", Some(&alice)).await.status(), 429);
    // Another subject has its own.
    assert_eq!(publish_as(&base, "s/b", Some(&bob)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/b", Some(&bob)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/b", Some(&bob)).await.status(), 429);
    // Tokens without `sub` fall back to the client address: two such tokens share it.
    let (anon1, anon2) = (token(None), token(None));
    assert_eq!(publish_as(&base, "s/c", Some(&anon1)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/c", Some(&anon2)).await.status(), 201);
    assert_eq!(publish_as(&base, "s/c", Some(&anon1)).await.status(), 429);
    // A request refused for its token costs no cell and is 401, not 429.
    assert_eq!(publish_as(&base, "s/c", None).await.status(), 401);
    for (t, n) in [("s/a", 2), ("s/b", 2), ("s/c", 2)] {
        let r = client()
            .get(format!("{base}/v1/topics/{t}"))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["count"], n, "{t}: {v}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_publish_over_the_rate_gets_a_rate_limited_error_frame_and_the_socket_stays_open(
) {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.publish_rate_per_sec = 0.05;
        c.publish_burst = 3;
    })
    .await;
    // Subscribed elsewhere: the frames it gets are the answers to its ops.
    let mut ws = ws_open(s.addr, "?topic=elsewhere", None).await;
    for i in 0..2 {
        ws_send(
            &mut ws,
            json!({"op": "publish", "topic": "wr/a", "data": i, "ref": i}),
        )
        .await;
        let ack = ws_frame(&mut ws).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        assert_eq!(ack["ref"], i);
    }
    // HTTP and WebSocket publishes of one publisher share its bucket: the third cell.
    assert_eq!(publish_as(&s.url(""), "wr/a", None).await.status(), 201);
    ws_send(
        &mut ws,
        json!({"op": "publish", "topic": "wr/a", "data": 9, "ref": "over"}),
    )
    .await;
    let error = ws_frame(&mut ws).await;
    assert_eq!(error["op"], "error", "{error}");
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(error["ref"], "over");
    ws_still_serves(&mut ws).await;
    assert_eq!(topic_count(&s.url(""), "wr/a").await, 3);
    assert!(
        metric(
            &s.url(""),
            "tidewire_publish_rate_limited_total{reason=\"ws\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            &s.url(""),
            "tidewire_ws_errors_total{code=\"rate_limited\"}"
        )
        .await
            >= 1.0
    );
    s.stop().await;
}

// ---- Connection caps ----------------------------------------------------------------------

#[tokio::test]
async fn a_connection_over_the_per_address_cap_gets_429_with_the_error_body_not_a_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| c.max_connections_per_ip = 3).await;
    let mut held = hold(s.addr, 3).await;
    let (r, mut refused) = one_shot(s.addr, get_request("/healthz").as_bytes()).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"]["code"], "too_many_connections", "{r:?}");
    assert!(
        closed_within(&mut refused, PATIENCE).await,
        "the refused connection is closed after its answer"
    );
    // The held connections are still served.
    for c in held.iter_mut() {
        c.write_all(get_request("/healthz").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(c).await.expect("answer").status, 200);
    }
    // A place freed is a place taken again.
    held.pop();
    let deadline = Instant::now() + PATIENCE;
    let again = loop {
        if let Some(c) = admitted(s.addr).await {
            break c;
        }
        assert!(Instant::now() < deadline, "the freed place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((again, held));
    let deadline = Instant::now() + PATIENCE;
    while metric(
        &s.url(""),
        "tidewire_connections_refused_total{reason=\"per_ip\"}",
    )
    .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "refusal not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn a_connection_over_the_total_cap_gets_503_with_the_error_body_also_over_http2() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| c.max_connections = 2).await;
    let held = hold(s.addr, 2).await;
    let (r, mut refused) = one_shot(s.addr, get_request("/v1/topics").as_bytes()).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.json()["error"]["code"], "server_at_capacity", "{r:?}");
    assert!(closed_within(&mut refused, PATIENCE).await);
    // An HTTP/2 client (prior knowledge) gets the same answer in its own protocol.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let r = h2
        .get(s.url("/readyz"))
        .send()
        .await
        .expect("an HTTP/2 answer");
    assert_eq!(r.status(), 503);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "server_at_capacity");
    drop(held);
    s.stop().await;
}

// ---- Slow clients -------------------------------------------------------------------------

#[tokio::test]
async fn a_slowloris_connection_is_closed_but_a_quiet_sse_stream_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.header_read_timeout_secs = 1;
        c.idle_timeout_secs = 2;
        c.body_read_timeout_secs = 1;
    })
    .await;
    // A quiet stream: no event and no heartbeat (15 s) while the timeouts pass.
    let mut stream = sse(&s.url("/v1/sse?topic=quiet/**"), None).await;
    // The slowloris: a head that never ends, one header byte at a time.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let closer = tokio::spawn(async move {
        let mut slow = slow;
        let mut buf = [0u8; 256];
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => return false, // an answer instead of a close
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if slow.write_all(b"a").await.is_err() {
                        return true;
                    }
                }
            }
        }
    });
    let closed = timeout(PATIENCE, closer)
        .await
        .expect("the slowloris connection was never closed")
        .unwrap();
    assert!(closed, "the slowloris got an answer instead of a close");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    // Well past every timeout the stream is still open and delivers.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let id = publish_one(&client(), &s.url(""), "quiet/a", json!({"t": 1})).await;
    let ev = common::next_event(&mut stream).await;
    assert_eq!(ev.id, id.to_string());
    assert!(
        metric(
            &s.url(""),
            "tidewire_connections_timed_out_total{reason=\"header_timeout\"}"
        )
        .await
            >= 1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_and_a_waiting_long_poll_outlive_every_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.header_read_timeout_secs = 1;
        c.idle_timeout_secs = 1;
        c.body_read_timeout_secs = 1;
    })
    .await;
    let mut ws = ws_open(s.addr, "?topic=long/**", None).await;
    let poll_url = s.url("/v1/poll?topic=long/**&since=0&timeout=20");
    let poll = tokio::spawn(async move {
        let r = client().get(poll_url).send().await.expect("poll");
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.expect("poll body")
    });
    // Both wait, quiet (WebSocket pings every 15 s), far past the 1 s timeouts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!poll.is_finished(), "the long-poll was cut");
    let id = publish_one(&client(), &s.url(""), "long/a", json!(1)).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["id"], id, "{f}");
    let body = timeout(PATIENCE, poll).await.expect("poll answer").unwrap();
    assert_eq!(body["events"][0]["id"], id, "{body}");
    ws_still_serves(&mut ws).await;
    s.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.idle_timeout_secs = 1;
        c.header_read_timeout_secs = 30;
    })
    .await;
    // Connected and silent.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let started = Instant::now();
    let silent = tokio::spawn(async move {
        let closed = closed_within(&mut silent, PATIENCE).await;
        (closed, started.elapsed())
    });
    // Keep-alive between requests.
    let mut kept = admitted(s.addr).await.expect("admitted");
    // A client that keeps asking is never idle for a whole second.
    let mut busy = admitted(s.addr).await.expect("admitted");
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.write_all(get_request("/healthz").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut busy).await.expect("served").status, 200);
    }
    let (closed, after) = silent.await.unwrap();
    assert!(closed, "a silent connection was never closed");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    assert!(closed_within(&mut kept, PATIENCE).await);
    assert!(
        metric(
            &s.url(""),
            "tidewire_connections_timed_out_total{reason=\"idle_timeout\"}"
        )
        .await
            >= 2.0
    );
    s.stop().await;
}

#[tokio::test]
async fn a_slow_publish_body_gets_408_with_the_error_body_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| c.body_read_timeout_secs = 1).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let body = r#"{"data":{"reading":"0123456789"}}"#;
    let head = format!(
        "POST /v1/topics/slow/a/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = Instant::now();
    let r = read_response(&mut c).await.expect("an answer");
    assert_eq!(r.status, 408, "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.json()["error"]["code"], "request_timeout", "{r:?}");
    assert!(closed_within(&mut c, PATIENCE).await);
    assert_eq!(topic_count(&s.url(""), "slow/a").await, 0);
    // A body that arrives in time is stored.
    publish_one(&client(), &s.url(""), "slow/a", json!(1)).await;
    assert_eq!(
        metric(&s.url(""), "tidewire_publish_body_timeouts_total").await,
        1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| c.max_header_bytes = 4096).await;
    let with_header = |bytes: usize| {
        format!(
            "GET /v1/topics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
            "b".repeat(bytes)
        )
    };
    // Within the limit: served.
    let (r, _) = one_shot(s.addr, with_header(3000).as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Over it: 431 with the contract's body.
    let (r, _) = one_shot(s.addr, with_header(5000).as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "headers_too_large", "{r:?}");
    // Far over it the parser stops reading: a bare 431, and the connection is closed.
    let (r, mut c) = one_shot(s.addr, with_header(20_000).as_bytes()).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert!(closed_within(&mut c, PATIENCE).await);
    s.stop().await;
}

// ---- Subscriptions and patterns -------------------------------------------------------------

#[tokio::test]
async fn max_patterns_applies_to_sse_poll_and_websocket_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| c.max_patterns = 2).await;
    let three = "topic=a&topic=b&topic=c";
    for path in [
        format!("/v1/sse?{three}"),
        format!("/v1/poll?{three}&timeout=0"),
    ] {
        let r = client().get(s.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 422, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "too_many_patterns", "{path}");
    }
    let req = format!("ws://{}/v1/ws?{three}", s.addr)
        .into_client_request()
        .unwrap();
    match timeout(PATIENCE, connect_async(req)).await.unwrap() {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 422);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "too_many_patterns");
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // Two are fine.
    let r = client()
        .get(s.url("/v1/poll?topic=a&topic=b&timeout=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_holds_at_most_ws_max_subscriptions_patterns_and_stays_open_when_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.max_patterns = 2;
        c.ws_max_subscriptions = 3;
    })
    .await;
    let mut ws = ws_open(s.addr, "?topic=m/1&topic=m/2", None).await;
    // One op over max_patterns: too_many_patterns.
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["m/3", "m/4", "m/5"], "ref": "a"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["code"], "too_many_patterns", "{f}");
    // Up to the socket's cap: fine; a pattern it already holds is not a new one.
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["m/3", "m/1"], "ref": "b"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["ref"].as_str()),
        (Some("ack"), Some("b")),
        "{f}"
    );
    // Beyond it: too_many_subscriptions, nothing added, the socket keeps working.
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["m/4"], "ref": "c"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["op"], "error", "{f}");
    assert_eq!(f["code"], "too_many_subscriptions", "{f}");
    assert_eq!(f["ref"], "c");
    ws_still_serves(&mut ws).await;
    publish_one(&client(), &s.url(""), "m/4", json!("not for me")).await;
    let id = publish_one(&client(), &s.url(""), "m/3", json!("mine")).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["id"], id, "only m/3 was added: {f}");
    // After an unsubscribe there is room again.
    ws_send(&mut ws, json!({"op": "unsubscribe", "topics": ["m/1"]})).await;
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["m/4"], "ref": "d"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["ref"].as_str()),
        (Some("ack"), Some("d")),
        "{f}"
    );
    s.stop().await;
}

// ---- Origin policy -------------------------------------------------------------------------

fn upgrade_request(origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /v1/ws?topic=o/** HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
    )
}

#[tokio::test]
async fn a_browser_websocket_from_an_origin_not_allowed_is_refused_with_403_before_upgrading() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.allowed_origins = vec!["http://dash.example".into()]
    })
    .await;
    let mut refused = TcpStream::connect(s.addr).await.unwrap();
    refused
        .write_all(upgrade_request(Some("http://evil.example")).as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut refused).await.expect("answer");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "origin_not_allowed", "{r:?}");
    // A listed origin, the server's own origin, and a client without Origin are let in.
    let own = "http://127.0.0.1";
    for origin in [Some("http://dash.example"), Some(own), None] {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(upgrade_request(origin).as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut c).await.expect("answer");
        assert_eq!(r.status, 101, "{origin:?}: {r:?}");
    }
    // The same with a real client and the port in Host and Origin.
    let mut ws = ws_open(s.addr, "?topic=o/**", Some(&format!("http://{}", s.addr))).await;
    ws_still_serves(&mut ws).await;
    assert!(
        metric(
            &s.url(""),
            "tidewire_requests_rejected_total{status=\"403\",code=\"origin_not_allowed\"}"
        )
        .await
            >= 1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn star_cors_allows_cross_origin_reads_but_not_cross_origin_publishes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(tmp.path(), |c| {
        c.allowed_origins = vec!["*".into(), "http://writer.example".into()]
    })
    .await;
    let c = client();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, s.url("/v1/topics/x/events"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    // Preflight: POST is offered only to an origin listed by name.
    let r = preflight("http://reader.example").await.unwrap();
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(!methods.contains("POST"), "{methods}");
    let r = preflight("http://writer.example").await.unwrap();
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    // A simple cross-origin POST (text/plain needs no preflight) from a `*` origin: 403.
    let r = c
        .post(s.url("/v1/topics/cors/a/events"))
        .header("origin", "http://reader.example")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "origin_not_allowed", "{v}");
    assert_eq!(topic_count(&s.url(""), "cors/a").await, 0);
    // The listed origin publishes; reads work from any origin.
    let r = c
        .post(s.url("/v1/topics/cors/a/events"))
        .header("origin", "http://writer.example")
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .get(s.url("/v1/poll?topic=cors/**&since=0&timeout=0"))
        .header("origin", "http://reader.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://reader.example"
    );
    // A WebSocket from a `*` origin subscribes but may not publish.
    let mut ws = ws_open(
        s.addr,
        "?topic=cors/**&since=0",
        Some("http://reader.example"),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["topic"], "cors/a", "{f}");
    ws_send(
        &mut ws,
        json!({"op": "publish", "topic": "cors/a", "data": 1, "ref": "p"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["code"], "origin_not_allowed", "{f}");
    assert_eq!(f["ref"], "p");
    ws_still_serves(&mut ws).await;
    assert_eq!(topic_count(&s.url(""), "cors/a").await, 1);
    s.stop().await;
}

// ---- The real binary ------------------------------------------------------------------------

#[tokio::test]
async fn the_binary_takes_limits_from_its_environment_and_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tidewire.toml");
    std::fs::write(&cfg, "publish_rate_per_sec = 0.05\npublish_burst = 1\n").unwrap();
    let cfg_arg = cfg.to_string_lossy().into_owned();
    let server = BinServer::spawn_with_env(
        &tmp.path().join("data"),
        &["--config", &cfg_arg],
        &[("TIDEWIRE_MAX_CONNECTIONS_PER_IP", "2")],
    )
    .await;
    let base = server.url("");
    let held = hold(server.addr, 2).await;
    let (r, _) = one_shot(server.addr, get_request("/healthz").as_bytes()).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    drop(held);
    // Wait until the server has seen both close, then publish: one passes, one is limited.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = publish_as(&base, "bin/a", None).await;
        if r.status() == 201 {
            break;
        }
        // Still counted as two connections for a moment: refused at accept, no cell taken.
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections", "{v}");
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(publish_as(&base, "bin/a", None).await.status(), 429);
    drop(server);
}

/// The defaults are the documented ones (the README table and deploy/tidewire.toml say so).
#[test]
fn the_default_limits_are_the_documented_ones() {
    let c = Config::default();
    assert_eq!(c.publish_rate_per_sec, 0.0);
    assert_eq!(c.publish_burst, 0);
    assert_eq!(c.max_connections, 16_384);
    assert_eq!(c.max_connections_per_ip, 0);
    assert_eq!(c.ws_max_subscriptions, 64);
    assert_eq!(c.header_read_timeout_secs, 10);
    assert_eq!(c.body_read_timeout_secs, 60);
    assert_eq!(c.idle_timeout_secs, 90);
    assert_eq!(c.max_header_bytes, 32 * 1024);
}

#[tokio::test]
async fn shutdown_closes_connections_without_a_whole_request_at_once_not_after_their_timeouts() {
    let tmp = tempfile::tempdir().unwrap();
    // Timeouts and a grace period far beyond PATIENCE: the stop only finishes in time if
    // these connections are closed at once.
    let s = TestServer::start_with(tmp.path(), |c| {
        c.header_read_timeout_secs = 300;
        c.idle_timeout_secs = 300;
        c.shutdown_grace_secs = 300;
    })
    .await;
    let mut conns = Vec::new();
    for (what, bytes) in [
        ("silent (a preconnect)", ""),
        (
            "half an event stream head",
            "GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\n",
        ),
        (
            "half a publish head",
            "POST /v1/topics/a/events HTTP/1.1\r\n",
        ),
    ] {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(bytes.as_bytes()).await.unwrap();
        conns.push((what, c));
    }
    conns.push((
        "kept alive after a request",
        admitted(s.addr).await.expect("admitted"),
    ));
    // Every one of them accepted (the metrics request is one more).
    let base = s.url("");
    let deadline = Instant::now() + PATIENCE;
    while metric(&base, "tidewire_connections_open").await < 5.0 {
        assert!(Instant::now() < deadline, "connections never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    s.stop().await;
    let took = started.elapsed();
    eprintln!("stopped in {took:?} with {} open connections", conns.len());
    for (what, mut c) in conns {
        assert!(
            closed_within(&mut c, Duration::from_secs(5)).await,
            "{what}: still open after the server stopped"
        );
    }
}
