//! A layer that writes no rate-limit header (`x_ratelimit(false)`, the
//! draft off, no usage feed): its checks are not described, and an
//! allowed request carries nothing to its response. Everything else must
//! be as with headers: exact counts under a burst, refusals described
//! (429 with `Retry-After`, gRPC `RESOURCE_EXHAUSTED`), shadow mode, and a
//! backend that answers later (Redis) or stops. (The reserve and
//! refusals step by step, beside a layer that writes the headers:
//! `http::a_layer_writing_no_header_refuses_as_one_that_does`.)

mod common;

#[cfg(feature = "tonic")]
#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::routing::get;
use common::{client, fake_memory, serve};
use tierlimit::{HeaderOptions, Policy, RateLimitLayer};

/// Headers off.
fn quiet() -> HeaderOptions {
    HeaderOptions::default()
        .x_ratelimit(false)
        .ietf_draft(false)
}

fn policy(limit: &str, extra: &str) -> Policy {
    Policy::from_toml_str(&format!(
        "categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"{limit}\"\nwrite = \"{limit}\"\n[keys]\n\"k\" = \"t\"\n{extra}"
    ))
    .unwrap()
}

fn app<B: tierlimit::backend::Backend>(layer: RateLimitLayer<tierlimit::ApiKey, B>) -> Router {
    Router::new()
        .route("/v1/x", get(|| async { "ok" }))
        .layer(layer)
}

/// `tasks` tasks sending `each` requests as key `k` to `urls` (in turn):
/// the statuses counted, each 429 checked for `Retry-After`, each 200 for
/// no rate-limit header.
async fn burst(urls: &[String], tasks: usize, each: usize) -> (u32, u32) {
    let (ok, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut running = Vec::new();
    for t in 0..tasks {
        let (c, url) = (client(), urls[t % urls.len()].clone());
        let (ok, refused) = (Arc::clone(&ok), Arc::clone(&refused));
        running.push(tokio::spawn(async move {
            for _ in 0..each {
                let res = c.get(&url).header("x-api-key", "k").send().await.unwrap();
                match res.status().as_u16() {
                    200 => {
                        assert!(res.headers().get("x-ratelimit-remaining").is_none());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {
                        assert!(res.headers().get("retry-after").is_some());
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("status {s}: {}", res.text().await.unwrap()),
                }
            }
        }));
    }
    for t in running {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed))
}

/// 384 requests from 32 tasks at once (more than two cores serve at
/// once) against 50 a day: exactly 50 pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writing_no_header_admits_exactly_the_limit_under_a_burst() {
    common::secret::init_secret();
    let layer = RateLimitLayer::builder(policy("50/day", ""))
        .backend(fake_memory())
        .headers(quiet())
        .build();
    let server = serve(app(layer)).await;
    assert_eq!(burst(&[server.url("/v1/x")], 32, 12).await, (50, 334));
}

/// Shadow mode writing no header: every request passes, the would-be
/// refusals are counted.
#[tokio::test]
async fn writing_no_header_in_shadow_mode_passes_and_counts() {
    common::secret::init_secret();
    let layer = RateLimitLayer::builder(policy("2/day", "[shadow]\ntiers = [\"t\"]\n"))
        .backend(fake_memory())
        .headers(quiet())
        .build();
    let server = serve(app(layer.clone())).await;
    assert_eq!(burst(&[server.url("/v1/x")], 1, 5).await, (5, 0));
    assert_eq!(layer.shadow_refusals(), 3);
}

/// gRPC writing no header: the 101st read is `RESOURCE_EXHAUSTED` with its
/// retry metadata; the calls before carry no rate-limit metadata.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn grpc_writing_no_header_is_exhausted_past_the_limit() {
    use common::{grpc_channel, health_check};
    use tonic_health::pb::health_client::HealthClient;

    common::secret::init_secret();
    let layer = RateLimitLayer::builder(common::spec_policy())
        .backend(fake_memory())
        .headers(quiet())
        .build();
    let server = common::serve_grpc(layer, demo::grpc_routes().await).await;
    let mut health = HealthClient::new(grpc_channel(server.addr).await);
    let check = || health_check("free-demo-key");
    for i in 0..100 {
        let res = health
            .check(check())
            .await
            .unwrap_or_else(|e| panic!("{i}: {e}"));
        assert!(res.metadata().get("x-ratelimit-limit").is_none());
    }
    let status = health.check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.metadata().get("retry-after").unwrap(), "36");
}

/// Two servers writing no header on one Redis: the check answers later, and
/// exactly the limit passes across both; with Redis gone and the backend
/// failing closed, a 503, not a pass.
#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writing_no_header_on_redis_is_exact_across_servers_and_fails_closed() {
    use common::redis::{RedisServer, available};
    use tierlimit::RedisBackend;
    use tierlimit::backend::FailurePolicy;

    common::secret::init_secret();
    let headers = quiet();
    if !available() {
        return;
    }
    let mut redis = RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let mut urls = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        // Failing closed, with time to spare: a slow machine can fail
        // the test (a 503, a timeout), never admit more by falling back.
        let backend = RedisBackend::builder(redis.url())
            .fake_clock(clock.clone())
            .failure_policy(FailurePolicy::FailClosed)
            .timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        // A second key, never refused, for the check with Redis gone.
        let layer = RateLimitLayer::builder(policy("40/day", "\"k2\" = \"t\"\n"))
            .backend(backend)
            .headers(headers)
            .build();
        let s = serve(app(layer)).await;
        urls.push(s.url("/v1/x"));
        servers.push(s);
    }
    assert_eq!(burst(&urls, 16, 10).await, (40, 120));

    redis.kill();
    let res = client()
        .get(&urls[0])
        .header("x-api-key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
}
