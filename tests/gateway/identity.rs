//! Identity end to end: keys and tokens per tier, what the upstream sees, every rejection
//! (status, JSON body, challenge, upstream never reached), issued keys shared by two gateways
//! through a real redis-server, revocation within a second, Redis outages, and reloads.

use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::*;

const ALICE_KEY: &str = "tg_alice_pro_key_000000000001";
const BOB_KEY: &str = "tg_bob_enterprise_key_0000002";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn hash(key: &str) -> String {
    tollgate::identity::keys::format_hash(&tollgate::identity::keys::hash(key))
}

fn config(up: &MockUpstream, redis: Option<&RedisServer>, consumers: &str) -> String {
    let redis = redis
        .map(|r| format!("redis: {{ url: \"{}\", timeout: 500ms }}\n", r.url()))
        .unwrap_or_default();
    format!(
        "{redis}admin: {{ token: \"{ADMIN_TOKEN}\" }}
consumers:
{consumers}auth:
  jwt:
    algorithms: [RS256]
    keys: [{{ public_key_file: \"{pub_key}\" }}]
    issuer: demo
    audience: tollgate
upstreams:
{up}routes:
  - {{ name: admin-only, match: {{ path_prefix: /admin-area }}, upstream: u, auth: required, roles: [admin] }}
  - {{ name: open, match: {{ path_prefix: /open }}, upstream: u }}
  - {{ name: maybe, match: {{ path_prefix: /maybe }}, upstream: u, auth: optional }}
  - {{ name: private, upstream: u, auth: required, allow_query_key: true }}
",
        pub_key = fixture("rsa.pub"),
        up = upstream_yaml("u", &[up], ""),
    )
}

fn consumers() -> String {
    format!(
        "  - {{ id: alice, tier: pro, roles: [user], api_keys: [\"{}\"] }}\n  - {{ id: bob, tier: enterprise, roles: [admin, user], api_keys: [\"{}\"] }}\n",
        hash(ALICE_KEY),
        hash(BOB_KEY)
    )
}

fn token(claims: Value) -> String {
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa.key")).expect("key")).expect("pem");
    encode(&Header::new(Algorithm::RS256), &claims, &key).expect("sign")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

fn claims(sub: &str, tier: &str) -> Value {
    json!({"sub": sub, "tier": tier, "roles": ["user"], "iss": "demo", "aud": "tollgate", "exp": now() + 600})
}

async fn call(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut r = http().get(gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.expect("send");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    let body = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
        challenge,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_identify_callers_to_the_upstream() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, &consumers())).await;

    // A YAML key for each tier we configured, and a JWT for each tier.
    for (key, id, tier, roles) in [
        (ALICE_KEY, "alice", "pro", "user"),
        (BOB_KEY, "bob", "enterprise", "admin,user"),
    ] {
        let (status, body, _) = call(&gw, "/x", &[("x-api-key", key)]).await;
        assert_eq!((status, body), (200, Value::String("up".into())));
        let seen = up.last_seen();
        assert_eq!(
            seen.headers.get("x-consumer-id").map(String::as_str),
            Some(id)
        );
        assert_eq!(
            seen.headers.get("x-consumer-tier").map(String::as_str),
            Some(tier)
        );
        assert_eq!(
            seen.headers.get("x-consumer-roles").map(String::as_str),
            Some(roles)
        );
        assert_eq!(
            seen.headers.get("x-auth-method").map(String::as_str),
            Some("api_key")
        );
        assert!(
            !seen.headers.contains_key("x-api-key"),
            "the consumed key reached the upstream"
        );
    }
    for tier in ["free", "pro", "enterprise"] {
        let t = token(claims("carol", tier));
        let (status, _, _) = call(&gw, "/x", &[("authorization", &format!("Bearer {t}"))]).await;
        assert_eq!(status, 200);
        let seen = up.last_seen();
        assert_eq!(
            seen.headers.get("x-consumer-id").map(String::as_str),
            Some("carol")
        );
        assert_eq!(
            seen.headers.get("x-consumer-tier").map(String::as_str),
            Some(tier)
        );
        assert_eq!(
            seen.headers.get("x-auth-method").map(String::as_str),
            Some("jwt")
        );
    }
    // Lowercase scheme, key in the query where the route allows it, key with whitespace.
    let t = token(claims("dave", "free"));
    assert_eq!(
        call(&gw, "/x", &[("authorization", &format!("bearer {t}"))])
            .await
            .0,
        200
    );
    assert_eq!(
        call(&gw, &format!("/x?api_key={ALICE_KEY}"), &[]).await.0,
        200
    );
    assert_eq!(
        call(&gw, "/x", &[("x-api-key", &format!(" {ALICE_KEY} "))])
            .await
            .0,
        200
    );
    // Optional: anonymous without credentials.
    assert_eq!(call(&gw, "/maybe", &[]).await.0, 200);
    let seen = up.last_seen();
    assert_eq!(
        seen.headers.get("x-consumer-tier").map(String::as_str),
        Some("anonymous")
    );
    assert!(!seen.headers.contains_key("x-consumer-id"));
    // Roles: bob is admin, alice is not.
    assert_eq!(
        call(&gw, "/admin-area", &[("x-api-key", BOB_KEY)]).await.0,
        200
    );
    let (status, body, _) = call(&gw, "/admin-area", &[("x-api-key", ALICE_KEY)]).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, &consumers())).await;
    let spoofs = [
        ("X-Consumer-Id", "root"),
        ("x_consumer_id", "root"),
        ("X_Consumer_Tier", "enterprise"),
        ("x-consumer-roles", "admin"),
        ("X-Auth-Method", "jwt"),
        ("x_auth_method", "jwt"),
        ("x-consumer-extra", "1"),
    ];
    for path in ["/open", "/maybe", "/x"] {
        let mut headers: Vec<(&str, &str)> = spoofs.to_vec();
        headers.push(("connection", "X-Consumer-Id, x_consumer_tier"));
        if path == "/x" {
            headers.push(("x-api-key", ALICE_KEY));
        }
        let (status, _, _) = call(&gw, path, &headers).await;
        assert_eq!(status, 200, "{path}");
        let seen = up.last_seen();
        for (name, value) in &seen.headers {
            let norm = name.replace('_', "-").to_ascii_lowercase();
            if norm.starts_with("x-consumer-") || norm == "x-auth-method" {
                assert!(
                    !["root", "admin", "1"].contains(&value.as_str()),
                    "{path}: spoofed {name}: {value}"
                );
                assert!(
                    !name.contains('_'),
                    "{path}: underscore spelling {name} forwarded"
                );
            }
        }
        let expected_id = if path == "/x" { Some("alice") } else { None };
        assert_eq!(
            seen.headers.get("x-consumer-id").map(String::as_str),
            expected_id,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_json_with_a_challenge_and_never_reaches_the_upstream() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, &consumers())).await;
    let good = token(claims("carol", "pro"));
    let mut expired = claims("carol", "pro");
    expired["exp"] = json!(now().saturating_sub(3600));
    let mut future = claims("carol", "pro");
    future["nbf"] = json!(now() + 3600);
    let mut no_exp = claims("carol", "pro");
    no_exp.as_object_mut().expect("obj").remove("exp");
    let mut wrong_iss = claims("carol", "pro");
    wrong_iss["iss"] = json!("evil");
    let mut unknown_tier = claims("carol", "pro");
    unknown_tier["tier"] = json!("platinum");
    let pub_pem = std::fs::read(fixture("rsa.pub")).expect("pub");
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims("carol", "pro"),
        &EncodingKey::from_secret(&pub_pem),
    )
    .expect("hs");
    let none = format!(
        "{}.{}.",
        base64_url(&json!({"alg": "none"}).to_string()),
        base64_url(&claims("carol", "enterprise").to_string())
    );
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        base64_url(&claims("carol", "enterprise").to_string()),
        parts[2]
    );

    let bearer = |t: &str| format!("Bearer {t}");
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no credential", vec![], 401, "missing_credentials"),
        (
            "unknown key",
            vec![("x-api-key", "tg_unknown_key_00000000000".into())],
            401,
            "invalid_key",
        ),
        (
            "key with inner space",
            vec![("x-api-key", "tg_alice pro_key".into())],
            401,
            "invalid_key",
        ),
        (
            "expired",
            vec![("authorization", bearer(&token(expired)))],
            401,
            "token_expired",
        ),
        (
            "not yet valid",
            vec![("authorization", bearer(&token(future)))],
            401,
            "token_not_yet_valid",
        ),
        (
            "no exp",
            vec![("authorization", bearer(&token(no_exp)))],
            401,
            "token_claims",
        ),
        (
            "wrong issuer",
            vec![("authorization", bearer(&token(wrong_iss)))],
            401,
            "token_claims",
        ),
        (
            "unknown tier",
            vec![("authorization", bearer(&token(unknown_tier)))],
            401,
            "token_claims",
        ),
        (
            "alg none",
            vec![("authorization", bearer(&none))],
            401,
            "token_malformed",
        ),
        (
            "HS256 with the RSA public key",
            vec![("authorization", bearer(&confused))],
            401,
            "token_algorithm",
        ),
        (
            "tampered payload",
            vec![("authorization", bearer(&tampered))],
            401,
            "token_signature",
        ),
        (
            "garbage token",
            vec![("authorization", "Bearer not.a.jwt".into())],
            401,
            "token_malformed",
        ),
        (
            "token and key",
            vec![
                ("authorization", bearer(&good)),
                ("x-api-key", ALICE_KEY.into()),
            ],
            401,
            "ambiguous_credentials",
        ),
        (
            "two authorization headers",
            vec![
                ("authorization", bearer(&good)),
                ("authorization", bearer(&good)),
            ],
            401,
            "ambiguous_credentials",
        ),
        (
            "two key headers",
            vec![
                ("x-api-key", ALICE_KEY.into()),
                ("x-api-key", BOB_KEY.into()),
            ],
            401,
            "ambiguous_credentials",
        ),
    ];
    let before = up.hits();
    for (what, headers, status, code) in cases {
        let mut r = http().get(gw.url("/x"));
        for (k, v) in &headers {
            r = r.header(*k, v.as_str());
        }
        let resp = r.send().await.expect("send");
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "{what}"
        );
        assert!(
            resp.headers().get("www-authenticate").is_some(),
            "{what}: no challenge"
        );
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"], code, "{what}");
    }
    assert_eq!(up.hits(), before, "a rejected request reached the upstream");
    assert!(
        gw.metric("tollgate_auth_failures_total{reason=\"invalid_key\"}")
            .await
            .unwrap_or(0.0)
            >= 2.0
    );
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http()
        .request(method, gw.admin(path))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("admin");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_keys_are_shared_and_revoked_everywhere_within_a_second() {
    let redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let a = Gateway::start(&config(&up, Some(&redis), &consumers())).await;
    let b = Gateway::start(&config(&up, Some(&redis), &consumers())).await;

    // The admin API wants its token.
    let resp = http()
        .get(a.admin("/admin/keys"))
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status(), 401);

    let (status, issued) = admin(
        &a,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"consumer": "partner", "tier": "pro", "roles": ["reports"]})),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let key = issued["key"].as_str().expect("key").to_string();
    let id = issued["record"]["id"].as_str().expect("id").to_string();
    assert!(key.starts_with("tg_"));

    // Accepted by the other node.
    let (status, _, _) = call(&b, "/x", &[("x-api-key", &key)]).await;
    assert_eq!(status, 200);
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-consumer-id")
            .map(String::as_str),
        Some("partner")
    );
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-consumer-tier")
            .map(String::as_str),
        Some("pro")
    );

    // Listed without the key itself.
    let (_, list) = admin(&b, reqwest::Method::GET, "/admin/keys", None).await;
    let listed = list["keys"].as_array().expect("keys");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id);
    assert!(
        !list.to_string().contains(&key),
        "the key leaked in the listing"
    );

    // Bad requests to the admin API are 4xx with JSON.
    let (status, _) = admin(
        &a,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"consumer": "x", "tier": "gold"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = admin(&a, reqwest::Method::DELETE, "/admin/keys/key_nope", None).await;
    assert_eq!(status, 404);

    // Revoke on A: B refuses it within a second.
    let (status, _) = admin(
        &a,
        reqwest::Method::DELETE,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let revoked_at = Instant::now();
    eventually(
        Duration::from_secs(1),
        "revocation reaching the other gateway",
        || async { (call(&b, "/x", &[("x-api-key", &key)]).await.0 == 401).then_some(()) },
    )
    .await;
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    assert_eq!(call(&a, "/x", &[("x-api-key", &key)]).await.0, 401);

    // Expiring keys stop working on their own.
    let (_, short) = admin(
        &a,
        reqwest::Method::POST,
        "/admin/keys",
        // 2 s, not 1: the first call below must land inside the key's life on a loaded machine.
        Some(json!({"consumer": "temp", "tier": "free", "expires_in": 2})),
    )
    .await;
    let short_key = short["key"].as_str().expect("key").to_string();
    assert_eq!(call(&b, "/x", &[("x-api-key", &short_key)]).await.0, 200);
    eventually(Duration::from_secs(6), "expired key refused", || async {
        (call(&b, "/x", &[("x-api-key", &short_key)]).await.0 == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_has_a_defined_behaviour() {
    let mut redis = RedisServer::start().await;
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, Some(&redis), &consumers())).await;
    let (_, issued) = admin(
        &gw,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"consumer": "partner", "tier": "free"})),
    )
    .await;
    let known = issued["key"].as_str().expect("key").to_string();
    assert_eq!(call(&gw, "/x", &[("x-api-key", &known)]).await.0, 200);

    // Redis hangs (SIGSTOP): bounded by the 500 ms timeout, never a hang or a 500.
    redis.pause();
    let started = Instant::now();
    let (status, body, _) =
        call(&gw, "/x", &[("x-api-key", "tg_never_issued_key_000000001")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("auth_unavailable"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // YAML keys never depend on Redis; a recently validated issued key keeps working.
    assert_eq!(call(&gw, "/x", &[("x-api-key", ALICE_KEY)]).await.0, 200);
    assert_eq!(call(&gw, "/x", &[("x-api-key", &known)]).await.0, 200);
    redis.resume();

    // Redis down (connection refused): the same answers.
    redis.stop();
    assert_eq!(
        call(&gw, "/x", &[("x-api-key", "tg_never_issued_key_000000002")])
            .await
            .0,
        503
    );
    assert_eq!(call(&gw, "/x", &[("x-api-key", ALICE_KEY)]).await.0, 200);
    let status = gw.status().await.expect("status");
    assert_eq!(status["redis"]["up"], false);

    // Back: recovery is automatic.
    redis.restart().await;
    eventually(Duration::from_secs(10), "redis reachable again", || async {
        (call(&gw, "/x", &[("x-api-key", "tg_never_issued_key_000000003")])
            .await
            .0
            == 401)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_key_changes_at_the_swap() {
    let up = MockUpstream::start("up").await;
    let gw = Gateway::start(&config(&up, None, &consumers())).await;
    assert_eq!(call(&gw, "/x", &[("x-api-key", ALICE_KEY)]).await.0, 200);
    // Remove alice's key and move bob to the free tier.
    let changed = format!(
        "  - {{ id: alice, tier: pro, roles: [user] }}\n  - {{ id: bob, tier: free, roles: [admin], api_keys: [\"{}\"] }}\n",
        hash(BOB_KEY)
    );
    gw.write(&config(&up, None, &changed));
    let s = gw.sighup_and_wait().await;
    assert_eq!(s["last_reload"]["ok"], true);
    assert_eq!(call(&gw, "/x", &[("x-api-key", ALICE_KEY)]).await.0, 401);
    assert_eq!(call(&gw, "/x", &[("x-api-key", BOB_KEY)]).await.0, 200);
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-consumer-tier")
            .map(String::as_str),
        Some("free")
    );
}
