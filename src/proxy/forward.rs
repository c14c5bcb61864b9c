//! The request as the backend gets it: identity headers replaced by the gateway's own assertion,
//! request id and trace context, a Host for HTTP/2 and absolute-form requests, one
//! Content-Length, the route's path rewrite in origin-form, and X-Forwarded-*. pingora has
//! already removed hop-by-hop fields and every field named in `Connection`
//! (`sanitize_h1_upstream_request`) before this runs.

use http::header::{self, HeaderName};
use http::{HeaderValue, Uri};
use pingora_error::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::admit::stripped_upstream;
use super::ctx::Ctx;
use crate::config::schema::UnderscoreHeaders;
use crate::http::rules::request_host;
use crate::identity;

pub const H_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const H_TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const H_XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const H_XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const H_XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Rewrite `upstream_request` (a copy of the client's request head) for the backend.
pub fn prepare(
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &mut Ctx,
) -> Result<()> {
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
    let route = ctx.route().map(|r| &r.route);
    match &ctx.identity {
        // No authentication ran (auth: none): nothing to assert to the backend.
        None if route.is_some_and(|r| r.auth.mode == identity::Mode::None) => {}
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
            (Some(first), second) if second.is_some() || first.as_bytes().contains(&b',') => first
                .to_str()
                .ok()
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_string()),
            _ => None,
        }
    } else {
        None
    };
    if let Some(n) = merged_length {
        upstream_request.insert_header(header::CONTENT_LENGTH, n)?;
    }

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

    // What is left of a gRPC call's deadline travels on (the backend enforces it too).
    if let Some(deadline) = ctx.grpc_deadline {
        let left = deadline.saturating_duration_since(crate::clock::now());
        upstream_request.insert_header("grpc-timeout", crate::http::grpc::format_timeout(left))?;
    }
    if !snapshot.server.forwarded_headers {
        return Ok(());
    }
    if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
        let prev = upstream_request
            .headers
            .get(H_XFF)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|p| !p.is_empty());
        let mut xff = Vec::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39);
        if let Some(p) = prev {
            xff.extend_from_slice(p.as_bytes());
            xff.extend_from_slice(b", ");
        }
        crate::http::text::ip_text(&mut xff, addr.ip());
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
            upstream_request.insert_header(H_XFF, v)?;
        }
    }
    // Set, never trusted from the client.
    let proto = if ctx.tls { "https" } else { "http" };
    upstream_request.insert_header(H_XFP, HeaderValue::from_static(proto))?;
    if let Some(h) = host {
        upstream_request.insert_header(H_XFH, h)?;
    }
    Ok(())
}
