//! The JetStream log from outside: tidewire gateways (the release-shaped binary, `--log nats`)
//! over real nats-server processes on loopback, one node or a 3-node cluster with an R3
//! stream. Whatever `TIDEWIRE_TEST_BACKEND` says, these tests are about the JetStream mode.
//!
//! The chaos loop runs 10 rounds; `TIDEWIRE_CHAOS_ROUNDS=N` runs more, and
//! `TIDEWIRE_CHAOS_SEED=S` replays the kills of a run that printed that seed.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::{free_addr, get_json, post, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A tidewire gateway child process over a JetStream stream.
struct Gateway {
    addr: SocketAddr,
    child: Child,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: std::path::PathBuf,
}

impl Gateway {
    /// Starts a gateway over `urls` and `stream` (R`replicas` when it creates it) and waits
    /// until `/readyz` says 200.
    async fn start(dir: &Path, urls: &str, stream: &str, replicas: usize) -> Gateway {
        let g = Self::spawn(dir, urls, stream, replicas, &[]);
        g.wait_ready().await;
        g
    }

    /// Starts a gateway without waiting for it to be ready.
    fn spawn(dir: &Path, urls: &str, stream: &str, replicas: usize, extra: &[&str]) -> Gateway {
        Self::spawn_with_env(dir, urls, stream, replicas, extra, &[])
    }

    /// [`Gateway::spawn`] with extra environment variables (configuration keys).
    fn spawn_with_env(
        dir: &Path,
        urls: &str,
        stream: &str,
        replicas: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut args: Vec<String> = vec![
            "--log".into(),
            "nats".into(),
            "--nats-url".into(),
            urls.into(),
            "--nats-stream".into(),
            stream.into(),
            "--nats-replicas".into(),
            replicas.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn_on(free_addr(), dir, args, env)
    }

    fn spawn_on(
        addr: SocketAddr,
        dir: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Gateway {
        let child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("TIDEWIRE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("TIDEWIRE_CONFIG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tidewire");
        Gateway {
            addr,
            child,
            args,
            env,
            dir: dir.to_path_buf(),
        }
    }

    async fn wait_ready(&self) {
        common::wait_ready(self.addr).await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the killed gateway again on the same address, ready.
    async fn restart(&mut self) {
        self.kill9();
        let again = Self::spawn_on(self.addr, &self.dir, self.args.clone(), self.env.clone());
        *self = again;
        self.wait_ready().await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a gateway over `urls` and `stream` that must refuse to start; returns what it said.
fn refused_start(urls: &str, dir: &Path, stream: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["serve", "--listen"])
        .arg(free_addr().to_string())
        .arg("--data-dir")
        .arg(dir)
        .args(["--log", "nats", "--nats-url", urls, "--nats-stream", stream])
        .envs(env.iter().copied())
        .env_remove("TIDEWIRE_CONFIG")
        .output()
        .expect("run tidewire");
    assert!(!out.status.success(), "it started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// Publishes a JSON batch to `base`; returns (status, body).
async fn publish_batch(c: &reqwest::Client, base: &str, events: &[Value]) -> (u16, Value) {
    post(
        c,
        &format!("{base}/v1/events"),
        "application/json",
        Value::Array(events.to_vec()).to_string(),
    )
    .await
}

/// Reads `n` SSE events from `url` (with `Last-Event-ID: cursor` when given): their ids and
/// envelopes, in order.
/// [`publish_batch`], asking again while the answer is the contract's retryable 503; the
/// 201's body.
async fn publish_batch_retrying_503(c: &reqwest::Client, base: &str, events: &[Value]) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, answer) = publish_batch(c, base, events).await;
        if status == 201 {
            return answer;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "still refused: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `body` (JSON) to `url`, asking again with the same body (so the same msg_id)
/// while the answer is the contract's retryable 503, as a client would; the 201's body.
async fn publish_retrying_503(c: &reqwest::Client, url: &str, body: String) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, answer) = post(c, url, "application/json", body.clone()).await;
        if status == 201 {
            return answer;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "still refused: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sse_take(url: &str, cursor: Option<u64>, n: usize) -> Vec<Value> {
    let mut stream = common::sse(url, cursor).await;
    let mut out = Vec::new();
    while out.len() < n {
        let ev = common::next_event(&mut stream).await;
        out.push(serde_json::from_str::<Value>(&ev.data).expect("envelope"));
    }
    out
}

#[tokio::test]
async fn two_gateways_over_an_r3_cluster_serve_one_log() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    let urls = cluster.urls();
    let a = Gateway::start(&tmp.path().join("a"), &urls, "shared", 3).await;
    let b = Gateway::start(&tmp.path().join("b"), &urls, "shared", 3).await;
    let info = cluster.stream_info("shared").await;
    assert_eq!(info["config"]["num_replicas"], 3, "{info}");
    let c = client();

    // A live subscriber on B receives what is published on A, and B's own batch, in order.
    let live_b = tokio::spawn({
        let url = b.url("/v1/sse?topic=plant/**");
        async move { sse_take(&url, None, 8).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut published = Vec::new();
    // A stream just created may not answer for a moment (no leader yet, or this server has
    // not learnt where it is): the contract's retryable 503 is asked again, as a client would.
    for i in 0..5 {
        let body = publish_retrying_503(
            &c,
            &a.url("/v1/topics/plant/line.1/events"),
            json!({"data": {"i": i}, "msg_id": format!("a-{i}")}).to_string(),
        )
        .await;
        published.push(body["first_id"].as_u64().unwrap());
    }
    let body = publish_batch_retrying_503(
        &c,
        &b.url(""),
        &[
            json!({"topic": "plant", "data": "root"}),
            json!({"topic": "plant/line.2", "data": 2, "msg_id": "b-0"}),
            json!({"topic": "plant/line.1/x", "data": 3}),
        ],
    )
    .await;
    let (first, last) = (
        body["first_id"].as_u64().unwrap(),
        body["last_id"].as_u64().unwrap(),
    );
    assert_eq!(last - first + 1, 3, "a batch's ids are contiguous: {body}");
    published.extend(first..=last);
    let received = tokio::time::timeout(PATIENCE, live_b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        common::ids(&received),
        published,
        "B delivers A's and B's events in id order"
    );
    assert_eq!(
        received[5]["topic"], "plant",
        "plant/** matches plant itself"
    );

    // A retry of A's publish that reaches B is recognised, with the original id.
    let (status, body) = post(
        &c,
        &b.url("/v1/topics/plant/line.1/events"),
        "application/json",
        json!({"data": {"i": 3}, "msg_id": "a-3"}).to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["count"], 0, "{body}");
    assert_eq!(body["duplicate_of"], json!([published[3]]), "{body}");

    // A subscriber that read up to the third event on A resumes on B: the rest, once, in order.
    let rest = sse_take(
        &b.url("/v1/sse?topic=plant/**"),
        Some(published[2]),
        published.len() - 3,
    )
    .await;
    assert_eq!(common::ids(&rest), published[3..].to_vec());
    // Long-poll and the topics API on A see the same log.
    let all = common::poll_all(&c, &a.url(""), "plant/**").await;
    assert_eq!(common::ids(&all), published);
    let stats = get_json(&c, &a.url("/v1/topics/plant/line.1")).await;
    assert_eq!(stats["count"], 5, "{stats}");
    assert_eq!(stats["first_id"], published[0], "{stats}");
    assert_eq!(stats["last_id"], published[4], "{stats}");
    assert!(
        stats["bytes"].is_null(),
        "JetStream keeps no per-subject bytes: {stats}"
    );

    // The command-line clients read the same log through either gateway.
    let run = |args: Vec<String>| {
        let out = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .args(&args)
            .output()
            .expect("run tidewire");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("one envelope per line"))
            .collect::<Vec<Value>>()
    };
    let exported = run(vec![
        "export".into(),
        "--server".into(),
        b.url(""),
        "--topic".into(),
        "plant/**".into(),
    ]);
    assert_eq!(
        common::ids(&exported),
        published,
        "export --server through B"
    );
    let tailed = run(vec![
        "tail".into(),
        "plant/**".into(),
        "--since".into(),
        published[1].to_string(),
        "--count".into(),
        (published.len() - 2).to_string(),
        "--server".into(),
        a.url(""),
    ]);
    assert_eq!(
        common::ids(&tailed),
        published[2..].to_vec(),
        "tail through A"
    );
}

#[tokio::test]
async fn a_batch_larger_than_jetstream_commits_atomically_is_refused_whole_and_a_mixed_batch_keeps_its_new_events_contiguous(
) {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    let g = Gateway::spawn(
        &tmp.path().join("g"),
        &nats.urls(),
        "batches",
        1,
        &["--max-body-bytes", "4000000"],
    );
    g.wait_ready().await;
    let c = client();

    // An event larger than NATS's max_payload (1 MiB) is refused, not half-sent.
    let huge = "x".repeat(2 << 20);
    let (status, body) = publish_batch(
        &c,
        &g.url(""),
        &[
            json!({"topic": "big", "data": 1}),
            json!({"topic": "big", "data": huge}),
        ],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    let big: Vec<Value> = (0..1001)
        .map(|i| json!({"topic": "big", "data": i}))
        .collect();
    let (status, body) = publish_batch(&c, &g.url(""), &big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_many_events", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1000"),
        "the message names the limit: {message}"
    );
    let (status, body) = publish_batch(&c, &g.url(""), &big[..1000]).await;
    assert_eq!(status, 201, "exactly the limit is fine: {body}");
    assert_eq!(body["count"], 1000);
    assert_eq!(common::poll_all(&c, &g.url(""), "big").await.len(), 1000);

    // Two stored events with msg_ids, then a batch repeating one of them among new ones.
    let (_, first) = publish_batch(
        &c,
        &g.url(""),
        &[
            json!({"topic": "m/a", "data": 1, "msg_id": "x"}),
            json!({"topic": "m/b", "data": 2, "msg_id": "y"}),
        ],
    )
    .await;
    let (x, y) = (
        first["first_id"].as_u64().unwrap(),
        first["last_id"].as_u64().unwrap(),
    );
    let (status, body) = publish_batch(
        &c,
        &g.url(""),
        &[
            json!({"topic": "m/a", "data": 3, "msg_id": "new-1"}),
            json!({"topic": "m/b", "data": 2, "msg_id": "y"}),
            json!({"topic": "m/a", "data": 4}),
            // The same msg_id on another topic is another event.
            json!({"topic": "m/c", "data": 5, "msg_id": "x"}),
            json!({"topic": "m/a", "data": 1, "msg_id": "x"}),
            json!({"topic": "m/a", "data": 3, "msg_id": "new-1"}),
        ],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["count"], 3, "{body}");
    let (f, l) = (
        body["first_id"].as_u64().unwrap(),
        body["last_id"].as_u64().unwrap(),
    );
    assert_eq!(
        l - f + 1,
        3,
        "the new events of a mixed batch are contiguous: {body}"
    );
    assert_eq!(body["duplicate_of"], json!([y, x, f]), "{body}");
    let stored = common::poll_all(&c, &g.url(""), "m/**").await;
    let data: Vec<Value> = stored.iter().map(|e| e["data"].clone()).collect();
    assert_eq!(data, vec![json!(1), json!(2), json!(3), json!(4), json!(5)]);
}

#[tokio::test]
async fn with_nats_unreachable_the_gateway_answers_503_then_serves_once_nats_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    nats.node(0).kill9();
    let g = Gateway::spawn(&tmp.path().join("g"), &nats.urls(), "late", 1, &[]);
    let c = client();
    // The process answers, but is not ready, and refuses to acknowledge anything.
    let deadline = Instant::now() + PATIENCE;
    let health = loop {
        if let Ok(r) = c.get(g.url("/healthz")).send().await {
            break r.status().as_u16();
        }
        assert!(Instant::now() < deadline, "the gateway never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health, 200);
    let ready = c.get(g.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let r = c
        .post(g.url("/v1/topics/t/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":1,"msg_id":"early"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "log_unavailable", "{body}");

    nats.node(0).restart().await;
    g.wait_ready().await;
    let (status, body) = post(
        &c,
        &g.url("/v1/topics/t/events"),
        "application/json",
        r#"{"data":1,"msg_id":"early"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["first_id"], 1,
        "nothing was half-stored before: {body}"
    );
    assert_eq!(body["count"], 1);
}

#[tokio::test]
async fn an_existing_stream_tidewire_cannot_serve_stops_the_gateway_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    let client = nats.connect().await;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "foreign".into(),
        subjects: vec!["tidewire.foreign.>".into()],
        max_messages_per_subject: 10,
        ..Default::default()
    })
    .await
    .expect("create a stream without atomic batches");
    let mut g = Gateway::spawn(&tmp.path().join("g"), &nats.urls(), "foreign", 1, &[]);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway kept running on a stream it cannot serve"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{status}");
    drop(g);
    // The reason is on stderr; run it once more, capturing it.
    let stderr = refused_start(&nats.urls(), &tmp.path().join("g2"), "foreign", &[]);
    for needle in ["allow_atomic", "max_msgs_per_subject", "foreign"] {
        assert!(stderr.contains(needle), "{needle} not in:\n{stderr}");
    }
}

/// What a chaos round's publishers got acknowledged: key → id, and each batch's keys.
#[derive(Default)]
struct Acked {
    keys: HashMap<String, u64>,
    batches: Vec<Vec<String>>,
}

/// Publishes until `stop`, like a device: each event (or batch of 3) has msg_ids, and is
/// retried, on whichever gateway answers, until it is acknowledged.
async fn device(
    name: String,
    gateways: Vec<String>,
    acked: Arc<Mutex<Acked>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    let mut n = 0u64;
    while !*stop.borrow() {
        let batch = n % 3 == 2;
        let keys: Vec<String> = if batch {
            (0..3).map(|k| format!("{name}-{n}-{k}")).collect()
        } else {
            vec![format!("{name}-{n}")]
        };
        let body: Vec<Value> = keys
            .iter()
            .map(|k| json!({"topic": format!("chaos/{name}"), "data": {"k": k, "n": keys.len()}, "msg_id": k}))
            .collect();
        let mut attempt = 0usize;
        let receipt = loop {
            let base = &gateways[(n as usize + attempt) % gateways.len()];
            attempt += 1;
            if let Ok(r) = c
                .post(format!("{base}/v1/events"))
                .header("content-type", "application/json")
                .body(Value::Array(body.clone()).to_string())
                .send()
                .await
            {
                if r.status() == 201 {
                    if let Ok(v) = r.json::<Value>().await {
                        break v;
                    }
                } else {
                    assert!(
                        r.status() == 503 || r.status().is_server_error(),
                        "a publish was refused with {}",
                        r.status()
                    );
                }
            }
            assert!(attempt < 400, "{name}: a publish was never acknowledged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Stored now, or earlier by a try whose answer was lost: ids either way.
        let mut ids: Vec<u64> = Vec::new();
        let count = receipt["count"].as_u64().unwrap();
        if count > 0 {
            let first = receipt["first_id"].as_u64().unwrap();
            ids.extend(first..first + count);
        }
        if let Some(d) = receipt["duplicate_of"].as_array() {
            ids.extend(d.iter().map(|v| v.as_u64().unwrap()));
        }
        assert_eq!(ids.len(), keys.len(), "{name}: receipt {receipt}");
        ids.sort_unstable();
        {
            let mut a = acked.lock().unwrap();
            for (k, id) in keys.iter().zip(ids) {
                a.keys.insert(k.clone(), id);
            }
            if batch {
                a.batches.push(keys);
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An SSE subscriber that follows `chaos/**` from cursor 0, moving to another gateway with its
/// cursor whenever its stream ends or fails, until it has seen `until`.
async fn follower(
    gateways: Vec<String>,
    until: tokio::sync::watch::Receiver<u64>,
) -> Vec<(u64, String)> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut cursor = 0u64;
    let mut turn = 0usize;
    loop {
        let target = *until.borrow();
        if target > 0 && cursor >= target {
            return seen;
        }
        let base = &gateways[turn % gateways.len()];
        turn += 1;
        let resp = reqwest::Client::new()
            .get(format!("{base}/v1/sse?topic=chaos/**"))
            .header("last-event-id", cursor.to_string())
            .send()
            .await;
        let Ok(resp) = resp else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if resp.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut events = resp.bytes_stream().eventsource();
        loop {
            let target = *until.borrow();
            if target > 0 && cursor >= target {
                return seen;
            }
            let next = tokio::time::timeout(Duration::from_secs(3), events.next()).await;
            let ev = match next {
                Ok(Some(Ok(ev))) => ev,
                // Ended, failed, or quiet: check the target, then carry on (maybe elsewhere).
                Ok(_) => break,
                Err(_) => continue,
            };
            if ev.event == "gap" {
                panic!("a gap without retention: {}", ev.data);
            }
            let env: Value = serde_json::from_str(&ev.data).expect("envelope");
            let id = env["id"].as_u64().unwrap();
            assert!(
                id > cursor,
                "id {id} after cursor {cursor}: a duplicate or a step back"
            );
            cursor = id;
            seen.push((id, env["data"]["k"].as_str().unwrap_or_default().to_owned()));
        }
    }
}

/// A WebSocket subscriber like [`follower`]: `since=cursor` on each (re)connect.
async fn ws_follower(
    gateways: Vec<String>,
    until: tokio::sync::watch::Receiver<u64>,
) -> Vec<(u64, String)> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut cursor = 0u64;
    let mut turn = 0usize;
    loop {
        let target = *until.borrow();
        if target > 0 && cursor >= target {
            return seen;
        }
        let base = gateways[turn % gateways.len()].replacen("http://", "ws://", 1);
        turn += 1;
        let url = format!("{base}/v1/ws?topic=chaos/**&since={cursor}");
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let target = *until.borrow();
            if target > 0 && cursor >= target {
                return seen;
            }
            let frame = match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
                Ok(Some(Ok(f))) => f,
                Ok(_) => break,
                Err(_) => continue,
            };
            let text = match frame {
                tokio_tungstenite::tungstenite::Message::Text(t) => t,
                // The server closing (shutting down, or its log unavailable): go elsewhere.
                tokio_tungstenite::tungstenite::Message::Close(_) => break,
                _ => continue,
            };
            let v: Value = serde_json::from_str(&text).expect("a JSON text frame");
            match v["op"].as_str() {
                Some("gap") => panic!("a gap without retention: {v}"),
                Some(_) => continue,
                None => {}
            }
            let id = v["id"].as_u64().unwrap();
            assert!(id > cursor, "ws: id {id} after cursor {cursor}");
            cursor = id;
            seen.push((id, v["data"]["k"].as_str().unwrap_or_default().to_owned()));
        }
    }
}

use eventsource_stream::Eventsource;

#[tokio::test]
async fn chaos_kill9_of_nats_nodes_and_gateways_loses_no_acknowledged_event() {
    let rounds: usize = std::env::var("TIDEWIRE_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    let urls = cluster.urls();
    let mut gateways = [
        Gateway::start(&tmp.path().join("a"), &urls, "chaos", 3).await,
        Gateway::start(&tmp.path().join("b"), &urls, "chaos", 3).await,
    ];
    let bases: Vec<String> = gateways.iter().map(|g| g.url("")).collect();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (until_tx, until_rx) = tokio::sync::watch::channel(0u64);
    let mut reversed = bases.clone();
    reversed.reverse();
    let subscribers = vec![
        tokio::spawn(follower(bases.clone(), until_rx.clone())),
        tokio::spawn(follower(reversed.clone(), until_rx.clone())),
        tokio::spawn(ws_follower(bases.clone(), until_rx.clone())),
        tokio::spawn(ws_follower(reversed, until_rx.clone())),
    ];
    let devices: Vec<_> = (0..3)
        .map(|i| {
            let mut order = bases.clone();
            order.rotate_left(i % 2);
            tokio::spawn(device(
                format!("d{i}"),
                order,
                acked.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    // Random kills, reproducible: the seed is printed, and TIDEWIRE_CHAOS_SEED replays it.
    let seed: u64 = std::env::var("TIDEWIRE_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    eprintln!("chaos: TIDEWIRE_CHAOS_SEED={seed}");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut killed: Vec<String> = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(700 + next() % 600)).await;
        let victim = next() % 5;
        if victim < 3 {
            // A NATS node; every other round the stream leader itself.
            let i = if round % 2 == 0 {
                cluster
                    .stream_leader("chaos")
                    .await
                    .unwrap_or(victim as usize)
            } else {
                victim as usize
            };
            killed.push(format!("nats n{i}"));
            cluster.node(i).kill9();
            tokio::time::sleep(Duration::from_millis(500 + next() % 1000)).await;
            cluster.node(i).restart().await;
        } else {
            let i = (victim - 3) as usize;
            killed.push(format!("gateway {i}"));
            gateways[i].kill9();
            tokio::time::sleep(Duration::from_millis(300 + next() % 700)).await;
            gateways[i].restart().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send_replace(true);
    for d in devices {
        tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("a device never finished its last publish")
            .expect("device");
    }
    cluster.wait_healthy().await;
    let c = client();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    // A gateway serves the stream as far as it has followed it; after a fault its follower
    // may still be catching up. A long-poll from just below the newest acknowledged id
    // returns once the gateway has followed that far.
    let newest = acked.keys.values().copied().max().unwrap_or(0);
    for base in &bases {
        let url = format!(
            "{base}/v1/poll?topic=chaos/**&since={}&timeout=5",
            newest - 1
        );
        // A gateway just back from a fault may answer 503 for a moment: ask again.
        let deadline = Instant::now() + PATIENCE * 2;
        loop {
            let body = get_json(&c, &url).await;
            if body["events"].as_array().is_some_and(|e| !e.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{base} did not follow the stream up to {newest}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stored = common::poll_all(&c, &bases[0], "chaos/**").await;
    let head = stored
        .last()
        .map(|e| e["id"].as_u64().unwrap())
        .unwrap_or(0);
    until_tx.send_replace(head.max(1));
    eprintln!(
        "chaos: {rounds} rounds ({}), {} events acknowledged ({} in batches of 3), {} stored",
        killed.join(", "),
        acked.keys.len(),
        acked.batches.len() * 3,
        stored.len()
    );
    // Every acknowledged event is stored exactly once, under the id its receipt named.
    let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &stored {
        let k = e["data"]["k"].as_str().unwrap().to_owned();
        by_key.entry(k).or_default().push(e["id"].as_u64().unwrap());
    }
    for (k, ids) in &by_key {
        assert_eq!(ids.len(), 1, "{k} stored {} times: {ids:?}", ids.len());
    }
    for (k, id) in &acked.keys {
        assert_eq!(by_key.get(k), Some(&vec![*id]), "acknowledged {k} as {id}");
    }
    // Batches are whole or absent, with contiguous ids.
    let mut batch_of: HashMap<&str, usize> = HashMap::new();
    for e in &stored {
        let k = e["data"]["k"].as_str().unwrap();
        if e["data"]["n"] == 3 {
            let stem = k.rsplit_once('-').unwrap().0;
            *batch_of.entry(stem).or_default() += 1;
        }
    }
    for (stem, n) in &batch_of {
        assert_eq!(*n, 3, "batch {stem} is partly stored");
    }
    for keys in &acked.batches {
        let ids: Vec<u64> = keys.iter().map(|k| by_key[k][0]).collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "batch {keys:?} has ids {ids:?}"
        );
    }
    // Every subscriber received exactly the stored events, in order.
    let expected: Vec<(u64, String)> = stored
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().unwrap(),
                e["data"]["k"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for s in subscribers {
        let seen = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("a subscriber never caught up")
            .expect("subscriber");
        assert_eq!(
            seen.len(),
            expected.len(),
            "a subscriber missed or repeated events"
        );
        assert!(
            seen == expected,
            "a subscriber's events differ from the stored ones"
        );
    }
    let distinct: HashSet<u64> = expected.iter().map(|e| e.0).collect();
    assert_eq!(distinct.len(), expected.len());
    let per_topic: BTreeMap<String, usize> = stored.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["topic"].as_str().unwrap().to_owned())
            .or_default() += 1;
        m
    });
    assert_eq!(per_topic.len(), 3, "{per_topic:?}");
}

#[tokio::test]
async fn with_the_whole_cluster_down_for_a_while_subscribers_continue_exactly_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    let g = Gateway::start(&tmp.path().join("g"), &cluster.urls(), "outage", 3).await;
    let c = client();
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(common::publish_one(&c, &g.url(""), "o/t", json!(i)).await);
    }
    // A subscriber that has seen the first event (and reads the second before the outage),
    // reconnecting with its cursor when needed.
    let mut stream = common::sse(&g.url("/v1/sse?topic=o/**"), Some(before[0])).await;
    let second: Value = serde_json::from_str(&common::next_event(&mut stream).await.data).unwrap();
    let mut seen = vec![before[0], second["id"].as_u64().unwrap()];
    for node in &cluster.nodes {
        node.kill9();
    }
    // While NATS is away: not ready, and a publish is refused with a retryable 503.
    let deadline = Instant::now() + PATIENCE;
    while c.get(g.url("/readyz")).send().await.unwrap().status() == 200 {
        assert!(
            Instant::now() < deadline,
            "still ready with every NATS node down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c
        .post(g.url("/v1/topics/o/t/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":"during","msg_id":"during"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in &cluster.nodes {
        node.respawn().await;
    }
    cluster.wait_healthy().await;
    g.wait_ready().await;
    let (status, body) = post(
        &c,
        &g.url("/v1/topics/o/t/events"),
        "application/json",
        r#"{"data":"during","msg_id":"during"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let mut expected = before.clone();
    expected.push(body["first_id"].as_u64().unwrap());
    for i in 3..5 {
        // Just after the outage the stream can still change leaders, and a publish then gets
        // the contract's retryable 503: retry it with the same msg_id, as a client would.
        let body = json!({"data": i, "msg_id": format!("after-{i}")}).to_string();
        let answer = publish_retrying_503(&c, &g.url("/v1/topics/o/t/events"), body).await;
        expected.push(answer["first_id"].as_u64().unwrap());
    }
    // The stream either stayed open or ended cleanly; either way the cursor takes it on.
    while seen.len() < expected.len() {
        let next = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("quiet too long");
        match next {
            Some(Ok(ev)) => {
                let env: Value = serde_json::from_str(&ev.data).unwrap();
                seen.push(env["id"].as_u64().unwrap());
            }
            _ => {
                stream = common::sse(&g.url("/v1/sse?topic=o/**"), seen.last().copied()).await;
            }
        }
    }
    assert_eq!(
        seen, expected,
        "every event once, in order, across the outage"
    );
}

#[tokio::test]
async fn stream_max_age_is_the_retention_and_an_expired_cursor_gets_the_gap_on_every_transport() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    // Per-topic limits cannot be kept truthfully on JetStream: refused at start, with why.
    let stderr = refused_start(
        &nats.urls(),
        &tmp.path().join("refused"),
        "ret",
        &[("TIDEWIRE_RETENTION_MAX_EVENTS", "10")],
    );
    assert!(stderr.contains("retention_max_events"), "{stderr}");

    let g = Gateway::spawn_with_env(
        &tmp.path().join("g"),
        &nats.urls(),
        "ret",
        1,
        &[],
        &[("TIDEWIRE_RETENTION_MAX_AGE_SECS", "1")],
    );
    g.wait_ready().await;
    let info = nats.stream_info("ret").await;
    assert_eq!(info["config"]["max_age"], 1_000_000_000u64, "{info}");
    let c = client();
    let base = g.url("");
    let mut old = Vec::new();
    for i in 0..3 {
        old.push(common::publish_one(&c, &base, "r/t", json!(i)).await);
    }
    let first_old = old[0];
    // JetStream removes them once they are a second old.
    let deadline = Instant::now() + PATIENCE;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let info = nats.stream_info("ret").await;
        if info["state"]["messages"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream kept the events past max_age: {info}"
        );
    }
    let new: Vec<u64> = vec![
        common::publish_one(&c, &g.url(""), "r/t", json!("a")).await,
        common::publish_one(&c, &g.url(""), "r/t", json!("b")).await,
    ];
    let gap = json!({"requested": first_old, "oldest": new[0]});
    // SSE: `event: gap` first, then the retained events.
    let mut stream = common::sse(&g.url("/v1/sse?topic=r/**"), Some(first_old)).await;
    let ev = common::next_event(&mut stream).await;
    assert_eq!(ev.event, "gap");
    assert_eq!(serde_json::from_str::<Value>(&ev.data).unwrap(), gap);
    assert_eq!(common::read_ids(&mut stream, 2).await, new);
    // Long-poll: `"gap"` beside the events.
    let body = get_json(
        &c,
        &g.url(&format!("/v1/poll?topic=r/**&since={first_old}&timeout=0")),
    )
    .await;
    assert_eq!(body["gap"], gap, "{body}");
    assert_eq!(common::ids(body["events"].as_array().unwrap()), new);
    // WebSocket: a gap frame first.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/ws?topic=r/**&since={first_old}",
        g.addr
    ))
    .await
    .expect("ws");
    let frame = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(v["op"], "gap", "{v}");
    assert_eq!(v["requested"], first_old, "{v}");
    assert_eq!(v["oldest"], new[0], "{v}");
    let stats = get_json(&c, &g.url("/v1/topics/r/t")).await;
    assert_eq!(
        (stats["count"].clone(), stats["first_id"].clone()),
        (json!(2), json!(new[0])),
        "{stats}"
    );
}

#[tokio::test]
async fn concurrent_publishes_share_commits_yet_each_keeps_its_contiguous_ids_and_its_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    let g = Gateway::start(&tmp.path().join("g"), &nats.urls(), "group", 1).await;
    let base = g.url("");
    // 24 publishers at once, 15 requests each, of 1 to 3 events with msg_ids; every fifth
    // request repeats one of the previous publisher's keys (which may be in flight at the
    // same moment) beside new events.
    let tasks: Vec<_> = (0..24)
        .map(|t| {
            let base = base.clone();
            tokio::spawn(async move {
                let c = client();
                let mut receipts = Vec::new();
                for r in 0..15 {
                    let n = 1 + (t + r) % 3;
                    let mut keys: Vec<String> = (0..n).map(|k| format!("p{t}-{r}-{k}")).collect();
                    if r % 5 == 4 {
                        keys.insert(0, format!("p{}-{}-0", (t + 23) % 24, r - 2));
                    }
                    let body: Vec<Value> = keys
                        .iter()
                        .map(|k| json!({"topic": format!("grp/{}", k.len() % 3), "data": {"k": k}, "msg_id": k}))
                        .collect();
                    let (status, receipt) = publish_batch(&c, &base, &body).await;
                    assert_eq!(status, 201, "{receipt}");
                    receipts.push((keys, receipt));
                }
                receipts
            })
        })
        .collect();
    let mut all: Vec<(Vec<String>, Value)> = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let c = client();
    let stored = common::poll_all(&c, &base, "grp/*").await;
    let id_of: HashMap<String, u64> = stored
        .iter()
        .map(|e| {
            (
                e["data"]["k"].as_str().unwrap().to_owned(),
                e["id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(id_of.len(), stored.len(), "a key stored twice");
    for (keys, receipt) in &all {
        let count = receipt["count"].as_u64().unwrap();
        let dups = receipt["duplicate_of"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(count as usize + dups.len(), keys.len(), "{receipt}");
        if count > 0 {
            // The new events of one request: contiguous ids, in the request's order.
            let first = receipt["first_id"].as_u64().unwrap();
            let new: Vec<&String> = keys.iter().filter(|k| id_of[*k] >= first).collect();
            let ids: Vec<u64> = new.iter().map(|k| id_of[*k]).collect();
            assert_eq!(
                ids,
                (first..first + count).collect::<Vec<_>>(),
                "{keys:?} {receipt}"
            );
        }
        for d in dups {
            let d = d.as_u64().unwrap();
            assert!(
                keys.iter().any(|k| id_of[k] == d),
                "{receipt} names {d}, not one of {keys:?}"
            );
        }
    }
    let expected: usize = (0..24)
        .map(|t| (0..15).map(|r| 1 + (t + r) % 3).sum::<usize>())
        .sum();
    assert_eq!(stored.len(), expected, "every key once");
}

#[tokio::test]
async fn a_mixed_batch_on_an_r3_cluster_leaves_every_node_healthy_through_kill9_and_restart() {
    // Finding the repeats of a refused batch asks JetStream about each msg_id without storing
    // anything. On a replicated stream that question must be answered by the leader before
    // anything is proposed: an entry that fails when a node applies it again after a restart
    // stops that node's stream ("not current") for good.
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    let g = Gateway::start(&tmp.path().join("g"), &cluster.urls(), "probes", 3).await;
    let c = client();
    let mut stored = Vec::new();
    for round in 0..4 {
        // A stream just created may not have its leader yet: the contract's retryable 503 is
        // asked again with the same msg_ids, as a client would.
        let body = publish_batch_retrying_503(
            &c,
            &g.url(""),
            &[json!({"topic": "p", "data": round, "msg_id": format!("old-{round}")})],
        )
        .await;
        stored.push(body["first_id"].as_u64().unwrap());
        let body = publish_batch_retrying_503(
            &c,
            &g.url(""),
            &[
                json!({"topic": "p", "data": round, "msg_id": format!("new-{round}")}),
                json!({"topic": "p", "data": round, "msg_id": format!("old-{round}")}),
            ],
        )
        .await;
        assert_eq!(body["count"], 1, "{body}");
        assert_eq!(
            body["duplicate_of"],
            json!([stored[stored.len() - 1]]),
            "{body}"
        );
        stored.push(body["first_id"].as_u64().unwrap());
    }
    // Every node replays its raft log on restart; each must come back healthy.
    for i in 0..3 {
        let node = cluster.node(i);
        node.kill9();
        node.restart().await;
    }
    cluster.wait_healthy().await;
    // Just after the restarts the stream may change leaders: a retryable 503 is fine.
    let body = json!({"data": "after", "msg_id": "after"}).to_string();
    let answer = publish_retrying_503(&c, &g.url("/v1/topics/p/events"), body).await;
    stored.push(answer["first_id"].as_u64().unwrap());
    let all = common::poll_all(&c, &g.url(""), "p").await;
    assert_eq!(common::ids(&all), stored);
}

/// The distinct batches of `calls` in order of first arrival, after checking that each is
/// verified and that a `webhook-id` seen again carries the same events.
fn distinct_batches(calls: &[Value]) -> Vec<(String, Vec<u64>)> {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut order = Vec::new();
    for c in calls {
        assert_eq!(c["verified"], true, "every call verifies: {c}");
        let id = c["webhook_id"].as_str().expect("webhook-id").to_owned();
        let ids: Vec<u64> = c["event_ids"]
            .as_array()
            .expect("event ids")
            .iter()
            .map(|v| v.as_u64().expect("id"))
            .collect();
        match seen.get(&id) {
            Some(before) => assert_eq!(before, &ids, "{id} re-sent with other events"),
            None => {
                seen.insert(id.clone(), ids.clone());
                order.push((id, ids));
            }
        }
    }
    order
}

#[tokio::test]
async fn a_webhook_over_two_gateways_is_delivered_by_one_and_taken_over_when_it_is_killed() {
    use common::webhook::{metric_with, secret, wait_for, Receiver};
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsCluster::single(tmp.path()).await;
    let env = [
        ("TIDEWIRE_WEBHOOK_RETRY_MIN_MS", "50"),
        ("TIDEWIRE_WEBHOOK_RETRY_MAX_MS", "400"),
    ];
    let mut gateways = [
        Gateway::spawn_with_env(&tmp.path().join("a"), &nats.urls(), "hooks", 1, &[], &env),
        Gateway::spawn_with_env(&tmp.path().join("b"), &nats.urls(), "hooks", 1, &[], &env),
    ];
    for g in &gateways {
        g.wait_ready().await;
    }
    let key = secret(7);
    let receiver = Receiver::start(&key);
    let c = client();
    let put = |base: String, body: Value| {
        let c = c.clone();
        async move {
            let r = c
                .put(format!("{base}/v1/webhooks/fn"))
                .json(&body)
                .send()
                .await
                .expect("PUT");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = put(
        gateways[0].url(""),
        json!({"url": receiver.url("/fn"), "topics": ["wh/**"], "secret": key,
               "since": 0, "batch_max_events": 7}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The other gateway knows it within a second or so.
    let other = gateways[1].url("/v1/webhooks/fn");
    wait_for(PATIENCE, "the webhook on the second gateway", || {
        let (c, url) = (c.clone(), other.clone());
        async move { (c.get(url).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;

    let mut expected = Vec::new();
    let publish = |base: String, i: usize, topic: &'static str| {
        let c = c.clone();
        async move {
            let body = json!({"data": i, "msg_id": format!("m-{i}")}).to_string();
            publish_retrying_503(&c, &format!("{base}/v1/topics/{topic}/events"), body).await
        }
    };
    for i in 0..40 {
        let base = gateways[i % 2].url("");
        let topic = if i % 5 == 4 { "other" } else { "wh/x" };
        let r = publish(base, i, topic).await;
        if topic != "other" {
            expected.push(r["first_id"].as_u64().unwrap());
        }
    }
    let delivered_through = |want: u64| {
        let r = &receiver;
        async move {
            let batches = distinct_batches(&r.calls_to("/fn").await);
            batches
                .last()
                .is_some_and(|(_, ids)| ids.last() == Some(&want))
                .then_some(batches)
        }
    };
    let last = *expected.last().unwrap();
    wait_for(PATIENCE, "the first 32 events delivered", || {
        delivered_through(last)
    })
    .await;

    // Exactly one gateway delivers it.
    let mut holders = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        let n = metric_with(
            &g.url(""),
            "tidewire_webhook_batches_total",
            &[("webhook", "fn")],
        )
        .await;
        if n > 0.0 {
            holders.push(i);
        }
    }
    assert_eq!(
        holders.len(),
        1,
        "one gateway delivers the webhook: {holders:?}"
    );
    let (holder, survivor) = (holders[0], 1 - holders[0]);

    // kill -9 the deliverer: the other takes over once its lease lapses (6 s), from the
    // recorded batch and cursor, and delivers what is published meanwhile.
    gateways[holder].kill9();
    for i in 40..70 {
        let r = publish(gateways[survivor].url(""), i, "wh/y").await;
        expected.push(r["first_id"].as_u64().unwrap());
    }
    let last = *expected.last().unwrap();
    let batches = wait_for(
        PATIENCE,
        "delivery taken over by the surviving gateway",
        || delivered_through(last),
    )
    .await;
    let ids: Vec<u64> = batches.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(
        ids, expected,
        "the distinct batches are the matching events in id order, none skipped, none outside"
    );
    assert!(
        metric_with(
            &gateways[survivor].url(""),
            "tidewire_webhook_batches_total",
            &[("webhook", "fn")]
        )
        .await
            > 0.0,
        "the survivor delivers now"
    );

    // The killed gateway comes back; a PUT there moving the cursor reaches the deliverer.
    gateways[holder].restart().await;
    let replay_from = expected[expected.len() - 4];
    let (status, body) = put(gateways[holder].url(""), json!({"since": replay_from})).await;
    assert_eq!(status, 200, "{body}");
    let again = expected[expected.len() - 3];
    let batches = wait_for(PATIENCE, "the events after the moved cursor, again", || {
        let r = &receiver;
        async move {
            let batches = distinct_batches(&r.calls_to("/fn").await);
            (batches
                .iter()
                .filter(|(_, ids)| ids.contains(&again))
                .count()
                >= 2)
                .then_some(batches)
        }
    })
    .await;
    let replay = batches
        .iter()
        .rfind(|(_, ids)| ids.contains(&again))
        .map(|(_, ids)| ids.clone())
        .unwrap_or_default();
    assert_eq!(
        replay,
        expected[expected.len() - 3..],
        "a new batch from the moved cursor"
    );
    let final_view = wait_for(
        PATIENCE,
        "both gateways show the cursor at the last event",
        || {
            let (c, urls) = (
                c.clone(),
                [
                    gateways[0].url("/v1/webhooks/fn"),
                    gateways[1].url("/v1/webhooks/fn"),
                ],
            );
            async move {
                let mut views = Vec::new();
                for u in urls {
                    views.push(c.get(u).send().await.ok()?.json::<Value>().await.ok()?);
                }
                views
                    .iter()
                    .all(|v| v["cursor"] == last && v["state"] == "active" && v["lag"] == 0)
                    .then_some(views)
            }
        },
    )
    .await;
    assert_eq!(final_view[0]["in_flight"], Value::Null, "{final_view:?}");
}

/// A gateway inside the test process (so its clock can be stepped) over `urls` and `stream`,
/// R3 when it creates the stream.
async fn in_process_gateway(
    dir: &Path,
    urls: Vec<String>,
    stream: &str,
    clock: tidewire::clock::Clock,
) -> common::TestServer {
    let stream = stream.to_owned();
    common::TestServer::start_with(dir, move |c| {
        c.log = tidewire::config::LogBackend::Nats;
        c.nats_urls = urls;
        c.nats_stream = stream;
        c.nats_replicas = 3;
        c.clock = clock;
    })
    .await
}

/// Publishes `n` events through `base` (topics `clk/0`..`clk/3`), `round` in their data;
/// returns their ids.
async fn publish_round(base: String, round: u64, n: u64) -> Vec<u64> {
    let c = client();
    let mut ids = Vec::new();
    for i in 0..n {
        let topic = format!("clk/{}", i % 4);
        ids.push(common::publish_one(&c, &base, &topic, json!({"round": round, "i": i})).await);
    }
    ids
}

#[tokio::test]
async fn two_gateways_whose_clocks_disagree_by_two_hours_date_events_in_stream_order_and_start_time_cuts_exactly(
) {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    let ahead = tidewire::clock::Clock::system();
    ahead.step(3_600_000);
    let behind = tidewire::clock::Clock::system();
    behind.step(-3_600_000);
    let a = in_process_gateway(&tmp.path().join("a"), cluster.url_list(), "timed", ahead).await;
    let b = in_process_gateway(&tmp.path().join("b"), cluster.url_list(), "timed", behind).await;
    let (base_a, base_b) = (a.url(""), b.url(""));
    // Two rounds, each published through both gateways at once; a pause between them, so
    // every event of the second round is dated at least a millisecond after the first's.
    let mut rounds: Vec<Vec<u64>> = Vec::new();
    for round in 0..2 {
        let (x, y) = tokio::join!(
            publish_round(base_a.clone(), round, 40),
            publish_round(base_b.clone(), round, 40)
        );
        let mut ids = [x, y].concat();
        ids.sort_unstable();
        rounds.push(ids);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = client();
    let events = common::poll_all(&c, &base_a, "clk/*").await;
    assert_eq!(
        common::poll_all(&c, &base_b, "clk/*").await,
        events,
        "both gateways serve the same events, dated alike"
    );
    assert_eq!(events.len(), 160);
    let times: Vec<u64> = events.iter().map(|e| e["time"].as_u64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "time goes back in id order: {times:?}"
    );
    let now = tidewire::clock::Clock::system().now_ms();
    assert!(
        times.iter().all(|t| t.abs_diff(now) < 600_000),
        "dated by a gateway's stepped clock: {times:?} (now {now})"
    );
    let id_time: HashMap<u64, u64> = events
        .iter()
        .map(|e| (e["id"].as_u64().unwrap(), e["time"].as_u64().unwrap()))
        .collect();
    let t = rounds[1].iter().map(|id| id_time[id]).min().unwrap();
    assert!(rounds[0].iter().all(|id| id_time[id] < t));
    let mut expected = rounds[1].clone();
    for (this, other) in [(&base_a, &base_b), (&base_b, &base_a)] {
        let body = get_json(
            &c,
            &format!("{this}/v1/poll?topic=clk/*&start_time={t}&timeout=0"),
        )
        .await;
        assert_eq!(
            common::ids(body["events"].as_array().unwrap()),
            expected,
            "poll on {this}"
        );
        assert!(body.get("gap").is_none(), "{body}");
        let mut stream =
            common::sse(&format!("{this}/v1/sse?topic=clk/*&start_time={t}"), None).await;
        assert_eq!(
            common::read_ids(&mut stream, expected.len()).await,
            expected,
            "SSE on {this}"
        );
        // Then live, whichever gateway took the publish.
        let live = common::publish_one(&c, other, "clk/0", json!("live")).await;
        assert_eq!(common::read_ids(&mut stream, 1).await, vec![live]);
        expected.push(live);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn publishes_during_stream_leader_elections_are_stored_once_and_never_refused_for_want_of_a_leader(
) {
    // While a replicated stream elects a leader no server listens on its subjects, and NATS
    // answers a publish "no responders" at once. Nothing was stored then, so the gateway sends
    // it again within its request timeout instead of refusing it. What the old leader took and
    // never answered is the contract's retryable 503 (the outcome is unknown); publishers ask
    // again with the same msg_ids, and each event is stored exactly once.
    let tmp = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::three(tmp.path()).await;
    // One NATS server for the gateway, so the leader is elsewhere two times out of three. The
    // budget covers a whole raft election (up to 9 s when a leadership transfer fails).
    let g = Gateway::spawn_with_env(
        &tmp.path().join("g"),
        &cluster.node(0).url(),
        "elect",
        3,
        &[],
        &[("TIDEWIRE_NATS_TIMEOUT_MS", "15000")],
    );
    g.wait_ready().await;
    let c = client();
    publish_retrying_503(
        &c,
        &g.url("/v1/topics/e/events"),
        json!({"data": "first", "msg_id": "first"}).to_string(),
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..3u64 {
        let (c, base, stop) = (c.clone(), g.url(""), stop.clone());
        publishers.push(tokio::spawn(async move {
            // (msg_ids acknowledged, 503 answers)
            let (mut acked, mut refusals): (Vec<String>, Vec<Value>) = (Vec::new(), Vec::new());
            for k in 0..2000u64 {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                // Publisher 0 sends atomic batches of three, the others single events.
                let msg_ids: Vec<String> = match p {
                    0 => (0..3).map(|i| format!("p{p}-{k}-{i}")).collect(),
                    _ => vec![format!("p{p}-{k}")],
                };
                let events: Vec<Value> = msg_ids
                    .iter()
                    .map(|m| json!({"topic": "e", "data": m, "msg_id": m}))
                    .collect();
                let deadline = Instant::now() + PATIENCE;
                loop {
                    let (status, body) = publish_batch(&c, &base, &events).await;
                    if status == 201 {
                        break;
                    }
                    assert_eq!(status, 503, "publisher {p}, publish {k}: {body}");
                    assert!(Instant::now() < deadline, "still refused: {body}");
                    refusals.push(body);
                }
                acked.extend(msg_ids);
            }
            (acked, refusals)
        }));
    }
    let admin = cluster.connect().await;
    let mut stepdowns = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let answer = tokio::time::timeout(
            PATIENCE,
            admin.request("$JS.API.STREAM.LEADER.STEPDOWN.elect", "".into()),
        )
        .await
        .expect("stepdown answered in time");
        if let Ok(m) = answer {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["success"] == json!(true) {
                stepdowns += 1;
            }
        }
        // Until the new leader is known, a further stepdown would be refused.
        let deadline = Instant::now() + PATIENCE;
        while cluster.stream_leader("elect").await.is_none() {
            assert!(Instant::now() < deadline, "the stream found no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert!(stepdowns >= 3, "only {stepdowns} stepdowns took effect");
    let (mut acked, mut refusals) = (vec!["first".to_string()], Vec::new());
    for p in publishers {
        let (a, r) = p.await.unwrap();
        acked.extend(a);
        refusals.extend(r);
    }
    assert!(
        acked.len() > 100,
        "too few publishes to mean anything: {}",
        acked.len()
    );
    let unled: Vec<&Value> = refusals
        .iter()
        .filter(|r| r.to_string().contains("no responders"))
        .collect();
    assert!(
        unled.is_empty(),
        "refused while the stream elected a leader: {unled:?}"
    );
    // Each acknowledged event is stored exactly once, and nothing else is.
    let all = common::poll_all(&c, &g.url(""), "e").await;
    let mut stored: Vec<String> = all
        .iter()
        .map(|e| e["data"].as_str().expect("data").to_string())
        .collect();
    let mut seen = HashSet::new();
    let repeated: Vec<&String> = stored.iter().filter(|m| !seen.insert(*m)).collect();
    assert!(repeated.is_empty(), "stored more than once: {repeated:?}");
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked);
}
