//! The `[keys]` section: each key's tier, and its account and
//! organisation if it has them.

use std::collections::BTreeMap;

use toml::Spanned;

use super::super::{KeySpec, PolicyBuilder, PolicyError};
use super::Lines;
use super::sections::near;
use crate::key::KeyId;

/// The fields a key's table may have.
const FIELDS: [&str; 3] = ["tier", "account", "org"];

/// `[keys]`: `"KEY" = "TIER"` or `"KEY" = { tier = "TIER", account =
/// "ACCOUNT", org = "ORG" }`. Errors name the key redacted
/// (`keys."key:…"`), as the builder's do.
pub(super) fn keys(
    mut b: PolicyBuilder,
    keys: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    lines: &Lines,
) -> Result<PolicyBuilder, PolicyError> {
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_by_key(|(k, _)| k.span().start);
    for (key, spec) in keys {
        let line = lines.of(spec.span().start);
        let spec = key_spec(spec.get_ref()).map_err(|m| {
            let entry = format!("keys.\"{}\"", KeyId::of(key.get_ref()).redacted());
            PolicyError::new(entry, line, m)
        })?;
        b = b.key_at(key.into_inner(), spec, line);
    }
    Ok(b)
}

/// A key's entry. A table with a field other than `tier`, `account` and
/// `org` is refused by the field's name (a typo such as `acount` would
/// otherwise leave the key without its account).
fn key_spec(v: &toml::Value) -> Result<KeySpec, String> {
    const HOW: &str = "write the key's tier, such as \"pro\", or a table such as { tier = \"pro\", account = \"acme\" }";
    let table = match v {
        toml::Value::String(tier) => {
            return Ok(KeySpec {
                tier: tier.clone(),
                account: None,
                org: None,
            });
        }
        toml::Value::Table(table) => table,
        _ => return Err(HOW.to_owned()),
    };
    if let Some(field) = table.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        // The field is named only when it is a typo of one (`acount`): in
        // `[keys.team] "KEY" = "pro"` the field is an API key.
        if FIELDS.iter().any(|f| near(field, f)) {
            return Err(format!(
                "unknown field `{field}` (expected `tier`, `account` or `org`)"
            ));
        }
        return Err(
            "an unknown field (expected `tier`, `account` or `org`; keys are listed \
             directly under [keys], never in sub-tables)"
                .to_owned(),
        );
    }
    let tier = match table.get("tier") {
        Some(toml::Value::String(t)) => t.clone(),
        Some(_) => return Err("write `tier` as a string, such as \"pro\"".to_owned()),
        None => return Err(format!("`tier` is missing; {HOW}")),
    };
    let name = |field: &str| match table.get(field) {
        None => Ok(None),
        Some(toml::Value::String(a)) => Ok(Some(a.clone())),
        Some(_) => Err(format!("write `{field}` as a string, such as \"acme\"")),
    };
    Ok(KeySpec {
        tier,
        account: name("account")?,
        org: name("org")?,
    })
}
