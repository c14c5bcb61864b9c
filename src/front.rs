//! Slow-client defence and syntax check for HTTP/1 request heads, done before pingora sees a
//! request. Pingora's read timeout applies to each read, so a client sending one byte per second
//! never trips it. `Front` is the listening service's app: it reads each request head off the
//! connection itself — under a deadline on the whole head, from accept (first request) or from
//! the first byte (kept-alive requests) to the blank line — scans it (`HeadScanner`), and hands
//! the bytes to pingora as the session's first buffer, so pingora parses them without another
//! read. Past the deadline the client gets a 408 and the connection is closed; an idle
//! kept-alive connection is closed after the keep-alive timeout. The connection itself is not
//! wrapped: once the head is read, the request runs on the bare stream. HTTP/2 (prior
//! knowledge) connections go to pingora as they are. Body and idle timeouts are set per request
//! in `proxy`.
//!
//! On a TLS listener the front also does the handshake (under the same deadline as the first
//! head), with the acceptor current at that moment (`tls::Acceptors`: a reload swaps it for
//! new connections only), then hands HTTP/2 (ALPN `h2`) connections to pingora and reads
//! HTTP/1.1 heads over TLS as it does in plain text. Pingora's own TLS listeners would fix
//! the certificates at start and ignore ALPN here, since this app takes every connection.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{HttpServerApp, ServerApp};
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::http::head::HeadScanner;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Pingora refuses a request head longer than this (`MAX_HEADER_SIZE` in pingora-core).
const PINGORA_MAX_HEAD: usize = 1_048_575;
/// What pingora allocates for a request head; the buffer grows by this much when full.
const HEAD_BUF: usize = 4096;

/// How long to wait for the first bytes of a request head.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// The connection's first request: the head deadline already runs (from accept).
    Until(Instant),
    /// A kept-alive connection: up to this long for the next request to start (`None`: no
    /// limit); the head deadline starts when it does.
    Idle(Option<Duration>),
}

/// What reading a request head gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The whole head is in the buffer (with whatever followed it in the same reads).
    /// `malformed`: it broke the syntax rules of [`HeadScanner`].
    Ready { malformed: bool },
    /// The client closed, or sent nothing before the wait ended.
    Gone,
    /// The head started but did not end within the deadline.
    TooSlow,
    /// The head grew past `limit` bytes without ending.
    TooLarge,
}

/// Read one request head from `s` into `buf`, under `wait` for its first bytes and
/// `header_timeout` for the rest. Stops at the read that completes the head, or once `limit`
/// bytes came without its end. Bytes already in `buf` are the head's first (read by the h2c
/// check under the same `Wait::Until` deadline). `stopping`: the gateway is shutting down (the
/// wait for a request's first bytes ends; see [`WAIT_SLICE`]).
pub async fn read_head<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut BytesMut,
    wait: Wait,
    header_timeout: Duration,
    limit: usize,
    stopping: &AtomicBool,
) -> Head {
    let mut deadline = match wait {
        Wait::Until(d) => Some(d),
        Wait::Idle(_) => None,
    };
    let mut read = if buf.is_empty() {
        match first_bytes(s, buf, wait, stopping).await {
            Some(r) => r,
            None => return Head::Gone,
        }
    } else {
        Ok(buf.len())
    };
    let mut scan = HeadScanner::default();
    let mut seen = 0;
    loop {
        match read {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(_) => {}
        }
        if scan.feed(&buf[seen..]).is_some() {
            return Head::Ready {
                malformed: scan.malformed(),
            };
        }
        if buf.len() > limit {
            return Head::TooLarge;
        }
        seen = buf.len();
        // A head in pieces: from now on it has `header_timeout` to complete.
        let d = *deadline.get_or_insert_with(|| Instant::now() + header_timeout);
        if buf.capacity() - buf.len() < HEAD_BUF / 4 {
            buf.reserve(HEAD_BUF);
        }
        read = match tokio::time::timeout_at(d, s.read_buf(buf)).await {
            Ok(r) => r,
            Err(_) => return Head::TooSlow,
        };
    }
}

/// The first read of a kept-alive connection's next request (see [`first_bytes`]): most request
/// heads fit; a longer one takes a second read.
const FIRST_READ: usize = 1024;

/// How long one wait for a request's first bytes lasts at most: between two, the wait checks
/// whether the gateway is shutting down. So an idle kept-alive connection is closed within this
/// long of a shutdown or upgrade, and no wait registers for a shutdown notification (which
/// costs more than the wait's timer).
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// Wait for the first bytes of a request under `wait`. `None`: nothing came in time, or the
/// gateway is stopping.
async fn first_bytes<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
    buf: &mut BytesMut,
    wait: Wait,
    stopping: &AtomicBool,
) -> Option<io::Result<usize>> {
    let mut left = match wait {
        Wait::Until(d) => Some(d.saturating_duration_since(Instant::now())),
        Wait::Idle(limit) => limit,
    };
    // An idle kept-alive connection holds no head buffer while it waits: the first bytes land
    // in this small one (part of the connection's task), and the buffer is allocated when they
    // come (memory per idle connection: docs/benchmarks.md).
    let mut first = [0u8; FIRST_READ];
    loop {
        let slice = left.map_or(WAIT_SLICE, |l| l.min(WAIT_SLICE));
        // pingora's coarse timer, registered only if the read is pending (as pingora's own
        // keep-alive wait does).
        if buf.capacity() == 0 {
            if let Ok(r) = pingora_timeout::timeout(slice, s.read(&mut first)).await {
                if let Ok(n) = r {
                    buf.reserve(HEAD_BUF.max(n));
                    buf.extend_from_slice(&first[..n]);
                }
                return Some(r);
            }
        } else if let Ok(r) = pingora_timeout::timeout(slice, s.read_buf(buf)).await {
            return Some(r);
        }
        if stopping.load(Ordering::Acquire) {
            return None;
        }
        if let Some(l) = left.as_mut() {
            *l = l.saturating_sub(slice);
            if l.is_zero() {
                return None;
            }
        }
    }
}

/// Is `bytes` (the first bytes of a connection) the HTTP/2 preface: `Some(true)` yes,
/// `Some(false)` no, `None` too short to tell.
fn h2_preface(bytes: &[u8]) -> Option<bool> {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

/// The settings `Front` reads for every request, kept current by each published snapshot
/// (plain atomics: cheaper than loading the snapshot per request).
#[derive(Debug, Default)]
pub struct FrontSettings {
    /// Downstream keep-alive idle timeout, seconds (0: none).
    keepalive_secs: AtomicU64,
    /// The largest request head worth reading: the configured header and URI limits, with
    /// room for the request line's method and version (the precise limits apply later).
    head_limit: AtomicUsize,
}

impl FrontSettings {
    /// Take the values of a config about to be published: the keep-alive idle timeout (whole
    /// seconds) and the header and URI limits.
    pub fn follow(&self, keepalive_secs: u64, max_header_bytes: usize, max_uri_bytes: usize) {
        self.keepalive_secs.store(keepalive_secs, Ordering::Relaxed);
        let limit = max_header_bytes + max_uri_bytes + 1024;
        self.head_limit
            .store(limit.min(PINGORA_MAX_HEAD), Ordering::Relaxed);
    }
}

/// The listening service's app: reads each HTTP/1 request head (see the module docs), then
/// lets pingora's HTTP app serve the request from those bytes.
pub struct Front<A> {
    pub app: Arc<A>,
    pub header_timeout: Duration,
    settings: Arc<FrontSettings>,
    /// A TLS listener's acceptor (swapped at reloads); `None`: plain text.
    tls: Option<Arc<ArcSwap<Acceptor>>>,
    /// Set when the service shuts down: waits for a next request end (see [`WAIT_SLICE`]).
    stopping: AtomicBool,
}

impl<A> Front<A> {
    pub fn new(app: Arc<A>, header_timeout: Duration, settings: Arc<FrontSettings>) -> Self {
        Self {
            app,
            header_timeout,
            settings,
            tls: None,
            stopping: AtomicBool::new(false),
        }
    }

    /// The front of a TLS listener: each connection's handshake takes the acceptor in `tls`
    /// at that moment.
    pub fn with_tls(mut self, tls: Arc<ArcSwap<Acceptor>>) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// The TLS handshake of a new connection, under the first head's deadline (a client that
/// stalls its handshake is cut like one that stalls its request). Counted by version, or by
/// failure reason.
async fn handshake(acceptor: &Acceptor, stream: Stream, deadline: Instant) -> Option<Stream> {
    let l4 = match stream
        .into_any()
        .downcast::<pingora_core::protocols::l4::stream::Stream>()
    {
        Ok(l4) => *l4,
        Err(_) => {
            log::warn!("TLS listener got a stream that is not TCP");
            return None;
        }
    };
    match tokio::time::timeout_at(deadline, acceptor.tls_handshake(l4)).await {
        Ok(Ok(tls)) => {
            let version = tls
                .get_ssl_digest()
                .map_or("other", |d| crate::tls::version_label(&d.version));
            crate::metrics::TLS_HANDSHAKES
                .with_label_values(&[version])
                .inc();
            Some(Box::new(tls))
        }
        Ok(Err(e)) => {
            let reason = crate::tls::failure_reason(&e);
            crate::metrics::TLS_HANDSHAKE_FAILURES
                .with_label_values(&[reason])
                .inc();
            log::debug!("TLS handshake failed ({reason}): {e}");
            None
        }
        Err(_) => {
            crate::metrics::TLS_HANDSHAKE_FAILURES
                .with_label_values(&["timeout"])
                .inc();
            None
        }
    }
}

/// Answer a refused head and close: `408` (too slow) or `431` (too large), JSON as every error.
async fn refuse(stream: &mut Stream, err: GatewayError) {
    let id = crate::observe::request_id(None);
    let body = err.body(&id);
    let (reason, label) = match err {
        GatewayError::RequestTimeout => ("Request Timeout", "timeout"),
        _ => ("Request Header Fields Too Large", "too_large"),
    };
    crate::metrics::REFUSED_HEADS
        .with_label_values(&[label])
        .inc();
    log::info!("refused a request head: {} ({id})", err.code());
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n",
        err.status(),
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await
    };
    // A client that does not read gets a second, no more.
    if tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .is_err()
    {
        return;
    }
    // Lingering close (as NGINX does): half-close, then read and drop what the client still
    // sends for a moment, so that closing with unread bytes does not reset the connection
    // before the client has read the answer.
    Shutdown::shutdown(&mut **stream).await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 256 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let options = self.app.server_options();
        // The first head's deadline runs from accept, the TLS handshake and the h2c check
        // included.
        let deadline = accepted + self.header_timeout;
        if let Some(tls) = &self.tls {
            let acceptor = tls.load_full();
            stream = Box::pin(handshake(&acceptor, stream, deadline)).await?;
            if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                // HTTP/2 by ALPN: pingora serves the connection's streams.
                return ServerApp::process_new(&self.app, stream, shutdown).await;
            }
        }
        let h2c = options.is_some_and(|o| o.h2c) && stream.get_ssl_digest().is_none();
        let mut buf = BytesMut::with_capacity(HEAD_BUF);
        let mut wait = Wait::Until(deadline);
        if h2c {
            // Read until the first bytes tell HTTP/2's preface from an HTTP/1 request line
            // (unlike pingora's peek, a short HTTP/1 request does not wait for 24 bytes).
            loop {
                match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
                match h2_preface(&buf) {
                    Some(true) => {
                        // Put the bytes back and let pingora serve the HTTP/2 connection.
                        let mut l4 = match stream
                            .into_any()
                            .downcast::<pingora_core::protocols::l4::stream::Stream>(
                        ) {
                            Ok(l4) => l4,
                            Err(_) => {
                                log::warn!("HTTP/2 preface on a stream that cannot rewind");
                                return None;
                            }
                        };
                        l4.rewind(&buf);
                        return ServerApp::process_new(&self.app, l4, shutdown).await;
                    }
                    Some(false) => break,
                    None => {}
                }
            }
        }
        let keepalive_requests = options.and_then(|o| o.keepalive_request_limit);
        let mut settings = None;
        loop {
            let head = read_head(
                &mut stream,
                &mut buf,
                wait,
                self.header_timeout,
                self.settings.head_limit.load(Ordering::Relaxed),
                &self.stopping,
            )
            .await;
            let malformed = match head {
                Head::Ready { malformed } => malformed,
                Head::Gone => return None,
                Head::TooSlow => {
                    Box::pin(refuse(&mut stream, GatewayError::RequestTimeout)).await;
                    return None;
                }
                Head::TooLarge => {
                    Box::pin(refuse(&mut stream, GatewayError::HeadersTooLarge)).await;
                    return None;
                }
            };
            if malformed {
                // Admission refuses it (400) and closes the connection.
                stream = Box::new(Flagged { inner: stream });
            }
            let mut session = ServerSession::new_http1(stream);
            if let ServerSession::H1(h1) = &mut session {
                // Pingora parses these bytes first and reads no more for the head.
                h1.set_pipelined_prefix(std::mem::take(&mut buf));
            }
            match settings.take() {
                Some(s) => {
                    pingora_core::apps::HttpPersistentSettings::apply_to_session(s, &mut session)
                }
                None => {
                    session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
                    session.set_keepalive_reuses_remaining(keepalive_requests);
                }
            }
            // (pingora's `async_trait` boxes the request's state: it lives while the request is
            // served and is freed after, not while the connection waits for the next one.)
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (next, next_settings) = reused.consume();
            if malformed || next.as_any().is::<Flagged>() {
                return None;
            }
            stream = next;
            settings = next_settings;
            let keepalive = self.settings.keepalive_secs.load(Ordering::Relaxed);
            wait = Wait::Idle((keepalive > 0).then(|| Duration::from_secs(keepalive)));
            // Allocated when the next request's first bytes come (see `first_bytes`).
            buf = BytesMut::new();
        }
    }

    async fn cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        ServerApp::cleanup(&*self.app).await
    }
}

/// The stream of a connection whose request head was flagged malformed: admission tells by the
/// type (`proxy::malformed`), refuses the request and closes the connection.
pub struct Flagged {
    inner: Stream,
}

impl AsyncRead for Flagged {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Flagged {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
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
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl fmt::Debug for Flagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flagged")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Shutdown for Flagged {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Flagged {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Flagged {
    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
}

impl GetTimingDigest for Flagged {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Flagged {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Flagged {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: pingora_core::protocols::SocketDigest) {
        self.inner.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for Flagged {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{scan_request_head, HeadVerdict};

    /// Read a head from a pipe the test writes `parts` into, pausing `gap` between them.
    async fn head_of(parts: &[&[u8]], gap: Duration, wait: Wait, limit: usize) -> (Head, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in parts {
                if client.write_all(&p).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            // Hold the pipe open a while: the reader decides, not the end of input.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut buf = BytesMut::new();
        let head = read_head(
            &mut server,
            &mut buf,
            wait,
            Duration::from_millis(300),
            limit,
            &AtomicBool::new(false),
        )
        .await;
        writer.abort();
        (head, buf.to_vec())
    }

    /// Read a head into a buffer already holding `first`, from a pipe the client wrote `sent`
    /// into (and then closed, if `close`).
    async fn head_after(first: &[u8], sent: &[u8], close: bool) -> (Head, BytesMut) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(sent).await.expect("write");
        if close {
            drop(client);
        } else {
            // Kept open past the read: the reader decides, not the end of input.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(client);
            });
        }
        let mut buf = BytesMut::from(first);
        let head = read_head(
            &mut server,
            &mut buf,
            soon(),
            Duration::from_secs(1),
            4096,
            &AtomicBool::new(false),
        )
        .await;
        (head, buf)
    }

    fn soon() -> Wait {
        Wait::Until(Instant::now() + Duration::from_secs(2))
    }

    #[tokio::test]
    async fn a_head_in_one_read_or_in_pieces_is_read_whole() {
        let raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody";
        let (head, bytes) = head_of(&[raw], Duration::ZERO, soon(), 1 << 16).await;
        assert_eq!(head, Head::Ready { malformed: false });
        assert_eq!(bytes, raw, "the body bytes stay in the buffer for pingora");
        // Split inside the CRLF CRLF that ends it.
        let (head, bytes) = head_of(
            &[b"GET / HTTP/1.1\r\nHost: x\r", b"\n\r", b"\n"],
            Duration::from_millis(20),
            soon(),
            1 << 16,
        )
        .await;
        assert_eq!(head, Head::Ready { malformed: false });
        assert_eq!(bytes, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        // Bytes already in the buffer (the h2c check read them) count as the head's first.
        let (head, buf) = head_after(b"GET / HTTP/1.1\r\nHo", b"st: x\r\n\r\n", false).await;
        assert_eq!(head, Head::Ready { malformed: false });
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    struct NoApp;

    #[async_trait]
    impl HttpServerApp for NoApp {
        async fn process_new_http(
            self: &Arc<Self>,
            _session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<pingora_core::apps::ReusedHttpStream> {
            None
        }
    }

    /// What a connection's front-end task holds while it waits (the memory per idle
    /// connection: docs/benchmarks.md): the state of `process_new`, boxed by `async_trait`. The
    /// rare or one-off parts (the TLS handshake, a refusal with its lingering close) are boxed on
    /// their own: inline they made it 7.6 KB.
    #[tokio::test]
    async fn the_front_ends_state_per_connection_stays_small() {
        let front = Arc::new(Front::new(
            Arc::new(NoApp),
            Duration::from_secs(1),
            Arc::new(FrontSettings::default()),
        ));
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (a, _b) = tokio::io::duplex(64);
        let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(
            tokio::net::TcpStream::connect(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind")
                    .local_addr()
                    .expect("addr"),
            )
            .await
            .expect("connect"),
        ));
        drop(a);
        let fut = ServerApp::process_new(&front, stream, &shutdown);
        let size = std::mem::size_of_val(&*fut);
        eprintln!("front-end state per connection: {size} bytes");
        assert!(size <= 2048, "{size} bytes");
    }

    #[tokio::test]
    async fn a_head_longer_than_the_first_read_is_read_whole_and_stays_in_order() {
        // Waiting with no buffer (as a kept-alive connection does): the first read is small.
        let long = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\nnext",
            "c".repeat(3 * FIRST_READ)
        );
        let idle = Wait::Idle(Some(Duration::from_secs(2)));
        let (head, bytes) = head_of(&[long.as_bytes()], Duration::ZERO, idle, 1 << 16).await;
        assert_eq!(head, Head::Ready { malformed: false });
        assert_eq!(bytes, long.as_bytes());
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
            let (head, _) = head_of(&[raw], Duration::ZERO, soon(), 1 << 16).await;
            assert_eq!(
                head,
                Head::Ready { malformed: true },
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // Empty lines before the request line are skipped, as pingora's parser does (RFC 9112
        // §2.2), but a bare CR there is not an empty line.
        for raw in [
            &b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\n\r\n\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let verdict = scan_request_head(raw);
            assert_eq!(
                verdict,
                HeadVerdict {
                    end: Some(raw.len()),
                    malformed: false
                }
            );
        }
        assert!(scan_request_head(b"\rGET / HTTP/1.1\r\nHost: x\r\n\r\n").malformed);
        assert!(scan_request_head(b"\r\n GET / HTTP/1.1\r\nHost: x\r\n\r\n").malformed);
        // Blank lines alone never end a head: they wait for a request line.
        assert_eq!(scan_request_head(b"\r\n\r\n\n").end, None);
        // Found by the fuzz target: a line of two CRs before the request line is a (flagged)
        // empty line whether the bytes come at once or split.
        let raw = b"\n\r\r\n\n\r";
        assert_eq!(
            scan_request_head(raw),
            HeadVerdict {
                end: None,
                malformed: true
            }
        );
        let mut split = HeadScanner::default();
        assert_eq!(split.feed(&raw[..3]), None);
        assert_eq!(split.feed(&raw[3..]), None);
        assert!(split.malformed());
        // Bare LF line endings are tolerated (and end the head).
        let (head, _) = head_of(
            &[b"GET / HTTP/1.1\nHost: x\n\n"],
            Duration::ZERO,
            soon(),
            4096,
        )
        .await;
        assert_eq!(head, Head::Ready { malformed: false });
    }

    #[tokio::test]
    async fn a_trickling_head_is_cut_at_the_deadline_not_per_read() {
        // One byte every 50 ms never trips a per-read timeout; the 300 ms head deadline does.
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n";
        let bytes: Vec<&[u8]> = raw.chunks(1).collect();
        let started = std::time::Instant::now();
        let (head, _) = head_of(&bytes, Duration::from_millis(50), Wait::Idle(None), 1 << 16).await;
        assert_eq!(head, Head::TooSlow);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn idle_and_closed_connections_are_gone_and_big_heads_too_large() {
        // Nothing within the keep-alive wait.
        let (head, _) = head_of(
            &[],
            Duration::ZERO,
            Wait::Idle(Some(Duration::from_millis(100))),
            4096,
        )
        .await;
        assert_eq!(head, Head::Gone);
        // Nothing within the first request's deadline.
        let wait = Wait::Until(Instant::now() + Duration::from_millis(100));
        let (head, _) = head_of(&[], Duration::ZERO, wait, 4096).await;
        assert_eq!(head, Head::Gone);
        // The client closes mid-head.
        let (head, _) = head_after(b"", b"GET / HTTP/1.1\r\n", true).await;
        assert_eq!(head, Head::Gone);
        // Past the limit without an end.
        let big = [b'a'; 300];
        let parts: Vec<&[u8]> = vec![b"GET / HTTP/1.1\r\nX: ", &big, &big, &big, &big];
        let (head, bytes) = head_of(&parts, Duration::from_millis(5), soon(), 1000).await;
        assert_eq!(head, Head::TooLarge);
        assert!(bytes.len() > 1000 && bytes.len() < 1400, "{}", bytes.len());
    }

    #[tokio::test]
    async fn a_shutdown_ends_an_idle_wait_within_a_slice() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let started = std::time::Instant::now();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            read_head(
                &mut server,
                &mut buf,
                Wait::Idle(None),
                Duration::from_secs(1),
                4096,
                &flag,
            )
            .await
        });
        // An idle connection with no keep-alive limit waits on; a shutdown ends the wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!reader.is_finished(), "the idle wait ended on its own");
        stopping.store(true, Ordering::Release);
        let head = tokio::time::timeout(WAIT_SLICE * 3, reader)
            .await
            .expect("the wait outlived the shutdown by more than a slice")
            .expect("task");
        assert_eq!(head, Head::Gone);
        assert!(started.elapsed() < WAIT_SLICE * 3);
    }

    #[test]
    fn the_h2_preface_is_told_from_http1_as_early_as_possible() {
        assert_eq!(h2_preface(b"GET / HTTP/1.0\r\n\r\n"), Some(false));
        assert_eq!(h2_preface(b"G"), Some(false));
        assert_eq!(h2_preface(b"PRI * HTTP/2"), None);
        assert_eq!(h2_preface(H2_PREFACE), Some(true));
        assert_eq!(
            h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"),
            Some(true)
        );
        assert_eq!(h2_preface(b"PRI /x HTTP/1.1\r\n"), Some(false));
    }
}
