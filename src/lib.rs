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
//! request ─► classify (method, path → category, cost) ─► identify (Extractor → Identity, tier)
//!         ─► rule (the cell's Limit | Unlimited, custom limits, boosts) ─► cost and priority
//!         ─► Backend::check(Subject, Limit) ─► Decision
//!         ─► allowed: inner service, then headers │ refused or rejected: the layer answers
//! ```
//!
//! One private module, `admission`, owns that path; the service, its
//! future, the layer and the usage service call it and nothing else calls
//! them. A backend that answers at once (memory) is settled in `call`; one
//! that needs a round trip (Redis) carries an owned context into the
//! response future and is settled there by the same code.
//!
//! - [`Policy`]: tiers × categories → [`Rule`], routes → categories, keys →
//!   tiers. Names are interned to [`TierId`] / [`CategoryId`] when built.
//!   The policy knows nothing of headers or metrics: the layer compiles
//!   those per cell into a view it swaps together with the policy.
//! - [`Extractor`]: the caller's [`Identity`] ([`ApiKey`], [`PeerIp`],
//!   [`FromExtension`], [`GlobalKey`], or a closure).
//! - [`Backend`]: [`MemoryBackend`] (governor, bounded memory), and
//!   `RedisBackend` (feature `redis`).
//! - [`Decision`]: allowed, limit, remaining, reset, retry-after, window.
//!
//! # Words
//!
//! | word | means |
//! |---|---|
//! | *cell* | one tier × category pair of the policy's table, with its rule |
//! | *rule* | a cell's [`Limit`] or `Unlimited`, after custom limits and boosts |
//! | *subject* | what a backend checks: a key's bucket in a cell, a cost, a reserve |
//! | *check* | one [`Backend::check`]: counts the request if it conforms; a *peek* counts nothing |
//! | *decision* | a backend's answer ([`Decision`]): allowed, or not and when to retry |
//! | *charge* | one limit of a request checked against several at once ([`backend::Check`]), all or nothing |
//! | *binding limit* | of several, the one the headers describe: fewest remaining on an allow, longest wait on a refusal |
//! | *account* | what a key's per-account limits are counted under ([`Identity::with_account`]); a key without one is its own |
//! | *lease* | one of a concurrency limit's slots, held by a request in flight ([`backend::Lease`], [`LeaseGuard`]) from admission until its response body ends or is dropped |
//! | *refusal* | a rate-limit answer: 429, or gRPC `RESOURCE_EXHAUSTED` (a rate, token or concurrency limit) |
//! | *rejection* | a client mistake found before any limit ([`Rejection`]): 400 or 401 |
//! | *answer* | whatever the layer sends instead of the inner service: a refusal, a rejection, a cost that never fits, an unavailable backend |
//! | *known* caller | a listed key, a resolved one, or an identity from an auth layer ([`Identity::is_known`]); others are *guests* |
//!
//! # Where things are
//!
//! Everything a user names is exported at the root; the modules group the
//! rest for the docs: [`policy`], [`extract`], [`backend`], [`telemetry`]
//! and, with feature `client`, `client` (the client side's retry layer).

//! # Semantics
//!
//! A limit of `max` per `per` admits `max` requests at once, then one every
//! `per / max` (governor's GCRA). `X-RateLimit-Remaining` is the burst
//! capacity left; `X-RateLimit-Reset` is when the bucket is full again;
//! `Retry-After` is when the refused request would conform. Seconds are
//! rounded up, never down, and `Retry-After` is at least 1.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod admin;
mod admission;
pub mod backend;
#[cfg(feature = "client")]
pub mod client;
mod decision;
pub mod extract;
mod future;
mod key;
mod layer;
mod lease;
mod meter;
mod plane;
pub mod policy;
mod proto;
mod response;
mod service;
pub mod telemetry;
mod time;
mod usage;
mod view;
#[cfg(feature = "watch")]
mod watch;

pub use admin::{ADMIN_BODY_TIMEOUT, AdminService};
pub use backend::{
    Backend, BackendError, Decision, LeaseState, MemoryBackend, MemoryBackendBuilder, Subject,
    TokenState,
};
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
#[cfg(feature = "redis")]
pub use layer::OPERATOR_SYNC_INTERVAL;
pub use layer::{PolicyHandle, RateLimitLayer, RateLimitLayerBuilder, UnixClock};
pub use meter::{TokenMeter, TokenUsage};
pub use policy::{
    Adjust, Boost, BoostTarget, CategoryId, KeyRule, Limit, Policy, PolicyBuilder, PolicyError,
    Pool, Route, Rule, Shadow, Target, Tier, TierId,
};
pub use response::{AnswerBody, HeaderOptions, LeaseGuard, Leased, ResponseBody};
pub use service::RateLimit;
pub use usage::UsageService;
#[cfg(feature = "watch")]
pub use watch::{PolicyWatcher, WATCH_DEBOUNCE};

/// Re-exported so users name the same clocks the backend takes.
pub use governor;

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// The Rust examples under `docs/`, compiled as doc tests (one item per page).
#[cfg(doctest)]
#[doc = include_str!("../docs/policy.md")]
struct PolicyDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/operations.md")]
struct OperationsDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/guarantees.md")]
struct GuaranteesDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/benchmarks.md")]
struct BenchmarksDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/comparison.md")]
struct ComparisonDoctests;
