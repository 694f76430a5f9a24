//! Tier-aware load shedding (the policy's `[overload]` table), black-box
//! through the demo on 127.0.0.1:0 with a real HTTP client, and through a
//! real tonic client: the order in which tiers are shed, that a shed
//! request consumed nothing, the answers (503 problem document, gRPC
//! UNAVAILABLE with a pushback), and the tables refused at load.
//!
//! Requests are held in flight with the demo's saturated dependency
//! (`GET /v1/endpoints?work_ms=10000`: they wait for one of 8 workers, then
//! work); the test never waits for them to end: it drops them, and the
//! layer gets their places back.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod grpc_demo;

use std::time::Duration;

use common::{Server, client};
use serde_json::Value;
use tierlimit::{Policy, RateLimitLayer};
use tokio::task::JoinHandle;

const ADMIN: &str = "overload-admin-token";

/// The demo's overload policy with its `[overload]` table replaced by
/// `table`.
fn policy_with(table: &str) -> Result<Policy, tierlimit::PolicyError> {
    // Keys are hashed when a policy is built: with the Redis tests' secret,
    // so every test of this binary hashes alike.
    #[cfg(feature = "redis")]
    common::redis::init_secret();
    Policy::from_toml_str(&format!("{}\n{table}", demo_head()))
}

/// The demo's overload policy without its `[overload]` table.
fn demo_head() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/overload.toml"
    ))
    .unwrap();
    text.split("\n[overload]").next().unwrap().to_owned()
}

/// A fixed capacity of 10: free shed at 5 in flight, pro at 8, enterprise
/// at 9, critical requests at 10.
const FIXED_10: &str = r#"
[overload]
capacity = 10
[overload.shed_at]
free = 0.5
pro = 0.8
enterprise = 0.9
"#;

async fn demo_server(policy: Policy) -> Server {
    // A clock that stands still: remaining counts are exact.
    demo_server_on(policy, common::fake_memory()).await
}

async fn demo_server_on<B: tierlimit::backend::Backend>(policy: Policy, backend: B) -> Server {
    let layer = demo::limits(policy, backend);
    common::serve(demo::app_with_admin(layer, Some(ADMIN))).await
}

/// The overload state the admin API reports.
async fn overload(s: &Server) -> Value {
    let res = client()
        .get(s.url("/admin/v1/overload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Requests in flight, held by the demo's workers, until dropped.
struct Held(Vec<JoinHandle<()>>);

impl Drop for Held {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Holds `n` requests of `key` in flight (with `X-Request-Priority` if
/// given), and waits until the layer counts `expect` in flight in all.
async fn hold(
    s: &Server,
    held: &mut Held,
    key: &str,
    priority: Option<&str>,
    n: usize,
    expect: u64,
) {
    for _ in 0..n {
        let url = s.url("/v1/endpoints?work_ms=10000");
        let key = key.to_owned();
        let priority = priority.map(str::to_owned);
        held.0.push(tokio::spawn(async move {
            let mut req = client().get(url).header("X-API-Key", key);
            if let Some(p) = priority {
                req = req.header("X-Request-Priority", p);
            }
            // Dropped (aborted) long before it could answer.
            let _ = req.send().await;
        }));
    }
    in_flight_reaches(s, expect).await;
}

/// Waits (bounded) until the layer counts `n` requests in flight.
async fn in_flight_reaches(s: &Server, n: u64) {
    for _ in 0..2_000 {
        if overload(s).await["in_flight"] == n {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("in flight never reached {n}: {}", overload(s).await);
}

/// One quick request (no work) as `key`: its response.
async fn quick(s: &Server, key: &str, priority: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .get(s.url("/v1/endpoints"))
        .header("X-API-Key", key);
    if let Some(p) = priority {
        req = req.header("X-Request-Priority", p);
    }
    req.send().await.unwrap()
}

/// `key`'s remaining read requests, by the usage endpoint.
async fn remaining(s: &Server, key: &str) -> u64 {
    let res = common::call(&client(), "GET", &s.url("/v1/rate_limit"), key).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["categories"]["read"]["remaining"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_are_shed_in_order_free_first_enterprise_last_critical_after_that() {
    tiers_in_order(&demo_server(fixed_10()).await).await;
}

/// [`FIXED_10`], free reads limited to 100 an hour (remaining counts show
/// what was charged).
fn fixed_10() -> Policy {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
    let head = demo_head().replace(
        "[tiers.free]\nread = \"100000/minute\"",
        "[tiers.free]\nread = \"100/hour\"",
    );
    Policy::from_toml_str(&format!("{head}\n{FIXED_10}")).unwrap()
}

/// The order of shedding under a fixed capacity of 10, on `s`'s backend,
/// and what the shed requests consumed: nothing.
async fn tiers_in_order(s: &Server) {
    let before = remaining(s, "free-demo-key").await;
    let mut held = Held(Vec::new());

    hold(s, &mut held, "free-demo-key", None, 5, 5).await;
    // 5 of 10 in flight: free is shed, the others are not.
    let shed = quick(s, "free-demo-key", None).await;
    assert_eq!(shed.status(), 503);
    assert_eq!(quick(s, "pro-demo-key", None).await.status(), 200);
    assert_eq!(quick(s, "enterprise-demo-key", None).await.status(), 200);

    // The shed answer: the draft's problem type, Retry-After, and the
    // headers that describe the quota.
    assert_eq!(common::header(&shed, "retry-after"), Some(1));
    assert_eq!(common::header(&shed, "x-ratelimit-limit"), Some(100));
    assert_eq!(common::header(&shed, "x-ratelimit-window"), Some(3600));
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    let body: Value = shed.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );
    assert_eq!(body["status"], 503);
    assert_eq!(body["tier"], "free");
    assert_eq!(body["retry_after_seconds"], 1);

    hold(s, &mut held, "pro-demo-key", None, 3, 8).await;
    // 8 of 10: pro is shed too; enterprise is not; a critical free
    // request is not either.
    assert_eq!(quick(s, "pro-demo-key", None).await.status(), 503);
    assert_eq!(quick(s, "enterprise-demo-key", None).await.status(), 200);
    assert_eq!(
        quick(s, "free-demo-key", Some("critical")).await.status(),
        200
    );

    hold(s, &mut held, "enterprise-demo-key", None, 1, 9).await;
    // 9 of 10: enterprise is shed; critical requests of any tier are not.
    assert_eq!(quick(s, "enterprise-demo-key", None).await.status(), 503);
    assert_eq!(
        quick(s, "pro-demo-key", Some("critical")).await.status(),
        200
    );
    // A malformed priority is the client's mistake, said as such.
    assert_eq!(
        quick(s, "pro-demo-key", Some("urgent!")).await.status(),
        400
    );

    hold(s, &mut held, "free-demo-key", Some("critical"), 1, 10).await;
    // 10 of 10: everything is shed, critical requests too.
    assert_eq!(
        quick(s, "enterprise-demo-key", Some("critical"))
            .await
            .status(),
        503
    );
    assert_eq!(overload(s).await["capacity"], 10);

    // Every held request dropped: every place comes back.
    drop(held);
    in_flight_reaches(s, 0).await;
    // Free was admitted 5 (held) + 1 (critical quick) + 1 (critical held)
    // times; its 2 shed requests consumed nothing.
    let after = remaining(s, "free-demo-key").await;
    assert_eq!(before - after, 7, "before {before}, after {after}");
    assert_eq!(quick(s, "free-demo-key", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_categories_and_exempt_routes_are_shed_unless_the_policy_spares_them() {
    let table = |spare: bool| {
        format!(
            "[overload]\ncapacity = 2\nshed_exempt_routes = {}\nshed_unlimited = {}\n",
            !spare, !spare
        )
    };
    for spare in [false, true] {
        #[cfg(feature = "redis")]
        common::redis::init_secret();
        let head = demo_head().replace(
            "[tiers.enterprise]\nread = \"100000/minute\"",
            "[tiers.enterprise]\nread = \"unlimited\"",
        );
        let policy = Policy::from_toml_str(&format!("{head}\n{}", table(spare))).unwrap();
        let s = demo_server(policy).await;
        let mut held = Held(Vec::new());
        hold(&s, &mut held, "free-demo-key", None, 2, 2).await;
        // The usage endpoint is an exempt route; enterprise reads are
        // unlimited.
        let usage = common::call(&client(), "GET", &s.url("/v1/rate_limit"), "pro-demo-key").await;
        let unlimited = quick(&s, "enterprise-demo-key", None).await;
        let want = if spare { 200 } else { 503 };
        assert_eq!(usage.status(), want, "exempt route, spared: {spare}");
        assert_eq!(unlimited.status(), want, "unlimited, spared: {spare}");
        if !spare {
            // An exempt route's shed answer names no tier.
            let body: Value = usage.json().await.unwrap();
            assert!(body.get("tier").is_none(), "{body}");
            assert!(unlimited.headers().get("x-ratelimit-limit").is_none());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_capacity_is_reported_by_the_usage_endpoint_and_the_admin_api() {
    let s = demo_server(
        policy_with(
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmin_capacity = 2\nmax_capacity = 40\ninitial_capacity = 12\n",
        )
        .unwrap(),
    )
    .await;
    let v = overload(&s).await;
    assert_eq!(v["capacity"], 12);
    assert_eq!(v["adaptive"], true);
    assert_eq!(v["target_latency_ms"], 50.0);
    assert_eq!(
        (v["min_capacity"].clone(), v["max_capacity"].clone()),
        (2.into(), 40.into())
    );
    let res = common::call(&client(), "GET", &s.url("/v1/rate_limit"), "pro-demo-key").await;
    let usage: Value = res.json().await.unwrap();
    assert_eq!(usage["overload"]["capacity"], 12);
    // Without an [overload] table: no such thing to report.
    let plain = demo_server(common::spec_policy()).await;
    let res = client()
        .get(plain.url("/admin/v1/overload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = common::call(
        &client(),
        "GET",
        &plain.url("/v1/rate_limit"),
        "pro-demo-key",
    )
    .await;
    let usage: Value = res.json().await.unwrap();
    assert!(usage.get("overload").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_grpc_call_is_unavailable_with_a_pushback_and_retry_info() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_types::StatusExt;

    let policy = policy_with("[overload]\ncapacity = 1\nretry_after = \"250ms\"\n").unwrap();
    let layer: RateLimitLayer = RateLimitLayer::builder(policy).build();
    // gRPC and HTTP on one port behind one layer: an HTTP request that
    // never ends holds the only place.
    let app = grpc_demo::grpc_routes()
        .await
        .into_axum_router()
        .route(
            "/hold",
            axum::routing::get(std::future::pending::<&'static str>),
        )
        .layer(layer);
    let s = common::serve(app).await;
    let hold_url = s.url("/hold");
    let holder = Held(vec![tokio::spawn(async move {
        let _ = client()
            .get(hold_url)
            .header("X-API-Key", "pro-demo-key")
            .send()
            .await;
    })]);
    let mut health = HealthClient::new(common::grpc_channel(s.addr).await);
    let call = || common::health_check("enterprise-demo-key");
    // Until the held request is counted, a check may pass.
    let mut status = None;
    for _ in 0..2_000 {
        match health.check(call()).await {
            Err(s) => {
                status = Some(s);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let status = status.expect("the call is shed while the place is held");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "250"
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_millis(250)));
    assert!(status.get_details_quota_failure().is_none());
    // The held request ends: the call goes through.
    drop(holder);
    let mut ok = false;
    for _ in 0..2_000 {
        if health.check(call()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(ok, "the place came back");
}

/// Each `(table, entry, says)`: the policy with `table` is refused with an
/// error that names `entry` and says `says`.
fn refused_naming(cases: &[(&str, &str, &str)]) {
    for (table, entry, says) in cases {
        let err = policy_with(table).expect_err(table);
        let text = err.to_string();
        assert!(
            text.contains(entry) && text.contains(says),
            "{table:?}: {text}"
        );
    }
}

#[test]
fn a_bad_overload_table_is_refused_naming_the_entry() {
    let cases: &[(&str, &str, &str)] = &[
        ("[overload]\ncapacity = 0\n", "overload.capacity", "1 to"),
        ("[overload]\ncapacity = -3\n", "overload.capacity", "1 to"),
        (
            "[overload]\ncapacity = \"lots\"\n",
            "overload.capacity",
            "adaptive",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\n",
            "overload.target_latency",
            "needs a target",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"0ms\"\n",
            "overload.target_latency",
            "zero",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"fast\"\n",
            "overload.target_latency",
            "unknown time unit",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmin_capacity = 50\nmax_capacity = 10\n",
            "overload.min_capacity",
            "above the ceiling",
        ),
        (
            "[overload]\ncapacity = 8\ntarget_latency = \"50ms\"\n",
            "overload.target_latency",
            "adaptive",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\nfree = 0\n",
            "overload.shed_at.free",
            "(0, 1]",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\nfree = 1.5\n",
            "overload.shed_at.free",
            "(0, 1]",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\nfree = -0.5\n",
            "overload.shed_at.free",
            "(0, 1]",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\nfree = nan\n",
            "overload.shed_at.free",
            "(0, 1]",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\ngold = 0.5\n",
            "overload.shed_at.gold",
            "unknown tier `gold`",
        ),
        (
            "[overload]\ncapacity = 8\n[overload.shed_at]\nfree = \"half\"\n",
            "overload.shed_at.free",
            "fraction",
        ),
        (
            "[overload]\ncapacity = 8\nretry_after = \"2h\"\n",
            "overload.retry_after",
            "1 hour",
        ),
        // Unknown fields: the loader names the line (and never echoes the
        // file's text).
        (
            "[overload]\ncapacity = 8\nsheddable = true\n",
            "(line ",
            "unknown field",
        ),
    ];
    refused_naming(cases);
    // A good one, for contrast, and the builder's own check.
    assert!(policy_with(FIXED_10).is_ok());
    let built = Policy::builder()
        .categories(["read", "write"])
        .tier(
            tierlimit::Tier::new("free")
                .limit("read", tierlimit::Limit::per_hour(1))
                .limit("write", tierlimit::Limit::per_hour(1)),
        )
        .overload(
            tierlimit::policy::OverloadSettings::new(tierlimit::policy::Capacity::Fixed(4))
                .shed_at("free", 1.01),
        )
        .build();
    let err = built.unwrap_err().to_string();
    assert!(err.contains("overload.shed_at.free"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_gives_its_place_back_with_catch_panic_inside_or_outside() {
    use tower_http::catch_panic::CatchPanicLayer;
    for outside in [false, true] {
        let policy = policy_with("[overload]\ncapacity = 1\n").unwrap();
        let layer: RateLimitLayer = RateLimitLayer::builder(policy).build();
        let routes = axum::Router::new()
            .route(
                "/panic",
                axum::routing::get(|| async {
                    panic!("the handler fails");
                    #[allow(unreachable_code)]
                    "never"
                }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }));
        let app = if outside {
            routes.layer(layer).layer(CatchPanicLayer::new())
        } else {
            routes.layer(CatchPanicLayer::new()).layer(layer)
        };
        let s = common::serve(app).await;
        for _ in 0..3 {
            let res = client()
                .get(s.url("/panic"))
                .header("X-API-Key", "pro-demo-key")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 500, "catch panic outside: {outside}");
        }
        // The only place came back each time.
        let res = client()
            .get(s.url("/ok"))
            .header("X-API-Key", "pro-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "catch panic outside: {outside}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_request_after_a_quiet_spell_does_not_cut_an_adaptive_capacity() {
    // Windows of 10 ms; a window with fewer than 8 samples closes after
    // 100 ms. Nothing comes for longer than that, then one request that
    // takes 150 ms: one sample, not a window's worth.
    let s = demo_server(
        policy_with(
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"10ms\"\nmin_capacity = 2\nmax_capacity = 40\ninitial_capacity = 20\n",
        )
        .unwrap(),
    )
    .await;
    assert_eq!(overload(&s).await["capacity"], 20);
    let res = client()
        .get(s.url("/v1/endpoints?work_ms=150"))
        .header("X-API-Key", "pro-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    in_flight_reaches(&s, 0).await;
    let v = overload(&s).await;
    assert_eq!(v["capacity"], 20, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_answer_describes_the_callers_own_quota_with_a_custom_limit() {
    let s = demo_server(fixed_10()).await;
    // Free reads are 100 an hour; this key's are 500 (the admin API).
    let res = client()
        .put(s.url("/admin/v1/limits"))
        .bearer_auth(ADMIN)
        .json(
            &serde_json::json!({ "key": "free-demo-key", "category": "read", "limit": "500/hour" }),
        )
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let allowed = quick(&s, "free-demo-key", None).await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(common::header(&allowed, "x-ratelimit-limit"), Some(500));
    let mut held = Held(Vec::new());
    hold(&s, &mut held, "free-demo-key", None, 5, 5).await;
    let shed = quick(&s, "free-demo-key", None).await;
    assert_eq!(shed.status(), 503);
    // The same quota as its allowed answers say, not the tier's.
    assert_eq!(common::header(&shed, "x-ratelimit-limit"), Some(500));
    assert_eq!(common::header(&shed, "x-ratelimit-window"), Some(3600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_priority_headers_are_refused_or_read_as_written_never_more() {
    let s = demo_server(fixed_10()).await;
    let mut held = Held(Vec::new());
    hold(&s, &mut held, "free-demo-key", None, 5, 5).await;
    let send = |values: Vec<reqwest::header::HeaderValue>| {
        let url = s.url("/v1/endpoints");
        async move {
            let mut headers = reqwest::header::HeaderMap::new();
            for v in values {
                headers.append("x-request-priority", v);
            }
            client()
                .get(url)
                .header("X-API-Key", "free-demo-key")
                .headers(headers)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let v = |b: &[u8]| reqwest::header::HeaderValue::from_bytes(b).unwrap();
    // Not UTF-8, padded, huge, or a list: never read as critical.
    assert_eq!(send(vec![v(b"crit\xffcal")]).await, 400);
    assert_eq!(send(vec![v(b"critical\xff")]).await, 400);
    assert_eq!(
        send(vec![v("critical".repeat(2_000).as_bytes())]).await,
        400
    );
    assert_eq!(send(vec![v(b"critical, normal")]).await, 400);
    // Repeated: the first is the request's priority.
    assert_eq!(send(vec![v(b"normal"), v(b"critical")]).await, 503);
    assert_eq!(send(vec![v(b" CRITICAL ")]).await, 200);
    // Nothing was held by the refusals: the places in flight are the 5
    // held ones (the critical request is over).
    in_flight_reaches(&s, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_callers_give_up_past_the_target_cut_an_adaptive_capacity() {
    // The service takes a second; every caller gives up after 150 ms
    // (three times the target). No request is ever answered: the only
    // sign of the overload is requests dropped past the target.
    let s = demo_server(
        policy_with(
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmin_capacity = 2\nmax_capacity = 40\ninitial_capacity = 20\n",
        )
        .unwrap(),
    )
    .await;
    assert_eq!(overload(&s).await["capacity"], 20);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let mut capacity = 20;
    for _ in 0..5 {
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let req = impatient
                    .get(s.url("/v1/endpoints?work_ms=1000"))
                    .header("X-API-Key", "enterprise-demo-key");
                tokio::spawn(async move { req.send().await.is_err() })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap(), "the caller gave up");
        }
        in_flight_reaches(&s, 0).await;
        capacity = overload(&s).await["capacity"].as_u64().unwrap();
        if capacity < 20 {
            break;
        }
    }
    assert!(capacity < 20, "the capacity never fell: {capacity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_answer_with_the_draft_headers_names_the_policy_and_no_state() {
    let policy = policy_with("[overload]\ncapacity = 1\n").unwrap();
    let layer: RateLimitLayer = RateLimitLayer::builder(policy)
        .headers(
            tierlimit::HeaderOptions::default()
                .x_ratelimit(false)
                .ietf_draft(true),
        )
        .build();
    let app = axum::Router::new()
        .route(
            "/hold",
            axum::routing::get(std::future::pending::<&'static str>),
        )
        .route("/ok", axum::routing::get(|| async { "ok" }))
        .layer(layer);
    let s = common::serve(app).await;
    let url = s.url("/hold");
    let _holder = Held(vec![tokio::spawn(async move {
        let _ = client()
            .get(url)
            .header("X-API-Key", "pro-demo-key")
            .send()
            .await;
    })]);
    let mut shed = None;
    for _ in 0..2_000 {
        let res = client()
            .get(s.url("/ok"))
            .header("X-API-Key", "pro-demo-key")
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            shed = Some(res);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let shed = shed.expect("shed while the only place is held");
    let policy = shed
        .headers()
        .get("ratelimit-policy")
        .expect("the draft's policy");
    assert!(policy.to_str().unwrap().contains("q=100000"), "{policy:?}");
    for absent in [
        "ratelimit",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(
            shed.headers().get(absent).is_none(),
            "{absent}: {:?}",
            shed.headers()
        );
    }
    assert_eq!(common::header(&shed, "retry-after"), Some(1));
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, ready};
    use governor::clock::FakeRelativeClock;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiers_are_shed_in_order_and_shed_requests_consume_nothing_on_redis() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let backend = common::redis::fake_clock_backend(&server, &clock).await;
        tiers_in_order(&demo_server_on(fixed_10(), backend).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiers_are_shed_in_order_and_shed_requests_consume_nothing_on_a_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let clock = FakeRelativeClock::default();
        let backend = common::redis::fake_clock_cluster_backend(&cluster, &clock).await;
        tiers_in_order(&demo_server_on(fixed_10(), backend).await).await;
    }

    /// Requests of `key` (no work), `n` at once: their statuses.
    async fn burst(s: &Server, key: &str, n: usize) -> Vec<u16> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let url = s.url("/v1/endpoints");
                let key = key.to_owned();
                tokio::spawn(async move {
                    client()
                        .get(url)
                        .header("X-API-Key", key)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_redis_check_is_not_the_inner_services_latency() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let backend = common::redis::fake_clock_backend(&server, &clock).await;
        let s = demo_server_on(
            policy_with(
                "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"100ms\"\nmin_capacity = 2\nmax_capacity = 40\ninitial_capacity = 20\n",
            )
            .unwrap(),
            backend,
        )
        .await;
        assert_eq!(overload(&s).await["capacity"], 20);
        // Redis holds every check for 300 ms (it lifts the pause itself);
        // the inner service answers at once. More than a window of samples
        // (8), all far over the target if the check were counted.
        let ok = server.cli(&["CLIENT", "PAUSE", "300", "WRITE"]);
        assert_eq!(ok.as_deref(), Some("OK"));
        let statuses = burst(&s, "enterprise-demo-key", 12).await;
        assert!(statuses.iter().all(|&c| c == 200), "{statuses:?}");
        // A few more, quick ones, so a window closes whatever samples the
        // burst's race dropped.
        for _ in 0..8 {
            assert_eq!(quick(&s, "enterprise-demo-key", None).await.status(), 200);
        }
        in_flight_reaches(&s, 0).await;
        // The service was never slow: the capacity did not fall.
        let v = overload(&s).await;
        assert_eq!(v["capacity"], 20, "{v}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_held_by_checks_on_a_frozen_redis_come_back_when_it_is_killed_and_restarted() {
        if !ready() {
            return;
        }
        let mut server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let backend = common::redis::fake_clock_backend(&server, &clock).await;
        let s = demo_server_on(fixed_10(), backend).await;
        assert_eq!(quick(&s, "pro-demo-key", None).await.status(), 200);
        server.stop_process();
        // Quick requests whose checks wait on the frozen server, each
        // holding its place.
        let mut held = Held(Vec::new());
        for key in ["pro-demo-key"; 4].into_iter().chain(["free-demo-key"]) {
            let url = s.url("/v1/endpoints");
            held.0.push(tokio::spawn(async move {
                let _ = client().get(url).header("X-API-Key", key).send().await;
            }));
        }
        in_flight_reaches(&s, 5).await;
        // 5 of 10 held by checks: free is shed without asking Redis.
        assert_eq!(quick(&s, "free-demo-key", None).await.status(), 503);
        server.resume();
        server.kill();
        // Every check fails (the backend's failure answer): every place
        // comes back.
        in_flight_reaches(&s, 0).await;
        server.restart();
        let mut ok = false;
        for _ in 0..2_000 {
            if quick(&s, "free-demo-key", None).await.status() == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(ok, "requests pass again once Redis is back");
        in_flight_reaches(&s, 0).await;
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_fraction_of_a_large_capacity_is_kept_exactly() {
    // 0.0001 of 10,000 is one request in flight: free is admitted while
    // nothing is in flight, and shed from the first request held.
    let s = demo_server(
        policy_with("[overload]\ncapacity = 10000\n[overload.shed_at]\nfree = 0.0001\n").unwrap(),
    )
    .await;
    let mut held = Held(Vec::new());
    hold(&s, &mut held, "free-demo-key", None, 1, 1).await;
    assert_eq!(quick(&s, "free-demo-key", None).await.status(), 503);
    assert_eq!(quick(&s, "pro-demo-key", None).await.status(), 200);
    drop(held);
    in_flight_reaches(&s, 0).await;
    assert_eq!(quick(&s, "free-demo-key", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_capacity_is_reported_and_enforced_at_once_and_in_flight_is_kept() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
    let layer = demo::limits(fixed_10(), common::fake_memory());
    let handle = layer.policy_handle();
    let s = common::serve(demo::app_with_admin(layer, Some(ADMIN))).await;
    let mut held = Held(Vec::new());
    hold(&s, &mut held, "enterprise-demo-key", None, 2, 2).await;
    assert_eq!(overload(&s).await["capacity"], 10);
    // Down to 3: the admin API says 3 before any request is seen under it.
    handle.replace(policy_with("[overload]\ncapacity = 3\n").unwrap());
    let v = overload(&s).await;
    assert_eq!(
        (v["capacity"].clone(), v["in_flight"].clone()),
        (3.into(), 2.into()),
        "{v}"
    );
    let res = common::call(&client(), "GET", &s.url("/v1/rate_limit"), "pro-demo-key").await;
    let usage: Value = res.json().await.unwrap();
    assert_eq!(usage["overload"]["capacity"], 3, "{usage}");
    // An adaptive table: where it starts, with the requests still held.
    handle.replace(
        policy_with(
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmin_capacity = 2\ninitial_capacity = 5\n",
        )
        .unwrap(),
    );
    let v = overload(&s).await;
    assert_eq!(
        (v["capacity"].clone(), v["in_flight"].clone()),
        (5.into(), 2.into()),
        "{v}"
    );
    // The table removed and put back: the held requests are still counted,
    // and give their places back when dropped.
    handle.replace(common::spec_policy());
    handle.replace(policy_with("[overload]\ncapacity = 3\n").unwrap());
    let v = overload(&s).await;
    assert_eq!(
        (v["capacity"].clone(), v["in_flight"].clone()),
        (3.into(), 2.into()),
        "{v}"
    );
    hold(&s, &mut held, "enterprise-demo-key", None, 1, 3).await;
    assert_eq!(quick(&s, "enterprise-demo-key", None).await.status(), 503);
    drop(held);
    in_flight_reaches(&s, 0).await;
    assert_eq!(quick(&s, "enterprise-demo-key", None).await.status(), 200);
}

#[test]
fn an_overload_entry_of_the_wrong_type_is_refused_naming_the_entry() {
    let cases: &[(&str, &str, &str)] = &[
        ("[overload]\n", "overload.capacity", "capacity"),
        ("[overload]\ncapacity = -3\n", "overload.capacity", "-3"),
        (
            "[overload]\ncapacity = 5000000000\n",
            "overload.capacity",
            "5000000000",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmin_capacity = 2.5\n",
            "overload.min_capacity",
            "number",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\nmax_capacity = \"8\"\n",
            "overload.max_capacity",
            "number",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"50ms\"\ninitial_capacity = true\n",
            "overload.initial_capacity",
            "number",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = 50\n",
            "overload.target_latency",
            "50ms",
        ),
        (
            "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"0.5ms\"\n",
            "overload.target_latency",
            "unknown time unit",
        ),
        (
            "[overload]\ncapacity = 8\nretry_after = 5\n",
            "overload.retry_after",
            "1s",
        ),
        (
            "[overload]\ncapacity = 8\nreport_step = \"x\"\n",
            "overload.report_step",
            "fraction",
        ),
        (
            "[overload]\ncapacity = 8\nshed_exempt_routes = \"yes\"\n",
            "overload.shed_exempt_routes",
            "true or false",
        ),
        (
            "[overload]\ncapacity = 8\nshed_unlimited = 1\n",
            "overload.shed_unlimited",
            "true or false",
        ),
        (
            "[overload]\ncapacity = 8\nshed_at = 0.5\n",
            "overload.shed_at",
            "table",
        ),
    ];
    refused_naming(cases);
    // The right types, integers where a fraction is asked included.
    let ok = policy_with(
        "[overload]\ncapacity = \"adaptive\"\ntarget_latency = \"60s\"\nmin_capacity = 1\nmax_capacity = 1\nretry_after = \"1h\"\nreport_step = 1\nshed_exempt_routes = false\n[overload.shed_at]\nfree = 1\npro = 0.0001\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
}
