//! The layer's compiled view of a policy: what the request path needs per
//! tier × category *cell* besides the policy itself — header values written
//! once, metric handles made on first use — swapped together with the
//! policy, so the policy itself knows nothing of headers or metrics.

use std::sync::Arc;

use crate::limit::Per;
use crate::policy::{CategoryId, Policy, TierId};
use crate::response::{CellHeaders, CellRef, LimitText};

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
    #[cfg(feature = "metrics")]
    tokens: std::sync::OnceLock<crate::telemetry::TokenCounters>,
    #[cfg(feature = "metrics")]
    leases: std::sync::OnceLock<metrics::Gauge>,
}

impl PolicyView {
    /// Compiles the view of `policy` (once per policy, never per request).
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        let mut cells = Vec::with_capacity(policy.tiers().len() * policy.categories().len());
        for tier in policy.tiers() {
            for category in policy.categories() {
                let limits = policy.limits(tier, category);
                cells.push(CellView {
                    headers: quota_headers(
                        policy.tier_name(tier),
                        policy.category_name(category),
                        [limits.per_key(), limits.per_account(), limits.per_org()],
                    ),
                    #[cfg(feature = "metrics")]
                    metrics: std::sync::OnceLock::new(),
                    #[cfg(feature = "metrics")]
                    tokens: std::sync::OnceLock::new(),
                    #[cfg(feature = "metrics")]
                    leases: std::sync::OnceLock::new(),
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
    /// The cell's token and refund counters, made on first use.
    #[cfg(feature = "metrics")]
    pub(crate) fn tokens(&self, tier: &str, category: &str) -> crate::telemetry::TokenCounters {
        self.tokens
            .get_or_init(|| crate::telemetry::TokenCounters::new(tier, category))
            .clone()
    }

    /// The cell's gauge of leases held (`tierlimit_leases_held`).
    #[cfg(feature = "metrics")]
    pub(crate) fn leases(&self, tier: &str, category: &str) -> metrics::Gauge {
        self.leases
            .get_or_init(|| {
                crate::telemetry::describe_once();
                metrics::gauge!(
                    "tierlimit_leases_held",
                    "tier" => tier.to_owned(),
                    "category" => category.to_owned()
                )
            })
            .clone()
    }

    /// The cell's request counters, made on first use with its names.
    #[cfg(feature = "metrics")]
    pub(crate) fn metrics(&self, tier: &str, category: &str) -> &crate::telemetry::CellMetrics {
        self.metrics
            .get_or_init(|| crate::telemetry::CellMetrics::new(tier, category))
    }
}

/// The view in force: swapped atomically by a
/// [`PolicyHandle`](crate::PolicyHandle), read by every request.
///
/// A request reads it through a small per-thread cache checked against a
/// version number (one plain load), not through an `arc-swap` load (a
/// thread-local lookup and two atomic writes per request). Each thread
/// keeps at most [`CACHED_VIEWS`] views alive (of the layers it serves); a
/// replaced view is let go by each thread at its next request through that
/// layer.
pub(crate) struct ViewSlot {
    current: arc_swap::ArcSwap<PolicyView>,
    version: std::sync::atomic::AtomicU64,
    /// Tells this slot's cache entries from other layers'.
    id: u64,
}

/// Views a thread keeps cached, one per layer it serves (most recently
/// used first).
const CACHED_VIEWS: usize = 8;

type ViewCache = Vec<(u64, u64, Arc<PolicyView>)>;

thread_local! {
    static VIEWS: std::cell::RefCell<ViewCache> = const { std::cell::RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for ViewSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewSlot").finish_non_exhaustive()
    }
}

impl ViewSlot {
    pub(crate) fn new(view: PolicyView) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static IDS: AtomicU64 = AtomicU64::new(1);
        ViewSlot {
            current: arc_swap::ArcSwap::from_pointee(view),
            version: AtomicU64::new(0),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The view in force, owned.
    pub(crate) fn load(&self) -> Arc<PolicyView> {
        self.current.load_full()
    }

    /// Puts `view` in force.
    pub(crate) fn store(&self, view: Arc<PolicyView>) {
        self.current.store(view);
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Runs `f` on the view in force, through this thread's cache.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Arc<PolicyView>) -> R) -> R {
        // Read the version first: a view loaded after it is at least as
        // new as the store that set it.
        let version = self.version.load(std::sync::atomic::Ordering::Acquire);
        let mut f = Some(f);
        let cached = VIEWS.try_with(|cache| {
            // A nested call on this thread finds the cache borrowed.
            let mut cache = cache.try_borrow_mut().ok()?;
            // The view this thread used last is first: one comparison.
            match cache.first() {
                Some(e) if e.0 == self.id && e.1 == version => {}
                _ => self.refresh(&mut cache, version),
            }
            let f = f.take()?;
            Some(f(&cache[0].2))
        });
        match (cached, f) {
            (Ok(Some(r)), _) => r,
            // Thread teardown, or a nested call: read the slot directly.
            (_, Some(f)) => {
                std::hint::cold_path();
                f(&self.current.load_full())
            }
            (_, None) => unreachable!("`f` ran, and returned"),
        }
    }

    /// Puts this slot's view, loaded at `version`, first in a thread's cache.
    #[cold]
    #[inline(never)]
    fn refresh(&self, cache: &mut ViewCache, version: u64) {
        if let Some(i) = cache.iter().position(|e| e.0 == self.id) {
            cache.remove(i);
        }
        cache.truncate(CACHED_VIEWS - 1);
        cache.insert(0, (self.id, version, self.current.load_full()));
    }
}

/// The header values that describe a quota of these limits (per key, per
/// account, per organisation) in `tier` and `category`: a cell's, or a
/// key's own when custom limits or boosts apply to it.
pub(crate) fn quota_headers(tier: &str, category: &str, lists: [&[crate::Limit]; 3]) -> CellRef {
    let [per_key, per_account, per_org] = lists;
    let mut texts: Vec<LimitText> = per_key
        .iter()
        .map(|l| (l, Per::Key))
        .chain(per_account.iter().map(|l| (l, Per::Account)))
        .chain(per_org.iter().map(|l| (l, Per::Org)))
        .map(|(l, per)| LimitText {
            max: l.max(),
            window: l.per(),
            per,
            period: l.period(),
        })
        .collect();
    if texts.is_empty() {
        texts.push(LimitText {
            max: 0,
            window: std::time::Duration::ZERO,
            per: Per::Key,
            period: crate::policy::Period::Rolling,
        });
    }
    CellHeaders::get(tier, category, &texts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn view(limit: &str) -> PolicyView {
        let toml = format!(
            "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"{limit}\"\nwrite = \"1/s\"\n"
        );
        PolicyView::new(Arc::new(Policy::from_toml_str(&toml).unwrap()))
    }

    fn read_max(slot: &ViewSlot) -> u32 {
        slot.with(|v| {
            let p = &v.policy;
            match p.rule(p.tier("free").unwrap(), p.category("read").unwrap()) {
                crate::policy::Rule::Limited(l) => l.max(),
                crate::policy::Rule::Unlimited => 0,
            }
        })
    }

    #[test]
    fn a_stored_view_is_seen_by_the_next_read_and_caches_never_mix_slots() {
        // More slots than the cache holds, read in turns on one thread.
        let slots: Vec<ViewSlot> = (1..=20)
            .map(|n| ViewSlot::new(view(&format!("{n}/s"))))
            .collect();
        for round in 0..3 {
            for (i, slot) in slots.iter().enumerate() {
                assert_eq!(read_max(slot), (i + 1 + round * 100) as u32);
            }
            for (i, slot) in slots.iter().enumerate() {
                slot.store(Arc::new(view(&format!("{}/s", i + 1 + (round + 1) * 100))));
            }
        }
        // A nested read on the same thread still sees the view in force.
        let outer = &slots[0];
        let nested = outer.with(|_| read_max(&slots[1]));
        assert_eq!(nested, 302);
    }
}
