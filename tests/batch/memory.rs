//! The batcher over the memory backend, on governor's fake clock: batches
//! go back when they age, when the check's limits change and on shutdown;
//! a cold owner is a normal check per request, a hot one rarely asks.

use std::future::{Future, Ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use governor::clock::FakeRelativeClock;
use tierlimit::backend::batch::{BatchStore, Batcher, GiveBack, Step, Take, Taken, Ticket};
use tierlimit::backend::{
    Adjustment, Backend, BackendError, Charge, Check, Decision, Lease, MemoryBackend, Subject,
};
use tierlimit::{Limit, key::KeyId};

type Memory = MemoryBackend<FakeRelativeClock>;

/// The memory backend, counting what the batcher asks of it.
struct Counting {
    inner: Arc<Memory>,
    takes: AtomicU64,
    gives: AtomicU64,
    checks: AtomicU64,
    wants: Mutex<Vec<u32>>,
}

impl BatchStore for Counting {
    type Future = Ready<Result<Taken, BackendError>>;

    fn take(&self, take: &Take<'_>) -> Self::Future {
        self.takes.fetch_add(1, Ordering::Relaxed);
        self.wants.lock().unwrap().push(take.want);
        self.inner.take(take)
    }

    fn give_back(&self, back: &GiveBack<'_>) {
        self.gives.fetch_add(1, Ordering::Relaxed);
        self.inner.give_back(back);
    }
}

impl Backend for Counting {
    type Future = Ready<Result<Decision, BackendError>>;

    fn check(&self, check: &Check<'_>) -> Self::Future {
        self.checks.fetch_add(1, Ordering::Relaxed);
        Backend::check(&*self.inner, check)
    }
    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future {
        self.inner.peek(owner, charge)
    }
    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future {
        self.inner.settle(owner, adjustments)
    }
    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        self.inner.release(owner, leases, lease_id)
    }
    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future {
        self.inner.peek_lease(owner, lease)
    }
}

type Instance = Batcher<Counting, FakeRelativeClock>;

struct World {
    clock: FakeRelativeClock,
    memory: Arc<Memory>,
}

impl World {
    fn new() -> Self {
        let clock = FakeRelativeClock::default();
        let memory = Arc::new(MemoryBackend::builder().clock(clock.clone()).build());
        World { clock, memory }
    }

    fn instance(&self) -> Instance {
        self.instance_of(100_000)
    }

    /// An instance keeping at most `entries` owner × cell entries.
    fn instance_of(&self, entries: usize) -> Instance {
        let store = Counting {
            inner: Arc::clone(&self.memory),
            takes: AtomicU64::new(0),
            gives: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            wants: Mutex::new(Vec::new()),
        };
        let b = Batcher::builder().clock(self.clock.clone());
        b.hold(Duration::from_millis(100))
            .max_share(0.1)
            .max_entries(entries)
            .build(store)
    }

    /// What the bucket could take at once now (`remaining` of a peek).
    fn room(&self, s: &Subject, charge: &Charge) -> u32 {
        self.memory.peek_now(s.key.as_u64(), charge).remaining
    }
}

fn now<F: Future>(f: F) -> F::Output {
    f.now_or_never()
        .expect("the memory backend answers at once")
}

fn subject() -> Subject {
    crate::secret();
    Subject::new(KeyId::of("k"), 7)
}

/// An hour's limit: one unit a second, so that nothing refills while a
/// test looks.
fn hourly() -> Limit {
    Limit::per_hour(3600)
}

/// Forty requests at once: enough for the instance to batch.
fn warm(a: &Instance, s: &Subject, charge: &Charge) {
    for _ in 0..40 {
        assert!(now(a.check(&s.check(charge))).unwrap().allowed);
    }
    assert_eq!(a.batches(), 1);
    assert!(a.unspent() > 0);
}

#[test]
fn an_aged_batch_goes_back_and_the_next_instance_sees_it() {
    let w = World::new();
    let (a, b) = (w.instance(), w.instance());
    let s = subject();
    let charge = s.charge(hourly());
    warm(&a, &s, &charge);
    let (unspent, before) = (a.unspent() as u32, w.room(&s, &charge));
    w.clock.advance(Duration::from_millis(101));
    a.flush_aged(a.now());
    assert_eq!((a.batches(), a.unspent()), (0, 0));
    let after = w.room(&s, &charge);
    // Every unused unit is back (and at most one more of refill).
    assert!((before + unspent..=before + unspent + 1).contains(&after));
    // The other instance spends them: all of them, then no more.
    let mut admitted = 0;
    while now(b.check(&s.check(&charge))).unwrap().allowed {
        admitted += 1;
    }
    assert!(
        admitted + 1 >= after && admitted <= after,
        "{admitted} of {after}"
    );
}

#[test]
fn an_aged_batch_goes_back_on_the_next_request() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(hourly());
    warm(&a, &s, &charge);
    let before = w.room(&s, &charge) + a.unspent() as u32;
    w.clock.advance(Duration::from_millis(101));
    assert_eq!(a.store().gives.load(Ordering::Relaxed), 0);
    assert!(now(a.check(&s.check(&charge))).unwrap().allowed);
    assert_eq!(a.store().gives.load(Ordering::Relaxed), 1);
    // What went back, less this request (and what a new batch holds).
    let after = w.room(&s, &charge) + a.unspent() as u32;
    assert!(after + 1 >= before, "{after} after, {before} before");
}

#[test]
fn other_limits_send_the_batch_back() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(hourly());
    warm(&a, &s, &charge);
    let (unspent, before) = (a.unspent() as u32, w.room(&s, &charge));
    // A boost: the same bucket now also counts per account.
    let account = Charge {
        bucket: 99,
        ..s.charge(Limit::per_minute(1000))
    };
    let both = [charge, account];
    assert!(
        now(a.check(&Check::new(s.key.as_u64(), true, &both)))
            .unwrap()
            .allowed
    );
    assert_eq!(a.store().gives.load(Ordering::Relaxed), 1);
    assert_eq!(a.unspent(), 0);
    // Every unused unit is back, less this request's.
    assert!(w.room(&s, &charge) + 1 >= before + unspent);
}

#[test]
fn flush_all_sends_every_batch_back() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(hourly());
    warm(&a, &s, &charge);
    let (unspent, before) = (a.unspent() as u32, w.room(&s, &charge));
    a.flush_all();
    assert_eq!((a.batches(), a.unspent()), (0, 0));
    // Back, with the hold-back too (given back before the hold ended).
    assert!(w.room(&s, &charge) >= before + unspent);
}

#[test]
fn a_cold_owner_is_one_normal_check_per_request() {
    let w = World::new();
    let a = w.instance();
    // A twin backend on the same clock, checked without batches.
    let twin = MemoryBackend::builder().clock(w.clock.clone()).build();
    let s = subject();
    let charge = s.charge(Limit::per_minute(3));
    for _ in 0..20 {
        let batched = now(a.check(&s.check(&charge))).unwrap();
        assert_eq!(batched, twin.check_now(&s.check(&charge)).unwrap());
        w.clock.advance(Duration::from_secs(10));
    }
    assert_eq!(a.store().takes.load(Ordering::Relaxed), 20);
    assert!(a.store().wants.lock().unwrap().iter().all(|&k| k == 1));
    assert_eq!(a.batches(), 0);
}

#[test]
fn a_hot_owner_rarely_asks_the_store() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    // 100,000 a second; the owner sends 10,000 a second.
    let charge = s.charge(Limit::per_minute(6_000_000));
    let mut admitted = 0u64;
    for _ in 0..20_000 {
        let d = now(a.check(&s.check(&charge))).unwrap();
        assert!(d.allowed && d.remaining <= d.limit);
        admitted += 1;
        w.clock.advance(Duration::from_micros(100));
    }
    let calls = a.store().takes.load(Ordering::Relaxed) + a.store().gives.load(Ordering::Relaxed);
    assert!((calls as f64) / (admitted as f64) <= 0.05, "{calls} calls");
}

#[test]
fn reserves_are_normal_checks_and_leases_pass_through() {
    let w = World::new();
    let a = w.instance();
    let s = Subject {
        reserve: 2,
        ..subject()
    };
    let charge = s.charge(hourly());
    for _ in 0..40 {
        assert!(now(a.check(&s.check(&charge))).unwrap().allowed);
    }
    assert!(a.store().wants.lock().unwrap().iter().all(|&k| k == 1));
    assert_eq!(a.batches(), 0);
    let lease = Lease {
        bucket: 5,
        max: 3,
        per_account: false,
    };
    let leases = [lease];
    let plain = subject().charge(hourly());
    let check = Check {
        leases: &leases,
        ..subject().check(&plain)
    };
    assert!(now(a.check(&check)).unwrap().allowed);
    assert_eq!(a.store().checks.load(Ordering::Relaxed), 1);
}

#[test]
fn a_batch_reports_what_the_bucket_holds() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(hourly());
    let mut last = u32::MAX;
    for _ in 0..40 {
        let d = now(a.check(&s.check(&charge))).unwrap();
        // Never more than the bucket holds, and counting down.
        assert!(d.remaining <= w.room(&s, &charge) + a.unspent() as u32);
        assert!(d.remaining < last);
        last = d.remaining;
    }
}

/// Checks of `s` at the clock's time, each answered at once, until one
/// asks for a batch: that take, not yet sent.
fn until_a_batch(a: &Instance, s: &Subject, charge: &Charge) -> Ticket {
    batch_of(a, s, charge).expect("a batch asked for")
}

/// A take of a batch after at most 100 checks of `s` (none: the table
/// holds no entry for `s`).
fn batch_of(a: &Instance, s: &Subject, charge: &Charge) -> Option<Ticket> {
    for _ in 0..100 {
        match a.begin(&s.check(charge), a.now()) {
            Step::Take(t) if t.is_batch() => return Some(t),
            Step::Take(t) => {
                let taken = now(a.store().take(&t.take()));
                a.finish(&t, taken, a.now()).unwrap();
            }
            Step::Done(_) | Step::Bypass => {}
        }
    }
    None
}

/// A key spray whose takes are never answered (each request's future
/// dropped while its take was on its way: a client gone): once they are
/// old, their owners are forgotten like idle ones, and a new hot owner
/// still gets batches.
#[test]
fn takes_never_answered_do_not_pin_the_table() {
    crate::secret();
    let w = World::new();
    let a = w.instance_of(16);
    let mut dropped = 0;
    for i in 0..200 {
        let s = Subject::new(KeyId::of(&format!("spray-{i}")), 7);
        dropped += usize::from(batch_of(&a, &s, &s.charge(hourly())).is_some());
    }
    // One per shard got an entry (the table is full), then others none.
    assert_eq!(dropped, 16);
    w.clock.advance(Duration::from_secs(10));
    a.flush_aged(a.now());
    let hot = Subject::new(KeyId::of("hot"), 7);
    let charge = hot.charge(hourly());
    for _ in 0..40 {
        assert!(now(a.check(&hot.check(&charge))).unwrap().allowed);
    }
    assert_eq!(a.batches(), 1, "the hot owner batches");
}

/// One take answered past the hold (Redis stalled): the round trip it
/// measured must not keep a hot owner from batching for good.
#[test]
fn one_slow_take_does_not_end_batching() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(Limit::per_minute(6_000_000));
    let slow = until_a_batch(&a, &s, &charge);
    w.clock.advance(Duration::from_millis(150));
    let taken = now(a.store().take(&slow.take()));
    assert!(a.finish(&slow, taken, a.now()).unwrap().allowed);
    let before = a.store().takes.load(Ordering::Relaxed);
    // 2,000 a second, for a second.
    for _ in 0..2_000 {
        assert!(now(a.check(&s.check(&charge))).unwrap().allowed);
        w.clock.advance(Duration::from_micros(500));
    }
    let takes = a.store().takes.load(Ordering::Relaxed) - before;
    assert!(takes <= 200, "{takes} takes for 2,000 checks");
}

/// A take answered after the clock jumped far ahead (a year: a suspended
/// host, a fake clock), then a burst: no arithmetic overflows.
#[test]
fn a_take_answered_a_year_later_does_not_overflow() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let charge = s.charge(Limit::per_minute(6_000_000));
    let slow = until_a_batch(&a, &s, &charge);
    w.clock.advance(Duration::from_secs(365 * 86_400));
    let taken = now(a.store().take(&slow.take()));
    assert!(a.finish(&slow, taken, a.now()).unwrap().allowed);
    for _ in 0..5_000 {
        assert!(now(a.check(&s.check(&charge))).unwrap().allowed);
    }
}

/// A take on two limits, one of them nearly used up: every limit is
/// granted the same number of requests' worth. More units of the larger
/// limit would be held by no one once the smaller is spent (never spent,
/// never given back): the larger limit would lose them.
#[test]
fn a_take_grants_every_limit_the_same_requests_worth() {
    let w = World::new();
    let s = subject();
    let owner = s.key.as_u64();
    let charge = |bucket: u64, limit: Limit| Charge {
        bucket,
        limit,
        cost: 1,
        reserve: 0,
        period: tierlimit::backend::PeriodBounds::ROLLING,
    };
    let charges = [
        charge(owner ^ 1, Limit::per_hour(40)),
        charge(owner ^ 2, Limit::per_day(100)),
    ];
    // The guard keeps 4 to 8 units: a take of 4 gets what the guard can
    // spare (a batch leaves as many as it takes), the budget plenty.
    for left in (4..=8).rev() {
        while w.memory.peek_now(owner, &charges[0]).remaining > left {
            assert!(
                now(w.memory.check(&Check::new(owner, true, &charges)))
                    .unwrap()
                    .allowed
            );
        }
        let before = w.memory.peek_now(owner, &charges[1]).remaining;
        let take = Take {
            owner,
            known: true,
            charges: &charges,
            tokens: 0,
            split: tierlimit::backend::TokenSplit::NONE,
            want: 4,
            hold: Duration::from_millis(100),
        };
        match w.memory.take_now(&take).unwrap() {
            Taken::Granted(g) => {
                let [guard, budget] = g.limits() else {
                    panic!("two limits granted: {:?}", g.limits());
                };
                assert_eq!(guard.units, budget.units, "{left} left in the guard");
                let after = w.memory.peek_now(owner, &charges[1]).remaining;
                assert_eq!(
                    before - after,
                    budget.units,
                    "the budget gave what was granted"
                );
            }
            Taken::Checked(d) => assert!(d.allowed, "{left} left: {d:?}"),
        }
    }
}

/// A batch taken at one token estimate and spent at others (estimates
/// vary per request): when one limit is spent out, the other limit's
/// units left in the batch must go back, not be dropped.
#[test]
fn a_batch_spent_out_on_one_limit_gives_the_others_back() {
    let w = World::new();
    let a = w.instance();
    let s = subject();
    let owner = s.key.as_u64();
    let charge = |bucket: u64, limit: Limit, cost: u32| Charge {
        bucket,
        limit,
        cost,
        reserve: 0,
        period: tierlimit::backend::PeriodBounds::ROLLING,
    };
    // n·T ≥ hold on both limits: no hold-back, the books are exact.
    let requests = Limit::per_hour(1_000);
    let tokens = Limit::per_hour(100_000);
    let (mut admitted, mut token_units) = (0u32, 0u32);
    for i in 0..60u32 {
        let cost = if i < 30 { 20 } else { 10 };
        let charges = [
            charge(owner ^ 1, requests, 1),
            charge(owner ^ 2, tokens, cost),
        ];
        let d = now(a.check(&Check::new(owner, true, &charges))).unwrap();
        assert!(d.allowed);
        admitted += 1;
        token_units += cost;
    }
    a.flush_all();
    let c = [charge(owner ^ 1, requests, 1), charge(owner ^ 2, tokens, 1)];
    let req_room = w.memory.peek_now(owner, &c[0]).remaining;
    let tok_room = w.memory.peek_now(owner, &c[1]).remaining;
    assert_eq!(1_000 - req_room, admitted, "request units held by no one");
    assert_eq!(
        100_000 - tok_room,
        token_units,
        "token units held by no one"
    );
}
