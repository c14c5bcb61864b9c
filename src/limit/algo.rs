//! The limiter maths, pure and clock-injected (times are milliseconds), shared by every mode:
//! the in-process limiter runs it directly, the Redis Lua scripts implement the same steps, and
//! the batched mode feeds it global counts. A rejected request never changes the state.
//!
//! Two algorithms:
//! - **Sliding window counter** (tiers without `burst`): two fixed windows, the previous one
//!   weighted by how much of it still overlaps the sliding window:
//!   `estimate = prev * (W - elapsed) / W + curr`; admit when `estimate + 1 <= limit`.
//!   Error bound: the estimate assumes the previous window's requests were spread evenly. It
//!   never admits more than `limit` within one fixed window, and never more than
//!   `limit + prev * elapsed / W` (< 2 × limit, reached only when the previous window's traffic
//!   all came at its very end) in any sliding window of length W.
//! - **GCRA** (tiers with `burst`): a token bucket of `burst` requests refilled at `limit / W`,
//!   stored as one "theoretical arrival time". Exact: never more than `burst + t × limit / W`
//!   in any interval of length t.

/// A limit as the algorithms see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algo {
    SlidingWindow {
        limit: u64,
        window_ms: u64,
    },
    Gcra {
        limit: u64,
        window_ms: u64,
        burst: u64,
    },
}

/// Result of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still allowed right now (after this one, if admitted).
    pub remaining: u64,
    /// Milliseconds until the quota is fully restored (window end, or bucket full).
    pub reset_ms: u64,
    /// When refused: milliseconds until one request would be admitted.
    pub retry_after_ms: u64,
}

/// Sliding-window state of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub index: u64,
    pub curr: u64,
    pub prev: u64,
}

impl Window {
    /// Move to the window containing `now` (the previous window only carries over when it is
    /// the one just before).
    pub fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let idx = now_ms / window_ms;
        if idx != self.index {
            self.prev = if idx == self.index + 1 { self.curr } else { 0 };
            self.curr = 0;
            self.index = idx;
        }
    }
}

/// The sliding-window estimate, in thousandths of a request (integer maths, as in the Lua).
fn estimate_milli(w: &Window, elapsed: u64, window_ms: u64) -> u64 {
    w.prev * 1000 * (window_ms - elapsed) / window_ms + w.curr * 1000
}

/// Decide one request against a sliding window (state already rolled to `now`), admitting it
/// into `w` when allowed.
pub fn sliding_window(w: &mut Window, now_ms: u64, limit: u64, window_ms: u64) -> Decision {
    w.roll(now_ms, window_ms);
    let elapsed = now_ms - w.index * window_ms;
    let allowed = estimate_milli(w, elapsed, window_ms) + 1000 <= limit * 1000;
    if allowed {
        w.curr += 1;
    }
    describe_window(w, elapsed, limit, window_ms, allowed)
}

/// Remaining, reset and retry-after for a window state (used by every mode).
pub fn describe_window(
    w: &Window,
    elapsed: u64,
    limit: u64,
    window_ms: u64,
    allowed: bool,
) -> Decision {
    let est = estimate_milli(w, elapsed, window_ms);
    let remaining = (limit * 1000).saturating_sub(est) / 1000;
    let reset_ms = window_ms - elapsed;
    let retry_after_ms = if allowed {
        0
    } else {
        retry_after(w, elapsed, limit, window_ms)
    };
    Decision {
        allowed,
        remaining,
        reset_ms,
        retry_after_ms,
    }
}

/// Time until `estimate + 1 <= limit` holds, given no further admissions.
fn retry_after(w: &Window, elapsed: u64, limit: u64, window_ms: u64) -> u64 {
    let budget = limit.saturating_sub(1) * 1000; // estimate (milli) must fall to this
    if w.curr * 1000 <= budget && w.prev > 0 {
        // Within this window, as the previous one's weight decays:
        // prev*(W-e)/W + curr <= L-1  <=>  e >= W - (L-1-curr)*W/prev
        let need = window_ms.saturating_sub((budget - w.curr * 1000) * window_ms / (w.prev * 1000));
        if need > elapsed {
            return need - elapsed;
        }
        return 1;
    }
    // Only the next window helps: there prev' = curr, curr' = 0:
    // curr*(W-e)/W <= L-1  <=>  e >= W*(1 - (L-1)/curr)
    let rest = window_ms - elapsed;
    if w.curr == 0 {
        return rest.max(1);
    }
    let need = window_ms.saturating_sub(budget * window_ms / (w.curr * 1000));
    rest + need
}

/// GCRA: `tat` is the theoretical arrival time (0 = fresh). Admits into `tat` when allowed.
pub fn gcra(tat: &mut u64, now_ms: u64, limit: u64, window_ms: u64, burst: u64) -> Decision {
    let interval = (window_ms / limit.max(1)).max(1);
    let tolerance = interval * burst.max(1);
    let base = (*tat).max(now_ms);
    let new_tat = base + interval;
    let allow_at = new_tat.saturating_sub(tolerance);
    if allow_at > now_ms {
        return Decision {
            allowed: false,
            remaining: 0,
            reset_ms: base - now_ms,
            retry_after_ms: allow_at - now_ms,
        };
    }
    *tat = new_tat;
    Decision {
        allowed: true,
        remaining: (now_ms + tolerance - new_tat) / interval,
        reset_ms: new_tat - now_ms,
        retry_after_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gcra_burst_five_at_one_per_second() {
        let mut tat = 0;
        let t0 = 1_000_000;
        for i in 0..5 {
            let d = gcra(&mut tat, t0, 1, 1000, 5);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let sixth = gcra(&mut tat, t0, 1, 1000, 5);
        assert!(!sixth.allowed);
        assert_eq!(sixth.retry_after_ms, 1000);
        // Three seconds later: three tokens back, one used now, two remain.
        let later = gcra(&mut tat, t0 + 3000, 1, 1000, 5);
        assert!(later.allowed);
        assert_eq!(later.remaining, 2);
    }

    #[test]
    fn sliding_window_exact_count_in_a_fresh_window() {
        let mut w = Window::default();
        let start = 60_000 * 1000; // a window boundary
        let mut admitted = 0;
        let mut last_remaining = u64::MAX;
        for i in 0..150 {
            let d = sliding_window(&mut w, start + i * 10, 100, 60_000);
            if d.allowed {
                admitted += 1;
            } else {
                assert!(d.retry_after_ms > 0);
            }
            assert!(d.remaining <= last_remaining, "remaining went up");
            last_remaining = d.remaining;
        }
        assert_eq!(admitted, 100);
        // Next window: the previous one weighs in, and decays.
        let d = sliding_window(&mut w, start + 60_000, 100, 60_000);
        assert!(!d.allowed, "prev=100 at the very start of the next window");
        let d = sliding_window(&mut w, start + 60_000 + 30_000, 100, 60_000);
        assert!(d.allowed);
        assert_eq!(d.remaining, 49); // 100*0.5 + 1 = 51 used
    }

    #[test]
    fn retry_after_is_when_one_request_fits() {
        let mut w = Window::default();
        let start = 10_000;
        for _ in 0..10 {
            sliding_window(&mut w, start, 10, 10_000);
        }
        let d = sliding_window(&mut w, start + 2_000, 10, 10_000);
        assert!(!d.allowed);
        // Next window starts in 8 s; there prev=10 must decay to 9: 1 s more.
        assert_eq!(d.retry_after_ms, 8_000 + 1_000);
        let mut probe = w;
        assert!(
            !sliding_window(&mut probe, start + 2_000 + d.retry_after_ms - 1, 10, 10_000).allowed
        );
        let mut probe = w;
        assert!(sliding_window(&mut probe, start + 2_000 + d.retry_after_ms, 10, 10_000).allowed);
    }

    proptest! {
        /// Never more than `limit` admissions within one fixed window, whatever the arrivals;
        /// and a refused request's retry-after is honest: waiting it out admits one request.
        #[test]
        fn sliding_window_bounds(limit in 1u64..50, window_ms in 100u64..5000, gaps in proptest::collection::vec(0u64..400, 1..300)) {
            let mut w = Window::default();
            let mut now = 1_000_000u64;
            let mut per_window = std::collections::HashMap::new();
            for g in gaps {
                now += g;
                let before = w;
                let d = sliding_window(&mut w, now, limit, window_ms);
                if d.allowed {
                    *per_window.entry(now / window_ms).or_insert(0u64) += 1;
                } else {
                    let mut unchanged = before;
                    unchanged.roll(now, window_ms);
                    prop_assert_eq!(w, unchanged, "a refusal changed the state");
                    let mut probe = w;
                    prop_assert!(sliding_window(&mut probe, now + d.retry_after_ms, limit, window_ms).allowed);
                }
                prop_assert!(d.remaining <= limit);
            }
            for (_, n) in per_window {
                prop_assert!(n <= limit);
            }
        }

        /// GCRA never admits more than burst + t * rate in any prefix, and refusals are free.
        #[test]
        fn gcra_bounds(limit in 1u64..50, window_ms in 100u64..5000, burst in 1u64..20, gaps in proptest::collection::vec(0u64..200, 1..300)) {
            let mut tat = 0u64;
            let start = 1_000_000u64;
            let mut now = start;
            let mut admitted = 0u64;
            let interval = (window_ms / limit).max(1);
            for g in gaps {
                now += g;
                let before = tat;
                let d = gcra(&mut tat, now, limit, window_ms, burst);
                if d.allowed {
                    admitted += 1;
                } else {
                    prop_assert_eq!(tat, before);
                    let mut probe = tat;
                    prop_assert!(gcra(&mut probe, now + d.retry_after_ms, limit, window_ms, burst).allowed);
                }
                prop_assert!(admitted <= burst + (now - start) / interval + 1);
            }
        }
    }
}
