//! The Redis backend with batches on, under faults: Redis flushed or
//! restarted while batches are held, stopped while takes and give-backs
//! are in flight, dropped while work is pending. Every admission is
//! counted here against what Redis's bucket allows.

use std::time::Duration;

use governor::clock::FakeRelativeClock;
use tierlimit::backend::{
    Backend, Batches, Charge, FailurePolicy, RedisBackend, RedisBackendBuilder, Subject,
};
use tierlimit::{Limit, key::KeyId};

use crate::common::redis::{RedisServer, ready};

async fn batched(builder: RedisBackendBuilder, clock: &FakeRelativeClock) -> RedisBackend {
    builder
        .fake_clock(clock.clone())
        .timeout(Duration::from_millis(300))
        .failure_policy(FailurePolicy::FailClosed)
        .batches(Batches::new())
        .connect()
        .await
        .unwrap()
}

fn subject(key: &str) -> Subject {
    Subject::new(KeyId::of(key), 21)
}

/// Checks in a row on `a` (the clock still) until it holds at least
/// `units` of a batch, or exactly `n` checks: how many it made.
async fn warm(a: &RedisBackend, s: &Subject, charge: &Charge, units: u64, n: usize) -> usize {
    let mut made = 0;
    while made < n && (n < usize::MAX || made < 40 || a.batched_units() < units) {
        assert!(a.check(&s.check(charge)).await.unwrap().allowed);
        made += 1;
        assert!(made < 1_000, "no batch of {units}");
    }
    assert!(a.batched_units() >= units, "a batch is held");
    made
}

/// `n` checks in a row, alternating over `instances`: how many passed.
async fn drain(instances: &[&RedisBackend], s: &Subject, charge: &Charge, n: usize) -> u32 {
    let mut admitted = 0;
    for i in 0..n {
        let d = instances[i % instances.len()].check(&s.check(charge)).await;
        admitted += u32::from(d.is_ok_and(|d| d.allowed));
    }
    admitted
}

/// Redis loses its keys (`FLUSHALL`) while `a` holds a batch; `b` then
/// takes the very same batch (same clock, same traffic: its end is the
/// same TAT). `a`'s give-back must not return `b`'s units: the bucket,
/// full after the flush, admits its burst and no more.
#[tokio::test]
async fn a_give_back_after_flushall_does_not_return_another_batch() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    let c = batched(RedisBackend::builder(server.url()), &clock).await;
    let s = subject("flushed");
    let charge = s.charge(Limit::per_hour(3_600));
    let n = warm(&a, &s, &charge, 20, usize::MAX).await;
    assert_eq!(server.cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    warm(&b, &s, &charge, 20, n).await;
    let held = a.batched_units();
    a.return_batches().await;
    // Since the flush, at a still clock: b's warm-up, then all b and c get.
    let admitted = n as u32 + drain(&[&b, &c], &s, &charge, 4_000).await;
    assert!(
        admitted <= 3_600,
        "admitted {admitted} against 3600 ({held} given back by a)"
    );
}

/// The same after a restart: Redis comes back empty.
#[tokio::test]
async fn a_give_back_after_a_restart_does_not_return_another_batch() {
    if !ready() {
        return;
    }
    let mut server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let s = subject("restarted");
    let charge = s.charge(Limit::per_hour(3_600));
    let n = warm(&a, &s, &charge, 20, usize::MAX).await;
    server.restart();
    // A new instance on the empty server, the same traffic.
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    warm(&b, &s, &charge, 20, n).await;
    // a's connection comes back (its first call fails): its give-back is
    // then sent.
    let other = subject("other");
    let probe = other.charge(Limit::per_hour(3_600));
    let _ = a.check(&other.check(&probe)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.check(&other.check(&probe)).await.unwrap().allowed);
    let held = a.batched_units();
    a.return_batches().await;
    let admitted = n as u32 + drain(&[&b], &s, &charge, 4_000).await;
    assert!(
        admitted <= 3_600,
        "admitted {admitted} against 3600 ({held} held by a)"
    );
}
