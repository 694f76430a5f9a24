//! The request as extractors see it: a borrowed view of its head, and what
//! else the layer reads from it before any limit (its protocol).

use std::net::SocketAddr;

use http::{Extensions, HeaderMap, Method, Uri};

/// A borrowed view of a request's head, handed to extractors.
#[derive(Clone, Copy, Debug)]
pub struct RequestRef<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers (gRPC metadata are headers too).
    pub headers: &'a HeaderMap,
    /// The extensions (peer address, identities from earlier layers).
    pub extensions: &'a Extensions,
}

impl<'a> RequestRef<'a> {
    /// A view of `req`'s head.
    pub fn new<B>(req: &'a http::Request<B>) -> Self {
        RequestRef {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// The connection's peer address, from axum's `ConnectInfo` or tonic's
    /// `TcpConnectInfo`, or a bare [`SocketAddr`] extension.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "axum")]
        if let Some(ci) = self
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
        {
            return Some(ci.0);
        }
        #[cfg(feature = "tonic")]
        if let Some(ci) = self
            .extensions
            .get::<tonic::transport::server::TcpConnectInfo>()
        {
            return ci.remote_addr();
        }
        self.extensions.get::<SocketAddr>().copied()
    }
}

/// Whether a request speaks gRPC (`content-type: application/grpc*`): its
/// answers are then gRPC trailers-only responses.
#[inline]
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
