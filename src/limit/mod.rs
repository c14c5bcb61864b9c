//! Rate limiting per tier. Owns the policy of a request (the caller's tier, the route's
//! overrides, the limit key), the decision in the configured mode — `exact` (one atomic Redis
//! script per request), `batched` (local decisions, deltas synced in the background), `local`
//! (in-process) — and the fallback when Redis fails (`on_failure: local | allow | deny`, local
//! limits divided by the live node count). It returns a decision and the header values; it
//! never answers the client itself. State lives outside snapshots, keyed by (scope, tier,
//! window, key), so a reload keeps the counters of unchanged policies.

pub mod algo;
pub mod local;
pub mod shared;

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use algo::{Algo, Decision};

use crate::clock::UnixMs;
use crate::http::fields::{self, Field};
use crate::identity::{Identity, TierId};
use crate::metrics;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exact,
    Batched,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Local,
    Allow,
    Deny,
}

/// The global settings (`rate_limit:` at the top of the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub sync_interval: Duration,
    pub on_failure: OnFailure,
    pub assume_nodes: usize,
    /// Exact mode: most requests of one caller per script call.
    pub exact_batch: usize,
}

/// What the limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// The consumer id; anonymous callers by client IP.
    Consumer,
    Ip,
    /// A request header's value (absent: the client IP).
    Header(HeaderName),
    /// The consumer (or client IP) per route: counters are not shared with other routes.
    RouteConsumer,
}

/// A route's compiled policy.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub enabled: bool,
    pub key: KeyKind,
    /// Counter namespace: `t` for the shared tier limits, `r:<route>` for route overrides.
    pub scope: Arc<str>,
    /// Per tier index: the limit, or `None` for unlimited.
    pub per_tier: Arc<[Option<Algo>]>,
    /// Per tier index: its decision counters and fixed response fields, made on first use.
    pub per_tier_cache: Arc<[PerTier]>,
}

/// What a route policy keeps per tier, made on first use: its
/// `tollgate_ratelimit_decisions_total` children (allowed, limited, unavailable), looked up once
/// instead of by label on every request, and the response fields that only depend on the policy.
#[derive(Debug, Default)]
pub struct PerTier {
    counters: [std::sync::OnceLock<prometheus::IntCounter>; 3],
    fields: std::sync::OnceLock<PolicyFields>,
}

impl PerTier {
    /// One per tier, for a route policy.
    pub fn for_tiers(tiers: usize) -> Arc<[PerTier]> {
        (0..tiers).map(|_| PerTier::default()).collect()
    }
}

/// `RateLimit-Policy` and `X-RateLimit-Limit` for one (limit, window): the same on every
/// response of a tier, so made once and shared.
#[derive(Debug, Clone)]
struct PolicyFields {
    limit: u64,
    window_s: u64,
    policy: HeaderValue,
    limit_value: HeaderValue,
}

impl PolicyFields {
    fn new(tier: &str, limit: u64, window_s: u64) -> Self {
        Self {
            limit,
            window_s,
            policy: field_value(structured(tier, "q=", limit, "w=", window_s).0),
            limit_value: HeaderValue::from(limit),
        }
    }
}

/// `"tier";a=X;b=Y`, an RFC 8941 item with two parameters, assembled without the formatting
/// machinery, with where X and Y are in it. Tier names are validated tokens, so the value is
/// always a valid field value.
fn structured(
    tier: &str,
    a: &str,
    x: u64,
    b: &str,
    y: u64,
) -> (bytes::Bytes, std::ops::Range<usize>, std::ops::Range<usize>) {
    let (mut xs, mut ys) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (x, y) = (xs.format(x), ys.format(y));
    let mut v =
        bytes::BytesMut::with_capacity(tier.len() + a.len() + b.len() + x.len() + y.len() + 4);
    for part in ["\"", tier, "\";", a, x, ";", b, y] {
        v.extend_from_slice(part.as_bytes());
    }
    let x_at = tier.len() + 3 + a.len();
    let y_at = x_at + x.len() + 1 + b.len();
    (v.freeze(), x_at..x_at + x.len(), y_at..y_at + y.len())
}

fn field_value(b: bytes::Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(b).unwrap_or(HeaderValue::from_static(""))
}

const RESULTS: [&str; 3] = ["allowed", "limited", "unavailable"];

/// Count one decision (`result` indexes `RESULTS`) for tier `tier` named `name`.
fn count_decision(policy: &RoutePolicy, tier: TierId, name: &str, result: usize) {
    let counter = |r: usize| metrics::RATE_LIMIT_DECISIONS.with_label_values(&[name, RESULTS[r]]);
    match policy.per_tier_cache.get(tier) {
        Some(c) => c.counters[result].get_or_init(|| counter(result)).inc(),
        None => counter(result).inc(),
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No limit applies (disabled, or an unlimited tier).
    Unlimited,
    /// A decision; `limit`/`window_s` describe the policy for the headers.
    Decided {
        decision: Decision,
        limit: u64,
        window_s: u64,
        tier: TierId,
    },
    /// Redis failed and `on_failure: deny`.
    Unavailable,
}

/// The limiter: in-process state and Redis helpers, shared by every snapshot.
pub struct Limiter {
    pub local: local::LocalLimiter,
    pub batched: shared::Batched,
    pub nodes: shared::Nodes,
    pub coalescer: Arc<shared::Coalescer>,
    fallback: AtomicBool,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            local: local::LocalLimiter::default(),
            batched: shared::Batched::default(),
            nodes: shared::Nodes::new(1),
            coalescer: Arc::default(),
            fallback: AtomicBool::new(false),
        }
    }
}

/// Hash of everything that identifies a counter.
fn counter_hash(scope: &str, tier: &str, algo: &Algo, key: &KeyBytes<'_>) -> u64 {
    // foldhash with a per-process random seed: fast, and callers cannot aim collisions.
    static SEED: std::sync::LazyLock<foldhash::fast::RandomState> =
        std::sync::LazyLock::new(foldhash::fast::RandomState::default);
    let mut h = std::hash::BuildHasher::build_hasher(&*SEED);
    scope.hash(&mut h);
    tier.hash(&mut h);
    window_of(algo).hash(&mut h);
    matches!(algo, Algo::Gcra { .. }).hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn window_of(algo: &Algo) -> u64 {
    match algo {
        Algo::SlidingWindow { window_ms, .. } | Algo::Gcra { window_ms, .. } => *window_ms,
    }
}

/// The window in whole seconds, as the fields give it.
fn window_s_of(algo: &Algo) -> u64 {
    window_of(algo).div_ceil(1000).max(1)
}

fn limit_of(algo: &Algo) -> u64 {
    match algo {
        Algo::SlidingWindow { limit, .. } => *limit,
        Algo::Gcra { burst, .. } => *burst,
    }
}

/// The caller's key, borrowed where possible.
#[derive(Hash)]
enum KeyBytes<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
    Ip(IpAddr),
}

impl KeyBytes<'_> {
    fn render(&self) -> String {
        match self {
            Self::Text(t) => (*t).to_string(),
            Self::Bytes(b) => hex::encode(b),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// Divide a limit among `nodes` (never below 1).
fn share(algo: Algo, nodes: usize) -> Algo {
    let n = nodes.max(1) as u64;
    match algo {
        Algo::SlidingWindow { limit, window_ms } => Algo::SlidingWindow {
            limit: (limit / n).max(1),
            window_ms,
        },
        Algo::Gcra {
            limit,
            window_ms,
            burst,
        } => Algo::Gcra {
            limit: (limit / n).max(1),
            window_ms,
            burst: (burst / n).max(1),
        },
    }
}

impl Limiter {
    pub fn in_fallback(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    fn set_fallback(&self, on: bool) {
        if self.fallback.swap(on, Ordering::Relaxed) != on {
            metrics::RATE_LIMIT_FALLBACK.set(i64::from(on));
            if on {
                log::error!(
                    "rate limiting: Redis unavailable, falling back to the on_failure policy"
                );
            } else {
                log::warn!("rate limiting: back to shared counting in Redis");
            }
        }
    }

    /// Decide one request.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        settings: &Settings,
        store: Option<&Arc<Store>>,
        route: &RoutePolicy,
        route_name: &str,
        tier_names: &[Arc<str>],
        identity: Option<&Identity>,
        client_ip: Option<IpAddr>,
        headers: &http::HeaderMap,
    ) -> Outcome {
        if !route.enabled {
            return Outcome::Unlimited;
        }
        let tier = identity.map_or(crate::identity::ANONYMOUS, |i| i.tier);
        let Some(Some(algo)) = route.per_tier.get(tier).copied() else {
            return Outcome::Unlimited;
        };
        let tier_name: &str = tier_names.get(tier).map_or("", |t| t);
        let ip = client_ip.map_or(KeyBytes::Text("-"), KeyBytes::Ip);
        let consumer = || match identity.and_then(|i| i.consumer.as_deref()) {
            Some(c) => KeyBytes::Text(c),
            None => client_ip.map_or(KeyBytes::Text("-"), KeyBytes::Ip),
        };
        let key = match &route.key {
            KeyKind::Consumer | KeyKind::RouteConsumer => consumer(),
            KeyKind::Ip => ip,
            KeyKind::Header(name) => match headers.get(name) {
                Some(v) => KeyBytes::Bytes(v.as_bytes()),
                None => ip,
            },
        };
        let scope: &str = match route.key {
            KeyKind::RouteConsumer => route_name,
            _ => &route.scope,
        };
        let hash = counter_hash(scope, tier_name, &algo, &key);
        let redis_key = || {
            format!(
                "tollgate:rl:{{{scope}:{tier_name}:{}:{}}}",
                window_of(&algo),
                key.render()
            )
        };
        let now = UnixMs::now().0;
        let decision = match (settings.mode, store) {
            (Mode::Local, _) | (_, None) => Some(self.local.decide(hash, algo, now)),
            (Mode::Batched, Some(store)) if matches!(algo, Algo::SlidingWindow { .. }) => {
                if store.is_up() {
                    let (limit, window_ms) = (limit_of(&algo), window_of(&algo));
                    Some(self.batched.decide(hash, redis_key, limit, window_ms, now))
                } else {
                    None
                }
            }
            (_, Some(store)) => self
                .coalescer
                .decide(store, hash, redis_key, algo, settings.exact_batch)
                .await
                .ok(),
        };
        let (decision, used) = match decision {
            Some(d) => {
                if settings.mode != Mode::Local && store.is_some() {
                    self.set_fallback(false);
                }
                (d, algo)
            }
            None => {
                self.set_fallback(true);
                match settings.on_failure {
                    OnFailure::Deny => {
                        count_decision(route, tier, tier_name, 2);
                        return Outcome::Unavailable;
                    }
                    OnFailure::Allow => (
                        Decision {
                            allowed: true,
                            remaining: limit_of(&algo),
                            reset_ms: window_of(&algo),
                            retry_after_ms: 0,
                        },
                        algo,
                    ),
                    OnFailure::Local => {
                        let shared_algo = share(algo, self.nodes.count());
                        (
                            self.local.decide(hash ^ 0x5eed, shared_algo, now),
                            shared_algo,
                        )
                    }
                }
            }
        };
        count_decision(route, tier, tier_name, usize::from(!decision.allowed));
        Outcome::Decided {
            decision,
            limit: limit_of(&used),
            window_s: window_s_of(&used),
            tier,
        }
    }
}

/// Seconds, rounded up, at least 1 (for Retry-After and Reset).
pub fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The most fields [`headers`] adds to one response.
pub const MAX_FIELDS: usize = 6;

/// The rate-limit response fields (the IETF draft's two and the X-RateLimit-* trio; Retry-After
/// when refused: at most [`MAX_FIELDS`]), handed to `add` in that order. They are on
/// every limited response, so the policy's two are made once per tier and the three that
/// change share one buffer: `X-RateLimit-Remaining` and `-Reset` are slices of `RateLimit`.
pub fn headers(
    outcome: &Outcome,
    policy: &RoutePolicy,
    tier_names: &[Arc<str>],
    mut add: impl FnMut(&'static Field, HeaderValue),
) {
    let Outcome::Decided {
        decision,
        limit,
        window_s,
        tier,
    } = *outcome
    else {
        return;
    };
    let name = tier_names.get(tier).map_or("default", |t| t);
    let configured = |algo: &Algo| PolicyFields::new(name, limit_of(algo), window_s_of(algo));
    let made;
    let fixed = match (policy.per_tier_cache.get(tier), policy.per_tier.get(tier)) {
        (Some(c), Some(Some(algo))) => Some(c.fields.get_or_init(|| configured(algo))),
        _ => None,
    };
    let fixed = match fixed {
        // The configured policy; a fallback's share of it (Redis down) is made each time.
        Some(f) if f.limit == limit && f.window_s == window_s => f,
        _ => {
            made = PolicyFields::new(name, limit, window_s);
            &made
        }
    };
    add(&fields::RATELIMIT_POLICY, fixed.policy.clone());
    let reset = ceil_secs(decision.reset_ms);
    // X-RateLimit-Remaining and -Reset are slices of RateLimit's value: one buffer for three.
    let (v, r, t) = structured(name, "r=", decision.remaining, "t=", reset);
    add(&fields::RATELIMIT, field_value(v.clone()));
    add(&fields::X_RATELIMIT_LIMIT, fixed.limit_value.clone());
    add(&fields::X_RATELIMIT_REMAINING, field_value(v.slice(r)));
    add(&fields::X_RATELIMIT_RESET, field_value(v.slice(t)));
    if !decision.allowed {
        add(
            &fields::RETRY_AFTER,
            HeaderValue::from(ceil_secs(decision.retry_after_ms)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RoutePolicy {
        let algo = Algo::SlidingWindow {
            limit: 1000,
            window_ms: 60_000,
        };
        RoutePolicy {
            enabled: true,
            key: KeyKind::Consumer,
            scope: Arc::from("t"),
            per_tier: Arc::from([None, Some(algo)]),
            per_tier_cache: PerTier::for_tiers(2),
        }
    }

    fn fields_of(outcome: &Outcome, policy: &RoutePolicy) -> Vec<(&'static str, String)> {
        let tiers: Vec<Arc<str>> = vec![Arc::from("anonymous"), Arc::from("pro")];
        let mut got = Vec::new();
        headers(outcome, policy, &tiers, |f, v| {
            got.push((f.spelled, v.to_str().expect("ascii").to_string()));
        });
        assert!(got.len() <= MAX_FIELDS);
        got
    }

    fn decided(limit: u64, remaining: u64, allowed: bool) -> Outcome {
        Outcome::Decided {
            decision: algo::Decision {
                allowed,
                remaining,
                reset_ms: 41_001,
                retry_after_ms: 1_500,
            },
            limit,
            window_s: 60,
            tier: 1,
        }
    }

    #[test]
    fn the_rate_limit_fields_are_spelled_as_the_draft_and_the_x_trio_say() {
        let policy = policy();
        let want = [
            ("RateLimit-Policy", "\"pro\";q=1000;w=60"),
            ("RateLimit", "\"pro\";r=0;t=42"),
            ("X-RateLimit-Limit", "1000"),
            ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", "42"),
            ("Retry-After", "2"),
        ];
        let want: Vec<_> = want.iter().map(|(n, v)| (*n, v.to_string())).collect();
        assert_eq!(fields_of(&decided(1000, 0, false), &policy), want);
        assert!(fields_of(&Outcome::Unlimited, &policy).is_empty());
    }

    #[test]
    fn fixed_fields_are_made_once_and_a_fallback_share_gets_its_own() {
        let policy = policy();
        let values = |o: &Outcome| -> Vec<String> {
            fields_of(o, &policy).into_iter().map(|(_, v)| v).collect()
        };
        // Twice the configured policy (the second time from the tier's cache), with remaining
        // numbers of other lengths so the slices of the shared buffer are checked too.
        assert_eq!(
            values(&decided(1000, 998, true)),
            [
                "\"pro\";q=1000;w=60",
                "\"pro\";r=998;t=42",
                "1000",
                "998",
                "42"
            ]
        );
        assert!(policy.per_tier_cache[1].fields.get().is_some());
        assert_eq!(
            values(&decided(1000, 7, true)),
            ["\"pro\";q=1000;w=60", "\"pro\";r=7;t=42", "1000", "7", "42"]
        );
        // Redis down, limit divided among 3 nodes: the share's own figures.
        assert_eq!(
            values(&decided(333, 12345, true)),
            [
                "\"pro\";q=333;w=60",
                "\"pro\";r=12345;t=42",
                "333",
                "12345",
                "42"
            ]
        );
        assert_eq!(
            policy.per_tier_cache[1].fields.get().map(|f| f.limit),
            Some(1000)
        );
    }
}
