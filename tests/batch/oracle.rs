//! Several batched Redis instances (a single node, a Cluster) on one fake
//! clock: every admission is recorded at the clock's time and replayed
//! through one exact GCRA per limit (`sim::Oracle`, in nanoseconds, with
//! the limits' true intervals). Over-admission must be 0.
//!
//! Redis expires a bucket's key on its own clock (after the TTL the fake
//! time gave it): so that no key expires before the fake clock reaches
//! its TAT, the fake clock never runs slower than the real one between
//! steps ([`Fleet::advance`]), and a bucket's TTL after a write (at least
//! one interval) outlasts a step.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use tierlimit::backend::batch::sim::Oracle;
use tierlimit::backend::{
    Backend, Batches, Charge, Check, FailurePolicy, RedisBackend, RedisBackendBuilder, Subject,
};
use tierlimit::{Limit, key::KeyId};

use crate::common::redis::{RedisCluster, RedisServer, ready};

/// Instances on one fake clock, and every admission they made.
pub(crate) struct Fleet {
    pub(crate) instances: Vec<RedisBackend>,
    pub(crate) clock: FakeRelativeClock,
    pub(crate) oracle: Oracle,
    /// The clock's time since the start, in nanoseconds.
    pub(crate) elapsed: u64,
    last: std::time::Instant,
}

impl Fleet {
    /// `n` instances on the Redis `builder` makes, batched by `batches`.
    pub(crate) async fn new(
        builder: impl Fn() -> RedisBackendBuilder,
        n: usize,
        batches: Option<Batches>,
    ) -> Fleet {
        Self::with_timeout(builder, n, batches, Duration::from_secs(2)).await
    }

    /// The same, each check given up after `timeout` (failing closed).
    pub(crate) async fn with_timeout(
        builder: impl Fn() -> RedisBackendBuilder,
        n: usize,
        batches: Option<Batches>,
        timeout: Duration,
    ) -> Fleet {
        let clock = FakeRelativeClock::default();
        let mut instances = Vec::new();
        for _ in 0..n {
            let mut b = builder()
                .fake_clock(clock.clone())
                .timeout(timeout)
                .failure_policy(FailurePolicy::FailClosed);
            if let Some(batches) = batches {
                b = b.batches(batches);
            }
            instances.push(b.connect().await.unwrap());
        }
        Fleet {
            instances,
            clock,
            oracle: Oracle::default(),
            elapsed: 0,
            last: std::time::Instant::now(),
        }
    }

    /// Advances the fake clock by `d`, or by the real time since the last
    /// advance if longer (in whole microseconds, Redis's unit).
    pub(crate) fn advance(&mut self, d: Duration) {
        let real = self.last.elapsed();
        self.last = std::time::Instant::now();
        let us = d.max(real).as_micros() as u64 + u64::from(real > d);
        let d = Duration::from_micros(us);
        self.clock.advance(d);
        self.elapsed += d.as_nanos() as u64;
    }

    /// Checks at once at the clock's time (`(instance, cost)` each), of
    /// `charges` (their costs replaced): the units admitted, recorded.
    pub(crate) async fn step(
        &mut self,
        owner: u64,
        charges: &[Charge],
        at: &[(usize, u32)],
    ) -> u64 {
        let mut tasks = Vec::new();
        for &(i, cost) in at {
            let b = self.instances[i % self.instances.len()].clone();
            let mine: Arc<[Charge]> = charges.iter().map(|c| Charge { cost, ..*c }).collect();
            tasks.push(tokio::spawn(async move {
                let d = b.check(&Check::new(owner, true, &mine)).await;
                d.is_ok_and(|d| d.allowed).then_some(cost)
            }));
        }
        let mut units = 0;
        for t in tasks {
            if let Some(cost) = t.await.unwrap() {
                self.oracle.record(self.elapsed, cost);
                units += u64::from(cost);
            }
        }
        units
    }

    /// Spends that do not conform to `limits` (over-admission).
    pub(crate) fn violations(&self, limits: &[Limit]) -> usize {
        self.oracle.violations(limits)
    }
}

/// A small deterministic generator (xorshift), seeded per run.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

pub(crate) fn charges(key: &str, limits: &[Limit]) -> (u64, Vec<Charge>) {
    let s = Subject::new(KeyId::of(key), 21);
    let all = limits
        .iter()
        .enumerate()
        .map(|(i, &l)| Charge {
            bucket: s.charge(l).bucket ^ i as u64,
            ..s.charge(l)
        })
        .collect();
    (s.key.as_u64(), all)
}

/// Random traffic: `steps` steps, each a clock advance (mostly under a
/// tenth of the shortest window, now and then up to the longest window)
/// and a burst of up to `most` checks of cost 1..=`cost` spread over the
/// instances, on `key`'s buckets: the spends that do not conform, and the
/// units admitted, since the fleet's oracle was last reset.
pub(crate) async fn random_run(
    fleet: &mut Fleet,
    (seed, key): (u64, &str),
    limits: &[Limit],
    steps: usize,
    (most, cost): (u64, u32),
) -> (usize, u64) {
    let mut rng = Rng(seed);
    let (owner, charges) = charges(key, limits);
    let window = limits
        .iter()
        .map(|l| l.per().as_micros() as u64)
        .max()
        .unwrap();
    let short = limits
        .iter()
        .map(|l| l.per().as_micros() as u64)
        .min()
        .unwrap();
    let n = fleet.instances.len() as u64;
    for _ in 0..steps {
        let us = match rng.below(10) {
            0 => rng.below(window),
            1 => 0,
            _ => rng.below(short / 10),
        };
        fleet.advance(Duration::from_micros(us));
        let k = rng.below(most) + 1;
        let at: Vec<(usize, u32)> = (0..k)
            .map(|_| (rng.below(n) as usize, 1 + rng.below(u64::from(cost)) as u32))
            .collect();
        fleet.step(owner, &charges, &at).await;
    }
    (fleet.violations(limits), fleet.oracle.admitted())
}

/// Two limits (intervals of 50 and 100 ms: a bucket's TTL after a write
/// outlasts a step), and a hold of a second: a batch's units are placed
/// after the hold, past several intervals.
pub(crate) fn limits() -> Vec<Limit> {
    vec![
        Limit::new(200.try_into().unwrap(), Duration::from_secs(10)).unwrap(),
        Limit::new(1_000.try_into().unwrap(), Duration::from_secs(100)).unwrap(),
    ]
}

pub(crate) fn batches() -> Batches {
    Batches::new().hold(Duration::from_secs(1)).max_share(0.3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_traffic_on_a_single_node_never_over_admits() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let mut fleet = Fleet::new(|| RedisBackend::builder(url.clone()), 3, Some(batches())).await;
    for seed in [0x9e37_79b9, 0x1234_5678_9abc, 0xdead_beef] {
        fleet.oracle = Oracle::default();
        let key = format!("oracle-{seed}");
        let (over, admitted) = random_run(&mut fleet, (seed, &key), &limits(), 150, (40, 3)).await;
        assert_eq!(over, 0, "seed {seed:#x}: {admitted} admitted");
        assert!(admitted > 500, "seed {seed:#x}: {admitted} admitted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_traffic_on_a_cluster_never_over_admits() {
    if !ready() {
        return;
    }
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let mut fleet = Fleet::new(|| RedisBackend::cluster(urls.clone()), 3, Some(batches())).await;
    for seed in [0x5151_5151, 0x0bad_cafe] {
        fleet.oracle = Oracle::default();
        let key = format!("oracle-{seed}");
        let (over, admitted) = random_run(&mut fleet, (seed, &key), &limits(), 150, (40, 2)).await;
        assert_eq!(over, 0, "seed {seed:#x}: {admitted} admitted");
        assert!(admitted > 500, "seed {seed:#x}: {admitted} admitted");
    }
}

/// A limit whose interval is not a whole number of microseconds (600,000
/// a second: 1.67 µs), where Redis counts in microseconds: a bucket
/// drained at once (one check of its whole burst: its TAT is then far
/// ahead, and its key outlives the test), then by checks of cost 1,000
/// from two instances every 10 ms (or longer, if the real time took
/// longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_between_whole_microseconds_never_over_admits() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let mut fleet = Fleet::new(
        || RedisBackend::builder(url.clone()),
        2,
        Some(Batches::new()),
    )
    .await;
    let limit = Limit::new(600_000.try_into().unwrap(), Duration::from_secs(1)).unwrap();
    let (owner, charges) = charges("fractional", &[limit]);
    assert_eq!(fleet.step(owner, &charges, &[(0, 600_000)]).await, 600_000);
    for _ in 0..30 {
        fleet.advance(Duration::from_millis(10));
        let at: Vec<_> = (0..15).map(|i| (i % 2, 1_000)).collect();
        fleet.step(owner, &charges, &at).await;
    }
    let admitted = fleet.oracle.admitted();
    let over = fleet.violations(&[limit]);
    assert_eq!(
        over, 0,
        "{admitted} units admitted, {over} checks over the limit"
    );
}
