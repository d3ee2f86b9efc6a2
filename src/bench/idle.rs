//! `bench idle`: hold N idle subscriptions open and report what they cost the server in
//! resident memory (and, optionally, in CPU while events of other topics are published).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::procfs::{CpuMeter, Memory};
use super::publish::{publish_at_rate, RatePlan};
use super::report::Report;
use super::target::{Encoding, PublishTransport, Target, Transport, UrlTemplate, Via};
use super::wire::{open_ws, SseStream, Ws, CONNECT_TIMEOUT};
use super::{fail, parse_duration, run_topic, Common, Error, MAX_CONNECTIONS, MAX_RATE};

/// Flags of `bench idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Idle subscriptions to open.
    #[arg(long, short = 'n', default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub subscribers: u64,
    /// How the subscriptions receive.
    #[command(flatten)]
    pub via: Via,
    /// How long to hold them open before reading the server's memory (at most 600 s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Topics the subscriptions spread over (bench/idle-…/<i mod topics>).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub topics: u64,
    /// Then, while they wait, publish this many events/s to a topic none of them follows and
    /// report the server's CPU per event (needs --pid; 0: skip).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_RATE))]
    pub other_rate: u64,
    /// How long to publish with --other-rate (at most 600 s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub other_duration: Duration,
    /// Where the server is, what it is, and how to report.
    #[command(flatten)]
    pub common: Common,
}

/// One idle subscription, kept open by holding it.
enum Held {
    Sse(#[allow(dead_code)] SseStream),
    Ws(#[allow(dead_code)] Box<Ws>),
    Poll(#[allow(dead_code)] TcpStream),
}

/// Opens one idle subscription of `topic`: an SSE stream or WebSocket once established, or a
/// long-poll request sent (tidewire: `timeout=55`, the longest it holds by default).
async fn hold_one(
    c: &Common,
    url: &UrlTemplate,
    topic: &str,
    transport: Transport,
    encoding: Encoding,
) -> Result<Held, Error> {
    let token = c.token.as_deref();
    let path = url.path(topic);
    Ok(match transport {
        Transport::Sse => Held::Sse(SseStream::open(url.authority(), &path, token, false).await?),
        Transport::Ws => {
            let proto = (c.target == Target::Tidewire).then(|| encoding.subprotocol());
            let read = Arc::new(AtomicU64::new(0));
            Held::Ws(Box::new(
                open_ws(url.authority(), &path, proto, token, read, true).await?,
            ))
        }
        Transport::Poll => {
            let path = match c.target {
                Target::Tidewire => {
                    let sep = if path.contains('?') { '&' } else { '?' };
                    format!("{path}{sep}timeout=55")
                }
                Target::Nchan => path,
            };
            let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(url.authority()))
                .await
                .map_err(|_| fail("connect timed out"))??;
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n",
                url.authority()
            );
            s.write_all(req.as_bytes()).await?;
            Held::Poll(s)
        }
    })
}

/// Runs `bench idle`.
pub(crate) async fn run(a: IdleArgs) -> Result<(), Error> {
    let c = &a.common;
    a.via.check(c)?;
    if a.other_rate > 0 && c.pids.is_empty() {
        return Err(fail(
            "--other-rate measures the server's CPU: give its --pid",
        ));
    }
    let url = c.subscribe_url(a.via.transport)?;
    let base = run_topic("idle");
    let cpu = CpuMeter::start(&c.pids)?;
    let before = if c.pids.is_empty() {
        None
    } else {
        Some(Memory::of(&c.pids)?)
    };
    let opening = Instant::now();
    let held: Vec<Result<Held, Error>> = futures_util::stream::iter(0..a.subscribers)
        .map(|i| {
            let topic = format!("{base}/{}", i % a.topics);
            let url = &url;
            async move { hold_one(c, url, &topic, a.via.transport, a.via.encoding).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let held = held.into_iter().collect::<Result<Vec<Held>, Error>>()?;
    let open_secs = opening.elapsed().as_secs_f64();
    tokio::time::sleep(a.hold).await;
    let after = if c.pids.is_empty() {
        None
    } else {
        Some(Memory::of(&c.pids)?)
    };

    let n = a.subscribers as f64;
    let mut r = Report::new("idle");
    r.put("target", "target", c.target.name());
    a.via.report(&mut r);
    r.put("subscribers", "idle subscriptions", a.subscribers);
    r.put("topics", "topics", a.topics);
    r.put_f("open_s", "time to open them (s)", open_secs, 2);
    r.put_f(
        "hold_s",
        "held before measuring (s)",
        a.hold.as_secs_f64(),
        1,
    );
    match (before, after) {
        (Some(b), Some(f)) => {
            r.put(
                "processes",
                "server processes measured",
                c.pids.len() as u64,
            );
            r.put("rss_before_kib", "server RSS before (KiB)", b.rss_kib);
            r.put("rss_after_kib", "server RSS after (KiB)", f.rss_kib);
            r.put_f(
                "rss_per_conn_bytes",
                "server RSS growth per subscription (bytes)",
                f.rss_kib.saturating_sub(b.rss_kib) as f64 * 1024.0 / n,
                0,
            );
            if let (Some(pb), Some(pf)) = (b.pss_kib, f.pss_kib) {
                r.put_f(
                    "pss_per_conn_bytes",
                    "server PSS growth per subscription (bytes)",
                    pf.saturating_sub(pb) as f64 * 1024.0 / n,
                    0,
                );
            }
        }
        _ => r.put(
            "rss_per_conn_bytes",
            "server RSS growth per subscription (bytes)",
            "not measured: give the server's --pid",
        ),
    }

    if a.other_rate > 0 {
        let pub_url = c.publish_url(PublishTransport::Http)?;
        let other = run_topic("idle-other");
        let total = ((a.other_rate as f64) * a.other_duration.as_secs_f64())
            .round()
            .max(1.0) as u64;
        let meter = CpuMeter::start(&c.pids)?;
        let plan = RatePlan {
            url: &pub_url,
            topic: &other,
            rate: a.other_rate,
            total,
            size: 256,
            publishers: 4,
        };
        let stats = publish_at_rate(c, plan, Arc::new(AtomicU64::new(0))).await?;
        let server = meter.server_secs().unwrap_or(0.0);
        r.put(
            "other_published",
            "events published to another topic",
            stats.published,
        );
        r.put_f("other_server_cpu_s", "server CPU meanwhile (s)", server, 2);
        r.put_f(
            "other_server_cpu_ms_per_event",
            "server CPU per such event (ms)",
            server * 1000.0 / stats.published.max(1) as f64,
            3,
        );
    }
    cpu.finish(&mut r);
    drop(held);
    r.print(c.json);
    Ok(())
}
