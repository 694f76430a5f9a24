//! Concurrency leases after admission: the leases this instance holds (to
//! release and renew them), releases (late ones included), renewal, peeks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::check::Charges;
use super::io::{EvalError, Script};
use super::{Inner, RedisBackend, lease_key};
use crate::backend::{BackendError, Check, Decision, Lease, LeaseState, MAX_LEASES};

/// Where a check's leases were taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Taken {
    /// Nowhere (no leases, a refusal, or fail-open).
    Nowhere,
    /// In Redis.
    Redis,
    /// In this instance's fallback (Redis was unreachable).
    Fallback,
}

/// The leases this instance holds (to release and renew them), and the
/// checks with leases still under way.
pub(super) struct LeaseBook {
    ttl: Duration,
    /// This instance's part of every lease id in Redis.
    base: u64,
    entries: Mutex<HashMap<u64, Held>>,
    renewing: AtomicBool,
}

pub(super) enum Held {
    /// The check is under way; `cancelled`: released before it answered,
    /// so its leases are released as soon as it takes them.
    Pending { cancelled: bool },
    /// Held, in Redis or in the fallback.
    Taken(HeldLeases, Taken),
}

/// One request's leases, as held.
#[derive(Clone, Copy)]
pub(super) struct HeldLeases {
    owner: u64,
    leases: [Lease; MAX_LEASES],
    len: usize,
    lease_id: u64,
}

impl HeldLeases {
    fn of(c: &Charges) -> Self {
        HeldLeases {
            owner: c.owner,
            leases: c.leases,
            len: c.nleases,
            lease_id: c.lease_id,
        }
    }

    fn leases(&self) -> &[Lease] {
        &self.leases[..self.len.min(MAX_LEASES)]
    }
}

impl LeaseBook {
    pub(super) fn new(ttl: Duration) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        LeaseBook {
            ttl,
            base: h.finish(),
            entries: Mutex::new(HashMap::new()),
            renewing: AtomicBool::new(false),
        }
    }

    pub(super) fn ttl_us(&self) -> u64 {
        self.ttl.as_micros().max(1) as u64
    }

    /// A lease's member in Redis: unique across instances.
    pub(super) fn member(&self, lease_id: u64) -> String {
        format!("{:016x}{lease_id:016x}", self.base)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leases held by this instance now.
    fn held(&self) -> usize {
        self.lock()
            .values()
            .filter(|h| matches!(h, Held::Taken(..)))
            .count()
    }
}

impl Inner {
    /// Runs the lease script once for one request's leases.
    async fn eval_lease(
        self: &Arc<Self>,
        mode: &'static str,
        owner: u64,
        leases: &[Lease],
        lease_id: u64,
    ) -> Result<i64, EvalError> {
        let keys = leases
            .iter()
            .map(|l| lease_key(&self.prefix, owner, l.bucket))
            .collect();
        let args = vec![
            mode.to_owned(),
            self.script_now(),
            self.leases.ttl_us().to_string(),
            self.leases.member(lease_id),
        ];
        self.invoke(Script::Lease, keys, args).await
    }
}

impl RedisBackend {
    /// A check with leases got no answer: the script may still run (a
    /// paused or stalled server runs its queue when it resumes) and take
    /// leases that nobody holds. A release queued behind it on the same
    /// connection frees them the moment it runs (and does nothing if it
    /// never does): a late answer is harmless.
    pub(super) fn release_late(&self, check: &Check<'_>) {
        if !check.leases.is_empty() {
            self.release_taken(HeldLeases::of(&Charges::new(check)), Taken::Redis);
        }
    }

    /// A check with leases answered: records the leases it took (to
    /// release and renew them), or releases them at once if the request
    /// was released while its check was under way.
    pub(super) fn finish_leases(
        &self,
        c: &Charges,
        result: &Result<Decision, BackendError>,
        taken: Taken,
    ) {
        let took = matches!(result, Ok(d) if d.allowed) && taken != Taken::Nowhere;
        let mut book = self.inner.leases.lock();
        let prev = book.remove(&c.lease_id);
        if !took {
            return;
        }
        if let Some(Held::Pending { cancelled: true }) = prev {
            drop(book);
            self.release_taken(HeldLeases::of(c), taken);
            return;
        }
        book.insert(c.lease_id, Held::Taken(HeldLeases::of(c), taken));
        drop(book);
        if taken == Taken::Redis {
            self.start_renewing();
        }
    }

    /// [`Backend::release`](crate::backend::Backend::release): releases the leases
    /// `lease_id` holds, or marks its check, still under way, cancelled.
    pub(super) fn release_held(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        let mut book = self.inner.leases.lock();
        match book.get_mut(&lease_id) {
            Some(Held::Pending { cancelled }) => *cancelled = true,
            Some(Held::Taken(..)) => {
                if let Some(Held::Taken(c, taken)) = book.remove(&lease_id) {
                    drop(book);
                    self.release_taken(c, taken);
                }
            }
            None => {
                // Not taken through `check` (or released already).
                tracing::trace!(owner, leases = leases.len(), "redis: no such lease");
            }
        }
    }

    /// Releases leases this instance took.
    fn release_taken(&self, h: HeldLeases, taken: Taken) {
        match taken {
            Taken::Nowhere => {}
            Taken::Fallback => self.inner.fallback.release_now(h.owner, h.leases()),
            Taken::Redis => {
                let inner = Arc::clone(&self.inner);
                self.inner.io.handle().spawn(async move {
                    if let Err(e) = inner
                        .eval_lease("release", h.owner, h.leases(), h.lease_id)
                        .await
                    {
                        // The lease expires by itself after the TTL.
                        crate::telemetry::backend_error("redis");
                        tracing::debug!(error = %e, "redis: a lease was not released; it expires after its TTL");
                    }
                });
            }
        }
    }

    /// Starts the renewal task (once): every third of the lease TTL, the
    /// leases this instance holds in Redis are renewed.
    fn start_renewing(&self) {
        if self.inner.leases.renewing.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let period = (self.inner.leases.ttl / 3).max(Duration::from_millis(10));
        self.inner.io.handle().spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                RedisBackend {
                    inner,
                    batches: None,
                }
                .renew_leases()
                .await;
            }
        });
    }

    /// Renews every lease this instance holds in Redis now (their expiry
    /// moves to now + the TTL); returns how many were renewed. The backend
    /// does this by itself every third of the TTL while leases are held.
    pub async fn renew_leases(&self) -> usize {
        let inner = &self.inner;
        if inner.degraded.load(Ordering::Relaxed) {
            return 0;
        }
        let held: Vec<HeldLeases> = inner
            .leases
            .lock()
            .values()
            .filter_map(|h| match h {
                Held::Taken(c, Taken::Redis) => Some(*c),
                _ => None,
            })
            .collect();
        let mut renewed = 0;
        for h in held {
            match inner
                .eval_lease("renew", h.owner, h.leases(), h.lease_id)
                .await
            {
                Ok(n) if n > 0 => renewed += 1,
                Ok(_) => tracing::debug!("redis: a lease had expired before its renewal"),
                Err(e) => tracing::debug!(error = %e, "redis: lease renewal failed"),
            }
        }
        renewed
    }

    /// Leases this instance holds now (in Redis or in its fallback).
    pub fn leases_held(&self) -> usize {
        self.inner.leases.held()
    }

    /// [`Backend::peek_lease`](crate::backend::Backend::peek_lease): a lease's
    /// capacity now, in Redis (or in the fallback), taking nothing.
    pub(super) async fn peek_lease_async(&self, owner: u64, lease: Lease) -> Decision {
        let inner = &self.inner;
        let peek = inner.eval_lease("peek", owner, std::slice::from_ref(&lease), 0);
        if let Some(held) = inner.read(peek).await {
            return Decision::leases_only(LeaseState {
                limit: lease.max,
                remaining: lease
                    .max
                    .saturating_sub(u32::try_from(held).unwrap_or(u32::MAX)),
                refused: false,
                per_account: lease.per_account,
            });
        }
        inner.fallback.peek_lease_now(owner, &lease)
    }
}
