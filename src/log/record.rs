//! The stored forms of the log (format `tidewire-log-v2`, "chunked"): chunks of event
//! records, per-topic index entries, topic records, and the keys that order them.
//!
//! Pure encode/decode functions, free of I/O, so every decoder of stored bytes can be fuzzed
//! directly: each is total (garbage in, [`CorruptRecord`] out, never a panic). Keys are
//! big-endian so that sled's byte order is id order.
//!
//! Layout of the one sled tree:
//! - `c` + first id (u64 BE) → a **chunk**: the records of the contiguous events
//!   `first ..= first + n - 1`, all written by one group commit (see [`Chunk`]);
//! - `i` + topic id (u64 BE) + chunk first id (u64 BE) → the **index entry** of that topic in
//!   that chunk: the offsets (from the chunk's first id) of the topic's events in it, u32 BE,
//!   strictly ascending, at least one;
//! - `t` + topic name → [`TopicRecord`];
//! - `d` + topic name + `0x00` + msg_id → the **dedupe entry** of a publish that carried a
//!   `msg_id`: the id it was stored under and when (see [`DedupeEntry`]);
//! - `e` + commit time (ms, u64 BE) + first id (u64 BE) → an **expiry bucket**: the dedupe
//!   keys one group commit wrote, so expired entries are found by a range scan in time order;
//! - `m/dedupe_count` → the number of dedupe entries (u64 BE), kept in the same batches;
//! - `m/ids_reserved` → the highest id that may have been acknowledged (u64 BE), under the
//!   fsync policies that acknowledge before a flush;
//! - `m/format` → [`FORMAT_VERSION`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::{Data, NewEvent};
use crate::topic::Topic;

/// Key prefix of chunks: `c` + first id (u64 BE).
pub const CHUNK_PREFIX: u8 = b'c';
/// Key prefix of the per-topic index: `i` + topic id (u64 BE) + chunk first id (u64 BE).
pub const INDEX_PREFIX: u8 = b'i';
/// Key prefix of topic records: `t` + topic name.
pub const TOPIC_PREFIX: u8 = b't';
/// Key prefix of dedupe entries: `d` + topic name + `0x00` + msg_id.
pub const DEDUPE_PREFIX: u8 = b'd';
/// Key prefix of expiry buckets: `e` + commit time (ms, u64 BE) + first id (u64 BE).
pub const EXPIRY_PREFIX: u8 = b'e';
/// Key of the number of stored dedupe entries (u64 BE).
pub const DEDUPE_COUNT_KEY: &[u8] = b"m/dedupe_count";
/// Key of the highest id a writer may have handed out (u64 BE), kept under fsync policies
/// that acknowledge before a flush so an id is never used twice across a crash.
pub const IDS_RESERVED_KEY: &[u8] = b"m/ids_reserved";
/// Key of the format marker, written once when a data dir is created.
pub const FORMAT_KEY: &[u8] = b"m/format";
/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: &[u8] = b"tidewire-log-v2";
/// The first format (one key per event and one per index entry); not read by this build.
pub const FORMAT_V1: &[u8] = b"tidewire-log-v1";

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct CorruptRecord(pub String);

fn corrupt(what: impl Into<String>) -> CorruptRecord {
    CorruptRecord(what.into())
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The key of the chunk whose first event is `first`.
pub fn chunk_key(first: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = CHUNK_PREFIX;
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

/// The first event id held in a chunk key.
pub fn chunk_first_of_key(key: &[u8]) -> Result<u64, CorruptRecord> {
    match key {
        [CHUNK_PREFIX, rest @ ..] if rest.len() == 8 => Ok(be_u64(rest)),
        _ => Err(corrupt(format!("bad chunk key {key:?}"))),
    }
}

/// The key of the index entry of topic `topic_id` in the chunk starting at `chunk_first`.
pub fn index_key(topic_id: u64, chunk_first: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = INDEX_PREFIX;
    k[1..9].copy_from_slice(&topic_id.to_be_bytes());
    k[9..].copy_from_slice(&chunk_first.to_be_bytes());
    k
}

/// The (topic id, chunk first id) held in an index key.
pub fn index_key_parts(key: &[u8]) -> Result<(u64, u64), CorruptRecord> {
    match key {
        [INDEX_PREFIX, rest @ ..] if rest.len() == 16 => Ok((be_u64(rest), be_u64(&rest[8..]))),
        _ => Err(corrupt(format!("bad index key {key:?}"))),
    }
}

/// The key of a topic record.
pub fn topic_key(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 1);
    k.push(TOPIC_PREFIX);
    k.extend_from_slice(topic.as_bytes());
    k
}

// ---------------------------------------------------------------------------------------------
// Event records
// ---------------------------------------------------------------------------------------------

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

fn event_record<'a>(time: u64, e: &'a NewEvent) -> EventRecord<'a> {
    let (kind, data): (u8, &[u8]) = match &e.data {
        Data::Json(s) => (0, s.as_bytes()),
        Data::Bytes(b) => (1, b),
    };
    EventRecord {
        topic: e.topic.as_str(),
        kind,
        time,
        event_type: e.event_type.as_deref(),
        msg_id: e.msg_id.as_deref(),
        data,
    }
}

/// Appends the record of an event (without its id, which its place in a chunk gives) to `out`.
pub fn encode_event_into(out: &mut Vec<u8>, time: u64, e: &NewEvent) {
    let start = out.len();
    // Serialising plain fields into a Vec cannot fail; should it ever, nothing is left behind
    // and the empty record is refused by the decoder rather than misread.
    if rmp_serde::encode::write(out, &event_record(time, e)).is_err() {
        out.truncate(start);
    }
}

/// Encodes the record of an event.
pub fn encode_event(time: u64, e: &NewEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.data.len());
    encode_event_into(&mut out, time, e);
    out
}

/// Decodes a stored event record into its time and body.
pub fn decode_event(bytes: &[u8]) -> Result<(u64, NewEvent), CorruptRecord> {
    let rec: EventRecord<'_> = rmp_serde::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let topic = Topic::parse(rec.topic).map_err(|e| corrupt(format!("topic {e}")))?;
    let data = match rec.kind {
        0 => Data::Json(
            std::str::from_utf8(rec.data)
                .map_err(|_| corrupt("JSON data is not UTF-8"))?
                .into(),
        ),
        1 => Data::Bytes(Bytes::copy_from_slice(rec.data)),
        k => return Err(corrupt(format!("unknown data kind {k}"))),
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

/// What retention and filtering need of an event record, read without copying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPeek<'a> {
    /// The topic name, as stored (not validated).
    pub topic: &'a str,
    /// Payload bytes, as counted in topic statistics.
    pub data_len: usize,
    /// Commit time, Unix milliseconds.
    pub time: u64,
}

/// Reads the topic and payload size of an event record without decoding the rest.
pub fn peek_event(bytes: &[u8]) -> Result<EventPeek<'_>, CorruptRecord> {
    let rec: EventRecord<'_> = rmp_serde::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(EventPeek {
        topic: rec.topic,
        data_len: rec.data.len(),
        time: rec.time,
    })
}

// ---------------------------------------------------------------------------------------------
// Chunks
// ---------------------------------------------------------------------------------------------

/// Size of the event count at the start of a chunk.
const CHUNK_COUNT_LEN: usize = 4;
/// Size of one entry of a chunk's offset table.
const CHUNK_OFFSET_LEN: usize = 4;

/// Accumulates the records of a run of events into one chunk.
///
/// Encoding: `n` (u32 BE, at least 1), then `n` end offsets (u32 BE, non-decreasing, relative
/// to the start of the records area; the last one is the area's length), then the records
/// area: the `n` event records concatenated. Record `i` spans `end[i-1] .. end[i]`
/// (`end[-1]` = 0), so one event is read by slicing, whatever the size of the chunk.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    ends: Vec<u32>,
    records: Vec<u8>,
}

impl ChunkBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events held so far.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no event was added since the last [`finish`](Self::finish).
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of records held so far.
    pub fn record_bytes(&self) -> usize {
        self.records.len()
    }

    /// Size of the encoded chunk if one more record of `record_len` bytes were added.
    pub fn encoded_len_with(&self, record_len: usize) -> usize {
        CHUNK_COUNT_LEN + (self.ends.len() + 1) * CHUNK_OFFSET_LEN + self.records.len() + record_len
    }

    /// Adds the record of an event. Returns false, adding nothing, when the chunk cannot
    /// address it (its records area would pass 4 GiB): finish the chunk and start another.
    pub fn push_event(&mut self, time: u64, e: &NewEvent) -> bool {
        let start = self.records.len();
        encode_event_into(&mut self.records, time, e);
        self.seal(start)
    }

    /// Adds an already encoded record (see [`push_event`](Self::push_event)).
    pub fn push_record(&mut self, record: &[u8]) -> bool {
        let start = self.records.len();
        self.records.extend_from_slice(record);
        self.seal(start)
    }

    fn seal(&mut self, start: usize) -> bool {
        match u32::try_from(self.records.len()) {
            Ok(end) => {
                self.ends.push(end);
                true
            }
            Err(_) => {
                self.records.truncate(start);
                false
            }
        }
    }

    /// Drops everything added (the buffers are kept for the next chunk).
    pub fn clear(&mut self) {
        self.ends.clear();
        self.records.clear();
    }

    /// The encoded chunk of everything added; the builder is left empty for the next chunk.
    /// `None` when nothing was added (an empty chunk is never stored).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.finish_into(&mut out).then_some(out)
    }

    /// Like [`finish`](Self::finish), into `out` (cleared first), so its buffer can be reused;
    /// false, leaving `out` empty, when nothing was added.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> bool {
        out.clear();
        if self.ends.is_empty() {
            return false;
        }
        let n = self.ends.len();
        out.reserve(CHUNK_COUNT_LEN + n * CHUNK_OFFSET_LEN + self.records.len());
        // n < 2^32: the offset table alone would otherwise take 16 GiB.
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        for end in &self.ends {
            out.extend_from_slice(&end.to_be_bytes());
        }
        out.extend_from_slice(&self.records);
        self.clear();
        true
    }
}

/// Encodes a chunk of already encoded records (`None` when there are none).
pub fn encode_chunk<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut b = ChunkBuilder::new();
    for r in records {
        if !b.push_record(r) {
            return None;
        }
    }
    b.finish()
}

/// A stored chunk, checked just enough to be sliced safely (constant time): each record is
/// checked when it is read.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    offsets: &'a [u8],
    records: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Reads the header of a stored chunk.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        if bytes.len() < CHUNK_COUNT_LEN {
            return Err(corrupt(format!("chunk of {} bytes", bytes.len())));
        }
        let n = be_u32(bytes) as usize;
        if n == 0 {
            return Err(corrupt("empty chunk"));
        }
        let table_end = n
            .checked_mul(CHUNK_OFFSET_LEN)
            .and_then(|t| t.checked_add(CHUNK_COUNT_LEN))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| corrupt(format!("chunk of {n} events is cut short")))?;
        let offsets = &bytes[CHUNK_COUNT_LEN..table_end];
        let records = &bytes[table_end..];
        let chunk = Chunk { offsets, records };
        if chunk.end(n - 1) != records.len() {
            return Err(corrupt("chunk records do not match its offset table"));
        }
        Ok(chunk)
    }

    /// Number of events in the chunk (at least 1).
    pub fn len(&self) -> usize {
        self.offsets.len() / CHUNK_OFFSET_LEN
    }

    /// Always false: an empty chunk does not parse.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// End of record `i` in the records area; `i < len()`.
    fn end(&self, i: usize) -> usize {
        be_u32(&self.offsets[i * CHUNK_OFFSET_LEN..]) as usize
    }

    /// The stored record of the `i`-th event of the chunk.
    pub fn record(&self, i: usize) -> Result<&'a [u8], CorruptRecord> {
        if i >= self.len() {
            return Err(corrupt(format!(
                "event {i} of a chunk of {} events",
                self.len()
            )));
        }
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let end = self.end(i);
        if start > end || end > self.records.len() {
            return Err(corrupt(format!("chunk offsets out of order at event {i}")));
        }
        Ok(&self.records[start..end])
    }

    /// The time and body of the `i`-th event of the chunk.
    pub fn event(&self, i: usize) -> Result<(u64, NewEvent), CorruptRecord> {
        decode_event(self.record(i)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Index entries
// ---------------------------------------------------------------------------------------------

/// Encodes an index entry: offsets (from the chunk's first id), strictly ascending.
pub fn encode_index(offsets: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_index_into(offsets, &mut out);
    out
}

/// Encodes an index entry into `out` (cleared first).
pub fn encode_index_into(offsets: &[u32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(offsets.len() * 4);
    for o in offsets {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

/// Decodes an index entry into `out` (cleared first): at least one offset, strictly ascending.
pub fn decode_index_into(bytes: &[u8], out: &mut Vec<u32>) -> Result<(), CorruptRecord> {
    out.clear();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return Err(corrupt(format!("index entry of {} bytes", bytes.len())));
    }
    out.reserve(bytes.len() / 4);
    for b in bytes.chunks_exact(4) {
        let o = be_u32(b);
        if out.last().is_some_and(|&prev| prev >= o) {
            out.clear();
            return Err(corrupt("index entry offsets are not ascending"));
        }
        out.push(o);
    }
    Ok(())
}

/// Decodes an index entry (see [`decode_index_into`]).
pub fn decode_index(bytes: &[u8]) -> Result<Vec<u32>, CorruptRecord> {
    let mut out = Vec::new();
    decode_index_into(bytes, &mut out)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Dedupe entries and expiry buckets
// ---------------------------------------------------------------------------------------------

/// The key of the dedupe entry of `(topic, msg_id)`. A topic never holds `0x00`, so the
/// separator makes the key unambiguous.
pub fn dedupe_key_into(out: &mut Vec<u8>, topic: &str, msg_id: &str) {
    out.clear();
    out.reserve(topic.len() + msg_id.len() + 2);
    out.push(DEDUPE_PREFIX);
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    out.extend_from_slice(msg_id.as_bytes());
}

/// What the log remembers of a publish that carried a `msg_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupeEntry {
    /// The id the event was stored under.
    pub id: u64,
    /// Its commit time, Unix milliseconds: the entry counts until `time + window`.
    pub time: u64,
}

/// Encodes a dedupe entry (16 bytes).
pub fn encode_dedupe(e: DedupeEntry) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&e.id.to_be_bytes());
    v[8..].copy_from_slice(&e.time.to_be_bytes());
    v
}

/// Decodes a dedupe entry.
pub fn decode_dedupe(bytes: &[u8]) -> Result<DedupeEntry, CorruptRecord> {
    if bytes.len() != 16 {
        return Err(corrupt(format!(
            "dedupe entry of {} bytes, not 16",
            bytes.len()
        )));
    }
    Ok(DedupeEntry {
        id: be_u64(bytes),
        time: be_u64(&bytes[8..]),
    })
}

/// The key of the expiry bucket written at `time` whose first entry is event `first`.
pub fn expiry_key(time: u64, first: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = EXPIRY_PREFIX;
    k[1..9].copy_from_slice(&time.to_be_bytes());
    k[9..].copy_from_slice(&first.to_be_bytes());
    k
}

/// The commit time held in an expiry key.
pub fn expiry_time_of_key(key: &[u8]) -> Result<u64, CorruptRecord> {
    match key {
        [EXPIRY_PREFIX, rest @ ..] if rest.len() == 16 => Ok(be_u64(rest)),
        _ => Err(corrupt(format!("bad expiry key {key:?}"))),
    }
}

/// Appends one (event id, dedupe key) pair to an expiry bucket being built.
pub fn push_expiry_item(bucket: &mut Vec<u8>, id: u64, dedupe_key: &[u8]) {
    // Keys are bounded by the topic (≤ 200 bytes) and msg_id (≤ 256 bytes) limits; the
    // length is clamped so a bucket stays decodable whatever a caller passes.
    let len = dedupe_key.len().min(u16::MAX as usize);
    bucket.extend_from_slice(&id.to_be_bytes());
    bucket.extend_from_slice(&(len as u16).to_be_bytes());
    bucket.extend_from_slice(&dedupe_key[..len]);
}

/// Decodes an expiry bucket into its (event id, dedupe key) pairs.
pub fn decode_expiry(bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, CorruptRecord> {
    let mut items = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 10 {
            return Err(corrupt("truncated expiry bucket"));
        }
        let id = be_u64(rest);
        let len = usize::from(u16::from_be_bytes([rest[8], rest[9]]));
        let Some(key) = rest.get(10..10 + len) else {
            return Err(corrupt("expiry bucket item runs past its end"));
        };
        items.push((id, key));
        rest = &rest[10 + len..];
    }
    Ok(items)
}

/// Encodes a counter stored under a meta key.
pub fn encode_count(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Decodes a counter stored under a meta key.
pub fn decode_count(bytes: &[u8]) -> Result<u64, CorruptRecord> {
    if bytes.len() != 8 {
        return Err(corrupt(format!("counter of {} bytes, not 8", bytes.len())));
    }
    Ok(be_u64(bytes))
}

// ---------------------------------------------------------------------------------------------
// Topic records
// ---------------------------------------------------------------------------------------------

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
    rmp_serde::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(topic: &str, n: usize) -> NewEvent {
        NewEvent {
            topic: Topic::parse(topic).unwrap(),
            event_type: n.is_multiple_of(3).then(|| format!("t{n}").into()),
            msg_id: n.is_multiple_of(2).then(|| format!("m-{n}").into()),
            data: if n.is_multiple_of(2) {
                Data::Json(format!("{{\"n\":{n}}}").into())
            } else {
                Data::Bytes(Bytes::from(vec![n as u8; n % 50]))
            },
        }
    }

    fn chunk_of(events: &[NewEvent]) -> Vec<u8> {
        let mut b = ChunkBuilder::new();
        for (i, e) in events.iter().enumerate() {
            assert!(b.push_event(100 + i as u64, e));
        }
        assert_eq!(b.len(), events.len());
        b.finish().unwrap()
    }

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
        let stored = encode_event(7, &e);
        let peek = peek_event(&stored).unwrap();
        assert_eq!(peek.topic, "a/b");
        assert_eq!(peek.data_len, 2);
    }

    #[test]
    fn keys_sort_in_id_order() {
        assert!(chunk_key(255) < chunk_key(256));
        assert!(index_key(1, u64::MAX) < index_key(2, 0));
        assert!(index_key(1, 255) < index_key(1, 256));
        assert_eq!(chunk_first_of_key(&chunk_key(9)).unwrap(), 9);
        assert_eq!(index_key_parts(&index_key(3, 9)).unwrap(), (3, 9));
        // Every kind of key sorts apart from the others.
        assert!(chunk_key(u64::MAX).as_slice() < index_key(0, 0).as_slice());
        assert!(index_key(u64::MAX, u64::MAX).as_slice() < FORMAT_KEY);
        assert!(FORMAT_KEY < topic_key("a").as_slice());
    }

    #[test]
    fn chunks_round_trip_and_each_event_is_read_alone() {
        let events: Vec<NewEvent> = (0..300).map(|n| ev(&format!("t/{}", n % 7), n)).collect();
        let bytes = chunk_of(&events);
        let chunk = Chunk::parse(&bytes).unwrap();
        assert_eq!(chunk.len(), 300);
        for (i, e) in events.iter().enumerate() {
            let (time, back) = chunk.event(i).unwrap();
            assert_eq!(time, 100 + i as u64);
            assert_eq!(&back, e);
            assert_eq!(chunk.record(i).unwrap(), encode_event(time, e).as_slice());
        }
        assert!(chunk.record(300).is_err());
        // Reading one event in the middle only needs its own bytes: corrupting another
        // record does not affect it.
        let mut damaged = bytes.clone();
        let header = 4 + 4 * 300;
        damaged[header] ^= 0xff;
        let chunk = Chunk::parse(&damaged).unwrap();
        assert_eq!(chunk.event(150).unwrap().1, events[150]);
        // The builder is reusable after finish, and empty chunks are never produced.
        let mut b = ChunkBuilder::new();
        assert!(b.finish().is_none());
        assert!(b.push_record(b"x"));
        let one = b.finish().unwrap();
        assert!(b.is_empty() && b.record_bytes() == 0);
        assert_eq!(Chunk::parse(&one).unwrap().record(0).unwrap(), b"x");
        assert_eq!(
            encode_chunk([&b"ab"[..], &b""[..], &b"c"[..]]).unwrap(),
            [0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, b'a', b'b', b'c']
        );
        assert!(encode_chunk(std::iter::empty()).is_none());
    }

    #[test]
    fn index_entries_round_trip() {
        let offs = [0u32, 1, 7, 4095, 70_000];
        assert_eq!(decode_index(&encode_index(&offs)).unwrap(), offs);
        let mut buf = vec![9, 9];
        decode_index_into(&encode_index(&[3]), &mut buf).unwrap();
        assert_eq!(buf, [3]);
    }

    #[test]
    fn dedupe_forms_round_trip_and_keys_sort_by_time() {
        let mut k1 = Vec::new();
        dedupe_key_into(&mut k1, "a/b", "m-1");
        let mut k2 = Vec::new();
        // Same bytes run together differently: the separator keeps the keys apart.
        dedupe_key_into(&mut k2, "a/bm", "-1");
        assert_ne!(k1, k2);
        let e = DedupeEntry { id: 42, time: 7 };
        assert_eq!(decode_dedupe(&encode_dedupe(e)).unwrap(), e);
        let mut bucket = Vec::new();
        push_expiry_item(&mut bucket, 5, &k1);
        push_expiry_item(&mut bucket, 6, &k2);
        assert_eq!(
            decode_expiry(&bucket).unwrap(),
            vec![(5, k1.as_slice()), (6, k2.as_slice())]
        );
        assert!(expiry_key(1, u64::MAX) < expiry_key(2, 0));
        assert_eq!(expiry_time_of_key(&expiry_key(9, 3)).unwrap(), 9);
        assert_eq!(decode_count(&encode_count(1 << 40)).unwrap(), 1 << 40);
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        assert!(decode_dedupe(b"short").is_err());
        assert!(decode_count(b"\x00").is_err());
        assert!(expiry_time_of_key(&chunk_key(1)).is_err());
        // Expiry buckets: a header cut short, a key running past the end.
        assert!(decode_expiry(b"\x00\x00\x00").is_err());
        assert!(decode_expiry(b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x09dab").is_err());
        assert!(decode_event(b"\xc1\xff").is_err());
        assert!(decode_event(b"").is_err());
        assert!(peek_event(b"\x93").is_err());
        assert!(decode_topic(b"").is_err());
        assert!(chunk_first_of_key(b"c\x00").is_err());
        assert!(chunk_first_of_key(&index_key(1, 2)).is_err());
        assert!(index_key_parts(&chunk_key(1)).is_err());
        // Index entries: empty, ragged, unordered, duplicated.
        assert!(decode_index(b"").is_err());
        assert!(decode_index(b"\x00\x00\x00").is_err());
        assert!(decode_index(&encode_index(&[2, 1])).is_err());
        assert!(decode_index(&encode_index(&[2, 2])).is_err());
        // Chunks: too short, empty, count larger than the bytes, offsets past the end or
        // out of order, trailing bytes.
        for bad in [
            &b""[..],
            b"\x00\x00\x01",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            b"\x00\x00\x00\x02\x00\x00\x00\x01",
            b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
            b"\x00\x00\x00\x01\x00\x00\x00\x01ab",
        ] {
            assert!(Chunk::parse(bad).is_err(), "{bad:?}");
        }
        let unordered = b"\x00\x00\x00\x02\x00\x00\x00\x09\x00\x00\x00\x02ab";
        let chunk = Chunk::parse(unordered).unwrap();
        assert!(chunk.record(0).is_err());
        assert!(chunk.record(1).is_err());
        assert!(chunk.event(5).is_err());
        // A chunk of non-records decodes to errors, not panics.
        let chunk_bytes = encode_chunk([&b"\xc1"[..], b"\x92\x01"]).unwrap();
        let chunk = Chunk::parse(&chunk_bytes).unwrap();
        assert!(chunk.event(0).is_err() && chunk.event(1).is_err());
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_chunk_is_total() {
        let events: Vec<NewEvent> = (0..20).map(|n| ev("a/b", n)).collect();
        let bytes = chunk_of(&events);
        let exercise = |b: &[u8]| {
            if let Ok(c) = Chunk::parse(b) {
                for i in 0..c.len() + 1 {
                    let _ = c.event(i);
                    if let Ok(r) = c.record(i) {
                        let _ = peek_event(r);
                    }
                }
            }
            let _ = decode_index(b);
            let _ = decode_event(b);
            let _ = decode_topic(b);
        };
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            exercise(cut);
            assert!(Chunk::parse(cut).is_err(), "truncated to {len} bytes");
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                exercise(&b);
            }
        }
    }
}
