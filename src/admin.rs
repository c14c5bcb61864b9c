//! The admin listener: metrics, status, upstream health and reload. It is a separate pingora
//! service on its own address, so nothing sent to it is ever routed upstream. It reads the
//! serving snapshot and asks the control plane to reload; it never changes state itself.

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
            "last_reload": self.control.last_reload(),
            "health_probes": self.control.book.probe_count(),
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
        let snap = self.control.current.load();
        let list: Vec<_> = snap
            .upstreams
            .iter()
            .map(|u| {
                let backends: Vec<_> = u
                    .spec
                    .backends
                    .iter()
                    .zip(&u.backends)
                    .map(|(b, s)| {
                        json!({
                            "addr": b.addr.to_string(),
                            "weight": b.weight,
                            "healthy": s.is_healthy(),
                            "breaker": s.breaker.state().as_str(),
                            "breaker_transitions": s.breaker.transitions.load(std::sync::atomic::Ordering::Relaxed),
                        })
                    })
                    .collect();
                json!({"name": &*u.spec.name, "backends": backends})
            })
            .collect();
        json!({ "upstreams": list })
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
            .map(|r| json!({"name": &*r.name, "upstream": &*snap.upstreams[r.upstream].spec.name}))
            .collect();
        json!({ "routes": list })
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
            (&Method::GET, "" | "/") => match shared.issued.list().await {
                Ok(keys) => json_response(200, json!({ "keys": keys })),
                Err(e) => store_error(e),
            },
            (&Method::POST, "" | "/") => {
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
        if path.starts_with("/admin/") && !self.authorized(session) {
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
        if path == "/admin/keys" || path.starts_with("/admin/keys/") {
            return self.keys(session, &method, &path).await;
        }
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                if encoder.encode(&prometheus::gather(), &mut buf).is_err() {
                    return json_response(
                        500,
                        json!({"error": "internal_error", "message": "metrics encoding failed"}),
                    );
                }
                Response::builder()
                    .status(200)
                    .header("Content-Type", encoder.format_type())
                    .header("Content-Length", buf.len())
                    .body(buf)
                    .unwrap_or_default()
            }
            (Method::GET, "/admin/status") => json_response(200, self.status()),
            (Method::GET, "/admin/upstreams") => json_response(200, self.upstreams()),
            (Method::GET, "/admin/routes") => json_response(200, self.routes()),
            (Method::GET, "/admin/limits") => json_response(200, self.limits()),
            (Method::POST, "/admin/reload") => match self.control.request_reload().await {
                Some(outcome) => {
                    let status = if outcome.ok { 200 } else { 422 };
                    json_response(status, json!(outcome))
                }
                None => json_response(
                    503,
                    json!({"error": "unavailable", "message": "control plane is not running"}),
                ),
            },
            _ => json_response(
                404,
                json!({"error": "not_found", "message": "no such admin endpoint"}),
            ),
        }
    }
}
