//! tidewire behind the real nginx, configured with `deploy/nginx.conf` itself (only its two
//! ports substituted): SSE passes each event promptly and resumes, WebSocket upgrades and
//! resumes, and long-poll through an nginx that buffers everything and cuts polls short still
//! delivers every event once.
mod common;

use std::time::{Duration, Instant};

use common::nginx::{Nginx, SITE};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn sse_through_nginx_passes_each_event_promptly_and_resumes_with_last_event_id() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let nginx = Nginx::start(server.addr, SITE).await;
    let client = reqwest::Client::new();
    let direct = server.url("");
    let mut stream = sse(&nginx.url("/v1/sse?topic=px/**"), None).await;
    // One at a time: each must arrive while the stream is open, before the next is published.
    let mut last = 0;
    for i in 0..5 {
        let id = publish_one(&client, &direct, "px/a", json!(i)).await;
        let got = read_ids(&mut stream, 1).await;
        assert_eq!(got, [id], "event {i} held back by the proxy");
        last = id;
    }
    drop(stream);
    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push(publish_one(&client, &direct, "px/b", json!(i)).await);
    }
    let mut stream = sse(&nginx.url("/v1/sse?topic=px/**"), Some(last)).await;
    assert_eq!(read_ids(&mut stream, 3).await, missed);
    let id = publish_one(&client, &direct, "px/a", json!("live")).await;
    assert_eq!(read_ids(&mut stream, 1).await, [id]);
    drop(stream);
    drop(nginx);
    server.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_and_resumes_through_nginx() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let nginx = Nginx::start(server.addr, SITE).await;
    let client = reqwest::Client::new();
    let direct = server.url("");
    let ws_url = |since: u64| {
        format!(
            "ws://127.0.0.1:{}/v1/ws?topic=wx/**&since={since}",
            nginx.port
        )
    };
    let next_id = |m: Message| -> u64 {
        let text = m.into_text().expect("a text frame");
        let v: Value = serde_json::from_str(&text).expect("JSON frame");
        v["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("not an event: {v}"))
    };
    let mut acked = Vec::new();
    for i in 0..3 {
        acked.push(publish_one(&client, &direct, "wx/a", json!(i)).await);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(0))
        .await
        .expect("upgrade through nginx");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("timed out")
            .expect("socket ended")
            .expect("socket error");
        if m.is_text() {
            seen.push(next_id(m));
        }
    }
    let _ = ws.close(None).await;
    for i in 3..6 {
        acked.push(publish_one(&client, &direct, "wx/a", json!(i)).await);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(*seen.last().unwrap()))
        .await
        .expect("upgrade through nginx");
    while seen.len() < 6 {
        let m = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("timed out")
            .expect("socket ended")
            .expect("socket error");
        if m.is_text() {
            seen.push(next_id(m));
        }
    }
    assert_eq!(seen, acked);
    let _ = ws.send(Message::Close(None)).await;
    drop(nginx);
    server.stop().await;
}

#[tokio::test]
async fn long_poll_through_a_buffering_nginx_that_cuts_polls_delivers_every_event_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    // The worst proxy: buffers everything in tiny buffers and gives up on a poll after 1 s,
    // shorter than the 3 s the client asks to wait.
    let hostile = SITE.replace(
        "        proxy_read_timeout 65s;\n",
        "        proxy_read_timeout 1s;\n        proxy_buffering on;\n        proxy_buffer_size 1k;\n        proxy_buffers 4 1k;\n",
    );
    assert_ne!(
        hostile, SITE,
        "the poll location was not found in deploy/nginx.conf"
    );
    let nginx = Nginx::start(server.addr, &hostile).await;
    let direct = server.url("");
    let publisher = {
        let direct = direct.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            // Bursts with pauses longer than the proxy's timeout, so polls do get cut.
            for burst in 0..3 {
                for i in 0..40 {
                    let topic = if i % 4 == 0 { "lp/noise" } else { "lp/a" };
                    let id =
                        publish_one(&client, &direct, topic, json!({"b": burst, "i": i})).await;
                    if topic == "lp/a" {
                        ids.push(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            ids
        })
    };
    let client = reqwest::Client::new();
    let mut seen: Vec<u64> = Vec::new();
    let mut next = 0u64;
    let mut cut = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while !publisher.is_finished() || seen.len() < 90 {
        assert!(Instant::now() < deadline, "saw {} events", seen.len());
        let r = client
            .get(nginx.url(&format!(
                "/v1/poll?topic=lp/a&since={next}&timeout=3&limit=16"
            )))
            .send()
            .await
            .expect("poll through nginx");
        if r.status() != 200 {
            // The proxy cut the poll: poll again from the same cursor.
            assert_eq!(r.status(), 504, "only a proxy timeout is expected");
            cut += 1;
            continue;
        }
        let body: Value = r.json().await.expect("a whole JSON body");
        for e in body["events"].as_array().expect("events") {
            seen.push(e["id"].as_u64().expect("id"));
        }
        next = body["next"].as_u64().expect("next");
    }
    let published = publisher.await.unwrap();
    assert_eq!(seen, published, "every event once, in order");
    assert!(
        cut > 0,
        "the proxy never cut a poll, so the test proved nothing about cuts"
    );
    drop(nginx);
    server.stop().await;
}
