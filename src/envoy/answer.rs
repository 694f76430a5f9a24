//! What Envoy is told: one [`Verdict`] per descriptor becomes a
//! `DescriptorStatus`, and the binding one gives the response its headers
//! (written by the layer's own code) and, over a limit, its body.

use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderValue as EnvoyHeader;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use http::{HeaderMap, Response, StatusCode};

use crate::decision::Decision;
use crate::extract::Rejection;
use crate::response::{Answer, CellRef, HeaderOptions, HeaderPlan};

/// A descriptor the front cannot check, as the layer would answer a
/// request it cannot: a problem document, and a status named for it.
#[derive(Debug)]
pub(super) struct Mistake {
    kind: &'static str,
    response: Box<Response<Bytes>>,
}

impl Mistake {
    /// A mistake of the descriptor itself (a 400 problem of type `kind`).
    pub(super) fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        let status = StatusCode::BAD_REQUEST;
        let body = crate::response::http::problem_body(status, kind, &detail.into());
        crate::telemetry::rejection(kind);
        Mistake {
            kind,
            response: Box::new(crate::response::http::problem_response(status, &body)),
        }
    }

    /// A rejection of the caller, answered as the layer answers it.
    pub(super) fn rejected(r: Rejection) -> Self {
        let answer = Answer::Rejected(r);
        let kind = answer.problem_type();
        Mistake {
            kind,
            response: Box::new(answer.into_response(false)),
        }
    }
}

/// One descriptor's answer.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Nothing limits it (an exempt route, an unlimited cell).
    Unlimited,
    /// Admitted: the headers the layer would write.
    Allowed(HeaderPlan),
    /// Over a limit: the layer's refusal (its headers and body), and the
    /// plan of its decision.
    Refused {
        response: Box<Response<Bytes>>,
        plan: HeaderPlan,
    },
    /// Not checked: a mistake, a rejection, or a backend that could not
    /// decide (as the policy's failure mode says).
    Mistake(Mistake),
}

impl Verdict {
    /// The layer's answer, read back: a refusal carries its decision and
    /// its cell, which make its header plan again.
    pub(super) fn answered(response: Box<Response<Bytes>>) -> Self {
        let ext = response.extensions();
        match (ext.get::<Decision>(), ext.get::<CellRef>()) {
            (Some(d), Some(cell)) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                let options = HeaderOptions::default();
                let plan = HeaderPlan::new(d, cell.clone(), options, Duration::ZERO, [None; 3]);
                Verdict::Refused { response, plan }
            }
            _ => Verdict::Mistake(Mistake {
                kind: problem_kind(response.body()),
                response,
            }),
        }
    }

    fn status(&self) -> DescriptorStatus {
        match self {
            Verdict::Unlimited => DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            },
            Verdict::Allowed(plan) => limit_status(Code::Ok, plan),
            Verdict::Refused { plan, .. } => limit_status(Code::OverLimit, plan),
            Verdict::Mistake(m) => DescriptorStatus {
                code: Code::OverLimit as i32,
                current_limit: Some(RateLimit {
                    name: m.kind.to_owned(),
                    requests_per_unit: 0,
                    unit: Unit::Unknown as i32,
                }),
                ..DescriptorStatus::default()
            },
        }
    }
}

/// The problem type of a problem document (`urn:tierlimit:problem:KIND`).
fn problem_kind(body: &[u8]) -> &'static str {
    const KINDS: [&str; 8] = [
        "missing-api-key",
        "malformed-api-key",
        "unknown-api-key",
        "invalid-cost",
        "invalid-priority",
        "cost-exceeds-limit",
        "rate-limiter-unavailable",
        "concurrency-limited",
    ];
    let kind = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let t = v.get("type")?.as_str()?;
            let k = t.strip_prefix("urn:tierlimit:problem:")?;
            KINDS.into_iter().find(|known| *known == k)
        });
    kind.unwrap_or("refused")
}

/// A limit's status, as the headers describe it: its rate in Envoy's
/// units, what is left of it, and when it is whole again (whole seconds,
/// rounded up). Concurrency limits alone describe no rate.
fn limit_status(code: Code, plan: &HeaderPlan) -> DescriptorStatus {
    let d = plan.described();
    if !d.rate {
        return DescriptorStatus {
            code: code as i32,
            ..DescriptorStatus::default()
        };
    }
    let (requests_per_unit, unit, exact) = in_units(d.limit, d.window);
    let name = if exact || d.name.is_empty() {
        d.name.to_owned()
    } else {
        format!("{}: {} per {} s", d.name, d.limit, d.window)
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name,
            requests_per_unit,
            unit: unit as i32,
        }),
        limit_remaining: d.remaining,
        duration_until_reset: Some(ProtoDuration {
            seconds: i64::from(d.reset_in),
            nanos: 0,
        }),
        quota: None,
    }
}

/// `limit` per `window` seconds in Envoy's units: exact when the window is
/// one second, minute, hour or day; else the nearest unit and the rate
/// scaled to it (at least 1), flagged inexact so the name carries the
/// window.
pub(super) fn in_units(limit: u32, window: u32) -> (u32, Unit, bool) {
    let window = Duration::from_secs(u64::from(window));
    const UNITS: [(u64, Unit); 4] = [
        (1, Unit::Second),
        (60, Unit::Minute),
        (3_600, Unit::Hour),
        (86_400, Unit::Day),
    ];
    let nanos = window.as_nanos().max(1);
    if let Some((_, unit)) = UNITS
        .iter()
        .find(|(s, _)| u128::from(*s) * 1_000_000_000 == nanos)
    {
        return (limit, *unit, true);
    }
    // The nearest unit on a log scale: the smallest ratio either way.
    let ratio = |s: u64| {
        let u = u128::from(s) * 1_000_000_000;
        if u > nanos { u / nanos } else { nanos / u }
    };
    let (secs, unit) = UNITS
        .iter()
        .copied()
        .min_by_key(|(s, _)| ratio(*s))
        .unwrap_or((1, Unit::Second));
    let scaled = u128::from(limit) * u128::from(secs) * 1_000_000_000 / nanos;
    let scaled = u32::try_from(scaled).unwrap_or(u32::MAX).max(1);
    (scaled, unit, false)
}

/// The response to a request whose descriptors got `verdicts`: OVER_LIMIT
/// if any is; the headers (and, over a limit, the body) of the binding
/// one: the first mistake, else the refusal with the longest wait, else
/// the admission with the least left.
pub(super) fn respond(verdicts: Vec<Verdict>) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = verdicts.iter().map(Verdict::status).collect();
    let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
    let binding = binding(&verdicts);
    let mut headers = HeaderMap::new();
    let mut raw_body = Vec::new();
    match binding.and_then(|i| verdicts.into_iter().nth(i)) {
        Some(Verdict::Allowed(plan)) => plan.write(&mut headers),
        Some(Verdict::Refused { response, .. } | Verdict::Mistake(Mistake { response, .. })) => {
            let (parts, body) = (*response).into_parts();
            headers = parts.headers;
            raw_body = body.to_vec();
        }
        Some(Verdict::Unlimited) | None => {}
    }
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add: envoy_headers(&headers),
        raw_body,
        ..RateLimitResponse::default()
    }
}

/// The response to a call refused whole: `m` for each of its `n`
/// descriptors (one problem document, whatever `n`).
pub(super) fn refuse_all(m: Mistake, n: usize) -> RateLimitResponse {
    let verdict = Verdict::Mistake(m);
    let statuses = vec![verdict.status(); n];
    // Its headers and body, as the binding verdict of a call.
    let mut response = respond(vec![verdict]);
    response.statuses = statuses;
    response
}

/// The index of the binding verdict, if any limits: the first mistake,
/// else the refusal with the longest wait, else the admission with the
/// least left (the order of the layer's binding limit).
fn binding(verdicts: &[Verdict]) -> Option<usize> {
    if let Some(i) = verdicts
        .iter()
        .position(|v| matches!(v, Verdict::Mistake(_)))
    {
        return Some(i);
    }
    let refused = verdicts.iter().enumerate().filter_map(|(i, v)| match v {
        Verdict::Refused { plan, .. } => Some((i, plan.described())),
        _ => None,
    });
    if let Some((i, _)) = refused.max_by_key(|(i, d)| (d.retry, std::cmp::Reverse(*i))) {
        return Some(i);
    }
    let allowed = verdicts.iter().enumerate().filter_map(|(i, v)| match v {
        Verdict::Allowed(plan) => Some((i, plan.described())),
        _ => None,
    });
    allowed
        .min_by_key(|(i, d)| (d.remaining, *i))
        .map(|(i, _)| i)
}

/// `headers` as Envoy's header values (the layer writes ASCII only).
fn envoy_headers(headers: &HeaderMap) -> Vec<EnvoyHeader> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some(EnvoyHeader {
                key: name.as_str().to_owned(),
                value: value.to_str().ok()?.to_owned(),
                ..EnvoyHeader::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(in_units(100, 3600), (100, Unit::Hour, true));
        assert_eq!(in_units(10, 1), (10, Unit::Second, true));
        assert_eq!(in_units(5, 86_400), (5, Unit::Day, true));
        // 10 per 30 s: nearest the minute, 20 a minute.
        assert_eq!(in_units(10, 30), (20, Unit::Minute, false));
        // 1 per 2 days: a day, at least 1.
        assert_eq!(in_units(1, 172_800), (1, Unit::Day, false));
        // 3 per 7 s: nearest the second, 1 a second at least.
        assert_eq!(in_units(3, 7), (1, Unit::Second, false));
    }
}
