//! The calendar conformance table: every backend runs it unchanged. A
//! calendar limit is a count of its period; its bounds come with each
//! charge (as the layer makes them, here for Europe/London on the day its
//! clocks go forward, 23 hours long), so the table moves Unix time by
//! choosing them, and no backend clock moves for the calendar (a rolling
//! limit in the same check moves with `advance`).

use std::time::Duration;

use tierlimit::Limit;
use tierlimit::backend::{Adjustment, Backend, Charge, Check, Decision, PeriodBounds};
use tierlimit::key::KeyId;
use tierlimit::policy::{Calendar, Period};

/// 2026-03-29 00:30 in London (GMT): the 23-hour day has begun.
pub const DAY_START: u64 = 1_774_742_400;
/// 2026-03-30 00:00 in London (BST).
pub const MIDNIGHT: u64 = 1_774_825_200;

/// The day's bounds at Unix second `at` in London.
pub fn day_at(at: u64) -> PeriodBounds {
    let london = Calendar::new("Europe/London").unwrap();
    london.bounds(Period::CalendarDay, Duration::from_secs(at))
}

fn calendar_day(max: u32) -> Limit {
    Limit::per_day(max)
        .with_period(Period::CalendarDay)
        .unwrap()
}

fn charge(owner: u64, n: u64, limit: Limit, cost: u32, at: u64) -> Charge {
    Charge {
        bucket: owner ^ n,
        limit,
        cost,
        reserve: 0,
        period: if limit.period().is_calendar() {
            day_at(at)
        } else {
            PeriodBounds::ROLLING
        },
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn check<B: Backend>(backend: &B, owner: u64, charges: &[Charge]) -> Decision {
    backend
        .check(&Check::new(owner, true, charges))
        .await
        .unwrap()
}

async fn left<B: Backend>(backend: &B, owner: u64, c: &Charge) -> (u32, Duration) {
    let d = backend.peek(owner, c).await.unwrap();
    (d.remaining, d.reset_after)
}

/// One step of the day table: at Unix second `at`, `cost` units; the
/// expected outcome (allowed, remaining, retry and reset in seconds).
struct Step {
    at: u64,
    cost: u32,
    allowed: bool,
    remaining: u32,
    reset: u64,
}

const fn step(at: u64, cost: u32, allowed: bool, remaining: u32, reset: u64) -> Step {
    Step {
        at,
        cost,
        allowed,
        remaining,
        reset,
    }
}

/// The day table: 5 per calendar day, counted by cost, refused until
/// midnight (23 hours after the day began), a second before midnight
/// still refused, and full again at midnight for a 24-hour day.
fn day_table() -> Vec<Step> {
    let to_midnight = MIDNIGHT - DAY_START;
    vec![
        step(DAY_START, 2, true, 3, to_midnight),
        step(DAY_START, 3, true, 0, to_midnight),
        step(DAY_START, 1, false, 0, to_midnight),
        step(DAY_START + 3_600, 1, false, 0, to_midnight - 3_600),
        step(MIDNIGHT - 1, 1, false, 0, 1),
        step(MIDNIGHT, 4, true, 1, 86_400),
        step(MIDNIGHT + 1, 2, false, 1, 86_399),
        step(MIDNIGHT + 1, 1, true, 0, 86_399),
    ]
}

/// Runs every calendar table; `advance` moves the backend's own clock
/// (for the rolling limit mixed in).
pub async fn run_calendar<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    // Unix time only moves forward through the tables (a backend may drop
    // a counter once a later check shows its period over).
    run_reserve(backend).await;
    run_mixed(backend, &mut advance).await;
    let day = calendar_day(5);
    let owner = KeyId::of("calendar-table").as_u64();
    for (i, s) in day_table().into_iter().enumerate() {
        let c = charge(owner, 1, day, s.cost, s.at);
        let d = check(backend, owner, &[c]).await;
        let want = Decision {
            allowed: s.allowed,
            limit: 5,
            remaining: s.remaining,
            reset_after: secs(s.reset),
            retry_after: (!s.allowed).then_some(secs(s.reset)),
            window: secs(86_400),
            index: 0,
            tokens: None,
            input_tokens: None,
            output_tokens: None,
            lease: None,
            period: Period::CalendarDay,
        };
        assert_eq!(d, want, "day table, step {i}");
    }
    // A peek counts nothing, and an untouched day is full until its end.
    let fresh = charge(owner, 2, day, 1, MIDNIGHT + 10);
    assert_eq!(left(backend, owner, &fresh).await, (5, secs(86_390)));
    assert_eq!(left(backend, owner, &fresh).await, (5, secs(86_390)));
    // The next day is 24 hours long.
    run_calendar_settle(backend, MIDNIGHT + 10, MIDNIGHT + 86_400).await;
}

/// A priority reserve is left untouched in a calendar limit too.
async fn run_reserve<B: Backend>(backend: &B) {
    let owner = KeyId::of("calendar-reserve").as_u64();
    let c = Charge {
        reserve: 2,
        ..charge(owner, 1, calendar_day(5), 3, DAY_START)
    };
    assert!(check(backend, owner, &[c]).await.allowed);
    let one = Charge { cost: 1, ..c };
    let d = check(backend, owner, &[one]).await;
    assert!(!d.allowed, "the reserve's 2 stay");
    assert_eq!(d.retry_after, Some(secs(MIDNIGHT - DAY_START)));
    let critical = Charge { reserve: 0, ..one };
    assert!(
        check(backend, owner, &[critical]).await.allowed,
        "a critical request"
    );
}

/// A calendar day beside a rolling guard (2 per 10 s), all or nothing: a
/// request the guard refuses counts in neither, and the binding limit's
/// decision answers.
async fn run_mixed<B: Backend>(backend: &B, advance: &mut impl FnMut(Duration)) {
    let owner = KeyId::of("calendar-mixed").as_u64();
    let guard = Limit::new(2.try_into().unwrap(), secs(10)).unwrap();
    let day = calendar_day(3);
    let both = |at| [charge(owner, 1, guard, 1, at), charge(owner, 2, day, 1, at)];
    let d = check(backend, owner, &both(DAY_START)).await;
    assert!(d.allowed);
    assert_eq!(
        (d.index, d.remaining),
        (0, 1),
        "the guard has the fewest left"
    );
    assert!(check(backend, owner, &both(DAY_START)).await.allowed);
    let d = check(backend, owner, &both(DAY_START)).await;
    assert!(!d.allowed);
    assert_eq!(d.index, 0, "the guard refuses");
    assert_eq!(d.retry_after, Some(secs(5)));
    assert_eq!(
        left(backend, owner, &both(DAY_START)[1]).await.0,
        1,
        "2 of 3 counted"
    );
    advance(secs(10));
    let d = check(backend, owner, &both(DAY_START)).await;
    assert!(d.allowed);
    assert_eq!((d.index, d.remaining), (1, 0), "the day binds: none left");
    let d = check(backend, owner, &both(DAY_START)).await;
    assert!(!d.allowed);
    assert_eq!(d.index, 1, "the day refuses, until midnight");
    assert_eq!(d.retry_after, Some(secs(MIDNIGHT - DAY_START)));
    // The guard was not charged by the refusal: it has 1 left.
    assert_eq!(left(backend, owner, &both(DAY_START)[0]).await.0, 1);
}

/// Token settlements on a calendar limit, on the day from `start` to
/// `midnight`: a debt, a refund never below zero, and a settlement of a
/// period that has ended changes nothing.
async fn run_calendar_settle<B: Backend>(backend: &B, start: u64, midnight: u64) {
    let owner = KeyId::of("calendar-settle").as_u64();
    let tokens = calendar_day(100);
    let c = charge(owner, 1, tokens, 40, start);
    assert!(check(backend, owner, &[c]).await.allowed);
    let settle = |units, at| Adjustment {
        bucket: c.bucket,
        limit: tokens,
        units,
        period: day_at(at),
    };
    backend.settle(owner, &[settle(30, start)]).await.unwrap();
    assert_eq!(left(backend, owner, &c).await.0, 30, "40 + a debt of 30");
    backend.settle(owner, &[settle(-100, start)]).await.unwrap();
    assert_eq!(
        left(backend, owner, &c).await.0,
        100,
        "refunded to full, no further"
    );
    // A debt of 120: over the limit until midnight.
    backend.settle(owner, &[settle(120, start)]).await.unwrap();
    let one = Charge { cost: 1, ..c };
    let d = check(backend, owner, &[one]).await;
    assert_eq!(
        (d.allowed, d.retry_after),
        (false, Some(secs(midnight - start)))
    );
    // The next day starts from zero; yesterday's late refund changes nothing.
    let today = charge(owner, 1, tokens, 10, midnight);
    assert!(check(backend, owner, &[today]).await.allowed);
    backend.settle(owner, &[settle(-50, start)]).await.unwrap();
    assert_eq!(left(backend, owner, &today).await.0, 90);
}

/// A calendar day of 40 beside a rolling budget of 1000 an hour, on one
/// owner, `instances` backends sharing state, many tasks on several
/// threads: exactly the day's 40 are admitted, and the refused requests
/// leave the rolling budget with exactly 960.
pub async fn exact_calendar_under_contention<B: Backend + Clone>(backends: Vec<B>) {
    let owner = KeyId::of("calendar-contention").as_u64();
    let both = [
        charge(owner, 1, Limit::per_hour(1000), 1, DAY_START),
        charge(owner, 2, calendar_day(40), 1, DAY_START),
    ];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let b = backends[t % backends.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            for _ in 0..10 {
                if b.check(&Check::new(owner, true, &both))
                    .await
                    .unwrap()
                    .allowed
                {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 40, "exactly the day's 40 of 160");
    let b = &backends[0];
    assert_eq!(left(b, owner, &both[1]).await.0, 0);
    assert_eq!(
        left(b, owner, &both[0]).await.0,
        960,
        "refusals charged nothing"
    );
}
