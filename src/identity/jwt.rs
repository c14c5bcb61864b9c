//! JWT verification (jsonwebtoken). The accepted algorithms come from the config, never from a
//! token: a token's `alg` must be in the allowlist AND match the family of the key that checks
//! it, so an RSA public key can never be used as an HMAC secret. Keys come from PEM files, a
//! JWKS file or an environment variable; `jku`, `x5u` and embedded `jwk` headers are ignored,
//! `kid` only selects among the configured keys. `exp` is required, `nbf` is checked, `iss` and
//! `aud` when configured, with a small leeway.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

pub use crate::error::TokenError;

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    /// The allowlist restricted to this key's family.
    validation: Validation,
}

/// The claims the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    pub tier: Option<String>,
    pub roles: Vec<String>,
}

pub struct JwtVerifier {
    keys: Vec<Key>,
    allowed: Vec<Algorithm>,
    subject_claim: String,
    tier_claim: String,
    roles_claim: String,
    leeway: u64,
    /// Tokens already verified (by SHA-256 of the token): a signature check (RSA above all)
    /// costs far more than a lookup. A hit re-checks `exp`/`nbf` against the clock; the cache
    /// belongs to this verifier, so a reload (new keys or rules) starts empty.
    cache: quick_cache::sync::Cache<[u8; 32], Arc<CachedToken>>,
}

struct CachedToken {
    verified: Verified,
    exp: u64,
    nbf: Option<u64>,
}

/// Settings the verifier is built from (already validated names and paths).
pub struct JwtSettings<'a> {
    pub algorithms: &'a [String],
    pub pem_files: Vec<(Option<String>, String)>,
    pub secrets: Vec<(Option<String>, String)>,
    pub jwks_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub subject_claim: String,
    pub tier_claim: String,
    pub roles_claim: String,
}

fn parse_alg(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => {
            return Err(format!(
                "unsupported algorithm {other:?} (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
            ))
        }
    };
    Ok(alg)
}

impl JwtVerifier {
    /// Build from settings; errors are (field suffix, message) pairs for the config reporter.
    pub fn new(s: JwtSettings<'_>, base_dir: &Path) -> Result<Self, Vec<(String, String)>> {
        // Only the rust_crypto backend is compiled in; say so explicitly so that another crate
        // enabling a second backend cannot make jsonwebtoken panic at the first verification.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        let mut errors = Vec::new();
        let mut allowed = Vec::new();
        for (i, a) in s.algorithms.iter().enumerate() {
            match parse_alg(a) {
                Ok(alg) => allowed.push(alg),
                Err(e) => errors.push((format!("algorithms[{i}]"), e)),
            }
        }
        if s.algorithms.is_empty() {
            errors.push((
                "algorithms".into(),
                "at least one algorithm is needed".into(),
            ));
        }
        let mut raw_keys: Vec<(Option<String>, DecodingKey, String)> = Vec::new();
        for (i, (kid, file)) in s.pem_files.iter().enumerate() {
            let path = base_dir.join(file);
            let field = format!("keys[{i}].public_key_file");
            match std::fs::read(&path) {
                Err(e) => errors.push((field, format!("cannot read {}: {e}", path.display()))),
                Ok(pem) => {
                    let key = DecodingKey::from_rsa_pem(&pem)
                        .or_else(|_| DecodingKey::from_ec_pem(&pem))
                        .or_else(|_| DecodingKey::from_ed_pem(&pem));
                    match key {
                        Ok(k) => raw_keys.push((kid.clone(), k, field)),
                        Err(_) => errors.push((
                            field,
                            format!(
                                "{} is not an RSA, EC or Ed25519 public key PEM",
                                path.display()
                            ),
                        )),
                    }
                }
            }
        }
        for (i, (kid, var)) in s.secrets.iter().enumerate() {
            let field = format!("keys[{i}].secret_env");
            match std::env::var(var) {
                Ok(secret) if secret.len() >= 32 => raw_keys.push((
                    kid.clone(),
                    DecodingKey::from_secret(secret.as_bytes()),
                    field,
                )),
                Ok(_) => errors.push((
                    field,
                    format!("the secret in ${var} must be at least 32 bytes"),
                )),
                Err(_) => errors.push((field, format!("environment variable {var} is not set"))),
            }
        }
        if let Some(file) = &s.jwks_file {
            let path = base_dir.join(file);
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|t| {
                    serde_json::from_str::<JwkSet>(&t).map_err(|e| format!("invalid JWKS: {e}"))
                });
            match parsed {
                Err(e) => errors.push(("jwks_file".into(), e)),
                Ok(set) => {
                    for jwk in &set.keys {
                        match DecodingKey::from_jwk(jwk) {
                            Ok(k) => {
                                raw_keys.push((jwk.common.key_id.clone(), k, "jwks_file".into()))
                            }
                            Err(e) => {
                                errors.push(("jwks_file".into(), format!("unusable key: {e}")))
                            }
                        }
                    }
                }
            }
        }
        if raw_keys.is_empty() && errors.is_empty() {
            errors.push((
                "keys".into(),
                "at least one key (keys or jwks_file) is needed".into(),
            ));
        }
        let mut keys = Vec::new();
        for (kid, key, field) in raw_keys {
            let family_algs: Vec<Algorithm> = allowed
                .iter()
                .copied()
                .filter(|a| a.family() == key.family())
                .collect();
            if family_algs.is_empty() {
                errors.push((field, "no allowed algorithm fits this key".into()));
                continue;
            }
            let mut v = Validation::new(family_algs[0]);
            v.algorithms = family_algs;
            v.leeway = s.leeway.as_secs();
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp"]);
            match &s.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &s.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            keys.push(Key {
                kid,
                key,
                validation: v,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            keys,
            allowed,
            subject_claim: s.subject_claim,
            tier_claim: s.tier_claim,
            roles_claim: s.roles_claim,
            leeway: s.leeway.as_secs(),
            cache: quick_cache::sync::Cache::new(10_000),
        })
    }

    /// Verify `token` and read the claims the gateway uses.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.cache.get(&digest) {
            self.in_time(hit.exp, hit.nbf, now)?;
            return Ok(hit.verified.clone());
        }
        let (verified, exp, nbf) = self.verify_uncached(token)?;
        // jsonwebtoken accepts `exp == now - leeway` (it refuses only `exp < now - leeway`);
        // RFC 7519 4.1.4 wants the current time before `exp`. The same check as a cache hit, so
        // a token's verdict never depends on whether it was cached.
        self.in_time(exp, nbf, now)?;
        self.cache.insert(
            digest,
            Arc::new(CachedToken {
                verified: verified.clone(),
                exp,
                nbf,
            }),
        );
        Ok(verified)
    }

    /// `exp` and `nbf` against `now` (Unix seconds), with the configured leeway.
    fn in_time(&self, exp: u64, nbf: Option<u64>, now: u64) -> Result<(), TokenError> {
        // Saturating: `exp` comes from the token (u64::MAX, or 1e300 read as a float).
        if exp.saturating_add(self.leeway) <= now {
            return Err(TokenError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(self.leeway)) {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }

    fn verify_uncached(&self, token: &str) -> Result<(Verified, u64, Option<u64>), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.allowed.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.validation.algorithms.contains(&header.alg))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, &key.validation) {
                Ok(data) => return self.claims(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => TokenError::Signature,
                        K::ExpiredSignature => return Err(TokenError::Expired),
                        K::ImmatureSignature => return Err(TokenError::NotYetValid),
                        K::InvalidAlgorithm | K::MissingAlgorithm => TokenError::Algorithm,
                        K::InvalidIssuer
                        | K::InvalidAudience
                        | K::MissingRequiredClaim(_)
                        | K::InvalidSubject => return Err(TokenError::Claims),
                        _ => TokenError::Malformed,
                    };
                }
            }
        }
        Err(last)
    }

    fn claims(&self, claims: Value) -> Result<(Verified, u64, Option<u64>), TokenError> {
        // `exp` is required and was checked by jsonwebtoken; keep it (and `nbf`) for cache hits.
        let secs = |v: &Value| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64));
        let exp = claims.get("exp").and_then(secs).ok_or(TokenError::Claims)?;
        let nbf = claims.get("nbf").and_then(secs);
        self.identity_claims(&claims).map(|v| (v, exp, nbf))
    }

    fn identity_claims(&self, claims: &Value) -> Result<Verified, TokenError> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let subject = text(&self.subject_claim)
            .filter(|s| valid_id(s))
            .ok_or(TokenError::Claims)?;
        let tier = match claims.get(&self.tier_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(_) => return Err(TokenError::Claims),
        };
        let roles = match claims.get(&self.roles_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|r| r.as_str().filter(|r| valid_id(r)).map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(TokenError::Claims)?,
            Some(Value::String(s)) => s
                .split([' ', ','])
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect(),
            Some(_) => return Err(TokenError::Claims),
        };
        if roles.iter().any(|r| !valid_id(r)) {
            return Err(TokenError::Claims);
        }
        Ok(Verified {
            subject,
            tier,
            roles,
        })
    }
}

/// Identifiers forwarded in headers: visible ASCII without commas, at most 256 bytes.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

pub type SharedVerifier = Arc<JwtVerifier>;

#[cfg(test)]
mod tests;
