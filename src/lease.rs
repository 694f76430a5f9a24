//! Concurrency leases: what an admitted request under a concurrency limit
//! holds until its response is over.
//!
//! The backend takes the leases at admission, in the same step as the
//! rate limits ([`Check::leases`](crate::backend::Check::leases)). The
//! layer keeps them in [`Leases`] while the check is under way, then, once
//! the request is admitted, in a [`LeaseGuard`] (the response layer's
//! opaque hold): first in its response future, then in the response body
//! ([`AnswerBody::hold`](crate::response::AnswerBody::hold)). They are released
//! exactly once, from `Drop`: when the body ends, fails or is dropped (a
//! client that disconnects, a server timeout), or when the future is
//! dropped before a response (a panic in the handler unwinds through it; a
//! timeout drops it).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::{Lease, MAX_LEASES};
use crate::meter::ErasedBackend;
use crate::response::{Hold, LeaseGuard};

/// Numbers checks with leases (unique in the process).
static NEXT_LEASE: AtomicU64 = AtomicU64::new(1);

/// A fresh lease id.
pub(crate) fn next_id() -> u64 {
    NEXT_LEASE.fetch_add(1, Ordering::Relaxed)
}

/// A request's concurrency leases from its check until its answer: dropped
/// while pending, the backend releases whatever the check takes; admitted,
/// they become the request's [`LeaseGuard`]; refused, nothing to release.
pub(crate) struct Leases {
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
    sink: Arc<dyn ErasedBackend>,
    #[cfg(feature = "metrics")]
    gauge: Option<metrics::Gauge>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("leases", &self.len)
            .field("held", &(self.state == State::Held))
            .finish_non_exhaustive()
    }
}

impl Hold for Inner {}

impl Leases {
    /// The leases of a check about to be made.
    pub(crate) fn pending(
        owner: u64,
        leases: &[Lease],
        id: u64,
        sink: Arc<dyn ErasedBackend>,
    ) -> Self {
        let mut items = [Lease {
            bucket: 0,
            max: 1,
            per_account: false,
        }; MAX_LEASES];
        let len = leases.len().min(MAX_LEASES);
        items[..len].copy_from_slice(&leases[..len]);
        Leases {
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

    /// The request was admitted: it holds its leases until the guard drops.
    pub(crate) fn held(
        mut self,
        #[cfg(feature = "metrics")] gauge: Option<metrics::Gauge>,
    ) -> LeaseGuard {
        self.inner.state = State::Held;
        #[cfg(feature = "metrics")]
        {
            if let Some(g) = &gauge {
                g.increment(1.0);
            }
            self.inner.gauge = gauge;
        }
        // The same box, unsized: no allocation.
        LeaseGuard::new(self.inner)
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
