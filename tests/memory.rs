//! Memory stays bounded: a spray of a million distinct keys, the cap, the
//! overflow bucket, automatic reclamation, and bytes per tracked key.

#[path = "common/one.rs"]
mod one;
use one::CheckOneNow;
use std::alloc::System;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tierlimit::{Limit, MemoryBackend, backend::Subject, key::KeyId};

/// Counts heap bytes, to measure what tracked keys cost.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Live bytes allocated since `region` began.
fn live(region: &Region<'_, System>) -> isize {
    let c = region.change();
    c.bytes_allocated as isize - c.bytes_deallocated as isize + c.bytes_reallocated
}

fn subject(i: u64) -> Subject {
    Subject::new(KeyId::from_raw(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 3)
}

/// A caller the policy does not know (an unknown key, an anonymous IP).
fn guest(i: u64) -> Subject {
    Subject {
        known: false,
        ..subject(i)
    }
}

/// One test, run alone in this binary, so the allocation counter sees only it.
#[test]
fn a_million_key_spray_stays_bounded_and_is_reclaimed() {
    let limit = Limit::per_minute(10);
    const SPRAY: u64 = 1_000_000;

    // 1. Uncapped: every key tracked; measure bytes per key.
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(usize::MAX)
        .build();
    backend.check_one_now(&subject(u64::MAX), &limit).unwrap(); // create the limiter
    let region = Region::new(GLOBAL);
    for i in 0..SPRAY {
        assert!(backend.check_one_now(&subject(i), &limit).unwrap().allowed);
    }
    let used = live(&region);
    assert_eq!(backend.tracked_keys(), SPRAY as usize + 1);
    let per_key = used as f64 / SPRAY as f64;
    println!("bytes per tracked key: {per_key:.1} ({used} bytes for {SPRAY} keys)");
    assert!(per_key < 64.0, "{per_key} bytes per key");

    // Once their buckets are full again, the steady sweep reclaims them all,
    // driven by ordinary traffic alone (one shard per 60 s / 64).
    clock.advance(Duration::from_secs(61));
    for _ in 0..64 {
        clock.advance(Duration::from_millis(940));
        backend.check_one_now(&subject(u64::MAX), &limit).unwrap();
    }
    assert!(
        backend.tracked_keys() <= 1,
        "{} left",
        backend.tracked_keys()
    );
    let after = live(&region);
    println!("bytes after reclaiming: {after}");
    assert!(after < 1 << 20, "{after} bytes still held");
    drop(backend);

    // 2. Capped at 100,000: a spray of unknown keys never grows the table
    // past the cap; guests beyond it share the overflow bucket (10 at once,
    // then refused); tracked keys keep their exact state.
    let clock = FakeRelativeClock::default();
    let cap = 100_000;
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(cap)
        .build();
    for _ in 0..10 {
        assert!(backend.check_one_now(&guest(0), &limit).unwrap().allowed);
    }
    let region = Region::new(GLOBAL);
    let mut allowed_untracked = 0;
    for i in 1..SPRAY {
        let d = backend.check_one_now(&guest(i), &limit).unwrap();
        if (i as usize) < cap {
            assert!(d.allowed, "key {i} under the cap");
        } else if d.allowed {
            allowed_untracked += 1;
        }
        assert!(backend.tracked_keys() <= cap);
    }
    let used = live(&region);
    println!("bytes for a capped spray of {SPRAY}: {used}");
    assert_eq!(backend.tracked_keys(), cap);
    assert_eq!(
        allowed_untracked, 10,
        "untracked guests share one bucket of 10"
    );
    // Key 0 is still exactly empty: its state survived the spray.
    assert!(!backend.check_one_now(&guest(0), &limit).unwrap().allowed);

    // 3. During the spray, customers whose keys the policy knows arrive
    // for the first time: each gets its own bucket and its full limit
    // (exactly 10, then refused), and the table stays at the cap (guests
    // give way).
    for k in 0..1_000u64 {
        let customer = subject(SPRAY * 10 + k);
        for n in 0..10 {
            let d = backend.check_one_now(&customer, &limit).unwrap();
            assert!(d.allowed, "customer {k}, request {n}");
            assert_eq!(d.remaining, 9 - n);
        }
        assert!(!backend.check_one_now(&customer, &limit).unwrap().allowed);
        assert_eq!(backend.tracked_keys(), cap);
    }
    // The spray goes on: guests still cannot push customers out.
    for i in SPRAY..SPRAY + 100_000 {
        backend.check_one_now(&guest(i), &limit).unwrap();
    }
    assert!(
        !backend
            .check_one_now(&subject(SPRAY * 10), &limit)
            .unwrap()
            .allowed,
        "a customer's state survived the spray"
    );

    // Time passes: every bucket is full again; the next request at the cap
    // sweeps, and new keys are tracked again.
    clock.advance(Duration::from_secs(70));
    let d = backend.check_one_now(&guest(SPRAY + 1), &limit).unwrap();
    assert!(d.allowed);
    assert!(
        backend.tracked_keys() < 10,
        "{} tracked after the sweep",
        backend.tracked_keys()
    );
    for _ in 0..9 {
        assert!(
            backend
                .check_one_now(&guest(SPRAY + 1), &limit)
                .unwrap()
                .allowed
        );
    }
    assert!(
        !backend
            .check_one_now(&guest(SPRAY + 1), &limit)
            .unwrap()
            .allowed,
        "tracked with its own state"
    );
    drop(backend);

    // 4. With no guest left to give way, known callers grow the table past
    // the cap up to the hard bound of twice the cap, then share the
    // overflow bucket: memory stays bounded whatever the resolver admits.
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .max_keys(1_000)
        .build();
    let mut own = 0;
    for i in 0..5_000 {
        if backend.check_one_now(&subject(i), &limit).unwrap().allowed && i < 2_000 {
            own += 1;
        }
    }
    assert_eq!(own, 2_000);
    assert_eq!(backend.tracked_keys(), 2_000);

    // 5. When traffic stops, idle state is still reclaimed: no request
    // comes after the clock moves, yet the reaper thread empties the table.
    clock.advance(Duration::from_secs(61));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backend.tracked_keys() > 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(10));
    }
    assert_eq!(backend.tracked_keys(), 0, "reclaimed with no traffic");
}
