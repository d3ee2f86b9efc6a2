//! Browsers on another origin, in headless Chromium: a page served by the test's own server
//! publishes with `fetch` (a preflighted POST), subscribes with `EventSource` using
//! `withCredentials`, and long-polls with `fetch`, against two tidewire servers: one that lists
//! the page's origin in `allowed_origins`, where all three work, and one that does not, where
//! the browser refuses all three and nothing is stored.
mod common;

use std::time::{Duration, Instant};

use common::browser::{page_server, snapshot, Browser};
use common::TestServer;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// The page; the two servers' bases arrive in the URL fragment (never sent to the page server).
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tidewire CORS test</title></head>
<body><script>
"use strict";
const result = {};
async function probe(name, base) {
  const r = {publish: null, sse: [], sseError: false, poll: null};
  result[name] = r;
  try {
    const resp = await fetch(base + "/v1/topics/cors/a/events", {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({data: {from: "browser"}, type: "note"})});
    r.publish = resp.status;
  } catch (e) { r.publish = "refused"; }
  await new Promise((done) => {
    const es = new EventSource(base + "/v1/sse?topic=cors/**&last_event_id=0", {withCredentials: true});
    es.addEventListener("note", (m) => { r.sse.push(Number(m.lastEventId)); es.close(); done(); });
    es.onerror = () => { r.sseError = true; es.close(); done(); };
    setTimeout(() => { es.close(); done(); }, 10000);
  });
  try {
    const resp = await fetch(base + "/v1/poll?topic=cors/**&since=0&timeout=1");
    const body = await resp.json();
    r.poll = body.events.map((e) => e.id);
  } catch (e) { r.poll = "refused"; }
}
(async () => {
  const bases = new URLSearchParams(location.hash.slice(1));
  await probe("allowed", bases.get("allowed"));
  await probe("refused", bases.get("refused"));
  result.done = true;
  for (let i = 0; i < 100; i++) {
    try {
      const resp = await fetch("/report", {method: "POST", body: JSON.stringify(result)});
      if (resp.ok) break;
    } catch (e) {}
    await new Promise((ok) => setTimeout(ok, 100));
  }
})();
</script></body></html>
"#;

#[tokio::test]
async fn a_page_on_another_origin_can_publish_stream_and_poll_only_where_its_origin_is_allowed() {
    Browser::require();
    let (tmp_a, tmp_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (port, report) = page_server(PAGE.to_string()).await;
    let origin = format!("http://127.0.0.1:{port}");
    let allowed =
        TestServer::start_with(tmp_a.path(), |c| c.allowed_origins = vec![origin.clone()]).await;
    let refused = TestServer::start(&tmp_b).await;
    let fragment = form_urlencoded::Serializer::new(String::new())
        .append_pair("allowed", &allowed.url(""))
        .append_pair("refused", &refused.url(""))
        .finish();
    let mut browser = Browser::launch(&format!("{origin}/#{fragment}"));
    let deadline = Instant::now() + WAIT;
    let result = loop {
        browser.assert_alive();
        let r = snapshot(&report);
        if r["done"] == Value::Bool(true) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the page never finished: {r}\n{}",
            browser.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ok = &result["allowed"];
    assert_eq!(ok["publish"], 201, "{result}");
    assert_eq!(ok["sse"], serde_json::json!([1]), "{result}");
    assert_eq!(ok["sseError"], false, "{result}");
    assert_eq!(ok["poll"], serde_json::json!([1]), "{result}");
    let no = &result["refused"];
    assert_eq!(no["publish"], "refused", "{result}");
    assert_eq!(no["sse"], serde_json::json!([]), "{result}");
    assert_eq!(no["sseError"], true, "{result}");
    assert_eq!(no["poll"], "refused", "{result}");
    // The refused preflight kept the POST from being sent at all: nothing stored.
    let topics: Value = reqwest::get(refused.url("/v1/topics"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(topics["topics"], serde_json::json!([]), "{topics}");
    drop(browser);
    allowed.stop().await;
    refused.stop().await;
}
