//! The model: 2–4 simulated instances with their own latency to one
//! simulated store, random arrivals and costs, one or two limits. Every
//! admitted spend of every instance, replayed in time order through an
//! exact GCRA per limit, conforms; and what batching loses against one
//! ideal GCRA stays within the stated bound.

use std::time::Duration;

use proptest::prelude::*;
use tierlimit::Limit;
use tierlimit::backend::batch::sim::{Outcome, Run, run};

fn limit() -> impl Strategy<Value = Limit> {
    let per = prop::sample::select(vec![100u64, 200, 1_000, 2_000, 10_000, 60_000]);
    (5u32..2_000, per).prop_map(|(max, ms)| {
        Limit::new(max.try_into().unwrap(), Duration::from_millis(ms)).unwrap()
    })
}

/// Gaps between arrivals: mostly hot (under 2 ms), now and then a pause
/// long enough for a batch to age or a bucket to refill.
fn gap() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..2_000_000, 1 => 0u64..400_000_000]
}

prop_compose! {
    fn runs()(
        instances in 2usize..=4,
        latencies in prop::collection::vec(prop_oneof![0u64..1_000, 0u64..20_000_000], 4),
        hold_ms in prop::sample::select(vec![5u64, 20, 50, 100, 250]),
        share in prop::sample::select(vec![0.05, 0.1, 0.3, 1.0]),
        limits in prop::collection::vec(limit(), 1..=2),
        arrivals in prop::collection::vec((gap(), 0usize..4, 1u32..=3, prop_oneof![6 => Just(0u32), 1 => 1u32..1_200]), 1..400),
    ) -> Run {
        let smallest = limits.iter().map(Limit::max).min().unwrap();
        let mut t = 0;
        let mut all = Vec::new();
        for (gap, i, cost, burst) in arrivals {
            t += gap;
            // A burst: every instance at once, up to 1.2 bursts of the
            // smallest limit each (`burst` per mille of it).
            let each = (u64::from(burst) * u64::from(smallest)).div_ceil(1_000).max(1);
            let who = if burst > 0 { 0..instances } else { i % instances..i % instances + 1 };
            for j in who {
                for _ in 0..if burst > 0 { each } else { 1 } {
                    all.push((t, j, cost.min(smallest)));
                }
            }
        }
        // Kept small enough to run a hundred cases in seconds.
        all.truncate(20_000);
        Run {
            hold: Duration::from_millis(hold_ms),
            max_share: share,
            limits,
            latencies: latencies[..instances].to_vec(),
            arrivals: all,
        }
    }
}

/// What batching may lose against one ideal GCRA: the units stranded (a
/// take came on top before their give-back) and the refill the hold-back
/// skipped (both stated in the module docs), plus what the round trips
/// themselves shift: every request that goes to the store is counted
/// there a latency later, as without batches, and the cost granularity at
/// each batch (where the two runs' buckets part, each may refuse a request
/// of up to the largest cost that the other admits).
fn bound(r: &Run, o: &Outcome) -> u64 {
    let costliest = r.arrivals.iter().map(|a| u64::from(a.2)).max().unwrap_or(1);
    let parting = (o.store.batches + 1) * 2 * costliest * r.limits.len() as u64;
    let slowest = r.latencies.iter().max().copied().unwrap_or(0);
    let shift: u64 = r
        .limits
        .iter()
        .map(|l| 2 * slowest.div_ceil(l.emission_interval().as_nanos() as u64) + 3)
        .max()
        .unwrap();
    o.store.stranded + o.store.skipped + parting + shift * r.latencies.len() as u64 * 3
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn never_over_admits(r in runs()) {
        let o = run(&r);
        prop_assert_eq!(o.violations, 0, "{:?}", o);
        let under = o.ideal.saturating_sub(o.admitted);
        prop_assert!(under <= bound(&r, &o), "under-admission {} over {}: {:?}", under, bound(&r, &o), o);
    }
}

/// The case a batch taken without the hold-back gets wrong: an instance
/// hot enough to take a large batch goes quiet, the bucket refills
/// within the hold, and every instance bursts at once.
#[test]
fn a_quiet_batch_and_a_full_bucket_do_not_add_up() {
    let limits = vec![Limit::new(1000.try_into().unwrap(), Duration::from_millis(200)).unwrap()];
    // The second instance's requests cost a whole batch: never batched.
    let mut arrivals: Vec<_> = (0..200u64).map(|i| (i * 250_000, 0, 1)).collect();
    arrivals.extend((0..10).map(|_| (75_000_000, 1, 500)));
    arrivals.extend((0..100).map(|_| (75_000_000, 0, 1)));
    let r = Run {
        hold: Duration::from_millis(100),
        max_share: 0.5,
        limits,
        latencies: vec![0, 0],
        arrivals,
    };
    let o = run(&r);
    assert!(o.store.batches > 0, "{o:?}");
    assert_eq!(o.violations, 0, "{o:?}");
}

/// The same model, with no latency and one instance: batching then loses
/// only what it strands or skips.
#[test]
fn one_instance_without_latency_loses_only_the_hold_back() {
    let limits = vec![Limit::per_second(100)];
    let arrivals = (0..2_000).map(|i| (i * 2_000_000, 0, 1)).collect();
    let r = Run {
        hold: Duration::from_millis(100),
        max_share: 0.1,
        limits,
        latencies: vec![0],
        arrivals,
    };
    let o = run(&r);
    assert_eq!(o.violations, 0);
    assert!(
        o.ideal - o.admitted <= o.store.stranded + o.store.skipped,
        "{o:?}"
    );
}
