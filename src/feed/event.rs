//! [`UsageEvent`]: one admitted request, as a billing pipeline reads it.

use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::key::KeyId;

/// One admitted request, settled: who, what, how much, how it ended.
///
/// As JSON (the [`JsonLines`](super::JsonLines) sink; the
/// [`RedisStream`](super::RedisStream) sink writes the same fields), ids
/// are 16 hex digits and `time` is RFC 3339 in UTC with milliseconds:
///
/// ```json
/// {"time":"2026-12-04T22:36:58.123Z","key":"9f1c…","account":null,"org":null,
///  "tier":"pro","category":"ai","route":"POST /v1/ai/complete","status":200,
///  "end":"complete","requests":1,"refunded":false,"shadow":false,
///  "tokens":420,"input_tokens":20,"output_tokens":400,"duration_us":1840}
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct UsageEvent {
    /// When the request was admitted: Unix time, by the layer's clock
    /// ([`unix_clock`](crate::RateLimitLayerBuilder::unix_clock) when one
    /// is injected, in whole seconds then).
    #[serde(serialize_with = "rfc3339")]
    pub time: Duration,
    /// The caller's key id: the keyed hash ([`KeyId`]), never the key.
    #[serde(serialize_with = "hex")]
    pub key: KeyId,
    /// The caller's account id, if the extractor or the key table gave one.
    #[serde(serialize_with = "hex_opt")]
    pub account: Option<KeyId>,
    /// The caller's organisation id, if the extractor or the key table
    /// gave one.
    #[serde(serialize_with = "hex_opt")]
    pub org: Option<KeyId>,
    /// The tier the request was admitted in.
    pub tier: String,
    /// The request's category.
    pub category: String,
    /// The request's method and path (`POST /v1/ai/complete`), never its
    /// query string.
    pub route: String,
    /// The response's status; `None` when no response head left the layer
    /// (the call was dropped, or the inner service failed). For gRPC, the
    /// HTTP status: gRPC's own travels in the trailers, not read here.
    pub status: Option<u16>,
    /// How the response ended.
    pub end: End,
    /// The units the request counted against its limits, as billed: its
    /// cost (the route's cost times the extractor's count); 0 when its
    /// response refunded it (`refund_on`) or shadow mode let it through.
    pub requests: u32,
    /// Whether its response refunded it (`refund_on`).
    pub refunded: bool,
    /// Let through by shadow mode (it would have been refused; nothing was
    /// counted).
    pub shadow: bool,
    /// The tokens settled for a metered request (what its handler and
    /// stream reported through its [`TokenMeter`](crate::meter::TokenMeter)
    /// and [`TokenUsage`](struct@crate::meter::TokenUsage)); `None` in a category
    /// without token limits.
    pub tokens: Option<u64>,
    /// The input tokens settled for a metered request (what it reported
    /// with [`TokenMeter::add_input`](crate::meter::TokenMeter::add_input)
    /// or [`TokenUsage::split`](crate::meter::TokenUsage::split)); `None`
    /// in a category without token limits, or when the request reported
    /// its tokens only as a total without a kind
    /// ([`TokenMeter::add`](crate::meter::TokenMeter::add)).
    pub input_tokens: Option<u64>,
    /// The output tokens settled, as `input_tokens`.
    pub output_tokens: Option<u64>,
    /// From admission to the end of the response (the body's last frame,
    /// or its drop).
    #[serde(rename = "duration_us", serialize_with = "micros")]
    pub duration: Duration,
}

/// How an admitted request's response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum End {
    /// Its body was sent to the end (its last frame, its trailers, or it
    /// was complete when its head left).
    Complete,
    /// Its body failed.
    Error,
    /// It was dropped before its end: a client that went away mid-stream,
    /// a timeout, a call cancelled before its response.
    Dropped,
}

impl End {
    /// The name the sinks write.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Error => "error",
            End::Dropped => "dropped",
        }
    }
}

impl UsageEvent {
    /// A request admitted at `time`, not over yet.
    pub(crate) fn start(time: Duration, key: KeyId, account: Option<KeyId>) -> Self {
        UsageEvent {
            time,
            key,
            account,
            org: None,
            tier: String::new(),
            category: String::new(),
            route: String::new(),
            status: None,
            end: End::Dropped,
            requests: 0,
            refunded: false,
            shadow: false,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            duration: Duration::ZERO,
        }
    }

    /// `time` as RFC 3339 in UTC, with milliseconds (as the sinks write it).
    pub fn time_rfc3339(&self) -> String {
        rfc3339_of(self.time)
    }

    /// An id as the sinks write it: 16 hex digits.
    pub fn id_hex(id: KeyId) -> String {
        format!("{:016x}", id.as_u64())
    }
}

fn rfc3339<S: Serializer>(time: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_of(*time))
}

/// Unix time as RFC 3339 in UTC, with milliseconds.
fn rfc3339_of(time: Duration) -> String {
    let ms = i64::try_from(time.as_millis()).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        // Beyond jiff's range (year 9999): the last moment it has.
        Err(_) => jiff::Timestamp::MAX.to_string(),
    }
}

fn hex<S: Serializer>(id: &KeyId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&UsageEvent::id_hex(*id))
}

fn hex_opt<S: Serializer>(id: &Option<KeyId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => hex(id, s),
        None => s.serialize_none(),
    }
}

fn micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(super::micros(*d))
}
