//! The web console at `/console`, its client files and the stats endpoint behind its charts.
//!
//! - `/v1/client.js`, `/v1/client.d.ts` and `/console` are served from the binary with their
//!   content types; the client follows `allowed_origins` for cross-origin imports; the
//!   console is gone with `console = false`.
//! - `GET /v1/stats` counts what it should and never widens who may read what.
//! - In headless Chromium, with authorization on, an operator pastes a token into the console
//!   (kept in the tab's sessionStorage only), sees the topics, tails a pattern while events are
//!   published, and publishes from the form (the event is then read back over the HTTP API).
//!   A screenshot is saved in the test's temp dir (and, with `TIDEWIRE_CONSOLE_SCREENSHOT=PATH`,
//!   copied there: that is how `deploy/screenshots/console.png` is made).

mod common;

use common::browser::{Browser, DevTools};
use common::*;
use serde_json::{json, Value};
use tidewire::config::Secret;

const SECRET: &str = "console-test-secret-0123456789-abcdefghij";

fn token(publish: &[&str], subscribe: &[&str]) -> String {
    use tidewire::auth::mint::{mint, parse_hs_alg, TokenSpec};
    mint(
        SECRET.as_bytes(),
        &TokenSpec {
            admin: false,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            ttl: std::time::Duration::from_secs(600),
            sub: Some("console-test".into()),
            aud: None,
            iss: None,
            alg: parse_hs_alg("HS256").expect("HS256"),
        },
    )
    .expect("mint")
}

#[tokio::test]
async fn the_client_its_types_and_the_console_are_served_from_the_binary_and_console_false_removes_the_console(
) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.allowed_origins = vec!["http://app.example".into()];
    })
    .await;
    let client = reqwest::Client::new();
    for (path, ct, needle) in [
        ("/v1/client.js", "text/javascript", "export class Tidewire"),
        (
            "/v1/client.d.ts",
            "application/typescript",
            "export class Tidewire",
        ),
        (
            "/console",
            "text/html",
            "import { Tidewire } from '/v1/client.js'",
        ),
    ] {
        let r = client
            .get(server.url(path))
            .header("origin", "http://app.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ct),
            "{path}: {h:?}"
        );
        if path != "/console" {
            // A module import from a listed origin is a CORS fetch: it must be allowed.
            assert_eq!(
                h["access-control-allow-origin"], "http://app.example",
                "{path}"
            );
        } else {
            let csp = h["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        }
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    // An origin that is not listed gets no CORS grant, so its pages cannot import the client.
    let r = client
        .get(server.url("/v1/client.js"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    server.stop().await;

    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| c.console = false).await;
    let r = client.get(server.url("/console")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = client
        .get(server.url("/v1/client.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the client stays: only the console is turned off"
    );
    server.stop().await;
}

#[tokio::test]
async fn stats_count_events_and_subscribers_and_never_widen_who_may_read_what() {
    let client = reqwest::Client::new();
    // Open server: open, and the counters move.
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let base = server.url("");
    for i in 0..3 {
        publish_one(&client, &base, "st/a", json!(i)).await;
    }
    let _stream = sse(&server.url("/v1/sse?topic=st/**&last_event_id=0"), None).await;
    let mut s = Value::Null;
    for _ in 0..100 {
        s = get_json(&client, &server.url("/v1/stats")).await;
        if s["transports"]["sse"]["delivered"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(s["head"], 3, "{s}");
    assert_eq!(s["events_stored"], 3, "{s}");
    assert_eq!(s["publishes"], 3, "{s}");
    assert_eq!(
        s["transports"]["sse"],
        json!({"delivered": 3, "subscribers": 1}),
        "{s}"
    );
    assert_eq!(s["transports"]["ws"]["subscribers"], 0, "{s}");
    server.stop().await;

    // Authorization on: a token must be able to read every topic.
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(Secret::new(SECRET));
    })
    .await;
    let stats = server.url("/v1/stats");
    let status = |r: reqwest::RequestBuilder| async move { r.send().await.unwrap().status() };
    assert_eq!(status(client.get(&stats)).await, 401);
    let narrow = token(&[], &["st/**"]);
    assert_eq!(status(client.get(&stats).bearer_auth(&narrow)).await, 403);
    let publisher = token(&["**"], &[]);
    assert_eq!(
        status(client.get(&stats).bearer_auth(&publisher)).await,
        403
    );
    let everything = token(&[], &["**"]);
    assert_eq!(
        status(client.get(&stats).bearer_auth(&everything)).await,
        200
    );
    server.stop().await;

    // A metrics token closes /metrics: it closes the stats too, and opens them like /metrics.
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.metrics_token = Some(Secret::new("scraper-secret"));
    })
    .await;
    let stats = server.url("/v1/stats");
    assert_eq!(status(client.get(&stats)).await, 401);
    assert_eq!(status(client.get(&stats).bearer_auth("wrong")).await, 401);
    assert_eq!(
        status(client.get(&stats).bearer_auth("scraper-secret")).await,
        200
    );
    server.stop().await;
}

/// `document.getElementById(id)` in page expressions.
fn el(id: &str) -> String {
    format!("document.getElementById({})", json!(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_a_token_sees_topics_tails_a_pattern_and_publishes_from_the_console() {
    Browser::require();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(Secret::new(SECRET));
    })
    .await;
    let base = server.url("");
    let client = reqwest::Client::new();
    let device = token(&["**"], &[]);
    let operator = token(&["cs/**"], &["**"]);
    let publish = |topic: &'static str, data: Value| {
        let (client, base, device) = (client.clone(), base.clone(), device.clone());
        async move {
            let r = client
                .post(format!("{base}/v1/topics/{topic}/events"))
                .bearer_auth(&device)
                .json(&json!({ "data": data, "type": "reading" }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["first_id"]
                .as_u64()
                .unwrap()
        }
    };
    for i in 0..3 {
        publish("cs/room-1/temp", json!({ "t": 20 + i })).await;
    }
    publish("cs/room-2/temp", json!({ "t": 18 })).await;

    let mut browser = Browser::launch_with(
        &server.url("/console"),
        &["--remote-debugging-port=0", "--window-size=1280,860"],
    );
    let mut page = DevTools::attach(&mut browser).await;
    page.wait_for(
        "the console",
        "location.pathname === '/console' && document.readyState === 'complete'",
    )
    .await;
    // Without a token the console says what it needs.
    page.wait_for(
        "the token prompt",
        &format!(
            "{}.textContent.includes('needs a token')",
            el("topics-note")
        ),
    )
    .await;
    // The operator pastes a token.
    page.eval(&format!(
        "{}.value = {}; {}.requestSubmit(); true",
        el("token"),
        json!(operator),
        el("token-form")
    ))
    .await;
    let rows = page
        .wait_for(
            "both topics with their counts",
            "(() => { const r = [...document.querySelectorAll('#topics tbody tr')]\
               .map(tr => [...tr.cells].map(c => c.textContent)); \
               return r.length === 2 ? r : null; })()",
        )
        .await;
    assert_eq!(rows[0][0], "cs/room-1/temp", "{rows}");
    assert_eq!(rows[0][1], "3", "{rows}");
    assert_eq!(rows[0][2], "3", "newest id: {rows}");
    assert_eq!(rows[1][0], "cs/room-2/temp", "{rows}");
    assert_eq!(rows[1][2], "4", "{rows}");
    // Kept for the tab only.
    assert_eq!(
        page.eval("sessionStorage.getItem('tidewire.console.token')")
            .await,
        json!(operator)
    );
    assert_eq!(page.eval("localStorage.length").await, 0);

    // Tail a pattern while events are published.
    page.eval(&format!(
        "{}.value = 'cs/room-1/**'; {}.requestSubmit(); true",
        el("tail-pattern"),
        el("tail-form")
    ))
    .await;
    page.wait_for(
        "the tail's transport",
        &format!("{}.textContent === 'websocket'", el("tail-transport")),
    )
    .await;
    // A live-only tail starts at the head: wait until it has one before publishing.
    page.wait_for(
        "the tail's cursor",
        &format!("{}.textContent === '4'", el("tail-cursor")),
    )
    .await;
    let mut tailed = Vec::new();
    for i in 0..5 {
        tailed.push(publish("cs/room-1/temp", json!({ "t": 30 + i })).await);
        publish("cs/room-2/temp", json!({ "t": 0 })).await; // not tailed
    }
    page.wait_for(
        "five tailed events",
        &format!("{}.textContent === '5'", el("tail-count")),
    )
    .await;
    let log = page
        .eval(&format!(
            "[...{}.children].map(d => d.textContent).join('\\n')",
            el("tail-log")
        ))
        .await
        .as_str()
        .unwrap()
        .to_string();
    for id in &tailed {
        assert!(
            log.contains(&format!("{id}  cs/room-1/temp  [reading]")),
            "{id} missing from the tail:\n{log}"
        );
    }
    assert!(!log.contains("cs/room-2"), "{log}");

    // Publish from the form.
    page.eval(&format!(
        "{}.value = 'cs/room-1/manual'; {}.value = 'test'; {}.value = '{{\"from\": \"console\"}}'; \
         {}.requestSubmit(); true",
        el("pub-topic"),
        el("pub-type"),
        el("pub-data"),
        el("pub-form")
    ))
    .await;
    let id = page
        .wait_for(
            "the publish result",
            &format!("Number({}.dataset.id || 0)", el("pub-result")),
        )
        .await
        .as_u64()
        .unwrap();
    // Stored: read back over the HTTP API with a token of its own.
    let reader = token(&[], &["cs/**"]);
    let body: Value = client
        .get(format!(
            "{base}/v1/poll?topic=cs/room-1/manual&since=0&timeout=0"
        ))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["events"].as_array().map(|e| e.len()),
        Some(1),
        "{body}"
    );
    let ev = &body["events"][0];
    assert_eq!(ev["id"], id, "{body}");
    assert_eq!(ev["type"], "test", "{body}");
    assert_eq!(ev["data"], json!({"from": "console"}), "{body}");
    // The tail shows it too.
    page.wait_for(
        "the form's event in the tail",
        &format!("{}.textContent === '6'", el("tail-count")),
    )
    .await;
    // The charts have samples to draw.
    page.wait_for(
        "the charts",
        &format!(
            "{}.textContent.includes('in') && {}.textContent.includes('now: 1 ws,')",
            el("rates-now"),
            el("subs-now")
        ),
    )
    .await;

    // A few seconds of steady traffic, so the chart has a line to draw in the screenshot.
    for i in 0..20 {
        publish("cs/room-2/temp", json!({ "t": i })).await;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let shot = tmp.path().join("console.png");
    page.screenshot(&shot).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(to) = std::env::var("TIDEWIRE_CONSOLE_SCREENSHOT") {
        std::fs::copy(&shot, &to).expect("copy the screenshot");
    }
    drop(page);
    drop(browser);
    server.stop().await;
}
