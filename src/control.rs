//! The control plane: a pingora background service that publishes the first snapshot (after the
//! first health pass, before any listener opens), then reloads on SIGHUP or on an admin request:
//! read -> parse -> validate -> build (probe new backends) -> one atomic swap. A failed reload
//! logs every error, is counted, and leaves the serving snapshot untouched. Reloads are
//! serialised here, and every long-lived task (health probes) runs on this service's runtime.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::{ExecutionPhase, ShutdownWatch};
use pingora_core::services::background::BackgroundService;
use pingora_core::services::ServiceReadyNotifier;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, ConfigError, GatewayConfig};
use crate::identity::issued::IssuedKeys;
use crate::limit::Limiter;
use crate::metrics;
use crate::snapshot::{Shared, SharedSnapshot, Snapshot};
use crate::state::Registry;
use crate::store::{Store, StoreSpec};

/// The result of one reload attempt, as the admin API and logs report it.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub generation: u64,
    /// Unix seconds.
    pub at: u64,
    pub errors: Vec<String>,
    /// Settings that changed but only take effect through a binary upgrade (`tollgate -u`).
    pub warnings: Vec<String>,
}

pub struct Control {
    pub path: PathBuf,
    pub current: SharedSnapshot,
    pub registry: Registry,
    pub started_at: SystemTime,
    pub pid_file: Option<String>,
    /// Set by a SIGHUP that arrived before the control loop was listening.
    pub early_hup: Arc<AtomicBool>,
    /// `--watch`: reload when the config file changes (also `server.watch_config`).
    pub watch_flag: AtomicBool,
    /// Set once the process starts handing over to a new binary or shutting down: responses
    /// then carry `Connection: close`, so clients leave this process's keep-alive connections
    /// after their current request instead of racing its exit on an idle one.
    pub draining: Arc<AtomicBool>,
    /// Rate-limit state (outlives snapshots).
    pub limiter: Arc<Limiter>,
    /// The response cache (outlives snapshots; its capacity follows the config).
    pub cache: Arc<crate::cache::ResponseCache>,
    /// What the connection front end reads per request (follows every published snapshot).
    pub front: Arc<crate::front::FrontSettings>,
    /// The TLS listeners' acceptors (follow every published snapshot).
    pub tls: Arc<crate::tls::Acceptors>,
    /// ACME: the certificates' tasks and challenge answers (follow every published snapshot).
    pub acme: Arc<crate::acme::Acme>,
    /// The gRPC-web module was installed at start (see `proxy::Gateway::grpc_web`).
    pub grpc_web_installed: bool,
    phases: Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
    initial: Mutex<Option<GatewayConfig>>,
    redis: Mutex<Option<RedisHandle>>,
    last: Mutex<Option<ReloadOutcome>>,
    history: Mutex<std::collections::VecDeque<ReloadOutcome>>,
    requests: mpsc::Sender<oneshot::Sender<ReloadOutcome>>,
    inbox: Mutex<Option<mpsc::Receiver<oneshot::Sender<ReloadOutcome>>>>,
}

impl Control {
    pub fn new(path: PathBuf, config: GatewayConfig, early_hup: Arc<AtomicBool>) -> Arc<Self> {
        let (requests, inbox) = mpsc::channel(16);
        let unprobed = Snapshot::unprobed(config.clone());
        let front = Arc::new(crate::front::FrontSettings::default());
        follow_front(&front, &unprobed);
        let tls = Arc::new(crate::tls::Acceptors::new(&config.tls));
        Arc::new(Self {
            grpc_web_installed: config.routes.iter().any(|r| r.grpc_web),
            tls,
            acme: Arc::new(crate::acme::Acme::default()),
            pid_file: config.server.pid_file.clone(),
            path,
            current: Arc::new(ArcSwap::from_pointee(unprobed)),
            front,
            registry: Registry::default(),
            started_at: SystemTime::now(),
            early_hup,
            watch_flag: AtomicBool::new(false),
            draining: Arc::new(AtomicBool::new(false)),
            limiter: Arc::new(Limiter::default()),
            cache: Arc::new(crate::cache::ResponseCache::new(config.cache.max_bytes)),
            phases: Mutex::new(None),
            initial: Mutex::new(Some(config)),
            redis: Mutex::new(None),
            last: Mutex::new(None),
            history: Mutex::new(std::collections::VecDeque::new()),
            requests,
            inbox: Mutex::new(Some(inbox)),
        })
    }

    /// Give the control plane pingora's lifecycle phases (to start draining on upgrade/stop).
    pub fn watch_phases(&self, rx: tokio::sync::broadcast::Receiver<ExecutionPhase>) {
        *self.phases.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    }

    /// Ask the control plane to reload and wait for the outcome (used by `POST /admin/reload`).
    pub async fn request_reload(&self) -> Option<ReloadOutcome> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.ok()?;
        rx.await.ok()
    }

    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The most recent reload attempts, newest first (at most 20).
    pub fn reload_history(&self) -> Vec<ReloadOutcome> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// The shared Redis parts for `spec`: kept across reloads while the spec is unchanged;
    /// replaced (and the old revocation feed stopped) when it changes; dropped when removed.
    fn shared_for(&self, spec: Option<&StoreSpec>) -> Option<Shared> {
        let mut current = self.redis.lock().unwrap_or_else(|p| p.into_inner());
        match (spec, current.as_ref()) {
            (None, _) => {
                *current = None;
                None
            }
            (Some(s), Some(h)) if &h.spec == s => Some(h.shared.clone()),
            (Some(s), _) => match Store::new(s.clone()) {
                Ok(store) => {
                    let store = Arc::new(store);
                    let issued = Arc::new(IssuedKeys::new(store.clone()));
                    let (stop, stopped) = watch::channel(false);
                    tokio::spawn(issued.clone().follow_revocations(stopped.clone()));
                    tokio::spawn(limiter_tasks(
                        self.limiter.clone(),
                        self.cache.clone(),
                        store.clone(),
                        self.current.clone(),
                        stopped,
                    ));
                    let shared = Shared { store, issued };
                    *current = Some(RedisHandle {
                        spec: s.clone(),
                        shared: shared.clone(),
                        _stop: stop,
                    });
                    Some(shared)
                }
                Err(e) => {
                    log::error!("redis disabled: {e}");
                    *current = None;
                    None
                }
            },
        }
    }

    async fn publish_initial(&self) {
        let initial = self
            .initial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(config) = initial {
            let shared = self.shared_for(config.redis.as_ref());
            let snapshot = Snapshot::build(config, 1, &self.registry, shared).await;
            snapshot.commit_health(&self.registry);
            metrics::CONFIG_GENERATION.set(1);
            self.limiter.nodes.live.store(
                snapshot.limits.assume_nodes,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.cache.set_capacity(snapshot.cache.max_bytes);
            follow_front(&self.front, &snapshot);
            follow_acme(&self.acme, &snapshot);
            follow_tls(&self.tls, &self.acme, &snapshot);
            self.current.store(Arc::new(snapshot));
            log::info!("config generation 1 loaded from {}", self.path.display());
        }
    }

    /// One reload: the whole pipeline, or nothing.
    async fn reload(&self) -> ReloadOutcome {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .unwrap_or_else(|e| {
                Err(vec![ConfigError {
                    file: self.path.clone(),
                    line: 0,
                    column: 0,
                    field: String::new(),
                    message: format!("loader failed: {e}"),
                }])
            });
        let old = self.current.load_full();
        // logrotate: the access log file is reopened at every reload (SIGHUP).
        crate::access_log::reopen();
        let outcome = match loaded {
            Err(errors) => {
                for e in &errors {
                    log::error!("reload rejected: {e}");
                }
                metrics::CONFIG_RELOADS.with_label_values(&["error"]).inc();
                ReloadOutcome {
                    ok: false,
                    generation: old.generation,
                    at,
                    errors: errors.iter().map(ToString::to_string).collect(),
                    warnings: Vec::new(),
                }
            }
            Ok(config) => {
                let mut warnings = needs_upgrade(&old.server, &config.server);
                if config.routes.iter().any(|r| r.grpc_web) && !self.grpc_web_installed {
                    warnings.push(
                        "routes[].grpc_web: the gRPC-web bridge is installed at start when a \
                         route uses it; takes effect after a binary upgrade (tollgate -u)"
                            .to_string(),
                    );
                }
                for w in &warnings {
                    log::warn!("reload: {w}");
                }
                let generation = old.generation + 1;
                let shared = self.shared_for(config.redis.as_ref());
                let snapshot = Snapshot::build(config, generation, &self.registry, shared).await;
                self.cache.set_capacity(snapshot.cache.max_bytes);
                follow_front(&self.front, &snapshot);
                follow_acme(&self.acme, &snapshot);
                follow_tls(&self.tls, &self.acme, &snapshot);
                self.current.store(Arc::new(snapshot));
                // Probes follow the published snapshot: removed backends stop being checked.
                self.current.load().commit_health(&self.registry);
                metrics::CONFIG_RELOADS.with_label_values(&["ok"]).inc();
                metrics::CONFIG_GENERATION.set(generation as i64);
                log::info!(
                    "config generation {generation} loaded from {}",
                    self.path.display()
                );
                ReloadOutcome {
                    ok: true,
                    generation,
                    at,
                    errors: Vec::new(),
                    warnings,
                }
            }
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == 20 {
            history.pop_front();
        }
        history.push_back(outcome.clone());
        drop(history);
        outcome
    }
}

/// Read the cluster-wide cache purge epoch (each second, with the heartbeat).
/// Hand the connection front end the values it reads per connection from a snapshot about to be
/// published.
fn follow_front(front: &crate::front::FrontSettings, s: &Snapshot) {
    crate::access_log::set_flush_interval(s.server.access_log_flush);
    front.follow(
        s.keepalive_secs,
        s.server.max_header_bytes,
        s.server.max_uri_bytes,
    );
}

/// The ACME certificates of a snapshot about to be published: attached to their running state
/// (tasks started for new ones, stopped for removed ones).
fn follow_acme(acme: &Arc<crate::acme::Acme>, s: &Snapshot) {
    let redis = s.shared.as_ref().map(|sh| sh.store.clone());
    acme.follow(s.acme.as_deref(), redis);
}

/// New handshakes take the new generation's certificates; the expiry gauges follow, and a
/// certificate close to its end is logged.
fn follow_tls(acceptors: &crate::tls::Acceptors, acme: &crate::acme::Acme, s: &Snapshot) {
    acceptors.follow(&s.tls);
    metrics::TLS_CERT_EXPIRY.reset();
    for c in &s.tls.certificates {
        metrics::TLS_CERT_EXPIRY
            .with_label_values(&[c.name.as_str()])
            .set(c.not_after);
    }
    for a in acme.statuses() {
        if let Some(t) = a.not_after {
            metrics::TLS_CERT_EXPIRY
                .with_label_values(&[a.name.as_str()])
                .set(t);
        }
    }
    warn_expiring(s);
}

/// Log a warning for each served certificate with less than 14 days left.
fn warn_expiring(s: &Snapshot) {
    let now = crate::clock::UnixMs::now().0 as i64 / 1000;
    for c in &s.tls.certificates {
        let left = c.not_after - now;
        if left < crate::tls::EXPIRY_WARNING_SECS {
            log::warn!(
                "certificate {:?} ({}) expires in {} days {} hours: renew it",
                c.name,
                c.cert_file.display(),
                left / 86_400,
                (left % 86_400) / 3600
            );
        }
    }
}

async fn follow_cache_epoch(cache: &crate::cache::ResponseCache, store: &Store) {
    let epoch = store
        .call("cache_epoch", |mut c| async move {
            redis::cmd("GET")
                .arg(crate::cache::EPOCH_KEY)
                .query_async::<Option<u64>>(&mut c)
                .await
        })
        .await;
    if let Ok(epoch) = epoch {
        cache.observe_epoch(epoch.unwrap_or(0));
    }
}

/// Purge the cache: this node's L1 at once and, with a Redis L2, every node's (the epoch moves:
/// other nodes follow within a second). Returns this node's purged entries and whether the
/// cluster-wide purge reached Redis.
pub async fn purge_cache(control: &Control) -> (usize, Option<bool>) {
    let purged = control.cache.purge();
    let snap = control.current.load_full();
    let shared = snap.shared.as_ref().filter(|_| snap.cache.redis);
    let cluster = match shared {
        Some(shared) => {
            let r = shared
                .store
                .call("cache_purge", |mut c| async move {
                    redis::cmd("INCR")
                        .arg(crate::cache::EPOCH_KEY)
                        .query_async::<u64>(&mut c)
                        .await
                })
                .await;
            if let Ok(epoch) = r {
                control.cache.observe_epoch(epoch);
            }
            Some(r.is_ok())
        }
        None => None,
    };
    (purged, cluster)
}

/// The limiter's Redis chores while a Redis spec is in use: the node heartbeat (every second)
/// and, in batched mode, the delta sync (every `rate_limit.sync_interval`).
async fn limiter_tasks(
    limiter: Arc<Limiter>,
    cache: Arc<crate::cache::ResponseCache>,
    store: Arc<Store>,
    current: SharedSnapshot,
    mut stop: watch::Receiver<bool>,
) {
    let beat = Duration::from_secs(1);
    let mut next_beat = tokio::time::Instant::now();
    loop {
        let settings = current.load().limits.clone();
        let now = tokio::time::Instant::now();
        if now >= next_beat {
            let _ = limiter.nodes.heartbeat(&store, beat).await;
            if current.load().cache.redis {
                follow_cache_epoch(&cache, &store).await;
            }
            next_beat = now + beat;
        }
        let wait = if settings.mode == crate::limit::Mode::Batched {
            let now_ms = crate::clock::UnixMs::now().0;
            let _ = limiter.batched.sync(&store, now_ms).await;
            settings.sync_interval
        } else {
            next_beat.saturating_duration_since(tokio::time::Instant::now())
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.min(beat)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The Redis connection and revocation feed for one Redis spec.
struct RedisHandle {
    spec: StoreSpec,
    shared: Shared,
    /// Dropping it stops the revocation feed.
    _stop: watch::Sender<bool>,
}

/// Listener and process settings cannot change in a running process.
fn needs_upgrade(old: &config::ServerSettings, new: &config::ServerSettings) -> Vec<String> {
    let mut w = Vec::new();
    let mut check = |changed: bool, what: &str| {
        if changed {
            w.push(format!(
                "server.{what} changed: takes effect after a binary upgrade (tollgate -u), not on reload"
            ));
        }
    };
    check(old.listen != new.listen, "listen");
    check(old.listen_tls != new.listen_tls, "listen_tls addresses");
    check(old.admin_listen != new.admin_listen, "admin_listen");
    check(old.threads != new.threads, "threads");
    check(old.h2c != new.h2c, "h2c");
    check(old.pid_file != new.pid_file, "pid_file");
    check(old.upgrade_sock != new.upgrade_sock, "upgrade_sock");
    check(old.grace_period != new.grace_period, "grace_period");
    check(old.header_timeout != new.header_timeout, "header_timeout");
    w
}

/// How often a watched config file is looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What identifies one version of the config file: the file the path leads to (through any
/// symlinks, so a ConfigMap's swap of its `..data` link is a change) and its size and mtime
/// (an edit in place).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileVersion {
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// `--watch` / `server.watch_config`: a reload when the file changes, once the change has held
/// for two looks in a row (an editor's or a deployment's write in several steps is one reload).
/// Polled (a `stat` four times a second) rather than through inotify: a symlink swapped above
/// the file, as Kubernetes does, is seen the same way, and nothing is registered per watch.
/// A version that failed to load is not retried until the file changes again.
struct FileWatch {
    loaded: Option<FileVersion>,
    pending: Option<FileVersion>,
}

impl FileWatch {
    fn new(path: &std::path::Path) -> Self {
        Self {
            loaded: FileVersion::of(path),
            pending: None,
        }
    }

    /// True when the file has changed and the change has held since the last look.
    fn changed(&mut self, path: &std::path::Path) -> bool {
        let Some(now) = FileVersion::of(path) else {
            // Gone for a moment (mid-swap): look again next time.
            self.pending = None;
            return false;
        };
        if self.loaded.as_ref() == Some(&now) {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() == Some(&now) {
            self.loaded = Some(now);
            self.pending = None;
            return true;
        }
        self.pending = Some(now);
        false
    }
}

/// The background service wrapper (pingora owns it; `Control` is shared with the proxy/admin).
pub struct ControlService(pub Arc<Control>);

#[async_trait]
impl BackgroundService for ControlService {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        use tokio::signal::unix::{signal, SignalKind};
        let control = &self.0;
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP ({e}); reload only through the admin API");
                None
            }
        };
        let phases = control
            .phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut phases) = phases {
            let draining = control.draining.clone();
            tokio::spawn(async move {
                while let Ok(phase) = phases.recv().await {
                    if matches!(
                        phase,
                        ExecutionPhase::GracefulUpgradeTransferringFds
                            | ExecutionPhase::GracefulUpgradeCloseTimeout
                            | ExecutionPhase::GracefulTerminate
                            | ExecutionPhase::ShutdownStarted
                    ) {
                        log::info!(
                            "draining: keep-alive connections close after their current request"
                        );
                        draining.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        control.publish_initial().await;
        if let Some(pid_file) = &control.pid_file {
            // pingora writes it only when daemonized; operators expect it either way.
            if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
                log::warn!("cannot write pid file {pid_file}: {e}");
            }
        }
        ready.notify_ready();
        let Some(mut inbox) = control
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if control.early_hup.swap(false, Ordering::SeqCst) {
            control.reload().await;
        }
        // Certificates close to their end are logged at each load and twice a day.
        let mut expiry_check = tokio::time::interval(Duration::from_secs(12 * 3600));
        expiry_check.tick().await;
        let mut watch = FileWatch::new(&control.path);
        let mut watch_tick = tokio::time::interval(WATCH_INTERVAL);
        watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup_recv => {
                    log::info!("SIGHUP: reloading {}", control.path.display());
                    control.early_hup.store(false, Ordering::SeqCst);
                    control.reload().await;
                    watch = FileWatch::new(&control.path);
                }
                Some(reply) = inbox.recv() => {
                    let outcome = control.reload().await;
                    watch = FileWatch::new(&control.path);
                    let _ = reply.send(outcome);
                }
                _ = expiry_check.tick() => warn_expiring(&control.current.load()),
                _ = watch_tick.tick() => {
                    let watching = control.watch_flag.load(Ordering::Relaxed)
                        || control.current.load().server.watch_config;
                    if watching && watch.changed(&control.path) {
                        log::info!("config file changed: reloading {}", control.path.display());
                        control.reload().await;
                    }
                }
                _ = shutdown.changed() => {
                    // What the access log holds is written before the process ends.
                    let _ = tokio::task::spawn_blocking(|| {
                        crate::access_log::flush(Duration::from_secs(2))
                    })
                    .await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FileWatch;

    #[test]
    fn a_change_reloads_once_it_has_held_and_a_symlink_swap_is_a_change() {
        let dir = tempfile::tempdir().expect("dir");
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        std::fs::create_dir(&v1).expect("v1");
        std::fs::create_dir(&v2).expect("v2");
        std::fs::write(v1.join("t.yaml"), "one").expect("write");
        std::fs::write(v2.join("t.yaml"), "two!").expect("write");
        let link = dir.path().join("t.yaml");
        std::os::unix::fs::symlink(v1.join("t.yaml"), &link).expect("link");
        let mut w = FileWatch::new(&link);
        assert!(!w.changed(&link), "nothing changed");
        // Swap the link atomically (a new link renamed over the old one).
        let tmp = dir.path().join("t.yaml.new");
        std::os::unix::fs::symlink(v2.join("t.yaml"), &tmp).expect("link");
        std::fs::rename(&tmp, &link).expect("swap");
        assert!(!w.changed(&link), "first look: pending");
        assert!(w.changed(&link), "second look: reload");
        assert!(!w.changed(&link), "once");
        // An edit in place (another size).
        std::fs::write(v2.join("t.yaml"), "three").expect("write");
        assert!(!w.changed(&link));
        assert!(w.changed(&link));
        // Gone for a moment: nothing, then back as it was: nothing.
        std::fs::remove_file(&link).expect("rm");
        assert!(!w.changed(&link));
        std::os::unix::fs::symlink(v2.join("t.yaml"), &link).expect("link");
        assert!(!w.changed(&link));
        assert!(!w.changed(&link));
    }
}
