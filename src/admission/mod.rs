//! The request path: **classify → identify → limits → check → outcome**.
//!
//! [`Shared::admit`] reads a request's head and returns a [`Step`]: call
//! the inner service (with what an admitted request holds, its
//! [`Admitted`], written where the caller keeps it), answer (a refusal or a
//! rejection, ready to send) or wait (a backend that needs a round trip).
//! A deferred check carries everything it needs in an owned [`Deferred`],
//! whose [`resolve`](Deferred::resolve) turns the backend's answer into the
//! same outcome the ready path gets. The service, its future, the layer and
//! the usage service depend on this module; it depends on none of them.
//!
//! Inside: this file identifies, classifies and makes the check; `found`
//! is a request once identified (its cost, estimate and reserve);
//! `charges` is the check's charges and leases; `outcome` turns a decision
//! into headers or an answer; `deferred` is a check under way; `priority`
//! reads a request's priority.
//!
//! Branches an admitted request under a plain policy and the memory
//! backend does not take (rejections, features the policy does not use, a
//! backend that answers later, as Redis does, where the round trip dwarfs
//! the layout) are marked with [`cold_path`], and the rare answers are
//! built out of line: the compiler then keeps the code every such request
//! runs closer together, on fewer cache lines. Layout only: every branch
//! behaves as before.

use std::hint::cold_path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};

mod charges;
mod deferred;
mod found;
mod outcome;
mod priority;
mod shed;

pub(crate) use charges::ChargeSet;
pub(crate) use deferred::{Deferred, Waiting};
pub(crate) use outcome::{Admitted, Resolved};

use found::{Found, answered};
use outcome::{Outcome, Resolving};
use priority::reserve_for;

use crate::backend::{Backend, Check, Decision};
use crate::extract::{Extractor, Identity, PeerIp, Rejection, RequestRef, is_grpc};
use crate::feed::{Usage, UsageFeed};
use crate::overload::{Overload, Slot};
use crate::plane::Plane;
use crate::policy::{Applied, CategoryId, Cell, Limit, Limits, Policy, Target, TierId};
use crate::response::{Answer, HeaderOptions, HeaderPlan};
use crate::time::{UnixClock, unix_time};
use crate::view::{PolicyView, ViewSlot};

/// What every clone of the service, the layer and its handles share.
///
/// Aligned to a cache line, so that in its `Arc` the reference counts
/// (written by every clone of the service, and axum clones it per
/// request) sit on a line of their own, apart from the fields every
/// request reads: threads cloning it do not evict each other's reads.
#[repr(align(64))]
pub(crate) struct Shared<E, B> {
    pub(crate) extractor: E,
    /// Shared with the token meters of requests in flight (to settle).
    pub(crate) backend: Arc<B>,
    /// The policy in force with its compiled view, swapped as one.
    pub(crate) view: Arc<ViewSlot>,
    /// The base policy and the operator state layered over it: what every
    /// [`PolicyHandle`](crate::PolicyHandle) and the admin service change.
    pub(crate) plane: Arc<Plane>,
    pub(crate) anonymous: PeerIp,
    pub(crate) headers: HeaderOptions,
    pub(crate) shadowed: Arc<AtomicU64>,
    pub(crate) unix_clock: Option<UnixClock>,
    /// Requests in flight and the capacity, under an `[overload]` table
    /// (per instance: every clone of the layer's service shares it).
    pub(crate) overload: Arc<Overload>,
    /// Where admitted requests' usage events go (`None`: nowhere, and the
    /// path makes no record).
    pub(crate) feed: Option<UsageFeed>,
}

/// What the layer does with a request, decided before any inner call.
///
/// Two words, returned in registers: what an admitted request holds (its
/// headers, meter and leases, an [`Admitted`] of about a hundred bytes)
/// is written once, where the caller keeps it, instead of moving out of
/// the path's frames inside every step (two whole copies per request,
/// of a request that had nothing to hold too).
pub(crate) enum Step<BF> {
    /// Call the inner service; then write the headers of, and hold the
    /// meter and leases of, the [`Admitted`] the path wrote, if it wrote
    /// one (none: not limited, or nothing to write or hold).
    Call,
    /// Answered by the layer (a refusal or a rejection), boxed as the
    /// response future keeps it.
    Answer(Box<Response<Bytes>>),
    /// The backend needs a round trip: its check and everything needed to
    /// resolve its answer.
    Wait(Box<Waiting<BF>>),
}

impl<E, B> Shared<E, B> {
    /// Another front on the same engine: the same policy, operator state,
    /// backend, header options, clock and shadow counter, read through
    /// `extractor` (Envoy's front reads descriptors, not headers).
    #[cfg(feature = "envoy")]
    pub(crate) fn with_extractor<E2>(&self, extractor: E2) -> Shared<E2, B> {
        Shared {
            extractor,
            backend: Arc::clone(&self.backend),
            view: Arc::clone(&self.view),
            plane: Arc::clone(&self.plane),
            anonymous: self.anonymous.clone(),
            headers: self.headers,
            shadowed: Arc::clone(&self.shadowed),
            unix_clock: self.unix_clock.clone(),
            // Envoy's front decides requests it does not serve: no feed.
            feed: None,
            overload: Arc::clone(&self.overload),
        }
    }

    /// Unix seconds now (for boosts), by the same clock as the headers.
    pub(crate) fn unix_now(&self) -> u64 {
        self.unix_time().as_secs()
    }

    /// Unix time now, as the headers write it (the usage report too).
    pub(crate) fn unix_time(&self) -> std::time::Duration {
        unix_time(self.unix_clock.as_ref())
    }

    /// The limits of the caller `identity` in `cell` with the custom
    /// limits and active boosts of its key, account and organisation
    /// applied; `None` when none touch it (the cell's own apply).
    #[inline]
    pub(crate) fn adjusted(
        &self,
        policy: &Policy,
        cell: &Cell,
        tier: TierId,
        category: CategoryId,
        identity: &Identity,
    ) -> Option<Applied> {
        if !policy.has_adjustments() {
            return None;
        }
        let now = if policy.has_boosts() {
            self.unix_now()
        } else {
            0
        };
        policy.adjusted(cell, tier, category, identity.who(), now)
    }
}

/// How a request of a cell is checked: not at all, or as one [`Check`] of
/// every limit that applies (a cell with one limit is a check with one
/// charge). Admission and the usage report both follow it.
pub(crate) enum Path<'a> {
    /// Nothing limits it.
    Pass,
    /// These limits, checked together.
    Check(Limits<'a>),
}

/// The path of a request of `cell` whose limits are `adjusted` (`None`:
/// the cell's own).
#[inline(always)]
pub(crate) fn path<'a>(cell: &'a Cell, adjusted: Option<&'a Applied>) -> Path<'a> {
    match adjusted {
        None if cell.is_unlimited() => Path::Pass,
        Some(a)
            if a.per_key.is_empty()
                && a.per_account.is_empty()
                && a.per_org.is_empty()
                && !a.has_tokens()
                && !cell.leased =>
        {
            Path::Pass
        }
        _ => Path::Check(limits(cell, adjusted)),
    }
}

/// The limits of a request of `cell` whose limits are `adjusted` (`None`:
/// the cell's own).
#[inline(always)]
fn limits<'a>(cell: &'a Cell, adjusted: Option<&'a Applied>) -> Limits<'a> {
    adjusted.map_or_else(|| cell.limits(), Applied::limits)
}

impl<E: Extractor, B> Shared<E, B> {
    /// The caller and its tier: the extractor's identity (or, without a
    /// key, the peer address when the policy has a tier for that), its tier
    /// from the identity or the policy's rule for unknown keys.
    pub(crate) fn identify(
        &self,
        view: &RequestRef<'_>,
        policy: &Policy,
    ) -> Result<(Identity, TierId), Rejection> {
        let identity = match self.extractor.extract(view, policy) {
            Err(Rejection::MissingKey) if policy.missing_key_tier().is_some() => {
                self.anonymous.extract(view, policy)?
            }
            other => other?,
        };
        let tier = identity
            .tier()
            .or_else(|| policy.unknown_key_tier())
            .ok_or(Rejection::UnknownKey)?;
        Ok((identity, tier))
    }
}

impl<E: Extractor, B: Backend> Shared<E, B> {
    /// The whole request path up to the backend's answer. Under an
    /// `[overload]` table, an admitted request's place in the capacity goes
    /// into `slot`, to be held until the inner service answers; what an
    /// admitted request holds (headers to write, a meter, leases) goes into
    /// `admitted`.
    pub(crate) fn admit<T>(
        &self,
        req: &Request<T>,
        slot: &mut Option<Slot>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        self.view
            .with(|view| self.admit_in(view, req, slot, admitted))
    }

    fn admit_in<T>(
        &self,
        guard: &Arc<PolicyView>,
        req: &Request<T>,
        slot: &mut Option<Slot>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        // Classify: which category, at what cost (exempt routes pass).
        match guard
            .policy
            .classify_lazily(req.method(), || req.uri().path())
        {
            Target::Exempt => {
                cold_path();
                match guard.policy.overload_arc() {
                    Some(rules) if rules.sheds_exempt_routes() => self.exempt(rules, req, slot),
                    _ => Step::Call,
                }
            }
            Target::Category { category, cost } => {
                self.admit_to(guard, req, category, cost, Some(slot), admitted)
            }
        }
    }

    /// The request path from a request's category on: identify → limits →
    /// (shed) → check → outcome. The layer classifies by method and path
    /// first; Envoy's front (`crate::envoy`) by a request's descriptors,
    /// and sheds nothing (`slot`: `None`), as it serves no requests itself.
    #[inline]
    pub(crate) fn admit_to<T>(
        &self,
        guard: &Arc<PolicyView>,
        req: &Request<T>,
        category: CategoryId,
        route_cost: u32,
        slot: Option<&mut Option<Slot>>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let view: &PolicyView = guard;
        let policy: &Policy = &view.policy;
        let answer = |a: Answer<'_>| answered(a, req.headers());
        // Identify: who, in which tier.
        let (identity, tier) = match self.identify(&RequestRef::new(req), policy) {
            Ok(found) => found,
            Err(r) => {
                cold_path();
                return answer(Answer::Rejected(r));
            }
        };
        let (Some(cell), Some(cell_view)) =
            (policy.cell(tier, category), view.cell(tier, category))
        else {
            // A tier id from another policy: treat as an unknown key.
            cold_path();
            return answer(Answer::Rejected(Rejection::UnknownKey));
        };
        let found = Found {
            guard,
            req,
            cell,
            cell_view,
            identity,
            tier,
            category,
            route_cost,
        };
        // Limits: the cell's, with custom limits and boosts applied when a
        // policy has any. Those (an `Applied`: kilobytes of limits) are
        // worked out in a frame of their own, out of line, and never cross
        // into this one: returned here, they made this frame ten kilobytes
        // deep for every request.
        if policy.has_adjustments() {
            cold_path();
            return self.admit_adjusted(&found, slot, admitted);
        }
        self.admit_limited(&found, None, slot, admitted)
    }

    /// [`admit_to`](Self::admit_to) under a policy with custom limits or
    /// boosts: the caller's limits adjusted, then the same path.
    #[inline(never)]
    fn admit_adjusted<T>(
        &self,
        found: &Found<'_, T>,
        slot: Option<&mut Option<Slot>>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let f = found;
        let adjusted = self.adjusted(&f.guard.policy, f.cell, f.tier, f.category, &f.identity);
        self.admit_limited(found, adjusted.as_ref(), slot, admitted)
    }

    /// The rest of the request path once its limits are known (`adjusted`:
    /// `None`, the cell's own): (shed) → check → outcome.
    #[inline(always)]
    fn admit_limited<T>(
        &self,
        found: &Found<'_, T>,
        adjusted: Option<&Applied>,
        slot: Option<&mut Option<Slot>>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let policy: &Policy = &found.guard.policy;
        let path = path(found.cell, adjusted);
        // Shed: under an `[overload]` table, before anything is charged.
        if let (Some(rules), Some(slot)) = (policy.overload_arc(), slot)
            && (rules.sheds_unlimited() || matches!(path, Path::Check(_)))
        {
            cold_path();
            match self.shed(found, rules, adjusted) {
                Ok(s) => *slot = Some(s),
                Err(step) => return step,
            }
        }
        match path {
            Path::Pass => {
                cold_path();
                match &self.feed {
                    None => Step::Call,
                    Some(feed) => self.unlimited(feed, found, admitted),
                }
            }
            Path::Check(limits) => self.check(found, limits, adjusted, admitted),
        }
    }

    /// A request under every limit that applies to it (`applied`, the
    /// limits `adjusted` gives: `None`, the cell's own), at once, all or
    /// nothing: one [`Check`]. A check of one charge alone (the common
    /// case) is built on the spot; any other from a [`ChargeSet`], which
    /// reads the limits from `adjusted` again: `applied` must be what
    /// [`path`] gave for them.
    #[inline(always)]
    fn check<T>(
        &self,
        f: &Found<'_, T>,
        applied: Limits<'_>,
        adjusted: Option<&Applied>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let cost = match f.cost([applied.per_key, applied.per_account, applied.per_org]) {
            Ok(cost) => cost,
            Err(step) => return step,
        };
        let pct = match f.reserve_pct() {
            Ok(pct) => pct,
            Err(step) => return step,
        };
        let estimate = if applied.has_tokens() {
            cold_path();
            match f.estimate(applied) {
                Ok(e) => e,
                Err(step) => return step,
            }
        } else {
            0
        };
        let reserve = |max| pct.map_or(0, |p| reserve_for(p, max));
        if let Some((owner, charge)) = ChargeSet::alone(f.cell, applied, &f.identity, cost, reserve)
        {
            let mut resolving = f.resolving();
            resolving.carried.reserves[0] = charge.reserve;
            if let Some(feed) = &self.feed {
                cold_path();
                resolving.carried.usage = Some(self.usage(feed, f, cost));
            }
            let check = Check {
                describe: resolving.carried.needs_description(self.headers),
                ..Check::new(owner, f.identity.is_known(), std::slice::from_ref(&charge))
            };
            let check = self.backend.check(&check);
            return self.resolve_now(f.guard, f.req, check, resolving, admitted);
        }
        cold_path();
        debug_assert_eq!(applied, limits(f.cell, adjusted));
        self.check_set(f, adjusted, cost, estimate, pct, admitted)
    }

    /// A check built from a [`ChargeSet`]: several limits, tokens, leases.
    /// Its limits are read again from `adjusted` (`None`: the cell's own),
    /// not handed over: a list of limits passed to a function out of line
    /// is written out in memory first, on the path of every request.
    #[inline(never)]
    fn check_set<T>(
        &self,
        f: &Found<'_, T>,
        adjusted: Option<&Applied>,
        cost: u32,
        estimate: u32,
        pct: Option<u8>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        // What `limits` gives, written out: through the helper, this
        // function ran about 23 more instructions per request (callgrind).
        let applied = adjusted.map_or_else(|| f.cell.limits(), Applied::limits);
        let reserve = |max| pct.map_or(0, |p| reserve_for(p, max));
        let mut set = ChargeSet::new(f.cell, applied, &f.identity, cost, estimate, reserve);
        if set.has_calendar() {
            set.in_periods(f.guard.policy.calendar(), self.unix_time());
        }
        let mut resolving = f.resolving();
        for (r, c) in resolving.carried.reserves.iter_mut().zip(set.charges()) {
            *r = c.reserve;
        }
        if let Some(feed) = &self.feed {
            resolving.carried.usage = Some(self.usage(feed, f, cost));
        }
        if f.cell.metered {
            resolving.carried.meter = Some(set.meter(
                &self.backend,
                estimate,
                f.cell.refund,
                #[cfg(feature = "metrics")]
                Some(f.cell_view.tokens(
                    f.guard.policy.tier_name(f.tier),
                    f.guard.policy.category_name(f.category),
                )),
            ));
        }
        let lease_id = if set.nleases > 0 {
            let id = crate::lease::next_id();
            resolving.carried.lease = Some(set.pending_leases(&self.backend, id));
            id
        } else {
            0
        };
        let check = self.backend.check(&Check {
            owner: set.owner,
            known: f.identity.is_known(),
            charges: set.charges(),
            tokens: set.tokens,
            split: set.split,
            leases: set.leases(),
            lease_id,
            describe: resolving.carried.needs_description(self.headers),
        });
        self.resolve_now(f.guard, f.req, check, resolving, admitted)
    }

    /// A request nothing limits, admitted with only its usage record (the
    /// layer has a feed: it is billed all the same).
    #[cold]
    #[inline(never)]
    fn unlimited<T>(
        &self,
        feed: &UsageFeed,
        f: &Found<'_, T>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let route = f.route_cost;
        let cost = f.identity.cost().map_or(route, |n| route.saturating_mul(n));
        let usage = self.usage(feed, f, cost);
        // No decision to describe: a plan with every field off.
        let none = HeaderOptions::default()
            .x_ratelimit(false)
            .ietf_draft(false);
        let d = Decision::allow(&Limit::per_second(1), 1);
        let headers = f.cell_view.headers.clone();
        *admitted = Some(Admitted {
            plan: HeaderPlan::new(&d, headers, none, std::time::Duration::ZERO, [None; 3]),
            meter: None,
            lease: Some(usage.admit(None, None)),
        });
        Step::Call
    }

    /// The usage record of request `f` of `cost` units (the layer has a
    /// feed).
    #[inline(never)]
    fn usage<T>(&self, feed: &UsageFeed, f: &Found<'_, T>, cost: u32) -> Box<Usage> {
        let policy = &f.guard.policy;
        Usage::start(
            feed,
            &crate::feed::Start {
                time: self.unix_time(),
                key: f.identity.key(),
                account: f.identity.account(),
                org: f.identity.org(),
                tier: policy.tier_name(f.tier),
                category: policy.category_name(f.category),
                method: f.req.method(),
                path: f.req.uri().path(),
                requests: cost,
            },
        )
    }

    /// Settles a check at once when the backend answered at once, else
    /// hands it to the future with everything it needs.
    #[inline]
    fn resolve_now<T>(
        &self,
        guard: &Arc<PolicyView>,
        req: &Request<T>,
        mut check: B::Future,
        mut s: Resolving<'_>,
        admitted: &mut Option<Admitted>,
    ) -> Step<B::Future> {
        let policy: &Policy = &guard.policy;
        let polled = Pin::new(&mut check).poll(&mut Context::from_waker(Waker::noop()));
        match polled {
            Poll::Ready(result) => {
                #[cfg(feature = "metrics")]
                crate::telemetry::check_duration(s.started.elapsed());
                let mut outcome = Outcome {
                    policy,
                    cell: s.cell,
                    // Borrowed, not moved: what the path just wrote is read
                    // field by field, never copied out whole.
                    carried: &mut s.carried,
                    shadowed: &self.shadowed,
                    options: self.headers,
                    unix_clock: self.unix_clock.as_ref(),
                };
                match outcome.resolve(result, || is_grpc(req.headers())) {
                    Resolved::Pass => Step::Call,
                    Resolved::Allow(a) => {
                        *admitted = Some(a);
                        Step::Call
                    }
                    Resolved::Answer(res) => Step::Answer(Box::new(res)),
                }
            }
            Poll::Pending => {
                cold_path();
                Step::Wait(Box::new(Waiting {
                    check,
                    deferred: Deferred {
                        view: Arc::clone(guard),
                        carried: s.carried,
                        grpc: is_grpc(req.headers()),
                        shadowed: Arc::clone(&self.shadowed),
                        options: self.headers,
                        unix_clock: self.unix_clock.clone(),
                        #[cfg(feature = "metrics")]
                        started: s.started,
                    },
                }))
            }
        }
    }
}
