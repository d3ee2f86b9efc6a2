//! `bench publish`: N connections publishing as fast as the server acknowledges, and the
//! fixed-rate publisher the other modes use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::payload::{self, Body, Rng, MIN_SIZE};
use super::procfs::CpuMeter;
use super::report::{Latencies, Progress, Report};
use super::target::{Format, PublishTransport, Target, UrlTemplate};
use super::wire::{open_ws, HttpConn, Ws};
use super::{fail, now_us, parse_duration, Common, Error, MAX_CONNECTIONS, MAX_EVENTS};

/// Flags of `bench publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Connections (or sockets), each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    pub connections: u64,
    /// Bytes of each event's data, `{"ts":<unix µs>,"pad":"<hex>"}`: the bytes subscribers
    /// receive, the same for every target (tidewire's envelope adds `{"data":…}` around it).
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(MIN_SIZE..=1 << 20))]
    pub size: u64,
    /// Events per request (tidewire only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Body format (tidewire only; over --transport ws: json or msgpack frames).
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Gzip each request body (tidewire only, HTTP only).
    #[arg(long)]
    pub gzip: bool,
    /// How long to publish (at most 600 s): 10, 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// Stop after this many events (in whole requests) if --duration has not run out first.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_EVENTS))]
    pub events: Option<u64>,
    /// Topics the connections spread over: connection i publishes to bench/p<i mod topics>.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub topics: u64,
    /// Publish with HTTP POSTs, or with publish frames over WebSockets (tidewire: acked
    /// `{"op":"publish"}`; Nchan: a text frame to its publisher location).
    #[arg(long, value_enum, default_value_t = PublishTransport::Http)]
    pub transport: PublishTransport,
    /// Where the server is, what it is, and how to report.
    #[command(flatten)]
    pub common: Common,
}

/// Counters shared by the publishing tasks.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: impl FnOnce() -> String) {
        if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
            if let Ok(mut f) = self.first_error.lock() {
                *f = Some(what());
            }
        }
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|f| f.clone())
    }
}

/// Whether `status` acknowledges a publish: tidewire 201; Nchan 201 (delivered to
/// subscribers) or 202 (queued, none waiting).
fn acknowledged(target: Target, status: u16) -> bool {
    match target {
        Target::Tidewire => status == 201,
        Target::Nchan => status == 201 || status == 202,
    }
}

/// What one connection sends: a fresh body per request, or one of a pool built beforehand
/// (batches, gzip and MessagePack, so the tool's CPU goes to load rather than encoding).
#[derive(Clone)]
enum Bodies {
    Fresh { target: Target, size: usize },
    Pool(Arc<Vec<Body>>),
}

impl Bodies {
    fn next(&self, i: u64, scratch: &mut Vec<u8>, rng: &mut Rng) -> Body {
        match self {
            Bodies::Pool(pool) => pool[(i % pool.len() as u64) as usize].clone(),
            Bodies::Fresh { target, size } => {
                scratch.clear();
                let mut data = Vec::with_capacity(*size);
                payload::event_data(&mut data, *size, now_us(), rng);
                match target {
                    Target::Tidewire => payload::envelope(scratch, &data),
                    Target::Nchan => scratch.extend_from_slice(&data),
                }
                Body {
                    bytes: Bytes::copy_from_slice(scratch),
                    content_type: "application/json",
                    content_encoding: None,
                }
            }
        }
    }
}

/// Runs `bench publish`.
pub(crate) async fn run(a: PublishArgs) -> Result<(), Error> {
    let c = &a.common;
    c.tidewire_only(a.batch > 1, "--batch")?;
    c.tidewire_only(a.format != Format::Json, "--format")?;
    c.tidewire_only(a.gzip, "--gzip")?;
    if a.transport == PublishTransport::Ws && (a.batch > 1 || a.gzip || a.format == Format::Ndjson)
    {
        return Err(fail(
            "over --transport ws each publish frame holds one event: no --batch, --gzip \
             or --format ndjson",
        ));
    }
    let url = c.publish_url(a.transport)?;
    let size = a.size as usize;
    let bodies = if a.batch > 1 || a.gzip || a.format == Format::Msgpack {
        let mut rng = Rng::new(now_us());
        let mut pool = Vec::new();
        for _ in 0..16 {
            let datas: Vec<Vec<u8>> = (0..a.batch)
                .map(|_| {
                    let mut d = Vec::with_capacity(size);
                    payload::event_data(&mut d, size, now_us(), &mut rng);
                    d
                })
                .collect();
            pool.push(payload::tidewire_body(&datas, a.format, a.gzip)?);
        }
        Bodies::Pool(Arc::new(pool))
    } else {
        Bodies::Fresh {
            target: c.target,
            size,
        }
    };
    let topic = |i: u64| format!("bench/p{}", i % a.topics);

    // Every connection is open before the clock starts.
    enum Conn {
        Http(HttpConn),
        Ws(Box<Ws>),
    }
    let wire = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(a.connections as usize);
    for i in 0..a.connections {
        conns.push(match a.transport {
            PublishTransport::Http => {
                Conn::Http(HttpConn::open(url.authority(), c.token.as_deref()).await?)
            }
            PublishTransport::Ws => {
                let proto = match (c.target, a.format) {
                    (Target::Nchan, _) => None,
                    (Target::Tidewire, Format::Msgpack) => Some("tidewire.v1.msgpack"),
                    (Target::Tidewire, _) => Some("tidewire.v1.json"),
                };
                let path = url.path(&topic(i));
                let ws = open_ws(
                    url.authority(),
                    &path,
                    proto,
                    c.token.as_deref(),
                    wire.clone(),
                    false,
                )
                .await?;
                Conn::Ws(Box::new(ws))
            }
        });
    }

    let counters = Arc::new(Counters::default());
    let latencies = Latencies::new();
    // Events left to send when --events is given.
    let budget = a.events.map(|n| Arc::new(AtomicU64::new(n)));
    let cpu = CpuMeter::start(&c.pids)?;
    let started = Instant::now();
    let deadline = started + a.duration;
    let progress = {
        let counters = counters.clone();
        Progress::start(Progress::wanted(a.duration), "publish", move || {
            format!(
                "{} requests, {} events acknowledged, {} errors",
                counters.requests.load(Ordering::Relaxed),
                counters.events.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed)
            )
        })
    };
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        let i = i as u64;
        let counters = counters.clone();
        let mut rec = latencies.recorder();
        let budget = budget.clone();
        let bodies = bodies.clone();
        let url = url.clone();
        let token = c.token.clone();
        let (target, format, batch) = (c.target, a.format, a.batch);
        let path = url.path(&topic(i));
        let topic = topic(i);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(now_us() ^ (i << 32));
            let mut scratch = Vec::new();
            let claim = || match &budget {
                None => true,
                Some(b) => b
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        left.checked_sub(batch.min(left).max(1))
                    })
                    .is_ok(),
            };
            let mut seq = i;
            match conn {
                Conn::Http(mut conn) => {
                    while Instant::now() < deadline && claim() {
                        let body = bodies.next(seq, &mut scratch, &mut rng);
                        seq += 1;
                        let len = body.bytes.len() as u64;
                        let t0 = Instant::now();
                        match conn
                            .post(&path, body.content_type, body.content_encoding, body.bytes)
                            .await
                        {
                            Ok(st) if acknowledged(target, st) => {
                                rec.record(t0.elapsed().as_micros() as u64);
                                counters.requests.fetch_add(1, Ordering::Relaxed);
                                counters.events.fetch_add(batch, Ordering::Relaxed);
                                counters.bytes.fetch_add(len, Ordering::Relaxed);
                            }
                            Ok(st) => counters.error(|| format!("server answered {st}")),
                            Err(e) => {
                                counters.error(|| e.to_string());
                                match HttpConn::open(url.authority(), token.as_deref()).await {
                                    Ok(c) => conn = c,
                                    Err(_) => return,
                                }
                            }
                        }
                    }
                }
                Conn::Ws(mut ws) => {
                    while Instant::now() < deadline && claim() {
                        let mut data = Vec::with_capacity(size);
                        payload::event_data(&mut data, size, now_us(), &mut rng);
                        seq += 1;
                        let msg = match ws_publish_frame(target, format, &topic, &data, seq) {
                            Ok(m) => m,
                            Err(e) => return counters.error(|| e.to_string()),
                        };
                        let len = msg.len() as u64;
                        let t0 = Instant::now();
                        if let Err(e) = ws.send(msg).await {
                            return counters.error(|| format!("WebSocket send: {e}"));
                        }
                        match ws_answer(&mut ws, target).await {
                            Ok(true) => {
                                rec.record(t0.elapsed().as_micros() as u64);
                                counters.requests.fetch_add(1, Ordering::Relaxed);
                                counters.events.fetch_add(1, Ordering::Relaxed);
                                counters.bytes.fetch_add(len, Ordering::Relaxed);
                            }
                            Ok(false) => counters.error(|| "publish refused (error frame)".into()),
                            Err(e) => return counters.error(|| e.to_string()),
                        }
                    }
                    let _ = Ws::close(&mut ws, None).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    drop(progress);

    let requests = counters.requests.load(Ordering::Relaxed);
    let events = counters.events.load(Ordering::Relaxed);
    let mut r = Report::new("publish");
    r.put("target", "target", c.target.name());
    r.put("transport", "transport", a.transport.name());
    r.put("connections", "connections", a.connections);
    r.put("size", "event data size (bytes)", a.size);
    r.put("batch", "events per request", a.batch);
    r.put("format", "format", a.format.name());
    r.put("gzip", "gzip", a.gzip);
    r.put("topics", "topics", a.topics);
    r.put_f("elapsed_s", "elapsed (s)", elapsed, 2);
    r.put("requests", "requests acknowledged", requests);
    r.put("events", "events acknowledged", events);
    r.put_f("req_per_s", "requests/s", requests as f64 / elapsed, 0);
    r.put_f("events_per_s", "events/s", events as f64 / elapsed, 0);
    r.put_f(
        "mb_per_s",
        "request bodies (MB/s)",
        counters.bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        2,
    );
    latencies.with(|h| r.put_latency(h, "request"));
    r.put("errors", "errors", counters.errors.load(Ordering::Relaxed));
    r.put("first_error", "first error", counters.first_error());
    cpu.finish(&mut r);
    r.print(c.json);
    Ok(())
}

/// A publish frame for `topic` carrying `data`: tidewire's `{"op":"publish",…}` (JSON text or
/// MessagePack binary), or for Nchan the raw data as a text frame.
fn ws_publish_frame(
    target: Target,
    format: Format,
    topic: &str,
    data: &[u8],
    seq: u64,
) -> Result<Message, Error> {
    Ok(match (target, format) {
        (Target::Nchan, _) => Message::text(String::from_utf8(data.to_vec())?),
        (Target::Tidewire, Format::Msgpack) => {
            let v: serde_json::Value = serde_json::from_slice(data)?;
            let op = serde_json::json!({"op": "publish", "topic": topic, "data": v, "ref": seq});
            Message::binary(rmp_serde::to_vec_named(&op)?)
        }
        (Target::Tidewire, _) => {
            let mut s = String::with_capacity(data.len() + topic.len() + 64);
            s.push_str("{\"op\":\"publish\",\"topic\":");
            s.push_str(&serde_json::to_string(topic)?);
            s.push_str(",\"data\":");
            s.push_str(std::str::from_utf8(data)?);
            s.push_str(&format!(",\"ref\":{seq}}}"));
            Message::text(s)
        }
    })
}

/// Waits (at most 10 s) for the answer to one publish frame: tidewire's ack (true) or error
/// frame (false); for Nchan, any text frame (its channel info).
async fn ws_answer(ws: &mut Ws, target: Target) -> Result<bool, Error> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| fail("no answer to a WebSocket publish within 10 s"))?
            .ok_or_else(|| fail("WebSocket closed"))??;
        let op = match (&msg, target) {
            (Message::Text(_), Target::Nchan) => return Ok(true),
            (Message::Text(t), Target::Tidewire) => {
                serde_json::from_slice::<serde_json::Value>(t.as_bytes())?
            }
            (Message::Binary(b), Target::Tidewire) => rmp_serde::from_slice(b)?,
            (Message::Close(_), _) => return Err(fail("WebSocket closed by the server")),
            _ => continue,
        };
        match op.get("op").and_then(|o| o.as_str()) {
            Some("ack") => return Ok(true),
            Some("error") => return Ok(false),
            _ => continue,
        }
    }
}

/// What a fixed-rate publisher achieved.
pub(crate) struct RateStats {
    /// Events acknowledged.
    pub(crate) published: u64,
    /// Publishes refused or failed.
    pub(crate) errors: u64,
    /// The first failure, for the report.
    pub(crate) first_error: Option<String>,
    /// From the first due time to the last acknowledgement, seconds.
    pub(crate) secs: f64,
}

/// What a fixed-rate publisher is to do.
pub(crate) struct RatePlan<'a> {
    /// Where publishes go (HTTP).
    pub(crate) url: &'a UrlTemplate,
    /// The topic of every event.
    pub(crate) topic: &'a str,
    /// Events per second offered.
    pub(crate) rate: u64,
    /// Events in all.
    pub(crate) total: u64,
    /// Bytes of each event's data.
    pub(crate) size: usize,
    /// Connections sharing the events.
    pub(crate) publishers: u64,
}

/// Publishes `plan.total` events of `plan.size` bytes of data to `plan.topic` at `plan.rate`
/// per second from `plan.publishers` connections: event i is due at start + i/rate and carries
/// its send time as `ts` (one connection waiting for each durable 201 could not keep 1000
/// events/s). Counts acknowledgements into `published` as they come. Bounded: gives up 3 × the
/// planned time + 10 s after the start.
pub(crate) async fn publish_at_rate(
    common: &Common,
    plan: RatePlan<'_>,
    published: Arc<AtomicU64>,
) -> Result<RateStats, Error> {
    let RatePlan {
        url,
        topic,
        rate,
        total,
        size,
        publishers,
    } = plan;
    let rate = rate.max(1);
    let publishers = publishers.clamp(1, total.max(1));
    let mut conns = Vec::new();
    for _ in 0..publishers {
        conns.push(HttpConn::open(url.authority(), common.token.as_deref()).await?);
    }
    let planned =
        Duration::from_nanos((u128::from(total) * 1_000_000_000 / u128::from(rate)) as u64);
    let started = Instant::now();
    let deadline = started + planned * 3 + Duration::from_secs(10);
    let counters = Arc::new(Counters::default());
    let path = url.path(topic);
    let mut tasks = Vec::new();
    for (k, mut conn) in conns.into_iter().enumerate() {
        let k = k as u64;
        let counters = counters.clone();
        let published = published.clone();
        let path = path.clone();
        let target = common.target;
        let url = url.clone();
        let token = common.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(now_us() ^ (k << 40));
            let mut data = Vec::with_capacity(size);
            let mut body = Vec::with_capacity(size + 16);
            let mut i = k;
            let mut last_ack = started;
            while i < total && Instant::now() < deadline {
                let due = started
                    + Duration::from_nanos(
                        (u128::from(i) * 1_000_000_000 / u128::from(rate)) as u64,
                    );
                tokio::time::sleep_until(due.into()).await;
                data.clear();
                payload::event_data(&mut data, size, now_us(), &mut rng);
                body.clear();
                match target {
                    Target::Tidewire => payload::envelope(&mut body, &data),
                    Target::Nchan => body.extend_from_slice(&data),
                }
                match conn
                    .post(
                        &path,
                        "application/json",
                        None,
                        Bytes::copy_from_slice(&body),
                    )
                    .await
                {
                    Ok(st) if acknowledged(target, st) => {
                        published.fetch_add(1, Ordering::Relaxed);
                        last_ack = Instant::now();
                    }
                    Ok(st) => counters.error(|| format!("publish answered {st}")),
                    Err(e) => {
                        counters.error(|| format!("publish: {e}"));
                        match HttpConn::open(url.authority(), token.as_deref()).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
                i += publishers;
            }
            last_ack
        }));
    }
    let mut last = started;
    for t in tasks {
        if let Ok(l) = t.await {
            last = last.max(l);
        }
    }
    Ok(RateStats {
        published: published.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        first_error: counters.first_error(),
        secs: last.duration_since(started).as_secs_f64(),
    })
}
