//! What one admin change costs, through the admin service in process: a
//! `PUT …/keys` (provisioning a new key) and a `PUT …/limits` (a custom
//! limit), with a policy of 10 keys, and with 100,000 keys in the policy
//! and 10,000 more provisioned through the admin API. A change costs what
//! it changes: both should take the same time.
//!
//! ```sh
//! cargo bench --bench admin
//! cargo bench --bench admin -- --test   # each once, quickly
//! ```
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::Full;
use tierlimit::{Limit, Policy, RateLimitLayer, Tier};
use tower::{Service, ServiceExt};

const TOKEN: &str = "admin-bench-token-0123456789abcdef";

fn policy(file_keys: usize) -> Policy {
    let mut b = Policy::builder()
        .categories(["read", "write"])
        .tier(
            Tier::new("free")
                .limit("read", Limit::per_hour(100))
                .limit("write", Limit::per_hour(20)),
        )
        .tier(
            Tier::new("pro")
                .limit("read", Limit::per_hour(1000))
                .limit("write", Limit::per_hour(200)),
        );
    for i in 0..file_keys {
        b = b.key(format!("sk-file-{i:08}"), "free");
    }
    b.build().unwrap()
}

fn request(path: &str, body: String) -> http::Request<Full<Bytes>> {
    http::Request::put(format!("/admin/v1{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn put_key(key: &str, tier: &str) -> http::Request<Full<Bytes>> {
    request("/keys", format!(r#"{{"key":"{key}","tier":"{tier}"}}"#))
}

fn put_limit(key: &str, limit: u64) -> http::Request<Full<Bytes>> {
    let body = format!(r#"{{"key":"{key}","category":"write","limit":"{limit}/hour"}}"#);
    request("/limits", body)
}

/// One admin request, which must succeed.
async fn call<S, RB>(admin: &S, req: http::Request<Full<Bytes>>)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<RB>,
            Error = std::convert::Infallible,
        > + Clone,
{
    let res = admin.clone().oneshot(req).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("admin_put");
    for (name, file_keys, provisioned) in [
        ("10_keys", 10, 0),
        ("100k_file_keys_10k_provisioned", 100_000, 10_000),
    ] {
        let layer = RateLimitLayer::new(policy(file_keys));
        let admin = layer.admin_service().token("bench", TOKEN);
        rt.block_on(async {
            for i in 0..provisioned {
                call(&admin, put_key(&format!("sk-admin-{i:08}"), "free")).await;
            }
        });
        let next = AtomicU64::new(0);
        group.bench_function(format!("key/{name}"), |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, Ordering::Relaxed);
                call(&admin, put_key(&format!("sk-new-{i:012}"), "pro")).await;
            });
        });
        group.bench_function(format!("limit/{name}"), |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, Ordering::Relaxed);
                call(&admin, put_limit(&format!("sk-new-{i:012}"), 1 + i % 50)).await;
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
