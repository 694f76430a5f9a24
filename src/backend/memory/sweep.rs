//! Upkeep: idle buckets (full again, so indistinguishable from keys never
//! seen) are reclaimed by the requests themselves and by the reaper
//! thread: a steady sweep one shard at a time, and a whole sweep when the
//! table has grown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use governor::clock::Clock;

use super::store::{Budget, SHARDS, Shard};
use super::{Inner, MemoryBackend};

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
pub(super) const MIN_SWEEP: usize = 4096;

/// Hands a new backend to the reaper, which holds it weakly.
pub(super) fn reap<C>(inner: &Arc<Inner<C>>)
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    reaper::register(Box::new(Arc::downgrade(inner)));
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
    /// The per-request upkeep: a whole sweep when the table has grown, and
    /// a steady sweep step when one is due. A request looks at the clock
    /// for steps only once in [`STEP_CHECK_EVERY`] on its thread (a clock
    /// read costs more than the rest of the upkeep); a late look catches up
    /// on every step missed, and the reaper looks on every tick.
    ///
    /// Most requests find nothing to do: that test is made in line, the
    /// work out of line (its frame is not set up for requests that only
    /// look).
    #[inline(always)]
    pub(super) fn maintain(&self, every_time: bool) {
        let budget = &self.inner.budget;
        let full =
            budget.tracked.load(Ordering::Relaxed) >= budget.next_sweep.load(Ordering::Relaxed);
        if full || every_time || step_check_due() {
            self.upkeep(full);
        }
    }

    /// [`maintain`](Self::maintain)'s work: a whole sweep when the table
    /// has grown (`full`), else a steady step if one is due.
    #[inline(never)]
    fn upkeep(&self, full: bool) {
        let inner = &*self.inner;
        if full {
            self.full_sweep(false);
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

    pub(super) fn full_sweep(&self, forced: bool) {
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
}

/// Drops a shard's buckets whose TAT is at or below `drop_below` (full
/// again), shrinks tables left mostly empty, and returns their places to
/// the budget.
pub(super) fn retain_full(shard: &Shard, drop_below: u64, unix_now: u64, budget: &Budget) {
    let mut guard = shard.lock().unwrap_or_else(PoisonError::into_inner);
    let maps = &mut *guard;
    let before = maps.len();
    if !maps.calendar.is_empty() {
        maps.calendar.retain(|_, c| c.end > unix_now);
    }
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
