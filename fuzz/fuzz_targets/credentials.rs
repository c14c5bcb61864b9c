//! Credential parsing on any input: the API key shape check, the stored key hash form, and JWT
//! verification (arbitrary token text, and arbitrary claims in a correctly signed token).

#![no_main]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tollgate::identity::jwt::{valid_id, JwtSettings, JwtVerifier};
use tollgate::identity::keys;

const SECRET_ENV: &str = "TOLLGATE_FUZZ_JWT_SECRET";
/// The HS256 secret the verifier is given (the seed tokens in the corpus are signed with it).
const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";

fn verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        std::env::set_var(SECRET_ENV, SECRET);
        let algorithms: Vec<String> = ["HS256", "RS256", "ES256", "EdDSA"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // Leaked once: the verifier lives for the whole run.
        let algorithms: &'static [String] = Box::leak(algorithms.into_boxed_slice());
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jwt");
        let settings = JwtSettings {
            algorithms,
            pem_files: vec![
                (Some("rsa".into()), "rsa.pub".into()),
                (Some("ec".into()), "ec.pub".into()),
                (None, "ed.pub".into()),
            ],
            secrets: vec![(Some("hs".into()), SECRET_ENV.into())],
            jwks_file: None,
            issuer: Some("fuzz-issuer".into()),
            audience: None,
            leeway: Duration::from_secs(5),
            subject_claim: "sub".into(),
            tier_claim: "tier".into(),
            roles_claim: "roles".into(),
        };
        match JwtVerifier::new(settings, &fixtures) {
            Ok(v) => v,
            Err(e) => panic!("the fuzz verifier does not build: {e:?}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            // A presented API key: trimmed visible ASCII of 8..=512 bytes, or nothing.
            if let Some(key) = keys::clean(rest) {
                assert!((8..=512).contains(&key.len()));
                assert!(key.bytes().all(|b| b.is_ascii_graphic()));
                assert_eq!(keys::clean(key.as_bytes()), Some(key));
            }
        }
        1 => {
            // The stored `sha256:<hex>` form round-trips.
            let text = String::from_utf8_lossy(rest);
            if let Ok(h) = keys::parse_hash(&text) {
                assert_eq!(keys::parse_hash(&keys::format_hash(&h)), Ok(h));
            }
            let h = keys::hash(&text);
            assert_eq!(keys::parse_hash(&keys::format_hash(&h)), Ok(h));
        }
        2 => {
            // Any token text. Twice: the second answer may come from the verifier's cache and
            // must be the same.
            let token = String::from_utf8_lossy(rest);
            let first = verifier().verify(&token);
            let second = verifier().verify(&token);
            assert_eq!(first.is_ok(), second.is_ok(), "{first:?} then {second:?}");
        }
        _ => {
            // Arbitrary claims, correctly signed: only the claim checks stand in the way.
            let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
                return;
            };
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some("hs".into());
            let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
            let Ok(token) = jsonwebtoken::encode(&header, &claims, &key) else {
                return;
            };
            let first = verifier().verify(&token);
            let second = verifier().verify(&token);
            assert_eq!(first.is_ok(), second.is_ok(), "{first:?} then {second:?}");
            if let Ok(v) = first {
                assert!(valid_id(&v.subject));
                assert!(v.roles.iter().all(|r| valid_id(r)));
            }
        }
    }
});
