//! Answers as HTTP problem documents (RFC 9457).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use super::answer::Answer;
use crate::time::{ceil_secs, retry_secs};

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// `answer` as a problem document, with its rate-limit headers on a refusal.
pub(crate) fn response(answer: &Answer<'_>) -> Response<Bytes> {
    let status = answer.status();
    let mut body = problem_body(status, answer.problem_type(), &answer.detail());
    match answer {
        Answer::Refused {
            decision: d,
            tier,
            category,
            ..
        } => {
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
                obj.insert("unit".into(), json!(d.unit()));
                obj.insert("tier".into(), json!(tier));
                obj.insert("category".into(), json!(category));
                obj.insert("limit".into(), json!(d.limit));
                obj.insert("remaining".into(), json!(d.remaining));
                obj.insert("window_seconds".into(), json!(ceil_secs(d.window)));
                if let Some(name) = d.period.name() {
                    obj.insert("period".into(), json!(format!("calendar {name}")));
                }
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
        Answer::Shed {
            retry_after,
            tier,
            category,
            ..
        } => {
            let obj = body.as_object_mut().expect("a json object");
            obj.insert("type".into(), json!(super::answer::REDUCED_CAPACITY));
            if let Some(tier) = tier {
                obj.insert("tier".into(), json!(tier));
                obj.insert("category".into(), json!(category));
            }
            obj.insert(
                "retry_after_seconds".into(),
                json!(retry_secs(*retry_after)),
            );
        }
        _ => {}
    }
    let mut res = problem_response(status, &body);
    if let Answer::Refused { plan, decision, .. } = answer {
        plan.write(res.headers_mut());
        res.extensions_mut().insert(*decision);
        // The limit's cell, for Envoy's front to name the limit.
        #[cfg(feature = "envoy")]
        res.extensions_mut().insert(plan.cell().clone());
    }
    if let Answer::Shed {
        retry_after, cell, ..
    } = answer
    {
        if let Some((cell, options)) = cell {
            cell.write_quota(*options, res.headers_mut());
        }
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_secs(*retry_after)),
        );
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
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
