//! [`RateLimitLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tower_layer::Layer;

use crate::admission::Shared;
use crate::backend::{Backend, MemoryBackend};
use crate::extract::{ApiKey, Extractor, PeerIp};
use crate::feed::UsageFeed;
pub use crate::future::ResponseFuture;
pub use crate::plane::OperatorStateError;
use crate::plane::Plane;
use crate::policy::{Policy, PolicyBuilder, PolicyError};
use crate::response::HeaderOptions;
pub use crate::service::RateLimit;
pub use crate::time::UnixClock;
use crate::view::{PolicyView, ViewSlot};

/// A tower [`Layer`] that rate-limits requests by key, tier and category.
///
/// Not to be confused with `tower::limit::RateLimitLayer`, which limits a
/// whole service in `poll_ready` and is not keyed. This one checks in
/// `call`, so it is correct under axum and tonic, which clone services.
///
/// ```
/// use axum::{Router, routing::get};
/// use tierlimit::{Policy, RateLimitLayer};
///
/// let policy = Policy::from_toml_str(r#"
///     categories = ["read", "write"]
///     [tiers.free]
///     read = "100/hour"
///     write = "20/hour"
///     [keys]
///     "free-demo-key" = "free"
/// "#).unwrap();
///
/// let app: Router = Router::new()
///     .route("/v1/things", get(|| async { "[]" }))
///     .layer(RateLimitLayer::new(policy));
/// ```
#[must_use]
pub struct RateLimitLayer<E = ApiKey, B = MemoryBackend> {
    shared: Arc<Shared<E, B>>,
}

impl<E, B> Clone for RateLimitLayer<E, B> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<E, B: fmt::Debug> fmt::Debug for RateLimitLayer<E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("backend", &self.shared.backend)
            .field("headers", &self.shared.headers)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// API keys from `Authorization: Bearer` / `X-API-Key`, state in memory.
    pub fn new(policy: Policy) -> Self {
        Self::builder(policy).build()
    }

    /// Configures a layer.
    pub fn builder(policy: Policy) -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            policy,
            extractor: ApiKey::new(),
            backend: MemoryBackend::new(),
            anonymous: PeerIp::new(),
            headers: HeaderOptions::default(),
            unix_clock: None,
            feed: None,
        }
    }
}

impl<E, B> RateLimitLayer<E, B> {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.shared.view.load().policy)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    /// A handle to change the policy at run time. Every handle of a layer
    /// shares one edit lock, so concurrent updates never lose one another.
    pub fn policy_handle(&self) -> PolicyHandle {
        PolicyHandle {
            plane: Arc::clone(&self.shared.plane),
        }
    }

    /// A service that reports the caller's usage without counting it.
    pub fn usage_service(&self) -> crate::usage::UsageService<E, B> {
        crate::usage::UsageService::new(Arc::clone(&self.shared))
    }

    /// The operator API ([`AdminService`](crate::admin::AdminService)): keys,
    /// custom limits, boosts and usage checks, layered over the base
    /// policy. Give it at least one token; mount it outside this layer.
    pub fn admin_service(&self) -> crate::admin::AdminService<E, B> {
        crate::admin::AdminService::new(Arc::clone(&self.shared))
    }

    /// The engine every front of this layer shares (Envoy's front builds
    /// its own from it).
    #[cfg(feature = "envoy")]
    pub(crate) fn shared(&self) -> &Arc<Shared<E, B>> {
        &self.shared
    }

    /// Requests shadow mode let through that would have been refused.
    pub fn shadow_refusals(&self) -> u64 {
        self.shared.shadowed.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "redis")]
impl<E, B> RateLimitLayer<E, B> {
    /// Shares the operators' changes (the [admin service](Self::admin_service)'s
    /// keys, custom limits and boosts) with every instance on the same
    /// Redis, through `redis` (any backend of that Redis; usually the
    /// layer's own). Loads every change made so far before it returns, so a
    /// new instance starts with them; then follows them: a change made
    /// through any instance is written to Redis (a hash under
    /// `PREFIX:{admin}`, one field per change, and a version), published on
    /// [`RedisBackend::admin_channel`](crate::RedisBackend::admin_channel),
    /// and applied by every instance within [`OPERATOR_SYNC_INTERVAL`]
    /// (each polls the version on its Redis I/O thread, which also works
    /// on a Cluster and never misses a change the way a lost pub/sub
    /// message could). Ended boosts are removed by themselves.
    pub async fn share_operator_state(
        &self,
        redis: &crate::RedisBackend,
    ) -> Result<(), OperatorStateError> {
        let plane = &self.shared.plane;
        let link = redis.link();
        plane
            .share(Arc::new(crate::plane::RedisStore::new(link.clone())))
            .await?;
        let weak = Arc::downgrade(plane);
        link.spawn_io(async move {
            loop {
                tokio::time::sleep(OPERATOR_SYNC_INTERVAL).await;
                let Some(plane) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = plane.sync().await {
                    tracing::debug!(error = %e, "operator state not synced; retrying");
                }
            }
        });
        Ok(())
    }
}

/// How often an instance sharing operator state through Redis checks for
/// changes ([`RateLimitLayer::share_operator_state`]).
#[cfg(feature = "redis")]
pub const OPERATOR_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Changes a layer's policy at run time, atomically: each request sees the
/// whole old policy or the whole new one, an invalid policy is refused with
/// its error (the old one stays), and requests in flight are unaffected.
///
/// What a change does to capacity already used: buckets belong to a tier ×
/// category cell and a limit. A key moved to another tier (an upgrade) is
/// limited by its new tier from its next request, starting with a full
/// bucket there; a changed limit (a custom limit, a boost, a new table)
/// starts a fresh bucket too. A limit that did not change keeps its state.
///
/// ```
/// # use tierlimit::{Policy, RateLimitLayer};
/// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"1/s\"\nwrite = \"1/s\"\n[tiers.pro]\nread = \"9/s\"\nwrite = \"9/s\"").unwrap();
/// let layer = RateLimitLayer::new(policy);
/// let handle = layer.policy_handle();
/// handle.update(|b| b.set_key_tier("customer-key", "pro")).unwrap();
/// assert!(handle.update(|b| b.set_key_tier("customer-key", "gold")).is_err());
/// ```
#[derive(Clone)]
pub struct PolicyHandle {
    plane: Arc<Plane>,
}

impl fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyHandle").finish_non_exhaustive()
    }
}

impl PolicyHandle {
    /// The policy in force (the base policy with the operators' changes).
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.plane.view.load().policy)
    }

    /// The base policy: the file's (or what code built), without the
    /// operators' changes (keys, custom limits and boosts made through the
    /// admin service), which are layered over it.
    pub fn base(&self) -> Arc<Policy> {
        self.plane.base()
    }

    /// Replaces the base policy; the operators' changes stay layered over
    /// it.
    pub fn replace(&self, policy: Policy) {
        self.plane.replace_base(policy);
    }

    /// Reloads a policy file as the base policy; on error nothing changes.
    pub fn reload(&self, path: impl AsRef<std::path::Path>) -> Result<(), PolicyError> {
        let policy = Policy::from_toml_file(path)?;
        self.replace(policy);
        Ok(())
    }

    /// Edits the base policy (a custom limit, a boost, a key's tier) and
    /// swaps it in; on error nothing changes.
    pub fn update(
        &self,
        edit: impl FnOnce(PolicyBuilder) -> PolicyBuilder,
    ) -> Result<(), PolicyError> {
        self.plane.update_base(edit)
    }
}

impl<S, E, B> Layer<S> for RateLimitLayer<E, B> {
    type Service = RateLimit<S, E, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RateLimitLayer`]. Every method consumes and returns the
/// builder; those that swap a part change its type.
///
/// ```
/// use governor::clock::FakeRelativeClock;
/// use tierlimit::{FromExtension, HeaderOptions, MemoryBackend, Policy, RateLimitLayer};
/// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
///
/// let layer = RateLimitLayer::builder(policy)
///     .extractor(FromExtension)
///     .backend(MemoryBackend::builder().clock(FakeRelativeClock::default()).build())
///     .headers(HeaderOptions::default().ietf_draft(true))
///     .build();
/// # let _ = layer;
/// ```
#[must_use]
pub struct RateLimitLayerBuilder<E = ApiKey, B = MemoryBackend> {
    policy: Policy,
    extractor: E,
    backend: B,
    anonymous: PeerIp,
    headers: HeaderOptions,
    unix_clock: Option<UnixClock>,
    feed: Option<UsageFeed>,
}

impl<E: fmt::Debug, B: fmt::Debug> fmt::Debug for RateLimitLayerBuilder<E, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("extractor", &self.extractor)
            .field("backend", &self.backend)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl<E, B> RateLimitLayerBuilder<E, B> {
    /// How callers are identified (default [`ApiKey`]).
    pub fn extractor<E2: Extractor>(self, extractor: E2) -> RateLimitLayerBuilder<E2, B> {
        RateLimitLayerBuilder {
            policy: self.policy,
            extractor,
            backend: self.backend,
            anonymous: self.anonymous,
            headers: self.headers,
            unix_clock: self.unix_clock,
            feed: self.feed,
        }
    }

    /// Where state lives (default [`MemoryBackend`]).
    pub fn backend<B2: Backend>(self, backend: B2) -> RateLimitLayerBuilder<E, B2> {
        RateLimitLayerBuilder {
            policy: self.policy,
            extractor: self.extractor,
            backend,
            anonymous: self.anonymous,
            headers: self.headers,
            unix_clock: self.unix_clock,
            feed: self.feed,
        }
    }

    /// How callers without a key are identified when the policy's
    /// `missing_key` names a tier (default: the connection's peer address,
    /// no proxy trusted).
    pub fn anonymous(mut self, peer: PeerIp) -> Self {
        self.anonymous = peer;
        self
    }

    /// The Unix time (seconds) boosts are checked against (default: the
    /// system clock). Tests inject one to start and end boosts exactly.
    pub fn unix_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.unix_clock = Some(Arc::new(clock));
        self
    }

    /// Which header fields are written.
    pub fn headers(mut self, headers: HeaderOptions) -> Self {
        self.headers = headers;
        self
    }

    /// Sends one usage event per admitted request to `feed` (see
    /// [`crate::feed`]): the request's key id, account, tier, category,
    /// route, status, units, tokens and duration, when its response is
    /// over. Refused, rejected, unavailable and shed requests (every
    /// answer the layer gives itself) are not billed.
    /// Without a feed (the default) the request path makes no record.
    ///
    /// ```
    /// use tierlimit::feed::{UsageEvent, UsageFeed};
    /// use tierlimit::{Policy, RateLimitLayer};
    /// # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
    ///
    /// let feed = UsageFeed::new(|_: &[UsageEvent]| Ok(()), 1024)?;
    /// let layer = RateLimitLayer::builder(policy).usage_feed(feed).build();
    /// # let _ = layer;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn usage_feed(mut self, feed: UsageFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Builds the layer.
    pub fn build(self) -> RateLimitLayer<E, B> {
        let mut headers = self.headers;
        // With a feed, every admitted request carries its usage record
        // through an outcome that makes a plan; without one, the path
        // checks nothing more.
        headers.describe |= self.feed.is_some();
        let view = Arc::new(ViewSlot::new(PolicyView::new(Arc::new(
            self.policy.clone(),
        ))));
        RateLimitLayer {
            shared: Arc::new(Shared {
                extractor: self.extractor,
                backend: Arc::new(self.backend),
                view: Arc::clone(&view),
                plane: Arc::new(Plane::new(self.policy, view, self.unix_clock.clone())),
                anonymous: self.anonymous,
                headers,
                shadowed: Arc::new(AtomicU64::new(0)),
                unix_clock: self.unix_clock,
                feed: self.feed,
                overload: Arc::new(crate::overload::Overload::new()),
            }),
        }
    }
}
