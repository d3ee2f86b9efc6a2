//! Topics, patterns and cursors: the names clients use, validated once at the edge.
//!
//! A [`Topic`] is 1 to 200 bytes of `/`-separated segments, each made of `[A-Za-z0-9_.~-]`.
//! A [`Pattern`] is a topic in which a segment may be `*` (exactly one segment) or, as the
//! last segment only, `**` (zero or more segments). Everything here is pure and free of I/O,
//! so property tests and fuzzers reach it directly.

use std::fmt;
use std::sync::Arc;

/// The longest topic or pattern the contract allows, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than the limit.
    #[error("is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the refused name.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A segment between two `/` is empty.
    #[error("has an empty segment")]
    EmptySegment,
    /// A segment holds a character outside `[A-Za-z0-9_.~-]`.
    #[error("segment {0:?} holds a character outside [A-Za-z0-9_.~-]")]
    BadSegment(String),
    /// `**` appears somewhere other than the last segment.
    #[error("`**` may only be the last segment")]
    DoubleStarNotLast,
}

fn is_segment_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'~' | b'-')
}

fn check_len(s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    let max = max.min(MAX_TOPIC_LEN);
    if s.len() > max {
        return Err(NameError::TooLong { len: s.len(), max });
    }
    Ok(())
}

fn check_plain_segment(seg: &str) -> Result<(), NameError> {
    if seg.is_empty() {
        return Err(NameError::EmptySegment);
    }
    if !seg.bytes().all(is_segment_char) {
        return Err(NameError::BadSegment(seg.to_string()));
    }
    Ok(())
}

/// A validated topic name. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `s` as a topic of at most `max_len` bytes (never more than [`MAX_TOPIC_LEN`]).
    pub fn parse_with_limit(s: &str, max_len: usize) -> Result<Self, NameError> {
        check_len(s, max_len)?;
        for seg in s.split('/') {
            check_plain_segment(seg)?;
        }
        Ok(Topic(Arc::from(s)))
    }

    /// Validates `s` as a topic under the contract's limit.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        Self::parse_with_limit(s, MAX_TOPIC_LEN)
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(Box<str>),
    Star,
    DoubleStar,
}

/// A validated subscription pattern. `*` matches exactly one segment; a trailing `**`
/// matches zero or more segments (so `a/**` matches `a` itself as well as `a/b/c`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Arc<str>,
    segments: Arc<[Segment]>,
}

impl Pattern {
    /// Validates `s` as a pattern of at most `max_len` bytes.
    pub fn parse_with_limit(s: &str, max_len: usize) -> Result<Self, NameError> {
        check_len(s, max_len)?;
        Self::parse_segments(s)
    }

    /// Validates `s` as a pattern of any length. Only for patterns built from validated ones:
    /// [`crate::auth::intersect`] combines two, and the result may pass 200 bytes while still
    /// matching topics within them (`a…/*/**` ∩ `*/b…/**` is `a…/b…/**`, which matches `a…/b…`).
    pub(crate) fn parse_any_length(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        Self::parse_segments(s)
    }

    fn parse_segments(s: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = s.split('/').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (i, seg) in parts.iter().enumerate() {
            let parsed = match *seg {
                "*" => Segment::Star,
                "**" if i == last => Segment::DoubleStar,
                "**" => return Err(NameError::DoubleStarNotLast),
                other => {
                    check_plain_segment(other)?;
                    Segment::Literal(other.into())
                }
            };
            segments.push(parsed);
        }
        Ok(Pattern {
            text: Arc::from(s),
            segments: segments.into(),
        })
    }

    /// Validates `s` as a pattern under the contract's limit.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        Self::parse_with_limit(s, MAX_TOPIC_LEN)
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The exact topic this pattern names, when it has no wildcard.
    pub fn as_topic(&self) -> Option<Topic> {
        if self
            .segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
        {
            Some(Topic(self.text.clone()))
        } else {
            None
        }
    }

    /// A string every topic this pattern matches starts with: the text before the first
    /// wildcard, without its trailing `/` (since `a/**` matches `a` itself). Used to narrow
    /// registry scans; it may also prefix topics the pattern does not match.
    pub fn literal_prefix(&self) -> &str {
        match self.text.find('*') {
            Some(i) => self.text[..i].trim_end_matches('/'),
            None => &self.text,
        }
    }

    /// Whether `topic` is matched by this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        self.matches_str(topic.as_str())
    }

    /// Whether the topic text `topic` is matched by this pattern. Allocation-free.
    pub fn matches_str(&self, topic: &str) -> bool {
        let mut parts = topic.split('/');
        for seg in self.segments.iter() {
            match seg {
                Segment::DoubleStar => return true,
                Segment::Star => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => match parts.next() {
                    Some(p) if p == &**lit => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", &*self.text)
    }
}

/// A non-empty set of patterns; an event is wanted when any of them matches its topic.
#[derive(Debug, Clone)]
pub struct PatternSet(Arc<[Pattern]>);

impl PatternSet {
    /// Builds a set; `None` when `patterns` is empty.
    pub fn new(patterns: Vec<Pattern>) -> Option<Self> {
        if patterns.is_empty() {
            None
        } else {
            Some(PatternSet(patterns.into()))
        }
    }

    /// Whether any pattern of the set matches `topic`.
    pub fn matches(&self, topic: &Topic) -> bool {
        self.0.iter().any(|p| p.matches(topic))
    }

    /// The patterns of the set.
    pub fn patterns(&self) -> &[Pattern] {
        &self.0
    }
}

/// Parses a resume cursor (`Last-Event-ID`, `last_event_id`, `since`): a decimal u64,
/// surrounding ASCII whitespace ignored. `None` when it is not one.
pub fn parse_cursor(s: &str) -> Option<u64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::parse(p).unwrap().matches_str(t)
    }

    #[test]
    fn topics_follow_the_contract_alphabet() {
        assert!(Topic::parse("sensors/room-12/temperature").is_ok());
        assert!(Topic::parse("a.b~c_d-e").is_ok());
        assert_eq!(Topic::parse(""), Err(NameError::Empty));
        assert_eq!(Topic::parse("a//b"), Err(NameError::EmptySegment));
        assert_eq!(Topic::parse("/a"), Err(NameError::EmptySegment));
        assert_eq!(Topic::parse("a/"), Err(NameError::EmptySegment));
        assert!(matches!(Topic::parse("a b"), Err(NameError::BadSegment(_))));
        assert!(matches!(Topic::parse("a/*"), Err(NameError::BadSegment(_))));
        assert!(Topic::parse(&"a".repeat(200)).is_ok());
        assert!(matches!(
            Topic::parse(&"a".repeat(201)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(m("sensors/*/temperature", "sensors/a/temperature"));
        assert!(!m("sensors/*/temperature", "sensors/temperature"));
        assert!(!m("sensors/*/temperature", "sensors/a/b/temperature"));
        assert!(m("*", "a"));
        assert!(!m("*", "a/b"));
    }

    #[test]
    fn double_star_matches_zero_or_more_trailing_segments() {
        assert!(m("sensors/**", "sensors"));
        assert!(m("sensors/**", "sensors/a"));
        assert!(m("sensors/**", "sensors/a/b/c"));
        assert!(!m("sensors/**", "sensorsX/a"));
        assert!(!m("sensors/**", "other"));
        assert!(m("**", "anything/at/all"));
        assert!(m("a/*/**", "a/b"));
        assert!(!m("a/*/**", "a"));
        assert_eq!(Pattern::parse("a/**/b"), Err(NameError::DoubleStarNotLast));
    }

    #[test]
    fn literal_patterns_are_topics() {
        let p = Pattern::parse("a/b").unwrap();
        assert_eq!(p.as_topic().unwrap().as_str(), "a/b");
        assert!(Pattern::parse("a/*").unwrap().as_topic().is_none());
        assert_eq!(Pattern::parse("a/b/*").unwrap().literal_prefix(), "a/b");
        assert_eq!(Pattern::parse("a/**").unwrap().literal_prefix(), "a");
        assert_eq!(Pattern::parse("**").unwrap().literal_prefix(), "");
    }

    #[test]
    fn cursors_are_plain_decimal_u64() {
        assert_eq!(parse_cursor("42"), Some(42));
        assert_eq!(parse_cursor(" 7 "), Some(7));
        assert_eq!(parse_cursor("0"), Some(0));
        assert_eq!(parse_cursor("-1"), None);
        assert_eq!(parse_cursor("1e3"), None);
        assert_eq!(parse_cursor(""), None);
        assert_eq!(parse_cursor("18446744073709551616"), None);
        assert_eq!(parse_cursor("18446744073709551615"), Some(u64::MAX));
    }
}
