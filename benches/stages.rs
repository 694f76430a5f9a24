#![allow(missing_docs)] // criterion_group! generates an undocumented function
//! The request path stage by stage, on the same setup as `benches/layer.rs`
//! (key from `X-API-Key`, a quota that never refuses): each stage alone
//! through the crate's public API; what inserting the `X-RateLimit-*`
//! fields into a response's header map costs (the floor of header
//! writing); then the whole layer around a trivial inner service with
//! headers on and off (their difference is header writing), next to
//! tower_governor's; then the same layer inside an axum `Router` (adding
//! axum's routing and per-layer costs).
//!
//! ```sh
//! cargo bench --bench stages
//! ```

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Method, Request, Response};
use tierlimit::{
    ApiKey, HeaderOptions, Limit, MemoryBackend, RateLimitLayer, backend::Subject, key::KeyId,
};
use tower::{Layer, Service, ServiceExt};

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/one.rs"]
mod one;
use one::CheckOneNow;

use support::*;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let one = keys(1);
    let many = keys(100_000);
    let many_hv: Vec<HeaderValue> = many.iter().map(|k| k.parse().unwrap()).collect();
    let one_hv: HeaderValue = one[0].parse().unwrap();
    let policy_one = policy(&one);
    let policy_many = policy(&many);

    let mut group = c.benchmark_group("stages");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));

    // 1. Route classification.
    let get = Method::GET;
    group.bench_function("classify (method, path → category)", |b| {
        b.iter(|| black_box(policy_one.classify(black_box(&get), black_box("/v1/account"))))
    });

    // 2. Key extraction from the headers (validation included).
    let req = request(&one_hv);
    let api = ApiKey::new();
    group.bench_function("key extraction (ApiKey::read)", |b| {
        b.iter(|| black_box(api.read(black_box(req.headers())).unwrap().len()))
    });

    // The same key as `Authorization: Bearer` (the second header the
    // extractor looks for), and as `X-API-Key` among the headers a real
    // client sends (the scan reads past them).
    let mut bearer = Request::get("/v1/account").body(Body::empty()).unwrap();
    bearer.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {}", one[0]).parse().unwrap(),
    );
    group.bench_function("key extraction, Authorization: Bearer", |b| {
        b.iter(|| black_box(api.read(black_box(bearer.headers())).unwrap().len()))
    });
    let mut busy = request(&one_hv);
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("content-type", "application/json"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("connection", "keep-alive"),
    ] {
        busy.headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    group.bench_function("key extraction, X-API-Key among 9 headers", |b| {
        b.iter(|| black_box(api.read(black_box(busy.headers())).unwrap().len()))
    });

    // 3. Key hashing.
    let key = one[0].as_str();
    group.bench_function("key hashing (KeyId::of)", |b| {
        b.iter(|| black_box(KeyId::of(black_box(key))))
    });

    // 4. Tier lookup in the key table (1 and 100,000 listed keys).
    let id = KeyId::of(key);
    group.bench_function("tier lookup, 1 key listed", |b| {
        b.iter(|| black_box(policy_one.key_tier(black_box(key), id)))
    });
    let ids: Vec<KeyId> = many.iter().map(|k| KeyId::of(k)).collect();
    let mut i = 0usize;
    group.bench_function("tier lookup, 100k keys listed", |b| {
        b.iter(|| {
            i = (i + 1) % many.len();
            black_box(policy_many.key_tier(&many[i], ids[i]))
        })
    });

    // 5. The backend check (1 key, and 100,000 tracked keys).
    let limit = Limit::per_hour(MAX);
    let backend = MemoryBackend::new();
    let subject = Subject::new(id, 1);
    group.bench_function("backend check, 1 key", |b| {
        b.iter(|| black_box(backend.check_one_now(black_box(&subject), &limit).unwrap()))
    });
    let subjects: Vec<Subject> = ids.iter().map(|&k| Subject::new(k, 1)).collect();
    for s in &subjects {
        backend.check_one_now(s, &limit).unwrap();
    }
    group.bench_function("backend check, 100k keys", |b| {
        b.iter(|| {
            i = (i + 1) % subjects.len();
            black_box(backend.check_one_now(&subjects[i], &limit).unwrap())
        })
    });

    // 6. Header writing's floor: inserting into a response's `HeaderMap`
    // (http hashes a custom name byte by byte; a standard name is an enum).
    // The spec's four `X-RateLimit-*` fields against the two that
    // tower_governor writes on an allowed response.
    let names: Vec<http::HeaderName> = [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-window",
    ]
    .iter()
    .map(|n| http::HeaderName::from_static(n))
    .collect();
    let value = HeaderValue::from_static("1000000000");
    let response_map = || {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        h
    };
    for (label, n) in [
        ("response map, content-type only", 0),
        ("response map + 2 X-RateLimit-* inserts", 2),
        ("response map + 4 X-RateLimit-* inserts", 4),
    ] {
        group.bench_function(label, |b| {
            b.iter(|| {
                let mut h = response_map();
                for name in &names[..n] {
                    h.insert(name.clone(), value.clone());
                }
                black_box(h)
            })
        });
    }

    // 7. The whole layer around a trivial inner service, headers on and
    // off: their difference is header writing.
    // Like a handler's response, it has a header already (so a map).
    let inner = tower::service_fn(|_req: Request<Body>| async {
        let mut res = Response::new(Body::empty());
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(res)
    });
    let mut one_request = || request(&one_hv);
    per_request(
        &mut group,
        "trivial inner service alone",
        &rt,
        inner,
        &mut one_request,
    );
    for (name, headers) in [
        ("whole layer, headers on", HeaderOptions::default()),
        (
            "whole layer, headers off",
            HeaderOptions::default().x_ratelimit(false),
        ),
    ] {
        let layer = RateLimitLayer::builder(policy_one.clone())
            .headers(headers)
            .build();
        per_request(&mut group, name, &rt, layer.layer(inner), &mut one_request);
    }

    // The same trivial inner service under tower_governor (same quota, key
    // from the same header), with and without its headers.
    // (The two configurations have different middleware types.)
    let with_headers = governor_builder().use_headers().finish().unwrap();
    let layer = tower_governor::GovernorLayer::new(std::sync::Arc::new(with_headers));
    per_request(
        &mut group,
        "whole tower_governor layer, headers on",
        &rt,
        layer.layer(inner),
        &mut one_request,
    );
    let without = governor_builder().finish().unwrap();
    let layer = tower_governor::GovernorLayer::new(std::sync::Arc::new(without));
    per_request(
        &mut group,
        "whole tower_governor layer, headers off",
        &rt,
        layer.layer(inner),
        &mut one_request,
    );

    // 8. In an axum Router: routing added.
    for (name, router) in [
        ("axum router, bare", bare()),
        ("axum router, tierlimit", tierlimit(&one)),
    ] {
        per_request(&mut group, name, &rt, router, &mut one_request);
    }
    // And the 100k-key layer, for the table's second column.
    let router = tierlimit(&many);
    for k in &many_hv {
        rt.block_on(router.clone().oneshot(request(k))).unwrap();
    }
    per_request(
        &mut group,
        "axum router, tierlimit, 100k keys",
        &rt,
        router,
        &mut || {
            i = (i + 1) % many_hv.len();
            request(&many_hv[i])
        },
    );
    group.finish();
}

/// One row: `svc` answers a request from `next` per iteration.
fn per_request<S>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    rt: &tokio::runtime::Runtime,
    mut svc: S,
    next: &mut dyn FnMut() -> Request<Body>,
) where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    group.bench_function(name, |b| {
        b.iter(|| {
            let req = next();
            let res = rt.block_on(async {
                ServiceExt::<Request<Body>>::ready(&mut svc).await.unwrap();
                svc.call(req).await.unwrap()
            });
            black_box(res)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
