//! The admin API against its OpenAPI document (`docs/admin-openapi.yaml`) on a running gateway
//! with a real redis-server: every documented operation is called, its status must be one the
//! document lists and its JSON body must have every `required` property of the documented schema
//! (recursively, with types, enums and `additionalProperties: false`). Also: the token guards
//! everything under /admin but the dashboard page, /metrics stays open, anything undocumented is
//! a JSON 404, and the dashboard is self-contained and its stats follow traffic.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use crate::harness::*;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/admin-openapi.yaml");
    serde_yaml_ng::from_str(&text).expect("the OpenAPI document parses")
}

/// Every operation in the document: (METHOD, path template, operation object).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut ops = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                ops.push((m.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    ops
}

/// Follow local `$ref`s (`#/components/...`).
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "null" => v.is_null(),
        other => panic!("unknown type {other:?} in the document"),
    }
}

/// Check `v` against `schema` (the subset the document uses): `$ref`, `oneOf`/`anyOf`/`allOf`,
/// `type` (one or a list), `enum`, `required`, `properties`, `additionalProperties` (false or a
/// schema) and `items`. Problems are pushed to `errors` with their JSON path.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    for key in ["oneOf", "anyOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            let matching = branches
                .iter()
                .filter(|b| {
                    let mut e = Vec::new();
                    check(doc, b, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if matching == 0 || (key == "oneOf" && matching > 1) {
                errors.push(format!("{at}: {matching} branches of {key} match {v}"));
            }
        }
    }
    for branch in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        check(doc, branch, v, at, errors);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            other => panic!("bad type {other} in the document"),
        };
        let nullable = schema.get("nullable") == Some(&Value::Bool(true));
        let ok = types.iter().any(|t| type_ok(t, v)) || (nullable && v.is_null());
        if !ok {
            errors.push(format!("{at}: expected {types:?}, got {v}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errors.push(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !obj.contains_key(name) {
                errors.push(format!("{at}: missing required property {name:?}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (name, value) in obj {
            match (
                props.and_then(|p| p.get(name)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => check(doc, s, value, &format!("{at}.{name}"), errors),
                (None, Some(Value::Bool(false))) => {
                    errors.push(format!("{at}: property {name:?} is not documented"))
                }
                (None, Some(s @ Value::Object(_))) => {
                    check(doc, s, value, &format!("{at}.{name}"), errors)
                }
                _ => {}
            }
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), v.as_array()) {
        for (i, x) in list.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

#[test]
fn the_checker_catches_what_it_should() {
    let doc = json!({"components": {"schemas": {"E": {
        "type": "object", "additionalProperties": false, "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                       "n": {"type": ["integer", "null"]}, "k": {"enum": ["a", "b"]},
                       "l": {"type": "array", "items": {"type": "boolean"}}}}}}});
    let schema = json!({"$ref": "#/components/schemas/E"});
    let errs = |v: Value| {
        let mut e = Vec::new();
        check(&doc, &schema, &v, "$", &mut e);
        e
    };
    assert!(
        errs(json!({"error": "x", "message": "y", "n": null, "k": "a", "l": [true]})).is_empty()
    );
    assert_eq!(errs(json!({"error": "x"})).len(), 1);
    assert_eq!(errs(json!({"error": 1, "message": "y"})).len(), 1);
    assert_eq!(
        errs(json!({"error": "x", "message": "y", "extra": 1})).len(),
        1
    );
    assert_eq!(
        errs(json!({"error": "x", "message": "y", "n": 1.5})).len(),
        1
    );
    assert_eq!(
        errs(json!({"error": "x", "message": "y", "k": "c"})).len(),
        1
    );
    assert_eq!(
        errs(json!({"error": "x", "message": "y", "l": [1]})).len(),
        1
    );
    assert_eq!(errs(json!([])).len(), 1);
}

/// Whether the operation needs the bearer token (its own `security`, else the document's).
fn secured(doc: &Value, op: &Value) -> bool {
    let security = op.get("security").unwrap_or(&doc["security"]);
    security.as_array().is_some_and(|s| !s.is_empty())
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut r = http().request(method, gw.admin(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let resp = r.send().await.expect("admin request");
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().await.expect("body"),
    }
}

/// Problems with `a` as an answer to `op`: an undocumented status, a content type the response
/// does not list, or a JSON body that does not match the documented schema.
fn check_answer(doc: &Value, op: &Value, a: &Answer) -> Vec<String> {
    let Some(response) = op["responses"].get(a.status.to_string()) else {
        let documented: Vec<&String> = op["responses"]
            .as_object()
            .map(|r| r.keys().collect())
            .unwrap_or_default();
        return vec![format!(
            "status {} is not documented (documented: {documented:?}); body {}",
            a.status, a.text
        )];
    };
    let response = resolve(doc, response);
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return Vec::new();
    };
    let content_type = a
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let Some(media) = content.get(&content_type) else {
        return vec![format!(
            "content type {content_type:?} is not documented for {} (documented: {:?})",
            a.status,
            content.keys().collect::<Vec<_>>()
        )];
    };
    let mut errors = Vec::new();
    if content_type == "application/json" {
        match serde_json::from_str::<Value>(&a.text) {
            Ok(body) => check(doc, &media["schema"], &body, "$", &mut errors),
            Err(e) => errors.push(format!("not JSON ({e}): {}", a.text)),
        }
    }
    errors
}

fn assert_matches(doc: &Value, op: &Value, a: &Answer, what: &str) {
    let errors = check_answer(doc, op, a);
    assert!(
        errors.is_empty(),
        "{what}: the answer does not match the document:\n  {}\nbody: {}",
        errors.join("\n  "),
        a.text
    );
}

fn op<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    doc["paths"][path]
        .get(method.to_lowercase())
        .unwrap_or_else(|| panic!("{method} {path} is documented"))
}

fn error_schema() -> Value {
    json!({"$ref": "#/components/schemas/Error"})
}

fn assert_error(doc: &Value, a: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.text);
    assert!(
        a.headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json")),
        "{what}: not JSON"
    );
    let body = a.json();
    let mut errors = Vec::new();
    check(doc, &error_schema(), &body, "$", &mut errors);
    assert!(errors.is_empty(), "{what}: {errors:?}");
    assert_eq!(body["error"], code, "{what}");
}

fn config(up: &MockUpstream, redis: Option<&RedisServer>, tiers: &str) -> String {
    let redis = redis
        .map(|r| format!("redis: {{ url: \"{}\", timeout: 2s }}\n", r.url()))
        .unwrap_or_default();
    format!(
        "{redis}admin: {{ token: \"{ADMIN_TOKEN}\" }}\ntiers:\n{tiers}upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[up], "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_server_matches_its_openapi_document() {
    let doc = openapi();
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let tiers = "  anonymous: { limit: 1000, window: 1m }\n  pro: { limit: 100, window: 1s }\n";
    // An ACME certificate (its CA unreachable: it stays pending or failed), so the
    // certificates view shows both kinds and its renew endpoint has something to renew.
    let acme = "tls:\n  acme: { store: disk }\n  certificates:\n    - { name: site, hosts: [site.test], acme: { directory: \"https://127.0.0.1:1/dir\" } }\n";
    let gw = Gateway::start(&format!("{acme}{}", config(&up, Some(&redis), tiers))).await;

    // The document and the server list the same operations.
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = tollgate::admin::ENDPOINTS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/admin-openapi.yaml vs admin::ENDPOINTS"
    );

    // Some traffic, so stats and metrics have something in every section.
    for _ in 0..5 {
        assert_eq!(get(&http(), &gw.url("/x")).await.map(|a| a.0), Some(200));
    }

    // Every operation: without the token (nothing changes), with a wrong one, then with it.
    // DELETE goes last: it revokes the key POST /admin/keys issued.
    let mut ops = operations(&doc);
    ops.sort_by_key(|(m, _, _)| *m == "DELETE");
    let mut issued: Option<String> = None;
    for (method, path, op) in &ops {
        let what = format!("{method} {path}");
        let concrete = match (path.contains("{id}"), &issued) {
            (false, _) => path.replace("{name}", "site"),
            (true, Some(id)) => path.replace("{id}", id),
            (true, None) => panic!("{what}: no key was issued before"),
        };
        let body = op.pointer("/requestBody/content/application~1json/example");
        if op.pointer("/requestBody/required") == Some(&Value::Bool(true)) {
            assert!(body.is_some(), "{what}: document an example request body");
        }
        if secured(&doc, op) {
            for token in [None, Some("wrong-token-wrong-token-wrong")] {
                let a = call(&gw, method, &concrete, token, body).await;
                assert_eq!(a.status, 401, "{what} with token {token:?}: {}", a.text);
                assert_eq!(
                    a.headers
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok()),
                    Some(r#"Bearer realm="tollgate-admin""#),
                    "{what}"
                );
                assert_matches(&doc, op, &a, &format!("{what} without the token"));
                assert_error(&doc, &a, 401, "unauthorized", &what);
            }
        } else {
            let a = call(&gw, method, &concrete, None, body).await;
            assert!(
                (200..300).contains(&a.status),
                "{what} is documented as open: {} {}",
                a.status,
                a.text
            );
            assert_matches(&doc, op, &a, &format!("{what} without the token"));
        }
        let a = call(&gw, method, &concrete, Some(ADMIN_TOKEN), body).await;
        assert!(
            (200..300).contains(&a.status),
            "{what}: {} {}",
            a.status,
            a.text
        );
        assert_matches(&doc, op, &a, &what);
        if method == "POST" && path == "/admin/keys" {
            issued = a.json()["record"]["id"].as_str().map(str::to_string);
        }
    }

    // Documented errors have the documented shapes.
    let keys = op(&doc, "POST", "/admin/keys");
    for bad in [
        json!({"consumer": "x", "tier": "gold"}),
        json!({"consumer": "x", "tier": "pro", "extra": 1}),
        json!({"tier": "pro"}),
        json!({"consumer": "x", "tier": "pro", "expires_in": 0}),
    ] {
        let a = call(&gw, "POST", "/admin/keys", Some(ADMIN_TOKEN), Some(&bad)).await;
        assert_matches(&doc, keys, &a, &format!("POST /admin/keys {bad}"));
        assert_error(&doc, &a, 400, "invalid_body", &format!("{bad}"));
    }
    let a = call(
        &gw,
        "DELETE",
        "/admin/keys/key_nope",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_matches(&doc, op(&doc, "DELETE", "/admin/keys/{id}"), &a, "revoke");
    assert_error(&doc, &a, 404, "not_found", "DELETE of an unknown key");
    let renew = "/admin/certificates/{name}/renew";
    let a = call(
        &gw,
        "POST",
        &renew.replace("{name}", "nope"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_matches(
        &doc,
        op(&doc, "POST", renew),
        &a,
        "renew an unknown certificate",
    );
    assert_error(
        &doc,
        &a,
        404,
        "not_found",
        "renew of an unknown certificate",
    );

    // A rejected reload: 422 with every error, in the documented shape; the history keeps it.
    let good = std::fs::read_to_string(&gw.config_path).expect("config");
    gw.write_raw(&good.replace("routes:", "routes: 7\nnot_a_section: 1\nroutes:"));
    let reload = op(&doc, "POST", "/admin/reload");
    let a = call(&gw, "POST", "/admin/reload", Some(ADMIN_TOKEN), None).await;
    assert_eq!(a.status, 422, "{}", a.text);
    assert_matches(&doc, reload, &a, "rejected reload");
    assert_eq!(a.json()["ok"], false);
    assert!(!a.json()["errors"].as_array().expect("errors").is_empty());
    gw.write_raw(&good);
    let a = call(&gw, "POST", "/admin/reload", Some(ADMIN_TOKEN), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let stats = call(&gw, "GET", "/admin/stats", Some(ADMIN_TOKEN), None).await;
    assert_matches(&doc, op(&doc, "GET", "/admin/stats"), &stats, "stats");
    let reloads = stats.json()["reloads"].clone();
    assert_eq!(reloads[0]["ok"], true, "{reloads}");
    assert_eq!(reloads[1]["ok"], false, "{reloads}");

    // Anything undocumented is a JSON 404 (with the token; without it, /admin/* is a 401 first).
    for path in [
        "/",
        "/admin",
        "/admin/",
        "/admin/nope",
        "/admin/keys/",
        "/admin/keys/a/b",
        "/admin/status/",
        "/admin/status/x",
        "/admin/dashboard/",
        "/metrics/",
        "/favicon.ico",
        "/x",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let a = call(&gw, method, path, Some(ADMIN_TOKEN), None).await;
            assert_error(&doc, &a, 404, "not_found", &format!("{method} {path}"));
            let a = call(&gw, method, path, None, None).await;
            if path == "/admin" || path.starts_with("/admin/") {
                assert_error(&doc, &a, 401, "unauthorized", &format!("{method} {path}"));
            } else {
                assert_error(&doc, &a, 404, "not_found", &format!("{method} {path}"));
            }
        }
    }
    // A documented path with another method: 405 naming the allowed ones.
    for (method, path, allow) in [
        ("POST", "/admin/status", "GET"),
        ("GET", "/admin/reload", "POST"),
        ("PUT", "/admin/keys", "GET, POST"),
        ("GET", "/admin/keys/key_1", "DELETE"),
        ("POST", "/admin/dashboard", "GET"),
        ("DELETE", "/metrics", "GET"),
    ] {
        let a = call(&gw, method, path, Some(ADMIN_TOKEN), None).await;
        assert_error(
            &doc,
            &a,
            405,
            "method_not_allowed",
            &format!("{method} {path}"),
        );
        assert_eq!(
            a.headers.get("allow").and_then(|v| v.to_str().ok()),
            Some(allow),
            "{method} {path}"
        );
    }
    drop(redis);
}

fn by_status(s: &Value, class: &str) -> u64 {
    s["requests"]["by_status"][class].as_u64().unwrap_or(0)
}

fn tier<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["rate_limit"]["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == name))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_self_contained_and_its_stats_follow_traffic() {
    let doc = openapi();
    let up = MockUpstream::start("up").await;
    up.set_path_status("/boom", 503);
    let gw = Gateway::start(&config(
        &up,
        None,
        "  anonymous: { limit: 5, window: 1m }\n",
    ))
    .await;

    // The page: served without the token (it holds no data), HTML, nothing from elsewhere.
    let page = call(&gw, "GET", "/admin/dashboard", None, None).await;
    assert_eq!(page.status, 200);
    assert_matches(
        &doc,
        op(&doc, "GET", "/admin/dashboard"),
        &page,
        "dashboard",
    );
    let html = page.text.to_lowercase();
    assert!(html.starts_with("<!doctype html>"), "{}", &page.text[..80]);
    for external in [
        "http://", "https://", "src=", "href=", "<link", "@import", "url(", "cdn",
    ] {
        assert!(
            !html.contains(external),
            "the dashboard references {external:?}"
        );
    }
    assert!(html.contains("stats"), "the page reads the stats endpoint");
    let csp = page
        .headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .expect("a CSP")
        .to_string();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && csp.matches("'sha256-").count() == 2,
        "{csp}"
    );

    // Its data is not open.
    for token in [None, Some("wrong-token-wrong-token-wrong")] {
        let a = call(&gw, "GET", "/admin/stats", token, None).await;
        assert_error(&doc, &a, 401, "unauthorized", "stats without the token");
    }
    // Without Redis: the documented shapes of `redis: null` and of keys' 409.
    let keys = call(&gw, "GET", "/admin/keys", Some(ADMIN_TOKEN), None).await;
    assert_matches(
        &doc,
        op(&doc, "GET", "/admin/keys"),
        &keys,
        "keys without Redis",
    );
    assert_error(
        &doc,
        &keys,
        409,
        "redis_not_configured",
        "keys without Redis",
    );
    let status = call(&gw, "GET", "/admin/status", Some(ADMIN_TOKEN), None).await;
    assert_matches(&doc, op(&doc, "GET", "/admin/status"), &status, "status");
    assert_eq!(status.json()["redis"], Value::Null);

    let stats_op = op(&doc, "GET", "/admin/stats");
    let stats = || async {
        let a = call(&gw, "GET", "/admin/stats", Some(ADMIN_TOKEN), None).await;
        assert_matches(&doc, stats_op, &a, "stats");
        a.json()
    };
    let before = stats().await;
    assert_eq!(before["redis"], Value::Null);
    assert_eq!(before["reloads"], json!([]));
    let backend = &before["upstreams"][0]["backends"][0];
    assert_eq!(backend["addr"], up.addr.to_string());
    assert_eq!(backend["healthy"], true);
    assert_eq!(backend["breaker"], "closed");
    assert_eq!(backend["in_flight"], 0);

    // 1 upstream 503, 4 answered 200, then 3 refused by the anonymous tier's limit of 5.
    let client = http();
    let mut seen = Vec::new();
    for path in ["/boom", "/a", "/b", "/c", "/d", "/e", "/f", "/g"] {
        seen.push(get(&client, &gw.url(path)).await.expect("answer").0);
    }
    assert_eq!(seen, [503, 200, 200, 200, 200, 429, 429, 429]);

    // Counted when each response is logged, so poll.
    let after = eventually(
        Duration::from_secs(10),
        "stats counting 8 requests",
        || async {
            let s = stats().await;
            let n = s["requests"]["total"].as_u64()? - before["requests"]["total"].as_u64()?;
            (n >= 8).then_some(s)
        },
    )
    .await;
    let delta = |f: &dyn Fn(&Value) -> u64| f(&after) - f(&before);
    assert_eq!(delta(&|s| s["requests"]["total"].as_u64().unwrap_or(0)), 8);
    assert_eq!(delta(&|s| by_status(s, "2xx")), 4);
    assert_eq!(delta(&|s| by_status(s, "4xx")), 3);
    assert_eq!(delta(&|s| by_status(s, "5xx")), 1);
    assert_eq!(delta(&|s| s["latency"]["count"].as_u64().unwrap_or(0)), 8);
    assert_eq!(
        delta(&|s| tier(s, "anonymous")["limited"].as_u64().unwrap_or(0)),
        3
    );
    assert_eq!(
        delta(&|s| tier(s, "anonymous")["allowed"].as_u64().unwrap_or(0)),
        5
    );
    // Buckets are cumulative: non-decreasing, and the last one holds at most `count`.
    let buckets = after["latency"]["buckets"].as_array().expect("buckets");
    assert!(!buckets.is_empty());
    let counts: Vec<u64> = buckets
        .iter()
        .map(|b| b["count"].as_u64().expect("count"))
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert!(counts.last() <= after["latency"]["count"].as_u64().as_ref());
    assert!(after["timestamp_ms"].as_u64() > before["timestamp_ms"].as_u64());

    // A reload shows up in the stats' history.
    let a = call(&gw, "POST", "/admin/reload", Some(ADMIN_TOKEN), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let s = stats().await;
    assert_eq!(s["reloads"].as_array().map(Vec::len), Some(1));
    assert_eq!(s["reloads"][0]["generation"], 2);
    assert_eq!(s["config_generation"], 2);
}
