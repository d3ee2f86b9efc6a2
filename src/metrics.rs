//! Prometheus metrics: what an operator watches to know tidewire is healthy.
//!
//! Served as Prometheus text at `GET /metrics`. Every handle is cheap to clone and safe to
//! update from any thread.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The transport a subscriber uses.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `sse`, `ws` or `poll`.
    pub transport: &'static str,
}

/// The error code of a refused request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status.
    pub status: u16,
    /// The contract's snake_case code.
    pub code: &'static str,
}

/// One webhook (its name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    /// The webhook's name.
    pub webhook: String,
}

/// One webhook and why a call of it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookFailureLabel {
    /// The webhook's name.
    pub webhook: String,
    /// `timeout`, `connect`, `status_3xx`, `status_4xx`, `status_410`, `status_429`,
    /// `status_5xx` or `destination_not_allowed`.
    pub reason: &'static str,
}

/// Webhook delivery metrics.
#[derive(Clone, Default)]
pub struct WebhookMetrics {
    /// Batches answered 2xx.
    pub batches: Family<WebhookLabel, Counter>,
    /// Events in batches answered 2xx.
    pub events: Family<WebhookLabel, Counter>,
    /// Failed calls, by reason.
    pub failures: Family<WebhookFailureLabel, Counter>,
    /// Failed calls that will be tried again.
    pub retries: Family<WebhookLabel, Counter>,
    /// Ids between the webhook's cursor and the log's head while it has events to deliver
    /// (an upper bound of its matching backlog); 0 when it waits for events.
    pub lag: Family<WebhookLabel, Gauge>,
}

/// One direction and subprotocol of WebSocket traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WsLabel {
    /// `in` (from clients) or `out` (to clients).
    pub direction: &'static str,
    /// `tidewire.v1.json` or `tidewire.v1.msgpack`.
    pub subprotocol: &'static str,
}

/// The error code of a refused WebSocket frame.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WsErrorLabel {
    /// The contract's snake_case code.
    pub code: &'static str,
}

/// WebSocket metrics (open sockets are `live_subscribers{transport="ws"}`).
#[derive(Clone, Default)]
pub struct WsMetrics {
    /// Frames by direction and subprotocol.
    pub frames: Family<WsLabel, Counter>,
    /// Bytes (message payloads) by direction and subprotocol.
    pub bytes: Family<WsLabel, Counter>,
    /// Publish ops acknowledged (durable).
    pub acks: Counter,
    /// Error frames sent, by code.
    pub errors: Family<WsErrorLabel, Counter>,
    /// Sockets whose send queue is full right now (they catch up from the log).
    pub lagging: Gauge,
    /// Sockets closed by the server for being unresponsive.
    pub unresponsive_closed: Counter,
}

/// Why a limit acted (`reason` label of the abuse-limit metrics).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Connections refused: `total` or `per_ip`. Connections closed: `header_timeout` or
    /// `idle_timeout`. Publishes limited: `http` or `ws`.
    pub reason: &'static str,
}

/// Abuse-limit metrics (src/limits/): connection caps, slow-client closes, publish rate.
#[derive(Clone, Default)]
pub struct LimitMetrics {
    /// TCP connections open now (counted against `max_connections`; WebSockets included).
    pub connections_open: Gauge,
    /// Connections answered 503/429 and closed at accept, by `total` / `per_ip`.
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Connections closed by the server for `header_timeout` or `idle_timeout`.
    pub connections_timed_out: Family<ReasonLabel, Counter>,
    /// Publish requests refused with `rate_limited`, by transport (`http`, `ws`).
    pub publish_rate_limited: Family<ReasonLabel, Counter>,
    /// Publishers (token subjects or client addresses) the rate limiter remembers, as of its
    /// last sweep.
    pub rate_limiter_keys: Gauge,
    /// Publish bodies that did not arrive within `body_read_timeout_secs` (answered 408).
    pub body_timeouts: Counter,
}

/// One open subscription in `live_subscribers`; decrements the gauge when dropped.
pub struct SubscriberGuard(Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One transport's share of [`Totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportTotals {
    /// Events delivered over it since the server started.
    pub delivered: u64,
    /// Subscriptions open on it now.
    pub subscribers: u64,
}

/// Server-wide counters since start, as `GET /v1/stats` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Events stored.
    pub events_stored: u64,
    /// Publish requests acknowledged.
    pub publishes: u64,
    /// Server-Sent Events.
    pub sse: TransportTotals,
    /// WebSocket.
    pub ws: TransportTotals,
    /// Long-poll.
    pub poll: TransportTotals,
}

/// All metrics of one server.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    publishes: Counter,
    events_stored: Counter,
    bytes_stored: Counter,
    publish_latency: Histogram,
    flush_latency: Histogram,
    commit_latency: Histogram,
    subscribers: Family<TransportLabel, Gauge>,
    delivered: Family<TransportLabel, Counter>,
    lagged: Counter,
    blobs_synced: Counter,
    checkpoint_latency: Histogram,
    wal_segments_deleted: Counter,
    duplicates: Counter,
    dedupe_entries: Gauge,
    dedupe_removed: Counter,
    retention_removed: Counter,
    retention_reclaimed: Counter,
    retention_latency: Histogram,
    rejected: Family<CodeLabel, Counter>,
    ws: WsMetrics,
    limits: LimitMetrics,
    nats: NatsMetrics,
    webhooks: WebhookMetrics,
    webhook_latency: Histogram,
}

/// Metrics of a gateway over NATS JetStream (`log = "nats"`); zero on the sled log.
#[derive(Clone, Default)]
pub struct NatsMetrics {
    /// 1 while the NATS connection is up, else 0.
    pub connected: Gauge,
    /// 1 while the gateway follows its stream and may serve (what `/readyz` says), else 0.
    pub following: Gauge,
    /// Events stored in the stream that this gateway has not yet handed to its subscribers.
    pub lag_events: Gauge,
    /// The stream's last sequence, as last seen.
    pub stream_last_seq: Gauge,
    /// Times the connection to NATS was lost.
    pub disconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("tidewire");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            publishes: Counter::default(),
            events_stored: Counter::default(),
            bytes_stored: Counter::default(),
            publish_latency: latency_histogram(),
            webhooks: WebhookMetrics::default(),
            // 1 ms to ~9 min: a retried batch is delivered minutes later.
            webhook_latency: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            flush_latency: latency_histogram(),
            commit_latency: latency_histogram(),
            subscribers: Family::default(),
            delivered: Family::default(),
            lagged: Counter::default(),
            blobs_synced: Counter::default(),
            checkpoint_latency: latency_histogram(),
            wal_segments_deleted: Counter::default(),
            duplicates: Counter::default(),
            dedupe_entries: Gauge::default(),
            dedupe_removed: Counter::default(),
            retention_removed: Counter::default(),
            retention_reclaimed: Counter::default(),
            retention_latency: latency_histogram(),
            rejected: Family::default(),
            ws: WsMetrics::default(),
            limits: LimitMetrics::default(),
            nats: NatsMetrics::default(),
        };
        r.register(
            "nats_connected",
            "1 while the gateway's NATS connection is up (log = nats)",
            m.nats.connected.clone(),
        );
        r.register(
            "nats_following",
            "1 while the gateway follows its JetStream stream and serves (log = nats)",
            m.nats.following.clone(),
        );
        r.register(
            "nats_lag_events",
            "Events in the stream not yet handed to this gateway's subscribers (log = nats)",
            m.nats.lag_events.clone(),
        );
        r.register(
            "nats_stream_last_seq",
            "The JetStream stream's last sequence as last seen (log = nats)",
            m.nats.stream_last_seq.clone(),
        );
        r.register(
            "nats_disconnects",
            "Times the gateway lost its NATS connection (log = nats)",
            m.nats.disconnects.clone(),
        );
        r.register(
            "publish_requests",
            "Publish requests acknowledged",
            m.publishes.clone(),
        );
        r.register(
            "events_stored",
            "Events durably stored",
            m.events_stored.clone(),
        );
        r.register(
            "event_bytes_stored",
            "Payload bytes durably stored",
            m.bytes_stored.clone(),
        );
        r.register(
            "webhook_batches",
            "Webhook calls answered 2xx, per webhook",
            m.webhooks.batches.clone(),
        );
        r.register(
            "webhook_events",
            "Events in webhook calls answered 2xx, per webhook (re-sent batches count again)",
            m.webhooks.events.clone(),
        );
        r.register(
            "webhook_failures",
            "Failed webhook calls, per webhook and reason",
            m.webhooks.failures.clone(),
        );
        r.register(
            "webhook_retries",
            "Failed webhook calls that will be tried again, per webhook",
            m.webhooks.retries.clone(),
        );
        r.register(
            "webhook_lag_events",
            "Ids between a webhook's cursor and the head while it has events to deliver",
            m.webhooks.lag.clone(),
        );
        r.register(
            "webhook_delivery_seconds",
            "Time from an event's time to the 2xx of the webhook call that carried it",
            m.webhook_latency.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Time from a publish request's decoded body to its durable acknowledgement",
            m.publish_latency.clone(),
        );
        r.register(
            "log_flush_latency_seconds",
            "Duration of each durable sync of the log: one write-ahead log fdatasync per group \
             commit (a flush of sled when the WAL could not be written)",
            m.flush_latency.clone(),
        );
        r.register(
            "log_commit_latency_seconds",
            "Duration of each group commit: write, flush and publish",
            m.commit_latency.clone(),
        );
        r.register(
            "live_subscribers",
            "Open subscriptions per transport",
            m.subscribers.clone(),
        );
        r.register(
            "events_delivered",
            "Events sent to subscribers per transport",
            m.delivered.clone(),
        );
        r.register(
            "log_checkpoint_latency_seconds",
            "Duration of each background checkpoint: a flush of sled, then the checkpoint file",
            m.checkpoint_latency.clone(),
        );
        r.register(
            "log_wal_segments_deleted",
            "Write-ahead log segments deleted once a checkpoint covered them",
            m.wal_segments_deleted.clone(),
        );
        r.register(
            "log_blobs_synced",
            "Large-page files of the log fsynced after a flush (events of several KiB land there)",
            m.blobs_synced.clone(),
        );
        r.register(
            "publish_duplicates",
            "Published events recognised as repeats of a (topic, msg_id) and not stored again",
            m.duplicates.clone(),
        );
        r.register(
            "dedupe_entries",
            "(topic, msg_id) pairs the log remembers for idempotent publish",
            m.dedupe_entries.clone(),
        );
        r.register(
            "dedupe_entries_removed",
            "Remembered (topic, msg_id) pairs removed: expired, or beyond the configured maximum",
            m.dedupe_removed.clone(),
        );
        r.register(
            "retention_removed_events",
            "Events removed by retention (per-topic limits and the global budget)",
            m.retention_removed.clone(),
        );
        r.register(
            "retention_reclaimed_chunks",
            "Stored chunks deleted once retention had removed every event in them",
            m.retention_reclaimed.clone(),
        );
        r.register(
            "retention_pass_seconds",
            "Duration of each background retention pass (commits wait while it runs)",
            m.retention_latency.clone(),
        );
        r.register(
            "subscriber_lag_fallbacks",
            "Times a subscriber fell behind the live ring and went back to the log",
            m.lagged.clone(),
        );
        r.register(
            "requests_rejected",
            "Requests refused, by status and error code",
            m.rejected.clone(),
        );
        r.register(
            "ws_frames",
            "WebSocket frames by direction and subprotocol",
            m.ws.frames.clone(),
        );
        r.register(
            "ws_bytes",
            "WebSocket message bytes by direction and subprotocol",
            m.ws.bytes.clone(),
        );
        r.register(
            "ws_acks",
            "Publish ops over WebSocket acknowledged after they were durable",
            m.ws.acks.clone(),
        );
        r.register(
            "ws_errors",
            "Error frames sent to WebSocket clients, by code",
            m.ws.errors.clone(),
        );
        r.register(
            "ws_lagging_sockets",
            "WebSockets whose send queue is full (they catch up from the log)",
            m.ws.lagging.clone(),
        );
        r.register(
            "ws_unresponsive_closed",
            "WebSockets closed for not answering or not reading",
            m.ws.unresponsive_closed.clone(),
        );
        r.register(
            "connections_open",
            "TCP connections open now, WebSockets included (capped by max_connections)",
            m.limits.connections_open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections answered 503 (total cap) or 429 (per-address cap) and closed at accept",
            m.limits.connections_refused.clone(),
        );
        r.register(
            "connections_timed_out",
            "Connections closed for a slow request head or for idling without a request",
            m.limits.connections_timed_out.clone(),
        );
        r.register(
            "publish_rate_limited",
            "Publish requests and WebSocket publish ops refused with rate_limited, by transport",
            m.limits.publish_rate_limited.clone(),
        );
        r.register(
            "rate_limiter_keys",
            "Publishers (token subjects or client addresses) the publish rate limiter remembers",
            m.limits.rate_limiter_keys.clone(),
        );
        r.register(
            "publish_body_timeouts",
            "Publish bodies that did not arrive within body_read_timeout_secs (408)",
            m.limits.body_timeouts.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The gateway's NATS metrics.
    pub fn nats(&self) -> &NatsMetrics {
        &self.nats
    }

    /// Records an acknowledged publish of `events` events holding `bytes` payload bytes.
    pub fn observe_publish(&self, events: u64, bytes: u64, latency: Duration) {
        self.publishes.inc();
        self.events_stored.inc_by(events);
        self.bytes_stored.inc_by(bytes);
        self.publish_latency.observe(latency.as_secs_f64());
    }

    /// Records blob files of the log made durable after a flush.
    pub fn observe_blobs_synced(&self, files: u64) {
        self.blobs_synced.inc_by(files);
    }

    /// Records events not stored again because they repeated a `(topic, msg_id)`.
    pub fn observe_duplicates(&self, events: u64) {
        self.duplicates.inc_by(events);
    }

    /// Records how many `(topic, msg_id)` pairs the log remembers, and how many it just
    /// forgot.
    pub fn observe_dedupe_entries(&self, remembered: u64, removed: u64) {
        self.dedupe_entries
            .set(i64::try_from(remembered).unwrap_or(i64::MAX));
        self.dedupe_removed.inc_by(removed);
    }

    /// Records one retention pass.
    pub fn observe_retention(&self, removed: u64, chunks_reclaimed: u64, took: Duration) {
        self.retention_removed.inc_by(removed);
        self.retention_reclaimed.inc_by(chunks_reclaimed);
        self.retention_latency.observe(took.as_secs_f64());
    }

    /// Records one background checkpoint and the WAL segments it deleted.
    pub fn observe_checkpoint(&self, latency: Duration, segments_deleted: u64) {
        self.checkpoint_latency.observe(latency.as_secs_f64());
        self.wal_segments_deleted.inc_by(segments_deleted);
    }

    /// Records one flush of the log.
    pub fn observe_flush(&self, latency: Duration) {
        self.flush_latency.observe(latency.as_secs_f64());
    }

    /// Records one group commit.
    pub fn observe_commit(&self, latency: Duration) {
        self.commit_latency.observe(latency.as_secs_f64());
    }

    /// Counts one open subscription of `transport` in `live_subscribers` until the returned
    /// guard is dropped, however the subscription ends.
    pub fn track_subscriber(&self, transport: &'static str) -> SubscriberGuard {
        let gauge = self
            .subscribers
            .get_or_create(&TransportLabel { transport })
            .clone();
        gauge.inc();
        SubscriberGuard(gauge)
    }

    /// Totals for the console's chart (`GET /v1/stats`): events stored, and per transport
    /// (`sse`, `ws`, `poll`) the events delivered and the subscribers open now.
    pub fn totals(&self) -> Totals {
        let per = |t: &'static str| TransportTotals {
            delivered: self
                .delivered
                .get_or_create(&TransportLabel { transport: t })
                .get(),
            subscribers: self
                .subscribers
                .get_or_create(&TransportLabel { transport: t })
                .get()
                .max(0)
                .unsigned_abs(),
        };
        Totals {
            events_stored: self.events_stored.get(),
            publishes: self.publishes.get(),
            sse: per("sse"),
            ws: per("ws"),
            poll: per("poll"),
        }
    }

    /// The counter of events delivered over one transport.
    pub fn delivered(&self, transport: &'static str) -> Counter {
        self.delivered
            .get_or_create(&TransportLabel { transport })
            .clone()
    }

    /// Records a webhook batch of `events` events answered 2xx.
    pub fn observe_webhook_delivered(&self, webhook: &str, events: u64) {
        let label = WebhookLabel {
            webhook: webhook.to_owned(),
        };
        self.webhooks.batches.get_or_create(&label).inc();
        self.webhooks.events.get_or_create(&label).inc_by(events);
    }

    /// Records a failed webhook call (`status_410` is not retried; every other reason is).
    pub fn observe_webhook_failure(&self, webhook: &str, reason: &'static str) {
        self.webhooks
            .failures
            .get_or_create(&WebhookFailureLabel {
                webhook: webhook.to_owned(),
                reason,
            })
            .inc();
        if reason != "status_410" {
            self.webhooks
                .retries
                .get_or_create(&WebhookLabel {
                    webhook: webhook.to_owned(),
                })
                .inc();
        }
    }

    /// Sets a webhook's lag gauge.
    pub fn set_webhook_lag(&self, webhook: &str, lag: u64) {
        self.webhooks
            .lag
            .get_or_create(&WebhookLabel {
                webhook: webhook.to_owned(),
            })
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// Records the time from an event's `time` to the 2xx that delivered it.
    pub fn observe_webhook_latency(&self, latency: Duration) {
        self.webhook_latency.observe(latency.as_secs_f64());
    }

    /// The WebSocket metrics.
    pub fn ws(&self) -> &WsMetrics {
        &self.ws
    }

    /// The abuse-limit metrics.
    pub fn limits(&self) -> &LimitMetrics {
        &self.limits
    }

    /// Records that a subscriber fell behind and went back to the log.
    pub fn observe_lag(&self) {
        self.lagged.inc();
    }

    /// Records a refused request.
    pub fn observe_rejected(&self, status: u16, code: &'static str) {
        self.rejected
            .get_or_create(&CodeLabel { status, code })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
