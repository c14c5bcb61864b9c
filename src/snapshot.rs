//! The runtime snapshot: one immutable value holding compiled routes and live upstreams, shared
//! through one `ArcSwap`. A request loads it once at its start and keeps that `Arc` to its end,
//! so a reload never changes the config under a request in flight. Building a snapshot probes
//! new backends once (see `health`); it never mutates the snapshot that is serving.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{GatewayConfig, ServerSettings, TierSpec};
use crate::health::{BackendState, HealthBook};
use crate::identity::issued::IssuedKeys;
use crate::identity::IdentityConfig;
use crate::route::Route;
use crate::shed::Shedder;
use crate::store::Store;
use crate::upstream::Upstream;

/// The Redis-backed parts a snapshot uses; they outlive snapshots (see `control`).
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<Store>,
    pub issued: Arc<IssuedKeys>,
}

pub struct Snapshot {
    /// Increases by one with every successful load (1 = the config the process started with).
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub server: ServerSettings,
    pub routes: Vec<Route>,
    /// Some route matches on the host: only then is the request's host normalised for routing.
    pub routes_match_host: bool,
    pub upstreams: Vec<Upstream>,
    /// `server.keepalive_timeout` in whole seconds, as pingora wants it.
    pub keepalive_secs: u64,
    pub tiers: Vec<TierSpec>,
    pub identity: Arc<IdentityConfig>,
    pub shared: Option<Shared>,
    pub admin_token: Option<String>,
    pub limits: crate::limit::Settings,
    /// Response cache settings (the cache itself outlives snapshots: `Control::cache`).
    pub cache: crate::cache::Settings,
    /// Per route (same order as `routes`): its in-flight limiter.
    pub route_shed: Vec<Option<Arc<Shedder>>>,
    pub global_shed: Option<Arc<Shedder>>,
    /// Per route (same order as `routes`), then one for requests no route matched.
    pub route_metrics: Vec<crate::metrics::RouteMetrics>,
    /// The span exporter for `server.otlp` (shared by snapshots while the block is unchanged).
    #[cfg(feature = "otlp")]
    pub otlp: Option<Arc<crate::otlp::Exporter>>,
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Build from a validated config, reusing the health state of backends already known to
    /// `book` and probing new ones once. Does not publish anything.
    pub async fn build(
        mut config: GatewayConfig,
        generation: u64,
        book: &HealthBook,
        shared: Option<Shared>,
    ) -> Self {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for spec in std::mem::take(&mut config.upstreams) {
            let states = book.states_for(&spec).await;
            let budget = book.budget_for(&spec.name);
            upstreams.push(Upstream::new(spec, states, budget));
        }
        let mut snapshot = Self::assemble(config, upstreams, generation, shared);
        let mut used = Vec::new();
        snapshot.route_shed = snapshot
            .routes
            .iter()
            .map(|r| {
                r.shed.map(|spec| {
                    let scope = format!("route:{}", r.name);
                    used.push((scope.clone(), spec));
                    book.shedder_for(&scope, spec)
                })
            })
            .collect();
        snapshot.global_shed = snapshot.server.max_inflight.map(|spec| {
            used.push(("gateway".to_string(), spec));
            book.shedder_for("gateway", spec)
        });
        book.retain_shedders(&used);
        #[cfg(feature = "otlp")]
        {
            snapshot.otlp = crate::otlp::exporter_for(snapshot.server.otlp.as_ref());
        }
        snapshot
    }

    /// A snapshot whose backends have not been probed yet (used only before the first
    /// health pass, while no listener is open).
    pub fn unprobed(mut config: GatewayConfig) -> Self {
        let upstreams = std::mem::take(&mut config.upstreams)
            .into_iter()
            .map(|spec| {
                let states = spec
                    .backends
                    .iter()
                    .map(|_| Arc::new(BackendState::new(false)))
                    .collect();
                Upstream::new(spec, states, Arc::default())
            })
            .collect();
        Self::assemble(config, upstreams, 0, None)
    }

    fn assemble(
        config: GatewayConfig,
        upstreams: Vec<Upstream>,
        generation: u64,
        shared: Option<Shared>,
    ) -> Self {
        let keepalive_secs = config.server.keepalive_timeout.as_secs().max(1);
        let route_metrics = config
            .routes
            .iter()
            .map(|r| crate::metrics::RouteMetrics::new(r.name.clone()))
            .chain(std::iter::once(crate::metrics::RouteMetrics::new(
                Arc::from(""),
            )))
            .collect();
        Self {
            generation,
            loaded_at: SystemTime::now(),
            server: config.server,
            routes_match_host: config.routes.iter().any(Route::matches_host),
            routes: config.routes,
            upstreams,
            keepalive_secs,
            tiers: config.tiers,
            identity: config.identity,
            shared,
            admin_token: config.admin_token,
            limits: config.limits,
            cache: config.cache,
            route_shed: Vec::new(),
            global_shed: None,
            route_metrics,
            #[cfg(feature = "otlp")]
            otlp: None,
        }
    }

    /// Register this snapshot's backends with the health book (start/stop probes).
    pub fn commit_health(&self, book: &HealthBook) {
        let pairs: Vec<_> = self
            .upstreams
            .iter()
            .map(|u| (u.spec.clone(), u.backends.clone()))
            .collect();
        book.commit(&pairs);
    }
}
