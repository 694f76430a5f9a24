//! Policies: tiers × categories → limits, routes → categories, keys → tiers.
//!
//! A [`Policy`] is built once (in code with [`Policy::builder`], or from
//! TOML with [`Policy::from_toml_str`] / [`Policy::from_toml_file`]),
//! validated as a whole, and then read on every request without hashing a
//! single tier or category name: both are interned to small indices
//! ([`TierId`], [`CategoryId`]) when the policy is built.
//!
//! # The TOML format
//!
//! ```toml
//! # Endpoint categories, in order.
//! categories = ["read", "write", "ai", "training"]
//!
//! [defaults]
//! read = "read"            # category of GET/HEAD/OPTIONS no route matches
//! write = "write"          # category of every other unmatched method
//! unknown_key = "reject"   # 401, or the name of a tier for unknown keys
//! missing_key = "reject"   # 401, or a tier for anonymous callers (keyed by peer IP)
//!
//! [tiers.free]
//! read = "100/hour"
//! write = "20/hour"
//! ai = "50/hour"
//! training = "5/day"       # or "unlimited"
//!
//! [[routes]]               # first match wins; unmatched requests use the defaults
//! method = "POST"          # optional: one method or a list
//! path = "/v1/training/jobs"
//! category = "training"
//! cost = 1                 # optional, default 1
//!
//! [[routes]]
//! path = "/healthz"
//! exempt = true            # not limited, no key needed
//!
//! [keys]
//! "free-demo-key" = "free"
//! ```
//!
//! Every tier must give a rule for every category. Limits are written
//! `MAX/WINDOW`: `100/hour`, `1,000/h`, `10/30s`, `5/day`.

mod builder;
mod cell;
mod envoy;
mod file;
mod keys;
mod operator;
mod overlay;
mod overload;
mod route;
mod set;

use std::sync::Arc;

use hashbrown::HashTable;
use http::Method;

use crate::key::KeyId;
use crate::limit::Per;

pub use crate::calendar::Calendar;
pub use crate::limit::{Limit, MAX_LIMITS, Period, PeriodBounds, Rule};
use builder::KeySpec;
pub(crate) use builder::reserve_of;
pub use builder::{KeyRule, PolicyBuilder, PolicyError, Route, Tier};
pub(crate) use cell::Cell;
use cell::Metering;
pub use cell::{CellLimits, EffectiveLimits};
pub use envoy::{DescriptorKeys, EnvoyRules, EnvoySettings};
pub(crate) use file::parse_adjust_json;
use keys::KeyTable;
pub use keys::ListedKey;
pub use operator::{Adjust, Boost, BoostTarget, Shadow};
use operator::{CompiledBoost, more_generous_all};
pub(crate) use operator::{MAX_UNIX, Who, parse_time};
pub(crate) use overlay::Overlay;
pub(crate) use overload::FULL as SHED_FULL;
pub use overload::{
    Capacity, DEFAULT_MAX_CAPACITY, DEFAULT_MIN_CAPACITY, OverloadRules, OverloadSettings,
};
use route::CompiledRoute;
pub use route::Target;
pub(crate) use set::{Applied, IoTokens, LimitBuf, Limits};
pub use set::{MAX_CONCURRENCY, Pool, RefundOn};

/// A plan tier (`free`, `pro`, …), interned to an index when the policy is
/// built. Obtain one with [`Policy::tier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierId(pub(crate) u16);

/// An endpoint category (`read`, `write`, `ai`, …), interned to an index when
/// the policy is built. Obtain one with [`Policy::category`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CategoryId(pub(crate) u16);

impl TierId {
    /// The tier's position in its policy.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl CategoryId {
    /// The category's position in its policy.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug)]
pub(super) struct PolicyInner {
    pub(super) tiers: Box<[Box<str>]>,
    pub(super) categories: Box<[Box<str>]>,
    pub(super) cells: Box<[Cell]>,
    pub(super) routes: Box<[CompiledRoute]>,
    pub(super) default_read: CategoryId,
    pub(super) default_write: CategoryId,
    pub(super) keys: KeyTable,
    /// Revoked keys (their full text), by their `KeyId`.
    pub(super) revoked: HashTable<Box<str>>,
    pub(super) unknown_key: Option<TierId>,
    pub(super) missing_key: Option<TierId>,
    pub(super) overrides: builder::Overrides,
    /// The same custom limits as written (by category and `*`), for the
    /// operators' layer to replace some of them.
    pub(super) override_sources: overlay::OverrideSources,
    pub(super) boosts: Box<[CompiledBoost]>,
    pub(super) shadow_tiers: Box<[bool]>,
    pub(super) shadow_categories: Box<[bool]>,
    pub(super) envoy: EnvoyRules,
    /// The `[overload]` table, if any (shared: the layer's overload state
    /// tells a changed table by its address).
    pub(super) overload: Option<Arc<OverloadRules>>,
    /// The time zone calendar limits reset in.
    pub(super) calendar: crate::calendar::Calendar,
    pub(super) source: PolicyBuilder,
}

/// A validated rate-limit policy. Cheap to clone (one `Arc`).
///
/// ```
/// let policy = tierlimit::Policy::from_toml_str(r#"
///     categories = ["read", "write"]
///     [tiers.free]
///     read = "100/hour"
///     write = "20/hour"
/// "#).unwrap();
/// let free = policy.tier("free").unwrap();
/// let read = policy.category("read").unwrap();
/// assert_eq!(policy.rule(free, read).to_string(), "100 per hour");
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    inner: Arc<PolicyInner>,
    /// The operators' layer (keys, custom limits, boosts made through the
    /// admin API), if any.
    ops: Option<Arc<Overlay>>,
}

impl Policy {
    /// Starts a policy in code.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// Parses and validates a TOML policy.
    pub fn from_toml_str(source: &str) -> Result<Policy, PolicyError> {
        file::parse(source)
    }

    /// Reads, parses and validates a TOML policy file.
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let source = std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(path, e))?;
        file::parse(&source)
    }

    /// The tier named `name`.
    pub fn tier(&self, name: &str) -> Option<TierId> {
        self.inner
            .tiers
            .iter()
            .position(|t| **t == *name)
            .map(|i| TierId(i as u16))
    }

    /// The category named `name`.
    pub fn category(&self, name: &str) -> Option<CategoryId> {
        self.inner
            .categories
            .iter()
            .position(|c| **c == *name)
            .map(|i| CategoryId(i as u16))
    }

    /// Every tier, in declaration order.
    pub fn tiers(&self) -> impl ExactSizeIterator<Item = TierId> + '_ {
        (0..self.inner.tiers.len()).map(|i| TierId(i as u16))
    }

    /// Every category, in declaration order.
    pub fn categories(&self) -> impl ExactSizeIterator<Item = CategoryId> + '_ {
        (0..self.inner.categories.len()).map(|i| CategoryId(i as u16))
    }

    /// A tier's name. Ids from another policy may name another tier; an id
    /// out of range gives `"?"`.
    pub fn tier_name(&self, tier: TierId) -> &str {
        self.inner.tiers.get(tier.index()).map_or("?", |t| t)
    }

    /// A category's name (see [`tier_name`](Self::tier_name)).
    pub fn category_name(&self, category: CategoryId) -> &str {
        self.inner
            .categories
            .get(category.index())
            .map_or("?", |c| c)
    }

    /// The rule of one tier in one category: its first per-key limit, or
    /// unlimited (see [`limits`](Self::limits) for every limit of a
    /// cell). Ids from another policy may give [`Rule::Unlimited`]; prefer
    /// ids from this policy.
    pub fn rule(&self, tier: TierId, category: CategoryId) -> Rule {
        self.cell(tier, category)
            .map_or(Rule::Unlimited, |c| c.rule)
    }

    /// Every limit of one tier in one category, per key and per account.
    /// Ids from another policy give an unlimited cell's (empty) lists.
    pub fn limits(&self, tier: TierId, category: CategoryId) -> CellLimits<'_> {
        static UNLIMITED: std::sync::OnceLock<Cell> = std::sync::OnceLock::new();
        let cell = self.cell(tier, category).unwrap_or_else(|| {
            UNLIMITED.get_or_init(|| {
                Cell::new(
                    Vec::new(),
                    [Vec::new(), Vec::new()],
                    Metering::default(),
                    Pool::Key,
                    "",
                    "",
                )
            })
        });
        CellLimits { cell }
    }

    /// A tier × category cell; `None` for ids from another policy.
    #[inline]
    pub(crate) fn cell(&self, tier: TierId, category: CategoryId) -> Option<&Cell> {
        if category.index() >= self.inner.categories.len() {
            return None;
        }
        self.inner
            .cells
            .get(tier.index() * self.inner.categories.len() + category.index())
    }

    /// Where a request goes: the first matching route, else the default
    /// category for its method.
    #[inline]
    pub fn classify(&self, method: &Method, path: &str) -> Target {
        self.classify_lazily(method, || path)
    }

    /// [`classify`](Self::classify), reading the path only under a policy
    /// with routes: a request's `Uri::path` (a slice with its bounds
    /// checked) is then never worked out on the path of a policy without
    /// them.
    #[inline]
    pub(crate) fn classify_lazily<'p>(
        &self,
        method: &Method,
        path: impl FnOnce() -> &'p str,
    ) -> Target {
        if self.inner.routes.is_empty() {
            self.by_method(method)
        } else {
            self.classify_routes(method, path())
        }
    }

    /// [`classify`](Self::classify) under a policy with routes (out of
    /// line: a policy without routes runs none of it).
    #[inline(never)]
    fn classify_routes(&self, method: &Method, path: &str) -> Target {
        for r in self.inner.routes.iter() {
            if r.matches(method, path) {
                return r.target;
            }
        }
        self.by_method(method)
    }

    /// The default category for `method`: reads for `GET`, `HEAD` and
    /// `OPTIONS`, writes for the rest.
    #[inline]
    fn by_method(&self, method: &Method) -> Target {
        let category =
            if *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS {
                self.inner.default_read
            } else {
                self.inner.default_write
            };
        Target::Category { category, cost: 1 }
    }

    /// The tier the policy's key table gives `key`, comparing the full text.
    /// `id` must be `KeyId::of(key)`.
    #[inline]
    pub fn key_tier(&self, key: &str, id: KeyId) -> Option<TierId> {
        self.key_entry(key, id).map(|e| e.tier)
    }

    /// The tier, account and organisation the key table (or an operator)
    /// gives `key`, if it is listed. `id` must be `KeyId::of(key)`.
    #[inline]
    pub fn key_entry(&self, key: &str, id: KeyId) -> Option<ListedKey> {
        if let Some(k) = self.ops.as_ref().and_then(|o| o.key(key, id)) {
            return k.entry;
        }
        self.inner.keys.find(id.as_u64(), key.as_bytes())
    }

    /// [`key_entry`](Self::key_entry) of a key read as bytes (the request
    /// path's): the operators' entries, rare, are looked up by its text.
    #[inline]
    pub(crate) fn key_entry_bytes(&self, key: &[u8], id: KeyId) -> Option<ListedKey> {
        if self.ops.is_none() {
            return self.inner.keys.find(id.as_u64(), key);
        }
        std::str::from_utf8(key)
            .ok()
            .and_then(|text| self.key_entry(text, id))
    }

    /// Whether any key is revoked (one branch per request when none is).
    #[inline]
    pub fn has_revocations(&self) -> bool {
        !self.inner.revoked.is_empty() || self.ops.as_ref().is_some_and(|o| o.revocations())
    }

    /// Whether `key` was revoked ([`PolicyBuilder::revoke_key`]); `id` must
    /// be `KeyId::of(key)`.
    pub fn is_revoked(&self, key: &str, id: KeyId) -> bool {
        if let Some(k) = self.ops.as_ref().and_then(|o| o.key(key, id)) {
            return k.entry.is_none();
        }
        self.inner
            .revoked
            .find(id.as_u64(), |k| **k == *key)
            .is_some()
    }

    /// The rule that applies to `key` in a tier and category at `now_unix`
    /// (seconds): the tier's rule, then the key's custom limit (which takes
    /// precedence), then the most generous active boost for the key or its
    /// tier, if it is more generous. For a cell with several limits, this
    /// is the first per-key limit after the same steps.
    pub fn effective_rule(
        &self,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
        now_unix: u64,
    ) -> Rule {
        let Some(cell) = self.cell(tier, category) else {
            return Rule::Unlimited;
        };
        let applied = self.effective(cell, tier, category, key, now_unix);
        applied
            .per_key
            .as_slice()
            .first()
            .map_or(Rule::Unlimited, |l| Rule::Limited(*l))
    }

    /// Every limit that applies to `key` in a cell at `now_unix`: the
    /// tier's, then the key's custom limit, then the most generous active
    /// boost if it is more generous (no allocation).
    /// Every limit that applies to `key` in a tier and category at
    /// `now_unix` (seconds), after its custom limits and the boosts active
    /// then: what its requests are checked against. `None` for ids from
    /// another policy. (For tools such as `tierlimit table`; the request
    /// path never copies limits like this.)
    pub fn effective_limits(
        &self,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
        now_unix: u64,
    ) -> Option<EffectiveLimits> {
        let cell = self.cell(tier, category)?;
        let a = self.effective(cell, tier, category, key, now_unix);
        Some(EffectiveLimits {
            per_key: a.per_key.as_slice().to_vec(),
            per_account: a.per_account.as_slice().to_vec(),
            per_org: a.per_org.as_slice().to_vec(),
            tokens: a.tokens.as_slice().to_vec(),
            account_tokens: a.account_tokens.as_slice().to_vec(),
            input_tokens: a.io.input.as_slice().to_vec(),
            output_tokens: a.io.output.as_slice().to_vec(),
            account_input_tokens: a.io.account_input.as_slice().to_vec(),
            account_output_tokens: a.io.account_output.as_slice().to_vec(),
            concurrency: cell.concurrency,
            account_concurrency: cell.account_concurrency,
        })
    }

    /// The keys the policy lists (`[keys]`, or the builder's), with their
    /// tier, account and organisation, in no particular order. Keys
    /// provisioned through the admin API are known by a digest only, and
    /// not listed.
    pub fn listed_keys(&self) -> impl Iterator<Item = (&str, ListedKey)> + '_ {
        self.inner.keys.iter()
    }

    pub(crate) fn effective(
        &self,
        cell: &Cell,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
        now_unix: u64,
    ) -> Applied {
        self.adjusted(cell, tier, category, Who::key(key.as_u64()), now_unix)
            .unwrap_or_else(|| cell.applied())
    }

    /// Like [`effective`](Self::effective), but `None` when no custom
    /// limit or active boost touches this caller (`who`: its key, account
    /// and organisation) in this cell (the cell's own limits apply, and the
    /// request path keeps its fast path). Custom limits apply from the
    /// widest owner to the narrowest (organisation, account, key); then
    /// each active boost, when more generous.
    #[inline]
    pub(crate) fn adjusted(
        &self,
        cell: &Cell,
        tier: TierId,
        category: CategoryId,
        who: Who,
        now_unix: u64,
    ) -> Option<Applied> {
        let row = |id: u64| match &self.ops {
            None => self.inner.overrides.get(&id).map(|r| &**r),
            Some(o) => o
                .override_row(id)
                .or_else(|| self.inner.overrides.get(&id).map(|r| &**r)),
        };
        let custom = |id: Option<u64>, per: Per| {
            let cells = row(id?)?;
            cells.get(category.index())?.as_ref().map(|a| (a, per))
        };
        let customs = [
            custom(who.org, Per::Org),
            custom(who.account, Per::Account),
            custom(Some(who.key), Per::Key),
        ];
        let op_boosts = self.ops.as_ref().map_or(&[][..], |o| o.boosts());
        let mut boosts = self
            .inner
            .boosts
            .iter()
            .chain(op_boosts)
            .filter(|b| b.applies(who, tier, category, now_unix))
            .peekable();
        if customs.iter().all(Option::is_none) && boosts.peek().is_none() {
            return None;
        }
        let mut applied = cell.applied();
        for (adjust, per) in customs.into_iter().flatten() {
            applied = adjust.apply_at(&applied, Some(per));
        }
        let base = applied;
        for b in boosts {
            let boosted = b.adjust.apply_at(&base, b.per());
            if more_generous_all(&boosted, &applied) {
                applied = boosted;
            }
        }
        Some(applied)
    }

    /// Whether any custom limit or boost exists (else the tier rule is final).
    #[inline]
    pub(crate) fn has_adjustments(&self) -> bool {
        !self.inner.overrides.is_empty()
            || !self.inner.boosts.is_empty()
            || self.ops.as_ref().is_some_and(|o| o.has_adjustments())
    }

    /// The time zone calendar limits reset in (`[defaults] time_zone`).
    pub fn calendar(&self) -> &crate::calendar::Calendar {
        &self.inner.calendar
    }

    /// Whether the policy has boosts (which need the time of day).
    #[inline]
    pub(crate) fn has_boosts(&self) -> bool {
        !self.inner.boosts.is_empty() || self.ops.as_ref().is_some_and(|o| !o.boosts().is_empty())
    }

    /// The share of each burst a tier reserves for critical requests, in
    /// percent (0: the tier ignores `X-Request-Priority`).
    pub fn priority_reserve(&self, tier: TierId) -> u8 {
        // Each of the tier's cells holds it (the request path reads it there).
        self.cell(tier, CategoryId(0)).map_or(0, |c| c.reserve)
    }

    /// Whether shadow mode applies to a tier and category.
    pub fn is_shadow(&self, tier: TierId, category: CategoryId) -> bool {
        self.inner
            .shadow_tiers
            .get(tier.index())
            .copied()
            .unwrap_or(false)
            || self
                .inner
                .shadow_categories
                .get(category.index())
                .copied()
                .unwrap_or(false)
    }

    /// This policy's definition, to change and build again (for run-time
    /// edits through a [`PolicyHandle`](crate::PolicyHandle)). The changes
    /// made through the admin API are not part of it: they are layered over
    /// the base policy.
    pub fn to_builder(&self) -> PolicyBuilder {
        self.inner.source.clone()
    }

    /// What Envoy's rate limit service reads and answers: the `[envoy]`
    /// table, or its defaults.
    pub fn envoy(&self) -> &EnvoyRules {
        &self.inner.envoy
    }

    /// The `[overload]` table, if the policy sheds load.
    #[inline]
    pub fn overload(&self) -> Option<&OverloadRules> {
        self.inner.overload.as_deref()
    }

    /// The `[overload]` table, shared (what the layer's overload state
    /// keeps to tell a changed table).
    #[inline]
    pub(crate) fn overload_arc(&self) -> Option<&Arc<OverloadRules>> {
        self.inner.overload.as_ref()
    }

    /// The tier for keys the policy does not know, if they are accepted.
    pub fn unknown_key_tier(&self) -> Option<TierId> {
        self.inner.unknown_key
    }

    /// The tier for requests without a key (limited per peer address), if
    /// they are accepted.
    pub fn missing_key_tier(&self) -> Option<TierId> {
        self.inner.missing_key
    }
}

#[cfg(test)]
mod tests;
