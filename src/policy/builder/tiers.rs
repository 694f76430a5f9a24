//! The `[tiers.*]` sections: each tier's cells, one per category. Every
//! kind of a tier's entries (rules, per-account limits, tokens — all,
//! input, output —, refunds, concurrency) goes through one loop, [`Tier::each_entry`]: find the
//! category, check the value, refuse a second entry, store.

use super::names::{check_list, check_name, join};
use super::{Located, PolicyBuilder, PolicyError, Tier};
use crate::limit::{Limit, MAX_LIMITS, Per};
use crate::meter::TokenKind;
use crate::policy::{Cell, IoTokens, MAX_CONCURRENCY, Metering, RefundOn};

impl PolicyBuilder {
    /// The `[tiers.*]` sections: each tier's name, then its cells, one per
    /// category in order (tier-major).
    pub(super) fn build_tiers(
        &self,
        categories: &[Box<str>],
    ) -> Result<(Vec<Box<str>>, Vec<Cell>), PolicyError> {
        if self.tiers.is_empty() {
            return Err(PolicyError::new(
                "tiers",
                None,
                "at least one tier is needed",
            ));
        }
        let mut tier_names: Vec<Box<str>> = Vec::with_capacity(self.tiers.len());
        let mut cells: Vec<Cell> = Vec::with_capacity(self.tiers.len() * categories.len());
        for tier in &self.tiers {
            let entry = format!("tiers.{}", tier.name);
            check_name(&tier.name).map_err(|m| PolicyError::new(&entry, tier.line, m))?;
            if tier_names.iter().any(|t| **t == *tier.name) {
                return Err(PolicyError::new(
                    &entry,
                    tier.line,
                    format!("tier `{}` is declared twice", tier.name),
                ));
            }
            let table = tier.table(categories)?;
            cells.extend(table.into_cells(tier, categories)?);
            tier_names.push(tier.name.as_str().into());
        }
        if tier_names.len() > usize::from(u16::MAX) {
            return Err(PolicyError::new("tiers", None, "too many tiers"));
        }
        Ok((tier_names, cells))
    }
}

/// A tier's entries by category, as its cells will hold them.
struct Table {
    /// Per-key limits (`None`: unlimited).
    rules: Vec<Option<Vec<Limit>>>,
    /// Whether the tier gives each category a rule.
    set: Vec<bool>,
    per_account: Vec<Vec<Limit>>,
    per_org: Vec<Vec<Limit>>,
    /// Token limits by kind (all, input, output): per key, per account.
    tokens: Vec<[[Vec<Limit>; 2]; 3]>,
    refunds: Vec<RefundOn>,
    /// Concurrency limits: per key, per account.
    concurrency: Vec<[Option<u32>; 2]>,
}

/// One kind of a tier's entries by category (rules, per-account limits,
/// tokens, refunds, concurrency): how [`Tier::each_entry`] reads and
/// names them.
struct Kind<T> {
    /// The entry's last part, after the category (`tokens`); `None`: the
    /// category is the last part.
    what: Option<&'static str>,
    /// An entry's category, and whom it is counted per.
    slot: fn(&T) -> (&str, Per),
    /// Refuses a value on its own (before the check for a second entry).
    check: fn(&T) -> Result<(), String>,
    /// The error for a second entry of one category and slot, given the
    /// tier's and the category's names; `None`: the last entry counts.
    twice: Option<fn(&str, &str) -> String>,
}

/// A key's or an account's entry (`per_account`).
fn key_or_account(per_account: bool) -> Per {
    if per_account { Per::Account } else { Per::Key }
}

/// Where an entry of limits counted per `per` is written in its tier.
fn section(per: Per) -> &'static str {
    match per {
        Per::Key => "",
        Per::Account => ".per_account",
        Per::Org => ".per_org",
    }
}

fn any<T>(_: &T) -> Result<(), String> {
    Ok(())
}

impl Tier {
    /// The one loop every kind of the tier's entries goes through. For
    /// each entry, in order: its category must be declared; `kind.check`
    /// must accept its value; it must be the first of its category and
    /// slot (per key, account or organisation) unless `kind.twice` is
    /// `None`; then `store` keeps it, and may still refuse it (a cell's
    /// total). An error names the entry
    /// (`tiers.<tier>[.per_account|.per_org].<category>[.<what>]`) and its
    /// line. Returns the categories and slots set.
    fn each_entry<'t, T>(
        &self,
        categories: &[Box<str>],
        entries: &'t [Located<T>],
        kind: Kind<T>,
        mut store: impl FnMut(&'t T, usize) -> Result<(), String>,
    ) -> Result<Vec<[bool; 3]>, PolicyError> {
        let mut seen = vec![[false; 3]; categories.len()];
        for Located { value, line } in entries {
            let (cat, per) = (kind.slot)(value);
            let entry = format!(
                "tiers.{}{}.{cat}{}",
                self.name,
                section(per),
                kind.what.map_or(String::new(), |w| format!(".{w}")),
            );
            let err = |m: String| PolicyError::new(&entry, *line, m);
            let id = categories.iter().position(|c| **c == *cat).ok_or_else(|| {
                err(format!(
                    "unknown category `{cat}` (declared: {})",
                    join(categories)
                ))
            })?;
            (kind.check)(value).map_err(&err)?;
            let again = std::mem::replace(&mut seen[id][per as usize], true);
            if let (true, Some(twice)) = (again, kind.twice) {
                return Err(err(twice(&self.name, cat)));
            }
            store(value, id).map_err(&err)?;
        }
        Ok(seen)
    }

    /// Every entry of the tier, checked, by category.
    fn table(&self, categories: &[Box<str>]) -> Result<Table, PolicyError> {
        let n = categories.len();
        let refund = self
            .refund_on
            .as_ref()
            .map_or(RefundOn::none(), |r| r.value);
        let mut t = Table {
            rules: vec![None; n],
            set: Vec::new(),
            per_account: vec![Vec::new(); n],
            per_org: vec![Vec::new(); n],
            tokens: vec![Default::default(); n],
            refunds: vec![refund; n],
            concurrency: vec![[None, None]; n],
        };
        t.set = self.read_rules(categories, &mut t)?;
        self.read_per_account(categories, &mut t)?;
        self.read_per_org(categories, &mut t)?;
        for kind in [TokenKind::Total, TokenKind::Input, TokenKind::Output] {
            self.read_tokens(categories, &mut t, kind)?;
        }
        self.read_refunds(categories, &mut t)?;
        self.read_concurrency(categories, &mut t)?;
        Ok(t)
    }

    /// `tiers.<tier>.<category>`: the per-key limits, or unlimited.
    fn read_rules(&self, categories: &[Box<str>], t: &mut Table) -> Result<Vec<bool>, PolicyError> {
        let seen = self.each_entry(
            categories,
            &self.rules,
            Kind {
                what: None,
                slot: |(c, _)| (c, Per::Key),
                check: any,
                twice: Some(|t, c| format!("tier `{t}` sets `{c}` twice")),
            },
            |(_, limits), id| {
                if let Some(limits) = limits {
                    check_list(limits)?;
                }
                t.rules[id] = limits.clone();
                Ok(())
            },
        )?;
        Ok(seen.into_iter().map(|[key, ..]| key).collect())
    }

    /// `tiers.<tier>.per_account.<category>`.
    fn read_per_account(&self, categories: &[Box<str>], t: &mut Table) -> Result<(), PolicyError> {
        self.each_entry(
            categories,
            &self.per_account,
            Kind {
                what: None,
                slot: |(c, _)| (c, Per::Account),
                check: any,
                twice: Some(|t, c| format!("tier `{t}` sets per-account `{c}` twice")),
            },
            |(cat, limits), id| {
                check_list(limits)?;
                t.per_account[id] = limits.clone();
                t.fits(id, cat)
            },
        )?;
        Ok(())
    }

    /// `tiers.<tier>.per_org.<category>`.
    fn read_per_org(&self, categories: &[Box<str>], t: &mut Table) -> Result<(), PolicyError> {
        self.each_entry(
            categories,
            &self.per_org,
            Kind {
                what: None,
                slot: |(c, _)| (c, Per::Org),
                check: any,
                twice: Some(|t, c| format!("tier `{t}` sets per-organisation `{c}` twice")),
            },
            |(cat, limits), id| {
                check_list(limits)?;
                t.per_org[id] = limits.clone();
                t.fits(id, cat)
            },
        )?;
        Ok(())
    }

    /// `tiers.<tier>[.per_account].<category>.tokens` (`input_tokens`,
    /// `output_tokens`: by `kind`).
    fn read_tokens(
        &self,
        categories: &[Box<str>],
        t: &mut Table,
        kind: TokenKind,
    ) -> Result<(), PolicyError> {
        let (entries, what, twice): (_, _, fn(&str, &str) -> String) = match kind {
            TokenKind::Total => (&self.tokens, "tokens", |t, c| {
                format!("tier `{t}` sets `{c}`'s tokens twice")
            }),
            TokenKind::Input => (&self.input_tokens, "input_tokens", |t, c| {
                format!("tier `{t}` sets `{c}`'s input tokens twice")
            }),
            TokenKind::Output => (&self.output_tokens, "output_tokens", |t, c| {
                format!("tier `{t}` sets `{c}`'s output tokens twice")
            }),
        };
        self.each_entry(
            categories,
            entries,
            Kind {
                what: Some(what),
                slot: |(c, _, per_account)| (c, key_or_account(*per_account)),
                check: any,
                twice: Some(twice),
            },
            |(cat, limits, acct), id| {
                check_list(limits)?;
                t.tokens[id][kind as usize][usize::from(*acct)] = limits.clone();
                t.fits(id, cat)
            },
        )?;
        Ok(())
    }

    /// `tiers.<tier>.<category>.refund_on` (the last one counts).
    fn read_refunds(&self, categories: &[Box<str>], t: &mut Table) -> Result<(), PolicyError> {
        self.each_entry(
            categories,
            &self.refunds,
            Kind {
                what: Some("refund_on"),
                slot: |(c, _)| (c, Per::Key),
                check: any,
                twice: None,
            },
            |(_, refund), id| {
                t.refunds[id] = *refund;
                Ok(())
            },
        )?;
        Ok(())
    }

    /// `tiers.<tier>[.per_account].<category>.concurrency`.
    fn read_concurrency(&self, categories: &[Box<str>], t: &mut Table) -> Result<(), PolicyError> {
        self.each_entry(categories, &self.concurrency, Kind {
            what: Some("concurrency"),
            slot: |(c, _, per_account)| (c, key_or_account(*per_account)),
            check: |(_, n, _)| {
                if *n == 0 || *n > MAX_CONCURRENCY {
                    return Err(format!(
                        "a concurrency limit is a number of requests from 1 to {MAX_CONCURRENCY}"
                    ));
                }
                Ok(())
            },
            twice: Some(|t, c| format!("tier `{t}` sets `{c}`'s concurrency twice")),
        }, |(_, n, acct), id| {
            t.concurrency[id][usize::from(*acct)] = Some(*n);
            Ok(())
        })?;
        Ok(())
    }
}

impl Table {
    /// Refuses a category with more limits than a check holds: requests
    /// per key, account and organisation, and tokens, together.
    fn fits(&self, id: usize, cat: &str) -> Result<(), String> {
        let total = self.rules[id].as_ref().map_or(0, Vec::len)
            + self.per_account[id].len()
            + self.per_org[id].len()
            + self.tokens[id]
                .iter()
                .flatten()
                .map(Vec::len)
                .sum::<usize>();
        if total > MAX_LIMITS {
            return Err(format!(
                "`{cat}` has more than {MAX_LIMITS} limits (of requests per key, per account and per organisation, and of tokens) together"
            ));
        }
        Ok(())
    }

    /// The tier's cells, one per category in order; every category must
    /// have a rule.
    fn into_cells(self, tier: &Tier, categories: &[Box<str>]) -> Result<Vec<Cell>, PolicyError> {
        let Table {
            rules,
            set,
            mut per_account,
            mut per_org,
            mut tokens,
            refunds,
            concurrency,
        } = self;
        let mut cells = Vec::with_capacity(categories.len());
        for (i, rule) in rules.into_iter().enumerate() {
            if !set[i] {
                return Err(PolicyError::new(
                    format!("tiers.{}", tier.name),
                    tier.line,
                    format!(
                        "tier `{}` has no rule for category `{}`; give a limit such as \"100/hour\" or \"unlimited\"",
                        tier.name, categories[i]
                    ),
                ));
            }
            let [
                [key_tokens, account_tokens],
                [input, account_input],
                [output, account_output],
            ] = std::mem::take(&mut tokens[i]);
            cells.push(Cell::new(
                rule.unwrap_or_default(),
                [
                    std::mem::take(&mut per_account[i]),
                    std::mem::take(&mut per_org[i]),
                ],
                Metering {
                    tokens: key_tokens,
                    account_tokens,
                    io: IoTokens {
                        input,
                        output,
                        account_input,
                        account_output,
                    },
                    refund: refunds[i],
                    concurrency: concurrency[i][0],
                    account_concurrency: concurrency[i][1],
                },
                tier.pool.value,
                &tier.name,
                &categories[i],
            ));
        }
        Ok(cells)
    }
}
