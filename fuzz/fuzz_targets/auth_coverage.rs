//! `auth::coverage::covers` and `auth::coverage::intersect` against brute force, the
//! reference idea of the proptests in src/auth/coverage.rs, with literals of any length (the
//! proptests only use `a` and `b`), so the 200-byte limit on names comes into play.
//!
//! Patterns are built from the input: up to four segments drawn from {`a`, `b`, a long
//! literal of `x`, a long literal of `y`, `*`} and a last one that may also be `**`. Topics
//! are every string of up to max(len) + 1 segments over the literals of both patterns and one
//! literal neither has; by the argument in src/auth/coverage.rs a counterexample, if any,
//! shows among them.
//!
//! Properties:
//! - `covers(g, r)` is true exactly when every topic `r` matches is matched by `g` (and so,
//!   the safety half: a grant that "covers" never lets through a topic it does not match);
//! - for every topic (at most 200 bytes), `intersect(a, b)` matches it exactly when both
//!   `a` and `b` do;
//! - `covers(p, p)`, `covers("**", p)`, and `covers(g, r)` implies `intersect(g, r)`
//!   matches exactly what `r` matches.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use tidewire::auth::coverage::{covers, intersect};
use tidewire::topic::{Pattern, MAX_TOPIC_LEN};

/// A literal that no built pattern holds: it stands for every other segment.
const FRESH: &str = "z";

fn build(input: &mut Input<'_>, long_x: &str, long_y: &str) -> String {
    let n = usize::from(input.byte() % 4) + 1;
    let mut segs = Vec::with_capacity(n);
    for i in 0..n {
        let last = i == n - 1;
        let pick = input.byte() % if last { 6 } else { 5 };
        segs.push(match pick {
            0 => "a",
            1 => "b",
            2 => long_x,
            3 => long_y,
            4 => "*",
            _ => "**",
        });
    }
    segs.join("/")
}

fn all_topics(alphabet: &[&str], depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut layer = vec![String::new()];
    for _ in 0..depth {
        let mut next = Vec::with_capacity(layer.len() * alphabet.len());
        for prefix in &layer {
            for s in alphabet {
                next.push(if prefix.is_empty() {
                    (*s).to_string()
                } else {
                    format!("{prefix}/{s}")
                });
            }
        }
        out.extend(next.iter().cloned());
        layer = next;
    }
    out
}

fn segs(p: &Pattern) -> usize {
    p.as_str().split('/').count()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let long_x = "x".repeat(usize::from(input.byte()) % MAX_TOPIC_LEN + 1);
    let long_y = "y".repeat(usize::from(input.byte()) % MAX_TOPIC_LEN + 1);
    let g_text = build(&mut input, &long_x, &long_y);
    let r_text = build(&mut input, &long_x, &long_y);
    let (Ok(g), Ok(r)) = (Pattern::parse(&g_text), Pattern::parse(&r_text)) else {
        // Too long: only the parser's business (see the topic_pattern target).
        return;
    };

    let mut alphabet: Vec<&str> = vec![FRESH];
    for s in g_text.split('/').chain(r_text.split('/')) {
        if s != "*" && s != "**" && !alphabet.contains(&s) {
            alphabet.push(s);
        }
    }
    let depth = segs(&g).max(segs(&r)) + 1;
    let topics = all_topics(&alphabet, depth);

    // covers: exact against brute force over the (unbounded) topic strings.
    let brute = topics.iter().all(|t| !r.matches_str(t) || g.matches_str(t));
    let got = covers(&g, &r);
    assert_eq!(got, brute, "covers({g_text:?}, {r_text:?})");

    // intersect: exact on every topic that can exist (at most 200 bytes), in both orders.
    let both = intersect(&g, &r);
    for (a, b, i) in [(&g, &r, &both), (&r, &g, &intersect(&r, &g))] {
        for t in topics.iter().filter(|t| t.len() <= MAX_TOPIC_LEN) {
            let want = a.matches_str(t) && b.matches_str(t);
            let have = i.as_ref().is_some_and(|p| p.matches_str(t));
            assert_eq!(have, want, "intersect({a:?}, {b:?}) = {i:?} on topic {t:?}");
        }
    }
    if got {
        if let Some(i) = &both {
            for t in &topics {
                assert_eq!(
                    i.matches_str(t),
                    r.matches_str(t),
                    "{i:?} vs {r:?} on {t:?}"
                );
            }
        }
    }

    // Laws that need no brute force.
    assert!(covers(&g, &g) && covers(&r, &r), "a pattern covers itself");
    let all = Pattern::parse("**").expect("`**` is a pattern");
    assert!(
        covers(&all, &g) && covers(&all, &r),
        "`**` covers every pattern"
    );
});
