//! The Redis side of rate limiting: the exact mode's Lua scripts (one atomic EVALSHA per
//! decision, NOSCRIPT handled by `redis::Script`), the batched mode's background sync, and the
//! node heartbeat that tells every gateway how many nodes share the limits (for the fallback).
//! Keys carry a hash tag around (policy, caller) so Redis Cluster works, and expire on their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::Script;
use tokio::sync::oneshot;

use super::algo::{self, Decision, Window};
use crate::store::{Store, StoreError};

/// Sliding window counter, same steps as `algo::sliding_window`, on Redis time, for `n`
/// requests of one caller in arrival order (see `Coalescer`): the first `k` that fit are
/// admitted, the rest refused (refusals consume nothing).
/// KEYS[1] hash {w, c, p}; ARGV: limit, window_ms, n. Returns {k, curr, prev, elapsed_ms}.
static SLIDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local idx = math.floor(now / window)
local h = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w = tonumber(h[1]) or idx
local c = tonumber(h[2]) or 0
local p = tonumber(h[3]) or 0
if w ~= idx then
  if w == idx - 1 then p = c else p = 0 end
  c = 0
end
local elapsed = now - idx * window
local weighted = math.floor(p * 1000 * (window - elapsed) / window)
local k = 0
while k < n and weighted + (c + 1) * 1000 <= limit * 1000 do
  c = c + 1
  k = k + 1
end
if k > 0 or w ~= idx then
  redis.call('HSET', KEYS[1], 'w', idx, 'c', c, 'p', p)
  redis.call('PEXPIRE', KEYS[1], window * 2)
end
return {k, c, p, elapsed}
"#,
    )
});

/// GCRA, same steps as `algo::gcra`, for `n` requests of one caller in arrival order.
/// KEYS[1] = TAT (ms); ARGV: interval_ms, tolerance_ms, n. Returns {k, tat_after, now}.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local k = 0
while k < n and tat + interval - tolerance <= now do
  tat = tat + interval
  k = k + 1
end
if k > 0 then
  redis.call('SET', KEYS[1], tat, 'PX', tat - now + 1)
end
return {k, tat, now}
"#,
    )
});

/// `n` exact decisions for one caller in one atomic script run, in arrival order.
pub async fn exact(
    store: &Store,
    key: &str,
    algo: algo::Algo,
    n: usize,
) -> Result<Vec<Decision>, StoreError> {
    let n64 = n as u64;
    match algo {
        algo::Algo::SlidingWindow { limit, window_ms } => {
            let (k, curr, prev, elapsed): (u64, u64, u64, u64) = store
                .call_for_request("ratelimit", |mut c| async move {
                    SLIDING
                        .key(key)
                        .arg(limit)
                        .arg(window_ms)
                        .arg(n64)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            let elapsed = elapsed.min(window_ms - 1);
            Ok((0..n64)
                .map(|i| {
                    let allowed = i < k;
                    let w = Window {
                        index: 0,
                        // The counter as this request left it.
                        curr: if allowed { curr - (k - 1 - i) } else { curr },
                        prev,
                    };
                    algo::describe_window(&w, elapsed, limit, window_ms, allowed)
                })
                .collect())
        }
        algo::Algo::Gcra {
            limit,
            window_ms,
            burst,
        } => {
            let interval = (window_ms / limit.max(1)).max(1);
            let tolerance = interval * burst.max(1);
            let (k, tat, now): (u64, u64, u64) = store
                .call_for_request("ratelimit", |mut c| async move {
                    GCRA.key(key)
                        .arg(interval)
                        .arg(tolerance)
                        .arg(n64)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok((0..n64)
                .map(|i| {
                    if i < k {
                        let tat = tat - (k - 1 - i) * interval;
                        Decision {
                            allowed: true,
                            remaining: (now + tolerance).saturating_sub(tat) / interval,
                            reset_ms: tat.saturating_sub(now),
                            retry_after_ms: 0,
                        }
                    } else {
                        Decision {
                            allowed: false,
                            remaining: 0,
                            reset_ms: tat.saturating_sub(now),
                            retry_after_ms: (tat + interval)
                                .saturating_sub(tolerance)
                                .saturating_sub(now)
                                .max(1),
                        }
                    }
                })
                .collect())
        }
    }
}

type Reply = oneshot::Sender<Result<Decision, StoreError>>;

/// Requests for one caller waiting for the call in flight to end.
struct Slot {
    algo: algo::Algo,
    /// The caller's Redis key, made once by the request that opened the slot.
    key: Arc<str>,
    waiting: Vec<Reply>,
}

/// Exact mode without one round trip per request: while a caller's script call is in flight,
/// that caller's next requests queue; when it returns, ONE call decides all of them (atomically,
/// in arrival order, never past the limit). An idle caller's request goes out at once, so
/// nothing waits for a batch to fill. Keys are never mixed in one call (Redis Cluster slots).
///
/// Slots are keyed by the caller's counter hash (the same 64-bit, per-process-seeded hash that
/// keys the local and batched counters), so a request that joins a queue never formats its
/// Redis key; only the request that opens a slot does.
#[derive(Default)]
pub struct Coalescer {
    slots: Mutex<HashMap<u64, Slot, foldhash::fast::RandomState>>,
}

/// The request whose call is in flight; when it ends (or is dropped: the client left), whoever
/// queued behind it is decided by a task.
struct Lead<'a> {
    coalescer: &'a Arc<Coalescer>,
    store: &'a Arc<Store>,
    hash: u64,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.coalescer.hand_over(self.store, self.hash);
    }
}

impl Coalescer {
    /// One decision for the caller whose counter hash is `hash` and Redis key `key()`.
    pub async fn decide(
        self: &Arc<Self>,
        store: &Arc<Store>,
        hash: u64,
        key: impl FnOnce() -> String,
        algo: algo::Algo,
        max_batch: usize,
    ) -> Result<Decision, StoreError> {
        let one = |v: Vec<Decision>| v.into_iter().next().ok_or(StoreError::Failed);
        if max_batch <= 1 {
            return exact(store, &key(), algo, 1).await.and_then(one);
        }
        enum Role {
            Lead(Arc<str>),
            Queued(oneshot::Receiver<Result<Decision, StoreError>>),
            Alone(String),
        }
        let role = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get_mut(&hash) {
                None => {
                    let key: Arc<str> = Arc::from(key());
                    slots.insert(
                        hash,
                        Slot {
                            algo,
                            key: key.clone(),
                            waiting: Vec::new(),
                        },
                    );
                    Role::Lead(key)
                }
                Some(slot) if slot.algo == algo && slot.waiting.len() < max_batch => {
                    let (tx, rx) = oneshot::channel();
                    slot.waiting.push(tx);
                    Role::Queued(rx)
                }
                // A full queue, or a limit changed by a reload: a call of its own.
                Some(_) => Role::Alone(key()),
            }
        };
        match role {
            Role::Alone(key) => exact(store, &key, algo, 1).await.and_then(one),
            // Never longer than one Redis timeout, however long the queue ahead (pingora's
            // coarse timer: registered only if the answer is not there at the first poll).
            Role::Queued(rx) => {
                match pingora_timeout::fast_timeout::fast_timeout(store.spec.timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(StoreError::Failed),
                    Err(_) => Err(StoreError::Timeout),
                }
            }
            Role::Lead(key) => {
                let _lead = Lead {
                    coalescer: self,
                    store,
                    hash,
                };
                exact(store, &key, algo, 1).await.and_then(one)
            }
        }
    }

    /// Take what queued for `hash`; free the slot if nothing did.
    fn take(&self, hash: u64) -> Option<(algo::Algo, Arc<str>, Vec<Reply>)> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get_mut(&hash) {
            Some(slot) if !slot.waiting.is_empty() => Some((
                slot.algo,
                slot.key.clone(),
                std::mem::take(&mut slot.waiting),
            )),
            _ => {
                slots.remove(&hash);
                None
            }
        }
    }

    fn hand_over(self: &Arc<Self>, store: &Arc<Store>, hash: u64) {
        let Some(mut batch) = self.take(hash) else {
            return;
        };
        let (me, store) = (self.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                let (algo, key, replies) = batch;
                match exact(&store, &key, algo, replies.len()).await {
                    Ok(decisions) => {
                        for (tx, d) in replies.into_iter().zip(decisions) {
                            let _ = tx.send(Ok(d));
                        }
                    }
                    Err(e) => {
                        for tx in replies {
                            let _ = tx.send(Err(e));
                        }
                    }
                }
                match me.take(hash) {
                    Some(next) => batch = next,
                    None => return,
                }
            }
        });
    }

    /// Callers with a call in flight (for tests and status).
    pub fn busy(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One caller's counters in batched mode: the node's view (last global counts plus what this
/// node admitted since), and what it still has to report.
struct Entry {
    base: String,
    window_ms: u64,
    view: Window,
    /// Admitted here in `view.index`, not yet reported.
    unsynced: u64,
    /// Admitted here in earlier windows, not yet reported: (window index, count).
    pending: Vec<(u64, u64)>,
}

/// One entry's report in a sync round.
#[derive(Clone)]
struct SyncItem {
    hash: u64,
    base: String,
    idx: u64,
    n: u64,
    pending: Vec<(u64, u64)>,
    window_ms: u64,
}

/// Batched mode: decisions are local (no Redis round trip); a background task reports deltas
/// and reads back the global counts every `sync_interval`.
#[derive(Default)]
pub struct Batched {
    entries: Mutex<HashMap<u64, Entry>>,
}

impl Batched {
    pub fn decide(
        &self,
        hash: u64,
        base: impl FnOnce() -> String,
        limit: u64,
        window_ms: u64,
        now_ms: u64,
    ) -> Decision {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(hash).or_insert_with(|| Entry {
            base: base(),
            window_ms,
            view: Window {
                index: now_ms / window_ms,
                curr: 0,
                prev: 0,
            },
            unsynced: 0,
            pending: Vec::new(),
        });
        if e.window_ms != window_ms {
            e.window_ms = window_ms;
            e.view = Window::default();
            e.unsynced = 0;
        }
        let idx = now_ms / window_ms;
        if idx != e.view.index && e.unsynced > 0 {
            e.pending.push((e.view.index, e.unsynced));
            e.unsynced = 0;
        }
        let d = algo::sliding_window(&mut e.view, now_ms, limit, window_ms);
        if d.allowed {
            e.unsynced += 1;
        }
        d
    }

    /// Report every delta and refresh the views. Entries idle for two windows are dropped.
    pub async fn sync(&self, store: &Store, now_ms: u64) -> Result<(), StoreError> {
        // Take the deltas out under the lock; talk to Redis without it.
        let work: Vec<SyncItem> = {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, e| {
                now_ms / e.window_ms <= e.view.index + 1 || e.unsynced > 0 || !e.pending.is_empty()
            });
            map.iter_mut()
                .map(|(h, e)| {
                    let n = std::mem::take(&mut e.unsynced);
                    let pending = std::mem::take(&mut e.pending);
                    SyncItem {
                        hash: *h,
                        base: e.base.clone(),
                        idx: e.view.index,
                        n,
                        pending,
                        window_ms: e.window_ms,
                    }
                })
                .collect()
        };
        for chunk in work.chunks(256) {
            let chunk_owned: Vec<_> = chunk.to_vec();
            let result = store
                .call("ratelimit_sync", |mut c| {
                    let chunk = chunk_owned.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        for it in &chunk {
                            let ttl = (it.window_ms * 2) as i64;
                            for (old_idx, old_n) in &it.pending {
                                pipe.incr(format!("{}:{old_idx}", it.base), *old_n).ignore();
                                pipe.pexpire(format!("{}:{old_idx}", it.base), ttl).ignore();
                            }
                            pipe.incr(format!("{}:{}", it.base, it.idx), it.n);
                            pipe.pexpire(format!("{}:{}", it.base, it.idx), ttl)
                                .ignore();
                            pipe.get(format!("{}:{}", it.base, it.idx.saturating_sub(1)));
                        }
                        pipe.query_async::<Vec<(u64, Option<u64>)>>(&mut c).await
                    }
                })
                .await;
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(totals) => {
                    for (it, (curr, prev)) in chunk.iter().zip(totals) {
                        if let Some(e) = map.get_mut(&it.hash) {
                            if e.view.index == it.idx {
                                e.view.curr = curr + e.unsynced;
                                e.view.prev = prev.unwrap_or(0);
                            }
                        }
                    }
                }
                Err(err) => {
                    // Put the deltas back so they are reported once Redis answers again.
                    for it in chunk {
                        if let Some(e) = map.get_mut(&it.hash) {
                            e.pending.extend(it.pending.iter().copied());
                            if e.view.index == it.idx {
                                e.unsynced += it.n;
                            } else if it.n > 0 {
                                e.pending.push((it.idx, it.n));
                            }
                        }
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}

/// How many gateway nodes share the limits (announced in Redis; at least 1).
pub struct Nodes {
    pub id: String,
    pub live: AtomicUsize,
}

impl Nodes {
    pub fn new(assume: usize) -> Self {
        Self {
            id: format!(
                "{}-{}",
                std::process::id(),
                hex::encode(rand::random::<[u8; 4]>())
            ),
            live: AtomicUsize::new(assume.max(1)),
        }
    }

    pub fn count(&self) -> usize {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Announce this node and count the live ones (seen in the last 3 heartbeats).
    pub async fn heartbeat(&self, store: &Store, every: Duration) -> Result<(), StoreError> {
        let key = format!("{}:nodes", crate::store::PREFIX);
        let id = self.id.clone();
        let stale_ms = (every.as_millis() as i64) * 3;
        let n: usize = store
            .call("heartbeat", |mut c| async move {
                let t: (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
                let now = t.0 * 1000 + t.1 / 1000;
                let mut pipe = redis::pipe();
                pipe.zadd(&key, &id, now).ignore();
                pipe.zrembyscore(&key, "-inf", now - stale_ms).ignore();
                pipe.pexpire(&key, stale_ms * 10).ignore();
                pipe.zcard(&key);
                let (n,): (usize,) = pipe.query_async(&mut c).await?;
                Ok(n)
            })
            .await?;
        self.live.store(n.max(1), Ordering::Relaxed);
        Ok(())
    }
}
