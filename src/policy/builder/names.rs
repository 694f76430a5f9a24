//! The sections every other one refers to ([`Names`]: categories, tiers
//! and their cells), and the checks of names and lists of limits.

use super::{KeyRule, Located, PolicyError};
use crate::limit::{Limit, MAX_LIMITS, Per};
use crate::policy::{Adjust, CategoryId, Cell, TierId};

/// The sections validated first, which the others refer to.
pub(super) struct Names {
    pub(super) categories: Vec<Box<str>>,
    pub(super) tiers: Vec<Box<str>>,
    /// Tier-major: `cells[tier × categories + category]`.
    pub(super) cells: Vec<Cell>,
}

impl Names {
    pub(super) fn category(&self, name: &str) -> Option<CategoryId> {
        self.categories
            .iter()
            .position(|c| **c == *name)
            .map(|i| CategoryId(i as u16))
    }

    pub(super) fn tier(&self, name: &str) -> Option<TierId> {
        self.tiers
            .iter()
            .position(|t| **t == *name)
            .map(|i| TierId(i as u16))
    }

    pub(super) fn check_adjust(&self, adjust: &Adjust, per: Per) -> Result<(), String> {
        super::overrides::check_adjust(&self.cells, adjust, per)
    }

    /// Every request limit of a cell (per key, account, organisation).
    pub(super) fn limits(&self, tier: usize, category: usize) -> impl Iterator<Item = Limit> + '_ {
        let cell = &self.cells[tier * self.categories.len() + category];
        let shared = cell.per_account.iter().chain(cell.per_org.iter());
        cell.per_key.iter().chain(shared).copied()
    }

    /// A custom limit's category as an error may show it: as written when
    /// it is declared (or `*`) or a typo of a declared one, else `?` —
    /// custom limits grouped under a sub-table put a key where the
    /// category goes, and an error never shows a key.
    pub(super) fn shown_category<'a>(&self, cat: &'a str) -> &'a str {
        shown_category(cat, self.categories.iter().map(|c| &**c))
    }

    /// A `defaults.unknown_key` / `missing_key` rule: reject, or a tier.
    pub(super) fn key_rule(
        &self,
        rule: &Located<KeyRule>,
        entry: &str,
    ) -> Result<Option<TierId>, PolicyError> {
        match &rule.value {
            KeyRule::Reject => Ok(None),
            KeyRule::Tier(t) => self.tier(t).map(Some).ok_or_else(|| {
                PolicyError::new(
                    entry,
                    rule.line,
                    format!("unknown tier `{t}` (declared: {})", join(&self.tiers)),
                )
            }),
        }
    }
}

/// A custom limit's category as an error may show it: as written when it
/// is `*`, declared, or a typo of a declared one; else `?`.
pub(super) fn shown_category<'a, 'b>(
    cat: &'a str,
    mut declared: impl Iterator<Item = &'b str>,
) -> &'a str {
    let known = cat == "*" || declared.any(|c| c == cat || crate::policy::file::near(cat, c));
    if known { cat } else { "?" }
}

/// A list of limits for one cell: not empty, at most [`MAX_LIMITS`], no
/// two with the same window counted the same way (the smaller would make
/// the other pointless; a rolling day and a calendar day differ).
pub(super) fn check_list(limits: &[Limit]) -> Result<(), String> {
    if limits.is_empty() {
        return Err("an empty list of limits; write \"unlimited\" or at least one limit".into());
    }
    if limits.len() > MAX_LIMITS {
        return Err(format!("more than {MAX_LIMITS} limits in one list"));
    }
    for (i, a) in limits.iter().enumerate() {
        let same = |b: &Limit| b.per() == a.per() && b.period() == a.period();
        if limits[..i].iter().any(same) {
            return Err(format!(
                "two limits with the same window ({}); keep one",
                humantime_secs(a.per())
            ));
        }
    }
    Ok(())
}

fn humantime_secs(d: std::time::Duration) -> String {
    Limit::new(std::num::NonZeroU32::MIN, d).map_or_else(
        || format!("{d:?}"),
        |l| l.to_string().trim_start_matches("1 ").to_owned(),
    )
}

pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name may not be empty".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "`{name}` may only use letters, digits, `_`, `-` and `.`"
        ));
    }
    Ok(())
}

pub(super) fn join(names: &[Box<str>]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
