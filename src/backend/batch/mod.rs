//! Batches: a shared store hands an instance several units of a check's
//! limits at once, which it spends locally; what it does not spend goes
//! back.
//!
//! Between admission and a shared store (Redis, or another region's
//! store) sits a [`Batcher`]. It knows no Redis: it asks a [`BatchStore`]
//! to [`take`](BatchStore::take) up to *k* units of every charge of a
//! check at once, spends them on later requests without a round trip, and
//! [gives back](BatchStore::give_back) the units it did not spend. The
//! word is *batch*; a *lease* is a concurrency slot, something else.
//!
//! # Why it never over-admits
//!
//! Think of GCRA as slots: every admitted unit of a limit (emission
//! interval `T`, burst window `cap = max × T`) owns a slot `[a, a + T)`,
//! no two overlapping, and a sequence of spends at times `s` conforms iff
//! each unit's slot starts no earlier than its spend (`a ≥ s`) and ends
//! within the burst window of it (`a + T ≤ s + cap`). A normal check at
//! `now` takes `a = max(tat, now)`.
//!
//! A take at store time `t0` with a hold of `h` counts the request's own
//! `n` units as a normal check does (from `max(tat, t0)`: the store
//! decides them at `t0`, as it decides every check) and places the other
//! units' slots after `D = t0 + h`. `start` is where the first slot would
//! start were the units together: `start = max(max(tat, t0) + n·T, D) −
//! n·T`, and the take grants `g = min_l floor((t0 + cap_l − start_l) /
//! T_l)` units (at most *k*), all or nothing across the limits. The
//! instance spends unit `j > n` only while the time since it sent the take
//! is at most `h` (so the spend is before `D`, hence before the slot:
//! `a ≥ s`) and once the time since it received the answer is at least
//! `start_l − t0 + j·T_l − cap_l` for every limit (so the slot ends within
//! the window: `a + T ≤ s + cap`). Both use only the instance's own clock,
//! measured from events that bracket `t0`. A take that cannot grant the
//! request's cost is a normal check, in the same step. A checker that
//! replays every admitted spend of every instance in time order through
//! one exact GCRA finds each one conforming ([`sim::Oracle`],
//! `tests/batch.rs`).
//!
//! Where `n·T ≥ h` (a limit of 200 an hour, say, with the default hold)
//! the hold moves no slot: the batch is where normal checks would have
//! put its units, and batching admits exactly what one-at-a-time checks
//! would.
//!
//! A give-back changes a bucket only while the batch is still on top of it
//! (its TAT is still the batch's end): it moves the TAT back by the unused
//! units. Otherwise it does nothing, so a give-back that arrives late or
//! twice is harmless (with one edge: a duplicate, or a bucket lost and made
//! again, that finds another batch ending at the very same TAT; the
//! [`Batcher`] sends each give-back once, and the Redis store marks each
//! batch with its [`tag`](Grant::tag) and gives back only onto its mark).
//!
//! # Bounds
//!
//! - **Over-admission: 0.**
//! - **Under-admission**, per batch: its unused units that could not be
//!   given back (another take came on top), plus at most `hold × rate` of
//!   refill that the hold-back skipped. Both come back with the bucket's
//!   refill.
//! - **A crashed instance** strands at most its batches (two per owner ×
//!   cell, the one being spent and the one taken ahead, each at most
//!   [`max_share`](BatcherBuilder::max_share) of the smallest burst),
//!   recovered by refill within `units × T + hold`.
//!
//! # Defaults
//!
//! - `hold` 100 ms: a batch is spent within 100 ms of its take or given
//!   back. Longer holds batch more but skip up to `hold × rate` of refill
//!   at every take and strand units longer; a take's hold is at most
//!   `max_share` of the shortest window of its limits. The hold must be well above the
//!   round trip to the store: a batch is spendable only for the hold less
//!   the round trip (`examples/batch_regions.rs` shows a hold below it).
//! - `max_share` 10 %: one instance's batch never holds more than a tenth
//!   of any limit's burst, so ten instances can hold batches at
//!   once and a client still sees most of its burst wherever it lands.
//! - `max_entries` 100,000 local batches (owner × cell); past that, new
//!   owners go to the store one check at a time.
//! - The size *k* adapts: 1 request's cost for a cold owner (exactly a
//!   normal check, with no hold), else the requests this instance expects
//!   for that owner and cell in half the time a batch can be spent (the
//!   hold less the last round trip), from the count it saw in the last
//!   `hold`. One take per owner × cell is on its way at a time (other
//!   requests meanwhile are normal checks); when a batch has fewer units
//!   left than a round trip spends, the next request takes the next batch
//!   ahead.

mod batcher;
mod entry;
#[doc(hidden)]
pub mod sim;
pub(crate) mod step;
mod ticket;

use std::future::Future;
use std::time::Duration;

pub use self::batcher::{Batcher, BatcherBuilder};
pub use self::ticket::{Step, Ticket};
use super::{BackendError, Charge, Decision};
use crate::limit::MAX_LIMITS;

/// A request for a batch ([`BatchStore::take`]): up to `want` requests'
/// worth of every charge of a check (`want × cost` units of each), at
/// least the request's own, held back `hold` past the store's now.
#[derive(Clone, Copy, Debug)]
pub struct Take<'a> {
    /// The check's owner (the shard, the hash tag).
    pub owner: u64,
    /// Whether the caller is known ([`Check::known`](super::Check::known)).
    pub known: bool,
    /// The charges, each with the request's cost in it (request units,
    /// or a token estimate). A charge with a reserve makes the take a
    /// normal check.
    pub charges: &'a [Charge],
    /// How many of the last charges are token limits, and which limit
    /// input and output tokens ([`Check::tokens`](super::Check::tokens),
    /// [`Check::split`](super::Check::split)), for the decision.
    pub tokens: u8,
    /// See `tokens`.
    pub split: super::TokenSplit,
    /// Requests' worth wanted (1 for a normal check).
    pub want: u32,
    /// How long after the store's now the batch's slots start (zero for a
    /// normal check).
    pub hold: Duration,
}

impl<'a> Take<'a> {
    /// The check this take is when it is a normal check.
    #[inline]
    pub fn check(&self) -> super::Check<'a> {
        super::Check {
            tokens: self.tokens,
            split: self.split,
            ..super::Check::new(self.owner, self.known, self.charges)
        }
    }

    /// Whether this take asks for more than the request's own units.
    #[inline]
    pub fn is_batch(&self) -> bool {
        self.want > 1 && !self.hold.is_zero()
    }
}

/// One limit of a [`Grant`], in the store's time (nanoseconds on its
/// clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantedLimit {
    /// Where the batch's first slot would start were its units together:
    /// the request's own units from `max(tat, t0)`, the others after
    /// `t0 + hold` (see the module docs).
    pub start: u64,
    /// The limit's emission interval `T`.
    pub interval: u64,
    /// The burst window `max × T`.
    pub cap: u64,
    /// The bucket's TAT before the take (`t0` if it was full).
    pub before: u64,
    /// What the bucket could take at once after the take.
    pub remaining: u32,
    /// Units of this limit granted (at least the request's cost in it).
    pub units: u32,
}

impl GrantedLimit {
    /// The bucket's TAT after a take of `units`: the batch's end.
    #[inline]
    pub fn end(&self, units: u32) -> u64 {
        self.start + u64::from(units) * self.interval
    }
}

/// A batch granted by a store: units of every charge, all or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The store's time of the take (`t0`).
    pub at: u64,
    /// The hold the take asked for, in nanoseconds.
    pub hold: u64,
    /// What names this batch in its store (0: nothing). A store whose
    /// buckets can be lost and made again (Redis flushed or restarted)
    /// marks a batch with it, and a give-back acts only on the batch it
    /// names: another batch ending at the same TAT is not this one.
    pub tag: u64,
    limits: [GrantedLimit; MAX_LIMITS],
    len: u8,
}

impl Grant {
    /// A grant at `at`, held `hold`, with one entry per charge.
    pub fn new(at: u64, hold: u64, limits: &[GrantedLimit]) -> Self {
        let len = limits.len().min(MAX_LIMITS);
        let mut all = [GrantedLimit::default(); MAX_LIMITS];
        all[..len].copy_from_slice(&limits[..len]);
        Grant {
            at,
            hold,
            tag: 0,
            limits: all,
            len: len as u8,
        }
    }

    /// Each charge's part, in charge order.
    #[inline]
    pub fn limits(&self) -> &[GrantedLimit] {
        &self.limits[..usize::from(self.len)]
    }
}

/// A store's answer to a [`Take`].
// A grant holds one entry per possible limit, by value: no allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// A batch: its first units of each charge (the charge's cost) are
    /// the request's.
    Granted(Grant),
    /// Not enough for a batch: the request was checked as a normal check
    /// (allowed and counted, or refused).
    Checked(Decision),
}

/// Unused units of a batch, going back to its store
/// ([`BatchStore::give_back`]).
#[derive(Clone, Copy, Debug)]
pub struct GiveBack<'a> {
    /// The owner the batch was taken for.
    pub owner: u64,
    /// The charges it was taken for (their buckets and limits).
    pub charges: &'a [Charge],
    /// The batch.
    pub grant: &'a Grant,
    /// Units of each limit spent (its first ones); the rest go back.
    pub spent: &'a [u32],
}

impl GiveBack<'_> {
    /// Units of limit `i` not spent (the last ones of the batch).
    #[inline]
    pub fn unused(&self, i: usize) -> u32 {
        let units = self.grant.limits().get(i).map_or(0, |l| l.units);
        units.saturating_sub(self.spent.get(i).copied().unwrap_or(units))
    }
}

/// A shared store that hands out batches: the Redis backend, a region's
/// store, the memory backend (for tests and one process).
///
/// Like [`Backend`](super::Backend), a store whose answer is known at once
/// returns a ready future.
pub trait BatchStore: Send + Sync + 'static {
    /// The future of one take.
    type Future: Future<Output = Result<Taken, BackendError>> + Send + Unpin + 'static;

    /// In one step at the store's now `t0`: grants each limit `l` (its
    /// charge's cost `n_l`, `w_l = want × n_l`)
    /// `g_l = min(w_l, floor((t0 + cap_l − start_l) / T_l) − (w_l − n_l))`
    /// units with `start_l = max(max(tat_l, t0) + n_l·T_l, t0 + hold) −
    /// n_l·T_l`, if every `g_l` is at least `n_l`; then grants every limit
    /// the same number of requests' worth, `g = min_l floor(g_l / n_l)`
    /// (`g·n_l` units of each: a batch is spent up by its smallest limit,
    /// and no unit of another is left that no one would spend or give
    /// back), and sets every `tat_l = start_l + g·n_l·T_l`; otherwise
    /// checks the request as a normal check. A charge with a reserve is
    /// always a normal check.
    fn take(&self, take: &Take<'_>) -> Self::Future;

    /// Gives back a batch's unused units: for each charge whose bucket's
    /// TAT is still the batch's end, moves it back (see the module docs);
    /// for the others, nothing. Never blocks; harmless late.
    fn give_back(&self, back: &GiveBack<'_>);
}

impl<S: BatchStore> BatchStore for std::sync::Arc<S> {
    type Future = S::Future;

    fn take(&self, take: &Take<'_>) -> Self::Future {
        (**self).take(take)
    }

    fn give_back(&self, back: &GiveBack<'_>) {
        (**self).give_back(back)
    }
}
