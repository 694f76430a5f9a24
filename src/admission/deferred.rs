//! A check under way: everything needed to resolve it, owned, so the
//! response future resolves a backend's late answer by the same code as
//! the ready path ([`Outcome`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::outcome::{Carried, Outcome, Resolved};
use crate::backend::{BackendError, Decision};
use crate::extract::Rejection;
use crate::response::{Answer, HeaderOptions};
use crate::time::UnixClock;
use crate::view::PolicyView;

/// A backend's check under way and what resolving its answer needs, in
/// one box.
pub(crate) struct Waiting<BF> {
    /// The backend's check.
    pub(crate) check: BF,
    pub(crate) deferred: Deferred,
}

/// A check under way: everything needed to resolve it, owned.
pub(crate) struct Deferred {
    pub(super) view: Arc<PolicyView>,
    pub(super) carried: Carried,
    pub(super) grpc: bool,
    pub(super) shadowed: Arc<AtomicU64>,
    pub(super) options: HeaderOptions,
    pub(super) unix_clock: Option<UnixClock>,
    #[cfg(feature = "metrics")]
    pub(super) started: std::time::Instant,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("tier", &self.carried.tier)
            .field("category", &self.carried.category)
            .field("key", &self.carried.key.redacted())
            .finish_non_exhaustive()
    }
}

impl Deferred {
    /// Turns the backend's answer into the outcome (as the ready path does).
    pub(crate) fn resolve(mut self, result: Result<Decision, BackendError>) -> Resolved {
        #[cfg(feature = "metrics")]
        crate::telemetry::check_duration(self.started.elapsed());
        let Some(cell) = self.view.cell(self.carried.tier, self.carried.category) else {
            // Not reachable with ids admit() took from this same view; an
            // unknown key is the safe answer all the same.
            let answer = Answer::Rejected(Rejection::UnknownKey);
            return Resolved::Answer(answer.into_response(self.grpc));
        };
        let mut outcome = Outcome {
            policy: &self.view.policy,
            cell,
            carried: &mut self.carried,
            shadowed: &self.shadowed,
            options: self.options,
            unix_clock: self.unix_clock.as_ref(),
        };
        outcome.resolve(result, || self.grpc)
    }
}
