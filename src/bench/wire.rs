//! The client side of each transport (keep-alive HTTP, SSE streams, WebSockets, long-polls for
//! tidewire and Nchan), and the scanners that find the `"ts":<unix µs>` of each delivered event
//! without parsing envelopes, so the bench reads a million events a second without being the
//! bottleneck.

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::target::{Target, UrlTemplate};
use super::{fail, Error};

/// How long connecting, a handshake, or a response head may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `authority` with `TCP_NODELAY`, within [`CONNECT_TIMEOUT`].
async fn connect(authority: &str) -> Result<TcpStream, Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| fail(format!("connecting to {authority} timed out")))?
        .map_err(|e| fail(format!("cannot connect to {authority}: {e}")))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One keep-alive HTTP/1.1 connection, one request at a time.
pub(crate) struct HttpConn {
    sender: http1::SendRequest<Full<Bytes>>,
    authority: String,
    token: Option<String>,
}

impl HttpConn {
    /// Opens a connection to `authority`; `token` goes as `Authorization: Bearer` on each
    /// request.
    pub(crate) async fn open(authority: &str, token: Option<&str>) -> Result<HttpConn, Error> {
        let stream = connect(authority).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn {
            sender,
            authority: authority.to_string(),
            token: token.map(str::to_string),
        })
    }

    /// A request to `path` with `Host` and, when set, `Authorization`.
    pub(crate) fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        match &self.token {
            Some(t) => b.header("authorization", format!("Bearer {t}")),
            None => b,
        }
    }

    /// Sends `req` and returns the response head (the body is left to the caller).
    pub(crate) async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, Error> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    /// POSTs `body` to `path` and returns the status once the answer is read.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        content_encoding: Option<&str>,
        body: Bytes,
    ) -> Result<u16, Error> {
        let mut b = self
            .request(Method::POST, path)
            .header("content-type", content_type);
        if let Some(e) = content_encoding {
            b = b.header("content-encoding", e);
        }
        let resp = self.send(b.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }

    /// GETs `path` with `headers`; returns the status, the headers and the whole body.
    pub(crate) async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, HeaderMap, Bytes), Error> {
        let mut b = self.request(Method::GET, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self.send(b.body(Full::new(Bytes::new()))?).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, body))
    }
}

/// An open SSE response: the body arrives chunk by chunk (chunked or close-delimited).
pub(crate) struct SseStream {
    _conn: HttpConn,
    body: Incoming,
    /// Inflates the body as it arrives when the server gzip'd it (`--gzip`).
    inflate: Option<Box<flate2::write::GzDecoder<Vec<u8>>>>,
}

impl SseStream {
    /// GETs `path` on `authority` with `Accept: text/event-stream` and `Last-Event-ID` when
    /// given; returns once a 200 head has arrived. With `gzip` it asks for a gzip'd stream
    /// (`Accept-Encoding: gzip`, served when the server has `sse_gzip` on) and, when the
    /// answer is gzip'd, [`SseStream::chunk`] inflates it chunk by chunk.
    pub(crate) async fn open(
        authority: &str,
        path: &str,
        token: Option<&str>,
        gzip: bool,
    ) -> Result<SseStream, Error> {
        let mut conn = HttpConn::open(authority, token).await?;
        let mut req = conn
            .request(Method::GET, path)
            .header("accept", "text/event-stream");
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let resp = tokio::time::timeout(CONNECT_TIMEOUT, conn.send(req))
            .await
            .map_err(|_| fail(format!("SSE {path}: no response head in time")))??;
        if resp.status() != 200 {
            return Err(fail(format!(
                "SSE {path}: server answered {}",
                resp.status()
            )));
        }
        let gzipped = resp
            .headers()
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        if gzip && !gzipped {
            return Err(fail(format!(
                "SSE {path}: asked for gzip, the stream is not gzip'd (is sse_gzip on?)"
            )));
        }
        Ok(SseStream {
            _conn: conn,
            body: resp.into_body(),
            inflate: gzipped.then(|| Box::new(flate2::write::GzDecoder::new(Vec::new()))),
        })
    }

    /// The next chunk of the body (inflated when gzip'd; it may then be empty); `None` when
    /// the server ended the stream.
    pub(crate) async fn chunk(&mut self) -> Option<Result<Bytes, Error>> {
        loop {
            match self.body.frame().await? {
                Err(e) => return Some(Err(e.into())),
                Ok(frame) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let Some(gz) = self.inflate.as_mut() else {
                        return Some(Ok(data));
                    };
                    if let Err(e) = gz.write_all(&data).and_then(|()| gz.flush()) {
                        return Some(Err(fail(format!("SSE gzip: {e}"))));
                    }
                    return Some(Ok(Bytes::from(std::mem::take(gz.get_mut()))));
                }
            }
        }
    }
}

/// A TCP stream that counts the bytes it reads: the server-to-client bytes on the wire,
/// WebSocket frame headers included.
pub(crate) struct Counted {
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
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
        }
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

/// A client WebSocket over a [`Counted`] stream.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<Counted>;

/// Opens `ws://authority/path` with `subprotocol` when given (tidewire's encodings; Nchan
/// takes none), `Authorization: Bearer` when `token` is set; `read` counts the bytes
/// received. `small` shrinks the read buffer, for sockets that will stay idle.
pub(crate) async fn open_ws(
    authority: &str,
    path: &str,
    subprotocol: Option<&str>,
    token: Option<&str>,
    read: Arc<AtomicU64>,
    small: bool,
) -> Result<Ws, Error> {
    let stream = connect(authority).await?;
    let mut req = format!("ws://{authority}{path}").into_client_request()?;
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", http::HeaderValue::from_str(p)?);
    }
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            http::HeaderValue::from_str(&format!("Bearer {t}"))?,
        );
    }
    let config = small.then(|| WebSocketConfig::default().read_buffer_size(4096));
    let counted = Counted {
        inner: stream,
        read,
    };
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(req, counted, config),
    )
    .await
    .map_err(|_| fail(format!("WebSocket {path}: handshake timed out")))?
    .map_err(|e| fail(format!("WebSocket {path}: {e}")))?;
    Ok(ws)
}

/// Where a long-poller is: tidewire's `since` cursor, or Nchan's message id as the previous
/// answer's `Last-Modified` and `Etag`.
enum PollCursor {
    Tidewire(Option<u64>),
    Nchan {
        last_modified: Option<String>,
        etag: Option<String>,
    },
}

/// One long-poll answer.
pub(crate) struct PollAnswer {
    /// The body, gunzipped when it came gzip'd.
    pub(crate) body: Bytes,
    /// Body bytes as they came over the wire.
    pub(crate) wire_bytes: u64,
}

/// A long-poller on one keep-alive connection, following its cursor from answer to answer.
pub(crate) struct Poller {
    conn: HttpConn,
    path: String,
    cursor: PollCursor,
    gzip: bool,
}

impl Poller {
    /// A poller of `url` for `topic`. tidewire: from cursor `since` (None: live only). Nchan:
    /// the first poll carries no cursor (the server's `nchan_subscriber_first_message`
    /// decides where it starts). `gzip` asks tidewire for gzip'd answers.
    pub(crate) async fn open(
        url: &UrlTemplate,
        topic: &str,
        target: Target,
        token: Option<&str>,
        since: Option<u64>,
        gzip: bool,
    ) -> Result<Poller, Error> {
        let conn = HttpConn::open(url.authority(), token).await?;
        let cursor = match target {
            Target::Tidewire => PollCursor::Tidewire(since),
            Target::Nchan => PollCursor::Nchan {
                last_modified: None,
                etag: None,
            },
        };
        Ok(Poller {
            conn,
            path: url.path(topic),
            cursor,
            gzip,
        })
    }

    /// tidewire, live only: asks for the head without waiting, so the next polls start there
    /// and see every event published from now on. Nchan: nothing to do.
    pub(crate) async fn start_live(&mut self) -> Result<(), Error> {
        if let PollCursor::Tidewire(None) = self.cursor {
            let sep = if self.path.contains('?') { '&' } else { '?' };
            let path = format!("{}{sep}timeout=0", self.path);
            let (status, _, body) = self.conn.get(&path, &[]).await?;
            if status != 200 {
                return Err(fail(format!("poll {path}: server answered {status}")));
            }
            self.cursor = PollCursor::Tidewire(Some(
                next_cursor(&body).ok_or_else(|| fail("poll answer without \"next\""))?,
            ));
        }
        Ok(())
    }

    /// One poll, held by the server up to `wait_secs` (tidewire's `timeout`; Nchan holds until
    /// a message comes), for at most `limit` events (tidewire). Advances the cursor.
    pub(crate) async fn poll(&mut self, wait_secs: u64, limit: u64) -> Result<PollAnswer, Error> {
        let (status, headers, raw) = match &self.cursor {
            PollCursor::Tidewire(since) => {
                let sep = if self.path.contains('?') { '&' } else { '?' };
                let since = since.map(|c| format!("since={c}&")).unwrap_or_default();
                let path = format!("{}{sep}{since}timeout={wait_secs}&limit={limit}", self.path);
                let enc = if self.gzip { "gzip" } else { "identity" };
                self.conn.get(&path, &[("accept-encoding", enc)]).await?
            }
            PollCursor::Nchan {
                last_modified,
                etag,
            } => {
                let mut h = Vec::new();
                if let Some(lm) = last_modified {
                    h.push(("if-modified-since", lm.as_str()));
                }
                if let Some(e) = etag {
                    h.push(("if-none-match", e.as_str()));
                }
                self.conn.get(&self.path, &h).await?
            }
        };
        let wire_bytes = raw.len() as u64;
        match &mut self.cursor {
            PollCursor::Tidewire(since) => {
                if status != 200 {
                    return Err(fail(format!("poll: server answered {status}")));
                }
                let body = if headers
                    .get("content-encoding")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
                {
                    let mut out = Vec::with_capacity(raw.len() * 8);
                    flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)?;
                    Bytes::from(out)
                } else {
                    raw
                };
                *since =
                    Some(next_cursor(&body).ok_or_else(|| fail("poll answer without \"next\""))?);
                Ok(PollAnswer { body, wire_bytes })
            }
            PollCursor::Nchan {
                last_modified,
                etag,
            } => match status {
                200 => {
                    let text = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    *last_modified = text("last-modified").or(last_modified.take());
                    *etag = text("etag").or(etag.take());
                    Ok(PollAnswer {
                        body: raw,
                        wire_bytes,
                    })
                }
                // Nchan's answers to a poll that waited in vain: poll again from the same place.
                304 | 408 => Ok(PollAnswer {
                    body: Bytes::new(),
                    wire_bytes,
                }),
                other => Err(fail(format!("poll: server answered {other}"))),
            },
        }
    }
}

/// The `"next":N` of a tidewire poll body (the last one: it follows the events).
fn next_cursor(body: &[u8]) -> Option<u64> {
    let key = b"\"next\":";
    let at = body.windows(key.len()).rposition(|w| w == key)? + key.len();
    parse_digits(&body[at..]).map(|(v, _)| v)
}

/// The index of the first `needle` in `hay`, eight bytes at a time.
pub(crate) fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let rep = LO * needle as u64;
    let mut chunks = hay.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ rep;
        // A zero byte of `w` is a match; the lowest flagged byte is always a true one.
        let z = w.wrapping_sub(LO) & !w & HI;
        if z != 0 {
            return Some(base + (z.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|p| base + p)
}

/// Leading ASCII digits of `s` as a number, and how many there were (None: none, or more
/// than a u64 holds).
fn parse_digits(s: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

/// The first `"ts":<digits>` in JSON text: its value and the index just after it.
pub(crate) fn json_ts(hay: &[u8]) -> Option<(u64, usize)> {
    let mut from = 0;
    while let Some(p) = find_byte(&hay[from..], b't') {
        let i = from + p;
        if i > 0 && hay[i - 1] == b'"' && hay[i + 1..].starts_with(b"s\":") {
            let start = i + 4;
            if let Some((v, n)) = parse_digits(&hay[start..]) {
                return Some((v, start + n));
            }
        }
        from = i + 1;
    }
    None
}

/// Calls `f` with every `"ts"` value in JSON text (a poll body, a batch, raw lines).
pub(crate) fn json_ts_all(mut hay: &[u8], mut f: impl FnMut(u64)) {
    while let Some((ts, end)) = json_ts(hay) {
        f(ts);
        hay = &hay[end..];
    }
}

/// The first `"ts"` key with an integer value in MessagePack bytes: its value and the index
/// just after it.
pub(crate) fn msgpack_ts(hay: &[u8]) -> Option<(u64, usize)> {
    let mut from = 0;
    while let Some(p) = find_byte(&hay[from..], 0xa2) {
        let i = from + p;
        from = i + 1;
        if !hay[i + 1..].starts_with(b"ts") {
            continue;
        }
        let at = i + 3;
        let &tag = hay.get(at)?;
        let be = |n: usize| -> Option<u64> {
            let b = hay.get(at + 1..at + 1 + n)?;
            Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
        };
        let v = match tag {
            0x00..=0x7f => Some((u64::from(tag), 1)),
            0xcc | 0xd0 => be(1).map(|v| (v, 2)),
            0xcd | 0xd1 => be(2).map(|v| (v, 3)),
            0xce | 0xd2 => be(4).map(|v| (v, 5)),
            0xcf | 0xd3 => be(8).map(|v| (v, 9)),
            _ => None,
        };
        if let Some((v, n)) = v {
            return Some((v, at + n));
        }
    }
    None
}

/// Calls `f` with every `"ts"` value in MessagePack bytes.
pub(crate) fn msgpack_ts_all(mut hay: &[u8], mut f: impl FnMut(u64)) {
    while let Some((ts, end)) = msgpack_ts(hay) {
        f(ts);
        hay = &hay[end..];
    }
}

/// Gunzips a WebSocket batch frame (tidewire's `batch=gzip`), refusing more than 256 MiB.
pub(crate) fn gunzip(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(payload.len() * 8);
    flate2::read::GzDecoder::new(payload)
        .take(256 << 20)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Splits an SSE body into lines as chunks arrive, and reports the `"ts"` of each `data:`
/// line (one per event: tidewire's envelope, Nchan's raw message).
#[derive(Default)]
pub(crate) struct LineScanner {
    pending: Vec<u8>,
}

/// The longest SSE line kept while waiting for its end; a longer one is dropped.
const MAX_LINE: usize = 4 << 20;

impl LineScanner {
    /// Feeds one chunk; calls `on_ts` for each complete `data:` line carrying a ts.
    pub(crate) fn push(&mut self, chunk: &[u8], mut on_ts: impl FnMut(u64)) {
        if self.pending.is_empty() {
            match chunk.iter().rposition(|&b| b == b'\n') {
                Some(last) => {
                    scan_lines(&chunk[..=last], &mut on_ts);
                    self.pending.extend_from_slice(&chunk[last + 1..]);
                }
                None => self.pending.extend_from_slice(chunk),
            }
        } else {
            self.pending.extend_from_slice(chunk);
            if let Some(last) = self.pending.iter().rposition(|&b| b == b'\n') {
                scan_lines(&self.pending[..=last], &mut on_ts);
                self.pending.drain(..=last);
            }
        }
        if self.pending.len() > MAX_LINE {
            self.pending.clear();
        }
    }
}

fn scan_lines(text: &[u8], on_ts: &mut impl FnMut(u64)) {
    let mut at = 0;
    while at < text.len() {
        let end = find_byte(&text[at..], b'\n').map_or(text.len(), |p| at + p);
        let line = &text[at..end];
        if line.starts_with(b"data:") {
            if let Some((ts, _)) = json_ts(line) {
                on_ts(ts);
            }
        }
        at = end + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_byte_agrees_with_a_plain_search() {
        let hay: Vec<u8> = (0..200u32).map(|i| (i * 7 % 251) as u8).collect();
        for needle in [0u8, 1, 7, 14, 250, 255, b'\n'] {
            for start in 0..20 {
                assert_eq!(
                    find_byte(&hay[start..], needle),
                    hay[start..].iter().position(|&b| b == needle),
                    "needle {needle} from {start}"
                );
            }
        }
        assert_eq!(find_byte(b"", b'x'), None);
        assert_eq!(find_byte(b"\x80\x00abcdefgh\n", b'\n'), Some(10));
    }

    #[test]
    fn ts_is_found_in_json_text_wherever_it_is() {
        let env =
            br#"{"id":7,"topic":"bench/t","time":1,"data":{"ts":1763800000123456,"pad":"ab"}}"#;
        assert_eq!(json_ts(env).map(|(v, _)| v), Some(1763800000123456));
        assert_eq!(json_ts(br#"{"ts":5}"#).map(|(v, _)| v), Some(5));
        assert_eq!(json_ts(br#"{"tsx":5,"t":"ts","x":{"ts":"no"}}"#), None);
        let mut all = Vec::new();
        json_ts_all(b"{\"ts\":1}\n{\"ts\":2}\n{\"ts\":3}", |v| all.push(v));
        assert_eq!(all, [1, 2, 3]);
        assert_eq!(json_ts(br#"{"ts":99999999999999999999999}"#), None);
    }

    #[test]
    fn ts_is_found_in_messagepack_in_every_integer_width() {
        for v in [5u64, 200, 60_000, 4_000_000_000, 1_763_800_000_123_456] {
            let data = serde_json::json!({"id": 1, "topic": "t", "data": {"ts": v, "pad": "xx"}});
            let bytes = rmp_serde::to_vec_named(&data).expect("encode");
            assert_eq!(msgpack_ts(&bytes).map(|(t, _)| t), Some(v), "ts {v}");
        }
        let two =
            rmp_serde::to_vec_named(&serde_json::json!([{"ts": 1}, {"ts": 2}])).expect("encode");
        let mut all = Vec::new();
        msgpack_ts_all(&two, |v| all.push(v));
        assert_eq!(all, [1, 2]);
        assert_eq!(msgpack_ts(&[0xa2, b't', b's']), None);
    }

    #[test]
    fn sse_lines_split_across_chunks_are_reassembled() {
        let text = b": hi\n\nid: 1\ndata: {\"ts\":11}\n\nid: 2\ndata: {\"data\":{\"ts\":22}}\n\n";
        for cut in 0..text.len() {
            let mut s = LineScanner::default();
            let mut got = Vec::new();
            s.push(&text[..cut], |v| got.push(v));
            s.push(&text[cut..], |v| got.push(v));
            assert_eq!(got, [11, 22], "cut at {cut}");
        }
    }

    #[test]
    fn the_poll_cursor_is_the_last_next() {
        assert_eq!(
            next_cursor(br#"{"events":[{"data":{"next":3}}],"next":42}"#),
            Some(42)
        );
        assert_eq!(next_cursor(b"{}"), None);
    }
}
