//! `GET /v1/ws`: the WebSocket transport, as the contract says.
//!
//! The handshake is checked and answered here (101 with `Sec-WebSocket-Accept` from
//! tungstenite's `derive_accept_key` and the negotiated subprotocol); the upgraded connection
//! is framed by tokio-tungstenite. Ops and frames are encoded by [`crate::ws_frame`].
//!
//! One socket is one task, which reads, delivers and writes:
//! - **Subscriptions**: the socket holds patterns, each with its own start (its `since`, or the
//!   head when it was added live), and one [`Subscription`] over their union. Whenever the set
//!   changes the subscription is re-opened from the last id sent, so overlapping patterns
//!   deliver an event once and ids on the socket stay strictly increasing. A `subscribe` whose
//!   `since` is below what the socket already sent cannot be replayed in order: it is answered
//!   with a gap frame (`requested`: the since, `oldest`: last sent + 1) and continues from there.
//! - **Start options**: `start=latest` / `start_time=T` in the query, or `"start": "latest"` /
//!   `"start_time"` in a `subscribe` op, start the subscription with a snapshot (see
//!   [`Subscription`]); a cursor wins over both. In an op they apply to a socket that holds no
//!   pattern yet (else an `invalid_start` error frame): the snapshot's events come before
//!   anything else the socket sends, so ids stay strictly increasing. The start is read from
//!   the log before the socket reads its next message; when the log cannot serve it, an error
//!   frame says so and the patterns continue live.
//! - **Backpressure**: built frames wait in a queue of at most `ws_send_queue` event frames
//!   while the socket writes them. When it is full the socket stops taking deliveries; the
//!   subscription falls behind the hub ring and later reads from the log, so memory stays
//!   bounded and nothing is skipped. Writing never stops reading: pongs, publishes and acks
//!   go on while a write waits. A socket whose writes make no progress, or that answers
//!   nothing (not even protocol pings), for `ws_unresponsive_secs` is closed with 1008.
//! - **Publish**: decoded by the publish codec, stored through [`Publisher`]; the ack is sent
//!   only once the event is durable, in request order. Errors become error frames with `ref`.
//! - **Shutdown**: stop reading, send the acks of publishes in flight, then close with 1001.
//! - **Authorization** (when a key is configured): the upgrade needs a valid token (401
//!   before the 101) whose subscribe grants cover the query's patterns (403). Each later
//!   `subscribe` and `publish` op is checked against the socket's grants and refused with a
//!   `forbidden` error frame, the socket staying open. The socket is closed with 4001 "token
//!   expired" when its token expires, unless an `auth` op brought a fresh one first; the new
//!   token's grants replace the old ones, and subscriptions they no longer cover end (with a
//!   `forbidden` error frame).
//! - **Limits**: the handshake is refused with 403 `origin_not_allowed` for a browser origin
//!   that may not open a socket (`origin.rs`); a socket opened from an origin allowed only by
//!   `*` gets `origin_not_allowed` error frames for publish ops. Each `publish` op takes a cell
//!   of its publisher's rate bucket (`rate_limited` error frame when empty); a socket holds at
//!   most `ws_max_subscriptions` patterns (`too_many_subscriptions`), each op at most
//!   `max_patterns` (`too_many_patterns`). Refusals leave the socket open.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::origin::{self, OriginTrust};
use super::start::StartOptions;
use super::{full, query_pairs, ApiError, AppState, Body};
use crate::auth::{Access, AuthError};
use crate::codec::Limits;
use crate::envelope::{EventId, SharedEvent};
use crate::limits::{ClientAddr, RateKey};
use crate::log::EventLog;
use crate::metrics::{ReasonLabel, WsErrorLabel, WsLabel};
use crate::publish::Publisher;
use crate::subscription::Start;
use crate::subscription::{Delivery, Subscription};
use crate::topic::{parse_cursor, Pattern, PatternSet};
use crate::ws_frame::{self, ClientOp, Encoding, FrameError, Ref, ServerFrame};

/// Most events coalesced into one burst (one gzip frame with `batch=gzip`).
const MAX_BURST_EVENTS: usize = 1000;
/// Most envelope bytes coalesced into one burst.
const MAX_BURST_BYTES: usize = 256 * 1024;
/// Publishes of one socket waiting for their ack; beyond this the socket is not read.
const MAX_PENDING_PUBLISHES: usize = 256;
/// Answers (acks, errors, pongs) waiting for the send queue; beyond this the socket is not read.
const MAX_CONTROL: usize = 256;
/// How long shutdown waits for the acks of publishes in flight.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);
/// How long a close frame may take to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Close code when the socket's token expires (application range 4000-4999).
pub const TOKEN_EXPIRED: u16 = 4001;

type Ws = WebSocketStream<TokioIo<Upgraded>>;
type PendingPublish = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;

/// What the request asked for, validated before the upgrade.
struct Opening {
    enc: Encoding,
    patterns: Vec<Pattern>,
    start: Start,
    batch: bool,
    /// What the handshake's `Origin` allows (a `*`-only origin may not publish).
    origin: OriginTrust,
    /// The peer address (for publish rate limits of tokens without `sub`).
    client: Option<IpAddr>,
}

fn header_has_token(req_headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    req_headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

fn opening<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(Opening, Option<&'static str>), ApiError> {
    let h = req.headers();
    if !header_has_token(h, header::UPGRADE, "websocket")
        || !header_has_token(h, header::CONNECTION, "upgrade")
    {
        let mut e = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this route is a WebSocket: send an HTTP/1.1 upgrade (Upgrade: websocket)",
        );
        e.header = Some((header::UPGRADE, HeaderValue::from_static("websocket")));
        return Err(e);
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut e = ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_websocket_version",
            "only WebSocket version 13 is supported",
        );
        e.header = Some((
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
        return Err(e);
    }
    if h.get(header::SEC_WEBSOCKET_KEY).is_none() {
        return Err(ApiError::bad_request("Sec-WebSocket-Key is missing"));
    }
    let offered = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(",");
    let negotiated = Encoding::negotiate((!offered.is_empty()).then_some(offered.as_str()))
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "unsupported_subprotocol", m))?;
    let cfg = &state.config;
    let mut patterns = Vec::new();
    let mut since = None;
    let mut start = StartOptions::default();
    let mut batch = false;
    for (k, v) in query_pairs(req.uri().query()) {
        match &*k {
            "topic" => patterns.push(
                Pattern::parse_with_limit(&v, cfg.max_topic_len)
                    .map_err(|e| ApiError::invalid_pattern(&v, e))?,
            ),
            "since" if !v.is_empty() => {
                since = Some(EventId(
                    parse_cursor(&v).ok_or_else(|| ApiError::invalid_cursor(&v))?,
                ))
            }
            "start" => start.set_start(&v)?,
            "start_time" => start.set_time(&v)?,
            "batch" => match &*v {
                "gzip" => batch = true,
                "" | "none" => batch = false,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown batch {other:?}: use batch=gzip"
                    )))
                }
            },
            _ => {}
        }
    }
    if patterns.len() > cfg.max_patterns {
        return Err(ApiError::too_many_patterns(cfg.max_patterns));
    }
    if patterns.len() > cfg.ws_max_subscriptions {
        return Err(ApiError::too_many_subscriptions(cfg.ws_max_subscriptions));
    }
    Ok((
        Opening {
            enc: negotiated.unwrap_or(Encoding::Json),
            patterns,
            start: start.start(since)?,
            batch,
            origin: OriginTrust::Absent,
            client: req.extensions().get::<ClientAddr>().map(|c| c.0),
        },
        negotiated.map(Encoding::subprotocol),
    ))
}

/// Answers the handshake with 101 and serves the socket on the upgraded connection, if
/// `access` covers the query's patterns.
pub async fn upgrade<B>(
    state: &Arc<AppState>,
    mut req: Request<B>,
    access: Access,
) -> Result<Response<Body>, ApiError> {
    // Cross-site WebSocket hijacking: a browser page on an origin not allowed is refused
    // before anything else (browsers always send `Origin` on the handshake).
    let trust = origin::check_websocket(&state.config, &req)?;
    let (mut opening, subprotocol) = opening(state, &req)?;
    opening.origin = trust;
    for p in &opening.patterns {
        access.check_subscribe(p)?;
    }
    let log = state.log().await?;
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let accept = HeaderValue::from_str(&key)
        .map_err(|_| ApiError::bad_request("Sec-WebSocket-Key is not valid"))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state = state.clone();
    // Counted from before the 101 goes out, so shutdown also waits for a socket whose
    // upgrade is still completing.
    let live = state.track_socket();
    tokio::spawn(async move {
        let _live = live;
        match on_upgrade.await {
            Ok(upgraded) => {
                let cfg = &state.config;
                let ws_config = WebSocketConfig::default()
                    // Small eager read buffer (tungstenite fills it with zeros, so all of it
                    // is resident): idle sockets must be cheap. Client frames are small; a
                    // bigger one is read into a buffer of its own size.
                    .read_buffer_size(1024)
                    .write_buffer_size(32 * 1024)
                    // Frames up to 4x the configured limit are read and refused with an error
                    // frame; anything larger is a protocol-level refusal (1009).
                    .max_message_size(Some(cfg.ws_max_frame_bytes.saturating_mul(4)))
                    .max_frame_size(Some(cfg.ws_max_frame_bytes.saturating_mul(4)));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config),
                )
                .await;
                serve(state, log, ws, opening, access).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok(resp)
}

/// Why a socket ends, and the close frame it gets (when one can still be sent).
enum End {
    /// The client closed or the connection dropped: nothing more to send.
    Gone,
    /// The server closes with this code and reason.
    Close(CloseCode, &'static str),
}

/// The subscription state of one socket.
struct Subs {
    log: Arc<dyn EventLog>,
    /// Patterns, each with the id after which its events are delivered.
    patterns: Vec<(Pattern, EventId)>,
    sub: Option<Subscription>,
    /// The id of the last event sent on this socket (ids only grow).
    sent: EventId,
}

impl Subs {
    /// Raises every pattern's start to what the current subscription has handed out, so a
    /// re-open continues from there (for patterns that began with a snapshot, whose start is
    /// 0, it is the only record of where they are).
    fn settle(&mut self) {
        if let Some(sub) = &self.sub {
            let handed_out = sub.resume_cursor();
            for (_, s) in &mut self.patterns {
                *s = (*s).max(handed_out);
            }
        }
    }

    fn reopen(&mut self, state: &AppState) {
        self.reopen_at(state, None)
    }

    /// Re-opens over the current patterns: from `start` when given (a snapshot start), else
    /// from the lowest pattern start (never below what was sent).
    fn reopen_at(&mut self, state: &AppState, start: Option<Start>) {
        let Some(set) = PatternSet::new(self.patterns.iter().map(|(p, _)| p.clone()).collect())
        else {
            self.sub = None;
            return;
        };
        let from = self
            .patterns
            .iter()
            .map(|(_, s)| *s)
            .min()
            .unwrap_or_default()
            .max(self.sent);
        self.sub = Some(Subscription::open_at(
            self.log.clone(),
            &state.hub,
            set,
            start.unwrap_or(Start::After(from)),
            state.config.replay_page,
            state.metrics.clone(),
        ));
    }

    /// Whether `e` is due on this socket: newer than anything sent, and newer than the start
    /// of a pattern it matches.
    fn wants(&self, e: &SharedEvent) -> bool {
        e.id > self.sent
            && self
                .patterns
                .iter()
                .any(|(p, start)| e.id > *start && p.matches(e.topic()))
    }
}

struct Socket {
    state: Arc<AppState>,
    enc: Encoding,
    batch: bool,
    subs: Subs,
    publisher: Publisher,
    limits: Limits,
    /// Frames built and not yet written.
    queued: Queues,
    /// Event frames queued before the socket stops taking deliveries (`ws_send_queue`).
    send_queue: usize,
    pending: FuturesOrdered<PendingPublish>,
    frames_in: prometheus_client::metrics::counter::Counter,
    bytes_in: prometheus_client::metrics::counter::Counter,
    delivered: prometheus_client::metrics::counter::Counter,
    /// What this socket may do: the grants of its latest token (or open).
    access: Access,
    /// When that token stops being accepted; `None` when it never does.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What the handshake's `Origin` allows.
    origin: OriginTrust,
    /// The peer address.
    client: Option<IpAddr>,
}

/// Sets the socket up, then returns the future that runs it. Not an `async fn`: its setup
/// (arguments, configuration, metric handles) would stay in the future for the socket's whole
/// life, and an idle socket must be cheap; the future holds only what the socket uses.
/// The frames a socket has built and not yet handed to its connection, with the counters of
/// what it sends.
struct Queues {
    /// Answers, errors and pings (at most [`MAX_CONTROL`]); they go before events.
    control: VecDeque<Message>,
    /// Event and gap frames, in id order.
    outbox: VecDeque<Message>,
    frames_out: prometheus_client::metrics::counter::Counter,
    bytes_out: prometheus_client::metrics::counter::Counter,
}

fn serve(
    state: Arc<AppState>,
    log: Arc<dyn EventLog>,
    ws: Ws,
    opening: Opening,
    access: Access,
) -> impl std::future::Future<Output = ()> + Send {
    let metrics = &state.metrics;
    let gauge = metrics.track_subscriber("ws");
    let cfg = &state.config;
    let enc = opening.enc;
    let label = |direction| WsLabel {
        direction,
        subprotocol: enc.subprotocol(),
    };
    let wsm = metrics.ws();
    // One statement each: a family's guard must be dropped before the next get_or_create.
    let frames_out = wsm.frames.get_or_create(&label("out")).clone();
    let bytes_out = wsm.bytes.get_or_create(&label("out")).clone();
    let frames_in = wsm.frames.get_or_create(&label("in")).clone();
    let bytes_in = wsm.bytes.get_or_create(&label("in")).clone();
    let snapshot = matches!(opening.start, Start::Latest | Start::Time(_));
    let start = match opening.start {
        Start::After(c) => c,
        Start::Live => log.head(),
        // The snapshot's events are below the head: the subscription's own start says where
        // they begin, and `settle` records where the patterns are once it has run.
        Start::Latest | Start::Time(_) => EventId(0),
    };
    let mut sock = Socket {
        enc,
        batch: opening.batch,
        subs: Subs {
            log: log.clone(),
            patterns: opening.patterns.into_iter().map(|p| (p, start)).collect(),
            sub: None,
            sent: EventId(0),
        },
        publisher: Publisher::new(log, metrics.clone()),
        limits: Limits {
            max_decompressed: cfg.ws_max_frame_bytes,
            max_events: 1,
            max_topic_len: cfg.max_topic_len,
        },
        queued: Queues {
            control: VecDeque::new(),
            outbox: VecDeque::new(),
            frames_out,
            bytes_out,
        },
        send_queue: cfg.ws_send_queue.max(1),
        pending: FuturesOrdered::new(),
        frames_in,
        bytes_in,
        delivered: metrics.delivered("ws"),
        state: state.clone(),
        expiry: access
            .deadline()
            .map(|at| Box::pin(tokio::time::sleep_until(at))),
        access,
        origin: opening.origin,
        client: opening.client,
    };
    let first = snapshot.then_some(opening.start);
    sock.subs.reopen_at(&state, first);

    let (sink, mut stream) = ws.split();
    let unresponsive = Duration::from_secs(cfg.ws_unresponsive_secs);
    let mut out = Outgoing {
        sink,
        unflushed: false,
        stall_limit: unresponsive,
        stall: None,
    };
    async move {
        let _gauge = gauge;
        let end = sock.run(&mut stream, &mut out, unresponsive).await;
        if let End::Close(code, reason) = end {
            tracing::debug!(code = u16::from(code), reason, "closing WebSocket");
            // Best effort: a socket that does not read may never take it.
            let close = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }));
            if matches!(timeout(CLOSE_WAIT, out.sink.send(close)).await, Ok(Ok(()))) {
                // The closing handshake: read (and drop) what the peer still sends until its
                // Close. Closing with unread data in the receive buffer makes the kernel reset
                // the connection, and a reset can destroy the frames still on their way to
                // the peer, our acks and Close among them.
                let _ = timeout(CLOSE_WAIT, async {
                    while let Some(Ok(_)) = stream.next().await {}
                })
                .await;
            }
        }
        let _ = timeout(CLOSE_WAIT, out.sink.close()).await;
    }
}

/// The writing half of a socket: frames go from the socket's queues into tungstenite's write
/// buffer and out, driven by the socket's own task (no writer task, no channel: one wake-up
/// per delivery).
struct Outgoing {
    sink: SplitSink<Ws, Message>,
    /// Frames were handed to the sink since its last flush.
    unflushed: bool,
    /// How long writes may make no progress before the socket is given up.
    stall_limit: Duration,
    /// Set while a write waits on the peer: when it fires, the peer is unresponsive.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why writing ended early.
enum WriteEnd {
    /// The connection failed.
    Failed(tungstenite::Error),
    /// No write progress for the stall limit: the peer does not read.
    Unresponsive,
}

impl Outgoing {
    /// True while there is something to write or to flush.
    fn busy(&self, queued: &Queues) -> bool {
        self.unflushed || !queued.control.is_empty() || !queued.outbox.is_empty()
    }

    /// Writes queued frames (control frames first) and flushes them. Ready once everything
    /// queued is written; pending while the peer is not taking more, until the stall limit.
    fn poll_write(
        &mut self,
        queued: &mut Queues,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteEnd>> {
        let mut progressed = false;
        let result = self.poll_write_inner(queued, &mut progressed, cx);
        if result.is_ready() || progressed {
            self.stall = None;
        }
        if result.is_pending() {
            let limit = self.stall_limit;
            let stall = self
                .stall
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            if stall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(WriteEnd::Unresponsive));
            }
        }
        result
    }

    fn poll_write_inner(
        &mut self,
        queued: &mut Queues,
        progressed: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteEnd>> {
        let mut sink = Pin::new(&mut self.sink);
        while !queued.control.is_empty() || !queued.outbox.is_empty() {
            ready!(sink.as_mut().poll_ready(cx)).map_err(WriteEnd::Failed)?;
            let msg = match queued.control.pop_front() {
                Some(m) => m,
                None => match queued.outbox.pop_front() {
                    Some(m) => m,
                    None => break,
                },
            };
            queued.frames_out.inc();
            queued.bytes_out.inc_by(msg.len() as u64);
            sink.as_mut().start_send(msg).map_err(WriteEnd::Failed)?;
            self.unflushed = true;
            *progressed = true;
        }
        if self.unflushed {
            ready!(sink.as_mut().poll_flush(cx)).map_err(WriteEnd::Failed)?;
            self.unflushed = false;
            *progressed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes everything queued, within [`CLOSE_WAIT`]; false when it could not.
    async fn drain(&mut self, queued: &mut Queues) -> bool {
        let write = std::future::poll_fn(|cx| self.poll_write(queued, cx));
        matches!(timeout(CLOSE_WAIT, write).await, Ok(Ok(())))
    }
}

impl Socket {
    async fn run(
        &mut self,
        stream: &mut SplitStream<Ws>,
        out: &mut Outgoing,
        unresponsive: Duration,
    ) -> End {
        let ping_every = Duration::from_secs(self.state.config.ws_ping_secs);
        let mut stop: watch::Receiver<bool> = self.state.stop_signal();
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let lagging = self.state.metrics.ws().lagging.clone();
        let mut is_lagging = false;
        loop {
            if *stop.borrow() {
                return Box::pin(self.shut_down(out)).await;
            }
            // A snapshot start reads the log before the next message can change the patterns.
            if let Some(sub) = self.subs.sub.as_mut().filter(|s| s.is_pending()) {
                if let Err(e) = sub.prepare().await {
                    Box::pin(self.start_failed(e)).await;
                }
            }
            let room = self.queued.outbox.len() < self.send_queue;
            if room == is_lagging {
                is_lagging = !room;
                if is_lagging {
                    lagging.inc();
                } else {
                    lagging.dec();
                }
            }
            let writing = out.busy(&self.queued);
            let can_read = self.queued.control.len() < MAX_CONTROL
                && self.pending.len() < MAX_PENDING_PUBLISHES;
            let queued = &mut self.queued;
            let end = tokio::select! {
                biased;
                // Set to true, or the server is gone: either way, stop.
                // Boxed (here and below): rare paths stay out of every socket's state.
                _ = stop.changed() => Some(Box::pin(self.shut_down(out)).await),
                // Before any delivery: no event is sent on an expired token.
                _ = until(&mut self.expiry) => Some(Box::pin(self.expire(out)).await),
                written = std::future::poll_fn(|cx| out.poll_write(queued, cx)), if writing => {
                    match written {
                        Ok(()) => None,
                        Err(WriteEnd::Failed(e)) => {
                            tracing::debug!(error = %e, "WebSocket write failed");
                            Some(End::Gone)
                        }
                        Err(WriteEnd::Unresponsive) => {
                            self.state.metrics.ws().unresponsive_closed.inc();
                            tracing::debug!("WebSocket makes no write progress; closing it");
                            Some(End::Close(CloseCode::Policy, "unresponsive: did not read"))
                        }
                    }
                }
                Some(answer) = self.pending.next(), if !self.pending.is_empty() => {
                    self.answer(answer);
                    None
                }
                msg = stream.next(), if can_read => {
                    heard = Instant::now();
                    self.on_message(msg)
                }
                d = next_delivery(&mut self.subs.sub), if room && self.subs.sub.is_some() => {
                    match d {
                        Ok(d) => {
                            self.burst(d);
                            None
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "WebSocket subscription ends");
                            Some(End::Close(CloseCode::Away, "server shutting down"))
                        }
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() >= unresponsive {
                        self.state.metrics.ws().unresponsive_closed.inc();
                        Some(End::Close(CloseCode::Policy, "unresponsive: no pong"))
                    } else {
                        if self.queued.control.len() < MAX_CONTROL {
                            self.queued.control.push_back(Message::Ping(Bytes::new()));
                        }
                        None
                    }
                }
            };
            if let Some(end) = end {
                if is_lagging {
                    lagging.dec();
                }
                return end;
            }
        }
    }

    /// Graceful shutdown: no more reading; answer publishes in flight, write what is queued,
    /// then close with 1001.
    async fn shut_down(&mut self, out: &mut Outgoing) -> End {
        let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
        while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            self.answer(answer);
        }
        if !out.drain(&mut self.queued).await {
            return End::Gone;
        }
        End::Close(CloseCode::Away, "server shutting down")
    }

    fn frame(&self, bytes: Bytes) -> Message {
        match self.enc {
            Encoding::Json => match Utf8Bytes::try_from(bytes) {
                Ok(text) => Message::Text(text),
                // Our JSON is always UTF-8; never send a text frame that is not.
                Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
            },
            Encoding::Msgpack => Message::Binary(bytes),
        }
    }

    fn answer(&mut self, frame: ServerFrame) {
        match &frame {
            ServerFrame::Error { code, .. } => {
                self.state
                    .metrics
                    .ws()
                    .errors
                    .get_or_create(&WsErrorLabel { code })
                    .inc();
            }
            ServerFrame::Ack { id: Some(_), .. } => {
                self.state.metrics.ws().acks.inc();
            }
            _ => {}
        }
        let bytes = ws_frame::encode_server(self.enc, &frame);
        let msg = self.frame(bytes);
        self.queued.control.push_back(msg);
    }

    fn error(&mut self, e: FrameError) {
        self.answer(e.into());
    }

    /// Turns one delivery and whatever else is ready into frames in `outbox`: at most the
    /// room left in the send queue, one frame per event (a batch socket's burst is one frame).
    fn burst(&mut self, first: Delivery) {
        let mut events: Vec<SharedEvent> = Vec::new();
        let mut bytes = 0usize;
        let room = self.send_queue.saturating_sub(self.queued.outbox.len());
        let max_events = if self.batch {
            MAX_BURST_EVENTS
        } else {
            room.clamp(1, MAX_BURST_EVENTS)
        };
        let mut next = Some(first);
        while let Some(d) = next.take() {
            match d {
                Delivery::Gap(g) => {
                    self.flush_events(&mut events);
                    let f = ws_frame::encode_server(self.enc, &g.into());
                    let m = self.frame(f);
                    self.queued.outbox.push_back(m);
                }
                Delivery::Event(e) => {
                    if self.subs.wants(&e) {
                        self.subs.sent = e.id;
                        bytes += e.json().len();
                        events.push(e);
                    }
                }
            }
            if events.len() < max_events && bytes < MAX_BURST_BYTES {
                next = self.subs.sub.as_mut().and_then(Subscription::next_ready);
            }
        }
        self.flush_events(&mut events);
    }

    fn flush_events(&mut self, events: &mut Vec<SharedEvent>) {
        if events.is_empty() {
            return;
        }
        self.delivered.inc_by(events.len() as u64);
        if self.batch && events.len() > 1 {
            let gz = ws_frame::encode_batch(self.enc, events);
            self.queued.outbox.push_back(Message::Binary(gz));
        } else {
            for e in events.iter() {
                let m = self.frame(ws_frame::encode_event(self.enc, e));
                self.queued.outbox.push_back(m);
            }
        }
        events.clear();
    }

    fn on_message(&mut self, msg: Option<Result<Message, tungstenite::Error>>) -> Option<End> {
        let msg = match msg {
            None => return Some(End::Gone),
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                use tungstenite::error::{CapacityError, Error as E};
                tracing::debug!(error = %e, "WebSocket read failed");
                return Some(match e {
                    E::Capacity(CapacityError::MessageTooLong { .. }) => {
                        End::Close(CloseCode::Size, "message too big")
                    }
                    E::Capacity(_) => End::Close(CloseCode::Size, "frame too big"),
                    E::Protocol(_) => End::Close(CloseCode::Protocol, "protocol error"),
                    E::Utf8(_) => End::Close(CloseCode::Invalid, "text frame is not UTF-8"),
                    _ => End::Gone,
                });
            }
        };
        let (payload, expected) = match &msg {
            Message::Text(t) => (t.as_bytes(), self.enc == Encoding::Json),
            Message::Binary(b) => (&b[..], self.enc == Encoding::Msgpack),
            Message::Close(_) => return Some(End::Gone),
            _ => return None,
        };
        self.frames_in.inc();
        self.bytes_in.inc_by(payload.len() as u64);
        if !expected {
            let (got, want) = match self.enc {
                Encoding::Json => ("binary", "JSON text"),
                Encoding::Msgpack => ("text", "binary MessagePack"),
            };
            self.error(FrameError::new(
                "unsupported_frame",
                format!(
                    "a {got} frame is not part of {}: send {want} frames",
                    self.enc.subprotocol()
                ),
            ));
            return None;
        }
        let max = self.state.config.ws_max_frame_bytes;
        if payload.len() > max {
            self.error(FrameError::new(
                "payload_too_large",
                format!("the message exceeds the {max}-byte limit"),
            ));
            return None;
        }
        match ws_frame::parse_client(self.enc, payload, &self.limits) {
            Ok(op) => self.on_op(op),
            Err(e) => self.error(e),
        }
        None
    }

    fn on_op(&mut self, op: ClientOp) {
        match op {
            ClientOp::Ping { r#ref } => self.answer(ServerFrame::Pong { r#ref }),
            ClientOp::Publish { events, r#ref } => {
                if !self.origin.may_write() {
                    let e = ApiError::origin_not_allowed(
                        "*",
                        "publish over a WebSocket opened from an origin allowed only by \"*\"",
                    );
                    self.answer(ServerFrame::Error {
                        code: e.code,
                        message: e.message,
                        r#ref,
                    });
                    return;
                }
                if let Some(e) = events
                    .iter()
                    .find_map(|e| self.access.check_publish(&e.topic).err())
                {
                    self.refuse(e, r#ref);
                    return;
                }
                // One op, one cell; refused ops store nothing and the socket stays open.
                let key = RateKey::of(&self.access, self.client);
                if let Err(wait) = self.state.limits.rate.check(&key) {
                    self.state
                        .metrics
                        .limits()
                        .publish_rate_limited
                        .get_or_create(&ReasonLabel { reason: "ws" })
                        .inc();
                    let e = ApiError::rate_limited(wait);
                    self.answer(ServerFrame::Error {
                        code: e.code,
                        message: e.message,
                        r#ref,
                    });
                    return;
                }
                let publisher = self.publisher.clone();
                self.pending.push_back(Box::pin(async move {
                    match publisher.publish(events).await {
                        Ok(receipt) => ServerFrame::Ack {
                            r#ref,
                            id: Some(receipt.last_id),
                            duplicate: receipt.duplicates > 0,
                        },
                        Err(e) => {
                            let e = ApiError::from(e);
                            ServerFrame::Error {
                                code: e.code,
                                message: e.message,
                                r#ref,
                            }
                        }
                    }
                }));
            }
            ClientOp::Subscribe {
                topics,
                since,
                start,
                r#ref,
            } => {
                if let Some(e) = topics
                    .iter()
                    .find_map(|t| self.access.check_subscribe(t).err())
                {
                    self.refuse(e, r#ref);
                    return;
                }
                match start.start(since) {
                    Ok(Start::Latest) | Ok(Start::Time(_)) if !self.subs.patterns.is_empty() => {
                        let e = ApiError::invalid_start(
                            "start and start_time apply to a socket that holds no pattern yet \
                             (a snapshot after other events would break id order): use since, \
                             or open another socket",
                        );
                        self.answer(ServerFrame::Error {
                            code: e.code,
                            message: e.message,
                            r#ref,
                        });
                    }
                    Ok(s @ (Start::Latest | Start::Time(_))) => {
                        self.subs.settle();
                        self.subs.patterns = topics.into_iter().map(|t| (t, EventId(0))).collect();
                        let state = self.state.clone();
                        self.subs.reopen_at(&state, Some(s));
                        if r#ref.is_some() {
                            self.answer(ServerFrame::Ack {
                                r#ref,
                                id: None,
                                duplicate: false,
                            });
                        }
                    }
                    Ok(_) => self.subscribe(topics, since, r#ref),
                    Err(e) => self.answer(ServerFrame::Error {
                        code: e.code,
                        message: e.message,
                        r#ref,
                    }),
                }
            }
            ClientOp::Auth { token, r#ref } => self.reauthorize(&token, r#ref),
            ClientOp::Unsubscribe { topics, r#ref } => {
                self.subs.settle();
                self.subs
                    .patterns
                    .retain(|(p, _)| !topics.iter().any(|t| t.as_str() == p.as_str()));
                self.restart();
                if r#ref.is_some() {
                    self.answer(ServerFrame::Ack {
                        r#ref,
                        id: None,
                        duplicate: false,
                    });
                }
            }
        }
    }

    fn subscribe(&mut self, topics: Vec<Pattern>, since: Option<EventId>, r#ref: Option<Ref>) {
        let max = self.state.config.max_patterns;
        let max_held = self.state.config.ws_max_subscriptions;
        // Per request (one op) like every transport; per socket over all its ops.
        let e = if topics.len() > max {
            Some(ApiError::too_many_patterns(max))
        } else {
            let new = topics
                .iter()
                .filter(|t| {
                    !self
                        .subs
                        .patterns
                        .iter()
                        .any(|(p, _)| p.as_str() == t.as_str())
                })
                .count();
            (self.subs.patterns.len() + new > max_held)
                .then(|| ApiError::too_many_subscriptions(max_held))
        };
        if let Some(e) = e {
            self.answer(ServerFrame::Error {
                code: e.code,
                message: e.message,
                r#ref,
            });
            return;
        }
        self.subs.settle();
        let sent = self.subs.sent;
        let start = match since {
            // Events below what this socket already sent cannot come in order any more: say so.
            Some(c) if c < sent => {
                let gap = ServerFrame::Gap {
                    requested: c.0,
                    oldest: sent.0 + 1,
                };
                let m = self.frame(ws_frame::encode_server(self.enc, &gap));
                self.queued.outbox.push_back(m);
                sent
            }
            Some(c) => c,
            None => self.subs.log.head(),
        };
        for t in topics {
            match self
                .subs
                .patterns
                .iter_mut()
                .find(|(p, _)| p.as_str() == t.as_str())
            {
                Some((_, s)) => *s = (*s).min(start),
                None => self.subs.patterns.push((t, start)),
            }
        }
        self.restart();
        if r#ref.is_some() {
            self.answer(ServerFrame::Ack {
                r#ref,
                id: None,
                duplicate: false,
            });
        }
    }

    /// The log could not serve a snapshot start: say so, and continue the patterns live.
    async fn start_failed(&mut self, e: crate::subscription::SubscriptionError) {
        let e = ApiError::from(e);
        self.answer(ServerFrame::Error {
            code: e.code,
            message: e.message,
            r#ref: None,
        });
        let head = self.subs.log.head().max(self.subs.sent);
        for (_, s) in &mut self.subs.patterns {
            *s = (*s).max(head);
        }
        self.restart();
    }

    /// Re-opens the subscription after the pattern set changed. Frames already built keep
    /// their place: they were counted as sent.
    fn restart(&mut self) {
        let state = self.state.clone();
        self.subs.reopen(&state);
    }
}

impl Socket {
    /// The token expired: like a shutdown, the publishes accepted while it was valid get
    /// their acks (so a client need not guess what was stored), then the socket is closed with
    /// 4001.
    async fn expire(&mut self, out: &mut Outgoing) -> End {
        match self.shut_down(out).await {
            End::Gone => End::Gone,
            End::Close(..) => End::Close(CloseCode::from(TOKEN_EXPIRED), "token expired"),
        }
    }

    /// Answers a refused op with an error frame (`forbidden`, `unauthorized`); the socket
    /// stays open.
    fn refuse(&mut self, e: AuthError, r#ref: Option<Ref>) {
        let e = ApiError::from(e);
        self.answer(ServerFrame::Error {
            code: e.code,
            message: e.message,
            r#ref,
        });
    }

    /// The `auth` op: a verified token replaces the socket's grants and expiry; patterns the
    /// new grants do not cover are dropped (and reported). A refused token changes nothing:
    /// the socket still closes when its current token expires.
    fn reauthorize(&mut self, token: &str, r#ref: Option<Ref>) {
        let Some(auth) = self.state.authenticator() else {
            self.answer(ServerFrame::Error {
                code: "auth_not_configured",
                message: "this server has no key configured: it is open and takes no tokens".into(),
                r#ref,
            });
            return;
        };
        let grants = match auth.verify(token) {
            Ok(g) => g,
            Err(e) => return self.refuse(e, r#ref),
        };
        let exp = grants.exp();
        self.access = Access::Token(grants);
        self.expiry = self
            .access
            .deadline()
            .map(|at| Box::pin(tokio::time::sleep_until(at)));
        let before = self.subs.patterns.len();
        let access = &self.access;
        let mut dropped = Vec::new();
        self.subs.patterns.retain(|(p, _)| {
            let keep = access.check_subscribe(p).is_ok();
            if !keep {
                dropped.push(p.as_str().to_string());
            }
            keep
        });
        if self.subs.patterns.len() != before {
            self.restart();
            self.answer(ServerFrame::Error {
                code: "forbidden",
                message: format!(
                    "the new token does not cover {}: unsubscribed",
                    dropped.join(", ")
                ),
                r#ref: r#ref.clone(),
            });
        }
        self.answer(ServerFrame::Auth { r#ref, exp });
    }
}

/// Resolves at the deadline; never when there is none.
async fn until(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(d) => d.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn next_delivery(
    sub: &mut Option<Subscription>,
) -> Result<Delivery, crate::subscription::SubscriptionError> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}
