//! One ACME certificate's life: load what is stored, order when there is nothing or renewal is
//! due, back off on failure, install what is issued.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::{watch, Notify};

use super::storage::{account_id, Storage, Stored};
use super::{Acme, CertSpec, Challenge, Settings, State, Status};
use crate::metrics;
use crate::tls::Live;

/// The RFC 8555 problem type of a CA's rate limit.
const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";
/// The least a node waits after the CA said "rate limited" (capped by `retry_max`).
const RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);
/// How long a TLS-ALPN-01 challenge set in Redis is given to reach the other nodes before the
/// CA is told to validate (pub/sub delivers in milliseconds; this covers a busy node).
const FLEET_PROPAGATION: Duration = Duration::from_millis(500);

pub(super) struct Task {
    pub spec: CertSpec,
    pub settings: Settings,
    pub live: Arc<Live>,
    pub status: Arc<Mutex<Status>>,
    pub wake: Arc<Notify>,
    pub force: Arc<AtomicBool>,
    /// Set with `force` by the admin API: the next attempt ignores the backoff (once).
    pub bypass: Arc<AtomicBool>,
    pub storage: Storage,
    pub acme: Weak<Acme>,
    /// This node's id in the order lock.
    pub holder: String,
}

/// A lock holder id unique to this process.
pub(super) fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}:{}:{}",
        host.trim(),
        std::process::id(),
        crate::clock::UnixMs::now().0
    )
}

fn unix_now() -> i64 {
    crate::clock::UnixMs::now().0 as i64 / 1000
}

/// When renewal of a certificate valid from `not_before` to `not_after` starts: a third of
/// its lifetime before it ends.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

/// The wait after `failures` consecutive failures: `min` doubled per failure, at most `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
    min.saturating_mul(factor).min(max)
}

/// Set the state gauge of `name` (1 for its state, 0 for the others).
pub(super) fn publish_state(name: &str, state: State) {
    for s in State::ALL {
        metrics::ACME_STATE
            .with_label_values(&[name, s.as_str()])
            .set(i64::from(s == state));
    }
}

/// Serve `stored` from the next handshake on and record it in the status. False when it does
/// not parse (it is then ignored).
pub(super) fn install(live: &Live, status: &Mutex<Status>, stored: &Stored) -> bool {
    let cert = match crate::tls::certificate_from_pem(
        &stored.hosts.join(","),
        (stored.chain_pem.as_bytes(), "the issued certificate"),
        (stored.key_pem.as_bytes(), "the issued key"),
    ) {
        Ok(c) => c,
        Err((_, e)) => {
            log::error!("acme: a stored certificate is unusable: {e}");
            return false;
        }
    };
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    if s.serial.as_deref() != Some(cert.serial.as_str()) {
        live.install(cert.key.clone());
        log::info!(
            "acme: certificate {} for {} in force (serial {}, valid until {})",
            s.name,
            stored.hosts.join(", "),
            cert.serial,
            cert.not_after
        );
        metrics::TLS_CERT_EXPIRY
            .with_label_values(&[s.name.as_str()])
            .set(cert.not_after);
    }
    s.not_before = Some(cert.not_before);
    s.not_after = Some(cert.not_after);
    s.renew_at = Some(renew_at(cert.not_before, cert.not_after));
    s.issuer = Some(cert.issuer.clone());
    s.serial = Some(cert.serial.clone());
    true
}

/// How long to wait after the `failures`-th failure in a row, `f`: the backoff, and at least
/// an hour (capped by `retry_max`) when the CA said "rate limited".
pub(super) fn wait_after(f: &Failure, failures: u32, settings: &Settings) -> Duration {
    let wait = backoff(failures, settings.retry_min, settings.retry_max);
    match f {
        Failure::RateLimited(_) => wait.max(RATE_LIMIT_WAIT).min(settings.retry_max),
        _ => wait,
    }
}

pub(super) enum Failure {
    /// The account is unknown to the CA (its data was reset): make a new one, at once.
    NoAccount(String),
    RateLimited(String),
    Other(String),
}

impl Failure {
    fn text(&self) -> &str {
        match self {
            Self::NoAccount(t) | Self::RateLimited(t) | Self::Other(t) => t,
        }
    }
}

pub(super) fn acme_failure(context: &str, e: instant_acme::Error) -> Failure {
    if let instant_acme::Error::Api(p) = &e {
        let kind = p.r#type.as_deref().unwrap_or("");
        let text = format!("{context}: {e}");
        return match kind {
            RATE_LIMITED => Failure::RateLimited(text),
            "urn:ietf:params:acme:error:accountDoesNotExist" => Failure::NoAccount(text),
            _ => Failure::Other(text),
        };
    }
    Failure::Other(format!("{context}: {e}"))
}

impl Task {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        publish_state(&s.name, s.state);
        let name = s.name.clone();
        metrics::ACME_FAILURES
            .with_label_values(&[name.as_str()])
            .set(i64::from(s.consecutive_failures));
        metrics::ACME_NEXT_ATTEMPT
            .with_label_values(&[name.as_str()])
            .set(s.next_attempt.unwrap_or(0));
    }

    /// Wait `d`, or less when woken (another node's certificate, a forced renewal). False: stop.
    async fn pause(&self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.wake.notified() => true,
            _ = stop.changed() => false,
        }
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut account: Option<Account> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut waiting = false;
        let lease_poll = (self.settings.lock_lease / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            if *stop.borrow() {
                return;
            }
            // 1. What the store holds (another node may have ordered it).
            match self.storage.load_cert(&self.spec.name).await {
                Ok(Some(stored)) if stored.matches(&self.spec) => {
                    install(&self.live, &self.status, &stored);
                }
                Ok(_) => {}
                Err(e) => log::warn!("acme: {}: cannot read the store: {e}", self.spec.name),
            }
            let now = unix_now();
            let (renew, in_force) = {
                let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                (s.renew_at, s.not_after.is_some_and(|t| t > now))
            };
            let forced = self.force.load(Ordering::Relaxed);
            let due = forced || !in_force || renew.is_none_or(|r| now >= r);
            if !due {
                failures = 0;
                retry_at = None;
                self.set(|s| {
                    s.state = State::Valid;
                    s.consecutive_failures = 0;
                    s.next_attempt = None;
                });
                let until = renew.map_or(self.settings.check_interval, |r| {
                    Duration::from_secs((r - now).max(1) as u64)
                });
                if !self
                    .pause(until.min(self.settings.check_interval), &mut stop)
                    .await
                {
                    return;
                }
                continue;
            }
            if !self.bypass.load(Ordering::Relaxed) {
                if let Some(at) = retry_at {
                    let left = at.saturating_duration_since(tokio::time::Instant::now());
                    if !left.is_zero() {
                        if !self
                            .pause(left.min(self.settings.check_interval), &mut stop)
                            .await
                        {
                            return;
                        }
                        continue;
                    }
                }
            }
            // 2. One node orders: take the lock (or wait for the node that has it).
            match self
                .storage
                .lock(&self.spec.name, &self.holder, self.settings.lock_lease)
                .await
            {
                Ok(true) => waiting = false,
                Ok(false) => {
                    if !waiting {
                        waiting = true;
                        log::info!(
                            "acme: {}: another node holds the order lock; waiting for its certificate or for the lock",
                            self.spec.name
                        );
                    }
                    if !self.pause(lease_poll, &mut stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    log::warn!("acme: {}: cannot take the order lock: {e}", self.spec.name);
                    if !self
                        .pause(lease_poll.max(Duration::from_secs(1)), &mut stop)
                        .await
                    {
                        return;
                    }
                    continue;
                }
            }
            // The node that held the lock may have just stored a fresh certificate.
            if !forced {
                if let Ok(Some(stored)) = self.storage.load_cert(&self.spec.name).await {
                    if stored.matches(&self.spec) && install(&self.live, &self.status, &stored) {
                        let s = self
                            .status
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        if s.renew_at.is_some_and(|r| unix_now() < r) {
                            self.storage.unlock(&self.spec.name, &self.holder).await;
                            continue;
                        }
                    }
                }
            }
            self.bypass.store(false, Ordering::Relaxed);
            self.set(|s| {
                s.state = if s.not_after.is_some_and(|t| t > unix_now()) {
                    State::Renewing
                } else if s.state == State::Failed {
                    State::Failed
                } else {
                    State::Pending
                };
            });
            log::info!(
                "acme: ordering a certificate for {} from {}",
                self.spec.hosts.join(", "),
                self.spec.directory
            );
            let outcome = {
                let order =
                    tokio::time::timeout(self.settings.order_timeout, self.order(&mut account));
                let keep_lease = async {
                    loop {
                        tokio::time::sleep(self.settings.lock_lease / 3).await;
                        match self
                            .storage
                            .refresh(&self.spec.name, &self.holder, self.settings.lock_lease)
                            .await
                        {
                            Ok(true) => {}
                            Ok(false) => log::warn!(
                                "acme: {}: the order lock expired while ordering",
                                self.spec.name
                            ),
                            Err(e) => log::warn!("acme: {}: {e}", self.spec.name),
                        }
                    }
                };
                tokio::select! {
                    r = order => r.unwrap_or_else(|_| Err(Failure::Other(format!(
                        "the order took longer than {:?}", self.settings.order_timeout)))),
                    () = keep_lease => Err(Failure::Other("lease keeper ended".into())),
                    _ = stop.changed() => {
                        self.storage.unlock(&self.spec.name, &self.holder).await;
                        return;
                    }
                }
            };
            let stored = match outcome {
                Ok(stored) => self
                    .storage
                    .save_cert(&self.spec.name, &stored)
                    .await
                    .map(|()| stored)
                    .map_err(|e| Failure::Other(format!("cannot store the certificate: {e}"))),
                Err(f) => Err(f),
            };
            self.storage.unlock(&self.spec.name, &self.holder).await;
            match stored {
                Ok(stored) => {
                    metrics::ACME_ORDERS
                        .with_label_values(&[self.spec.name.as_str(), "issued"])
                        .inc();
                    install(&self.live, &self.status, &stored);
                    self.force.store(false, Ordering::Relaxed);
                    failures = 0;
                    retry_at = None;
                    self.set(|s| {
                        s.state = State::Valid;
                        s.error = None;
                        s.consecutive_failures = 0;
                        s.next_attempt = None;
                        s.orders += 1;
                    });
                }
                Err(Failure::NoAccount(e)) => {
                    log::warn!("acme: {}: {e}; registering a new account", self.spec.name);
                    self.storage.forget_account(&account_id(&self.spec)).await;
                    account = None;
                }
                Err(f) => {
                    failures += 1;
                    let wait = wait_after(&f, failures, &self.settings);
                    let result = if let Failure::RateLimited(_) = f {
                        "rate_limited"
                    } else {
                        "failed"
                    };
                    metrics::ACME_ORDERS
                        .with_label_values(&[self.spec.name.as_str(), result])
                        .inc();
                    log::error!(
                        "acme: {}: order failed ({} in a row), next attempt in {:?}: {}",
                        self.spec.name,
                        failures,
                        wait,
                        f.text()
                    );
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    let next = unix_now() + wait.as_secs().max(1) as i64;
                    let text = f.text().to_string();
                    self.set(|s| {
                        s.state = State::Failed;
                        s.error = Some(text);
                        s.consecutive_failures = failures;
                        s.next_attempt = Some(next);
                    });
                }
            }
        }
    }

    /// The account for this certificate's directory: stored, or registered now (and stored).
    async fn account(&self, cached: &mut Option<Account>) -> Result<Account, Failure> {
        if let Some(a) = cached {
            return Ok(a.clone());
        }
        let builder = || match &self.spec.directory_ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let id = account_id(&self.spec);
        let stored = self
            .storage
            .load_account(&id)
            .await
            .map_err(Failure::Other)?;
        if let Some(json) = stored {
            if let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&json) {
                let account = builder()
                    .map_err(|e| acme_failure("ACME client", e))?
                    .from_credentials(credentials)
                    .await
                    .map_err(|e| acme_failure("the directory", e))?;
                *cached = Some(account.clone());
                return Ok(account);
            }
        }
        let contact: Vec<&str> = self.spec.contact.iter().map(String::as_str).collect();
        let eab = self
            .spec
            .eab
            .as_ref()
            .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
        let (account, credentials) = builder()
            .map_err(|e| acme_failure("ACME client", e))?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.spec.directory.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| acme_failure("registering the account", e))?;
        let json = serde_json::to_string(&credentials)
            .map_err(|e| Failure::Other(format!("account credentials: {e}")))?;
        self.storage
            .save_account(&id, json)
            .await
            .map_err(Failure::Other)?;
        log::info!(
            "acme: registered account {} at {}",
            account.id(),
            self.spec.directory
        );
        *cached = Some(account.clone());
        Ok(account)
    }

    /// One order, from the account to the issued chain.
    async fn order(&self, cached: &mut Option<Account>) -> Result<Stored, Failure> {
        let account = self.account(cached).await?;
        let identifiers: Vec<Identifier> = self
            .spec
            .hosts
            .iter()
            .map(|h| Identifier::Dns(h.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| acme_failure("new order", e))?;
        let mut cleanup = Cleanup::default();
        let result = self.validate_and_finalize(&mut order, &mut cleanup).await;
        cleanup.run(self).await;
        result
    }

    async fn validate_and_finalize(
        &self,
        order: &mut instant_acme::Order,
        cleanup: &mut Cleanup,
    ) -> Result<Stored, Failure> {
        let kind = match self.spec.challenge {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let acme = self.acme.upgrade();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| acme_failure("authorization", e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Failure::Other(format!(
                        "authorization for {} is {other:?}",
                        authz.identifier()
                    )))
                }
            }
            let host = authz.identifier().to_string();
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                Failure::Other(format!(
                    "the CA offers no {} challenge for {host}",
                    self.spec.challenge.as_str()
                ))
            })?;
            let key_authorization = challenge.key_authorization();
            match self.spec.challenge {
                Challenge::Http01 => {
                    let token = challenge.token.clone();
                    if let Some(a) = &acme {
                        a.set_http01(&token, Some(key_authorization.as_str().to_string()));
                    }
                    self.storage
                        .put_http01(&token, Some(key_authorization.as_str()))
                        .await
                        .map_err(Failure::Other)?;
                    cleanup.tokens.push(token);
                }
                Challenge::TlsAlpn01 => {
                    let (key, cert_pem, key_pem) =
                        super::alpn_challenge(&host, key_authorization.digest().as_ref())
                            .map_err(Failure::Other)?;
                    self.live.set_alpn_challenge(&host, Some(key));
                    cleanup.hosts.push(host.clone());
                    if matches!(self.storage, Storage::Redis(_)) {
                        self.storage
                            .put_alpn(&host, Some((&cert_pem, &key_pem)))
                            .await
                            .map_err(Failure::Other)?;
                        tokio::time::sleep(FLEET_PROPAGATION).await;
                    }
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(|e| acme_failure(&format!("challenge for {host}"), e))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::default())
            .await
            .map_err(|e| acme_failure("waiting for validation", e))?;
        if status != OrderStatus::Ready {
            let detail = order_error(order).await;
            return Err(Failure::Other(format!("the order is {status:?}: {detail}")));
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| acme_failure("finalizing", e))?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::default())
            .await
            .map_err(|e| acme_failure("downloading the certificate", e))?;
        Ok(Stored {
            directory: self.spec.directory.clone(),
            hosts: self.spec.hosts.clone(),
            chain_pem,
            key_pem,
        })
    }
}

/// What the CA says went wrong with an order (the failed challenge's error, when it gives one).
async fn order_error(order: &mut instant_acme::Order) -> String {
    let mut details = Vec::new();
    if let Some(e) = &order.state().error {
        details.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                details.push(format!("{}: {e}", authz.identifier()));
            }
        }
    }
    if details.is_empty() {
        "no detail from the CA".to_string()
    } else {
        details.join("; ")
    }
}

/// Challenge answers to withdraw once an order is over (whatever its outcome).
#[derive(Default)]
struct Cleanup {
    tokens: Vec<String>,
    hosts: Vec<String>,
}

impl Cleanup {
    async fn run(self, task: &Task) {
        let acme = task.acme.upgrade();
        for t in &self.tokens {
            if let Some(a) = &acme {
                a.set_http01(t, None);
            }
            let _ = task.storage.put_http01(t, None).await;
        }
        for h in &self.hosts {
            task.live.set_alpn_challenge(h, None);
            let _ = task.storage.put_alpn(h, None).await;
        }
    }
}
