//! The stream-to-Postgres worker: one consumer (named by `INSTANCE_ID`) in the `writers` group
//! reads batches, inserts them in one statement (`ON CONFLICT DO NOTHING`), and only then
//! acknowledges and deletes them. It never acknowledges what it has not stored: entries of a
//! failed batch stay pending and are read again, and entries left pending by a dead instance
//! are claimed after `CLAIM_IDLE`. On stop it finishes the batch in hand and drains what is
//! already on the stream before returning. It never answers HTTP.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{GROUP, STREAM};

/// Entries per read and per INSERT.
const BATCH: usize = 100;
/// How long one read waits for new entries (also bounds how fast the worker notices a stop).
const BLOCK: Duration = Duration::from_millis(500);
/// Entries pending this long on any consumer are presumed orphaned and claimed.
const CLAIM_IDLE: Duration = Duration::from_secs(30);
const CLAIM_EVERY: Duration = Duration::from_secs(15);
/// Pause after a failed step (Redis or Postgres down) before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

/// One parsed stream entry, ready to insert.
#[derive(Debug)]
struct Row {
    id: Uuid,
    key: String,
    payload: String,
    consumer: Option<String>,
    accepted_at: DateTime<Utc>,
}

/// Which entries a read asks for.
#[derive(Clone, Copy)]
enum Read {
    /// Our own pending entries (delivered earlier, never acknowledged).
    Backlog,
    /// New entries, waiting up to `BLOCK` for some (or not at all).
    New { block: bool },
}

struct Worker {
    db: PgPool,
    conn: ConnectionManager,
    consumer: String,
}

/// Run until `stop` is cancelled, then drain for at most `drain_for` and return.
pub async fn run(
    db: PgPool,
    client: redis::Client,
    consumer: String,
    stop: CancellationToken,
    drain_for: Duration,
) {
    // A connection of its own: XREADGROUP BLOCK would stall the handlers' multiplexed one.
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)))
        .set_connection_timeout(Some(Duration::from_secs(2)));
    let conn = loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "event worker: waiting for redis");
                if pause_or_stop(&stop).await {
                    return;
                }
            }
        }
    };
    let mut w = Worker { db, conn, consumer };
    tracing::info!(consumer = %w.consumer, "event worker started");

    let mut need_group = true;
    let mut backlog = true;
    let mut last_claim: Option<Instant> = None;
    while !stop.is_cancelled() {
        if need_group {
            if let Err(e) = w.ensure_group().await {
                tracing::warn!(error = %e, "event worker: cannot create the consumer group");
                if pause_or_stop(&stop).await {
                    break;
                }
                continue;
            }
            need_group = false;
        }
        if last_claim.is_none_or(|t| t.elapsed() >= CLAIM_EVERY) {
            last_claim = Some(Instant::now());
            match w.claim_orphans().await {
                Ok(n) if n > 0 => {
                    tracing::info!(claimed = n, "event worker: claimed orphaned entries");
                    backlog = true;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "event worker: claim failed"),
            }
        }
        let read = if backlog {
            Read::Backlog
        } else {
            Read::New { block: true }
        };
        match w.step(read).await {
            Ok(0) if backlog => backlog = false,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "event worker: batch not stored, will retry");
                need_group = matches!(&e, StepError::Redis(re) if re.code() == Some("NOGROUP"));
                backlog = true;
                if pause_or_stop(&stop).await {
                    break;
                }
            }
        }
    }
    w.drain(drain_for).await;
    tracing::info!("event worker stopped");
}

/// Sleep `RETRY_PAUSE`; true if `stop` was cancelled meanwhile.
async fn pause_or_stop(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(RETRY_PAUSE) => false,
    }
}

impl Worker {
    async fn ensure_group(&mut self) -> Result<(), redis::RedisError> {
        // From "0": entries added before the group existed are stored too.
        let created: Result<(), _> = self.conn.xgroup_create_mkstream(STREAM, GROUP, "0").await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e),
            _ => Ok(()),
        }
    }

    /// Take over entries another consumer left pending for longer than `CLAIM_IDLE`.
    async fn claim_orphans(&mut self) -> Result<usize, redis::RedisError> {
        let reply: redis::streams::StreamAutoClaimReply = self
            .conn
            .xautoclaim_options(
                STREAM,
                GROUP,
                &self.consumer,
                CLAIM_IDLE.as_millis() as u64,
                "0-0",
                StreamAutoClaimOptions::default().count(BATCH).with_justid(),
            )
            .await?;
        Ok(reply.claimed.len())
    }

    /// Stop-time drain: our backlog, then whatever is already on the stream, until it is empty
    /// or `limit` has passed. Accepted events that still remain stay on the stream (pending for
    /// this consumer name or undelivered) for the next start or another instance.
    async fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut backlog = true;
        let mut stored = 0;
        while Instant::now() < deadline {
            let read = if backlog {
                Read::Backlog
            } else {
                Read::New { block: false }
            };
            match self.step(read).await {
                Ok(0) if backlog => backlog = false,
                Ok(0) => break,
                Ok(n) => stored += n,
                Err(e) => {
                    tracing::warn!(error = %e, "event worker: drain step failed");
                    backlog = true;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        tracing::info!(entries = stored, "event worker drained");
    }

    /// Read one batch, store it, acknowledge it. Returns the number of entries handled.
    async fn step(&mut self, read: Read) -> Result<usize, StepError> {
        let mut opts = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(BATCH);
        let from = match read {
            Read::Backlog => "0",
            Read::New { block } => {
                if block {
                    opts = opts.block(BLOCK.as_millis() as usize);
                }
                ">"
            }
        };
        let reply: Option<StreamReadReply> =
            self.conn.xread_options(&[STREAM], &[from], &opts).await?;
        let entries: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            match parse_entry(e) {
                Ok(row) => rows.push(row),
                // Unstorable whatever we do: acknowledge it with the batch rather than retry forever.
                Err(why) => tracing::error!(entry = %e.id, why, "dropping malformed stream entry"),
            }
        }
        self.store(&rows).await?;
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let _: ((), ()) = redis::pipe()
            .atomic()
            .xack(STREAM, GROUP, &ids)
            .xdel(STREAM, &ids)
            .query_async(&mut self.conn)
            .await?;
        tracing::debug!(entries = entries.len(), "event batch stored");
        Ok(entries.len())
    }

    /// Insert the batch in one statement. If Postgres rejects the data itself (not the
    /// connection), fall back to one row at a time and drop only the rows it refuses.
    async fn store(&self, rows: &[Row]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        match insert(&self.db, rows).await {
            Err(sqlx::Error::Database(e)) => {
                tracing::warn!(error = %e, "batch refused; storing row by row");
                for row in rows {
                    match insert(&self.db, std::slice::from_ref(row)).await {
                        Ok(()) => {}
                        Err(sqlx::Error::Database(e)) => {
                            tracing::error!(event = %row.id, error = %e, "dropping unstorable event")
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            other => other,
        }
    }
}

async fn insert(db: &PgPool, rows: &[Row]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    let consumers: Vec<Option<&str>> = rows.iter().map(|r| r.consumer.as_deref()).collect();
    let accepted: Vec<DateTime<Utc>> = rows.iter().map(|r| r.accepted_at).collect();
    sqlx::query(
        "INSERT INTO events (id, idempotency_key, payload, consumer_id, accepted_at) \
         SELECT id, key, payload::jsonb, consumer, accepted_at \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
              AS t(id, key, payload, consumer, accepted_at) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(&payloads)
    .bind(&consumers)
    .bind(&accepted)
    .execute(db)
    .await?;
    Ok(())
}

fn parse_entry(e: &StreamId) -> Result<Row, String> {
    let field = |name: &str| -> Result<String, String> {
        e.get::<String>(name)
            .ok_or_else(|| format!("no {name} field"))
    };
    let id = Uuid::parse_str(&field("id")?).map_err(|err| format!("bad id: {err}"))?;
    let key = field("key")?;
    if key.is_empty() || key.len() > super::MAX_KEY_LEN {
        return Err("bad idempotency key".into());
    }
    let payload = field("payload")?;
    let value: serde_json::Value =
        serde_json::from_str(&payload).map_err(|err| format!("bad payload: {err}"))?;
    if super::has_nul(&value) {
        return Err("payload contains NUL".into());
    }
    let consumer = e.get::<String>("consumer").filter(|c| !c.is_empty());
    let accepted_at = DateTime::parse_from_rfc3339(&field("accepted_at")?)
        .map_err(|err| format!("bad accepted_at: {err}"))?
        .with_timezone(&Utc);
    Ok(Row {
        id,
        key,
        payload,
        consumer,
        accepted_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect::<HashMap<_, _>>(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        }
    }

    const GOOD: [(&str, &str); 5] = [
        ("id", "6f1c4a52-8d1e-4b8e-9a55-0f1f4d2f9a10"),
        ("key", "k-1"),
        ("payload", r#"{"type":"click"}"#),
        ("consumer", ""),
        ("accepted_at", "2026-01-02T03:04:05.123456Z"),
    ];

    #[test]
    fn parses_a_good_entry() {
        let row = parse_entry(&entry(&GOOD)).unwrap();
        assert_eq!(row.key, "k-1");
        assert_eq!(row.consumer, None);
    }

    #[test]
    fn refuses_malformed_entries() {
        for (field, bad) in [
            ("id", "nope"),
            ("key", ""),
            ("payload", "{"),
            ("payload", r#"{"a":"\u0000"}"#),
            ("accepted_at", "yesterday"),
        ] {
            let fields: Vec<_> = GOOD
                .iter()
                .map(|(k, v)| if *k == field { (*k, bad) } else { (*k, *v) })
                .collect();
            assert!(parse_entry(&entry(&fields)).is_err(), "{field}={bad}");
        }
        assert!(parse_entry(&entry(&GOOD[1..])).is_err());
    }
}
