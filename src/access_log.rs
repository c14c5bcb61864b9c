//! The JSON access log, at the price NGINX pays for its own: each line is formatted on the
//! worker thread that finished the request, straight into that thread's buffer (no `String` per
//! field; the time's text is made once per second), and buffers go to one writer thread whole —
//! when one reaches 64 KiB, or on the writer's timer (`server.access_log_flush`) — so a line costs no
//! wake-up and no system call. The writer thread writes each buffer with one `write` of whole
//! lines (lines never interleave or tear). When the writer is behind (a full disk, a slow
//! stdout), a full buffer is dropped and its lines counted in `tollgate_access_log_dropped_total`:
//! a request never waits for the log. A reload reopens the file (logrotate: move the file, then
//! SIGHUP); a shutdown writes what is buffered.
//!
//! Hand-written rather than serde: serde_json needed the record's fields as owned values and
//! one queue message per line; the cost of each is in the `access_log` criterion bench.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

use crate::http::text::ip_text;
use crate::metrics;

/// A thread's buffer is handed to the writer when it holds this much.
const BATCH: usize = 64 * 1024;
/// How long a line may wait in a buffer at most (the writer collects every buffer this often),
/// in milliseconds: `server.access_log_flush`, 500 by default.
static FLUSH_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(500);

/// Follow `server.access_log_flush` (at every published config).
pub fn set_flush_interval(d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(1000).clamp(1, 1000);
    FLUSH_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

fn flush_interval() -> Duration {
    Duration::from_millis(FLUSH_MS.load(std::sync::atomic::Ordering::Relaxed))
}
/// Buffers waiting for the writer; beyond it, buffers are dropped (and their lines counted).
const QUEUE: usize = 64;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Off,
    Stdout,
    File(String),
}

/// One access log line, borrowed from the request it describes.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// Wall-clock time the request ended.
    pub time: SystemTime,
    pub request_id: &'a str,
    pub trace_id: Option<&'a [u8; 16]>,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub total_ms: f64,
    pub upstream_ms: Option<f64>,
    pub backend: Option<SocketAddr>,
    pub consumer: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub rate_limit: &'static str,
    pub cache: &'static str,
    pub retries: usize,
    pub error: Option<&'static str>,
}

/// The longest `path` written (characters beyond it are cut).
const MAX_PATH: usize = 2048;

impl Line<'_> {
    /// Append the line's JSON and a newline to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        TIME.with(|t| t.borrow_mut().write(self.time, out));
        out.extend_from_slice(b"\",\"request_id\":");
        string(out, self.request_id);
        out.extend_from_slice(b",\"trace_id\":\"");
        if let Some(id) = self.trace_id {
            for b in id {
                out.extend_from_slice(&HEX[usize::from(*b)]);
            }
        }
        out.extend_from_slice(b"\",\"client\":\"");
        if let Some(ip) = self.client {
            ip_text(out, ip);
        }
        out.extend_from_slice(b"\",\"method\":");
        string(out, self.method);
        out.extend_from_slice(b",\"path\":");
        let path = match self.path.char_indices().nth(MAX_PATH) {
            Some((i, _)) => &self.path[..i],
            None => self.path,
        };
        string(out, path);
        out.extend_from_slice(b",\"route\":");
        string(out, self.route);
        out.extend_from_slice(b",\"status\":");
        int(out, u64::from(self.status));
        out.extend_from_slice(b",\"bytes_in\":");
        int(out, self.bytes_in as u64);
        out.extend_from_slice(b",\"bytes_out\":");
        int(out, self.bytes_out as u64);
        out.extend_from_slice(b",\"total_ms\":");
        millis(out, self.total_ms);
        out.extend_from_slice(b",\"upstream_ms\":");
        match self.upstream_ms {
            Some(ms) => millis(out, ms),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"backend\":");
        match self.backend {
            Some(a) => {
                out.push(b'"');
                match a.ip() {
                    IpAddr::V4(_) => ip_text(out, a.ip()),
                    IpAddr::V6(v6) => {
                        out.push(b'[');
                        let _ = write!(Fmt(out), "{v6}");
                        out.push(b']');
                    }
                }
                out.push(b':');
                int(out, u64::from(a.port()));
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"consumer\":");
        opt_string(out, self.consumer);
        out.extend_from_slice(b",\"tier\":");
        opt_string(out, self.tier);
        out.extend_from_slice(b",\"rate_limit\":");
        string(out, self.rate_limit);
        out.extend_from_slice(b",\"cache\":");
        string(out, self.cache);
        out.extend_from_slice(b",\"retries\":");
        int(out, self.retries as u64);
        out.extend_from_slice(b",\"error\":");
        opt_string(out, self.error);
        out.extend_from_slice(b"}\n");
    }
}

/// `fmt::Write` over a byte buffer (for addresses, which only `Display` knows how to print).
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

static HEX: LazyLock<[[u8; 2]; 256]> = LazyLock::new(|| {
    let digits = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    for (i, pair) in t.iter_mut().enumerate() {
        *pair = [digits[i >> 4], digits[i & 15]];
    }
    t
});

fn int(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Milliseconds with three decimals (microseconds).
fn millis(out: &mut Vec<u8>, ms: f64) {
    let micros = (ms.max(0.0) * 1000.0).round() as u64;
    int(out, micros / 1000);
    let frac = micros % 1000;
    out.push(b'.');
    out.push(b'0' + (frac / 100) as u8);
    out.push(b'0' + (frac / 10 % 10) as u8);
    out.push(b'0' + (frac % 10) as u8);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string: quotes, backslashes and control characters escaped (RFC 8259 §7).
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.extend_from_slice(&HEX[usize::from(b)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The RFC 3339 text of the current second, made once per second per thread.
struct TimeText {
    second: u64,
    /// `2026-12-04T15:04:05.`
    prefix: Vec<u8>,
}

impl TimeText {
    fn write(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.prefix.is_empty() {
            self.second = second;
            self.prefix.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `2026-12-04T15:04:05Z` -> `2026-12-04T15:04:05.`
            self.prefix
                .extend_from_slice(text.trim_end_matches('Z').as_bytes());
            self.prefix.push(b'.');
        }
        out.extend_from_slice(&self.prefix);
        let ms = since.subsec_millis();
        out.push(b'0' + (ms / 100) as u8);
        out.push(b'0' + (ms / 10 % 10) as u8);
        out.push(b'0' + (ms % 10) as u8);
        out.push(b'Z');
    }
}

thread_local! {
    static TIME: RefCell<TimeText> = const {
        RefCell::new(TimeText { second: 0, prefix: Vec::new() })
    };
    static SHARD: RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { RefCell::new(None) };
}

/// Every thread's buffer, for the writer's timer and for the shutdown flush.
static SHARDS: Mutex<Vec<Arc<Mutex<Vec<u8>>>>> = Mutex::new(Vec::new());

enum Msg {
    /// Whole lines to write.
    Batch(Vec<u8>),
    /// Reopen the file (after a reload).
    Reopen,
    /// Collect and write every buffer now, then answer.
    Flush(SyncSender<()>),
}

/// The writer of the current target (replaced when the target changes on reload).
static WRITER: LazyLock<ArcSwapOption<(LogTarget, SyncSender<Msg>)>> =
    LazyLock::new(ArcSwapOption::empty);
static SWITCH: Mutex<()> = Mutex::new(());

fn writer_for(target: &LogTarget) -> Option<Arc<(LogTarget, SyncSender<Msg>)>> {
    let current = WRITER.load_full();
    if current.as_ref().is_some_and(|w| w.0 == *target) {
        return current;
    }
    let _switching = SWITCH.lock().unwrap_or_else(|p| p.into_inner());
    let current = WRITER.load_full();
    if current.as_ref().is_some_and(|w| w.0 == *target) {
        return current;
    }
    let fresh = start_writer(target.clone()).map(|tx| Arc::new((target.clone(), tx)));
    WRITER.store(fresh.clone());
    fresh
}

/// Format `line` into this thread's buffer; hand the buffer to the writer when it is full.
/// Never blocks on the writer.
pub fn log(target: &LogTarget, line: &Line<'_>) {
    if *target == LogTarget::Off {
        return;
    }
    // The common case reads the current writer without touching its reference count.
    let current = WRITER.load();
    let full = match current.as_ref() {
        Some(w) if w.0 == *target => append(line),
        _ => {
            drop(current);
            if writer_for(target).is_none() {
                return;
            }
            append(line)
        }
    };
    if let Some(full) = full {
        if let Some(w) = WRITER.load().as_ref() {
            send(&w.1, full);
        }
    }
}

/// Format `line` into this thread's buffer; the buffer's content when it is full.
fn append(line: &Line<'_>) -> Option<Vec<u8>> {
    SHARD.with(|slot| {
        let mut slot = slot.borrow_mut();
        let shard = slot.get_or_insert_with(|| {
            let shard = Arc::new(Mutex::new(Vec::with_capacity(BATCH + 1024)));
            SHARDS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(shard.clone());
            shard
        });
        let mut buf = shard.lock().unwrap_or_else(|p| p.into_inner());
        line.write_json(&mut buf);
        (buf.len() >= BATCH).then(|| std::mem::replace(&mut *buf, Vec::with_capacity(BATCH + 1024)))
    })
}

fn send(tx: &SyncSender<Msg>, batch: Vec<u8>) {
    match tx.try_send(Msg::Batch(batch)) {
        Ok(()) => {}
        Err(TrySendError::Full(Msg::Batch(b)) | TrySendError::Disconnected(Msg::Batch(b))) => {
            metrics::ACCESS_LOG_DROPPED.inc_by(memchr::memchr_iter(b'\n', &b).count() as u64);
        }
        Err(_) => {}
    }
}

/// Reopen the log file (a reload does this, for logrotate).
pub fn reopen() {
    if let Some(w) = WRITER.load_full() {
        let _ = w.1.try_send(Msg::Reopen);
    }
}

/// Write every buffered line now and wait (at most `wait`) until it is written (at shutdown).
pub fn flush(wait: Duration) {
    if let Some(w) = WRITER.load_full() {
        let (tx, rx) = sync_channel(1);
        if w.1.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(wait);
        }
    }
}

/// Take whatever every thread's buffer holds.
fn collect() -> Vec<Vec<u8>> {
    let shards = SHARDS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    shards
        .iter()
        .filter_map(|s| {
            let mut buf = s.lock().unwrap_or_else(|p| p.into_inner());
            (!buf.is_empty())
                .then(|| std::mem::replace(&mut *buf, Vec::with_capacity(BATCH + 1024)))
        })
        .collect()
}

fn open(target: &LogTarget) -> Option<Box<dyn std::io::Write + Send>> {
    match target {
        LogTarget::Off => None,
        LogTarget::Stdout => Some(Box::new(std::io::stdout())),
        LogTarget::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(Box::new(f)),
            Err(e) => {
                log::error!("access log: cannot open {path}: {e}");
                None
            }
        },
    }
}

fn start_writer(target: LogTarget) -> Option<SyncSender<Msg>> {
    let out = open(&target)?;
    let (tx, rx) = sync_channel::<Msg>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("tollgate-access-log".into())
        .spawn(move || write_loop(target, out, rx));
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::error!("access log: cannot start the writer thread: {e}");
            None
        }
    }
}

fn write_loop(target: LogTarget, mut out: Box<dyn std::io::Write + Send>, rx: Receiver<Msg>) {
    let write = |out: &mut Box<dyn std::io::Write + Send>, batch: &[u8]| {
        if out.write_all(batch).and_then(|()| out.flush()).is_err() {
            metrics::ACCESS_LOG_DROPPED.inc_by(memchr::memchr_iter(b'\n', batch).count() as u64);
        }
    };
    let mut next_sweep = std::time::Instant::now() + flush_interval();
    loop {
        let wait = next_sweep.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Msg::Batch(b)) => write(&mut out, &b),
            Ok(Msg::Reopen) => {
                if let Some(fresh) = open(&target) {
                    out = fresh;
                }
            }
            Ok(Msg::Flush(done)) => {
                for b in collect() {
                    write(&mut out, &b);
                }
                let _ = done.try_send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Replaced by a writer for another target: what is buffered goes to that one.
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Lines in quiet threads' buffers wait at most one interval, however busy the queue.
        if std::time::Instant::now() >= next_sweep {
            for b in collect() {
                write(&mut out, &b);
            }
            next_sweep = std::time::Instant::now() + flush_interval();
        }
    }
}

#[cfg(test)]
mod tests;
