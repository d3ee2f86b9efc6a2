//! Shared test harness: the real server (in-process via `server::run`, or the release-shaped
//! binary as a child process) on a loopback port with sled in a temp dir, plus small helpers
//! around independent clients (reqwest for HTTP, eventsource-stream for SSE).
//!
//! `TIDEWIRE_TEST_BACKEND=nats` (default `sled`) runs the same servers on the JetStream log:
//! [`TestServer`] and [`BinServer`] then give each data dir a single-node nats-server of its
//! own (see [`nats::for_data_dir`]) and set `log = nats`, `nats_urls`, `nats_stream`. Tests
//! that are about the sled engine itself return early through [`sled_only`].
#![allow(dead_code)]

pub mod browser;

pub mod auth;

pub mod nats;

pub mod nginx;

pub mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventsource_stream::{Event as SseEvent, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tidewire::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for anything a test waits on; never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The log the servers of this test run use, from `TIDEWIRE_TEST_BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded sled log (the default).
    Sled,
    /// A JetStream stream on a nats-server the harness starts.
    Nats,
}

/// `TIDEWIRE_TEST_BACKEND`: `sled` (also when unset or empty) or `nats`; anything else fails
/// the test rather than silently testing sled.
pub fn backend() -> Backend {
    match std::env::var("TIDEWIRE_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("sled") => Backend::Sled,
        Ok("nats") => Backend::Nats,
        Ok(other) => panic!("TIDEWIRE_TEST_BACKEND={other:?}: expected \"sled\" or \"nats\""),
    }
}

/// For tests about the sled engine itself (they open the data dir, watch its fsyncs, fill its
/// disk): `true`, after saying so on stderr, when the backend is not sled. Use as
/// `if common::sled_only("why") { return; }`.
pub fn sled_only(why: &str) -> bool {
    if backend() == Backend::Sled {
        return false;
    }
    eprintln!("skipped with TIDEWIRE_TEST_BACKEND=nats: {why}");
    true
}

/// Points `config` at the test backend: nothing for sled; for nats, the single-node NATS of
/// `config.data_dir` (started on first use) and its stream.
pub async fn use_backend(config: &mut Config) -> Option<std::sync::Arc<nats::NatsCluster>> {
    if backend() != Backend::Nats {
        return None;
    }
    let node = nats::for_data_dir(&config.data_dir).await;
    config.log = tidewire::config::LogBackend::Nats;
    config.nats_urls = node.url_list();
    config.nats_stream = nats::TEST_STREAM.into();
    Some(node)
}

/// The `tidewire serve` flags that select the test backend for `data_dir` (none for sled;
/// `--log nats --nats-url URL --nats-stream NAME` for nats), for tests that spawn the binary
/// themselves.
pub async fn backend_flags(data_dir: &Path) -> Vec<String> {
    if backend() != Backend::Nats {
        return Vec::new();
    }
    let node = nats::for_data_dir(data_dir).await;
    vec![
        "--log".into(),
        "nats".into(),
        "--nats-url".into(),
        node.urls(),
        "--nats-stream".into(),
        nats::TEST_STREAM.into(),
    ]
}

/// A server running inside the test process on `127.0.0.1:0`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// The NATS the server's log is on (`TIDEWIRE_TEST_BACKEND=nats`).
    pub nats: Option<std::sync::Arc<nats::NatsCluster>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on a fresh temp dir with the default configuration.
    pub async fn start(tmp: &tempfile::TempDir) -> TestServer {
        Self::start_with(tmp.path(), |_| {}).await
    }

    /// Starts a server on `dir` (data in `dir/data`, or on its NATS with the nats backend),
    /// after `tune` has adjusted the configuration.
    pub async fn start_with(dir: &Path, tune: impl FnOnce(&mut Config)) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut config = Config {
            data_dir: dir.join("data"),
            ..Config::default()
        };
        let nats = use_backend(&mut config).await;
        tune(&mut config);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = tidewire::server::run(listener, config, shutdown).await {
                panic!("server failed: {e}");
            }
        });
        // A server that fails to start (its log cannot open, say) panics in its task: say so
        // at once, rather than waiting out the readiness deadline with no reason given.
        wait_ready_unless(addr, || {
            task.is_finished()
                .then(|| "its task ended; the panic printed above says why".to_string())
        })
        .await
        .unwrap_or_else(|why| panic!("{why}"));
        TestServer {
            addr,
            dir: dir.to_path_buf(),
            nats,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Shuts down gracefully and waits until the log is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server did not stop in time")
                .expect("server task panicked");
        }
    }
}

/// The `tidewire` binary as a child process, for `kill -9` and signal tests.
pub struct BinServer {
    pub addr: SocketAddr,
    pub child: Child,
}

impl BinServer {
    /// Starts `tidewire serve --listen 127.0.0.1:PORT --data-dir DIR` and waits for readiness.
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> BinServer {
        Self::spawn_with_env(data_dir, extra, &[]).await
    }

    /// Like [`BinServer::spawn`], with extra environment variables for the child. The port is
    /// free when chosen, yet anything on the machine may bind it before the child does; then
    /// the child reports the address in use and is started again on another port.
    pub async fn spawn_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BinServer {
        for _ in 0..3 {
            match Self::try_spawn_on(free_addr(), data_dir, extra, env).await {
                Ok(server) => return server,
                Err(why) if why.contains("Address already in use") => continue,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("three free ports in a row were taken before tidewire could bind them");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit status (waits at most [`PATIENCE`]).
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `GET /readyz` until it answers 200.
pub async fn wait_ready(addr: SocketAddr) {
    wait_ready_unless(addr, || None)
        .await
        .unwrap_or_else(|why| panic!("{why}"))
}

/// POSTs `body` with `content_type` to `url`; returns the status and the JSON body.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let r = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// GETs `url` and returns its JSON body (panics on a transport error or a non-JSON body).
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"))
}

/// Every retained event matching `pattern`, read with long-poll from cursor 0 to the end, in
/// id order (asserts the ids strictly increase).
pub async fn poll_all(client: &reqwest::Client, base: &str, pattern: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut since = 0;
    loop {
        let url = format!("{base}/v1/poll?topic={pattern}&since={since}&timeout=0&limit=10000");
        let body = get_json(client, &url).await;
        let events = body["events"].as_array().expect("events").clone();
        for e in &events {
            let id = e["id"].as_u64().expect("id");
            assert!(id > since, "poll went backwards: {id} after {since}");
            since = id;
        }
        if events.is_empty() {
            return out;
        }
        out.extend(events);
        since = body["next"].as_u64().expect("next");
    }
}

/// The `id` of each envelope, in order (panics on an envelope without one).
pub fn ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect()
}

/// Publishes one JSON event to `topic` and returns its id (asserts 201). The contract's
/// retryable `503 log_unavailable` (a gateway whose JetStream stream is electing a leader, or
/// whose server has not yet learnt where the stream is: "no responders") is asked again, as a
/// client would, for at most [`PATIENCE`]; nothing was stored by a refused attempt. Each
/// attempt must be answered within [`PATIENCE`].
pub async fn publish_one(client: &reqwest::Client, base: &str, topic: &str, data: Value) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = tokio::time::timeout(
            PATIENCE,
            post(
                client,
                &format!("{base}/v1/topics/{topic}/events"),
                "application/json",
                serde_json::json!({ "data": data }).to_string(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("publish to {topic}: no answer within PATIENCE"));
        if status == 503 && body["error"]["code"] == "log_unavailable" && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(status, 201, "publish refused: {body}");
        return body["first_id"].as_u64().expect("first_id");
    }
}

/// Opens an SSE stream with an independent client (reqwest + eventsource-stream).
pub async fn sse(
    url: &str,
    last_event_id: Option<u64>,
) -> impl Stream<Item = Result<SseEvent, String>> + Unpin {
    let client = reqwest::Client::new();
    let mut req = client.get(url).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = tokio::time::timeout(PATIENCE, req.send())
        .await
        .unwrap_or_else(|_| panic!("SSE {url}: no response headers within PATIENCE"))
        .expect("SSE connect");
    assert_eq!(resp.status(), 200, "SSE refused");
    Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string())),
    )
}

/// Reads the next SSE event (skipping nothing; comments never reach here) within [`PATIENCE`].
pub async fn next_event(
    stream: &mut (impl Stream<Item = Result<SseEvent, String>> + Unpin),
) -> SseEvent {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("timed out waiting for an SSE event")
        .expect("SSE stream ended")
        .expect("SSE stream error")
}

/// Reads `n` events and returns their ids, asserting each `id:` matches the envelope's `id`.
pub async fn read_ids(
    stream: &mut (impl Stream<Item = Result<SseEvent, String>> + Unpin),
    n: usize,
) -> Vec<u64> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let ev = next_event(stream).await;
        let env: Value = serde_json::from_str(&ev.data).expect("data is JSON");
        let id = env["id"].as_u64().expect("envelope id");
        assert_eq!(ev.id, id.to_string(), "SSE id line and envelope id differ");
        ids.push(id);
    }
    ids
}

// ---- Restart-in-place helpers (used by tests/browser.rs and tests/cli.rs). ----

/// A loopback address that was free at the time of asking, for a child server to bind.
///
/// The port comes from below the kernel's ephemeral range, never from `bind(:0)`: an
/// ephemeral port is also what every outgoing connection of the tests running in parallel
/// gets, so one could take it in the moment before the child binds it (CI saw "Address
/// already in use" that way), or while a killed server is restarted on the same address.
/// Each call in this process gets a different port; the start depends on the process id so
/// test binaries running side by side rarely meet.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // Clear of the well-known ports and of common development servers below 10000.
    let (lo, hi) = (10_000u32, ephemeral_lo.max(10_001));
    let span = hi - lo;
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span.min(2_000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = lo + (start + n) % span;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

impl BinServer {
    /// Like [`BinServer::spawn`], but on a chosen address: pass the `addr` of a killed server
    /// to restart it in place, so clients reconnecting to that address find it again.
    pub async fn spawn_on(addr: SocketAddr, data_dir: &Path, extra: &[&str]) -> BinServer {
        Self::spawn_on_with_env(addr, data_dir, extra, &[]).await
    }

    /// Like [`BinServer::spawn_on`], with extra environment variables for the child (e.g.
    /// `TIDEWIRE_SSE_RETRY_MS`, which has no flag). Fails at once if the child exits before
    /// it is ready (e.g. the port could not be bound again), with the child's last words.
    pub async fn spawn_on_with_env(
        addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BinServer {
        match Self::try_spawn_on(addr, data_dir, extra, env).await {
            Ok(server) => server,
            Err(why) => panic!("{why}"),
        }
    }

    /// Starts the child on `addr` and waits until it is ready; `Err` says why it exited first.
    async fn try_spawn_on(
        addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<BinServer, String> {
        let backend = backend_flags(data_dir).await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(&backend)
            .args(extra)
            // `TIDEWIRE_TEST_LOG=debug` shows the child's debug log when chasing a failure.
            .env(
                "RUST_LOG",
                std::env::var("TIDEWIRE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidewire");
        let stderr_tail = relay_stderr(child.stderr.take().expect("piped stderr"));
        let mut server = BinServer { addr, child };
        wait_ready_unless(addr, || {
            let st = server.child.try_wait().expect("wait")?;
            Some(format!("exited with {st}"))
        })
        .await
        .map(|()| server)
        .map_err(|why| {
            // The relay hands over the tail when the child's stderr closes, at its exit.
            let tail = stderr_tail
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
            format!("{why}; its stderr ended with:\n{tail}")
        })
    }
}

/// Passes a child's stderr on to the test's own output line by line (so `cargo test` shows
/// it with the failing test, not mixed into every run), and sends its last 20 lines on the
/// returned channel once the pipe closes.
fn relay_stderr(pipe: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    // A thread spawned here inherits the test's output capture, so eprintln! lands with it.
    std::thread::spawn(move || {
        let mut kept = std::collections::VecDeque::new();
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if kept.len() == 20 {
                kept.pop_front();
            }
            kept.push_back(line);
        }
        // Nobody listens when the child was ready: the tail is only for a failed start.
        let _ = tx.send(Vec::from(kept).join("\n"));
    });
    rx
}

/// Polls `GET /readyz` on `addr` until it answers 200; `Err` at once when `exited` reports
/// that the process meant to serve there has stopped (with why).
pub async fn wait_ready_unless(
    addr: SocketAddr,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(why) = exited() {
            return Err(format!(
                "tidewire on {addr} stopped before it was ready: {why}"
            ));
        }
        if let Ok(r) = client
            .get(format!("http://{addr}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status() == 200 {
                return Ok(());
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {addr} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series in `/metrics` (Prometheus text), given exactly as it is printed:
/// `tidewire_events_stored_total` or `tidewire_live_subscribers{transport="sse"}`. 0 when absent.
pub async fn metric(base: &str, series: &str) -> f64 {
    metric_via(&reqwest::Client::new(), base, series).await
}

/// The Prometheus text of `base`'s `/metrics`, through `client`.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .timeout(PATIENCE)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// [`metric`] through `client` (e.g. one that trusts a test CA, for `https://` bases).
pub async fn metric_via(client: &reqwest::Client, base: &str, series: &str) -> f64 {
    let text = metrics_text(client, base).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or(0.0)
}

/// What a topic's stats say in `bytes` when its events hold `payload` bytes: that number on
/// sled; `null` on NATS, where JetStream keeps no per-subject byte count (by design).
pub fn stat_bytes(payload: u64) -> Value {
    match backend() {
        Backend::Sled => Value::from(payload),
        Backend::Nats => Value::Null,
    }
}

/// Removes events `..=through` from the stopped server's log (the server started on `dir`),
/// as retention would: on sled through the log itself; on NATS by purging the stream below
/// `through + 1`, which moves its first sequence as JetStream's own limits do.
pub async fn retain_after(dir: &std::path::Path, through: u64) {
    if backend() == Backend::Nats {
        let nats = nats::for_data_dir(&dir.join("data")).await;
        let client = nats.connect().await;
        let answer = client
            .request(
                format!("$JS.API.STREAM.PURGE.{}", nats::TEST_STREAM),
                serde_json::json!({ "seq": through + 1 }).to_string().into(),
            )
            .await
            .expect("purge the stream");
        let answer: Value = serde_json::from_slice(&answer.payload).expect("purge answer");
        assert_eq!(answer["success"], true, "purge: {answer}");
        assert_eq!(answer["purged"], through, "purge: {answer}");
        return;
    }
    let log = tidewire::log::SledLog::open(
        &tidewire::log::LogOptions {
            dir: dir.join("data"),
            cache_bytes: 8 << 20,
            dedupe: Default::default(),
            fsync: Default::default(),
            retention: tidewire::log::retention::RetentionPolicy::keep_everything(),
            space: Default::default(),
            checkpoint_every: std::time::Duration::from_millis(500),
            wal_segment_bytes: 32 << 20,
        },
        tidewire::hub::Hub::new(4),
        tidewire::metrics::Metrics::new(),
    )
    .expect("open the log directly");
    let removed = log
        .remove_through(tidewire::envelope::EventId(through))
        .await
        .expect("remove_through");
    assert_eq!(removed, through);
    tidewire::log::EventLog::close(&*log).await.expect("close");
    drop(log);
}
