//! Liveness and identity: `GET /health` pings Postgres (both pools) and Redis, each under a short
//! timeout, and answers 200 or 503 with per-check details (the gateway's health checker reads
//! the status); `GET /api/v1/status` says which instance answered and for how long it has run.
//! Neither changes anything.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::state::AppState;

/// Budget of each dependency check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Run one check under `CHECK_TIMEOUT`: `(ok, detail)`.
async fn check<F, E>(f: F) -> (bool, Value)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let outcome = tokio::time::timeout(CHECK_TIMEOUT, f).await;
    let ms = start.elapsed().as_millis() as u64;
    match outcome {
        Ok(Ok(())) => (true, json!({ "status": "ok", "latencyMs": ms })),
        Ok(Err(e)) => (false, json!({ "status": "error", "error": e.to_string() })),
        Err(_) => (
            false,
            json!({ "status": "error", "error": format!("timed out after {CHECK_TIMEOUT:?}") }),
        ),
    }
}

/// `GET /health`: 200 `{"status":"ok",...}` or 503 naming what is down.
pub async fn health(State(st): State<AppState>) -> Response {
    let ping = |pool: sqlx::PgPool| async move {
        sqlx::query("SELECT 1").execute(&pool).await.map(|_| ())
    };
    let mut redis = st.redis.clone();
    let (pg, pg_read, rd) = tokio::join!(
        check(ping(st.db.write.clone())),
        check(ping(st.db.read.clone())),
        check(async move {
            redis::cmd("PING")
                .query_async::<String>(&mut redis)
                .await
                .map(|_| ())
        }),
    );
    let mut checks = Map::new();
    let mut down = Vec::new();
    for (name, (ok, detail)) in [("postgres", pg), ("postgresRead", pg_read), ("redis", rd)] {
        if !ok {
            down.push(name);
        }
        checks.insert(name.to_string(), detail);
    }
    let instance = &st.config.instance_id;
    if down.is_empty() {
        let body = json!({ "status": "ok", "instanceId": instance, "checks": checks });
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let body = json!({
            "status": "unavailable",
            "error": "unhealthy",
            "message": format!("unavailable: {}", down.join(", ")),
            "instanceId": instance,
            "checks": checks,
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /api/v1/status`: which instance answered (to watch the gateway balance).
pub async fn status(State(st): State<AppState>) -> Json<Value> {
    Json(json!({
        "instanceId": st.config.instance_id,
        "uptimeSeconds": st.started.elapsed().as_secs(),
        "startedAt": st.started_at,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
    }))
}
