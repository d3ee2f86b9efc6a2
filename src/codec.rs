//! Publish-body decoding: every body format of the contract, with or without gzip, turned
//! into validated [`NewEvent`]s.
//!
//! Pure functions, free of I/O and async, so fuzzers and property tests call them directly.
//! A body is accepted or refused as a whole: one bad envelope refuses the batch, before any
//! id exists.

use std::io::Read;

use base64::Engine as _;
use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::envelope::{Data, NewEvent};
use crate::topic::{NameError, Topic};

/// Longest accepted event type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest accepted `msg_id`, in bytes.
pub const MAX_MSG_ID_LEN: usize = 256;

/// The publish body formats of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one envelope or an array of them.
    Json,
    /// `application/x-ndjson`: one envelope per line.
    Ndjson,
    /// `application/msgpack` and aliases: a map envelope or an array of them.
    Msgpack,
    /// `text/plain`: the body is the (string) data of one event.
    Text,
    /// `application/octet-stream`: the body is the (bytes) data of one event.
    Bytes,
}

impl BodyFormat {
    /// Picks the format from a `Content-Type` value (parameters such as `charset` ignored).
    pub fn from_content_type(value: &str) -> Result<Self, DecodeError> {
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Ok(BodyFormat::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Ok(BodyFormat::Ndjson)
            }
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Ok(BodyFormat::Msgpack)
            }
            "text/plain" => Ok(BodyFormat::Text),
            "application/octet-stream" => Ok(BodyFormat::Bytes),
            _ => Err(DecodeError::UnsupportedMediaType(value.to_string())),
        }
    }
}

/// Where the events of a body go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST /v1/topics/{topic}/events`: every event goes to this topic.
    Topic(Topic),
    /// `POST /v1/events`: each envelope names its own topic.
    PerEnvelope,
}

/// Bounds applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body after gzip inflation, in bytes.
    pub max_decompressed: usize,
    /// Most events one request may carry.
    pub max_events: usize,
    /// Longest topic, in bytes (never above the contract's 200).
    pub max_topic_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decompressed: 16 << 20,
            max_events: 10_000,
            max_topic_len: crate::topic::MAX_TOPIC_LEN,
        }
    }
}

/// Defaults for the single-event formats (`text/plain`, octet-stream), which carry no envelope.
#[derive(Debug, Clone, Default)]
pub struct BareDefaults {
    /// Event type to use (from the `type` query parameter).
    pub event_type: Option<String>,
    /// Dedupe id to use (from the `msg_id` query parameter).
    pub msg_id: Option<String>,
}

/// Why a body was refused. Each maps to one status of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// 415: a content type or encoding we do not read.
    #[error("unsupported content type {0:?}")]
    UnsupportedMediaType(String),
    /// 415: a content encoding other than gzip or identity.
    #[error("unsupported content encoding {0:?}: use gzip or none")]
    UnsupportedEncoding(String),
    /// 400: the bytes are not the format they claim to be.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// 413: more than the limit after inflation.
    #[error("body inflates beyond the {0}-byte limit")]
    InflatesTooLarge(usize),
    /// 413: more events than one request may carry.
    #[error("batch of {count} events exceeds the limit of {max}")]
    TooManyEvents {
        /// Events in the body.
        count: usize,
        /// The limit in force.
        max: usize,
    },
    /// 422: well-formed but invalid (bad topic, bad field, empty batch).
    #[error("{0}")]
    Invalid(String),
}

/// Decodes a whole publish body. `gzip` says the body is still gzip'd: it is then inflated
/// here, as a whole, under `limits.max_decompressed` (the HTTP layer inflates a body as it
/// arrives instead, with [`crate::inflate::gunzip_stream`], and passes it inflated).
pub fn decode_publish(
    target: &Target,
    format: BodyFormat,
    gzip: bool,
    body: &[u8],
    limits: &Limits,
    bare: &BareDefaults,
) -> Result<Vec<NewEvent>, DecodeError> {
    // `?type=` and `?msg_id=` only apply to bare bodies, but a bad one is refused whatever
    // the body: a client should not learn of its typo only when it switches content type.
    validate_fields(bare.event_type.as_deref(), bare.msg_id.as_deref())
        .map_err(|m| DecodeError::Invalid(format!("query: {m}")))?;
    let inflated;
    let body = if gzip {
        inflated = gunzip(body, limits.max_decompressed)?;
        &inflated[..]
    } else {
        if body.len() > limits.max_decompressed {
            return Err(DecodeError::InflatesTooLarge(limits.max_decompressed));
        }
        body
    };
    let raw = match format {
        BodyFormat::Json => decode_json(body)?,
        BodyFormat::Ndjson => decode_ndjson(body)?,
        BodyFormat::Msgpack => decode_msgpack(body)?,
        BodyFormat::Text => {
            let text = std::str::from_utf8(body)
                .map_err(|_| DecodeError::Malformed("text/plain body is not UTF-8".into()))?;
            let json =
                serde_json::to_string(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
            vec![bare_envelope(Data::Json(json.into()), bare)]
        }
        BodyFormat::Bytes => vec![bare_envelope(
            Data::Bytes(Bytes::copy_from_slice(body)),
            bare,
        )],
    };
    if raw.is_empty() {
        return Err(DecodeError::Invalid("the batch holds no event".into()));
    }
    if raw.len() > limits.max_events {
        return Err(DecodeError::TooManyEvents {
            count: raw.len(),
            max: limits.max_events,
        });
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, env)| {
            validate(env, target, limits)
                .map_err(|msg| DecodeError::Invalid(format!("event {i}: {msg}")))
        })
        .collect()
}

/// Inflates a whole gzip body, refusing (without inflating further) once it passes `limit`
/// bytes. The whole-buffer form of [`crate::inflate::gunzip_stream`]: the same bodies, the
/// same results.
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let mut decoder = flate2::read::MultiGzDecoder::new(body).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Malformed(format!("gzip: {e}")))?;
    if out.len() > limit {
        return Err(DecodeError::InflatesTooLarge(limit));
    }
    Ok(out)
}

/// An envelope as read from the wire, before validation.
#[derive(Debug)]
struct RawEnvelope {
    topic: Option<String>,
    event_type: Option<String>,
    msg_id: Option<String>,
    data: Data,
}

fn bare_envelope(data: Data, bare: &BareDefaults) -> RawEnvelope {
    RawEnvelope {
        topic: None,
        event_type: bare.event_type.clone(),
        msg_id: bare.msg_id.clone(),
        data,
    }
}

fn validate(env: RawEnvelope, target: &Target, limits: &Limits) -> Result<NewEvent, String> {
    let topic = match (target, env.topic) {
        (Target::Topic(t), None) => t.clone(),
        (Target::Topic(t), Some(named)) if named == t.as_str() => t.clone(),
        (Target::Topic(t), Some(named)) => {
            return Err(format!(
                "names topic {named:?} but is published to {:?}",
                t.as_str()
            ))
        }
        (Target::PerEnvelope, None) => return Err("`topic` is required in this batch".into()),
        (Target::PerEnvelope, Some(named)) => Topic::parse_with_limit(&named, limits.max_topic_len)
            .map_err(|e: NameError| format!("topic {named:?} {e}"))?,
    };
    validate_fields(env.event_type.as_deref(), env.msg_id.as_deref())?;
    Ok(NewEvent {
        topic,
        event_type: env.event_type.map(Into::into),
        msg_id: env.msg_id.map(Into::into),
        data: env.data,
    })
}

/// The rules for an envelope's `type` and `msg_id`, wherever they come from (a body, the
/// query, an import).
pub fn validate_fields(event_type: Option<&str>, msg_id: Option<&str>) -> Result<(), String> {
    if let Some(t) = event_type {
        if t.is_empty() || t.len() > MAX_TYPE_LEN || t.chars().any(char::is_control) {
            return Err(format!(
                "`type` must be 1 to {MAX_TYPE_LEN} bytes without control characters"
            ));
        }
        if t == "gap" {
            return Err("`type` \"gap\" is reserved for the gap signal".into());
        }
    }
    if let Some(m) = msg_id {
        if m.is_empty() || m.len() > MAX_MSG_ID_LEN {
            return Err(format!("`msg_id` must be 1 to {MAX_MSG_ID_LEN} bytes"));
        }
    }
    Ok(())
}

/// Reads `T` (an envelope struct) only from a map, refusing the sequence form serde also
/// accepts for structs (`[1, "type"]` is not an envelope).
struct MapOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for MapVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an envelope object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(MapVisitor(std::marker::PhantomData))
            .map(MapOnly)
    }
}

// ---------------------------------------------------------------- JSON and NDJSON

#[derive(Deserialize)]
struct JsonEnvelope<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    msg_id: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    encoding: Option<String>,
}

fn json_error(e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => DecodeError::Invalid(format!("invalid envelope: {e}")),
        _ => DecodeError::Malformed(format!("JSON: {e}")),
    }
}

fn from_json_envelope(env: JsonEnvelope<'_>) -> Result<RawEnvelope, DecodeError> {
    let data = match env.encoding.as_deref() {
        None => Data::Json(compact_json(env.data.get())?),
        Some("base64") => {
            let text: &str = serde_json::from_str(env.data.get()).map_err(|_| {
                DecodeError::Invalid("`data` must be a string when `encoding` is base64".into())
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| DecodeError::Invalid(format!("`data` is not valid base64: {e}")))?;
            Data::Bytes(Bytes::from(bytes))
        }
        Some(other) => {
            return Err(DecodeError::Invalid(format!(
                "unknown `encoding` {other:?}: only \"base64\""
            )))
        }
    };
    Ok(RawEnvelope {
        topic: env.topic,
        event_type: env.event_type,
        msg_id: env.msg_id,
        data,
    })
}

/// Returns the JSON text of an event's data on one line: as given when it already is,
/// re-serialised when it spans lines (an SSE `data:` line must not break). Refuses what a
/// `serde_json::Value` cannot hold, since the MessagePack envelope is rendered from one, and
/// data nested deeper than [`MAX_DATA_DEPTH`].
/// `text` must be one JSON value (a `RawValue`'s text).
pub fn compact_json(text: &str) -> Result<Box<str>, DecodeError> {
    let parsed = if may_not_fit_a_value(text) {
        // The raw parse skips escapes and numbers without decoding them: a lone surrogate
        // (`"\ud800"`) is not a character, and a number beyond f64 (`1e400`) is no number a
        // `Value` holds; either would come out of MessagePack and other decoders changed.
        // serde_json stops at 127 levels; the data may have one less.
        let v: serde_json::Value = serde_json::from_str(text).map_err(json_error)?;
        check_data_depth(&v).map_err(DecodeError::Invalid)?;
        Some(v)
    } else {
        None
    };
    if text.contains(['\n', '\r']) {
        let v = match parsed {
            Some(v) => v,
            None => serde_json::from_str::<serde_json::Value>(text).map_err(json_error)?,
        };
        Ok(v.to_string().into())
    } else {
        Ok(text.into())
    }
}

/// Whether JSON text may hold what the raw parse lets through and a `serde_json::Value`
/// cannot: a `\u` escape in a string, a number with an exponent or of 300 digits or more
/// (beyond f64 only then), or arrays and objects nested deeper than [`MAX_DATA_DEPTH`]
/// (perhaps deeper than serde_json reads; the raw parse has no depth limit). Cheap, and errs
/// towards a full parse. `text` must be valid JSON (a `RawValue`'s text): only then is what
/// lies inside strings told apart from numbers and brackets, so that an id like
/// `"3e5f"` or a bracket in a string costs no full parse.
fn may_not_fit_a_value(text: &str) -> bool {
    let mut digits = 0usize;
    let mut depth = 0usize;
    let mut prev = 0u8;
    let mut bytes = text.as_bytes().iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // A string, to its closing quote: only a `\u` escape matters inside.
                loop {
                    match bytes.next() {
                        Some(b'"') | None => break,
                        // The guard takes the escaped byte, so `\"` ends no string.
                        Some(b'\\') if bytes.next() == Some(&b'u') => return true,
                        _ => {}
                    }
                }
                digits = 0;
            }
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 300 {
                    return true;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return true;
                }
                digits = 0;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                digits = 0;
            }
            b'e' | b'E' if prev.is_ascii_digit() => return true,
            _ => digits = 0,
        }
        prev = b;
    }
    false
}

fn decode_json(body: &[u8]) -> Result<Vec<RawEnvelope>, DecodeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let envs: Vec<MapOnly<JsonEnvelope<'_>>> =
                serde_json::from_slice(body).map_err(json_error)?;
            envs.into_iter().map(|e| from_json_envelope(e.0)).collect()
        }
        Some(b'{') => {
            let env: MapOnly<JsonEnvelope<'_>> =
                serde_json::from_slice(body).map_err(json_error)?;
            Ok(vec![from_json_envelope(env.0)?])
        }
        Some(_) => {
            // Well-formed JSON that is not an envelope is invalid, anything else malformed.
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(json_error)?;
            Err(DecodeError::Invalid(
                "a JSON body is an envelope object or an array of them".into(),
            ))
        }
        None => Err(DecodeError::Malformed("empty body".into())),
    }
}

fn decode_ndjson(body: &[u8]) -> Result<Vec<RawEnvelope>, DecodeError> {
    let mut out = Vec::new();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let env: MapOnly<JsonEnvelope<'_>> =
            serde_json::from_slice(line).map_err(|e| match json_error(e) {
                DecodeError::Invalid(m) => DecodeError::Invalid(format!("line {}: {m}", n + 1)),
                DecodeError::Malformed(m) => DecodeError::Malformed(format!("line {}: {m}", n + 1)),
                other => other,
            })?;
        out.push(from_json_envelope(env.0)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- MessagePack

/// An envelope's `data` in MessagePack: `bin` stays bytes, anything else becomes JSON.
struct MsgpackData(Data);

impl<'de> Deserialize<'de> for MsgpackData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MsgpackDataVisitor)
    }
}

struct MsgpackDataVisitor;

/// Builds the JSON text of a non-`bin` value; nested `bin` is refused (JSON has no bytes), and
/// so is data nested deeper than [`MAX_DATA_DEPTH`].
fn json_data<E: de::Error>(v: serde_json::Value) -> Result<MsgpackData, E> {
    check_data_depth(&v).map_err(E::custom)?;
    Ok(MsgpackData(Data::Json(v.to_string().into())))
}

/// The deepest nesting of arrays and objects event data may have, in every publish format:
/// one level less than serde_json reads (its recursion limit, 127), so that an event's data
/// parses back alone (the MessagePack envelope is built that way) and inside its JSON envelope
/// (an export line, which `tidewire import` reads). JSON bodies (whose raw data is read without
/// that limit) and MessagePack bodies (whose reader allows 1024 levels) both refuse deeper data.
pub const MAX_DATA_DEPTH: usize = 126;

/// Refuses data nested deeper than [`MAX_DATA_DEPTH`].
pub fn check_data_depth(v: &serde_json::Value) -> Result<(), String> {
    // Depth-first with an explicit stack (no recursion on outside input), which only
    // containers enter: a scalar costs nothing.
    let mut stack: Vec<(&serde_json::Value, usize)> = Vec::new();
    let mut next = Some((v, 0usize));
    while let Some((v, depth)) = next.take().or_else(|| stack.pop()) {
        let children: &mut dyn Iterator<Item = &serde_json::Value> = match v {
            serde_json::Value::Array(a) => &mut a.iter(),
            serde_json::Value::Object(o) => &mut o.values(),
            _ => continue,
        };
        if depth == MAX_DATA_DEPTH {
            return Err(format!(
                "data nests deeper than {MAX_DATA_DEPTH} arrays and objects"
            ));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

impl<'de> Visitor<'de> for MsgpackDataVisitor {
    type Value = MsgpackData;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(MsgpackData(Data::Bytes(Bytes::copy_from_slice(v))))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(MsgpackData(Data::Bytes(Bytes::from(v))))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        json_data(v.into())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        json_data(v.into())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        json_data(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        match serde_json::Number::from_f64(v) {
            Some(n) => json_data(serde_json::Value::Number(n)),
            None => Err(E::custom("non-finite float has no JSON form")),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        json_data(v.into())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        json_data(serde_json::Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        json_data(serde_json::Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        json_data(serde_json::Value::deserialize(d)?)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        json_data(v)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        json_data(v)
    }
}

#[derive(Deserialize)]
struct MsgpackEnvelope {
    data: MsgpackData,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    msg_id: Option<String>,
    #[serde(default)]
    topic: Option<String>,
}

impl From<MsgpackEnvelope> for RawEnvelope {
    fn from(m: MsgpackEnvelope) -> Self {
        RawEnvelope {
            topic: m.topic,
            event_type: m.event_type,
            msg_id: m.msg_id,
            data: m.data.0,
        }
    }
}

/// `Ok` when `body` (an HTTP body, a WebSocket frame) is exactly one well-formed MessagePack
/// value, whatever it holds; else why it is not MessagePack: cut short, a byte the format
/// never uses (0xc1), bytes after the value. This is the line between malformed input and a
/// well-formed value of the wrong shape. Walks the markers without building anything,
/// iteratively, so nesting costs no stack; pure.
pub fn msgpack_well_formed(body: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let mut pending: u64 = 1;
    let truncated = || "not MessagePack: it ends inside a value".to_string();
    let take = |at: &mut usize, n: usize| -> Result<usize, String> {
        let start = *at;
        let end = start
            .checked_add(n)
            .filter(|e| *e <= body.len())
            .ok_or_else(truncated)?;
        *at = end;
        Ok(start)
    };
    let uint = |at: &mut usize, n: usize| -> Result<u64, String> {
        let start = take(at, n)?;
        Ok(body[start..start + n]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b)))
    };
    while pending > 0 {
        pending -= 1;
        let marker = body[take(&mut at, 1)?];
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc1 => return Err("not MessagePack: byte 0xc1 is never used".into()),
            0xc4 | 0xd9 => (uint(&mut at, 1)?, 0),
            0xc5 | 0xda => (uint(&mut at, 2)?, 0),
            0xc6 | 0xdb => (uint(&mut at, 4)?, 0),
            0xc7 => (uint(&mut at, 1)? + 1, 0),
            0xc8 => (uint(&mut at, 2)? + 1, 0),
            0xc9 => (uint(&mut at, 4)? + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, uint(&mut at, 2)?),
            0xdd => (0, uint(&mut at, 4)?),
            0xde => (0, 2 * uint(&mut at, 2)?),
            0xdf => (0, 2 * uint(&mut at, 4)?),
        };
        take(&mut at, usize::try_from(skip).map_err(|_| truncated())?)?;
        // Each child takes at least one byte: more of them than bytes left is a cut body.
        if children > (body.len() - at) as u64 {
            return Err(truncated());
        }
        pending += children;
    }
    if at < body.len() {
        return Err("trailing bytes after the MessagePack value".into());
    }
    Ok(())
}

fn msgpack_error(e: rmp_serde::decode::Error) -> DecodeError {
    use rmp_serde::decode::Error as E;
    match e {
        E::Syntax(m) => DecodeError::Invalid(format!("invalid envelope: {m}")),
        E::TypeMismatch(m) => DecodeError::Invalid(format!("invalid envelope: {m:?}")),
        other => DecodeError::Malformed(format!("MessagePack: {other}")),
    }
}

fn decode_msgpack(body: &[u8]) -> Result<Vec<RawEnvelope>, DecodeError> {
    let Some(&first) = body.first() else {
        return Err(DecodeError::Malformed("empty body".into()));
    };
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    // On failure, whether the body is MessagePack at all decides between 400 and 422.
    let refused = |e| match msgpack_well_formed(body) {
        Ok(()) => msgpack_error(e),
        Err(why) => DecodeError::Malformed(why),
    };
    let envs: Vec<RawEnvelope> = match first {
        0x90..=0x9f | 0xdc | 0xdd => Vec::<MapOnly<MsgpackEnvelope>>::deserialize(&mut de)
            .map_err(refused)?
            .into_iter()
            .map(|e| e.0.into())
            .collect(),
        0x80..=0x8f | 0xde | 0xdf => {
            vec![MapOnly::<MsgpackEnvelope>::deserialize(&mut de)
                .map_err(refused)?
                .0
                .into()]
        }
        _ => {
            msgpack_well_formed(body).map_err(DecodeError::Malformed)?;
            return Err(DecodeError::Invalid(
                "a MessagePack body is an envelope map or an array of them".into(),
            ));
        }
    };
    if (de.position() as usize) < body.len() {
        return Err(DecodeError::Malformed(
            "trailing bytes after the MessagePack value".into(),
        ));
    }
    Ok(envs)
}

#[cfg(test)]
mod msgpack_form_tests {
    //! [`msgpack_well_formed`] against rmpv's encoder: every value it writes is well formed,
    //! no strict prefix of one is.
    use super::*;
    use proptest::prelude::*;
    use rmpv::Value;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f32>().prop_map(Value::F32),
            any::<f64>().prop_map(Value::F64),
            ".{0,40}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Binary),
            (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
                .prop_map(|(t, d)| Value::Ext(t, d)),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..20).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..20).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn what_rmpv_writes_is_well_formed_and_no_prefix_of_it_is(v in value()) {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &v).unwrap();
            prop_assert_eq!(msgpack_well_formed(&bytes), Ok(()));
            for cut in 0..bytes.len() {
                prop_assert!(msgpack_well_formed(&bytes[..cut]).is_err(), "prefix {}", cut);
            }
            let mut more = bytes.clone();
            more.push(0);
            prop_assert!(msgpack_well_formed(&more).is_err());
        }
    }
}

#[cfg(test)]
mod scan_tests {
    //! The cheap scan behind [`compact_json`] may say "parse fully" too often, never too
    //! rarely: whatever it lets through must be a value `serde_json::Value` holds.
    use super::*;
    use proptest::prelude::*;

    /// JSON text built from the pieces the scan looks at: numbers with long digit runs and
    /// exponents, strings holding digits, `e`, brackets, quotes and `\u` escapes (lone
    /// surrogates too), and nesting around the depth limit.
    fn json_text() -> impl Strategy<Value = String> {
        let number = "-?[0-9]{1,4}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?|[1-9][0-9]{290,310}";
        let string = prop::collection::vec(
            prop_oneof![
                "[a-z0-9eE\\[\\]{}, .:-]{0,6}",
                Just("\\\"".to_string()),
                Just("\\\\".to_string()),
                Just("\\n".to_string()),
                "\\\\u[dD][89aAbB][0-9a-fA-F]{2}",
                "\\\\u00[0-7][0-9a-fA-F]",
            ],
            0..4,
        )
        .prop_map(|parts| format!("\"{}\"", parts.concat()));
        let leaf = prop_oneof![
            number.prop_map(|n| n.to_string()),
            string,
            Just("true".to_string()),
            Just("null".to_string()),
        ];
        let tree = leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(("[a-z3e]{1,3}", inner), 0..4).prop_map(|kv| {
                    let kv: Vec<_> = kv
                        .into_iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", kv.join(","))
                }),
            ]
        });
        // Wrapped in 0 to 130 arrays: around the depth limit of 126.
        (tree, 0usize..131)
            .prop_map(|(t, wrap)| format!("{}{t}{}", "[".repeat(wrap), "]".repeat(wrap)))
    }

    proptest! {
        #[test]
        fn what_the_scan_lets_through_parses_fully_within_the_depth_limit(text in json_text()) {
            // Only valid JSON reaches the scan (it is a RawValue's text).
            prop_assume!(serde_json::from_str::<&serde_json::value::RawValue>(&text).is_ok());
            if !may_not_fit_a_value(&text) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                prop_assert!(check_data_depth(&v).is_ok(), "{}", text);
            }
        }
    }

    #[test]
    fn strings_that_look_like_numbers_or_brackets_need_no_full_parse() {
        for text in [
            r#"{"trace":"3e5f00a9e1","pad":"[[{{"}"#,
            r#"["1e400","\n",{"a":"]]]"}]"#,
            r#"{"q":"say \"9e9\""}"#,
        ] {
            assert!(!may_not_fit_a_value(text), "{text}");
        }
        for text in [r#"{"a":1e3}"#, r#"["\ud800"]"#, r#"{"a":"x\u0041"}"#] {
            assert!(may_not_fit_a_value(text), "{text}");
        }
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_DATA_DEPTH + 1),
            "]".repeat(MAX_DATA_DEPTH + 1)
        );
        assert!(may_not_fit_a_value(&deep));
        let at_limit = format!(
            "{}{}",
            "[".repeat(MAX_DATA_DEPTH),
            "]".repeat(MAX_DATA_DEPTH)
        );
        assert!(!may_not_fit_a_value(&at_limit));
        // Many containers side by side are no deeper than one.
        assert!(!may_not_fit_a_value(&format!("[{}[]]", "[],".repeat(500))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> Target {
        Target::Topic(Topic::parse("t").unwrap())
    }

    fn decode(format: BodyFormat, body: &[u8]) -> Result<Vec<NewEvent>, DecodeError> {
        decode_publish(
            &topic(),
            format,
            false,
            body,
            &Limits::default(),
            &BareDefaults::default(),
        )
    }

    fn json_text(e: &NewEvent) -> &str {
        match &e.data {
            Data::Json(s) => s,
            Data::Bytes(_) => panic!("bytes"),
        }
    }

    #[test]
    fn json_single_and_array() {
        let one = decode(
            BodyFormat::Json,
            br#"{"data":{"t":1},"type":"r","msg_id":"m"}"#,
        )
        .unwrap();
        assert_eq!(json_text(&one[0]), r#"{"t":1}"#);
        assert_eq!(one[0].event_type.as_deref(), Some("r"));
        assert_eq!(one[0].msg_id.as_deref(), Some("m"));
        let many = decode(BodyFormat::Json, br#"[{"data":1},{"data":null}]"#).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(json_text(&many[1]), "null");
    }

    #[test]
    fn multiline_json_data_is_compacted_to_one_line() {
        let e = decode(BodyFormat::Json, b"{\"data\":{\n \"a\": [1,\n2]\n}}").unwrap();
        assert_eq!(json_text(&e[0]), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn malformed_is_400_class_and_invalid_is_422_class() {
        assert!(matches!(
            decode(BodyFormat::Json, b"{\"data\":"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(BodyFormat::Json, b"{\"nodata\":1}"),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode(BodyFormat::Json, b"[]"),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode(BodyFormat::Json, b"42"),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn in_every_format_bytes_that_are_not_the_format_are_400_and_the_format_without_an_envelope_422(
    ) {
        let malformed: [(BodyFormat, &[u8]); 9] = [
            (BodyFormat::Json, b"{\"data\":"),
            (BodyFormat::Json, b"{data: 1}"),
            (BodyFormat::Ndjson, b"{\"data\":1}\n{oops}\n"),
            // Truncated: a map of one entry whose key is cut short.
            (BodyFormat::Msgpack, b"\x81\xa4da"),
            // 0xc1 is a byte MessagePack never uses: alone, and as the value of `data`.
            (BodyFormat::Msgpack, b"\xc1"),
            (BodyFormat::Msgpack, b"\x81\xa4data\xc1"),
            (BodyFormat::Msgpack, b"\x91\x81\xa4data\xc1"),
            // A whole value, then more.
            (BodyFormat::Msgpack, b"\x81\xa4data\x01\x01"),
            (BodyFormat::Text, b"\xff\xfe"),
        ];
        for (format, body) in malformed {
            let r = decode(format, body);
            assert!(
                matches!(r, Err(DecodeError::Malformed(_))),
                "{format:?} {body:?}: {r:?}"
            );
        }
        let not_envelopes: [(BodyFormat, &[u8]); 8] = [
            (BodyFormat::Json, b"42"),
            (BodyFormat::Json, b"{\"nodata\":1}"),
            (BodyFormat::Ndjson, b"{\"data\":1}\n[1]\n"),
            (BodyFormat::Ndjson, b"\"text\"\n"),
            // Well-formed MessagePack: a number, a string, a map without `data`, an array
            // holding a number.
            (BodyFormat::Msgpack, b"\x01"),
            (BodyFormat::Msgpack, b"\xa1x"),
            (BodyFormat::Msgpack, b"\x81\xa4nope\x01"),
            (BodyFormat::Msgpack, b"\x91\x01"),
        ];
        for (format, body) in not_envelopes {
            let r = decode(format, body);
            assert!(
                matches!(r, Err(DecodeError::Invalid(_))),
                "{format:?} {body:?}: {r:?}"
            );
        }
    }

    #[test]
    fn an_envelope_written_as_an_array_is_not_an_envelope() {
        for (format, body) in [
            (BodyFormat::Json, &b"[[1,\"t\",\"m\"]]"[..]),
            (BodyFormat::Ndjson, b"[1,\"typ\"]\n"),
            (BodyFormat::Msgpack, b"\x91\x91\xc0"),
        ] {
            assert!(
                matches!(decode(format, body), Err(DecodeError::Invalid(_))),
                "{format:?} {body:?}"
            );
        }
        let batch = decode_publish(
            &Target::PerEnvelope,
            BodyFormat::Json,
            false,
            b"[[1,null,null,\"other/x\"]]",
            &Limits::default(),
            &BareDefaults::default(),
        );
        assert!(matches!(batch, Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn a_lone_surrogate_in_json_data_is_refused_and_a_pair_is_kept() {
        assert!(decode(BodyFormat::Json, br#"{"data":"\ud800x"}"#).is_err());
        let ok = decode(BodyFormat::Json, br#"{"data":"\ud83d\ude00"}"#).unwrap();
        assert_eq!(json_text(&ok[0]), r#""\ud83d\ude00""#);
    }

    #[test]
    fn data_nested_deeper_than_a_json_body_can_carry_is_refused_in_every_format() {
        // Caught by fuzz/fuzz_targets/export_parse.rs (JSON data is a value serde_json reads
        // back): MessagePack data 129 arrays deep was stored as JSON text that serde_json
        // refuses to parse, so the event's MessagePack envelope would have lost it. JSON
        // bodies had the same hole: the raw data is read without a depth limit.
        let nested = |depth: usize| format!("{}0{}", "[".repeat(depth), "]".repeat(depth));
        let msgpack = |depth: usize| {
            let v: serde_json::Value = serde_json::from_str(&nested(depth.min(100))).unwrap();
            let mut v = v;
            for _ in 100..depth {
                v = serde_json::Value::Array(vec![v]);
            }
            let mut out = Vec::new();
            rmp_serde::encode::write_named(&mut out, &serde_json::json!({ "data": v })).unwrap();
            out
        };
        // The deepest data a JSON body carries is the deepest accepted, in both formats.
        let json_ok = format!(r#"{{"data":{}}}"#, nested(MAX_DATA_DEPTH));
        let e = decode(BodyFormat::Json, json_ok.as_bytes()).expect("deepest JSON data");
        assert_eq!(json_text(&e[0]), nested(MAX_DATA_DEPTH));
        // 422 when serde_json reads it, 400 beyond its limit.
        for depth in [MAX_DATA_DEPTH + 1, 500] {
            let deep = format!(r#"{{"data":{}}}"#, nested(depth));
            assert!(
                matches!(
                    decode(BodyFormat::Json, deep.as_bytes()),
                    Err(DecodeError::Invalid(_) | DecodeError::Malformed(_))
                ),
                "JSON data {depth} deep"
            );
        }
        // Many brackets that are not nested deep, or that are text, are no reason to refuse.
        let wide = format!(
            r#"{{"data":[{}"{}"]}}"#,
            "[0],".repeat(300),
            "[".repeat(300)
        );
        decode(BodyFormat::Json, wide.as_bytes()).expect("wide JSON data");
        let e = decode(BodyFormat::Msgpack, &msgpack(MAX_DATA_DEPTH))
            .expect("deepest MessagePack data");
        assert_eq!(json_text(&e[0]), nested(MAX_DATA_DEPTH));
        // Refused like MessagePack's other values with no JSON form (a non-finite float).
        for depth in [MAX_DATA_DEPTH + 1, 129, 500] {
            assert!(
                matches!(
                    decode(BodyFormat::Msgpack, &msgpack(depth)),
                    Err(DecodeError::Invalid(m)) if m.contains("nests deeper")
                ),
                "MessagePack data {depth} deep"
            );
        }
        // What is accepted parses back alone (as the MessagePack envelope is built) and inside
        // its JSON envelope (as an export line is imported).
        serde_json::from_str::<serde_json::Value>(&nested(MAX_DATA_DEPTH)).unwrap();
        let envelope = format!(r#"{{"id":1,"data":{}}}"#, nested(MAX_DATA_DEPTH));
        serde_json::from_str::<serde_json::Value>(&envelope).unwrap();
    }

    #[test]
    fn json_data_no_json_value_can_hold_is_refused() {
        // Caught by the property of fuzz/fuzz_targets/publish_decode.rs (JSON data is a value
        // `serde_json::Value` holds): the raw parse let `1e400` through, and the MessagePack
        // envelope then carried `null` for it.
        let digits = "9".repeat(400);
        for body in [
            r#"{"data":1e400}"#.to_string(),
            r#"{"data":[1,{"a":-1E999}]}"#.to_string(),
            format!(r#"{{"data":{digits}}}"#),
            format!(r#"{{"data":{digits}.5}}"#),
        ] {
            assert!(
                matches!(
                    decode(BodyFormat::Json, body.as_bytes()),
                    Err(DecodeError::Malformed(_))
                ),
                "{body}"
            );
        }
        // Within f64, and strings that only look like numbers, are kept as they are.
        for (body, data) in [
            (r#"{"data":1e308}"#, "1e308"),
            (r#"{"data":[-2.5E-3,"1e400"]}"#, r#"[-2.5E-3,"1e400"]"#),
            (r#"{"data":1.5e-400}"#, "1.5e-400"),
        ] {
            let e = decode(BodyFormat::Json, body.as_bytes()).expect(body);
            assert_eq!(json_text(&e[0]), data);
        }
        assert_eq!(
            compact_json(&"7".repeat(299)).as_deref(),
            Ok(&*"7".repeat(299))
        );
    }

    #[test]
    fn a_bad_query_type_or_msg_id_is_refused_whatever_the_body() {
        for bare in [
            BareDefaults {
                event_type: Some("gap".into()),
                ..BareDefaults::default()
            },
            BareDefaults {
                msg_id: Some(String::new()),
                ..BareDefaults::default()
            },
        ] {
            let r = decode_publish(
                &topic(),
                BodyFormat::Json,
                false,
                br#"{"data":1}"#,
                &Limits::default(),
                &bare,
            );
            assert!(matches!(r, Err(DecodeError::Invalid(_))), "{r:?}");
        }
    }

    #[test]
    fn ndjson_one_envelope_per_line() {
        let e = decode(BodyFormat::Ndjson, b"{\"data\":1}\n\n{\"data\":2}\r\n").unwrap();
        assert_eq!(e.len(), 2);
        assert!(matches!(
            decode(BodyFormat::Ndjson, b"{\"data\":1}\n{oops}\n"),
            Err(DecodeError::Malformed(m)) if m.starts_with("line 2")
        ));
    }

    #[test]
    fn msgpack_bin_stays_bytes_and_maps_become_json() {
        #[derive(serde::Serialize)]
        struct Env<'a> {
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
        }
        let body = rmp_serde::to_vec_named(&vec![Env { data: b"\x01\x02" }]).unwrap();
        let e = decode(BodyFormat::Msgpack, &body).unwrap();
        assert_eq!(e[0].data, Data::Bytes(Bytes::from_static(b"\x01\x02")));

        let map =
            rmp_serde::to_vec_named(&serde_json::json!({"data": {"t": 1.5, "ok": true}})).unwrap();
        let e = decode(BodyFormat::Msgpack, &map).unwrap();
        assert_eq!(json_text(&e[0]), r#"{"ok":true,"t":1.5}"#);
    }

    #[test]
    fn gzip_bomb_is_refused_without_inflating_it_all() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 64 << 20]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let r = decode_publish(
            &topic(),
            BodyFormat::Json,
            true,
            &bomb,
            &Limits::default(),
            &BareDefaults::default(),
        );
        assert_eq!(r, Err(DecodeError::InflatesTooLarge(16 << 20)));
    }

    #[test]
    fn reserved_and_bad_fields_are_invalid() {
        for body in [
            &br#"{"data":1,"type":"gap"}"#[..],
            br#"{"data":1,"type":"a\nb"}"#,
            br#"{"data":1,"msg_id":""}"#,
            br#"{"data":1,"topic":"other"}"#,
            br#"{"data":1,"encoding":"hex"}"#,
            br#"{"data":"!!","encoding":"base64"}"#,
        ] {
            assert!(
                matches!(decode(BodyFormat::Json, body), Err(DecodeError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn per_envelope_target_requires_valid_topics() {
        let d = |b: &[u8]| {
            decode_publish(
                &Target::PerEnvelope,
                BodyFormat::Json,
                false,
                b,
                &Limits::default(),
                &BareDefaults::default(),
            )
        };
        assert_eq!(
            d(br#"[{"topic":"a/b","data":1}]"#).unwrap()[0]
                .topic
                .as_str(),
            "a/b"
        );
        assert!(matches!(
            d(br#"[{"data":1}]"#),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            d(br#"[{"topic":"a//b","data":1}]"#),
            Err(DecodeError::Invalid(_))
        ));
    }
}
