//! One request under one limit, as the layer checks it: a [`Check`] of one
//! charge. Tests and benches of single limits read better with a subject
//! and a limit than with a charge slice.

#![allow(dead_code, unreachable_pub)]

use tierlimit::Limit;
use tierlimit::backend::{Backend, BackendError, Decision, MemoryBackend, Subject};
use tierlimit::governor::clock::Clock;

/// `check_one` and `peek_one` on every backend.
pub trait CheckOne: Backend {
    /// Checks `s` under `limit` alone (a check of one charge, owned by its
    /// key).
    fn check_one(&self, s: &Subject, limit: &Limit) -> Self::Future {
        let charge = s.charge(*limit);
        self.check(&s.check(&charge))
    }

    /// Peeks at `s`'s bucket under `limit`.
    fn peek_one(&self, s: &Subject, limit: &Limit) -> Self::Future {
        self.peek(s.key.as_u64(), &s.charge(*limit))
    }
}

impl<B: Backend> CheckOne for B {}

/// The same, synchronously, on the memory backend.
pub trait CheckOneNow {
    fn check_one_now(&self, s: &Subject, limit: &Limit) -> Result<Decision, BackendError>;
    fn peek_one_now(&self, s: &Subject, limit: &Limit) -> Decision;
}

impl<C> CheckOneNow for MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn check_one_now(&self, s: &Subject, limit: &Limit) -> Result<Decision, BackendError> {
        let charge = s.charge(*limit);
        self.check_now(&s.check(&charge))
    }

    fn peek_one_now(&self, s: &Subject, limit: &Limit) -> Decision {
        self.peek_now(s.key.as_u64(), &s.charge(*limit))
    }
}
