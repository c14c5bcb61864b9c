//! ACME against a real ACME server: Pebble (Let's Encrypt's RFC 8555 test server, Debian's
//! `pebble` package), started per test on free ports with `PEBBLE_VA_ALWAYS_VALID=0`, so every
//! challenge is really validated against the gateway: Pebble's HTTP-01 and TLS-ALPN-01 ports
//! point at the gateway's listeners, and `pebble-challtestsrv` answers its DNS queries for the
//! test hosts with 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// One Pebble with its DNS server.
struct Pebble {
    dir: tempfile::TempDir,
    port: u16,
    mgmt: u16,
    dns: u16,
    dns_mgmt: u16,
    /// Validity of the certificates it issues, in seconds.
    validity: u64,
    child: Option<Child>,
    dns_child: Child,
    /// The CA of Pebble's own HTTPS certificate (the gateway's `acme.ca_file`).
    api_ca: String,
    /// External account binding required, with this key id and base64url MAC key.
    eab: Option<(String, String)>,
}

impl Pebble {
    /// Ports, the API's certificate and the DNS server; Pebble itself starts with `start` (it
    /// needs the gateway's ports, and the gateway needs Pebble's directory URL).
    fn new(validity: u64) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Pebble API test CA");
        let ca = ca_params.clone().self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.path().join("api-ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.path().join("api.pem"), cert.pem()).expect("write");
        std::fs::write(dir.path().join("api.key"), key.serialize_pem()).expect("write");
        let [port, mgmt, dns, dns_mgmt] = free_ports();
        let dns_child = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (Debian package pebble)");
        Self {
            api_ca: ca.pem(),
            dir,
            port,
            mgmt,
            dns,
            dns_mgmt,
            validity,
            child: None,
            dns_child,
            eab: None,
        }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("api-ca.pem")
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.api_ca.as_bytes()).expect("ca"),
            )
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client")
    }

    /// Start Pebble, validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    async fn start(&mut self, http_port: u16, tls_port: u16) {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{}", self.mgmt),
                "certificate": self.dir.path().join("api.pem"),
                "privateKey": self.dir.path().join("api.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": self.eab.is_some(),
                "externalAccountMACKeys": self.eab.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<std::collections::HashMap<_, _>>(),
                "retryAfter": { "authz": 1, "order": 1 },
                "certificateValidityPeriod": self.validity,
            }
        });
        let path = self.dir.path().join("pebble.json");
        std::fs::write(&path, config.to_string()).expect("config");
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns))
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("pebble (Debian package pebble)");
        self.child = Some(child);
        let client = self.client();
        let url = self.directory();
        eventually(Duration::from_secs(20), "pebble's directory", || async {
            let r = client.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The root Pebble issues under (PEM).
    async fn root(&self) -> String {
        let client = self.client();
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        eventually(Duration::from_secs(10), "pebble's root", || async {
            client.get(&url).send().await.ok()?.text().await.ok()
        })
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.dns_child.kill();
        let _ = self.dns_child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- pebble log (dns on {}, mgmt {}) ----\n{}",
                self.dns,
                self.dns_mgmt,
                self.log()
            );
        }
    }
}

const TLS_LISTENER: &str = "  listen_tls:\n    - { addr: \"127.0.0.1:{tls}\" }\n";

/// The `tls:` section: one ACME certificate `site` for `hosts`.
fn acme_tls(pebble: &Pebble, hosts: &[&str], challenge: &str, acme_extra: &str) -> String {
    format!(
        "tls:\n  acme: {{ retry_min: 200ms, retry_max: 1s, check_interval: 1s, lock_lease: 3s{acme_extra} }}\n  certificates:\n    - name: site\n      hosts: {hosts:?}\n      acme: {{ directory: \"{}\", email: ops@example.test, challenge: {challenge}, ca_file: \"{}\" }}\n",
        pebble.directory(),
        pebble.ca_file().display()
    )
}

/// A client that trusts `root` and sends `hosts` to the gateway's TLS port.
fn tls_client(root: &str, tls_port: u16, hosts: &[&str]) -> reqwest::Client {
    let addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).expect("root"))
        .tls_info(true)
        .no_proxy()
        .timeout(Duration::from_secs(10));
    for h in hosts {
        b = b.resolve(h, addr);
    }
    b.build().expect("client")
}

/// The leaf the gateway presents for `host`, read without verifying it (None: refused).
async fn presented(tls_port: u16, host: &str) -> Option<Vec<u8>> {
    #[derive(Debug)]
    struct AcceptAll;
    impl rustls::client::danger::ServerCertVerifier for AcceptAll {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAll))
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .ok()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .ok()?
        .ok()?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
}

/// The common name of a certificate's subject (`issuer: false`) or issuer.
fn cn_of(der: &[u8], issuer: bool) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    let dn = if issuer {
        cert.issuer()
    } else {
        cert.subject()
    };
    let name = dn
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    name
}

fn common_name(der: &[u8]) -> String {
    cn_of(der, false)
}

fn issuer_cn(der: &[u8]) -> String {
    cn_of(der, true)
}

fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    cert.raw_serial_as_string()
}

/// The `acme` object of certificate `site` in /admin/certificates.
async fn acme_status(gw: &Gateway) -> Option<serde_json::Value> {
    let v: serde_json::Value = http()
        .get(gw.admin("/admin/certificates"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "site" && c["source"] == "acme")
        .cloned()
}

async fn wait_state(gw: &Gateway, state: &str, within: Duration) -> serde_json::Value {
    eventually(within, &format!("certificate site {state}"), || async {
        let s = acme_status(gw).await?;
        (s["acme"]["state"] == state).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_placeholder_first_then_the_issued_certificate_by_sni() {
    let mut pebble = Pebble::new(3600);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        acme_tls(&pebble, &["a.test", "b.test"], "http-01", ""),
        one_route(&[&up])
    );
    // Plain HTTP is redirected to HTTPS, except the CA's validation requests.
    let gw = Gateway::start_with(&body, &format!("{TLS_LISTENER}  redirect_https: true\n")).await;

    // Before Pebble runs: the placeholder serves, the state says pending (or failed: the CA is
    // not there yet), and the admin view says what serves.
    let placeholder = eventually(Duration::from_secs(10), "the placeholder", || {
        presented(gw.tls_port, "a.test")
    })
    .await;
    assert_eq!(
        common_name(&placeholder),
        "Tollgate placeholder (ACME certificate pending)"
    );
    let s = acme_status(&gw).await.expect("status");
    assert!(
        s["acme"]["state"] == "pending" || s["acme"]["state"] == "failed",
        "{s}"
    );
    assert_eq!(s["acme"]["serving"], "placeholder", "{s}");
    assert!(s["not_after"].is_null(), "{s}");

    // An unknown token: a JSON 404, never the upstream.
    let r = http()
        .get(gw.url("/.well-known/acme-challenge/nope"))
        .header("Host", "a.test")
        .send()
        .await
        .expect("challenge");
    assert_eq!(r.status(), 404);
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["error"], "unknown_acme_challenge", "{j}");
    assert_eq!(up.hits(), 0);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client");
    let r = no_redirects
        .get(gw.url("/other"))
        .send()
        .await
        .expect("plain");
    assert_eq!(r.status(), 308, "the rest of plain HTTP is redirected");

    pebble.start(gw.port, gw.tls_port).await;
    let s = wait_state(&gw, "valid", Duration::from_secs(60)).await;
    assert_eq!(s["acme"]["serving"], "issued", "{s}");
    assert_eq!(s["acme"]["orders"], 1, "{s}");
    assert!(s["acme"]["error"].is_null(), "{s}");
    let not_after = s["not_after"].as_i64().expect("not_after");
    let renew_at = s["acme"]["renew_at"].as_i64().expect("renew_at");
    assert!(renew_at < not_after, "{s}");

    // Both hosts are served the issued certificate, which chains to Pebble's root.
    let root = pebble.root().await;
    let c = tls_client(&root, gw.tls_port, &["a.test", "b.test"]);
    for host in ["a.test", "b.test"] {
        let r = c
            .get(format!("https://{host}:{}/x", gw.tls_port))
            .send()
            .await
            .unwrap_or_else(|e| panic!("https://{host}: {e:?}"));
        assert_eq!(r.status(), 200, "{host}");
    }
    // The validation requests were answered by the gateway: none reached the upstream.
    assert_eq!(up.hits(), 2);
    assert!(
        up.seen()
            .iter()
            .all(|s| !s.uri.starts_with("/.well-known/acme-challenge/")),
        "a challenge went upstream"
    );
    assert!(
        pebble.log().contains("validate w/ HTTP"),
        "{}",
        pebble.log()
    );

    // The disk store: a 0700 directory, 0600 files.
    use std::os::unix::fs::PermissionsExt;
    let store = gw.dir.path().join("acme");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("site.json")), 0o600);
    let accounts: Vec<_> = std::fs::read_dir(store.join("accounts"))
        .expect("accounts")
        .flatten()
        .collect();
    assert_eq!(accounts.len(), 1);
    assert_eq!(mode(&accounts[0].path()), 0o600);
    assert_eq!(
        gw.metric("tollgate_acme_orders_total{name=\"site\",result=\"issued\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric("tollgate_acme_certificate_state{name=\"site\",state=\"valid\"}")
            .await,
        Some(1.0)
    );

    // A reload that keeps the certificate's settings keeps its certificate (no new order).
    let before = presented(gw.tls_port, "a.test").await.expect("cert");
    let reload = gw.sighup_and_wait().await;
    assert_eq!(reload["last_reload"]["ok"], true, "{reload}");
    let after = presented(gw.tls_port, "a.test").await.expect("cert");
    assert_eq!(serial(&after), serial(&before));
    let s = acme_status(&gw).await.expect("status");
    assert_eq!(s["acme"]["orders"], 1, "{s}");
    assert!(gw
        .metric("tollgate_tls_certificate_expiry_seconds{name=\"site\"}")
        .await
        .is_some_and(|v| v as i64 == not_after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_through_the_tls_listener_and_a_restart_serves_the_stored_certificate() {
    let mut pebble = Pebble::new(3600);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        acme_tls(&pebble, &["alpn.test"], "tls-alpn-01", ""),
        one_route(&[&up])
    );
    let mut gw = Gateway::start_with(&body, TLS_LISTENER).await;
    // Pebble's HTTP-01 port is a dead one: only the TLS listener can prove the host.
    pebble.start(1, gw.tls_port).await;
    let s = wait_state(&gw, "valid", Duration::from_secs(60)).await;
    assert_eq!(s["acme"]["challenge"], "tls-alpn-01");
    let root = pebble.root().await;
    let c = tls_client(&root, gw.tls_port, &["alpn.test"]);
    let r = c
        .get(format!("https://alpn.test:{}/", gw.tls_port))
        .send()
        .await
        .expect("https");
    assert_eq!(r.status(), 200);
    let first = presented(gw.tls_port, "alpn.test").await.expect("cert");
    assert!(
        issuer_cn(&first).contains("Pebble"),
        "{}",
        issuer_cn(&first)
    );

    // Restart with Pebble gone: the stored certificate serves from the first handshake.
    pebble.stop();
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    gw.child = gw.spawn(false);
    let again = eventually(
        Duration::from_secs(20),
        "the restarted gateway's TLS",
        || presented(gw.tls_port, "alpn.test"),
    )
    .await;
    assert_eq!(serial(&again), serial(&first));
    let s = wait_state(&gw, "valid", Duration::from_secs(10)).await;
    assert_eq!(s["acme"]["orders"], 0, "no new order: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_at_a_third_of_the_lifetime_swaps_without_a_failed_request() {
    // 12-second certificates: renewal starts 8 s after issuance.
    let mut pebble = Pebble::new(12);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        acme_tls(&pebble, &["renew.test"], "http-01", ""),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    pebble.start(gw.port, gw.tls_port).await;
    let s = wait_state(&gw, "valid", Duration::from_secs(60)).await;
    let first_serial = s["acme"]["serial"].as_str().expect("serial").to_string();
    let root = pebble.root().await;

    // Requests on new connections all along (each handshake picks the certificate in force).
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (failures, done, stop, root) =
            (failures.clone(), done.clone(), stop.clone(), root.clone());
        let port = gw.tls_port;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let c = tls_client(&root, port, &["renew.test"]);
                match c.get(format!("https://renew.test:{port}/")).send().await {
                    Ok(r) if r.status() == 200 => {}
                    other => {
                        eprintln!("failed request during renewal: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let renewed = eventually(Duration::from_secs(40), "a renewed certificate", || async {
        let s = acme_status(&gw).await?;
        let serial = s["acme"]["serial"].as_str()?.to_string();
        (serial != first_serial && s["acme"]["state"] == "valid").then_some(s)
    })
    .await;
    // A few more requests on the new certificate, then stop.
    let after = done.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "requests after the swap",
        || async { (done.load(Ordering::Relaxed) >= after + 5).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during renewal"
    );
    assert!(done.load(Ordering::Relaxed) > 10);
    assert!(renewed["acme"]["orders"].as_u64() >= Some(2), "{renewed}");
    let served = presented(gw.tls_port, "renew.test").await.expect("cert");
    assert_ne!(
        serial(&served),
        first_serial.replace(':', "").to_lowercase()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_down_keeps_the_old_certificate_serving_and_backs_off() {
    let mut pebble = Pebble::new(3600);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "{}{}",
        acme_tls(&pebble, &["down.test"], "http-01", ""),
        one_route(&[&up])
    );
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    pebble.start(gw.port, gw.tls_port).await;
    wait_state(&gw, "valid", Duration::from_secs(60)).await;
    let first = presented(gw.tls_port, "down.test").await.expect("cert");
    pebble.stop();

    // Renew now: the CA is gone, so the order fails, again and again, further apart.
    let r = http()
        .post(gw.admin("/admin/certificates/site/renew"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("renew");
    assert_eq!(r.status(), 202);
    let s = eventually(
        Duration::from_secs(30),
        "three failures in a row",
        || async {
            let s = acme_status(&gw).await?;
            (s["acme"]["consecutive_failures"].as_u64()? >= 3).then_some(s)
        },
    )
    .await;
    assert_eq!(s["acme"]["state"], "failed", "{s}");
    assert!(!s["acme"]["error"].as_str().unwrap_or("").is_empty(), "{s}");
    assert!(s["acme"]["next_attempt"].as_i64().is_some(), "{s}");
    assert!(gw
        .metric("tollgate_acme_consecutive_failures{name=\"site\"}")
        .await
        .is_some_and(|v| v >= 3.0));
    assert!(gw
        .metric("tollgate_acme_orders_total{name=\"site\",result=\"failed\"}")
        .await
        .is_some_and(|v| v >= 3.0));
    assert!(gw
        .metric("tollgate_acme_next_attempt_timestamp_seconds{name=\"site\"}")
        .await
        .is_some_and(|v| v > 0.0));
    // The old certificate still serves.
    let now = presented(gw.tls_port, "down.test").await.expect("cert");
    assert_eq!(serial(&now), serial(&first));
    assert!(gw.log().contains("order failed"), "{}", gw.log());

    // An unknown name: a JSON 404.
    let r = http()
        .post(gw.admin("/admin/certificates/nope/renew"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("renew");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_make_one_order_and_serve_the_same_certificate() {
    two_nodes("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_tls_alpn01_challenges_through_redis() {
    two_nodes("tls-alpn-01").await;
}

async fn two_nodes(challenge: &str) {
    let redis = RedisServer::start().await;
    let mut pebble = Pebble::new(3600);
    let up = MockUpstream::start("up").await;
    let body = format!(
        "redis: {{ url: \"{}\" }}\n{}{}",
        redis.url(),
        acme_tls(&pebble, &["fleet.test", "www.fleet.test"], challenge, ""),
        one_route(&[&up])
    );
    let a = Gateway::start_with(&body, TLS_LISTENER).await;
    let b = Gateway::start_with(&body, TLS_LISTENER).await;
    // Pebble validates against node A only: whichever node orders, A must answer (the
    // challenge of an order B makes reaches A through Redis).
    pebble.start(a.port, a.tls_port).await;
    wait_state(&a, "valid", Duration::from_secs(60)).await;
    wait_state(&b, "valid", Duration::from_secs(60)).await;
    let orders = |s: serde_json::Value| s["acme"]["orders"].as_u64().unwrap_or(0);
    let total =
        orders(acme_status(&a).await.expect("a")) + orders(acme_status(&b).await.expect("b"));
    assert_eq!(total, 1, "one order for the fleet");
    let ca = presented(a.tls_port, "fleet.test").await.expect("a cert");
    let cb = presented(b.tls_port, "fleet.test").await.expect("b cert");
    assert_eq!(ca, cb, "both nodes serve the same certificate");
    assert!(issuer_cn(&ca).contains("Pebble"));
    // Nothing on disk: the fleet's store is Redis.
    assert!(!a.dir.path().join("acme").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_refusing_handshakes_until_issued_and_no_auth_for_the_ca() {
    let mut pebble = Pebble::new(3600);
    let (kid, key) = (
        "kid-1",
        "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
    );
    pebble.eab = Some((kid.into(), key.into()));
    let up = MockUpstream::start("up").await;
    // The route requires an API key and has a tiny anonymous limit: the CA's requests pass
    // neither, and never need to.
    let route = format!(
        "tiers:\n  anonymous: {{ limit: 1, window: 1h }}\nconsumers:\n  - {{ id: c, tier: pro, api_keys: [\"{}\"] }}\n{}",
        tollgate::identity::keys::format_hash(&tollgate::identity::keys::hash("tg_acme_test_key_0123456789")),
        one_route(&[&up]).replace("upstream: u", "upstream: u, auth: required")
    );
    let body = format!(
        "{}{}",
        acme_tls(&pebble, &["eab.test"], "http-01", ", until_issued: refuse").replace(
            "challenge: http-01,",
            &format!("challenge: http-01, eab: {{ kid: {kid}, hmac_key: \"{key}\" }},")
        ),
        route
    );
    assert!(body.contains("auth: required"), "{body}");
    let gw = Gateway::start_with(&body, TLS_LISTENER).await;
    // Nothing issued yet: the handshake is refused, and the log says why.
    assert!(presented(gw.tls_port, "eab.test").await.is_none());
    let s = acme_status(&gw).await.expect("status");
    assert_eq!(s["acme"]["serving"], "none (handshakes refused)", "{s}");
    assert!(gw
        .log()
        .contains("handshakes are refused until one is issued"));
    pebble.start(gw.port, gw.tls_port).await;
    wait_state(&gw, "valid", Duration::from_secs(60)).await;
    let cert = presented(gw.tls_port, "eab.test").await.expect("cert");
    assert!(issuer_cn(&cert).contains("Pebble"));
    assert_eq!(up.hits(), 0);
}

/// A TCP forwarder to `target` the test can switch between forwarding and swallowing (accept,
/// then never answer): a CA that hangs mid-order.
struct Switch {
    port: u16,
    hang: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = hang.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let hang = h.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    if hang {
                        // Hold the connection open, answer nothing.
                        let mut buf = [0u8; 1024];
                        use tokio::io::AsyncReadExt;
                        while matches!(inbound.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Self { port, hang, task }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_holding_the_order_lock_releases_it_by_expiry() {
    let redis = RedisServer::start().await;
    let mut pebble = Pebble::new(3600);
    let switch = Switch::start(pebble.port).await;
    let up = MockUpstream::start("up").await;
    // Both nodes reach the CA through the switch, which swallows connections at first.
    let body = format!(
        "redis: {{ url: \"{}\" }}\n{}{}",
        redis.url(),
        acme_tls(&pebble, &["lease.test"], "http-01", "").replace(
            &format!("127.0.0.1:{}/dir", pebble.port),
            &format!("127.0.0.1:{}/dir", switch.port)
        ),
        one_route(&[&up])
    );
    let mut nodes = vec![
        Gateway::start_with(&body, TLS_LISTENER).await,
        Gateway::start_with(&body, TLS_LISTENER).await,
    ];
    // One node takes the lock (its holder id carries its pid) and hangs on the CA.
    let lock_key = "tollgate:acme:{site}:lock";
    let redis_get = |key: &str| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "GET", key])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let holder = eventually(
        Duration::from_secs(20),
        "a node holding the order lock",
        || async {
            let v = redis_get(lock_key);
            (!v.is_empty()).then_some(v)
        },
    )
    .await;
    let pid = holder.split(':').nth(1).expect("pid in the holder id");
    let dead = nodes
        .iter()
        .position(|g| g.child.id().to_string() == pid)
        .expect("the holder is one of the nodes");
    let mut killed = nodes.remove(dead);
    killed.signal(killed.child.id(), "KILL");
    killed.wait_exit(Duration::from_secs(10)).await;
    let survivor = &nodes[0];
    switch.hang.store(false, Ordering::Relaxed);
    pebble.start(survivor.port, survivor.tls_port).await;
    // The lock outlives its holder until its lease (3 s) runs out; then the survivor orders.
    let s = wait_state(survivor, "valid", Duration::from_secs(60)).await;
    assert_eq!(s["acme"]["orders"], 1, "{s}");
    assert!(
        survivor.log().contains("another node holds the order lock"),
        "{}",
        survivor.log()
    );
    assert!(
        redis_get(lock_key).is_empty(),
        "the survivor released the lock"
    );
    let cert = presented(survivor.tls_port, "lease.test")
        .await
        .expect("cert");
    assert!(issuer_cn(&cert).contains("Pebble"));
}
