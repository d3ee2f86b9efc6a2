//! WebSocket message codec: client ops in, server frames out, in JSON (`tidewire.v1.json`,
//! text frames) and MessagePack (`tidewire.v1.msgpack`, binary frames).
//!
//! Pure functions, free of I/O and async, so fuzzers and property tests call them directly.
//! A publish op is decoded by [`codec::decode_publish`], the same
//! validation as an HTTP publish; this module only reads the op's head (`op`, `ref`, `topics`,
//! `since`) and renders the server's own frames (ack, error, gap, pong, gzip batches).

use std::io::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{self, BareDefaults, BodyFormat, DecodeError, Limits, Target};
use crate::envelope::{write_envelope_array, EventId, Gap, NewEvent, SharedEvent, WireFormat};
use crate::http::start::StartOptions;
use crate::topic::{parse_cursor, Pattern, Topic};

/// The subprotocol offered by JSON clients (text frames); also the default when none is offered.
pub const SUBPROTOCOL_JSON: &str = "tidewire.v1.json";
/// The subprotocol offered by MessagePack clients (binary frames).
pub const SUBPROTOCOL_MSGPACK: &str = "tidewire.v1.msgpack";

/// The encoding of one socket, fixed by its subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON in text frames.
    Json,
    /// MessagePack in binary frames.
    Msgpack,
}

impl Encoding {
    /// The subprotocol name of this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::Msgpack => SUBPROTOCOL_MSGPACK,
        }
    }

    /// Picks the encoding from a `Sec-WebSocket-Protocol` header value (comma-separated, in the
    /// client's order of preference). `Ok(None)`: no subprotocol offered (JSON, none echoed).
    /// `Err`: only unknown subprotocols were offered.
    pub fn negotiate(offered: Option<&str>) -> Result<Option<Encoding>, String> {
        let Some(offered) = offered else {
            return Ok(None);
        };
        let mut any = false;
        for p in offered.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            any = true;
            if p.eq_ignore_ascii_case(SUBPROTOCOL_JSON) {
                return Ok(Some(Encoding::Json));
            }
            if p.eq_ignore_ascii_case(SUBPROTOCOL_MSGPACK) {
                return Ok(Some(Encoding::Msgpack));
            }
        }
        if !any {
            return Ok(None);
        }
        Err(format!(
            "unsupported WebSocket subprotocol {offered:?}: offer {SUBPROTOCOL_JSON} or {SUBPROTOCOL_MSGPACK}"
        ))
    }
}

/// A client's request id, echoed in the answer: a string or an integer, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ref {
    /// `"ref": "r1"`
    Str(String),
    /// `"ref": 7`
    Int(i64),
}

/// A decoded client op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// Add patterns; with `since`, their retained history after it first.
    Subscribe {
        /// Validated patterns.
        topics: Vec<Pattern>,
        /// Resume cursor for these patterns.
        since: Option<EventId>,
        /// `"start": "latest"` and `"start_time"` (a cursor wins over both).
        start: StartOptions,
        /// Request id.
        r#ref: Option<Ref>,
    },
    /// Remove patterns.
    Unsubscribe {
        /// Validated patterns.
        topics: Vec<Pattern>,
        /// Request id.
        r#ref: Option<Ref>,
    },
    /// Publish one event; answered with an ack once durable.
    Publish {
        /// The validated event (exactly one).
        events: Vec<NewEvent>,
        /// Request id.
        r#ref: Option<Ref>,
    },
    /// Application-level ping; answered with a pong.
    Ping {
        /// Request id.
        r#ref: Option<Ref>,
    },
    /// A fresh token for this socket (`{"op":"auth","token":"…"}`): once verified its grants
    /// replace the old ones and the socket lives until it expires.
    Auth {
        /// The token, as presented (verified by the socket, not here).
        token: String,
        /// Request id.
        r#ref: Option<Ref>,
    },
}

/// A refused client frame: answered with an error frame, nothing is stored, the socket stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The contract's snake_case code.
    pub code: &'static str,
    /// A sentence for a person.
    pub message: String,
    /// The request id, when the frame carried one that could be read.
    pub r#ref: Option<Ref>,
}

impl FrameError {
    /// An error without a request id.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            r#ref: None,
        }
    }

    fn with_ref(mut self, r: Option<Ref>) -> Self {
        self.r#ref = r;
        self
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Since {
    Num(u64),
    Text(String),
}

#[derive(Deserialize)]
struct Head {
    op: String,
    #[serde(default, rename = "ref")]
    r#ref: Option<Ref>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    start_time: Option<Since>,
    #[serde(default)]
    topic: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RefOnly {
    #[serde(default, rename = "ref")]
    r#ref: Option<Ref>,
}

fn read<'a, T: Deserialize<'a>>(enc: Encoding, frame: &'a [u8]) -> Result<T, FrameError> {
    match enc {
        Encoding::Json => serde_json::from_slice(frame).map_err(|e| {
            if e.is_data() {
                FrameError::new("invalid_frame", format!("not a tidewire op: {e}"))
            } else {
                FrameError::new("malformed_frame", format!("invalid JSON: {e}"))
            }
        }),
        // `parse_client` has checked that the frame is one well-formed MessagePack value, so
        // whatever rmp-serde refuses here is a value of the wrong shape.
        Encoding::Msgpack => rmp_serde::from_slice(frame)
            .map_err(|e| FrameError::new("invalid_frame", format!("not a tidewire op: {e}"))),
    }
}

fn patterns(topics: Option<Vec<String>>, max_topic_len: usize) -> Result<Vec<Pattern>, FrameError> {
    let topics = topics.unwrap_or_default();
    if topics.is_empty() {
        return Err(FrameError::new(
            "invalid_frame",
            "`topics` must be a non-empty list of patterns",
        ));
    }
    topics
        .iter()
        .map(|t| {
            Pattern::parse_with_limit(t, max_topic_len)
                .map_err(|e| FrameError::new("invalid_pattern", format!("pattern {t:?} {e}")))
        })
        .collect()
}

fn decode_error(e: DecodeError) -> FrameError {
    let code = match &e {
        DecodeError::Malformed(_) => "malformed_frame",
        DecodeError::InflatesTooLarge(_) => "payload_too_large",
        DecodeError::TooManyEvents { .. } => "too_many_events",
        DecodeError::Invalid(_)
        | DecodeError::UnsupportedMediaType(_)
        | DecodeError::UnsupportedEncoding(_) => "invalid_envelope",
    };
    FrameError::new(code, e.to_string())
}

/// Decodes one client message of the socket's encoding. The caller has already checked the
/// frame type (text for JSON, binary for MessagePack) and the size limit.
pub fn parse_client(enc: Encoding, frame: &[u8], limits: &Limits) -> Result<ClientOp, FrameError> {
    // The line an HTTP body has too: bytes that are not one MessagePack value are malformed.
    // rmp-serde alone would call a never-used byte a type mismatch and ignore bytes after the
    // value; serde_json already refuses both as syntax.
    if enc == Encoding::Msgpack {
        if let Err(why) = codec::msgpack_well_formed(frame) {
            return Err(FrameError::new("malformed_frame", why));
        }
    }
    let head: Head = match read(enc, frame) {
        Ok(h) => h,
        Err(e) => {
            // Echo the ref even when the rest of the op is unreadable.
            let r = read::<RefOnly>(enc, frame).ok().and_then(|r| r.r#ref);
            return Err(e.with_ref(r));
        }
    };
    let r = head.r#ref;
    let op = match head.op.as_str() {
        "subscribe" => {
            let topics =
                patterns(head.topics, limits.max_topic_len).map_err(|e| e.with_ref(r.clone()))?;
            let since = match head.since {
                None => None,
                Some(Since::Num(n)) => Some(EventId(n)),
                Some(Since::Text(s)) => match parse_cursor(&s) {
                    Some(n) => Some(EventId(n)),
                    None => {
                        return Err(FrameError::new(
                            "invalid_cursor",
                            format!("the cursor {s:?} is not an event id"),
                        )
                        .with_ref(r))
                    }
                },
            };
            let mut start = StartOptions::default();
            let read_start = |start: &mut StartOptions| -> Result<(), crate::http::ApiError> {
                if let Some(v) = &head.start {
                    start.set_start(v)?;
                }
                match &head.start_time {
                    None => {}
                    Some(Since::Num(n)) => start.time = Some(*n),
                    Some(Since::Text(t)) => start.set_time(t)?,
                }
                Ok(())
            };
            if let Err(e) = read_start(&mut start) {
                return Err(FrameError::new(e.code, e.message).with_ref(r));
            }
            ClientOp::Subscribe {
                topics,
                since,
                start,
                r#ref: r,
            }
        }
        "unsubscribe" => ClientOp::Unsubscribe {
            topics: patterns(head.topics, limits.max_topic_len)
                .map_err(|e| e.with_ref(r.clone()))?,
            r#ref: r,
        },
        "ping" => ClientOp::Ping { r#ref: r },
        "auth" => {
            // Read on its own, so a publish envelope's fields never have to fit a token's type.
            #[derive(Deserialize)]
            struct TokenOnly {
                #[serde(default)]
                token: Option<String>,
            }
            match read::<TokenOnly>(enc, frame).map(|t| t.token) {
                Ok(Some(token)) if !token.is_empty() => ClientOp::Auth { token, r#ref: r },
                _ => {
                    return Err(FrameError::new(
                        "invalid_frame",
                        "`token` must be a non-empty string",
                    )
                    .with_ref(r))
                }
            }
        }
        "publish" => {
            if head.topic.is_some() {
                // Name the bad topic with its own code; the envelope is validated by the codec.
                #[derive(Deserialize)]
                struct TopicOnly {
                    topic: String,
                }
                if let Ok(TopicOnly { topic }) = read::<TopicOnly>(enc, frame) {
                    if let Err(e) = Topic::parse_with_limit(&topic, limits.max_topic_len) {
                        return Err(FrameError::new(
                            "invalid_topic",
                            format!("topic {topic:?} {e}"),
                        )
                        .with_ref(r));
                    }
                }
            }
            let format = match enc {
                Encoding::Json => BodyFormat::Json,
                Encoding::Msgpack => BodyFormat::Msgpack,
            };
            let events = codec::decode_publish(
                &Target::PerEnvelope,
                format,
                false,
                frame,
                limits,
                &BareDefaults::default(),
            )
            .map_err(|e| decode_error(e).with_ref(r.clone()))?;
            ClientOp::Publish { events, r#ref: r }
        }
        other => {
            return Err(FrameError::new(
                "unknown_op",
                format!("unknown op {other:?}: use subscribe, unsubscribe, publish, ping or auth"),
            )
            .with_ref(r))
        }
    };
    Ok(op)
}

/// A frame the server sends that is not an event envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame {
    /// Retention (or this socket's order) skipped events: complete again from `oldest`.
    Gap {
        /// The cursor asked for.
        requested: u64,
        /// The oldest id from which the stream is complete.
        oldest: u64,
    },
    /// A refused client frame.
    Error {
        /// The contract's code.
        code: &'static str,
        /// For a person.
        message: String,
        /// The request id, when there was one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
    },
    /// A request done: a publish is durable (`id`), a subscription is in place.
    Ack {
        /// The request id, when there was one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        /// The id of the published event (the original one when it was a repeat).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Set when the publish repeated a `(topic, msg_id)` and was not stored again.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// The answer to an accepted `auth` op: the new token's `exp` (Unix seconds), absent for
    /// a token without one.
    Auth {
        /// The request id, when there was one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
        /// When the new token expires.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// The answer to a `ping` op.
    Pong {
        /// The request id, when there was one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<Ref>,
    },
}

impl From<Gap> for ServerFrame {
    fn from(g: Gap) -> Self {
        ServerFrame::Gap {
            requested: g.requested,
            oldest: g.oldest,
        }
    }
}

impl From<FrameError> for ServerFrame {
    fn from(e: FrameError) -> Self {
        ServerFrame::Error {
            code: e.code,
            message: e.message,
            r#ref: e.r#ref,
        }
    }
}

/// Renders a server frame in the socket's encoding.
pub fn encode_server(enc: Encoding, frame: &ServerFrame) -> Bytes {
    // Plain maps of strings and numbers: neither serialiser can fail into a Vec.
    Bytes::from(match enc {
        Encoding::Json => serde_json::to_vec(frame).unwrap_or_default(),
        Encoding::Msgpack => rmp_serde::to_vec_named(frame).unwrap_or_default(),
    })
}

/// One event's envelope in the socket's encoding (built once per event, shared).
pub fn encode_event(enc: Encoding, event: &SharedEvent) -> Bytes {
    match enc {
        Encoding::Json => event.json().clone(),
        Encoding::Msgpack => event.msgpack().clone(),
    }
}

/// A `batch=gzip` frame: gzip of a JSON array or a MessagePack array of envelopes.
pub fn encode_batch(enc: Encoding, events: &[SharedEvent]) -> Bytes {
    let mut raw = Vec::with_capacity(events.iter().map(|e| e.json().len() + 1).sum::<usize>() + 8);
    let format = match enc {
        Encoding::Json => WireFormat::Json,
        Encoding::Msgpack => WireFormat::Msgpack,
    };
    write_envelope_array(format, events, &mut raw);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    let _ = gz.write_all(&raw);
    Bytes::from(gz.finish().unwrap_or_default())
}

/// Whether a binary frame is a gzip batch (starts with the gzip magic bytes).
pub fn is_gzip(frame: &[u8]) -> bool {
    frame.starts_with(&[0x1f, 0x8b])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Data, Event};
    use std::sync::Arc;

    fn limits() -> Limits {
        Limits::default()
    }

    fn json(frame: &str) -> Result<ClientOp, FrameError> {
        parse_client(Encoding::Json, frame.as_bytes(), &limits())
    }

    #[test]
    fn negotiation_prefers_the_clients_order_and_refuses_unknown_alone() {
        assert_eq!(Encoding::negotiate(None), Ok(None));
        assert_eq!(
            Encoding::negotiate(Some("foo, tidewire.v1.msgpack, tidewire.v1.json")),
            Ok(Some(Encoding::Msgpack))
        );
        assert_eq!(
            Encoding::negotiate(Some("tidewire.v1.json")),
            Ok(Some(Encoding::Json))
        );
        assert!(Encoding::negotiate(Some("chat")).is_err());
    }

    #[test]
    fn subscribe_with_since_and_ref() {
        let op = json(r#"{"op":"subscribe","topics":["a/**","b"],"since":12,"ref":"s1"}"#).unwrap();
        let ClientOp::Subscribe {
            topics,
            since,
            r#ref,
            ..
        } = op
        else {
            panic!("{op:?}")
        };
        assert_eq!(topics.len(), 2);
        assert_eq!(since, Some(EventId(12)));
        assert_eq!(r#ref, Some(Ref::Str("s1".into())));
        let op = json(r#"{"op":"subscribe","topics":["a"],"since":"7"}"#).unwrap();
        assert!(matches!(
            op,
            ClientOp::Subscribe {
                since: Some(EventId(7)),
                ..
            }
        ));
    }

    #[test]
    fn bad_frames_get_their_codes_and_keep_the_ref() {
        assert_eq!(json("{nope").unwrap_err().code, "malformed_frame");
        assert_eq!(json("[1,2]").unwrap_err().code, "invalid_frame");
        let e = json(r#"{"op":"dance","ref":3}"#).unwrap_err();
        assert_eq!((e.code, e.r#ref), ("unknown_op", Some(Ref::Int(3))));
        let e = json(r#"{"op":"subscribe","topics":["a/**/b"],"ref":"x"}"#).unwrap_err();
        assert_eq!(e.code, "invalid_pattern");
        assert_eq!(e.r#ref, Some(Ref::Str("x".into())));
        assert_eq!(
            json(r#"{"op":"subscribe","topics":[]}"#).unwrap_err().code,
            "invalid_frame"
        );
        let e = json(r#"{"op":"publish","topic":"a b","data":1,"ref":"p"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.r#ref),
            ("invalid_topic", Some(Ref::Str("p".into())))
        );
        let e =
            json(r#"{"op":"publish","topic":"a","data":"%%","encoding":"base64"}"#).unwrap_err();
        assert_eq!(e.code, "invalid_envelope");
        let e = json(r#"{"op":"publish","topic":"a","type":"gap","data":1}"#).unwrap_err();
        assert_eq!(e.code, "invalid_envelope");
        let e = json(r#"{"op":"subscribe","topics":"a","ref":"t"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.r#ref),
            ("invalid_frame", Some(Ref::Str("t".into())))
        );
    }

    #[test]
    fn publish_uses_the_publish_codec_in_both_encodings() {
        let op =
            json(r#"{"op":"publish","topic":"s/a","data":{"t":1},"type":"r","ref":"p1"}"#).unwrap();
        let ClientOp::Publish { events, r#ref } = op else {
            panic!()
        };
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].topic.as_str(), "s/a");
        assert_eq!(events[0].data, Data::Json(r#"{"t":1}"#.into()));
        assert_eq!(r#ref, Some(Ref::Str("p1".into())));

        #[derive(Serialize)]
        struct P<'a> {
            op: &'a str,
            topic: &'a str,
            data: &'a serde_bytes::Bytes,
            #[serde(rename = "ref")]
            r: i64,
        }
        let frame = rmp_serde::to_vec_named(&P {
            op: "publish",
            topic: "s/b",
            data: serde_bytes::Bytes::new(b"\x00\x01"),
            r: 9,
        })
        .unwrap();
        let op = parse_client(Encoding::Msgpack, &frame, &limits()).unwrap();
        let ClientOp::Publish { events, r#ref } = op else {
            panic!()
        };
        assert_eq!(events[0].data, Data::Bytes(Bytes::from_static(b"\x00\x01")));
        assert_eq!(r#ref, Some(Ref::Int(9)));
        let e = parse_client(Encoding::Msgpack, b"\x82\xa2o", &limits()).unwrap_err();
        assert_eq!(e.code, "malformed_frame");
    }

    /// A MessagePack map of `pairs` (string keys), each value given as its encoded bytes.
    fn msgpack_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = vec![0x80 | pairs.len() as u8];
        for (k, v) in pairs {
            out.push(0xa0 | k.len() as u8);
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    /// The same line as for an HTTP body: bytes that are not one JSON or MessagePack value
    /// (cut short, a byte MessagePack never uses, bytes after the value) are
    /// `malformed_frame`; a well-formed value that is not a tidewire op is `invalid_frame`.
    #[test]
    fn frames_that_are_not_one_value_are_malformed_and_values_that_are_no_op_are_invalid() {
        let mp = |frame: &[u8]| parse_client(Encoding::Msgpack, frame, &limits());
        let code = |r: Result<ClientOp, FrameError>| r.map(|_| ()).unwrap_err().code;
        let str8 = |s: &str| {
            let mut v = vec![0xa0 | s.len() as u8];
            v.extend_from_slice(s.as_bytes());
            v
        };
        let topics = [&[0x91u8][..], &str8("a")].concat();
        let subscribe = msgpack_map(&[("op", &str8("subscribe")), ("topics", &topics)]);
        assert!(mp(&subscribe).is_ok());

        // Not MessagePack at all.
        assert_eq!(code(mp(&[0xc1])), "malformed_frame");
        let reserved = msgpack_map(&[("op", &str8("subscribe")), ("x", &[0xc1])]);
        assert_eq!(code(mp(&reserved)), "malformed_frame");
        let publish_reserved = msgpack_map(&[
            ("op", &str8("publish")),
            ("topic", &str8("a")),
            ("data", &[0xc1]),
        ]);
        assert_eq!(code(mp(&publish_reserved)), "malformed_frame");
        assert_eq!(
            code(mp(&[subscribe.as_slice(), &[0x00]].concat())),
            "malformed_frame"
        );
        assert_eq!(
            code(mp(&subscribe[..subscribe.len() - 1])),
            "malformed_frame"
        );
        assert_eq!(code(mp(&[])), "malformed_frame");

        // MessagePack, but no op.
        assert_eq!(code(mp(&[0x01])), "invalid_frame");
        assert_eq!(code(mp(&msgpack_map(&[("x", &[0x01])]))), "invalid_frame");
        assert_eq!(code(mp(&[0x92, 0x01, 0x02])), "invalid_frame");

        // JSON draws the same line.
        assert_eq!(
            code(json(r#"{"op":"subscribe","topics":["a"]} x"#)),
            "malformed_frame"
        );
        assert_eq!(
            code(json(r#"{"op":"subscribe","topics":["a"]"#)),
            "malformed_frame"
        );
        assert_eq!(code(json("")), "malformed_frame");
        assert_eq!(code(json("42")), "invalid_frame");
        assert_eq!(code(json(r#"{"x":1}"#)), "invalid_frame");
    }

    #[test]
    fn auth_ops_carry_a_token_and_are_answered_with_its_expiry() {
        let op = json(r#"{"op":"auth","token":"eyJ.a.b","ref":"a1"}"#).unwrap();
        assert_eq!(
            op,
            ClientOp::Auth {
                token: "eyJ.a.b".into(),
                r#ref: Some(Ref::Str("a1".into()))
            }
        );
        let e = json(r#"{"op":"auth","ref":2}"#).unwrap_err();
        assert_eq!((e.code, e.r#ref), ("invalid_frame", Some(Ref::Int(2))));
        assert_eq!(
            json(r#"{"op":"auth","token":""}"#).unwrap_err().code,
            "invalid_frame"
        );
        assert_eq!(
            json(r#"{"op":"auth","token":7}"#).unwrap_err().code,
            "invalid_frame"
        );
        #[derive(Serialize)]
        struct A<'a> {
            op: &'a str,
            token: &'a str,
        }
        let frame = rmp_serde::to_vec_named(&A {
            op: "auth",
            token: "t",
        })
        .unwrap();
        assert!(matches!(
            parse_client(Encoding::Msgpack, &frame, &limits()),
            Ok(ClientOp::Auth { .. })
        ));
        let answer = ServerFrame::Auth {
            r#ref: Some(Ref::Int(1)),
            exp: Some(1_763_800_000),
        };
        assert_eq!(
            &encode_server(Encoding::Json, &answer)[..],
            br#"{"op":"auth","ref":1,"exp":1763800000}"#
        );
    }

    #[test]
    fn server_frames_render_in_both_encodings() {
        let ack = ServerFrame::Ack {
            r#ref: Some(Ref::Str("r1".into())),
            id: Some(5),
            duplicate: false,
        };
        assert_eq!(
            &encode_server(Encoding::Json, &ack)[..],
            br#"{"op":"ack","ref":"r1","id":5}"#
        );
        let repeat = ServerFrame::Ack {
            r#ref: None,
            id: Some(5),
            duplicate: true,
        };
        assert_eq!(
            &encode_server(Encoding::Json, &repeat)[..],
            br#"{"op":"ack","id":5,"duplicate":true}"#
        );
        let v: serde_json::Value =
            rmp_serde::from_slice(&encode_server(Encoding::Msgpack, &ack)).unwrap();
        assert_eq!(v, serde_json::json!({"op":"ack","ref":"r1","id":5}));
        let gap: ServerFrame = Gap {
            requested: 1,
            oldest: 9,
        }
        .into();
        assert_eq!(
            &encode_server(Encoding::Json, &gap)[..],
            br#"{"op":"gap","requested":1,"oldest":9}"#
        );
    }

    #[test]
    fn gzip_batches_hold_the_envelopes() {
        let events: Vec<SharedEvent> = (1..=3)
            .map(|i| {
                Arc::new(Event::new(
                    EventId(i),
                    7,
                    NewEvent {
                        topic: Topic::parse("t").unwrap(),
                        event_type: None,
                        msg_id: None,
                        data: Data::Json(i.to_string().into()),
                    },
                ))
            })
            .collect();
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let frame = encode_batch(enc, &events);
            assert!(is_gzip(&frame));
            let raw = codec::gunzip(&frame, 1 << 20).unwrap();
            let v: serde_json::Value = match enc {
                Encoding::Json => serde_json::from_slice(&raw).unwrap(),
                Encoding::Msgpack => rmp_serde::from_slice(&raw).unwrap(),
            };
            let ids: Vec<u64> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids, [1, 2, 3]);
        }
    }
}
