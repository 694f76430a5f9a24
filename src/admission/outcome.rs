//! A decision becomes headers or an answer: what a request carries from
//! its admission to its outcome ([`Carried`]), and the one code path that
//! resolves a backend's answer, ready or deferred ([`Outcome`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Response;

use crate::backend::{BackendError, Decision};
use crate::feed::Usage;
use crate::key::KeyId;
use crate::lease::Leases;
use crate::meter::{TokenKind, TokenMeter};
use crate::policy::{CategoryId, MAX_LIMITS, Policy, TierId};
use crate::response::{Answer, HeaderOptions, HeaderPlan, LeaseGuard};
use crate::time::{UnixClock, unix_time};
use crate::view::CellView;

/// An admitted request: the headers to write on its response, the meter
/// to put in its extensions (a metered request), and the leases its body
/// holds until it ends (a request under a concurrency limit).
pub(crate) struct Admitted {
    pub(crate) plan: HeaderPlan,
    /// A metered request's meter: the layer's clone, held until the
    /// response head has passed.
    pub(crate) meter: Option<TokenMeter>,
    /// What the response body holds until it ends: an admitted request's
    /// concurrency leases, and with a usage feed its usage record (which
    /// holds the leases), moved into the body when the head passes.
    pub(crate) lease: Option<LeaseGuard>,
}

/// The outcome of a backend's answer.
pub(crate) enum Resolved {
    /// Allowed, with nothing to write or hold: call the inner service.
    Pass,
    /// Allowed: call the inner service, then write these headers.
    Allow(Admitted),
    /// Answered by the layer.
    Answer(Response<Bytes>),
}

/// What a request carries from its admission to its outcome, on the ready
/// path and through a [`Deferred`](super::Deferred) check alike.
pub(super) struct Carried {
    pub(super) tier: TierId,
    pub(super) category: CategoryId,
    pub(super) key: KeyId,
    /// The reserve each charge had to leave (by charge index).
    pub(super) reserves: [u32; MAX_LIMITS],
    /// A metered request's meter, to settle after its response.
    pub(super) meter: Option<TokenMeter>,
    /// A request's concurrency leases (pending until the answer is known),
    /// to hold until its response is over.
    pub(super) lease: Option<Leases>,
    /// The request's usage record, when the layer has a usage feed.
    pub(super) usage: Option<Box<Usage>>,
}

impl Carried {
    /// Whether an allowed request carrying this needs more of its decision
    /// than the verdict: a header plan to make (`options`), or a meter,
    /// leases or a usage record to hold. Without, it passes bare, and its
    /// check need not be described ([`Check::describe`](crate::backend::Check::describe)).
    #[inline(always)]
    pub(super) fn needs_description(&self, options: HeaderOptions) -> bool {
        options.need_plan() || self.meter.is_some() || self.lease.is_some() || self.usage.is_some()
    }
}

/// What settling a check needs from the path that made it.
pub(super) struct Resolving<'a> {
    pub(super) cell: &'a CellView,
    pub(super) carried: Carried,
    #[cfg(feature = "metrics")]
    pub(super) started: std::time::Instant,
}

impl<'a> Resolving<'a> {
    /// Made just before the backend is asked (the check's duration starts).
    #[inline]
    pub(super) fn start(
        cell: &'a CellView,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
    ) -> Self {
        Resolving {
            cell,
            carried: Carried {
                tier,
                category,
                key,
                reserves: [0; MAX_LIMITS],
                meter: None,
                lease: None,
                usage: None,
            },
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }
}

/// What settling a backend's answer needs, borrowed (the ready path) or
/// from a [`Deferred`](super::Deferred) (the deferred path): one code path
/// for both.
pub(super) struct Outcome<'a> {
    pub(super) policy: &'a Policy,
    pub(super) cell: &'a CellView,
    pub(super) carried: &'a mut Carried,
    pub(super) shadowed: &'a AtomicU64,
    pub(super) options: HeaderOptions,
    pub(super) unix_clock: Option<&'a UnixClock>,
}

impl<'a> Outcome<'a> {
    /// Turns a backend's answer into the outcome: the reserve is reported
    /// as part of the limit, and shadow mode turns refusals into counted
    /// passes.
    #[inline]
    pub(super) fn resolve(
        &mut self,
        result: Result<Decision, BackendError>,
        grpc: impl FnOnce() -> bool,
    ) -> Resolved {
        if self.passes(&result) {
            return Resolved::Pass;
        }
        self.resolve_carried(result, grpc)
    }

    /// An allowed answer with no header to write and no meter, lease or
    /// usage record to hold: the request passes as it is (and is counted).
    #[inline(always)]
    fn passes(&self, result: &Result<Decision, BackendError>) -> bool {
        let bare =
            matches!(result, Ok(d) if d.allowed) && !self.carried.needs_description(self.options);
        #[cfg(feature = "metrics")]
        if bare {
            let names = self.names();
            self.cell.metrics(names.0, names.1).allowed.increment(1);
        }
        bare
    }

    #[inline(never)]
    fn resolve_carried(
        &mut self,
        result: Result<Decision, BackendError>,
        grpc: impl FnOnce() -> bool,
    ) -> Resolved {
        let meter = self.carried.meter.take();
        let lease = self.lease_for(&result);
        // Dropped unadmitted unless the request is let through: no event.
        let usage = self.carried.usage.take();
        let result = result.map(|d| self.unreserved(d));
        #[cfg(feature = "metrics")]
        let counters = {
            let names = self.names();
            self.cell.metrics(names.0, names.1)
        };
        match result {
            Ok(d) if d.allowed => {
                #[cfg(feature = "metrics")]
                counters.allowed.increment(1);
                Resolved::Allow(self.allowed(d, meter, lease, usage))
            }
            Ok(d)
                if self
                    .policy
                    .is_shadow(self.carried.tier, self.carried.category) =>
            {
                #[cfg(feature = "metrics")]
                counters.shadow.increment(1);
                Resolved::Allow(self.shadowed(d, meter, usage))
            }
            Ok(d) => {
                #[cfg(feature = "metrics")]
                {
                    counters.refused.increment(1);
                    counters.refusal(&d).increment(1);
                }
                self.refused(d, meter.as_ref(), grpc())
            }
            Err(e) => self.failed(e, grpc()),
        }
    }

    /// A check that failed: a cost no limit could admit (400), or the
    /// backend unavailable (503). Out of line, as every rare outcome: its
    /// frame stays off the stack of the requests that pass.
    #[cold]
    #[inline(never)]
    fn failed(&self, e: BackendError, grpc: bool) -> Resolved {
        if let BackendError::CostExceedsLimit { cost, max } = e {
            let names = self.names();
            let answer = Answer::CostTooHigh {
                cost,
                max,
                tier: names.0,
                category: names.1,
                unit: "requests",
            };
            return Resolved::Answer(answer.into_response(grpc));
        }
        tracing::warn!(error = %e, "rate-limit backend failed; answering 503");
        Resolved::Answer(Answer::Unavailable.into_response(grpc))
    }

    /// The request's leases, if it holds any: leases are held only by an
    /// admitted request; any other answer took none (a shadow-mode pass
    /// included).
    #[inline]
    fn lease_for(&mut self, result: &Result<Decision, BackendError>) -> Option<Leases> {
        match (self.carried.lease.take(), result) {
            (Some(g), Ok(d)) if d.allowed => Some(g),
            (Some(g), _) => {
                g.refused();
                None
            }
            (None, _) => None,
        }
    }

    /// The names of the request's tier and category.
    #[inline]
    fn names(&self) -> (&'a str, &'a str) {
        let policy = self.policy;
        (
            policy.tier_name(self.carried.tier),
            policy.category_name(self.carried.category),
        )
    }

    /// `d` as this request saw it: its charge's reserve is not part of the
    /// limit that applied to it.
    fn unreserved(&self, mut d: Decision) -> Decision {
        let reserves = &self.carried.reserves;
        let reserve = reserves.get(usize::from(d.index)).copied().unwrap_or(0);
        if reserve > 0 {
            // Report the limit that applied to this request.
            d.limit = d.limit.saturating_sub(reserve);
            d.remaining = d.remaining.saturating_sub(reserve);
        }
        d
    }

    /// The headers of `decision` (`meter`, a metered request's, names its
    /// token limits).
    #[inline]
    fn plan(&self, decision: &Decision, meter: Option<&TokenMeter>) -> HeaderPlan {
        let now = if self.options.need_time() {
            unix_time(self.unix_clock)
        } else {
            Duration::ZERO
        };
        let token_limits = match meter {
            Some(m) => [TokenKind::Total, TokenKind::Input, TokenKind::Output]
                .map(|k| decision.tokens_of(k).and_then(|t| m.limit_of(t.index))),
            None => [None; 3],
        };
        HeaderPlan::new(
            decision,
            self.cell.headers.clone(),
            self.options,
            now,
            token_limits,
        )
    }

    /// An admitted request: its meter settles what it used, its leases are
    /// held until its response is over.
    #[inline]
    fn allowed(
        &self,
        d: Decision,
        meter: Option<TokenMeter>,
        lease: Option<Leases>,
        usage: Option<Box<Usage>>,
    ) -> Admitted {
        let plan = self.plan(&d, meter.as_ref());
        if let Some(m) = &meter {
            m.charged();
        }
        #[cfg(feature = "metrics")]
        let names = self.names();
        let lease = lease.map(|g| {
            g.held(
                #[cfg(feature = "metrics")]
                Some(self.cell.leases(names.0, names.1)),
            )
        });
        let lease = match usage {
            None => lease,
            Some(u) => Some(u.admit(meter.clone(), lease)),
        };
        Admitted { plan, meter, lease }
    }

    /// A refusal in shadow mode: counted, logged, and let through.
    #[cold]
    #[inline(never)]
    fn shadowed(
        &self,
        mut d: Decision,
        meter: Option<TokenMeter>,
        usage: Option<Box<Usage>>,
    ) -> Admitted {
        let names = self.names();
        self.shadowed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            tier = names.0,
            category = names.1,
            key = %self.carried.key.redacted(),
            retry_after = ?d.retry_after,
            "shadow mode: would have refused"
        );
        d.retry_after = None;
        // Nothing was counted: the meter settles nothing.
        let plan = self.plan(&d, meter.as_ref());
        let lease = usage.map(|u| u.shadow().admit(meter.clone(), None));
        Admitted { plan, meter, lease }
    }

    /// A refusal: 429 or `RESOURCE_EXHAUSTED`.
    #[inline(never)]
    fn refused(&self, d: Decision, meter: Option<&TokenMeter>, grpc: bool) -> Resolved {
        let (tier, category) = self.names();
        let key = self.carried.key;
        tracing::debug!(
            tier,
            category,
            key = %key.redacted(),
            retry_after = ?d.retry_after,
            "rate limited"
        );
        // The meter names the token limits for the headers; it was never
        // charged, so it settles nothing.
        let refused = Answer::Refused {
            plan: self.plan(&d, meter),
            decision: d,
            tier,
            category,
            key,
        };
        Resolved::Answer(refused.into_response(grpc))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Ready;
    use std::mem::size_of;

    use super::Admitted;
    use crate::admission::Step;
    use crate::backend::{BackendError, Decision};

    /// What an admitted request moves into its response future stays
    /// within 128 bytes, which the compiler copies inline: larger, each
    /// move is a call to `memcpy` (about 30 instructions, measured with
    /// callgrind). The step the path returns is two words, in registers.
    #[test]
    fn a_step_moves_inline() {
        type MemoryCheck = Ready<Result<Decision, BackendError>>;
        assert!(size_of::<Admitted>() <= 128, "{}", size_of::<Admitted>());
        assert!(size_of::<Option<Admitted>>() <= 128);
        assert_eq!(size_of::<Step<MemoryCheck>>(), 2 * size_of::<usize>());
    }
}
