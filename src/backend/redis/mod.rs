//! `RedisBackend`: the same GCRA as the memory backend, as one Lua script
//! per check on Redis's clock, so every instance shares one limit.
//!
//! - `builder.rs`: the builder, the failure policy, setup errors, `connect`.
//! - `io.rs`: the backend's I/O thread and every round trip on it; [`Link`],
//!   the handle other parts of the crate run their own scripts through.
//! - `check.rs`: checks, peeks and settlements (the scripts' answers).
//! - `failover.rs`: degrading, probing, the fallback and its shares.
//! - `leases.rs`: the leases this instance holds, release and renewal.
//! - `deny.rs`: refusals remembered locally until their retry delay.
//! - `*.lua`: the scripts (`now.lua`, `gcra.lua`, then `check.lua`,
//!   `settle.lua` or `lease.lua`).

mod batch;
mod builder;
mod check;
mod deny;
mod failover;
mod io;
mod leases;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, FakeRelativeClock, Reference};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

pub use self::batch::Batches;
pub use self::builder::{FailurePolicy, RedisBackendBuilder, RedisSetupError};
pub(crate) use self::io::Link;

use self::check::Charges;
use self::deny::DenyCache;
use self::failover::Rebuild;
use self::io::IoThread;
use self::leases::{Held, LeaseBook};
use super::MemoryBackend;
use super::{Adjustment, Backend, BackendError, Charge, Check, Decision, Lease};
use crate::limit::{Limit, MAX_LIMITS, PeriodBounds};

// Every script below starts with `now.lua` (the time: a fake clock's, or
// Redis's `TIME`); those that read or move a rate bucket then with
// `gcra.lua` (GCRA's arithmetic, written once).

/// One request's check against every limit that applies to it, all or
/// nothing, with its leases, in one call; and a bucket's peek. GCRA
/// exactly as governor computes it, in microseconds, on Redis's clock
/// (`TIME`) unless a time is passed (tests). A refusal writes nothing; an
/// allowed request stores the new TATs and expires them when the buckets
/// are full again, so idle keys cost Redis nothing.
const CHECK: &str = concat!(
    include_str!("now.lua"),
    include_str!("gcra.lua"),
    include_str!("calendar.lua"),
    include_str!("check.lua")
);

/// Settlement: debts and refunds on one owner's buckets, in one call.
const SETTLE: &str = concat!(
    include_str!("now.lua"),
    include_str!("gcra.lua"),
    include_str!("calendar.lua"),
    include_str!("settle.lua")
);

/// Batches: several units of a check's limits taken in one call, and the
/// unspent ones given back.
const BATCH: &str = concat!(
    include_str!("now.lua"),
    include_str!("gcra.lua"),
    include_str!("batch.lua")
);

/// Concurrency leases after admission: release, renew, peek.
const LEASE: &str = concat!(include_str!("now.lua"), include_str!("lease.lua"));

/// The backend's connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Checks go to Redis.
    Connected,
    /// Redis is unreachable; the [`FailurePolicy`] applies.
    Degraded,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Inner {
    conn: arc_swap::ArcSwap<Conn>,
    rebuild: Option<Rebuild>,
    script_check: redis::Script,
    script_settle: redis::Script,
    script_lease: redis::Script,
    script_batch: redis::Script,
    prefix: String,
    timeout: Duration,
    failure: FailurePolicy,
    fallback: MemoryBackend,
    retry_interval: Duration,
    io: IoThread,
    /// The share of each limit the fallback enforces per instance.
    fallback_share: f64,
    /// Checks waiting on Redis at once; later ones queue here, and the
    /// timeout starts only once a check is sent.
    in_flight: tokio::sync::Semaphore,
    /// Consecutive failed checks that mark the backend degraded.
    trip_after: u32,
    consecutive_failures: AtomicU32,
    degraded: AtomicBool,
    next_probe: AtomicU64,
    deny: DenyCache,
    /// Whether checks go through batches (then refusals are not cached:
    /// units given back make room before a refusal's delay ends).
    batching: bool,
    leases: LeaseBook,
    fake: Option<(
        FakeRelativeClock,
        <FakeRelativeClock as Clock>::Instant,
        u64,
    )>,
    start: Instant,
}

/// Shares one limit across instances through Redis (feature `redis`).
///
/// - One atomic script per check (`EVALSHA`, reloaded on `NOSCRIPT`), on
///   Redis's own clock, with governor's arithmetic.
/// - Keys are `PREFIX:{HASH}`: the braces are a hash tag, so each bucket
///   lives in one Redis Cluster slot. They expire when full again.
/// - After a refusal, that bucket's requests are refused on this instance
///   until the retry delay passes, without a round trip, with the same
///   headers.
/// - [`connect`](RedisBackendBuilder::connect) connects and loads the
///   script before it returns, so the first requests find Redis ready.
/// - At most [`max_in_flight`](RedisBackendBuilder::max_in_flight) checks
///   (default 64) wait on Redis at once; the others queue in the process.
///   The timeout (default 50 ms) bounds the Redis round trip of a check
///   that was sent, never its wait in that queue: local queueing under a
///   burst is not a Redis failure, and a burst of any size on any number
///   of instances admits exactly the limit.
/// - A check that fails or times out gets the [`FailurePolicy`]'s answer.
///   [`trip_after`](RedisBackendBuilder::trip_after) consecutive failures
///   (default 3) mark the backend degraded: for the next
///   `retry_interval` (one second) no request waits on Redis, queued ones
///   included; then one request probes, and the backend returns to Redis by
///   itself. One slow answer trips nothing.
///
/// Instances share buckets only if they hash keys alike: set the same
/// [`set_key_secret`](crate::set_key_secret) (or `TIERLIMIT_KEY_SECRET`) on
/// all of them; [`RedisBackendBuilder::connect`] refuses to start without.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
    /// With batches on: the local batches checks are spent from.
    batches: Option<Arc<batch::RedisBatcher>>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Whether checks go to Redis now.
    pub fn state(&self) -> BackendState {
        if self.inner.degraded.load(Ordering::Relaxed) {
            BackendState::Degraded
        } else {
            BackendState::Connected
        }
    }

    /// The Redis key a charge of `owner` is kept under (its hash tag is
    /// the owner: every charge of a check lives in one Cluster slot).
    pub fn charge_key(&self, owner: u64, charge: &Charge) -> String {
        charge_key(&self.inner.prefix, owner, charge.bucket)
    }
}

impl Inner {
    /// Local monotonic micros (the fake clock's, in tests).
    fn local_micros(&self) -> u64 {
        match &self.fake {
            Some((clock, start, base)) => {
                base + u64::from(clock.now().duration_since(*start)) / 1_000
            }
            None => self.start.elapsed().as_micros() as u64,
        }
    }

    /// The time the scripts are given: the fake clock's in tests, else
    /// empty (the script reads Redis's `TIME`).
    fn script_now(&self) -> String {
        match &self.fake {
            Some(_) => self.local_micros().to_string(),
            None => String::new(),
        }
    }
}

/// A limit's emission interval in the scripts' unit, microseconds,
/// rounded up: a shorter one would refill faster than the limit (600,000
/// a second, 1.67 µs, would count 1 µs: a million a second).
fn interval_us(limit: &Limit) -> u64 {
    limit.emission_interval_nanos().div_ceil(1_000).max(1)
}

/// A limit's interval as the scripts read it: 0 marks a calendar limit,
/// whose period's bounds follow the other arguments (see calendar.lua).
fn script_interval(limit: &Limit) -> u64 {
    if limit.period().is_calendar() {
        0
    } else {
        interval_us(limit)
    }
}

/// A calendar charge's bounds as the scripts read them.
fn bounds_args(p: &PeriodBounds) -> [String; 4] {
    [p.start, p.end, p.next_end, p.now].map(|n| n.to_string())
}

/// The key of one charge of a check: the owner is the hash tag, so every
/// charge of a check lives in one Cluster slot (the bucket already mixes
/// in the limit).
fn charge_key(prefix: &str, owner: u64, bucket: u64) -> String {
    format!("{prefix}:{{{owner:016x}}}:m:{bucket:016x}")
}

/// The mark of the batch `tag` of `owner`, there from its take until its
/// give-back: a give-back acts only while it is there, and once. Buckets
/// lost (FLUSHALL, a restart without persistence) lose it too, so a late
/// give-back never returns units of the buckets made again.
fn batch_key(prefix: &str, owner: u64, tag: u64) -> String {
    format!("{prefix}:{{{owner:016x}}}:b:{tag:016x}")
}

/// The sorted set of a concurrency bucket's leases (same hash tag as the
/// owner's charges: one Cluster slot).
fn lease_key(prefix: &str, owner: u64, bucket: u64) -> String {
    format!("{prefix}:{{{owner:016x}}}:c:{bucket:016x}")
}

/// A boxed answer, run on the I/O thread: it finishes even if the returned
/// future is dropped.
fn on_io_thread(
    inner: &Inner,
    task: impl Future<Output = Result<Decision, BackendError>> + Send + 'static,
) -> <RedisBackend as Backend>::Future {
    let task = inner.io.handle().spawn(task);
    Box::pin(async move {
        task.await
            .unwrap_or_else(|e| Err(BackendError::Unavailable(Box::new(e))))
    })
}

impl Backend for RedisBackend {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;

    fn check(&self, check: &Check<'_>) -> Self::Future {
        if let Some(batcher) = &self.batches
            && let Some(batched) = self.batched(batcher, check)
        {
            return batched;
        }
        let this = self.clone();
        let charges = Charges::new(check);
        if check.leases.is_empty() {
            return Box::pin(async move { this.check_async(charges.check()).await });
        }
        // A check with leases runs on the I/O thread: it finishes, and
        // its leases are recorded (or released), even if this future is
        // dropped; `release` meanwhile finds it pending.
        self.inner
            .leases
            .lock()
            .insert(check.lease_id, Held::Pending { cancelled: false });
        on_io_thread(&self.inner, async move {
            this.check_async(charges.check()).await
        })
    }

    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future {
        let this = self.clone();
        let charge = *charge;
        Box::pin(async move { this.peek_async(owner, charge).await })
    }

    /// Runs on the backend's own I/O thread: the settlement proceeds even
    /// if the returned future is dropped (the layer settles from a `Drop`).
    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future {
        let this = self.clone();
        let n = adjustments.len().min(MAX_LIMITS);
        let mut items = [Adjustment {
            bucket: 0,
            limit: Limit::per_second(1),
            units: 0,
            period: PeriodBounds::ROLLING,
        }; MAX_LIMITS];
        items[..n].copy_from_slice(&adjustments[..n]);
        on_io_thread(&self.inner, async move {
            this.settle_async(owner, &items[..n]).await
        })
    }

    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        self.release_held(owner, leases, lease_id);
    }

    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future {
        let this = self.clone();
        let lease = *lease;
        Box::pin(async move { Ok(this.peek_lease_async(owner, lease).await) })
    }
}
