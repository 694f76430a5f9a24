//! Calendar counters: a calendar limit is counted per period (its start
//! and a count), not in a GCRA bucket. They live in their owner's shard
//! beside its buckets, so a check that mixes both kinds is still one step
//! under one lock; they count in the key budget and are dropped once their
//! period has ended (by the latest Unix time a check brought).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::store::{Budget, ShardMaps};
use crate::backend::{Adjustment, Charge, Decision};
use crate::limit::{Limit, PeriodBounds};

/// A calendar limit's count in one period.
#[derive(Clone, Copy, Debug)]
pub(super) struct Counter {
    /// The period's start and end, Unix microseconds.
    pub(super) start: u64,
    pub(super) end: u64,
    /// Units counted in it (past `max` after a debt).
    pub(super) count: u64,
}

/// The latest Unix time (microseconds) any check brought: calendar
/// counters whose period ended before it are dropped by the sweeps. The
/// layer's clock, not the system's, so an injected clock is obeyed.
#[derive(Default)]
pub(super) struct Latest(AtomicU64);

impl Latest {
    #[inline]
    pub(super) fn saw(&self, now: u64) {
        if now > self.0.load(Ordering::Relaxed) {
            self.0.fetch_max(now, Ordering::Relaxed);
        }
    }

    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Units counted in `period` now: the stored count if it is of this
/// period (or a later one, should the clock have gone back), else none.
#[inline]
pub(super) fn used(maps: &ShardMaps, bucket: u64, period: &PeriodBounds) -> u64 {
    in_period(maps.calendar.get(&bucket), period)
}

/// The same, of a counter.
#[inline]
pub(super) fn in_period(counter: Option<&Counter>, period: &PeriodBounds) -> u64 {
    match counter {
        Some(c) if c.start >= period.start => c.count,
        _ => 0,
    }
}

/// Whether charge `c` fits with `used` counted: its cost, leaving its
/// reserve.
#[inline]
pub(super) fn fits(c: &Charge, used: u64) -> bool {
    used + u64::from(c.cost.max(1)) + u64::from(c.reserve) <= u64::from(c.limit.max())
}

#[inline]
fn until_end(p: &PeriodBounds) -> Duration {
    Duration::from_micros(p.end.saturating_sub(p.now))
}

/// Charge `c`'s decision with `used` counted before it: allowed (counting
/// it) if it fits, else refused until the period ends.
#[inline]
pub(super) fn decision(c: &Charge, used: u64) -> Decision {
    let cost = u64::from(c.cost.max(1));
    match fits(c, used) {
        true => Decision::in_period(&c.limit, true, used + cost, until_end(&c.period)),
        false => Decision::in_period(&c.limit, false, used, until_end(&c.period)),
    }
}

/// What charge `c` would see now, counting nothing: its room (or, with
/// none, the refusal a check of one unit would get).
pub(super) fn peeked(limit: &Limit, period: &PeriodBounds, used: u64) -> Decision {
    let room = used < u64::from(limit.max());
    Decision::in_period(limit, room, used, until_end(period))
}

/// The counter `stored` becomes when charge `c` is counted with `used`
/// before it (a later period's stays its own, should the clock have gone
/// back).
#[inline]
pub(super) fn counted(stored: Option<&Counter>, c: &Charge, used: u64) -> Counter {
    let count = used + u64::from(c.cost.max(1));
    match stored {
        Some(later) if later.start > c.period.start => Counter { count, ..*later },
        _ => Counter {
            start: c.period.start,
            end: c.period.end,
            count,
        },
    }
}

/// A settlement of a calendar charge: a debt or a refund of its period,
/// never below 0; nothing once its period is over (a later one counts).
pub(super) fn adjust(maps: &mut ShardMaps, a: &Adjustment, budget: &Budget) -> Decision {
    let p = &a.period;
    let stored = maps.calendar.get(&a.bucket).copied();
    let current = match stored {
        Some(c) if c.start == p.start => c.count,
        Some(c) if c.start > p.start => return peeked(&a.limit, p, c.count),
        _ => 0,
    };
    let count = (i128::from(current) + i128::from(a.units)).max(0) as u64;
    match (count, stored.is_some()) {
        (0, true) => {
            maps.calendar.remove(&a.bucket);
            budget.release(1);
        }
        (0, false) => {}
        (n, _) => {
            let counter = Counter {
                start: p.start,
                end: p.end,
                count: n,
            };
            if maps.calendar.insert(a.bucket, counter).is_none() {
                budget.tracked.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::tracked_keys(1.0);
            }
        }
    }
    peeked(&a.limit, p, count)
}
