//! The `[keys]` section: each key's tier, account and organisation,
//! compared by full text, never shown in an error.

use super::names::{Names, join};
use super::{KeyEntry, Located, PolicyBuilder, PolicyError};
use std::collections::HashMap;

use crate::key::KeyId;
use crate::limit::Per;
use crate::policy::keys::{KeyTable, ListedKey};

impl PolicyBuilder {
    pub(super) fn build_keys(&self, names: &Names) -> Result<KeyTable, PolicyError> {
        let mut keys = KeyTable::with_capacity(self.keys.len());
        // The organisation of each account listed so far: an account
        // belongs to one (its buckets live under it when per-organisation
        // limits apply).
        let mut orgs_of: HashMap<&str, Option<&str>> = HashMap::new();
        for Located {
            value:
                KeyEntry {
                    key,
                    tier,
                    account,
                    org,
                },
            line,
        } in &self.keys
        {
            let entry = format!("keys.\"{}\"", KeyId::of(key).redacted());
            check_key(key, &entry, *line)?;
            let t = names.tier(tier).ok_or_else(|| {
                PolicyError::new(
                    &entry,
                    *line,
                    format!("unknown tier `{tier}` (declared: {})", join(&names.tiers)),
                )
            })?;
            for (name, per) in [(account, Per::Account), (org, Per::Org)] {
                if let Some(n) = name {
                    per.check_name(n)
                        .map_err(|m| PolicyError::new(&entry, *line, m))?;
                }
            }
            if let Some(a) = account.as_deref() {
                match orgs_of.insert(a, org.as_deref()) {
                    Some(before) if before != org.as_deref() => {
                        return Err(PolicyError::new(
                            &entry,
                            *line,
                            format!(
                                "account `{a}` is in {} for another key: every key of an account names the same organisation (or none)",
                                before.map_or("no organisation".to_owned(), |o| format!(
                                    "organisation `{o}`"
                                ))
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            let account = account.as_deref().map(KeyId::of_account);
            let org = org.as_deref().map(KeyId::of_org);
            let listed = ListedKey::new(t).in_account(account).in_org(org);
            if !keys.insert(key, listed) {
                return Err(PolicyError::new(&entry, *line, "this key is listed twice"));
            }
        }
        Ok(keys)
    }
}

/// Refuses a key no request could ever present (the same rule as
/// [`ApiKey`](crate::ApiKey)'s), naming the entry but never the key.
pub(super) fn check_key(key: &str, entry: &str, line: Option<usize>) -> Result<(), PolicyError> {
    match crate::key::key_problem(key, crate::key::DEFAULT_MAX_KEY_LEN) {
        None => Ok(()),
        Some(why) => Err(PolicyError::new(
            entry,
            line,
            format!("{why}, so no request could ever present it"),
        )),
    }
}
