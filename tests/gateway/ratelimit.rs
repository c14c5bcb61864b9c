//! Rate limiting end to end: exact counts and headers in every mode, window roll-over,
//! refusals that cost nothing, three gateways sharing one real redis-server, batched overshoot
//! within its documented bound, Redis killed or paused, `on_failure`, and reloads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

fn config(up: &MockUpstream, redis: Option<&RedisServer>, limits: &str, tiers: &str) -> String {
    // Tests that take Redis away use a short timeout (300 ms: it also bounds the first call's
    // connect on a loaded machine); the others a generous one, so a loaded CI machine does not
    // push them into the fallback.
    let timeout = if limits.contains("on_failure") {
        "300ms"
    } else {
        "2s"
    };
    let redis = redis
        .map(|r| format!("redis: {{ url: \"{}\", timeout: {timeout} }}\n", r.url()))
        .unwrap_or_default();
    format!(
        "{redis}rate_limit: {{ {limits} }}\ntiers:\n{tiers}upstreams:\n{}routes:\n  - {{ name: tenant, match: {{ path_prefix: /tenant }}, upstream: u, rate_limit: {{ key: \"header:X-Tenant-Id\", limits: {{ anonymous: {{ limit: 3, window: 1m }} }} }} }}\n  - {{ name: free-for-all, match: {{ path_prefix: /unlimited }}, upstream: u, rate_limit: {{ enabled: false }} }}\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[up], "")
    )
}

const TIER_100: &str = "  anonymous: { limit: 100, window: 1m }\n";

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn hit(client: &reqwest::Client, url: &str) -> Answer {
    let r = client.get(url).send().await.expect("send");
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.expect("body"),
    }
}

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers
        .get(name)
        .map(|v| v.to_str().expect("ascii").to_string())
}

async fn exact_counts(gw: &Gateway) {
    let client = http();
    let mut passed = 0;
    let mut limited = 0;
    let mut last_remaining = u64::MAX;
    for _ in 0..150 {
        let a = hit(&client, &gw.url("/x")).await;
        assert_eq!(header(&a, "x-ratelimit-limit").as_deref(), Some("100"));
        assert_eq!(
            header(&a, "ratelimit-policy").as_deref(),
            Some("\"anonymous\";q=100;w=60")
        );
        let remaining: u64 = header(&a, "x-ratelimit-remaining")
            .expect("remaining")
            .parse()
            .expect("number");
        assert!(
            remaining <= last_remaining,
            "Remaining increased within the window"
        );
        last_remaining = remaining;
        let rl = header(&a, "ratelimit").expect("RateLimit field");
        assert!(
            rl.starts_with(&format!("\"anonymous\";r={remaining};t=")),
            "{rl}"
        );
        let reset: u64 = header(&a, "x-ratelimit-reset")
            .expect("reset")
            .parse()
            .expect("number");
        assert!((1..=60).contains(&reset));
        match a.status {
            200 => passed += 1,
            429 => {
                limited += 1;
                let retry: u64 = header(&a, "retry-after")
                    .expect("Retry-After")
                    .parse()
                    .expect("number");
                assert!((1..=120).contains(&retry));
                let v: Value = serde_json::from_str(&a.body).expect("JSON body");
                assert_eq!(v["error"], "rate_limited");
                assert_eq!(
                    v["retry_after"].as_u64(),
                    Some(retry),
                    "body and header disagree"
                );
                assert_eq!(remaining, 0);
            }
            other => panic!("unexpected status {other}: {}", a.body),
        }
    }
    assert_eq!((passed, limited), (100, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_local_mode() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, "", TIER_100)).await;
    exact_counts(&gw).await;
    // Unlimited routes carry no limit and are never refused.
    let a = hit(&http(), &gw.url("/unlimited")).await;
    assert_eq!(a.status, 200);
    assert!(header(&a, "x-ratelimit-limit").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_redis_exact_mode() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, Some(&redis), "mode: exact", TIER_100)).await;
    exact_counts(&gw).await;
    assert_eq!(
        gw.metric("tollgate_ratelimit_decisions_total{result=\"limited\",tier=\"anonymous\"}")
            .await,
        Some(50.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_roll_over_and_refusals_cost_nothing() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    for mode in ["mode: exact", "mode: local"] {
        let gw = Gateway::start(&config(
            &up,
            Some(&redis),
            mode,
            "  anonymous: { limit: 5, window: 2s }\n",
        ))
        .await;
        let client = http();
        let mut passed = 0;
        while passed < 5 {
            assert_eq!(hit(&client, &gw.url("/x")).await.status, 200, "{mode}");
            passed += 1;
        }
        let refused = hit(&client, &gw.url("/x")).await;
        assert_eq!(refused.status, 429);
        // Hammer past the limit: refusals must not push access further away.
        let started = Instant::now();
        let hammered = AtomicUsize::new(0);
        let regained = eventually(
            Duration::from_secs(6),
            "access regained after the window",
            || async {
                hammered.fetch_add(1, Ordering::Relaxed);
                let a = hit(&client, &gw.url("/x")).await;
                (a.status == 200).then_some(started.elapsed())
            },
        )
        .await;
        let hammered = hammered.load(Ordering::Relaxed);
        assert!(hammered > 10, "{mode}: the loop did not hammer");
        assert!(
            regained < Duration::from_millis(4_100),
            "{mode}: regained only after {regained:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_tiers_use_a_token_bucket() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        None,
        "",
        "  anonymous: { limit: 1, window: 1s, burst: 5 }\n",
    ))
    .await;
    let client = http();
    for i in 0..5 {
        let a = hit(&client, &gw.url("/x")).await;
        assert_eq!(a.status, 200, "request {i}");
    }
    let sixth = hit(&client, &gw.url("/x")).await;
    assert_eq!(sixth.status, 429);
    assert_eq!(header(&sixth, "retry-after").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_overrides_and_header_keys() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, "", TIER_100)).await;
    let client = http();
    for tenant in ["acme", "globex"] {
        for _ in 0..3 {
            let s = client
                .get(gw.url("/tenant"))
                .header("x-tenant-id", tenant)
                .send()
                .await
                .expect("send")
                .status();
            assert_eq!(s, 200, "{tenant}");
        }
        let s = client
            .get(gw.url("/tenant"))
            .header("x-tenant-id", tenant)
            .send()
            .await
            .expect("send")
            .status();
        assert_eq!(s, 429, "{tenant}");
    }
    // The route's own counters do not touch the tier-wide ones.
    let a = hit(&client, &gw.url("/x")).await;
    assert_eq!(header(&a, "x-ratelimit-remaining").as_deref(), Some("99"));
}

/// Run `clients` concurrent loops over `urls` (round robin) until `total` requests are sent.
async fn load(urls: Vec<String>, clients: usize, total: usize) -> (usize, usize, Vec<u16>) {
    let sent = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (sent, ok, limited, other, urls) = (
            sent.clone(),
            ok.clone(),
            limited.clone(),
            other.clone(),
            urls.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = http();
            let mut i = c;
            while sent.fetch_add(1, Ordering::Relaxed) < total {
                let url = &urls[i % urls.len()];
                i += 1;
                match client.get(url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(429) => limited.fetch_add(1, Ordering::Relaxed),
                    Ok(s) => {
                        other.lock().expect("lock").push(s);
                        0
                    }
                    Err(_) => {
                        other.lock().expect("lock").push(0);
                        0
                    }
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let other = other.lock().expect("lock").clone();
    (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        other,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_exact_limits() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let cfg = config(
        &up,
        Some(&redis),
        "mode: exact",
        "  anonymous: { limit: 60, window: 10m }\n",
    );
    let gws = [
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
    ];
    let urls = gws.iter().map(|g| g.url("/x")).collect();
    let (ok, limited, other) = load(urls, 8, 300).await;
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!(
        ok, 60,
        "exact mode must admit exactly the limit across nodes"
    );
    assert_eq!(limited, 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_stays_within_its_bound() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let interval_ms = 50u64;
    let limit = 200usize;
    let cfg = config(
        &up,
        Some(&redis),
        &format!("mode: batched, sync_interval: {interval_ms}ms"),
        &format!("  anonymous: {{ limit: {limit}, window: 10m }}\n"),
    );
    let gws = [
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
        Gateway::start(&cfg).await,
    ];
    let urls = gws.iter().map(|g| g.url("/x")).collect();
    let started = Instant::now();
    let total = 1500;
    let (ok, _limited, other) = load(urls, 8, total).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    // Documented bound: overshoot <= (N - 1) x (per-node request rate x sync interval), plus one
    // interval of slack for the round trip of the sync itself.
    let per_node_rate = total as f64 / 3.0 / elapsed;
    let bound = limit as f64 + 2.0 * per_node_rate * (2.0 * interval_ms as f64 / 1000.0) + 3.0;
    assert!(ok >= limit, "batched mode admitted only {ok} of {limit}");
    assert!(
        (ok as f64) <= bound,
        "batched admitted {ok}, bound {bound:.1} (rate {per_node_rate:.0}/s per node)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_or_paused_under_load() {
    let mut redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        Some(&redis),
        "mode: exact, on_failure: local",
        "  anonymous: { limit: 100000, window: 1m }\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (stop, bad, ok, url) = (stop.clone(), bad.clone(), ok.clone(), gw.url("/x"));
        tasks.push(tokio::spawn(async move {
            let client = http();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match client.get(&url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(s) => bad.lock().expect("lock").push(format!("status {s}")),
                    Err(e) => bad.lock().expect("lock").push(e.to_string()),
                }
                if started.elapsed() > Duration::from_secs(1) {
                    bad.lock()
                        .expect("lock")
                        .push(format!("slow: {:?}", started.elapsed()));
                }
            }
        }));
    }
    let progress = |n: usize| {
        let ok = ok.clone();
        async move {
            let target = ok.load(Ordering::Relaxed) + n;
            // Generous: while Redis is paused every request waits out the 300 ms timeout.
            eventually(Duration::from_secs(30), "load progress", || async {
                (ok.load(Ordering::Relaxed) >= target).then_some(())
            })
            .await;
        }
    };
    progress(50).await;
    redis.stop();
    progress(200).await;
    let s = gw.status().await.expect("status");
    assert_eq!(s["rate_limit"]["fallback"], true, "{s}");
    assert_eq!(gw.metric("tollgate_ratelimit_fallback").await, Some(1.0));
    redis.restart().await;
    eventually(Duration::from_secs(10), "shared counting again", || async {
        (gw.metric("tollgate_ratelimit_fallback").await == Some(0.0)).then_some(())
    })
    .await;
    progress(50).await;
    redis.pause();
    progress(50).await;
    redis.resume();
    progress(50).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    let bad = bad.lock().expect("lock").clone();
    assert!(
        bad.is_empty(),
        "{} bad answers: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_redis_is_known_down_requests_stop_waiting_for_it() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    // A 2 s Redis timeout: a request that waits for Redis takes at least that long.
    let text = config(
        &up,
        Some(&redis),
        "mode: exact, on_failure: local",
        "  anonymous: { limit: 100000, window: 1m }\n",
    )
    .replace("timeout: 300ms", "timeout: 2s");
    let gw = Gateway::start(&text).await;
    let client = http();
    assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
    // Paused: Redis accepts nothing and answers nothing, so a call can only time out.
    redis.pause();
    let first = Instant::now();
    assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
    assert!(
        first.elapsed() >= Duration::from_secs(2),
        "the first request after the outage waits out the timeout"
    );
    // From then on the store is known down: every decision is local at once, none waits.
    for i in 0..10 {
        let started = Instant::now();
        assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} waited {:?} for a Redis known to be down",
            started.elapsed()
        );
    }
    assert!(gw
        .metric("tollgate_redis_errors_total{kind=\"down\",op=\"ratelimit\"}")
        .await
        .is_some_and(|v| v >= 10.0));
    assert_eq!(gw.metric("tollgate_redis_up").await, Some(0.0));
    // Back: the heartbeat finds it, and decisions go to Redis again.
    redis.resume();
    eventually(Duration::from_secs(10), "redis known up again", || async {
        (gw.metric("tollgate_redis_up").await == Some(1.0)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "shared counting again", || async {
        assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
        (gw.metric("tollgate_ratelimit_fallback").await == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_deny_answers_503_never_401_or_429() {
    let mut redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(
        &up,
        Some(&redis),
        "mode: exact, on_failure: deny",
        TIER_100,
    ))
    .await;
    assert_eq!(hit(&http(), &gw.url("/x")).await.status, 200);
    redis.stop();
    let a = hit(&http(), &gw.url("/x")).await;
    assert_eq!(a.status, 503);
    let v: Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(v["error"], "rate_limiter_unavailable");
    assert!(header(&a, "retry-after").is_some());
    // on_failure: allow lets everything through.
    gw.write(&config(
        &up,
        Some(&redis),
        "mode: exact, on_failure: allow",
        "  anonymous: { limit: 1, window: 1m }\n",
    ));
    gw.sighup_and_wait().await;
    for _ in 0..5 {
        assert_eq!(hit(&http(), &gw.url("/x")).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_limits_without_resetting_counters() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    for mode in ["mode: exact", "mode: local"] {
        let tiers = "  anonymous: { limit: 10, window: 10m }\n";
        let gw = Gateway::start(&config(&up, Some(&redis), mode, tiers)).await;
        let client = http();
        for _ in 0..4 {
            assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
        }
        // Raise the limit: the four requests already counted still count.
        gw.write(&config(
            &up,
            Some(&redis),
            mode,
            "  anonymous: { limit: 6, window: 10m }\n  free: { limit: 5 }\n",
        ));
        let s = gw.sighup_and_wait().await;
        assert_eq!(s["last_reload"]["ok"], true);
        let a = hit(&client, &gw.url("/x")).await;
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "x-ratelimit-limit").as_deref(), Some("6"));
        assert_eq!(
            header(&a, "x-ratelimit-remaining").as_deref(),
            Some("1"),
            "{mode}: counter was reset"
        );
        assert_eq!(hit(&client, &gw.url("/x")).await.status, 200);
        assert_eq!(hit(&client, &gw.url("/x")).await.status, 429);
        // Clean Redis for the next mode.
        drop(gw);
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "FLUSHALL"])
            .output();
    }
}

/// Exact mode's coalescing: concurrent requests of one caller share script calls, and a batch
/// decides exactly what the same requests one call at a time would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_batches_decide_like_single_calls() {
    use std::sync::Arc;
    use tollgate::limit::{shared, Algo};
    use tollgate::store::{Store, StoreSpec};

    let redis = RedisServer::start().await;
    let store = Arc::new(
        Store::new(StoreSpec {
            url: redis.url(),
            timeout: Duration::from_secs(2),
            max_pending: 10_000,
        })
        .expect("store"),
    );
    let evalsha_calls = |store: Arc<Store>| async move {
        let info: String = store
            .call("test", |mut c| async move {
                redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async(&mut c)
                    .await
            })
            .await
            .expect("info");
        info.lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for algo in [
        Algo::SlidingWindow {
            limit: 50,
            window_ms: 600_000,
        },
        Algo::Gcra {
            limit: 10,
            window_ms: 600_000,
            burst: 30,
        },
    ] {
        // One at a time: the reference.
        let mut single = Vec::new();
        for _ in 0..120 {
            let d = shared::exact(&store, &format!("tollgate:rl:{{one:{algo:?}}}"), algo, 1)
                .await
                .expect("decision");
            single.push((d[0].allowed, d[0].remaining));
        }
        // 120 at once through the coalescer.
        let coalescer = Arc::new(shared::Coalescer::default());
        let before = evalsha_calls(store.clone()).await;
        let tasks: Vec<_> = (0..120)
            .map(|_| {
                let (c, s) = (coalescer.clone(), store.clone());
                tokio::spawn(async move {
                    // One caller: one counter hash, one Redis key.
                    let key = move || format!("tollgate:rl:{{many:{algo:?}}}");
                    c.decide(&s, 7, key, algo, 64).await.expect("decision")
                })
            })
            .collect();
        let mut batched = Vec::new();
        for t in tasks {
            let d = t.await.expect("task");
            batched.push((d.allowed, d.remaining));
        }
        let calls = evalsha_calls(store.clone()).await - before;
        let admitted = |v: &[(bool, u64)]| v.iter().filter(|d| d.0).count();
        assert_eq!(admitted(&batched), admitted(&single), "{algo:?}");
        // The same multiset of answers (arrival order differs between tasks).
        let mut a = batched.clone();
        let mut b = single.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{algo:?}");
        assert!(
            calls < 120,
            "{calls} script calls for 120 concurrent requests"
        );
        assert_eq!(coalescer.busy(), 0, "no caller left marked busy");
    }
}

/// An admitted request the backend then fails still tells the caller where it stands: the 502
/// carries the rate-limit fields (and no Retry-After: it was not refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_request_that_fails_upstream_carries_the_fields() {
    // A backend address nothing listens on (port 1, which no test takes): every attempt is refused.
    let body = format!(
        "tiers:\n{TIER_100}upstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\nroutes:\n  - {{ name: all, upstream: u }}\n"
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    let a = hit(&client, &gw.url("/x")).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(header(&a, "x-ratelimit-limit").as_deref(), Some("100"));
    assert_eq!(header(&a, "x-ratelimit-remaining").as_deref(), Some("99"));
    assert_eq!(
        header(&a, "ratelimit-policy").as_deref(),
        Some("\"anonymous\";q=100;w=60")
    );
    assert!(header(&a, "ratelimit").is_some_and(|v| v.starts_with("\"anonymous\";r=99;t=")));
    assert!(header(&a, "retry-after").is_none());
    assert!(header(&a, "x-request-id").is_some());
}
