//! The per-request context every phase shares: the pinned snapshot, the matched route, the
//! caller's identity and limit decision, the upstream attempts, and what later phases must know
//! about how an attempt ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::clock::{self, Instant};
use crate::error::GatewayError;
use crate::identity::Identity;
use crate::limit;
use crate::observe;
use crate::snapshot::{RouteRuntime, Snapshot};
use crate::upstream::backend::InFlight;
use crate::upstream::Upstream;

/// Most tries a request can make (`retries.attempts` is validated to this bound).
pub const MAX_ATTEMPTS: usize = 10;

/// Per-request state. The snapshot `Arc` is taken once here and kept to the end.
pub struct Ctx {
    pub snapshot: Arc<Snapshot>,
    /// Index of the matched route in `snapshot.routes`.
    pub route: Option<usize>,
    pub tried: [u16; MAX_ATTEMPTS],
    pub tries: usize,
    pub started: Instant,
    pub error: Option<GatewayError>,
    /// `None` = anonymous (no credential was needed or given).
    pub identity: Option<Identity>,
    pub limit: limit::Outcome,
    pub current: Option<Attempt>,
    /// How the last attempt ended, where a later phase must act on it.
    pub ended: AttemptEnd,
    /// In-flight slots (gateway, route), released when the request ends.
    pub permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
    /// Request body bytes seen so far, and when the body started.
    pub body_bytes: u64,
    pub body_started: Option<Instant>,
    pub request_id: String,
    pub trace: Option<observe::TraceParent>,
    /// When the current attempt started, and how long the backend took to answer.
    pub upstream_started: Option<Instant>,
    pub upstream_took: Option<Duration>,
    /// The current attempt counted in its backend's `in_flight`; replaced by the next attempt,
    /// cleared when the request is logged, and released on drop whatever happened.
    pub in_flight: Option<InFlight>,
    /// Routes with a cache policy only.
    pub cache: Option<Box<crate::cache::Ctx>>,
    pub head: HeadFacts,
    /// The request came over TLS.
    pub tls: bool,
    /// A gRPC call's deadline (`grpc-timeout`), read on routes to HTTP/2 upstreams.
    pub grpc_deadline: Option<Instant>,
    /// The request body is a stream with no whole-body deadline (a gRPC call's).
    pub body_unbounded: bool,
}

/// The attempt in progress: which backend, whether it holds a half-open probe slot, and whether
/// its outcome already went to the breaker.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub backend: usize,
    pub probe: bool,
    pub recorded: bool,
}

/// How an upstream attempt ended, for the phases after it. Set by `upstream_response_filter`,
/// read (and cleared) by `error_while_proxy` and `fail_to_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Nothing a later phase must act on (the attempt runs, succeeded, or failed plainly).
    Plain,
    /// A 5xx response dropped so that another backend gets the request: the retry is already
    /// decided and counted.
    RetryStatus,
    /// A 5xx response replaced by a stale cached response (stale-if-error).
    ServeStale,
}

/// What admission's one pass over the request's header fields found, so that later phases skip
/// lookups of fields the request does not carry. Until that pass has run, every answer is the
/// one that makes the later phases look for themselves.
#[derive(Debug, Clone, Copy)]
pub struct HeadFacts {
    /// `Content-Length` fields (saturating).
    pub content_lengths: u8,
    /// A field to remove before going upstream: an identity header in any spelling, or a name
    /// with an underscore.
    pub to_strip: bool,
    /// A `Host` field (HTTP/1 requests always have exactly one once admitted).
    pub host: bool,
}

impl HeadFacts {
    pub const UNKNOWN: Self = Self {
        content_lengths: u8::MAX,
        to_strip: true,
        host: false,
    };
}

impl Ctx {
    pub fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            snapshot,
            route: None,
            tried: [0; MAX_ATTEMPTS],
            tries: 0,
            started: clock::now(),
            error: None,
            identity: None,
            limit: limit::Outcome::Unlimited,
            current: None,
            ended: AttemptEnd::Plain,
            permits: (None, None),
            body_bytes: 0,
            body_started: None,
            request_id: String::new(),
            trace: None,
            upstream_started: None,
            upstream_took: None,
            in_flight: None,
            cache: None,
            head: HeadFacts::UNKNOWN,
            tls: false,
            grpc_deadline: None,
            body_unbounded: false,
        }
    }

    pub fn tried(&self) -> &[u16] {
        &self.tried[..self.tries]
    }

    /// The matched route, as this request's snapshot serves it.
    #[inline]
    pub fn route(&self) -> Option<&RouteRuntime> {
        self.route.map(|i| &self.snapshot.routes[i])
    }

    /// The matched route's name ("" when none matched), for metric labels.
    pub fn route_name(&self) -> &str {
        self.route().map_or("", |r| &r.route.name)
    }

    pub fn upstream(&self) -> Option<&Upstream> {
        self.snapshot.upstreams.get(self.route()?.route.upstream)
    }
}
