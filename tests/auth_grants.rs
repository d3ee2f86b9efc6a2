//! What a token's grants let through, checked from outside on a real keyed server: a table of
//! (grant, requested pattern, allowed?) answered 200 or 403 by SSE, long-poll and the WebSocket
//! upgrade; and many events published to many topics, where each subscriber (SSE, WebSocket,
//! long-poll; each with its own token) receives exactly the events its requested patterns match
//! and nothing outside its grants. Tokens are signed with the `jsonwebtoken` encoder, as in
//! tests/auth.rs; the expected matches come from a small matcher written here, not the server's.

mod common;

use common::auth::{client, now};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestServer, PATIENCE};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tidewire::config::Secret;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "tidewire-grants-tests-secret-0123456789abcdef";

/// An HS256 token with these grants, valid for two minutes.
fn token(publish: &[&str], subscribe: &[&str]) -> String {
    let claims = json!({
        "sub": "grants",
        "exp": now() + 120,
        "tidewire": {"publish": publish, "subscribe": subscribe},
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

async fn keyed(tmp: &tempfile::TempDir) -> TestServer {
    TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(Secret::new(SECRET));
        c.jwt_leeway_secs = 0;
    })
    .await
}

/// `?topic=P1&topic=P2…`
fn query(patterns: &[&str]) -> String {
    let parts: Vec<String> = patterns.iter().map(|p| format!("topic={p}")).collect();
    format!("?{}", parts.join("&"))
}

/// A pattern matcher written for this test: `*` is one segment, a trailing `**` zero or more.
fn matches(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    if p.last() == Some(&"**") {
        let fixed = &p[..p.len() - 1];
        t.len() >= fixed.len() && fixed.iter().zip(&t).all(|(p, t)| *p == "*" || p == t)
    } else {
        p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| *p == "*" || p == t)
    }
}

async fn status(r: reqwest::RequestBuilder) -> u16 {
    r.send().await.expect("request").status().as_u16()
}

/// The WebSocket upgrade's answer: 101, or the refusal's status.
async fn ws_status(addr: SocketAddr, query: &str, token: &str) -> u16 {
    ws_open(addr, query, token)
        .await
        .map(|_| 101)
        .unwrap_or_else(|s| s)
}

async fn ws_open(addr: SocketAddr, query: &str, token: &str) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/v1/ws{query}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    match timeout(PATIENCE, connect_async(req))
        .await
        .expect("connect timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

/// The statuses SSE, long-poll and the WebSocket upgrade give `token` for `patterns`.
async fn subscribe_statuses(s: &TestServer, token: &str, patterns: &[&str]) -> [u16; 3] {
    let q = query(patterns);
    let sse = status(
        client()
            .get(s.url(&format!("/v1/sse{q}")))
            .bearer_auth(token)
            .header("accept", "text/event-stream"),
    )
    .await;
    let poll = status(
        client()
            .get(s.url(&format!("/v1/poll{q}&timeout=0")))
            .bearer_auth(token),
    )
    .await;
    let ws = ws_status(s.addr, &q, token).await;
    [sse, poll, ws]
}

// ---- The coverage matrix ------------------------------------------------------------------

/// (granted subscribe patterns, requested pattern, allowed): allowed exactly when one granted
/// pattern matches every topic the requested one can ever match.
const MATRIX: &[(&[&str], &str, bool)] = &[
    // `**` covers everything, itself included.
    (&["**"], "anything/at/all", true),
    (&["**"], "*", true),
    (&["**"], "a/**", true),
    (&["**"], "**", true),
    // A trailing `**` covers its prefix itself, narrower wildcards, deeper `**`.
    (&["a/**"], "a", true),
    (&["a/**"], "a/b", true),
    (&["a/**"], "a/*", true),
    (&["a/**"], "a/*/c", true),
    (&["a/**"], "a/b/**", true),
    (&["a/**"], "a/**", true),
    (&["a/**"], "**", false),
    (&["a/**"], "*", false),
    (&["a/**"], "ab", false),
    (&["a/**"], "b/a", false),
    (&["sensors/**"], "sensors/*/t", true),
    (&["sensors/**"], "sensors", true),
    (&["sensors/**"], "sensorsX/a", false),
    // `*` is exactly one segment.
    (&["sensors/*"], "sensors/x", true),
    (&["sensors/*"], "sensors/*", true),
    (&["sensors/*"], "sensors/**", false),
    (&["sensors/*"], "sensors", false),
    (&["sensors/*"], "sensors/x/y", false),
    (&["*"], "a", true),
    (&["*"], "*", true),
    (&["*"], "a/b", false),
    (&["*"], "**", false),
    (&["*/x"], "a/x", true),
    (&["*/x"], "*/x", true),
    (&["*/x"], "*/*", false),
    (&["*/x"], "a/**", false),
    (&["a/*/c"], "a/b/c", true),
    (&["a/*/c"], "a/*/c", true),
    (&["a/*/c"], "a/**", false),
    (&["a/*/c"], "a/b/*", false),
    (&["a/*/c"], "a/b/c/d", false),
    (&["a/*/**"], "a/b", true),
    (&["a/*/**"], "a/*", true),
    (&["a/*/**"], "a/b/c/d", true),
    (&["a/*/**"], "a/*/c/**", true),
    (&["a/*/**"], "a", false),
    (&["a/*/**"], "a/**", false),
    // A literal covers only itself.
    (&["a/b"], "a/b", true),
    (&["a/b"], "a", false),
    (&["a/b"], "a/*", false),
    (&["a/b"], "a/b/**", false),
    (&["a/b"], "a/b/c", false),
    // Several grants: one of them must cover the request.
    (&["x", "sensors/**"], "sensors/a", true),
    (&["x", "sensors/**"], "x", true),
    (&["x", "sensors/**"], "y", false),
    // No subscribe grant covers nothing.
    (&[], "a", false),
];

#[tokio::test]
async fn the_coverage_matrix_gets_403_exactly_where_the_grant_does_not_cover_the_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp).await;
    let mut wrong = Vec::new();
    for &(grants, requested, allowed) in MATRIX {
        let t = token(&[], grants);
        let got = subscribe_statuses(&s, &t, &[requested]).await;
        let want = if allowed { [200, 200, 101] } else { [403; 3] };
        if got != want {
            wrong.push(format!(
                "grant {grants:?}, request {requested:?}: [sse, poll, ws] {got:?}, expected {want:?}"
            ));
        }
    }
    // Publishing names a topic, never a pattern: covered means matched.
    for (grants, topic, allowed) in [
        (&["sensors/*/t"][..], "sensors/x/t", true),
        (&["sensors/*/t"], "sensors/x/h", false),
        (&["sensors/**"], "sensors", true),
        (&["sensors/*"], "sensors", false),
        (&["**"], "a/b/c", true),
        (&["a/b"], "a/b/c", false),
    ] {
        let t = token(grants, &[]);
        let got = status(
            client()
                .post(s.url(&format!("/v1/topics/{topic}/events")))
                .bearer_auth(&t)
                .header("content-type", "application/json")
                .body(r#"{"data":1}"#),
        )
        .await;
        let want = if allowed { 201 } else { 403 };
        if got != want {
            wrong.push(format!(
                "publish grant {grants:?}, topic {topic:?}: {got}, expected {want}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    s.stop().await;
}

// ---- No event outside the grants ----------------------------------------------------------

const TOPICS: &[&str] = &[
    "a",
    "a/1/x",
    "a/1/y",
    "a/2/x",
    "a/2/x/deep",
    "a/x",
    "ab/1/x",
    "b/c",
    "b/c/d",
    "b/d",
    "c",
    "c/a/1/x",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Sse,
    Ws,
    Poll,
}

/// A subscriber: how it listens, what its token grants, what it asks for.
struct Sub {
    transport: Transport,
    grant: &'static [&'static str],
    requested: &'static [&'static str],
}

const SUBS: &[Sub] = &[
    Sub {
        transport: Transport::Sse,
        grant: &["a/**"],
        requested: &["a/**"],
    },
    Sub {
        transport: Transport::Sse,
        grant: &["a/*/x", "b/c"],
        requested: &["a/*/x", "b/c"],
    },
    Sub {
        transport: Transport::Sse,
        grant: &["**"],
        requested: &["b/*"],
    },
    // Overlapping patterns: a/1/x matches both, and must still come once.
    Sub {
        transport: Transport::Sse,
        grant: &["a/**"],
        requested: &["a/1/*", "a/*/x"],
    },
    Sub {
        transport: Transport::Ws,
        grant: &["a/*/x"],
        requested: &["a/*/x"],
    },
    Sub {
        transport: Transport::Ws,
        grant: &["b/c"],
        requested: &["b/c"],
    },
    Sub {
        transport: Transport::Ws,
        grant: &["**"],
        requested: &["**"],
    },
    Sub {
        transport: Transport::Ws,
        grant: &["a/**", "c"],
        requested: &["a/*", "c"],
    },
    Sub {
        transport: Transport::Poll,
        grant: &["a/**"],
        requested: &["a/1/*"],
    },
    Sub {
        transport: Transport::Poll,
        grant: &["b/c", "c"],
        requested: &["c", "b/c"],
    },
    Sub {
        transport: Transport::Poll,
        grant: &["**"],
        requested: &["*"],
    },
];

/// What one subscriber received: (id, topic, the publisher's sequence number).
type Received = Arc<Mutex<Vec<(u64, String, u64)>>>;

fn record(into: &Received, env: &Value) {
    let id = env["id"].as_u64().expect("id");
    let topic = env["topic"].as_str().expect("topic").to_string();
    let n = env["data"]["n"].as_u64().expect("data.n");
    into.lock().expect("lock").push((id, topic, n));
}

/// Starts listening for `sub` from the start of the log (so nothing depends on when the live
/// subscription is registered); events go into the returned list.
async fn listen(s: &TestServer, sub: &Sub) -> (Received, tokio::task::JoinHandle<()>) {
    let got: Received = Arc::default();
    let into = got.clone();
    let t = token(&[], sub.grant);
    let q = query(sub.requested);
    let task = match sub.transport {
        Transport::Sse => {
            let resp = client_streaming()
                .get(s.url(&format!("/v1/sse{q}&last_event_id=0")))
                .bearer_auth(&t)
                .header("accept", "text/event-stream")
                .send()
                .await
                .expect("SSE connect");
            assert_eq!(resp.status(), 200, "SSE {:?}", sub.requested);
            let mut events = Box::pin(resp.bytes_stream().eventsource());
            tokio::spawn(async move {
                while let Some(ev) = events.next().await {
                    let ev = ev.expect("SSE parse");
                    record(&into, &serde_json::from_str(&ev.data).expect("JSON"));
                }
            })
        }
        Transport::Ws => {
            let mut ws = ws_open(s.addr, &format!("{q}&since=0"), &t)
                .await
                .expect("WebSocket accepted");
            // Asking later for more than the grant is refused, and changes nothing.
            let beyond = json!({"op": "subscribe", "topics": ["**"], "ref": "beyond"});
            ws.send(Message::Text(beyond.to_string().into()))
                .await
                .expect("send");
            let beyond_refused = sub.grant != ["**"];
            tokio::spawn(async move {
                let mut saw_answer = false;
                while let Some(msg) = ws.next().await {
                    let Ok(Message::Text(text)) = msg else {
                        continue;
                    };
                    let f: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                    if f["ref"] == "beyond" {
                        assert!(!saw_answer, "one answer to the subscribe op: {f}");
                        saw_answer = true;
                        let want = if beyond_refused { "error" } else { "ack" };
                        assert_eq!(f["op"], want, "{f}");
                        if beyond_refused {
                            assert_eq!(f["code"], "forbidden", "{f}");
                        }
                    } else if f.get("op").is_none() {
                        record(&into, &f);
                    }
                }
            })
        }
        Transport::Poll => {
            let url = s.url(&format!("/v1/poll{q}&timeout=5"));
            tokio::spawn(async move {
                let mut since = 0u64;
                loop {
                    let resp = client()
                        .get(format!("{url}&since={since}"))
                        .bearer_auth(&t)
                        .send()
                        .await
                        .expect("poll");
                    assert_eq!(resp.status(), 200);
                    let body: Value = resp.json().await.expect("JSON");
                    assert!(body.get("gap").is_none(), "{body}");
                    for ev in body["events"].as_array().expect("events") {
                        record(&into, ev);
                    }
                    since = body["next"].as_u64().expect("next");
                }
            })
        }
    };
    (got, task)
}

/// A client without a total timeout, for streams that stay open.
fn client_streaming() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(PATIENCE)
        .build()
        .expect("client")
}

#[tokio::test]
async fn a_subscriber_never_receives_an_event_outside_its_grants() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp).await;

    // Asking for more than the grant is refused at subscribe time, on every transport.
    for (grant, requested) in [
        (&["a/*/x"][..], &["a/**"][..]),
        (&["a/*/x", "b/c"], &["b/*"]),
        (&["a/**"], &["**"]),
        (&["b/c"], &["b/c/**"]),
        (&["a/**"], &["a/1/x", "b/c"]),
    ] {
        let got = subscribe_statuses(&s, &token(&[], grant), requested).await;
        assert_eq!(got, [403; 3], "grant {grant:?}, request {requested:?}");
    }

    let mut listening = Vec::new();
    for sub in SUBS {
        listening.push(listen(&s, sub).await);
    }

    // Many events to many topics, one at a time and in gateway batches; `n` names each one.
    let publisher = token(&["**"], &[]);
    let mut published: Vec<(u64, &str)> = Vec::new();
    for round in 0..4 {
        for topic in TOPICS {
            let n = published.len() as u64;
            let resp = client()
                .post(s.url(&format!("/v1/topics/{topic}/events")))
                .bearer_auth(&publisher)
                .header("content-type", "application/json")
                .body(json!({"data": {"n": n, "round": round}}).to_string())
                .send()
                .await
                .expect("publish");
            assert_eq!(resp.status(), 201);
            published.push((n, topic));
        }
        let batch: Vec<Value> = TOPICS
            .iter()
            .enumerate()
            .map(|(i, topic)| {
                json!({"topic": topic, "data": {"n": published.len() + i, "round": round}})
            })
            .collect();
        let resp = client()
            .post(s.url("/v1/events"))
            .bearer_auth(&publisher)
            .header("content-type", "application/json")
            .body(Value::Array(batch).to_string())
            .send()
            .await
            .expect("publish batch");
        assert_eq!(resp.status(), 201);
        for topic in TOPICS {
            published.push((published.len() as u64, topic));
        }
    }

    let expected: Vec<BTreeSet<u64>> = SUBS
        .iter()
        .map(|sub| {
            published
                .iter()
                .filter(|(_, topic)| sub.requested.iter().any(|p| matches(p, topic)))
                .map(|(n, _)| *n)
                .collect()
        })
        .collect();
    // Wait until each has at least what it should get, then a little longer for strays.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for ((got, task), want) in listening.iter().zip(&expected) {
        while got.lock().expect("lock").len() < want.len() && !task.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {} of {} events",
                got.lock().expect("lock").len(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    for ((sub, (got, task)), want) in SUBS.iter().zip(&listening).zip(&expected) {
        let what = format!(
            "{:?} granted {:?} asking {:?}",
            sub.transport, sub.grant, sub.requested
        );
        // A listener that panicked (wrong status, refused op answered wrongly) fails here.
        assert!(!task.is_finished(), "{what}: the listener stopped");
        task.abort();
        let got = got.lock().expect("lock").clone();
        for (_, topic, _) in &got {
            assert!(
                sub.grant.iter().any(|g| matches(g, topic)),
                "{what}: received {topic}, outside its grant"
            );
            assert!(
                sub.requested.iter().any(|p| matches(p, topic)),
                "{what}: received {topic}, which it did not ask for"
            );
        }
        let ns: Vec<u64> = got.iter().map(|(_, _, n)| *n).collect();
        let unique: BTreeSet<u64> = ns.iter().copied().collect();
        assert_eq!(unique.len(), ns.len(), "{what}: each event once: {ns:?}");
        assert_eq!(&unique, want, "{what}: exactly the events it asked for");
        let ids: Vec<u64> = got.iter().map(|(id, _, _)| *id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{what}: in id order: {ids:?}"
        );
        assert!(!want.is_empty(), "{what}: the case tests something");
    }
    s.stop().await;
}
