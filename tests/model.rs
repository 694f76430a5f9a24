//! Property tests: random sequences of (time step, cost, reserve) against a
//! reference GCRA model, for the memory backend and for the Redis script
//! (both on a fake clock): the same decisions, the same remaining, the
//! same retry delays, at every step; and a calendar day beside a rolling
//! limit against a count per period.

mod common;

/// Key, account and organisation in one check, against seven models.
#[path = "model/owners.rs"]
mod owners;

#[allow(unused_imports)]
use common::one::{CheckOne, CheckOneNow};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use tierlimit::backend::{Charge, Check, PeriodBounds};
use tierlimit::policy::{Calendar, Period};
use tierlimit::{
    Limit, MemoryBackend,
    backend::{Backend, BackendError, Decision, Subject},
    key::KeyId,
};

/// What the model says one check gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allow { remaining: u32 },
    Deny { retry: Duration },
    CostTooHigh,
}

/// GCRA as DESIGN.md states it (governor's arithmetic), in nanoseconds:
/// `max` at once, then one every `t`; a reserve of `r` cells must be left.
#[derive(Clone, Copy)]
struct Model {
    t: u64,
    max: u32,
    tat: Option<u64>,
}

impl Model {
    fn check(&mut self, now: u64, cost: u32, reserve: u32) -> Outcome {
        if cost > self.max {
            return Outcome::CostTooHigh;
        }
        if reserve > 0 && cost + reserve > self.max {
            // Only the reserve (or less) could ever be left: a refusal for
            // a whole window.
            return Outcome::Deny {
                retry: Duration::from_nanos(self.t * u64::from(self.max)),
            };
        }
        let t = i128::from(self.t);
        let tau = t * i128::from(self.max - 1);
        let now = i128::from(now);
        let tat = self.tat.map_or(now, i128::from);
        let add = t * i128::from(cost - 1);
        let earliest = tat + add + i128::from(reserve) * t - tau;
        if now < earliest {
            return Outcome::Deny {
                retry: Duration::from_nanos((earliest - now) as u64),
            };
        }
        let next = tat.max(now) + t + add;
        self.tat = Some(next as u64);
        let remaining = ((now + tau + t - next).min(tau + t) / t) as u32;
        Outcome::Allow { remaining }
    }
}

fn observed(result: Result<Decision, BackendError>) -> Outcome {
    match result {
        Ok(d) if d.allowed => Outcome::Allow {
            remaining: d.remaining,
        },
        Ok(d) => Outcome::Deny {
            retry: d.retry_after.expect("a refusal has a retry delay"),
        },
        Err(BackendError::CostExceedsLimit { .. }) => Outcome::CostTooHigh,
        Err(e) => panic!("backend error: {e}"),
    }
}

/// A limit whose interval is whole milliseconds, so that the Redis
/// script's microseconds and governor's nanoseconds agree exactly.
fn limits() -> impl Strategy<Value = (u32, u64)> {
    (1u32..=20, 1u64..=2_000)
}

/// Steps: (ms to advance, cost, reserve).
fn steps() -> impl Strategy<Value = Vec<(u64, u32, u32)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..5_000, 0u64..60_000],
            prop_oneof![Just(1u32), 1u32..=25],
            prop_oneof![Just(0u32), Just(0u32), 1u32..=10],
        ),
        1..40,
    )
}

/// One key secret for the binary, before any key is hashed.
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

static KEYS: AtomicU64 = AtomicU64::new(0);

/// A fresh subject per case, so cases never share a bucket.
fn fresh_subject() -> Subject {
    let n = KEYS.fetch_add(1, Ordering::Relaxed);
    Subject::new(KeyId::of(&format!("model-{n}")), 5)
}

/// Runs one case against `check`, which moves its clock by the step's
/// advance and checks; compares with the model at every step.
async fn run_case(
    (max, t_ms): (u32, u64),
    steps: &[(u64, u32, u32)],
    advance: impl Fn(Duration),
    check: impl AsyncFn(Subject, Limit) -> Result<Decision, BackendError>,
) -> Result<(), TestCaseError> {
    let limit = Limit::new(
        max.try_into().unwrap(),
        Duration::from_millis(t_ms * u64::from(max)),
    )
    .unwrap();
    setup();
    let base = fresh_subject();
    let mut model = Model {
        t: t_ms * 1_000_000,
        max,
        tat: None,
    };
    let mut now = 0u64;
    for (i, &(advance_ms, cost, reserve)) in steps.iter().enumerate() {
        advance(Duration::from_millis(advance_ms));
        now += advance_ms * 1_000_000;
        let subject = Subject {
            cost,
            reserve,
            ..base
        };
        let want = model.check(now, cost, reserve);
        let got = observed(check(subject, limit).await);
        prop_assert_eq!(
            got,
            want,
            "step {} of {:?} (limit {} per {} ms each)",
            i,
            steps,
            max,
            t_ms
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_backend_matches_the_model(limit in limits(), steps in steps()) {
        let clock = FakeRelativeClock::default();
        let backend = MemoryBackend::builder().clock(clock.clone()).build();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run_case(limit, &steps, |d| clock.advance(d), async |s, l| backend.check_one(&s, &l).await))?;
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis_script {
    use super::*;
    use common::redis::{RedisServer, available, init_secret};

    /// A server, a fake clock and a backend on it, shared by every case
    /// of one test (each test has its own: they move their clocks).
    pub(super) type Shared = (
        RedisServer,
        FakeRelativeClock,
        tierlimit::RedisBackend,
        tokio::runtime::Runtime,
    );

    fn start() -> Option<Shared> {
        if !available() {
            return None;
        }
        init_secret();
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let backend = rt.block_on(common::redis::fake_clock_backend(&server, &clock));
        Some((server, clock, backend, rt))
    }

    /// Runs `cases` cases of `strategy`, each given one server, fake clock
    /// and backend started here for the test (its cases move the clock)
    /// and stopped when the cases end, failed or not: no server outlives
    /// its test process.
    pub(super) fn run<S: Strategy>(
        cases: u32,
        strategy: S,
        case: impl Fn(S::Value, &Shared) -> Result<(), TestCaseError>,
    ) {
        let Some(shared) = start() else {
            return;
        };
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let result = runner.run(&strategy, |v| case(v, &shared));
        let (server, _clock, backend, rt) = shared;
        drop(backend);
        drop(rt);
        drop(server);
        if let Err(e) = result {
            panic!("{e}\n{runner}");
        }
    }

    #[test]
    fn redis_script_matches_the_model() {
        run(
            128,
            (limits(), steps()),
            |(limit, steps), (_, clock, backend, rt)| {
                rt.block_on(run_case(
                    limit,
                    &steps,
                    |d| clock.advance(d),
                    async |s, l| backend.check_one(&s, &l).await,
                ))
            },
        );
    }
}

/// Two limits checked all or nothing: the model is two GCRA models, each
/// asked on a copy; the request counts in both only if both allow. The
/// backend answers with the binding limit: on an allow the fewest
/// remaining, on a refusal the longest retry delay.
type MultiSteps = Vec<(u64, u32, u32, u32)>;

fn multi_steps() -> impl Strategy<Value = MultiSteps> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..5_000, 0u64..60_000],
            prop_oneof![Just(1u32), 1u32..=25],
            prop_oneof![Just(0u32), Just(0u32), 1u32..=10],
            prop_oneof![Just(0u32), Just(0u32), 1u32..=10],
        ),
        1..40,
    )
}

fn multi_expected<const N: usize>(
    models: &mut [Model; N],
    now: u64,
    cost: u32,
    reserves: [u32; N],
) -> Outcome {
    if models.iter().any(|m| cost > m.max) {
        return Outcome::CostTooHigh;
    }
    let mut tries = *models;
    let mut outcomes = [Outcome::CostTooHigh; N];
    for (i, o) in outcomes.iter_mut().enumerate() {
        *o = tries[i].check(now, cost, reserves[i]);
    }
    let allowed: Option<Vec<u32>> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Allow { remaining } => Some(*remaining),
            _ => None,
        })
        .collect();
    match allowed {
        Some(remaining) => {
            *models = tries;
            Outcome::Allow {
                remaining: remaining.into_iter().min().expect("a model"),
            }
        }
        None => {
            let retry = outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Deny { retry } => Some(*retry),
                    _ => None,
                })
                .max()
                .expect("one refused");
            Outcome::Deny { retry }
        }
    }
}

async fn run_multi_case(
    limits: [(u32, u64); 2],
    steps: &[(u64, u32, u32, u32)],
    advance: impl Fn(Duration),
    check: impl AsyncFn(Check<'_>) -> Result<Decision, BackendError>,
) -> Result<(), TestCaseError> {
    setup();
    let owner = fresh_subject().key.as_u64();
    let limit = |(max, t_ms): (u32, u64)| {
        Limit::new(
            max.try_into().unwrap(),
            Duration::from_millis(t_ms * u64::from(max)),
        )
        .unwrap()
    };
    let mut models = limits.map(|(max, t_ms)| Model {
        t: t_ms * 1_000_000,
        max,
        tat: None,
    });
    let mut now = 0u64;
    for (i, &(advance_ms, cost, r0, r1)) in steps.iter().enumerate() {
        advance(Duration::from_millis(advance_ms));
        now += advance_ms * 1_000_000;
        let charges = [
            Charge {
                bucket: owner ^ 1,
                limit: limit(limits[0]),
                cost,
                reserve: r0,
                period: tierlimit::backend::PeriodBounds::ROLLING,
            },
            Charge {
                bucket: owner ^ 2,
                limit: limit(limits[1]),
                cost,
                reserve: r1,
                period: tierlimit::backend::PeriodBounds::ROLLING,
            },
        ];
        let want = multi_expected(&mut models, now, cost, [r0, r1]);
        let got = observed(check(Check::new(owner, true, &charges)).await);
        prop_assert_eq!(got, want, "step {} of {:?} (limits {:?})", i, steps, limits);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_backend_matches_the_model_under_two_limits(a in limits(), b in limits(), steps in multi_steps()) {
        let clock = FakeRelativeClock::default();
        let backend = MemoryBackend::builder().clock(clock.clone()).build();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run_multi_case([a, b], &steps, |d| clock.advance(d), async |c| backend.check(&c).await))?;
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis_multi_script {
    use super::*;

    #[test]
    fn redis_script_matches_the_model_under_two_limits() {
        let cases = (limits(), limits(), multi_steps());
        redis_script::run(128, cases, |(a, b, steps), (_, clock, backend, rt)| {
            rt.block_on(run_multi_case(
                [a, b],
                &steps,
                |d| clock.advance(d),
                async |c| backend.check(&c).await,
            ))
        });
    }
}

/// A calendar day beside a rolling limit, all or nothing: the reference
/// is a count per period (reset when the period, computed by the
/// calendar for Europe/London, starts) beside the GCRA model. Unix time
/// moves in its own steps (across days, the 23-hour one included); the
/// rolling limit's clock in its own.
#[derive(Clone, Copy)]
struct CalendarModel {
    max: u32,
    start: u64,
    count: u64,
}

impl CalendarModel {
    /// What a check of `cost` (leaving `reserve`) in the period `p` gives,
    /// and the count to store if the request is counted.
    fn check(&self, p: &PeriodBounds, cost: u32, reserve: u32) -> (Outcome, u64) {
        let used = if self.start == p.start { self.count } else { 0 };
        let max = u64::from(self.max);
        if used + u64::from(cost) + u64::from(reserve) <= max {
            let remaining = (max - used - u64::from(cost)) as u32;
            (Outcome::Allow { remaining }, used + u64::from(cost))
        } else {
            let retry = Duration::from_micros(p.end - p.now);
            (Outcome::Deny { retry }, used)
        }
    }
}

/// Steps: (ms for the rolling clock, seconds of Unix time, cost, reserve
/// on the calendar limit).
type CalendarSteps = Vec<(u64, u64, u32, u32)>;

fn calendar_steps() -> impl Strategy<Value = CalendarSteps> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..5_000],
            prop_oneof![Just(0u64), Just(1u64), 0u64..7_200, 0u64..100_000],
            prop_oneof![Just(1u32), 1u32..=8],
            prop_oneof![Just(0u32), Just(0u32), 1u32..=4],
        ),
        1..40,
    )
}

/// The two models asked together, all or nothing: the binding outcome
/// (fewest remaining, or longest retry), each model moved only if both
/// allow.
fn both_expected(
    (gcra, cal): (&mut Model, &mut CalendarModel),
    now: u64,
    p: &PeriodBounds,
    cost: u32,
    reserve: u32,
) -> Outcome {
    let mut tried = *gcra;
    let g = tried.check(now, cost, 0);
    let (c, count) = cal.check(p, cost, reserve);
    match (g, c) {
        (Outcome::Allow { remaining: a }, Outcome::Allow { remaining: b }) => {
            *gcra = tried;
            (cal.start, cal.count) = (p.start, count);
            Outcome::Allow {
                remaining: a.min(b),
            }
        }
        (Outcome::Deny { retry: a }, Outcome::Deny { retry: b }) => {
            Outcome::Deny { retry: a.max(b) }
        }
        (d @ Outcome::Deny { .. }, _) | (_, d @ Outcome::Deny { .. }) => d,
        _ => unreachable!("no cost is too high here"),
    }
}

async fn run_calendar_case(
    (rolling, day_max): ((u32, u64), u32),
    steps: &[(u64, u64, u32, u32)],
    advance: impl Fn(Duration),
    check: impl AsyncFn(Check<'_>) -> Result<Decision, BackendError>,
) -> Result<(), TestCaseError> {
    setup();
    let owner = fresh_subject().key.as_u64();
    let london = Calendar::new("Europe/London").unwrap();
    let (max, t_ms) = rolling;
    let guard = Limit::new(
        max.try_into().unwrap(),
        Duration::from_millis(t_ms * u64::from(max)),
    );
    let day = Limit::per_day(day_max)
        .with_period(Period::CalendarDay)
        .unwrap();
    let mut gcra = Model {
        t: t_ms * 1_000_000,
        max,
        tat: None,
    };
    let mut cal = CalendarModel {
        max: day_max,
        start: 0,
        count: 0,
    };
    // 2026-03-28 12:00 UTC: the 23-hour day is the next.
    let mut unix = 1_774_699_200u64;
    let mut now = 0u64;
    for (i, &(advance_ms, secs, cost, reserve)) in steps.iter().enumerate() {
        advance(Duration::from_millis(advance_ms));
        now += advance_ms * 1_000_000;
        unix += secs;
        let p = london.bounds(Period::CalendarDay, Duration::from_secs(unix));
        let charges = [
            Charge {
                bucket: owner ^ 1,
                limit: guard.unwrap(),
                cost,
                reserve: 0,
                period: PeriodBounds::ROLLING,
            },
            Charge {
                bucket: owner ^ 2,
                limit: day,
                cost,
                reserve,
                period: p,
            },
        ];
        let want = if cost > max || cost > day_max {
            Outcome::CostTooHigh
        } else {
            both_expected((&mut gcra, &mut cal), now, &p, cost, reserve)
        };
        let got = observed(check(Check::new(owner, true, &charges)).await);
        prop_assert_eq!(
            got,
            want,
            "step {} of {:?} ({:?}, {}/day)",
            i,
            steps,
            rolling,
            day_max
        );
    }
    Ok(())
}

/// A rolling guard (`max` per `ms`) and a calendar day's `max`. The
/// guard's window is at least 200 ms: Redis expires a bucket's key on its
/// own clock, which runs while the fake clock stands still, so a window of
/// a few milliseconds could expire between two steps of a loaded machine
/// and the script would rightly find a full bucket the model does not.
fn calendar_limits() -> impl Strategy<Value = ((u32, u64), u32)> {
    ((1u32..=10, 200u64..=2_000), 1u32..=12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_backend_matches_the_calendar_model(limits in calendar_limits(), steps in calendar_steps()) {
        let clock = FakeRelativeClock::default();
        let backend = MemoryBackend::builder().clock(clock.clone()).build();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run_calendar_case(limits, &steps, |d| clock.advance(d), async |c| backend.check(&c).await))?;
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis_calendar_script {
    use super::*;

    #[test]
    fn redis_script_matches_the_calendar_model() {
        let cases = (calendar_limits(), calendar_steps());
        redis_script::run(128, cases, |(limits, steps), (_, clock, backend, rt)| {
            rt.block_on(run_calendar_case(
                limits,
                &steps,
                |d| clock.advance(d),
                async |c| backend.check(&c).await,
            ))
        });
    }
}
