//! The TLS parts of the file: `server.listen_tls`, `tls.certificates` (read and checked here,
//! so a broken certificate is an error at its config entry, and a reload with one keeps the
//! old certificates serving), routes' `redirect_https`/`hsts`, and upstreams' `tls`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::HeaderValue;

use crate::acme;
use crate::config::check::{socket_addr, Check};
use crate::config::schema::{self, FileConfig};
use crate::tls::{self, CertTable, Certificate, ListenerSpec, ManagedCert, MinVersion, TlsSpec};
use crate::upstream::UpstreamTls;
use std::time::Duration;

/// `server.listen_tls` addresses (checked against the plain ones by the caller).
pub(super) fn listen_addrs(c: &mut Check, s: &schema::ServerSection) -> Vec<SocketAddr> {
    s.listen_tls
        .iter()
        .enumerate()
        .filter_map(|(i, l)| socket_addr(c, format!("server.listen_tls[{i}].addr"), &l.addr))
        .collect()
}

fn unix_now() -> i64 {
    crate::clock::UnixMs::now().0 as i64 / 1000
}

/// The certificates and one rustls configuration per TLS listener; the ACME settings when
/// some certificate is obtained by ACME.
pub(super) fn compile(
    c: &mut Check,
    file: &FileConfig,
    base_dir: &Path,
) -> (TlsSpec, Option<acme::Settings>) {
    let now = unix_now();
    let mut certificates = Vec::new();
    let mut managed: Vec<Arc<ManagedCert>> = Vec::new();
    let mut acme_certs = Vec::new();
    let mut names = HashSet::new();
    for (i, s) in file.tls.certificates.iter().enumerate() {
        let at = format!("tls.certificates[{i}]");
        if s.name.trim().is_empty() {
            c.err(format!("{at}.name"), "must not be empty");
        } else if !names.insert(s.name.as_str()) {
            c.err(
                format!("{at}.name"),
                format!("duplicate certificate name {:?}", s.name),
            );
        }
        if let Some(a) = &s.acme {
            if s.cert_file.is_some() || s.key_file.is_some() {
                c.err(
                    format!("{at}.acme"),
                    "a certificate comes from files (cert_file, key_file) or from ACME, not both",
                );
                continue;
            }
            if let Some(spec) = acme_cert(c, &at, s, a, file, base_dir) {
                managed.push(spec.slot.clone());
                acme_certs.push(spec);
            }
            continue;
        }
        let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) else {
            let missing = if s.cert_file.is_none() {
                "cert_file"
            } else {
                "key_file"
            };
            c.err(
                format!("{at}.{missing}"),
                "required (or give `acme:` to obtain the certificate from a CA)",
            );
            continue;
        };
        let (cert_file, key_file) = (base_dir.join(cert), base_dir.join(key));
        match tls::load_certificate(&s.name, &cert_file, &key_file, now) {
            Ok(cert) => {
                for (j, host) in s.hosts.iter().enumerate() {
                    if !tls::covers(&cert.names, host) {
                        c.err(
                            format!("{at}.hosts[{j}]"),
                            format!(
                                "{host:?} is not covered by {} (its names: {})",
                                cert_file.display(),
                                cert.names.join(", ")
                            ),
                        );
                    }
                }
                certificates.push(Arc::new(cert));
            }
            Err((field, message)) => c.err(format!("{at}.{field}"), message),
        }
    }
    // A host is either served from files or by ACME: never both (which one would serve?).
    for spec in &acme_certs {
        for host in &spec.hosts {
            if let Some(other) = certificates
                .iter()
                .find(|x| x.names.iter().any(|n| n == host))
            {
                c.err(
                    format!("tls.certificates[{}].hosts", cert_index(file, &spec.name)),
                    format!(
                        "{host:?} is also served by certificate {:?} ({}): give each host one certificate",
                        other.name,
                        other.cert_file.display()
                    ),
                );
            }
        }
    }
    let default_name = file.tls.default_certificate.as_ref();
    let default = default_name.and_then(|d| {
        let found = certificates
            .iter()
            .position(|x: &Arc<Certificate>| x.name == *d);
        if found.is_none() && !file.tls.certificates.iter().any(|s| s.name == *d) {
            c.err(
                "tls.default_certificate",
                format!("unknown certificate {d:?}"),
            );
        }
        found
    });
    let default_managed = default_name.and_then(|d| managed.iter().position(|m| m.name == *d));
    let table =
        Arc::new(CertTable::new(&certificates, default).with_managed(&managed, default_managed));
    let acme_alpn = acme_certs
        .iter()
        .any(|s| s.challenge == acme::Challenge::TlsAlpn01);
    let settings = (!acme_certs.is_empty()).then(|| acme_settings(c, file, base_dir, acme_certs));
    if !file.server.listen_tls.is_empty() && file.tls.certificates.is_empty() {
        c.err(
            "server.listen_tls",
            "a TLS listener needs at least one certificate in tls.certificates",
        );
    }
    let mut listeners = Vec::new();
    for (i, l) in file.server.listen_tls.iter().enumerate() {
        let at = format!("server.listen_tls[{i}]");
        let min_version = MinVersion::parse(&l.min_version).unwrap_or_else(|| {
            c.err(
                format!("{at}.min_version"),
                format!("expected \"1.2\" or \"1.3\", got {:?}", l.min_version),
            );
            MinVersion::Tls12
        });
        let client_auth = l.client_auth.as_ref().and_then(|a| {
            match tls::load_client_roots(&base_dir.join(&a.ca_file)) {
                Ok(roots) => Some(tls::ClientAuth {
                    roots,
                    required: a.mode == schema::ClientAuthMode::Required,
                }),
                Err(e) => {
                    c.err(format!("{at}.client_auth.ca_file"), e);
                    None
                }
            }
        });
        let Ok(addr) = l.addr.parse::<SocketAddr>() else {
            continue; // reported by listen_addrs
        };
        match tls::server_config(
            table.clone(),
            min_version,
            l.http2,
            client_auth.as_ref(),
            acme_alpn,
        ) {
            Ok(config) => listeners.push(ListenerSpec {
                addr,
                min_version,
                http2: l.http2,
                client_auth: client_auth.as_ref().map(|a| a.required),
                config,
            }),
            Err(e) => c.err(at, e),
        }
    }
    (
        TlsSpec {
            certificates,
            managed,
            listeners,
        },
        settings,
    )
}

fn cert_index(file: &FileConfig, name: &str) -> usize {
    file.tls
        .certificates
        .iter()
        .position(|s| s.name == name)
        .unwrap_or(0)
}

/// `tls.acme`, for the ACME certificates `certs`.
fn acme_settings(
    c: &mut Check,
    file: &FileConfig,
    base_dir: &Path,
    certs: Vec<acme::CertSpec>,
) -> acme::Settings {
    let a = &file.tls.acme;
    let store = match (a.store, file.redis.is_some()) {
        (schema::AcmeStoreKind::Redis, false) => {
            c.err("tls.acme.store", "the redis store needs a `redis:` section");
            acme::StoreKind::Redis
        }
        (schema::AcmeStoreKind::Redis, true) | (schema::AcmeStoreKind::Auto, true) => {
            acme::StoreKind::Redis
        }
        _ => {
            if a.storage_dir.trim().is_empty() {
                c.err("tls.acme.storage_dir", "must not be empty");
            }
            acme::StoreKind::Disk(base_dir.join(&a.storage_dir))
        }
    };
    for (field, d, min) in [
        (
            "check_interval",
            a.check_interval,
            Duration::from_millis(100),
        ),
        ("retry_min", a.retry_min, Duration::from_millis(100)),
        ("retry_max", a.retry_max, Duration::from_millis(100)),
        ("lock_lease", a.lock_lease, Duration::from_secs(1)),
        ("order_timeout", a.order_timeout, Duration::from_secs(1)),
    ] {
        if d < min {
            c.err(
                format!("tls.acme.{field}"),
                format!("must be at least {min:?}"),
            );
        }
    }
    if a.retry_max < a.retry_min {
        c.err("tls.acme.retry_max", "must not be less than retry_min");
    }
    acme::Settings {
        store,
        check_interval: a.check_interval,
        retry_min: a.retry_min,
        retry_max: a.retry_max,
        lock_lease: a.lock_lease,
        order_timeout: a.order_timeout,
        certs,
    }
}

/// `tls.certificates[i]` with `acme:`.
fn acme_cert(
    c: &mut Check,
    at: &str,
    s: &schema::CertificateSection,
    a: &schema::AcmeCertSection,
    file: &FileConfig,
    base_dir: &Path,
) -> Option<acme::CertSpec> {
    let before = c.problems.len();
    if s.hosts.is_empty() {
        c.err(
            format!("{at}.hosts"),
            "an ACME certificate needs the hosts to order it for",
        );
    }
    let mut hosts: Vec<String> = Vec::new();
    for (j, h) in s.hosts.iter().enumerate() {
        let host = tls::normalize_name(h);
        if host.starts_with("*.") {
            c.err(
                format!("{at}.hosts[{j}]"),
                "wildcard names need the DNS-01 challenge, which Tollgate does not answer; list each host",
            );
        } else if host.parse::<std::net::IpAddr>().is_ok()
            || host.is_empty()
            || !host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            c.err(
                format!("{at}.hosts[{j}]"),
                format!("{h:?} is not a DNS name"),
            );
        } else if hosts.contains(&host) {
            c.err(format!("{at}.hosts[{j}]"), format!("{h:?} is listed twice"));
        } else {
            hosts.push(host);
        }
    }
    let directory = a
        .directory
        .clone()
        .unwrap_or_else(|| acme::LETS_ENCRYPT.to_string());
    match directory.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
        _ => c.err(
            format!("{at}.acme.directory"),
            format!("expected the https URL of an ACME directory, got {directory:?}"),
        ),
    }
    let contact = match &a.email {
        Some(e) if e.contains('@') && !e.contains(char::is_whitespace) => {
            vec![format!("mailto:{}", e.trim_start_matches("mailto:"))]
        }
        Some(e) => {
            c.err(
                format!("{at}.acme.email"),
                format!("expected an e-mail address, got {e:?}"),
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    let challenge = match a.challenge.as_deref().map(str::trim) {
        None | Some("http-01") => acme::Challenge::Http01,
        Some("tls-alpn-01") => acme::Challenge::TlsAlpn01,
        Some(other) => {
            c.err(
                format!("{at}.acme.challenge"),
                format!("expected http-01 or tls-alpn-01, got {other:?}"),
            );
            acme::Challenge::Http01
        }
    };
    match challenge {
        acme::Challenge::Http01 if file.server.listen.is_empty() => c.err(
            format!("{at}.acme.challenge"),
            "http-01 is answered on a plain listener (server.listen), and there is none",
        ),
        acme::Challenge::TlsAlpn01 if file.server.listen_tls.is_empty() => c.err(
            format!("{at}.acme.challenge"),
            "tls-alpn-01 is answered on a TLS listener (server.listen_tls), and there is none",
        ),
        _ => {}
    }
    let eab = a.eab.as_ref().and_then(|e| {
        use base64::Engine;
        let text = e.hmac_key.trim().trim_end_matches('=');
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text) {
            Ok(key) if !key.is_empty() && !e.kid.trim().is_empty() => Some(acme::Eab {
                kid: e.kid.trim().to_string(),
                hmac_key: key,
            }),
            _ => {
                c.err(
                    format!("{at}.acme.eab"),
                    "expected a kid and the hmac_key (base64url) the CA gave",
                );
                None
            }
        }
    });
    let directory_ca = a.ca_file.as_ref().map(|f| base_dir.join(f));
    if let Some(path) = &directory_ca {
        if let Err(e) = tls::load_client_roots(path) {
            c.err(format!("{at}.acme.ca_file"), e);
        }
    }
    let placeholder = match file.tls.acme.until_issued {
        schema::UntilIssued::Refuse => None,
        schema::UntilIssued::Placeholder if !hosts.is_empty() => match acme::placeholder(&hosts) {
            Ok(p) => Some(p),
            Err(e) => {
                c.err(
                    format!("{at}.acme"),
                    format!("placeholder certificate: {e}"),
                );
                None
            }
        },
        schema::UntilIssued::Placeholder => None,
    };
    if c.problems.len() > before {
        return None;
    }
    Some(acme::CertSpec {
        name: s.name.clone(),
        slot: Arc::new(ManagedCert::new(s.name.clone(), hosts.clone(), placeholder)),
        hosts,
        directory,
        contact,
        challenge,
        eab,
        directory_ca,
    })
}

/// `routes[i].hsts`: a valid field value.
pub(super) fn hsts(c: &mut Check, at: &str, value: Option<&str>) -> Option<HeaderValue> {
    let v = value?;
    match HeaderValue::from_str(v) {
        Ok(h) if v.to_ascii_lowercase().contains("max-age=") => Some(h),
        _ => {
            c.err(
                format!("{at}.hsts"),
                format!("expected a Strict-Transport-Security value with max-age, got {v:?}"),
            );
            None
        }
    }
}

/// `upstreams.NAME.tls`. `first_host`: the first backend's host when written as a name.
pub(super) fn upstream(
    c: &mut Check,
    at: &str,
    t: &schema::UpstreamTlsSection,
    first_host: Option<&str>,
    base_dir: &Path,
) -> UpstreamTls {
    let at = format!("{at}.tls");
    let sni = t
        .sni
        .clone()
        .or_else(|| first_host.map(str::to_string))
        .unwrap_or_default();
    let ca = t.ca_file.as_ref().and_then(|f| {
        let path = base_dir.join(f);
        match tls::load_ca(&path) {
            Ok(ca) => Some(ca),
            Err(e) => {
                c.err(format!("{at}.ca_file"), e);
                None
            }
        }
    });
    let client = match (&t.client_cert, &t.client_key) {
        (Some(cert), Some(key)) => {
            match tls::load_client_pair(&base_dir.join(cert), &base_dir.join(key), unix_now()) {
                Ok(pair) => Some(pair),
                Err((field, e)) => {
                    let field = if field == "cert_file" {
                        "client_cert"
                    } else {
                        "client_key"
                    };
                    c.err(format!("{at}.{field}"), e);
                    None
                }
            }
        }
        (None, None) => None,
        (Some(_), None) => {
            c.err(format!("{at}.client_key"), "client_cert needs client_key");
            None
        }
        (None, Some(_)) => {
            c.err(format!("{at}.client_cert"), "client_key needs client_cert");
            None
        }
    };
    UpstreamTls {
        sni,
        verify: t.verify,
        ca,
        client,
        source: [
            t.ca_file.clone(),
            t.client_cert.clone(),
            t.client_key.clone(),
        ],
    }
}

/// `consumers[i].client_certs[j]`: exactly one identifier.
pub(super) fn client_cert_match(
    c: &mut Check,
    at: &str,
    m: &schema::ClientCertSection,
) -> Option<crate::identity::CertMatch> {
    use crate::identity::CertMatch;
    match (&m.sha256, &m.subject, &m.san) {
        (Some(h), None, None) => {
            let hex_text: String = h.chars().filter(|ch| *ch != ':').collect();
            match hex::decode(&hex_text)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                Some(d) => Some(CertMatch::Sha256(d)),
                None => {
                    c.err(
                        format!("{at}.sha256"),
                        "expected 64 hex digits (colons allowed)",
                    );
                    None
                }
            }
        }
        (None, Some(s), None) if s.contains('=') => {
            Some(CertMatch::Subject(tls::normalize_subject(s)))
        }
        (None, Some(_), None) => {
            c.err(
                format!("{at}.subject"),
                "expected a name like `CN=alice, O=Example`",
            );
            None
        }
        (None, None, Some(san)) if !san.trim().is_empty() => {
            Some(CertMatch::San(san.trim().to_string()))
        }
        _ => {
            c.err(at, "set exactly one of sha256, subject and san");
            None
        }
    }
}
