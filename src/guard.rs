//! Slow-client defence for request headers. Pingora's read timeout applies to each read, so a
//! client sending one byte per second never trips it. This wraps every accepted connection in a
//! stream that puts a deadline on the whole header section of each HTTP/1 request: from accept
//! (first request) or from the first byte after a response (keep-alive requests) to the blank
//! line ending the headers. Past it, reads fail and pingora closes the connection; other
//! connections are untouched. HTTP/2 (prior knowledge) connections are passed through as they
//! are. Body and idle timeouts are set per request in `proxy`.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

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
            // A whole request line in this read (the common case): one tight pass instead of
            // the byte-at-a-time state machine.
            if let Some(nl) = memchr::memchr(b'\n', bytes) {
                let line = &bytes[..nl];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let (mut spaces, mut control) = (0usize, false);
                for &b in line {
                    // Bitwise, not short-circuit: the loop stays branch-free.
                    spaces += usize::from(b == b' ');
                    control |= (b < 0x20) | (b == 0x7f);
                }
                // Empty, not exactly two spaces, or a control byte (NUL, a bare CR, tab...).
                self.bad |= line.is_empty() || spaces != 2 || control;
                self.spaces = u8::try_from(spaces).unwrap_or(u8::MAX);
                self.line = 1;
                i = nl + 1;
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

enum Phase {
    /// Reading a header section.
    Header(HeadScanner),
    /// Headers done; the next read after a write starts a new header section.
    Rest { responded: bool },
    /// HTTP/2, or an HTTP/1 connection switched to another protocol (101): not our business.
    Passthrough,
}

pub struct HeaderDeadline {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    /// Allocated once per connection; reset for each header section.
    timer: Pin<Box<Sleep>>,
    armed: bool,
    first: bool,
    /// The current request broke the message syntax in a way pingora would repair or read
    /// differently from a backend (control bytes in the target, bare CR, NUL, obs-fold).
    pub malformed: bool,
}

impl HeaderDeadline {
    fn new(inner: Stream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            phase: Phase::Header(HeadScanner::default()),
            timer: Box::pin(tokio::time::sleep(timeout)),
            armed: true,
            first: true,
            malformed: false,
        }
    }

    /// Feed newly read bytes to the phase machine.
    fn observe(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.first {
            self.first = false;
            if bytes.starts_with(&H2_PREFACE[..bytes.len().min(H2_PREFACE.len())])
                && bytes.len() >= 3
            {
                self.phase = Phase::Passthrough;
                self.armed = false;
                return;
            }
        }
        if let Phase::Rest { responded: true } = self.phase {
            // A new request on a kept-alive connection. Its deadline is armed only if its header
            // section does not arrive in this read (see below): whole headers in one read — the
            // common case — cost no timer at all.
            self.phase = Phase::Header(HeadScanner::default());
            self.malformed = false;
        }
        if let Phase::Header(scan) = &mut self.phase {
            let ended = scan.feed(bytes).is_some();
            self.malformed |= scan.malformed();
            if ended {
                self.phase = Phase::Rest { responded: false };
                self.armed = false;
                return;
            }
            if !self.armed {
                // A partial header section: from now on it has `timeout` to complete.
                self.timer.as_mut().reset(Instant::now() + self.timeout);
                self.armed = true;
            }
        }
    }

    /// Note bytes written to the client. The first write of a final response ends the request
    /// (the next read starts a new header section). An interim response does not: after
    /// `100 Continue` (or `103 Early Hints`) the client goes on sending the request body, which
    /// must be neither scanned as a header section nor put under the header deadline; after
    /// `101 Switching Protocols` the connection carries another protocol.
    fn wrote(&mut self, data: &[u8]) {
        if let Phase::Rest { responded } = &mut self.phase {
            if *responded || data.is_empty() {
                return;
            }
            match interim_status(data) {
                Some(101) => self.phase = Phase::Passthrough,
                Some(_) => {}
                None => *responded = true,
            }
        }
    }
}

/// The status of an interim (1xx) HTTP/1 response head starting `data`, if it is one.
fn interim_status(data: &[u8]) -> Option<u16> {
    let rest = data
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| data.strip_prefix(b"HTTP/1.0 "))?;
    match rest {
        [b'1', d1 @ b'0'..=b'9', d2 @ b'0'..=b'9', ..] => {
            Some(100 + u16::from(d1 - b'0') * 10 + u16::from(d2 - b'0'))
        }
        _ => None,
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use std::future::Future;
        let this = self.get_mut();
        if this.armed && this.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header timeout",
            )));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(this.phase, Phase::Passthrough) {
            if let Poll::Ready(Ok(())) = res {
                this.observe(&buf.filled()[before..]);
            }
        }
        res
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote(data);
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.wrote(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: pingora_core::protocols::SocketDigest) {
        self.inner.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    /// Pingora peeks for the HTTP/2 preface before reading; the deadline covers that wait too.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if !self.armed {
            return self.inner.try_peek(buf).await;
        }
        let deadline = self.timer.deadline();
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header timeout",
            )),
        }
    }
}

/// The proxy app, with every connection wrapped in a `HeaderDeadline`.
pub struct Guarded<A> {
    pub app: Arc<A>,
    pub header_timeout: Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = if stream.as_any().is::<HeaderDeadline>() {
            stream
        } else {
            Box::new(HeaderDeadline::new(stream, self.header_timeout))
        };
        // pingora's HTTP app serves every request of an HTTP/1 connection before it returns, so
        // this layer is entered once per connection.
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
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

    #[tokio::test]
    async fn header_end_detection_across_reads() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
        g.observe(b"GET / HTTP/1.1\r\nHost: x\r");
        assert!(matches!(g.phase, Phase::Header { .. }));
        g.observe(b"\n\r");
        g.observe(b"\n");
        assert!(matches!(g.phase, Phase::Rest { responded: false }));
        assert!(!g.armed);
        assert!(!g.malformed);
    }

    #[tokio::test]
    async fn syntax_a_proxy_must_refuse_is_flagged() {
        for raw in [
            &b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\rY: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\nHost: x\r\n\r\n",
        ] {
            let (a, _b) = tokio::io::duplex(64);
            let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
            g.observe(raw);
            assert!(g.malformed, "{:?}", String::from_utf8_lossy(raw));
        }
        // Bare LF line endings are tolerated (and end the section).
        let (a, _b) = tokio::io::duplex(64);
        let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
        g.observe(b"GET / HTTP/1.1\nHost: x\n\n");
        assert!(!g.malformed);
        assert!(matches!(g.phase, Phase::Rest { .. }));
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
    fn many_spaces_on_the_request_line_never_count_as_two() {
        // 258 spaces once wrapped a u8 counter back to 2 (and overflowed in debug builds).
        let mut raw = b"GET".to_vec();
        raw.extend(std::iter::repeat_n(b' ', 258));
        raw.extend_from_slice(b"/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(scan_request_head(&raw).malformed);
    }

    #[tokio::test]
    async fn interim_responses_do_not_end_the_request() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
        g.observe(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
        );
        g.wrote(b"HTTP/1.1 100 Continue\r\n\r\n");
        // The body (with spaces and a bare CR) is not a header section: no flag, no deadline.
        g.observe(b"a b c\rd e");
        assert!(matches!(g.phase, Phase::Rest { responded: false }));
        assert!(!g.armed && !g.malformed);
        g.wrote(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        g.observe(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(g.phase, Phase::Rest { responded: false }));
        assert!(!g.malformed);
        // 101: the connection now carries another protocol.
        g.wrote(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n");
        g.observe(b"\x81\x05hello with no blank line");
        assert!(matches!(g.phase, Phase::Passthrough));
        assert!(!g.armed && !g.malformed);
        assert_eq!(interim_status(b"HTTP/1.1 103 Early Hints\r\n"), Some(103));
        assert_eq!(interim_status(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(interim_status(b"HTTP/1.1 1"), None);
    }

    #[tokio::test]
    async fn h2_prior_knowledge_is_left_alone() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
        g.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(matches!(g.phase, Phase::Passthrough));
        assert!(!g.armed);
    }

    /// A duplex pipe dressed as a pingora stream.
    #[derive(Debug)]
    struct Dummy(tokio::io::DuplexStream);
    impl AsyncRead for Dummy {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Dummy {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, d)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }
    #[async_trait]
    impl Shutdown for Dummy {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Dummy {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for Dummy {}
    impl GetTimingDigest for Dummy {
        fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
            Vec::new()
        }
    }
    impl GetProxyDigest for Dummy {
        fn get_proxy_digest(
            &self,
        ) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Dummy {
        fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
            None
        }
    }
    impl Peek for Dummy {}
}
