//! Slow-client defences of one connection, none of which can cut a request in flight:
//! - **header read timeout** (slowloris): once the first byte of a request head arrives on an
//!   HTTP/1 connection with no request in flight, the whole head must arrive within
//!   `header_read_timeout_secs`, else the connection is closed. It also covers the protocol
//!   sniffing before HTTP/1 or HTTP/2 is chosen (and a TLS handshake, when TLS runs over a
//!   [`WatchedIo`]: its bytes count as reads).
//! - **idle timeout**: a connection with no request in flight (a keep-alive connection between
//!   requests, or one that connected and sent nothing) is closed after `idle_timeout_secs`.
//!
//! - **shutdown**: once the server stops, an HTTP/1 connection with no request in flight is
//!   closed at once. hyper's graceful shutdown closes such a connection only if it has not
//!   read a byte of the next request head; a half-sent head (or a silent connection still
//!   being sniffed, or a TLS handshake) would otherwise hold the shutdown for up to the
//!   header timeout. HTTP/2 connections are left to hyper, which sends GOAWAY.
//!
//! A request is in flight from the moment its head is parsed until its response body has been
//! sent or dropped ([`TrackedBody`]), so an SSE stream, a waiting long-poll or a slow download
//! is never idle, and a WebSocket leaves HTTP (and these timers) at its upgrade. On HTTP/2
//! the reads of an idle connection (pings, settings) are not request heads: only the idle
//! timeout applies there.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts when an HTTP/1 connection
//! becomes ready for its next request, so it would also cap keep-alive idling at the header
//! timeout, and it covers neither the auto builder's protocol sniffing nor HTTP/2.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::conn::ConnPermit;

/// The HTTP/2 connection preface's first bytes, as a client sends them.
const H2_PREFIX: &[u8; 4] = b"PRI ";

/// Why a connection was closed by [`ConnWatch::expired`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head did not arrive in time.
    HeaderTimeout,
    /// No request was in flight for too long.
    IdleTimeout,
    /// The server is shutting down and no request is in flight (HTTP/1 only).
    Shutdown,
}

impl Expiry {
    /// The `reason` label of `connections_timed_out`.
    pub fn reason(&self) -> &'static str {
        match self {
            Expiry::HeaderTimeout => "header_timeout",
            Expiry::IdleTimeout => "idle_timeout",
            Expiry::Shutdown => "shutdown",
        }
    }

    /// Whether the connection was closed by one of its timeouts (not by the shutdown).
    pub fn is_timeout(&self) -> bool {
        !matches!(self, Expiry::Shutdown)
    }
}

/// What one connection is doing, shared by its I/O, its requests and its watchdog.
#[derive(Clone)]
pub struct ConnWatch {
    shared: Arc<Shared>,
}

struct Shared {
    header_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    in_flight: usize,
    /// Since when no request has been in flight.
    idle_since: Instant,
    /// When the first byte of a request head arrived (no request in flight then).
    head_started: Option<Instant>,
    /// The connection speaks HTTP/2 (its reads between requests are not heads).
    h2: bool,
    /// The first bytes read, until four are known (to recognise the HTTP/2 preface).
    prefix: Vec<u8>,
    /// The server is shutting down.
    stopping: bool,
}

impl ConnWatch {
    /// A watch for a connection accepted now. `None` (or zero) disables a timeout.
    pub fn new(header_timeout: Option<Duration>, idle_timeout: Option<Duration>) -> Self {
        ConnWatch {
            shared: Arc::new(Shared {
                header_timeout: header_timeout.filter(|d| !d.is_zero()),
                idle_timeout: idle_timeout.filter(|d| !d.is_zero()),
                state: Mutex::new(State {
                    in_flight: 0,
                    idle_since: Instant::now(),
                    head_started: None,
                    h2: false,
                    prefix: Vec::with_capacity(H2_PREFIX.len()),
                    stopping: false,
                }),
                changed: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records bytes read from the client.
    fn on_read(&self, bytes: &[u8]) {
        if self.shared.header_timeout.is_none() {
            return;
        }
        let mut st = self.lock();
        if st.prefix.len() < H2_PREFIX.len() {
            let take = (H2_PREFIX.len() - st.prefix.len()).min(bytes.len());
            st.prefix.extend_from_slice(&bytes[..take]);
            if st.prefix.len() == H2_PREFIX.len() && st.prefix[..] == H2_PREFIX[..] {
                // Not a request head after all: the first bytes were the HTTP/2 preface.
                st.h2 = true;
                st.head_started = None;
            }
        }
        if st.in_flight == 0 && st.head_started.is_none() && !st.h2 {
            st.head_started = Some(Instant::now());
            drop(st);
            self.shared.changed.notify_one();
        }
    }

    /// Records that the connection's TLS handshake has completed: its bytes were no request
    /// head, so the header timer stops until a request head's first (encrypted) byte arrives;
    /// `h2` (ALPN chose HTTP/2) marks the reads that follow as HTTP/2 frames, not heads, as
    /// the preface does on a cleartext connection (TLS hides the preface from this watch).
    ///
    /// The handshake itself is bounded by the caller (`server.rs`: the header read timeout
    /// from accept). Bytes of a request head read together with the handshake's last flight
    /// start no timer: such a connection is bounded by the idle timeout, like a silent one.
    pub fn tls_established(&self, h2: bool) {
        {
            let mut st = self.lock();
            st.head_started = None;
            st.h2 |= h2;
        }
        self.shared.changed.notify_one();
    }

    /// Marks a request (its head parsed) as in flight until the returned guard is dropped;
    /// [`TrackedBody`] keeps it until the response body is done.
    pub fn request_started(&self, version: Version) -> RequestGuard {
        {
            let mut st = self.lock();
            st.in_flight += 1;
            st.head_started = None;
            st.h2 |= version == Version::HTTP_2;
        }
        self.shared.changed.notify_one();
        RequestGuard(self.clone())
    }

    /// Records that the server is shutting down: from now on [`ConnWatch::expired`] resolves
    /// with [`Expiry::Shutdown`] as soon as an HTTP/1 connection has no request in flight.
    pub fn shutting_down(&self) {
        self.lock().stopping = true;
        self.shared.changed.notify_one();
    }

    /// Resolves when the connection should be closed, and says why; never while a request is
    /// in flight, never when both timeouts are disabled and the server is not shutting down.
    pub async fn expired(&self) -> Expiry {
        loop {
            let deadline = {
                let st = self.lock();
                if st.stopping && st.in_flight == 0 && !st.h2 {
                    return Expiry::Shutdown;
                }
                if st.in_flight > 0 {
                    None
                } else if let (Some(t), Some(limit)) = (st.head_started, self.shared.header_timeout)
                {
                    Some((t + limit, Expiry::HeaderTimeout))
                } else {
                    self.shared
                        .idle_timeout
                        .map(|limit| (st.idle_since + limit, Expiry::IdleTimeout))
                }
            };
            match deadline {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        _ = self.shared.changed.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.shared.changed.notified().await,
            }
        }
    }
}

/// One request in flight; when dropped the connection may become idle.
pub struct RequestGuard(ConnWatch);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        {
            let mut st = self.0.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            if st.in_flight == 0 {
                st.idle_since = Instant::now();
            }
        }
        self.0.shared.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
pub struct TrackedBody<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> TrackedBody<B> {
    /// Wraps `inner`, holding `guard` as long as it lives.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        TrackedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<B> HttpBody for TrackedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket: reports reads to its [`ConnWatch`] and holds the connection's
/// [`ConnPermit`] for as long as the socket lives (also after a WebSocket upgrade). Bytes
/// given back with [`WatchedIo::replay`] are read again before the socket.
pub struct WatchedIo<T> {
    io: T,
    watch: ConnWatch,
    replay: Bytes,
    _permit: ConnPermit,
}

impl<T> WatchedIo<T> {
    /// Wraps the accepted socket `io`.
    pub fn new(io: T, watch: ConnWatch, permit: ConnPermit) -> Self {
        WatchedIo {
            io,
            watch,
            replay: Bytes::new(),
            _permit: permit,
        }
    }

    /// Gives back `bytes`, already read from this socket (and seen by the watch), to be read
    /// again before anything else: how `http::h1_stream::sniff` hands a connection whose
    /// first bytes it looked at to hyper.
    pub fn replay(&mut self, bytes: Bytes) {
        self.replay = bytes;
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            if this.replay.is_empty() {
                // Frees the buffer the bytes were read into.
                this.replay = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.watch.on_read(read);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::ConnectionLimiter;
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replayed_bytes_are_read_again_before_the_socket() {
        let limiter = ConnectionLimiter::new(1, 1, &Metrics::new());
        let permit = limiter.try_acquire([127, 0, 0, 1].into()).unwrap();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = WatchedIo::new(server, ConnWatch::new(None, None), permit);
        client.write_all(b" world").await.unwrap();
        drop(client);
        io.replay(Bytes::from_static(b"hello"));
        let mut first = [0u8; 3];
        io.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hel");
        let mut rest = String::new();
        io.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn an_idle_connection_expires_but_never_while_a_request_is_in_flight() {
        let w = ConnWatch::new(Some(SHORT), Some(SHORT * 4));
        let guard = w.request_started(Version::HTTP_11);
        let waited = tokio::time::timeout(SHORT * 8, w.expired()).await;
        assert!(waited.is_err(), "expired with a request in flight");
        drop(guard);
        let started = Instant::now();
        assert_eq!(w.expired().await, Expiry::IdleTimeout);
        assert!(started.elapsed() >= SHORT * 4);
    }

    #[tokio::test]
    async fn a_partial_head_expires_after_the_header_timeout() {
        let w = ConnWatch::new(Some(SHORT), Some(SHORT * 100));
        w.on_read(b"GET / HT");
        assert_eq!(w.expired().await, Expiry::HeaderTimeout);
        // A head that completes in time is a request, not a slowloris.
        let w = ConnWatch::new(Some(SHORT), Some(SHORT * 100));
        w.on_read(b"GET / HT");
        let _g = w.request_started(Version::HTTP_11);
        assert!(tokio::time::timeout(SHORT * 10, w.expired()).await.is_err());
    }

    #[tokio::test]
    async fn http2_reads_between_requests_are_not_heads() {
        let w = ConnWatch::new(Some(SHORT), Some(SHORT * 10));
        w.on_read(b"PR");
        w.on_read(b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let started = Instant::now();
        assert_eq!(w.expired().await, Expiry::IdleTimeout);
        assert!(started.elapsed() >= SHORT * 10);
    }

    #[tokio::test]
    async fn at_shutdown_an_http1_connection_expires_once_no_request_is_in_flight() {
        // Timeouts disabled, and a half-read head: only the shutdown can close it.
        let w = ConnWatch::new(None, None);
        w.on_read(b"POST /v1/top");
        let guard = w.request_started(Version::HTTP_11);
        w.shutting_down();
        let waited = tokio::time::timeout(SHORT * 4, w.expired()).await;
        assert!(waited.is_err(), "closed with a request in flight");
        drop(guard);
        let closed = tokio::time::timeout(SHORT * 4, w.expired()).await;
        assert_eq!(closed.ok(), Some(Expiry::Shutdown));
        assert!(!Expiry::Shutdown.is_timeout());
        // HTTP/2 connections are left to hyper's GOAWAY.
        let w = ConnWatch::new(None, None);
        let _ = w.request_started(Version::HTTP_2);
        w.shutting_down();
        assert!(tokio::time::timeout(SHORT * 4, w.expired()).await.is_err());
    }

    #[tokio::test]
    async fn disabled_timeouts_never_expire() {
        let w = ConnWatch::new(None, Some(Duration::ZERO));
        w.on_read(b"GET");
        assert!(tokio::time::timeout(SHORT * 8, w.expired()).await.is_err());
    }
}
