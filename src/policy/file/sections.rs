//! One function per section of a policy file: each reads its section, as
//! serde left it (with spans), into the [`PolicyBuilder`].

use std::collections::BTreeMap;

use toml::Spanned;

use super::super::operator::parse_time;
use super::super::{
    Boost, BoostTarget, KeyRule, PolicyBuilder, PolicyError, Pool, Route, Shadow, Tier,
};
use super::values::{parse_adjust, parse_cell, parse_refund};
use super::{
    BoostSpec, Defaults, EnvoySpec, GrpcSpec, Lines, Methods, OverloadSpec, RouteSpec, ShadowSpec,
    TierRules,
};
use crate::key::KeyId;
use crate::limit::Per;
use crate::policy::{DescriptorKeys, EnvoySettings};

type Built = Result<PolicyBuilder, PolicyError>;

/// `categories = ["read", "write"]`.
pub(super) fn categories(
    mut b: PolicyBuilder,
    categories: Spanned<Vec<Spanned<String>>>,
    lines: &Lines,
) -> Built {
    for c in categories.get_ref() {
        b = b.category_at(c.get_ref().clone(), lines.of(c.span().start));
    }
    if !b.has_categories() {
        return Err(PolicyError::new(
            "categories",
            lines.of(categories.span().start),
            "at least one category is needed",
        ));
    }
    Ok(b)
}

/// `[tiers.NAME]`, in file order (a `BTreeMap` sorts by name; the spans
/// remember).
pub(super) fn tiers(
    mut b: PolicyBuilder,
    tiers: BTreeMap<Spanned<String>, Spanned<TierRules>>,
    lines: &Lines,
) -> Built {
    let mut tiers: Vec<_> = tiers.into_iter().collect();
    tiers.sort_by_key(|(name, _)| name.span().start);
    for (name, rules) in tiers {
        let mut tier = Tier::new(name.get_ref().clone()).at(lines.of(name.span().start));
        let mut rules: Vec<_> = rules.into_inner().into_iter().collect();
        rules.sort_by_key(|(cat, _)| cat.span().start);
        for (cat, spec) in rules {
            tier = tier_entry(tier, name.get_ref(), cat, spec, lines)?;
        }
        b = b.tier(tier);
    }
    Ok(b)
}

/// One entry of a tier's table: a category's limits, or one of the tier's
/// own settings (`priority_reserve`, `pool`, `refund_on`, `per_account`,
/// `per_org`).
fn tier_entry(
    mut tier: Tier,
    name: &str,
    cat: Spanned<String>,
    spec: Spanned<toml::Value>,
    lines: &Lines,
) -> Result<Tier, PolicyError> {
    let line = lines.of(spec.span().start);
    let entry = format!("tiers.{name}.{}", cat.get_ref());
    let err = |m: String| PolicyError::new(&entry, line, m);
    let as_str = |what: &str| {
        spec.get_ref()
            .as_str()
            .ok_or_else(|| err(format!("write the {what} as a string")))
    };
    match cat.get_ref().as_str() {
        "priority_reserve" => {
            let pct = as_str("reserve")?
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse::<u8>()
                .map_err(|_| err("write the reserve as a percentage such as \"20%\"".into()))?;
            tier = tier.priority_reserve_at(pct, line);
        }
        "pool" => {
            let pool = match as_str("pool")?.trim() {
                "key" => Pool::Key,
                "account" => Pool::Account,
                other => {
                    return Err(err(format!(
                        "unknown pool `{other}` (use \"key\" or \"account\")"
                    )));
                }
            };
            tier = tier.pool_at(pool, line);
        }
        "refund_on" => {
            let refund = parse_refund(spec.get_ref()).map_err(err)?;
            tier = tier.refund_at(None, refund, line);
        }
        "per_account" => {
            let Some(table) = spec.get_ref().as_table() else {
                return Err(err(
                    "write per-account limits as a table: [tiers.NAME.per_account]".into(),
                ));
            };
            tier = per_account(tier, name, table, line)?;
        }
        "per_org" => {
            let Some(table) = spec.get_ref().as_table() else {
                return Err(err(
                    "write per-organisation limits as a table: [tiers.NAME.per_org]".into(),
                ));
            };
            tier = per_org(tier, name, table, line)?;
        }
        _ => {
            let cell = parse_cell(spec.get_ref()).map_err(err)?;
            let cat = cat.into_inner();
            // A table with tokens only leaves requests unlimited.
            tier = tier.rules_at(cat.clone(), cell.requests.unwrap_or(None), line);
            if let Some(tokens) = cell.tokens {
                tier = tier.tokens_at(cat.clone(), tokens, false, line);
            }
            tier = tier.io_tokens_at(&cat, [cell.input_tokens, cell.output_tokens], false, line);
            if let Some(n) = cell.concurrency {
                tier = tier.concurrency_at(cat.clone(), n, false, line);
            }
            if let Some(refund) = cell.refund {
                tier = tier.refund_at(Some(cat), refund, line);
            }
        }
    }
    Ok(tier)
}

/// `[tiers.NAME.per_org]`: request limits shared by every key of every
/// account of an organisation.
fn per_org(
    mut tier: Tier,
    name: &str,
    table: &toml::Table,
    line: Option<usize>,
) -> Result<Tier, PolicyError> {
    for (cat, v) in table {
        let entry = format!("tiers.{name}.per_org.{cat}");
        let err = |m: &str| PolicyError::new(&entry, line, m);
        let cell = parse_cell(v).map_err(|m| err(&m))?;
        let tokens =
            cell.tokens.is_some() || cell.input_tokens.is_some() || cell.output_tokens.is_some();
        if cell.refund.is_some() || tokens || cell.concurrency.is_some() {
            return Err(err(
                "an organisation takes request limits only (such as \"10000/day\"); set token and concurrency limits per key or per account",
            ));
        }
        match cell.requests {
            Some(Some(limits)) => tier = tier.per_org_at(cat.clone(), limits, line),
            _ => {
                return Err(err(
                    "a per-organisation limit cannot be unlimited; leave the category out",
                ));
            }
        }
    }
    Ok(tier)
}

/// `[tiers.NAME.per_account]`: limits shared by every key of an account.
fn per_account(
    mut tier: Tier,
    name: &str,
    table: &toml::Table,
    line: Option<usize>,
) -> Result<Tier, PolicyError> {
    for (cat, v) in table {
        let entry = format!("tiers.{name}.per_account.{cat}");
        let err = |m: String| PolicyError::new(&entry, line, m);
        let cell = parse_cell(v).map_err(err)?;
        if cell.refund.is_some() {
            return Err(err("set `refund_on` on the tier's own table".into()));
        }
        match cell.requests {
            Some(None) => {
                return Err(err(
                    "a per-account limit cannot be unlimited; leave the category out".into(),
                ));
            }
            Some(Some(limits)) => tier = tier.per_account_at(cat.clone(), limits, line),
            None => {}
        }
        if let Some(tokens) = cell.tokens {
            tier = tier.tokens_at(cat.clone(), tokens, true, line);
        }
        tier = tier.io_tokens_at(cat, [cell.input_tokens, cell.output_tokens], true, line);
        if let Some(n) = cell.concurrency {
            tier = tier.concurrency_at(cat.clone(), n, true, line);
        }
    }
    Ok(tier)
}

/// `[[grpc]]`: a service, or one of its methods, as a route.
pub(super) fn grpc(mut b: PolicyBuilder, grpc: Vec<Spanned<GrpcSpec>>, lines: &Lines) -> Built {
    for (i, spec) in grpc.into_iter().enumerate() {
        let line = lines.of(spec.span().start);
        let spec = spec.into_inner();
        let label = format!("grpc[{i}]");
        let bad_name = |s: &str| s.is_empty() || s.contains('/') || s.contains('*');
        if bad_name(&spec.service) || spec.method.as_deref().is_some_and(bad_name) {
            return Err(PolicyError::new(
                label,
                line,
                "`service` is a full name such as `grpc.health.v1.Health` and `method` a bare name such as `Check`; leave `method` out for the whole service",
            ));
        }
        let path = format!(
            "/{}/{}",
            spec.service,
            spec.method.as_deref().unwrap_or("*")
        );
        let route = Route::from_file(
            vec!["POST".to_owned()],
            path,
            spec.category,
            spec.cost.unwrap_or(1),
            spec.exempt,
        );
        b = b.route(route.at(label, line));
    }
    Ok(b)
}

/// `[[routes]]`, in file order (the first match wins).
pub(super) fn routes(
    mut b: PolicyBuilder,
    routes: Vec<Spanned<RouteSpec>>,
    lines: &Lines,
) -> PolicyBuilder {
    for (i, spec) in routes.into_iter().enumerate() {
        let line = lines.of(spec.span().start);
        let spec = spec.into_inner();
        let methods = match spec.method {
            None => Vec::new(),
            Some(Methods::One(m)) => vec![m],
            Some(Methods::Many(ms)) => ms,
        };
        let route = Route::from_file(
            methods,
            spec.path,
            spec.category,
            spec.cost.unwrap_or(1),
            spec.exempt,
        );
        b = b.route(route.at(format!("routes[{i}]"), line));
    }
    b
}

/// `[custom_limits."KEY"]` (or `[overrides."KEY"]`), and
/// `[account_limits."ACCOUNT"]`, `[org_limits."ORG"]` (`per`): custom
/// limits, category by category.
pub(super) fn custom_limits(
    mut b: PolicyBuilder,
    overrides: BTreeMap<Spanned<String>, TierRules>,
    per: Per,
    lines: &Lines,
) -> Built {
    let mut overrides: Vec<_> = overrides.into_iter().collect();
    overrides.sort_by_key(|(k, _)| k.span().start);
    for (key, cells) in overrides {
        let mut cells: Vec<_> = cells.into_iter().collect();
        cells.sort_by_key(|(c, _)| c.span().start);
        for (cat, spec) in cells {
            let line = lines.of(spec.span().start);
            let adjust = parse_adjust(spec.get_ref()).map_err(|m| {
                let shown = b.shown_category(cat.get_ref());
                let entry = match per {
                    Per::Key => {
                        let key = KeyId::of(key.get_ref()).redacted();
                        format!("custom_limits.\"{key}\".{shown}")
                    }
                    _ => format!("{}.\"{}\".{shown}", per.limits_section(), key.get_ref()),
                };
                PolicyError::new(entry, line, m)
            })?;
            b = b.custom_limit_at(key.get_ref().clone(), per, cat.into_inner(), adjust, line);
        }
    }
    Ok(b)
}

/// `[[boosts]]`: adjustments in force between two times.
pub(super) fn boosts(
    mut b: PolicyBuilder,
    boosts: Vec<Spanned<BoostSpec>>,
    lines: &Lines,
) -> Built {
    for (i, spec) in boosts.into_iter().enumerate() {
        let line = lines.of(spec.span().start);
        let spec = spec.into_inner();
        let entry = format!("boosts[{i}]");
        let err = |m: String| PolicyError::new(&entry, line, m);
        let target = match (spec.key, spec.tier, spec.account, spec.org) {
            (Some(k), None, None, None) => BoostTarget::Key(k),
            (None, Some(t), None, None) => BoostTarget::Tier(t),
            (None, None, Some(a), None) => BoostTarget::Account(a),
            (None, None, None, Some(o)) => BoostTarget::Org(o),
            _ => {
                return Err(err(
                    "a boost names one of `key`, `tier`, `account` or `org`".into(),
                ));
            }
        };
        let adjust = parse_adjust(&spec.adjust).map_err(err)?;
        let start = parse_time(&spec.start).map_err(err)?;
        let end = parse_time(&spec.end).map_err(err)?;
        let mut boost = Boost::new(target, adjust, start, end).at(line);
        if let Some(c) = spec.category {
            boost = boost.category(c);
        }
        b = b.boost(boost);
    }
    Ok(b)
}

/// `[shadow]`: tiers and categories counted but never refused.
pub(super) fn shadow(b: PolicyBuilder, sh: ShadowSpec) -> PolicyBuilder {
    b.shadow(Shadow {
        all: sh.all,
        tiers: sh.tiers,
        categories: sh.categories,
    })
}

/// `[envoy]`: the domain, the categories Envoy checks, the descriptor
/// keys (checked when the policy is built, against its categories).
pub(super) fn envoy(b: PolicyBuilder, e: Spanned<EnvoySpec>, lines: &Lines) -> PolicyBuilder {
    let line = lines.of(e.span().start);
    let e = e.into_inner();
    let k = e.descriptor_keys;
    let mut keys = DescriptorKeys::default();
    for (to, from) in [
        (&mut keys.api_key, k.api_key),
        (&mut keys.tier, k.tier),
        (&mut keys.account, k.account),
        (&mut keys.org, k.org),
        (&mut keys.category, k.category),
        (&mut keys.method, k.method),
        (&mut keys.path, k.path),
        (&mut keys.remote_address, k.remote_address),
    ] {
        if let Some(v) = from {
            *to = v;
        }
    }
    let mut settings = EnvoySettings::new().descriptor_keys(keys);
    settings.domain = e.domain;
    settings.categories = e.categories;
    b.envoy_at(settings, line)
}

/// `[overload]`: the capacity (a number, or `"adaptive"` with a target
/// latency), its bounds, and `[overload.shed_at]` (checked against the
/// tiers when the policy is built).
pub(super) fn overload(b: PolicyBuilder, o: Spanned<OverloadSpec>, lines: &Lines) -> Built {
    use crate::policy::{Capacity, OverloadSettings};
    let table_at = o.span().start;
    let line = lines.of(table_at);
    let o = o.into_inner();
    let err = |entry: &str, at: usize, m: String| {
        PolicyError::new(format!("overload.{entry}"), lines.of(at), m)
    };
    let Some(capacity) = o.capacity else {
        return Err(err(
            "capacity",
            table_at,
            "an `[overload]` table needs a capacity: a number of requests in flight (`capacity = 64`) or `\"adaptive\"`".into(),
        ));
    };
    let capacity = match capacity.get_ref() {
        toml::Value::String(s) if s.eq_ignore_ascii_case("adaptive") => Capacity::Adaptive,
        toml::Value::Integer(n) => match u32::try_from(*n) {
            Ok(n) => Capacity::Fixed(n),
            Err(_) => {
                return Err(err(
                    "capacity",
                    capacity.span().start,
                    format!("a capacity is 1 to 1000000 requests in flight, not {n}"),
                ));
            }
        },
        other => {
            return Err(err(
                "capacity",
                capacity.span().start,
                format!(
                    "write the capacity as a number of requests in flight (`capacity = 64`) or `\"adaptive\"`, not `{other}`"
                ),
            ));
        }
    };
    let count = |entry: &str, v: Spanned<toml::Value>| match v.get_ref() {
        toml::Value::Integer(n) => u32::try_from(*n).map_err(|_| {
            err(
                entry,
                v.span().start,
                format!("a capacity is 1 to 1000000 requests in flight, not {n}"),
            )
        }),
        other => Err(err(
            entry,
            v.span().start,
            format!("write a number of requests in flight, such as 8, not `{other}`"),
        )),
    };
    let text = |entry: &str, v: &Spanned<toml::Value>| match v.get_ref() {
        toml::Value::String(s) => Ok(s.trim().to_owned()),
        other => Err(err(
            entry,
            v.span().start,
            format!("write a duration as a string such as \"50ms\" or \"1s\", not `{other}`"),
        )),
    };
    let duration = |entry: &str, v: Spanned<toml::Value>| {
        let s = text(entry, &v)?;
        crate::limit::parse_duration(&s).map_err(|m| {
            err(
                entry,
                v.span().start,
                format!("{m} (write it as `50ms` or `1s`)"),
            )
        })
    };
    let flag = |entry: &str, v: Spanned<toml::Value>| match v.get_ref() {
        toml::Value::Boolean(yes) => Ok(*yes),
        other => Err(err(
            entry,
            v.span().start,
            format!("write true or false, not `{other}`"),
        )),
    };
    let fraction = |entry: &str, at: usize, v: &toml::Value| match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(n) => Ok(*n as f64),
        other => Err(err(
            entry,
            at,
            format!("write a fraction of the capacity in (0, 1], such as 0.5, not `{other}`"),
        )),
    };
    let mut s = OverloadSettings::new(capacity);
    if let Some(t) = o.target_latency {
        let at = t.span().start;
        let written = text("target_latency", &t)?;
        let digits = written.bytes().take_while(u8::is_ascii_digit).count();
        let unit = written[digits..].trim();
        // "0ms": zero, said as such (the parser calls it unusable); "0.5ms"
        // is not zero, and the parser says what is wrong with it.
        if digits > 0
            && written.as_bytes()[..digits].iter().all(|&d| d == b'0')
            && unit.bytes().all(|c| c.is_ascii_alphabetic())
        {
            return Err(err(
                "target_latency",
                at,
                "a target latency of zero can never be met".into(),
            ));
        }
        s = s.target_latency(duration("target_latency", t)?);
    }
    if let Some(n) = o.min_capacity {
        s = s.min_capacity(count("min_capacity", n)?);
    }
    if let Some(n) = o.max_capacity {
        s = s.max_capacity(count("max_capacity", n)?);
    }
    if let Some(n) = o.initial_capacity {
        s = s.initial_capacity(count("initial_capacity", n)?);
    }
    if let Some(table) = o.shed_at {
        let at = table.span().start;
        let toml::Value::Table(tiers) = table.into_inner() else {
            return Err(err(
                "shed_at",
                at,
                "write a table of tiers and fractions, such as `[overload.shed_at]` with `free = 0.5`".into(),
            ));
        };
        for (tier, v) in tiers {
            let f = fraction(&format!("shed_at.{tier}"), at, &v)?;
            s = s.shed_at(tier, f);
        }
    }
    if let Some(yes) = o.shed_exempt_routes {
        s = s.shed_exempt_routes(flag("shed_exempt_routes", yes)?);
    }
    if let Some(yes) = o.shed_unlimited {
        s = s.shed_unlimited(flag("shed_unlimited", yes)?);
    }
    if let Some(d) = o.retry_after {
        s = s.retry_after(duration("retry_after", d)?);
    }
    if let Some(step) = o.report_step {
        let at = step.span().start;
        s = s.report_step(fraction("report_step", at, step.get_ref()).map_err(|_| {
            err(
                "report_step",
                at,
                format!(
                    "write the report step as a fraction of the capacity, such as 0.1, not `{}`",
                    step.get_ref()
                ),
            )
        })?);
    }
    Ok(b.overload_at(s, line))
}

/// `[defaults]`: the categories of unmatched requests, the tiers (or
/// `"reject"`) of unknown and missing keys, and the time zone of calendar
/// limits.
pub(super) fn defaults(mut b: PolicyBuilder, d: Defaults, lines: &Lines) -> PolicyBuilder {
    let located = |s: Spanned<String>| (lines.of(s.span().start), s.into_inner());
    if let Some((line, name)) = d.read.map(located) {
        b = b.default_read_at(name, line);
    }
    if let Some((line, name)) = d.write.map(located) {
        b = b.default_write_at(name, line);
    }
    let rule = |v: String| {
        if v.eq_ignore_ascii_case("reject") {
            KeyRule::Reject
        } else {
            KeyRule::Tier(v)
        }
    };
    if let Some((line, v)) = d.unknown_key.map(located) {
        b = b.unknown_keys_at(rule(v), line);
    }
    if let Some((line, v)) = d.missing_key.map(located) {
        b = b.missing_keys_at(rule(v), line);
    }
    if let Some((line, v)) = d.time_zone.map(located) {
        b = b.time_zone_at(v, line);
    }
    b
}

/// Whether `a` is at most two edits (insertions, deletions, substitutions)
/// from `b`: a typo of it.
pub(in crate::policy) fn near(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(x != y)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()] <= 2
}
