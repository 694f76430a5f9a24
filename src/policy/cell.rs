//! The cells of the tier × category table: what each holds ([`Cell`]),
//! how the request path borrows it, and how a user reads it
//! ([`CellLimits`], [`EffectiveLimits`]).

use super::{Applied, IoTokens, LimitBuf, Limits, Pool, RefundOn};
use crate::key::hash_str;
use crate::limit::{Limit, Rule};

/// One cell of the tier × category table: its limits, and what separates
/// its buckets from every other cell's in a backend.
#[derive(Debug)]
pub(crate) struct Cell {
    /// The first per-key limit (or unlimited), for [`Policy::rule`](super::Policy::rule).
    pub(crate) rule: Rule,
    /// Limits counted per key (per account in a pooled tier); empty:
    /// unlimited per key.
    pub(crate) per_key: Box<[Limit]>,
    /// Limits counted per account, on top of the per-key ones.
    pub(crate) per_account: Box<[Limit]>,
    /// Limits counted per organisation, on top of both.
    pub(crate) per_org: Box<[Limit]>,
    /// Token limits, per key (per account in a pooled tier).
    pub(crate) tokens: Box<[Limit]>,
    /// Token limits per account.
    pub(crate) account_tokens: Box<[Limit]>,
    /// Input and output token limits (per key, per account).
    pub(crate) io: IoTokens<Box<[Limit]>>,
    /// Whether any input or output token limit applies (else `io` is
    /// not looked at on the request path).
    pub(crate) has_io: bool,
    /// Responses whose requests are refunded.
    pub(crate) refund: RefundOn,
    /// Whether a request of the cell is settled after its response (token
    /// limits, or refunds): it always takes the several-limit path.
    pub(crate) metered: bool,
    /// Requests of one key (one account in a pooled tier) in flight at
    /// once; `None`: no concurrency limit per key.
    pub(crate) concurrency: Option<u32>,
    /// Requests of one account in flight at once.
    pub(crate) account_concurrency: Option<u32>,
    /// Whether a request of the cell holds leases (a concurrency limit).
    pub(crate) leased: bool,
    pub(crate) pool: Pool,
    /// A hash of the tier and category names, stable in one process (and
    /// across instances that share a key secret).
    pub(crate) scope: u64,
    /// The same for the cell's per-account limits.
    pub(crate) account_scope: u64,
    /// The same for the cell's per-organisation limits.
    pub(crate) org_scope: u64,
    /// The tier's priority reserve, in percent (0: none), in each of its
    /// cells: a request reads it from the cell it has in hand.
    pub(crate) reserve: u8,
}

impl Cell {
    pub(in crate::policy) fn new(
        per_key: Vec<Limit>,
        [per_account, per_org]: [Vec<Limit>; 2],
        extra: Metering,
        pool: Pool,
        tier: &str,
        category: &str,
    ) -> Self {
        let io = extra.io.map(|l| l.clone().into_boxed_slice());
        let metered = !extra.tokens.is_empty()
            || !extra.account_tokens.is_empty()
            || !io.map(|l| &**l).is_empty()
            || !extra.refund.is_empty();
        let leased = extra.concurrency.is_some() || extra.account_concurrency.is_some();
        Cell {
            rule: per_key
                .first()
                .map_or(Rule::Unlimited, |l| Rule::Limited(*l)),
            per_key: per_key.into_boxed_slice(),
            per_account: per_account.into_boxed_slice(),
            per_org: per_org.into_boxed_slice(),
            tokens: extra.tokens.into_boxed_slice(),
            account_tokens: extra.account_tokens.into_boxed_slice(),
            has_io: !io.map(|l| &**l).is_empty(),
            io,
            refund: extra.refund,
            metered,
            concurrency: extra.concurrency,
            account_concurrency: extra.account_concurrency,
            leased,
            pool,
            scope: hash_str(&format!("{tier}\0{category}")),
            account_scope: hash_str(&format!("{tier}\0{category}\0account")),
            org_scope: hash_str(&format!("{tier}\0{category}\0org")),
            reserve: 0,
        }
    }

    /// Whether nothing limits the cell.
    #[inline]
    pub(crate) fn is_unlimited(&self) -> bool {
        self.per_key.is_empty()
            && self.per_account.is_empty()
            && self.per_org.is_empty()
            && self.tokens.is_empty()
            && self.account_tokens.is_empty()
            && !self.has_io
            && !self.leased
    }

    /// The cell's limits, borrowed.
    #[inline]
    pub(crate) fn limits(&self) -> Limits<'_> {
        Limits {
            per_key: &self.per_key,
            per_account: &self.per_account,
            per_org: &self.per_org,
            tokens: &self.tokens,
            account_tokens: &self.account_tokens,
            io: self.has_io.then(|| self.io.map(|l| &**l)),
        }
    }

    /// The cell's limits as a tier gives them (a copy to adjust).
    pub(crate) fn applied(&self) -> Applied {
        Applied {
            per_key: LimitBuf::from_slice(&self.per_key),
            per_account: LimitBuf::from_slice(&self.per_account),
            per_org: LimitBuf::from_slice(&self.per_org),
            tokens: LimitBuf::from_slice(&self.tokens),
            account_tokens: LimitBuf::from_slice(&self.account_tokens),
            io: self.io.map(|l| LimitBuf::from_slice(l)),
        }
    }
}

/// A cell's token limits and refunds (what is settled after a response).
#[derive(Clone, Debug, Default)]
pub(in crate::policy) struct Metering {
    pub(in crate::policy) tokens: Vec<Limit>,
    pub(in crate::policy) account_tokens: Vec<Limit>,
    pub(in crate::policy) io: IoTokens<Vec<Limit>>,
    pub(in crate::policy) refund: RefundOn,
    pub(in crate::policy) concurrency: Option<u32>,
    pub(in crate::policy) account_concurrency: Option<u32>,
}

/// Every limit that applies to one key in one category at one time
/// ([`Policy::effective_limits`](super::Policy::effective_limits)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EffectiveLimits {
    /// Request limits counted per key (per account in a pooled tier);
    /// empty: unlimited per key.
    pub per_key: Vec<Limit>,
    /// Request limits counted per account.
    pub per_account: Vec<Limit>,
    /// Request limits counted per organisation.
    pub per_org: Vec<Limit>,
    /// Token limits per key (per account in a pooled tier).
    pub tokens: Vec<Limit>,
    /// Token limits per account.
    pub account_tokens: Vec<Limit>,
    /// Input-token limits per key (per account in a pooled tier).
    pub input_tokens: Vec<Limit>,
    /// Output-token limits per key (per account in a pooled tier).
    pub output_tokens: Vec<Limit>,
    /// Input-token limits per account.
    pub account_input_tokens: Vec<Limit>,
    /// Output-token limits per account.
    pub account_output_tokens: Vec<Limit>,
    /// Requests in flight at once per key (per account when pooled).
    pub concurrency: Option<u32>,
    /// Requests in flight at once per account.
    pub account_concurrency: Option<u32>,
}

/// The limits of one tier × category cell ([`Policy::limits`](super::Policy::limits)).
#[derive(Clone, Copy, Debug)]
pub struct CellLimits<'a> {
    pub(super) cell: &'a Cell,
}

impl<'a> CellLimits<'a> {
    /// Limits counted per key (per account when [`pool`](Self::pool) is
    /// [`Pool::Account`]); empty when the cell is unlimited per key.
    pub fn per_key(&self) -> &'a [Limit] {
        &self.cell.per_key
    }

    /// Limits counted per account, on top of the per-key ones.
    pub fn per_account(&self) -> &'a [Limit] {
        &self.cell.per_account
    }

    /// Limits counted per organisation, on top of the per-key and
    /// per-account ones.
    pub fn per_org(&self) -> &'a [Limit] {
        &self.cell.per_org
    }

    /// Whose count the per-key limits are kept in.
    pub fn pool(&self) -> Pool {
        self.cell.pool
    }

    /// Token limits, per key (per account when pooled).
    pub fn tokens(&self) -> &'a [Limit] {
        &self.cell.tokens
    }

    /// Token limits per account.
    pub fn account_tokens(&self) -> &'a [Limit] {
        &self.cell.account_tokens
    }

    /// Input-token limits, per key (per account when pooled): what a
    /// request reports with
    /// [`TokenMeter::add_input`](crate::meter::TokenMeter::add_input).
    pub fn input_tokens(&self) -> &'a [Limit] {
        &self.cell.io.input
    }

    /// Output-token limits, per key (per account when pooled): what a
    /// request reports with
    /// [`TokenMeter::add_output`](crate::meter::TokenMeter::add_output).
    pub fn output_tokens(&self) -> &'a [Limit] {
        &self.cell.io.output
    }

    /// Input-token limits per account.
    pub fn account_input_tokens(&self) -> &'a [Limit] {
        &self.cell.io.account_input
    }

    /// Output-token limits per account.
    pub fn account_output_tokens(&self) -> &'a [Limit] {
        &self.cell.io.account_output
    }

    /// The responses whose requests are refunded.
    pub fn refund_on(&self) -> RefundOn {
        self.cell.refund
    }

    /// Requests of one key (one account when pooled) that may be in flight
    /// at once; `None`: no concurrency limit per key.
    pub fn concurrency(&self) -> Option<u32> {
        self.cell.concurrency
    }

    /// Requests of one account that may be in flight at once.
    pub fn account_concurrency(&self) -> Option<u32> {
        self.cell.account_concurrency
    }
}
