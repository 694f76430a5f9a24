//! A small gRPC service of the demo's own, `demo.v1.Inference`, written by
//! hand with prost's derive and tonic's server and client parts, so the
//! demo needs no protobuf build step.
//!
//! ```proto
//! package demo.v1;
//! service Inference {
//!   rpc Complete(CompleteRequest) returns (CompleteReply);
//!   rpc CompleteStream(CompleteRequest) returns (stream CompleteReply);
//! }
//! message CompleteRequest { string prompt = 1; uint32 max_tokens = 2; }
//! message CompleteReply {
//!   string text = 1; uint64 prompt_tokens = 2; uint64 completion_tokens = 3; uint64 total_tokens = 4;
//! }
//! ```
//!
//! The fake model "generates" `max_tokens` tokens (default 16, at most
//! 4,096); usage is the prompt's words (input) plus `max_tokens` (output),
//! reported to the layer's `TokenMeter` apart (the stream reports per
//! chunk of 16, and holds the meter until it ends or the client goes away).
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Body;
use tonic::codegen::http;

/// `demo.v1.CompleteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CompleteRequest {
    /// The prompt.
    #[prost(string, tag = "1")]
    pub(crate) prompt: String,
    /// Tokens to generate (0: the default, 16).
    #[prost(uint32, tag = "2")]
    pub(crate) max_tokens: u32,
}

/// `demo.v1.CompleteReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CompleteReply {
    /// The completion.
    #[prost(string, tag = "1")]
    pub(crate) text: String,
    /// Usage, as OpenAI reports it (on the last message of a stream).
    #[prost(uint64, tag = "2")]
    pub(crate) prompt_tokens: u64,
    #[prost(uint64, tag = "3")]
    pub(crate) completion_tokens: u64,
    #[prost(uint64, tag = "4")]
    pub(crate) total_tokens: u64,
}

/// The methods' paths.
pub(crate) const COMPLETE: &str = "/demo.v1.Inference/Complete";
pub(crate) const COMPLETE_STREAM: &str = "/demo.v1.Inference/CompleteStream";

/// The request's token count, or the status for a bad one.
fn tokens_of(req: &CompleteRequest) -> Result<(u64, u64), tonic::Status> {
    let n = match req.max_tokens {
        0 => 16,
        n @ 1..=4096 => n,
        _ => {
            return Err(tonic::Status::invalid_argument(
                "max_tokens must be from 1 to 4096",
            ));
        }
    };
    Ok((req.prompt.split_whitespace().count() as u64, u64::from(n)))
}

/// The server side of `demo.v1.Inference`.
#[derive(Clone, Debug, Default)]
pub(crate) struct InferenceServer;

impl tonic::server::NamedService for InferenceServer {
    const NAME: &'static str = "demo.v1.Inference";
}

struct Complete;

impl tonic::server::UnaryService<CompleteRequest> for Complete {
    type Response = CompleteReply;
    type Future = Ready<Result<tonic::Response<CompleteReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<CompleteRequest>) -> Self::Future {
        let meter = request
            .extensions()
            .get::<tierlimit::meter::TokenMeter>()
            .cloned();
        let req = request.into_inner();
        let (prompt_tokens, n) = match tokens_of(&req) {
            Ok(t) => t,
            Err(status) => return ready(Err(status)),
        };
        if let Some(m) = meter {
            m.add_input(prompt_tokens);
            m.add_output(n);
        }
        ready(Ok(tonic::Response::new(CompleteReply {
            text: vec!["tok"; n as usize].join(" "),
            prompt_tokens,
            completion_tokens: n,
            total_tokens: prompt_tokens + n,
        })))
    }
}

struct CompleteStream;

type ReplyStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<CompleteReply, tonic::Status>> + Send>>;

impl tonic::server::ServerStreamingService<CompleteRequest> for CompleteStream {
    type Response = CompleteReply;
    type ResponseStream = ReplyStream;
    type Future = Ready<Result<tonic::Response<ReplyStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<CompleteRequest>) -> Self::Future {
        let meter = request
            .extensions()
            .get::<tierlimit::meter::TokenMeter>()
            .cloned();
        let req = request.into_inner();
        let (prompt_tokens, n) = match tokens_of(&req) {
            Ok(t) => t,
            Err(status) => return ready(Err(status)),
        };
        if let Some(m) = &meter {
            m.add_input(prompt_tokens);
        }
        let chunks = n.div_ceil(16);
        // The stream holds the meter: it settles when the stream ends or
        // is dropped (the client went away).
        let stream = futures_util::stream::unfold(0u64, move |i| {
            let meter = meter.clone();
            async move {
                if i == chunks {
                    return None;
                }
                let size = (n - i * 16).min(16);
                if let Some(m) = &meter {
                    m.add_output(size);
                }
                tokio::task::yield_now().await;
                let last = i + 1 == chunks;
                let reply = CompleteReply {
                    text: vec!["tok"; size as usize].join(" "),
                    prompt_tokens: if last { prompt_tokens } else { 0 },
                    completion_tokens: if last { n } else { 0 },
                    total_tokens: if last { prompt_tokens + n } else { 0 },
                };
                Some((Ok(reply), i + 1))
            }
        });
        ready(Ok(tonic::Response::new(Box::pin(stream))))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for InferenceServer
where
    B: Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == COMPLETE {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Complete, req).await)
            })
        } else if req.uri().path() == COMPLETE_STREAM {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(CompleteStream, req).await)
            })
        } else {
            Box::pin(async { Ok(tonic::Status::unimplemented("no such method").into_http()) })
        }
    }
}

/// A client on `channel`, ready for a call.
async fn ready_client(
    channel: tonic::transport::Channel,
) -> Result<tonic::client::Grpc<tonic::transport::Channel>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    Ok(grpc)
}

/// Calls `Complete` on `channel`.
pub(crate) async fn complete(
    channel: tonic::transport::Channel,
    request: tonic::Request<CompleteRequest>,
) -> Result<tonic::Response<CompleteReply>, tonic::Status> {
    let mut grpc = ready_client(channel).await?;
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(COMPLETE),
        tonic_prost::ProstCodec::default(),
    )
    .await
}

/// Calls `CompleteStream` on `channel`.
pub(crate) async fn complete_stream(
    channel: tonic::transport::Channel,
    request: tonic::Request<CompleteRequest>,
) -> Result<tonic::Response<tonic::codec::Streaming<CompleteReply>>, tonic::Status> {
    let mut grpc = ready_client(channel).await?;
    grpc.server_streaming(
        request,
        http::uri::PathAndQuery::from_static(COMPLETE_STREAM),
        tonic_prost::ProstCodec::default(),
    )
    .await
}
