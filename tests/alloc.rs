//! No heap allocation per allowed request once its key is tracked: through
//! the bare layer, through an axum `Router` (where the layer's response
//! body must reach axum without being boxed again), with every header on,
//! and with remaining counts and reset times too big for the static table.
//!
//! Each test counts the allocations of the same requests with and without
//! the layer, so whatever the inner service, axum or tokio allocate is
//! subtracted, and what is left is the layer's own.

use std::alloc::System;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use governor::clock::FakeRelativeClock;
use http::{Request, Response, StatusCode};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tierlimit::{HeaderOptions, MemoryBackend, Policy, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Tests in this binary share the counter: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const KEY: &str = "alloc-test-key-0001";
const N: usize = 1_000;

/// `limit` is one limit (`1000/hour`) or a TOML list of them; the key is
/// in an account, and the tier has a per-account limit when `limit` is a
/// list (the all-or-nothing path with every kind of charge).
fn policy(limit: &str) -> Policy {
    let (value, per_account) = if limit.starts_with('[') {
        (
            limit.to_owned(),
            "[tiers.free.per_account]\nread = \"2000000000/hour\"\n",
        )
    } else {
        (format!("\"{limit}\""), "")
    };
    Policy::from_toml_str(&format!(
        "categories = [\"read\", \"write\"]\n[defaults]\ntime_zone = \"Europe/London\"\n[tiers.free]\nread = {value}\nwrite = {value}\n{per_account}[keys]\n\"{KEY}\" = {{ tier = \"free\", account = \"acme\" }}\n"
    ))
    .unwrap()
}

fn requests() -> Vec<Request<Body>> {
    (0..N)
        .map(|_| {
            Request::get("/v1/account")
                .header("x-api-key", KEY)
                .body(Body::empty())
                .unwrap()
        })
        .collect()
}

/// Allocations made while `svc` answers N prepared requests (each response
/// checked and dropped), after a warm-up that tracks the key: the fewest
/// of three rounds. The counter is process-wide, so a one-off allocation
/// on another thread (the reaper's first sweep, say) could land in a
/// round; an allocation per request lands in every round.
fn allocations<S>(
    rt: &tokio::runtime::Runtime,
    mut svc: S,
    check: impl Fn(&Response<Body>),
) -> usize
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    // Warm up: the key is tracked, lazily made tables exist.
    for req in requests().into_iter().take(64) {
        let res = rt.block_on(async { svc.ready().await.unwrap().call(req).await.unwrap() });
        check(&res);
    }
    (0..3)
        .map(|_| {
            let reqs = requests();
            let region = Region::new(GLOBAL);
            for req in reqs {
                let res =
                    rt.block_on(async { svc.ready().await.unwrap().call(req).await.unwrap() });
                check(&res);
                drop(res);
            }
            region.change().allocations
        })
        .min()
        .unwrap_or(0)
}

/// Prints the counts and fails if `limited` allocated more than `baseline`.
fn assert_none_added(name: &str, limited: usize, baseline_name: &str, baseline: usize) {
    println!("{name}: {limited} allocations for {N} requests ({baseline_name}: {baseline})");
    assert!(
        limited <= baseline,
        "{name}: the layer allocated {} times in {N} allowed requests",
        limited - baseline
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn allowed_with_headers(res: &Response<Body>) {
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
    assert!(res.headers().contains_key("x-ratelimit-reset"));
}

/// The layer with a fake monotonic clock (for the backend) and a fake Unix
/// clock (for `X-RateLimit-Reset`) that moves a second every 100 requests.
fn layer(
    limit: &str,
    headers: HeaderOptions,
) -> (
    RateLimitLayer<tierlimit::ApiKey, MemoryBackend<FakeRelativeClock>>,
    FakeRelativeClock,
    Arc<AtomicU64>,
) {
    let clock = FakeRelativeClock::default();
    let unix = Arc::new(AtomicU64::new(1_800_000_000));
    let u = Arc::clone(&unix);
    let layer = RateLimitLayer::builder(policy(limit))
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .unix_clock(move || u.load(Ordering::Relaxed))
        .headers(headers)
        .build();
    (layer, clock, unix)
}

fn inner() -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    inner_with_room(0)
}

/// The inner service, its response's header map made with room for `room`
/// fields.
fn inner_with_room(
    room: usize,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    // Like any handler's response, it has a header already (so a map).
    tower::service_fn(move |_req: Request<Body>| async move {
        let mut res = Response::new(Body::from("{}"));
        *res.headers_mut() = http::HeaderMap::with_capacity(room);
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(res)
    })
}

#[test]
fn an_allowed_request_allocates_nothing_in_the_layer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    let bare = allocations(&rt, inner(), |r| assert_eq!(r.status(), StatusCode::OK));
    // Each request advances the clock by `step`, less than the limit's
    // interval: the bucket never fills again (the key stays tracked) and
    // never runs dry, while the remaining count goes down through small
    // numbers, across 4,096, or through the hundreds of millions.
    for (name, limit, step, headers) in [
        (
            "small limit",
            "1000/hour",
            Duration::from_secs(3),
            HeaderOptions::default(),
        ),
        (
            "limit around 4,096",
            "5000/hour",
            Duration::from_millis(100),
            HeaderOptions::default(),
        ),
        (
            "large limit",
            "1000000000/hour",
            Duration::from_micros(1),
            HeaderOptions::default(),
        ),
        (
            "large limit, IETF draft fields instead",
            "1000000000/hour",
            Duration::from_micros(1),
            HeaderOptions::default().x_ratelimit(false).ietf_draft(true),
        ),
        (
            "headers off",
            "1000000000/hour",
            Duration::from_micros(1),
            HeaderOptions::default().x_ratelimit(false),
        ),
        (
            "several limits and a per-account limit",
            r#"["1000000000/hour", "2000000000/day"]"#,
            Duration::from_micros(1),
            HeaderOptions::default(),
        ),
        (
            "a calendar day beside a rolling limit (London)",
            r#"["1000000000/hour", { limit = "2000000000/day", period = "calendar" }]"#,
            Duration::from_micros(1),
            HeaderOptions::default(),
        ),
        (
            "several limits, IETF draft fields instead",
            r#"["1000000000/hour", "2000000000/day"]"#,
            Duration::from_micros(1),
            HeaderOptions::default().x_ratelimit(false).ietf_draft(true),
        ),
    ] {
        let (layer, clock, unix) = layer(limit, headers);
        let svc = layer.layer(inner());
        // Time moves during the run: remaining counts and reset times change.
        let mut n = 0u64;
        let check = |res: &Response<Body>| {
            assert_eq!(res.status(), StatusCode::OK, "{name}");
            if headers == HeaderOptions::default() {
                allowed_with_headers(res);
            }
        };
        let svc = tower::util::MapRequest::new(svc, |req: Request<Body>| {
            n += 1;
            clock.advance(step);
            if n.is_multiple_of(100) {
                unix.fetch_add(1, Ordering::Relaxed);
            }
            req
        });
        let limited = allocations(&rt, svc, check);
        assert_none_added(name, limited, "inner service alone", bare);
    }
}

/// With both header sets on, the layer writes six fields: a response map
/// allocated for one (http's first allocation has room for six) grows, as
/// it would for any seventh field. With room in the map, nothing is
/// allocated.
#[test]
fn every_header_field_allocates_nothing_given_room_in_the_map() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    let bare = allocations(&rt, inner_with_room(16), |r| {
        assert_eq!(r.status(), StatusCode::OK)
    });
    let headers = HeaderOptions::default().ietf_draft(true);
    let (layer, clock, _unix) = layer("1000000000/hour", headers);
    let svc = tower::util::MapRequest::new(layer.layer(inner_with_room(16)), move |req| {
        clock.advance(Duration::from_micros(1));
        req
    });
    let limited = allocations(&rt, svc, |res| {
        allowed_with_headers(res);
        assert!(res.headers().contains_key("ratelimit"));
        assert!(res.headers().contains_key("ratelimit-policy"));
    });
    assert_none_added("every header", limited, "inner service alone", bare);
}

#[test]
fn an_allowed_request_through_axum_allocates_nothing_more_than_any_layer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    let bare = || Router::new().route("/v1/account", get(|| async { "{}" }));
    // A layer that does nothing but hold an `Arc`, as every real layer
    // does: what axum's `Router::layer` costs by itself (on a router called
    // directly, axum turns the handler into a route per request, cloning
    // the boxed layer: one allocation, unless the layer is zero-sized).
    let state = Arc::new(());
    let noop = allocations(
        &rt,
        bare().layer(tower::util::MapResponseLayer::new(
            move |r: axum::response::Response| {
                let _ = &state;
                r
            },
        )),
        |r| assert_eq!(r.status(), StatusCode::OK),
    );
    let (layer, _clock, _unix) = layer("1000000000/hour", HeaderOptions::default());
    let limited = allocations(&rt, bare().layer(layer), allowed_with_headers);
    assert_none_added("axum", limited, "no-op layer", noop);
}

/// A request under a concurrency limit pays for its lease: its guard, and
/// the body that holds it (axum's body type boxes what it wraps): at most
/// two allocations per request, and none on the paths that have no
/// concurrency limit (the tests above).
#[test]
fn a_request_under_a_concurrency_limit_allocates_at_most_twice() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    // Room in the response's map for the two concurrency fields, as in
    // `every_header_field_allocates_nothing_given_room_in_the_map`.
    let bare = allocations(&rt, inner_with_room(16), |r| {
        assert_eq!(r.status(), StatusCode::OK)
    });
    let policy = Policy::from_toml_str(&format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = {{ requests = \"1000000000/hour\", concurrency = 10 }}\nwrite = \"1/hour\"\n[keys]\n\"{KEY}\" = \"free\"\n"
    ))
    .unwrap();
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::builder(policy)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    let svc =
        tower::util::MapRequest::new(layer.layer(inner_with_room(16)), |req: Request<Body>| {
            clock.advance(Duration::from_micros(1));
            req
        });
    let limited = allocations(&rt, svc, |res| {
        allowed_with_headers(res);
        assert_eq!(res.headers()["x-concurrency-remaining"], "9");
    });
    println!("concurrency: {limited} allocations for {N} requests (inner alone: {bare})");
    assert!(
        limited <= bare + 2 * N,
        "{} allocations per request",
        (limited - bare) as f64 / N as f64
    );
}
