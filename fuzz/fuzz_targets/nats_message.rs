//! The JetStream log's pure codecs: topics and patterns as NATS subjects
//! (`log::nats_log::subject`), and a stream message as an event (`log::nats_log::wire`). A
//! gateway reads every message of its stream's subjects, and anything allowed to publish on
//! the NATS account can put one there, so decoding is a parser of outside input.
//!
//! Properties:
//! - a subject maps to a topic only in its canonical spelling: `topic_subject(subject_topic(s))
//!   == s`; every topic's subject maps back to it, and has no empty, `*` or `>` token;
//! - a pattern's filters match a topic's subject exactly when the pattern matches the topic
//!   (NATS's matching rules, written here from its documentation: `*` one token, a final `>`
//!   one or more);
//! - `decode` never panics on any subject, headers and payload; what it accepts renders as a
//!   valid JSON envelope, and encoding it again decodes to the same event.
//!
//! Input: the first byte picks the mode; the rest is text split at `\0`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire::log::nats_log::subject::{pattern_filters, subject_topic, topic_subject};
use tidewire::log::nats_log::wire::{self, HeaderMap};
use tidewire::topic::{Pattern, Topic};

const P: &str = "tidewire.fz";

fn nats_matches(filter: &str, subject: &str) -> bool {
    let f: Vec<&str> = filter.split('.').collect();
    let s: Vec<&str> = subject.split('.').collect();
    for (i, tok) in f.iter().enumerate() {
        if *tok == ">" && i == f.len() - 1 {
            return s.len() > i;
        }
        match s.get(i) {
            Some(t) if *tok == "*" || tok == t => {}
            _ => return false,
        }
    }
    f.len() == s.len()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(3, '\0');
    let a = parts.next().unwrap_or_default();
    let b = parts.next().unwrap_or_default();
    let c = parts.next().unwrap_or_default();
    match mode % 3 {
        0 => {
            if let Some(t) = subject_topic(P, a) {
                assert_eq!(topic_subject(P, &t), a, "only the canonical spelling maps");
            }
            if let Ok(t) = Topic::parse(a) {
                let s = topic_subject(P, &t);
                assert_eq!(subject_topic(P, &s), Some(t));
                let tokens: Vec<&str> = s[P.len() + 1..].split('.').collect();
                assert!(
                    tokens
                        .iter()
                        .all(|t| !t.is_empty() && *t != "*" && *t != ">"),
                    "{s}"
                );
            }
        }
        1 => {
            if let (Ok(p), Ok(t)) = (Pattern::parse(a), Topic::parse(b)) {
                let s = topic_subject(P, &t);
                let by_filters = pattern_filters(P, &p).iter().any(|f| nats_matches(f, &s));
                assert_eq!(by_filters, p.matches(&t), "pattern {a} topic {b}");
            }
        }
        _ => {
            // `b` holds header lines `Name: value`; `c` is the payload.
            let mut headers = HeaderMap::new();
            for line in b.lines() {
                if let Some((k, v)) = line.split_once(':') {
                    let (k, v) = (k.trim(), v.trim());
                    if !k.is_empty() && k.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
                        headers.insert(k, v);
                    }
                }
            }
            let subject = if a.contains('.') {
                a.to_owned()
            } else {
                format!("{P}.{a}")
            };
            let payload = bytes::Bytes::copy_from_slice(c.as_bytes());
            if let Some(e) = wire::decode(P, &subject, 7, Some(&headers), payload, 5) {
                let env: serde_json::Value =
                    serde_json::from_slice(e.json()).expect("the envelope is JSON");
                assert_eq!(env["id"], 7);
                // The time is the stream's stored timestamp, not part of the message.
                assert_eq!(e.time, 5);
                let (h, p) = wire::encode(&e.body);
                let again = wire::decode(P, &subject, 7, Some(&h), p, 5).expect("decodes again");
                assert_eq!(again.body, e.body);
                assert_eq!(again.time, e.time);
            }
        }
    }
});
