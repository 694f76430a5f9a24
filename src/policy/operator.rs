//! Operator controls: per-key custom limits, temporary boosts, priority
//! reserves and shadow mode.

use std::fmt;

use super::{CategoryId, Limit, Rule, TierId};

/// How a custom limit or a boost changes a rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adjust {
    /// Replace the rule (a custom limit, or `Unlimited`).
    Set(Rule),
    /// Multiply the burst (`max`) by this factor, keeping the window: `x5`
    /// turns 100/hour into 500/hour. Unlimited stays unlimited.
    Scale(f64),
}

impl Adjust {
    /// The rule after the adjustment.
    pub fn apply(&self, rule: Rule) -> Rule {
        match (*self, rule) {
            (Adjust::Set(r), _) => r,
            (Adjust::Scale(_), Rule::Unlimited) => Rule::Unlimited,
            (Adjust::Scale(k), Rule::Limited(l)) => {
                let max = (f64::from(l.max()) * k)
                    .ceil()
                    .clamp(1.0, f64::from(u32::MAX)) as u32;
                Limit::new(max.try_into().unwrap_or(std::num::NonZeroU32::MIN), l.per())
                    .map_or(rule, Rule::Limited)
            }
        }
    }

    /// Parses `"5000/hour"`, `"unlimited"` or `"x5"` / `"x1.5"`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(k) = t.strip_prefix('x').or_else(|| t.strip_prefix('×')) {
            let k: f64 = k
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a multiplier such as x5"))?;
            if !(k.is_finite() && k > 0.0) {
                return Err(format!("the multiplier in `{s}` must be above 0"));
            }
            return Ok(Adjust::Scale(k));
        }
        Rule::parse(t).map(Adjust::Set)
    }
}

impl fmt::Display for Adjust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adjust::Set(r) => r.fmt(f),
            Adjust::Scale(k) => write!(f, "x{k}"),
        }
    }
}

/// Whether `a` lets more through than `b`.
pub(crate) fn more_generous(a: Rule, b: Rule) -> bool {
    match (a, b) {
        (Rule::Unlimited, Rule::Limited(_)) => true,
        (_, Rule::Unlimited) => false,
        (Rule::Limited(x), Rule::Limited(y)) => {
            // Compare rates (max/per), then bursts.
            let rx = u128::from(x.max()) * y.per().as_nanos();
            let ry = u128::from(y.max()) * x.per().as_nanos();
            rx > ry || (rx == ry && x.max() > y.max())
        }
    }
}

/// Who a boost applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoostTarget {
    /// One API key.
    Key(String),
    /// Every key of a tier.
    Tier(String),
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
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledBoost {
    pub(crate) key: Option<u64>,
    pub(crate) tier: Option<TierId>,
    pub(crate) category: Option<CategoryId>,
    pub(crate) adjust: Adjust,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl CompiledBoost {
    #[inline]
    pub(crate) fn applies(&self, key: u64, tier: TierId, category: CategoryId, now: u64) -> bool {
        now >= self.start
            && now < self.end
            && self.key.is_none_or(|k| k == key)
            && self.tier.is_none_or(|t| t == tier)
            && self.category.is_none_or(|c| c == category)
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

/// Parses `2026-12-01T00:00:00Z` (UTC, RFC 3339 without offsets other than
/// `Z` or `+00:00`) or a number of Unix seconds.
pub(crate) fn parse_time(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let err = || format!("`{s}` is not a UTC time such as 2026-12-01T00:00:00Z");
    let t = t
        .strip_suffix('Z')
        .or_else(|| t.strip_suffix("+00:00"))
        .ok_or_else(err)?;
    let (date, time) = t.split_once(['T', ' ']).ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    let h: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || h.len() != 3 {
        return Err(err());
    }
    let num = |x: &str| x.parse::<i64>().map_err(|_| err());
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (hh, mm, ss) = (
        num(h[0])?,
        num(h[1])?,
        num(h[2].split('.').next().unwrap_or(""))?,
    );
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || y < 1970
    {
        return Err(err());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + hh * 3600 + mm * 60 + ss) as u64)
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
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_time("tomorrow").is_err());
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
        assert!(Adjust::parse("xx").is_err());
        assert!(more_generous(Rule::Limited(Limit::per_minute(7)), base));
        assert!(more_generous(Rule::Unlimited, base));
        assert!(!more_generous(base, base));
    }
}
