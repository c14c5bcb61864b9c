//! The demo's one error type and the ONE place it becomes a status code and a JSON body
//! (`{"error": "...", "message": "..."}`). Extractor rejections (bad JSON, bad query, bad path)
//! map to 4xx here; store failures map to 503 or 500 with a generic message — internals (SQL,
//! Redis replies, file paths) are logged, never sent to the client.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Everything a handler can answer with instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or out-of-range input (400).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Well-formed input that fails validation (422).
    #[error("{0}")]
    Invalid(String),
    /// Missing or wrong credentials (401).
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    /// No such route or record (404).
    #[error("{0}")]
    NotFound(String),
    /// Route exists, method does not (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An extractor's own 4xx (415 wrong content type, 413 body too large, ...).
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    /// A dependency (Postgres, Redis) is down or too slow (503). The detail is logged only.
    #[error("{what} unavailable: {detail}")]
    Unavailable { what: &'static str, detail: String },
    /// A bug or an unexpected store error (500). The detail is logged only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Rejected { status, .. } => *status,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Unauthorized { code, .. } => code,
            Self::Invalid(_) => "validation_failed",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Rejected { status, .. } => match status.as_u16() {
                413 => "payload_too_large",
                415 => "unsupported_media_type",
                422 => "invalid_body",
                _ => "bad_request",
            },
            Self::Unavailable { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// What the client may read: internals are replaced by a generic sentence.
    fn public_message(&self) -> String {
        match self {
            Self::Unavailable { what, .. } => format!("{what} is unavailable, try again later"),
            Self::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Unavailable { .. } => tracing::warn!(error = %self, "dependency unavailable"),
            Self::Internal(_) => tracing::error!(error = %self, "internal error"),
            _ => {}
        }
        let body = json!({ "error": self.code(), "message": self.public_message() });
        (status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        if status.is_client_error() {
            Self::Rejected {
                status,
                message: r.body_text(),
            }
        } else {
            Self::Internal(r.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request("invalid_query", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        match r {
            PathRejection::FailedToDeserializePathParams(e) => {
                Self::bad_request("invalid_path", e.body_text())
            }
            other => Self::Internal(other.body_text()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable {
                    what: "database",
                    detail: e.to_string(),
                }
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        Self::Unavailable {
            what: "redis",
            detail: e.to_string(),
        }
    }
}

/// Decode a JSON body that must be an object into `T`. (Serde would also accept a struct written
/// as an array, `["name"]`; an API should not.) Type and field errors are 422, like axum's own.
pub fn json_object<T: serde::de::DeserializeOwned>(
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<T, ApiError> {
    let Json(value) = body?;
    if !value.is_object() {
        return Err(ApiError::Rejected {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: "the body must be a JSON object".into(),
        });
    }
    serde_json::from_value(value).map_err(|e| ApiError::Rejected {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        message: format!("invalid body: {e}"),
    })
}

/// Fallback for unknown routes: a JSON 404 like every other error.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Fallback for a known route called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Reject text Postgres cannot store (NUL) and text over `max` characters: bad input must be a
/// 4xx here, not a 500 from the database later.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid(format!(
            "{field} contains a NUL character"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internals_never_reach_the_client() {
        let e = ApiError::Internal("relation \"users\" does not exist".into());
        assert_eq!(e.public_message(), "internal error");
        let e = ApiError::Unavailable {
            what: "redis",
            detail: "connection refused 10.0.0.1".into(),
        };
        assert!(!e.public_message().contains("10.0.0.1"));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn text_checks() {
        assert!(check_text("name", "ok", 5).is_ok());
        assert!(check_text("name", "ééééé", 5).is_ok());
        assert!(check_text("name", "toolong", 5).is_err());
        assert!(check_text("name", "a\0b", 5).is_err());
    }
}
