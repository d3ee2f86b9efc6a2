//! A small HTTP client for the `publish` and `tail` commands, with a WHATWG-conformant SSE
//! parser. `tail` resumes with `Last-Event-ID` by itself when the connection drops.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not `http://host:port`.
    #[error("bad server URL {0:?}: expected http://host:port")]
    BadUrl(String),
    /// Connecting or talking to the server failed.
    #[error("{0}")]
    Transport(String),
    /// The data looks like JSON (starts with `{` or `[`) but does not parse.
    #[error("data is not valid JSON: {0}")]
    BadJson(String),
    /// The server refused the request.
    #[error("server answered {status}: {body}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: String,
    },
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

struct Server {
    authority: String,
    /// Sent as `Authorization: Bearer` on every request, when given.
    token: Option<String>,
}

impl Server {
    fn parse(url: &str) -> Result<Self, ClientError> {
        let uri: Uri = url.parse().map_err(|_| ClientError::BadUrl(url.into()))?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::BadUrl(url.into()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError::BadUrl(url.into()))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Server {
            authority: format!("{}:{port}", authority.host()),
            token: None,
        })
    }

    fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(transport)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(transport)
    }

    /// Sends `req` and reads the whole answer.
    async fn call(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        Ok((status, body))
    }

    fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, &self.authority);
        match &self.token {
            Some(t) => req.header(header::AUTHORIZATION, format!("Bearer {t}")),
            None => req,
        }
    }
}

/// Publishes one event to `topic`: `data` is sent as JSON when it parses as JSON, else as a
/// JSON string; text that starts like a JSON object or array must parse (a typo is refused,
/// not stored as a string). Returns the server's receipt (the 201 body). `token`, when given,
/// is sent as `Authorization: Bearer`.
pub async fn publish(
    server: &str,
    topic: &str,
    data: &str,
    event_type: Option<&str>,
    msg_id: Option<&str>,
    token: Option<&str>,
) -> Result<String, ClientError> {
    let server = Server::parse(server)?.with_token(token);
    let data: serde_json::Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) if data.trim_start().starts_with(['{', '[']) => {
            return Err(ClientError::BadJson(e.to_string()))
        }
        Err(_) => serde_json::Value::String(data.into()),
    };
    let mut env = serde_json::json!({ "data": data });
    if let Some(t) = event_type {
        env["type"] = t.into();
    }
    if let Some(m) = msg_id {
        env["msg_id"] = m.into();
    }
    let req = server
        .request(Method::POST, &format!("/v1/topics/{topic}/events"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(env.to_string())))
        .map_err(transport)?;
    let (status, body) = server.call(req).await?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if status == StatusCode::CREATED {
        Ok(body)
    } else {
        Err(ClientError::Refused { status, body })
    }
}

/// One dispatched SSE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` name, `message` when none was given.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id in force when the message was dispatched.
    pub last_event_id: String,
}

/// An incremental parser of `text/event-stream`, following the WHATWG rules: lines end in
/// CRLF, LF or CR; `:` starts a comment; one space after the colon is dropped; a blank line
/// dispatches; an `id` holding NUL is ignored; a message without data is not dispatched.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    event: String,
    data: Option<String>,
    last_event_id: String,
    /// The last `retry:` value, milliseconds.
    pub retry: Option<u64>,
}

impl SseParser {
    /// Feeds bytes; returns the messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                b'\n' => self.end_line(&mut out),
                _ => self.line.push(b),
            }
        }
        out
    }

    /// The last event id seen, the value to send as `Last-Event-ID`.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    fn end_line(&mut self, out: &mut Vec<SseMessage>) {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(SseMessage {
                    event: if self.event.is_empty() {
                        "message".into()
                    } else {
                        std::mem::take(&mut self.event)
                    },
                    data,
                    last_event_id: self.last_event_id.clone(),
                });
            }
            self.event.clear();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "id" if !value.contains('\0') => self.last_event_id = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }
}

/// Follows `patterns` over SSE, printing each event envelope on its own line to stdout (and
/// gap signals to stderr). Starts from `since` (live only when `None`), and on any
/// disconnect reconnects with `Last-Event-ID`, so no event is missed or printed twice.
/// Returns after `max_events` events when given. `token`, when given, is sent as
/// `Authorization: Bearer`; once it expires the server refuses the reconnect (401) and `tail`
/// fails, naming the refusal.
pub async fn tail(
    server: &str,
    patterns: &[String],
    since: Option<u64>,
    max_events: Option<u64>,
    token: Option<&str>,
) -> Result<(), ClientError> {
    let server = Server::parse(server)?.with_token(token);
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(patterns.iter().map(|p| ("topic", p.as_str())))
        .finish();
    let mut parser = SseParser::default();
    let mut cursor = since.map(|c| c.to_string());
    let mut printed = 0u64;
    loop {
        let mut req = server
            .request(Method::GET, &format!("/v1/sse?{query}"))
            .header(header::ACCEPT, "text/event-stream");
        if let Some(c) = &cursor {
            req = req.header("last-event-id", c);
        }
        let req = req.body(Full::new(Bytes::new())).map_err(transport)?;
        match server.send(req).await {
            Ok(resp) if resp.status() == StatusCode::OK => {
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    for msg in parser.push(data) {
                        if msg.event == "gap" {
                            eprintln!("gap: {}", msg.data);
                        } else {
                            println!("{}", msg.data);
                            printed += 1;
                        }
                        if !msg.last_event_id.is_empty() {
                            cursor = Some(msg.last_event_id.clone());
                        }
                        if max_events.is_some_and(|m| printed >= m) {
                            return Ok(());
                        }
                    }
                }
                eprintln!("stream ended; reconnecting");
            }
            // Not ready (a restarting server opening its log), overloaded, or a proxy with no
            // upstream: transient, so wait and resume like after a drop.
            Ok(resp)
                if resp.status().is_server_error()
                    || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
            {
                eprintln!("server answered {}; retrying", resp.status());
            }
            Ok(resp) => {
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(transport)?
                    .to_bytes();
                return Err(ClientError::Refused {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            Err(e) => eprintln!("cannot reach the server ({e}); retrying"),
        }
        tokio::time::sleep(Duration::from_millis(
            parser.retry.unwrap_or(1000).min(30_000),
        ))
        .await;
    }
}

/// An online backup: writes every retained event matching `patterns` with an id above
/// `since` from a running server to `out`, one JSON envelope per line (the export format,
/// without `msg_id`, which the wire never shows), by long-polling with `timeout=0` until a
/// poll finds nothing new. The export is consistent up to the cursor it returns: it holds
/// exactly the matching retained events with ids up to it, and a later export `--since` that
/// cursor continues it. Publishers need not stop.
pub async fn export(
    server: &str,
    patterns: &[String],
    since: u64,
    token: Option<&str>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(u64, u64), ClientError> {
    #[derive(serde::Deserialize)]
    struct Poll {
        events: Vec<Box<serde_json::value::RawValue>>,
        next: u64,
    }
    let server = Server::parse(server)?.with_token(token);
    let topics: String = patterns
        .iter()
        .map(|p| {
            format!(
                "topic={}&",
                form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>()
            )
        })
        .collect();
    let mut cursor = since;
    let mut written = 0u64;
    loop {
        let req = server
            .request(
                Method::GET,
                &format!("/v1/poll?{topics}since={cursor}&timeout=0&limit=10000"),
            )
            .body(Full::new(Bytes::new()))
            .map_err(transport)?;
        let (status, body) = server.call(req).await?;
        if status != StatusCode::OK {
            return Err(ClientError::Refused {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let poll: Poll =
            serde_json::from_slice(&body).map_err(|e| ClientError::BadJson(e.to_string()))?;
        for e in &poll.events {
            out.write_all(e.get().as_bytes()).map_err(transport)?;
            out.write_all(b"\n").map_err(transport)?;
        }
        written += poll.events.len() as u64;
        if poll.events.is_empty() || poll.next <= cursor {
            out.flush().map_err(transport)?;
            return Ok((written, poll.next.max(cursor)));
        }
        cursor = poll.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_follows_the_whatwg_rules() {
        let mut p = SseParser::default();
        let msgs = p.push(
            b"retry: 500\n\n: comment\nid: 7\nevent: reading\ndata: a\r\ndata:b\r\rdata: c\n",
        );
        assert_eq!(p.retry, Some(500));
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].event, "reading");
        assert_eq!(msgs[0].data, "a\nb");
        assert_eq!(msgs[0].last_event_id, "7");
        let msgs = p.push(b"\n");
        assert_eq!(msgs[0].data, "c");
        assert_eq!(msgs[0].event, "message");
    }
}
