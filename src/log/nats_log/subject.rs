//! Topics and patterns as NATS subjects, and back: pure functions, free of I/O.
//!
//! A topic `a/b.c/d` lives on the subject `<prefix>.a.b%2Ec.d`: each topic segment is one
//! subject token, and a `.` inside a segment (a token separator in NATS) is written `%2E`.
//! Topics never contain `%`, so the mapping is exact both ways.
//!
//! Patterns become subject filters: `*` is NATS `*` (one token), and a final `**`, which also
//! matches zero segments, becomes two filters, the parent subject itself and `parent.>`
//! (`>` matches one or more tokens only). `**` alone matches every topic: `<prefix>.>`.

use crate::topic::{Pattern, Topic};

/// How a `.` inside a topic segment is written in a subject token.
const DOT: &str = "%2E";

/// The subject of `topic` under `prefix`.
pub fn topic_subject(prefix: &str, topic: &Topic) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.as_str().len() + 8);
    out.push_str(prefix);
    for segment in topic.as_str().split('/') {
        out.push('.');
        push_segment(&mut out, segment);
    }
    out
}

fn push_segment(out: &mut String, segment: &str) {
    for (i, part) in segment.split('.').enumerate() {
        if i > 0 {
            out.push_str(DOT);
        }
        out.push_str(part);
    }
}

/// The topic a subject under `prefix` stands for; `None` for a subject that no topic maps to
/// (another prefix, or written by something other than tidewire).
pub fn subject_topic(prefix: &str, subject: &str) -> Option<Topic> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let topic = rest
        .split('.')
        .map(|token| token.replace(DOT, "."))
        .collect::<Vec<_>>()
        .join("/");
    let parsed = Topic::parse(&topic).ok()?;
    // Only the canonical spelling maps back: `%2e` or a stray `%` is not a topic's subject.
    (topic_subject(prefix, &parsed) == subject).then_some(parsed)
}

/// The subject filters that together match exactly the topics `pattern` matches (each
/// matching subject is matched by at least one filter, no other subject by any).
pub fn pattern_filters(prefix: &str, pattern: &Pattern) -> Vec<String> {
    let text = pattern.as_str();
    let segments: Vec<&str> = text.split('/').collect();
    let (last, init) = match segments.split_last() {
        Some(split) => split,
        None => return vec![format!("{prefix}.>")],
    };
    let mut head = String::from(prefix);
    for segment in init {
        head.push('.');
        match *segment {
            "*" => head.push('*'),
            s => push_segment(&mut head, s),
        }
    }
    match *last {
        // `**` alone: every topic (a topic has at least one segment, which `>` requires).
        "**" if init.is_empty() => vec![format!("{head}.>")],
        "**" => vec![head.clone(), format!("{head}.>")],
        "*" => vec![format!("{head}.*")],
        s => {
            head.push('.');
            push_segment(&mut head, s);
            vec![head]
        }
    }
}

/// Whether the NATS subject filter `filter` matches `subject` (`*` one token, a final `>`
/// one or more), as the server decides it (the property tests' model of the server).
#[cfg(test)]
pub fn filter_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "tidewire.s1";

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn a_dot_in_a_segment_is_escaped_and_comes_back() {
        let t = topic("sensors/v1.2/temp");
        let subject = topic_subject(P, &t);
        assert_eq!(subject, "tidewire.s1.sensors.v1%2E2.temp");
        assert_eq!(subject_topic(P, &subject), Some(t));
        assert_eq!(subject_topic(P, "tidewire.s1..a"), None, "empty segment");
        assert_eq!(subject_topic(P, "tidewire.s1.a%2e"), None, "not canonical");
        assert_eq!(subject_topic(P, "tidewire.s2.a"), None, "another prefix");
        assert_eq!(subject_topic(P, "tidewire.s1"), None, "no topic at all");
    }

    #[test]
    fn a_final_double_star_also_matches_zero_segments() {
        let p = Pattern::parse("a/**").unwrap();
        let filters = pattern_filters(P, &p);
        assert_eq!(filters, vec!["tidewire.s1.a", "tidewire.s1.a.>"]);
        let hits = |t: &str| {
            filters
                .iter()
                .any(|f| filter_matches(f, &topic_subject(P, &topic(t))))
        };
        assert!(hits("a"), "a/** matches a");
        assert!(hits("a/b/c"));
        assert!(!hits("ab"));
        assert_eq!(
            pattern_filters(P, &Pattern::parse("**").unwrap()),
            vec!["tidewire.s1.>"]
        );
        assert_eq!(
            pattern_filters(P, &Pattern::parse("x.y/*/z").unwrap()),
            vec!["tidewire.s1.x%2Ey.*.z"]
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        // Dots weighted up: they are what the mapping has to get right.
        proptest::string::string_regex("[a-c.~_-]{1,4}").unwrap()
    }

    fn topic_strategy() -> impl Strategy<Value = Topic> {
        proptest::collection::vec(segment(), 1..5).prop_map(|s| topic(&s.join("/")))
    }

    fn pattern_strategy() -> impl Strategy<Value = Pattern> {
        (
            proptest::collection::vec(prop_oneof![segment(), Just("*".to_string())], 0..4),
            prop_oneof![segment(), Just("*".to_string()), Just("**".to_string())],
        )
            .prop_map(|(mut init, last)| {
                init.push(last);
                Pattern::parse(&init.join("/")).unwrap()
            })
    }

    proptest! {
        #[test]
        fn topic_subject_round_trips_and_is_one_subject_per_topic(a in topic_strategy(), b in topic_strategy()) {
            let sa = topic_subject(P, &a);
            prop_assert_eq!(subject_topic(P, &sa), Some(a.clone()));
            prop_assert!(!sa.split('.').any(|t| t.is_empty() || t == "*" || t == ">"));
            prop_assert_eq!(sa == topic_subject(P, &b), a == b);
        }

        #[test]
        fn pattern_filters_match_exactly_the_topics_the_pattern_matches(p in pattern_strategy(), t in topic_strategy()) {
            let subject = topic_subject(P, &t);
            let by_filters = pattern_filters(P, &p).iter().any(|f| filter_matches(f, &subject));
            prop_assert_eq!(by_filters, p.matches(&t), "pattern {} topic {}", p.as_str(), t.as_str());
        }
    }
}
