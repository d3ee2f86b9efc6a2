//! Streaming gzip inflation of request bodies, under a cap on the inflated size.
//!
//! A gzip'd publish body is inflated as its bytes arrive (async-compression's `GzipDecoder`
//! reading the body's frames through `tokio_util::io::StreamReader`): the server holds the
//! inflated bytes, up to the cap, and the compressed frame being read, never the whole
//! compressed body. Inflation stops at the first byte past the cap, so a gzip bomb costs at
//! most `limit + 1` inflated bytes and however much of its compressed body had arrived by
//! then; the rest is never read. Concatenated gzip members are one body (RFC 1952), as with
//! `codec::gunzip`, the whole-buffer form.

use bytes::{BufMut, Bytes};
use tokio::io::AsyncReadExt;
use tokio_stream::{Stream, StreamExt};

use crate::codec::DecodeError;

/// Most inflated bytes reserved before any arrive: a client that declares a large body and
/// sends it slowly (or not at all) does not make the server set aside more than this for it.
const MAX_RESERVE: usize = 256 << 10;

/// Most room for inflated bytes one read offers the decoder (see `inflate_capped`).
const WINDOW: usize = 16 << 10;

/// Why a streamed gzip body was not inflated.
#[derive(Debug, thiserror::Error)]
pub enum InflateError<E> {
    /// Reading the compressed bytes failed: the transport, its timeout, or a limit on the
    /// compressed size (the reader's own error, untouched).
    #[error("could not read the body: {0}")]
    Read(E),
    /// The bytes are not gzip (`Malformed`), or inflate beyond the limit (`InflatesTooLarge`).
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Inflates the gzip stream `compressed` as it arrives. Returns the inflated bytes, at most
/// `limit` of them; refuses with `InflatesTooLarge` as soon as one more would be produced,
/// without reading further, and with `Malformed` for bytes that are not gzip or a stream that
/// ends before its trailer. Room for `expected` inflated bytes is reserved up front (at most
/// `limit`, and at most 256 KiB), so a body of about that size rarely grows its buffer.
pub async fn gunzip_stream<S, E>(
    compressed: S,
    limit: usize,
    expected: usize,
) -> Result<Vec<u8>, InflateError<E>>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    // The reader's error is kept aside as it is: the decoder only passes on an `io::Error`,
    // and the caller tells a too-large body from a broken connection by the original.
    let mut failed = None;
    let inflated = {
        let frames = compressed.map(|frame| {
            frame.map_err(|e| {
                failed = Some(e);
                std::io::Error::other("the body could not be read")
            })
        });
        let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(
            tokio_util::io::StreamReader::new(frames),
        );
        decoder.multiple_members(true);
        inflate_capped(std::pin::pin!(decoder), limit, expected).await
    };
    if let Some(e) = failed {
        return Err(InflateError::Read(e));
    }
    Ok(inflated?)
}

/// Reads `decoder` to its end, refusing once it yields more than `limit` bytes.
///
/// Each read offers the decoder at most [`WINDOW`] bytes of room: flate2's Rust backend
/// zeroes all the room it is offered before inflating into it, on every call, so offering a
/// large buffer's whole spare capacity while frames arrive a kilobyte at a time cleared
/// megabytes to inflate kilobytes (criterion `gzip_stream`: twice the time of the
/// whole-buffer inflate with 1 KiB frames).
async fn inflate_capped(
    mut decoder: std::pin::Pin<&mut impl tokio::io::AsyncRead>,
    limit: usize,
    expected: usize,
) -> Result<Vec<u8>, DecodeError> {
    // One byte over the limit is enough to refuse: never room for more.
    let most = limit.saturating_add(1);
    let mut out = Vec::with_capacity(expected.min(MAX_RESERVE).min(most));
    loop {
        let room = (most - out.len()).min(WINDOW);
        let n = decoder
            .read_buf(&mut (&mut out).limit(room))
            .await
            .map_err(|e| DecodeError::Malformed(format!("gzip: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() > limit {
            return Err(DecodeError::InflatesTooLarge(limit));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// `bytes` as a stream of frames of `size` bytes each.
    fn frames(bytes: &[u8], size: usize) -> impl Stream<Item = Result<Bytes, String>> {
        let chunks: Vec<Result<Bytes, String>> = bytes
            .chunks(size.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        tokio_stream::iter(chunks)
    }

    #[tokio::test]
    async fn a_body_split_into_frames_of_any_size_inflates_to_the_same_bytes() {
        let plain: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let zipped = gzip(&plain);
        for size in [1, 2, 7, 512, 4096, zipped.len()] {
            let got = gunzip_stream(frames(&zipped, size), plain.len(), 0).await;
            assert_eq!(got.ok().as_deref(), Some(&plain[..]), "frames of {size}");
        }
    }

    #[tokio::test]
    async fn concatenated_members_are_one_body_as_in_the_whole_buffer_form() {
        let mut zipped = gzip(b"first,");
        zipped.extend(gzip(b"second"));
        let got = gunzip_stream(frames(&zipped, 3), 100, 0).await.unwrap();
        assert_eq!(got, b"first,second");
        assert_eq!(crate::codec::gunzip(&zipped, 100).unwrap(), got);
    }

    #[tokio::test]
    async fn exactly_the_limit_is_kept_and_one_byte_more_is_refused() {
        let zipped = gzip(&[7u8; 1000]);
        assert_eq!(
            gunzip_stream(frames(&zipped, 10), 1000, 0)
                .await
                .unwrap()
                .len(),
            1000
        );
        match gunzip_stream(frames(&zipped, 10), 999, 0).await {
            Err(InflateError::Decode(DecodeError::InflatesTooLarge(999))) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_bomb_is_cut_short_without_reading_the_rest_of_its_body() {
        // 64 MiB of zeros, compressed; the stream counts how many frames were pulled.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for _ in 0..64 {
            enc.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
        let bomb = enc.finish().unwrap();
        let pulled = std::sync::atomic::AtomicUsize::new(0);
        let counted = frames(&bomb, 1024).map(|f| {
            pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f
        });
        match gunzip_stream(counted, 1 << 20, 0).await {
            Err(InflateError::Decode(DecodeError::InflatesTooLarge(_))) => {}
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        let pulled = pulled.into_inner();
        let total = bomb.len().div_ceil(1024);
        assert!(
            pulled * 10 < total,
            "read {pulled} of {total} frames to refuse 64 MiB over a 1 MiB cap"
        );
    }

    #[tokio::test]
    async fn a_truncated_stream_or_bytes_that_are_not_gzip_are_malformed() {
        let zipped = gzip(b"{\"data\":1}");
        for bad in [
            &zipped[..zipped.len() - 4],
            &zipped[..10],
            b"{\"data\":1}".as_slice(),
            b"".as_slice(),
        ] {
            match gunzip_stream(frames(bad, 3), 1 << 20, 0).await {
                Err(InflateError::Decode(DecodeError::Malformed(m))) => {
                    assert!(m.starts_with("gzip: "), "{m}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn streamed_and_whole_buffer_inflate_agree_on_good_and_bad_bodies() {
        let good = gzip(b"{\"data\":1}");
        let mut two = good.clone();
        two.extend(gzip(b"\n{\"data\":2}"));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        let mut bad_crc = good.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("one member", good.clone()),
            ("two members", two),
            ("empty", Vec::new()),
            ("junk after a member", trailing),
            ("wrong CRC", bad_crc),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("not gzip", b"{\"data\":1}".to_vec()),
        ];
        for (what, body) in cases {
            let whole = crate::codec::gunzip(&body, 1 << 20);
            let streamed = gunzip_stream(frames(&body, 2), 1 << 20, 0).await;
            match (&whole, &streamed) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}"),
                (
                    Err(DecodeError::Malformed(_)),
                    Err(InflateError::Decode(DecodeError::Malformed(_))),
                ) => {}
                _ => panic!("{what}: whole {whole:?}, streamed {streamed:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_read_failure_is_handed_back_as_the_readers_own_error() {
        let zipped = gzip(&[1u8; 5000]);
        let broken = tokio_stream::iter(vec![
            Ok(Bytes::copy_from_slice(&zipped[..20])),
            Err("connection reset".to_string()),
        ]);
        match gunzip_stream(broken, 1 << 20, 0).await {
            Err(InflateError::Read(e)) => assert_eq!(e, "connection reset"),
            other => panic!("{other:?}"),
        }
    }
}
