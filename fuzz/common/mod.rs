//! What several targets check of an event, the envelopes they re-encode events into, and the
//! reader that turns a fuzz input into a stream of choices.
//! Included by each target with `#[path = "../common/mod.rs"] mod common;`.
#![allow(dead_code)]

use base64::Engine as _;
use tidewire::codec::{MAX_MSG_ID_LEN, MAX_TYPE_LEN};
use tidewire::envelope::{Data, Event, EventId, NewEvent};
use tidewire::topic::Topic;

/// The rules every event the server accepts must meet (those of `codec::decode_publish`,
/// written out again here), and its wire forms must hold:
/// - the topic is a valid topic within `max_topic_len`;
/// - `type`: 1 to 128 bytes, no control character, never `gap`; `msg_id`: 1 to 256 bytes;
/// - JSON data is one line of valid JSON that `serde_json::Value` can hold (the MessagePack
///   envelope is rendered from that value);
/// - the JSON envelope parses back to the same fields, the SSE frame has exactly its
///   `id:`/`event:`/`data:` lines, the MessagePack envelope decodes to the same fields.
pub fn check_event(e: &NewEvent, max_topic_len: usize) {
    assert!(
        Topic::parse_with_limit(e.topic.as_str(), max_topic_len).is_ok(),
        "topic {:?} over the limit {max_topic_len}",
        e.topic
    );
    if let Some(t) = e.event_type.as_deref() {
        assert!(
            !t.is_empty() && t.len() <= MAX_TYPE_LEN && !t.chars().any(char::is_control),
            "type {t:?}"
        );
        assert_ne!(t, "gap", "the reserved type");
    }
    if let Some(m) = e.msg_id.as_deref() {
        assert!(!m.is_empty() && m.len() <= MAX_MSG_ID_LEN, "msg_id {m:?}");
    }
    let data_value = match &e.data {
        Data::Json(text) => {
            assert!(
                !text.contains(['\n', '\r']),
                "JSON data spans lines: {text:?}"
            );
            let v: serde_json::Value = serde_json::from_str(text)
                .unwrap_or_else(|err| panic!("JSON data {text:?} is not a JSON value: {err}"));
            Some(v)
        }
        Data::Bytes(_) => None,
    };

    let event = Event::new(EventId(7), 1_763_800_000_000, e.clone());
    // JSON envelope.
    let env: serde_json::Value = serde_json::from_slice(event.json()).unwrap_or_else(|err| {
        panic!(
            "envelope {:?} is not JSON: {err}",
            String::from_utf8_lossy(event.json())
        )
    });
    assert_eq!(env["id"], 7);
    assert_eq!(env["topic"], e.topic.as_str());
    assert_eq!(
        env.get("type").and_then(|t| t.as_str()),
        e.event_type.as_deref()
    );
    assert!(env.get("msg_id").is_none());
    match (&e.data, &data_value) {
        (Data::Json(_), Some(v)) => assert_eq!(&env["data"], v),
        (Data::Bytes(b), _) => {
            assert_eq!(env["encoding"], "base64");
            let back = base64::engine::general_purpose::STANDARD
                .decode(env["data"].as_str().expect("base64 text"))
                .expect("base64");
            assert_eq!(&back[..], &b[..]);
        }
        _ => unreachable!(),
    }
    // SSE frame: `id:`, `event:` for typed events, one `data:` line, a blank line.
    let frame = std::str::from_utf8(event.sse_frame()).expect("SSE frame is UTF-8");
    let lines: Vec<&str> = frame.split('\n').collect();
    let want = if e.event_type.is_some() { 5 } else { 4 };
    assert_eq!(lines.len(), want, "SSE frame {frame:?}");
    assert_eq!(lines[0], "id: 7");
    assert!(!frame.contains('\r'), "SSE frame {frame:?} holds a CR");
    assert!(lines[want - 3].starts_with("data: {"));
    assert_eq!(&lines[want - 2..], ["", ""]);
    // MessagePack envelope.
    let mp = rmpv::decode::read_value(&mut &event.msgpack()[..]).expect("MessagePack envelope");
    let get = |k: &str| {
        mp.as_map()
            .expect("a map")
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("id").and_then(|v| v.as_u64()), Some(7));
    assert_eq!(
        get("topic").and_then(|v| v.as_str().map(str::to_string)),
        Some(e.topic.as_str().to_string())
    );
    assert_eq!(
        get("type").and_then(|v| v.as_str().map(str::to_string)),
        e.event_type.as_deref().map(str::to_string)
    );
    match (&e.data, data_value) {
        (Data::Json(_), Some(v)) => {
            let d: serde_json::Value =
                rmpv::ext::from_value(get("data").expect("data")).expect("JSON-like data");
            assert_eq!(d, v, "MessagePack data differs from the JSON data");
        }
        (Data::Bytes(b), _) => {
            assert_eq!(
                get("data").and_then(|v| v.as_slice().map(<[u8]>::to_vec)),
                Some(b.to_vec())
            )
        }
        _ => unreachable!(),
    }
}

/// Appends `e` as a publish envelope in JSON (`topic` included when asked), with its JSON
/// data text exactly as it is, bytes as base64.
pub fn json_envelope(e: &NewEvent, with_topic: bool, out: &mut String) {
    let s = |v: &str| serde_json::to_string(v).expect("a string");
    out.push('{');
    if with_topic {
        out.push_str(&format!("\"topic\":{},", s(e.topic.as_str())));
    }
    if let Some(t) = &e.event_type {
        out.push_str(&format!("\"type\":{},", s(t)));
    }
    if let Some(m) = &e.msg_id {
        out.push_str(&format!("\"msg_id\":{},", s(m)));
    }
    match &e.data {
        Data::Json(text) => out.push_str(&format!("\"data\":{text}")),
        Data::Bytes(b) => out.push_str(&format!(
            "\"data\":\"{}\",\"encoding\":\"base64\"",
            base64::engine::general_purpose::STANDARD.encode(b)
        )),
    }
    out.push('}');
}

/// `e` as a publish envelope in MessagePack: JSON data as MessagePack values, bytes as `bin`.
pub fn msgpack_envelope(e: &NewEvent, with_topic: bool) -> rmpv::Value {
    use rmpv::Value;
    let mut m = Vec::new();
    if with_topic {
        m.push((Value::from("topic"), Value::from(e.topic.as_str())));
    }
    if let Some(t) = &e.event_type {
        m.push((Value::from("type"), Value::from(&**t)));
    }
    if let Some(id) = &e.msg_id {
        m.push((Value::from("msg_id"), Value::from(&**id)));
    }
    let data = match &e.data {
        Data::Json(text) => {
            let v: serde_json::Value = serde_json::from_str(text).expect("checked JSON");
            rmpv::ext::to_value(v).expect("a JSON value has a MessagePack form")
        }
        Data::Bytes(b) => Value::Binary(b.to_vec()),
    };
    m.push((Value::from("data"), data));
    Value::Map(m)
}

/// Writes a MessagePack value.
pub fn write_msgpack(v: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec");
    out
}

/// An event with JSON data compared by value (MessagePack re-encodes numbers and spacing).
pub fn normalised(
    e: &NewEvent,
) -> (
    String,
    Option<String>,
    Option<String>,
    Result<serde_json::Value, Vec<u8>>,
) {
    (
        e.topic.as_str().to_string(),
        e.event_type.as_deref().map(str::to_string),
        e.msg_id.as_deref().map(str::to_string),
        match &e.data {
            Data::Json(t) => Ok(serde_json::from_str(t).expect("checked JSON")),
            Data::Bytes(b) => Err(b.to_vec()),
        },
    )
}

/// The HMAC secret of the `jwt` target; its seed tokens are signed with it.
pub const JWT_SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";

/// Reads a fuzz input as a stream of choices; past its end every choice reads as zero, so any
/// input, however short, builds something.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// The next byte.
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    /// A length byte (taken modulo `bound`), then that many bytes (fewer at the end).
    pub fn bytes(&mut self, bound: usize) -> &[u8] {
        let n = (usize::from(self.byte()) % bound).min(self.0.len());
        let (t, rest) = self.0.split_at(n);
        self.0 = rest;
        t
    }

    /// [`Input::bytes`] as text, invalid UTF-8 replaced.
    pub fn text(&mut self, bound: usize) -> String {
        String::from_utf8_lossy(self.bytes(bound)).into_owned()
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
