//! TLS termination: certificate files loaded and checked (they parse, the key matches, they are
//! valid now, their names cover the hosts the config gives them), one certificate chosen per
//! handshake by SNI (exact name, then wildcard, then the default), and one rustls
//! `ServerConfig` per TLS listener, built with every config generation. A listener's acceptor
//! is swapped atomically when a generation is published ([`Acceptors`]): new handshakes get the
//! new certificates, established connections keep theirs.
//!
//! The library is rustls with the ring provider: a pure-Rust build (no cmake, no system
//! OpenSSL), TLS 1.2 and 1.3 only, and session resumption by tickets and by session id. How
//! it compares with NGINX (OpenSSL) per handshake and per request: docs/tls.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use pingora_core::listeners::tls::Acceptor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SignatureAlgorithm};

use pingora_core::protocols::tls::CaType;
use pingora_core::utils::tls::{parse_x509, CertKey, WrappedX509};

mod managed;
mod names;

pub use managed::{Live, ManagedCert, ACME_TLS_ALPN};

pub use names::{covers, normalize_name};

/// Certificates with less time left than this are logged as a warning (at load, at each
/// reload, and twice a day).
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

/// One certificate/key pair from the config, loaded and checked.
#[derive(Debug)]
pub struct Certificate {
    /// The config's name for it (`tls.certificates[].name`).
    pub name: String,
    pub cert_file: PathBuf,
    /// The DNS names the leaf certificate is valid for (its subjectAltName DNS entries, or its
    /// subject's common name when it has none), lowercased; `*.example.com` for wildcards.
    pub names: Vec<String>,
    pub subject: String,
    pub issuer: String,
    /// The serial number, hex with colons.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// `RSA`, `ECDSA` or `Ed25519`.
    pub key_type: &'static str,
    /// The chain and the signing key, as rustls serves them.
    pub key: Arc<CertifiedKey>,
}

/// The crypto provider every TLS piece of the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} file {}: {e}", path.display()))
}

/// Load the PEM chain at `cert_file` (leaf first) and the PEM private key at `key_file`
/// (PKCS#8, PKCS#1 or SEC1), and check them at `now` (Unix seconds). The error says which file
/// and what is wrong with it.
/// The error names the config field at fault (`cert_file` or `key_file`) and says what is
/// wrong.
pub fn load_certificate(
    name: &str,
    cert_file: &Path,
    key_file: &Path,
    now: i64,
) -> Result<Certificate, (&'static str, String)> {
    let cert_pem = read(cert_file, "certificate").map_err(|m| ("cert_file", m))?;
    let key_pem = read(key_file, "key").map_err(|m| ("key_file", m))?;
    let cert = certificate_from_pem(
        name,
        (&cert_pem, &cert_file.display().to_string()),
        (&key_pem, &key_file.display().to_string()),
    )?;
    check_validity(&cert, now).map_err(|m| ("cert_file", m))?;
    Ok(Certificate {
        cert_file: cert_file.to_path_buf(),
        ..cert
    })
}

/// Is `cert` valid at `now` (Unix seconds)? The error says why not.
pub fn check_validity(cert: &Certificate, now: i64) -> Result<(), String> {
    let when = |t: i64| {
        x509_parser::time::ASN1Time::from_timestamp(t)
            .map_or_else(|_| t.to_string(), |a| a.to_string())
    };
    if cert.not_after <= now {
        return Err(format!(
            "{}: the certificate expired at {} (not after)",
            cert.cert_file.display(),
            when(cert.not_after)
        ));
    }
    if cert.not_before > now {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            cert.cert_file.display(),
            when(cert.not_before)
        ));
    }
    Ok(())
}

/// A certificate from PEM text: the chain (leaf first) and its private key, each given with
/// the label errors name it by (a file path, or what it is). Checks that both parse and that
/// the key matches, not the dates (see [`check_validity`]). The error names the field at fault
/// (`cert_file` or `key_file`).
pub fn certificate_from_pem(
    name: &str,
    (cert_pem, cert_label): (&[u8], &str),
    (key_pem, key_label): (&[u8], &str),
) -> Result<Certificate, (&'static str, String)> {
    let cert_err = |m: String| ("cert_file", m);
    let key_err = |m: String| ("key_file", m);
    let (chain, parsed_leaf) = parse_chain(cert_pem, cert_label).map_err(cert_err)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&parsed_leaf)
        .map_err(|e| cert_err(format!("{cert_label}: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        key_err(format!(
            "{key_label}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) found: {e:?}"
        ))
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("{key_label}: unusable private key: {e}")))?;
    let key_type = match signing.algorithm() {
        SignatureAlgorithm::RSA => "RSA",
        SignatureAlgorithm::ECDSA => "ECDSA",
        SignatureAlgorithm::ED25519 => "Ed25519",
        _ => "other",
    };
    let certified = CertifiedKey::new(chain.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(key_err(format!(
                "the key in {key_label} does not match the certificate in {cert_label}"
            )))
        }
        Err(e) => return Err(cert_err(format!("{cert_label}: {e}"))),
    }
    let validity = parsed.validity();
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(normalize_name(d));
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            names.push(normalize_name(cn));
        }
    }
    Ok(Certificate {
        name: name.to_string(),
        cert_file: PathBuf::from(cert_label),
        names,
        subject: parsed.subject().to_string(),
        issuer: parsed.issuer().to_string(),
        serial: parsed.raw_serial_as_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        key_type,
        key: Arc::new(certified),
    })
}

/// A PEM chain (leaf first) and a copy of its leaf's DER, checked to be X.509.
fn read_chain(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), String> {
    let pem = read(path, "certificate")?;
    parse_chain(&pem, &path.display().to_string())
}

/// The same, from PEM text; `label` names it in errors.
fn parse_chain(pem: &[u8], label: &str) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{label}: not a PEM certificate file: {e:?}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{label}: no certificate (no `-----BEGIN CERTIFICATE-----` block)"
        ));
    };
    for (i, c) in chain.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c.as_ref()) {
            return Err(format!(
                "{label}: certificate {} is not valid X.509: {e}",
                i + 1
            ));
        }
    }
    let leaf = leaf.to_vec();
    Ok((chain, leaf))
}

/// A CA bundle to verify upstream certificates against.
pub fn load_ca(path: &Path) -> Result<Arc<CaType>, String> {
    let (chain, _) = read_chain(path)?;
    let cas: Vec<WrappedX509> = chain
        .into_iter()
        .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
        .collect();
    Ok(Arc::from(cas.into_boxed_slice()))
}

/// A client certificate and key for upstream mTLS, checked like a served pair.
pub fn load_client_pair(
    cert_file: &Path,
    key_file: &Path,
    now: i64,
) -> Result<Arc<CertKey>, (&'static str, String)> {
    let cert = load_certificate("client", cert_file, key_file, now)?;
    let key_pem = read(key_file, "key").map_err(|e| ("key_file", e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| ("key_file", format!("{}: {e:?}", key_file.display())))?;
    let der = key.secret_der().to_vec();
    // Pingora turns these bytes back into a key at every connect (and panics if it cannot):
    // the same conversion here, where a failure is a config error.
    if PrivateKeyDer::try_from(der.clone()).is_err() {
        return Err((
            "key_file",
            format!(
                "{}: a key pingora cannot use for a client certificate (use PKCS#8)",
                key_file.display()
            ),
        ));
    }
    let chain = cert.key.cert.iter().map(|c| c.to_vec()).collect();
    Ok(Arc::new(CertKey::new(chain, der)))
}

/// The certificates of one config generation, indexed by the names they serve.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// `*.example.com` is filed under `example.com`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// For clients without SNI, and names no certificate covers; `None`: refuse the handshake.
    default: Option<Vec<Arc<CertifiedKey>>>,
    /// ACME certificates by exact host (empty without ACME: the handshake never looks).
    managed: HashMap<String, Arc<ManagedCert>>,
    /// The default when it is an ACME certificate.
    default_managed: Option<Arc<ManagedCert>>,
}

impl CertTable {
    /// Index `certs` by their names; `default`: the index of the certificate for clients that
    /// send no SNI or a name no certificate has. Several certificates for one name (an RSA and
    /// an ECDSA pair, say) are all kept: the handshake takes the first the client can verify.
    pub fn new(certs: &[Arc<Certificate>], default: Option<usize>) -> Self {
        let mut table = Self::default();
        for c in certs {
            for n in &c.names {
                let slot = match n.strip_prefix("*.") {
                    Some(parent) => table.wildcard.entry(parent.to_string()).or_default(),
                    None => table.exact.entry(n.clone()).or_default(),
                };
                slot.push(c.key.clone());
            }
        }
        // ECDSA (then Ed25519) before RSA: smaller and cheaper to sign with; clients that
        // cannot verify it get the RSA pair (see `resolve`).
        let rank = |k: &Arc<CertifiedKey>| match k.key.algorithm() {
            SignatureAlgorithm::ECDSA => 0,
            SignatureAlgorithm::ED25519 => 1,
            _ => 2,
        };
        for keys in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            keys.sort_by_key(rank);
        }
        table.default = default.and_then(|i| certs.get(i)).map(|c| {
            // The default's own pair first, then any other key type for the same names.
            let mut keys = vec![c.key.clone()];
            for other in certs {
                if !Arc::ptr_eq(&other.key, &c.key) && other.names == c.names {
                    keys.push(other.key.clone());
                }
            }
            keys
        });
        table
    }

    /// Add the ACME certificates of the generation; `default`: the index of the default
    /// certificate among them.
    pub fn with_managed(mut self, managed: &[Arc<ManagedCert>], default: Option<usize>) -> Self {
        for m in managed {
            for h in &m.hosts {
                self.managed.insert(h.clone(), m.clone());
            }
        }
        self.default_managed = default.and_then(|i| managed.get(i)).cloned();
        self
    }

    /// The handshake of a certificate table with ACME certificates: a TLS-ALPN-01 validation
    /// gets the challenge certificate of its host (and nothing else); then exact names (files
    /// first, then ACME), wildcards, the default.
    fn resolve_managed(&self, hello: &ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(normalize_name);
        let validation = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if validation {
            let name = name?;
            return self.managed.get(&name)?.alpn_challenge(&name);
        }
        if let Some(n) = &name {
            if let Some(keys) = self.exact.get(n) {
                return pick(keys, hello);
            }
            if let Some(m) = self.managed.get(n) {
                return m.current();
            }
            if let Some(keys) = n
                .split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
            {
                return pick(keys, hello);
            }
        }
        match (&self.default_managed, &self.default) {
            (Some(m), _) => m.current(),
            (None, Some(keys)) => pick(keys, hello),
            (None, None) => None,
        }
    }

    /// The candidates for `server_name` (as the client sent it), most specific first.
    pub fn lookup(&self, server_name: Option<&str>) -> Option<&[Arc<CertifiedKey>]> {
        let found = server_name.and_then(|n| {
            let n = normalize_name(n);
            self.exact.get(&n).or_else(|| {
                let (_, parent) = n.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        found.or(self.default.as_ref()).map(Vec::as_slice)
    }
}

impl ResolvesServerCert for CertTable {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !self.managed.is_empty() {
            return self.resolve_managed(&hello);
        }
        pick(self.lookup(hello.server_name())?, &hello)
    }
}

/// The first candidate the client can verify (the first one when none fits: the handshake
/// then fails with the client's own reason).
fn pick(candidates: &[Arc<CertifiedKey>], hello: &ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
    match candidates {
        [only] => Some(only.clone()),
        _ => candidates
            .iter()
            .find(|k| k.key.choose_scheme(hello.signature_schemes()).is_some())
            .or(candidates.first())
            .cloned(),
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn parse(text: &str) -> Option<Self> {
        match text
            .trim()
            .trim_start_matches("TLS")
            .trim_start_matches("tls")
        {
            "1.2" | "v1.2" | "1_2" => Some(Self::Tls12),
            "1.3" | "v1.3" | "1_3" => Some(Self::Tls13),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "1.2",
            Self::Tls13 => "1.3",
        }
    }
}

/// One TLS listener of a config generation.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub min_version: MinVersion,
    /// Offer `h2` by ALPN (next to `http/1.1`).
    pub http2: bool,
    /// Client certificates asked for (mTLS): `Some(true)` required, `Some(false)` optional.
    pub client_auth: Option<bool>,
    pub config: Arc<ServerConfig>,
}

/// A verified client certificate, as the request path sees it (attached to the connection's
/// TLS digest by [`ClientCertInfo`] at the end of the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the certificate's DER.
    pub sha256: [u8; 32],
    /// Normalised as [`normalize_subject`] does.
    pub subject: String,
    /// subjectAltName DNS names, e-mail addresses and URIs.
    pub sans: Vec<String>,
}

impl ClientCert {
    /// Read the identifiers of a certificate (already verified by rustls).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                use x509_parser::extensions::GeneralName as G;
                match n {
                    G::DNSName(v) | G::RFC822Name(v) | G::URI(v) => sans.push(v.to_string()),
                    _ => {}
                }
            }
        }
        let digest = sha256(der);
        Some(Self {
            sha256: digest,
            subject: normalize_subject(&cert.subject().to_string()),
            sans,
        })
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// A distinguished name compared without the spaces around its separators:
/// `CN=alice, O=Example` and `CN=alice,O=Example` are the same subject.
pub fn normalize_subject(dn: &str) -> String {
    dn.split(',')
        .map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            format!("{}={}", k.trim().to_ascii_uppercase(), v.trim())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Attaches the client's certificate ([`ClientCert`]) to the connection's TLS digest, where
/// every request on the connection (HTTP/1.1 or HTTP/2) finds it.
pub struct ClientCertInfo;

#[async_trait::async_trait]
impl pingora_core::listeners::TlsAccept for ClientCertInfo {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora_core::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let cert = ClientCert::from_der(tls.peer_certificate_der()?)?;
        Some(Arc::new(cert))
    }
}

/// The acceptor of one listener: with [`ClientCertInfo`] where client certificates are asked
/// for (nothing to attach otherwise).
fn acceptor_for(l: &ListenerSpec) -> Acceptor {
    if l.client_auth.is_some() {
        if let Ok(mut settings) =
            pingora_core::listeners::tls::TlsSettings::with_callbacks(Box::new(ClientCertInfo))
        {
            // `build` wants a resolver; the configuration it builds is then replaced by ours.
            settings.set_cert_resolver(Arc::new(CertTable::default()));
            let mut acceptor = settings.build();
            acceptor.acceptor = pingora_core::tls::TlsAcceptor::from(l.config.clone());
            return acceptor;
        }
    }
    Acceptor::from_server_config(l.config.clone())
}

/// The CAs client certificates must chain to.
pub fn load_client_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let (chain, _) = read_chain(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in chain {
        roots
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Everything TLS in one config generation.
#[derive(Debug, Clone, Default)]
pub struct TlsSpec {
    pub certificates: Vec<Arc<Certificate>>,
    /// The ACME certificates, attached to their run-time state before the generation serves.
    pub managed: Vec<Arc<ManagedCert>>,
    pub listeners: Vec<ListenerSpec>,
}

/// Session ids and tickets survive reloads: one cache and one ticket key rotation per process.
fn resumption() -> (
    Arc<dyn rustls::server::StoresServerSessions>,
    Option<Arc<dyn rustls::server::ProducesTickets>>,
) {
    static STORE: LazyLock<Arc<ServerSessionMemoryCache>> =
        LazyLock::new(|| ServerSessionMemoryCache::new(20_000));
    static TICKETS: LazyLock<Option<Arc<dyn rustls::server::ProducesTickets>>> =
        LazyLock::new(|| rustls::crypto::ring::Ticketer::new().ok());
    (STORE.clone(), TICKETS.clone())
}

/// Client certificates asked for on a listener: the CAs, and whether one is required.
pub struct ClientAuth {
    pub roots: Arc<rustls::RootCertStore>,
    pub required: bool,
}

/// The rustls configuration of one listener.
pub fn server_config(
    table: Arc<CertTable>,
    min_version: MinVersion,
    http2: bool,
    client_auth: Option<&ClientAuth>,
    acme_alpn: bool,
) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS settings: {e}"))?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                auth.roots.clone(),
                provider(),
            );
            let verifier = if auth.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client certificate CAs: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(table);
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if acme_alpn {
        // Only TLS-ALPN-01 validators offer it; the resolver answers them with the challenge.
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    let (store, tickets) = resumption();
    config.session_storage = store;
    if let Some(t) = tickets {
        config.ticketer = t;
    }
    Ok(Arc::new(config))
}

/// The acceptor each TLS listener takes its next handshake from, swapped at every published
/// generation. Indexed like `TlsSpec::listeners` of the first generation (listener addresses
/// change only through a binary upgrade).
#[derive(Default)]
pub struct Acceptors {
    slots: Vec<(SocketAddr, Arc<ArcSwap<Acceptor>>)>,
}

impl Acceptors {
    pub fn new(spec: &TlsSpec) -> Self {
        Self {
            slots: spec
                .listeners
                .iter()
                .map(|l| (l.addr, Arc::new(ArcSwap::from_pointee(acceptor_for(l)))))
                .collect(),
        }
    }

    /// The slot a listener's front end reads.
    pub fn slot(&self, addr: SocketAddr) -> Option<Arc<ArcSwap<Acceptor>>> {
        self.slots
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, s)| s.clone())
    }

    /// Follow a new generation: each running listener gets its new configuration.
    pub fn follow(&self, spec: &TlsSpec) {
        for (addr, slot) in &self.slots {
            if let Some(l) = spec.listeners.iter().find(|l| l.addr == *addr) {
                slot.store(Arc::new(acceptor_for(l)));
            }
        }
    }
}

/// Why a handshake failed, as a bounded metric label. Pingora keeps only the text of the
/// rustls or I/O error (in the error's context, with no cause), so the label is read from it.
pub fn failure_reason(e: &pingora_error::Error) -> &'static str {
    failure_reason_of(&e.to_string())
}

fn failure_reason_of(text: &str) -> &'static str {
    const REASONS: [(&str, &str); 10] = [
        ("no server certificate chain resolved", "unknown_name"),
        ("peer is incompatible", "incompatible"),
        ("peer sent no certificates", "no_client_certificate"),
        ("invalid peer certificate", "bad_client_certificate"),
        ("received fatal alert", "alert_received"),
        ("received corrupt message", "malformed"),
        ("peer misbehaved", "misbehaved"),
        ("unexpected message", "malformed"),
        ("eof", "closed"),
        ("reset by peer", "closed"),
    ];
    let lower = text.to_ascii_lowercase();
    REASONS
        .iter()
        .find(|(needle, _)| lower.contains(needle))
        .map_or("other", |(_, reason)| reason)
}

/// The negotiated version (as pingora's digest spells it, `TLSv1_3`) as a metric label.
pub fn version_label(digest_version: &str) -> &'static str {
    match digest_version {
        "TLSv1_3" | "TLSv1.3" => "1.3",
        "TLSv1_2" | "TLSv1.2" => "1.2",
        _ => "other",
    }
}

#[cfg(test)]
mod tests;
