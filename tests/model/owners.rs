//! A property test of the three owner levels: four keys in two accounts of
//! one organisation, each request charged to its key's, its account's and
//! the organisation's bucket in one check (the organisation the owner, as
//! the layer makes it when per-organisation limits apply), all or nothing.
//! The reference is seven GCRA models (four keys, two accounts, one
//! organisation); a request counts in its three only if all three allow
//! (`multi_expected`). Random arrivals, keys and costs on a fake clock, on
//! the memory backend and on the Redis script.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use tierlimit::backend::{Backend, BackendError, Charge, Check, Decision, PeriodBounds};
use tierlimit::{Limit, MemoryBackend, key::KeyId};

use super::{Model, multi_expected, observed, setup};

/// The models of one case: keys 0–3, accounts 0–1 (keys 0, 1 in the
/// first, 2, 3 in the second), the organisation.
struct Owners {
    keys: [Model; 4],
    accounts: [Model; 2],
    org: Model,
}

impl Owners {
    fn new([k, a, o]: [(u32, u64); 3]) -> Self {
        let model = |(max, t_ms): (u32, u64)| Model {
            t: t_ms * 1_000_000,
            max,
            tat: None,
        };
        Owners {
            keys: [model(k); 4],
            accounts: [model(a); 2],
            org: model(o),
        }
    }

    /// What a request of `key` costing `cost` at `now` gets: all three of
    /// its models allow (and count it), or the longest wait.
    fn check(&mut self, now: u64, key: usize, cost: u32) -> super::Outcome {
        let mut three = [self.keys[key], self.accounts[key / 2], self.org];
        let outcome = multi_expected(&mut three, now, cost, [0; 3]);
        [self.keys[key], self.accounts[key / 2], self.org] = three;
        outcome
    }
}

/// A limit whose interval is whole milliseconds (the Redis script's
/// microseconds and governor's nanoseconds agree exactly).
fn limits() -> impl Strategy<Value = (u32, u64)> {
    (1u32..=12, 1u64..=2_000)
}

/// Steps: (ms to advance, key 0–3, cost).
fn steps() -> impl Strategy<Value = Vec<(u64, usize, u32)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..5_000],
            0usize..4,
            prop_oneof![Just(1u32), Just(1u32), 1u32..=8],
        ),
        1..60,
    )
}

static CASES: AtomicU64 = AtomicU64::new(0);

async fn run_case(
    levels: [(u32, u64); 3],
    steps: &[(u64, usize, u32)],
    advance: impl Fn(Duration),
    check: impl AsyncFn(Check<'_>) -> Result<Decision, BackendError>,
) -> Result<(), TestCaseError> {
    setup();
    let n = CASES.fetch_add(1, Ordering::Relaxed);
    let org = KeyId::of_org(&format!("org-{n}")).as_u64();
    let accounts = [0, 1].map(|a| KeyId::of_account(&format!("acct-{n}-{a}")).as_u64());
    let keys = [0, 1, 2, 3].map(|k| KeyId::of(&format!("key-{n}-{k}")).as_u64());
    let [key_limit, account_limit, org_limit] = levels.map(|(max, t_ms)| {
        Limit::new(
            max.try_into().unwrap(),
            Duration::from_millis(t_ms * u64::from(max)),
        )
        .unwrap()
    });
    let mut models = Owners::new(levels);
    let mut now = 0u64;
    for (i, &(advance_ms, key, cost)) in steps.iter().enumerate() {
        advance(Duration::from_millis(advance_ms));
        now += advance_ms * 1_000_000;
        let charge = |bucket: u64, limit: Limit| Charge {
            bucket,
            limit,
            cost,
            reserve: 0,
            period: PeriodBounds::ROLLING,
        };
        let charges = [
            charge(keys[key] ^ 0x6b, key_limit),
            charge(accounts[key / 2] ^ 0x61, account_limit),
            charge(org ^ 0x6f, org_limit),
        ];
        let want = models.check(now, key, cost);
        let got = observed(check(Check::new(org, true, &charges)).await);
        prop_assert_eq!(got, want, "step {} of {:?} (limits {:?})", i, steps, levels);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn memory_backend_matches_three_owner_levels(
        k in limits(), a in limits(), o in limits(), steps in steps()
    ) {
        let clock = FakeRelativeClock::default();
        let backend = MemoryBackend::builder().clock(clock.clone()).build();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run_case([k, a, o], &steps, |d| clock.advance(d), async |c| backend.check(&c).await))?;
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis_script {
    use super::*;

    #[test]
    fn redis_script_matches_three_owner_levels() {
        let cases = (limits(), limits(), limits(), steps());
        super::super::redis_script::run(96, cases, |(k, a, o, steps), (_, clock, backend, rt)| {
            rt.block_on(run_case(
                [k, a, o],
                &steps,
                |d| clock.advance(d),
                async |c| backend.check(&c).await,
            ))
        });
    }
}
