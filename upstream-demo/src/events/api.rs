//! The HTTP side of events: `POST /api/v1/events` validates, assigns or recalls the event id for
//! the `Idempotency-Key`, puts the event on the stream and answers 202 without waiting for
//! Postgres; `GET /api/v1/events/{id}` says whether it is still pending or stored. It never
//! writes to Postgres (that is the worker's job).

use std::sync::LazyLock;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use redis::AsyncCommands;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{id_record, key_record, RECORD_TTL, STREAM};
use crate::auth::forwarded_consumer;
use crate::error::ApiError;
use crate::state::AppState;

/// Largest accepted event body; the route's body limit enforces it (413 beyond).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Atomically: claim the idempotency key with `SET NX`; if it was free, record id→key and append
/// the event to the stream; if it was taken, return the id it maps to. Returns `{created, id}`.
static ACCEPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
            redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
            redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'key', ARGV[3], 'payload', ARGV[4],
                       'consumer', ARGV[5], 'accepted_at', ARGV[6])
            return {1, ARGV[1]}
        end
        return {0, redis.call('GET', KEYS[1])}
        ",
    )
});

/// The `Idempotency-Key` header: required, visible ASCII, 1..=200 characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers.get("idempotency-key").ok_or_else(|| {
        ApiError::bad_request(
            "missing_idempotency_key",
            "the Idempotency-Key header is required",
        )
    })?;
    let key = raw
        .to_str()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be visible ASCII",
            )
        })?
        .trim();
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must not be empty",
        ));
    }
    if key.len() > super::MAX_KEY_LEN {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key is longer than {} characters",
                super::MAX_KEY_LEN
            ),
        ));
    }
    Ok(key.to_string())
}

fn accepted(id: &str, duplicate: bool) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/api/v1/events/{id}"))],
        Json(json!({ "eventId": id, "status": "accepted", "duplicate": duplicate })),
    )
        .into_response()
}

/// `POST /api/v1/events` with `Idempotency-Key` and a JSON object -> 202 `{eventId}`.
pub async fn accept(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let Json(payload) = body?;
    if !payload.is_object() {
        return Err(ApiError::invalid("the event body must be a JSON object"));
    }
    if super::has_nul(&payload) {
        return Err(ApiError::invalid(
            "the event contains a NUL character, which cannot be stored",
        ));
    }
    let consumer = forwarded_consumer(&headers)?;
    let mut redis = st.redis.clone();

    // 1. A retry within the record's lifetime: Redis remembers the id.
    if let Some(id) = redis.get::<_, Option<String>>(key_record(&key)).await? {
        return Ok(accepted(&id, true));
    }
    // 2. A retry after the record expired: the stored row remembers it. Re-cache it.
    let stored: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM events WHERE idempotency_key = $1")
            .bind(&key)
            .fetch_optional(&st.db.write)
            .await?;
    if let Some(id) = stored {
        let id = id.to_string();
        let _: Option<String> = redis::cmd("SET")
            .arg(key_record(&key))
            .arg(&id)
            .arg("NX")
            .arg("EX")
            .arg(RECORD_TTL.as_secs())
            .query_async(&mut redis)
            .await?;
        return Ok(accepted(&id, true));
    }
    // 3. New (or racing with a twin request: SET NX picks one winner, the other gets its id).
    let id = Uuid::new_v4();
    let accepted_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let (created, id): (i64, String) = ACCEPT
        .key(key_record(&key))
        .key(id_record(&id))
        .key(STREAM)
        .arg(id.to_string())
        .arg(RECORD_TTL.as_secs())
        .arg(&key)
        .arg(payload.to_string())
        .arg(consumer.unwrap_or_default())
        .arg(accepted_at)
        .invoke_async(&mut redis)
        .await?;
    if created == 1 {
        tracing::debug!(event = %id, "event accepted");
    }
    Ok(accepted(&id, created == 0))
}

#[derive(sqlx::FromRow)]
struct StoredEvent {
    id: Uuid,
    idempotency_key: String,
    payload: Value,
    consumer_id: Option<String>,
    accepted_at: DateTime<Utc>,
    stored_at: DateTime<Utc>,
}

const EVENT_COLUMNS: &str = "id, idempotency_key, payload, consumer_id, accepted_at, stored_at";

fn stored(e: StoredEvent) -> Json<Value> {
    Json(json!({
        "eventId": e.id,
        "status": "stored",
        "idempotencyKey": e.idempotency_key,
        "consumerId": e.consumer_id,
        "payload": e.payload,
        "acceptedAt": e.accepted_at,
        "storedAt": e.stored_at,
    }))
}

/// `GET /api/v1/events/{id}` -> `{status: "pending" | "stored", ...}`, 404 if unknown.
pub async fn status(
    State(st): State<AppState>,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    let row: Option<StoredEvent> =
        sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"))
            .bind(id)
            .fetch_optional(&st.db.read)
            .await?;
    if let Some(row) = row {
        return Ok(stored(row));
    }
    let mut redis = st.redis.clone();
    let Some(key) = redis.get::<_, Option<String>>(id_record(&id)).await? else {
        return Err(ApiError::not_found(format!("event {id} not found")));
    };
    // Accepted by this id, but stored under another one: only if Redis lost the key record
    // while the first copy was in flight; the unique key kept a single row, so report that row.
    let twin: Option<StoredEvent> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE idempotency_key = $1"
    ))
    .bind(&key)
    .fetch_optional(&st.db.read)
    .await?;
    if let Some(row) = twin {
        return Ok(stored(row));
    }
    Ok(Json(
        json!({ "eventId": id, "status": "pending", "idempotencyKey": key }),
    ))
}
