//! Operator controls in the policy: priority reserves, custom limits
//! (`[custom_limits]`) and boosts, and the check every adjustment passes.

use std::collections::HashMap;

use super::keys::check_key;
use super::names::{Names, check_list, join};
use super::{Located, Override, PolicyBuilder, PolicyError};
use crate::key::KeyId;
use crate::limit::{Limit, MAX_LIMITS, Per};
use crate::policy::operator::{CompiledBoost, MAX_UNIX};
use crate::policy::overlay::{OverrideParts, OverrideSources};
use crate::policy::{Adjust, BoostTarget, Cell};

/// Custom limits by key hash: one optional adjustment per category.
pub(in crate::policy) type Overrides =
    HashMap<u64, Box<[Option<Adjust>]>, foldhash::fast::RandomState>;

impl PolicyBuilder {
    pub(super) fn build_reserves(&self, names: &Names) -> Result<Vec<u8>, PolicyError> {
        let mut reserves = Vec::with_capacity(self.tiers.len());
        for (t, tier) in self.tiers.iter().enumerate() {
            let Some(Located { value: p, line }) = tier.reserve else {
                reserves.push(0);
                continue;
            };
            let entry = format!("tiers.{}.priority_reserve", tier.name);
            let line = line.or(tier.line);
            if p >= 100 {
                return Err(PolicyError::new(
                    entry,
                    line,
                    format!("a reserve of {p}% leaves nothing for normal requests; use 1 to 99"),
                ));
            }
            // Every limited cell of the tier must leave normal requests at
            // least one request of its burst.
            for (c, cat) in names.categories.iter().enumerate() {
                if let Some(l) = names
                    .limits(t, c)
                    .find(|l| reserve_of(l.max(), p) >= l.max())
                {
                    return Err(PolicyError::new(
                        entry,
                        line,
                        format!(
                            "a reserve of {p}% of `{cat}`'s limit of {} leaves nothing for normal requests; raise the limit or lower the reserve",
                            l.max()
                        ),
                    ));
                }
            }
            reserves.push(p);
        }
        Ok(reserves)
    }

    pub(super) fn build_overrides(
        &self,
        names: &Names,
    ) -> Result<(Overrides, OverrideSources), PolicyError> {
        let ncat = names.categories.len();
        let mut overrides = Overrides::default();
        let mut sources = OverrideSources::default();
        for Located {
            value:
                Override {
                    key,
                    per,
                    category: cat,
                    adjust,
                },
            line,
        } in &self.overrides
        {
            let shown = names.shown_category(cat);
            let (entry, id) = match per {
                Per::Key => {
                    let entry = format!("custom_limits.\"{}\".{shown}", KeyId::of(key).redacted());
                    check_key(key, &entry, *line)?;
                    (entry, KeyId::of(key))
                }
                Per::Account | Per::Org => {
                    let entry = format!("{}.\"{key}\".{shown}", per.limits_section());
                    per.check_name(key)
                        .map_err(|m| PolicyError::new(&entry, *line, m))?;
                    (entry, per.id_of(key))
                }
            };
            names
                .check_adjust(adjust, *per)
                .map_err(|m| PolicyError::new(&entry, *line, m))?;
            let cells = overrides
                .entry(id.as_u64())
                .or_insert_with(|| vec![None; ncat].into_boxed_slice());
            let parts = sources.entry(id.as_u64()).or_insert_with(|| OverrideParts {
                specific: vec![None; ncat].into_boxed_slice(),
                star: None,
            });
            if cat == "*" {
                for c in cells.iter_mut().filter(|c| c.is_none()) {
                    *c = Some(adjust.clone());
                }
                parts.star.get_or_insert_with(|| adjust.clone());
            } else {
                let id = names.category(cat).ok_or_else(|| {
                    PolicyError::new(
                        &entry,
                        *line,
                        format!(
                            "unknown category `{shown}` (declared: {})",
                            join(&names.categories)
                        ),
                    )
                })?;
                cells[id.index()] = Some(adjust.clone());
                parts.specific[id.index()] = Some(adjust.clone());
            }
        }
        Ok((overrides, sources))
    }

    pub(super) fn build_boosts(&self, names: &Names) -> Result<Vec<CompiledBoost>, PolicyError> {
        let mut boosts = Vec::with_capacity(self.boosts.len());
        for (i, b) in self.boosts.iter().enumerate() {
            let entry = format!("boosts[{i}]");
            let err = |m: String| PolicyError::new(&entry, b.line, m);
            if b.start >= b.end {
                return Err(err("a boost must start before it ends".into()));
            }
            if b.end > MAX_UNIX {
                return Err(err("a boost must end by the end of year 9999".into()));
            }
            let (owner, tier) = match &b.target {
                BoostTarget::Key(k) => {
                    check_key(k, &entry, b.line)?;
                    (Some((KeyId::of(k).as_u64(), Per::Key)), None)
                }
                BoostTarget::Account(name) | BoostTarget::Org(name) => {
                    let per = match &b.target {
                        BoostTarget::Org(_) => Per::Org,
                        _ => Per::Account,
                    };
                    per.check_name(name).map_err(err)?;
                    (Some((per.id_of(name).as_u64(), per)), None)
                }
                BoostTarget::Tier(t) => (
                    None,
                    Some(names.tier(t).ok_or_else(|| {
                        err(format!(
                            "unknown tier `{t}` (declared: {})",
                            join(&names.tiers)
                        ))
                    })?),
                ),
            };
            let per = owner.map_or(Per::Key, |(_, per)| per);
            names.check_adjust(&b.adjust, per).map_err(err)?;
            let category = match &b.category {
                None => None,
                Some(c) => Some(names.category(c).ok_or_else(|| {
                    err(format!(
                        "unknown category `{c}` (declared: {})",
                        join(&names.categories)
                    ))
                })?),
            };
            boosts.push(CompiledBoost {
                owner,
                tier,
                category,
                adjust: b.adjust.clone(),
                start: b.start,
                end: b.end,
            });
        }
        Ok(boosts)
    }
}

/// A list given by a custom limit or a boost of a key, an account or an
/// organisation (`per`) must fit beside every tier's other limits
/// (`cells`: every cell of the policy); an organisation's takes request
/// limits only.
pub(in crate::policy) fn check_adjust(
    cells: &[Cell],
    adjust: &Adjust,
    per: Per,
) -> Result<(), String> {
    if let (
        Per::Org,
        Adjust::Table {
            tokens: Some(_), ..
        },
    ) = (per, adjust)
    {
        return Err(
            "an organisation's custom limit takes request limits only, no `tokens`".to_owned(),
        );
    }
    let (requests, tokens) = match adjust {
        Adjust::SetAll(limits) => (Some(limits.as_slice()), None),
        Adjust::Table { requests, tokens } => (requests.as_deref(), tokens.as_deref()),
        Adjust::Scale(k) if !(*k > 0.0 && *k <= Adjust::MAX_SCALE) => {
            return Err(format!(
                "a multiplier is above 0 and at most x{}",
                Adjust::MAX_SCALE
            ));
        }
        Adjust::Set(_) | Adjust::Scale(_) => return Ok(()),
    };
    if let Some(r) = requests.filter(|r| !r.is_empty()) {
        check_list(r)?;
    }
    if let Some(t) = tokens {
        check_list(t)?;
    }
    let replaced = |list: &[Limit], at: Per| match (per == at, requests) {
        (true, Some(r)) => r.len(),
        _ => list.len(),
    };
    let too_many = cells.iter().any(|c| {
        let (key_tokens, account_tokens) = match per {
            Per::Account => (
                c.tokens.len(),
                tokens.map_or(c.account_tokens.len(), <[Limit]>::len),
            ),
            _ => (
                tokens.map_or(c.tokens.len(), <[Limit]>::len),
                c.account_tokens.len(),
            ),
        };
        replaced(&c.per_key, Per::Key)
            + replaced(&c.per_account, Per::Account)
            + replaced(&c.per_org, Per::Org)
            + key_tokens
            + account_tokens
            + c.io.map(|l| &**l).len()
            > MAX_LIMITS
    });
    if too_many {
        return Err(format!(
            "with the per-account and per-organisation limits, more than {MAX_LIMITS} limits would apply"
        ));
    }
    Ok(())
}

/// The requests of a burst of `max` that a reserve of `pct` percent keeps
/// for critical requests (rounded up).
pub(crate) fn reserve_of(max: u32, pct: u8) -> u32 {
    (u64::from(max) * u64::from(pct)).div_ceil(100) as u32
}
