//! Identity: who is calling. Every request resolves to an anonymous caller or a consumer with a
//! tier and roles, from an API key (YAML or admin-issued) or a JWT, under the route's policy
//! (`auth: none | optional | required`, plus roles). It also owns the identity headers: those a
//! client sent are removed in every spelling, and the gateway's own are added after
//! authentication. It never answers the client itself; it returns a decision.
//!
//! Precedence (documented in the README): a request may carry ONE credential. A Bearer token
//! together with an API key, two `Authorization` headers, two API key headers, or a header key
//! together with a query key are refused with 401 `ambiguous_credentials`; the gateway never
//! guesses which one the client meant. The `Bearer` scheme name is case-insensitive
//! (RFC 9110 §11.1); other schemes (Basic, ...) are not gateway credentials and pass through.
//!
//! A client certificate (verified by a TLS listener's `client_auth`) belongs to the connection,
//! not to the request: it identifies the caller (method `mtls`) when the request itself carries
//! no key or token, and a certificate no consumer lists counts as no credential. A request
//! credential on an mTLS connection is used as on any other connection.

pub mod issued;
pub mod jwt;
pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use issued::{IssuedKeys, Lookup};
use keys::KeyHash;

pub use crate::error::AuthError;

/// Tier index into the snapshot's tier table.
pub type TierId = usize;

/// The built-in tiers; always present, in this order (so `ANONYMOUS` is index 0).
pub const BUILTIN_TIERS: [&str; 4] = ["anonymous", "free", "pro", "enterprise"];
pub const ANONYMOUS: TierId = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    None,
    ApiKey,
    Jwt,
    Mtls,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ApiKey => "api_key",
            Self::Jwt => "jwt",
            Self::Mtls => "mtls",
        }
    }
}

thread_local! {
    /// Shared empty role list: an anonymous identity allocates nothing.
    static NO_ROLES: Arc<[Arc<str>]> = Arc::from([]);
}

/// A consumer from the YAML file.
#[derive(Debug)]
pub struct Consumer {
    pub id: Arc<str>,
    pub tier: TierId,
    pub roles: Arc<[Arc<str>]>,
}

/// The caller of one request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: Option<Arc<str>>,
    pub tier: TierId,
    pub roles: Arc<[Arc<str>]>,
    pub method: Method,
}

impl Identity {
    pub fn anonymous() -> Self {
        Self {
            consumer: None,
            tier: ANONYMOUS,
            roles: NO_ROLES.with(Arc::clone),
            method: Method::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Optional,
    Required,
}

/// A route's policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub mode: Mode,
    /// Any one of these roles is enough; empty = no role needed.
    pub roles: Vec<Arc<str>>,
    pub allow_query_key: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::None,
            roles: Vec::new(),
            allow_query_key: false,
        }
    }
}

/// The compiled identity settings of one snapshot.
pub struct IdentityConfig {
    pub tiers: Vec<Arc<str>>,
    /// `tiers` as ready header values (cloned per request, never re-validated).
    pub tier_values: Vec<HeaderValue>,
    pub tier_index: HashMap<String, TierId>,
    pub keys: HashMap<KeyHash, Arc<Consumer>>,
    pub key_header: HeaderName,
    pub key_query: String,
    pub jwt: Option<jwt::JwtVerifier>,
    pub default_jwt_tier: TierId,
    pub key_cache_ttl: Duration,
    /// Consumers by client certificate.
    pub certs: CertConsumers,
}

/// How a consumer's client certificate is recognised (`consumers[].client_certs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertMatch {
    Sha256([u8; 32]),
    /// Normalised by `tls::normalize_subject`.
    Subject(String),
    San(String),
}

/// Consumers by client certificate, one map per kind of identifier.
#[derive(Debug, Default)]
pub struct CertConsumers {
    pub by_sha256: HashMap<[u8; 32], Arc<Consumer>>,
    pub by_subject: HashMap<String, Arc<Consumer>>,
    pub by_san: HashMap<String, Arc<Consumer>>,
}

impl CertConsumers {
    /// File `consumer` under `m`; false when another consumer already has it.
    pub fn insert(&mut self, m: CertMatch, consumer: Arc<Consumer>) -> bool {
        match m {
            CertMatch::Sha256(d) => self.by_sha256.insert(d, consumer).is_none(),
            CertMatch::Subject(s) => self.by_subject.insert(s, consumer).is_none(),
            CertMatch::San(s) => self.by_san.insert(s, consumer).is_none(),
        }
    }

    /// The consumer a certificate identifies: by fingerprint, then subject, then SAN.
    pub fn find(&self, cert: &crate::tls::ClientCert) -> Option<&Arc<Consumer>> {
        self.by_sha256
            .get(&cert.sha256)
            .or_else(|| self.by_subject.get(&cert.subject))
            .or_else(|| cert.sans.iter().find_map(|s| self.by_san.get(s)))
    }
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("tiers", &self.tiers)
            .field("keys", &self.keys.len())
            .field("key_header", &self.key_header)
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

/// Credentials found on a request.
enum Credential<'a> {
    None,
    Key(&'a [u8]),
    Token(&'a str),
}

fn find_credential<'a>(
    cfg: &IdentityConfig,
    policy: &Policy,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Credential<'a>, AuthError> {
    let mut token = None;
    let mut auth_headers = headers.get_all(http::header::AUTHORIZATION).iter();
    if let Some(value) = auth_headers.next() {
        if auth_headers.next().is_some() {
            return Err(AuthError::Ambiguous);
        }
        let text = value
            .to_str()
            .map_err(|_| AuthError::InvalidToken(jwt::TokenError::Malformed))?;
        let (scheme, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let t = rest.trim();
            if t.is_empty() || t.contains(' ') {
                return Err(AuthError::InvalidToken(jwt::TokenError::Malformed));
            }
            token = Some(t);
        }
    }
    let mut key = None;
    let mut key_headers = headers.get_all(&cfg.key_header).iter();
    if let Some(value) = key_headers.next() {
        if key_headers.next().is_some() {
            return Err(AuthError::Ambiguous);
        }
        key = Some(value.as_bytes());
    }
    if policy.allow_query_key {
        let mut found = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .filter(|(name, _)| *name == cfg.key_query)
            .map(|(_, v)| v.as_bytes());
        if let Some(v) = found.next() {
            if found.next().is_some() || key.is_some() {
                return Err(AuthError::Ambiguous);
            }
            key = Some(v);
        }
    }
    match (token, key) {
        (Some(_), Some(_)) => Err(AuthError::Ambiguous),
        (Some(t), None) => Ok(Credential::Token(t)),
        (None, Some(k)) => Ok(Credential::Key(k)),
        (None, None) => Ok(Credential::None),
    }
}

/// Resolve the caller of a request under `policy`.
/// `client_cert`: the connection's verified client certificate, if any.
pub async fn authenticate(
    cfg: &IdentityConfig,
    issued: Option<&IssuedKeys>,
    policy: &Policy,
    headers: &HeaderMap,
    query: Option<&str>,
    client_cert: Option<&crate::tls::ClientCert>,
) -> Result<Identity, AuthError> {
    if policy.mode == Mode::None && policy.roles.is_empty() {
        return Ok(Identity::anonymous());
    }
    let identity = match find_credential(cfg, policy, headers, query)? {
        Credential::None if client_cert.is_some() => {
            match client_cert.and_then(|c| cfg.certs.find(c)) {
                Some(c) => Identity {
                    consumer: Some(c.id.clone()),
                    tier: c.tier,
                    roles: c.roles.clone(),
                    method: Method::Mtls,
                },
                None if policy.mode == Mode::Required || !policy.roles.is_empty() => {
                    return Err(AuthError::Missing)
                }
                None => return Ok(Identity::anonymous()),
            }
        }
        Credential::None => {
            if policy.mode == Mode::Required || !policy.roles.is_empty() {
                return Err(AuthError::Missing);
            }
            return Ok(Identity::anonymous());
        }
        Credential::Key(raw) => by_key(cfg, issued, raw).await?,
        Credential::Token(token) => by_token(cfg, token)?,
    };
    if !policy.roles.is_empty() && !identity.roles.iter().any(|r| policy.roles.contains(r)) {
        return Err(AuthError::Forbidden);
    }
    Ok(identity)
}

async fn by_key(
    cfg: &IdentityConfig,
    issued: Option<&IssuedKeys>,
    raw: &[u8],
) -> Result<Identity, AuthError> {
    let key = keys::clean(raw).ok_or(AuthError::InvalidKey)?;
    let hash = keys::hash(key);
    if let Some(c) = cfg.keys.get(&hash) {
        return Ok(Identity {
            consumer: Some(c.id.clone()),
            tier: c.tier,
            roles: c.roles.clone(),
            method: Method::ApiKey,
        });
    }
    let Some(issued) = issued else {
        return Err(AuthError::InvalidKey);
    };
    match issued.lookup(&hash, cfg.key_cache_ttl).await {
        Lookup::Found(k) => {
            let tier = *cfg.tier_index.get(&k.tier).ok_or(AuthError::InvalidKey)?;
            Ok(Identity {
                consumer: Some(Arc::from(k.consumer.as_str())),
                tier,
                roles: k.roles.iter().map(|r| Arc::from(r.as_str())).collect(),
                method: Method::ApiKey,
            })
        }
        Lookup::NotFound => Err(AuthError::InvalidKey),
        Lookup::Unavailable => Err(AuthError::Unavailable),
    }
}

fn by_token(cfg: &IdentityConfig, token: &str) -> Result<Identity, AuthError> {
    let verifier = cfg
        .jwt
        .as_ref()
        .ok_or(AuthError::InvalidToken(jwt::TokenError::Algorithm))?;
    let v = verifier.verify(token).map_err(AuthError::InvalidToken)?;
    let tier = match &v.tier {
        None => cfg.default_jwt_tier,
        Some(name) => *cfg
            .tier_index
            .get(name)
            .ok_or(AuthError::InvalidToken(jwt::TokenError::Claims))?,
    };
    Ok(Identity {
        consumer: Some(Arc::from(v.subject.as_str())),
        tier,
        roles: v.roles.iter().map(|r| Arc::from(r.as_str())).collect(),
        method: Method::Jwt,
    })
}

/// The identity headers the gateway owns.
pub const CONSUMER_ID: &str = "x-consumer-id";
pub const CONSUMER_TIER: &str = "x-consumer-tier";
pub const CONSUMER_ROLES: &str = "x-consumer-roles";
pub const AUTH_METHOD: &str = "x-auth-method";

/// True for any spelling a client could use to impersonate a consumer: the identity headers
/// compared case-insensitively with `_` read as `-`, and anything under `x-consumer-`.
pub fn is_identity_header(name: &str) -> bool {
    let n = name.as_bytes();
    let norm = |i: usize| {
        let b = n[i].to_ascii_lowercase();
        if b == b'_' {
            b'-'
        } else {
            b
        }
    };
    let eq = |target: &str| {
        target.len() == n.len() && (0..n.len()).all(|i| norm(i) == target.as_bytes()[i])
    };
    let starts = |p: &str| n.len() >= p.len() && (0..p.len()).all(|i| norm(i) == p.as_bytes()[i]);
    starts("x-consumer-") || eq(AUTH_METHOD)
}

const H_CONSUMER_ID: HeaderName = HeaderName::from_static(CONSUMER_ID);
const H_CONSUMER_TIER: HeaderName = HeaderName::from_static(CONSUMER_TIER);
const H_CONSUMER_ROLES: HeaderName = HeaderName::from_static(CONSUMER_ROLES);
const H_AUTH_METHOD: HeaderName = HeaderName::from_static(AUTH_METHOD);

/// Add the gateway's identity headers for `id` (the client's were removed by the caller).
pub fn apply_headers(
    req: &mut pingora_http::RequestHeader,
    id: &Identity,
    cfg: &IdentityConfig,
) -> pingora_error::Result<()> {
    if let Some(c) = &id.consumer {
        if let Ok(v) = HeaderValue::from_str(c) {
            req.insert_header(H_CONSUMER_ID, v)?;
        }
    }
    if let Some(v) = cfg.tier_values.get(id.tier) {
        req.insert_header(H_CONSUMER_TIER, v.clone())?;
    }
    if !id.roles.is_empty() {
        let joined = id.roles.iter().map(|r| &**r).collect::<Vec<_>>().join(",");
        if let Ok(v) = HeaderValue::from_str(&joined) {
            req.insert_header(H_CONSUMER_ROLES, v)?;
        }
    }
    req.insert_header(H_AUTH_METHOD, HeaderValue::from_static(id.method.as_str()))
}

/// The identity headers of an anonymous caller (no allocation).
pub fn apply_anonymous(
    req: &mut pingora_http::RequestHeader,
    cfg: &IdentityConfig,
) -> pingora_error::Result<()> {
    if let Some(v) = cfg.tier_values.get(ANONYMOUS) {
        req.insert_header(H_CONSUMER_TIER, v.clone())?;
    }
    req.insert_header(H_AUTH_METHOD, HeaderValue::from_static("none"))
}

/// Names of identity headers present in `headers` (any spelling).
pub fn spoofed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .keys()
        .filter(|k| is_identity_header(k.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
