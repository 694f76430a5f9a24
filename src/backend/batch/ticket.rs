//! What a check becomes on its way to a store: a [`Step`] of
//! [`Batcher::begin`](super::Batcher::begin), and the [`Ticket`] of a take
//! that [`Batcher::finish`](super::Batcher::finish) completes.

use std::time::Duration;

use super::Take;
use crate::backend::{Charge, Check, Decision, TokenSplit};
use crate::limit::MAX_LIMITS;

/// What [`Batcher::begin`](super::Batcher::begin) made of a check.
// A ticket carries its charges by value (the take borrows them across the
// store's await); boxing it would allocate once per store call.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// Spent from a local batch: the decision.
    Done(Decision),
    /// Ask the store ([`BatchStore::take`](super::BatchStore::take) of [`Ticket::take`]), then
    /// [`Batcher::finish`](super::Batcher::finish).
    Take(Ticket),
    /// Not batchable (leases, calendar limits): check it with the
    /// backend, untouched.
    Bypass,
}

/// A check on its way to the store: what to take, and what to do with the
/// answer ([`Batcher::finish`](super::Batcher::finish)).
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    pub(super) owner: u64,
    pub(super) known: bool,
    pub(super) charges: [Charge; MAX_LIMITS],
    pub(super) len: u8,
    pub(super) tokens: u8,
    pub(super) split: TokenSplit,
    pub(super) want: u32,
    pub(super) hold: u64,
    pub(super) sent: u64,
    pub(super) cell: u64,
    pub(super) signature: u64,
    pub(super) batch: bool,
    /// Whether this instance keeps an entry for the owner and cell (its
    /// answer may then use units held here).
    pub(super) tracked: bool,
}

impl Ticket {
    pub(super) fn plain(check: &Check<'_>, now: u64) -> Self {
        let len = check.charges.len().min(MAX_LIMITS);
        let mut charges = [check.charges[0]; MAX_LIMITS];
        charges[..len].copy_from_slice(&check.charges[..len]);
        Ticket {
            owner: check.owner,
            known: check.known,
            charges,
            len: len as u8,
            tokens: check.tokens,
            split: check.split,
            want: 1,
            hold: 0,
            sent: now,
            cell: check.charges[0].bucket,
            signature: 0,
            batch: false,
            tracked: false,
        }
    }

    /// What to ask the store for.
    pub fn take(&self) -> Take<'_> {
        Take {
            owner: self.owner,
            known: self.known,
            charges: self.charges(),
            tokens: self.tokens,
            split: self.split,
            want: self.want,
            hold: Duration::from_nanos(self.hold),
        }
    }

    /// Whether this take asks for a batch (more than the request's cost);
    /// else it is a normal check.
    pub fn is_batch(&self) -> bool {
        self.batch
    }

    /// Whether [`Batcher::finish`](super::Batcher::finish) has anything to do with this take's
    /// answer: a batch, or a check of an owner this instance holds
    /// batches for (refused, it may spend units held here). Otherwise the
    /// take is a normal check in every way, and a store may answer it as
    /// one, without the batcher.
    pub fn needs_finish(&self) -> bool {
        self.batch || self.tracked
    }

    pub(super) fn charges(&self) -> &[Charge] {
        &self.charges[..usize::from(self.len)]
    }
}
