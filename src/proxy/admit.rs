//! Admission of a request: the head's own checks, then the route's compiled admission plan
//! (`admission::Plan`: shedding, authentication, rate limit, declared size), then the request
//! body's size and time limits as it streams. Each check may refuse with a `GatewayError`; the
//! answer itself is written by `respond`.

use bytes::Bytes;
use http::header;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::Session;

use super::ctx::{Ctx, HeadFacts};
use crate::admission::Step;
use crate::clock;
use crate::config::schema::UnderscoreHeaders;
use crate::error::GatewayError;
use crate::http::rules::{valid_host, valid_transfer_encoding};
use crate::identity;
use crate::limit::{self, Limiter};
use crate::metrics;

/// The connection's front flagged this request's syntax (see `http::head::HeadScanner`):
/// pingora would repair it or a backend could read it differently. Refused, and the connection
/// closed.
pub fn malformed(session: &Session) -> bool {
    session
        .stream()
        .is_some_and(|s| s.as_any().is::<crate::front::Flagged>())
}

/// A client field the backend never sees: an identity header in any spelling (the gateway
/// asserts identity itself), or a name with an underscore when those are dropped.
pub fn stripped_upstream(name: &str, drop_underscores: bool) -> bool {
    identity::is_identity_header(name) || (drop_underscores && name.contains('_'))
}

/// The request head's own checks, before anything else (synchronous: on a route with an empty
/// admission plan, admission is only this). Records what later phases need in `ctx.head`.
pub fn check_head(session: &Session, ctx: &mut Ctx) -> std::result::Result<(), GatewayError> {
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

/// Whether the matched route's plan has steps to walk (see [`run_plan`]).
#[inline]
pub fn plan_pending(ctx: &Ctx) -> bool {
    ctx.route().is_some_and(|r| !r.admission.is_empty())
}

/// Walk the matched route's admission plan, step by step, in its order.
pub async fn run_plan(
    limiter: &Limiter,
    session: &Session,
    ctx: &mut Ctx,
) -> std::result::Result<(), GatewayError> {
    let snapshot = &*ctx.snapshot;
    let route = ctx
        .route
        .map(|i| &snapshot.routes[i])
        .ok_or(GatewayError::NoRoute)?;
    for step in route.admission.steps() {
        match step {
            Step::ShedGateway(shed) => match Box::pin(shed.admit()).await {
                Some(permit) => ctx.permits.0 = Some(permit),
                None => {
                    metrics::SHED.with_label_values(&["gateway"]).inc();
                    return Err(GatewayError::Overloaded);
                }
            },
            Step::Authenticate => {
                let req = session.req_header();
                let issued = snapshot.shared.as_ref().map(|s| &*s.issued);
                let client_cert = session
                    .digest()
                    .and_then(|d| d.ssl_digest.as_ref())
                    .and_then(|t| t.extension.get::<crate::tls::ClientCert>());
                // Boxed: the request future stays small for routes that never authenticate.
                match Box::pin(identity::authenticate(
                    &snapshot.identity,
                    issued,
                    &route.route.auth,
                    &req.headers,
                    req.uri.query(),
                    client_cert,
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
            Step::RateLimit => {
                let req = session.req_header();
                let store = snapshot.shared.as_ref().map(|s| &s.store);
                let client_ip = session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip());
                // Boxed: the request future stays small for routes without a limit.
                ctx.limit = Box::pin(limiter.check(
                    &snapshot.limits,
                    store,
                    &route.route.limit,
                    &route.route.name,
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
            Step::DeclaredSize(max) => {
                let declared = session
                    .req_header()
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|n| n > *max) {
                    return Err(GatewayError::PayloadTooLarge);
                }
            }
            Step::ShedRoute(shed) => match Box::pin(shed.admit()).await {
                Some(permit) => ctx.permits.1 = Some(permit),
                None => {
                    metrics::SHED.with_label_values(&[&route.route.name]).inc();
                    return Err(GatewayError::Overloaded);
                }
            },
        }
    }
    Ok(())
}

/// A backend to send the request to exists (checked after the cache had its chance).
pub fn available(ctx: &Ctx) -> std::result::Result<(), GatewayError> {
    match ctx.upstream() {
        Some(u) if !u.any_healthy() => {
            let retry_after = u32::try_from(u.retry_after_secs()).unwrap_or(u32::MAX);
            Err(GatewayError::NoHealthyBackend { retry_after })
        }
        _ => Ok(()),
    }
}

/// One chunk of the request body (`None` at its end): the body's total time and size limits.
/// `upgraded`: the connection switched protocols, and the "body" is that protocol's stream.
pub fn body_chunk(
    upgraded: bool,
    req: &pingora_http::RequestHeader,
    body: &Option<Bytes>,
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
    if ctx.body_started.is_none() {
        // A gRPC call's request stream (client streaming, bidirectional) may last as long as
        // the call: like an upgraded connection, only the per-read pause applies to it. Its
        // size limit still does.
        ctx.body_unbounded = ctx.upstream().is_some_and(|u| u.spec.http2)
            && crate::http::grpc::is_grpc(&req.headers);
    }
    let started = *ctx.body_started.get_or_insert_with(clock::now);
    if !ctx.body_unbounded && clock::since(started) > ctx.snapshot.server.body_timeout {
        // A trickling body: the whole body must arrive within body_timeout.
        ctx.error = Some(GatewayError::RequestTimeout);
        return Error::e_explain(ErrorType::ReadTimedout, "request body too slow");
    }
    ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
    let max = ctx.route().and_then(|r| r.route.max_body);
    if max.is_some_and(|m| ctx.body_bytes > m) {
        ctx.error = Some(GatewayError::PayloadTooLarge);
        return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
    }
    Ok(())
}
