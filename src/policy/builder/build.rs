//! [`PolicyBuilder::build`]: every section validated in turn, the first
//! mistake returned, naming its entry; then the policy put together.

use std::sync::Arc;

use hashbrown::HashTable;

use super::names::{Names, check_name, join};
use super::{Located, PolicyBuilder, PolicyError};
use crate::key::KeyId;
use crate::policy::{Policy, PolicyInner};

impl PolicyBuilder {
    /// Validates everything and builds the policy, one section at a time;
    /// the first mistake is returned, naming its entry.
    pub fn build(self) -> Result<Policy, PolicyError> {
        let categories = self.build_categories()?;
        let (tiers, cells) = self.build_tiers(&categories)?;
        let mut names = Names {
            categories,
            tiers,
            cells,
        };
        let routes = self.build_routes(&names)?;
        let default_read =
            self.default_category(self.default_read.as_ref(), "read", "defaults.read", &names)?;
        let default_write = self.default_category(
            self.default_write.as_ref(),
            "write",
            "defaults.write",
            &names,
        )?;
        let unknown_key = names.key_rule(&self.unknown_key, "defaults.unknown_key")?;
        let missing_key = names.key_rule(&self.missing_key, "defaults.missing_key")?;
        let keys = self.build_keys(&names)?;
        let revoked = self.build_revoked();
        let reserves = self.build_reserves(&names)?;
        let per_tier = names.categories.len().max(1);
        for (i, cell) in names.cells.iter_mut().enumerate() {
            cell.reserve = reserves.get(i / per_tier).copied().unwrap_or(0);
        }
        let (overrides, override_sources) = self.build_overrides(&names)?;
        let boosts = self.build_boosts(&names)?;
        let (shadow_tiers, shadow_categories) = self.build_shadow(&names)?;
        let calendar = match &self.time_zone {
            None => crate::calendar::Calendar::utc(),
            Some(Located { value, line }) => crate::calendar::Calendar::new(value)
                .map_err(|m| PolicyError::new("defaults.time_zone", *line, m))?,
        };
        let envoy = crate::policy::envoy::compile(
            self.envoy.as_ref().map(|e| (&e.value, e.line)),
            &names.categories,
            &names.tiers,
            &names.cells,
        )?;
        let overload = match &self.overload {
            Some(o) => Some(Arc::new(crate::policy::overload::compile(
                &o.value,
                o.line,
                &names.tiers,
            )?)),
            None => None,
        };
        Ok(Policy {
            inner: Arc::new(PolicyInner {
                overrides,
                override_sources,
                boosts: boosts.into_boxed_slice(),
                shadow_tiers: shadow_tiers.into_boxed_slice(),
                shadow_categories: shadow_categories.into_boxed_slice(),
                envoy,
                overload,
                tiers: names.tiers.into_boxed_slice(),
                categories: names.categories.into_boxed_slice(),
                cells: names.cells.into_boxed_slice(),
                routes: routes.into_boxed_slice(),
                default_read,
                default_write,
                keys,
                revoked,
                unknown_key,
                missing_key,
                calendar,
                source: self,
            }),
            ops: None,
        })
    }

    fn build_categories(&self) -> Result<Vec<Box<str>>, PolicyError> {
        if self.categories.is_empty() {
            return Err(PolicyError::new(
                "categories",
                None,
                "at least one category is needed",
            ));
        }
        let mut categories: Vec<Box<str>> = Vec::with_capacity(self.categories.len());
        for (i, Located { value: name, line }) in self.categories.iter().enumerate() {
            check_name(name).map_err(|m| PolicyError::new(format!("categories[{i}]"), *line, m))?;
            if [
                "pool",
                "per_account",
                "per_org",
                "priority_reserve",
                "refund_on",
            ]
            .contains(&name.as_str())
            {
                return Err(PolicyError::new(
                    format!("categories[{i}]"),
                    *line,
                    format!(
                        "`{name}` is reserved for a tier's settings; name the category otherwise"
                    ),
                ));
            }
            if categories.iter().any(|c| **c == **name) {
                return Err(PolicyError::new(
                    format!("categories[{i}]"),
                    *line,
                    format!("category `{name}` is declared twice"),
                ));
            }
            categories.push(name.as_str().into());
        }
        if categories.len() > usize::from(u16::MAX) {
            return Err(PolicyError::new("categories", None, "too many categories"));
        }
        Ok(categories)
    }

    /// The revoked keys (their full text), by their `KeyId`.
    fn build_revoked(&self) -> HashTable<Box<str>> {
        let mut revoked: HashTable<Box<str>> = HashTable::with_capacity(self.revoked.len());
        for key in &self.revoked {
            let h = KeyId::of(key).as_u64();
            if revoked.find(h, |k| **k == **key).is_none() {
                revoked.insert_unique(h, key.as_str().into(), |k| KeyId::of(k).as_u64());
            }
        }
        revoked
    }

    fn build_shadow(&self, names: &Names) -> Result<(Vec<bool>, Vec<bool>), PolicyError> {
        let mut tiers = vec![self.shadow.all; names.tiers.len()];
        for t in &self.shadow.tiers {
            let id = names.tier(t).ok_or_else(|| {
                PolicyError::new(
                    "shadow.tiers",
                    None,
                    format!("unknown tier `{t}` (declared: {})", join(&names.tiers)),
                )
            })?;
            tiers[id.index()] = true;
        }
        let mut categories = vec![false; names.categories.len()];
        for c in &self.shadow.categories {
            let id = names.category(c).ok_or_else(|| {
                PolicyError::new(
                    "shadow.categories",
                    None,
                    format!(
                        "unknown category `{c}` (declared: {})",
                        join(&names.categories)
                    ),
                )
            })?;
            categories[id.index()] = true;
        }
        Ok((tiers, categories))
    }
}
