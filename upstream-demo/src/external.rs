//! `GET /api/v1/external`: a flaky "third-party" dependency to show the gateway's breaker and
//! timeouts. With `EXTERNAL_FAIL_RATE` it answers 500 or 503; with `EXTERNAL_STALL_RATE` it
//! sleeps ~30 s before answering; otherwise 200. It touches no store.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::Rng;
use serde_json::{json, Value};

use crate::state::AppState;

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
    let cfg = &st.config;
    let instance = &cfg.instance_id;
    match decide(draw, flip, cfg.external_fail_rate, cfg.external_stall_rate) {
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
