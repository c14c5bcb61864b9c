//! The request's end (pingora's `logging`): per-route metrics, the OTLP span (feature `otlp`)
//! and the JSON access log line, formatted by `access_log` into the thread's buffer.

use pingora_error::Error;
use pingora_proxy::Session;

use super::ctx::Ctx;
use crate::access_log;
use crate::clock;
use crate::error::GatewayError;
use crate::limit;
use crate::metrics;

/// Account for the finished request.
pub fn finish(session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
    metrics::IN_FLIGHT.dec();
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .or(ctx.error.map(GatewayError::status))
        .unwrap_or(0);
    let snapshot = &ctx.snapshot;
    let total = clock::since(ctx.started);
    let upstream = ctx.upstream_took.map(|d| d.as_secs_f64());
    let mi = metrics::method_index(&session.req_header().method);
    let route_metrics = match ctx.route {
        Some(i) => &snapshot.routes[i].metrics,
        None => &snapshot.unrouted_metrics,
    };
    route_metrics.observe(mi, status, total.as_secs_f64(), upstream);
    #[cfg(feature = "otlp")]
    if let Some(exporter) = &snapshot.otlp {
        super::span::finish(exporter, session, ctx, status);
    }
    if snapshot.server.access_log == access_log::LogTarget::Off {
        return;
    }
    let req = session.req_header();
    let backend = ctx
        .current
        .and_then(|a| ctx.upstream().map(|u| u.spec.backends[a.backend].addr));
    let tiers = &snapshot.identity.tiers;
    let (consumer, tier) = match &ctx.identity {
        Some(id) => (id.consumer.as_deref(), tiers.get(id.tier).map(|t| &**t)),
        None => (None, tiers.first().map(|t| &**t)),
    };
    let line = access_log::Line {
        time: std::time::SystemTime::now(),
        request_id: &ctx.request_id,
        trace_id: ctx.trace.as_ref().map(|t| &t.trace_id),
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        method: req.method.as_str(),
        path: req.uri.path(),
        route: ctx.route().map_or("", |r| &*r.route.name),
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
    access_log::log(&snapshot.server.access_log, &line);
}
