//! [`Decision`]: what a backend answers for one check (a leaf: it knows
//! only limits).

use std::time::Duration;

use crate::backend::TokenSplit;
use crate::limit::{Limit, Period};
use crate::meter::TokenKind;
use crate::time::ceil_secs;

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
    /// Which of a request's limits this decision describes, when it was
    /// checked together ([`Backend::check`](crate::backend::Backend::check)):
    /// its position among the check's charges (per-key limits first, then
    /// per-account ones). 0 for a single limit.
    pub index: u8,
    /// For a request metered in tokens: its binding token limit at
    /// admission (the [`Decision::binding`] of the token charges that
    /// count every token).
    pub tokens: Option<TokenState>,
    /// For a request under input-token limits: the binding one at
    /// admission.
    pub input_tokens: Option<TokenState>,
    /// For a request under output-token limits: the binding one at
    /// admission.
    pub output_tokens: Option<TokenState>,
    /// For a request under a concurrency limit: its binding lease (the
    /// fewest left), at admission. A refusal for concurrency has
    /// [`LeaseState::refused`] set (and a one-second retry).
    pub lease: Option<LeaseState>,
    /// How the limit counts time: rolling, or per calendar period (then
    /// `window` is the period's nominal length, `reset_after` the time to
    /// its end).
    pub period: Period,
}

/// The binding concurrency limit of a request at admission (what
/// `X-Concurrency-Limit` and `X-Concurrency-Remaining` describe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// The concurrency limit: requests that may be in flight at once.
    pub limit: u32,
    /// Requests that could still start now, after this one (0 on a
    /// refusal).
    pub remaining: u32,
    /// Whether this limit refused the request (every lease it asked for
    /// was free of rate limits, but this one was full).
    pub refused: bool,
    /// Whether the limit is counted per account.
    pub per_account: bool,
}

impl LeaseState {
    /// The lease that binds a request among several: a full one if any
    /// (the request is refused), else the one with the fewest left.
    pub fn binding(leases: impl IntoIterator<Item = LeaseState>) -> Option<LeaseState> {
        leases.into_iter().reduce(|a, b| {
            let worse = match (a.refused, b.refused) {
                (false, true) => true,
                (true, false) => false,
                _ => b.remaining < a.remaining,
            };
            if worse { b } else { a }
        })
    }
}

/// [`Decision::binding_with_tokens`] folded one decision at a time, in
/// charge order (no array of decisions on the request path).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binder {
    best: Option<Decision>,
    /// The binding token limit of each kind (all, input, output).
    token_best: [Option<Decision>; 3],
    /// Where each kind's token charges start (`usize::MAX`: none), in
    /// charge order: all, input, output.
    from: [usize; 3],
}

impl Binder {
    /// For `n` decisions, of which the last `tokens` are token limits',
    /// divided by kind as `split` says.
    #[inline]
    pub(crate) fn new(n: usize, tokens: usize, split: TokenSplit) -> Self {
        let (input, output) = (usize::from(split.input), usize::from(split.output));
        let from = if tokens > 0 && tokens <= n && input + output <= tokens {
            [n - tokens, n - output - input, n - output]
        } else {
            [usize::MAX; 3]
        };
        Binder {
            best: None,
            token_best: [None; 3],
            from,
        }
    }

    /// The decision of charge `i`.
    #[inline]
    pub(crate) fn push(&mut self, i: usize, mut d: Decision) {
        d.index = i as u8;
        if i >= self.from[0] {
            let kind = usize::from(i >= self.from[1]) + usize::from(i >= self.from[2]);
            let best = &mut self.token_best[kind];
            *best = Some(match *best {
                Some(b) if !b.binds_less_than(&d) => b,
                _ => d,
            });
        }
        self.best = Some(match self.best {
            Some(b) if !b.binds_less_than(&d) => b,
            _ => d,
        });
    }

    /// The binding decision, with its binding token limit of each kind.
    #[inline]
    pub(crate) fn finish(self) -> Option<Decision> {
        let mut d = self.best?;
        let state = |t: Option<Decision>| {
            t.map(|t| TokenState {
                remaining: t.remaining,
                index: t.index,
            })
        };
        d.tokens = state(self.token_best[0]);
        d.input_tokens = state(self.token_best[1]);
        d.output_tokens = state(self.token_best[2]);
        Some(d)
    }
}

/// How long a request refused for concurrency is told to wait: a lease is
/// freed when any request in flight ends, which cannot be predicted.
pub const LEASE_RETRY: Duration = Duration::from_secs(1);

/// The binding token limit of a request metered in tokens, at admission
/// (what `X-RateLimit-*-Tokens` describe: the limit is its charge's). The
/// response may still charge more when it settles. Small on purpose: every
/// decision carries the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenState {
    /// Tokens left after this request's estimate.
    pub remaining: u32,
    /// Its charge's position in the check.
    pub index: u8,
}

impl Decision {
    /// An allowed request whose check was not to be described
    /// ([`Check::describe`](crate::backend::Check::describe) `false`): its
    /// limit and window, with `remaining` and `reset_after` left at zero
    /// (nothing reads them).
    ///
    /// ```
    /// use tierlimit::{Limit, backend::Decision};
    ///
    /// let d = Decision::allow_undescribed(&Limit::per_second(10));
    /// assert!(d.allowed);
    /// assert_eq!((d.limit, d.remaining, d.retry_after), (10, 0, None));
    /// ```
    #[inline]
    pub fn allow_undescribed(limit: &Limit) -> Self {
        // Not `allow` with two fields replaced: the reset `allow` works
        // out would be worked out only to be dropped.
        Self::allowed(limit, 0, Duration::ZERO)
    }

    /// The decision for an allowed request that leaves `remaining` of
    /// `limit` (GCRA: the bucket is full again `(max - remaining) × per/max`
    /// later, to the emission interval's resolution).
    #[inline]
    pub fn allow(limit: &Limit, remaining: u32) -> Self {
        let remaining = remaining.min(limit.max());
        let reset_after = nanos(
            u128::from(limit.max() - remaining) * u128::from(limit.emission_interval_nanos()),
        );
        Self::allowed(limit, remaining, reset_after)
    }

    /// An allowed request's decision under `limit`.
    #[inline]
    fn allowed(limit: &Limit, remaining: u32, reset_after: Duration) -> Self {
        Decision {
            allowed: true,
            limit: limit.max(),
            remaining,
            reset_after,
            retry_after: None,
            window: limit.per(),
            index: 0,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            lease: None,
            period: limit.period(),
        }
    }

    /// The decision for a refused request of `cost` that would conform
    /// `retry_after` from now.
    pub fn refuse(limit: &Limit, cost: u32, retry_after: Duration) -> Self {
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
            index: 0,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            lease: None,
            period: limit.period(),
        }
    }
}

impl Decision {
    /// A calendar limit's decision: `used` units counted in its period
    /// (this request's included when it is allowed), which ends
    /// `until_end` from now. A refusal is told to come back then, when the
    /// next period starts; the limit is full again then too.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tierlimit::{Limit, backend::Decision, policy::Period};
    ///
    /// let day = Limit::per_day(5).with_period(Period::CalendarDay).unwrap();
    /// let d = Decision::in_period(&day, false, 5, Duration::from_secs(1));
    /// assert_eq!((d.remaining, d.retry_after), (0, Some(Duration::from_secs(1))));
    /// ```
    pub fn in_period(limit: &Limit, allowed: bool, used: u64, until_end: Duration) -> Self {
        let left = u64::from(limit.max()).saturating_sub(used);
        Decision {
            allowed,
            limit: limit.max(),
            remaining: left.min(u64::from(u32::MAX)) as u32,
            reset_after: until_end,
            retry_after: (!allowed).then_some(until_end),
            window: limit.per(),
            index: 0,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            lease: None,
            period: limit.period(),
        }
    }
}

impl Decision {
    /// The decision that describes a request checked against several
    /// limits, given each limit's (allowed or refused) decision in charge
    /// order: on an allow, the limit with the fewest requests remaining
    /// (ties: the longer window); on a refusal, the refusing limit with the
    /// longest retry delay, which is also when *every* limit admits the
    /// request. `None` for an empty list.
    pub fn binding(decisions: impl IntoIterator<Item = Decision>) -> Option<Decision> {
        let mut b = Binder::new(0, 0, TokenSplit::NONE);
        for (i, d) in decisions.into_iter().enumerate() {
            b.push(i, d);
        }
        b.finish()
    }

    /// Whether the request was refused because a concurrency limit was full.
    #[inline]
    pub fn is_concurrency_refusal(&self) -> bool {
        !self.allowed && self.lease.is_some_and(|l| l.refused)
    }

    /// The decision for a request under concurrency limits only (no rate
    /// limit): `window` is zero, and the layer writes no `X-RateLimit-*`.
    pub fn leases_only(lease: LeaseState) -> Self {
        Decision {
            allowed: !lease.refused,
            limit: lease.limit,
            remaining: lease.remaining,
            reset_after: Duration::ZERO,
            retry_after: lease.refused.then_some(LEASE_RETRY),
            window: Duration::ZERO,
            index: 0,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            lease: Some(lease),
            period: Period::Rolling,
        }
    }

    /// This decision, for a request whose leases were all free
    /// (`lease` is the binding one) or, when `lease.refused`, whose rate
    /// limits all admit it but one lease is full: refused, with a
    /// one-second retry, counting nothing.
    pub fn with_lease(mut self, lease: LeaseState) -> Self {
        if lease.refused {
            self.allowed = false;
            self.retry_after = Some(LEASE_RETRY);
        }
        self.lease = Some(lease);
        self
    }

    /// The limit's window as an answer's text writes it: `3600 s`, or
    /// `calendar day` (week, month).
    pub(crate) fn per_text(&self) -> String {
        match self.period.name() {
            Some(name) => format!("calendar {name}"),
            None => format!("{} s", ceil_secs(self.window)),
        }
    }

    /// Whether this (binding) decision is a token limit's (of any kind).
    #[inline]
    pub fn is_tokens(&self) -> bool {
        self.token_kind().is_some()
    }

    /// What the binding limit counts when it is a token limit's: every
    /// token, input tokens or output tokens (`None`: requests).
    #[inline]
    pub fn token_kind(&self) -> Option<TokenKind> {
        let binds = |t: Option<TokenState>| t.is_some_and(|t| t.index == self.index);
        if binds(self.tokens) {
            Some(TokenKind::Total)
        } else if binds(self.input_tokens) {
            Some(TokenKind::Input)
        } else if binds(self.output_tokens) {
            Some(TokenKind::Output)
        } else {
            None
        }
    }

    /// The binding token limit of `kind`, at admission.
    #[inline]
    pub fn tokens_of(&self, kind: TokenKind) -> Option<TokenState> {
        match kind {
            TokenKind::Total => self.tokens,
            TokenKind::Input => self.input_tokens,
            TokenKind::Output => self.output_tokens,
        }
    }

    /// What the binding limit counts, as an answer names it: `requests`,
    /// `tokens`, `input tokens` or `output tokens`.
    #[inline]
    pub(crate) fn unit(&self) -> &'static str {
        self.token_kind().map_or("requests", TokenKind::unit)
    }

    /// [`binding`](Self::binding) over all of a check's decisions, with the
    /// last `tokens` of them (the token charges) also giving
    /// [`tokens`](Self::tokens): their own binding limit.
    pub fn binding_with_tokens(decisions: &[Decision], tokens: usize) -> Option<Decision> {
        Self::binding_with_split(decisions, tokens, TokenSplit::NONE)
    }

    /// [`binding_with_tokens`](Self::binding_with_tokens), with the token
    /// charges divided by kind as `split` says: each kind's binding limit
    /// in [`tokens`](Self::tokens), [`input_tokens`](Self::input_tokens)
    /// and [`output_tokens`](Self::output_tokens).
    pub fn binding_with_split(
        decisions: &[Decision],
        tokens: usize,
        split: TokenSplit,
    ) -> Option<Decision> {
        let mut b = Binder::new(decisions.len(), tokens, split);
        for (i, d) in decisions.iter().enumerate() {
            b.push(i, *d);
        }
        b.finish()
    }

    /// Whether `other` describes the request better than `self`.
    fn binds_less_than(&self, other: &Decision) -> bool {
        match (self.allowed, other.allowed) {
            (true, false) => true,
            (false, true) => false,
            (false, false) => other.retry_after > self.retry_after,
            (true, true) => {
                other.remaining < self.remaining
                    || (other.remaining == self.remaining && other.window > self.window)
            }
        }
    }
}

/// A decision as every answer writes it, in whole numbers at one Unix
/// time: the `X-RateLimit-*` headers of an allowed or a refused request and
/// the usage report (its `limit`, `remaining`, `reset`, `window`) all take
/// their numbers from [`Decision::shown`], so they cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shown {
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    /// Unix seconds when the bucket is full again, rounded up.
    pub(crate) reset: u64,
    /// The window in seconds, rounded up.
    pub(crate) window: u64,
}

impl Decision {
    /// This decision's numbers at Unix time `now`.
    #[inline]
    pub(crate) fn shown(&self, now: Duration) -> Shown {
        Shown {
            limit: self.limit,
            remaining: self.remaining,
            reset: ceil_secs(now + self.reset_after),
            window: ceil_secs(self.window),
        }
    }
}

#[inline]
fn nanos(n: u128) -> Duration {
    Duration::from_nanos(n.min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_arithmetic() {
        let l = Limit::per_second(10); // T = 100ms
        let d = Decision::refuse(&l, 1, Duration::from_millis(40));
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, Duration::from_millis(940));
        // A cost of 5 with 3 available: retry after 2 × T.
        let d = Decision::refuse(&l, 5, Duration::from_millis(200));
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after, Duration::from_millis(700));
        let a = Decision::allow(&l, 7);
        assert_eq!(a.reset_after, Duration::from_millis(300));
    }
}
