//! The in-process limiter: the `algo` maths over a sharded map keyed by a 64-bit hash of
//! (policy, key). Used in local mode, as the fallback when Redis is unreachable (with each limit
//! divided by the number of live nodes), and as the batched mode's local counter. Not
//! pingora-limits' `Rate`: that estimator counts every observation, refused ones included, and
//! over-counts on sketch collisions; the limiter must not charge refusals and must match the
//! Redis scripts exactly. Stale entries are swept lazily when a shard grows.

use std::collections::HashMap;
use std::sync::Mutex;

use super::algo::{self, Algo, Decision, Window};

const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy)]
enum State {
    Window { w: Window, window_ms: u64 },
    Tat(u64),
}

impl State {
    /// Holds nothing that still counts at `now_ms`.
    fn stale(&self, now_ms: u64) -> bool {
        match self {
            Self::Window { w, window_ms } => now_ms / window_ms > w.index + 1,
            Self::Tat(t) => *t <= now_ms,
        }
    }
}

struct Shard {
    /// Keys are already seeded hashes: foldhash mixes them cheaply, where SipHash would hash
    /// them again (`limit/local_decide` criterion bench).
    map: HashMap<u64, State, foldhash::fast::RandomState>,
    /// Sweep stale entries when the map grows past this.
    sweep_at: usize,
}

pub struct LocalLimiter {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::default(),
                        sweep_at: 1024,
                    })
                })
                .collect(),
        }
    }
}

impl LocalLimiter {
    /// Decide one request for `key` (a hash of policy and caller) under `algo` at `now_ms`.
    pub fn decide(&self, key: u64, algo: Algo, now_ms: u64) -> Decision {
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
        if s.map.len() >= s.sweep_at {
            s.map.retain(|_, st| !st.stale(now_ms));
            s.sweep_at = (s.map.len() * 2).max(1024);
        }
        // One lookup, the state updated in place (the algorithms never charge a refusal).
        let state = s.map.entry(key).or_insert(State::Tat(0));
        match algo {
            Algo::SlidingWindow { limit, window_ms } => {
                let mut w = match *state {
                    State::Window { w, .. } => w,
                    State::Tat(_) => Window::default(),
                };
                let d = algo::sliding_window(&mut w, now_ms, limit, window_ms);
                *state = State::Window { w, window_ms };
                d
            }
            Algo::Gcra {
                limit,
                window_ms,
                burst,
            } => {
                let mut tat = match *state {
                    State::Tat(t) => t,
                    State::Window { .. } => 0,
                };
                let d = algo::gcra(&mut tat, now_ms, limit, window_ms, burst);
                *state = State::Tat(tat);
                d
            }
        }
    }

    /// Number of tracked keys (for tests and the admin API).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_independent_and_refusals_free() {
        let l = LocalLimiter::default();
        let algo = Algo::SlidingWindow {
            limit: 3,
            window_ms: 1000,
        };
        let now = 5_000_000;
        for _ in 0..3 {
            assert!(l.decide(1, algo, now).allowed);
        }
        assert!(!l.decide(1, algo, now).allowed);
        assert!(l.decide(2, algo, now).allowed);
        for _ in 0..100 {
            assert!(!l.decide(1, algo, now + 10).allowed);
        }
        // Two windows later the key has fully recovered.
        assert!(l.decide(1, algo, now + 2000).allowed);
    }

    #[test]
    fn gcra_through_the_map() {
        let l = LocalLimiter::default();
        let algo = Algo::Gcra {
            limit: 1,
            window_ms: 1000,
            burst: 2,
        };
        assert!(l.decide(9, algo, 10_000).allowed);
        assert!(l.decide(9, algo, 10_000).allowed);
        let d = l.decide(9, algo, 10_000);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1000);
    }
}
