//! Upstreams: the compiled spec of each named upstream and, at runtime, backend selection over
//! pingora's algorithms (weighted round robin, weighted random, Ketama consistent hashing) that
//! skips unhealthy and already-tried backends. Selection reads health through atomics only; it
//! never probes, never blocks and never allocates beyond pingora's iterator.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora_load_balancing::selection::{
    BackendIter, BackendSelection, Consistent, Random, RoundRobin,
};
use pingora_load_balancing::Backend;

pub mod backend;
pub mod breaker;
pub mod health;
mod spec;

pub use spec::{
    BackendSpec, Balance, HashKey, HealthKind, HealthSpec, Timeouts, UpstreamSpec, UpstreamTls,
};

use backend::BackendState;
use breaker::{Admit, Outcome, RetryBudget, State};

use crate::clock::MonoMs;
use crate::metrics;

/// A peer for `addr` with every timeout set (pingora's defaults are none), none longer than
/// what is `remaining` of the request's total time, and the upstream's TLS and HTTP version.
pub fn peer(
    addr: SocketAddr,
    spec: &UpstreamSpec,
    t: &Timeouts,
    remaining: Duration,
) -> pingora_core::upstreams::peer::HttpPeer {
    let mut peer = transport_peer(addr, spec.tls.as_ref(), spec.http2, spec.max_h2_streams);
    peer.options.connection_timeout = Some(t.connect.min(remaining));
    peer.options.total_connection_timeout = Some(t.connect.min(remaining));
    peer.options.read_timeout = Some(t.read.min(remaining));
    peer.options.write_timeout = Some(t.write.min(remaining));
    peer.options.idle_timeout = Some(t.idle);
    peer
}

/// A peer with the upstream's TLS settings and HTTP version, no timeouts (health checks set
/// their own).
pub fn transport_peer(
    addr: SocketAddr,
    tls: Option<&UpstreamTls>,
    http2: bool,
    max_h2_streams: usize,
) -> pingora_core::upstreams::peer::HttpPeer {
    let mut peer = match tls {
        Some(tls) => {
            // Without a name, the backend's IP is the name to verify (an IP SAN); rustls sends
            // no SNI for an IP.
            let name = if tls.sni.is_empty() {
                addr.ip().to_string()
            } else {
                tls.sni.clone()
            };
            let mut p = pingora_core::upstreams::peer::HttpPeer::new(addr, true, name);
            p.options.verify_cert = tls.verify;
            p.options.verify_hostname = tls.verify;
            p.options.ca = tls.ca.clone();
            p.client_cert_key = tls.client.clone();
            p
        }
        None => pingora_core::upstreams::peer::HttpPeer::new(addr, false, String::new()),
    };
    if http2 {
        // Over TLS: offer h2 then http/1.1 by ALPN. In plain text: h2c by prior knowledge.
        let min = if tls.is_some() { 1 } else { 2 };
        peer.options.set_http_version(2, min);
        peer.options.max_h2_streams = max_h2_streams.max(1);
    }
    peer
}

enum Selector {
    RoundRobin(Arc<RoundRobin>),
    Random(Arc<Random>),
    Consistent(Arc<Consistent>),
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend is unhealthy.
    NoneHealthy,
    /// Healthy backends exist but every one was already tried by this request.
    AllTried,
}

/// A runtime upstream: its spec, a selector built over its backends, and each backend's shared
/// health state (which outlives this snapshot).
pub struct Upstream {
    pub spec: UpstreamSpec,
    pub backends: Vec<Arc<BackendState>>,
    pub budget: Arc<RetryBudget>,
    selector: Selector,
}

impl Upstream {
    /// `states[i]` belongs to `spec.backends[i]`.
    pub fn new(
        spec: UpstreamSpec,
        states: Vec<Arc<BackendState>>,
        budget: Arc<RetryBudget>,
    ) -> Self {
        let set: BTreeSet<Backend> = spec
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut backend = Backend {
                    addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(b.addr),
                    weight: b.weight,
                    ext: http::Extensions::new(),
                };
                backend.ext.insert(i);
                backend
            })
            .collect();
        let selector = match spec.balance {
            Balance::RoundRobin => Selector::RoundRobin(Arc::new(RoundRobin::build(&set))),
            Balance::Random => Selector::Random(Arc::new(Random::build(&set))),
            Balance::ConsistentHash(_) => Selector::Consistent(Arc::new(Consistent::build(&set))),
        };
        Self {
            spec,
            backends: states,
            budget,
            selector,
        }
    }

    /// Healthy, and its breaker would let a request through.
    fn usable(&self, i: usize, now: MonoMs) -> bool {
        let b = &self.backends[i];
        b.is_healthy()
            && self
                .spec
                .breaker
                .as_ref()
                .is_none_or(|s| !b.breaker.blocks(s, now))
    }

    pub fn any_healthy(&self) -> bool {
        let now = if self.spec.breaker.is_some() {
            MonoMs::now()
        } else {
            MonoMs::default()
        };
        (0..self.backends.len()).any(|i| self.usable(i, now))
    }

    /// Seconds until an open breaker lets a probe through (for Retry-After), at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let now = MonoMs::now();
        let soonest = self
            .backends
            .iter()
            .filter(|b| b.is_healthy() && b.breaker.state() == State::Open)
            .map(|b| b.breaker.opens_in(now))
            .min();
        soonest.map_or(5, |ms| ms.div_ceil(1000).max(1))
    }

    /// Pick a usable backend not in `tried`, by the upstream's algorithm and `key` (used by
    /// consistent hashing only). Returns its index and whether it is a half-open probe.
    pub fn select(&self, key: &[u8], tried: &[u16]) -> Result<(usize, bool), NoBackend> {
        if self.backends.len() == 1 && self.spec.breaker.is_none() {
            // One backend and no breaker (a common shape): nothing to choose or to ask.
            return if !self.backends[0].is_healthy() {
                Err(NoBackend::NoneHealthy)
            } else if tried.contains(&0) {
                Err(NoBackend::AllTried)
            } else {
                Ok((0, false))
            };
        }
        let now = if self.spec.breaker.is_some() {
            MonoMs::now()
        } else {
            MonoMs::default()
        };
        let probe = std::cell::Cell::new(false);
        let accept = |i: usize| {
            if tried.contains(&(i as u16)) || !self.backends[i].is_healthy() {
                return false;
            }
            match &self.spec.breaker {
                None => true,
                Some(s) => match self.backends[i].breaker.admit(s, now) {
                    Admit::Yes => true,
                    Admit::Probe => {
                        probe.set(true);
                        if self.backends[i].breaker.take_half_opened() {
                            self.report(i, State::HalfOpen, None);
                        }
                        true
                    }
                    Admit::No => false,
                },
            }
        };
        let picked = if self.backends.len() == 1 {
            // One backend: nothing to choose between.
            accept(0).then_some(0)
        } else {
            // Enough iterations for the algorithm's own fallback order to visit every backend
            // with high probability; a linear scan below guarantees the answer either way.
            let max_iter = 8 + 2 * self.backends.len();
            match &self.selector {
                Selector::RoundRobin(s) => first_accepted(s.iter(key), max_iter, accept),
                Selector::Random(s) => first_accepted(s.iter(key), max_iter, accept),
                Selector::Consistent(s) => first_accepted(s.iter(key), max_iter, accept),
            }
            .or_else(|| (0..self.backends.len()).find(|&i| accept(i)))
        };
        match picked {
            Some(i) => Ok((i, probe.get())),
            // Told apart only now: the common path pays for one pass over the backends.
            None if !self.any_healthy() => Err(NoBackend::NoneHealthy),
            None => Err(NoBackend::AllTried),
        }
    }

    /// Is there a usable backend this request has not tried?
    pub fn has_untried(&self, tried: &[u16]) -> bool {
        let now = if self.spec.breaker.is_some() {
            MonoMs::now()
        } else {
            MonoMs::default()
        };
        (0..self.backends.len()).any(|i| !tried.contains(&(i as u16)) && self.usable(i, now))
    }

    /// Feed one attempt's outcome to backend `i`'s breaker.
    pub fn record(&self, i: usize, outcome: Outcome, probe: bool) {
        let Some(spec) = &self.spec.breaker else {
            return;
        };
        let Some(b) = self.backends.get(i) else {
            return;
        };
        let cap = ((spec.max_open_share * self.backends.len() as f64).floor() as usize).max(1);
        let may_open = || {
            self.backends
                .iter()
                .filter(|x| x.breaker.state() != State::Closed)
                .count()
                < cap
        };
        if let Some(state) = b
            .breaker
            .record(spec, outcome, probe, MonoMs::now(), may_open)
        {
            self.report(i, state, Some(outcome));
        }
    }

    /// Log and count one breaker transition of backend `i`.
    fn report(&self, i: usize, state: State, outcome: Option<Outcome>) {
        let addr = self.spec.backends[i].addr;
        let name = &self.spec.name;
        match state {
            State::Open => {
                log::warn!("breaker: upstream {name} backend {addr} opened ({outcome:?})")
            }
            State::Closed => log::warn!("breaker: upstream {name} backend {addr} closed again"),
            State::HalfOpen => {
                log::info!("breaker: upstream {name} backend {addr} half-open, probing")
            }
        }
        metrics::BREAKER_TRANSITIONS
            .with_label_values(&[&**name, state.as_str()])
            .inc();
        metrics::BREAKER_STATE
            .with_label_values(&[&**name, &addr.to_string()])
            .set(state as i64);
    }
}

fn first_accepted(
    mut iter: impl BackendIter,
    max_iter: usize,
    accept: impl Fn(usize) -> bool,
) -> Option<usize> {
    for _ in 0..max_iter {
        let backend = iter.next()?;
        let index = *backend.ext.get::<usize>()?;
        if accept(index) {
            return Some(index);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use breaker::BudgetSpec;

    fn spec(balance: Balance, weights: &[usize]) -> UpstreamSpec {
        UpstreamSpec {
            name: "u".into(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| BackendSpec {
                    addr: format!("127.0.0.1:{}", 4000 + i).parse().expect("addr"),
                    weight,
                })
                .collect(),
            balance,
            health: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                read: Duration::from_secs(1),
                write: Duration::from_secs(1),
                total: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
            attempts: 2,
            retry_on: vec![502, 503, 504],
            budget: BudgetSpec {
                ratio: 0.2,
                min_per_sec: 3,
                window: Duration::from_secs(10),
            },
            backoff: Duration::from_millis(1),
            backoff_max: Duration::from_millis(10),
            breaker: None,
            tls: None,
            http2: false,
            max_h2_streams: 1,
        }
    }

    fn upstream(balance: Balance, weights: &[usize]) -> Upstream {
        let s = spec(balance, weights);
        let states = s
            .backends
            .iter()
            .map(|_| Arc::new(BackendState::new(true)))
            .collect();
        Upstream::new(s, states, Arc::default())
    }

    #[test]
    fn round_robin_is_even_and_weights_hold() {
        let u = upstream(Balance::RoundRobin, &[1, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[u.select(b"", &[]).expect("pick").0] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        let u = upstream(Balance::RoundRobin, &[3, 1]);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[u.select(b"", &[]).expect("pick").0] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn skips_unhealthy_and_tried() {
        let u = upstream(Balance::Random, &[1, 1, 1]);
        u.backends[1].set_healthy(false);
        for _ in 0..100 {
            let (i, _) = u.select(b"", &[0]).expect("pick");
            assert_eq!(i, 2);
        }
        assert_eq!(u.select(b"", &[0, 2]), Err(NoBackend::AllTried));
        for b in &u.backends {
            b.set_healthy(false);
        }
        assert_eq!(u.select(b"", &[]), Err(NoBackend::NoneHealthy));
    }

    #[test]
    fn consistent_hash_is_stable_and_falls_over() {
        let u = upstream(Balance::ConsistentHash(HashKey::Path), &[1, 1, 1, 1]);
        let (first, _) = u.select(b"user-42", &[]).expect("pick");
        for _ in 0..10 {
            assert_eq!(u.select(b"user-42", &[]), Ok((first, false)));
        }
        u.backends[first].set_healthy(false);
        let (second, _) = u.select(b"user-42", &[]).expect("pick");
        assert_ne!(second, first);
    }

    #[test]
    fn hash_key_parsing() {
        assert_eq!(HashKey::parse("client_ip"), Ok(HashKey::ClientIp));
        assert!(matches!(
            HashKey::parse("header:X-User"),
            Ok(HashKey::Header(_))
        ));
        assert!(HashKey::parse("header:bad name").is_err());
        assert!(HashKey::parse("cookie").is_err());
    }
}
