//! `schemas/` against the real thing: every JSON Schema is a valid draft 2020-12 schema, the
//! OpenAPI document lists exactly the routes the router serves, the sample config validates, and
//! responses, SSE events, long-poll bodies, WebSocket frames and JWT claims captured from a
//! running server (loopback port, real sled in a temp dir) validate against their schemas.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use common::{get_json, next_event, post, publish_one, retain_after, sse, TestServer, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A base for the schemas' relative `$id`s. Nothing is fetched from it: `jsonschema` is built
/// without its network and file retrievers, and every file is registered below.
const BASE: &str = "https://tidewire.invalid/schemas/";

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

/// Every `*.schema.json` file: name and parsed contents.
fn schema_files() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(schemas_dir()).expect("schemas/") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".schema.json") {
            let text = std::fs::read_to_string(&path).expect("read schema");
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            out.insert(name, v);
        }
    }
    assert!(out.len() >= 10, "schemas/ holds too few schemas: {out:?}");
    out
}

fn openapi() -> Value {
    let text = std::fs::read_to_string(schemas_dir().join("openapi.yaml")).expect("openapi.yaml");
    serde_norway::from_str(&text).expect("openapi.yaml is YAML")
}

/// All schemas, registered under their `$id` resolved against [`BASE`].
struct Schemas {
    registry: jsonschema::Registry<'static>,
}

impl Schemas {
    fn load() -> Schemas {
        let resources: Vec<(String, Value)> = schema_files()
            .into_iter()
            .map(|(name, v)| (format!("{BASE}{name}"), v))
            .collect();
        let registry = jsonschema::Registry::new()
            .extend(resources)
            .expect("schema URIs")
            .prepare()
            .expect("every schema registers and every `$ref` resolves");
        Schemas { registry }
    }

    /// The validator of `target`: a file name, optionally with a `#/…` fragment.
    fn validator(&self, target: &str) -> jsonschema::Validator {
        let wrapper = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": format!("{BASE}{target}"),
        });
        jsonschema::options()
            .with_registry(&self.registry)
            .build(&wrapper)
            .unwrap_or_else(|e| panic!("{target}: {e}"))
    }

    /// Asserts that `instance` is valid against `target`, listing every violation otherwise.
    #[track_caller]
    fn check(&self, target: &str, instance: &Value) {
        let v = self.validator(target);
        let errors: Vec<String> = v
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "not valid against {target}:\n  {}\ninstance: {instance}",
            errors.join("\n  ")
        );
    }

    #[track_caller]
    fn refuses(&self, target: &str, instance: &Value) {
        assert!(
            !self.validator(target).is_valid(instance),
            "{target} should refuse {instance}"
        );
    }
}

/// A MessagePack value as JSON, for validation: `bin` becomes an array of byte values (the
/// envelope's `data` may be any value), map keys must be strings.
fn msgpack_to_json(v: &rmpv::Value) -> Value {
    use rmpv::Value as M;
    match v {
        M::Nil => Value::Null,
        M::Boolean(b) => json!(b),
        M::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => json!(u),
            (None, Some(s)) => json!(s),
            _ => panic!("integer out of range: {i}"),
        },
        M::F32(f) => json!(f),
        M::F64(f) => json!(f),
        M::String(s) => json!(s.as_str().expect("UTF-8 string")),
        M::Binary(b) => json!(b),
        M::Array(items) => Value::Array(items.iter().map(msgpack_to_json).collect()),
        M::Map(pairs) => Value::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let k = k.as_str().expect("string map key").to_string();
                    (k, msgpack_to_json(v))
                })
                .collect(),
        ),
        M::Ext(..) => panic!("unexpected MessagePack ext value"),
    }
}

fn decode_msgpack(bytes: &[u8]) -> Value {
    let mut cursor = bytes;
    let v = rmpv::decode::read_value(&mut cursor).expect("MessagePack");
    assert!(
        cursor.is_empty(),
        "trailing bytes after the MessagePack value"
    );
    msgpack_to_json(&v)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

// -------------------------------------------------------------------------------------------
// The documents themselves
// -------------------------------------------------------------------------------------------

#[test]
fn every_schema_is_a_valid_draft_2020_12_schema_whose_id_is_its_file_name() {
    for (name, schema) in schema_files() {
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        assert_eq!(schema["$id"], name.as_str(), "{name}: `$id` names the file");
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!("{name} is not a valid 2020-12 schema: {e}");
        }
        assert!(schema.get("title").is_some(), "{name} has a title");
    }
    // Every reference resolves (offline): the registry resolves them all when it is built.
    let schemas = Schemas::load();
    for name in schema_files().keys() {
        schemas.validator(name);
    }
}

#[test]
fn every_example_in_a_schema_is_valid_against_it() {
    let schemas = Schemas::load();
    let mut seen = 0;
    for (name, schema) in schema_files() {
        for example in schema["examples"].as_array().into_iter().flatten() {
            schemas.check(&name, example);
            seen += 1;
        }
        for (def, sub) in schema["$defs"].as_object().into_iter().flatten() {
            for example in sub["examples"].as_array().into_iter().flatten() {
                schemas.check(&format!("{name}#/$defs/{def}"), example);
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "only {seen} examples");
}

#[test]
fn topic_and_pattern_schemas_follow_the_contract() {
    let s = Schemas::load();
    let topic = "defs.schema.json#/$defs/topic";
    let pattern = "defs.schema.json#/$defs/pattern";
    let longest = "a".repeat(200);
    let too_long = "a".repeat(201);
    for ok in [
        "a",
        "sensors/room-12/temperature",
        "A.b_c~d-e/0",
        longest.as_str(),
    ] {
        s.check(topic, &json!(ok));
        s.check(pattern, &json!(ok));
    }
    for bad in ["", "a//b", "/a", "a/", "a b", "a/*", "é", too_long.as_str()] {
        s.refuses(topic, &json!(bad));
    }
    for ok in ["*", "**", "a/*", "a/**", "*/b/*", "sensors/*/temperature"] {
        s.check(pattern, &json!(ok));
        s.refuses(topic, &json!(ok));
    }
    for bad in ["a/**/b", "***", "a*", "a/**/**", "a//*", "", "*/"] {
        s.refuses(pattern, &json!(bad));
    }
    // The same rules as the server's parser.
    for t in ["a", "a/b.c", "a//b", "a/*", "a b", "x/**", "**/x"] {
        assert_eq!(
            s.validator(topic).is_valid(&json!(t)),
            tidewire::topic::Topic::parse(t).is_ok(),
            "topic {t:?}"
        );
        assert_eq!(
            s.validator(pattern).is_valid(&json!(t)),
            tidewire::topic::Pattern::parse(t).is_ok(),
            "pattern {t:?}"
        );
    }
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push(r.to_string());
                    }
                }
                collect_refs(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// `"/a/b"` JSON pointer lookup with `~0`/`~1` unescaping.
fn pointer<'a>(doc: &'a Value, fragment: &str) -> Option<&'a Value> {
    if fragment.is_empty() {
        return Some(doc);
    }
    doc.pointer(fragment)
}

#[test]
fn openapi_documents_exactly_the_routes_the_router_serves() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch", "head", "trace"] {
            if item.get(method).is_some() {
                documented.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
        // The server answers a CORS preflight on every path.
        assert!(
            item.get("options").is_some(),
            "{path} documents its preflight"
        );
    }
    let served: BTreeSet<(String, String)> = tidewire::http::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml, not served: {unserved:?}"
    );
}

#[test]
fn every_reference_in_openapi_resolves_and_every_schema_file_is_linked_from_it() {
    let doc = openapi();
    let files = schema_files();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    let mut linked = BTreeSet::new();
    for r in &refs {
        let (file, fragment) = r.split_once('#').unwrap_or((r.as_str(), ""));
        let target = if file.is_empty() {
            &doc
        } else {
            let name = file.trim_start_matches("./");
            linked.insert(name.to_string());
            files
                .get(name)
                .unwrap_or_else(|| panic!("{r}: no schemas/{name}"))
        };
        assert!(pointer(target, fragment).is_some(), "{r} does not resolve");
    }
    let unlinked: Vec<_> = files.keys().filter(|f| !linked.contains(*f)).collect();
    assert!(
        unlinked.is_empty(),
        "not referenced from openapi.yaml: {unlinked:?}"
    );
    let mut ids = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
            }
        }
    }
}

/// Asserts that openapi.yaml documents `status` for `method path`.
#[track_caller]
fn documented(doc: &Value, method: &str, path: &str, status: u16) {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(op.is_object(), "openapi.yaml has no {method} {path}");
    assert!(
        op["responses"].get(status.to_string()).is_some(),
        "openapi.yaml does not document {status} for {method} {path}"
    );
}

fn config_keys_of_the_server() -> BTreeSet<String> {
    let v = serde_json::to_value(tidewire::config::Config::default()).expect("config as JSON");
    v.as_object().expect("object").keys().cloned().collect()
}

#[test]
fn the_config_schema_names_every_key_the_server_reads_and_no_other() {
    let schema = &schema_files()["config.schema.json"];
    assert_eq!(schema["additionalProperties"], false);
    let documented: BTreeSet<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let served = config_keys_of_the_server();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "config keys missing from config.schema.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "config.schema.json keys the server does not read: {extra:?}"
    );
    // The built-in defaults are a valid configuration (unset options left out, as in TOML).
    let mut defaults = serde_json::to_value(tidewire::config::Config::default()).unwrap();
    defaults
        .as_object_mut()
        .unwrap()
        .retain(|_, v| !v.is_null());
    Schemas::load().check("config.schema.json", &defaults);
}

#[test]
fn the_sample_config_file_validates_against_the_config_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tidewire.toml");
    let text = std::fs::read_to_string(path).expect("deploy/tidewire.toml");
    let sample: Value = toml::from_str(&text).expect("the sample is TOML");
    let schemas = Schemas::load();
    schemas.check("config.schema.json", &sample);
    // And the schema is strict: a typo is refused, as the server refuses it.
    let mut typo = sample.clone();
    typo["listen_addr"] = json!("127.0.0.1:1");
    schemas.refuses("config.schema.json", &typo);
    let mut bad = sample;
    bad["max_topic_len"] = json!(201);
    schemas.refuses("config.schema.json", &bad);
}

// -------------------------------------------------------------------------------------------
// Captured from a running server
// -------------------------------------------------------------------------------------------

/// POSTs raw bytes with headers; returns status, headers and the body as JSON.
async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client.post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, h, v)
}

#[tokio::test]
async fn publish_answers_for_every_content_type_with_and_without_gzip_match_the_receipt_schema() {
    let s = Schemas::load();
    let doc = openapi();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let one = server.url("/v1/topics/sensors/room-12/t/events");
    let many = server.url("/v1/events");

    let envelope = json!({"data": {"t": 21.5}, "type": "reading", "msg_id": "m-json"});
    let batch =
        json!([{"data": 1}, {"data": "AP8=", "encoding": "base64"}, {"data": null, "type": "x"}]);
    let multi = json!([{"topic": "sensors/a", "data": 1}, {"topic": "sensors/b", "data": [2]}]);
    s.check("publish-body.schema.json", &envelope);
    s.check("publish-body.schema.json", &batch);
    s.check("publish-batch.schema.json", &multi);
    let ndjson =
        b"{\"data\":{\"t\":21.6},\"type\":\"reading\"}\n\n{\"data\":{\"t\":21.7}}\n".to_vec();
    let ndjson_multi =
        b"{\"topic\":\"sensors/a\",\"data\":3}\n{\"topic\":\"sensors/c\",\"data\":4}\n".to_vec();
    // MessagePack: a map with `bin` data, and an array of maps.
    let mp_one = {
        let v = rmpv::Value::Map(vec![
            ("data".into(), rmpv::Value::Binary(vec![0, 1, 255])),
            ("type".into(), "raw".into()),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    };
    let mp_many = rmp_serde::to_vec_named(&json!([{"data": {"a": 1}}, {"data": [true]}])).unwrap();
    let mp_multi = rmp_serde::to_vec_named(&json!([{"topic": "sensors/m", "data": 1}])).unwrap();
    s.check(
        "publish-body.schema.json#/$defs/msgpack",
        &decode_msgpack(&mp_one),
    );
    s.check(
        "publish-body.schema.json#/$defs/msgpack",
        &decode_msgpack(&mp_many),
    );
    s.check(
        "publish-batch.schema.json#/$defs/msgpack",
        &decode_msgpack(&mp_multi),
    );

    let cases: Vec<(&str, &str, &str, Vec<u8>, u64)> = vec![
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/json",
            envelope.to_string().into_bytes(),
            1,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/json",
            batch.to_string().into_bytes(),
            3,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/x-ndjson",
            ndjson.clone(),
            2,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/msgpack",
            mp_one.clone(),
            1,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/x-msgpack",
            mp_many.clone(),
            2,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/vnd.msgpack",
            mp_one.clone(),
            1,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "text/plain; charset=utf-8",
            b"21.5 C".to_vec(),
            1,
        ),
        (
            &one,
            "/v1/topics/{topic}/events",
            "application/octet-stream",
            vec![0, 159, 255],
            1,
        ),
        (
            &many,
            "/v1/events",
            "application/json",
            multi.to_string().into_bytes(),
            2,
        ),
        (
            &many,
            "/v1/events",
            "application/x-ndjson",
            ndjson_multi.clone(),
            2,
        ),
        (
            &many,
            "/v1/events",
            "application/msgpack",
            mp_multi.clone(),
            1,
        ),
    ];
    for (url, template, content_type, body, count) in cases {
        for gzipped in [false, true] {
            // A fresh msg_id per request, so none of these is a repeat.
            let body = if content_type == "application/json" && body.starts_with(b"{") {
                let mut v: Value = serde_json::from_slice(&body).unwrap();
                v["msg_id"] = json!(format!("m-{gzipped}"));
                v.to_string().into_bytes()
            } else {
                body.clone()
            };
            let mut headers = vec![("content-type", content_type)];
            let body = if gzipped {
                headers.push(("content-encoding", "gzip"));
                gzip(&body)
            } else {
                body
            };
            let (status, h, receipt) = post_raw(&client, url, &headers, body).await;
            assert_eq!(status, 201, "{content_type} gzip={gzipped}: {receipt}");
            assert_eq!(h["content-type"], "application/json");
            s.check("publish-response.schema.json", &receipt);
            assert_eq!(receipt["count"], count, "{content_type}: {receipt}");
            documented(&doc, "POST", template, 201);
        }
    }

    // A repeat of a (topic, msg_id): reported as a duplicate with its original id.
    let first = json!({"data": 1, "msg_id": "again"}).to_string();
    let (_, a) = post(&client, &one, "application/json", first.clone()).await;
    let (status, b) = post(&client, &one, "application/json", first).await;
    assert_eq!(status, 201);
    s.check("publish-response.schema.json", &a);
    s.check("publish-response.schema.json", &b);
    assert_eq!(b["duplicates"], 1, "{b}");
    if let Some(of) = b.get("duplicate_of") {
        assert_eq!(of, &json!([a["first_id"]]), "{b}");
    }
    server.stop().await;
}

struct ErrorCase {
    method: &'static str,
    template: &'static str,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    method: &'static str,
    template: &'static str,
    url: String,
    status: u16,
    code: &'static str,
) -> ErrorCase {
    ErrorCase {
        method,
        template,
        url,
        headers: Vec::new(),
        body: Vec::new(),
        status,
        code,
    }
}

impl ErrorCase {
    fn header(mut self, k: &'static str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
}

/// Sends every case; checks status, code, the error schema, and that openapi.yaml documents
/// the status for the route (unknown routes and 405s excepted: they have no operation).
async fn run_error_cases(s: &Schemas, doc: &Value, cases: Vec<ErrorCase>) {
    let client = reqwest::Client::new();
    for c in cases {
        let mut req = client.request(c.method.parse().unwrap(), &c.url);
        for (k, v) in &c.headers {
            req = req.header(*k, v);
        }
        let r = req.body(c.body.clone()).send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let what = format!("{} {}", c.method, c.url);
        assert_eq!(status, c.status, "{what}: {text}");
        assert_eq!(headers["content-type"], "application/json", "{what}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
        s.check("error.schema.json", &body);
        assert_eq!(body["error"]["code"], c.code, "{what}");
        match status {
            404 if c.code == "not_found" => {}
            405 => assert!(headers.contains_key("allow"), "{what}: 405 without Allow"),
            401 => {
                assert!(
                    headers["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer"),
                    "{what}"
                );
                documented(doc, c.method, c.template, status);
            }
            _ => documented(doc, c.method, c.template, status),
        }
    }
}

#[tokio::test]
async fn every_error_status_the_server_gives_has_the_error_body_and_is_documented() {
    let s = Schemas::load();
    let doc = openapi();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.max_body_bytes = 4096;
        c.max_batch_events = 3;
    })
    .await;
    let client = reqwest::Client::new();
    publish_one(&client, &server.url(""), "known/topic", json!(1)).await;
    let u = |p: &str| server.url(p);
    let publish = "/v1/topics/{topic}/events";
    let json_ct = ("content-type", "application/json");
    let thirty_three: String = (0..33).map(|i| format!("topic=p{i}&")).collect();
    let cases = vec![
        // 400
        case("POST", publish, u("/v1/topics/a/events"), 400, "malformed_body")
            .header(json_ct.0, json_ct.1)
            .body("{nope"),
        case("POST", publish, u("/v1/topics/a/events"), 400, "malformed_body")
            .header(json_ct.0, json_ct.1)
            .header("content-encoding", "gzip")
            .body("not gzip"),
        case("GET", "/v1/poll", u("/v1/poll?topic=a&since=x"), 400, "invalid_cursor"),
        case("GET", "/v1/poll", u("/v1/poll?topic=a&limit=0"), 400, "bad_request"),
        case("GET", "/v1/sse", u("/v1/sse"), 400, "bad_request"),
        case("GET", "/v1/sse", u("/v1/sse?topic=a"), 400, "invalid_cursor")
            .header("last-event-id", "ten"),
        case("GET", "/v1/topics", u("/v1/topics?limit=-1"), 400, "bad_request"),
        case("GET", "/v1/sse", u("/v1/sse?topic=a&start=latest&start_time=0"), 400, "invalid_start"),
        case("GET", "/v1/poll", u("/v1/poll?topic=a&start_time=soon"), 400, "invalid_start"),
        case("GET", "/v1/latest", u("/v1/latest?topic=a&limit=0"), 400, "bad_request"),
        // 404
        case("GET", "/nope", u("/nope"), 404, "not_found"),
        case("GET", "/v1/topics/{topic}", u("/v1/topics/never/seen"), 404, "unknown_topic"),
        case("GET", "/v1/latest/{topic}", u("/v1/latest/never/seen"), 404, "no_event"),
        // 405
        case("PUT", "/healthz", u("/healthz"), 405, "method_not_allowed"),
        case("GET", "/v1/events", u("/v1/events"), 405, "method_not_allowed"),
        case("POST", "/v1/topics/{topic}", u("/v1/topics/a"), 405, "method_not_allowed"),
        // 413
        case("POST", publish, u("/v1/topics/a/events"), 413, "payload_too_large")
            .header(json_ct.0, json_ct.1)
            .body(json!({"data": "x".repeat(5000)}).to_string()),
        case("POST", "/v1/events", u("/v1/events"), 413, "too_many_events")
            .header(json_ct.0, json_ct.1)
            .body(json!([{"topic":"a","data":1},{"topic":"a","data":2},{"topic":"a","data":3},{"topic":"a","data":4}]).to_string()),
        // 415
        case("POST", publish, u("/v1/topics/a/events"), 415, "unsupported_media_type")
            .header("content-type", "application/xml")
            .body("<a/>"),
        case("POST", publish, u("/v1/topics/a/events"), 415, "unsupported_media_type").body("x"),
        case("POST", publish, u("/v1/topics/a/events"), 415, "unsupported_encoding")
            .header(json_ct.0, json_ct.1)
            .header("content-encoding", "br")
            .body("{}"),
        // 422
        case("POST", publish, u("/v1/topics/a%20b/events"), 422, "invalid_topic")
            .header(json_ct.0, json_ct.1)
            .body(r#"{"data":1}"#),
        case("POST", publish, u("/v1/topics/a/events"), 422, "invalid_envelope")
            .header(json_ct.0, json_ct.1)
            .body(r#"{"data":1,"type":"gap"}"#),
        case("POST", "/v1/events", u("/v1/events"), 422, "invalid_envelope")
            .header(json_ct.0, json_ct.1)
            .body(r#"[{"data":1}]"#),
        case("GET", "/v1/sse", u("/v1/sse?topic=a/**/b"), 422, "invalid_pattern"),
        case("GET", "/v1/poll", u(&format!("/v1/poll?{thirty_three}")), 422, "too_many_patterns"),
        case("GET", "/v1/topics", u("/v1/topics?pattern=a**"), 422, "invalid_pattern"),
        case("GET", "/v1/topics/{topic}", u("/v1/topics/a//b"), 422, "invalid_topic"),
        case("GET", "/v1/latest/{topic}", u("/v1/latest/a//b"), 422, "invalid_topic"),
        case("GET", "/v1/latest", u("/v1/latest?topic=a**"), 422, "invalid_pattern"),
        // 426
        case("GET", "/v1/ws", u("/v1/ws?topic=a"), 426, "upgrade_required"),
    ];
    run_error_cases(&s, &doc, cases).await;
    // `/readyz` says ready with its own body.
    let ready: Value = client
        .get(u("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready, json!({"status": "ready"}));
    server.stop().await;
}

const SECRET: &str = "schema-test-secret-0123456789-abcdefghij";

fn mint(publish: &[&str], subscribe: &[&str]) -> String {
    use tidewire::auth::mint::{mint, parse_hs_alg, TokenSpec};
    mint(
        SECRET.as_bytes(),
        &TokenSpec {
            admin: false,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            ttl: std::time::Duration::from_secs(600),
            sub: Some("schema-test".into()),
            aud: None,
            iss: None,
            alg: parse_hs_alg("HS256").expect("HS256"),
        },
    )
    .expect("mint")
}

fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims are JSON")
}

#[tokio::test]
async fn with_a_key_configured_401_403_auth_frames_and_real_token_claims_match_the_schemas() {
    let s = Schemas::load();
    let doc = openapi();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(tmp.path(), |c| {
        c.jwt_secret = Some(tidewire::config::Secret::new(SECRET));
        c.metrics_token = Some(tidewire::config::Secret::new("scrape-me"));
    })
    .await;
    let u = |p: &str| server.url(p);
    let reader = mint(&[], &["dash/**"]);
    s.check("jwt-claims.schema.json", &claims_of(&reader));
    s.check(
        "jwt-claims.schema.json",
        &claims_of(&mint(&["sensors/**"], &[])),
    );
    let bearer = format!("Bearer {reader}");
    let publish = "/v1/topics/{topic}/events";
    let cases = vec![
        case(
            "POST",
            publish,
            u("/v1/topics/dash/a/events"),
            401,
            "unauthorized",
        )
        .header("content-type", "application/json")
        .body(r#"{"data":1}"#),
        case(
            "GET",
            "/v1/sse",
            u("/v1/sse?topic=dash/**"),
            401,
            "unauthorized",
        )
        .header("authorization", "Bearer not.a.token"),
        case(
            "GET",
            "/v1/poll",
            u("/v1/poll?topic=dash/**&access_token=x.y.z"),
            401,
            "unauthorized",
        ),
        case("GET", "/v1/topics", u("/v1/topics"), 401, "unauthorized")
            .header("cookie", "tidewire_token=bad"),
        case("GET", "/metrics", u("/metrics"), 401, "unauthorized"),
        case(
            "POST",
            publish,
            u("/v1/topics/dash/a/events"),
            403,
            "forbidden",
        )
        .header("authorization", bearer.clone())
        .header("content-type", "application/json")
        .body(r#"{"data":1}"#),
        case(
            "GET",
            "/v1/poll",
            u("/v1/poll?topic=other/**"),
            403,
            "forbidden",
        )
        .header("authorization", bearer.clone()),
        case(
            "GET",
            "/v1/topics/{topic}",
            u("/v1/topics/other/t"),
            403,
            "forbidden",
        )
        .header("authorization", bearer.clone()),
    ];
    run_error_cases(&s, &doc, cases).await;

    // The in-band `auth` op and its answer.
    let mut req = format!(
        "ws://{}/v1/ws?topic=dash/**&access_token={reader}",
        server.addr
    )
    .into_client_request()
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "tidewire.v1.json".parse().unwrap(),
    );
    let (mut ws, _) = timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .expect("connect with access_token");
    let frames = [
        json!({"op": "auth", "token": mint(&[], &["dash/**"]), "ref": "a1"}),
        json!({"op": "subscribe", "topics": ["other/**"], "ref": "s1"}),
    ];
    for f in &frames {
        s.check("ws-client-frame.schema.json", f);
        ws.send(Message::text(f.to_string())).await.unwrap();
    }
    let answers = read_json_frames(&mut ws, 2).await;
    for a in &answers {
        s.check("ws-server-frame.schema.json", a);
    }
    assert_eq!(answers[0]["op"], "auth", "{answers:?}");
    assert!(answers[0]["exp"].is_u64(), "{answers:?}");
    assert_eq!(answers[1]["op"], "error");
    assert_eq!(answers[1]["code"], "forbidden");
    drop(ws);
    server.stop().await;
}

/// Reads `n` JSON text frames (protocol pings skipped).
async fn read_json_frames(
    ws: &mut (impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
              + Unpin),
    n: usize,
) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = timeout(PATIENCE, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => out.push(serde_json::from_str(t.as_str()).expect("JSON frame")),
            Message::Binary(b) => panic!("binary frame on a JSON socket: {b:?}"),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
    out
}

/// Publishes events 1..=10 (typed, untyped, bytes) on topics `g/…`, where `gone/t` holds ids 1
/// and 2 only, then removes ids 1..=5 as retention would and restarts the server.
async fn server_with_a_retention_gap(tmp: &tempfile::TempDir) -> TestServer {
    let server = TestServer::start(tmp).await;
    let client = reqwest::Client::new();
    let base = server.url("");
    for i in 1..=10u64 {
        let id = match i {
            1 | 2 => publish_one(&client, &base, "gone/t", json!(i)).await,
            3 => {
                let (st, r) = post(
                    &client,
                    &format!("{base}/v1/topics/g/bytes/events?type=raw"),
                    "application/octet-stream",
                    vec![0u8, 255, 7],
                )
                .await;
                assert_eq!(st, 201);
                r["first_id"].as_u64().unwrap()
            }
            _ if i % 2 == 0 => {
                let (st, r) = post(
                    &client,
                    &format!("{base}/v1/topics/g/even/events"),
                    "application/json",
                    json!({"data": {"n": i}, "type": "reading"}).to_string(),
                )
                .await;
                assert_eq!(st, 201);
                r["first_id"].as_u64().unwrap()
            }
            _ => publish_one(&client, &base, "g/odd", json!(i)).await,
        };
        assert_eq!(id, i);
    }
    server.stop().await;
    retain_after(tmp.path(), 5).await;
    TestServer::start(tmp).await
}

#[tokio::test]
async fn sse_events_and_the_gap_event_match_the_envelope_and_gap_schemas() {
    let s = Schemas::load();
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_a_retention_gap(&tmp).await;
    let client = reqwest::Client::new();
    // A bytes event and a typed one published live, then a resume from before retention.
    let mut sub = sse(&server.url("/v1/sse?topic=g/**"), Some(2)).await;
    let gap = next_event(&mut sub).await;
    let gap_event = json!({
        "event": gap.event,
        "id": gap.id,
        "data": serde_json::from_str::<Value>(&gap.data).expect("gap data is JSON"),
    });
    s.check("sse-gap.schema.json", &gap_event);
    s.check("gap.schema.json", &gap_event["data"]);
    assert_eq!(gap_event["data"], json!({"requested": 2, "oldest": 6}));
    let (st, _) = post(
        &client,
        &server.url("/v1/topics/g/bytes/events"),
        "application/octet-stream",
        vec![1u8, 2, 3],
    )
    .await;
    assert_eq!(st, 201);
    let mut kinds = BTreeSet::new();
    for _ in 6..=11 {
        let ev = next_event(&mut sub).await;
        let env: Value = serde_json::from_str(&ev.data).expect("data is one JSON line");
        s.check("envelope.schema.json", &env);
        assert_eq!(ev.id, env["id"].to_string());
        assert_eq!(ev.event, env["type"].as_str().unwrap_or("message"));
        kinds.insert(if env.get("encoding").is_some() {
            "bytes"
        } else if env.get("type").is_some() {
            "typed"
        } else {
            "untyped"
        });
    }
    assert_eq!(
        kinds.len(),
        3,
        "typed, untyped and bytes events seen: {kinds:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn long_poll_answers_with_events_empty_and_with_a_gap_match_the_poll_schema_in_json_and_msgpack(
) {
    let s = Schemas::load();
    let doc = openapi();
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_a_retention_gap(&tmp).await;
    let client = reqwest::Client::new();
    let get = |q: &str, accept: &'static str| {
        let req = client
            .get(server.url(&format!("/v1/poll?{q}")))
            .header("accept", accept);
        async move {
            let r = req.send().await.expect("poll");
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            assert_eq!(r.headers()["cache-control"], "no-store");
            (ct, r.bytes().await.expect("body"))
        }
    };
    let mut bodies = Vec::new();
    for q in [
        "topic=g/**&since=2",
        "topic=g/**&since=0",
        "topic=g/**&since=10&timeout=0",
        "topic=gone/t&timeout=0",
        "topic=**&since=7&limit=1",
    ] {
        let (ct, json_body) = get(q, "application/json").await;
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_slice(&json_body).expect("JSON body");
        s.check("poll-response.schema.json", &v);
        let (ct, mp_body) = get(q, "application/msgpack").await;
        assert_eq!(ct, "application/msgpack");
        let m = decode_msgpack(&mp_body);
        s.check("poll-response.schema.json", &m);
        assert_eq!(m["next"], v["next"], "{q}");
        bodies.push(v);
    }
    assert_eq!(bodies[0]["gap"], json!({"requested": 2, "oldest": 6}));
    assert_eq!(bodies[0]["events"].as_array().unwrap().len(), 5);
    assert_eq!(bodies[2]["events"], json!([]));
    documented(&doc, "GET", "/v1/poll", 200);
    server.stop().await;
}

#[tokio::test]
async fn the_stats_answer_matches_the_stats_schema_before_and_after_traffic() {
    let s = Schemas::load();
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp).await;
    let client = reqwest::Client::new();
    let empty = get_json(&client, &server.url("/v1/stats")).await;
    s.check("stats.schema.json", &empty);
    assert_eq!(empty["head"], 0, "{empty}");
    publish_one(&client, &server.url(""), "st/a", json!(1)).await;
    let _stream = sse(&server.url("/v1/sse?topic=st/**&last_event_id=0"), None).await;
    let busy = get_json(&client, &server.url("/v1/stats")).await;
    s.check("stats.schema.json", &busy);
    assert_eq!(busy["head"], 1, "{busy}");
    server.stop().await;
}

#[tokio::test]
async fn latest_answers_and_snapshot_polls_match_their_schemas_in_json_and_msgpack() {
    let s = Schemas::load();
    let doc = openapi();
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_a_retention_gap(&tmp).await;
    let client = reqwest::Client::new();
    for accept in ["application/json", "application/msgpack"] {
        let decode = |bytes: &[u8]| match accept {
            "application/json" => serde_json::from_slice::<Value>(bytes).expect("JSON"),
            _ => decode_msgpack(bytes),
        };
        for q in ["topic=g/**", "topic=**&limit=1", "topic=gone/t"] {
            let r = client
                .get(server.url(&format!("/v1/latest?{q}")))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], accept);
            let v = decode(&r.bytes().await.unwrap());
            s.check("latest-response.schema.json", &v);
        }
        for q in [
            "topic=g/**&start=latest&timeout=0",
            "topic=**&start_time=0&timeout=0",
        ] {
            let r = client
                .get(server.url(&format!("/v1/poll?{q}")))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            s.check(
                "poll-response.schema.json",
                &decode(&r.bytes().await.unwrap()),
            );
        }
        let r = client
            .get(server.url("/v1/latest/g/even"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        s.check("envelope.schema.json", &decode(&r.bytes().await.unwrap()));
        let r = client
            .get(server.url("/v1/latest/g/even"))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304);
    }
    documented(&doc, "GET", "/v1/latest", 200);
    documented(&doc, "GET", "/v1/latest/{topic}", 200);
    documented(&doc, "GET", "/v1/latest/{topic}", 304);
    server.stop().await;
}

#[tokio::test]
async fn topics_api_answers_match_the_topic_schemas() {
    let s = Schemas::load();
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_a_retention_gap(&tmp).await;
    let client = reqwest::Client::new();
    let get = |p: &str| {
        let req = client.get(server.url(p));
        async move {
            let r = req.send().await.expect("GET");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("JSON")
        }
    };
    let all = get("/v1/topics").await;
    s.check("topic-list.schema.json", &all);
    let names: Vec<&str> = all["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    // The sled log remembers a topic whose events retention removed (count 0, first_id null);
    // JetStream forgets a subject with no messages left (README, Scale-out: differences).
    let sled = common::backend() == common::Backend::Sled;
    if sled {
        assert_eq!(names, ["g/bytes", "g/even", "g/odd", "gone/t"]);
    } else {
        assert_eq!(names, ["g/even", "g/odd"]);
    }
    s.check(
        "topic-list.schema.json",
        &get("/v1/topics?pattern=g/*&limit=2").await,
    );
    for t in names.iter().chain(["g/odd"].iter()) {
        let one = get(&format!("/v1/topics/{t}")).await;
        s.check("topic-stats.schema.json", &one);
        assert_eq!(one["topic"], *t);
    }
    if sled {
        // Retention removed every event of gone/t.
        assert_eq!(get("/v1/topics/gone/t").await["first_id"], Value::Null);
    } else {
        let r = client
            .get(server.url("/v1/topics/gone/t"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        s.check("error.schema.json", &r.json::<Value>().await.unwrap());
    }
    let health: Value = get("/healthz").await;
    assert_eq!(health, json!({"status": "ok"}));
    server.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(addr: std::net::SocketAddr, query: &str, proto: &str) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws{query}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", proto.parse().unwrap());
    let (ws, resp) = timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect("connect");
    assert_eq!(resp.headers()["sec-websocket-protocol"], proto);
    ws
}

/// Reads frames until `done` says enough, validating each server frame (single frames against
/// the frame schema, gzip batches against `$defs/batch`).
async fn collect_frames(
    s: &Schemas,
    ws: &mut Ws,
    msgpack: bool,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    while !done(&seen) {
        let msg = timeout(PATIENCE, ws.next())
            .await
            .unwrap_or_else(|_| panic!("timed out; frames so far: {seen:?}"))
            .expect("socket ended")
            .expect("socket error");
        let bytes = match msg {
            Message::Text(t) => {
                assert!(!msgpack, "text frame on the MessagePack subprotocol");
                t.as_bytes().to_vec()
            }
            Message::Binary(b) if b.starts_with(&[0x1f, 0x8b]) => {
                let raw = gunzip(&b);
                let batch = if msgpack {
                    decode_msgpack(&raw)
                } else {
                    serde_json::from_slice(&raw).expect("JSON batch")
                };
                s.check("ws-server-frame.schema.json#/$defs/batch", &batch);
                seen.extend(batch.as_array().unwrap().iter().cloned());
                continue;
            }
            Message::Binary(b) => {
                assert!(msgpack, "binary frame on the JSON subprotocol");
                b.to_vec()
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
        let v = if msgpack {
            decode_msgpack(&bytes)
        } else {
            serde_json::from_slice(&bytes).expect("JSON frame")
        };
        s.check("ws-server-frame.schema.json", &v);
        seen.push(v);
    }
    seen
}

fn has_op(frames: &[Value], op: &str, r: &Value) -> bool {
    frames.iter().any(|f| f["op"] == op && &f["ref"] == r)
}

#[tokio::test]
async fn websocket_client_and_server_frames_in_both_subprotocols_match_the_frame_schemas() {
    let s = Schemas::load();
    let tmp = tempfile::tempdir().unwrap();
    let server = server_with_a_retention_gap(&tmp).await;
    let addr = server.addr;

    for (proto, msgpack) in [("tidewire.v1.json", false), ("tidewire.v1.msgpack", true)] {
        let mut ws = ws_connect(addr, "?topic=g/**&since=2", proto).await;
        // The gap, then the five retained events (one of them bytes).
        let first = collect_frames(&s, &mut ws, msgpack, |f| f.len() >= 6).await;
        assert_eq!(first[0], json!({"op": "gap", "requested": 2, "oldest": 6}));
        let client_frames = vec![
            json!({"op": "subscribe", "topics": ["h/*"], "since": "0", "ref": "s1"}),
            json!({"op": "subscribe", "topics": ["g/odd"], "since": 3, "ref": 2}),
            // Refused on a socket that holds patterns (an `invalid_start` error frame).
            json!({"op": "subscribe", "topics": ["h/x"], "start": "latest", "ref": "l1"}),
            json!({"op": "subscribe", "topics": ["h/x"], "start_time": "2026-12-06T05:00:00Z", "ref": "l2"}),
            json!({"op": "unsubscribe", "topics": ["h/*"], "ref": "u1"}),
            json!({"op": "publish", "topic": "g/odd", "data": {"x": 1}, "type": "t", "msg_id": format!("ws-{proto}"), "ref": "p1"}),
            json!({"op": "publish", "topic": "g/odd", "data": {"x": 1}, "type": "t", "msg_id": format!("ws-{proto}"), "ref": "p2"}),
            json!({"op": "ping", "ref": "g1"}),
            json!({"op": "ping"}),
            json!({"op": "auth", "token": "e30.e30.x", "ref": "a1"}),
        ];
        for f in &client_frames {
            s.check("ws-client-frame.schema.json", f);
            let msg = if msgpack {
                Message::binary(rmp_serde::to_vec_named(f).unwrap())
            } else {
                Message::text(f.to_string())
            };
            ws.send(msg).await.unwrap();
        }
        // Refused frames get error frames; they are not valid client frames either.
        let bad = [
            json!({"op": "dance", "ref": "d1"}),
            json!({"op": "subscribe", "topics": [], "ref": "e1"}),
        ];
        for f in &bad {
            s.refuses("ws-client-frame.schema.json", f);
            let msg = if msgpack {
                Message::binary(rmp_serde::to_vec_named(f).unwrap())
            } else {
                Message::text(f.to_string())
            };
            ws.send(msg).await.unwrap();
        }
        let want = |f: &[Value]| {
            has_op(f, "ack", &json!("s1"))
                && has_op(f, "ack", &json!(2))
                && has_op(f, "ack", &json!("u1"))
                && has_op(f, "ack", &json!("p1"))
                && has_op(f, "ack", &json!("p2"))
                && has_op(f, "pong", &json!("g1"))
                && has_op(f, "pong", &Value::Null)
                && has_op(f, "error", &json!("a1"))
                && has_op(f, "error", &json!("l1"))
                && has_op(f, "error", &json!("l2"))
                && has_op(f, "error", &json!("d1"))
                && has_op(f, "error", &json!("e1"))
                && f.iter()
                    .any(|e| e.get("op").is_none() && e["topic"] == "g/odd" && e["type"] == "t")
        };
        let frames = collect_frames(&s, &mut ws, msgpack, want).await;
        // A subscribe asking for less than the socket already sent gets a gap frame first.
        assert!(frames.iter().any(|f| f["op"] == "gap"), "{frames:?}");
        ws.close(None).await.ok();
    }

    // batch=gzip: the replay arrives as a gzip'd array of envelopes.
    let mut ws = ws_connect(addr, "?topic=g/**&since=5&batch=gzip", "tidewire.v1.json").await;
    let frames = collect_frames(&s, &mut ws, false, |f| f.len() >= 5).await;
    assert!(frames.iter().all(|f| f.get("op").is_none()), "{frames:?}");
    ws.close(None).await.ok();
    server.stop().await;
}
