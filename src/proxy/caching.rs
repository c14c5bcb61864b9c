//! The response cache's part in a request on a cached route: look up (L1, then Redis), answer
//! from the cache, keep the request as sent upstream (to revalidate later), capture a storable
//! response as it streams through, and fall back on a stale entry when the upstream fails.
//! What is cacheable and for how long is `cache`'s business; this module only wires it in.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::ctx::Ctx;
use super::fields::add_fields;
use crate::cache::{self, ResponseCache};
use crate::clock::UnixMs;
use crate::http::rules::request_host;
use crate::metrics;
use crate::route;

/// On a cached route: the entry to answer with now, if any. Sets up `ctx.cache` for the trip
/// upstream otherwise (the key, and an old entry for stale-if-error).
async fn lookup(
    cache: &Arc<ResponseCache>,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Option<(Arc<cache::Entry>, cache::Status)> {
    let index = ctx.route?;
    ctx.route()?.route.cache.as_ref()?;
    let snapshot = ctx.snapshot.clone();
    let route = &snapshot.routes[index].route;
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
        let mut found = cache.lookup_l1(&state.key, UnixMs::now().0);
        if matches!(found, cache::Lookup::Miss) && snapshot.cache.redis {
            if let Some(e) = Box::pin(cache::lookup_l2(cache, &*snapshot, &state.key)).await {
                found = cache::classify(e, UnixMs::now().0);
            }
        }
        state.status = match found {
            cache::Lookup::Fresh(e) => {
                serve = Some(e);
                cache::Status::Hit
            }
            cache::Lookup::Stale(e) => {
                cache::spawn_revalidation(
                    cache.clone(),
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
async fn serve(
    session: &mut Session,
    ctx: &mut Ctx,
    entry: &cache::Entry,
    status: cache::Status,
) -> Result<()> {
    if let Some(c) = ctx.cache.as_deref_mut() {
        c.status = status;
    }
    let mut h = cache::response_for(entry, status, UnixMs::now().0)?;
    add_fields(&mut h, ctx)?;
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(h), false).await?;
    let body = (!head && !entry.body.is_empty()).then(|| entry.body.clone());
    session.write_response_body(body, true).await
}

/// On a cached route, before going upstream: answer from the cache if it can (true: answered).
pub async fn answer_from_cache(
    cache: &Arc<ResponseCache>,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<bool> {
    match lookup(cache, session, ctx).await {
        Some((entry, status)) => {
            Box::pin(serve(session, ctx, &entry, status)).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The upstream cannot answer: serve the stale entry kept for stale-if-error, if there is one
/// (true: answered).
pub async fn answer_stale(session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
    let Some(old) = ctx.cache.as_ref().and_then(|c| c.fallback.clone()) else {
        return Ok(false);
    };
    metrics::CACHE_REQUESTS
        .with_label_values(&[ctx.route_name(), "stale_error"])
        .inc();
    Box::pin(serve(session, ctx, &old, cache::Status::StaleError)).await?;
    Ok(true)
}

/// Going upstream on a miss or an expired entry: keep the request exactly as the backend sees
/// it, to revalidate the entry later.
pub fn keep_origin(upstream_request: &RequestHeader, ctx: &mut Ctx) {
    if let Some(c) = ctx.cache.as_deref_mut() {
        if matches!(c.status, cache::Status::Miss | cache::Status::Expired)
            && upstream_request.method == http::Method::GET
        {
            c.origin = Some(upstream_request.clone());
        }
    }
}

/// The response head from upstream: keep a copy of a storable response as it passes, and say
/// what the cache did in `X-Cache-Status`.
pub fn capture(session: &Session, resp: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
    let Some(c) = ctx.cache.as_deref_mut() else {
        return Ok(());
    };
    let snapshot = &ctx.snapshot;
    let route = ctx.route.map(|i| &snapshot.routes[i].route);
    if let (Some(route), Some(policy)) = (route, route.and_then(|r| r.cache.as_ref())) {
        if c.origin.is_some() && session.req_header().method == http::Method::GET {
            let declared = resp
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            let outcome = if declared.is_some_and(|n| n > policy.max_body) {
                Some("too_large")
            } else if let Some(times) = cache::storable(policy, resp, UnixMs::now().0) {
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

/// A chunk of the response body from upstream: fed to the capture; at its end the entry is
/// stored (L1 now, Redis in the background).
pub fn body_chunk(cache: &ResponseCache, body: &Option<Bytes>, end_of_stream: bool, ctx: &mut Ctx) {
    let Some(c) = ctx.cache.as_deref_mut() else {
        return;
    };
    if c.capture.is_some() {
        let route = ctx.route.map_or("", |i| &ctx.snapshot.routes[i].route.name);
        if let Some(entry) = c.feed(route, body.as_ref(), end_of_stream) {
            cache::store_l2(&*ctx.snapshot, cache.epoch(), &c.key, &entry);
            cache.insert(c.key.clone(), entry);
        }
    }
}
