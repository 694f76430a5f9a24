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

#[cfg(feature = "redis")]
mod redis_store;
mod state;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

#[cfg(feature = "redis")]
pub(crate) use redis_store::RedisStore;
pub(crate) use state::{BoostEntry, BoostFor, Change, OperatorState, owner_digest};

use crate::policy::{Overlay, Policy, PolicyBuilder, PolicyError};
use crate::view::{PolicyView, ViewSlot};

/// The operators' shared state could not be read or written
/// ([`RateLimitLayer::share_operator_state`](crate::RateLimitLayer::share_operator_state);
/// an admin change that meets one is answered 503, and nothing changed).
#[derive(Debug)]
#[non_exhaustive]
pub enum OperatorStateError {
    /// The store did not answer in time, or answered with an error.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The store ran the change after its deadline (it was paused or
    /// stalled while the caller waited): it changed nothing.
    Late,
    /// What the store holds could not be read: the part named.
    Malformed(&'static str),
}

impl fmt::Display for OperatorStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperatorStateError::Unavailable(e) => {
                write!(f, "the operators' shared state is unavailable: {e}")
            }
            OperatorStateError::Late => f.write_str(
                "the shared store ran the change after its deadline, so it changed nothing",
            ),
            OperatorStateError::Malformed(what) => {
                write!(f, "the operators' shared state holds an unreadable {what}")
            }
        }
    }
}

impl std::error::Error for OperatorStateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OperatorStateError::Unavailable(e) => Some(&**e),
            OperatorStateError::Late | OperatorStateError::Malformed(_) => None,
        }
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
    /// stamp, in one step; the stamps before and after the write.
    fn write(
        &self,
        fields: Vec<(String, Option<String>)>,
    ) -> BoxFuture<Result<(Stamp, Stamp), OperatorStateError>>;
    /// Every field, and the stamp they are at.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn load(&self) -> BoxFuture<Result<Loaded, OperatorStateError>>;
    /// The stamp now.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn version(&self) -> BoxFuture<Result<Stamp, OperatorStateError>>;
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A store's whole state: its stamp and its fields.
pub(crate) type Loaded = (Stamp, Vec<(String, String)>);

/// Where a shared state is: an epoch chosen anew by every write and a
/// version moved by every write. A store that lost its data (a Redis
/// restart without persistence, a flush) or went back to an older copy (a
/// snapshot restored, a lagging replica promoted) and was written again
/// never repeats a stamp an instance has seen for another state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) epoch: String,
    pub(crate) version: u64,
}

impl Stamp {
    /// Reads `EPOCH VERSION` (the epoch may be empty: no state yet).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn parse(s: &str) -> Result<Stamp, OperatorStateError> {
        let (epoch, version) = s
            .rsplit_once(' ')
            .ok_or(OperatorStateError::Malformed("stamp"))?;
        let version = version
            .parse()
            .map_err(|_| OperatorStateError::Malformed("version"))?;
        Ok(Stamp {
            epoch: epoch.to_owned(),
            version,
        })
    }
}

/// The base policy and the operator state, under one lock.
struct Layered {
    base: Arc<Policy>,
    state: OperatorState,
    /// `state` compiled over `base`, one change at a time.
    overlay: Overlay,
    /// The store's stamp the state was loaded at (default: none).
    stamp: Stamp,
}

impl Layered {
    /// Makes `change` in the state and its layer (what it touched only).
    fn make(&mut self, change: &Change, now: u64) {
        self.state.make(change);
        self.state
            .refresh(&mut self.overlay, &self.base, change, now);
    }

    /// Forgets boosts that have ended.
    fn drop_ended(&mut self, now: u64) {
        if self.state.drop_ended(now) {
            self.state
                .refresh_boosts(&mut self.overlay, &self.base, now);
        }
    }

    /// Replaces the state (loaded from a store), compiled anew.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn load(&mut self, state: OperatorState, now: u64) {
        self.overlay = state.overlay(&self.base, now);
        self.state = state;
    }

    /// Replaces the base policy; the state is compiled over it anew.
    fn rebase(&mut self, base: Policy, now: u64) {
        self.base = Arc::new(base);
        self.overlay = self.state.overlay(&self.base, now);
    }

    /// The policy in force: the base with the operators' layer.
    fn policy(&self) -> Policy {
        self.base.with_overlay(&self.overlay)
    }
}

/// The policy in force, as layers: what [`PolicyHandle`](crate::PolicyHandle)
/// and the admin service change.
pub(crate) struct Plane {
    layered: Mutex<Layered>,
    pub(crate) view: Arc<ViewSlot>,
    store: OnceLock<Arc<dyn StateStore>>,
    unix_clock: Option<crate::time::UnixClock>,
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
        unix_clock: Option<crate::time::UnixClock>,
    ) -> Self {
        Plane {
            layered: Mutex::new(Layered {
                base: Arc::new(policy),
                state: OperatorState::default(),
                overlay: Overlay::default(),
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

    /// Swaps the policy `l` gives in.
    fn publish(&self, l: &Layered) {
        self.view
            .store(Arc::new(PolicyView::new(Arc::new(l.policy()))));
    }

    /// Replaces the base policy (a file reload); the operator state stays.
    pub(crate) fn replace_base(&self, policy: Policy) {
        let mut l = self.lock();
        l.rebase(policy, self.now());
        self.publish(&l);
    }

    /// Edits the base policy; on error nothing changes.
    pub(crate) fn update_base(
        &self,
        edit: impl FnOnce(PolicyBuilder) -> PolicyBuilder,
    ) -> Result<(), PolicyError> {
        let mut l = self.lock();
        let next = edit(l.base.to_builder()).build()?;
        l.rebase(next, self.now());
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

    /// Checks `change` against the base policy's tiers, categories and
    /// cells: the error a policy build would give (naming the entry), if
    /// any. Nothing is built.
    pub(crate) fn check(&self, change: &Change) -> Result<(), PolicyError> {
        state::validate(&self.base(), change)
    }

    /// Makes `change`: in the shared store first if there is one (every
    /// instance then applies it), and here.
    pub(crate) async fn make(&self, change: Change) -> Result<(), OperatorStateError> {
        if let Some(store) = self.store.get() {
            let fields = {
                let l = self.lock();
                let mut fields = l.state.with(&change).entry_of(&change);
                if let Change::RevokeKey { key } = &change {
                    // The key's custom limits and boosts go with it.
                    fields.extend(l.state.fields_of_key(*key).into_iter().map(|f| (f, None)));
                }
                fields
            };
            let (before, stamp) = store.write(fields).await?;
            let mut l = self.lock();
            l.make(&change, self.now());
            // Applied here at once; the next poll reloads only if the store
            // was not at this state's stamp when it wrote (another change
            // came in between, or it lost or restored its data).
            if before == l.stamp {
                l.stamp = stamp;
            }
            self.publish(&l);
            return Ok(());
        }
        let mut l = self.lock();
        let now = self.now();
        l.make(&change, now);
        // Ended boosts leave the state with the next change.
        l.drop_ended(now);
        self.publish(&l);
        Ok(())
    }

    /// Removes boosts that have ended (from the store too, if shared).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) async fn expire_boosts(&self) {
        let ended = self.lock().state.ended(self.now());
        for id in ended {
            let _ = self.make(Change::ForgetBoost { id }).await;
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Shares operator state through `store`: loads it all now, then
    /// follows its version (see [`sync`](Self::sync)).
    pub(crate) async fn share(&self, store: Arc<dyn StateStore>) -> Result<(), OperatorStateError> {
        let (stamp, fields) = migrate(&*store, store.load().await?).await?;
        {
            let mut l = self.lock();
            l.load(OperatorState::from_fields(fields), self.now());
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
    pub(crate) async fn sync(&self) -> Result<(), OperatorStateError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let stamp = store.version().await?;
        if stamp != self.lock().stamp {
            let (stamp, fields) = migrate(&**store, store.load().await?).await?;
            let mut l = self.lock();
            l.load(OperatorState::from_fields(fields), self.now());
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

/// Rewrites the previous version's fields (raw keys) among `loaded` as
/// digests in the store, in one write, and loads the store again; `loaded`
/// itself when there are none.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
async fn migrate(store: &dyn StateStore, loaded: Loaded) -> Result<Loaded, OperatorStateError> {
    let rewrite = state::legacy_rewrite(&loaded.1);
    if rewrite.is_empty() {
        return Ok(loaded);
    }
    let count = rewrite.iter().filter(|(_, v)| v.is_none()).count();
    store.write(rewrite).await?;
    tracing::info!(
        fields = count,
        "operator state: entries naming raw keys rewritten as key digests"
    );
    store.load().await
}
