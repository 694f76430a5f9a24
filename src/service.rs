//! [`RateLimit`], the middleware service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::backend::MemoryBackend;
use crate::backend::{Backend, BackendError, Decision, Subject};
use crate::extract::{ApiKey, Extractor, Priority, Rejection, RequestRef};
use crate::future::{Pending, ResponseFuture};
use crate::key::KeyId;
use crate::layer::Shared;
use crate::policy::{CategoryId, Policy, Rule, Target, TierId};
use crate::response::ResponseBody;
use crate::response::grpc::is_grpc;
use crate::response::headers::HeaderPlan;
use crate::response::http::Refusal;

/// The rate-limiting service made by [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Cheap to clone (an `Arc` and the inner service). The check happens in
/// `call`, never in `poll_ready`, so every clone enforces the same limits.
pub struct RateLimit<S, E = ApiKey, B = MemoryBackend> {
    inner: S,
    shared: Arc<Shared<E, B>>,
}

impl<S: Clone, E, B> Clone for RateLimit<S, E, B> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, E, B> fmt::Debug for RateLimit<S, E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, E, B> RateLimit<S, E, B> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<E, B>>) -> Self {
        RateLimit { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// What `call` decided before any inner call.
pub(crate) enum Step<BF> {
    /// Not limited: no headers.
    Pass,
    /// Allowed: call the inner service, then write these headers.
    Allow(HeaderPlan),
    /// Answered by the layer.
    Refuse(Response<Bytes>),
    /// The backend needs to wait (a network round trip).
    Wait(BF, Box<Pending>),
}

impl<S, E, B, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, E, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    E: Extractor,
    B: Backend,
    B::Future: Unpin,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S, Request<ReqBody>, B::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.decide(&req) {
            Step::Pass => ResponseFuture::inner(self.inner.call(req), None),
            Step::Allow(plan) => ResponseFuture::inner(self.inner.call(req), Some(plan)),
            Step::Refuse(res) => ResponseFuture::ready(res),
            Step::Wait(check, pending) => {
                // The ready inner service goes with the request; this one
                // keeps a fresh clone (tower's rule for deferred calls).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::checking(check, inner, req, pending)
            }
        }
    }
}

impl<S, E, B> RateLimit<S, E, B>
where
    E: Extractor,
    B: Backend,
    B::Future: Unpin,
{
    fn decide<ReqBody>(&self, req: &Request<ReqBody>) -> Step<B::Future> {
        let shared = &*self.shared;
        let policy_guard = shared.policy.load();
        let policy: &Policy = &policy_guard;
        let view = RequestRef::new(req);

        let (category, route_cost) = match policy.classify(req.method(), req.uri().path()) {
            Target::Exempt => return Step::Pass,
            Target::Category { category, cost } => (category, cost),
        };
        let (identity, tier) = match shared.identify(&view, policy) {
            Ok(found) => found,
            Err(r) => return refuse_to(Refusal::Client(r), req),
        };
        let Some(slot) = policy.slot(tier, category) else {
            // A tier id from another policy: treat as an unknown key.
            return refuse_to(Refusal::Client(Rejection::UnknownKey), req);
        };
        let rule = if policy.has_adjustments() {
            let now = if policy.has_boosts() {
                shared.unix_now()
            } else {
                0
            };
            policy.effective_rule(tier, category, identity.key(), now)
        } else {
            slot.rule
        };
        let limit = match rule {
            Rule::Unlimited => return Step::Pass,
            Rule::Limited(limit) => limit,
        };
        // The route's cost is a floor: an extractor's count multiplies it.
        let cost = identity
            .cost()
            .map_or(route_cost, |n| route_cost.saturating_mul(n));
        if cost == 0 {
            return refuse_to(
                Refusal::Client(Rejection::InvalidCost("a cost must be at least 1")),
                req,
            );
        }
        if cost > limit.max() {
            return refuse_to(
                Refusal::CostTooHigh {
                    cost,
                    max: limit.max(),
                    tier: policy.tier_name(tier),
                    category: policy.category_name(category),
                },
                req,
            );
        }
        // Priority: only tiers with a reserve read the header.
        let mut priority = identity.priority();
        let mut reserve = 0;
        let pct = policy.priority_reserve(tier);
        if pct > 0 {
            if let Some(v) = req.headers().get(&X_REQUEST_PRIORITY) {
                priority = match parse_priority(v.as_bytes()) {
                    Some(p) => p,
                    None => {
                        return refuse_to(Refusal::Client(Rejection::InvalidPriority), req);
                    }
                };
            }
            if priority != Priority::Critical {
                // A custom limit or a scaled one may be smaller than the
                // tier's: never reserve the whole burst.
                reserve = crate::policy::reserve_of(limit.max(), pct).min(limit.max() - 1);
            }
        }
        let subject = Subject {
            key: identity.key(),
            tier,
            category,
            cost,
            priority,
            scope: slot.scope,
            reserve,
            known: identity.is_known(),
        };
        let post = Post {
            reserve,
            shadow: policy.is_shadow(tier, category),
            shadowed: &shared.shadowed,
        };
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let mut check = shared.backend.check(&subject, &limit);
        let plan = |decision: Decision| HeaderPlan {
            decision,
            slot: Arc::clone(&slot.headers),
            options: shared.headers,
        };
        let polled = Pin::new(&mut check).poll(&mut Context::from_waker(Waker::noop()));
        #[cfg(feature = "metrics")]
        if polled.is_ready() {
            crate::telemetry::check_duration(started.elapsed());
        }
        match polled {
            Poll::Ready(result) => finish(
                result,
                plan,
                policy,
                tier,
                category,
                identity.key(),
                post,
                || is_grpc(req.headers()),
            ),
            Poll::Pending => Step::Wait(
                check,
                Box::new(Pending {
                    policy: policy_guard.clone(),
                    tier,
                    category,
                    key: identity.key(),
                    slot: Arc::clone(&slot.headers),
                    options: shared.headers,
                    grpc: is_grpc(req.headers()),
                    reserve,
                    shadow: post.shadow,
                    shadowed: Arc::clone(&shared.shadowed),
                    #[cfg(feature = "metrics")]
                    started,
                }),
            ),
        }
    }
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

/// What happens to a decision after the backend: the reserve is reported
/// as part of the limit, and shadow mode turns refusals into counted passes.
#[derive(Clone, Copy)]
pub(crate) struct Post<'a> {
    pub(crate) reserve: u32,
    pub(crate) shadow: bool,
    pub(crate) shadowed: &'a AtomicU64,
}

fn refuse<BF>(refusal: Refusal<'_>, grpc: bool) -> Step<BF> {
    Step::Refuse(refusal.into_response(grpc))
}

/// A refusal in the form `req` speaks (looked up only when refusing).
fn refuse_to<BF, T>(refusal: Refusal<'_>, req: &Request<T>) -> Step<BF> {
    refuse(refusal, is_grpc(req.headers()))
}

/// Turns a backend's answer into the next step.
#[allow(clippy::too_many_arguments)] // one private call site per path (ready, deferred)
pub(crate) fn finish<BF>(
    result: Result<Decision, BackendError>,
    plan: impl FnOnce(Decision) -> HeaderPlan,
    policy: &Policy,
    tier: TierId,
    category: CategoryId,
    key: KeyId,
    post: Post<'_>,
    grpc: impl FnOnce() -> bool,
) -> Step<BF> {
    let result = result.map(|mut d| {
        if post.reserve > 0 {
            // Report the limit that applied to this request.
            d.limit = d.limit.saturating_sub(post.reserve);
            d.remaining = d.remaining.saturating_sub(post.reserve);
        }
        d
    });
    #[cfg(feature = "metrics")]
    let counters = policy.slot_metrics(tier, category);
    match result {
        Ok(d) if d.allowed => {
            #[cfg(feature = "metrics")]
            if let Some(m) = counters {
                m.allowed.increment(1);
            }
            Step::Allow(plan(d))
        }
        Ok(mut d) if post.shadow => {
            #[cfg(feature = "metrics")]
            if let Some(m) = counters {
                m.shadow.increment(1);
            }
            post.shadowed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                tier = policy.tier_name(tier),
                category = policy.category_name(category),
                key = %key.redacted(),
                retry_after = ?d.retry_after,
                "shadow mode: would have refused"
            );
            d.retry_after = None;
            Step::Allow(plan(d))
        }
        Ok(d) => {
            #[cfg(feature = "metrics")]
            if let Some(m) = counters {
                m.refused.increment(1);
            }
            tracing::debug!(
                tier = policy.tier_name(tier),
                category = policy.category_name(category),
                key = %key.redacted(),
                retry_after = ?d.retry_after,
                "rate limited"
            );
            refuse(
                Refusal::Limited {
                    plan: plan(d),
                    tier: policy.tier_name(tier),
                    category: policy.category_name(category),
                    key,
                },
                grpc(),
            )
        }
        Err(BackendError::CostExceedsLimit { cost, max }) => refuse(
            Refusal::CostTooHigh {
                cost,
                max,
                tier: policy.tier_name(tier),
                category: policy.category_name(category),
            },
            grpc(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "rate-limit backend failed; answering 503");
            refuse(Refusal::Unavailable, grpc())
        }
    }
}

pub(crate) use Step as ServiceStep;
