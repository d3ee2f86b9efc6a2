//! The stored forms of the log: event records, topic records and the keys that order them.
//!
//! Pure encode/decode functions (MessagePack), free of I/O, so the decoder of stored records
//! can be fuzzed directly. Keys are big-endian so that sled's byte order is id order.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::{Data, EventId, NewEvent};
use crate::topic::Topic;

/// Key prefix of event records: `e` + id (u64 BE).
pub const EVENT_PREFIX: u8 = b'e';
/// Key prefix of the per-topic index: `i` + topic id (u64 BE) + event id (u64 BE).
pub const INDEX_PREFIX: u8 = b'i';
/// Key prefix of topic records: `t` + topic name.
pub const TOPIC_PREFIX: u8 = b't';
/// Key of the format marker, written once when a data dir is created.
pub const FORMAT_KEY: &[u8] = b"m/format";
/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: &[u8] = b"tidewire-log-v1";

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct CorruptRecord(pub String);

/// The key of event `id`.
pub fn event_key(id: EventId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT_PREFIX;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// The event id held in an event key.
pub fn event_id_of_key(key: &[u8]) -> Result<EventId, CorruptRecord> {
    match key {
        [EVENT_PREFIX, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            Ok(EventId(u64::from_be_bytes(b)))
        }
        _ => Err(CorruptRecord(format!("bad event key {key:?}"))),
    }
}

/// The index key of event `id` in topic `topic_id`.
pub fn index_key(topic_id: u64, id: EventId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = INDEX_PREFIX;
    k[1..9].copy_from_slice(&topic_id.to_be_bytes());
    k[9..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// The event id held in an index key.
pub fn event_id_of_index_key(key: &[u8]) -> Result<EventId, CorruptRecord> {
    match key {
        [INDEX_PREFIX, rest @ ..] if rest.len() == 16 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[8..]);
            Ok(EventId(u64::from_be_bytes(b)))
        }
        _ => Err(CorruptRecord(format!("bad index key {key:?}"))),
    }
}

/// The key of a topic record.
pub fn topic_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 1);
    k.push(TOPIC_PREFIX);
    k.extend_from_slice(topic.as_bytes());
    k
}

#[derive(Serialize, Deserialize)]
struct EventRecord<'a> {
    topic: &'a str,
    /// 0: `data` is JSON text; 1: `data` is raw bytes.
    kind: u8,
    time: u64,
    event_type: Option<&'a str>,
    msg_id: Option<&'a str>,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

/// Encodes an event (without its id, which is the key) for storage.
pub fn encode_event(time: u64, e: &NewEvent) -> Vec<u8> {
    let (kind, data): (u8, &[u8]) = match &e.data {
        Data::Json(s) => (0, s.as_bytes()),
        Data::Bytes(b) => (1, b),
    };
    let rec = EventRecord {
        topic: e.topic.as_str(),
        kind,
        time,
        event_type: e.event_type.as_deref(),
        msg_id: e.msg_id.as_deref(),
        data,
    };
    // Serialising plain fields into a Vec cannot fail.
    rmp_serde::to_vec(&rec).unwrap_or_default()
}

/// Decodes a stored event record into its time and body.
pub fn decode_event(bytes: &[u8]) -> Result<(u64, NewEvent), CorruptRecord> {
    let rec: EventRecord<'_> =
        rmp_serde::from_slice(bytes).map_err(|e| CorruptRecord(e.to_string()))?;
    let topic = Topic::parse(rec.topic).map_err(|e| CorruptRecord(format!("topic {e}")))?;
    let data = match rec.kind {
        0 => Data::Json(
            std::str::from_utf8(rec.data)
                .map_err(|_| CorruptRecord("JSON data is not UTF-8".into()))?
                .into(),
        ),
        1 => Data::Bytes(Bytes::copy_from_slice(rec.data)),
        k => return Err(CorruptRecord(format!("unknown data kind {k}"))),
    };
    Ok((
        rec.time,
        NewEvent {
            topic,
            event_type: rec.event_type.map(Into::into),
            msg_id: rec.msg_id.map(Into::into),
            data,
        },
    ))
}

/// What the log keeps about one topic. Written in the same atomic batch as the events it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TopicRecord {
    /// Internal number of the topic, used in index keys.
    pub topic_id: u64,
    /// Oldest retained event id (meaningless when `count` is 0).
    pub first_id: u64,
    /// Newest event id ever stored in the topic.
    pub last_id: u64,
    /// Retained events.
    pub count: u64,
    /// Retained payload bytes.
    pub bytes: u64,
    /// Highest id ever removed from this topic by retention (0: none). A cursor below it
    /// may have missed events: that is a gap.
    pub removed_through: u64,
}

/// Encodes a topic record.
pub fn encode_topic(r: &TopicRecord) -> Vec<u8> {
    rmp_serde::to_vec(r).unwrap_or_default()
}

/// Decodes a topic record.
pub fn decode_topic(bytes: &[u8]) -> Result<TopicRecord, CorruptRecord> {
    rmp_serde::from_slice(bytes).map_err(|e| CorruptRecord(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_round_trip() {
        let e = NewEvent {
            topic: Topic::parse("a/b").unwrap(),
            event_type: Some("t".into()),
            msg_id: Some("m-1".into()),
            data: Data::Bytes(Bytes::from_static(b"\x00\x01")),
        };
        let (time, back) = decode_event(&encode_event(7, &e)).unwrap();
        assert_eq!(time, 7);
        assert_eq!(back, e);
    }

    #[test]
    fn keys_sort_in_id_order() {
        assert!(event_key(EventId(255)) < event_key(EventId(256)));
        assert!(index_key(1, EventId(u64::MAX)) < index_key(2, EventId(0)));
        assert_eq!(event_id_of_key(&event_key(EventId(9))).unwrap(), EventId(9));
        assert_eq!(
            event_id_of_index_key(&index_key(3, EventId(9))).unwrap(),
            EventId(9)
        );
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        assert!(decode_event(b"\xc1\xff").is_err());
        assert!(decode_topic(b"").is_err());
        assert!(event_id_of_key(b"e\x00").is_err());
    }
}
