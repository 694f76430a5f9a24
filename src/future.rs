//! The response future of [`RateLimit`](crate::layer::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::admission::{Admitted, Resolved, Waiting};
use crate::backend::{BackendError, Decision};
use crate::overload::Slot;
use crate::response::AnswerBody;

pin_project! {
    /// The response future of [`RateLimit`](crate::layer::RateLimit): the inner
    /// service's future (then headers), a ready refusal, or a backend check
    /// still under way.
    pub struct ResponseFuture<F, S, Req, BF> {
        #[pin]
        state: State<F, S, Req, BF>,
        admitted: Option<Admitted>,
        // A place in the overload capacity, held until the inner service
        // answers (or the future is dropped).
        slot: Option<Slot>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req, BF> {
        Inner { #[pin] fut: F },
        // Refusals and deferred checks are boxed: they are rare, and the
        // future every allowed request moves around stays small.
        Ready { res: Option<Box<Response<Bytes>>> },
        Checking { checking: Option<Box<Checking<S, Req, BF>>> },
    }
}

/// A backend check under way, with the ready inner service and the request.
struct Checking<S, Req, BF> {
    waiting: Box<Waiting<BF>>,
    inner: S,
    req: Req,
}

impl<F, S, Req, BF> fmt::Debug for ResponseFuture<F, S, Req, BF> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, S, Req, BF> ResponseFuture<F, S, Req, BF> {
    pub(crate) fn inner(fut: F, admitted: Option<Admitted>, slot: Option<Slot>) -> Self {
        ResponseFuture {
            state: State::Inner { fut },
            admitted,
            slot: slot.map(Slot::calling),
        }
    }

    pub(crate) fn ready(res: Box<Response<Bytes>>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
            admitted: None,
            slot: None,
        }
    }

    pub(crate) fn checking(
        waiting: Box<Waiting<BF>>,
        inner: S,
        req: Req,
        slot: Option<Slot>,
    ) -> Self {
        ResponseFuture {
            state: State::Checking {
                checking: Some(Box::new(Checking {
                    waiting,
                    inner,
                    req,
                })),
            },
            admitted: None,
            slot,
        }
    }
}

impl<F, S, ReqBody, BF, ResBody, E> Future for ResponseFuture<F, S, Request<ReqBody>, BF>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = E, Future = F>,
    BF: Future<Output = Result<Decision, BackendError>> + Unpin,
    ResBody: AnswerBody,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { fut } => {
                    if this.slot.is_none() && this.admitted.is_none() {
                        // Nothing to do once it answers (a request passed
                        // with no header to write): its poll is this one,
                        // and its response is never moved here.
                        return fut.poll(cx);
                    }
                    // The inner response leaves as it came (no re-boxing),
                    // written in place: a response is moved once, out.
                    let mut out = ready!(fut.poll(cx));
                    if let Some(slot) = this.slot.take() {
                        // The inner service answered: its latency is a
                        // sample, its place in the capacity free.
                        slot.finish();
                    }
                    // An error leaves as it came; what was admitted stays
                    // held until the future is dropped.
                    let Ok(res) = &mut out else {
                        return Poll::Ready(out);
                    };
                    let Some(admitted) = this.admitted.take() else {
                        return Poll::Ready(out);
                    };
                    admitted.plan.write(res.headers_mut());
                    if let Some(meter) = admitted.meter {
                        // The layer's hold ends here: the handler's and
                        // the body's clones settle when they drop.
                        meter.on_response(res.status(), res.extensions());
                    }
                    if let Some(mut lease) = admitted.lease {
                        // Held until the body ends or is dropped (with a
                        // usage feed: the request's usage record).
                        lease.on_response(res.status());
                        return Poll::Ready(out.map(|res| res.map(|body| body.hold(lease))));
                    }
                    return Poll::Ready(out);
                }
                StateProj::Ready { res } => {
                    let res = res.take().expect("ResponseFuture polled after completion");
                    this.slot.take();
                    return Poll::Ready(Ok(res.map(ResBody::from_answer)));
                }
                StateProj::Checking { .. } => {
                    // Out of line: a deferred check's frame (the request,
                    // the inner call) stays off the common path's stack.
                    ready!(poll_checking(
                        this.state.as_mut(),
                        this.admitted,
                        this.slot,
                        cx
                    ));
                }
            }
        }
    }
}

/// Polls a deferred check; once it is resolved, sets the state that
/// follows (the inner call, or the refusal) for the caller's next turn.
#[inline(never)]
fn poll_checking<F, S, ReqBody, BF, ResBody, E>(
    mut state: Pin<&mut State<F, S, Request<ReqBody>, BF>>,
    admitted: &mut Option<Admitted>,
    slot: &mut Option<Slot>,
    cx: &mut Context<'_>,
) -> Poll<()>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Error = E, Future = F>,
    BF: Future<Output = Result<Decision, BackendError>> + Unpin,
{
    let StateProj::Checking { checking } = state.as_mut().project() else {
        return Poll::Ready(()); // the caller's state is another one
    };
    let c = checking
        .as_mut()
        .expect("ResponseFuture polled after completion");
    let result = ready!(Pin::new(&mut c.waiting.check).poll(cx));
    let Checking {
        mut inner,
        req,
        waiting,
    } = *checking.take().expect("checked above");
    // The finished check is dropped here, before the outcome.
    let Waiting { check, deferred } = *waiting;
    drop(check);
    let resolved = deferred.resolve(result);
    if let (Some(slot), Resolved::Pass | Resolved::Allow(_)) = (slot.as_mut(), &resolved) {
        // The inner call starts: its latency, not the check's, is what
        // the adaptive capacity follows.
        slot.restart();
    }
    match resolved {
        Resolved::Pass => {
            let fut = inner.call(req);
            state.set(State::Inner { fut });
        }
        Resolved::Allow(a) => {
            let mut req = req;
            if let Some(meter) = &a.meter {
                req.extensions_mut().insert(meter.clone());
            }
            *admitted = Some(a);
            let fut = inner.call(req);
            state.set(State::Inner { fut });
        }
        Resolved::Answer(res) => {
            // Refused: its place in the capacity goes back.
            slot.take();
            state.set(State::Ready {
                res: Some(Box::new(res)),
            })
        }
    }
    Poll::Ready(())
}
