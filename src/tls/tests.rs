use std::sync::Arc;

use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[test]
fn a_wildcard_covers_one_label_and_names_compare_without_case() {
    let n = names(&["example.com", "*.api.example.com"]);
    assert!(covers(&n, "EXAMPLE.com."));
    assert!(covers(&n, "v1.api.example.com"));
    assert!(!covers(&n, "api.example.com"));
    assert!(!covers(&n, "a.v1.api.example.com"));
    assert!(!covers(&n, "www.example.com"));
    assert!(covers(&n, "*.api.example.com"));
    assert!(!covers(&n, "*.example.com"));
}

#[test]
fn versions_parse_in_the_usual_spellings() {
    assert_eq!(MinVersion::parse("1.2"), Some(MinVersion::Tls12));
    assert_eq!(MinVersion::parse("TLS1.3"), Some(MinVersion::Tls13));
    assert_eq!(MinVersion::parse("1.1"), None);
    assert_eq!(MinVersion::parse(""), None);
    assert_eq!(version_label("TLSv1_3"), "1.3");
    assert_eq!(version_label("TLSv1_2"), "1.2");
}

/// A self-signed pair for `names`, written to `dir`.
fn pair(dir: &std::path::Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let (c, k) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

fn now() -> i64 {
    crate::clock::UnixMs::now().0 as i64 / 1000
}

#[test]
fn a_pair_loads_with_its_names_issuer_and_dates() {
    let dir = tempfile::tempdir().expect("dir");
    let (c, k) = pair(dir.path(), "a", &["a.example.com", "*.b.example.com"]);
    let cert = load_certificate("a", &c, &k, now()).expect("loads");
    assert_eq!(cert.names, names(&["a.example.com", "*.b.example.com"]));
    assert_eq!(cert.key_type, "ECDSA");
    assert!(cert.not_after > now() && cert.not_before <= now());
    assert!(!cert.issuer.is_empty());
}

#[test]
fn a_mismatched_key_an_expired_pair_and_garbage_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().expect("dir");
    let (c1, _) = pair(dir.path(), "one", &["one.example"]);
    let (_, k2) = pair(dir.path(), "two", &["two.example"]);
    let (field, e) = load_certificate("x", &c1, &k2, now()).expect_err("mismatch");
    assert_eq!(field, "key_file");
    assert!(e.contains("does not match") && e.contains("two.key"), "{e}");

    let (c, k) = pair(dir.path(), "ok", &["ok.example"]);
    // rcgen's default validity ends in 4096: a "now" after it makes the pair expired.
    let (field, e) = load_certificate("x", &c, &k, 5_000_000_000_000).expect_err("expired");
    assert_eq!(field, "cert_file");
    assert!(e.contains("expired") && e.contains("ok.pem"), "{e}");
    let (_, e) = load_certificate("x", &c, &k, 0).expect_err("not yet valid");
    assert!(e.contains("not valid before"), "{e}");

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").expect("write");
    let (field, e) = load_certificate("x", &junk, &k, now()).expect_err("no certificate");
    assert_eq!(field, "cert_file");
    assert!(
        e.contains("junk.pem") && e.contains("no certificate"),
        "{e}"
    );
    let (field, e) = load_certificate("x", &c, &junk, now()).expect_err("no key");
    assert_eq!(field, "key_file");
    assert!(e.contains("junk.pem") && e.contains("private key"), "{e}");
    let (_, e) =
        load_certificate("x", &dir.path().join("absent.pem"), &k, now()).expect_err("absent");
    assert!(e.contains("cannot read certificate file"), "{e}");
}

#[test]
fn the_table_prefers_exact_names_then_wildcards_then_the_default() {
    let dir = tempfile::tempdir().expect("dir");
    let load = |stem: &str, n: &[&str]| {
        let (c, k) = pair(dir.path(), stem, n);
        Arc::new(load_certificate(stem, &c, &k, now()).expect("loads"))
    };
    let exact = load("exact", &["api.example.com"]);
    let wild = load("wild", &["*.example.com"]);
    let fallback = load("fallback", &["fallback.example"]);
    let certs = vec![exact.clone(), wild.clone(), fallback.clone()];
    let is = |got: Option<&[Arc<CertifiedKey>]>, want: &Arc<Certificate>| {
        got.is_some_and(|g| Arc::ptr_eq(&g[0], &want.key))
    };
    let table = CertTable::new(&certs, Some(2));
    assert!(is(table.lookup(Some("api.example.com")), &exact));
    assert!(is(table.lookup(Some("API.Example.com.")), &exact));
    assert!(is(table.lookup(Some("www.example.com")), &wild));
    assert!(is(table.lookup(Some("a.www.example.com")), &fallback));
    assert!(is(table.lookup(None), &fallback));
    let strict = CertTable::new(&certs, None);
    assert!(strict.lookup(None).is_none());
    assert!(strict.lookup(Some("other.test")).is_none());
    assert!(server_config(Arc::new(strict), MinVersion::Tls13, true, None, false).is_ok());
}

#[test]
fn handshake_failures_are_labelled_from_pingoras_text() {
    let text = " TLSHandshakeFailure context: TLS accept() failed:  TLSHandshakeFailure context: \
                tls connect error: unexpected error: no server certificate chain resolved";
    assert_eq!(failure_reason_of(text), "unknown_name");
    assert_eq!(
        failure_reason_of("tls connect error: peer is incompatible: Tls13NotOffered"),
        "incompatible"
    );
    assert_eq!(failure_reason_of("tls connect error: early eof"), "closed");
    assert_eq!(failure_reason_of("something new"), "other");
}

#[test]
fn subjects_compare_without_spaces_around_separators() {
    assert_eq!(
        normalize_subject("CN=alice, O=Example"),
        "CN=alice,O=Example"
    );
    assert_eq!(
        normalize_subject(" cn = alice ,O=Example"),
        "CN=alice,O=Example"
    );
}
