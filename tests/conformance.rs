//! GCRA conformance of the memory backend on a fake clock, and exactness
//! under contention.

mod common;

#[allow(unused_imports)]
use common::one::{CheckOne, CheckOneNow};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use tierlimit::{Limit, MemoryBackend, backend::Subject, key::KeyId};

#[tokio::test]
async fn memory_backend_passes_the_conformance_table() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::run(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn memory_backend_passes_the_calendar_table() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::calendar::run_calendar(&backend, |d| clock.advance(d)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_calendar_is_exact_under_contention() {
    let backend = MemoryBackend::new();
    common::conformance::calendar::exact_calendar_under_contention(vec![backend]).await;
}

/// Calendar counters stay within the key budget under a spray of unknown
/// keys: guests past the cap share one count per limit (as they share a
/// GCRA bucket), while a listed customer keeps its own full count.
#[test]
fn calendar_counters_stay_bounded_under_a_key_spray() {
    use tierlimit::policy::{Calendar, Period};
    let backend = MemoryBackend::builder().max_keys(8).build();
    let day = Limit::per_day(3).with_period(Period::CalendarDay).unwrap();
    let noon = Duration::from_secs(1_800_000_000);
    let bounds = Calendar::utc().bounds(Period::CalendarDay, noon);
    let mut admitted = 0;
    for n in 0..1_000 {
        let s = Subject {
            known: false,
            ..subject(&format!("spray-{n}"))
        };
        let c = s.charge(day).in_period(bounds);
        admitted += u32::from(backend.check_now(&s.check(&c)).unwrap().allowed);
    }
    assert!(backend.tracked_keys() <= 8, "{}", backend.tracked_keys());
    assert_eq!(
        admitted,
        8 + 3,
        "8 guests tracked, the rest share one day of 3"
    );
    let customer = subject("listed-customer");
    let c = customer.charge(day).in_period(bounds);
    for _ in 0..3 {
        assert!(backend.check_now(&customer.check(&c)).unwrap().allowed);
    }
    assert!(!backend.check_now(&customer.check(&c)).unwrap().allowed);
    assert_eq!(
        backend.tracked_keys(),
        9,
        "the customer's count, past the cap"
    );
}

#[tokio::test]
async fn conformance_holds_with_a_tiny_key_cap() {
    // At a cap of one key, the second key is limited through the overflow
    // bucket: it still follows GCRA exactly.
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(1)
        .build();
    common::conformance::run(&backend, |d| clock.advance(d)).await;
}

fn subject(key: &str) -> Subject {
    Subject::new(KeyId::of(key), 1)
}

#[test]
fn exactly_max_allowed_under_contention_on_threads() {
    let limit = Limit::per_hour(1000);
    for round in 0..5 {
        let clock = FakeRelativeClock::default(); // frozen: nothing refills
        let backend = MemoryBackend::builder().clock(clock).build();
        let allowed = Arc::new(AtomicU32::new(0));
        let subject = subject(&format!("hot-key-{round}"));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (backend, allowed) = (&backend, &allowed);
                s.spawn(move || {
                    for _ in 0..500 {
                        if backend.check_one_now(&subject, &limit).unwrap().allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            allowed.load(Ordering::Relaxed),
            1000,
            "round {round}: 4000 tries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_max_allowed_under_contention_on_tasks() {
    let limit = Limit::per_hour(100);
    let clock = FakeRelativeClock::default();
    let backend = Arc::new(MemoryBackend::builder().clock(clock.clone()).build());
    let subject = subject("k");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let backend = Arc::clone(&backend);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            for _ in 0..20 {
                if backend.check_one(&subject, &limit).await.unwrap().allowed {
                    n += 1;
                }
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100, "1280 tries at a frozen clock");
    // One interval later, exactly one more.
    clock.advance(Duration::from_secs(36));
    assert!(backend.check_one(&subject, &limit).await.unwrap().allowed);
    assert!(!backend.check_one(&subject, &limit).await.unwrap().allowed);
}

#[tokio::test]
async fn memory_backend_passes_the_several_limit_table() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn memory_backend_passes_the_owners_table() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::owners::run_owners(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn memory_backend_passes_the_lease_table() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::run_leases(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn lease_table_holds_with_a_tiny_key_cap() {
    // Leases are not keys of the budget: a cap of one changes nothing.
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(1)
        .build();
    common::conformance::run_leases(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn several_limit_table_holds_with_a_tiny_key_cap() {
    // Guests at a cap of one key go through the overflow buckets: still
    // all or nothing, still exact.
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(1)
        .build();
    common::conformance::run_multi(&backend, |d| clock.advance(d)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_limits_exact_under_contention() {
    for _ in 0..5 {
        let backend = common::fake_memory();
        common::conformance::exact_under_contention(vec![backend]).await;
    }
}

#[test]
fn a_key_spray_locks_out_no_customer_under_several_limits() {
    use tierlimit::backend::{Charge, Check};
    let limits = [Limit::per_minute(10), Limit::per_hour(100)];
    let charges = |owner: u64| {
        limits.map(|limit| Charge {
            bucket: owner ^ u64::from(limit.max()),
            limit,
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        })
    };
    let check = |backend: &MemoryBackend<FakeRelativeClock>, owner: u64, known: bool| {
        let owner = owner.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let charges = charges(owner);
        backend
            .check_now(&Check::new(owner, known, &charges))
            .unwrap()
    };
    let cap = 1_000;
    let backend = MemoryBackend::builder()
        .clock(FakeRelativeClock::default())
        .max_keys(cap)
        .build();
    // 5,000 guests, two buckets each: the first 500 are tracked (1,000
    // buckets, the cap); the rest share one overflow bucket per limit, so
    // exactly 10 of them get through (the per-minute burst), all or nothing.
    let mut untracked_allowed = 0;
    for i in 0..5_000 {
        let d = check(&backend, i, false);
        if i < 500 {
            assert!(d.allowed, "guest {i} under the cap");
        } else if d.allowed {
            untracked_allowed += 1;
        }
        assert!(backend.tracked_keys() <= cap);
    }
    assert_eq!(untracked_allowed, 10);
    // Customers arriving during the spray get their own buckets and
    // their whole limit: exactly 10, then refused by the per-minute limit.
    for k in 0..200 {
        let customer = 1_000_000 + k;
        for n in 0..10 {
            let d = check(&backend, customer, true);
            assert!(d.allowed, "customer {k}, request {n}");
            assert_eq!(d.remaining, 9 - n);
        }
        let d = check(&backend, customer, true);
        assert!(!d.allowed);
        assert_eq!(d.index, 0, "the per-minute limit refuses");
        assert!(backend.tracked_keys() <= 2 * cap, "the hard bound");
    }
    // The spray goes on; the customers' state survives it.
    for i in 5_000..20_000 {
        check(&backend, i, false);
    }
    for k in 0..200 {
        assert!(
            !check(&backend, 1_000_000 + k, true).allowed,
            "customer {k}"
        );
    }
    assert!(backend.tracked_keys() <= 2 * cap);
}

#[tokio::test]
async fn memory_backend_reserves_and_settles() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::run_settle(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn memory_backend_settles_input_and_output_tokens_apart() {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    common::conformance::run_split_settle(&backend, |d| clock.advance(d)).await;
}

#[tokio::test]
async fn memory_backend_answers_an_undescribed_check_without_describing_it() {
    use tierlimit::backend::{Check, Decision};
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    let limit = Limit::per_second(3);
    let s = Subject::new(KeyId::of("quiet"), 7);
    let charge = s.charge(limit);
    let quiet = Check {
        describe: false,
        ..s.check(&charge)
    };
    for _ in 0..3 {
        assert_eq!(
            backend.check_now(&quiet).unwrap(),
            Decision::allow_undescribed(&limit)
        );
    }
    // The fourth is refused, and the refusal is described in full.
    let refused = backend.check_now(&quiet).unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.limit, 3);
    assert!(refused.retry_after.is_some_and(|r| r > Duration::ZERO));
    // One interval later exactly one more is allowed: nothing was lost.
    clock.advance(Duration::from_millis(334));
    assert!(backend.check_now(&quiet).unwrap().allowed);
    assert!(!backend.check_now(&quiet).unwrap().allowed);
    // A described check reports its bucket's state.
    let loud = backend.check_one_now(&Subject::new(KeyId::of("loud"), 7), &limit);
    assert_eq!(loud.unwrap().remaining, 2);
}
