//! The syntax check on HTTP/1 request heads that `front` runs before pingora parses them: what
//! pingora would repair, or a backend could read differently, is flagged (and later refused).
//! Pure byte logic: no I/O, no state beyond one head.
//!
//! Why a scanner of our own and not `httparse` (which pingora itself parses with): it was
//! compared with a strict `httparse::Request` parse run once when the blank line is seen — over
//! the whole malformed-request table (`tests/gateway/malformed.rs`, every row also cut in two at
//! every byte), the fuzz corpus, and six million generated heads. Where the end of the head is
//! concerned they agree everywhere, and everything the scanner flags httparse refuses too (the
//! `httparse_refuses_what_the_scanner_flags` property below keeps it so). The verdicts differ
//! in one direction only: httparse also refuses heads the scanner lets through, each of which
//! pingora's own parse (httparse) then refuses with a 400 before anything goes upstream:
//!
//! | the scanner passes, httparse refuses | example |
//! |---|---|
//! | a version other than `HTTP/1.0` / `HTTP/1.1` | `GET / HTTP/1.2`, `GET / http/1.1` |
//! | bytes after the version | `GET / HTTP/1.1x` |
//! | a method that is not a token, or none | `G(T / HTTP/1.1`, ` / HTTP/1.1` |
//! | an empty or non-UTF-8 target | `GET  HTTP/1.1`, `GET /\xff HTTP/1.1` |
//! | a field name that is not a token, or no colon | `X/Y: 1`, `X-A : 1`, `Foo` |
//! | whitespace before the first field line | `GET / HTTP/1.1\r\n Host: x` |
//! | a control byte or DEL in a field value | `X: a\x01b` |
//! | more than 256 field lines | pingora's header limit |
//!
//! So replacing the scanner would change no answer Tollgate gives; it would cost more per head
//! (an httparse-based replacement also needs its own end-of-head finder for heads that arrive
//! in pieces; figures in docs/security.md) and the scanner's incremental verdict (a head is
//! judged as its bytes arrive, never re-parsed per read) would have to be rebuilt around it.
//! The scanner stays; the `request_head` fuzz target and the proptests below hold it to its
//! definition and to httparse.

/// The syntax check on one HTTP/1 request head (request line, header fields, blank line), fed
/// incrementally as bytes arrive. It flags what pingora would repair or read differently from
/// a backend: a request line other than exactly `METHOD SP target SP version`, control bytes
/// (NUL, CR, tab, ...) in the request line, NUL anywhere, a bare CR, and obs-fold (a header line
/// starting with a space or tab). Bare LF line endings are tolerated, as pingora accepts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadScanner {
    /// Line number within the section (0 = request line).
    line: u32,
    /// Bytes on the current line, CR excluded.
    len: u32,
    /// Spaces seen on the request line.
    spaces: u8,
    /// The previous byte was CR.
    cr: bool,
    /// Something flagged so far.
    bad: bool,
}

impl HeadScanner {
    /// Feed the next bytes of the head. When the blank line ending the head is among them,
    /// returns how many of `bytes` belong to the head (the rest is body or the next request)
    /// and the scanner must not be fed again; otherwise `None`.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        if self.line == 0 && self.len == 0 && !self.cr {
            // Empty lines before the request line are ignored (RFC 9112 §2.2: a client may send
            // a CRLF after a request body), as pingora's parser does. As in `byte`, a line of
            // CRs only counts as empty (two or more are a bare CR, flagged).
            // A whole request line in this read (the common case): one tight pass instead of
            // the byte-at-a-time state machine.
            while let Some(nl) = memchr::memchr(b'\n', &bytes[i..]) {
                let raw = &bytes[i..i + nl];
                i += nl + 1;
                if raw.iter().all(|&b| b == b'\r') {
                    self.bad |= raw.len() > 1;
                    continue;
                }
                let line = raw.strip_suffix(b"\r").unwrap_or(raw);
                let (spaces, control) = line_stats(line);
                // Not exactly two spaces, or a control byte (NUL, a bare CR, tab...).
                self.bad |= spaces != 2 || control;
                self.spaces = u8::try_from(spaces).unwrap_or(u8::MAX);
                self.line = 1;
                break;
            }
        }
        while i < bytes.len() {
            if self.line > 0 {
                // Inside header lines only CR, LF and NUL matter: jump to the next of them
                // (memchr: the whole section costs a few instructions per 16 bytes).
                let rest = &bytes[i..];
                let skip = if matches!(rest[0], b'\r' | b'\n' | 0) {
                    0
                } else {
                    memchr::memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len())
                };
                if skip > 0 {
                    if self.cr {
                        self.bad = true; // bare CR
                    }
                    if self.len == 0 && self.line > 1 && matches!(rest[0], b' ' | b'\t') {
                        self.bad = true; // obs-fold
                    }
                    self.cr = false;
                    self.len = self
                        .len
                        .saturating_add(u32::try_from(skip).unwrap_or(u32::MAX));
                    i += skip;
                    if i == bytes.len() {
                        break;
                    }
                }
                if !self.cr && bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    // A CRLF line end, taken whole.
                    if self.len == 0 {
                        return Some(i + 2); // the blank line ending the head
                    }
                    self.line = self.line.saturating_add(1);
                    self.len = 0;
                    i += 2;
                    continue;
                }
            }
            if self.byte(bytes[i]) {
                return Some(i + 1);
            }
            i += 1;
        }
        None
    }

    /// One byte of the head; true at the blank line that ends it.
    fn byte(&mut self, b: u8) -> bool {
        if self.cr && b != b'\n' {
            self.bad = true; // bare CR
        }
        match b {
            b'\r' => {
                self.cr = true;
                return false;
            }
            b'\n' => {
                self.cr = false;
                if self.len == 0 && self.line == 0 {
                    // An empty line before the request line: ignored (see `feed`).
                    return false;
                }
                if self.len == 0 && self.line > 0 {
                    // The blank line: anything after it is body (or a pipelined request
                    // pingora already holds in its buffer).
                    return true;
                }
                if self.line == 0 && self.spaces != 2 {
                    self.bad = true; // the request line is exactly METHOD SP target SP version
                }
                if self.len > 0 || self.line == 0 {
                    self.line = self.line.saturating_add(1);
                }
                self.len = 0;
                return false;
            }
            0 => self.bad = true,
            b' ' | b'\t' if self.len == 0 && self.line > 1 => self.bad = true, // obs-fold
            b' ' if self.line == 0 => self.spaces = self.spaces.saturating_add(1),
            _ if self.line == 0 && (b < 0x20 || b == 0x7f) => self.bad = true,
            _ => {}
        }
        self.cr = false;
        self.len = self.len.saturating_add(1);
        false
    }

    /// The head broke the syntax rules (so far).
    pub fn malformed(&self) -> bool {
        self.bad
    }
}

/// The spaces in a request line, and whether it has a control byte (below 0x20, or DEL), eight
/// bytes at a time (SWAR: exact per-byte tests with no carries between bytes).
fn line_stats(line: &[u8]) -> (usize, bool) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    /// The high bit of every byte of `w` that is zero (exact).
    fn zero_bytes(w: u64) -> u64 {
        !(((w & !HI) + !HI) | w) & HI
    }
    let word = |w: u64| {
        let spaces = zero_bytes(w ^ (LO * u64::from(b' '))).count_ones() as usize;
        // Below 0x20: a clear high bit, and adding 0x60 to the low seven bits leaves it clear.
        let low = !((w & !HI) + LO * 0x60) & !w & HI;
        let del = zero_bytes(w ^ (LO * 0x7f));
        (spaces, low | del != 0)
    };
    let (mut spaces, mut control) = (0, false);
    let mut chunks = line.chunks_exact(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let (s, c) = word(u64::from_le_bytes(b));
        spaces += s;
        control |= c;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Padded with a byte that is neither a space nor a control byte.
        let mut b = [b'a'; 8];
        b[..rest.len()].copy_from_slice(rest);
        let (s, c) = word(u64::from_le_bytes(b));
        spaces += s;
        control |= c;
    }
    (spaces, control)
}

/// The verdict on a request head given whole (see [`HeadScanner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadVerdict {
    /// Length of the head including its blank line; `None` when the head is incomplete.
    pub end: Option<usize>,
    /// The syntax check failed (within the head, or in the bytes seen so far if incomplete).
    pub malformed: bool,
}

/// Scan `bytes` as the start of a request head: the guard's check, as a pure function (used by
/// the tests and the fuzz target; `HeaderDeadline` feeds the same scanner read by read).
pub fn scan_request_head(bytes: &[u8]) -> HeadVerdict {
    let mut scan = HeadScanner::default();
    let end = scan.feed(bytes);
    HeadVerdict {
        end,
        malformed: scan.malformed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The scanner one byte at a time (the definition the fast path must agree with).
    fn bytewise(bytes: &[u8]) -> (Option<usize>, bool) {
        let mut s = HeadScanner::default();
        for (i, &b) in bytes.iter().enumerate() {
            if s.byte(b) {
                return (Some(i + 1), s.bad);
            }
        }
        (None, s.bad)
    }

    /// The scanner fed in chunks, as reads deliver them.
    fn chunked(bytes: &[u8], cuts: &[usize]) -> (Option<usize>, bool) {
        let mut s = HeadScanner::default();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        for cut in cuts {
            if cut <= at {
                continue;
            }
            if let Some(n) = s.feed(&bytes[at..cut]) {
                return (Some(at + n), s.bad);
            }
            at = cut;
        }
        (None, s.bad)
    }

    proptest! {
        #[test]
        fn the_fast_scan_agrees_with_the_bytewise_one(
            parts in proptest::collection::vec(
                prop::sample::select(vec![
                    &b"GET / HTTP/1.1"[..], b"\r\n", b"\n", b"\r", b"Host: a", b" ", b"\t",
                    b"\0", b"X-A: b", b"\x7f", b"\x01", b":", b"abc",
                ]),
                0..24,
            ),
            cuts in proptest::collection::vec(0usize..512, 0..6),
        ) {
            let bytes: Vec<u8> = parts.concat();
            prop_assert_eq!(chunked(&bytes, &cuts), bytewise(&bytes));
        }
    }

    #[test]
    fn scan_request_head_agrees_with_the_stream_scanner() {
        let good = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX: y\r\n\r\nbody";
        assert_eq!(
            scan_request_head(good),
            HeadVerdict {
                end: Some(good.len() - 4),
                malformed: false
            }
        );
        assert_eq!(scan_request_head(b"GET / HTTP/1.1\r\nHost").end, None);
        assert!(scan_request_head(b"GET /a\x01 HTTP/1.1\r\n").malformed);
        // Fed in any two pieces, the scanner says the same as in one.
        for cut in 0..=good.len() {
            let mut s = HeadScanner::default();
            let end = match s.feed(&good[..cut]) {
                Some(n) => Some(n),
                None => s.feed(&good[cut..]).map(|n| n + cut),
            };
            assert_eq!(end, Some(good.len() - 4), "cut at {cut}");
            assert!(!s.malformed());
        }
    }

    #[test]
    fn line_stats_agree_with_the_bytewise_definition() {
        let bytewise = |line: &[u8]| {
            let spaces = line.iter().filter(|&&b| b == b' ').count();
            (spaces, line.iter().any(|&b| b < 0x20 || b == 0x7f))
        };
        // Every byte value, alone and in every position of a 1..=17 byte line.
        for len in 1..=17usize {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut line = vec![b'x'; len];
                    line[pos] = b;
                    assert_eq!(line_stats(&line), bytewise(&line), "{b:#x} at {pos}/{len}");
                }
            }
        }
        assert_eq!(line_stats(b""), (0, false));
        assert_eq!(line_stats(b"GET / HTTP/1.1"), (2, false));
        assert_eq!(line_stats(b"GET /\x7f\x80\xff  HTTP/1.1\x1f"), (3, true));
    }

    proptest! {
        /// Differential check against `httparse` (what pingora parses with): whatever the
        /// scanner flags in a complete head, httparse refuses; where both find a complete head,
        /// they agree where it ends.
        #[test]
        fn httparse_refuses_what_the_scanner_flags(
            parts in proptest::collection::vec(
                prop::sample::select(vec![
                    &b"GET / HTTP/1.1"[..], b"GET /a HTTP/1.1\r\n", b"\r\n", b"\n", b"\r",
                    b"Host: a", b" ", b"\t", b"\0", b"X-A: b", b"\x7f", b"\x01", b":", b"abc",
                    b"\r\n\r\n",
                ]),
                0..24,
            ),
        ) {
            let bytes: Vec<u8> = parts.concat();
            let verdict = scan_request_head(&bytes);
            let mut fields = [httparse::EMPTY_HEADER; 256];
            let mut req = httparse::Request::new(&mut fields);
            let parsed = req.parse(&bytes);
            if let Some(end) = verdict.end {
                if verdict.malformed {
                    prop_assert!(parsed.is_err(), "{:?}: httparse took {:?}", String::from_utf8_lossy(&bytes), parsed);
                }
                if let Ok(httparse::Status::Complete(n)) = parsed {
                    prop_assert_eq!(n, end, "{:?}", String::from_utf8_lossy(&bytes));
                }
            }
        }

        #[test]
        fn line_stats_agree_on_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            let spaces = line.iter().filter(|&&b| b == b' ').count();
            let control = line.iter().any(|&b| b < 0x20 || b == 0x7f);
            prop_assert_eq!(line_stats(&line), (spaces, control));
        }
    }

    #[test]
    fn many_spaces_on_the_request_line_never_count_as_two() {
        // 258 spaces once wrapped a u8 counter back to 2 (and overflowed in debug builds).
        let mut raw = b"GET".to_vec();
        raw.extend(std::iter::repeat_n(b' ', 258));
        raw.extend_from_slice(b"/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(scan_request_head(&raw).malformed);
    }
}
