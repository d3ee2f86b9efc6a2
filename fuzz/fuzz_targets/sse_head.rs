//! `http::h1_stream::parse_head`, which decides from the first bytes of a cleartext
//! connection whether the lean event-stream path serves it or hyper does, and builds the
//! request it serves. Inputs are raw bytes as a client sends them.
//!
//! Properties:
//! - it never panics, on any bytes;
//! - `Stream` only for a complete head that starts `GET /v1/sse` followed by `?` or a space,
//!   over HTTP/1.1 (the request says so), whose request carries path `/v1/sse`, no field that
//!   announces a body, an upgrade or `Expect`, and every header field of the head (httparse
//!   agrees on the count);
//! - anything that does not start like such a request line is `Other` at once, so hyper gets
//!   every other request unchanged;
//! - it is prefix-consistent: each strict prefix of a head it serves is `Partial` (the head
//!   is never taken before it is complete), and the same bytes with more after them (a
//!   pipelined request) are served the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire::http::h1_stream::{parse_head, Head};

const LINE: &[u8] = b"GET /v1/sse";

fuzz_target!(|data: &[u8]| {
    let n = data.len().min(LINE.len());
    let starts_like_ours = data[..n] == LINE[..n]
        && data
            .get(LINE.len())
            .is_none_or(|b| matches!(b, b' ' | b'?'));
    match parse_head(data) {
        Head::Other => {}
        Head::Partial => assert!(starts_like_ours, "Partial for {data:?}"),
        Head::Stream(req) => {
            assert!(starts_like_ours, "served {data:?}");
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(req.version(), http::Version::HTTP_11);
            assert_eq!(req.uri().path(), "/v1/sse");
            for name in ["transfer-encoding", "upgrade", "expect"] {
                assert!(!req.headers().contains_key(name), "{name} in {data:?}");
            }
            if let Some(len) = req.headers().get("content-length") {
                assert_eq!(len, "0");
            }
            let mut fields = [httparse::EMPTY_HEADER; 128];
            let mut check = httparse::Request::new(&mut fields);
            let end = match check.parse(data) {
                Ok(httparse::Status::Complete(end)) => end,
                other => panic!("served a head httparse reads as {other:?}"),
            };
            assert_eq!(req.headers().len(), check.headers.len());
            // Every strict prefix of the head asks for more.
            for cut in [0, end / 2, end.saturating_sub(1)] {
                if cut < end {
                    assert!(
                        matches!(parse_head(&data[..cut]), Head::Partial),
                        "prefix {cut} of a served head"
                    );
                }
            }
            // Bytes after the head change nothing.
            let mut more = data[..end].to_vec();
            more.extend_from_slice(b"GET /other HTTP/1.1\r\n\r\n");
            assert!(matches!(parse_head(&more), Head::Stream(_)));
        }
    }
});
