//! Webhooks from outside: the real binary (`tidewire serve`, killed with `-9` where that is the
//! point) on a loopback port with its log in a temp dir, calling a real receiver,
//! tests/interop/webhook_receiver.py, which verifies every call with PyPI's `standardwebhooks`
//! (independent of the server's signer) and answers as each test tells it to: 2xx, 500 at
//! random, too slowly, 429 with `Retry-After`, 410, a redirect, or not at all (stopped).
//!
//! What a delivery history must look like, checked by [`assert_whole_batches_in_order`]: every
//! call verified; a `webhook-id` always carries the identical body; the ids' calls are
//! contiguous (a batch is retried until it succeeds, then never seen again); the distinct
//! batches, in arrival order, are exactly the matching events in id order.
//!
//! Retry bounds are shortened through the config file (`webhook_retry_min_ms`,
//! `webhook_retry_max_ms`); every wait is bounded.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::auth::now;
use common::webhook::{all_ok, metric_with, secret, wait_for, Receiver};
use common::{publish_one, BinServer, PATIENCE};
use serde_json::{json, Value};

/// Short backoff for every server here: failures are retried within 50..400 ms.
const FAST_RETRY: &str = "webhook_retry_min_ms = 50\nwebhook_retry_max_ms = 400\n";

/// Long enough for a chaotic delivery to settle; only a bound, never a measurement.
const SETTLE: Duration = Duration::from_secs(120);

// ---- The server --------------------------------------------------------------------------------

/// The binary on `tmp/data` with `config` as its config file (`tmp/tidewire.toml`).
async fn serve(tmp: &tempfile::TempDir, config: &str) -> BinServer {
    let path = config_path(tmp);
    std::fs::write(&path, config).expect("write the config file");
    BinServer::spawn(&tmp.path().join("data"), &["--config", path_str(&path)]).await
}

/// The same server again on the address it had (its data dir and config kept).
async fn restart(tmp: &tempfile::TempDir, addr: std::net::SocketAddr) -> BinServer {
    let path = config_path(tmp);
    BinServer::spawn_on(
        addr,
        &tmp.path().join("data"),
        &["--config", path_str(&path)],
    )
    .await
}

fn config_path(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("tidewire.toml")
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---- The webhook API ---------------------------------------------------------------------------

/// Sends `method url` with an optional JSON body (a string is sent verbatim) and bearer token:
/// the status and the JSON body (`null` when empty, a string when not JSON).
async fn call(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method.clone(), url)
        .timeout(PATIENCE);
    if let Some(b) = body {
        let text = match b {
            Value::String(s) => s,
            other => other.to_string(),
        };
        r = r.header("content-type", "application/json").body(text);
    }
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

async fn put_hook(base: &str, name: &str, body: Value) -> (u16, Value) {
    call(
        reqwest::Method::PUT,
        &format!("{base}/v1/webhooks/{name}"),
        Some(body),
        None,
    )
    .await
}

async fn get_hook(base: &str, name: &str) -> (u16, Value) {
    call(
        reqwest::Method::GET,
        &format!("{base}/v1/webhooks/{name}"),
        None,
        None,
    )
    .await
}

/// The view of a webhook that must exist.
async fn view(base: &str, name: &str) -> Value {
    let (status, body) = get_hook(base, name).await;
    assert_eq!(status, 200, "GET webhook {name}: {body}");
    body
}

async fn list_hooks(base: &str) -> Vec<Value> {
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/webhooks"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "GET /v1/webhooks: {body}");
    body["webhooks"].as_array().expect("webhooks").clone()
}

async fn delete_hook(base: &str, name: &str) -> (u16, Value) {
    call(
        reqwest::Method::DELETE,
        &format!("{base}/v1/webhooks/{name}"),
        None,
        None,
    )
    .await
}

/// `body.error.code`, or "" when there is none.
fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Asserts that `answer` is the contract's error `status` with `code`; `what` names the call.
fn assert_refused(answer: &(u16, Value), status: u16, code_wanted: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!((*got, code(body)), (status, code_wanted), "{what}: {body}");
}

/// PUTs a new webhook `name` to `url` (topics `s/**`, secret `key`) and asserts the answer is
/// 403 `destination_not_allowed`; returns it.
async fn put_hook_refused_for_its_destination(
    base: &str,
    name: &str,
    url: &str,
    key: &str,
) -> (u16, Value) {
    let answer = put_hook(base, name, hook(url, &["s/**"], key, json!({}))).await;
    assert_refused(
        &answer,
        403,
        "destination_not_allowed",
        &format!("PUT {url}"),
    );
    answer
}

/// A create body for `url` over `topics` signed with `key`, plus `extra` members.
fn hook(url: &str, topics: &[&str], key: &str, extra: Value) -> Value {
    let mut body = json!({"url": url, "topics": topics, "secret": key});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    body
}

/// Waits until the webhook's view satisfies `ok`; returns that view.
async fn wait_view(
    base: &str,
    name: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = view(base, name).await;
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the webhook's view: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the receiver has answered a call on `path` carrying event `id`; returns the
/// calls on `path`.
async fn wait_delivered(rx: &Receiver, path: &str, id: u64, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let calls = rx.calls_to(path).await;
        let got = calls.iter().any(|c| {
            (200..300).contains(&c["answered"].as_u64().unwrap_or(0)) && ids_of(c).contains(&id)
        });
        if got {
            return calls;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} never reached {path} with a 2xx answer; calls: {}",
            summary(&calls)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The calls on `path` in a receiver snapshot.
fn rx_calls_on(snapshot: &Value, path: &str) -> Vec<Value> {
    snapshot["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .filter(|c| c["path"] == path)
        .cloned()
        .collect()
}

fn ids_of(call: &Value) -> Vec<u64> {
    call["event_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// One line per call (seq, webhook-id, event ids, answer), for failure messages.
fn summary(calls: &[Value]) -> String {
    calls
        .iter()
        .map(|c| {
            format!(
                "\n  #{} {} {} ids={:?} gap={} answered={} verified={}",
                c["seq"],
                c["method"].as_str().unwrap_or("?"),
                c["webhook_id"].as_str().unwrap_or("-"),
                ids_of(c),
                c["gap"],
                c["answered"],
                c["verified"]
            )
        })
        .collect()
}

/// The delivery history rules (module docs): every call verified and a POST with JSON; one
/// `webhook-id`, one identical body; each id's calls contiguous; the distinct batches in
/// arrival order are exactly `expected`. Returns the distinct batches (webhook-id, ids, gap).
fn assert_whole_batches_in_order(
    calls: &[Value],
    expected: &[u64],
) -> Vec<(String, Vec<u64>, Value)> {
    let all = summary(calls);
    let mut batches: Vec<(String, Vec<u64>, Value)> = Vec::new();
    let mut bodies: HashMap<String, (String, Vec<u64>)> = HashMap::new();
    for c in calls {
        assert_eq!(c["method"], "POST", "only POSTs expected: {all}");
        assert_eq!(
            c["verified"], true,
            "call #{} failed standardwebhooks' verification ({}): {all}",
            c["seq"], c["verify_error"]
        );
        assert_eq!(c["content_type"], "application/json", "{all}");
        let id = c["webhook_id"].as_str().expect("webhook-id").to_string();
        let sha = c["body_sha256"].as_str().expect("sha").to_string();
        let ids = ids_of(c);
        match bodies.get(&id) {
            Some((s, i)) => {
                assert_eq!(
                    (s, i),
                    (&sha, &ids),
                    "webhook-id {id} was sent with two different bodies: {all}"
                );
                assert_eq!(
                    batches.last().map(|b| b.0.as_str()),
                    Some(id.as_str()),
                    "webhook-id {id} came back after a later batch: {all}"
                );
            }
            None => {
                bodies.insert(id.clone(), (sha, ids.clone()));
                batches.push((id, ids, c["gap"].clone()));
            }
        }
    }
    let delivered: Vec<u64> = batches.iter().flat_map(|b| b.1.clone()).collect();
    assert_eq!(
        delivered, expected,
        "the distinct batches are not exactly the matching events in id order: {all}"
    );
    batches
}

/// Publishes `data` to each of `topics` in turn: the ids.
async fn publish_each(base: &str, topics: &[&str]) -> Vec<u64> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for (n, t) in topics.iter().enumerate() {
        ids.push(publish_one(&client, base, t, json!({"n": n})).await);
    }
    ids
}

// ---- The chaos delivery ------------------------------------------------------------------------

/// Topics of the chaos run: the first two match `sensors/**`, the others do not.
const IN: [&str; 2] = ["sensors/a", "sensors/b/c"];
const OUT: [&str; 3] = ["other/x", "sensor/a", "x/sensors/a"];

/// Waits until the receiver has recorded `n` calls.
async fn wait_calls(rx: &Receiver, n: usize) {
    wait_for(SETTLE, &format!("{n} calls"), || async {
        (rx.calls().await.len() >= n).then_some(())
    })
    .await;
}

/// Publishes events `range` one by one, two of three to matching topics, ~20 ms apart.
async fn publish_mixed(
    base: &str,
    range: std::ops::Range<usize>,
    matching: &mut Vec<u64>,
    other: &mut Vec<u64>,
) {
    let client = reqwest::Client::new();
    for n in range {
        if n % 3 == 2 {
            other.push(publish_one(&client, base, OUT[n % OUT.len()], json!({"n": n})).await);
        } else {
            matching.push(publish_one(&client, base, IN[n % IN.len()], json!({"n": n})).await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn under_random_failures_outages_and_kill_9_every_matching_event_arrives_in_order_in_whole_signed_batches(
) {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(1);
    let mut rx = Receiver::start(&key);
    // Each chaos phase starts with one of each failure, then fails at random (seeded).
    let chaos = json!({
        "p500": 0.2, "p_slow": 0.05, "slow_secs": 1.2, "p429": 0.05, "retry_after_429": "1",
        "seed": 20261206, "sleep": 0,
        "script": [{"status": 500}, {"sleep": 1.2}, {"status": 429, "retry_after": "1"}],
    });
    rx.control(chaos.clone()).await;
    let mut tw = serve(&tmp, FAST_RETRY).await;
    let addr = tw.addr;
    let base = tw.url("");
    let (mut matching, mut other) = (Vec::new(), Vec::new());

    // History before the webhook exists, replayed with `since: 0`.
    publish_mixed(&base, 0..20, &mut matching, &mut other).await;
    let (status, created) = put_hook(
        &base,
        "chaos",
        hook(
            &rx.url("/hook"),
            &["sensors/**"],
            &key,
            json!({"since": 0, "batch_max_events": 5, "timeout_ms": 600}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{created}");

    // Random 500s, slow answers (past the 600 ms timeout) and 429s while events keep coming,
    // for at least 15 calls.
    publish_mixed(&base, 20..80, &mut matching, &mut other).await;
    wait_calls(&rx, 15).await;

    // The receiver is down (connection refused) while events keep coming: shown as retrying.
    rx.stop();
    publish_mixed(&base, 80..110, &mut matching, &mut other).await;
    wait_view(
        &base,
        "chaos",
        PATIENCE,
        "retrying while the receiver is down",
        |v| v["state"] == "retrying" && v["last_error"].is_string() && v["last_error_at"].is_u64(),
    )
    .await;
    rx.restart(Some(chaos.clone()));

    // kill -9 while a call is in flight (the receiver holds it 300 ms, within the timeout).
    rx.control(json!({"sleep": 0.3, "p500": 0, "p_slow": 0, "p429": 0, "script": []}))
        .await;
    publish_mixed(&base, 110..130, &mut matching, &mut other).await;
    let in_flight = wait_for(PATIENCE, "a call in flight at the receiver", || async {
        rx.snapshot().await["pending"]
            .as_array()
            .and_then(|p| p.first().cloned())
    })
    .await;
    tw.kill9();
    tw = restart(&tmp, addr).await;
    rx.control(chaos.clone()).await;

    // More chaos (15 calls at least), and another kill -9 at whatever moment that is.
    let before = rx.calls().await.len();
    publish_mixed(&base, 130..190, &mut matching, &mut other).await;
    wait_calls(&rx, before + 15).await;
    tw.kill9();
    tw = restart(&tmp, addr).await;
    publish_mixed(&base, 190..220, &mut matching, &mut other).await;

    // The receiver recovers; the last event published matches.
    rx.control(all_ok()).await;
    let last = publish_one(&reqwest::Client::new(), &base, IN[0], json!("last")).await;
    matching.push(last);
    wait_delivered(&rx, "/hook", last, SETTLE).await;
    // Slow answers still being held count too: wait until the receiver has answered everything.
    let calls = wait_for(PATIENCE, "the receiver to answer every call", || async {
        let snap = rx.snapshot().await;
        let idle = snap["pending"].as_array().is_some_and(Vec::is_empty);
        idle.then(|| rx_calls_on(&snap, "/hook"))
    })
    .await;
    let v = wait_view(
        &base,
        "chaos",
        PATIENCE,
        "the cursor at the last event",
        |v| v["cursor"] == last,
    )
    .await;
    assert_eq!(v["state"], "active", "{v}");
    assert_eq!(v["lag"], 0, "{v}");
    assert_eq!(v["attempts"], 0, "{v}");
    assert!(v["in_flight"].is_null(), "{v}");
    assert!(v["last_success_at"].is_u64(), "{v}");

    let batches = assert_whole_batches_in_order(&calls, &matching);
    for c in &calls {
        for t in c["topics"].as_array().expect("topics") {
            assert!(
                t.as_str().is_some_and(|t| t.starts_with("sensors/")),
                "an event of {t} reached a sensors/** webhook"
            );
        }
    }
    assert!(
        calls
            .iter()
            .all(|c| ids_of(c).iter().all(|id| !other.contains(id))),
        "an event of a non-matching topic was delivered"
    );
    // The batch in flight at the kill came again, whole, under its webhook-id.
    let wid = in_flight["webhook_id"]
        .as_str()
        .expect("pending webhook-id");
    let sent: Vec<&Value> = calls.iter().filter(|c| c["webhook_id"] == wid).collect();
    assert!(
        sent.len() >= 2
            && sent
                .iter()
                .any(|c| c["answered"] == 200 && c["seq"].as_u64() > in_flight["seq"].as_u64()),
        "the batch in flight at kill -9 ({in_flight}) was not re-sent after the restart: {}",
        summary(&calls)
    );
    // The failures really happened.
    let answered = |s: u64| calls.iter().filter(|c| c["answered"] == s).count();
    let slow = calls
        .iter()
        .filter(|c| c["slept"].as_f64().unwrap_or(0.0) >= 1.2)
        .count();
    assert!(
        answered(500) >= 2 && answered(429) >= 2 && slow >= 2,
        "the chaos did not happen: {} 500s, {} 429s, {slow} slow: {}",
        answered(500),
        answered(429),
        calls
            .iter()
            .map(|c| format!("{}:{}/{} ", c["seq"], c["answered"], c["slept"]))
            .collect::<String>()
    );
    let retried = calls.len() - batches.len();
    eprintln!(
        "chaos: {} matching events in {} batches, {} calls ({retried} retries: {} 500s, {} 429s, \
         {slow} slow), {} events elsewhere",
        matching.len(),
        batches.len(),
        calls.len(),
        answered(500),
        answered(429),
        other.len()
    );
    assert!(
        metric_with(
            &base,
            "tidewire_webhook_batches_total",
            &[("webhook", "chaos")]
        )
        .await
            >= 1.0
    );
    drop(tw);
}

// ---- The retry schedule ------------------------------------------------------------------------

#[tokio::test]
async fn failures_wait_per_the_schedule_backoff_retry_after_exactly_and_other_4xx_slowly() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(13);
    let rx = Receiver::start(&key);
    // (path, how the receiver answers it, the wait after the n-th failure, ms). Backoff:
    // delay_n = min(max, min·2^(n-1)) drawn uniformly from [delay_n/2, delay_n].
    let backoff = |n: u64| {
        let d = 20_000u64.min(1000 << (n - 1).min(20));
        d / 2..=d
    };
    let exactly = |ms: u64| move |_: u64| ms..=ms;
    type Wait = Box<dyn Fn(u64) -> std::ops::RangeInclusive<u64>>;
    let cases: [(&str, Value, Wait); 6] = [
        ("/e500", json!({"status": 500}), Box::new(backoff)),
        ("/e503", json!({"status": 503}), Box::new(backoff)),
        ("/e429", json!({"status": 429}), Box::new(backoff)),
        // Retry-After in seconds is honoured exactly, for 429 and 503.
        (
            "/r429",
            json!({"status": 429, "retry_after": "30"}),
            Box::new(exactly(30_000)),
        ),
        (
            "/r503",
            json!({"status": 503, "retry_after": "7"}),
            Box::new(exactly(7_000)),
        ),
        // Other 4xx: retried "slowly", at the maximum delay.
        ("/e400", json!({"status": 400}), Box::new(exactly(20_000))),
    ];
    for (path, answer, _) in &cases {
        let mut c = answer.clone();
        c["path"] = json!(path);
        rx.control(c).await;
    }
    let tw = serve(
        &tmp,
        "webhook_retry_min_ms = 1000\nwebhook_retry_max_ms = 20000\n",
    )
    .await;
    let base = tw.url("");
    for (path, _, _) in &cases {
        let name = &path[1..];
        let (status, body) = put_hook(
            &base,
            name,
            hook(&rx.url(path), &[&format!("t/{name}")], &key, json!({})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        publish_one(
            &reqwest::Client::new(),
            &base,
            &format!("t/{name}"),
            json!(1),
        )
        .await;
    }
    for (path, answer, wait) in &cases {
        let name = &path[1..];
        let v = wait_view(&base, name, PATIENCE, "a first failure", |v| {
            v["attempts"].as_u64() >= Some(1) && v["next_attempt_at"].is_u64()
        })
        .await;
        assert_eq!(v["state"], "retrying", "{v}");
        let next = v["next_attempt_at"].as_u64().unwrap();
        let failed = v["last_error_at"].as_u64().expect("last_error_at");
        // Both stamps are taken a moment apart on the server: allow 200 ms around the range.
        let scheduled = next.saturating_sub(failed);
        let wait = wait(v["attempts"].as_u64().unwrap());
        assert!(
            scheduled + 200 >= *wait.start() && scheduled <= wait.end() + 200,
            "{path} answered {answer}: next attempt {scheduled} ms after the failure, expected \
             {wait:?}: {v}"
        );
    }
    // The long waits really are waited: one call each so far.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for path in ["/r429", "/r503", "/e400"] {
        assert_eq!(
            rx.calls_to(path).await.len(),
            1,
            "{path} was called again too soon"
        );
    }
    assert!(
        metric_with(
            &base,
            "tidewire_webhook_failures_total",
            &[("webhook", "e400"), ("reason", "status_4xx")]
        )
        .await
            >= 1.0
    );
    assert!(
        metric_with(
            &base,
            "tidewire_webhook_failures_total",
            &[("webhook", "r429"), ("reason", "status_429")]
        )
        .await
            >= 1.0
    );
}

// ---- 410 Gone ----------------------------------------------------------------------------------

#[tokio::test]
async fn gone_410_disables_the_webhook_keeping_its_cursor_and_a_put_resumes_with_the_kept_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(2);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let first = publish_each(&base, &["g/a", "g/a"]).await;
    let (status, body) = put_hook(
        &base,
        "gone",
        hook(
            &rx.url("/hook"),
            &["g/**"],
            &key,
            json!({"since": 0, "batch_max_events": 2}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    wait_delivered(&rx, "/hook", first[1], PATIENCE).await;

    rx.control(json!({"status": 410})).await;
    let kept = publish_each(&base, &["g/a"]).await;
    let v = wait_view(&base, "gone", PATIENCE, "state disabled after 410", |v| {
        v["state"] == "disabled"
    })
    .await;
    assert_eq!(v["cursor"], first[1], "the cursor moved: {v}");
    assert_eq!(v["in_flight"]["first_id"], kept[0], "{v}");
    assert_eq!(v["in_flight"]["last_id"], kept[0], "{v}");
    assert!(v["last_error"].is_string(), "{v}");
    // The receiver records the 410 call once its answer is written, maybe after the server read it.
    let gone_calls = wait_for(PATIENCE, "the 410 call on record", || async {
        let calls = rx.calls_to("/hook").await;
        calls
            .last()
            .is_some_and(|c| c["answered"] == 410)
            .then_some(calls)
    })
    .await;
    let gone_id = gone_calls.last().expect("the 410 call")["webhook_id"].clone();
    assert_eq!(
        gone_calls.iter().filter(|c| c["answered"] == 410).count(),
        1,
        "{}",
        summary(&gone_calls)
    );

    // Disabled: nothing more is called, whatever is published.
    let later = publish_each(&base, &["g/a", "g/b"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.calls_to("/hook").await.len(),
        gone_calls.len(),
        "a disabled webhook was called"
    );
    assert_eq!(view(&base, "gone").await["state"], "disabled");
    assert_eq!(
        metric_with(
            &base,
            "tidewire_webhook_failures_total",
            &[("webhook", "gone"), ("reason", "status_410")]
        )
        .await,
        1.0
    );

    // A PUT (without enabled: false) re-enables: the kept batch first, under its webhook-id.
    rx.control(all_ok()).await;
    let (status, body) = put_hook(&base, "gone", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let calls = wait_delivered(&rx, "/hook", later[1], PATIENCE).await;
    let resumed = &calls[gone_calls.len()];
    assert_eq!(resumed["webhook_id"], gone_id, "{}", summary(&calls));
    assert_eq!(ids_of(resumed), kept);
    let mut all = first.clone();
    all.extend(&kept);
    all.extend(&later);
    assert_whole_batches_in_order(&calls, &all);
    let v = wait_view(&base, "gone", PATIENCE, "the cursor at the end", |v| {
        v["cursor"] == later[1]
    })
    .await;
    assert_eq!(v["state"], "active", "{v}");
}

// ---- Who may be called (SSRF) ------------------------------------------------------------------

/// This machine's host name, and whether it resolves to anything but 127.0.0.1.
fn host_name() -> (String, bool) {
    use std::net::ToSocketAddrs as _;
    let out = std::process::Command::new("hostname")
        .output()
        .expect("run hostname");
    let name = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert!(!name.is_empty(), "hostname printed nothing");
    let elsewhere = (name.as_str(), 80)
        .to_socket_addrs()
        .map(|addrs| {
            addrs
                .into_iter()
                .any(|a| a.ip() != std::net::Ipv4Addr::LOCALHOST)
        })
        .unwrap_or(false);
    (name, elsewhere)
}

#[tokio::test]
async fn the_allow_list_refuses_every_destination_it_does_not_name_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(3);
    let rx = Receiver::start(&key);
    // Another real receiver on another loopback port: it must never be called.
    let bystander = Receiver::start(&key);
    let tw = serve(
        &tmp,
        &format!("{FAST_RETRY}webhook_allow = [\"127.0.0.1:{}\"]\n", rx.port),
    )
    .await;
    let base = tw.url("");
    let (name, elsewhere) = host_name();
    let mut refused = vec![
        bystander.url("/hook"),
        format!("http://[::1]:{}/hook", rx.port),
        format!("http://{name}:{}/hook", bystander.port),
    ];
    if elsewhere {
        // The host name resolves to an address that is not 127.0.0.1: refused whatever the port.
        refused.push(format!("http://{name}:{}/hook", rx.port));
    }
    for url in &refused {
        put_hook_refused_for_its_destination(&base, "h", url, &key).await;
        assert_eq!(get_hook(&base, "h").await.0, 404, "{url} was stored");
    }
    assert!(list_hooks(&base).await.is_empty());

    // The listed address and port are accepted (also by a name that resolves to it).
    if !elsewhere {
        let url = format!("http://{name}:{}/hook", rx.port);
        let (status, body) =
            put_hook(&base, "by-name", hook(&url, &["s/**"], &key, json!({}))).await;
        assert_eq!(status, 201, "PUT {url} (resolves to 127.0.0.1): {body}");
        assert_eq!(delete_hook(&base, "by-name").await.0, 204);
    }
    let (status, body) = put_hook(
        &base,
        "h",
        hook(&rx.url("/hook"), &["s/**"], &key, json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = publish_one(&reqwest::Client::new(), &base, "s/x", json!(1)).await;
    let calls = wait_delivered(&rx, "/hook", id, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[id]);

    // Moving it to a destination not listed is refused and changes nothing.
    let answer = put_hook(&base, "h", json!({"url": bystander.url("/hook")})).await;
    assert_refused(&answer, 403, "destination_not_allowed", "PUT");
    assert_eq!(view(&base, "h").await["url"], rx.url("/hook"));
    assert!(
        bystander.calls().await.is_empty(),
        "the bystander was called"
    );
}

#[tokio::test]
async fn a_name_is_judged_by_the_addresses_it_resolves_to_not_by_how_it_reads() {
    // Only IPv6 loopback is listed: `localhost` resolves to 127.0.0.1 (also on a machine whose
    // hosts file lists nothing else), which is elsewhere, so it is refused even though it
    // names this machine; the listed address itself is accepted.
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(9);
    let rx = Receiver::start(&key);
    let tw = serve(
        &tmp,
        &format!("{FAST_RETRY}webhook_allow = [\"::1/128\"]\n"),
    )
    .await;
    let base = tw.url("");
    let by_name = format!("http://localhost:{}/hook", rx.port);
    let answer = put_hook_refused_for_its_destination(&base, "n", &by_name, &key).await;
    let body = &answer.1;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.1"),
        "the refusal names the address the name resolved to: {body}"
    );
    assert_eq!(get_hook(&base, "n").await.0, 404, "nothing stored");
    let listed = format!("http://[::1]:{}/hook", rx.port);
    let (status, body) = put_hook(&base, "n", hook(&listed, &["s/**"], &key, json!({}))).await;
    assert_eq!(status, 201, "PUT {listed}: {body}");
    assert!(
        rx.calls().await.is_empty(),
        "nothing reached the receiver by name"
    );
}

#[tokio::test]
async fn by_default_only_loopback_destinations_are_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(4);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    // Never connected to: refused at the PUT.
    let mut refused = vec![
        "http://10.255.255.1:8080/hook".to_string(),
        "http://192.0.2.1/hook".to_string(),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ];
    let (name, elsewhere) = host_name();
    if elsewhere {
        refused.push(format!("http://{name}:{}/hook", rx.port));
    } else {
        eprintln!("{name} resolves to 127.0.0.1 only: its refusal is not tested here");
    }
    for url in &refused {
        put_hook_refused_for_its_destination(&base, "h", url, &key).await;
    }
    assert!(list_hooks(&base).await.is_empty());
    let (status, body) = put_hook(
        &base,
        "h",
        hook(&rx.url("/hook"), &["s/**"], &key, json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = publish_one(&reqwest::Client::new(), &base, "s/x", json!(1)).await;
    wait_delivered(&rx, "/hook", id, PATIENCE).await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_batch_is_retried_until_a_2xx() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(5);
    let rx = Receiver::start(&key);
    rx.control(json!({"path": "/hook", "status": 302, "location": rx.url("/elsewhere")}))
        .await;
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let (status, body) = put_hook(
        &base,
        "r",
        hook(&rx.url("/hook"), &["s/**"], &key, json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = publish_one(&reqwest::Client::new(), &base, "s/x", json!(1)).await;
    let redirected = wait_for(PATIENCE, "three redirected attempts", || async {
        let calls = rx.calls_to("/hook").await;
        (calls.len() >= 3).then_some(calls)
    })
    .await;
    assert!(redirected.iter().all(|c| c["answered"] == 302));
    // The receiver records a call as it answers: the server may not have read that answer yet.
    let v = wait_view(&base, "r", PATIENCE, "three failed attempts", |v| {
        v["attempts"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(v["state"], "retrying", "{v}");
    assert!(
        v["last_error"].as_str().is_some_and(|e| e.contains("302")),
        "{v}"
    );
    assert!(
        metric_with(
            &base,
            "tidewire_webhook_failures_total",
            &[("webhook", "r"), ("reason", "status_3xx")]
        )
        .await
            >= 3.0
    );

    rx.control(json!({"path": "/hook", "status": 200, "location": null}))
        .await;
    let calls = wait_delivered(&rx, "/hook", id, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[id]);
    assert!(
        rx.calls_to("/elsewhere").await.is_empty(),
        "the redirect was followed"
    );
}

// ---- Retention ---------------------------------------------------------------------------------

#[tokio::test]
async fn retention_passing_a_stalled_webhooks_cursor_sends_a_gap_then_delivery_continues() {
    if common::sled_only("per-pattern retention rules are refused with log = nats (by design)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(6);
    let rx = Receiver::start(&key);
    rx.control(json!({"status": 500})).await;
    let tw = serve(
        &tmp,
        &format!(
            "{FAST_RETRY}retention_check_secs = 1\nhub_capacity = 4\n\n[[retention_rules]]\npattern = \"busy/**\"\nmax_events = 5\n"
        ),
    )
    .await;
    let base = tw.url("");
    let mut busy = publish_each(&base, &["busy/x"; 2]).await;
    let (status, body) = put_hook(
        &base,
        "stalled",
        hook(
            &rx.url("/hook"),
            &["busy/**"],
            &key,
            json!({"since": 0, "batch_max_events": 2}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The first batch fails over and over; meanwhile more events than the live hub holds
    // (hub_capacity = 4 commits here, 1024 by default) come, and retention removes all but the
    // last 5 of them. (While a stalled webhook has not fallen behind the hub, it is still handed
    // from memory the events retention removed since, and no gap arises.)
    let stuck = wait_for(PATIENCE, "the first failed attempt", || async {
        rx.calls_to("/hook").await.first().cloned()
    })
    .await;
    assert_eq!(ids_of(&stuck), busy[..2]);
    busy.extend(publish_each(&base, &["busy/x"; 28]).await);
    let client = reqwest::Client::new();
    wait_for(PATIENCE, "retention to keep 5 events", || async {
        let stats = common::get_json(&client, &format!("{base}/v1/topics/busy/x")).await;
        (stats["count"] == 5).then_some(())
    })
    .await;
    let kept = &busy[25..];

    rx.control(json!({"status": 200})).await;
    let calls = wait_delivered(&rx, "/hook", busy[29], PATIENCE).await;
    let mut expected = busy[..2].to_vec();
    expected.extend(kept);
    let batches = assert_whole_batches_in_order(&calls, &expected);
    assert_eq!(batches[0].1, busy[..2], "the stuck batch went first, whole");
    assert_eq!(
        batches[1].2,
        json!({"requested": busy[1], "oldest": busy[25]}),
        "the batch after the stuck one names the gap: {}",
        summary(&calls)
    );
    assert!(batches[2..].iter().all(|b| b.2.is_null()), "one gap only");
    let v = wait_view(&base, "stalled", PATIENCE, "the cursor at the end", |v| {
        v["cursor"] == busy[29]
    })
    .await;
    assert_eq!(v["state"], "active", "{v}");
    assert_eq!(v["lag"], 0, "{v}");
}

// ---- The API -----------------------------------------------------------------------------------

#[tokio::test]
async fn put_creates_then_updates_get_shows_state_without_secrets_and_delete_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(7);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let body = hook(
        &rx.url("/b"),
        &["b/**"],
        &key,
        json!({"batch_max_events": 7, "batch_max_bytes": 65536, "timeout_ms": 3000,
               "headers": {"authorization": "Bearer fn-only-secret"}}),
    );
    let (status, b) = put_hook(&base, "beta", body).await;
    assert_eq!(status, 201, "{b}");
    for field in ["secret", "headers"] {
        assert!(b.get(field).is_none(), "the view shows {field}: {b}");
    }
    assert!(!b.to_string().contains(&key[6..]), "the secret shows: {b}");
    assert!(
        !b.to_string().contains("fn-only-secret"),
        "a header value shows: {b}"
    );
    assert_eq!(b["name"], "beta");
    assert_eq!(b["url"], rx.url("/b"));
    assert_eq!(b["topics"], json!(["b/**"]));
    assert_eq!(
        (
            &b["batch_max_events"],
            &b["batch_max_bytes"],
            &b["timeout_ms"]
        ),
        (&json!(7), &json!(65536), &json!(3000))
    );
    assert_eq!(b["header_names"], json!(["authorization"]));
    assert_eq!(b["state"], "active");
    assert_eq!(b["lag"], 0);
    assert_eq!(b["attempts"], 0);
    assert!(
        b["last_error"].is_null() && b["last_error_at"].is_null(),
        "{b}"
    );
    assert!(b["in_flight"].is_null(), "{b}");
    for n in ["cursor", "delivered_events", "delivered_batches"] {
        assert!(b[n].is_u64(), "{n} is not a number: {b}");
    }
    let (status, a) = put_hook(
        &base,
        "alpha",
        hook(&rx.url("/a"), &["a/**"], &key, json!({})),
    )
    .await;
    assert_eq!(status, 201, "{a}");
    for n in ["batch_max_events", "batch_max_bytes", "timeout_ms"] {
        assert!(a[n].as_u64().is_some_and(|v| v > 0), "no default {n}: {a}");
    }
    assert_eq!(a["header_names"], json!([]));

    // GET one and all (in name order), as PUT answered.
    assert_eq!(view(&base, "beta").await, b);
    let names: Vec<Value> = list_hooks(&base)
        .await
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("alpha"), json!("beta")]);

    // An update keeps what it does not name (cursor, secret, headers) and answers 200.
    let id = publish_one(&reqwest::Client::new(), &base, "b/x", json!(1)).await;
    let calls = wait_delivered(&rx, "/b", id, PATIENCE).await;
    assert_eq!(calls[0]["authorization"], "Bearer fn-only-secret");
    assert!(
        calls[0]["user_agent"]
            .as_str()
            .is_some_and(|u| u.starts_with("tidewire/")),
        "{}",
        calls[0]
    );
    let ts: u64 = calls[0]["timestamp"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("timestamp");
    assert!(ts.abs_diff(now()) < 60, "webhook-timestamp {ts} is not now");
    let v = wait_view(&base, "beta", PATIENCE, "the cursor after delivery", |v| {
        v["cursor"] == id
    })
    .await;
    assert_eq!(v["delivered_events"], 1, "{v}");
    assert_eq!(v["delivered_batches"], 1, "{v}");
    assert!(v["last_success_at"].is_u64(), "{v}");
    let (status, u) = put_hook(&base, "beta", json!({"topics": ["b/**", "c/**"]})).await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["topics"], json!(["b/**", "c/**"]));
    assert_eq!(u["cursor"], id);
    assert_eq!(u["batch_max_events"], 7);
    let id2 = publish_one(&reqwest::Client::new(), &base, "c/x", json!(2)).await;
    let calls = wait_delivered(&rx, "/b", id2, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[id, id2]);
    assert_eq!(
        calls.last().unwrap()["authorization"],
        "Bearer fn-only-secret"
    );

    // enabled: false disables; nothing is called until a PUT enables it again.
    let (status, d) = put_hook(&base, "beta", json!({"enabled": false})).await;
    assert_eq!((status, &d["state"]), (200, &json!("disabled")), "{d}");
    let id3 = publish_one(&reqwest::Client::new(), &base, "b/x", json!(3)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rx.calls_to("/b").await.len(),
        calls.len(),
        "a disabled webhook was called"
    );
    let (status, e) = put_hook(&base, "beta", json!({"enabled": true})).await;
    assert_eq!((status, &e["state"]), (200, &json!("active")), "{e}");
    wait_delivered(&rx, "/b", id3, PATIENCE).await;

    // DELETE: 204, then 404 webhook_not_found for GET and DELETE alike; nothing more is called.
    assert_eq!(delete_hook(&base, "beta").await.0, 204);
    assert_refused(
        &get_hook(&base, "beta").await,
        404,
        "webhook_not_found",
        "GET",
    );
    assert_refused(
        &delete_hook(&base, "beta").await,
        404,
        "webhook_not_found",
        "DELETE",
    );
    let before = rx.calls_to("/b").await.len();
    publish_one(&reqwest::Client::new(), &base, "b/x", json!(4)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rx.calls_to("/b").await.len(),
        before,
        "a deleted webhook was called"
    );
    let names: Vec<Value> = list_hooks(&base)
        .await
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("alpha")]);
}

#[tokio::test]
async fn invalid_webhooks_get_422_invalid_webhook_bad_json_400_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(8);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let url = rx.url("/hook");
    let good = || hook(&url, &["s/**"], &key, json!({}));
    let with = |k: &str, v: Value| {
        let mut b = good();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let short_secret = {
        use base64::Engine as _;
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 8])
        )
    };
    let cases: Vec<(&str, Value)> = vec![
        ("no url", without("url")),
        ("no topics", without("topics")),
        ("no secret", without("secret")),
        ("ftp url", with("url", json!("ftp://127.0.0.1/x"))),
        ("not a url", with("url", json!("not a url"))),
        (
            "url of a name that does not resolve",
            with("url", json!("http://no-such-host.invalid/x")),
        ),
        ("** not last", with("topics", json!(["a/**/b"]))),
        ("topics not a list", with("topics", json!("s/**"))),
        (
            "secret without whsec_",
            with("secret", json!(key[6..].to_string())),
        ),
        (
            "secret not base64",
            with("secret", json!("whsec_!!!not-base64!!!")),
        ),
        ("secret too short", with("secret", json!(short_secret))),
        ("batch_max_events 0", with("batch_max_events", json!(0))),
        ("batch_max_bytes 0", with("batch_max_bytes", json!(0))),
        ("timeout_ms 0", with("timeout_ms", json!(0))),
        ("unknown field", with("colour", json!("blue"))),
    ];
    for (what, body) in cases {
        let answer = put_hook(&base, "h", body.clone()).await;
        assert_refused(
            &answer,
            422,
            "invalid_webhook",
            &format!("{what}: PUT {body}"),
        );
        assert!(
            answer.1["error"]["message"].is_string(),
            "{what}: {}",
            answer.1
        );
    }
    for name in ["bad%20name", "bad*name", &"n".repeat(65)] {
        let answer = put_hook(&base, name, good()).await;
        assert_refused(&answer, 422, "invalid_webhook", &format!("name {name:?}"));
    }
    let (status, answer) = put_hook(&base, "h", Value::String("{\"url\": ".into())).await;
    assert_eq!(status, 400, "bad JSON: {answer}");
    assert!(list_hooks(&base).await.is_empty(), "something was stored");
    assert_eq!(get_hook(&base, "h").await.0, 404);

    // A bad update changes nothing either.
    assert_eq!(put_hook(&base, "h", good()).await.0, 201);
    let before = view(&base, "h").await;
    let answer = put_hook(&base, "h", json!({"topics": ["a/**/b"]})).await;
    assert_refused(&answer, 422, "invalid_webhook", "a bad update");
    assert_eq!(view(&base, "h").await, before);
    let _ = tw;
}

#[tokio::test]
async fn since_replays_history_and_without_it_a_new_webhook_starts_at_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(9);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let old = publish_each(&base, &["h/a", "x/a", "h/b", "h/a"]).await;
    let old_matching = [old[0], old[2], old[3]];
    for (name, since) in [("all", json!(0)), ("after-first", json!(old[0]))] {
        let (status, body) = put_hook(
            &base,
            name,
            hook(
                &rx.url(&format!("/{name}")),
                &["h/**"],
                &key,
                json!({"since": since}),
            ),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = put_hook(
        &base,
        "new",
        hook(&rx.url("/new"), &["h/**"], &key, json!({})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["cursor"], old[3],
        "a new webhook starts at the head: {body}"
    );
    let fresh = publish_one(&reqwest::Client::new(), &base, "h/c", json!("fresh")).await;

    let calls = wait_delivered(&rx, "/all", fresh, PATIENCE).await;
    let mut expected = old_matching.to_vec();
    expected.push(fresh);
    assert_whole_batches_in_order(&calls, &expected);
    let calls = wait_delivered(&rx, "/after-first", fresh, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &expected[1..]);
    let calls = wait_delivered(&rx, "/new", fresh, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[fresh]);

    // An update with `since` moves the cursor back: history again.
    let (status, body) = put_hook(&base, "new", json!({"since": old[2]})).await;
    assert_eq!((status, &body["cursor"]), (200, &json!(old[2])), "{body}");
    let calls = wait_for(PATIENCE, "the replay after since", || async {
        let calls = rx.calls_to("/new").await;
        let ids: Vec<u64> = calls.iter().flat_map(ids_of).collect();
        (ids == [fresh, old[3], fresh]).then_some(calls)
    })
    .await;
    assert!(calls.iter().all(|c| c["verified"] == true));
}

#[tokio::test]
async fn batches_respect_batch_max_events_and_stay_in_id_order() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(10);
    let rx = Receiver::start(&key);
    let tw = serve(&tmp, FAST_RETRY).await;
    let base = tw.url("");
    let ids = publish_each(&base, &["n/a"; 23]).await;
    let (status, body) = put_hook(
        &base,
        "n",
        hook(
            &rx.url("/hook"),
            &["n/**"],
            &key,
            json!({"since": 0, "batch_max_events": 5}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let calls = wait_delivered(&rx, "/hook", ids[22], PATIENCE).await;
    let batches = assert_whole_batches_in_order(&calls, &ids);
    assert!(batches.iter().all(|b| b.1.len() <= 5 && !b.1.is_empty()));
    assert!(batches.len() >= 5, "23 events in {} batches", batches.len());
    let v = wait_view(&base, "n", PATIENCE, "the cursor at the end", |v| {
        v["cursor"] == ids[22]
    })
    .await;
    assert_eq!(v["delivered_events"], 23, "{v}");
    assert_eq!(v["delivered_batches"], batches.len() as u64, "{v}");
}

// ---- Authorization -----------------------------------------------------------------------------

const JWT_SECRET: &str = "tidewire-webhook-tests-secret-0123456789abcdef";

fn jwt(grants: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "t", "exp": now() + 120, "tidewire": grants}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test]
async fn with_authorization_on_managing_webhooks_needs_the_admin_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(11);
    let rx = Receiver::start(&key);
    let tw = serve(
        &tmp,
        &format!("{FAST_RETRY}jwt_secret = \"{JWT_SECRET}\"\n"),
    )
    .await;
    let base = tw.url("");
    let admin = jwt(json!({"admin": true, "publish": ["**"], "subscribe": ["**"]}));
    let everything_else = jwt(json!({"publish": ["**"], "subscribe": ["**"]}));
    let not_admin = jwt(json!({"admin": false, "publish": ["**"], "subscribe": ["**"]}));
    let one = format!("{base}/v1/webhooks/h");
    let all = format!("{base}/v1/webhooks");
    let body = hook(&rx.url("/hook"), &["s/**"], &key, json!({}));
    use reqwest::Method;
    let requests = [
        (Method::PUT, one.as_str(), Some(body.clone())),
        (Method::GET, one.as_str(), None),
        (Method::GET, all.as_str(), None),
        (Method::DELETE, one.as_str(), None),
    ];
    for (method, url, body) in &requests {
        let (status, answer) = call(method.clone(), url, body.clone(), None).await;
        assert_eq!(status, 401, "{method} {url} without a token: {answer}");
        for token in [&everything_else, &not_admin] {
            let answer = call(method.clone(), url, body.clone(), Some(token)).await;
            let what = format!("{method} {url} without the admin claim");
            assert_refused(&answer, 403, "forbidden", &what);
        }
    }
    let (status, answer) = call(Method::GET, &all, None, Some(&admin)).await;
    assert_eq!((status, &answer["webhooks"]), (200, &json!([])), "{answer}");

    let (status, answer) = call(Method::PUT, &one, Some(body.clone()), Some(&admin)).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer) = call(Method::GET, &one, None, Some(&admin)).await;
    assert_eq!((status, &answer["name"]), (200, &json!("h")), "{answer}");
    let (status, answer) = call(Method::GET, &all, None, Some(&admin)).await;
    assert_eq!(
        (status, answer["webhooks"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    let (status, answer) = call(Method::DELETE, &one, None, Some(&admin)).await;
    assert_eq!(status, 204, "{answer}");
}

// ---- Declared in the config file ---------------------------------------------------------------

#[tokio::test]
async fn a_webhook_declared_in_the_config_file_is_created_at_start_delivers_and_keeps_its_cursor_across_restarts(
) {
    let tmp = tempfile::tempdir().unwrap();
    let key = secret(12);
    let rx = Receiver::start(&key);
    let config = format!(
        r#"{FAST_RETRY}
[[webhooks]]
name = "declared"
url = "{}"
topics = ["cfg/**"]
secret = "{key}"
since = 0
batch_max_events = 10
headers = {{ authorization = "Bearer from-config" }}
"#,
        rx.url("/hook")
    );
    let mut tw = serve(&tmp, &config).await;
    let addr = tw.addr;
    let base = tw.url("");
    let v = view(&base, "declared").await;
    assert_eq!(v["url"], rx.url("/hook"), "{v}");
    assert_eq!(v["topics"], json!(["cfg/**"]));
    assert_eq!(v["header_names"], json!(["authorization"]));
    assert!(!v.to_string().contains(&key[6..]), "the secret shows: {v}");
    let first = publish_each(&base, &["cfg/a", "other/a", "cfg/b"]).await;
    let calls = wait_delivered(&rx, "/hook", first[2], PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[first[0], first[2]]);
    assert!(calls
        .iter()
        .all(|c| c["authorization"] == "Bearer from-config"));
    wait_view(
        &base,
        "declared",
        PATIENCE,
        "the cursor after delivery",
        |v| v["cursor"] == first[2],
    )
    .await;

    // Restarted with the same file: the existing webhook keeps its cursor (no replay).
    assert!(tw.sigterm().success());
    drop(tw);
    tw = restart(&tmp, addr).await;
    let base = tw.url("");
    assert_eq!(view(&base, "declared").await["cursor"], first[2]);
    let next = publish_one(&reqwest::Client::new(), &base, "cfg/c", json!("after")).await;
    let calls = wait_delivered(&rx, "/hook", next, PATIENCE).await;
    assert_whole_batches_in_order(&calls, &[first[0], first[2], next]);
    let _ = tw;
}
