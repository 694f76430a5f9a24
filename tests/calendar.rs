//! Calendar periods end to end: a real axum server, a fake Unix clock (the
//! layer's `unix_clock`) put one second before midnight in Europe/London on
//! the day its clocks go forward (23 hours long), on the memory backend and
//! on Redis (single node and Cluster, two instances each).

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{call, client, header};
use tierlimit::backend::Backend;
use tierlimit::{Policy, RateLimitLayer};

/// A calendar day of 5, a mixed list, and a month of tokens, in London.
const POLICY: &str = r#"
categories = ["read", "write"]
[defaults]
time_zone = "Europe/London"
[tiers.free]
read = { requests = "5/day", period = "calendar" }
write = ["3/second", { limit = "5/day", period = "calendar" }]
[keys]
"k1" = "free"
"k2" = "free"
"#;

/// 2026-03-29 00:30 in London (still GMT): the 23-hour day begins.
const DAY_START: u64 = 1_774_744_200 - 30 * 60;
/// 2026-03-30 00:00 in London (BST): 23 hours after `DAY_START`.
const MIDNIGHT: u64 = 1_774_825_200;

/// A fake Unix clock the test sets.
#[derive(Clone, Default)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn set(&self, secs: u64) {
        self.0.store(secs, Ordering::SeqCst);
    }
}

/// Every test sets the key secret first (one per binary, before any key
/// is hashed), so the Redis tests can share this binary.
fn secret() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    #[cfg(feature = "redis")]
    ONCE.call_once(common::redis::init_secret);
    #[cfg(not(feature = "redis"))]
    ONCE.call_once(|| {});
}

async fn serve_on<B: Backend>(backend: B, clock: &Clock) -> common::Server {
    secret();
    let c = clock.clone();
    let layer = RateLimitLayer::builder(Policy::from_toml_str(POLICY).unwrap())
        .backend(backend)
        .unix_clock(move || c.0.load(Ordering::SeqCst))
        .build();
    let app = axum::Router::new()
        .route(
            "/v1/account",
            axum::routing::get(|| async { "{}" }).post(|| async { "{}" }),
        )
        .route_service("/v1/rate_limit", layer.usage_service())
        .layer(layer);
    common::serve(app).await
}

/// The scenario on servers that share one backend's state (`urls`, used in
/// turn): 5 admitted, the 6th refused until midnight, and again one
/// second after it.
async fn a_calendar_day_of_five(urls: &[String], clock: &Clock, method: &str, key: &str) {
    let c = client();
    let at = |i: usize| format!("{}/v1/account", urls[i % urls.len()]);
    clock.set(DAY_START);
    for i in 0..5 {
        let res = call(&c, method, &at(i), key).await;
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(4 - i as u64));
        assert_eq!(
            header(&res, "x-ratelimit-reset"),
            Some(MIDNIGHT),
            "the day's end"
        );
    }
    let res = call(&c, method, &at(5), key).await;
    assert_eq!(res.status(), 429);
    // 23 hours to midnight on this day, not 24.
    assert_eq!(header(&res, "retry-after"), Some(MIDNIGHT - DAY_START));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some(MIDNIGHT));
    clock.set(MIDNIGHT - 1);
    let res = call(&c, method, &at(6), key).await;
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "retry-after"),
        Some(1),
        "one second to midnight"
    );
    clock.set(MIDNIGHT + 1);
    for i in 0..5 {
        let res = call(&c, method, &at(7 + i), key).await;
        assert_eq!(res.status(), 200, "the new day, request {i}");
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(4 - i as u64));
        // The next day is 24 hours long.
        assert_eq!(header(&res, "x-ratelimit-reset"), Some(MIDNIGHT + 86_400));
    }
    assert_eq!(call(&c, method, &at(12), key).await.status(), 429);
}

/// The usage endpoint shows the period's end as the reset.
async fn usage_shows_the_period_end(url: &str, clock: &Clock) {
    clock.set(DAY_START);
    let c = client();
    assert_eq!(
        call(&c, "GET", &format!("{url}/v1/account"), "k2")
            .await
            .status(),
        200
    );
    let res = call(&c, "GET", &format!("{url}/v1/rate_limit"), "k2").await;
    let v: serde_json::Value = res.json().await.unwrap();
    let read = &v["categories"]["read"];
    // The request, and the usage request itself (a read).
    assert_eq!(read["remaining"], 3, "{v}");
    assert_eq!(read["reset"], MIDNIGHT, "{v}");
    assert_eq!(read["limit"], 5, "{v}");
}

#[tokio::test]
async fn memory_calendar_day_resets_at_midnight_in_london() {
    let clock = Clock::default();
    let s = serve_on(common::fake_memory(), &clock).await;
    a_calendar_day_of_five(&[s.url("")], &clock, "GET", "k1").await;
    usage_shows_the_period_end(&s.url(""), &clock).await;
}

#[tokio::test]
async fn memory_calendar_mixes_with_a_rolling_limit_all_or_nothing() {
    let clock = Clock::default();
    let s = serve_on(common::fake_memory(), &clock).await;
    let c = client();
    let url = s.url("/v1/account");
    clock.set(DAY_START);
    // 3 per second (the governor clock stands still): the 4th is refused by
    // the rolling limit and counts in neither.
    for _ in 0..3 {
        assert_eq!(call(&c, "POST", &url, "k1").await.status(), 200);
    }
    let res = call(&c, "POST", &url, "k1").await;
    assert_eq!(res.status(), 429);
    assert!(header(&res, "retry-after").unwrap() <= 1);
    // The refused request counted in neither: 3 of the day's 5 are used.
    let usage = call(&c, "GET", &s.url("/v1/rate_limit"), "k1").await;
    let v: serde_json::Value = usage.json().await.unwrap();
    let day = &v["categories"]["write"]["limits"][1];
    assert_eq!(
        (&day["limit"], &day["remaining"]),
        (&5.into(), &2.into()),
        "{v}"
    );
    assert_eq!(day["reset"], MIDNIGHT, "{v}");
    // The next day: the calendar counter starts again; the rolling bucket
    // does not (its clock stands still), so nothing is counted.
    clock.set(MIDNIGHT);
    let res = call(&c, "POST", &url, "k1").await;
    assert_eq!(res.status(), 429, "still the rolling limit");
    let usage = call(&c, "GET", &s.url("/v1/rate_limit"), "k1").await;
    let v: serde_json::Value = usage.json().await.unwrap();
    assert_eq!(v["categories"]["write"]["limits"][1]["remaining"], 5, "{v}");
}

/// 2026-04-01 00:00 in London (BST): the end of March.
const MONTH_END: u64 = 1_774_998_000;

/// A calendar month of tokens, metered by the demo's completions: each
/// settles 400 tokens after reserving 1, so the fourth finds the month in
/// debt (1,200 of 1,000) and is refused until the month ends.
#[tokio::test]
async fn memory_calendar_tokens_settle_and_refuse_until_the_month_ends() {
    secret();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/policy.toml"
    ))
    .unwrap()
    .replacen(
        "ai = \"50/hour\"",
        "ai = { requests = \"50/hour\", tokens = { limit = \"1000/month\", period = \"calendar\" } }",
        1,
    );
    assert!(text.contains("1000/month"), "the demo policy moved");
    let policy = Policy::from_toml_str(&text)
        .unwrap()
        .to_builder()
        .time_zone("Europe/London")
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .extractor(demo::demo_extractor as demo::DemoExtractor)
        .backend(common::fake_memory())
        .unix_clock(|| DAY_START)
        .build();
    let s = common::serve(demo::app(layer)).await;
    let c = client();
    let url = s.url("/v1/ai/completions");
    let body = serde_json::json!({ "prompt": "hello world", "max_tokens": 398 });
    let complete = || async {
        c.post(&url)
            .header("x-api-key", "free-demo-key")
            .json(&body)
            .send()
            .await
            .unwrap()
    };
    for left in [999, 599, 199] {
        let res = complete().await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), Some(left));
    }
    let res = complete().await;
    assert_eq!(res.status(), 429, "the month is in debt");
    assert_eq!(header(&res, "retry-after"), Some(MONTH_END - DAY_START));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some(MONTH_END));
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["period"], "calendar month", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("1000 `ai` tokens per calendar month"),
        "{detail}"
    );
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, available};

    fn ready() -> bool {
        secret();
        available()
    }

    async fn two_instances<F: AsyncFn() -> tierlimit::RedisBackend>(make: F) {
        let clock = Clock::default();
        let a = serve_on(make().await, &clock).await;
        let b = serve_on(make().await, &clock).await;
        let urls = [a.url(""), b.url("")];
        a_calendar_day_of_five(&urls, &clock, "GET", "k1").await;
        usage_shows_the_period_end(&urls[1], &clock).await;
    }

    #[tokio::test]
    async fn redis_passes_the_calendar_table_single_node() {
        if !ready() {
            return;
        }
        let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
        common::conformance::calendar::run_calendar(&backend, |d| clock.advance(d)).await;
    }

    #[tokio::test]
    async fn redis_passes_the_calendar_table_cluster() {
        if !ready() {
            return;
        }
        let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
        common::conformance::calendar::run_calendar(&backend, |d| clock.advance(d)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_calendar_is_exact_across_instances_under_contention() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let clock = governor::clock::FakeRelativeClock::default();
        let mut backends = Vec::new();
        for _ in 0..2 {
            backends.push(common::redis::fake_clock_cluster_backend(&cluster, &clock).await);
        }
        common::conformance::calendar::exact_calendar_under_contention(backends).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_calendar_day_across_two_instances_single_node() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = governor::clock::FakeRelativeClock::default();
        two_instances(async || common::redis::fake_clock_backend(&server, &clock).await).await;
    }

    /// On Redis's own clock: a layer whose clock lags a day behind
    /// Redis's passes a period that has ended, and Redis counts in the next
    /// (today's), whose end every answer shows; the key expires then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_clock_picks_the_period_and_the_key_expires_at_its_end() {
        use std::time::Duration;
        use tierlimit::policy::{Calendar, Period};
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let backend = tierlimit::RedisBackend::builder(server.url())
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        let clock = Clock::default();
        let s = serve_on(backend, &clock).await;
        let real = common::unix_now();
        let london = Calendar::new("Europe/London").unwrap();
        let today = london.bounds(Period::CalendarDay, Duration::from_secs(real));
        let end = today.end / 1_000_000;
        let c = client();
        let url = s.url("/v1/account");
        clock.set(real - 86_400);
        for i in 0..3 {
            let res = call(&c, "GET", &url, "k1").await;
            assert_eq!(res.status(), 200);
            assert_eq!(header(&res, "x-ratelimit-remaining"), Some(4 - i));
            assert_eq!(header(&res, "x-ratelimit-reset"), Some(end), "today's end");
        }
        clock.set(real);
        for i in 3..5 {
            let res = call(&c, "GET", &url, "k1").await;
            assert_eq!(res.status(), 200, "the same counter");
            assert_eq!(header(&res, "x-ratelimit-remaining"), Some(4 - i));
        }
        let res = call(&c, "GET", &url, "k1").await;
        assert_eq!(res.status(), 429);
        let retry = header(&res, "retry-after").unwrap();
        assert!(retry.abs_diff(end - real) <= 2, "{retry} vs {}", end - real);
        // One key holds the count, and expires when the day ends.
        let keys = server.cli(&["--scan", "--pattern", "*:m:*"]).unwrap();
        let keys: Vec<&str> = keys.lines().collect();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(server.cli(&["TYPE", keys[0]]).unwrap(), "hash");
        let pttl: u64 = server.cli(&["PTTL", keys[0]]).unwrap().parse().unwrap();
        let expected = (end - real) * 1000;
        assert!(pttl.abs_diff(expected) <= 3_000, "{pttl} vs {expected}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_calendar_day_across_two_instances_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let clock = governor::clock::FakeRelativeClock::default();
        two_instances(async || common::redis::fake_clock_cluster_backend(&cluster, &clock).await)
            .await;
    }
}
