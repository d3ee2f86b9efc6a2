//! `topic::parse_cursor`, the reader of `Last-Event-ID`, `last_event_id`, `since` and the
//! WebSocket `since` string, against a reference written from its documentation and from
//! `cursorText` in schemas/defs.schema.json:
//!
//! - surrounding ASCII whitespace (`[\t\n\f\r ]`, not the vertical tab) is ignored;
//! - what is left is 1 to 20 decimal digits and nothing else (no sign, no `+`, no `_`);
//! - its value fits a u64.
//!
//! Properties: the parser agrees with the reference on every input; an accepted cursor
//! prints back (`to_string`) to a string it accepts with the same value; every u64 printed in
//! decimal, with any padding, parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire::topic::parse_cursor;

fn is_ws(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0c | b'\r' | b' ')
}

/// The slow reference: byte by byte, accumulating in u128 so overflow is seen, not wrapped.
fn reference(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let start = b.iter().position(|&c| !is_ws(c))?;
    let end = b.len() - b.iter().rev().position(|&c| !is_ws(c))?;
    let digits = &b[start..end];
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut v: u128 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u128::from(d - b'0');
    }
    u64::try_from(v).ok()
}

fuzz_target!(|data: &[u8]| {
    // Headers and query values reach the parser as text; bytes that are not UTF-8 are
    // refused before it, so only the UTF-8 view is interesting. Lossy keeps the fuzzer's
    // structure for everything else.
    let s = String::from_utf8_lossy(data);
    let got = parse_cursor(&s);
    assert_eq!(got, reference(&s), "parse_cursor({s:?})");
    if let Some(v) = got {
        assert_eq!(parse_cursor(&v.to_string()), Some(v));
    }
    // A u64 taken from the input, printed with padding picked from the input.
    if data.len() >= 9 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[1..9]);
        let v = u64::from_le_bytes(n);
        let pad = [" ", "\t", "\r\n", "\x0c", ""][usize::from(data[0] % 5)];
        assert_eq!(parse_cursor(&format!("{pad}{v}{pad}")), Some(v));
        // Leading zeros count towards the 20 digits the schema admits.
        let zeros = usize::from(data[0] >> 4);
        let padded = format!("{}{v}", "0".repeat(zeros));
        let want = (padded.len() <= 20).then_some(v);
        assert_eq!(parse_cursor(&padded), want, "{padded:?}");
    }
});
