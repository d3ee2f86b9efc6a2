//! Export and import: the log as NDJSON (one JSON envelope per line) or as a stream of
//! MessagePack envelope maps, each with its `msg_id` when it had one, in id order. Used by
//! `tidewire export` / `tidewire import` for backups, moves and restores.
//!
//! Guarantees:
//! - an NDJSON line is the event's JSON envelope (the one every transport sends) plus
//!   `"msg_id"`: JSON data keeps its exact text and bytes stay base64;
//! - a MessagePack record is the event's MessagePack envelope (bytes stay `bin`) plus
//!   `"msg_id"`;
//! - in either format export → import → export is byte-identical;
//! - an export is a consistent snapshot: it ends at the head the log had when it started,
//!   whatever is published meanwhile;
//! - [`parse_line`] is a pure function, total on any input (an error, never a panic).

use std::io::Write;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::codec;
use crate::envelope::{Data, Event, EventId, NewEvent};
use crate::log::{EventLog, ImportEvent, LogError};
use crate::topic::{PatternSet, Topic};

/// Events read from the log per step of an export.
const EXPORT_PAGE: usize = 10_000;

/// Appends the export line of `event` (with its newline) to `out`.
pub fn export_line(event: &Event, out: &mut Vec<u8>) {
    let json = event.json();
    match &event.body.msg_id {
        Some(m) => {
            // The envelope always ends with `}`: the msg_id goes in just before it.
            out.extend_from_slice(&json[..json.len() - 1]);
            out.extend_from_slice(b",\"msg_id\":");
            // serde_json cannot fail to serialise a str into a Vec.
            let _ = serde_json::to_writer(&mut *out, m.as_ref());
            out.push(b'}');
        }
        None => out.extend_from_slice(json),
    }
    out.push(b'\n');
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    id: u64,
    #[serde(borrow)]
    topic: &'a str,
    #[serde(rename = "type")]
    event_type: Option<String>,
    time: u64,
    #[serde(borrow)]
    data: &'a RawValue,
    encoding: Option<&'a str>,
    msg_id: Option<String>,
}

/// The two export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One JSON envelope per line.
    #[default]
    Ndjson,
    /// MessagePack envelope maps, one after the other.
    Msgpack,
}

/// Appends the MessagePack export record of `event` to `out`.
pub fn export_msgpack(event: &Event, out: &mut Vec<u8>) {
    let env = event.msgpack();
    match (&event.body.msg_id, env.first()) {
        // An envelope has at most six keys: a fixmap, whose header holds its length.
        (Some(m), Some(&header @ 0x80..=0x8e)) => {
            out.push(header + 1);
            out.extend_from_slice(&env[1..]);
            // Writing into a Vec cannot fail.
            let _ = rmp::encode::write_str(out, "msg_id");
            let _ = rmp::encode::write_str(out, m);
        }
        _ => out.extend_from_slice(env),
    }
}

/// Reads the next MessagePack export record from `input`; `None` at the end of the input.
pub fn read_msgpack(input: &mut impl std::io::Read) -> Result<Option<ImportEvent>, String> {
    use rmpv::Value;
    let value = match rmpv::decode::read_value(input) {
        Ok(v) => v,
        Err(rmpv::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("not a MessagePack record: {e}")),
    };
    let Value::Map(entries) = value else {
        return Err("a record is a map".into());
    };
    let (mut id, mut topic, mut event_type, mut time, mut data, mut msg_id) =
        (None, None, None, None, None, None);
    for (k, v) in entries {
        let key = k.as_str().ok_or("a record's keys are strings")?.to_string();
        let text = || v.as_str().map(str::to_string);
        match key.as_str() {
            "id" => id = v.as_u64(),
            "topic" => topic = text(),
            "type" => event_type = Some(text().ok_or("`type` is a string")?),
            "time" => time = v.as_u64(),
            "msg_id" => msg_id = Some(text().ok_or("`msg_id` is a string")?),
            "data" => data = Some(v),
            other => return Err(format!("unknown key {other:?}")),
        }
    }
    // What a publish could not have stored, an import does not store either.
    codec::validate_fields(event_type.as_deref(), msg_id.as_deref())?;
    let (Some(id), Some(topic), Some(time), Some(data)) = (id, topic, time, data) else {
        return Err("a record needs id, topic, time and data".into());
    };
    let data = match data {
        Value::Binary(b) => Data::Bytes(b.into()),
        other => {
            let json: serde_json::Value =
                rmpv::ext::from_value(other).map_err(|e| format!("data: {e}"))?;
            codec::check_data_depth(&json)?;
            Data::Json(json.to_string().into())
        }
    };
    if id == 0 {
        return Err("id 0 is never assigned".into());
    }
    Ok(Some(ImportEvent {
        id,
        time,
        event: NewEvent {
            topic: Topic::parse(&topic).map_err(|e| format!("topic {topic:?}: {e}"))?,
            event_type: event_type.map(Into::into),
            msg_id: msg_id.map(Into::into),
            data,
        },
    }))
}

/// Parses one export line back into an event with its id and time.
pub fn parse_line(line: &[u8]) -> Result<ImportEvent, String> {
    let l: Line<'_> =
        serde_json::from_slice(line).map_err(|e| format!("not an export line: {e}"))?;
    let topic = Topic::parse(l.topic).map_err(|e| format!("topic {:?}: {e}", l.topic))?;
    // What a publish could not have stored, an import does not store either: a `type` that
    // would break an SSE frame, data on several lines or that no JSON value holds.
    codec::validate_fields(l.event_type.as_deref(), l.msg_id.as_deref())?;
    let data = match l.encoding {
        None => Data::Json(codec::compact_json(l.data.get()).map_err(|e| format!("data: {e}"))?),
        Some("base64") => {
            let text: String = serde_json::from_str(l.data.get())
                .map_err(|_| "base64 data must be a string".to_string())?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("data is not valid base64: {e}"))?;
            Data::Bytes(bytes.into())
        }
        Some(other) => return Err(format!("unknown encoding {other:?}")),
    };
    if l.id == 0 {
        return Err("id 0 is never assigned".into());
    }
    Ok(ImportEvent {
        id: l.id,
        time: l.time,
        event: NewEvent {
            topic,
            event_type: l.event_type.map(Into::into),
            msg_id: l.msg_id.map(Into::into),
            data,
        },
    })
}

/// Writes every retained event matching `patterns` with an id above `since`, up to the head
/// the log has now, to `out` as export lines. Returns how many it wrote.
pub async fn export(
    log: &dyn EventLog,
    patterns: PatternSet,
    since: EventId,
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<u64, ExportError> {
    let snapshot = log.head();
    let mut cursor = since;
    let mut written = 0;
    let mut buf = Vec::with_capacity(1 << 20);
    while cursor < snapshot {
        let page = log.read(patterns.clone(), cursor, EXPORT_PAGE).await?;
        for e in page.events.iter().take_while(|e| e.id <= snapshot) {
            match format {
                Format::Ndjson => export_line(e, &mut buf),
                Format::Msgpack => export_msgpack(e, &mut buf),
            }
            written += 1;
        }
        out.write_all(&buf)?;
        buf.clear();
        if page.through <= cursor {
            break;
        }
        cursor = page.through;
        if page.complete {
            break;
        }
    }
    out.flush()?;
    Ok(written)
}

/// Why an export or import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Writing the export or reading the import failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A line (NDJSON) or record (MessagePack) of the import is not one of an export.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line or record number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event(id: u64, msg_id: Option<&str>, data: Data) -> Event {
        Event::new(
            EventId(id),
            1_763_800_000_000 + id,
            NewEvent {
                topic: Topic::parse("a/b").unwrap(),
                event_type: id.is_multiple_of(2).then(|| "reading".into()),
                msg_id: msg_id.map(Into::into),
                data,
            },
        )
    }

    #[test]
    fn an_export_line_parses_back_to_the_same_event_and_line() {
        for e in [
            event(1, None, Data::Json(r#"{"t": 21.5, "u":"°C"}"#.into())),
            event(2, Some("m-\"1\""), Data::Json("[1,2]".into())),
            event(3, Some("m"), Data::Bytes(Bytes::from_static(b"\x00\xff"))),
        ] {
            let mut line = Vec::new();
            export_line(&e, &mut line);
            let back = parse_line(line.strip_suffix(b"\n").unwrap()).unwrap();
            assert_eq!((back.id, back.time), (e.id.0, e.time));
            assert_eq!(back.event, e.body);
            let mut again = Vec::new();
            export_line(
                &Event::new(EventId(back.id), back.time, back.event),
                &mut again,
            );
            assert_eq!(again, line);
        }
    }

    #[test]
    fn a_msgpack_record_reads_back_to_the_same_event_and_record() {
        for e in [
            event(
                1,
                None,
                Data::Json(r#"{"t": 21.5, "u":"°C", "n":[1,-2,3.25e10]}"#.into()),
            ),
            event(2, Some("m-1"), Data::Json("null".into())),
            event(3, Some("m"), Data::Bytes(Bytes::from_static(b"\x00\xff"))),
        ] {
            let mut rec = Vec::new();
            export_msgpack(&e, &mut rec);
            let mut input = &rec[..];
            let back = read_msgpack(&mut input).unwrap().unwrap();
            assert!(read_msgpack(&mut input).unwrap().is_none(), "one record");
            assert_eq!((back.id, back.time), (e.id.0, e.time));
            assert_eq!(back.event.msg_id, e.body.msg_id);
            let mut again = Vec::new();
            export_msgpack(
                &Event::new(EventId(back.id), back.time, back.event),
                &mut again,
            );
            assert_eq!(again, rec);
        }
    }

    #[test]
    fn an_import_is_refused_what_a_publish_would_be() {
        // Caught by the property of fuzz/fuzz_targets/export_parse.rs (an imported event is
        // one the server could have stored): a `type` with a line break split the SSE frame
        // (`event: a` then `b`), `gap` passed for the gap signal, and data no JSON value
        // holds went out as MessagePack `null`.
        for bad in [
            &br#"{"id":1,"topic":"a","time":1,"data":1,"type":"a\nb"}"#[..],
            br#"{"id":1,"topic":"a","time":1,"data":1,"type":"gap"}"#,
            br#"{"id":1,"topic":"a","time":1,"data":1,"type":""}"#,
            br#"{"id":1,"topic":"a","time":1,"data":1,"msg_id":""}"#,
            br#"{"id":1,"topic":"a","time":1,"data":"\ud800"}"#,
            br#"{"id":1,"topic":"a","time":1,"data":1e400}"#,
        ] {
            assert!(
                parse_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A CR in the data broke its SSE `data:` line: it is kept on one line, as a publish
        // keeps it.
        let e = parse_line(b"{\"id\":1,\"topic\":\"a\",\"time\":1,\"data\":{\"a\":1,\r\"b\":2}}")
            .expect("a line with a CR inside its data");
        assert_eq!(e.event.data, Data::Json(r#"{"a":1,"b":2}"#.into()));
        // MessagePack records: {"id":1,"topic":"a","time":1,"data":1,"type":…}.
        let head = b"\x85\xa2id\x01\xa5topic\xa1a\xa4time\x01\xa4data\x01\xa4type";
        for bad_type in [&b"\xa3a\nb"[..], b"\xa3gap", b"\xa0"] {
            let rec = [&head[..], bad_type].concat();
            assert!(read_msgpack(&mut &rec[..]).is_err(), "{bad_type:?}");
        }
        let ok = [&head[..], b"\xa1t"].concat();
        assert!(read_msgpack(&mut &ok[..])
            .expect("a typed record")
            .is_some());
    }

    #[test]
    fn an_import_of_data_nested_deeper_than_a_publish_takes_is_refused() {
        // Found by fuzz/fuzz_targets/export_parse.rs: a MessagePack record whose data was 129
        // arrays deep was imported as JSON text that serde_json cannot parse back, so the
        // event's MessagePack envelope would have carried nothing.
        let depth = codec::MAX_DATA_DEPTH;
        // {"id":1,"topic":"a","time":1,"data":[[…0…]]}: fixarray of one element, nested.
        let record = |depth: usize| {
            let mut rec = b"\x84\xa2id\x01\xa5topic\xa1a\xa4time\x01\xa4data".to_vec();
            rec.extend(std::iter::repeat_n(0x91u8, depth));
            rec.push(0);
            rec
        };
        let ok = read_msgpack(&mut &record(depth)[..]).expect("the deepest data a publish takes");
        let nested = format!("{}0{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(
            ok.map(|e| e.event.data),
            Some(Data::Json(nested.clone().into()))
        );
        assert!(read_msgpack(&mut &record(depth + 1)[..]).is_err());
        assert!(read_msgpack(&mut &record(129)[..]).is_err());
        // The same for an NDJSON line.
        let line = |d: &str| format!(r#"{{"id":1,"topic":"a","time":1,"data":{d}}}"#);
        parse_line(line(&nested).as_bytes()).expect("the deepest data a publish takes");
        let deeper = format!("[{nested}]");
        assert!(parse_line(line(&deeper).as_bytes()).is_err());
    }

    #[test]
    fn a_msgpack_float_survives_export_import_export_exactly() {
        // Found by fuzz/fuzz_targets/export_parse.rs: without serde_json's `float_roundtrip`
        // feature, some floats parse one ulp off, so the JSON text of MessagePack data
        // (`to_string` of the f64) read back as another f64, and the second export differed.
        // Test builds always have the feature (jsonschema, a dev-dependency, enables it); the
        // shipped build has it only through Cargo.toml, and the fuzz build checks that one.
        let x = f64::from_bits(0xdcdc_dcdc_dcdc_dcdc);
        let e = event(
            1,
            None,
            Data::Json(serde_json::json!({ "t": x }).to_string().into()),
        );
        let mut rec = Vec::new();
        export_msgpack(&e, &mut rec);
        let back = read_msgpack(&mut &rec[..]).unwrap().unwrap();
        assert_eq!(back.event, e.body);
        let mut again = Vec::new();
        export_msgpack(
            &Event::new(EventId(back.id), back.time, back.event),
            &mut again,
        );
        assert_eq!(again, rec);
    }

    #[test]
    fn garbage_msgpack_is_an_error_not_a_panic() {
        for bad in [
            &b"\xc1"[..],
            b"\x91\x01",
            b"\x81\xa2id\x00",
            b"\x81\xa1x\x01",
            b"\xa3abc",
        ] {
            let mut input = bad;
            assert!(read_msgpack(&mut input).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_lines_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"{}",
            b"[1]",
            b"{\"id\":0,\"topic\":\"a\",\"time\":1,\"data\":1}",
            b"{\"id\":1,\"topic\":\"a//b\",\"time\":1,\"data\":1}",
            b"{\"id\":1,\"topic\":\"a\",\"time\":1,\"data\":1,\"encoding\":\"base64\"}",
            b"{\"id\":1,\"topic\":\"a\",\"time\":1,\"data\":\"!!\",\"encoding\":\"base64\"}",
            b"{\"id\":1,\"topic\":\"a\",\"time\":1,\"data\":1,\"extra\":1}",
            b"\xff\xfe",
        ] {
            assert!(
                parse_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
