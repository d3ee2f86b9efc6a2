//! A lean HTTP/1.1 path for Server-Sent Events on plain TCP connections.
//!
//! hyper keeps a read buffer (8 KiB, which its adaptive strategy grows to 16 KiB) and an
//! 8 KiB write buffer for every HTTP/1 connection for as long as it is open, so each idle SSE
//! subscriber held about 27 KB of memory, most of it these buffers. This module owns the
//! first request of a fresh cleartext connection instead:
//!
//! - [`sniff`] reads the request head with a small buffer. A `GET /v1/sse` over HTTP/1.1
//!   with no body, no upgrade and no `Expect` becomes a [`Request`] ([`parse_head`], a pure
//!   function); anything else (another path or method, HTTP/1.0 or HTTP/2, a head over the
//!   limit, bytes that do not parse) goes to hyper unchanged, with the bytes already read
//!   replayed (`limits::WatchedIo::replay`), so hyper answers exactly as it did before.
//! - [`serve`] answers the request with the same router as every other request
//!   (`http::handle`: auth, CORS, limits, errors), writes the status line, the headers, a
//!   `date` and `connection: close`, then the body (chunked, or with `content-length` when
//!   its size is known) as it comes, with no buffer of its own between frames. It stops when
//!   the body ends (shutdown, token expiry, log failure) or the client closes its side, and
//!   then closes the connection: an event stream is the last request of its connection.
//!
//! TLS connections and HTTP/2 keep hyper's path.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::AppState;
use crate::limits::{ClientAddr, RequestGuard};

/// The request line's start that selects this path; `?` or a space must follow it.
const SSE_LINE: &[u8] = b"GET /v1/sse";

/// Most header fields a head may have to be served here (hyper's own default limit); a head
/// with more goes to hyper, which answers it.
const MAX_HEADERS: usize = 100;

/// First size of the head buffer; it doubles up to the head limit.
const HEAD_BUFFER: usize = 512;

/// The request this path serves: an event stream's `GET`, body-less.
pub type StreamRequest = Request<Empty<Bytes>>;

/// What [`parse_head`] made of the bytes read so far.
#[derive(Debug)]
pub enum Head {
    /// A prefix of a head this path may serve: read more.
    Partial,
    /// A complete `GET /v1/sse` head this path serves.
    Stream(Box<StreamRequest>),
    /// Anything else: hyper serves the connection.
    Other,
}

/// Classifies the first bytes of a connection. Never reads past the end of the head: bytes
/// after it (a pipelined request) are ignored by this path.
pub fn parse_head(buf: &[u8]) -> Head {
    let n = buf.len().min(SSE_LINE.len());
    if buf[..n] != SSE_LINE[..n] {
        return Head::Other;
    }
    match buf.get(SSE_LINE.len()) {
        None => return Head::Partial,
        Some(b' ' | b'?') => {}
        Some(_) => return Head::Other,
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(_)) => {
            build_request(&parsed).map_or(Head::Other, |req| Head::Stream(Box::new(req)))
        }
        // hyper answers what does not parse (400) or has too many fields (431).
        Err(_) => Head::Other,
    }
}

/// The request of a parsed head, or `None` when hyper should serve it: not HTTP/1.1, a body
/// or an upgrade announced, `Expect`, a target or field value the `http` types refuse.
fn build_request(parsed: &httparse::Request<'_, '_>) -> Option<StreamRequest> {
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = parsed.path?.parse().ok()?;
    let headers = req.headers_mut();
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        let hands_over = match name {
            header::CONTENT_LENGTH => value.as_bytes() != b"0",
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => true,
            _ => false,
        };
        if hands_over {
            return None;
        }
        headers.append(name, value);
    }
    Some(req)
}

/// What [`sniff`] found on a fresh connection.
pub enum Sniffed {
    /// An event stream request, its head fully read.
    Stream(Box<StreamRequest>),
    /// Another request (or none): hyper serves the connection, these bytes first.
    Other(Bytes),
}

/// Reads the first request head of a connection, at most `limit` bytes of it, and says who
/// serves it. Bytes past the head of a stream request are dropped; for any other request
/// every byte read is handed back. A read error ends the connection.
pub async fn sniff<I: AsyncRead + Unpin>(io: &mut I, limit: usize) -> io::Result<Sniffed> {
    let mut buf = Vec::with_capacity(HEAD_BUFFER);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
        if io.read_buf(&mut buf).await? == 0 {
            // The client closed first: hyper sees the same end.
            return Ok(Sniffed::Other(Bytes::from(buf)));
        }
        match parse_head(&buf) {
            Head::Partial if buf.len() < limit => continue,
            Head::Stream(req) => return Ok(Sniffed::Stream(req)),
            // Over the limit (hyper answers 431) or not ours.
            Head::Partial | Head::Other => return Ok(Sniffed::Other(Bytes::from(buf))),
        }
    }
}

/// Answers an event stream request on `io` and closes the connection when the answer ends
/// or the client goes away. `_in_flight` marks the request as in flight for the
/// connection's timeouts until then.
pub async fn serve<I: AsyncRead + AsyncWrite + Unpin>(
    state: Arc<AppState>,
    mut io: I,
    req: Box<StreamRequest>,
    client: ClientAddr,
    _in_flight: RequestGuard,
) {
    let mut req = *req;
    req.extensions_mut().insert(client);
    // Boxed: the router's future is large and done before the stream starts; only what the
    // stream needs stays in this connection's task.
    let resp = Box::pin(super::handle(state, req)).await;
    let (parts, mut body) = resp.into_parts();
    let length = body.size_hint().exact();
    let head = encode_head(&parts, length, SystemTime::now());
    // Only the body is needed from here on: the headers' memory goes back now, not when the
    // stream ends.
    drop(parts);
    if io.write_all(&head).await.is_err() {
        return;
    }
    drop(head);
    // Client bytes after the head are not requests this connection will serve; reading them
    // is how a closed client is noticed while the stream is quiet.
    let mut probe = [0u8; 16];
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            read = io.read(&mut probe) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let written = match length {
            Some(_) => io.write_all(&data).await,
            None => {
                let size = format!("{:x}\r\n", data.len());
                write_all_vectored(
                    &mut io,
                    &mut [
                        IoSlice::new(size.as_bytes()),
                        IoSlice::new(&data),
                        IoSlice::new(b"\r\n"),
                    ],
                )
                .await
            }
        };
        if written.is_err() {
            return;
        }
    }
    if length.is_none() && io.write_all(b"0\r\n\r\n").await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
}

/// The status line and header block of a response: its own headers, then `date`,
/// `connection: close` and the framing (`content-length` when `length` is known, else
/// chunked). Framing and connection headers the response carries are replaced.
pub fn encode_head(parts: &http::response::Parts, length: Option<u64>, now: SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION | header::DATE
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\n");
    match length {
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes every byte of `bufs`, with as few system calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn stream(head: &str) -> StreamRequest {
        match parse_head(head.as_bytes()) {
            Head::Stream(req) => *req,
            other => panic!("{head:?} gave {other:?}"),
        }
    }

    #[test]
    fn an_sse_get_over_http_1_1_is_served_here_with_its_target_and_fields() {
        let req = stream(
            "GET /v1/sse?topic=a/b HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 41\r\nAccept: text/event-stream\r\n\r\n",
        );
        assert_eq!(req.uri().path(), "/v1/sse");
        assert_eq!(req.uri().query(), Some("topic=a/b"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["last-event-id"], "41");
        assert_eq!(req.headers()["host"], "x");
        let req = stream("GET /v1/sse HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(req.headers()["content-length"], "0");
    }

    #[test]
    fn every_prefix_of_an_sse_head_asks_for_more() {
        let head = b"GET /v1/sse?topic=a HTTP/1.1\r\nHost: x\r\n\r\n";
        for end in 0..head.len() {
            assert!(
                matches!(parse_head(&head[..end]), Head::Partial),
                "prefix of {end} bytes"
            );
        }
        assert!(matches!(parse_head(head), Head::Stream(_)));
    }

    #[test]
    fn other_requests_go_to_hyper_as_soon_as_they_differ() {
        for head in [
            "POST /v1/sse HTTP/1.1\r\n\r\n",
            "GET /v1/ssex HTTP/1.1\r\n\r\n",
            "GET /v1/ws HTTP/1.1\r\n\r\n",
            "HEAD /v1/sse HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "G",
            "GET /v1/sse HTTP/1.0\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /v1/sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nX: \x01\r\n\r\n",
            "GET /v1/sse?\x7f HTTP/1.1\r\n\r\n",
        ] {
            if head == "G" {
                assert!(matches!(parse_head(head.as_bytes()), Head::Partial));
                continue;
            }
            assert!(
                matches!(parse_head(head.as_bytes()), Head::Other),
                "{head:?} should go to hyper"
            );
        }
        let many = format!(
            "GET /v1/sse HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(parse_head(many.as_bytes()), Head::Other));
    }

    #[test]
    fn the_head_names_the_framing_the_date_and_the_close() {
        let resp = http::Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .header("connection", "keep-alive")
            .header("content-length", "999")
            .body(())
            .unwrap();
        let (parts, ()) = resp.into_parts();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_763_800_000);
        let head = String::from_utf8(encode_head(&parts, None, at)).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             date: Sat, 22 Nov 2025 08:26:40 GMT\r\nconnection: close\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        let head = String::from_utf8(encode_head(&parts, Some(12), at)).unwrap();
        assert!(
            head.ends_with("connection: close\r\ncontent-length: 12\r\n\r\n"),
            "{head}"
        );
    }
}
