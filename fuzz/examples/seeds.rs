//! Writes the seed corpus of every target into `fuzz/corpus/<target>/`, from real examples:
//! the bodies and frames of tests/ and CONTRACT.md, and records encoded by tidewire itself
//! (log records, export lines, signed tokens). Deterministic: run it again after a format
//! change and commit what changed.
//!
//! ```text
//! fuzz/seeds.sh
//! ```
//!
//! Each file starts with the target's selector byte(s) (see each target's doc comment).

#[path = "../common/mod.rs"]
mod common;

use std::io::Write as _;

// Linked only for the sanitizer-coverage hooks the instrumented dependencies call when this
// is built with the fuzz targets' flags (see fuzz/README.md); its `main` is not used.
use libfuzzer_sys as _;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tidewire::envelope::{Data, Event, EventId, NewEvent};
use tidewire::log::record::{self, ChunkBuilder, DedupeEntry, TopicRecord};
use tidewire::log::wal_record;
use tidewire::topic::Topic;

struct Corpus {
    dir: PathBuf,
    count: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Self {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        Corpus { dir, count: 0 }
    }

    fn add(&mut self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join(name), bytes).expect("write seed");
        self.count += 1;
    }

    fn add2(&mut self, name: &str, head: &[u8], body: &[u8]) {
        let mut v = head.to_vec();
        v.extend_from_slice(body);
        self.add(name, &v);
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body).expect("in memory");
    enc.finish().expect("in memory")
}

fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("MessagePack")
}

fn event(topic: &str, event_type: Option<&str>, msg_id: Option<&str>, data: Data) -> NewEvent {
    NewEvent {
        topic: Topic::parse(topic).expect("topic"),
        event_type: event_type.map(Into::into),
        msg_id: msg_id.map(Into::into),
        data,
    }
}

fn json_data(s: &str) -> Data {
    Data::Json(s.into())
}

fn bytes_data(b: &[u8]) -> Data {
    Data::Bytes(bytes::Bytes::copy_from_slice(b))
}

fn sample_events() -> Vec<NewEvent> {
    vec![
        event(
            "sensors/a",
            Some("reading"),
            None,
            json_data(r#"{"t":21.5}"#),
        ),
        event(
            "sensors/room-12/temperature",
            None,
            Some("m-1"),
            json_data("[1,2]"),
        ),
        event(
            "bin/raw",
            Some("blob"),
            Some("m-2"),
            bytes_data(b"\x00\x01\xff"),
        ),
        event("a", None, None, json_data(r#""just a string""#)),
        event("gw/1/hum", None, None, json_data("55")),
    ]
}

/// `head`, `bare` and body for publish_decode: format index, gzip, target, limits, compress.
fn publish_decode(root: &Path) -> usize {
    let mut c = Corpus::new(root, "publish_decode");
    const JSON: u8 = 0;
    const NDJSON: u8 = 1;
    const MSGPACK: u8 = 2;
    const TEXT: u8 = 3;
    const BYTES: u8 = 4;
    const GZIP: u8 = 0x08;
    const PER_ENVELOPE: u8 = 0x10;
    const COMPRESS_HERE: u8 = 0x80;
    let single = br#"{"data":{"t":21.5,"ok":true,"tags":["a","b"]},"type":"reading"}"#;
    let batch = br#"[{"data":1},{"data":{"t":2},"type":"reading"},{"data":null},{"data":[3,"x"],"msg_id":"m-4"}]"#;
    let multi = br#"[{"topic":"gw/1/temp","data":{"t":20}},{"topic":"gw/2/temp","data":{"t":21},"type":"reading"},{"topic":"gw/1/hum","data":55}]"#;
    let b64 = br#"{"data":"AAEC/w==","encoding":"base64","type":"blob"}"#;
    let ndjson = b"{\"data\":{\"reading\":1}}\n{\"data\":{\"reading\":2},\"msg_id\":\"m\"}\r\n\n";
    c.add2("json-single", &[JSON, 0], single);
    c.add2("json-batch", &[JSON, 0], batch);
    c.add2("json-multi-topic", &[JSON | PER_ENVELOPE, 0], multi);
    c.add2("json-base64", &[JSON, 0], b64);
    c.add2(
        "json-multiline-data",
        &[JSON, 0],
        b"{\"data\":{\n \"a\": [1,\n2]\n}}",
    );
    c.add2(
        "json-surrogates",
        &[JSON, 0],
        br#"{"data":"\ud83d\ude00 \u00e9"}"#,
    );
    c.add2("ndjson", &[NDJSON, 0], ndjson);
    c.add2(
        "ndjson-multi-topic",
        &[NDJSON | PER_ENVELOPE, 0],
        b"{\"topic\":\"a\",\"data\":1}\n{\"topic\":\"b/c\",\"data\":2,\"type\":\"t\"}\n",
    );
    let mp_map = msgpack(&json!({"data": {"t": 21.5, "ok": true, "n": -3}, "type": "reading"}));
    c.add2("msgpack-map", &[MSGPACK, 0], &mp_map);
    let mp_batch = msgpack(&json!([
        {"data": "first"},
        {"data": [1, 2, 3], "type": "list", "msg_id": "abc"}
    ]));
    c.add2("msgpack-batch", &[MSGPACK, 0], &mp_batch);
    let mp_multi = msgpack(&json!([
        {"topic": "gw/1/temp", "data": {"t": 20}},
        {"topic": "gw/2/temp", "data": 1.5}
    ]));
    c.add2(
        "msgpack-multi-topic",
        &[MSGPACK | PER_ENVELOPE, 0],
        &mp_multi,
    );
    // A `bin` payload: a map with key "data" and a bin8 value.
    c.add2(
        "msgpack-bin",
        &[MSGPACK, 0],
        b"\x81\xa4data\xc4\x03\x00\x01\xff",
    );
    c.add2("text", &[TEXT, 1], "21.5 °C".as_bytes());
    c.add2("bytes", &[BYTES, 5], b"\x00\x01\x02\xff");
    c.add2("gzip-json-batch", &[JSON | GZIP, 0], &gzip(batch));
    c.add2("gzip-ndjson", &[NDJSON | GZIP, 0], &gzip(ndjson));
    c.add2(
        "gzip-msgpack-multi",
        &[MSGPACK | GZIP | PER_ENVELOPE, 0],
        &gzip(&mp_multi),
    );
    c.add2(
        "gzip-multi-member",
        &[JSON | GZIP, 0],
        &[gzip(b"[{\"data\":1}"), gzip(b",{\"data\":2}]")].concat(),
    );
    c.add2("compress-here-json", &[JSON | COMPRESS_HERE, 0], single);
    c.add2("limits-few-events", &[JSON | (1 << 5), 0], batch);
    c.add2(
        "limits-short-topics",
        &[JSON | PER_ENVELOPE | (2 << 5), 0],
        multi,
    );
    c.add2("limits-small-body", &[NDJSON | (3 << 5), 0], ndjson);
    c.count
}

fn topic_pattern(root: &Path) -> usize {
    let mut c = Corpus::new(root, "topic_pattern");
    for (name, p, t) in [
        (
            "star-one",
            "sensors/*/temperature",
            "sensors/room-12/temperature",
        ),
        (
            "star-not-two",
            "sensors/*/temperature",
            "sensors/a/b/temperature",
        ),
        ("double-star-zero", "sensors/**", "sensors"),
        ("double-star-many", "sensors/**", "sensors/a/b/c"),
        ("double-star-prefix", "sensors/**", "sensorsX/a"),
        ("double-star-not-last", "a/**/b", "a/x/b"),
        ("alphabet", "a.b~c_d-e/*", "a.b~c_d-e/Z9"),
        ("bad-chars", "a b/*", "a/é"),
        ("empty-segment", "a//b", "/a"),
        ("only-double-star", "**", "anything/at/all"),
        ("star-star-star", "*/*/**", "a/b"),
    ] {
        c.add2(name, &[0], format!("{p}\0{t}").as_bytes());
    }
    let long = "a".repeat(200);
    c.add2("at-limit", &[0], format!("{long}\0{long}").as_bytes());
    c.add2("over-limit", &[0], format!("{long}/*\0{long}a").as_bytes());
    c.add2("low-limit", &[0x04], b"abcdefgh/*\0abcdefgh/x");
    // Built mode: (mode >> 4) bytes of pattern segments, then topic segments.
    c.add("built-star", &[0x31, 0, 2, 1, 0, 0, 1]);
    c.add("built-double-star", &[0x21, 0, 3, 0, 1, 1]);
    c.add("built-mixed", &[0x41, 4, 2, 5, 3, 4, 0, 5, 6]);
    c.count
}

fn auth_coverage(root: &Path) -> usize {
    let mut c = Corpus::new(root, "auth_coverage");
    // long x length, long y length, then g: count, segments; r: count, segments.
    // Segment codes: 0 a, 1 b, 2 long x, 3 long y, 4 `*`, 5 `**` (last only).
    c.add("double-star-covers-star", &[0, 0, 1, 0, 5, 2, 0, 4, 0]);
    c.add("star-not-double-star", &[0, 0, 1, 0, 4, 1, 0, 5]);
    c.add("literal-vs-star", &[0, 0, 2, 0, 4, 0, 2, 0, 4, 0]);
    c.add("all-covers", &[0, 0, 0, 5, 3, 0, 4, 1, 5]);
    c.add("long-literals", &[99, 98, 1, 2, 4, 2, 4, 3, 5]);
    c.add("long-and-star", &[150, 40, 3, 2, 4, 3, 4, 2, 4, 3, 5]);
    c.add("prefix-topic", &[0, 0, 1, 0, 5, 0, 0]);
    c.count
}

fn ws_client_frame(root: &Path) -> usize {
    let mut c = Corpus::new(root, "ws_client_frame");
    let frames = [
        (
            "subscribe",
            json!({"op":"subscribe","topics":["sensors/**","sensors/a"],"since":0,"ref":"s"}),
        ),
        (
            "subscribe-text-since",
            json!({"op":"subscribe","topics":["a"],"since":"7"}),
        ),
        (
            "unsubscribe",
            json!({"op":"unsubscribe","topics":["sensors/a"],"ref":"u"}),
        ),
        (
            "publish",
            json!({"op":"publish","topic":"s/a","data":{"t":1},"type":"r","ref":"p1","msg_id":"m-1"}),
        ),
        (
            "publish-base64",
            json!({"op":"publish","topic":"ok","data":"AAEC","encoding":"base64","ref":4}),
        ),
        ("ping", json!({"op":"ping","ref":"sync"})),
        ("auth", json!({"op":"auth","token":"eyJ.a.b","ref":"a1"})),
        ("unknown-op", json!({"op":"dance","ref":"r1"})),
        (
            "bad-pattern",
            json!({"op":"subscribe","topics":["a/**/b"],"ref":"r2"}),
        ),
        (
            "bad-topic",
            json!({"op":"publish","topic":"bad topic","data":1,"ref":"r3"}),
        ),
        ("no-data", json!({"op":"publish","topic":"ok","ref":"r5"})),
    ];
    for (name, v) in &frames {
        c.add2(&format!("json-{name}"), &[0], v.to_string().as_bytes());
        c.add2(&format!("msgpack-{name}"), &[1], &msgpack(v));
    }
    // MessagePack publish with `bin` data: {"op":"publish","topic":"s/b","data":bin,"ref":9}.
    c.add2(
        "msgpack-publish-bin",
        &[1],
        b"\x84\xa2op\xa7publish\xa5topic\xa3s/b\xa4data\xc4\x02\x00\x01\xa3ref\x09",
    );
    c.add2("json-malformed", &[0], b"{nope");
    c.add2("json-array", &[0], b"[\"ping\",1]");
    c.add2("msgpack-gzip", &[1], &gzip(b"\x81\xa2op\xa4ping"));
    c.add2(
        "json-limits",
        &[2],
        br#"{"op":"subscribe","topics":["0123456789a/*"],"ref":1}"#,
    );
    c.count
}

fn cursor(root: &Path) -> usize {
    let mut c = Corpus::new(root, "cursor");
    for (name, s) in [
        ("plain", "42"),
        ("zero", "0"),
        ("padded", " \t7\r\n"),
        ("max", "18446744073709551615"),
        ("max-plus-one", "18446744073709551616"),
        ("leading-zeros", "00000000000000000042"),
        ("negative", "-1"),
        ("exponent", "1e3"),
        ("plus", "+5"),
        ("vertical-tab", "\x0b5"),
        ("empty", ""),
        ("long", "123456789012345678901234"),
    ] {
        c.add(name, s.as_bytes());
    }
    c.count
}

fn jwt(root: &Path) -> usize {
    let mut c = Corpus::new(root, "jwt");
    let key = EncodingKey::from_secret(common::JWT_SECRET.as_bytes());
    // A fixed far-future expiry, so the seeds stay valid (and the corpus deterministic).
    let exp = 4_102_444_800u64; // 2100-01-01
    let claims = [
        (
            "grants",
            json!({"exp": exp, "sub": "dev-1", "tidewire": {"publish": ["sensors/**"], "subscribe": ["sensors/*/t", "a"]}}),
        ),
        (
            "aud-iss",
            json!({"exp": exp, "aud": "tidewire", "iss": "auth.example", "tidewire": {"subscribe": ["**"]}}),
        ),
        ("no-exp", json!({"tidewire": {"publish": ["a/b"]}})),
        ("expired", json!({"exp": 1_000_000, "tidewire": {}})),
        ("nbf", json!({"exp": exp, "nbf": exp - 10})),
        (
            "bad-grant",
            json!({"exp": exp, "tidewire": {"subscribe": ["a/**/b"]}}),
        ),
        ("fraction-exp", json!({"exp": 4_102_444_800.5})),
    ];
    for (i, (name, cl)) in claims.iter().enumerate() {
        let alg = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512][i % 3];
        let token = jsonwebtoken::encode(&Header::new(alg), cl, &key).expect("sign");
        // Mode 0 (the token as text), 1 (header \0 claims, signed by the target), 2 (claims).
        c.add2(&format!("token-{name}"), &[0], token.as_bytes());
        let header = serde_json::to_vec(&Header::new(alg)).expect("header");
        let mode_alg = (i as u8 % 3) << 2;
        c.add2(
            &format!("raw-{name}"),
            &[1 | mode_alg],
            &[&header[..], b"\0", cl.to_string().as_bytes()].concat(),
        );
        c.add2(
            &format!("claims-{name}"),
            &[2 | mode_alg],
            cl.to_string().as_bytes(),
        );
    }
    c.add2("token-none-alg", &[0], b"eyJhbGciOiJub25lIn0.eyJleHAiOjR9.");
    c.add2("token-garbage", &[0], b"not.a.jwt");
    // Mode 3: exp pick, nbf pick, flags (aud, iss, sub, grants), then grant lists.
    c.add(
        "built-grants",
        &[
            3, 1, 0, 0x0f, 3, b'd', b'e', b'v', 2, 3, b'a', b'/', b'*', 1, b'b', 1, 4, b'a', b'/',
            b'*', b'*',
        ],
    );
    c.add("built-huge-exp", &[3, 4, 0, 0]);
    c.add("built-float-exp", &[3, 10, 0, 0]);
    c.count
}

fn log_record(root: &Path) -> usize {
    let mut c = Corpus::new(root, "log_record");
    let events = sample_events();
    for (i, e) in events.iter().enumerate() {
        c.add2(
            &format!("event-{i}"),
            &[0],
            &record::encode_event(1_763_800_000_000 + i as u64, e),
        );
    }
    let mut b = ChunkBuilder::new();
    for (i, e) in events.iter().enumerate() {
        assert!(b.push_event(100 + i as u64, e));
    }
    c.add2("chunk", &[0], &b.finish().expect("chunk"));
    assert!(b.push_event(7, &events[0]));
    c.add2("chunk-one", &[0], &b.finish().expect("chunk"));
    c.add2(
        "index",
        &[0],
        &record::encode_index(&[0, 1, 7, 4095, 70_000]),
    );
    c.add2(
        "dedupe",
        &[0],
        &record::encode_dedupe(DedupeEntry { id: 42, time: 7 }),
    );
    let mut bucket = Vec::new();
    let mut key = Vec::new();
    record::dedupe_key_into(&mut key, "a/b", "m-1");
    record::push_expiry_item(&mut bucket, 5, &key);
    record::dedupe_key_into(&mut key, "sensors/a", "m-2");
    record::push_expiry_item(&mut bucket, 6, &key);
    c.add2("expiry", &[0], &bucket);
    c.add2("count", &[0], &record::encode_count(1 << 40));
    let t = TopicRecord {
        topic_id: 3,
        first_id: 10,
        last_id: 99,
        count: 90,
        bytes: 4096,
        removed_through: 9,
    };
    c.add2("topic", &[0], &record::encode_topic(&t));
    c.add2("chunk-key", &[0], &record::chunk_key(1 << 33));
    c.add2("index-key", &[0], &record::index_key(3, 1 << 33));
    c.add2(
        "expiry-key",
        &[0],
        &record::expiry_key(1_763_800_000_000, 5),
    );
    // Built mode: a stream of (time, flags, fields) choices.
    c.add(
        "built-events",
        &[
            1, 7, 0, 0, 0, 0, 0, 0, 0, 0x18, 1, b't', 2, b'm', b'1', 3, b'"', b'x', b'"', 1, 0, 0,
            0, 0, 0, 0, 0, 0x21, 2, 0, 0xff,
        ],
    );
    c.count
}

fn export_parse(root: &Path) -> usize {
    let mut c = Corpus::new(root, "export_parse");
    let mut lines = Vec::new();
    let mut records = Vec::new();
    for (i, e) in sample_events().into_iter().enumerate() {
        let ev = Event::new(EventId(i as u64 + 1), 1_763_800_000_000 + i as u64, e);
        let mut line = Vec::new();
        tidewire::export::export_line(&ev, &mut line);
        c.add2(&format!("line-{i}"), &[0], &line);
        lines.extend_from_slice(&line);
        let mut rec = Vec::new();
        tidewire::export::export_msgpack(&ev, &mut rec);
        c.add2(&format!("record-{i}"), &[1], &rec);
        records.extend_from_slice(&rec);
    }
    c.add2("lines", &[0], &lines);
    c.add2("records", &[1], &records);
    c.add2(
        "line-id-zero",
        &[0],
        br#"{"id":0,"topic":"a","time":1,"data":1}"#,
    );
    c.add2(
        "line-unknown-field",
        &[0],
        br#"{"id":1,"topic":"a","time":1,"data":1,"extra":1}"#,
    );
    c.count
}

fn wal_scan(root: &Path) -> usize {
    let mut c = Corpus::new(root, "wal_scan");
    let events = sample_events();
    let chunk_of = |from: usize, n: usize| {
        let mut b = ChunkBuilder::new();
        for (i, e) in events.iter().cycle().skip(from).take(n).enumerate() {
            assert!(b.push_event(1_763_800_000_000 + i as u64, e));
        }
        b.finish().expect("chunk")
    };
    // Three group commits: ids 1..=2, 3..=6 (two chunks), 7..=7.
    let (a, b1, b2, d) = (
        chunk_of(0, 2),
        chunk_of(2, 3),
        chunk_of(1, 1),
        chunk_of(3, 1),
    );
    let mut segment = Vec::new();
    let mut ends = Vec::new();
    segment.extend(wal_record::encode(1, 2, &[(1, &a)]));
    ends.push(segment.len());
    segment.extend(wal_record::encode(3, 6, &[(3, &b1), (6, &b2)]));
    ends.push(segment.len());
    segment.extend(wal_record::encode(7, 7, &[(7, &d)]));
    c.add2("clean", &[0], &segment);
    let mut padded = segment.clone();
    padded.resize(segment.len() + 512, 0);
    c.add2("zero-filled", &[0], &padded);
    c.add2("torn", &[0], &segment[..ends[1] + 20]);
    let mut torn_in_zeros = segment[..ends[1] + 20].to_vec();
    torn_in_zeros.resize(segment.len() + 64, 0);
    c.add2("torn-in-zeros", &[0], &torn_in_zeros);
    let mut corrupt = segment.clone();
    corrupt[ends[0] + 30] ^= 0x01;
    c.add2("corrupt", &[0], &corrupt);
    // Built mode: a first id, record and chunk counts, events, then damage choices.
    c.add(
        "built",
        &[
            1, 0, 0, 0, 0, 0, 1, 0, 0, 2, 1, 0, 0x18, 1, b't', 2, b'm', b'1', 3, 1, 2, 3, 9, 0, 0,
            0, 0, 0, 0, 0, 1, 2, 0x01, 4, 0, 0, 0, 0, 0, 0, 0, 0, 40, 1, 2, 0, 9, 0, 0, 0, 0, 0, 0,
            0, 0x5a,
        ],
    );
    c.count
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let written = [
        ("publish_decode", publish_decode(&root)),
        ("topic_pattern", topic_pattern(&root)),
        ("auth_coverage", auth_coverage(&root)),
        ("ws_client_frame", ws_client_frame(&root)),
        ("cursor", cursor(&root)),
        ("jwt", jwt(&root)),
        ("log_record", log_record(&root)),
        ("export_parse", export_parse(&root)),
        ("wal_scan", wal_scan(&root)),
    ];
    for (target, n) in written {
        println!("{n:3} seeds in fuzz/corpus/{target}/");
    }
}
