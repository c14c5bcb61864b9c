use std::path::Path;

use proptest::prelude::*;

use super::*;

const GOOD: &str = "server:\n  listen: [\"127.0.0.1:8080\"]\nupstreams:\n  u:\n    backends: [{ addr: \"127.0.0.1:1\" }]\nroutes:\n  - { name: r, upstream: u }\n";

#[test]
fn a_minimal_file_loads_with_defaults() {
    let c = load_str(Path::new("t.yaml"), GOOD).expect("valid");
    assert_eq!(c.routes.len(), 1);
    assert_eq!(c.upstreams[0].attempts, 3);
    assert_eq!(
        c.upstreams[0].timeouts.connect,
        std::time::Duration::from_secs(1)
    );
    assert!(c.server.h2c);
}

#[test]
fn errors_are_sorted_and_located() {
    let text = GOOD
        .replace("upstream: u", "upstream: x")
        .replace("127.0.0.1:8080", "bad");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("invalid");
    assert_eq!(errs.len(), 2);
    assert_eq!(
        errs[0].to_string(),
        "t.yaml:2:12: server.listen[0]: invalid address \"bad\": expected IP:PORT"
    );
    assert_eq!(errs[1].field, "routes[0].upstream");
    assert_eq!((errs[1].line, errs[1].column), (7, 16));
}

#[test]
fn hash_key_rules() {
    let text = GOOD.replace("backends:", "balance: consistent_hash\n    backends:");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("needs hash_key");
    assert!(errs[0].message.contains("needs hash_key"));
    let text = GOOD.replace("backends:", "hash_key: path\n    backends:");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("hash_key without consistent_hash");
    assert_eq!(errs[0].field, "upstreams.u.hash_key");
}

#[test]
fn strip_prefix_needs_a_prefix_and_relative_paths_are_refused() {
    let text = GOOD
        .replace(
            "{ name: r, upstream: u }",
            "{ name: r, upstream: u, strip_prefix: true }",
        )
        .replace("listen:", "pid_file: relative.pid\n  listen:");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("invalid");
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["server.pid_file", "routes[0].strip_prefix"]);
}

/// Found by the `config_loader` fuzz target: a key holding a line break made a two-line error.
#[test]
fn errors_stay_on_one_line_when_a_key_holds_a_line_break() {
    let text = format!("{GOOD}\"bad\\nkey\": 1\n");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("unknown key");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, "bad key");
    assert!(!errs[0].to_string().contains('\n'), "{}", errs[0]);
}

/// `GOOD` with a `server.otlp` block made of `lines` (4-space indented).
fn with_otlp(lines: &str) -> String {
    GOOD.replace(
        "upstreams:",
        &format!("  otlp:\n    endpoint: \"http://127.0.0.1:4318/v1/traces\"\n{lines}upstreams:"),
    )
}

#[cfg(not(feature = "otlp"))]
#[test]
fn otlp_is_refused_at_its_position_without_the_feature() {
    let errs = load_str(Path::new("t.yaml"), &with_otlp("")).expect_err("no feature");
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].to_string(),
        "t.yaml:3:3: server.otlp: built without the `otlp` feature; rebuild with --features otlp"
    );
}

#[cfg(feature = "otlp")]
#[test]
fn otlp_defaults_and_every_error_located() {
    let c = load_str(Path::new("t.yaml"), &with_otlp("")).expect("valid");
    let o = c.server.otlp.expect("otlp");
    assert_eq!(o.service_name, "tollgate");
    assert_eq!(o.sample_below, crate::otlp::OtlpSpec::threshold(1.0));
    assert_eq!(o.timeout, std::time::Duration::from_secs(10));
    assert_eq!(o.queue_size, 4096);

    let text = with_otlp(
        "    sample_ratio: 1.5\n    timeout: 0s\n    service_name: \"\"\n    headers: { \"bad name\": x }\n    queue_size: 0\n",
    )
    .replace("listen:", "trace_context: false\n  listen:");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("invalid");
    let got: Vec<_> = errs
        .iter()
        .map(|e| (e.field.as_str(), e.line, e.column))
        .collect();
    assert_eq!(
        got,
        [
            ("server.otlp", 4, 3),
            ("server.otlp.sample_ratio", 6, 5),
            ("server.otlp.timeout", 7, 5),
            ("server.otlp.service_name", 8, 5),
            ("server.otlp.headers.bad name", 9, 16),
            ("server.otlp.queue_size", 10, 5),
        ],
        "{errs:?}"
    );
    for (endpoint, why) in [
        ("https://collector:4318/v1/traces", "https is not supported"),
        ("127.0.0.1:4318", "expected an http:// URL"),
    ] {
        let text = with_otlp("").replace("http://127.0.0.1:4318/v1/traces", endpoint);
        let errs = load_str(Path::new("t.yaml"), &text).expect_err("bad endpoint");
        assert_eq!(errs[0].field, "server.otlp.endpoint");
        assert_eq!((errs[0].line, errs[0].column), (4, 5));
        assert!(errs[0].message.contains(why), "{}", errs[0]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text at all: an error or a config, never a panic.
    #[test]
    fn loader_never_panics(text in ".{0,400}") {
        let _ = load_str(Path::new("fuzz.yaml"), &text);
    }

    /// Mutations of a valid file: same promise, and every error is located inside the file.
    #[test]
    fn mutated_files_never_panic(pos in 0usize..GOOD.len(), insert in "[ -~\n]{0,12}") {
        let mut text = GOOD.to_string();
        let pos = (0..=pos).rev().find(|p| text.is_char_boundary(*p)).unwrap_or(0);
        text.insert_str(pos, &insert);
        if let Err(errs) = load_str(Path::new("m.yaml"), &text) {
            let lines = text.lines().count().max(1) + 1;
            for e in errs {
                prop_assert!(e.line <= lines, "{e} points past the end");
            }
        }
    }
}

#[test]
fn cache_settings_are_checked_where_written() {
    let text = GOOD
        .replace(
            "{ name: r, upstream: u }",
            "{ name: r, upstream: u, cache: { ttl: 0s, vary: [\"bad header\"], scope: consumer } }",
        )
        .replace("routes:", "cache: { redis: true }\nroutes:");
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("invalid");
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "cache.redis",
            "routes[0].cache.ttl",
            "routes[0].cache.vary[0]",
            "routes[0].cache.scope"
        ],
        "{errs:?}"
    );
    assert!(errs.iter().all(|e| e.line > 0 && e.column > 0), "{errs:?}");
    let ok = GOOD.replace(
        "{ name: r, upstream: u }",
        "{ name: r, upstream: u, cache: { ttl: 30s, stale_while_revalidate: 1m, vary: [accept-language] } }",
    );
    let c = load_str(Path::new("t.yaml"), &ok).expect("valid");
    let p = c.routes[0].cache.as_ref().expect("cache policy");
    assert_eq!(p.ttl, std::time::Duration::from_secs(30));
    assert_eq!(p.stale_while_revalidate, std::time::Duration::from_secs(60));
    assert!(!p.per_consumer);
    assert_eq!(c.cache.max_bytes, 64 << 20);
}

#[test]
fn a_route_whose_tiers_set_no_limit_skips_the_limiter() {
    let c = load_str(Path::new("t.yaml"), GOOD).expect("valid");
    assert!(!c.routes[0].limit.enabled, "no tier has a limit");
    let text = format!("{GOOD}tiers:\n  anonymous: {{ limit: 5, window: 1s }}\n");
    let c = load_str(Path::new("t.yaml"), &text).expect("valid");
    assert!(c.routes[0].limit.enabled, "the anonymous tier has a limit");
    let text = format!(
        "{}tiers:\n  anonymous: {{ limit: 5, window: 1s }}\n",
        GOOD.replace(
            "{ name: r, upstream: u }",
            "{ name: r, upstream: u, rate_limit: { enabled: false } }"
        )
    );
    let c = load_str(Path::new("t.yaml"), &text).expect("valid");
    assert!(!c.routes[0].limit.enabled, "switched off on the route");
}

#[test]
fn the_access_log_flush_interval_is_bounded_and_located() {
    let c = load_str(Path::new("t.yaml"), GOOD).expect("valid");
    assert_eq!(
        c.server.access_log_flush,
        std::time::Duration::from_millis(500)
    );
    let text = GOOD.replace(
        "  listen: [\"127.0.0.1:8080\"]\n",
        "  listen: [\"127.0.0.1:8080\"]\n  access_log_flush: 5s\n",
    );
    let errs = load_str(Path::new("t.yaml"), &text).expect_err("too long");
    assert_eq!(errs[0].field, "server.access_log_flush");
    assert_eq!(errs[0].line, 3);
    assert!(
        errs[0].message.contains("between 1ms and 1s"),
        "{}",
        errs[0]
    );
    let text = GOOD.replace(
        "  listen: [\"127.0.0.1:8080\"]\n",
        "  listen: [\"127.0.0.1:8080\"]\n  access_log_flush: 50ms\n",
    );
    let c = load_str(Path::new("t.yaml"), &text).expect("valid");
    assert_eq!(
        c.server.access_log_flush,
        std::time::Duration::from_millis(50)
    );
}

fn with_acme(cert: &str, acme: &str) -> String {
    format!("{GOOD}tls:\n  acme: {{ {acme} }}\n  certificates:\n    - {cert}\n")
}

#[test]
fn an_acme_certificate_loads_with_its_defaults() {
    let text = with_acme(
        "{ name: site, hosts: [Example.COM, www.example.com], acme: { email: ops@example.com } }",
        "",
    );
    let c = load_str(Path::new("/etc/tollgate/t.yaml"), &text).expect("valid");
    let a = c.acme.as_ref().expect("acme settings");
    assert_eq!(
        a.store,
        crate::acme::StoreKind::Disk("/etc/tollgate/acme".into())
    );
    assert_eq!(a.retry_min, std::time::Duration::from_secs(60));
    let cert = &a.certs[0];
    assert_eq!(cert.directory, crate::acme::LETS_ENCRYPT);
    assert_eq!(cert.hosts, ["example.com", "www.example.com"]);
    assert_eq!(cert.contact, ["mailto:ops@example.com"]);
    assert_eq!(cert.challenge, crate::acme::Challenge::Http01);
    assert!(cert.slot.placeholder.is_some());
    assert_eq!(c.tls.managed.len(), 1);
    // With a `redis:` section the fleet's store is Redis.
    let text = format!("redis: {{ url: \"redis://127.0.0.1:1\" }}\n{text}");
    let c = load_str(Path::new("t.yaml"), &text).expect("valid");
    assert_eq!(c.acme.expect("acme").store, crate::acme::StoreKind::Redis);
}

#[test]
fn acme_mistakes_are_named_by_field() {
    let cases = [
        (
            "{ name: s, cert_file: a.pem, key_file: a.key, hosts: [a.example], acme: {} }",
            "",
            "tls.certificates[0].acme",
            "not both",
        ),
        (
            "{ name: s, hosts: [\"*.example.com\"], acme: {} }",
            "",
            "tls.certificates[0].hosts[0]",
            "DNS-01",
        ),
        (
            "{ name: s, hosts: [], acme: {} }",
            "",
            "tls.certificates[0].hosts",
            "needs the hosts",
        ),
        (
            "{ name: s, hosts: [a.example], acme: { challenge: dns-01 } }",
            "",
            "tls.certificates[0].acme.challenge",
            "http-01 or tls-alpn-01",
        ),
        (
            "{ name: s, hosts: [a.example], acme: { challenge: tls-alpn-01 } }",
            "",
            "tls.certificates[0].acme.challenge",
            "server.listen_tls",
        ),
        (
            "{ name: s, hosts: [a.example], acme: { directory: \"http://ca.example/dir\" } }",
            "",
            "tls.certificates[0].acme.directory",
            "https URL",
        ),
        (
            "{ name: s, hosts: [a.example], acme: { email: nobody } }",
            "",
            "tls.certificates[0].acme.email",
            "e-mail",
        ),
        (
            "{ name: s, hosts: [a.example], acme: { eab: { kid: k, hmac_key: \"***\" } } }",
            "",
            "tls.certificates[0].acme.eab",
            "base64url",
        ),
        (
            "{ name: s, hosts: [a.example], acme: {} }",
            "store: redis",
            "tls.acme.store",
            "redis:",
        ),
        (
            "{ name: s, hosts: [a.example], acme: {} }",
            "retry_min: 10m, retry_max: 1m",
            "tls.acme.retry_max",
            "retry_min",
        ),
        (
            "{ name: s, hosts: [a.example] }",
            "",
            "tls.certificates[0].cert_file",
            "acme:",
        ),
    ];
    for (cert, acme, field, says) in cases {
        let errs = load_str(Path::new("t.yaml"), &with_acme(cert, acme)).expect_err(cert);
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message.contains(says) && e.line > 0),
            "{cert} / {acme}: {errs:?}"
        );
    }
}
