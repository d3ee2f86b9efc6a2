//! The stored form of the sled log's write-ahead log: one framed record per group commit,
//! holding the chunks of events that commit wrote (the same chunk encoding as the store, see
//! [`record::Chunk`](super::record::Chunk)).
//!
//! Pure functions, free of I/O, so the decoder can be fuzzed and property-tested directly:
//! [`scan`] is total (any bytes in, a verdict out, never a panic).
//!
//! A record: a 16-byte header, then its body.
//! - header: magic `TWAL`, body length (u32 BE), CRC-32 of the body (u32 BE), CRC-32 of the
//!   first 12 header bytes (u32 BE), so a damaged length is caught before it is followed;
//! - body: first id (u64 BE), last id (u64 BE), chunk count (u32 BE), then per chunk its first
//!   id (u64 BE), its length (u32 BE) and its bytes. The chunks hold the ids `first ..= last`
//!   exactly, contiguous and in order.
//!
//! The verdict on a segment: records are read from the start; where only zeros remain, the
//! segment ends cleanly (segments are zero-filled ahead of their records, and no record
//! begins with a zero byte). At the first record that does not read back, the rest of the
//! segment is searched for any record that does. None: the damage
//! is a torn tail (a write that was never acknowledged, since acknowledging waits for the
//! write's fsync) and the records before it are the segment. One: the damage lies before
//! acknowledged data, and the segment is corrupt.

use super::record::Chunk;

/// The first four bytes of every record.
pub const MAGIC: [u8; 4] = *b"TWAL";
/// Bytes of a record header.
pub const HEADER_LEN: usize = 16;
/// Bytes of a body before its chunks.
const BODY_FIXED_LEN: usize = 8 + 8 + 4;
/// Bytes before each chunk in a body.
const CHUNK_HEAD_LEN: usize = 8 + 4;

/// One record read back: the chunks of one group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord<'a> {
    /// The first event id of the commit.
    pub first: u64,
    /// The last event id of the commit (`>= first`).
    pub last: u64,
    /// The chunks in id order, each with its first id; together they hold `first ..= last`.
    pub chunks: Vec<(u64, &'a [u8])>,
}

/// How a segment's bytes end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every byte belongs to a record that reads back.
    Clean,
    /// From `at` on, the bytes are an unfinished record and no whole record follows: a write
    /// that was cut short, never acknowledged.
    Torn {
        /// Where the unfinished record starts.
        at: usize,
    },
    /// A record at `at` does not read back, yet a whole record follows it: acknowledged data
    /// lies beyond the damage.
    Corrupt {
        /// Where the damaged record starts.
        at: usize,
        /// Why it does not read back.
        why: String,
    },
}

/// What [`scan`] found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan<'a> {
    /// The records that read back, in order, up to the first damage.
    pub records: Vec<WalRecord<'a>>,
    /// Length of the prefix those records take.
    pub valid_len: usize,
    /// How the bytes after that prefix end.
    pub ending: Ending,
}

/// Builds one record in a reusable buffer: [`begin`](Self::begin), chunks in id order with
/// [`push_chunk`](Self::push_chunk), then [`finish`](Self::finish).
#[derive(Debug, Default)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    chunks: u32,
}

impl RecordBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder whose buffer holds records of up to `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Self {
        RecordBuilder {
            buf: Vec::with_capacity(bytes),
            chunks: 0,
        }
    }

    /// Starts a new record, dropping anything unfinished.
    pub fn begin(&mut self) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN + BODY_FIXED_LEN, 0);
        self.chunks = 0;
    }

    /// Whether the record being built holds no chunk yet.
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Adds an encoded chunk whose first event is `first`.
    pub fn push_chunk(&mut self, first: u64, chunk: &[u8]) {
        if self.buf.len() < HEADER_LEN + BODY_FIXED_LEN {
            self.begin();
        }
        self.buf.extend_from_slice(&first.to_be_bytes());
        // A chunk's own offsets are u32, so its length fits.
        self.buf
            .extend_from_slice(&u32::try_from(chunk.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.buf.extend_from_slice(chunk);
        self.chunks += 1;
    }

    /// Seals the record of the ids `first ..= last` and returns its bytes (valid until the
    /// next [`begin`](Self::begin)). `None` when the body would pass 4 GiB, which one group
    /// commit never writes.
    pub fn finish(&mut self, first: u64, last: u64) -> Option<&[u8]> {
        if self.buf.len() < HEADER_LEN + BODY_FIXED_LEN {
            self.begin();
        }
        let body_len = u32::try_from(self.buf.len() - HEADER_LEN).ok()?;
        let body = &mut self.buf[HEADER_LEN..];
        body[0..8].copy_from_slice(&first.to_be_bytes());
        body[8..16].copy_from_slice(&last.to_be_bytes());
        body[16..20].copy_from_slice(&self.chunks.to_be_bytes());
        let body_crc = crc32fast::hash(&self.buf[HEADER_LEN..]);
        self.buf[0..4].copy_from_slice(&MAGIC);
        self.buf[4..8].copy_from_slice(&body_len.to_be_bytes());
        self.buf[8..12].copy_from_slice(&body_crc.to_be_bytes());
        let header_crc = crc32fast::hash(&self.buf[0..12]);
        self.buf[12..16].copy_from_slice(&header_crc.to_be_bytes());
        Some(&self.buf)
    }
}

/// Encodes the record of the ids `first ..= last` held by `chunks` (a convenience over
/// [`RecordBuilder`]).
pub fn encode(first: u64, last: u64, chunks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut b = RecordBuilder::new();
    b.begin();
    for (f, c) in chunks {
        b.push_chunk(*f, c);
    }
    b.finish(first, last)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Why the bytes at some offset are not a whole record.
enum Unread {
    /// Too few bytes remain for the record they begin.
    Short,
    /// The bytes are damaged (or never were a record).
    Bad(String),
}

/// Reads the record at the start of `buf`: the record and its length.
fn read_one(buf: &[u8]) -> Result<(WalRecord<'_>, usize), Unread> {
    if buf.len() < HEADER_LEN {
        return Err(Unread::Short);
    }
    if buf[0..4] != MAGIC {
        return Err(Unread::Bad("no record magic".into()));
    }
    if crc32fast::hash(&buf[0..12]) != be_u32(&buf[12..16]) {
        return Err(Unread::Bad("header checksum mismatch".into()));
    }
    let body_len = be_u32(&buf[4..8]) as usize;
    let total = HEADER_LEN + body_len;
    if buf.len() < total {
        return Err(Unread::Short);
    }
    let body = &buf[HEADER_LEN..total];
    if crc32fast::hash(body) != be_u32(&buf[8..12]) {
        return Err(Unread::Bad("body checksum mismatch".into()));
    }
    let record = decode_body(body).map_err(Unread::Bad)?;
    Ok((record, total))
}

/// Decodes a body whose checksum matched. An error here is not a torn write: the record was
/// written whole, by a build that encodes differently or a bug.
fn decode_body(body: &[u8]) -> Result<WalRecord<'_>, String> {
    if body.len() < BODY_FIXED_LEN {
        return Err(format!("body of {} bytes", body.len()));
    }
    let first = be_u64(&body[0..8]);
    let last = be_u64(&body[8..16]);
    let n = be_u32(&body[16..20]) as usize;
    if last < first {
        return Err(format!("ids {first}..={last} run backwards"));
    }
    let mut rest = &body[BODY_FIXED_LEN..];
    let mut next = first;
    // Bounded by the body: every chunk takes at least its head.
    let mut chunks = Vec::with_capacity(n.min(rest.len() / CHUNK_HEAD_LEN));
    for i in 0..n {
        if rest.len() < CHUNK_HEAD_LEN {
            return Err(format!("chunk {i} of {n} is cut short"));
        }
        let cfirst = be_u64(&rest[0..8]);
        let clen = be_u32(&rest[8..12]) as usize;
        rest = &rest[CHUNK_HEAD_LEN..];
        if rest.len() < clen {
            return Err(format!("chunk {i} of {n} is cut short"));
        }
        let bytes = &rest[..clen];
        rest = &rest[clen..];
        let parsed = Chunk::parse(bytes).map_err(|e| format!("chunk {i}: {}", e.0))?;
        if cfirst != next {
            return Err(format!("chunk {i} starts at id {cfirst}, expected {next}"));
        }
        next = cfirst
            .checked_add(parsed.len() as u64)
            .ok_or_else(|| format!("chunk {i} runs past the last id"))?;
        chunks.push((cfirst, bytes));
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last chunk", rest.len()));
    }
    if chunks.is_empty() || next != last.wrapping_add(1) {
        return Err(format!(
            "chunks hold ids up to {}, the record says {first}..={last}",
            next.wrapping_sub(1)
        ));
    }
    Ok(WalRecord {
        first,
        last,
        chunks,
    })
}

/// Reads a segment's bytes: its records up to the first damage, and how it ends (see the
/// module documentation for the torn/corrupt rule).
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        if at == buf.len() {
            return Scan {
                records,
                valid_len: at,
                ending: Ending::Clean,
            };
        }
        match read_one(&buf[at..]) {
            Ok((r, len)) => {
                records.push(r);
                at += len;
            }
            // Zeros never begin a record (its magic is not zero): a segment written into
            // zero-filled space ends where the zeros begin.
            Err(_) if buf[at..].iter().all(|&b| b == 0) => {
                return Scan {
                    records,
                    valid_len: at,
                    ending: Ending::Clean,
                };
            }
            Err(unread) => {
                let ending = match whole_record_after(buf, at) {
                    Some(found) => Ending::Corrupt {
                        at,
                        why: match unread {
                            Unread::Short => format!(
                                "the record claims more bytes than precede the record at {found}"
                            ),
                            Unread::Bad(why) => why,
                        },
                    },
                    None => match unread {
                        // A checksummed body that does not decode was written whole.
                        Unread::Bad(why) if why_is_written_whole(&buf[at..]) => {
                            Ending::Corrupt { at, why }
                        }
                        _ => Ending::Torn { at },
                    },
                };
                return Scan {
                    records,
                    valid_len: at,
                    ending,
                };
            }
        }
    }
}

/// Whether the record at the start of `buf` has intact checksums (so a failure to read it is
/// not a torn write).
fn why_is_written_whole(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
        return false;
    }
    if crc32fast::hash(&buf[0..12]) != be_u32(&buf[12..16]) {
        return false;
    }
    let total = HEADER_LEN + be_u32(&buf[4..8]) as usize;
    buf.len() >= total && crc32fast::hash(&buf[HEADER_LEN..total]) == be_u32(&buf[8..12])
}

/// The offset of the first whole record starting after `at`, if any.
fn whole_record_after(buf: &[u8], at: usize) -> Option<usize> {
    let mut from = at + 1;
    while from + HEADER_LEN <= buf.len() {
        let pos = buf[from..].windows(4).position(|w| w == MAGIC)?;
        let start = from + pos;
        if read_one(&buf[start..]).is_ok() {
            return Some(start);
        }
        from = start + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Data, NewEvent};
    use crate::log::record::ChunkBuilder;
    use crate::topic::Topic;

    fn chunk(n: usize, tag: &str) -> Vec<u8> {
        let mut b = ChunkBuilder::new();
        for i in 0..n {
            let ev = NewEvent {
                topic: Topic::parse("sensors/a").unwrap(),
                event_type: Some("reading".into()),
                msg_id: (i % 2 == 0).then(|| format!("{tag}-{i}").into()),
                data: Data::Json(format!("{{\"{tag}\":{i}}}").into()),
            };
            assert!(b.push_event(1_700_000_000_000 + i as u64, &ev));
        }
        b.finish().unwrap()
    }

    /// Three records: ids 1..=3 (one chunk), 4..=9 (two chunks), 10..=10.
    fn segment() -> (Vec<u8>, Vec<usize>) {
        let (a, b, c, d) = (chunk(3, "a"), chunk(4, "b"), chunk(2, "c"), chunk(1, "d"));
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        buf.extend(encode(1, 3, &[(1, &a)]));
        ends.push(buf.len());
        buf.extend(encode(4, 9, &[(4, &b), (8, &c)]));
        ends.push(buf.len());
        buf.extend(encode(10, 10, &[(10, &d)]));
        ends.push(buf.len());
        (buf, ends)
    }

    #[test]
    fn a_clean_segment_reads_back_every_record_in_order() {
        let (buf, _) = segment();
        let s = scan(&buf);
        assert_eq!(s.ending, Ending::Clean);
        assert_eq!(s.valid_len, buf.len());
        let ids: Vec<(u64, u64)> = s.records.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(ids, vec![(1, 3), (4, 9), (10, 10)]);
        assert_eq!(s.records[1].chunks.len(), 2);
        assert_eq!(s.records[1].chunks[1].0, 8);
    }

    #[test]
    fn a_segment_cut_at_every_offset_of_its_last_record_keeps_exactly_the_records_before() {
        let (buf, ends) = segment();
        for cut in ends[1]..buf.len() {
            let s = scan(&buf[..cut]);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.valid_len, ends[1], "cut at {cut}");
            let want = if cut == ends[1] {
                Ending::Clean
            } else {
                Ending::Torn { at: ends[1] }
            };
            assert_eq!(s.ending, want, "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_in_the_last_record_drops_only_that_record() {
        let (buf, ends) = segment();
        for at in ends[1]..buf.len() {
            let mut damaged = buf.clone();
            damaged[at] ^= 0x5a;
            let s = scan(&damaged);
            assert_eq!(s.records.len(), 2, "flip at {at}");
            assert_eq!(s.ending, Ending::Torn { at: ends[1] }, "flip at {at}");
        }
    }

    #[test]
    fn a_flipped_byte_in_an_earlier_record_refuses_the_segment() {
        let (buf, ends) = segment();
        for at in 0..ends[1] {
            let mut damaged = buf.clone();
            damaged[at] ^= 0x01;
            let s = scan(&damaged);
            let first_bad = if at < ends[0] { 0 } else { ends[0] };
            assert!(
                matches!(s.ending, Ending::Corrupt { at: a, .. } if a == first_bad),
                "flip at {at}: {:?}",
                s.ending
            );
            assert_eq!(s.valid_len, first_bad, "flip at {at}");
        }
    }

    #[test]
    fn an_earlier_record_cut_short_refuses_the_segment() {
        let (buf, ends) = segment();
        // The middle record loses its last byte; the record after it is whole.
        let mut damaged = buf[..ends[1] - 1].to_vec();
        damaged.extend_from_slice(&buf[ends[1]..]);
        let s = scan(&damaged);
        assert!(matches!(s.ending, Ending::Corrupt { at, .. } if at == ends[0]));
    }

    #[test]
    fn a_whole_record_whose_chunks_disagree_with_its_ids_is_corrupt_not_torn() {
        let a = chunk(3, "a");
        // Checksums are right, but three events cannot be the ids 1..=4.
        let buf = encode(1, 4, &[(1, &a)]);
        let s = scan(&buf);
        assert!(matches!(s.ending, Ending::Corrupt { at: 0, .. }), "{s:?}");
    }

    #[test]
    fn zeros_after_the_records_are_the_clean_end_of_a_zero_filled_segment() {
        let (mut buf, ends) = segment();
        buf.extend(std::iter::repeat_n(0u8, 4096));
        let s = scan(&buf);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.valid_len, ends[2]);
        assert_eq!(s.ending, Ending::Clean);
    }

    #[test]
    fn a_record_cut_short_inside_zero_filled_space_is_a_torn_tail() {
        let (buf, ends) = segment();
        for cut in ends[1] + 1..buf.len() {
            // The write of the last record reached the disk only up to `cut`.
            let mut damaged = buf[..cut].to_vec();
            damaged.extend(std::iter::repeat_n(0u8, buf.len() - cut + 4096));
            let s = scan(&damaged);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.ending, Ending::Torn { at: ends[1] }, "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn scan_never_panics_and_its_valid_prefix_rescans_clean(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let s = scan(&bytes);
            proptest::prop_assert!(s.valid_len <= bytes.len());
            let again = scan(&bytes[..s.valid_len]);
            proptest::prop_assert_eq!(again.ending, Ending::Clean);
            proptest::prop_assert_eq!(again.records.len(), s.records.len());
        }
    }
}
