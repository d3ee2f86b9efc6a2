//! The decoders of stored log records in `log::record` (format `tidewire-log-v2`): event
//! records (`decode_event`, `peek_event`), chunks (`Chunk::parse`, `record`, `event`), index
//! entries, dedupe entries, expiry buckets, counters, topic records and the key parsers.
//! The module promises each decoder is total: garbage in, `CorruptRecord` out, never a panic.
//!
//! Input: the first byte picks the mode. Raw (even): the rest is handed to every decoder.
//! Built (odd): events, offsets, entries and numbers are made from the rest and encoded.
//!
//! Properties:
//! - raw: whatever a decoder accepts re-encodes to the same bytes where the format is
//!   canonical (index entries, dedupe entries, expiry buckets, counters, keys, and a chunk
//!   whose records all slice), and otherwise decodes again to the same value (event records,
//!   topic records); `peek_event` agrees with `decode_event`;
//! - built: `decode_event(encode_event(t, e)) == (t, e)`, a chunk of built events reads back
//!   each event alone, and every encoder's output decodes to its input.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use tidewire::envelope::{Data, NewEvent};
use tidewire::log::record::{self, Chunk, ChunkBuilder, DedupeEntry, TopicRecord};
use tidewire::topic::Topic;

fn raw(bytes: &[u8]) {
    // Event records.
    let event = record::decode_event(bytes);
    let peek = record::peek_event(bytes);
    if let Ok((time, e)) = &event {
        let p = peek.as_ref().expect("peek reads what decode reads");
        assert_eq!(
            (p.topic, p.data_len, p.time),
            (e.topic.as_str(), e.data.len(), *time)
        );
        let again = record::encode_event(*time, e);
        let back = record::decode_event(&again).expect("a re-encoded record decodes");
        assert_eq!(&back, event.as_ref().unwrap());
    }
    // Chunks.
    if let Ok(chunk) = Chunk::parse(bytes) {
        assert!(chunk.len() >= 1 && !chunk.is_empty());
        let records: Vec<_> = (0..chunk.len()).map(|i| chunk.record(i)).collect();
        for (i, r) in records.iter().enumerate() {
            let decoded = chunk.event(i);
            match r {
                Ok(rec) => assert_eq!(
                    decoded.map_err(|e| e.to_string()),
                    record::decode_event(rec).map_err(|e| e.to_string())
                ),
                Err(_) => assert!(decoded.is_err()),
            }
        }
        assert!(chunk.record(chunk.len()).is_err());
        if records.iter().all(Result::is_ok) {
            let again = record::encode_chunk(records.iter().map(|r| *r.as_ref().unwrap()));
            assert_eq!(
                again.as_deref(),
                Some(bytes),
                "a chunk re-encodes to itself"
            );
        }
    }
    // Index entries.
    if let Ok(offsets) = record::decode_index(bytes) {
        assert!(!offsets.is_empty());
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(record::encode_index(&offsets), bytes);
    }
    let mut into = vec![1, 2, 3];
    match record::decode_index_into(bytes, &mut into) {
        Ok(()) => assert_eq!(record::decode_index(bytes).ok(), Some(into)),
        Err(_) => assert!(record::decode_index(bytes).is_err()),
    }
    // Dedupe entries, expiry buckets, counters.
    if let Ok(d) = record::decode_dedupe(bytes) {
        assert_eq!(record::encode_dedupe(d).as_slice(), bytes);
    }
    if let Ok(items) = record::decode_expiry(bytes) {
        let mut again = Vec::new();
        for (id, key) in &items {
            record::push_expiry_item(&mut again, *id, key);
        }
        assert_eq!(again, bytes);
    }
    if let Ok(n) = record::decode_count(bytes) {
        assert_eq!(record::encode_count(n).as_slice(), bytes);
    }
    // Topic records.
    if let Ok(t) = record::decode_topic(bytes) {
        assert_eq!(
            record::decode_topic(&record::encode_topic(&t)).ok(),
            Some(t)
        );
    }
    // Keys.
    if let Ok(first) = record::chunk_first_of_key(bytes) {
        assert_eq!(record::chunk_key(first).as_slice(), bytes);
    }
    if let Ok((topic_id, first)) = record::index_key_parts(bytes) {
        assert_eq!(record::index_key(topic_id, first).as_slice(), bytes);
    }
    if let Ok(time) = record::expiry_time_of_key(bytes) {
        assert_eq!(bytes.len(), 17);
        assert_eq!(record::expiry_key(time, 0)[..9], bytes[..9]);
    }
}

const TOPICS: [&str; 5] = ["a", "a/b", "sensors/room-12/temperature", "x.y~z_-", "t/0"];

fn built_event(input: &mut Input<'_>) -> NewEvent {
    let flags = input.byte();
    // Stored records are not re-validated: any strings survive the trip.
    NewEvent {
        topic: Topic::parse(TOPICS[usize::from(flags) % TOPICS.len()]).expect("topic"),
        event_type: (flags & 0x08 != 0).then(|| input.text(256).into()),
        msg_id: (flags & 0x10 != 0).then(|| input.text(256).into()),
        data: if flags & 0x20 != 0 {
            Data::Bytes(bytes::Bytes::copy_from_slice(input.bytes(256)))
        } else {
            Data::Json(input.text(256).into())
        },
    }
}

fn built(input: &mut Input<'_>) {
    // Events and chunks.
    let mut events = Vec::new();
    let mut builder = ChunkBuilder::new();
    let mut records = Vec::new();
    while !input.is_empty() && events.len() < 16 {
        let time = input.u64();
        let e = built_event(input);
        let rec = record::encode_event(time, &e);
        let (t, back) = record::decode_event(&rec).expect("an encoded record decodes");
        assert_eq!((t, &back), (time, &e));
        let peek = record::peek_event(&rec).expect("peek");
        assert_eq!(
            (peek.topic, peek.data_len, peek.time),
            (e.topic.as_str(), e.data.len(), time)
        );
        let want_len = builder.encoded_len_with(rec.len());
        assert!(builder.push_event(time, &e));
        records.push(rec);
        events.push((time, e));
        assert_eq!(builder.len(), events.len());
        let finished_len = 4 + 4 * events.len() + records.iter().map(Vec::len).sum::<usize>();
        assert_eq!(want_len, finished_len);
    }
    let chunk_bytes = builder.finish();
    assert!(builder.is_empty());
    assert_eq!(
        chunk_bytes,
        record::encode_chunk(records.iter().map(Vec::as_slice))
    );
    if let Some(bytes) = &chunk_bytes {
        let chunk = Chunk::parse(bytes).expect("a built chunk parses");
        assert_eq!(chunk.len(), events.len());
        for (i, (time, e)) in events.iter().enumerate() {
            assert_eq!(chunk.record(i).expect("record"), records[i].as_slice());
            let (t, back) = chunk.event(i).expect("event");
            assert_eq!((t, &back), (*time, e));
        }
    } else {
        assert!(events.is_empty());
    }
}

fn built_numbers(seed: &[u8]) {
    let mut input = Input(seed);
    // Index entries: strictly ascending offsets from the input's steps.
    let mut offsets = Vec::new();
    let mut at = 0u32;
    for _ in 0..usize::from(input.byte() % 32) {
        at = match at.checked_add(u32::from(input.byte()) + 1) {
            Some(a) => a,
            None => break,
        };
        offsets.push(at - 1);
    }
    let enc = record::encode_index(&offsets);
    match record::decode_index(&enc) {
        Ok(back) => assert_eq!(back, offsets),
        Err(_) => assert!(offsets.is_empty()),
    }
    let d = DedupeEntry {
        id: input.u64(),
        time: input.u64(),
    };
    assert_eq!(
        record::decode_dedupe(&record::encode_dedupe(d)).ok(),
        Some(d)
    );
    let mut bucket = Vec::new();
    let mut items = Vec::new();
    for _ in 0..input.byte() % 4 {
        let id = input.u64();
        let mut key = Vec::new();
        record::dedupe_key_into(&mut key, "a/b", &input.text(256));
        record::push_expiry_item(&mut bucket, id, &key);
        items.push((id, key));
    }
    let back = record::decode_expiry(&bucket).expect("a built bucket decodes");
    assert_eq!(back.len(), items.len());
    for ((id, key), (bid, bkey)) in items.iter().zip(&back) {
        assert_eq!((id, key.as_slice()), (bid, *bkey));
    }
    let n = input.u64();
    assert_eq!(record::decode_count(&record::encode_count(n)).ok(), Some(n));
    let t = TopicRecord {
        topic_id: input.u64(),
        first_id: input.u64(),
        last_id: input.u64(),
        count: input.u64(),
        bytes: input.u64(),
        removed_through: input.u64(),
    };
    assert_eq!(
        record::decode_topic(&record::encode_topic(&t)).ok(),
        Some(t)
    );
    let (a, b) = (input.u64(), input.u64());
    assert_eq!(
        record::chunk_first_of_key(&record::chunk_key(a)).ok(),
        Some(a)
    );
    assert_eq!(
        record::index_key_parts(&record::index_key(a, b)).ok(),
        Some((a, b))
    );
    assert_eq!(
        record::expiry_time_of_key(&record::expiry_key(a, b)).ok(),
        Some(a)
    );
    // Keys sort like the numbers they hold.
    assert_eq!(record::chunk_key(a).cmp(&record::chunk_key(b)), a.cmp(&b));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(rest);
    } else {
        built(&mut Input(rest));
        built_numbers(rest);
    }
});
