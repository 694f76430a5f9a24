//! The Redis backend as a batch store ([`BatchStore`]): a take and a
//! give-back are one `batch.lua` call each, on the owner's hash tag (one
//! Cluster slot), on Redis's clock. A take that asks for no more than the
//! request's cost is a normal check (`check.lua`, with the deny cache and
//! the failure policy). With batches on ([`RedisBackendBuilder::batches`](super::RedisBackendBuilder::batches)),
//! the backend's checks go through its [`Batcher`].

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::check::Charges;
use super::io::Script;
use super::{Inner, RedisBackend, batch_key, charge_key, interval_us};
pub(super) use crate::backend::batch::Taken as Batched;
use crate::backend::batch::{
    BatchStore, Batcher, GiveBack, Grant, GrantedLimit, Step, Take, Taken,
};
use crate::backend::{BackendError, Check};
use crate::limit::MAX_LIMITS;

/// How a Redis backend batches (see [`RedisBackendBuilder::batches`](super::RedisBackendBuilder::batches)).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct Batches {
    pub(super) hold: Duration,
    pub(super) max_share: f64,
    pub(super) max_entries: usize,
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            hold: Duration::from_millis(100),
            max_share: 0.1,
            max_entries: 100_000,
        }
    }
}

impl Batches {
    /// Batches with the defaults: a hold of 100 ms, at most 10% of the
    /// smallest burst per batch, 100,000 owner × cell entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a batch may be spent after its take was sent, and how far
    /// past Redis's now its units are placed (default 100 ms).
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold.max(Duration::from_millis(1));
        self
    }

    /// The largest batch as a share of the smallest burst of a check's
    /// limits (default 0.1).
    pub fn max_share(mut self, share: f64) -> Self {
        self.max_share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The most owner × cell entries an instance keeps (default 100,000).
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }
}

/// A take of a batch as `routed` sends it: the units wanted, the hold,
/// and the tag that names the batch in Redis.
pub(super) type TakeArgs = (u32, Duration, u64);

/// The store a Redis backend's [`Batcher`] takes from: the same
/// connection, scripts and failure policy, without batches.
#[derive(Clone)]
pub(super) struct RedisStore {
    inner: Arc<Inner>,
    /// Give-backs sent and not yet answered (shutdown waits for them).
    pending: Arc<AtomicUsize>,
    /// The next batch's tag: random per instance, then counting, so that
    /// no two batches (of any instance) share one.
    tags: Arc<AtomicU64>,
}

pub(super) type RedisBatcher = Batcher<RedisStore>;

/// The batcher of a backend built with batches.
pub(super) fn batcher(inner: &Arc<Inner>, b: Batches) -> Arc<RedisBatcher> {
    let store = RedisStore {
        inner: Arc::clone(inner),
        pending: Arc::new(AtomicUsize::new(0)),
        tags: Arc::new(AtomicU64::new(random_seed())),
    };
    Arc::new(
        Batcher::builder()
            .hold(b.hold)
            .max_share(b.max_share)
            .max_entries(b.max_entries)
            .build(store),
    )
}

impl RedisStore {
    fn backend(&self) -> RedisBackend {
        RedisBackend {
            inner: Arc::clone(&self.inner),
            batches: None,
        }
    }

    /// A take of `charges` (a batch of `batch`'s units wanted and hold,
    /// else a normal check), through the backend's route.
    async fn take_async(
        self,
        charges: Charges,
        batch: Option<(u32, Duration)>,
    ) -> Result<Taken, BackendError> {
        let batch = batch.map(|(want, hold)| {
            let tag = self.tags.fetch_add(1, Ordering::Relaxed).max(1);
            (want, hold, tag)
        });
        self.backend().routed(&charges.check(), batch).await.0
    }

    /// Waits (at most `within`) until every give-back sent has been
    /// answered.
    pub(super) async fn settled(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The grant in `batch.lua`'s answer `v` (`{3, now, then per bucket:
/// start, before, remaining, units}`, microseconds) to a take `tag` of
/// `want` requests' worth held `hold`, in the store's nanoseconds.
pub(super) fn granted(check: &Check<'_>, batch: TakeArgs, v: &[i64]) -> Grant {
    let (want, hold, tag) = batch;
    let us = |x: i64| x.max(0).unsigned_abs().saturating_mul(1_000);
    let count = |x: i64| u32::try_from(x.max(0)).unwrap_or(u32::MAX);
    let mut limits = [GrantedLimit::default(); MAX_LIMITS];
    for (i, c) in check.charges.iter().enumerate().take(MAX_LIMITS) {
        let t = interval_us(&c.limit).saturating_mul(1_000);
        let at = 2 + 4 * i;
        limits[i] = GrantedLimit {
            start: us(v[at]),
            interval: t,
            cap: t.saturating_mul(u64::from(c.limit.max())),
            before: us(v[at + 1]),
            remaining: count(v[at + 2]),
            units: count(v[at + 3]).min(want.saturating_mul(c.cost.max(1))),
        };
    }
    let hold = u64::try_from(hold.as_nanos()).unwrap_or(u64::MAX);
    let n = check.charges.len().min(MAX_LIMITS);
    let mut grant = Grant::new(us(v[1]), hold, &limits[..n]);
    grant.tag = tag;
    grant
}

impl BatchStore for RedisStore {
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Taken, BackendError>> + Send>>;

    fn take(&self, take: &Take<'_>) -> Self::Future {
        let charges = Charges::new(&take.check());
        let batch = take.is_batch().then_some((take.want, take.hold));
        Box::pin(self.clone().take_async(charges, batch))
    }

    fn give_back(&self, back: &GiveBack<'_>) {
        let inner = &self.inner;
        let g = back.grant;
        if back.charges.is_empty() {
            return;
        }
        let keys: Vec<String> = back
            .charges
            .iter()
            .map(|c| charge_key(&inner.prefix, back.owner, c.bucket))
            .chain([batch_key(&inner.prefix, back.owner, g.tag)])
            .collect();
        let mut args = Vec::with_capacity(2 + 2 * keys.len());
        args.push("back".to_owned());
        args.push(inner.script_now());
        for (i, l) in g.limits().iter().enumerate() {
            let used = l.units - back.unused(i);
            args.extend([l.end(l.units) / 1_000, l.end(used) / 1_000].map(|n| n.to_string()));
        }
        let inner = Arc::clone(inner);
        let pending = Arc::clone(&self.pending);
        pending.fetch_add(1, Ordering::AcqRel);
        let handle = inner.io.handle().clone();
        handle.spawn(async move {
            if let Err(e) = inner.invoke::<i64>(Script::Batch, keys, args).await {
                tracing::debug!(error = %e, "redis batch give-back failed; its units refill");
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl Inner {
    /// Runs `batch.lua`'s take `tag` of up to `want` units held `hold`
    /// once.
    pub(super) async fn eval_take(
        self: &Arc<Self>,
        check: &Check<'_>,
        (want, hold, tag): TakeArgs,
    ) -> Result<Vec<i64>, super::io::EvalError> {
        let keys = check
            .charges
            .iter()
            .map(|c| charge_key(&self.prefix, check.owner, c.bucket))
            .chain([batch_key(&self.prefix, check.owner, tag)])
            .collect();
        let mut args = Vec::with_capacity(4 + 3 * check.charges.len());
        args.push("take".to_owned());
        args.push(self.script_now());
        args.push(want.to_string());
        args.push(hold.as_micros().max(1).to_string());
        for c in check.charges {
            args.extend([
                interval_us(&c.limit).to_string(),
                c.limit.max().to_string(),
                c.cost.max(1).to_string(),
            ]);
        }
        self.invoke(Script::Batch, keys, args).await
    }
}

impl RedisBackend {
    /// A check through the batcher: from a local batch, else a take (a
    /// batch, or a normal check); `None`: not batched, check it as usual.
    pub(super) fn batched(
        &self,
        batcher: &Arc<RedisBatcher>,
        check: &Check<'_>,
    ) -> Option<<RedisBackend as crate::backend::Backend>::Future> {
        let now = self.inner.local_micros().saturating_mul(1_000);
        match batcher.begin(check, now) {
            // Not batched, or a normal check the batcher has nothing to do
            // with (a cold owner): the backend's own check, as without
            // batches (one store: the same keys either way).
            Step::Bypass => None,
            Step::Take(ticket) if !ticket.needs_finish() => None,
            Step::Done(d) => Some(Box::pin(std::future::ready(Ok(d)))),
            Step::Take(ticket) => {
                let taken = batcher.store().take(&ticket.take());
                let (batcher, inner) = (Arc::clone(batcher), Arc::clone(&self.inner));
                Some(Box::pin(async move {
                    let taken = taken.await;
                    let now = inner.local_micros().saturating_mul(1_000);
                    batcher.finish(&ticket, taken, now)
                }))
            }
        }
    }

    /// Gives every batch this instance holds back to Redis, and waits (at
    /// most a second) until Redis has them: call it at shutdown. Without
    /// it, a stopped instance's units come back as its buckets refill
    /// (within a batch's span plus its hold).
    pub async fn return_batches(&self) {
        if let Some(b) = &self.batches {
            b.flush_all();
            b.store().settled(Duration::from_secs(1)).await;
        }
    }

    /// Units this instance holds in batches, unspent (0 without batches).
    pub fn batched_units(&self) -> u64 {
        self.batches.as_ref().map_or(0, |b| b.unspent())
    }
}

/// A random start for an instance's batch tags.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Gives aged batches back every half hold, for as long as the backend
/// lives (a weak reference: dropping the backend stops it).
pub(super) fn spawn_aging(inner: &Arc<Inner>, batcher: &Arc<RedisBatcher>, hold: Duration) {
    let weak = Arc::downgrade(batcher);
    let clock = Arc::downgrade(inner);
    let every = (hold / 2).max(Duration::from_millis(1));
    inner.io.handle().spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (Some(b), Some(inner)) = (weak.upgrade(), clock.upgrade()) else {
                return;
            };
            b.flush_aged(inner.local_micros().saturating_mul(1_000));
        }
    });
}
