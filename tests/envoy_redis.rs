//! Envoy's rate limit service on Redis: two instances on one real
//! `redis-server` admit exactly the limit under concurrency, and a Redis
//! that goes away is answered by the backend's failure policy, never by a
//! gRPC error. Skipped (with a message) without `redis-server`, unless
//! `TIERLIMIT_REQUIRE_REDIS=1`.
#![cfg(all(feature = "envoy", feature = "redis", feature = "test-util"))]

mod common;

use std::time::Duration;

use common::envoy::{OK, OVER, ask1, client, header, serve, spawn_rls, why};
use common::redis::{RedisServer, fake_clock_backend, ready};
use governor::clock::FakeRelativeClock;
use tierlimit::backend::FailurePolicy;
use tierlimit::envoy::RateLimitServer;
use tierlimit::{Policy, RateLimitLayer, RedisBackend};

const POLICY: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = "50/hour"
write = "4/hour"

[keys]
"free-key" = "free"
"#;

fn policy() -> Policy {
    Policy::from_toml_str(POLICY).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_admit_exactly_the_limit() {
    if !ready() {
        return;
    }
    let redis = RedisServer::start();
    // Redis's clock stands still: no refill while the burst runs.
    let clock = FakeRelativeClock::default();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let backend = fake_clock_backend(&redis, &clock).await;
        let layer = RateLimitLayer::builder(policy()).backend(backend).build();
        let s = serve(RateLimitServer::new(&layer)).await;
        clients.push(client(s.addr).await);
        servers.push(s);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = clients[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            ask1(&mut c, &[("api_key", "free-key"), ("category", "read")])
                .await
                .overall_code
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            OK => ok += 1,
            code => assert_eq!(code, OVER),
        }
    }
    assert_eq!(ok, 50, "exactly the limit, across both instances");
}

async fn backend(redis: &RedisServer, policy: FailurePolicy) -> RedisBackend {
    RedisBackend::builder(redis.url())
        .timeout(Duration::from_millis(300))
        .failure_policy(policy)
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_redis_gone_mid_flight_is_answered_by_the_failure_policy() {
    if !ready() {
        return;
    }
    let mut redis = RedisServer::start();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for p in [
        FailurePolicy::FailClosed,
        FailurePolicy::FailOpen,
        FailurePolicy::Fallback,
    ] {
        let layer = RateLimitLayer::builder(policy())
            .backend(backend(&redis, p).await)
            .build();
        let s = serve(RateLimitServer::new(&layer)).await;
        clients.push(client(s.addr).await);
        servers.push(s);
    }
    let write = [("api_key", "free-key"), ("category", "write")];
    for c in &mut clients {
        assert_eq!(ask1(c, &write).await.overall_code, OK, "Redis up");
    }
    redis.kill();
    let [closed, open, fallback] = &mut clients[..] else {
        unreachable!()
    };
    for _ in 0..3 {
        // Fail closed: refused, saying why, with the layer's Retry-After.
        let r = ask1(closed, &write).await;
        assert_eq!(
            (r.overall_code, why(&r, 0)),
            (OVER, "rate-limiter-unavailable")
        );
        assert_eq!(header(&r, "retry-after"), Some("1"));
        // Fail open: let through.
        assert_eq!(ask1(open, &write).await.overall_code, OK);
    }
    // The fallback limits the instance in memory (its share is the whole
    // limit by default): 4, then refusals by the limit.
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(ask1(fallback, &write).await.overall_code);
    }
    assert_eq!(codes, [OK, OK, OK, OK, OVER]);
}

/// A check of the example's free reads: its code, and how long it took.
async fn timed_check(
    c: &mut envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
) -> (i32, Duration) {
    let read = [("api_key", "free-demo-key"), ("category", "read")];
    let mut r = common::envoy::request(vec![common::envoy::descriptor(&read)]);
    r.domain = "tierlimit".into();
    let started = std::time::Instant::now();
    let r = common::envoy::ask(c, r).await;
    (r.overall_code, started.elapsed())
}

/// The rate limit filter's `timeout` in the example Envoy configuration.
fn example_filter_timeout() -> Duration {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/envoy/envoy.yaml"
    ))
    .unwrap();
    let filter = yaml.find("filters.http.ratelimit.v3.RateLimit").unwrap();
    let secs = yaml[filter..]
        .lines()
        .find_map(|l| l.trim().strip_prefix("timeout: "))
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse::<f64>().ok())
        .expect("the filter's timeout");
    Duration::from_secs_f64(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_answered_within_the_example_envoys_timeout() {
    use std::process::{Command, Stdio};
    if !ready() {
        return;
    }
    let redis = RedisServer::start();
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/envoy/policy.toml");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tierlimit"));
    command
        .args(["rls", "--policy", policy, "--listen", "127.0.0.1:0"])
        .args(["--redis", &redis.url()])
        .env("TIERLIMIT_KEY_SECRET", "a-test-secret")
        .env("RUST_LOG", "error")
        .stderr(Stdio::null());
    let (_rls, addr) = tokio::task::spawn_blocking(move || spawn_rls(command))
        .await
        .unwrap();
    let mut c = client(addr).await;
    assert_eq!(timed_check(&mut c).await.0, OK, "Redis up");
    // Redis stalls: the answer is the failure policy's (Fallback: in
    // memory), and it must reach Envoy before Envoy gives up on it (with
    // `failure_mode_deny`, a late answer is a refusal).
    redis.stop_process();
    let (code, took) = timed_check(&mut c).await;
    redis.resume();
    let timeout = example_filter_timeout();
    assert_eq!(code, OK);
    assert!(
        took < timeout,
        "answered in {took:?}; Envoy waits {timeout:?}"
    );
}
