//! Time, in the two kinds Tollgate needs, as distinct types so one is never passed for the other:
//! - the monotonic clock: [`Instant`] (request timings) and [`MonoMs`] (millisecond windows
//!   and deadlines that stay inside this process: breakers, retry budgets). It never jumps.
//!   A request reads it several times (its start, its upstream attempt's start and answer, its
//!   end, the retry budget), so it is quanta's: the CPU's invariant TSC scaled to nanoseconds,
//!   a few instructions a read where `std::time::Instant` makes a `clock_gettime` call. Where
//!   the TSC cannot be trusted (no invariant TSC), quanta uses the OS monotonic clock instead.
//! - the wall clock: [`UnixMs`], milliseconds since the Unix epoch, for times that leave the
//!   process or must agree between gateway nodes (cache entries shared through Redis,
//!   rate-limit windows).
//!
//! The monotonic clock counts from an arbitrary point (boot, on Linux): never subtract a fixed
//! duration from one of its readings (it underflows on a machine booted recently).

use std::ops::Add;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use quanta::Instant;

/// The clock every request-path time comes from (one calibration; quanta's global
/// `Instant::now` would also look up a per-thread mock clock on every read).
static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

/// The origin of [`MonoMs`]: fixed on first use.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Calibrate the clock now, before serving: quanta does it on first use, which would otherwise
/// fall on the first request.
pub fn init() {
    ORIGIN.get_or_init(now);
}

/// The current time on the monotonic clock.
#[inline]
pub fn now() -> Instant {
    CLOCK.get_or_init(quanta::Clock::new).now()
}

/// Time since `earlier` (zero if `earlier` is in the future).
#[inline]
pub fn since(earlier: Instant) -> Duration {
    now().saturating_duration_since(earlier)
}

/// A point on the monotonic clock in whole milliseconds from a fixed origin (this process's
/// first reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MonoMs(pub u64);

impl MonoMs {
    pub fn now() -> Self {
        Self::at(now())
    }

    /// `at` in milliseconds from the origin (0 for an instant before it).
    pub fn at(at: Instant) -> Self {
        Self(ms_after(*ORIGIN.get_or_init(now), at))
    }
}

impl Add<u64> for MonoMs {
    type Output = Self;

    /// `ms` milliseconds later.
    fn add(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

/// Whole milliseconds from `origin` to `at`, 0 when `at` is earlier.
fn ms_after(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch by the wall clock (0 for a clock set before 1970).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixMs(pub u64);

impl UnixMs {
    pub fn now() -> Self {
        Self(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_with_real_time() {
        init();
        let (a, wall) = (now(), std::time::Instant::now());
        let ms_a = MonoMs::at(a).0;
        // Poll (no sleep as synchronisation): until 20 ms of real time have passed.
        while wall.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let (b, real) = (now(), wall.elapsed());
        let measured = b.duration_since(a);
        assert!(since(a) >= measured);
        assert!(measured >= Duration::from_millis(19), "{measured:?}");
        assert!(
            measured <= real + Duration::from_millis(5),
            "{measured:?} > {real:?}"
        );
        let ms_b = MonoMs::at(b).0;
        assert!(ms_b >= ms_a + 19 && ms_b <= ms_a + real.as_millis() as u64 + 5);
        // Earlier than the origin saturates at 0 instead of wrapping. (No `a - 1h`: the
        // clock counts from boot, so that underflows in a machine's first hour.)
        assert_eq!(ms_after(b, a), 0);
        assert!(ms_after(a, b) >= 19);
    }

    #[test]
    fn wall_clock_milliseconds_agree_with_the_system_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let at = UnixMs::now().0 as u128;
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
        assert_eq!(MonoMs(5) + 10, MonoMs(15));
        assert_eq!(MonoMs(u64::MAX) + 1, MonoMs(u64::MAX));
    }
}
