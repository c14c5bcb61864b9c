//! The YAML file as written: serde types and nothing else. Every struct rejects unknown keys so a
//! typo in a gateway's config is an error with its location, never a silently ignored setting.
//! These types never reach the request path; `snapshot` compiles them into runtime types.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    /// Optional; without it the gateway is a single node (issued keys and shared limits off).
    #[serde(default)]
    pub redis: Option<RedisSection>,
    /// Tier name -> policy. `anonymous`, `free`, `pro` and `enterprise` always exist.
    #[serde(default)]
    pub tiers: BTreeMap<String, TierSection>,
    #[serde(default)]
    pub consumers: Vec<ConsumerSection>,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub rate_limit: RateLimitSection,
    /// Response cache capacity and levels (routes opt in with `routes[].cache`).
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// Certificates for the TLS listeners (`server.listen_tls`).
    #[serde(default)]
    pub tls: TlsSection,
}

/// Certificates served by the TLS listeners, chosen per handshake by SNI.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    #[serde(default)]
    pub certificates: Vec<CertificateSection>,
    /// The certificate (by name) for clients that send no SNI or a name no certificate
    /// covers; absent: such handshakes are refused.
    #[serde(default)]
    pub default_certificate: Option<String>,
    /// Settings shared by the certificates obtained by ACME (`certificates[].acme`).
    #[serde(default)]
    pub acme: AcmeSection,
}

/// `tls.acme`: where ACME accounts and certificates are kept, and the timings of orders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    /// `auto` (Redis when a `redis:` section exists, else disk), `disk` or `redis`.
    #[serde(default)]
    pub store: AcmeStoreKind,
    /// The directory of the disk store (relative paths: from the config file's directory).
    #[serde(default = "default_acme_dir")]
    pub storage_dir: String,
    /// Until a first certificate is issued: `placeholder` (a self-signed certificate) or
    /// `refuse` (the handshake fails).
    #[serde(default)]
    pub until_issued: UntilIssued,
    #[serde(default = "default_acme_check", deserialize_with = "duration")]
    pub check_interval: Duration,
    #[serde(default = "default_acme_retry_min", deserialize_with = "duration")]
    pub retry_min: Duration,
    #[serde(default = "default_acme_retry_max", deserialize_with = "duration")]
    pub retry_max: Duration,
    #[serde(default = "default_acme_lease", deserialize_with = "duration")]
    pub lock_lease: Duration,
    #[serde(default = "default_acme_order_timeout", deserialize_with = "duration")]
    pub order_timeout: Duration,
}

impl Default for AcmeSection {
    fn default() -> Self {
        Self {
            store: AcmeStoreKind::Auto,
            storage_dir: default_acme_dir(),
            until_issued: UntilIssued::Placeholder,
            check_interval: default_acme_check(),
            retry_min: default_acme_retry_min(),
            retry_max: default_acme_retry_max(),
            lock_lease: default_acme_lease(),
            order_timeout: default_acme_order_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcmeStoreKind {
    #[default]
    Auto,
    Disk,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UntilIssued {
    #[default]
    Placeholder,
    Refuse,
}

fn default_acme_dir() -> String {
    "acme".into()
}
fn default_acme_check() -> Duration {
    Duration::from_secs(3600)
}
fn default_acme_retry_min() -> Duration {
    Duration::from_secs(60)
}
fn default_acme_retry_max() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_acme_lease() -> Duration {
    Duration::from_secs(120)
}
fn default_acme_order_timeout() -> Duration {
    Duration::from_secs(300)
}

/// `tls.certificates[].acme`: obtain this certificate from an ACME CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCertSection {
    /// The CA's directory URL; Let's Encrypt production when absent.
    #[serde(default)]
    pub directory: Option<String>,
    /// The account's contact address (`ops@example.com`).
    #[serde(default)]
    pub email: Option<String>,
    /// `http-01` (default) or `tls-alpn-01`.
    #[serde(default)]
    pub challenge: Option<String>,
    /// External account binding, for CAs that require it.
    #[serde(default)]
    pub eab: Option<EabSection>,
    /// A CA bundle the directory's HTTPS certificate must chain to (private CAs).
    #[serde(default)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EabSection {
    pub kid: String,
    /// The MAC key as the CA gives it: base64url.
    pub hmac_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub name: String,
    /// PEM chain, leaf first (relative paths: from the config file's directory).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<String>,
    /// Obtain the certificate for `hosts` from an ACME CA instead of files.
    #[serde(default)]
    pub acme: Option<AcmeCertSection>,
    /// Hosts this certificate must cover (checked at load and reload); its own names are
    /// what SNI selects on.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// One TLS listener: HTTP/1.1 and (by ALPN) HTTP/2 over TLS on one port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerSection {
    pub addr: String,
    /// `"1.2"` (default) or `"1.3"`.
    #[serde(default = "default_min_tls")]
    pub min_version: String,
    /// Offer HTTP/2 by ALPN next to HTTP/1.1.
    #[serde(default = "yes")]
    pub http2: bool,
    /// Ask clients for a certificate, verified against `ca_file` (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuthSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthSection {
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca_file: String,
    /// `optional`: a client without a certificate is served (anonymous unless it sends another
    /// credential); `required`: it is refused at the handshake.
    #[serde(default)]
    pub mode: ClientAuthMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    #[default]
    Optional,
    Required,
}

fn default_log_flush() -> Duration {
    Duration::from_millis(500)
}

fn default_min_tls() -> String {
    "1.2".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Plain-text listeners; each serves HTTP/1.1 and (if `h2c`) HTTP/2 prior knowledge.
    pub listen: Vec<String>,
    /// TLS listeners (certificates in `tls`).
    #[serde(default)]
    pub listen_tls: Vec<TlsListenerSection>,
    /// The admin listener (metrics, status, reload). Never routed upstream.
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long SIGTERM lets in-flight requests finish.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub grace_period: Duration,
    /// Reload when the config file (or the symlink behind it) changes, as SIGHUP does.
    #[serde(default)]
    pub watch_config: bool,
    /// Absolute paths (daemon mode changes directory to `/`).
    #[serde(default)]
    pub pid_file: Option<String>,
    #[serde(default)]
    pub upgrade_sock: Option<String>,
    /// Idle time after which a downstream keep-alive connection is closed.
    #[serde(default = "default_keepalive", deserialize_with = "duration")]
    pub keepalive_timeout: Duration,
    /// Accept HTTP/2 with prior knowledge (h2c) next to HTTP/1.1 on the same port.
    #[serde(default = "yes")]
    pub h2c: bool,
    /// Answer every request on the plain listeners with a 308 to HTTPS (as each route's
    /// `redirect_https` does for its own requests).
    #[serde(default)]
    pub redirect_https: bool,
    /// The whole request header section must arrive within this (slow-header defence).
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Request bodies: the longest pause between two reads, and the longest whole body.
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Requests in flight in the whole gateway (0 = no limit); beyond it, 503.
    #[serde(default)]
    pub max_inflight: i64,
    /// Request header section size limit (431 beyond it).
    #[serde(default = "default_max_header", deserialize_with = "size")]
    pub max_header_bytes: u64,
    /// Request target length limit (414 beyond it).
    #[serde(default = "default_max_uri", deserialize_with = "size")]
    pub max_uri_bytes: u64,
    /// Most request header fields accepted (431 beyond it).
    #[serde(default = "default_max_headers")]
    pub max_headers: i64,
    /// Longest single request header field, `name: value` (431 beyond it).
    #[serde(default = "default_max_header_line", deserialize_with = "size")]
    pub max_header_line_bytes: u64,
    /// Header names with `_`: `drop` (default, as NGINX does), `allow`, or `reject` (400).
    #[serde(default)]
    pub underscore_headers: UnderscoreHeaders,
    /// Add X-Forwarded-For / -Proto / -Host to upstream requests.
    #[serde(default = "yes")]
    pub forwarded_headers: bool,
    /// Send X-Request-Id upstream and back to the client (ids are still made for logs/errors).
    #[serde(default = "yes")]
    pub request_id_header: bool,
    /// Remove the backend's `Server` header from responses (NGINX does the same).
    #[serde(default = "yes")]
    pub hide_backend_server: bool,
    /// Keep the backend's spelling of response field names on HTTP/1 (and spell Tollgate's own
    /// as documented) where Tollgate adds fields; off: a dozen common names capitalised
    /// (Content-Type, Date, ...), others lowercase, and cheaper per added field (see
    /// `http::fields` and the `limit/fields_*` criterion benches).
    #[serde(default)]
    pub preserve_header_case: bool,
    /// Continue or start W3C trace context (traceparent) on upstream requests.
    #[serde(default = "yes")]
    pub trace_context: bool,
    /// JSON access log: `stdout` (default), `off`, or a file path.
    #[serde(default = "default_access_log")]
    pub access_log: String,
    /// The longest a line waits in a buffer before it is written (1ms-1s).
    #[serde(default = "default_log_flush", deserialize_with = "duration")]
    pub access_log_flush: Duration,
    /// OTLP trace export; only a binary built with `--features otlp` accepts it.
    #[serde(default)]
    pub otlp: Option<OtlpSection>,
}

/// One span per request, sent to an OpenTelemetry collector over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSection {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces` (plain HTTP).
    pub endpoint: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share (0.0-1.0) of the traces started here that are sampled; a continued trace keeps
    /// the caller's sampled flag.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// One export, its retries included, gives up after this (its spans are dropped).
    #[serde(default = "default_otlp_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Extra HTTP headers on every export (e.g. a collector's API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Spans waiting for export; when full, new spans are dropped (and counted).
    #[serde(default = "default_otlp_queue")]
    pub queue_size: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[user:pass@]host:port[/db]`
    pub url: String,
    /// Every Redis call is bounded by this.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Most Redis calls in flight at once; beyond it a call fails at once (as if Redis were down).
    #[serde(default = "default_redis_pending")]
    pub max_pending: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    /// Requests allowed per `window`; absent = unlimited.
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default = "default_window", deserialize_with = "duration")]
    pub window: Duration,
    /// Extra requests allowed in a burst above the steady rate.
    #[serde(default)]
    pub burst: Option<i64>,
}

impl Default for TierSection {
    fn default() -> Self {
        Self {
            limit: None,
            window: default_window(),
            burst: None,
        }
    }
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            api_key: ApiKeySection::default(),
            jwt: None,
            key_cache_ttl: default_key_cache(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSection {
    pub id: String,
    #[serde(default = "default_tier")]
    pub tier: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// `sha256:<64 hex digits>` (from `tollgate key new` / `tollgate key hash`); never plain keys.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Client certificates (verified by a TLS listener's `client_auth`) that identify this
    /// consumer: each entry gives exactly one of `sha256`, `subject` or `san`.
    #[serde(default)]
    pub client_certs: Vec<ClientCertSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertSection {
    /// SHA-256 fingerprint of the certificate (DER), hex, colons allowed.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The subject's distinguished name as `openssl x509 -subject -nameopt RFC2253` prints it
    /// reversed, e.g. `CN=alice, O=Example` (spaces after commas optional).
    #[serde(default)]
    pub subject: Option<String>,
    /// One subjectAltName entry: a DNS name, an e-mail address or a URI.
    #[serde(default)]
    pub san: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub api_key: ApiKeySection,
    #[serde(default)]
    pub jwt: Option<JwtSection>,
    /// Issued keys (admin API, stored in Redis): how long a node caches a lookup.
    #[serde(default = "default_key_cache", deserialize_with = "duration")]
    pub key_cache_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySection {
    #[serde(default = "default_key_header")]
    pub header: String,
    /// Query parameter name, used only on routes with `allow_query_key: true`.
    #[serde(default = "default_key_query")]
    pub query_param: String,
}

impl Default for ApiKeySection {
    fn default() -> Self {
        Self {
            header: default_key_header(),
            query_param: default_key_query(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// The only algorithms accepted, whatever a token's header says.
    pub algorithms: Vec<String>,
    #[serde(default)]
    pub keys: Vec<JwtKeySection>,
    /// A JWKS document on disk (keys selected by `kid`); never fetched from a URL.
    #[serde(default)]
    pub jwks_file: Option<String>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    #[serde(default = "default_sub_claim")]
    pub subject_claim: String,
    #[serde(default = "default_tier_claim")]
    pub tier_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Tier for tokens without the tier claim.
    #[serde(default = "default_tier")]
    pub default_tier: String,
}

/// One verification key: exactly one of the sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeySection {
    /// Matched against a token's `kid`; tokens without `kid` try every key of their family.
    #[serde(default)]
    pub kid: Option<String>,
    /// PEM public key (RSA, EC or Ed25519); relative paths are relative to the config file.
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// HMAC secret read from this environment variable.
    #[serde(default)]
    pub secret_env: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token required on /admin/* (not /metrics). Prefer `token_env`.
    #[serde(default)]
    pub token: Option<String>,
    /// Environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Credentials are ignored (not even checked); the caller is anonymous.
    #[default]
    None,
    /// Valid credentials identify the caller; none = anonymous; invalid ones = 401.
    Optional,
    /// Valid credentials are needed.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub backends: Vec<BackendSection>,
    #[serde(default)]
    pub balance: BalanceSection,
    /// For `consistent_hash`: `header:NAME`, `client_ip` or `path`.
    #[serde(default)]
    pub hash_key: Option<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSection>,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    #[serde(default)]
    pub retries: RetriesSection,
    #[serde(default)]
    pub breaker: Option<BreakerSection>,
    /// Connect to the backends over TLS (HTTPS upstream).
    #[serde(default)]
    pub tls: Option<UpstreamTlsSection>,
    /// `http1` (default), `http2` (over TLS: `h2` by ALPN, HTTP/1.1 if the backend does not
    /// offer it; plain: h2c by prior knowledge).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Concurrent HTTP/2 streams on one backend connection before another is opened.
    #[serde(default = "default_h2_streams")]
    pub max_h2_streams: i64,
}

fn default_h2_streams() -> i64 {
    100
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    /// The name sent as SNI and verified against the backend's certificate; default: the
    /// host name of the first backend when it is written as a name, else each backend's IP
    /// (verified against an IP entry of its certificate; no SNI is sent for an IP).
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the backend's certificate (chain and name). Off only for testing.
    #[serde(default = "yes")]
    pub verify: bool,
    /// PEM CA bundle to verify against; default: the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// A client certificate for backends that require one (mTLS), with its key.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    /// Percent of failed requests in the window that opens the breaker.
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    #[serde(default = "default_min_requests")]
    pub min_requests: i64,
    /// Open after this many failures in a row (0 = off).
    #[serde(default)]
    pub consecutive_failures: i64,
    #[serde(default = "default_breaker_window", deserialize_with = "duration")]
    pub window: Duration,
    #[serde(default = "default_breaker_window", deserialize_with = "duration")]
    pub open_for: Duration,
    #[serde(default = "default_probes")]
    pub half_open_probes: i64,
    /// What counts as a failure: `connect`, `timeout`, `error` and HTTP statuses.
    #[serde(default = "default_failure_on")]
    pub failure_on: Vec<FailureOn>,
    /// At most this percent of the upstream's backends may be open at once (at least one).
    #[serde(default = "default_open_share")]
    pub max_open_percent: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FailureOn {
    Status(u16),
    Kind(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub addr: String,
    #[serde(default = "one")]
    pub weight: i64,
}

/// `round_robin` (weights honoured), `weighted` (the same algorithm, named for clarity), `random`
/// (weighted), or `consistent_hash` (weighted Ketama; needs `hash_key`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BalanceSection {
    #[default]
    RoundRobin,
    Weighted,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    #[serde(default, rename = "type")]
    pub kind: HealthKind,
    /// HTTP only: request path.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// HTTP only: the Host header sent (default: the backend address).
    #[serde(default)]
    pub host: Option<String>,
    /// HTTP only: statuses counted as healthy.
    #[serde(default = "default_expect")]
    pub expect_status: Vec<u16>,
    /// gRPC only: the service asked about (`grpc.health.v1`; empty = the whole server).
    #[serde(default)]
    pub service: String,
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "one")]
    pub healthy_after: i64,
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: i64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
    /// `grpc.health.v1.Health/Check` over HTTP/2: healthy when the answer is SERVING.
    Grpc,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    #[serde(default = "default_connect", deserialize_with = "duration")]
    pub connect: Duration,
    #[serde(default = "default_read", deserialize_with = "duration")]
    pub read: Duration,
    #[serde(default = "default_read", deserialize_with = "duration")]
    pub write: Duration,
    #[serde(default = "default_total", deserialize_with = "duration")]
    pub total: Duration,
    /// How long an idle upstream keep-alive connection stays pooled.
    #[serde(default = "default_pool_idle", deserialize_with = "duration")]
    pub idle: Duration,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            read: default_read(),
            write: default_read(),
            total: default_total(),
            idle: default_pool_idle(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesSection {
    /// Total tries per request including the first.
    #[serde(default = "default_attempts")]
    pub attempts: i64,
    /// Responses with these statuses are retried (idempotent requests only).
    #[serde(default = "default_retry_on")]
    pub on_status: Vec<u16>,
    /// Retries may be at most this percent of requests over `budget_window`...
    #[serde(default = "default_budget")]
    pub budget_percent: f64,
    /// ...plus this many per second whatever the traffic.
    #[serde(default = "default_budget_floor")]
    pub min_per_second: i64,
    #[serde(default = "default_breaker_window", deserialize_with = "duration")]
    pub budget_window: Duration,
    /// Backoff before retry n: random in [0, min(backoff_max, backoff * 2^(n-1))].
    #[serde(default = "default_backoff", deserialize_with = "duration")]
    pub backoff: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "duration")]
    pub backoff_max: Duration,
}

impl Default for RetriesSection {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            on_status: default_retry_on(),
            budget_percent: default_budget(),
            min_per_second: default_budget_floor(),
            budget_window: default_breaker_window(),
            backoff: default_backoff(),
            backoff_max: default_backoff_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: MatchSection,
    pub upstream: String,
    /// Remove the matched `path_prefix` before forwarding (`/api/x` -> `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Rewrite the path with a regex: `{ pattern: "^/old/(.*)", to: "/new/$1" }`.
    #[serde(default)]
    pub rewrite: Option<RewriteSection>,
    /// Response compression levels per algorithm; absent or 0 = off.
    #[serde(default)]
    pub compression: Option<CompressionSection>,
    #[serde(default)]
    pub auth: AuthMode,
    /// The caller needs at least one of these roles (implies authentication).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Accept the API key from the query parameter too (`auth.api_key.query_param`).
    #[serde(default)]
    pub allow_query_key: bool,
    #[serde(default)]
    pub rate_limit: Option<RouteLimitSection>,
    /// Overrides the upstream's timeouts for this route.
    #[serde(default)]
    pub timeouts: Option<TimeoutsSection>,
    /// Requests in flight on this route (0 = no limit); beyond it (and the queue), 503.
    #[serde(default)]
    pub max_inflight: i64,
    /// Optional bounded wait for a slot when `max_inflight` is reached.
    #[serde(default)]
    pub queue: Option<QueueSection>,
    /// Request body size limit (413 beyond it); `1MiB`, `512KiB`, or bytes.
    #[serde(default, deserialize_with = "opt_size")]
    pub max_body: Option<u64>,
    /// Cache this route's responses (see `cache` in the README).
    #[serde(default)]
    pub cache: Option<RouteCacheSection>,
    /// Answer requests that came over plain HTTP with a 308 to the same URL over HTTPS.
    #[serde(default)]
    pub redirect_https: bool,
    /// `Strict-Transport-Security` value added to responses sent over TLS, e.g.
    /// `max-age=31536000; includeSubDomains`.
    #[serde(default)]
    pub hsts: Option<String>,
    /// Bridge gRPC-web calls (browsers) to the gRPC upstream (which must be `protocol: http2`).
    #[serde(default)]
    pub grpc_web: bool,
}

/// Process-wide cache settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// In-process (L1) capacity: bodies, headers and keys.
    #[serde(default = "default_cache_size", deserialize_with = "size")]
    pub max_size: u64,
    /// Also keep entries in Redis, shared by every node (needs `redis:`).
    #[serde(default)]
    pub redis: bool,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            max_size: default_cache_size(),
            redis: false,
        }
    }
}

/// A route's cache policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheSection {
    /// Freshness when the upstream sends no `max-age`/`s-maxage`.
    #[serde(default = "default_cache_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
    /// After freshness, serve the old response at once while one request refreshes it.
    #[serde(default, deserialize_with = "duration")]
    pub stale_while_revalidate: Duration,
    /// After freshness, serve the old response when the upstream fails.
    #[serde(default, deserialize_with = "duration")]
    pub stale_if_error: Duration,
    /// Larger responses are passed through, not stored.
    #[serde(default = "default_cache_body", deserialize_with = "size")]
    pub max_body: u64,
    /// Request headers whose values are part of the key.
    #[serde(default)]
    pub vary: Vec<String>,
    /// `shared` or `consumer` (the consumer is part of the key). Default: `consumer` when the
    /// route authenticates, `shared` otherwise.
    #[serde(default)]
    pub scope: Option<CacheScope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    Shared,
    Consumer,
}

fn default_cache_size() -> u64 {
    64 << 20
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_cache_body() -> u64 {
    1 << 20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    pub size: i64,
    #[serde(default = "default_queue_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// Global rate-limit settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// `exact` | `batched` | `local`; default: exact with Redis, local without.
    #[serde(default)]
    pub mode: Option<LimitMode>,
    /// Batched mode: how often deltas are reported to Redis.
    #[serde(default = "default_sync", deserialize_with = "duration")]
    pub sync_interval: Duration,
    #[serde(default)]
    pub on_failure: OnFailureSection,
    /// Nodes to assume sharing the limits until the heartbeat has counted them.
    #[serde(default = "one")]
    pub assume_nodes: i64,
    /// Exact mode: most requests of one caller decided by one script call (1 = a call each).
    #[serde(default = "default_exact_batch")]
    pub exact_batch: i64,
}

fn default_exact_batch() -> i64 {
    64
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            mode: None,
            sync_interval: default_sync(),
            on_failure: OnFailureSection::default(),
            assume_nodes: 1,
            exact_batch: default_exact_batch(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    Exact,
    Batched,
    Local,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailureSection {
    #[default]
    Local,
    Allow,
    Deny,
}

/// A route's rate-limit settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimitSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `consumer` (default) | `ip` | `header:NAME` | `route_consumer`.
    #[serde(default)]
    pub key: Option<String>,
    /// Per-tier limits for this route only (counted separately from the tier-wide limits).
    #[serde(default)]
    pub limits: BTreeMap<String, TierSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    /// Exact names or `*.example.com` wildcards; empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    /// Empty = any method.
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSection {
    pub pattern: String,
    pub to: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSection {
    #[serde(default)]
    pub gzip: u32,
    #[serde(default)]
    pub brotli: u32,
    #[serde(default)]
    pub zstd: u32,
}

/// `1048576`, `"512KiB"`, `"1MiB"`, `"2MB"`.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {text:?}: use B, KiB, MiB, GiB (or KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// `"250ms"`, `"2s"`, `"1m 30s"` (humantime syntax).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_redis_pending() -> i64 {
    1024
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_tier() -> String {
    "free".into()
}
fn default_key_cache() -> Duration {
    Duration::from_secs(1)
}
fn default_key_header() -> String {
    "X-API-Key".into()
}
fn default_key_query() -> String {
    "api_key".into()
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_sub_claim() -> String {
    "sub".into()
}
fn default_tier_claim() -> String {
    "tier".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}

fn default_failure_rate() -> f64 {
    50.0
}
fn default_min_requests() -> i64 {
    20
}
fn default_breaker_window() -> Duration {
    Duration::from_secs(10)
}
fn default_probes() -> i64 {
    3
}
fn default_failure_on() -> Vec<FailureOn> {
    ["connect", "timeout", "error"]
        .into_iter()
        .map(|k| FailureOn::Kind(k.into()))
        .chain([500, 502, 503, 504].into_iter().map(FailureOn::Status))
        .collect()
}
fn default_open_share() -> f64 {
    50.0
}
fn default_retry_on() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget() -> f64 {
    20.0
}
fn default_budget_floor() -> i64 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_millis(10)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(200)
}

fn default_sync() -> Duration {
    Duration::from_millis(100)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    #[default]
    Drop,
    Allow,
    Reject,
}

fn default_max_headers() -> i64 {
    100
}
fn default_service_name() -> String {
    "tollgate".into()
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_otlp_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_otlp_queue() -> i64 {
    4096
}

fn default_access_log() -> String {
    "stdout".into()
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_header() -> u64 {
    32 * 1024
}
fn default_max_uri() -> u64 {
    8 * 1024
}
fn default_max_header_line() -> u64 {
    8 * 1024
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_threads() -> usize {
    2
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(60)
}
fn yes() -> bool {
    true
}
fn one() -> i64 {
    1
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_expect() -> Vec<u16> {
    vec![200]
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_unhealthy_after() -> i64 {
    3
}
fn default_connect() -> Duration {
    Duration::from_secs(1)
}
fn default_read() -> Duration {
    Duration::from_secs(30)
}
fn default_total() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_attempts() -> i64 {
    3
}
