//! Strict request validation, table-driven: raw requests that break (or test the edges of) the
//! HTTP/1.1 message syntax, each citing the rule it enforces, sent on a fresh connection through
//! the real gateway to a recording upstream. Every row states who answers (Tollgate's JSON
//! error, pingora's own plain answer, or the upstream through the gateway), whether the client
//! connection is closed after the answer, and exactly the bytes the upstream received (nothing,
//! for a refused request). A row whose connection stays open is followed by a good request on
//! the same connection, which must be answered by the upstream: the gateway is still in step with
//! the client.
//!
//! Who answers: pingora 0.9.1 parses the request head before any Tollgate hook runs and answers
//! what it cannot parse or frames ambiguously with its own plain `400` (and closes); Tollgate's
//! `admit` answers the rest with a JSON error. The table records which layer answers each row.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Who answered, and with what status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Tollgate's JSON error (`{"error": ...}`).
    Json(u16),
    /// pingora's own answer (no JSON body), before Tollgate's hooks ran.
    Plain(u16),
    /// The upstream's `200 ok`, through the gateway.
    Proxied,
}

struct Case {
    name: &'static str,
    /// The rule the row enforces.
    rfc: &'static str,
    raw: Vec<u8>,
    answer: Answer,
    /// The client connection is closed after the answer.
    closed: bool,
    /// Exactly what the upstream received; `None` = nothing at all.
    upstream: Option<Vec<u8>>,
}

fn case(
    name: &'static str,
    rfc: &'static str,
    raw: impl AsRef<[u8]>,
    answer: Answer,
    closed: bool,
    upstream: Option<&[u8]>,
) -> Case {
    Case {
        name,
        rfc,
        raw: raw.as_ref().to_vec(),
        answer,
        closed,
        upstream: upstream.map(<[u8]>::to_vec),
    }
}

/// Limits the table's gateway runs with (small, so the oversize rows stay small).
const MAX_URI: usize = 512;
const MAX_HEADER_BYTES: usize = 2048;
const MAX_HEADERS: usize = 12;
const MAX_LINE: usize = 600;

fn server_extra() -> String {
    format!(
        "  header_timeout: 2s\n  body_timeout: 2s\n  forwarded_headers: false\n  request_id_header: false\n  trace_context: false\n  access_log: \"off\"\n  max_uri_bytes: {MAX_URI}\n  max_header_bytes: {MAX_HEADER_BYTES}\n  max_headers: {MAX_HEADERS}\n  max_header_line_bytes: {MAX_LINE}\n"
    )
}

fn gateway_body(up: &RecordingUpstream) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{{ addr: \"{}\" }}]\n    retries: {{ attempts: 1 }}\n    timeouts: {{ read: 3s, total: 4s }}\nroutes:\n  - {{ name: r, upstream: u }}\n",
        up.addr
    )
}

/// A header line of exactly `len` bytes (`name: value`, line end excluded).
fn line_of(name: &str, len: usize) -> String {
    format!("{name}: {}", "v".repeat(len - name.len() - 2))
}

fn cases() -> Vec<Case> {
    use Answer::*;
    const OK: Option<&[u8]> = Some(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n");
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(MAX_URI));
    let uri_at_limit = format!("/{}", "a".repeat(MAX_URI - 1));
    let uri_at_limit_req = format!("GET {uri_at_limit} HTTP/1.1\r\nHost: gw\r\n\r\n");
    let long_line = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\n{}\r\n\r\n",
        line_of("X-Long", MAX_LINE + 1)
    );
    let line_at_limit = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\n{}\r\n\r\n",
        line_of("X-Long", MAX_LINE)
    );
    // Four 550-byte lines: each under the line limit, together over the section limit.
    let big_section = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\n{}\r\n\r\n",
        (0..4)
            .map(|i| line_of(&format!("X-Big-{i}"), 550))
            .collect::<Vec<_>>()
            .join("\r\n")
    );
    let many = |n: usize| {
        let mut r = String::from("GET / HTTP/1.1\r\nHost: gw\r\n");
        for i in 1..n {
            r.push_str(&format!("X-H{i}: v\r\n"));
        }
        r.push_str("\r\n");
        r
    };
    let at_count = many(MAX_HEADERS);
    let at_count_up = at_count.clone();
    vec![
        // ---- Empty lines before the request line (RFC 9112 §2.2)
        case(
            "leading_crlf",
            "RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line",
            "\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n",
            Proxied,
            false,
            OK,
        ),
        case(
            "leading_empty_lines",
            "RFC 9112 §2.2 (several, and bare LF, ignored as pingora's parser does)",
            "\r\n\n\r\nGET / HTTP/1.1\r\nHost: gw\r\n\r\n",
            Proxied,
            false,
            OK,
        ),
        case(
            "leading_bare_cr",
            "RFC 9112 §2.2: a bare CR is not an empty line -> 400 (pingora's parser refuses it)",
            "\rGET / HTTP/1.1\r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        // ---- Host (RFC 9112 §3.2, RFC 9110 §7.2, §4.2.4)
        case(
            "host_missing_http11",
            "RFC 9112 §3.2: HTTP/1.1 without Host -> 400",
            "GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
            Json(400),
            false,
            None,
        ),
        case(
            "host_missing_http10",
            "RFC 9112 §3.2 (Tollgate routes on Host: required on HTTP/1.0 too)",
            "GET / HTTP/1.0\r\nUser-Agent: t\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "host_duplicate_identical",
            "RFC 9112 §3.2: more than one Host -> 400",
            "GET / HTTP/1.1\r\nHost: gw\r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "host_duplicate_differing",
            "RFC 9112 §3.2: more than one Host -> 400",
            "GET / HTTP/1.1\r\nHost: gw\r\nHost: evil\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "host_list",
            "RFC 9110 §7.2: Host is one uri-host [:port], not a list",
            "GET / HTTP/1.1\r\nHost: gw, evil\r\n\r\n",
            Json(400),
            false,
            None,
        ),
        case(
            "host_userinfo",
            "RFC 9110 §4.2.4: no userinfo in an http authority",
            "GET / HTTP/1.1\r\nHost: user@gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "host_empty",
            "RFC 9110 §7.2: an empty Host names no authority to route on",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            Json(400),
            false,
            None,
        ),
        case(
            "host_with_path",
            "RFC 9110 §7.2: Host = uri-host [\":\" port]",
            "GET / HTTP/1.1\r\nHost: gw/evil\r\n\r\n",
            Json(400),
            false,
            None,
        ),
        case(
            "host_with_inner_space",
            "RFC 9110 §7.2: Host = uri-host [\":\" port]",
            "GET / HTTP/1.1\r\nHost: g w\r\n\r\n",
            Json(400),
            false,
            None,
        ),
        case(
            "host_with_port",
            "RFC 9110 §7.2 (valid: passed through unchanged)",
            "GET / HTTP/1.1\r\nHost: gw:8080\r\n\r\n",
            Proxied,
            false,
            Some(b"GET / HTTP/1.1\r\nHost: gw:8080\r\n\r\n"),
        ),
        case(
            "absolute_form_host_mismatch",
            "RFC 9112 §3.2.2: absolute-form authority must agree with Host",
            "GET http://evil/ HTTP/1.1\r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "absolute_form_userinfo",
            "RFC 9110 §4.2.4: no userinfo in the target",
            "GET http://u@gw/ HTTP/1.1\r\nHost: u@gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "absolute_form_agrees",
            "RFC 9112 §3.2.2 (valid: sent upstream in origin-form)",
            "GET http://gw/x?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n",
            Proxied,
            false,
            Some(b"GET /x?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n"),
        ),
        // ---- Transfer-Encoding (RFC 9112 §6.1, §6.3, §7)
        case(
            "te_on_http10",
            "RFC 9112 §6.1: Transfer-Encoding on HTTP/1.0 is faulty framing",
            "POST / HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "te_chunked_not_last",
            "RFC 9112 §6.3 (4): chunked must be the final coding",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "te_without_chunked",
            "RFC 9112 §6.3 (4): a request coding other than chunked -> 400",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "te_identity",
            "RFC 9112 §6.3 (4): identity is no longer a transfer coding",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: identity\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "te_chunked_twice_one_field",
            "RFC 9112 §6.1: chunked MUST NOT be applied more than once",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "te_chunked_twice_two_fields",
            "RFC 9112 §6.1: chunked MUST NOT be applied more than once",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "te_chunked",
            "RFC 9112 §7.1 (valid: chunked body forwarded chunked)",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "te_gzip_then_chunked",
            "RFC 9112 §6.1: a coding the gateway cannot forward (pingora would drop the gzip label) -> refused",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "te_chunked_any_case",
            "RFC 9112 §7: transfer-coding names are case-insensitive",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunk_extension",
            "RFC 9112 §7.1.1: chunk extensions are read, not forwarded",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunk_trailer",
            "RFC 9112 §7.1.2: trailer fields",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "chunk_size_invalid",
            "RFC 9112 §7.1: chunk-size = 1*HEXDIG (the head went upstream: that connection is closed)",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Json(400),
            true,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ),
        case(
            "chunk_size_overflow",
            "RFC 9112 §7.1: a chunk-size that cannot be represented (the head went upstream: that connection is closed)",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            Json(400),
            true,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ),
        // ---- Content-Length (RFC 9110 §8.6, RFC 9112 §6.3)
        case(
            "cl_negative",
            "RFC 9110 §8.6: Content-Length = 1*DIGIT",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_plus_sign",
            "RFC 9110 §8.6: Content-Length = 1*DIGIT",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +5\r\n\r\nhello",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_hex",
            "RFC 9110 §8.6: Content-Length = 1*DIGIT",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 0x5\r\n\r\nhello",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_empty",
            "RFC 9110 §8.6: Content-Length = 1*DIGIT",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: \r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_overflow",
            "RFC 9110 §8.6: a value that cannot be represented is invalid",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_duplicates_differ",
            "RFC 9112 §6.3 (5): differing Content-Lengths are unrecoverable",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_list_differs",
            "RFC 9112 §6.3 (5): differing Content-Lengths are unrecoverable",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5, 6\r\n\r\nhello!",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_duplicates_identical",
            "RFC 9110 §8.6: identical duplicates may be merged to one",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        case(
            "cl_list_identical",
            "RFC 9110 §8.6: identical duplicates may be merged to one",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5, 5\r\n\r\nhello",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        case(
            "cl_leading_zeros",
            "RFC 9110 §8.6: Content-Length = 1*DIGIT (leading zeros are digits)",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 005\r\n\r\nhello",
            Proxied,
            false,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 005\r\n\r\nhello"),
        ),
        case(
            "cl_and_te",
            "RFC 9112 §6.3 (3), §6.1: chunked wins, Content-Length is never forwarded, close after",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Proxied,
            true,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "te_and_cl",
            "RFC 9112 §6.3 (3), §6.1: chunked wins, Content-Length is never forwarded, close after",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Proxied,
            true,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ),
        case(
            "cl_and_te_not_chunked",
            "RFC 9112 §6.3 (4): a non-chunked final coding -> 400, whatever Content-Length says",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\nhello",
            Plain(400),
            true,
            None,
        ),
        case(
            "cl_then_pipelined_request",
            "RFC 9112 §9.3.2: bytes past the body are not a second request upstream",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n",
            Proxied,
            true,
            Some(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello"),
        ),
        // ---- Request line and target (RFC 9112 §3, §3.2; refused, never rewritten)
        case(
            "target_space",
            "RFC 9112 §3: no whitespace inside the request-target",
            "GET /a b HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "target_tab",
            "RFC 9112 §3: no whitespace inside the request-target",
            "GET /a\tb HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "target_nul",
            "RFC 9112 §3.2, RFC 3986 §2: no NUL in the target",
            "GET /a\0b HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "target_control",
            "RFC 9112 §3.2, RFC 3986 §2: no control characters in the target",
            "GET /a\x01b HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "target_del",
            "RFC 9112 §3.2, RFC 3986 §2: no DEL in the target",
            "GET /a\x7fb HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "target_bare_cr",
            "RFC 9112 §2.2: a bare CR is invalid",
            "GET /a\rb HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "request_line_double_space",
            "RFC 9112 §3: method SP request-target SP HTTP-version",
            "GET  / HTTP/1.1\r\nHost: gw\r\n\r\n",
            Json(400),
            true,
            None,
        ),
        case(
            "request_line_trailing_space",
            "RFC 9112 §3: method SP request-target SP HTTP-version",
            "GET / HTTP/1.1 \r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "request_line_no_target",
            "RFC 9112 §3: method SP request-target SP HTTP-version",
            "GET HTTP/1.1\r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "http_version_unknown",
            "RFC 9112 §2.3: HTTP-version = HTTP/DIGIT.DIGIT, 1.x only",
            "GET / HTTP/1.2\r\nHost: gw\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "target_too_long",
            "RFC 9110 §15.5.15: 414 beyond server.max_uri_bytes",
            long_uri,
            Json(414),
            false,
            None,
        ),
        case(
            "target_at_limit",
            "RFC 9110 §15.5.15 (valid: exactly server.max_uri_bytes)",
            uri_at_limit_req.clone(),
            Proxied,
            false,
            Some(uri_at_limit_req.as_bytes()),
        ),
        // ---- Header names (RFC 9110 §5.1, §5.6.2; RFC 9112 §5.1)
        case(
            "name_space_before_colon",
            "RFC 9112 §5.1: no whitespace between field name and colon",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A : 1\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "name_with_slash",
            "RFC 9110 §5.1: field-name = token",
            "GET / HTTP/1.1\r\nHost: gw\r\nX/Y: 1\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "name_with_at",
            "RFC 9110 §5.1: field-name = token",
            "GET / HTTP/1.1\r\nHost: gw\r\nX@Y: 1\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "name_non_ascii",
            "RFC 9110 §5.1: field-name = token",
            b"GET / HTTP/1.1\r\nHost: gw\r\nX\xffY: 1\r\n\r\n".as_slice(),
            Plain(400),
            true,
            None,
        ),
        case(
            "name_empty",
            "RFC 9110 §5.1: field-name = token (1*tchar)",
            "GET / HTTP/1.1\r\nHost: gw\r\n: v\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "name_underscore_dropped",
            "RFC 9110 §5.1 (Tollgate, as NGINX: names with _ dropped by default)",
            "GET / HTTP/1.1\r\nHost: gw\r\nX_Consumer_Id: root\r\nX-Kept: 1\r\n\r\n",
            Proxied,
            false,
            Some(b"GET / HTTP/1.1\r\nHost: gw\r\nX-Kept: 1\r\n\r\n"),
        ),
        // ---- Header values (RFC 9112 §5.2, RFC 9110 §5.5)
        case(
            "obs_fold_space",
            "RFC 9112 §5.2: obs-fold in a request -> 400",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n b\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "obs_fold_tab",
            "RFC 9112 §5.2: obs-fold in a request -> 400",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n\tb\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "value_bare_cr",
            "RFC 9110 §5.5: CR in a field value -> reject",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\rb\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "line_ends_bare_cr",
            "RFC 9112 §2.2: a bare CR is invalid",
            "GET / HTTP/1.1\r\nHost: gw\rX-A: 1\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "value_nul",
            "RFC 9110 §5.5: NUL in a field value -> reject",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\0b\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "value_control",
            "RFC 9110 §5.5: field-vchar excludes CTLs",
            "GET / HTTP/1.1\r\nHost: gw\r\nX-A: a\x01b\r\n\r\n",
            Plain(400),
            true,
            None,
        ),
        case(
            "bare_lf_line_ends",
            "RFC 9112 §2.2 (a recipient MAY accept bare LF: forwarded with CRLF)",
            "GET / HTTP/1.1\nHost: gw\n\n",
            Proxied,
            false,
            OK,
        ),
        // ---- Sizes (RFC 9110 §15.5.15 414, RFC 6585 §5 431)
        case(
            "header_line_too_long",
            "RFC 6585 §5: 431 beyond server.max_header_line_bytes",
            long_line,
            Json(431),
            false,
            None,
        ),
        case(
            "header_line_at_limit",
            "RFC 6585 §5 (valid: exactly server.max_header_line_bytes)",
            line_at_limit.clone(),
            Proxied,
            false,
            Some(line_at_limit.as_bytes()),
        ),
        case(
            "header_section_too_large",
            "RFC 6585 §5: 431 beyond server.max_header_bytes",
            big_section,
            Json(431),
            false,
            None,
        ),
        case(
            "header_count_too_many",
            "RFC 6585 §5: 431 beyond server.max_headers",
            many(MAX_HEADERS + 1),
            Json(431),
            false,
            None,
        ),
        case(
            "header_count_at_limit",
            "RFC 6585 §5 (valid: exactly server.max_headers)",
            at_count,
            Proxied,
            false,
            Some(at_count_up.as_bytes()),
        ),
        case(
            "header_count_beyond_parser",
            "RFC 6585 §5: past pingora's own 256-field parser limit",
            many(300),
            Plain(400),
            true,
            None,
        ),
        // ---- Hop-by-hop (RFC 9110 §7.6.1)
        case(
            "hop_by_hop_and_connection_named",
            "RFC 9110 §7.6.1: Connection options and hop-by-hop fields are not forwarded",
            "GET / HTTP/1.1\r\nHost: gw\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nX-Kept: 1\r\n\r\n",
            Proxied,
            false,
            Some(b"GET / HTTP/1.1\r\nHost: gw\r\nX-Kept: 1\r\n\r\n"),
        ),
        case(
            "connection_close",
            "RFC 9112 §9.6: close after the response; not forwarded (RFC 9110 §7.6.1)",
            "GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
            Proxied,
            true,
            OK,
        ),
        case(
            "h2c_upgrade_stripped",
            "RFC 9113 §3.1 / RFC 9110 §7.8: h2c upgrade is not forwarded",
            "GET / HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            Proxied,
            false,
            OK,
        ),
    ]
}

/// One response as the client read it.
#[derive(Debug)]
struct Response {
    status: u16,
    json: bool,
}

/// Read one complete response from `s` (skipping interim 1xx), or `None` on EOF/timeout.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Response> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
            let status = resp.code.unwrap_or(0);
            let cl = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            if (100..200).contains(&status) {
                buf.drain(..n);
                continue;
            }
            if buf.len() >= n + cl {
                let body: Vec<u8> = buf.drain(..n + cl).skip(n).collect();
                let json = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .is_some_and(|v| v["error"].is_string());
                return Some(Response { status, json });
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Wait for the peer to close `s`: `Ok(extra bytes)` on EOF or reset, `Err` if still open.
async fn wait_closed(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut extra = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(extra);
        };
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(extra),
            Ok(Ok(n)) => extra.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(extra),
        }
    }
}

const FOLLOW_UP: &[u8] = b"GET /follow-up HTTP/1.1\r\nHost: gw\r\n\r\n";

/// What happened to one row.
#[derive(Debug, PartialEq)]
struct Outcome {
    answer: Option<Answer>,
    closed: bool,
    upstream: Option<Vec<u8>>,
    /// Open rows: the follow-up request on the same connection was proxied.
    follow_up_ok: bool,
    /// A refused request whose head had already gone upstream: that upstream connection was
    /// closed, never pooled (true when nothing went upstream, or the request was proxied).
    partial_upstream_closed: bool,
}

/// What the upstream received since `mark`, once it has stopped changing (the gateway may
/// answer the client before its own write upstream lands) or equals `expected`.
async fn settled(
    up: &RecordingUpstream,
    mark: &Mark,
    expected: &Option<Vec<u8>>,
) -> Vec<(usize, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = up.since(mark);
    loop {
        let flat: Vec<u8> = last.iter().flat_map(|(_, b)| b.clone()).collect();
        if expected.as_ref().is_some_and(|e| *e == flat) || Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = up.since(mark);
        if now == last && expected.is_none() {
            return now;
        }
        last = now;
    }
}

async fn run(gw: &Gateway, up: &RecordingUpstream, c: &Case) -> Outcome {
    let mark = up.mark();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(&c.raw).await.expect("write");
    let mut buf = Vec::new();
    let answer = read_response(&mut s, &mut buf).await.map(|r| match r {
        Response { status, json: true } => Answer::Json(status),
        Response { status: 200, .. } => Answer::Proxied,
        Response { status, .. } => Answer::Plain(status),
    });
    let mut closed = false;
    let mut follow_up_ok = false;
    if c.closed {
        closed = wait_closed(&mut s, Duration::from_secs(3)).await.is_ok();
    }
    let upstream = settled(up, &mark, &c.upstream).await;
    let mut partial_upstream_closed = true;
    if answer != Some(Answer::Proxied) {
        for &(conn, _) in &upstream {
            let deadline = Instant::now() + Duration::from_secs(3);
            while !up.conn(conn).closed && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            partial_upstream_closed &= up.conn(conn).closed;
        }
    }
    if !c.closed {
        let mark = up.mark();
        let sent = s.write_all(FOLLOW_UP).await.is_ok();
        match read_response(&mut s, &mut buf).await {
            Some(Response { status: 200, .. }) if sent => {
                let got: Vec<u8> = up.since(&mark).into_iter().flat_map(|(_, b)| b).collect();
                follow_up_ok = got == FOLLOW_UP;
            }
            Some(_) => {}
            None => closed = true,
        }
    }
    let upstream =
        (!upstream.is_empty()).then(|| upstream.into_iter().flat_map(|(_, b)| b).collect());
    Outcome {
        answer,
        closed,
        upstream,
        follow_up_ok,
        partial_upstream_closed,
    }
}

fn show(bytes: &Option<Vec<u8>>) -> String {
    match bytes {
        None => "nothing".into(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_table() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::start_with(&gateway_body(&up), &server_extra()).await;
    let cases = cases();
    assert!(cases.len() >= 40, "{} rows", cases.len());
    let mut failures = Vec::new();
    let mut table = String::new();
    for c in &cases {
        let got = run(&gw, &up, c).await;
        table.push_str(&format!(
            "{:<34} {:<10} closed={:<5} upstream={}  [{}]\n",
            c.name,
            format!("{:?}", got.answer),
            got.closed,
            show(&got.upstream),
            c.rfc
        ));
        let want = Outcome {
            answer: Some(c.answer),
            closed: c.closed,
            upstream: c.upstream.clone(),
            follow_up_ok: !c.closed,
            partial_upstream_closed: true,
        };
        if got != want {
            failures.push(format!(
                "{} ({}):\n  want {:?} closed={} upstream={} follow_up_ok={}\n  got  {:?} closed={} upstream={} follow_up_ok={} partial_upstream_closed={}",
                c.name,
                c.rfc,
                want.answer,
                want.closed,
                show(&want.upstream),
                want.follow_up_ok,
                got.answer,
                got.closed,
                show(&got.upstream),
                got.follow_up_ok,
                got.partial_upstream_closed
            ));
        }
    }
    eprintln!("{table}");
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(!gw.log().contains("panicked"), "a panic was logged");
}

/// Send `raw` on a new connection and read one answer.
async fn one_shot(port: u16, raw: &[u8]) -> (TcpStream, Option<Response>) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(raw).await.expect("write");
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await;
    (s, r)
}

/// The connection an exchange reached the upstream on, once `want` bytes have arrived there.
async fn upstream_conn_with(up: &RecordingUpstream, mark: &Mark, want: &[u8]) -> usize {
    eventually(
        Duration::from_secs(5),
        "the upstream receiving the bytes",
        || async {
            let got = up.since(mark);
            (got.len() == 1 && got[0].1 == want).then(|| got[0].0)
        },
    )
    .await
}

/// A request body that fails mid-way (the client goes away, or stalls past `body_timeout`)
/// leaves the upstream connection with a partial request on it: it must be closed, never put
/// back in the pool, or the next request would be read by the backend as the rest of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_is_never_reused_after_a_body_failed_midway() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::start_with(&gateway_body(&up), &server_extra()).await;
    const GOOD: &[u8] = b"GET /good HTTP/1.1\r\nHost: gw\r\n\r\n";
    const PARTIAL: &[u8] =
        b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789";
    for client_leaves in [true, false] {
        // A good request first: its upstream connection goes back to the pool.
        let mark = up.mark();
        let (_s, r) = one_shot(gw.port, GOOD).await;
        assert_eq!(r.map(|r| r.status), Some(200));
        let pooled = upstream_conn_with(&up, &mark, GOOD).await;
        // The client can have the whole response before pingora puts the upstream connection
        // back in the pool; the request's end (its in-flight count released, after the pool)
        // says it is there.
        eventually(
            Duration::from_secs(5),
            "the good request's upstream connection back in the pool",
            || async {
                (gw.backend_field("in_flight").await == [serde_json::json!(0)]).then_some(())
            },
        )
        .await;
        // 10 of 100 body bytes; they reach the upstream (on the pooled connection).
        let mark = up.mark();
        let mut s = TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .expect("connect");
        s.write_all(PARTIAL).await.expect("write");
        let failed = upstream_conn_with(&up, &mark, PARTIAL).await;
        assert_eq!(
            failed, pooled,
            "the pooled connection was not reused at all"
        );
        if client_leaves {
            drop(s);
        } else {
            // Stalled past body_timeout (2 s): 408, and the client connection is closed.
            let mut buf = Vec::new();
            let r = read_response(&mut s, &mut buf).await.expect("an answer");
            assert_eq!((r.status, r.json), (408, true));
            assert!(wait_closed(&mut s, Duration::from_secs(3)).await.is_ok());
        }
        // The gateway closes that upstream connection...
        eventually(
            Duration::from_secs(5),
            "the upstream connection with a partial body closed",
            || async { up.conn(failed).closed.then_some(()) },
        )
        .await;
        // Nothing followed the partial request on it.
        assert!(up.conn(failed).bytes.ends_with(PARTIAL));
        assert_eq!(up.since(&mark), vec![(failed, PARTIAL.to_vec())]);
        // ...and the next request goes on a new one.
        let before = up.connections();
        let mark = up.mark();
        let (_s, r) = one_shot(gw.port, GOOD).await;
        assert_eq!(r.map(|r| r.status), Some(200));
        let next = upstream_conn_with(&up, &mark, GOOD).await;
        assert!(
            next >= before,
            "client_leaves={client_leaves}: the next request reused connection {next}"
        );
    }
    assert!(!gw.log().contains("panicked"), "a panic was logged");
}

/// A gateway with a short header deadline and a longer body deadline.
async fn deadline_gateway(up: &RecordingUpstream) -> Gateway {
    Gateway::start_with(
        &gateway_body(up),
        "  header_timeout: 1s\n  body_timeout: 5s\n  forwarded_headers: false\n  request_id_header: false\n  trace_context: false\n  access_log: \"off\"\n",
    )
    .await
}

/// `Expect: 100-continue`: the upstream's `100 Continue` reaches the client, whose body then
/// follows. The body is not a header section: its bytes (spaces, a bare CR, NUL) are not
/// syntax-checked and it is not under the header deadline (1 s here), only the body's (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_after_100_continue_is_not_a_header_section() {
    let up = RecordingUpstream::start().await;
    let gw = deadline_gateway(&up).await;
    let head =
        b"POST /up HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n";
    let mark = up.mark();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(head).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a 100 Continue in time")
            .expect("read");
        assert!(n > 0, "closed before 100 Continue");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // Half the body, a pause longer than the header deadline, then the rest.
    s.write_all(b"a b\rc").await.expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b" d\0ef").await.expect("write");
    let mut buf = Vec::new();
    let r = read_response(&mut s, &mut buf).await.expect("an answer");
    assert_eq!(r.status, 200);
    let body_request: Vec<u8> = up.since(&mark).into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(body_request, [&head[..], b"a b\rc d\0ef"].concat());
    // pingora closes a connection whose response began before the request body ended.
    assert!(wait_closed(&mut s, Duration::from_secs(3)).await.is_ok());
}

/// Open a WebSocket upgrade through `gw` and read its `101`.
async fn upgraded(gw: &Gateway) -> TcpStream {
    let mut s = gw.connect().await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a 101 in time")
            .expect("read");
        assert!(n > 0, "closed before 101");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// Send `frame` on an upgraded connection and read the upstream's echo of it (`started`: when
/// the frames began, for the failure message).
async fn echo(s: &mut TcpStream, frame: &[u8], gw: &Gateway, started: Instant) {
    s.write_all(frame).await.expect("write");
    let mut echoed = Vec::new();
    let mut chunk = [0u8; 1024];
    while echoed.len() < frame.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an echo in time")
            .expect("read");
        assert!(
            n > 0,
            "the upgraded connection was closed after {:?}; gateway log:\n{}",
            started.elapsed(),
            gw.log()
        );
        echoed.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(echoed, frame);
}

/// After `101 Switching Protocols` the connection carries another protocol: no header
/// deadline, no syntax check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_outlives_the_header_deadline() {
    let up = RecordingUpstream::start().await;
    let gw = deadline_gateway(&up).await;
    let mut s = upgraded(&gw).await;
    // Frames with no blank line in them, spread over more than the header deadline (1 s): the
    // pauses are the point of the test.
    let started = Instant::now();
    for frame in [&b"\x81\x05 a\rb\0"[..], b"\x81\x03xyz", b"\x81\x03end"] {
        echo(&mut s, frame, &gw, started).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// cloudflare/pingora#946, patched in `vendor/pingora-proxy`: when the backend's 101 is read
/// before the upgrade request's own (empty) body end, that end must not close the tunnel. This
/// backend writes its 101 as soon as it accepts, so the 101 is waiting before the request is even
/// sent; twenty upgrades in a row, each must echo a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_at_once_keeps_its_tunnel() {
    let addr = raw_backend(|mut c| async move {
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        if c.write_all(switched).await.is_err() {
            return;
        }
        // Skip the request head, then echo everything.
        let (mut buf, mut chunk, mut tunnel) = (Vec::new(), [0u8; 4096], false);
        loop {
            match c.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if !tunnel {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                buf.drain(..end + 4);
                tunnel = true;
            }
            if !buf.is_empty() && c.write_all(&std::mem::take(&mut buf)).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = Gateway::start_with(
        &format!("upstreams:\n  u:\n    backends: [{{ addr: \"{addr}\" }}]\nroutes:\n  - {{ name: r, upstream: u }}\n"),
        "  access_log: \"off\"\n",
    )
    .await;
    for _ in 0..20 {
        let mut s = upgraded(&gw).await;
        echo(&mut s, b"\x81\x02hi", &gw, Instant::now()).await;
    }
}

/// An upgraded connection is not a request body: it outlives `body_timeout` (2 s here) in total
/// as long as no single pause reaches it, and its bytes count against no body size limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_outlives_the_body_deadline() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::start_with(
        &gateway_body(&up).replace("upstream: u }", "upstream: u, max_body: 8 }"),
        "  header_timeout: 1s\n  body_timeout: 2s\n  access_log: \"off\"\n",
    )
    .await;
    let mut s = upgraded(&gw).await;
    // Seven frames 500 ms apart: 3 s in all, past the 2 s body deadline, and 35 bytes, past
    // the route's 8-byte body limit.
    let started = Instant::now();
    for _ in 0..7 {
        echo(&mut s, b"\x81\x03abc", &gw, started).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2));
}

/// The limits' defaults: one header line up to 8 KiB (`server.max_header_line_bytes`), and the
/// setting is range-checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_line_limit_defaults_to_8_kib() {
    let up = RecordingUpstream::start().await;
    let gw = Gateway::start_with(&gateway_body(&up), "").await;
    for (len, status, json) in [(8 * 1024, 200, false), (8 * 1024 + 1, 431, true)] {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: gw\r\n{}\r\n\r\n",
            line_of("X-Long", len)
        );
        let (_s, r) = one_shot(gw.port, raw.as_bytes()).await;
        let r = r.expect("an answer");
        assert_eq!((r.status, r.json), (status, json), "a {len}-byte line");
    }
    let config = |v: &str| {
        format!("server:\n  listen: [\"127.0.0.1:8080\"]\n  max_header_line_bytes: {v}\nupstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\nroutes:\n  - {{ name: r, upstream: u }}\n")
    };
    let path = std::path::Path::new("t.yaml");
    let loaded = tollgate::config::load_str(path, &config("16KiB")).expect("valid");
    assert_eq!(loaded.server.max_header_line_bytes, 16 * 1024);
    for bad in ["100", "2MiB"] {
        let errs = tollgate::config::load_str(path, &config(bad)).expect_err(bad);
        assert!(
            errs.iter()
                .any(|e| e.field == "server.max_header_line_bytes"),
            "{errs:?}"
        );
    }
}
