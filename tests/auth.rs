//! JWT authorization from outside: a real server (in-process, or the binary where startup and
//! logs matter) on a loopback port with sled in a temp dir; tokens minted independently of the
//! server's verifier (the `jsonwebtoken` encoder, hand-built JWTs for `alg: none` and tampering,
//! and `tidewire token`); independent clients (reqwest, eventsource-stream, tokio-tungstenite).
//!
//! Expiry tests use tokens that live 2 to 3 seconds on a server with no leeway, and generous
//! timeouts around them.

mod common;

use common::auth::{answer, client, fixture, now, says_invalid_token};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{free_addr, wait_ready_unless, TestServer, PATIENCE};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, Stream, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tidewire::config::{Config, Secret};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "tidewire-auth-tests-secret-0123456789abcdef";

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).expect("sign")
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn claims(publish: &[&str], subscribe: &[&str], ttl_secs: u64) -> Value {
    json!({
        "sub": "test",
        "exp": now() + ttl_secs,
        "tidewire": {"publish": publish, "subscribe": subscribe},
    })
}

/// An HS256 token with these grants, valid for `ttl_secs`.
fn token(publish: &[&str], subscribe: &[&str], ttl_secs: u64) -> String {
    hs(&claims(publish, subscribe, ttl_secs))
}

/// A token that may do everything for a minute: used to look at what was (not) stored.
fn admin() -> String {
    token(&["**"], &["**"], 60)
}

/// A JWT built by hand, with any header: for `alg: none` and tampering.
fn raw_jwt(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        signature
    )
}

/// A server that checks HS tokens signed with [`SECRET`], with no leeway.
async fn keyed(tmp: &tempfile::TempDir, tune: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(Secret::new(SECRET));
        c.jwt_leeway_secs = 0;
        tune(c);
    })
    .await
}

async fn publish(
    s: &TestServer,
    topic: &str,
    token: Option<&str>,
    data: Value,
) -> (u16, Option<String>, Value) {
    let mut r = client()
        .post(s.url(&format!("/v1/topics/{topic}/events")))
        .header("content-type", "application/json")
        .body(json!({ "data": data }).to_string());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    answer(r).await
}

async fn get(s: &TestServer, path: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut r = client().get(s.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    answer(r).await
}

/// The topics the admin token sees: what was stored.
async fn stored_topics(s: &TestServer) -> Vec<String> {
    let (status, _, body) = get(s, "/v1/topics", Some(&admin())).await;
    assert_eq!(status, 200, "{body}");
    body["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .map(|t| t["topic"].as_str().expect("name").to_string())
        .collect()
}

/// WebSocket handshake with an optional bearer token: the socket, or the refusal's status and
/// `WWW-Authenticate`.
async fn ws_connect(
    addr: SocketAddr,
    query: &str,
    token: Option<&str>,
) -> Result<Ws, (u16, Option<String>)> {
    let mut req = format!("ws://{addr}/v1/ws{query}")
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    match timeout(PATIENCE, connect_async(req))
        .await
        .expect("connect timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().expect("ascii").to_string()),
        )),
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

/// What a socket said next: a JSON frame, or its close code and reason.
#[derive(Debug)]
enum Said {
    Frame(Value),
    Closed(Option<(u16, String)>),
}

async fn ws_next(ws: &mut Ws, within: Duration) -> Said {
    // One deadline for the whole wait: protocol pings must not keep extending it.
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("timed out waiting for the socket");
        match msg {
            None => return Said::Closed(None),
            Some(Err(e)) => panic!("socket error: {e}"),
            Some(Ok(Message::Text(t))) => {
                return Said::Frame(serde_json::from_str(t.as_str()).expect("JSON frame"))
            }
            Some(Ok(Message::Close(c))) => {
                return Said::Closed(c.map(|f| (u16::from(f.code), f.reason.to_string())))
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn ws_frame(ws: &mut Ws) -> Value {
    match ws_next(ws, PATIENCE).await {
        Said::Frame(v) => v,
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// An SSE stream opened with a bearer token (or refused: the status).
async fn sse_open(
    s: &TestServer,
    query: &str,
    token: &str,
    last_event_id: Option<u64>,
) -> Result<impl Stream<Item = eventsource_stream::Event> + Unpin, u16> {
    let mut r = reqwest::Client::new()
        .get(s.url(&format!("/v1/sse{query}")))
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        r = r.header("last-event-id", id.to_string());
    }
    let resp = r.send().await.expect("SSE connect");
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    Ok(Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|e| e.expect("SSE parse")),
    ))
}

/// The ids of the events of an SSE stream until it ends (asserting it ends within `within`).
async fn sse_ids_until_end(
    stream: &mut (impl Stream<Item = eventsource_stream::Event> + Unpin),
    within: Duration,
) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + within;
    let mut ids = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(ev)) => ids.push(ev.id.parse().expect("numeric id")),
            Ok(None) => return ids,
            Err(_) => panic!("the SSE stream did not end (got {ids:?})"),
        }
    }
}

async fn sse_ids(
    stream: &mut (impl Stream<Item = eventsource_stream::Event> + Unpin),
    n: usize,
) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let ev = timeout(PATIENCE, stream.next())
            .await
            .expect("timed out waiting for an SSE event")
            .expect("SSE stream ended");
        ids.push(ev.id.parse().expect("numeric id"));
    }
    ids
}

fn is_bearer_challenge(c: &Option<String>) -> bool {
    c.as_deref().is_some_and(|c| c.starts_with("Bearer"))
}

// ---- 401: who are you? ---------------------------------------------------------------------

#[tokio::test]
async fn requests_without_a_token_get_401_with_a_bearer_challenge_on_every_transport() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let checks = [
        publish(&s, "a/b", None, json!(1)).await,
        answer(
            client()
                .post(s.url("/v1/events"))
                .header("content-type", "application/json")
                .body(r#"[{"topic":"a/b","data":1}]"#),
        )
        .await,
        get(&s, "/v1/sse?topic=a/**", None).await,
        get(&s, "/v1/poll?topic=a/**&timeout=0", None).await,
        get(&s, "/v1/topics", None).await,
        get(&s, "/v1/topics/a/b", None).await,
    ];
    for (status, challenge, body) in checks {
        assert_eq!(status, 401, "{body}");
        assert!(is_bearer_challenge(&challenge), "{challenge:?}");
        assert!(
            !says_invalid_token(&challenge),
            "no token was presented: {challenge:?}"
        );
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    let refused = ws_connect(s.addr, "?topic=a/**", None)
        .await
        .expect_err("a socket without a token is refused");
    assert_eq!(refused.0, 401);
    assert!(is_bearer_challenge(&refused.1));
    // Liveness, readiness and (without metrics_token) metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&s, path, None).await.0, 200, "{path}");
    }
    assert!(stored_topics(&s).await.is_empty(), "nothing was stored");
    s.stop().await;
}

#[tokio::test]
async fn every_refused_token_is_401_invalid_token_on_every_transport() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let grants = claims(&["**"], &["**"], 60);
    let good = hs(&grants);
    let parts: Vec<&str> = good.split('.').collect();
    let mut everything = grants.clone();
    everything["tidewire"]["publish"] = json!(["**", "more/**"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(everything.to_string()),
        parts[2]
    );
    let wrong_key = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-that-is-long-enough-000"),
        &grants,
    );
    let alg_none = raw_jwt(&json!({"alg": "none", "typ": "JWT"}), &grants, "");
    let expired =
        hs(&json!({"exp": now() - 5, "tidewire": {"publish": ["**"], "subscribe": ["**"]}}));
    let not_yet = hs(&json!({"exp": now() + 60, "nbf": now() + 30,
        "tidewire": {"publish": ["**"], "subscribe": ["**"]}}));
    let no_exp = hs(&json!({"tidewire": {"publish": ["**"], "subscribe": ["**"]}}));
    let cases = [
        ("malformed", "not-a-jwt".to_string()),
        ("three garbage parts", "a.b.c".to_string()),
        ("tampered payload", tampered),
        ("signed with another key", wrong_key),
        ("alg none", alg_none),
        ("expired", expired),
        ("not yet valid", not_yet),
        ("without exp", no_exp),
    ];
    for (what, t) in &cases {
        let t = Some(t.as_str());
        for (transport, (status, challenge, body)) in [
            ("publish", publish(&s, "a/b", t, json!(1)).await),
            ("sse", get(&s, "/v1/sse?topic=a/**", t).await),
            ("poll", get(&s, "/v1/poll?topic=a/**&timeout=0", t).await),
            ("topics", get(&s, "/v1/topics", t).await),
            ("topic", get(&s, "/v1/topics/a/b", t).await),
        ] {
            assert_eq!(status, 401, "{what} on {transport}: {body}");
            assert!(
                says_invalid_token(&challenge),
                "{what} on {transport}: {challenge:?}"
            );
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        let refused = ws_connect(s.addr, "?topic=a/**", t)
            .await
            .expect_err("refused at the upgrade");
        assert_eq!(refused.0, 401, "{what} on ws");
        assert!(says_invalid_token(&refused.1), "{what} on ws");
    }
    assert!(stored_topics(&s).await.is_empty(), "nothing was stored");
    s.stop().await;
}

#[tokio::test]
async fn an_hs256_token_against_an_rs256_server_is_401() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start_with(tmp.path(), |c| {
        c.jwt_public_key = Some(fixture("rs256-public.pem"));
        c.jwt_leeway_secs = 0;
    })
    .await;
    let grants = claims(&["**"], &["**"], 60);
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).expect("fixture"))
            .expect("RSA key");
    let good = sign(Algorithm::RS256, &rsa, &grants);
    assert_eq!(publish(&s, "a/b", Some(&good), json!(1)).await.0, 201);

    // The classic confusion: HMAC keyed with the (public) key file's bytes.
    let public_pem = std::fs::read(fixture("rs256-public.pem")).expect("fixture");
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        &grants,
    );
    let plain_hs = hs(&grants);
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256-private.pem")).expect("fixture"))
            .expect("EC key");
    let other_family = sign(Algorithm::ES256, &ec, &grants);
    // RS512 with the right key is still not an algorithm this server accepts.
    let other_rsa_alg = sign(Algorithm::RS512, &rsa, &grants);
    for (what, t) in [
        ("HS256 keyed with the public key", confused),
        ("HS256", plain_hs),
        ("ES256", other_family),
        ("RS512", other_rsa_alg),
    ] {
        let (status, challenge, _) = publish(&s, "a/b", Some(&t), json!(2)).await;
        assert_eq!(status, 401, "{what}");
        assert!(says_invalid_token(&challenge), "{what}");
    }
    let (_, _, body) = get(&s, "/v1/topics/a/b", Some(&good)).await;
    assert_eq!(body["count"], 1, "only the RS256 publish was stored");
    s.stop().await;
}

#[tokio::test]
async fn es256_tokens_verify_against_an_ec_public_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start_with(tmp.path(), |c| {
        c.jwt_public_key = Some(fixture("es256-public.pem"));
        c.jwt_leeway_secs = 0;
    })
    .await;
    let grants = claims(&["a/**"], &["a/**"], 60);
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256-private.pem")).expect("fixture"))
            .expect("EC key");
    let good = sign(Algorithm::ES256, &ec, &grants);
    assert_eq!(publish(&s, "a/b", Some(&good), json!(1)).await.0, 201);
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).expect("fixture"))
            .expect("RSA key");
    let wrong = sign(Algorithm::RS256, &rsa, &grants);
    assert_eq!(publish(&s, "a/b", Some(&wrong), json!(2)).await.0, 401);
    s.stop().await;
}

#[tokio::test]
async fn audience_and_issuer_must_match_when_configured() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |c| {
        c.jwt_audience = Some("tidewire-prod".into());
        c.jwt_issuer = Some("https://auth.example".into());
    })
    .await;
    let with = |aud: Option<&str>, iss: Option<&str>| {
        let mut c = claims(&["**"], &["**"], 60);
        if let Some(a) = aud {
            c["aud"] = json!(a);
        }
        if let Some(i) = iss {
            c["iss"] = json!(i);
        }
        hs(&c)
    };
    let good = with(Some("tidewire-prod"), Some("https://auth.example"));
    assert_eq!(publish(&s, "a/b", Some(&good), json!(1)).await.0, 201);
    for (what, t) in [
        (
            "wrong aud",
            with(Some("tidewire-dev"), Some("https://auth.example")),
        ),
        (
            "wrong iss",
            with(Some("tidewire-prod"), Some("https://evil.example")),
        ),
        ("no aud", with(None, Some("https://auth.example"))),
        ("no iss", with(Some("tidewire-prod"), None)),
    ] {
        let (status, challenge, body) = publish(&s, "a/b", Some(&t), json!(2)).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(says_invalid_token(&challenge), "{what}");
    }
    s.stop().await;
}

// ---- 403: the token is fine, the grants are not enough --------------------------------------

#[tokio::test]
async fn publish_outside_the_grant_is_403_and_stores_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let device = token(&["sensors/*/t"], &[], 60);
    let (status, challenge, body) = publish(&s, "sensors/x/h", Some(&device), json!(1)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert!(
        challenge
            .as_deref()
            .is_some_and(|c| c.contains("insufficient_scope")),
        "{challenge:?}"
    );
    // A gateway batch with one topic outside the grant is refused whole.
    let (status, _, body) = answer(
        client()
            .post(s.url("/v1/events"))
            .bearer_auth(&device)
            .header("content-type", "application/json")
            .body(r#"[{"topic":"sensors/a/t","data":1},{"topic":"sensors/b/t","data":2},{"topic":"sensors/c","data":3}]"#),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(stored_topics(&s).await.is_empty(), "nothing was stored");
    // Within the grant, single and batch are accepted.
    assert_eq!(
        publish(&s, "sensors/x/t", Some(&device), json!(1)).await.0,
        201
    );
    let (status, _, body) = answer(
        client()
            .post(s.url("/v1/events"))
            .bearer_auth(&device)
            .header("content-type", "application/json")
            .body(r#"[{"topic":"sensors/a/t","data":1},{"topic":"sensors/b/t","data":2}]"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        stored_topics(&s).await,
        ["sensors/a/t", "sensors/b/t", "sensors/x/t"]
    );
    s.stop().await;
}

#[tokio::test]
async fn subscribing_outside_the_grant_is_403_on_sse_poll_and_websocket() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let reader = token(&[], &["sensors/*", "dash/**"], 60);
    // Not covered: `sensors/*` does not cover `sensors/**`; a grant to subscribe is not one to
    // read something else; one uncovered pattern of several refuses the request.
    for query in [
        "?topic=sensors/**",
        "?topic=other",
        "?topic=dash/a&topic=sensors/a/b",
    ] {
        let (status, _, body) = get(&s, &format!("/v1/sse{query}"), Some(&reader)).await;
        assert_eq!(status, 403, "sse {query}: {body}");
        assert_eq!(body["error"]["code"], "forbidden");
        let (status, _, body) = get(&s, &format!("/v1/poll{query}&timeout=0"), Some(&reader)).await;
        assert_eq!(status, 403, "poll {query}: {body}");
        let refused = ws_connect(s.addr, query, Some(&reader))
            .await
            .expect_err("refused at the upgrade");
        assert_eq!(refused.0, 403, "ws {query}");
    }
    // Covered: narrower patterns and the granted ones themselves.
    for query in [
        "?topic=sensors/a",
        "?topic=dash/*/x&topic=dash/**",
        "?topic=sensors/*",
    ] {
        let (status, _, body) = get(&s, &format!("/v1/poll{query}&timeout=0"), Some(&reader)).await;
        assert_eq!(status, 200, "poll {query}: {body}");
        let ws = ws_connect(s.addr, query, Some(&reader)).await;
        assert!(ws.is_ok(), "ws {query}");
    }
    // A publish grant is not a subscribe grant.
    let writer = token(&["**"], &[], 60);
    assert_eq!(
        get(&s, "/v1/poll?topic=a&timeout=0", Some(&writer)).await.0,
        403
    );
    s.stop().await;
}

#[tokio::test]
async fn the_topics_api_shows_only_what_the_token_may_subscribe_to() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    for t in ["a/x", "a/y/z", "b/x", "c"] {
        assert_eq!(publish(&s, t, Some(&admin()), json!(1)).await.0, 201);
    }
    let reader = token(&[], &["a/**", "*/x"], 60);
    let names = |body: &Value| -> Vec<String> {
        body["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .map(|t| t["topic"].as_str().expect("name").to_string())
            .collect()
    };
    let (status, _, body) = get(&s, "/v1/topics", Some(&reader)).await;
    assert_eq!(status, 200);
    assert_eq!(names(&body), ["a/x", "a/y/z", "b/x"]);
    let (_, _, body) = get(&s, "/v1/topics?pattern=*/x", Some(&reader)).await;
    assert_eq!(names(&body), ["a/x", "b/x"]);
    let (_, _, body) = get(&s, "/v1/topics?pattern=**&limit=2", Some(&reader)).await;
    assert_eq!(names(&body), ["a/x", "a/y/z"]);
    let (_, _, body) = get(&s, "/v1/topics?pattern=c", Some(&reader)).await;
    assert_eq!(names(&body), Vec::<String>::new());

    let (status, _, body) = get(&s, "/v1/topics/a/y/z", Some(&reader)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 1);
    // Outside the grants: 403 whether or not the topic exists, so existence does not leak.
    for name in ["c", "b/nothing"] {
        let (status, _, body) = get(&s, &format!("/v1/topics/{name}"), Some(&reader)).await;
        assert_eq!(status, 403, "{name}: {body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    assert_eq!(get(&s, "/v1/topics/a/nothing", Some(&reader)).await.0, 404);
    s.stop().await;
}

// ---- Where the token comes from -----------------------------------------------------------

#[tokio::test]
async fn the_token_is_read_from_the_header_the_cookie_and_the_query() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let t = token(&[], &["a/**"], 60);
    let url = s.url("/v1/poll?topic=a/**&timeout=0");
    let (status, _, _) = answer(client().get(&url).bearer_auth(&t)).await;
    assert_eq!(status, 200, "header");
    let (status, _, _) = answer(
        client()
            .get(&url)
            .header("cookie", format!("theme=dark; tidewire_token={t}")),
    )
    .await;
    assert_eq!(status, 200, "cookie");
    let (status, _, _) = answer(client().get(format!("{url}&access_token={t}"))).await;
    assert_eq!(status, 200, "query");
    // The header wins: a bad header is not rescued by a good cookie.
    let (status, _, _) = answer(
        client()
            .get(&url)
            .bearer_auth("bad.token.here")
            .header("cookie", format!("tidewire_token={t}")),
    )
    .await;
    assert_eq!(status, 401, "header first");
    // Browser WebSockets can only use the query (or a cookie).
    let ws = ws_connect(s.addr, &format!("?topic=a/**&access_token={t}"), None).await;
    assert!(ws.is_ok(), "ws with the query token");
    s.stop().await;
}

#[tokio::test]
async fn the_query_token_is_ignored_when_disabled_by_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |c| c.jwt_query_token = false).await;
    let t = token(&[], &["a/**"], 60);
    let (status, challenge, _) = get(
        &s,
        &format!("/v1/poll?topic=a/**&timeout=0&access_token={t}"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert!(!says_invalid_token(&challenge), "as if no token was sent");
    let (status, _, _) = answer(
        client()
            .get(s.url("/v1/poll?topic=a/**&timeout=0"))
            .header("cookie", format!("tidewire_token={t}")),
    )
    .await;
    assert_eq!(status, 200, "the cookie still works");
    s.stop().await;
}

// ---- Streams outlive no token -------------------------------------------------------------

#[tokio::test]
async fn an_sse_stream_ends_at_token_expiry_and_resumes_with_a_fresh_token_without_gap_or_duplicate(
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let writer = admin();
    let short = token(&[], &["s/**"], 3);
    let exp = now() + 3;
    let mut stream = sse_open(&s, "?topic=s/**&last_event_id=0", &short, None)
        .await
        .expect("SSE accepted");
    let mut published = Vec::new();
    for i in 0..3 {
        let (status, _, body) = publish(&s, "s/a", Some(&writer), json!(i)).await;
        assert_eq!(status, 201);
        published.push(body["first_id"].as_u64().expect("id"));
    }
    let mut seen = sse_ids(&mut stream, 3).await;
    assert_eq!(seen, published);
    // The stream ends on its own once the token expires, not before.
    let rest = sse_ids_until_end(&mut stream, PATIENCE).await;
    assert!(now() >= exp, "the stream ended before the token expired");
    seen.extend(rest);
    // Published while no stream was open.
    for i in 3..6 {
        let (_, _, body) = publish(&s, "s/a", Some(&writer), json!(i)).await;
        published.push(body["first_id"].as_u64().expect("id"));
    }
    // The expired token is refused; a fresh one resumes from the last id seen.
    assert_eq!(
        sse_open(&s, "?topic=s/**", &short, seen.last().copied())
            .await
            .err(),
        Some(401)
    );
    let fresh = token(&[], &["s/**"], 60);
    let mut stream = sse_open(&s, "?topic=s/**", &fresh, seen.last().copied())
        .await
        .expect("SSE accepted");
    let missing = published.len() - seen.len();
    seen.extend(sse_ids(&mut stream, missing).await);
    assert_eq!(seen, published, "every event once, in order");
    s.stop().await;
}

#[tokio::test]
async fn a_waiting_long_poll_returns_by_token_expiry_with_next_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let since = {
        let (_, _, body) = publish(&s, "p/a", Some(&admin()), json!(0)).await;
        body["first_id"].as_u64().expect("id")
    };
    let short = token(&[], &["p/**"], 2);
    let started = Instant::now();
    let (status, _, body) = get(
        &s,
        &format!("/v1/poll?topic=p/**&since={since}&timeout=30"),
        Some(&short),
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]));
    assert_eq!(body["next"], since, "nothing skipped: poll again from here");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "returned at expiry, not at the 30 s timeout: {waited:?}"
    );
    let (status, challenge, _) = get(
        &s,
        &format!("/v1/poll?topic=p/**&since={since}&timeout=0"),
        Some(&short),
    )
    .await;
    assert_eq!(status, 401, "the next poll learns the token expired");
    assert!(says_invalid_token(&challenge));
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_is_closed_with_4001_when_its_token_expires() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let short = token(&[], &["w/**"], 2);
    let exp = now() + 2;
    let mut ws = ws_connect(s.addr, "?topic=w/**", Some(&short))
        .await
        .expect("accepted");
    match ws_next(&mut ws, PATIENCE).await {
        Said::Closed(Some((code, reason))) => {
            assert_eq!(code, 4001);
            assert_eq!(reason, "token expired");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    assert!(now() >= exp, "closed before the token expired");
    s.stop().await;
}

#[tokio::test]
async fn the_websocket_auth_op_extends_the_socket_and_replaces_its_grants() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let short = token(&[], &["w/**"], 2);
    let mut ws = ws_connect(s.addr, "?topic=w/**", Some(&short))
        .await
        .expect("accepted");
    // A bad token is refused with an error frame and changes nothing.
    ws_send(&mut ws, json!({"op": "auth", "token": "bad", "ref": "a0"})).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["code"].as_str(), f["ref"].as_str()),
        (Some("error"), Some("unauthorized"), Some("a0")),
        "{f}"
    );
    // A fresh token: the answer names its exp; it may now also publish.
    let fresh_exp = now() + 60;
    let fresh =
        hs(&json!({"exp": fresh_exp, "tidewire": {"publish": ["w/**"], "subscribe": ["w/**"]}}));
    ws_send(&mut ws, json!({"op": "auth", "token": fresh, "ref": "a1"})).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f, json!({"op": "auth", "ref": "a1", "exp": fresh_exp}));
    // Past the first token's expiry the socket still works, with the new grants.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws_send(
        &mut ws,
        json!({"op": "publish", "topic": "w/a", "data": 7, "ref": "p1"}),
    )
    .await;
    let mut got_ack = false;
    let mut got_event = false;
    while !(got_ack && got_event) {
        let f = ws_frame(&mut ws).await;
        if f["op"] == "ack" {
            assert_eq!(f["ref"], "p1", "{f}");
            got_ack = true;
        } else {
            assert_eq!(
                (f["topic"].as_str(), &f["data"]),
                (Some("w/a"), &json!(7)),
                "{f}"
            );
            got_event = true;
        }
    }
    // A token with narrower grants ends the subscriptions it does not cover.
    let narrow = token(&[], &["w/only/**"], 60);
    ws_send(&mut ws, json!({"op": "auth", "token": narrow, "ref": "a2"})).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{f}"
    );
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["ref"].as_str()),
        (Some("auth"), Some("a2")),
        "{f}"
    );
    assert_eq!(publish(&s, "w/b", Some(&admin()), json!(8)).await.0, 201);
    ws_send(&mut ws, json!({"op": "ping", "ref": "q"})).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        f,
        json!({"op": "pong", "ref": "q"}),
        "w/b was not delivered"
    );
    s.stop().await;
}

#[tokio::test]
async fn websocket_ops_outside_the_grant_get_forbidden_error_frames_and_the_socket_keeps_working() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |_| {}).await;
    let reader = token(&[], &["a/**"], 60);
    let mut ws = ws_connect(s.addr, "?topic=a/x", Some(&reader))
        .await
        .expect("accepted");
    ws_send(
        &mut ws,
        json!({"op": "publish", "topic": "a/x", "data": 1, "ref": "p1"}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["code"].as_str(), f["ref"].as_str()),
        (Some("error"), Some("forbidden"), Some("p1")),
        "{f}"
    );
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["a/y", "b"], "ref": 2}),
    )
    .await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        (f["op"].as_str(), f["code"].as_str(), f["ref"].as_i64()),
        (Some("error"), Some("forbidden"), Some(2)),
        "{f}"
    );
    // Still open, still subscribed, and a covered subscribe works.
    ws_send(
        &mut ws,
        json!({"op": "subscribe", "topics": ["a/y"], "ref": 3}),
    )
    .await;
    assert_eq!(ws_frame(&mut ws).await, json!({"op": "ack", "ref": 3}));
    for t in ["b", "a/y"] {
        assert_eq!(publish(&s, t, Some(&admin()), json!(t)).await.0, 201);
    }
    let f = ws_frame(&mut ws).await;
    assert_eq!(
        f["topic"], "a/y",
        "the refused `b` was never subscribed: {f}"
    );
    assert_eq!(
        get(&s, "/v1/topics/a/x", Some(&admin())).await.0,
        404,
        "the refused publish stored nothing"
    );
    s.stop().await;
}

// ---- Operators ------------------------------------------------------------------------------

/// Runs the binary to completion (bounded), returning its status and stderr.
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let err_path = dir.path().join("stderr");
    let out_path = dir.path().join("stdout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(args)
        .env_remove("TIDEWIRE_JWT_SECRET")
        .env_remove("TIDEWIRE_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn tidewire");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tidewire {args:?}` did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out_path), read(&err_path))
}

#[tokio::test]
async fn tidewire_token_mints_a_token_the_server_accepts_with_exactly_its_grants() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret_file = tmp.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write secret");
    let secret_arg = secret_file.to_str().expect("utf-8");
    let (status, stdout, stderr) = run_bin(
        &[
            "token",
            "--secret-file",
            secret_arg,
            "--publish",
            "sensors/**",
            "--subscribe",
            "dash/**",
            "--ttl",
            "1h",
            "--sub",
            "ops",
        ],
        &[],
    );
    assert!(status.success(), "{stderr}");
    let minted = stdout.trim().to_string();
    assert_eq!(minted.split('.').count(), 3, "a JWT: {minted}");
    let s = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret_file = Some(secret_file.clone());
    })
    .await;
    assert_eq!(
        publish(&s, "sensors/a/t", Some(&minted), json!(1)).await.0,
        201
    );
    assert_eq!(publish(&s, "dash/a", Some(&minted), json!(1)).await.0, 403);
    assert_eq!(
        get(&s, "/v1/poll?topic=dash/*&timeout=0", Some(&minted))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&s, "/v1/poll?topic=sensors/**&timeout=0", Some(&minted))
            .await
            .0,
        403
    );
    // `tidewire publish` carries it too (run off the runtime: run_bin blocks).
    let server = format!("http://{}", s.addr);
    let publish_with = |token: Option<String>| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["publish", "sensors/b/t", "{\"t\":1}", "--server", &server];
            if let Some(t) = &token {
                args.extend(["--token", t.as_str()]);
            }
            run_bin(&args, &[])
        })
    };
    let (status, stdout, stderr) = publish_with(Some(minted.clone())).await.expect("join");
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("first_id"), "{stdout}");
    let (status, _, stderr) = publish_with(None).await.expect("join");
    assert!(!status.success());
    assert!(stderr.contains("401"), "{stderr}");
    s.stop().await;

    // Refusals name the problem.
    let (status, _, stderr) = run_bin(&["token", "--secret", "short", "--publish", "a"], &[]);
    assert!(!status.success());
    assert!(stderr.contains("at least 32"), "{stderr}");
    let (status, _, stderr) = run_bin(&["token", "--secret-file", secret_arg, "--ttl", "3y"], &[]);
    assert!(!status.success());
    assert!(stderr.contains("unit"), "{stderr}");
}

/// Holds a loopback port while `serve` is started on it: if the server bound before checking
/// its key, it would fail with "cannot listen" instead of naming the key.
fn assert_refuses_before_binding(extra: &[&str], env: &[(&str, &str)], needle: &str) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let addr = held.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut args = vec![
        "serve",
        "--listen",
        &addr,
        "--data-dir",
        data.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let (status, _, stderr) = run_bin(&args, env);
    assert!(!status.success(), "`serve {extra:?}` must refuse to start");
    assert!(stderr.contains(needle), "`serve {extra:?}`: {stderr}");
    assert!(
        !stderr.contains("cannot listen"),
        "checked before binding: {stderr}"
    );
    assert!(!data.exists(), "nothing is created before the refusal");
}

/// Extra `serve` arguments, extra environment, and what the refusal must say.
type Refusal<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn serve_refuses_to_start_with_an_unusable_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
    )
    .expect("write");
    let short_file = tmp.path().join("short");
    std::fs::write(&short_file, "0123456789\n").expect("write");
    let private = fixture("rs256-private.pem");
    let cases: [Refusal<'_>; 6] = [
        (vec!["--jwt-secret", "too-short"], &[], "at least 32"),
        (
            vec!["--jwt-secret-file", short_file.to_str().expect("utf-8")],
            &[],
            "at least 32",
        ),
        (vec![], &[("TIDEWIRE_JWT_SECRET", "short")], "at least 32"),
        (
            vec!["--jwt-secret-file", "/nonexistent/tidewire/secret"],
            &[],
            "cannot read jwt_secret_file",
        ),
        (
            vec!["--jwt-public-key", garbage.to_str().expect("utf-8")],
            &[],
            "not a usable public key",
        ),
        (
            vec!["--jwt-public-key", private.to_str().expect("utf-8")],
            &[],
            "private key",
        ),
    ];
    for (args, env, needle) in cases {
        assert_refuses_before_binding(&args, env, needle);
    }
}

#[tokio::test]
async fn an_open_server_refuses_a_non_loopback_address_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // 0.0.0.0:0 is refused before any bind: nothing ever listens beyond loopback here.
    let (status, _, stderr) = run_bin(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!status.success());
    assert!(stderr.contains("without authentication"), "{stderr}");
    assert!(stderr.contains("--insecure-open"), "{stderr}");
    assert!(!data.exists());
}

#[tokio::test]
async fn metrics_need_the_metrics_token_when_one_is_configured() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = keyed(&tmp, |c| {
        c.metrics_token = Some(Secret::new("scrape-me-please"))
    })
    .await;
    let (status, challenge, body) = get(&s, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(is_bearer_challenge(&challenge));
    assert_eq!(get(&s, "/metrics", Some("scrape-me-not")).await.0, 401);
    // A JWT is not the metrics token, however powerful.
    assert_eq!(get(&s, "/metrics", Some(&admin())).await.0, 401);
    let (status, _, body) = get(&s, "/metrics", Some("scrape-me-please")).await;
    assert_eq!(status, 200);
    assert!(
        body.as_str().is_some_and(|t| t.contains("tidewire_")),
        "Prometheus text"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(&s, path, None).await.0, 200, "{path} stays open");
    }
    s.stop().await;
}

#[tokio::test]
async fn an_open_server_stays_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start(&tmp).await;
    assert_eq!(publish(&s, "a/b", None, json!(1)).await.0, 201);
    assert_eq!(get(&s, "/v1/topics/a/b", None).await.0, 200);
    // A token on an open server is neither needed nor checked.
    assert_eq!(publish(&s, "a/b", Some("anything"), json!(2)).await.0, 201);
    let mut ws = ws_connect(s.addr, "?topic=a/**", None).await.expect("open");
    ws_send(&mut ws, json!({"op": "auth", "token": "x", "ref": 1})).await;
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["code"], "auth_not_configured", "{f}");
    s.stop().await;
}

/// The binary with a secret from the environment and debug logs captured to a file.
struct LoggedServer {
    addr: SocketAddr,
    child: std::process::Child,
    log: PathBuf,
}

impl LoggedServer {
    async fn spawn(dir: &Path, env_secret: &str) -> LoggedServer {
        let addr = free_addr();
        let log = dir.join("stderr.log");
        let backend = common::backend_flags(&dir.join("data")).await;
        let child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(&backend)
            .env("RUST_LOG", "tidewire=debug")
            .env("TIDEWIRE_JWT_SECRET", env_secret)
            .env("TIDEWIRE_JWT_LEEWAY_SECS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tidewire");
        let mut s = LoggedServer { addr, child, log };
        wait_ready_unless(addr, || {
            s.child
                .try_wait()
                .expect("wait")
                .map(|st| format!("exited with {st}"))
        })
        .await
        .unwrap_or_else(|why| panic!("{why}"));
        s
    }

    /// SIGTERM, wait, and return everything it logged.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&self.log).expect("log")
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn the_query_token_never_reaches_the_logs_and_the_secret_env_is_taken_verbatim() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // All digits: a configuration parser that guessed types would turn it into a number.
    let secret = "12345678901234567890123456789012345678901234567890";
    let s = LoggedServer::spawn(tmp.path(), secret).await;
    let t = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        &claims(&[], &["a/**"], 60),
    );
    let base = format!("http://{}", s.addr);
    let ok = client()
        .get(format!(
            "{base}/v1/poll?topic=a/**&timeout=0&access_token={t}"
        ))
        .send()
        .await
        .expect("poll");
    assert_eq!(ok.status(), 200, "the env secret verifies tokens");
    // A refused query token is not logged either.
    let refused = "eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOiJ5ZXMifQ.c2lnbmF0dXJl";
    let bad = client()
        .get(format!("{base}/v1/sse?topic=a/**&access_token={refused}"))
        .send()
        .await
        .expect("sse");
    assert_eq!(bad.status(), 401);
    let logs = s.stop();
    assert!(
        logs.contains("access_token=REDACTED"),
        "requests are logged, redacted: {logs}"
    );
    let signature = t.rsplit('.').next().expect("signature");
    for needle in [t.as_str(), signature, refused, secret] {
        assert!(!logs.contains(needle), "{needle} leaked into the logs");
    }
}
