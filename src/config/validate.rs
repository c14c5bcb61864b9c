//! Validation and compilation of the parsed file: every problem is collected (never only the
//! first), and a file with none becomes a [`GatewayConfig`] of compiled matchers, socket
//! addresses, `Duration`s and enums. Pure: no network except resolving backend host names.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use regex::Regex;

use super::schema::{self, BalanceSection, FileConfig};
use super::Problem;
use crate::route::{Compression, HostMatch, PathMatch, Rewrite, Route};
use crate::upstream::{
    BackendSpec, Balance, HashKey, HealthKind, HealthSpec, Timeouts, UpstreamSpec,
};

/// A validated, compiled config: everything the runtime snapshot is built from.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub server: ServerSettings,
    pub upstreams: Vec<UpstreamSpec>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    pub grace_period: Duration,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    pub keepalive_timeout: Duration,
    pub h2c: bool,
}

struct Check {
    problems: Vec<Problem>,
}

impl Check {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, field: String, d: Duration) {
        if d.is_zero() {
            self.err(field, "must be greater than zero");
        }
    }

    fn range(&mut self, field: String, v: i64, lo: i64, hi: i64) -> usize {
        if v < lo || v > hi {
            self.err(field, format!("must be between {lo} and {hi}, got {v}"));
        }
        v.clamp(lo, hi) as usize
    }
}

fn socket_addr(c: &mut Check, field: String, text: &str) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.err(field, format!("invalid address {text:?}: expected IP:PORT"));
            None
        }
    }
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
    let _ = base_dir; // paths relative to the file arrive with later sections (keys, certificates)
    let mut c = Check {
        problems: Vec::new(),
    };
    let server = compile_server(&mut c, &file.server);

    let mut upstreams = Vec::with_capacity(file.upstreams.len());
    let mut upstream_index = HashMap::new();
    for (name, section) in &file.upstreams {
        upstream_index.insert(name.as_str(), upstreams.len());
        upstreams.push(compile_upstream(&mut c, name, section));
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
        if let Some(route) = compile_route(&mut c, &at, section, upstream) {
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
    let admin_listen = s
        .admin_listen
        .as_deref()
        .and_then(|a| socket_addr(c, "server.admin_listen".into(), a));
    if let Some(admin) = admin_listen {
        if listen.contains(&admin) {
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
    ServerSettings {
        listen,
        admin_listen,
        threads,
        grace_period: s.grace_period,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        keepalive_timeout: s.keepalive_timeout,
        h2c: s.h2c,
    }
}

fn compile_upstream(c: &mut Check, name: &str, u: &schema::UpstreamSection) -> UpstreamSpec {
    let at = format!("upstreams.{name}");
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
            },
            path: h.path.clone(),
            host: h.host.clone(),
            expect_status: h.expect_status.clone(),
            interval: h.interval,
            timeout: h.timeout,
            healthy_after: c.range(format!("{hat}.healthy_after"), h.healthy_after, 1, 100) as u32,
            unhealthy_after: c.range(format!("{hat}.unhealthy_after"), h.unhealthy_after, 1, 100)
                as u32,
        }
    });
    let t = &u.timeouts;
    for (field, d) in [
        ("connect", t.connect),
        ("read", t.read),
        ("write", t.write),
        ("total", t.total),
        ("idle", t.idle),
    ] {
        c.positive(format!("{at}.timeouts.{field}"), d);
    }
    UpstreamSpec {
        name: Arc::from(name),
        backends,
        balance,
        health,
        timeouts: Timeouts {
            connect: t.connect,
            read: t.read,
            write: t.write,
            total: t.total,
            idle: t.idle,
        },
        attempts: c.range(format!("{at}.retries.attempts"), u.retries.attempts, 1, 10),
    }
}

fn compile_route(
    c: &mut Check,
    at: &str,
    r: &schema::RouteSection,
    upstream: usize,
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
    Some(Route {
        name: Arc::from(r.name.as_str()),
        hosts,
        path,
        methods,
        upstream,
        rewrite,
        compression,
    })
}
