//! [`UsageService`]: the caller's current usage in every category, as JSON,
//! counting nothing.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use serde_json::{Map, Value, json};
use tower_service::Service;

use std::time::Duration;

use crate::admission::{ChargeSet, Path, Shared, path};
use crate::backend::{Backend, Decision, LeaseState, TokenSplit};
use crate::decision::Shown;
use crate::extract::{Extractor, Identity, Rejection, RequestRef, is_grpc};
use crate::limit::Per;
use crate::meter::TokenKind;
use crate::policy::{Calendar, Cell, Policy, Pool, TierId};
use crate::response::{Answer, ResponseBody};

/// Answers `GET /v1/rate_limit`-style usage checks for the caller's key:
/// every category's limit, remaining, reset (Unix seconds) and window, with
/// custom limits and active boosts applied, without counting anything.
///
/// Mount it on an exempt route (or outside the layer) so that checking
/// usage does not count against the read limit:
///
/// ```
/// use axum::Router;
/// use tierlimit::{Policy, RateLimitLayer, Route, Tier, Limit};
///
/// let policy = Policy::builder()
///     .categories(["read", "write"])
///     .tier(Tier::new("free").limit("read", Limit::per_hour(100)).limit("write", Limit::per_hour(20)))
///     .route(Route::exempt("/v1/rate_limit"))
///     .build()
///     .unwrap();
/// let layer = RateLimitLayer::new(policy);
/// let app: Router = Router::new()
///     .route_service("/v1/rate_limit", layer.usage_service())
///     .layer(layer);
/// ```
pub struct UsageService<E, B> {
    shared: Arc<Shared<E, B>>,
}

impl<E, B> UsageService<E, B> {
    pub(crate) fn new(shared: Arc<Shared<E, B>>) -> Self {
        UsageService { shared }
    }
}

impl<E, B> Clone for UsageService<E, B> {
    fn clone(&self) -> Self {
        UsageService {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<E, B> fmt::Debug for UsageService<E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageService").finish_non_exhaustive()
    }
}

pub(crate) type UsageFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<String>>, Infallible>> + Send>>;

impl<E, B, ReqBody> Service<Request<ReqBody>> for UsageService<E, B>
where
    E: Extractor,
    B: Backend,
{
    type Response = Response<ResponseBody<String>>;
    type Error = Infallible;
    type Future = UsageFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let policy = Arc::clone(&shared.view.load().policy);
        let grpc = is_grpc(req.headers());
        let refuse = |r: Rejection| -> UsageFuture {
            let res = Answer::Rejected(r)
                .into_response(grpc)
                .map(ResponseBody::full);
            Box::pin(std::future::ready(Ok(res)))
        };
        let view = RequestRef::new(&req);
        let (identity, tier) = match shared.identify(&view, &policy) {
            Ok(found) => found,
            Err(r) => return refuse(r),
        };
        report(shared, policy, identity, tier).unwrap_or_else(refuse)
    }
}

/// The usage of `identity` in `tier` under `policy`, as the usage service
/// shows it (the admin service's usage check too); counts nothing.
///
/// Each category is peeked on the path admission would take
/// ([`path`]), and shown from the decision admission would make of those
/// states ([`Decision::binding_with_split`], with the binding lease): its
/// `limit`, `remaining`, `reset` and `window` are what the `X-RateLimit-*`
/// headers of a request (or of its refusal) say at the same moment
/// ([`Decision::shown`]). A peek at a bucket with no room left is the
/// refusal a request would get, so a key that owes tokens sees the same
/// reset as its 429 says.
pub(crate) fn report<E, B: Backend>(
    shared: &Shared<E, B>,
    policy: Arc<Policy>,
    identity: Identity,
    tier: TierId,
) -> Result<UsageFuture, Rejection> {
    let mut peeks = Vec::new();
    for category in policy.categories() {
        let Some(cell) = policy.cell(tier, category) else {
            return Err(Rejection::UnknownKey);
        };
        let adjusted = shared.adjusted(&policy, cell, tier, category, &identity);
        let path = path(cell, adjusted.as_ref());
        let peek = Peek::start(shared, (cell, policy.calendar()), path, &identity);
        peeks.push((category, peek));
    }
    let now = shared.unix_time();
    let overload = crate::overload::report(&policy, &shared.overload);
    Ok(Box::pin(async move {
        let mut categories = Map::new();
        for (category, peek) in peeks {
            let name = policy.category_name(category).to_owned();
            categories.insert(name, peek.finish(now).await);
        }
        let mut body = json!({
            "tier": policy.tier_name(tier),
            "key": identity.key().redacted().to_string(),
            "categories": Value::Object(categories),
        });
        if let Some(overload) = overload {
            body["overload"] = overload;
        }
        let mut res = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(res)
    }))
}

/// One category's peeks, under way: each limit's (with whom it is counted
/// per, and whether in tokens) in charge order, and each concurrency
/// limit's.
struct Peek<F> {
    limits: Vec<(F, Per, Option<TokenKind>)>,
    /// How many of the last limits are token limits.
    tokens: u8,
    /// Which of those count input and output tokens.
    split: TokenSplit,
    leases: Vec<(F, bool)>,
}

impl<F> Peek<F>
where
    F: std::future::Future<Output = Result<Decision, crate::backend::BackendError>>,
{
    /// Peeks at what a request on `path` would be checked against, counting
    /// nothing (the charges admission would make, at a cost of 1).
    fn start<E, B>(
        shared: &Shared<E, B>,
        (cell, calendar): (&Cell, &Calendar),
        path: Path<'_>,
        identity: &Identity,
    ) -> Self
    where
        B: Backend<Future = F>,
    {
        let mut peek = Peek {
            limits: Vec::new(),
            tokens: 0,
            split: TokenSplit::NONE,
            leases: Vec::new(),
        };
        match path {
            Path::Pass => {}
            Path::Check(limits) => {
                let mut set = ChargeSet::new(cell, limits, identity, 1, 1, |_| 0);
                if set.has_calendar() {
                    set.in_periods(calendar, shared.unix_time());
                }
                let key = match cell.pool {
                    Pool::Account => Per::Account,
                    Pool::Key => Per::Key,
                };
                for (i, c) in set.charges().iter().enumerate() {
                    let (per, kind) = ChargeSet::describe(limits, i);
                    // Per-key limits of a pooled tier are the account's.
                    let per = if per == Per::Key { key } else { per };
                    peek.limits
                        .push((shared.backend.peek(set.owner, c), per, kind));
                }
                peek.tokens = set.tokens;
                peek.split = set.split;
                peek.leases = set
                    .leases()
                    .iter()
                    .map(|l| (shared.backend.peek_lease(set.owner, l), l.per_account))
                    .collect();
            }
        }
        peek
    }

    /// The category's usage at Unix time `now`.
    async fn finish(self, now: Duration) -> Value {
        // Concurrency limits: the binding one, and each in `limits`.
        let mut in_flight = Vec::with_capacity(self.leases.len());
        for (fut, per_account) in self.leases {
            match fut.await {
                Ok(d) => in_flight.extend(d.lease.map(|l| LeaseState { per_account, ..l })),
                Err(e) => return json!({ "error": e.to_string() }),
            }
        }
        let mut decisions = Vec::with_capacity(self.limits.len());
        let mut listed = Vec::with_capacity(self.limits.len() + in_flight.len());
        for (fut, per, kind) in self.limits {
            let d = match fut.await {
                Ok(d) => d,
                Err(e) => return json!({ "error": e.to_string() }),
            };
            let mut v = shown_json(d.shown(now));
            v["unit"] = json!(kind.map_or("requests", TokenKind::unit));
            v["per"] = json!(per.name());
            listed.push(v);
            decisions.push(d);
        }
        let lease = LeaseState::binding(in_flight.iter().copied());
        listed.extend(in_flight.iter().map(lease_json));
        let concurrency = lease.map(|l| {
            let mut v = lease_json(&l);
            v.as_object_mut().map(|o| o.remove("unit"));
            v
        });
        // The decision admission would make of these states.
        let binding =
            Decision::binding_with_split(&decisions, usize::from(self.tokens), self.split);
        let Some(d) = binding else {
            return match concurrency {
                Some(c) => json!({ "concurrency": c, "limits": listed }),
                None => json!({ "unlimited": true }),
            };
        };
        let mut v = shown_json(d.shown(now));
        v["limits"] = Value::from(listed);
        for (kind, field) in [
            (TokenKind::Total, "tokens"),
            (TokenKind::Input, "input_tokens"),
            (TokenKind::Output, "output_tokens"),
        ] {
            if let Some(t) = d.tokens_of(kind)
                && let Some(tokens) = decisions.get(usize::from(t.index))
            {
                v[field] = shown_json(tokens.shown(now));
            }
        }
        if let Some(c) = concurrency {
            v["concurrency"] = c;
        }
        v
    }
}

fn shown_json(s: Shown) -> Value {
    json!({
        "limit": s.limit,
        "remaining": s.remaining,
        "reset": s.reset,
        "window": s.window,
    })
}

fn lease_json(l: &LeaseState) -> Value {
    json!({
        "unit": "concurrent requests",
        "limit": l.limit,
        "in_flight": l.limit - l.remaining,
        "remaining": l.remaining,
        "per": if l.per_account { "account" } else { "key" },
    })
}
