//! The routing matrix: hosts, paths, methods, order, rewrites, 404s, and the admin address.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matrix() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let c = MockUpstream::start("c").await;
    let body = format!(
        "upstreams:\n{}{}{}routes:
  - name: exact
    match: {{ path: /exact }}
    upstream: a
  - name: wild-host
    match: {{ hosts: [\"*.example.com\"], path_prefix: /api }}
    upstream: b
  - name: exact-host
    match: {{ hosts: [\"api.test\"] }}
    upstream: c
  - name: post-only
    match: {{ path_prefix: /api, methods: [POST] }}
    upstream: c
  - name: api
    match: {{ path_prefix: /api }}
    upstream: a
    strip_prefix: true
  - name: regex
    match: {{ path_regex: \"^/v[0-9]+/items$\" }}
    upstream: b
    rewrite: {{ pattern: \"^/v([0-9]+)/items$\", to: \"/items?version=$1\" }}
",
        upstream_yaml("a", &[&a], ""),
        upstream_yaml("b", &[&b], ""),
        upstream_yaml("c", &[&c], ""),
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    let req = |method: reqwest::Method, path: &str, host: Option<&str>| {
        let mut r = client.request(method, gw.url(path));
        if let Some(h) = host {
            r = r.header("host", h);
        }
        async move {
            let resp = r.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.text().await.expect("body"))
        }
    };
    use reqwest::Method;
    // (method, path, host, expected body or status)
    assert_eq!(req(Method::GET, "/exact", None).await, (200, "a".into()));
    assert_eq!(req(Method::GET, "/exact/more", None).await.0, 404);
    assert_eq!(
        req(Method::GET, "/api/x", Some("v1.example.com")).await,
        (200, "b".into())
    );
    assert_eq!(
        req(Method::GET, "/api/x", Some("A.B.Example.COM:8080")).await,
        (200, "b".into())
    );
    // The bare domain is not covered by the wildcard.
    assert_eq!(
        req(Method::GET, "/api/x", Some("example.com")).await,
        (200, "a".into())
    );
    assert_eq!(
        req(Method::GET, "/anything", Some("api.test")).await,
        (200, "c".into())
    );
    assert_eq!(req(Method::POST, "/api/x", None).await, (200, "c".into()));
    assert_eq!(req(Method::GET, "/api/x", None).await, (200, "a".into()));
    // Prefix matching is segment-aware.
    let (status, body) = req(Method::GET, "/apix", None).await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).expect("404 body is JSON");
    assert_eq!(v["error"], "not_found");
    // strip_prefix removed /api; the query survives.
    req(Method::GET, "/api/users?page=2", None).await;
    assert_eq!(a.last_seen().uri, "/users?page=2");
    // Regex rewrite with a capture group.
    assert_eq!(req(Method::GET, "/v3/items", None).await, (200, "b".into()));
    assert_eq!(b.last_seen().uri, "/items?version=3");

    // The admin address is never routed upstream.
    let hits = a.hits() + b.hits() + c.hits();
    let (status, body) = get(&client, &gw.admin("/api/x")).await.expect("admin");
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));
    assert_eq!(a.hits() + b.hits() + c.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_not_served_on_the_public_listener() {
    let up = MockUpstream::start("up").await;
    let body = format!(
        "admin: {{ token: \"{ADMIN_TOKEN}\" }}\nupstreams:\n{}routes:\n  - {{ name: api, match: {{ path_prefix: /api }}, upstream: u }}\n",
        upstream_yaml("u", &[&up], "")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    for path in [
        "/admin/status",
        "/admin/keys",
        "/metrics",
        "/admin/dashboard",
    ] {
        // On the public port these are ordinary paths: no route matches them here.
        let r = client
            .get(gw.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["error"], "not_found", "{path}");
        assert!(v.get("config_generation").is_none());
    }
    let r = client
        .post(gw.url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    // Nothing reached the upstream, and the admin address still serves the API.
    assert_eq!(up.hits(), 0);
    assert_eq!(gw.generation().await, 1);
}
