//! The owner-sharded store of every check that is not one charge alone:
//! one owner's buckets in one of [`SHARDS`] shards (one lock per check),
//! known callers and guests apart, charged against the backend's key
//! [`Budget`], with one overflow state per limit for guests that arrive
//! at the cap.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::calendar::{self, Counter};
use super::flat::Buckets;
use super::gcra::{Gcra, Slot, capacity_at};
use super::sweep::retain_full;
use crate::backend::{Charge, Decision, Lease, LeaseState};
use crate::decision::Binder;
use crate::limit::{Limit, MAX_LIMITS};

pub(super) const SHARDS: usize = 64;

/// The key budget, shared by both stores: how many keys are tracked, the
/// cap (known callers may go past it, up to twice it), and the count at
/// which growth triggers a whole sweep.
pub(super) struct Budget {
    pub(super) tracked: AtomicUsize,
    pub(super) cap: usize,
    pub(super) next_sweep: AtomicUsize,
}

impl Budget {
    #[inline]
    pub(super) fn try_acquire(&self) -> bool {
        self.tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// A known caller's slot past the cap, up to twice it (the hard bound).
    #[cold]
    pub(super) fn force_acquire(&self) -> bool {
        let hard = self.cap.saturating_mul(2);
        self.tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < hard).then_some(n + 1)
            })
            .is_ok()
    }

    /// A place past every bound, for a known caller's calendar counter
    /// (a count is never lost; listed keys are finite).
    #[cold]
    pub(super) fn track_past_cap(&self) -> bool {
        self.tracked.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub(super) fn release(&self, n: usize) {
        self.tracked.fetch_sub(n, Ordering::Relaxed);
        crate::telemetry::tracked_keys(-(n as f64));
    }
}

/// The buckets of several-limit checks: one owner's in one shard (one
/// lock per check), charged against the backend's key budget like the
/// single-limit buckets, with one overflow state per limit for guests
/// that arrive at the cap.
pub(super) struct MultiStore {
    shards: Box<[Shard]>,
    overflow: Mutex<HashMap<(u8, Limit), u64>>,
    /// Calendar counters of guests that arrived at the cap, one per limit.
    calendar_overflow: Mutex<HashMap<(u8, Limit), Counter>>,
    /// The latest Unix time a calendar charge brought.
    pub(super) latest: super::calendar::Latest,
}

impl MultiStore {
    pub(super) fn new() -> Self {
        MultiStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            overflow: Mutex::new(HashMap::new()),
            calendar_overflow: Mutex::new(HashMap::new()),
            latest: super::calendar::Latest::default(),
        }
    }

    #[inline]
    pub(super) fn shard(&self, owner: u64) -> &Shard {
        &self.shards[(owner >> 32) as usize % SHARDS]
    }

    /// Drops buckets full again (TAT at or before `now`), and calendar
    /// counters of periods over.
    pub(super) fn retain_shard(&self, shard: usize, now: u64, budget: &Budget) {
        retain_full(&self.shards[shard], now, self.latest.get(), budget);
    }

    pub(super) fn retain_overflow(&self, now: u64) {
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        if !overflow.is_empty() {
            overflow.retain(|_, tat| *tat > now);
        }
        drop(overflow);
        let latest = self.latest.get();
        let mut counters = self
            .calendar_overflow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counters.retain(|_, c| c.end > latest);
    }
}

/// The key hash is already uniform: use it as the table's hash.
#[derive(Default)]
pub(super) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One shard: `bucket → TAT`, known callers and guests (unknown keys and
/// anonymous callers) apart, so that guests can give way at the cap.
#[derive(Default)]
pub(super) struct ShardMaps {
    pub(super) known: Buckets,
    pub(super) guests: Buckets,
    /// Calendar limits' counters, by bucket.
    pub(super) calendar: HashMap<u64, super::calendar::Counter, BuildHasherDefault<IdentityHasher>>,
    /// Leases held per concurrency bucket (a bucket is dropped when its
    /// last lease is released, so this holds no more than the requests in
    /// flight; it is not charged to the key budget).
    pub(super) leases: Buckets,
}

impl ShardMaps {
    pub(super) fn get(&self, key: u64) -> Option<u64> {
        self.known
            .get(&key)
            .or_else(|| self.guests.get(&key))
            .copied()
    }

    pub(super) fn len(&self) -> usize {
        self.known.len() + self.guests.len() + self.calendar.len()
    }

    pub(super) fn table(&mut self, known: bool) -> &mut Buckets {
        if known {
            &mut self.known
        } else {
            &mut self.guests
        }
    }

    /// Stores a tracked bucket's TAT, moving it to the caller's class.
    pub(super) fn set(&mut self, key: u64, tat: u64, known: bool) {
        if let Some(v) = self.table(known).get_mut(&key) {
            *v = tat;
            return;
        }
        self.table(!known).remove(&key);
        self.table(known).insert(key, tat);
    }

    /// The binding state of a request's concurrency leases if it takes
    /// one more of each (`None`: it has none).
    #[inline]
    pub(super) fn lease_state(&self, leases: &[Lease]) -> Option<LeaseState> {
        LeaseState::binding(leases.iter().map(|l| {
            let held = self.leases.get(&l.bucket).map_or(0, |&n| n as u32);
            LeaseState {
                limit: l.max,
                remaining: l.max.saturating_sub(held).saturating_sub(1),
                refused: held >= l.max,
                per_account: l.per_account,
            }
        }))
    }

    /// An admitted request takes one lease of each.
    #[inline]
    pub(super) fn take_leases(&mut self, leases: &[Lease]) {
        for l in leases {
            *self.leases.or_insert(l.bucket, 0) += 1;
        }
    }
}

pub(super) type Shard = Mutex<ShardMaps>;

/// What a several-limit check read under its owner's shard lock (which it
/// holds until the check returns): each charge's state and where it lives.
/// Nothing is written until the check is decided; then every charge is
/// written ([`commit`](Self::commit)) or none ([`refuse`](Self::refuse)).
pub(super) struct Reading<'a> {
    /// Each charge's state: its TAT, and where it lives.
    slots: [Slot; MAX_LIMITS],
    /// Places taken from the key budget for new buckets.
    acquired: usize,
    /// The overflow states, locked once a guest at the cap needs one.
    overflow: Option<MutexGuard<'a, HashMap<(u8, Limit), u64>>>,
    /// Each calendar charge's count in its period before this request.
    used: [u64; MAX_LIMITS],
    /// The calendar overflow counters, locked once a guest at the cap
    /// needs one.
    cal_overflow: Option<MutexGuard<'a, HashMap<(u8, Limit), Counter>>>,
}

impl MultiStore {
    /// Reads every charge's state in `maps` (the owner's shard, locked).
    /// A bucket not tracked takes a place in the key budget; at the cap, a
    /// known caller's goes past it or makes a guest of the shard give way,
    /// and a guest's is counted in the overflow bucket of its limit.
    #[inline]
    pub(super) fn read(
        &self,
        maps: &ShardMaps,
        charges: &[Charge],
        known: bool,
        budget: &Budget,
    ) -> Reading<'_> {
        let mut overflow = None;
        let mut slots = [Slot::Tracked(0); MAX_LIMITS];
        let mut acquired = 0usize;
        // Guests of this shard that may give way to a known caller at the
        // hard bound (one per new bucket).
        let mut spare_guests = maps.guests.len();
        let (mut used, mut cal_overflow) = ([0; MAX_LIMITS], None);
        for (i, c) in charges.iter().enumerate() {
            if c.limit.period().is_calendar() {
                // A counter (calendar.rs), not a bucket: tracked (a known
                // caller's always: a count is never lost), or a guest's
                // at the cap in the overflow counter of its limit.
                slots[i] = if maps.calendar.contains_key(&c.bucket) {
                    Slot::Tracked(0)
                } else if budget.try_acquire() || (known && budget.track_past_cap()) {
                    acquired += 1;
                    Slot::New
                } else {
                    // The rolling overflow's lock first, always: two checks
                    // never take the two locks in opposite orders.
                    overflow.get_or_insert_with(|| {
                        self.overflow.lock().unwrap_or_else(PoisonError::into_inner)
                    });
                    let map = cal_overflow.get_or_insert_with(|| {
                        let m = self.calendar_overflow.lock();
                        m.unwrap_or_else(PoisonError::into_inner)
                    });
                    used[i] = calendar::in_period(map.get(&(i as u8, c.limit)), &c.period);
                    Slot::Overflow(None)
                };
                if !matches!(slots[i], Slot::Overflow(_)) {
                    used[i] = calendar::used(maps, c.bucket, &c.period);
                }
                continue;
            }
            slots[i] = match maps.get(c.bucket) {
                Some(tat) => Slot::Tracked(tat),
                None if budget.try_acquire() => {
                    acquired += 1;
                    Slot::New
                }
                None if known && budget.force_acquire() => {
                    acquired += 1;
                    Slot::New
                }
                None if known && spare_guests > 0 => {
                    spare_guests -= 1;
                    Slot::Evict
                }
                None => {
                    let map = overflow.get_or_insert_with(|| {
                        self.overflow.lock().unwrap_or_else(PoisonError::into_inner)
                    });
                    Slot::Overflow(map.get(&(i as u8, c.limit)).copied())
                }
            };
        }
        Reading {
            slots,
            acquired,
            overflow,
            used,
            cal_overflow,
        }
    }
}

impl Reading<'_> {
    /// Calendar charge `i`'s count in its period before this request.
    #[inline]
    pub(super) fn used(&self, i: usize) -> u64 {
        self.used[i]
    }

    /// Charge `i`'s GCRA step at `now` (an untracked bucket's TAT is now).
    #[inline]
    pub(super) fn gcra(&self, i: usize, c: &Charge, now: u64) -> Gcra {
        let tat = self.slots[i].tat().unwrap_or(now);
        Gcra::new(&c.limit, c.cost.max(1), c.reserve, tat, now)
    }

    /// A refused check writes nothing and gives the budget back its places.
    /// Refused by a charge, each charge reports its own decision; refused
    /// by a lease (every charge admits it), each reports its capacity now,
    /// untouched.
    #[inline]
    pub(super) fn refuse(
        &self,
        binder: &mut Binder,
        charges: &[Charge],
        now: u64,
        lease_refused: bool,
        budget: &Budget,
    ) {
        if self.acquired > 0 {
            budget.tracked.fetch_sub(self.acquired, Ordering::Relaxed);
        }
        for (i, c) in charges.iter().enumerate() {
            let d = if c.limit.period().is_calendar() {
                let used = self.used[i];
                if lease_refused {
                    calendar::peeked(&c.limit, &c.period, used)
                } else {
                    calendar::decision(c, used)
                }
            } else if lease_refused {
                Decision::allow(&c.limit, capacity_at(&c.limit, self.slots[i].tat(), now))
            } else {
                self.gcra(i, c, now).decision(&c.limit, c.cost.max(1))
            };
            binder.push(i, d);
        }
    }

    /// An admitted check counts every charge: each one's new TAT is written
    /// where its slot says it lives.
    #[inline]
    pub(super) fn commit(
        &mut self,
        binder: &mut Binder,
        maps: &mut ShardMaps,
        charges: &[Charge],
        now: u64,
        known: bool,
    ) {
        if self.acquired > 0 {
            crate::telemetry::tracked_keys(self.acquired as f64);
        }
        for (i, c) in charges.iter().enumerate() {
            if c.limit.period().is_calendar() {
                let used = self.used[i];
                binder.push(i, calendar::decision(c, used));
                match (self.slots[i], self.cal_overflow.as_mut()) {
                    (Slot::Overflow(_), Some(map)) => {
                        let counter = calendar::counted(map.get(&(i as u8, c.limit)), c, used);
                        map.insert((i as u8, c.limit), counter);
                    }
                    _ => {
                        let counter = calendar::counted(maps.calendar.get(&c.bucket), c, used);
                        maps.calendar.insert(c.bucket, counter);
                    }
                }
                continue;
            }
            let g = self.gcra(i, c, now);
            binder.push(i, g.decision(&c.limit, c.cost.max(1)));
            let next = g.next;
            match self.slots[i] {
                Slot::Tracked(_) => maps.set(c.bucket, next, known),
                Slot::New => {
                    maps.table(known).insert(c.bucket, next);
                }
                Slot::Evict => {
                    // At the hard bound: a guest of this shard gives way
                    // (counted when the slot was chosen, so one is there).
                    if let Some(victim) = maps.guests.any_key(c.bucket) {
                        maps.guests.remove(&victim);
                    }
                    maps.known.insert(c.bucket, next);
                }
                Slot::Overflow(_) => {
                    if let Some(map) = self.overflow.as_mut() {
                        map.insert((i as u8, c.limit), next);
                    }
                }
            }
        }
    }
}

impl Reading<'_> {
    /// Every charge's TAT (`now` for a full bucket) when each lives in the
    /// owner's shard (tracked, or new there); `None` when one lives
    /// elsewhere (a guest at the cap, a known caller at the hard bound):
    /// such a check is not batched.
    pub(super) fn own_tats(&self, n: usize, now: u64) -> Option<[u64; MAX_LIMITS]> {
        let mut tats = [now; MAX_LIMITS];
        for (tat, slot) in tats.iter_mut().zip(&self.slots[..n]) {
            match *slot {
                Slot::Tracked(t) => *tat = t,
                Slot::New => {}
                Slot::Evict | Slot::Overflow(_) => return None,
            }
        }
        Some(tats)
    }

    /// Gives the budget back the places this reading took, writing nothing.
    pub(super) fn cancel(&mut self, budget: &Budget) {
        if self.acquired > 0 {
            budget.tracked.fetch_sub(self.acquired, Ordering::Relaxed);
            self.acquired = 0;
        }
    }

    /// Writes each charge's TAT (`tats`, in charge order) where it lives in
    /// the owner's shard (after [`own_tats`](Self::own_tats)).
    pub(super) fn write(
        &self,
        maps: &mut ShardMaps,
        charges: &[Charge],
        tats: &[u64],
        known: bool,
    ) {
        if self.acquired > 0 {
            crate::telemetry::tracked_keys(self.acquired as f64);
        }
        for (i, c) in charges.iter().enumerate() {
            match self.slots[i] {
                Slot::Tracked(_) => maps.set(c.bucket, tats[i], known),
                Slot::New => {
                    maps.table(known).insert(c.bucket, tats[i]);
                }
                Slot::Evict | Slot::Overflow(_) => {}
            }
        }
    }
}
