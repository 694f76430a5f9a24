//! Tiered, keyed GCRA rate limiting for axum and tonic.
//!
//! `tierlimit` is one tower middleware, [`RateLimitLayer`], that limits each
//! request by **API key**, **plan tier** (free / pro / enterprise) and
//! **endpoint category** (read, write, AI, training jobs…), with GCRA
//! through [`governor`] in memory by default. Every limited response
//! carries `X-RateLimit-Limit`, `-Remaining`, `-Reset` and `-Window`;
//! refusals are HTTP 429 with a problem+json body, or gRPC
//! `RESOURCE_EXHAUSTED` when the request speaks gRPC.
//!
//! # Quick start (axum)
//!
//! ```
//! use axum::{Router, routing::{get, post}};
//! use tierlimit::{Policy, RateLimitLayer};
//!
//! let policy = Policy::from_toml_str(r#"
//!     categories = ["read", "write", "ai"]
//!
//!     [tiers.free]
//!     read = "100/hour"
//!     write = "20/hour"
//!     ai = "50/hour"
//!
//!     [tiers.pro]
//!     read = "1000/hour"
//!     write = "200/hour"
//!     ai = "unlimited"
//!
//!     [[routes]]
//!     path = "/v1/ai/*"
//!     category = "ai"
//!
//!     [keys]
//!     "free-demo-key" = "free"
//!     "pro-demo-key" = "pro"
//! "#)?;
//!
//! let app: Router = Router::new()
//!     .route("/v1/account", get(|| async { "{}" }))
//!     .route("/v1/ai/completions", post(|| async { "{}" }))
//!     .layer(RateLimitLayer::new(policy));
//! # Ok::<(), tierlimit::PolicyError>(())
//! ```
//!
//! # The request path
//!
//! ```text
//! request ─► Policy::classify (method, path → category, cost) ─► Extractor (→ Identity)
//!         ─► tier (key table, resolver, or the policy's default) ─► Rule (Limit | Unlimited)
//!         ─► Backend::check(Subject, Limit) ─► Decision ─► inner service + headers | 429
//! ```
//!
//! - [`Policy`]: tiers × categories → [`Rule`], routes → categories, keys →
//!   tiers. Names are interned to [`TierId`] / [`CategoryId`] when built.
//! - [`Extractor`]: the caller's [`Identity`] ([`ApiKey`], [`PeerIp`],
//!   [`FromExtension`], [`GlobalKey`], or a closure).
//! - [`Backend`]: [`MemoryBackend`] (governor, bounded memory).
//! - [`Decision`]: allowed, limit, remaining, reset, retry-after, window.
//!
//! # Semantics
//!
//! A limit of `max` per `per` admits `max` requests at once, then one every
//! `per / max` (governor's GCRA). `X-RateLimit-Remaining` is the burst
//! capacity left; `X-RateLimit-Reset` is when the bucket is full again;
//! `Retry-After` is when the refused request would conform. Seconds are
//! rounded up, never down, and `Retry-After` is at least 1.

#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod backend;
#[cfg(feature = "client")]
pub mod client;
pub mod extract;
mod future;
mod key;
mod layer;
pub mod policy;
mod response;
mod service;
pub mod telemetry;
mod usage;

pub use backend::{Backend, BackendError, Decision, MemoryBackend, MemoryBackendBuilder, Subject};
#[cfg(feature = "redis")]
pub use backend::{
    BackendState, FailurePolicy, RedisBackend, RedisBackendBuilder, RedisSetupError,
};
pub use extract::{
    ApiKey, Extractor, FromExtension, GlobalKey, Identity, IpNet, PeerIp, Priority, Rejection,
    RequestRef,
};
pub use future::ResponseFuture;
pub use key::{
    KEY_SECRET_ENV, KeyId, KeySecretError, Redacted, key_secret_is_shared, set_key_secret,
};
pub use layer::{PolicyHandle, RateLimitLayer, RateLimitLayerBuilder, UnixClock};
pub use policy::{
    CategoryId, KeyRule, Limit, Policy, PolicyBuilder, PolicyError, Route, Rule, Target, Tier,
    TierId,
};
pub use response::{HeaderOptions, ResponseBody};
pub use service::RateLimit;
pub use usage::UsageService;

/// Re-exported so users name the same clocks the backend takes.
pub use governor;

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
