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

/// Where the scanner stands inside a header section.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// Line number within the section (0 = request line).
    line: u32,
    /// Bytes on the current line, CR excluded.
    len: u32,
    /// Spaces seen on the request line.
    spaces: u8,
    /// The previous byte was CR.
    cr: bool,
}

enum Phase {
    /// Reading a header section.
    Header(Scan),
    /// Headers done; the next read after a write starts a new header section.
    Rest { responded: bool },
    /// HTTP/2: not our business.
    H2,
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
            phase: Phase::Header(Scan::default()),
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
                self.phase = Phase::H2;
                self.armed = false;
                return;
            }
        }
        if let Phase::Rest { responded: true } = self.phase {
            // A new request on a kept-alive connection. Its deadline is armed only if its header
            // section does not arrive in this read (see below): whole headers in one read — the
            // common case — cost no timer at all.
            self.phase = Phase::Header(Scan::default());
            self.malformed = false;
        }
        if let Phase::Header(scan) = &mut self.phase {
            let mut s = *scan;
            let mut bad = false;
            for &b in bytes {
                if s.cr && b != b'\n' {
                    bad = true; // bare CR
                }
                match b {
                    b'\r' => {
                        s.cr = true;
                        continue;
                    }
                    b'\n' => {
                        s.cr = false;
                        if s.len == 0 && s.line > 0 {
                            // The blank line: anything after it is body (or a pipelined request
                            // pingora already holds in its buffer).
                            self.phase = Phase::Rest { responded: false };
                            self.armed = false;
                            self.malformed |= bad;
                            return;
                        }
                        if s.line == 0 && s.spaces != 2 {
                            bad = true; // the request line is exactly METHOD SP target SP version
                        }
                        if s.len > 0 || s.line == 0 {
                            s.line += 1;
                        }
                        s.len = 0;
                        continue;
                    }
                    0 => bad = true,
                    b' ' | b'\t' if s.len == 0 && s.line > 1 => bad = true, // obs-fold
                    b' ' if s.line == 0 => s.spaces += 1,
                    _ if s.line == 0 && (b < 0x20 || b == 0x7f) => bad = true,
                    _ => {}
                }
                s.cr = false;
                s.len += 1;
            }
            *scan = s;
            self.malformed |= bad;
            if !self.armed {
                // A partial header section: from now on it has `timeout` to complete.
                self.timer.as_mut().reset(Instant::now() + self.timeout);
                self.armed = true;
            }
        }
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
        if !matches!(this.phase, Phase::H2) {
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
        if let Phase::Rest { responded } = &mut this.phase {
            *responded = true;
        }
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
        if let Phase::Rest { responded } = &mut this.phase {
            *responded = true;
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
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn h2_prior_knowledge_is_left_alone() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = HeaderDeadline::new(Box::new(Dummy(a)), Duration::from_secs(5));
        g.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(matches!(g.phase, Phase::H2));
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
