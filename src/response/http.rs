//! Refusals as HTTP problem documents (RFC 9457) or gRPC trailers-only
//! responses, chosen by the request's content type.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use super::grpc;
use super::headers::HeaderPlan;
use crate::extract::Rejection;
use crate::key::KeyId;
use crate::time::retry_secs;

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// What the layer answers instead of the inner service: a *refusal* (over
/// a limit), a *rejection* (a client mistake before any limit), a cost that
/// can never fit, or an unavailable backend.
#[derive(Debug)]
pub(crate) enum Answer<'a> {
    /// A refusal, over the limit: 429 / RESOURCE_EXHAUSTED.
    Refused {
        plan: HeaderPlan,
        tier: &'a str,
        category: &'a str,
        key: KeyId,
    },
    /// A rejection: a client mistake before any limit was checked.
    Rejected(Rejection),
    /// A cost that could never fit the limit.
    CostTooHigh {
        cost: u32,
        max: u32,
        tier: &'a str,
        category: &'a str,
        /// `"requests"` or `"tokens"`.
        unit: &'static str,
    },
    /// The backend could not decide.
    Unavailable,
}

impl Answer<'_> {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Answer::Refused { .. } => StatusCode::TOO_MANY_REQUESTS,
            Answer::Rejected(
                Rejection::MalformedKey(_) | Rejection::InvalidCost(_) | Rejection::InvalidPriority,
            ) => StatusCode::BAD_REQUEST,
            Answer::Rejected(_) => StatusCode::UNAUTHORIZED,
            Answer::CostTooHigh { .. } => StatusCode::BAD_REQUEST,
            Answer::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn problem_type(&self) -> &'static str {
        match self {
            Answer::Refused { plan, .. } if plan.decision.is_concurrency_refusal() => {
                "concurrency-limited"
            }
            Answer::Refused { .. } => "rate-limited",
            Answer::Rejected(Rejection::MissingKey | Rejection::NoPeerAddress) => "missing-api-key",
            Answer::Rejected(Rejection::MalformedKey(_)) => "malformed-api-key",
            Answer::Rejected(Rejection::UnknownKey) => "unknown-api-key",
            Answer::Rejected(Rejection::InvalidCost(_)) => "invalid-cost",
            Answer::Rejected(Rejection::InvalidPriority) => "invalid-priority",
            Answer::CostTooHigh { .. } => "cost-exceeds-limit",
            Answer::Unavailable => "rate-limiter-unavailable",
        }
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            Answer::Refused {
                plan,
                tier,
                category,
                ..
            } if plan.decision.is_concurrency_refusal() => format!(
                "concurrency limit reached: tier `{tier}` allows {} `{category}` requests in flight at once{}; retry in {} s",
                plan.decision.lease.map_or(0, |l| l.limit),
                if plan.decision.lease.is_some_and(|l| l.per_account) {
                    " per account"
                } else {
                    ""
                },
                retry_secs(plan.decision.retry_after.unwrap_or_default()),
            ),
            Answer::Refused {
                plan,
                tier,
                category,
                ..
            } => format!(
                "rate limit exceeded: tier `{tier}` allows {} `{category}` {} per {} s; retry in {} s",
                plan.decision.limit,
                if plan.decision.is_tokens() {
                    "tokens"
                } else {
                    "requests"
                },
                crate::time::ceil_secs(plan.decision.window),
                retry_secs(plan.decision.retry_after.unwrap_or_default()),
            ),
            Answer::Rejected(r) => r.to_string(),
            Answer::CostTooHigh {
                cost,
                max,
                tier,
                category,
                unit,
            } => format!(
                "this request costs {cost} but tier `{tier}` allows at most {max} `{category}` {unit} at once, so it can never succeed; split it into smaller requests"
            ),
            Answer::Unavailable => "the rate limiter is unavailable; try again shortly".to_owned(),
        }
    }

    /// The response, in the form the caller speaks.
    pub(crate) fn into_response(self, grpc: bool) -> Response<Bytes> {
        if !matches!(self, Answer::Refused { .. }) {
            crate::telemetry::rejection(self.problem_type());
        }
        if grpc {
            return grpc::response(&self);
        }
        let status = self.status();
        let mut body = problem_body(status, self.problem_type(), &self.detail());
        match &self {
            Answer::Refused {
                plan,
                tier,
                category,
                ..
            } => {
                let d = &plan.decision;
                let obj = body.as_object_mut().expect("a json object");
                if let Some(l) = d.lease.filter(|_| d.is_concurrency_refusal()) {
                    obj.insert("unit".into(), json!("concurrent requests"));
                    obj.insert("tier".into(), json!(tier));
                    obj.insert("category".into(), json!(category));
                    obj.insert("limit".into(), json!(l.limit));
                    obj.insert("in_flight".into(), json!(l.limit - l.remaining));
                    obj.insert(
                        "per".into(),
                        json!(if l.per_account { "account" } else { "key" }),
                    );
                    obj.insert(
                        "retry_after_seconds".into(),
                        json!(retry_secs(d.retry_after.unwrap_or_default())),
                    );
                } else {
                    obj.insert(
                        "unit".into(),
                        json!(if d.is_tokens() { "tokens" } else { "requests" }),
                    );
                    obj.insert("tier".into(), json!(tier));
                    obj.insert("category".into(), json!(category));
                    obj.insert("limit".into(), json!(d.limit));
                    obj.insert("remaining".into(), json!(d.remaining));
                    obj.insert(
                        "window_seconds".into(),
                        json!(crate::time::ceil_secs(d.window)),
                    );
                    obj.insert(
                        "retry_after_seconds".into(),
                        json!(retry_secs(d.retry_after.unwrap_or_default())),
                    );
                }
            }
            Answer::CostTooHigh {
                cost,
                max,
                tier,
                category,
                unit,
            } => {
                let obj = body.as_object_mut().expect("a json object");
                obj.insert("unit".into(), json!(unit));
                obj.insert("tier".into(), json!(tier));
                obj.insert("category".into(), json!(category));
                obj.insert("cost".into(), json!(cost));
                obj.insert("limit".into(), json!(max));
            }
            _ => {}
        }
        let mut res = problem_response(status, &body);
        if let Answer::Refused { plan, .. } = &self {
            plan.write(res.headers_mut());
            res.extensions_mut().insert(plan.decision);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// A problem document (RFC 9457) of type `urn:tierlimit:problem:{kind}`;
/// callers add their own members.
pub(crate) fn problem_body(status: StatusCode, kind: &str, detail: &str) -> serde_json::Value {
    json!({
        "type": format!("urn:tierlimit:problem:{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    })
}

/// A problem document as a response: its status, `application/problem+json`,
/// and `WWW-Authenticate: Bearer` on a 401.
pub(crate) fn problem_response(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut res = Response::new(Bytes::from(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, PROBLEM_JSON);
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}
