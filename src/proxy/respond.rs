//! What goes back to the client: the backend's response head cleaned of hop-by-hop fields
//! with Tollgate's fields added (request id, rate-limit fields), and the gateway's own answers
//! — a refusal before going upstream, and the one mapping of a failed request to its JSON
//! error answer (`error::respond_with`) or a stale cached response.

use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, Session};

use super::admit::malformed;
use super::caching;
use super::ctx::Ctx;
use super::fields::{add_fields, error_fields};
use crate::error::{self, GatewayError};
use crate::http::rules::clean_response;

/// The backend's response head on its way to the client.
pub fn response_head(
    session: &Session,
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
        caching::capture(session, upstream_response, ctx)?;
    }
    add_fields(upstream_response, ctx)
}

/// Refuse the request before it goes upstream: its JSON error answer. Answered before any body
/// is read: the connection closes unless there is no body, and always when the framing is in
/// doubt.
pub async fn refuse(session: &mut Session, ctx: &mut Ctx, err: GatewayError) -> Result<()> {
    ctx.error = Some(err);
    let close = !session.is_body_empty() || malformed(session);
    let extra = error_fields(session, ctx);
    error::respond_with(
        session,
        err,
        &ctx.request_id,
        close,
        &extra,
        ctx.snapshot.server.header_case,
    )
    .await
}

/// The request failed (pingora's `fail_to_proxy`): the ONE place a failure becomes an answer —
/// nothing when the client is gone, a stale cached response when the route keeps one
/// (stale-if-error), else the error's JSON answer.
pub async fn failed(session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
    let err = ctx.error.unwrap_or_else(|| GatewayError::from_pingora(e));
    ctx.error = Some(err);
    let downstream_gone = matches!(
        e.etype(),
        ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
    ) && e.esource() == &ErrorSource::Downstream;
    if downstream_gone {
        // Not the client's mistake to answer, and no answer can reach it: logged as NGINX's 499.
        ctx.error = Some(GatewayError::ClientClosed);
        return FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
    }
    // stale-if-error: an old cached response answers instead of the error.
    if session.response_written().is_none()
        && ctx.cache.as_ref().is_some_and(|c| c.fallback.is_some())
    {
        ctx.error = None;
        match caching::answer_stale(session, ctx).await {
            Ok(_) => {
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
    if session.response_written().is_some()
        && session.is_http2()
        && crate::http::grpc::is_grpc(&session.req_header().headers)
    {
        // A gRPC call whose response had started (the backend's headers went out): end it
        // with the status in trailers, as a gRPC server would, instead of a bare reset.
        if let Err(we) = error::grpc_trailers(session, err, &ctx.request_id).await {
            log::debug!("could not send the gRPC trailers: {we}");
        }
    } else if session.response_written().is_none() {
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

/// A plain-HTTP request on a `redirect_https` route: `308` to the same host, path and query
/// over HTTPS (on the first TLS listener's port when it is not 443). A request without a
/// usable host gets the usual 400.
pub async fn redirect_https(session: &mut Session, ctx: &mut Ctx) -> Result<()> {
    let req = session.req_header();
    let host = crate::http::rules::request_host(req);
    let host = crate::route::normalize_host(host);
    if host.is_empty() {
        return refuse(session, ctx, GatewayError::BadRequest).await;
    }
    let port = match ctx.snapshot.server.listen_tls.first().map(|a| a.port()) {
        Some(p) if p != 443 => format!(":{p}"),
        _ => String::new(),
    };
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    let mut resp = ResponseHeader::build(308, Some(4))?;
    resp.insert_header(http::header::LOCATION, location)?;
    resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
    super::fields::add_fields(&mut resp, ctx)?;
    ctx.error = None;
    let keepalive = session
        .is_body_empty()
        .then_some(ctx.snapshot.keepalive_secs);
    session.set_keepalive(keepalive);
    session.write_response_header(Box::new(resp), true).await
}

/// An ACME HTTP-01 validation request (`/.well-known/acme-challenge/TOKEN`): the key
/// authorization as `text/plain` when an order of this node (or, with Redis, of the fleet) has
/// that token, else `404` with the JSON error.
pub async fn acme_http01(
    acme: &crate::acme::Acme,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<()> {
    let path = session.req_header().uri.path();
    let token = path
        .strip_prefix(crate::acme::HTTP01_PREFIX)
        .unwrap_or_default()
        .to_string();
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let answer = if valid {
        acme.http01(&token).await
    } else {
        None
    };
    let Some(body) = answer else {
        return refuse(session, ctx, GatewayError::UnknownChallenge).await;
    };
    let mut resp = ResponseHeader::build(200, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    add_fields(&mut resp, ctx)?;
    ctx.error = None;
    let keepalive = session
        .is_body_empty()
        .then_some(ctx.snapshot.keepalive_secs);
    session.set_keepalive(keepalive);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(bytes::Bytes::from(body)), true)
        .await
}
