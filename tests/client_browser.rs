//! The browser client served at `/v1/client.js`, in real headless Chromium, through the real
//! nginx configured three ways: (a) `deploy/nginx.conf` as shipped, (b) a proxy that refuses
//! WebSocket upgrades, (c) the same that also buffers event streams. The page imports the
//! module from the server (through nginx), subscribes with the default transport list and
//! reports every event; the client must settle on `websocket`, `sse` and `poll` respectively
//! and receive exactly the published ids, once each, in order, across a `kill -9` and restart
//! of tidewire and a restart of nginx. A second test lets a short-lived token expire several
//! times under each transport: the token function renews it and no event is lost. A third
//! turns `jwt_query_token` off: the WebSocket cannot carry the token, and the client settles
//! on `sse`.

mod common;

use std::time::{Duration, Instant};

use common::browser::{page_server_on, report_ids as ids, snapshot, wait_for, Browser};
use common::nginx::{Nginx, SITE};
use common::{free_addr, BinServer};
use serde_json::{json, Value};

/// (b): the WebSocket location forwards no `Upgrade` header, as a proxy that does not know
/// WebSocket does; tidewire answers 426 and the browser's handshake fails.
fn refusing_upgrades() -> String {
    let site = SITE.replace(
        "        proxy_set_header Upgrade $http_upgrade;\n        proxy_set_header Connection $tidewire_connection;\n",
        "        proxy_set_header Host $host;\n        proxy_set_header Connection \"\";\n",
    );
    assert_ne!(
        site, SITE,
        "the WebSocket location of deploy/nginx.conf changed"
    );
    site
}

/// (c): (b), and event streams held back. `proxy_buffering on` alone does not do it (nginx
/// still forwards each read as it arrives, and tidewire's `X-Accel-Buffering: no` turns it
/// off anyway), so the stream is also compressed by the proxy, as many corporate proxies do:
/// gzip holds everything until its buffers fill, and the small SSE frames never fill them.
fn refusing_upgrades_and_buffering_streams() -> String {
    let site = refusing_upgrades();
    let buffered = site.replace(
        "    location = /v1/sse {\n        proxy_pass http://tidewire;\n        proxy_buffering off;\n",
        "    location = /v1/sse {\n        proxy_pass http://tidewire;\n        proxy_buffering on;\n        \
         proxy_ignore_headers X-Accel-Buffering;\n        gzip on;\n        gzip_types text/event-stream;\n        \
         gzip_min_length 0;\n",
    );
    assert_ne!(
        buffered, site,
        "the SSE location of deploy/nginx.conf changed"
    );
    buffered
}

/// The page: imports the client from `base` (through nginx) and reports what it sees.
fn page(base: &str, options: &str, setup: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tidewire client test</title></head>
<body><p>tidewire client test</p><script type="module">
const base = {base};
const report = {{ events: [], transports: [], gaps: [], errors: [], subs: {{}} }};
window.addEventListener("error", (e) => report.errors.push(String(e.message)));
try {{
  const {{ Tidewire }} = await import(base + "/v1/client.js");
  const options = {options};
  {setup}
}} catch (e) {{
  report.errors.push("setup: " + e);
}}
let last = "", busy = false;
async function flush() {{
  if (busy) return;
  const body = JSON.stringify(report);
  if (body === last) return;
  busy = true;
  try {{
    const r = await fetch("/report", {{ method: "POST", body, headers: {{ "content-type": "application/json" }} }});
    if (r.ok) last = body;
  }} catch (e) {{
  }} finally {{
    busy = false;
  }}
}}
setInterval(flush, 50);
</script></body></html>
"#,
        base = serde_json::to_string(base).expect("JS string"),
    )
}

/// One subscription to `mx/**` from cursor 0 with the default transports.
const MATRIX_SETUP: &str = r#"
  const tw = new Tidewire(base, options);
  const sub = tw.subscribe(["mx/**"], {
    since: 0,
    onEvent(e) { report.events.push({ id: e.id, topic: e.topic, data: e.data }); },
    onGap(g) { report.gaps.push(g); },
    onTransport(name) { report.transports.push(name); },
    onError(e) { report.errors.push(String(e)); },
  });
  setInterval(() => { report.subs.main = { transport: sub.transport, cursor: sub.cursor, reconnects: sub.reconnects }; }, 25);
"#;

async fn publish(client: &reqwest::Client, base: &str, n: u64) {
    let (status, body) = common::post(
        client,
        &format!("{base}/v1/topics/mx/{}/events", n % 3),
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

/// Ids exactly `1..=n`, in order, once each, with their data; no gap, no error.
fn assert_exactly(report: &Value, n: u64) {
    assert_eq!(
        ids(report),
        (1..=n).collect::<Vec<_>>(),
        "ids must be exactly 1..={n}, in order, once each; report: {report}"
    );
    for (e, want) in report["events"].as_array().expect("events").iter().zip(1..) {
        assert_eq!(e["data"], json!({ "n": want }), "{e}");
        assert_eq!(e["topic"], format!("mx/{}", want % 3), "{e}");
    }
    assert_eq!(report["gaps"], json!([]), "{report}");
    assert_eq!(report["errors"], json!([]), "{report}");
}

/// Runs the matrix case: nginx configured with `site`, the client must end on `expected`
/// having tried exactly `path` (each once: no flapping).
async fn client_through_nginx(site: &str, path: &[&str]) {
    Browser::require();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let client = reqwest::Client::new();
    let tw_addr = free_addr();
    // The page's origin must be known to the server before the page exists: its port is
    // chosen first and the page (which needs nginx's port) is served on it afterwards.
    let page_port = free_addr().port();
    // The page is on another origin: the module import, fetch() and the WebSocket all need
    // it listed.
    let origin = format!("http://127.0.0.1:{page_port}");
    let extra = ["--allowed-origin", origin.as_str()];
    let mut server = BinServer::spawn_on(tw_addr, &data, &extra).await;
    let mut nginx = Nginx::start(tw_addr, site).await;
    let nginx_base = nginx.url("");
    let report = page_server_on(page_port, page(&nginx_base, "{}", MATRIX_SETUP)).await;
    let direct = server.url("");
    let expected = *path.last().expect("a path");

    // 1..=5 before the page exists: replayed from since=0, over whatever transport it picks.
    publish_range(&client, &direct, 1..=5).await;
    let mut browser = Browser::launch(&format!("http://127.0.0.1:{page_port}/"));
    let r = wait_for("events 1..=5", &report, &mut browser, |r| ids(r).len() >= 5).await;
    assert_exactly(&r, 5);
    assert_eq!(r["subs"]["main"]["transport"], expected, "{r}");
    // Live.
    publish_range(&client, &direct, 6..=10).await;
    wait_for("events 6..=10", &report, &mut browser, |r| {
        ids(r).len() >= 10
    })
    .await;

    // tidewire dies without a word and comes back on the same address and data; events are
    // published the moment it is back, before the client can have reconnected.
    server.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server = BinServer::spawn_on(tw_addr, &data, &extra).await;
    publish_range(&client, &direct, 11..=15).await;
    wait_for(
        "events 11..=15 after the kill -9",
        &report,
        &mut browser,
        |r| ids(r).len() >= 15,
    )
    .await;

    // nginx restarts: every connection through it drops; events published meanwhile.
    publish(&client, &direct, 16).await;
    nginx.restart().await;
    publish_range(&client, &direct, 17..=20).await;
    wait_for(
        "events 16..=20 after the nginx restart",
        &report,
        &mut browser,
        |r| ids(r).len() >= 20,
    )
    .await;
    // Let a stray duplicate show itself before judging (reports only ever grow).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = snapshot(&report);
    assert_exactly(&r, 20);
    assert_eq!(r["subs"]["main"]["transport"], expected, "{r}");
    assert_eq!(
        r["transports"],
        json!(path),
        "each transport tried once, in order, ending on {expected}: {r}"
    );
    assert!(
        r["subs"]["main"]["reconnects"].as_u64() >= Some(2),
        "reconnected after the kill and the nginx restart: {r}"
    );
    drop(browser);
    drop(nginx);
    let status = server.sigterm();
    assert!(status.success(), "tidewire exit status: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_plain_proxy_the_client_stays_on_websocket_and_gets_every_id_once_across_kill9_and_proxy_restart(
) {
    client_through_nginx(SITE, &["websocket"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_proxy_refusing_upgrades_the_client_falls_back_to_sse_and_gets_every_id_once_across_kill9_and_proxy_restart(
) {
    client_through_nginx(&refusing_upgrades(), &["websocket", "sse"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_proxy_refusing_upgrades_and_buffering_streams_the_client_falls_back_to_poll_and_gets_every_id_once_across_kill9_and_proxy_restart(
) {
    client_through_nginx(
        &refusing_upgrades_and_buffering_streams(),
        &["websocket", "sse", "poll"],
    )
    .await;
}

const SECRET: &str = "client-browser-test-secret-0123456789-abcdef";

/// Four subscriptions, each on its own client (so each has its own token function): one per
/// transport, and the WebSocket again with `encoding: 'msgpack'`. Tokens are minted in the
/// page with WebCrypto (HS256) and live three seconds.
const TOKEN_SETUP: &str = r#"
  const enc = new TextEncoder();
  const key = await crypto.subtle.importKey("raw", enc.encode(options.secret),
    { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const b64u = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const part = (v) => b64u(enc.encode(JSON.stringify(v)));
  async function mint() {
    const exp = Math.floor(Date.now() / 1000) + 3;
    const body = part({ alg: "HS256", typ: "JWT" }) + "." +
      part({ sub: "page", exp, tidewire: { publish: [], subscribe: ["tk/**"] } });
    const sig = await crypto.subtle.sign("HMAC", key, enc.encode(body));
    return body + "." + b64u(sig);
  }
  const cases = {
    websocket: { transports: ["websocket"] },
    sse: { transports: ["sse"] },
    poll: { transports: ["poll"] },
    msgpack: { transports: ["websocket"], encoding: "msgpack" },
  };
  for (const [name, opts] of Object.entries(cases)) {
    const r = report.subs[name] = { events: [], calls: 0, transports: [], gaps: [], errors: [] };
    const tw = new Tidewire(base, { ...opts, token: async () => { r.calls++; return mint(); } });
    const sub = tw.subscribe("tk/**", {
      since: 0,
      onEvent(e) { r.events.push(e.id); },
      onGap(g) { r.gaps.push(g); },
      onTransport(t) { r.transports.push(t); },
      onError(e) { r.errors.push(String(e)); },
    });
    setInterval(() => { r.transport = sub.transport; r.cursor = sub.cursor; }, 25);
  }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_is_renewed_through_the_token_function_on_every_transport_without_losing_an_event(
) {
    use tidewire::auth::mint::{mint, parse_hs_alg, TokenSpec};
    Browser::require();
    let tmp = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let page_port = free_addr().port();
    let origin = format!("http://127.0.0.1:{page_port}");
    // No leeway: a stream ends the moment its token expires.
    let server = BinServer::spawn_with_env(
        &tmp.path().join("data"),
        &["--allowed-origin", origin.as_str()],
        &[
            ("TIDEWIRE_JWT_SECRET", SECRET),
            ("TIDEWIRE_JWT_LEEWAY_SECS", "0"),
        ],
    )
    .await;
    let base = server.url("");
    let options = json!({ "secret": SECRET }).to_string();
    let report = page_server_on(page_port, page(&base, &options, TOKEN_SETUP)).await;
    let publisher = mint(
        SECRET.as_bytes(),
        &TokenSpec {
            admin: false,
            publish: vec!["tk/**".into()],
            subscribe: vec![],
            ttl: Duration::from_secs(600),
            sub: Some("test-publisher".into()),
            aud: None,
            iss: None,
            alg: parse_hs_alg("HS256").expect("HS256"),
        },
    )
    .expect("mint");
    let mut browser = Browser::launch(&format!("http://127.0.0.1:{page_port}/"));
    // Ten seconds of events, four per second: every token lives three seconds, so each
    // client renews it at least twice while events flow.
    let mut published = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let r = client
            .post(format!("{base}/v1/topics/tk/a/events"))
            .bearer_auth(&publisher)
            .json(&json!({ "data": published.len() }))
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.expect("receipt");
        published.push(body["first_id"].as_u64().expect("first_id"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let n = published.len();
    let r = wait_for("every event on every client", &report, &mut browser, |r| {
        ["websocket", "sse", "poll", "msgpack"].iter().all(|k| {
            r["subs"][k]["events"]
                .as_array()
                .is_some_and(|e| e.len() >= n)
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = snapshot(&report).get("subs").cloned().unwrap_or(r);
    for (name, transport) in [
        ("websocket", "websocket"),
        ("sse", "sse"),
        ("poll", "poll"),
        ("msgpack", "websocket"),
    ] {
        let s = &r[name];
        assert_eq!(
            s["events"],
            json!(published),
            "{name}: every id once, in order: {s}"
        );
        assert_eq!(s["transports"], json!([transport]), "{name}: {s}");
        assert_eq!(s["gaps"], json!([]), "{name}: {s}");
        assert_eq!(s["errors"], json!([]), "{name}: {s}");
        assert!(
            s["calls"].as_u64() >= Some(3),
            "{name}: the token function was called again before or at each expiry: {s}"
        );
    }
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_query_tokens_turned_off_the_websocket_cannot_carry_the_token_and_the_client_settles_on_sse(
) {
    Browser::require();
    let tmp = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let page_port = free_addr().port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let server = BinServer::spawn_with_env(
        &tmp.path().join("data"),
        &["--allowed-origin", origin.as_str()],
        &[
            ("TIDEWIRE_JWT_SECRET", SECRET),
            ("TIDEWIRE_JWT_QUERY_TOKEN", "false"),
        ],
    )
    .await;
    let base = server.url("");
    let token = |publish: &str, subscribe: &str| {
        use tidewire::auth::mint::{mint, parse_hs_alg, TokenSpec};
        mint(
            SECRET.as_bytes(),
            &TokenSpec {
                admin: false,
                publish: vec![publish.into()],
                subscribe: vec![subscribe.into()],
                ttl: Duration::from_secs(600),
                sub: Some("query-off".into()),
                aud: None,
                iss: None,
                alg: parse_hs_alg("HS256").expect("HS256"),
            },
        )
        .expect("mint")
    };
    let reader = token("none/x", "mx/**");
    let writer = token("mx/**", "none/x");
    let options = json!({ "token": reader }).to_string();
    let report = page_server_on(page_port, page(&base, &options, MATRIX_SETUP)).await;
    let mut want = Vec::new();
    for n in 0..3 {
        let r = client
            .post(format!("{base}/v1/topics/mx/{n}/events"))
            .bearer_auth(&writer)
            .json(&json!({ "data": { "n": n } }))
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 201);
        want.push(r.json::<Value>().await.expect("receipt")["first_id"].clone());
    }
    let mut browser = Browser::launch(&format!("http://127.0.0.1:{page_port}/"));
    let r = wait_for("3 events", &report, &mut browser, |r| ids(r).len() >= 3).await;
    let got: Vec<Value> = ids(&r).into_iter().map(Value::from).collect();
    assert_eq!(got, want, "{r}");
    assert_eq!(r["transports"], json!(["websocket", "sse"]), "{r}");
    assert_eq!(r["subs"]["main"]["transport"], "sse", "{r}");
    assert_eq!(r["errors"], json!([]), "{r}");
    drop(browser);
}
