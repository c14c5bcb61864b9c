//! OTLP trace export (cargo feature `otlp`, `server.otlp` in the config): one SERVER span per
//! request, whose trace id and span id are those of the `traceparent` the gateway sent upstream,
//! so the backend's spans nest under it. A finished request's facts go through a bounded queue
//! to one exporter thread, which turns them into spans and sends them in batches with the
//! OpenTelemetry OTLP/HTTP exporter. It owns the exporter's life across reloads. It must never
//! slow or fail a request: queueing never blocks, and a full queue or a failed export drops the
//! spans and counts them.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::metrics;
use crate::observe::TraceParent;

/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// A batch is sent when full or this long after its first span.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The validated `server.otlp` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSpec {
    /// The collector's OTLP/HTTP traces URL (`http://`).
    pub endpoint: String,
    pub service_name: String,
    /// A trace started here is sampled when the low 63 bits of its id's last 8 bytes are below
    /// this ([`OtlpSpec::threshold`] of `sample_ratio`, the SDK's `TraceIdRatioBased` rule).
    pub sample_below: u64,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub queue_size: usize,
}

impl OtlpSpec {
    /// The `sample_below` for a ratio in 0.0..=1.0 (1.0 samples every id).
    pub fn threshold(ratio: f64) -> u64 {
        (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
    }

    /// Is a trace started here with this id sampled?
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(low) >> 1) < self.sample_below
    }
}

/// What a finished request tells its span (gathered by `proxy::span`).
#[derive(Debug)]
pub struct Finished {
    pub trace: TraceParent,
    pub tracestate: Option<http::HeaderValue>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: http::Method,
    pub version: http::Version,
    /// Without the query, at most 2,048 characters.
    pub path: String,
    /// The `Host` header (or HTTP/2 authority) as sent.
    pub host: String,
    pub client: Option<IpAddr>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    /// The last attempt's backend.
    pub backend: Option<SocketAddr>,
    /// 0 when the client left before any response.
    pub status: u16,
    pub request_id: String,
    pub consumer: Option<Arc<str>>,
    pub tier: Option<Arc<str>>,
    /// The code of a gateway-made answer (`not_found`, `bad_gateway`, ...).
    pub error: Option<&'static str>,
    pub retries: usize,
}

/// A running export pipeline for one spec: the queue's sending side. When the last snapshot
/// holding it is gone, the exporter thread sends what is queued and stops.
#[derive(Debug)]
pub struct Exporter {
    spec: OtlpSpec,
    queue: mpsc::Sender<Finished>,
    /// `tollgate_otlp_spans_dropped_total{reason="queue_full"}`, resolved once.
    queue_full: prometheus::IntCounter,
}

impl Exporter {
    /// Queue a finished request's span. Never blocks: a full queue drops it (counted).
    pub fn record(&self, finished: Finished) {
        match self.queue.try_send(finished) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.queue_full.inc(),
            // The exporter thread is gone (it could not start its runtime).
            Err(mpsc::error::TrySendError::Closed(_)) => metrics::OTLP_SPANS_DROPPED
                .with_label_values(&["export_failed"])
                .inc(),
        }
    }

    /// Set the sampled flag of a trace started here (a continued trace keeps its caller's).
    pub fn sample_started(&self, trace: &mut TraceParent) {
        if trace.parent.is_none() {
            trace.flags = u8::from(self.spec.samples(&trace.trace_id));
        }
    }

    fn start(spec: OtlpSpec) -> Option<Self> {
        let exporter = match build(&spec) {
            Ok(e) => e,
            Err(e) => {
                log::error!("otlp: cannot build the exporter for {}: {e}", spec.endpoint);
                return None;
            }
        };
        let (queue, rx) = mpsc::channel(spec.queue_size);
        let timeout = spec.timeout;
        let endpoint = spec.endpoint.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-otlp".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(run(exporter, rx, timeout, endpoint)),
                    Err(e) => log::error!("otlp: cannot start the exporter runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            log::error!("otlp: cannot start the exporter thread: {e}");
            return None;
        }
        // Every series exists from the start, so a scraper sees zeros rather than nothing.
        metrics::OTLP_SPANS_EXPORTED.inc_by(0);
        metrics::OTLP_SPANS_DROPPED.with_label_values(&["export_failed"]);
        log::info!("otlp: exporting spans to {}", spec.endpoint);
        Some(Self {
            spec,
            queue,
            queue_full: queue_full_counter(),
        })
    }
}

fn queue_full_counter() -> prometheus::IntCounter {
    metrics::OTLP_SPANS_DROPPED.with_label_values(&["queue_full"])
}

/// The exporter in use and its spec; replaced only by a reload that changes `server.otlp`.
static CURRENT: Mutex<Option<Arc<Exporter>>> = Mutex::new(None);

/// The exporter for a snapshot with this spec: the running one while `server.otlp` is unchanged,
/// else a new one (the previous one drains and stops with the last snapshot holding it).
/// Call it inside the serving process (it starts a thread), never while validating.
pub fn exporter_for(spec: Option<&OtlpSpec>) -> Option<Arc<Exporter>> {
    let mut current = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    match (spec, current.as_ref()) {
        (None, _) => {
            *current = None;
            None
        }
        (Some(s), Some(running)) if running.spec == *s => Some(running.clone()),
        (Some(s), _) => {
            *current = Exporter::start(s.clone()).map(Arc::new);
            current.clone()
        }
    }
}

fn build(spec: &OtlpSpec) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(spec.endpoint.clone())
        .with_timeout(spec.timeout)
        .with_headers(spec.headers.iter().cloned().collect())
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(spec.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    Ok(exporter)
}

/// The exporter thread: batch what arrives (up to `MAX_BATCH`, or `FLUSH_EVERY` after a batch's
/// first span), export it, one export at a time; until the queue is closed and empty.
async fn run(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<Finished>,
    timeout: Duration,
    endpoint: String,
) {
    let scope = InstrumentationScope::builder("tollgate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let flush_at = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(flush_at, rx.recv_many(&mut batch, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let n = batch.len() as u64;
        let spans: Vec<SpanData> = batch.drain(..).map(|f| span_data(f, &scope)).collect();
        // The exporter bounds itself by `timeout` (retries included); this is a backstop.
        let outcome =
            tokio::time::timeout(timeout + Duration::from_secs(1), exporter.export(spans))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        match outcome {
            Ok(()) => {
                metrics::OTLP_SPANS_EXPORTED.inc_by(n);
                if std::mem::take(&mut failing) {
                    log::info!("otlp: exporting to {endpoint} again");
                }
            }
            Err(e) => {
                metrics::OTLP_SPANS_DROPPED
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                if !std::mem::replace(&mut failing, true) {
                    log::warn!(
                        "otlp: export to {endpoint} failed, spans dropped until it recovers: {e}"
                    );
                }
            }
        }
    }
    let _ = exporter.shutdown();
}

/// The OTel HTTP method name: the standard ones as they are, anything else `_OTHER`.
fn method_name(m: &http::Method) -> Option<&'static str> {
    use http::Method as M;
    Some(match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => return None,
    })
}

/// A finished request as an OTel SERVER span (HTTP semantic conventions, plus `tollgate.*`).
fn span_data(f: Finished, scope: &InstrumentationScope) -> SpanData {
    let method = method_name(&f.method);
    let name = match (method, &f.route) {
        (Some(m), Some(r)) => format!("{m} {r}"),
        (Some(m), None) => m.to_string(),
        (None, _) => "HTTP".to_string(),
    };
    let mut attributes = Vec::with_capacity(20);
    let mut add = |k: &'static str, v: opentelemetry::Value| attributes.push(KeyValue::new(k, v));
    add("http.request.method", method.unwrap_or("_OTHER").into());
    if method.is_none() {
        add(
            "http.request.method_original",
            f.method.as_str().to_string().into(),
        );
    }
    add("url.scheme", "http".into());
    add("url.path", f.path.into());
    if let Ok(authority) = f.host.parse::<http::uri::Authority>() {
        add("server.address", authority.host().to_string().into());
        add(
            "server.port",
            i64::from(authority.port_u16().unwrap_or(80)).into(),
        );
    }
    add(
        "network.protocol.version",
        match f.version {
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2",
            _ => "1.1",
        }
        .into(),
    );
    if let Some(ip) = f.client {
        add("network.peer.address", ip.to_string().into());
    }
    if let Some(r) = f.route {
        add("http.route", r.into());
    }
    if f.status != 0 {
        add("http.response.status_code", i64::from(f.status).into());
    }
    let error_type = f
        .error
        .map(str::to_string)
        .or_else(|| (f.status >= 500).then(|| f.status.to_string()));
    if let Some(e) = &error_type {
        add("error.type", e.clone().into());
    }
    if !f.request_id.is_empty() {
        add("tollgate.request_id", f.request_id.into());
    }
    if let Some(c) = f.consumer {
        add("tollgate.consumer", c.into());
    }
    if let Some(t) = f.tier {
        add("tollgate.tier", t.into());
    }
    if let Some(u) = f.upstream {
        add("tollgate.upstream", u.into());
    }
    if let Some(b) = f.backend {
        add("tollgate.backend", b.to_string().into());
    }
    add("tollgate.retries", (f.retries as i64).into());
    let status = if f.status >= 500 {
        Status::Error {
            description: error_type.unwrap_or_default().into(),
        }
    } else {
        Status::Unset
    };
    let trace_state = f
        .tracestate
        .and_then(|v| v.to_str().ok().and_then(|s| s.parse::<TraceState>().ok()))
        .unwrap_or(TraceState::NONE);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(f.trace.trace_id),
            SpanId::from_bytes(f.trace.span_id),
            TraceFlags::new(f.trace.flags),
            false,
            trace_state,
        ),
        parent_span_id: f.trace.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: f.trace.parent.is_some(),
        span_kind: SpanKind::Server,
        name: name.into(),
        start_time: f.start,
        end_time: f.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ratio: f64) -> OtlpSpec {
        OtlpSpec {
            endpoint: "http://127.0.0.1:1/v1/traces".into(),
            service_name: "t".into(),
            sample_below: OtlpSpec::threshold(ratio),
            timeout: Duration::from_secs(1),
            headers: Vec::new(),
            queue_size: 8,
        }
    }

    #[test]
    fn started_traces_are_sampled_at_the_ratio_and_continued_ones_keep_their_flag() {
        let (all, none, half) = (spec(1.0), spec(0.0), spec(0.5));
        let mut sampled = 0;
        for _ in 0..2000 {
            let t = TraceParent::next(None);
            assert!(all.samples(&t.trace_id));
            assert!(!none.samples(&t.trace_id));
            sampled += usize::from(half.samples(&t.trace_id));
        }
        assert!((800..1200).contains(&sampled), "{sampled} of 2000 at 0.5");
        let mut max = TraceParent::next(None);
        max.trace_id = [0xff; 16];
        assert!(all.samples(&max.trace_id));

        let exporter = Exporter {
            spec: none.clone(),
            queue: mpsc::channel(1).0,
            queue_full: queue_full_counter(),
        };
        let mut started = TraceParent::next(None);
        exporter.sample_started(&mut started);
        assert_eq!(started.flags, 0);
        let mut continued = TraceParent::next(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        exporter.sample_started(&mut continued);
        assert_eq!(continued.flags, 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (queue, _rx) = mpsc::channel(1);
        let exporter = Exporter {
            spec: spec(1.0),
            queue,
            queue_full: queue_full_counter(),
        };
        let before = metrics::OTLP_SPANS_DROPPED
            .with_label_values(&["queue_full"])
            .get();
        for _ in 0..3 {
            exporter.record(finished(200, None));
        }
        let after = metrics::OTLP_SPANS_DROPPED
            .with_label_values(&["queue_full"])
            .get();
        assert_eq!(after - before, 2);
    }

    fn finished(status: u16, error: Option<&'static str>) -> Finished {
        let trace = TraceParent::next(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        Finished {
            trace,
            tracestate: Some(http::HeaderValue::from_static("vendor=1")),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            end: SystemTime::UNIX_EPOCH + Duration::from_secs(11),
            method: http::Method::GET,
            version: http::Version::HTTP_11,
            path: "/x".into(),
            host: "api.example.com:8080".into(),
            client: Some(IpAddr::from([127, 0, 0, 1])),
            route: Some(Arc::from("api")),
            upstream: Some(Arc::from("u")),
            backend: Some(SocketAddr::from(([10, 0, 0, 5], 80))),
            status,
            request_id: "req-1".into(),
            consumer: Some(Arc::from("acme")),
            tier: Some(Arc::from("pro")),
            error,
            retries: 1,
        }
    }

    fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_request_becomes_a_server_span_with_http_conventions() {
        let scope = InstrumentationScope::builder("tollgate").build();
        let f = finished(200, None);
        let trace = f.trace;
        let s = span_data(f, &scope);
        assert_eq!(s.name, "GET api");
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(
            s.span_context.trace_id(),
            TraceId::from_bytes(trace.trace_id)
        );
        assert_eq!(s.span_context.span_id(), SpanId::from_bytes(trace.span_id));
        assert_eq!(
            s.parent_span_id,
            SpanId::from_bytes([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(s.parent_span_is_remote);
        assert!(s.span_context.is_sampled());
        assert_eq!(s.span_context.trace_state().header(), "vendor=1");
        assert_eq!(
            s.end_time.duration_since(s.start_time).ok(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(s.status, Status::Unset);
        let text = |k| attr(&s, k).map(|v| v.as_str().into_owned());
        assert_eq!(text("http.request.method").as_deref(), Some("GET"));
        assert_eq!(text("url.path").as_deref(), Some("/x"));
        assert_eq!(text("http.route").as_deref(), Some("api"));
        assert_eq!(text("server.address").as_deref(), Some("api.example.com"));
        assert_eq!(
            attr(&s, "server.port"),
            Some(&opentelemetry::Value::I64(8080))
        );
        assert_eq!(
            attr(&s, "http.response.status_code"),
            Some(&opentelemetry::Value::I64(200))
        );
        assert_eq!(text("network.peer.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(text("tollgate.request_id").as_deref(), Some("req-1"));
        assert_eq!(text("tollgate.consumer").as_deref(), Some("acme"));
        assert_eq!(text("tollgate.tier").as_deref(), Some("pro"));
        assert_eq!(text("tollgate.backend").as_deref(), Some("10.0.0.5:80"));
        assert!(attr(&s, "error.type").is_none());
    }

    #[test]
    fn failures_set_error_type_and_5xx_the_error_status() {
        let scope = InstrumentationScope::builder("tollgate").build();
        let s = span_data(finished(502, Some("bad_gateway")), &scope);
        assert_eq!(
            s.status,
            Status::Error {
                description: "bad_gateway".into()
            }
        );
        assert_eq!(
            attr(&s, "error.type").map(|v| v.as_str().into_owned()),
            Some("bad_gateway".into())
        );
        let s = span_data(finished(404, Some("not_found")), &scope);
        assert_eq!(s.status, Status::Unset);
        assert_eq!(
            attr(&s, "error.type").map(|v| v.as_str().into_owned()),
            Some("not_found".into())
        );
        let mut f = finished(500, None);
        f.method = http::Method::from_bytes(b"PURGE").expect("token");
        f.route = None;
        f.trace.parent = None;
        let s = span_data(f, &scope);
        assert_eq!(s.name, "HTTP");
        assert_eq!(
            attr(&s, "http.request.method").map(|v| v.as_str().into_owned()),
            Some("_OTHER".into())
        );
        assert_eq!(
            attr(&s, "error.type").map(|v| v.as_str().into_owned()),
            Some("500".into())
        );
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert!(!s.parent_span_is_remote);
    }
}
