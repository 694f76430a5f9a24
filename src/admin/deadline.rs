//! [`Deadline`]: a future ready at an instant, for the admin service's
//! body timeout.
//!
//! The crate's default build has no async timer of its own (tokio is
//! optional, behind `redis` and `client`), and the admin service is a
//! plain tower service that may run on any executor. So one thread,
//! started the first time a deadline is waited on, sleeps until the
//! earliest deadline and wakes the tasks whose deadlines have passed. It
//! serves only admin requests that are reading a body: a handful at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Ready once its instant has passed (never, for a deadline too far off to
/// name).
pub(super) struct Deadline {
    at: Option<Instant>,
    /// The waker the timer thread holds (weakly): set on the first poll
    /// that is not ready, dropped with the deadline.
    waiting: Option<Arc<Waiting>>,
}

struct Waiting {
    waker: Mutex<Waker>,
}

impl Deadline {
    /// The deadline `timeout` from now.
    pub(super) fn after(timeout: Duration) -> Self {
        Deadline {
            at: Instant::now().checked_add(timeout),
            waiting: None,
        }
    }

    /// `fut`'s output, or `None` if the deadline passes first.
    pub(super) async fn bound<F: Future>(mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            Pin::new(&mut self).poll(cx).map(|()| None)
        })
        .await
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.at else {
            return Poll::Pending;
        };
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        match &self.waiting {
            Some(w) => {
                let mut waker = w.waker.lock().unwrap_or_else(PoisonError::into_inner);
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                let w = Arc::new(Waiting {
                    waker: Mutex::new(cx.waker().clone()),
                });
                timer().add(at, Arc::downgrade(&w));
                self.waiting = Some(w);
            }
        }
        Poll::Pending
    }
}

/// The deadlines waited on, and the thread that wakes them.
struct Timer {
    queue: Mutex<Vec<(Instant, Weak<Waiting>)>>,
    changed: Condvar,
}

impl Timer {
    fn add(&self, at: Instant, waiting: Weak<Waiting>) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((at, waiting));
        self.changed.notify_one();
    }

    /// The thread: wakes every task whose deadline has passed, forgets
    /// deadlines no longer waited on, sleeps until the next.
    fn run(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            queue.retain(|(at, waiting)| {
                let Some(w) = waiting.upgrade() else {
                    return false;
                };
                if *at > now {
                    return true;
                }
                w.waker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .wake_by_ref();
                false
            });
            queue = match queue.iter().map(|(at, _)| *at).min() {
                Some(next) => {
                    let wait = next.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// The timer, its thread started on first use.
fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            queue: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }));
        let started = std::thread::Builder::new()
            .name("tierlimit-admin-timer".into())
            .spawn(move || timer.run());
        if let Err(e) = started {
            // Deadlines then never pass: bodies are read without a limit
            // in time (still of bounded size).
            tracing::warn!(error = %e, "admin body timer not started; bodies are read without a deadline");
        }
        timer
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_wakes_its_task_and_a_later_one_waits() {
        // Polled by hand: the first is woken by the timer thread, the
        // second (an hour off) is still pending when the first is ready.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        struct Notify(Mutex<std::sync::mpsc::Sender<()>>);
        impl std::task::Wake for Notify {
            fn wake(self: Arc<Self>) {
                let _ = self.0.lock().unwrap().send(());
            }
        }
        let waker = Waker::from(Arc::new(Notify(Mutex::new(tx))));
        let mut cx = Context::from_waker(&waker);
        let mut soon = Deadline::after(Duration::from_millis(1));
        let mut later = Deadline::after(Duration::from_secs(3600));
        assert!(Pin::new(&mut later).poll(&mut cx).is_pending());
        if Pin::new(&mut soon).poll(&mut cx).is_pending() {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("the timer thread wakes the task");
        }
        assert!(Pin::new(&mut soon).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut later).poll(&mut cx).is_pending());
    }
}
