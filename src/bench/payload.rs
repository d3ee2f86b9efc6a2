//! What the bench publishes: event data carrying the send time as `"ts":<unix µs>` (the same
//! bytes for tidewire and Nchan), and tidewire publish bodies in each format.

use std::io::Write as _;

use bytes::Bytes;
use serde_json::Value;

use super::target::Format;
use super::Error;

/// A small fast pseudo-random generator (xorshift64*): pads and readings differ from each
/// other like real data, so gzip is not flattered by repeated bytes.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is replaced).
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next pseudo-random value.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn hex(&mut self, out: &mut Vec<u8>, n: usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut left = n;
        while left > 0 {
            let mut r = self.next();
            for _ in 0..left.min(16) {
                out.push(HEX[(r & 15) as usize]);
                r >>= 4;
            }
            left = left.saturating_sub(16);
        }
    }
}

/// The smallest `--size`: `{"ts":<16 digits>,"pad":""}` plus room.
pub(crate) const MIN_SIZE: u64 = 40;

/// Appends event data of exactly `size` bytes (at least [`MIN_SIZE`]):
/// `{"ts":<ts>,"pad":"<pseudo-random hex>"}`.
pub(crate) fn event_data(out: &mut Vec<u8>, size: usize, ts: u64, rng: &mut Rng) {
    let start = out.len();
    let _ = write!(out, "{{\"ts\":{ts},\"pad\":\"");
    let used = out.len() - start + 2;
    rng.hex(out, size.saturating_sub(used));
    out.extend_from_slice(b"\"}");
}

/// Appends a sensor reading carrying `ts`: `{"ts":…,"seq":…,"sensor":"s-…","value":…,
/// "tag":"<32 hex>"}` (about 130 bytes), for replays and their compression.
pub(crate) fn reading(out: &mut Vec<u8>, seq: u64, ts: u64, rng: &mut Rng) {
    let value = (rng.next() % 100_000) as f64 / 1000.0;
    let _ = write!(
        out,
        "{{\"ts\":{ts},\"seq\":{seq},\"sensor\":\"s-{}\",\"value\":{value:.3},\"tag\":\"",
        seq % 50
    );
    rng.hex(out, 32);
    out.extend_from_slice(b"\"}");
}

/// Appends tidewire's publish envelope around `data` (JSON): `{"data":<data>}`.
pub(crate) fn envelope(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(b"{\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
}

/// A publish request body and its headers.
#[derive(Clone)]
pub(crate) struct Body {
    /// The bytes on the wire.
    pub(crate) bytes: Bytes,
    /// `Content-Type`.
    pub(crate) content_type: &'static str,
    /// `Content-Encoding`, when gzip'd.
    pub(crate) content_encoding: Option<&'static str>,
}

/// A tidewire publish body holding `datas` (each a JSON value) as envelopes in `format`: one
/// envelope when there is one datum and `format` is JSON or MessagePack, else a batch (array,
/// or one line each); gzip'd when asked.
pub(crate) fn tidewire_body(datas: &[Vec<u8>], format: Format, gzip: bool) -> Result<Body, Error> {
    let (raw, content_type) = match format {
        Format::Json => {
            let mut out = Vec::with_capacity(datas.iter().map(|d| d.len() + 10).sum());
            if let [one] = datas {
                envelope(&mut out, one);
            } else {
                out.push(b'[');
                for (i, d) in datas.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    envelope(&mut out, d);
                }
                out.push(b']');
            }
            (out, "application/json")
        }
        Format::Ndjson => {
            let mut out = Vec::with_capacity(datas.iter().map(|d| d.len() + 10).sum());
            for d in datas {
                envelope(&mut out, d);
                out.push(b'\n');
            }
            (out, "application/x-ndjson")
        }
        Format::Msgpack => {
            let mut envs = Vec::with_capacity(datas.len());
            for d in datas {
                let v: Value = serde_json::from_slice(d)?;
                envs.push(serde_json::json!({ "data": v }));
            }
            let out = match envs.as_slice() {
                [one] => rmp_serde::to_vec_named(one)?,
                _ => rmp_serde::to_vec_named(&envs)?,
            };
            (out, "application/msgpack")
        }
    };
    if !gzip {
        return Ok(Body {
            bytes: raw.into(),
            content_type,
            content_encoding: None,
        });
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::default(),
    );
    gz.write_all(&raw)?;
    Ok(Body {
        bytes: gz.finish()?.into(),
        content_type,
        content_encoding: Some("gzip"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_data_is_exactly_size_bytes_of_json_with_its_ts() {
        let mut rng = Rng::new(7);
        for size in [MIN_SIZE as usize, 64, 256, 1000] {
            let mut out = Vec::new();
            event_data(&mut out, size, 1_763_800_000_123_456, &mut rng);
            assert_eq!(out.len(), size);
            let v: Value = serde_json::from_slice(&out).expect("JSON");
            assert_eq!(v["ts"], 1_763_800_000_123_456u64);
        }
        let mut out = Vec::new();
        reading(&mut out, 3, 9, &mut rng);
        let v: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!((v["ts"].as_u64(), v["seq"].as_u64()), (Some(9), Some(3)));
    }

    #[test]
    fn bodies_hold_every_event_in_each_format() {
        let datas: Vec<Vec<u8>> = (0..3)
            .map(|i| format!("{{\"ts\":{i}}}").into_bytes())
            .collect();
        let json = tidewire_body(&datas, Format::Json, false).expect("json");
        let v: Value = serde_json::from_slice(&json.bytes).expect("array");
        assert_eq!(v[2]["data"]["ts"], 2);
        let nd = tidewire_body(&datas, Format::Ndjson, false).expect("ndjson");
        assert_eq!(
            nd.bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            3
        );
        let mp = tidewire_body(&datas[..1], Format::Msgpack, true).expect("msgpack");
        assert_eq!(mp.content_encoding, Some("gzip"));
        let raw = super::super::wire::gunzip(&mp.bytes).expect("gunzip");
        let v: Value = rmp_serde::from_slice(&raw).expect("map");
        assert_eq!(v["data"]["ts"], 0);
    }
}
