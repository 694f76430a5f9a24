//! Shedding (the policy's `[overload]` table): a request's place in the
//! capacity of the service behind the layer, or the 503 / gRPC
//! UNAVAILABLE that sheds it, decided after the caller is identified and
//! before anything is charged.

use std::sync::Arc;

use http::Request;

use super::priority::critical;
use super::{Found, Shared, Step};
use crate::backend::Backend;
use crate::extract::{Extractor, is_grpc};
use crate::overload::Slot;
use crate::policy::{Applied, OverloadRules, SHED_FULL};
use crate::response::Answer;

impl<E: Extractor, B: Backend> Shared<E, B> {
    /// An exempt route under an `[overload]` table: shed only at the full
    /// capacity (it has no tier).
    #[cold]
    pub(super) fn exempt<T>(
        &self,
        rules: &Arc<OverloadRules>,
        req: &Request<T>,
        slot: &mut Option<Slot>,
    ) -> Step<B::Future> {
        match self.overload.enter(rules, SHED_FULL) {
            Some(s) => {
                *slot = Some(s);
                Step::Call
            }
            None => {
                crate::telemetry::shed_exempt();
                let shed = Answer::Shed {
                    retry_after: rules.retry_after(),
                    tier: None,
                    category: "",
                    cell: None,
                };
                Step::Answer(Box::new(shed.into_response(is_grpc(req.headers()))))
            }
        }
    }

    /// A place in the capacity for a request of `f`'s tier, at its tier's
    /// fraction, or at the full capacity if it is critical; else the 503
    /// (gRPC UNAVAILABLE) that sheds it. The priority header is read only
    /// when the tier's fraction is taken.
    #[cold]
    #[inline(never)]
    pub(super) fn shed<T>(
        &self,
        f: &Found<'_, T>,
        rules: &Arc<OverloadRules>,
        adjusted: Option<&Applied>,
    ) -> Result<Slot, Step<B::Future>> {
        let shed_at = rules.shed_at(f.tier);
        if let Some(slot) = self.overload.enter(rules, shed_at) {
            return Ok(slot);
        }
        if shed_at < SHED_FULL {
            match critical(f.req.headers(), f.identity.priority()) {
                Ok(true) => {
                    if let Some(slot) = self.overload.enter(rules, SHED_FULL) {
                        return Ok(slot);
                    }
                }
                Ok(false) => {}
                Err(r) => return Err(f.answer(Answer::Rejected(r))),
            }
        }
        let policy = &f.guard.policy;
        let (tier, category) = (policy.tier_name(f.tier), policy.category_name(f.category));
        #[cfg(feature = "metrics")]
        f.cell_view.metrics(tier, category).shed.increment(1);
        // The caller's own quota: its custom limits or boosts, if any apply
        // (as its allowed answers say), else its cell's.
        let quota = match adjusted {
            None => f.cell_view.headers.clone(),
            Some(a) => crate::view::quota_headers(
                tier,
                category,
                [
                    a.per_key.as_slice(),
                    a.per_account.as_slice(),
                    a.per_org.as_slice(),
                ],
            ),
        };
        Err(f.answer(Answer::Shed {
            retry_after: rules.retry_after(),
            tier: Some(tier),
            category,
            cell: Some((quota, self.headers)),
        }))
    }
}
