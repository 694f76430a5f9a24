//! Calendar periods: where the day, week or month around a Unix time
//! starts and ends in a time zone ([`Calendar`]), by jiff's rules, so
//! daylight-saving days (23 or 25 hours), month lengths and leap years are
//! the calendar's business, not ours. A leaf beside `limit`: the policy
//! holds a `Calendar`, admission asks it for a check's [`PeriodBounds`].

use std::fmt;
use std::time::Duration;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

use crate::limit::{Period, PeriodBounds};

/// The time zone calendar limits reset in (the policy's
/// `[defaults] time_zone`, UTC unless set).
///
/// ```
/// use std::time::Duration;
/// use tierlimit::policy::{Calendar, Period};
///
/// let london = Calendar::new("Europe/London").unwrap();
/// // 2026-03-29 is 23 hours long in London; 12:00 UTC is 13:00 BST.
/// let noon = Duration::from_secs(1_774_785_600);
/// let b = london.bounds(Period::CalendarDay, noon);
/// assert_eq!(b.end - b.start, 23 * 3_600_000_000);
/// assert!(Calendar::new("Mars/Olympus_Mons").is_err());
/// ```
#[derive(Clone, PartialEq)]
pub struct Calendar {
    tz: TimeZone,
}

impl Calendar {
    /// Coordinated Universal Time.
    pub fn utc() -> Self {
        Calendar { tz: TimeZone::UTC }
    }

    /// The IANA time zone `name` (`"Europe/London"`), from the system's
    /// time zone database, or `"UTC"`.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.eq_ignore_ascii_case("utc") {
            return Ok(Calendar::utc());
        }
        TimeZone::get(name)
            .map(|tz| Calendar { tz })
            .map_err(|_| {
                format!("unknown time zone `{name}` (write an IANA name such as \"Europe/London\", or \"UTC\")")
            })
    }

    /// The zone's IANA name (`"UTC"` for UTC).
    pub fn name(&self) -> &str {
        self.tz.iana_name().unwrap_or("UTC")
    }

    /// The bounds of `period` around Unix time `now`, and of the period
    /// after it (all 0 for [`Period::Rolling`]).
    pub fn bounds(&self, period: Period, now: Duration) -> PeriodBounds {
        if !period.is_calendar() {
            return PeriodBounds::default();
        }
        let micros = now.as_micros().min(i64::MAX as u128) as i64;
        let Ok(ts) = Timestamp::from_microsecond(micros) else {
            return PeriodBounds::default();
        };
        let today = self.tz.to_datetime(ts).date();
        let first = match period {
            Period::CalendarWeek => {
                let back = i64::from(today.weekday().to_monday_zero_offset());
                today.checked_sub(Span::new().days(back)).unwrap_or(today)
            }
            Period::CalendarMonth => today.first_of_month(),
            _ => today,
        };
        let start = self.midnight(first);
        let end = self.midnight(step(first, period, 1));
        let next_end = self.midnight(step(first, period, 2));
        PeriodBounds {
            now: micros.max(0) as u64,
            start,
            end: end.max(start + 1),
            next_end: next_end.max(end + 1),
        }
    }

    /// The first instant of `date` in the zone (after a gap, if midnight
    /// is skipped), in Unix microseconds.
    fn midnight(&self, date: Date) -> u64 {
        let dt = DateTime::from(date);
        self.tz
            .to_ambiguous_timestamp(dt)
            .compatible()
            .map_or(0, |t| t.as_microsecond().max(0) as u64)
    }
}

/// The first day of the period `n` periods after the one starting `first`.
fn step(first: Date, period: Period, n: i64) -> Date {
    let span = match period {
        Period::CalendarWeek => Span::new().weeks(n),
        Period::CalendarMonth => Span::new().months(n),
        _ => Span::new().days(n),
    };
    first.checked_add(span).unwrap_or(first)
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar::utc()
    }
}

impl fmt::Debug for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Calendar").field(&self.name()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000_000;

    fn at(cal: &Calendar, civil: &str) -> Duration {
        let dt: DateTime = civil.parse().unwrap();
        let ts = cal.tz.to_ambiguous_timestamp(dt).compatible().unwrap();
        Duration::from_micros(ts.as_microsecond() as u64)
    }

    fn civil(cal: &Calendar, micros: u64) -> String {
        let ts = Timestamp::from_microsecond(micros as i64).unwrap();
        cal.tz.to_datetime(ts).to_string()
    }

    #[test]
    fn a_23_hour_and_a_25_hour_day_in_london() {
        let london = Calendar::new("Europe/London").unwrap();
        // Clocks go forward at 01:00 on 2026-03-29: 23 hours.
        let b = london.bounds(Period::CalendarDay, at(&london, "2026-03-29T23:59:59"));
        assert_eq!(b.end - b.start, 23 * H);
        assert_eq!(civil(&london, b.start), "2026-03-29T00:00:00");
        assert_eq!(civil(&london, b.end), "2026-03-30T00:00:00");
        assert_eq!(b.end - b.now, 1_000_000, "one second to midnight");
        assert_eq!(b.next_end - b.end, 24 * H);
        // Clocks go back at 02:00 on 2026-10-25: 25 hours.
        let b = london.bounds(Period::CalendarDay, at(&london, "2026-10-25T12:00:00"));
        assert_eq!(b.end - b.start, 25 * H);
        // The day before: 24 hours, then the 25-hour one.
        let b = london.bounds(Period::CalendarDay, at(&london, "2026-10-24T23:59:59"));
        assert_eq!((b.end - b.start, b.next_end - b.end), (24 * H, 25 * H));
    }

    #[test]
    fn february_and_a_leap_year() {
        let utc = Calendar::utc();
        let feb = |y: &str| {
            utc.bounds(
                Period::CalendarMonth,
                at(&utc, &format!("{y}-02-14T08:00:00")),
            )
        };
        assert_eq!(feb("2027").end - feb("2027").start, 28 * 24 * H);
        assert_eq!(feb("2028").end - feb("2028").start, 29 * 24 * H);
        // The last second of a leap February is still February.
        let b = utc.bounds(Period::CalendarMonth, at(&utc, "2028-02-29T23:59:59"));
        assert_eq!(civil(&utc, b.start), "2028-02-01T00:00:00");
        assert_eq!(civil(&utc, b.end), "2028-03-01T00:00:00");
        assert_eq!(b.next_end - b.end, 31 * 24 * H);
        // A leap day is a day like any other.
        let b = utc.bounds(Period::CalendarDay, at(&utc, "2028-02-29T00:00:00"));
        assert_eq!(civil(&utc, b.start), "2028-02-29T00:00:00");
        assert_eq!(b.end - b.start, 24 * H);
    }

    #[test]
    fn weeks_start_on_monday_and_months_span_a_clock_change() {
        let london = Calendar::new("Europe/London").unwrap();
        // Sunday 2026-03-29: its week started Monday 2026-03-23 and is one
        // hour short.
        let b = london.bounds(Period::CalendarWeek, at(&london, "2026-03-29T18:00:00"));
        assert_eq!(civil(&london, b.start), "2026-03-23T00:00:00");
        assert_eq!(civil(&london, b.end), "2026-03-30T00:00:00");
        assert_eq!(b.end - b.start, (7 * 24 - 1) * H);
        // A Monday is the first day of its own week.
        let b = london.bounds(Period::CalendarWeek, at(&london, "2026-03-30T00:00:00"));
        assert_eq!(civil(&london, b.start), "2026-03-30T00:00:00");
        // March 2026 in London: 31 days less the hour lost.
        let b = london.bounds(Period::CalendarMonth, at(&london, "2026-03-31T23:59:59"));
        assert_eq!(b.end - b.start, (31 * 24 - 1) * H);
        assert_eq!(b.end - b.now, 1_000_000);
    }

    #[test]
    fn a_zone_whose_midnight_is_skipped_starts_its_day_after_the_gap() {
        // Santiago moved its clocks from 00:00 to 01:00 on 2024-09-08.
        let santiago = Calendar::new("America/Santiago").unwrap();
        let b = santiago.bounds(Period::CalendarDay, at(&santiago, "2024-09-08T12:00:00"));
        assert_eq!(civil(&santiago, b.start), "2024-09-08T01:00:00");
        assert_eq!(b.end - b.start, 23 * H);
    }

    #[test]
    fn names_and_rolling_limits() {
        assert_eq!(Calendar::new("utc").unwrap().name(), "UTC");
        assert_eq!(
            Calendar::new("Europe/London").unwrap().name(),
            "Europe/London"
        );
        let e = Calendar::new("Europe/Atlantis").unwrap_err();
        assert!(e.contains("unknown time zone `Europe/Atlantis`"), "{e}");
        let b = Calendar::utc().bounds(Period::Rolling, Duration::from_secs(1));
        assert_eq!(b, PeriodBounds::default());
    }
}
