//! Proxy hygiene: X-Forwarded-*, hop-by-hop removal both ways, h2c and HTTP/1.1 on one port,
//! response compression per route, and the downstream keep-alive idle timeout.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_hop_by_hop_removal() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: zipped, match: {{ path: /big }}, upstream: u, compression: {{ gzip: 6 }} }}\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let gw = Gateway::start(&body).await;
    let client = http();
    let resp = client
        .get(gw.url("/x"))
        .header("host", "shop.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-connection", "keep-alive")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    // Response side: Connection-named and hop-by-hop headers are gone.
    assert!(resp.headers().get("x-hop").is_none());
    assert!(
        resp.headers().get("server").is_none(),
        "the upstream's Server header leaked"
    );
    assert!(resp.headers().get("keep-alive").is_none());
    assert_eq!(
        resp.headers().get("x-instance").map(|v| v.as_bytes()),
        Some(&b"a"[..])
    );

    let seen = a.last_seen();
    assert_eq!(
        seen.headers.get("x-forwarded-for").map(String::as_str),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(
        seen.headers.get("x-forwarded-proto").map(String::as_str),
        Some("http")
    );
    assert_eq!(
        seen.headers.get("x-forwarded-host").map(String::as_str),
        Some("shop.example")
    );
    assert_eq!(
        seen.headers.get("host").map(String::as_str),
        Some("shop.example")
    );
    assert!(!seen.headers.contains_key("x-private"));
    assert!(!seen.headers.contains_key("proxy-connection"));

    // Compression on the route that asks for it, not on the other.
    let raw = reqwest::Client::builder()
        .no_gzip()
        .no_proxy()
        .build()
        .expect("client");
    let zipped = raw
        .get(gw.url("/big"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(
        zipped
            .headers()
            .get("content-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    let bytes = zipped.bytes().await.expect("body");
    assert!(
        bytes.len() < 20 * 1024 / 4,
        "gzip body is {} bytes",
        bytes.len()
    );
    let plain = raw
        .get(gw.url("/x"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("send");
    assert!(plain.headers().get("content-encoding").is_none());
    // And a client that does not accept gzip gets the identity body.
    let identity = raw.get(gw.url("/big")).send().await.expect("send");
    assert!(identity.headers().get("content-encoding").is_none());
    assert_eq!(identity.bytes().await.expect("body").len(), 20 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_http1_share_the_port() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let gw = Gateway::start(&body).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .expect("client");
    let resp = h2.get(gw.url("/x")).send().await.expect("h2c");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.text().await.expect("body"), "a");
    // The backend got an HTTP/1.1 request with a Host header and an origin-form target.
    let seen = a.last_seen();
    assert_eq!(seen.uri, "/x");
    assert!(seen
        .headers
        .get("host")
        .is_some_and(|h| h.starts_with("127.0.0.1")));
    let resp = http().get(gw.url("/x")).send().await.expect("h1");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    // A request shorter than HTTP/2's 24-byte preface is answered at once (400: no Host), not
    // held until the header deadline waiting for more bytes.
    let mut conn = gw.connect().await;
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer to a short request within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_or_closed() {
    let a = MockUpstream::start("a").await;
    let gw = Gateway::start(&one_route(&[&a])).await;
    let mut conn = gw.connect().await;
    // Two requests in one write. Pingora serves the first and closes the connection rather
    // than read the second out of the first one's buffer (RFC 9112 §9.3.2 lets a server close;
    // the client retries): what must not happen is a hang, a mixed-up answer or a second
    // request reaching the backend unseen by the gateway's checks.
    conn.write_all(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\nGET /two HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the connection neither answered both nor closed"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = answer.matches("HTTP/1.1 200").count();
    assert!((1..=2).contains(&answered), "{answer}");
    assert_eq!(
        a.hits(),
        answered,
        "the backend saw exactly the answered requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let gw = Gateway::start_with(&body, "  keepalive_timeout: 1s\n").await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    conn.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the gateway must close the connection after about a second.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open after 10 s");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_headers_and_header_counts() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let gw = Gateway::start_with(&body, "  max_headers: 20\n").await;
    let client = http();
    let r = client
        .get(gw.url("/x"))
        .header("x_custom", "1")
        .header("x-normal", "2")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = a.last_seen();
    assert!(
        !seen.headers.contains_key("x_custom"),
        "underscore header forwarded by default"
    );
    assert!(seen.headers.contains_key("x-normal"));
    let mut many = client.get(gw.url("/x"));
    for i in 0..30 {
        many = many.header(format!("x-h{i}"), "v");
    }
    let r = many.send().await.expect("send");
    assert_eq!(r.status(), 431);
    // reject mode: 400 JSON.
    gw.write_raw(
        &std::fs::read_to_string(&gw.config_path)
            .expect("read")
            .replace("max_headers: 20", "underscore_headers: reject"),
    );
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true, "{s}");
    let r = client
        .get(gw.url("/x"))
        .header("x_custom", "1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_server_header_can_be_kept() {
    let a = MockUpstream::start("a").await;
    let body = format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", &[&a], "")
    );
    let gw = Gateway::start_with(&body, "  hide_backend_server: false\n").await;
    let resp = http().get(gw.url("/x")).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("server").map(|v| v.as_bytes()),
        Some(&b"mock/1.0 (internal build 42)"[..])
    );
    // Hop-by-hop removal does not depend on it.
    assert!(resp.headers().get("x-hop").is_none());
    assert!(resp.headers().get("keep-alive").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crlf_after_a_request_body_does_not_spoil_the_next_request() {
    // RFC 9112 §2.2: some clients send a CRLF after a POST body; a server should ignore empty
    // lines before a request line.
    let a = MockUpstream::start("a").await;
    let gw = Gateway::start(&one_route(&[&a])).await;
    let mut conn = gw.connect().await;
    conn.write_all(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .expect("write");
    assert!(
        read_answer(&mut conn).await.starts_with("HTTP/1.1 200"),
        "first"
    );
    conn.write_all(b"\r\n").await.expect("write");
    conn.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let second = read_answer(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(a.hits(), 2);
}

/// Read until one whole response (head and `Content-Length` body) has arrived, or 5 s.
async fn read_answer(conn: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return text,
        }
    }
}

/// A backend on a free port that answers every request with fields spelled its own way.
async fn spelling_backend() -> std::net::SocketAddr {
    raw_backend(|mut conn| async move {
        let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let answer = "HTTP/1.1 200 Fine Thanks\r\nX-Backend-Thing: a\r\n\
                    ETag: \"v1\"\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_field_names_are_canonical_unless_case_is_preserved() {
    let backend = spelling_backend().await;
    let body = format!(
        "tiers:\n  anonymous: {{ limit: 100, window: 1m }}\nupstreams:\n  u:\n    backends:\n      - {{ addr: \"{backend}\" }}\nroutes:\n  - {{ name: r, upstream: u }}\n"
    );
    // The head of one answer, its lines without the status line.
    async fn head(gw: &Gateway) -> (String, Vec<String>) {
        let mut conn = gw.connect().await;
        conn.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let answer = read_answer(&mut conn).await;
        let head = answer.split("\r\n\r\n").next().unwrap_or("").to_string();
        let mut lines = head.lines().map(str::to_string);
        let status = lines.next().unwrap_or_default();
        (status, lines.collect())
    }
    let has =
        |lines: &[String], name: &str| lines.iter().any(|l| l.starts_with(&format!("{name}: ")));

    // Default: the rate-limit fields and X-Request-Id straight into the map, names written in
    // canonical form (a dozen common ones capitalised, others lowercase), values untouched.
    // Preserved: the backend's spelling, and Tollgate's as documented.
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "",
            &[
                "etag",
                "Content-Type",
                "Content-Length",
                "x-request-id",
                "ratelimit",
                "x-ratelimit-limit",
                "x-ratelimit-reset",
            ],
            &[
                "x-backend-thing: a",
                "ratelimit-policy: \"anonymous\";q=100;w=60",
                "x-ratelimit-remaining: 99",
            ],
        ),
        (
            "  preserve_header_case: true\n",
            &[
                "ETag",
                "Content-Type",
                "Content-Length",
                "X-Request-Id",
                "RateLimit",
                "X-RateLimit-Limit",
                "X-RateLimit-Reset",
            ],
            &[
                "X-Backend-Thing: a",
                "RateLimit-Policy: \"anonymous\";q=100;w=60",
                "X-RateLimit-Remaining: 99",
            ],
        ),
    ];
    for (server_extra, names, exact) in cases {
        let gw = Gateway::start_with(&body, server_extra).await;
        let (status, lines) = head(&gw).await;
        assert_eq!(
            status, "HTTP/1.1 200 Fine Thanks",
            "the backend's reason phrase is kept"
        );
        for name in names {
            assert!(has(&lines, name), "{name} in {lines:?}");
        }
        for line in exact {
            assert!(lines.iter().any(|l| l == line), "{line} in {lines:?}");
        }
    }
}
