//! [`AdminService`]: the operator API (keys, custom limits, boosts, usage
//! checks) as a tower `Service` with JSON bodies and problem+json errors.

// Errors here are the answers themselves, built once on a rare path.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use tower_service::Service;

use std::time::Duration;

use serde_json::{Map, Value};

use crate::admission::Shared;
use crate::backend::Backend;
use crate::response::ResponseBody;

mod auth;
mod body;
mod deadline;
mod routes;

pub use body::ADMIN_BODY_TIMEOUT;
use body::read_json;
use routes::audit;

/// The operator API of a [`RateLimitLayer`](crate::RateLimitLayer): provision
/// and revoke keys, set custom limits, grant temporary boosts, check a key's
/// usage. Made by [`RateLimitLayer::admin_service`](crate::RateLimitLayer::admin_service).
///
/// | request | body | answer |
/// |---|---|---|
/// | `PUT …/keys` | `{"key", "tier", "account"?, "org"?, "move_account"?}` | 200: the key is listed in `tier` (an upgrade if it was listed); 409: its account would be in two organisations |
/// | `DELETE …/keys` | `{"key"}` | 200: revoked, a 401 from then on |
/// | `PUT …/custom-limits` (or `…/limits`) | `{"key" (or "account", "org"), "category", "limit"}` (`"3/hour"`, a list, `"unlimited"`, `"x5"`; category `"*"` for all) | 200 |
/// | `DELETE …/custom-limits` (or `…/limits`) | `{"key" (or "account", "org"), "category"}` | 200 |
/// | `POST …/boosts` | `{"key", "account", "org" or "tier", "category"?, "adjust", "start", "end"}` (RFC 3339 or Unix seconds) | 201 with its `id` |
/// | `GET …/boosts` | — | 200: the boosts operators granted that have not ended |
/// | `DELETE …/boosts/{id}` | — | 200, or 404 |
/// | `POST …/usage` | `{"key"}` | 200: the key's usage, as the usage service shows it, counting nothing |
///
/// Requests need `Authorization: Bearer <token>` for one of the tokens
/// given with [`token`](Self::token) (compared in constant time): none is a
/// 401, a wrong one a 403, two `Authorization` headers a 400 (ambiguous
/// credentials: neither is checked). A body is read within
/// [`body_timeout`](Self::body_timeout) ([`ADMIN_BODY_TIMEOUT`] unless
/// set): a body still arriving then is a 408, and nothing changes. A bad body is a 400 that names the field. Keys
/// travel in bodies only — never in paths or query strings, which end up
/// in access logs — and are never echoed back: answers and logs show them
/// redacted. Every change is an INFO event on target `tierlimit::audit`
/// (who: the token's name) and counts in `tierlimit_admin_changes_total`.
///
/// Mount it *outside* the rate-limit layer (it is never limited by tier),
/// under any prefix: it routes on the last segments of the path.
///
/// ```
/// use axum::Router;
/// use tierlimit::{Policy, RateLimitLayer};
/// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
///
/// let layer = RateLimitLayer::new(policy);
/// let admin = layer.admin_service().token("ops", "a long random secret");
/// let app: Router = Router::new()
///     // .route(...) your API
///     .layer(layer)
///     .nest_service("/admin/v1", admin);
/// ```
///
/// Without a shared store the changes are this process's only (and lost on
/// restart); with `RateLimitLayer::share_operator_state` (feature `redis`)
/// they reach every instance and survive restarts.
pub struct AdminService<E, B> {
    shared: Arc<Shared<E, B>>,
    tokens: Arc<[(String, Vec<u8>)]>,
    body_timeout: Duration,
}

impl<E, B> Clone for AdminService<E, B> {
    fn clone(&self) -> Self {
        AdminService {
            shared: Arc::clone(&self.shared),
            tokens: Arc::clone(&self.tokens),
            body_timeout: self.body_timeout,
        }
    }
}

impl<E, B> fmt::Debug for AdminService<E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminService")
            .field("tokens", &self.tokens.len())
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

impl<E, B> AdminService<E, B> {
    pub(crate) fn new(shared: Arc<Shared<E, B>>) -> Self {
        AdminService {
            shared,
            tokens: Arc::from(Vec::new()),
            body_timeout: ADMIN_BODY_TIMEOUT,
        }
    }

    /// Accepts `Authorization: Bearer <secret>`, as the operator `name`
    /// (what the audit events say). Without any token every request is
    /// refused.
    #[must_use]
    pub fn token(self, name: impl Into<String>, secret: impl AsRef<[u8]>) -> Self {
        let mut tokens = self.tokens.to_vec();
        tokens.push((name.into(), secret.as_ref().to_vec()));
        AdminService {
            tokens: Arc::from(tokens),
            ..self
        }
    }

    /// How long a request's body may take to arrive, from when the
    /// service starts reading it ([`ADMIN_BODY_TIMEOUT`] unless set): a
    /// client still sending then is answered 408 Request Timeout, and
    /// nothing changes. Measured by a timer thread of this crate, so it
    /// holds on any async runtime.
    #[must_use]
    pub fn body_timeout(self, timeout: Duration) -> Self {
        AdminService {
            body_timeout: timeout,
            ..self
        }
    }
}

/// An admin answer: a status and a JSON body (or a problem).
type AdminResponse = Response<ResponseBody<String>>;

fn json_response(status: StatusCode, body: &Value) -> AdminResponse {
    let mut res = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A problem document (RFC 9457) of `kind` (`urn:tierlimit:problem:admin-…`),
/// written as the layer writes its own.
fn problem(status: StatusCode, kind: &str, detail: &str) -> AdminResponse {
    let body = crate::response::http::problem_body(status, kind, detail);
    crate::response::http::problem_response(status, &body).map(ResponseBody::full)
}

fn bad(detail: impl Into<String>) -> AdminResponse {
    problem(StatusCode::BAD_REQUEST, "admin-bad-request", &detail.into())
}

/// What an admin request asks, routed.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Keys,
    Limits,
    Boosts,
    Boost(String),
    Usage,
    Overload,
    NotFound,
}

fn route(path: &str) -> Route {
    let mut segments = path.trim_end_matches('/').rsplit('/');
    let last = segments.next().unwrap_or("");
    let before = segments.next().unwrap_or("");
    match (before, last) {
        (_, "keys") => Route::Keys,
        (_, "custom-limits" | "limits") => Route::Limits,
        (_, "boosts") => Route::Boosts,
        (_, "usage") => Route::Usage,
        (_, "overload") => Route::Overload,
        ("boosts", id) if !id.is_empty() => Route::Boost(id.to_owned()),
        _ => Route::NotFound,
    }
}

impl<E, B, ReqBody> Service<Request<ReqBody>> for AdminService<E, B>
where
    E: Send + Sync + 'static,
    B: Backend,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = AdminResponse;
    type Error = Infallible;
    type Future = crate::plane::BoxFuture<Result<AdminResponse, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.answer(req).await) })
    }
}

impl<E, B: Backend> AdminService<E, B>
where
    E: Send + Sync + 'static,
{
    async fn answer<ReqBody>(&self, req: Request<ReqBody>) -> AdminResponse
    where
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Two credentials are refused before either is compared: the
        // answer tells nothing about them.
        if let Err(res) = auth::one_credential(req.headers()) {
            return res;
        }
        let who = match self.authorize(req.headers()) {
            Ok(who) => who,
            Err(res) => return res,
        };
        let route = route(req.uri().path());
        let method = req.method().clone();
        if let Err(res) = allowed(&route, &method) {
            return res;
        }
        let needs_body = !matches!(
            (&route, &method),
            (Route::Boosts, &Method::GET) | (Route::Boost(_), _) | (Route::Overload, _)
        );
        let idempotency = match routes::idempotency_key(req.headers()) {
            Ok(k) => k.map(|k| routes::boost_id_for(&who, k)),
            Err(res) => return res,
        };
        let body = if needs_body {
            match read_json(req.into_body(), self.body_timeout).await {
                Ok(b) => b,
                Err(res) => return res,
            }
        } else {
            Map::new()
        };
        let result = match (route, method) {
            (Route::Keys, Method::PUT) => self.put_key(&body),
            (Route::Keys, _) => self.revoke_key(&body),
            (Route::Limits, Method::PUT) => self.put_limit(&body),
            (Route::Limits, _) => self.remove_limit(&body),
            (Route::Boosts, Method::POST) => self.add_boost(&body, idempotency),
            (Route::Boosts, _) => return self.list_boosts(),
            (Route::Boost(id), _) => self.remove_boost(id),
            (Route::Usage, _) => return self.usage(&body).await,
            (Route::Overload, _) => return self.overload(),
            (Route::NotFound, _) => unreachable!("answered above"),
        };
        let (change, status, shown, action, key) = match result {
            Ok(x) => x,
            Err(res) => return res,
        };
        let plane = &self.shared.plane;
        if let Err(e) = plane.check(&change) {
            return bad(e.message().to_owned());
        }
        if let Err(e) = plane.make(change).await {
            tracing::warn!(error = %e, action, "admin change not stored");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "admin-store-unavailable",
                "the shared operator store is unavailable; nothing changed",
            );
        }
        audit(&who, action, key, &shown);
        json_response(status, &shown)
    }
}

impl<E, B> AdminService<E, B> {
    /// `GET overload`: the capacity now and the requests in flight on this
    /// instance (404 when the policy has no `[overload]` table).
    fn overload(&self) -> AdminResponse {
        let policy = Arc::clone(&self.shared.view.load().policy);
        match crate::overload::report(&policy, &self.shared.overload) {
            Some(v) => json_response(StatusCode::OK, &v),
            None => problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "the policy has no [overload] table",
            ),
        }
    }
}

/// Whether `route` exists and takes `method`: else the 404, or the 405
/// with the methods it takes.
fn allowed(route: &Route, method: &Method) -> Result<(), AdminResponse> {
    let allowed = match route {
        Route::Keys | Route::Limits => "PUT, DELETE",
        Route::Boosts => "GET, POST",
        Route::Boost(_) => "DELETE",
        Route::Usage => "POST",
        Route::Overload => "GET",
        Route::NotFound => "",
    };
    if *route == Route::NotFound {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "admin-not-found",
            "no such admin resource (keys, custom-limits, boosts, boosts/{id}, usage, overload)",
        ));
    }
    if !allowed.split(", ").any(|m| m == method.as_str()) {
        let mut res = problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "admin-method-not-allowed",
            &format!("this resource takes {allowed}"),
        );
        if let Ok(v) = HeaderValue::from_str(allowed) {
            res.headers_mut().insert(header::ALLOW, v);
        }
        return Err(res);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_the_last_segments() {
        assert_eq!(route("/admin/v1/keys"), Route::Keys);
        assert_eq!(route("/keys/"), Route::Keys);
        assert_eq!(route("/admin/v1/boosts"), Route::Boosts);
        assert_eq!(route("/admin/v1/boosts/00ab"), Route::Boost("00ab".into()));
        assert_eq!(route("/admin/v1/usage"), Route::Usage);
        assert_eq!(route("/admin/v1/nope"), Route::NotFound);
        assert_eq!(route("/"), Route::NotFound);
    }
}
