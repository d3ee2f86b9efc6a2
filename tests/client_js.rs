//! The browser client's own unit tests (tests/client_js/*.test.mjs) under Node's built-in
//! test runner, so `cargo test` runs them: its decision logic (transport choice, backoff,
//! cursor, event-stream parsing, token renewal, MessagePack), and the client itself driving
//! the `sse` and `poll` transports against the real server started here (its URL in
//! `TIDEWIRE_URL`), through a proxy the JS tests control.

mod common;

use std::path::Path;
use std::process::Command;

use common::{publish_one, retain_after, TestServer};
use serde_json::json;

/// `$TIDEWIRE_TEST_NODE`, else `node` on the PATH.
fn node() -> String {
    std::env::var("TIDEWIRE_TEST_NODE").unwrap_or_else(|_| "node".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_logic_and_its_sse_and_poll_transports_pass_their_node_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/client_js");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/client_js")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "the JS test files are missing: {files:?}");
    let tmp = tempfile::tempdir().expect("tempdir");
    // A retention gap for the JS tests' `onGap` case: ids 1..=5 on `gap/a`, then 1..=3 removed
    // as retention would, so a resume from 1 must be told that 2 and 3 are gone.
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    for i in 1..=5 {
        assert_eq!(
            publish_one(&client, &server.url(""), "gap/a", json!(i)).await,
            i
        );
    }
    server.stop().await;
    retain_after(tmp.path(), 3).await;
    let server = TestServer::start(&tmp).await;
    let url = server.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(node())
            .arg("--test")
            .args(&files)
            .env("TIDEWIRE_URL", url)
            .output()
    })
    .await
    .expect("join");
    let out = out.unwrap_or_else(|e| {
        panic!(
            "could not run {} ({e}): these tests need Node.js 18 or newer \
             (`apt-get install nodejs`; `bash .ci/run` installs it)",
            node()
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node --test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The TAP summary: every test passed, and there were tests at all.
    let count = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert_eq!(count("fail"), Some(0), "{stdout}");
    assert!(count("pass") >= Some(22), "{stdout}");
    server.stop().await;
}
