//! The Redis backend with batches on, against real `redis-server`s (a
//! single node and a Cluster) on a fake clock: exact under bursts across
//! instances, units given back when a batch ages, at shutdown and after a
//! limit changes, units in hand serving while Redis is stopped, and few
//! script calls for a hot key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use tierlimit::backend::{
    Backend, Batches, Charge, Check, RedisBackend, RedisBackendBuilder, Subject,
};
use tierlimit::{Limit, key::KeyId};

use crate::common::redis::{RedisCluster, RedisServer, ready};

async fn batched(builder: RedisBackendBuilder, clock: &FakeRelativeClock) -> RedisBackend {
    batched_as(builder.timeout(Duration::from_secs(2)), clock).await
}

/// `builder`, as it is, with batches on `clock`.
pub(crate) async fn batched_as(
    builder: RedisBackendBuilder,
    clock: &FakeRelativeClock,
) -> RedisBackend {
    builder
        .fake_clock(clock.clone())
        .batches(Batches::new())
        .connect()
        .await
        .unwrap()
}

/// A server and two batched instances on it, on one fake clock (`None`:
/// no `redis-server` here).
async fn two_instances() -> Option<(RedisServer, FakeRelativeClock, RedisBackend, RedisBackend)> {
    if !ready() {
        return None;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    Some((server, clock, a, b))
}

/// `a` made hot on `charge`: the units it holds, and what `b` sees.
async fn held(a: &RedisBackend, b: &RedisBackend, s: &Subject, charge: &Charge) -> (u32, u32) {
    warm(a, s, charge).await;
    (a.batched_units() as u32, room(b, s, charge).await)
}

/// Every unit held is back, give or take one of refill (`spent`: what
/// was spent meanwhile).
fn assert_back(before: u32, held: u32, spent: u32, after: u32) {
    let back = before + held;
    assert!(
        after + spent >= back && after <= back + 1,
        "{before} + {held} - {spent} → {after}"
    );
}

fn subject(key: &str) -> Subject {
    Subject::new(KeyId::of(key), 21)
}

/// `n` checks of `charge` at once, spread over `instances`: how many
/// were admitted.
async fn burst(instances: &[RedisBackend], s: &Subject, charge: &Charge, n: usize) -> u32 {
    let allowed = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (b, allowed, s, charge) = (
            instances[i % instances.len()].clone(),
            Arc::clone(&allowed),
            *s,
            *charge,
        );
        tasks.push(tokio::spawn(async move {
            if b.check(&s.check(&charge)).await.unwrap().allowed {
                allowed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    allowed.load(Ordering::Relaxed)
}

/// Three bursts of 2,000 simultaneous checks from two instances on a
/// limit of 200: exactly 200 each round, in far fewer script calls than
/// checks.
async fn exact_bursts(instances: &[RedisBackend], clock: &FakeRelativeClock) {
    let s = subject("bursty");
    let charge = s.charge(Limit::per_hour(200));
    for round in 0..3 {
        assert_eq!(
            burst(instances, &s, &charge, 2_000).await,
            200,
            "round {round}"
        );
        // The hour passes: the bucket is full again, every batch aged.
        clock.advance(Duration::from_secs(3_600));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_admit_exactly_the_limit_on_a_single_node() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    exact_bursts(&[a, b], &clock).await;
}

#[tokio::test]
async fn a_hot_key_makes_few_script_calls() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let s = subject("hot");
    let charge = s.charge(Limit::per_hour(1_000_000));
    server.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..2_000 {
        assert!(a.check(&s.check(&charge)).await.unwrap().allowed);
        // Half a millisecond between requests: 2,000 a second.
        clock.advance(Duration::from_micros(500));
    }
    let calls = server.command_calls("evalsha");
    assert!(calls <= 100, "{calls} script calls for 2,000 checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_admit_exactly_the_limit_on_a_cluster() {
    if !ready() {
        return;
    }
    let cluster = RedisCluster::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::cluster(cluster.urls()), &clock).await;
    let b = batched(RedisBackend::cluster(cluster.urls()), &clock).await;
    exact_bursts(&[a, b], &clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_limits_are_exact_across_four_batched_instances() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(batched(RedisBackend::builder(server.url()), &clock).await);
    }
    crate::common::conformance::exact_under_contention(backends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_table_holds_with_batches_on() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let backend = batched(RedisBackend::builder(server.url()), &clock).await;
    crate::common::conformance::run(&backend, |d| clock.advance(d)).await;
    crate::common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
    crate::common::conformance::owners::run_owners(&backend, |d| clock.advance(d)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_table_holds_with_batches_on_a_cluster() {
    if !ready() {
        return;
    }
    let cluster = RedisCluster::start();
    let clock = FakeRelativeClock::default();
    let backend = batched(RedisBackend::cluster(cluster.urls()), &clock).await;
    crate::common::conformance::run(&backend, |d| clock.advance(d)).await;
    crate::common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
    crate::common::conformance::owners::run_owners(&backend, |d| clock.advance(d)).await;
}

/// A hot owner on `a`: forty checks at once, enough for a batch.
async fn warm(a: &RedisBackend, s: &Subject, charge: &Charge) {
    for _ in 0..40 {
        assert!(a.check(&s.check(charge)).await.unwrap().allowed);
    }
    assert!(a.batched_units() > 0, "a batch is held");
}

/// What the bucket could take at once, as another instance sees it.
async fn room(b: &RedisBackend, s: &Subject, charge: &Charge) -> u32 {
    b.peek(s.key.as_u64(), charge).await.unwrap().remaining
}

#[tokio::test]
async fn units_come_back_at_shutdown_and_when_a_batch_ages() {
    let Some((_server, clock, a, b)) = two_instances().await else {
        return;
    };
    let s = subject("returns");
    let charge = s.charge(Limit::per_hour(3_600));
    // Shutdown: every unit not spent is Redis's again.
    let (held_now, before) = held(&a, &b, &s, &charge).await;
    a.return_batches().await;
    assert_eq!(a.batched_units(), 0);
    assert_back(before, held_now, 0, room(&b, &s, &charge).await);
    // Aged: past the hold, the next check sends the batch back first.
    let (held_now, before) = held(&a, &b, &s, &charge).await;
    clock.advance(Duration::from_millis(150));
    assert!(a.check(&s.check(&charge)).await.unwrap().allowed);
    a.return_batches().await;
    assert_back(before, held_now, 1, room(&b, &s, &charge).await);
}

#[tokio::test]
async fn a_changed_limit_sends_the_batch_back() {
    let Some((_server, _clock, a, b)) = two_instances().await else {
        return;
    };
    let s = subject("changes");
    let old = s.charge(Limit::per_hour(3_600));
    let (held_now, before) = held(&a, &b, &s, &old).await;
    // A boost: the same caller, a more generous limit in another bucket.
    let new = Charge {
        bucket: old.bucket ^ 0x5a5a,
        limit: Limit::per_hour(7_200),
        ..old
    };
    let check = Check::new(s.key.as_u64(), true, std::slice::from_ref(&new));
    assert!(a.check(&check).await.unwrap().allowed);
    a.return_batches().await;
    assert_back(before, held_now, 0, room(&b, &s, &old).await);
}

/// A refund (a settlement that gives units back) lands while a batch is
/// held under other units, then the batch goes back: over the hour,
/// exactly the limit plus what was refunded is admitted (the refund and
/// the batch's unused units are each given back once).
#[tokio::test]
async fn a_refund_and_a_give_back_never_return_the_same_units() {
    use tierlimit::backend::{Adjustment, PeriodBounds};
    let Some((_server, _clock, a, b)) = two_instances().await else {
        return;
    };
    let s = subject("refunded");
    let limit = Limit::per_hour(3_600);
    let charge = s.charge(limit);
    warm(&a, &s, &charge).await;
    let mut admitted = 40;
    // A normal check on top of a's batch, then a refund of three units.
    assert!(b.check(&s.check(&charge)).await.unwrap().allowed);
    admitted += 1;
    let refund = Adjustment {
        bucket: charge.bucket,
        limit,
        units: -3,
        period: PeriodBounds::ROLLING,
    };
    b.settle(s.key.as_u64(), &[refund]).await.unwrap();
    a.return_batches().await;
    while b.check(&s.check(&charge)).await.unwrap().allowed {
        admitted += 1;
        assert!(admitted <= 4_000, "no end");
    }
    assert_eq!(admitted, 3_600 + 3, "the limit and the 3 refunded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_in_hand_serve_while_redis_is_stopped_until_they_age() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = RedisBackend::builder(server.url())
        .fake_clock(clock.clone())
        .timeout(Duration::from_millis(200))
        .failure_policy(tierlimit::backend::FailurePolicy::FailClosed)
        .batches(Batches::new())
        .connect()
        .await
        .unwrap();
    let s = subject("outage");
    let charge = s.charge(Limit::per_hour(3_600));
    warm(&a, &s, &charge).await;
    let held = a.batched_units();
    server.stop_process();
    // Every unit in hand is spent with no round trip.
    for i in 0..held {
        assert!(
            a.check(&s.check(&charge)).await.unwrap().allowed,
            "unit {i} of {held}"
        );
    }
    // Then, and once a batch has aged, the failure policy answers.
    clock.advance(Duration::from_millis(150));
    let d = a.check(&s.check(&charge)).await;
    assert!(
        d.is_err() || !d.unwrap().allowed,
        "denied while Redis is stopped"
    );
    server.resume();
}

/// Two tonic servers sharing limits through one Redis with batches on:
/// 400 health checks at once from one key (free: 100 reads an hour) over
/// both, exactly 100 answered, the others `RESOURCE_EXHAUSTED`.
#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_redis_admits_exactly_the_limit_over_grpc() {
    use crate::common::redis::{RedisServer, ready};
    if !ready() {
        return;
    }
    let redis = RedisServer::start();
    let mut channels = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let backend = crate::common::redis::batched_on_the_real_clock(&redis).await;
        let layer = tierlimit::RateLimitLayer::builder(crate::common::spec_policy())
            .backend(backend)
            .build();
        let server = crate::common::serve_grpc(layer, crate::grpc_demo::grpc_routes().await).await;
        channels.push(crate::common::grpc_channel(server.addr).await);
        servers.push(server);
    }
    let mut calls = Vec::new();
    for i in 0..400 {
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(channels[i % 2].clone());
        calls.push(tokio::spawn(async move {
            health
                .check(crate::common::health_check("free-demo-key"))
                .await
                .map_err(|s| s.code())
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(tonic::Code::ResourceExhausted) => exhausted += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, exhausted), (100, 300));
}

/// Token charges are batched like request units: each request takes its
/// estimate from a batch of its instance. Two instances, 30 checks in a
/// row then 370 at once, of an estimate of 100 tokens against 10,000
/// tokens an hour:
/// exactly 100 admitted, each decision naming its token limit; a refund of
/// 600 tokens afterwards (estimates settled lower) admits exactly 6 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_estimates_are_batched_and_settled_exactly() {
    use std::sync::atomic::AtomicU32;
    use tierlimit::backend::{Adjustment, PeriodBounds};
    let Some((_server, _clock, a, b)) = two_instances().await else {
        return;
    };
    let owner = KeyId::of("tokens").as_u64();
    let tokens = Limit::per_hour(10_000);
    let charges = [
        Charge {
            bucket: owner ^ 1,
            limit: Limit::per_hour(1_000_000),
            cost: 1,
            reserve: 0,
            period: PeriodBounds::ROLLING,
        },
        Charge {
            bucket: owner ^ 2,
            limit: tokens,
            cost: 100,
            reserve: 0,
            period: PeriodBounds::ROLLING,
        },
    ];
    fn check(owner: u64, charges: &[Charge]) -> Check<'_> {
        Check {
            tokens: 1,
            ..Check::new(owner, true, charges)
        }
    }
    // Thirty in a row on one instance: enough for it to take a batch.
    for _ in 0..30 {
        let d = a.check(&check(owner, &charges)).await.unwrap();
        assert!(d.allowed && d.tokens.is_some());
    }
    assert!(a.batched_units() > 0, "a batch of token estimates is held");
    let allowed = Arc::new(AtomicU32::new(30));
    let mut tasks = Vec::new();
    for i in 0..370 {
        let (backend, allowed) = ([&a, &b][i % 2].clone(), Arc::clone(&allowed));
        tasks.push(tokio::spawn(async move {
            let d = backend.check(&check(owner, &charges)).await.unwrap();
            if d.allowed {
                assert!(d.tokens.is_some(), "the decision names its token limit");
                allowed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        allowed.load(Ordering::Relaxed),
        100,
        "10,000 tokens of 100 each"
    );
    a.return_batches().await;
    b.return_batches().await;
    let refund = Adjustment {
        bucket: owner ^ 2,
        limit: tokens,
        units: -600,
        period: PeriodBounds::ROLLING,
    };
    a.settle(owner, &[refund]).await.unwrap();
    let mut more = 0;
    for i in 0..40 {
        if [&a, &b][i % 2]
            .check(&check(owner, &charges))
            .await
            .unwrap()
            .allowed
        {
            more += 1;
        }
    }
    assert_eq!(more, 6, "the 600 tokens refunded, 100 each");
}
