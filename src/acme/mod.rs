//! ACME (RFC 8555): certificates that obtain and renew themselves. The protocol is
//! instant-acme's; what is here is the gateway's side of it:
//! - the challenges: HTTP-01 tokens answered on the listeners before routing
//!   ([`Acme::http01`]), TLS-ALPN-01 challenge certificates served by the SNI table
//!   (`tls::Live::alpn`);
//! - where the account and the certificates live ([`storage`]): a directory on one node, or
//!   Redis for a fleet (one node orders under a lock with a lease, the others load what it
//!   stored, told by pub/sub and a periodic check);
//! - one task per certificate ([`task`]): load what is stored, order when there is none or when
//!   a third of its lifetime is left, back off exponentially on failure (longer when the CA says
//!   "rate limited"), keep the old certificate serving until the new one is in.
//!
//! The runtime ([`Acme`]) outlives config generations: a reload that keeps a certificate's
//! settings keeps its task and its certificate; each new generation's `tls::ManagedCert` is
//! attached to the running state before the generation serves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::store::Store;
use crate::tls::{Live, ManagedCert};

pub mod storage;
mod task;

#[cfg(test)]
mod tests;

/// Let's Encrypt's production directory: the default `directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The path prefix of HTTP-01 validation requests (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// How a certificate's hosts are proven to the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    Http01,
    TlsAlpn01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// External account binding (RFC 8555 §7.3.4): the key id and the MAC key the CA gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eab {
    pub kid: String,
    pub hmac_key: Vec<u8>,
}

/// One ACME certificate of the config.
#[derive(Debug, Clone)]
pub struct CertSpec {
    pub name: String,
    /// Exact DNS names, lowercased; the first is the certificate's subject.
    pub hosts: Vec<String>,
    pub directory: String,
    /// `mailto:` contacts for the account.
    pub contact: Vec<String>,
    pub challenge: Challenge,
    pub eab: Option<Eab>,
    /// A CA bundle the directory's HTTPS certificate is verified against (a private CA);
    /// `None`: the system's roots.
    pub directory_ca: Option<PathBuf>,
    /// This generation's slot in the SNI table.
    pub slot: Arc<ManagedCert>,
}

impl CertSpec {
    /// The settings that make a task: equal ones keep the running task across a reload.
    fn same_order(&self, other: &Self) -> bool {
        self.name == other.name
            && self.hosts == other.hosts
            && self.directory == other.directory
            && self.contact == other.contact
            && self.challenge == other.challenge
            && self.eab == other.eab
            && self.directory_ca == other.directory_ca
    }
}

/// Where accounts and certificates are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// One node: a directory (created 0700, files 0600).
    Disk(PathBuf),
    /// A fleet: the `redis:` store.
    Redis,
}

/// `tls.acme` and every ACME certificate of a generation.
#[derive(Debug, Clone)]
pub struct Settings {
    pub store: StoreKind,
    /// How often a node looks at the stored certificate (renewal due, another node's order).
    pub check_interval: Duration,
    /// The first wait after a failed order; doubled at each failure up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long the ordering node's lock lasts without being refreshed (a node that dies
    /// mid-order releases it by expiry).
    pub lock_lease: Duration,
    /// The longest one order may take before it counts as failed.
    pub order_timeout: Duration,
    pub certs: Vec<CertSpec>,
}

impl Settings {
    fn same_task(&self, other: &Self) -> bool {
        self.store == other.store
            && self.check_interval == other.check_interval
            && self.retry_min == other.retry_min
            && self.retry_max == other.retry_max
            && self.lock_lease == other.lock_lease
            && self.order_timeout == other.order_timeout
    }
}

/// Where a certificate stands, as the admin API and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No certificate yet: the placeholder serves (or the handshake is refused).
    Pending,
    Valid,
    /// Due for renewal; the current certificate serves until the new one is in.
    Renewing,
    /// The last order failed (`error` says why); what served before keeps serving.
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [Self::Pending, Self::Valid, Self::Renewing, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Valid => "valid",
            Self::Renewing => "renewing",
            Self::Failed => "failed",
        }
    }
}

/// One certificate's ACME status.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub hosts: Vec<String>,
    pub directory: String,
    pub challenge: &'static str,
    pub state: State,
    /// The CA's (or the network's) error of the last failed attempt.
    pub error: Option<String>,
    pub consecutive_failures: u32,
    /// When the next order may start (Unix seconds), while backing off.
    pub next_attempt: Option<i64>,
    /// The certificate in force (issued), if any.
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    /// When renewal starts: a third of the lifetime before `not_after`.
    pub renew_at: Option<i64>,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    /// Orders this node completed.
    pub orders: u64,
}

impl Status {
    fn new(spec: &CertSpec) -> Self {
        Self {
            name: spec.name.clone(),
            hosts: spec.hosts.clone(),
            directory: spec.directory.clone(),
            challenge: spec.challenge.as_str(),
            state: State::Pending,
            error: None,
            consecutive_failures: 0,
            next_attempt: None,
            not_before: None,
            not_after: None,
            renew_at: None,
            issuer: None,
            serial: None,
            orders: 0,
        }
    }
}

struct Running {
    spec: CertSpec,
    settings: Settings,
    live: Arc<Live>,
    status: Arc<Mutex<Status>>,
    wake: Arc<Notify>,
    force: Arc<std::sync::atomic::AtomicBool>,
    bypass: Arc<std::sync::atomic::AtomicBool>,
    _stop: watch::Sender<bool>,
}

/// The ACME runtime of the process (outlives config generations).
#[derive(Default)]
pub struct Acme {
    /// HTTP-01 key authorizations by token, while validations are under way.
    http01: RwLock<HashMap<String, String>>,
    /// The Redis store of the fleet (HTTP-01 tokens another node set).
    redis: RwLock<Option<Arc<Store>>>,
    running: Mutex<HashMap<String, Running>>,
    /// The pub/sub follower (one per Redis store).
    feed: Mutex<Option<(usize, watch::Sender<bool>)>>,
}

impl Acme {
    /// Follow a generation about to be published: attach each ACME certificate of the
    /// generation to its running state (starting a task for new or changed certificates,
    /// stopping the tasks of removed ones). `redis`: the generation's Redis store.
    pub fn follow(self: &Arc<Self>, settings: Option<&Settings>, redis: Option<Arc<Store>>) {
        *self.redis.write().unwrap_or_else(|p| p.into_inner()) = redis.clone();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(settings) = settings else {
            running.clear();
            self.follow_feed(None);
            return;
        };
        running.retain(|name, _| settings.certs.iter().any(|c| c.name == *name));
        for spec in &settings.certs {
            let keep = running
                .get(&spec.name)
                .is_some_and(|r| r.spec.same_order(spec) && r.settings.same_task(settings));
            if !keep {
                let storage = match (&settings.store, &redis) {
                    (StoreKind::Disk(dir), _) => Some(storage::Storage::Disk(dir.clone())),
                    (StoreKind::Redis, Some(store)) => Some(storage::Storage::Redis(store.clone())),
                    (StoreKind::Redis, None) => None,
                };
                // What served before keeps serving while the new task starts.
                let live = running
                    .remove(&spec.name)
                    .map(|r| r.live)
                    .unwrap_or_default();
                let entry = self.start(spec, settings, live, storage);
                running.insert(spec.name.clone(), entry);
            }
            if let Some(r) = running.get_mut(&spec.name) {
                r.spec = spec.clone();
                spec.slot.attach(r.live.clone());
            }
        }
        drop(running);
        self.follow_feed(redis.filter(|_| settings.store == StoreKind::Redis));
    }

    fn start(
        self: &Arc<Self>,
        spec: &CertSpec,
        settings: &Settings,
        live: Arc<Live>,
        storage: Option<storage::Storage>,
    ) -> Running {
        let status = Arc::new(Mutex::new(Status::new(spec)));
        let wake = Arc::new(Notify::new());
        let force = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bypass = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        task::publish_state(&spec.name, State::Pending);
        if !spec.slot.issued() {
            match spec.slot.placeholder {
                Some(_) => log::info!(
                    "acme: {}: no certificate yet for {}; a self-signed placeholder serves until one is issued",
                    spec.name,
                    spec.hosts.join(", ")
                ),
                None => log::info!(
                    "acme: {}: no certificate yet for {}; their handshakes are refused until one is issued",
                    spec.name,
                    spec.hosts.join(", ")
                ),
            }
        }
        match storage {
            Some(storage) => {
                // A certificate already on disk serves from the first handshake.
                if let storage::Storage::Disk(dir) = &storage {
                    if let Ok(Some(stored)) = storage::read_disk_cert(dir, &spec.name) {
                        if stored.matches(spec) {
                            task::install(&live, &status, &stored);
                        }
                    }
                }
                let t = task::Task {
                    spec: spec.clone(),
                    settings: settings.clone(),
                    live: live.clone(),
                    status: status.clone(),
                    wake: wake.clone(),
                    force: force.clone(),
                    bypass: bypass.clone(),
                    storage,
                    acme: Arc::downgrade(self),
                    holder: task::holder_id(),
                };
                tokio::spawn(t.run(stopped));
            }
            None => {
                let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                s.state = State::Failed;
                s.error = Some(
                    "tls.acme.store is redis, but the Redis store is unavailable (see the log)"
                        .into(),
                );
                task::publish_state(&spec.name, State::Failed);
            }
        }
        Running {
            spec: spec.clone(),
            settings: settings.clone(),
            live,
            status,
            wake,
            force,
            bypass,
            _stop: stop,
        }
    }

    /// Follow the fleet's ACME events (new certificates, TLS-ALPN-01 challenges) on `store`.
    fn follow_feed(self: &Arc<Self>, store: Option<Arc<Store>>) {
        let mut feed = self.feed.lock().unwrap_or_else(|p| p.into_inner());
        let id = store.as_ref().map(|s| Arc::as_ptr(s) as usize);
        if feed.as_ref().map(|(i, _)| *i) == id {
            return;
        }
        *feed = None;
        if let Some(store) = store {
            let (stop, stopped) = watch::channel(false);
            tokio::spawn(storage::follow_events(
                Arc::downgrade(self),
                store.clone(),
                stopped,
            ));
            *feed = Some((Arc::as_ptr(&store) as usize, stop));
        }
    }

    /// The answer to an HTTP-01 validation request for `token`, if this node (or, with
    /// Redis, the fleet) has one under way.
    pub async fn http01(&self, token: &str) -> Option<String> {
        if let Some(v) = self
            .http01
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
        {
            return Some(v.clone());
        }
        let store = self
            .redis
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        storage::Storage::Redis(store).get_http01(token).await
    }

    fn set_http01(&self, token: &str, key_authorization: Option<String>) {
        let mut map = self.http01.write().unwrap_or_else(|p| p.into_inner());
        match key_authorization {
            Some(k) => map.insert(token.to_string(), k),
            None => map.remove(token),
        };
    }

    /// Wake the task of `name` (another node stored a new certificate).
    fn wake(&self, name: &str) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            r.wake.notify_one();
        }
    }

    /// The running state that serves `host`, for a TLS-ALPN-01 challenge another node set.
    fn live_for_host(&self, host: &str) -> Option<Arc<Live>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|r| r.spec.hosts.iter().any(|h| h == host))
            .map(|r| r.live.clone())
    }

    /// Every ACME certificate's status, in config order of their names.
    pub fn statuses(&self) -> Vec<Status> {
        let mut all: Vec<Status> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| r.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Start an order for `name` now, due or not (and whatever the backoff says). False: no
    /// such ACME certificate.
    pub fn renew_now(&self, name: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = running.get(name) else {
            return false;
        };
        r.force.store(true, std::sync::atomic::Ordering::Relaxed);
        r.bypass.store(true, std::sync::atomic::Ordering::Relaxed);
        r.wake.notify_one();
        true
    }
}

/// A key pair turned into what rustls serves.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
) -> Result<Arc<CertifiedKey>, String> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable generated key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The self-signed certificate served for `hosts` until the first one is issued.
pub fn placeholder(hosts: &[String]) -> Result<Arc<CertifiedKey>, String> {
    self_signed(hosts, None)
}

/// The TLS-ALPN-01 challenge certificate for `host` (RFC 8737 §3): self-signed, the host as
/// its only name, the SHA-256 of the key authorization in a critical acmeIdentifier extension.
pub fn alpn_challenge(
    host: &str,
    digest: &[u8],
) -> Result<(Arc<CertifiedKey>, String, String), String> {
    let (key, cert_pem, key_pem) = self_signed_pem(&[host.to_string()], Some(digest))?;
    Ok((key, cert_pem, key_pem))
}

fn self_signed(hosts: &[String], acme_digest: Option<&[u8]>) -> Result<Arc<CertifiedKey>, String> {
    self_signed_pem(hosts, acme_digest).map(|(k, _, _)| k)
}

fn self_signed_pem(
    hosts: &[String],
    acme_digest: Option<&[u8]>,
) -> Result<(Arc<CertifiedKey>, String, String), String> {
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())
        .map_err(|e| format!("certificate parameters: {e}"))?;
    let mut dn = rcgen::DistinguishedName::new();
    let cn = match acme_digest {
        Some(_) => "Tollgate ACME challenge".to_string(),
        None => "Tollgate placeholder (ACME certificate pending)".to_string(),
    };
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    if let Some(d) = acme_digest {
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(d)];
    }
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key generation: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("self-signing: {e}"))?;
    let certified = certified(vec![cert.der().clone()], key.serialize_der())?;
    Ok((certified, cert.pem(), key.serialize_pem()))
}

/// A challenge certificate from the PEM another node stored. Not through
/// `tls::certificate_from_pem`: its critical acmeIdentifier extension is one webpki refuses
/// to parse (only the validator reads it).
fn certified_from_pem(cert_pem: &str, key_pem: &str) -> Option<Arc<CertifiedKey>> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).ok()?;
    match certified(chain, key.secret_pkcs8_der().to_vec()) {
        Ok(k) => Some(k),
        Err(e) => {
            log::warn!("acme: a TLS-ALPN-01 challenge from the fleet is unusable: {e}");
            None
        }
    }
}
