//! Upstream attempts: picking a backend for each try (healthy, breaker closed, not yet tried),
//! the peer's timeouts, the breaker's accounting of each attempt's outcome, and whether a failed
//! attempt is retried (idempotent requests only, within `attempts` and the retry budget, with
//! backoff).

use std::time::Duration;

use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::ctx::{Attempt, AttemptEnd, Ctx, MAX_ATTEMPTS};
use crate::clock::{self, MonoMs};
use crate::error::GatewayError;
use crate::metrics;
use crate::upstream::backend::InFlight;
use crate::upstream::breaker::Outcome;
use crate::upstream::{Balance, HashKey, NoBackend};

/// Feed the current attempt's outcome to its backend's breaker (once per attempt).
pub fn record(ctx: &mut Ctx, outcome: Outcome) {
    let Some(attempt) = ctx.current.as_mut() else {
        return;
    };
    if attempt.recorded {
        return;
    }
    attempt.recorded = true;
    let (backend, probe) = (attempt.backend, attempt.probe);
    if let Some(u) = ctx.upstream() {
        u.record(backend, outcome, probe);
    }
}

/// Attempts left, another usable backend, and the retry budget allows one more.
fn may_retry(ctx: &Ctx) -> bool {
    let Some(u) = ctx.upstream() else {
        return false;
    };
    if ctx.tries >= u.spec.attempts.min(MAX_ATTEMPTS) || !u.has_untried(ctx.tried()) {
        return false;
    }
    if u.budget.try_retry(&u.spec.budget, MonoMs::now()) {
        true
    } else {
        metrics::RETRIES_DENIED
            .with_label_values(&[&u.spec.name])
            .inc();
        false
    }
}

/// May this request be sent again? Idempotent methods (RFC 9110 §9.2.2) or an
/// `Idempotency-Key`, and a body that still fits pingora's retry buffer.
fn replayable(session: &Session) -> bool {
    let req = session.req_header();
    let idempotent = matches!(
        req.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
    ) || req.headers.contains_key("idempotency-key");
    idempotent && !session.as_ref().retry_buffer_truncated()
}

/// The peer for the next attempt: a backend picked by the upstream's balancing, the attempt
/// counted (budget, in-flight, retry metric, backoff before a retry), every timeout set and
/// none longer than what is left of the request's total time.
pub async fn next_peer(session: &Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
    // Called again only for a retry: the previous attempt has ended.
    ctx.in_flight = None;
    let snapshot = &*ctx.snapshot;
    let Some(upstream) = ctx
        .route
        .and_then(|i| snapshot.upstreams.get(snapshot.routes[i].route.upstream))
    else {
        ctx.error = Some(GatewayError::NoRoute);
        return Error::e_explain(ErrorType::HTTPStatus(404), "no route");
    };
    let spec = &upstream.spec;
    let req = session.req_header();
    let key: &[u8] = match &spec.balance {
        Balance::ConsistentHash(k) => match k {
            HashKey::Header(name) => req.headers.get(name).map_or(&[], |v| v.as_bytes()),
            HashKey::Path => req.uri.path().as_bytes(),
            HashKey::ClientIp => &[], // filled below (needs an owned buffer)
        },
        _ => &[],
    };
    let ip_key;
    let key = if matches!(spec.balance, Balance::ConsistentHash(HashKey::ClientIp)) {
        ip_key = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        ip_key.as_bytes()
    } else {
        key
    };
    if ctx.tries >= spec.attempts.min(MAX_ATTEMPTS) {
        ctx.error = Some(GatewayError::BadGateway);
        return Error::e_explain(ErrorType::ConnectError, "no attempts left");
    }
    let (index, probe) = match upstream.select(key, ctx.tried()) {
        Ok(pick) => pick,
        Err(NoBackend::NoneHealthy) => {
            let retry_after = u32::try_from(upstream.retry_after_secs()).unwrap_or(u32::MAX);
            ctx.error = Some(GatewayError::NoHealthyBackend { retry_after });
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend");
        }
        Err(NoBackend::AllTried) => {
            ctx.error = Some(GatewayError::BadGateway);
            return Error::e_explain(ErrorType::ConnectError, "every backend was tried");
        }
    };
    // One clock read for the budget's window, the attempt's start and its time left.
    let mut now = clock::now();
    if ctx.tries == 0 {
        upstream
            .budget
            .record_request(&spec.budget, MonoMs::at(now));
    } else {
        metrics::RETRIES.with_label_values(&[&spec.name]).inc();
        // Exponential backoff with full jitter before a retry.
        let cap = spec
            .backoff
            .saturating_mul(1 << (ctx.tries - 1).min(16))
            .min(spec.backoff_max);
        let wait = cap.mul_f64(rand::random::<f64>());
        if !wait.is_zero() {
            Box::pin(tokio::time::sleep(wait)).await;
            now = clock::now();
        }
    }
    ctx.tried[ctx.tries] = index as u16;
    ctx.tries += 1;
    ctx.upstream_started = Some(now);
    ctx.current = Some(Attempt {
        backend: index,
        probe,
        recorded: false,
    });
    ctx.in_flight = Some(InFlight::enter(&upstream.backends[index]));

    let t = ctx
        .route
        .and_then(|i| snapshot.routes[i].route.timeouts)
        .unwrap_or(spec.timeouts);
    let mut remaining = t
        .total
        .checked_sub(now.saturating_duration_since(ctx.started))
        .unwrap_or(Duration::from_millis(1));
    // A gRPC call (HTTP/2 upstreams only: gRPC needs one) may stream for as long as it lasts:
    // the route's total time does not bound it, its own deadline (`grpc-timeout`) does; `read`
    // and `write` still bound each wait.
    if spec.http2 && crate::http::grpc::is_grpc(&req.headers) {
        if ctx.tries == 1 {
            ctx.grpc_deadline = req
                .headers
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::grpc::parse_timeout)
                .map(|d| ctx.started + d);
        }
        remaining = match ctx.grpc_deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(now);
                if left.is_zero() {
                    ctx.error = Some(GatewayError::UpstreamTimeout);
                    return Error::e_explain(ErrorType::ConnectTimedout, "grpc-timeout passed");
                }
                left
            }
            None => Duration::MAX,
        };
    }
    Ok(Box::new(crate::upstream::peer(
        spec.backends[index].addr,
        spec,
        &t,
        remaining,
    )))
}

/// A connection to the backend failed: nothing was sent, so another backend may take the
/// request.
pub fn connect_failed(ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
    let outcome = if matches!(e.etype(), ErrorType::ConnectTimedout) {
        Outcome::Timeout
    } else {
        Outcome::Connect
    };
    record(ctx, outcome);
    e.set_retry(may_retry(ctx));
    e
}

/// The backend's response head arrived: feed the breaker, and decide whether a 5xx answer is
/// dropped for a retry or replaced by a stale cached response (both end the attempt with an
/// error that `proxy_failed` and `fail_to_proxy` act on through `ctx.ended`).
pub fn response_arrived(session: &Session, response: &ResponseHeader, ctx: &mut Ctx) -> Result<()> {
    let status = response.status.as_u16();
    ctx.upstream_took = ctx.upstream_started.map(clock::since);
    record(ctx, Outcome::Status(status));
    if status < 500 {
        return Ok(());
    }
    // Only 5xx statuses can be configured for retries (validated).
    let retry_this = ctx
        .upstream()
        .is_some_and(|u| u.spec.retry_on.contains(&status))
        && replayable(session)
        && may_retry(ctx);
    if retry_this {
        // Not sent downstream yet: drop it and try another backend (see `proxy_failed`).
        ctx.ended = AttemptEnd::RetryStatus;
        let mut e = Error::explain(ErrorType::HTTPStatus(status), "retrying a failed response");
        e.set_retry(true);
        return Err(e);
    }
    if ctx.cache.as_ref().is_some_and(|c| c.fallback.is_some()) {
        ctx.ended = AttemptEnd::ServeStale;
        return Error::e_explain(ErrorType::HTTPStatus(status), "serving stale instead");
    }
    Ok(())
}

/// Proxying failed after the connection was made: feed the breaker, and decide the retry
/// (pingora panics if an overridden `error_while_proxy` leaves it undecided).
pub fn proxy_failed(
    peer: &HttpPeer,
    session: &Session,
    e: Box<Error>,
    ctx: &mut Ctx,
    client_reused: bool,
) -> Box<Error> {
    let mut e = e.more_context(format!("peer: {peer}"));
    match std::mem::replace(&mut ctx.ended, AttemptEnd::Plain) {
        AttemptEnd::ServeStale => {
            // Replaced by a stale cached response (fail_to_proxy): kept for it to see.
            ctx.ended = AttemptEnd::ServeStale;
            e.set_retry(false);
            return e;
        }
        AttemptEnd::RetryStatus => {
            // Our own retry of a 5xx response: already decided and counted.
            e.set_retry(true);
            return e;
        }
        AttemptEnd::Plain => {}
    }
    let timeout = matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
    );
    let from_upstream = e.esource() == &ErrorSource::Upstream;
    if from_upstream {
        record(
            ctx,
            if timeout {
                Outcome::Timeout
            } else {
                Outcome::Error
            },
        );
    }
    if !replayable(session) || !from_upstream {
        e.set_retry(false);
    } else if timeout {
        e.set_retry(may_retry(ctx));
    } else {
        // A reused connection the backend had closed: pingora's rule (retry only then).
        e.retry.decide_reuse(client_reused);
        if e.retry() {
            e.set_retry(may_retry(ctx));
        }
    }
    e
}

/// The request is over: the attempt leaves its backend's in-flight count, and a probe whose
/// outcome never came (the client left first) gives its slot back.
pub fn finish(ctx: &mut Ctx) {
    ctx.in_flight = None;
    if let Some(a) = ctx.current {
        if a.probe && !a.recorded {
            if let Some(u) = ctx.upstream() {
                u.backends[a.backend].breaker.release_probe();
            }
        }
    }
}
