//! Envoy's rate limit service (`envoy.service.ratelimit.v3`, feature
//! `envoy`): Envoy, Istio, Envoy Gateway, Contour or Emissary ask
//! tierlimit, over gRPC, whether a request may pass, under the same policy,
//! operator state and backend as the layer.
//!
//! [`RateLimitServer`] is a second front on a [`RateLimitLayer`]'s engine:
//! each descriptor of a `ShouldRateLimit` call becomes one request on the
//! layer's own path (identify → limits → check → outcome), so keys, tiers,
//! accounts, several limits per category, custom limits, boosts, shadow
//! mode, the admin API, file watching and metrics all apply unchanged, and
//! the `X-RateLimit-*` headers Envoy is told to add are written by the
//! layer's code.
//!
//! ```
//! use tierlimit::{Policy, RateLimitLayer, envoy::RateLimitServer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = Policy::from_toml_str(r#"
//!     categories = ["read", "write"]
//!     [tiers.free]
//!     read = "100/hour"
//!     write = "20/hour"
//!     [keys]
//!     "free-demo-key" = "free"
//!     [envoy]
//!     domain = "api"
//! "#)?;
//! let layer = RateLimitLayer::new(policy);
//! let rls = RateLimitServer::new(&layer);
//! tonic::transport::Server::builder()
//!     .add_service(rls.into_service())
//!     .serve("127.0.0.1:8081".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Descriptors
//!
//! Each descriptor's entries are read by the keys of the policy's
//! `[envoy.descriptor_keys]` (the defaults below); entries with other keys
//! are left alone.
//!
//! | entry (default key) | means |
//! |---|---|
//! | `api_key` | the caller's API key: its tier and account from `[keys]`, the operators' keys and revocations, as the layer reads `X-API-Key` |
//! | `tier` | a tier named directly, for callers Envoy authenticated (with `api_key` or `account` as the caller) |
//! | `account` | the caller's account: per-account limits, and the caller itself when there is no key |
//! | `org` | the caller's organisation: per-organisation limits |
//! | `category` | the category, named directly (cost 1) |
//! | `method` + `path` | else the category and cost from the policy's routes (`:path`'s query is ignored) |
//! | `remote_address` | without a key: the client, under the `missing_key` tier |
//!
//! A descriptor's `hits_addend` (else the request's) is its cost: it
//! multiplies the route's cost, as an extractor's count does; 0 counts as
//! 1 (Envoy's default). Descriptors are checked one by one, each all or
//! nothing; the answer is `OVER_LIMIT` if any is, and its headers are the
//! binding descriptor's. A descriptor the policy cannot check (an unknown
//! or missing key, tier or category, a cost no limit admits, a backend
//! that could not decide under a fail-closed policy) is `OVER_LIMIT` with
//! a status naming why (`current_limit.name`, such as `unknown-api-key`)
//! and the layer's problem document as the body: never a gRPC error.
//! `docs/envoy.md` has the whole mapping and an Envoy configuration.

mod answer;
mod descriptor;
mod service;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
pub use service::RlsService;

/// Re-exported so requests are built with the same Envoy types (the
/// service's `RateLimitRequest` is
/// `envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest`).
pub use envoy_types;

use answer::{Mistake, Verdict};
use descriptor::{Descriptors, Read};

use crate::admission::{Resolved, Shared, Step, Waiting};
use crate::backend::{Backend, MemoryBackend};
use crate::layer::RateLimitLayer;
pub use crate::policy::{DescriptorKeys, EnvoySettings};
use crate::policy::{Policy, Target};
use crate::view::PolicyView;

/// The most descriptors one call may carry; beyond, each is answered
/// `OVER_LIMIT` (`too-many-descriptors`) and none is counted.
pub const MAX_DESCRIPTORS: usize = 64;

/// Envoy's rate limit service on a [`RateLimitLayer`]'s engine: its
/// policy (and its reloads), operator state, backend, header options,
/// clock and shadow counter.
///
/// Cheap to clone. Serve it with [`into_service`](Self::into_service), or
/// call [`check`](Self::check) directly.
#[must_use]
pub struct RateLimitServer<B = MemoryBackend> {
    shared: Arc<Shared<Descriptors, B>>,
}

impl<B> Clone for RateLimitServer<B> {
    fn clone(&self) -> Self {
        RateLimitServer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for RateLimitServer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitServer")
            .field("backend", &self.shared.backend)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> RateLimitServer<B> {
    /// The rate limit service of `layer`'s engine: a request through
    /// either is counted once, in the same place.
    pub fn new<E>(layer: &RateLimitLayer<E, B>) -> Self {
        let mut shared = layer.shared().with_extractor(Descriptors::default());
        // Every descriptor's status describes its limit, whichever header
        // fields the layer writes.
        shared.headers.describe = true;
        RateLimitServer {
            shared: Arc::new(shared),
        }
    }

    /// The tonic service (`envoy.service.ratelimit.v3.RateLimitService`).
    pub fn into_service(self) -> RlsService<B> {
        RlsService::new(self)
    }

    /// Requests shadow mode let through that would have been refused
    /// (shared with the layer's count).
    pub fn shadow_refusals(&self) -> u64 {
        self.shared.shadowed.load(Ordering::Relaxed)
    }

    /// Answers one `ShouldRateLimit` call (what the service does, without
    /// gRPC).
    ///
    /// ```
    /// use tierlimit::{Policy, RateLimitLayer, envoy::RateLimitServer};
    /// use tierlimit::envoy::envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    ///     RateLimitDescriptor, rate_limit_descriptor::Entry,
    /// };
    /// use tierlimit::envoy::envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let policy = Policy::from_toml_str(r#"
    ///     categories = ["read", "write"]
    ///     [tiers.free]
    ///     read = "2/hour"
    ///     write = "1/hour"
    ///     [keys]
    ///     "k1" = "free"
    /// "#).unwrap();
    /// let rls = RateLimitServer::new(&RateLimitLayer::new(policy));
    /// let entry = |k: &str, v: &str| Entry { key: k.into(), value: v.into() };
    /// let request = RateLimitRequest {
    ///     domain: "api".into(),
    ///     descriptors: vec![RateLimitDescriptor {
    ///         entries: vec![entry("api_key", "k1"), entry("category", "read")],
    ///         ..Default::default()
    ///     }],
    ///     hits_addend: 0,
    /// };
    /// let answer = rls.check(request).await;
    /// assert_eq!(answer.overall_code, 1); // OK
    /// assert_eq!(answer.statuses[0].limit_remaining, 1);
    /// # });
    /// ```
    pub async fn check(&self, request: RateLimitRequest) -> RateLimitResponse {
        let pending = match self.start(&request) {
            Ok(pending) => pending,
            Err(m) => return answer::refuse_all(m, request.descriptors.len()),
        };
        let mut verdicts = Vec::with_capacity(pending.len());
        for p in pending {
            verdicts.push(match p {
                Pending::Done(v) => v,
                Pending::Wait(waiting) => {
                    let Waiting { check, deferred } = *waiting;
                    resolved(deferred.resolve(check.await))
                }
            });
        }
        answer::respond(verdicts)
    }

    /// Every descriptor started on the policy in force (one version for
    /// all of them): answered at once, or waiting for the backend. A call
    /// the policy refuses whole (too many descriptors, another domain) is
    /// one mistake, counting nothing.
    fn start(&self, request: &RateLimitRequest) -> Result<Vec<Pending<B::Future>>, Mistake> {
        self.shared.view.with(|guard| {
            let policy: &Policy = &guard.policy;
            if request.descriptors.len() > MAX_DESCRIPTORS {
                return Err(Mistake::new(
                    "too-many-descriptors",
                    format!("a call may carry at most {MAX_DESCRIPTORS} descriptors"),
                ));
            }
            if let Some(d) = policy.envoy().domain().filter(|d| *d != request.domain) {
                tracing::debug!(domain = %request.domain.escape_debug(), "Envoy request of another domain");
                return Err(Mistake::new(
                    "unknown-domain",
                    format!("this rate limit service answers domain `{d}` only"),
                ));
            }
            let hits = request.hits_addend;
            let started = request.descriptors.iter().map(|d| {
                self.start_one(guard, d, hits)
                    .unwrap_or_else(|m| Pending::Done(Verdict::Mistake(m)))
            });
            Ok(started.collect())
        })
    }

    /// One descriptor, on the layer's path from its category on.
    fn start_one(
        &self,
        guard: &Arc<PolicyView>,
        d: &RateLimitDescriptor,
        hits: u32,
    ) -> Result<Pending<B::Future>, Mistake> {
        if d.is_negative_hits {
            // A refund: tierlimit takes none from Envoy; nothing counted.
            return Ok(Pending::Done(Verdict::Unlimited));
        }
        let policy: &Policy = &guard.policy;
        let keys = policy.envoy().descriptor_keys();
        let read = Read::new(d, keys)?;
        let (category, route_cost) = match read.target(policy, keys)? {
            Target::Exempt => return Ok(Pending::Done(Verdict::Unlimited)),
            Target::Category { category, cost } => (category, cost),
        };
        Read::served(policy, category)?;
        let cost = cost_of(d, hits);
        let req = read.request(policy, cost)?;
        let mut admitted = None;
        Ok(
            match self
                .shared
                .admit_to(guard, &req, category, route_cost, None, &mut admitted)
            {
                Step::Call => {
                    Pending::Done(resolved(admitted.map_or(Resolved::Pass, Resolved::Allow)))
                }
                Step::Answer(response) => Pending::Done(Verdict::answered(response)),
                Step::Wait(waiting) => Pending::Wait(waiting),
            },
        )
    }
}

/// A descriptor's cost: its own `hits_addend`, else the request's; 0 (or
/// unset) is 1, and more than `u32::MAX` is `u32::MAX` (which no limit
/// admits: a clear refusal, never a wrap).
fn cost_of(d: &RateLimitDescriptor, request: u32) -> u32 {
    let hits = d.hits_addend.map_or(u64::from(request), |h| h.value);
    u32::try_from(hits).unwrap_or(u32::MAX).max(1)
}

/// The verdict of an outcome: an admission's headers, or the layer's
/// answer read back. An admission's meter and leases (a custom limit may
/// add them at run time) end here: Envoy never reports what a request
/// used nor when it ends, so its token estimate stands and its leases are
/// released at once.
fn resolved(r: Resolved) -> Verdict {
    match r {
        // Nothing limits the descriptor (the service's own checks always
        // describe their decision, so a check never passes bare).
        Resolved::Pass => Verdict::Unlimited,
        Resolved::Allow(admitted) => {
            if let Some(meter) = &admitted.meter {
                meter.add(u64::from(meter.estimate()));
            }
            Verdict::Allowed(admitted.plan)
        }
        Resolved::Answer(response) => Verdict::answered(Box::new(response)),
    }
}

/// A descriptor started: answered, or waiting for the backend.
enum Pending<F> {
    Done(Verdict),
    Wait(Box<Waiting<F>>),
}
