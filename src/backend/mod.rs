//! Backends: where rate-limit state lives and how a request is checked.
//!
//! [`MemoryBackend`] (the default) keeps state in this process through
//! governor. A [`Backend`] implementation of your own takes a [`Subject`]
//! and a [`Limit`] and returns a [`Decision`] with GCRA semantics: `max`
//! requests may come at once, then one every `per / max`.

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::time::Duration;

#[cfg(feature = "redis")]
pub use self::redis::{
    BackendState, FailurePolicy, RedisBackend, RedisBackendBuilder, RedisSetupError,
};
pub use memory::{MemoryBackend, MemoryBackendBuilder};

use crate::extract::Priority;
use crate::key::KeyId;
use crate::policy::{CategoryId, Limit, TierId};

/// Who is asking, for what, at what cost: everything a backend needs about
/// one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The caller's identity.
    pub key: KeyId,
    /// The caller's tier.
    pub tier: TierId,
    /// The endpoint category.
    pub category: CategoryId,
    /// Units this request takes (at least 1).
    pub cost: u32,
    /// The request's declared priority.
    pub priority: Priority,
    /// Separates the buckets of different tier × category cells (and of
    /// per-key overrides) that share a key.
    pub scope: u64,
    /// Capacity this request must leave untouched (a priority reserve, for
    /// requests that are not critical); 0 for most requests.
    pub reserve: u32,
    /// Whether the caller is known to the policy ([`Identity::is_known`](crate::Identity::is_known)).
    /// A backend with bounded memory keeps known callers' state first.
    pub known: bool,
}

impl Subject {
    /// One request of cost 1, normal priority and no reserve, for a known
    /// `key` in a tier × category cell whose buckets are separated by
    /// `scope`.
    ///
    /// ```
    /// use tierlimit::{KeyId, Policy, Subject};
    /// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
    /// let s = Subject::new(KeyId::of("k"), policy.tier("t").unwrap(), policy.category("read").unwrap(), 7);
    /// let batch = Subject { cost: 10, ..s };
    /// assert_eq!((s.cost, batch.cost), (1, 10));
    /// ```
    pub const fn new(key: KeyId, tier: TierId, category: CategoryId, scope: u64) -> Self {
        Subject {
            key,
            tier,
            category,
            cost: 1,
            priority: Priority::Normal,
            scope,
            reserve: 0,
            known: true,
        }
    }

    /// The 64-bit bucket this subject is counted in: its key within its
    /// scope.
    #[inline]
    pub fn bucket(&self) -> u64 {
        self.key.as_u64() ^ self.scope
    }
}

/// The outcome of one check.
///
/// Seconds in headers are derived from these durations and always rounded
/// up, never down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request conforms.
    pub allowed: bool,
    /// The limit's burst size (`max`).
    pub limit: u32,
    /// Requests that could still come at once, after this one.
    pub remaining: u32,
    /// Time until the bucket is full again if nothing else comes.
    pub reset_after: Duration,
    /// For a refusal: time until this request would conform.
    pub retry_after: Option<Duration>,
    /// The limit's window (`per`).
    pub window: Duration,
}

impl Decision {
    /// The decision for an allowed request that leaves `remaining` of
    /// `limit` (GCRA: the bucket is full again `(max - remaining) × per/max`
    /// later, to the emission interval's resolution).
    pub fn allow(limit: &Limit, remaining: u32) -> Self {
        let remaining = remaining.min(limit.max());
        Decision {
            allowed: true,
            limit: limit.max(),
            remaining,
            reset_after: nanos(
                u128::from(limit.max() - remaining) * u128::from(limit.emission_interval_nanos()),
            ),
            retry_after: None,
            window: limit.per(),
        }
    }

    /// The decision for a refused request of `cost` that would conform
    /// `retry_after` from now.
    pub fn deny(limit: &Limit, cost: u32, retry_after: Duration) -> Self {
        let t = u128::from(limit.emission_interval_nanos());
        let cost = cost.clamp(1, limit.max());
        let retry = retry_after.as_nanos();
        // Capacity now: cost × T − retry, in whole requests (fewer than cost).
        let remaining =
            ((u128::from(cost) * t).saturating_sub(retry) / t).min(u128::from(cost - 1)) as u32;
        Decision {
            allowed: false,
            limit: limit.max(),
            remaining,
            reset_after: nanos(retry + u128::from(limit.max() - cost) * t),
            retry_after: Some(retry_after),
            window: limit.per(),
        }
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(n.min(u128::from(u64::MAX)) as u64)
}

/// Why a backend could not decide.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// The request's cost is above the limit's `max`: it could never
    /// succeed. The layer answers 400 before asking a backend, so backends
    /// return this only when called directly.
    CostExceedsLimit {
        /// The request's cost.
        cost: u32,
        /// The limit's `max`.
        max: u32,
    },
    /// The backend's store failed (a Redis error, a timeout).
    Unavailable(Box<dyn Error + Send + Sync>),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::CostExceedsLimit { cost, max } => {
                write!(f, "a cost of {cost} exceeds the limit's maximum of {max}")
            }
            BackendError::Unavailable(e) => write!(f, "rate-limit backend unavailable: {e}"),
        }
    }
}

impl Error for BackendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            BackendError::Unavailable(e) => Some(&**e),
            BackendError::CostExceedsLimit { .. } => None,
        }
    }
}

/// Where rate-limit state lives.
///
/// `check` is called once per limited request with the request's subject
/// and the limit that applies; it must count the request if it conforms
/// and change nothing if it does not. A backend whose answer is known at
/// once returns a ready future ([`std::future::Ready`]), which the layer
/// resolves without yielding.
pub trait Backend: Send + Sync + 'static {
    /// The future of one check.
    type Future: Future<Output = Result<Decision, BackendError>> + Send + 'static;

    /// Checks (and, if it conforms, counts) one request.
    fn check(&self, subject: &Subject, limit: &Limit) -> Self::Future;

    /// Reports the subject's current capacity without counting anything
    /// (for usage checks): an allowed decision whose `remaining` is what
    /// could come at once now.
    fn peek(&self, subject: &Subject, limit: &Limit) -> Self::Future;
}

impl<B: Backend> Backend for std::sync::Arc<B> {
    type Future = B::Future;

    fn check(&self, subject: &Subject, limit: &Limit) -> Self::Future {
        (**self).check(subject, limit)
    }

    fn peek(&self, subject: &Subject, limit: &Limit) -> Self::Future {
        (**self).peek(subject, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_arithmetic() {
        let l = Limit::per_second(10); // T = 100ms
        let d = Decision::deny(&l, 1, Duration::from_millis(40));
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, Duration::from_millis(940));
        // A cost of 5 with 3 available: retry after 2 × T.
        let d = Decision::deny(&l, 5, Duration::from_millis(200));
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after, Duration::from_millis(700));
        let a = Decision::allow(&l, 7);
        assert_eq!(a.reset_after, Duration::from_millis(300));
    }
}
