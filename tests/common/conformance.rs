//! The GCRA conformance table. Every backend runs it unchanged: give it a
//! backend and a way to move that backend's clock forward.

pub mod calendar;
pub mod owners;
mod settle;

#[allow(unused_imports)]
pub use settle::{run_settle, run_split_settle};

#[allow(unused_imports)]
use crate::common::one::{CheckOne, CheckOneNow};
use std::time::Duration;

use tierlimit::backend::{Charge, Check, Lease};
use tierlimit::{
    Limit,
    backend::{Backend, BackendError, Decision, Subject},
    key::KeyId,
};

/// One step: move the clock, check `cost` for `key`, expect an outcome.
pub struct Step {
    pub advance_ms: u64,
    pub key: &'static str,
    pub cost: u32,
    pub expect: Expect,
}

pub enum Expect {
    /// Allowed, leaving `remaining`, full again after `reset_ms`.
    Allow { remaining: u32, reset_ms: u64 },
    /// Refused, `remaining` now, full after `reset_ms`, conforming after `retry_ms`.
    Deny {
        remaining: u32,
        reset_ms: u64,
        retry_ms: u64,
    },
    /// The cost can never fit.
    CostTooHigh,
}

const fn allow(
    advance_ms: u64,
    key: &'static str,
    cost: u32,
    remaining: u32,
    reset_ms: u64,
) -> Step {
    Step {
        advance_ms,
        key,
        cost,
        expect: Expect::Allow {
            remaining,
            reset_ms,
        },
    }
}

const fn deny(
    advance_ms: u64,
    key: &'static str,
    cost: u32,
    remaining: u32,
    reset_ms: u64,
    retry_ms: u64,
) -> Step {
    Step {
        advance_ms,
        key,
        cost,
        expect: Expect::Deny {
            remaining,
            reset_ms,
            retry_ms,
        },
    }
}

/// The limit the table is written for: 10 per 10 s (one every second).
pub fn limit() -> Limit {
    Limit::new(10.try_into().unwrap(), Duration::from_secs(10)).unwrap()
}

/// Times are cumulative from the first step; T = 1 s, burst 10.
pub fn table() -> Vec<Step> {
    let mut t = vec![allow(0, "a", 1, 9, 1_000)];
    // The rest of the burst at the same instant.
    for left in (0..9).rev() {
        t.push(allow(0, "a", 1, left, u64::from(10 - left) * 1_000));
    }
    t.extend([
        // Empty: the 11th is refused until one interval has passed.
        deny(0, "a", 1, 0, 10_000, 1_000),
        deny(500, "a", 1, 0, 9_500, 500),
        // A refusal wrote nothing: exactly at T it conforms.
        allow(500, "a", 1, 0, 10_000),
        // Another key is independent.
        allow(0, "b", 1, 9, 1_000),
        // Three intervals later, a cost of 3 fits exactly.
        allow(3_000, "a", 3, 0, 10_000),
        deny(0, "a", 1, 0, 10_000, 1_000),
        // Half an interval later: still nothing whole.
        deny(500, "a", 2, 0, 9_500, 1_500),
        // Full again after the window: the whole burst at once.
        allow(9_500, "a", 10, 0, 10_000),
        // Well after: full.
        allow(20_000, "a", 1, 9, 1_000),
        allow(0, "a", 5, 4, 6_000),
        // 4 left, 5 asked: refused, capacity reported, nothing taken.
        deny(0, "a", 5, 4, 6_000, 1_000),
        allow(0, "a", 4, 0, 10_000),
        // 1.5 intervals later one whole request is back (rounded down).
        // (An allowed request's reset is reported to the interval, rounded
        // up: 10 s here where the exact value is 9.5 s; a refusal's is exact.)
        allow(1_500, "a", 1, 0, 10_000),
        deny(0, "a", 1, 0, 9_500, 500),
        // Costs above the limit can never succeed.
        Step {
            advance_ms: 0,
            key: "a",
            cost: 11,
            expect: Expect::CostTooHigh,
        },
    ]);
    t
}

fn subject(key: &str, cost: u32) -> Subject {
    let cell = Subject::new(KeyId::of(key), 7);
    Subject { cost, ..cell }
}

/// Runs the table twice, on fresh keys: checks described, then checks
/// not to be described ([`Check::describe`] `false`), which must count
/// alike, refuse at the same steps and describe every refusal in full (an
/// allowed one may come as [`Decision::allow_undescribed`]). `advance` moves the
/// backend's clock.
pub async fn run<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    run_table(backend, &mut advance, true).await;
    run_table(backend, &mut advance, false).await;
}

async fn run_table<B: Backend>(backend: &B, advance: &mut impl FnMut(Duration), describe: bool) {
    let limit = limit();
    for (i, step) in table().into_iter().enumerate() {
        if step.advance_ms > 0 {
            advance(Duration::from_millis(step.advance_ms));
        }
        let key = if describe {
            step.key.to_owned()
        } else {
            format!("undescribed {}", step.key)
        };
        let s = subject(&key, step.cost);
        let charge = s.charge(limit);
        let got = backend
            .check(&Check {
                describe,
                ..s.check(&charge)
            })
            .await;
        let ctx = format!("step {i} (key {key}, cost {})", step.cost);
        match (step.expect, got) {
            (
                Expect::Allow {
                    remaining,
                    reset_ms,
                },
                Ok(d),
            ) => {
                let want = Decision {
                    index: 0,
                    tokens: None,
                    input_tokens: None,
                    output_tokens: None,
                    lease: None,
                    period: tierlimit::policy::Period::Rolling,
                    allowed: true,
                    limit: 10,
                    remaining,
                    reset_after: Duration::from_millis(reset_ms),
                    retry_after: None,
                    window: Duration::from_secs(10),
                };
                if describe || d != Decision::allow_undescribed(&limit) {
                    assert_eq!(d, want, "{ctx}");
                }
            }
            (
                Expect::Deny {
                    remaining,
                    reset_ms,
                    retry_ms,
                },
                Ok(d),
            ) => {
                let want = Decision {
                    index: 0,
                    tokens: None,
                    input_tokens: None,
                    output_tokens: None,
                    lease: None,
                    period: tierlimit::policy::Period::Rolling,
                    allowed: false,
                    limit: 10,
                    remaining,
                    reset_after: Duration::from_millis(reset_ms),
                    retry_after: Some(Duration::from_millis(retry_ms)),
                    window: Duration::from_secs(10),
                };
                assert_eq!(d, want, "{ctx}");
            }
            (Expect::CostTooHigh, Err(BackendError::CostExceedsLimit { cost, max })) => {
                assert_eq!((cost, max), (step.cost, 10), "{ctx}");
            }
            (_, got) => panic!("{ctx}: unexpected {got:?}"),
        }
    }
}

/// The two limits of the several-limit table: a burst guard of 3 per 3 s
/// (one a second) and a budget of 5 per 50 s (one every 10 s).
pub fn multi_limits() -> [Limit; 2] {
    [
        Limit::new(3.try_into().unwrap(), Duration::from_secs(3)).unwrap(),
        Limit::new(5.try_into().unwrap(), Duration::from_secs(50)).unwrap(),
    ]
}

/// The charges of `key` under both limits (each in its own bucket, one
/// owner, as the layer makes them).
pub fn multi_charges(key: &str) -> [Charge; 2] {
    let base = KeyId::of(key).as_u64();
    let [a, b] = multi_limits();
    [
        Charge {
            bucket: base ^ 0xA,
            limit: a,
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
        Charge {
            bucket: base ^ 0xB,
            limit: b,
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
    ]
}

/// One step of the several-limit table: move the clock, check `cost`
/// against both limits, expect the binding limit's decision (`index` 0:
/// the 3/3 s guard, 1: the 5/50 s budget) and each limit's remaining
/// capacity afterwards (by peeking, which counts nothing).
struct MultiStep {
    advance_ms: u64,
    cost: u32,
    /// `None`: allowed, else refused with this retry delay (ms).
    retry_ms: Option<u64>,
    index: u8,
    remaining: u32,
    after: [u32; 2],
}

const fn ok(advance_ms: u64, cost: u32, index: u8, remaining: u32, after: [u32; 2]) -> MultiStep {
    MultiStep {
        advance_ms,
        cost,
        retry_ms: None,
        index,
        remaining,
        after,
    }
}

const fn no(advance_ms: u64, cost: u32, index: u8, retry_ms: u64, after: [u32; 2]) -> MultiStep {
    MultiStep {
        advance_ms,
        cost,
        retry_ms: Some(retry_ms),
        index,
        remaining: 0,
        after,
    }
}

/// Times are cumulative from the first step.
fn multi_table() -> Vec<MultiStep> {
    vec![
        // The guard binds: fewest remaining.
        ok(0, 1, 0, 2, [2, 4]),
        ok(0, 1, 0, 1, [1, 3]),
        ok(0, 1, 0, 0, [0, 2]),
        // The guard refuses; the budget would admit. Nothing is taken
        // from the budget (2 left before and after).
        no(0, 1, 0, 1_000, [0, 2]),
        no(0, 1, 0, 1_000, [0, 2]),
        // At t = 1 s the guard has one again.
        ok(1_000, 1, 0, 0, [0, 1]),
        // At t = 2 s both are left with 0: the tie goes to the longer window.
        ok(1_000, 1, 1, 0, [0, 0]),
        // At t = 3 s the guard admits, the budget refuses for 7 s more:
        // the budget binds, and the guard keeps what it had.
        no(1_000, 1, 1, 7_000, [1, 0]),
        // At t = 10 s both admit; the budget has the fewest left.
        ok(7_000, 1, 1, 0, [2, 0]),
        // A cost of 3: both refuse; the longest retry binds (and is when
        // both admit): the budget's 30 s, not the guard's 1 s.
        no(0, 3, 1, 30_000, [2, 0]),
    ]
}

/// Runs the several-limit table through [`Backend::check_all`]: all or
/// nothing, the binding limit, and a cost above one of the limits.
pub async fn run_multi<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    let charges = multi_charges("multi");
    let owner = KeyId::of("multi").as_u64();
    let limits = multi_limits();
    for (i, step) in multi_table().into_iter().enumerate() {
        if step.advance_ms > 0 {
            advance(Duration::from_millis(step.advance_ms));
        }
        let charges = charges.map(|c| Charge {
            cost: step.cost,
            ..c
        });
        let check = Check::new(owner, true, &charges);
        let d = backend.check(&check).await.unwrap();
        let ctx = format!("multi step {i}");
        let binding = &limits[usize::from(step.index)];
        let mut want = match step.retry_ms {
            None => Decision::allow(binding, step.remaining),
            Some(ms) => Decision::refuse(binding, step.cost, Duration::from_millis(ms)),
        };
        want.index = step.index;
        assert_eq!(d, want, "{ctx}");
        for (j, c) in charges.iter().enumerate() {
            let left = backend.peek(owner, c).await.unwrap().remaining;
            assert_eq!(left, step.after[j], "{ctx}: limit {j} afterwards");
        }
    }
    // A cost above the guard's burst can never succeed.
    let charges = charges.map(|c| Charge { cost: 4, ..c });
    let check = Check::new(owner, true, &charges);
    match backend.check(&check).await {
        Err(BackendError::CostExceedsLimit { cost: 4, max: 3 }) => {}
        other => panic!("a cost of 4 under a limit of 3: {other:?}"),
    }
}

/// Two limits on one bucket owner, `instances` backends, many tasks on
/// several threads, a frozen clock: exactly the binding limit's burst is
/// admitted (40 of the 40/hour guard, not 100 of the 100/day budget), and
/// the refused requests leave the budget's remaining unchanged (60).
pub async fn exact_under_contention<B: Backend + Clone>(backends: Vec<B>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let key = KeyId::of("contended").as_u64();
    let charges = [
        Charge {
            bucket: key ^ 1,
            limit: Limit::per_hour(40),
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
        Charge {
            bucket: key ^ 2,
            limit: Limit::per_day(100),
            cost: 1,
            reserve: 0,
            period: tierlimit::backend::PeriodBounds::ROLLING,
        },
    ];
    let allowed = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for backend in &backends {
        for _ in 0..16 {
            let (backend, allowed) = (backend.clone(), Arc::clone(&allowed));
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let check = Check::new(key, true, &charges);
                    let d = backend.check(&check).await.unwrap();
                    if d.allowed {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(d.index, 0, "the guard refuses");
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tries = backends.len() * 160;
    assert_eq!(allowed.load(Ordering::Relaxed), 40, "{tries} tries");
    let budget = backends[0].peek(key, &charges[1]).await.unwrap();
    assert_eq!(
        budget.remaining, 60,
        "refusals took nothing from the budget"
    );
    let guard = backends[0].peek(key, &charges[0]).await.unwrap();
    assert_eq!(guard.remaining, 0);
}

/// Leases held in `lease`'s bucket, once they equal `want` (a backend may
/// release on its own I/O thread: wait for that event, boundedly).
pub async fn held_once<B: Backend>(backend: &B, owner: u64, lease: &Lease, want: u32) -> u32 {
    let mut held = u32::MAX;
    for _ in 0..1_000 {
        let d = backend.peek_lease(owner, lease).await.unwrap();
        let l = d.lease.expect("a lease state");
        held = l.limit - l.remaining;
        if held == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    held
}

/// The concurrency conformance table: leases taken with rate limits, all
/// or nothing, released exactly once; a concurrency-only check; a per-key
/// and a per-account lease at once.
pub async fn run_leases<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    let owner = KeyId::of("lease-owner").as_u64();
    let rate = [Charge {
        bucket: 0x1EA5E,
        limit: Limit::per_hour(3),
        cost: 1,
        reserve: 0,
        period: tierlimit::backend::PeriodBounds::ROLLING,
    }];
    let lease = Lease {
        bucket: 0xC0FFEE,
        max: 2,
        per_account: false,
    };
    let check = |id: u64| Check {
        owner,
        known: true,
        charges: &rate,
        tokens: 0,
        split: tierlimit::backend::TokenSplit::NONE,
        leases: std::slice::from_ref(&lease),
        lease_id: id,
        describe: true,
    };
    // 1, 2: both admitted; each takes a rate unit and a lease.
    let d = backend.check(&check(1)).await.unwrap();
    assert!(d.allowed, "1: {d:?}");
    assert_eq!(d.remaining, 2, "1: rate remaining");
    let l = d.lease.expect("1: lease state");
    assert_eq!((l.limit, l.remaining, l.refused), (2, 1, false));
    let d = backend.check(&check(2)).await.unwrap();
    assert!(d.allowed, "2: {d:?}");
    assert_eq!((d.remaining, d.lease.unwrap().remaining), (1, 0));
    // 3: the leases are full: refused for concurrency, a one-second
    // retry, and no rate unit taken.
    let d = backend.check(&check(3)).await.unwrap();
    assert!(!d.allowed && d.is_concurrency_refusal(), "3: {d:?}");
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(d.remaining, 1, "3: the rate capacity now, untouched");
    let left = backend.peek(owner, &rate[0]).await.unwrap().remaining;
    assert_eq!(left, 1, "3: a concurrency refusal consumes no rate");
    assert_eq!(held_once(backend, owner, &lease, 2).await, 2);
    // Release 1 (a second release of the same id changes nothing).
    backend.release(owner, std::slice::from_ref(&lease), 1);
    assert_eq!(held_once(backend, owner, &lease, 1).await, 1);
    // 4: admitted again; the rate budget is now spent.
    let d = backend.check(&check(4)).await.unwrap();
    assert!(d.allowed, "4: {d:?}");
    assert_eq!((d.remaining, d.lease.unwrap().remaining), (0, 0));
    backend.release(owner, std::slice::from_ref(&lease), 2);
    assert_eq!(held_once(backend, owner, &lease, 1).await, 1);
    // 5: a free lease but no rate: refused by the rate limit, takes no
    // lease.
    let d = backend.check(&check(5)).await.unwrap();
    assert!(!d.allowed && !d.is_concurrency_refusal(), "5: {d:?}");
    assert_eq!(d.retry_after, Some(Duration::from_secs(1200)));
    assert_eq!(held_once(backend, owner, &lease, 1).await, 1);
    backend.release(owner, std::slice::from_ref(&lease), 4);
    assert_eq!(held_once(backend, owner, &lease, 0).await, 0);
    // Concurrency only, per key (2) and per account (1) at once: the
    // account's binds.
    let leases = [
        Lease {
            bucket: 0xBEEF,
            max: 2,
            per_account: false,
        },
        Lease {
            bucket: 0xACC7,
            max: 1,
            per_account: true,
        },
    ];
    let only = |id: u64| Check {
        owner,
        known: false,
        charges: &[],
        tokens: 0,
        split: tierlimit::backend::TokenSplit::NONE,
        leases: &leases,
        lease_id: id,
        describe: true,
    };
    let d = backend.check(&only(10)).await.unwrap();
    assert!(d.allowed, "10: {d:?}");
    assert!(d.window.is_zero(), "10: no rate limit");
    let l = d.lease.unwrap();
    assert_eq!((l.limit, l.remaining, l.per_account), (1, 0, true));
    let d = backend.check(&only(11)).await.unwrap();
    assert!(d.is_concurrency_refusal(), "11: {d:?}");
    assert!(
        d.lease.unwrap().per_account,
        "11: the account's lease refused"
    );
    assert_eq!(
        held_once(backend, owner, &leases[0], 1).await,
        1,
        "11 took none"
    );
    backend.release(owner, &leases, 10);
    assert_eq!(held_once(backend, owner, &leases[1], 0).await, 0);
    assert_eq!(held_once(backend, owner, &leases[0], 0).await, 0);
    // Time alone frees nothing in flight (a request may run for hours):
    // only a release does, or, in Redis, a lease's TTL when its instance
    // stops renewing it (tested apart).
    let d = backend.check(&only(12)).await.unwrap();
    assert!(d.allowed);
    advance(Duration::from_secs(30));
    assert!(
        backend
            .check(&only(13))
            .await
            .unwrap()
            .is_concurrency_refusal()
    );
    backend.release(owner, &leases, 12);
    assert_eq!(held_once(backend, owner, &leases[1], 0).await, 0);
}
