#![allow(missing_docs)] // criterion_group! generates an undocumented function
//! Per-request cost through an axum `Router`: bare, tierlimit (1 key and
//! 100,000 keys), and, on the same work (same quota, key from the same
//! `X-API-Key` header, rate-limit headers on), `tower_governor` and
//! `tower-rate-tier`; then the limiter's decision alone next to a raw
//! governor keyed check.
//!
//! ```sh
//! cargo bench --features tonic --bench layer
//! ```

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, StatusCode};
use tower::{Service, ServiceExt};

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/one.rs"]
mod one;
use one::CheckOneNow;

use support::*;

/// One gRPC call, its body read to the end (where tonic encodes the reply).
fn grpc_call<S, B>(
    rt: &tokio::runtime::Runtime,
    svc: &mut S,
    req: Request<tonic::body::Body>,
) -> (
    http::response::Parts,
    http_body_util::Collected<bytes::Bytes>,
)
where
    S: Service<Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let res = ServiceExt::ready(svc)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let body = http_body_util::BodyExt::collect(body).await.unwrap();
        (parts, body)
    })
}

/// Every row in one run, on the same machine state.
fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let one = keys(1);
    let many = keys(100_000);
    let one_hv = header_values(&one);
    let many_hv = header_values(&many);

    let rows: Vec<(&str, Router, &[HeaderValue], bool)> = vec![
        ("bare router", bare(), &one_hv, false),
        (
            "bare router + no-op layer",
            bare().layer(tower::util::MapResponseLayer::new(
                |r: axum::response::Response| r,
            )),
            &one_hv,
            false,
        ),
        ("tierlimit, 1 key", tierlimit(&one), &one_hv, true),
        ("tierlimit, 100k keys", tierlimit(&many), &many_hv, true),
        (
            "tierlimit, 1 key, 2 limits",
            tierlimit_two_limits(&one),
            &one_hv,
            true,
        ),
        (
            "tierlimit, 100k keys, 2 limits",
            tierlimit_two_limits(&many),
            &many_hv,
            true,
        ),
        (
            "tierlimit, 1 key, tokens metered",
            tierlimit_tokens(&one),
            &one_hv,
            true,
        ),
        (
            "tierlimit, 1 key, concurrency limit",
            tierlimit_concurrency(&one),
            &one_hv,
            true,
        ),
        ("tower_governor, 1 key", tower_governor(), &one_hv, true),
        (
            "tower_governor, 100k keys",
            tower_governor(),
            &many_hv,
            true,
        ),
        (
            "tower-rate-tier, 1 key",
            tower_rate_tier(&one),
            &one_hv,
            true,
        ),
        (
            "tower-rate-tier, 100k keys",
            tower_rate_tier(&many),
            &many_hv,
            true,
        ),
    ];

    let mut group = c.benchmark_group("per request through axum");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, router, keys, limited) in rows {
        // Sanity: the row does the work it claims (allowed, headers on).
        let res = rt
            .block_on(router.clone().oneshot(request(&keys[0])))
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{name}");
        assert_eq!(
            res.headers().contains_key("x-ratelimit-remaining"),
            limited,
            "{name}"
        );
        // Touch every key once so the 100k rows measure a populated table.
        for k in keys {
            rt.block_on(router.clone().oneshot(request(k))).unwrap();
        }
        let mut svc = router.clone();
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                let req = request(&keys[i]);
                let res = rt.block_on(async {
                    ServiceExt::<Request<Body>>::ready(&mut svc).await.unwrap();
                    svc.call(req).await.unwrap()
                });
                black_box(res)
            })
        });
    }
    group.finish();

    // gRPC: one Health/Check call through tonic's routes, bare and limited.
    let mut group = c.benchmark_group("per gRPC call through tonic");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    let grpc_policy = tierlimit::Policy::from_toml_str(&format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"{MAX}/hour\"\nwrite = \"{MAX}/hour\"\n[[grpc]]\nservice = \"grpc.health.v1.Health\"\ncategory = \"read\"\n[keys]\n\"{}\" = \"free\"\n",
        one[0]
    ))
    .unwrap();
    let routes = || {
        let (_reporter, health) = tonic_health::server::health_reporter();
        tonic::service::Routes::new(health)
    };
    let grpc_request = |key: &HeaderValue| {
        // An empty HealthCheckRequest in one gRPC frame.
        let body = http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]));
        let mut req = Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(body))
            .unwrap();
        req.headers_mut().insert("x-api-key", key.clone());
        req
    };
    macro_rules! grpc_row {
        ($name:expr, $svc:expr, $limited:expr) => {{
            let mut svc = $svc;
            let run = |svc: &mut _| grpc_call(&rt, svc, grpc_request(&one_hv[0]));
            let (parts, body) = run(&mut svc);
            assert_eq!(parts.status, StatusCode::OK, $name);
            assert_eq!(
                parts.headers.contains_key("x-ratelimit-remaining"),
                $limited,
                $name
            );
            assert_eq!(body.trailers().unwrap()["grpc-status"], "0", $name);
            group.bench_function($name, |b| b.iter(|| black_box(run(&mut svc))));
        }};
    }
    grpc_row!("bare tonic routes", routes(), false);
    grpc_row!(
        "tierlimit, 1 key",
        tower::Layer::layer(&tierlimit::RateLimitLayer::new(grpc_policy), routes()),
        true
    );
    group.finish();

    // The limiter alone, without HTTP plumbing: tierlimit's whole decision
    // (route → category, key from the header, key → tier, GCRA check)
    // against a raw governor keyed check (DashMap state, String keys).
    let mut group = c.benchmark_group("limiter check alone");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for (name, keys, hv) in [
        ("tierlimit, 1 key", &one, &one_hv),
        ("tierlimit, 100k keys", &many, &many_hv),
    ] {
        use tierlimit::Extractor;
        let mut toml = format!(
            "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"{MAX}/hour\"\nwrite = \"{MAX}/hour\"\n[keys]\n"
        );
        for k in keys.iter() {
            toml.push_str(&format!("\"{k}\" = \"free\"\n"));
        }
        let policy = tierlimit::Policy::from_toml_str(&toml).unwrap();
        let backend = tierlimit::MemoryBackend::new();
        let extractor = tierlimit::ApiKey::new();
        let requests: Vec<Request<()>> = hv
            .iter()
            .map(|k| {
                let mut r = Request::get("/v1/account").body(()).unwrap();
                r.headers_mut().insert("x-api-key", k.clone());
                r
            })
            .collect();
        let check = |req: &Request<()>| {
            let tierlimit::Target::Category { category, cost } =
                policy.classify(req.method(), req.uri().path())
            else {
                unreachable!()
            };
            let id = extractor
                .extract(&tierlimit::RequestRef::new(req), &policy)
                .unwrap();
            let tier = id.tier().unwrap();
            let tierlimit::Rule::Limited(limit) = policy.rule(tier, category) else {
                unreachable!()
            };
            let subject = tierlimit::Subject {
                cost,
                ..tierlimit::Subject::new(id.key(), 1)
            };
            backend.check_one_now(&subject, &limit).unwrap().allowed
        };
        for r in &requests {
            assert!(check(r));
        }
        let mut i = 0usize;
        group.bench_function(format!("{name}, from the request"), |b| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                black_box(check(&requests[i]))
            })
        });
        // Given the key's text, as the raw governor row is.
        let (tier, category) = (
            policy.tier("free").unwrap(),
            policy.category("read").unwrap(),
        );
        let tierlimit::Rule::Limited(limit) = policy.rule(tier, category) else {
            unreachable!()
        };
        let by_key = |key: &str| {
            let id = tierlimit::KeyId::of(key);
            // The tier lookup stays in the measured work.
            black_box(policy.key_tier(key, id).unwrap());
            let subject = tierlimit::Subject::new(id, 1);
            backend.check_one_now(&subject, &limit).unwrap().allowed
        };
        group.bench_function(format!("{name}, key given"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(by_key(&keys[i]))
            })
        });
    }
    let quota = governor::Quota::with_period(Duration::from_secs(3600) / MAX)
        .unwrap()
        .allow_burst(NonZeroU32::new(MAX).unwrap());
    for (name, keys) in [
        ("raw governor keyed, 1 key", &one),
        ("raw governor keyed, 100k keys", &many),
    ] {
        let limiter = governor::RateLimiter::keyed(quota);
        for k in keys.iter() {
            let _ = limiter.check_key(k);
        }
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(limiter.check_key(&keys[i]).is_ok())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
