//! A real browser's native `WebSocket` against the real binary: headless Chromium runs a page
//! that subscribes to `sensors/**` with `tidewire.v1.json` from cursor 0 and reports every
//! frame to the test's own page server (shared with tests/browser.rs). Midway tidewire is
//! killed with `kill -9` and restarted on the same address and data dir; events are published
//! while the page is disconnected. The page's own code reconnects with `since=<last id seen>`
//! and must end up with exactly ids 1..=N, in order, once each.

mod common;

const WS_SOCKETS: &str = "tidewire_live_subscribers{transport=\"ws\"}";

use std::time::{Duration, Instant};

use common::browser::{page_server, report_ids as received_ids, snapshot, wait_for, Browser};
use common::{free_addr, metric, BinServer};
use serde_json::{json, Value};

/// How long the page waits before reconnecting after a close. Long enough that the events
/// published right after the restart are missed by the page (proved with the socket gauge),
/// so the resume by `since` is a real catch-up.
const RECONNECT_MS: u64 = 2500;

fn page(ws_base: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tidewire WebSocket test</title></head>
<body><p>tidewire WebSocket test</p><script>
"use strict";
// What an application does: remember the last id seen, resume from it after a disconnect.
const base = {ws_base};
const got = [], ops = [], closes = [];
let opens = 0, lastId = 0, protocol = "", last = "", busy = false;
function connect() {{
  const ws = new WebSocket(base + "&since=" + lastId, "tidewire.v1.json");
  ws.onopen = () => {{ opens++; protocol = ws.protocol; }};
  ws.onmessage = (m) => {{
    const v = JSON.parse(m.data);
    if (v.op) {{ ops.push(v); return; }}
    got.push(v);
    lastId = v.id;
  }};
  ws.onclose = (e) => {{ closes.push(e.code); setTimeout(connect, {reconnect_ms}); }};
}}
connect();
async function flush() {{
  if (busy) return;
  const report = JSON.stringify({{opens, closes, protocol, ops, events: got}});
  if (report === last) return;
  busy = true;
  try {{
    const r = await fetch("/report", {{method: "POST", body: report,
                                       headers: {{"content-type": "application/json"}}}});
    if (r.ok) last = report;
  }} catch (e) {{
  }} finally {{
    busy = false;
  }}
}}
setInterval(flush, 50);
</script></body></html>
"#,
        ws_base = serde_json::to_string(ws_base).expect("url as a JS string"),
        reconnect_ms = RECONNECT_MS,
    )
}

async fn publish(client: &reqwest::Client, base: &str, n: u64) {
    let (status, body) = common::post(
        client,
        &format!("{base}/v1/topics/sensors/room-{}/temperature/events", n % 4),
        "application/json",
        json!({ "data": { "n": n } }).to_string(),
    )
    .await;
    assert_eq!(status, 201, "publish {n} refused: {body}");
    assert_eq!(body["first_id"].as_u64(), Some(n), "event {n}: {body}");
}

async fn publish_range(client: &reqwest::Client, base: &str, ns: std::ops::RangeInclusive<u64>) {
    for n in ns {
        publish(client, base, n).await;
    }
}

/// Every envelope the page got: ids exactly `1..=n` in order, each with its topic and data;
/// no op frame (no gap, no error) on the way.
fn assert_exactly(report: &Value, n: u64) {
    let ids = received_ids(report);
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "the page's ids must be exactly 1..={n}, in order, once each; report: {report}"
    );
    for (env, want) in report["events"].as_array().expect("events").iter().zip(1..) {
        assert_eq!(
            env["data"],
            json!({ "n": want }),
            "envelope of {want}: {env}"
        );
        assert_eq!(
            env["topic"],
            format!("sensors/room-{}/temperature", want % 4),
            "envelope of {want}: {env}"
        );
    }
    assert_eq!(report["ops"], json!([]), "no op frames expected: {report}");
    assert_eq!(report["protocol"], "tidewire.v1.json", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_websocket_resumes_with_since_across_a_kill9() {
    Browser::require();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();

    let tw_addr = free_addr();
    let ws_base = format!("ws://{tw_addr}/v1/ws?topic=sensors/**");
    let (page_port, report) = page_server(page(&ws_base)).await;
    // The page is on another origin: browsers send it on the handshake, and only listed
    // origins (or the server's own) may open a WebSocket.
    let origin = format!("http://127.0.0.1:{page_port}");
    let extra = ["--allowed-origin", origin.as_str()];
    let mut server = BinServer::spawn_on(tw_addr, &data, &extra).await;
    let base = server.url("");

    // 1..3 before the browser exists: replayed from since=0.
    publish_range(&client, &base, 1..=3).await;
    let mut browser = Browser::launch(&format!("http://127.0.0.1:{page_port}/"));
    wait_for("events 1..=3", &report, &mut browser, |r| {
        received_ids(r).len() >= 3
    })
    .await;
    // 4..10 live.
    publish_range(&client, &base, 4..=10).await;
    let r = wait_for("events 1..=10", &report, &mut browser, |r| {
        received_ids(r).len() >= 10
    })
    .await;
    assert_exactly(&r, 10);
    assert_eq!(r["opens"], 1, "one connection so far: {r}");

    // A real network drop: the process dies, the kernel closes the browser's socket.
    server.kill9();
    let killed_at = Instant::now();
    let r = wait_for("the page to see the close", &report, &mut browser, |r| {
        r["closes"].as_array().is_some_and(|c| !c.is_empty())
    })
    .await;
    assert_eq!(r["closes"][0], 1006, "an abnormal close after kill -9: {r}");
    // Restart in place, then at once publish 11..13 while the page waits to reconnect.
    let mut server = BinServer::spawn_on(tw_addr, &data, &extra).await;
    publish_range(&client, &base, 11..=13).await;
    let sockets = metric(&base, WS_SOCKETS).await as u64;
    let elapsed = killed_at.elapsed();
    assert_eq!(
        sockets, 0,
        "the page had already reconnected {elapsed:?} after the kill, before the missed events \
         were published (reconnect delay {RECONNECT_MS} ms); the machine is too slow for this test"
    );

    // The page reconnects with since=10 and gets 11..13 once.
    let r = wait_for(
        "the resume and events 11..=13",
        &report,
        &mut browser,
        |r| received_ids(r).len() >= 13,
    )
    .await;
    assert_exactly(&r, 13);
    assert!(r["opens"].as_u64() >= Some(2), "reconnected: {r}");

    // Then live again: 14..20.
    publish_range(&client, &base, 14..=20).await;
    wait_for("events 1..=20", &report, &mut browser, |r| {
        received_ids(r).len() >= 20
    })
    .await;
    // Let any stray duplicate show up before judging (reports only ever grow).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = snapshot(&report);
    assert_exactly(&r, 20);
    assert_eq!(
        metric(&base, WS_SOCKETS).await as u64,
        1,
        "one socket open at the end: {r}"
    );

    drop(browser);
    let status = server.sigterm();
    assert!(
        status.success(),
        "tidewire exit status after SIGTERM: {status}"
    );
}
