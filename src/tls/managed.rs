//! Certificates obtained at run time (ACME) as the SNI table sees them. The table of a config
//! generation holds one [`ManagedCert`] per ACME certificate of the config; the ACME runtime
//! (`crate::acme`) owns one [`Live`] per certificate, which outlives generations, and attaches it
//! to each new generation's `ManagedCert` before that generation is published. A handshake reads
//! the certificate in force (or the placeholder until one exists) through two atomic loads.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validations (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The run-time state of one ACME certificate, shared by every generation that serves it.
#[derive(Default)]
pub struct Live {
    /// The issued certificate in force; `None` until the first one exists.
    pub key: ArcSwapOption<CertifiedKey>,
    /// TLS-ALPN-01 challenge certificates, by host, while a validation is under way.
    pub alpn: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl Live {
    /// Serve `key` from the next handshake on.
    pub fn install(&self, key: Arc<CertifiedKey>) {
        self.key.store(Some(key));
    }

    /// Answer TLS-ALPN-01 validations for `host` with `key` (`None`: stop answering).
    pub fn set_alpn_challenge(&self, host: &str, key: Option<Arc<CertifiedKey>>) {
        self.alpn.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &key {
                Some(k) => next.insert(host.to_string(), k.clone()),
                None => next.remove(host),
            };
            next
        });
    }
}

/// One ACME certificate of a config generation.
pub struct ManagedCert {
    /// `tls.certificates[].name`.
    pub name: String,
    /// The hosts it is ordered for (exact names, lowercased).
    pub hosts: Vec<String>,
    /// Served until the first certificate is issued; `None`: such handshakes are refused.
    pub placeholder: Option<Arc<CertifiedKey>>,
    live: ArcSwapOption<Live>,
}

impl std::fmt::Debug for ManagedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedCert")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("placeholder", &self.placeholder.is_some())
            .field("attached", &self.live.load().is_some())
            .finish()
    }
}

impl ManagedCert {
    pub fn new(name: String, hosts: Vec<String>, placeholder: Option<Arc<CertifiedKey>>) -> Self {
        Self {
            name,
            hosts,
            placeholder,
            live: ArcSwapOption::empty(),
        }
    }

    /// Serve what `live` holds (called before the generation is published).
    pub fn attach(&self, live: Arc<Live>) {
        self.live.store(Some(live));
    }

    /// The certificate for an ordinary handshake: the issued one, else the placeholder.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let live = self.live.load();
        live.as_ref()
            .and_then(|l| l.key.load_full())
            .or_else(|| self.placeholder.clone())
    }

    /// The TLS-ALPN-01 challenge certificate for `host`, while one is set.
    pub fn alpn_challenge(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let live = self.live.load();
        live.as_ref().and_then(|l| l.alpn.load().get(host).cloned())
    }

    /// True once an issued certificate is in force.
    pub fn issued(&self) -> bool {
        self.live
            .load()
            .as_ref()
            .is_some_and(|l| l.key.load().is_some())
    }
}
