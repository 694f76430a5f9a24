//! What the layer writes: rate-limit headers, 429 problem documents and
//! gRPC `RESOURCE_EXHAUSTED` answers, and what a response body holds until
//! it ends.
//!
//! Inside, imports run one way: `answer` (what is answered, the words both
//! forms share) over `headers`; the two writers, `http` and `grpc`, over
//! `answer`; this facade over both. `hold` and `body` stand apart: a body
//! and the opaque guard it holds.

mod answer;
mod body;
mod cell;
pub(crate) mod grpc;
pub(crate) mod headers;
mod hold;
pub(crate) mod http;

pub(crate) use answer::Answer;
pub use body::{AnswerBody, ResponseBody};
pub(crate) use cell::{CellHeaders, CellRef, LimitText};
pub use headers::HeaderOptions;
pub(crate) use headers::HeaderPlan;
pub(crate) use hold::Hold;
pub use hold::{LeaseGuard, Leased};

impl Answer<'_> {
    /// The response, in the form the caller speaks (`grpc`: the request's
    /// content type is gRPC's).
    pub(crate) fn into_response(self, grpc: bool) -> ::http::Response<bytes::Bytes> {
        match self {
            Answer::Refused { .. } => {}
            Answer::Unavailable => crate::telemetry::unavailable(),
            // Counted by tier and category where it is shed.
            Answer::Shed { .. } => {}
            _ => crate::telemetry::rejection(self.problem_type()),
        }
        if grpc {
            grpc::response(&self)
        } else {
            http::response(&self)
        }
    }
}
