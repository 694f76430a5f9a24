//! What a response body holds until it ends: a request's concurrency
//! leases and its usage record, opaque here ([`Hold`]: released by its
//! own `Drop`), so the response layer knows nothing of backends, leases
//! or the usage feed.
//!
//! The layer makes a [`LeaseGuard`] for every admitted request under a
//! concurrency limit (`crate::lease` makes and releases what it holds) and
//! moves it into the response body through
//! [`AnswerBody::hold`](super::AnswerBody::hold): [`Leased`] or
//! [`ResponseBody`](super::ResponseBody) drop it at the body's last frame,
//! at its error, or when the body is dropped.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Something a response body holds until it ends, released by its own
/// `Drop` (implemented by the lease module's held leases and the usage
/// feed's record). It is told the response's status when the head passes
/// and whether the body ended (its last frame, or an error) before it is
/// dropped.
pub(crate) trait Hold: fmt::Debug + Send + Sync + 'static {
    /// The response head passed with `status`.
    fn on_response(&mut self, _status: http::StatusCode) {}

    /// The body ended: its last frame, or (`error`) an error, or it says
    /// it has no more (`is_end_stream`, which a server may ask instead of
    /// polling a complete body).
    fn on_end(&self, _error: bool) {}
}

/// A request's concurrency leases, released when this is dropped (and,
/// when the layer has a usage feed, its usage record, whose
/// one event leaves then).
///
/// The layer makes one for every admitted request under a concurrency
/// limit (with a usage feed: every admitted request) and moves it into the
/// response body through
/// [`AnswerBody::hold`](crate::response::AnswerBody::hold), so the leases are held
/// until the body ends or is dropped. It cannot be made outside the crate.
pub struct LeaseGuard {
    // The lease module's box, unsized: no allocation of its own.
    inner: Box<dyn Hold>,
}

impl LeaseGuard {
    /// A guard holding `inner` until it is dropped.
    pub(crate) fn new(inner: Box<dyn Hold>) -> Self {
        LeaseGuard { inner }
    }

    /// The response head passed with `status` (the usage feed's status).
    #[inline]
    pub(crate) fn on_response(&mut self, status: http::StatusCode) {
        self.inner.on_response(status);
    }

    /// The body ended (`error`: with an error).
    #[inline]
    pub(crate) fn on_end(&self, error: bool) {
        self.inner.on_end(error);
    }
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

pin_project! {
    /// A response body that holds its request's [`LeaseGuard`] until it
    /// ends (its last frame, or an error) or is dropped.
    #[derive(Debug)]
    pub struct Leased<B> {
        #[pin]
        body: B,
        lease: Option<LeaseGuard>,
    }
}

impl<B> Leased<B> {
    /// `body`, holding `lease`.
    pub fn new(body: B, lease: LeaseGuard) -> Self {
        Leased {
            body,
            lease: Some(lease),
        }
    }
}

/// A body's last frame (or its error) was polled: its lease goes back now,
/// not when the body is dropped. A trailers frame is the last one too
/// (HTTP/2 sends it and asks for no more): the guard is told the body
/// ended, and goes when the body is dropped.
#[inline]
pub(crate) fn release_at_end<D, E>(
    polled: &Poll<Option<Result<Frame<D>, E>>>,
    lease: &mut Option<LeaseGuard>,
) {
    match polled {
        Poll::Ready(end @ (None | Some(Err(_)))) => {
            if let Some(l) = lease.take() {
                l.on_end(end.is_some());
            }
        }
        Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => ended_if(true, lease),
        _ => {}
    }
}

/// A body that says it has no more frames has ended, whether or not it
/// is polled again (a server may drop a complete body unpolled).
#[inline]
pub(crate) fn ended_if(end: bool, lease: &Option<LeaseGuard>) {
    if end && let Some(l) = lease {
        l.on_end(false);
    }
}

impl<B: Body<Data = Bytes>> Body for Leased<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        release_at_end(&polled, this.lease);
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        ended_if(end, &self.lease);
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
