//! Criterion benches of the functions every request runs: route matching, backend selection,
//! authentication, and on limited routes the local limiter's decision and its response fields.
//!
//! ```text
//! cargo bench --bench hot_path
//! ```

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;

use tollgate::config;
use tollgate::route;
use tollgate::upstream::backend::BackendState;
use tollgate::upstream::Upstream;

fn config_with_routes(n: usize, balance: &str) -> config::GatewayConfig {
    let mut text = format!(
        "server:\n  listen: [\"127.0.0.1:8080\"]\nupstreams:\n  u:\n    balance: {balance}\n    backends:\n"
    );
    for i in 0..8 {
        text.push_str(&format!("      - {{ addr: \"10.0.0.{i}:80\" }}\n"));
    }
    if balance == "consistent_hash" {
        text.push_str("    hash_key: header:X-User\n");
    }
    text.push_str("routes:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - {{ name: r{i}, match: {{ hosts: [\"*.svc{i}.example.com\"], path_prefix: /api/v{i}, methods: [GET, POST] }}, upstream: u }}\n"
        ));
    }
    text.push_str("  - { name: last, match: { path_prefix: /api }, upstream: u }\n");
    config::load_str(Path::new("bench.yaml"), &text).expect("bench config")
}

fn upstream(cfg: &config::GatewayConfig) -> Upstream {
    let spec = cfg.upstreams[0].clone();
    let states = spec
        .backends
        .iter()
        .map(|_| std::sync::Arc::new(BackendState::new(true)))
        .collect();
    Upstream::new(spec, states, Default::default())
}

fn bench(c: &mut Criterion) {
    let cfg = config_with_routes(1, "round_robin");
    c.bench_function("route/first_of_2", |b| {
        b.iter(|| {
            route::find(
                &cfg.routes,
                black_box("a.svc0.example.com"),
                black_box("/api/v0/items"),
                &Method::GET,
            )
        })
    });
    let cfg20 = config_with_routes(20, "round_robin");
    c.bench_function("route/fallthrough_21", |b| {
        b.iter(|| {
            route::find(
                &cfg20.routes,
                black_box("other.host"),
                black_box("/api/items"),
                &Method::GET,
            )
        })
    });
    c.bench_function("route/normalize_host", |b| {
        b.iter(|| route::normalize_host(black_box("Api.Example.com:8080")))
    });
    let rr = upstream(&cfg);
    c.bench_function("select/round_robin_8", |b| {
        b.iter(|| rr.select(black_box(b""), &[]))
    });
    let ch = upstream(&config_with_routes(1, "consistent_hash"));
    c.bench_function("select/consistent_hash_8", |b| {
        b.iter(|| ch.select(black_box(b"user-12345"), &[]))
    });
    rr.backends[3].set_healthy(false);
    c.bench_function("select/round_robin_8_one_down_one_tried", |b| {
        b.iter(|| rr.select(black_box(b""), &[4]))
    });
}

fn identity_bench(c: &mut Criterion) {
    use futures_util::FutureExt;
    use tollgate::identity::{self, keys, Mode, Policy};
    let root = env!("CARGO_MANIFEST_DIR");
    let key = "tg_bench_key_0000000000000000000000000000";
    std::env::set_var("TOLLGATE_BENCH_SECRET", "0123456789abcdef0123456789abcdef");
    let text = format!(
        "server:\n  listen: [\"127.0.0.1:8080\"]\nconsumers:\n  - {{ id: alice, tier: pro, api_keys: [\"{}\"] }}\nauth:\n  jwt:\n    algorithms: [RS256, HS256]\n    keys: [{{ kid: r, public_key_file: \"{root}/tests/fixtures/jwt/rsa.pub\" }}, {{ kid: h, secret_env: TOLLGATE_BENCH_SECRET }}]\nupstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\nroutes:\n  - {{ name: r, upstream: u, auth: required }}\n",
        keys::format_hash(&keys::hash(key))
    );
    let cfg = config::load_str(Path::new("bench.yaml"), &text).expect("bench config");
    let policy = Policy {
        mode: Mode::Required,
        roles: vec![],
        allow_query_key: false,
    };
    let mut with_key = http::HeaderMap::new();
    with_key.insert("x-api-key", http::HeaderValue::from_static(key));
    c.bench_function("identity/yaml_key", |b| {
        b.iter(|| {
            identity::authenticate(
                &cfg.identity,
                None,
                &policy,
                black_box(&with_key),
                None,
                None,
            )
            .now_or_never()
            .expect("no await on this path")
        })
    });
    let claims = serde_json::json!({"sub": "carol", "tier": "pro", "exp": 4_000_000_000u64});
    let rsa = jsonwebtoken::EncodingKey::from_rsa_pem(
        &std::fs::read(format!("{root}/tests/fixtures/jwt/rsa.key")).expect("key"),
    )
    .expect("pem");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("r".into());
    let rs = jsonwebtoken::encode(&h, &claims, &rsa).expect("sign");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("h".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .expect("sign");
    for (name, token) in [("identity/jwt_rs256", rs), ("identity/jwt_hs256", hs)] {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "authorization",
            http::HeaderValue::from_str(&format!("Bearer {token}")).expect("value"),
        );
        c.bench_function(name, |b| {
            b.iter(|| {
                identity::authenticate(
                    &cfg.identity,
                    None,
                    &policy,
                    black_box(&headers),
                    None,
                    None,
                )
                .now_or_never()
                .expect("no await on this path")
            })
        });
    }
}

fn limit_bench(c: &mut Criterion) {
    use futures_util::FutureExt;
    use tollgate::http::fields::{Adder, Case};
    use tollgate::limit::{self, Limiter};
    let text = "server:\n  listen: [\"127.0.0.1:8080\"]\ntiers:\n  anonymous: { limit: 1000000000, window: 1m }\nupstreams:\n  u:\n    backends: [{ addr: \"127.0.0.1:1\" }]\nroutes:\n  - { name: r, upstream: u }\n";
    let cfg = config::load_str(Path::new("bench.yaml"), text).expect("bench config");
    let limiter = Limiter::default();
    let route = &cfg.routes[0];
    let headers = http::HeaderMap::new();
    let ip = Some(std::net::IpAddr::from([192, 0, 2, 7]));
    let decide = || {
        limiter
            .check(
                &cfg.limits,
                None,
                &route.limit,
                &route.name,
                &cfg.identity.tiers,
                None,
                ip,
                black_box(&headers),
            )
            .now_or_never()
            .expect("no await in local mode")
    };
    c.bench_function("limit/local_decide", |b| b.iter(decide));
    let outcome = decide();
    // A backend's answer with eight fields, as pingora hands it over, and the five rate-limit
    // fields added to it in each spelling mode.
    let mut upstream = pingora_http::ResponseHeader::build(200, Some(8)).expect("build");
    for (n, v) in [
        ("Date", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ("Content-Type", "application/json"),
        ("Content-Length", "512"),
        ("Cache-Control", "no-store"),
        ("ETag", "\"abc\""),
        ("Vary", "Accept-Encoding"),
        ("X-Backend-Id", "b7"),
        ("X-Trace", "t"),
    ] {
        upstream.append_header(n, v).expect("append");
    }
    for (name, case) in [
        ("limit/fields_canonical", Case::Canonical),
        ("limit/fields_preserve_case", Case::Preserve),
    ] {
        c.bench_function(name, |b| {
            b.iter_batched(
                || upstream.clone(),
                |mut resp| {
                    let mut add = Adder::new(&mut resp, case, limit::MAX_FIELDS);
                    limit::headers(&outcome, &route.limit, &cfg.identity.tiers, |f, v| {
                        add.insert(f, v)
                    });
                    add.finish().expect("fields");
                    resp
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, bench, identity_bench, limit_bench);
criterion_main!(benches);
