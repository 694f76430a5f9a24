//! [`RateLimit`], the middleware service: the request path of
//! [`admission`](crate::admission) between a request and the inner service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::admission::{Shared, Step};
use crate::backend::{Backend, MemoryBackend};
use crate::extract::{ApiKey, Extractor};
use crate::future::ResponseFuture;
use crate::response::AnswerBody;

/// The rate-limiting service made by [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Cheap to clone (an `Arc` and the inner service). The check happens in
/// `call`, never in `poll_ready`, so every clone enforces the same limits.
pub struct RateLimit<S, E = ApiKey, B = MemoryBackend> {
    inner: S,
    shared: Arc<Shared<E, B>>,
}

impl<S: Clone, E, B> Clone for RateLimit<S, E, B> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, E, B> fmt::Debug for RateLimit<S, E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, E, B> RateLimit<S, E, B> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<E, B>>) -> Self {
        RateLimit { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, E, B, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, E, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    E: Extractor,
    B: Backend,
    ResBody: AnswerBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S, Request<ReqBody>, B::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let mut slot = None;
        let mut admitted = None;
        match self.shared.admit(&req, &mut slot, &mut admitted) {
            // Nothing to write or hold: the future is made with none.
            Step::Call if admitted.is_none() => {
                ResponseFuture::inner(self.inner.call(req), None, slot)
            }
            Step::Call => {
                let mut req = req;
                if let Some(meter) = admitted.as_ref().and_then(|a| a.meter.as_ref()) {
                    req.extensions_mut().insert(meter.clone());
                }
                ResponseFuture::inner(self.inner.call(req), admitted, slot)
            }
            // A refusal gives its place in the capacity back at once.
            Step::Answer(res) => ResponseFuture::ready(res),
            Step::Wait(waiting) => self.wait(waiting, req, slot),
        }
    }
}

impl<S, E, B> RateLimit<S, E, B> {
    /// A check that needs a round trip (out of line: its frame, the
    /// request moved into the future, stays off the common path's stack).
    #[inline(never)]
    fn wait<Req, BF>(
        &mut self,
        waiting: Box<crate::admission::Waiting<BF>>,
        req: Req,
        slot: Option<crate::overload::Slot>,
    ) -> ResponseFuture<S::Future, S, Req, BF>
    where
        S: Service<Req> + Clone,
    {
        // The ready inner service goes with the request; this one keeps a
        // fresh clone (tower's rule for deferred calls).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(waiting, inner, req, slot)
    }
}
