//! Route matching and rewrites on any host, path and method: never a panic, and `find` agrees
//! with trying each route in file order.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate::config::GatewayConfig;
use tollgate::route::{self, Rewrite};

/// Every kind of match and rewrite the config language has.
const CONFIG: &str = r#"
server:
  listen: ["127.0.0.1:8080"]
upstreams:
  u:
    backends: [{ addr: "127.0.0.1:1" }]
routes:
  - name: exact-host-prefix-strip
    match: { hosts: ["api.example.com"], path_prefix: /api, methods: [GET, POST] }
    upstream: u
    strip_prefix: true
  - name: wildcard-exact-path
    match: { hosts: ["*.example.com"], path: /health }
    upstream: u
  - name: slash-prefix-strip
    match: { path_prefix: /static/ }
    upstream: u
    strip_prefix: true
  - name: regex-rewrite
    match: { path_regex: "^/v[0-9]+/" }
    upstream: u
    rewrite: { pattern: "^/v([0-9]+)/(.*)$", to: "/version/$1/$2" }
  - name: punycode-host-method
    match: { hosts: ["xn--bcher-kva.example", "localhost"], methods: [DELETE] }
    upstream: u
  - name: fallback
    upstream: u
"#;

fn config() -> &'static GatewayConfig {
    static CONFIG_ONCE: OnceLock<GatewayConfig> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| {
        match tollgate::config::load_str(Path::new("/nonexistent/fuzz.yaml"), CONFIG) {
            Ok(c) => c,
            Err(e) => panic!("the fuzz config does not load: {e:?}"),
        }
    })
}

fuzz_target!(|input: (&str, &str, &[u8])| {
    let (host, path, method) = input;
    let routes = &config().routes;
    let host = route::normalize_host(host);
    assert!(
        !host.bytes().any(|b| b.is_ascii_uppercase()),
        "not lower-cased: {host:?}"
    );
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let found = route::find(routes, &host, path, &method).map(|r| &*r.name);
    let first = routes
        .iter()
        .find(|r| r.matches(&host, path, &method))
        .map(|r| &*r.name);
    assert_eq!(found, first);
    for r in routes {
        let rewritten = r.rewrite_path(path);
        if let (Rewrite::StripPrefix(_), Some(p)) = (&r.rewrite, &rewritten) {
            assert!(p.starts_with('/'), "{}: {path:?} -> {p:?}", r.name);
        }
        if matches!(r.rewrite, Rewrite::None) {
            assert!(rewritten.is_none());
        }
    }
});
