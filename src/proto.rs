//! The few protobuf messages a gRPC refusal carries — `google.rpc.Status`
//! with `RetryInfo` and `QuotaFailure` in `grpc-status-details-bin` — written
//! (by the layer) and read (by the retry client) by hand, so that gRPC
//! refusals need neither `tonic` nor a protobuf toolchain. The tests check
//! both directions against `tonic-types`' own encoding.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Standard base64: written without padding (as gRPC binary metadata is),
/// read with or without it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";

/// Binary metadata text of `data`.
pub(crate) fn encode_bin(data: &[u8]) -> String {
    BASE64.encode(data)
}

/// The bytes of a binary metadata value; `None` if it is not base64.
#[cfg_attr(not(feature = "client"), allow(dead_code))]
pub(crate) fn decode_bin(text: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

// Writing.

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

/// What a refusal's `google.rpc.Status` says.
pub(crate) struct StatusDetails<'a> {
    pub(crate) code: i32,
    pub(crate) message: &'a str,
    /// `RetryInfo.retry_delay`.
    pub(crate) retry: Duration,
    /// `QuotaFailure.violations[0].subject` (a redacted key, never a key;
    /// empty: no `QuotaFailure`).
    pub(crate) subject: &'a str,
    /// `QuotaFailure.violations[0].description`.
    pub(crate) description: &'a str,
}

impl StatusDetails<'_> {
    /// `google.rpc.Status { code, message, details: [RetryInfo, QuotaFailure] }`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // google.protobuf.Duration { seconds = 1, nanos = 2 }
        let mut duration = Vec::new();
        field_varint(&mut duration, 1, self.retry.as_secs());
        field_varint(&mut duration, 2, u64::from(self.retry.subsec_nanos()));
        // google.rpc.RetryInfo { retry_delay = 1 }
        let mut retry_info = Vec::new();
        field_bytes(&mut retry_info, 1, &duration);
        // google.rpc.QuotaFailure { violations = 1: { subject = 1, description = 2 } }
        let mut violation = Vec::new();
        field_bytes(&mut violation, 1, self.subject.as_bytes());
        field_bytes(&mut violation, 2, self.description.as_bytes());
        let mut quota = Vec::new();
        field_bytes(&mut quota, 1, &violation);

        let mut status = Vec::new();
        field_varint(&mut status, 1, self.code as u64);
        field_bytes(&mut status, 2, self.message.as_bytes());
        field_bytes(&mut status, 3, &any(RETRY_INFO, &retry_info));
        // A shed call broke no quota: no subject, no violation.
        if !self.subject.is_empty() {
            field_bytes(&mut status, 3, &any(QUOTA_FAILURE, &quota));
        }
        status
    }
}

// Reading: just enough for `Status.details[] → RetryInfo.retry_delay`.

/// The fields of one message: (number, wire type, varint value, bytes).
fn fields(mut b: &[u8]) -> Vec<(u32, u8, u64, &[u8])> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some(key) = varint(&mut b) else { break };
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        match wire {
            0 => match varint(&mut b) {
                Some(v) => out.push((field, 0, v, &[][..])),
                None => break,
            },
            2 => {
                let Some(len) = varint(&mut b) else { break };
                let Ok(len) = usize::try_from(len) else { break };
                if len > b.len() {
                    break;
                }
                out.push((field, 2, 0, &b[..len]));
                b = &b[len..];
            }
            _ => break,
        }
    }
    out
}

/// The `RetryInfo.retry_delay` of an encoded `google.rpc.Status`, if it
/// has one. Hostile values never panic: an impossible delay is `None`.
#[cfg_attr(not(feature = "client"), allow(dead_code))]
pub(crate) fn retry_delay(status: &[u8]) -> Option<Duration> {
    for (field, wire, _, any) in fields(status) {
        if field != 3 || wire != 2 {
            continue;
        }
        let parts = fields(any);
        let url = parts.iter().find(|p| p.0 == 1).map(|p| p.3)?;
        if url != RETRY_INFO.as_bytes() {
            continue;
        }
        let info = parts.iter().find(|p| p.0 == 2).map(|p| p.3)?;
        let duration = fields(info).into_iter().find(|p| p.0 == 1)?.3;
        let d = fields(duration);
        let secs = d.iter().find(|p| p.0 == 1).map_or(0, |p| p.2);
        let nanos = d.iter().find(|p| p.0 == 2).map_or(0, |p| p.2);
        return Duration::from_secs(secs).checked_add(Duration::from_nanos(nanos));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    fn details() -> StatusDetails<'static> {
        StatusDetails {
            code: 8,
            message: "rate limit exceeded",
            retry: Duration::new(36, 500),
            subject: "key:0123456789ab",
            description: "tier `free`: read limit of 100 per 3600 s",
        }
    }

    #[test]
    fn tonic_types_reads_what_we_write() {
        let bytes = details().encode();
        let status = tonic::Status::with_details(
            tonic::Code::ResourceExhausted,
            "rate limit exceeded",
            bytes.into(),
        );
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::new(36, 500)));
        let quota = status.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations.len(), 1);
        assert_eq!(quota.violations[0].subject, "key:0123456789ab");
        assert_eq!(
            quota.violations[0].description,
            "tier `free`: read limit of 100 per 3600 s"
        );
    }

    #[test]
    fn we_read_what_tonic_types_writes() {
        for delay in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::new(36, 0),
            Duration::new(86_400, 999_999_999),
        ] {
            let status = tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                "slow down",
                ErrorDetails::with_retry_info(Some(delay)),
            );
            assert_eq!(retry_delay(status.details()), Some(delay), "{delay:?}");
        }
        // And our own encoding, through base64 both ways.
        let text = encode_bin(&details().encode());
        let back = decode_bin(text.as_bytes()).unwrap();
        assert_eq!(retry_delay(&back), Some(Duration::new(36, 500)));
        assert_eq!(decode_bin(b"Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(decode_bin(b"Zg=="), Some(b"f".to_vec()));
        assert_eq!(decode_bin(b"Zg"), Some(b"f".to_vec()));
        assert_eq!(decode_bin(b"not base64!"), None);
        assert_eq!(encode_bin(b"fo"), "Zm8");
    }

    #[test]
    fn a_hostile_retry_info_is_no_hint_and_no_panic() {
        // RetryInfo { retry_delay: { seconds: u64::MAX, nanos: 2e9 } }
        let status = [
            &[0x1a, 0x3f, 0x0a, 0x28][..],
            RETRY_INFO.as_bytes(),
            &[0x12, 0x13, 0x0a, 0x11, 0x08],
            &[0xff; 9],
            &[0x01, 0x10, 0x80, 0xa8, 0xd6, 0xb9, 0x07],
        ]
        .concat();
        assert_eq!(retry_delay(&status), None);
        // Truncated and garbage input: no hint.
        for cut in 0..status.len() {
            let _ = retry_delay(&status[..cut]);
        }
        assert_eq!(retry_delay(&[0xff; 32]), None);
    }
}
