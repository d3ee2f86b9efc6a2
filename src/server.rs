//! The server: accepts connections (HTTP/1.1 and HTTP/2 on one port, cleartext or over TLS
//! with [`crate::tls`]), opens the log, and shuts down gracefully.
//!
//! [`run`] takes an already bound listener and a shutdown future, so tests bind port 0 and
//! drive the real server. Shutdown order: readiness turns 503, the listener closes, streams
//! end, in-flight requests finish (publishes are flushed and acknowledged) and WebSockets send
//! their pending acks and close with 1001, all within the grace period, then the log is closed
//! with a final flush.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{Authenticator, KeyError};
use crate::config::{Config, LogBackend};
use crate::http::h1_stream::{self, Sniffed};
use crate::http::{self, refuse, AppState};
use crate::hub::Hub;
use crate::limits::{ClientAddr, ConnWatch, Expiry, TrackedBody, WatchedIo};
use crate::log::{
    DedupeOptions, EventLog, LogError, LogOptions, NatsLog, NatsOptions, SledLog, SpaceLimits,
};
use crate::metrics::{Metrics, ReasonLabel};
use crate::tls::{Tls, TlsError};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The log could not be opened or closed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A socket operation failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The configured JWT key cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The configured TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The webhooks could not be loaded or started.
    #[error("webhooks: {0}")]
    Webhook(#[from] crate::webhook::WebhookError),
    /// An open server (no key) was handed a non-loopback listener without `insecure_open`.
    #[error(
        "refusing to serve on {0} without authentication: configure a JWT key or set insecure_open"
    )]
    Open(std::net::SocketAddr),
}

/// Serves on `listener` until `shutdown` resolves, then shuts down gracefully. The log lives
/// in `config.data_dir`; `config.listen` is ignored (the listener is already bound). The JWT
/// key and TLS certificate of `config`, if any, are loaded first: an unusable one is an
/// error before anything is served.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let keys = Keys::load(&config)?;
    run_with_keys(listener, config, keys, shutdown).await
}

/// What the server loads from files named in the configuration, checked before it binds.
pub struct Keys {
    /// The JWT authenticator (`None`: an open server).
    pub auth: Option<Authenticator>,
    /// TLS (`None`: plain HTTP). Keep a clone to reload its certificate.
    pub tls: Option<Tls>,
}

impl Keys {
    /// Loads the JWT key and the TLS certificate and key `config` names. Guarantees: `Ok`
    /// only when each configured one is usable.
    pub fn load(config: &Config) -> Result<Keys, ServerError> {
        Ok(Keys {
            auth: Authenticator::from_config(config)?,
            tls: Tls::from_config(config)?,
        })
    }
}

/// [`run`] with the keys already loaded from `config`, so a caller that checked them before
/// binding does not read them twice (and can keep the [`Tls`] to reload it on SIGHUP).
///
/// Guarantees: an open server serves a non-loopback listener only with `insecure_open` (it
/// returns [`ServerError::Open`] before accepting anything otherwise), and says so in a
/// warning when it does; with TLS every connection is served over TLS only.
pub async fn run_with_keys(
    listener: TcpListener,
    config: Config,
    keys: Keys,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let Keys { auth, tls } = keys;
    let bound = listener.local_addr()?;
    if auth.is_none() {
        if !bound.ip().is_loopback() && !config.insecure_open {
            return Err(ServerError::Open(bound));
        }
        if config.insecure_open {
            tracing::warn!(
                listen = %bound,
                "insecure_open: no JWT key is configured, so anyone who can reach this address \
                 may publish and subscribe to every topic"
            );
        }
    }
    let metrics = Metrics::new();
    let hub = Hub::new(config.hub_capacity);
    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let addr = listener.local_addr()?;
    let state = Arc::new(
        AppState::new(
            config.clone(),
            hub.clone(),
            metrics.clone(),
            stop_rx.clone(),
        )
        .with_authenticator(auth),
    );
    // Accept at once, so /readyz answers 503 (not a hang) while the log opens.
    let tls_on = tls.is_some();
    let accept = tokio::spawn(accept_loop(listener, state.clone(), tls, stop_rx));

    let opening = std::time::Instant::now();
    let opened = match config.log {
        LogBackend::Sled => open_sled(&config, hub, metrics)
            .await
            .map(|log| (log, None)),
        LogBackend::Nats => open_nats(&config, hub, metrics).await.map(|log| {
            let nats = (log.client(), log.jetstream());
            (log as Arc<dyn EventLog>, Some(nats))
        }),
    };
    let (log, nats): (Arc<dyn EventLog>, _) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = accept.await;
            return Err(e.into());
        }
    };
    // Webhooks: beside the sled log, started before the server is ready; over JetStream in
    // KV buckets, started as soon as NATS answers (the gateway may start before it does).
    let webhook_starter = match nats {
        None => {
            if let Err(e) = start_webhooks(&config, log.clone(), &state, None).await {
                let _ = stop_tx.send(true);
                let _ = accept.await;
                let _ = log.close().await;
                return Err(e.into());
            }
            None
        }
        Some((client, js)) => {
            let (config, log, state) = (config.clone(), log.clone(), state.clone());
            Some(tokio::spawn(async move {
                loop {
                    match start_webhooks(&config, log.clone(), &state, Some((&client, &js))).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "webhooks not started yet; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }))
        }
    };
    tracing::info!(
        listen = %addr,
        log = ?config.log,
        head = log.head().0,
        open_ms = opening.elapsed().as_millis() as u64,
        auth = if state.authenticator().is_some() { "jwt" } else { "open" },
        tls = tls_on,
        "tidewire ready"
    );
    state.set_log(log.clone());

    shutdown.await;
    tracing::info!("shutting down");
    state.set_not_ready();
    let _ = stop_tx.send(true);
    // HTTP connections (hyper's GracefulShutdown) and WebSocket tasks (which it does not
    // track once upgraded) drain together, within one grace period: sockets send the acks of
    // publishes in flight and close with 1001 while the log is still open.
    let drained = async {
        if let Ok(graceful) = accept.await {
            graceful.shutdown().await;
        }
        state.sockets_closed().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("connections still open after the grace period; closing anyway");
    }
    // A call in flight is abandoned (its batch goes again after the restart), but a state
    // being written is finished before the log closes.
    if let Some(starter) = webhook_starter {
        starter.abort();
    }
    if let Some(webhooks) = state.webhooks_now() {
        webhooks.stop(grace).await;
    }
    log.close().await?;
    // Every handle to the log must be gone before the checkpoint can open its directory.
    drop(log);
    drop(state);
    if config.log == LogBackend::Sled {
        checkpoint_sled(&config).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads the webhooks and starts delivering: their state beside the sled log, or in KV
/// buckets of the JetStream context `nats`.
async fn start_webhooks(
    config: &Config,
    log: Arc<dyn EventLog>,
    state: &AppState,
    nats: Option<(&async_nats::Client, &async_nats::jetstream::Context)>,
) -> Result<(), crate::webhook::WebhookError> {
    use crate::webhook::{kv::KvStore, store, WebhookError};
    let opts = config
        .webhook_options()
        .map_err(|e| WebhookError::Invalid(e.to_string()))?;
    let store: Arc<dyn store::Store> = match nats {
        None => Arc::new(store::FileStore::open(config.data_dir.join(store::DIR))?),
        Some((client, js)) => {
            Arc::new(KvStore::open(client, js, &config.nats_stream, config.nats_replicas).await?)
        }
    };
    let hooks = crate::webhook::Webhooks::start(
        log,
        state.hub.clone(),
        state.metrics.clone(),
        store,
        opts,
        &config.webhooks,
    )
    .await?;
    state.set_webhooks(Arc::new(hooks));
    Ok(())
}

/// Opens the embedded sled log in `config.data_dir`.
async fn open_sled(
    config: &Config,
    hub: Hub,
    metrics: Metrics,
) -> Result<Arc<dyn EventLog>, LogError> {
    let opts = LogOptions {
        dir: config.data_dir.clone(),
        cache_bytes: config.cache_bytes,
        dedupe: DedupeOptions {
            window: Duration::from_secs(config.dedupe_window_secs),
            max_ids: config.dedupe_max_ids,
        },
        fsync: config.fsync,
        retention: config
            .retention_policy()
            .map_err(|e| LogError::Open(e.to_string()))?,
        space: SpaceLimits {
            min_free_bytes: config.storage_min_free_bytes,
            max_disk_bytes: config.storage_max_disk_bytes,
        },
        checkpoint_every: Duration::from_millis(config.storage_checkpoint_ms),
        wal_segment_bytes: config.storage_wal_segment_bytes,
    };
    let clock = config.clock.clone();
    let log =
        tokio::task::spawn_blocking(move || SledLog::open_with_clock(&opts, hub, metrics, clock))
            .await
            .map_err(|e| LogError::Open(format!("log open task failed: {e}")))??;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        events = log.event_count(),
        topics = log.topic_count(),
        next_id = log.head().0 + 1,
        "sled log open"
    );
    Ok(log)
}

/// Connects to the JetStream stream `config` names (see [`NatsLog::open`]).
async fn open_nats(config: &Config, hub: Hub, metrics: Metrics) -> Result<Arc<NatsLog>, LogError> {
    let opts = NatsOptions {
        urls: config.nats_urls.clone(),
        stream: config.nats_stream.clone(),
        prefix: config.nats_prefix(),
        replicas: config.nats_replicas,
        creds_file: config.nats_creds_file.clone(),
        nkey_file: config.nats_nkey_file.clone(),
        user_password: config
            .nats_user
            .clone()
            .zip(config.nats_password.as_ref().map(|p| p.expose().to_owned())),
        tls_ca: config.nats_tls_ca.clone(),
        max_batch: config.nats_max_batch,
        timeout: Duration::from_millis(config.nats_timeout_ms),
        dedupe_window: Duration::from_secs(config.dedupe_window_secs),
        retention: config
            .retention_policy()
            .map_err(|e| LogError::Config(e.to_string()))?,
    };
    let log = NatsLog::open(opts, hub, metrics).await?;
    tracing::info!(
        nats = %config.nats_urls.join(","),
        stream = %config.nats_stream,
        subjects = %format!("{}.>", config.nats_prefix()),
        "JetStream log open"
    );
    Ok(log)
}

/// Writes sled's checkpoint after a clean close, so the next start skips sled's replay.
async fn checkpoint_sled(config: &Config) {
    let dir = config.data_dir.clone();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || SledLog::checkpoint(&dir)).await {
        Ok(Ok(())) => tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "checkpoint written: the next start skips sled's replay"
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "no checkpoint; the next start replays sled's log")
        }
        Err(e) => tracing::warn!(error = %e, "checkpoint task failed"),
    }
}

/// Accepts connections until `stop` changes. With `tls`, each connection's TLS handshake runs
/// in its own task over the connection's [`WatchedIo`] (so it holds the connection's permit
/// and feeds its timers), bounded by the header read timeout; HTTP then runs over the TLS
/// stream. A refused connection (over a cap) gets its handshake too, so its 503/429 answer
/// is readable.
async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Option<Tls>,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(http_builder(&state.config));
    let head_limit = parser_cap(&state.config);
    let refusals = Arc::new(tokio::sync::Semaphore::new(refuse::REFUSALS_IN_FLIGHT));
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let (header_timeout, idle_timeout) = (
        secs(state.config.header_read_timeout_secs),
        secs(state.config.idle_timeout_secs),
    );
    loop {
        let (stream, peer) = tokio::select! {
            // Only ever set to true: any change (or a dropped sender) means stop.
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let limits = state.metrics.limits().clone();
        // Over a connection cap: a real answer (503/429), not a reset.
        let permit = match state.limits.connections.try_acquire(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                let reason = refusal.reason();
                limits
                    .connections_refused
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                tracing::debug!(%peer, reason, "connection refused");
                if let Ok(slot) = refusals.clone().try_acquire_owned() {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        match tls {
                            None => refuse::refuse_connection(TokioIo::new(stream), refusal).await,
                            Some(tls) => {
                                let handshake = tls.accept(stream);
                                if let Ok(Ok(done)) =
                                    tokio::time::timeout(refuse::REFUSAL_WAIT, handshake).await
                                {
                                    refuse::refuse_connection(TokioIo::new(done.stream), refusal)
                                        .await;
                                }
                            }
                        }
                    });
                }
                continue;
            }
        };
        // Slow-client defences: the watch sees every read and every request in flight.
        let watch = ConnWatch::new(header_timeout, idle_timeout);
        let io = WatchedIo::new(stream, watch.clone(), permit);
        let client = ClientAddr(peer.ip());
        let stream_state = state.clone();
        let state = state.clone();
        let requests = watch.clone();
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let in_flight = requests.request_started(req.version());
            req.extensions_mut().insert(client);
            async move {
                let resp = http::handle(state, req).await;
                Ok::<_, Infallible>(resp.map(|body| TrackedBody::new(body, in_flight)))
            }
        });
        // Taken before the handshake, so shutdown also waits for (bounded) handshakes.
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        let conn_stop = stop.clone();
        tokio::spawn(async move {
            let serve = async {
                let ended = match tls {
                    None => {
                        let mut io = io;
                        // An event stream's first request is served without hyper's
                        // per-connection buffers (`http::h1_stream`); the rest goes to hyper.
                        let prefix = match h1_stream::sniff(&mut io, head_limit).await {
                            Ok(Sniffed::Other(prefix)) => prefix,
                            Ok(Sniffed::Stream(req)) => {
                                let in_flight = watch.request_started(req.version());
                                // Boxed, so the task holds the stream's state only while
                                // it runs (not in every connection's task).
                                Box::pin(h1_stream::serve(
                                    stream_state,
                                    io,
                                    req,
                                    client,
                                    in_flight,
                                ))
                                .await;
                                drop(watcher);
                                return;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "connection ended before a request");
                                return;
                            }
                        };
                        io.replay(prefix);
                        let io = TokioIo::new(io);
                        let conn = builder.serve_connection_with_upgrades(io, service);
                        // Boxed, like the other branches: the task's own state stays small.
                        Box::pin(watcher.watch(conn.into_owned())).await
                    }
                    Some(tls) => {
                        // All of it boxed: a handshake's state is large and short-lived, and
                        // would otherwise size every connection's task, cleartext ones too.
                        let served = Box::pin(async {
                            // The whole handshake, from accept, within the header read timeout: a
                            // client that connects and never (or too slowly) handshakes is closed.
                            let handshake = tls.accept(io);
                            let done = match header_timeout {
                                Some(limit) => match tokio::time::timeout(limit, handshake).await {
                                    Ok(done) => done,
                                    Err(_) => {
                                        let reason = Expiry::HeaderTimeout.reason();
                                        limits
                                            .connections_timed_out
                                            .get_or_create(&ReasonLabel { reason })
                                            .inc();
                                        tracing::debug!(%peer, "TLS handshake timed out");
                                        return None;
                                    }
                                },
                                None => handshake.await,
                            };
                            let done = match done {
                                Ok(done) => done,
                                Err(e) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return None;
                                }
                            };
                            watch.tls_established(done.h2);
                            let io = TokioIo::new(done.stream);
                            let conn = builder.serve_connection_with_upgrades(io, service);
                            Some(watcher.watch(conn.into_owned()).await)
                        })
                        .await;
                        match served {
                            Some(ended) => ended,
                            None => return,
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            };
            let expiry = async {
                tokio::select! {
                    why = watch.expired() => return why,
                    _ = stopping(conn_stop) => watch.shutting_down(),
                }
                watch.expired().await
            };
            tokio::select! {
                _ = serve => {},
                // Dropping the connection closes it; nothing is in flight on it.
                why = expiry => {
                    if why.is_timeout() {
                        limits
                            .connections_timed_out
                            .get_or_create(&ReasonLabel { reason: why.reason() })
                            .inc();
                    }
                    tracing::debug!(%peer, reason = why.reason(), "closing connection");
                }
            }
        });
    }
    graceful
}

/// Resolves once the server is stopping: at once if it already is, or when `stop` becomes
/// true or its sender is gone.
async fn stopping(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The most bytes of a request head the HTTP/1 parsers read (hyper's, and
/// `http::h1_stream`'s, which hands a longer head to hyper): twice `max_header_bytes`, and at
/// least the 8 KiB hyper requires of its read buffer.
fn parser_cap(config: &Config) -> usize {
    config.max_header_bytes.saturating_mul(2).max(8192)
}

/// The HTTP/1.1 + HTTP/2 connection builder. The request-head parsers stop at twice
/// `max_header_bytes` (a bare 431 from hyper or h2); below that the router answers an
/// oversized head with the contract's 431 body (`limits::check_header_size`). hyper's own
/// `header_read_timeout` is left off: `limits::timeouts` times request heads and idle
/// connections without cutting keep-alive short.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(parser_cap(config));
    let h2_cap = config.max_header_bytes.saturating_mul(2);
    builder
        .http2()
        .max_header_list_size(u32::try_from(h2_cap).unwrap_or(u32::MAX));
    builder
}
