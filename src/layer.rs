//! [`RateLimitLayer`] and its builder.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tower_layer::Layer;

use crate::backend::{Backend, MemoryBackend};
use crate::extract::{ApiKey, Extractor, PeerIp};
use crate::policy::Policy;
use crate::response::HeaderOptions;
use crate::service::RateLimit;

/// What every clone of the service shares.
pub(crate) struct Shared<E, B> {
    pub(crate) extractor: E,
    pub(crate) backend: B,
    pub(crate) policy: Arc<ArcSwap<Policy>>,
    pub(crate) anonymous: PeerIp,
    pub(crate) headers: HeaderOptions,
}

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
        }
    }
}

impl<E, B> RateLimitLayer<E, B> {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.policy.load_full()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.shared.backend
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
        }
    }

    /// How callers without a key are identified when the policy's
    /// `missing_key` names a tier (default: the connection's peer address,
    /// no proxy trusted).
    pub fn anonymous(mut self, peer: PeerIp) -> Self {
        self.anonymous = peer;
        self
    }

    /// Which header fields are written.
    pub fn headers(mut self, headers: HeaderOptions) -> Self {
        self.headers = headers;
        self
    }

    /// Builds the layer.
    pub fn build(self) -> RateLimitLayer<E, B> {
        RateLimitLayer {
            shared: Arc::new(Shared {
                extractor: self.extractor,
                backend: self.backend,
                policy: Arc::new(ArcSwap::from_pointee(self.policy)),
                anonymous: self.anonymous,
                headers: self.headers,
            }),
        }
    }
}
