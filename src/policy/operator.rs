//! Operator controls: per-key custom limits, temporary boosts, priority
//! reserves and shadow mode.

use std::fmt;

use super::set::{Applied, LimitBuf, list_more_generous, scale, tightest};
use super::{CategoryId, Limit, Rule, TierId};
use crate::limit::Per;

/// How a custom limit or a boost changes a rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Adjust {
    /// Replace the per-key rule (a custom limit, or `Unlimited`).
    Set(Rule),
    /// Replace the per-key rule with several limits that all apply
    /// (`["100/second", "10000/hour"]` in a policy file).
    SetAll(Vec<Limit>),
    /// Multiply the burst (`max`) of the limits of the adjusted owner and
    /// of the owners within it by this factor, keeping each window: `x5`
    /// turns 100/hour into 500/hour. A key's scales its own limits (per
    /// key, of requests and of tokens, input and output ones too), an account's its keys' and its own, an
    /// organisation's and a tier's every limit — never a limit a wider
    /// owner shares, which is the same for every key that shares it.
    /// Unlimited stays unlimited.
    Scale(f64),
    /// Replace the per-key request limits (`Some(empty)`: unlimited) and
    /// token limits, each only if given (`{ requests = …, tokens = … }` in
    /// a policy file).
    Table {
        /// The request limits, if replaced.
        requests: Option<Vec<Limit>>,
        /// The token limits, if replaced.
        tokens: Option<Vec<Limit>>,
    },
}

impl Adjust {
    /// The rule after the adjustment (of a cell with one limit; a list
    /// gives its tightest limit).
    pub fn apply(&self, rule: Rule) -> Rule {
        match (self, rule) {
            (Adjust::Set(r), _) => *r,
            (Adjust::SetAll(ls), _) => tightest(ls).map_or(Rule::Unlimited, Rule::Limited),
            (Adjust::Table { requests: None, .. }, r) => r,
            (
                Adjust::Table {
                    requests: Some(ls), ..
                },
                _,
            ) => tightest(ls).map_or(Rule::Unlimited, Rule::Limited),
            (Adjust::Scale(_), Rule::Unlimited) => Rule::Unlimited,
            (Adjust::Scale(k), Rule::Limited(l)) => Rule::Limited(scale(l, *k)),
        }
    }

    /// The limits after a custom limit or boost of a key, an account or an
    /// organisation (`per`), or of a whole tier (`None`). A limit or list
    /// replaces that owner's own request limits (a key's or a tier's: the
    /// per-key ones; `tokens` its token limits, none for an organisation).
    /// A multiplier scales the limits of that owner and of the owners
    /// within it, never a wider one's: a limit shared by an account or an
    /// organisation is the same for every key that shares it (one bucket),
    /// so a key's `x5` leaves its account's and organisation's limits
    /// as they are; a tier's scales every limit.
    pub(crate) fn apply_at(&self, limits: &Applied, per: Option<Per>) -> Applied {
        let mut out = *limits;
        if let Adjust::Scale(k) = self {
            let reaches = |level: Per| per.is_none_or(|p| p >= level);
            out.per_key = limits.per_key.scaled(*k);
            out.tokens = limits.tokens.scaled(*k);
            out.io.input = limits.io.input.scaled(*k);
            out.io.output = limits.io.output.scaled(*k);
            if reaches(Per::Account) {
                out.per_account = limits.per_account.scaled(*k);
                out.account_tokens = limits.account_tokens.scaled(*k);
                out.io.account_input = limits.io.account_input.scaled(*k);
                out.io.account_output = limits.io.account_output.scaled(*k);
            }
            if reaches(Per::Org) {
                out.per_org = limits.per_org.scaled(*k);
            }
            return out;
        }
        let requests = match self {
            Adjust::Set(Rule::Unlimited) => Some(LimitBuf::EMPTY),
            Adjust::Set(Rule::Limited(l)) => Some(LimitBuf::from_slice(&[*l])),
            Adjust::SetAll(ls) => Some(LimitBuf::from_slice(ls)),
            Adjust::Table { requests, .. } => requests.as_deref().map(LimitBuf::from_slice),
            Adjust::Scale(_) => None,
        };
        let tokens = match self {
            Adjust::Table {
                tokens: Some(t), ..
            } => Some(LimitBuf::from_slice(t)),
            _ => None,
        };
        let (list, token_list) = match per.unwrap_or(Per::Key) {
            Per::Key => (&mut out.per_key, Some(&mut out.tokens)),
            Per::Account => (&mut out.per_account, Some(&mut out.account_tokens)),
            Per::Org => (&mut out.per_org, None),
        };
        if let Some(r) = requests {
            *list = r;
        }
        if let (Some(t), Some(slot)) = (tokens, token_list) {
            *slot = t;
        }
        out
    }

    /// The largest multiplier a policy file or the admin API accepts
    /// (`x1000`). A larger one is refused rather than capped: a burst
    /// multiplied beyond what a limit can hold (`u32::MAX` requests, or one
    /// per microsecond of its window) would be silently cut to that edge.
    pub const MAX_SCALE: f64 = 1000.0;

    /// Parses `"5000/hour"`, `"unlimited"` or `"x5"` / `"x1.5"` (a
    /// multiplier above 0 and at most [`MAX_SCALE`](Self::MAX_SCALE)).
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(k) = t.strip_prefix('x').or_else(|| t.strip_prefix('×')) {
            let k: f64 = k
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a multiplier such as x5"))?;
            if k.is_nan() || k <= 0.0 {
                return Err(format!("the multiplier in `{s}` must be above 0"));
            }
            if k > Self::MAX_SCALE {
                return Err(format!(
                    "the multiplier in `{s}` is too large: at most x{}",
                    Self::MAX_SCALE
                ));
            }
            return Ok(Adjust::Scale(k));
        }
        Rule::parse(t).map(Adjust::Set)
    }
}

/// `[100 per hour, 5 per second]`.
fn write_list(f: &mut fmt::Formatter<'_>, limits: &[Limit]) -> fmt::Result {
    f.write_str("[")?;
    for (i, l) in limits.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{l}")?;
    }
    f.write_str("]")
}

impl fmt::Display for Adjust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adjust::Set(r) => r.fmt(f),
            Adjust::SetAll(ls) => write_list(f, ls),
            Adjust::Scale(k) => write!(f, "x{k}"),
            Adjust::Table { requests, tokens } => {
                f.write_str("{")?;
                if let Some(r) = requests {
                    f.write_str(" requests = ")?;
                    write_list(f, r)?;
                }
                if let Some(t) = tokens {
                    f.write_str(" tokens = ")?;
                    write_list(f, t)?;
                }
                f.write_str(" }")
            }
        }
    }
}

/// Whether `a` lets more through than `b`.
#[cfg(test)]
pub(crate) fn more_generous(a: Rule, b: Rule) -> bool {
    match (a, b) {
        (Rule::Unlimited, Rule::Limited(_)) => true,
        (_, Rule::Unlimited) => false,
        (Rule::Limited(x), Rule::Limited(y)) => super::set::more_generous_limit(x, y),
    }
}

/// Whether the limits `a` let more through than `b`: request limits per
/// key first, then per account, per organisation, then token limits (each list by its
/// tightest limit); the first that differs decides.
pub(crate) fn more_generous_all(a: &Applied, b: &Applied) -> bool {
    let pairs = [
        (a.per_key.as_slice(), b.per_key.as_slice()),
        (a.per_account.as_slice(), b.per_account.as_slice()),
        (a.per_org.as_slice(), b.per_org.as_slice()),
        (a.tokens.as_slice(), b.tokens.as_slice()),
        (a.account_tokens.as_slice(), b.account_tokens.as_slice()),
        (a.io.input.as_slice(), b.io.input.as_slice()),
        (a.io.output.as_slice(), b.io.output.as_slice()),
        (a.io.account_input.as_slice(), b.io.account_input.as_slice()),
        (
            a.io.account_output.as_slice(),
            b.io.account_output.as_slice(),
        ),
    ];
    for (x, y) in pairs {
        if list_more_generous(x, y) {
            return true;
        }
        if list_more_generous(y, x) {
            return false;
        }
    }
    false
}

/// Who a boost applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoostTarget {
    /// One API key.
    Key(String),
    /// Every key of a tier.
    Tier(String),
    /// Every key of an account (a limit or list replaces the account's own
    /// limits).
    Account(String),
    /// Every key of an organisation (a limit or list replaces the
    /// organisation's own limits).
    Org(String),
}

/// A temporary boost: an adjustment that applies only between `start` and
/// `end` (Unix seconds), and lapses by itself.
///
/// ```
/// use tierlimit::policy::{Adjust, Boost, BoostTarget};
///
/// // Triple the pro tier's AI limit for a launch day.
/// let launch = Boost::new(BoostTarget::Tier("pro".into()), Adjust::Scale(3.0), 1_796_083_200, 1_796_169_600)
///     .category("ai");
/// # let _ = launch;
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Boost {
    pub(crate) target: BoostTarget,
    pub(crate) category: Option<String>,
    pub(crate) adjust: Adjust,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) line: Option<usize>,
}

impl Boost {
    /// A boost for every category, active from `start` until `end` (Unix
    /// seconds, `end` excluded).
    pub fn new(target: BoostTarget, adjust: Adjust, start: u64, end: u64) -> Self {
        Boost {
            target,
            category: None,
            adjust,
            start,
            end,
            line: None,
        }
    }

    /// Restricts the boost to one category.
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }

    /// Records the line the boost was written on (for the loader).
    pub(crate) fn at(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledBoost {
    /// The key, account or organisation boosted (`None`: a tier's).
    pub(crate) owner: Option<(u64, Per)>,
    pub(crate) tier: Option<TierId>,
    pub(crate) category: Option<CategoryId>,
    pub(crate) adjust: Adjust,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl CompiledBoost {
    #[inline]
    pub(crate) fn applies(&self, who: Who, tier: TierId, category: CategoryId, now: u64) -> bool {
        now >= self.start
            && now < self.end
            && self.owner.is_none_or(|(id, per)| who.is(id, per))
            && self.tier.is_none_or(|t| t == tier)
            && self.category.is_none_or(|c| c == category)
    }

    /// Whose boost this is: a key's, an account's or an organisation's
    /// (`None`: a tier's).
    pub(crate) fn per(&self) -> Option<Per> {
        self.owner.map(|(_, per)| per)
    }
}

/// Whom a request's custom limits and boosts are looked up for: its key,
/// and its account and organisation if it has them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Who {
    pub(crate) key: u64,
    pub(crate) account: Option<u64>,
    pub(crate) org: Option<u64>,
}

impl Who {
    /// A key in no account or organisation.
    pub(crate) const fn key(key: u64) -> Self {
        Who {
            key,
            account: None,
            org: None,
        }
    }

    /// Whether `id` is this request's owner at level `per`.
    #[inline]
    fn is(self, id: u64, per: Per) -> bool {
        match per {
            Per::Key => self.key == id,
            Per::Account => self.account == Some(id),
            Per::Org => self.org == Some(id),
        }
    }
}

/// Where shadow mode applies: decisions are made and headers sent, but
/// nothing is refused; would-be refusals are counted and logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Shadow {
    pub(crate) all: bool,
    pub(crate) tiers: Vec<String>,
    pub(crate) categories: Vec<String>,
}

impl Shadow {
    /// Shadow mode everywhere.
    pub fn all() -> Self {
        Shadow {
            all: true,
            ..Shadow::default()
        }
    }

    /// Shadow mode for every request of these tiers.
    pub fn tiers<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tiers: I) -> Self {
        self.tiers.extend(tiers.into_iter().map(Into::into));
        self
    }

    /// Shadow mode for every request in these categories.
    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(mut self, categories: I) -> Self {
        self.categories
            .extend(categories.into_iter().map(Into::into));
        self
    }
}

/// The latest time a boost may name: the end of year 9999 (UTC).
pub(crate) const MAX_UNIX: u64 = 253_402_300_799;

/// Parses an RFC 3339 time with an offset (`2026-12-01T00:00:00Z`,
/// `2026-12-01T09:00:00+09:00`) through `jiff`, which refuses impossible
/// dates such as `2026-02-31`, or a number of Unix seconds; either must lie
/// between 1970 and the end of 9999.
pub(crate) fn parse_time(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let range = || format!("`{s}` is outside the years 1970 to 9999");
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<u64>() {
            Ok(n) if n <= MAX_UNIX => Ok(n),
            _ => Err(range()),
        };
    }
    let ts: jiff::Timestamp = t.parse().map_err(|e: jiff::Error| {
        format!("`{s}` is not a time such as 2026-12-01T00:00:00Z: {e}")
    })?;
    u64::try_from(ts.as_second())
        .ok()
        .filter(|&n| n <= MAX_UNIX)
        .ok_or_else(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_time("2026-12-01T00:00:00Z").unwrap(), 1_796_083_200);
        assert_eq!(parse_time("2024-02-29T12:30:15Z").unwrap(), 1_709_209_815);
        assert_eq!(parse_time("1796083200").unwrap(), 1_796_083_200);
        assert_eq!(
            parse_time("2026-12-01T09:00:00+09:00").unwrap(),
            1_796_083_200
        );
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_time("tomorrow").is_err());
        // Impossible dates are refused, not rolled into the next month.
        for bad in [
            "2026-02-31T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "999999999-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-12-01T00:00:00", // no offset: which zone?
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_time("2028-02-29T00:00:00Z").is_ok());
        assert!(parse_time("253402300799").is_ok());
        assert!(parse_time("253402300800").unwrap_err().contains("9999"));
        assert!(parse_time("99999999999999999999999").is_err());
    }

    #[test]
    fn adjustments() {
        let base = Rule::Limited(Limit::per_hour(100));
        assert_eq!(
            Adjust::parse("x5").unwrap().apply(base),
            Rule::Limited(Limit::per_hour(500))
        );
        assert_eq!(
            Adjust::parse("x1.5").unwrap().apply(base),
            Rule::Limited(Limit::per_hour(150))
        );
        assert_eq!(
            Adjust::parse("7/minute").unwrap().apply(base),
            Rule::Limited(Limit::per_minute(7))
        );
        assert_eq!(
            Adjust::parse("unlimited").unwrap().apply(base),
            Rule::Unlimited
        );
        assert!(Adjust::parse("x0").is_err());
        assert!(Adjust::parse("x1000").is_ok());
        for big in ["x1000.5", "x18446744073709551615", "x1e300", "xinf", "xNaN"] {
            assert!(Adjust::parse(big).is_err(), "{big}");
        }
        assert!(Adjust::parse("xx").is_err());
        assert!(more_generous(Rule::Limited(Limit::per_minute(7)), base));
        assert!(more_generous(Rule::Unlimited, base));
        assert!(!more_generous(base, base));
    }
}
