//! Checks, peeks and settlements: what the backend sends Redis for each,
//! and what it makes of the scripts' answers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::batch::{Batched, TakeArgs, granted};
use super::failover::{PLACEHOLDER, PLACEHOLDER_LEASE, Route};
use super::io::{EvalError, Script};
use super::leases::Taken;
use super::{
    FailurePolicy, Inner, RedisBackend, bounds_args, charge_key, interval_us, lease_key,
    script_interval,
};
use crate::backend::{
    Adjustment, BackendError, Charge, Check, Decision, Lease, LeaseState, MAX_LEASES, TokenSplit,
    decide_all,
};
use crate::limit::{Limit, MAX_LIMITS};

/// A check, owned (to move into a future or onto the I/O thread).
#[derive(Clone, Copy)]
pub(super) struct Charges {
    pub(super) owner: u64,
    known: bool,
    tokens: u8,
    split: TokenSplit,
    items: [Charge; MAX_LIMITS],
    len: usize,
    pub(super) leases: [Lease; MAX_LEASES],
    pub(super) nleases: usize,
    pub(super) lease_id: u64,
    describe: bool,
}

impl Charges {
    pub(super) fn new(check: &Check<'_>) -> Self {
        let mut items = [PLACEHOLDER; MAX_LIMITS];
        let len = check.charges.len().min(MAX_LIMITS);
        items[..len].copy_from_slice(&check.charges[..len]);
        let mut leases = [PLACEHOLDER_LEASE; MAX_LEASES];
        let nleases = check.leases.len().min(MAX_LEASES);
        leases[..nleases].copy_from_slice(&check.leases[..nleases]);
        Charges {
            owner: check.owner,
            known: check.known,
            tokens: check.tokens,
            split: check.split,
            items,
            len,
            leases,
            nleases,
            lease_id: check.lease_id,
            describe: check.describe,
        }
    }

    pub(super) fn check(&self) -> Check<'_> {
        Check {
            owner: self.owner,
            known: self.known,
            tokens: self.tokens,
            split: self.split,
            charges: &self.items[..self.len],
            leases: &self.leases[..self.nleases],
            lease_id: self.lease_id,
            describe: self.describe,
        }
    }
}

/// A check's answer, and where its leases were taken.
type Routed = (Result<Decision, BackendError>, Taken);

impl RedisBackend {
    /// Checks one request against several limits in one script call, all
    /// or nothing (or through the failure policy), taking its leases if it
    /// has any. Refusals are not cached locally: the binding limit's retry
    /// delay needs every limit's state.
    ///
    /// Leases taken here are held until [`Backend::release`](crate::backend::Backend::release).
    /// Called through [`Backend::check`](crate::backend::Backend::check), a check
    /// with leases runs on the backend's I/O thread, so that it finishes
    /// (and its leases can be released) even if its caller goes away.
    pub async fn check_async(&self, check: Check<'_>) -> Result<Decision, BackendError> {
        let (result, taken) = self.check_routed(&check).await;
        if !check.leases.is_empty() {
            self.finish_leases(&Charges::new(&check), &result, taken);
        }
        result
    }

    async fn check_routed(&self, check: &Check<'_>) -> Routed {
        let (result, taken) = self.routed(check, None).await;
        let result = result.map(|t| match t {
            Batched::Checked(d) => d,
            // A check asks for no batch; a grant could not be its answer.
            Batched::Granted(_) => Decision::allow(&Limit::per_second(1), 0),
        });
        (result, taken)
    }

    /// A check, or with `batch` a take of a batch (`batch.lua`: the units
    /// wanted, the hold and the batch's tag), through the deny cache, the route and the
    /// failure policy alike.
    pub(super) async fn routed(
        &self,
        check: &Check<'_>,
        batch: Option<TakeArgs>,
    ) -> (Result<Batched, BackendError>, Taken) {
        let inner = &self.inner;
        let checked = |(r, t): Routed| (r.map(Batched::Checked), t);
        if let Some(e) = invalid(check) {
            return (Err(e), Taken::Nowhere);
        }
        let now = inner.local_micros();
        // A recent refusal of this bucket: answered here (not with batches
        // on: units given back make room before the refusal's delay ends).
        if !inner.batching
            && let Some(d) = inner.denied(check, now)
        {
            return (Ok(Batched::Checked(d)), Taken::Nowhere);
        }
        let route = inner.route(now);
        if route == Route::Around {
            return checked(inner.fall_back(check));
        }
        let Ok(_permit) = inner.in_flight.acquire().await else {
            return checked(inner.fall_back(check));
        };
        if route == Route::Redis && inner.degraded.load(Ordering::Relaxed) {
            return checked(inner.fall_back(check));
        }
        let (k, m) = (check.charges.len(), check.leases.len());
        let calendar = check
            .charges
            .iter()
            .filter(|c| c.limit.period().is_calendar());
        let refused_len = k + 1 + calendar.count();
        let answer = match batch {
            None => inner.eval_check(check).await,
            Some(take) => inner.eval_take(check, take).await,
        };
        match answer {
            Ok(v) if batch.is_some() && v.first() == Some(&3) && v.len() == 2 + 4 * k => {
                inner.succeeded();
                let take = batch.unwrap_or_default();
                (
                    Ok(Batched::Granted(granted(check, take, &v))),
                    Taken::Nowhere,
                )
            }
            Ok(v) if v.len() == k + 1 || v.len() == k + m + 1 || v.len() == refused_len => {
                inner.succeeded();
                checked(inner.answered(check, &v, now))
            }
            Ok(v) => {
                tracing::warn!(
                    len = v.len(),
                    "redis: unexpected answer from a check script"
                );
                self.release_late(check);
                inner.failed();
                checked(inner.fall_back(check))
            }
            Err(e) => {
                // A check or take that timed out may still run later: what
                // it counts is counted once more, never admitted twice.
                tracing::debug!(error = %e, timeout = ?inner.timeout, "redis check failed");
                self.release_late(check);
                inner.failed();
                checked(inner.fall_back(check))
            }
        }
    }

    /// One charge's capacity now, counting nothing.
    pub async fn peek_async(&self, owner: u64, charge: Charge) -> Result<Decision, BackendError> {
        let inner = &self.inner;
        let key = charge_key(&inner.prefix, owner, charge.bucket);
        if let Some(answer) = inner.read(inner.eval_peek(key, &charge)).await {
            return Ok(peeked(&charge, answer));
        }
        Ok(inner.fallback.peek_now(owner, &charge))
    }

    /// Settles charges after the fact in one script call (see
    /// [`Backend::settle`](crate::backend::Backend::settle)). While Redis is
    /// unreachable, or if the call fails, the settlement goes to the
    /// fallback (this instance's memory) and is counted
    /// (`tierlimit_settlement_fallbacks_total`): never dropped.
    pub async fn settle_async(
        &self,
        owner: u64,
        adjustments: &[Adjustment],
    ) -> Result<Decision, BackendError> {
        let inner = &self.inner;
        let adjustments = &adjustments[..adjustments.len().min(MAX_LIMITS)];
        if adjustments.is_empty() {
            return Ok(Decision::allow(&Limit::per_second(1), 1));
        }
        if !inner.degraded.load(Ordering::Relaxed) {
            match inner.eval_settle(owner, adjustments).await {
                Ok(v) if v.len() == adjustments.len() => {
                    inner.succeeded();
                    let states = adjustments.iter().zip(&v).map(|(a, &rem)| {
                        let rem = u32::try_from(rem).unwrap_or(0);
                        if a.limit.period().is_calendar() {
                            let used = u64::from(a.limit.max().saturating_sub(rem));
                            Decision::in_period(&a.limit, true, used, until(&a.period, false))
                        } else {
                            Decision::allow(&a.limit, rem)
                        }
                    });
                    return Ok(Decision::binding(states).expect("at least one"));
                }
                Ok(_) => {
                    tracing::warn!("redis: unexpected answer from the settlement script");
                    inner.failed();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis settlement failed");
                    inner.failed();
                }
            }
        }
        Ok(inner.settle_fallback(owner, adjustments))
    }
}

/// Why a check cannot be made at all: a cost over its limit, or nothing
/// to charge.
fn invalid(check: &Check<'_>) -> Option<BackendError> {
    if let Some(c) = check.charges.iter().find(|c| c.cost > c.limit.max()) {
        return Some(BackendError::CostExceedsLimit {
            cost: c.cost,
            max: c.limit.max(),
        });
    }
    if check.charges.is_empty() && check.leases.is_empty() {
        return Some(BackendError::Unavailable("a check without charges".into()));
    }
    None
}

/// The script's answer to a peek: what a check of one request would
/// answer (its capacity, or the refusal it would get), counting nothing.
fn peeked(charge: &Charge, (allowed, n): (i64, i64)) -> Decision {
    let limit = &charge.limit;
    let n = n.max(0).unsigned_abs();
    match (allowed == 1, limit.period().is_calendar()) {
        (true, false) => Decision::allow(limit, u32::try_from(n).unwrap_or(0)),
        (false, false) => Decision::refuse(limit, 1, Duration::from_micros(n)),
        (true, true) => counted(charge, n),
        (false, true) => {
            let used = u64::from(limit.max());
            Decision::in_period(limit, false, used, Duration::from_micros(n))
        }
    }
}

/// The time from the layer's `now` to the end of the charge's period, or
/// of the next one (`later`: Redis's clock counted it there).
fn until(p: &crate::limit::PeriodBounds, later: bool) -> Duration {
    let end = if later { p.next_end } else { p.end };
    Duration::from_micros(end.saturating_sub(p.now))
}

/// An allowed calendar charge's decision from the script's count (units
/// left, times two, plus 1 when of the next period).
fn counted(c: &Charge, x: u64) -> Decision {
    let left = x >> 1;
    let used = u64::from(c.limit.max()).saturating_sub(left);
    Decision::in_period(&c.limit, true, used, until(&c.period, x & 1 == 1))
}

/// The leases' state in the check script's answer `v` (`k` charges, then
/// one count per lease), if it took or refused them.
fn leases_answered(check: &Check<'_>, status: i64, v: &[i64], k: usize) -> Option<LeaseState> {
    if status == 0 || v.len() != k + check.leases.len() + 1 {
        return None;
    }
    LeaseState::binding(check.leases.iter().zip(&v[k + 1..]).map(|(l, &held)| {
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        LeaseState {
            limit: l.max,
            remaining: l.max.saturating_sub(held),
            refused: status == 2 && held >= l.max,
            per_account: l.per_account,
        }
    }))
}

impl Inner {
    /// The decision in the check script's answer `v`: a status (1 allowed,
    /// 0 refused by a limit, 2 refused by a lease), then one number per
    /// charge (remaining, capacity, or retry delay), then one per lease.
    fn answered(&self, check: &Check<'_>, v: &[i64], now: u64) -> Routed {
        let k = check.charges.len();
        let status = v[0];
        let mut decisions = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
        // A refusal's answer ends with what each calendar limit has left.
        let mut calendar_left = v.get(k + 1..).unwrap_or_default().iter();
        for ((slot, c), &x) in decisions.iter_mut().zip(check.charges).zip(&v[1..]) {
            let x = u64::try_from(x).unwrap_or(0);
            if c.limit.period().is_calendar() {
                *slot = match status {
                    1 | 2 => counted(c, x),
                    _ => {
                        let left = calendar_left.next().copied().unwrap_or(0);
                        let used = i64::from(c.limit.max()).saturating_sub(left).max(0);
                        let used = used.unsigned_abs();
                        match x {
                            0 => Decision::in_period(&c.limit, true, used, until(&c.period, false)),
                            _ => {
                                Decision::in_period(&c.limit, false, used, Duration::from_micros(x))
                            }
                        }
                    }
                };
                continue;
            }
            *slot = match status {
                // Remaining after (1) or capacity now (2).
                1 | 2 => Decision::allow(&c.limit, x as u32),
                // Admits it, but another limit refuses.
                _ if x == 0 => Decision::allow(&c.limit, 0),
                _ => Decision::refuse(&c.limit, c.cost.max(1), Duration::from_micros(x)),
            };
        }
        let lease = leases_answered(check, status, v, k);
        let mut d = decide_all(&decisions[..k.min(MAX_LIMITS)], check, lease);
        if status != 1 && d.allowed {
            d.allowed = false;
        }
        if status == 0 && !self.batching {
            self.remember_refusal(check, u64::try_from(v[1]).unwrap_or(0), now);
        }
        let taken = if status == 1 && !check.leases.is_empty() {
            Taken::Redis
        } else {
            Taken::Nowhere
        };
        (Ok(d), taken)
    }

    /// A check answered by the failure policy, with where its leases were
    /// taken (the fallback's, if it admitted it).
    fn fall_back(&self, check: &Check<'_>) -> Routed {
        let r = self.on_failure_all(check);
        let taken = match &r {
            Ok(d) if d.allowed && self.failure == FailurePolicy::Fallback => Taken::Fallback,
            _ => Taken::Nowhere,
        };
        (r, taken)
    }

    /// The answer to a check of one charge alone that needs no round trip:
    /// one that could never conform (its cost and reserve exceed the
    /// limit), or one of a bucket refused recently (the deny cache),
    /// refused again until the retry delay passes. (Only refusals of
    /// requests without a reserve are cached, and they bind every request:
    /// `until` is when one request of cost 1 and no reserve conforms again,
    /// so a larger cost or a reserve waits that many intervals more.)
    fn denied(&self, check: &Check<'_>, now: u64) -> Option<Decision> {
        let c = check.alone()?;
        if u64::from(c.cost.max(1)) + u64::from(c.reserve) > u64::from(c.limit.max()) {
            // Only the reserve (or less) could ever be left for it.
            return Some(Decision::refuse(&c.limit, c.cost.max(1), c.limit.per()));
        }
        let until = self.deny.get(c.bucket, &c.limit, now)?;
        let extra = u64::from(c.cost.max(1) - 1) + u64::from(c.reserve);
        let retry = until - now + extra * interval_us(&c.limit);
        Some(Decision::refuse(
            &c.limit,
            c.cost.max(1),
            Duration::from_micros(retry),
        ))
    }

    /// Caches Redis's refusal (`retry_us`) of a check of one charge alone.
    fn remember_refusal(&self, check: &Check<'_>, retry_us: u64, now: u64) {
        let Some(c) = check.alone() else {
            return;
        };
        // When one request conforms again: the delay less the extra cost.
        let one = retry_us.saturating_sub(u64::from(c.cost.max(1) - 1) * interval_us(&c.limit));
        if one > 0 && c.reserve == 0 {
            self.deny.put(c.bucket, &c.limit, now + one, now);
        }
    }

    /// Peeks at one bucket (the check script's `peek`).
    async fn eval_peek(
        self: &Arc<Self>,
        key: String,
        charge: &Charge,
    ) -> Result<(i64, i64), EvalError> {
        let limit = &charge.limit;
        let mut args = vec![
            "peek".to_owned(),
            self.script_now(),
            script_interval(limit).to_string(),
            limit.max().to_string(),
        ];
        if limit.period().is_calendar() {
            args.extend(bounds_args(&charge.period));
        }
        self.invoke(Script::Check, vec![key], args).await
    }

    /// Runs the check script once (see [`invoke`](Self::invoke)).
    async fn eval_check(self: &Arc<Self>, check: &Check<'_>) -> Result<Vec<i64>, EvalError> {
        let (owner, charges) = (check.owner, check.charges);
        let keys = charges
            .iter()
            .map(|c| charge_key(&self.prefix, owner, c.bucket))
            .chain(
                check
                    .leases
                    .iter()
                    .map(|l| lease_key(&self.prefix, owner, l.bucket)),
            )
            .collect();
        let mut args = Vec::with_capacity(charges.len() * 4 + check.leases.len() + 5);
        args.push("check".to_owned());
        args.push(self.script_now());
        args.push(charges.len().to_string());
        args.push(self.leases.member(check.lease_id));
        args.push(self.leases.ttl_us().to_string());
        for c in charges {
            let t = script_interval(&c.limit);
            args.extend([
                t.to_string(),
                c.limit.max().to_string(),
                c.reserve.to_string(),
                c.cost.max(1).to_string(),
            ]);
        }
        args.extend(check.leases.iter().map(|l| l.max.to_string()));
        for c in charges.iter().filter(|c| c.limit.period().is_calendar()) {
            args.extend(bounds_args(&c.period));
        }
        self.invoke(Script::Check, keys, args).await
    }

    /// Runs the settlement script once (see [`invoke`](Self::invoke)).
    async fn eval_settle(
        self: &Arc<Self>,
        owner: u64,
        adjustments: &[Adjustment],
    ) -> Result<Vec<i64>, EvalError> {
        let keys = adjustments
            .iter()
            .map(|a| charge_key(&self.prefix, owner, a.bucket))
            .collect();
        let mut args = Vec::with_capacity(adjustments.len() * 3 + 1);
        args.push(self.script_now());
        for a in adjustments {
            let t = script_interval(&a.limit);
            args.extend([
                t.to_string(),
                a.limit.max().to_string(),
                a.units.to_string(),
            ]);
        }
        for a in adjustments
            .iter()
            .filter(|a| a.limit.period().is_calendar())
        {
            args.extend(bounds_args(&a.period));
        }
        self.invoke(Script::Settle, keys, args).await
    }
}
