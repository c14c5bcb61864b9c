//! Active health checks: one probe task per backend that has a check, and the first probe a
//! new backend gets before it takes traffic. The probe itself is pingora's `HttpHealthCheck` /
//! `TcpHealthCheck`, or [`GrpcHealthCheck`] (`grpc.health.v1`, which pingora does not have);
//! this module adds thresholds (through `BackendState::observe`) and a stop handle. It never runs on the request path: requests only read an `AtomicBool`.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::Backend;
use tokio::sync::watch;

use super::backend::BackendState;
use super::spec::{HealthKind, HealthSpec};
use crate::metrics;

/// A running probe task; dropping it stops the task.
pub struct Probe {
    pub spec: HealthSpec,
    stop: watch::Sender<bool>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Dropping the sender alone would also end the loop; say it explicitly.
        let _ = self.stop.send(true);
    }
}

/// Set the `tollgate_backend_healthy` gauge of one backend.
pub fn set_gauge(upstream: &str, addr: SocketAddr, healthy: bool) {
    metrics::BACKEND_HEALTHY
        .with_label_values(&[upstream, &addr.to_string()])
        .set(i64::from(healthy));
}

fn checker(spec: &HealthSpec, addr: SocketAddr) -> Box<dyn HealthCheck + Send + Sync> {
    match spec.kind {
        HealthKind::Grpc => Box::new(GrpcHealthCheck::new(spec, addr)),
        HealthKind::Tcp => {
            let mut check = TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check
        }
        HealthKind::Http => {
            let host = spec.host.clone().unwrap_or_else(|| addr.to_string());
            let mut check = HttpHealthCheck::new(&host, spec.tls.is_some());
            // The upstream's own transport: TLS settings (SNI, verification, CA, client
            // certificate) and HTTP version.
            check.peer_template = super::transport_peer(addr, spec.tls.as_ref(), spec.http2, 1);
            if let Ok(mut req) = RequestHeader::build("GET", spec.path.as_bytes(), None) {
                let _ = req.insert_header("Host", host.as_str());
                let _ = req.insert_header("User-Agent", "tollgate-health-check");
                check.req = req;
            }
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check.peer_template.options.read_timeout = Some(spec.timeout);
            check.peer_template.options.write_timeout = Some(spec.timeout);
            let expect = spec.expect_status.clone();
            check.validator = Some(Box::new(move |resp| {
                if expect.contains(&resp.status.as_u16()) {
                    Ok(())
                } else {
                    Error::e_explain(
                        ErrorType::CustomCode("unexpected status", resp.status.as_u16()),
                        "health check",
                    )
                }
            }));
            Box::new(check)
        }
    }
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: PingoraAddr::Inet(addr),
        weight: 1,
        ext: http::Extensions::new(),
    }
}

/// One probe, bounded by the check's timeout (a stalled backend cannot stall the prober).
pub fn probe_once(
    spec: &HealthSpec,
    addr: SocketAddr,
) -> impl std::future::Future<Output = bool> + Send + 'static {
    let check = checker(spec, addr);
    let timeout = spec.timeout;
    async move {
        let target = backend(addr);
        matches!(
            tokio::time::timeout(timeout, check.check(&target)).await,
            Ok(Ok(()))
        )
    }
}

pub fn start_probe(
    spec: HealthSpec,
    addr: SocketAddr,
    state: Arc<BackendState>,
    upstream: Arc<str>,
) -> Probe {
    let (stop, mut stopped) = watch::channel(false);
    let task_spec = spec.clone();
    tokio::spawn(async move {
        let check = checker(&task_spec, addr);
        let target = backend(addr);
        let mut tick = tokio::time::interval(task_spec.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first check already ran before the backend was published
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let ok = tokio::select! {
                r = tokio::time::timeout(task_spec.timeout, check.check(&target)) => matches!(r, Ok(Ok(()))),
                _ = stopped.changed() => return,
            };
            if let Some(now) = state.observe(ok, &task_spec) {
                set_gauge(&upstream, addr, now);
                let word = if now { "healthy" } else { "unhealthy" };
                log::warn!("health: upstream {upstream} backend {addr} is now {word}");
            }
        }
    });
    Probe { spec, stop }
}

/// `grpc.health.v1.Health/Check` over HTTP/2 (the standard gRPC health protocol): healthy when
/// the call ends with `grpc-status: 0` and the answer's status is `SERVING`.
pub struct GrpcHealthCheck {
    peer: pingora_core::upstreams::peer::HttpPeer,
    service: String,
    host: String,
    connector: pingora_core::connectors::http::Connector,
}

impl GrpcHealthCheck {
    fn new(spec: &HealthSpec, addr: SocketAddr) -> Self {
        let mut peer = super::transport_peer(addr, spec.tls.as_ref(), true, 1);
        // gRPC needs HTTP/2: never fall back to HTTP/1.1.
        peer.options.set_http_version(2, 2);
        peer.options.connection_timeout = Some(spec.timeout);
        peer.options.read_timeout = Some(spec.timeout);
        peer.options.write_timeout = Some(spec.timeout);
        Self {
            peer,
            service: spec.service.clone(),
            host: spec.host.clone().unwrap_or_else(|| addr.to_string()),
            connector: pingora_core::connectors::http::Connector::new(None),
        }
    }

    /// `HealthCheckRequest { service }` in gRPC's length-prefixed framing.
    fn request_body(&self) -> bytes::Bytes {
        let service = self.service.as_bytes();
        let mut msg = Vec::with_capacity(2 + service.len());
        if !service.is_empty() {
            msg.push(0x0a); // field 1, length-delimited
            let mut n = service.len();
            while n >= 0x80 {
                msg.push((n as u8) | 0x80);
                n >>= 7;
            }
            msg.push(n as u8);
            msg.extend_from_slice(service);
        }
        let mut framed = Vec::with_capacity(5 + msg.len());
        framed.push(0);
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        framed.into()
    }
}

fn unhealthy(why: &'static str) -> pingora_error::BError {
    Error::explain(ErrorType::CustomCode("grpc health", 0), why)
}

/// `HealthCheckResponse.status` (field 1, varint) of a framed answer is 1 (SERVING). The
/// message is read field by field (protobuf's wire format); anything malformed is not serving.
pub(crate) fn serving(framed: &[u8]) -> bool {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let Some(len) = framed
        .get(1..5)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
    else {
        return false;
    };
    let Some(msg) = framed.get(5..5 + len) else {
        return false;
    };
    let mut at = 0;
    let mut status = 0;
    while at < msg.len() {
        let Some(tag) = varint(msg, &mut at) else {
            return false;
        };
        let ok = match tag & 7 {
            0 => match varint(msg, &mut at) {
                Some(v) if tag >> 3 == 1 => {
                    status = v;
                    true
                }
                Some(_) => true,
                None => false,
            },
            1 => {
                at += 8;
                true
            }
            2 => match varint(msg, &mut at) {
                Some(n) => {
                    at = at.saturating_add(n as usize);
                    true
                }
                None => false,
            },
            5 => {
                at += 4;
                true
            }
            _ => false,
        };
        if !ok || at > msg.len() {
            return false;
        }
    }
    status == 1
}

#[async_trait::async_trait]
impl HealthCheck for GrpcHealthCheck {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        use pingora_core::protocols::http::client::HttpSession;
        let mut peer = self.peer.clone();
        peer._address = target.addr.clone();
        let (session, _) = self.connector.get_http_session(&peer).await?;
        let HttpSession::H2(mut h2) = session else {
            return Err(unhealthy("the backend does not speak HTTP/2"));
        };
        let mut req = RequestHeader::build("POST", b"/grpc.health.v1.Health/Check", None)?;
        req.insert_header("host", self.host.as_str())?;
        req.insert_header("content-type", "application/grpc")?;
        req.insert_header("te", "trailers")?;
        req.insert_header("user-agent", "tollgate-health-check")?;
        h2.write_request_header(Box::new(req), false)?;
        h2.write_request_body(self.request_body(), true).await?;
        h2.read_response_header().await?;
        if h2.response_header().map(|r| r.status.as_u16()) != Some(200) {
            return Err(unhealthy("HTTP status is not 200"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = h2.read_response_body().await? {
            body.extend_from_slice(&chunk);
            if body.len() > 4096 {
                return Err(unhealthy("answer too large"));
            }
        }
        let status = match h2.read_trailers().await? {
            Some(t) => t.get("grpc-status").map(|v| v.as_bytes().to_vec()),
            None => h2
                .response_header()
                .and_then(|r| r.headers.get("grpc-status"))
                .map(|v| v.as_bytes().to_vec()),
        };
        if status.as_deref() != Some(b"0") {
            return Err(unhealthy("grpc-status is not OK"));
        }
        if !serving(&body) {
            return Err(unhealthy("not SERVING"));
        }
        Ok(())
    }

    fn health_threshold(&self, _success: bool) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::serving;

    #[test]
    fn only_a_serving_answer_is_healthy() {
        assert!(serving(&[0, 0, 0, 0, 2, 0x08, 0x01]));
        assert!(!serving(&[0, 0, 0, 0, 2, 0x08, 0x02])); // NOT_SERVING
        assert!(!serving(&[0, 0, 0, 0, 0])); // UNKNOWN (default 0)
        assert!(!serving(&[0, 0, 0, 0, 5, 0x08])); // truncated
        assert!(!serving(&[]));
        // An unknown length-delimited field before the status is skipped.
        assert!(serving(&[0, 0, 0, 0, 5, 0x12, 0x01, b'x', 0x08, 0x01]));
    }
}
