//! Concurrency leases: what an admitted request under a concurrency limit
//! holds until its response is over.
//!
//! The backend takes the leases at admission, in the same step as the
//! rate limits ([`Check::leases`](crate::backend::Check::leases)). The
//! layer keeps them in a [`LeaseGuard`]: first in its response future,
//! then in the response body ([`AnswerBody::hold`](crate::AnswerBody::hold)).
//! The guard releases them exactly once, from its `Drop`: when the body
//! ends, fails or is dropped (a client that disconnects, a server timeout),
//! or when the future is dropped before a response (a panic in the handler
//! unwinds through it; a timeout drops it).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::backend::{Lease, MAX_LEASES};
use crate::meter::Settler;

/// Numbers checks with leases (unique in the process).
static NEXT_LEASE: AtomicU64 = AtomicU64::new(1);

/// A fresh lease id.
pub(crate) fn next_id() -> u64 {
    NEXT_LEASE.fetch_add(1, Ordering::Relaxed)
}

/// A request's concurrency leases, released when this is dropped.
///
/// The layer makes one for every admitted request under a concurrency
/// limit and moves it into the response body through
/// [`AnswerBody::hold`](crate::AnswerBody::hold), so the leases are held
/// until the body ends or is dropped. It cannot be made outside the crate.
pub struct LeaseGuard {
    inner: Box<Inner>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// The check is under way: dropped now, the backend releases whatever
    /// the check takes.
    Pending,
    /// Held by an admitted request.
    Held,
    /// Nothing to release (the request was refused).
    Done,
}

struct Inner {
    owner: u64,
    leases: [Lease; MAX_LEASES],
    len: u8,
    id: u64,
    state: State,
    sink: Arc<dyn Settler>,
    #[cfg(feature = "metrics")]
    gauge: Option<metrics::Gauge>,
}

impl fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("leases", &self.inner.len)
            .field("held", &(self.inner.state == State::Held))
            .finish_non_exhaustive()
    }
}

impl LeaseGuard {
    /// The guard of a check about to be made.
    pub(crate) fn pending(owner: u64, leases: &[Lease], id: u64, sink: Arc<dyn Settler>) -> Self {
        let mut items = [Lease {
            bucket: 0,
            max: 1,
            per_account: false,
        }; MAX_LEASES];
        let len = leases.len().min(MAX_LEASES);
        items[..len].copy_from_slice(&leases[..len]);
        LeaseGuard {
            inner: Box::new(Inner {
                owner,
                leases: items,
                len: len as u8,
                id,
                state: State::Pending,
                sink,
                #[cfg(feature = "metrics")]
                gauge: None,
            }),
        }
    }

    /// The request was admitted: it holds its leases until this drops.
    pub(crate) fn held(
        mut self,
        #[cfg(feature = "metrics")] gauge: Option<metrics::Gauge>,
    ) -> Self {
        self.inner.state = State::Held;
        #[cfg(feature = "metrics")]
        {
            if let Some(g) = &gauge {
                g.increment(1.0);
            }
            self.inner.gauge = gauge;
        }
        self
    }

    /// The request was refused: it took nothing.
    pub(crate) fn refused(mut self) {
        self.inner.state = State::Done;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.state == State::Done {
            return;
        }
        #[cfg(feature = "metrics")]
        if self.state == State::Held
            && let Some(g) = &self.gauge
        {
            g.decrement(1.0);
        }
        self.state = State::Done;
        let len = usize::from(self.len).min(MAX_LEASES);
        self.sink.release(self.owner, &self.leases[..len], self.id);
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
/// not when the body is dropped.
#[inline]
pub(crate) fn release_at_end<T, E>(
    polled: &Poll<Option<Result<T, E>>>,
    lease: &mut Option<LeaseGuard>,
) {
    if let Poll::Ready(None | Some(Err(_))) = polled {
        lease.take();
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
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
