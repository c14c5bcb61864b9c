//! Reload: a broken file keeps the old config; changes under load lose no request; many reloads
//! leave memory, threads and probe tasks flat.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

fn routes(upstream: &str, path: &str) -> String {
    format!("routes:\n  - {{ name: r, match: {{ path_prefix: {path} }}, upstream: {upstream} }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_file_keeps_old_config_and_reports_errors() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}{}",
        upstream_yaml("u", &[&a], ""),
        routes("u", "/")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));

    // Two semantic errors: both must be reported, with line and column.
    let broken = format!(
        "upstreams:\n{}{}",
        upstream_yaml("u", &[&a], "    retries: { attempts: 0 }\n"),
        routes("nope", "/")
    );
    gw.write(&broken);
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], false);
    assert_eq!(s["config_generation"], 1);
    let errors: Vec<String> = s["last_reload"]["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e.as_str().expect("str").to_string())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let path = gw.config_path.display().to_string();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&path) && e.contains("upstreams.u.retries.attempts")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("routes[0].upstream: unknown upstream \"nope\"")),
        "{errors:?}"
    );
    // Every error carries PATH:LINE:COLUMN.
    for e in &errors {
        let rest = e.strip_prefix(&path).expect("path prefix");
        let parts: Vec<&str> = rest.splitn(4, ':').collect();
        assert!(
            parts[1].parse::<usize>().is_ok() && parts[2].parse::<usize>().is_ok(),
            "{e}"
        );
    }
    // Old config still serving; the failure is counted.
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));
    assert_eq!(
        gw.metric("tollgate_config_reloads_total{result=\"error\"}")
            .await,
        Some(1.0)
    );

    // A syntax error is reported the same way.
    gw.write_raw("server: [unclosed\n");
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], false);
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));

    // And the admin endpoint runs the same path, answering with every error.
    let resp = client
        .post(gw.admin("/admin/reload"))
        .send()
        .await
        .expect("reload");
    assert_eq!(resp.status(), 422);
    let v: serde_json::Value = resp.json().await.expect("json");
    assert!(!v["errors"].as_array().expect("errors").is_empty());

    // Fix it: the next reload applies.
    gw.write(&body.replace("path_prefix: /", "path_prefix: /x"));
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true);
    assert_eq!(s["config_generation"], 2);
    assert_eq!(get(&client, &gw.url("/y")).await.map(|r| r.0), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request() {
    let ups: Vec<MockUpstream> = futures_start(4).await;
    let hc = "    health_check: { path: /health, interval: 200ms, timeout: 500ms }\n";
    // Generation k: backends {k, k+1} of 4, route prefix alternates between / and /api (both
    // cover /api/x, which the load loop requests).
    let config = |k: usize| {
        let pair = [&ups[k % 4], &ups[(k + 1) % 4]];
        let prefix = if k % 2 == 0 { "/" } else { "/api" };
        format!(
            "upstreams:\n{}{}",
            upstream_yaml("u", &pair, hc),
            routes("u", prefix)
        )
    };
    let gw = Gateway::start(&config(0)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), gw.url("/api/x"));
        workers.push(tokio::spawn(async move {
            let client = http();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .expect("lock")
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().expect("lock").push(e.to_string()),
                }
            }
        }));
    }
    for k in 1..=8 {
        gw.write(&config(k));
        let s = gw.sighup_and_wait().await;
        assert_eq!(s["last_reload"]["ok"], true);
        assert_eq!(s["config_generation"], (k + 1) as u64);
        // Let some traffic run on this generation.
        let target = ok.load(Ordering::Relaxed) + 20;
        eventually(
            Duration::from_secs(10),
            "traffic on the new generation",
            || async { (ok.load(Ordering::Relaxed) >= target).then_some(()) },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let failed = failed.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 160);
    // Every instance served some of the load.
    for u in &ups {
        assert!(u.hits() > 0, "{} never served", u.name());
    }
}

async fn futures_start(n: usize) -> Vec<MockUpstream> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(MockUpstream::start(&format!("m{i}")).await);
    }
    v
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("field")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_leave_memory_and_tasks_flat() {
    let ups: Vec<MockUpstream> = futures_start(3).await;
    let refs: Vec<&MockUpstream> = ups.iter().collect();
    let hc = "    health_check: { path: /health, interval: 1s, timeout: 500ms }\n";
    let gw = Gateway::start(&format!(
        "upstreams:\n{}{}",
        upstream_yaml("u", &refs, hc),
        routes("u", "/")
    ))
    .await;
    let client = http();
    let reload = |k: usize| {
        // Alternate between two backend sets so probes are started and stopped every time.
        let set = if k % 2 == 0 { &refs[..] } else { &refs[..2] };
        gw.write(&format!(
            "upstreams:\n{}{}",
            upstream_yaml("u", set, hc),
            routes("u", "/")
        ));
        let client = client.clone();
        let url = gw.admin("/admin/reload");
        async move {
            let r = client.post(url).send().await.expect("reload");
            assert_eq!(r.status(), 200);
        }
    };
    for k in 0..40 {
        reload(k).await;
    }
    let pid = gw.child.id();
    let rss_before = proc_status(pid, "VmRSS:");
    let threads_before = proc_status(pid, "Threads:");
    for k in 40..240 {
        reload(k).await;
    }
    let rss_after = proc_status(pid, "VmRSS:");
    let threads_after = proc_status(pid, "Threads:");
    let s = gw.status().await.expect("status");
    assert_eq!(s["config_generation"], 241);
    // The last reload (k = 239, odd) kept two backends: two probes (the removed one's stopped).
    assert_eq!(s["health_probes"], 2);
    assert!(
        threads_after <= threads_before + 2,
        "threads grew {threads_before} -> {threads_after}"
    );
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "RSS grew {rss_before} kB -> {rss_after} kB"
    );
    assert_eq!(get(&client, &gw.url("/x")).await.map(|r| r.0), Some(200));
}

/// `server.watch_config`: the config path is a symlink (as a Kubernetes ConfigMap mounts it);
/// swapping it reloads, a broken version is refused with the old config serving, an edit in
/// place reloads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_config_follows_its_symlink_and_refuses_a_broken_version() {
    let (a, b) = (
        MockUpstream::start("a").await,
        MockUpstream::start("b").await,
    );
    let body = |up: &MockUpstream| {
        format!(
            "upstreams:\n{}{}",
            upstream_yaml("u", &[up], ""),
            routes("u", "/")
        )
    };
    let gw = Gateway::start_with(&body(&a), "  watch_config: true\n").await;
    let client = http();
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));
    // The harness wrote a plain file; make the path a symlink into a versioned directory.
    let text = std::fs::read_to_string(&gw.config_path).expect("config");
    let version = |n: u32, text: &str| {
        let d = gw.dir.path().join(format!("..v{n}"));
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("tollgate.yaml"), text).expect("write");
        let tmp = gw.dir.path().join("tollgate.yaml.swap");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(d.join("tollgate.yaml"), &tmp).expect("link");
        std::fs::rename(&tmp, &gw.config_path).expect("swap");
    };
    let generation = |want: u64| {
        let gw = &gw;
        async move {
            eventually(
                Duration::from_secs(10),
                &format!("generation {want}"),
                || async { (gw.generation().await == want).then_some(()) },
            )
            .await
        }
    };
    // Version 1: the same text through a symlink (a new file: one reload, nothing changes).
    version(1, &text);
    generation(2).await;
    // Version 2: upstream b.
    version(2, &text.replace(&body(&a), &body(&b)));
    generation(3).await;
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "b".into())));
    // Version 3: broken. Refused, reported, b keeps serving; not retried while unchanged.
    version(3, &text.replace("routes:", "routes: 7\nroutes:"));
    let s = eventually(Duration::from_secs(10), "the refused reload", || async {
        let s = gw.status().await?;
        (s["last_reload"]["ok"] == false).then_some(s)
    })
    .await;
    assert_eq!(s["config_generation"], 3, "{s}");
    assert!(
        s["last_reload"]["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("tollgate.yaml:")),
        "{s}"
    );
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "b".into())));
    // An edit in place of the file the link points at: reloads.
    std::fs::write(gw.dir.path().join("..v3").join("tollgate.yaml"), &text).expect("write");
    generation(4).await;
    assert_eq!(get(&client, &gw.url("/x")).await, Some((200, "a".into())));
    assert!(gw.log().contains("config file changed: reloading"));
}
