//! The request's start (pingora's `early_request_filter`): keep-alive and body read timeouts,
//! the request id and trace context, the route match, and the route's compression level.
//!
//! Why the route is matched here and not in `request_filter`: pingora's response compression
//! module reads its level when the request header is processed, which is right after this
//! phase, so the route (which owns the level) must be known by then.

use pingora_core::modules::http::compression::ResponseCompression;
use pingora_core::protocols::http::compression::Algorithm;
use pingora_proxy::Session;

use super::ctx::Ctx;
use super::forward::{H_REQUEST_ID, H_TRACEPARENT};
use crate::http::rules::request_host;
use crate::observe;
use crate::route;

/// Set up the request: `draining` is true while the process hands over or shuts down.
pub fn begin(draining: bool, session: &mut Session, ctx: &mut Ctx) {
    // pingora's default keep-alive never times out (#447). Where pingora turned keep-alive
    // off for this request (`Connection: close`, HTTP/1.0 without keep-alive, or both
    // Transfer-Encoding and Content-Length: RFC 9112 §6.1), it stays off.
    if draining || session.get_keepalive().is_none() {
        session.set_keepalive(None);
    } else {
        session.set_keepalive(Some(ctx.snapshot.keepalive_secs));
    }
    // A stalled request body: the longest pause between two reads.
    session.set_read_timeout(Some(ctx.snapshot.server.body_timeout));
    ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    let req = session.req_header();
    let server = &ctx.snapshot.server;
    if server.request_id_header || server.access_log != observe::LogTarget::Off {
        ctx.request_id = observe::request_id(req.headers.get(H_REQUEST_ID).map(|v| v.as_bytes()));
    }
    if server.trace_context {
        ctx.trace = Some(observe::TraceParent::next(
            req.headers.get(H_TRACEPARENT).map(|v| v.as_bytes()),
        ));
        #[cfg(feature = "otlp")]
        super::span::sample(ctx);
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
        .position(|r| r.route.matches(&host, req.uri.path(), &req.method));
    if ctx.route().is_some_and(|r| r.route.grpc_web) {
        if let Some(bridge) = session
            .downstream_modules_ctx
            .get_mut::<pingora_core::modules::http::grpc_web::GrpcWebBridge>()
        {
            bridge.init();
        }
    }
    if let Some(z) = ctx.route().and_then(|r| r.route.compression) {
        if let Some(c) = session
            .downstream_modules_ctx
            .get_mut::<ResponseCompression>()
        {
            c.adjust_algorithm_level(Algorithm::Gzip, z.gzip);
            c.adjust_algorithm_level(Algorithm::Brotli, z.brotli);
            c.adjust_algorithm_level(Algorithm::Zstd, z.zstd);
        }
    }
}
