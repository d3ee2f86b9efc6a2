//! A real browser against the real binary: headless Chromium runs a page with the native
//! `EventSource`, subscribes cross-origin to `sensors/**` from cursor 0, and reports every
//! message it gets to a tiny HTTP server of the test's own. Midway tidewire is killed with
//! `kill -9` (a real network drop for the browser) and restarted on the same address and data
//! dir; events are published while the browser is still disconnected. The browser must
//! reconnect by itself with `Last-Event-ID` and end up with exactly ids 1..=N, in order, once.

mod common;

const SSE_SUBSCRIBERS: &str = "tidewire_live_subscribers{transport=\"sse\"}";

use std::time::{Duration, Instant};

use common::browser::{page_server, snapshot, Browser, Report};
use common::{free_addr, metric, BinServer};
use serde_json::{json, Value};

/// Bound on every wait of this test.
const WAIT: Duration = Duration::from_secs(60);

/// The `retry:` the server advertises. Long enough that the browser's first reconnect after
/// the kill comes well after the restarted server is ready and the "missed" events are
/// published (proved below with the live-subscriber gauge), so they are a real catch-up.
const RETRY_MS: u64 = 2500;

// ---------------------------------------------------------------------------------------------
// The page.

fn page(sse_url: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tidewire EventSource test</title></head>
<body><p>tidewire EventSource test</p><script>
"use strict";
const got = [];
let opens = 0, errors = 0, last = "", busy = false;
const es = new EventSource({sse_url});
function record(e) {{ got.push({{type: e.type, id: e.lastEventId, data: e.data}}); }}
es.onmessage = record;                  // untyped events
es.addEventListener("reading", record); // typed events (`event: reading`)
es.addEventListener("gap", record);     // must never happen here
es.onopen = () => {{ opens++; }};
es.onerror = () => {{ errors++; }};
async function flush() {{
  if (busy) return;
  const report = JSON.stringify({{opens, errors, readyState: es.readyState, events: got}});
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
        sse_url = serde_json::to_string(sse_url).expect("url as a JS string"),
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Event `n` is published with data `{"n": n}`; every third one is typed `reading`.
fn typed(n: u64) -> bool {
    n.is_multiple_of(3)
}

async fn publish(client: &reqwest::Client, base: &str, n: u64) {
    let mut env = json!({ "data": { "n": n } });
    if typed(n) {
        env["type"] = "reading".into();
    }
    let (status, body) = common::post(
        client,
        &format!("{base}/v1/topics/sensors/room-{}/temperature/events", n % 4),
        "application/json",
        env.to_string(),
    )
    .await;
    assert_eq!(status, 201, "publish {n} refused: {body}");
    assert_eq!(
        body["first_id"].as_u64(),
        Some(n),
        "event {n} got another id: {body}"
    );
}

async fn publish_range(client: &reqwest::Client, base: &str, ns: std::ops::RangeInclusive<u64>) {
    for n in ns {
        publish(client, base, n).await;
    }
}

fn received_ids(report: &Value) -> Vec<u64> {
    report["events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| e["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the page's report satisfies `done`; panics with the report and the browser's
/// log after [`WAIT`].
async fn wait_for(
    what: &str,
    report: &Report,
    browser: &mut Browser,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = snapshot(report);
        if done(&r) {
            return r;
        }
        browser.assert_alive();
        // readyState 2 (CLOSED): the browser gave up for good, which it does when a
        // (re)connect gets a non-200 answer such as a 503 while the server opens its log.
        assert!(
            r["readyState"] != 2,
            "the EventSource is CLOSED (it got a non-200 answer) while waiting for {what}; \
             the page's last report: {r}"
        );
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the page's last report: {r}\nchromium log:\n{}",
            browser.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event the page got, checked one by one: ids exactly `1..=n` in order, the `event:`
/// type, and the envelope carried in `data` (its id, topic and payload).
fn assert_exactly(report: &Value, n: u64) {
    let ids = received_ids(report);
    let expected: Vec<u64> = (1..=n).collect();
    assert_eq!(
        ids, expected,
        "the browser's ids must be exactly 1..={n}, in order, once each; report: {report}"
    );
    for (ev, want) in report["events"].as_array().expect("events").iter().zip(1..) {
        let want_type = if typed(want) { "reading" } else { "message" };
        assert_eq!(ev["type"], want_type, "event {want}: {ev}");
        let env: Value =
            serde_json::from_str(ev["data"].as_str().expect("data string")).expect("data JSON");
        assert_eq!(env["id"].as_u64(), Some(want), "envelope of {want}: {env}");
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
        if typed(want) {
            assert_eq!(env["type"], "reading", "envelope of {want}: {env}");
        } else {
            assert!(env.get("type").is_none(), "envelope of {want}: {env}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_eventsource_resumes_exactly_across_a_kill9() {
    Browser::require();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();

    // tidewire's address is chosen up front so the page can name it and the restart can
    // take it again; the page's origin is allowed to read cross-origin.
    let tw_addr = free_addr();
    let sse_url = format!("http://{tw_addr}/v1/sse?topic=sensors/**&last_event_id=0");
    let (page_port, report) = page_server(page(&sse_url)).await;
    let origin = format!("http://127.0.0.1:{page_port}");
    let retry = RETRY_MS.to_string();
    let env = [("TIDEWIRE_SSE_RETRY_MS", retry.as_str())];
    let extra = ["--allowed-origin", origin.as_str()];
    let mut server = BinServer::spawn_on_with_env(tw_addr, &data, &extra, &env).await;
    let base = server.url("");

    // 1..3 before the browser exists: replayed from cursor 0 (the query parameter).
    publish_range(&client, &base, 1..=3).await;
    let mut browser = Browser::launch(&format!("http://127.0.0.1:{page_port}/"));
    wait_for("the EventSource to open", &report, &mut browser, |r| {
        r["opens"].as_u64() >= Some(1)
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

    // A real network drop: the process dies, the kernel closes the browser's connection.
    server.kill9();
    let killed_at = Instant::now();
    // Nothing is published while it is down. Restart in place, then at once publish 11..13:
    // the browser is still waiting out its `retry:` delay, so these are events it missed.
    let mut server = BinServer::spawn_on_with_env(tw_addr, &data, &extra, &env).await;
    publish_range(&client, &base, 11..=13).await;
    let subscribers = metric(&base, SSE_SUBSCRIBERS).await as u64;
    let elapsed = killed_at.elapsed();
    eprintln!("kill -9, restart and 3 publishes took {elapsed:?} (browser retry {RETRY_MS} ms)");
    assert_eq!(
        subscribers, 0,
        "the browser had already reconnected {elapsed:?} after the kill, before the missed \
         events were published (retry is {RETRY_MS} ms); the machine is too slow for this test's timing"
    );

    // The browser reconnects by itself with Last-Event-ID: 10 and gets 11..13 once.
    let r = wait_for(
        "the reconnect and events 11..=13",
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
        r["readyState"], 1,
        "the EventSource is OPEN at the end: {r}"
    );

    drop(browser);
    let status = server.sigterm();
    assert!(
        status.success(),
        "tidewire exit status after SIGTERM: {status}"
    );
}
