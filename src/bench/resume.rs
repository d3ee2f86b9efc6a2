//! `bench resume`: publish N events to one topic (optionally followed by M events of other
//! topics), then time one subscriber replaying them from the start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::payload::{self, Rng};
use super::procfs::CpuMeter;
use super::report::{Progress, Report};
use super::target::{Format, PublishTransport, Target, Transport, Via};
use super::wire::{self, open_ws, HttpConn, LineScanner, Poller, SseStream};
use super::{fail, now_us, parse_duration, run_topic, Common, Error, MAX_EVENTS};

/// Flags of `bench resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Events published to the topic, then replayed.
    #[arg(long, default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_EVENTS))]
    pub events: u64,
    /// Events published afterwards to 16 other topics, so a reader that scanned the whole log
    /// would pay for them.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_EVENTS))]
    pub noise: u64,
    /// How the subscriptions receive.
    #[command(flatten)]
    pub via: Via,
    /// Ask for compressed delivery: WebSocket `batch=gzip`, long-poll `Accept-Encoding: gzip`
    /// (tidewire only).
    #[arg(long)]
    pub gzip: bool,
    /// Connections publishing the events when each request holds one (Nchan).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub publishers: u64,
    /// The longest the replay may take (at most 600 s).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Where the server is, what it is, and how to report.
    #[command(flatten)]
    pub common: Common,
}

/// Publishes `n` readings to `topic`: tidewire in 1000-event JSON batches on one connection
/// (in order), Nchan one per request over `publishers` connections.
async fn fill(
    c: &Common,
    topic: &str,
    n: u64,
    publishers: u64,
    done: &AtomicU64,
) -> Result<(), Error> {
    let url = c.publish_url(PublishTransport::Http)?;
    let path = url.path(topic);
    match c.target {
        Target::Tidewire => {
            let mut conn = HttpConn::open(url.authority(), c.token.as_deref()).await?;
            let mut rng = Rng::new(now_us());
            let mut sent = 0;
            while sent < n {
                let k = 1000.min(n - sent);
                let datas: Vec<Vec<u8>> = (sent..sent + k)
                    .map(|i| {
                        let mut d = Vec::with_capacity(160);
                        payload::reading(&mut d, i, now_us(), &mut rng);
                        d
                    })
                    .collect();
                let body = payload::tidewire_body(&datas, Format::Json, false)?;
                let st = conn
                    .post(&path, body.content_type, None, body.bytes)
                    .await?;
                if st != 201 {
                    return Err(fail(format!("publishing to {topic}: server answered {st}")));
                }
                sent += k;
                done.fetch_add(k, Ordering::Relaxed);
            }
        }
        Target::Nchan => {
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for p in 0..publishers.min(n) {
                let mut conn = HttpConn::open(url.authority(), c.token.as_deref()).await?;
                let (next, path, topic) = (next.clone(), path.clone(), topic.to_string());
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng::new(now_us() ^ (p << 40));
                    let mut sent = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok::<u64, Error>(sent);
                        }
                        let mut d = Vec::with_capacity(160);
                        payload::reading(&mut d, i, now_us(), &mut rng);
                        let st = conn
                            .post(&path, "application/json", None, Bytes::from(d))
                            .await?;
                        if st != 201 && st != 202 {
                            return Err(fail(format!(
                                "publishing to {topic}: server answered {st}"
                            )));
                        }
                        sent += 1;
                    }
                }));
            }
            for t in tasks {
                let sent = t.await??;
                done.fetch_add(sent, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// What the replaying subscriber got.
#[derive(Default)]
struct Replay {
    received: u64,
    /// Frames (WebSocket), chunks (SSE) or answers (poll).
    units: u64,
    /// Bytes as they came: the socket's (WebSocket, frame headers included) or the bodies'.
    wire_bytes: u64,
    /// Bytes after gunzip (equal to the payload when nothing was compressed).
    decoded_bytes: u64,
    error: Option<String>,
}

/// Replays `topic` from the start until `events` arrived, `deadline` passed, or 10 s brought
/// nothing.
async fn replay(
    a: &ResumeArgs,
    topic: &str,
    deadline: Instant,
    got: &AtomicU64,
) -> Result<Replay, Error> {
    let c = &a.common;
    let url = c.replay_url(a.via.transport)?;
    let quiet = Duration::from_secs(10);
    let mut r = Replay::default();
    let wait = |d: Instant| d.min(Instant::now() + quiet);
    match a.via.transport {
        Transport::Sse => {
            let mut s =
                SseStream::open(url.authority(), &url.path(topic), c.token.as_deref(), false)
                    .await?;
            let mut lines = LineScanner::default();
            while r.received < a.events {
                let chunk = match tokio::time::timeout_at(wait(deadline).into(), s.chunk()).await {
                    Ok(Some(Ok(b))) => b,
                    Ok(Some(Err(e))) => {
                        r.error = Some(format!("SSE: {e}"));
                        break;
                    }
                    Ok(None) => {
                        r.error = Some("SSE stream ended".into());
                        break;
                    }
                    Err(_) => break,
                };
                r.units += 1;
                r.wire_bytes += chunk.len() as u64;
                r.decoded_bytes += chunk.len() as u64;
                let mut n = 0;
                lines.push(&chunk, |_| n += 1);
                r.received += n;
                got.fetch_add(n, Ordering::Relaxed);
            }
        }
        Transport::Ws => {
            let mut path = url.path(topic);
            if a.gzip {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str("batch=gzip");
            }
            let proto = (c.target == Target::Tidewire).then(|| a.via.encoding.subprotocol());
            let wire_bytes = Arc::new(AtomicU64::new(0));
            let mut ws = open_ws(
                url.authority(),
                &path,
                proto,
                c.token.as_deref(),
                wire_bytes.clone(),
                false,
            )
            .await?;
            while r.received < a.events {
                let msg = match tokio::time::timeout_at(wait(deadline).into(), ws.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        r.error = Some(format!("WebSocket: {e}"));
                        break;
                    }
                    Ok(None) => {
                        r.error = Some("WebSocket closed".into());
                        break;
                    }
                    Err(_) => break,
                };
                let bytes: &[u8] = match &msg {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => b,
                    Message::Close(_) => {
                        r.error = Some("WebSocket closed by the server".into());
                        break;
                    }
                    _ => continue,
                };
                r.units += 1;
                let mut n = 0;
                let mut count = |ts_in: &[u8], msgpack: bool| {
                    if msgpack {
                        wire::msgpack_ts_all(ts_in, |_| n += 1);
                    } else {
                        wire::json_ts_all(ts_in, |_| n += 1);
                    }
                };
                let msgpack = matches!(msg, Message::Binary(_)) && a.via.msgpack();
                if bytes.starts_with(&[0x1f, 0x8b]) {
                    let raw = wire::gunzip(bytes)?;
                    r.decoded_bytes += raw.len() as u64;
                    count(&raw, a.via.msgpack());
                } else {
                    r.decoded_bytes += bytes.len() as u64;
                    count(bytes, msgpack);
                }
                r.received += n;
                got.fetch_add(n, Ordering::Relaxed);
            }
            r.wire_bytes = wire_bytes.load(Ordering::Relaxed);
            let _ = ws.close(None).await;
        }
        Transport::Poll => {
            let mut p =
                Poller::open(&url, topic, c.target, c.token.as_deref(), Some(0), a.gzip).await?;
            while r.received < a.events {
                // tidewire answers at once (timeout=0) until the end; Nchan holds when nothing
                // newer is buffered, bounded by the deadline.
                let answer =
                    match tokio::time::timeout_at(wait(deadline).into(), p.poll(0, 10_000)).await {
                        Ok(Ok(answer)) => answer,
                        Ok(Err(e)) => {
                            r.error = Some(format!("poll: {e}"));
                            break;
                        }
                        Err(_) => break,
                    };
                r.units += 1;
                r.wire_bytes += answer.wire_bytes;
                r.decoded_bytes += answer.body.len() as u64;
                let mut n = 0;
                wire::json_ts_all(&answer.body, |_| n += 1);
                if n == 0 && c.target == Target::Tidewire {
                    break;
                }
                r.received += n;
                got.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    Ok(r)
}

/// Runs `bench resume`.
pub(crate) async fn run(a: ResumeArgs) -> Result<(), Error> {
    let c = &a.common;
    a.via.check(c)?;
    c.tidewire_only(a.gzip, "--gzip")?;
    if a.gzip && a.via.transport == Transport::Sse {
        return Err(fail("--gzip is for --transport ws (batch=gzip) or poll"));
    }
    let topic = run_topic("resume");
    let cpu = CpuMeter::start(&c.pids)?;
    let published = Arc::new(AtomicU64::new(0));
    let filling = Instant::now();
    {
        let p = published.clone();
        let _progress = Progress::start_after(
            true,
            Duration::from_secs(5),
            "resume: publishing",
            move || format!("{} events published", p.load(Ordering::Relaxed)),
        );
        fill(c, &topic, a.events, a.publishers, &published).await?;
        // The topic's events go first, then the noise on other topics.
        let per = a.noise.div_ceil(16);
        let mut left = a.noise;
        for k in 0..16 {
            let n = per.min(left);
            if n == 0 {
                break;
            }
            fill(
                c,
                &format!("{topic}-noise/{k}"),
                n,
                a.publishers,
                &published,
            )
            .await?;
            left -= n;
        }
    }
    let fill_secs = filling.elapsed().as_secs_f64();

    let got = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let replayed = {
        let g = got.clone();
        let _progress = Progress::start_after(
            true,
            Duration::from_secs(5),
            "resume: replaying",
            move || format!("{} events received", g.load(Ordering::Relaxed)),
        );
        replay(&a, &topic, started + a.timeout, &got).await?
    };
    let secs = started.elapsed().as_secs_f64().max(1e-9);

    let mut r = Report::new("resume");
    r.put("target", "target", c.target.name());
    a.via.report(&mut r);
    r.put("gzip", "compressed delivery", a.gzip);
    r.put("events", "events of the topic", a.events);
    r.put("noise", "events of other topics after them", a.noise);
    r.put_f("fill_s", "publishing them took (s)", fill_secs, 2);
    r.put_f(
        "fill_events_per_s",
        "publishing events/s",
        published.load(Ordering::Relaxed) as f64 / fill_secs.max(1e-9),
        0,
    );
    r.put("received", "events replayed", replayed.received);
    r.put(
        "missing",
        "events not replayed",
        a.events.saturating_sub(replayed.received),
    );
    r.put_f(
        "replay_s",
        "replay took (s, connect to last event)",
        secs,
        3,
    );
    r.put_f(
        "events_per_s",
        "replayed events/s",
        replayed.received as f64 / secs,
        0,
    );
    r.put("units", "frames / chunks / answers", replayed.units);
    r.put("wire_bytes", "bytes received", replayed.wire_bytes);
    r.put(
        "decoded_bytes",
        "bytes after gunzip",
        replayed.decoded_bytes,
    );
    r.put_f(
        "compression",
        "compression (decoded / received)",
        replayed.decoded_bytes as f64 / replayed.wire_bytes.max(1) as f64,
        2,
    );
    r.put("first_error", "first error", replayed.error);
    cpu.finish(&mut r);
    r.print(c.json);
    Ok(())
}
