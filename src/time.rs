//! Time helpers shared by the headers, the usage service and the layer (a
//! leaf: it imports nothing of the crate). Seconds shown to clients are
//! always rounded up, never down.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch, by the system clock.
pub(crate) fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
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
}
