//! The whole demo stack end to end, the way `scripts/demo.sh` runs it: a private PostgreSQL and
//! Redis, three upstream-demo instances, an RSA key pair from openssl, and the real `tollgate`
//! binary with `conf/demo.yaml` (only addresses and paths substituted; see `gateway`). Then it
//! walks what a newcomer would try, through the gateway: log in and call `/api/v1/me`; list,
//! fetch, create, change and delete resources; events sent twice with one `Idempotency-Key`;
//! the anonymous tier's limit; balancing over the three instances; `/api/v1/external` failing
//! until its breakers open, then recovering; and one instance killed while traffic goes on.
//!
//! Needs the gateway binary next to upstream-demo's: `cargo build --workspace --bins` first
//! (`cargo test --workspace` builds it too). Also needs postgresql, redis-server and openssl,
//! like the `demo` tests, and Linux (one step uses a second loopback address, 127.0.0.2).

#[path = "../demo/harness.rs"]
mod harness;

mod gateway;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::Response;
use serde_json::{json, Value};

use gateway::{upstream_backends, Addresses, Gateway, ADMIN_TOKEN};
use harness::{eventually, Demo, Keys, Stack};

/// The seeded users (schema/0004_seed.sql).
const ADMIN_ID: &str = "00000000-0000-4000-8000-00000000a001";
const USER_ID: &str = "00000000-0000-4000-8000-00000000a002";
/// The YAML consumer `partner` (tier pro) in conf/demo.yaml.
const API_KEY: &str = "tg_demo_partner_key_not_secret";

/// Everything running, plus a client for the gateway.
struct World {
    // Field order is drop order: the gateway stops before the instances, they before the stores.
    gw: Gateway,
    demos: Vec<Demo>,
    stack: Stack,
    http: reqwest::Client,
}

impl World {
    async fn start() -> Self {
        let stack = Stack::start();
        // EXTERNAL_CONTROL: the breaker step flips /api/v1/external's failure rate at runtime.
        let extra = [
            ("EXTERNAL_CONTROL", "1"),
            ("EXTERNAL_FAIL_RATE", "0"),
            ("EXTERNAL_STALL_RATE", "0"),
        ];
        let (d1, d2, d3) = tokio::join!(
            Demo::start(&stack, "demo-1", &extra),
            Demo::start(&stack, "demo-2", &extra),
            Demo::start(&stack, "demo-3", &extra),
        );
        let demos = vec![d1, d2, d3];
        // demo.sh puts demo-N on 127.0.0.1:300N; here they took free ports.
        let backends: HashMap<String, String> = demos
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("127.0.0.1:{}", 3001 + i), addr_of(d)))
            .collect();
        let shipped = std::fs::read_to_string(gateway::demo_yaml()).expect("read conf/demo.yaml");
        let config = gateway::test_config(
            &shipped,
            &Addresses {
                backends: &backends,
                redis_url: &stack.redis.url(),
                jwt_public_key: &stack.keys.public_pem_path(),
            },
        );
        let gw = Gateway::start(&config).await;
        Self {
            gw,
            demos,
            stack,
            http: gateway::http(),
        }
    }

    fn url(&self, path: &str) -> String {
        self.gw.url(path)
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let r = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .expect("HTTP request");
        assert_eq!(r.status(), 200, "login {email}");
        // The login route's own limit (per client IP, apart from the tier limits).
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("20"));
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some("\"anonymous\";q=20;w=60")
        );
        let v = body(r).await;
        assert_eq!(v["tokenType"], "Bearer");
        v["token"].as_str().expect("token").to_string()
    }

    /// `GET path` with a bearer token (or anonymously).
    async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("HTTP request")
    }

    async fn upstreams(&self) -> Value {
        self.gw.upstreams().await.expect("GET /admin/upstreams")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- tollgate log (tail) ----\n{}",
                tail(&self.gw.log(), 60)
            );
            for d in &self.demos {
                eprintln!(
                    "---- {} log (tail) ----\n{}",
                    d.instance,
                    tail(&d.log(), 20)
                );
            }
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `"127.0.0.1:PORT"` of an instance.
fn addr_of(d: &Demo) -> String {
    d.base.trim_start_matches("http://").to_string()
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    header_in(r.headers(), name)
}

fn header_in<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn body(r: Response) -> Value {
    r.json().await.expect("a JSON body")
}

async fn json_of(r: Response) -> (u16, HeaderMap, Value) {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

/// The shipped file itself, byte for byte, passes `tollgate -t` once the key it names exists
/// (demo.sh generates it) and the admin token variable is set (demo.sh sets it).
#[test]
fn shipped_demo_yaml_passes_tollgate_t() {
    let bin = gateway::tollgate_bin();
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("conf")).unwrap();
    std::fs::create_dir_all(root.path().join("run/jwt")).unwrap();
    let config = root.path().join("conf/demo.yaml");
    std::fs::copy(gateway::demo_yaml(), &config).unwrap();
    let keys = Keys::generate();
    std::fs::copy(
        keys.public_pem_path(),
        root.path().join("run/jwt/public.pem"),
    )
    .unwrap();

    let out = Command::new(&bin)
        .arg("-t")
        .arg("-c")
        .arg(&config)
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tollgate -t failed:\n{text}");
    assert!(text.contains("configuration is valid"), "{text}");

    // Without the key the file names, it is an error that says which file.
    std::fs::remove_file(root.path().join("run/jwt/public.pem")).unwrap();
    let out = Command::new(&bin)
        .args(["-t", "-c"])
        .arg(&config)
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("public.pem"), "{text}");
}

#[tokio::test]
async fn a_newcomer_walks_the_demo_stack() {
    let mut w = World::start().await;
    let admin = w.login("admin@example.com", "admin123").await;
    let user = w.login("user@example.com", "user123").await;
    identity(&w, &admin, &user).await;
    resources(&w, &admin, &user).await;
    events(&w, &user).await;
    anonymous_rate_limit(&w, &admin).await;
    balancing(&w, &admin).await;
    breaker(&w, &admin).await;
    kill_one_instance(&mut w, &admin).await;
}

/// `/api/v1/me` with a JWT, an API key, nothing, garbage, and forged identity headers.
async fn identity(w: &World, admin: &str, user: &str) {
    let r = w.get("/api/v1/me", Some(admin)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("100000"));
    assert_eq!(
        body(r).await,
        json!({"consumerId": ADMIN_ID, "tier": "enterprise", "roles": ["admin"], "authMethod": "jwt"})
    );

    let r = w.get("/api/v1/me", Some(user)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1000"));
    assert_eq!(
        body(r).await,
        json!({"consumerId": USER_ID, "tier": "free", "roles": ["user"], "authMethod": "jwt"})
    );

    let r = w
        .http
        .get(w.url("/api/v1/me"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("10000"));
    assert_eq!(
        body(r).await,
        json!({"consumerId": "partner", "tier": "pro", "roles": ["partner"], "authMethod": "api_key"})
    );

    // No credentials: the gateway answers, the instance never sees the request.
    let r = w.get("/api/v1/me", None).await;
    assert_eq!(r.status(), 401);
    assert!(
        header(&r, "www-authenticate").is_some_and(|h| h.contains("Bearer")),
        "{:?}",
        r.headers()
    );
    assert_eq!(body(r).await["error"], "missing_credentials");

    let r = w.get("/api/v1/me", Some("not-a-jwt")).await;
    assert_eq!(r.status(), 401);
    let v = body(r).await;
    assert!(
        v["error"].as_str().is_some_and(|e| e.starts_with("token_")),
        "{v}"
    );

    // Identity headers from the client are not trusted: still no credentials.
    let r = w
        .http
        .get(w.url("/api/v1/me"))
        .header("X-Consumer-Id", ADMIN_ID)
        .header("X-Consumer-Tier", "enterprise")
        .header("X-Auth-Method", "jwt")
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401);

    // A wrong password is the instance's own 401, passed through.
    let r = w
        .http
        .post(w.url("/api/v1/auth/login"))
        .json(&json!({"email": "admin@example.com", "password": "wrong"}))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["error"], "invalid_credentials");
}

/// Anonymous reads; writes need a token, deletes the admin role; nothing is written without.
async fn resources(w: &World, admin: &str, user: &str) {
    let r = w
        .get("/api/v1/resources?per_page=2&fields=id,name", None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-limit"),
        Some("100"),
        "anonymous tier"
    );
    let v = body(r).await;
    assert_eq!(
        v["data"],
        json!([{"id": 1, "name": "Getting started"}, {"id": 2, "name": "Rate limits"}])
    );
    assert!(v["total"].as_i64().is_some_and(|t| t >= 3), "{v}");

    let r = w.get("/api/v1/resources/3", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await["name"], "Circuit breaker");

    // The read route compresses for clients that ask.
    let r = w
        .http
        .get(w.url("/api/v1/resources?per_page=100"))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));

    let db = w.stack.db().await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM resources")
            .fetch_one(&db)
            .await
            .expect("count resources")
    };
    let before = count().await;
    let widget = json!({"name": "stack widget", "description": "made through the gateway"});

    let r = w
        .http
        .post(w.url("/api/v1/resources"))
        .json(&widget)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["error"], "missing_credentials");
    let r = w
        .http
        .post(w.url("/api/v1/resources"))
        .header("X-Consumer-Id", USER_ID)
        .json(&widget)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401, "a forged X-Consumer-Id is no credential");
    assert_eq!(
        count().await,
        before,
        "refused writes never reach the database"
    );

    let r = w
        .http
        .post(w.url("/api/v1/resources"))
        .bearer_auth(user)
        .json(&widget)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 201);
    let location = header(&r, "location").expect("Location").to_string();
    let created = body(r).await;
    assert_eq!(
        created["owner"], USER_ID,
        "the owner is the token's subject"
    );
    assert_eq!(location, format!("/api/v1/resources/{}", created["id"]));
    assert_eq!(count().await, before + 1);

    let r = w.get(&location, None).await;
    assert_eq!(r.status(), 200);
    let got = body(r).await;
    assert_eq!(
        (&got["name"], &got["owner"]),
        (&json!("stack widget"), &json!(USER_ID))
    );

    let r = w
        .http
        .put(w.url(&location))
        .bearer_auth(user)
        .json(&json!({"name": "stack widget v2"}))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await["name"], "stack widget v2");

    let r = w
        .http
        .delete(w.url(&location))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401);
    let r = w
        .http
        .delete(w.url(&location))
        .bearer_auth(user)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 403, "deleting needs the admin role");
    assert_eq!(body(r).await["error"], "forbidden");
    assert_eq!(count().await, before + 1);
    let r = w
        .http
        .delete(w.url(&location))
        .bearer_auth(admin)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 204);
    assert_eq!(w.get(&location, None).await.status(), 404);
    assert_eq!(count().await, before);
}

/// The same `Idempotency-Key` twice (through different instances): one id, one stored row.
async fn events(w: &World, user: &str) {
    let key = "stack-order-1";
    let first = json!({"type": "order", "n": 1});
    let r = w
        .http
        .post(w.url("/api/v1/events"))
        .header("Idempotency-Key", key)
        .json(&first)
        .send()
        .await
        .expect("HTTP request");
    let (status, _, a) = json_of(r).await;
    assert_eq!(status, 202, "{a}");
    assert_eq!(a["duplicate"], false);
    let id = a["eventId"].as_str().expect("eventId").to_string();

    // Round robin sends the twin to another instance; Redis holds the key for all of them.
    let r = w
        .http
        .post(w.url("/api/v1/events"))
        .bearer_auth(user)
        .header("Idempotency-Key", key)
        .json(&json!({"type": "order", "n": 2}))
        .send()
        .await
        .expect("HTTP request");
    let (status, _, b) = json_of(r).await;
    assert_eq!(status, 202, "{b}");
    assert_eq!(
        (b["eventId"].as_str(), &b["duplicate"]),
        (Some(id.as_str()), &json!(true))
    );

    let url = w.url(&format!("/api/v1/events/{id}"));
    let stored = eventually(Duration::from_secs(30), "the event is stored", || {
        let req = w.http.get(&url).send();
        async move {
            let v: Value = req.await.ok()?.json().await.ok()?;
            (v["status"] == "stored").then_some(v)
        }
    })
    .await;
    assert_eq!(stored["payload"], first, "the first body wins");
    let db = w.stack.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE idempotency_key = $1")
        .bind(key)
        .fetch_one(&db)
        .await
        .expect("count events");
    assert_eq!(rows, 1);

    let r = w
        .http
        .post(w.url("/api/v1/events"))
        .json(&first)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 400);
    assert_eq!(body(r).await["error"], "missing_idempotency_key");
}

/// 150 anonymous requests to `/api/v1/status` from a fresh client address: the anonymous
/// tier's 100 pass, the rest get 429 with `Retry-After`. Other callers are not affected.
async fn anonymous_rate_limit(w: &World, admin: &str) {
    // Anonymous callers are counted per client IP, and the earlier steps already used some of
    // 127.0.0.1's budget: this step comes from 127.0.0.2 (Linux routes all of 127/8 to lo).
    let fresh_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let client = reqwest::Client::builder()
        .local_address(fresh_ip)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("HTTP client");
    let minute_before = minute_now();
    let mut results = Vec::new();
    for _ in 0..150 {
        let r = client
            .get(w.url("/api/v1/status"))
            .send()
            .await
            .expect("request from 127.0.0.2 (is 127.0.0.0/8 routed to lo?)");
        results.push(json_of(r).await);
    }
    let minute_after = minute_now();

    for (i, (status, h, body)) in results.iter().enumerate().take(100) {
        assert_eq!(*status, 200, "request {i}: {body}");
        assert_eq!(header_in(h, "x-ratelimit-limit"), Some("100"));
        assert_eq!(
            header_in(h, "ratelimit-policy"),
            Some("\"anonymous\";q=100;w=60")
        );
    }
    let mut passed = 0;
    for (status, h, body) in &results {
        if *status == 200 {
            passed += 1;
            continue;
        }
        assert_eq!(*status, 429, "{body}");
        let retry_after: u64 = header_in(h, "retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {h:?}"));
        // Up to 61, not 60: a sliding window refused at the end of its minute waits for the rest
        // of it plus the part of the next during which this minute's weight still counts
        // (limit 100: 60 s + 0.6 s, rounded up). The old bound of 60 was wrong.
        assert!((1..=61).contains(&retry_after), "Retry-After {retry_after}");
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["retry_after"], retry_after);
        assert_eq!(header_in(h, "x-ratelimit-remaining"), Some("0"));
    }
    if minute_before == minute_after {
        assert_eq!(passed, 100, "exactly the limit in one fixed window");
    } else {
        // The sliding window's previous-minute weight decays while the requests run (a few
        // seconds): a handful more may pass right after a minute boundary.
        assert!((100..=105).contains(&passed), "{passed} passed");
    }

    // The same address with a token is another caller (the enterprise tier, per consumer);
    // /health is not limited; and 127.0.0.1 keeps its own anonymous budget.
    let r = client
        .get(w.url("/api/v1/status"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("100000"));
    let r = client
        .get(w.url("/health"))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), None);
    assert_eq!(w.get("/api/v1/status", None).await.status(), 200);

    // The limits were decided by Redis, not by a fallback.
    let status = w.gw.admin_get("status").await.expect("/admin/status");
    assert_eq!(status["rate_limit"]["mode"], "exact", "{status}");
    assert_eq!(status["rate_limit"]["fallback"], false, "{status}");
    assert_eq!(status["redis"]["up"], true, "{status}");
}

/// Ask `/api/v1/status` `n` times (authenticated: the enterprise tier has room) and count the
/// answering instances. Every request must succeed.
async fn tally(w: &World, token: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (status, _, v) = json_of(w.get("/api/v1/status", Some(token)).await).await;
        assert_eq!(status, 200, "request {i}: {v}");
        let id = v["instanceId"].as_str().expect("instanceId").to_string();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// Round robin spreads the requests over the three instances.
async fn balancing(w: &World, token: &str) {
    let seen = tally(w, token, 60).await;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["demo-1", "demo-2", "demo-3"],
        "{seen:?}"
    );
    for (id, n) in &seen {
        assert!((15..=25).contains(n), "{id} answered {n} of 60: {seen:?}");
    }
}

fn breaker_states(ups: &Value, upstream: &str) -> Vec<String> {
    upstream_backends(ups, upstream)
        .iter()
        .map(|b| b["breaker"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Set `/api/v1/external`'s failure rate on every instance (directly: the mode route is not
/// routed by the gateway).
async fn set_fail_rate(w: &World, rate: f64) {
    for d in &w.demos {
        let r = w
            .http
            .put(d.url("/api/v1/external/mode"))
            .json(&json!({"failRate": rate, "stallRate": 0}))
            .send()
            .await
            .expect("HTTP request");
        assert_eq!(r.status(), 200, "{}", d.instance);
    }
}

/// `/api/v1/external` fails on every instance: the breakers open, requests get a fast 503 with
/// `Retry-After`, other routes are unaffected; it recovers: half-open probes close them again.
async fn breaker(w: &World, token: &str) {
    let r = w
        .http
        .get(w.gw.admin("/admin/upstreams"))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 401, "the admin API needs the token");
    let ups = w.upstreams().await;
    assert_eq!(breaker_states(&ups, "external"), ["closed"; 3], "{ups}");

    let r = w.get("/api/v1/external/mode", Some(token)).await;
    assert_eq!(r.status(), 404, "the demo's control route is not exposed");
    assert_eq!(body(r).await["error"], "not_found");
    let r = w.get("/api/v1/external", Some(token)).await;
    assert_eq!(r.status(), 200);

    set_fail_rate(w, 1.0).await;
    let mut answers = BTreeMap::new();
    let opened = Instant::now();
    loop {
        let (status, _, v) = json_of(w.get("/api/v1/external", Some(token)).await).await;
        let code = v["error"].as_str().unwrap_or("").to_string();
        *answers.entry((status, code)).or_insert(0) += 1;
        let ups = w.upstreams().await;
        if breaker_states(&ups, "external") == ["open"; 3] {
            // Only the external upstream has a breaker; the instances stay healthy for the rest.
            assert_eq!(breaker_states(&ups, "demo"), ["closed"; 3], "{ups}");
            break;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(30),
            "breakers not all open after 30 s: {ups}, answers {answers:?}"
        );
    }
    for (status, code) in answers.keys() {
        // The instances' 500/503 (external_failed), or the gateway's own 503 once no breaker
        // admits a request; never a success or a gateway 502/504.
        let ok = matches!(
            (*status, code.as_str()),
            (500 | 503, "external_failed") | (503, "no_healthy_backend")
        );
        assert!(ok, "unexpected answer while failing: {answers:?}");
    }

    // Open everywhere: the gateway answers at once, without trying a backend. (A breaker
    // whose open_for ran out meanwhile lets one probe through, which fails and reopens it: at
    // most one such answer per backend.)
    let mut probes = 0;
    let (took, r) = loop {
        let started = Instant::now();
        let r = w.get("/api/v1/external", Some(token)).await;
        let took = started.elapsed();
        if header(&r, "retry-after").is_some() && r.status() == 503 {
            break (took, r);
        }
        let (status, _, v) = json_of(r).await;
        assert!(
            matches!(status, 500 | 503) && v["error"] == "external_failed" && probes < 3,
            "expected the breakers' 503, got {status} {v} (probe {probes})"
        );
        probes += 1;
    };
    assert_eq!(r.status(), 503);
    let retry_after: u64 = header(&r, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(
        (1..=3).contains(&retry_after),
        "open_for is 3s: {retry_after}"
    );
    assert_eq!(body(r).await["error"], "no_healthy_backend");
    assert!(took < Duration::from_millis(500), "503 took {took:?}");
    // Other routes on the same instances are unaffected.
    assert_eq!(w.get("/api/v1/status", Some(token)).await.status(), 200);
    let metrics = w
        .http
        .get(w.gw.admin("/metrics"))
        .send()
        .await
        .expect("HTTP request")
        .text()
        .await
        .expect("metrics text");
    let opened_count: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("tollgate_breaker_transitions_total{")
                && l.contains("upstream=\"external\"")
                && l.contains("state=\"open\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no breaker transitions in /metrics:\n{metrics}"));
    assert!(opened_count >= 3.0, "{opened_count}");

    // The dependency recovers: after open_for, one probe per backend closes its breaker.
    set_fail_rate(w, 0.0).await;
    let recovering = Instant::now();
    loop {
        let (status, _, v) = json_of(w.get("/api/v1/external", Some(token)).await).await;
        assert!(
            status == 200 || (status == 503 && v["error"] == "no_healthy_backend"),
            "while recovering: {status} {v}"
        );
        let ups = w.upstreams().await;
        if breaker_states(&ups, "external") == ["closed"; 3] {
            break;
        }
        assert!(
            recovering.elapsed() < Duration::from_secs(30),
            "breakers not all closed after 30 s: {ups}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut instances = BTreeMap::new();
    for _ in 0..9 {
        let (status, _, v) = json_of(w.get("/api/v1/external", Some(token)).await).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["outcome"], "ok");
        *instances
            .entry(v["instanceId"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(instances.len(), 3, "all three serve again: {instances:?}");
}

/// SIGKILL one instance while requests keep coming: not one fails, the health checks take it
/// out of both upstreams, and the other two share the traffic. Until the health checks notice,
/// every third request is refused by the dead instance and retried on another; the traffic is
/// paced (~5 requests/s, like a person clicking around) so those retries stay within the
/// upstream's retry budget floor (3/s), as they would for a demo user.
async fn kill_one_instance(w: &mut World, token: &str) {
    let victim = addr_of(&w.demos[1]);
    let victim_id = w.demos[1].instance.clone();
    w.demos[1].signal("KILL");
    w.demos[1].wait_exit(Duration::from_secs(10)).await;

    let mut during = BTreeMap::new();
    let started = Instant::now();
    loop {
        let (status, _, v) = json_of(w.get("/api/v1/status", Some(token)).await).await;
        assert_eq!(status, 200, "a request failed after the kill: {v}");
        let id = v["instanceId"].as_str().unwrap_or("?").to_string();
        assert_ne!(id, victim_id, "answered by a killed instance?");
        *during.entry(id).or_insert(0) += 1;

        let ups = w.upstreams().await;
        let marked: Vec<bool> = ["demo", "external"]
            .iter()
            .flat_map(|u| upstream_backends(&ups, u))
            .filter(|b| b["addr"] == victim.as_str())
            .map(|b| b["healthy"] == false)
            .collect();
        if marked == [true, true] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{victim} not marked unhealthy after 30 s: {ups}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!during.is_empty());

    let after = tally(w, token, 40).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["demo-1", "demo-3"],
        "{after:?}"
    );
    for (id, n) in &after {
        assert!((15..=25).contains(n), "{id} answered {n} of 40: {after:?}");
    }
    for _ in 0..6 {
        let (status, _, v) = json_of(w.get("/api/v1/external", Some(token)).await).await;
        assert_eq!(status, 200, "{v}");
        assert_ne!(v["instanceId"], victim_id.as_str());
    }
    let r = w
        .http
        .post(w.url("/api/v1/resources"))
        .bearer_auth(token)
        .json(&json!({"name": "after the kill"}))
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(r.status(), 201, "writes go on too");
}
