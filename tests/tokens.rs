//! Token metering and refunds: reserve at admission, settle when the
//! response is over — through the demo server (JSON and server-sent
//! events), under concurrency with clients that go away mid-stream, on the
//! memory backend and on Redis; refunds by response status.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod grpc_demo;

/// Input and output token limits, on this file's fixtures.
#[path = "tokens/io.rs"]
mod io;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use common::{client, header, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tierlimit::{Policy, RateLimitLayer, backend::Backend, meter::TokenMeter};

/// One key secret for the binary, before any key is hashed (the Redis
/// tests need one shared by their backends).
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

/// The demo's policy file (the spec's table) with each `(from, to)`
/// replaced once in the free tier's table (the first) and after it.
fn demo_policy(replacements: &[(&str, &str)]) -> Policy {
    let mut text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "the spec table moved: no {from}");
        text = text.replacen(from, to, 1);
    }
    Policy::from_toml_str(&text).unwrap()
}

/// The spec's table, with the issue's token limits on `ai`.
fn token_policy() -> Policy {
    demo_policy(&[
        (
            "ai = \"50/hour\"",
            "ai = { requests = \"50/hour\", tokens = \"1000/hour\" }",
        ),
        (
            "ai = \"500/hour\"",
            "ai = { requests = \"500/hour\", tokens = [\"20000/minute\", \"500000/day\"] }",
        ),
    ])
}

/// The usage endpoint at `url` as `key` sees it.
async fn usage(c: &reqwest::Client, url: &str, key: &str) -> Value {
    let res = c.get(url).header("x-api-key", key).send().await.unwrap();
    res.json().await.unwrap()
}

async fn complete(c: &reqwest::Client, url: &str, key: &str, body: Value) -> reqwest::Response {
    c.post(url)
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_fourth_completion_is_refused_for_tokens_while_requests_have_room() {
    setup();
    let backend = common::fake_memory();
    let server = serve(demo::app(demo::limits(token_policy(), backend))).await;
    let c = client();
    let url = server.url("/v1/ai/completions");
    let body = json!({ "prompt": "hello world", "max_tokens": 398 });
    // Each call reserves 1 token (no estimate given) and settles 400 (2
    // prompt words + 398) when its response is over.
    for (i, left) in [999, 599, 199].into_iter().enumerate() {
        let res = complete(&c, &url, "free-demo-key", body.clone()).await;
        assert_eq!(res.status(), StatusCode::OK, "call {}", i + 1);
        assert_eq!(header(&res, "x-ratelimit-limit-tokens"), Some(1000));
        assert_eq!(
            header(&res, "x-ratelimit-remaining-tokens"),
            Some(left),
            "call {}: at admission, before this call settles",
            i + 1
        );
        assert!(header(&res, "x-ratelimit-reset-tokens").is_some());
        // The request limit is the binding one in X-RateLimit-*.
        assert_eq!(header(&res, "x-ratelimit-limit"), Some(50));
        let json: Value = res.json().await.unwrap();
        assert_eq!(json["usage"]["total_tokens"], 400);
        assert_eq!(json["usage"]["prompt_tokens"], 2);
    }
    // 1,200 used of 1,000: in debt by 200. The fourth is refused for
    // tokens, though the requests have 47 left. It conforms when the debt
    // and its own token are paid: 201 × 3.6 s = 723.6 s → 724.
    let res = complete(&c, &url, "free-demo-key", body.clone()).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(724));
    assert_eq!(
        header(&res, "x-ratelimit-limit"),
        Some(1000),
        "the token limit binds"
    );
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), Some(0));
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["unit"], "tokens", "{problem}");
    assert_eq!(problem["limit"], 1000, "{problem}");
    assert_eq!(problem["window_seconds"], 3600, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("1000 `ai` tokens per 3600 s"),
        "{problem}"
    );
    // The usage endpoint shows both: requests with room, tokens spent.
    let usage: Value = usage(&c, &server.url("/v1/rate_limit"), "free-demo-key").await;
    let ai = &usage["categories"]["ai"];
    // The binding limit is the token limit, as in the 429's headers.
    assert_eq!(
        (&ai["limit"], &ai["remaining"]),
        (&json!(1000), &json!(0)),
        "{usage}"
    );
    assert_eq!(ai["limits"][0]["remaining"], 47, "{usage}");
    assert_eq!(ai["tokens"]["limit"], 1000, "{usage}");
    assert_eq!(ai["tokens"]["remaining"], 0, "{usage}");
    let units: Vec<&str> = ai["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["unit"].as_str().unwrap())
        .collect();
    assert_eq!(units, ["requests", "tokens"], "{usage}");
    // A bad body is a 400, and an estimate above the limit can never fit.
    let res = complete(
        &c,
        &url,
        "pro-demo-key",
        json!({ "prompt": "x", "max_tokens": 0 }),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = c
        .post(&url)
        .header("x-api-key", "free-demo-key")
        .header("x-max-tokens", "2000")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tierlimit:problem:cost-exceeds-limit");
    assert_eq!(
        (problem["unit"].as_str(), problem["limit"].as_u64()),
        (Some("tokens"), Some(1000))
    );
}

#[tokio::test]
async fn a_stream_settles_what_it_reported_and_an_estimate_is_reserved() {
    setup();
    let backend = common::fake_memory();
    let layer = demo::limits(token_policy(), backend);
    let handle = layer.clone();
    let server = serve(demo::app(layer)).await;
    let c = client();
    let url = server.url("/v1/ai/completions");
    // An estimate of 500 is reserved at admission.
    let res = c
        .post(&url)
        .header("x-api-key", "free-demo-key")
        .header("x-max-tokens", "500")
        .json(&json!({ "prompt": "one two three", "max_tokens": 40, "stream": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), Some(500));
    let text = res.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        events.len(),
        4,
        "3 chunks of 16, 16, 8, then [DONE]: {text}"
    );
    assert_eq!(events[3], "[DONE]");
    let last: Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(last["usage"]["total_tokens"], 43);
    // Settled: 43 used, the rest of the 500 refunded.
    assert_eq!(
        tokens_left(&handle, &c, &server, "free-demo-key", 1000 - 43).await,
        1000 - 43
    );
}

/// The `ai` tokens left for `key`, as the usage endpoint reports them,
/// once they equal `want` (a settlement lands when the server drops the
/// stream, a moment after the client read its end): bounded.
async fn tokens_left<E, B>(
    _layer: &RateLimitLayer<E, B>,
    c: &reqwest::Client,
    server: &common::Server,
    key: &str,
    want: u64,
) -> u64 {
    let mut last = 0;
    for _ in 0..500 {
        last = ai_tokens_now(c, server, key).await;
        if last == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    last
}

/// The `ai` tokens left for `key` now, as the usage endpoint reports them.
async fn ai_tokens_now(c: &reqwest::Client, server: &common::Server, key: &str) -> u64 {
    let usage: Value = usage(c, &server.url("/v1/rate_limit"), key).await;
    usage["categories"]["ai"]["tokens"]["remaining"]
        .as_u64()
        .unwrap()
}

/// A streaming endpoint that reports 10 tokens per chunk, 20 chunks, and
/// counts what it reported (the server-side truth). After its first chunk
/// each stream waits for `go`: the clients that go away are gone by then,
/// so their streams are cut short however fast the machine writes.
fn streaming_app<B: Backend>(
    policy: Policy,
    backend: B,
    reported: Arc<AtomicU64>,
    go: tokio::sync::watch::Receiver<bool>,
) -> Router {
    use axum::response::sse::{Event, Sse};
    let layer = RateLimitLayer::builder(policy).backend(backend).build();
    Router::new()
        .route(
            "/v1/ai/stream",
            axum::routing::post(move |axum::Extension(meter): axum::Extension<TokenMeter>| {
                let (reported, go) = (Arc::clone(&reported), go.clone());
                async move {
                    let events = futures_util::stream::unfold(0u32, move |i| {
                        let (meter, reported) = (meter.clone(), Arc::clone(&reported));
                        let mut go = go.clone();
                        async move {
                            if i == 20 {
                                return None;
                            }
                            if i == 1 {
                                go.wait_for(|go| *go).await.ok()?;
                            }
                            meter.add(10);
                            reported.fetch_add(10, Ordering::Relaxed);
                            tokio::task::yield_now().await;
                            Some((
                                Ok::<_, std::convert::Infallible>(
                                    Event::default().data("tok ".repeat(10)),
                                ),
                                i + 1,
                            ))
                        }
                    });
                    Sse::new(events)
                }
            }),
        )
        .layer(layer)
}

/// Token intervals of 315 s: with a fake clock that stands still while
/// Redis's own clock runs, a bucket's key must not expire (Redis expires it
/// in real time when it would be full again in fake time) during the test.
const STREAM_POLICY: &str = r#"
categories = ["read", "write", "ai"]
[tiers.t]
read = "10/hour"
write = "10/hour"
ai = { requests = "100000/hour", tokens = "1000000/3650d" }
[[routes]]
path = "/v1/ai/*"
category = "ai"
[keys]
"k" = "t"
"#;

/// 40 concurrent streams, every third dropped by its client after its
/// first event: the bucket ends exactly at what the server reported.
async fn streams_settle_exactly_once<B: Backend + Clone>(backend: B) {
    streams_settle_exactly_once_then(backend, async || {}).await;
}

/// The same, with `held_back` run once the streams are over (a batched
/// backend gives back the units it holds, before the bucket is read).
async fn streams_settle_exactly_once_then<B: Backend + Clone>(
    backend: B,
    held_back: impl AsyncFn(),
) {
    let reported = Arc::new(AtomicU64::new(0));
    let policy = Policy::from_toml_str(STREAM_POLICY).unwrap();
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let server = serve(streaming_app(
        policy,
        backend.clone(),
        Arc::clone(&reported),
        go_rx,
    ))
    .await;
    let c = client();
    let (mut leaving, mut staying) = (Vec::new(), Vec::new());
    for i in 0..40 {
        let (c, url) = (c.clone(), server.url("/v1/ai/stream"));
        let task = tokio::spawn(async move {
            let mut res = c.post(url).header("x-api-key", "k").send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            if i % 3 == 0 {
                // Read one event, then go away.
                let _ = res.chunk().await.unwrap();
                drop(res);
            } else {
                while res.chunk().await.unwrap().is_some() {}
            }
        });
        if i % 3 == 0 {
            leaving.push(task);
        } else {
            staying.push(task);
        }
    }
    let stayed = staying.len() as u64;
    // The leaving clients are gone before any stream goes on.
    for t in leaving {
        t.await.unwrap();
    }
    go.send(true).unwrap();
    for t in staying {
        t.await.unwrap();
    }
    // Every stream settles once its server side is dropped: wait (bounded)
    // for the bucket to reach what was reported; it must land exactly.
    let policy = Policy::from_toml_str(STREAM_POLICY).unwrap();
    let (t, ai) = (policy.tier("t").unwrap(), policy.category("ai").unwrap());
    let token_limit = policy.limits(t, ai).tokens()[0];
    let layer = RateLimitLayer::builder(policy).backend(backend).build();
    let usage_server =
        serve(Router::new().route_service("/v1/rate_limit", layer.usage_service())).await;
    let mut left = 0;
    let mut want = 0;
    for _ in 0..2_000 {
        held_back().await;
        want = u64::from(token_limit.max()) - reported.load(Ordering::Relaxed);
        left = ai_tokens_now(&c, &usage_server, "k").await;
        if left == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    let total = reported.load(Ordering::Relaxed);
    assert!(total < 40 * 200, "some streams were cut short: {total}");
    assert!(total >= stayed * 200, "the others ran to the end: {total}");
    assert_eq!(
        left, want,
        "the bucket holds exactly the {total} tokens reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_settle_exactly_once_on_memory() {
    setup();
    let backend = common::fake_memory();
    streams_settle_exactly_once(backend).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_settle_exactly_once_on_redis() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    streams_settle_exactly_once(backend).await;
}

/// The same with batches on: the estimates come from batches, the
/// settlements land exactly once all the same.
#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_settle_exactly_once_on_redis_with_batches() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::batched_single_node_on_fake_clock().await;
    let held = backend.clone();
    streams_settle_exactly_once_then(backend, async || held.return_batches().await).await;
}

/// A key that owes tokens: the usage endpoint's `reset` for `ai` is the
/// reset its 429 says, hours off, not an hour (what a peek at an empty
/// bucket said). Both clocks stand still: the backend's and the layer's
/// Unix time.
async fn usage_reset_is_the_refusals_reset_while_tokens_are_owed<B: Backend>(backend: B) {
    const NOW: u64 = 1_900_000_000;
    let layer = RateLimitLayer::builder(token_policy())
        .extractor(demo::demo_extractor as demo::DemoExtractor)
        .backend(backend)
        .unix_clock(|| NOW)
        .build();
    let server = serve(demo::app(layer)).await;
    let c = client();
    let url = server.url("/v1/ai/completions");
    // One call reserves 1 token and uses 4,098 (2 prompt words + 4,096) of
    // 1,000 an hour: it owes 3,098, paid back at 3.6 s a token.
    let body = json!({ "prompt": "hello world", "max_tokens": 4096 });
    let res = complete(&c, &url, "free-demo-key", body.clone()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap()["usage"]["total_tokens"],
        4098
    );
    // The settlement lands when the server drops the response (bounded).
    let mut left = u64::MAX;
    for _ in 0..500 {
        left = ai_tokens_now(&c, &server, "free-demo-key").await;
        if left == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(left, 0, "the debt was settled");

    let res = complete(&c, &url, "free-demo-key", body).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let refused_reset = header(&res, "x-ratelimit-reset").unwrap();
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(1000), "tokens bind");
    // Full again when the 4,098 tokens are paid: 4,098 × 3.6 s.
    assert_eq!(refused_reset, NOW + 14_753);

    let usage: Value = usage(&c, &server.url("/v1/rate_limit"), "free-demo-key").await;
    let ai = &usage["categories"]["ai"];
    assert_eq!(ai["reset"], refused_reset, "{usage}");
    assert_eq!(ai["limit"], 1000, "{usage}");
    assert_eq!(ai["remaining"], 0, "{usage}");
    assert_eq!(ai["window"], 3600, "{usage}");
    assert_eq!(ai["tokens"]["reset"], refused_reset, "{usage}");
    assert_eq!(ai["limits"][1]["unit"], "tokens", "{usage}");
    assert_eq!(ai["limits"][1]["reset"], refused_reset, "{usage}");
    assert!(refused_reset > NOW + 3600);
}

#[tokio::test]
async fn usage_reset_is_the_refusals_reset_while_tokens_are_owed_on_memory() {
    setup();
    usage_reset_is_the_refusals_reset_while_tokens_are_owed(common::fake_memory()).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reset_is_the_refusals_reset_while_tokens_are_owed_on_redis() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    usage_reset_is_the_refusals_reset_while_tokens_are_owed(backend).await;
}

/// Refunds by response: 5xx and 304 give the request back, others count.
async fn refunds_by_status<B: Backend>(backend: B) {
    let policy = Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[tiers.t]
refund_on = ["5xx", "304"]
read = "3/hour"
write = "3/hour"
[[routes]]
path = "/usage"
exempt = true
[keys]
"k" = "t"
"#,
    )
    .unwrap();
    let layer = RateLimitLayer::builder(policy).backend(backend).build();
    let app = Router::new()
        .route_service("/usage", layer.usage_service())
        .route(
            "/status/{code}",
            axum::routing::get(
                |axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    axum::http::StatusCode::from_u16(code).unwrap()
                },
            ),
        )
        .layer(layer);
    let server = serve(app).await;
    let c = client();
    let get = |code: u16| {
        c.get(server.url(&format!("/status/{code}")))
            .header("x-api-key", "k")
            .send()
    };
    // Ten server errors and not-modifieds: every one given back (each is
    // charged at admission: at most 2 left, and never refused).
    for code in [500, 503, 304, 502, 304, 500, 500, 304, 599, 500] {
        let res = get(code).await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        assert!(header(&res, "x-ratelimit-remaining").is_some_and(|n| n <= 2));
    }
    // Refunds land when each response head passes (on Redis, on the
    // backend's own thread): wait, bounded, for the bucket to be full.
    let mut left = 0;
    for _ in 0..2_000 {
        let usage: Value = usage(&c, &server.url("/usage"), "k").await;
        left = usage["categories"]["read"]["remaining"].as_u64().unwrap();
        if left == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(left, 3, "every refund landed, none twice");
    // Successes and client errors count: three, then refused.
    for (code, left) in [(200, 2), (404, 1), (200, 0)] {
        let res = get(code).await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(left));
    }
    let res = get(200).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn refunds_by_status_on_memory() {
    setup();
    let backend = common::fake_memory();
    refunds_by_status(backend).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_by_status_on_redis_cluster() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_cluster, _clock, backend) = common::redis::cluster_on_fake_clock().await;
    refunds_by_status(backend).await;
}

/// The simple case: a handler that knows its usage only when it builds
/// its response puts a `TokenUsage` in the response's extensions.
#[tokio::test]
async fn a_response_extension_reports_usage() {
    setup();
    let policy = Policy::from_toml_str(STREAM_POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .build();
    let app = Router::new()
        .route(
            "/v1/ai/simple",
            axum::routing::post(|| async {
                let mut res = axum::response::IntoResponse::into_response("done");
                res.extensions_mut()
                    .insert(tierlimit::meter::TokenUsage(25));
                res
            }),
        )
        .route_service("/v1/rate_limit", layer.usage_service())
        .layer(layer);
    let server = serve(app).await;
    let c = client();
    for _ in 0..4 {
        let res = c
            .post(server.url("/v1/ai/simple"))
            .header("x-api-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    // The usage route is under the layer here: it counts one `read`, and
    // shows 4 × 25 tokens charged (settled before each response left).
    let usage: Value = usage(&c, &server.url("/v1/rate_limit"), "k").await;
    assert_eq!(
        usage["categories"]["ai"]["tokens"]["remaining"],
        1_000_000 - 100,
        "{usage}"
    );
}
