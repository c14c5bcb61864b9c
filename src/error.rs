//! The one gateway error type, and the one place it becomes a status code and a JSON body:
//! `{"error": "<code>", "message": "...", "request_id": "..."}`. Internal details (peer
//! addresses, pingora error chains) are logged, never sent to the client.

use bytes::Bytes;
use http::HeaderValue;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::http::fields::{Case, Field};
use crate::http::grpc;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// 401: no credential where one is needed.
    Missing,
    /// 401: more than one credential.
    Ambiguous,
    /// 401: an API key that is not valid (unknown, revoked, expired, malformed).
    InvalidKey,
    /// 401: a token that is not valid.
    InvalidToken(TokenError),
    /// 403: authenticated, but without a required role.
    Forbidden,
    /// 503: an issued key cannot be checked because Redis is unreachable.
    Unavailable,
}

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing_credentials",
            Self::Ambiguous => "ambiguous_credentials",
            Self::InvalidKey => "invalid_key",
            Self::InvalidToken(t) => t.reason(),
            Self::Forbidden => "forbidden",
            Self::Unavailable => "auth_unavailable",
        }
    }
}

/// Why a token was refused (a bounded set, used as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Algorithm,
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Claims,
}

impl TokenError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "token_malformed",
            Self::Algorithm => "token_algorithm",
            Self::UnknownKey => "token_unknown_key",
            Self::Signature => "token_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Claims => "token_claims",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayError {
    /// No route matches host, path and method.
    NoRoute,
    /// An ACME HTTP-01 validation for a token no order of this gateway (or its fleet) has.
    UnknownChallenge,
    /// Every backend of the route's upstream is unhealthy.
    NoHealthyBackend {
        retry_after: u32,
    },
    /// Could not connect to any backend, or the backend broke the exchange.
    BadGateway,
    /// The backend did not answer in time.
    UpstreamTimeout,
    /// The client sent something we cannot proxy.
    BadRequest,
    /// A bug or an unexpected state; never details.
    Internal,
    /// Authentication or authorisation refused the request (401, 403 or 503).
    Auth(AuthError),
    /// Over the rate limit; retry after this many seconds.
    RateLimited {
        retry_after: u32,
    },
    /// Redis failed and `rate_limit.on_failure: deny`.
    LimiterUnavailable,
    /// Too many requests in flight (route or gateway).
    Overloaded,
    UriTooLong,
    HeadersTooLarge,
    PayloadTooLarge,
    /// The client was too slow sending its request.
    RequestTimeout,
    /// The client went away before the answer (logged as NGINX's 499; nothing is sent).
    ClientClosed,
}

impl GatewayError {
    pub fn status(self) -> u16 {
        match self {
            Self::NoRoute | Self::UnknownChallenge => 404,
            Self::NoHealthyBackend { .. } => 503,
            Self::BadGateway => 502,
            Self::UpstreamTimeout => 504,
            Self::BadRequest => 400,
            Self::Internal => 500,
            Self::Auth(AuthError::Forbidden) => 403,
            Self::Auth(AuthError::Unavailable) => 503,
            Self::Auth(_) => 401,
            Self::RateLimited { .. } => 429,
            Self::LimiterUnavailable | Self::Overloaded => 503,
            Self::UriTooLong => 414,
            Self::HeadersTooLarge => 431,
            Self::PayloadTooLarge => 413,
            Self::RequestTimeout => 408,
            Self::ClientClosed => 499,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::NoRoute => "not_found",
            Self::UnknownChallenge => "unknown_acme_challenge",
            Self::NoHealthyBackend { .. } => "no_healthy_backend",
            Self::BadGateway => "bad_gateway",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::BadRequest => "bad_request",
            Self::Internal => "internal_error",
            Self::Auth(e) => e.reason(),
            Self::RateLimited { .. } => "rate_limited",
            Self::LimiterUnavailable => "rate_limiter_unavailable",
            Self::Overloaded => "overloaded",
            Self::UriTooLong => "uri_too_long",
            Self::HeadersTooLarge => "headers_too_large",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::ClientClosed => "client_closed_request",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::NoRoute => "no route matches this request",
            Self::UnknownChallenge => "no ACME validation is under way for this token",
            Self::NoHealthyBackend { .. } => "no healthy backend is available for this route",
            Self::BadGateway => "the upstream service could not be reached or failed",
            Self::UpstreamTimeout => "the upstream service did not answer in time",
            Self::BadRequest => "the request could not be processed",
            Self::Internal => "internal gateway error",
            Self::Auth(AuthError::Missing) => "credentials are required for this route",
            Self::Auth(AuthError::Ambiguous) => {
                "send exactly one credential (one Bearer token or one API key)"
            }
            Self::Auth(AuthError::InvalidKey) => "the API key is not valid",
            Self::Auth(AuthError::InvalidToken(_)) => "the bearer token is not valid",
            Self::Auth(AuthError::Forbidden) => "the caller lacks a role this route requires",
            Self::Auth(AuthError::Unavailable) => {
                "the credential cannot be checked right now; retry shortly"
            }
            Self::RateLimited { .. } => {
                "rate limit exceeded; retry after the given number of seconds"
            }
            Self::LimiterUnavailable => "the rate limiter is unavailable; retry shortly",
            Self::Overloaded => "too many requests in flight; retry shortly",
            Self::UriTooLong => "the request target is too long",
            Self::HeadersTooLarge => "the request headers are too large",
            Self::PayloadTooLarge => "the request body is too large for this route",
            Self::RequestTimeout => "the request was not received in time",
            Self::ClientClosed => "the client closed the connection before the answer",
        }
    }

    /// The `WWW-Authenticate` challenge of a 401.
    pub fn challenge(self) -> Option<&'static str> {
        match self {
            Self::Auth(AuthError::InvalidToken(_)) => {
                Some(r#"Bearer realm="tollgate", error="invalid_token""#)
            }
            Self::Auth(AuthError::InvalidKey) => Some(r#"ApiKey realm="tollgate""#),
            Self::Auth(AuthError::Missing | AuthError::Ambiguous) => {
                Some(r#"Bearer realm="tollgate", ApiKey realm="tollgate""#)
            }
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, when that is meaningful.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            Self::NoHealthyBackend { retry_after } => Some(retry_after),
            Self::Auth(AuthError::Unavailable) | Self::LimiterUnavailable | Self::Overloaded => {
                Some(1)
            }
            Self::RateLimited { retry_after } => Some(retry_after),
            _ => None,
        }
    }

    /// Classify a pingora error that ended a proxied request.
    pub fn from_pingora(e: &Error) -> Self {
        use ErrorType::*;
        match e.etype() {
            // The client stalled (a request body that stopped arriving): not the upstream's fault.
            ReadTimedout if e.esource() == &pingora_error::ErrorSource::Downstream => {
                Self::RequestTimeout
            }
            ConnectTimedout | ReadTimedout | WriteTimedout => Self::UpstreamTimeout,
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => {
                Self::BadGateway
            }
            HTTPStatus(400..=499) => Self::BadRequest,
            _ => match e.esource() {
                pingora_error::ErrorSource::Upstream => Self::BadGateway,
                pingora_error::ErrorSource::Downstream => Self::BadRequest,
                _ => Self::Internal,
            },
        }
    }

    pub fn body(self, request_id: &str) -> Bytes {
        let mut body = serde_json::json!({
            "error": self.code(),
            "message": self.message(),
            "request_id": request_id,
        });
        if let Self::RateLimited { retry_after } = self {
            body["retry_after"] = retry_after.into();
        }
        Bytes::from(body.to_string())
    }
}

/// Write `err` as the whole response, with `extra` fields (the request id, rate-limit fields)
/// spelled as `case` says. `close` drops the downstream connection afterwards (for answers
/// given before the request body was read).
///
/// A gRPC call gets the gRPC form of the same answer: `200`, trailers-only, with
/// `grpc-status` and `grpc-message` (see [`crate::http::grpc::status_for`]).
pub async fn respond_with(
    session: &mut Session,
    err: GatewayError,
    request_id: &str,
    close: bool,
    extra: &[(&'static Field, HeaderValue)],
    case: Case,
) -> pingora_error::Result<()> {
    if grpc::is_grpc(&session.req_header().headers) {
        return respond_grpc(session, err, request_id, close, extra).await;
    }
    let body = err.body(request_id);
    let size = Some(4 + extra.len());
    let mut header = match case {
        Case::Canonical => ResponseHeader::build_no_case(err.status(), size)?,
        Case::Preserve => ResponseHeader::build(err.status(), size)?,
    };
    header.insert_header("Content-Type", "application/json")?;
    header.insert_header("Content-Length", body.len())?;
    for (field, value) in extra {
        match case {
            Case::Canonical => header.insert_header(&field.name, value)?,
            Case::Preserve => header.insert_header(field.spelled, value)?,
        }
    }
    if let Some(secs) = err.retry_after() {
        header.insert_header("Retry-After", secs)?;
    }
    if let Some(challenge) = err.challenge() {
        header.insert_header("WWW-Authenticate", challenge)?;
    }
    if close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The gRPC form of a gateway answer: one header block that ends the stream ("trailers-only"),
/// the HTTP status in `grpc-message` next to the error's message and code.
async fn respond_grpc(
    session: &mut Session,
    err: GatewayError,
    request_id: &str,
    close: bool,
    extra: &[(&'static Field, HeaderValue)],
) -> pingora_error::Result<()> {
    let mut header = ResponseHeader::build(200, Some(6 + extra.len()))?;
    header.insert_header("content-type", "application/grpc")?;
    header.insert_header("grpc-status", grpc::status_for(err.status()).to_string())?;
    // Percent-encoded by the spec; the messages are plain ASCII without `%`.
    header.insert_header(
        "grpc-message",
        format!("{} ({}, request {request_id})", err.message(), err.code()),
    )?;
    for (field, value) in extra {
        header.insert_header(&field.name, value)?;
    }
    if let Some(secs) = err.retry_after() {
        header.insert_header("retry-after", secs)?;
    }
    if !session.is_http2() {
        header.insert_header("content-length", "0")?;
    }
    if close {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), true)
        .await?;
    // The answer is complete; the client may still be sending its request. Over HTTP/2, a
    // stream dropped with its request half open is reset with CANCEL, which HTTP/2 clients
    // (hyper, so tonic) report as an error instead of the status just sent. Read the rest of
    // the request for a moment so the stream closes cleanly (a stream still open after it
    // is reset as before).
    if session.is_http2() && !session.is_body_done() {
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            session.drain_request_body(),
        )
        .await;
    }
    Ok(())
}

/// End a gRPC call whose response head already went out: `grpc-status` and `grpc-message` as
/// trailers.
pub async fn grpc_trailers(
    session: &mut Session,
    err: GatewayError,
    request_id: &str,
) -> pingora_error::Result<()> {
    let mut trailers = http::HeaderMap::with_capacity(2);
    trailers.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc::status_for(err.status()))),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{} ({}, request {request_id})",
        err.message(),
        err.code()
    )) {
        trailers.insert("grpc-message", v);
    }
    session.write_response_trailers(trailers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_with_code_and_request_id() {
        let body = GatewayError::NoRoute.body("abc");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"], "not_found");
        assert_eq!(v["request_id"], "abc");
    }

    #[test]
    fn timeouts_are_504_and_refusals_502() {
        let t = Error::new(ErrorType::ReadTimedout);
        assert_eq!(GatewayError::from_pingora(&t).status(), 504);
        let r = Error::new(ErrorType::ConnectRefused);
        assert_eq!(GatewayError::from_pingora(&r).status(), 502);
        // A client whose request body stopped arriving.
        let mut d = Error::new(ErrorType::ReadTimedout);
        d.as_down();
        assert_eq!(GatewayError::from_pingora(&d).status(), 408);
    }
}
