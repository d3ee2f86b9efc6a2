//! The event and its wire forms: the one place where an event becomes JSON, an SSE frame
//! or MessagePack.
//!
//! Every rendering of a committed [`Event`] is built at most once and then shared (as
//! [`Bytes`]) by every subscriber that sends it, however many there are.

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use crate::topic::Topic;

/// A server-assigned event id: strictly increasing across the whole server, never reused,
/// also across restarts. `EventId(0)` is never assigned; as a cursor it means "before everything".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub u64);

impl EventId {
    /// The id as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The payload of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A JSON value, held as compact JSON text on one line (validated when it was published).
    Json(Box<str>),
    /// Raw bytes (published as MessagePack `bin`, octet-stream, or base64 in JSON).
    Bytes(Bytes),
}

impl Data {
    /// Size of the payload in bytes, as counted in topic statistics.
    pub fn len(&self) -> usize {
        match self {
            Data::Json(s) => s.len(),
            Data::Bytes(b) => b.len(),
        }
    }

    /// Whether the payload is empty (zero bytes; never true for JSON).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An event as a publisher submits it: validated, not yet stored, without id or time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Where it is published.
    pub topic: Topic,
    /// Optional event type (SSE `event:` name); validated to be one line, never `gap`.
    pub event_type: Option<Box<str>>,
    /// Optional producer-chosen id for deduplication of retries.
    pub msg_id: Option<Box<str>>,
    /// The payload.
    pub data: Data,
}

/// A committed event: durable in the log, with its id and the server's receive time.
#[derive(Debug)]
pub struct Event {
    /// The id the log assigned.
    pub id: EventId,
    /// The server's receive time, Unix milliseconds.
    pub time: u64,
    /// The rest, as published.
    pub body: NewEvent,
    json: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
    msgpack: OnceLock<Bytes>,
}

/// A committed event shared by every subscriber that receives it.
pub type SharedEvent = Arc<Event>;

impl Event {
    /// Wraps a committed event; renderings are built lazily on first use.
    pub fn new(id: EventId, time: u64, body: NewEvent) -> Self {
        Event {
            id,
            time,
            body,
            json: OnceLock::new(),
            sse: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// The topic of the event.
    pub fn topic(&self) -> &Topic {
        &self.body.topic
    }

    /// The JSON envelope `{"id","topic","type"?,"time","data"[,"encoding"]}` on one line,
    /// built once.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| Bytes::from(self.render_json()))
    }

    /// The SSE frame `id:`, `event:` (typed events only), `data:` and a blank line, built once.
    pub fn sse_frame(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            let json = self.json();
            let mut out = Vec::with_capacity(json.len() + 48);
            out.extend_from_slice(b"id: ");
            out.extend_from_slice(self.id.0.to_string().as_bytes());
            out.push(b'\n');
            if let Some(t) = &self.body.event_type {
                out.extend_from_slice(b"event: ");
                out.extend_from_slice(t.as_bytes());
                out.push(b'\n');
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(json);
            out.extend_from_slice(b"\n\n");
            Bytes::from(out)
        })
    }

    /// The MessagePack envelope: a map with the JSON envelope's keys (`type` only when set),
    /// where `data` keeps its MessagePack type (bytes stay `bin`, no `encoding` key), built once.
    pub fn msgpack(&self) -> &Bytes {
        self.msgpack
            .get_or_init(|| Bytes::from(self.render_msgpack()))
    }

    fn render_msgpack(&self) -> Vec<u8> {
        let b = &self.body;
        let data = match &b.data {
            // The text was validated as JSON when it was published; `Null` is unreachable.
            Data::Json(text) => {
                MsgpackData::Json(serde_json::from_str(text).unwrap_or(serde_json::Value::Null))
            }
            Data::Bytes(bytes) => MsgpackData::Bytes(serde_bytes::Bytes::new(bytes)),
        };
        let env = MsgpackEnvelope {
            id: self.id.0,
            topic: b.topic.as_str(),
            event_type: b.event_type.as_deref(),
            time: self.time,
            data,
        };
        // Writing maps of plain values into a Vec cannot fail.
        rmp_serde::to_vec_named(&env).unwrap_or_default()
    }

    fn render_json(&self) -> Vec<u8> {
        let b = &self.body;
        let mut out = Vec::with_capacity(b.data.len() + b.topic.as_str().len() + 80);
        out.extend_from_slice(b"{\"id\":");
        out.extend_from_slice(self.id.0.to_string().as_bytes());
        // Topics are drawn from [A-Za-z0-9_.~/-]: nothing in them needs JSON escaping.
        out.extend_from_slice(b",\"topic\":\"");
        out.extend_from_slice(b.topic.as_str().as_bytes());
        out.push(b'"');
        if let Some(t) = &b.event_type {
            out.extend_from_slice(b",\"type\":");
            push_json_string(&mut out, t);
        }
        out.extend_from_slice(b",\"time\":");
        out.extend_from_slice(self.time.to_string().as_bytes());
        out.extend_from_slice(b",\"data\":");
        match &b.data {
            Data::Json(text) => out.extend_from_slice(text.as_bytes()),
            Data::Bytes(bytes) => {
                out.push(b'"');
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .as_bytes(),
                );
                out.extend_from_slice(b"\",\"encoding\":\"base64\"");
            }
        }
        out.push(b'}');
        out
    }
}

#[derive(Serialize)]
struct MsgpackEnvelope<'a> {
    id: u64,
    topic: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
    time: u64,
    data: MsgpackData<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum MsgpackData<'a> {
    Json(serde_json::Value),
    Bytes(&'a serde_bytes::Bytes),
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json cannot fail to serialise a str into a Vec.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The body of a `201` answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PublishReceipt {
    /// Id of the first event the request stored; when it stored none (every event was a
    /// repeat), the smallest original id it repeats.
    pub first_id: u64,
    /// Id of the last event the request stored; the ids it stored are contiguous. When it
    /// stored none, the largest original id it repeats.
    pub last_id: u64,
    /// Number of events the request stored.
    pub count: u64,
    /// How many of its events were recognised as repeats of a `(topic, msg_id)` and not
    /// stored again; `count + duplicates` is the number the request carried.
    pub duplicates: u64,
    /// The original ids of those repeats, in request order (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicate_of: Vec<u64>,
}

/// The gap signal: events between `requested` and `oldest` may have been dropped by
/// retention; delivery resumes from `oldest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The cursor the client asked for.
    pub requested: u64,
    /// The oldest id from which the stream is complete again.
    pub oldest: u64,
}

impl Gap {
    /// The SSE frame for a gap: `event: gap`, `id: oldest-1`, and the gap as JSON data.
    pub fn sse_frame(&self) -> Bytes {
        Bytes::from(format!(
            "id: {}\nevent: gap\ndata: {{\"requested\":{},\"oldest\":{}}}\n\n",
            self.oldest.saturating_sub(1),
            self.requested,
            self.oldest
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: Data, event_type: Option<&str>) -> Event {
        Event::new(
            EventId(42),
            1_763_800_000_000,
            NewEvent {
                topic: Topic::parse("sensors/a").unwrap(),
                event_type: event_type.map(Into::into),
                msg_id: None,
                data,
            },
        )
    }

    #[test]
    fn json_envelope_matches_the_contract() {
        let e = event(Data::Json(r#"{"t":21.5}"#.into()), Some("reading"));
        assert_eq!(
            std::str::from_utf8(e.json()).unwrap(),
            r#"{"id":42,"topic":"sensors/a","type":"reading","time":1763800000000,"data":{"t":21.5}}"#
        );
    }

    #[test]
    fn untyped_events_have_no_type_key_and_no_event_line() {
        let e = event(Data::Json("1".into()), None);
        assert!(!std::str::from_utf8(e.json()).unwrap().contains("type"));
        assert_eq!(
            std::str::from_utf8(e.sse_frame()).unwrap(),
            "id: 42\ndata: {\"id\":42,\"topic\":\"sensors/a\",\"time\":1763800000000,\"data\":1}\n\n"
        );
    }

    #[test]
    fn bytes_render_as_base64_with_encoding() {
        let e = event(Data::Bytes(Bytes::from_static(b"\x00\xff")), None);
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(v["data"], "AP8=");
        assert_eq!(v["encoding"], "base64");
    }

    #[test]
    fn msgpack_envelope_keeps_bytes_as_bin_and_json_as_values() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Env {
            id: u64,
            topic: String,
            #[serde(rename = "type")]
            event_type: Option<String>,
            time: u64,
            data: serde_bytes::ByteBuf,
        }
        let e = event(Data::Bytes(Bytes::from_static(b"\x00\xff")), Some("raw"));
        let env: Env = rmp_serde::from_slice(e.msgpack()).unwrap();
        assert_eq!(env.id, 42);
        assert_eq!(env.topic, "sensors/a");
        assert_eq!(env.event_type.as_deref(), Some("raw"));
        assert_eq!(env.time, 1_763_800_000_000);
        assert_eq!(&env.data[..], b"\x00\xff");
        // Built once: the same allocation every time.
        assert_eq!(e.msgpack().as_ptr(), e.msgpack().as_ptr());

        let e = event(Data::Json(r#"{"t":21.5,"ok":[1,null]}"#.into()), None);
        let v: serde_json::Value = rmp_serde::from_slice(e.msgpack()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":42,"topic":"sensors/a","time":1_763_800_000_000u64,
                               "data":{"t":21.5,"ok":[1,null]}})
        );
    }

    #[test]
    fn gap_frame_sets_the_cursor_before_oldest() {
        let g = Gap {
            requested: 3,
            oldest: 10,
        };
        assert_eq!(
            std::str::from_utf8(&g.sse_frame()).unwrap(),
            "id: 9\nevent: gap\ndata: {\"requested\":3,\"oldest\":10}\n\n"
        );
    }
}

/// The encoding of a body or frame that carries envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// JSON text.
    Json,
    /// MessagePack (bytes data stays `bin`).
    Msgpack,
}

/// Appends `events` to `out` as a JSON array or a MessagePack array of envelopes, each copied
/// from its encoding cached on the event (built once, whatever the number of readers).
pub fn write_envelope_array(format: WireFormat, events: &[SharedEvent], out: &mut Vec<u8>) {
    match format {
        WireFormat::Json => {
            out.push(b'[');
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(e.json());
            }
            out.push(b']');
        }
        WireFormat::Msgpack => {
            // Writing to a Vec cannot fail.
            let _ = rmp::encode::write_array_len(out, events.len() as u32);
            for e in events {
                out.extend_from_slice(e.msgpack());
            }
        }
    }
}
