//! A simulated batch store with a fake clock and latency, a conformance
//! oracle, and a driver that runs instances against them: for the tests
//! and `examples/batch_regions.rs`. Not part of the stable API.
#![allow(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{BatchStore, Batcher, GiveBack, Grant, Step, Take, Taken, Ticket, step};
use crate::backend::{BackendError, Charge, Check};
use crate::limit::Limit;

/// What a [`SimStore`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Takes (round trips), batches and normal checks.
    pub takes: u64,
    /// Takes that asked for and granted a batch (more than the cost).
    pub batches: u64,
    /// Units granted in those batches.
    pub granted: u64,
    /// Give-backs applied.
    pub give_backs: u64,
    /// Unused units given back.
    pub returned: u64,
    /// Unused units a give-back could not return (a take came on top).
    pub stranded: u64,
    /// Units of refill the batches' hold-back skipped (the gap between a
    /// bucket's TAT and a batch's start), before any release.
    pub skipped: u64,
}

/// A give-back on its way: when it arrives, the owner, the charges, the
/// batch and the units of each limit spent.
type Pending = (u64, u64, Vec<Charge>, Grant, Vec<u32>);

#[derive(Default)]
struct State {
    now: u64,
    latency: u64,
    tats: HashMap<u64, u64>,
    pending: Vec<Pending>,
    stats: Stats,
}

/// A store of one process's buckets on a clock the caller sets: takes
/// happen at the time given; give-backs arrive `latency` after they are
/// sent.
#[derive(Default)]
pub struct SimStore {
    state: Mutex<State>,
}

impl std::fmt::Debug for SimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStore")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SimStore {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The caller's time now, and the one-way latency of what it sends.
    pub fn at(&self, now: u64, latency: u64) {
        let mut s = self.state();
        s.now = now;
        s.latency = latency;
    }

    /// A take that reaches the store at `t0`.
    pub fn take_at(&self, t0: u64, take: &Take<'_>) -> Taken {
        let mut s = self.state();
        s.apply(t0);
        let n = take.charges.len();
        let mut tats = [0; crate::limit::MAX_LIMITS];
        for (tat, c) in tats.iter_mut().zip(take.charges) {
            *tat = s.tats.get(&c.bucket).copied().unwrap_or(t0).max(t0);
        }
        let before = tats;
        let taken = step::take(take, &mut tats[..n], t0);
        s.stats.takes += 1;
        if let Taken::Granted(g) = &taken
            && take.is_batch()
        {
            s.stats.batches += 1;
            s.stats.granted += u64::from(g.limits().first().map_or(0, |l| l.units));
            let skip = g.limits().iter().zip(&before);
            let skipped = skip.map(|(l, b)| (l.start - b).div_ceil(l.interval)).max();
            s.stats.skipped += skipped.unwrap_or(0);
        }
        for (c, tat) in take.charges.iter().zip(tats) {
            s.tats.insert(c.bucket, tat);
        }
        taken
    }

    /// Applies every give-back that arrived by `now`.
    pub fn settle(&self, now: u64) {
        self.state().apply(now);
    }

    /// What the store counted.
    pub fn stats(&self) -> Stats {
        self.state().stats
    }
}

impl State {
    fn apply(&mut self, now: u64) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.sort_by_key(|p| Reverse((p.0, p.1)));
        while self.pending.last().is_some_and(|p| p.0 <= now) {
            let Some((_, owner, charges, grant, spent)) = self.pending.pop() else {
                break;
            };
            let back = GiveBack {
                owner,
                charges: &charges,
                grant: &grant,
                spent: &spent,
            };
            let unused = back.unused(0);
            let mut all = true;
            for (i, c) in charges.iter().enumerate() {
                let tat = self.tats.get(&c.bucket).copied().unwrap_or(0);
                match step::given_back(&back, i, tat) {
                    Some(next) => {
                        self.tats.insert(c.bucket, next);
                    }
                    None => all = false,
                }
            }
            self.stats.give_backs += 1;
            if all {
                self.stats.returned += u64::from(unused);
            } else {
                self.stats.stranded += u64::from(unused);
            }
        }
    }
}

impl BatchStore for SimStore {
    type Future = Ready<Result<Taken, BackendError>>;

    fn take(&self, take: &Take<'_>) -> Self::Future {
        let now = self.state().now;
        ready(Ok(self.take_at(now, take)))
    }

    fn give_back(&self, back: &GiveBack<'_>) {
        let mut s = self.state();
        let at = s.now + s.latency;
        let p = (
            at,
            back.owner,
            back.charges.to_vec(),
            *back.grant,
            back.spent.to_vec(),
        );
        s.pending.push(p);
    }
}

/// Replays admitted spends `(time, cost)` in time order through one exact
/// GCRA per limit.
#[derive(Debug, Default)]
pub struct Oracle {
    spends: Vec<(u64, u32)>,
}

impl Oracle {
    /// One admitted spend of `cost` units at `time`.
    pub fn record(&mut self, time: u64, cost: u32) {
        self.spends.push((time, cost));
    }

    /// Units admitted.
    pub fn admitted(&self) -> u64 {
        self.spends.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Spends that do not conform under `limits` (over-admission: must be
    /// 0). A non-conforming spend is reported and not counted.
    pub fn violations(&self, limits: &[Limit]) -> usize {
        let mut spends = self.spends.clone();
        spends.sort_by_key(|s| s.0);
        let mut tats = vec![0u64; limits.len()];
        spends
            .iter()
            .filter(|&&(t, n)| !gcra(limits, &mut tats, t, n))
            .count()
    }

    /// Units one ideal GCRA would admit of `arrivals` `(time, cost)`.
    pub fn ideal(limits: &[Limit], arrivals: &[(u64, u32)]) -> u64 {
        let mut tats = vec![0u64; limits.len()];
        let ok = arrivals
            .iter()
            .filter(|&&(t, n)| gcra(limits, &mut tats, t, n));
        ok.map(|a| u64::from(a.1)).sum()
    }
}

/// An exact GCRA step of `n` at `s`, all or nothing across `limits`.
fn gcra(limits: &[Limit], tats: &mut [u64], s: u64, n: u32) -> bool {
    let fits = limits.iter().zip(tats.iter()).all(|(l, &tat)| {
        let t = l.emission_interval_nanos();
        tat.max(s) + u64::from(n) * t <= s + u64::from(l.max()) * t
    });
    if fits {
        for (l, tat) in limits.iter().zip(tats.iter_mut()) {
            *tat = (*tat).max(s) + u64::from(n) * l.emission_interval_nanos();
        }
    }
    fits
}

/// One simulated run: instances (each with its one-way latency to the
/// store) and their arrivals `(time, instance, cost)`, one owner.
#[derive(Clone, Debug)]
pub struct Run {
    pub hold: Duration,
    pub max_share: f64,
    pub limits: Vec<Limit>,
    pub latencies: Vec<u64>,
    pub arrivals: Vec<(u64, usize, u32)>,
}

/// What a [`Run`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Units admitted.
    pub admitted: u64,
    /// Requests admitted.
    pub requests: u64,
    /// Units one ideal GCRA would admit of the same arrivals.
    pub ideal: u64,
    /// Admitted spends that do not conform (must be 0).
    pub violations: usize,
    /// The store's counts.
    pub store: Stats,
}

#[allow(clippy::large_enum_variant)]
enum Event {
    Arrive(usize, u32),
    AtStore(usize, Ticket),
    Answer(usize, Ticket, Taken),
}

/// Runs `run` to the end (every batch given back), deterministically.
pub fn run(run: &Run) -> Outcome {
    let store = Arc::new(SimStore::default());
    let batchers: Vec<_> = (0..run.latencies.len())
        .map(|_| {
            let b = Batcher::builder().hold(run.hold).max_share(run.max_share);
            b.build(Arc::clone(&store))
        })
        .collect();
    let charges: Vec<Charge> = (0..run.limits.len())
        .map(|i| Charge {
            bucket: 1000 + i as u64,
            limit: run.limits[i],
            cost: 1,
            reserve: 0,
            period: Default::default(),
        })
        .collect();
    let mut queue = BinaryHeap::new();
    let mut events = Vec::new();
    for &(t, i, cost) in &run.arrivals {
        queue.push(Reverse((t, events.len())));
        events.push(Some(Event::Arrive(i, cost)));
    }
    let (mut oracle, mut requests, mut end) = (Oracle::default(), 0, 0);
    while let Some(Reverse((t, e))) = queue.pop() {
        end = t;
        let event = events[e].take();
        let mut next = |at: u64, ev: Event| {
            queue.push(Reverse((at, events.len())));
            events.push(Some(ev));
        };
        match event {
            Some(Event::Arrive(i, cost)) => {
                let mine: Vec<Charge> = charges.iter().map(|c| Charge { cost, ..*c }).collect();
                store.at(t, run.latencies[i]);
                match batchers[i].begin(&Check::new(1, true, &mine), t) {
                    Step::Done(_) => {
                        oracle.record(t, cost);
                        requests += 1;
                    }
                    Step::Take(tk) => next(t + run.latencies[i], Event::AtStore(i, tk)),
                    Step::Bypass => {}
                }
            }
            Some(Event::AtStore(i, tk)) => {
                let taken = store.take_at(t, &tk.take());
                let allowed = match &taken {
                    Taken::Granted(_) => true,
                    Taken::Checked(d) => d.allowed,
                };
                if allowed {
                    oracle.record(t, cost_of(&tk.take()));
                    requests += 1;
                }
                next(t + run.latencies[i], Event::Answer(i, tk, taken));
            }
            Some(Event::Answer(i, tk, taken)) => {
                store.at(t, run.latencies[i]);
                let refused = matches!(taken, Taken::Checked(d) if !d.allowed);
                let answer = batchers[i].finish(&tk, Ok(taken), t);
                if refused && answer.is_ok_and(|d| d.allowed) {
                    // Refused by the store, served from units in hand.
                    oracle.record(t, cost_of(&tk.take()));
                    requests += 1;
                }
            }
            None => {}
        }
    }
    for (i, b) in batchers.iter().enumerate() {
        store.at(end, run.latencies[i]);
        b.flush_all();
    }
    store.settle(u64::MAX);
    let arrivals: Vec<(u64, u32)> = run.arrivals.iter().map(|a| (a.0, a.2)).collect();
    Outcome {
        admitted: oracle.admitted(),
        requests,
        ideal: Oracle::ideal(&run.limits, &arrivals),
        violations: oracle.violations(&run.limits),
        store: store.stats(),
    }
}

/// A take's request cost (the simulation's charges share one).
fn cost_of(take: &Take<'_>) -> u32 {
    take.charges.first().map_or(1, |c| c.cost.max(1))
}
