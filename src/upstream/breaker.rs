//! Circuit breakers, one per backend, and the retry budget, one per upstream. Both are read on
//! the request path through atomics only (no lock); a breaker's transitions use compare-and-swap
//! so exactly one request performs each, logs it and counts it. Their state lives in the health
//! registry (`state`: keyed by upstream and address, and by upstream), so it survives reloads.
//! Their times are monotonic milliseconds ([`MonoMs`]): a wall-clock step never opens or closes
//! a breaker. Neither ever blocks or answers a client.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::clock::MonoMs;

/// What went wrong with one attempt (or `Success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Connect,
    Timeout,
    /// Reset, broken pipe, malformed response.
    Error,
    Status(u16),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSpec {
    /// Trip when failures / requests in the window reach this (0..=1).
    pub failure_rate: f64,
    pub min_requests: u32,
    /// Trip after this many failures in a row (0 = off).
    pub consecutive_failures: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub half_open_probes: u32,
    pub on_connect: bool,
    pub on_timeout: bool,
    pub on_error: bool,
    pub on_status: Vec<u16>,
    /// At most this share of an upstream's backends may be open at once (0..=1).
    pub max_open_share: f64,
}

impl BreakerSpec {
    pub fn is_failure(&self, o: Outcome) -> bool {
        match o {
            Outcome::Success => false,
            Outcome::Connect => self.on_connect,
            Outcome::Timeout => self.on_timeout,
            Outcome::Error => self.on_error,
            Outcome::Status(s) => self.on_status.contains(&s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Open,
            2 => Self::HalfOpen,
            _ => Self::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

const BUCKETS: usize = 10;

/// A rolling count of requests and failures in `BUCKETS` time slices.
#[derive(Debug, Default)]
struct Rolling {
    epochs: [AtomicU64; BUCKETS],
    total: [AtomicU32; BUCKETS],
    failed: [AtomicU32; BUCKETS],
}

impl Rolling {
    fn add(&self, now: u64, slice_ms: u64, failed: bool) {
        let epoch = now / slice_ms;
        let i = (epoch as usize) % BUCKETS;
        let seen = self.epochs[i].load(Ordering::Relaxed);
        if seen != epoch
            && self.epochs[i]
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.total[i].store(0, Ordering::Relaxed);
            self.failed[i].store(0, Ordering::Relaxed);
        }
        self.total[i].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sums(&self, now: u64, slice_ms: u64) -> (u32, u32) {
        let epoch = now / slice_ms;
        let mut total = 0;
        let mut failed = 0;
        for i in 0..BUCKETS {
            let e = self.epochs[i].load(Ordering::Relaxed);
            if e + (BUCKETS as u64) > epoch && e <= epoch {
                total += self.total[i].load(Ordering::Relaxed);
                failed += self.failed[i].load(Ordering::Relaxed);
            }
        }
        (total, failed)
    }

    fn clear(&self) {
        for i in 0..BUCKETS {
            self.epochs[i].store(0, Ordering::Relaxed);
            self.total[i].store(0, Ordering::Relaxed);
            self.failed[i].store(0, Ordering::Relaxed);
        }
    }
}

/// One backend's breaker.
#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    /// When open: the time (ms) it may go half-open.
    open_until: AtomicU64,
    consecutive: AtomicU32,
    /// Half-open: probes handed out / probes that succeeded.
    probes: AtomicU32,
    probe_ok: AtomicU32,
    rolling: Rolling,
    pub transitions: AtomicU64,
    /// Set by the request that moved Open -> HalfOpen, taken by whoever reports it.
    half_opened: std::sync::atomic::AtomicBool,
}

/// What `admit` decided for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// A half-open probe slot was taken: report its outcome.
    Probe,
    No,
}

impl Breaker {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Lock-free: may this backend take a request now?
    pub fn admit(&self, spec: &BreakerSpec, now: MonoMs) -> Admit {
        let now = now.0;
        match self.state() {
            State::Closed => Admit::Yes,
            State::Open => {
                if now < self.open_until.load(Ordering::Relaxed) {
                    return Admit::No;
                }
                if self
                    .state
                    .compare_exchange(
                        State::Open as u8,
                        State::HalfOpen as u8,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    self.probes.store(0, Ordering::Relaxed);
                    self.probe_ok.store(0, Ordering::Relaxed);
                    self.transitions.fetch_add(1, Ordering::Relaxed);
                    self.half_opened.store(true, Ordering::Release);
                }
                self.take_probe(spec)
            }
            State::HalfOpen => self.take_probe(spec),
        }
    }

    fn take_probe(&self, spec: &BreakerSpec) -> Admit {
        let taken = self.probes.fetch_add(1, Ordering::AcqRel);
        if taken < spec.half_open_probes {
            Admit::Probe
        } else {
            self.probes.fetch_sub(1, Ordering::AcqRel);
            Admit::No
        }
    }

    /// True once after this breaker went half-open (so the transition is logged and counted
    /// exactly once, outside the lock-free admit path's caller).
    pub fn take_half_opened(&self) -> bool {
        self.half_opened.swap(false, Ordering::AcqRel)
    }

    /// Give back a probe slot whose outcome will never be known (the client went away).
    pub fn release_probe(&self) {
        let _ = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |p| p.checked_sub(1));
    }

    /// Would `admit` refuse right now (without taking a probe slot)?
    pub fn blocks(&self, spec: &BreakerSpec, now: MonoMs) -> bool {
        let now = now.0;
        match self.state() {
            State::Closed => false,
            State::Open => now < self.open_until.load(Ordering::Relaxed),
            State::HalfOpen => self.probes.load(Ordering::Relaxed) >= spec.half_open_probes,
        }
    }

    /// Milliseconds until an open breaker lets a probe through.
    pub fn opens_in(&self, now: MonoMs) -> u64 {
        let now = now.0;
        match self.state() {
            State::Open => self.open_until.load(Ordering::Relaxed).saturating_sub(now),
            _ => 0,
        }
    }

    /// Record one attempt's outcome. `may_open` says whether the open-share cap allows this
    /// breaker to open now. Returns the new state when this call changed it.
    pub fn record(
        &self,
        spec: &BreakerSpec,
        outcome: Outcome,
        probe: bool,
        now: MonoMs,
        may_open: impl Fn() -> bool,
    ) -> Option<State> {
        let now = now.0;
        let failed = spec.is_failure(outcome);
        let slice = (spec.window.as_millis() as u64 / BUCKETS as u64).max(1);
        match self.state() {
            State::HalfOpen if probe => {
                if failed {
                    return self.trip(State::HalfOpen, spec, now);
                }
                let ok = self.probe_ok.fetch_add(1, Ordering::AcqRel) + 1;
                if ok >= spec.half_open_probes
                    && self
                        .state
                        .compare_exchange(
                            State::HalfOpen as u8,
                            State::Closed as u8,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    self.rolling.clear();
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.transitions.fetch_add(1, Ordering::Relaxed);
                    return Some(State::Closed);
                }
                None
            }
            State::Closed => {
                self.rolling.add(now, slice, failed);
                let streak = if failed {
                    self.consecutive.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    self.consecutive.store(0, Ordering::Relaxed);
                    0
                };
                if !failed {
                    return None;
                }
                let by_streak =
                    spec.consecutive_failures > 0 && streak >= spec.consecutive_failures;
                let (total, bad) = self.rolling.sums(now, slice);
                let by_rate = total >= spec.min_requests.max(1)
                    && f64::from(bad) >= spec.failure_rate * f64::from(total);
                if (by_streak || by_rate) && may_open() {
                    return self.trip(State::Closed, spec, now);
                }
                None
            }
            _ => None,
        }
    }

    fn trip(&self, from: State, spec: &BreakerSpec, now: u64) -> Option<State> {
        self.open_until
            .store(now + spec.open_for.as_millis() as u64, Ordering::Relaxed);
        if self
            .state
            .compare_exchange(
                from as u8,
                State::Open as u8,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.transitions.fetch_add(1, Ordering::Relaxed);
            Some(State::Open)
        } else {
            None
        }
    }
}

/// Retry budget of one upstream: retries may be at most `ratio` of the requests seen over the
/// window, plus `min_per_sec` retries per second whatever the traffic.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: Rolling,
    retries: Rolling,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSpec {
    pub ratio: f64,
    pub min_per_sec: u32,
    pub window: Duration,
}

impl RetryBudget {
    fn slice(spec: &BudgetSpec) -> u64 {
        (spec.window.as_millis() as u64 / BUCKETS as u64).max(1)
    }

    pub fn record_request(&self, spec: &BudgetSpec, now: MonoMs) {
        let now = now.0;
        self.requests.add(now, Self::slice(spec), false);
    }

    /// Take one retry from the budget, if it allows.
    pub fn try_retry(&self, spec: &BudgetSpec, now: MonoMs) -> bool {
        let now = now.0;
        let slice = Self::slice(spec);
        let (requests, _) = self.requests.sums(now, slice);
        let (retries, _) = self.retries.sums(now, slice);
        let floor = f64::from(spec.min_per_sec) * spec.window.as_secs_f64();
        let allowed = (spec.ratio * f64::from(requests)).max(floor);
        if f64::from(retries) + 1.0 <= allowed {
            self.retries.add(now, slice, false);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            failure_rate: 0.5,
            min_requests: 10,
            consecutive_failures: 0,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            half_open_probes: 2,
            on_connect: true,
            on_timeout: true,
            on_error: true,
            on_status: vec![500, 502, 503, 504],
            max_open_share: 1.0,
        }
    }

    #[test]
    fn opens_on_rate_then_half_opens_and_closes() {
        let b = Breaker::default();
        let s = spec();
        let t = MonoMs(1_000_000);
        for _ in 0..5 {
            assert_eq!(b.record(&s, Outcome::Success, false, t, || true), None);
        }
        for i in 0..4 {
            assert_eq!(
                b.record(&s, Outcome::Status(500), false, t, || true),
                None,
                "{i}"
            );
        }
        // 10th request, 5 failures: 50% -> open.
        assert_eq!(
            b.record(&s, Outcome::Status(503), false, t, || true),
            Some(State::Open)
        );
        assert_eq!(b.admit(&s, t + 1), Admit::No);
        assert!(b.blocks(&s, t + 1));
        assert_eq!(b.opens_in(t + 1000), 4000);
        // After open_for: two probes, the third is refused.
        assert_eq!(b.admit(&s, t + 5000), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(&s, t + 5000), Admit::Probe);
        assert_eq!(b.admit(&s, t + 5000), Admit::No);
        assert_eq!(
            b.record(&s, Outcome::Success, true, t + 5001, || true),
            None
        );
        assert_eq!(
            b.record(&s, Outcome::Success, true, t + 5002, || true),
            Some(State::Closed)
        );
        assert_eq!(b.admit(&s, t + 5003), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::default();
        let mut s = spec();
        s.consecutive_failures = 3;
        let t = MonoMs(2_000_000);
        for _ in 0..2 {
            assert_eq!(b.record(&s, Outcome::Connect, false, t, || true), None);
        }
        assert_eq!(
            b.record(&s, Outcome::Connect, false, t, || true),
            Some(State::Open)
        );
        assert_eq!(b.admit(&s, t + 5000), Admit::Probe);
        assert_eq!(
            b.record(&s, Outcome::Timeout, true, t + 5000, || true),
            Some(State::Open)
        );
        assert_eq!(b.admit(&s, t + 5001), Admit::No);
    }

    #[test]
    fn the_cap_can_keep_it_closed_and_non_failures_do_not_count() {
        let b = Breaker::default();
        let mut s = spec();
        s.consecutive_failures = 1;
        assert_eq!(
            b.record(&s, Outcome::Status(404), false, MonoMs(10), || true),
            None
        );
        assert_eq!(
            b.record(&s, Outcome::Status(500), false, MonoMs(10), || false),
            None
        );
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            b.record(&s, Outcome::Status(500), false, MonoMs(10), || true),
            Some(State::Open)
        );
    }

    #[test]
    fn budget_has_a_ratio_and_a_floor() {
        let budget = RetryBudget::default();
        let spec = BudgetSpec {
            ratio: 0.2,
            min_per_sec: 1,
            window: Duration::from_secs(10),
        };
        let t = MonoMs(5_000_000);
        // Floor: 10 retries in a 10 s window with no traffic.
        let floor = (0..50).filter(|_| budget.try_retry(&spec, t)).count();
        assert_eq!(floor, 10);
        for _ in 0..100 {
            budget.record_request(&spec, t);
        }
        // 20% of 100 = 20 in all; 10 already used.
        let more = (0..50).filter(|_| budget.try_retry(&spec, t)).count();
        assert_eq!(more, 10);
        // The window slides: 11 s later everything has expired.
        assert_eq!(
            (0..50)
                .filter(|_| budget.try_retry(&spec, t + 11_000))
                .count(),
            10
        );
    }
}
