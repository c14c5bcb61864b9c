//! What survives a reload: the one registry of state that must outlive config generations.
//! Snapshots are rebuilt from scratch on every reload; the state here is looked up by stable ids
//! while a new snapshot is built, so health, breakers, retry budgets and shedders carry over for
//! backends, upstreams and scopes that stay. Never on the request path (requests hold `Arc`s to
//! the pieces their snapshot took from here).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::metrics;
use crate::shed::{ShedSpec, Shedder};
use crate::upstream::backend::BackendState;
use crate::upstream::breaker::RetryBudget;
use crate::upstream::health::{self, Probe};
use crate::upstream::UpstreamSpec;

type Key = (Arc<str>, SocketAddr);

struct Entry {
    state: Arc<BackendState>,
    probe: Option<Probe>,
}

/// Everything that outlives a config generation, keyed by stable ids: each backend's state
/// (health, breaker, attempts in flight) and probe by (upstream, address), each upstream's retry
/// budget by name, each shedder by (scope, spec).
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<Key, Entry>>,
    budgets: Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>,
    shedders: Mutex<HashMap<(String, ShedSpec), Arc<Shedder>>>,
}

impl Registry {
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
                            first_checks.push((states.len() - 1, health::probe_once(h, b.addr)));
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

    /// Make the registry match the upstreams now serving: keep states of backends still present,
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
                    entry.probe = spec.health.as_ref().map(|h| {
                        health::start_probe(h.clone(), b.addr, state.clone(), spec.name.clone())
                    });
                }
                health::set_gauge(&spec.name, b.addr, state.is_healthy());
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
    pub fn budget_for(&self, name: &Arc<str>) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        budgets.entry(name.clone()).or_default().clone()
    }

    /// The shedder for `scope` with `spec` (kept across reloads while both are unchanged).
    pub fn shedder_for(&self, scope: &str, spec: ShedSpec) -> Arc<Shedder> {
        let mut map = self.shedders.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((scope.to_string(), spec))
            .or_insert_with(|| Arc::new(Shedder::new(spec)))
            .clone()
    }

    /// Forget shedders no snapshot uses any more.
    pub fn retain_shedders(&self, keep: &[(String, ShedSpec)]) {
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
