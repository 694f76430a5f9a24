//! The one GCRA step in Rust, exactly as governor computes it (and the
//! Redis scripts): a several-limit check's decision per charge, a
//! settlement's adjustment, and a bucket's capacity and peek.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::store::{Budget, ShardMaps};
use crate::backend::{Adjustment, Decision};
use crate::limit::Limit;

/// One bucket of a shard takes a settlement's debt, or gives back its
/// refund, at `now` (in the shard's time); a bucket full again is dropped,
/// and a debt on a bucket no longer tracked is tracked again, past the cap
/// if it must be: a settlement is never lost. Its capacity afterwards.
pub(super) fn adjust(maps: &mut ShardMaps, a: &Adjustment, now: u64, budget: &Budget) -> Decision {
    let t = a.limit.emission_interval_nanos().max(1);
    let tracked = maps.get(a.bucket);
    let base = i128::from(tracked.unwrap_or(now).max(now));
    let next = base + i128::from(a.units) * i128::from(t);
    if next <= i128::from(now) {
        if tracked.is_some() {
            maps.known.remove(&a.bucket);
            maps.guests.remove(&a.bucket);
            budget.release(1);
        }
        return Decision::allow(&a.limit, a.limit.max());
    }
    let next = u64::try_from(next).unwrap_or(u64::MAX);
    match tracked {
        Some(_) => {
            let known = maps.known.contains_key(&a.bucket);
            maps.set(a.bucket, next, known);
        }
        None => {
            budget.tracked.fetch_add(1, Ordering::Relaxed);
            crate::telemetry::tracked_keys(1.0);
            maps.known.insert(a.bucket, next);
        }
    }
    Decision::allow(&a.limit, capacity_at(&a.limit, Some(next), now))
}

/// The requests a bucket with TAT `tat` (none: untracked, full) could take
/// at once at `now` (0 while in debt): GCRA's remaining burst capacity.
pub(super) fn capacity_at(limit: &Limit, tat: Option<u64>, now: u64) -> u32 {
    let Some(tat) = tat else {
        return limit.max();
    };
    let t = limit.emission_interval_nanos().max(1);
    let cap = u64::from(limit.max()) * t;
    ((now + cap).saturating_sub(tat).min(cap) / t) as u32
}

/// A peek at a bucket with TAT `tat` at `now`: what a check of one
/// request would answer, counting nothing. With room, its capacity; with
/// none (in debt, say), the refusal that check would get, whose reset is
/// when the bucket is full again (`tat`): what a 429 says.
pub(super) fn peeked(limit: &Limit, tat: Option<u64>, now: u64) -> Decision {
    match (capacity_at(limit, tat, now), tat) {
        (0, Some(tat)) => {
            let tau = limit.emission_interval_nanos() * u64::from(limit.max() - 1);
            let retry = tat.saturating_sub(tau).saturating_sub(now);
            Decision::refuse(limit, 1, Duration::from_nanos(retry))
        }
        (n, _) => Decision::allow(limit, n),
    }
}

/// Where one charge of a several-limit check stands.
#[derive(Clone, Copy)]
pub(super) enum Slot {
    /// Tracked, with this TAT.
    Tracked(u64),
    /// Not tracked; a place in the table is reserved for it.
    New,
    /// Not tracked, a known caller at the hard bound: a guest of the shard
    /// gives way (with none left, the caller goes to the overflow).
    Evict,
    /// Not tracked, a guest at the cap: counted in the shared overflow
    /// bucket of its limit (with that bucket's TAT, if any).
    Overflow(Option<u64>),
}

impl Slot {
    /// The charge's TAT, if its bucket has one (`None`: full).
    #[inline]
    pub(super) fn tat(self) -> Option<u64> {
        match self {
            Slot::Tracked(tat) | Slot::Overflow(Some(tat)) => Some(tat),
            Slot::New | Slot::Evict | Slot::Overflow(None) => None,
        }
    }
}

/// GCRA for one limit, exactly as governor computes it (and the Redis
/// script): `max` at once, then one every `t`, in nanoseconds.
pub(super) struct Gcra {
    /// `None`: conforms; else how long until it would.
    pub(super) retry: Option<u64>,
    /// The TAT to store if it is counted.
    pub(super) next: u64,
    /// Requests left after it, if counted.
    remaining: u32,
}

impl Gcra {
    #[inline]
    pub(super) fn new(limit: &Limit, n: u32, reserve: u32, tat: u64, now: u64) -> Self {
        let t = limit.emission_interval_nanos().max(1);
        let max = u64::from(limit.max());
        let tau = t * (max - 1);
        let add = t * (u64::from(n) - 1);
        // A reserve the request cannot leave: only critical requests
        // could ever use what is left.
        if u64::from(n) + u64::from(reserve) > max {
            return Gcra {
                retry: Some(limit.per().as_nanos() as u64),
                next: tat,
                remaining: 0,
            };
        }
        // Saturating: a debt settled past the arithmetic's range leaves a
        // TAT at `u64::MAX` (refused for centuries), never an overflow.
        let reserve_ns = u64::from(reserve).saturating_mul(t);
        let earliest = tat
            .saturating_add(add)
            .saturating_add(reserve_ns)
            .saturating_sub(tau);
        if now < earliest {
            return Gcra {
                retry: Some(earliest - now),
                next: tat,
                remaining: 0,
            };
        }
        let next = tat.max(now).saturating_add(t).saturating_add(add);
        let remaining = ((now + tau + t).saturating_sub(next).min(tau + t) / t) as u32;
        Gcra {
            retry: None,
            next,
            remaining,
        }
    }

    pub(super) fn decision(&self, limit: &Limit, n: u32) -> Decision {
        match self.retry {
            None => Decision::allow(limit, self.remaining),
            Some(r) => Decision::refuse(limit, n, Duration::from_nanos(r)),
        }
    }
}
