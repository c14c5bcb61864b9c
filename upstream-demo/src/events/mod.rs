//! Accepted-then-stored events. `POST /api/v1/events` answers 202 as soon as the event is on a
//! Redis Stream (`api`); a consumer-group worker writes the stream to Postgres in batches and
//! acknowledges only what is stored (`worker`). This module owns the names both sides share.
//!
//! Idempotency holds at three levels: the key→id record in Redis (`SET NX`, so a retry gets the
//! same id), a Postgres lookup when that record has expired, and the unique constraint on
//! `events.idempotency_key` (the worker inserts with `ON CONFLICT DO NOTHING`).

pub mod api;
pub mod worker;

use std::time::Duration;

/// Every Redis key carries the `{demo-events}` hash tag, so the accept script's keys live in one
/// Redis Cluster slot.
pub const STREAM: &str = "demo:{demo-events}:stream";
/// The consumer group of the workers (one consumer per instance, named by `INSTANCE_ID`).
pub const GROUP: &str = "writers";
/// How long the key→id and id→key records live in Redis; after that Postgres answers.
pub const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 200;

/// The Redis key mapping an idempotency key to its event id.
pub fn key_record(idempotency_key: &str) -> String {
    format!("demo:{{demo-events}}:key:{idempotency_key}")
}

/// The Redis key mapping an event id to its idempotency key (marks the event as pending).
pub fn id_record(id: &uuid::Uuid) -> String {
    format!("demo:{{demo-events}}:id:{id}")
}

/// True if any string or object key in `v` contains NUL, which Postgres `jsonb` rejects: such
/// an event must be refused at the door, not poison a batch later.
pub fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_anywhere_is_found() {
        assert!(!has_nul(&json!({"a": [1, "b", {"c": null}]})));
        assert!(has_nul(&json!({"a": [1, "b\u{0}"]})));
        assert!(has_nul(&json!({"a\u{0}": 1})));
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let id = uuid::Uuid::nil();
        for k in [STREAM.to_string(), key_record("k"), id_record(&id)] {
            assert!(k.contains("{demo-events}"), "{k}");
        }
    }
}
