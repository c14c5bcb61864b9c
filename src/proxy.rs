//! The request flow, top-down, in one place. `Gateway` implements pingora's `ProxyHttp` and only
//! dispatches: each phase calls the module that owns the concern.
//!
//! ```text
//! early_request_filter  pin the snapshot (new_ctx), keep-alive, route match, compression level
//! request_filter        no route -> 404; no healthy backend -> 503 (answered here, at once)
//! upstream_peer         pick a healthy, untried backend; set every upstream timeout
//! fail_to_connect       nothing was sent: retry on another backend within `attempts`
//! upstream_request_filter  path rewrite, hop-by-hop removal, X-Forwarded-*
//! response_filter       hop-by-hop removal on the way back
//! fail_to_proxy         the ONE place an error becomes a status and a JSON body
//! logging               metrics, the OTLP span (feature `otlp`), the access log
//! ```
//!
//! Why the route is matched in `early_request_filter` and not `request_filter`: pingora's
//! response compression module reads its level when the request header is processed, which is
//! right after this phase, so the route (which owns the level) must be known by then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{self, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderValue, Uri};
use pingora_core::modules::http::compression::{ResponseCompression, ResponseCompressionBuilder};
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::http::compression::Algorithm;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::OwnedSemaphorePermit;

use crate::breaker;
use crate::cache::{self, ResponseCache};
use crate::config::schema::UnderscoreHeaders;
use crate::error::{self, GatewayError};
use crate::fields::{self, Field};
use crate::identity::{self, Identity};
use crate::limit::{self, Limiter};
use crate::metrics;
use crate::observe;
use crate::route;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::upstream::{HashKey, NoBackend};

#[cfg(feature = "otlp")]
mod span;

/// Most tries a request can make (`retries.attempts` is validated to this bound).
const MAX_ATTEMPTS: usize = 10;

pub struct Gateway {
    pub current: SharedSnapshot,
    pub limiter: Arc<Limiter>,
    /// True while handing over to a new process or shutting down (see `control`).
    pub draining: Arc<AtomicBool>,
    pub cache: Arc<ResponseCache>,
}

/// Per-request state. The snapshot `Arc` is taken once here and kept to the end.
pub struct Ctx {
    snapshot: Arc<Snapshot>,
    route: Option<usize>,
    tried: [u16; MAX_ATTEMPTS],
    tries: usize,
    started: Instant,
    error: Option<GatewayError>,
    /// `None` = anonymous (no credential was needed or given).
    identity: Option<Identity>,
    limit: limit::Outcome,
    current: Option<Attempt>,
    /// The last error was our own retry of a 5xx response.
    status_retry: bool,
    /// In-flight slots (gateway, route), released when the request ends.
    permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
    /// Request body bytes seen so far, and when the body started.
    body_bytes: u64,
    body_started: Option<Instant>,
    request_id: String,
    trace: Option<observe::TraceParent>,
    /// When the current attempt started, and how long the backend took to answer.
    upstream_started: Option<Instant>,
    upstream_took: Option<Duration>,
    /// The current attempt counted in its backend's `in_flight`; replaced by the next attempt,
    /// cleared when the request is logged, and released on drop whatever happened.
    in_flight: Option<crate::health::InFlight>,
    /// Routes with a cache policy only.
    cache: Option<Box<cache::Ctx>>,
    /// The upstream failed and an old cached response will answer instead (stale-if-error).
    serve_stale: bool,
    head: HeadFacts,
}

/// What `admit`'s one pass over the request's header fields found, so that later phases skip
/// lookups of fields the request does not carry. Until that pass has run, every answer is the
/// one that makes the later phases look for themselves.
#[derive(Debug, Clone, Copy)]
struct HeadFacts {
    /// `Content-Length` fields (saturating).
    content_lengths: u8,
    /// A field to remove before going upstream: an identity header in any spelling, or a name
    /// with an underscore.
    to_strip: bool,
    /// A `Host` field (HTTP/1 requests always have exactly one once admitted).
    host: bool,
}

impl HeadFacts {
    const UNKNOWN: Self = Self {
        content_lengths: u8::MAX,
        to_strip: true,
        host: false,
    };
}

impl Ctx {
    fn tried(&self) -> &[u16] {
        &self.tried[..self.tries]
    }

    fn upstream(&self) -> Option<&crate::upstream::Upstream> {
        let r = &self.snapshot.routes[self.route?];
        self.snapshot.upstreams.get(r.upstream)
    }
}

/// The route's rate-limit fields for this request's decision, handed to `add` (none when no
/// limit applied).
fn limit_fields(ctx: &Ctx, add: impl FnMut(&'static Field, HeaderValue)) {
    if let Some(route) = ctx.route.map(|i| &ctx.snapshot.routes[i]) {
        limit::headers(&ctx.limit, &route.limit, &ctx.snapshot.identity.tiers, add);
    }
}

/// Add X-Request-Id (unless turned off) and the rate-limit fields to a response going to the
/// client, spelled as `server.preserve_header_case` says.
fn add_fields(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    let limited = !matches!(ctx.limit, limit::Outcome::Unlimited);
    let at_most = 1 + if limited { limit::MAX_FIELDS } else { 0 };
    let mut add = fields::Adder::new(resp, ctx.snapshot.server.header_case, at_most);
    if ctx.snapshot.server.request_id_header {
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            add.insert(&fields::REQUEST_ID, v);
        }
    }
    if limited {
        limit_fields(ctx, |f, v| add.insert(f, v));
    }
    add.finish()
}

/// The fields of an error answer: the rate-limit fields of an admitted request (Retry-After
/// comes from the error itself) and, always, the request id.
fn error_fields(session: &Session, ctx: &mut Ctx) -> Vec<(&'static Field, HeaderValue)> {
    let mut extra = Vec::with_capacity(1 + limit::MAX_FIELDS);
    limit_fields(ctx, |f, v| {
        if !std::ptr::eq(f, &fields::RETRY_AFTER) {
            extra.push((f, v));
        }
    });
    ensure_request_id(session, ctx);
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        extra.push((&fields::REQUEST_ID, v));
    }
    extra
}

const H_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const H_TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const H_XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const H_XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const H_XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the common non-standard ones. `Transfer-Encoding`
/// and `Content-Length` are left to pingora, which owns message framing; `Upgrade` is kept for
/// upgrade requests.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
];

/// Remove hop-by-hop headers and every header the `Connection` header names.
fn strip_hop_by_hop(headers: &http::HeaderMap, mut remove: impl FnMut(&str), keep_upgrade: bool) {
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(list) = value.to_str() {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                remove(name);
            }
        }
    }
}

pub(crate) fn clean_response(resp: &mut ResponseHeader, upgraded: bool, hide_server: bool) {
    // One look at the (few) response headers decides what needs removing: most responses
    // carry only `Connection` and `Server` of these.
    // `named`: a Connection value other than `keep-alive` or `close` (which name no other
    // field; nearly every response has one of them alone).
    let (mut server, mut named, mut other) = (false, false, false);
    for (name, value) in resp.headers.iter() {
        if *name == header::SERVER {
            server = true;
        } else if *name == header::CONNECTION {
            let v = value.as_bytes();
            // The usual spellings first: a plain comparison, not a case-folding one.
            named |= !(v == b"keep-alive"
                || v == b"close"
                || v.eq_ignore_ascii_case(b"keep-alive")
                || v.eq_ignore_ascii_case(b"close"));
        } else if HOP_BY_HOP[1..].contains(name) {
            other = true;
        }
    }
    // The upstream's software never reaches the client (unless configured to).
    if server && hide_server {
        resp.remove_header(&header::SERVER);
    }
    if named {
        // Fields the upstream named in `Connection` are hop-by-hop too. `Connection` itself is
        // pingora's: rewritten on HTTP/1.1 (keep-alive or close; kept on a 101) and dropped on
        // HTTP/2, so it is left for pingora to set.
        let mut named = Vec::new();
        strip_hop_by_hop(
            &resp.headers,
            |n| {
                if !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close") {
                    named.push(n.to_string());
                }
            },
            upgraded,
        );
        for n in named {
            resp.remove_header(n.as_str());
        }
    }
    if other {
        for h in &HOP_BY_HOP[1..] {
            resp.remove_header(h);
        }
    }
}

/// The Host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host(req: &RequestHeader) -> &str {
    if let Some(h) = req.uri.host() {
        return h;
    }
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The route name for cache metrics.
fn cache_route(ctx: &Ctx) -> &str {
    ctx.route.map_or("", |i| &ctx.snapshot.routes[i].name)
}

/// A bounded label index for the method (clients can send any token): see `metrics::METHODS`.
fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::PATCH => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The attempt in progress: which backend, and whether it holds a half-open probe slot.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    backend: usize,
    probe: bool,
    recorded: bool,
}

/// HTTP/1.x needs exactly one `Host` (routing depends on it, so HTTP/1.0 too), a plain
/// authority (no list, no userinfo, no spaces); HTTP/2 carries `:authority` (pingora checks it).
/// `hosts` is how many Host fields the request has, `host` the first one.
fn valid_host(req: &RequestHeader, hosts: usize, host: Option<&HeaderValue>) -> bool {
    if req.version == http::Version::HTTP_2 {
        return true;
    }
    match host {
        Some(host) if hosts == 1 => valid_authority(host.as_bytes()),
        _ => false,
    }
}

/// `host[:port]` as RFC 3986 writes it, without userinfo: an IP literal in brackets, or a
/// reg-name / IPv4 address of unreserved, sub-delims and `%`; a port of digits. Checked in
/// place (no allocation: this runs on every request).
fn valid_authority(h: &[u8]) -> bool {
    if h.first() == Some(&b'[') {
        let Some(close) = h.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &h[1..close];
        return !inside.is_empty()
            && inside
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && valid_port(&h[close + 1..]);
    }
    // One forward pass: every byte before the last `:` must be a reg-name byte (a `:` is not,
    // so an earlier one fails), every byte after it a digit.
    let (mut colon, mut ok) = (None, true);
    for (i, &b) in h.iter().enumerate() {
        if b == b':' {
            ok &= colon.is_none();
            colon = Some(i);
        } else if colon.is_none() {
            ok &= REG_NAME[usize::from(b)];
        }
    }
    let at = colon.unwrap_or(h.len());
    ok && at > 0 && valid_port(&h[at..])
}

/// Nothing, or `:` and at most five digits.
fn valid_port(port: &[u8]) -> bool {
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// The bytes of a reg-name or IPv4 address besides letters and digits (RFC 3986: the rest of
/// unreserved, sub-delims, and `%` of pct-encoded).
const REG_NAME_PUNCT: &[u8] = b"-._~!$&'()*+;=%";

/// Those bytes as a table: one load per byte of the Host value.
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < REG_NAME_PUNCT.len() {
        t[REG_NAME_PUNCT[i] as usize] = true;
        i += 1;
    }
    t
};

/// Transfer-Encoding, when present, is exactly one `chunked`. pingora frames the body by the last
/// coding (400 unless it is chunked) but forwards `chunked` alone, so any other coding would reach
/// the backend mislabelled; and chunked must not be applied twice (RFC 9112 §6.1, §7). Called
/// only for requests that carry the field (see `admit`).
fn valid_transfer_encoding(req: &RequestHeader) -> bool {
    let mut codings = req
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => !req.headers.contains_key(header::TRANSFER_ENCODING),
        (Some(c), None) => c.eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

/// The connection's front flagged this request's syntax (see `guard::HeadScanner`): pingora
/// would repair it or a backend could read it differently. Refused, and the connection closed.
fn malformed(session: &Session) -> bool {
    session
        .stream()
        .is_some_and(|s| s.as_any().is::<crate::guard::Flagged>())
}

/// A client field the backend never sees: an identity header in any spelling (the gateway
/// asserts identity itself), or a name with an underscore when those are dropped.
fn stripped_upstream(name: &str, drop_underscores: bool) -> bool {
    identity::is_identity_header(name) || (drop_underscores && name.contains('_'))
}

/// Error answers always carry a request id, even when ids are not otherwise sent.
fn ensure_request_id(session: &Session, ctx: &mut Ctx) {
    if ctx.request_id.is_empty() {
        ctx.request_id = observe::request_id(
            session
                .req_header()
                .headers
                .get(H_REQUEST_ID)
                .map(|v| v.as_bytes()),
        );
    }
}

/// May this request be sent again? Idempotent methods (RFC 9110 §9.2.2) or an
/// `Idempotency-Key`, and a body that still fits pingora's retry buffer.
fn replayable(session: &Session) -> bool {
    let req = session.req_header();
    let idempotent = matches!(
        req.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
    ) || req.headers.contains_key("idempotency-key");
    idempotent && !session.as_ref().retry_buffer_truncated()
}

impl Gateway {
    /// Feed the current attempt's outcome to its backend's breaker (once per attempt).
    fn record(&self, ctx: &mut Ctx, outcome: breaker::Outcome) {
        let Some(attempt) = ctx.current.as_mut() else {
            return;
        };
        if attempt.recorded {
            return;
        }
        attempt.recorded = true;
        let (backend, probe) = (attempt.backend, attempt.probe);
        if let Some(u) = ctx.upstream() {
            u.record(backend, outcome, probe);
        }
    }

    /// Attempts left, another usable backend, and the retry budget allows one more.
    fn may_retry(&self, ctx: &Ctx) -> bool {
        let Some(u) = ctx.upstream() else {
            return false;
        };
        if ctx.tries >= u.spec.attempts.min(MAX_ATTEMPTS) || !u.has_untried(ctx.tried()) {
            return false;
        }
        if u.budget.try_retry(&u.spec.budget, clock::ms(clock::now())) {
            true
        } else {
            metrics::RETRIES_DENIED
                .with_label_values(&[&u.spec.name])
                .inc();
            false
        }
    }

    /// The request head's own checks, before anything else (synchronous: on a route with no
    /// authentication, limit or shedding, admission is only this).
    fn check_head(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), GatewayError> {
        let snapshot = &*ctx.snapshot;
        let req = session.req_header();
        // One pass over the header fields: sizes, and the fields later checks need.
        let (mut header_bytes, mut longest, mut underscores) = (0usize, 0usize, false);
        let (mut hosts, mut host, mut transfer_encoding) = (0usize, None, false);
        let (mut content_lengths, mut to_strip) = (0u8, false);
        let drop_underscores = snapshot.server.underscore_headers == UnderscoreHeaders::Drop;
        for (k, v) in req.headers.iter() {
            let name = k.as_str();
            let line = name.len() + v.len() + 2; // `name: value`
            header_bytes += line + 2;
            longest = longest.max(line);
            // A byte loop: names are short, shorter than memchr's set-up.
            underscores |= name.bytes().any(|b| b == b'_');
            if *k == header::HOST {
                hosts += 1;
                host.get_or_insert(v);
            } else if *k == header::TRANSFER_ENCODING {
                transfer_encoding = true;
            } else if *k == header::CONTENT_LENGTH {
                content_lengths = content_lengths.saturating_add(1);
            } else {
                to_strip |= stripped_upstream(name, drop_underscores);
            }
        }
        // Syntax pingora would repair or that a backend could read differently: refuse it.
        if malformed(session)
            || !valid_host(req, hosts, host)
            || (transfer_encoding && !valid_transfer_encoding(req))
        {
            return Err(GatewayError::BadRequest);
        }
        if req.raw_path().len() > snapshot.server.max_uri_bytes {
            return Err(GatewayError::UriTooLong);
        }
        ctx.head = HeadFacts {
            content_lengths,
            to_strip,
            host: hosts > 0,
        };
        if header_bytes > snapshot.server.max_header_bytes
            || longest > snapshot.server.max_header_line_bytes
            || req.headers.len() > snapshot.server.max_headers
        {
            return Err(GatewayError::HeadersTooLarge);
        }
        if underscores && snapshot.server.underscore_headers == UnderscoreHeaders::Reject {
            return Err(GatewayError::BadRequest);
        }
        ctx.route.map(|_| ()).ok_or(GatewayError::NoRoute)
    }

    /// Whether admission has more to do than [`Self::check_head`] for this request. This restates
    /// the guards of the steps in [`Self::admit`] (keep the two in step): skipping the call
    /// when none applies saves ~150 instructions a request, 0.25% of plain proxying, and that
    /// target sits at its edge.
    fn admission_pending(ctx: &Ctx) -> bool {
        let snapshot = &*ctx.snapshot;
        let Some(i) = ctx.route else {
            return false;
        };
        let route = &snapshot.routes[i];
        snapshot.global_shed.is_some()
            || route.auth.mode != identity::Mode::None
            || !route.auth.roles.is_empty()
            || route.limit.enabled
            || route.max_body.is_some()
            || snapshot.route_shed[i].is_some()
    }

    /// Shed (gateway) -> authenticate -> rate limit -> declared size -> shed (route), after
    /// [`Self::check_head`]. Each step may refuse the request; the order matters: a caller
    /// without credentials learns nothing about limits or backend health.
    async fn admit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), GatewayError> {
        let snapshot = &*ctx.snapshot;
        if let Some(shed) = &snapshot.global_shed {
            match Box::pin(shed.admit()).await {
                Some(permit) => ctx.permits.0 = Some(permit),
                None => {
                    metrics::SHED.with_label_values(&["gateway"]).inc();
                    return Err(GatewayError::Overloaded);
                }
            }
        }
        let route = ctx
            .route
            .map(|i| &snapshot.routes[i])
            .ok_or(GatewayError::NoRoute)?;
        if route.auth.mode != identity::Mode::None || !route.auth.roles.is_empty() {
            let req = session.req_header();
            let issued = snapshot.shared.as_ref().map(|s| &*s.issued);
            // Boxed: the request future stays small for routes that never authenticate.
            match Box::pin(identity::authenticate(
                &snapshot.identity,
                issued,
                &route.auth,
                &req.headers,
                req.uri.query(),
            ))
            .await
            {
                Ok(id) => ctx.identity = Some(id),
                Err(e) => {
                    metrics::AUTH_FAILURES
                        .with_label_values(&[e.reason()])
                        .inc();
                    return Err(GatewayError::Auth(e));
                }
            }
        }
        if route.limit.enabled {
            let req = session.req_header();
            let store = snapshot.shared.as_ref().map(|s| &s.store);
            let client_ip = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            // Boxed: the request future stays small for routes without a limit.
            ctx.limit = Box::pin(self.limiter.check(
                &snapshot.limits,
                store,
                &route.limit,
                &route.name,
                &snapshot.identity.tiers,
                ctx.identity.as_ref(),
                client_ip,
                &req.headers,
            ))
            .await;
            match ctx.limit {
                limit::Outcome::Decided { decision, .. } if !decision.allowed => {
                    let secs = limit::ceil_secs(decision.retry_after_ms);
                    return Err(GatewayError::RateLimited {
                        retry_after: u32::try_from(secs).unwrap_or(u32::MAX),
                    });
                }
                limit::Outcome::Unavailable => return Err(GatewayError::LimiterUnavailable),
                _ => {}
            }
        }
        if let Some(max) = route.max_body {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Err(GatewayError::PayloadTooLarge);
            }
        }
        // Shedding comes after authentication and rate limiting: refused callers hold no slot.
        if let Some(Some(shed)) = ctx.route.map(|i| &snapshot.route_shed[i]) {
            match Box::pin(shed.admit()).await {
                Some(permit) => ctx.permits.1 = Some(permit),
                None => {
                    metrics::SHED.with_label_values(&[&route.name]).inc();
                    return Err(GatewayError::Overloaded);
                }
            }
        }
        Ok(())
    }

    /// A backend to send the request to exists (checked after the cache had its chance).
    fn available(ctx: &Ctx) -> std::result::Result<(), GatewayError> {
        match ctx.upstream() {
            Some(u) if !u.any_healthy() => {
                let retry_after = u32::try_from(u.retry_after_secs()).unwrap_or(u32::MAX);
                Err(GatewayError::NoHealthyBackend { retry_after })
            }
            _ => Ok(()),
        }
    }

    /// On a cached route: the entry to answer with now, if any. Sets up `ctx.cache` for the
    /// trip upstream otherwise (the key, and an old entry for stale-if-error).
    async fn cache_lookup(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Option<(Arc<cache::Entry>, cache::Status)> {
        let index = ctx.route?;
        ctx.snapshot.routes[index].cache.as_ref()?;
        let snapshot = ctx.snapshot.clone();
        let route = &snapshot.routes[index];
        let policy = route.cache.as_ref()?;
        let body_empty = session.is_body_empty();
        let req = session.req_header();
        let mut state = cache::Ctx {
            key: String::new(),
            status: cache::Status::Bypass,
            fallback: None,
            origin: None,
            capture: None,
        };
        let mut serve = None;
        if !cache::bypass(policy, req, body_empty) {
            let host = route::normalize_host(request_host(req));
            let consumer = ctx.identity.as_ref().and_then(|i| i.consumer.as_deref());
            state.key = cache::key(&route.name, &host, req, policy, consumer);
            let mut found = self.cache.lookup_l1(&state.key, breaker::now_ms());
            if matches!(found, cache::Lookup::Miss) && snapshot.cache.redis {
                if let Some(e) =
                    Box::pin(cache::lookup_l2(&self.cache, &snapshot, &state.key)).await
                {
                    found = cache::classify(e, breaker::now_ms());
                }
            }
            state.status = match found {
                cache::Lookup::Fresh(e) => {
                    serve = Some(e);
                    cache::Status::Hit
                }
                cache::Lookup::Stale(e) => {
                    cache::spawn_revalidation(
                        self.cache.clone(),
                        snapshot.clone(),
                        index,
                        state.key.clone(),
                        e.clone(),
                    );
                    serve = Some(e);
                    cache::Status::Stale
                }
                cache::Lookup::Expired(old) => {
                    state.fallback = old;
                    cache::Status::Expired
                }
                cache::Lookup::Miss => cache::Status::Miss,
            };
        }
        metrics::CACHE_REQUESTS
            .with_label_values(&[&route.name, state.status.as_str()])
            .inc();
        let status = state.status;
        ctx.cache = Some(Box::new(state));
        serve.map(|e| (e, status))
    }

    /// Answer with a cached response (with this request's id and rate-limit headers).
    async fn serve_cached(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &cache::Entry,
        status: cache::Status,
    ) -> Result<()> {
        if let Some(c) = ctx.cache.as_deref_mut() {
            c.status = status;
        }
        let mut h = cache::response_for(entry, status, breaker::now_ms())?;
        add_fields(&mut h, ctx)?;
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), false).await?;
        let body = (!head && !entry.body.is_empty()).then(|| entry.body.clone());
        session.write_response_body(body, true).await
    }
}

impl Gateway {
    /// `early_request_filter`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn early_request_filter_now(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // pingora's default keep-alive never times out (#447). Where pingora turned keep-alive
        // off for this request (`Connection: close`, HTTP/1.0 without keep-alive, or both
        // Transfer-Encoding and Content-Length: RFC 9112 §6.1), it stays off.
        if self.draining.load(Ordering::Relaxed) || session.get_keepalive().is_none() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(ctx.snapshot.keepalive_secs));
        }
        // A stalled request body: the longest pause between two reads.
        session.set_read_timeout(Some(ctx.snapshot.server.body_timeout));
        let req = session.req_header();
        let server = &ctx.snapshot.server;
        if server.request_id_header || server.access_log != observe::LogTarget::Off {
            ctx.request_id =
                observe::request_id(req.headers.get(H_REQUEST_ID).map(|v| v.as_bytes()));
        }
        if server.trace_context {
            ctx.trace = Some(observe::TraceParent::next(
                req.headers.get(H_TRACEPARENT).map(|v| v.as_bytes()),
            ));
            #[cfg(feature = "otlp")]
            span::sample(ctx);
        }
        // The host is looked up and normalised only when some route matches on it.
        let host = if ctx.snapshot.routes_match_host {
            route::normalize_host(request_host(req))
        } else {
            std::borrow::Cow::Borrowed("")
        };
        ctx.route = ctx
            .snapshot
            .routes
            .iter()
            .position(|r| r.matches(&host, req.uri.path(), &req.method));
        if let Some(z) = ctx.route.and_then(|i| ctx.snapshot.routes[i].compression) {
            if let Some(c) = session
                .downstream_modules_ctx
                .get_mut::<ResponseCompression>()
            {
                c.adjust_algorithm_level(Algorithm::Gzip, z.gzip);
                c.adjust_algorithm_level(Algorithm::Brotli, z.brotli);
                c.adjust_algorithm_level(Algorithm::Zstd, z.zstd);
            }
        }
        Ok(())
    }

    /// `request_body_filter`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn request_body_filter_now(
        &self,
        upgraded: bool,
        body: &mut Option<Bytes>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if body.is_none() && ctx.body_started.is_none() {
            // No body at all (pingora still calls once): nothing to time or count.
            return Ok(());
        }
        if upgraded {
            // After `101 Switching Protocols` the "body" is another protocol's stream (a
            // WebSocket, say) that may live for hours: no total deadline and no size limit,
            // only the per-read idle timeout.
            return Ok(());
        }
        let started = *ctx.body_started.get_or_insert_with(clock::now);
        if clock::since(started) > ctx.snapshot.server.body_timeout {
            // A trickling body: the whole body must arrive within body_timeout.
            ctx.error = Some(GatewayError::RequestTimeout);
            return Error::e_explain(ErrorType::ReadTimedout, "request body too slow");
        }
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        let max = ctx.route.and_then(|i| ctx.snapshot.routes[i].max_body);
        if max.is_some_and(|m| ctx.body_bytes > m) {
            ctx.error = Some(GatewayError::PayloadTooLarge);
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
        }
        Ok(())
    }

    /// `upstream_response_filter`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn upstream_response_filter_now(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.upstream_took = ctx.upstream_started.map(clock::since);
        self.record(ctx, breaker::Outcome::Status(status));
        // Only 5xx statuses can be configured for retries (validated).
        let retry_this = status >= 500
            && ctx
                .upstream()
                .is_some_and(|u| u.spec.retry_on.contains(&status))
            && replayable(session)
            && self.may_retry(ctx);
        let stale = status >= 500
            && !retry_this
            && ctx.cache.as_ref().is_some_and(|c| c.fallback.is_some());
        if stale {
            ctx.serve_stale = true;
            return Error::e_explain(ErrorType::HTTPStatus(status), "serving stale instead");
        }
        if retry_this {
            // Not sent downstream yet: drop it and try another backend (see error_while_proxy).
            ctx.status_retry = true;
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "retrying a failed response");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    /// `upstream_request_filter`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn upstream_request_filter_now(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // pingora has already removed hop-by-hop headers and every header named in
        // `Connection` (sanitize_h1_upstream_request) before this filter runs.
        let snapshot = &ctx.snapshot;
        // Identity: the client's identity headers are removed in every spelling, ours added.
        if ctx.head.to_strip {
            let drop_underscores = snapshot.server.underscore_headers == UnderscoreHeaders::Drop;
            let unwanted: Vec<HeaderName> = upstream_request
                .headers
                .keys()
                .filter(|k| stripped_upstream(k.as_str(), drop_underscores))
                .cloned()
                .collect();
            for name in unwanted {
                upstream_request.remove_header(&name);
            }
        }
        match &ctx.identity {
            // No authentication ran (auth: none): nothing to assert to the backend.
            None if ctx
                .route
                .is_some_and(|i| snapshot.routes[i].auth.mode == identity::Mode::None) => {}
            Some(id) => {
                identity::apply_headers(upstream_request, id, &snapshot.identity)?;
                if id.method == identity::Method::ApiKey {
                    // The gateway consumed the key; the backend does not need it.
                    upstream_request.remove_header(&snapshot.identity.key_header);
                }
            }
            None => identity::apply_anonymous(upstream_request, &snapshot.identity)?,
        }
        if snapshot.server.request_id_header {
            if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
                upstream_request.insert_header(H_REQUEST_ID, v)?;
            }
        }
        if let Some(t) = &ctx.trace {
            upstream_request.insert_header(H_TRACEPARENT, t.header_value())?;
        }

        // HTTP/2 and absolute-form requests carry the authority in the URI: keep it as Host and
        // send origin-form to the (HTTP/1.1) backend.
        // Looked up only when admission did not see one (HTTP/2, or admission did not run).
        let no_host = !ctx.head.host && !upstream_request.headers.contains_key(header::HOST);
        let host = if no_host || snapshot.server.forwarded_headers {
            HeaderValue::from_bytes(request_host(upstream_request).as_bytes()).ok()
        } else {
            None
        };
        if no_host {
            if let Some(h) = host.clone().filter(|h| !h.is_empty()) {
                upstream_request.insert_header(header::HOST, h)?;
            }
        }
        // Identical duplicate Content-Lengths (`5, 5`, or two fields) passed pingora's check:
        // the backend gets exactly one (RFC 9110 §8.6).
        let merged_length = if ctx.head.content_lengths > 0 {
            let mut lengths = upstream_request
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter();
            match (lengths.next(), lengths.next()) {
                (Some(first), second) if second.is_some() || first.as_bytes().contains(&b',') => {
                    first
                        .to_str()
                        .ok()
                        .and_then(|v| v.split(',').next())
                        .map(|v| v.trim().to_string())
                }
                _ => None,
            }
        } else {
            None
        };
        if let Some(n) = merged_length {
            upstream_request.insert_header(header::CONTENT_LENGTH, n)?;
        }

        let route = ctx.route.map(|i| &snapshot.routes[i]);
        let new_path = match route {
            Some(r) if r.rewrites() => r.rewrite_path(upstream_request.uri.path()),
            _ => None,
        };
        // pingora keeps an absolute-form target verbatim (its URI holds only the path): send
        // origin-form, as for HTTP/2, with the authority in Host (already checked to agree).
        let raw = upstream_request.raw_path();
        let absolute_form = upstream_request.method != http::Method::CONNECT
            && !raw.is_empty()
            && raw[0] != b'/'
            && raw != b"*";
        if new_path.is_some() || absolute_form || upstream_request.uri.authority().is_some() {
            let path = new_path.as_deref().unwrap_or(upstream_request.uri.path());
            let path = if path.is_empty() { "/" } else { path };
            let pq = match upstream_request.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            if let Ok(uri) = pq.parse::<Uri>() {
                upstream_request.set_uri(uri);
            }
        }

        if !snapshot.server.forwarded_headers {
            return Ok(());
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            use std::fmt::Write;
            let prev = upstream_request
                .headers
                .get(H_XFF)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|p| !p.is_empty());
            let mut xff = String::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39);
            if let Some(p) = prev {
                xff.push_str(p);
                xff.push_str(", ");
            }
            let _ = write!(xff, "{}", addr.ip());
            upstream_request.insert_header(H_XFF, xff)?;
        }
        // Set, never trusted from the client.
        upstream_request.insert_header(H_XFP, HeaderValue::from_static("http"))?;
        if let Some(h) = host {
            upstream_request.insert_header(H_XFH, h)?;
        }
        Ok(())
    }

    /// `response_filter`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn response_filter_now(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let upgraded = upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && session.is_upgrade_req();
        clean_response(
            upstream_response,
            upgraded,
            ctx.snapshot.server.hide_backend_server,
        );
        if ctx.cache.is_some() {
            self.cache_capture(session, upstream_response, ctx)?;
        }
        add_fields(upstream_response, ctx)
    }

    /// On a cached route, going upstream: keep a copy of a storable response as it passes.
    fn cache_capture(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(c) = ctx.cache.as_deref_mut() else {
            return Ok(());
        };
        let snapshot = &ctx.snapshot;
        let route = ctx.route.map(|i| &snapshot.routes[i]);
        if let (Some(route), Some(policy)) = (route, route.and_then(|r| r.cache.as_ref())) {
            if c.origin.is_some() && session.req_header().method == http::Method::GET {
                let declared = resp
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                let outcome = if declared.is_some_and(|n| n > policy.max_body) {
                    Some("too_large")
                } else if let Some(times) = cache::storable(policy, resp, breaker::now_ms()) {
                    c.capture = Some(cache::Capture {
                        header: resp.clone(),
                        body: bytes::BytesMut::new(),
                        times,
                        max_body: policy.max_body,
                    });
                    None
                } else {
                    Some("uncacheable")
                };
                if let Some(result) = outcome {
                    metrics::CACHE_STORES
                        .with_label_values(&[&route.name, result])
                        .inc();
                }
            }
        }
        resp.insert_header("X-Cache-Status", c.status.header())?;
        Ok(())
    }

    /// `logging`'s work, synchronous: the boxed future pingora allocates stays minimal.
    fn logging_now(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // The request is over (`Ctx` is dropped later; release now so the count is exact).
        ctx.in_flight = None;
        // A probe whose outcome never came (the client left first) gives its slot back.
        if let Some(a) = ctx.current {
            if a.probe && !a.recorded {
                if let Some(u) = ctx.upstream() {
                    u.backends[a.backend].breaker.release_probe();
                }
            }
        }
        metrics::IN_FLIGHT.dec();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.error.map(GatewayError::status))
            .unwrap_or(0);
        let snapshot = &ctx.snapshot;
        let total = clock::since(ctx.started);
        let upstream = ctx.upstream_took.map(|d| d.as_secs_f64());
        let mi = method_index(&session.req_header().method);
        let rm = ctx.route.unwrap_or(snapshot.routes.len());
        if let Some(m) = snapshot.route_metrics.get(rm) {
            m.observe(mi, status, total.as_secs_f64(), upstream);
        }
        #[cfg(feature = "otlp")]
        if let Some(exporter) = &snapshot.otlp {
            span::finish(exporter, session, ctx, status);
        }
        if snapshot.server.access_log == observe::LogTarget::Off {
            return;
        }
        let req = session.req_header();
        let backend = ctx.current.and_then(|a| {
            ctx.upstream()
                .map(|u| u.spec.backends[a.backend].addr.to_string())
        });
        let (consumer, tier) = match &ctx.identity {
            Some(id) => (
                id.consumer.as_deref().map(str::to_string),
                snapshot.identity.tiers.get(id.tier).map(|t| t.to_string()),
            ),
            None => (None, snapshot.identity.tiers.first().map(|t| t.to_string())),
        };
        let record = observe::AccessRecord {
            time: observe::now_rfc3339(),
            request_id: std::mem::take(&mut ctx.request_id),
            trace_id: ctx.trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
            method: req.method.as_str().to_string(),
            path: req.uri.path().chars().take(2048).collect(),
            route: ctx
                .route
                .map(|i| snapshot.routes[i].name.to_string())
                .unwrap_or_default(),
            status,
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            total_ms: total.as_secs_f64() * 1000.0,
            upstream_ms: upstream.map(|s| s * 1000.0),
            backend,
            consumer,
            tier,
            rate_limit: match ctx.limit {
                limit::Outcome::Unlimited => "none",
                limit::Outcome::Decided { decision, .. } if decision.allowed => "allowed",
                limit::Outcome::Decided { .. } => "limited",
                limit::Outcome::Unavailable => "unavailable",
            },
            cache: ctx.cache.as_ref().map_or("none", |c| c.status.as_str()),
            retries: ctx.tries.saturating_sub(1),
            error: ctx.error.map(GatewayError::code),
        };
        observe::log(&snapshot.server.access_log, record);
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        metrics::IN_FLIGHT.inc();
        Ctx {
            snapshot: self.current.load_full(),
            route: None,
            tried: [0; MAX_ATTEMPTS],
            tries: 0,
            started: clock::now(),
            error: None,
            identity: None,
            limit: limit::Outcome::Unlimited,
            current: None,
            status_retry: false,
            permits: (None, None),
            body_bytes: 0,
            body_started: None,
            request_id: String::new(),
            trace: None,
            upstream_started: None,
            upstream_took: None,
            in_flight: None,
            cache: None,
            serve_stale: false,
            head: HeadFacts::UNKNOWN,
        }
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // Level 0 = off; routes turn it on per request.
        modules.add_module(ResponseCompressionBuilder::enable(0));
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        self.early_request_filter_now(session, ctx)
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let mut verdict = self.check_head(session, ctx);
        if verdict.is_ok() && Self::admission_pending(ctx) {
            verdict = self.admit(session, ctx).await;
        }
        if verdict.is_ok() {
            // Only routes with a cache policy look anything up.
            if ctx
                .route
                .is_some_and(|i| ctx.snapshot.routes[i].cache.is_some())
            {
                if let Some((entry, status)) = self.cache_lookup(session, ctx).await {
                    Box::pin(self.serve_cached(session, ctx, &entry, status)).await?;
                    return Ok(true);
                }
            }
            verdict = Self::available(ctx);
        }
        if let Err(GatewayError::NoHealthyBackend { .. }) = verdict {
            if let Some(old) = ctx.cache.as_ref().and_then(|c| c.fallback.clone()) {
                metrics::CACHE_REQUESTS
                    .with_label_values(&[cache_route(ctx), "stale_error"])
                    .inc();
                Box::pin(self.serve_cached(session, ctx, &old, cache::Status::StaleError)).await?;
                return Ok(true);
            }
        }
        match verdict.err() {
            None => Ok(false),
            Some(err) => {
                // Answered here, before any body is read: close unless there is no body, and
                // always when the framing is in doubt.
                ctx.error = Some(err);
                let close = !session.is_body_empty() || malformed(session);
                let extra = error_fields(session, ctx);
                // Boxed, like every rare path here: the future of the common path stays small
                // (pingora boxes it for every request).
                Box::pin(error::respond_with(
                    session,
                    err,
                    &ctx.request_id,
                    close,
                    &extra,
                    ctx.snapshot.server.header_case,
                ))
                .await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.request_body_filter_now(session.was_upgraded(), body, ctx)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Called again only for a retry: the previous attempt has ended.
        ctx.in_flight = None;
        let snapshot = &*ctx.snapshot;
        let Some(upstream) = ctx
            .route
            .and_then(|i| snapshot.upstreams.get(snapshot.routes[i].upstream))
        else {
            ctx.error = Some(GatewayError::NoRoute);
            return Error::e_explain(ErrorType::HTTPStatus(404), "no route");
        };
        let spec = &upstream.spec;
        let req = session.req_header();
        let key: &[u8] = match &spec.balance {
            crate::upstream::Balance::ConsistentHash(k) => match k {
                HashKey::Header(name) => req.headers.get(name).map_or(&[], |v| v.as_bytes()),
                HashKey::Path => req.uri.path().as_bytes(),
                HashKey::ClientIp => &[], // filled below (needs an owned buffer)
            },
            _ => &[],
        };
        let ip_key;
        let key = if matches!(
            spec.balance,
            crate::upstream::Balance::ConsistentHash(HashKey::ClientIp)
        ) {
            ip_key = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            ip_key.as_bytes()
        } else {
            key
        };
        if ctx.tries >= spec.attempts.min(MAX_ATTEMPTS) {
            ctx.error = Some(GatewayError::BadGateway);
            return Error::e_explain(ErrorType::ConnectError, "no attempts left");
        }
        let (index, probe) = match upstream.select(key, ctx.tried()) {
            Ok(pick) => pick,
            Err(NoBackend::NoneHealthy) => {
                let retry_after = u32::try_from(upstream.retry_after_secs()).unwrap_or(u32::MAX);
                ctx.error = Some(GatewayError::NoHealthyBackend { retry_after });
                return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend");
            }
            Err(NoBackend::AllTried) => {
                ctx.error = Some(GatewayError::BadGateway);
                return Error::e_explain(ErrorType::ConnectError, "every backend was tried");
            }
        };
        // One clock read for the budget's window, the attempt's start and its time left.
        let mut now = clock::now();
        if ctx.tries == 0 {
            upstream.budget.record_request(&spec.budget, clock::ms(now));
        } else {
            metrics::RETRIES.with_label_values(&[&spec.name]).inc();
            // Exponential backoff with full jitter before a retry.
            let cap = spec
                .backoff
                .saturating_mul(1 << (ctx.tries - 1).min(16))
                .min(spec.backoff_max);
            let wait = cap.mul_f64(rand::random::<f64>());
            if !wait.is_zero() {
                Box::pin(tokio::time::sleep(wait)).await;
                now = clock::now();
            }
        }
        ctx.tried[ctx.tries] = index as u16;
        ctx.tries += 1;
        ctx.upstream_started = Some(now);
        ctx.current = Some(Attempt {
            backend: index,
            probe,
            recorded: false,
        });
        ctx.in_flight = Some(crate::health::InFlight::enter(&upstream.backends[index]));

        let t = ctx
            .route
            .and_then(|i| snapshot.routes[i].timeouts)
            .unwrap_or(spec.timeouts);
        let remaining = t
            .total
            .checked_sub(now.saturating_duration_since(ctx.started))
            .unwrap_or(Duration::from_millis(1));
        Ok(Box::new(crate::upstream::peer(
            spec.backends[index].addr,
            &t,
            remaining,
        )))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let outcome = if matches!(e.etype(), ErrorType::ConnectTimedout) {
            breaker::Outcome::Timeout
        } else {
            breaker::Outcome::Connect
        };
        self.record(ctx, outcome);
        // Nothing reached the backend: another backend may take the request.
        e.set_retry(self.may_retry(ctx));
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.upstream_response_filter_now(session, upstream_response, ctx)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        if ctx.serve_stale {
            // A 5xx answer replaced by a stale cached response (fail_to_proxy).
            e.set_retry(false);
            return e;
        }
        if std::mem::take(&mut ctx.status_retry) {
            // Our own retry of a 502/503/504 response: already decided and counted.
            e.set_retry(true);
            return e;
        }
        let timeout = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let from_upstream = e.esource() == &pingora_error::ErrorSource::Upstream;
        if from_upstream {
            self.record(
                ctx,
                if timeout {
                    breaker::Outcome::Timeout
                } else {
                    breaker::Outcome::Error
                },
            );
        }
        if !replayable(session) || !from_upstream {
            e.set_retry(false);
        } else if timeout {
            e.set_retry(self.may_retry(ctx));
        } else {
            // A reused connection the backend had closed: pingora's rule (retry only then).
            e.retry.decide_reuse(client_reused);
            if e.retry() {
                e.set_retry(self.may_retry(ctx));
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.upstream_request_filter_now(session, upstream_request, ctx)?;
        if let Some(c) = ctx.cache.as_deref_mut() {
            // Kept to revalidate the entry later: the request exactly as the backend sees it.
            if matches!(c.status, cache::Status::Miss | cache::Status::Expired)
                && upstream_request.method == http::Method::GET
            {
                c.origin = Some(upstream_request.clone());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.response_filter_now(session, upstream_response, ctx)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(c) = ctx.cache.as_deref_mut() {
            if c.capture.is_some() {
                let route = ctx.route.map_or("", |i| &ctx.snapshot.routes[i].name);
                if let Some(entry) = c.feed(route, body.as_ref(), end_of_stream) {
                    cache::store_l2(&ctx.snapshot, self.cache.epoch(), &c.key, &entry);
                    self.cache.insert(c.key.clone(), entry);
                }
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let err = ctx.error.unwrap_or_else(|| GatewayError::from_pingora(e));
        ctx.error = Some(err);
        let downstream_gone = matches!(
            e.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        ) && e.esource() == &pingora_error::ErrorSource::Downstream;
        if downstream_gone {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        // stale-if-error: an old cached response answers instead of the error.
        let fallback = ctx.cache.as_ref().and_then(|c| c.fallback.clone());
        if let (None, Some(old)) = (session.response_written(), fallback) {
            metrics::CACHE_REQUESTS
                .with_label_values(&[cache_route(ctx), "stale_error"])
                .inc();
            ctx.error = None;
            match self
                .serve_cached(session, ctx, &old, cache::Status::StaleError)
                .await
            {
                Ok(()) => {
                    log::info!(
                        "upstream failed ({}); served a stale cached response",
                        err.code()
                    );
                    return FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    };
                }
                Err(we) => log::debug!("could not send the stale response: {we}"),
            }
        }
        if session.response_written().is_none() {
            let extra = error_fields(session, ctx);
            let case = ctx.snapshot.server.header_case;
            if let Err(we) =
                error::respond_with(session, err, &ctx.request_id, true, &extra, case).await
            {
                log::debug!("could not send error response: {we}");
            }
        }
        log::warn!("request failed: {} ({e})", err.code());
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        self.logging_now(session, _e, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "a-b_c~d.example",
            "xn--bcher-kva.example:1",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "user@example.com",
            "a,b",
            "a/b",
            "a b",
            "a:b:80",
            "example.com:80x",
            "example.com:123456",
            "[::1",
            "[]",
            "[::1]x",
            "[zz::1]",
            "exa\"mple",
            "a{b}",
            "a?b",
            "a#b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    /// The authority check as first written (two passes): the one-pass version must agree.
    fn authority_by_definition(h: &[u8]) -> bool {
        let (host, port) = if h.first() == Some(&b'[') {
            let Some(close) = h.iter().position(|&b| b == b']') else {
                return false;
            };
            let inside = &h[1..close];
            if inside.is_empty()
                || !inside
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return false;
            }
            (&h[..=close], &h[close + 1..])
        } else {
            match h.iter().rposition(|&b| b == b':') {
                Some(i) => (&h[..i], &h[i..]),
                None => (h, &h[h.len()..]),
            }
        };
        let host_ok = host.first() == Some(&b'[')
            || (!host.is_empty() && host.iter().all(|&b| REG_NAME[usize::from(b)]));
        valid_port(port) && host_ok
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_authority_check_agrees_with_the_definition(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "Z", "9", ":", "[", "]", "::1", "80", "123456", ".", "-", "@", " ", "%",
                    "\u{7f}", "é", "/", "_",
                ]),
                0..8,
            )
        ) {
            let h = parts.concat();
            proptest::prop_assert_eq!(valid_authority(h.as_bytes()), authority_by_definition(h.as_bytes()), "{:?}", h);
        }
    }

    #[test]
    fn the_host_byte_table_is_rfc_3986_reg_name() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"-._~!$&'()*+;=%".contains(&b);
            assert_eq!(REG_NAME[usize::from(b)], expected, "byte {b:#04x}");
        }
    }

    #[test]
    fn hop_by_hop_response_headers_are_removed() {
        let mut resp = ResponseHeader::build(200, None).expect("resp");
        resp.insert_header("Connection", "keep-alive, X-Secret")
            .expect("h");
        resp.insert_header("X-Secret", "1").expect("h");
        resp.insert_header("Keep-Alive", "timeout=5").expect("h");
        resp.insert_header("Server", "backend/1.2").expect("h");
        resp.insert_header("X-Kept", "1").expect("h");
        clean_response(&mut resp, false, true);
        for gone in ["x-secret", "keep-alive", "server"] {
            assert!(resp.headers.get(gone).is_none(), "{gone} kept");
        }
        assert!(resp.headers.get("x-kept").is_some());
        // Each of the other hop-by-hop fields, alone, is found and removed.
        for name in ["Proxy-Connection", "TE", "Trailer", "Keep-Alive"] {
            let mut resp = ResponseHeader::build(200, None).expect("resp");
            resp.insert_header(name, "x").expect("h");
            resp.insert_header("Date", "now").expect("h");
            clean_response(&mut resp, false, true);
            assert!(resp.headers.get(name).is_none(), "{name} kept");
            assert!(resp.headers.get("date").is_some());
        }
    }
}
