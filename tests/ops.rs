//! The operator commands, run as an operator would: `tidewire inspect`, `verify`, `export` and
//! `import` on a stopped server's data dir, and an online `export --server` while publishers
//! keep going.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{post, BinServer};
use serde_json::{json, Value};

fn tidewire(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(args)
        .output()
        .expect("run tidewire")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// Publishes a mix of events (JSON, bytes, typed, with msg_ids, several topics), then stops
/// the server cleanly.
async fn populate(dir: &Path) {
    let mut server = BinServer::spawn(dir, &[]).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for n in 0..50 {
        let topic = ["plant/a/temp", "plant/b/temp", "audit"][n % 3];
        let body =
            json!({"data": {"n": n, "unit": "°C"}, "type": "reading", "msg_id": format!("m{n}")});
        let (status, _) = post(
            &client,
            &format!("{base}/v1/topics/{topic}/events"),
            "application/json",
            body.to_string(),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, _) = post(
        &client,
        &format!("{base}/v1/topics/blobs/events"),
        "application/octet-stream",
        vec![0u8, 159, 146, 150],
    )
    .await;
    assert_eq!(status, 201);
    assert!(server.sigterm().success());
}

#[tokio::test]
async fn inspect_verify_export_and_import_round_trip_a_stopped_servers_log() {
    if common::sled_only("inspect, verify, export and import work on a sled data dir") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    populate(&dir).await;
    let d = dir.to_str().unwrap();

    let inspected: Value =
        serde_json::from_str(&ok(&tidewire(&["inspect", "--data-dir", d, "--json"]))).unwrap();
    assert_eq!(inspected["events"], 51);
    assert_eq!(
        (
            inspected["first_id"].as_u64(),
            inspected["last_id"].as_u64()
        ),
        (Some(1), Some(51))
    );
    assert_eq!(inspected["topics"], 4);
    assert_eq!(inspected["dedupe_entries"], 50);
    assert!(ok(&tidewire(&["inspect", "--data-dir", d])).contains("events retained     51"));
    assert!(ok(&tidewire(&["verify", "--data-dir", d])).contains("healthy"));

    let exported = ok(&tidewire(&["export", "--data-dir", d]));
    assert_eq!(exported.lines().count(), 51);
    let only_a = ok(&tidewire(&[
        "export",
        "--data-dir",
        d,
        "--topic",
        "plant/a/*",
        "--since",
        "10",
    ]));
    assert!(only_a.lines().all(|l| l.contains("\"plant/a/temp\"")));
    assert_eq!(
        only_a.lines().count(),
        13,
        "plant/a ids 13, 16, … 49 above 10"
    );

    let file = tmp.path().join("backup.ndjson");
    std::fs::write(&file, &exported).unwrap();
    let restored = tmp.path().join("restored");
    let r = restored.to_str().unwrap();
    ok(&tidewire(&[
        "import",
        "--data-dir",
        r,
        "--input",
        file.to_str().unwrap(),
    ]));
    assert_eq!(
        ok(&tidewire(&["export", "--data-dir", r])),
        exported,
        "round trip"
    );
    assert!(ok(&tidewire(&["verify", "--data-dir", r])).contains("healthy"));

    // The same in MessagePack: bytes stay `bin`, and the round trip is byte-identical too.
    let packed = tidewire(&["export", "--data-dir", d, "--format", "msgpack"]);
    assert!(packed.status.success());
    let mp_file = tmp.path().join("backup.msgpack");
    std::fs::write(&mp_file, &packed.stdout).unwrap();
    let mp_restored = tmp.path().join("restored-mp");
    let m = mp_restored.to_str().unwrap();
    ok(&tidewire(&[
        "import",
        "--data-dir",
        m,
        "--format",
        "msgpack",
        "--input",
        mp_file.to_str().unwrap(),
    ]));
    let again = tidewire(&["export", "--data-dir", m, "--format", "msgpack"]);
    assert_eq!(again.stdout, packed.stdout, "MessagePack round trip");
    assert!(ok(&tidewire(&["verify", "--data-dir", m])).contains("healthy"));

    // A second import into a log that holds events is refused; the log is untouched.
    let again = tidewire(&["import", "--data-dir", r, "--input", file.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds events"));
    // A garbage export is refused with its line number.
    let bad = tmp.path().join("bad.ndjson");
    std::fs::write(
        &bad,
        format!("{}\nnot json\n", exported.lines().next().unwrap()),
    )
    .unwrap();
    let fresh = tmp.path().join("fresh");
    let out = tidewire(&[
        "import",
        "--data-dir",
        fresh.to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{out:?}"
    );
    assert!(!out.status.success());

    // The restored log serves: ids continue, and a retried msg_id would be recognised if it
    // was still inside the dedupe window (it is: the events are seconds old).
    let server = BinServer::spawn(&restored, &[]).await;
    let client = reqwest::Client::new();
    let (status, receipt) = post(
        &client,
        &server.url("/v1/topics/audit/events"),
        "application/json",
        json!({"data": 1, "msg_id": "m2"}).to_string(),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(receipt["duplicate_of"], json!([3]));
    let (_, fresh_receipt) = post(
        &client,
        &server.url("/v1/topics/audit/events"),
        "application/json",
        json!({"data": 1}).to_string(),
    )
    .await;
    assert_eq!(fresh_receipt["first_id"], 52);

    // While the server runs, its directory is locked: the command names the server's
    // process and says what to do instead.
    let locked = tidewire(&["inspect", "--data-dir", r]);
    assert!(!locked.status.success());
    let said = String::from_utf8_lossy(&locked.stderr);
    assert!(said.contains("--server"), "{locked:?}");
    assert!(
        said.contains(&format!("held by process {}", server.child.id())),
        "{locked:?}"
    );
}

#[tokio::test]
async fn an_online_export_runs_beside_publishers_and_is_complete_up_to_its_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    let server = BinServer::spawn(&tmp.path().join("data"), &[]).await;
    let base = server.url("");
    let client = reqwest::Client::new();
    for n in 0..300 {
        common::publish_one(&client, &base, &format!("live/{}", n % 4), json!(n)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, base) = (stop.clone(), base.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 300;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                common::publish_one(&client, &base, &format!("live/{}", n % 4), json!(n)).await;
                n += 1;
            }
        })
    };
    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        move || tidewire(&["export", "--server", &base, "--topic", "live/**"])
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let text = ok(&out);
    let ids: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cursor: u64 = stderr
        .split("complete up to id ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no cursor in {stderr:?}"));
    // Every event up to the cursor is there (all events are on live/*), none past it.
    let expected: BTreeSet<u64> = (1..=cursor).collect();
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), expected);
    assert!(ids.len() >= 300);
}
