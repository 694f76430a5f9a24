//! The operators' changes ([`OperatorState`]): keys provisioned or revoked,
//! custom limits and boosts, each key known only by its [`KeyDigest`] —
//! never its text, here or in a shared store — and the operators' layer
//! over the base policy compiled from them one change at a time
//! ([`Overlay`]).
//!
//! A store keeps each entry as one field, a JSON list, with a JSON value:
//! `["key-digest", "<32 hex>"]`, `["limit-digest", "<32 hex>", "<category>"]`
//! and `["boost", "<id>"]` (whose value names its key as `"key_digest"`).
//! The previous version's fields named raw keys (`["key", "<key>"]`,
//! `["limit", "<key>", "<category>"]`, a boost's `"key"`): they are still
//! read, and [`legacy_rewrite`] gives the write that replaces them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::key::{KeyDigest, KeyId};
use crate::limit::Per;
use crate::policy::{Adjust, ListedKey, Overlay, Policy, PolicyError};

mod fields;

pub(crate) use fields::legacy_rewrite;
use fields::{boost_field, boost_value, key_field, limit_field, redact_field};

/// Persistent maps: a copy of the state is a few reference counts.
type Fixed = foldhash::fast::FixedState;
type FixedMap<K, V> = imbl::GenericHashMap<K, V, Fixed, imbl::shared_ptr::DefaultSharedPtr>;

/// One operator change (what the admin API takes).
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// Provision a key, or move it to another tier, account or
    /// organisation.
    PutKey {
        key: KeyDigest,
        tier: String,
        account: Option<String>,
        org: Option<String>,
        /// Every other key of `account` an operator provisioned moves to
        /// `org` with it (an account belongs to one organisation).
        move_account: bool,
    },
    /// Revoke a key: refused with 401 from then on.
    RevokeKey { key: KeyDigest },
    /// Set a key's, an account's or an organisation's (`per`) custom limit
    /// in one category (or `*`); `key` is its digest
    /// ([`owner_digest`]).
    PutLimit {
        key: KeyDigest,
        per: Per,
        category: String,
        /// As written (a string or a list), kept to store and show.
        written: Value,
        adjust: Adjust,
    },
    /// Remove a key's, an account's or an organisation's custom limit in
    /// one category (or `*`), the file's included.
    RemoveLimit {
        key: KeyDigest,
        per: Per,
        category: String,
    },
    /// Add a boost.
    AddBoost { id: String, boost: BoostEntry },
    /// Remove a boost added by an operator.
    RemoveBoost { id: String },
    /// Forget a boost that has ended (and its tombstone, if removed).
    ForgetBoost { id: String },
}

/// Whom an operator's boost is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BoostFor {
    Key(KeyDigest),
    Tier(String),
    /// An account or an organisation (`per`), by name.
    Owner(Per, String),
}

impl BoostFor {
    /// The key, account or organisation boosted (its id and level), or
    /// the tier.
    fn compiled(&self) -> (Option<(u64, Per)>, Option<&str>) {
        match self {
            BoostFor::Key(k) => (Some((k.id, Per::Key)), None),
            BoostFor::Tier(t) => (None, Some(t.as_str())),
            BoostFor::Owner(per, name) => (Some((per.id_of(name).as_u64(), *per)), None),
        }
    }
}

/// The digest an account's or organisation's (`per`) custom limits are
/// kept under (a key's own digest for `Per::Key`): its id is the id its
/// limits are counted under.
pub(crate) fn owner_digest(name: &str, per: Per) -> KeyDigest {
    match per {
        Per::Key => KeyDigest::of(name),
        Per::Account => KeyDigest::of_owner(per.id_of(name), 0x5A, name),
        Per::Org => KeyDigest::of_owner(per.id_of(name), 0x6F, name),
    }
}

/// A boost added by an operator.
#[derive(Clone, Debug)]
pub(crate) struct BoostEntry {
    pub(crate) target: BoostFor,
    pub(crate) category: Option<String>,
    pub(crate) written: Value,
    pub(crate) adjust: Adjust,
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Removed by an operator: kept until its end as a tombstone, so a late
    /// retry of the request that added it (its `Idempotency-Key`) does not
    /// add it again. A removed boost applies to nothing and is not listed.
    pub(crate) removed: bool,
}

impl BoostEntry {
    /// The boost as JSON, its key (if it names one) as `key_name`, shown
    /// by `show_key`.
    pub(crate) fn json(&self, key_name: &str, show_key: impl Fn(KeyDigest) -> String) -> Value {
        let (key, tier) = match &self.target {
            BoostFor::Key(k) => (Some(show_key(*k)), None),
            BoostFor::Tier(t) => (None, Some(t.as_str())),
            BoostFor::Owner(..) => (None, None),
        };
        let mut v = json!({
            "tier": tier,
            "category": self.category,
            "adjust": self.written,
            "start": self.start,
            "end": self.end,
        });
        v[key_name] = json!(key);
        if let BoostFor::Owner(per, name) = &self.target {
            v[per.name()] = json!(name);
        }
        if self.removed {
            v["removed"] = json!(true);
        }
        v
    }

    fn is_for(&self, key: KeyDigest) -> bool {
        self.target == BoostFor::Key(key)
    }
}

#[derive(Clone, Debug)]
enum KeyState {
    Put {
        tier: String,
        account: Option<String>,
        org: Option<String>,
    },
    Revoked,
}

/// A key's custom limits by category (or `*`); `None`: removed (hides a
/// custom limit of the base policy).
type KeyLimits = BTreeMap<String, Option<(Value, Adjust)>>;

/// The operators' changes, layered over the base policy.
#[derive(Clone, Debug, Default)]
pub(crate) struct OperatorState {
    keys: FixedMap<KeyDigest, KeyState>,
    limits: FixedMap<KeyDigest, Arc<KeyLimits>>,
    /// Whose custom limits `limits` holds, for those of an account or an
    /// organisation (absent: a key's).
    owners: FixedMap<KeyDigest, Per>,
    boosts: imbl::OrdMap<String, BoostEntry>,
}

impl OperatorState {
    /// This state with `change` made.
    pub(crate) fn with(&self, change: &Change) -> OperatorState {
        let mut next = self.clone();
        next.make(change);
        next
    }

    pub(crate) fn make(&mut self, change: &Change) {
        match change {
            Change::PutKey {
                key,
                tier,
                account,
                org,
                move_account,
            } => {
                if let (true, Some(a)) = (move_account, account) {
                    let others: Vec<KeyDigest> = self.in_account(a).map(|(k, _)| k).collect();
                    for other in others {
                        if let Some(KeyState::Put { org: o, .. }) = self.keys.get_mut(&other) {
                            o.clone_from(org);
                        }
                    }
                }
                let state = KeyState::Put {
                    tier: tier.clone(),
                    account: account.clone(),
                    org: org.clone(),
                };
                self.keys.insert(*key, state);
            }
            Change::RevokeKey { key } => {
                self.keys.insert(*key, KeyState::Revoked);
                self.limits.remove(key);
                self.remove_boosts(|b| b.is_for(*key));
            }
            Change::PutLimit {
                key,
                per,
                category,
                written,
                adjust,
            } => {
                let limit = Some((written.clone(), adjust.clone()));
                self.set_limit(*key, *per, category, limit);
            }
            Change::RemoveLimit { key, per, category } => {
                self.set_limit(*key, *per, category, None);
            }
            Change::AddBoost { id, boost } => {
                self.boosts.insert(id.clone(), boost.clone());
            }
            Change::ForgetBoost { id } => {
                self.boosts.remove(id);
            }
            Change::RemoveBoost { id } => {
                if let Some(b) = self.boosts.get_mut(id) {
                    b.removed = true;
                }
            }
        }
    }

    fn set_limit(
        &mut self,
        key: KeyDigest,
        per: Per,
        category: &str,
        limit: Option<(Value, Adjust)>,
    ) {
        if per != Per::Key {
            self.owners.insert(key, per);
        }
        let mut limits = self
            .limits
            .get(&key)
            .map_or_else(KeyLimits::new, |l| (**l).clone());
        limits.insert(category.to_owned(), limit);
        self.limits.insert(key, Arc::new(limits));
    }

    /// The keys operators provisioned in `account`, with their
    /// organisations.
    fn in_account<'a>(
        &'a self,
        account: &'a str,
    ) -> impl Iterator<Item = (KeyDigest, Option<&'a str>)> + 'a {
        self.keys.iter().filter_map(move |(k, s)| match s {
            KeyState::Put {
                account: Some(a),
                org,
                ..
            } if a == account => Some((*k, org.as_deref())),
            _ => None,
        })
    }

    /// The keys a `PutKey` of `key` in `account` that moves the account
    /// touches: `key` and every key provisioned in `account`, once each.
    fn moved_keys(&self, key: KeyDigest, account: &str) -> Vec<KeyDigest> {
        let mut keys: Vec<KeyDigest> = self.in_account(account).map(|(k, _)| k).collect();
        keys.push(key);
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Whether a key provisioned in `account`, other than `key`, is in
    /// another organisation than `org` (or in one while `org` is none).
    pub(crate) fn splits_account(&self, account: &str, key: KeyDigest, org: Option<&str>) -> bool {
        self.in_account(account).any(|(k, o)| k != key && o != org)
    }

    /// Whose custom limits are kept under `key`.
    pub(crate) fn owner_of(&self, key: KeyDigest) -> Per {
        self.owners.get(&key).copied().unwrap_or(Per::Key)
    }

    /// The boost `id` an operator added, if any.
    pub(crate) fn boost(&self, id: &str) -> Option<&BoostEntry> {
        self.boosts.get(id)
    }

    /// Whether an operator added the boost `id`.
    pub(crate) fn has_boost(&self, id: &str) -> bool {
        self.boosts.get(id).is_some_and(|b| !b.removed)
    }

    /// The boosts operators added, ended ones left out.
    pub(crate) fn boosts(&self, now: u64) -> impl Iterator<Item = (&String, &BoostEntry)> {
        self.boosts
            .iter()
            .filter(move |(_, b)| b.end > now && !b.removed)
    }

    /// Forgets boosts that have ended; whether any had.
    pub(crate) fn drop_ended(&mut self, now: u64) -> bool {
        self.remove_boosts(|b| b.end <= now)
    }

    /// Removes the boosts `gone` is true of; whether any.
    fn remove_boosts(&mut self, gone: impl Fn(&BoostEntry) -> bool) -> bool {
        let ids: Vec<String> = self
            .boosts
            .iter()
            .filter(|(_, b)| gone(b))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.boosts.remove(id);
        }
        !ids.is_empty()
    }

    /// The ids of boosts that have ended (to remove).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn ended(&self, now: u64) -> Vec<String> {
        self.boosts
            .iter()
            .filter(|(_, b)| b.end <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The store's field and value for the entry `change` touched (`None`
    /// value: the field is deleted).
    pub(crate) fn entry_of(&self, change: &Change) -> Vec<(String, Option<String>)> {
        match change {
            Change::PutKey {
                key,
                account: Some(a),
                move_account: true,
                ..
            } => self
                .moved_keys(*key, a)
                .into_iter()
                .map(|k| (key_field(k), self.key_value(k)))
                .collect(),
            Change::PutKey { key, .. } | Change::RevokeKey { key } => {
                vec![(key_field(*key), self.key_value(*key))]
            }
            Change::PutLimit { key, category, .. } | Change::RemoveLimit { key, category, .. } => {
                let v = self.limits.get(key).and_then(|l| l.get(category)).map(|l| {
                    let mut v = match l {
                        Some((written, _)) => json!({ "limit": written }),
                        None => json!({ "removed": true }),
                    };
                    match self.owner_of(*key) {
                        Per::Key => {}
                        per => v["per"] = json!(per.name()),
                    }
                    v.to_string()
                });
                vec![(limit_field(*key, category), v)]
            }
            Change::AddBoost { id, .. }
            | Change::RemoveBoost { id }
            | Change::ForgetBoost { id } => {
                let v = self.boosts.get(id).map(boost_value);
                vec![(boost_field(id), v)]
            }
        }
    }

    fn key_value(&self, key: KeyDigest) -> Option<String> {
        self.keys.get(&key).map(|s| match s {
            KeyState::Put { tier, account, org } => {
                let mut v = json!({ "tier": tier, "account": account });
                if let Some(o) = org {
                    v["org"] = json!(o);
                }
                v.to_string()
            }
            KeyState::Revoked => json!({ "revoked": true }).to_string(),
        })
    }

    /// The fields of a key's custom limits and boosts (which a revocation
    /// removes with it).
    pub(crate) fn fields_of_key(&self, key: KeyDigest) -> Vec<String> {
        let limits = self.limits.get(&key).map(Arc::clone).unwrap_or_default();
        let limits = limits.keys().map(|c| limit_field(key, c));
        let boosts = self
            .boosts
            .iter()
            .filter(|(_, b)| b.is_for(key))
            .map(|(id, _)| boost_field(id));
        limits.chain(boosts).collect()
    }
}

/// Compiling the state into the operators' layer over a base policy.
impl OperatorState {
    /// The whole layer over `base`. An entry the base policy does not
    /// accept (its tier or category is gone after a reload) is left out
    /// and logged.
    pub(crate) fn overlay(&self, base: &Policy, now: u64) -> Overlay {
        let mut o = Overlay::default();
        for key in self.keys.keys() {
            self.refresh_key(&mut o, base, *key);
        }
        for key in self.limits.keys() {
            self.refresh_limits(&mut o, base, *key);
        }
        self.refresh_boosts(&mut o, base, now);
        o
    }

    /// Updates `o` for what `change` touched (made already): one key, one
    /// key's custom limits, or the boosts.
    pub(crate) fn refresh(&self, o: &mut Overlay, base: &Policy, change: &Change, now: u64) {
        match change {
            Change::PutKey {
                key,
                account: Some(a),
                move_account: true,
                ..
            } => {
                for k in self.moved_keys(*key, a) {
                    self.refresh_key(o, base, k);
                }
            }
            Change::PutKey { key, .. } => self.refresh_key(o, base, *key),
            Change::RevokeKey { key } => {
                self.refresh_key(o, base, *key);
                self.refresh_limits(o, base, *key);
                self.refresh_boosts(o, base, now);
            }
            Change::PutLimit { key, .. } | Change::RemoveLimit { key, .. } => {
                self.refresh_limits(o, base, *key);
            }
            Change::AddBoost { .. } | Change::RemoveBoost { .. } | Change::ForgetBoost { .. } => {
                self.refresh_boosts(o, base, now);
            }
        }
    }

    fn refresh_key(&self, o: &mut Overlay, base: &Policy, key: KeyDigest) {
        let entry = match self.keys.get(&key) {
            None => None,
            Some(KeyState::Revoked) => Some(None),
            Some(KeyState::Put { tier, account, org }) => match base.tier_or_err(tier.as_str()) {
                Ok(t) => Some(Some(
                    ListedKey::new(t)
                        .in_account(account.as_deref().map(KeyId::of_account))
                        .in_org(org.as_deref().map(KeyId::of_org)),
                )),
                Err(e) => {
                    left_out(&key_field(key), &e);
                    None
                }
            },
        };
        o.set_key(key, entry);
    }

    fn refresh_limits(&self, o: &mut Overlay, base: &Policy, key: KeyDigest) {
        let limits = self.limits.get(&key).map(Arc::clone).unwrap_or_default();
        let per = self.owner_of(key);
        // Each entry alone first: one that no longer fits is left out.
        let good: Vec<(&str, Option<&Adjust>)> = limits
            .iter()
            .map(|(c, l)| (c.as_str(), l.as_ref().map(|(_, a)| a)))
            .filter(|(c, a)| match base.check_op_limit(c, *a, per) {
                Ok(()) => true,
                Err(e) => {
                    left_out(&limit_field(key, c), &e);
                    false
                }
            })
            .collect();
        let row = base
            .op_override_row((key.id, per), &good)
            .unwrap_or_else(|e| {
                left_out(&format!("custom limits of {}", key.key_id().redacted()), &e);
                None
            });
        o.set_overrides(key.id, row);
    }

    pub(crate) fn refresh_boosts(&self, o: &mut Overlay, base: &Policy, now: u64) {
        let mut compiled = Vec::new();
        for (id, b) in self.boosts(now) {
            let (key, tier) = b.target.compiled();
            let category = b.category.as_deref();
            match base.compile_op_boost(key, tier, category, &b.adjust, (b.start, b.end)) {
                Ok(c) => compiled.push(c),
                Err(e) => left_out(&boost_field(id), &e),
            }
        }
        o.set_boosts(compiled);
    }
}

fn left_out(field: &str, error: &str) {
    tracing::error!(
        entry = %redact_field(field),
        error = %error,
        "an operator change no longer fits the policy; left out"
    );
}

/// Checks `change` against `base` (its tiers, categories and cells): the
/// error a policy build would give, naming the entry. Nothing is built.
pub(crate) fn validate(base: &Policy, change: &Change) -> Result<(), PolicyError> {
    let entry = |key: &KeyDigest, rest: &str| format!("\"{}\"{rest}", key.key_id().redacted());
    let (name, result) = match change {
        Change::PutKey {
            key,
            tier,
            account,
            org,
            ..
        } => {
            let names = [(account, Per::Account), (org, Per::Org)].into_iter();
            let r = base.tier_or_err(tier).map(drop).and_then(|()| {
                names
                    .filter_map(|(n, per)| Some(per.check_name(n.as_deref()?)))
                    .collect()
            });
            (format!("keys.{}", entry(key, "")), r)
        }
        Change::RevokeKey { .. } | Change::RemoveBoost { .. } | Change::ForgetBoost { .. } => {
            return Ok(());
        }
        Change::PutLimit {
            key,
            per,
            category,
            adjust,
            ..
        } => (
            format!(
                "{}.{}",
                per.limits_section(),
                entry(key, &format!(".{category}"))
            ),
            base.check_op_limit(category, Some(adjust), *per),
        ),
        Change::RemoveLimit { key, per, category } => (
            format!(
                "{}.{}",
                per.limits_section(),
                entry(key, &format!(".{category}"))
            ),
            base.check_op_limit(category, None, *per),
        ),
        Change::AddBoost { boost: b, .. } => {
            let (key, tier) = b.target.compiled();
            let r = base
                .compile_op_boost(
                    key,
                    tier,
                    b.category.as_deref(),
                    &b.adjust,
                    (b.start, b.end),
                )
                .map(drop);
            ("boosts".to_owned(), r)
        }
    };
    result.map_err(|m| PolicyError::new(name, None, m))
}
