//! The request's OTLP span (feature `otlp`): the two places the request flow touches export.
//! It reads the request's `Ctx` and hands plain facts to `crate::otlp`; it decides nothing
//! about the request and never waits.

use std::time::SystemTime;

use pingora_proxy::Session;

use super::ctx::Ctx;
use crate::http::rules::request_host;
use crate::otlp::{Exporter, Finished};

const H_TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// `early_request_filter`: a trace started here is sampled at `server.otlp.sample_ratio`
/// before its `traceparent` goes upstream (a continued trace keeps the caller's flag).
pub(super) fn sample(ctx: &mut Ctx) {
    if let (Some(exporter), Some(trace)) = (&ctx.snapshot.otlp, ctx.trace.as_mut()) {
        exporter.sample_started(trace);
    }
}

/// `logging`: queue the span of a finished, sampled request (before the access log takes the
/// request id).
pub(super) fn finish(exporter: &Exporter, session: &Session, ctx: &Ctx, status: u16) {
    let Some(trace) = ctx.trace.filter(|t| t.flags & 1 == 1) else {
        return;
    };
    let end = SystemTime::now();
    let req = session.req_header();
    let snapshot = &ctx.snapshot;
    let upstream = ctx.upstream();
    let (consumer, tier) = match &ctx.identity {
        Some(id) => (id.consumer.clone(), snapshot.identity.tiers.get(id.tier)),
        None => (None, snapshot.identity.tiers.first()),
    };
    exporter.record(Finished {
        trace,
        tracestate: req.headers.get(H_TRACESTATE).cloned(),
        start: end
            .checked_sub(crate::clock::since(ctx.started))
            .unwrap_or(end),
        end,
        method: req.method.clone(),
        version: req.version,
        path: req.uri.path().chars().take(2048).collect(),
        host: request_host(req).to_string(),
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        route: ctx.route().map(|r| r.route.name.clone()),
        upstream: upstream.map(|u| u.spec.name.clone()),
        backend: ctx
            .current
            .and_then(|a| upstream.map(|u| u.spec.backends[a.backend].addr)),
        status,
        request_id: ctx.request_id.clone(),
        consumer,
        tier: tier.cloned(),
        error: ctx.error.map(crate::error::GatewayError::code),
        retries: ctx.tries.saturating_sub(1),
    });
}
