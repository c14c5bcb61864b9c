//! The guard's request-head scanner on any bytes: never a panic; the same verdict whether the
//! bytes arrive at once or in two reads; and a head it passes is never one pingora 0.9.1 would
//! rewrite before Tollgate sees it (its request-line escaping, mirrored below).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use percent_encoding::{AsciiSet, CONTROLS};
use tollgate::http::head::{scan_request_head, HeadScanner};

/// pingora-core 0.9.1 `protocols/http/v1/server.rs`: when httparse fails on the request line
/// with a token or version error, pingora percent-encodes these bytes of the target and parses
/// again.
const URI_ESC_CHARSET: &AsciiSet = &CONTROLS.add(b' ').add(b'<').add(b'>').add(b'"');

fn request_line() -> &'static regex::bytes::Regex {
    static RE: OnceLock<regex::bytes::Regex> = OnceLock::new();
    RE.get_or_init(
        || match regex::bytes::Regex::new(r"^\w+ (?P<uri>.+) HTTP/\d(?:\.\d)?") {
            Ok(re) => re,
            Err(e) => panic!("{e}"),
        },
    )
}

/// Would pingora accept `head` only after rewriting its target?
fn pingora_would_rewrite(head: &[u8]) -> bool {
    let parse = |buf: &[u8]| {
        let mut headers = [httparse::EMPTY_HEADER; 256];
        httparse::Request::new(&mut headers)
            .parse(buf)
            .map(|s| s.is_complete())
    };
    match parse(head) {
        Err(httparse::Error::Token) | Err(httparse::Error::Version) => {}
        _ => return false,
    }
    let Some(uri) = request_line().captures(head).and_then(|c| c.name("uri")) else {
        return false;
    };
    let mut escaped = head[..uri.start()].to_vec();
    for piece in percent_encoding::percent_encode(uri.as_bytes(), URI_ESC_CHARSET) {
        escaped.extend_from_slice(piece.as_bytes());
    }
    if escaped.len() == uri.end() {
        return false; // nothing escaped: pingora answers 400
    }
    escaped.extend_from_slice(&head[uri.end()..]);
    matches!(parse(&escaped), Ok(true))
}

fuzz_target!(|data: &[u8]| {
    let whole = scan_request_head(data);
    if let Some(end) = whole.end {
        assert!(end <= data.len());
        assert_eq!(scan_request_head(&data[..end]), whole);
    }
    // The same bytes in two reads, cut where the first byte says.
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut scan = HeadScanner::default();
    let end = match scan.feed(&data[..cut]) {
        Some(n) => Some(n),
        None => scan.feed(&data[cut..]).map(|n| n + cut),
    };
    assert_eq!(end, whole.end);
    assert_eq!(scan.malformed(), whole.malformed);
    // What the guard lets through reaches Tollgate as the client sent it.
    if let (Some(end), false) = (whole.end, whole.malformed) {
        assert!(
            !pingora_would_rewrite(&data[..end]),
            "passed, but pingora would rewrite: {:?}",
            String::from_utf8_lossy(&data[..end])
        );
    }
});
