//! The fast branch, private to this backend: a check of one charge and
//! nothing else goes to governor's keyed limiter of its limit, whose state
//! lives in a [`KeyStore`] (governor's [`StateStore`], through
//! [`SharedStore`]). Peeks and settlements of such a charge find it here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{RateLimiter, StateStore};

use super::MemoryBackend;
use super::gcra::adjust;
use super::store::{Budget, IdentityHasher, SHARDS, Shard};
use super::sweep::retain_full;
use crate::backend::{Adjustment, BackendError, Charge, Decision};
use crate::limit::Limit;

type Limiter<C> = RateLimiter<Probe, SharedStore, C, StateInformationMiddleware>;

/// What the store is asked about one check: the bucket, and what governor's
/// key carries to the store on our behalf (governor hands its store only
/// the key): whether the caller is known, and the priority reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Probe {
    bucket: u64,
    known: bool,
    /// The reserve the request must leave, in nanoseconds of TAT (0: none).
    reserve_nanos: u64,
    /// The request's cost in nanoseconds of TAT (with a reserve only).
    cost_nanos: u64,
}
type LimiterMap<C> = HashMap<Limit, Arc<Entry<C>>, foldhash::fast::RandomState>;

/// Slots in the limiter table; limits beyond it (or beyond a probe run) go
/// to an overflow map behind a mutex.
const LIMITER_SLOTS: usize = 1024;
const LIMITER_PROBES: usize = 16;

/// One governor limiter per distinct [`Limit`], found without writing
/// shared memory: an append-only open-addressing table whose slots are set
/// once (under `grow`) and never change, so a lookup is plain loads — no
/// reference count, no lock. A lookup that meets an empty slot knows the
/// limit is not in the table (a slot is filled only when every slot
/// before it on the probe run is full); the rare miss takes the slow path,
/// which looks again under the lock.
pub(super) struct Limiters<C: Clock> {
    slots: Box<[OnceLock<Arc<Entry<C>>>]>,
    /// Limits that found no slot (a policy with hundreds of distinct
    /// custom limits): correct, a little slower.
    overflow: Mutex<LimiterMap<C>>,
    /// Serialises additions.
    grow: Mutex<()>,
}

impl<C: Clock> Limiters<C> {
    pub(super) fn new() -> Self {
        Limiters {
            slots: (0..LIMITER_SLOTS).map(|_| OnceLock::new()).collect(),
            overflow: Mutex::new(HashMap::default()),
            grow: Mutex::new(()),
        }
    }

    #[inline]
    fn probe_run(&self, limit: &Limit) -> impl Iterator<Item = &OnceLock<Arc<Entry<C>>>> {
        // A limit hashes to one word already mixed from its fields; one
        // multiplication spreads it (limits come from the operator's
        // policy, not from requests: no hashing against flooding needed).
        let mut word = IdentityHasher::default();
        limit.hash(&mut word);
        let h = (word.finish().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
        (0..LIMITER_PROBES).map(move |i| &self.slots[(h + i) % LIMITER_SLOTS])
    }

    /// The limiter of `limit`, if it is in the table (not the overflow).
    #[inline]
    fn get(&self, limit: &Limit) -> Option<&Arc<Entry<C>>> {
        for slot in self.probe_run(limit) {
            match slot.get() {
                Some(e) if e.limit == *limit => return Some(e),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }

    /// The limiter of `limit` in the overflow map, if it is there.
    fn get_overflow(&self, limit: &Limit) -> Option<Arc<Entry<C>>> {
        let overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        overflow.get(limit).cloned()
    }

    /// The limiter of `limit`, made if new (the slow path).
    #[cold]
    fn get_or_add(&self, limit: &Limit, make: impl FnOnce() -> Entry<C>) -> Arc<Entry<C>> {
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in self.probe_run(limit) {
            match slot.get() {
                Some(e) if e.limit == *limit => return Arc::clone(e),
                Some(_) => {}
                None => {
                    let e = Arc::new(make());
                    // Only additions set slots, and they hold `grow`.
                    let _ = slot.set(Arc::clone(&e));
                    return e;
                }
            }
        }
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(overflow.entry(*limit).or_insert_with(|| Arc::new(make())))
    }

    /// Calls `f` on every limiter without allocating (sweeps run often).
    pub(super) fn for_each(&self, mut f: impl FnMut(&Entry<C>)) {
        for e in self.slots.iter().filter_map(OnceLock::get) {
            f(e);
        }
        let overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        for e in overflow.values() {
            f(e);
        }
    }
}

/// One governor limiter and a handle on its store, for sweeping.
pub(super) struct Entry<C: Clock> {
    limit: Limit,
    limiter: Limiter<C>,
    pub(super) store: Arc<KeyStore>,
    /// Read after the limiter was made, so never before its own start:
    /// sweeps computed from it are conservative.
    pub(super) start: C::Instant,
    t: u64,
}

impl<C: Clock> Entry<C> {
    /// `now` in this limiter's time (nanoseconds since it was made): the
    /// time its TATs are kept in.
    pub(super) fn elapsed(&self, now: C::Instant) -> u64 {
        u64::from(now.duration_since(self.start))
    }

    /// Buckets whose TAT is at or below this are full again.
    pub(super) fn drop_below(&self, now: C::Instant) -> u64 {
        self.elapsed(now).saturating_sub(self.t)
    }
}

impl<C> MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A check of one charge and nothing else: governor's keyed limiter of
    /// the charge's limit (the fast branch; see [`check_now`](Self::check_now)).
    /// Undescribed (`describe` false), an allowed request's decision skips
    /// the remaining capacity's division.
    #[inline(always)]
    pub(super) fn check_one(
        &self,
        charge: &Charge,
        known: bool,
        describe: bool,
    ) -> Result<Decision, BackendError> {
        let n = NonZeroU32::new(charge.cost).unwrap_or(NonZeroU32::MIN);
        self.verdict_one(charge, n, known, describe)
            .decision(&charge.limit, n.get())
    }

    /// [`check_one`](Self::check_one) up to its [`Verdict`], out of line.
    /// `n`: the charge's cost, at least 1, as the decision reports it.
    #[inline(never)]
    fn verdict_one(&self, charge: &Charge, n: NonZeroU32, known: bool, describe: bool) -> Verdict {
        let inner = &*self.inner;
        let limit = &charge.limit;
        if n.get() > limit.max() {
            return Verdict::TooBig;
        }
        // Upkeep first, so that a sweep at the cap makes room for this key.
        self.maintain(false);
        let mut probe = Probe {
            bucket: charge.bucket,
            known,
            reserve_nanos: 0,
            cost_nanos: 0,
        };
        if charge.reserve > 0 {
            std::hint::cold_path();
            if u64::from(n.get()) + u64::from(charge.reserve) > u64::from(limit.max()) {
                // Only the reserve (or less) could ever be left for it.
                return Verdict::Reserved;
            }
            probe.reserve_nanos = u64::from(charge.reserve) * limit.emission_interval_nanos();
            probe.cost_nanos = limit.emission_interval_nanos() * u64::from(n.get());
        }
        match inner.limiters.get(limit) {
            Some(e) => Self::decide(e, &probe, n, describe),
            None => {
                std::hint::cold_path();
                Self::decide(&self.add_limiter(limit), &probe, n, describe)
            }
        }
    }

    /// The limiter and TAT of a charge a check of it alone keeps (none:
    /// it lives in its owner's shard, or nowhere yet).
    pub(super) fn alone(&self, charge: &Charge) -> Option<(Arc<Entry<C>>, u64)> {
        let e = self.limiter_of(&charge.limit)?;
        let tat = e.store.get(charge.bucket)?;
        Some((e, tat))
    }

    /// The limiter a limit's checks alone use, if one was made (in the
    /// table, or in its overflow).
    fn limiter_of(&self, limit: &Limit) -> Option<Arc<Entry<C>>> {
        let limiters = &self.inner.limiters;
        match limiters.get(limit) {
            Some(e) => Some(Arc::clone(e)),
            None => limiters.get_overflow(limit),
        }
    }

    /// Settles a charge that a check of it alone keeps (governor's limiter
    /// of its limit), if it is tracked there.
    pub(super) fn settle_alone(&self, a: &Adjustment) -> Option<Decision> {
        let inner = &*self.inner;
        let e = self.limiter_of(&a.limit)?;
        let mut guard = e
            .store
            .shard(a.bucket)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.get(a.bucket)?;
        let now = e.elapsed(inner.clock.now());
        Some(adjust(&mut guard, a, now, &inner.budget))
    }

    /// Makes the limiter of a limit seen for the first time.
    #[cold]
    fn add_limiter(&self, limit: &Limit) -> Arc<Entry<C>> {
        let inner = &*self.inner;
        inner.limiters.get_or_add(limit, || {
            let store = Arc::new(KeyStore::new(Arc::clone(&inner.budget)));
            let limiter = Limiter::new(
                limit.to_quota(),
                SharedStore(Arc::clone(&store)),
                inner.clock.clone(),
            );
            Entry {
                limit: *limit,
                limiter,
                store,
                start: inner.clock.now(),
                t: limit.emission_interval_nanos(),
            }
        })
    }

    #[inline(always)]
    fn decide(e: &Entry<C>, probe: &Probe, n: NonZeroU32, describe: bool) -> Verdict {
        // A single cell takes governor's faster path.
        let outcome = if n == NonZeroU32::MIN {
            Ok(e.limiter.check_key(probe))
        } else {
            e.limiter.check_key_n(probe, n)
        };
        match outcome {
            Ok(Ok(_)) if !describe => Verdict::Undescribed,
            Ok(Ok(snapshot)) => Verdict::Allowed(snapshot.remaining_burst_capacity()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(e.limiter.clock().now());
                // governor's wait is made from its `u64` nanoseconds: it
                // fits, and goes back to the same `Duration`.
                Verdict::Refused(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX))
            }
            Err(_) => Verdict::TooBig,
        }
    }
}

/// What a check of one charge found, small enough to come back in
/// registers: the caller, inlined into the request path, builds the
/// [`Decision`] where it is used. (A decision written out here and copied
/// there stalled the copy's loads, which each spanned several of the
/// stores that wrote it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Allowed, leaving this many requests' capacity.
    Allowed(u32),
    /// Allowed, and no one asked how much is left.
    Undescribed,
    /// Refused: conforms after this many nanoseconds.
    Refused(u64),
    /// Refused: only the priority reserve, or less, could ever be left.
    Reserved,
    /// The cost is above the limit's burst.
    TooBig,
}

impl Verdict {
    /// The decision on a request of `n` units of `limit`.
    #[inline(always)]
    fn decision(self, limit: &Limit, n: u32) -> Result<Decision, BackendError> {
        match self {
            Verdict::Undescribed => Ok(Decision::allow_undescribed(limit)),
            Verdict::Allowed(remaining) => Ok(Decision::allow(limit, remaining)),
            Verdict::Refused(wait) => Ok(Decision::refuse(limit, n, Duration::from_nanos(wait))),
            Verdict::Reserved => {
                std::hint::cold_path();
                Ok(Decision::refuse(limit, n, limit.per()))
            }
            Verdict::TooBig => {
                std::hint::cold_path();
                Err(BackendError::CostExceedsLimit {
                    cost: n,
                    max: limit.max(),
                })
            }
        }
    }
}

/// 64 mutex-guarded shards of `bucket → TAT`, charged against a shared key
/// budget, with one overflow state for guests that arrive when the budget
/// is spent.
pub(super) struct KeyStore {
    shards: Box<[Shard]>,
    overflow: Mutex<Option<Nanos>>,
    budget: Arc<Budget>,
}

impl KeyStore {
    fn new(budget: Arc<Budget>) -> Self {
        KeyStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            overflow: Mutex::new(None),
            budget,
        }
    }

    #[inline]
    fn shard(&self, key: u64) -> &Shard {
        // Middle bits: the table itself uses the low bits and the top seven.
        &self.shards[(key >> 32) as usize % SHARDS]
    }

    fn get(&self, key: u64) -> Option<u64> {
        self.shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
    }

    pub(super) fn retain_shard(&self, shard: usize, drop_below: u64) {
        retain_full(&self.shards[shard], drop_below, 0, &self.budget);
    }

    pub(super) fn retain_overflow(&self, drop_below: u64) {
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        if overflow.is_some_and(|tat| u64::from(tat) <= drop_below) {
            *overflow = None;
        }
    }
}

/// The store as governor sees it.
struct SharedStore(Arc<KeyStore>);

impl StateStore for SharedStore {
    type Key = Probe;

    #[inline(always)]
    fn measure_and_replace<T, F, E>(&self, probe: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let store = &*self.0;
        let key = probe.bucket;
        let mut guard = store
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let maps = &mut *guard;
        // A priority reserve: the request must conform as if the reserve
        // were taken too; then it is counted normally. Both under the shard
        // lock, so concurrent requests never eat into the reserve.
        if probe.reserve_nanos > 0 {
            let tat = match maps.get(key) {
                Some(tat) => tat,
                // A new key's TAT is now: recover it from governor's answer.
                None => u64::from(f(None)?.1).saturating_sub(probe.cost_nanos),
            };
            f(Some(Nanos::from(tat + probe.reserve_nanos)))?;
        }
        let (mine, other) = if probe.known {
            (&mut maps.known, &mut maps.guests)
        } else {
            (&mut maps.guests, &mut maps.known)
        };
        if let Some(tat) = mine.get_mut(&key) {
            let (t, next) = f(Some(Nanos::from(*tat)))?;
            *tat = next.into();
            return Ok(t);
        }
        if let Some(&tat) = other.get(&key) {
            // The caller changed class (a guest key was listed): move it.
            let (t, next) = f(Some(Nanos::from(tat)))?;
            other.remove(&key);
            mine.insert(key, next.into());
            return Ok(t);
        }
        // A key not yet tracked. A refusal writes nothing.
        let (t, next) = f(None)?;
        if store.budget.try_acquire() {
            crate::telemetry::tracked_keys(1.0);
            mine.insert(key, next.into());
            return Ok(t);
        }
        if probe.known {
            // At the cap, a guest gives way to a known caller: one from this
            // shard if there is one, else the table grows past the cap, up
            // to twice it.
            if let Some(victim) = maps.guests.any_key(key) {
                maps.guests.remove(&victim);
                maps.known.insert(key, next.into());
                return Ok(t);
            }
            if store.budget.force_acquire() {
                crate::telemetry::tracked_keys(1.0);
                maps.known.insert(key, next.into());
                return Ok(t);
            }
        }
        drop(guard);
        // At the cap: count the request in the shared overflow bucket.
        let mut overflow = store
            .overflow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (t, next) = f(*overflow)?;
        *overflow = Some(next);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::LIMITER_SLOTS;
    use crate::backend::{Charge, MemoryBackend};
    use crate::limit::{Limit, PeriodBounds};

    /// More distinct limits than the table has slots (and limits whose
    /// words differ by one interval): each is found again, none shares
    /// another's buckets, every count is exact.
    #[test]
    fn every_distinct_limit_has_its_own_limiter() {
        let backend = MemoryBackend::builder()
            .clock(FakeRelativeClock::default())
            .build();
        let limits: Vec<Limit> = (1..=(LIMITER_SLOTS as u32 * 3))
            .map(|i| Limit::new(2.try_into().unwrap(), Duration::from_secs(u64::from(i))).unwrap())
            .collect();
        let charge = |limit: Limit| Charge {
            bucket: 7,
            limit,
            cost: 1,
            reserve: 0,
            period: PeriodBounds::ROLLING,
        };
        for round in 0..3 {
            for l in &limits {
                let d = backend.check_one(&charge(*l), true, true).unwrap();
                assert_eq!(d.allowed, round < 2, "{l:?} in round {round}");
            }
        }
    }
}
