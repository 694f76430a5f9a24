//! The operator plane: the policy in force is the *base* policy (the file,
//! or what code built) with the operators' changes layered over it (keys
//! provisioned or revoked, custom limits, boosts: [`OperatorState`]). Both
//! are kept, so a file reload keeps the admin changes and an admin change
//! survives a file reload; every change swaps the compiled view atomically.
//!
//! With a shared store ([`RateLimitLayer::share_operator_state`]
//! (crate::RateLimitLayer::share_operator_state), feature `redis`), the
//! operator state lives in Redis: changes are written there first, every
//! instance reloads it when its version moves, and loads it all at start.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde_json::{Value, json};

use crate::policy::{Adjust, Boost, BoostTarget, Policy, PolicyBuilder, PolicyError};
use crate::view::{PolicyView, ViewSlot};

/// One operator change (what the admin API takes).
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// Provision a key, or move it to another tier or account.
    PutKey {
        key: String,
        tier: String,
        account: Option<String>,
    },
    /// Revoke a key: refused with 401 from then on.
    RevokeKey { key: String },
    /// Set a key's custom limit in one category (or `*`).
    PutLimit {
        key: String,
        category: String,
        /// As written (a string or a list), kept to store and show.
        written: Value,
        adjust: Adjust,
    },
    /// Remove a key's custom limit in one category (or `*`), the file's
    /// included.
    RemoveLimit { key: String, category: String },
    /// Add a boost.
    AddBoost { id: String, boost: BoostEntry },
    /// Remove a boost added by an operator.
    RemoveBoost { id: String },
}

/// A boost added by an operator.
#[derive(Clone, Debug)]
pub(crate) struct BoostEntry {
    pub(crate) target: BoostTarget,
    pub(crate) category: Option<String>,
    pub(crate) written: Value,
    pub(crate) adjust: Adjust,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl BoostEntry {
    /// The boost as JSON, its key (if it names one) shown by `show_key`.
    pub(crate) fn json(&self, show_key: impl Fn(&str) -> String) -> Value {
        let (key, tier) = match &self.target {
            BoostTarget::Key(k) => (Some(show_key(k)), None),
            BoostTarget::Tier(t) => (None, Some(t.as_str())),
        };
        json!({
            "key": key,
            "tier": tier,
            "category": self.category,
            "adjust": self.written,
            "start": self.start,
            "end": self.end,
        })
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

/// The operators' changes, layered over the base policy. A store keeps each
/// entry as one field (`field`) with a JSON value.
#[derive(Clone, Debug, Default)]
pub(crate) struct OperatorState {
    keys: BTreeMap<String, KeyState>,
    /// `None`: removed (hides a custom limit of the base policy).
    limits: BTreeMap<(String, String), Option<(Value, Adjust)>>,
    boosts: BTreeMap<String, BoostEntry>,
}

impl OperatorState {
    /// This state with `change` made.
    pub(crate) fn with(&self, change: &Change) -> OperatorState {
        let mut next = self.clone();
        next.make(change);
        next
    }

    fn make(&mut self, change: &Change) {
        match change {
            Change::PutKey { key, tier, account } => {
                self.keys.insert(
                    key.clone(),
                    KeyState::Put {
                        tier: tier.clone(),
                        account: account.clone(),
                    },
                );
            }
            Change::RevokeKey { key } => {
                self.keys.insert(key.clone(), KeyState::Revoked);
                self.limits.retain(|(k, _), _| k != key);
                self.boosts
                    .retain(|_, b| !matches!(&b.target, BoostTarget::Key(k) if k == key));
            }
            Change::PutLimit {
                key,
                category,
                written,
                adjust,
            } => {
                self.limits.insert(
                    (key.clone(), category.clone()),
                    Some((written.clone(), adjust.clone())),
                );
            }
            Change::RemoveLimit { key, category } => {
                self.limits.insert((key.clone(), category.clone()), None);
            }
            Change::AddBoost { id, boost } => {
                self.boosts.insert(id.clone(), boost.clone());
            }
            Change::RemoveBoost { id } => {
                self.boosts.remove(id);
            }
        }
    }

    /// The boost `id` an operator added, if any.
    pub(crate) fn boost(&self, id: &str) -> Option<&BoostEntry> {
        self.boosts.get(id)
    }

    /// Whether an operator added the boost `id`.
    pub(crate) fn has_boost(&self, id: &str) -> bool {
        self.boosts.contains_key(id)
    }

    /// The boosts operators added, ended ones left out.
    pub(crate) fn boosts(&self, now: u64) -> impl Iterator<Item = (&String, &BoostEntry)> {
        self.boosts.iter().filter(move |(_, b)| b.end > now)
    }

    /// Forgets boosts that have ended.
    fn drop_ended(&mut self, now: u64) {
        self.boosts.retain(|_, b| b.end > now);
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

    /// The policy in force: `base` with these changes made (ended boosts
    /// left out). An entry the base policy no longer accepts (its tier or
    /// category is gone after a reload) is left out and logged.
    pub(crate) fn apply(&self, base: &Policy, now: u64) -> Policy {
        match self.builder(base.to_builder(), now, &|_| true).build() {
            Ok(p) => p,
            Err(_) => {
                // Find what no longer fits, one entry at a time (rare).
                let mut good: Vec<String> = Vec::new();
                for field in self.fields_in_order() {
                    let keep = |f: &str| f == field || good.iter().any(|g| g == f);
                    match self.builder(base.to_builder(), now, &keep).build() {
                        Ok(_) => good.push(field),
                        Err(e) => tracing::error!(
                            entry = %redact_field(&field),
                            error = %e,
                            "an operator change no longer fits the policy; left out"
                        ),
                    }
                }
                let keep = |f: &str| good.iter().any(|g| g == f);
                self.builder(base.to_builder(), now, &keep)
                    .build()
                    .unwrap_or_else(|_| base.clone())
            }
        }
    }

    /// `b` with the entries `keep` accepts (by field name).
    fn builder(
        &self,
        mut b: PolicyBuilder,
        now: u64,
        keep: &dyn Fn(&str) -> bool,
    ) -> PolicyBuilder {
        for (key, state) in &self.keys {
            if !keep(&key_field(key)) {
                continue;
            }
            b = match state {
                KeyState::Put { tier, account } => b.put_key(key, tier, account.clone()),
                KeyState::Revoked => b.revoke_key(key),
            };
        }
        for ((key, category), limit) in &self.limits {
            if !keep(&limit_field(key, category)) {
                continue;
            }
            b = b.remove_custom_limit(key, category);
            if let Some((_, adjust)) = limit {
                b = b.custom_limit(key.clone(), category.clone(), adjust.clone());
            }
        }
        for (id, boost) in &self.boosts {
            if boost.end <= now || !keep(&boost_field(id)) {
                continue;
            }
            let mut x = Boost::new(
                boost.target.clone(),
                boost.adjust.clone(),
                boost.start,
                boost.end,
            );
            if let Some(c) = &boost.category {
                x = x.category(c.clone());
            }
            b = b.boost(x);
        }
        b
    }

    fn fields_in_order(&self) -> Vec<String> {
        let keys = self.keys.keys().map(|k| key_field(k));
        let limits = self.limits.keys().map(|(k, c)| limit_field(k, c));
        let boosts = self.boosts.keys().map(|id| boost_field(id));
        keys.chain(limits).chain(boosts).collect()
    }

    /// The store's field and value for the entry `change` touched (`None`
    /// value: the field is deleted).
    pub(crate) fn entry_of(&self, change: &Change) -> Vec<(String, Option<String>)> {
        match change {
            Change::PutKey { key, .. } | Change::RevokeKey { key } => {
                vec![(key_field(key), self.key_value(key))]
            }
            Change::PutLimit { key, category, .. } | Change::RemoveLimit { key, category } => {
                let v = self
                    .limits
                    .get(&(key.clone(), category.clone()))
                    .map(|l| match l {
                        Some((written, _)) => json!({ "limit": written }).to_string(),
                        None => json!({ "removed": true }).to_string(),
                    });
                vec![(limit_field(key, category), v)]
            }
            Change::AddBoost { id, .. } | Change::RemoveBoost { id } => {
                let v = self.boosts.get(id).map(boost_value);
                vec![(boost_field(id), v)]
            }
        }
    }

    fn key_value(&self, key: &str) -> Option<String> {
        self.keys.get(key).map(|s| match s {
            KeyState::Put { tier, account } => {
                json!({ "tier": tier, "account": account }).to_string()
            }
            KeyState::Revoked => json!({ "revoked": true }).to_string(),
        })
    }

    /// The fields of a key's custom limits and boosts (which a revocation
    /// removes with it).
    pub(crate) fn fields_of_key(&self, key: &str) -> Vec<String> {
        let limits = self
            .limits
            .keys()
            .filter(|(k, _)| k == key)
            .map(|(k, c)| limit_field(k, c));
        let boosts = self
            .boosts
            .iter()
            .filter(|(_, b)| matches!(&b.target, BoostTarget::Key(k) if k == key))
            .map(|(id, _)| boost_field(id));
        limits.chain(boosts).collect()
    }

    /// The state a store holds: fields and their JSON values. Entries that
    /// cannot be read are skipped and logged (never fatal).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_fields(fields: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut state = OperatorState::default();
        let mut later = Vec::new();
        for (field, value) in fields {
            match state.read_field(&field, &value) {
                Ok(Some(change)) => later.push(change),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    entry = %redact_field(&field),
                    error = %e,
                    "an operator change in the shared store cannot be read; skipped"
                ),
            }
        }
        // Keys first (a revocation drops the key's limits and boosts).
        later.sort_by_key(|c| !matches!(c, Change::PutKey { .. } | Change::RevokeKey { .. }));
        for c in &later {
            let revoked = match c {
                Change::PutLimit { key, .. } | Change::RemoveLimit { key, .. } => {
                    matches!(state.keys.get(key), Some(KeyState::Revoked))
                }
                Change::AddBoost { boost, .. } => matches!(
                    &boost.target,
                    BoostTarget::Key(k) if matches!(state.keys.get(k), Some(KeyState::Revoked))
                ),
                _ => false,
            };
            if !revoked {
                state.make(c);
            }
        }
        state
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn read_field(&self, field: &str, value: &str) -> Result<Option<Change>, String> {
        let path: Vec<String> =
            serde_json::from_str(field).map_err(|_| "not an entry name".to_owned())?;
        let v: Value = serde_json::from_str(value).map_err(|e| e.to_string())?;
        let s = |name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
        match path.as_slice() {
            [kind, key] if kind == "key" => {
                if v.get("revoked").and_then(Value::as_bool) == Some(true) {
                    return Ok(Some(Change::RevokeKey { key: key.clone() }));
                }
                let tier = s("tier").ok_or("no tier")?;
                Ok(Some(Change::PutKey {
                    key: key.clone(),
                    tier,
                    account: s("account"),
                }))
            }
            [kind, key, category] if kind == "limit" => {
                if v.get("removed").and_then(Value::as_bool) == Some(true) {
                    return Ok(Some(Change::RemoveLimit {
                        key: key.clone(),
                        category: category.clone(),
                    }));
                }
                let written = v.get("limit").cloned().ok_or("no limit")?;
                let adjust = crate::policy::parse_adjust_json(&written)?;
                Ok(Some(Change::PutLimit {
                    key: key.clone(),
                    category: category.clone(),
                    written,
                    adjust,
                }))
            }
            [kind, id] if kind == "boost" => {
                let written = v.get("adjust").cloned().ok_or("no adjust")?;
                let adjust = crate::policy::parse_adjust_json(&written)?;
                let target = match (s("key"), s("tier")) {
                    (Some(k), None) => BoostTarget::Key(k),
                    (None, Some(t)) => BoostTarget::Tier(t),
                    _ => return Err("a boost names a key or a tier".into()),
                };
                let time = |name: &str| {
                    v.get(name)
                        .and_then(Value::as_u64)
                        .ok_or(format!("no {name}"))
                };
                Ok(Some(Change::AddBoost {
                    id: id.clone(),
                    boost: BoostEntry {
                        target,
                        category: s("category"),
                        written,
                        adjust,
                        start: time("start")?,
                        end: time("end")?,
                    },
                }))
            }
            _ => Ok(None),
        }
    }
}

fn key_field(key: &str) -> String {
    json!(["key", key]).to_string()
}

fn limit_field(key: &str, category: &str) -> String {
    json!(["limit", key, category]).to_string()
}

pub(crate) fn boost_field(id: &str) -> String {
    json!(["boost", id]).to_string()
}

fn boost_value(b: &BoostEntry) -> String {
    b.json(str::to_owned).to_string()
}

/// A store field with its key redacted (for logs).
fn redact_field(field: &str) -> String {
    match serde_json::from_str::<Vec<String>>(field) {
        Ok(path) => match path.as_slice() {
            [kind, key, rest @ ..] if kind == "key" || kind == "limit" => {
                let mut s = format!("{kind} {}", crate::KeyId::of(key).redacted());
                for r in rest {
                    s.push(' ');
                    s.push_str(r);
                }
                s
            }
            [kind, id] => format!("{kind} {id}"),
            _ => "?".to_owned(),
        },
        Err(_) => "?".to_owned(),
    }
}

/// Where operator state is shared between instances (Redis).
///
/// A write that the store runs late (after its caller gave up on the
/// answer: a paused or stalled server runs its queue when it resumes)
/// must change nothing: an `Err` from [`write`](Self::write) means nothing
/// changed, then or later.
pub(crate) trait StateStore: Send + Sync {
    /// Writes the fields (a `None` value deletes the field) and moves the
    /// version, in one step; the new stamp.
    fn write(&self, fields: Vec<(String, Option<String>)>) -> BoxFuture<Result<Stamp, String>>;
    /// Every field, and the stamp they are at.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn load(&self) -> BoxFuture<Result<Loaded, String>>;
    /// The stamp now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn version(&self) -> BoxFuture<Result<Stamp, String>>;
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A store's whole state: its stamp and its fields.
pub(crate) type Loaded = (Stamp, Vec<(String, String)>);

/// Where a shared state is: an epoch chosen when the state was created and
/// a version moved by every write. A store that lost its data (a Redis
/// restart without persistence, a flush) starts a new epoch, so an
/// instance that saw version 5 of the old state never takes version 5 of
/// the new one for the same state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) epoch: String,
    pub(crate) version: u64,
}

impl Stamp {
    /// Reads `EPOCH VERSION` (the epoch may be empty: no state yet).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn parse(s: &str) -> Result<Stamp, String> {
        let (epoch, version) = s
            .rsplit_once(' ')
            .ok_or_else(|| "a stamp that is not 'EPOCH VERSION'".to_owned())?;
        let version = version
            .parse()
            .map_err(|_| "a version that is not a number".to_owned())?;
        Ok(Stamp {
            epoch: epoch.to_owned(),
            version,
        })
    }

    /// Whether `self` is the one write after `prev`.
    fn follows(&self, prev: &Stamp) -> bool {
        self.epoch == prev.epoch && self.version == prev.version + 1
    }
}

/// The base policy and the operator state, under one lock.
struct Layered {
    base: Arc<Policy>,
    state: OperatorState,
    /// The store's stamp the state was loaded at (default: none).
    stamp: Stamp,
}

/// The policy in force, as layers: what [`PolicyHandle`](crate::PolicyHandle)
/// and the admin service change.
pub(crate) struct Plane {
    layered: Mutex<Layered>,
    pub(crate) view: Arc<ViewSlot>,
    store: OnceLock<Arc<dyn StateStore>>,
    unix_clock: Option<crate::admission::UnixClock>,
}

impl fmt::Debug for Plane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plane")
            .field("shared", &self.store.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Plane {
    pub(crate) fn new(
        policy: Policy,
        view: Arc<ViewSlot>,
        unix_clock: Option<crate::admission::UnixClock>,
    ) -> Self {
        Plane {
            layered: Mutex::new(Layered {
                base: Arc::new(policy),
                state: OperatorState::default(),
                stamp: Stamp::default(),
            }),
            view,
            store: OnceLock::new(),
            unix_clock,
        }
    }

    pub(crate) fn now(&self) -> u64 {
        match &self.unix_clock {
            Some(c) => c(),
            None => crate::time::unix_now_secs(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Layered> {
        self.layered.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compiles `l` and swaps it in.
    fn publish(&self, l: &Layered) {
        let policy = l.state.apply(&l.base, self.now());
        self.view.store(Arc::new(PolicyView::new(Arc::new(policy))));
    }

    /// Replaces the base policy (a file reload); the operator state stays.
    pub(crate) fn replace_base(&self, policy: Policy) {
        let mut l = self.lock();
        l.base = Arc::new(policy);
        self.publish(&l);
    }

    /// Edits the base policy; on error nothing changes.
    pub(crate) fn update_base(
        &self,
        edit: impl FnOnce(PolicyBuilder) -> PolicyBuilder,
    ) -> Result<(), PolicyError> {
        let mut l = self.lock();
        let next = edit(l.base.to_builder()).build()?;
        l.base = Arc::new(next);
        self.publish(&l);
        Ok(())
    }

    /// The base policy (without operator changes).
    pub(crate) fn base(&self) -> Arc<Policy> {
        Arc::clone(&self.lock().base)
    }

    /// A copy of the operator state.
    pub(crate) fn state(&self) -> OperatorState {
        self.lock().state.clone()
    }

    /// Checks `change` against the policy in force: the error a policy
    /// build gives (naming the entry), if any.
    pub(crate) fn check(&self, change: &Change) -> Result<(), PolicyError> {
        let l = self.lock();
        let next = l.state.with(change);
        next.builder(l.base.to_builder(), self.now(), &|_| true)
            .build()
            .map(drop)
    }

    /// Makes `change`: in the shared store first if there is one (every
    /// instance then applies it), and here.
    pub(crate) async fn make(&self, change: Change) -> Result<(), String> {
        if let Some(store) = self.store.get() {
            let fields = {
                let l = self.lock();
                let mut fields = l.state.with(&change).entry_of(&change);
                if let Change::RevokeKey { key } = &change {
                    // The key's custom limits and boosts go with it.
                    fields.extend(l.state.fields_of_key(key).into_iter().map(|f| (f, None)));
                }
                fields
            };
            let stamp = store.write(fields).await?;
            let mut l = self.lock();
            l.state.make(&change);
            // Applied here at once; the next poll reloads only if another
            // change came in between (or the store started a new epoch).
            if stamp.follows(&l.stamp) {
                l.stamp = stamp;
            }
            self.publish(&l);
            return Ok(());
        }
        let mut l = self.lock();
        l.state.make(&change);
        // Ended boosts leave the state with the next change.
        let now = self.now();
        l.state.drop_ended(now);
        self.publish(&l);
        Ok(())
    }

    /// Removes boosts that have ended (from the store too, if shared).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) async fn expire_boosts(&self) {
        let ended = self.lock().state.ended(self.now());
        for id in ended {
            let _ = self.make(Change::RemoveBoost { id }).await;
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Shares operator state through `store`: loads it all now, then
    /// follows its version (see [`sync`](Self::sync)).
    pub(crate) async fn share(&self, store: Arc<dyn StateStore>) -> Result<(), String> {
        let (stamp, fields) = store.load().await?;
        {
            let mut l = self.lock();
            l.state = OperatorState::from_fields(fields);
            l.stamp = stamp;
            self.publish(&l);
        }
        let _ = self.store.set(store);
        Ok(())
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// One step of following the store: reloads the whole state when its
    /// stamp changed (a write, or a store that lost its data and started
    /// again), and removes ended boosts.
    pub(crate) async fn sync(&self) -> Result<(), String> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let stamp = store.version().await?;
        if stamp != self.lock().stamp {
            let (stamp, fields) = store.load().await?;
            let mut l = self.lock();
            l.state = OperatorState::from_fields(fields);
            l.stamp = stamp;
            self.publish(&l);
        } else {
            // Ended boosts leave the policy in force by themselves; this
            // keeps the state (and the store) from growing.
            let now = self.now();
            if !self.lock().state.ended(now).is_empty() {
                self.expire_boosts().await;
            }
        }
        Ok(())
    }
}
