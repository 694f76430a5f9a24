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

use crate::admission::{ChargeSet, Shared};
use crate::backend::{Backend, Decision, LeaseState, Subject};
use crate::extract::{Extractor, Identity, Rejection, RequestRef};
use crate::policy::{Policy, Pool, TierId};
use crate::response::grpc::is_grpc;
use crate::response::{Answer, ResponseBody};
use crate::time::{ceil_secs, unix_now_secs};

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
pub(crate) fn report<E, B: Backend>(
    shared: &Shared<E, B>,
    policy: Arc<Policy>,
    identity: Identity,
    tier: TierId,
) -> Result<UsageFuture, Rejection> {
    {
        let now = shared.unix_now();
        // Per category: each limit's peek, and whether it is per account.
        let mut peeks = Vec::new();
        for category in policy.categories() {
            let Some(cell) = policy.cell(tier, category) else {
                return Err(Rejection::UnknownKey);
            };
            let applied = policy.effective(cell, tier, category, identity.key(), now);
            // The charges and leases admission would make (counting nothing).
            let set = ChargeSet::new(cell, applied.limits(), &identity, 1, 1, |_| 0);
            let mut limits = Vec::new();
            match (applied.per_key.as_slice(), applied.per_account.is_empty()) {
                ([], true) if !applied.has_tokens() => {}
                // The one-limit path, as admission takes it.
                ([one], true) if !cell.metered && !cell.leased && !applied.has_tokens() => {
                    let key = match cell.pool {
                        Pool::Key => identity.key(),
                        Pool::Account => identity.account_or_key(),
                    };
                    let subject = Subject::new(key, cell.scope);
                    limits.push((
                        shared.backend.peek(&subject, one),
                        cell.pool == Pool::Account,
                        false,
                    ));
                }
                _ => {
                    let nkey = applied.per_key.as_slice().len();
                    let nreq = nkey + applied.per_account.as_slice().len();
                    let ntok = nreq + applied.tokens.as_slice().len();
                    for (i, c) in set.charges().iter().enumerate() {
                        let tokens = i >= nreq;
                        let per_account = (i >= nkey && i < nreq) || i >= ntok;
                        let pooled = per_account || cell.pool == Pool::Account;
                        limits.push((shared.backend.peek_charge(set.owner, c), pooled, tokens));
                    }
                }
            }
            let leases: Vec<_> = set
                .leases()
                .iter()
                .map(|l| (shared.backend.peek_lease(set.owner, l), l.per_account))
                .collect();
            peeks.push((category, limits, leases));
        }
        Ok(Box::pin(async move {
            let mut categories = Map::new();
            let unix = unix_now_secs();
            for (category, limits, leases) in peeks {
                let name = policy.category_name(category).to_owned();
                // Concurrency limits: the binding one, and each in `limits`.
                let mut in_flight = Vec::with_capacity(leases.len());
                let mut lease_error = None;
                for (fut, per_account) in leases {
                    match fut.await {
                        Ok(d) => {
                            if let Some(l) = d.lease {
                                in_flight.push(LeaseState { per_account, ..l });
                            }
                        }
                        Err(e) => lease_error = Some(e.to_string()),
                    }
                }
                let lease_json = |l: &LeaseState| {
                    json!({
                        "unit": "concurrent requests",
                        "limit": l.limit,
                        "in_flight": l.limit - l.remaining,
                        "remaining": l.remaining,
                        "per": if l.per_account { "account" } else { "key" },
                    })
                };
                let concurrency = LeaseState::binding(in_flight.iter().copied()).map(|l| {
                    let mut v = lease_json(&l);
                    v.as_object_mut().map(|o| o.remove("unit"));
                    v
                });
                if let Some(e) = lease_error {
                    categories.insert(name, json!({ "error": e }));
                    continue;
                }
                if limits.is_empty() {
                    if let Some(c) = concurrency {
                        let listed: Vec<Value> = in_flight.iter().map(lease_json).collect();
                        categories.insert(name, json!({ "concurrency": c, "limits": listed }));
                        continue;
                    }
                    categories.insert(name, json!({ "unlimited": true }));
                    continue;
                }
                let mut requests = Vec::with_capacity(limits.len());
                let mut tokens = Vec::new();
                let mut listed = Vec::with_capacity(limits.len());
                let mut error = None;
                for (fut, per_account, is_tokens) in limits {
                    match fut.await {
                        Ok(d) => {
                            listed.push(json!({
                                "unit": if is_tokens { "tokens" } else { "requests" },
                                "limit": d.limit,
                                "remaining": d.remaining,
                                "reset": unix + ceil_secs(d.reset_after),
                                "window": ceil_secs(d.window),
                                "per": if per_account { "account" } else { "key" },
                            }));
                            if is_tokens {
                                tokens.push(d);
                            } else {
                                requests.push(d);
                            }
                        }
                        Err(e) => error = Some(e.to_string()),
                    }
                }
                let shown = |d: Decision| {
                    json!({
                        "limit": d.limit,
                        "remaining": d.remaining,
                        "reset": unix + ceil_secs(d.reset_after),
                        "window": ceil_secs(d.window),
                    })
                };
                let tokens = Decision::binding(tokens);
                let value = match (error, Decision::binding(requests).or(tokens)) {
                    (Some(e), _) => json!({ "error": e }),
                    (None, None) => json!({ "unlimited": true }),
                    (None, Some(d)) => {
                        let mut v = shown(d);
                        listed.extend(in_flight.iter().map(lease_json));
                        v["limits"] = Value::from(listed);
                        if let Some(t) = tokens {
                            v["tokens"] = shown(t);
                        }
                        if let Some(c) = concurrency {
                            v["concurrency"] = c;
                        }
                        v
                    }
                };
                categories.insert(name, value);
            }
            let body = json!({
                "tier": policy.tier_name(tier),
                "key": identity.key().redacted().to_string(),
                "categories": Value::Object(categories),
            });
            let mut res = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(res)
        }))
    }
}
