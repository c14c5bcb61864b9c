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
use serde_json::json;

use crate::control::Control;

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
                        json!({"addr": b.addr.to_string(), "weight": b.weight, "healthy": s.is_healthy()})
                    })
                    .collect();
                json!({"name": &*u.spec.name, "backends": backends})
            })
            .collect();
        json!({ "upstreams": list })
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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
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
