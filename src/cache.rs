//! Response cache: per route, in-process (L1, bounded by bytes) with an optional Redis second
//! level (L2) shared by every gateway node, stale-while-revalidate and stale-if-error.
//!
//! What is stored, and for how long (RFC 9111, as a shared cache):
//! - only GET responses (HEAD is answered from them), with status 200, 203, 204, 300, 301, 308,
//!   404 or 410, whose body fits `max_body`, without `Set-Cookie`, whose `Vary` names only
//!   request headers the route lists in `vary`;
//! - never when the upstream says `no-store`, `no-cache` or `private`;
//! - fresh for `s-maxage`, else `max-age`, else the route's `ttl`; then usable for
//!   `stale-while-revalidate` (served at once while one background request refreshes it) and
//!   `stale-if-error` (served when the upstream cannot answer or answers 5xx). Upstream
//!   `stale-while-revalidate=N` / `stale-if-error=N` directives override the route's.
//!
//! The key is the route, the host, the path and query, the values of the `vary` headers, and
//! (with `scope: consumer`, the default on authenticated routes) the consumer. Requests carrying
//! `Authorization` or `Cookie` on a route where the gateway does not authenticate, requests with
//! a body, and `Range` requests bypass the cache. A client's own `Cache-Control` is ignored (as
//! NGINX does): clients cannot empty the cache or force requests through to the upstream.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora_core::connectors::http::Connector;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::clock::UnixMs;
use crate::metrics;
use crate::store::Store;
use crate::upstream::breaker;
use crate::upstream::{Timeouts, Upstream};

/// A route's cache policy (compiled from `routes[].cache`).
/// What the cache needs from the config generation serving a request: a cached route's
/// upstream (to revalidate in the background) and Redis for the second level. Implemented by
/// the snapshot; the cache never sees the snapshot itself.
pub trait Origin: Send + Sync + 'static {
    /// Route `index`'s name, cache policy (if any), upstream and timeouts.
    fn cached_route(&self, index: usize) -> Option<CachedRoute<'_>>;
    /// Redis, when the second level is on.
    fn l2(&self) -> Option<&Arc<Store>>;
    /// `server.hide_backend_server`: a stored response loses its `Server` field.
    fn hide_backend_server(&self) -> bool;
}

/// A cached route as [`Origin::cached_route`] gives it.
pub struct CachedRoute<'a> {
    pub name: &'a Arc<str>,
    pub policy: Option<&'a Policy>,
    pub upstream: &'a Upstream,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub max_body: usize,
    /// Request headers whose values are part of the key (lower case).
    pub vary: Vec<HeaderName>,
    /// The consumer is part of the key.
    pub per_consumer: bool,
    /// The gateway authenticates this route (otherwise credentials-bearing requests bypass).
    pub authenticated: bool,
}

/// Process-wide settings (`cache:` at the top level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// L1 capacity in bytes (bodies, headers and keys).
    pub max_bytes: u64,
    /// Also keep entries in Redis (needs `redis:`).
    pub redis: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            redis: false,
        }
    }
}

/// What the cache did for one request (access log `cache`, metric `result`, `X-Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fresh entry served.
    Hit,
    /// Stale entry served while a background request refreshes it.
    Stale,
    /// Stale entry served because the upstream failed.
    StaleError,
    /// No entry: went upstream.
    Miss,
    /// An entry too old to serve: went upstream.
    Expired,
    /// Not cacheable as asked (method, credentials, body, range): went upstream.
    Bypass,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Stale => "stale",
            Status::StaleError => "stale_error",
            Status::Miss => "miss",
            Status::Expired => "expired",
            Status::Bypass => "bypass",
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Status::Hit => "HIT",
            Status::Stale | Status::StaleError => "STALE",
            Status::Miss => "MISS",
            Status::Expired => "EXPIRED",
            Status::Bypass => "BYPASS",
        }
    }
}

/// One stored response. Times are Unix milliseconds so L2 entries mean the same on every node.
#[derive(Debug, Clone)]
pub struct Entry {
    pub header: ResponseHeader,
    pub body: Bytes,
    pub stored_ms: u64,
    pub fresh_until: u64,
    pub stale_until: u64,
    pub error_until: u64,
    /// The request that produced it, as sent upstream: replayed to revalidate.
    pub origin: RequestHeader,
}

impl Entry {
    fn weight(&self, key: &str) -> u64 {
        let headers: usize = self
            .header
            .headers
            .iter()
            .chain(self.origin.headers.iter())
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        (self.body.len() + headers + key.len() + 256) as u64
    }

    /// Seconds since it was stored (the `Age` header).
    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_ms) / 1000
    }
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<String, Arc<Entry>> for Weigh {
    fn weight(&self, key: &String, val: &Arc<Entry>) -> u64 {
        val.weight(key)
    }
}

/// The outcome of a lookup.
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Past freshness, within stale-while-revalidate.
    Stale(Arc<Entry>),
    /// Too old to serve, kept for stale-if-error (`None`: not usable even then).
    Expired(Option<Arc<Entry>>),
    Miss,
}

pub struct ResponseCache {
    l1: quick_cache::sync::Cache<String, Arc<Entry>, Weigh>,
    /// Keys with a background revalidation in flight (one at a time per key).
    refreshing: Mutex<HashSet<String>>,
    connector: OnceLock<Connector>,
    /// The cluster-wide purge epoch (Redis L2 keys live under it).
    epoch: std::sync::atomic::AtomicU64,
}

impl Default for ResponseCache {
    fn default() -> Self {
        Self::new(Settings::default().max_bytes)
    }
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            l1: quick_cache::sync::Cache::with_weighter(4096, max_bytes.max(1), Weigh),
            refreshing: Mutex::new(HashSet::new()),
            connector: OnceLock::new(),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Follow `cache.max_size` across reloads (evicts when it shrinks).
    pub fn set_capacity(&self, max_bytes: u64) {
        if self.l1.capacity() != max_bytes.max(1) {
            self.l1.set_capacity(max_bytes.max(1));
        }
    }

    pub fn entries(&self) -> usize {
        self.l1.len()
    }

    pub fn bytes(&self) -> u64 {
        self.l1.weight()
    }

    /// Drop every L1 entry; returns how many there were.
    pub fn purge(&self) -> usize {
        let n = self.l1.len();
        self.l1.clear();
        self.gauges();
        n
    }

    fn gauges(&self) {
        metrics::CACHE_ENTRIES.set(i64::try_from(self.l1.len()).unwrap_or(i64::MAX));
        metrics::CACHE_BYTES.set(i64::try_from(self.l1.weight()).unwrap_or(i64::MAX));
    }

    pub fn lookup_l1(&self, key: &str, now: u64) -> Lookup {
        match self.l1.get(key) {
            Some(e) => classify(e, now),
            None => Lookup::Miss,
        }
    }

    pub fn insert(&self, key: String, entry: Arc<Entry>) {
        self.l1.insert(key, entry);
        self.gauges();
    }

    /// Mark `key` as being revalidated; false if a revalidation is already running.
    fn begin_refresh(&self, key: &str) -> bool {
        let mut set = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        if set.contains(key) {
            return false;
        }
        set.insert(key.to_string())
    }

    fn end_refresh(&self, key: &str) {
        self.refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn connector(&self) -> &Connector {
        self.connector.get_or_init(|| Connector::new(None))
    }
}

pub fn classify(e: Arc<Entry>, now: u64) -> Lookup {
    if now < e.fresh_until {
        Lookup::Fresh(e)
    } else if now < e.stale_until {
        Lookup::Stale(e)
    } else if now < e.error_until {
        Lookup::Expired(Some(e))
    } else {
        Lookup::Expired(None)
    }
}

/// Why a request does not use the cache at all, or `None` when it may.
pub fn bypass(policy: &Policy, req: &RequestHeader, body_empty: bool) -> bool {
    let method_ok = req.method == http::Method::GET || req.method == http::Method::HEAD;
    let credentials = !policy.authenticated
        && (req.headers.contains_key(header::AUTHORIZATION)
            || req.headers.contains_key(header::COOKIE));
    !method_ok || !body_empty || credentials || req.headers.contains_key(header::RANGE)
}

/// The cache key: route, host, path and query, `vary` header values, consumer (by scope).
pub fn key(
    route: &str,
    host: &str,
    req: &RequestHeader,
    policy: &Policy,
    consumer: Option<&str>,
) -> String {
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut k = String::with_capacity(route.len() + host.len() + pq.len() + 16);
    k.push_str(route);
    k.push('\n');
    k.push_str(host);
    k.push('\n');
    k.push_str(pq);
    for name in &policy.vary {
        k.push('\n');
        for (i, v) in req.headers.get_all(name).iter().enumerate() {
            if i > 0 {
                k.push(',');
            }
            k.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    if policy.per_consumer {
        k.push('\n');
        k.push_str(consumer.unwrap_or("-"));
    }
    k
}

/// `Cache-Control` directives that matter to a shared cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

pub fn directives(headers: &http::HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else {
            // Unreadable: treat as forbidding storage.
            d.no_store = true;
            continue;
        };
        for part in text.split(',') {
            let (name, arg) = match part.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (part.trim(), None),
            };
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                // `no-cache` (with or without field names) and `private`: not for a shared cache
                // without revalidating every time; simplest correct choice is not to store.
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "max-age" => d.max_age = secs().or(Some(0)),
                "s-maxage" => d.s_maxage = secs().or(Some(0)),
                "stale-while-revalidate" => d.stale_while_revalidate = secs(),
                "stale-if-error" => d.stale_if_error = secs(),
                _ => {}
            }
        }
    }
    d
}

const STORABLE: [u16; 8] = [200, 203, 204, 300, 301, 308, 404, 410];

/// Freshness times for a response, or `None` when it must not be stored.
pub fn storable(policy: &Policy, resp: &ResponseHeader, now: u64) -> Option<(u64, u64, u64)> {
    if !STORABLE.contains(&resp.status.as_u16()) || resp.headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    for v in resp.headers.get_all(header::VARY) {
        let Ok(text) = v.to_str() else { return None };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*"
                || !policy
                    .vary
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name))
            {
                return None;
            }
        }
    }
    let d = directives(&resp.headers);
    if d.no_store || d.no_cache || d.private {
        return None;
    }
    let ttl = d
        .s_maxage
        .or(d.max_age)
        .map_or(policy.ttl, Duration::from_secs);
    if ttl.is_zero() {
        return None;
    }
    let swr = d
        .stale_while_revalidate
        .map_or(policy.stale_while_revalidate, Duration::from_secs);
    let sie = d
        .stale_if_error
        .map_or(policy.stale_if_error, Duration::from_secs);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let fresh = now.saturating_add(ms(ttl));
    let stale = fresh.saturating_add(ms(swr));
    let error = fresh.saturating_add(ms(sie)).max(stale);
    Some((fresh, stale, error))
}

/// A response being captured on its way to the client.
pub struct Capture {
    pub header: ResponseHeader,
    pub body: BytesMut,
    pub times: (u64, u64, u64),
    pub max_body: usize,
}

/// Per-request cache state (only for routes with a cache policy).
pub struct Ctx {
    pub key: String,
    pub status: Status,
    /// An old entry to fall back on if the upstream fails (stale-if-error).
    pub fallback: Option<Arc<Entry>>,
    pub origin: Option<RequestHeader>,
    pub capture: Option<Capture>,
}

impl Ctx {
    /// A body chunk from the upstream; at the end, the entry is built and returned.
    pub fn feed(&mut self, route: &str, body: Option<&Bytes>, end: bool) -> Option<Arc<Entry>> {
        let cap = self.capture.as_mut()?;
        if let Some(b) = body {
            if cap.body.len() + b.len() > cap.max_body {
                self.capture = None;
                metrics::CACHE_STORES
                    .with_label_values(&[route, "too_large"])
                    .inc();
                return None;
            }
            cap.body.extend_from_slice(b);
        }
        if !end {
            return None;
        }
        let mut cap = self.capture.take()?;
        let origin = self.origin.take()?;
        // Stored de-chunked: the length is known now.
        cap.header.remove_header(&header::TRANSFER_ENCODING);
        cap.header
            .insert_header(header::CONTENT_LENGTH, cap.body.len())
            .ok()?;
        metrics::CACHE_STORES
            .with_label_values(&[route, "stored"])
            .inc();
        Some(Arc::new(Entry {
            header: cap.header,
            body: cap.body.freeze(),
            stored_ms: UnixMs::now().0,
            fresh_until: cap.times.0,
            stale_until: cap.times.1,
            error_until: cap.times.2,
            origin,
        }))
    }
}

/// The response header to send for an entry: the stored one plus `Age` and `X-Cache-Status`.
pub fn response_for(
    entry: &Entry,
    status: Status,
    now: u64,
) -> pingora_error::Result<ResponseHeader> {
    let mut h = entry.header.clone();
    h.insert_header(header::AGE, entry.age_secs(now))?;
    h.insert_header("X-Cache-Status", status.header())?;
    Ok(h)
}

/// Refresh a stale entry in the background (once per key at a time). The request replayed is
/// the one that produced the entry, made conditional with its validators; a 304 extends the
/// entry, a storable answer replaces it, anything else leaves it to age out.
pub fn spawn_revalidation<O: Origin>(
    cache: Arc<ResponseCache>,
    snapshot: Arc<O>,
    route: usize,
    key: String,
    entry: Arc<Entry>,
) {
    if !cache.begin_refresh(&key) {
        return;
    }
    tokio::spawn(async move {
        let name = snapshot
            .cached_route(route)
            .map_or_else(|| Arc::from(""), |r| r.name.clone());
        let result = revalidate(&cache, &*snapshot, route, &key, &entry).await;
        let (fresh, label) = match result {
            Ok(r) => r,
            Err(e) => {
                log::debug!("cache revalidation failed for route {name}: {e}");
                (None, "failed")
            }
        };
        // Counted before the entry is visible, so whoever sees the fresh entry sees the count;
        // the key is released after the entry is in: released first, a request in between would
        // still find the stale entry and start a second refresh.
        metrics::CACHE_REVALIDATIONS
            .with_label_values(&[&name, label])
            .inc();
        if let Some(fresh) = fresh {
            store_l2(&*snapshot, cache.epoch(), &key, &fresh);
            cache.insert(key.clone(), fresh);
        }
        cache.end_refresh(&key);
    });
}

async fn revalidate(
    cache: &ResponseCache,
    snapshot: &impl Origin,
    route: usize,
    key: &str,
    entry: &Arc<Entry>,
) -> pingora_error::Result<(Option<Arc<Entry>>, &'static str)> {
    use pingora_error::{Error, ErrorType};
    let Some(r) = snapshot.cached_route(route) else {
        return Ok((None, "uncacheable"));
    };
    let Some(policy) = r.policy else {
        return Ok((None, "uncacheable"));
    };
    let upstream = r.upstream;
    let (index, probe) = upstream
        .select(key.as_bytes(), &[])
        .map_err(|_| Error::explain(ErrorType::ConnectNoRoute, "no healthy backend"))?;
    let t = r.timeouts;
    let peer = crate::upstream::peer(
        upstream.spec.backends[index].addr,
        &upstream.spec,
        &t,
        t.total,
    );
    let mut req = entry.origin.clone();
    if let Some(etag) = entry.header.headers.get(header::ETAG).cloned() {
        req.insert_header(header::IF_NONE_MATCH, etag)?;
    }
    if let Some(lm) = entry.header.headers.get(header::LAST_MODIFIED).cloned() {
        req.insert_header(header::IF_MODIFIED_SINCE, lm)?;
    }
    let connector = cache.connector();
    let work = async {
        let (mut session, _reused) = connector.get_http_session(&peer).await?;
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let resp = session
            .response_header()
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))?;
        let status = resp.status.as_u16();
        let now = UnixMs::now().0;
        let result = if status == 304 {
            // Still valid: the same body with new freshness (from the 304's directives).
            let mut merged = entry.header.clone();
            for name in [
                header::CACHE_CONTROL,
                header::EXPIRES,
                header::ETAG,
                header::DATE,
            ] {
                if let Some(v) = resp.headers.get(&name).cloned() {
                    merged.insert_header(name, v)?;
                }
            }
            storable(policy, &merged, now).map(|times| {
                let mut e = (**entry).clone();
                e.header = merged;
                e.stored_ms = now;
                (e.fresh_until, e.stale_until, e.error_until) = times;
                Arc::new(e)
            })
        } else if let Some(times) = storable(policy, &resp, now) {
            let mut body = BytesMut::new();
            while let Some(chunk) = session.read_response_body().await? {
                if body.len() + chunk.len() > policy.max_body {
                    return Ok((session, None, status));
                }
                body.extend_from_slice(&chunk);
            }
            let mut header = resp.clone();
            crate::http::rules::clean_response(&mut header, false, snapshot.hide_backend_server());
            Some(Arc::new(Entry {
                header,
                body: body.freeze(),
                stored_ms: now,
                fresh_until: times.0,
                stale_until: times.1,
                error_until: times.2,
                origin: entry.origin.clone(),
            }))
        } else {
            None
        };
        // 304 and fully read bodies leave the connection reusable.
        Ok((session, result, status))
    };
    let outcome = tokio::time::timeout(t.total, work).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(_) => Err(Error::explain(
            ErrorType::ReadTimedout,
            "revalidation timed out",
        )),
    };
    match outcome {
        Ok((mut session, result, status)) => {
            upstream.record(index, breaker::Outcome::Status(status), probe);
            if session.response_done() {
                connector
                    .release_http_session(session, &peer, Some(t.idle))
                    .await;
            } else {
                session.shutdown().await;
            }
            let label = match (&result, status) {
                (None, _) => "uncacheable",
                (Some(_), 304) => "not_modified",
                (Some(_), _) => "updated",
            };
            Ok((result, label))
        }
        Err(e) => {
            upstream.record(index, breaker::Outcome::Error, probe);
            Err(e)
        }
    }
}

/// An entry as kept in Redis (postcard-encoded). `v` changes with the layout: other versions
/// are misses.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    v: u8,
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    stored_ms: u64,
    fresh_until: u64,
    stale_until: u64,
    error_until: u64,
    method: String,
    uri: String,
    origin_headers: Vec<(String, Vec<u8>)>,
}

const WIRE_VERSION: u8 = 1;

fn header_pairs(h: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

pub fn encode(e: &Entry) -> Option<Vec<u8>> {
    postcard::to_stdvec(&Wire {
        v: WIRE_VERSION,
        status: e.header.status.as_u16(),
        headers: header_pairs(&e.header.headers),
        body: e.body.to_vec(),
        stored_ms: e.stored_ms,
        fresh_until: e.fresh_until,
        stale_until: e.stale_until,
        error_until: e.error_until,
        method: e.origin.method.as_str().to_string(),
        uri: e.origin.uri.to_string(),
        origin_headers: header_pairs(&e.origin.headers),
    })
    .ok()
}

/// `None` for anything that is not a well-formed entry of this version (a miss, never an error).
pub fn decode(bytes: &[u8]) -> Option<Entry> {
    let w: Wire = postcard::from_bytes(bytes).ok()?;
    if w.v != WIRE_VERSION {
        return None;
    }
    let mut header = ResponseHeader::build(w.status, Some(w.headers.len())).ok()?;
    for (k, v) in w.headers {
        header
            .append_header(k, http::HeaderValue::from_bytes(&v).ok()?)
            .ok()?;
    }
    let mut origin = RequestHeader::build(
        w.method.as_str(),
        w.uri.as_bytes(),
        Some(w.origin_headers.len()),
    )
    .ok()?;
    for (k, v) in w.origin_headers {
        origin
            .append_header(k, http::HeaderValue::from_bytes(&v).ok()?)
            .ok()?;
    }
    Some(Entry {
        header,
        body: Bytes::from(w.body),
        stored_ms: w.stored_ms,
        fresh_until: w.fresh_until,
        stale_until: w.stale_until,
        error_until: w.error_until,
        origin,
    })
}

/// The Redis key of a cache key: hashed (keys hold paths and consumer ids), under the current
/// purge epoch (a purge moves every node to new keys; old ones expire on their own).
fn l2_key(epoch: u64, key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    format!("tollgate:cache:{epoch}:{}", hex::encode(&digest[..16]))
}

/// Where the purge epoch lives (one key, read by every node each second).
pub const EPOCH_KEY: &str = "tollgate:{tg}:cache:epoch";

impl ResponseCache {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follow the cluster-wide purge epoch: a change empties this node's L1 too.
    pub fn observe_epoch(&self, epoch: u64) {
        let old = self.epoch.swap(epoch, std::sync::atomic::Ordering::Relaxed);
        if old != epoch {
            let n = self.purge();
            if n > 0 {
                log::info!("cache purged by another node ({n} entries)");
            }
        }
    }
}

/// Look `key` up in Redis (after an L1 miss). Redis down, slow or holding garbage: a miss.
pub async fn lookup_l2(
    cache: &ResponseCache,
    snapshot: &impl Origin,
    key: &str,
) -> Option<Arc<Entry>> {
    let store = snapshot.l2()?;
    let rkey = l2_key(cache.epoch(), key);
    let got = store
        .call_for_request("cache_get", |mut c| async move {
            redis::cmd("GET")
                .arg(rkey)
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
        })
        .await;
    let result = match &got {
        Ok(Some(_)) => "hit",
        Ok(None) => "miss",
        Err(_) => "error",
    };
    metrics::CACHE_REDIS.with_label_values(&[result]).inc();
    let entry = Arc::new(decode(&got.ok()??)?);
    cache.insert(key.to_string(), entry.clone());
    Some(entry)
}

/// Write an entry to Redis in the background when L2 is on; it expires when it can no longer be
/// served. Failures are counted (Redis errors), never waited for.
pub fn store_l2(snapshot: &impl Origin, epoch: u64, key: &str, entry: &Arc<Entry>) {
    let Some(store) = snapshot.l2() else {
        return;
    };
    let ttl_ms = entry.error_until.saturating_sub(UnixMs::now().0);
    if ttl_ms == 0 {
        return;
    }
    let Some(bytes) = encode(entry) else { return };
    let store = store.clone();
    let rkey = l2_key(epoch, key);
    tokio::spawn(async move {
        let r = store
            .call_for_request("cache_set", |mut c| async move {
                redis::cmd("SET")
                    .arg(rkey)
                    .arg(bytes)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        let result = if r.is_ok() { "stored" } else { "error" };
        metrics::CACHE_REDIS.with_label_values(&[result]).inc();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            ttl: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            max_body: 1024,
            vary: vec![HeaderName::from_static("accept-language")],
            per_consumer: false,
            authenticated: false,
        }
    }

    fn resp(status: u16, headers: &[(&'static str, &'static str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).expect("resp");
        for (k, v) in headers {
            r.append_header(*k, *v).expect("header");
        }
        r
    }

    #[test]
    fn freshness_comes_from_s_maxage_then_max_age_then_ttl() {
        let p = policy();
        let t = storable(&p, &resp(200, &[]), 1000).expect("storable");
        assert_eq!(t, (11_000, 16_000, 71_000));
        let t = storable(&p, &resp(200, &[("cache-control", "max-age=3")]), 0).expect("s");
        assert_eq!(t.0, 3000);
        let r = resp(
            200,
            &[(
                "cache-control",
                "max-age=3, s-maxage=7, stale-while-revalidate=1",
            )],
        );
        assert_eq!(storable(&p, &r, 0), Some((7000, 8000, 67_000)));
        let r = resp(200, &[("cache-control", "public, stale-if-error=2")]);
        assert_eq!(storable(&p, &r, 0), Some((10_000, 15_000, 15_000)));
    }

    #[test]
    fn what_is_never_stored() {
        let p = policy();
        for (status, headers) in [
            (500, vec![]),
            (206, vec![]),
            (302, vec![]),
            (200, vec![("cache-control", "no-store")]),
            (200, vec![("cache-control", "No-Cache")]),
            (200, vec![("cache-control", "private, max-age=60")]),
            (200, vec![("cache-control", "max-age=0")]),
            (200, vec![("set-cookie", "a=b")]),
            (200, vec![("vary", "*")]),
            (200, vec![("vary", "accept-language, cookie")]),
        ] {
            assert_eq!(
                storable(&p, &resp(status, &headers), 0),
                None,
                "{status} {headers:?}"
            );
        }
        let ok = resp(200, &[("vary", "Accept-Language")]);
        assert!(storable(&p, &ok, 0).is_some());
    }

    #[test]
    fn keys_separate_what_must_differ() {
        let mut p = policy();
        let mut a = RequestHeader::build("GET", b"/x?q=1", None).expect("req");
        a.insert_header("accept-language", "en").expect("h");
        let mut b = a.clone();
        b.insert_header("accept-language", "fr").expect("h");
        assert_ne!(key("r", "h", &a, &p, None), key("r", "h", &b, &p, None));
        assert_ne!(key("r", "h", &a, &p, None), key("r2", "h", &a, &p, None));
        assert_ne!(key("r", "h", &a, &p, None), key("r", "h2", &a, &p, None));
        let c = RequestHeader::build("GET", b"/x?q=2", None).expect("req");
        assert_ne!(key("r", "h", &a, &p, None), key("r", "h", &c, &p, None));
        assert_eq!(
            key("r", "h", &a, &p, Some("alice")),
            key("r", "h", &a, &p, Some("bob"))
        );
        p.per_consumer = true;
        assert_ne!(
            key("r", "h", &a, &p, Some("alice")),
            key("r", "h", &a, &p, Some("bob"))
        );
    }

    #[test]
    fn bypass_rules() {
        let p = policy();
        let get = RequestHeader::build("GET", b"/", None).expect("req");
        assert!(!bypass(&p, &get, true));
        assert!(bypass(&p, &get, false), "a body bypasses");
        let post = RequestHeader::build("POST", b"/", None).expect("req");
        assert!(bypass(&p, &post, true));
        let mut auth = get.clone();
        auth.insert_header("authorization", "Bearer x").expect("h");
        assert!(
            bypass(&p, &auth, true),
            "credentials the gateway did not check"
        );
        let mut authed = p.clone();
        authed.authenticated = true;
        assert!(!bypass(&authed, &auth, true));
        let mut range = get.clone();
        range.insert_header("range", "bytes=0-1").expect("h");
        assert!(bypass(&p, &range, true));
    }

    #[test]
    fn lookups_age_through_their_windows() {
        let e = Arc::new(Entry {
            header: resp(200, &[]),
            body: Bytes::from_static(b"x"),
            stored_ms: 0,
            fresh_until: 10,
            stale_until: 20,
            error_until: 30,
            origin: RequestHeader::build("GET", b"/", None).expect("req"),
        });
        assert!(matches!(classify(e.clone(), 5), Lookup::Fresh(_)));
        assert!(matches!(classify(e.clone(), 15), Lookup::Stale(_)));
        assert!(matches!(classify(e.clone(), 25), Lookup::Expired(Some(_))));
        assert!(matches!(classify(e, 30), Lookup::Expired(None)));
    }

    #[test]
    fn the_l1_is_bounded_by_bytes() {
        let cache = ResponseCache::new(64 * 1024);
        for i in 0..100 {
            cache.insert(
                format!("k{i}"),
                Arc::new(Entry {
                    header: resp(200, &[]),
                    body: Bytes::from(vec![0u8; 4096]),
                    stored_ms: 0,
                    fresh_until: u64::MAX,
                    stale_until: u64::MAX,
                    error_until: u64::MAX,
                    origin: RequestHeader::build("GET", b"/", None).expect("req"),
                }),
            );
        }
        assert!(cache.bytes() <= 64 * 1024, "{}", cache.bytes());
        assert!(cache.entries() < 100 && cache.entries() > 0);
        let n = cache.entries();
        assert_eq!(cache.purge(), n);
        assert_eq!(cache.entries(), 0);
    }

    #[test]
    fn redis_entries_round_trip_and_garbage_is_a_miss() {
        let mut origin = RequestHeader::build("GET", b"/a?b=c", None).expect("req");
        origin.insert_header("x-consumer-id", "alice").expect("h");
        let e = Entry {
            header: resp(200, &[("content-type", "text/plain"), ("etag", "\"1\"")]),
            body: Bytes::from_static(b"hello"),
            stored_ms: 1,
            fresh_until: 2,
            stale_until: 3,
            error_until: 4,
            origin,
        };
        let back = decode(&encode(&e).expect("encode")).expect("decode");
        assert_eq!(back.body, e.body);
        assert_eq!(back.header.status, 200);
        assert_eq!(back.header.headers.get("etag").expect("etag"), "\"1\"");
        assert_eq!(back.origin.uri, "/a?b=c");
        assert_eq!(
            back.origin.headers.get("x-consumer-id").expect("h"),
            "alice"
        );
        assert_eq!(
            (
                back.stored_ms,
                back.fresh_until,
                back.stale_until,
                back.error_until
            ),
            (1, 2, 3, 4)
        );
        assert!(decode(b"").is_none());
        assert!(decode(b"not an entry at all").is_none());
        let mut other_version = encode(&e).expect("encode");
        other_version[0] = 99;
        assert!(decode(&other_version).is_none());
    }
}
