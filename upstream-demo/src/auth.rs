//! Who the caller is. `POST /api/v1/auth/login` checks an email and password against the Argon2
//! hash in `users` and issues an RS256 JWT for the gateway to verify; `GET /api/v1/me` echoes the
//! identity the gateway forwarded in `X-Consumer-*` headers. The demo never verifies tokens
//! itself: authenticating requests is the gateway's job.

use std::path::Path;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::{check_text, json_object, ApiError};
use crate::state::AppState;

/// Lifetime of an issued token.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A valid Argon2id hash of a password nobody has: verifying against it when the email is
/// unknown makes "no such user" cost the same time as "wrong password".
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$mmnE4rL0/nWZYiVtTcG+Nw$jygd588Fj0pjfgzRaC9v1QmxujL0xsbGQ9UJPIoMl7g";

/// Signs login tokens with the RSA private key from `JWT_PRIVATE_KEY`.
pub struct TokenSigner {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

/// The claims the gateway reads: `sub` becomes X-Consumer-Id, `tier` picks the rate-limit tier.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub email: String,
    pub tier: String,
    pub roles: Vec<String>,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

impl TokenSigner {
    /// Load the PEM private key; fails on a missing file or a key that is not RSA.
    pub fn from_file(
        path: &Path,
        issuer: String,
        audience: String,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let pem =
            std::fs::read(path).map_err(|e| format!("JWT_PRIVATE_KEY {}: {e}", path.display()))?;
        let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| {
            format!(
                "JWT_PRIVATE_KEY {}: not an RSA PEM key: {e}",
                path.display()
            )
        })?;
        Ok(Self {
            key,
            issuer,
            audience,
        })
    }

    fn sign(&self, user: &UserRow, now: u64) -> Result<String, ApiError> {
        let claims = Claims {
            sub: user.id.to_string(),
            email: user.email.clone(),
            tier: user.tier.clone(),
            roles: user.roles.clone(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + TOKEN_TTL.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| ApiError::Internal(format!("signing a token: {e}")))
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    email: String,
    password: String,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    password_hash: String,
    tier: String,
    roles: Vec<String>,
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized {
        code: "invalid_credentials",
        message: "invalid email or password".into(),
    }
}

/// `POST /api/v1/auth/login` `{email, password}` -> `{token, tokenType, expiresIn}`.
pub async fn login(
    State(st): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: LoginRequest = json_object(body)?;
    check_text("email", &req.email, 254)?;
    check_text("password", &req.password, 1024)?;
    let email = req.email.trim().to_lowercase();

    let user: Option<UserRow> =
        sqlx::query_as("SELECT id, email, password_hash, tier, roles FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&st.db.read)
            .await?;

    // Argon2 is deliberately slow: keep it off the async workers.
    let hash = user
        .as_ref()
        .map_or(DUMMY_HASH.to_string(), |u| u.password_hash.clone());
    let password = req.password;
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(|e| ApiError::Internal(format!("password check task: {e}")))?;
    let user = match user {
        Some(u) if ok => u,
        _ => return Err(invalid_credentials()),
    };

    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
    let token = st.signer.sign(&user, now)?;
    tracing::info!(user = %user.id, "login");
    Ok(Json(json!({
        "token": token,
        "tokenType": "Bearer",
        "expiresIn": TOKEN_TTL.as_secs(),
    })))
}

/// True when `password` matches the PHC-format Argon2 `hash`; a malformed hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "stored password hash is malformed");
            false
        }
    }
}

/// `GET /api/v1/me`: the identity the gateway forwarded. 401 without `X-Consumer-Id`.
pub async fn me(headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let header = |name: &str| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                .map_err(|_| {
                    ApiError::bad_request("invalid_header", format!("{name} is not visible ASCII"))
                }),
        }
    };
    let Some(consumer) = forwarded_consumer(&headers)? else {
        return Err(ApiError::Unauthorized {
            code: "unauthenticated",
            message: "no X-Consumer-Id: call through the gateway with credentials".into(),
        });
    };
    let roles: Vec<String> = header("x-consumer-roles")?
        .map(|r| {
            r.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(json!({
        "consumerId": consumer,
        "tier": header("x-consumer-tier")?,
        "roles": roles,
        "authMethod": header("x-auth-method")?,
    })))
}

/// The `X-Consumer-Id` the gateway forwarded, if any (trimmed; over 200 characters is a 400).
pub fn forwarded_consumer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-consumer-id") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::bad_request("invalid_header", "X-Consumer-Id is not visible ASCII"))?
        .trim();
    if s.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_header",
            "X-Consumer-Id is longer than 200 characters",
        ));
    }
    Ok(Some(s.to_string()).filter(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_hash_is_valid_and_matches_nothing_obvious() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        assert!(!verify_password("admin123", DUMMY_HASH));
        assert!(!verify_password("", DUMMY_HASH));
    }

    #[test]
    fn malformed_hash_never_matches() {
        assert!(!verify_password("x", "not-a-hash"));
    }

    /// The seed migration's hashes must match the documented demo passwords.
    #[test]
    fn seed_hashes_match_demo_passwords() {
        let seed = include_str!("../../schema/0004_seed.sql");
        for (email, password) in [
            ("admin@example.com", "admin123"),
            ("user@example.com", "user123"),
        ] {
            let at = seed
                .rfind(email)
                .unwrap_or_else(|| panic!("{email} not seeded"));
            let hash = seed[at..]
                .split('\'')
                .find(|part| part.starts_with("$argon2id$"))
                .unwrap_or_else(|| panic!("no hash for {email}"));
            assert!(verify_password(password, hash), "{email}");
            assert!(!verify_password("wrong", hash), "{email}");
        }
    }
}
