//! The operators' layer over a compiled policy: keys provisioned or revoked
//! (known by their [`KeyDigest`] only), custom limits and boosts, kept in
//! persistent maps so that one change costs what it changes — never a
//! rebuild of the policy — and a copy of the whole layer is a few
//! reference counts.
//!
//! A policy without operator changes carries no layer at all (`None`): its
//! request path pays one branch for it, where it looks a key up.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::TierId;
use super::operator::CompiledBoost;
use super::{Adjust, CategoryId, ListedKey, MAX_UNIX, Policy};
use crate::key::{KeyDigest, KeyId};
use crate::limit::Per;

/// Keys here are keyed hashes already: a fixed hasher spreads them.
type Fixed = foldhash::fast::FixedState;
type FixedMap<K, V> = imbl::GenericHashMap<K, V, Fixed, imbl::shared_ptr::DefaultSharedPtr>;

/// A file's (or builder's) custom limits of one key, as written: by
/// category, and for every category (`*`).
#[derive(Clone, Debug)]
pub(crate) struct OverrideParts {
    pub(super) specific: Box<[Option<Adjust>]>,
    pub(super) star: Option<Adjust>,
}

/// The base policy's custom limits by key hash, as written.
pub(crate) type OverrideSources = HashMap<u64, OverrideParts, foldhash::fast::RandomState>;

/// One key an operator provisioned (`entry` set) or revoked (`None`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpKey {
    /// The second half of the key's digest.
    check: u64,
    pub(crate) entry: Option<ListedKey>,
}

/// The operators' layer, compiled against one base policy.
#[derive(Clone, Default)]
pub(crate) struct Overlay {
    /// By `KeyId`: the keys with that id (one, but for a collision).
    keys: FixedMap<u64, Arc<[OpKey]>>,
    /// How many of `keys` are revoked.
    revoked: usize,
    /// Rows of custom limits that replace the base policy's for a key.
    overrides: FixedMap<u64, Arc<[Option<Adjust>]>>,
    boosts: Arc<[CompiledBoost]>,
}

impl fmt::Debug for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overlay")
            .field("keys", &self.keys.len())
            .field("revoked", &self.revoked)
            .field("overrides", &self.overrides.len())
            .field("boosts", &self.boosts.len())
            .finish()
    }
}

impl Overlay {
    /// The operators' entry for `key` (whose id is `id`), if any: its
    /// digest's second half is computed only when a digest has this id.
    #[inline]
    pub(crate) fn key(&self, key: &str, id: KeyId) -> Option<&OpKey> {
        let rows = self.keys.get(&id.as_u64())?;
        let check = KeyDigest::check_of(key);
        rows.iter().find(|r| r.check == check)
    }

    /// Sets (or, with `None`, forgets) the operators' entry for a key:
    /// `Some(None)` revokes it, `Some(Some(entry))` lists it.
    pub(crate) fn set_key(&mut self, digest: KeyDigest, entry: Option<Option<ListedKey>>) {
        let mut rows: Vec<OpKey> = self
            .keys
            .get(&digest.id)
            .map(|r| r.to_vec())
            .unwrap_or_default();
        if let Some(i) = rows.iter().position(|r| r.check == digest.check) {
            let old = rows.remove(i);
            self.revoked -= usize::from(old.entry.is_none());
        }
        if let Some(e) = entry {
            self.revoked += usize::from(e.is_none());
            rows.push(OpKey {
                check: digest.check,
                entry: e,
            });
        }
        if rows.is_empty() {
            self.keys.remove(&digest.id);
        } else {
            self.keys.insert(digest.id, Arc::from(rows));
        }
    }

    /// Sets (or, with `None`, forgets) the row of custom limits of `id`.
    pub(crate) fn set_overrides(&mut self, id: u64, row: Option<Arc<[Option<Adjust>]>>) {
        match row {
            Some(r) => {
                self.overrides.insert(id, r);
            }
            None => {
                self.overrides.remove(&id);
            }
        }
    }

    /// Replaces the operators' boosts.
    pub(crate) fn set_boosts(&mut self, boosts: Vec<CompiledBoost>) {
        self.boosts = Arc::from(boosts);
    }

    /// Whether nothing is layered.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.overrides.is_empty() && self.boosts.is_empty()
    }

    #[inline]
    pub(super) fn revocations(&self) -> bool {
        self.revoked > 0
    }

    #[inline]
    pub(super) fn has_adjustments(&self) -> bool {
        !self.overrides.is_empty() || !self.boosts.is_empty()
    }

    #[inline]
    pub(super) fn override_row(&self, id: u64) -> Option<&[Option<Adjust>]> {
        self.overrides.get(&id).map(|r| &**r)
    }

    #[inline]
    pub(super) fn boosts(&self) -> &[CompiledBoost] {
        &self.boosts
    }
}

/// The operators' custom limits of one key, by category (or `*`):
/// `Some`: set; `None`: removed (hides the base policy's).
pub(crate) type OpLimits<'a> = &'a [(&'a str, Option<&'a Adjust>)];

impl Policy {
    /// This policy with the operators' layer (none if it is empty).
    pub(crate) fn with_overlay(&self, overlay: &Overlay) -> Policy {
        Policy {
            inner: Arc::clone(&self.inner),
            ops: (!overlay.is_empty()).then(|| Arc::new(overlay.clone())),
        }
    }

    /// Checks a custom limit's or a boost's adjustment against every cell
    /// (as the builder does).
    pub(crate) fn check_adjust(&self, adjust: &Adjust, per: Per) -> Result<(), String> {
        super::builder::check_adjust(&self.inner.cells, adjust, per)
    }

    /// The category named `name`, or an error naming the declared ones.
    fn category_or_err(&self, name: &str) -> Result<CategoryId, String> {
        self.category(name).ok_or_else(|| {
            let names: Vec<&str> = self.inner.categories.iter().map(|c| &**c).collect();
            format!("unknown category `{name}` (declared: {})", names.join(", "))
        })
    }

    /// The tier named `name`, or an error naming the declared ones.
    pub(crate) fn tier_or_err(&self, name: &str) -> Result<TierId, String> {
        self.tier(name).ok_or_else(|| {
            let names: Vec<&str> = self.inner.tiers.iter().map(|t| &**t).collect();
            format!("unknown tier `{name}` (declared: {})", names.join(", "))
        })
    }

    /// Checks one operator custom limit of a key, account or organisation
    /// (`per`): a category or `*`, and its adjustment, if set.
    pub(crate) fn check_op_limit(
        &self,
        category: &str,
        adjust: Option<&Adjust>,
        per: Per,
    ) -> Result<(), String> {
        if category != "*" {
            self.category_or_err(category)?;
        }
        adjust.map_or(Ok(()), |a| self.check_adjust(a, per))
    }

    /// The row of custom limits of key `id` once the operators' `limits`
    /// are layered over this policy's (`None`: no operator limit, the
    /// policy's own row applies). A category a set limit names must exist.
    pub(crate) fn op_override_row(
        &self,
        (id, per): (u64, Per),
        limits: OpLimits<'_>,
    ) -> Result<Option<Arc<[Option<Adjust>]>>, String> {
        if limits.is_empty() {
            return Ok(None);
        }
        let ncat = self.inner.categories.len();
        let base = self.inner.override_sources.get(&id);
        let mut specific: Vec<Option<Adjust>> = match base {
            Some(p) => p.specific.to_vec(),
            None => vec![None; ncat],
        };
        let mut star = base.and_then(|p| p.star.clone());
        for &(category, adjust) in limits {
            self.check_op_limit(category, adjust, per)?;
            if category == "*" {
                star = adjust.cloned();
            } else {
                specific[self.category_or_err(category)?.index()] = adjust.cloned();
            }
        }
        let row: Vec<Option<Adjust>> = specific
            .into_iter()
            .map(|s| s.or_else(|| star.clone()))
            .collect();
        Ok(Some(Arc::from(row)))
    }

    /// Compiles an operator's boost of a key, an account or an
    /// organisation (`owner`: its id and level), or of a tier.
    pub(crate) fn compile_op_boost(
        &self,
        owner: Option<(u64, Per)>,
        tier: Option<&str>,
        category: Option<&str>,
        adjust: &Adjust,
        (start, end): (u64, u64),
    ) -> Result<CompiledBoost, String> {
        if start >= end {
            return Err("a boost must start before it ends".into());
        }
        if end > MAX_UNIX {
            return Err("a boost must end by the end of year 9999".into());
        }
        self.check_adjust(adjust, owner.map_or(Per::Key, |(_, per)| per))?;
        let tier = tier.map(|t| self.tier_or_err(t)).transpose()?;
        let category = category.map(|c| self.category_or_err(c)).transpose()?;
        Ok(CompiledBoost {
            owner,
            tier,
            category,
            adjust: adjust.clone(),
            start,
            end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Limit, Rule, Tier};

    fn policy() -> Policy {
        Policy::builder()
            .categories(["read", "write"])
            .tier(
                Tier::new("free")
                    .limit("read", Limit::per_hour(100))
                    .limit("write", Limit::per_hour(20)),
            )
            .tier(
                Tier::new("pro")
                    .limit("read", Limit::per_hour(1000))
                    .limit("write", Limit::per_hour(200)),
            )
            .key("file-key", "free")
            .custom_limit("file-key", "*", Adjust::Scale(2.0))
            .custom_limit("file-key", "write", Adjust::Scale(3.0))
            .build()
            .unwrap()
    }

    #[test]
    fn keys_by_digest_override_the_base_and_need_the_whole_digest() {
        let base = policy();
        let pro = base.tier("pro").unwrap();
        let mut o = Overlay::default();
        assert!(base.with_overlay(&o).ops.is_none(), "no layer when empty");
        o.set_key(KeyDigest::of("op-key"), Some(Some(ListedKey::new(pro))));
        o.set_key(KeyDigest::of("file-key"), Some(None));
        let p = base.with_overlay(&o);
        assert_eq!(p.key_tier("op-key", KeyId::of("op-key")), Some(pro));
        assert!(p.has_revocations());
        assert!(p.is_revoked("file-key", KeyId::of("file-key")));
        assert_eq!(p.key_tier("file-key", KeyId::of("file-key")), None);
        // The id alone is not enough: another key with a forged id.
        assert_eq!(p.key_tier("other", KeyId::of("op-key")), None);
        // Forgotten: the base applies again.
        o.set_key(KeyDigest::of("file-key"), None);
        let p = base.with_overlay(&o);
        assert!(!p.has_revocations());
        assert_eq!(
            p.key_tier("file-key", KeyId::of("file-key")),
            base.tier("free")
        );
    }

    #[test]
    fn operator_limits_replace_the_base_ones_by_category() {
        let base = policy();
        let id = KeyId::of("file-key").as_u64();
        let x5 = Adjust::Scale(5.0);
        // Removing the file's `*` keeps its `write`.
        let row = base
            .op_override_row((id, Per::Key), &[("*", None)])
            .unwrap()
            .unwrap();
        assert_eq!(&*row, &[None, Some(Adjust::Scale(3.0))]);
        // Setting `read` keeps the file's `write`.
        let row = base
            .op_override_row((id, Per::Key), &[("read", Some(&x5))])
            .unwrap()
            .unwrap();
        assert_eq!(&*row, &[Some(x5.clone()), Some(Adjust::Scale(3.0))]);
        assert!(base.op_override_row((id, Per::Key), &[]).unwrap().is_none());
        let e = base
            .op_override_row((id, Per::Key), &[("gpu", Some(&x5))])
            .unwrap_err();
        assert!(e.contains("unknown category `gpu`"), "{e}");
        let unlimited = Adjust::Set(Rule::Unlimited);
        assert!(
            base.op_override_row((7, Per::Key), &[("*", Some(&unlimited))])
                .is_ok()
        );
    }
}
