//! The admin API's request bodies: JSON objects of bounded size, read
//! under a deadline, and their fields.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::Body;
use serde_json::{Map, Value};

use super::deadline::Deadline;
use super::{AdminResponse, bad, problem};

/// The largest admin request body read (JSON), in bytes.
const MAX_BODY: usize = 64 * 1024;

/// How long an admin request's body may take to arrive, unless
/// [`AdminService::body_timeout`](crate::admin::AdminService::body_timeout) says
/// otherwise: 10 seconds, from when the service starts reading it. A client
/// still sending then (an authenticated client dripping a body, say) is
/// answered 408 Request Timeout, and nothing changes.
pub const ADMIN_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The body as a JSON object, read within `timeout`.
pub(super) async fn read_json<ReqBody>(
    body: ReqBody,
    timeout: Duration,
) -> Result<Map<String, Value>, AdminResponse>
where
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    let Some(collected) = Deadline::after(timeout).bound(limited.collect()).await else {
        return Err(problem(
            StatusCode::REQUEST_TIMEOUT,
            "admin-request-timeout",
            &format!("the request body did not arrive within {timeout:?}; nothing changed"),
        ));
    };
    let bytes = match collected {
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
pub(super) fn only(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), AdminResponse> {
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

pub(super) fn string_field(body: &Map<String, Value>, name: &str) -> Result<String, AdminResponse> {
    match body.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("field `{name}` must be a string"))),
        None => Err(bad(format!("field `{name}` is missing"))),
    }
}

/// The `key` field: an API key as a request could present it. Its text
/// is never part of an answer.
pub(super) fn key_field(body: &Map<String, Value>) -> Result<String, AdminResponse> {
    let key = string_field(body, "key")?;
    match crate::key::key_problem(&key, crate::key::DEFAULT_MAX_KEY_LEN) {
        None => Ok(key),
        Some(why) => Err(bad(format!("field `key`: {why}"))),
    }
}

pub(super) fn time_field(body: &Map<String, Value>, name: &str) -> Result<u64, AdminResponse> {
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
