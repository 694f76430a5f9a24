//! Black-box tests: the demo server on 127.0.0.1:0, a real HTTP client, a
//! fake clock.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use common::{call, client, header, serve, spec_policy, unix_now};
use governor::clock::FakeRelativeClock;
use reqwest::StatusCode;
use serde_json::Value;
use tierlimit::{
    ApiKey, Extractor, HeaderOptions, MemoryBackend, Policy, RateLimitLayer,
    extract::{Identity, Rejection, RequestRef},
};

fn fake_layer(
    policy: Policy,
    clock: &FakeRelativeClock,
) -> RateLimitLayer<ApiKey, MemoryBackend<FakeRelativeClock>> {
    RateLimitLayer::builder(policy)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build()
}

async fn demo_server() -> (common::Server, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    let server = serve(demo::app(demo::limits(spec_policy(), backend))).await;
    (server, clock)
}

#[tokio::test]
async fn every_limited_response_has_the_four_headers() {
    let (server, _clock) = demo_server().await;
    let c = client();
    let before = unix_now();
    let res = call(&c, "GET", &server.url("/v1/account"), "free-demo-key").await;
    let after = unix_now();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(100));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(99));
    assert_eq!(header(&res, "x-ratelimit-window"), Some(3600));
    // Full again one emission interval (36 s) after one request.
    let reset = header(&res, "x-ratelimit-reset").unwrap();
    assert!(
        (before + 36..=after + 37).contains(&reset),
        "reset {reset} vs now {before}"
    );
    assert!(res.headers().get("retry-after").is_none());
    assert!(
        res.headers().get("ratelimit").is_none(),
        "draft fields are opt-in"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], "acct_demo");

    // Bearer works too, and each category has its own bucket.
    for (method, path, limit, window) in [
        ("PATCH", "/v1/account", 20, 3600),
        ("GET", "/v1/clusters", 100, 3600),
        ("POST", "/v1/clusters", 20, 3600),
        ("GET", "/v1/endpoints", 100, 3600),
        ("POST", "/v1/endpoints", 20, 3600),
        ("POST", "/v1/ai/completions", 50, 3600),
        ("POST", "/v1/training/jobs", 5, 86400),
    ] {
        let res = c
            .request(method.parse().unwrap(), server.url(path))
            .header("Authorization", "Bearer free-demo-key")
            // The demo model takes a JSON body; the other routes ignore it.
            .json(&serde_json::json!({ "prompt": "hi" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{method} {path}");
        assert_eq!(
            header(&res, "x-ratelimit-limit"),
            Some(limit),
            "{method} {path}"
        );
        assert_eq!(
            header(&res, "x-ratelimit-window"),
            Some(window),
            "{method} {path}"
        );
    }
    // Reads share one bucket across read routes: 100 − 1 − 2 = 97 left.
    let res = call(&c, "GET", &server.url("/v1/account"), "free-demo-key").await;
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(96));
}

#[tokio::test]
async fn free_tier_101st_read_is_refused_with_429() {
    let (server, clock) = demo_server().await;
    let c = client();
    for i in 0..100u64 {
        let res = call(&c, "GET", &server.url("/v1/clusters"), "free-demo-key").await;
        assert_eq!(res.status(), StatusCode::OK, "read {}", i + 1);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(99 - i));
    }
    let res = call(&c, "GET", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(header(&res, "retry-after"), Some(36));
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(100));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(0));
    assert_eq!(header(&res, "x-ratelimit-window"), Some(3600));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], 429);
    assert_eq!(body["tier"], "free");
    assert_eq!(body["category"], "read");
    assert_eq!(body["limit"], 100);
    assert_eq!(body["retry_after_seconds"], 36);
    assert_eq!(body["type"], "urn:tierlimit:problem:rate-limited");
    assert!(body["detail"].as_str().unwrap().contains("retry in 36 s"));

    // Other categories are unaffected; other keys too.
    let res = call(&c, "POST", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = call(&c, "GET", &server.url("/v1/clusters"), "pro-demo-key").await;
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(1000));

    // 35 s later still refused (retry rounds up); at 36 s exactly one more.
    clock.advance(Duration::from_secs(35));
    let res = call(&c, "GET", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(1));
    clock.advance(Duration::from_secs(1));
    let res = call(&c, "GET", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(0));
    let res = call(&c, "GET", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn free_training_sixth_job_refused_enterprise_unlimited() {
    let (server, _clock) = demo_server().await;
    let c = client();
    let jobs = server.url("/v1/training/jobs");
    let free_job = || call(&c, "POST", &jobs, "free-demo-key");
    for _ in 0..5 {
        assert_eq!(free_job().await.status(), StatusCode::OK);
    }
    let res = free_job().await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(86_400 / 5));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["category"], "training");

    for i in 0..60 {
        let res = call(
            &c,
            "POST",
            &server.url("/v1/training/jobs"),
            "enterprise-demo-key",
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK, "enterprise job {i}");
        assert!(
            res.headers().get("x-ratelimit-limit").is_none(),
            "unlimited carries no headers"
        );
        assert!(res.headers().get("x-ratelimit-remaining").is_none());
    }
    // Enterprise's other categories are limited and say so.
    let res = call(&c, "GET", &server.url("/v1/account"), "enterprise-demo-key").await;
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(10_000));
}

#[tokio::test]
async fn healthz_needs_no_key_and_carries_no_headers() {
    let (server, _clock) = demo_server().await;
    let res = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn bad_credentials_get_clear_4xx_never_500() {
    let (server, _clock) = demo_server().await;
    let c = client();
    let long = "k".repeat(300);
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, StatusCode, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "missing",
            vec![],
            StatusCode::UNAUTHORIZED,
            "missing-api-key",
        ),
        (
            "unknown",
            vec![("x-api-key", b"nope".to_vec())],
            StatusCode::UNAUTHORIZED,
            "unknown-api-key",
        ),
        (
            "basic auth",
            vec![("authorization", b"Basic Zm9vOmJhcg==".to_vec())],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
        (
            "empty",
            vec![("x-api-key", b"".to_vec())],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
        (
            "empty bearer",
            vec![("authorization", b"Bearer ".to_vec())],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
        (
            "non-utf8",
            vec![("x-api-key", b"k\xff\xfe".to_vec())],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
        (
            "oversized",
            vec![("x-api-key", long.clone().into_bytes())],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
        (
            "two keys",
            vec![
                ("x-api-key", b"free-demo-key".to_vec()),
                ("authorization", b"Bearer pro-demo-key".to_vec()),
            ],
            StatusCode::BAD_REQUEST,
            "malformed-api-key",
        ),
    ];
    for (name, headers, status, kind) in cases {
        let mut req = c.get(server.url("/v1/account"));
        for (k, v) in headers {
            req = req.header(k, reqwest::header::HeaderValue::from_bytes(&v).unwrap());
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), status, "{name}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            body["type"],
            format!("urn:tierlimit:problem:{kind}"),
            "{name}"
        );
        assert_eq!(body["status"], status.as_u16(), "{name}");
        assert!(!body["detail"].as_str().unwrap().is_empty(), "{name}");
        assert!(
            !body.to_string().contains("free-demo-key"),
            "{name}: never echo a key"
        );
    }
}

#[tokio::test]
async fn exact_count_under_concurrent_http_clients() {
    let (server, _clock) = demo_server().await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url) = (c.clone(), server.url("/v1/endpoints"));
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .header("X-API-Key", "free-demo-key")
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, limited), (20, 180), "free writes: 20 per hour");
}

#[tokio::test]
async fn ietf_draft_fields_are_opt_in() {
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::builder(spec_policy())
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .headers(HeaderOptions::default().ietf_draft(true).x_ratelimit(false))
        .build();
    let server = serve(demo::app(layer)).await;
    let res = client()
        .get(server.url("/v1/account"))
        .header("X-API-Key", "pro-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["ratelimit-policy"],
        "\"pro.read\";q=1000;w=3600"
    );
    assert_eq!(res.headers()["ratelimit"], "\"pro.read\";r=999;t=4");
    assert!(res.headers().get("x-ratelimit-limit").is_none());
}

const COST_POLICY: &str = r#"
categories = ["read", "write"]
[defaults]
missing_key = "anon"
[tiers.anon]
read = "3/minute"
write = "5/minute"
[tiers.free]
read = "100/hour"
write = "20/hour"
[[routes]]
method = "POST"
path = "/v1/batch"
category = "write"
cost = 5
[keys]
"k" = "free"
"#;

/// Cost from `X-Batch-Size` (1..=1000), otherwise the route's.
fn batch_cost(req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
    let id = ApiKey::new().extract(req, policy)?;
    match req.headers.get("x-batch-size") {
        None => Ok(id),
        Some(v) => {
            let n: u32 = v
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|n| (1..=1000).contains(n))
                .ok_or(Rejection::InvalidCost(
                    "X-Batch-Size must be a number from 1 to 1000",
                ))?;
            Ok(id.with_cost(n))
        }
    }
}

#[tokio::test]
async fn route_costs_extractor_costs_and_costs_above_the_limit() {
    let clock = FakeRelativeClock::default();
    let policy = Policy::from_toml_str(COST_POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .extractor(batch_cost)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    let app = Router::new()
        .route("/v1/batch", post(|| async { "done" }))
        .route("/v1/items", post(|| async { "ok" }))
        .layer(layer);
    let server = serve(app).await;
    let c = client();
    let send = |path: &str, size: Option<&str>| {
        let mut req = c.post(server.url(path)).header("X-API-Key", "k");
        if let Some(size) = size {
            req = req.header("x-batch-size", size);
        }
        req.send()
    };
    // The route costs 5.
    let res = send("/v1/batch", None).await.unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(15));
    // The route's cost is a floor: a count of 1 still takes 5 …
    let res = send("/v1/batch", Some("1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(10));
    // … and the extractor's count multiplies it: 1 × 5 = 5 more.
    let res = send("/v1/batch", Some("1")).await.unwrap();
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(5));
    // 2 × 5 = 10 with 5 left: refused (nothing taken), never lowered.
    let res = send("/v1/batch", Some("2")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(5));
    // A count whose product overflows is a cost above the limit, not a wrap.
    let res = send("/v1/batch", Some("1000")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // 6 with 5 left: a 429 that will pass later.
    let res = send("/v1/items", Some("6")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some(5));
    // 21 can never fit 20: a 400 that says so, not an endless 429 loop.
    let res = send("/v1/items", Some("21")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:tierlimit:problem:cost-exceeds-limit");
    assert_eq!(
        (body["cost"].as_u64(), body["limit"].as_u64()),
        (Some(21), Some(20))
    );
    assert!(body["detail"].as_str().unwrap().contains("never succeed"));
    // A malformed cost is a 400 too.
    let res = send("/v1/items", Some("lots")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:tierlimit:problem:invalid-cost");
}

#[tokio::test]
async fn anonymous_callers_are_limited_per_peer_ip() {
    let clock = FakeRelativeClock::default();
    let layer = fake_layer(Policy::from_toml_str(COST_POLICY).unwrap(), &clock);
    let server = serve(
        Router::new()
            .route("/v1/items", get(|| async { "ok" }))
            .layer(layer),
    )
    .await;
    let c = client();
    for left in [2, 1, 0] {
        let res = c.get(server.url("/v1/items")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(left));
    }
    let res = c.get(server.url("/v1/items")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(20));
    // A forged X-Forwarded-For does not buy a new bucket (no proxy trusted).
    let res = c
        .get(server.url("/v1/items"))
        .header("x-forwarded-for", "6.6.6.6")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // A key still works.
    let res = call(&c, "GET", &server.url("/v1/items"), "k").await;
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(100));
}

#[tokio::test]
async fn identity_from_an_earlier_auth_layer() {
    let clock = FakeRelativeClock::default();
    let policy = spec_policy();
    let pro = policy.tier("pro").unwrap();
    let layer = RateLimitLayer::builder(policy)
        .extractor(tierlimit::FromExtension)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    // The "auth layer": maps a session header to an identity.
    let app = Router::new()
        .route("/v1/account", get(|| async { "ok" }))
        .layer(layer)
        .layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                if req.headers().contains_key("x-session") {
                    req.extensions_mut()
                        .insert(Identity::new("user-7").with_tier(pro));
                }
                next.run(req).await
            },
        ));
    let server = serve(app).await;
    let res = client()
        .get(server.url("/v1/account"))
        .header("x-session", "s")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(1000));
    let res = client()
        .get(server.url("/v1/account"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_demo_closes_connections_that_never_finish_their_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = demo::app(demo::limits(spec_policy(), MemoryBackend::new()));
    let server = tokio::spawn(demo::serve_connections(
        listener,
        app,
        Duration::from_millis(200),
    ));
    // A complete request is served, with the peer address known.
    let res = client()
        .get(format!("http://{addr}/v1/account"))
        .header("x-api-key", "free-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Half a request head, then silence: the server hangs up by itself.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /v1/account HTTP/1.1\r\nHost: x\r\nX-API-Key: free")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "unexpected answer: {text}"
    );
    server.abort();
}

/// A layer writing no header asks its backend not to describe allowed
/// requests (`Check::describe` false): it admits and refuses exactly as
/// one that writes them, reserve included, and its refusals are described
/// in full (body, `Retry-After`). Two servers, same traffic, same clock
/// steps.
#[tokio::test]
async fn a_layer_writing_no_header_refuses_as_one_that_does() {
    const RESERVED: &str = r#"
categories = ["read", "write"]
[tiers.crit]
read = "5/minute"
write = "5/minute"
priority_reserve = "20%"
[keys]
"c" = "crit"
"#;
    let start = |headers: HeaderOptions| {
        let clock = FakeRelativeClock::default();
        let layer = RateLimitLayer::builder(Policy::from_toml_str(RESERVED).unwrap())
            .backend(MemoryBackend::builder().clock(clock.clone()).build())
            .headers(headers)
            .build();
        let app = Router::new()
            .route("/v1/x", get(|| async { "ok" }))
            .layer(layer);
        (app, clock)
    };
    let (loud, loud_clock) = start(HeaderOptions::default());
    let (quiet, quiet_clock) = start(HeaderOptions::default().x_ratelimit(false));
    let (loud, quiet) = (serve(loud).await, serve(quiet).await);
    let c = client();
    let send = |server: &common::Server, critical: bool| {
        let mut req = c.get(server.url("/v1/x")).header("x-api-key", "c");
        if critical {
            req = req.header("x-request-priority", "critical");
        }
        req.send()
    };
    // Normal requests stop at 4 (the reserve is 1), critical ones get the
    // fifth, the sixth none; a minute later, the same again.
    let script = [false, false, false, false, false, true, true];
    for round in 0..2 {
        let mut admitted = 0;
        for (i, critical) in script.iter().enumerate() {
            let l = send(&loud, *critical).await.unwrap();
            let q = send(&quiet, *critical).await.unwrap();
            let ctx = format!("round {round}, request {i}");
            assert_eq!(l.status(), q.status(), "{ctx}");
            assert_eq!(
                header(&l, "retry-after"),
                header(&q, "retry-after"),
                "{ctx}"
            );
            if q.status() == StatusCode::OK {
                admitted += 1;
                assert!(q.headers().get("x-ratelimit-remaining").is_none(), "{ctx}");
                assert!(l.headers().get("x-ratelimit-remaining").is_some(), "{ctx}");
                continue;
            }
            assert_eq!(q.status(), StatusCode::TOO_MANY_REQUESTS, "{ctx}");
            assert!(header(&q, "retry-after").is_some_and(|r| r > 0), "{ctx}");
            let (l, q): (Value, Value) = (l.json().await.unwrap(), q.json().await.unwrap());
            assert_eq!(l, q, "{ctx}");
            // A normal request's limit is the limit less its reserve.
            let limit = if *critical { 5 } else { 4 };
            assert_eq!(q["limit"], limit, "{ctx}");
        }
        // Four normal requests and one critical: exactly the limit.
        assert_eq!(admitted, 5, "round {round}");
        loud_clock.advance(Duration::from_secs(60));
        quiet_clock.advance(Duration::from_secs(60));
    }
}
