//! The store's side of a batch as pure arithmetic on TATs, shared by every
//! store: the grant of a take, a normal check of a cost, and the TAT a
//! give-back leaves.

use std::time::Duration;

use super::{GiveBack, Grant, GrantedLimit, Take, Taken};
use crate::backend::Decision;
use crate::limit::{Limit, MAX_LIMITS};

#[inline]
fn interval(limit: &Limit) -> u64 {
    limit.emission_interval_nanos().max(1)
}

/// What a bucket with TAT `tat` could take at once at `now`.
#[inline]
pub(crate) fn capacity(limit: &Limit, tat: u64, now: u64) -> u32 {
    let t = interval(limit);
    let cap = u64::from(limit.max()) * t;
    ((now + cap).saturating_sub(tat).min(cap) / t) as u32
}

/// A take's grant at `t0` on buckets with TATs `tats` (`t0` for a full
/// one): `Some` grant when every limit holds at least its charge's cost,
/// with `tats` set to the batch's ends; `None` (and `tats` untouched)
/// otherwise, or when the take may not batch (a reserve).
pub(crate) fn grant(take: &Take<'_>, tats: &mut [u64], t0: u64) -> Option<Grant> {
    if take.charges.iter().any(|c| c.reserve > 0) || !take.is_batch() {
        return None;
    }
    let hold = take.hold.as_nanos().min(u128::from(u64::MAX / 4)) as u64;
    let d = t0.saturating_add(hold);
    let mut limits = [GrantedLimit::default(); MAX_LIMITS];
    for (i, c) in take.charges.iter().enumerate().take(MAX_LIMITS) {
        let n = c.cost.max(1);
        let want = take.want.saturating_mul(n);
        let t = interval(&c.limit);
        let cap = u64::from(c.limit.max()) * t;
        // The request's own units are counted now, as a normal check's;
        // the others after the hold, where no spend of them can come
        // before their slots. `start` is where the batch's first slot
        // would start were the units together.
        let own = tats[i].max(t0) + u64::from(n) * t;
        let start = own.max(d) - u64::from(n) * t;
        let room = (t0.saturating_add(cap).saturating_sub(start) / t).min(u64::from(u32::MAX));
        // A batch leaves at least as many units as it takes: a bucket's
        // last units go one check at a time, so a burst that empties it
        // ends as it would without batches.
        let units = want.min((room as u32).saturating_sub(want - n));
        if units < n {
            return None;
        }
        limits[i] = GrantedLimit {
            start,
            interval: t,
            cap,
            before: tats[i],
            remaining: 0,
            units,
        };
    }
    let len = take.charges.len().min(MAX_LIMITS);
    // The same number of requests' worth of every limit: the batch is
    // spent up by its smallest limit, and any more units of another limit
    // would be held by no one (never spent, never given back).
    let requests = (0..len)
        .map(|i| limits[i].units / take.charges[i].cost.max(1))
        .min()
        .unwrap_or(0);
    for (i, c) in take.charges.iter().enumerate().take(len) {
        limits[i].units = requests * c.cost.max(1);
        tats[i] = limits[i].end(limits[i].units);
        limits[i].remaining = capacity(&c.limit, tats[i], t0);
    }
    Some(Grant::new(t0, hold, &limits[..len]))
}

/// A normal check of the take's charges (each of its cost) at `now` on
/// buckets with TATs `tats` (`now` for a full one), all or nothing:
/// `tats` are advanced if it is allowed. The binding limit's decision.
pub(crate) fn check(take: &Take<'_>, tats: &mut [u64], now: u64) -> Decision {
    let charges = &take.charges[..take.charges.len().min(MAX_LIMITS)];
    let mut decisions = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
    let mut refused = false;
    for (i, c) in charges.iter().enumerate() {
        let n = c.cost.max(1);
        let t = interval(&c.limit);
        let cap = u64::from(c.limit.max()) * t;
        let need = u64::from(n + c.reserve) * t;
        let base = tats[i].max(now);
        if u64::from(n) + u64::from(c.reserve) > u64::from(c.limit.max()) {
            refused = true;
            decisions[i] = Decision::refuse(&c.limit, n, c.limit.per());
        } else if base + need > now + cap {
            refused = true;
            let retry = base + need - now - cap;
            decisions[i] = Decision::refuse(&c.limit, n, Duration::from_nanos(retry));
        } else {
            let next = base + u64::from(n) * t;
            decisions[i] = Decision::allow(&c.limit, capacity(&c.limit, next, now));
        }
    }
    if !refused {
        for (i, c) in charges.iter().enumerate() {
            tats[i] = tats[i].max(now) + u64::from(c.cost.max(1)) * interval(&c.limit);
        }
    }
    Decision::binding(decisions[..charges.len()].iter().copied())
        .unwrap_or_else(|| Decision::allow(&Limit::per_second(1), 1))
}

/// A take in one step: a grant, else a normal check.
pub(crate) fn take(take: &Take<'_>, tats: &mut [u64], t0: u64) -> Taken {
    match grant(take, tats, t0) {
        Some(g) => Taken::Granted(g),
        None => Taken::Checked(check(take, tats, t0)),
    }
}

/// The TAT a give-back leaves on limit `i` whose TAT is `tat`:
/// `None` (nothing changes) unless the batch is still on top of it.
pub(crate) fn given_back(back: &GiveBack<'_>, i: usize, tat: u64) -> Option<u64> {
    let l = back.grant.limits().get(i)?;
    let unused = back.unused(i);
    if unused == 0 || tat != l.end(l.units) {
        return None;
    }
    Some(l.end(l.units - unused))
}
