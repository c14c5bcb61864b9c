//! The request flow, top-down, in one place. `Gateway` implements pingora's `ProxyHttp` and only
//! dispatches: each phase is one call into the module that owns the concern. The chart lists
//! every phase the impl overrides, in the order pingora runs them (a unit test keeps the two
//! equal):
//!
//! ```text
//! new_ctx                        pin the snapshot for the whole request (ctx)
//! init_downstream_modules        response compression and gRPC-web, off until a route turns
//!                                them on
//! early_request_filter           keep-alive, request id, trace, route match, compression (start)
//! request_filter                 head checks -> HTTPS redirect -> admission plan -> cache ->
//!                                healthy backend?; any of them may answer here (admit,
//!                                caching, respond)
//! request_body_filter            the body's size and time limits as it streams (admit)
//! upstream_peer                  pick a healthy, untried backend; every timeout (attempt)
//! fail_to_connect                nothing was sent: retry elsewhere within the budget (attempt)
//! upstream_request_filter        the request as the backend gets it (forward, caching)
//! upstream_response_filter       breaker accounting; a 5xx retried or replaced (attempt)
//! error_while_proxy              breaker accounting; the retry decision (attempt)
//! response_filter                hop-by-hop removal, cache capture, added fields (respond)
//! upstream_response_body_filter  the cache's copy of the body (caching)
//! fail_to_proxy                  the ONE place a failure becomes an answer (respond)
//! logging                        attempt end, metrics, span, access log (attempt, log)
//! ```
//!
//! Why this order: the route is matched in `early_request_filter` because pingora's compression
//! module reads its level right after that phase; head checks come before the admission plan so
//! a malformed request costs nothing more; authentication precedes the rate limit so that the
//! limit is keyed by identity (see `admission`); the cache is consulted only for admitted
//! requests, and before backend health, so a cached route answers while its backends are down.
//!
//! The phases' work is synchronous where it can be (plain `fn`s in the concern modules): pingora
//! boxes every phase's future, and a small future is cheaper to make.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::modules::http::compression::ResponseCompressionBuilder;
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::cache::ResponseCache;
use crate::error::GatewayError;
use crate::limit::Limiter;
use crate::metrics;
use crate::snapshot::SharedSnapshot;

mod admit;
mod attempt;
mod caching;
mod ctx;
mod fields;
mod forward;
mod log;
mod respond;
#[cfg(feature = "otlp")]
mod span;
mod start;

pub use ctx::Ctx;

pub struct Gateway {
    pub current: SharedSnapshot,
    /// pingora's gRPC-web module is installed (some route of the starting config has
    /// `grpc_web`): without such a route, requests pay nothing for it.
    pub grpc_web: bool,
    pub limiter: Arc<Limiter>,
    /// True while handing over to a new process or shutting down (see `control`).
    pub draining: Arc<AtomicBool>,
    pub cache: Arc<ResponseCache>,
    /// ACME challenge answers (HTTP-01).
    pub acme: Arc<crate::acme::Acme>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        metrics::IN_FLIGHT.inc();
        Ctx::new(self.current.load_full())
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // Level 0 = off; routes turn it on per request.
        modules.add_module(ResponseCompressionBuilder::enable(0));
        if self.grpc_web {
            // Off until a `grpc_web` route turns it on (start::begin).
            modules.add_module(Box::new(pingora_core::modules::http::grpc_web::GrpcWeb));
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        start::begin(self.draining.load(Ordering::Relaxed), session, ctx);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let mut verdict = admit::check_head(session, ctx);
        // ACME HTTP-01 validations: answered before routing, never upstream, never limited.
        if ctx.snapshot.acme_http01
            && matches!(verdict, Ok(()) | Err(GatewayError::NoRoute))
            && session
                .req_header()
                .uri
                .path()
                .starts_with(crate::acme::HTTP01_PREFIX)
        {
            Box::pin(respond::acme_http01(&self.acme, session, ctx)).await?;
            return Ok(true);
        }
        if !ctx.tls
            && matches!(verdict, Ok(()) | Err(GatewayError::NoRoute))
            && (ctx.snapshot.server.redirect_https
                || ctx.route().is_some_and(|r| r.route.redirect_https))
        {
            Box::pin(respond::redirect_https(session, ctx)).await?;
            return Ok(true);
        }
        if verdict.is_ok() && admit::plan_pending(ctx) {
            verdict = admit::run_plan(&self.limiter, session, ctx).await;
        }
        if verdict.is_ok() {
            // Only routes with a cache policy look anything up.
            if ctx.route().is_some_and(|r| r.route.cache.is_some())
                && caching::answer_from_cache(&self.cache, session, ctx).await?
            {
                return Ok(true);
            }
            verdict = admit::available(ctx);
        }
        match verdict {
            Ok(()) => Ok(false),
            Err(GatewayError::NoHealthyBackend { .. })
                if Box::pin(caching::answer_stale(session, ctx)).await? =>
            {
                Ok(true)
            }
            Err(err) => {
                // Boxed, like every rare path here: the future of the common path stays small
                // (pingora boxes it for every request).
                Box::pin(respond::refuse(session, ctx, err)).await?;
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
        admit::body_chunk(session.was_upgraded(), session.req_header(), body, ctx)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        attempt::next_peer(session, ctx).await
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        e: Box<Error>,
    ) -> Box<Error> {
        attempt::connect_failed(ctx, e)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        forward::prepare(session, upstream_request, ctx)?;
        caching::keep_origin(upstream_request, ctx);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        attempt::response_arrived(session, upstream_response, ctx)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        attempt::proxy_failed(peer, session, e, ctx, client_reused)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        respond::response_head(session, upstream_response, ctx)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        caching::body_chunk(&self.cache, body, end_of_stream, ctx);
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        respond::failed(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        attempt::finish(ctx);
        log::finish(session, e, ctx);
    }
}

#[cfg(test)]
mod tests {
    /// The phases named in the chart at the top of this file, in order.
    fn chart() -> Vec<String> {
        let src = include_str!("mod.rs");
        let start = src.find("//! ```text\n").expect("chart start") + "//! ```text\n".len();
        let end = start + src[start..].find("//! ```\n").expect("chart end");
        src[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The methods `impl ProxyHttp for Gateway` overrides, in source order.
    fn overridden() -> Vec<String> {
        let src = include_str!("mod.rs");
        let start = src.find("impl ProxyHttp for Gateway {").expect("impl");
        let body = &src[start..];
        let end = body.find("\n}\n").expect("impl end");
        body[..end]
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let l = l.strip_prefix("async ").unwrap_or(l);
                let name = l.strip_prefix("fn ")?;
                Some(name[..name.find(['(', '<'])?].to_string())
            })
            .collect()
    }

    /// pingora's phases in the order it runs them (`pingora-proxy`'s `proxy_trait.rs`):
    /// the chart must follow it.
    const PINGORA_ORDER: [&str; 14] = [
        "new_ctx",
        "init_downstream_modules",
        "early_request_filter",
        "request_filter",
        "request_body_filter",
        "upstream_peer",
        "fail_to_connect",
        "upstream_request_filter",
        "upstream_response_filter",
        "error_while_proxy",
        "response_filter",
        "upstream_response_body_filter",
        "fail_to_proxy",
        "logging",
    ];

    #[test]
    fn the_phase_chart_lists_every_overridden_phase_in_pingoras_order() {
        let chart = chart();
        let implemented = overridden();
        assert!(!implemented.is_empty());
        assert_eq!(chart, implemented, "chart vs impl ProxyHttp");
        let mut order = chart.iter().map(|p| {
            PINGORA_ORDER
                .iter()
                .position(|q| q == p)
                .unwrap_or_else(|| panic!("{p} is not a known phase: add it to PINGORA_ORDER"))
        });
        let mut last = order.next().expect("a phase");
        for i in order {
            assert!(i > last, "{} is out of pingora's order", PINGORA_ORDER[i]);
            last = i;
        }
    }
}
