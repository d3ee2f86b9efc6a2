//! An event as a JetStream message, and back: pure functions, free of I/O.
//!
//! The message's subject is its topic (see [`subject`](super::subject)); its payload is the
//! event's data as published (compact JSON text, or the bytes themselves); headers carry the
//! rest:
//! - `Tw-Type`: the event type, or `Tw-Type-B64` (base64url) when the type has characters a
//!   header value would not keep as they are (leading or trailing spaces, non-ASCII);
//! - `Tw-Data: bytes` when the data is bytes (absent: JSON);
//! - `Nats-Msg-Id`: `<topic>|<base64url(msg_id)>`, when the event has a `msg_id`. JetStream's
//!   duplicate window is per stream; the topic in the id makes it per `(topic, msg_id)`, as
//!   the contract wants, and base64 keeps any `msg_id` a valid header value.
//!
//! An event's `time` is not a header: it is JetStream's own timestamp of the message, which
//! the stream leader takes as it assigns the sequence (see [`decode`]). Messages written by
//! earlier gateways carry a `Tw-Time` header with their gateway's clock; it is ignored, so
//! every event of a stream is dated by the same clock.

pub use async_nats::HeaderMap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;

use super::subject::subject_topic;
use crate::envelope::{Data, Event, EventId, NewEvent};
use crate::topic::Topic;

/// Header holding the event type as it is.
pub const TYPE: &str = "Tw-Type";
/// Header holding the event type in base64url.
pub const TYPE_B64: &str = "Tw-Type-B64";
/// Header saying the data is bytes (`bytes`).
pub const DATA: &str = "Tw-Data";
/// JetStream's deduplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// JetStream's deduplication id for `msg_id` published to `topic`.
pub fn dedupe_id(topic: &Topic, msg_id: &str) -> String {
    format!("{}|{}", topic.as_str(), URL_SAFE_NO_PAD.encode(msg_id))
}

/// The `msg_id` a deduplication id carries, if it is one of ours.
pub fn msg_id_of(dedupe_id: &str) -> Option<String> {
    let (_, encoded) = dedupe_id.rsplit_once('|')?;
    let raw = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    String::from_utf8(raw).ok()
}

/// Whether `value` survives as a header value unchanged (NATS trims values and ends them at
/// a line break).
fn header_safe(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

/// The headers and payload of `event`.
pub fn encode(event: &NewEvent) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    if let Some(t) = &event.event_type {
        if header_safe(t) {
            headers.insert(TYPE, t.to_string());
        } else {
            headers.insert(TYPE_B64, URL_SAFE_NO_PAD.encode(t.as_bytes()));
        }
    }
    if let Some(m) = &event.msg_id {
        headers.insert(MSG_ID, dedupe_id(&event.topic, m));
    }
    let payload = match &event.data {
        Data::Json(text) => Bytes::copy_from_slice(text.as_bytes()),
        Data::Bytes(b) => {
            headers.insert(DATA, "bytes");
            b.clone()
        }
    };
    (headers, payload)
}

/// The event stored as stream sequence `seq` on `subject` at `stored_ms` (JetStream's
/// timestamp of the message, Unix milliseconds rounded down: the event's `time`). `None` when
/// the subject is no topic under `prefix` (something else published there); a payload that
/// is not JSON and not marked as bytes is taken as bytes, so a foreign message never stops a
/// reader.
///
/// Why JetStream's timestamp and not the clock of the gateway that took the publish: several
/// gateways append to one stream, each with its own clock, so their stamps need not be
/// ordered by sequence (a gateway whose clock is behind, or that stamps a moment before
/// another one's publish overtakes it), and a time start would not be one cut in id order.
/// The stream leader takes its timestamp while it assigns the sequence, so one clock dates
/// every event in stream order, whichever gateway published it; JetStream's own start-time
/// lookup (used by [`time_start`](super::read::time_start)) rests on the same order.
pub fn decode(
    prefix: &str,
    subject: &str,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    stored_ms: u64,
) -> Option<Event> {
    let topic = subject_topic(prefix, subject)?;
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let event_type = match (header(TYPE), header(TYPE_B64)) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(b)) => URL_SAFE_NO_PAD
            .decode(b)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok()),
        (None, None) => None,
    }
    .filter(|t| crate::codec::validate_fields(Some(t), None).is_ok());
    let msg_id = header(MSG_ID).and_then(msg_id_of);
    let data = if header(DATA) == Some("bytes") {
        Data::Bytes(payload)
    } else {
        match std::str::from_utf8(&payload).ok().and_then(json_data) {
            Some(text) => Data::Json(text),
            None => Data::Bytes(payload),
        }
    };
    Some(Event::new(
        EventId(seq),
        stored_ms,
        NewEvent {
            topic,
            event_type: event_type.map(Into::into),
            msg_id: msg_id.map(Into::into),
            data,
        },
    ))
}

/// `text` as JSON data the way a publish would have stored it (one value, on one line, that
/// a `serde_json::Value` holds within the depth limit), or `None` when it is no such data.
fn json_data(text: &str) -> Option<Box<str>> {
    let raw: &serde_json::value::RawValue = serde_json::from_str(text).ok()?;
    crate::codec::compact_json(raw.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "tidewire.w";

    fn event(topic: &str, t: Option<&str>, m: Option<&str>, data: Data) -> NewEvent {
        NewEvent {
            topic: Topic::parse(topic).unwrap(),
            event_type: t.map(Into::into),
            msg_id: m.map(Into::into),
            data,
        }
    }

    fn round_trip(e: &NewEvent) -> Event {
        let (headers, payload) = encode(e);
        let subject = super::super::subject::topic_subject(P, &e.topic);
        decode(P, &subject, 7, Some(&headers), payload, 1_700_000_000_123).expect("decodes")
    }

    #[test]
    fn every_field_survives_the_message_form() {
        for e in [
            event(
                "a/b.c",
                Some("reading"),
                Some("dev-1-42"),
                Data::Json(r#"{"t":1}"#.into()),
            ),
            event(
                "a",
                Some(" padded "),
                Some("line\nbreak|pipe"),
                Data::Bytes(Bytes::from_static(b"\x00\xff{")),
            ),
            event("a", Some("température"), None, Data::Json("\"x\"".into())),
            event("a", None, None, Data::Bytes(Bytes::new())),
        ] {
            let back = round_trip(&e);
            assert_eq!(back.body, e);
            assert_eq!(back.id, EventId(7));
            assert_eq!(back.time, 1_700_000_000_123);
        }
    }

    #[test]
    fn json_no_publish_could_have_stored_is_read_as_bytes() {
        for text in ["1e400", "\"\\ud800\"", "{\"a\":\n1}"] {
            let e = decode(P, "tidewire.w.x", 1, None, Bytes::from(text), 0).unwrap();
            match (&e.body.data, text) {
                (Data::Json(j), "{\"a\":\n1}") => assert_eq!(&**j, "{\"a\":1}"),
                (Data::Bytes(_), "1e400" | "\"\\ud800\"") => {}
                (other, _) => panic!("{text:?} read as {other:?}"),
            }
        }
    }

    #[test]
    fn the_time_is_the_streams_timestamp_even_where_an_old_gateway_wrote_its_own() {
        let mut headers = HeaderMap::new();
        headers.insert("Tw-Time", "1700000000999");
        let e = decode(P, "tidewire.w.x", 2, Some(&headers), Bytes::from("1"), 42).unwrap();
        assert_eq!(e.time, 42);
    }

    #[test]
    fn a_foreign_message_is_read_not_refused() {
        let e = decode(
            P,
            "tidewire.w.x",
            3,
            None,
            Bytes::from_static(b"not json"),
            99,
        )
        .unwrap();
        assert_eq!(e.body.data, Data::Bytes(Bytes::from_static(b"not json")));
        assert_eq!(e.time, 99);
        assert!(decode(P, "elsewhere.x", 3, None, Bytes::new(), 0).is_none());
    }
}
