//! Operator controls: custom limits, boosts, live policy changes and
//! upgrades, priority reserves, shadow mode, usage checks and batches; on
//! the memory backend and (where a point says so) on Redis.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use common::{client, serve, spec_policy};
use http::{Request, StatusCode};
use serde_json::Value;
use tierlimit::policy::{Adjust, Shadow};
use tierlimit::{Limit, Policy, RateLimitLayer, backend::Backend, policy::Rule};
use tower::ServiceExt;

const OPS: &str = r#"
categories = ["read", "write"]
[tiers.free]
read = "10/minute"
write = "10/minute"
[tiers.pro]
read = "100/minute"
write = "100/minute"
[tiers.crit]
read = "100/hour"
write = "100/hour"
priority_reserve = "20%"
[keys]
"k" = "free"
"vip" = "free"
"c" = "crit"
[overrides."vip"]
read = "x3"
[[boosts]]
tier = "free"
category = "read"
adjust = "x2"
start = "1000"
end = "2000"
[[boosts]]
key = "k"
adjust = "50/minute"
start = "3000"
end = "4000"
"#;

/// Every test hashes keys with the Redis tests' shared secret, set first.
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

async fn get_limit(app: &Router, key: &str) -> (StatusCode, Option<u64>) {
    let req = Request::get("/r")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let limit = res
        .headers()
        .get("x-ratelimit-limit")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (res.status(), limit)
}

/// Custom limits, boosts starting and lapsing, run-time edits and an
/// upgrade, on any backend.
async fn overrides_boosts_upgrades<B: Backend>(backend: B) {
    let unix = Arc::new(AtomicU64::new(500));
    let clock = Arc::clone(&unix);
    let layer = RateLimitLayer::builder(Policy::from_toml_str(OPS).unwrap())
        .backend(backend)
        .unix_clock(move || clock.load(Ordering::Relaxed))
        .build();
    let handle = layer.policy_handle();
    let app = Router::new()
        .route("/r", get(|| async { "ok" }))
        .layer(layer);

    // Before the boost: the tier's limit, and the key's custom limit (x3).
    assert_eq!(get_limit(&app, "k").await.1, Some(10));
    assert_eq!(get_limit(&app, "vip").await.1, Some(30));
    // Inside the boost window: x2, on top of the key's own limit.
    unix.store(1000, Ordering::Relaxed);
    assert_eq!(get_limit(&app, "k").await.1, Some(20));
    assert_eq!(get_limit(&app, "vip").await.1, Some(60));
    // The boost lapses by itself.
    unix.store(2000, Ordering::Relaxed);
    assert_eq!(get_limit(&app, "k").await.1, Some(10));
    // A boost for one key, with an absolute limit, in every category.
    unix.store(3500, Ordering::Relaxed);
    assert_eq!(get_limit(&app, "k").await.1, Some(50));
    assert_eq!(get_limit(&app, "vip").await.1, Some(30), "only that key");
    unix.store(4000, Ordering::Relaxed);
    assert_eq!(get_limit(&app, "k").await.1, Some(10));

    // A custom limit set at run time, from the next request on.
    handle
        .update(|b| {
            b.custom_limit(
                "k",
                "read",
                Adjust::Set(Rule::Limited(Limit::per_minute(3))),
            )
        })
        .unwrap();
    let mut ok = 0;
    for _ in 0..5 {
        let (status, limit) = get_limit(&app, "k").await;
        assert_eq!(limit, Some(3));
        ok += u32::from(status == StatusCode::OK);
    }
    assert_eq!(ok, 3, "a changed limit starts a fresh bucket");
    // An upgrade: the key is limited by its new tier from its next request.
    handle
        .update(|b| b.clear_custom_limits("k").set_key_tier("k", "pro"))
        .unwrap();
    let (status, limit) = get_limit(&app, "k").await;
    assert_eq!((status, limit), (StatusCode::OK, Some(100)));
    // An invalid edit is refused and changes nothing.
    let before = handle.current();
    assert!(handle.update(|b| b.set_key_tier("k", "gold")).is_err());
    assert!(Arc::ptr_eq(&before, &handle.current()));
}

#[tokio::test]
async fn overrides_boosts_and_upgrades_in_memory() {
    setup();
    overrides_boosts_upgrades(common::fake_memory()).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test]
async fn overrides_boosts_and_upgrades_on_redis() {
    setup();
    if !common::redis::available() {
        return;
    }
    common::redis::init_secret();
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    overrides_boosts_upgrades(backend).await;
}

/// 20% reserve: concurrent normal requests stop at 80, critical ones get
/// the other 20, and the total never exceeds 100.
async fn priority_reserve<B: Backend>(backend: B) {
    let layer = RateLimitLayer::builder(Policy::from_toml_str(OPS).unwrap())
        .backend(backend)
        .build();
    let app = Router::new()
        .route("/r", get(|| async { "ok" }))
        .layer(layer);
    let send = |priority: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut req = Request::get("/r").header("x-api-key", "c");
            if let Some(p) = priority {
                req = req.header("x-request-priority", p);
            }
            let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            let limit: Option<u64> = res
                .headers()
                .get("x-ratelimit-limit")
                .map(|v| v.to_str().unwrap().parse().unwrap());
            (res.status(), limit)
        }
    };
    let run = |n: usize, p: Option<&'static str>| async move {
        let ok = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (fut, ok) = (
                send(if i % 2 == 0 {
                    p
                } else {
                    p.or(Some("sheddable"))
                }),
                Arc::clone(&ok),
            );
            tasks.push(tokio::spawn(async move {
                let (status, limit) = fut.await;
                assert!(limit.is_some());
                if status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        ok.load(Ordering::Relaxed)
    };
    assert_eq!(
        run(200, None).await,
        80,
        "normal and sheddable stop at 80% of 100"
    );
    assert_eq!(
        send(None).await,
        (StatusCode::TOO_MANY_REQUESTS, Some(80)),
        "they see the 80 that applies"
    );
    assert_eq!(
        run(100, Some("critical")).await,
        20,
        "critical requests get the reserve"
    );
    assert_eq!(
        send(Some("critical")).await,
        (StatusCode::TOO_MANY_REQUESTS, Some(100))
    );
    assert_eq!(
        send(Some("urgent!")).await.0,
        StatusCode::BAD_REQUEST,
        "a bad priority is a 400"
    );
    // Tiers without a reserve ignore the header entirely.
    let req = Request::get("/r")
        .header("x-api-key", "k")
        .header("x-request-priority", "whatever")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_reserve_under_contention_in_memory() {
    setup();
    priority_reserve(common::fake_memory()).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_reserve_under_contention_on_redis() {
    setup();
    if !common::redis::available() {
        return;
    }
    common::redis::init_secret();
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    priority_reserve(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_is_atomic_and_invalid_reloads_change_nothing() {
    setup();
    let a = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"100000/hour\"\nwrite = \"1/hour\"\n[keys]\n\"k\" = \"t\"").unwrap();
    let b = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"200000/minute\"\nwrite = \"1/hour\"\n[keys]\n\"k\" = \"t\"").unwrap();
    let layer = RateLimitLayer::builder(a.clone())
        .backend(common::fake_memory())
        .build();
    let handle = layer.policy_handle();
    let server = serve(
        Router::new()
            .route("/r", get(|| async { "ok" }))
            .layer(layer),
    )
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), server.url("/r"));
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..50 {
                let res = c.get(&url).header("x-api-key", "k").send().await.unwrap();
                assert_eq!(res.status(), 200);
                let h = |n: &str| res.headers()[n].to_str().unwrap().parse::<u64>().unwrap();
                seen.push((h("x-ratelimit-limit"), h("x-ratelimit-window")));
            }
            seen
        }));
    }
    let bad = std::env::temp_dir().join(format!("tierlimit-bad-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "categories = [\"read\"]\n[tiers.t]\nread = \"0/hour\"\n",
    )
    .unwrap();
    for i in 0..200 {
        handle.replace(if i % 2 == 0 { b.clone() } else { a.clone() });
        // An invalid policy is refused with its error; the old one stays.
        let before = handle.current();
        let err = handle.reload(&bad).unwrap_err();
        assert_eq!(err.entry(), "tiers.t.read");
        assert!(Arc::ptr_eq(&before, &handle.current()));
        tokio::task::yield_now().await;
    }
    let _ = std::fs::remove_file(&bad);
    let mut both = (false, false);
    for t in tasks {
        for (limit, window) in t.await.unwrap() {
            // Every response is wholly one policy or wholly the other.
            match (limit, window) {
                (100_000, 3600) => both.0 = true,
                (200_000, 60) => both.1 = true,
                other => panic!("a response mixing two policies: {other:?}"),
            }
        }
    }
    assert!(both.0 || both.1);
}

fn free_json(res: &Value, category: &str, field: &str) -> u64 {
    res["categories"][category][field].as_u64().unwrap()
}

#[tokio::test]
async fn usage_endpoint_override_from_file_and_batches_through_the_demo() {
    setup();
    let backend = common::fake_memory();
    let server = serve(demo::app(demo::limits(spec_policy(), backend))).await;
    let c = client();
    let usage = |key: &'static str| {
        let (c, url) = (c.clone(), server.url("/v1/rate_limit"));
        async move {
            let res = c.get(url).header("x-api-key", key).send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert!(
                res.headers().get("x-ratelimit-limit").is_none(),
                "usage checks are not limited"
            );
            res.json::<Value>().await.unwrap()
        }
    };
    let u = usage("free-demo-key").await;
    assert_eq!(u["tier"], "free");
    assert_eq!(
        (
            free_json(&u, "read", "limit"),
            free_json(&u, "read", "remaining")
        ),
        (100, 100)
    );
    assert_eq!(
        (
            free_json(&u, "training", "limit"),
            free_json(&u, "training", "window")
        ),
        (5, 86_400)
    );
    for _ in 0..3 {
        c.get(server.url("/v1/account"))
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
    }
    // Checking usage consumes nothing, however often.
    for _ in 0..20 {
        let u = usage("free-demo-key").await;
        assert_eq!(free_json(&u, "read", "remaining"), 97);
    }
    // The policy file's custom limit for the enterprise key, and unlimited.
    let u = usage("enterprise-demo-key").await;
    assert_eq!(free_json(&u, "ai", "limit"), 20_000);
    assert_eq!(u["categories"]["training"]["unlimited"], true);
    let res = c
        .post(server.url("/v1/ai/completions"))
        .header("x-api-key", "enterprise-demo-key")
        .json(&serde_json::json!({ "prompt": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-ratelimit-limit"], "20000");
    let res = c.get(server.url("/v1/rate_limit")).send().await.unwrap();
    assert_eq!(res.status(), 401);

    // Batches: the cost from X-Batch-Size or ?size=, validated and capped.
    let batch = |size: Option<&str>, query: &str| {
        let mut req = c
            .post(server.url(&format!("/v1/batch{query}")))
            .header("x-api-key", "free-demo-key");
        if let Some(s) = size {
            req = req.header("x-batch-size", s);
        }
        req.send()
    };
    let res = batch(Some("10"), "").await.unwrap();
    assert_eq!(
        (
            res.status().as_u16(),
            res.headers()["x-ratelimit-remaining"].to_str().unwrap()
        ),
        (200, "10")
    );
    let res = batch(None, "?size=5").await.unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining"], "5");
    for bad in ["0", "101", "lots"] {
        let res = batch(Some(bad), "").await.unwrap();
        assert_eq!(res.status(), 400, "{bad}");
        assert_eq!(
            res.json::<Value>().await.unwrap()["type"],
            "urn:tierlimit:problem:invalid-cost"
        );
    }
    let res = batch(Some("30"), "").await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["type"],
        "urn:tierlimit:problem:cost-exceeds-limit"
    );
    let res = batch(Some("6"), "").await.unwrap();
    assert_eq!(res.status(), 429, "6 with 5 left");

    // Only the batch route reads a batch size: elsewhere it changes nothing.
    for (method, path) in [("GET", "/v1/account"), ("POST", "/v1/ai/completions")] {
        let res = c
            .request(method.parse().unwrap(), server.url(path))
            .header("x-api-key", "pro-demo-key")
            .header("x-batch-size", "5")
            .json(&serde_json::json!({ "prompt": "hi" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let limit: u32 = res.headers()["x-ratelimit-limit"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let remaining: u32 = res.headers()["x-ratelimit-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(remaining, limit - 1, "{path}: a cost of 1, not 5");
    }
}

#[tokio::test]
async fn shadow_mode_refuses_nothing_but_counts_and_sends_headers() {
    setup();
    let policy = spec_policy()
        .to_builder()
        .shadow(Shadow::default().tiers(["free"]))
        .build()
        .unwrap();
    let backend = common::fake_memory();
    let layer = demo::limits(policy, backend);
    let server = serve(demo::app(layer.clone())).await;
    let c = client();
    for i in 0..8u64 {
        let res = c
            .post(server.url("/v1/training/jobs"))
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "job {}: shadow mode refuses nothing",
            i + 1
        );
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            (4u64.saturating_sub(i)).to_string().as_str()
        );
        assert!(res.headers().get("retry-after").is_none());
    }
    assert_eq!(
        layer.shadow_refusals(),
        3,
        "8 jobs, 5 allowed, 3 would have been refused"
    );
    // Other tiers are enforced as usual.
    for _ in 0..20 {
        c.post(server.url("/v1/training/jobs"))
            .header("x-api-key", "pro-demo-key")
            .send()
            .await
            .unwrap();
    }
    let res = c
        .post(server.url("/v1/training/jobs"))
        .header("x-api-key", "pro-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(layer.shadow_refusals(), 3);
}

#[test]
fn policy_handles_of_one_layer_serialise_their_updates() {
    setup();
    // Two handles, 500 updates each, all at once: every edit survives.
    let layer = RateLimitLayer::new(Policy::from_toml_str(OPS).unwrap());
    let handles = [layer.policy_handle(), layer.policy_handle()];
    std::thread::scope(|s| {
        for (h, handle) in handles.iter().enumerate() {
            for t in 0..4 {
                s.spawn(move || {
                    for i in 0..125 {
                        let key = format!("h{h}-t{t}-{i}");
                        handle.update(|b| b.set_key_tier(&key, "pro")).unwrap();
                    }
                });
            }
        }
    });
    let policy = layer.policy();
    let pro = policy.tier("pro").unwrap();
    let mut listed = 0;
    for h in 0..2 {
        for t in 0..4 {
            for i in 0..125 {
                let key = format!("h{h}-t{t}-{i}");
                if policy.key_tier(&key, tierlimit::key::KeyId::of(&key)) == Some(pro) {
                    listed += 1;
                }
            }
        }
    }
    assert_eq!(listed, 1_000, "edits lost between handles");
}

#[tokio::test]
async fn a_reserve_never_takes_a_whole_custom_limit() {
    setup();
    // The tier reserves 20%; a custom limit of 1/hour for one key would
    // reserve all of it. Normal requests still get the one request.
    let policy = Policy::from_toml_str(OPS)
        .unwrap()
        .to_builder()
        .custom_limit("c", "*", Adjust::Set(Rule::Limited(Limit::per_hour(1))))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .build();
    let app = Router::new()
        .route("/x", get(|| async { "ok" }))
        .layer(layer);
    let req = || {
        Request::get("/x")
            .header("x-api-key", "c")
            .body(Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = app.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}
