//! The check's charges and leases: a request under several limits becomes
//! per-key charges (per account in a pooled tier), then per-account ones,
//! then per-organisation ones, then token charges, each in its own bucket, all under one owner; and
//! the concurrency leases it must hold. What a metered request settles
//! later (its [`TokenMeter`]) and the leases it holds ([`Leases`]) are made
//! from the same set.

use std::sync::Arc;

use crate::backend::{Backend, Charge, Lease, MAX_LEASES, TokenSplit, limit_bucket};
use crate::extract::Identity;
use crate::lease::Leases;
use crate::limit::Per;
use crate::meter::{ErasedBackend, Seed, TokenKind, TokenMeter};
use crate::policy::{Calendar, Cell, Limit, Limits, MAX_LIMITS, PeriodBounds, Pool, RefundOn};

/// A request's charge under `limit`, counted in the bucket of `base` (an
/// owner mixed with the cell's scope): both [`ChargeSet::alone`] and
/// [`ChargeSet::new`] make them here, so a check alone and a peek through
/// the set name the same bucket.
#[inline(always)]
fn request_charge(limit: Limit, base: u64, cost: u32, reserve: &impl Fn(u32) -> u32) -> Charge {
    Charge {
        bucket: limit_bucket(base, &limit),
        limit,
        cost,
        reserve: reserve(limit.max()),
        period: PeriodBounds::ROLLING,
    }
}

/// Mixed into token buckets ("tokens").
const TOKENS: u64 = 0x746f_6b65_6e73;

/// Mixed into input-token buckets ("input"), besides [`TOKENS`].
const INPUT: u64 = 0x69_6e70_7574;

/// Mixed into output-token buckets ("output"), besides [`TOKENS`].
const OUTPUT: u64 = 0x6f75_7470_7574;

/// Mixed into concurrency buckets ("leases").
const LEASES: u64 = 0x6c65_6173_6573;

/// An unused charge slot.
const NO_CHARGE: Charge = Charge {
    bucket: 0,
    limit: Limit::per_second(1),
    cost: 1,
    reserve: 0,
    period: PeriodBounds::ROLLING,
};

/// An unused lease slot.
const NO_LEASE: Lease = Lease {
    bucket: 0,
    max: 1,
    per_account: false,
};

/// The charges of a request under several limits: per-key limits (per
/// account in a pooled tier), then per-account ones, each in its own
/// bucket, all under one owner.
pub(crate) struct ChargeSet {
    pub(crate) owner: u64,
    items: [Charge; MAX_LIMITS],
    len: usize,
    /// How many of the last charges are token limits.
    pub(crate) tokens: u8,
    /// Which of those count input and output tokens.
    pub(crate) split: TokenSplit,
    leases: [Lease; MAX_LEASES],
    pub(crate) nleases: usize,
}

/// Whom a request's buckets belong to.
#[derive(Clone, Copy)]
struct Owners {
    /// The organisation (the account without one).
    org: u64,
    /// The account (the key itself without one).
    account: u64,
    /// The owner of per-key buckets: the key, or the account in a pooled
    /// tier.
    key: u64,
}

impl Owners {
    #[inline]
    fn of(cell: &Cell, identity: &Identity) -> Self {
        let account = identity.account_or_key().as_u64();
        let key = match cell.pool {
            Pool::Key => identity.key().as_u64(),
            Pool::Account => account,
        };
        Owners {
            org: identity.org_or_account().as_u64(),
            account,
            key,
        }
    }

    /// The owner of the whole check: the organisation when anything is
    /// counted per organisation, else the account when anything is
    /// counted per account, else the per-key owner.
    #[inline]
    fn check_owner(self, cell: &Cell, applied: Limits<'_>) -> u64 {
        if !applied.per_org.is_empty() {
            self.org
        } else if cell.pool == Pool::Account
            || !applied.per_account.is_empty()
            || !applied.account_tokens.is_empty()
            || applied
                .io
                .is_some_and(|io| !io.account_input.is_empty() || !io.account_output.is_empty())
            || cell.account_concurrency.is_some()
        {
            self.account
        } else {
            self.key
        }
    }
}

impl ChargeSet {
    /// The one charge of a request under one limit counted per key (per
    /// account in a pooled tier), with no tokens, leases or per-account
    /// limits, and its owner: what [`new`](Self::new) would make, without
    /// the set's arrays (the common case, on every request).
    #[inline(always)]
    pub(crate) fn alone(
        cell: &Cell,
        applied: Limits<'_>,
        identity: &Identity,
        cost: u32,
        reserve: impl Fn(u32) -> u32,
    ) -> Option<(u64, Charge)> {
        let ([limit], [], [], [], []) = (
            applied.per_key,
            applied.per_account,
            applied.per_org,
            applied.tokens,
            applied.account_tokens,
        ) else {
            return None;
        };
        // A cell with input or output token limits is metered: never alone.
        if cell.leased || cell.metered || limit.period().is_calendar() {
            return None;
        }
        let owners = Owners::of(cell, identity);
        let charge = request_charge(*limit, owners.key ^ cell.scope, cost, &reserve);
        Some((owners.check_owner(cell, applied), charge))
    }

    pub(crate) fn new(
        cell: &Cell,
        applied: Limits<'_>,
        identity: &Identity,
        cost: u32,
        estimate: u32,
        reserve: impl Fn(u32) -> u32,
    ) -> Self {
        let owners = Owners::of(cell, identity);
        let mut set = ChargeSet {
            owner: owners.check_owner(cell, applied),
            items: [NO_CHARGE; MAX_LIMITS],
            len: 0,
            tokens: 0,
            split: TokenSplit::NONE,
            leases: [NO_LEASE; MAX_LEASES],
            nleases: 0,
        };
        set.add_requests(cell, applied, owners, cost, reserve);
        set.add_tokens(cell, applied, owners, estimate);
        set.add_leases(cell, owners);
        set
    }

    /// The request charges: per-key limits, then per-account ones, then
    /// per-organisation ones.
    #[inline]
    fn add_requests(
        &mut self,
        cell: &Cell,
        applied: Limits<'_>,
        owners: Owners,
        cost: u32,
        reserve: impl Fn(u32) -> u32,
    ) {
        let per_key = applied.per_key.iter();
        let per_account = applied.per_account.iter();
        let per_org = applied.per_org.iter();
        let limits = per_key
            .map(|l| (*l, owners.key ^ cell.scope))
            .chain(per_account.map(|l| (*l, owners.account ^ cell.account_scope)))
            .chain(per_org.map(|l| (*l, owners.org ^ cell.org_scope)));
        for (slot, (limit, base)) in self.items[self.len..].iter_mut().zip(limits) {
            *slot = request_charge(limit, base, cost, &reserve);
            self.len += 1;
        }
    }

    /// The token charges, after the request charges: those of all tokens,
    /// then of input tokens, then of output tokens (each per key, then per
    /// account), in buckets apart from request buckets of the same limit.
    /// All tokens and input tokens reserve the estimate; output tokens 1
    /// (a completion's length is not known before it runs).
    #[inline]
    fn add_tokens(&mut self, cell: &Cell, applied: Limits<'_>, owners: Owners, estimate: u32) {
        let (key, account) = (
            owners.key ^ cell.scope ^ TOKENS,
            owners.account ^ cell.account_scope ^ TOKENS,
        );
        let estimate = estimate.max(1);
        self.add_token_kind(
            applied.tokens,
            applied.account_tokens,
            (key, account),
            estimate,
        );
        let Some(io) = applied.io else {
            return;
        };
        let before = self.tokens;
        let input = (key ^ INPUT, account ^ INPUT);
        self.add_token_kind(io.input, io.account_input, input, estimate);
        self.split.input = self.tokens - before;
        let output = (key ^ OUTPUT, account ^ OUTPUT);
        self.add_token_kind(io.output, io.account_output, output, 1);
        self.split.output = self.tokens - before - self.split.input;
    }

    /// Token charges of one kind: `per_key`'s in bucket base `key`, then
    /// `per_account`'s in `account`, each reserving `cost`.
    #[inline]
    fn add_token_kind(
        &mut self,
        per_key: &[Limit],
        per_account: &[Limit],
        (key, account): (u64, u64),
        cost: u32,
    ) {
        let limits = per_key
            .iter()
            .map(|l| (*l, key))
            .chain(per_account.iter().map(|l| (*l, account)));
        for (slot, (limit, base)) in self.items[self.len..].iter_mut().zip(limits) {
            *slot = Charge {
                bucket: limit_bucket(base, &limit),
                limit,
                cost,
                reserve: 0,
                period: PeriodBounds::ROLLING,
            };
            self.len += 1;
            self.tokens += 1;
        }
    }

    /// What charge `i` of a set made from `applied` counts: whom it is
    /// counted per (per key: the key's own bucket, even in a pooled tier),
    /// and its kind of tokens (`None`: requests).
    pub(crate) fn describe(applied: Limits<'_>, i: usize) -> (Per, Option<TokenKind>) {
        let nkey = applied.per_key.len();
        let nacc = nkey + applied.per_account.len();
        let mut from = nacc + applied.per_org.len();
        if i < from {
            let per = match i {
                i if i < nkey => Per::Key,
                i if i < nacc => Per::Account,
                _ => Per::Org,
            };
            return (per, None);
        }
        let io = applied.io.unwrap_or_default();
        let kinds = [
            (
                TokenKind::Total,
                applied.tokens.len(),
                applied.account_tokens.len(),
            ),
            (TokenKind::Input, io.input.len(), io.account_input.len()),
            (TokenKind::Output, io.output.len(), io.account_output.len()),
        ];
        for (kind, keys, accounts) in kinds {
            if i < from + keys + accounts {
                let per = if i >= from + keys {
                    Per::Account
                } else {
                    Per::Key
                };
                return (per, Some(kind));
            }
            from += keys + accounts;
        }
        (Per::Key, None)
    }

    /// The concurrency leases: per key, then per account.
    #[inline]
    fn add_leases(&mut self, cell: &Cell, owners: Owners) {
        let wanted = [
            cell.concurrency
                .map(|max| (max, owners.key ^ cell.scope, false)),
            cell.account_concurrency
                .map(|max| (max, owners.account ^ cell.account_scope, true)),
        ];
        for (max, base, per_account) in wanted.into_iter().flatten() {
            self.leases[self.nleases] = Lease {
                bucket: (base ^ LEASES).rotate_left(29),
                max,
                per_account,
            };
            self.nleases += 1;
        }
    }

    /// Whether any charge is a calendar limit's (which needs the time).
    #[inline]
    pub(crate) fn has_calendar(&self) -> bool {
        self.charges()
            .iter()
            .any(|c| c.limit.period().is_calendar())
    }

    /// Puts each calendar charge in its period at Unix time `now` in
    /// `calendar`'s zone (each kind of period computed once).
    pub(crate) fn in_periods(&mut self, calendar: &Calendar, now: std::time::Duration) {
        let mut known: [Option<PeriodBounds>; 4] = [None; 4];
        for c in &mut self.items[..self.len] {
            let period = c.limit.period();
            if period.is_calendar() {
                let slot = &mut known[(period as usize) & 3];
                c.period = *slot.get_or_insert_with(|| calendar.bounds(period, now));
            }
        }
    }

    #[inline]
    pub(crate) fn charges(&self) -> &[Charge] {
        &self.items[..self.len]
    }

    #[inline]
    pub(crate) fn leases(&self) -> &[Lease] {
        &self.leases[..self.nleases]
    }

    /// The meter of a metered request charged with this set: it settles
    /// what was used against the estimate when the request is over.
    #[inline]
    pub(crate) fn meter<B: Backend>(
        &self,
        backend: &Arc<B>,
        estimate: u32,
        refund: RefundOn,
        #[cfg(feature = "metrics")] counters: Option<crate::telemetry::TokenCounters>,
    ) -> TokenMeter {
        TokenMeter::new(Seed {
            owner: self.owner,
            charges: self.items,
            len: self.len as u8,
            tokens: self.tokens,
            split: self.split,
            estimate,
            refund,
            sink: Arc::clone(backend) as Arc<dyn ErasedBackend>,
            #[cfg(feature = "metrics")]
            counters,
        })
    }

    /// The leases of this set, pending under check `id`.
    #[inline]
    pub(crate) fn pending_leases<B: Backend>(&self, backend: &Arc<B>, id: u64) -> Leases {
        Leases::pending(
            self.owner,
            self.leases(),
            id,
            Arc::clone(backend) as Arc<dyn ErasedBackend>,
        )
    }
}
