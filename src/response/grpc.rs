//! gRPC refusals: trailers-only responses with `grpc-status`, metadata and
//! `grpc-status-details-bin` (`google.rpc.Status` carrying `RetryInfo` and
//! `QuotaFailure`, written by `crate::proto`).

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};

use super::answer::Answer;
use crate::meter::TokenKind;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
const GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// gRPC status codes used here.
pub(crate) mod code {
    pub(crate) const INVALID_ARGUMENT: i32 = 3;
    pub(crate) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(crate) const UNAVAILABLE: i32 = 14;
    pub(crate) const UNAUTHENTICATED: i32 = 16;
}

/// The gRPC code of a refusal, derived from its HTTP status, so the two
/// forms always classify a refusal alike.
pub(crate) fn status_code(refusal: &Answer<'_>) -> i32 {
    match refusal.status() {
        http::StatusCode::TOO_MANY_REQUESTS => code::RESOURCE_EXHAUSTED,
        http::StatusCode::BAD_REQUEST => code::INVALID_ARGUMENT,
        http::StatusCode::UNAUTHORIZED => code::UNAUTHENTICATED,
        _ => code::UNAVAILABLE,
    }
}

/// `refusal` as a gRPC trailers-only response.
pub(crate) fn response(refusal: &Answer<'_>) -> Response<Bytes> {
    let code = status_code(refusal);
    let message = refusal.detail();
    let mut res = Response::new(Bytes::new());
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    if let Answer::Refused {
        plan,
        decision,
        tier,
        category,
        key,
    } = refusal
    {
        plan.write(h);
        let retry = decision.retry_after.unwrap_or_default();
        let details = crate::proto::StatusDetails {
            code,
            message: &message,
            retry,
            subject: &key.redacted().to_string(),
            description: &match decision.lease {
                Some(l) if decision.is_concurrency_refusal() => format!(
                    "tier `{tier}`: {category} concurrency limit of {} requests in flight{}",
                    l.limit,
                    if l.per_account { " per account" } else { "" }
                ),
                _ => format!(
                    "tier `{tier}`: {category} {}limit of {} per {}",
                    match decision.token_kind() {
                        None => "",
                        Some(TokenKind::Total) => "token ",
                        Some(TokenKind::Input) => "input token ",
                        Some(TokenKind::Output) => "output token ",
                    },
                    decision.limit,
                    decision.per_text()
                ),
            },
        };
        push_back(h, &details);
        res.extensions_mut().insert(*decision);
    }
    if let Answer::Shed {
        retry_after, cell, ..
    } = refusal
    {
        // UNAVAILABLE with a pushback: gRPC's own retry policy retries it
        // after the delay (A6: a pushback overrides the backoff).
        if let Some((cell, options)) = cell {
            cell.write_quota(*options, res.headers_mut());
        }
        let h = res.headers_mut();
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(crate::time::retry_secs(*retry_after)),
        );
        let details = crate::proto::StatusDetails {
            code,
            message: &message,
            retry: *retry_after,
            subject: "",
            description: "",
        };
        push_back(h, &details);
    }
    res
}

/// `grpc-retry-pushback-ms` and `grpc-status-details-bin` (RetryInfo, and
/// QuotaFailure when `details` names a subject).
fn push_back(h: &mut http::HeaderMap, details: &crate::proto::StatusDetails<'_>) {
    h.insert(
        GRPC_PUSHBACK,
        HeaderValue::from(details.retry.as_millis().max(1) as u64),
    );
    if let Ok(v) = HeaderValue::from_str(&crate::proto::encode_bin(&details.encode())) {
        h.insert(GRPC_DETAILS, v);
    }
}

/// gRPC percent-encoding of `grpc-message`: bytes outside 0x20..=0x7E, and
/// `%`, are escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b%c\u{e9}"), "a b%25c%C3%A9");
    }
}
