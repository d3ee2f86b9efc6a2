//! A simple load generator for a running tidewire server (loopback by default).
//!
//! Run against a release server started separately, e.g.
//!
//! ```text
//! cargo run --release -- serve --data-dir /tmp/tw-bench &
//! cargo bench --bench load -- publish --conns 64 --size 256 --secs 10
//! cargo bench --bench load -- publish --conns 8 --batch 1000 --secs 10
//! cargo bench --bench load -- publish --conns 64 --size 256 --secs 10 --token "$(tidewire token ...)"
//! cargo bench --bench load -- fanout --subs 1000 --rate 100 --secs 10
//! cargo bench --bench load -- idle --subs 10000 --pid <server pid>
//! cargo bench --bench load -- resume --events 100000 --noise 1000000
//! cargo bench --bench load -- ws-fanout --subs 100 --rate 1000 --secs 10 --proto msgpack
//! cargo bench --bench load -- ws-publish --conns 64 --secs 10
//! cargo bench --bench load -- ws-replay --events 100000 --gzip
//! cargo bench --bench load -- ws-idle --subs 10000 --pid <server pid>
//! ```
//!
//! The `ws-*` modes speak `GET /v1/ws` with tokio-tungstenite's client (see benches/websocket.sh).
//!
//! Every run is bounded in time and count. Results print as one line of `key=value` pairs.
//! Without a subcommand (as under a plain `cargo bench`) it prints its usage and exits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: load <mode> [--addr 127.0.0.1:7700] [options]
  publish    --conns 64 --size 256 --batch 1 --secs 10 --topics 8 [--token JWT]
  fanout     --subs 1000 --rate 100 --secs 10 --size 256
  idle       --subs 10000 --pid PID [--hold 5]
  resume     --events 100000 [--noise 0]
  ws-fanout  --subs 100 --rate 1000 --secs 10 --proto json|msgpack [--size 256] [--publishers 16]
  ws-publish --conns 64 --secs 10 [--proto json|msgpack] [--topics 8]
  ws-replay  --events 100000 [--gzip] [--proto json|msgpack|both]
  ws-idle    --subs 10000 --pid PID [--hold 5] [--proto json|msgpack]
  poll-fanout --subs 1000 --rate 100 --secs 10 [--publishers 16]
  poll-idle  --subs 10000 --pid PID [--hold 5] [--other-rate 100 --other-secs 5]
  poll-gzip  --events 1000
  (fanout also takes --publish-addr, to publish directly while subscribing through a proxy)";

struct Args(Vec<String>);

impl Args {
    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

fn main() -> Result<(), Error> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.iter().find(|a| !a.starts_with("--")).cloned() else {
        println!("{USAGE}");
        return Ok(());
    };
    let args = Args(argv);
    let addr: String = args.get("addr", "127.0.0.1:7700".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd.as_str() {
            "publish" => publish(&addr, &args).await,
            "fanout" => fanout(&addr, &args).await,
            "idle" => idle(&addr, &args).await,
            "resume" => resume(&addr, &args).await,
            "ws-fanout" => ws_fanout(&addr, &args).await,
            "ws-publish" => ws_publish(&addr, &args).await,
            "ws-replay" => ws_replay(&addr, &args).await,
            "ws-idle" => ws_idle(&addr, &args).await,
            "poll-fanout" => poll_fanout(&addr, &args).await,
            "poll-idle" => poll_idle(&addr, &args).await,
            "poll-gzip" => poll_gzip(&addr, &args).await,
            _ => {
                println!("{USAGE}");
                Ok(())
            }
        }
    })
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A keep-alive HTTP/1.1 connection that POSTs bodies and returns the status.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
    /// Sent as `Authorization: Bearer <token>` on every POST when set.
    token: Option<String>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            sender,
            host: addr.to_string(),
            token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` on every POST from now on (when given one).
    fn bearer(mut self, token: &Option<String>) -> Conn {
        self.token = token.clone();
        self
    }

    async fn post(&mut self, path: &str, content_type: &str, body: Bytes) -> Result<u16, Error> {
        self.sender.ready().await?;
        let mut req = hyper::Request::post(path)
            .header("host", &self.host)
            .header("content-type", content_type);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }

    /// GETs `path` with extra headers; returns the status, the headers and the whole body.
    async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, hyper::HeaderMap, Bytes), Error> {
        self.sender.ready().await?;
        let mut req = hyper::Request::get(path).header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .sender
            .send_request(req.body(Full::new(Bytes::new()))?)
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, body))
    }
}

/// Waits (at most 10 s more) for every reader's publish-to-receive latencies, then stops
/// those still reading. Returns all latencies sorted, and how many readers got all `total`.
async fn collect_latencies(
    readers: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    total: u64,
    stop: &AtomicBool,
) -> (Vec<u64>, usize) {
    let grace = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    let mut complete = 0usize;
    for r in readers {
        let remaining = grace.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, r).await {
            Ok(Ok(lat)) => {
                if lat.len() as u64 == total {
                    complete += 1;
                }
                all.extend(lat);
            }
            _ => stop.store(true, Ordering::Relaxed),
        }
    }
    stop.store(true, Ordering::Relaxed);
    all.sort_unstable();
    (all, complete)
}

/// Publishes `total` events of `size` bytes to `topic` at `rate` per second from `publishers`
/// connections (event i is due at start + i/rate: one connection waiting for each durable 201
/// could not keep 1000 events/s). Returns how many were acknowledged. Bounded in time.
async fn publish_at_rate(
    addr: &str,
    topic: &str,
    rate: u64,
    total: u64,
    size: usize,
    publishers: u64,
) -> Result<u64, Error> {
    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(total / rate.max(1) * 3 + 10);
    let mut pubs = Vec::new();
    for k in 0..publishers {
        let mut conn = Conn::open(addr).await?;
        let path = format!("/v1/topics/{topic}/events");
        pubs.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut i = k;
            while i < total && Instant::now() < deadline {
                tokio::time::sleep_until((started + interval * i as u32).into()).await;
                if let Ok(201) = conn
                    .post(&path, "application/json", envelope(size).into())
                    .await
                {
                    ok += 1;
                }
                i += publishers;
            }
            ok
        }));
    }
    let mut published = 0u64;
    for p in pubs {
        published += p.await?;
    }
    Ok(published)
}

/// A JSON envelope whose whole body is `size` bytes, carrying the send time in `ts`.
fn envelope(size: usize) -> String {
    let head = format!("{{\"data\":{{\"ts\":{},\"pad\":\"", now_us());
    let pad = size.saturating_sub(head.len() + 3).max(1);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

async fn publish(addr: &str, args: &Args) -> Result<(), Error> {
    let conns: usize = args.get("conns", 64);
    let size: usize = args.get("size", 256);
    let batch: usize = args.get("batch", 1);
    let secs: u64 = args.get("secs", 10);
    let topics: usize = args.get("topics", 8);
    let token: Option<String> = Some(args.get("token", String::new())).filter(|t| !t.is_empty());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let addr = addr.to_string();
        let errors = errors.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(mut conn) = Conn::open(&addr).await.map(|c| c.bearer(&token)) else {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            };
            let path = format!("/v1/topics/bench/p{}/events", c % topics);
            while Instant::now() < deadline {
                let body = if batch == 1 {
                    envelope(size)
                } else {
                    let one = envelope(size);
                    let mut s = String::with_capacity((one.len() + 1) * batch + 2);
                    s.push('[');
                    for i in 0..batch {
                        if i > 0 {
                            s.push(',');
                        }
                        s.push_str(&one);
                    }
                    s.push(']');
                    s
                };
                let started = Instant::now();
                match conn.post(&path, "application/json", body.into()).await {
                    Ok(201) => lat.push(started.elapsed().as_micros() as u64),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match Conn::open(&addr).await.map(|c| c.bearer(&token)) {
                            Ok(c) => conn = c,
                            Err(_) => return lat,
                        }
                    }
                }
            }
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let reqs = all.len() as f64;
    println!(
        "publish conns={conns} size={size} batch={batch} secs={elapsed:.1} requests={} req_per_s={:.0} events_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} errors={}{}",
        all.len(),
        reqs / elapsed,
        reqs * batch as f64 / elapsed,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors.load(Ordering::Relaxed),
        if token.is_some() { " auth=bearer" } else { "" }
    );
    Ok(())
}

/// Opens an SSE stream and returns the socket once the response head has been read.
async fn open_sse(addr: &str, query: &str, last_event_id: Option<u64>) -> Result<TcpStream, Error> {
    let mut s = TcpStream::connect(addr).await?;
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /v1/sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    // Read until the end of the head; the body (chunked) follows.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err("SSE connection closed before the response head".into());
        }
        head.push(byte[0]);
        if head.len() > 8192 {
            return Err("SSE response head too long".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("SSE refused: {}", String::from_utf8_lossy(&head)).into());
    }
    Ok(s)
}

/// Scans complete lines of SSE text for `"ts":N` in `data:` lines and calls `f(ts)`.
/// Chunked-encoding size lines never start with `data:`, so they are skipped naturally.
fn scan_lines(buf: &mut Vec<u8>, mut f: impl FnMut(&[u8])) {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        if line.starts_with(b"data:") {
            f(line);
        }
        start += nl + 1;
    }
    buf.drain(..start);
}

fn ts_of(line: &[u8]) -> Option<u64> {
    let key = b"\"ts\":";
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = line[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn fanout(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 1000);
    let rate: u64 = args.get("rate", 100);
    let secs: u64 = args.get("secs", 10);
    let size: usize = args.get("size", 256);
    let topic = format!("bench/fanout-{}", now_us());
    let publish_addr: String = args.get("publish-addr", addr.to_string());
    let total = rate * secs;
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..subs {
        let s = open_sse(addr, &format!("topic={topic}"), None).await?;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut s = s;
            let mut lat = Vec::with_capacity(total as usize);
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut chunk = vec![0u8; 16 * 1024];
            while (lat.len() as u64) < total && !stop.load(Ordering::Relaxed) {
                let n = match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => n,
                    Err(_) => continue,
                };
                let now = now_us();
                buf.extend_from_slice(&chunk[..n]);
                scan_lines(&mut buf, |line| {
                    if let Some(ts) = ts_of(line) {
                        lat.push(now.saturating_sub(ts));
                    }
                });
            }
            lat
        }));
    }
    let publishers: u64 = args.get("publishers", 4);
    let started = Instant::now();
    let published = publish_at_rate(&publish_addr, &topic, rate, total, size, publishers).await?;
    let (all, complete) = collect_latencies(readers, total, &stop).await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "fanout subs={subs} rate={rate} secs={elapsed:.1} published={published} delivered={} expected={} complete_subscribers={complete} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        all.len(),
        total * subs as u64,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> Result<u64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = f.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

fn rss_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS in /proc status".into())
}

async fn idle(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 10_000);
    let pid: u32 = args.get("pid", 0);
    let hold: u64 = args.get("hold", 5);
    if pid == 0 {
        return Err("idle needs --pid of the server".into());
    }
    let before = rss_kib(pid)?;
    let mut socks = Vec::with_capacity(subs);
    let started = Instant::now();
    for i in 0..subs {
        socks.push(open_sse(addr, &format!("topic=bench/idle/{}", i % 100), None).await?);
    }
    let opened = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = rss_kib(pid)?;
    println!(
        "idle subs={subs} open_secs={opened:.1} rss_before_kib={before} rss_after_kib={after} per_subscriber_bytes={:.0}",
        (after.saturating_sub(before) as f64 * 1024.0) / subs as f64
    );
    drop(socks);
    Ok(())
}

async fn resume(addr: &str, args: &Args) -> Result<(), Error> {
    let events: u64 = args.get("events", 100_000);
    let noise: u64 = args.get("noise", 0);
    let topic = format!("bench/resume-{}", now_us());
    let mut conn = Conn::open(addr).await?;
    let batch = 1000u64;
    let one = envelope(128);
    let body_of = |n: u64| {
        let mut s = String::from("[");
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&one);
        }
        s.push(']');
        Bytes::from(s)
    };
    // The topic's events go first, then the noise on other topics, so a reader that scanned
    // the whole log would pay for the noise.
    let mut sent = 0;
    while sent < events {
        let n = batch.min(events - sent);
        let st = conn
            .post(
                &format!("/v1/topics/{topic}/events"),
                "application/json",
                body_of(n),
            )
            .await?;
        if st != 201 {
            return Err(format!("publish failed: {st}").into());
        }
        sent += n;
    }
    let mut noisy = 0;
    while noisy < noise {
        let n = batch.min(noise - noisy);
        let path = format!("/v1/topics/bench/noise/{}/events", noisy % 16);
        conn.post(&path, "application/json", body_of(n)).await?;
        noisy += n;
    }
    let started = Instant::now();
    let mut s = open_sse(addr, &format!("topic={topic}&last_event_id=0"), None).await?;
    let mut got = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < events && Instant::now() < deadline {
        let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        scan_lines(&mut buf, |_| got += 1);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "resume events={events} noise={noise} received={got} secs={secs:.3} events_per_s={:.0}",
        got as f64 / secs
    );
    Ok(())
}

// ---- WebSocket modes (`GET /v1/ws`, tokio-tungstenite's client). ----

type Ws = tokio_tungstenite::WebSocketStream<Counted>;

/// A TCP stream that counts the bytes it reads: the server-to-client bytes on the wire,
/// WebSocket frame headers included.
struct Counted {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.read.fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Json,
    Msgpack,
}

impl Proto {
    fn parse(s: &str) -> Result<Proto, Error> {
        match s {
            "json" => Ok(Proto::Json),
            "msgpack" => Ok(Proto::Msgpack),
            other => Err(format!("unknown --proto {other:?}: json or msgpack").into()),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Proto::Json => "json",
            Proto::Msgpack => "msgpack",
        }
    }
    fn subprotocol(self) -> &'static str {
        match self {
            Proto::Json => "tidewire.v1.json",
            Proto::Msgpack => "tidewire.v1.msgpack",
        }
    }
}

/// Opens `ws://addr/v1/ws?query` with the subprotocol; `read` counts the bytes received.
async fn open_ws(addr: &str, query: &str, proto: Proto, read: Arc<AtomicU64>) -> Result<Ws, Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://{addr}/v1/ws?{query}").into_client_request()?;
    req.headers_mut()
        .insert("sec-websocket-protocol", proto.subprotocol().parse()?);
    let counted = Counted {
        inner: stream,
        read,
    };
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::client_async(req, counted),
    )
    .await??;
    Ok(ws)
}

#[derive(serde::Deserialize)]
struct TsEnvelope {
    data: TsData,
}

#[derive(serde::Deserialize)]
struct TsData {
    ts: u64,
}

/// The `ts` in an event frame's data (JSON text or MessagePack binary), if it has one.
fn ws_ts(proto: Proto, payload: &[u8]) -> Option<u64> {
    match proto {
        Proto::Json => ts_of(payload),
        Proto::Msgpack => rmp_serde::from_slice::<TsEnvelope>(payload)
            .ok()
            .map(|e| e.data.ts),
    }
}

async fn ws_fanout(addr: &str, args: &Args) -> Result<(), Error> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let subs: usize = args.get("subs", 100);
    let rate: u64 = args.get("rate", 1000);
    let secs: u64 = args.get("secs", 10);
    let size: usize = args.get("size", 256);
    let proto = Proto::parse(&args.get("proto", "json".to_string()))?;
    let topic = format!("bench/wsfanout-{}", now_us());
    let total = rate * secs;
    let stop = Arc::new(AtomicBool::new(false));
    let wire = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..subs {
        let mut ws = open_ws(addr, &format!("topic={topic}"), proto, wire.clone()).await?;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total as usize);
            while (lat.len() as u64) < total && !stop.load(Ordering::Relaxed) {
                let msg = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(_) => break,
                    Err(_) => continue,
                };
                let now = now_us();
                let ts = match &msg {
                    Message::Text(t) => ws_ts(proto, t.as_bytes()),
                    Message::Binary(b) => ws_ts(proto, b),
                    _ => None,
                };
                if let Some(ts) = ts {
                    lat.push(now.saturating_sub(ts));
                }
            }
            lat
        }));
    }
    // Publishers on their own connections, event i due at start + i/rate: one connection
    // waiting for each durable 201 could not keep 1000 events/s.
    let publishers: u64 = args.get("publishers", 16);
    let started = Instant::now();
    let published = publish_at_rate(addr, &topic, rate, total, size, publishers).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let (all, complete) = collect_latencies(readers, total, &stop).await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "ws-fanout proto={} subs={subs} rate={rate} publish_secs={publish_secs:.1} secs={elapsed:.1} published={published} delivered={} expected={} complete_sockets={complete} delivered_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        proto.name(),
        all.len(),
        total * subs as u64,
        all.len() as f64 / publish_secs,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

async fn ws_publish(addr: &str, args: &Args) -> Result<(), Error> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let conns: usize = args.get("conns", 64);
    let secs: u64 = args.get("secs", 10);
    let topics: usize = args.get("topics", 8);
    let proto = Proto::parse(&args.get("proto", "json".to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut ws = open_ws(addr, "", proto, Arc::new(AtomicU64::new(0))).await?;
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let topic = format!("bench/wsp{}", c % topics);
            let pad = "x".repeat(200);
            let mut i = 0u64;
            // One publish in flight per socket, like one HTTP request per connection.
            while Instant::now() < deadline {
                i += 1;
                let op = serde_json::json!({"op":"publish","topic":topic,
                    "data":{"ts":now_us(),"pad":pad},"ref":i});
                let msg = match proto {
                    Proto::Json => Message::text(op.to_string()),
                    Proto::Msgpack => match rmp_serde::to_vec_named(&op) {
                        Ok(b) => Message::binary(b),
                        Err(_) => return lat,
                    },
                };
                let started = Instant::now();
                if ws.send(msg).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return lat;
                }
                let answer = loop {
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            break serde_json::from_slice::<serde_json::Value>(t.as_bytes()).ok()
                        }
                        Ok(Some(Ok(Message::Binary(b)))) => {
                            break rmp_serde::from_slice::<serde_json::Value>(&b).ok()
                        }
                        Ok(Some(Ok(_))) => continue,
                        _ => break None,
                    }
                };
                match answer {
                    Some(a) if a["op"] == "ack" => lat.push(started.elapsed().as_micros() as u64),
                    Some(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return lat;
                    }
                }
            }
            let _ = ws.close(None).await;
            lat
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "ws-publish proto={} conns={conns} secs={elapsed:.1} acks={} acks_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} errors={}",
        proto.name(),
        all.len(),
        all.len() as f64 / elapsed,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// How many envelopes one data frame holds (a gzip batch holds an array of them).
fn frame_events(proto: Proto, payload: &[u8]) -> Result<u64, Error> {
    use serde::de::IgnoredAny;
    use std::io::Read as _;
    if payload.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(payload).read_to_end(&mut raw)?;
        let n = match proto {
            Proto::Json => serde_json::from_slice::<Vec<IgnoredAny>>(&raw)?.len(),
            Proto::Msgpack => rmp_serde::from_slice::<Vec<IgnoredAny>>(&raw)?.len(),
        };
        Ok(n as u64)
    } else {
        Ok(1)
    }
}

async fn ws_replay(addr: &str, args: &Args) -> Result<(), Error> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let events: u64 = args.get("events", 100_000);
    let gzip = args.0.iter().any(|a| a == "--gzip");
    let protos = match args.get("proto", "both".to_string()).as_str() {
        "both" => vec![Proto::Json, Proto::Msgpack],
        p => vec![Proto::parse(p)?],
    };
    let topic = format!("bench/wsreplay-{}", now_us());
    let mut conn = Conn::open(addr).await?;
    let batch = 1000u64;
    // Events that differ from each other like real readings (a counter, a sensor, a value and
    // 16 pseudo-random hex bytes), so gzip is not flattered by identical payloads.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sent = 0;
    while sent < events {
        let n = batch.min(events - sent);
        let evs: Vec<String> = (sent..sent + n)
            .map(|i| {
                let (a, b) = (rand(), rand());
                format!(
                    "{{\"data\":{{\"ts\":{},\"seq\":{i},\"sensor\":\"s-{}\",\"value\":{:.3},\"tag\":\"{a:016x}{b:016x}\"}}}}",
                    now_us(),
                    i % 50,
                    (a % 100_000) as f64 / 1000.0,
                )
            })
            .collect();
        let body = format!("[{}]", evs.join(","));
        let st = conn
            .post(
                &format!("/v1/topics/{topic}/events"),
                "application/json",
                body.into(),
            )
            .await?;
        if st != 201 {
            return Err(format!("publish failed: {st}").into());
        }
        sent += n;
    }
    for proto in protos {
        let wire = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let query = if gzip {
            format!("topic={topic}&since=0&batch=gzip")
        } else {
            format!("topic={topic}&since=0")
        };
        let mut ws = open_ws(addr, &query, proto, wire.clone()).await?;
        let (mut got, mut frames, mut payload) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(120);
        while got < events && Instant::now() < deadline {
            let msg = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => break,
            };
            let bytes: &[u8] = match &msg {
                Message::Text(t) => t.as_bytes(),
                Message::Binary(b) => b,
                _ => continue,
            };
            frames += 1;
            payload += bytes.len() as u64;
            got += frame_events(proto, bytes)?;
        }
        let secs = started.elapsed().as_secs_f64();
        drop(ws);
        println!(
            "ws-replay proto={} batch={} events={events} received={got} frames={frames} secs={secs:.3} events_per_s={:.0} payload_bytes={payload} wire_bytes={}",
            proto.name(),
            if gzip { "gzip" } else { "none" },
            got as f64 / secs,
            wire.load(Ordering::Relaxed),
        );
    }
    Ok(())
}

async fn ws_idle(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 10_000);
    let pid: u32 = args.get("pid", 0);
    let hold: u64 = args.get("hold", 5);
    let proto = Proto::parse(&args.get("proto", "json".to_string()))?;
    if pid == 0 {
        return Err("ws-idle needs --pid of the server".into());
    }
    let before = rss_kib(pid)?;
    let mut socks = Vec::with_capacity(subs);
    let started = Instant::now();
    let wire = Arc::new(AtomicU64::new(0));
    for i in 0..subs {
        let q = format!("topic=bench/wsidle/{}", i % 100);
        socks.push(open_ws(addr, &q, proto, wire.clone()).await?);
    }
    let opened = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = rss_kib(pid)?;
    println!(
        "ws-idle proto={} subs={subs} open_secs={opened:.1} rss_before_kib={before} rss_after_kib={after} per_socket_bytes={:.0}",
        proto.name(),
        (after.saturating_sub(before) as f64 * 1024.0) / subs as f64
    );
    drop(socks);
    Ok(())
}

/// The events of a long-poll JSON body, its `next` cursor, and the `ts` each event carries.
fn poll_body(body: &[u8]) -> Result<(Vec<u64>, u64), Error> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let next = v["next"].as_u64().ok_or("poll body without next")?;
    let ts = v["events"]
        .as_array()
        .ok_or("poll body without events")?
        .iter()
        .filter_map(|e| e["data"]["ts"].as_u64())
        .collect();
    Ok((ts, next))
}

async fn poll_fanout(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 1000);
    let rate: u64 = args.get("rate", 100);
    let secs: u64 = args.get("secs", 10);
    let size: usize = args.get("size", 256);
    let publishers: u64 = args.get("publishers", 16);
    let topic = format!("bench/pollfanout-{}", now_us());
    let total = rate * secs;
    let polls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs * 3 + 20);
    let mut pollers = Vec::new();
    for _ in 0..subs {
        let mut conn = Conn::open(addr).await?;
        // Live only: the first (immediate) answer names the head to poll from.
        let (_, _, body) = conn
            .get(&format!("/v1/poll?topic={topic}&timeout=0"), &[])
            .await?;
        let (_, mut next) = poll_body(&body)?;
        let polls = polls.clone();
        let topic = topic.clone();
        pollers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total as usize);
            while (lat.len() as u64) < total && Instant::now() < deadline {
                let path = format!("/v1/poll?topic={topic}&since={next}&timeout=5&limit=1000");
                let Ok((200, _, body)) = conn.get(&path, &[]).await else {
                    break;
                };
                let now = now_us();
                polls.fetch_add(1, Ordering::Relaxed);
                let Ok((ts, n)) = poll_body(&body) else {
                    break;
                };
                lat.extend(ts.into_iter().map(|t| now.saturating_sub(t)));
                next = n;
            }
            lat
        }));
    }
    let started = Instant::now();
    let published = publish_at_rate(addr, &topic, rate, total, size, publishers).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    // Pollers stop by themselves (all received, or their deadline); nothing to interrupt.
    let (all, complete) = collect_latencies(pollers, total, &AtomicBool::new(false)).await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "poll-fanout subs={subs} rate={rate} publish_secs={publish_secs:.1} secs={elapsed:.1} published={published} delivered={} expected={} complete_pollers={complete} delivered_per_s={:.0} polls_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        all.len(),
        total * subs as u64,
        all.len() as f64 / publish_secs,
        polls.load(Ordering::Relaxed) as f64 / elapsed,
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    Ok(())
}

async fn poll_idle(addr: &str, args: &Args) -> Result<(), Error> {
    let subs: usize = args.get("subs", 10_000);
    let pid: u32 = args.get("pid", 0);
    let hold: u64 = args.get("hold", 5);
    if pid == 0 {
        return Err("poll-idle needs --pid of the server".into());
    }
    let before = rss_kib(pid)?;
    let mut socks = Vec::with_capacity(subs);
    let started = Instant::now();
    for i in 0..subs {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "GET /v1/poll?topic=bench/pollidle/{}&timeout=55 HTTP/1.1\r\nHost: {addr}\r\n\r\n",
            i % 100
        );
        s.write_all(req.as_bytes()).await?;
        socks.push(s);
    }
    let opened = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = rss_kib(pid)?;
    println!(
        "poll-idle pollers={subs} open_secs={opened:.1} rss_before_kib={before} rss_after_kib={after} per_poller_bytes={:.0}",
        (after.saturating_sub(before) as f64 * 1024.0) / subs as f64
    );
    // What the waiting pollers cost while events they do not want are published.
    let rate: u64 = args.get("other-rate", 0);
    if rate > 0 {
        let secs: u64 = args.get("other-secs", 5);
        let cpu_before = cpu_ticks(pid)?;
        let published =
            publish_at_rate(addr, "bench/pollidle-other", rate, rate * secs, 256, 4).await?;
        let cpu_after = cpu_ticks(pid)?;
        let ticks = cpu_after.saturating_sub(cpu_before) as f64;
        println!(
            "poll-idle-other pollers={subs} published={published} server_cpu_secs={:.2} server_cpu_ms_per_event={:.3}",
            ticks / 100.0,
            ticks * 10.0 / published.max(1) as f64
        );
    }
    drop(socks);
    Ok(())
}

async fn poll_gzip(addr: &str, args: &Args) -> Result<(), Error> {
    let events: usize = args.get("events", 1000);
    let topic = format!("bench/pollgzip-{}", now_us());
    // Typical telemetry: readings from a few sensors, values that vary.
    let batch: Vec<serde_json::Value> = (0..events)
        .map(|i| {
            serde_json::json!({"type": "reading", "data": {
                "sensor": format!("room-{}", i % 12),
                "t": 18.0 + (i % 70) as f64 / 10.0,
                "rh": 35 + (i * 7) % 30,
                "battery": 100 - (i / 40) % 100,
                "seq": i,
            }})
        })
        .collect();
    let mut conn = Conn::open(addr).await?;
    let st = conn
        .post(
            &format!("/v1/topics/{topic}/events"),
            "application/json",
            serde_json::to_vec(&batch)?.into(),
        )
        .await?;
    if st != 201 {
        return Err(format!("publish failed: {st}").into());
    }
    let path = format!("/v1/poll?topic={topic}&since=0&timeout=0&limit={events}");
    let (_, _, plain) = conn.get(&path, &[("accept-encoding", "identity")]).await?;
    let (_, h, gz) = conn.get(&path, &[("accept-encoding", "gzip")]).await?;
    let encoding = h
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    println!(
        "poll-gzip events={events} plain_bytes={} gzip_bytes={} content_encoding={encoding} ratio={:.2}",
        plain.len(),
        gz.len(),
        plain.len() as f64 / gz.len().max(1) as f64
    );
    Ok(())
}
