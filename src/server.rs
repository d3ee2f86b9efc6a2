//! The server: accepts connections (HTTP/1.1 and HTTP/2 cleartext on one port), opens the log,
//! and shuts down gracefully.
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

use crate::config::Config;
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::log::{DedupeOptions, EventLog, LogError, LogOptions, SledLog, SpaceLimits};
use crate::metrics::Metrics;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The log could not be opened or closed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A socket operation failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves on `listener` until `shutdown` resolves, then shuts down gracefully. The log lives
/// in `config.data_dir`; `config.listen` is ignored (the listener is already bound).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let hub = Hub::new(config.hub_capacity);
    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(
        config.clone(),
        hub.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    // Accept at once, so /readyz answers 503 (not a hang) while the log opens.
    let accept = tokio::spawn(accept_loop(listener, state.clone(), stop_rx));

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
    };
    let opened = tokio::task::spawn_blocking(move || SledLog::open(&opts, hub, metrics))
        .await
        .map_err(|e| LogError::Open(format!("log open task failed: {e}")))?;
    let log = match opened {
        Ok(log) => log,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = accept.await;
            return Err(e.into());
        }
    };
    tracing::info!(
        listen = %addr,
        data_dir = %config.data_dir.display(),
        events = log.event_count(),
        topics = log.topic_count(),
        next_id = log.head().0 + 1,
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
    log.close().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _peer) = tokio::select! {
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
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(http::handle(state, req).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful
}
