//! The admin listener: metrics, status, upstream health, reload, issued keys, the dashboard and
//! its stats. It is a separate pingora service on its own address, so nothing sent to it is
//! ever routed upstream. It reads the serving snapshot and asks the control plane to reload; it
//! never changes state itself (issued keys live in Redis).
//!
//! `docs/admin-openapi.yaml` documents every endpoint in [`ENDPOINTS`]; the integration tests
//! check the running server against it.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{Method, Response};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::control::Control;
use crate::identity::jwt::valid_id;
use crate::store::StoreError;

mod dashboard;
mod stats;

/// Every admin endpoint as (method, path template). Anything else is a JSON 404 (or 405 for a
/// known path with another method).
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/admin/status"),
    ("GET", "/admin/routes"),
    ("GET", "/admin/upstreams"),
    ("GET", "/admin/limits"),
    ("GET", "/admin/stats"),
    ("GET", "/admin/dashboard"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/cache"),
    ("GET", "/admin/certificates"),
    ("POST", "/admin/certificates/{name}/renew"),
    ("DELETE", "/admin/cache"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("DELETE", "/admin/keys/{id}"),
];

/// The template in [`ENDPOINTS`] that `path` matches, if any.
fn template(path: &str) -> Option<&'static str> {
    if let Some(name) = path
        .strip_prefix("/admin/certificates/")
        .and_then(|rest| rest.strip_suffix("/renew"))
    {
        return (!name.is_empty() && !name.contains('/'))
            .then_some("/admin/certificates/{name}/renew");
    }
    if let Some(id) = path.strip_prefix("/admin/keys/") {
        return (!id.is_empty() && !id.contains('/')).then_some("/admin/keys/{id}");
    }
    ENDPOINTS
        .iter()
        .map(|(_, t)| *t)
        .find(|t| *t == path && !t.contains('{'))
}

pub struct Admin {
    pub control: Arc<Control>,
}

fn json_response(status: u16, body: serde_json::Value) -> Response<Vec<u8>> {
    let bytes = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", bytes.len())
        .body(bytes)
        .unwrap_or_default()
}

impl Admin {
    fn status(&self) -> serde_json::Value {
        // The last reload is read before the snapshot: a reload publishes its snapshot before
        // it records its outcome, so the generation shown is never older than the reload shown
        // (the other order let a reload land in between: a new outcome next to an old
        // generation).
        let last_reload = self.control.last_reload();
        let snap = self.control.current.load();
        let uptime = SystemTime::now()
            .duration_since(self.control.started_at)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": uptime,
            "config_file": self.control.path.display().to_string(),
            "config_generation": snap.generation,
            "last_reload": last_reload,
            "health_probes": self.control.registry.probe_count(),
            "in_flight": crate::metrics::IN_FLIGHT.get(),
            "rate_limit": {
                "mode": format!("{:?}", snap.limits.mode).to_lowercase(),
                "on_failure": format!("{:?}", snap.limits.on_failure).to_lowercase(),
                "fallback": self.control.limiter.in_fallback(),
                "nodes": self.control.limiter.nodes.count(),
            },
            "redis": snap.shared.as_ref().map(|s| json!({
                "url": s.store.display_url(),
                "up": s.store.is_up(),
            })),
        })
    }

    fn upstreams(&self) -> serde_json::Value {
        json!({ "upstreams": stats::upstreams_json(&self.control.current.load()) })
    }

    fn limits(&self) -> serde_json::Value {
        let snap = self.control.current.load();
        let tiers: Vec<_> = snap
            .tiers
            .iter()
            .map(|t| {
                json!({
                    "name": &*t.name,
                    "limit": t.limit,
                    "window_seconds": t.window.as_secs_f64(),
                    "burst": (t.burst > 0).then_some(t.burst),
                    "algorithm": match (t.limit, t.burst) {
                        (None, _) => "unlimited",
                        (Some(_), 0) => "sliding_window",
                        _ => "gcra",
                    },
                })
            })
            .collect();
        json!({
            "mode": format!("{:?}", snap.limits.mode).to_lowercase(),
            "on_failure": format!("{:?}", snap.limits.on_failure).to_lowercase(),
            "sync_interval_ms": snap.limits.sync_interval.as_millis() as u64,
            "fallback": self.control.limiter.in_fallback(),
            "nodes": self.control.limiter.nodes.count(),
            "local_keys": self.control.limiter.local.len(),
            "tiers": tiers,
        })
    }

    fn routes(&self) -> serde_json::Value {
        let snap = self.control.current.load();
        let list: Vec<_> = snap
            .routes
            .iter()
            .map(|r| &r.route)
            .map(|r| json!({"name": &*r.name, "upstream": &*snap.upstreams[r.upstream].spec.name}))
            .collect();
        json!({ "routes": list })
    }

    /// The served certificates (never a key) and the TLS listeners.
    fn certificates(&self) -> serde_json::Value {
        let snap = self.control.current.load();
        let now = crate::clock::UnixMs::now().0 as i64 / 1000;
        let certs: Vec<_> = snap
            .tls
            .certificates
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "names": c.names,
                    "subject": c.subject,
                    "issuer": c.issuer,
                    "key_type": c.key_type,
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                    "expires_in_seconds": c.not_after - now,
                    "cert_file": c.cert_file.display().to_string(),
                    "source": "file",
                })
            })
            .collect();
        let listeners: Vec<_> = snap
            .tls
            .listeners
            .iter()
            .map(|l| {
                json!({
                    "addr": l.addr.to_string(),
                    "min_version": l.min_version.as_str(),
                    "http2": l.http2,
                })
            })
            .collect();
        let mut certs = certs;
        let acme: Vec<_> = self.control.acme.statuses();
        for a in &acme {
            let placeholder = snap
                .tls
                .managed
                .iter()
                .find(|m| m.name == a.name)
                .is_some_and(|m| !m.issued() && m.placeholder.is_some());
            certs.push(json!({
                "name": a.name,
                "names": a.hosts,
                "source": "acme",
                "issuer": a.issuer,
                "not_before": a.not_before,
                "not_after": a.not_after,
                "expires_in_seconds": a.not_after.map(|t| t - now),
                "acme": {
                    "state": a.state,
                    "error": a.error,
                    "directory": a.directory,
                    "challenge": a.challenge,
                    "serial": a.serial,
                    "renew_at": a.renew_at,
                    "consecutive_failures": a.consecutive_failures,
                    "next_attempt": a.next_attempt,
                    "orders": a.orders,
                    "serving": if a.not_after.is_some() { "issued" } else if placeholder { "placeholder" } else { "none (handshakes refused)" },
                },
            }));
        }
        json!({ "certificates": certs, "listeners": listeners })
    }
}

/// Read a request body of at most `limit` bytes.
async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Vec<u8>, ()> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = session.read_request_body().await {
        if body.len() + chunk.len() > limit {
            return Err(());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn error(status: u16, code: &str, message: &str) -> Response<Vec<u8>> {
    json_response(status, json!({"error": code, "message": message}))
}

fn store_error(e: StoreError) -> Response<Vec<u8>> {
    let _ = e;
    error(
        503,
        "redis_unavailable",
        "Redis did not answer; nothing was changed",
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    consumer: String,
    tier: String,
    #[serde(default)]
    roles: Vec<String>,
    /// Seconds until the key expires; absent = never.
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Admin {
    /// `Authorization: Bearer <admin token>`, compared in constant time.
    fn authorized(&self, session: &ServerSession) -> bool {
        let snap = self.control.current.load();
        let Some(expected) = &snap.admin_token else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .unwrap_or("");
        bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
    }

    async fn keys(
        &self,
        session: &mut ServerSession,
        method: &Method,
        path: &str,
    ) -> Response<Vec<u8>> {
        let snap = self.control.current.load_full();
        let Some(shared) = &snap.shared else {
            return error(
                409,
                "redis_not_configured",
                "issued keys need a `redis:` section",
            );
        };
        match (method, path.strip_prefix("/admin/keys").unwrap_or("")) {
            (&Method::GET, "") => match shared.issued.list().await {
                Ok(keys) => json_response(200, json!({ "keys": keys })),
                Err(e) => store_error(e),
            },
            (&Method::POST, "") => {
                let Ok(body) = read_body(session, 64 * 1024).await else {
                    return error(413, "body_too_large", "at most 64 KiB");
                };
                let new: NewKey = match serde_json::from_slice(&body) {
                    Ok(n) => n,
                    Err(e) => {
                        return error(
                            400,
                            "invalid_body",
                            &format!("expected {{consumer, tier, roles?, expires_in?}}: {e}"),
                        )
                    }
                };
                if !valid_id(&new.consumer) || new.roles.iter().any(|r| !valid_id(r)) {
                    return error(
                        400,
                        "invalid_body",
                        "consumer and roles are 1-256 visible ASCII characters without commas",
                    );
                }
                if !snap.identity.tier_index.contains_key(&new.tier) || new.tier == "anonymous" {
                    return error(400, "invalid_body", &format!("unknown tier {:?}", new.tier));
                }
                if new.expires_in == Some(0) {
                    return error(400, "invalid_body", "expires_in must be at least 1 second");
                }
                match shared
                    .issued
                    .issue(new.consumer, new.tier, new.roles, new.expires_in)
                    .await
                {
                    Ok((key, record)) => {
                        json_response(201, json!({ "key": key, "record": record }))
                    }
                    Err(e) => store_error(e),
                }
            }
            (&Method::DELETE, id) if id.len() > 1 => match shared.issued.revoke(&id[1..]).await {
                Ok(true) => json_response(200, json!({ "revoked": &id[1..] })),
                Ok(false) => error(404, "not_found", "no such key"),
                Err(e) => store_error(e),
            },
            _ => error(
                405,
                "method_not_allowed",
                "GET or POST /admin/keys, DELETE /admin/keys/{id}",
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let endpoint = template(&path);
        // Everything under /admin needs the token, known or not, except the dashboard page: it
        // holds no data, and asks for the token itself.
        let guarded = (path == "/admin" || path.starts_with("/admin/"))
            && !(endpoint == Some("/admin/dashboard") && method == Method::GET);
        if guarded && !self.authorized(session) {
            let mut r = error(
                401,
                "unauthorized",
                "a valid admin bearer token is required",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static(r#"Bearer realm="tollgate-admin""#),
            );
            return r;
        }
        let Some(endpoint) = endpoint else {
            return error(404, "not_found", "no such admin endpoint");
        };
        if !ENDPOINTS
            .iter()
            .any(|(m, t)| *t == endpoint && *m == method.as_str())
        {
            let allow: Vec<&str> = ENDPOINTS
                .iter()
                .filter(|(_, t)| *t == endpoint)
                .map(|(m, _)| *m)
                .collect();
            let allow = allow.join(", ");
            let mut r = error(
                405,
                "method_not_allowed",
                &format!("{endpoint} answers {allow}"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&allow) {
                r.headers_mut().insert(http::header::ALLOW, v);
            }
            return r;
        }
        if endpoint.starts_with("/admin/keys") {
            return self.keys(session, &method, &path).await;
        }
        match endpoint {
            "/metrics" => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                if encoder.encode(&prometheus::gather(), &mut buf).is_err() {
                    return error(500, "internal_error", "metrics encoding failed");
                }
                Response::builder()
                    .status(200)
                    .header("Content-Type", encoder.format_type())
                    .header("Content-Length", buf.len())
                    .body(buf)
                    .unwrap_or_default()
            }
            "/admin/status" => json_response(200, self.status()),
            "/admin/upstreams" => json_response(200, self.upstreams()),
            "/admin/routes" => json_response(200, self.routes()),
            "/admin/certificates" => json_response(200, self.certificates()),
            "/admin/certificates/{name}/renew" => {
                let name = path
                    .trim_start_matches("/admin/certificates/")
                    .trim_end_matches("/renew");
                if self.control.acme.renew_now(name) {
                    log::info!("acme: renewal of {name} requested by the admin API");
                    json_response(202, json!({ "name": name, "renewal": "started" }))
                } else {
                    error(
                        404,
                        "not_found",
                        "no certificate obtained by ACME has this name",
                    )
                }
            }
            "/admin/limits" => json_response(200, self.limits()),
            "/admin/stats" => json_response(200, stats::stats(&self.control)),
            "/admin/dashboard" => dashboard::response(),
            "/admin/cache" if method == Method::DELETE => {
                let (purged, cluster) = crate::control::purge_cache(&self.control).await;
                log::info!("cache purged by the admin API ({purged} entries here)");
                match cluster {
                    Some(false) => error(
                        503,
                        "redis_unavailable",
                        "this node's cache was purged; the shared (Redis) cache could not be",
                    ),
                    _ => json_response(
                        200,
                        json!({ "purged": purged, "cluster": cluster.is_some() }),
                    ),
                }
            }
            "/admin/cache" => {
                let snap = self.control.current.load();
                json_response(
                    200,
                    json!({
                        "entries": self.control.cache.entries(),
                        "bytes": self.control.cache.bytes(),
                        "max_bytes": snap.cache.max_bytes,
                        "redis": snap.cache.redis,
                        "routes": snap.routes.iter().map(|r| &r.route).filter(|r| r.cache.is_some())
                            .map(|r| r.name.to_string()).collect::<Vec<_>>(),
                    }),
                )
            }
            "/admin/reload" => match self.control.request_reload().await {
                Some(outcome) => {
                    let status = if outcome.ok { 200 } else { 422 };
                    json_response(status, json!(outcome))
                }
                None => error(503, "unavailable", "control plane is not running"),
            },
            _ => error(404, "not_found", "no such admin endpoint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_their_templates_only() {
        assert_eq!(template("/admin/status"), Some("/admin/status"));
        assert_eq!(template("/admin/keys"), Some("/admin/keys"));
        assert_eq!(template("/admin/keys/key_1"), Some("/admin/keys/{id}"));
        for undocumented in [
            "/",
            "/admin",
            "/admin/",
            "/admin/keys/",
            "/admin/keys/a/b",
            "/admin/status/",
            "/metrics/",
        ] {
            assert_eq!(template(undocumented), None, "{undocumented}");
        }
    }
}
