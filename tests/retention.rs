//! Retention from outside: the real binary with a retention rule in its config file trims a
//! busy topic in the background, leaves a calm one alone, reports it in the topic statistics,
//! and every transport tells a client resuming from behind the cut about the gap.

mod common;

use std::time::{Duration, Instant};

use common::{next_event, publish_one, read_ids, sse, BinServer, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_busy_topic_is_trimmed_in_the_background_and_every_transport_signals_the_gap() {
    if common::sled_only("per-pattern retention rules are refused with log = nats (by design)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tidewire.toml");
    std::fs::write(
        &config,
        r#"
retention_check_secs = 1

[[retention_rules]]
pattern = "busy/**"
max_events = 5
"#,
    )
    .unwrap();
    let server = BinServer::spawn(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let mut busy = Vec::new();
    let mut calm = Vec::new();
    for n in 0..30 {
        busy.push(publish_one(&client, &base, "busy/x", json!(n)).await);
        if n % 6 == 0 {
            calm.push(publish_one(&client, &base, "calm/y", json!(n)).await);
        }
    }
    let stats = |topic: &'static str| {
        let client = client.clone();
        let url = format!("{base}/v1/topics/{topic}");
        async move { common::get_json(&client, &url).await }
    };
    let deadline = Instant::now() + PATIENCE;
    while stats("busy/x").await["count"] != 5 {
        assert!(
            Instant::now() < deadline,
            "the background pass never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = &busy[25..];
    let removed = busy[24];
    let b = stats("busy/x").await;
    assert_eq!(
        (b["first_id"].as_u64(), b["last_id"].as_u64()),
        (Some(kept[0]), Some(kept[4]))
    );
    assert_eq!(stats("calm/y").await["count"], calm.len() as u64);
    let cursor = busy[2];
    let gap = json!({"requested": cursor, "oldest": removed + 1});

    // SSE: `event: gap` first, with `id: oldest - 1`, then the retained events.
    let mut stream = sse(&format!("{base}/v1/sse?topic=busy/x"), Some(cursor)).await;
    let first = next_event(&mut stream).await;
    assert_eq!(first.event, "gap");
    assert_eq!(first.id, removed.to_string());
    assert_eq!(serde_json::from_str::<Value>(&first.data).unwrap(), gap);
    assert_eq!(read_ids(&mut stream, 5).await, kept);

    // Long-poll: `"gap"` in the body beside the retained events.
    let body = common::get_json(
        &client,
        &format!("{base}/v1/poll?topic=busy/x&since={cursor}&timeout=0"),
    )
    .await;
    assert_eq!(body["gap"], gap);
    let ids: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, kept);

    // WebSocket: a gap frame first.
    let (mut ws, _) = timeout(
        PATIENCE,
        connect_async(format!(
            "ws://{}/v1/ws?topic=busy/x&since={cursor}",
            server.addr
        )),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let mut frames = Vec::new();
    while frames.len() < 6 {
        let msg = timeout(PATIENCE, ws.next())
            .await
            .expect("frame timed out")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(t) = msg {
            frames.push(serde_json::from_str::<Value>(&t).unwrap());
        }
    }
    let mut expected_gap = gap.clone();
    expected_gap["op"] = json!("gap");
    assert_eq!(frames[0], expected_gap);
    let ws_ids: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ws_ids, kept);

    // The calm topic, and cursor 0 on both, lose nothing retained.
    let mut both = sse(&format!("{base}/v1/sse?topic=busy/x&topic=calm/y"), Some(0)).await;
    let mut all: Vec<u64> = kept.iter().chain(calm.iter()).copied().collect();
    all.sort_unstable();
    assert_eq!(read_ids(&mut both, all.len()).await, all);
}
