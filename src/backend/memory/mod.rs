//! The in-memory backend: governor's GCRA over a bounded, sharded key store.
//!
//! - this file: [`MemoryBackend`], its builder, and its public entry points
//!   (`check_now`, `peek_now`, `settle_now`, `release_now`, `peek_lease_now`);
//! - `alone`: the fast branch, a check of one charge and nothing else, on
//!   governor's keyed limiter of its limit;
//! - `store`: the owner-sharded store of every other check, and the key
//!   budget both stores are charged against;
//! - `gcra`: the one GCRA step in Rust (decisions, settlements, peeks);
//! - `sweep`: upkeep, the reaper thread, and the sweeps that reclaim idle
//!   keys.

mod alone;
mod batch;
mod calendar;
mod flat;
mod gcra;
mod store;
mod sweep;

use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};

use self::alone::Limiters;
use self::gcra::{adjust, peeked};
use self::store::{Budget, MultiStore, SHARDS, ShardMaps};
use self::sweep::MIN_SWEEP;
use super::{
    Adjustment, Backend, BackendError, Charge, Check, Decision, Lease, LeaseState, MAX_LEASES,
    decide,
};
use crate::decision::Binder;
use crate::limit::Limit;
use crate::limit::MAX_LIMITS;

/// The keyed, in-process backend (the default).
///
/// State lives in governor rate limiters, one per distinct [`Limit`], keyed
/// by its charge's bucket ([`Charge::bucket`](super::Charge::bucket), a 64-bit hash) in a sharded table: 16 bytes of
/// entry per tracked key, about 34 bytes with the table's slack (measured
/// by `tests/memory.rs`). Checks are synchronous; the returned future is
/// ready at once, and nothing is allocated per request once a key is
/// tracked.
///
/// # Memory stays bounded
///
/// A key whose bucket is full again is indistinguishable from a key never
/// seen, so dropping it loses nothing. Such idle keys are reclaimed by the
/// requests themselves and, when traffic stops, by one `tierlimit-reaper`
/// thread per process that runs the same upkeep four times a second
/// (holding only a weak reference: dropping the layer drops everything).
///
/// - **Steadily**: one of 64 shards is swept every
///   [`idle_sweep_interval`](MemoryBackendBuilder::idle_sweep_interval) / 64
///   (default: the whole table once a minute, a few microseconds of work
///   at a time).
/// - **On growth**: when the number of tracked keys doubles since the last
///   sweep, the request that notices sweeps the whole table.
/// - **At the cap** (default 1,000,000 keys,
///   [`max_keys`](MemoryBackendBuilder::max_keys)), callers are served by
///   class ([`Check::known`](super::Check::known)):
///   - a *known* caller (a listed key, a key the resolver gave a tier, an
///     identity from an auth layer) always gets its own bucket and its full
///     limit: a guest's state in the same shard gives way to it, or, with
///     no guest left there, the table grows past the cap up to a hard bound
///     of twice the cap;
///   - a *guest* (an unknown key under `unknown_key = "<tier>"`, an
///     anonymous caller keyed by IP) not yet tracked is not added. It is
///     limited through one shared *overflow* bucket per limit, which every
///     untracked guest of that limit shares, so nobody is let through
///     unlimited and a key spray locks out no customer, only other
///     newcomers without a key the policy knows. Sweeps (at most one per
///     [`min_sweep_interval`](MemoryBackendBuilder::min_sweep_interval))
///     make room again.
///
/// Memory is bounded by twice `max_keys` entries at all times (about 68
/// bytes per key each, measured by `tests/memory.rs`).
///
/// ```
/// use governor::clock::FakeRelativeClock;
/// use tierlimit::MemoryBackend;
///
/// let clock = FakeRelativeClock::default();
/// let backend = MemoryBackend::builder().clock(clock.clone()).max_keys(10_000).build();
/// assert_eq!(backend.tracked_keys(), 0);
/// ```
pub struct MemoryBackend<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C: Clock> Clone for MemoryBackend<C> {
    fn clone(&self) -> Self {
        MemoryBackend {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<C: Clock> {
    clock: C,
    start: C::Instant,
    /// Read on every check without writing shared memory.
    limiters: Limiters<C>,
    /// Buckets of requests checked against several limits at once.
    multi: MultiStore,
    budget: Arc<Budget>,
    sweep: Mutex<()>,
    last_full_sweep: AtomicU64,
    min_sweep_interval: u64,
    next_step_at: AtomicU64,
    step_interval: u64,
    cursor: AtomicUsize,
}

impl<C: Clock> fmt::Debug for MemoryBackend<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field(
                "tracked_keys",
                &self.inner.budget.tracked.load(Ordering::Relaxed),
            )
            .field("max_keys", &self.inner.budget.cap)
            .finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// A backend on the system clock with the default cap.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a backend.
    pub fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder {
            clock: DefaultClock::default(),
            max_keys: 1_000_000,
            min_sweep_interval: Duration::from_secs(1),
            idle_sweep_interval: Duration::from_secs(60),
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// Configures a [`MemoryBackend`].
#[must_use]
#[derive(Debug)]
pub struct MemoryBackendBuilder<C = DefaultClock> {
    clock: C,
    max_keys: usize,
    min_sweep_interval: Duration,
    idle_sweep_interval: Duration,
}

impl<C> MemoryBackendBuilder<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Uses another clock: governor's `FakeRelativeClock` makes tests exact
    /// and instant.
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryBackendBuilder<C2> {
        MemoryBackendBuilder {
            clock,
            max_keys: self.max_keys,
            min_sweep_interval: self.min_sweep_interval,
            idle_sweep_interval: self.idle_sweep_interval,
        }
    }

    /// The most keys tracked at once, across all limits (default
    /// 1,000,000). See [`MemoryBackend`] for what happens at the cap.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    /// At the cap, the least time between two whole-table sweeps (default
    /// one second), so that a full table is not swept on every request.
    pub fn min_sweep_interval(mut self, interval: Duration) -> Self {
        self.min_sweep_interval = interval;
        self
    }

    /// How long a steady sweep of the whole table takes, one shard at a
    /// time (default one minute).
    pub fn idle_sweep_interval(mut self, interval: Duration) -> Self {
        self.idle_sweep_interval = interval;
        self
    }

    /// Builds the backend.
    pub fn build(self) -> MemoryBackend<C> {
        let start = self.clock.now();
        let step_interval = (self.idle_sweep_interval.as_nanos() / SHARDS as u128).max(1) as u64;
        let backend = MemoryBackend {
            inner: Arc::new(Inner {
                clock: self.clock,
                start,
                limiters: Limiters::new(),
                multi: MultiStore::new(),
                budget: Arc::new(Budget {
                    tracked: AtomicUsize::new(0),
                    cap: self.max_keys,
                    next_sweep: AtomicUsize::new(MIN_SWEEP.min(self.max_keys)),
                }),
                sweep: Mutex::new(()),
                last_full_sweep: AtomicU64::new(0),
                min_sweep_interval: self.min_sweep_interval.as_nanos() as u64,
                next_step_at: AtomicU64::new(step_interval),
                step_interval,
                cursor: AtomicUsize::new(0),
            }),
        };
        sweep::reap(&backend.inner);
        backend
    }
}

impl<C> MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// One charge's capacity now, counting nothing (see [`Backend::peek`]):
    /// where a check of it alone keeps it (governor's limiter of its
    /// limit), else in its owner's shard.
    pub fn peek_now(&self, owner: u64, charge: &Charge) -> Decision {
        if charge.limit.period().is_calendar() {
            let maps = self.inner.multi.shard(owner).lock();
            let maps = maps.unwrap_or_else(PoisonError::into_inner);
            let used = calendar::used(&maps, charge.bucket, &charge.period);
            return calendar::peeked(&charge.limit, &charge.period, used);
        }
        if let Some((e, tat)) = self.alone(charge) {
            return peeked(&charge.limit, Some(tat), e.elapsed(self.inner.clock.now()));
        }
        let now = self.elapsed();
        let tat = self
            .inner
            .multi
            .shard(owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(charge.bucket);
        peeked(&charge.limit, tat, now)
    }

    /// Checks one request synchronously, all or nothing (see
    /// [`Backend::check`]).
    ///
    /// A check of one charge and nothing else (no leases, no tokens) takes
    /// governor's keyed limiter of its limit: the fast branch, private to
    /// this backend (its peeks and settlements find it there).
    ///
    /// Every charge of one owner lives in one of 64 shards, so the check
    /// takes one lock: it reads every charge's state, decides, and writes
    /// all of them or none. The arithmetic is governor's GCRA, the same as
    /// the single-limit path and the Redis script (the conformance suite
    /// runs the same cases through all of them).
    #[inline(always)]
    pub fn check_now(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        if let Some(charge) = check.alone() {
            return self.check_one(charge, check.known, check.describe);
        }
        self.check_together(check)
    }

    /// A check of several charges, or of charges with leases or tokens:
    /// under the owner's one shard lock.
    #[inline(never)]
    fn check_together(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let charges = &check.charges[..check.charges.len().min(MAX_LIMITS)];
        fits(charges)?;
        self.maintain(false);
        let now = self.elapsed();
        // The one lock of the check, held until it returns: read, decide,
        // then write every charge or none.
        let mut guard = inner
            .multi
            .shard(check.owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(self.check_locked(&mut guard, check, now))
    }

    /// A several-limit check at `now` in its owner's shard, locked.
    fn check_locked(&self, maps: &mut ShardMaps, check: &Check<'_>, now: u64) -> Decision {
        let inner = &*self.inner;
        let store = &inner.multi;
        let charges = &check.charges[..check.charges.len().min(MAX_LIMITS)];
        let mut read = store.read(maps, charges, check.known, &inner.budget);
        let mut refused = false;
        for (i, c) in charges.iter().enumerate() {
            refused |= if c.limit.period().is_calendar() {
                store.latest.saw(c.period.now);
                !calendar::fits(c, read.used(i))
            } else {
                read.gcra(i, c, now).retry.is_some()
            };
        }
        // The leases, once every charge admits the request.
        let leases = &check.leases[..check.leases.len().min(MAX_LEASES)];
        let lease = if refused {
            None
        } else {
            maps.lease_state(leases)
        };
        let lease_refused = lease.is_some_and(|l| l.refused);
        let mut binder = Binder::new(charges.len(), usize::from(check.tokens), check.split);
        if refused || lease_refused {
            read.refuse(&mut binder, charges, now, lease_refused, &inner.budget);
        } else {
            maps.take_leases(leases);
            read.commit(&mut binder, maps, charges, now, check.known);
        }
        decide(binder.finish(), lease)
    }

    /// Releases a request's leases (see [`Backend::release`]): under the
    /// owner's shard lock, each bucket holds one lease fewer.
    pub fn release_now(&self, owner: u64, leases: &[Lease]) {
        let mut guard = self
            .inner
            .multi
            .shard(owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for l in &leases[..leases.len().min(MAX_LEASES)] {
            if let Some(n) = guard.leases.get_mut(&l.bucket) {
                *n -= 1;
                if *n == 0 {
                    guard.leases.remove(&l.bucket);
                }
            }
        }
    }

    /// Leases held in a bucket now.
    pub fn leases_held(&self, owner: u64, lease: &Lease) -> u32 {
        self.inner
            .multi
            .shard(owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .leases
            .get(&lease.bucket)
            .map_or(0, |&n| n as u32)
    }

    /// One concurrency limit's state now (see [`Backend::peek_lease`]).
    pub fn peek_lease_now(&self, owner: u64, lease: &Lease) -> Decision {
        let held = self.leases_held(owner, lease);
        Decision::leases_only(LeaseState {
            limit: lease.max,
            remaining: lease.max.saturating_sub(held),
            refused: false,
            per_account: lease.per_account,
        })
    }

    /// Settles charges after the fact (see [`Backend::settle`]): under the
    /// owner's shard lock, each bucket takes its debt or gives back its
    /// refund; a bucket full again is dropped. A charge checked alone is
    /// settled where that check keeps it.
    pub fn settle_now(&self, owner: u64, adjustments: &[Adjustment]) -> Decision {
        let inner = &*self.inner;
        if let [a] = adjustments
            && !a.limit.period().is_calendar()
            && let Some(d) = self.settle_alone(a)
        {
            return d;
        }
        let now = self.elapsed();
        let mut guard = inner
            .multi
            .shard(owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut states = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
        let adjustments = &adjustments[..adjustments.len().min(MAX_LIMITS)];
        for (i, a) in adjustments.iter().enumerate() {
            states[i] = if a.limit.period().is_calendar() {
                calendar::adjust(&mut guard, a, &inner.budget)
            } else {
                adjust(&mut guard, a, now, &inner.budget)
            };
        }
        Decision::binding(states[..adjustments.len()].iter().copied())
            .unwrap_or_else(|| Decision::allow(&Limit::per_second(1), 1))
    }

    fn elapsed(&self) -> u64 {
        u64::from(self.inner.clock.now().duration_since(self.inner.start))
    }

    /// Reclaims every key whose bucket is full again, now. This happens by
    /// itself as requests come; call it to reclaim at once.
    pub fn sweep_now(&self) {
        self.full_sweep(true);
    }

    /// How many keys are tracked now, across all limits.
    pub fn tracked_keys(&self) -> usize {
        self.inner.budget.tracked.load(Ordering::Relaxed)
    }

    /// The clock this backend reads.
    pub fn clock(&self) -> &C {
        &self.inner.clock
    }
}

impl<C> Backend for MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    type Future = Ready<Result<Decision, BackendError>>;

    /// Inlined down to the branches out of line (`check_one`'s
    /// `verdict_one`, or `check_together`): the caller sees the ready
    /// future made and takes its answer where it is written, and a check
    /// of one charge builds its decision there from a verdict that came
    /// back in registers.
    #[inline(always)]
    fn check(&self, check: &Check<'_>) -> Self::Future {
        ready(self.check_now(check))
    }

    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future {
        ready(Ok(self.peek_now(owner, charge)))
    }

    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future {
        ready(Ok(self.settle_now(owner, adjustments)))
    }

    fn release(&self, owner: u64, leases: &[Lease], _lease_id: u64) {
        self.release_now(owner, leases);
    }

    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future {
        ready(Ok(self.peek_lease_now(owner, lease)))
    }
}

/// Every charge's cost within its limit's burst, or the error that says
/// which is not (it could never succeed).
fn fits(charges: &[Charge]) -> Result<(), BackendError> {
    match charges.iter().find(|c| c.cost > c.limit.max()) {
        Some(c) => Err(BackendError::CostExceedsLimit {
            cost: c.cost,
            max: c.limit.max(),
        }),
        None => Ok(()),
    }
}
