//! The instance's side: local batches per owner and cell, spent without a
//! round trip, sized to the traffic this instance sees, and given back
//! when they age out, when the check's limits change, or on shutdown.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};

use super::entry::{Entry, Local, Retired, routable, signature};
use super::ticket::{Step, Ticket};
use super::{BatchStore, GiveBack, Taken};
use crate::backend::{Backend, BackendError, Charge, Check, Decision};
use crate::limit::MAX_LIMITS;

const SHARDS: usize = 16;

type Table = HashMap<(u64, u64), Entry, foldhash::fast::RandomState>;

/// Owner × cell pairs seen lately, per shard, before they get an entry.
const RECENT: usize = 1024;

/// One shard: the entries of owners that came more than once within a
/// hold, and the last arrival of others (an owner gets an entry, which
/// costs an allocation and a place in every sweep, only on its second
/// request within a hold: a key seen now and then stays a normal check
/// with nothing kept).
struct Shard {
    map: Table,
    recent: Box<[(u64, u64)]>,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            map: Table::default(),
            recent: vec![(0, 0); RECENT].into_boxed_slice(),
        }
    }
}

impl Shard {
    /// Whether `key` came before within `hold` of `now` (it is noted).
    fn came_lately(&mut self, key: (u64, u64), now: u64, hold: u64) -> bool {
        let h = (key.0 ^ key.1.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let slot = &mut self.recent[(h >> 54) as usize % RECENT];
        let lately = slot.0 == h && now.saturating_sub(slot.1) <= hold;
        *slot = (h, now);
        lately
    }
}

impl std::ops::Deref for Shard {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.map
    }
}

impl std::ops::DerefMut for Shard {
    fn deref_mut(&mut self) -> &mut Table {
        &mut self.map
    }
}

/// Configures a [`Batcher`].
#[must_use]
#[derive(Debug)]
pub struct BatcherBuilder<C = DefaultClock> {
    clock: C,
    hold: Duration,
    max_share: f64,
    max_entries: usize,
}

impl<C: Clock> BatcherBuilder<C> {
    /// Another clock (governor's `FakeRelativeClock` in tests): the one
    /// [`Batcher::check`] reads. [`Batcher::begin`] takes the time as an
    /// argument instead.
    pub fn clock<C2: Clock>(self, clock: C2) -> BatcherBuilder<C2> {
        BatcherBuilder {
            clock,
            hold: self.hold,
            max_share: self.max_share,
            max_entries: self.max_entries,
        }
    }

    /// How long a batch may be spent after its take was sent, and how far
    /// past the store's now its slots start (default 100 ms).
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold.max(Duration::from_nanos(1));
        self
    }

    /// The largest batch, as a share of the smallest burst (`max`) of a
    /// check's limits (default 0.1); a batch always holds at least the
    /// request's cost.
    pub fn max_share(mut self, share: f64) -> Self {
        self.max_share = share.clamp(0.0, 1.0);
        self
    }

    /// The most owner × cell entries held (default 100,000); past it, new
    /// ones go to the store one check at a time.
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(SHARDS);
        self
    }

    /// The batcher, over `store`.
    pub fn build<S: BatchStore>(self, store: S) -> Batcher<S, C> {
        let start = self.clock.now();
        Batcher {
            store,
            start,
            clock: self.clock,
            hold: self.hold.as_nanos().min(u128::from(u64::MAX / 4)) as u64,
            max_share: self.max_share,
            per_shard: self.max_entries / SHARDS,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// Local batches of a shared [`BatchStore`]: see the [module
/// docs](super).
///
/// A check goes through [`begin`](Self::begin) (spent from a local batch,
/// or a [`Ticket`] for the store, or passed through) and, after the
/// store's answer, [`finish`](Self::finish); [`check`](Self::check) does
/// both with the batcher's clock.
///
/// ```
/// use governor::clock::FakeRelativeClock;
/// use tierlimit::backend::batch::Batcher;
/// use tierlimit::backend::{MemoryBackend, Subject};
/// use tierlimit::{Limit, key::KeyId};
/// # fn block<F: std::future::Future>(f: F) -> F::Output {
/// #     let mut f = std::pin::pin!(f);
/// #     let waker = std::task::Waker::noop();
/// #     let mut cx = std::task::Context::from_waker(&waker);
/// #     match f.as_mut().poll(&mut cx) { std::task::Poll::Ready(v) => v, _ => unreachable!() }
/// # }
/// let clock = FakeRelativeClock::default();
/// let store = MemoryBackend::builder().clock(clock.clone()).build();
/// let batcher = Batcher::builder().clock(clock).build(store);
/// let s = Subject::new(KeyId::of("k"), 7);
/// let charge = s.charge(Limit::per_second(10));
/// assert!(block(batcher.check(&s.check(&charge))).unwrap().allowed);
/// ```
pub struct Batcher<S, C: Clock = DefaultClock> {
    store: S,
    clock: C,
    start: C::Instant,
    hold: u64,
    max_share: f64,
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
}

impl<S, C: Clock> fmt::Debug for Batcher<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("hold", &Duration::from_nanos(self.hold))
            .field("max_share", &self.max_share)
            .field("batches", &self.batches())
            .finish_non_exhaustive()
    }
}

impl Batcher<()> {
    /// Configures a batcher (on the system clock).
    pub fn builder() -> BatcherBuilder {
        BatcherBuilder {
            clock: DefaultClock::default(),
            hold: Duration::from_millis(100),
            max_share: 0.1,
            max_entries: 100_000,
        }
    }
}

impl<S: BatchStore, C: Clock> Batcher<S, C> {
    /// The store behind.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The batcher's clock now, in nanoseconds since it was built.
    pub fn now(&self) -> u64 {
        u64::from(self.clock.now().duration_since(self.start))
    }

    /// The first half of a check at `now` (nanoseconds on this instance's
    /// clock): spent from a local batch, or what to ask the store, or
    /// [`Step::Bypass`] for a check that is not batched. Holds no lock
    /// once it returns; allocates only for an owner not seen lately.
    pub fn begin(&self, check: &Check<'_>, now: u64) -> Step {
        if !routable(check) {
            return Step::Bypass;
        }
        if check.charges.iter().any(|c| c.reserve > 0) {
            return Step::Take(Ticket::plain(check, now));
        }
        let mut retired = [None, None];
        let step = {
            let mut table = self.shard(check.owner);
            self.step(&mut table, check, now, &mut retired)
        };
        for r in retired.iter().flatten() {
            self.give(r);
        }
        step
    }

    fn step(
        &self,
        table: &mut Shard,
        check: &Check<'_>,
        now: u64,
        retired: &mut [Option<Retired>; 2],
    ) -> Step {
        let signature = signature(check.charges);
        let plain = || Ticket::plain(check, now);
        let full = table.len() >= self.per_shard;
        let key = (check.owner, check.charges[0].bucket);
        if !table.contains_key(&key) && (full || !table.came_lately(key, now, self.hold)) {
            return Step::Take(plain());
        }
        let e = table
            .entry(key)
            .or_insert_with(|| Entry::new(signature, now));
        let owner = check.owner;
        if e.signature != signature {
            // Other buckets or limits now (a policy change, a boost):
            // the old batches go back, and the counts start again.
            retired[0] = e.batch.take().map(|local| Retired { owner, local });
            retired[1] = e.next.take().map(|local| Retired { owner, local });
            *e = Entry::new(signature, now);
        }
        e.arrive(now, self.hold);
        let hold = self.hold_for(check.charges);
        let inflight = e.inflight.is_some_and(|t| now.saturating_sub(t) <= hold);
        let want = self.want(e, check.charges, hold);
        let can_take = !inflight && want > 1;
        // Requests this instance expects to serve while a take is on its way.
        let during = u128::from(e.seen()) * u128::from(e.rtt) / u128::from(self.hold);
        let during = u64::try_from(during).unwrap_or(u64::MAX);
        if let Some(d) = e.serve(check.charges, now, can_take, during, owner, retired) {
            return Step::Done(d);
        }
        if !can_take {
            // Kept from batching by the round trip it measured (one slow
            // take may have made it longer than the hold): the owner's
            // normal checks measure it again.
            let probe = !inflight && e.rtt > 0;
            return Step::Take(Ticket {
                tracked: true,
                signature: if probe { signature } else { 0 },
                ..plain()
            });
        }
        e.inflight = Some(now);
        Step::Take(Ticket {
            want,
            hold,
            signature,
            batch: true,
            ..plain()
        })
    }

    /// The hold of a take: the configured one, at most `max_share` of the
    /// shortest window of the check's limits, so that the refill a batch's
    /// hold-back skips is never more than a batch could hold.
    fn hold_for(&self, charges: &[Charge]) -> u64 {
        let shortest = charges.iter().map(|c| c.limit.per()).min();
        let shortest = shortest.map_or(0, |p| p.as_nanos().min(u128::from(u64::MAX / 4)) as u64);
        self.hold
            .min((shortest as f64 * self.max_share) as u64)
            .max(1)
    }

    /// The batch size for the next take of a batch held `hold`, in
    /// requests' worth (of this request's charges): the requests expected
    /// in half the time a batch can be spent (its hold less the round
    /// trip), at the rate seen in the last configured hold, within the
    /// share of every limit's burst.
    fn want(&self, e: &Entry, charges: &[Charge], hold: u64) -> u32 {
        let usable = hold.saturating_sub(e.rtt);
        let seen = u128::from(e.seen());
        let expected = (seen * u128::from(usable) / u128::from(2 * self.hold)) as u32;
        let share = |c: &Charge| (f64::from(c.limit.max()) * self.max_share) as u32 / c.cost.max(1);
        let most = charges.iter().map(share).min().unwrap_or(0);
        expected.min(most).max(1)
    }

    /// The second half: the store's answer to `ticket`'s take, received
    /// at `now`. A batch is kept for the next requests (its first units
    /// are this request's); a normal check's decision passes through.
    pub fn finish(
        &self,
        ticket: &Ticket,
        taken: Result<Taken, BackendError>,
        now: u64,
    ) -> Result<Decision, BackendError> {
        let mut left = None;
        let answer = match taken {
            Err(e) => Err(e),
            Ok(Taken::Checked(d)) => Ok(d),
            Ok(Taken::Granted(grant)) => {
                let mut spent = [0; MAX_LIMITS];
                for ((s, c), l) in spent.iter_mut().zip(ticket.charges()).zip(grant.limits()) {
                    *s = c.cost.max(1).min(l.units);
                }
                let local = Local {
                    grant,
                    charges: ticket.charges,
                    sent: ticket.sent,
                    received: now,
                    spent,
                    tokens: ticket.tokens,
                    split: ticket.split,
                };
                if !local.spent_out() {
                    left = Some(local);
                }
                Ok(local.decision())
            }
        };
        if (ticket.batch || left.is_some() || ticket.signature != 0)
            && let Some(r) = self.keep(ticket, left, now)
        {
            self.give(&r);
        }
        // Refused by the store (or unanswered) while this instance holds
        // units of the same limits (a batch that landed meanwhile, or the
        // one a take ahead was to follow): the request spends one of those.
        match answer {
            Ok(d) if !d.allowed => Ok(self.spend_held(ticket, now).unwrap_or(d)),
            Err(e) => self.spend_held(ticket, now).ok_or(e),
            other => other,
        }
    }

    /// Spends the ticket's cost from the batch its entry holds, if it can.
    #[cold]
    fn spend_held(&self, ticket: &Ticket, now: u64) -> Option<Decision> {
        let mut table = self.shard(ticket.owner);
        let e = table.get_mut(&(ticket.owner, ticket.cell))?;
        // A request that must leave a reserve never spends a batch's units.
        let reserved = ticket.charges().iter().any(|c| c.reserve > 0);
        if reserved || e.signature != signature(ticket.charges()) {
            return None;
        }
        let local = e.batch.as_mut()?;
        let d = local.spend(ticket.charges(), now)?;
        let done = if local.spent_out() {
            e.retire(ticket.owner)
        } else {
            None
        };
        drop(table);
        if let Some(r) = done {
            self.give(&r);
        }
        Some(d)
    }

    /// Keeps what is left of a new batch in its entry, if it is the
    /// entry's in-flight take and the entry's limits are unchanged; else
    /// it goes back. A take of the entry's limits (a normal check that
    /// measures it again too) updates the round trip.
    fn keep(&self, ticket: &Ticket, left: Option<Local>, now: u64) -> Option<Retired> {
        let mut table = self.shard(ticket.owner);
        let back = |local| Retired {
            owner: ticket.owner,
            local,
        };
        let Some(e) = table.get_mut(&(ticket.owner, ticket.cell)) else {
            return left.map(back);
        };
        if e.signature != ticket.signature {
            return left.map(back);
        }
        if ticket.batch && e.inflight == Some(ticket.sent) {
            e.inflight = None;
        }
        let rtt = now.saturating_sub(ticket.sent);
        e.rtt = if e.rtt == 0 {
            rtt
        } else {
            e.rtt.saturating_mul(3).saturating_add(rtt) / 4
        };
        if !ticket.batch {
            return left.map(back);
        }
        match left {
            Some(local) if e.batch.is_none() => {
                e.batch = Some(local);
                None
            }
            Some(local) if e.next.is_none() => {
                e.next = Some(local);
                None
            }
            other => other.map(back),
        }
    }

    fn give(&self, r: &Retired) {
        let local = &r.local;
        let back = GiveBack {
            owner: r.owner,
            charges: local.charges(),
            grant: &local.grant,
            spent: &local.spent[..local.grant.limits().len()],
        };
        if (0..back.charges.len()).any(|i| back.unused(i) > 0) {
            self.store.give_back(&back);
        }
    }

    fn shard(&self, owner: u64) -> MutexGuard<'_, Shard> {
        let i = (owner.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives back every batch older than its hold at `now`, and forgets
    /// owners idle for two holds (call it now and then; requests also
    /// give an aged batch back when they find it).
    pub fn flush_aged(&self, now: u64) {
        self.drain(Some(now));
    }

    /// Gives back every batch and forgets every owner (on shutdown; a take
    /// still on its way gives its batch back when it lands).
    pub fn flush_all(&self) {
        self.drain(None);
    }

    /// Gives back the batches aged at `now` (all of them: `None`) and
    /// forgets the entries idle then (all of them).
    fn drain(&self, now: Option<u64>) {
        let hold = self.hold;
        let mut out = Vec::new();
        for shard in &self.shards[..] {
            let mut table = shard.lock().unwrap_or_else(PoisonError::into_inner);
            table.retain(|&(owner, _), e| {
                for slot in [&mut e.batch, &mut e.next] {
                    if let Some(local) = slot.take_if(|b| now.is_none_or(|t| b.aged(t))) {
                        out.push(Retired { owner, local });
                    }
                }
                if e.batch.is_none() {
                    e.batch = e.next.take();
                }
                let Some(now) = now else {
                    return false;
                };
                let idle = e.batch.is_none() && now.saturating_sub(e.seen) > 2 * hold;
                // A take older than the hold blocks nothing (its request
                // may be gone, its answer never to come): it keeps no
                // idle entry.
                let waiting = e.inflight.is_some_and(|t| now.saturating_sub(t) <= hold);
                !idle || waiting
            });
            drop(table);
            for r in out.drain(..) {
                self.give(&r);
            }
        }
    }
}

impl<S, C: Clock> Batcher<S, C> {
    /// How many batches are held here now.
    pub fn batches(&self) -> usize {
        self.count(|e| e.batch.is_some()) + self.count(|e| e.next.is_some())
    }

    /// Units held here now, not yet spent, across every batch.
    pub fn unspent(&self) -> u64 {
        let mut n = 0;
        self.count(|e| {
            for b in [e.batch, e.next].iter().flatten() {
                n += u64::from(b.unspent());
            }
            false
        });
        n
    }

    fn count(&self, mut f: impl FnMut(&Entry) -> bool) -> usize {
        let shards = self.shards.iter();
        shards
            .map(|s| {
                let table = s.lock().unwrap_or_else(PoisonError::into_inner);
                table.values().filter(|e| f(e)).count()
            })
            .sum()
    }
}

impl<S: BatchStore + Backend, C: Clock> Batcher<S, C> {
    /// Checks one request with the batcher's clock: from a local batch,
    /// else through the store's take (a check that is not batched goes to
    /// the store's [`Backend::check`], untouched). Routing every batchable
    /// check through the take keeps each bucket in one place.
    pub fn check(
        &self,
        check: &Check<'_>,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send + '_
    where
        C: Sync,
        C::Instant: Send + Sync,
    {
        let next = match self.begin(check, self.now()) {
            Step::Done(d) => Next::Done(d),
            Step::Take(t) => Next::Take(self.store.take(&t.take()), t),
            Step::Bypass => Next::Bypass(Backend::check(&self.store, check)),
        };
        async move {
            match next {
                Next::Done(d) => Ok(d),
                Next::Take(f, t) => {
                    let taken = f.await;
                    self.finish(&t, taken, self.now())
                }
                Next::Bypass(f) => f.await,
            }
        }
    }
}

#[allow(clippy::large_enum_variant)]
enum Next<T, B> {
    Done(Decision),
    Take(T, Ticket),
    Bypass(B),
}
