//! Answering a connection the limits refused (over `max_connections` or
//! `max_connections_per_ip`): its first request gets the contract's error (503 or 429, with
//! `Retry-After`) and `Connection: close`, rather than a reset.

use std::convert::Infallible;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::{header, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::oneshot;

use super::{error_response, ApiError};
use crate::limits::Refusal;

/// Most refused connections being answered at once; beyond it a refused connection is
/// closed without an answer (each answer holds a socket for up to [`REFUSAL_WAIT`]).
pub const REFUSALS_IN_FLIGHT: usize = 256;

/// Longest a refused connection is kept to send its request and read the answer.
pub const REFUSAL_WAIT: Duration = Duration::from_secs(5);

/// Answers the first request on `io` (HTTP/1.1 or HTTP/2) with `refusal`'s error and
/// `Connection: close`, then closes it; gives up after [`REFUSAL_WAIT`]. The caller bounds
/// how many run at once ([`REFUSALS_IN_FLIGHT`]).
pub async fn refuse_connection<I>(io: I, refusal: Refusal)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(false);
    let (answered_tx, answered) = oneshot::channel::<()>();
    let answered_tx = Mutex::new(Some(answered_tx));
    let service = service_fn(move |_req| {
        let mut resp = error_response(&ApiError::from(refusal.error()));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Some(tx) = answered_tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = tx.send(());
        }
        std::future::ready(Ok::<_, Infallible>(resp))
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let _ = tokio::time::timeout(REFUSAL_WAIT, async {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = answered => {}
        }
        // HTTP/1.1 closes after the answer on its own (no keep-alive); HTTP/2 gets a GOAWAY
        // once the answer is sent.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    })
    .await;
}
