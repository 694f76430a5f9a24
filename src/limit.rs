//! Limits: a GCRA quota ([`Limit`]), a cell's rule ([`Rule`]) and how many
//! limits one request may be checked against ([`MAX_LIMITS`]). The bottom
//! layer, beside `time` and `key`: it imports nothing of the crate, and
//! `policy`, `decision` and the backends import it.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// The most limits one request is checked against in one category: its
/// per-key limits and its account's together. A policy that asks for more
/// is refused when it is built.
pub const MAX_LIMITS: usize = 8;

/// A GCRA quota: at most `max` requests at once, then one every `per / max`.
///
/// This is governor's `Quota::with_period(per / max).allow_burst(max)`:
/// `Limit::per_hour(100)` admits 100 requests at once, then one more every
/// 36 seconds, and is full again an hour after it was emptied.
///
/// ```
/// use std::time::Duration;
/// use tierlimit::Limit;
///
/// let l = Limit::per_hour(100);
/// assert_eq!(l.max(), 100);
/// assert_eq!(l.per(), Duration::from_secs(3600));
/// assert_eq!(l.emission_interval(), Duration::from_secs(36));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    max: NonZeroU32,
    per: Duration,
    /// `per / max` in nanoseconds, computed once (a 128-bit division).
    interval: u64,
}

impl Limit {
    /// `max` requests per `per`. Returns `None` when the arithmetic of
    /// either backend could not hold it: `per` longer than
    /// [`MAX_WINDOW`](Self::MAX_WINDOW) (ten years), or shorter than
    /// [`MIN_INTERVAL`](Self::MIN_INTERVAL) (one microsecond) per request.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use tierlimit::Limit;
    ///
    /// let one = NonZeroU32::MIN;
    /// assert!(Limit::new(one, Duration::from_secs(3600)).is_some());
    /// assert!(Limit::new(one, Duration::from_secs(400 * 86_400 * 365)).is_none());
    /// assert!(Limit::new(NonZeroU32::new(2_000_000).unwrap(), Duration::from_secs(1)).is_none());
    /// ```
    pub fn new(max: NonZeroU32, per: Duration) -> Option<Self> {
        let min = Self::MIN_INTERVAL.as_nanos() * u128::from(max.get());
        if per.as_nanos() < min || per > Self::MAX_WINDOW {
            return None;
        }
        Some(Limit::make(max, per))
    }

    /// The longest window a limit may have: ten years (of 365 days). Time
    /// arithmetic stays far inside governor's 64-bit nanoseconds and the
    /// Redis script's 53-bit microseconds.
    pub const MAX_WINDOW: Duration = Duration::from_secs(10 * 365 * 86_400);

    /// The shortest time one request's capacity may take to come back
    /// (`per / max`): one microsecond, the Redis script's resolution, so
    /// both backends compute the same answers (at most a million requests
    /// per second per key).
    pub const MIN_INTERVAL: Duration = Duration::from_micros(1);

    /// `max` requests per second.
    ///
    /// # Panics
    ///
    /// If `max` is zero, or above one per microsecond (at compile time in
    /// a `const`).
    pub const fn per_second(max: u32) -> Self {
        Limit::make(nonzero(max), Duration::from_secs(1))
    }

    /// `max` requests per minute.
    ///
    /// # Panics
    ///
    /// If `max` is zero, or above one per microsecond (at compile time in
    /// a `const`).
    pub const fn per_minute(max: u32) -> Self {
        Limit::make(nonzero(max), Duration::from_secs(60))
    }

    /// `max` requests per hour.
    ///
    /// # Panics
    ///
    /// If `max` is zero, or above one per microsecond (at compile time in
    /// a `const`).
    pub const fn per_hour(max: u32) -> Self {
        Limit::make(nonzero(max), Duration::from_secs(3600))
    }

    /// `max` requests per day.
    ///
    /// # Panics
    ///
    /// If `max` is zero, or above one per microsecond (at compile time in
    /// a `const`).
    pub const fn per_day(max: u32) -> Self {
        Limit::make(nonzero(max), Duration::from_secs(86_400))
    }

    /// The burst size: how many requests may come at once.
    pub const fn max(&self) -> u32 {
        self.max.get()
    }

    /// The window: how long an emptied bucket takes to fill again.
    pub const fn per(&self) -> Duration {
        self.per
    }

    /// The time one request's capacity takes to come back (`per / max`).
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_interval_nanos())
    }

    #[inline]
    pub(crate) const fn emission_interval_nanos(&self) -> u64 {
        self.interval
    }

    const fn make(max: NonZeroU32, per: Duration) -> Self {
        if per.as_nanos() < max.get() as u128 * 1_000 {
            panic!("a limit must leave at least 1 µs per request");
        }
        Limit {
            max,
            per,
            interval: (per.as_nanos() / max.get() as u128) as u64,
        }
    }

    /// The same limit as a governor quota.
    pub fn to_quota(&self) -> governor::Quota {
        governor::Quota::with_period(self.emission_interval())
            .expect("Limit::new guarantees a non-zero period")
            .allow_burst(self.max)
    }

    /// Parses `"100/hour"`, `"20/h"`, `"10/30s"`, `"5/day"`, `"1000/1m"`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let (max, per) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` is not a limit; write it as `100/hour` or `unlimited`")
        })?;
        let max: u32 = max
            .trim()
            .replace(['_', ','], "")
            .parse()
            .map_err(|_| format!("`{}` is not a whole number of requests", max.trim()))?;
        let max = NonZeroU32::new(max).ok_or_else(|| {
            "the maximum must be at least 1 (to forbid a category, leave it out of the routes)"
                .to_owned()
        })?;
        let per = parse_duration(per.trim())?;
        if per > Limit::MAX_WINDOW {
            return Err(format!(
                "the window of `{}` is longer than the longest supported, 10 years",
                s.trim()
            ));
        }
        Limit::new(max, per).ok_or_else(|| {
            format!(
                "the window of `{}` is too short for {max} requests (at least 1 µs per request)",
                s.trim()
            )
        })
    }
}

const fn nonzero(max: u32) -> NonZeroU32 {
    match NonZeroU32::new(max) {
        Some(n) => n,
        None => panic!("a limit's max must be at least 1"),
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.per.as_secs();
        let unit = match (secs, self.per.subsec_nanos()) {
            (1, 0) => "second",
            (60, 0) => "minute",
            (3600, 0) => "hour",
            (86_400, 0) => "day",
            _ => return write!(f, "{} per {:?}", self.max, self.per),
        };
        write!(f, "{} per {unit}", self.max)
    }
}

/// `hour`, `h`, `1h`, `30s`, `90 minutes`, `day`, `500ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n: u64 = if n.is_empty() {
        1
    } else {
        n.parse().map_err(|_| format!("`{s}` is not a duration"))?
    };
    let unit_nanos: u64 = match unit.trim() {
        "ms" | "millisecond" | "milliseconds" => 1_000_000,
        "s" | "sec" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hour" | "hours" => 3_600_000_000_000,
        "d" | "day" | "days" => 86_400_000_000_000,
        other => {
            return Err(format!(
                "unknown time unit `{other}` (use ms, s, m, h, d, or second, minute, hour, day)"
            ));
        }
    };
    n.checked_mul(unit_nanos)
        .filter(|&n| n > 0)
        .map(Duration::from_nanos)
        .ok_or_else(|| format!("`{s}` is not a usable window"))
}

/// What a tier allows in one category.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Limited by a GCRA quota.
    Limited(Limit),
    /// Not limited: no check, no rate-limit headers.
    Unlimited,
}

impl Rule {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("unlimited") {
            Ok(Rule::Unlimited)
        } else {
            Limit::parse(s).map(Rule::Limited)
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Limited(l) => l.fmt(f),
            Rule::Unlimited => f.write_str("unlimited"),
        }
    }
}

impl From<Limit> for Rule {
    fn from(l: Limit) -> Self {
        Rule::Limited(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_forms() {
        let l = Limit::parse("100/hour").unwrap();
        assert_eq!((l.max(), l.per()), (100, Duration::from_secs(3600)));
        let l = Limit::parse("1,000/h").unwrap();
        assert_eq!((l.max(), l.per()), (1000, Duration::from_secs(3600)));
        let l = Limit::parse("5/day").unwrap();
        assert_eq!((l.max(), l.per()), (5, Duration::from_secs(86400)));
        let l = Limit::parse("10/30s").unwrap();
        assert_eq!((l.max(), l.per()), (10, Duration::from_secs(30)));
        assert_eq!(Rule::parse("Unlimited").unwrap(), Rule::Unlimited);
    }

    #[test]
    fn rejects_bad_limits_with_reasons() {
        assert!(Limit::parse("0/hour").unwrap_err().contains("at least 1"));
        assert!(
            Limit::parse("ten/hour")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(
            Limit::parse("10/fortnight")
                .unwrap_err()
                .contains("unknown time unit")
        );
        assert!(Limit::parse("10").unwrap_err().contains("100/hour"));
        assert!(
            Limit::parse("10/0s")
                .unwrap_err()
                .contains("not a usable window")
        );
        assert!(Limit::parse("10/5ms").is_ok());
        // The edges of the arithmetic.
        assert!(
            Limit::parse("1/18446744073709ms")
                .unwrap_err()
                .contains("10 years")
        );
        assert!(Limit::parse("1/3650d").is_ok());
        assert!(Limit::parse("1/3651d").unwrap_err().contains("10 years"));
        assert!(Limit::parse("1000/1ms").is_ok());
        assert!(Limit::parse("1001/1ms").unwrap_err().contains("1 µs"));
        assert!(
            Limit::parse("4294967295/1s")
                .unwrap_err()
                .contains("too short")
        );
        assert!(Limit::parse("4294967295/3650d").is_ok());
    }

    #[test]
    fn quota_matches_governor() {
        let l = Limit::per_hour(100);
        let q = l.to_quota();
        assert_eq!(q.burst_size().get(), 100);
        assert_eq!(q.replenish_interval(), Duration::from_secs(36));
    }
}
