//! Backends: where rate-limit state lives and how a request is checked.
//!
//! [`MemoryBackend`] (the default) keeps state in this process;
//! [`RedisBackend`] (feature `redis`) in Redis, shared by every instance.
//! A [`Backend`] of your own decides a [`Check`] (a request's charges,
//! token charges and leases, all or nothing) and returns a [`Decision`]
//! with GCRA semantics: `max` requests may come at once, then one every
//! `per / max`.

pub mod batch;
mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::error::Error;
use std::fmt;
use std::future::Future;

#[cfg(feature = "redis")]
pub(crate) use self::redis::Link;
#[cfg(feature = "redis")]
pub use self::redis::{
    BackendState, Batches, FailurePolicy, RedisBackend, RedisBackendBuilder, RedisSetupError,
};
pub use memory::{MemoryBackend, MemoryBackendBuilder};

pub use crate::decision::{Decision, LEASE_RETRY, LeaseState, TokenState};
use crate::key::KeyId;
use crate::limit::Limit;
pub use crate::limit::{Period, PeriodBounds};
use crate::meter::TokenKind;

/// Who is asking, in which bucket, at what cost: everything a backend reads
/// about one request, and nothing else (the tier and category are folded
/// into `scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The caller's identity.
    pub key: KeyId,
    /// Units this request takes (at least 1).
    pub cost: u32,
    /// Separates the buckets of different tier × category cells (and of
    /// per-key overrides) that share a key.
    pub scope: u64,
    /// Capacity this request must leave untouched (a priority reserve, for
    /// requests that are not critical); 0 for most requests.
    pub reserve: u32,
    /// Whether the caller is known to the policy ([`Identity::is_known`](crate::extract::Identity::is_known)).
    /// A backend with bounded memory keeps known callers' state first.
    pub known: bool,
}

impl Subject {
    /// One request of cost 1 and no reserve, for a known `key` in a
    /// tier × category cell whose buckets are separated by `scope` (the
    /// layer gives each cell its own).
    ///
    /// ```
    /// use tierlimit::{Policy, key::KeyId, backend::Subject};
    /// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
    /// let s = Subject::new(KeyId::of("k"), 7);
    /// let batch = Subject { cost: 10, ..s };
    /// assert_eq!((s.cost, batch.cost), (1, 10));
    /// ```
    pub const fn new(key: KeyId, scope: u64) -> Self {
        Subject {
            key,
            cost: 1,
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

    /// This subject's charge under `limit`: its bucket, cost and reserve
    /// (a calendar limit's in its period now in UTC, by the system clock;
    /// the layer uses its policy's time zone and its own clock, and so may
    /// a caller, with [`Charge::in_period`]).
    #[inline]
    pub fn charge(&self, limit: Limit) -> Charge {
        let period = if limit.period().is_calendar() {
            crate::calendar::Calendar::utc().bounds(limit.period(), crate::time::unix_now())
        } else {
            PeriodBounds::default()
        };
        Charge {
            bucket: self.bucket(),
            limit,
            cost: self.cost,
            reserve: self.reserve,
            period,
        }
    }

    /// A check of this subject under one limit (`charge`, made by
    /// [`charge`](Self::charge)): owned by its key.
    ///
    /// ```
    /// use tierlimit::backend::{Backend, MemoryBackend, Subject};
    /// use tierlimit::{Limit, key::KeyId};
    /// # tokio_test_block(async {
    /// let backend = MemoryBackend::new();
    /// let s = Subject::new(KeyId::of("k"), 7);
    /// let charge = s.charge(Limit::per_second(1));
    /// assert!(backend.check(&s.check(&charge)).await.unwrap().allowed);
    /// assert!(!backend.check(&s.check(&charge)).await.unwrap().allowed);
    /// # });
    /// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let waker = std::task::Waker::noop();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     assert!(f.as_mut().poll(&mut cx).is_ready());
    /// # }
    /// ```
    #[inline]
    pub fn check<'a>(&self, charge: &'a Charge) -> Check<'a> {
        Check::new(self.key.as_u64(), self.known, std::slice::from_ref(charge))
    }
}

/// One limit of a request's [`Check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The 64-bit bucket the limit is counted in (distinct for every
    /// limit of a cell, and for per-key and per-account limits).
    pub bucket: u64,
    /// The limit.
    pub limit: Limit,
    /// Units this request takes in this limit (at least 1): its cost for a
    /// request limit, its estimate for a token limit.
    pub cost: u32,
    /// Capacity of this limit the request must leave untouched (a
    /// priority reserve); 0 for most requests.
    pub reserve: u32,
    /// For a calendar limit: the period it is counted in, and the next
    /// ([`Calendar::bounds`](crate::policy::Calendar::bounds)); all 0 for
    /// a rolling limit.
    pub period: PeriodBounds,
}

impl Charge {
    /// This charge counted in the calendar period `period` (computed by
    /// [`Calendar::bounds`](crate::policy::Calendar::bounds) for the
    /// charge's limit).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tierlimit::backend::{Backend, MemoryBackend, Subject};
    /// use tierlimit::policy::{Calendar, Period};
    /// use tierlimit::{Limit, key::KeyId};
    ///
    /// let day = Limit::per_day(2).with_period(Period::CalendarDay).unwrap();
    /// let noon = Duration::from_secs(1_790_000_000);
    /// let bounds = Calendar::utc().bounds(Period::CalendarDay, noon);
    /// let s = Subject::new(KeyId::of("k"), 7);
    /// let charge = s.charge(day).in_period(bounds);
    /// let backend = MemoryBackend::new();
    /// assert!(backend.check_now(&s.check(&charge)).unwrap().allowed);
    /// assert!(backend.check_now(&s.check(&charge)).unwrap().allowed);
    /// let refused = backend.check_now(&s.check(&charge)).unwrap();
    /// // Refused until the day ends.
    /// let midnight = Duration::from_micros(bounds.end - bounds.now);
    /// assert_eq!(refused.retry_after, Some(midnight));
    /// ```
    #[must_use]
    #[inline]
    pub fn in_period(mut self, period: PeriodBounds) -> Self {
        self.period = period;
        self
    }
}

/// One concurrency limit of a request ([`Check::leases`]): while the
/// request is in flight it holds one of `max` leases of its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The bucket the leases are counted in (per key or per account).
    pub bucket: u64,
    /// Requests that may hold a lease of the bucket at once.
    pub max: u32,
    /// Whether the bucket is an account's (for the headers and usage).
    pub per_account: bool,
}

/// The most concurrency limits one request can be under: one per key
/// (or per account in a pooled tier) and one per account.
pub const MAX_LEASES: usize = 2;

/// A change to one charge's bucket after the fact ([`Backend::settle`]):
/// `units` more (a debt, when a request used more than it reserved) or,
/// when negative, fewer (a refund).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adjustment {
    /// The bucket, as it was charged ([`Charge::bucket`]).
    pub bucket: u64,
    /// The limit it was charged under.
    pub limit: Limit,
    /// Units to add (positive: a debt that delays later requests) or to
    /// give back (negative: never more than makes the bucket full).
    pub units: i64,
    /// For a calendar limit: the period it was charged in
    /// ([`Charge::period`]). A settlement of a period that has ended
    /// changes nothing.
    pub period: PeriodBounds,
}

/// One request, checked against every limit that applies to it at once,
/// all or nothing: it is allowed only if every charge's limit admits its
/// cost and every lease has room, and a refused request counts against
/// none of them. A request under one limit is a check with one charge.
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    /// What the charges have in common: the account when any of them is
    /// counted per account, else the key. A backend keeps every charge of
    /// one owner together (one lock in memory, one hash slot in Redis
    /// Cluster), so the check is one step.
    pub owner: u64,
    /// Whether the caller is known ([`Subject::known`]).
    pub known: bool,
    /// The limits, at most [`MAX_LIMITS`](crate::policy::MAX_LIMITS).
    pub charges: &'a [Charge],
    /// How many of the last charges are token limits (0: none). The
    /// decision's [`tokens`](Decision::tokens) describes their binding one.
    pub tokens: u8,
    /// Which of those token charges limit input and output tokens (the
    /// decision's [`input_tokens`](Decision::input_tokens) and
    /// [`output_tokens`](Decision::output_tokens) describe theirs); a
    /// backend passes it on and treats every charge alike.
    pub split: TokenSplit,
    /// Concurrency limits (at most [`MAX_LEASES`]): an allowed request
    /// takes one lease of each, in the same step as its charges, and holds
    /// them until [`Backend::release`]. A request refused by a charge
    /// takes no lease; one refused by a full lease counts in no charge.
    pub leases: &'a [Lease],
    /// Names this request's leases (unique in the process; the layer
    /// numbers them), for [`Backend::release`].
    pub lease_id: u64,
    /// Whether the caller reads more of an allowed request's decision than
    /// that it is allowed: its remaining and reset, for headers. When
    /// `false` (a layer writing no header, with nothing to meter or
    /// record), a backend may answer an allowed request with
    /// [`Decision::allow_undescribed`], sparing the arithmetic; a refusal is always
    /// described in full. A backend may ignore it.
    pub describe: bool,
}

impl<'a> Check<'a> {
    /// A check of `charges` for `owner`, with no leases.
    pub fn new(owner: u64, known: bool, charges: &'a [Charge]) -> Self {
        Check {
            owner,
            known,
            charges,
            tokens: 0,
            split: TokenSplit::NONE,
            leases: &[],
            lease_id: 0,
            describe: true,
        }
    }

    /// The charge of a check of one rolling charge and nothing else (no
    /// token charge, no lease): what a backend may answer faster (the
    /// memory backend's governor branch, the Redis backend's deny cache).
    /// A calendar charge is never alone: it is a counter, not a bucket.
    #[inline]
    pub(crate) fn alone(&self) -> Option<&'a Charge> {
        match self.charges {
            [c] if self.leases.is_empty()
                && self.tokens == 0
                && !c.limit.period().is_calendar() =>
            {
                Some(c)
            }
            _ => None,
        }
    }
}

/// How a check's token charges divide by kind ([`Check::split`]): of its
/// last [`tokens`](Check::tokens) charges, the last `output` limit output
/// tokens, the `input` before them input tokens, and the others every
/// token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenSplit {
    /// How many token charges limit input tokens.
    pub input: u8,
    /// How many token charges (the last ones) limit output tokens.
    pub output: u8,
}

impl TokenSplit {
    /// No input or output limits: every token charge limits all tokens.
    pub const NONE: TokenSplit = TokenSplit {
        input: 0,
        output: 0,
    };

    /// What charge `i` of `n` limits, when the last `tokens` are token
    /// charges: `None` for a request charge.
    #[inline]
    pub fn kind(self, i: usize, n: usize, tokens: usize) -> Option<TokenKind> {
        let output = usize::from(self.output);
        let input = usize::from(self.input);
        if i >= n || i + tokens < n {
            None
        } else if i + output >= n {
            Some(TokenKind::Output)
        } else if i + output + input >= n {
            Some(TokenKind::Input)
        } else {
            Some(TokenKind::Total)
        }
    }
}

/// The decision of a several-limit check: the binding charge's, with the
/// binding lease (a check under concurrency limits only is described by
/// its lease).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn decide_all(
    decisions: &[Decision],
    check: &Check<'_>,
    lease: Option<LeaseState>,
) -> Decision {
    decide(
        Decision::binding_with_split(decisions, usize::from(check.tokens), check.split),
        lease,
    )
}

/// The same, from the binding charge's decision (`None`: no charges).
#[inline]
pub(crate) fn decide(binding: Option<Decision>, lease: Option<LeaseState>) -> Decision {
    match (binding, lease) {
        (Some(d), Some(l)) => d.with_lease(l),
        (Some(d), None) => d,
        (None, Some(l)) => Decision::leases_only(l),
        (None, None) => Decision::allow(&Limit::per_second(1), 1),
    }
}

/// Mixes a limit into a bucket, so that every limit of a cell has its own
/// (a rolling and a calendar limit of the same numbers too).
#[inline]
pub(crate) fn limit_bucket(bucket: u64, limit: &Limit) -> u64 {
    let l = (u64::from(limit.max()) << 32)
        ^ (limit.per().as_nanos() as u64)
        ^ ((limit.period() as u64) << 60);
    (bucket ^ l.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17)
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
/// `check` is called once per limited request with everything that applies
/// to it (a [`Check`]); it must count the request if it conforms and change
/// nothing if it does not. A backend whose answer is known at once returns
/// a ready future ([`std::future::Ready`]), which the layer resolves
/// without yielding.
pub trait Backend: Send + Sync + 'static {
    /// The future of one check. `Unpin`, so the layer can poll it in place
    /// (box a future that is not: `Pin<Box<dyn Future<…> + Send>>` is).
    type Future: Future<Output = Result<Decision, BackendError>> + Send + Unpin + 'static;

    /// Checks one request in one step: if every charge's limit admits it
    /// and every lease has room, it is counted in all of them and takes
    /// its leases; otherwise nothing changes. The answer is the binding
    /// limit's decision ([`Decision::binding`]), its
    /// [`index`](Decision::index) naming the charge. Must be exact under
    /// concurrency: two requests that each conform alone but not together
    /// are never both allowed.
    fn check(&self, check: &Check<'_>) -> Self::Future;

    /// One charge's capacity now, counting nothing (for usage checks): its
    /// `remaining` is what could come at once now; a bucket with no room
    /// answers as a refused check of one unit would.
    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future;

    /// Settles charges after the fact, in one step for one owner: each
    /// bucket takes `units` more (a debt: later requests wait until it is
    /// paid) or, when negative, gives them back (a refund, at most up to a
    /// full bucket). Unconditional: a settlement is never refused. The
    /// work must proceed even if the returned future is dropped unpolled
    /// (the layer settles from a `Drop`); its answer is the binding limit's
    /// state afterwards.
    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future;

    /// Releases the leases that the check numbered `lease_id` took (with
    /// the same `owner` and `leases`). The layer calls it exactly once for
    /// every check with leases that was not refused, when the response
    /// ends — and also for a check whose future was dropped before it
    /// answered: a backend whose check may still be under way then
    /// releases its leases as soon as it takes them. Never blocks; the
    /// work proceeds on its own.
    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64);

    /// One concurrency limit's state now, taking nothing: a
    /// [`Decision::leases_only`] whose lease's `remaining` is what could
    /// start now (the usage endpoint's in-flight count is `max − remaining`).
    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future;
}

impl<B: Backend> Backend for std::sync::Arc<B> {
    type Future = B::Future;

    fn check(&self, check: &Check<'_>) -> Self::Future {
        (**self).check(check)
    }

    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future {
        (**self).peek(owner, charge)
    }

    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future {
        (**self).settle(owner, adjustments)
    }

    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        (**self).release(owner, leases, lease_id)
    }

    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future {
        (**self).peek_lease(owner, lease)
    }
}
