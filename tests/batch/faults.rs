//! The Redis backend with batches on, under faults: Redis flushed or
//! restarted while batches are held, stopped while takes and give-backs
//! are in flight, dropped while work is pending. Every admission is
//! counted here against what Redis's bucket allows.

use std::time::Duration;

use governor::clock::FakeRelativeClock;
use tierlimit::backend::{
    Backend, Charge, FailurePolicy, RedisBackend, RedisBackendBuilder, Subject,
};
use tierlimit::{Limit, key::KeyId};

use crate::common::redis::{RedisServer, ready};

async fn batched(builder: RedisBackendBuilder, clock: &FakeRelativeClock) -> RedisBackend {
    let builder = builder
        .timeout(Duration::from_millis(300))
        .failure_policy(FailurePolicy::FailClosed);
    crate::redis::batched_as(builder, clock).await
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
    let mut back = false;
    for _ in 0..10_000 {
        if a.check(&other.check(&probe)).await.is_ok_and(|d| d.allowed) {
            back = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(back, "a's connection came back");
    let held = a.batched_units();
    a.return_batches().await;
    let admitted = n as u32 + drain(&[&b], &s, &charge, 4_000).await;
    assert!(
        admitted <= 3_600,
        "admitted {admitted} against 3600 ({held} held by a)"
    );
}

/// Random traffic from three batched instances; Redis frozen (SIGSTOP)
/// for a few steps while takes and give-backs are on their way, then
/// running again (it runs every late call): every admission, replayed
/// through an exact GCRA, conforms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_takes_and_give_backs_after_a_freeze_never_over_admit() {
    use crate::oracle::{Fleet, batches, limits, random_run};
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let builder = || RedisBackend::builder(url.clone());
    let timeout = Duration::from_millis(150);
    let mut fleet = Fleet::with_timeout(builder, 3, Some(batches()), timeout).await;
    let run = tokio::time::timeout(Duration::from_secs(60), async {
        let key = "frozen";
        let (over, before) = random_run(&mut fleet, (0xfeed, key), &limits(), 60, (40, 2)).await;
        assert_eq!(over, 0, "{before} admitted before the freeze");
        // Frozen mid-run: what is sent meanwhile times out (refused, or
        // spent from units in hand), and runs late.
        server.stop_process();
        random_run(&mut fleet, (0xbeef, key), &limits(), 4, (40, 2)).await;
        for b in &fleet.instances {
            b.return_batches().await;
        }
        server.resume();
        random_run(&mut fleet, (0xcafe, key), &limits(), 60, (40, 2)).await
    });
    let (over, admitted) = run.await.expect("no hang");
    assert_eq!(over, 0, "{admitted} admitted");
    assert!(admitted > 500, "{admitted} admitted");
}

/// A batch in hand, the bucket drained by another instance: a request
/// that must leave a reserve (not critical) is refused by Redis, and is
/// never served from the batch in hand; a critical one still is.
#[tokio::test]
async fn a_batch_in_hand_never_serves_a_request_that_must_leave_a_reserve() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    let s = subject("reserved");
    let charge = s.charge(Limit::per_hour(3_600));
    warm(&a, &s, &charge, 5, usize::MAX).await;
    let held = a.batched_units();
    // b takes everything else (critical: no reserve), at a still clock.
    let drained = drain(&[&b], &s, &charge, 4_000).await;
    assert!(drained > 3_000, "{drained}");
    let low = Subject { reserve: 100, ..s };
    for _ in 0..10 {
        let d = a
            .check(&low.check(&low.charge(Limit::per_hour(3_600))))
            .await;
        assert!(
            !d.unwrap().allowed,
            "a request leaving 100 took from a's batch"
        );
    }
    assert_eq!(a.batched_units(), held, "the batch is untouched");
    assert!(a.check(&s.check(&charge)).await.unwrap().allowed);
}

/// Panics seen on the backends' I/O threads since the hook was set.
fn io_panics() -> &'static std::sync::atomic::AtomicUsize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("tierlimit-redis") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    &PANICS
}

/// The backend dropped while Redis is frozen, with give-backs and takes
/// on their way: the last of it goes on the I/O thread, when they are
/// answered or time out. Nothing panics there, and Redis, running again, finds the
/// bucket as the given-back units and the late takes leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_backend_with_calls_on_their_way_panics_nowhere() {
    use std::sync::atomic::Ordering;
    if !ready() {
        return;
    }
    let panics = io_panics().load(Ordering::SeqCst);
    let server = RedisServer::start();
    let clock = FakeRelativeClock::default();
    let a = batched(RedisBackend::builder(server.url()), &clock).await;
    let s = subject("dropped");
    let charge = s.charge(Limit::per_hour(3_600));
    let n = warm(&a, &s, &charge, 5, usize::MAX).await;
    server.stop_process();
    // Give-backs sent, not answered; takes of other owners sent too.
    let _ = tokio::time::timeout(Duration::from_millis(5), a.return_batches()).await;
    let mut takes = Vec::new();
    for i in 0..10 {
        let other = subject(&format!("other-{i}"));
        let c = other.charge(Limit::per_hour(3_600));
        let f = a.check(&other.check(&c));
        takes.push(tokio::spawn(f));
    }
    drop(a);
    for t in takes {
        let d = t.await.unwrap();
        assert!(d.is_err() || !d.unwrap().allowed, "fails closed");
    }
    // Redis runs again: the late calls land (a give-back removes its
    // batch's mark), and the last of the backend goes on the I/O thread.
    server.resume();
    for _ in 0..2_000 {
        if server
            .cli(&["KEYS", "*:b:*"])
            .unwrap_or_default()
            .is_empty()
        {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        io_panics().load(Ordering::SeqCst),
        panics,
        "a panic on an I/O thread"
    );
    // The frozen give-back ran late: the bucket holds all but what was
    // admitted (or less, never more).
    let b = batched(RedisBackend::builder(server.url()), &clock).await;
    let room = b.peek(s.key.as_u64(), &charge).await.unwrap().remaining;
    assert!(room <= 3_600 - n as u32, "{room} after {n} admitted");
}
