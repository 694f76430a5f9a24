//! Property tests: random sequences of (time step, cost, reserve) against a
//! reference GCRA model, for the memory backend and for the Redis script
//! (both on a fake clock): the same decisions, the same remaining, the
//! same retry delays, at every step.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use tierlimit::{Backend, BackendError, Decision, KeyId, Limit, MemoryBackend, Subject};

/// What the model says one check gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allow { remaining: u32 },
    Deny { retry: Duration },
    CostTooHigh,
}

/// GCRA as DESIGN.md states it (governor's arithmetic), in nanoseconds:
/// `max` at once, then one every `t`; a reserve of `r` cells must be left.
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
        rt.block_on(run_case(limit, &steps, |d| clock.advance(d), async |s, l| backend.check(&s, &l).await))?;
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis_script {
    use super::*;
    use common::redis::{RedisServer, available, init_secret};
    use std::sync::OnceLock;

    /// One server and one backend (fake clock) for every case.
    fn shared() -> Option<&'static (
        RedisServer,
        FakeRelativeClock,
        tierlimit::RedisBackend,
        tokio::runtime::Runtime,
    )> {
        static SHARED: OnceLock<
            Option<(
                RedisServer,
                FakeRelativeClock,
                tierlimit::RedisBackend,
                tokio::runtime::Runtime,
            )>,
        > = OnceLock::new();
        SHARED
            .get_or_init(|| {
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
            })
            .as_ref()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn redis_script_matches_the_model(limit in limits(), steps in steps()) {
            let Some((_server, clock, backend, rt)) = shared() else {
                return Ok(());
            };
            rt.block_on(run_case(limit, &steps, |d| clock.advance(d), async |s, l| backend.check(&s, &l).await))?;
        }
    }
}
