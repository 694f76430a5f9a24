//! The fields a store keeps: one per entry, a JSON list, with a JSON
//! value. Keys appear by digest only (`["key-digest", "<32 hex>"]`,
//! `["limit-digest", "<32 hex>", "<category>"]`, a boost's
//! `"key_digest"`); the previous version's fields, which named raw keys,
//! are read and rewritten ([`legacy_rewrite`]).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{BoostEntry, BoostFor, Change, KeyState, OperatorState};
use crate::key::{KeyDigest, KeyId};
use crate::limit::Per;

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
    let per = match s("per").as_deref() {
        None => Per::Key,
        Some("account") => Per::Account,
        Some("org") => Per::Org,
        Some(_) => return Err("an unknown owner of custom limits".into()),
    };
    let change = match (kind, path.get(2)) {
        ("key", None) if v.get("revoked").and_then(Value::as_bool) == Some(true) => {
            Change::RevokeKey { key }
        }
        ("key", None) => Change::PutKey {
            key,
            tier: s("tier").ok_or("no tier")?,
            account: s("account"),
            org: s("org"),
            move_account: false,
        },
        ("limit", Some(category)) if v.get("removed").and_then(Value::as_bool) == Some(true) => {
            Change::RemoveLimit {
                key,
                per,
                category: category.clone(),
            }
        }
        ("limit", Some(category)) => {
            let written = v.get("limit").cloned().ok_or("no limit")?;
            let adjust = crate::policy::parse_adjust_json(&written)?;
            Change::PutLimit {
                key,
                per,
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
    let owner = match (s("account"), s("org")) {
        (Some(a), None) => Some(BoostFor::Owner(Per::Account, a)),
        (None, Some(o)) => Some(BoostFor::Owner(Per::Org, o)),
        (None, None) => None,
        _ => return Err("a boost names one owner".into()),
    };
    let (target, legacy) = match (s("key_digest"), s("key"), s("tier"), owner) {
        (Some(hex), None, None, None) => {
            let d = KeyDigest::parse_hex(&hex).ok_or("not a key digest")?;
            (BoostFor::Key(d), false)
        }
        (None, Some(raw), None, None) => (BoostFor::Key(KeyDigest::of(&raw)), true),
        (None, None, Some(t), None) => (BoostFor::Tier(t), false),
        (None, None, None, Some(owner)) => (owner, false),
        _ => return Err("a boost names a key, a tier, an account or an organisation".into()),
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
        removed: v.get("removed").and_then(Value::as_bool) == Some(true),
    };
    let id = id.to_owned();
    Ok((Change::AddBoost { id, boost }, legacy))
}

pub(super) fn key_field(key: KeyDigest) -> String {
    json!(["key-digest", key.hex()]).to_string()
}

pub(super) fn limit_field(key: KeyDigest, category: &str) -> String {
    json!(["limit-digest", key.hex(), category]).to_string()
}

pub(crate) fn boost_field(id: &str) -> String {
    json!(["boost", id]).to_string()
}

pub(super) fn boost_value(b: &BoostEntry) -> String {
    b.json("key_digest", KeyDigest::hex).to_string()
}

/// A store field with its key redacted (for logs).
pub(super) fn redact_field(field: &str) -> String {
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
