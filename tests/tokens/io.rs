//! Input and output token limits through real servers and real clients:
//! the demo's completion route reports prompt tokens as input and
//! completion tokens as output; a completion whose output runs past the
//! output limit settles the debt, and the next request is refused by the
//! output limit with the right headers — over HTTP (memory and Redis) and
//! over gRPC — while the usage endpoint and the usage feed tell input and
//! output apart. Every backend runs on a fake clock: nothing sleeps.

use super::{common, demo, demo_policy, grpc_demo, setup, usage};
use common::{client, header, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tierlimit::{Policy, RateLimitLayer, backend::Backend};

/// The demo's policy, with input and output token limits on the free
/// tier's `ai`: 1,000 input tokens and 500 output tokens an hour.
fn io_policy() -> Policy {
    demo_policy(&[(
        "ai = \"50/hour\"",
        "ai = { requests = \"50/hour\", input_tokens = \"1000/hour\", output_tokens = \"500/hour\" }",
    )])
}

/// Waits (bounded) until the usage endpoint at `url` shows `want` `ai`
/// output tokens left for the free demo key: a settlement lands when the
/// server drops the response, a moment after the client read it.
async fn output_left(c: &reqwest::Client, url: &str, want: u64) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..500 {
        let usage: Value = usage(c, url, "free-demo-key").await;
        last = usage["categories"]["ai"]["output_tokens"]["remaining"]
            .as_u64()
            .unwrap();
        if last == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    last
}

async fn complete(c: &reqwest::Client, url: &str, body: Value) -> reqwest::Response {
    super::complete(c, url, "free-demo-key", body).await
}

/// Two completions of 400 output tokens against 500 an hour: each reserves
/// 1 output token (and its estimate, 1, of input); the second settles the
/// output bucket 300 into debt, and the third is refused by the output
/// limit alone. Its headers describe the output limit; the input limit is
/// still shown beside it.
async fn output_debt_refuses_the_next_request<B: Backend>(backend: B) {
    let server = serve(demo::app(demo::limits(io_policy(), backend))).await;
    let c = client();
    let url = server.url("/v1/ai/completions");
    let body = json!({ "prompt": "hello world", "max_tokens": 400 });
    // Admission: 1 of each reserved. Settled: 2 input (1 more), 400 output
    // (399 more): 100 output tokens left after the first, none after the
    // second.
    let usage_url = server.url("/v1/rate_limit");
    let expected = [(999, 499, 100), (997, 99, 0)];
    for (i, (input_left, left, settled)) in expected.into_iter().enumerate() {
        let res = complete(&c, &url, body.clone()).await;
        assert_eq!(res.status(), StatusCode::OK, "call {}", i + 1);
        assert_eq!(header(&res, "x-ratelimit-limit-input-tokens"), Some(1000));
        assert_eq!(
            header(&res, "x-ratelimit-remaining-input-tokens"),
            Some(input_left)
        );
        assert!(header(&res, "x-ratelimit-reset-input-tokens").is_some());
        assert_eq!(header(&res, "x-ratelimit-limit-output-tokens"), Some(500));
        assert_eq!(
            header(&res, "x-ratelimit-remaining-output-tokens"),
            Some(left),
            "call {}",
            i + 1
        );
        assert!(header(&res, "x-ratelimit-reset-output-tokens").is_some());
        // No limit of all tokens: no such headers.
        assert_eq!(header(&res, "x-ratelimit-limit-tokens"), None);
        let json: Value = res.json().await.unwrap();
        assert_eq!(json["usage"]["prompt_tokens"], 2);
        assert_eq!(json["usage"]["completion_tokens"], 400);
        assert_eq!(output_left(&c, &usage_url, settled).await, settled);
    }
    // 800 output tokens used of 500: 300 in debt. The next request waits
    // for the debt and its own output token: 301 × 7.2 s = 2167.2 s → 2168.
    let res = complete(&c, &url, body.clone()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(2168));
    assert_eq!(
        header(&res, "x-ratelimit-limit"),
        Some(500),
        "the output limit binds"
    );
    assert_eq!(header(&res, "x-ratelimit-limit-output-tokens"), Some(500));
    assert_eq!(header(&res, "x-ratelimit-remaining-output-tokens"), Some(0));
    let reset = header(&res, "x-ratelimit-reset-output-tokens").unwrap();
    assert_eq!(Some(reset), header(&res, "x-ratelimit-reset"));
    assert!(reset >= common::unix_now() + 2168, "{reset}");
    assert_eq!(header(&res, "x-ratelimit-limit-input-tokens"), Some(1000));
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["unit"], "output tokens", "{problem}");
    assert_eq!(problem["limit"], 500, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("500 `ai` output tokens per 3600 s"),
        "{problem}"
    );
    usage_tells_input_and_output_apart(&c, &server).await;
}

/// After [`output_debt_refuses_the_next_request`]: the usage endpoint
/// shows input and output apart, each with its unit; a category without
/// token limits has no token headers.
async fn usage_tells_input_and_output_apart(c: &reqwest::Client, server: &common::Server) {
    // The usage endpoint shows input and output apart, each with its unit.
    let usage: Value = usage(c, &server.url("/v1/rate_limit"), "free-demo-key").await;
    let ai = &usage["categories"]["ai"];
    assert_eq!(ai["output_tokens"]["limit"], 500, "{usage}");
    assert_eq!(ai["output_tokens"]["remaining"], 0, "{usage}");
    assert_eq!(ai["input_tokens"]["limit"], 1000, "{usage}");
    assert_eq!(ai["input_tokens"]["remaining"], 996, "{usage}");
    assert!(ai.get("tokens").is_none(), "{usage}");
    let units: Vec<&str> = ai["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["unit"].as_str().unwrap())
        .collect();
    assert_eq!(
        units,
        ["requests", "input tokens", "output tokens"],
        "{usage}"
    );
    // A category without token limits has no token headers.
    let read = c
        .get(server.url("/v1/clusters"))
        .header("x-api-key", "free-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "x-ratelimit-limit-input-tokens"), None);
    assert_eq!(header(&read, "x-ratelimit-limit-output-tokens"), None);
}

#[tokio::test]
async fn output_debt_refuses_the_next_request_on_memory() {
    setup();
    output_debt_refuses_the_next_request(common::fake_memory()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_debt_refuses_the_next_request_on_redis() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    output_debt_refuses_the_next_request(backend).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_debt_refuses_the_next_request_on_redis_with_batches() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::batched_single_node_on_fake_clock().await;
    output_debt_refuses_the_next_request(backend).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_debt_refuses_the_next_request_on_redis_cluster() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_cluster, _clock, backend) = common::redis::cluster_on_fake_clock().await;
    output_debt_refuses_the_next_request(backend).await;
}

/// The same over gRPC: the demo's `Inference/Complete` reports its prompt
/// and completion apart; the metadata carries the input and output token
/// fields, and the refusal is RESOURCE_EXHAUSTED with the output limit's.
#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_debt_refuses_the_next_call_over_grpc() {
    use tonic::Code;
    setup();
    let layer = RateLimitLayer::builder(io_policy())
        .backend(common::fake_memory())
        .build();
    let usage =
        serve(axum::Router::new().route_service("/v1/rate_limit", layer.usage_service())).await;
    let usage_url = usage.url("/v1/rate_limit");
    let c = client();
    let server = common::serve_grpc(layer, grpc_demo::grpc_routes().await).await;
    let channel = common::grpc_channel(server.addr).await;
    let call = || {
        let mut req = tonic::Request::new(grpc_demo::inference::CompleteRequest {
            prompt: "a b c".into(),
            max_tokens: 300,
        });
        req.metadata_mut()
            .insert("x-api-key", "free-demo-key".parse().unwrap());
        grpc_demo::inference::complete(channel.clone(), req)
    };
    let meta = |m: &tonic::metadata::MetadataMap, name: &str| {
        m.get(name)
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap())
    };
    // 300 output tokens each: 1 reserved, 299 settled after.
    for (left, settled) in [(499, 200), (199, 0)] {
        let res = call().await.unwrap();
        assert_eq!(res.get_ref().completion_tokens, 300);
        let m = res.metadata();
        assert_eq!(meta(m, "x-ratelimit-limit-output-tokens"), Some(500));
        assert_eq!(meta(m, "x-ratelimit-remaining-output-tokens"), Some(left));
        assert_eq!(meta(m, "x-ratelimit-limit-input-tokens"), Some(1000));
        assert!(meta(m, "x-ratelimit-reset-output-tokens").is_some());
        assert_eq!(output_left(&c, &usage_url, settled).await, settled);
    }
    // 600 of 500: 100 in debt; 101 × 7.2 s = 727.2 s → 728.
    let status = call().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let m = status.metadata();
    assert_eq!(meta(m, "retry-after"), Some(728));
    assert_eq!(meta(m, "x-ratelimit-limit-output-tokens"), Some(500));
    assert_eq!(meta(m, "x-ratelimit-remaining-output-tokens"), Some(0));
    assert!(
        status
            .message()
            .contains("500 `ai` output tokens per 3600 s"),
        "{status:?}"
    );
}

/// The usage feed's events carry input and output tokens apart (and the
/// total in `tokens`).
#[tokio::test]
async fn usage_events_carry_input_and_output_tokens() {
    setup();
    let (seen, sink) = common::feed::collecting();
    let feed = tierlimit::feed::UsageFeed::new(sink, 100).unwrap();
    let layer = demo::limits_with_feed(io_policy(), common::fake_memory(), Some(feed.clone()));
    let server = serve(demo::app(layer)).await;
    let c = client();
    let url = server.url("/v1/ai/completions");
    let res = complete(
        &c,
        &url,
        json!({ "prompt": "one two three", "max_tokens": 40 }),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    res.bytes().await.unwrap();
    assert_eq!(common::feed::written(&feed, 1).await, 1);
    let events = seen.lock().unwrap().clone();
    let e = &events[0];
    assert_eq!(e.category, "ai");
    assert_eq!(
        (e.tokens, e.input_tokens, e.output_tokens),
        (Some(43), Some(3), Some(40))
    );
}

/// Two keys of one account, with an output limit per account.
const ACCOUNT_POLICY: &str = r#"
categories = ["ai"]
[defaults]
read = "ai"
write = "ai"
[tiers.t]
ai = "100/hour"
[tiers.t.per_account]
ai = { output_tokens = "10/hour" }
[[routes]]
path = "/usage"
exempt = true
[keys]
"k1" = { tier = "t", account = "acme" }
"k2" = { tier = "t", account = "acme" }
"#;

/// Per-account output limits are one budget for every key of the account
/// (the check is the account's, as with any per-account limit): one key's
/// output debt refuses the other key's next request.
#[tokio::test]
async fn an_accounts_keys_share_its_output_limit() {
    use axum::routing::get;
    setup();
    let policy = Policy::from_toml_str(ACCOUNT_POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .build();
    let app = axum::Router::new()
        .route(
            "/complete",
            get(|| async {
                let mut res = axum::response::Response::new(axum::body::Body::empty());
                res.extensions_mut()
                    .insert(tierlimit::meter::TokenUsage::split(1, 8));
                res
            }),
        )
        .route_service("/usage", layer.usage_service())
        .layer(layer);
    let server = serve(app).await;
    let c = client();
    let call = async |key: &str| {
        c.get(server.url("/complete"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    };
    let left = async || {
        let usage: Value = usage(&c, &server.url("/usage"), "k2").await;
        usage["categories"]["ai"]["output_tokens"]["remaining"]
            .as_u64()
            .unwrap_or_else(|| panic!("{usage}"))
    };
    let settled = async |want: u64| {
        let mut last = u64::MAX;
        for _ in 0..500 {
            last = left().await;
            if last == want {
                break;
            }
            tokio::task::yield_now().await;
        }
        last
    };
    let res = call("k1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-remaining-output-tokens"), Some(9));
    assert_eq!(settled(2).await, 2, "k1's 8 output tokens, seen by k2");
    let res = call("k2").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-remaining-output-tokens"), Some(1));
    assert_eq!(settled(0).await, 0, "16 of 10: in debt");
    let res = call("k1").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "x-ratelimit-limit-output-tokens"), Some(10));
}
