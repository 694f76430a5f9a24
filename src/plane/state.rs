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
use crate::policy::{Adjust, Overlay, Policy, PolicyError};

/// Persistent maps: a copy of the state is a few reference counts.
type Fixed = foldhash::fast::FixedState;
type FixedMap<K, V> = imbl::GenericHashMap<K, V, Fixed, imbl::shared_ptr::DefaultSharedPtr>;

/// One operator change (what the admin API takes).
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// Provision a key, or move it to another tier or account.
    PutKey {
        key: KeyDigest,
        tier: String,
        account: Option<String>,
    },
    /// Revoke a key: refused with 401 from then on.
    RevokeKey { key: KeyDigest },
    /// Set a key's custom limit in one category (or `*`).
    PutLimit {
        key: KeyDigest,
        category: String,
        /// As written (a string or a list), kept to store and show.
        written: Value,
        adjust: Adjust,
    },
    /// Remove a key's custom limit in one category (or `*`), the file's
    /// included.
    RemoveLimit { key: KeyDigest, category: String },
    /// Add a boost.
    AddBoost { id: String, boost: BoostEntry },
    /// Remove a boost added by an operator.
    RemoveBoost { id: String },
}

/// Whom an operator's boost is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BoostFor {
    Key(KeyDigest),
    Tier(String),
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
}

impl BoostEntry {
    /// The boost as JSON, its key (if it names one) as `key_name`, shown
    /// by `show_key`.
    pub(crate) fn json(&self, key_name: &str, show_key: impl Fn(KeyDigest) -> String) -> Value {
        let (key, tier) = match &self.target {
            BoostFor::Key(k) => (Some(show_key(*k)), None),
            BoostFor::Tier(t) => (None, Some(t.as_str())),
        };
        let mut v = json!({
            "tier": tier,
            "category": self.category,
            "adjust": self.written,
            "start": self.start,
            "end": self.end,
        });
        v[key_name] = json!(key);
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
            Change::PutKey { key, tier, account } => {
                let state = KeyState::Put {
                    tier: tier.clone(),
                    account: account.clone(),
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
                category,
                written,
                adjust,
            } => self.set_limit(*key, category, Some((written.clone(), adjust.clone()))),
            Change::RemoveLimit { key, category } => self.set_limit(*key, category, None),
            Change::AddBoost { id, boost } => {
                self.boosts.insert(id.clone(), boost.clone());
            }
            Change::RemoveBoost { id } => {
                self.boosts.remove(id);
            }
        }
    }

    fn set_limit(&mut self, key: KeyDigest, category: &str, limit: Option<(Value, Adjust)>) {
        let mut limits = self
            .limits
            .get(&key)
            .map_or_else(KeyLimits::new, |l| (**l).clone());
        limits.insert(category.to_owned(), limit);
        self.limits.insert(key, Arc::new(limits));
    }

    /// Whether an operator added the boost `id`.
    pub(crate) fn has_boost(&self, id: &str) -> bool {
        self.boosts.contains_key(id)
    }

    /// The boosts operators added, ended ones left out.
    pub(crate) fn boosts(&self, now: u64) -> impl Iterator<Item = (&String, &BoostEntry)> {
        self.boosts.iter().filter(move |(_, b)| b.end > now)
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
            Change::PutKey { key, .. } | Change::RevokeKey { key } => {
                vec![(key_field(*key), self.key_value(*key))]
            }
            Change::PutLimit { key, category, .. } | Change::RemoveLimit { key, category } => {
                let v = self
                    .limits
                    .get(key)
                    .and_then(|l| l.get(category))
                    .map(|l| match l {
                        Some((written, _)) => json!({ "limit": written }).to_string(),
                        None => json!({ "removed": true }).to_string(),
                    });
                vec![(limit_field(*key, category), v)]
            }
            Change::AddBoost { id, .. } | Change::RemoveBoost { id } => {
                let v = self.boosts.get(id).map(boost_value);
                vec![(boost_field(id), v)]
            }
        }
    }

    fn key_value(&self, key: KeyDigest) -> Option<String> {
        self.keys.get(&key).map(|s| match s {
            KeyState::Put { tier, account } => {
                json!({ "tier": tier, "account": account }).to_string()
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
            Change::PutKey { key, .. } => self.refresh_key(o, base, *key),
            Change::RevokeKey { key } => {
                self.refresh_key(o, base, *key);
                self.refresh_limits(o, base, *key);
                self.refresh_boosts(o, base, now);
            }
            Change::PutLimit { key, .. } | Change::RemoveLimit { key, .. } => {
                self.refresh_limits(o, base, *key);
            }
            Change::AddBoost { .. } | Change::RemoveBoost { .. } => {
                self.refresh_boosts(o, base, now);
            }
        }
    }

    fn refresh_key(&self, o: &mut Overlay, base: &Policy, key: KeyDigest) {
        let entry = match self.keys.get(&key) {
            None => None,
            Some(KeyState::Revoked) => Some(None),
            Some(KeyState::Put { tier, account }) => match base.tier_or_err(tier.as_str()) {
                Ok(t) => Some(Some((t, account.as_deref().map(KeyId::of_account)))),
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
        // Each entry alone first: one that no longer fits is left out.
        let good: Vec<(&str, Option<&Adjust>)> = limits
            .iter()
            .map(|(c, l)| (c.as_str(), l.as_ref().map(|(_, a)| a)))
            .filter(|(c, a)| match base.check_op_limit(c, *a) {
                Ok(()) => true,
                Err(e) => {
                    left_out(&limit_field(key, c), &e);
                    false
                }
            })
            .collect();
        let row = base.op_override_row(key.id, &good).unwrap_or_else(|e| {
            left_out(&format!("custom limits of {}", key.key_id().redacted()), &e);
            None
        });
        o.set_overrides(key.id, row);
    }

    pub(crate) fn refresh_boosts(&self, o: &mut Overlay, base: &Policy, now: u64) {
        let mut compiled = Vec::new();
        for (id, b) in self.boosts(now) {
            let (key, tier) = match &b.target {
                BoostFor::Key(k) => (Some(k.id), None),
                BoostFor::Tier(t) => (None, Some(t.as_str())),
            };
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
        Change::PutKey { key, tier, account } => {
            let account_ok = account
                .as_ref()
                .is_none_or(|a| !a.is_empty() && a.len() <= crate::key::DEFAULT_MAX_KEY_LEN);
            let r = base
                .tier_or_err(tier)
                .map(drop)
                .and_then(|()| match account_ok {
                    true => Ok(()),
                    false => Err("an account is a name of 1 to 256 bytes".to_owned()),
                });
            (format!("keys.{}", entry(key, "")), r)
        }
        Change::RevokeKey { .. } | Change::RemoveBoost { .. } => return Ok(()),
        Change::PutLimit {
            key,
            category,
            adjust,
            ..
        } => (
            format!("overrides.{}", entry(key, &format!(".{category}"))),
            base.check_op_limit(category, Some(adjust)),
        ),
        Change::RemoveLimit { key, category } => (
            format!("overrides.{}", entry(key, &format!(".{category}"))),
            base.check_op_limit(category, None),
        ),
        Change::AddBoost { boost: b, .. } => {
            let (key, tier) = match &b.target {
                BoostFor::Key(k) => (Some(k.id), None),
                BoostFor::Tier(t) => (None, Some(t.as_str())),
            };
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

/// Reading a store's fields.
impl OperatorState {
    /// The state a store holds: fields and their JSON values. Entries that
    /// cannot be read are skipped and logged (never fatal). Fields of the
    /// previous version (raw keys) are read too; an entry by digest wins
    /// over one by raw key for the same key.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_fields(fields: impl IntoIterator<Item = (String, String)>) -> Self {
        Self::read_all(fields).0
    }

    /// The state, and the fields of the previous version read, each with
    /// the change it gave.
    fn read_all(
        fields: impl IntoIterator<Item = (String, String)>,
    ) -> (Self, Vec<(String, Change)>) {
        let mut state = OperatorState::default();
        let mut later = Vec::new();
        for (field, value) in fields {
            match read_field(&field, &value) {
                Ok(Some((change, legacy))) => later.push((field, change, legacy)),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    entry = %redact_field(&field),
                    error = %e,
                    "an operator change in the shared store cannot be read; skipped"
                ),
            }
        }
        // Keys first (a revocation drops the key's limits and boosts); the
        // previous version's entries before the current ones.
        later.sort_by_key(|(_, c, legacy)| {
            let key = matches!(c, Change::PutKey { .. } | Change::RevokeKey { .. });
            (!key, !legacy)
        });
        let mut legacy_fields = Vec::new();
        for (field, c, legacy) in later {
            let revoked = |k: &KeyDigest| matches!(state.keys.get(k), Some(KeyState::Revoked));
            let dropped = match &c {
                Change::PutLimit { key, .. } | Change::RemoveLimit { key, .. } => revoked(key),
                Change::AddBoost { boost, .. } => {
                    matches!(&boost.target, BoostFor::Key(k) if revoked(k))
                }
                _ => false,
            };
            if !dropped {
                state.make(&c);
            }
            if legacy {
                legacy_fields.push((field, c));
            }
        }
        (state, legacy_fields)
    }
}

/// The write that replaces the previous version's fields (raw keys) among
/// `fields` by the current ones (digests), in one step: each old field
/// deleted, the entry it gave set under its new field. Empty when there
/// is none.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn legacy_rewrite(fields: &[(String, String)]) -> Vec<(String, Option<String>)> {
    let (state, legacy) = OperatorState::read_all(fields.iter().cloned());
    let mut write: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (field, _) in &legacy {
        write.insert(field.clone(), None);
    }
    // Set after deleted: a boost keeps its field name.
    for (_, change) in &legacy {
        write.extend(state.entry_of(change));
    }
    write.into_iter().collect()
}

/// One field and its value: the change it records, and whether it is of
/// the previous version (a raw key); `None`: not an entry.
fn read_field(field: &str, value: &str) -> Result<Option<(Change, bool)>, String> {
    let path: Vec<String> =
        serde_json::from_str(field).map_err(|_| "not an entry name".to_owned())?;
    let v: Value = serde_json::from_str(value).map_err(|e| e.to_string())?;
    let s = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let digest = |hex: &str| KeyDigest::parse_hex(hex).ok_or("not a key digest");
    let (kind, key, legacy) = match path.as_slice() {
        [kind, hex, ..] if kind == "key-digest" || kind == "limit-digest" => {
            (kind.trim_end_matches("-digest"), digest(hex)?, false)
        }
        [kind, raw, ..] if kind == "key" || kind == "limit" => {
            (kind.as_str(), KeyDigest::of(raw), true)
        }
        [kind, id] if kind == "boost" => return read_boost(id, &v).map(Some),
        _ => return Ok(None),
    };
    let change = match (kind, path.get(2)) {
        ("key", None) if v.get("revoked").and_then(Value::as_bool) == Some(true) => {
            Change::RevokeKey { key }
        }
        ("key", None) => Change::PutKey {
            key,
            tier: s("tier").ok_or("no tier")?,
            account: s("account"),
        },
        ("limit", Some(category)) if v.get("removed").and_then(Value::as_bool) == Some(true) => {
            Change::RemoveLimit {
                key,
                category: category.clone(),
            }
        }
        ("limit", Some(category)) => {
            let written = v.get("limit").cloned().ok_or("no limit")?;
            let adjust = crate::policy::parse_adjust_json(&written)?;
            Change::PutLimit {
                key,
                category: category.clone(),
                written,
                adjust,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some((change, legacy)))
}

/// A boost's value; of the previous version if it names a raw key.
fn read_boost(id: &str, v: &Value) -> Result<(Change, bool), String> {
    let s = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let written = v.get("adjust").cloned().ok_or("no adjust")?;
    let adjust = crate::policy::parse_adjust_json(&written)?;
    let (target, legacy) = match (s("key_digest"), s("key"), s("tier")) {
        (Some(hex), None, None) => {
            let d = KeyDigest::parse_hex(&hex).ok_or("not a key digest")?;
            (BoostFor::Key(d), false)
        }
        (None, Some(raw), None) => (BoostFor::Key(KeyDigest::of(&raw)), true),
        (None, None, Some(t)) => (BoostFor::Tier(t), false),
        _ => return Err("a boost names a key or a tier".into()),
    };
    let time = |name: &str| {
        v.get(name)
            .and_then(Value::as_u64)
            .ok_or(format!("no {name}"))
    };
    let boost = BoostEntry {
        target,
        category: s("category"),
        written,
        adjust,
        start: time("start")?,
        end: time("end")?,
    };
    let id = id.to_owned();
    Ok((Change::AddBoost { id, boost }, legacy))
}

fn key_field(key: KeyDigest) -> String {
    json!(["key-digest", key.hex()]).to_string()
}

fn limit_field(key: KeyDigest, category: &str) -> String {
    json!(["limit-digest", key.hex(), category]).to_string()
}

pub(crate) fn boost_field(id: &str) -> String {
    json!(["boost", id]).to_string()
}

fn boost_value(b: &BoostEntry) -> String {
    b.json("key_digest", KeyDigest::hex).to_string()
}

/// A store field with its key redacted (for logs).
fn redact_field(field: &str) -> String {
    let Ok(path) = serde_json::from_str::<Vec<String>>(field) else {
        return "?".to_owned();
    };
    let shown = |kind: &str, id: KeyId, rest: &[String]| {
        let mut s = format!("{kind} {}", id.redacted());
        for r in rest {
            s.push(' ');
            s.push_str(r);
        }
        s
    };
    match path.as_slice() {
        [kind, hex, rest @ ..] if kind.ends_with("-digest") => match KeyDigest::parse_hex(hex) {
            Some(d) => shown(kind.trim_end_matches("-digest"), d.key_id(), rest),
            None => format!("{kind} ?"),
        },
        [kind, key, rest @ ..] if kind == "key" || kind == "limit" => {
            shown(kind, KeyId::of(key), rest)
        }
        [kind, id] => format!("{kind} {id}"),
        _ => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(path: Value, value: Value) -> (String, String) {
        (path.to_string(), value.to_string())
    }

    #[test]
    fn the_previous_versions_raw_keys_are_rewritten_as_digests() {
        let old = vec![
            field(
                json!(["key", "sk-old"]),
                json!({ "tier": "pro", "account": null }),
            ),
            field(
                json!(["limit", "sk-old", "write"]),
                json!({ "limit": "3/hour" }),
            ),
            field(
                json!(["boost", "b1"]),
                json!({ "key": "sk-old", "tier": null, "category": null, "adjust": "x2", "start": 1, "end": 9 }),
            ),
            field(
                json!(["boost", "b2"]),
                json!({ "key": null, "tier": "pro", "category": null, "adjust": "x2", "start": 1, "end": 9 }),
            ),
            field(json!(["key", "sk-gone"]), json!({ "revoked": true })),
        ];
        let write = legacy_rewrite(&old);
        let text = format!("{write:?}");
        let d = KeyDigest::of("sk-old");
        // Old fields deleted, new ones set; the tier boost untouched.
        assert!(write.contains(&(old[0].0.clone(), None)), "{text}");
        assert!(write.contains(&(old[1].0.clone(), None)), "{text}");
        assert!(write.iter().any(|(f, v)| *f == key_field(d) && v.is_some()));
        assert!(
            write
                .iter()
                .any(|(f, v)| *f == limit_field(d, "write") && v.is_some())
        );
        let b1 = write.iter().find(|(f, _)| *f == boost_field("b1")).unwrap();
        assert!(b1.1.as_ref().unwrap().contains(&d.hex()), "{text}");
        assert!(
            !write.iter().any(|(f, _)| *f == boost_field("b2")),
            "{text}"
        );
        assert_eq!(write.len(), 7, "{text}");
        // Nothing of the write names a raw key.
        let raw = write.iter().filter(|(f, v)| {
            v.as_deref().is_some_and(|v| v.contains("sk-")) || (v.is_some() && f.contains("sk-"))
        });
        assert_eq!(raw.count(), 0, "{text}");
        // Once rewritten, the fields read back the same, and need no more.
        let mut store: BTreeMap<String, String> = old.into_iter().collect();
        for (f, v) in write {
            match v {
                Some(v) => store.insert(f, v),
                None => store.remove(&f),
            };
        }
        let fields: Vec<(String, String)> = store.into_iter().collect();
        assert!(legacy_rewrite(&fields).is_empty());
        let state = OperatorState::from_fields(fields);
        assert!(matches!(state.keys.get(&d), Some(KeyState::Put { tier, .. }) if tier == "pro"));
        assert!(state.limits.get(&d).unwrap().contains_key("write"));
        assert_eq!(state.boosts.len(), 2);
        let gone = KeyDigest::of("sk-gone");
        assert!(matches!(state.keys.get(&gone), Some(KeyState::Revoked)));
    }
}
