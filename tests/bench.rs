//! `tidewire bench` against the real binary and a real server on a loopback port: its `--json`
//! report counts exactly what the server stored and delivered, and it refuses options the
//! target cannot honour before sending anything.
//!
//! Tiny loads (2 s, a few connections): these check the tool's accounting, never performance.
//! Every child process is ours, bounded in time, and killed by its PID if it overruns.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{get_json, BinServer};
use serde_json::Value;

/// The most a tiny bench run may take before it is killed.
const BENCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `tidewire bench <args>` to completion (killed after [`BENCH_TIMEOUT`]).
async fn bench(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("bench")
            .args(&args)
            .env_remove("TIDEWIRE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidewire bench");
        let deadline = Instant::now() + BENCH_TIMEOUT;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tidewire bench {args:?} ran over {BENCH_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("bench output")
    })
    .await
    .expect("bench thread")
}

/// Runs `tidewire bench <args> --json`, asserts it succeeded, and returns its one JSON object.
async fn bench_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = bench(&all).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tidewire bench {all:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json prints one object: {stdout}");
    serde_json::from_str(lines[0]).expect("the report is JSON")
}

fn u(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {report}"))
}

fn f(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_publish_reports_exactly_the_events_the_server_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let addr = server.addr.to_string();
    let pid = server.child.id().to_string();
    let r = bench_json(&[
        "publish",
        "--addr",
        &addr,
        "--pid",
        &pid,
        "--connections",
        "4",
        "--duration",
        "2s",
        "--topics",
        "2",
    ])
    .await;
    assert_eq!(r["mode"], "publish");
    assert_eq!(r["target"], "tidewire");
    let events = u(&r, "events");
    assert!(events > 0, "nothing acknowledged: {r}");
    assert_eq!(u(&r, "requests"), events, "one event per request: {r}");
    assert_eq!(u(&r, "errors"), 0, "{r}");
    assert!(
        f(&r, "req_per_s") > 0.0 && f(&r, "events_per_s") > 0.0,
        "{r}"
    );
    assert!(f(&r, "p99_ms") >= f(&r, "p50_ms"), "{r}");
    assert!(
        f(&r, "tool_cpu_s") >= 0.0 && f(&r, "server_cpu_s") > 0.0,
        "{r}"
    );

    // Every acknowledged event is stored, and nothing else.
    let client = reqwest::Client::new();
    let mut stored = 0;
    for t in ["bench/p0", "bench/p1"] {
        stored += get_json(&client, &server.url(&format!("/v1/topics/{t}"))).await["count"]
            .as_u64()
            .expect("count");
    }
    assert_eq!(stored, events, "report {r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_fanout_over_sse_reports_every_published_event_delivered_to_every_subscriber() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let addr = server.addr.to_string();
    let r = bench_json(&[
        "fanout",
        "--addr",
        &addr,
        "--transport",
        "sse",
        "--subscribers",
        "5",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--publishers",
        "2",
    ])
    .await;
    assert_eq!(
        (r["mode"].as_str(), r["transport"].as_str()),
        (Some("fanout"), Some("sse"))
    );
    assert_eq!(u(&r, "published"), 100, "rate x duration events: {r}");
    assert_eq!(u(&r, "publish_errors"), 0, "{r}");
    assert_eq!(u(&r, "expected"), 100 * 5, "{r}");
    assert_eq!(u(&r, "delivered"), u(&r, "expected"), "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "complete_subscribers"), 5, "{r}");
    assert_eq!(
        u(&r, "latency_samples"),
        500,
        "one latency per delivery: {r}"
    );
    assert!(f(&r, "delivered_per_s") > 0.0, "{r}");
    assert!(
        f(&r, "max_ms") >= f(&r, "p99_ms") && f(&r, "p99_ms") >= f(&r, "p50_ms"),
        "{r}"
    );
    assert_eq!(u(&r, "subscriber_errors"), 0, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_fanout_over_gzip_sse_inflates_the_streams_and_counts_every_delivery() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = BinServer::spawn_with_env(
        &tmp.path().join("data"),
        &[],
        &[("TIDEWIRE_SSE_GZIP", "true")],
    )
    .await;
    let addr = server.addr.to_string();
    let args = [
        "fanout",
        "--addr",
        &addr,
        "--transport",
        "sse",
        "--gzip",
        "--subscribers",
        "5",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--publishers",
        "2",
    ];
    let r = bench_json(&args).await;
    assert_eq!(r["gzip"], Value::Bool(true), "{r}");
    assert_eq!(u(&r, "published"), 100, "{r}");
    assert_eq!(u(&r, "delivered"), 100 * 5, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "latency_samples"), 500, "{r}");
    assert_eq!(u(&r, "subscriber_errors"), 0, "{r}");
    // A server without `sse_gzip` answers in plain text: the tool says so instead of
    // counting nothing.
    let plain_dir = tempfile::tempdir().expect("tempdir");
    let plain = BinServer::spawn(&plain_dir.path().join("data"), &[]).await;
    let plain_addr = plain.addr.to_string();
    let mut args = args;
    args[2] = &plain_addr;
    let out = bench(&args).await;
    assert!(!out.status.success(), "gzip asked of a plain server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sse_gzip"), "{err}");
    // Only SSE streams are gzip'd.
    let out = bench(&["fanout", "--addr", &addr, "--transport", "ws", "--gzip"]).await;
    assert!(!out.status.success(), "--gzip over WebSocket was accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_refuses_tidewire_only_options_against_nchan_before_connecting() {
    // Port 9 on loopback: nothing is contacted, the option is refused first.
    for args in [
        &[
            "publish",
            "--target",
            "nchan",
            "--addr",
            "127.0.0.1:9",
            "--batch",
            "10",
        ][..],
        &[
            "publish",
            "--target",
            "nchan",
            "--addr",
            "127.0.0.1:9",
            "--gzip",
        ],
        &[
            "fanout",
            "--target",
            "nchan",
            "--addr",
            "127.0.0.1:9",
            "--transport",
            "ws",
            "--encoding",
            "msgpack",
        ],
    ] {
        let out = bench(args).await;
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("tidewire-only"), "{args:?}: {err}");
    }
    let out = bench(&["publish", "--duration", "11m"]).await;
    assert!(!out.status.success(), "an 11-minute run was accepted");
}
