//! HTTP message rules a proxy must apply, as pure functions over headers: hop-by-hop fields
//! (RFC 9110 §7.6.1), the Host a request is for and its syntax (RFC 3986, RFC 9112 §3.2),
//! Transfer-Encoding as a proxy may forward it (RFC 9112 §6.1). No Tollgate state.

use http::header::{self, HeaderName};
use http::HeaderValue;
use pingora_http::{RequestHeader, ResponseHeader};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the common non-standard ones. `Transfer-Encoding`
/// and `Content-Length` are left to pingora, which owns message framing; `Upgrade` is kept for
/// upgrade requests.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
];

/// Remove hop-by-hop headers and every header the `Connection` header names.
fn strip_hop_by_hop(headers: &http::HeaderMap, mut remove: impl FnMut(&str), keep_upgrade: bool) {
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(list) = value.to_str() {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                remove(name);
            }
        }
    }
}

/// Remove hop-by-hop fields from a response going to the client, and its `Server` field when
/// `hide_server`; `upgraded`: a 101 whose `Upgrade` must stay.
pub fn clean_response(resp: &mut ResponseHeader, upgraded: bool, hide_server: bool) {
    // One look at the (few) response headers decides what needs removing: most responses
    // carry only `Connection` and `Server` of these.
    // `named`: a Connection value other than `keep-alive` or `close` (which name no other
    // field; nearly every response has one of them alone).
    let (mut server, mut named, mut other) = (false, false, false);
    for (name, value) in resp.headers.iter() {
        if *name == header::SERVER {
            server = true;
        } else if *name == header::CONNECTION {
            let v = value.as_bytes();
            // The usual spellings first: a plain comparison, not a case-folding one.
            named |= !(v == b"keep-alive"
                || v == b"close"
                || v.eq_ignore_ascii_case(b"keep-alive")
                || v.eq_ignore_ascii_case(b"close"));
        } else if HOP_BY_HOP[1..].contains(name) {
            other = true;
        }
    }
    // The upstream's software never reaches the client (unless configured to).
    if server && hide_server {
        resp.remove_header(&header::SERVER);
    }
    if named {
        // Fields the upstream named in `Connection` are hop-by-hop too. `Connection` itself is
        // pingora's: rewritten on HTTP/1.1 (keep-alive or close; kept on a 101) and dropped on
        // HTTP/2, so it is left for pingora to set.
        let mut named = Vec::new();
        strip_hop_by_hop(
            &resp.headers,
            |n| {
                if !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close") {
                    named.push(n.to_string());
                }
            },
            upgraded,
        );
        for n in named {
            resp.remove_header(n.as_str());
        }
    }
    if other {
        for h in &HOP_BY_HOP[1..] {
            resp.remove_header(h);
        }
    }
}

/// The Host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
pub fn request_host(req: &RequestHeader) -> &str {
    if let Some(h) = req.uri.host() {
        return h;
    }
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// HTTP/1.x needs exactly one `Host` (routing depends on it, so HTTP/1.0 too), a plain
/// authority (no list, no userinfo, no spaces); HTTP/2 carries `:authority` (pingora checks it).
/// `hosts` is how many Host fields the request has, `host` the first one.
pub fn valid_host(req: &RequestHeader, hosts: usize, host: Option<&HeaderValue>) -> bool {
    if req.version == http::Version::HTTP_2 {
        return true;
    }
    match host {
        Some(host) if hosts == 1 => valid_authority(host.as_bytes()),
        _ => false,
    }
}

/// `host[:port]` as RFC 3986 writes it, without userinfo: an IP literal in brackets, or a
/// reg-name / IPv4 address of unreserved, sub-delims and `%`; a port of digits. Checked in
/// place (no allocation: this runs on every request).
fn valid_authority(h: &[u8]) -> bool {
    if h.first() == Some(&b'[') {
        let Some(close) = h.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &h[1..close];
        return !inside.is_empty()
            && inside
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && valid_port(&h[close + 1..]);
    }
    // One forward pass: every byte before the last `:` must be a reg-name byte (a `:` is not,
    // so an earlier one fails), every byte after it a digit.
    let (mut colon, mut ok) = (None, true);
    for (i, &b) in h.iter().enumerate() {
        if b == b':' {
            ok &= colon.is_none();
            colon = Some(i);
        } else if colon.is_none() {
            ok &= REG_NAME[usize::from(b)];
        }
    }
    let at = colon.unwrap_or(h.len());
    ok && at > 0 && valid_port(&h[at..])
}

/// Nothing, or `:` and at most five digits.
fn valid_port(port: &[u8]) -> bool {
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// The bytes of a reg-name or IPv4 address besides letters and digits (RFC 3986: the rest of
/// unreserved, sub-delims, and `%` of pct-encoded).
const REG_NAME_PUNCT: &[u8] = b"-._~!$&'()*+;=%";

/// Those bytes as a table: one load per byte of the Host value.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < REG_NAME_PUNCT.len() {
        t[REG_NAME_PUNCT[i] as usize] = true;
        i += 1;
    }
    t
};

/// Transfer-Encoding, when present, is exactly one `chunked`. pingora frames the body by the last
/// coding (400 unless it is chunked) but forwards `chunked` alone, so any other coding would reach
/// the backend mislabelled; and chunked must not be applied twice (RFC 9112 §6.1, §7). Called
/// only for requests that carry the field (see `admit`).
pub fn valid_transfer_encoding(req: &RequestHeader) -> bool {
    let mut codings = req
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => !req.headers.contains_key(header::TRANSFER_ENCODING),
        (Some(c), None) => c.eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "a-b_c~d.example",
            "xn--bcher-kva.example:1",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "user@example.com",
            "a,b",
            "a/b",
            "a b",
            "a:b:80",
            "example.com:80x",
            "example.com:123456",
            "[::1",
            "[]",
            "[::1]x",
            "[zz::1]",
            "exa\"mple",
            "a{b}",
            "a?b",
            "a#b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    /// The authority check as first written (two passes): the one-pass version must agree.
    fn authority_by_definition(h: &[u8]) -> bool {
        let (host, port) = if h.first() == Some(&b'[') {
            let Some(close) = h.iter().position(|&b| b == b']') else {
                return false;
            };
            let inside = &h[1..close];
            if inside.is_empty()
                || !inside
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return false;
            }
            (&h[..=close], &h[close + 1..])
        } else {
            match h.iter().rposition(|&b| b == b':') {
                Some(i) => (&h[..i], &h[i..]),
                None => (h, &h[h.len()..]),
            }
        };
        let host_ok = host.first() == Some(&b'[')
            || (!host.is_empty() && host.iter().all(|&b| REG_NAME[usize::from(b)]));
        valid_port(port) && host_ok
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_authority_check_agrees_with_the_definition(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "Z", "9", ":", "[", "]", "::1", "80", "123456", ".", "-", "@", " ", "%",
                    "\u{7f}", "é", "/", "_",
                ]),
                0..8,
            )
        ) {
            let h = parts.concat();
            proptest::prop_assert_eq!(valid_authority(h.as_bytes()), authority_by_definition(h.as_bytes()), "{:?}", h);
        }
    }

    #[test]
    fn the_host_byte_table_is_rfc_3986_reg_name() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"-._~!$&'()*+;=%".contains(&b);
            assert_eq!(REG_NAME[usize::from(b)], expected, "byte {b:#04x}");
        }
    }

    #[test]
    fn hop_by_hop_response_headers_are_removed() {
        let mut resp = ResponseHeader::build(200, None).expect("resp");
        resp.insert_header("Connection", "keep-alive, X-Secret")
            .expect("h");
        resp.insert_header("X-Secret", "1").expect("h");
        resp.insert_header("Keep-Alive", "timeout=5").expect("h");
        resp.insert_header("Server", "backend/1.2").expect("h");
        resp.insert_header("X-Kept", "1").expect("h");
        clean_response(&mut resp, false, true);
        for gone in ["x-secret", "keep-alive", "server"] {
            assert!(resp.headers.get(gone).is_none(), "{gone} kept");
        }
        assert!(resp.headers.get("x-kept").is_some());
        // Each of the other hop-by-hop fields, alone, is found and removed.
        for name in ["Proxy-Connection", "TE", "Trailer", "Keep-Alive"] {
            let mut resp = ResponseHeader::build(200, None).expect("resp");
            resp.insert_header(name, "x").expect("h");
            resp.insert_header("Date", "now").expect("h");
            clean_response(&mut resp, false, true);
            assert!(resp.headers.get(name).is_none(), "{name} kept");
            assert!(resp.headers.get("date").is_some());
        }
    }
}
