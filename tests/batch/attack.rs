//! Attacks on batched token charges and holes: several batched Redis
//! instances on one fake clock, every admission replayed per limit
//! through one exact GCRA (`sim::Oracle`), each limit with its own costs.

use std::sync::Arc;
use std::time::Duration;

use tierlimit::backend::batch::sim::Oracle;
use tierlimit::backend::{
    Backend, Batches, Charge, Check, Decision, PeriodBounds, RedisBackend, TokenSplit,
};
use tierlimit::{Limit, key::KeyId};

use crate::common::redis::{RedisServer, ready};
use crate::oracle::{Fleet, Rng};

fn lim(max: u32, secs: u64) -> Limit {
    Limit::new(max.try_into().unwrap(), Duration::from_secs(secs)).unwrap()
}

fn charge(owner: u64, i: u64, limit: Limit) -> Charge {
    Charge {
        bucket: owner ^ (0x1000 + i),
        limit,
        cost: 1,
        reserve: 0,
        period: PeriodBounds::ROLLING,
    }
}

/// One oracle per limit.
struct Books(Vec<Oracle>);

impl Books {
    fn violations(&self, limits: &[Limit]) -> Vec<usize> {
        self.0
            .iter()
            .zip(limits)
            .map(|(o, l)| o.violations(std::slice::from_ref(l)))
            .collect()
    }
    fn admitted(&self) -> Vec<u64> {
        self.0.iter().map(Oracle::admitted).collect()
    }
}

/// Checks at once at the clock's time: `(instance, costs)` each (one
/// cost per charge), with `tokens` token charges split by `split`. Each
/// admission recorded per limit; every decision must name its tokens.
async fn step(
    fleet: &Fleet,
    books: &mut Books,
    owner: u64,
    charges: &[Charge],
    (tokens, split): (u8, TokenSplit),
    at: &[(usize, Vec<u32>)],
) {
    let mut tasks = Vec::new();
    for (i, costs) in at {
        let b = fleet.instances[i % fleet.instances.len()].clone();
        let mine: Arc<[Charge]> = charges
            .iter()
            .zip(costs)
            .map(|(c, &cost)| Charge { cost, ..*c })
            .collect();
        let costs = costs.clone();
        tasks.push(tokio::spawn(async move {
            let check = Check {
                tokens,
                split,
                ..Check::new(owner, true, &mine)
            };
            let d: Decision = b.check(&check).await.unwrap();
            if tokens > 0 && split == TokenSplit::NONE {
                assert!(d.tokens.is_some(), "no token state: {d:?}");
            }
            if split.input > 0 {
                assert!(d.input_tokens.is_some(), "no input token state: {d:?}");
            }
            if split.output > 0 {
                assert!(d.output_tokens.is_some(), "no output token state: {d:?}");
            }
            d.allowed.then_some(costs)
        }));
    }
    for t in tasks {
        if let Some(costs) = t.await.unwrap() {
            for (o, c) in books.0.iter_mut().zip(costs) {
                o.record(fleet.elapsed, c.max(1));
            }
        }
    }
}

fn batches() -> Batches {
    Batches::new().hold(Duration::from_secs(1)).max_share(0.3)
}

/// Random traffic of requests with token estimates from 1 to `most`
/// (now and then close to the token limit's whole burst), against a
/// request limit and a much tighter token limit (`split`: input and
/// output token limits beside them), over three instances.
async fn token_run(seed: u64, limits: &[Limit], (tokens, split): (u8, TokenSplit), most: u64) {
    let server = RedisServer::start();
    let url = server.url();
    let mut fleet = Fleet::new(|| RedisBackend::builder(url.clone()), 3, Some(batches())).await;
    let owner = KeyId::of(&format!("attack-tokens-{seed}")).as_u64();
    let charges: Vec<Charge> = (0..limits.len())
        .map(|i| charge(owner, i as u64, limits[i]))
        .collect();
    let mut books = Books(limits.iter().map(|_| Oracle::default()).collect());
    let mut rng = Rng(seed);
    let short = 10_000_000 / 10;
    for _ in 0..120 {
        let us = match rng.below(12) {
            0 => rng.below(10_000_000),
            1 => 0,
            _ => rng.below(short),
        };
        fleet.advance(Duration::from_micros(us));
        let k = rng.below(30) + 1;
        let at: Vec<(usize, Vec<u32>)> = (0..k)
            .map(|_| {
                let i = rng.below(3) as usize;
                let costs = limits
                    .iter()
                    .enumerate()
                    .map(|(j, l)| {
                        if j + usize::from(tokens) < limits.len() {
                            1
                        } else if rng.below(25) == 0 {
                            l.max() - rng.below(3) as u32
                        } else {
                            1 + rng.below(most) as u32
                        }
                    })
                    .collect();
                (i, costs)
            })
            .collect();
        step(&fleet, &mut books, owner, &charges, (tokens, split), &at).await;
    }
    let over = books.violations(limits);
    assert!(
        over.iter().all(|&o| o == 0),
        "seed {seed:#x}: over {over:?}, admitted {:?}",
        books.admitted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varying_token_estimates_never_over_admit() {
    crate::secret();
    if !ready() {
        return;
    }
    let limits = [lim(1_000, 10), lim(2_000, 10)];
    for seed in [0x9e37_79b9_u64, 0x1234_5678_9abc] {
        token_run(seed, &limits, (1, TokenSplit::NONE), 120).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_token_estimates_never_over_admit() {
    crate::secret();
    if !ready() {
        return;
    }
    let limits = [
        lim(1_000, 10),
        lim(4_000, 10),
        lim(2_000, 10),
        lim(1_000, 10),
    ];
    let split = TokenSplit {
        input: 1,
        output: 1,
    };
    for seed in [0xdead_beef_u64, 0x0bad_cafe] {
        token_run(seed, &limits, (3, split), 60).await;
    }
}

/// Checks of `charge` on `b` at one instant until one is refused: how
/// many were admitted (at most `most`).
async fn drain(b: &RedisBackend, owner: u64, charge: &Charge, most: u32) -> u32 {
    let mut n = 0;
    while b
        .check(&Check::new(owner, true, std::slice::from_ref(charge)))
        .await
        .unwrap()
        .allowed
    {
        n += 1;
        assert!(n <= most, "no end");
    }
    n
}

/// A refund of every unit (estimates settled to nothing) makes a bucket
/// full, never more ("never more than makes the bucket full"); a batch's
/// unused units given back as a hole, before or after that refund, must
/// not add to a full bucket: at one instant, at most the burst (3,600).
async fn full_refund_and_give_back(refund_first: bool) {
    use tierlimit::backend::Adjustment;
    let server = RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let connect = || {
        RedisBackend::builder(server.url())
            .timeout(Duration::from_secs(2))
            .fake_clock(clock.clone())
            .batches(Batches::new())
            .connect()
    };
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    let owner = KeyId::of(&format!("attack-refund-{refund_first}")).as_u64();
    let limit = Limit::per_hour(3_600);
    let c = charge(owner, 0, limit);
    for _ in 0..40 {
        assert!(
            a.check(&Check::new(owner, true, &[c]))
                .await
                .unwrap()
                .allowed
        );
    }
    let held = a.batched_units();
    assert!(held > 0, "a batch is held");
    // A normal check on top of a's batch: its give-back is a hole.
    assert!(
        b.check(&Check::new(owner, true, &[c]))
            .await
            .unwrap()
            .allowed
    );
    let refund = Adjustment {
        bucket: c.bucket,
        limit,
        units: -3_600,
        period: PeriodBounds::ROLLING,
    };
    if refund_first {
        b.settle(owner, &[refund]).await.unwrap();
        a.return_batches().await;
    } else {
        a.return_batches().await;
        b.settle(owner, &[refund]).await.unwrap();
    }
    let admitted = drain(&b, owner, &c, 5_000).await;
    assert_eq!(
        admitted, 3_600,
        "a full bucket at one instant ({held} units were held by a's batch)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_refund_after_a_hole_never_overfills_the_bucket() {
    crate::secret();
    if !ready() {
        return;
    }
    full_refund_and_give_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_after_a_full_refund_never_overfills_the_bucket() {
    crate::secret();
    if !ready() {
        return;
    }
    full_refund_and_give_back(true).await;
}

/// Random traffic of token estimates over three instances, with each
/// admitted request settled at once now and then (a refund of part or all
/// of its estimate), and batches given back mid-run (holes below
/// other units): the tokens admitted never pass the burst, the refill
/// since the start and every refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_estimates_never_over_admit() {
    use tierlimit::backend::Adjustment;
    crate::secret();
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let mut fleet = Fleet::new(|| RedisBackend::builder(url.clone()), 3, Some(batches())).await;
    for seed in [0x5eed_0001_u64, 0x5eed_0002, 0x5eed_0003] {
        let owner = KeyId::of(&format!("attack-settle-{seed}")).as_u64();
        let tokens = lim(2_000, 10);
        let charges = [charge(owner, 0, lim(1_000, 10)), charge(owner, 1, tokens)];
        let (mut rng, start) = (Rng(seed), fleet.elapsed);
        let (mut admitted, mut refunds) = (0_u64, 0_u64);
        for _ in 0..100 {
            let us = match rng.below(12) {
                0 => rng.below(3_000_000),
                1 => 0,
                _ => rng.below(100_000),
            };
            fleet.advance(Duration::from_micros(us));
            let mut tasks = Vec::new();
            for _ in 0..rng.below(30) + 1 {
                let b = fleet.instances[rng.below(3) as usize].clone();
                let est = 1 + rng.below(80) as u32;
                let mine = [
                    charges[0],
                    Charge {
                        cost: est,
                        ..charges[1]
                    },
                ];
                tasks.push(tokio::spawn(async move {
                    let check = Check {
                        tokens: 1,
                        ..Check::new(owner, true, &mine)
                    };
                    b.check(&check).await.unwrap().allowed.then_some(est)
                }));
            }
            for t in tasks {
                let Some(est) = t.await.unwrap() else {
                    continue;
                };
                admitted += u64::from(est);
                if rng.below(3) > 0 {
                    continue;
                }
                let units = -(rng.below(u64::from(est) + 1) as i64);
                refunds += units.min(0).unsigned_abs();
                let adj = Adjustment {
                    bucket: charges[1].bucket,
                    limit: tokens,
                    units,
                    period: PeriodBounds::ROLLING,
                };
                let b = &fleet.instances[rng.below(3) as usize];
                b.settle(owner, &[adj]).await.unwrap();
            }
            if rng.below(8) == 0 {
                fleet.instances[rng.below(3) as usize]
                    .return_batches()
                    .await;
            }
        }
        let refill = (fleet.elapsed - start) / 5_000_000;
        let allowance = 2_000 + refill + refunds;
        assert!(
            admitted <= allowance,
            "seed {seed:#x}: {admitted} tokens admitted against {allowance} \
             (2,000 + {refill} refilled + {refunds} refunded)"
        );
        assert!(admitted > 2_000, "seed {seed:#x}: only {admitted}");
    }
}

/// A batch given back below other units leaves a hole; a request that
/// must leave a reserve never takes it (only the top, less its reserve),
/// and a request without one then takes the reserve and the hole, exactly:
/// over the instant, the burst less what was spent, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_never_takes_a_hole() {
    crate::secret();
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let connect = || {
        RedisBackend::builder(server.url())
            .timeout(Duration::from_secs(2))
            .fake_clock(clock.clone())
            .batches(Batches::new())
            .connect()
    };
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    let owner = KeyId::of("attack-reserve").as_u64();
    let c = charge(owner, 0, Limit::per_hour(3_600));
    for _ in 0..40 {
        assert!(
            a.check(&Check::new(owner, true, &[c]))
                .await
                .unwrap()
                .allowed
        );
    }
    let held = a.batched_units() as u32;
    assert!(held > 0, "a batch is held");
    assert!(
        b.check(&Check::new(owner, true, &[c]))
            .await
            .unwrap()
            .allowed
    );
    a.return_batches().await;
    // A peek counts the hole's units too: the top is the rest.
    let top = b.peek(owner, &c).await.unwrap().remaining - held;
    let reserved = Charge { reserve: 10, ..c };
    let mut with_reserve = 0;
    while b
        .check(&Check::new(owner, true, &[reserved]))
        .await
        .unwrap()
        .allowed
    {
        with_reserve += 1;
        assert!(with_reserve <= 4_000, "no end");
    }
    assert_eq!(with_reserve, top - 10, "the top less its reserve, no hole");
    let rest = drain(&b, owner, &c, 4_000).await;
    assert_eq!(
        rest,
        10 + held,
        "the reserve and the {held} units of the hole"
    );
    assert_eq!(40 + 1 + with_reserve + rest, 3_600, "the burst, exactly");
}
