//! Several limits per cell: the fixed-capacity lists the request path
//! fills without allocating, and how accounts pool them.

use std::fmt;

use crate::limit::{Limit, MAX_LIMITS};

/// The largest concurrency limit a policy may set (requests in flight at
/// once per key or per account).
pub const MAX_CONCURRENCY: u32 = 1_000_000;

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
    /// ([`Identity::with_account`](crate::extract::Identity::with_account), or the
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

impl Default for LimitBuf {
    fn default() -> Self {
        Self::EMPTY
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

/// `limit` with its burst multiplied by `k`, keeping the window and its
/// period (at most one request per microsecond of it).
pub(crate) fn scale(l: Limit, k: f64) -> Limit {
    let most = (l.per().as_micros()).min(u128::from(u32::MAX)) as f64;
    let max = (f64::from(l.max()) * k).ceil().clamp(1.0, most) as u32;
    Limit::new(max.try_into().unwrap_or(std::num::NonZeroU32::MIN), l.per())
        .and_then(|n| n.with_period(l.period()))
        .unwrap_or(l)
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
/// and boosts: per key (or per account, in a pooled tier) and per account,
/// of requests and of tokens (all tokens, input tokens, output tokens).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Applied {
    pub(crate) per_key: LimitBuf,
    pub(crate) per_account: LimitBuf,
    pub(crate) per_org: LimitBuf,
    pub(crate) tokens: LimitBuf,
    pub(crate) account_tokens: LimitBuf,
    pub(crate) io: IoTokens<LimitBuf>,
}

/// Input and output token limits, per key (per account in a pooled tier)
/// and per account: four lists of one kind `L` (a cell's boxes, an
/// [`Applied`]'s buffers, borrowed slices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IoTokens<L> {
    pub(crate) input: L,
    pub(crate) output: L,
    pub(crate) account_input: L,
    pub(crate) account_output: L,
}

impl<L> IoTokens<L> {
    /// The same four lists through `f`.
    #[inline]
    pub(crate) fn map<'a, M>(&'a self, f: impl Fn(&'a L) -> M) -> IoTokens<M> {
        IoTokens {
            input: f(&self.input),
            output: f(&self.output),
            account_input: f(&self.account_input),
            account_output: f(&self.account_output),
        }
    }
}

impl IoTokens<&[Limit]> {
    /// Whether no input or output limit applies.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.input.is_empty()
            && self.output.is_empty()
            && self.account_input.is_empty()
            && self.account_output.is_empty()
    }

    /// How many limits there are.
    pub(crate) fn len(&self) -> usize {
        self.input.len() + self.output.len() + self.account_input.len() + self.account_output.len()
    }
}

impl Applied {
    /// Whether token limits apply.
    #[inline]
    pub(crate) fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || !self.account_tokens.is_empty() || self.has_io()
    }

    /// Whether input or output token limits apply.
    #[inline]
    fn has_io(&self) -> bool {
        !self.io.map(LimitBuf::as_slice).is_empty()
    }

    /// The lists, borrowed.
    #[inline]
    pub(crate) fn limits(&self) -> Limits<'_> {
        Limits {
            per_key: self.per_key.as_slice(),
            per_account: self.per_account.as_slice(),
            per_org: self.per_org.as_slice(),
            tokens: self.tokens.as_slice(),
            account_tokens: self.account_tokens.as_slice(),
            io: self.has_io().then(|| self.io.map(LimitBuf::as_slice)),
        }
    }
}

/// The limits that apply to one request, borrowed from its cell or from
/// an [`Applied`] on the stack (slices: nothing copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits<'a> {
    pub(crate) per_key: &'a [Limit],
    pub(crate) per_account: &'a [Limit],
    pub(crate) per_org: &'a [Limit],
    pub(crate) tokens: &'a [Limit],
    pub(crate) account_tokens: &'a [Limit],
    /// Input and output token limits; `None` when none applies (the
    /// common case, not looked at further).
    pub(crate) io: Option<IoTokens<&'a [Limit]>>,
}

impl Limits<'_> {
    /// Whether token limits apply.
    #[inline]
    pub(crate) fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || !self.account_tokens.is_empty() || self.io.is_some()
    }
}

/// The responses whose requests are refunded: their cost is given back to
/// every request limit they were charged to (a provider's own failure is
/// not the customer's). Off by default.
///
/// ```toml
/// [tiers.free]
/// refund_on = ["5xx", "304"]                            # every category of the tier
/// ai = { requests = "50/hour", refund_on = ["5xx"] }   # or one category
/// ```
///
/// ```
/// use tierlimit::policy::RefundOn;
///
/// let r = RefundOn::none().class(5).status(304);
/// assert!(r.matches(503) && r.matches(304) && !r.matches(404));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[must_use]
pub struct RefundOn {
    /// Bit `n` set: every `n`xx status.
    classes: u8,
    codes: [u16; 4],
    len: u8,
}

impl RefundOn {
    /// Refunds nothing.
    pub const fn none() -> Self {
        RefundOn {
            classes: 0,
            codes: [0; 4],
            len: 0,
        }
    }

    /// Also refunds every status of a class: `5` for 5xx (1 to 5; others
    /// are ignored).
    pub const fn class(mut self, hundreds: u8) -> Self {
        if hundreds >= 1 && hundreds <= 5 {
            self.classes |= 1 << hundreds;
        }
        self
    }

    /// Also refunds one status (up to four; more are ignored, use a class).
    pub const fn status(mut self, code: u16) -> Self {
        if (self.len as usize) < self.codes.len() {
            self.codes[self.len as usize] = code;
            self.len += 1;
        }
        self
    }

    /// Whether a response of `status` is refunded.
    #[inline]
    pub fn matches(&self, status: u16) -> bool {
        let class = status / 100;
        (class <= 7 && self.classes & (1 << class) != 0)
            || self.codes[..usize::from(self.len)].contains(&status)
    }

    /// Whether nothing is refunded.
    pub const fn is_empty(&self) -> bool {
        self.classes == 0 && self.len == 0
    }

    /// Parses `["5xx", "304"]`.
    pub(crate) fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut r = RefundOn::none();
        for item in items {
            let t = item.trim();
            let class = t
                .strip_suffix("xx")
                .or_else(|| t.strip_suffix("XX"))
                .and_then(|d| d.parse::<u8>().ok());
            match class {
                Some(c @ 1..=5) => r = r.class(c),
                _ => match t.parse::<u16>() {
                    Ok(code @ 100..=599) if usize::from(r.len) < r.codes.len() => {
                        r = r.status(code)
                    }
                    Ok(100..=599) => {
                        return Err(
                            "at most four single statuses; use a class such as \"5xx\"".into()
                        );
                    }
                    _ => {
                        return Err(format!(
                            "`{t}` is not a status such as \"304\" or a class such as \"5xx\""
                        ));
                    }
                },
            }
        }
        Ok(r)
    }
}
