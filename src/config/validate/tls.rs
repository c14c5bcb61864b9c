//! The TLS parts of the file: `server.listen_tls`, `tls.certificates` (read and checked here,
//! so a broken certificate is an error at its config entry, and a reload with one keeps the
//! old certificates serving), routes' `redirect_https`/`hsts`, and upstreams' `tls`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::HeaderValue;

use crate::config::check::{socket_addr, Check};
use crate::config::schema::{self, FileConfig};
use crate::tls::{self, CertTable, Certificate, ListenerSpec, MinVersion, TlsSpec};
use crate::upstream::UpstreamTls;

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

/// The certificates and one rustls configuration per TLS listener.
pub(super) fn compile(c: &mut Check, file: &FileConfig, base_dir: &Path) -> TlsSpec {
    let now = unix_now();
    let mut certificates = Vec::new();
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
        let (cert_file, key_file) = (base_dir.join(&s.cert_file), base_dir.join(&s.key_file));
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
    let default = file.tls.default_certificate.as_ref().and_then(|d| {
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
    let table = Arc::new(CertTable::new(&certificates, default));
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
        match tls::server_config(table.clone(), min_version, l.http2, client_auth.as_ref()) {
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
    TlsSpec {
        certificates,
        listeners,
    }
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
