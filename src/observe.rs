//! Request identity for operators: the request id (a valid incoming `X-Request-Id` is kept,
//! otherwise a UUIDv7 is made), W3C trace context (`traceparent` continued with a new span id,
//! or started; `tracestate` passed through), and the JSON access log — one line per request,
//! handed to a writer thread through a bounded channel so a slow disk never slows a request
//! (when the channel is full the line is dropped and counted). Never on the critical path of
//! a decision; never blocks.

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex};

use arc_swap::ArcSwapOption;

use serde::Serialize;

use crate::metrics;

/// Longest request id accepted from a client.
pub const MAX_REQUEST_ID: usize = 128;

/// A client-sent request id is kept when it is 1-128 characters of `[A-Za-z0-9._~+/=:-]`.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._~+/=:-".contains(b))
}

/// The request id to use: the client's when valid, else a fresh UUIDv7.
pub fn request_id(incoming: Option<&[u8]>) -> String {
    match incoming {
        Some(v) if valid_request_id(v) => String::from_utf8_lossy(v).into_owned(),
        _ => uuid::Uuid::now_v7().to_string(),
    }
}

/// A parsed `traceparent`, or this hop's trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The caller's span id when this hop continues its trace (`None` when parsed, or when
    /// the trace starts here).
    pub parent: Option<[u8; 8]>,
}

impl TraceParent {
    /// Parse version 00 (`00-<32 hex>-<16 hex>-<2 hex>`); all-zero ids are invalid.
    pub fn parse(v: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?.trim();
        let mut parts = s.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() && version == "00" {
            return None;
        }
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        if !version
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flag = [0u8; 1];
        let lower = |x: &str| !x.bytes().any(|b| b.is_ascii_uppercase());
        if !(lower(trace) && lower(span) && lower(flags)) {
            return None;
        }
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        hex::decode_to_slice(flags, &mut flag).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: flag[0],
            parent: None,
        })
    }

    /// Continue an incoming trace (new span id for this hop) or start a sampled one.
    pub fn next(incoming: Option<&[u8]>) -> Self {
        let span_id = loop {
            let s: [u8; 8] = rand::random();
            if s != [0; 8] {
                break s;
            }
        };
        match incoming.and_then(Self::parse) {
            Some(caller) => Self {
                span_id,
                parent: Some(caller.span_id),
                ..caller
            },
            None => Self {
                trace_id: loop {
                    let t: [u8; 16] = rand::random();
                    if t != [0; 16] {
                        break t;
                    }
                },
                span_id,
                flags: 1,
                parent: None,
            },
        }
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// The `traceparent` value, built without intermediate strings.
    pub fn header_value(&self) -> http::HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        let mut i = 3;
        for b in self.trace_id.iter().chain(self.span_id.iter()) {
            if i == 35 {
                out[i] = b'-';
                i += 1;
            }
            out[i] = HEX[(b >> 4) as usize];
            out[i + 1] = HEX[(b & 15) as usize];
            i += 2;
        }
        out[52] = b'-';
        out[53] = HEX[(self.flags >> 4) as usize];
        out[54] = HEX[(self.flags & 15) as usize];
        http::HeaderValue::from_bytes(&out).unwrap_or_else(|_| {
            http::HeaderValue::from_static(
                "00-00000000000000000000000000000000-0000000000000000-00",
            )
        })
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

/// One access log line.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    pub time: String,
    pub request_id: String,
    pub trace_id: String,
    pub client: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
    pub total_ms: f64,
    pub upstream_ms: Option<f64>,
    pub backend: Option<String>,
    pub consumer: Option<String>,
    pub tier: Option<String>,
    pub rate_limit: &'static str,
    pub cache: &'static str,
    pub retries: usize,
    pub error: Option<&'static str>,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Off,
    Stdout,
    File(String),
}

/// The writer for the current target; read lock-free, replaced (under `SWITCH`) when the
/// target changes on reload.
static WRITER: LazyLock<ArcSwapOption<(LogTarget, SyncSender<AccessRecord>)>> =
    LazyLock::new(ArcSwapOption::empty);
static SWITCH: Mutex<()> = Mutex::new(());

/// Queue a record for the writer (started on first use, inside the running process, so it
/// survives daemonisation). Never blocks: a full queue drops the line and counts it.
pub fn log(target: &LogTarget, record: AccessRecord) {
    if *target == LogTarget::Off {
        return;
    }
    let mut current = WRITER.load();
    if current.as_ref().is_none_or(|w| w.0 != *target) {
        let _switching = SWITCH.lock().unwrap_or_else(|p| p.into_inner());
        current = WRITER.load();
        if current.as_ref().is_none_or(|w| w.0 != *target) {
            let fresh = start_writer(target.clone()).map(|tx| Arc::new((target.clone(), tx)));
            WRITER.store(fresh);
            current = WRITER.load();
        }
    }
    let Some(writer) = current.as_ref() else {
        return;
    };
    match writer.1.try_send(record) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            metrics::ACCESS_LOG_DROPPED.inc();
        }
    }
}

fn start_writer(target: LogTarget) -> Option<SyncSender<AccessRecord>> {
    let mut out: Box<dyn Write + Send> = match &target {
        LogTarget::Off => return None,
        LogTarget::Stdout => Box::new(std::io::stdout()),
        LogTarget::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                log::error!("access log: cannot open {path}: {e}");
                return None;
            }
        },
    };
    let (tx, rx) = sync_channel::<AccessRecord>(16 * 1024);
    let spawned = std::thread::Builder::new()
        .name("tollgate-access-log".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Ok(first) = rx.recv() {
                buf.clear();
                let mut next = Some(first);
                // Batch whatever is already queued into one write.
                while let Some(rec) = next {
                    if serde_json::to_writer(&mut buf, &rec).is_ok() {
                        buf.push(b'\n');
                    }
                    next = if buf.len() < 60 * 1024 {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                    metrics::ACCESS_LOG_DROPPED.inc();
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::error!("access log: cannot start the writer thread: {e}");
            None
        }
    }
}

/// RFC 3339 UTC time with milliseconds, for log lines.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        let made = request_id(Some(b"bad id with spaces"));
        assert_eq!(made.len(), 36);
        assert_eq!(
            uuid::Uuid::parse_str(&made).map(|u| u.get_version_num()),
            Ok(7)
        );
        assert_ne!(request_id(None), request_id(None));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(!valid_request_id(b"a\r\nb"));
    }

    #[test]
    fn traceparent_parse_and_continue() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(tp).expect("valid");
        assert_eq!(parsed.flags, 1);
        let next = TraceParent::next(Some(tp));
        assert_eq!(next.trace_id, parsed.trace_id);
        assert_ne!(next.span_id, parsed.span_id);
        assert_eq!(next.parent, Some(parsed.span_id));
        assert!(next
            .header()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert!(
                TraceParent::parse(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let fresh = TraceParent::next(None);
        assert_eq!(fresh.parent, None);
        assert_eq!(fresh.header().len(), 55);
        assert_eq!(
            fresh.header_value().to_str().expect("ascii"),
            fresh.header()
        );
        assert!(TraceParent::parse(fresh.header().as_bytes()).is_some());
    }
}
