//! Stress, as issue 9 found it: bursts far bigger than the machine can
//! serve at once, against instances sharing one healthy Redis, must admit
//! exactly the limit (local queueing is not a Redis failure); and a key
//! spray must lock no listed customer out of the memory backend.
//!
//! Bounded: three bursts of 2,000 requests and one spray of 30,000, each
//! request with a client timeout; every server stops with the test.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{serve, spec_policy};
use governor::clock::FakeRelativeClock;
use tierlimit::{MemoryBackend, Policy};

/// One key secret for the whole binary, set before any key is hashed.
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

/// A client that opens a new connection for every request.
fn one_connection_per_request() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends `n` requests at once, spread over `urls`; counts statuses.
async fn burst(urls: &[String], key: &str, n: usize) -> [u32; 3] {
    let client = one_connection_per_request();
    let counts: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, counts, start) = (client.clone(), Arc::clone(&counts), Arc::clone(&start));
        let url = urls[i % urls.len()].clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let res = client.post(&url).header("x-api-key", key).send().await;
            let slot = match res.map(|r| r.status().as_u16()) {
                Ok(200) => 0,
                Ok(429) => 1,
                other => {
                    eprintln!("unexpected answer: {other:?}");
                    2
                }
            };
            counts[slot].fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed))
}

/// Two demo instances, each with its own backend from `connect`, take
/// three bursts of 2,000 requests (pro write: 200/hour), one key each; the
/// first comes right after start-up, on a cold connection.
#[cfg(feature = "redis")]
async fn bursts_admit_exactly_the_limit(connect: impl AsyncFn() -> tierlimit::RedisBackend) {
    use tierlimit::backend::BackendState;

    let policy = spec_policy()
        .to_builder()
        .key("burst-0", "pro")
        .key("burst-1", "pro")
        .key("burst-2", "pro")
        .build()
        .unwrap();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let backend = connect().await;
        servers.push(serve(demo::app(demo::limits(policy.clone(), backend.clone()))).await);
        backends.push(backend);
    }
    let urls: Vec<String> = servers.iter().map(|s| s.url("/v1/clusters")).collect();
    for round in 0..3 {
        let [ok, refused, other] = burst(&urls, &format!("burst-{round}"), 2_000).await;
        println!("burst {round}: {ok} admitted, {refused} refused, {other} other");
        assert_eq!(other, 0, "burst {round}: every request answered 200 or 429");
        assert_eq!(ok, 200, "burst {round}: exactly the limit");
        assert_eq!(refused, 1_800);
        for b in &backends {
            assert_eq!(b.state(), BackendState::Connected, "no fallback");
        }
    }
}

/// The bursts on a single node (`batches`: with batches on, a hot key's
/// checks spent from batches taken from Redis). The defaults otherwise
/// (fallback to memory), but a 250 ms timeout (not 50): far below the
/// seconds a burst queues locally, so counting that queue as Redis time
/// still fails the test, and above the scheduling stalls of a two-core
/// machine running the instances, the client and three Redis processes
/// at once (at 50 ms, one such stall in a CI run sent a round trip to the
/// fallback: 245 admitted of 200).
#[cfg(feature = "redis")]
async fn on_a_single_node(batches: bool) {
    use common::redis::{RedisServer, available};
    if !available() {
        return;
    }
    setup();
    let redis = RedisServer::start();
    bursts_admit_exactly_the_limit(async || {
        with_batches(tierlimit::RedisBackend::builder(redis.url()), batches)
            .timeout(STALL)
            .connect()
            .await
            .unwrap()
    })
    .await;
}

/// The bursts on a three-master cluster (the same timeout).
#[cfg(feature = "redis")]
async fn on_a_cluster(batches: bool) {
    use common::redis::{RedisCluster, available};
    if !available() {
        return;
    }
    setup();
    let cluster = RedisCluster::start();
    bursts_admit_exactly_the_limit(async || {
        with_batches(tierlimit::RedisBackend::cluster(cluster.urls()), batches)
            .timeout(STALL)
            .connect()
            .await
            .unwrap()
    })
    .await;
}

/// The Redis timeout of the burst tests (see [`on_a_single_node`]).
#[cfg(feature = "redis")]
const STALL: Duration = Duration::from_millis(250);

#[cfg(feature = "redis")]
fn with_batches(
    builder: tierlimit::backend::RedisBackendBuilder,
    batches: bool,
) -> tierlimit::backend::RedisBackendBuilder {
    if batches {
        builder.batches(tierlimit::backend::Batches::new())
    } else {
        builder
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bursts_on_two_instances_admit_exactly_the_limit() {
    on_a_single_node(false).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bursts_on_two_instances_admit_exactly_the_limit() {
    on_a_cluster(false).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_bursts_on_two_instances_admit_exactly_the_limit() {
    on_a_single_node(true).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_cluster_bursts_on_two_instances_admit_exactly_the_limit() {
    on_a_cluster(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_spray_locks_no_listed_customer_out() {
    setup();
    // Unknown keys are free-tier guests (100 reads a day); the table holds
    // 2,000 keys. A spray of 30,000 distinct keys fills it many times over.
    let policy: Policy = spec_policy()
        .to_builder()
        .unknown_keys(tierlimit::policy::KeyRule::Tier("free".into()))
        .key("customer-0", "free")
        .key("customer-1", "free")
        .key("customer-2", "free")
        .key("customer-3", "free")
        .build()
        .unwrap();
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(2_000)
        .build();
    let server = serve(demo::app(demo::limits(policy, backend.clone()))).await;
    let url = server.url("/v1/account");
    let client = common::client();
    let read = move |key: String| {
        let req = client.get(&url).header("x-api-key", key);
        async move {
            let res = req.send().await.unwrap();
            let remaining = res
                .headers()
                .get("x-ratelimit-remaining")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
            (res.status().as_u16(), remaining)
        }
    };
    let sprayed = Arc::new(AtomicU32::new(0));
    let mut sprayers = Vec::new();
    for t in 0..16u32 {
        let (read, sprayed) = (read.clone(), Arc::clone(&sprayed));
        sprayers.push(tokio::spawn(async move {
            for i in 0..1_875u32 {
                let (status, _) = read(format!(
                    "spray-{t}-{i}-{:08x}",
                    i.wrapping_mul(2_654_435_761)
                ))
                .await;
                assert!(status == 200 || status == 429, "spray answered {status}");
                sprayed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // During the spray, once the table is full: customers' first requests
    // get their own buckets and their full limit.
    while sprayed.load(Ordering::Relaxed) < 10_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in 0..2 {
        for n in 0..5 {
            let (status, remaining) = read(format!("customer-{c}")).await;
            assert_eq!(
                (status, remaining),
                (200, Some(99 - n)),
                "customer {c} during the spray"
            );
        }
    }
    for s in sprayers {
        s.await.unwrap();
    }
    assert_eq!(sprayed.load(Ordering::Relaxed), 30_000);
    assert!(
        backend.tracked_keys() <= 4_000,
        "{} tracked",
        backend.tracked_keys()
    );
    // Right after it, the other customers come for the first time.
    for c in 2..4 {
        let (status, remaining) = read(format!("customer-{c}")).await;
        assert_eq!(
            (status, remaining),
            (200, Some(99)),
            "customer {c} after the spray"
        );
    }
    // And the first two still have exactly their own state.
    let (status, remaining) = read("customer-0".into()).await;
    assert_eq!((status, remaining), (200, Some(94)));

    // A day later, with no traffic at all, the state is reclaimed.
    clock.advance(Duration::from_secs(86_400 + 60));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backend.tracked_keys() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        backend.tracked_keys(),
        0,
        "idle state reclaimed without traffic"
    );
}
