//! JWT interoperability: tokens minted by an implementation independent of the server's
//! verifier — Python's PyJWT (with `cryptography` for RS256/ES256), run from
//! `tests/interop/mint.py`, which also hand-builds the tokens PyJWT refuses to sign (`alg: none`,
//! HS256 keyed with a public key PEM). Each supported algorithm is accepted on every transport;
//! each refusal case is 401 with a `Bearer` challenge on every transport and stores nothing.
//!
//! Needs a Python 3 with PyJWT and cryptography: `$TIDEWIRE_TEST_PYTHON` when set (`.ci/run`
//! sets it to the virtualenv it installs them in), else that virtualenv, else `python3`; when
//! none has them the test builds the pinned virtualenv itself (PyPI). If even that fails the
//! tests fail and say why: they never pass silently. No network: keys come from
//! tests/fixtures/auth/ or are generated in memory by the script.

mod common;

use common::auth::{answer, client, fixture, now, says_invalid_token};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{TestServer, PATIENCE};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tidewire::config::{Config, Secret};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "tidewire-interop-tests-secret-0123456789abcdef";
const AUDIENCE: &str = "tidewire-interop";
const ISSUER: &str = "https://issuer.interop.example";

fn fixture_str(name: &str) -> String {
    fixture(name).to_str().expect("utf-8 path").to_string()
}

// ---- Python and PyJWT ------------------------------------------------------------------------

/// Runs `program args` with `stdin`, bounded by [`PATIENCE`]: its status, stdout and stderr.
/// `Err` when it cannot be started at all.
fn run(
    program: &Path,
    args: &[&str],
    stdin: &[u8],
) -> std::io::Result<(ExitStatus, String, String)> {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .args(args)
        // No __pycache__ next to the script; no stray PYTHONPATH changing what is imported.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()?;
    {
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin).expect("write stdin");
    }
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{} {args:?}` did not exit in time", program.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Ok((status, read(&out_path), read(&err_path)))
}

/// The Python interpreter that has PyJWT and cryptography, or a failure that says how to get one.
/// The pinned PyJWT environment `.ci/run` builds; the tests build the same one when missing.
const PYJWT: &str = "PyJWT==2.10.1";
const CRYPTOGRAPHY: &str = "cryptography==44.0.0";

fn cached_venv() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("tidewire-ci/pyjwt-2.10.1-cryptography-44.0.0")
}

fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let probe = "import jwt, cryptography; print(jwt.__version__, cryptography.__version__)";
        let works =
            |p: &Path| matches!(run(p, &["-c", probe], b""), Ok((st, _, _)) if st.success());
        let venv_python = cached_venv().join("bin/python");
        let mut tried = Vec::new();
        if let Some(p) = std::env::var_os("TIDEWIRE_TEST_PYTHON").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            if works(&p) {
                return p;
            }
            tried.push(format!("$TIDEWIRE_TEST_PYTHON ({})", p.display()));
        }
        for p in [venv_python.clone(), PathBuf::from("python3")] {
            if works(&p) {
                return p;
            }
            tried.push(p.display().to_string());
        }
        // A fresh machine: build the pinned environment from PyPI, as `.ci/run` does.
        let venv = cached_venv();
        let built = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&venv_python)
                .args(["-m", "pip", "install", "--quiet", PYJWT, CRYPTOGRAPHY])
                .status()
                .is_ok_and(|s| s.success());
        if built && works(&venv_python) {
            return venv_python;
        }
        panic!(
            "tests/auth_interop.rs mints tokens with Python's PyJWT, and none of {} can import \
             it; building {} failed too (needs python3 with venv, and PyPI). Install it with \
             `python3 -m pip install {PYJWT} {CRYPTOGRAPHY}` and set TIDEWIRE_TEST_PYTHON; \
             `bash .ci/run` installs what it needs by itself.",
            tried.join(", "),
            venv.display()
        )
    })
}

/// Mints one token per spec with tests/interop/mint.py (see its docstring for the spec).
fn mint_all(specs: &[Value]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/mint.py");
    let input = serde_json::to_vec(specs).expect("specs");
    let (status, stdout, stderr) = run(python(), &[script.to_str().expect("utf-8 path")], &input)
        .expect("run the minting script");
    assert!(status.success(), "mint.py failed: {stderr}");
    let tokens: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert_eq!(tokens.len(), specs.len(), "one token per spec: {stdout}");
    tokens
}

/// Claims the servers here accept: right audience and issuer, valid for two minutes.
fn claims(publish: &[&str], subscribe: &[&str]) -> Value {
    json!({
        "sub": "interop",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now(),
        "exp": now() + 120,
        "tidewire": {"publish": publish, "subscribe": subscribe},
    })
}

/// A PyJWT spec signing `claims` with `alg` and `key`.
fn spec(alg: &str, key: Value, claims: &Value) -> Value {
    json!({"how": "pyjwt", "alg": alg, "key": key, "claims": claims})
}

// ---- The servers -----------------------------------------------------------------------------

/// The key a server verifies with, and how a valid token for it is signed.
#[derive(Clone, Copy, Debug)]
enum Keyed {
    /// `jwt_secret`: HS256, HS384, HS512.
    Secret,
    /// `jwt_public_key` with the RSA fixture: RS256.
    Rsa,
    /// `jwt_public_key` with the P-256 fixture: ES256.
    Ec,
}

impl Keyed {
    /// The algorithm and PyJWT key of a valid token for this server.
    fn signer(self) -> (&'static str, Value) {
        match self {
            Keyed::Secret => ("HS256", json!({"secret": SECRET})),
            Keyed::Rsa => ("RS256", json!({"file": fixture_str("rs256-private.pem")})),
            Keyed::Ec => ("ES256", json!({"file": fixture_str("es256-private.pem")})),
        }
    }

    /// A server with this key, the interop audience and issuer, and no leeway.
    async fn start(self, tmp: &tempfile::TempDir) -> TestServer {
        TestServer::start_with(tmp.path(), |c: &mut Config| {
            match self {
                Keyed::Secret => c.jwt_secret = Some(Secret::new(SECRET)),
                Keyed::Rsa => c.jwt_public_key = Some(fixture("rs256-public.pem")),
                Keyed::Ec => c.jwt_public_key = Some(fixture("es256-public.pem")),
            }
            c.jwt_audience = Some(AUDIENCE.into());
            c.jwt_issuer = Some(ISSUER.into());
            c.jwt_leeway_secs = 0;
        })
        .await
    }
}

// ---- Clients (the style of tests/auth.rs) ----------------------------------------------------

async fn publish(
    s: &TestServer,
    topic: &str,
    token: &str,
    data: Value,
) -> (u16, Option<String>, Value) {
    answer(
        client()
            .post(s.url(&format!("/v1/topics/{topic}/events")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({ "data": data }).to_string()),
    )
    .await
}

async fn publish_batch(s: &TestServer, topic: &str, token: &str) -> (u16, Option<String>, Value) {
    answer(
        client()
            .post(s.url("/v1/events"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!([{"topic": topic, "data": "batched"}]).to_string()),
    )
    .await
}

async fn get(s: &TestServer, path: &str, token: &str) -> (u16, Option<String>, Value) {
    answer(client().get(s.url(path)).bearer_auth(token)).await
}

/// WebSocket handshake with a bearer token: the socket, or the refusal's status and
/// `WWW-Authenticate`.
async fn ws_connect(
    addr: SocketAddr,
    query: &str,
    token: &str,
) -> Result<Ws, (u16, Option<String>)> {
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
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().expect("ascii").to_string()),
        )),
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

/// The next JSON frame of a socket (protocol pings skipped), within [`PATIENCE`].
async fn ws_frame(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
            Message::Close(c) => panic!("socket closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Asserts `token` works on every transport: it publishes one event to `topic` (single and batch)
/// and finds it through SSE, long-poll, a WebSocket and the topics API.
async fn accepted_everywhere(s: &TestServer, what: &str, token: &str, topic: &str) {
    let (status, _, body) = publish(s, topic, token, json!(what)).await;
    assert_eq!(status, 201, "{what}: HTTP publish: {body}");
    let id = body["first_id"].as_u64().expect("first_id");
    let (status, _, body) = publish_batch(s, topic, token).await;
    assert_eq!(status, 201, "{what}: batch publish: {body}");

    // SSE, replaying from the start of the log.
    let resp = client()
        .get(s.url(&format!("/v1/sse?topic={topic}&last_event_id=0")))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("SSE connect");
    assert_eq!(resp.status(), 200, "{what}: SSE");
    let mut events = Box::pin(resp.bytes_stream().eventsource());
    let ev = timeout(PATIENCE, events.next())
        .await
        .expect("timed out waiting for an SSE event")
        .expect("SSE stream ended")
        .expect("SSE parse");
    assert_eq!(ev.id, id.to_string(), "{what}: SSE delivers the event");
    drop(events);

    let (status, _, body) = get(
        s,
        &format!("/v1/poll?topic={topic}&since=0&timeout=0"),
        token,
    )
    .await;
    assert_eq!(status, 200, "{what}: long-poll: {body}");
    assert_eq!(body["events"][0]["id"], id, "{what}: long-poll: {body}");

    let mut ws = ws_connect(s.addr, &format!("?topic={topic}&since=0"), token)
        .await
        .unwrap_or_else(|e| panic!("{what}: WebSocket upgrade refused: {e:?}"));
    let f = ws_frame(&mut ws).await;
    assert_eq!(f["id"], id, "{what}: WebSocket delivers the event: {f}");
    let _ = ws.close(None).await;

    let (status, _, body) = get(s, "/v1/topics", token).await;
    assert_eq!(status, 200, "{what}: topics: {body}");
    assert!(
        body["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .any(|t| t["topic"] == topic),
        "{what}: topics lists {topic}: {body}"
    );
    let (status, _, body) = get(s, &format!("/v1/topics/{topic}"), token).await;
    assert_eq!(status, 200, "{what}: topic: {body}");
    assert_eq!(body["count"], 2, "{what}: {body}");
}

/// Asserts `token` is refused with 401 and a `Bearer error="invalid_token"` challenge on every
/// transport.
async fn refused_everywhere(s: &TestServer, what: &str, token: &str) {
    for (transport, (status, challenge, body)) in [
        ("publish", publish(s, "refused/x", token, json!(1)).await),
        ("batch", publish_batch(s, "refused/x", token).await),
        ("sse", get(s, "/v1/sse?topic=refused/**", token).await),
        (
            "poll",
            get(s, "/v1/poll?topic=refused/**&since=0&timeout=0", token).await,
        ),
        ("topics", get(s, "/v1/topics", token).await),
        ("topic", get(s, "/v1/topics/refused/x", token).await),
    ] {
        assert_eq!(status, 401, "{what} on {transport}: {body}");
        assert!(
            says_invalid_token(&challenge),
            "{what} on {transport}: {challenge:?}"
        );
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "{what} on {transport}"
        );
    }
    let (status, challenge) = ws_connect(s.addr, "?topic=refused/**", token)
        .await
        .map(|_| ())
        .expect_err("refused at the WebSocket upgrade");
    assert_eq!(status, 401, "{what} on ws");
    assert!(
        says_invalid_token(&challenge),
        "{what} on ws: {challenge:?}"
    );
}

// ---- Tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn pyjwt_tokens_of_every_supported_algorithm_are_accepted_on_every_transport() {
    let grants = claims(&["interop/**"], &["interop/**"]);
    let cases: [(Keyed, &str, Value); 5] = [
        (Keyed::Secret, "HS256", json!({"secret": SECRET})),
        (Keyed::Secret, "HS384", json!({"secret": SECRET})),
        (Keyed::Secret, "HS512", json!({"secret": SECRET})),
        (
            Keyed::Rsa,
            "RS256",
            json!({"file": fixture_str("rs256-private.pem")}),
        ),
        (
            Keyed::Ec,
            "ES256",
            json!({"file": fixture_str("es256-private.pem")}),
        ),
    ];
    let specs: Vec<Value> = cases
        .iter()
        .map(|(_, alg, key)| spec(alg, key.clone(), &grants))
        .collect();
    let tokens = mint_all(&specs);
    for ((keyed, alg, _), token) in cases.iter().zip(&tokens) {
        let header = token.split('.').next().expect("header");
        assert!(
            header.starts_with("eyJ"),
            "{alg}: a JWS compact token: {token}"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = keyed.start(&tmp).await;
        let topic = format!("interop/{}", alg.to_lowercase());
        accepted_everywhere(&s, &format!("PyJWT {alg}"), token, &topic).await;
        s.stop().await;
    }
}

#[tokio::test]
async fn every_refused_pyjwt_token_is_401_with_a_bearer_challenge_on_every_transport() {
    for keyed in [Keyed::Secret, Keyed::Rsa, Keyed::Ec] {
        let (alg, key) = keyed.signer();
        let good = claims(&["**"], &["**"]);
        let mut cases: Vec<(&str, Value)> = vec![
            ("control: a valid token", spec(alg, key.clone(), &good)),
            ("alg none", json!({"how": "none", "claims": good})),
            (
                "expired",
                spec(alg, key.clone(), &{
                    let mut c = good.clone();
                    c["exp"] = json!(now() - 10);
                    c
                }),
            ),
            (
                "not yet valid (nbf)",
                spec(alg, key.clone(), &{
                    let mut c = good.clone();
                    c["nbf"] = json!(now() + 60);
                    c
                }),
            ),
            (
                "wrong aud",
                spec(alg, key.clone(), &{
                    let mut c = good.clone();
                    c["aud"] = json!("someone-else");
                    c
                }),
            ),
            (
                "wrong iss",
                spec(alg, key.clone(), &{
                    let mut c = good.clone();
                    c["iss"] = json!("https://evil.example");
                    c
                }),
            ),
            (
                "tampered payload",
                json!({"how": "tamper", "alg": alg, "key": key, "claims": claims(&["a"], &["a"]),
                       "tampered": good}),
            ),
            (
                "malformed: no signature segment",
                json!({"how": "truncate", "alg": alg, "key": key, "claims": good}),
            ),
            (
                "malformed: header is not JSON",
                json!({"how": "garbage-header", "alg": alg, "key": key, "claims": good}),
            ),
        ];
        match keyed {
            Keyed::Secret => cases.extend([
                (
                    "wrong key (another secret)",
                    spec(
                        "HS256",
                        json!({"secret": "another-secret-that-is-long-enough-0123"}),
                        &good,
                    ),
                ),
                (
                    "wrong family (RS256 to an HS server)",
                    spec(
                        "RS256",
                        json!({"file": fixture_str("rs256-private.pem")}),
                        &good,
                    ),
                ),
            ]),
            Keyed::Rsa => cases.extend([
                (
                    "wrong key (a fresh RSA key)",
                    spec("RS256", json!({"generate": "rsa"}), &good),
                ),
                (
                    "wrong family (ES256 to an RS256 server)",
                    spec(
                        "ES256",
                        json!({"file": fixture_str("es256-private.pem")}),
                        &good,
                    ),
                ),
                (
                    "key confusion (HS256 keyed with the RSA public key PEM)",
                    json!({"how": "hmac-file", "alg": "HS256",
                           "key": {"file": fixture_str("rs256-public.pem")}, "claims": good}),
                ),
            ]),
            Keyed::Ec => cases.extend([
                (
                    "wrong key (a fresh P-256 key)",
                    spec("ES256", json!({"generate": "ec"}), &good),
                ),
                (
                    "wrong family (RS256 to an ES256 server)",
                    spec(
                        "RS256",
                        json!({"file": fixture_str("rs256-private.pem")}),
                        &good,
                    ),
                ),
                (
                    "key confusion (HS256 keyed with the EC public key PEM)",
                    json!({"how": "hmac-file", "alg": "HS256",
                           "key": {"file": fixture_str("es256-public.pem")}, "claims": good}),
                ),
            ]),
        }
        let specs: Vec<Value> = cases.iter().map(|(_, s)| s.clone()).collect();
        let mut tokens = mint_all(&specs).into_iter();
        let control = tokens.next().expect("control token");

        let tmp = tempfile::tempdir().expect("tempdir");
        let s = keyed.start(&tmp).await;
        // The server does accept this family's valid tokens, so each refusal is the token's.
        let (status, _, body) = publish(&s, "control", &control, json!(0)).await;
        assert_eq!(status, 201, "{keyed:?}: control token: {body}");
        for ((what, _), token) in cases.iter().skip(1).zip(tokens) {
            refused_everywhere(&s, &format!("{keyed:?} server, {what}"), &token).await;
        }
        refused_everywhere(&s, &format!("{keyed:?} server, not a JWT"), "not-a-jwt").await;
        // Nothing any refused token sent was stored.
        let (status, _, body) = get(&s, "/v1/topics", &control).await;
        assert_eq!(status, 200, "{body}");
        let names: Vec<&str> = body["topics"]
            .as_array()
            .expect("topics")
            .iter()
            .map(|t| t["topic"].as_str().expect("name"))
            .collect();
        assert_eq!(
            names,
            ["control"],
            "{keyed:?}: only the control publish was stored"
        );
        s.stop().await;
    }
}
