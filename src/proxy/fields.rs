//! The fields Tollgate adds to what goes back to the client: the request id and the
//! rate-limit fields, on proxied responses, cached answers and error answers alike.

use http::HeaderValue;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::Ctx;
use super::forward::H_REQUEST_ID;
use crate::http::fields::{self, Field};
use crate::limit;
use crate::observe;

/// The route's rate-limit fields for this request's decision, handed to `add` (none when no
/// limit applied).
fn limit_fields(ctx: &Ctx, add: impl FnMut(&'static Field, HeaderValue)) {
    if let Some(r) = ctx.route() {
        limit::headers(
            &ctx.limit,
            &r.route.limit,
            &ctx.snapshot.identity.tiers,
            add,
        );
    }
}

/// Add X-Request-Id (unless turned off) and the rate-limit fields to a response going to the
/// client, spelled as `server.preserve_header_case` says.
pub fn add_fields(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    let limited = !matches!(ctx.limit, limit::Outcome::Unlimited);
    let at_most = 2 + if limited { limit::MAX_FIELDS } else { 0 };
    let mut add = fields::Adder::new(resp, ctx.snapshot.server.header_case, at_most);
    if ctx.snapshot.server.request_id_header {
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            add.insert(&fields::REQUEST_ID, v);
        }
    }
    // HSTS only over TLS (RFC 6797 §7.2: a plain-HTTP response must not carry it).
    if ctx.tls {
        if let Some(v) = ctx.route().and_then(|r| r.route.hsts.clone()) {
            add.insert(&fields::HSTS, v);
        }
    }
    if limited {
        limit_fields(ctx, |f, v| add.insert(f, v));
    }
    add.finish()
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

/// The fields of an error answer: the rate-limit fields of an admitted request (Retry-After
/// comes from the error itself) and, always, the request id.
pub fn error_fields(session: &Session, ctx: &mut Ctx) -> Vec<(&'static Field, HeaderValue)> {
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
