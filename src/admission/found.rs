//! A request classified and identified, its cell found ([`Found`]), and
//! what is read off it before the check: its cost, its token estimate and
//! its priority reserve, each a ready answer when the request cannot go on.
//! [`answered`] builds every answer of the path's own (rejections before a
//! request is found, costs no limit admits, sheds), out of line.

use std::hint::cold_path;
use std::sync::Arc;

use http::Request;

use super::Step;
use super::outcome::Resolving;
use super::priority::critical;
use crate::extract::{Identity, Rejection, is_grpc};
use crate::policy::{CategoryId, Cell, Limit, Limits, TierId};
use crate::response::Answer;
use crate::view::{CellView, PolicyView};

/// A request classified and identified, its cell found: what both
/// admission paths read.
pub(super) struct Found<'a, T> {
    pub(super) guard: &'a Arc<PolicyView>,
    pub(super) req: &'a Request<T>,
    pub(super) cell: &'a Cell,
    pub(super) cell_view: &'a CellView,
    pub(super) identity: Identity,
    pub(super) tier: TierId,
    pub(super) category: CategoryId,
    pub(super) route_cost: u32,
}

/// The request path's own answer to a request (a rejection, a cost no
/// limit admits): rare, so out of line, off the code every admitted
/// request runs through.
#[cold]
#[inline(never)]
pub(super) fn answered<F>(a: Answer<'_>, headers: &http::HeaderMap) -> Step<F> {
    Step::Answer(Box::new(a.into_response(is_grpc(headers))))
}

impl<T> Found<'_, T> {
    pub(super) fn answer<F>(&self, a: Answer<'_>) -> Step<F> {
        answered(a, self.req.headers())
    }

    /// The answer to `n` units above `max`, a burst of this request's.
    #[cold]
    #[inline(never)]
    fn too_high<F>(&self, n: u32, max: u32, unit: &'static str) -> Step<F> {
        let policy = &self.guard.policy;
        self.answer(Answer::CostTooHigh {
            cost: n,
            max,
            tier: policy.tier_name(self.tier),
            category: policy.category_name(self.category),
            unit,
        })
    }

    /// The request's cost: the route's cost is a floor, an extractor's
    /// count multiplies it; 0 is a rejection, and a cost above any of
    /// `limits`' bursts could never succeed.
    #[inline(always)]
    pub(super) fn cost<F>(&self, limits: [&[Limit]; 3]) -> Result<u32, Step<F>> {
        let route = self.route_cost;
        let cost = self
            .identity
            .cost()
            .map_or(route, |n| route.saturating_mul(n));
        if cost == 0 {
            cold_path();
            return Err(self.answer(Answer::Rejected(Rejection::InvalidCost(
                "a cost must be at least 1",
            ))));
        }
        self.fits(cost, limits, "requests")
    }

    /// `n` units, if every one of `lists`' limits could ever admit them:
    /// else the 400 that says which burst it exceeds. (One slice at a time:
    /// a chain of iterators is a call per request here.)
    #[inline(always)]
    fn fits<F, const N: usize>(
        &self,
        n: u32,
        lists: [&[Limit]; N],
        unit: &'static str,
    ) -> Result<u32, Step<F>> {
        for list in lists {
            if let Some(l) = list.iter().find(|l| n > l.max()) {
                return Err(self.too_high(n, l.max(), unit));
            }
        }
        Ok(n)
    }

    /// The request's token estimate (1 unless the extractor set one),
    /// which must fit the burst of every limit that reserves it: of all
    /// tokens and of input tokens (output limits reserve 1).
    pub(super) fn estimate<F>(&self, applied: Limits<'_>) -> Result<u32, Step<F>> {
        let estimate = self.identity.tokens().unwrap_or(1).max(1);
        let lists = [applied.tokens, applied.account_tokens];
        let estimate = self.fits(estimate, lists, "tokens")?;
        let io = applied.io.unwrap_or_default();
        self.fits(estimate, [io.input, io.account_input], "input tokens")
    }

    /// The tier's priority reserve, in percent, if this request must leave
    /// it (`None`: no reserve, or a critical request). Only tiers with a
    /// reserve read `X-Request-Priority`.
    #[inline(always)]
    pub(super) fn reserve_pct<F>(&self) -> Result<Option<u8>, Step<F>> {
        let pct = self.cell.reserve;
        if pct == 0 {
            return Ok(None);
        }
        cold_path();
        match critical(self.req.headers(), self.identity.priority()) {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(pct)),
            Err(r) => Err(self.answer(Answer::Rejected(r))),
        }
    }

    /// What resolving the check needs, made just before the backend is asked.
    #[inline]
    pub(super) fn resolving(&self) -> Resolving<'_> {
        Resolving::start(
            self.cell_view,
            self.tier,
            self.category,
            self.identity.key(),
        )
    }
}
