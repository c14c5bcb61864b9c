//! The runtime snapshot: one immutable value holding compiled routes and live upstreams, shared
//! through one `ArcSwap`. A request loads it once at its start and keeps that `Arc` to its end,
//! so a reload never changes the config under a request in flight. Building a snapshot probes
//! new backends once (see `upstream::health`) and takes what must outlive it (backend states,
//! budgets, shedders) from `state::Registry`; it never mutates the snapshot that is serving.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::admission::Plan;
use crate::config::{GatewayConfig, ServerSettings, TierSpec};
use crate::identity::issued::IssuedKeys;
use crate::identity::IdentityConfig;
use crate::metrics::RouteMetrics;
use crate::route::Route;
use crate::state::Registry;
use crate::store::Store;
use crate::upstream::backend::BackendState;
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
    /// In match order.
    pub routes: Vec<RouteRuntime>,
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
    /// Metric handles for requests no route matched.
    pub unrouted_metrics: RouteMetrics,
    /// Certificates and TLS listeners of this generation.
    pub tls: Arc<crate::tls::TlsSpec>,
    /// The ACME certificates of this generation (`None`: none).
    pub acme: Option<Arc<crate::acme::Settings>>,
    /// Some ACME certificate is validated by HTTP-01: only then do requests look at their path
    /// for `/.well-known/acme-challenge/`.
    pub acme_http01: bool,
    /// The span exporter for `server.otlp` (shared by snapshots while the block is unchanged).
    #[cfg(feature = "otlp")]
    pub otlp: Option<Arc<crate::otlp::Exporter>>,
}

/// One route as this generation serves it: the compiled route, its admission plan and its
/// metric handles.
pub struct RouteRuntime {
    pub route: Route,
    pub admission: Plan,
    pub metrics: RouteMetrics,
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Build from a validated config, reusing the state of backends, budgets and shedders
    /// already in `registry` and probing new backends once. Does not publish anything.
    pub async fn build(
        mut config: GatewayConfig,
        generation: u64,
        registry: &Registry,
        shared: Option<Shared>,
    ) -> Self {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for spec in std::mem::take(&mut config.upstreams) {
            let states = registry.states_for(&spec).await;
            let budget = registry.budget_for(&spec.name);
            upstreams.push(Upstream::new(spec, states, budget));
        }
        let mut used = Vec::new();
        let gateway_shed = config.server.max_inflight.map(|spec| {
            used.push(("gateway".to_string(), spec));
            registry.shedder_for("gateway", spec)
        });
        let snapshot = Self::assemble(config, upstreams, generation, shared, |r| {
            let route_shed = r.shed.map(|spec| {
                let scope = format!("route:{}", r.name);
                used.push((scope.clone(), spec));
                registry.shedder_for(&scope, spec)
            });
            Plan::compile(r, gateway_shed.as_ref(), route_shed.as_ref())
        });
        registry.retain_shedders(&used);
        #[cfg(feature = "otlp")]
        let snapshot = Self {
            otlp: crate::otlp::exporter_for(snapshot.server.otlp.as_ref()),
            ..snapshot
        };
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
        // No listener is open yet: nothing to admit.
        Self::assemble(config, upstreams, 0, None, |_| Plan::default())
    }

    fn assemble(
        config: GatewayConfig,
        upstreams: Vec<Upstream>,
        generation: u64,
        shared: Option<Shared>,
        mut plan: impl FnMut(&Route) -> Plan,
    ) -> Self {
        let keepalive_secs = config.server.keepalive_timeout.as_secs().max(1);
        let routes_match_host = config.routes.iter().any(Route::matches_host);
        let routes = config
            .routes
            .into_iter()
            .map(|route| RouteRuntime {
                admission: plan(&route),
                metrics: RouteMetrics::new(route.name.clone()),
                route,
            })
            .collect();
        Self {
            generation,
            loaded_at: SystemTime::now(),
            server: config.server,
            routes_match_host,
            routes,
            upstreams,
            keepalive_secs,
            tiers: config.tiers,
            identity: config.identity,
            shared,
            admin_token: config.admin_token,
            limits: config.limits,
            cache: config.cache,
            unrouted_metrics: RouteMetrics::new(Arc::from("")),
            tls: config.tls,
            acme_http01: config.acme.as_ref().is_some_and(|a| {
                a.certs
                    .iter()
                    .any(|c| c.challenge == crate::acme::Challenge::Http01)
            }),
            acme: config.acme,
            #[cfg(feature = "otlp")]
            otlp: None,
        }
    }

    /// Register this snapshot's backends with the registry (start/stop probes).
    pub fn commit_health(&self, registry: &Registry) {
        let pairs: Vec<_> = self
            .upstreams
            .iter()
            .map(|u| (u.spec.clone(), u.backends.clone()))
            .collect();
        registry.commit(&pairs);
    }
}

impl crate::cache::Origin for Snapshot {
    fn cached_route(&self, index: usize) -> Option<crate::cache::CachedRoute<'_>> {
        let r = &self.routes.get(index)?.route;
        let upstream = self.upstreams.get(r.upstream)?;
        Some(crate::cache::CachedRoute {
            name: &r.name,
            policy: r.cache.as_ref(),
            upstream,
            timeouts: r.timeouts.unwrap_or(upstream.spec.timeouts),
        })
    }

    fn l2(&self) -> Option<&Arc<Store>> {
        self.shared
            .as_ref()
            .filter(|_| self.cache.redis)
            .map(|s| &s.store)
    }

    fn hide_backend_server(&self) -> bool {
        self.server.hide_backend_server
    }
}
