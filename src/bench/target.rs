//! Server flavours and URL templates: where each transport of `tidewire bench` connects, and
//! which options only tidewire understands.
//!
//! | what | tidewire (default) | nginx + Nchan (`benches/nchan.conf`) |
//! |---|---|---|
//! | publish over HTTP | `POST /v1/topics/{topic}/events`, a JSON envelope (or a batch) | `POST /pub?id={topic}`, the raw data |
//! | publish over WebSocket | `/v1/ws`, `{"op":"publish",…}` frames, acked | `/pub?id={topic}`, one text frame per message, answered with channel info |
//! | SSE | `/v1/sse?topic={topic}` | `/sub?id={topic}` (`Accept: text/event-stream`) |
//! | WebSocket | `/v1/ws?topic={topic}` (subprotocol per encoding) | `/sub?id={topic}` (text frames of raw data) |
//! | long-poll | `/v1/poll?topic={topic}` (+ `since`, `timeout`, `limit`) | `/lp?id={topic}` (+ `If-Modified-Since`, `If-None-Match`) |
//! | replay from the start | `…&last_event_id=0` (SSE), `…&since=0` (WebSocket, poll) | `/replay?id={topic}` (SSE, WebSocket), `/lp?id={topic}` (poll) |

use super::report::Report;
use super::{fail, Common, Error};

/// Which server the bench talks to: decides the default URLs and the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// tidewire: JSON envelopes in, envelopes out (the contract in the README).
    Tidewire,
    /// nginx with the Nchan module: raw message bodies in and out, no batching.
    Nchan,
}

impl Target {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Tidewire => "tidewire",
            Target::Nchan => "nchan",
        }
    }
}

/// How subscribers receive events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
    /// Long-poll.
    Poll,
}

impl Transport {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Poll => "poll",
        }
    }
}

/// How a subscribing mode's subscriptions receive: `--transport` and `--encoding`, shared by
/// `fanout`, `idle` and `resume`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Via {
    /// How the subscriptions receive events.
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// WebSocket frame encoding (msgpack: tidewire only, with --transport ws).
    #[arg(long, value_enum, default_value_t = Encoding::Json)]
    pub encoding: Encoding,
}

impl Via {
    /// True for MessagePack frames.
    pub fn msgpack(self) -> bool {
        self.encoding == Encoding::Msgpack
    }

    /// Refuses what no server serves: MessagePack frames outside a tidewire WebSocket.
    pub fn check(self, common: &Common) -> Result<(), Error> {
        common.tidewire_only(self.msgpack(), "--encoding msgpack")?;
        if self.msgpack() && self.transport != Transport::Ws {
            return Err(fail("--encoding msgpack is for --transport ws"));
        }
        Ok(())
    }

    /// Names the transport in a report, and the encoding when it is a WebSocket.
    pub(crate) fn report(self, r: &mut Report) {
        r.put("transport", "transport", self.transport.name());
        if self.transport == Transport::Ws {
            r.put("encoding", "encoding", self.encoding.name());
        }
    }
}

/// How publishers send events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishTransport {
    /// One HTTP POST per request, keep-alive connections.
    Http,
    /// Publish frames over WebSockets, one in flight per socket.
    Ws,
}

impl PublishTransport {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            PublishTransport::Http => "http",
            PublishTransport::Ws => "ws",
        }
    }
}

/// The encoding of WebSocket frames (tidewire's subprotocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// `tidewire.v1.json`: text frames of JSON.
    Json,
    /// `tidewire.v1.msgpack`: binary frames of MessagePack.
    Msgpack,
}

impl Encoding {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }

    /// The WebSocket subprotocol tidewire answers in this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "tidewire.v1.json",
            Encoding::Msgpack => "tidewire.v1.msgpack",
        }
    }
}

/// The body format of a tidewire publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `application/json`: one envelope, or an array of them for a batch.
    Json,
    /// `application/x-ndjson`: one envelope per line.
    Ndjson,
    /// `application/msgpack`: a map envelope, or an array of them.
    Msgpack,
}

impl Format {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ndjson => "ndjson",
            Format::Msgpack => "msgpack",
        }
    }
}

/// A URL with `{topic}` in it, resolved to the `host:port` to connect to and the request
/// target (path and query) to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    authority: String,
    path: String,
}

impl UrlTemplate {
    /// Parses `template`: a path (`/pub?id={topic}`) on `addr`, or a full
    /// `http://host:port/path` or `ws://host:port/path` URL. Refuses `https`/`wss` (the bench
    /// speaks cleartext) and templates without a path.
    pub fn parse(template: &str, addr: &str) -> Result<UrlTemplate, String> {
        if template.starts_with('/') {
            return Ok(UrlTemplate {
                authority: addr.to_string(),
                path: template.to_string(),
            });
        }
        let rest = template
            .strip_prefix("http://")
            .or_else(|| template.strip_prefix("ws://"))
            .ok_or_else(|| {
                format!("URL template {template:?}: give a /path or an http:// or ws:// URL")
            })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("URL template {template:?} has no host"));
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(UrlTemplate {
            authority,
            path: path.to_string(),
        })
    }

    /// The `host:port` to connect to.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The request target with `{topic}` replaced by `topic`.
    pub fn path(&self, topic: &str) -> String {
        self.path.replace("{topic}", topic)
    }
}

/// The default publish path of `target` over `transport`.
fn default_pub(target: Target, transport: PublishTransport) -> &'static str {
    match (target, transport) {
        (Target::Tidewire, PublishTransport::Http) => "/v1/topics/{topic}/events",
        (Target::Tidewire, PublishTransport::Ws) => "/v1/ws",
        (Target::Nchan, _) => "/pub?id={topic}",
    }
}

/// The default live-subscribe path of `target` over `transport`.
fn default_sub(target: Target, transport: Transport) -> &'static str {
    match (target, transport) {
        (Target::Tidewire, Transport::Sse) => "/v1/sse?topic={topic}",
        (Target::Tidewire, Transport::Ws) => "/v1/ws?topic={topic}",
        (Target::Tidewire, Transport::Poll) => "/v1/poll?topic={topic}",
        (Target::Nchan, Transport::Sse | Transport::Ws) => "/sub?id={topic}",
        (Target::Nchan, Transport::Poll) => "/lp?id={topic}",
    }
}

/// The default replay-from-the-start path of `target` over `transport`. tidewire's poll path
/// gets its `since` cursor from the bench, starting at 0.
fn default_replay(target: Target, transport: Transport) -> &'static str {
    match (target, transport) {
        (Target::Tidewire, Transport::Sse) => "/v1/sse?topic={topic}&last_event_id=0",
        (Target::Tidewire, Transport::Ws) => "/v1/ws?topic={topic}&since=0",
        (Target::Tidewire, Transport::Poll) => "/v1/poll?topic={topic}",
        (Target::Nchan, Transport::Sse | Transport::Ws) => "/replay?id={topic}",
        (Target::Nchan, Transport::Poll) => "/lp?id={topic}",
    }
}

impl Common {
    /// Where publishes over `transport` go: `--pub-url`, else the target's default.
    pub fn publish_url(&self, transport: PublishTransport) -> Result<UrlTemplate, Error> {
        let t = self
            .pub_url
            .as_deref()
            .unwrap_or(default_pub(self.target, transport));
        UrlTemplate::parse(t, &self.addr).map_err(fail)
    }

    /// Where live subscriptions over `transport` go: `--sub-url`, else the target's default.
    pub fn subscribe_url(&self, transport: Transport) -> Result<UrlTemplate, Error> {
        let t = self
            .sub_url
            .as_deref()
            .unwrap_or(default_sub(self.target, transport));
        UrlTemplate::parse(t, &self.addr).map_err(fail)
    }

    /// Where a replay from the start over `transport` goes: `--replay-url`, else the target's
    /// default.
    pub fn replay_url(&self, transport: Transport) -> Result<UrlTemplate, Error> {
        let t = self
            .replay_url
            .as_deref()
            .unwrap_or(default_replay(self.target, transport));
        UrlTemplate::parse(t, &self.addr).map_err(fail)
    }

    /// Refuses an option Nchan has no equivalent for: `option` names it, `used` says whether
    /// it was given a non-default value.
    pub fn tidewire_only(&self, used: bool, option: &str) -> Result<(), Error> {
        if used && self.target == Target::Nchan {
            return Err(fail(format!(
                "{option} is tidewire-only: Nchan publishes one raw message per request and \
                 delivers raw message bodies (no batching, formats, gzip or MessagePack)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_paths_on_addr_or_full_urls() {
        let t = UrlTemplate::parse("/pub?id={topic}", "127.0.0.1:9").expect("path");
        assert_eq!(t.authority(), "127.0.0.1:9");
        assert_eq!(t.path("a/b"), "/pub?id=a/b");
        let t =
            UrlTemplate::parse("http://127.0.0.1:8080/v1/topics/{topic}/events", "x").expect("url");
        assert_eq!(t.authority(), "127.0.0.1:8080");
        assert_eq!(t.path("s/1"), "/v1/topics/s/1/events");
        let t = UrlTemplate::parse("ws://localhost/sub", "x").expect("ws url");
        assert_eq!(t.authority(), "localhost:80");
        assert_eq!(t.path("s"), "/sub");
        assert!(UrlTemplate::parse("https://h/x", "x").is_err());
        assert!(UrlTemplate::parse("pub?id={topic}", "x").is_err());
        assert!(UrlTemplate::parse("http:///x", "x").is_err());
    }

    #[test]
    fn messagepack_frames_are_refused_off_a_tidewire_websocket_in_every_subscribing_mode() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            mode: super::super::Mode,
        }
        let via_of = |args: &[&str]| -> (Via, Common) {
            let cli = Cli::try_parse_from(args).expect("flags parse");
            match cli.mode {
                super::super::Mode::Fanout(a) => (a.via, a.common),
                super::super::Mode::Idle(a) => (a.via, a.common),
                super::super::Mode::Resume(a) => (a.via, a.common),
                super::super::Mode::Publish(_) => unreachable!("not a subscribing mode"),
            }
        };
        for mode in ["fanout", "idle", "resume"] {
            let (via, c) = via_of(&["b", mode, "--transport", "ws", "--encoding", "msgpack"]);
            assert!(via.check(&c).is_ok(), "{mode}");
            let (via, c) = via_of(&["b", mode, "--transport", "sse", "--encoding", "msgpack"]);
            assert!(via.check(&c).is_err(), "{mode}: msgpack over SSE");
            let (via, c) = via_of(&[
                "b",
                mode,
                "--transport",
                "ws",
                "--encoding",
                "msgpack",
                "--target",
                "nchan",
            ]);
            assert!(via.check(&c).is_err(), "{mode}: msgpack on Nchan");
            let (via, c) = via_of(&["b", mode, "--transport", "poll", "--target", "nchan"]);
            assert!(via.check(&c).is_ok(), "{mode}: JSON long-poll on Nchan");
        }
    }
}
