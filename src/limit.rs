//! Limits: a GCRA quota ([`Limit`]), a cell's rule ([`Rule`]) and how many
//! limits one request may be checked against ([`MAX_LIMITS`]). The bottom
//! layer, beside `time` and `key`: it imports nothing of the crate, and
//! `policy`, `decision` and the backends import it.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use crate::key::{DEFAULT_MAX_KEY_LEN, KeyId};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    max: NonZeroU32,
    per: Duration,
    /// `per / max` in nanoseconds, computed once (a 128-bit division).
    interval: u64,
    /// Rolling (GCRA) or counted per calendar period.
    period: Period,
}

/// One word per limit, hashed on every request by the memory backend's
/// limiter lookup: the interval, the burst and the period mixed (equal
/// limits hash alike; equality still compares every field).
impl std::hash::Hash for Limit {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(
            self.interval
                ^ (u64::from(self.max.get())).rotate_left(32)
                ^ ((self.period as u64) << 61),
        );
    }
}

/// Whom a limit is counted per: each key, each account (shared by its
/// keys), or each organisation (shared by its accounts' keys); ordered
/// from the narrowest to the widest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Per {
    #[default]
    Key,
    Account,
    Org,
}

impl Per {
    /// `"key"`, `"account"` or `"org"`, as answers and the usage endpoint
    /// name it.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Per::Key => "key",
            Per::Account => "account",
            Per::Org => "org",
        }
    }

    /// `"a key"`, `"an account"` or `"an organisation"`, as errors say it.
    pub(crate) const fn what(self) -> &'static str {
        match self {
            Per::Key => "a key",
            Per::Account => "an account",
            Per::Org => "an organisation",
        }
    }

    /// The policy file's section of this owner's custom limits.
    pub(crate) const fn limits_section(self) -> &'static str {
        match self {
            Per::Key => "custom_limits",
            Per::Account => "account_limits",
            Per::Org => "org_limits",
        }
    }

    /// The id a key, account or organisation named `name` is counted (and
    /// its custom limits and boosts kept) under.
    pub(crate) fn id_of(self, name: &str) -> KeyId {
        match self {
            Per::Key => KeyId::of(name),
            Per::Account => KeyId::of_account(name),
            Per::Org => KeyId::of_org(name),
        }
    }

    /// Refuses an account's or organisation's name that is empty or
    /// longer than 256 bytes.
    pub(crate) fn check_name(self, name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > DEFAULT_MAX_KEY_LEN {
            return Err(format!("{} is a name of 1 to 256 bytes", self.what()));
        }
        Ok(())
    }
}

/// How a limit counts time: a rolling window (GCRA, the default), or a
/// counter of the current calendar day, week (from Monday, ISO) or month
/// in the policy's time zone, reset when the period starts.
///
/// ```
/// use tierlimit::{Limit, policy::Period};
///
/// let day = Limit::per_day(5).with_period(Period::CalendarDay).unwrap();
/// assert_eq!(day.period(), Period::CalendarDay);
/// assert_eq!(day.to_string(), "5 per calendar day");
/// // A calendar period needs the window it names.
/// assert!(Limit::per_hour(5).with_period(Period::CalendarDay).is_none());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Period {
    /// A rolling window: GCRA, `max` at once, then one every `per / max`.
    #[default]
    Rolling,
    /// The calendar day, from midnight to midnight.
    CalendarDay,
    /// The calendar week, from Monday's midnight (ISO weeks).
    CalendarWeek,
    /// The calendar month, from midnight on its first day.
    CalendarMonth,
}

impl Period {
    /// Whether the limit is counted per calendar period.
    #[inline]
    pub const fn is_calendar(self) -> bool {
        !matches!(self, Period::Rolling)
    }

    /// A calendar period's name (`day`, `week`, `month`); `None` when
    /// rolling.
    pub const fn name(self) -> Option<&'static str> {
        match self {
            Period::Rolling => None,
            Period::CalendarDay => Some("day"),
            Period::CalendarWeek => Some("week"),
            Period::CalendarMonth => Some("month"),
        }
    }

    /// The calendar period whose nominal window is `per` (a day, 7 days,
    /// a month of 30 days).
    fn calendar_of(per: Duration) -> Option<Self> {
        match per.as_secs() {
            _ if per.subsec_nanos() != 0 => None,
            DAY => Some(Period::CalendarDay),
            WEEK => Some(Period::CalendarWeek),
            MONTH => Some(Period::CalendarMonth),
            _ => None,
        }
    }
}

const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// A month as a rolling window (`"100/month"`): 30 days.
const MONTH: u64 = 30 * DAY;

/// The calendar period a check counts a calendar limit in, and the one
/// after it, in Unix microseconds, with the time they were computed at
/// (all 0 for a rolling limit). The layer computes them in the policy's
/// time zone; a backend counts in `start..end`, or (Redis, by its own
/// clock, once `end` has passed) in `end..next_end`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodBounds {
    /// The time the bounds were computed at.
    pub now: u64,
    /// The current period's start.
    pub start: u64,
    /// The current period's end: the next period's start.
    pub end: u64,
    /// The next period's end.
    pub next_end: u64,
}

impl PeriodBounds {
    /// No period: a rolling limit's.
    pub const ROLLING: PeriodBounds = PeriodBounds {
        now: 0,
        start: 0,
        end: 0,
        next_end: 0,
    };
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
            period: Period::Rolling,
        }
    }

    /// How this limit counts time.
    #[inline]
    pub const fn period(&self) -> Period {
        self.period
    }

    /// This limit counted per `period`: `None` for a calendar period whose
    /// window the limit's is not (a day for [`Period::CalendarDay`], 7
    /// days for a week, 30 days — `"/month"` — for a month).
    #[must_use]
    pub fn with_period(mut self, period: Period) -> Option<Self> {
        if period.is_calendar() && Period::calendar_of(self.per) != Some(period) {
            return None;
        }
        self.period = period;
        Some(self)
    }

    /// Parses a limit counted per calendar period (`"5/day"`, `"1/week"`,
    /// `"2000000/month"`): the window must be one day, week or month.
    pub(crate) fn parse_calendar(s: &str) -> Result<Self, String> {
        let l = Limit::parse(s)?;
        let unit = s.split_once('/').map_or("", |(_, u)| u.trim());
        let named = matches!(
            unit,
            "d" | "day" | "1d" | "w" | "week" | "1w" | "mo" | "month" | "1mo"
        );
        Period::calendar_of(l.per)
            .filter(|_| named)
            .and_then(|p| l.with_period(p))
            .ok_or_else(|| {
                format!(
                    "a calendar period needs a window of one day, week or month (`5/day`, `1/week`, `100/month`), not `{}`",
                    s.trim()
                )
            })
    }

    /// The same limit as a governor quota.
    pub fn to_quota(&self) -> governor::Quota {
        governor::Quota::with_period(self.emission_interval())
            .expect("Limit::new guarantees a non-zero period")
            .allow_burst(self.max)
    }

    /// Parses `"100/hour"`, `"20/h"`, `"10/30s"`, `"5/day"`, `"1000/1m"`,
    /// `"7/week"`, `"100/month"` (a rolling month is 30 days).
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
        let unit = match (self.period, secs, self.per.subsec_nanos()) {
            (Period::CalendarDay, ..) => "calendar day",
            (Period::CalendarWeek, ..) => "calendar week",
            (Period::CalendarMonth, ..) => "calendar month",
            (_, 1, 0) => "second",
            (_, 60, 0) => "minute",
            (_, 3600, 0) => "hour",
            (_, DAY, 0) => "day",
            (_, WEEK, 0) => "week",
            (_, MONTH, 0) => "month (30 days)",
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
        "w" | "week" | "weeks" => WEEK * 1_000_000_000,
        // A rolling month is 30 days (a calendar month is its own length).
        "mo" | "month" | "months" => MONTH * 1_000_000_000,
        other => {
            return Err(format!(
                "unknown time unit `{other}` (use ms, s, m, h, d, w, mo, or second, minute, hour, day, week, month)"
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
    fn weeks_and_months_are_rolling_windows_and_calendar_periods() {
        let w = Limit::parse("7/week").unwrap();
        assert_eq!(
            (w.per(), w.period()),
            (Duration::from_secs(WEEK), Period::Rolling)
        );
        let m = Limit::parse("100/month").unwrap();
        assert_eq!(m.per(), Duration::from_secs(30 * 86_400));
        assert_eq!(m.to_string(), "100 per month (30 days)");
        assert_eq!(
            Limit::parse("1/2mo").unwrap().per(),
            Duration::from_secs(60 * 86_400)
        );
        let c = Limit::parse_calendar("2000000/month").unwrap();
        assert_eq!(c.period(), Period::CalendarMonth);
        assert_eq!(
            Limit::parse_calendar("5/day").unwrap().period(),
            Period::CalendarDay
        );
        assert_eq!(
            Limit::parse_calendar("5/w").unwrap().period(),
            Period::CalendarWeek
        );
        // The same numbers, counted two ways: two limits.
        assert_ne!(c, Limit::parse("2000000/month").unwrap());
        for bad in ["5/hour", "5/2d", "5/30d", "5/24h", "5/7d"] {
            let e = Limit::parse_calendar(bad).unwrap_err();
            assert!(
                e.contains("one day, week or month") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn quota_matches_governor() {
        let l = Limit::per_hour(100);
        let q = l.to_quota();
        assert_eq!(q.burst_size().get(), 100);
        assert_eq!(q.replenish_interval(), Duration::from_secs(36));
    }
}
