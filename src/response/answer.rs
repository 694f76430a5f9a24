//! What the layer answers instead of the inner service, and the words both
//! writers share: its status, its problem type and its detail. The HTTP
//! writer (`http`) and the gRPC writer (`grpc`) both read it; the facade
//! (`response`) picks one by the request's protocol.

use http::StatusCode;

use std::time::Duration;

use super::cell::CellRef;
use super::headers::{HeaderOptions, HeaderPlan};
use crate::decision::Decision;
use crate::extract::Rejection;
use crate::key::KeyId;
use crate::time::retry_secs;

/// What the layer answers instead of the inner service: a *refusal* (over
/// a limit), a *rejection* (a client mistake before any limit), a cost that
/// can never fit, or an unavailable backend.
#[derive(Debug)]
pub(crate) enum Answer<'a> {
    /// A refusal, over the limit: 429 / RESOURCE_EXHAUSTED.
    Refused {
        /// Its headers.
        plan: HeaderPlan,
        /// The refusal itself (its body's numbers, and the response's
        /// extension).
        decision: Decision,
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
    /// Shed: the service behind the layer is past its capacity, and this
    /// request's tier is shed at this load. Nothing was charged.
    Shed {
        /// What the caller is told to wait.
        retry_after: Duration,
        /// `None` for exempt routes (no tier, no category).
        tier: Option<&'a str>,
        category: &'a str,
        /// The cell's limits, for the headers that describe the quota
        /// (none for exempt routes and unlimited cells).
        cell: Option<(CellRef, HeaderOptions)>,
    },
}

/// The problem type of a shed request, the IETF rate-limit draft's.
pub(crate) const REDUCED_CAPACITY: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";

impl Answer<'_> {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Answer::Refused { .. } => StatusCode::TOO_MANY_REQUESTS,
            Answer::Rejected(
                Rejection::MalformedKey(_) | Rejection::InvalidCost(_) | Rejection::InvalidPriority,
            ) => StatusCode::BAD_REQUEST,
            Answer::Rejected(_) => StatusCode::UNAUTHORIZED,
            Answer::CostTooHigh { .. } => StatusCode::BAD_REQUEST,
            Answer::Unavailable | Answer::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn problem_type(&self) -> &'static str {
        match self {
            Answer::Refused { decision, .. } if decision.is_concurrency_refusal() => {
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
            Answer::Shed { .. } => "temporary-reduced-capacity",
        }
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            Answer::Refused {
                decision,
                tier,
                category,
                ..
            } if decision.is_concurrency_refusal() => format!(
                "concurrency limit reached: tier `{tier}` allows {} `{category}` requests in flight at once{}; retry in {} s",
                decision.lease.map_or(0, |l| l.limit),
                if decision.lease.is_some_and(|l| l.per_account) {
                    " per account"
                } else {
                    ""
                },
                retry_secs(decision.retry_after.unwrap_or_default()),
            ),
            Answer::Refused {
                decision,
                tier,
                category,
                ..
            } => format!(
                "rate limit exceeded: tier `{tier}` allows {} `{category}` {} per {}; retry in {} s",
                decision.limit,
                decision.unit(),
                decision.per_text(),
                retry_secs(decision.retry_after.unwrap_or_default()),
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
            Answer::Shed {
                retry_after, tier, ..
            } => format!(
                "the service is over its capacity and sheds {}; retry in {} ms",
                tier.map_or_else(
                    || "requests of exempt routes".to_owned(),
                    |t| format!("tier `{t}` requests at this load")
                ),
                retry_after.as_millis().max(1)
            ),
        }
    }
}
