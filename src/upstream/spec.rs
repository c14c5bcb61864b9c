//! What the config says of an upstream, compiled: its backends, balancing, health check,
//! timeouts, retries and breaker. Plain data, built by `config` and read by the rest of
//! `upstream`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::breaker::{BreakerSpec, BudgetSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub name: Arc<str>,
    pub backends: Vec<BackendSpec>,
    pub balance: Balance,
    pub health: Option<HealthSpec>,
    pub timeouts: Timeouts,
    /// Total tries per request, first included (>= 1).
    pub attempts: usize,
    pub retry_on: Vec<u16>,
    pub budget: BudgetSpec,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub breaker: Option<BreakerSpec>,
    /// Connect over TLS.
    pub tls: Option<UpstreamTls>,
    /// Speak HTTP/2 to the backends (by ALPN over TLS, by prior knowledge in plain text).
    pub http2: bool,
    /// HTTP/2 streams per backend connection.
    pub max_h2_streams: usize,
}

/// How to connect to an HTTPS upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Sent as SNI and verified against the certificate; empty: the backend's IP is verified
    /// (and no SNI is sent).
    pub sni: String,
    pub verify: bool,
    /// Verify against these CAs instead of the system's trust store.
    pub ca: Option<Arc<pingora_core::protocols::tls::CaType>>,
    /// Present this certificate to the backend.
    pub client: Option<Arc<pingora_core::utils::tls::CertKey>>,
    /// The files the material came from (ca, client cert, client key): equality and display.
    pub source: [Option<String>; 3],
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.sni == other.sni && self.verify == other.verify && self.source == other.source
    }
}

impl Eq for UpstreamTls {}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("source", &self.source)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Random,
    ConsistentHash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    ClientIp,
    Path,
}

impl HashKey {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "client_ip" => Ok(Self::ClientIp),
            "path" => Ok(Self::Path),
            _ => match text.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("invalid header name {name:?}")),
                None => Err(format!(
                    "unknown hash key {text:?}: expected `header:NAME`, `client_ip` or `path`"
                )),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub kind: HealthKind,
    pub path: String,
    pub host: Option<String>,
    pub expect_status: Vec<u16>,
    /// gRPC checks: the service asked about.
    pub service: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    /// HTTP checks go over TLS (and HTTP/2) when the upstream's requests do.
    pub tls: Option<UpstreamTls>,
    pub http2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthKind {
    Http,
    Tcp,
    /// `grpc.health.v1` over HTTP/2 (h2c, or h2 by ALPN over TLS).
    Grpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub total: Duration,
    pub idle: Duration,
}
