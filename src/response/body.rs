use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::hold::{LeaseGuard, Leased, ended_if, release_at_end};

/// A body type the crate can build from bytes: the layer passes it through
/// **unchanged** and builds its own answers in it (a 429 problem document,
/// a 401, a gRPC trailers-only refusal); the client's `RetryLayer`
/// (feature `client`) rebuilds a request body in it for a retry
/// (`client::ReplayBody`).
///
/// The layer's response is `Response<B>` for the inner service's `B`: an
/// allowed response leaves the layer exactly as it came, so axum's
/// `Router::layer` and tonic's server take it without boxing it again (no
/// allocation per request). Implemented for axum's and tonic's body types
/// (with the `axum` and `tonic` features), `String`,
/// `http_body_util::Full<Bytes>`, `BoxBody` and `UnsyncBoxBody`.
///
/// Any other body type: wrap it in [`ResponseBody`], which implements this
/// trait for every body, under the rate-limit layer (`map_response` here;
/// tower-http's `MapResponseBodyLayer` does the same):
///
/// ```
/// use http::{Request, Response};
/// use http_body_util::Empty;
/// use bytes::Bytes;
/// use tierlimit::{Policy, RateLimitLayer, response::ResponseBody};
/// use tower::ServiceBuilder;
///
/// let policy = Policy::from_toml_str(r#"
///     categories = ["read", "write"]
///     [tiers.free]
///     read = "10/minute"
///     write = "1/minute"
/// "#)?;
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(policy))
///     .map_response(|res: Response<Empty<Bytes>>| res.map(ResponseBody::new))
///     .service_fn(|_req: Request<()>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
///     });
/// # let _ = svc;
/// # Ok::<(), tierlimit::PolicyError>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "tierlimit cannot build a `{Self}` body from bytes",
    note = "for axum's or tonic's body, enable tierlimit's `axum` or `tonic` feature; for any other response body, wrap it in `tierlimit::response::ResponseBody` under the layer (`res.map(ResponseBody::new)`)"
)]
pub trait AnswerBody: Body<Data = Bytes> + Sized {
    /// A body holding `bytes` (empty for gRPC answers and bare statuses).
    fn from_answer(bytes: Bytes) -> Self;

    /// This body, holding a request's concurrency leases (and, when the
    /// layer has a usage feed, its usage record) until it
    /// ends or is dropped: only requests under a concurrency limit, or
    /// every admitted request with a feed, get here; wrap with [`Leased`].
    /// The default gives the guard back at once, when the response head
    /// leaves the layer, as if the body had ended: right for bodies that
    /// are already complete (`String`, `Full`), early for a stream.
    fn hold(self, lease: LeaseGuard) -> Self {
        // The body is whole already (or treated so): it has ended.
        lease.on_end(false);
        drop(lease);
        self
    }
}

#[cfg(feature = "axum")]
impl AnswerBody for axum::body::Body {
    fn from_answer(bytes: Bytes) -> Self {
        axum::body::Body::from(bytes)
    }

    fn hold(self, lease: LeaseGuard) -> Self {
        axum::body::Body::new(Leased::new(self, lease))
    }
}

#[cfg(feature = "tonic")]
impl AnswerBody for tonic::body::Body {
    fn from_answer(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            tonic::body::Body::empty()
        } else {
            tonic::body::Body::new(http_body_util::Full::new(bytes))
        }
    }

    fn hold(self, lease: LeaseGuard) -> Self {
        tonic::body::Body::new(Leased::new(self, lease))
    }
}

impl AnswerBody for String {
    fn from_answer(bytes: Bytes) -> Self {
        // The layer's answers are JSON or empty: always UTF-8.
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl AnswerBody for http_body_util::Full<Bytes> {
    fn from_answer(bytes: Bytes) -> Self {
        http_body_util::Full::new(bytes)
    }
}

impl<E: 'static> AnswerBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn from_answer(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn hold(self, lease: LeaseGuard) -> Self {
        use http_body_util::BodyExt;
        Leased::new(self, lease).boxed_unsync()
    }
}

impl<E: 'static> AnswerBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn from_answer(bytes: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed()
    }

    fn hold(self, lease: LeaseGuard) -> Self {
        use http_body_util::BodyExt;
        Leased::new(self, lease).boxed()
    }
}

impl<B: Body<Data = Bytes>> AnswerBody for ResponseBody<B> {
    fn from_answer(bytes: Bytes) -> Self {
        ResponseBody::full(bytes)
    }

    fn hold(mut self, lease: LeaseGuard) -> Self {
        self.lease = Some(lease);
        self
    }
}

pin_project! {
    /// A body of any type, or a small body the layer wrote itself (a 429,
    /// a 401): the adapter that lets the layer answer in front of an inner
    /// service whose body type is not an [`AnswerBody`].
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        // A request's concurrency leases, until the body ends.
        lease: Option<LeaseGuard>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            lease: None,
        }
    }

    /// Wraps the inner service's body.
    pub fn new(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
            lease: None,
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        release_at_end(&polled, this.lease);
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        };
        ended_if(end, &self.lease);
        end
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
