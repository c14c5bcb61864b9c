//! OTLP trace export. With `--features otlp`: spans reach a small OTLP/HTTP receiver in the test
//! with the ids of the `traceparent` the upstream saw, for proxied and early answers alike, and
//! a hanging or failing collector never slows a request (its spans are dropped and counted).
//! In every build: the shipped example is refused, at the block's position, without the feature.
//!
//!   cargo test --features otlp --test gateway otlp

use std::process::Command;

fn check(path: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["-t", "-c", path])
        .output()
        .expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/examples/otlp/tracing.yaml"
);

#[cfg(not(feature = "otlp"))]
#[test]
fn otlp_config_is_refused_at_its_position_without_the_feature() {
    let (code, stderr) = check(EXAMPLE);
    assert_eq!(code, 1, "{stderr}");
    let line = format!(
        "{EXAMPLE}:10:3: server.otlp: built without the `otlp` feature; rebuild with --features otlp"
    );
    assert!(
        stderr.lines().any(|l| l == line),
        "missing {line:?} in:\n{stderr}"
    );
}

#[cfg(feature = "otlp")]
#[test]
fn the_shipped_otlp_example_is_valid() {
    let (code, stderr) = check(EXAMPLE);
    assert_eq!(code, 0, "{stderr}");
}

#[cfg(feature = "otlp")]
mod export {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode as Code, Span};
    use prost::Message;
    use tokio::sync::oneshot;

    use crate::harness::*;

    const OK: u8 = 0;
    const FAIL: u8 = 1;
    const HANG: u8 = 2;

    /// A span as received, with its resource's `service.name`.
    #[derive(Debug, Clone)]
    struct Received {
        service: String,
        span: Span,
    }

    #[derive(Default)]
    struct CollectorState {
        mode: AtomicU8,
        posts: AtomicUsize,
        spans: Mutex<Vec<Received>>,
        headers: Mutex<Option<HeaderMap>>,
    }

    /// An OTLP/HTTP (protobuf) traces receiver on a free port: it decodes what it is sent and
    /// answers 200, or 500, or never (`set_mode`).
    struct Collector {
        addr: SocketAddr,
        state: Arc<CollectorState>,
        _stop: oneshot::Sender<()>,
    }

    async fn receive(
        State(s): State<Arc<CollectorState>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        s.posts.fetch_add(1, Ordering::SeqCst);
        match s.mode.load(Ordering::SeqCst) {
            FAIL => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            HANG => std::future::pending::<()>().await,
            _ => {}
        }
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        *s.headers.lock().expect("lock") = Some(headers);
        let mut spans = s.spans.lock().expect("lock");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
        (
            [("content-type", "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response()
    }

    impl Collector {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let state = Arc::new(CollectorState::default());
            let app = axum::Router::new()
                .route("/v1/traces", axum::routing::post(receive))
                .with_state(state.clone());
            let (tx, rx) = oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
            Self {
                addr,
                state,
                _stop: tx,
            }
        }

        fn set_mode(&self, mode: u8) {
            self.state.mode.store(mode, Ordering::SeqCst);
        }

        fn posts(&self) -> usize {
            self.state.posts.load(Ordering::SeqCst)
        }

        fn spans(&self) -> Vec<Received> {
            self.state.spans.lock().expect("lock").clone()
        }

        /// The span whose `tollgate.request_id` is `id`, once it has arrived.
        fn span(&self, id: &str) -> Option<Received> {
            self.spans()
                .into_iter()
                .find(|r| text(&r.span, "tollgate.request_id").as_deref() == Some(id))
        }

        /// Server lines for a gateway exporting here (2-space indent, inside `server:`).
        fn server_yaml(&self, extra: &str) -> String {
            format!(
                "  access_log: \"off\"\n  otlp:\n    endpoint: \"http://{}/v1/traces\"\n    service_name: tollgate-test\n    headers: {{ x-collector-key: k-123 }}\n{extra}",
                self.addr
            )
        }
    }

    fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn text(span: &Span, key: &str) -> Option<String> {
        match attr(span, key)? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn int(span: &Span, key: &str) -> Option<i64> {
        match attr(span, key)? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }

    /// (trace id, parent id, flags) of a `traceparent` value, ids as hex.
    fn parts(tp: &str) -> (String, String, String) {
        let p: Vec<&str> = tp.split('-').collect();
        assert_eq!(p.len(), 4, "{tp}");
        (p[1].to_string(), p[2].to_string(), p[3].to_string())
    }

    /// The `traceparent` the upstream received with request id `id`.
    fn upstream_traceparent(up: &MockUpstream, id: &str) -> String {
        up.seen()
            .into_iter()
            .find(|s| s.headers.get("x-request-id").map(String::as_str) == Some(id))
            .and_then(|s| s.headers.get("traceparent").cloned())
            .unwrap_or_else(|| panic!("the upstream saw no request {id}"))
    }

    fn nanos(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos() as u64
    }

    async fn send(gw: &Gateway, path: &str, id: &str, traceparent: Option<&str>) -> u16 {
        let mut req = http().get(gw.url(path)).header("x-request-id", id);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        req.send().await.expect("send").status().as_u16()
    }

    /// `n` requests one after another; every one must succeed. Returns the slowest's time.
    async fn burst(client: &reqwest::Client, gw: &Gateway, n: usize, tag: &str) -> Duration {
        let mut slowest = Duration::ZERO;
        for i in 0..n {
            let started = Instant::now();
            let r = client
                .get(gw.url(&format!("/{tag}/{i}")))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            slowest = slowest.max(started.elapsed());
        }
        slowest
    }

    /// `tollgate_otlp_spans_dropped_total{reason}` (0 before the series exists).
    async fn dropped(gw: &Gateway, reason: &str) -> f64 {
        gw.metric(&format!(
            "tollgate_otlp_spans_dropped_total{{reason=\"{reason}\"}}"
        ))
        .await
        .unwrap_or(0.0)
    }

    const KEY: &str = "tg_acme_otlp_key_000000000001";
    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_carry_the_ids_the_upstream_saw_for_proxied_and_early_answers() {
        let collector = Collector::start().await;
        let up = MockUpstream::start("up").await;
        let down = MockUpstream::start("down").await;
        down.set_healthy(false);
        let hc = "    health_check: { path: /health, interval: 100ms, timeout: 500ms }\n";
        let key_hash = tollgate::identity::keys::format_hash(&tollgate::identity::keys::hash(KEY));
        let body = format!(
            "consumers:\n  - {{ id: acme, tier: pro, api_keys: [\"{key_hash}\"] }}\nupstreams:\n{}{}routes:\n  - {{ name: r, match: {{ path_prefix: /x }}, upstream: u }}\n  - {{ name: secured, match: {{ path_prefix: /s }}, upstream: u, auth: required }}\n  - {{ name: gone, match: {{ path_prefix: /down }}, upstream: d }}\n",
            upstream_yaml("u", &[&up], ""),
            upstream_yaml("d", &[&down], hc),
        );
        let gw = Gateway::start_with(&body, &collector.server_yaml("")).await;

        // A caller's unsampled trace: continued upstream unsampled, and never exported.
        let unsampled = CALLER.replace("-01", "-00");
        assert_eq!(send(&gw, "/x", "unsampled", Some(&unsampled)).await, 200);
        assert_eq!(parts(&upstream_traceparent(&up, "unsampled")).2, "00");

        // A continued trace, through a slow backend (the span covers the whole request).
        up.set_delay(Duration::from_millis(150));
        let before = SystemTime::now();
        assert_eq!(send(&gw, "/x/a?q=1", "continued", Some(CALLER)).await, 200);
        let after = SystemTime::now();
        up.set_delay(Duration::ZERO);
        // A trace started here, and answers the gateway gives itself.
        assert_eq!(send(&gw, "/x", "started", None).await, 200);
        assert_eq!(send(&gw, "/nowhere", "no-route", None).await, 404);
        assert_eq!(send(&gw, "/s", "no-key", None).await, 401);
        let r = http()
            .get(gw.url("/s"))
            .header("x-request-id", "keyed")
            .header("x-api-key", KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert_eq!(send(&gw, "/down", "no-backend", None).await, 503);

        let ids = [
            "continued",
            "started",
            "no-route",
            "no-key",
            "keyed",
            "no-backend",
        ];
        eventually(
            Duration::from_secs(10),
            "every span at the collector",
            || async {
                ids.iter()
                    .all(|id| collector.span(id).is_some())
                    .then_some(())
            },
        )
        .await;
        // Spans leave in request order: the unsampled request's would have come first.
        assert!(collector.span("unsampled").is_none());

        // The continued trace: same trace id, the caller's span as parent, and the span's own id
        // is the parent id the upstream received, so the upstream's spans nest under it.
        let r = collector.span("continued").expect("span");
        let (trace, parent, flags) = parts(&upstream_traceparent(&up, "continued"));
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(flags, "01");
        assert_eq!(hex::encode(&r.span.trace_id), trace);
        assert_eq!(hex::encode(&r.span.span_id), parent);
        assert_eq!(hex::encode(&r.span.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(r.service, "tollgate-test");
        assert_eq!(r.span.kind, SpanKind::Server as i32);
        assert_eq!(r.span.name, "GET r");
        assert_eq!(text(&r.span, "http.request.method").as_deref(), Some("GET"));
        assert_eq!(text(&r.span, "http.route").as_deref(), Some("r"));
        assert_eq!(text(&r.span, "url.path").as_deref(), Some("/x/a"));
        assert_eq!(int(&r.span, "http.response.status_code"), Some(200));
        assert_eq!(text(&r.span, "tollgate.upstream").as_deref(), Some("u"));
        assert_eq!(text(&r.span, "tollgate.backend"), Some(up.addr.to_string()));
        assert_eq!(text(&r.span, "tollgate.tier").as_deref(), Some("anonymous"));
        assert_eq!(
            text(&r.span, "server.address").as_deref(),
            Some("127.0.0.1")
        );
        assert!(attr(&r.span, "error.type").is_none());
        assert_ne!(
            r.span.status.as_ref().map(|s| s.code),
            Some(Code::Error as i32)
        );
        // Real start and end: inside the client's window, and at least the backend's delay.
        assert!(r.span.start_time_unix_nano >= nanos(before));
        // (The span ends when the gateway logs the request, just after the client has its answer.)
        assert!(r.span.end_time_unix_nano <= nanos(after + Duration::from_secs(1)));
        assert!(
            r.span.end_time_unix_nano - r.span.start_time_unix_nano >= 150_000_000,
            "{:?}",
            r.span
        );

        // A trace started here: a root span whose ids are the ones sent upstream.
        let r = collector.span("started").expect("span");
        let (trace, parent, flags) = parts(&upstream_traceparent(&up, "started"));
        assert_eq!(flags, "01");
        assert_eq!(hex::encode(&r.span.trace_id), trace);
        assert_eq!(hex::encode(&r.span.span_id), parent);
        assert!(r.span.parent_span_id.is_empty(), "{:?}", r.span);

        // Early answers make spans too: no route, no credentials, no healthy backend.
        let r = collector.span("no-route").expect("span");
        assert_eq!(int(&r.span, "http.response.status_code"), Some(404));
        assert_eq!(text(&r.span, "error.type").as_deref(), Some("not_found"));
        assert!(text(&r.span, "http.route").is_none());
        assert_eq!(r.span.name, "GET");
        let r = collector.span("no-key").expect("span");
        assert_eq!(int(&r.span, "http.response.status_code"), Some(401));
        assert_eq!(text(&r.span, "http.route").as_deref(), Some("secured"));
        assert!(text(&r.span, "error.type").is_some());
        assert!(text(&r.span, "tollgate.backend").is_none());
        assert!(text(&r.span, "tollgate.consumer").is_none());
        let r = collector.span("keyed").expect("span");
        assert_eq!(int(&r.span, "http.response.status_code"), Some(200));
        assert_eq!(text(&r.span, "tollgate.consumer").as_deref(), Some("acme"));
        assert_eq!(text(&r.span, "tollgate.tier").as_deref(), Some("pro"));
        let r = collector.span("no-backend").expect("span");
        assert_eq!(int(&r.span, "http.response.status_code"), Some(503));
        assert_eq!(
            text(&r.span, "error.type").as_deref(),
            Some("no_healthy_backend")
        );
        assert_eq!(
            r.span.status.as_ref().map(|s| s.code),
            Some(Code::Error as i32)
        );
        assert_eq!(down.hits(), 0);

        // The configured headers ride on every export.
        let headers = collector
            .state
            .headers
            .lock()
            .expect("lock")
            .clone()
            .expect("a post");
        assert_eq!(headers["x-collector-key"], "k-123");
        assert_eq!(headers["content-type"], "application/x-protobuf");
        // Counted when the collector's answer is in, which can be after the spans were seen.
        eventually(
            Duration::from_secs(5),
            "the exported spans counted",
            || async {
                let exported = gw.metric("tollgate_otlp_spans_exported_total").await;
                exported.filter(|n| *n >= ids.len() as f64)
            },
        )
        .await;

        // A reload that changes the block rebuilds the exporter: at ratio 0 a trace started here
        // goes upstream unsampled and is not exported; a caller's sampled trace still is.
        let text_now = std::fs::read_to_string(&gw.config_path).expect("config");
        gw.write_raw(&text_now.replace(
            "service_name: tollgate-test",
            "service_name: tollgate-reloaded\n    sample_ratio: 0.0",
        ));
        let status = gw.sighup_and_wait().await;
        assert_eq!(status["last_reload"]["ok"], true, "{status}");
        assert_eq!(send(&gw, "/x", "started-at-zero", None).await, 200);
        assert_eq!(parts(&upstream_traceparent(&up, "started-at-zero")).2, "00");
        assert_eq!(
            send(&gw, "/x", "continued-at-zero", Some(CALLER)).await,
            200
        );
        let r = eventually(Duration::from_secs(10), "the span after reload", || async {
            collector.span("continued-at-zero")
        })
        .await;
        assert_eq!(r.service, "tollgate-reloaded");
        assert!(collector.span("started-at-zero").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_or_failing_collector_never_slows_requests_and_drops_are_counted() {
        let collector = Collector::start().await;
        collector.set_mode(HANG);
        let up = MockUpstream::start("up").await;
        let body = format!(
            "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
            upstream_yaml("u", &[&up], "")
        );
        let gw = Gateway::start_with(
            &body,
            &collector.server_yaml("    timeout: 5s\n    queue_size: 8\n"),
        )
        .await;
        let client = http();
        let mut slowest = Duration::ZERO;

        // The first batch goes out and hangs (for the 5 s export timeout)...
        slowest = slowest.max(burst(&client, &gw, 4, "first").await);
        eventually(Duration::from_secs(5), "an export under way", || async {
            (collector.posts() > 0).then_some(())
        })
        .await;
        // ...while requests go on at full speed; the queue holds 8 spans, the rest are dropped.
        slowest = slowest.max(burst(&client, &gw, 40, "during").await);
        let full = dropped(&gw, "queue_full").await;
        assert!(full >= 30.0, "queue_full drops: {full}");
        // The hanging export times out: its batch is dropped too.
        eventually(
            Duration::from_secs(15),
            "the hung batch counted",
            || async { (dropped(&gw, "export_failed").await >= 4.0).then_some(()) },
        )
        .await;

        // A collector answering 500: requests unaffected, the spans counted as failed. In the
        // end every span sent is accounted for: dropped from the full queue or with its batch.
        collector.set_mode(FAIL);
        slowest = slowest.max(burst(&client, &gw, 5, "failing").await);
        eventually(
            Duration::from_secs(15),
            "every span dropped and counted",
            || async {
                let counted =
                    dropped(&gw, "queue_full").await + dropped(&gw, "export_failed").await;
                (counted == 49.0).then_some(())
            },
        )
        .await;
        // A request that waited for an export would have taken the 5 s export timeout.
        assert!(
            slowest < Duration::from_millis(2500),
            "a request took {slowest:?} while the collector was hanging or failing"
        );
        assert!(collector.spans().is_empty());
        assert_eq!(
            gw.metric("tollgate_otlp_spans_exported_total").await,
            Some(0.0)
        );

        // The collector recovers: export resumes with the next spans.
        collector.set_mode(OK);
        burst(&client, &gw, 3, "after").await;
        let paths: HashMap<String, usize> = eventually(
            Duration::from_secs(10),
            "spans after the collector recovered",
            || async {
                let spans = collector.spans();
                let mut paths = HashMap::new();
                for r in &spans {
                    if let Some(p) = text(&r.span, "url.path") {
                        *paths.entry(p).or_insert(0) += 1;
                    }
                }
                (0..3)
                    .all(|i| paths.contains_key(&format!("/after/{i}")))
                    .then_some(paths)
            },
        )
        .await;
        assert!(!paths.keys().any(|p| p.starts_with("/first/")), "{paths:?}");
        // Counted when the collector's answer is in, which can be after the spans were seen.
        eventually(
            Duration::from_secs(5),
            "the exported spans counted",
            || async {
                let exported = gw.metric("tollgate_otlp_spans_exported_total").await;
                exported.filter(|n| *n >= 3.0)
            },
        )
        .await;
    }
}
