//! Criterion micro-benchmarks of the hot paths, through the library's public API:
//!
//! - `pattern_match`: `Pattern::matches` and `PatternSet::matches` alone;
//! - `hub_fanout`: `Hub::publish` (the fan-out decision: who to wake) for one event with
//!   10 / 1,000 / 10,000 registered subscriptions, exact topics and wildcard patterns mixed,
//!   and for a 100-event batch with 10,000;
//! - `decode_publish`: `codec::decode_publish` for JSON (one event, a batch of 100), NDJSON
//!   (1000 lines), MessagePack (batches of 100 and 1000) and gzip'd NDJSON (1000 lines);
//! - `gzip_stream`: gzip that streams against the whole-buffer form it replaced: a gzip'd
//!   NDJSON body (1000 and 10,000 lines) inflated as 16 KiB and 1 KiB frames arrive
//!   (`inflate::gunzip_stream`) vs at once (`codec::gunzip`), and one SSE event compressed
//!   and flushed by async-compression's stream encoder vs flate2's `GzEncoder`;
//! - `frames`: the SSE frame (`Event::sse_frame`, what `http::sse` writes) and the WebSocket
//!   frames (`ws_frame::encode_event`, `encode_batch`) in JSON and MessagePack, on events
//!   never rendered before ("cold", as after a log read) and on cached renderings;
//! - `client_frames`: `ws_frame::parse_client` on what a WebSocket client sends (a publish op
//!   carrying a reading, a subscribe op) in JSON and MessagePack;
//! - `log_append`: `SledLog::append` of single events and 100-event batches (over 100 topics,
//!   and of one topic) into a real sled log in a temp dir, with `FsyncPolicy::Never` and with
//!   the default `Always`;
//! - `log_read`: `EventLog::read` of 1,000 events of one topic out of a log holding 100,000
//!   events over 100 topics, from cursor 0 and from a cursor in the middle.
//!
//! ```text
//! cargo bench --bench hot_paths                  # everything, about 2 minutes
//! cargo bench --bench hot_paths -- decode_publish  # one group (a criterion filter)
//! ```
//!
//! Criterion reports one throughput per benchmark: bytes/s for the codecs and frames (the
//! ids carry the event count, and the input sizes are printed once at the start), events/s
//! for everything else.

use std::hint::black_box;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tidewire::codec::{decode_publish, BareDefaults, BodyFormat, Limits, Target};
use tidewire::envelope::{Data, Event, EventId, NewEvent, SharedEvent};
use tidewire::hub::{CommittedBatch, Hub, Registration};
use tidewire::log::retention::RetentionPolicy;
use tidewire::log::{EventLog, FsyncPolicy, LogOptions, SledLog};
use tidewire::metrics::Metrics;
use tidewire::topic::{Pattern, PatternSet, Topic};
use tidewire::ws_frame::{encode_batch, encode_event, parse_client, Encoding};

// ------------------------------------------------------------------------------- fixtures

fn topic(s: &str) -> Topic {
    Topic::parse(s).expect("valid topic")
}

fn pattern(s: &str) -> Pattern {
    Pattern::parse(s).expect("valid pattern")
}

/// The topic of event `i` in the batches: 100 rooms.
fn room_topic(i: usize) -> String {
    format!("sensors/room-{:02}/temp", i % 100)
}

/// A sensor reading of about 200 bytes of compact JSON (the envelope around it makes the
/// 256-byte events of the load benchmarks). Values vary from event to event (a fixed
/// pseudo-random sequence), so a gzip'd batch compresses about as well as real readings do.
fn reading(i: usize) -> serde_json::Value {
    let h = (i as u64 ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let h2 = h.rotate_left(31).wrapping_mul(0x94d0_49bb_1331_11eb);
    serde_json::json!({
        "sensor": format!("room-{:02}", i % 100),
        "seq": i,
        "t": 15.0 + (h % 1500) as f64 / 100.0,
        "humidity": 30.0 + (h2 % 4000) as f64 / 100.0,
        "ok": !h.is_multiple_of(7),
        "trace": format!("{h:016x}{h2:016x}"),
        "tags": ["north", "floor-3", "calibrated"],
        "note": "steady reading from the hall sensor",
    })
}

fn new_event(t: &str, data: Data, event_type: Option<&str>) -> NewEvent {
    NewEvent {
        topic: topic(t),
        event_type: event_type.map(Into::into),
        msg_id: None,
        data,
    }
}

fn json_event(i: usize) -> NewEvent {
    new_event(
        &room_topic(i),
        Data::Json(reading(i).to_string().into()),
        None,
    )
}

fn committed(id: u64, body: NewEvent) -> SharedEvent {
    Arc::new(Event::new(EventId(id), 1_763_800_000_000 + id, body))
}

// -------------------------------------------------------------------------- pattern_match

fn pattern_match(c: &mut Criterion) {
    let mut g = c.benchmark_group("pattern_match");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    let t = topic("sensors/room-12/temp");
    let cases = [
        ("literal_hit", "sensors/room-12/temp"),
        ("literal_miss_last_segment", "sensors/room-12/humidity"),
        ("star_hit", "sensors/*/temp"),
        ("doublestar_hit", "sensors/**"),
        ("doublestar_miss_first_segment", "alarms/**"),
    ];
    for (name, p) in cases {
        let p = pattern(p);
        g.bench_function(name, |b| b.iter(|| black_box(&p).matches(black_box(&t))));
    }
    // A subscriber's set of 10 patterns, none of which matches: every one is tried.
    let set = PatternSet::new(
        (0..10)
            .map(|i| pattern(&format!("sensors/room-{:02}/*", 50 + i)))
            .collect(),
    )
    .expect("non-empty");
    g.bench_function("set_of_10_miss", |b| {
        b.iter(|| black_box(&set).matches(black_box(&t)))
    });
    g.finish();
}

// ----------------------------------------------------------------------------- hub_fanout

/// The pattern of subscriber `i`: 70% exact topics, 30% wildcards, most of them distinct
/// (each dashboard watches its own room), plus a shared `sensors/*/temp` every 100th.
fn subscriber_pattern(i: usize) -> String {
    if i % 100 == 99 {
        return "sensors/*/temp".into();
    }
    match i % 10 {
        7 => format!("sensors/room-{i}/*"),
        8 => format!("sensors/room-{i}/**"),
        9 => format!("site-{i}/*/temp"),
        _ => format!("sensors/room-{i}/temp"),
    }
}

fn hub_with(n: usize) -> (Hub, Vec<Registration>) {
    let hub = Hub::new(1024);
    let regs = (0..n)
        .map(|i| {
            let set = PatternSet::new(vec![pattern(&subscriber_pattern(i))]).expect("one");
            hub.subscribe(&set)
        })
        .collect();
    (hub, regs)
}

fn hub_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_fanout");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // One event, wanted by subscriber 0 (exact), the shared `sensors/*/temp` ones, and
    // nobody else.
    let one: CommittedBatch = vec![committed(
        1,
        new_event("sensors/room-0/temp", Data::Json("1".into()), None),
    )]
    .into();
    let one_topic = [one[0].topic().clone()];
    g.throughput(Throughput::Elements(1));
    for n in [10, 1_000, 10_000] {
        let (hub, regs) = hub_with(n);
        g.bench_with_input(BenchmarkId::new("one_event", n), &n, |b, _| {
            b.iter(|| hub.publish(one.clone(), &one_topic))
        });
        drop(regs);
    }
    // A 100-event batch over 100 topics (subscribers 0..=99 exact or wildcard on them).
    let batch: CommittedBatch = (0..100)
        .map(|i| {
            committed(
                i as u64 + 1,
                new_event(
                    &format!("sensors/room-{i}/temp"),
                    Data::Json("1".into()),
                    None,
                ),
            )
        })
        .collect::<Vec<_>>()
        .into();
    let batch_topics: Vec<Topic> = batch.iter().map(|e| e.topic().clone()).collect();
    g.throughput(Throughput::Elements(100));
    let n = 10_000;
    let (hub, regs) = hub_with(n);
    g.bench_with_input(BenchmarkId::new("batch_100", n), &n, |b, _| {
        b.iter(|| hub.publish(batch.clone(), &batch_topics))
    });
    drop(regs);
    g.finish();
}

// ------------------------------------------------------------------------- decode_publish

fn ndjson_body(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let env =
            serde_json::json!({"topic": room_topic(i), "type": "reading", "data": reading(i)});
        serde_json::to_writer(&mut out, &env).expect("to a Vec");
        out.push(b'\n');
    }
    out
}

fn json_batch_body(n: usize) -> Vec<u8> {
    let envs: Vec<_> = (0..n)
        .map(|i| serde_json::json!({"topic": room_topic(i), "type": "reading", "data": reading(i)}))
        .collect();
    serde_json::to_vec(&envs).expect("to a Vec")
}

fn msgpack_batch_body(n: usize) -> Vec<u8> {
    let envs: Vec<_> = (0..n)
        .map(|i| serde_json::json!({"topic": room_topic(i), "type": "reading", "data": reading(i)}))
        .collect();
    rmp_serde::to_vec_named(&envs).expect("to a Vec")
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(raw).expect("to a Vec");
    gz.finish().expect("to a Vec")
}

/// One publish body to decode.
struct DecodeInput<'a> {
    name: &'static str,
    target: &'a Target,
    format: BodyFormat,
    gzip: bool,
    body: Vec<u8>,
    events: usize,
}

fn decode(c: &mut Criterion) {
    let limits = Limits::default();
    let bare = BareDefaults::default();
    let per_envelope = Target::PerEnvelope;
    let one_topic = Target::Topic(topic("sensors/room-12/temp"));
    let single = serde_json::to_vec(&serde_json::json!({"type": "reading", "data": reading(12)}))
        .expect("to a Vec");
    let ndjson = ndjson_body(1000);
    let input = |name, target, format, gzip, body: Vec<u8>, events| DecodeInput {
        name,
        target,
        format,
        gzip,
        body,
        events,
    };
    let inputs = [
        input(
            "json_single",
            &one_topic,
            BodyFormat::Json,
            false,
            single,
            1,
        ),
        input(
            "json_batch_100",
            &per_envelope,
            BodyFormat::Json,
            false,
            json_batch_body(100),
            100,
        ),
        input(
            "ndjson_1000",
            &per_envelope,
            BodyFormat::Ndjson,
            false,
            ndjson.clone(),
            1000,
        ),
        input(
            "msgpack_batch_100",
            &per_envelope,
            BodyFormat::Msgpack,
            false,
            msgpack_batch_body(100),
            100,
        ),
        input(
            "msgpack_batch_1000",
            &per_envelope,
            BodyFormat::Msgpack,
            false,
            msgpack_batch_body(1000),
            1000,
        ),
        input(
            "ndjson_1000_gzip",
            &per_envelope,
            BodyFormat::Ndjson,
            true,
            gzip(&ndjson),
            1000,
        ),
    ];
    let mut g = c.benchmark_group("decode_publish");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for DecodeInput {
        name,
        target,
        format,
        gzip: gz,
        body,
        events,
    } in &inputs
    {
        eprintln!(
            "decode_publish/{name}: {events} events, {} body bytes{}",
            body.len(),
            if *gz {
                format!(" ({} inflated)", ndjson.len())
            } else {
                String::new()
            }
        );
        // Checked once, so the benchmark never measures a refusal.
        let decoded =
            decode_publish(target, *format, *gz, body, &limits, &bare).expect("a valid body");
        assert_eq!(decoded.len(), *events);
        // Bytes as received (compressed for gzip); events/s = events / median time.
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| decode_publish(target, *format, *gz, black_box(body), &limits, &bare))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------- gzip_stream

/// `body` as the frames a connection hands over, `size` bytes each.
fn frames_of(body: &[u8], size: usize) -> Vec<Result<Bytes, std::io::Error>> {
    body.chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

/// Streaming gzip against the whole-buffer form it replaced, on the two paths that stream:
/// a gzip'd publish body inflated (`inflate::gunzip_stream` over the body's frames vs
/// `codec::gunzip` of the collected body), and one SSE event compressed and flushed to the
/// client (async-compression's encoder over the stream of events, flushing when the next one
/// is not ready, vs flate2's `GzEncoder` written and flushed by hand).
fn gzip_stream(c: &mut Criterion) {
    let mut g = c.benchmark_group("gzip_stream");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let rt = runtime();
    let limit = Limits::default().max_decompressed;
    for lines in [1000, 10_000] {
        let raw = ndjson_body(lines);
        let body = gzip(&raw);
        eprintln!(
            "gzip_stream/inflate_ndjson_{lines}: {} gzip'd bytes, {} inflated",
            body.len(),
            raw.len()
        );
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function(format!("inflate_ndjson_{lines}/whole_buffer"), |b| {
            b.iter(|| tidewire::codec::gunzip(black_box(&body), limit).expect("valid"))
        });
        for frame in [16 << 10, 1 << 10] {
            assert_eq!(
                rt.block_on(tidewire::inflate::gunzip_stream(
                    tokio_stream::iter(frames_of(&body, frame)),
                    limit,
                    body.len() * 4
                ))
                .expect("valid"),
                raw
            );
            g.bench_function(
                format!("inflate_ndjson_{lines}/streamed_{}k_frames", frame >> 10),
                |b| {
                    b.iter_batched(
                        || frames_of(&body, frame),
                        |frames| {
                            rt.block_on(tidewire::inflate::gunzip_stream(
                                tokio_stream::iter(frames),
                                limit,
                                body.len() * 4,
                            ))
                            .expect("valid")
                        },
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }

    // One event's SSE frame per flush, as a live stream writes it.
    let frame = committed(1, json_event(12)).sse_frame().clone();
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("sse_event_flushed/flate2_write_flush", |b| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        b.iter(|| {
            gz.write_all(&frame).expect("to a Vec");
            gz.flush().expect("to a Vec");
            Bytes::from(std::mem::take(gz.get_mut()))
        })
    });
    g.bench_function("sse_event_flushed/async_compression_stream", |b| {
        use tokio_stream::StreamExt as _;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
        let reader = tokio_util::io::StreamReader::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        );
        let encoder = async_compression::tokio::bufread::GzipEncoder::with_quality(
            reader,
            async_compression::Level::Fastest,
        );
        let mut out = tokio_util::io::ReaderStream::with_capacity(encoder, 16 << 10);
        b.iter(|| {
            tx.send(Ok(frame.clone())).expect("open");
            // The event is consumed, the channel is empty: the encoder flushes and yields.
            rt.block_on(out.next())
                .expect("a chunk")
                .expect("in memory")
        })
    });
    g.finish();
}

// --------------------------------------------------------------------------------- frames

/// Fresh events (no rendering cached yet), as the log's reads and commits hand them out.
fn fresh(bodies: &[NewEvent]) -> Vec<SharedEvent> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, b)| committed(i as u64 + 1_000_000, b.clone()))
        .collect()
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frames");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let json = json_event(12);
    let typed = new_event("sensors/room-12/temp", json.data.clone(), Some("reading"));
    let raw = new_event(
        "sensors/room-12/raw",
        Data::Bytes(Bytes::from((0..=255u8).collect::<Vec<_>>())),
        None,
    );
    let sizes = committed(1, json.clone());
    eprintln!(
        "frames: one event is {} bytes of SSE frame, {} of JSON envelope, {} of MessagePack",
        sizes.sse_frame().len(),
        sizes.json().len(),
        sizes.msgpack().len()
    );

    // SSE: the frame `http::sse` writes for each event (built once per event, then shared).
    for (name, body) in [
        ("sse_cold/json", &json),
        ("sse_cold/json_typed", &typed),
        ("sse_cold/bytes_256_base64", &raw),
    ] {
        let len = committed(1, body.clone()).sse_frame().len();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            b.iter_batched(
                || committed(1_000_000, body.clone()),
                |e| {
                    black_box(e.sse_frame());
                    e // dropped outside the measurement
                },
                BatchSize::SmallInput,
            )
        });
    }
    let warm = committed(1, json.clone());
    warm.sse_frame();
    g.throughput(Throughput::Bytes(warm.sse_frame().len() as u64));
    g.bench_function("sse_cached/json", |b| b.iter(|| warm.sse_frame().clone()));

    // WebSocket: one event's frame, cold and cached.
    for (enc_name, enc) in [("json", Encoding::Json), ("msgpack", Encoding::Msgpack)] {
        let len = encode_event(enc, &committed(1, json.clone())).len();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("ws_event_cold/{enc_name}"), |b| {
            b.iter_batched(
                || committed(1_000_000, json.clone()),
                |e| {
                    black_box(encode_event(enc, &e));
                    e
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("ws_event_cached/{enc_name}"), |b| {
            b.iter(|| encode_event(enc, &warm))
        });
    }

    // WebSocket `batch=gzip`: 100 events, cold (as replayed from the log) and with their
    // envelopes already cached (only the array and the gzip are measured).
    let bodies: Vec<NewEvent> = (0..100).map(json_event).collect();
    let cached = fresh(&bodies);
    for (enc_name, enc) in [("json", Encoding::Json), ("msgpack", Encoding::Msgpack)] {
        let raw_len: usize = cached.iter().map(|e| encode_event(enc, e).len()).sum();
        let gz_len = encode_batch(enc, &cached).len();
        eprintln!("frames/ws_batch_100/{enc_name}: {raw_len} bytes of envelopes, {gz_len} gzipped");
        g.throughput(Throughput::Bytes(raw_len as u64));
        g.bench_function(format!("ws_batch_100_gzip_cold/{enc_name}"), |b| {
            b.iter_batched(
                || fresh(&bodies),
                |events| {
                    black_box(encode_batch(enc, &events));
                    events
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("ws_batch_100_gzip_cached/{enc_name}"), |b| {
            b.iter(|| encode_batch(enc, &cached))
        });
    }
    g.finish();
}

/// What a WebSocket client sends, decoded: the check that a MessagePack frame is one value,
/// then the op and, for a publish, its envelope through the codec.
fn client_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_frames");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let limits = Limits::default();
    let publish = serde_json::json!({
        "op": "publish", "topic": "sensors/room-12/temp", "data": reading(12), "ref": 42,
    });
    let subscribe = serde_json::json!({
        "op": "subscribe", "topics": ["sensors/**", "alarms/*"], "since": 1200, "ref": "s1",
    });
    for (op, value) in [("publish", &publish), ("subscribe", &subscribe)] {
        for (enc_name, enc) in [("json", Encoding::Json), ("msgpack", Encoding::Msgpack)] {
            let frame = match enc {
                Encoding::Json => value.to_string().into_bytes(),
                Encoding::Msgpack => rmp_serde::to_vec_named(value).expect("msgpack"),
            };
            assert!(
                parse_client(enc, &frame, &limits).is_ok(),
                "{op}/{enc_name}"
            );
            g.throughput(Throughput::Bytes(frame.len() as u64));
            g.bench_function(format!("{op}/{enc_name}"), |b| {
                b.iter(|| parse_client(enc, black_box(&frame), &limits))
            });
        }
    }
    g.finish();
}

// ------------------------------------------------------------------------------------ log

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn open_log(dir: &std::path::Path, fsync: FsyncPolicy) -> Arc<SledLog> {
    let opts = LogOptions {
        dir: dir.join("data"),
        // The server's default page cache.
        cache_bytes: 256 << 20,
        dedupe: Default::default(),
        fsync,
        retention: RetentionPolicy::keep_everything(),
        space: Default::default(),
        checkpoint_every: std::time::Duration::from_millis(500),
        wal_segment_bytes: 32 << 20,
    };
    SledLog::open(&opts, Hub::new(64), Metrics::new()).expect("open the log")
}

fn log_append(c: &mut Criterion) {
    let rt = runtime();
    let one = json_event(12);
    // 100 events over 100 topics (as `POST /v1/events` may carry), and 100 of one topic.
    let hundred: Vec<NewEvent> = (0..100).map(json_event).collect();
    let hundred_one_topic: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent {
            topic: topic("sensors/room-12/temp"),
            ..json_event(i)
        })
        .collect();
    let mut g = c.benchmark_group("log_append");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = open_log(dir.path(), FsyncPolicy::Never);
        g.throughput(Throughput::Elements(1));
        g.bench_function("single/fsync_never", |b| {
            b.iter(|| rt.block_on(log.append(vec![one.clone()])).expect("stored"))
        });
        g.throughput(Throughput::Elements(100));
        g.bench_function("batch_100/fsync_never", |b| {
            b.iter_batched(
                || hundred.clone(),
                |events| rt.block_on(log.append(events)).expect("stored"),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("batch_100_one_topic/fsync_never", |b| {
            b.iter_batched(
                || hundred_one_topic.clone(),
                |events| rt.block_on(log.append(events)).expect("stored"),
                BatchSize::SmallInput,
            )
        });
        rt.block_on(log.close()).expect("closed");
    }
    // Every append waits for its fsync: a few hundred a second at best, so few samples.
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = open_log(dir.path(), FsyncPolicy::Always);
        g.throughput(Throughput::Elements(1));
        g.bench_function("single/fsync_always", |b| {
            b.iter(|| rt.block_on(log.append(vec![one.clone()])).expect("stored"))
        });
        g.throughput(Throughput::Elements(100));
        g.bench_function("batch_100/fsync_always", |b| {
            b.iter_batched(
                || hundred.clone(),
                |events| rt.block_on(log.append(events)).expect("stored"),
                BatchSize::SmallInput,
            )
        });
        rt.block_on(log.close()).expect("closed");
    }
    g.finish();
}

/// The topic read in `log_read`: every 50th event of the log (2,000 of 100,000); the other
/// 98,000 go round-robin to 99 other topics.
const HOT: &str = "sensors/hot/temp";

fn log_read(c: &mut Criterion) {
    const EVENTS: usize = 100_000;
    const READ: usize = 1_000;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = open_log(dir.path(), FsyncPolicy::Never);
    let started = std::time::Instant::now();
    for start in (0..EVENTS).step_by(1000) {
        let batch: Vec<NewEvent> = (start..start + 1000)
            .map(|i| {
                let mut e = json_event(i);
                if i % 50 == 0 {
                    e.topic = topic(HOT);
                } else {
                    e.topic = topic(&format!("sensors/room-{:02}/temp", i % 99));
                }
                e
            })
            .collect();
        rt.block_on(log.append(batch)).expect("stored");
    }
    let head = log.head();
    eprintln!(
        "log_read: {EVENTS} events over 100 topics stored in {:.2?} (head {head})",
        started.elapsed()
    );
    let hot = PatternSet::new(vec![pattern(HOT)]).expect("one");
    let middle = EventId(head.get() / 2);
    let mut g = c.benchmark_group("log_read");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(READ as u64));
    for (name, after) in [
        ("one_topic_1000/from_0", EventId(0)),
        ("one_topic_1000/from_middle", middle),
    ] {
        let page = rt
            .block_on(log.read(hot.clone(), after, READ))
            .expect("read");
        assert_eq!(page.events.len(), READ, "{name}");
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(log.read(hot.clone(), after, READ))
                    .expect("read")
            })
        });
    }
    g.finish();
    rt.block_on(log.close()).expect("closed");
}

criterion_group!(
    benches,
    pattern_match,
    hub_fanout,
    decode,
    gzip_stream,
    frames,
    client_frames,
    log_append,
    log_read
);
criterion_main!(benches);
