//! Login, the JWT it issues (verified with the public key, as the gateway will), and `/me`.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::harness::One;

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    email: String,
    tier: String,
    roles: Vec<String>,
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

#[tokio::test]
async fn login_issues_rs256_tokens_that_verify_with_the_public_key() {
    let t = One::start().await;
    let key = DecodingKey::from_rsa_pem(&t.stack.keys.public_pem()).expect("public key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["tollgate"]);
    validation.set_issuer(&["tollgate-demo"]);

    for (email, password, tier, role) in [
        ("admin@example.com", "admin123", "enterprise", "admin"),
        ("USER@example.com", "user123", "free", "user"),
    ] {
        let r = t
            .http
            .post(t.url("/api/v1/auth/login"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{email}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["expiresIn"], 3600);
        let token = body["token"].as_str().expect("token");
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .expect("token verifies with the public key")
            .claims;
        assert_eq!(claims.email, email.to_lowercase());
        assert_eq!(claims.tier, tier);
        assert_eq!(claims.roles, vec![role.to_string()]);
        assert_eq!(
            (claims.iss.as_str(), claims.aud.as_str()),
            ("tollgate-demo", "tollgate")
        );
        assert_eq!(claims.exp - claims.iat, 3600);
        assert!(
            uuid::Uuid::parse_str(&claims.sub).is_ok(),
            "sub is the user id"
        );
    }

    // A token signed by another key must not verify: the gateway relies on that.
    let other = crate::harness::Keys::generate();
    let other_key = DecodingKey::from_rsa_pem(&other.public_pem()).unwrap();
    let r: Value = t
        .http
        .post(t.url("/api/v1/auth/login"))
        .json(&json!({ "email": "admin@example.com", "password": "admin123" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = r["token"].as_str().unwrap();
    assert!(jsonwebtoken::decode::<Claims>(token, &other_key, &validation).is_err());
}

#[tokio::test]
async fn login_failures_are_json_4xx() {
    let t = One::start().await;
    let login = |body: reqwest::Body, content_type: Option<&'static str>| {
        let mut req = t.http.post(t.url("/api/v1/auth/login")).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    let json_ct = Some("application/json");
    let long_email = format!(
        r#"{{"email":"{}@example.com","password":"x"}}"#,
        "a".repeat(300)
    );
    let cases: Vec<(String, Option<&'static str>, u16, &str)> = vec![
        (
            r#"{"email":"admin@example.com","password":"nope"}"#.into(),
            json_ct,
            401,
            "invalid_credentials",
        ),
        (
            r#"{"email":"ghost@example.com","password":"admin123"}"#.into(),
            json_ct,
            401,
            "invalid_credentials",
        ),
        (
            r#"{"email":"admin@example.com","#.into(),
            json_ct,
            400,
            "bad_request",
        ),
        (
            r#"{"email":"admin@example.com"}"#.into(),
            json_ct,
            422,
            "invalid_body",
        ),
        (
            r#"{"email":42,"password":"x"}"#.into(),
            json_ct,
            422,
            "invalid_body",
        ),
        (
            r#"{"email":"a\u0000b","password":"x"}"#.into(),
            json_ct,
            422,
            "validation_failed",
        ),
        (long_email, json_ct, 422, "validation_failed"),
        (
            r#"{"email":"admin@example.com","password":"admin123"}"#.into(),
            None,
            415,
            "unsupported_media_type",
        ),
    ];
    for (body, ct, status, code) in cases {
        let r = login(body.clone().into(), ct).await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], code, "{body}: {v}");
        assert!(v["message"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn me_echoes_the_identity_the_gateway_forwarded() {
    let t = One::start().await;
    let r = t
        .http
        .get(t.url("/api/v1/me"))
        .header("X-Consumer-Id", "acme")
        .header("X-Consumer-Tier", "pro")
        .header("X-Consumer-Roles", "admin, billing")
        .header("X-Auth-Method", "api_key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"consumerId": "acme", "tier": "pro", "roles": ["admin", "billing"], "authMethod": "api_key"})
    );

    let r = t.http.get(t.url("/api/v1/me")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unauthenticated");
}
