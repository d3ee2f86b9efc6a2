//! Coverage of one pattern by another: the one rule every grant check goes through.
//!
//! A token grants patterns; a request names a topic (publish) or a pattern (subscribe). The
//! request is allowed only when a grant **covers** it: every topic the request can ever match
//! is matched by the grant. The matching semantics are those of [`Pattern::matches_str`]:
//! `*` is exactly one segment, a trailing `**` is zero or more segments (so `a/**` matches `a`).
//!
//! Both functions here work segment by segment. That is exact because a pattern's language is
//! a product of independent positions (a literal, any segment, or "any tail"), and the segment
//! alphabet is infinite, so a literal never covers `*`. Property tests check both against brute
//! force over every topic up to a depth where any counterexample must show.

use crate::topic::Pattern;

/// One segment of a pattern, read from its validated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg<'a> {
    Lit(&'a str),
    /// `*`: exactly one segment.
    One,
    /// A trailing `**`: zero or more segments.
    Rest,
}

fn segments(p: &Pattern) -> Vec<Seg<'_>> {
    let segs: Vec<Seg<'_>> = p
        .as_str()
        .split('/')
        .map(|s| match s {
            "*" => Seg::One,
            "**" => Seg::Rest,
            lit => Seg::Lit(lit),
        })
        .collect();
    // A topic has at least one segment, so a lone `**` never matches "zero segments": it is
    // `*/**`. Elsewhere `**` matching zero segments leaves a non-empty topic and counts.
    if segs == [Seg::Rest] {
        vec![Seg::One, Seg::Rest]
    } else {
        segs
    }
}

/// Whether `grant` covers `requested`: every topic `requested` can match is matched by
/// `grant`. A topic is asked about as a pattern without wildcards (`Pattern::parse("a/b")`).
///
/// Guarantees: `covers(g, r)` is true exactly when the set of topics matched by `r` is a
/// subset of the set matched by `g`. So `sensors/**` covers `sensors/*/t` and `sensors` itself;
/// `sensors/*` does not cover `sensors/**`; `a/*/c` does not cover `a/**`; `**` covers every
/// pattern; every pattern covers itself.
pub fn covers(grant: &Pattern, requested: &Pattern) -> bool {
    let g = segments(grant);
    let r = segments(requested);
    let mut i = 0;
    loop {
        match (g.get(i), r.get(i)) {
            // The grant takes any tail from here on, whatever the request's tail is.
            (Some(Seg::Rest), _) => return true,
            (None, None) => return true,
            // The request matches longer topics than the grant ever does.
            (None, Some(_)) => return false,
            // The request matches topics that end here (its own end, or `**` matching zero
            // segments); the grant needs at least one more segment.
            (Some(_), None) | (Some(_), Some(Seg::Rest)) => return false,
            (Some(Seg::One), Some(_)) => {}
            (Some(Seg::Lit(a)), Some(Seg::Lit(b))) if a == b => {}
            // A literal covers neither another literal nor `*` (which matches any segment).
            (Some(Seg::Lit(_)), Some(_)) => return false,
        }
        i += 1;
    }
}

/// The pattern matching exactly the topics both `a` and `b` match, or `None` when no topic
/// matches both. Used to list only the topics a token may see within a requested filter.
///
/// Guarantees: for every topic `t`, `intersect(a, b)` matches `t` if and only if both `a`
/// and `b` match `t`. The result may be longer than the 200 bytes of a topic (and then
/// possibly match no topic at all).
pub fn intersect(a: &Pattern, b: &Pattern) -> Option<Pattern> {
    let sa = segments(a);
    let sb = segments(b);
    let mut out: Vec<Seg<'_>> = Vec::with_capacity(sa.len().max(sb.len()));
    let mut i = 0;
    loop {
        match (sa.get(i), sb.get(i)) {
            // One side takes any tail: the other side's tail (possibly empty) decides.
            (Some(Seg::Rest), _) => {
                out.extend_from_slice(&sb[i..]);
                break;
            }
            (_, Some(Seg::Rest)) => {
                out.extend_from_slice(&sa[i..]);
                break;
            }
            (None, None) => break,
            (None, Some(_)) | (Some(_), None) => return None,
            (Some(Seg::One), Some(x)) | (Some(x), Some(Seg::One)) => out.push(*x),
            (Some(Seg::Lit(x)), Some(Seg::Lit(y))) => {
                if x != y {
                    return None;
                }
                out.push(Seg::Lit(x));
            }
        }
        i += 1;
    }
    let text = out
        .iter()
        .map(|s| match s {
            Seg::Lit(l) => *l,
            Seg::One => "*",
            Seg::Rest => "**",
        })
        .collect::<Vec<_>>()
        .join("/");
    // Its segments are the inputs' (valid) segments, so it parses. It may be longer than a
    // topic may be, yet match topics that are not: `a…/*/**` ∩ `*/b…/**` is `a…/b…/**`, three
    // bytes longer than `a…/b…`, which both match. So no length limit here.
    Pattern::parse_any_length(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::MAX_TOPIC_LEN;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).expect("test pattern")
    }

    fn c(grant: &str, requested: &str) -> bool {
        covers(&p(grant), &p(requested))
    }

    #[test]
    fn the_issues_examples_hold() {
        assert!(c("sensors/**", "sensors/*/t"));
        assert!(!c("sensors/*", "sensors/**"));
        assert!(!c("a/*/c", "a/**"));
        assert!(c("**", "a/b/c"));
        assert!(c("**", "**"));
        assert!(c("**", "a/**"));
        // Topics are never empty, so `**` and `*/**` match the same topics.
        assert!(c("*/**", "**"));
        assert!(!c("*/*/**", "**"));
    }

    #[test]
    fn double_star_covers_its_own_prefix_topic() {
        // `a/**` matches `a` (zero segments), so it covers it; `a/*` does not.
        assert!(c("a/**", "a"));
        assert!(!c("a/*", "a"));
        assert!(!c("a/*/**", "a"));
        assert!(c("a/*/**", "a/b"));
        assert!(!c("a", "a/**"));
    }

    #[test]
    fn literals_and_single_stars() {
        assert!(c("a/b", "a/b"));
        assert!(!c("a/b", "a/c"));
        assert!(c("a/*", "a/b"));
        assert!(c("a/*", "a/*"));
        assert!(!c("a/b", "a/*"));
        assert!(!c("a/*", "a/b/c"));
        assert!(!c("a/*/c", "a/b"));
        assert!(c("*/*", "a/b"));
        assert!(!c("*", "a/b"));
    }

    #[test]
    fn an_intersection_longer_than_a_topic_still_matches_the_topics_within_the_limit() {
        // Found by fuzz/fuzz_targets/auth_coverage.rs: the 203-byte intersection was refused
        // by the 200-byte limit, so `intersect` said no topic matches both, but the 200-byte
        // topic `x…/y…` does.
        let (x, y) = ("x".repeat(100), "y".repeat(99));
        let (a, b) = (p(&format!("{x}/*/**")), p(&format!("*/{y}/**")));
        let topic = format!("{x}/{y}");
        assert_eq!(topic.len(), MAX_TOPIC_LEN);
        assert!(a.matches_str(&topic) && b.matches_str(&topic));
        for both in [intersect(&a, &b), intersect(&b, &a)] {
            let both = both.expect("a topic matches both");
            assert_eq!(both.as_str(), format!("{topic}/**"));
            assert!(both.matches_str(&topic));
        }
    }

    #[test]
    fn intersections() {
        let i = |a: &str, b: &str| intersect(&p(a), &p(b)).map(|x| x.as_str().to_string());
        assert_eq!(i("a/**", "*/b"), Some("a/b".into()));
        assert_eq!(i("a/**", "a"), Some("a".into()));
        assert_eq!(i("**", "x/*"), Some("x/*".into()));
        assert_eq!(i("a/*/**", "*/b/c/**"), Some("a/b/c/**".into()));
        assert_eq!(i("a/b", "a/c"), None);
        assert_eq!(i("a/*", "a"), None);
        assert_eq!(i("a/*", "a/b/c"), None);
    }

    // ---- Brute force reference -------------------------------------------------------------
    //
    // Patterns are drawn over literals {a, b}, `*` and a trailing `**`, at most MAX_LEN
    // segments; topics are enumerated over {a, b, c} up to MAX_LEN + 2 segments. That is a
    // sound reference: if some topic is matched by `r` but not by `g`, one exists in this
    // range. Literal segments outside {a, b} behave alike in every pattern, so `c` stands for
    // all of them (and is the one that tells `*` from a literal); and beyond max(len(g),
    // len(r)) + 1 segments, adding more changes no pattern's answer (only a trailing `**`
    // matches there, for every length alike).

    const MAX_LEN: usize = 4;

    fn all_topics(depth: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut layer = vec![String::new()];
        for _ in 0..depth {
            let mut next = Vec::new();
            for prefix in &layer {
                for s in ["a", "b", "c"] {
                    let t = if prefix.is_empty() {
                        s.to_string()
                    } else {
                        format!("{prefix}/{s}")
                    };
                    next.push(t);
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    fn brute_covers(g: &Pattern, r: &Pattern, topics: &[String]) -> bool {
        topics.iter().all(|t| !r.matches_str(t) || g.matches_str(t))
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..MAX_LEN),
            prop::sample::select(vec!["a", "b", "*", "**"]),
        )
            .prop_map(|(head, last)| {
                let mut segs = head;
                segs.push(last);
                segs.join("/")
            })
    }

    proptest! {
        #[test]
        fn covers_agrees_with_brute_force(g in pattern_strategy(), r in pattern_strategy()) {
            let topics = all_topics(MAX_LEN + 2);
            let (gp, rp) = (p(&g), p(&r));
            prop_assert_eq!(covers(&gp, &rp), brute_covers(&gp, &rp, &topics), "grant {} request {}", g, r);
        }

        #[test]
        fn intersect_agrees_with_brute_force(a in pattern_strategy(), b in pattern_strategy()) {
            let (ap, bp) = (p(&a), p(&b));
            let both = intersect(&ap, &bp);
            for t in all_topics(MAX_LEN + 2) {
                let want = ap.matches_str(&t) && bp.matches_str(&t);
                let got = both.as_ref().is_some_and(|x| x.matches_str(&t));
                prop_assert_eq!(got, want, "{} ∩ {} on {}", a, b, t);
            }
        }

        #[test]
        fn a_topic_is_allowed_exactly_when_the_grant_matches_it(g in pattern_strategy(), t in pattern_strategy()) {
            // Publishing checks `matches`; subscribing to the same name checks `covers`: for a
            // wildcard-free request they must agree.
            let (gp, tp) = (p(&g), p(&t));
            if tp.as_topic().is_some() {
                prop_assert_eq!(covers(&gp, &tp), gp.matches_str(&t));
            }
        }
    }

    #[test]
    fn covers_agrees_with_brute_force_on_every_small_pair() {
        // Exhaustive over all patterns of up to three segments: no case left to chance.
        let mut patterns = Vec::new();
        for len in 1..=3 {
            let mut layer: Vec<Vec<&str>> = vec![Vec::new()];
            for _ in 0..len - 1 {
                layer = layer
                    .into_iter()
                    .flat_map(|v| {
                        ["a", "b", "*"].into_iter().map(move |s| {
                            let mut v = v.clone();
                            v.push(s);
                            v
                        })
                    })
                    .collect();
            }
            for head in layer {
                for last in ["a", "b", "*", "**"] {
                    let mut v = head.clone();
                    v.push(last);
                    patterns.push(p(&v.join("/")));
                }
            }
        }
        let topics = all_topics(5);
        for g in &patterns {
            for r in &patterns {
                assert_eq!(
                    covers(g, r),
                    brute_covers(g, r, &topics),
                    "grant {g} request {r}"
                );
            }
        }
    }
}
