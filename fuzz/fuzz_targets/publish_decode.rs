//! `codec::decode_publish` for every body format (JSON, NDJSON, MessagePack, text, bytes),
//! for one topic (`POST /v1/topics/{topic}/events`) and per envelope (`POST /v1/events`, the
//! multi-topic form), with and without gzip (`codec::gunzip` under a limit).
//!
//! Input: the first byte picks the format (bits 0-2), gzip (bit 3: the body is taken as the
//! compressed stream as sent), the target (bit 4), the limits (bits 5-6) and, with bit 7,
//! "compress it here": the rest is gzipped by the target and must decode exactly as it does
//! uncompressed. A second byte picks the `?type=`/`?msg_id=` of bare bodies.
//!
//! Properties of every accepted body:
//! - 1 to `max_events` events; every topic a valid topic within `max_topic_len`, and the
//!   path's topic for a one-topic publish; every event meets `common::check_event` (fields,
//!   one-line valid JSON data, and its JSON/SSE/MessagePack renderings);
//! - re-encoded as a JSON array, as NDJSON and as MessagePack it decodes to the same events
//!   (MessagePack: JSON data equal as values); text bodies are the one event's string data,
//!   octet-stream bodies its bytes;
//! - a body over the limit is refused with `InflatesTooLarge`, gzip or not; `gunzip` never
//!   returns more than its limit.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use tidewire::codec::{self, BareDefaults, BodyFormat, DecodeError, Limits, Target};
use tidewire::envelope::{Data, NewEvent};
use tidewire::topic::Topic;

const FORMATS: [BodyFormat; 5] = [
    BodyFormat::Json,
    BodyFormat::Ndjson,
    BodyFormat::Msgpack,
    BodyFormat::Text,
    BodyFormat::Bytes,
];

fn limits(pick: u8) -> Limits {
    match pick {
        0 => Limits::default(),
        1 => Limits {
            max_events: 3,
            ..Limits::default()
        },
        2 => Limits {
            max_topic_len: 12,
            ..Limits::default()
        },
        _ => Limits {
            max_decompressed: 96,
            ..Limits::default()
        },
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body).expect("in memory");
    enc.finish().expect("in memory")
}

fn check_accepted(events: &[NewEvent], target: &Target, limits: &Limits) {
    assert!(!events.is_empty() && events.len() <= limits.max_events);
    for e in events {
        common::check_event(e, limits.max_topic_len);
        if let Target::Topic(t) = target {
            assert_eq!(&e.topic, t);
        }
    }
    let relaxed = Limits {
        max_decompressed: usize::MAX,
        ..*limits
    };
    let decode = |format, body: &[u8]| {
        codec::decode_publish(
            &Target::PerEnvelope,
            format,
            false,
            body,
            &relaxed,
            &BareDefaults::default(),
        )
    };
    // As a JSON array of envelopes, and as NDJSON: the same events, byte for byte.
    let mut array = String::from("[");
    let mut lines = String::new();
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            array.push(',');
        }
        common::json_envelope(e, true, &mut array);
        common::json_envelope(e, true, &mut lines);
        lines.push('\n');
    }
    array.push(']');
    assert_eq!(
        decode(BodyFormat::Json, array.as_bytes()).as_deref(),
        Ok(events),
        "re-encoded as {array:?}"
    );
    assert_eq!(
        decode(BodyFormat::Ndjson, lines.as_bytes()).as_deref(),
        Ok(events),
        "re-encoded as {lines:?}"
    );
    // As a MessagePack array: the same events, JSON data equal as values.
    let mp = rmpv::Value::Array(
        events
            .iter()
            .map(|e| common::msgpack_envelope(e, true))
            .collect(),
    );
    let back = decode(BodyFormat::Msgpack, &common::write_msgpack(&mp))
        .unwrap_or_else(|e| panic!("re-encoded as MessagePack: {e}"));
    assert_eq!(
        back.iter().map(common::normalised).collect::<Vec<_>>(),
        events.iter().map(common::normalised).collect::<Vec<_>>()
    );
}

fuzz_target!(|data: &[u8]| {
    let [head, bare_pick, body @ ..] = data else {
        return;
    };
    let format = FORMATS[usize::from(head & 7) % FORMATS.len()];
    let gzip_flag = head & 0x08 != 0;
    let target = if head & 0x10 != 0 {
        Target::PerEnvelope
    } else {
        // Within every limit below: the HTTP layer checks the path's topic against
        // `max_topic_len` before the body is decoded.
        Target::Topic(Topic::parse("room-12/t").expect("topic"))
    };
    let limits = limits((head >> 5) & 3);
    let compress_here = head & 0x80 != 0;
    let bare = BareDefaults {
        event_type: [None, Some("reading"), Some("gap"), Some("")][usize::from(bare_pick & 3)]
            .map(str::to_string),
        msg_id: [None, Some("m-1"), Some("")][usize::from(bare_pick >> 2) % 3].map(str::to_string),
    };

    let got = codec::decode_publish(&target, format, gzip_flag, body, &limits, &bare);
    if !gzip_flag && body.len() > limits.max_decompressed {
        assert!(
            matches!(
                got,
                Err(DecodeError::InflatesTooLarge(_)) | Err(DecodeError::Invalid(_))
            ),
            "{got:?}"
        );
    }
    if gzip_flag {
        match codec::gunzip(body, limits.max_decompressed) {
            Ok(plain) => {
                assert!(plain.len() <= limits.max_decompressed);
                let again = codec::decode_publish(&target, format, false, &plain, &limits, &bare);
                assert_eq!(got, again, "gzip and plain decodes differ");
            }
            Err(e) => {
                if bare
                    .event_type
                    .as_deref()
                    .is_none_or(|t| !t.is_empty() && t != "gap")
                    && bare.msg_id.as_deref().is_none_or(|m| !m.is_empty())
                {
                    assert_eq!(got, Err(e));
                }
            }
        }
    }
    if compress_here {
        let zipped = gzip(body);
        let via_gzip = codec::decode_publish(&target, format, true, &zipped, &limits, &bare);
        let plain = codec::decode_publish(&target, format, false, body, &limits, &bare);
        assert_eq!(
            via_gzip,
            plain,
            "gzip({} bytes) decodes differently",
            body.len()
        );
    }
    let Ok(events) = got else {
        return;
    };
    check_accepted(&events, &target, &limits);
    match format {
        BodyFormat::Text if !gzip_flag => {
            let text = std::str::from_utf8(body).expect("an accepted text body is UTF-8");
            assert_eq!(events.len(), 1);
            let Data::Json(json) = &events[0].data else {
                panic!("text data is JSON")
            };
            assert_eq!(
                serde_json::from_str::<String>(json).ok().as_deref(),
                Some(text)
            );
        }
        BodyFormat::Bytes if !gzip_flag => {
            assert_eq!(events.len(), 1);
            assert_eq!(
                events[0].data,
                Data::Bytes(bytes::Bytes::copy_from_slice(body))
            );
        }
        _ => {}
    }
    if matches!(format, BodyFormat::Text | BodyFormat::Bytes) {
        assert_eq!(events[0].event_type.as_deref(), bare.event_type.as_deref());
        assert_eq!(events[0].msg_id.as_deref(), bare.msg_id.as_deref());
    }
});
