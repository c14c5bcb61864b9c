//! TLS termination against real clients: certificates made here by a test CA (rcgen), SNI
//! selection, ALPN, versions, hot reload under load, refusals of broken certificates, the HTTPS
//! redirect and HSTS, the admin view and metrics, and HTTPS / HTTP/2 upstreams (a second
//! gateway's TLS listener as the backend).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// A test CA and the pairs it signs, written as PEM files under `dir`.
pub(crate) struct Pki {
    pub(crate) dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// One leaf: its files and its DER (to tell which certificate a client got).
pub(crate) struct Leaf {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tollgate Test CA");
        let ca = params.clone().self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(params, ca_key);
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca");
        Self { dir, ca, issuer }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub(crate) fn ca_der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.ca.der().clone()
    }

    fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).expect("root")
    }

    /// A leaf for `names` (DNS names or IPs), RSA when `rsa`, valid from `days.0` to `days.1`
    /// days from now.
    fn leaf_with(&self, stem: &str, names: &[&str], rsa: bool, days: (i64, i64)) -> Leaf {
        let key = if rsa {
            // ring (rcgen's backend here) signs with RSA but does not generate RSA keys.
            let out = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .output()
                .expect("openssl genpkey (package openssl)");
            assert!(out.status.success(), "openssl genpkey failed");
            let pem = String::from_utf8(out.stdout).expect("pem");
            rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).expect("rsa key")
        } else {
            rcgen::KeyPair::generate().expect("key")
        };
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let now = time_now();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        Leaf {
            cert: c,
            key: k,
            der: cert.der().to_vec(),
        }
    }

    pub(crate) fn leaf(&self, stem: &str, names: &[&str]) -> Leaf {
        self.leaf_with(stem, names, false, (-1, 30))
    }

    /// A client certificate with subject `CN=<cn>, O=Tollgate Tests` and the given SANs
    /// (`email:` entries are e-mail addresses, others DNS names); returned as reqwest's
    /// identity with its DER.
    fn client(&self, cn: &str, sans: &[&str]) -> (reqwest::Identity, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Tollgate Tests");
        for s in sans {
            params
                .subject_alt_names
                .push(match s.strip_prefix("email:") {
                    Some(e) => rcgen::SanType::Rfc822Name(e.try_into().expect("email")),
                    None => rcgen::SanType::DnsName((*s).try_into().expect("dns")),
                });
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        (
            reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"),
            cert.der().to_vec(),
        )
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A client that trusts `pki` and sends `hosts` to the gateway's TLS port.
fn client(pki: &Pki, gw: &Gateway, hosts: &[&str], h1_only: bool) -> reqwest::Client {
    let addr: SocketAddr = format!("127.0.0.1:{}", gw.tls_port).parse().expect("addr");
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(pki.root())
        .tls_info(true)
        .no_proxy()
        .timeout(Duration::from_secs(10));
    for h in hosts {
        b = b.resolve(h, addr);
    }
    if h1_only {
        b = b.http1_only();
    }
    b.build().expect("client")
}

/// The leaf certificate the server presented.
fn served(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .map(<[u8]>::to_vec)
        .expect("tls info")
}

fn tls_section(certs: &[(&str, &Leaf, &[&str])], default: Option<&str>) -> String {
    let mut s = String::from("tls:\n  certificates:\n");
    for (name, leaf, hosts) in certs {
        s.push_str(&format!(
            "    - {{ name: {name}, cert_file: \"{}\", key_file: \"{}\", hosts: {hosts:?} }}\n",
            leaf.cert.display(),
            leaf.key.display()
        ));
    }
    if let Some(d) = default {
        s.push_str(&format!("  default_certificate: {d}\n"));
    }
    s
}

const TLS_LISTENER: &str = "  listen_tls:\n    - { addr: \"127.0.0.1:{tls}\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_exact_then_wildcard_then_default_and_alpn_offers_h2_and_http1() {
    let pki = Pki::new();
    let exact = pki.leaf("exact", &["api.example.test"]);
    let wild = pki.leaf_with("wild", &["*.example.test"], true, (-1, 30));
    let fallback = pki.leaf("fallback", &["default.test", "127.0.0.1"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(
            &[
                ("exact", &exact, &["api.example.test"]),
                ("wild", &wild, &["www.example.test"]),
                ("fallback", &fallback, &[]),
            ],
            Some("fallback"),
        ),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    let hosts = ["api.example.test", "www.example.test", "default.test"];
    let c = client(&pki, &gw, &hosts, false);

    let r = c
        .get(gw.tls_url("api.example.test", "/a"))
        .send()
        .await
        .expect("exact");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2 by default");
    assert_eq!(served(&r), exact.der);
    let r = c
        .get(gw.tls_url("www.example.test", "/a"))
        .send()
        .await
        .expect("wildcard");
    assert_eq!(served(&r), wild.der, "the RSA wildcard");
    // No SNI (an IP address): the default certificate.
    let ip = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(pki.root())
        .tls_info(true)
        .no_proxy()
        .build()
        .expect("client");
    let r = ip
        .get(format!("https://127.0.0.1:{}/a", gw.tls_port))
        .send()
        .await
        .expect("no sni");
    assert_eq!(served(&r), fallback.der);
    assert_eq!(r.text().await.expect("body"), "up");

    // HTTP/1.1 on the same port; the backend learns the request came over TLS.
    let h1 = client(&pki, &gw, &hosts, true);
    let r = h1
        .get(gw.tls_url("api.example.test", "/b"))
        .send()
        .await
        .expect("h1");
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let seen = up.last_seen();
    assert_eq!(
        seen.headers.get("x-forwarded-proto").map(String::as_str),
        Some("https")
    );
    // Plain HTTP still answers on the plain port, as http.
    let r = http().get(gw.url("/c")).send().await.expect("plain");
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-forwarded-proto")
            .map(String::as_str),
        Some("http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_an_unknown_name_is_refused_and_counted() {
    let pki = Pki::new();
    let only = pki.leaf("only", &["only.test"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("only", &only, &[])], None),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    let c = client(&pki, &gw, &["only.test", "other.test"], false);
    assert_eq!(
        c.get(gw.tls_url("only.test", "/"))
            .send()
            .await
            .expect("known")
            .status(),
        200
    );
    assert!(c.get(gw.tls_url("other.test", "/")).send().await.is_err());
    eventually(Duration::from_secs(5), "the refusal counted", || async {
        (gw.metric("tollgate_tls_handshake_failures_total{reason=\"unknown_name\"}")
            .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
    assert!(
        gw.metric("tollgate_tls_handshakes_total{version=\"1.3\"}")
            .await
            >= Some(1.0)
    );
}

/// `openssl s_client`: what a TLS 1.1 client and a TLS 1.2 client get from a listener.
fn s_client(port: u16, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .args(["-servername", "v.test"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client (package openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = text.contains("Cipher is ") && !text.contains("Cipher is (NONE)");
    (ok, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_are_refused_and_the_minimum_is_configurable() {
    let pki = Pki::new();
    let leaf = pki.leaf("v", &["v.test"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("v", &leaf, &[])], None),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    let (ok, text) = s_client(gw.tls_port, &["-tls1_1"]);
    assert!(!ok, "TLS 1.1 accepted:\n{text}");
    let (ok, text) = s_client(gw.tls_port, &["-tls1_2"]);
    assert!(ok, "TLS 1.2 refused:\n{text}");
    let (ok, text) = s_client(gw.tls_port, &["-tls1_3"]);
    assert!(ok && text.contains("TLSv1.3"), "TLS 1.3:\n{text}");
    // Only AEAD suites with forward secrecy: a TLS 1.2 client offering CBC or static-RSA
    // suites only finds no common cipher.
    for weak in ["AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "AES256-GCM-SHA384"] {
        let (ok, text) = s_client(gw.tls_port, &["-tls1_2", "-cipher", weak]);
        assert!(!ok, "{weak} accepted:\n{text}");
    }
    let (ok, text) = s_client(
        gw.tls_port,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    );
    assert!(ok, "ECDHE-ECDSA-AES128-GCM-SHA256 refused:\n{text}");

    // min_version 1.3: a TLS 1.2 client is refused after a reload.
    let config = std::fs::read_to_string(&gw.config_path).expect("read");
    gw.write_raw(&config.replace(
        "listen_tls:\n    - { addr:",
        "listen_tls:\n    - { min_version: \"1.3\", addr:",
    ));
    let outcome = gw.sighup_and_wait().await["last_reload"].clone();
    assert_eq!(outcome["ok"], true, "{outcome}");
    let (ok, text) = s_client(gw.tls_port, &["-tls1_2"]);
    assert!(!ok, "TLS 1.2 accepted with min_version 1.3:\n{text}");
    let (ok, _) = s_client(gw.tls_port, &["-tls1_3"]);
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_by_sighup_under_load_drops_nothing_and_a_bad_one_is_refused() {
    let pki = Pki::new();
    let first = pki.leaf("first", &["swap.test"]);
    let up = MockUpstream::start("up").await;
    let body = |leaf: &Leaf| {
        format!(
            "{}{}",
            tls_section(&[("site", leaf, &["swap.test"])], None),
            one_route(&[&up])
        )
    };
    let gw = Gateway::start_with(&body(&first), TLS_LISTENER).await;
    let url = gw.tls_url("swap.test", "/x");

    // Load: new connections (full handshakes) and one kept-alive connection, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let mut tasks = Vec::new();
    for fresh in [true, true, false] {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(pki.root())
            .resolve(
                "swap.test",
                format!("127.0.0.1:{}", gw.tls_port).parse().expect("addr"),
            )
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if fresh {
            b = b.pool_max_idle_per_host(0);
        }
        let c = b.build().expect("client");
        let (stop, ok, bad, url) = (stop.clone(), ok.clone(), bad.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => bad
                        .lock()
                        .expect("lock")
                        .push(format!("status {}", r.status())),
                    Err(e) => bad.lock().expect("lock").push(format!("{e:?}")),
                }
            }
        }));
    }
    let progress = |n: usize| {
        let ok = ok.clone();
        async move {
            let target = ok.load(Ordering::Relaxed) + n;
            eventually(Duration::from_secs(20), "load progress", || async {
                (ok.load(Ordering::Relaxed) >= target).then_some(())
            })
            .await;
        }
    };
    progress(20).await;
    let second = pki.leaf("second", &["swap.test", "also.test"]);
    gw.write(&body(&second));
    let outcome = gw.sighup_and_wait().await["last_reload"].clone();
    assert_eq!(outcome["ok"], true, "{outcome}");
    let c = client(&pki, &gw, &["swap.test"], false);
    let r = c.get(&url).send().await.expect("after swap");
    assert_eq!(
        served(&r),
        second.der,
        "new handshakes get the new certificate"
    );
    progress(20).await;

    // Broken files: each reload is refused at the entry, and the second certificate serves on.
    let expired = pki.leaf_with("expired", &["swap.test"], false, (-30, -1));
    let other = pki.leaf("other", &["swap.test"]);
    let mismatched = Leaf {
        cert: second.cert.clone(),
        key: other.key.clone(),
        der: Vec::new(),
    };
    let uncovered = pki.leaf("uncovered", &["elsewhere.test"]);
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let broken = Leaf {
        cert: garbage,
        key: second.key.clone(),
        der: Vec::new(),
    };
    for (leaf, field, words) in [
        (&expired, "cert_file", "expired"),
        (&mismatched, "key_file", "does not match"),
        (&uncovered, "hosts[0]", "not covered"),
        (&broken, "cert_file", "X.509"),
    ] {
        gw.write(&body(leaf));
        let outcome = gw.sighup_and_wait().await["last_reload"].clone();
        assert_eq!(outcome["ok"], false, "{outcome}");
        let error = outcome["errors"][0].as_str().expect("an error").to_string();
        let prefix = format!("{}:", gw.config_path.display());
        assert!(error.starts_with(&prefix), "{error}");
        assert!(
            error.contains(&format!("tls.certificates[0].{field}: ")) && error.contains(words),
            "{error}"
        );
        let r = c.get(&url).send().await.expect("still served");
        assert_eq!(served(&r), second.der);
    }
    progress(10).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let bad = bad.lock().expect("lock").clone();
    assert!(
        bad.is_empty(),
        "{} failed requests: {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_are_redirected_and_hsts_is_sent_over_tls_only() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["shop.test"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}upstreams:\n  u:\n    backends: [{{ addr: \"{}\" }}]\nroutes:\n  - {{ name: secure, match: {{ path_prefix: /secure }}, upstream: u, redirect_https: true, hsts: \"max-age=63072000; includeSubDomains\" }}\n  - {{ name: open, upstream: u, hsts: \"max-age=60\" }}\n",
        tls_section(&[("site", &leaf, &[])], None),
        up.addr
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client");
    let hits = up.hits();
    let r = plain
        .get(gw.url("/secure/cart?id=7&x=%20"))
        .header("host", "Shop.Test:8080")
        .send()
        .await
        .expect("plain");
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://shop.test:{}/secure/cart?id=7&x=%20", gw.tls_port).as_str()
    );
    assert!(r.headers().get("strict-transport-security").is_none());
    assert_eq!(up.hits(), hits, "a redirect never reaches the backend");
    // Over plain HTTP an hsts route sends no HSTS (RFC 6797 §7.2).
    let r = plain
        .get(gw.url("/other"))
        .send()
        .await
        .expect("plain open");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("strict-transport-security").is_none());

    let c = client(&pki, &gw, &["shop.test"], false);
    let r = c
        .get(gw.tls_url("shop.test", "/secure/cart"))
        .send()
        .await
        .expect("tls");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_certificates_without_keys_and_metrics_show_their_expiry() {
    let pki = Pki::new();
    let leaf = pki.leaf_with("soon", &["soon.test"], false, (-1, 5));
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("soon", &leaf, &[])], None),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    let r = http()
        .get(gw.admin("/admin/certificates"))
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(!text.contains("PRIVATE"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let c = &v["certificates"][0];
    assert_eq!(c["name"], "soon");
    assert_eq!(c["names"][0], "soon.test");
    assert!(
        c["issuer"]
            .as_str()
            .expect("issuer")
            .contains("Tollgate Test CA"),
        "{c}"
    );
    assert_eq!(c["cert_file"], leaf.cert.display().to_string());
    let not_after = c["not_after"].as_i64().expect("not_after");
    let left = c["expires_in_seconds"].as_i64().expect("left");
    assert!((4 * 86_400..=5 * 86_400).contains(&left), "{c}");
    assert_eq!(v["listeners"][0]["min_version"], "1.2");
    assert_eq!(
        gw.metric("tollgate_tls_certificate_expiry_seconds{name=\"soon\"}")
            .await,
        Some(not_after as f64)
    );
    // Five days left: the start logged a warning naming it.
    let log = gw.log();
    assert!(
        log.contains("certificate \"soon\"") && log.contains("expires in "),
        "{log}"
    );
}

/// A gateway whose TLS listener is the HTTPS backend of the gateway under test.
async fn https_backend(up: &MockUpstream, leaf: &Leaf) -> Gateway {
    let body = format!(
        "{}{}",
        tls_section(&[("backend", leaf, &[])], Some("backend")),
        one_route(&[up])
    );
    Gateway::start_with(&body, TLS_LISTENER).await
}

fn front_body(backend_port: u16, tls: &str, extra: &str) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:{backend_port}\" }}]\n    retries: {{ attempts: 1 }}\n    tls: {tls}\n{extra}routes:\n  - {{ name: all, upstream: u }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_against_its_ca_and_refused_on_a_wrong_name() {
    let pki = Pki::new();
    let up = MockUpstream::start("deep").await;
    let leaf = pki.leaf("backend", &["backend.internal"]);
    let backend = https_backend(&up, &leaf).await;
    let ca = pki.ca_file();
    let ca = ca.display();

    let good = Gateway::start(&front_body(
        backend.tls_port,
        &format!("{{ sni: backend.internal, ca_file: \"{ca}\" }}"),
        "",
    ))
    .await;
    let r = http().get(good.url("/v")).send().await.expect("verified");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "deep");
    assert_eq!(
        up.last_seen()
            .headers
            .get("x-forwarded-proto")
            .map(String::as_str),
        Some("https"),
        "the backend gateway got the request over TLS"
    );

    // The backend serves its default certificate for any name: a wrong name fails
    // verification, a 502 with the JSON error, never a silent downgrade.
    let wrong = Gateway::start(&front_body(
        backend.tls_port,
        &format!("{{ sni: wrong.internal, ca_file: \"{ca}\" }}"),
        "",
    ))
    .await;
    let hits = up.hits();
    let r = http().get(wrong.url("/v")).send().await.expect("answer");
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"], "bad_gateway");
    // Without the CA (the system's trust store): not trusted either.
    let untrusted = Gateway::start(&front_body(
        backend.tls_port,
        "{ sni: backend.internal }",
        "",
    ))
    .await;
    assert_eq!(
        http()
            .get(untrusted.url("/v"))
            .send()
            .await
            .expect("answer")
            .status(),
        502
    );
    assert_eq!(up.hits(), hits, "nothing reached the backend");
    // verify: false (testing only) connects anyway.
    let lax = Gateway::start(&front_body(backend.tls_port, "{ verify: false }", "")).await;
    assert_eq!(
        http()
            .get(lax.url("/v"))
            .send()
            .await
            .expect("answer")
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstreams_over_tls_by_alpn_and_in_plain_text_by_prior_knowledge() {
    let pki = Pki::new();
    let up = MockUpstream::start("h2").await;
    let leaf = pki.leaf("backend", &["backend.internal"]);
    let backend = https_backend(&up, &leaf).await;
    let ca = pki.ca_file();
    let over_tls = Gateway::start(&front_body(
        backend.tls_port,
        &format!("{{ sni: backend.internal, ca_file: \"{}\" }}", ca.display()),
        "    protocol: http2\n    health_check: { path: /health, interval: 1s }\n",
    ))
    .await;
    for _ in 0..5 {
        let r = http()
            .get(over_tls.url("/v"))
            .send()
            .await
            .expect("h2 over tls");
        assert_eq!(r.status(), 200);
    }
    assert!(up.health_hits() > 0, "health checks go over TLS too");
    // h2c: the mock upstream speaks HTTP/2 with prior knowledge.
    let h2c = Gateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{{ addr: \"{}\" }}]\n    protocol: http2\nroutes:\n  - {{ name: all, upstream: u }}\n",
        up.addr
    ))
    .await;
    let r = http().get(h2c.url("/p")).send().await.expect("h2c");
    assert_eq!(r.status(), 200);
    assert_eq!(up.last_seen().version, "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_config_with_problems_is_refused_at_start_with_every_location() {
    let pki = Pki::new();
    let leaf = pki.leaf("a", &["a.test"]);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "server:\n  listen: [\"127.0.0.1:1\"]\n  listen_tls:\n    - {{ addr: \"127.0.0.1:1\", min_version: \"1.1\" }}\ntls:\n  certificates:\n    - {{ name: a, cert_file: \"{}\", key_file: \"{}\", hosts: [b.test] }}\n    - {{ name: a, cert_file: missing.pem, key_file: \"{}\" }}\n  default_certificate: nope\nupstreams:\n  u:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\n    tls: {{ ca_file: missing-ca.pem }}\nroutes:\n  - {{ name: r, upstream: u, hsts: \"bogus\" }}\n",
            leaf.cert.display(),
            leaf.key.display(),
            leaf.key.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["-t", "-c"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for (field, words) in [
        ("server.listen_tls[0].addr", "already a listen address"),
        ("server.listen_tls[0].min_version", "\"1.2\" or \"1.3\""),
        ("tls.certificates[0].hosts[0]", "not covered"),
        ("tls.certificates[1].name", "duplicate"),
        (
            "tls.certificates[1].cert_file",
            "cannot read certificate file",
        ),
        ("tls.default_certificate", "unknown certificate"),
        ("upstreams.u.tls.ca_file", "missing-ca.pem"),
        ("routes[0].hsts", "max-age"),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {field}: ")))
            .unwrap_or_else(|| panic!("no error for {field}:\n{text}"));
        assert!(line.starts_with(&format!("{}:", path.display())), "{line}");
        assert!(line.contains(words), "{line}");
    }
}

fn mtls_client(
    pki: &Pki,
    gw: &Gateway,
    id: Option<reqwest::Identity>,
    h1_only: bool,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(pki.root())
        .resolve(
            "api.test",
            format!("127.0.0.1:{}", gw.tls_port).parse().expect("addr"),
        )
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if let Some(id) = id {
        b = b.identity(id);
    }
    if h1_only {
        b = b.http1_only();
    }
    b.build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_map_to_consumers_with_their_tier_and_roles() {
    let pki = Pki::new();
    let leaf = pki.leaf("api", &["api.test"]);
    let (by_hash, hash_der) = pki.client("hash-client", &[]);
    let (by_subject, _) = pki.client("subject-client", &[]);
    let (by_san, _) = pki.client("san-client", &["email:ops@example.test"]);
    let (unknown, _) = pki.client("nobody", &[]);
    // A certificate from another CA, with a subject a consumer lists.
    let other = Pki::new();
    let (foreign, _) = other.client("subject-client", &[]);
    let fingerprint: String = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&hash_der))
    };
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}tiers:\n  pro: {{ limit: 7, window: 1m }}\nconsumers:\n  - {{ id: hashed, tier: pro, roles: [ops], client_certs: [{{ sha256: \"{fingerprint}\" }}] }}\n  - {{ id: named, tier: enterprise, client_certs: [{{ subject: \"CN=subject-client,O=Tollgate Tests\" }}] }}\n  - {{ id: mailed, tier: free, client_certs: [{{ san: ops@example.test }}] }}\nupstreams:\n  u:\n    backends: [{{ addr: \"{}\" }}]\nroutes:\n  - {{ name: ops, match: {{ path_prefix: /ops }}, upstream: u, auth: required, roles: [ops] }}\n  - {{ name: api, upstream: u, auth: required }}\n",
        tls_section(&[("api", &leaf, &[])], None),
        up.addr
    );
    let extra = format!(
        "  listen_tls:\n    - {{ addr: \"127.0.0.1:{{tls}}\", client_auth: {{ ca_file: \"{}\" }} }}\n",
        pki.ca_file().display()
    );
    let gw = Gateway::start_with(&body, &extra).await;
    let url = gw.tls_url("api.test", "/x");
    for (id, consumer, tier, h1_only) in [
        (by_hash.clone(), "hashed", "pro", false),
        (by_subject.clone(), "named", "enterprise", true),
        (by_san, "mailed", "free", false),
    ] {
        let r = mtls_client(&pki, &gw, Some(id), h1_only)
            .get(&url)
            .send()
            .await
            .expect("mtls");
        assert_eq!(r.status(), 200, "{consumer}");
        let seen = up.last_seen();
        assert_eq!(seen.headers["x-consumer-id"], consumer);
        assert_eq!(seen.headers["x-consumer-tier"], tier);
        assert_eq!(seen.headers["x-auth-method"], "mtls");
    }
    // The consumer's tier limits it, and its roles open the ops route.
    let hashed = mtls_client(&pki, &gw, Some(by_hash), false);
    let r = hashed
        .get(gw.tls_url("api.test", "/ops/x"))
        .send()
        .await
        .expect("ops");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "7");
    let r = mtls_client(&pki, &gw, Some(by_subject), false)
        .get(gw.tls_url("api.test", "/ops/x"))
        .send()
        .await
        .expect("no role");
    assert_eq!(r.status(), 403);
    let mut last = 0;
    for _ in 0..8 {
        last = hashed
            .get(&url)
            .send()
            .await
            .expect("limited")
            .status()
            .as_u16();
    }
    assert_eq!(last, 429, "the pro tier's 7 a minute");
    // No certificate, or one no consumer lists: no credential (401 on a required route).
    let r = mtls_client(&pki, &gw, None, false)
        .get(&url)
        .send()
        .await
        .expect("no cert");
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"], "missing_credentials");
    let r = mtls_client(&pki, &gw, Some(unknown), false)
        .get(&url)
        .send()
        .await
        .expect("unknown");
    assert_eq!(r.status(), 401);
    // A certificate from another CA is refused at the handshake, whatever its subject.
    assert!(mtls_client(&pki, &gw, Some(foreign), false)
        .get(&url)
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_is_checked_at_the_handshake() {
    let pki = Pki::new();
    let leaf = pki.leaf("api", &["api.test"]);
    let (id, _) = pki.client("anyone", &[]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("api", &leaf, &[])], None),
        one_route(&[&up])
    );
    let extra = format!(
        "  listen_tls:\n    - {{ addr: \"127.0.0.1:{{tls}}\", client_auth: {{ ca_file: \"{}\", mode: required }} }}\n",
        pki.ca_file().display()
    );
    let gw = Gateway::start_with(&body, &extra).await;
    let url = gw.tls_url("api.test", "/x");
    assert!(mtls_client(&pki, &gw, None, false)
        .get(&url)
        .send()
        .await
        .is_err());
    // A certificate the CA signed is enough on a route without authentication.
    let r = mtls_client(&pki, &gw, Some(id), false)
        .get(&url)
        .send()
        .await
        .expect("cert");
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(5), "the refusal counted", || async {
        (gw.metric("tollgate_tls_handshake_failures_total{reason=\"no_client_certificate\"}")
            .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_to_an_upstream_that_requires_one() {
    let pki = Pki::new();
    let up = MockUpstream::start("guarded").await;
    let leaf = pki.leaf("backend", &["backend.internal"]);
    // The backend: a gateway whose TLS listener requires a client certificate from the CA.
    let body = format!(
        "{}{}",
        tls_section(&[("backend", &leaf, &[])], Some("backend")),
        one_route(&[&up])
    );
    let extra = format!(
        "  listen_tls:\n    - {{ addr: \"127.0.0.1:{{tls}}\", client_auth: {{ ca_file: \"{}\", mode: required }} }}\n",
        pki.ca_file().display()
    );
    let backend = Gateway::start_with(&body, &extra).await;
    let client = pki.leaf("gateway-client", &["gateway.internal"]);
    let ca = pki.ca_file();
    let with_cert = Gateway::start(&front_body(
        backend.tls_port,
        &format!(
            "{{ sni: backend.internal, ca_file: \"{}\", client_cert: \"{}\", client_key: \"{}\" }}",
            ca.display(),
            client.cert.display(),
            client.key.display()
        ),
        "",
    ))
    .await;
    let r = http()
        .get(with_cert.url("/v"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "guarded");
    let without = Gateway::start(&front_body(
        backend.tls_port,
        &format!("{{ sni: backend.internal, ca_file: \"{}\" }}", ca.display()),
        "",
    ))
    .await;
    assert_eq!(
        http()
            .get(without.url("/v"))
            .send()
            .await
            .expect("answer")
            .status(),
        502
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_garbled_handshake_is_cut_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["site.test"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("site", &leaf, &[])], Some("site")),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, &format!("  header_timeout: 1s\n{TLS_LISTENER}")).await;
    let addr = format!("127.0.0.1:{}", gw.tls_port);
    // Nothing sent: closed once the head deadline (which covers the handshake) passes.
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a silent client");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Plain HTTP on the TLS port: refused without an HTTP answer, the connection closed.
    let mut plain = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(!out.starts_with(b"HTTP/1.1 200"), "{out:?}");
    eventually(Duration::from_secs(5), "both failures counted", || async {
        let timeout = gw
            .metric("tollgate_tls_handshake_failures_total{reason=\"timeout\"}")
            .await;
        let malformed = gw
            .metric("tollgate_tls_handshake_failures_total{reason=\"malformed\"}")
            .await;
        (timeout >= Some(1.0) && malformed >= Some(1.0)).then_some(())
    })
    .await;
    // The listener still serves.
    let c = client(&pki, &gw, &["site.test"], false);
    assert_eq!(
        c.get(gw.tls_url("site.test", "/"))
            .send()
            .await
            .expect("ok")
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_wide_redirect_sends_every_plain_request_to_https() {
    let pki = Pki::new();
    let leaf = pki.leaf("site", &["shop.test"]);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        tls_section(&[("site", &leaf, &[])], None),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, &format!("  redirect_https: true\n{TLS_LISTENER}")).await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client");
    for path in ["/", "/any/where?x=1"] {
        let r = plain
            .get(gw.url(path))
            .header("host", "shop.test")
            .send()
            .await
            .expect("plain");
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers()["location"],
            format!("https://shop.test:{}{path}", gw.tls_port).as_str()
        );
    }
    assert_eq!(up.hits(), 0);
    let c = client(&pki, &gw, &["shop.test"], false);
    assert_eq!(
        c.get(gw.tls_url("shop.test", "/x"))
            .send()
            .await
            .expect("tls")
            .status(),
        200
    );
}
