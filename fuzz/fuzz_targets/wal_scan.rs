//! The write-ahead log's segment scanner, `log::wal_record::scan`: what a restart reads back
//! from a WAL segment, whatever bytes a crash, a torn write or a damaged disk left in it. The
//! module promises `scan` is total (any bytes in, a verdict out, never a panic).
//!
//! Input: the first byte picks the mode. Raw (even): the rest is the segment. Built (odd):
//! records of real chunks are encoded from the rest (`wal_record::encode`), then damaged as
//! the input says (cut short, a byte flipped, zeros or garbage appended).
//!
//! Properties, for every segment:
//! - the verdict agrees with `valid_len`: `Clean` ⇒ everything after the prefix is zeros;
//!   `Torn { at }` and `Corrupt { at, .. }` ⇒ `at == valid_len < len`, and bytes remain after
//!   `at` that are not all zeros;
//! - the records tile the prefix exactly: each re-encodes (`encode`) to the bytes it was read
//!   from, ids `first ..= last` with contiguous chunks that parse and hold exactly those ids;
//! - the valid prefix rescans `Clean`, with the same records;
//! - `Torn` ⇒ no whole record starts after `at` (checked by scanning every later candidate
//!   alone) and the record at `at` does not have intact checksums; `Corrupt` ⇒ a whole record
//!   follows, or the record at `at` has intact checksums (it was written whole).
//!
//! Built segments also check the verdict itself: undamaged (with or without zeros after)
//! ⇒ `Clean` with exactly the built records; cut inside the last record ⇒ `Torn` at its start
//! with the records before it.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use tidewire::envelope::{Data, NewEvent};
use tidewire::log::record::{Chunk, ChunkBuilder};
use tidewire::log::wal_record::{self, Ending, Scan, HEADER_LEN, MAGIC};
use tidewire::topic::Topic;

/// Whether `buf` starts with a record header and body whose checksums both match (the rule
/// the module's doc gives for "written whole"), written out again here from the format.
fn checksums_intact(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
        return false;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if crc32fast::hash(&buf[0..12]) != be(&buf[12..16]) {
        return false;
    }
    let total = HEADER_LEN + be(&buf[4..8]) as usize;
    buf.len() >= total && crc32fast::hash(&buf[HEADER_LEN..total]) == be(&buf[8..12])
}

/// The length of the record at the start of `buf` when its checksums are intact.
fn record_len(buf: &[u8]) -> Option<usize> {
    checksums_intact(buf)
        .then(|| HEADER_LEN + u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize)
}

/// Whether a whole record (one `scan` reads back) starts somewhere after `at`. Each candidate
/// is scanned alone (exactly its bytes), so the check stays linear in the candidates.
fn whole_record_after(buf: &[u8], at: usize) -> bool {
    (at + 1..buf.len())
        .filter_map(|p| Some(&buf[p..p + record_len(&buf[p..])?]))
        .any(|r| wal_record::scan(r).records.len() == 1)
}

/// Every property of a scan that holds for any input; returns the scan.
fn check(buf: &[u8]) -> Scan<'_> {
    let s = wal_record::scan(buf);
    assert!(s.valid_len <= buf.len());
    let rest = &buf[s.valid_len..];
    match &s.ending {
        Ending::Clean => assert!(
            rest.iter().all(|&b| b == 0),
            "Clean, yet non-zero bytes follow the prefix of {}",
            s.valid_len
        ),
        Ending::Torn { at } | Ending::Corrupt { at, .. } => {
            assert_eq!(*at, s.valid_len, "{:?}", s.ending);
            assert!(
                rest.iter().any(|&b| b != 0),
                "{:?} over nothing but zeros",
                s.ending
            );
        }
    }

    // The records tile the prefix, each canonical and internally consistent.
    let mut at = 0;
    for r in &s.records {
        assert!(r.first <= r.last, "{r:?}");
        assert!(!r.chunks.is_empty());
        let mut next = r.first;
        for (first, bytes) in &r.chunks {
            assert_eq!(*first, next, "chunks not contiguous in {r:?}");
            let chunk = Chunk::parse(bytes).expect("a chunk scan accepted parses");
            assert!(!chunk.is_empty());
            next = first
                .checked_add(chunk.len() as u64)
                .expect("chunk ids fit in u64");
        }
        assert_eq!(
            next,
            r.last.wrapping_add(1),
            "chunks hold other ids than {r:?}"
        );
        let encoded = wal_record::encode(r.first, r.last, &r.chunks);
        assert_eq!(
            &buf[at..at + encoded.len()],
            &encoded[..],
            "a record re-encodes to the bytes it was read from"
        );
        at += encoded.len();
    }
    assert_eq!(at, s.valid_len, "the records are the whole valid prefix");

    // The valid prefix alone is a clean segment with the same records.
    let again = wal_record::scan(&buf[..s.valid_len]);
    assert_eq!(again.ending, Ending::Clean);
    assert_eq!(again.valid_len, s.valid_len);
    assert_eq!(again.records, s.records);

    // Torn or corrupt, by the module's rule.
    match &s.ending {
        Ending::Clean => {}
        Ending::Torn { at } => {
            assert!(
                !whole_record_after(buf, *at),
                "Torn at {at}, yet a whole record follows"
            );
            assert!(
                !checksums_intact(&buf[*at..]),
                "Torn at {at}, yet the record there was written whole (its checksums match)"
            );
        }
        Ending::Corrupt { at, why } => assert!(
            whole_record_after(buf, *at) || checksums_intact(&buf[*at..]),
            "Corrupt at {at} ({why}), yet nothing whole follows and its checksums fail"
        ),
    }
    s
}

const TOPICS: [&str; 3] = ["a", "sensors/room-12/temperature", "t/0"];

/// A chunk of 1 to 4 events made from the input.
fn built_chunk(input: &mut Input<'_>) -> Vec<u8> {
    let mut b = ChunkBuilder::new();
    for _ in 0..1 + input.byte() % 4 {
        let flags = input.byte();
        let e = NewEvent {
            topic: Topic::parse(TOPICS[usize::from(flags) % TOPICS.len()]).expect("topic"),
            event_type: (flags & 0x08 != 0).then(|| input.text(32).into()),
            msg_id: (flags & 0x10 != 0).then(|| input.text(32).into()),
            data: Data::Bytes(bytes::Bytes::copy_from_slice(input.bytes(64))),
        };
        assert!(b.push_event(input.u64(), &e));
    }
    b.finish().expect("a chunk of at least one event")
}

fn built(input: &mut Input<'_>) {
    // Up to 4 records of 1 to 3 chunks, ids contiguous from the input's first id.
    let mut next = input.u64() >> 8;
    let mut segment = Vec::new();
    let mut starts = Vec::new();
    let mut want = Vec::new();
    for _ in 0..1 + input.byte() % 4 {
        let chunks: Vec<(u64, Vec<u8>)> = (0..1 + input.byte() % 3)
            .map(|_| {
                let c = built_chunk(input);
                let first = next;
                next += Chunk::parse(&c).expect("built chunk").len() as u64;
                (first, c)
            })
            .collect();
        let view: Vec<(u64, &[u8])> = chunks.iter().map(|(f, c)| (*f, c.as_slice())).collect();
        let (first, last) = (chunks[0].0, next - 1);
        starts.push(segment.len());
        segment.extend(wal_record::encode(first, last, &view));
        want.push((first, last, chunks));
    }
    let same_records = |s: &Scan<'_>, n: usize| {
        assert_eq!(s.records.len(), n);
        for (r, (first, last, chunks)) in s.records.iter().zip(&want) {
            assert_eq!((r.first, r.last), (*first, *last));
            let got: Vec<(u64, &[u8])> = r.chunks.clone();
            let built: Vec<(u64, &[u8])> = chunks.iter().map(|(f, c)| (*f, c.as_slice())).collect();
            assert_eq!(got, built);
        }
    };

    // Undamaged: clean, with every record; zeros after it change nothing.
    let s = check(&segment);
    assert_eq!(s.ending, Ending::Clean);
    assert_eq!(s.valid_len, segment.len());
    same_records(&s, want.len());
    let mut padded = segment.clone();
    padded.resize(segment.len() + usize::from(input.byte()), 0);
    let s = check(&padded);
    assert_eq!(s.ending, Ending::Clean);
    same_records(&s, want.len());

    // Cut inside the last record (a write that never finished), maybe into zero-filled space.
    let last_start = *starts.last().expect("a record");
    let span = segment.len() - last_start;
    let cut = last_start + 1 + usize::from(input.byte()) % (span - 1).max(1);
    if cut < segment.len() {
        let mut torn = segment[..cut].to_vec();
        if input.byte() & 1 == 1 {
            torn.resize(segment.len() + 64, 0);
        }
        let s = check(&torn);
        if torn.starts_with(&segment) {
            // The bytes cut off were zeros, and the padding gave them back.
            assert_eq!(s.ending, Ending::Clean);
            same_records(&s, want.len());
        } else {
            // Event data may itself hold a whole record: then acknowledged-looking data
            // follows the damage, and the rule says corrupt.
            if whole_record_after(&torn, last_start) {
                assert!(matches!(s.ending, Ending::Corrupt { at, .. } if at == last_start));
            } else {
                assert_eq!(s.ending, Ending::Torn { at: last_start });
            }
            same_records(&s, want.len() - 1);
        }
    }

    // Any damage the input asks for: the general properties still hold.
    let mut damaged = segment;
    for _ in 0..input.byte() % 4 {
        match input.byte() % 4 {
            0 if !damaged.is_empty() => {
                let at = (input.u64() % damaged.len() as u64) as usize;
                damaged[at] ^= input.byte() | 1;
            }
            1 => {
                let len = damaged.len() as u64 + 1;
                damaged.truncate((input.u64() % len) as usize);
            }
            2 => {
                let len = damaged.len() + usize::from(input.byte());
                damaged.resize(len, 0);
            }
            _ => damaged.extend_from_slice(input.bytes(64)),
        }
    }
    check(&damaged);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(rest);
    } else {
        built(&mut Input(rest));
    }
});
