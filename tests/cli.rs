//! The command line against the real binary: `publish` prints the receipt, `tail` prints
//! envelopes and resumes by itself across a `kill -9` and restart, and `serve` takes its
//! configuration from defaults < TOML file < `TIDEWIRE_*` variables < flags, refuses unknown
//! keys, and refuses a non-loopback address without `--insecure-open` before binding it.
//!
//! Every child process is ours, bounded in time, and killed by its PID when a test ends.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_addr, BinServer, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Bound on any one CLI command that is expected to finish by itself.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Running the binary.

/// A `tidewire` child process with its stdout (line by line) and stderr collected by threads.
/// Dropping it kills the child (by its PID) if it still runs.
struct Proc {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

impl Proc {
    /// Starts `tidewire <args>` with no inherited `TIDEWIRE_*` variable, plus `env`.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidewire"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TIDEWIRE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn tidewire");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out_pipe = child.stdout.take().expect("stdout pipe");
        let err_pipe = child.stderr.take().expect("stderr pipe");
        let out = stdout.clone();
        let err = stderr.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out_pipe).lines() {
                    let Ok(line) = line else { break };
                    out.lock().expect("stdout lock").push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut pipe = err_pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    err.lock()
                        .expect("stderr lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }),
        ];
        Proc {
            child,
            stdout,
            stderr,
            readers,
            what: format!("tidewire {}", args.join(" ")),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the exit (at most `limit`; the child is killed and the test fails after
    /// that), then for the output readers to drain the pipes.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.try_status() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`{}` did not exit within {limit:?}; stdout: {:?}; stderr: {}",
                    self.what,
                    self.lines(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        status
    }

    /// Waits until stdout holds at least `n` lines (bounded by [`PATIENCE`]).
    fn wait_lines(&mut self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            if let Some(st) = self.try_status() {
                panic!(
                    "`{}` exited ({st}) after {} of {n} lines; stdout: {lines:?}; stderr: {}",
                    self.what,
                    lines.len(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{}` printed {} of {n} lines in time; stdout: {lines:?}; stderr: {}",
                self.what,
                lines.len(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM by PID; returns the exit status (bounded).
    fn sigterm(&mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
        self.wait_exit(PATIENCE)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a finished command left behind.
struct Output {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

/// Runs `tidewire <args>` to completion (bounded) off the async runtime.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = Proc::start(&args, &env);
        let status = p.wait_exit(CMD_TIMEOUT);
        Output {
            status,
            stdout: p.lines(),
            stderr: p.stderr(),
        }
    })
    .await
    .expect("CLI runner thread")
}

fn envelopes(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn ids(envs: &[Value]) -> Vec<u64> {
    envs.iter()
        .map(|e| e["id"].as_u64().expect("envelope id"))
        .collect()
}

async fn wait_sse_subscribers(base: &str, n: u64) {
    let deadline = Instant::now() + PATIENCE;
    while common::metric(base, "tidewire_live_subscribers{transport=\"sse\"}").await as u64 != n {
        assert!(
            Instant::now() < deadline,
            "never saw {n} SSE subscribers on {base}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every retained event of `pattern` through an independent SSE client.
async fn stored(base: &str, pattern: &str, n: usize) -> Vec<Value> {
    let mut s = common::sse(&format!("{base}/v1/sse?topic={pattern}"), Some(0)).await;
    let mut out = Vec::new();
    while out.len() < n {
        let ev = common::next_event(&mut s).await;
        out.push(serde_json::from_str(&ev.data).expect("data JSON"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// publish

#[tokio::test]
async fn publish_prints_the_receipt_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let url = server.url("");

    let out = run(
        &[
            "publish",
            "sensors/room-12/temperature",
            r#"{"t":21.5}"#,
            "--server",
            &url,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert_eq!(out.stdout.len(), 1, "one receipt line: {:?}", out.stdout);
    let receipt: Value = serde_json::from_str(&out.stdout[0]).expect("receipt is JSON");
    assert_eq!(
        receipt,
        json!({"first_id": 1, "last_id": 1, "count": 1, "duplicates": 0})
    );

    // --type and --msg-id; the server URL from TIDEWIRE_SERVER.
    let out = run(
        &[
            "publish",
            "sensors/room-12/temperature",
            r#"{"t":22}"#,
            "--type",
            "reading",
            "--msg-id",
            "m-1",
        ],
        &[("TIDEWIRE_SERVER", &url)],
    )
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    let receipt: Value = serde_json::from_str(&out.stdout[0]).expect("receipt is JSON");
    assert_eq!(receipt["first_id"], 2, "{receipt}");

    // Text that is not JSON is sent as a JSON string (documented in `publish --help`).
    let out = run(
        &["publish", "logs/app", "hello world", "--server", &url],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    let receipt: Value = serde_json::from_str(&out.stdout[0]).expect("receipt is JSON");
    assert_eq!(receipt["first_id"], 3, "{receipt}");
    // Text that starts like JSON but is broken is a typo: refused, nothing stored.
    let out = run(
        &["publish", "logs/app", r#"{"t": 21.5"#, "--server", &url],
        &[],
    )
    .await;
    assert!(!out.status.success(), "broken JSON was accepted");
    assert!(out.stderr.contains("not valid JSON"), "{}", out.stderr);

    let sensors = stored(&url, "sensors/**", 2).await;
    assert_eq!(sensors[0]["data"], json!({"t": 21.5}));
    assert!(sensors[0].get("type").is_none(), "{}", sensors[0]);
    assert_eq!(sensors[1]["data"], json!({"t": 22}));
    assert_eq!(sensors[1]["type"], "reading");
    assert_eq!(sensors[1]["topic"], "sensors/room-12/temperature");
    let logs = stored(&url, "logs/app", 1).await;
    assert_eq!(logs[0]["data"], json!("hello world"));
    let stats: Value = reqwest::get(format!("{url}/v1/topics/logs/app"))
        .await
        .expect("topic stats")
        .json()
        .await
        .expect("stats JSON");
    assert_eq!(stats["count"], 1, "the broken JSON was stored: {stats}");
}

#[tokio::test]
async fn publish_refusals_exit_nonzero_with_a_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let url = server.url("");

    // Topics the server refuses (422), and one that is not even a valid URL path.
    for topic in [
        "a//b",
        "sensors/*",
        "sensors/**",
        "sensors/room 12",
        "ümlaut",
    ] {
        let out = run(&["publish", topic, r#"{"t":1}"#, "--server", &url], &[]).await;
        assert!(
            !out.status.success(),
            "publish to {topic:?} must fail; stdout {:?}",
            out.stdout
        );
        assert!(
            out.stdout.is_empty(),
            "no receipt for {topic:?}: {:?}",
            out.stdout
        );
        assert!(
            out.stderr.starts_with("tidewire: ") && out.stderr.trim().len() > "tidewire:".len(),
            "a message for {topic:?}: {:?}",
            out.stderr
        );
    }
    let out = run(&["publish", "a//b", "1", "--server", &url], &[]).await;
    assert!(
        out.stderr.contains("422") && out.stderr.contains("invalid_topic"),
        "the server's refusal is shown: {}",
        out.stderr
    );

    // Nothing of the refused publishes was stored.
    let topics: Value = reqwest::get(server.url("/v1/topics"))
        .await
        .expect("GET /v1/topics")
        .json()
        .await
        .expect("topics JSON");
    let text = topics.to_string();
    assert!(
        !text.contains("a//b") && !text.contains("room 12"),
        "{topics}"
    );

    // No server there; a URL that is not http://host:port.
    let nobody = format!("http://{}", free_addr());
    let out = run(&["publish", "sensors/a", "1", "--server", &nobody], &[]).await;
    assert!(!out.status.success(), "no server: {:?}", out.stdout);
    assert!(out.stderr.starts_with("tidewire: "), "{}", out.stderr);
    for bad in ["https://127.0.0.1:1", "127.0.0.1 7700", "ftp://x"] {
        let out = run(&["publish", "sensors/a", "1", "--server", bad], &[]).await;
        assert!(!out.status.success(), "bad URL {bad:?}");
        assert!(out.stderr.contains("bad server URL"), "{}", out.stderr);
    }
    // Missing arguments: clap's usage error.
    let out = run(&["publish", "sensors/a"], &[]).await;
    assert!(!out.status.success());
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------------
// tail

async fn publish(base: &str, topic: &str, n: u64, typ: Option<&str>) -> u64 {
    let mut env = json!({ "data": { "n": n } });
    if let Some(t) = typ {
        env["type"] = t.into();
    }
    let (status, body) = common::post(
        &reqwest::Client::new(),
        &format!("{base}/v1/topics/{topic}/events"),
        "application/json",
        env.to_string(),
    )
    .await;
    assert_eq!(status, 201, "publish refused: {body}");
    body["first_id"].as_u64().expect("first_id")
}

#[tokio::test]
async fn tail_prints_count_events_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let url = server.url("");
    publish(&url, "sensors/a", 1, None).await; // 1
    publish(&url, "other/x", 2, None).await; // 2, not matched
    publish(&url, "sensors/b/c", 3, Some("reading")).await; // 3
    publish(&url, "sensors/a", 4, None).await; // 4
    publish(&url, "sensors/b", 5, None).await; // 5

    let out = run(
        &[
            "tail",
            "sensors/**",
            "--since",
            "0",
            "--count",
            "4",
            "--server",
            &url,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    let envs = envelopes(&out.stdout);
    assert_eq!(ids(&envs), [1, 3, 4, 5], "{:?}", out.stdout);
    assert_eq!(envs[1]["type"], "reading");
    assert_eq!(envs[1]["topic"], "sensors/b/c");
    assert_eq!(envs[1]["data"], json!({"n": 3}));

    // Several patterns, from a cursor.
    let out = run(
        &[
            "tail",
            "sensors/*",
            "other/**",
            "--since",
            "1",
            "--count",
            "3",
            "--server",
            &url,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert_eq!(ids(&envelopes(&out.stdout)), [2, 4, 5], "{:?}", out.stdout);

    // No --since: live only. Events 1..5 are not printed; two new ones are.
    let mut live = Proc::start(
        &["tail", "sensors/**", "--count", "2", "--server", &url],
        &[],
    );
    wait_sse_subscribers(&url, 1).await;
    publish(&url, "sensors/a", 6, None).await;
    publish(&url, "sensors/a", 7, None).await;
    let status = tokio::task::spawn_blocking(move || {
        let st = live.wait_exit(CMD_TIMEOUT);
        (st, live.lines(), live.stderr())
    })
    .await
    .expect("join");
    assert!(status.0.success(), "exit {}: {}", status.0, status.2);
    assert_eq!(ids(&envelopes(&status.1)), [6, 7], "{:?}", status.1);
}

#[tokio::test]
async fn tail_refusals_exit_nonzero_with_a_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let url = server.url("");
    for pattern in ["sensors/**/x", "a//b", "sensors/te*"] {
        let out = run(&["tail", pattern, "--since", "0", "--server", &url], &[]).await;
        assert!(!out.status.success(), "pattern {pattern:?} must be refused");
        assert!(
            out.stderr.contains("422") || out.stderr.contains("400"),
            "{pattern:?}: {}",
            out.stderr
        );
    }
    let out = run(&["tail", "--since", "0", "--server", &url], &[]).await;
    assert!(!out.status.success(), "a pattern is required");
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_by_itself_across_a_kill9_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let addr = free_addr();
    // A short `retry:` so tail comes back quickly; it keeps retrying while the port is dead.
    let env = [("TIDEWIRE_SSE_RETRY_MS", "100")];
    let mut server = BinServer::spawn_on_with_env(addr, &data, &[], &env).await;
    let url = server.url("");

    let mut tail = Proc::start(
        &[
            "tail",
            "sensors/**",
            "--since",
            "0",
            "--count",
            "6",
            "--server",
            &url,
        ],
        &[],
    );
    for n in 1..=3 {
        assert_eq!(publish(&url, "sensors/a", n, None).await, n);
    }
    let mut tail = tokio::task::spawn_blocking(move || {
        tail.wait_lines(3);
        tail
    })
    .await
    .expect("join");

    server.kill9();
    // Down for a while: tail's reconnects are refused and it keeps trying.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        tail.try_status().is_none(),
        "tail gave up: {}",
        tail.stderr()
    );
    let server = BinServer::spawn_on_with_env(addr, &data, &[], &env).await;
    for n in 4..=6 {
        assert_eq!(publish(&url, "sensors/a", n, None).await, n);
    }

    let (status, lines, stderr) = tokio::task::spawn_blocking(move || {
        let st = tail.wait_exit(CMD_TIMEOUT);
        (st, tail.lines(), tail.stderr())
    })
    .await
    .expect("join");
    assert!(status.success(), "tail exit {status}; stderr: {stderr}");
    let envs = envelopes(&lines);
    assert_eq!(
        ids(&envs),
        [1, 2, 3, 4, 5, 6],
        "each event exactly once, in order; stdout {lines:?}; stderr {stderr}"
    );
    for (e, n) in envs.iter().zip(1..) {
        assert_eq!(e["data"], json!({"n": n}), "{e}");
    }
    assert!(
        stderr.contains("reconnecting") || stderr.contains("retrying"),
        "tail went through the drop: {stderr}"
    );
    drop(server);
}

/// While a restarted server opens its log it answers 503 (`not_ready`), also on `/v1/sse`;
/// tail must wait and retry then, not give up. A fake server answers the first request 503
/// and the second with a stream, which must carry the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_retries_while_the_server_is_not_ready() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    listener.set_nonblocking(true).expect("nonblocking");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    let over = move || finished.load(std::sync::atomic::Ordering::Acquire);
    let fake = std::thread::spawn(move || {
        let deadline = Instant::now() + CMD_TIMEOUT;
        let mut served = 0;
        let mut open = Vec::new();
        while served < 2 && !over() && Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            conn.set_nonblocking(false).expect("blocking");
            conn.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            seen.lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&head).to_lowercase());
            let resp = if served == 0 {
                let body = r#"{"error":{"code":"not_ready","message":"the server is starting or shutting down"}}"#;
                format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                 cache-control: no-cache\r\nconnection: close\r\n\r\n\
                 retry: 50\n\nid: 8\ndata: {\"id\":8,\"topic\":\"sensors/a\",\"time\":1,\"data\":1}\n\n"
                    .to_string()
            };
            let _ = conn.write_all(resp.as_bytes());
            let _ = conn.flush();
            served += 1;
            open.push(conn); // keep the stream open: tail must stop on its own count
        }
        while !over() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    });

    let url = format!("http://{addr}");
    let out = run(
        &[
            "tail",
            "sensors/**",
            "--since",
            "7",
            "--count",
            "1",
            "--server",
            &url,
        ],
        &[],
    )
    .await;
    done.store(true, std::sync::atomic::Ordering::Release);
    let _ = fake.join();
    assert!(
        out.status.success(),
        "tail must retry a 503, not exit {}: {}",
        out.status,
        out.stderr
    );
    assert_eq!(ids(&envelopes(&out.stdout)), [8], "{:?}", out.stdout);
    let reqs = requests.lock().expect("lock").clone();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for r in &reqs {
        assert!(r.starts_with("get /v1/sse?topic=sensors"), "{r}");
        assert!(
            r.contains("last-event-id: 7\r\n"),
            "the cursor is sent: {r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// serve: configuration

/// Starts `tidewire serve <args>` and waits until `addr` is ready; fails at once if the
/// process exits first.
async fn serve(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let mut p = Proc::start(&all, env);
    common::wait_ready_unless(addr, || {
        p.try_status().map(|st| format!("{st}: {}", p.stderr()))
    })
    .await
    .unwrap_or_else(|why| panic!("{why}"));
    p
}

/// Whether anything accepts connections on `addr`.
fn answers(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// The `retry:` value the server at `addr` advertises on a new SSE stream.
async fn advertised_retry(addr: SocketAddr) -> u64 {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/sse?topic=x"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("SSE");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .expect("SSE preamble in time")
            .expect("SSE stream open")
            .expect("SSE chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("retry: "))
        .unwrap_or_else(|| panic!("no retry line: {text:?}"));
    line.trim().parse().expect("retry value")
}

/// The origin the server at `addr` lets read cross-origin, as seen from `origin`.
async fn cors_allows(addr: SocketAddr, origin: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .header("origin", origin)
        .send()
        .await
        .expect("GET /healthz");
    r.headers()
        .get("access-control-allow-origin")
        .is_some_and(|v| v == origin)
}

fn write_config(path: &Path, listen: SocketAddr, data_dir: &Path) {
    let text = format!(
        "listen = \"{listen}\"\ndata_dir = {data:?}\nsse_retry_ms = 700\n\
         allowed_origins = [\"http://file.example\"]\n",
        data = data_dir.display().to_string(),
    );
    std::fs::write(path, text).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_config_file_then_env_then_flags() {
    // 1. The file alone (through --config).
    let root = tempfile::tempdir().expect("tempdir");
    let cfg = root.path().join("tidewire.toml");
    let file_addr = free_addr();
    write_config(&cfg, file_addr, &root.path().join("file-data"));
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let mut p = serve(file_addr, &["--config", cfg_s], &[]).await;
    assert!(
        root.path().join("file-data").is_dir(),
        "the file's data_dir"
    );
    assert_eq!(advertised_retry(file_addr).await, 700);
    assert!(cors_allows(file_addr, "http://file.example").await);
    let st = p.sigterm();
    assert!(st.success(), "exit after SIGTERM: {st}: {}", p.stderr());

    // 2. The file (through TIDEWIRE_CONFIG) overridden by TIDEWIRE_* variables. A client-side
    //    variable (TIDEWIRE_SERVER) in the environment does not trouble serve.
    let root = tempfile::tempdir().expect("tempdir");
    let cfg = root.path().join("tidewire.toml");
    let (file_addr, env_addr) = (free_addr(), free_addr());
    write_config(&cfg, file_addr, &root.path().join("file-data"));
    let env_data = root.path().join("env-data");
    let env = [
        ("TIDEWIRE_CONFIG", cfg.to_str().expect("utf-8")),
        ("TIDEWIRE_LISTEN", &env_addr.to_string()),
        ("TIDEWIRE_DATA_DIR", env_data.to_str().expect("utf-8")),
        ("TIDEWIRE_SSE_RETRY_MS", "800"),
        ("TIDEWIRE_SERVER", "http://127.0.0.1:1"),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, *v)).collect();
    let mut p = serve(env_addr, &[], &env).await;
    assert!(env_data.is_dir(), "the env's data_dir");
    assert!(!root.path().join("file-data").exists(), "not the file's");
    assert!(!answers(file_addr), "not the file's listen address");
    assert_eq!(advertised_retry(env_addr).await, 800);
    assert!(cors_allows(env_addr, "http://file.example").await);
    let st = p.sigterm();
    assert!(st.success(), "exit after SIGTERM: {st}: {}", p.stderr());

    // 3. Flags override both.
    let root = tempfile::tempdir().expect("tempdir");
    let cfg = root.path().join("tidewire.toml");
    let (file_addr, env_addr, flag_addr) = (free_addr(), free_addr(), free_addr());
    write_config(&cfg, file_addr, &root.path().join("file-data"));
    let env_data = root.path().join("env-data");
    let flag_data = root.path().join("flag-data");
    let env_addr_s = env_addr.to_string();
    let env = [
        ("TIDEWIRE_LISTEN", env_addr_s.as_str()),
        ("TIDEWIRE_DATA_DIR", env_data.to_str().expect("utf-8")),
        ("TIDEWIRE_SSE_RETRY_MS", "800"),
    ];
    let flag_addr_s = flag_addr.to_string();
    let mut p = serve(
        flag_addr,
        &[
            "--config",
            cfg.to_str().expect("utf-8"),
            "--listen",
            &flag_addr_s,
            "--data-dir",
            flag_data.to_str().expect("utf-8"),
            "--allowed-origin",
            "http://flag.example",
        ],
        &env,
    )
    .await;
    assert!(flag_data.is_dir(), "the flag's data_dir");
    assert!(!env_data.exists() && !root.path().join("file-data").exists());
    assert!(!answers(env_addr) && !answers(file_addr));
    assert_eq!(advertised_retry(flag_addr).await, 800, "no flag: env wins");
    assert!(cors_allows(flag_addr, "http://flag.example").await);
    assert!(
        !cors_allows(flag_addr, "http://file.example").await,
        "a flag list replaces the file's list"
    );
    let st = p.sigterm();
    assert!(st.success(), "exit after SIGTERM: {st}: {}", p.stderr());
}

/// Runs `serve` expecting a refusal: a non-zero exit within seconds, a message naming
/// `needle`, and no data dir created.
async fn assert_serve_refused(args: &[&str], env: &[(&str, &str)], data: &Path, needle: &str) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = run(&all, env).await;
    assert!(
        !out.status.success(),
        "`serve {args:?}` must refuse to start"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal comes at once"
    );
    assert!(
        out.stderr.contains(needle),
        "`serve {args:?}`: the message names {needle:?}: {}",
        out.stderr
    );
    assert!(!data.exists(), "nothing is created before the refusal");
}

#[tokio::test]
async fn serve_refuses_unknown_keys_and_bad_values() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let cfg = root.path().join("typo.toml");
    let cfg_s = cfg.to_str().expect("utf-8");
    let listen = free_addr().to_string();

    std::fs::write(
        &cfg,
        format!("listen = \"{listen}\"\ndata_dir = {data_s:?}\nsse_retry_msec = 100\n"),
    )
    .expect("write");
    assert_serve_refused(&["--config", cfg_s], &[], &data, "sse_retry_msec").await;

    std::fs::write(
        &cfg,
        format!("listen = \"not an address\"\ndata_dir = {data_s:?}\n"),
    )
    .expect("write");
    assert_serve_refused(&["--config", cfg_s], &[], &data, "listen").await;

    let missing = root.path().join("missing.toml");
    assert_serve_refused(
        &["--config", missing.to_str().expect("utf-8")],
        &[],
        &data,
        "does not exist",
    )
    .await;

    assert_serve_refused(
        &["--listen", &listen, "--data-dir", data_s],
        &[("TIDEWIRE_SSE_RETRY_MS", "soon")],
        &data,
        "SSE_RETRY_MS",
    )
    .await;
}

/// A second server on a data dir that a running one holds gives up after the short wait
/// (the holder might have been a server still exiting), saying which process holds it; the
/// first goes on serving.
#[tokio::test]
async fn a_second_server_on_a_data_dir_in_use_exits_naming_the_process_that_holds_it() {
    if common::sled_only("about the sled directory's lock") {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let addr = free_addr();
    let mut first = serve(
        addr,
        &["--listen", &addr.to_string(), "--data-dir", data_s],
        &[],
    )
    .await;

    let second = free_addr().to_string();
    let started = Instant::now();
    let out = run(&["serve", "--listen", &second, "--data-dir", data_s], &[]).await;
    let took = started.elapsed();
    assert!(!out.status.success(), "the second server must not start");
    let holder = format!("held by process {}", first.child.id());
    assert!(
        out.stderr.contains(&holder),
        "names {holder:?}: {}",
        out.stderr
    );
    assert!(
        took >= Duration::from_millis(1900),
        "gave up before the short wait: {took:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "waited as if its own process held the lock: {took:?}"
    );

    // The first server is untouched.
    let client = reqwest::Client::new();
    let id = publish(&format!("http://{addr}"), "still/here", 1, None).await;
    let stored = client
        .get(format!(
            "http://{addr}/v1/poll?topic=still/here&since=0&timeout=0"
        ))
        .timeout(PATIENCE)
        .send()
        .await
        .expect("poll")
        .json::<Value>()
        .await
        .expect("poll body");
    assert_eq!(stored["events"][0]["id"], id);
    let st = first.sigterm();
    assert!(st.success(), "exit after SIGTERM: {st}: {}", first.stderr());
}

/// An open server (no auth configured) must not listen beyond loopback unless told
/// `--insecure-open`. Only the refusal is tested; nothing binds a non-loopback address.
#[tokio::test]
async fn serve_refuses_a_non_loopback_address_without_insecure_open() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        assert_serve_refused(
            &["--listen", listen, "--data-dir", data_s],
            &[],
            &data,
            "--insecure-open",
        )
        .await;
    }
    // The same through the file and through the environment.
    let cfg = root.path().join("open.toml");
    std::fs::write(
        &cfg,
        format!("listen = \"0.0.0.0:0\"\ndata_dir = {data_s:?}\n"),
    )
    .expect("write");
    assert_serve_refused(
        &["--config", cfg.to_str().expect("utf-8")],
        &[],
        &data,
        "--insecure-open",
    )
    .await;
    assert_serve_refused(
        &["--data-dir", data_s],
        &[("TIDEWIRE_LISTEN", "0.0.0.0:0")],
        &data,
        "--insecure-open",
    )
    .await;
}
