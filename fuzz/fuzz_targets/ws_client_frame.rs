//! `ws_frame::parse_client`, the reader of WebSocket client ops, in both encodings: JSON text
//! frames (`tidewire.v1.json`) and MessagePack binary frames (`tidewire.v1.msgpack`). The
//! server takes no gzip from clients (only its own `batch=gzip` frames are gzip, see
//! `ws_frame::is_gzip`), so a gzip frame must be refused; the server's gzip batches are
//! checked to hold exactly the envelopes they were built from.
//!
//! Input: the first byte picks the encoding (bit 0) and the limits (bit 1); the rest is the
//! frame (as UTF-8, lossily, for JSON: text frames are UTF-8).
//!
//! Properties:
//! - subscribe/unsubscribe: a non-empty list of valid patterns within `max_topic_len`;
//!   publish: exactly one event, the one `codec::decode_publish` reads from the same frame,
//!   meeting `common::check_event`; auth: a non-empty token;
//! - a refused frame has one of the contract's codes, echoes a readable `ref`, and its error
//!   frame renders as JSON and MessagePack that read back to the same code, message and ref;
//! - a MessagePack frame that is not one well-formed value (`codec::msgpack_well_formed`) is
//!   refused as `malformed_frame`, never as a frame of the wrong shape, and never accepted;
//! - a JSON frame that is accepted reads the same once transcoded to MessagePack;
//! - a gzip frame is never an op; `encode_batch` of the events read is gzip of exactly
//!   their envelopes.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::sync::Arc;

use base64::Engine as _;

use libfuzzer_sys::fuzz_target;
use tidewire::codec::{self, BareDefaults, BodyFormat, Limits, Target};
use tidewire::envelope::{Event, EventId, SharedEvent};
use tidewire::topic::Pattern;
use tidewire::ws_frame::{self, ClientOp, Encoding, FrameError, Ref, ServerFrame};

const CODES: [&str; 9] = [
    "malformed_frame",
    "invalid_frame",
    "invalid_pattern",
    "invalid_cursor",
    "invalid_topic",
    "invalid_envelope",
    "payload_too_large",
    "too_many_events",
    "unknown_op",
];

fn check_ok(op: &ClientOp, enc: Encoding, frame: &[u8], limits: &Limits) {
    match op {
        ClientOp::Subscribe { topics, .. } | ClientOp::Unsubscribe { topics, .. } => {
            assert!(!topics.is_empty());
            for p in topics {
                assert!(Pattern::parse_with_limit(p.as_str(), limits.max_topic_len).is_ok());
            }
        }
        ClientOp::Publish { events, .. } => {
            assert_eq!(events.len(), 1, "a publish op is one event");
            common::check_event(&events[0], limits.max_topic_len);
            let format = match enc {
                Encoding::Json => BodyFormat::Json,
                Encoding::Msgpack => BodyFormat::Msgpack,
            };
            let direct = codec::decode_publish(
                &Target::PerEnvelope,
                format,
                false,
                frame,
                limits,
                &BareDefaults::default(),
            );
            assert_eq!(direct.as_ref(), Ok(events));
            // The server's gzip batch of these events holds exactly their envelopes.
            let shared: Vec<SharedEvent> = events
                .iter()
                .enumerate()
                .map(|(i, e)| Arc::new(Event::new(EventId(i as u64 + 1), 5, e.clone())))
                .collect();
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let batch = ws_frame::encode_batch(enc, &shared);
                assert!(ws_frame::is_gzip(&batch));
                let raw = codec::gunzip(&batch, usize::MAX >> 1).expect("our own gzip");
                let mut want = Vec::new();
                match enc {
                    Encoding::Json => {
                        want.push(b'[');
                        want.extend_from_slice(shared[0].json());
                        want.push(b']');
                    }
                    Encoding::Msgpack => {
                        want.push(0x91);
                        want.extend_from_slice(shared[0].msgpack());
                    }
                }
                assert_eq!(raw, want);
            }
        }
        ClientOp::Auth { token, .. } => assert!(!token.is_empty()),
        ClientOp::Ping { .. } => {}
    }
}

/// The `ref` a JSON frame plainly carries: an object with exactly one `"ref"` key that is a
/// string or an i64.
fn plain_json_ref(frame: &[u8]) -> Option<Ref> {
    let text = std::str::from_utf8(frame).ok()?;
    if text.matches("\"ref\"").count() != 1 || text.contains('\\') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    match v.as_object()?.get("ref")? {
        serde_json::Value::String(s) => Some(Ref::Str(s.clone())),
        n => n.as_i64().map(Ref::Int),
    }
}

fn check_err(e: &FrameError, enc: Encoding, frame: &[u8]) {
    assert!(CODES.contains(&e.code), "code {:?}", e.code);
    if enc == Encoding::Json {
        if let Some(r) = plain_json_ref(frame) {
            assert_eq!(e.r#ref.as_ref(), Some(&r), "the ref is echoed");
        }
    }
    let server: ServerFrame = e.clone().into();
    let json: serde_json::Value =
        serde_json::from_slice(&ws_frame::encode_server(Encoding::Json, &server))
            .expect("an error frame is JSON");
    let mp: serde_json::Value =
        rmp_serde::from_slice(&ws_frame::encode_server(Encoding::Msgpack, &server))
            .expect("an error frame is MessagePack");
    assert_eq!(json, mp);
    assert_eq!(json["op"], "error");
    assert_eq!(json["code"], e.code);
    assert_eq!(json["message"], e.message.as_str());
    let r = json
        .get("ref")
        .map(|r| serde_json::from_value::<Ref>(r.clone()).expect("a ref"));
    assert_eq!(r, e.r#ref);
}

/// A JSON frame as the same frame in MessagePack: base64 data (`"encoding":"base64"`, JSON's
/// only way to carry bytes) becomes `bin`, MessagePack's.
fn transcode(frame: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(frame).expect("an accepted frame");
    let mut m = rmpv::ext::to_value(&v).expect("a JSON value has a MessagePack form");
    if let (serde_json::Value::Object(o), rmpv::Value::Map(entries)) = (&v, &mut m) {
        if o.get("encoding").and_then(|e| e.as_str()) == Some("base64") {
            let text = o["data"]
                .as_str()
                .expect("accepted base64 data is a string");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .expect("accepted base64 data decodes");
            entries.retain(|(k, _)| k.as_str() != Some("encoding"));
            for (k, val) in entries.iter_mut() {
                if k.as_str() == Some("data") {
                    *val = rmpv::Value::Binary(bytes.clone());
                }
            }
        }
    }
    common::write_msgpack(&m)
}

/// An op with publish data compared by value, for comparing the two encodings.
fn shape(op: &ClientOp) -> String {
    match op {
        ClientOp::Publish { events, r#ref } => format!(
            "publish {:?} {ref:?}",
            events.iter().map(common::normalised).collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, frame)) = data.split_first() else {
        return;
    };
    let enc = if head & 1 == 0 {
        Encoding::Json
    } else {
        Encoding::Msgpack
    };
    let limits = if head & 2 == 0 {
        Limits::default()
    } else {
        Limits {
            max_topic_len: 10,
            max_events: 1,
            max_decompressed: 64,
        }
    };
    // A JSON op arrives in a text frame, which the WebSocket layer has checked to be UTF-8.
    let text;
    let frame = match enc {
        Encoding::Json => {
            text = String::from_utf8_lossy(frame);
            text.as_bytes()
        }
        Encoding::Msgpack => frame,
    };
    let got = ws_frame::parse_client(enc, frame, &limits);
    if enc == Encoding::Msgpack {
        if let Err(why) = codec::msgpack_well_formed(frame) {
            let code = got.as_ref().err().map(|e| e.code);
            assert_eq!(
                code,
                Some("malformed_frame"),
                "not one MessagePack value: {why}"
            );
        }
    }
    if ws_frame::is_gzip(frame) {
        assert!(got.is_err(), "a gzip frame is not an op");
    }
    match &got {
        Ok(op) => check_ok(op, enc, frame, &limits),
        Err(e) => check_err(e, enc, frame),
    }
    if let (Encoding::Json, Ok(op)) = (enc, &got) {
        let mp = transcode(frame);
        let again = ws_frame::parse_client(Encoding::Msgpack, &mp, &limits)
            .unwrap_or_else(|e| panic!("as MessagePack: {e:?}"));
        assert_eq!(shape(&again), shape(op));
    }
});
