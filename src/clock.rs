//! The request path's clock. A request reads it five times (its start, its upstream attempt's
//! start and answer, its end, the retry budget), so it is quanta's: the CPU's invariant TSC
//! scaled to nanoseconds, a few instructions a read where `std::time::Instant` makes a
//! `clock_gettime` call. Where the TSC cannot be trusted (no invariant TSC), quanta uses the
//! OS monotonic clock instead. Wall-clock times (cache entries shared through Redis, logs) do
//! not come from here.

use std::sync::OnceLock;

pub use quanta::Instant;

/// The clock every request-path time comes from (one calibration; quanta's global
/// `Instant::now` would also look up a per-thread mock clock on every read).
static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

/// The origin of [`ms`]: fixed on first use.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Calibrate the clock now, before serving: quanta does it on first use, which would otherwise
/// fall on the first request.
pub fn init() {
    ORIGIN.get_or_init(now);
}

/// The current time.
#[inline]
pub fn now() -> Instant {
    CLOCK.get_or_init(quanta::Clock::new).now()
}

/// Time since `earlier` (zero if `earlier` is in the future).
#[inline]
pub fn since(earlier: Instant) -> std::time::Duration {
    now().saturating_duration_since(earlier)
}

/// `at` in milliseconds from a fixed origin (the first use in this process): a monotonic
/// millisecond count for the retry budget's windows.
pub fn ms(at: Instant) -> u64 {
    ms_after(*ORIGIN.get_or_init(now), at)
}

/// Whole milliseconds from `origin` to `at`, 0 when `at` is earlier.
fn ms_after(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_clock_moves_forward_with_real_time() {
        init();
        let (a, wall) = (now(), std::time::Instant::now());
        let ms_a = ms(a);
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
        let ms_b = ms(b);
        assert!(ms_b >= ms_a + 19 && ms_b <= ms_a + real.as_millis() as u64 + 5);
        // Earlier than the origin saturates at 0 instead of wrapping. (No `a - 1h`: the
        // clock counts from boot, so that underflows in a machine's first hour.)
        assert_eq!(ms_after(b, a), 0);
        assert!(ms_after(a, b) >= 19);
    }
}
