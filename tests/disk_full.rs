//! A full disk, for real: the server's data dir on a small tmpfs (mounted by the test, which
//! needs root) that a filler file fills up. Publishes get 503 `storage_full` and store nothing,
//! reads go on, and publishing resumes by itself when the filler is deleted. Without root the
//! budget path (`storage_max_disk_bytes`) is tested instead, and the test says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BinServer, PATIENCE};
use serde_json::{json, Value};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A 1000-event batch of 1 KiB payloads, as NDJSON.
fn batch(n: u32) -> String {
    let data = "x".repeat(1024);
    (0..1000)
        .map(|k| json!({"data": format!("{n}-{k}-{data}")}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn publish(client: &reqwest::Client, base: &str, n: u32) -> (u16, Value) {
    common::post(
        client,
        &format!("{base}/v1/topics/full/events"),
        "application/x-ndjson",
        batch(n),
    )
    .await
}

/// Publishes batches until one is refused; returns (acknowledged events, the refusal).
async fn publish_until_refused(client: &reqwest::Client, base: &str) -> (u64, Value) {
    let mut acked = 0;
    for n in 0..400 {
        let (status, body) = publish(client, base, n).await;
        match status {
            201 => acked += body["count"].as_u64().unwrap(),
            503 => return (acked, body),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    panic!("400 MB were accepted: the limit never applied");
}

async fn stored_count(client: &reqwest::Client, base: &str) -> u64 {
    let stats = common::get_json(client, &format!("{base}/v1/topics/full")).await;
    stats["count"].as_u64().unwrap()
}

/// Checks that reads work and that exactly the acknowledged events are stored.
async fn check_reads(client: &reqwest::Client, base: &str, acked: u64) {
    assert_eq!(
        stored_count(client, base).await,
        acked,
        "a refused batch was partly stored"
    );
    let poll = client
        .get(format!(
            "{base}/v1/poll?topic=full&since=0&timeout=0&limit=5"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), 200, "reads stopped with the disk full");
    let body: Value = poll.json().await.unwrap();
    assert_eq!(body["events"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_with_storage_full_keeps_reads_and_recovers_by_itself() {
    if common::sled_only("fills the tmpfs under sled's data dir (storage_min_free_bytes)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let Some(fs) = Tmpfs::mount(&tmp.path().join("mnt"), "48m") else {
        eprintln!("cannot mount a tmpfs (not root?): testing the disk budget path instead");
        return budget_path(tmp.path(), &client).await;
    };
    let server = BinServer::spawn_with_env(
        &fs.0.join("data"),
        &[],
        &[
            ("TIDEWIRE_STORAGE_MIN_FREE_BYTES", "4194304"),
            // The WAL's segments (and its zero-filled spare) at their 32 MiB default would
            // take most of this 48 MiB filesystem before the first publish.
            ("TIDEWIRE_STORAGE_WAL_SEGMENT_BYTES", "1048576"),
        ],
    )
    .await;
    let base = server.url("");
    // Leave about 16 MiB: a dozen batches fit, then the disk is "full".
    let filler = fs.0.join("filler");
    let free = fs4::available_space(&fs.0).unwrap();
    std::fs::write(&filler, vec![0u8; (free - (16 << 20)) as usize]).unwrap();

    let (acked, refusal) = publish_until_refused(&client, &base).await;
    assert!(acked > 0, "nothing fitted");
    assert_eq!(refusal["error"]["code"], "storage_full", "{refusal}");
    check_reads(&client, &base, acked).await;
    // Still full: still refused, still nothing stored. A checkpoint may meanwhile have
    // deleted the write-ahead log segments it covered, which gives room back: take it too,
    // leaving less than storage_min_free_bytes (but some, so sled never meets ENOSPC).
    let top_up = fs.0.join("filler-2");
    let free = fs4::available_space(&fs.0).unwrap();
    std::fs::write(&top_up, vec![0u8; free.saturating_sub(2 << 20) as usize]).unwrap();
    assert_eq!(publish(&client, &base, 999).await.0, 503);
    assert_eq!(stored_count(&client, &base).await, acked);

    // Room again: publishing resumes without a restart.
    std::fs::remove_file(&top_up).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = publish(&client, &base, 1000).await;
        if status == 201 {
            assert_eq!(body["count"], 1000);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing never resumed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored_count(&client, &base).await, acked + 1000);
    drop(server);
    drop(fs);
}

/// Without root: the data dir's disk budget gives the same answers.
async fn budget_path(dir: &Path, client: &reqwest::Client) {
    let server = BinServer::spawn_with_env(
        &dir.join("data"),
        &[],
        &[("TIDEWIRE_STORAGE_MAX_DISK_BYTES", "8388608")],
    )
    .await;
    let base = server.url("");
    let (acked, refusal) = publish_until_refused(client, &base).await;
    assert_eq!(refusal["error"]["code"], "storage_full", "{refusal}");
    check_reads(client, &base, acked).await;
}

#[tokio::test]
async fn over_the_disk_budget_publishes_get_storage_full_and_reads_go_on() {
    if common::sled_only("the data dir's disk budget (storage_max_disk_bytes) is sled's") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    budget_path(tmp.path(), &reqwest::Client::new()).await;
}
