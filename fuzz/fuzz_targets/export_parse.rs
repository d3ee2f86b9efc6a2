//! The import side of `tidewire export`/`import` (src/export.rs): `export::parse_line` for
//! NDJSON lines and `export::read_msgpack` for the stream of MessagePack records.
//!
//! Input: the first byte picks the format (bit 0). NDJSON: the rest is split into lines as
//! the importer splits a file, each parsed. MessagePack: records are read from the rest until
//! its end or the first error.
//!
//! Properties of every accepted line or record:
//! - it is an event the server could have stored: id above 0, a valid topic, and
//!   `common::check_event` (the publish rules for `type` and `msg_id`, one-line JSON data
//!   that a `serde_json::Value` holds, and well-formed JSON/SSE/MessagePack renderings);
//! - export → parse → export is a fixpoint: `export_line(parse_line(x))` parses back to the
//!   same event and exports to the same line again (the module promises export → import →
//!   export is byte-identical), and the same for `export_msgpack`/`read_msgpack`;
//! - the other format carries it too: its NDJSON line of a MessagePack record parses back to
//!   the same event, and the reverse with JSON data compared as values.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tidewire::envelope::{Event, EventId};
use tidewire::export::{export_line, export_msgpack, parse_line, read_msgpack};
use tidewire::log::ImportEvent;
use tidewire::topic::MAX_TOPIC_LEN;

fn event_of(i: &ImportEvent) -> Event {
    Event::new(EventId(i.id), i.time, i.event.clone())
}

fn same(a: &ImportEvent, b: &ImportEvent) -> bool {
    a.id == b.id && a.time == b.time && a.event == b.event
}

fn same_by_value(a: &ImportEvent, b: &ImportEvent) -> bool {
    a.id == b.id && a.time == b.time && common::normalised(&a.event) == common::normalised(&b.event)
}

fn check_storable(i: &ImportEvent) {
    assert!(i.id > 0, "id 0 is never assigned");
    common::check_event(&i.event, MAX_TOPIC_LEN);
}

fn line_of(i: &ImportEvent) -> Vec<u8> {
    let mut out = Vec::new();
    export_line(&event_of(i), &mut out);
    assert_eq!(out.last(), Some(&b'\n'));
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n' || b == b'\r').count(),
        1,
        "an export line is one line: {:?}",
        String::from_utf8_lossy(&out)
    );
    out.pop();
    out
}

fn record_of(i: &ImportEvent) -> Vec<u8> {
    let mut out = Vec::new();
    export_msgpack(&event_of(i), &mut out);
    out
}

fn check_line(line: &[u8]) {
    let Ok(first) = parse_line(line) else {
        return;
    };
    check_storable(&first);
    let exported = line_of(&first);
    let second = parse_line(&exported).unwrap_or_else(|e| {
        panic!(
            "export line {:?} does not parse: {e}",
            String::from_utf8_lossy(&exported)
        )
    });
    assert!(
        same(&first, &second),
        "{:?}",
        String::from_utf8_lossy(&exported)
    );
    assert_eq!(line_of(&second), exported, "export → import → export");
    // Through MessagePack and back.
    let rec = record_of(&first);
    let back = read_msgpack(&mut &rec[..])
        .expect("our record reads")
        .expect("one record");
    assert!(same_by_value(&first, &back), "through MessagePack");
}

fn check_records(mut input: &[u8]) {
    for _ in 0..64 {
        let before = input.len();
        let first = match read_msgpack(&mut input) {
            Ok(Some(r)) => r,
            Ok(None) => {
                assert!(input.is_empty(), "None before the end");
                return;
            }
            Err(_) => return,
        };
        assert!(input.len() < before, "a record consumes input");
        check_storable(&first);
        let rec = record_of(&first);
        let mut cursor = &rec[..];
        let second = read_msgpack(&mut cursor)
            .expect("our record reads")
            .expect("a record");
        assert!(cursor.is_empty(), "one record, nothing after it");
        assert!(same(&first, &second));
        assert_eq!(record_of(&second), rec, "export → import → export");
        // Through NDJSON and back.
        let line = line_of(&first);
        let back = parse_line(&line).unwrap_or_else(|e| {
            panic!(
                "export line {:?} does not parse: {e}",
                String::from_utf8_lossy(&line)
            )
        });
        assert!(same(&first, &back), "through NDJSON");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // As the importer reads a file: one line at a time, blank lines skipped.
        for line in rest.split(|&b| b == b'\n').take(64) {
            if !line.iter().all(u8::is_ascii_whitespace) {
                check_line(line);
            }
        }
    } else {
        check_records(rest);
    }
});
