//! `GET /api/v1/external`: a flaky "third-party" dependency to show the gateway's breaker and
//! timeouts. With `EXTERNAL_FAIL_RATE` it answers 500 or 503; with `EXTERNAL_STALL_RATE` it
//! sleeps ~30 s before answering; otherwise 200. It touches no store.
//!
//! With `EXTERNAL_CONTROL=1`, `GET /api/v1/external/mode` shows the two rates and
//! `PUT /api/v1/external/mode` `{"failRate": 1, "stallRate": 0}` changes them at runtime, so a
//! demo (or a test) can make the dependency fail and recover without restarting the instance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{json_object, ApiError};
use crate::state::AppState;

/// The current failure and stall rates (f64 bits in atomics: read on every call, lock-free).
/// Each rate is read and written on its own; a call racing with a change may see one old and
/// one new rate, which is harmless for a simulated dependency.
#[derive(Debug)]
pub struct Rates {
    fail: AtomicU64,
    stall: AtomicU64,
}

impl Rates {
    pub fn new(fail: f64, stall: f64) -> Self {
        Self {
            fail: AtomicU64::new(fail.to_bits()),
            stall: AtomicU64::new(stall.to_bits()),
        }
    }

    /// `(fail, stall)`.
    pub fn get(&self) -> (f64, f64) {
        (
            f64::from_bits(self.fail.load(Ordering::Relaxed)),
            f64::from_bits(self.stall.load(Ordering::Relaxed)),
        )
    }

    fn set(&self, fail: f64, stall: f64) {
        self.fail.store(fail.to_bits(), Ordering::Relaxed);
        self.stall.store(stall.to_bits(), Ordering::Relaxed);
    }
}

/// How long a stalled call sleeps (longer than any sane gateway read timeout).
pub const STALL: Duration = Duration::from_secs(30);

/// What one call does, from a uniform draw in 0..1 and the two rates.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Fail(StatusCode),
    Stall,
    Ok,
}

pub fn decide(draw: f64, flip: bool, fail_rate: f64, stall_rate: f64) -> Outcome {
    if draw < fail_rate {
        Outcome::Fail(if flip {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })
    } else if draw < fail_rate + stall_rate {
        Outcome::Stall
    } else {
        Outcome::Ok
    }
}

pub async fn external(State(st): State<AppState>) -> (StatusCode, Json<Value>) {
    let (draw, flip) = {
        let mut rng = rand::thread_rng();
        (rng.gen::<f64>(), rng.gen::<bool>())
    };
    let instance = &st.config.instance_id;
    let (fail_rate, stall_rate) = st.external.get();
    match decide(draw, flip, fail_rate, stall_rate) {
        Outcome::Fail(status) => (
            status,
            Json(json!({
                "error": "external_failed",
                "message": "the external dependency failed (simulated)",
                "instanceId": instance,
            })),
        ),
        Outcome::Stall => {
            tokio::time::sleep(STALL).await;
            (
                StatusCode::OK,
                Json(json!({ "outcome": "stalled", "instanceId": instance })),
            )
        }
        Outcome::Ok => (
            StatusCode::OK,
            Json(json!({ "outcome": "ok", "instanceId": instance })),
        ),
    }
}

/// The body of `PUT /api/v1/external/mode`: both rates, each in 0..=1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mode {
    fail_rate: f64,
    stall_rate: f64,
}

fn mode_body(st: &AppState) -> Json<Value> {
    let (fail, stall) = st.external.get();
    Json(json!({
        "failRate": fail,
        "stallRate": stall,
        "instanceId": st.config.instance_id,
    }))
}

/// `GET /api/v1/external/mode` (only with `EXTERNAL_CONTROL=1`).
pub async fn get_mode(State(st): State<AppState>) -> Json<Value> {
    mode_body(&st)
}

/// `PUT /api/v1/external/mode` `{failRate, stallRate}` (only with `EXTERNAL_CONTROL=1`).
pub async fn put_mode(
    State(st): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let mode: Mode = json_object(body)?;
    for (name, v) in [("failRate", mode.fail_rate), ("stallRate", mode.stall_rate)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(ApiError::invalid(format!(
                "{name} must be between 0 and 1, got {v}"
            )));
        }
    }
    st.external.set(mode.fail_rate, mode.stall_rate);
    tracing::info!(
        fail_rate = mode.fail_rate,
        stall_rate = mode.stall_rate,
        "external mode changed"
    );
    Ok(mode_body(&st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_split_the_unit_interval() {
        assert_eq!(decide(0.5, true, 0.0, 0.0), Outcome::Ok);
        assert_eq!(
            decide(0.1, true, 0.2, 0.0),
            Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(
            decide(0.1, false, 0.2, 0.0),
            Outcome::Fail(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(decide(0.25, true, 0.2, 0.1), Outcome::Stall);
        assert_eq!(decide(0.35, true, 0.2, 0.1), Outcome::Ok);
        assert_eq!(
            decide(0.999, true, 1.0, 0.0),
            Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR)
        );
    }
}
