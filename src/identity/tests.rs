use std::path::Path;

use http::HeaderMap;

use super::*;
use crate::config;

const KEY: &str = "tg_test_key_for_alice_0001";

fn cfg() -> config::GatewayConfig {
    let text = format!(
        "server:\n  listen: [\"127.0.0.1:8080\"]\nconsumers:\n  - {{ id: alice, tier: pro, roles: [admin], api_keys: [\"{}\"] }}\nupstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\nroutes:\n  - {{ name: r, upstream: u, auth: optional }}\n",
        keys::format_hash(&keys::hash(KEY))
    );
    config::load_str(Path::new("t.yaml"), &text).expect("config")
}

fn policy(mode: Mode, roles: &[&str], query: bool) -> Policy {
    Policy {
        mode,
        roles: roles.iter().map(|r| Arc::from(*r)).collect(),
        allow_query_key: query,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

async fn auth(p: &Policy, h: &[(&str, &str)], query: Option<&str>) -> Result<Identity, AuthError> {
    let c = cfg();
    authenticate(&c.identity, None, p, &headers(h), query, None).await
}

#[tokio::test]
async fn yaml_keys_resolve_to_their_consumer() {
    let id = auth(
        &policy(Mode::Required, &[], false),
        &[("x-api-key", KEY)],
        None,
    )
    .await
    .expect("ok");
    assert_eq!(id.consumer.as_deref(), Some("alice"));
    assert_eq!(id.tier, 2); // pro
    assert_eq!(id.method, Method::ApiKey);
    // Surrounding whitespace is tolerated.
    let padded = format!("  {KEY}\t");
    assert!(auth(
        &policy(Mode::Required, &[], false),
        &[("x-api-key", &padded)],
        None
    )
    .await
    .is_ok());
    assert_eq!(
        auth(
            &policy(Mode::Required, &[], false),
            &[("x-api-key", "tg_wrong_key_000000")],
            None
        )
        .await
        .err(),
        Some(AuthError::InvalidKey)
    );
}

#[tokio::test]
async fn modes_and_roles() {
    assert_eq!(
        auth(&policy(Mode::Required, &[], false), &[], None)
            .await
            .err(),
        Some(AuthError::Missing)
    );
    let anon = auth(&policy(Mode::Optional, &[], false), &[], None)
        .await
        .expect("anonymous");
    assert_eq!(anon.tier, ANONYMOUS);
    assert!(anon.consumer.is_none());
    // A bad credential is refused even where auth is optional.
    assert_eq!(
        auth(
            &policy(Mode::Optional, &[], false),
            &[("x-api-key", "tg_wrong_key_000000")],
            None
        )
        .await
        .err(),
        Some(AuthError::InvalidKey)
    );
    // auth: none ignores credentials entirely.
    let none = auth(
        &policy(Mode::None, &[], false),
        &[("x-api-key", "garbage")],
        None,
    )
    .await
    .expect("none");
    assert_eq!(none.method, Method::None);
    assert!(auth(
        &policy(Mode::Required, &["admin"], false),
        &[("x-api-key", KEY)],
        None
    )
    .await
    .is_ok());
    assert_eq!(
        auth(
            &policy(Mode::Required, &["ops"], false),
            &[("x-api-key", KEY)],
            None
        )
        .await
        .err(),
        Some(AuthError::Forbidden)
    );
    assert_eq!(
        auth(&policy(Mode::Optional, &["admin"], false), &[], None)
            .await
            .err(),
        Some(AuthError::Missing)
    );
}

#[tokio::test]
async fn precedence_is_strict() {
    let p = policy(Mode::Required, &[], true);
    let ambiguous = Some(AuthError::Ambiguous);
    assert_eq!(
        auth(
            &p,
            &[("x-api-key", KEY), ("authorization", "Bearer a.b.c")],
            None
        )
        .await
        .err(),
        ambiguous
    );
    assert_eq!(
        auth(
            &p,
            &[
                ("authorization", "Bearer a.b.c"),
                ("authorization", "Bearer d.e.f")
            ],
            None
        )
        .await
        .err(),
        ambiguous
    );
    assert_eq!(
        auth(&p, &[("x-api-key", KEY), ("x-api-key", KEY)], None)
            .await
            .err(),
        ambiguous
    );
    let q = format!("api_key={KEY}");
    assert_eq!(
        auth(&p, &[("x-api-key", KEY)], Some(&q)).await.err(),
        ambiguous
    );
    let qq = format!("api_key={KEY}&api_key={KEY}");
    assert_eq!(auth(&p, &[], Some(&qq)).await.err(), ambiguous);
    assert!(auth(&p, &[], Some(&q)).await.is_ok());
    // The query key only counts where the route allows it.
    assert_eq!(
        auth(&policy(Mode::Required, &[], false), &[], Some(&q))
            .await
            .err(),
        Some(AuthError::Missing)
    );
    // Basic auth is not a gateway credential: it passes through.
    let with_basic = auth(
        &p,
        &[("authorization", "Basic dTpw"), ("x-api-key", KEY)],
        None,
    )
    .await;
    assert!(with_basic.is_ok());
    // "bearer" in any case is a bearer token (no JWT configured here: invalid token).
    assert!(matches!(
        auth(&p, &[("authorization", "bearer a.b.c")], None)
            .await
            .err(),
        Some(AuthError::InvalidToken(_))
    ));
    assert!(matches!(
        auth(&p, &[("authorization", "Bearer ")], None).await.err(),
        Some(AuthError::InvalidToken(_))
    ));
}

#[test]
fn identity_header_spellings() {
    for name in [
        "X-Consumer-Id",
        "x_consumer_id",
        "X_CONSUMER_TIER",
        "x-consumer-roles",
        "X-Auth-Method",
        "x_auth_method",
        "x-consumer-anything",
    ] {
        assert!(is_identity_header(name), "{name}");
    }
    for name in ["x-consumer", "x-auth-methods", "x-api-key", "consumer-id"] {
        assert!(!is_identity_header(name), "{name}");
    }
}

#[test]
fn an_issued_key_lives_at_least_its_expires_in() {
    use super::issued::{expiry_secs, IssuedKey};
    let key = |expires_at| IssuedKey {
        id: "key_1".into(),
        consumer: "c".into(),
        tier: "free".into(),
        roles: Vec::new(),
        created_at: 10,
        expires_at,
    };
    // Issued at 10.999 s for 1 s: still works at 11 s (and 11.999 s), gone at 12 s.
    let late = key(Some(expiry_secs(10_999, 1)));
    assert!(!late.expired(11));
    assert!(late.expired(12));
    // Issued on the second: exactly the ttl.
    let exact = key(Some(expiry_secs(10_000, 5)));
    assert!(!exact.expired(14));
    assert!(exact.expired(15));
    assert!(!key(None).expired(u64::MAX));
    assert_eq!(expiry_secs(u64::MAX - 5, u64::MAX), u64::MAX.div_ceil(1000));
}
