//! One owner × cell's local state: its batches (spent here, taken
//! ahead, retired), its in-flight take, and the rate it sees; and what
//! makes a check batchable.

use super::Grant;
use crate::backend::{Charge, Check, Decision, TokenSplit};
use crate::limit::{Limit, MAX_LIMITS};

/// One owner × cell: its batch, its in-flight take, and the requests it
/// saw lately.
pub(super) struct Entry {
    pub(super) signature: u64,
    /// The batch being spent.
    pub(super) batch: Option<Local>,
    /// The batch taken ahead, spent when `batch` is done.
    pub(super) next: Option<Local>,
    /// The round trip of a take, smoothed (0: none seen yet).
    pub(super) rtt: u64,
    /// When the in-flight take was sent (a stale one, older than the
    /// hold, no longer blocks another).
    pub(super) inflight: Option<u64>,
    pub(super) window: u64,
    pub(super) count: u32,
    pub(super) prev: u32,
    pub(super) seen: u64,
}

impl Entry {
    pub(super) fn new(signature: u64, now: u64) -> Self {
        Entry {
            signature,
            batch: None,
            next: None,
            rtt: 0,
            inflight: None,
            window: now,
            count: 0,
            prev: 0,
            seen: now,
        }
    }

    pub(super) fn arrive(&mut self, now: u64, hold: u64) {
        let since = now.saturating_sub(self.window);
        if since >= hold {
            self.prev = if since < 2 * hold { self.count } else { 0 };
            self.count = 0;
            self.window = now;
        }
        self.count = self.count.saturating_add(1);
        self.seen = now;
    }

    /// Requests seen in the last hold (the rate).
    pub(super) fn seen(&self) -> u32 {
        self.prev.max(self.count)
    }

    /// Spends the request's charges from the batch if it can, moving on
    /// to the next batch when it is done (aged or spent out: what is left
    /// goes back). With fewer requests' worth left than this instance
    /// serves `during` a round trip, if it may take a batch now, the
    /// request goes to the store instead, for the next batch.
    pub(super) fn serve(
        &mut self,
        charges: &[Charge],
        now: u64,
        can_take: bool,
        during: u64,
        owner: u64,
        retired: &mut [Option<Retired>; 2],
    ) -> Option<Decision> {
        for slot in retired.iter_mut() {
            let local = self.batch.as_mut()?;
            let left = u64::from(local.left(charges));
            let ahead = can_take && self.next.is_none() && left < during + 1;
            if !ahead && let Some(d) = local.spend(charges, now) {
                if local.spent_out() {
                    // Spent out on one limit: units of another (a request
                    // of other costs than the take's, a token estimate)
                    // go back rather than be held by no one.
                    *slot = self.retire(owner);
                }
                return Some(d);
            }
            if ahead && !local.aged(now) && left >= 1 {
                return None;
            }
            *slot = self.retire(owner);
        }
        None
    }

    /// Retires the batch being spent (what it has left goes back) and
    /// moves the one taken ahead in.
    pub(super) fn retire(&mut self, owner: u64) -> Option<Retired> {
        let done = self.batch.take().map(|local| Retired { owner, local });
        self.batch = self.next.take();
        done
    }
}

/// A batch held here.
#[derive(Clone, Copy, Debug)]
pub(super) struct Local {
    pub(super) grant: Grant,
    pub(super) charges: [Charge; MAX_LIMITS],
    pub(super) sent: u64,
    pub(super) received: u64,
    /// Units of each limit spent (the first ones).
    pub(super) spent: [u32; MAX_LIMITS],
    /// The check's token charges ([`Check::tokens`], [`Check::split`]),
    /// for its decisions.
    pub(super) tokens: u8,
    pub(super) split: TokenSplit,
}

impl Local {
    pub(super) fn charges(&self) -> &[Charge] {
        &self.charges[..self.grant.limits().len()]
    }

    /// Spends `charges`' costs at `now` if every unit of them may be spent
    /// (see the module docs), with the decision to answer.
    #[inline]
    pub(super) fn spend(&mut self, charges: &[Charge], now: u64) -> Option<Decision> {
        if self.aged(now) || charges.len() != self.grant.limits().len() {
            return None;
        }
        let since = now.saturating_sub(self.received);
        let mut next = self.spent;
        for ((l, c), j) in self.grant.limits().iter().zip(charges).zip(&mut next) {
            *j = j.checked_add(c.cost.max(1))?;
            let offset = l.start - self.grant.at;
            if *j > l.units || since + l.cap < offset + u64::from(*j) * l.interval {
                return None;
            }
        }
        self.spent = next;
        Some(self.decision())
    }

    /// Requests' worth of `charges` left (the fewest of any limit).
    pub(super) fn left(&self, charges: &[Charge]) -> u32 {
        let each = self.grant.limits().iter().zip(charges).zip(&self.spent);
        each.map(|((l, c), s)| (l.units - s) / c.cost.max(1))
            .min()
            .unwrap_or(0)
    }

    /// Whether some limit has no unit left.
    pub(super) fn spent_out(&self) -> bool {
        let each = self.grant.limits().iter().zip(&self.spent);
        each.clone().any(|(l, s)| *s >= l.units)
    }

    /// Units held, unspent (of the first limit).
    pub(super) fn unspent(&self) -> u32 {
        let first = self.grant.limits().first().map_or(0, |l| l.units);
        first - self.spent[0].min(first)
    }

    /// Whether the batch may no longer be spent: longer than its hold
    /// since its take was sent.
    #[inline]
    pub(super) fn aged(&self, now: u64) -> bool {
        now.saturating_sub(self.sent) > self.grant.hold
    }

    /// Each limit's remaining at the store after the take plus what is
    /// left of it here; the binding one, as a backend's check says it.
    pub(super) fn decision(&self) -> Decision {
        let mut each = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
        let n = self.grant.limits().len();
        let held = self
            .charges()
            .iter()
            .zip(self.grant.limits())
            .zip(&self.spent);
        for (d, ((c, l), s)) in each.iter_mut().zip(held) {
            *d = Decision::allow(&c.limit, l.remaining + (l.units - s));
        }
        Decision::binding_with_split(&each[..n], usize::from(self.tokens), self.split)
            .unwrap_or_else(|| Decision::allow(&Limit::per_second(1), 1))
    }
}

/// A batch leaving, to give back outside the lock.
pub(super) struct Retired {
    pub(super) owner: u64,
    pub(super) local: Local,
}

/// Whether a check may go through a take: no leases, no calendar
/// limits (request charges of any cost, token charges of any estimate).
pub(super) fn routable(check: &Check<'_>) -> bool {
    !check.charges.is_empty()
        && check.leases.is_empty()
        && check.charges.len() <= MAX_LIMITS
        && check
            .charges
            .iter()
            .all(|c| !c.limit.period().is_calendar())
}

/// The check's buckets and limits, as one number: another one means the
/// policy (or a boost, or a custom limit) changed what the check counts.
pub(super) fn signature(charges: &[Charge]) -> u64 {
    charges.iter().fold(0xcbf2_9ce4_8422_2325, |h, c| {
        let l = (u64::from(c.limit.max()) << 32) ^ c.limit.per().as_nanos() as u64;
        (h ^ c.bucket ^ l.rotate_left(29))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(23)
    })
}
