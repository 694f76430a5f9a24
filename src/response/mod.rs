//! What the layer writes: rate-limit headers, 429 problem documents and
//! gRPC `RESOURCE_EXHAUSTED` answers.

mod body;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod http;

pub use body::{AnswerBody, ResponseBody};
pub use headers::HeaderOptions;
pub(crate) use headers::{CellHeaders, CellRef, HeaderPlan, LimitText};
pub(crate) use http::Answer;
