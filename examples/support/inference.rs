//! A small gRPC service of the demo's own, `demo.v1.Inference`, written by
//! hand with prost's derive and tonic's server and client parts, so the
//! demo needs no protobuf build step.
//!
//! ```proto
//! package demo.v1;
//! service Inference { rpc Complete(CompleteRequest) returns (CompleteReply); }
//! message CompleteRequest { string prompt = 1; }
//! message CompleteReply { string text = 1; }
//! ```
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
}

/// `demo.v1.CompleteReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CompleteReply {
    /// The completion.
    #[prost(string, tag = "1")]
    pub(crate) text: String,
}

/// The method's path.
pub(crate) const COMPLETE: &str = "/demo.v1.Inference/Complete";

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
        let prompt = request.into_inner().prompt;
        ready(Ok(tonic::Response::new(CompleteReply {
            text: format!("{prompt} … and that is the demo model's answer."),
        })))
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
        } else {
            Box::pin(async { Ok(tonic::Status::unimplemented("no such method").into_http()) })
        }
    }
}

/// Calls `Complete` on `channel`.
pub(crate) async fn complete(
    channel: tonic::transport::Channel,
    request: tonic::Request<CompleteRequest>,
) -> Result<tonic::Response<CompleteReply>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(COMPLETE),
        tonic_prost::ProstCodec::default(),
    )
    .await
}
