//! Prometheus metrics, registered in prometheus's default registry, which the admin `/metrics`
//! endpoint serves. Label sets are bounded: route and upstream names come from
//! the config, status is a class (`2xx`); never consumer ids, raw paths or client addresses.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
    HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_requests_total",
        "Requests answered, by route, method and status class",
        &["route", "method", "status"]
    )
    .expect("static metric definition")
});

pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tollgate_request_duration_seconds",
        "Time from request start to the end of the response, by route",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .expect("static metric definition")
});

pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_config_reloads_total",
        "Config reload attempts by result (ok | error)",
        &["result"]
    )
    .expect("static metric definition")
});

pub static CONFIG_GENERATION: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_config_generation",
        "Generation of the config now serving (1 = as started)"
    )
    .expect("static metric definition")
});

pub static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_upstream_retries_total",
        "Requests tried again on another backend, by upstream",
        &["upstream"]
    )
    .expect("static metric definition")
});

pub static BACKEND_HEALTHY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_backend_healthy",
        "1 when the backend passes its health check, by upstream and backend address",
        &["upstream", "backend"]
    )
    .expect("static metric definition")
});

pub static CACHE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_cache_requests_total",
        "Requests on cached routes by route and cache result (hit | stale | stale_error | miss | expired | bypass)",
        &["route", "result"]
    )
    .expect("static metric definition")
});

pub static CACHE_STORES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_cache_stores_total",
        "Upstream responses on cached routes by route and what became of them (stored | uncacheable | too_large)",
        &["route", "result"]
    )
    .expect("static metric definition")
});

pub static CACHE_REVALIDATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_cache_revalidations_total",
        "Background refreshes of stale entries by route and result (updated | not_modified | uncacheable | failed)",
        &["route", "result"]
    )
    .expect("static metric definition")
});

pub static CACHE_REDIS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_cache_redis_total",
        "Second-level (Redis) cache operations by result (hit | miss | stored | error)",
        &["result"]
    )
    .expect("static metric definition")
});

pub static CACHE_ENTRIES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_cache_entries",
        "Responses held in the in-process cache"
    )
    .expect("static metric definition")
});

pub static CACHE_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_cache_bytes",
        "Bytes held in the in-process cache (bodies, headers and keys)"
    )
    .expect("static metric definition")
});

pub static REDIS_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_redis_errors_total",
        "Redis calls that failed, by operation and kind (timeout | error | busy | down: not tried, Redis known down)",
        &["op", "kind"]
    )
    .expect("static metric definition")
});

pub static REDIS_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tollgate_redis_duration_seconds",
        "Redis call latency by operation",
        &["op"],
        vec![0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
    )
    .expect("static metric definition")
});

pub static REDIS_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("tollgate_redis_up", "1 while the last Redis call succeeded")
        .expect("static metric definition")
});

pub static TLS_HANDSHAKES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_tls_handshakes_total",
        "Completed TLS handshakes on the TLS listeners, by negotiated version",
        &["version"]
    )
    .expect("static metric definition")
});

pub static TLS_HANDSHAKE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_tls_handshake_failures_total",
        "Failed TLS handshakes, by reason (unknown_name, incompatible, malformed, closed, timeout, ...)",
        &["reason"]
    )
    .expect("static metric definition")
});

pub static TLS_CERT_EXPIRY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_tls_certificate_expiry_seconds",
        "When each served certificate expires (not-after), in Unix seconds",
        &["name"]
    )
    .expect("static metric definition")
});

pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_auth_failures_total",
        "Requests refused by authentication or authorisation, by reason",
        &["reason"]
    )
    .expect("static metric definition")
});

pub static RATE_LIMIT_DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_ratelimit_decisions_total",
        "Rate-limit decisions by tier and result (allowed | limited | unavailable)",
        &["tier", "result"]
    )
    .expect("static metric definition")
});

pub static RATE_LIMIT_FALLBACK: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_ratelimit_fallback",
        "1 while Redis is unavailable and the on_failure policy decides"
    )
    .expect("static metric definition")
});

pub static BREAKER_TRANSITIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_breaker_transitions_total",
        "Circuit breaker transitions by upstream and new state",
        &["upstream", "state"]
    )
    .expect("static metric definition")
});

pub static RETRIES_DENIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_retry_budget_exhausted_total",
        "Retries not made because the upstream's retry budget was spent",
        &["upstream"]
    )
    .expect("static metric definition")
});

pub static SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_shed_total",
        "Requests refused by load shedding, by scope (route name or `gateway`)",
        &["scope"]
    )
    .expect("static metric definition")
});

pub static REFUSED_HEADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_refused_heads_total",
        "HTTP/1 request heads refused before parsing: `timeout` (408, slower than header_timeout) or `too_large` (431, no end within the size limit)",
        &["reason"]
    )
    .expect("static metric definition")
});

pub static IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("tollgate_in_flight_requests", "Requests being processed")
        .expect("static metric definition")
});

pub static UPSTREAM_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tollgate_upstream_duration_seconds",
        "Time from choosing a backend to its response header, by route",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .expect("static metric definition")
});

pub static BREAKER_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_breaker_state",
        "Circuit breaker state by upstream and backend (0 closed, 1 open, 2 half-open)",
        &["upstream", "backend"]
    )
    .expect("static metric definition")
});

pub static ACCESS_LOG_DROPPED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "tollgate_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind or failed"
    )
    .expect("static metric definition")
});

#[cfg(feature = "otlp")]
pub static OTLP_SPANS_EXPORTED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "tollgate_otlp_spans_exported_total",
        "Spans the OTLP collector accepted"
    )
    .expect("static metric definition")
});

#[cfg(feature = "otlp")]
pub static OTLP_SPANS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_otlp_spans_dropped_total",
        "Spans not exported, by reason (queue_full | export_failed)",
        &["reason"]
    )
    .expect("static metric definition")
});

/// Per-route metric handles, resolved once per (method, status class) and then reused: a
/// request pays for an atomic add, not for a label lookup.
pub struct RouteMetrics {
    route: std::sync::Arc<str>,
    requests: [[std::sync::OnceLock<prometheus::IntCounter>; 6]; 8],
    seconds: prometheus::Histogram,
    upstream: prometheus::Histogram,
}

pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
/// A bounded label index for the method (clients can send any token): see [`METHODS`].
pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::PATCH => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl RouteMetrics {
    pub fn new(route: std::sync::Arc<str>) -> Self {
        Self {
            seconds: REQUEST_SECONDS.with_label_values(&[&*route]),
            upstream: UPSTREAM_SECONDS.with_label_values(&[&*route]),
            route,
            requests: Default::default(),
        }
    }

    pub fn observe(&self, method: usize, status: u16, seconds: f64, upstream_seconds: Option<f64>) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        let m = method.min(7);
        self.requests[m][class]
            .get_or_init(|| REQUESTS.with_label_values(&[&*self.route, METHODS[m], CLASSES[class]]))
            .inc();
        self.seconds.observe(seconds);
        if let Some(u) = upstream_seconds {
            self.upstream.observe(u);
        }
    }
}

/// `200` -> `"2xx"`, without allocating.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

pub static ACME_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_acme_certificate_state",
        "Each ACME certificate's state: 1 for the one it is in (pending, valid, renewing, failed)",
        &["name", "state"]
    )
    .expect("static metric definition")
});

pub static ACME_ORDERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_acme_orders_total",
        "ACME orders this node made, by certificate and result (issued, failed, rate_limited)",
        &["name", "result"]
    )
    .expect("static metric definition")
});

pub static ACME_FAILURES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_acme_consecutive_failures",
        "Failed ACME orders in a row per certificate (0 once one succeeds)",
        &["name"]
    )
    .expect("static metric definition")
});

pub static ACME_NEXT_ATTEMPT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tollgate_acme_next_attempt_timestamp_seconds",
        "When the next ACME order may start after a failure (Unix seconds; 0: not backing off)",
        &["name"]
    )
    .expect("static metric definition")
});
