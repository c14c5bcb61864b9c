//! Active health checks: one probe task per backend that has a check, and the first probe a
//! new backend gets before it takes traffic. The probe itself is pingora's `HttpHealthCheck` /
//! `TcpHealthCheck`; this module adds thresholds (through `BackendState::observe`) and a stop
//! handle. It never runs on the request path: requests only read an `AtomicBool`.

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
