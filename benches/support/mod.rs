//! Routers shared by the benches: the same work for every row (same
//! quota, key from the same `X-API-Key` header, rate-limit headers on).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{HeaderValue, Request};

/// Big enough that nothing is refused during a run: every row measures the
/// allowed path, the one every successful request takes.
pub const MAX: u32 = 1_000_000_000;

/// The keys as `X-API-Key` header values.
pub fn header_values(keys: &[String]) -> Vec<HeaderValue> {
    keys.iter().map(|k| k.parse().unwrap()).collect()
}

pub fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("key-{i:08}-abcdefghijklmnop"))
        .collect()
}

pub fn bare() -> Router {
    Router::new().route("/v1/account", get(|| async { "{}" }))
}

/// The benches' policy: one tier, the quota above, every key listed.
pub fn policy(keys: &[String]) -> tierlimit::Policy {
    let mut toml = format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"{MAX}/hour\"\nwrite = \"{MAX}/hour\"\n[keys]\n"
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    tierlimit::Policy::from_toml_str(&toml).unwrap()
}

pub fn tierlimit(keys: &[String]) -> Router {
    bare().layer(tierlimit::RateLimitLayer::new(policy(keys)))
}

/// Token metering on `read` (a request limit and a token limit, both too
/// large to refuse): the handler reports 10 tokens through its meter, and
/// the layer settles the difference with the estimate of 1.
pub fn tierlimit_tokens(keys: &[String]) -> Router {
    let mut toml = format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = {{ requests = \"{MAX}/hour\", tokens = \"{MAX}/hour\" }}\nwrite = \"{MAX}/hour\"\n[keys]\n"
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    let policy = tierlimit::Policy::from_toml_str(&toml).unwrap();
    Router::new()
        .route(
            "/v1/account",
            get(
                |axum::Extension(meter): axum::Extension<tierlimit::meter::TokenMeter>| async move {
                    meter.add(10);
                    "{}"
                },
            ),
        )
        .layer(tierlimit::RateLimitLayer::new(policy))
}

/// A concurrency limit on `read` (beside its request limit, both too large
/// to refuse): every request takes a lease at admission and gives it back
/// when its body ends.
pub fn tierlimit_concurrency(keys: &[String]) -> Router {
    let mut toml = format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = {{ requests = \"{MAX}/hour\", concurrency = 1000 }}\nwrite = \"{MAX}/hour\"\n[keys]\n"
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    let policy = tierlimit::Policy::from_toml_str(&toml).unwrap();
    Router::new()
        .route("/v1/account", get(|| async { "{}" }))
        .layer(tierlimit::RateLimitLayer::new(policy))
}

/// The same, with two limits on every category (a burst guard and a
/// budget, both too large to refuse): the all-or-nothing path.
pub fn tierlimit_two_limits(keys: &[String]) -> Router {
    let mut toml = format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = [\"{MAX}/hour\", \"{MAX}/day\"]\nwrite = \"{MAX}/hour\"\n[keys]\n"
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    let policy = tierlimit::Policy::from_toml_str(&toml).unwrap();
    bare().layer(tierlimit::RateLimitLayer::new(policy))
}

/// A layer that does nothing but hold an `Arc`, as every real layer does:
/// what axum's `Router::layer` costs any layer by itself (a router called
/// directly turns its handler into a route per request, cloning the boxed
/// layer, and boxes the layered future).
pub fn noop_layer() -> Router {
    let state = Arc::new(());
    bare().layer(tower::util::MapResponseLayer::new(
        move |r: axum::response::Response| {
            let _ = &state;
            r
        },
    ))
}

/// The no-op layer writing the first `n` of the four `X-RateLimit-*`
/// fields with static values: what inserting those fields costs any layer
/// (hashing each custom name and placing it in the response's map), the
/// floor under a rate limiter's headers. tower_governor writes the first
/// two, tierlimit all four.
pub fn fields_layer(n: usize) -> Router {
    use http::HeaderName;
    // Constants, built in place: cloning a `static` name stalls on store
    // forwarding (tierlimit's own names are constants for that reason).
    const NAMES: [HeaderName; 4] = [
        HeaderName::from_static("x-ratelimit-limit"),
        HeaderName::from_static("x-ratelimit-remaining"),
        HeaderName::from_static("x-ratelimit-reset"),
        HeaderName::from_static("x-ratelimit-window"),
    ];
    let state = Arc::new(());
    bare().layer(tower::util::MapResponseLayer::new(
        move |mut r: axum::response::Response| {
            let _ = &state;
            for name in NAMES.into_iter().take(n) {
                r.headers_mut()
                    .insert(name, HeaderValue::from_static("1000"));
            }
            r
        },
    ))
}

/// tierlimit on a route the policy exempts: the layer's skeleton alone.
pub fn tierlimit_exempt(keys: &[String]) -> Router {
    let mut toml = format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"{MAX}/hour\"\nwrite = \"{MAX}/hour\"\n[[routes]]\npath = \"/v1/account\"\nexempt = true\n[keys]\n"
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    bare().layer(tierlimit::RateLimitLayer::new(
        tierlimit::Policy::from_toml_str(&toml).unwrap(),
    ))
}

/// tierlimit writing no header: the decision alone.
pub fn tierlimit_no_headers(keys: &[String]) -> Router {
    bare().layer(
        tierlimit::RateLimitLayer::builder(policy(keys))
            .headers(tierlimit::HeaderOptions::default().x_ratelimit(false))
            .build(),
    )
}

/// The benches' policy with no key listed: every caller is a guest, given
/// the tier by the policy's rule for unknown keys.
pub fn guest_policy() -> tierlimit::Policy {
    let toml = format!(
        "categories = [\"read\", \"write\"]\n[defaults]\nunknown_key = \"free\"\n[tiers.free]\nread = \"{MAX}/hour\"\nwrite = \"{MAX}/hour\"\n"
    );
    tierlimit::Policy::from_toml_str(&toml).unwrap()
}

/// tierlimit with every caller a guest (the keys are listed nowhere).
pub fn tierlimit_guests() -> Router {
    bare().layer(tierlimit::RateLimitLayer::new(guest_policy()))
}

/// tierlimit with every caller a guest, writing no header.
pub fn tierlimit_guests_no_headers() -> Router {
    bare().layer(
        tierlimit::RateLimitLayer::builder(guest_policy())
            .headers(tierlimit::HeaderOptions::default().x_ratelimit(false))
            .build(),
    )
}

#[derive(Clone)]
pub struct HeaderKey;

impl tower_governor::key_extractor::KeyExtractor for HeaderKey {
    type Key = String;
    fn extract<T>(&self, req: &Request<T>) -> Result<String, tower_governor::GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

/// tower_governor's builder on the benches' quota and key.
pub fn governor_builder() -> tower_governor::governor::GovernorConfigBuilder<
    HeaderKey,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
> {
    tower_governor::governor::GovernorConfigBuilder::default()
        .period(Duration::from_secs(3600) / MAX)
        .burst_size(MAX)
        .key_extractor(HeaderKey)
}

pub fn tower_governor() -> Router {
    let config = governor_builder().use_headers().finish().unwrap();
    bare().layer(tower_governor::GovernorLayer::new(Arc::new(config)))
}

/// tower_governor writing no header: the decision alone.
pub fn tower_governor_no_headers() -> Router {
    let config = governor_builder().finish().unwrap();
    bare().layer(tower_governor::GovernorLayer::new(Arc::new(config)))
}

pub fn tower_rate_tier(keys: &[String]) -> Router {
    let tiers: Arc<HashMap<String, String>> = Arc::new(
        keys.iter()
            .map(|k| (k.clone(), "free".to_owned()))
            .collect(),
    );
    let rate_tier = tower_rate_tier::RateTier::builder()
        .tier(
            "free",
            tower_rate_tier::Quota::with_window(MAX, Duration::from_secs(3600)),
        )
        .build();
    let layer = tower_rate_tier::TierLimitLayer::new(rate_tier).identifier_fn(move |h| {
        let key = h.get("x-api-key")?.to_str().ok()?;
        let tier = tiers.get(key)?;
        Some(tower_rate_tier::TierIdentity::new(key, tier.as_str()))
    });
    bare().layer(layer)
}

pub fn request(key: &HeaderValue) -> Request<Body> {
    let mut req = Request::get("/v1/account").body(Body::empty()).unwrap();
    req.headers_mut().insert("x-api-key", key.clone());
    req
}
