//! Active health checking. Owns each backend's health state, keyed by the stable id
//! (upstream name, backend address) so it survives reloads, and one probe task per backend
//! that has a check. The probe itself is pingora's `HttpHealthCheck` / `TcpHealthCheck`; this
//! module adds thresholds, the first check before traffic, and stopping probes of removed
//! backends. It never runs on the request path: requests only read an `AtomicBool`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::Backend;
use tokio::sync::watch;

use crate::metrics;
use crate::upstream::{HealthKind, HealthSpec, UpstreamSpec};

/// Health of one backend, and the attempts it is serving now. Lock-free to read.
#[derive(Debug)]
pub struct BackendState {
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Attempts on this backend that have not ended (see [`InFlight`]).
    in_flight: AtomicUsize,
    /// The passive side: the circuit breaker fed by real traffic.
    pub breaker: crate::breaker::Breaker,
}

impl BackendState {
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            breaker: crate::breaker::Breaker::default(),
        }
    }

    /// Attempts on this backend in progress now: picked and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Record one probe result; flips after `healthy_after` successes or `unhealthy_after`
    /// failures in a row. Returns `Some(new)` when the state flipped.
    pub fn observe(&self, ok: bool, spec: &HealthSpec) -> Option<bool> {
        let healthy = self.is_healthy();
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let streak = self.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if !healthy && streak >= spec.healthy_after {
                self.set_healthy(true);
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let streak = self.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && streak >= spec.unhealthy_after {
                self.set_healthy(false);
                return Some(false);
            }
        }
        None
    }
}

/// One attempt on a backend: counted in its `in_flight` from `enter` until dropped, so the
/// count cannot leak whichever way the attempt ends (another attempt, a response, an error, a
/// client that left, a panic). Holds the state itself, which outlives a reload that removes the
/// backend: the decrement always lands on the counter that was incremented.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn enter(state: &Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

type Key = (Arc<str>, SocketAddr);

struct Entry {
    state: Arc<BackendState>,
    probe: Option<Probe>,
}

struct Probe {
    spec: HealthSpec,
    stop: watch::Sender<bool>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Dropping the sender alone would also end the loop; say it explicitly.
        let _ = self.stop.send(true);
    }
}

/// Every backend's health state and probe, and every upstream's retry budget, across reloads.
#[derive(Default)]
pub struct HealthBook {
    entries: Mutex<HashMap<Key, Entry>>,
    budgets: Mutex<HashMap<Arc<str>, Arc<crate::breaker::RetryBudget>>>,
    shedders: Mutex<HashMap<(String, crate::shed::ShedSpec), Arc<crate::shed::Shedder>>>,
}

impl HealthBook {
    /// The states for `spec`'s backends, in order. Backends seen before keep their state. New
    /// backends with a health check are probed once now (concurrently, bounded by the check's
    /// timeout) and start with that result; new backends without a check start healthy.
    pub async fn states_for(&self, spec: &UpstreamSpec) -> Vec<Arc<BackendState>> {
        let mut states = Vec::with_capacity(spec.backends.len());
        let mut first_checks = Vec::new();
        {
            let entries = self.lock();
            for b in &spec.backends {
                match entries.get(&(spec.name.clone(), b.addr)) {
                    Some(entry) => states.push(Some(entry.state.clone())),
                    None => {
                        states.push(None);
                        if let Some(h) = &spec.health {
                            first_checks.push((states.len() - 1, probe_once(h, b.addr)));
                        }
                    }
                }
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, check) in first_checks {
            probes.spawn(async move { (i, check.await) });
        }
        let mut first = HashMap::new();
        while let Some(done) = probes.join_next().await {
            if let Ok((i, ok)) = done {
                first.insert(i, ok);
            }
        }
        states
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.unwrap_or_else(|| {
                    // No check configured: healthy. A first probe that could not run: unhealthy.
                    let healthy = first.get(&i).copied().unwrap_or(spec.health.is_none());
                    Arc::new(BackendState::new(healthy))
                })
            })
            .collect()
    }

    /// Make the book match the upstreams now serving: keep states of backends still present,
    /// register new ones, start, restart (check changed) or stop probes, forget removed backends.
    pub fn commit(&self, upstreams: &[(UpstreamSpec, Vec<Arc<BackendState>>)]) {
        let mut entries = self.lock();
        let mut keep: HashMap<Key, Entry> = HashMap::new();
        for (spec, states) in upstreams {
            for (b, state) in spec.backends.iter().zip(states) {
                let key = (spec.name.clone(), b.addr);
                let mut entry = entries.remove(&key).unwrap_or_else(|| Entry {
                    state: state.clone(),
                    probe: None,
                });
                entry.state = state.clone();
                let same_probe = match (&entry.probe, &spec.health) {
                    (Some(p), Some(h)) => &p.spec == h,
                    (None, None) => true,
                    _ => false,
                };
                if !same_probe {
                    entry.probe = spec
                        .health
                        .as_ref()
                        .map(|h| start_probe(h.clone(), b.addr, state.clone(), spec.name.clone()));
                }
                set_gauge(&spec.name, b.addr, state.is_healthy());
                keep.insert(key, entry);
            }
        }
        let names: std::collections::HashSet<&str> =
            upstreams.iter().map(|(s, _)| &*s.name).collect();
        self.budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| names.contains(&**name));
        // Whatever is left was removed from the config: dropping it stops its probe.
        for (name, addr) in entries.keys() {
            let _ = metrics::BACKEND_HEALTHY.remove_label_values(&[&**name, &addr.to_string()]);
        }
        let removed = entries.len();
        *entries = keep;
        if removed > 0 {
            log::info!("health: stopped probing {removed} removed backend(s)");
        }
    }

    /// The retry budget of upstream `name` (kept across reloads).
    pub fn budget_for(&self, name: &Arc<str>) -> Arc<crate::breaker::RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        budgets.entry(name.clone()).or_default().clone()
    }

    /// The shedder for `scope` with `spec` (kept across reloads while both are unchanged).
    pub fn shedder_for(
        &self,
        scope: &str,
        spec: crate::shed::ShedSpec,
    ) -> Arc<crate::shed::Shedder> {
        let mut map = self.shedders.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((scope.to_string(), spec))
            .or_insert_with(|| Arc::new(crate::shed::Shedder::new(spec)))
            .clone()
    }

    /// Forget shedders no snapshot uses any more.
    pub fn retain_shedders(&self, keep: &[(String, crate::shed::ShedSpec)]) {
        self.shedders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep.contains(k));
    }

    /// Number of running probe tasks (for tests and the admin status).
    pub fn probe_count(&self) -> usize {
        self.lock().values().filter(|e| e.probe.is_some()).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still valid.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn set_gauge(upstream: &str, addr: SocketAddr, healthy: bool) {
    metrics::BACKEND_HEALTHY
        .with_label_values(&[upstream, &addr.to_string()])
        .set(i64::from(healthy));
}

fn checker(spec: &HealthSpec, addr: SocketAddr) -> Box<dyn HealthCheck + Send + Sync> {
    match spec.kind {
        HealthKind::Tcp => {
            let mut check = TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check
        }
        HealthKind::Http => {
            let host = spec.host.clone().unwrap_or_else(|| addr.to_string());
            let mut check = HttpHealthCheck::new(&host, false);
            if let Ok(mut req) = RequestHeader::build("GET", spec.path.as_bytes(), None) {
                let _ = req.insert_header("Host", host.as_str());
                let _ = req.insert_header("User-Agent", "tollgate-health-check");
                check.req = req;
            }
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check.peer_template.options.read_timeout = Some(spec.timeout);
            check.peer_template.options.write_timeout = Some(spec.timeout);
            let expect = spec.expect_status.clone();
            check.validator = Some(Box::new(move |resp| {
                if expect.contains(&resp.status.as_u16()) {
                    Ok(())
                } else {
                    Error::e_explain(
                        ErrorType::CustomCode("unexpected status", resp.status.as_u16()),
                        "health check",
                    )
                }
            }));
            Box::new(check)
        }
    }
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: PingoraAddr::Inet(addr),
        weight: 1,
        ext: http::Extensions::new(),
    }
}

/// One probe, bounded by the check's timeout (a stalled backend cannot stall the prober).
fn probe_once(
    spec: &HealthSpec,
    addr: SocketAddr,
) -> impl std::future::Future<Output = bool> + Send + 'static {
    let check = checker(spec, addr);
    let timeout = spec.timeout;
    async move {
        let target = backend(addr);
        matches!(
            tokio::time::timeout(timeout, check.check(&target)).await,
            Ok(Ok(()))
        )
    }
}

fn start_probe(
    spec: HealthSpec,
    addr: SocketAddr,
    state: Arc<BackendState>,
    upstream: Arc<str>,
) -> Probe {
    let (stop, mut stopped) = watch::channel(false);
    let task_spec = spec.clone();
    tokio::spawn(async move {
        let check = checker(&task_spec, addr);
        let target = backend(addr);
        let mut tick = tokio::time::interval(task_spec.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first check already ran before the backend was published
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let ok = tokio::select! {
                r = tokio::time::timeout(task_spec.timeout, check.check(&target)) => matches!(r, Ok(Ok(()))),
                _ = stopped.changed() => return,
            };
            if let Some(now) = state.observe(ok, &task_spec) {
                set_gauge(&upstream, addr, now);
                let word = if now { "healthy" } else { "unhealthy" };
                log::warn!("health: upstream {upstream} backend {addr} is now {word}");
            }
        }
    });
    Probe { spec, stop }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_guards_count_until_dropped() {
        let (a, b) = (
            Arc::new(BackendState::new(true)),
            Arc::new(BackendState::new(true)),
        );
        let other_request = InFlight::enter(&a);
        let mut attempt = Some(InFlight::enter(&a));
        assert_eq!(a.in_flight(), 2);
        // A retry replaces the attempt: the count moves from a to b.
        attempt.replace(InFlight::enter(&b));
        assert_eq!((a.in_flight(), b.in_flight()), (1, 1));
        attempt.take();
        assert_eq!((a.in_flight(), b.in_flight()), (1, 0));
        drop(other_request);
        assert_eq!(a.in_flight(), 0);
    }
}
