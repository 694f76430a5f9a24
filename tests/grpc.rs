//! gRPC through a real tonic server on 127.0.0.1:0 and a real tonic client;
//! and the mixed HTTP + gRPC server on one port.

mod common;

#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod demo;

use std::time::Duration;

use common::{client, grpc_channel, spec_policy, unix_now};
use governor::clock::FakeRelativeClock;
use tierlimit::{ApiKey, MemoryBackend, RateLimitLayer};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

type Layer = RateLimitLayer<ApiKey, MemoryBackend<FakeRelativeClock>>;

fn fake_layer(clock: &FakeRelativeClock) -> Layer {
    RateLimitLayer::builder(spec_policy())
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build()
}

/// A tonic server with the layer and the demo's services, on 127.0.0.1:0.
async fn tonic_server(layer: Layer) -> common::Server {
    common::serve_grpc(layer, demo::grpc_routes().await).await
}

fn check_request(headers: &[(&'static str, &str)]) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    req
}

/// Asserts `status` carries a QuotaFailure whose first violation says `says`.
fn assert_quota_says(status: &tonic::Status, says: &str) {
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    let description = &quota.violations[0].description;
    assert!(description.contains(says), "{description}");
}

fn meta(md: &tonic::metadata::MetadataMap, key: &str) -> Option<u64> {
    md.get(key).map(|v| v.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn allowed_calls_carry_rate_limit_metadata() {
    let clock = FakeRelativeClock::default();
    let server = tonic_server(fake_layer(&clock)).await;
    let mut health = HealthClient::new(grpc_channel(server.addr).await);
    let before = unix_now();
    let res = health
        .check(common::health_check("free-demo-key"))
        .await
        .unwrap();
    let md = res.metadata();
    assert_eq!(
        meta(md, "x-ratelimit-limit"),
        Some(100),
        "Health/Check is read"
    );
    assert_eq!(meta(md, "x-ratelimit-remaining"), Some(99));
    assert_eq!(meta(md, "x-ratelimit-window"), Some(3600));
    let reset = meta(md, "x-ratelimit-reset").unwrap();
    assert!((before + 36..=unix_now() + 37).contains(&reset));
    assert_eq!(res.into_inner().status, 1, "SERVING");

    // Bearer in `authorization` works too; the demo's own service is ai.
    let req = completion_as("hi", 0, "authorization", "Bearer pro-demo-key");
    let res = demo::inference::complete(grpc_channel(server.addr).await, req)
        .await
        .unwrap();
    assert_eq!(meta(res.metadata(), "x-ratelimit-limit"), Some(500));
    let reply = res.into_inner();
    assert!(reply.text.starts_with("tok"));
    assert_eq!(reply.total_tokens, 17, "1 prompt word + 16 by default");
}

#[tokio::test]
async fn the_101st_check_is_resource_exhausted_with_retry_details() {
    let clock = FakeRelativeClock::default();
    let server = tonic_server(fake_layer(&clock)).await;
    let mut health = HealthClient::new(grpc_channel(server.addr).await);
    for i in 0..100 {
        let res = health.check(common::health_check("free-demo-key")).await;
        assert!(res.is_ok(), "call {}: {res:?}", i + 1);
    }
    let status = health
        .check(common::health_check("free-demo-key"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("`free`"), "{}", status.message());
    assert!(status.message().contains("`read`"), "{}", status.message());
    assert!(
        status.message().contains("retry in 36 s"),
        "{}",
        status.message()
    );

    let md = status.metadata();
    assert_eq!(meta(md, "x-ratelimit-limit"), Some(100));
    assert_eq!(meta(md, "x-ratelimit-remaining"), Some(0));
    assert_eq!(meta(md, "x-ratelimit-window"), Some(3600));
    assert_eq!(meta(md, "retry-after"), Some(36));
    assert_eq!(meta(md, "grpc-retry-pushback-ms"), Some(36_000));
    assert!(meta(md, "x-ratelimit-reset").is_some());

    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo in grpc-status-details-bin");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(36)));
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    let v = &quota.violations[0];
    assert!(v.subject.starts_with("key:"), "{}", v.subject);
    assert!(!v.subject.contains("free-demo-key"), "never the whole key");
    assert!(
        v.description.contains("`free`") && v.description.contains("read"),
        "{}",
        v.description
    );

    // Time passes on the fake clock: one more call conforms.
    clock.advance(Duration::from_secs(36));
    assert!(
        health
            .check(common::health_check("free-demo-key"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn bad_keys_get_unauthenticated_or_invalid_argument_never_internal() {
    let clock = FakeRelativeClock::default();
    let server = tonic_server(fake_layer(&clock)).await;
    let mut health = HealthClient::new(grpc_channel(server.addr).await);
    let long = "k".repeat(300);
    let cases: [(&[(&'static str, &str)], Code); 5] = [
        (&[], Code::Unauthenticated),
        (&[("x-api-key", "nope")], Code::Unauthenticated),
        (
            &[("authorization", "Basic Zm9vOmJhcg==")],
            Code::InvalidArgument,
        ),
        (&[("x-api-key", &long)], Code::InvalidArgument),
        (
            &[("x-api-key", "a"), ("authorization", "Bearer b")],
            Code::InvalidArgument,
        ),
    ];
    for (headers, code) in cases {
        let status = health.check(check_request(headers)).await.unwrap_err();
        assert_eq!(status.code(), code, "{headers:?}: {}", status.message());
        assert!(!status.message().is_empty());
    }
}

#[tokio::test]
async fn mixed_server_answers_each_protocol_in_its_own_form() {
    let clock = FakeRelativeClock::default();
    let app = demo::mixed_app(fake_layer(&clock)).await;
    let server = common::serve(app).await;
    let http = client();
    let mut health = HealthClient::new(grpc_channel(server.addr).await);

    let check = || common::health_check("free-demo-key");
    let account = || {
        http.get(server.url("/v1/account"))
            .header("x-api-key", "free-demo-key")
            .send()
    };

    // gRPC reads and HTTP reads share the key's read bucket: 50 + 50.
    for _ in 0..50 {
        health.check(check()).await.unwrap();
        assert_eq!(account().await.unwrap().status(), 200);
    }
    let status = health.check(check()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let res = account().await.unwrap();
    assert_eq!(res.status(), 429, "an HTTP caller gets a 429");
    assert_eq!(res.headers()["content-type"], "application/problem+json");

    // Same state, same numbers, whichever protocol asks.
    let md = status.metadata();
    for key in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-window",
        "retry-after",
    ] {
        let h: u64 = res.headers()[key].to_str().unwrap().parse().unwrap();
        assert_eq!(meta(md, key), Some(h), "{key}");
    }
    let h_reset: u64 = res.headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(meta(md, "x-ratelimit-reset").unwrap().abs_diff(h_reset) <= 1);

    // The AI category over gRPC: the demo service on the same port.
    let req = completion("x", 0);
    let res = demo::inference::complete(grpc_channel(server.addr).await, req)
        .await
        .unwrap();
    assert_eq!(meta(res.metadata(), "x-ratelimit-limit"), Some(50));
    // A gRPC caller never sees an HTTP 429, even for bad keys.
    let status = health
        .check(common::health_check("nope"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_refusal_is_an_http_200_trailers_only_response() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let policy = tierlimit::Policy::from_toml_str(
        "categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/hour\"\nwrite = \"1/hour\"\n[keys]\n\"k\" = \"t\"",
    )
    .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .build();
    let app = axum::Router::new()
        .route("/pkg.Svc/M", axum::routing::post(|| async { "ok" }))
        .layer(layer);
    let call = |ct: &'static str| {
        http::Request::post("/pkg.Svc/M")
            .header("content-type", ct)
            .header("x-api-key", "k")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    assert_eq!(
        app.clone()
            .oneshot(call("application/grpc"))
            .await
            .unwrap()
            .status(),
        200
    );
    let res = app
        .clone()
        .oneshot(call("application/grpc+proto"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "gRPC errors ride on HTTP 200");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "8");
    assert!(res.headers().contains_key("grpc-status-details-bin"));
    let decision = res
        .extensions()
        .get::<tierlimit::backend::Decision>()
        .copied()
        .expect("Decision in extensions");
    assert!(!decision.allowed);
    assert_eq!(decision.retry_after, Some(Duration::from_secs(3600)));
    assert!(
        res.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty(),
        "trailers-only: no body"
    );
    // The same refusal to a plain HTTP caller is a 429.
    let res = app.oneshot(call("application/json")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(
        res.extensions()
            .get::<tierlimit::backend::Decision>()
            .is_some()
    );
}

#[tokio::test]
async fn a_refusal_under_several_limits_names_the_binding_one_in_quota_failure() {
    let clock = FakeRelativeClock::default();
    let policy = tierlimit::Policy::from_toml_str(
        r#"
categories = ["read", "write", "ai"]
[tiers.free]
read = ["2/second", "3/hour"]
write = "20/hour"
ai = "50/hour"
[[grpc]]
service = "grpc.health.v1.Health"
category = "read"
[keys]
"free-demo-key" = "free"
"#,
    )
    .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    let server = tonic_server(layer).await;
    let mut health = HealthClient::new(grpc_channel(server.addr).await);
    let check = || common::health_check("free-demo-key");
    let res = health.check(check()).await.unwrap();
    assert_eq!(meta(res.metadata(), "x-ratelimit-limit"), Some(2));
    assert_eq!(meta(res.metadata(), "x-ratelimit-window"), Some(1));
    health.check(check()).await.unwrap();
    // The guard refuses: 1 s.
    let status = health.check(check()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(meta(status.metadata(), "x-ratelimit-window"), Some(1));
    assert_eq!(meta(status.metadata(), "retry-after"), Some(1));
    assert_quota_says(&status, "limit of 2 per 1 s");
    // One more second: the third call spends the hourly budget; the next
    // is refused by the budget, whose wait (when both admit) is the hint.
    clock.advance(Duration::from_secs(1));
    health.check(check()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let status = health.check(check()).await.unwrap_err();
    let md = status.metadata();
    assert_eq!(meta(md, "x-ratelimit-limit"), Some(3));
    assert_eq!(meta(md, "x-ratelimit-window"), Some(3600));
    assert_eq!(meta(md, "retry-after"), Some(1198), "1200 s − 2 s");
    assert_eq!(meta(md, "grpc-retry-pushback-ms"), Some(1_198_000));
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1198)));
    assert_quota_says(&status, "limit of 3 per 3600 s");
}

/// The spec's policy with the issue's token limit on free `ai` (1000/hour).
fn token_layer(clock: &FakeRelativeClock) -> Layer {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap()
            .replacen(
                "ai = \"50/hour\"",
                "ai = { requests = \"50/hour\", tokens = \"1000/hour\" }",
                1,
            );
    RateLimitLayer::builder(tierlimit::Policy::from_toml_str(&text).unwrap())
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build()
}

fn completion(prompt: &str, max_tokens: u32) -> tonic::Request<demo::inference::CompleteRequest> {
    completion_as(prompt, max_tokens, "x-api-key", "free-demo-key")
}

/// A completion call whose metadata `name` is `value` (the caller's key).
fn completion_as(
    prompt: &str,
    max_tokens: u32,
    name: &'static str,
    value: &str,
) -> tonic::Request<demo::inference::CompleteRequest> {
    let mut req = tonic::Request::new(demo::inference::CompleteRequest {
        prompt: prompt.into(),
        max_tokens,
    });
    req.metadata_mut().insert(name, value.parse().unwrap());
    req
}

/// The `ai` tokens left for the free demo key, from the usage service
/// called in process (no HTTP server needed), once they equal `want`.
async fn tokens_left(layer: &Layer, want: u64) -> u64 {
    use tower::ServiceExt;
    let mut left = 0;
    for _ in 0..2_000 {
        let req = http::Request::get("/v1/rate_limit")
            .header("x-api-key", "free-demo-key")
            .body(())
            .unwrap();
        let res = layer.usage_service().oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let usage: serde_json::Value = serde_json::from_slice(&body).unwrap();
        left = usage["categories"]["ai"]["tokens"]["remaining"]
            .as_u64()
            .unwrap();
        if left == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    left
}

#[tokio::test]
async fn unary_completions_settle_tokens_and_the_fourth_is_resource_exhausted() {
    let clock = FakeRelativeClock::default();
    let layer = token_layer(&clock);
    let server = tonic_server(layer.clone()).await;
    for left in [999, 599, 199] {
        let res = demo::inference::complete(
            grpc_channel(server.addr).await,
            completion("hello world", 398),
        )
        .await
        .unwrap();
        assert_eq!(meta(res.metadata(), "x-ratelimit-limit-tokens"), Some(1000));
        assert_eq!(
            meta(res.metadata(), "x-ratelimit-remaining-tokens"),
            Some(left)
        );
        assert_eq!(res.into_inner().total_tokens, 400);
    }
    let status = demo::inference::complete(
        grpc_channel(server.addr).await,
        completion("hello world", 398),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(meta(status.metadata(), "retry-after"), Some(724));
    assert_quota_says(&status, "ai token limit of 1000 per 3600 s");
    assert_eq!(tokens_left(&layer, 0).await, 0);
}

#[tokio::test]
async fn a_server_stream_settles_when_it_ends_or_the_client_goes_away() {
    let clock = FakeRelativeClock::default();
    let layer = token_layer(&clock);
    let server = tonic_server(layer.clone()).await;
    // To the end: 3 prompt words + 40 tokens in 3 messages.
    let res = demo::inference::complete_stream(
        grpc_channel(server.addr).await,
        completion("one two three", 40),
    )
    .await
    .unwrap();
    assert_eq!(
        meta(res.metadata(), "x-ratelimit-remaining-tokens"),
        Some(999)
    );
    let mut stream = res.into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        messages.push(m);
    }
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2].total_tokens, 43);
    assert_eq!(tokens_left(&layer, 1000 - 43).await, 1000 - 43);
    // Gone after the first message of 4,096 tokens: charged for what the
    // server reported before the stream was dropped (at least the prompt
    // and one chunk, far less than the whole). A 1 KiB flow-control window
    // keeps the server from running ahead of this client.
    let small = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let res = demo::inference::complete_stream(small, completion("a b", 4096))
        .await
        .unwrap();
    let mut stream = res.into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    let mut left = 0;
    for _ in 0..2_000 {
        left = tokens_left(&layer, u64::MAX).await;
        if left <= 1000 - 43 - 18 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        left <= 1000 - 43 - 18,
        "settled: at least 2 + 16 charged ({left} left)"
    );
    assert!(
        left >= 1000 - 43 - 2 - 16 * 40,
        "not the whole 4,098: {left} left"
    );
}
