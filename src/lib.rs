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
//!         ─► limits (the cell's, custom limits, boosts) ─► one Check (charges, token charges, leases)
//!         ─► Backend::check(&Check) ─► Decision
//!         ─► allowed: inner service, then headers │ refused, rejected or unavailable: the layer answers
//! ```
//!
//! One private module, `admission`, owns that path; the service, its
//! future, the layer and the usage service call it and nothing else calls
//! them. A backend that answers at once (memory) is resolved in `call`; one
//! that needs a round trip (Redis) carries an owned context into the
//! response future and is resolved there by the same code.
//! `ARCHITECTURE.md`, beside the sources, has the module map.
//!
//! - [`Policy`]: tiers × categories → limits, routes → categories, keys →
//!   tiers. Names are interned to [`policy::TierId`] /
//!   [`policy::CategoryId`] when built. The policy knows nothing of headers
//!   or metrics: the layer compiles those per cell into a view it swaps
//!   together with the policy.
//! - [`Extractor`]: the caller's [`extract::Identity`] ([`ApiKey`],
//!   [`PeerIp`], [`FromExtension`], [`GlobalKey`], or a closure).
//! - [`backend::Backend`]: [`MemoryBackend`] (bounded memory), and
//!   `RedisBackend` (feature `redis`).
//! - [`backend::Decision`]: allowed, limit, remaining, reset, retry-after,
//!   window.
//!
//! # Words
//!
//! One word per concept, in the code, the docs, the metrics and the admin
//! API.
//!
//! | word | means |
//! |---|---|
//! | *cell* | one tier × category pair of the policy's table, with its limits |
//! | *rule* | a cell's first [`Limit`] or `Unlimited`, after custom limits and boosts |
//! | *check* | one `Backend::check` of a [`backend::Check`]: every limit that applies to one request, decided at once, all or nothing (a request under one limit is a check of one charge); a *peek* counts nothing |
//! | *charge* | one limit of a check, and what the request takes of it (its cost, or a token estimate) |
//! | *decision* | a backend's answer ([`backend::Decision`]): allowed, or not and when to retry |
//! | *binding limit* | of several, the one the headers describe: fewest remaining on an allow, longest wait on a refusal |
//! | *settle* | after a response: a backend's debt or refund on a request's charges ([`backend::Adjustment`], `Backend::settle`) — and nothing else |
//! | *outcome* | what the layer does with a decision: the inner service with headers, or an answer |
//! | *custom limit* | a key's own limits in a category, in place of its tier's: `[custom_limits]` in the file (`[overrides]` is read too), [`PolicyBuilder::custom_limit`], `…/custom-limits` in the admin API; an [`policy::Adjust`] says how (a limit, a list, `x5`, `unlimited`) |
//! | *boost* | a custom limit or a tier's adjustment in force between two times |
//! | *account* | what a key's per-account limits are counted under ([`extract::Identity::with_account`]); a key without one is its own |
//! | *lease* | one of a concurrency limit's slots, held by a request in flight ([`backend::Lease`], [`response::LeaseGuard`]) from admission until its response body ends or is dropped |
//! | *refusal* | a limit's answer: 429, or gRPC `RESOURCE_EXHAUSTED` (a rate, token or concurrency limit) |
//! | *rejection* | a client mistake ([`extract::Rejection`], or a cost no limit could ever admit): 400 or 401 |
//! | *unavailable* | the backend could not decide (fail-closed, or a backend's error): 503, gRPC `UNAVAILABLE` |
//! | *answer* | whatever the layer sends instead of the inner service: a refusal, a rejection, or unavailable |
//! | *usage event* | one admitted request, settled, as the [usage feed](feed) sends it to billing ([`feed::UsageEvent`]): refused, rejected, unavailable and shed requests have none |
//! | *known* caller | a listed key, a resolved one, or an identity from an auth layer ([`extract::Identity::is_known`]); others are *guests* |
//!
//! # Where things are
//!
//! The root holds what the quick starts and the common extensions name:
//! the layer, the policy and its builder parts, the built-in extractors,
//! the two backends, [`HeaderOptions`] and the errors. The rest lives in
//! modules named for what they hold: [`policy`], [`extract`], [`backend`],
//! [`key`], [`layer`] (the tower types and the policy handle's clock),
//! [`response`], [`meter`], [`usage`], [`feed`], [`admin`],
//! [`telemetry`], and with their features `watch`, `client` and `envoy`
//! (Envoy's rate limit service, a second front on the same engine).

//! # Semantics
//!
//! A limit of `max` per `per` admits `max` requests at once, then one every
//! `per / max` (governor's GCRA). `X-RateLimit-Remaining` is the burst
//! capacity left; `X-RateLimit-Reset` is when the bucket is full again;
//! `Retry-After` is when the refused request would conform. Seconds are
//! rounded up, never down, and `Retry-After` is at least 1.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
mod admission;
pub mod backend;
mod calendar;
#[cfg(feature = "client")]
pub mod client;
mod decision;
#[cfg(feature = "envoy")]
pub mod envoy;
pub mod extract;
pub mod feed;
mod future;
pub mod key;
pub mod layer;
mod lease;
mod limit;
pub mod meter;
mod overload;
mod plane;
pub mod policy;
mod proto;
pub mod response;
mod service;
pub mod telemetry;
mod time;
pub mod usage;
mod view;
#[cfg(feature = "watch")]
pub mod watch;

pub use backend::MemoryBackend;
#[cfg(feature = "redis")]
pub use backend::{RedisBackend, RedisSetupError};
pub use extract::{ApiKey, Extractor, FromExtension, GlobalKey, PeerIp};
pub use key::set_key_secret;
pub use layer::{PolicyHandle, RateLimitLayer, RateLimitLayerBuilder};
pub use policy::{Limit, Policy, PolicyBuilder, PolicyError, Route, Tier};
pub use response::HeaderOptions;

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
#[cfg(all(doctest, feature = "envoy"))]
#[doc = include_str!("../docs/envoy.md")]
struct EnvoyDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/overload.md")]
struct OverloadDoctests;
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../docs/batches.md")]
struct BatchesDoctests;
