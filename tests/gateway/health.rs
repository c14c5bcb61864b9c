//! Active health checks: thresholds both ways, fast 503 when nothing is healthy, timeouts.

use std::time::{Duration, Instant};

use crate::harness::*;

const HC: &str = "    health_check: { path: /health, interval: 100ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 3 }\n";

async fn upstream_health(gw: &Gateway) -> Vec<bool> {
    gw.backend_field("healthy")
        .await
        .iter()
        .map(|h| h.as_bool().expect("healthy"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_goes_down_after_threshold_and_comes_back() {
    let a = MockUpstream::start("a").await;
    let b = MockUpstream::start("b").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&a, &b], HC)
    );
    let gw = Gateway::start(&body).await;
    assert_eq!(upstream_health(&gw).await, vec![true, true]);

    b.set_healthy(false);
    let failing_from = b.health_hits();
    eventually(Duration::from_secs(5), "b marked unhealthy", || async {
        (upstream_health(&gw).await == vec![true, false]).then_some(())
    })
    .await;
    // Not before three failed checks in a row.
    assert!(
        b.health_hits() - failing_from >= 3,
        "flipped before the threshold"
    );

    let series = format!(
        "tollgate_backend_healthy{{backend=\"{}\",upstream=\"u\"}}",
        b.addr
    );
    assert_eq!(gw.metric(&series).await, Some(0.0));
    // No traffic reaches b while it is down.
    let client = http();
    let before = b.hits();
    for _ in 0..30 {
        assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));
    }
    assert_eq!(b.hits(), before);

    b.set_healthy(true);
    let recovering_from = b.health_hits();
    eventually(Duration::from_secs(5), "b healthy again", || async {
        (upstream_health(&gw).await == vec![true, true]).then_some(())
    })
    .await;
    assert!(
        b.health_hits() - recovering_from >= 2,
        "recovered before the threshold"
    );
    eventually(Duration::from_secs(5), "traffic back on b", || async {
        (get(&client, &gw.url("/x")).await == Some((200, "b".into()))).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_answers_503_at_once() {
    let mut a = MockUpstream::start("a").await;
    let mut b = MockUpstream::start("b").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&a, &b], HC)
    );
    let gw = Gateway::start(&body).await;
    a.stop();
    b.stop();
    eventually(
        Duration::from_secs(5),
        "both backends unhealthy",
        || async { (upstream_health(&gw).await == vec![false, false]).then_some(()) },
    )
    .await;
    let client = http();
    let started = Instant::now();
    let resp = client.get(gw.url("/x")).send().await.expect("send");
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(
        resp.headers().get("retry-after").is_some(),
        "503 without Retry-After"
    );
    let v: serde_json::Value = resp.json().await.expect("json body");
    assert_eq!(v["error"], "no_healthy_backend");
    assert!(elapsed < Duration::from_millis(500), "503 took {elapsed:?}");

    // Recovery is automatic.
    a.restart().await;
    eventually(Duration::from_secs(5), "a serves again", || async {
        (get(&client, &gw.url("/x")).await == Some((200, "a".into()))).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_is_checked_before_it_gets_traffic() {
    let a = MockUpstream::start("a").await;
    let sick = MockUpstream::start("sick").await;
    sick.set_healthy(false);
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&a], HC)
    );
    let gw = Gateway::start(&body).await;
    // Add a backend whose health check fails: it must never receive a request.
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&a, &sick], HC)
    );
    gw.write(&body);
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true);
    let client = http();
    for _ in 0..30 {
        assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));
    }
    assert_eq!(sick.hits(), 0);
    assert!(sick.health_hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_and_read_timeouts() {
    let slow = MockUpstream::start("slow").await;
    let extra = "    health_check: { type: tcp, interval: 100ms, timeout: 300ms }\n    timeouts: { connect: 500ms, read: 300ms, total: 2s }\n";
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&slow], extra)
    );
    let gw = Gateway::start(&body).await;
    assert_eq!(upstream_health(&gw).await, vec![true]);
    slow.set_delay(Duration::from_secs(2));
    let client = http();
    let started = Instant::now();
    let (status, body) = get(&client, &gw.url("/x")).await.expect("answer");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"));
    assert!(started.elapsed() < Duration::from_millis(1500));
}
