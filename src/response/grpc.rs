//! gRPC refusals: trailers-only responses with `grpc-status`, metadata and
//! `grpc-status-details-bin` (`google.rpc.Status` carrying `RetryInfo` and
//! `QuotaFailure`), encoded by hand so no protobuf toolchain is needed.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};

use super::http::Refusal;

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

/// Whether a request speaks gRPC (`content-type: application/grpc*`).
#[inline]
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC code of a refusal, derived from its HTTP status, so the two
/// forms always classify a refusal alike.
pub(crate) fn status_code(refusal: &Refusal<'_>) -> i32 {
    match refusal.status() {
        http::StatusCode::TOO_MANY_REQUESTS => code::RESOURCE_EXHAUSTED,
        http::StatusCode::BAD_REQUEST => code::INVALID_ARGUMENT,
        http::StatusCode::UNAUTHORIZED => code::UNAUTHENTICATED,
        _ => code::UNAVAILABLE,
    }
}

pub(crate) fn response(refusal: &Refusal<'_>) -> Response<Bytes> {
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
    if let Refusal::Limited {
        plan,
        tier,
        category,
        key,
    } = refusal
    {
        plan.write(h);
        let retry = plan.decision.retry_after.unwrap_or_default();
        h.insert(
            GRPC_PUSHBACK,
            HeaderValue::from(retry.as_millis().max(1) as u64),
        );
        let details = status_details(
            code,
            &message,
            retry,
            &key.redacted().to_string(),
            &format!(
                "tier `{tier}`: {category} limit of {} per {} s",
                plan.decision.limit,
                super::ceil_secs(plan.decision.window)
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&base64(&details)) {
            h.insert(GRPC_DETAILS, v);
        }
        res.extensions_mut().insert(plan.decision);
    }
    res
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

// Protobuf wire encoding, just enough for google.rpc.Status.

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn field_bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(buf, u64::from(field << 3 | 2));
    varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

fn field_varint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        varint(buf, u64::from(field << 3));
        varint(buf, v);
    }
}

fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    field_bytes(&mut a, 1, type_url.as_bytes());
    field_bytes(&mut a, 2, value);
    a
}

/// `google.rpc.Status { code, message, details: [RetryInfo, QuotaFailure] }`.
pub(crate) fn status_details(
    code: i32,
    message: &str,
    retry: std::time::Duration,
    subject: &str,
    description: &str,
) -> Vec<u8> {
    // google.protobuf.Duration { seconds = 1, nanos = 2 }
    let mut duration = Vec::new();
    field_varint(&mut duration, 1, retry.as_secs());
    field_varint(&mut duration, 2, u64::from(retry.subsec_nanos()));
    // google.rpc.RetryInfo { retry_delay = 1 }
    let mut retry_info = Vec::new();
    field_bytes(&mut retry_info, 1, &duration);
    // google.rpc.QuotaFailure { violations = 1: Violation { subject = 1, description = 2 } }
    let mut violation = Vec::new();
    field_bytes(&mut violation, 1, subject.as_bytes());
    field_bytes(&mut violation, 2, description.as_bytes());
    let mut quota = Vec::new();
    field_bytes(&mut quota, 1, &violation);

    let mut status = Vec::new();
    field_varint(&mut status, 1, code as u64);
    field_bytes(&mut status, 2, message.as_bytes());
    field_bytes(
        &mut status,
        3,
        &any("type.googleapis.com/google.rpc.RetryInfo", &retry_info),
    );
    field_bytes(
        &mut status,
        3,
        &any("type.googleapis.com/google.rpc.QuotaFailure", &quota),
    );
    status
}

#[cfg(all(test, feature = "client"))]
pub(crate) fn base64_for_tests(data: &[u8]) -> String {
    base64(data)
}

/// Standard base64 without padding (what gRPC binary metadata carries).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg");
        assert_eq!(base64(b"fo"), "Zm8");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b%c\u{e9}"), "a b%25c%C3%A9");
    }
}
