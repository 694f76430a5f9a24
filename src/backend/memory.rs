//! The in-memory backend: governor's GCRA over a bounded, sharded key store.

use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{RateLimiter, StateStore};

use super::{Backend, BackendError, Decision, Subject};
use crate::policy::Limit;

const SHARDS: usize = 64;
/// Below this many tracked keys no sweep is attempted.
const MIN_SWEEP: usize = 4096;

/// The keyed, in-process backend (the default).
///
/// State lives in governor rate limiters, one per distinct [`Limit`], keyed
/// by [`Subject::bucket`] (a 64-bit hash: 16 bytes of map entry per
/// tracked key, about 20–40 bytes with the table's slack). Checks are
/// synchronous; the returned future is ready at once and nothing is
/// allocated per request once a key is tracked.
///
/// # Memory stays bounded
///
/// - **Idle keys are reclaimed by the requests themselves**: when the
///   number of tracked keys doubles since the last sweep, the request that
///   notices sweeps every key whose bucket is full again (such a key is
///   indistinguishable from a new one, so nothing is lost). No thread or
///   task is spawned; dropping the layer drops everything.
/// - **A hard cap** (default 1,000,000 keys, [`MemoryBackendBuilder::max_keys`]):
///   at the cap, after a sweep, a key not yet tracked is not added. It is
///   limited instead through one shared *overflow* bucket per limit, which
///   every untracked key of that limit shares. Tracked keys keep their
///   state; callers are never let through unlimited; under a key spray the
///   newcomers share one limit until idle keys are reclaimed.
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

type Limiter<C> = RateLimiter<u64, KeyStore, C, StateInformationMiddleware>;

struct Inner<C: Clock> {
    clock: C,
    start: C::Instant,
    limiters: RwLock<HashMap<Limit, Limiter<C>, foldhash::fast::RandomState>>,
    budget: Arc<Budget>,
    sweep: Mutex<()>,
    last_sweep_nanos: AtomicU64,
    min_sweep_interval: Duration,
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

    fn release(&self, n: usize) {
        self.tracked.fetch_sub(n, Ordering::Relaxed);
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
}

impl<C: Clock> MemoryBackendBuilder<C> {
    /// Uses another clock: governor's `FakeRelativeClock` makes tests exact
    /// and instant.
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryBackendBuilder<C2> {
        MemoryBackendBuilder {
            clock,
            max_keys: self.max_keys,
            min_sweep_interval: self.min_sweep_interval,
        }
    }

    /// The most keys tracked at once, across all limits (default
    /// 1,000,000). See [`MemoryBackend`] for what happens at the cap.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    /// At the cap, the least time between two sweeps (default one second),
    /// so that a full table is not swept on every request.
    pub fn min_sweep_interval(mut self, interval: Duration) -> Self {
        self.min_sweep_interval = interval;
        self
    }

    /// Builds the backend.
    pub fn build(self) -> MemoryBackend<C> {
        let start = self.clock.now();
        MemoryBackend {
            inner: Arc::new(Inner {
                clock: self.clock,
                start,
                limiters: RwLock::new(HashMap::default()),
                budget: Arc::new(Budget {
                    tracked: AtomicUsize::new(0),
                    cap: self.max_keys,
                    next_sweep: AtomicUsize::new(MIN_SWEEP.min(self.max_keys)),
                }),
                sweep: Mutex::new(()),
                last_sweep_nanos: AtomicU64::new(0),
                min_sweep_interval: self.min_sweep_interval,
            }),
        }
    }
}

impl<C> MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// Checks one request synchronously.
    pub fn check_now(&self, subject: &Subject, limit: &Limit) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let Some(n) = NonZeroU32::new(subject.cost.max(1)) else {
            unreachable!("max(1) is never zero")
        };
        if n.get() > limit.max() {
            return Err(BackendError::CostExceedsLimit {
                cost: n.get(),
                max: limit.max(),
            });
        }
        let bucket = subject.bucket();
        let outcome = {
            let limiters = inner
                .limiters
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match limiters.get(limit) {
                Some(l) => Self::decide(l, bucket, n, limit),
                None => {
                    drop(limiters);
                    let mut w = inner
                        .limiters
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    let l = w.entry(*limit).or_insert_with(|| {
                        Limiter::new(
                            limit.to_quota(),
                            KeyStore::new(Arc::clone(&inner.budget)),
                            inner.clock.clone(),
                        )
                    });
                    Self::decide(l, bucket, n, limit)
                }
            }
        };
        if inner.budget.tracked.load(Ordering::Relaxed)
            >= inner.budget.next_sweep.load(Ordering::Relaxed)
        {
            self.sweep(false);
        }
        outcome
    }

    #[inline]
    fn decide(
        l: &Limiter<C>,
        bucket: u64,
        n: NonZeroU32,
        limit: &Limit,
    ) -> Result<Decision, BackendError> {
        match l.check_key_n(&bucket, n) {
            Ok(Ok(snapshot)) => Ok(Decision::allow(limit, snapshot.remaining_burst_capacity())),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(l.clock().now());
                Ok(Decision::deny(limit, n.get(), wait))
            }
            Err(_) => Err(BackendError::CostExceedsLimit {
                cost: n.get(),
                max: limit.max(),
            }),
        }
    }

    /// Reclaims every key whose bucket is full again. Runs by itself as
    /// keys accumulate; call it to reclaim now.
    pub fn sweep_now(&self) {
        self.sweep(true);
    }

    fn sweep(&self, forced: bool) {
        let inner = &*self.inner;
        let Ok(_guard) = inner.sweep.try_lock() else {
            return; // another request is sweeping
        };
        let now = u64::from(Nanos::from(inner.clock.now().duration_since(inner.start)));
        let last = inner.last_sweep_nanos.load(Ordering::Relaxed);
        let budget = &inner.budget;
        let at_cap = budget.tracked.load(Ordering::Relaxed) >= budget.cap;
        if !forced
            && at_cap
            && last != 0
            && now.saturating_sub(last) < inner.min_sweep_interval.as_nanos() as u64
        {
            return;
        }
        {
            let limiters = inner
                .limiters
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            for l in limiters.values() {
                l.retain_recent();
            }
        }
        inner.last_sweep_nanos.store(now.max(1), Ordering::Relaxed);
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
    fn check(&self, subject: &Subject, limit: &Limit) -> Self::Future {
        ready(self.check_now(subject, limit))
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

type Shard = Mutex<HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>>;

/// A governor state store: 64 mutex-guarded shards of `bucket → TAT`,
/// charged against a shared key budget, with one overflow state for keys
/// that arrive when the budget is spent.
struct KeyStore {
    shards: Box<[Shard]>,
    overflow: Mutex<Option<Nanos>>,
    budget: Arc<Budget>,
}

impl KeyStore {
    fn new(budget: Arc<Budget>) -> Self {
        KeyStore {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            overflow: Mutex::new(None),
            budget,
        }
    }

    #[inline]
    fn shard(&self, key: u64) -> &Shard {
        // Middle bits: the table itself uses the low bits and the top seven.
        &self.shards[(key >> 32) as usize % SHARDS]
    }
}

impl StateStore for KeyStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self
            .shard(*key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = map.get_mut(key) {
            let (t, next) = f(Some(Nanos::from(*tat)))?;
            *tat = next.into();
            return Ok(t);
        }
        // A key not yet tracked. A refusal writes nothing.
        let (t, next) = f(None)?;
        if self.budget.try_acquire() {
            map.insert(*key, next.into());
            return Ok(t);
        }
        drop(map);
        // At the cap: count the request in the shared overflow bucket.
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        let (t, next) = f(*overflow)?;
        *overflow = Some(next);
        Ok(t)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, tat| *tat > drop_below);
            let removed = before - map.len();
            if removed > 0 {
                self.budget.release(removed);
                if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                    map.shrink_to_fit();
                }
            }
        }
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        if overflow.is_some_and(|tat| u64::from(tat) <= drop_below) {
            *overflow = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}
