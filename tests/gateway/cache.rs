//! The response cache: hits, what is never stored, stale-while-revalidate (with a conditional
//! refresh), stale-if-error, per-consumer keys, rate limits on hits, purge, metrics and logs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

use crate::harness::*;

/// An origin whose caching headers come from the query string:
/// `cc=<Cache-Control>`, `etag=1` (answers 304 to a matching If-None-Match), `cookie=1`,
/// `vary=<Vary>`, `size=<body bytes>`. Bodies name the URI and a per-URI version that grows
/// with every full (non-304) answer.
#[derive(Default)]
struct OriginState {
    full: AtomicUsize,
    not_modified: AtomicUsize,
    fail: AtomicU16,
    delay_ms: AtomicU64,
    versions: Mutex<HashMap<String, usize>>,
}

struct Origin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn origin(State(s): State<Arc<OriginState>>, req: Request) -> Response {
    let uri = req.uri().to_string();
    if req.uri().path() == "/health" {
        return Response::new(Body::from("ok"));
    }
    let delay = s.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let q: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    let fail = s.fail.load(Ordering::Relaxed);
    if fail != 0 {
        return Response::builder()
            .status(fail)
            .body(Body::from("origin failing"))
            .expect("response");
    }
    let mut b = Response::builder().header("content-type", "text/plain");
    if let Some(cc) = q.get("cc") {
        b = b.header("cache-control", cc.as_str());
    }
    if let Some(v) = q.get("vary") {
        b = b.header("vary", v.as_str());
    }
    if q.contains_key("cookie") {
        b = b.header("set-cookie", "session=1");
    }
    if q.contains_key("etag") {
        b = b.header("etag", "\"e1\"");
        if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"e1\"")
        {
            s.not_modified.fetch_add(1, Ordering::Relaxed);
            return b.status(304).body(Body::empty()).expect("response");
        }
    }
    s.full.fetch_add(1, Ordering::Relaxed);
    let version = {
        let mut v = s.versions.lock().expect("lock");
        let n = v.entry(uri.clone()).or_default();
        *n += 1;
        *n
    };
    let body = match q.get("size").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => "x".repeat(n),
        None => format!("{uri} v{version}"),
    };
    b.body(Body::from(body)).expect("response")
}

fn hash(key: &str) -> String {
    tollgate::identity::keys::format_hash(&tollgate::identity::keys::hash(key))
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%20", " ").replace("%3D", "=")))
        .collect()
}

impl Origin {
    async fn start() -> Self {
        let state = Arc::new(OriginState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(origin)
            .with_state(state.clone());
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

    fn full(&self) -> usize {
        self.state.full.load(Ordering::Relaxed)
    }
}

fn config(origin: &Origin, route_cache: &str, extra_routes: &str) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{{ addr: \"{}\" }}]\n    health_check: {{ path: /health, interval: 200ms, timeout: 500ms, unhealthy_after: 1, healthy_after: 1 }}\nroutes:\n  - {{ name: c, match: {{ path_prefix: /c }}, upstream: u, cache: {route_cache} }}\n{extra_routes}",
        origin.addr
    )
}

struct Answer {
    status: u16,
    cache: String,
    age: Option<u64>,
    request_id: String,
    body: String,
}

async fn fetch(client: &reqwest::Client, method: reqwest::Method, url: &str) -> Answer {
    let r = client.request(method, url).send().await.expect("send");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().expect("ascii").to_string())
    };
    let (status, cache, age, request_id) = (
        r.status().as_u16(),
        h("x-cache-status").unwrap_or_default(),
        h("age").and_then(|a| a.parse().ok()),
        h("x-request-id").unwrap_or_default(),
    );
    Answer {
        status,
        cache,
        age,
        request_id,
        body: r.text().await.expect("body"),
    }
}

async fn get_c(client: &reqwest::Client, gw: &Gateway, path: &str) -> Answer {
    fetch(client, reqwest::Method::GET, &gw.url(path)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_responses_are_served_without_the_upstream() {
    let origin = Origin::start().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", "")).await;
    let client = http();

    let first = get_c(&client, &gw, "/c/a").await;
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    assert_eq!(first.body, "/c/a v1");
    let second = get_c(&client, &gw, "/c/a").await;
    assert_eq!((second.status, second.cache.as_str()), (200, "HIT"));
    assert_eq!(second.body, "/c/a v1", "the stored body");
    assert!(second.age.is_some(), "hits carry Age");
    assert_ne!(
        first.request_id, second.request_id,
        "each answer has its own request id"
    );
    let head = fetch(&client, reqwest::Method::HEAD, &gw.url("/c/a")).await;
    assert_eq!((head.status, head.cache.as_str()), (200, "HIT"));
    assert!(head.body.is_empty(), "HEAD from a cached GET has no body");
    assert_eq!(origin.full(), 1, "one trip upstream for three answers");

    // The query is part of the key; so is the host.
    let other = get_c(&client, &gw, "/c/a?x=1").await;
    assert_eq!(
        (other.cache.as_str(), other.body.as_str()),
        ("MISS", "/c/a?x=1 v1")
    );
    let r = client
        .get(gw.url("/c/a"))
        .header("host", "other.example")
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(origin.full(), 3);

    // Exact counts in the metrics and the cache field in the access log.
    let hits = gw
        .metric("tollgate_cache_requests_total{result=\"hit\",route=\"c\"}")
        .await;
    assert_eq!(hits, Some(2.0));
    let misses = gw
        .metric("tollgate_cache_requests_total{result=\"miss\",route=\"c\"}")
        .await;
    assert_eq!(misses, Some(3.0));
    let stored = gw
        .metric("tollgate_cache_stores_total{result=\"stored\",route=\"c\"}")
        .await;
    assert_eq!(stored, Some(3.0));
    let line = eventually(Duration::from_secs(5), "the hit's log line", || async {
        gw.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["request_id"] == second.request_id.as_str())
    })
    .await;
    assert_eq!(line["cache"], "hit");
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_cached_is_not() {
    let origin = Origin::start().await;
    let extra = "  - { name: p, match: { path_prefix: /p }, upstream: u }\n";
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s, max_body: 1KiB }", extra)).await;
    let client = http();
    for path in [
        "/c/ns?cc=no-store",
        "/c/pv?cc=private,%20max-age%3D60",
        "/c/nc?cc=no-cache",
        "/c/z?cc=max-age%3D0",
        "/c/ck?cookie=1",
        "/c/vary?vary=Cookie",
        "/c/big?size=4096",
    ] {
        let before = origin.full();
        for _ in 0..2 {
            let a = get_c(&client, &gw, path).await;
            assert_eq!((a.status, a.cache.as_str()), (200, "MISS"), "{path}");
        }
        assert_eq!(origin.full(), before + 2, "{path} went upstream twice");
    }
    // Error answers are not stored.
    origin.state.fail.store(500, Ordering::Relaxed);
    let a = get_c(&client, &gw, "/c/err").await;
    assert_eq!(a.status, 500);
    origin.state.fail.store(0, Ordering::Relaxed);
    assert_eq!(get_c(&client, &gw, "/c/err").await.cache, "MISS");
    // Requests that bypass: other methods, credentials the gateway did not check, ranges.
    let r = client
        .post(gw.url("/c/a"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    for (name, value) in [
        ("authorization", "Bearer abc"),
        ("cookie", "a=b"),
        ("range", "bytes=0-1"),
    ] {
        get_c(&client, &gw, "/c/cred").await; // stored
        let r = client
            .get(gw.url("/c/cred"))
            .header(name, value)
            .send()
            .await
            .expect("send");
        assert_eq!(r.headers()["x-cache-status"], "BYPASS", "{name}");
    }
    // A route without a cache policy says nothing about caching.
    let r = client.get(gw.url("/p")).send().await.expect("send");
    assert!(r.headers().get("x-cache-status").is_none());
    let too_large = gw
        .metric("tollgate_cache_stores_total{result=\"too_large\",route=\"c\"}")
        .await;
    assert_eq!(too_large, Some(2.0));
    let uncacheable = gw
        .metric("tollgate_cache_stores_total{result=\"uncacheable\",route=\"c\"}")
        .await;
    assert_eq!(
        uncacheable,
        Some(13.0),
        "6 refused paths twice, and the 500"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_behind() {
    let origin = Origin::start().await;
    let gw = Gateway::start(&config(
        &origin,
        "{ ttl: 60s, stale_while_revalidate: 60s }",
        "",
    ))
    .await;
    let client = http();
    // max-age=1 from the origin overrides the route's ttl.
    let path = "/c/s?cc=max-age%3D1";
    assert_eq!(
        get_c(&client, &gw, path).await.body,
        "/c/s?cc=max-age%3D1 v1"
    );
    // Once stale, the old body comes back at once although the origin is now slow.
    origin.state.delay_ms.store(3000, Ordering::Relaxed);
    let stale = eventually(Duration::from_secs(5), "the entry to go stale", || async {
        let started = Instant::now();
        let a = get_c(&client, &gw, path).await;
        (a.cache == "STALE").then_some((a, started.elapsed()))
    })
    .await;
    assert!(stale.0.body.ends_with(" v1"), "{}", stale.0.body);
    assert!(
        stale.1 < Duration::from_secs(2),
        "a stale answer does not wait for the origin ({:?})",
        stale.1
    );
    // One background refresh replaces it.
    let fresh = eventually(Duration::from_secs(10), "the refreshed entry", || async {
        let a = get_c(&client, &gw, path).await;
        (a.cache == "HIT" && a.body.ends_with(" v2")).then_some(a)
    })
    .await;
    assert_eq!(fresh.status, 200);
    assert_eq!(origin.full(), 2, "one refresh, however many stale answers");
    origin.state.delay_ms.store(0, Ordering::Relaxed);

    // With a validator the refresh is conditional: a 304 keeps the body and renews it.
    let path = "/c/e?cc=max-age%3D1&etag=1";
    assert!(get_c(&client, &gw, path).await.body.ends_with(" v1"));
    eventually(Duration::from_secs(5), "a stale answer", || async {
        (get_c(&client, &gw, path).await.cache == "STALE").then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "the 304 revalidation", || async {
        (origin.state.not_modified.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    let renewed = eventually(Duration::from_secs(5), "a hit after the 304", || async {
        let a = get_c(&client, &gw, path).await;
        (a.cache == "HIT").then_some(a)
    })
    .await;
    assert!(renewed.body.ends_with(" v1"), "304 keeps the stored body");
    let nm = gw
        .metric("tollgate_cache_revalidations_total{result=\"not_modified\",route=\"c\"}")
        .await;
    assert_eq!(nm, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_covers_a_failing_origin() {
    let origin = Origin::start().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 1s, stale_if_error: 5m }", "")).await;
    let client = http();
    assert_eq!(get_c(&client, &gw, "/c/x").await.body, "/c/x v1");
    // Expired, and the origin answers 500: the old body instead.
    origin.state.fail.store(500, Ordering::Relaxed);
    let a = eventually(Duration::from_secs(5), "the entry to expire", || async {
        let a = get_c(&client, &gw, "/c/x").await;
        (a.cache != "HIT").then_some(a)
    })
    .await;
    assert_eq!((a.status, a.cache.as_str()), (200, "STALE"));
    assert_eq!(a.body, "/c/x v1");
    // No healthy backend at all: still the old body, not a 503.
    origin.state.fail.store(0, Ordering::Relaxed);
    drop(origin);
    eventually(
        Duration::from_secs(5),
        "the backend to be marked down",
        || async {
            let up = gw.backend_field("healthy").await;
            (up.first() == Some(&serde_json::Value::Bool(false))).then_some(())
        },
    )
    .await;
    let a = get_c(&client, &gw, "/c/x").await;
    assert_eq!(
        (a.status, a.cache.as_str(), a.body.as_str()),
        (200, "STALE", "/c/x v1")
    );
    // Something never cached gets the error.
    let a = get_c(&client, &gw, "/c/never").await;
    assert_eq!(a.status, 503);
    let n = gw
        .metric("tollgate_cache_requests_total{result=\"stale_error\",route=\"c\"}")
        .await;
    assert_eq!(n, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_routes_cache_per_consumer_and_still_rate_limit() {
    let origin = Origin::start().await;
    let alice = "tg_alice_key_0123456789abcdef";
    let bob = "tg_bob_key_0123456789abcdef00";
    let body = format!(
        "tiers:\n  free: {{ limit: 3, window: 1m }}\nconsumers:\n  - {{ id: alice, tier: free, api_keys: [\"{}\"] }}\n  - {{ id: bob, tier: free, api_keys: [\"{}\"] }}\n{}",
        hash(alice),
        hash(bob),
        config(&origin, "{ ttl: 60s }", "")
            .replace("cache: {", "auth: required, rate_limit: {}, cache: {")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    let as_ = |key: &'static str| {
        let client = client.clone();
        let url = gw.url("/c/me");
        async move {
            let r = client
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .expect("send");
            let cache = r
                .headers()
                .get("x-cache-status")
                .map(|v| v.to_str().expect("ascii").to_string());
            (r.status().as_u16(), cache)
        }
    };
    assert_eq!(as_(alice).await, (200, Some("MISS".into())));
    assert_eq!(as_(alice).await, (200, Some("HIT".into())));
    assert_eq!(
        as_(bob).await,
        (200, Some("MISS".into())),
        "bob has his own entry"
    );
    assert_eq!(as_(alice).await, (200, Some("HIT".into())));
    // Hits count against the limit: alice's fourth request is refused.
    assert_eq!(as_(alice).await.0, 429);
    // No credential: refused before the cache is consulted.
    let r = client.get(gw.url("/c/me")).send().await.expect("send");
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("x-cache-status").is_none());
    assert_eq!(origin.full(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reports_and_purges_the_cache() {
    let origin = Origin::start().await;
    let body = format!(
        "admin: {{ token: \"{ADMIN_TOKEN}\" }}\n{}",
        config(&origin, "{ ttl: 60s }", "")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    for p in ["/c/1", "/c/2", "/c/3"] {
        get_c(&client, &gw, p).await;
    }
    let token = format!("Bearer {ADMIN_TOKEN}");
    let v: serde_json::Value = client
        .get(gw.admin("/admin/cache"))
        .header("authorization", &token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["entries"], 3);
    assert_eq!(v["routes"], serde_json::json!(["c"]));
    let r = client
        .delete(gw.admin("/admin/cache"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "purging needs the token");
    let v: serde_json::Value = client
        .delete(gw.admin("/admin/cache"))
        .header("authorization", &token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(v["purged"], 3);
    assert_eq!(get_c(&client, &gw, "/c/1").await.cache, "MISS");
    assert_eq!(origin.full(), 4);
    assert_eq!(gw.metric("tollgate_cache_entries").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_second_level_is_shared_by_nodes_and_purged_everywhere() {
    let origin = Origin::start().await;
    let mut redis = RedisServer::start().await;
    let body = format!(
        "redis: {{ url: \"{}\", timeout: 500ms }}\ncache: {{ redis: true }}\nadmin: {{ token: \"{ADMIN_TOKEN}\" }}\n{}",
        redis.url(),
        config(&origin, "{ ttl: 60s }", "")
    );
    let a = Gateway::start(&body).await;
    let b = Gateway::start(&body).await;
    let client = http();
    assert_eq!(get_c(&client, &a, "/c/shared").await.cache, "MISS");
    // Stored in Redis in the background (asked before it lands, b would go to the origin
    // itself); the other node then answers from it.
    eventually(Duration::from_secs(5), "node a's Redis store", || async {
        let stored = a
            .metric("tollgate_cache_redis_total{result=\"stored\"}")
            .await;
        (stored == Some(1.0)).then_some(())
    })
    .await;
    let on_b = eventually(
        Duration::from_secs(5),
        "node b to find the entry",
        || async {
            let r = get_c(&client, &b, "/c/shared").await;
            (r.cache == "HIT").then_some(r)
        },
    )
    .await;
    assert_eq!(on_b.body, "/c/shared v1", "the body node a stored");
    assert_eq!(origin.full(), 1);
    let l2_hits = b.metric("tollgate_cache_redis_total{result=\"hit\"}").await;
    assert_eq!(l2_hits, Some(1.0));

    // A purge on b empties a's in-process cache too (a follows the epoch within a second).
    let r = client
        .delete(b.admin("/admin/cache"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["cluster"], true);
    eventually(
        Duration::from_secs(5),
        "node a to drop its entry",
        || async { (a.metric("tollgate_cache_entries").await == Some(0.0)).then_some(()) },
    )
    .await;
    assert_eq!(get_c(&client, &a, "/c/shared").await.cache, "MISS");
    assert_eq!(origin.full(), 2);

    // Redis gone: in-process hits go on, misses go upstream, nothing fails.
    redis.stop();
    let hit = get_c(&client, &a, "/c/shared").await;
    assert_eq!((hit.status, hit.cache.as_str()), (200, "HIT"));
    let started = Instant::now();
    let miss = get_c(&client, &a, "/c/other").await;
    assert_eq!((miss.status, miss.cache.as_str()), (200, "MISS"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a dead Redis costs at most its timeout ({:?})",
        started.elapsed()
    );
    let r = client
        .delete(a.admin("/admin/cache"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503, "the cluster-wide purge could not happen");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"], "redis_unavailable");
}
