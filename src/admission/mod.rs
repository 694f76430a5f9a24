//! The request path, in one module: **identify → classify → rule →
//! backend check → outcome**.
//!
//! [`Shared::admit`] reads a request's head and returns a [`Step`]: pass
//! (not limited), allow (with the headers to write), answer (a refusal or a
//! rejection, ready to send) or wait (a backend that needs a round trip).
//! A deferred check carries everything it needs in an owned [`Deferred`],
//! whose [`settle`](Deferred::settle) turns the backend's answer into the
//! same outcome the ready path gets. The service, its future, the layer and
//! the usage service depend on this module; it depends on none of them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};

use crate::backend::{
    Backend, BackendError, Charge, Check, Decision, Lease, MAX_LEASES, limit_bucket,
};
use crate::extract::{Extractor, Identity, PeerIp, Priority, Rejection, RequestRef};
use crate::key::KeyId;
use crate::lease::LeaseGuard;
use crate::meter::{Seed, Settler, TokenMeter};
use crate::policy::{
    Applied, CategoryId, Cell, Limit, Limits, MAX_LIMITS, Policy, Pool, Target, TierId,
};
use crate::response::grpc::is_grpc;
use crate::response::{Answer, HeaderOptions, HeaderPlan};
use crate::view::{CellView, PolicyView, ViewSlot};

/// A source of Unix time in seconds (for boosts; tests inject one).
pub type UnixClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What every clone of the service, the layer and its handles share.
pub(crate) struct Shared<E, B> {
    pub(crate) extractor: E,
    /// Shared with the token meters of requests in flight (to settle).
    pub(crate) backend: Arc<B>,
    /// The policy in force with its compiled view, swapped as one.
    pub(crate) view: Arc<ViewSlot>,
    /// The base policy and the operator state layered over it: what every
    /// [`PolicyHandle`](crate::PolicyHandle) and the admin service change.
    pub(crate) plane: Arc<crate::plane::Plane>,
    pub(crate) anonymous: PeerIp,
    pub(crate) headers: HeaderOptions,
    pub(crate) shadowed: Arc<AtomicU64>,
    pub(crate) unix_clock: Option<UnixClock>,
}

/// What the layer does with a request, decided before any inner call.
pub(crate) enum Step<BF> {
    /// Not limited: call the inner service, write no headers.
    Pass,
    /// Allowed: call the inner service, then write these headers.
    Allow(HeaderPlan),
    /// Answered by the layer (a refusal or a rejection).
    Answer(Response<Bytes>),
    /// The backend needs a round trip; settle its answer with `Deferred`.
    Wait(BF, Box<Deferred>),
}

/// The outcome of a backend's answer.
pub(crate) enum Settled {
    /// Allowed: call the inner service, then write these headers.
    Allow(HeaderPlan),
    /// Answered by the layer.
    Answer(Response<Bytes>),
}

impl<E, B> Shared<E, B> {
    /// Unix seconds now (for boosts), by the same clock as the headers.
    pub(crate) fn unix_now(&self) -> u64 {
        self.unix_time().as_secs()
    }

    /// Unix time now, as the headers write it (the usage report too).
    pub(crate) fn unix_time(&self) -> std::time::Duration {
        unix_time(self.unix_clock.as_ref())
    }

    /// The limits of `key` in `cell` with its custom limits and active
    /// boosts applied; `None` when none touch it (the cell's own apply).
    #[inline]
    pub(crate) fn adjusted(
        &self,
        policy: &Policy,
        cell: &Cell,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
    ) -> Option<Applied> {
        if !policy.has_adjustments() {
            return None;
        }
        let now = if policy.has_boosts() {
            self.unix_now()
        } else {
            0
        };
        policy.adjusted(cell, tier, category, key, now)
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
        None => Path::Check(cell.limits()),
        Some(a) if a.per_key.is_empty() && a.per_account.is_empty() => {
            if !a.has_tokens() && !cell.leased {
                Path::Pass
            } else {
                Path::Check(a.limits())
            }
        }
        Some(a) => Path::Check(a.limits()),
    }
}

/// Unix time now, by the injected clock if there is one.
fn unix_time(clock: Option<&UnixClock>) -> std::time::Duration {
    match clock {
        Some(c) => std::time::Duration::from_secs(c()),
        None => crate::time::unix_now_fast(),
    }
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
    /// The whole request path up to the backend's answer.
    pub(crate) fn admit<T>(&self, req: &Request<T>) -> Step<B::Future> {
        self.view.with(|view| self.admit_in(view, req))
    }

    fn admit_in<T>(&self, guard: &Arc<PolicyView>, req: &Request<T>) -> Step<B::Future> {
        let view: &PolicyView = guard;
        let policy: &Policy = &view.policy;
        let answer = |a: Answer<'_>| Step::Answer(a.into_response(is_grpc(req.headers())));

        // Classify: which category, at what cost (exempt routes pass).
        let (category, route_cost) = match policy.classify(req.method(), req.uri().path()) {
            Target::Exempt => return Step::Pass,
            Target::Category { category, cost } => (category, cost),
        };
        // Identify: who, in which tier.
        let (identity, tier) = match self.identify(&RequestRef::new(req), policy) {
            Ok(found) => found,
            Err(r) => return answer(Answer::Rejected(r)),
        };
        let (Some(cell), Some(cell_view)) =
            (policy.cell(tier, category), view.cell(tier, category))
        else {
            // A tier id from another policy: treat as an unknown key.
            return answer(Answer::Rejected(Rejection::UnknownKey));
        };
        // Limits: the cell's, with custom limits and boosts applied (when a
        // policy has any, and they touch this key).
        let adjusted = self.adjusted(policy, cell, tier, category, identity.key());
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
        match path(cell, adjusted.as_ref()) {
            Path::Pass => Step::Pass,
            Path::Check(limits) => self.check(&found, limits),
        }
    }

    /// A request under every limit that applies to it, at once, all or
    /// nothing: one [`Check`].
    #[inline]
    fn check<T>(&self, f: &Found<'_, T>, applied: Limits<'_>) -> Step<B::Future> {
        let limits = applied.per_key.iter();
        let cost = match f.cost(limits.chain(applied.per_account).copied()) {
            Ok(cost) => cost,
            Err(step) => return step,
        };
        let pct = match f.reserve_pct() {
            Ok(pct) => pct,
            Err(step) => return step,
        };
        let estimate = if applied.has_tokens() {
            match f.estimate(applied) {
                Ok(e) => e,
                Err(step) => return step,
            }
        } else {
            0
        };
        let set = ChargeSet::new(f.cell, applied, &f.identity, cost, estimate, |max| {
            pct.map_or(0, |p| reserve_for(p, max))
        });
        let mut settle = f.settle();
        for (r, c) in settle.carried.reserves.iter_mut().zip(set.charges()) {
            *r = c.reserve;
        }
        if f.cell.metered {
            settle.carried.meter = Some(TokenMeter::new(Seed {
                owner: set.owner,
                charges: set.items,
                len: set.len as u8,
                tokens: set.tokens,
                estimate,
                refund: f.cell.refund,
                sink: Arc::clone(&self.backend) as Arc<dyn Settler>,
                #[cfg(feature = "metrics")]
                counters: Some(f.cell_view.tokens(
                    f.guard.policy.tier_name(f.tier),
                    f.guard.policy.category_name(f.category),
                )),
            }));
        }
        let lease_id = if set.nleases > 0 {
            let id = crate::lease::next_id();
            settle.carried.lease = Some(LeaseGuard::pending(
                set.owner,
                set.leases(),
                id,
                Arc::clone(&self.backend) as Arc<dyn Settler>,
            ));
            id
        } else {
            0
        };
        let check = self.backend.check(&Check {
            owner: set.owner,
            known: f.identity.is_known(),
            charges: set.charges(),
            tokens: set.tokens,
            leases: set.leases(),
            lease_id,
        });
        self.settle_now(f.guard, f.req, check, settle)
    }

    /// Settles a check at once when the backend answered at once, else
    /// hands it to the future with everything it needs.
    #[inline]
    fn settle_now<T>(
        &self,
        guard: &Arc<PolicyView>,
        req: &Request<T>,
        mut check: B::Future,
        s: Settle<'_>,
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
                    carried: s.carried,
                    shadowed: &self.shadowed,
                    options: self.headers,
                    unix_clock: self.unix_clock.as_ref(),
                };
                match outcome.settle(result, || is_grpc(req.headers())) {
                    Settled::Allow(plan) => Step::Allow(plan),
                    Settled::Answer(res) => Step::Answer(res),
                }
            }
            Poll::Pending => Step::Wait(
                check,
                Box::new(Deferred {
                    view: Arc::clone(guard),
                    carried: s.carried,
                    grpc: is_grpc(req.headers()),
                    shadowed: Arc::clone(&self.shadowed),
                    options: self.headers,
                    unix_clock: self.unix_clock.clone(),
                    #[cfg(feature = "metrics")]
                    started: s.started,
                }),
            ),
        }
    }
}

/// A request classified and identified, its cell found: what both
/// admission paths read.
struct Found<'a, T> {
    guard: &'a Arc<PolicyView>,
    req: &'a Request<T>,
    cell: &'a Cell,
    cell_view: &'a CellView,
    identity: Identity,
    tier: TierId,
    category: CategoryId,
    route_cost: u32,
}

impl<T> Found<'_, T> {
    fn answer<F>(&self, a: Answer<'_>) -> Step<F> {
        Step::Answer(a.into_response(is_grpc(self.req.headers())))
    }

    /// The request's cost: the route's cost is a floor, an extractor's
    /// count multiplies it; 0 is a rejection, and a cost above any of
    /// `limits`' bursts could never succeed.
    #[inline(always)]
    #[allow(clippy::result_large_err)] // the answer itself, moved once, on the error path only
    fn cost<F>(&self, limits: impl Iterator<Item = Limit>) -> Result<u32, Step<F>> {
        let route = self.route_cost;
        let cost = self
            .identity
            .cost()
            .map_or(route, |n| route.saturating_mul(n));
        if cost == 0 {
            return Err(self.answer(Answer::Rejected(Rejection::InvalidCost(
                "a cost must be at least 1",
            ))));
        }
        self.fits(cost, limits, "requests")
    }

    /// `n` units, if every one of `limits` could ever admit them: else the
    /// 400 that says which burst it exceeds.
    #[inline(always)]
    #[allow(clippy::result_large_err)] // as `cost`
    fn fits<F>(
        &self,
        n: u32,
        mut limits: impl Iterator<Item = Limit>,
        unit: &'static str,
    ) -> Result<u32, Step<F>> {
        match limits.find(|l| n > l.max()) {
            None => Ok(n),
            Some(l) => {
                let policy = &self.guard.policy;
                Err(self.answer(Answer::CostTooHigh {
                    cost: n,
                    max: l.max(),
                    tier: policy.tier_name(self.tier),
                    category: policy.category_name(self.category),
                    unit,
                }))
            }
        }
    }

    /// The request's token estimate (1 unless the extractor set one),
    /// which must fit every token limit's burst.
    #[allow(clippy::result_large_err)] // as `cost`
    fn estimate<F>(&self, applied: Limits<'_>) -> Result<u32, Step<F>> {
        let estimate = self.identity.tokens().unwrap_or(1).max(1);
        let limits = applied.tokens.iter().chain(applied.account_tokens);
        self.fits(estimate, limits.copied(), "tokens")
    }

    /// The tier's priority reserve, in percent, if this request must leave
    /// it (`None`: no reserve, or a critical request). Only tiers with a
    /// reserve read `X-Request-Priority`.
    #[inline(always)]
    #[allow(clippy::result_large_err)] // as `cost`
    fn reserve_pct<F>(&self) -> Result<Option<u8>, Step<F>> {
        let pct = self.guard.policy.priority_reserve(self.tier);
        if pct == 0 {
            return Ok(None);
        }
        match critical(self.req.headers(), self.identity.priority()) {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(pct)),
            Err(r) => Err(self.answer(Answer::Rejected(r))),
        }
    }

    /// The settlement's parts, made just before the backend is asked.
    #[inline]
    fn settle(&self) -> Settle<'_> {
        Settle::start(
            self.cell_view,
            self.tier,
            self.category,
            self.identity.key(),
        )
    }
}

/// The charges of a request under several limits: per-key limits (per
/// account in a pooled tier), then per-account ones, each in its own
/// bucket, all under one owner.
pub(crate) struct ChargeSet {
    pub(crate) owner: u64,
    items: [Charge; MAX_LIMITS],
    len: usize,
    /// How many of the last charges are token limits.
    pub(crate) tokens: u8,
    leases: [Lease; MAX_LEASES],
    pub(crate) nleases: usize,
}

impl ChargeSet {
    pub(crate) fn new(
        cell: &Cell,
        applied: Limits<'_>,
        identity: &Identity,
        cost: u32,
        estimate: u32,
        reserve: impl Fn(u32) -> u32,
    ) -> Self {
        let account = identity.account_or_key().as_u64();
        let key_owner = match cell.pool {
            Pool::Key => identity.key().as_u64(),
            Pool::Account => account,
        };
        let owner = if cell.pool == Pool::Account
            || !applied.per_account.is_empty()
            || !applied.account_tokens.is_empty()
            || cell.account_concurrency.is_some()
        {
            account
        } else {
            key_owner
        };
        let limits = applied
            .per_key
            .iter()
            .map(|l| (*l, key_owner ^ cell.scope))
            .chain(
                applied
                    .per_account
                    .iter()
                    .map(|l| (*l, account ^ cell.account_scope)),
            );
        let mut items = [Charge {
            bucket: 0,
            limit: Limit::per_second(1),
            cost: 1,
            reserve: 0,
        }; MAX_LIMITS];
        let mut len = 0;
        for (slot, (limit, base)) in items.iter_mut().zip(limits) {
            *slot = Charge {
                bucket: limit_bucket(base, &limit),
                limit,
                cost,
                reserve: reserve(limit.max()),
            };
            len += 1;
        }
        // Token buckets apart from request buckets of the same limit.
        let tokens = applied
            .tokens
            .iter()
            .map(|l| (*l, key_owner ^ cell.scope ^ TOKENS))
            .chain(
                applied
                    .account_tokens
                    .iter()
                    .map(|l| (*l, account ^ cell.account_scope ^ TOKENS)),
            );
        let mut n = 0u8;
        for (slot, (limit, base)) in items[len..].iter_mut().zip(tokens) {
            *slot = Charge {
                bucket: limit_bucket(base, &limit),
                limit,
                cost: estimate.max(1),
                reserve: 0,
            };
            len += 1;
            n += 1;
        }
        let mut leases = [Lease {
            bucket: 0,
            max: 1,
            per_account: false,
        }; MAX_LEASES];
        let mut nleases = 0;
        let wanted = [
            cell.concurrency
                .map(|max| (max, key_owner ^ cell.scope, false)),
            cell.account_concurrency
                .map(|max| (max, account ^ cell.account_scope, true)),
        ];
        for (max, base, per_account) in wanted.into_iter().flatten() {
            leases[nleases] = Lease {
                bucket: (base ^ LEASES).rotate_left(29),
                max,
                per_account,
            };
            nleases += 1;
        }
        ChargeSet {
            owner,
            items,
            len,
            tokens: n,
            leases,
            nleases,
        }
    }

    #[inline]
    pub(crate) fn charges(&self) -> &[Charge] {
        &self.items[..self.len]
    }

    #[inline]
    pub(crate) fn leases(&self) -> &[Lease] {
        &self.leases[..self.nleases]
    }
}

/// Mixed into token buckets ("tokens").
const TOKENS: u64 = 0x746f_6b65_6e73;

/// Mixed into concurrency buckets ("leases").
const LEASES: u64 = 0x6c65_6173_6573;

/// What a request carries from its admission to its outcome, on the ready
/// path and through a [`Deferred`] check alike.
struct Carried {
    tier: TierId,
    category: CategoryId,
    key: KeyId,
    /// The reserve each charge had to leave (by charge index).
    reserves: [u32; MAX_LIMITS],
    /// A metered request's meter, to settle after its response.
    meter: Option<TokenMeter>,
    /// A request's concurrency leases (pending until the answer is known),
    /// to hold until its response is over.
    lease: Option<LeaseGuard>,
}

/// What settling a check needs from the path that made it.
struct Settle<'a> {
    cell: &'a CellView,
    carried: Carried,
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl<'a> Settle<'a> {
    /// Made just before the backend is asked (the check's duration starts).
    #[inline]
    fn start(cell: &'a CellView, tier: TierId, category: CategoryId, key: KeyId) -> Self {
        Settle {
            cell,
            carried: Carried {
                tier,
                category,
                key,
                reserves: [0; MAX_LIMITS],
                meter: None,
                lease: None,
            },
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }
}

/// Whether a request is critical (by its `X-Request-Priority`, else its
/// identity's priority): critical requests may use a tier's reserve.
fn critical(headers: &http::HeaderMap, priority: Priority) -> Result<bool, Rejection> {
    let priority = match headers.get(&X_REQUEST_PRIORITY) {
        Some(v) => parse_priority(v.as_bytes()).ok_or(Rejection::InvalidPriority)?,
        None => priority,
    };
    Ok(priority == Priority::Critical)
}

/// The capacity of a limit of burst `max` a request that is not critical
/// must leave, under a reserve of `pct` percent. A custom or scaled limit
/// may be smaller than the tier's: never reserve the whole burst.
fn reserve_for(pct: u8, max: u32) -> u32 {
    crate::policy::reserve_of(max, pct).min(max - 1)
}

static X_REQUEST_PRIORITY: http::HeaderName = http::HeaderName::from_static("x-request-priority");

fn parse_priority(v: &[u8]) -> Option<Priority> {
    let v = v.trim_ascii();
    if v.eq_ignore_ascii_case(b"critical") {
        Some(Priority::Critical)
    } else if v.eq_ignore_ascii_case(b"normal") {
        Some(Priority::Normal)
    } else if v.eq_ignore_ascii_case(b"sheddable") {
        Some(Priority::Sheddable)
    } else {
        None
    }
}

/// What settling a backend's answer needs, borrowed (the ready path) or
/// from a [`Deferred`] (the deferred path): one code path for both.
struct Outcome<'a> {
    policy: &'a Policy,
    cell: &'a CellView,
    carried: Carried,
    shadowed: &'a AtomicU64,
    options: HeaderOptions,
    unix_clock: Option<&'a UnixClock>,
}

impl Outcome<'_> {
    /// Turns a backend's answer into the outcome: the reserve is reported
    /// as part of the limit, and shadow mode turns refusals into counted
    /// passes.
    fn settle(
        &mut self,
        result: Result<Decision, BackendError>,
        grpc: impl FnOnce() -> bool,
    ) -> Settled {
        let meter = self.carried.meter.take();
        // Leases are held only by an admitted request; any other answer
        // took none (a shadow-mode pass included).
        let lease = match (self.carried.lease.take(), &result) {
            (Some(g), Ok(d)) if d.allowed => Some(g),
            (Some(g), _) => {
                g.refused();
                None
            }
            (None, _) => None,
        };
        let policy = self.policy;
        let (tier, category, key) = (self.carried.tier, self.carried.category, self.carried.key);
        let names = (policy.tier_name(tier), policy.category_name(category));
        let plan = |decision: Decision| HeaderPlan {
            decision,
            cell: self.cell.headers.clone(),
            options: self.options,
            now: if self.options.need_time() {
                unix_time(self.unix_clock)
            } else {
                std::time::Duration::ZERO
            },
            meter: None,
            lease: None,
        };
        let result = result.map(|mut d| {
            let reserve = self
                .carried
                .reserves
                .get(usize::from(d.index))
                .copied()
                .unwrap_or(0);
            if reserve > 0 {
                // Report the limit that applied to this request.
                d.limit = d.limit.saturating_sub(reserve);
                d.remaining = d.remaining.saturating_sub(reserve);
            }
            d
        });
        #[cfg(feature = "metrics")]
        let counters = Some(self.cell.metrics(names.0, names.1));
        match result {
            Ok(d) if d.allowed => {
                #[cfg(feature = "metrics")]
                if let Some(m) = counters {
                    m.allowed.increment(1);
                }
                let mut plan = plan(d);
                if let Some(m) = &meter {
                    m.charged();
                }
                plan.meter = meter;
                plan.lease = lease.map(|g| {
                    g.held(
                        #[cfg(feature = "metrics")]
                        Some(self.cell.leases(names.0, names.1)),
                    )
                });
                Settled::Allow(plan)
            }
            Ok(mut d) if policy.is_shadow(tier, category) => {
                #[cfg(feature = "metrics")]
                if let Some(m) = counters {
                    m.shadow.increment(1);
                }
                self.shadowed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    tier = names.0,
                    category = names.1,
                    key = %key.redacted(),
                    retry_after = ?d.retry_after,
                    "shadow mode: would have refused"
                );
                d.retry_after = None;
                // Nothing was counted: the meter settles nothing.
                let mut plan = plan(d);
                plan.meter = meter;
                Settled::Allow(plan)
            }
            Ok(d) => {
                #[cfg(feature = "metrics")]
                if let Some(m) = counters {
                    m.refused.increment(1);
                    m.refusal(&d).increment(1);
                }
                tracing::debug!(
                    tier = names.0,
                    category = names.1,
                    key = %key.redacted(),
                    retry_after = ?d.retry_after,
                    "rate limited"
                );
                // The meter names the token limits for the headers; it
                // was never charged, so it settles nothing.
                let mut plan = plan(d);
                plan.meter = meter;
                let refused = Answer::Refused {
                    plan,
                    tier: names.0,
                    category: names.1,
                    key,
                };
                Settled::Answer(refused.into_response(grpc()))
            }
            Err(BackendError::CostExceedsLimit { cost, max }) => {
                let answer = Answer::CostTooHigh {
                    cost,
                    max,
                    tier: names.0,
                    category: names.1,
                    unit: "requests",
                };
                Settled::Answer(answer.into_response(grpc()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate-limit backend failed; answering 503");
                Settled::Answer(Answer::Unavailable.into_response(grpc()))
            }
        }
    }
}

/// A check under way: everything needed to settle it, owned.
pub(crate) struct Deferred {
    view: Arc<PolicyView>,
    carried: Carried,
    grpc: bool,
    shadowed: Arc<AtomicU64>,
    options: HeaderOptions,
    unix_clock: Option<UnixClock>,
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("tier", &self.carried.tier)
            .field("category", &self.carried.category)
            .field("key", &self.carried.key.redacted())
            .finish_non_exhaustive()
    }
}

impl Deferred {
    /// Turns the backend's answer into the outcome (as the ready path does).
    pub(crate) fn settle(self, result: Result<Decision, BackendError>) -> Settled {
        #[cfg(feature = "metrics")]
        crate::telemetry::check_duration(self.started.elapsed());
        let Some(cell) = self.view.cell(self.carried.tier, self.carried.category) else {
            // Not reachable with ids admit() took from this same view; an
            // unknown key is the safe answer all the same.
            let answer = Answer::Rejected(Rejection::UnknownKey);
            return Settled::Answer(answer.into_response(self.grpc));
        };
        let mut outcome = Outcome {
            policy: &self.view.policy,
            cell,
            carried: self.carried,
            shadowed: &self.shadowed,
            options: self.options,
            unix_clock: self.unix_clock.as_ref(),
        };
        outcome.settle(result, || self.grpc)
    }
}
