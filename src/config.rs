//! Server configuration: defaults, then a TOML file, then `TIDEWIRE_*` environment
//! variables, then command-line flags, each overriding the one before.
//!
//! `deploy/tidewire.toml` is the fully commented sample; every key below appears there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::log::retention::{Limits, RetentionPolicy, RuleConfig};
use crate::log::FsyncPolicy;

/// The address the server listens on by default (loopback: an open server is never exposed
/// by accident).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";

/// Everything `tidewire serve` can be told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Directory of the embedded log (created when missing).
    pub data_dir: PathBuf,
    /// Allow an open (token-less) server to listen on a non-loopback address.
    pub insecure_open: bool,
    /// PEM certificate chain (leaf first) to serve HTTPS, WSS and HTTP/2 over TLS with; needs
    /// `tls_key`. Reloaded from the same file on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) of `tls_cert`'s leaf certificate.
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted on the wire, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest publish body after gzip inflation, in bytes (413 above).
    pub max_decompressed_bytes: usize,
    /// Most events one publish request may carry (413 above).
    pub max_batch_events: usize,
    /// Longest topic accepted, in bytes (at most 200).
    pub max_topic_len: usize,
    /// Most patterns one subscription may name.
    pub max_patterns: usize,
    /// Seconds between SSE heartbeat comments (keep below proxies' idle timeouts).
    pub sse_heartbeat_secs: u64,
    /// Reconnection delay advertised to SSE clients (`retry:`), milliseconds.
    pub sse_retry_ms: u64,
    /// Committed batches the live hub keeps for subscribers; a subscriber further behind
    /// reads from the log instead.
    pub hub_capacity: usize,
    /// Events read from the log per step when a subscriber replays history.
    pub replay_page: usize,
    /// sled page cache, bytes.
    pub cache_bytes: u64,
    /// Seconds allowed for in-flight requests to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// Origins allowed to read cross-origin (CORS); `*` allows any. Empty: same-origin only.
    pub allowed_origins: Vec<String>,
    /// Frames queued per WebSocket before it stops taking live events and, once it reads
    /// again, catches up from the log.
    pub ws_send_queue: usize,
    /// Largest client WebSocket message, bytes: larger ones get a `payload_too_large` error
    /// frame; beyond four times this the socket is closed with 1009.
    pub ws_max_frame_bytes: usize,
    /// Seconds between protocol pings on every WebSocket.
    pub ws_ping_secs: u64,
    /// Seconds a WebSocket may go without answering (no frame or pong heard, or no write
    /// progress) before it is closed with 1008; it can then resume with `since`.
    pub ws_unresponsive_secs: u64,
    /// Gzip SSE streams for clients that accept it (flushed whenever no further event is
    /// ready, so none is held back). Costs a compressor per stream (a few hundred KiB), so it
    /// is off by default.
    pub sse_gzip: bool,
    /// Longest a long-poll may wait for events, seconds (a larger `timeout=` is capped).
    pub poll_max_timeout_secs: u64,
    /// Most events one long-poll response may carry (a larger `limit=` is capped).
    pub poll_max_limit: usize,
    /// HMAC secret for HS256/384/512 tokens, at least 32 bytes. Setting a key (this,
    /// `jwt_secret_file` or `jwt_public_key`) turns authorization on. Prefer the file or
    /// `TIDEWIRE_JWT_SECRET`: a secret on the command line shows in `ps`.
    pub jwt_secret: Option<Secret>,
    /// File holding the HMAC secret (trailing newlines are not part of it).
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA for RS256, P-256 EC for ES256) that verifies tokens.
    pub jwt_public_key: Option<PathBuf>,
    /// When set, tokens must carry this `aud`.
    pub jwt_audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// Refuse tokens without `exp` (a token that never expires cannot be revoked).
    pub jwt_require_exp: bool,
    /// Clock skew allowed on `exp` and `nbf`, seconds. Streams end this long after `exp`.
    pub jwt_leeway_secs: u64,
    /// Accept the token from the `access_token` query parameter (browsers' EventSource and
    /// WebSocket cannot set headers). It is never logged.
    pub jwt_query_token: bool,
    /// When set, `/metrics` needs `Authorization: Bearer <metrics_token>`.
    pub metrics_token: Option<Secret>,
    /// Serve the web console at `GET /console` (it reads through the API with the token its
    /// operator pastes, so it grants nothing by itself).
    pub console: bool,
    /// Publish requests per second each publisher may sustain (a token bucket per token
    /// subject, or per client address for tokens without `sub` and on an open server). One
    /// request is one cell, whatever the number of events it carries; a WebSocket publish op
    /// is one too. Excess gets 429 `rate_limited` with `Retry-After`. 0: unlimited.
    pub publish_rate_per_sec: f64,
    /// Publish requests a publisher may send at once above its rate (the bucket's size).
    /// 0: one second's worth of `publish_rate_per_sec`, at least 1.
    pub publish_burst: u32,
    /// Most TCP connections open at once (WebSockets included); one more is answered 503
    /// `server_at_capacity` and closed. 0: unlimited.
    pub max_connections: usize,
    /// Most TCP connections open at once from one client address (an IPv6 client's /64);
    /// one more is answered 429 `too_many_connections` and closed. 0: unlimited.
    pub max_connections_per_ip: usize,
    /// Most topic patterns one WebSocket may hold over all its `subscribe` ops (and its
    /// query); more gets a `too_many_subscriptions` error frame.
    pub ws_max_subscriptions: usize,
    /// Seconds a client has to send a complete request head once its first byte arrived
    /// (slowloris); then the connection is closed. 0: no limit.
    pub header_read_timeout_secs: u64,
    /// Seconds a publish request's body may take to arrive in full; then 408
    /// `request_timeout` and nothing is stored. 0: no limit.
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight (keep-alive, or
    /// connected and silent); then it is closed. A stream in progress (SSE, long-poll) is a
    /// request in flight, and an upgraded WebSocket is no longer an HTTP connection. 0: no
    /// limit.
    pub idle_timeout_secs: u64,
    /// Largest request line plus headers, in bytes: 431 `headers_too_large` above; the parser
    /// stops reading at twice this (bare 431, connection closed).
    pub max_header_bytes: usize,
    /// How long a publish's `(topic, msg_id)` is remembered, seconds: a repeat within this
    /// window is not stored again (it is answered with the original id).
    pub dedupe_window_secs: u64,
    /// Most `(topic, msg_id)` pairs remembered; beyond it the oldest are forgotten first.
    pub dedupe_max_ids: u64,
    /// When a publish is acknowledged relative to the fsync that makes it durable:
    /// `always`, `interval=100ms` or `never` (see [`FsyncPolicy`] for what each can lose).
    pub fsync: FsyncPolicy,
    /// Default retention: events older than this many seconds are removed (0: kept forever).
    pub retention_max_age_secs: u64,
    /// Default retention: most events kept per topic (0: unlimited).
    pub retention_max_events: u64,
    /// Default retention: most payload bytes kept per topic (0: unlimited).
    pub retention_max_bytes: u64,
    /// Most payload bytes kept over all topics (0: unlimited); beyond it the oldest events of
    /// the whole log go first.
    pub retention_max_total_bytes: u64,
    /// Seconds between background retention passes.
    pub retention_check_secs: u64,
    /// Per-pattern retention rules; the first whose pattern matches a topic governs it,
    /// topics no rule matches get the defaults above.
    pub retention_rules: Vec<RuleConfig>,
    /// Free bytes to keep on the data directory's filesystem: publishes that would go below
    /// it get 503 `storage_full` (reads go on), and resume by themselves once there is room.
    pub storage_min_free_bytes: u64,
    /// Most bytes sled's files may take on disk (0: no budget; the write-ahead log is not
    /// counted: about three segments more); over it publishes get
    /// 503 `storage_full` until retention frees room.
    pub storage_max_disk_bytes: u64,
    /// Destinations webhooks may call: addresses or networks (CIDR), each with an optional
    /// `:port`, or host names (matched literally, with an optional `:port`). A url is
    /// allowed when every address its host resolves to is listed (or its name is).
    /// Default: loopback only.
    pub webhook_allow: Vec<String>,
    /// First retry delay of a failed webhook call, milliseconds (doubles per failure).
    pub webhook_retry_min_ms: u64,
    /// Longest retry delay of a failed webhook call, milliseconds (also the delay after a
    /// 4xx other than 408, 410 and 429).
    pub webhook_retry_max_ms: u64,
    /// Webhooks declared in the configuration (`[[webhooks]]`, the fields of
    /// `PUT /v1/webhooks/{name}` plus `name`): created at start when missing, updated
    /// otherwise (their cursors are kept).
    pub webhooks: Vec<crate::webhook::spec::Request>,
    /// Longest time, milliseconds, between background flushes of sled while events arrive
    /// (a checkpoint: the write-ahead log up to it is then deleted). Acknowledgements wait
    /// for the write-ahead log, never for this; it bounds the WAL replayed after a crash.
    pub storage_checkpoint_ms: u64,
    /// Bytes after which a write-ahead log segment is closed and the next one started (a
    /// closed segment is deleted once a checkpoint covers it).
    pub storage_wal_segment_bytes: u64,
    /// Where events are kept: `sled`, the embedded log in `data_dir` (the default), or
    /// `nats`, a NATS JetStream stream shared by any number of tidewire gateways.
    pub log: LogBackend,
    /// NATS servers to connect to (`log = "nats"`); any one reachable is enough, the client
    /// learns the rest of the cluster from it. In the environment: comma-separated.
    #[serde(deserialize_with = "urls_from_list_or_commas")]
    pub nats_urls: Vec<String>,
    /// The JetStream stream holding the log (created when missing). Letters, digits, `-`, `_`.
    pub nats_stream: String,
    /// Subject prefix of the stream's events; empty: `tidewire.<nats_stream>`. Each stream
    /// needs a prefix of its own, so several share one NATS account side by side.
    pub nats_subject_prefix: String,
    /// Replicas of the stream when a gateway creates it (3 survives the loss of one node).
    pub nats_replicas: usize,
    /// NATS credentials file (JWT + nkey seed, `.creds`).
    pub nats_creds_file: Option<PathBuf>,
    /// File holding an nkey seed (`SU…`) to authenticate with.
    pub nats_nkey_file: Option<PathBuf>,
    /// NATS user name (with `nats_password`).
    pub nats_user: Option<String>,
    /// NATS password (prefer `TIDEWIRE_NATS_PASSWORD`: a flag shows in `ps`).
    pub nats_password: Option<Secret>,
    /// PEM CA certificate the NATS servers' TLS certificates are checked against (TLS is
    /// then required).
    pub nats_tls_ca: Option<PathBuf>,
    /// Most events JetStream commits atomically in one batch (the server's limit, 1000 by
    /// default); a larger publish batch is refused with 413.
    pub nats_max_batch: usize,
    /// Milliseconds a gateway waits for JetStream to answer one request (a publish's
    /// acknowledgement, a read) before the client gets a 503 it can retry.
    pub nats_timeout_ms: u64,
    /// The clock that dates events on the sled log (on JetStream the stream's own timestamps
    /// do): the system clock, except in tests that step it
    /// (see [`Clock::step`](crate::clock::Clock::step)). Not configuration: never read from a file or flag.
    #[serde(skip)]
    pub clock: crate::clock::Clock,
}

/// The log backends `tidewire serve` can keep its events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// The embedded sled log in `data_dir`: nothing else to install.
    #[default]
    Sled,
    /// A NATS JetStream stream: stateless gateways over a replicated log.
    Nats,
}

/// Reads `nats_urls` from a list, or from one string of comma-separated URLs (what an
/// environment variable holds).
fn urls_from_list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    let urls = match Urls::deserialize(d)? {
        Urls::One(s) => s.split(',').map(str::to_owned).collect::<Vec<_>>(),
        Urls::Many(v) => v,
    };
    Ok(urls
        .into_iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7700))),
            data_dir: PathBuf::from("tidewire-data"),
            insecure_open: false,
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 1 << 20,
            max_decompressed_bytes: 16 << 20,
            max_batch_events: 10_000,
            max_topic_len: crate::topic::MAX_TOPIC_LEN,
            max_patterns: 32,
            sse_heartbeat_secs: 15,
            sse_retry_ms: 2000,
            hub_capacity: 1024,
            replay_page: 1000,
            cache_bytes: 256 << 20,
            shutdown_grace_secs: 10,
            allowed_origins: Vec::new(),
            ws_send_queue: 128,
            ws_max_frame_bytes: 1 << 20,
            ws_ping_secs: 15,
            ws_unresponsive_secs: 45,
            sse_gzip: false,
            poll_max_timeout_secs: 55,
            poll_max_limit: 10_000,
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_require_exp: true,
            jwt_leeway_secs: 30,
            jwt_query_token: true,
            metrics_token: None,
            console: true,
            publish_rate_per_sec: 0.0,
            publish_burst: 0,
            max_connections: 16_384,
            max_connections_per_ip: 0,
            ws_max_subscriptions: 64,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 60,
            idle_timeout_secs: 90,
            max_header_bytes: 32 << 10,
            dedupe_window_secs: 120,
            dedupe_max_ids: 1_000_000,
            fsync: FsyncPolicy::Always,
            retention_max_age_secs: 7 * 24 * 3600,
            retention_max_events: 0,
            retention_max_bytes: 0,
            retention_max_total_bytes: 0,
            retention_check_secs: 10,
            retention_rules: Vec::new(),
            storage_min_free_bytes: 64 << 20,
            storage_checkpoint_ms: 500,
            storage_wal_segment_bytes: 32 << 20,
            storage_max_disk_bytes: 0,
            webhook_allow: crate::webhook::allow::DEFAULT
                .iter()
                .map(|s| s.to_string())
                .collect(),
            webhook_retry_min_ms: 1000,
            webhook_retry_max_ms: 300_000,
            webhooks: Vec::new(),
            log: LogBackend::Sled,
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            nats_stream: "tidewire".into(),
            nats_subject_prefix: String::new(),
            nats_replicas: 1,
            nats_creds_file: None,
            nats_nkey_file: None,
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_max_batch: 1000,
            nats_timeout_ms: 5000,
            clock: crate::clock::Clock::system(),
        }
    }
}

/// A secret from the configuration. `Debug` never shows it, so a logged or printed
/// configuration does not leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Keys read from `TIDEWIRE_<KEY>` verbatim instead of through figment's value parser, which
/// would turn a secret that looks like a number or a list into one.
const VERBATIM_ENV_KEYS: [&str; 3] = ["jwt_secret", "metrics_token", "nats_password"];

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a key holds a wrong value.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// The values are individually fine but unsafe or inconsistent together.
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the configuration: defaults, then `file` (if given), then `TIDEWIRE_*`
    /// variables, then `overrides` (command-line flags; `None` fields are left alone).
    pub fn load<T: Serialize>(file: Option<&Path>, overrides: &T) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        let keys = Config::default().keys();
        fig = fig.merge(Env::prefixed("TIDEWIRE_").filter(move |k| {
            keys.iter().any(|x| k == x.as_str()) && !VERBATIM_ENV_KEYS.contains(&k.as_str())
        }));
        for key in VERBATIM_ENV_KEYS {
            let var = format!("TIDEWIRE_{}", key.to_ascii_uppercase());
            if let Ok(value) = std::env::var(&var) {
                fig = fig.merge(Serialized::default(key, value));
            }
        }
        fig = fig.merge(Serialized::defaults(overrides));
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Whether a JWT key is configured, i.e. the server checks tokens (whether the key is
    /// usable is checked when the server starts).
    pub fn auth_configured(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_secret_file.is_some() || self.jwt_public_key.is_some()
    }

    fn keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The retention policy these settings describe; refuses an invalid rule pattern.
    pub fn retention_policy(&self) -> Result<RetentionPolicy, ConfigError> {
        RetentionPolicy::new(
            &self.retention_rules,
            Limits {
                max_age_secs: self.retention_max_age_secs,
                max_events: self.retention_max_events,
                max_bytes: self.retention_max_bytes,
            },
            self.retention_max_total_bytes,
            std::time::Duration::from_secs(self.retention_check_secs.max(1)),
        )
        .map_err(ConfigError::Invalid)
    }

    /// Checks the rules that span several keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.retention_policy()?;
        if !self.listen.ip().is_loopback() && !self.insecure_open && !self.auth_configured() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without authentication: configure a JWT key \
                 (--jwt-secret-file, TIDEWIRE_JWT_SECRET or --jwt-public-key), or start with \
                 --insecure-open to serve an open server on a trusted network",
                self.listen
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key (--tls-cert, --tls-key) must be set together".into(),
            ));
        }
        if self.max_topic_len == 0 || self.max_topic_len > crate::topic::MAX_TOPIC_LEN {
            return Err(ConfigError::Invalid(format!(
                "max_topic_len must be 1 to {}",
                crate::topic::MAX_TOPIC_LEN
            )));
        }
        for (name, v) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_decompressed_bytes", self.max_decompressed_bytes),
            ("max_batch_events", self.max_batch_events),
            ("max_patterns", self.max_patterns),
            ("hub_capacity", self.hub_capacity),
            ("replay_page", self.replay_page),
            ("ws_send_queue", self.ws_send_queue),
            ("ws_max_frame_bytes", self.ws_max_frame_bytes),
            ("poll_max_limit", self.poll_max_limit),
            ("ws_max_subscriptions", self.ws_max_subscriptions),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.storage_checkpoint_ms < 10 {
            return Err(ConfigError::Invalid(
                "storage_checkpoint_ms must be at least 10".into(),
            ));
        }
        if self.storage_wal_segment_bytes < 64 << 10 {
            return Err(ConfigError::Invalid(
                "storage_wal_segment_bytes must be at least 65536".into(),
            ));
        }
        if self.sse_heartbeat_secs == 0 {
            return Err(ConfigError::Invalid(
                "sse_heartbeat_secs must be at least 1".into(),
            ));
        }
        if !self.publish_rate_per_sec.is_finite() || self.publish_rate_per_sec < 0.0 {
            return Err(ConfigError::Invalid(
                "publish_rate_per_sec must be a number, 0 (unlimited) or more".into(),
            ));
        }
        if self.max_header_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_header_bytes must be at least 1024".into(),
            ));
        }
        if self.ws_ping_secs == 0 || self.ws_unresponsive_secs <= self.ws_ping_secs {
            return Err(ConfigError::Invalid(
                "ws_ping_secs must be at least 1 and below ws_unresponsive_secs".into(),
            ));
        }
        if self.log == LogBackend::Nats {
            self.validate_nats()?;
        }
        self.webhook_options()?;
        for w in &self.webhooks {
            let name = w.name.as_deref().unwrap_or_default();
            let name = crate::webhook::spec::Name::parse(name)
                .map_err(|e| ConfigError::Invalid(format!("[[webhooks]]: {e}")))?;
            crate::webhook::spec::Spec::apply(name.clone(), w, None).map_err(|e| {
                ConfigError::Invalid(format!("[[webhooks]] {:?}: {e}", name.as_str()))
            })?;
        }
        Ok(())
    }

    /// The webhooks' allow-list and retry delays; refuses a malformed allow-list entry.
    pub fn webhook_options(&self) -> Result<crate::webhook::Options, ConfigError> {
        let allow = crate::webhook::allow::AllowList::parse(&self.webhook_allow)
            .map_err(ConfigError::Invalid)?;
        if self.webhook_retry_min_ms == 0 || self.webhook_retry_max_ms < self.webhook_retry_min_ms {
            return Err(ConfigError::Invalid(
                "webhook_retry_min_ms must be at least 1 and at most webhook_retry_max_ms".into(),
            ));
        }
        Ok(crate::webhook::Options {
            allow,
            backoff: crate::webhook::backoff::Backoff {
                min: std::time::Duration::from_millis(self.webhook_retry_min_ms),
                max: std::time::Duration::from_millis(self.webhook_retry_max_ms),
            },
            page_size: self.replay_page,
        })
    }

    /// The subject prefix of the JetStream stream's events.
    pub fn nats_prefix(&self) -> String {
        if self.nats_subject_prefix.is_empty() {
            format!("tidewire.{}", self.nats_stream)
        } else {
            self.nats_subject_prefix.clone()
        }
    }

    fn validate_nats(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.nats_urls.is_empty() {
            return bad("log = \"nats\" needs at least one NATS URL (--nats-url)".into());
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.nats_stream) {
            return bad(format!(
                "nats_stream {:?}: 1 to 64 letters, digits, '-' or '_'",
                self.nats_stream
            ));
        }
        let prefix = self.nats_prefix();
        if prefix.split('.').any(|t| !name_ok(t)) {
            return bad(format!(
                "nats_subject_prefix {prefix:?}: tokens of letters, digits, '-' or '_' \
                 separated by '.'"
            ));
        }
        if !(1..=5).contains(&self.nats_replicas) {
            return bad("nats_replicas must be 1 to 5".into());
        }
        if self.nats_max_batch == 0 {
            return bad("nats_max_batch must be at least 1".into());
        }
        if self.nats_timeout_ms == 0 {
            return bad("nats_timeout_ms must be at least 1".into());
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return bad("nats_user and nats_password must be set together".into());
        }
        // Settings of the embedded log that a gateway cannot honour: refused, not ignored.
        if self.fsync != FsyncPolicy::Always {
            return bad(format!(
                "fsync = {} does not apply with log = \"nats\": JetStream acknowledges after its \
                 replicas store an event and fsyncs per its own sync_interval (set \
                 `jetstream {{ sync_interval: always }}` on the NATS servers for acknowledged = on disk)",
                self.fsync
            ));
        }
        if self.storage_max_disk_bytes != 0 {
            return bad(
                "storage_max_disk_bytes does not apply with log = \"nats\" (the gateway stores \
                 nothing): bound the stream with retention_max_total_bytes, and NATS's store \
                 with its own jetstream max_file_store"
                    .into(),
            );
        }
        let methods = [
            self.nats_creds_file.is_some(),
            self.nats_nkey_file.is_some(),
            self.nats_user.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return bad(
                "choose one NATS authentication: nats_creds_file, nats_nkey_file or \
                 nats_user + nats_password"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct NoOverrides {}

    #[test]
    fn sample_config_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tidewire.toml");
        let c = Config::load(Some(&path), &NoOverrides {}).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn open_server_refuses_a_public_address() {
        let c = Config {
            listen: "0.0.0.0:7700".parse().unwrap(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let with_key = Config {
            jwt_secret_file: Some(PathBuf::from("/run/secrets/jwt")),
            ..c.clone()
        };
        assert!(
            with_key.validate().is_ok(),
            "a keyed server may listen anywhere"
        );
        let c = Config {
            insecure_open: true,
            ..c
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_gateway_refuses_settings_it_cannot_honour_and_says_which() {
        let nats = Config {
            log: LogBackend::Nats,
            ..Config::default()
        };
        assert!(nats.validate().is_ok());
        for (bad, needle) in [
            (
                Config {
                    fsync: FsyncPolicy::Never,
                    ..nats.clone()
                },
                "fsync",
            ),
            (
                Config {
                    storage_max_disk_bytes: 1 << 30,
                    ..nats.clone()
                },
                "storage_max_disk_bytes",
            ),
            (
                Config {
                    nats_stream: "has.dot".into(),
                    ..nats.clone()
                },
                "nats_stream",
            ),
            (
                Config {
                    nats_user: Some("u".into()),
                    ..nats.clone()
                },
                "nats_password",
            ),
            (
                Config {
                    nats_urls: vec![],
                    ..nats.clone()
                },
                "NATS URL",
            ),
        ] {
            let why = bad.validate().unwrap_err().to_string();
            assert!(why.contains(needle), "{needle}: {why}");
            // The same settings are fine on the embedded log.
            if needle != "nats_password" && needle != "nats_stream" && needle != "NATS URL" {
                let sled = Config {
                    log: LogBackend::Sled,
                    ..bad
                };
                assert!(sled.validate().is_ok(), "{needle}");
            }
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let c = Config {
            jwt_secret: Some(Secret::new("hunter2-hunter2-hunter2-hunter2-x")),
            metrics_token: Some(Secret::new("metrics-s3cret")),
            ..Config::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("metrics-s3cret"), "{shown}");
    }
}
