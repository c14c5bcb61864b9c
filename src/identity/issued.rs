//! Admin-issued API keys, shared by every gateway node through Redis. A key is stored only as
//! its SHA-256 digest (`tollgate:{tg}:key:<hex>` -> JSON record, expiring on its own), listed
//! through an index hash, and revoked by deleting it and publishing its digest on a channel
//! every node subscribes to. Each node caches lookups (positive and negative) for
//! `auth.key_cache_ttl` (default 1 s), so a revocation reaches every node within that time even
//! if a pub/sub message is lost.
//!
//! Redis down: keys validated in the last `STALE_FOR` keep working from the cache (a revocation
//! made meanwhile cannot reach this node); any other issued key gets 503, never 401 — the
//! gateway cannot tell it is invalid. Keys in the YAML file never depend on Redis.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::keys::{self, KeyHash};
use crate::clock::UnixMs;
use crate::store::{Store, StoreError, PREFIX};

/// How long a cached positive lookup may be used while Redis is unreachable.
pub const STALE_FOR: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedKey {
    /// Public identifier (for listing and revoking); not secret.
    pub id: String,
    pub consumer: String,
    pub tier: String,
    pub roles: Vec<String>,
    pub created_at: u64,
    /// The first Unix second at which the key no longer works; `None` = never expires.
    /// Rounded up from the moment of issue (see [`expiry_secs`]), so a key lives at least the
    /// `expires_in` it was issued with.
    pub expires_at: Option<u64>,
}

/// When a key issued at `now_ms` (Unix milliseconds) for `ttl` seconds stops working, in whole
/// Unix seconds, rounded up: a key issued at 10.999 s for 1 s works until 12 s, never only until
/// 11 s (1 ms). Redis drops the record itself `ttl` seconds after the issue, which is the
/// precise end; this bound is what the node-local cache checks.
pub fn expiry_secs(now_ms: u64, ttl: u64) -> u64 {
    now_ms
        .saturating_add(ttl.saturating_mul(1000))
        .div_ceil(1000)
}

impl IssuedKey {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Clone)]
struct Cached {
    at: Instant,
    key: Option<Arc<IssuedKey>>,
}

/// The outcome of looking a presented key up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<IssuedKey>),
    NotFound,
    /// Redis could not answer and nothing usable is cached.
    Unavailable,
}

pub struct IssuedKeys {
    pub store: Arc<Store>,
    cache: quick_cache::sync::Cache<KeyHash, Cached>,
}

fn record_key(hash: &KeyHash) -> String {
    format!("{PREFIX}:key:{}", hex::encode(hash))
}

fn index_key() -> String {
    format!("{PREFIX}:keys")
}

pub fn revocation_channel() -> String {
    format!("{PREFIX}:revoked")
}

impl IssuedKeys {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            cache: quick_cache::sync::Cache::new(100_000),
        }
    }

    /// Look a key digest up: cache first (within `ttl`), then Redis.
    pub async fn lookup(&self, hash: &KeyHash, ttl: Duration) -> Lookup {
        let cached = self.cache.get(hash);
        if let Some(c) = &cached {
            if c.at.elapsed() < ttl {
                return self.live(c.key.clone());
            }
        }
        let redis_key = record_key(hash);
        let fetched = self
            .store
            .call_for_request("key_lookup", |mut c| async move {
                c.get::<_, Option<String>>(redis_key).await
            })
            .await;
        match fetched {
            Ok(found) => {
                let key = found
                    .and_then(|json| serde_json::from_str::<IssuedKey>(&json).ok())
                    .map(Arc::new);
                self.cache.insert(
                    *hash,
                    Cached {
                        at: Instant::now(),
                        key: key.clone(),
                    },
                );
                self.live(key)
            }
            Err(_) => match cached {
                Some(Cached { at, key: Some(k) }) if at.elapsed() < STALE_FOR => self.live(Some(k)),
                _ => Lookup::Unavailable,
            },
        }
    }

    fn live(&self, key: Option<Arc<IssuedKey>>) -> Lookup {
        match key {
            Some(k) if !k.expired(now_secs()) => Lookup::Found(k),
            _ => Lookup::NotFound,
        }
    }

    /// Forget a digest on this node and remember it as absent (a revocation).
    pub fn evict(&self, hash: &KeyHash) {
        self.cache.insert(
            *hash,
            Cached {
                at: Instant::now(),
                key: None,
            },
        );
    }

    /// Drop every cached lookup (after the revocation feed reconnects: messages may be lost).
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Store a new key; returns the plain key (shown once) and its record.
    pub async fn issue(
        &self,
        consumer: String,
        tier: String,
        roles: Vec<String>,
        ttl: Option<u64>,
    ) -> Result<(String, IssuedKey), StoreError> {
        let plain = keys::generate();
        let hash = keys::hash(&plain);
        let now_ms = UnixMs::now().0;
        let record = IssuedKey {
            id: format!("key_{}", hex::encode(rand::random::<[u8; 8]>())),
            consumer,
            tier,
            roles,
            created_at: now_ms / 1000,
            expires_at: ttl.map(|t| expiry_secs(now_ms, t)),
        };
        let json = serde_json::to_string(&record).map_err(|_| StoreError::Failed)?;
        let (rk, ik, id, hex_hash) = (
            record_key(&hash),
            index_key(),
            record.id.clone(),
            hex::encode(hash),
        );
        self.store
            .call("key_issue", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic();
                match ttl {
                    Some(t) => pipe.set_ex(&rk, &json, t.max(1)),
                    None => pipe.set(&rk, &json),
                };
                pipe.hset(&ik, &id, &hex_hash);
                pipe.query_async::<()>(&mut c).await
            })
            .await?;
        self.cache.remove(&hash);
        Ok((plain, record))
    }

    /// Every issued key that still exists (expired records vanish from Redis on their own;
    /// their index entries are pruned here).
    pub async fn list(&self) -> Result<Vec<IssuedKey>, StoreError> {
        let ik = index_key();
        let index: Vec<(String, String)> = self
            .store
            .call("key_list", |mut c| async move { c.hgetall(ik).await })
            .await?;
        if index.is_empty() {
            return Ok(Vec::new());
        }
        let record_keys: Vec<String> = index
            .iter()
            .filter_map(|(_, h)| {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).ok().map(|_| record_key(&d))
            })
            .collect();
        let records: Vec<Option<String>> = self
            .store
            .call("key_list", |mut c| async move { c.mget(record_keys).await })
            .await?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for ((id, _), rec) in index.iter().zip(records) {
            match rec.and_then(|j| serde_json::from_str::<IssuedKey>(&j).ok()) {
                Some(k) => out.push(k),
                None => stale.push(id.clone()),
            }
        }
        if !stale.is_empty() {
            let ik = index_key();
            let _ = self
                .store
                .call("key_list", |mut c| async move {
                    c.hdel::<_, _, ()>(ik, stale).await
                })
                .await;
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Revoke by id: delete, unindex, and tell every node. `Ok(false)` when no such key.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let (ik, id_owned) = (index_key(), id.to_string());
        let hex_hash: Option<String> = self
            .store
            .call(
                "key_revoke",
                |mut c| async move { c.hget(ik, id_owned).await },
            )
            .await?;
        let Some(hex_hash) = hex_hash else {
            return Ok(false);
        };
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(&hex_hash, &mut digest).is_err() {
            return Ok(false);
        }
        let (rk, ik, id_owned, chan) = (
            record_key(&digest),
            index_key(),
            id.to_string(),
            revocation_channel(),
        );
        self.store
            .call("key_revoke", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .del(&rk)
                    .hdel(&ik, &id_owned)
                    .publish(&chan, &hex_hash);
                pipe.query_async::<()>(&mut c).await
            })
            .await?;
        self.evict(&digest);
        Ok(true)
    }

    /// Follow the revocation channel until `stop` fires; reconnects on its own.
    pub async fn follow_revocations(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        use futures_util::StreamExt;
        loop {
            let subscribed = async {
                let mut pubsub = self.store.client.get_async_pubsub().await.ok()?;
                pubsub.subscribe(revocation_channel()).await.ok()?;
                Some(pubsub)
            };
            let pubsub = tokio::select! {
                p = tokio::time::timeout(Duration::from_secs(2), subscribed) => p.ok().flatten(),
                _ = stop.changed() => return,
            };
            if let Some(mut pubsub) = pubsub {
                // Anything published while we were not listening is lost: start clean.
                self.clear();
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(m) => {
                                let payload: String = m.get_payload().unwrap_or_default();
                                let mut digest = [0u8; 32];
                                if hex::decode_to_slice(payload.trim(), &mut digest).is_ok() {
                                    self.evict(&digest);
                                }
                            }
                            None => break,
                        },
                        _ = stop.changed() => return,
                    }
                }
                log::warn!("revocation feed from redis lost; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
