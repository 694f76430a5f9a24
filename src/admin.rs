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
use serde_json::{Map, Value, json};
use tower_service::Service;

use crate::admission::Shared;
use crate::backend::Backend;
use crate::extract::{Identity, Rejection};
use crate::key::{KeyDigest, KeyId};
use crate::plane::{BoostEntry, BoostFor, Change};
use crate::policy::Policy;
use crate::response::{Answer, ResponseBody};
use crate::usage::UsageFuture;

/// The largest admin request body read (JSON), in bytes.
const MAX_BODY: usize = 64 * 1024;

/// The operator API of a [`RateLimitLayer`](crate::RateLimitLayer): provision
/// and revoke keys, set custom limits, grant temporary boosts, check a key's
/// usage. Made by [`RateLimitLayer::admin_service`](crate::RateLimitLayer::admin_service).
///
/// | request | body | answer |
/// |---|---|---|
/// | `PUT …/keys` | `{"key", "tier", "account"?}` | 200: the key is listed in `tier` (an upgrade if it was listed) |
/// | `DELETE …/keys` | `{"key"}` | 200: revoked, a 401 from then on |
/// | `PUT …/limits` | `{"key", "category", "limit"}` (`"3/hour"`, a list, `"unlimited"`, `"x5"`; category `"*"` for all) | 200 |
/// | `DELETE …/limits` | `{"key", "category"}` | 200 |
/// | `POST …/boosts` | `{"key" or "tier", "category"?, "adjust", "start", "end"}` (RFC 3339 or Unix seconds) | 201 with its `id` |
/// | `GET …/boosts` | — | 200: the boosts operators granted that have not ended |
/// | `DELETE …/boosts/{id}` | — | 200, or 404 |
/// | `POST …/usage` | `{"key"}` | 200: the key's usage, as the usage service shows it, counting nothing |
///
/// Requests need `Authorization: Bearer <token>` for one of the tokens
/// given with [`token`](Self::token) (compared in constant time): none is a
/// 401, a wrong one a 403. A bad body is a 400 that names the field. Keys
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
}

impl<E, B> Clone for AdminService<E, B> {
    fn clone(&self) -> Self {
        AdminService {
            shared: Arc::clone(&self.shared),
            tokens: Arc::clone(&self.tokens),
        }
    }
}

impl<E, B> fmt::Debug for AdminService<E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminService")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl<E, B> AdminService<E, B> {
    pub(crate) fn new(shared: Arc<Shared<E, B>>) -> Self {
        AdminService {
            shared,
            tokens: Arc::from(Vec::new()),
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
            shared: self.shared,
            tokens: Arc::from(tokens),
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

/// Equal in time that depends on the lengths only, never on where the
/// bytes first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// What an admin request asks, routed.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Keys,
    Limits,
    Boosts,
    Boost(String),
    Usage,
    NotFound,
}

fn route(path: &str) -> Route {
    let mut segments = path.trim_end_matches('/').rsplit('/');
    let last = segments.next().unwrap_or("");
    let before = segments.next().unwrap_or("");
    match (before, last) {
        (_, "keys") => Route::Keys,
        (_, "limits") => Route::Limits,
        (_, "boosts") => Route::Boosts,
        (_, "usage") => Route::Usage,
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
    /// The operator's name, if the request carries one of the tokens.
    fn authorize(&self, headers: &http::HeaderMap) -> Result<String, AdminResponse> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(problem(
                StatusCode::UNAUTHORIZED,
                "admin-unauthorized",
                "send `Authorization: Bearer <admin token>`",
            ));
        };
        let bytes = value.as_bytes();
        let token = match bytes.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
            _ => {
                return Err(problem(
                    StatusCode::UNAUTHORIZED,
                    "admin-unauthorized",
                    "send `Authorization: Bearer <admin token>`",
                ));
            }
        };
        // Every token is compared, whichever matches.
        let mut found = None;
        for (name, secret) in self.tokens.iter() {
            if constant_time_eq(token, secret) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| {
            problem(
                StatusCode::FORBIDDEN,
                "admin-forbidden",
                "this admin token is not accepted",
            )
        })
    }

    async fn answer<ReqBody>(&self, req: Request<ReqBody>) -> AdminResponse
    where
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let who = match self.authorize(req.headers()) {
            Ok(who) => who,
            Err(res) => return res,
        };
        let route = route(req.uri().path());
        let method = req.method().clone();
        let allowed = match &route {
            Route::Keys | Route::Limits => "PUT, DELETE",
            Route::Boosts => "GET, POST",
            Route::Boost(_) => "DELETE",
            Route::Usage => "POST",
            Route::NotFound => "",
        };
        if route == Route::NotFound {
            return problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "no such admin resource (keys, limits, boosts, boosts/{id}, usage)",
            );
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
            return res;
        }
        let needs_body = !matches!(
            (&route, &method),
            (Route::Boosts, &Method::GET) | (Route::Boost(_), _)
        );
        let body = if needs_body {
            match read_json(req.into_body()).await {
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
            (Route::Boosts, Method::POST) => self.add_boost(&body),
            (Route::Boosts, _) => return self.list_boosts(),
            (Route::Boost(id), _) => self.remove_boost(id),
            (Route::Usage, _) => return self.usage(&body).await,
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

    fn put_key(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "tier", "account"])?;
        let key = key_field(body)?;
        let policy = self.shared.plane.base();
        let tier = string_field(body, "tier")?;
        if policy.tier(&tier).is_none() {
            return Err(bad(format!(
                "field `tier`: unknown tier `{tier}` (declared: {})",
                names(policy.tiers().map(|t| policy.tier_name(t)))
            )));
        }
        let account = match body.get("account") {
            None | Some(Value::Null) => None,
            Some(Value::String(a)) if !a.is_empty() && a.len() <= 256 => Some(a.clone()),
            Some(_) => {
                return Err(bad(
                    "field `account`: an account is a name of 1 to 256 bytes",
                ));
            }
        };
        let id = KeyId::of(&key);
        let shown = json!({
            "key": id.redacted().to_string(),
            "tier": tier,
            "account": account,
        });
        Ok((
            Change::PutKey {
                key: KeyDigest::of(&key),
                tier,
                account,
            },
            StatusCode::OK,
            shown,
            "put_key",
            id,
        ))
    }

    fn revoke_key(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key"])?;
        let key = key_field(body)?;
        let id = KeyId::of(&key);
        let shown = json!({ "key": id.redacted().to_string(), "revoked": true });
        Ok((
            Change::RevokeKey {
                key: KeyDigest::of(&key),
            },
            StatusCode::OK,
            shown,
            "revoke_key",
            id,
        ))
    }

    fn put_limit(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "category", "limit"])?;
        let key = key_field(body)?;
        let category = self.category_field(body)?;
        let written = body
            .get("limit")
            .cloned()
            .ok_or_else(|| bad("field `limit` is missing: a limit such as \"3/hour\", a list, \"unlimited\" or \"x5\""))?;
        let adjust = crate::policy::parse_adjust_json(&written)
            .map_err(|m| bad(format!("field `limit`: {m}")))?;
        let id = KeyId::of(&key);
        let shown = json!({
            "key": id.redacted().to_string(),
            "category": category,
            "limit": written,
        });
        Ok((
            Change::PutLimit {
                key: KeyDigest::of(&key),
                category,
                written,
                adjust,
            },
            StatusCode::OK,
            shown,
            "put_limit",
            id,
        ))
    }

    fn remove_limit(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "category"])?;
        let key = key_field(body)?;
        let category = self.category_field(body)?;
        let id = KeyId::of(&key);
        let shown = json!({
            "key": id.redacted().to_string(),
            "category": category,
            "removed": true,
        });
        Ok((
            Change::RemoveLimit {
                key: KeyDigest::of(&key),
                category,
            },
            StatusCode::OK,
            shown,
            "remove_limit",
            id,
        ))
    }

    fn add_boost(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "tier", "category", "adjust", "start", "end"])?;
        let (target, id) = match (body.get("key"), body.get("tier")) {
            (Some(_), None) => {
                let key = key_field(body)?;
                let id = KeyId::of(&key);
                (BoostFor::Key(KeyDigest::of(&key)), id)
            }
            (None, Some(_)) => {
                let tier = string_field(body, "tier")?;
                let policy = self.shared.plane.base();
                if policy.tier(&tier).is_none() {
                    return Err(bad(format!("field `tier`: unknown tier `{tier}`")));
                }
                (BoostFor::Tier(tier), KeyId::from_raw(0))
            }
            _ => return Err(bad("a boost names either `key` or `tier`")),
        };
        let category = match body.get("category") {
            None | Some(Value::Null) => None,
            Some(_) => Some(self.category_field(body)?),
        };
        let written = body
            .get("adjust")
            .cloned()
            .ok_or_else(|| bad("field `adjust` is missing: \"x2\", a limit or \"unlimited\""))?;
        let adjust = crate::policy::parse_adjust_json(&written)
            .map_err(|m| bad(format!("field `adjust`: {m}")))?;
        let start = time_field(body, "start")?;
        let end = time_field(body, "end")?;
        if end <= start {
            return Err(bad("field `end`: a boost ends after it starts"));
        }
        if end <= self.shared.plane.now() {
            return Err(bad("field `end`: this boost has already ended"));
        }
        let boost_id = new_boost_id();
        let mut shown = boost_json(
            &boost_id,
            &BoostEntry {
                target: target.clone(),
                category: category.clone(),
                written: written.clone(),
                adjust: adjust.clone(),
                start,
                end,
            },
        );
        shown["id"] = json!(boost_id);
        Ok((
            Change::AddBoost {
                id: boost_id,
                boost: BoostEntry {
                    target,
                    category,
                    written,
                    adjust,
                    start,
                    end,
                },
            },
            StatusCode::CREATED,
            shown,
            "add_boost",
            id,
        ))
    }

    fn list_boosts(&self) -> AdminResponse {
        let plane = &self.shared.plane;
        let state = plane.state();
        let boosts: Vec<Value> = state
            .boosts(plane.now())
            .map(|(id, b)| boost_json(id, b))
            .collect();
        json_response(StatusCode::OK, &json!({ "boosts": boosts }))
    }

    fn remove_boost(&self, id: String) -> Changed {
        if !self.shared.plane.state().has_boost(&id) {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "no boost with this id (or it has ended)",
            ));
        }
        let shown = json!({ "id": id, "removed": true });
        Ok((
            Change::RemoveBoost { id },
            StatusCode::OK,
            shown,
            "remove_boost",
            KeyId::from_raw(0),
        ))
    }

    async fn usage(&self, body: &Map<String, Value>) -> AdminResponse {
        if let Err(res) = only(body, &["key"]) {
            return res;
        }
        let key = match key_field(body) {
            Ok(k) => k,
            Err(res) => return res,
        };
        let policy: Arc<Policy> = Arc::clone(&self.shared.view.load().policy);
        let id = KeyId::of(&key);
        if policy.has_revocations() && policy.is_revoked(&key, id) {
            return problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "this key is revoked",
            );
        }
        let entry = policy.key_entry(&key, id);
        let Some(tier) = entry.map(|(t, _)| t).or_else(|| policy.unknown_key_tier()) else {
            return problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "this key is not listed, and the policy refuses unknown keys",
            );
        };
        let mut identity = Identity::from_key_id(id);
        if let Some((t, account)) = entry {
            identity = identity.with_tier(t);
            if let Some(a) = account {
                identity = identity.with_account_id(a);
            }
        }
        let report: Result<UsageFuture, Rejection> =
            crate::usage::report(&self.shared, policy, identity, tier);
        match report {
            Ok(fut) => match fut.await {
                Ok(res) => res,
                Err(never) => match never {},
            },
            Err(r) => Answer::Rejected(r)
                .into_response(false)
                .map(ResponseBody::full),
        }
    }

    fn category_field(&self, body: &Map<String, Value>) -> Result<String, AdminResponse> {
        let category = string_field(body, "category")?;
        let policy = self.shared.plane.base();
        if category != "*" && policy.category(&category).is_none() {
            return Err(bad(format!(
                "field `category`: unknown category `{category}` (declared: {}, or \"*\")",
                names(policy.categories().map(|c| policy.category_name(c)))
            )));
        }
        Ok(category)
    }
}

/// A change, its status, what the answer shows, its audit action and key.
type Changed = Result<(Change, StatusCode, Value, &'static str, KeyId), AdminResponse>;

async fn read_json<ReqBody>(body: ReqBody) -> Result<Map<String, Value>, AdminResponse>
where
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "admin-bad-request",
                &format!("an admin request body is JSON of at most {MAX_BODY} bytes"),
            ));
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad("the body must be a JSON object")),
        Err(e) => Err(bad(format!(
            "the body is not JSON: line {}, column {}",
            e.line(),
            e.column()
        ))),
    }
}

/// Refuses fields other than `allowed`, naming the first.
fn only(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), AdminResponse> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) if k.len() <= 64 && k.bytes().all(|b| b.is_ascii_graphic()) => Err(bad(format!(
            "unknown field `{k}` (expected: {})",
            allowed.join(", ")
        ))),
        Some(_) => Err(bad(format!(
            "unknown field (expected: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn string_field(body: &Map<String, Value>, name: &str) -> Result<String, AdminResponse> {
    match body.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("field `{name}` must be a string"))),
        None => Err(bad(format!("field `{name}` is missing"))),
    }
}

/// The `key` field: an API key as a request could present it. Its text
/// is never part of an answer.
fn key_field(body: &Map<String, Value>) -> Result<String, AdminResponse> {
    let key = string_field(body, "key")?;
    match crate::key::key_problem(&key, crate::key::DEFAULT_MAX_KEY_LEN) {
        None => Ok(key),
        Some(why) => Err(bad(format!("field `key`: {why}"))),
    }
}

fn time_field(body: &Map<String, Value>, name: &str) -> Result<u64, AdminResponse> {
    match body.get(name) {
        Some(Value::String(s)) => {
            crate::policy::parse_time(s).map_err(|m| bad(format!("field `{name}`: {m}")))
        }
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|&n| n <= crate::policy::MAX_UNIX)
            .ok_or_else(|| bad(format!("field `{name}`: Unix seconds from 0 to year 9999"))),
        Some(_) => Err(bad(format!(
            "field `{name}`: a time such as \"2026-12-01T00:00:00Z\", or Unix seconds"
        ))),
        None => Err(bad(format!("field `{name}` is missing"))),
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A boost as the admin API shows it (its key redacted).
fn boost_json(id: &str, b: &BoostEntry) -> Value {
    let mut v = b.json("key", |k| k.key_id().redacted().to_string());
    v["id"] = json!(id);
    v
}

/// A boost id: 16 hex digits, random (unique across instances).
fn new_boost_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

/// The audit trail: an INFO event and a counter per change.
fn audit(who: &str, action: &'static str, key: KeyId, shown: &Value) {
    let key = (key.as_u64() != 0).then(|| key.redacted().to_string());
    tracing::info!(
        target: "tierlimit::audit",
        who,
        action,
        key = key.as_deref().unwrap_or("-"),
        change = %shown,
        "admin change"
    );
    #[cfg(feature = "metrics")]
    crate::telemetry::describe_once();
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "tierlimit_admin_changes_total",
        "action" => action,
        "who" => who.to_owned()
    )
    .increment(1);
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

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
