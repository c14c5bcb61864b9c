//! Route matching: host (exact or `*.suffix`), path (exact, segment-aware prefix, or regex) and
//! method, tried in file order, first match wins; plus the path rewrite a route asks for.
//! Matching never allocates and never fails: a request either has a route or gets a 404.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;
use regex::Regex;

/// How a route matches the Host header (port stripped, compared case-insensitively).
#[derive(Debug, Clone)]
pub enum HostMatch {
    /// Lower-case exact name.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches `a.example.com`, `a.b.example.com`,
    /// not `example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let p = pattern.trim().to_ascii_lowercase();
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if let Some(rest) = p.strip_prefix("*.") {
            if !valid(rest) || rest.starts_with('.') {
                return Err(format!("invalid wildcard host {pattern:?}"));
            }
            return Ok(Self::Suffix(format!(".{rest}")));
        }
        if !valid(&p) {
            return Err(format!(
                "invalid host {pattern:?}: expected a name or `*.domain`"
            ));
        }
        Ok(Self::Exact(p))
    }

    /// `host` is already lower-case and has no port.
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    Exact(String),
    /// Segment-aware: `/api` matches `/api` and `/api/x`, never `/apix`. A prefix ending in `/`
    /// matches everything below it.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(p) => path == p,
            Self::Prefix(p) => prefix_matches(p, path),
            Self::Regex(re) => re.is_match(path),
        }
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    /// Empty = any method.
    pub methods: Vec<Method>,
    /// Index into the snapshot's upstreams.
    pub upstream: usize,
    pub rewrite: Rewrite,
    /// Compression levels (gzip, brotli, zstd); `None` = leave responses as they are.
    pub compression: Option<Compression>,
    pub auth: crate::identity::Policy,
    pub limit: crate::limit::RoutePolicy,
    /// Overrides the upstream's timeouts.
    pub timeouts: Option<crate::upstream::Timeouts>,
    /// In-flight limit (and wait queue) of this route.
    pub shed: Option<crate::shed::ShedSpec>,
    /// Request body limit in bytes.
    pub max_body: Option<u64>,
    /// Response cache policy; `None` = not cached.
    pub cache: Option<crate::cache::Policy>,
    /// Plain-HTTP requests are answered with a 308 to HTTPS.
    pub redirect_https: bool,
    /// `Strict-Transport-Security` on responses sent over TLS.
    pub hsts: Option<http::HeaderValue>,
    /// gRPC-web calls are bridged to gRPC (pingora's gRPC-web module).
    pub grpc_web: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    pub gzip: u32,
    pub brotli: u32,
    pub zstd: u32,
}

#[derive(Debug, Clone)]
pub enum Rewrite {
    None,
    /// Remove this prefix (the route's `path_prefix`).
    StripPrefix(String),
    Regex {
        pattern: Regex,
        to: String,
    },
}

impl Route {
    /// The route looks at the host (otherwise any host matches).
    pub fn matches_host(&self) -> bool {
        !self.hosts.is_empty()
    }

    pub fn matches(&self, host: &str, path: &str, method: &Method) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && self.path.matches(path)
    }

    /// The route changes the path sent upstream (strip_prefix or a rewrite).
    pub fn rewrites(&self) -> bool {
        !matches!(self.rewrite, Rewrite::None)
    }

    /// The path to send upstream, or `None` when it is unchanged.
    pub fn rewrite_path<'a>(&self, path: &'a str) -> Option<Cow<'a, str>> {
        match &self.rewrite {
            Rewrite::None => None,
            Rewrite::StripPrefix(prefix) => {
                let rest = path.strip_prefix(prefix.trim_end_matches('/'))?;
                if rest.starts_with('/') {
                    Some(Cow::Borrowed(rest))
                } else {
                    Some(Cow::Owned(format!("/{rest}")))
                }
            }
            Rewrite::Regex { pattern, to } => match pattern.replace(path, to.as_str()) {
                Cow::Borrowed(_) => None,
                Cow::Owned(s) => Some(Cow::Owned(s)),
            },
        }
    }
}

/// Lower-case the Host value and drop its port. Returns `Cow::Borrowed` when already clean.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        match raw.find(']') {
            Some(i) => &raw[..=i],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// First route that matches, in file order.
pub fn find<'r>(routes: &'r [Route], host: &str, path: &str, method: &Method) -> Option<&'r Route> {
    routes.iter().find(|r| r.matches(host, path, method))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A route matching everything, with no feature on (for other modules' tests).
    pub(crate) fn plain_route() -> Route {
        route("r", &[], PathMatch::Any, &[])
    }

    fn route(name: &str, hosts: &[&str], path: PathMatch, methods: &[&str]) -> Route {
        Route {
            name: name.into(),
            hosts: hosts
                .iter()
                .map(|h| HostMatch::parse(h).expect("host"))
                .collect(),
            path,
            methods: methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("method"))
                .collect(),
            upstream: 0,
            rewrite: Rewrite::None,
            compression: None,
            auth: Default::default(),
            limit: crate::limit::RoutePolicy {
                enabled: false,
                key: crate::limit::KeyKind::Consumer,
                scope: Arc::from("t"),
                per_tier: Arc::from([]),
                per_tier_cache: Arc::from([]),
            },
            timeouts: None,
            shed: None,
            max_body: None,
            cache: None,
            redirect_https: false,
            hsts: None,
            grpc_web: false,
        }
    }

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn wildcard_hosts() {
        let h = HostMatch::parse("*.Example.com").expect("parse");
        assert!(h.matches("a.example.com"));
        assert!(h.matches("a.b.example.com"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches("badexample.com"));
        assert!(HostMatch::parse("*.").is_err());
        assert!(HostMatch::parse("a b").is_err());
        assert!(HostMatch::parse("*.*.x").is_err());
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Api.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert!(matches!(normalize_host("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let routes = vec![
            route("exact", &[], PathMatch::Exact("/a".into()), &[]),
            route("get-only", &[], PathMatch::Prefix("/a".into()), &["GET"]),
            route("host", &["*.x.io"], PathMatch::Any, &[]),
            route("fallback", &[], PathMatch::Prefix("/".into()), &[]),
        ];
        let name = |h, p, m: &str| {
            find(&routes, h, p, &Method::from_bytes(m.as_bytes()).expect("m")).map(|r| &*r.name)
        };
        assert_eq!(name("h", "/a", "POST"), Some("exact"));
        assert_eq!(name("h", "/a/b", "GET"), Some("get-only"));
        assert_eq!(name("y.x.io", "/a/b", "POST"), Some("host"));
        assert_eq!(name("h", "/z", "POST"), Some("fallback"));
        assert_eq!(
            find(&routes[..3], "h", "/z", &Method::GET).map(|r| &*r.name),
            None
        );
    }

    #[test]
    fn rewrites() {
        let mut r = route("r", &[], PathMatch::Prefix("/api".into()), &[]);
        r.rewrite = Rewrite::StripPrefix("/api".into());
        assert_eq!(r.rewrite_path("/api/users").as_deref(), Some("/users"));
        assert_eq!(r.rewrite_path("/api").as_deref(), Some("/"));
        r.rewrite = Rewrite::Regex {
            pattern: Regex::new("^/old/(.*)$").expect("re"),
            to: "/new/$1".into(),
        };
        assert_eq!(r.rewrite_path("/old/x").as_deref(), Some("/new/x"));
        assert_eq!(r.rewrite_path("/other"), None);
    }
}
