//! The in-memory backend: governor's GCRA over a bounded, sharded key store.

use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{RateLimiter, StateStore};

use super::{
    Adjustment, Backend, BackendError, Charge, Check, Decision, Lease, LeaseState, MAX_LEASES,
    decide,
};
use crate::decision::Binder;
use crate::limit::Limit;
use crate::limit::MAX_LIMITS;

const SHARDS: usize = 64;

/// A request looks at the clock for the steady sweep once in this many
/// requests on its thread.
const STEP_CHECK_EVERY: u8 = 16;

/// Whether this request on this thread looks at the clock for the steady
/// sweep (a thread-local count: nothing shared is written).
#[inline]
fn step_check_due() -> bool {
    thread_local! {
        static COUNT: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    }
    COUNT
        .try_with(|c| {
            let n = c.get().wrapping_add(1) % STEP_CHECK_EVERY;
            c.set(n);
            n == 0
        })
        .unwrap_or(true)
}

/// Below this many tracked keys, growth triggers no sweep.
const MIN_SWEEP: usize = 4096;

/// The keyed, in-process backend (the default).
///
/// State lives in governor rate limiters, one per distinct [`Limit`], keyed
/// by [`Subject::bucket`] (a 64-bit hash) in a sharded table: 16 bytes of
/// entry per tracked key, about 36 bytes with the table's slack (measured
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
///   class ([`Subject::known`]):
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
/// Memory is bounded by twice `max_keys` entries at all times (about 72
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
struct Limiters<C: Clock> {
    slots: Box<[OnceLock<Arc<Entry<C>>>]>,
    hasher: foldhash::fast::FixedState,
    /// Limits that found no slot (a policy with hundreds of distinct
    /// custom limits): correct, a little slower.
    overflow: Mutex<LimiterMap<C>>,
    /// Serialises additions.
    grow: Mutex<()>,
}

impl<C: Clock> Limiters<C> {
    fn new() -> Self {
        Limiters {
            slots: (0..LIMITER_SLOTS).map(|_| OnceLock::new()).collect(),
            hasher: foldhash::fast::FixedState::with_seed(0x7469_6572),
            overflow: Mutex::new(HashMap::default()),
            grow: Mutex::new(()),
        }
    }

    #[inline]
    fn probe_run(&self, limit: &Limit) -> impl Iterator<Item = &OnceLock<Arc<Entry<C>>>> {
        let h = self.hasher.hash_one(limit) as usize;
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
    fn for_each(&self, mut f: impl FnMut(&Entry<C>)) {
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
struct Entry<C: Clock> {
    limit: Limit,
    limiter: Limiter<C>,
    store: Arc<KeyStore>,
    /// Read after the limiter was made, so never before its own start:
    /// sweeps computed from it are conservative.
    start: C::Instant,
    t: u64,
}

impl<C: Clock> Entry<C> {
    /// Buckets whose TAT is at or below this are full again.
    fn drop_below(&self, now: C::Instant) -> u64 {
        u64::from(now.duration_since(self.start)).saturating_sub(self.t)
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

struct Budget {
    tracked: AtomicUsize,
    cap: usize,
    next_sweep: AtomicUsize,
}

impl Budget {
    #[inline]
    fn try_acquire(&self) -> bool {
        self.tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// A known caller's slot past the cap, up to twice it (the hard bound).
    #[cold]
    fn force_acquire(&self) -> bool {
        let hard = self.cap.saturating_mul(2);
        self.tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < hard).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.tracked.fetch_sub(n, Ordering::Relaxed);
        crate::telemetry::tracked_keys(-(n as f64));
    }
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
        reaper::register(Box::new(Arc::downgrade(&backend.inner)));
        backend
    }
}

impl<C> reaper::Reap for std::sync::Weak<Inner<C>>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn reap(&self) -> bool {
        match self.upgrade() {
            Some(inner) => {
                MemoryBackend { inner }.maintain(true);
                true
            }
            None => false,
        }
    }
}

/// Idle state is reclaimed even when no request comes: one thread per
/// process (started with the first backend) runs every live backend's
/// upkeep four times a second, the same time-gated step a request runs,
/// and forgets backends that were dropped.
mod reaper {
    use std::sync::{Mutex, Once, PoisonError};
    use std::time::Duration;

    pub(super) trait Reap: Send {
        /// Runs the upkeep; `false` once the backend is gone.
        fn reap(&self) -> bool;
    }

    static LIVE: Mutex<Vec<Box<dyn Reap>>> = Mutex::new(Vec::new());
    static START: Once = Once::new();
    const TICK: Duration = Duration::from_millis(250);

    pub(super) fn register(backend: Box<dyn Reap>) {
        LIVE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(backend);
        START.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("tierlimit-reaper".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(TICK);
                        LIVE.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .retain(|b| b.reap());
                    }
                });
            if let Err(e) = spawned {
                // Requests still reclaim state as they come.
                tracing::warn!(error = %e, "tierlimit: no reaper thread; idle state is reclaimed by requests only");
            }
        });
    }
}

impl<C> MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A check of one charge and nothing else: governor's keyed limiter of
    /// the charge's limit (the fast branch; see [`check_now`](Self::check_now)).
    #[inline]
    fn check_one(&self, charge: &Charge, known: bool) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let limit = &charge.limit;
        let n = NonZeroU32::new(charge.cost).unwrap_or(NonZeroU32::MIN);
        if n.get() > limit.max() {
            return Err(BackendError::CostExceedsLimit {
                cost: n.get(),
                max: limit.max(),
            });
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
            if u64::from(n.get()) + u64::from(charge.reserve) > u64::from(limit.max()) {
                // Only the reserve (or less) could ever be left for it.
                return Ok(Decision::refuse(limit, n.get(), limit.per()));
            }
            probe.reserve_nanos = u64::from(charge.reserve) * limit.emission_interval_nanos();
            probe.cost_nanos = limit.emission_interval_nanos() * u64::from(n.get());
        }
        match inner.limiters.get(limit) {
            Some(e) => Self::decide(e, &probe, n, limit),
            None => Self::decide(&self.add_limiter(limit), &probe, n, limit),
        }
    }

    /// One charge's capacity now, counting nothing (see [`Backend::peek`]):
    /// where a check of it alone keeps it (governor's limiter of its
    /// limit), else in its owner's shard.
    pub fn peek_now(&self, owner: u64, charge: &Charge) -> Decision {
        if let Some((e, tat)) = self.alone(charge) {
            let now = u64::from(self.inner.clock.now().duration_since(e.start));
            return peeked(&charge.limit, Some(tat), now);
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

    /// The limiter and TAT of a charge a check of it alone keeps (none:
    /// it lives in its owner's shard, or nowhere yet).
    fn alone(&self, charge: &Charge) -> Option<(Arc<Entry<C>>, u64)> {
        let inner = &*self.inner;
        let e = match inner.limiters.get(&charge.limit) {
            Some(e) => Arc::clone(e),
            None => inner.limiters.get_overflow(&charge.limit)?,
        };
        let tat = e.store.get(charge.bucket)?;
        Some((e, tat))
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
    pub fn check_now(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        if let [charge] = check.charges
            && check.leases.is_empty()
            && check.tokens == 0
        {
            return self.check_one(charge, check.known);
        }
        let inner = &*self.inner;
        let charges = &check.charges[..check.charges.len().min(MAX_LIMITS)];
        for c in charges {
            if c.cost > c.limit.max() {
                return Err(BackendError::CostExceedsLimit {
                    cost: c.cost,
                    max: c.limit.max(),
                });
            }
        }
        self.maintain(false);
        let now = self.elapsed();
        let store = &inner.multi;
        let mut guard = store
            .shard(check.owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let maps = &mut *guard;
        let mut overflow = None;
        // Each charge's state: its TAT, and where it lives.
        let mut slots = [Slot::Tracked(0); MAX_LIMITS];
        let mut acquired = 0usize;
        // Guests of this shard that may give way to a known caller at the
        // hard bound (one per new bucket).
        let mut spare_guests = maps.guests.len();
        for (i, c) in charges.iter().enumerate() {
            slots[i] = match maps.get(c.bucket) {
                Some(tat) => Slot::Tracked(tat),
                None if inner.budget.try_acquire() => {
                    acquired += 1;
                    Slot::New
                }
                None if check.known && inner.budget.force_acquire() => {
                    acquired += 1;
                    Slot::New
                }
                None if check.known && spare_guests > 0 => {
                    spare_guests -= 1;
                    Slot::Evict
                }
                None => {
                    let map = overflow.get_or_insert_with(|| {
                        store
                            .overflow
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                    });
                    Slot::Overflow(map.get(&(i as u8, c.limit)).copied())
                }
            };
        }
        let gcra = |i: usize, c: &Charge| -> Gcra {
            let tat = slots[i].tat().unwrap_or(now);
            Gcra::new(&c.limit, c.cost.max(1), c.reserve, tat, now)
        };
        let mut refused = false;
        for (i, c) in charges.iter().enumerate() {
            refused |= gcra(i, c).retry.is_some();
        }
        // The leases, once every charge admits the request.
        let leases = &check.leases[..check.leases.len().min(MAX_LEASES)];
        let lease = if refused {
            None
        } else {
            LeaseState::binding(leases.iter().map(|l| {
                let held = maps.leases.get(&l.bucket).map_or(0, |&n| n as u32);
                LeaseState {
                    limit: l.max,
                    remaining: l.max.saturating_sub(held).saturating_sub(1),
                    refused: held >= l.max,
                    per_account: l.per_account,
                }
            }))
        };
        let lease_refused = lease.is_some_and(|l| l.refused);
        let mut binder = Binder::new(charges.len(), usize::from(check.tokens));
        if refused || lease_refused {
            if acquired > 0 {
                inner.budget.tracked.fetch_sub(acquired, Ordering::Relaxed);
            }
            for (i, c) in charges.iter().enumerate() {
                let d = if lease_refused {
                    // Every charge admits it: report each one's capacity
                    // now, untouched.
                    Decision::allow(&c.limit, capacity_at(&c.limit, slots[i].tat(), now))
                } else {
                    gcra(i, c).decision(&c.limit, c.cost.max(1))
                };
                binder.push(i, d);
            }
            return Ok(decide(binder.finish(), lease));
        }
        for l in leases {
            *maps.leases.entry(l.bucket).or_insert(0) += 1;
        }
        if acquired > 0 {
            crate::telemetry::tracked_keys(acquired as f64);
        }
        for (i, c) in charges.iter().enumerate() {
            let g = gcra(i, c);
            binder.push(i, g.decision(&c.limit, c.cost.max(1)));
            let next = g.next;
            match slots[i] {
                Slot::Tracked(_) => maps.set(c.bucket, next, check.known),
                Slot::New => {
                    maps.table(check.known).insert(c.bucket, next);
                }
                Slot::Evict => {
                    // At the hard bound: a guest of this shard gives way
                    // (counted when the slot was chosen, so one is there).
                    if let Some(&victim) = maps.guests.keys().next() {
                        maps.guests.remove(&victim);
                    }
                    maps.known.insert(c.bucket, next);
                }
                Slot::Overflow(_) => {
                    if let Some(map) = overflow.as_mut() {
                        map.insert((i as u8, c.limit), next);
                    }
                }
            }
        }
        Ok(decide(binder.finish(), lease))
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
            states[i] = adjust(&mut guard, a, now, &inner.budget);
        }
        Decision::binding(states[..adjustments.len()].iter().copied())
            .unwrap_or_else(|| Decision::allow(&Limit::per_second(1), 1))
    }

    /// Settles a charge that a check of it alone keeps (governor's limiter
    /// of its limit), if it is tracked there.
    fn settle_alone(&self, a: &Adjustment) -> Option<Decision> {
        let inner = &*self.inner;
        let e = match inner.limiters.get(&a.limit) {
            Some(e) => Arc::clone(e),
            None => inner.limiters.get_overflow(&a.limit)?,
        };
        let mut guard = e
            .store
            .shard(a.bucket)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.get(a.bucket)?;
        let now = u64::from(inner.clock.now().duration_since(e.start));
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

    #[inline]
    fn decide(
        e: &Entry<C>,
        probe: &Probe,
        n: NonZeroU32,
        limit: &Limit,
    ) -> Result<Decision, BackendError> {
        // A single cell takes governor's faster path.
        let outcome = if n == NonZeroU32::MIN {
            Ok(e.limiter.check_key(probe))
        } else {
            e.limiter.check_key_n(probe, n)
        };
        match outcome {
            Ok(Ok(snapshot)) => Ok(Decision::allow(limit, snapshot.remaining_burst_capacity())),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(e.limiter.clock().now());
                Ok(Decision::refuse(limit, n.get(), wait))
            }
            Err(_) => Err(BackendError::CostExceedsLimit {
                cost: n.get(),
                max: limit.max(),
            }),
        }
    }

    /// The per-request upkeep: a whole sweep when the table has grown, and
    /// a steady sweep step when one is due. A request looks at the clock
    /// for steps only once in [`STEP_CHECK_EVERY`] on its thread (a clock
    /// read costs more than the rest of the upkeep); a late look catches up
    /// on every step missed, and the reaper looks on every tick.
    #[inline]
    fn maintain(&self, every_time: bool) {
        let inner = &*self.inner;
        let budget = &inner.budget;
        if budget.tracked.load(Ordering::Relaxed) >= budget.next_sweep.load(Ordering::Relaxed) {
            self.full_sweep(false);
            return;
        }
        if !every_time && !step_check_due() {
            return;
        }
        let now = self.elapsed();
        let due = inner.next_step_at.load(Ordering::Relaxed);
        if now >= due
            && inner
                .next_step_at
                .compare_exchange(
                    due,
                    now + inner.step_interval,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            // Catch up on steps missed while no request came (the
            // background reaper, or the first request after a quiet spell).
            let missed = (now - due) / inner.step_interval.max(1);
            let steps = (missed + 1).min(SHARDS as u64) as usize;
            let first = inner.cursor.fetch_add(steps, Ordering::Relaxed);
            for i in 0..steps {
                let shard = (first + i) % SHARDS;
                self.sweep_shards(shard..shard + 1);
            }
        }
    }

    fn elapsed(&self) -> u64 {
        u64::from(self.inner.clock.now().duration_since(self.inner.start))
    }

    fn sweep_shards(&self, shards: std::ops::Range<usize>) {
        let inner = &*self.inner;
        let elapsed = self.elapsed();
        for shard in shards.clone() {
            inner.multi.retain_shard(shard, elapsed, &inner.budget);
        }
        inner.multi.retain_overflow(elapsed);
        let now = inner.clock.now();
        inner.limiters.for_each(|e| {
            let drop_below = e.drop_below(now);
            for shard in shards.clone() {
                e.store.retain_shard(shard, drop_below);
            }
            e.store.retain_overflow(drop_below);
        });
    }

    /// Reclaims every key whose bucket is full again, now. This happens by
    /// itself as requests come; call it to reclaim at once.
    pub fn sweep_now(&self) {
        self.full_sweep(true);
    }

    fn full_sweep(&self, forced: bool) {
        let inner = &*self.inner;
        let Ok(_guard) = inner.sweep.try_lock() else {
            return; // another request is sweeping
        };
        let now = self.elapsed().max(1);
        let last = inner.last_full_sweep.load(Ordering::Relaxed);
        let budget = &inner.budget;
        if !forced && last != 0 && now.saturating_sub(last) < inner.min_sweep_interval {
            return;
        }
        self.sweep_shards(0..SHARDS);
        inner.last_full_sweep.store(now, Ordering::Relaxed);
        let live = budget.tracked.load(Ordering::Relaxed);
        let next = live.saturating_mul(2).max(MIN_SWEEP).min(budget.cap);
        budget.next_sweep.store(next, Ordering::Relaxed);
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

    #[inline]
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

/// One bucket of a shard takes a settlement's debt, or gives back its
/// refund, at `now` (in the shard's time); a bucket full again is dropped,
/// and a debt on a bucket no longer tracked is tracked again, past the cap
/// if it must be: a settlement is never lost. Its capacity afterwards.
fn adjust(maps: &mut ShardMaps, a: &Adjustment, now: u64, budget: &Budget) -> Decision {
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
fn capacity_at(limit: &Limit, tat: Option<u64>, now: u64) -> u32 {
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
fn peeked(limit: &Limit, tat: Option<u64>, now: u64) -> Decision {
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
enum Slot {
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
    fn tat(self) -> Option<u64> {
        match self {
            Slot::Tracked(tat) | Slot::Overflow(Some(tat)) => Some(tat),
            Slot::New | Slot::Evict | Slot::Overflow(None) => None,
        }
    }
}

/// GCRA for one limit, exactly as governor computes it (and the Redis
/// script): `max` at once, then one every `t`, in nanoseconds.
struct Gcra {
    /// `None`: conforms; else how long until it would.
    retry: Option<u64>,
    /// The TAT to store if it is counted.
    next: u64,
    /// Requests left after it, if counted.
    remaining: u32,
}

impl Gcra {
    #[inline]
    fn new(limit: &Limit, n: u32, reserve: u32, tat: u64, now: u64) -> Self {
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
        let earliest = (tat + add + u64::from(reserve) * t).saturating_sub(tau);
        if now < earliest {
            return Gcra {
                retry: Some(earliest - now),
                next: tat,
                remaining: 0,
            };
        }
        let next = tat.max(now) + t + add;
        let remaining = ((now + tau + t).saturating_sub(next).min(tau + t) / t) as u32;
        Gcra {
            retry: None,
            next,
            remaining,
        }
    }

    fn decision(&self, limit: &Limit, n: u32) -> Decision {
        match self.retry {
            None => Decision::allow(limit, self.remaining),
            Some(r) => Decision::refuse(limit, n, Duration::from_nanos(r)),
        }
    }
}

/// The buckets of several-limit checks: one owner's in one shard (one
/// lock per check), charged against the backend's key budget like the
/// single-limit buckets, with one overflow state per limit for guests
/// that arrive at the cap.
struct MultiStore {
    shards: Box<[Shard]>,
    overflow: Mutex<HashMap<(u8, Limit), u64>>,
}

impl MultiStore {
    fn new() -> Self {
        MultiStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            overflow: Mutex::new(HashMap::new()),
        }
    }

    #[inline]
    fn shard(&self, owner: u64) -> &Shard {
        &self.shards[(owner >> 32) as usize % SHARDS]
    }

    /// Drops buckets full again (TAT at or before `now`).
    fn retain_shard(&self, shard: usize, now: u64, budget: &Budget) {
        retain_full(&self.shards[shard], now, budget);
    }

    fn retain_overflow(&self, now: u64) {
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        if !overflow.is_empty() {
            overflow.retain(|_, tat| *tat > now);
        }
    }
}

/// The key hash is already uniform: use it as the table's hash.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Table = HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>;

/// One shard: `bucket → TAT`, known callers and guests (unknown keys and
/// anonymous callers) apart, so that guests can give way at the cap.
#[derive(Default)]
struct ShardMaps {
    known: Table,
    guests: Table,
    /// Leases held per concurrency bucket (a bucket is dropped when its
    /// last lease is released, so this holds no more than the requests in
    /// flight; it is not charged to the key budget).
    leases: Table,
}

impl ShardMaps {
    fn get(&self, key: u64) -> Option<u64> {
        self.known
            .get(&key)
            .or_else(|| self.guests.get(&key))
            .copied()
    }

    fn len(&self) -> usize {
        self.known.len() + self.guests.len()
    }

    fn table(&mut self, known: bool) -> &mut Table {
        if known {
            &mut self.known
        } else {
            &mut self.guests
        }
    }

    /// Stores a tracked bucket's TAT, moving it to the caller's class.
    fn set(&mut self, key: u64, tat: u64, known: bool) {
        if let Some(v) = self.table(known).get_mut(&key) {
            *v = tat;
            return;
        }
        self.table(!known).remove(&key);
        self.table(known).insert(key, tat);
    }
}

type Shard = Mutex<ShardMaps>;

/// Drops a shard's buckets whose TAT is at or below `drop_below` (full
/// again), shrinks tables left mostly empty, and returns their places to
/// the budget.
fn retain_full(shard: &Shard, drop_below: u64, budget: &Budget) {
    let mut guard = shard.lock().unwrap_or_else(PoisonError::into_inner);
    let maps = &mut *guard;
    let before = maps.len();
    for table in [&mut maps.known, &mut maps.guests] {
        table.retain(|_, tat| *tat > drop_below);
        if table.capacity() > 64 && table.len() < table.capacity() / 4 {
            table.shrink_to_fit();
        }
    }
    let removed = before - maps.len();
    if removed > 0 {
        budget.release(removed);
    }
}

/// 64 mutex-guarded shards of `bucket → TAT`, charged against a shared key
/// budget, with one overflow state for guests that arrive when the budget
/// is spent.
struct KeyStore {
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

    fn retain_shard(&self, shard: usize, drop_below: u64) {
        retain_full(&self.shards[shard], drop_below, &self.budget);
    }

    fn retain_overflow(&self, drop_below: u64) {
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
            if let Some(&victim) = maps.guests.keys().next() {
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
