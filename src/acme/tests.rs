use std::time::Duration;

use super::task::{backoff, renew_at};

#[test]
fn renewal_starts_with_a_third_of_the_lifetime_left() {
    // 90 days from t=0: renew after 60 days.
    assert_eq!(renew_at(0, 90 * 86_400), 60 * 86_400);
    // A 30-second certificate: after 20 s.
    assert_eq!(renew_at(1_000, 1_030), 1_020);
    // Nonsense validity (not_after before not_before): due at not_after.
    assert_eq!(renew_at(100, 50), 50);
}

#[test]
fn backoff_doubles_from_the_minimum_to_the_maximum() {
    let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
    assert_eq!(backoff(1, min, max), Duration::from_secs(60));
    assert_eq!(backoff(2, min, max), Duration::from_secs(120));
    assert_eq!(backoff(3, min, max), Duration::from_secs(240));
    assert_eq!(backoff(7, min, max), Duration::from_secs(3600));
    assert_eq!(backoff(u32::MAX, min, max), Duration::from_secs(3600));
}

#[test]
fn the_alpn_challenge_certificate_carries_the_digest_in_a_critical_extension() {
    let digest = [7u8; 32];
    let (_, pem, _) = super::alpn_challenge("a.example", &digest).expect("challenge cert");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes());
    use rustls::pki_types::pem::PemObject;
    let der = der.expect("pem");
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
        .expect("acmeIdentifier extension");
    assert!(ext.critical);
    // DER OCTET STRING of 32 bytes: 04 20 + digest.
    assert_eq!(&ext.value[..2], &[0x04, 0x20]);
    assert_eq!(&ext.value[2..], &digest);
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, vec!["DNSName(a.example)".to_string()]);
}

#[test]
fn a_challenge_stored_for_the_fleet_reads_back() {
    let (_, cert_pem, key_pem) = super::alpn_challenge("a.example", &[1u8; 32]).expect("cert");
    let stored = format!("{cert_pem}\n{key_pem}");
    let (c, k) = super::storage::split_pem(&stored).expect("split");
    assert!(super::certified_from_pem(c, k).is_some());
}

fn settings(min: u64, max: u64) -> super::Settings {
    super::Settings {
        store: super::StoreKind::Disk("/nonexistent".into()),
        check_interval: Duration::from_secs(3600),
        retry_min: Duration::from_secs(min),
        retry_max: Duration::from_secs(max),
        lock_lease: Duration::from_secs(120),
        order_timeout: Duration::from_secs(300),
        certs: Vec::new(),
    }
}

#[test]
fn a_rate_limited_answer_waits_at_least_an_hour_capped_by_retry_max() {
    use super::task::{acme_failure, wait_after, Failure};
    let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
        "type": "urn:ietf:params:acme:error:rateLimited",
        "detail": "too many certificates already issued",
        "status": 429,
    }))
    .expect("problem");
    let f = acme_failure("new order", instant_acme::Error::Api(problem));
    assert!(matches!(f, Failure::RateLimited(_)));
    assert_eq!(
        wait_after(&f, 1, &settings(60, 86_400)),
        Duration::from_secs(3600)
    );
    assert_eq!(
        wait_after(&f, 1, &settings(60, 600)),
        Duration::from_secs(600)
    );
    // Any other answer: the plain backoff.
    let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
        "type": "urn:ietf:params:acme:error:unauthorized",
        "detail": "no",
    }))
    .expect("problem");
    let f = acme_failure("challenge", instant_acme::Error::Api(problem));
    assert!(matches!(f, Failure::Other(_)));
    assert_eq!(
        wait_after(&f, 2, &settings(60, 86_400)),
        Duration::from_secs(120)
    );
}
