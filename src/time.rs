//! Time helpers shared by the headers, the usage service and the layer (a
//! leaf: it imports nothing of the crate). Seconds shown to clients are
//! always rounded up, never down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch, by the system clock.
pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// How often [`unix_now_fast`] reads the system clock again.
const ANCHOR_EVERY: Duration = Duration::from_millis(250);

/// Unix time by the monotonic TSC clock (`quanta`, a few nanoseconds),
/// anchored to the system clock every 250 ms: the request path reads no
/// system clock per request, and follows a change of the system clock
/// within 250 ms. Between anchors it drifts from the system clock only by
/// the two clocks' rate difference (parts per million).
pub(crate) fn unix_now_fast() -> Duration {
    static BASE: OnceLock<quanta::Instant> = OnceLock::new();
    /// Unix nanoseconds minus monotonic nanoseconds since `BASE`.
    static OFFSET: AtomicU64 = AtomicU64::new(0);
    /// Monotonic nanoseconds since `BASE` at which to anchor again.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(quanta::Instant::now);
    let mono = |now: quanta::Instant| now.duration_since(base).as_nanos() as u64;
    let mut now = mono(quanta::Instant::now());
    if now >= NEXT.load(Ordering::Relaxed) {
        // Concurrent anchors store nearly the same offset: no harm.
        let unix = unix_now().as_nanos() as u64;
        now = mono(quanta::Instant::now());
        OFFSET.store(unix.wrapping_sub(now), Ordering::Relaxed);
        NEXT.store(now + ANCHOR_EVERY.as_nanos() as u64, Ordering::Relaxed);
    }
    Duration::from_nanos(now.wrapping_add(OFFSET.load(Ordering::Relaxed)))
}

/// A source of Unix time in seconds (for boosts; tests inject one).
pub type UnixClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Unix time now, by the injected clock if there is one, else by
/// [`unix_now_fast`].
pub(crate) fn unix_time(clock: Option<&UnixClock>) -> Duration {
    match clock {
        Some(c) => Duration::from_secs(c()),
        None => unix_now_fast(),
    }
}

/// Unix seconds now.
pub(crate) fn unix_now_secs() -> u64 {
    unix_now().as_secs()
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub(crate) fn retry_secs(d: Duration) -> u64 {
    ceil_secs(d).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_up_and_retry_at_least_one() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(36)), 36);
        assert_eq!(ceil_secs(Duration::from_millis(36_001)), 37);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }

    #[test]
    fn the_fast_clock_agrees_with_the_system_clock() {
        for _ in 0..1000 {
            let before = unix_now();
            let fast = unix_now_fast();
            let after = unix_now();
            // Within the anchoring error (well under a millisecond).
            let slack = Duration::from_millis(5);
            assert!(
                fast + slack >= before && fast <= after + slack,
                "{before:?} {fast:?} {after:?}"
            );
        }
    }
}
