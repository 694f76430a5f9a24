//! What each admin resource does: keys, custom limits, boosts, usage
//! checks; and the audit trail of every change.

use std::sync::Arc;

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::body::{key_field, only, string_field, time_field};
use super::{AdminResponse, AdminService, bad, json_response, problem};
use crate::backend::Backend;
use crate::extract::{Identity, Rejection};
use crate::key::{KeyDigest, KeyId};
use crate::limit::Per;
use crate::plane::{BoostEntry, BoostFor, Change};
use crate::policy::Policy;
use crate::response::{Answer, ResponseBody};
use crate::usage::UsageFuture;

impl<E, B: Backend> AdminService<E, B>
where
    E: Send + Sync + 'static,
{
    pub(super) fn put_key(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "tier", "account", "org", "move_account"])?;
        let key = key_field(body)?;
        let policy = self.shared.plane.base();
        let tier = string_field(body, "tier")?;
        if policy.tier(&tier).is_none() {
            return Err(bad(format!(
                "field `tier`: unknown tier `{tier}` (declared: {})",
                names(policy.tiers().map(|t| policy.tier_name(t)))
            )));
        }
        let account = name_field(body, Per::Account)?;
        let org = name_field(body, Per::Org)?;
        let move_account = match body.get("move_account") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("field `move_account` must be true or false")),
        };
        if let Some(a) = &account {
            self.one_org_per_account(&policy, &key, a, org.as_deref(), move_account)?;
        }
        let id = KeyId::of(&key);
        let mut shown = json!({
            "key": id.redacted().to_string(),
            "tier": tier,
            "account": account,
        });
        if let Some(o) = &org {
            shown["org"] = json!(o);
        }
        Ok((
            Change::PutKey {
                key: KeyDigest::of(&key),
                tier,
                account,
                org,
                move_account,
            },
            StatusCode::OK,
            shown,
            "put_key",
            id,
        ))
    }

    /// Refuses a key that would put `account` in two organisations (or in
    /// one and in none): its buckets live under its organisation when
    /// per-organisation limits apply, and a split account would be counted
    /// twice. Keys the policy file lists are changed in the file; keys
    /// operators provisioned move with this one when `move_account` says so.
    fn one_org_per_account(
        &self,
        policy: &Policy,
        key: &str,
        account: &str,
        org: Option<&str>,
        move_account: bool,
    ) -> Result<(), AdminResponse> {
        let (account_id, org_id) = (KeyId::of_account(account), org.map(KeyId::of_org));
        let in_file = policy
            .listed_keys()
            .any(|(k, e)| k != key && e.account == Some(account_id) && e.org != org_id);
        let conflict = |whose: &str, how: &str| {
            problem(
                StatusCode::CONFLICT,
                "admin-account-in-another-org",
                &format!(
                    "account `{account}` has {whose} in another organisation (or in none): every key of an account is in the same organisation; {how}"
                ),
            )
        };
        if in_file {
            return Err(conflict(
                "keys listed in the policy file",
                "change them in the file",
            ));
        }
        let state = self.shared.plane.state();
        if !move_account && state.splits_account(account, KeyDigest::of(key), org) {
            return Err(conflict(
                "keys provisioned here",
                "send \"move_account\": true to move them all with this one",
            ));
        }
        Ok(())
    }

    pub(super) fn revoke_key(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key"])?;
        let key = key_field(body)?;
        let id = KeyId::of(&key);
        let shown = json!({ "key": id.redacted().to_string(), "revoked": true });
        Ok((
            Change::RevokeKey {
                key: KeyDigest::of(&key),
            },
            StatusCode::OK,
            shown,
            "revoke_key",
            id,
        ))
    }

    pub(super) fn put_limit(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "account", "org", "category", "limit"])?;
        let owner = owner_field(body)?;
        let category = self.category_field(body)?;
        let written = body
            .get("limit")
            .cloned()
            .ok_or_else(|| bad("field `limit` is missing: a limit such as \"3/hour\", a list, \"unlimited\" or \"x5\""))?;
        let adjust = crate::policy::parse_adjust_json(&written)
            .map_err(|m| bad(format!("field `limit`: {m}")))?;
        let mut shown = json!({ "category": category, "limit": written });
        owner.show(&mut shown);
        Ok((
            Change::PutLimit {
                key: owner.digest,
                per: owner.per,
                category,
                written,
                adjust,
            },
            StatusCode::OK,
            shown,
            "put_limit",
            owner.id,
        ))
    }

    pub(super) fn remove_limit(&self, body: &Map<String, Value>) -> Changed {
        only(body, &["key", "account", "org", "category"])?;
        let owner = owner_field(body)?;
        let category = self.category_field(body)?;
        let mut shown = json!({ "category": category, "removed": true });
        owner.show(&mut shown);
        Ok((
            Change::RemoveLimit {
                key: owner.digest,
                per: owner.per,
                category,
            },
            StatusCode::OK,
            shown,
            "remove_limit",
            owner.id,
        ))
    }

    /// Adds a boost; its id is `given` (an `Idempotency-Key`'s) or new.
    pub(super) fn add_boost(&self, body: &Map<String, Value>, given: Option<String>) -> Changed {
        only(
            body,
            &[
                "key", "tier", "account", "org", "category", "adjust", "start", "end",
            ],
        )?;
        let (target, id) = self.boost_target(body)?;
        let boost = self.boost_entry(body, target)?;
        let boost_id = given.unwrap_or_else(new_boost_id);
        let mut shown = boost_json(&boost_id, &boost);
        shown["id"] = json!(boost_id);
        self.idempotent(&boost_id, &shown)?;
        Ok((
            Change::AddBoost {
                id: boost_id,
                boost,
            },
            StatusCode::CREATED,
            shown,
            "add_boost",
            id,
        ))
    }

    /// Whom a boost's body names: a key, an account or an organisation
    /// (and its id, for the audit trail), or a tier of the base policy.
    fn boost_target(&self, body: &Map<String, Value>) -> Result<(BoostFor, KeyId), AdminResponse> {
        if body.get("tier").is_none() {
            let owner = owner_field(body)?;
            let target = match owner.name {
                None => BoostFor::Key(owner.digest),
                Some(name) => BoostFor::Owner(owner.per, name),
            };
            return Ok((target, owner.id));
        }
        match (body.get("key"), body.get("account"), body.get("org")) {
            (None, None, None) => {
                let tier = string_field(body, "tier")?;
                let policy = self.shared.plane.base();
                if policy.tier(&tier).is_none() {
                    return Err(bad(format!("field `tier`: unknown tier `{tier}`")));
                }
                Ok((BoostFor::Tier(tier), KeyId::from_raw(0)))
            }
            _ => Err(bad(
                "a boost names one of `key`, `tier`, `account` or `org`",
            )),
        }
    }

    /// The boost a body describes for `target`: its category, adjustment
    /// and times, a boost that has not ended yet.
    fn boost_entry(
        &self,
        body: &Map<String, Value>,
        target: BoostFor,
    ) -> Result<BoostEntry, AdminResponse> {
        let category = match body.get("category") {
            None | Some(Value::Null) => None,
            Some(_) => Some(self.category_field(body)?),
        };
        let written = body
            .get("adjust")
            .cloned()
            .ok_or_else(|| bad("field `adjust` is missing: \"x2\", a limit or \"unlimited\""))?;
        let adjust = crate::policy::parse_adjust_json(&written)
            .map_err(|m| bad(format!("field `adjust`: {m}")))?;
        let start = time_field(body, "start")?;
        let end = time_field(body, "end")?;
        if end <= start {
            return Err(bad("field `end`: a boost ends after it starts"));
        }
        if end <= self.shared.plane.now() {
            return Err(bad("field `end`: this boost has already ended"));
        }
        Ok(BoostEntry {
            target,
            category,
            written,
            adjust,
            start,
            end,
            removed: false,
        })
    }

    /// What an `Idempotency-Key`'s boost `shown` meets: nothing yet (go
    /// on), the same boost (answered again, nothing changes), the boost
    /// removed since (409) or another boost under the key (422).
    fn idempotent(&self, boost_id: &str, shown: &Value) -> Result<(), AdminResponse> {
        let state = self.shared.plane.state();
        if state.boost(boost_id).is_some_and(|b| b.removed) {
            return Err(problem(
                StatusCode::CONFLICT,
                "admin-boost-removed",
                "the boost this Idempotency-Key added was removed since; use a new key",
            ));
        }
        match state.boost(boost_id) {
            None => Ok(()),
            // The same boost, asked again under the same key: done, and
            // answered as the first time.
            Some(b) if boost_json(boost_id, b) == *shown => {
                Err(json_response(StatusCode::CREATED, shown))
            }
            Some(_) => Err(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "admin-idempotency-key-reused",
                "this Idempotency-Key was used for another boost; use a new key",
            )),
        }
    }

    pub(super) fn list_boosts(&self) -> AdminResponse {
        let plane = &self.shared.plane;
        let state = plane.state();
        let boosts: Vec<Value> = state
            .boosts(plane.now())
            .map(|(id, b)| boost_json(id, b))
            .collect();
        json_response(StatusCode::OK, &json!({ "boosts": boosts }))
    }

    pub(super) fn remove_boost(&self, id: String) -> Changed {
        if !self.shared.plane.state().has_boost(&id) {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "no boost with this id (or it has ended)",
            ));
        }
        let shown = json!({ "id": id, "removed": true });
        Ok((
            Change::RemoveBoost { id },
            StatusCode::OK,
            shown,
            "remove_boost",
            KeyId::from_raw(0),
        ))
    }

    pub(super) async fn usage(&self, body: &Map<String, Value>) -> AdminResponse {
        if let Err(res) = only(body, &["key"]) {
            return res;
        }
        let key = match key_field(body) {
            Ok(k) => k,
            Err(res) => return res,
        };
        let policy: Arc<Policy> = Arc::clone(&self.shared.view.load().policy);
        let id = KeyId::of(&key);
        if policy.has_revocations() && policy.is_revoked(&key, id) {
            return problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "this key is revoked",
            );
        }
        let entry = policy.key_entry(&key, id);
        let Some(tier) = entry.map(|e| e.tier).or_else(|| policy.unknown_key_tier()) else {
            return problem(
                StatusCode::NOT_FOUND,
                "admin-not-found",
                "this key is not listed, and the policy refuses unknown keys",
            );
        };
        let identity = Identity::listed(id, entry);
        let report: Result<UsageFuture, Rejection> =
            crate::usage::report(&self.shared, policy, identity, tier);
        match report {
            Ok(fut) => match fut.await {
                Ok(res) => res,
                Err(never) => match never {},
            },
            Err(r) => Answer::Rejected(r)
                .into_response(false)
                .map(ResponseBody::full),
        }
    }

    pub(super) fn category_field(
        &self,
        body: &Map<String, Value>,
    ) -> Result<String, AdminResponse> {
        let category = string_field(body, "category")?;
        let policy = self.shared.plane.base();
        if category != "*" && policy.category(&category).is_none() {
            return Err(bad(format!(
                "field `category`: unknown category `{category}` (declared: {}, or \"*\")",
                names(policy.categories().map(|c| policy.category_name(c)))
            )));
        }
        Ok(category)
    }
}

/// A change, its status, what the answer shows, its audit action and key.
pub(super) type Changed = Result<(Change, StatusCode, Value, &'static str, KeyId), AdminResponse>;

/// Whom a custom limit or boost names: exactly one of `key`, `account`
/// and `org`.
struct Owner {
    per: Per,
    digest: KeyDigest,
    /// Its id, for the audit trail.
    id: KeyId,
    /// An account's or organisation's name (`None`: a key, never shown).
    name: Option<String>,
}

impl Owner {
    /// How answers show it, under its field's name: a key redacted, an
    /// account or organisation by name.
    fn show(&self, shown: &mut Value) {
        shown[self.per.name()] = match &self.name {
            Some(n) => json!(n),
            None => json!(self.id.redacted().to_string()),
        };
    }
}

fn owner_field(body: &Map<String, Value>) -> Result<Owner, AdminResponse> {
    let named = [Per::Key, Per::Account, Per::Org];
    let mut given = named.iter().filter(|per| body.contains_key(per.name()));
    let (Some(&per), None) = (given.next(), given.next()) else {
        return Err(bad("name one of `key`, `account` or `org`"));
    };
    if per == Per::Key {
        let key = key_field(body)?;
        return Ok(Owner {
            per,
            digest: KeyDigest::of(&key),
            id: KeyId::of(&key),
            name: None,
        });
    }
    let Some(name) = name_field(body, per)? else {
        let m = per.check_name("").unwrap_err();
        return Err(bad(format!("field `{}`: {m}", per.name())));
    };
    Ok(Owner {
        per,
        digest: crate::plane::owner_digest(&name, per),
        id: per.id_of(&name),
        name: Some(name),
    })
}

/// An optional account's or organisation's name (the field `account` or
/// `org`): absent or null, or a string of 1 to 256 bytes.
fn name_field(body: &Map<String, Value>, per: Per) -> Result<Option<String>, AdminResponse> {
    let field = per.name();
    let refused = |m: String| bad(format!("field `{field}`: {m}"));
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(a)) => per.check_name(a).map(|()| Some(a.clone())).map_err(refused),
        Some(_) => Err(refused(per.check_name("").unwrap_err())),
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A boost as the admin API shows it (its key redacted).
fn boost_json(id: &str, b: &BoostEntry) -> Value {
    let mut v = b.json("key", |k| k.key_id().redacted().to_string());
    v["id"] = json!(id);
    v
}

/// A boost id: 16 hex digits, random (unique across instances).
/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII
/// characters, once.
pub(super) fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<&str>, AdminResponse> {
    let mut values = headers.get_all("idempotency-key").iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return match headers.contains_key("idempotency-key") {
            true => Err(bad("send one `Idempotency-Key`")),
            false => Ok(None),
        };
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k))
        }
        _ => Err(bad(
            "an `Idempotency-Key` is 1 to 255 visible ASCII characters",
        )),
    }
}

/// A boost's id from an operator's `Idempotency-Key`: the same on every
/// instance (keys are hashed with the shared secret), so a retry through
/// any of them writes the same entry again.
pub(super) fn boost_id_for(who: &str, key: &str) -> String {
    let id = KeyId::of(&format!("idempotency\0{who}\0{key}"));
    format!("{:016x}", id.as_u64())
}

fn new_boost_id() -> String {
    format!("{:016x}", crate::key::random_u64())
}

/// The audit trail: an INFO event and a counter per change.
pub(super) fn audit(who: &str, action: &'static str, key: KeyId, shown: &Value) {
    let key = (key.as_u64() != 0).then(|| key.redacted().to_string());
    tracing::info!(
        target: "tierlimit::audit",
        who,
        action,
        key = key.as_deref().unwrap_or("-"),
        change = %shown,
        "admin change"
    );
    #[cfg(feature = "metrics")]
    crate::telemetry::describe_once();
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "tierlimit_admin_changes_total",
        "action" => action,
        "who" => who.to_owned()
    )
    .increment(1);
}
