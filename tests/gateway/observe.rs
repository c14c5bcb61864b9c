//! Request ids, trace context, the access log and the metrics an operator alerts on.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_trace_context_flow_through() {
    let up = MockUpstream::start("up").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, match: {{ path_prefix: /x }}, upstream: u }}\n",
        upstream_yaml("u", &[&up], "")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    // A valid incoming id is kept end to end.
    let r = client
        .get(gw.url("/x"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-request-id"], "client-id-42");
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-request-id")
            .map(String::as_str),
        Some("client-id-42")
    );
    // An invalid one is replaced by a UUIDv7, the same upstream and back.
    let r = client
        .get(gw.url("/x"))
        .header("x-request-id", "bad id\twith tab")
        .send()
        .await
        .expect("send");
    let id = r.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(),
        7
    );
    assert_eq!(up.last_seen().headers.get("x-request-id"), Some(&id));
    // Error bodies carry it too.
    let r = client
        .get(gw.url("/nowhere"))
        .header("x-request-id", "err-1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "err-1");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["request_id"], "err-1");
    // traceparent: continued with the same trace id and a new span id; started when absent.
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client
        .get(gw.url("/x"))
        .header("traceparent", incoming)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .expect("send");
    let seen = up.last_seen();
    let tp = seen.headers.get("traceparent").expect("traceparent");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "span id not renewed: {tp}"
    );
    assert_eq!(
        seen.headers.get("tracestate").map(String::as_str),
        Some("vendor=1")
    );
    client.get(gw.url("/x")).send().await.expect("send");
    let started = up
        .last_seen()
        .headers
        .get("traceparent")
        .cloned()
        .expect("started");
    assert_eq!(started.len(), 55);

    // One JSON access log line per request, with the id and the route.
    let line = eventually(Duration::from_secs(5), "the access log line", || async {
        gw.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["request_id"] == "client-id-42")
    })
    .await;
    assert_eq!(line["route"], "r");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert!(line["backend"]
        .as_str()
        .is_some_and(|b| b == up.addr.to_string()));
    assert!(line["total_ms"].as_f64().is_some());
    assert_eq!(line["tier"], "anonymous");
    let err_line = eventually(Duration::from_secs(5), "the 404 log line", || async {
        gw.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["request_id"] == "err-1")
    })
    .await;
    assert_eq!(err_line["error"], "not_found");

    // Metrics: bounded labels, latency histograms, in-flight.
    let text = http()
        .get(gw.admin("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("tollgate_requests_total{method=\"GET\",route=\"r\",status=\"2xx\"}"),
        "{text}"
    );
    assert!(text.contains("tollgate_requests_total{method=\"GET\",route=\"\",status=\"4xx\"} 1"));
    assert!(text.contains("tollgate_upstream_duration_seconds_bucket{route=\"r\""));
    assert!(text.contains("tollgate_in_flight_requests"));
    assert!(
        !text.contains("client-id-42"),
        "a request id leaked into a label"
    );
}

/// Every backend's `in_flight` by address, as `endpoint` (`/admin/upstreams` or `/admin/stats`)
/// reports it.
async fn backend_in_flight(gw: &Gateway, endpoint: &str) -> Option<HashMap<String, u64>> {
    let v: Value = http()
        .get(gw.admin(endpoint))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let mut counts = HashMap::new();
    for u in v["upstreams"].as_array()? {
        for b in u["backends"].as_array()? {
            counts.insert(b["addr"].as_str()?.to_string(), b["in_flight"].as_u64()?);
        }
    }
    Some(counts)
}

/// Poll until both admin endpoints report `want` (address -> in_flight) for every backend.
async fn wait_in_flight(gw: &Gateway, want: &[(&MockUpstream, u64)], what: &str) {
    let want: HashMap<String, u64> = want.iter().map(|(m, n)| (m.addr.to_string(), *n)).collect();
    eventually(Duration::from_secs(10), what, || async {
        for endpoint in ["/admin/upstreams", "/admin/stats"] {
            if backend_in_flight(gw, endpoint).await? != want {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_backend_in_flight_follows_attempts_retries_and_errors() {
    let failing = MockUpstream::start("failing").await;
    let slow = MockUpstream::start("slow").await;
    failing.set_status(503);
    slow.set_delay(Duration::from_millis(2500));
    // Round robin over both: requests that try `failing` first get its 503 and are retried on
    // `slow`, so every request ends up on `slow`. /quick gives up on a silent backend quickly.
    let retries = "    retries: { attempts: 2, budget_percent: 100, min_per_second: 100, backoff: 1ms, backoff_max: 1ms }\n";
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: quick, match: {{ path_prefix: /quick }}, upstream: u, timeouts: {{ read: 400ms, total: 3s }} }}\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&failing, &slow], retries)
    );
    let gw = Gateway::start(&body).await;
    wait_in_flight(
        &gw,
        &[(&failing, 0), (&slow, 0)],
        "nothing in flight at start",
    )
    .await;

    // N concurrent requests on the slow backend: all N counted there while they run, none on
    // the backend that answered 503 (the retry moved them).
    const N: u64 = 4;
    let client = http();
    let requests: Vec<_> = (0..N)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url(&format!("/r{i}")));
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    wait_in_flight(
        &gw,
        &[(&failing, 0), (&slow, N)],
        "N requests in flight on the slow backend",
    )
    .await;
    assert!(failing.hits() >= 1, "no request was retried off `failing`");
    for r in requests {
        assert_eq!(r.await.expect("task"), Some((200, "slow".to_string())));
    }
    wait_in_flight(&gw, &[(&failing, 0), (&slow, 0)], "nothing in flight after").await;

    // Errors: a backend that never answers times out (and the request is retried or fails);
    // nothing stays counted.
    slow.set_hang(true);
    let quick: Vec<_> = (0..2)
        .map(|i| {
            let (client, url) = (client.clone(), gw.url(&format!("/quick/{i}")));
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    for r in quick {
        let (status, _) = r.await.expect("task").expect("an answer");
        assert!(status == 503 || status == 504, "{status}");
    }
    wait_in_flight(
        &gw,
        &[(&failing, 0), (&slow, 0)],
        "nothing in flight after timeouts",
    )
    .await;

    // A client that leaves while its backend is silent: released without waiting for the
    // 30 s read timeout.
    let left = {
        let (client, url) = (client.clone(), gw.url("/leaving"));
        tokio::spawn(async move { get(&client, &url).await })
    };
    wait_in_flight(
        &gw,
        &[(&failing, 0), (&slow, 1)],
        "the hanging attempt counted",
    )
    .await;
    left.abort();
    let _ = left.await;
    wait_in_flight(
        &gw,
        &[(&failing, 0), (&slow, 0)],
        "nothing in flight after the client left",
    )
    .await;
}

fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_file_is_reopened_on_sighup_flushed_at_exit_and_says_499() {
    let up = MockUpstream::start("up").await;
    let logs = tempfile::tempdir().expect("dir");
    let path = logs.path().join("access.log");
    let mut gw = Gateway::start_with(
        &one_route(&[&up]),
        &format!("  access_log: \"{}\"\n", path.display()),
    )
    .await;
    let client = http();
    for i in 0..3 {
        assert_eq!(
            get(&client, &gw.url(&format!("/a{i}"))).await.map(|r| r.0),
            Some(200)
        );
    }
    // Lines reach the file within the writer's interval, without more traffic.
    eventually(
        Duration::from_secs(5),
        "three lines in the file",
        || async { (log_lines(&path).len() == 3).then_some(()) },
    )
    .await;
    // logrotate: move the file away, SIGHUP, and new lines go to a new file.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true, "{s}");
    assert_eq!(
        get(&client, &gw.url("/after")).await.map(|r| r.0),
        Some(200)
    );
    eventually(
        Duration::from_secs(5),
        "the line in the reopened file",
        || async { (log_lines(&path).len() == 1).then_some(()) },
    )
    .await;
    assert_eq!(log_lines(&rotated).len(), 3);
    assert_eq!(log_lines(&path)[0]["path"], "/after");

    // A client that leaves before the answer: NGINX's 499, not the client's 400.
    up.set_delay(Duration::from_millis(1500));
    let hits = up.hits();
    let mut s = gw.connect().await;
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET /gone HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .expect("write");
    eventually(
        Duration::from_secs(5),
        "the request at the upstream",
        || async { (up.hits() > hits).then_some(()) },
    )
    .await;
    drop(s);
    let gone = eventually(Duration::from_secs(10), "the 499 line", || async {
        log_lines(&path).into_iter().find(|l| l["path"] == "/gone")
    })
    .await;
    assert_eq!(gone["status"], 499, "{gone}");
    assert_eq!(gone["error"], "client_closed_request", "{gone}");
    up.set_delay(Duration::ZERO);

    // Lines still buffered at shutdown are written before the process exits.
    let before = log_lines(&path).len();
    for i in 0..20 {
        assert_eq!(
            get(&client, &gw.url(&format!("/last{i}")))
                .await
                .map(|r| r.0),
            Some(200)
        );
    }
    gw.signal(gw.child.id(), "TERM");
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success() || status.code().is_some(), "{status:?}");
    assert_eq!(log_lines(&path).len(), before + 20);
}
