//! `bench fanout`: N subscribers of one topic over SSE, WebSocket or long-poll while
//! publishers offer a fixed rate; delivered events, lost events, and publish-to-receive latency
//! from the `"ts"` each event's data carries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::payload::MIN_SIZE;
use super::procfs::CpuMeter;
use super::publish::{publish_at_rate, RatePlan};
use super::report::{Latencies, Progress, Recorder, Report};
use super::target::{Encoding, PublishTransport, Target, Transport, UrlTemplate, Via};
use super::wire::{self, open_ws, LineScanner, Poller, SseStream, Ws};
use super::{fail, now_us, parse_duration, run_topic, Common, Error, MAX_CONNECTIONS, MAX_RATE};

/// Flags of `bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Subscribers of the topic.
    #[arg(long, short = 'n', default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub subscribers: u64,
    /// How the subscriptions receive.
    #[command(flatten)]
    pub via: Via,
    /// Events per second offered by the publishers.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_RATE))]
    pub rate: u64,
    /// How long to publish (at most 600 s): rate × duration events in all.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Bytes of each event's data (`{"ts":<unix µs>,"pad":"<hex>"}`).
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(MIN_SIZE..=1 << 20))]
    pub size: u64,
    /// Publishing connections sharing the rate (one request in flight each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub publishers: u64,
    /// Ask for gzip'd SSE streams (`Accept-Encoding: gzip`; the server needs `sse_gzip` on)
    /// and inflate them as they arrive (tidewire only, `--transport sse`).
    #[arg(long)]
    pub gzip: bool,
    /// How long to wait after the last publish for deliveries still on their way; what has not
    /// arrived by then counts as lost.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Where the server is, what it is, and how to report.
    #[command(flatten)]
    pub common: Common,
}

/// One open subscription.
enum Sub {
    Sse(SseStream),
    Ws(Box<Ws>),
    Poll(Poller),
}

/// Opens one live subscription of `topic`.
async fn subscribe(
    c: &Common,
    url: &UrlTemplate,
    topic: &str,
    transport: Transport,
    encoding: Encoding,
    gzip: bool,
    wire_bytes: Arc<AtomicU64>,
) -> Result<Sub, Error> {
    let token = c.token.as_deref();
    Ok(match transport {
        Transport::Sse => {
            Sub::Sse(SseStream::open(url.authority(), &url.path(topic), token, gzip).await?)
        }
        Transport::Ws => {
            let proto = (c.target == Target::Tidewire).then(|| encoding.subprotocol());
            let ws = open_ws(
                url.authority(),
                &url.path(topic),
                proto,
                token,
                wire_bytes,
                false,
            )
            .await?;
            Sub::Ws(Box::new(ws))
        }
        Transport::Poll => {
            let mut p = Poller::open(url, topic, c.target, token, None, false).await?;
            p.start_live().await?;
            Sub::Poll(p)
        }
    })
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    received: u64,
    /// Wall clock of the last event received, unix µs (0: none).
    last_us: u64,
    polls: u64,
    error: Option<String>,
}

/// Reads `sub` until `stop`, recording each event's latency.
async fn read(
    sub: Sub,
    encoding: Encoding,
    stop: Arc<Notify>,
    delivered: Arc<AtomicU64>,
    mut rec: Recorder,
) -> Seen {
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut seen = Seen::default();
    let count = |seen: &mut Seen, n: u64, now: u64| {
        if n > 0 {
            seen.received += n;
            seen.last_us = now;
            delivered.fetch_add(n, Ordering::Relaxed);
        }
    };
    match sub {
        Sub::Sse(mut s) => {
            let mut lines = LineScanner::default();
            loop {
                let chunk = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    c = s.chunk() => c,
                };
                match chunk {
                    None => {
                        seen.error = Some("SSE stream ended".into());
                        break;
                    }
                    Some(Err(e)) => {
                        seen.error = Some(format!("SSE: {e}"));
                        break;
                    }
                    Some(Ok(bytes)) => {
                        let now = now_us();
                        let mut n = 0;
                        lines.push(&bytes, |ts| {
                            rec.record(now.saturating_sub(ts));
                            n += 1;
                        });
                        count(&mut seen, n, now);
                    }
                }
            }
        }
        Sub::Ws(mut ws) => loop {
            let msg = tokio::select! {
                biased;
                _ = &mut stopped => break,
                m = ws.next() => m,
            };
            let now = now_us();
            let ts = match msg {
                None => {
                    seen.error = Some("WebSocket closed".into());
                    break;
                }
                Some(Err(e)) => {
                    seen.error = Some(format!("WebSocket: {e}"));
                    break;
                }
                Some(Ok(Message::Text(t))) => wire::json_ts(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => match encoding {
                    Encoding::Msgpack => wire::msgpack_ts(&b),
                    Encoding::Json => wire::json_ts(&b),
                },
                Some(Ok(Message::Close(_))) => {
                    seen.error = Some("WebSocket closed by the server".into());
                    break;
                }
                Some(Ok(_)) => None,
            };
            if let Some((ts, _)) = ts {
                rec.record(now.saturating_sub(ts));
                count(&mut seen, 1, now);
            }
        },
        Sub::Poll(mut p) => loop {
            let answer = tokio::select! {
                biased;
                _ = &mut stopped => break,
                a = p.poll(5, 1000) => a,
            };
            match answer {
                Ok(a) => {
                    let now = now_us();
                    seen.polls += 1;
                    let mut n = 0;
                    wire::json_ts_all(&a.body, |ts| {
                        rec.record(now.saturating_sub(ts));
                        n += 1;
                    });
                    count(&mut seen, n, now);
                }
                Err(e) => {
                    seen.error = Some(format!("poll: {e}"));
                    break;
                }
            }
        },
    }
    seen
}

/// Runs `bench fanout`.
pub(crate) async fn run(a: FanoutArgs) -> Result<(), Error> {
    let c = &a.common;
    a.via.check(c)?;
    c.tidewire_only(a.gzip, "--gzip")?;
    if a.gzip && a.via.transport != Transport::Sse {
        return Err(fail("--gzip is for --transport sse"));
    }
    let topic = run_topic("fanout");
    let sub_url = c.subscribe_url(a.via.transport)?;
    let pub_url = c.publish_url(PublishTransport::Http)?;
    let total = ((a.rate as f64) * a.duration.as_secs_f64())
        .round()
        .max(1.0) as u64;

    // Every subscriber is connected before the first publish.
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let opening = Instant::now();
    let subs: Vec<Result<Sub, Error>> = futures_util::stream::iter(0..a.subscribers)
        .map(|_| {
            subscribe(
                c,
                &sub_url,
                &topic,
                a.via.transport,
                a.via.encoding,
                a.gzip,
                wire_bytes.clone(),
            )
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let subs = subs.into_iter().collect::<Result<Vec<Sub>, Error>>()?;
    let open_secs = opening.elapsed().as_secs_f64();

    let stop = Arc::new(Notify::new());
    let delivered = Arc::new(AtomicU64::new(0));
    let latencies = Latencies::new();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|s| {
            tokio::spawn(read(
                s,
                a.via.encoding,
                stop.clone(),
                delivered.clone(),
                latencies.recorder(),
            ))
        })
        .collect();

    let published = Arc::new(AtomicU64::new(0));
    let progress = {
        let (published, delivered) = (published.clone(), delivered.clone());
        Progress::start(Progress::wanted(a.duration), "fanout", move || {
            format!(
                "published {}, delivered {}",
                published.load(Ordering::Relaxed),
                delivered.load(Ordering::Relaxed)
            )
        })
    };
    let cpu = CpuMeter::start(&c.pids)?;
    let start_us = now_us();
    let started = Instant::now();
    let plan = RatePlan {
        url: &pub_url,
        topic: &topic,
        rate: a.rate,
        total,
        size: a.size as usize,
        publishers: a.publishers,
    };
    let stats = publish_at_rate(c, plan, published).await?;
    // Deliveries still on their way get the grace period, then the readers stop.
    let expected = stats.published * a.subscribers;
    let grace_end = Instant::now() + a.grace;
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_waiters();
    let mut seen = Vec::with_capacity(readers.len());
    for r in readers {
        match tokio::time::timeout(Duration::from_secs(10), r).await {
            Ok(Ok(s)) => seen.push(s),
            Ok(Err(e)) => seen.push(Seen {
                error: Some(format!("subscriber task failed: {e}")),
                ..Seen::default()
            }),
            Err(_) => seen.push(Seen {
                error: Some("subscriber did not stop".into()),
                ..Seen::default()
            }),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);

    let delivered: u64 = seen.iter().map(|s| s.received).sum();
    let last_us = seen.iter().map(|s| s.last_us).max().unwrap_or(0);
    let window = (last_us.saturating_sub(start_us) as f64 / 1e6)
        .max(stats.secs)
        .max(1e-9);
    let complete = seen
        .iter()
        .filter(|s| s.received >= stats.published)
        .count();
    let errors = seen.iter().filter(|s| s.error.is_some()).count();
    let first_error = seen.iter().find_map(|s| s.error.clone());
    let polls: u64 = seen.iter().map(|s| s.polls).sum();

    let mut r = Report::new("fanout");
    r.put("target", "target", c.target.name());
    a.via.report(&mut r);
    if a.via.transport == Transport::Sse {
        r.put("gzip", "gzip", a.gzip);
    }
    r.put("subscribers", "subscribers", a.subscribers);
    r.put("rate", "offered events/s", a.rate);
    r.put_f(
        "duration_s",
        "publish duration (s)",
        a.duration.as_secs_f64(),
        2,
    );
    r.put("size", "event data size (bytes)", a.size);
    r.put("publishers", "publishing connections", a.publishers);
    r.put_f("open_s", "time to open the subscribers (s)", open_secs, 2);
    r.put("planned", "events planned (rate × duration)", total);
    r.put(
        "published",
        "events published (acknowledged)",
        stats.published,
    );
    r.put_f(
        "published_per_s",
        "events published/s (the offered rate reached?)",
        stats.published as f64 / stats.secs.max(1e-9),
        0,
    );
    r.put("publish_errors", "publish errors", stats.errors);
    r.put_f("publish_s", "publishing took (s)", stats.secs, 2);
    r.put("expected", "deliveries expected", expected);
    r.put("delivered", "deliveries received", delivered);
    r.put(
        "lost",
        "lost (expected − received)",
        expected.saturating_sub(delivered),
    );
    r.put(
        "complete_subscribers",
        "subscribers that got every event",
        complete as u64,
    );
    r.put_f(
        "offered_per_s",
        "deliveries offered/s (rate × subscribers)",
        (a.rate * a.subscribers) as f64,
        0,
    );
    r.put_f(
        "delivered_per_s",
        "deliveries/s (to the last receipt)",
        delivered as f64 / window,
        0,
    );
    latencies.with(|h| r.put_latency(h, "delivery"));
    if a.via.transport == Transport::Poll {
        r.put("polls", "polls answered", polls);
        r.put_f("polls_per_s", "polls/s", polls as f64 / window, 0);
    }
    if a.via.transport == Transport::Ws {
        r.put_f(
            "wire_mb",
            "bytes received on the sockets (MB)",
            wire_bytes.load(Ordering::Relaxed) as f64 / 1e6,
            2,
        );
    }
    r.put(
        "subscriber_errors",
        "subscribers that failed",
        errors as u64,
    );
    r.put(
        "first_error",
        "first error",
        first_error.or(stats.first_error),
    );
    r.put_f("elapsed_s", "elapsed (s)", elapsed, 2);
    cpu.finish(&mut r);
    r.print(c.json);
    Ok(())
}
