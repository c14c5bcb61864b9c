//! One backend's live state: its health (set by the probes in `health`), its circuit breaker
//! (fed by real traffic) and the attempts it is serving. Lock-free to read on the request path;
//! kept by `state::Registry` under a stable id so it survives reloads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use super::breaker::Breaker;
use super::spec::HealthSpec;

/// Health of one backend, and the attempts it is serving now. Lock-free to read.
#[derive(Debug)]
pub struct BackendState {
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Attempts on this backend that have not ended (see [`InFlight`]).
    in_flight: AtomicUsize,
    /// The passive side: the circuit breaker fed by real traffic.
    pub breaker: Breaker,
}

impl BackendState {
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            breaker: Breaker::default(),
        }
    }

    /// Attempts on this backend in progress now: picked and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Record one probe result; flips after `healthy_after` successes or `unhealthy_after`
    /// failures in a row. Returns `Some(new)` when the state flipped.
    pub fn observe(&self, ok: bool, spec: &HealthSpec) -> Option<bool> {
        let healthy = self.is_healthy();
        if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let streak = self.ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if !healthy && streak >= spec.healthy_after {
                self.set_healthy(true);
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let streak = self.fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && streak >= spec.unhealthy_after {
                self.set_healthy(false);
                return Some(false);
            }
        }
        None
    }
}

/// One attempt on a backend: counted in its `in_flight` from `enter` until dropped, so the
/// count cannot leak whichever way the attempt ends (another attempt, a response, an error, a
/// client that left, a panic). Holds the state itself, which outlives a reload that removes the
/// backend: the decrement always lands on the counter that was incremented.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn enter(state: &Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_guards_count_until_dropped() {
        let (a, b) = (
            Arc::new(BackendState::new(true)),
            Arc::new(BackendState::new(true)),
        );
        let other_request = InFlight::enter(&a);
        let mut attempt = Some(InFlight::enter(&a));
        assert_eq!(a.in_flight(), 2);
        // A retry replaces the attempt: the count moves from a to b.
        attempt.replace(InFlight::enter(&b));
        assert_eq!((a.in_flight(), b.in_flight()), (1, 1));
        attempt.take();
        assert_eq!((a.in_flight(), b.in_flight()), (1, 0));
        drop(other_request);
        assert_eq!(a.in_flight(), 0);
    }
}
