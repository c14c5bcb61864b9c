//! Validation and compilation of the parsed file: every problem is collected (never only the
//! first), and a file with none becomes a [`GatewayConfig`] of compiled matchers, socket
//! addresses, `Duration`s and enums. Pure: no network except resolving backend host names.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use super::schema::{self, BalanceSection, FileConfig};
use crate::identity::{self, jwt, keys, Consumer, IdentityConfig, Mode, Policy, BUILTIN_TIERS};
use crate::limit::{self, Algo, KeyKind, PerTier, RoutePolicy};
use crate::route::{Compression, HostMatch, PathMatch, Rewrite, Route};
use crate::shed::ShedSpec;
use crate::store::StoreSpec;
use crate::upstream::breaker::{BreakerSpec, BudgetSpec};
use crate::upstream::{
    BackendSpec, Balance, HashKey, HealthKind, HealthSpec, Timeouts, UpstreamSpec,
};

mod tls;

use super::check::{socket_addr, Check, Problem};

/// A validated, compiled config: everything the runtime snapshot is built from.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub server: ServerSettings,
    pub upstreams: Vec<UpstreamSpec>,
    pub routes: Vec<Route>,
    pub redis: Option<StoreSpec>,
    pub tiers: Vec<TierSpec>,
    pub identity: Arc<IdentityConfig>,
    /// Bearer token for /admin/* (resolved from `admin.token` or `admin.token_env`).
    pub admin_token: Option<String>,
    pub limits: limit::Settings,
    pub cache: crate::cache::Settings,
    /// Certificates and TLS listeners.
    pub tls: Arc<crate::tls::TlsSpec>,
    /// The ACME settings and certificates (`None`: no certificate is obtained by ACME).
    pub acme: Option<Arc<crate::acme::Settings>>,
}

/// A tier's policy (limits are enforced by the rate limiter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpec {
    pub name: Arc<str>,
    pub limit: Option<u64>,
    pub window: Duration,
    pub burst: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    /// TLS listeners (their settings are in `GatewayConfig::tls`).
    pub listen_tls: Vec<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    pub grace_period: Duration,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub keepalive_timeout: Duration,
    pub h2c: bool,
    /// Every plain-HTTP request gets a 308 to HTTPS.
    pub redirect_https: bool,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_inflight: Option<ShedSpec>,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub access_log: crate::observe::LogTarget,
    /// The access log writer collects every buffer this often.
    pub access_log_flush: Duration,
    /// Reload when the config file changes (`server.watch_config`).
    pub watch_config: bool,
    pub forwarded_headers: bool,
    pub request_id_header: bool,
    pub hide_backend_server: bool,
    /// How the names of fields Tollgate adds to responses are written.
    pub header_case: crate::http::fields::Case,
    pub trace_context: bool,
    pub max_headers: usize,
    /// Longest single header field, `name: value` without the line end.
    pub max_header_line_bytes: usize,
    pub underscore_headers: schema::UnderscoreHeaders,
    /// OTLP trace export (`server.otlp`); `None` = off.
    #[cfg(feature = "otlp")]
    pub otlp: Option<crate::otlp::OtlpSpec>,
}

/// `IP:PORT` or `HOST:PORT` (resolved now; the first address is used).
fn backend_addr(c: &mut Check, field: String, text: &str) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    let has_port = text
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !has_port {
        c.err(
            field,
            format!("invalid address {text:?}: expected HOST:PORT"),
        );
        return None;
    }
    match text.to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(a)) => Some(a),
        _ => {
            c.err(field, format!("cannot resolve backend address {text:?}"));
            None
        }
    }
}

pub(super) fn compile(file: FileConfig, base_dir: &Path) -> Result<GatewayConfig, Vec<Problem>> {
    let mut c = Check {
        problems: Vec::new(),
    };
    let server = compile_server(&mut c, &file.server);
    let redis = file.redis.as_ref().map(|r| compile_redis(&mut c, r));
    let tiers = compile_tiers(&mut c, &file);
    let tier_index: HashMap<String, usize> = tiers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.to_string(), i))
        .collect();
    let identity = compile_identity(&mut c, &file, &tier_index, &tiers, base_dir);
    let admin_token = compile_admin(&mut c, &file.admin);
    let limits = compile_limits(&mut c, &file);
    let cache = compile_cache(&mut c, &file);
    let (tls, acme) = tls::compile(&mut c, &file, base_dir);
    let tier_algos: Vec<Option<Algo>> = tiers.iter().map(tier_algo).collect();

    let mut upstreams = Vec::with_capacity(file.upstreams.len());
    let mut upstream_index = HashMap::new();
    for (name, section) in &file.upstreams {
        upstream_index.insert(name.as_str(), upstreams.len());
        upstreams.push(compile_upstream(&mut c, name, section, base_dir));
    }

    let mut routes = Vec::with_capacity(file.routes.len());
    let mut seen = HashSet::new();
    for (i, section) in file.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if section.name.trim().is_empty() {
            c.err(format!("{at}.name"), "must not be empty");
        } else if !seen.insert(section.name.as_str()) {
            c.err(
                format!("{at}.name"),
                format!("duplicate route name {:?}", section.name),
            );
        }
        let upstream = match upstream_index.get(section.upstream.as_str()) {
            Some(&u) => u,
            None => {
                c.err(
                    format!("{at}.upstream"),
                    format!("unknown upstream {:?}", section.upstream),
                );
                0
            }
        };
        if let Some(mut route) = compile_route(&mut c, &at, section, upstream, &file) {
            route.limit =
                compile_route_limit(&mut c, &at, section, &tier_algos, &tier_index, tiers.len());
            routes.push(route);
        }
    }
    if file.routes.is_empty() {
        c.err("routes", "at least one route is needed");
    }

    if c.problems.is_empty() {
        Ok(GatewayConfig {
            server,
            upstreams,
            routes,
            redis,
            tiers,
            identity: Arc::new(identity),
            admin_token,
            limits,
            cache,
            tls: Arc::new(tls),
            acme: acme.map(Arc::new),
        })
    } else {
        Err(c.problems)
    }
}

fn compile_server(c: &mut Check, s: &schema::ServerSection) -> ServerSettings {
    if s.listen.is_empty() {
        c.err("server.listen", "at least one listen address is needed");
    }
    let listen: Vec<SocketAddr> = s
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, a)| socket_addr(c, format!("server.listen[{i}]"), a))
        .collect();
    let listen_tls = tls::listen_addrs(c, s);
    for (i, a) in listen_tls.iter().enumerate() {
        if listen.contains(a) || listen_tls[..i].contains(a) {
            c.err(
                format!("server.listen_tls[{i}].addr"),
                format!("{a} is already a listen address"),
            );
        }
    }
    let admin_listen = s
        .admin_listen
        .as_deref()
        .and_then(|a| socket_addr(c, "server.admin_listen".into(), a));
    if let Some(admin) = admin_listen {
        if listen.contains(&admin) || listen_tls.contains(&admin) {
            c.err(
                "server.admin_listen",
                "must differ from every proxy listen address",
            );
        }
    }
    let threads = c.range("server.threads".into(), s.threads as i64, 1, 256);
    for (field, path) in [("pid_file", &s.pid_file), ("upgrade_sock", &s.upgrade_sock)] {
        if let Some(p) = path {
            if !Path::new(p).is_absolute() {
                c.err(
                    format!("server.{field}"),
                    format!(
                        "must be an absolute path (daemon mode changes directory to /), got {p:?}"
                    ),
                );
            }
        }
    }
    c.positive("server.keepalive_timeout".into(), s.keepalive_timeout);
    #[cfg_attr(not(feature = "otlp"), allow(unused_variables))]
    let otlp = s
        .otlp
        .as_ref()
        .and_then(|o| compile_otlp(c, o, s.trace_context));
    ServerSettings {
        #[cfg(feature = "otlp")]
        otlp,
        listen,
        listen_tls,
        admin_listen,
        threads,
        grace_period: s.grace_period,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        keepalive_timeout: s.keepalive_timeout,
        h2c: s.h2c,
        redirect_https: s.redirect_https,
        header_timeout: {
            c.positive("server.header_timeout".into(), s.header_timeout);
            s.header_timeout
        },
        body_timeout: {
            c.positive("server.body_timeout".into(), s.body_timeout);
            s.body_timeout
        },
        max_inflight: {
            let n = c.range("server.max_inflight".into(), s.max_inflight, 0, 10_000_000);
            (n > 0).then_some(ShedSpec {
                max_inflight: n,
                queue: 0,
                queue_timeout: Duration::ZERO,
            })
        },
        max_header_bytes: c.range(
            "server.max_header_bytes".into(),
            s.max_header_bytes as i64,
            1024,
            1 << 20,
        ),
        max_uri_bytes: c.range(
            "server.max_uri_bytes".into(),
            s.max_uri_bytes as i64,
            256,
            1 << 20,
        ),
        max_headers: c.range("server.max_headers".into(), s.max_headers, 8, 10_000),
        max_header_line_bytes: c.range(
            "server.max_header_line_bytes".into(),
            i64::try_from(s.max_header_line_bytes).unwrap_or(i64::MAX),
            256,
            1 << 20,
        ),
        underscore_headers: s.underscore_headers,
        forwarded_headers: s.forwarded_headers,
        request_id_header: s.request_id_header,
        hide_backend_server: s.hide_backend_server,
        header_case: if s.preserve_header_case {
            crate::http::fields::Case::Preserve
        } else {
            crate::http::fields::Case::Canonical
        },
        trace_context: s.trace_context,
        watch_config: s.watch_config,
        access_log_flush: {
            if s.access_log_flush < Duration::from_millis(1)
                || s.access_log_flush > Duration::from_secs(1)
            {
                c.err(
                    "server.access_log_flush",
                    format!("must be between 1ms and 1s, got {:?}", s.access_log_flush),
                );
            }
            s.access_log_flush
        },
        access_log: match s.access_log.as_str() {
            "off" => crate::observe::LogTarget::Off,
            "stdout" => crate::observe::LogTarget::Stdout,
            path if Path::new(path).is_absolute() => {
                crate::observe::LogTarget::File(path.to_string())
            }
            other => {
                c.err(
                    "server.access_log",
                    format!("expected off, stdout or an absolute file path, got {other:?}"),
                );
                crate::observe::LogTarget::Off
            }
        },
    }
}

/// `server.otlp`: refused, at its position, by a binary built without the feature.
#[cfg(not(feature = "otlp"))]
fn compile_otlp(c: &mut Check, _o: &schema::OtlpSection, _trace_context: bool) -> Option<()> {
    c.err(
        "server.otlp",
        "built without the `otlp` feature; rebuild with --features otlp",
    );
    None
}

/// `server.otlp`: a plain-HTTP collector URL, a ratio, a positive timeout, valid headers.
#[cfg(feature = "otlp")]
fn compile_otlp(
    c: &mut Check,
    o: &schema::OtlpSection,
    trace_context: bool,
) -> Option<crate::otlp::OtlpSpec> {
    let before = c.problems.len();
    if !trace_context {
        c.err(
            "server.otlp",
            "needs server.trace_context: true (the span's id is the parent id sent upstream)",
        );
    }
    match o.endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty()) => {}
        Ok(uri) if uri.scheme_str() == Some("https") => c.err(
            "server.otlp.endpoint",
            "https is not supported (the exporter is built without TLS): use http:// to a local collector",
        ),
        _ => c.err(
            "server.otlp.endpoint",
            format!("expected an http:// URL such as http://127.0.0.1:4318/v1/traces, got {:?}", o.endpoint),
        ),
    }
    if o.service_name.trim().is_empty() {
        c.err("server.otlp.service_name", "must not be empty");
    }
    if !(0.0..=1.0).contains(&o.sample_ratio) {
        c.err(
            "server.otlp.sample_ratio",
            format!("must be between 0.0 and 1.0, got {}", o.sample_ratio),
        );
    }
    c.positive("server.otlp.timeout".into(), o.timeout);
    for (name, value) in &o.headers {
        let field = format!("server.otlp.headers.{name}");
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            c.err(field, format!("invalid header name {name:?}"));
        } else if HeaderValue::from_str(value).is_err() {
            c.err(field, "invalid header value (visible ASCII only)");
        }
    }
    let queue_size = c.range("server.otlp.queue_size".into(), o.queue_size, 1, 1_000_000);
    (c.problems.len() == before).then(|| crate::otlp::OtlpSpec {
        endpoint: o.endpoint.clone(),
        service_name: o.service_name.clone(),
        sample_below: crate::otlp::OtlpSpec::threshold(o.sample_ratio),
        timeout: o.timeout,
        headers: o
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        queue_size,
    })
}

fn compile_upstream(
    c: &mut Check,
    name: &str,
    u: &schema::UpstreamSection,
    base_dir: &Path,
) -> UpstreamSpec {
    let at = format!("upstreams.{name}");
    let first_host = u
        .backends
        .first()
        .and_then(|b| b.addr.rsplit_once(':'))
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| h.parse::<std::net::IpAddr>().is_err());
    let upstream_tls = u
        .tls
        .as_ref()
        .map(|t| tls::upstream(c, &at, t, first_host, base_dir));
    let http2 = u.protocol == schema::UpstreamProtocol::Http2;
    if u.backends.is_empty() {
        c.err(format!("{at}.backends"), "at least one backend is needed");
    }
    let mut backends = Vec::with_capacity(u.backends.len());
    let mut addrs = HashSet::new();
    for (i, b) in u.backends.iter().enumerate() {
        let weight = c.range(format!("{at}.backends[{i}].weight"), b.weight, 1, 1000);
        if let Some(addr) = backend_addr(c, format!("{at}.backends[{i}].addr"), &b.addr) {
            if !addrs.insert(addr) {
                c.err(
                    format!("{at}.backends[{i}].addr"),
                    format!("duplicate backend {addr}"),
                );
            }
            backends.push(BackendSpec { addr, weight });
        }
    }
    let balance = match (u.balance, &u.hash_key) {
        (BalanceSection::ConsistentHash, Some(key)) => match HashKey::parse(key) {
            Ok(k) => Balance::ConsistentHash(k),
            Err(e) => {
                c.err(format!("{at}.hash_key"), e);
                Balance::RoundRobin
            }
        },
        (BalanceSection::ConsistentHash, None) => {
            c.err(
                format!("{at}.balance"),
                "consistent_hash needs hash_key (header:NAME, client_ip or path)",
            );
            Balance::RoundRobin
        }
        (_, Some(_)) => {
            c.err(
                format!("{at}.hash_key"),
                "only used with balance: consistent_hash",
            );
            Balance::RoundRobin
        }
        (BalanceSection::RoundRobin | BalanceSection::Weighted, None) => Balance::RoundRobin,
        (BalanceSection::Random, None) => Balance::Random,
    };
    let health = u.health_check.as_ref().map(|h| {
        let hat = format!("{at}.health_check");
        if h.kind == schema::HealthKind::Http && !h.path.starts_with('/') {
            c.err(format!("{hat}.path"), "must start with /");
        }
        if h.expect_status.is_empty() {
            c.err(
                format!("{hat}.expect_status"),
                "at least one status is needed",
            );
        }
        for (i, s) in h.expect_status.iter().enumerate() {
            if !(100..=599).contains(s) {
                c.err(
                    format!("{hat}.expect_status[{i}]"),
                    format!("{s} is not an HTTP status"),
                );
            }
        }
        c.positive(format!("{hat}.interval"), h.interval);
        c.positive(format!("{hat}.timeout"), h.timeout);
        HealthSpec {
            kind: match h.kind {
                schema::HealthKind::Http => HealthKind::Http,
                schema::HealthKind::Tcp => HealthKind::Tcp,
                schema::HealthKind::Grpc => HealthKind::Grpc,
            },
            service: h.service.clone(),
            path: h.path.clone(),
            host: h.host.clone(),
            expect_status: h.expect_status.clone(),
            interval: h.interval,
            timeout: h.timeout,
            healthy_after: c.range(format!("{hat}.healthy_after"), h.healthy_after, 1, 100) as u32,
            unhealthy_after: c.range(format!("{hat}.unhealthy_after"), h.unhealthy_after, 1, 100)
                as u32,
            tls: upstream_tls.clone(),
            http2,
        }
    });
    UpstreamSpec {
        name: Arc::from(name),
        backends,
        balance,
        health,
        timeouts: compile_timeouts(c, &at, &u.timeouts),
        attempts: c.range(format!("{at}.retries.attempts"), u.retries.attempts, 1, 10),
        retry_on: {
            for (i, s) in u.retries.on_status.iter().enumerate() {
                if !(500..=599).contains(s) {
                    c.err(
                        format!("{at}.retries.on_status[{i}]"),
                        "only 5xx statuses can be retried",
                    );
                }
            }
            u.retries.on_status.clone()
        },
        budget: {
            let r = &u.retries;
            if !(0.0..=100.0).contains(&r.budget_percent) {
                c.err(
                    format!("{at}.retries.budget_percent"),
                    "must be between 0 and 100",
                );
            }
            c.positive(format!("{at}.retries.budget_window"), r.budget_window);
            BudgetSpec {
                ratio: r.budget_percent / 100.0,
                min_per_sec: c.range(
                    format!("{at}.retries.min_per_second"),
                    r.min_per_second,
                    0,
                    100_000,
                ) as u32,
                window: r.budget_window,
            }
        },
        backoff: u.retries.backoff,
        backoff_max: u.retries.backoff_max.max(u.retries.backoff),
        breaker: u
            .breaker
            .as_ref()
            .map(|b| compile_breaker(c, &format!("{at}.breaker"), b)),
        max_h2_streams: c.range(format!("{at}.max_h2_streams"), u.max_h2_streams, 1, 10_000),
        tls: upstream_tls,
        http2,
    }
}

fn compile_timeouts(c: &mut Check, at: &str, t: &schema::TimeoutsSection) -> Timeouts {
    for (field, d) in [
        ("connect", t.connect),
        ("read", t.read),
        ("write", t.write),
        ("total", t.total),
        ("idle", t.idle),
    ] {
        c.positive(format!("{at}.timeouts.{field}"), d);
    }
    Timeouts {
        connect: t.connect,
        read: t.read,
        write: t.write,
        total: t.total,
        idle: t.idle,
    }
}

fn compile_breaker(c: &mut Check, at: &str, b: &schema::BreakerSection) -> BreakerSpec {
    if !(b.failure_rate > 0.0 && b.failure_rate <= 100.0) {
        c.err(
            format!("{at}.failure_rate"),
            "must be a percent in (0, 100]",
        );
    }
    if !(b.max_open_percent > 0.0 && b.max_open_percent <= 100.0) {
        c.err(
            format!("{at}.max_open_percent"),
            "must be a percent in (0, 100]",
        );
    }
    c.positive(format!("{at}.window"), b.window);
    c.positive(format!("{at}.open_for"), b.open_for);
    let mut spec = BreakerSpec {
        failure_rate: b.failure_rate / 100.0,
        min_requests: c.range(format!("{at}.min_requests"), b.min_requests, 1, 1_000_000) as u32,
        consecutive_failures: c.range(
            format!("{at}.consecutive_failures"),
            b.consecutive_failures,
            0,
            1_000_000,
        ) as u32,
        window: b.window,
        open_for: b.open_for,
        half_open_probes: c.range(
            format!("{at}.half_open_probes"),
            b.half_open_probes,
            1,
            1000,
        ) as u32,
        on_connect: false,
        on_timeout: false,
        on_error: false,
        on_status: Vec::new(),
        max_open_share: b.max_open_percent / 100.0,
    };
    for (i, f) in b.failure_on.iter().enumerate() {
        match f {
            schema::FailureOn::Kind(k) if k == "connect" => spec.on_connect = true,
            schema::FailureOn::Kind(k) if k == "timeout" => spec.on_timeout = true,
            schema::FailureOn::Kind(k) if k == "error" => spec.on_error = true,
            schema::FailureOn::Status(s) if (100..=599).contains(s) => spec.on_status.push(*s),
            other => c.err(
                format!("{at}.failure_on[{i}]"),
                format!("{other:?} is not connect, timeout, error or an HTTP status"),
            ),
        }
    }
    spec
}

fn compile_redis(c: &mut Check, r: &schema::RedisSection) -> StoreSpec {
    if let Err(e) = redis::Client::open(r.url.as_str()) {
        c.err("redis.url", format!("invalid Redis URL: {e}"));
    }
    c.positive("redis.timeout".into(), r.timeout);
    StoreSpec {
        url: r.url.clone(),
        timeout: r.timeout,
        max_pending: c.range("redis.max_pending".into(), r.max_pending, 1, 1_000_000),
    }
}

fn compile_tiers(c: &mut Check, file: &FileConfig) -> Vec<TierSpec> {
    let mut names: Vec<&str> = BUILTIN_TIERS.to_vec();
    for name in file.tiers.keys() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let at = format!("tiers.{name}");
            if !jwt::valid_id(name) {
                c.err(at.clone(), "tier names are visible ASCII without commas");
            }
            let section = file.tiers.get(name).cloned().unwrap_or_default();
            let limit = section
                .limit
                .map(|l| c.range(format!("{at}.limit"), l, 1, 1_000_000_000) as u64);
            c.positive(format!("{at}.window"), section.window);
            if section.window > Duration::from_secs(86_400) {
                c.err(format!("{at}.window"), "must be at most 24h");
            }
            let burst = section
                .burst
                .map(|b| c.range(format!("{at}.burst"), b, 0, 1_000_000_000) as u64)
                .unwrap_or(0);
            if burst > 0 && limit.is_none() {
                c.err(format!("{at}.burst"), "a burst needs a limit");
            }
            TierSpec {
                name: Arc::from(name),
                limit,
                window: section.window,
                burst,
            }
        })
        .collect()
}

fn tier_algo(t: &TierSpec) -> Option<Algo> {
    let limit = t.limit?;
    let window_ms = t.window.as_millis().max(1) as u64;
    Some(if t.burst > 0 {
        Algo::Gcra {
            limit,
            window_ms,
            burst: t.burst,
        }
    } else {
        Algo::SlidingWindow { limit, window_ms }
    })
}

fn compile_limits(c: &mut Check, file: &FileConfig) -> limit::Settings {
    let r = &file.rate_limit;
    let mode = match (r.mode, file.redis.is_some()) {
        (Some(schema::LimitMode::Local), _) | (None, false) => limit::Mode::Local,
        (Some(schema::LimitMode::Exact), true) | (None, true) => limit::Mode::Exact,
        (Some(schema::LimitMode::Batched), true) => limit::Mode::Batched,
        (Some(_), false) => {
            c.err(
                "rate_limit.mode",
                "exact and batched modes need a `redis:` section",
            );
            limit::Mode::Local
        }
    };
    if r.sync_interval < Duration::from_millis(10) || r.sync_interval > Duration::from_secs(10) {
        c.err("rate_limit.sync_interval", "must be between 10ms and 10s");
    }
    limit::Settings {
        mode,
        sync_interval: r.sync_interval,
        on_failure: match r.on_failure {
            schema::OnFailureSection::Local => limit::OnFailure::Local,
            schema::OnFailureSection::Allow => limit::OnFailure::Allow,
            schema::OnFailureSection::Deny => limit::OnFailure::Deny,
        },
        assume_nodes: c.range("rate_limit.assume_nodes".into(), r.assume_nodes, 1, 1000),
        exact_batch: c.range("rate_limit.exact_batch".into(), r.exact_batch, 1, 1024),
    }
}

fn compile_route_limit(
    c: &mut Check,
    at: &str,
    r: &schema::RouteSection,
    tier_algos: &[Option<Algo>],
    tier_index: &HashMap<String, usize>,
    tier_count: usize,
) -> RoutePolicy {
    // A policy where no tier has a limit decides nothing: off, so requests skip the limiter.
    let tiers_wide = RoutePolicy {
        enabled: tier_algos.iter().any(Option::is_some),
        key: KeyKind::Consumer,
        scope: Arc::from("t"),
        per_tier: Arc::from(tier_algos),
        per_tier_cache: PerTier::for_tiers(tier_algos.len()),
    };
    let Some(rl) = &r.rate_limit else {
        return tiers_wide;
    };
    let key = match rl.key.as_deref() {
        None | Some("consumer") => KeyKind::Consumer,
        Some("ip") => KeyKind::Ip,
        Some("route_consumer") => KeyKind::RouteConsumer,
        Some(other) => match other
            .strip_prefix("header:")
            .map(|h| HeaderName::from_bytes(h.trim().as_bytes()))
        {
            Some(Ok(h)) => KeyKind::Header(h),
            _ => {
                c.err(
                    format!("{at}.rate_limit.key"),
                    format!("unknown key {other:?}: expected consumer, ip, header:NAME or route_consumer"),
                );
                KeyKind::Consumer
            }
        },
    };
    let mut per_tier: Vec<Option<Algo>> = tier_algos.to_vec();
    per_tier.resize(tier_count, None);
    let scope: Arc<str> = if rl.limits.is_empty() {
        Arc::from("t")
    } else {
        Arc::from(format!("r:{}", r.name).as_str())
    };
    for (name, section) in &rl.limits {
        let field = format!("{at}.rate_limit.limits.{name}");
        let Some(&t) = tier_index.get(name) else {
            c.err(field, format!("unknown tier {name:?}"));
            continue;
        };
        let limit = section
            .limit
            .map(|l| c.range(format!("{field}.limit"), l, 1, 1_000_000_000) as u64);
        c.positive(format!("{field}.window"), section.window);
        let burst = section
            .burst
            .map(|b| c.range(format!("{field}.burst"), b, 0, 1_000_000_000) as u64)
            .unwrap_or(0);
        per_tier[t] = tier_algo(&TierSpec {
            name: Arc::from(name.as_str()),
            limit,
            window: section.window,
            burst,
        });
    }
    RoutePolicy {
        enabled: rl.enabled && per_tier.iter().any(Option::is_some),
        key,
        scope,
        per_tier_cache: PerTier::for_tiers(per_tier.len()),
        per_tier: Arc::from(per_tier),
    }
}

fn tier_of(c: &mut Check, field: String, name: &str, index: &HashMap<String, usize>) -> usize {
    match index.get(name) {
        Some(&t) => t,
        None => {
            let mut known: Vec<&str> = index.keys().map(String::as_str).collect();
            known.sort();
            c.err(
                field,
                format!("unknown tier {name:?} (known: {})", known.join(", ")),
            );
            identity::ANONYMOUS
        }
    }
}

fn compile_identity(
    c: &mut Check,
    file: &FileConfig,
    tier_index: &HashMap<String, usize>,
    tiers: &[TierSpec],
    base_dir: &Path,
) -> IdentityConfig {
    let mut keys = HashMap::new();
    let mut certs = identity::CertConsumers::default();
    let mut ids = HashSet::new();
    for (i, cs) in file.consumers.iter().enumerate() {
        let at = format!("consumers[{i}]");
        if !jwt::valid_id(&cs.id) {
            c.err(
                format!("{at}.id"),
                "must be 1-256 visible ASCII characters without commas",
            );
        } else if !ids.insert(cs.id.as_str()) {
            c.err(
                format!("{at}.id"),
                format!("duplicate consumer {:?}", cs.id),
            );
        }
        let tier = tier_of(c, format!("{at}.tier"), &cs.tier, tier_index);
        if tier == identity::ANONYMOUS && cs.tier == "anonymous" {
            c.err(
                format!("{at}.tier"),
                "a consumer cannot be in the anonymous tier",
            );
        }
        for (j, r) in cs.roles.iter().enumerate() {
            if !jwt::valid_id(r) {
                c.err(
                    format!("{at}.roles[{j}]"),
                    "roles are visible ASCII without commas",
                );
            }
        }
        let consumer = Arc::new(Consumer {
            id: Arc::from(cs.id.as_str()),
            tier,
            roles: cs.roles.iter().map(|r| Arc::from(r.as_str())).collect(),
        });
        for (j, m) in cs.client_certs.iter().enumerate() {
            let mat = format!("{at}.client_certs[{j}]");
            if let Some(m) = tls::client_cert_match(c, &mat, m) {
                if !certs.insert(m, consumer.clone()) {
                    c.err(mat, "another consumer already has this certificate");
                }
            }
        }
        for (j, k) in cs.api_keys.iter().enumerate() {
            match keys::parse_hash(k) {
                Ok(h) => {
                    if keys.insert(h, consumer.clone()).is_some() {
                        c.err(
                            format!("{at}.api_keys[{j}]"),
                            "this key hash is listed twice",
                        );
                    }
                }
                Err(e) => c.err(format!("{at}.api_keys[{j}]"), e),
            }
        }
    }
    let a = &file.auth;
    let key_header = match HeaderName::from_bytes(a.api_key.header.as_bytes()) {
        Ok(h) if !identity::is_identity_header(h.as_str()) && h != http::header::AUTHORIZATION => h,
        _ => {
            c.err(
                "auth.api_key.header",
                format!("invalid header name {:?}", a.api_key.header),
            );
            HeaderName::from_static("x-api-key")
        }
    };
    if a.api_key.query_param.is_empty() || a.api_key.query_param.contains(['&', '=', ' ']) {
        c.err("auth.api_key.query_param", "must be a plain parameter name");
    }
    c.positive("auth.key_cache_ttl".into(), a.key_cache_ttl);
    let mut default_jwt_tier = tier_index.get("free").copied().unwrap_or(1);
    let jwt = a.jwt.as_ref().and_then(|j| {
        default_jwt_tier = tier_of(
            c,
            "auth.jwt.default_tier".into(),
            &j.default_tier,
            tier_index,
        );
        let mut pem_files = Vec::new();
        let mut secrets = Vec::new();
        for (i, k) in j.keys.iter().enumerate() {
            match (&k.public_key_file, &k.secret_env) {
                (Some(f), None) => pem_files.push((k.kid.clone(), f.clone())),
                (None, Some(v)) => secrets.push((k.kid.clone(), v.clone())),
                _ => c.err(
                    format!("auth.jwt.keys[{i}]"),
                    "set exactly one of public_key_file and secret_env",
                ),
            }
        }
        let settings = jwt::JwtSettings {
            algorithms: &j.algorithms,
            pem_files,
            secrets,
            jwks_file: j.jwks_file.clone(),
            issuer: j.issuer.clone(),
            audience: j.audience.clone(),
            leeway: j.leeway,
            subject_claim: j.subject_claim.clone(),
            tier_claim: j.tier_claim.clone(),
            roles_claim: j.roles_claim.clone(),
        };
        match jwt::JwtVerifier::new(settings, base_dir) {
            Ok(v) => Some(v),
            Err(errors) => {
                for (field, message) in errors {
                    c.err(format!("auth.jwt.{field}"), message);
                }
                None
            }
        }
    });
    IdentityConfig {
        tiers: tiers.iter().map(|t| t.name.clone()).collect(),
        tier_values: tiers
            .iter()
            .map(|t| {
                HeaderValue::from_str(&t.name)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
            })
            .collect(),
        tier_index: tier_index.clone(),
        keys,
        key_header,
        key_query: a.api_key.query_param.clone(),
        jwt,
        default_jwt_tier,
        key_cache_ttl: a.key_cache_ttl,
        certs,
    }
}

fn compile_admin(c: &mut Check, a: &schema::AdminSection) -> Option<String> {
    let token = match (&a.token, &a.token_env) {
        (Some(_), Some(_)) => {
            c.err("admin", "set only one of token and token_env");
            None
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(var)) => match std::env::var(var) {
            Ok(t) => Some(t),
            Err(_) => {
                c.err(
                    "admin.token_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        (None, None) => None,
    };
    if let Some(t) = &token {
        if t.len() < 16 {
            c.err("admin", "the admin token must be at least 16 characters");
        }
    }
    token
}

fn compile_route(
    c: &mut Check,
    at: &str,
    r: &schema::RouteSection,
    upstream: usize,
    file: &FileConfig,
) -> Option<Route> {
    let m = &r.matcher;
    let hosts = m
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| match HostMatch::parse(h) {
            Ok(h) => Some(h),
            Err(e) => {
                c.err(format!("{at}.match.hosts[{i}]"), e);
                None
            }
        })
        .collect();
    let set = [&m.path, &m.path_prefix, &m.path_regex]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if set > 1 {
        c.err(
            format!("{at}.match"),
            "use only one of path, path_prefix and path_regex",
        );
    }
    let mut path_ok = |field: &str, p: &str| {
        if !p.starts_with('/') {
            c.err(format!("{at}.match.{field}"), "must start with /");
        }
    };
    let path = if let Some(p) = &m.path {
        path_ok("path", p);
        PathMatch::Exact(p.clone())
    } else if let Some(p) = &m.path_prefix {
        path_ok("path_prefix", p);
        PathMatch::Prefix(p.clone())
    } else if let Some(p) = &m.path_regex {
        match Regex::new(p) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => {
                c.err(
                    format!("{at}.match.path_regex"),
                    format!("invalid regex: {e}"),
                );
                PathMatch::Any
            }
        }
    } else {
        PathMatch::Any
    };
    let methods = m
        .methods
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let upper = name.to_ascii_uppercase();
            match Method::from_bytes(upper.as_bytes()) {
                Ok(method) => Some(method),
                Err(_) => {
                    c.err(
                        format!("{at}.match.methods[{i}]"),
                        format!("invalid method {name:?}"),
                    );
                    None
                }
            }
        })
        .collect();
    let rewrite = match (&r.rewrite, r.strip_prefix) {
        (Some(_), true) => {
            c.err(
                format!("{at}.rewrite"),
                "use either strip_prefix or rewrite, not both",
            );
            Rewrite::None
        }
        (None, true) => match &m.path_prefix {
            Some(p) => Rewrite::StripPrefix(p.clone()),
            None => {
                c.err(format!("{at}.strip_prefix"), "needs match.path_prefix");
                Rewrite::None
            }
        },
        (Some(rw), false) => match Regex::new(&rw.pattern) {
            Ok(pattern) => {
                if !rw.to.starts_with('/') {
                    c.err(format!("{at}.rewrite.to"), "must start with /");
                }
                Rewrite::Regex {
                    pattern,
                    to: rw.to.clone(),
                }
            }
            Err(e) => {
                c.err(
                    format!("{at}.rewrite.pattern"),
                    format!("invalid regex: {e}"),
                );
                Rewrite::None
            }
        },
        (None, false) => Rewrite::None,
    };
    let compression = r.compression.as_ref().and_then(|z| {
        for (field, level, max) in [
            ("gzip", z.gzip, 9),
            ("brotli", z.brotli, 11),
            ("zstd", z.zstd, 19),
        ] {
            if level > max {
                c.err(
                    format!("{at}.compression.{field}"),
                    format!("level must be between 0 (off) and {max}, got {level}"),
                );
            }
        }
        let z = Compression {
            gzip: z.gzip,
            brotli: z.brotli,
            zstd: z.zstd,
        };
        (z.gzip + z.brotli + z.zstd > 0).then_some(z)
    });
    for (i, role) in r.roles.iter().enumerate() {
        if !jwt::valid_id(role) {
            c.err(
                format!("{at}.roles[{i}]"),
                "roles are visible ASCII without commas",
            );
        }
    }
    let mode = match r.auth {
        schema::AuthMode::None => Mode::None,
        schema::AuthMode::Optional => Mode::Optional,
        schema::AuthMode::Required => Mode::Required,
    };
    if mode == Mode::None && !r.roles.is_empty() {
        c.err(
            format!("{at}.roles"),
            "roles need `auth: required` (or optional)",
        );
    }
    if mode != Mode::None
        && file.consumers.is_empty()
        && file.auth.jwt.is_none()
        && file.redis.is_none()
    {
        c.err(
            format!("{at}.auth"),
            "no credential can ever be valid: configure consumers, auth.jwt or redis (issued keys)",
        );
    }
    let auth = Policy {
        mode,
        roles: r.roles.iter().map(|s| Arc::from(s.as_str())).collect(),
        allow_query_key: r.allow_query_key,
    };
    Some(Route {
        name: Arc::from(r.name.as_str()),
        limit: RoutePolicy {
            enabled: false,
            key: KeyKind::Consumer,
            scope: Arc::from("t"),
            per_tier: Arc::from([]),
            per_tier_cache: Arc::from([]),
        },
        auth,
        hosts,
        path,
        methods,
        upstream,
        rewrite,
        shed: {
            let n = c.range(format!("{at}.max_inflight"), r.max_inflight, 0, 10_000_000);
            let (queue, queue_timeout) = match &r.queue {
                Some(q) => {
                    if n == 0 {
                        c.err(format!("{at}.queue"), "a queue needs max_inflight");
                    }
                    c.positive(format!("{at}.queue.timeout"), q.timeout);
                    (
                        c.range(format!("{at}.queue.size"), q.size, 1, 1_000_000),
                        q.timeout,
                    )
                }
                None => (0, Duration::ZERO),
            };
            (n > 0).then_some(ShedSpec {
                max_inflight: n,
                queue,
                queue_timeout,
            })
        },
        max_body: r.max_body,
        timeouts: r.timeouts.as_ref().map(|t| compile_timeouts(c, at, t)),
        compression,
        cache: r
            .cache
            .as_ref()
            .map(|cache| compile_route_cache(c, at, cache, mode)),
        redirect_https: r.redirect_https,
        hsts: tls::hsts(c, at, r.hsts.as_deref()),
        grpc_web: {
            if r.grpc_web
                && file
                    .upstreams
                    .get(&r.upstream)
                    .is_some_and(|u| u.protocol != schema::UpstreamProtocol::Http2)
            {
                c.err(
                    format!("{at}.grpc_web"),
                    "gRPC-web needs a gRPC upstream: set `protocol: http2` on it",
                );
            }
            r.grpc_web
        },
    })
}

fn compile_cache(c: &mut Check, file: &FileConfig) -> crate::cache::Settings {
    let s = &file.cache;
    if s.max_size < 1 << 20 {
        c.err("cache.max_size", "must be at least 1MiB");
    }
    if s.redis && file.redis.is_none() {
        c.err("cache.redis", "needs a `redis:` section");
    }
    crate::cache::Settings {
        max_bytes: s.max_size,
        redis: s.redis,
    }
}

fn compile_route_cache(
    c: &mut Check,
    at: &str,
    s: &schema::RouteCacheSection,
    mode: Mode,
) -> crate::cache::Policy {
    c.positive(format!("{at}.cache.ttl"), s.ttl);
    if s.max_body == 0 || s.max_body > 64 << 20 {
        c.err(
            format!("{at}.cache.max_body"),
            "must be between 1 byte and 64MiB",
        );
    }
    let vary = s
        .vary
        .iter()
        .enumerate()
        .filter_map(|(i, name)| match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                c.err(
                    format!("{at}.cache.vary[{i}]"),
                    format!("invalid header name {name:?}"),
                );
                None
            }
        })
        .collect();
    let authenticated = mode != Mode::None;
    let per_consumer = match s.scope {
        Some(schema::CacheScope::Consumer) => {
            if !authenticated {
                c.err(
                    format!("{at}.cache.scope"),
                    "`consumer` needs `auth: required` or `optional` on the route",
                );
            }
            true
        }
        Some(schema::CacheScope::Shared) => false,
        None => authenticated,
    };
    crate::cache::Policy {
        ttl: s.ttl,
        stale_while_revalidate: s.stale_while_revalidate,
        stale_if_error: s.stale_if_error,
        max_body: usize::try_from(s.max_body).unwrap_or(usize::MAX),
        vary,
        per_consumer,
        authenticated,
    }
}
