//! What the layer writes: rate-limit headers, 429 problem documents and
//! gRPC `RESOURCE_EXHAUSTED` answers.

mod body;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod http;

use std::time::Duration;

pub use body::ResponseBody;
pub use headers::HeaderOptions;
pub(crate) use headers::SlotHeaders;

/// Unix seconds now.
pub(crate) fn unix_now_secs() -> u64 {
    headers::unix_now().as_secs()
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
