//! `topic::Topic::parse`, `topic::Pattern::parse` and `Pattern::matches`, against a slow
//! reference written from the contract's rules (CONTRACT.md "Words", src/topic.rs):
//!
//! - a topic is 1 to 200 bytes of `/`-separated segments, each 1+ bytes of `[A-Za-z0-9_.~-]`;
//! - a pattern is a topic in which a segment may be `*` (exactly one segment) or, as the
//!   last segment only, `**` (zero or more segments);
//! - `max_topic_len` may lower the 200, never raise it.
//!
//! Properties: parse accepts exactly what the reference accepts (with a limit too) and
//! `as_str` gives the input back; `matches` agrees with a backtracking matcher; a pattern
//! without wildcards is a topic and matches exactly itself; `literal_prefix` prefixes every
//! topic the pattern matches; a `PatternSet` matches when any member does.
//!
//! Input: the first byte picks the mode. Raw: the rest is `pattern \0 topic`. Built: each byte
//! is a segment drawn from a small alphabet, so matching (rather than parsing) gets explored.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire::topic::{NameError, Pattern, PatternSet, Topic, MAX_TOPIC_LEN};

fn segment_ok(seg: &str) -> bool {
    !seg.is_empty()
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.~-".contains(&b))
}

fn ref_topic(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max.min(MAX_TOPIC_LEN) && s.split('/').all(segment_ok)
}

fn ref_pattern(s: &str, max: usize) -> bool {
    if s.is_empty() || s.len() > max.min(MAX_TOPIC_LEN) {
        return false;
    }
    let segs: Vec<&str> = s.split('/').collect();
    segs.iter().enumerate().all(|(i, seg)| match *seg {
        "*" => true,
        "**" => i == segs.len() - 1,
        other => segment_ok(other),
    })
}

/// Backtracking matcher; treats `**` anywhere as "zero or more segments", so it does not
/// lean on the rule that `**` is last.
fn ref_match(p: &[&str], t: &[&str]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some((&"**", rest)) => (0..=t.len()).any(|k| ref_match(rest, &t[k..])),
        Some((&"*", rest)) => !t.is_empty() && ref_match(rest, &t[1..]),
        Some((lit, rest)) => t.first() == Some(lit) && ref_match(rest, &t[1..]),
    }
}

fn check_topic(s: &str, limit: usize) -> Option<Topic> {
    let got = Topic::parse(s);
    assert_eq!(
        got.is_ok(),
        ref_topic(s, MAX_TOPIC_LEN),
        "Topic::parse({s:?}) = {got:?}"
    );
    let limited = Topic::parse_with_limit(s, limit);
    assert_eq!(limited.is_ok(), ref_topic(s, limit), "limit {limit} {s:?}");
    match &got {
        Ok(t) => {
            assert_eq!(t.as_str(), s);
            assert_eq!(t.to_string(), s);
            assert_eq!(Topic::parse(t.as_str()).as_ref(), Ok(t));
        }
        Err(NameError::Empty) => assert!(s.is_empty()),
        Err(NameError::TooLong { len, max }) => assert!(*len == s.len() && *len > *max),
        Err(NameError::DoubleStarNotLast) => panic!("a topic error about `**`: {s:?}"),
        Err(_) => {}
    }
    got.ok()
}

fn check_pattern(s: &str, limit: usize) -> Option<Pattern> {
    let got = Pattern::parse(s);
    assert_eq!(
        got.is_ok(),
        ref_pattern(s, MAX_TOPIC_LEN),
        "Pattern::parse({s:?}) = {got:?}"
    );
    let limited = Pattern::parse_with_limit(s, limit);
    assert_eq!(
        limited.is_ok(),
        ref_pattern(s, limit),
        "limit {limit} {s:?}"
    );
    let p = got.ok()?;
    assert_eq!(p.as_str(), s);
    assert_eq!(p.to_string(), s);
    assert_eq!(Pattern::parse(p.as_str()).as_ref(), Ok(&p));
    // A wildcard-free pattern is a topic, and a topic is a pattern.
    let wild = s.split('/').any(|seg| seg == "*" || seg == "**");
    match p.as_topic() {
        Some(t) => {
            assert!(!wild, "{s:?} has a wildcard");
            assert_eq!(t.as_str(), s);
            assert!(p.matches(&t));
        }
        None => assert!(wild, "{s:?} has no wildcard"),
    }
    if let Ok(t) = Topic::parse(s) {
        assert!(p.matches(&t), "{s:?} does not match itself");
    }
    Some(p)
}

fn check_match(p: &Pattern, t: &Topic) {
    let ps: Vec<&str> = p.as_str().split('/').collect();
    let ts: Vec<&str> = t.as_str().split('/').collect();
    let want = ref_match(&ps, &ts);
    assert_eq!(p.matches(t), want, "{p:?} matches {t:?}");
    assert_eq!(p.matches_str(t.as_str()), want);
    if want {
        assert!(
            t.as_str().starts_with(p.literal_prefix()),
            "{t:?} does not start with the literal prefix {:?} of {p:?}",
            p.literal_prefix()
        );
    }
    // A wildcard-free pattern matches exactly itself.
    if let Some(exact) = p.as_topic() {
        assert_eq!(want, &exact == t);
    }
}

/// The small alphabet of the built mode: short literals that collide, both wildcards, and
/// bytes the alphabet refuses.
const SEGS: [&str; 12] = [
    "a", "b", "*", "**", "ab", "A-1", "_.~", "", " ", "é", "x/y", "a*",
];

fn build(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| SEGS[usize::from(*b) % SEGS.len()])
        .collect::<Vec<_>>()
        .join("/")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // A limit below, at and above the contract's.
    let limit = [MAX_TOPIC_LEN, 1, 8, 64, 199, 1000][usize::from(mode >> 2) % 6];
    let (ptext, ttext) = if mode & 1 == 0 {
        let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        (
            String::from_utf8_lossy(&rest[..cut]).into_owned(),
            String::from_utf8_lossy(rest.get(cut + 1..).unwrap_or(&[])).into_owned(),
        )
    } else {
        let half = usize::from(mode >> 4).min(rest.len());
        let (p, t) = rest.split_at(half);
        // Topic segments drawn from the literal part of the alphabet only, so many parse.
        let t: Vec<u8> = t
            .iter()
            .map(|b| [0, 1, 4, 5, 6][usize::from(*b) % 5])
            .collect();
        (build(p), build(&t))
    };
    let pattern = check_pattern(&ptext, limit);
    let topic = check_topic(&ttext, limit);
    // Both sides also as the other kind.
    let as_topic = check_topic(&ptext, limit);
    let as_pattern = check_pattern(&ttext, limit);
    if let (Some(p), Some(t)) = (&pattern, &topic) {
        check_match(p, t);
    }
    if let (Some(p), Some(t)) = (&pattern, &as_topic) {
        check_match(p, t);
    }
    if let (Some(p), Some(t)) = (&as_pattern, &topic) {
        check_match(p, t);
    }
    if let Some(t) = &topic {
        let members: Vec<Pattern> = pattern.iter().chain(as_pattern.iter()).cloned().collect();
        let want = members.iter().any(|p| p.matches(t));
        match PatternSet::new(members) {
            Some(set) => assert_eq!(set.matches(t), want),
            None => assert!(pattern.is_none() && as_pattern.is_none()),
        }
    }
});
