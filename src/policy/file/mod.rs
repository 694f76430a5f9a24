//! Loading a [`Policy`] from TOML, with line numbers in every error.
//!
//! `mod.rs` reads the document into its sections (serde, with spans) and
//! hands each to its function in `sections.rs`; `values.rs` reads limits,
//! cells and adjustments; `redact.rs` turns the TOML parser's errors into
//! [`PolicyError`]s that never echo an API key.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{Policy, PolicyError};
use crate::limit::Per;

mod keys;
mod redact;
mod sections;
pub(super) use sections::near;
#[cfg(test)]
mod tests;
mod values;

pub(crate) use values::parse_adjust_json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    categories: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    defaults: Option<Defaults>,
    tiers: Spanned<BTreeMap<Spanned<String>, Spanned<TierRules>>>,
    #[serde(default)]
    routes: Vec<Spanned<RouteSpec>>,
    #[serde(default)]
    grpc: Vec<Spanned<GrpcSpec>>,
    #[serde(default)]
    keys: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    /// `[custom_limits]` (`[overrides]`, its earlier name, is read too).
    #[serde(default, alias = "overrides")]
    custom_limits: BTreeMap<Spanned<String>, TierRules>,
    /// `[account_limits."ACCOUNT"]`: custom limits of an account.
    #[serde(default)]
    account_limits: BTreeMap<Spanned<String>, TierRules>,
    /// `[org_limits."ORG"]`: custom limits of an organisation.
    #[serde(default)]
    org_limits: BTreeMap<Spanned<String>, TierRules>,
    #[serde(default)]
    boosts: Vec<Spanned<BoostSpec>>,
    #[serde(default)]
    shadow: Option<ShadowSpec>,
    #[serde(default)]
    envoy: Option<Spanned<EnvoySpec>>,
    #[serde(default)]
    overload: Option<Spanned<OverloadSpec>>,
}

/// `[overload]`: the service's capacity and where each tier is shed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverloadSpec {
    // Every entry is read as any TOML value and checked by the loader, so
    // an entry of the wrong type is refused naming it (serde's own error
    // names no entry).
    capacity: Option<Spanned<toml::Value>>,
    target_latency: Option<Spanned<toml::Value>>,
    min_capacity: Option<Spanned<toml::Value>>,
    max_capacity: Option<Spanned<toml::Value>>,
    initial_capacity: Option<Spanned<toml::Value>>,
    shed_at: Option<Spanned<toml::Value>>,
    shed_exempt_routes: Option<Spanned<toml::Value>>,
    shed_unlimited: Option<Spanned<toml::Value>>,
    retry_after: Option<Spanned<toml::Value>>,
    report_step: Option<Spanned<toml::Value>>,
}

/// `[envoy]`: what Envoy's rate limit service reads and answers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvoySpec {
    domain: Option<String>,
    categories: Option<Vec<String>>,
    #[serde(default)]
    descriptor_keys: KeysSpec,
}

/// `[envoy.descriptor_keys]`: each absent key keeps its default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeysSpec {
    api_key: Option<String>,
    tier: Option<String>,
    account: Option<String>,
    org: Option<String>,
    category: Option<String>,
    method: Option<String>,
    path: Option<String>,
    remote_address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoostSpec {
    key: Option<String>,
    tier: Option<String>,
    account: Option<String>,
    org: Option<String>,
    category: Option<String>,
    adjust: toml::Value,
    start: String,
    end: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShadowSpec {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    tiers: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
}

/// A tier's table: category → `"100/hour"`, a list of limits, or
/// `{ requests = … }`; and `pool`, `priority_reserve`, `per_account`,
/// `per_org`.
type TierRules = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    read: Option<Spanned<String>>,
    write: Option<Spanned<String>>,
    unknown_key: Option<Spanned<String>>,
    missing_key: Option<Spanned<String>>,
    time_zone: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    #[serde(default)]
    method: Option<Methods>,
    path: String,
    category: Option<String>,
    cost: Option<u32>,
    #[serde(default)]
    exempt: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcSpec {
    service: String,
    method: Option<String>,
    category: Option<String>,
    cost: Option<u32>,
    #[serde(default)]
    exempt: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Methods {
    One(String),
    Many(Vec<String>),
}

/// Offsets of the line breaks of a source, for line numbers in O(log n).
struct Lines(Vec<usize>);

impl Lines {
    fn new(source: &str) -> Self {
        Lines(
            source
                .bytes()
                .enumerate()
                .filter_map(|(i, b)| (b == b'\n').then_some(i))
                .collect(),
        )
    }

    /// The line (from 1) of a byte offset.
    fn of(&self, offset: usize) -> Option<usize> {
        Some(self.0.partition_point(|&nl| nl < offset) + 1)
    }
}

pub(super) fn parse(source: &str) -> Result<Policy, PolicyError> {
    let lines = Lines::new(source);
    let file: File =
        toml::from_str(source).map_err(|e| redact::parser_error(source, &e, &lines))?;
    let mut b = sections::categories(Policy::builder(), file.categories, &lines)?;
    b = sections::tiers(b, file.tiers.into_inner(), &lines)?;
    // gRPC rules first: their paths (`/package.Service/Method`) never
    // overlap HTTP routes, and the more specific rules should win.
    b = sections::grpc(b, file.grpc, &lines)?;
    b = sections::routes(b, file.routes, &lines);
    b = keys::keys(b, file.keys, &lines)?;
    b = sections::custom_limits(b, file.custom_limits, Per::Key, &lines)?;
    b = sections::custom_limits(b, file.account_limits, Per::Account, &lines)?;
    b = sections::custom_limits(b, file.org_limits, Per::Org, &lines)?;
    b = sections::boosts(b, file.boosts, &lines)?;
    if let Some(sh) = file.shadow {
        b = sections::shadow(b, sh);
    }
    if let Some(e) = file.envoy {
        b = sections::envoy(b, e, &lines);
    }
    if let Some(o) = file.overload {
        b = sections::overload(b, o, &lines)?;
    }
    if let Some(d) = file.defaults {
        b = sections::defaults(b, d, &lines);
    }
    b.build()
}
