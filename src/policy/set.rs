//! Several limits per cell: the fixed-capacity lists the request path
//! fills without allocating, and how accounts pool them.

use std::fmt;

use super::Limit;

/// The most limits one request is checked against in one category: its
/// per-key limits and its account's together. A policy that asks for more
/// is refused when it is built.
pub const MAX_LIMITS: usize = 8;

/// Whose count a tier's limits are kept in.
///
/// ```toml
/// [tiers.pro]
/// pool = "account"   # every key of an account shares the account's limits
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pool {
    /// Each API key has its own limits (the default).
    #[default]
    Key,
    /// The limits are shared by every key of an account
    /// ([`Identity::with_account`](crate::Identity::with_account), or the
    /// `account` of a `[keys]` entry). A key without an account is its
    /// own account.
    Account,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pool::Key => "key",
            Pool::Account => "account",
        })
    }
}

/// Up to [`MAX_LIMITS`] limits, inline (the request path fills one on the
/// stack when custom limits or boosts apply).
#[derive(Clone, Copy)]
pub(crate) struct LimitBuf {
    items: [Limit; MAX_LIMITS],
    len: u8,
}

impl fmt::Debug for LimitBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl LimitBuf {
    pub(crate) const EMPTY: LimitBuf = LimitBuf {
        items: [Limit::per_second(1); MAX_LIMITS],
        len: 0,
    };

    /// The first `MAX_LIMITS` of `limits` (policies are validated to fit).
    pub(crate) fn from_slice(limits: &[Limit]) -> Self {
        let mut b = Self::EMPTY;
        for l in limits {
            b.push(*l);
        }
        b
    }

    /// Appends `limit`; `false` (and nothing changes) when full.
    pub(crate) fn push(&mut self, limit: Limit) -> bool {
        match self.items.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = limit;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[Limit] {
        &self.items[..usize::from(self.len)]
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every limit's burst multiplied by `k` (see [`Adjust::Scale`](super::Adjust::Scale)).
    pub(crate) fn scaled(&self, k: f64) -> Self {
        let mut b = *self;
        for l in &mut b.items[..usize::from(self.len)] {
            *l = scale(*l, k);
        }
        b
    }
}

/// `limit` with its burst multiplied by `k`, keeping the window (at most
/// one request per microsecond of it).
pub(crate) fn scale(l: Limit, k: f64) -> Limit {
    let most = (l.per().as_micros()).min(u128::from(u32::MAX)) as f64;
    let max = (f64::from(l.max()) * k).ceil().clamp(1.0, most) as u32;
    Limit::new(max.try_into().unwrap_or(std::num::NonZeroU32::MIN), l.per()).unwrap_or(l)
}

/// The limit of a list that lets the least through over time: the lowest
/// rate (`max / per`), then the smallest burst. `None` for an empty
/// (unlimited) list.
pub(crate) fn tightest(limits: &[Limit]) -> Option<Limit> {
    limits
        .iter()
        .copied()
        .reduce(|a, b| if more_generous_limit(a, b) { b } else { a })
}

/// Whether `a` lets more through than `b`: a higher rate, or the same
/// rate with a larger burst.
pub(crate) fn more_generous_limit(a: Limit, b: Limit) -> bool {
    let ra = u128::from(a.max()) * b.per().as_nanos();
    let rb = u128::from(b.max()) * a.per().as_nanos();
    ra > rb || (ra == rb && a.max() > b.max())
}

/// Whether list `a` lets more through than list `b` (an empty list is
/// unlimited): compared by their tightest limits.
pub(crate) fn list_more_generous(a: &[Limit], b: &[Limit]) -> bool {
    match (tightest(a), tightest(b)) {
        (None, Some(_)) => true,
        (_, None) => false,
        (Some(x), Some(y)) => more_generous_limit(x, y),
    }
}

/// The limits that apply to one request in one cell, after custom limits
/// and boosts: per key (or per account, in a pooled tier) and per account.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Applied {
    pub(crate) per_key: LimitBuf,
    pub(crate) per_account: LimitBuf,
}
