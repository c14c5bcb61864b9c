use std::path::PathBuf;

use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use super::*;

const SECRET_VAR: &str = "TOLLGATE_TEST_JWT_SECRET";
const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture")
}

fn verifier(algs: &[&str], pem: &[(&str, &str)], with_secret: bool) -> JwtVerifier {
    std::env::set_var(SECRET_VAR, SECRET);
    let algorithms: Vec<String> = algs.iter().map(|s| s.to_string()).collect();
    let settings = JwtSettings {
        algorithms: &algorithms,
        pem_files: pem
            .iter()
            .map(|(kid, f)| (Some(kid.to_string()), f.to_string()))
            .collect(),
        secrets: if with_secret {
            vec![(None, SECRET_VAR.to_string())]
        } else {
            vec![]
        },
        jwks_file: None,
        issuer: Some("demo".into()),
        audience: Some("tollgate".into()),
        leeway: Duration::from_secs(5),
        subject_claim: "sub".into(),
        tier_claim: "tier".into(),
        roles_claim: "roles".into(),
    };
    match JwtVerifier::new(settings, &fixtures()) {
        Ok(v) => v,
        Err(e) => panic!("verifier: {e:?}"),
    }
}

fn now() -> i64 {
    issued::now_secs() as i64
}

fn claims() -> serde_json::Value {
    json!({"sub": "alice", "tier": "pro", "roles": ["admin", "user"], "iss": "demo", "aud": "tollgate", "exp": now() + 600})
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    key: &EncodingKey,
    claims: &serde_json::Value,
) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, key).expect("encode")
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rsa.key")).expect("rsa")
}

use super::super::issued;

#[test]
fn every_supported_family_verifies() {
    let v = verifier(
        &[
            "RS256", "RS512", "PS256", "ES256", "EdDSA", "HS256", "HS512",
        ],
        &[("r", "rsa.pub"), ("e", "ec.pub"), ("d", "ed.pub")],
        true,
    );
    let ec = EncodingKey::from_ec_pem(&read("ec.key")).expect("ec");
    let ed = EncodingKey::from_ed_pem(&read("ed.key")).expect("ed");
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let c = claims();
    for token in [
        sign(Algorithm::RS256, Some("r"), &rsa(), &c),
        sign(Algorithm::RS512, None, &rsa(), &c),
        sign(Algorithm::PS256, Some("r"), &rsa(), &c),
        sign(Algorithm::ES256, Some("e"), &ec, &c),
        sign(Algorithm::EdDSA, None, &ed, &c),
        sign(Algorithm::HS256, None, &hs, &c),
        sign(Algorithm::HS512, None, &hs, &c),
    ] {
        let got = v.verify(&token).expect("valid token");
        assert_eq!(got.subject, "alice");
        assert_eq!(got.tier.as_deref(), Some("pro"));
        assert_eq!(got.roles, ["admin", "user"]);
    }
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn alg_none_in_any_casing_is_refused() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&claims())
        );
        assert!(v.verify(&token).is_err(), "alg {alg} accepted");
        let token = format!("{}.{}", b64(&json!({"alg": alg})), b64(&claims()));
        assert!(v.verify(&token).is_err());
    }
}

#[test]
fn rsa_public_key_as_hmac_secret_is_refused() {
    // The classic confusion: sign HS256 with the RSA *public* PEM as the HMAC secret.
    let public_pem = read("rsa.pub");
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&public_pem),
        &claims(),
    );
    let only_rsa = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    assert_eq!(only_rsa.verify(&forged), Err(TokenError::Algorithm));
    // Even with HS256 allowed (for another key), the RSA key never checks an HMAC token.
    let both = verifier(&["RS256", "HS256"], &[("r", "rsa.pub")], true);
    assert_eq!(both.verify(&forged), Err(TokenError::Signature));
    let forged_kid = sign(
        Algorithm::HS256,
        Some("r"),
        &EncodingKey::from_secret(&public_pem),
        &claims(),
    );
    assert_eq!(both.verify(&forged_kid), Err(TokenError::UnknownKey));
}

#[test]
fn tampering_is_detected() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    let token = sign(Algorithm::RS256, None, &rsa(), &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = claims();
    c["tier"] = json!("enterprise");
    let tampered_payload = format!("{}.{}.{}", parts[0], b64(&c), parts[2]);
    assert_eq!(v.verify(&tampered_payload), Err(TokenError::Signature));
    let mut sig = parts[2].to_string();
    let last = if sig.ends_with('A') { 'B' } else { 'A' };
    sig.pop();
    sig.push(last);
    let tampered_sig = format!("{}.{}.{}", parts[0], parts[1], sig);
    assert!(v.verify(&tampered_sig).is_err());
    // Signed by another RSA key.
    let other = EncodingKey::from_rsa_pem(&read("rsa2.key")).expect("rsa2");
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &other, &claims())),
        Err(TokenError::Signature)
    );
}

#[test]
fn time_and_claim_checks() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    let mut c = claims();
    c.as_object_mut().expect("obj").remove("exp");
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
        Err(TokenError::Claims)
    );
    let mut c = claims();
    c["exp"] = json!(now() - 60);
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
        Err(TokenError::Expired)
    );
    let mut c = claims();
    c["exp"] = json!(now() - 2); // within the 5 s leeway
    assert!(v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)).is_ok());
    let mut c = claims();
    c["nbf"] = json!(now() + 600);
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
        Err(TokenError::NotYetValid)
    );
    for (field, bad) in [
        ("iss", json!("evil")),
        ("aud", json!("other")),
        ("sub", json!("")),
    ] {
        let mut c = claims();
        c[field] = bad;
        assert_eq!(
            v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
            Err(TokenError::Claims),
            "{field}"
        );
    }
    let mut c = claims();
    c["roles"] = json!([1, 2]);
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
        Err(TokenError::Claims)
    );
    let mut c = claims();
    c["roles"] = json!(["a,b"]); // a comma would forge a second role downstream
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, None, &rsa(), &c)),
        Err(TokenError::Claims)
    );
}

#[test]
fn algorithms_outside_the_allowlist_are_refused() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    assert_eq!(
        v.verify(&sign(Algorithm::RS384, None, &rsa(), &claims())),
        Err(TokenError::Algorithm)
    );
    assert_eq!(
        v.verify(&sign(Algorithm::PS256, None, &rsa(), &claims())),
        Err(TokenError::Algorithm)
    );
}

#[test]
fn kid_selects_among_configured_keys_only() {
    let v = verifier(&["RS256"], &[("k1", "rsa.pub"), ("k2", "rsa2.pub")], false);
    let k2 = EncodingKey::from_rsa_pem(&read("rsa2.key")).expect("rsa2");
    assert!(v
        .verify(&sign(Algorithm::RS256, Some("k2"), &k2, &claims()))
        .is_ok());
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, Some("k1"), &k2, &claims())),
        Err(TokenError::Signature)
    );
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, Some("k9"), &k2, &claims())),
        Err(TokenError::UnknownKey)
    );
    // jku / x5u / embedded jwk headers are never followed: an attacker's key embedded in the
    // header does not make its signature valid.
    let mut h = Header::new(Algorithm::RS256);
    h.jku = Some("https://evil.example/jwks.json".into());
    h.x5u = Some("https://evil.example/cert.pem".into());
    h.jwk = Some(jsonwebtoken::jwk::Jwk::from_encoding_key(&k2, Algorithm::RS256).expect("jwk"));
    h.kid = Some("k1".into());
    let token = encode(&h, &claims(), &k2).expect("encode");
    assert_eq!(v.verify(&token), Err(TokenError::Signature));
}

#[test]
fn malformed_structures_never_panic() {
    let v = verifier(&["RS256", "HS256"], &[("r", "rsa.pub")], true);
    for token in [
        "",
        ".",
        "..",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "!!!.@@@.###",
        "eyJhbGciOiJSUzI1NiJ9..",
        "eyJ9.e30.x",
        &"A".repeat(10_000),
    ] {
        assert!(v.verify(token).is_err(), "{token:?}");
    }
}

#[test]
fn config_errors_are_collected() {
    let algorithms = vec!["RS256".to_string(), "XX999".to_string()];
    let settings = JwtSettings {
        algorithms: &algorithms,
        pem_files: vec![(None, "missing.pub".into()), (None, "README".into())],
        secrets: vec![(None, "TOLLGATE_TEST_UNSET_VAR".into())],
        jwks_file: None,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(0),
        subject_claim: "sub".into(),
        tier_claim: "tier".into(),
        roles_claim: "roles".into(),
    };
    let errors = match JwtVerifier::new(settings, &fixtures()) {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    };
    let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "algorithms[1]",
            "keys[0].public_key_file",
            "keys[1].public_key_file",
            "keys[0].secret_env"
        ]
    );
}

#[test]
fn jwks_file_keys_are_selected_by_kid() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa(), Algorithm::RS256).expect("jwk");
    jwk.common.key_id = Some("from-jwks".into());
    let set = serde_json::json!({ "keys": [jwk] });
    std::fs::write(dir.path().join("jwks.json"), set.to_string()).expect("write");
    let algorithms = vec!["RS256".to_string()];
    let settings = JwtSettings {
        algorithms: &algorithms,
        pem_files: vec![],
        secrets: vec![],
        jwks_file: Some("jwks.json".into()),
        issuer: Some("demo".into()),
        audience: Some("tollgate".into()),
        leeway: Duration::from_secs(5),
        subject_claim: "sub".into(),
        tier_claim: "tier".into(),
        roles_claim: "roles".into(),
    };
    let v = match JwtVerifier::new(settings, dir.path()) {
        Ok(v) => v,
        Err(e) => panic!("verifier: {e:?}"),
    };
    assert!(v
        .verify(&sign(
            Algorithm::RS256,
            Some("from-jwks"),
            &rsa(),
            &claims()
        ))
        .is_ok());
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, Some("other"), &rsa(), &claims())),
        Err(TokenError::UnknownKey)
    );
    // Unparsable JWKS: a config error, not a panic.
    std::fs::write(dir.path().join("bad.json"), "{not json").expect("write");
    let settings = JwtSettings {
        algorithms: &algorithms,
        pem_files: vec![],
        secrets: vec![],
        jwks_file: Some("bad.json".into()),
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(5),
        subject_claim: "sub".into(),
        tier_claim: "tier".into(),
        roles_claim: "roles".into(),
    };
    assert!(JwtVerifier::new(settings, dir.path()).is_err());
}

#[test]
fn verified_tokens_are_cached_but_expiry_still_applies() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    let mut c = claims();
    c["exp"] = json!(now() + 2);
    let token = sign(Algorithm::RS256, None, &rsa(), &c);
    assert!(v.verify(&token).is_ok());
    // A hit: same answer.
    assert_eq!(v.verify(&token).map(|x| x.subject), Ok("alice".to_string()));
    // Expired (past exp + 5 s leeway) even though cached.
    let mut old = claims();
    old["exp"] = json!(now() - 60);
    let expired = sign(Algorithm::RS256, None, &rsa(), &old);
    assert_eq!(v.verify(&expired), Err(TokenError::Expired));
    assert_eq!(v.verify(&expired), Err(TokenError::Expired));
}

/// RFC 7519 4.1.4: the current time must be before `exp` (plus the leeway). jsonwebtoken alone
/// accepts `exp + leeway == now`; the gateway refuses it, first verification and cache hit alike.
#[test]
fn exp_plus_leeway_equal_to_now_is_expired_cached_or_not() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    let mut c = claims();
    // The leeway is 5 s: exp + 5 == now (or, if the second turns meanwhile, < now).
    c["exp"] = json!(now() - 5);
    let token = sign(Algorithm::RS256, None, &rsa(), &c);
    assert_eq!(v.verify(&token), Err(TokenError::Expired));
    assert_eq!(v.verify(&token), Err(TokenError::Expired));
}

/// Found by the `credentials` fuzz target: a cache hit added the leeway to a token's `exp`
/// without checking for overflow.
#[test]
fn a_far_future_exp_is_cached_without_overflow() {
    let v = verifier(&["RS256"], &[("r", "rsa.pub")], false);
    for exp in [json!(u64::MAX), json!(1e300)] {
        let mut c = claims();
        c["exp"] = exp;
        let token = sign(Algorithm::RS256, None, &rsa(), &c);
        let first = v.verify(&token).map(|x| x.subject);
        assert_eq!(
            v.verify(&token).map(|x| x.subject),
            first,
            "a hit must agree"
        );
    }
}
