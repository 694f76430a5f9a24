//! While Redis cannot be reached: counting failures, degrading, probing,
//! rebuilding a cluster's connection, and answering through the
//! [`FailurePolicy`] (the fallback enforcing this instance's share of
//! every limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Conn, FailurePolicy, Inner};
use crate::backend::{
    Adjustment, BackendError, Charge, Check, Decision, Lease, LeaseState, MAX_LEASES, decide_all,
};
use crate::limit::{Limit, MAX_LIMITS, PeriodBounds};

/// The cluster client, kept to rebuild the connection after a failover:
/// redis-rs reconnects to a dead master's address but does not look the
/// topology up again when that address refuses connections.
pub(super) struct Rebuild {
    client: redis::cluster::ClusterClient,
    running: AtomicBool,
    /// Local micros before which no other rebuild starts.
    not_before: AtomicU64,
}

impl Rebuild {
    pub(super) fn new(client: redis::cluster::ClusterClient) -> Self {
        Rebuild {
            client,
            running: AtomicBool::new(false),
            not_before: AtomicU64::new(0),
        }
    }
}

/// How a check goes now.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Redis,
    Probe,
    Around,
}

/// A placeholder charge for fixed-size arrays.
pub(super) const PLACEHOLDER: Charge = Charge {
    bucket: 0,
    limit: Limit::per_second(1),
    cost: 1,
    reserve: 0,
    period: PeriodBounds::ROLLING,
};

/// A placeholder lease for fixed-size arrays.
pub(super) const PLACEHOLDER_LEASE: Lease = Lease {
    bucket: 0,
    max: 1,
    per_account: false,
};

impl Inner {
    /// A check while Redis is unreachable: the failure policy, applied to
    /// every limit at once.
    pub(super) fn on_failure_all(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        self.count_failure();
        match self.failure {
            FailurePolicy::Fallback => self.fallback_check(check),
            FailurePolicy::FailOpen => Ok(fail_open(check)),
            FailurePolicy::FailClosed => Err(BackendError::Unavailable("redis unreachable".into())),
        }
    }

    /// The check in this instance's fallback, against its share of every
    /// limit and lease.
    fn fallback_check(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        let mut shares = [PLACEHOLDER; MAX_LIMITS];
        for (i, c) in check.charges.iter().enumerate().take(MAX_LIMITS) {
            let share = self.fallback_limit(&c.limit);
            let cost = c.cost.max(1);
            if cost > share.max() {
                // Fits the limit, not this instance's share of it.
                let mut d = Decision::refuse(&share, cost, self.retry_interval);
                d.index = i as u8;
                return Ok(d);
            }
            let reserve = self.fallback_reserve(c.reserve, &share);
            shares[i] = Charge {
                limit: share,
                reserve,
                ..*c
            };
        }
        let mut leases = [PLACEHOLDER_LEASE; MAX_LEASES];
        for (slot, l) in leases.iter_mut().zip(check.leases) {
            *slot = Lease {
                max: self.share_of(l.max),
                ..*l
            };
        }
        self.fallback.check_now(&Check {
            charges: &shares[..check.charges.len().min(MAX_LIMITS)],
            leases: &leases[..check.leases.len().min(MAX_LEASES)],
            ..*check
        })
    }

    /// A settlement while Redis is unreachable (or the call failed): in
    /// the fallback, against this instance's share of every limit.
    pub(super) fn settle_fallback(&self, owner: u64, adjustments: &[Adjustment]) -> Decision {
        crate::telemetry::settlement_fallback("redis");
        let mut shares = [adjustments[0]; MAX_LIMITS];
        for (s, a) in shares.iter_mut().zip(adjustments) {
            *s = Adjustment {
                limit: self.fallback_limit(&a.limit),
                ..*a
            };
        }
        self.fallback
            .settle_now(owner, &shares[..adjustments.len()])
    }

    /// A check succeeded: failures start counting from zero, and a
    /// degraded backend returns to Redis.
    pub(super) fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.degraded.swap(false, Ordering::Relaxed) {
            crate::telemetry::backend_state("redis", true);
            tracing::info!(prefix = %self.prefix, "redis reachable again: shared rate limits resume");
        }
    }

    /// On a cluster, looks the topology up again with a new connection (at
    /// most once per retry interval, in the background on the I/O thread),
    /// so that a replica promoted after a failover is found.
    fn rebuild_cluster(self: &Arc<Self>) {
        let Some(rebuild) = &self.rebuild else {
            return;
        };
        let now = self.local_micros();
        if now < rebuild.not_before.load(Ordering::Relaxed)
            || rebuild.running.swap(true, Ordering::Acquire)
        {
            return;
        }
        rebuild.not_before.store(
            now + self.retry_interval.as_micros() as u64,
            Ordering::Relaxed,
        );
        let inner = Arc::clone(self);
        self.io.handle().spawn(async move {
            let Some(rebuild) = &inner.rebuild else {
                return;
            };
            match rebuild.client.get_async_connection().await {
                Ok(conn) => {
                    inner.conn.store(Arc::new(Conn::Cluster(conn)));
                    tracing::debug!("redis cluster connection rebuilt");
                }
                Err(e) => tracing::debug!(error = %e, "redis cluster connection not rebuilt"),
            }
            rebuild.running.store(false, Ordering::Release);
        });
    }

    /// A check failed: counted, and after `trip_after` in a row (or any
    /// failure of a probe) the backend is degraded until the next probe.
    pub(super) fn failed(self: &Arc<Self>) {
        self.rebuild_cluster();
        crate::telemetry::backend_error("redis");
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let degraded = self.degraded.load(Ordering::Relaxed);
        if degraded || n >= self.trip_after {
            let next = self.local_micros() + self.retry_interval.as_micros() as u64;
            self.next_probe.store(next, Ordering::Relaxed);
            if !self.degraded.swap(true, Ordering::Relaxed) {
                crate::telemetry::backend_state("redis", false);
                tracing::warn!(
                    prefix = %self.prefix,
                    policy = ?self.failure,
                    failures = n,
                    "redis unreachable: rate limits degraded"
                );
            }
        }
    }

    /// A read that counts nothing (a peek), routed as checks are: to
    /// Redis, or as the one probe of a degraded backend, whose success
    /// brings the backend back; a failure counts as one (and rebuilds a
    /// cluster's connection). `None`: around Redis, or failed: the caller
    /// answers from the fallback. (Peeks used to skip Redis while degraded
    /// and fail silently: with only peeks coming, a backend never came
    /// back.)
    pub(super) async fn read<T, E>(
        self: &Arc<Self>,
        eval: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        if self.route(self.local_micros()) == Route::Around {
            return None;
        }
        match eval.await {
            Ok(answer) => {
                self.succeeded();
                Some(answer)
            }
            Err(_) => {
                self.failed();
                None
            }
        }
    }

    /// How a check goes now: to Redis, to Redis as the one probe of a
    /// degraded backend, or around it (degraded, not yet time to probe).
    pub(super) fn route(&self, now: u64) -> Route {
        if !self.degraded.load(Ordering::Relaxed) {
            return Route::Redis;
        }
        let due = self.next_probe.load(Ordering::Relaxed);
        let probe = now >= due
            && self
                .next_probe
                .compare_exchange(
                    due,
                    now + self.retry_interval.as_micros() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if probe { Route::Probe } else { Route::Around }
    }

    /// Counts a check answered by the failure policy, labelled with it.
    fn count_failure(&self) {
        let policy = match self.failure {
            FailurePolicy::Fallback => "fallback",
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
        };
        crate::telemetry::fallback("redis", policy);
    }

    /// A priority reserve scaled to this instance's `share` of its limit
    /// (at least 1 if there was one, never the whole share).
    fn fallback_reserve(&self, reserve: u32, share: &Limit) -> u32 {
        if reserve == 0 {
            return 0;
        }
        let scaled = (f64::from(reserve) * self.fallback_share).ceil() as u32;
        scaled.clamp(1, share.max() - 1)
    }

    /// The limit the fallback enforces: this instance's share of `limit`.
    fn fallback_limit(&self, limit: &Limit) -> Limit {
        if self.fallback_share >= 1.0 {
            return *limit;
        }
        std::num::NonZeroU32::new(self.share_of(limit.max()))
            .and_then(|m| Limit::new(m, limit.per()))
            .and_then(|l| l.with_period(limit.period()))
            .unwrap_or(*limit)
    }

    /// This instance's share of `max` (a burst or a concurrency limit):
    /// rounded up, at least 1, at most `max`.
    fn share_of(&self, max: u32) -> u32 {
        if self.fallback_share >= 1.0 {
            return max;
        }
        (f64::from(max) * self.fallback_share)
            .ceil()
            .clamp(1.0, f64::from(max)) as u32
    }
}

/// A check under [`FailurePolicy::FailOpen`]: every limit admits it, and
/// no lease is taken (nothing limits concurrency either).
fn fail_open(check: &Check<'_>) -> Decision {
    let mut decisions = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
    for (slot, c) in decisions.iter_mut().zip(check.charges) {
        let left = c.limit.max() - c.cost.max(1).min(c.limit.max());
        *slot = Decision::allow(&c.limit, left);
    }
    let n = check.charges.len().min(MAX_LIMITS);
    let lease = LeaseState::binding(check.leases.iter().map(|l| LeaseState {
        limit: l.max,
        remaining: l.max,
        refused: false,
        per_account: l.per_account,
    }));
    decide_all(&decisions[..n], check, lease)
}
