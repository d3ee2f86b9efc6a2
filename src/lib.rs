//! tidewire: a single-binary event streaming server with an embedded durable log.
//!
//! Devices and services publish over HTTP; dashboards and browsers subscribe with Server-Sent
//! Events and resume exactly where they left off. Every event is durable before it is
//! acknowledged, and every transport reads from the one log.
//!
//! How an event flows, and where each step lives:
//!
//! ```text
//! http::publish ──codec──▶ publish ──▶ log (writer: ids, group commit) ──▶ hub ──▶ subscription ──▶ http::sse
//!                                         ▲                                          │
//!                                         └────────────── reads by cursor ───────────┘
//! ```
//!
//! - [`topic`]: topics, patterns (`*`, `**`) and cursors, validated at the edge.
//! - [`envelope`]: the event and its wire forms (JSON, SSE frame, MessagePack), each built once.
//! - [`codec`]: publish bodies (JSON, NDJSON, MessagePack, text, bytes, gzip) to events.
//! - [`inflate`]: gzip'd request bodies inflated as they arrive, under a cap.
//! - [`publish`]: the publish path, from validated events to a durable receipt.
//! - [`log`]: the durable log behind a narrow trait; [`log::SledLog`] is the embedded engine,
//!   [`log::NatsLog`] the gateways' engine over a NATS JetStream stream (`--log nats`).
//! - [`hub`]: live fan-out of committed events, bounded per subscriber.
//! - [`subscription`]: history from a cursor, then live, without gap or duplicate.
//! - [`http`]: routing, errors and the HTTP transports (publish, SSE, WebSocket, topics, health).
//! - [`ws_frame`]: WebSocket ops and frames (JSON, MessagePack, gzip batches), pure functions.
//! - [`webhook`]: webhooks: events pushed to HTTP endpoints, signed, in order, at least once.
//! - [`auth`]: JWT verification and topic-pattern grants, checked by every transport.
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2, graceful shutdown.
//! - [`limits`]: abuse limits: publish rate, connection caps, slow-client timeouts.
//! - [`tls`]: HTTPS/WSS/HTTP/2 over TLS (rustls): certificate loading, ALPN, SIGHUP reload.
//! - [`export`]: the log as NDJSON lines for backups and restores (`tidewire export`/`import`).
//! - [`ops`]: operator commands on a data dir (`inspect`, `verify`, `export`, `import`).
//! - [`config`], [`cli`], [`client`], [`metrics`]: configuration, the command line, the
//!   client behind `publish`/`tail`, Prometheus metrics.
//! - [`durable`]: small files replaced atomically and durably (marks, webhook state).
//! - [`clock`]: the wall clock that dates events, steppable in tests.
//! - [`bench`]: `tidewire bench`, the load generator (against tidewire or nginx + Nchan).
#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config;
pub mod durable;
pub mod envelope;
pub mod export;
pub mod http;
pub mod hub;
pub mod inflate;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod ops;
pub mod publish;
pub mod server;
pub mod subscription;
pub mod tls;
pub mod topic;
pub mod webhook;
pub mod ws_frame;
