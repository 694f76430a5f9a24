//! RedisBackend against real `redis-server` processes started by the
//! fixture: conformance (single node and cluster), exactness across
//! instances, round trips counted by Redis, the deny cache, and faults.
#![cfg(all(feature = "redis", feature = "test-util"))]

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

#[allow(unused_imports)]
use common::one::{CheckOne, CheckOneNow};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer, ready};
use governor::clock::FakeRelativeClock;
use tierlimit::{
    Limit, RedisBackend,
    backend::{Backend, BackendState, FailurePolicy, Subject},
    key::KeyId,
};

fn capture_logs() {
    common::logs::capture();
}

/// The Prometheus text of this test binary's metrics (feature `metrics`).
#[cfg(feature = "metrics")]
fn metrics_text() -> String {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .unwrap()
        })
        .render()
}

#[cfg(feature = "metrics")]
fn metric(name_and_labels: &str) -> Option<f64> {
    metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

fn logs() -> String {
    common::logs::text()
}

fn subject(key: &str) -> Subject {
    Subject::new(KeyId::of(key), 11)
}

/// A single node and a backend on a fake clock that trips fast: a check
/// times out after 200 ms, a degraded backend probes every second.
async fn tripping_backend() -> (RedisServer, FakeRelativeClock, RedisBackend) {
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let backend = RedisBackend::builder(server.url())
        .fake_clock(clock.clone())
        .timeout(Duration::from_millis(200))
        .retry_interval(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    (server, clock, backend)
}

/// Advances the clock a retry interval at a time and makes one `request`
/// after each, until the backend is on Redis again (at most 50 times):
/// the answer it first got back on Redis.
async fn until_back<F: std::future::Future<Output = tierlimit::backend::Decision>>(
    backend: &RedisBackend,
    clock: &FakeRelativeClock,
    mut request: impl FnMut() -> F,
) -> Option<tierlimit::backend::Decision> {
    for _ in 0..50 {
        clock.advance(Duration::from_secs(1));
        let d = request().await;
        if backend.state() == BackendState::Connected {
            return Some(d);
        }
        // Not time passing: the client's reconnection to the new process.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn conformance_single_node() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    common::conformance::run(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_cluster_and_keys_spread_over_masters() {
    if !ready() {
        return;
    }
    let (cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
    common::conformance::run(&backend, |d| clock.advance(d)).await;
    // Many keys: each lands in its hash-tag slot; all three masters hold some.
    let limit = Limit::per_hour(5);
    for i in 0..60 {
        assert!(
            backend
                .check_one(&subject(&format!("spread-{i}")), &limit)
                .await
                .unwrap()
                .allowed
        );
    }
    for n in &cluster.nodes {
        let keys: u64 = n.cli(&["DBSIZE"]).unwrap().parse().unwrap();
        assert!(keys > 0, "master {} holds no bucket", n.port);
    }
}

/// Two demo servers on one Redis (single node or Cluster), a fake clock:
/// an account's two keys, each on its own server, many concurrent
/// requests: exactly the account's 5 are admitted, neither key above its
/// own 3; the free tier's guard and budget bind across both servers.
async fn accounts_and_lists_across_two_servers(make: impl AsyncFn() -> RedisBackend) {
    let policy = tierlimit::Policy::from_toml_str(common::MULTI_POLICY).unwrap();
    let mut urls = Vec::new();
    let mut running = Vec::new();
    for _ in 0..2 {
        let layer = tierlimit::RateLimitLayer::builder(policy.clone())
            .backend(make().await)
            .build();
        let s = common::serve(demo::app(layer)).await;
        urls.push(s.url(""));
        running.push(s);
    }
    let c = common::client();
    let allowed = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (c, allowed) = (c.clone(), Arc::clone(&allowed));
        let (key, url) = if t % 2 == 0 {
            ("team-a", format!("{}/v1/clusters", urls[0]))
        } else {
            ("team-b", format!("{}/v1/clusters", urls[1]))
        };
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            for _ in 0..4 {
                let res = c.post(&url).header("x-api-key", key).send().await.unwrap();
                match res.status().as_u16() {
                    200 => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                        mine += 1;
                    }
                    429 => {}
                    other => panic!("unexpected {other}"),
                }
            }
            (key, mine)
        }));
    }
    let (mut a, mut b) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            ("team-a", n) => a += n,
            (_, n) => b += n,
        }
    }
    assert_eq!(
        allowed.load(Ordering::Relaxed),
        5,
        "the account's 5 of 64 tries"
    );
    assert!(a <= 3 && b <= 3, "each key within its own 3: {a} + {b}");
    // The free tier's `ai` guard (2 per minute) binds across both servers,
    // and its refusal waits for it alone. (Minute-long intervals: with a
    // fake clock that stands still, Redis's real-time key expiry must not
    // drop a bucket mid-test, as it could a 500 ms one on a slow machine.)
    let complete = |i: usize| {
        c.post(format!("{}/v1/ai/completions", urls[i % 2]))
            .header("x-api-key", "free-demo-key")
            .json(&serde_json::json!({ "prompt": "hi" }))
            .send()
    };
    assert_eq!(complete(0).await.unwrap().status(), 200);
    let res = complete(1).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-window"], "60");
    let res = complete(0).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-ratelimit-window"], "60");
    assert_eq!(res.headers()["retry-after"], "30");
}

/// Two servers on one Redis (`batches`: with batches on), on a fake clock.
async fn accounts_on_a_single_node(batches: bool) {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    accounts_and_lists_across_two_servers(async || {
        on_fake_clock(RedisBackend::builder(server.url()), &clock, batches).await
    })
    .await;
}

/// Two servers on one Redis Cluster, on a fake clock.
async fn accounts_on_a_cluster(batches: bool) {
    if !ready() {
        return;
    }
    let cluster = RedisCluster::start();
    let clock = FakeRelativeClock::default();
    accounts_and_lists_across_two_servers(async || {
        on_fake_clock(RedisBackend::cluster(cluster.urls()), &clock, batches).await
    })
    .await;
}

async fn on_fake_clock(
    builder: tierlimit::backend::RedisBackendBuilder,
    clock: &FakeRelativeClock,
    batches: bool,
) -> RedisBackend {
    let builder = builder
        .fake_clock(clock.clone())
        .timeout(Duration::from_secs(2));
    let builder = if batches {
        builder.batches(tierlimit::backend::Batches::new())
    } else {
        builder
    };
    builder.connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_and_lists_across_two_servers_single_node() {
    accounts_on_a_single_node(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_and_lists_across_two_servers_cluster() {
    accounts_on_a_cluster(false).await;
}

/// With batches on, an account's keys share its limits exactly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_and_lists_across_two_batched_servers_single_node() {
    accounts_on_a_single_node(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accounts_and_lists_across_two_batched_servers_cluster() {
    accounts_on_a_cluster(true).await;
}

#[tokio::test]
async fn lease_table_single_node() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    common::conformance::run_leases(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn lease_table_cluster() {
    if !ready() {
        return;
    }
    let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
    common::conformance::run_leases(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn several_limit_table_single_node() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_limit_table_cluster_in_one_slot() {
    if !ready() {
        return;
    }
    let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
    // A script over keys of several slots would fail with CROSSSLOT: the
    // table passing on a cluster shows every charge shares the owner's slot.
    common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test]
async fn reserve_and_settle_single_node() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    common::conformance::run_settle(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test]
async fn input_and_output_tokens_settle_apart_single_node() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    common::conformance::run_split_settle(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_and_output_tokens_settle_apart_cluster() {
    if !ready() {
        return;
    }
    let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
    common::conformance::run_split_settle(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_settle_cluster() {
    if !ready() {
        return;
    }
    let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
    common::conformance::run_settle(&backend, |d| clock.advance(d)).await;
    assert_eq!(backend.state(), BackendState::Connected);
}

async fn several_limits_across_instances(make: &impl AsyncFn() -> RedisBackend) {
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(make().await);
    }
    common::conformance::exact_under_contention(backends).await;
}

/// Several independent backends (separate connections, as separate
/// instances have), many concurrent tasks: exactly N allowed in total.
async fn exact_across_instances(make: &impl AsyncFn() -> RedisBackend) {
    let limit = Limit::per_hour(50);
    let allowed = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let backend = make().await;
        for _ in 0..16 {
            let (backend, allowed) = (backend.clone(), Arc::clone(&allowed));
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    if backend
                        .check_one(&subject("shared"), &limit)
                        .await
                        .unwrap()
                        .allowed
                    {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        allowed.load(Ordering::Relaxed),
        50,
        "640 tries over 4 instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_across_instances_single_node() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let make = async || {
        RedisBackend::builder(url.clone())
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    };
    exact_across_instances(&make).await;
    // Two limits on one owner: exactly the binding one's burst.
    several_limits_across_instances(&make).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_across_instances_cluster() {
    if !ready() {
        return;
    }
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let make = async || {
        RedisBackend::cluster(urls.clone())
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    };
    exact_across_instances(&make).await;
    // Two limits on one owner: exactly the binding one's burst.
    several_limits_across_instances(&make).await;
}

#[tokio::test]
async fn one_script_call_per_allowed_request_none_for_cached_refusals() {
    if !ready() {
        return;
    }
    let (server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    let limit = Limit::per_minute(10);
    // Load the script first, then count from zero.
    backend
        .check_one(&subject("warm-up"), &limit)
        .await
        .unwrap();
    assert_eq!(server.cli(&["CONFIG", "RESETSTAT"]).as_deref(), Some("OK"));

    for _ in 0..10 {
        assert!(
            backend
                .check_one(&subject("k"), &limit)
                .await
                .unwrap()
                .allowed
        );
    }
    let first_refusal = backend.check_one(&subject("k"), &limit).await.unwrap();
    assert!(!first_refusal.allowed);
    assert_eq!(
        server.command_calls("evalsha"),
        11,
        "10 allowed + the first refusal"
    );
    // Inside the retry delay: answered locally, same headers.
    clock.advance(Duration::from_secs(2));
    for _ in 0..20 {
        let d = backend.check_one(&subject("k"), &limit).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(Duration::from_secs(4)));
        assert_eq!(
            (d.limit, d.remaining, d.window),
            (10, 0, Duration::from_secs(60))
        );
    }
    assert_eq!(
        server.command_calls("evalsha"),
        11,
        "the deny cache made no round trip"
    );
    // After it: Redis again, and one more is allowed.
    clock.advance(Duration::from_secs(4));
    assert!(
        backend
            .check_one(&subject("k"), &limit)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(server.command_calls("evalsha"), 12);
    // A flushed script cache (a restarted or failed-over Redis): the
    // script is loaded again on NOSCRIPT, transparently.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).as_deref(), Some("OK"));
    assert!(
        backend
            .check_one(&subject("k3"), &limit)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(server.command_calls("script|load"), 1, "reloaded once");
    // Idle keys expire when full again: the TTL is at most the window.
    let keys = server.cli(&["KEYS", "tierlimit:*"]).unwrap();
    let key = keys.lines().next().unwrap();
    let ttl: i64 = server.cli(&["PTTL", key]).unwrap().parse().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_not_an_outage_and_limits_resume_after_restart() {
    if !ready() {
        return;
    }
    capture_logs();
    #[cfg(feature = "metrics")]
    metrics_text(); // install the recorder before the first check
    let (mut server, clock, backend) = tripping_backend().await;
    let limit = Limit::per_hour(5);
    for _ in 0..5 {
        assert!(
            backend
                .check_one(&subject("k"), &limit)
                .await
                .unwrap()
                .allowed
        );
    }

    // Load: 8 tasks checking many keys while the server is killed under
    // them. Every check gets an answer (each bounded), none fails or panics.
    let done = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (backend, done) = (backend.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let big = Limit::per_hour(1_000_000);
            for i in 0..100 {
                let check = backend.check_one(&subject(&format!("load-{t}-{i}")), &big);
                let d = tokio::time::timeout(Duration::from_secs(5), check)
                    .await
                    .expect("a check hung")
                    .expect("no error under the fallback policy");
                assert!(d.allowed);
                done.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }
    while done.load(Ordering::Relaxed) < 100 {
        tokio::task::yield_now().await;
    }
    server.kill();
    for t in tasks {
        t.await.expect("no task panicked");
    }
    assert_eq!(done.load(Ordering::Relaxed), 800);

    // While down: the fallback limits in memory, with the same limit.
    let mut allowed = 0;
    for i in 0..40 {
        let d = tokio::time::timeout(
            Duration::from_secs(5),
            backend.check_one(&subject("other"), &limit),
        )
        .await
        .unwrap_or_else(|_| panic!("check {i} hung"))
        .unwrap();
        allowed += u32::from(d.allowed);
    }
    assert_eq!(backend.state(), BackendState::Degraded);
    assert_eq!(allowed, 5, "fallback: the same limit, in memory");
    assert!(
        logs().contains("WARN") && logs().contains("redis unreachable"),
        "{}",
        logs()
    );

    // Back: after the retry interval one request probes; limits are shared
    // again without restarting anything. Redis restarted empty, so key `k`
    // starts full.
    server.restart();
    let d = until_back(&backend, &clock, || async {
        backend.check_one(&subject("k2"), &limit).await.unwrap()
    })
    .await
    .expect("the backend returned to Redis by itself");
    assert!(d.allowed);
    assert!(logs().contains("redis reachable again"), "{}", logs());
    #[cfg(feature = "metrics")]
    assert_eq!(
        metric("tierlimit_backend_state{backend=\"redis\"}"),
        Some(1.0)
    );
    let before = server.command_calls("evalsha");
    assert!(
        backend
            .check_one(&subject("k2"), &limit)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(
        server.command_calls("evalsha"),
        before + 1,
        "checks go to Redis again"
    );
}

#[tokio::test]
async fn fail_open_and_fail_closed() {
    if !ready() {
        return;
    }
    let mut server = RedisServer::start();
    let limit = Limit::per_hour(1);
    let open = RedisBackend::builder(server.url())
        .timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::FailOpen)
        .connect()
        .await
        .unwrap();
    let closed = RedisBackend::builder(server.url())
        .timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::FailClosed)
        .connect()
        .await
        .unwrap();
    server.kill();
    for _ in 0..3 {
        assert!(
            open.check_one(&subject("k"), &limit).await.unwrap().allowed,
            "fail open lets through"
        );
        assert!(matches!(
            closed.check_one(&subject("k"), &limit).await,
            Err(tierlimit::backend::BackendError::Unavailable(_))
        ));
    }
}

#[tokio::test]
async fn several_limits_while_redis_is_down_follow_the_failure_policy() {
    if !ready() {
        return;
    }
    use tierlimit::backend::{Charge, Check};
    #[cfg(feature = "metrics")]
    let _ = metrics_text(); // the recorder, before anything is counted
    let mut server = RedisServer::start();
    let make = async |policy| {
        RedisBackend::builder(server.url())
            .timeout(Duration::from_millis(200))
            .failure_policy(policy)
            .fallback_share(0.5)
            .connect()
            .await
            .unwrap()
    };
    let fallback = make(FailurePolicy::Fallback).await;
    let open = make(FailurePolicy::FailOpen).await;
    let closed = make(FailurePolicy::FailClosed).await;
    let charges = [
        Charge {
            bucket: 1,
            limit: Limit::per_hour(4),
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
        Charge {
            bucket: 2,
            limit: Limit::per_day(10),
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
    ];
    let check = Check::new(7, true, &charges);
    server.kill();
    // The fallback enforces half of each limit, all or nothing: 2 of the
    // hourly 4, then refusals by the hourly limit (never a 503).
    let mut allowed = 0;
    for _ in 0..5 {
        let d = fallback.check(&check).await.unwrap();
        if d.allowed {
            allowed += 1;
        } else {
            assert_eq!((d.index, d.limit), (0, 2), "the hourly share binds");
        }
    }
    assert_eq!(allowed, 2);
    assert_eq!(fallback.state(), BackendState::Degraded);
    // A settlement while Redis is down goes to the fallback (and a
    // metric), never lost: a debt of 1 on the spent hourly share.
    let after = fallback
        .settle(
            7,
            &[tierlimit::backend::Adjustment {
                bucket: 1,
                limit: Limit::per_hour(4),
                units: 1,
                period: tierlimit::backend::PeriodBounds::ROLLING,
            }],
        )
        .await
        .unwrap();
    assert_eq!((after.remaining, after.limit), (0, 2));
    #[cfg(feature = "metrics")]
    assert_eq!(
        metric("tierlimit_settlement_fallbacks_total{backend=\"redis\"}"),
        Some(1.0),
        "the settlement the fallback made is counted"
    );
    for _ in 0..3 {
        assert!(open.check(&check).await.unwrap().allowed, "fail open");
        assert!(matches!(
            closed.check(&check).await,
            Err(tierlimit::backend::BackendError::Unavailable(_))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demo_servers_share_one_limit_through_redis() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let mut urls = Vec::new();
    let mut running = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::builder(server.url())
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        let layer = tierlimit::RateLimitLayer::builder(common::spec_policy())
            .backend(backend)
            .build();
        let s = common::serve(demo::app(layer)).await;
        urls.push(s.url("/v1/account"));
        running.push(s);
    }
    let c = common::client();
    for i in 0..100 {
        let res = c
            .get(&urls[i % 2])
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "read {}", i + 1);
        let remaining: u64 = res.headers()["x-ratelimit-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(remaining, 99 - i as u64, "one shared bucket");
    }
    for url in &urls {
        let res = c
            .get(url)
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "36");
    }
}

#[tokio::test]
async fn peek_reports_capacity_without_counting() {
    if !ready() {
        return;
    }
    let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
    let limit = Limit::per_minute(10);
    assert_eq!(
        backend
            .peek_one(&subject("p"), &limit)
            .await
            .unwrap()
            .remaining,
        10
    );
    for _ in 0..3 {
        assert!(
            backend
                .check_one(&subject("p"), &limit)
                .await
                .unwrap()
                .allowed
        );
    }
    for _ in 0..20 {
        let d = backend.peek_one(&subject("p"), &limit).await.unwrap();
        assert_eq!(
            (d.limit, d.remaining, d.reset_after),
            (10, 7, Duration::from_secs(18))
        );
    }
    clock.advance(Duration::from_secs(6));
    assert_eq!(
        backend
            .peek_one(&subject("p"), &limit)
            .await
            .unwrap()
            .remaining,
        8
    );
    assert!(
        backend
            .check_one(&subject("p"), &limit)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(
        backend
            .peek_one(&subject("p"), &limit)
            .await
            .unwrap()
            .remaining,
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_over_admits_at_most_each_instances_share() {
    if !ready() {
        return;
    }
    let mut server = RedisServer::start();
    let limit = Limit::per_hour(10);
    let mut backends = Vec::new();
    for _ in 0..2 {
        backends.push(
            RedisBackend::builder(server.url())
                .timeout(common::redis::NOT_STALLED)
                .fallback_share(0.5)
                .connect()
                .await
                .unwrap(),
        );
    }
    // 4 of 10 used through Redis, then Redis dies.
    for i in 0..4 {
        let d = backends[i % 2]
            .check_one(&subject("out"), &limit)
            .await
            .unwrap();
        assert!(d.allowed);
    }
    server.kill();
    // Each instance now enforces half the limit on its own: 5 each.
    let mut admitted = 0;
    for b in &backends {
        for _ in 0..40 {
            let d =
                tokio::time::timeout(Duration::from_secs(5), b.check_one(&subject("out"), &limit))
                    .await
                    .expect("answered in time")
                    .unwrap();
            if d.allowed {
                admitted += 1;
                assert_eq!(d.limit, 5, "the headers show the share in force");
            }
        }
        assert_eq!(b.state(), BackendState::Degraded);
    }
    // The bound: instances × share × limit = 2 × 0.5 × 10.
    assert_eq!(admitted, 10, "over-admission bounded by the shares");
    // A request whose cost fits the limit but not the share: a 429 to try
    // again when Redis is back, never a 400.
    let d = backends[0]
        .check_one(
            &Subject {
                cost: 8,
                ..subject("big")
            },
            &limit,
        )
        .await
        .unwrap();
    assert!(!d.allowed);
    assert!(d.retry_after.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_answer_trips_nothing() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .timeout(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let limit = Limit::per_hour(100);
    assert!(
        backend
            .check_one(&subject("slow"), &limit)
            .await
            .unwrap()
            .allowed
    );
    // Redis stalls for 300 ms once (DEBUG SLEEP): the checks caught in it
    // time out; fewer than three in a row keep the backend on Redis.
    let port = server.port;
    let stall = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "DEBUG", "SLEEP", "0.3"])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(50)).await; // let the stall begin
    let _ = backend.check_one(&subject("slow"), &limit).await.unwrap();
    stall.await.unwrap();
    assert_eq!(backend.state(), BackendState::Connected, "one slow answer");
    let before = server.command_calls("evalsha");
    assert!(
        backend
            .check_one(&subject("slow"), &limit)
            .await
            .unwrap()
            .allowed
    );
    assert_eq!(
        server.command_calls("evalsha"),
        before + 1,
        "still on Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_load_answers_every_request_within_the_bound() {
    if !ready() {
        return;
    }
    let mut cluster = RedisCluster::start_with_replicas(1);
    let limit = Limit::per_hour(50);
    let backend = RedisBackend::cluster(cluster.urls())
        .timeout(Duration::from_millis(200))
        .retry_interval(Duration::from_millis(200))
        .fallback_share(0.2)
        .connect()
        .await
        .unwrap();
    // 20 of 50 through Redis; wait (bounded) until the replica has them.
    for _ in 0..20 {
        assert!(
            backend
                .check_one(&subject("fo"), &limit)
                .await
                .unwrap()
                .allowed
        );
    }
    let fo = subject("fo");
    let key = backend.charge_key(fo.key.as_u64(), &fo.charge(limit));
    let master = cluster.master_of(&key).expect("a master holds the bucket");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = cluster.nodes[master].cli(&["INFO", "replication"]).unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let offset = field("master_repl_offset:").unwrap_or_default();
        let replica = field("slave0:").unwrap_or_default();
        if !offset.is_empty() && replica.contains(&format!("offset={offset},")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "replication: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Load: 4 tasks on the failing bucket and on others, through the kill
    // and the failover. Every check is answered in time, none fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admitted = Arc::new(AtomicU32::new(0));
    let answered = Arc::new(AtomicU32::new(0));
    let degraded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (backend, stop, degraded) = (backend.clone(), Arc::clone(&stop), Arc::clone(&degraded));
        let killed = Arc::clone(&killed);
        let (admitted, answered) = (Arc::clone(&admitted), Arc::clone(&answered));
        tasks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                // The failing bucket about 40 times a second in all, from
                // the kill on: writes to it before the kill have all
                // reached the replica (what Redis's asynchronous
                // replication had not copied would be lost with the master,
                // and counted again, whatever the client).
                let key = if killed.load(Ordering::Relaxed) && i.is_multiple_of(25) {
                    "fo".to_owned()
                } else {
                    format!("other-{t}-{i}")
                };
                let d = tokio::time::timeout(
                    Duration::from_secs(2),
                    backend.check_one(&subject(&key), &limit),
                )
                .await
                .expect("a check took longer than 2 s")
                .expect("no error under the fallback policy");
                if key == "fo" && d.allowed {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                if backend.state() == BackendState::Degraded {
                    degraded.store(true, Ordering::Relaxed);
                }
                answered.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.nodes[master].kill();
    killed.store(true, Ordering::Relaxed);
    // The replica takes over; wait (bounded) for the cluster and for the
    // backend to be back on Redis.
    tokio::task::block_in_place(|| cluster.wait_failover(master));
    // Until Redis (limit 50), not the fallback (its share, 10), serves the
    // failing bucket again.
    let back_on_redis = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while backend
            .peek_one(&subject("fo"), &limit)
            .await
            .unwrap()
            .limit
            != 50
            || backend.state() != BackendState::Connected
        {
            assert!(std::time::Instant::now() < deadline, "never back on Redis");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    back_on_redis().await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no task panicked");
    }
    // The load's last checks may have met a stale connection to the dead
    // master and tripped the backend again (on a loaded machine): counting
    // what Redis has left starts once it is back, with no other traffic.
    back_on_redis().await;
    let mut admitted = admitted.load(Ordering::Relaxed);
    // Use up what Redis still has for the bucket.
    for _ in 0..100 {
        let d = backend.check_one(&subject("fo"), &limit).await.unwrap();
        if !d.allowed {
            assert_eq!(d.limit, 50, "refused by Redis, not the fallback");
            break;
        }
        admitted += 1;
    }
    println!(
        "failover: {} checks answered, {admitted} more admitted on the failing bucket",
        answered.load(Ordering::Relaxed)
    );
    assert!(
        degraded.load(Ordering::Relaxed),
        "the fallback served the failover"
    );
    // Redis had 30 left (the replica kept the 20); the fallback adds at
    // most its share, 0.2 × 50 = 10, on this one instance.
    assert!(
        (30..=40).contains(&admitted),
        "{admitted} admitted: the bound is 30 + 10"
    );
    assert_eq!(backend.state(), BackendState::Connected);
}

/// With only peeks coming (a quota endpoint, a quiet spell), a degraded
/// backend still probes Redis when a probe is due and comes back: a peek
/// is routed as a check is, and a failed one counts as a failure.
#[tokio::test]
async fn peeks_alone_bring_a_degraded_backend_back() {
    if !ready() {
        return;
    }
    let (mut server, clock, backend) = tripping_backend().await;
    let limit = Limit::per_hour(5);
    let first = backend.check_one(&subject("p"), &limit).await.unwrap();
    assert!(first.allowed);
    server.kill();
    // Peeks alone notice the outage too (each failure counts).
    for _ in 0..10 {
        backend.peek_one(&subject("p"), &limit).await.unwrap();
        if backend.state() == BackendState::Degraded {
            break;
        }
    }
    assert_eq!(
        backend.state(),
        BackendState::Degraded,
        "peeks count failures"
    );
    server.restart();
    let d = until_back(&backend, &clock, || async {
        backend.peek_one(&subject("p"), &limit).await.unwrap()
    })
    .await
    .expect("peeks alone brought the backend back to Redis");
    // Redis restarted empty: its answer, the whole limit.
    assert_eq!((d.limit, d.remaining), (5, 5));
}
