//! Load balancing: round-robin evenness, weights, consistent hashing, connect-failure retries.

use std::collections::HashMap;

use crate::harness::*;

async fn counts(gw: &Gateway, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let client = http();
    let mut out = HashMap::new();
    for _ in 0..n {
        let mut r = client.get(gw.url("/x"));
        if let Some((k, v)) = &header {
            r = r.header(*k, v);
        }
        let resp = r.send().await.expect("send");
        assert_eq!(resp.status(), 200);
        *out.entry(resp.text().await.expect("body")).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even() {
    let ups = [
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
        MockUpstream::start("c").await,
    ];
    let refs: Vec<&MockUpstream> = ups.iter().collect();
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &refs, "    balance: round_robin\n")
    );
    let gw = Gateway::start(&body).await;
    let c = counts(&gw, 300, None).await;
    for u in &ups {
        let n = c.get(u.name()).copied().unwrap_or(0);
        assert!((98..=102).contains(&n), "uneven round robin: {c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured() {
    let heavy = MockUpstream::start("heavy").await;
    let light = MockUpstream::start("light").await;
    let body = format!(
        "upstreams:\n  u:\n    backends:\n      - {{ addr: \"{}\", weight: 3 }}\n      - {{ addr: \"{}\", weight: 1 }}\n    balance: weighted\nroutes:\n  - {{ name: all, upstream: u }}\n",
        heavy.addr, light.addr
    );
    let gw = Gateway::start(&body).await;
    let c = counts(&gw, 1000, None).await;
    let ratio = c["heavy"] as f64 / c["light"] as f64;
    assert!(
        (2.7..=3.3).contains(&ratio),
        "weight ratio {ratio} outside 3 ± 10%: {c:?}"
    );

    // Random balancing honours weights too (statistically).
    let body = body.replace("balance: weighted", "balance: random");
    gw.write(&body);
    gw.sighup_and_wait().await;
    let c = counts(&gw, 1000, None).await;
    let ratio = c["heavy"] as f64 / c["light"] as f64;
    assert!(
        (2.0..=4.5).contains(&ratio),
        "random weight ratio {ratio}: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_stable_and_moves_only_removed_keys() {
    let ups = [
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
        MockUpstream::start("c").await,
        MockUpstream::start("d").await,
    ];
    let refs: Vec<&MockUpstream> = ups.iter().collect();
    let balance = "    balance: consistent_hash\n    hash_key: header:X-User\n";
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &refs, balance)
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    let who = |user: String| {
        let client = client.clone();
        let url = gw.url("/x");
        async move {
            client
                .get(url)
                .header("X-User", user)
                .send()
                .await
                .expect("send")
                .text()
                .await
                .expect("body")
        }
    };
    let mut placement = HashMap::new();
    for k in 0..200 {
        let user = format!("user-{k}");
        let first = who(user.clone()).await;
        for _ in 0..3 {
            assert_eq!(
                who(user.clone()).await,
                first,
                "key {user} moved without a change"
            );
        }
        placement.insert(user, first);
    }
    let used: std::collections::HashSet<_> = placement.values().collect();
    assert_eq!(used.len(), 4, "keys should spread over every backend");

    // Remove backend "d": only its keys move.
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &refs[..3], balance)
    );
    gw.write(&body);
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true);
    for (user, before) in &placement {
        let now = who(user.clone()).await;
        if before == "d" {
            assert_ne!(now, "d");
        } else {
            assert_eq!(&now, before, "key {user} moved although its backend stayed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_retries_on_another_backend() {
    let up = MockUpstream::start("alive").await;
    // Port 1 (tcpmux): nothing listens there, and no other test can start listening on it.
    let dead = 1; // connections are refused
    let body = format!(
        "upstreams:\n  u:\n    backends:\n      - {{ addr: \"127.0.0.1:{dead}\" }}\n      - {{ addr: \"{}\" }}\n    retries: {{ attempts: 2 }}\n  once:\n    backends:\n      - {{ addr: \"127.0.0.1:{dead}\" }}\n      - {{ addr: \"{}\" }}\n    retries: {{ attempts: 1 }}\nroutes:\n  - {{ name: once, match: {{ path_prefix: /once }}, upstream: once }}\n  - {{ name: all, upstream: u }}\n",
        up.addr, up.addr
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    for _ in 0..20 {
        assert_eq!(
            get(&client, &gw.url("/x")).await,
            Some((200, "alive".into()))
        );
    }
    assert!(
        gw.metric("tollgate_upstream_retries_total{upstream=\"u\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    // With a single attempt, the requests that land on the dead backend fail with 502 JSON.
    let mut bad = 0;
    for _ in 0..20 {
        let (status, body) = get(&client, &gw.url("/once")).await.expect("answer");
        if status == 502 {
            bad += 1;
            assert!(body.contains("bad_gateway"), "{body}");
        } else {
            assert_eq!(status, 200);
        }
    }
    assert!(
        bad > 0,
        "round robin over a dead backend with no retry must fail some requests"
    );
}
