use super::*;

fn line<'a>(path: &'a str, consumer: Option<&'a str>) -> Line<'a> {
    Line {
        time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_400_000_123),
        request_id: "req-1",
        trace_id: Some(&[0xab; 16]),
        client: Some("127.0.0.1".parse().expect("ip")),
        method: "GET",
        path,
        route: "r",
        status: 200,
        bytes_in: 0,
        bytes_out: 6,
        total_ms: 1.23456,
        upstream_ms: None,
        backend: Some("10.0.0.1:80".parse().expect("addr")),
        consumer,
        tier: Some("pro"),
        rate_limit: "allowed",
        cache: "none",
        retries: 0,
        error: None,
    }
}

#[test]
fn a_line_is_one_json_object_with_every_field() {
    let mut out = Vec::new();
    line("/a", Some("acme")).write_json(&mut out);
    assert_eq!(out.last(), Some(&b'\n'));
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["time"], "2026-12-04T16:00:00.123Z");
    // The cached second and humantime's own rendering agree.
    let t = line("/a", None).time;
    assert_eq!(v["time"], humantime::format_rfc3339_millis(t).to_string());
    assert_eq!(v["trace_id"], "ab".repeat(16));
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["total_ms"], 1.235);
    assert_eq!(v["upstream_ms"], serde_json::Value::Null);
    assert_eq!(v["backend"], "10.0.0.1:80");
    assert_eq!(v["consumer"], "acme");
    assert_eq!(v["status"], 200);
    assert_eq!(v["error"], serde_json::Value::Null);
    assert_eq!(v.as_object().map(|o| o.len()), Some(19));
    // IPv6 in both fields.
    let mut l = line("/a", None);
    l.client = Some("2001:db8::1".parse().expect("ip"));
    l.backend = Some("[::1]:8080".parse().expect("addr"));
    let mut out = Vec::new();
    l.write_json(&mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["client"], "2001:db8::1");
    assert_eq!(v["backend"], "[::1]:8080");
}

#[test]
fn hostile_text_is_escaped_and_long_paths_cut() {
    let nasty = "/a\"b\\c\n\r\t\u{1}\u{7f}é/\u{2028}";
    let mut out = Vec::new();
    line(nasty, Some("x\",\"status\":1")).write_json(&mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["path"], nasty);
    assert_eq!(v["consumer"], "x\",\"status\":1");
    assert_eq!(v["status"], 200);
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
    let long = "é".repeat(3000);
    let mut out = Vec::new();
    line(&long, None).write_json(&mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["path"].as_str().map(|p| p.chars().count()), Some(2048));
}

#[test]
fn lines_from_many_threads_reach_the_file_whole_and_a_flush_writes_them_all() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("access.log");
    let target = LogTarget::File(path.display().to_string());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let target = target.clone();
            std::thread::spawn(move || {
                let id = format!("thread-{t}");
                for i in 0..1500 {
                    let p = format!("/t{t}/{i}");
                    let mut l = line(&p, None);
                    l.request_id = &id;
                    log(&target, &l);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    flush(Duration::from_secs(5));
    let text = std::fs::read_to_string(&path).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6_000);
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).expect("whole line");
        assert!(v["path"].as_str().is_some_and(|p| p.starts_with("/t")));
    }
}
