//! The layer's compiled view of a policy: what the request path needs per
//! tier × category *cell* besides the policy itself — header values written
//! once, metric handles made on first use — swapped together with the
//! policy, so the policy itself knows nothing of headers or metrics.

use std::sync::Arc;

use crate::policy::{CategoryId, Policy, Rule, TierId};
use crate::response::{CellHeaders, CellRef};

/// A policy and its cells' precomputed parts, in force as one.
#[derive(Debug)]
pub(crate) struct PolicyView {
    pub(crate) policy: Arc<Policy>,
    /// Tier-major, like the policy's own cells.
    cells: Box<[CellView]>,
}

/// One cell's precomputed parts.
#[derive(Debug)]
pub(crate) struct CellView {
    pub(crate) headers: CellRef,
    #[cfg(feature = "metrics")]
    metrics: std::sync::OnceLock<crate::telemetry::CellMetrics>,
}

impl PolicyView {
    /// Compiles the view of `policy` (once per policy, never per request).
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        let mut cells = Vec::with_capacity(policy.tiers().len() * policy.categories().len());
        for tier in policy.tiers() {
            for category in policy.categories() {
                let (max, window) = match policy.rule(tier, category) {
                    Rule::Limited(l) => (l.max(), l.per()),
                    Rule::Unlimited => (0, std::time::Duration::ZERO),
                };
                cells.push(CellView {
                    headers: CellHeaders::get(
                        policy.tier_name(tier),
                        policy.category_name(category),
                        max,
                        window,
                    ),
                    #[cfg(feature = "metrics")]
                    metrics: std::sync::OnceLock::new(),
                });
            }
        }
        PolicyView {
            policy,
            cells: cells.into_boxed_slice(),
        }
    }

    /// A cell's view; `None` for ids from another policy.
    #[inline]
    pub(crate) fn cell(&self, tier: TierId, category: CategoryId) -> Option<&CellView> {
        let ncat = self.policy.categories().len();
        if category.index() >= ncat {
            return None;
        }
        self.cells.get(tier.index() * ncat + category.index())
    }
}

impl CellView {
    /// The cell's request counters, made on first use with its names.
    #[cfg(feature = "metrics")]
    pub(crate) fn metrics(&self, tier: &str, category: &str) -> &crate::telemetry::CellMetrics {
        self.metrics
            .get_or_init(|| crate::telemetry::CellMetrics::new(tier, category))
    }
}
