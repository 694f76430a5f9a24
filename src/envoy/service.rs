//! [`RlsService`]: the gRPC service, decoding requests leniently.
//!
//! Envoy's generated server decodes a request's strings strictly: a byte
//! string that is not UTF-8 fails the whole call with `INTERNAL`, before
//! any code of ours runs. This service decodes the same wire format with
//! bytes where the schema says strings (the wire types are the same) and
//! reads them lossily, so a hostile entry is a descriptor answered like
//! any other mistake (a key with `U+FFFD` is malformed), never a gRPC
//! error.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use http_body::Body;
use tonic::server::{NamedService, UnaryService};

use super::RateLimitServer;
use crate::backend::Backend;

/// The gRPC method this service answers.
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// `envoy.service.ratelimit.v3.RateLimitService` as a tonic service
/// ([`RateLimitServer::into_service`]): add it to a
/// `tonic::transport::Server` as any generated service.
///
/// A request larger than [`max_decoding_message_size`](Self::max_decoding_message_size)
/// (256 KiB by default: Envoy's are a few hundred bytes) is refused by
/// tonic with `OUT_OF_RANGE` before it is decoded, so a hostile
/// caller cannot make it hold millions of descriptors.
#[must_use]
#[derive(Debug)]
pub struct RlsService<B> {
    server: RateLimitServer<B>,
    max_decoding: usize,
}

impl<B> Clone for RlsService<B> {
    fn clone(&self) -> Self {
        RlsService {
            server: self.server.clone(),
            max_decoding: self.max_decoding,
        }
    }
}

/// The largest request decoded by default.
const MAX_DECODING: usize = 256 * 1024;

impl<B> RlsService<B> {
    pub(super) fn new(server: RateLimitServer<B>) -> Self {
        RlsService {
            server,
            max_decoding: MAX_DECODING,
        }
    }

    /// The largest request decoded, in bytes (default 256 KiB).
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding = limit;
        self
    }
}

impl<B> NamedService for RlsService<B> {
    const NAME: &'static str = "envoy.service.ratelimit.v3.RateLimitService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<B, ReqBody> tower_service::Service<http::Request<ReqBody>> for RlsService<B>
where
    B: Backend,
    ReqBody: Body + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if req.uri().path() != SHOULD_RATE_LIMIT {
            let status = tonic::Status::unimplemented("this service answers ShouldRateLimit only");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let method = ShouldRateLimit(self.server.clone());
        let max = self.max_decoding;
        Box::pin(async move {
            let codec = Codec;
            let mut grpc =
                tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// Prost's codec, but a request that is not a `RateLimitRequest` is the
/// caller's mistake (`INVALID_ARGUMENT`), not the server's (`INTERNAL`).
struct Codec;

impl tonic::codec::Codec for Codec {
    type Encode = RateLimitResponse;
    type Decode = WireRequest;
    type Encoder = tonic_prost::ProstEncoder<RateLimitResponse>;
    type Decoder = Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(tonic_prost::ProstDecoder::new(
            tonic::codec::BufferSettings::default(),
        ))
    }
}

/// [`Codec`]'s decoder.
struct Decoder(tonic_prost::ProstDecoder<WireRequest>);

impl tonic::codec::Decoder for Decoder {
    type Item = WireRequest;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<WireRequest>, tonic::Status> {
        self.0.decode(buf).map_err(|e| {
            tonic::Status::invalid_argument(format!("not a RateLimitRequest: {}", e.message()))
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// The one method, as tonic's server calls it.
struct ShouldRateLimit<B>(RateLimitServer<B>);

impl<B: Backend> UnaryService<WireRequest> for ShouldRateLimit<B> {
    type Response = RateLimitResponse;
    type Future = Pin<
        Box<dyn Future<Output = Result<tonic::Response<RateLimitResponse>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<WireRequest>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            let request = request.into_inner().into_request();
            Ok(tonic::Response::new(server.check(request).await))
        })
    }
}

/// `RateLimitRequest` with bytes for strings.
#[derive(Clone, PartialEq, prost::Message)]
struct WireRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<WireDescriptor>,
    #[prost(uint32, tag = "3")]
    hits_addend: u32,
}

/// `RateLimitDescriptor` with bytes for strings.
#[derive(Clone, PartialEq, prost::Message)]
struct WireDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<WireEntry>,
    #[prost(message, optional, tag = "2")]
    limit: Option<RateLimitOverride>,
    #[prost(message, optional, tag = "3")]
    hits_addend: Option<UInt64Value>,
    #[prost(bool, tag = "4")]
    is_negative_hits: bool,
}

/// A descriptor entry with bytes for strings.
#[derive(Clone, PartialEq, prost::Message)]
struct WireEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// Bytes as text: UTF-8 as it is, anything else with `U+FFFD` in place
/// of what is not (no copy when it is UTF-8).
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl WireRequest {
    fn into_request(self) -> RateLimitRequest {
        RateLimitRequest {
            domain: text(self.domain),
            descriptors: self
                .descriptors
                .into_iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .entries
                        .into_iter()
                        .map(|e| Entry {
                            key: text(e.key),
                            value: text(e.value),
                        })
                        .collect(),
                    limit: d.limit,
                    hits_addend: d.hits_addend,
                    is_negative_hits: d.is_negative_hits,
                })
                .collect(),
            hits_addend: self.hits_addend,
        }
    }
}
