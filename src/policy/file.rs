//! Loading a [`Policy`] from TOML, with line numbers in every error.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::operator::parse_time;
use super::{
    Adjust, Boost, BoostTarget, KeyRule, Limit, Policy, PolicyBuilder, PolicyError, Pool, RefundOn,
    Route, Rule, Shadow, Tier,
};

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
    keys: BTreeMap<Spanned<String>, Spanned<KeySpec>>,
    #[serde(default)]
    overrides: BTreeMap<Spanned<String>, TierRules>,
    #[serde(default)]
    boosts: Vec<Spanned<BoostSpec>>,
    #[serde(default)]
    shadow: Option<ShadowSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoostSpec {
    key: Option<String>,
    tier: Option<String>,
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
/// `{ requests = … }`; and `pool`, `priority_reserve`, `per_account`.
type TierRules = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

/// A `[keys]` entry: `"free"` or `{ tier = "pro", account = "acme" }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum KeySpec {
    Tier(String),
    Full {
        tier: String,
        #[serde(default)]
        account: Option<String>,
    },
}

/// A custom limit as written: `"x5"`, `"500/hour"`, `"unlimited"`, or a
/// list of limits (plain or as `{ requests = … }`).
fn parse_adjust(v: &toml::Value) -> Result<Adjust, String> {
    match v {
        toml::Value::String(s) => Adjust::parse(s),
        toml::Value::Table(_) => {
            let spec = parse_cell(v)?;
            if spec.refund.is_some() {
                return Err("a custom limit cannot set `refund_on`; set it on the tier".into());
            }
            if spec.concurrency.is_some() {
                return Err(
                    "a custom limit or boost cannot set `concurrency`; set it on the tier".into(),
                );
            }
            if spec.requests.is_none() && spec.tokens.is_none() {
                return Err("a custom limit needs `requests` or `tokens`".into());
            }
            Ok(Adjust::Table {
                requests: spec.requests.map(Option::unwrap_or_default),
                tokens: spec.tokens,
            })
        }
        other => match parse_limits(other)? {
            Some(limits) => Ok(Adjust::SetAll(limits)),
            None => Ok(Adjust::Set(Rule::Unlimited)),
        },
    }
}

/// A custom limit or a boost's adjustment as JSON (the admin API): the
/// same forms as in the file — `"x5"`, `"500/hour"`, `"unlimited"`, a list
/// of limits, or `{ "requests": …, "tokens": … }`.
pub(crate) fn parse_adjust_json(v: &serde_json::Value) -> Result<Adjust, String> {
    fn to_toml(v: &serde_json::Value) -> Result<toml::Value, String> {
        use serde_json::Value as J;
        Ok(match v {
            J::String(s) => toml::Value::String(s.clone()),
            J::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => return Err(format!("{n} is not a whole number")),
            },
            J::Array(items) => {
                toml::Value::Array(items.iter().map(to_toml).collect::<Result<_, _>>()?)
            }
            J::Object(map) => toml::Value::Table(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), to_toml(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            J::Bool(_) | J::Null => return Err(HOW.to_owned()),
        })
    }
    parse_adjust(&to_toml(v)?)
}

const HOW: &str = "write a limit such as \"100/hour\", a list such as [\"10/second\", \"100/hour\"], or \"unlimited\"";

/// Limits as written: `"100/hour"`, `"unlimited"` or
/// `["10/second", "100/hour"]` (`None`: unlimited).
fn parse_limits(v: &toml::Value) -> Result<Option<Vec<Limit>>, String> {
    use toml::Value;
    match v {
        Value::String(s) => match Rule::parse(s)? {
            Rule::Unlimited => Ok(None),
            Rule::Limited(l) => Ok(Some(vec![l])),
        },
        Value::Array(items) => {
            if items.is_empty() {
                return Err(format!("an empty list; {HOW}"));
            }
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Limit::parse(s),
                    _ => Err(HOW.to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        _ => Err(HOW.to_owned()),
    }
}

/// A cell as written: limits (`"100/hour"`, a list) or the table form
/// `{ requests = …, tokens = …, refund_on = […] }`.
#[derive(Default)]
struct CellSpec {
    /// `None`: not given; `Some(None)`: unlimited.
    requests: Option<Option<Vec<Limit>>>,
    tokens: Option<Vec<Limit>>,
    refund: Option<RefundOn>,
    /// Requests in flight at once.
    concurrency: Option<u32>,
}

fn parse_cell(v: &toml::Value) -> Result<CellSpec, String> {
    use toml::Value;
    let Value::Table(t) = v else {
        return Ok(CellSpec {
            requests: Some(parse_limits(v)?),
            ..CellSpec::default()
        });
    };
    if let Some(k) = t
        .keys()
        .find(|k| !["requests", "tokens", "refund_on", "concurrency"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field `{k}` (expected `requests`, `tokens`, `concurrency` or `refund_on`)"
        ));
    }
    let mut spec = CellSpec::default();
    if let Some(r) = t.get("requests") {
        spec.requests = Some(match r {
            Value::String(_) | Value::Array(_) => parse_limits(r)?,
            _ => return Err(HOW.to_owned()),
        });
    }
    if let Some(tk) = t.get("tokens") {
        match parse_limits(tk).map_err(|m| format!("tokens: {m}"))? {
            Some(limits) => spec.tokens = Some(limits),
            None => return Err("tokens: leave `tokens` out rather than \"unlimited\"".into()),
        }
    }
    if let Some(r) = t.get("refund_on") {
        spec.refund = Some(parse_refund(r)?);
    }
    if let Some(c) = t.get("concurrency") {
        let how = || {
            format!(
                "concurrency: write the number of requests that may be in flight at once, from 1 to {}",
                crate::policy::MAX_CONCURRENCY
            )
        };
        let n = c.as_integer().ok_or_else(how)?;
        let n = u32::try_from(n)
            .ok()
            .filter(|n| (1..=crate::policy::MAX_CONCURRENCY).contains(n))
            .ok_or_else(how)?;
        spec.concurrency = Some(n);
    }
    if spec.requests.is_none() && spec.tokens.is_none() && spec.concurrency.is_none() {
        return Err("a table of limits needs `requests`, `tokens` or `concurrency`".to_owned());
    }
    Ok(spec)
}

/// `refund_on = ["5xx", "304"]`.
fn parse_refund(v: &toml::Value) -> Result<RefundOn, String> {
    let how = "write refund_on as a list such as [\"5xx\", \"304\"]";
    let items = v.as_array().ok_or(how)?;
    let items: Vec<&str> = items
        .iter()
        .map(|i| i.as_str().ok_or(how))
        .collect::<Result<_, _>>()?;
    RefundOn::parse(items)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    read: Option<Spanned<String>>,
    write: Option<Spanned<String>>,
    unknown_key: Option<Spanned<String>>,
    missing_key: Option<Spanned<String>>,
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

pub(super) fn parse(source: &str) -> Result<Policy, PolicyError> {
    // Offsets of line breaks, for line numbers in O(log n) per entry.
    let newlines: Vec<usize> = source
        .bytes()
        .enumerate()
        .filter_map(|(i, b)| (b == b'\n').then_some(i))
        .collect();
    let line_of = |offset: usize| Some(newlines.partition_point(|&nl| nl < offset) + 1);
    let file: File = toml::from_str(source).map_err(|e| {
        let Some(span) = e.span() else {
            return PolicyError::new("(file)", None, e.message().trim().to_owned());
        };
        let line = line_of(span.start);
        let text = source.get(span.clone()).unwrap_or("").trim();
        let text = text.lines().next().unwrap_or("");
        if let Some(section) = secret_section(source, span.start, text) {
            // API keys are table keys here: name the section and line, and
            // echo nothing the file wrote.
            return PolicyError::new(section, line, scrub(e.message().trim()));
        }
        let text: String = text.chars().take(60).collect();
        let entry = if text.is_empty() {
            "(file)".to_owned()
        } else {
            text
        };
        PolicyError::new(entry, line, e.message().trim().to_owned())
    })?;

    let mut b: PolicyBuilder = Policy::builder();
    for c in file.categories.get_ref() {
        b = b.category_at(c.get_ref().clone(), line_of(c.span().start));
    }
    if !b.has_categories() {
        return Err(PolicyError::new(
            "categories",
            line_of(file.categories.span().start),
            "at least one category is needed",
        ));
    }

    // Tiers in file order (a BTreeMap sorts by name; the spans remember).
    let mut tiers: Vec<_> = file.tiers.into_inner().into_iter().collect();
    tiers.sort_by_key(|(name, _)| name.span().start);
    for (name, rules) in tiers {
        let mut tier = Tier::new(name.get_ref().clone()).at(line_of(name.span().start));
        let mut rules: Vec<_> = rules.into_inner().into_iter().collect();
        rules.sort_by_key(|(cat, _)| cat.span().start);
        for (cat, spec) in rules {
            let line = line_of(spec.span().start);
            let entry = format!("tiers.{}.{}", name.get_ref(), cat.get_ref());
            let as_str = |what: &str| {
                spec.get_ref().as_str().ok_or_else(|| {
                    PolicyError::new(&entry, line, format!("write the {what} as a string"))
                })
            };
            match cat.get_ref().as_str() {
                "priority_reserve" => {
                    let pct = as_str("reserve")?
                        .trim()
                        .trim_end_matches('%')
                        .trim()
                        .parse::<u8>()
                        .map_err(|_| {
                            PolicyError::new(
                                &entry,
                                line,
                                "write the reserve as a percentage such as \"20%\"",
                            )
                        })?;
                    tier = tier.priority_reserve_at(pct, line);
                }
                "pool" => {
                    let pool = match as_str("pool")?.trim() {
                        "key" => Pool::Key,
                        "account" => Pool::Account,
                        other => {
                            return Err(PolicyError::new(
                                &entry,
                                line,
                                format!("unknown pool `{other}` (use \"key\" or \"account\")"),
                            ));
                        }
                    };
                    tier = tier.pool_at(pool, line);
                }
                "refund_on" => {
                    let refund = parse_refund(spec.get_ref())
                        .map_err(|m| PolicyError::new(&entry, line, m))?;
                    tier = tier.refund_at(None, refund, line);
                }
                "per_account" => {
                    let Some(table) = spec.get_ref().as_table() else {
                        return Err(PolicyError::new(
                            &entry,
                            line,
                            "write per-account limits as a table: [tiers.NAME.per_account]",
                        ));
                    };
                    for (cat, v) in table {
                        let entry = format!("tiers.{}.per_account.{cat}", name.get_ref());
                        let err = |m: String| PolicyError::new(&entry, line, m);
                        let cell = parse_cell(v).map_err(err)?;
                        if cell.refund.is_some() {
                            return Err(err("set `refund_on` on the tier's own table".into()));
                        }
                        match cell.requests {
                            Some(None) => {
                                return Err(err("a per-account limit cannot be unlimited; leave the category out".into()));
                            }
                            Some(Some(limits)) => {
                                tier = tier.per_account_at(cat.clone(), limits, line);
                            }
                            None => {}
                        }
                        if let Some(tokens) = cell.tokens {
                            tier = tier.tokens_at(cat.clone(), tokens, true, line);
                        }
                        if let Some(n) = cell.concurrency {
                            tier = tier.concurrency_at(cat.clone(), n, true, line);
                        }
                    }
                }
                _ => {
                    let cell = parse_cell(spec.get_ref())
                        .map_err(|m| PolicyError::new(&entry, line, m))?;
                    let cat = cat.into_inner();
                    // A table with tokens only leaves requests unlimited.
                    tier = tier.rules_at(cat.clone(), cell.requests.unwrap_or(None), line);
                    if let Some(tokens) = cell.tokens {
                        tier = tier.tokens_at(cat.clone(), tokens, false, line);
                    }
                    if let Some(n) = cell.concurrency {
                        tier = tier.concurrency_at(cat.clone(), n, false, line);
                    }
                    if let Some(refund) = cell.refund {
                        tier = tier.refund_at(Some(cat), refund, line);
                    }
                }
            }
        }
        b = b.tier(tier);
    }

    // gRPC rules first: their paths (`/package.Service/Method`) never
    // overlap HTTP routes, and the more specific rules should win.
    for (i, spec) in file.grpc.into_iter().enumerate() {
        let line = line_of(spec.span().start);
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

    for (i, spec) in file.routes.into_iter().enumerate() {
        let line = line_of(spec.span().start);
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

    let mut keys: Vec<_> = file.keys.into_iter().collect();
    keys.sort_by_key(|(k, _)| k.span().start);
    for (key, spec) in keys {
        let line = line_of(spec.span().start);
        let (tier, account) = match spec.into_inner() {
            KeySpec::Tier(t) => (t, None),
            KeySpec::Full { tier, account } => (tier, account),
        };
        b = b.key_at(key.into_inner(), tier, account, line);
    }

    let mut overrides: Vec<_> = file.overrides.into_iter().collect();
    overrides.sort_by_key(|(k, _)| k.span().start);
    for (key, cells) in overrides {
        let mut cells: Vec<_> = cells.into_iter().collect();
        cells.sort_by_key(|(c, _)| c.span().start);
        for (cat, spec) in cells {
            let line = line_of(spec.span().start);
            let adjust = parse_adjust(spec.get_ref()).map_err(|m| {
                PolicyError::new(
                    format!(
                        "overrides.\"{}\".{}",
                        crate::KeyId::of(key.get_ref()).redacted(),
                        cat.get_ref()
                    ),
                    line,
                    m,
                )
            })?;
            b = b.custom_limit_at(key.get_ref().clone(), cat.into_inner(), adjust, line);
        }
    }

    for (i, spec) in file.boosts.into_iter().enumerate() {
        let line = line_of(spec.span().start);
        let spec = spec.into_inner();
        let entry = format!("boosts[{i}]");
        let err = |m: String| PolicyError::new(&entry, line, m);
        let target = match (spec.key, spec.tier) {
            (Some(k), None) => BoostTarget::Key(k),
            (None, Some(t)) => BoostTarget::Tier(t),
            _ => return Err(err("a boost names either `key` or `tier`".into())),
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

    if let Some(sh) = file.shadow {
        b = b.shadow(Shadow {
            all: sh.all,
            tiers: sh.tiers,
            categories: sh.categories,
        });
    }

    if let Some(d) = file.defaults {
        let located = |s: Spanned<String>| (line_of(s.span().start), s.into_inner());
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
    }
    b.build()
}

/// Where a parser error may echo the file's text: only in sections that
/// hold no API keys. Anywhere else (`[keys]`, `[overrides.*]`,
/// `[[boosts]]`, and any table the loader does not know, where keys may
/// stand after a typo), the error names the section instead: `Some(name)`.
fn secret_section(source: &str, offset: usize, text: &str) -> Option<&'static str> {
    const PLAIN: [&str; 6] = [
        "tiers",
        "routes",
        "grpc",
        "defaults",
        "shadow",
        "categories",
    ];
    const SECRET: [&str; 3] = ["keys", "overrides", "boosts"];
    let classify = |line: &str| {
        let h = line.trim().trim_start_matches('[').trim_start();
        if PLAIN.iter().any(|p| h.starts_with(p)) {
            None
        } else {
            Some(
                SECRET
                    .into_iter()
                    .find(|s| h.starts_with(s))
                    .unwrap_or("(file)"),
            )
        }
    };
    // The error may sit on a section header itself.
    if text.starts_with('[') {
        return classify(text);
    }
    let before = source.get(..offset).unwrap_or("");
    match before
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
    {
        Some(header) => classify(header),
        // Top level: `categories = …`, or an inline table such as
        // `keys = { … }`.
        None => {
            let line = before.rsplit('\n').next().unwrap_or("");
            let line = if line.trim().is_empty() { text } else { line };
            classify(line)
        }
    }
}

/// A parser message without anything it quotes from the file.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if matches!(c, '`' | '"' | '\'') {
                    quote = Some(c);
                }
            }
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Pool;

    const GOOD: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = "100/hour"
write = "20/hour"

[tiers.pro]
read = "1000/hour"
write = "unlimited"

[[routes]]
method = ["POST", "PUT"]
path = "/v1/jobs"
category = "write"
cost = 5

[keys]
"k1" = "pro"
"#;

    #[test]
    fn grpc_rules_by_service_and_method() {
        let p = parse(&format!(
            "{GOOD}\n[[grpc]]\nservice = \"grpc.health.v1.Health\"\ncategory = \"read\"\n[[grpc]]\nservice = \"demo.v1.Jobs\"\nmethod = \"Submit\"\ncategory = \"write\"\ncost = 2\n"
        ))
        .unwrap();
        let read = p.category("read").unwrap();
        let write = p.category("write").unwrap();
        let post = http::Method::POST;
        use crate::policy::Target::Category;
        assert_eq!(
            p.classify(&post, "/grpc.health.v1.Health/Check"),
            Category {
                category: read,
                cost: 1
            }
        );
        assert_eq!(
            p.classify(&post, "/grpc.health.v1.Health/Watch"),
            Category {
                category: read,
                cost: 1
            }
        );
        assert_eq!(
            p.classify(&post, "/demo.v1.Jobs/Submit"),
            Category {
                category: write,
                cost: 2
            }
        );
        // Unmatched gRPC methods are POSTs: the default write category.
        assert_eq!(
            p.classify(&post, "/demo.v1.Jobs/List"),
            Category {
                category: write,
                cost: 1
            }
        );
    }

    #[test]
    fn parses_in_file_order() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.tier("free").unwrap().index(), 0);
        assert_eq!(p.tier("pro").unwrap().index(), 1);
        assert_eq!(
            p.rule(p.tier("pro").unwrap(), p.category("write").unwrap()),
            Rule::Unlimited
        );
    }

    fn err(src: &str) -> PolicyError {
        parse(src).unwrap_err()
    }

    const LISTS: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = ["10/second", "100/hour"]
write = { requests = "20/hour" }

[tiers.pro]
pool = "account"
read = "1000/hour"
write = "unlimited"

[tiers.pro.per_account]
write = ["5/second", "500/hour"]

[keys]
"k1" = "free"
"k2" = { tier = "pro", account = "acme" }
"#;

    #[test]
    fn lists_tables_pools_and_accounts() {
        let p = parse(LISTS).unwrap();
        let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
        let (read, write) = (p.category("read").unwrap(), p.category("write").unwrap());
        let l = p.limits(free, read);
        assert_eq!(l.per_key(), [Limit::per_second(10), Limit::per_hour(100)]);
        assert!(l.per_account().is_empty());
        assert_eq!(l.pool(), Pool::Key);
        assert_eq!(p.limits(free, write).per_key(), [Limit::per_hour(20)]);
        assert_eq!(p.rule(free, read), Rule::Limited(Limit::per_second(10)));
        let l = p.limits(pro, write);
        assert!(l.per_key().is_empty(), "unlimited per key");
        assert_eq!(
            l.per_account(),
            [Limit::per_second(5), Limit::per_hour(500)]
        );
        assert_eq!(l.pool(), Pool::Account);
        let k2 = crate::KeyId::of("k2");
        assert_eq!(
            p.key_entry("k2", k2),
            Some((pro, Some(crate::KeyId::of_account("acme"))))
        );
        assert_eq!(
            p.key_entry("k1", crate::KeyId::of("k1")),
            Some((free, None))
        );
    }

    #[test]
    fn tokens_refunds_and_their_custom_limits_and_boosts() {
        let src = r#"
categories = ["read", "ai"]
[defaults]
write = "ai"
[tiers.free]
refund_on = ["5xx", "304"]
read = "100/hour"
ai = { requests = "50/hour", tokens = "1000/hour", refund_on = ["5xx"] }
[tiers.pro]
read = "1000/hour"
ai = { tokens = ["20000/minute", "500000/day"] }
[tiers.pro.per_account]
ai = { tokens = "1000000/day" }
[overrides."k1"]
ai = { tokens = "5000/hour" }
[[boosts]]
tier = "pro"
category = "ai"
adjust = "x2"
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
[keys]
"k1" = "free"
"k2" = "pro"
"#;
        let p = parse(src).unwrap();
        let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
        let (read, ai) = (p.category("read").unwrap(), p.category("ai").unwrap());
        let l = p.limits(free, ai);
        assert_eq!(l.per_key(), [Limit::per_hour(50)]);
        assert_eq!(l.tokens(), [Limit::per_hour(1000)]);
        // The category's refund rule replaces the tier's.
        assert!(l.refund_on().matches(502) && !l.refund_on().matches(304));
        assert!(p.limits(free, read).refund_on().matches(304));
        let l = p.limits(pro, ai);
        assert!(l.per_key().is_empty(), "tokens only: requests unlimited");
        assert_eq!(l.tokens().len(), 2);
        assert_eq!(l.account_tokens(), [Limit::per_day(1_000_000)]);
        // A custom limit replaces the key's token limits only.
        let cell = p.cell(free, ai).unwrap();
        let k1 = crate::KeyId::of("k1");
        let a = p.effective(cell, free, ai, k1, 0);
        assert_eq!(a.per_key.as_slice(), [Limit::per_hour(50)]);
        assert_eq!(a.tokens.as_slice(), [Limit::per_hour(5000)]);
        // A boost's multiplier scales token limits, per key and per account.
        let cell = p.cell(pro, ai).unwrap();
        let k2 = crate::KeyId::of("k2");
        let a = p.effective(cell, pro, ai, k2, 1_790_000_000);
        assert_eq!(
            a.tokens.as_slice(),
            [Limit::per_minute(40_000), Limit::per_day(1_000_000)]
        );
        assert_eq!(a.account_tokens.as_slice(), [Limit::per_day(2_000_000)]);
        // Errors name the entry.
        for (bad, message) in [
            ("ai = { tokens = \"unlimited\" }", "leave `tokens` out"),
            ("ai = { tokens = [] }", "empty list"),
            (
                "ai = { requests = \"5/hour\", refund_on = [\"6xx\"] }",
                "not a status",
            ),
            (
                "ai = { requests = \"5/hour\", refund_on = \"5xx\" }",
                "as a list",
            ),
            ("ai = { }", "needs `requests`, `tokens` or `concurrency`"),
            (
                "ai = { requests = \"5/hour\", concurrency = 0 }",
                "from 1 to",
            ),
            (
                "ai = { requests = \"5/hour\", concurrency = -3 }",
                "from 1 to",
            ),
            (
                "ai = { requests = \"5/hour\", concurrency = 2.5 }",
                "from 1 to",
            ),
            (
                "ai = { requests = \"5/hour\", concurrency = \"2\" }",
                "from 1 to",
            ),
            (
                "ai = { requests = \"5/hour\", concurrency = 1000001 }",
                "from 1 to 1000000",
            ),
            (
                "ai = { requests = \"5/hour\", concurency = 2 }",
                "unknown field `concurency`",
            ),
        ] {
            let e = err(&src.replace(
                "ai = { requests = \"50/hour\", tokens = \"1000/hour\", refund_on = [\"5xx\"] }",
                bad,
            ));
            assert_eq!(e.entry(), "tiers.free.ai", "{bad}: {e}");
            assert!(e.message().contains(message), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_lists_and_accounts_are_refused_by_name() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "read = [\"10/second\", \"100/hour\"]",
                "read = []",
                "tiers.free.read",
                "empty list",
            ),
            (
                "read = [\"10/second\", \"100/hour\"]",
                "read = [\"10/second\", \"20/1s\"]",
                "tiers.free.read",
                "same window",
            ),
            (
                "read = [\"10/second\", \"100/hour\"]",
                "read = [\"1/1s\", \"2/2s\", \"3/3s\", \"4/4s\", \"5/5s\", \"6/6s\", \"7/7s\", \"8/8s\", \"9/9s\"]",
                "tiers.free.read",
                "more than 8",
            ),
            (
                "read = [\"10/second\", \"100/hour\"]",
                "read = [\"10/second\", 5]",
                "tiers.free.read",
                "a list such as",
            ),
            (
                "write = { requests = \"20/hour\" }",
                "write = { request = \"20/hour\" }",
                "tiers.free.write",
                "unknown field `request`",
            ),
            (
                "pool = \"account\"",
                "pool = \"org\"",
                "tiers.pro.pool",
                "unknown pool",
            ),
            (
                "write = [\"5/second\", \"500/hour\"]",
                "gpu = \"5/second\"",
                "tiers.pro.per_account.gpu",
                "unknown category",
            ),
            (
                "write = [\"5/second\", \"500/hour\"]",
                "write = \"unlimited\"",
                "tiers.pro.per_account.write",
                "cannot be unlimited",
            ),
            (
                "{ tier = \"pro\", account = \"acme\" }",
                "{ tier = \"pro\", account = \"\" }",
                "keys.",
                "an account",
            ),
        ];
        for (from, to, entry, message) in cases {
            let src = LISTS.replace(from, to);
            assert_ne!(src, LISTS, "{from}");
            let e = err(&src);
            assert!(e.entry().starts_with(entry), "{to}: {e}");
            assert!(e.message().contains(message), "{to}: {e}");
            assert!(e.line().is_some(), "{to}: {e}");
        }
        // A route cost above any limit of a list could never succeed.
        let e = err(&format!(
            "{LISTS}\n[[routes]]\npath = \"/bulk\"\ncategory = \"read\"\ncost = 11\n"
        ));
        assert!(e.message().contains("limit of 10"), "{e}");
        // So is a reserve that leaves a list's smallest burst nothing.
        let e = err(&LISTS.replace(
            "read = [\"10/second\", \"100/hour\"]",
            "read = [\"1/second\", \"100/hour\"]\npriority_reserve = \"10%\"",
        ));
        assert!(e.message().contains("limit of 1 "), "{e}");
        // A custom limit's list must fit beside the per-account limits.
        let e = err(&format!(
            "{LISTS}\n[overrides.\"k2\"]\nwrite = [\"1/1s\", \"2/2s\", \"3/3s\", \"4/4s\", \"5/5s\", \"6/6s\", \"7/7s\"]\n"
        ));
        assert!(e.message().contains("per-account"), "{e}");
        // Names a tier table reads itself cannot be categories.
        let e = err(&LISTS.replace("[\"read\", \"write\"]", "[\"read\", \"write\", \"pool\"]"));
        assert!(e.message().contains("reserved"), "{e}");
    }

    #[test]
    fn concurrency_limits_per_key_and_per_account() {
        let p = Policy::from_toml_str(
            r#"
categories = ["read", "write", "ai"]
[tiers.free]
ai = { requests = "50/hour", concurrency = 2 }
read = { concurrency = 10 }
write = "1/hour"
[tiers.pro]
ai = "500/hour"
read = "1000/hour"
write = "1/hour"
[tiers.pro.per_account]
ai = { concurrency = 20 }
"#,
        )
        .unwrap();
        let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
        let (read, ai) = (p.category("read").unwrap(), p.category("ai").unwrap());
        let l = p.limits(free, ai);
        assert_eq!((l.concurrency(), l.account_concurrency()), (Some(2), None));
        assert_eq!(l.per_key(), [Limit::per_hour(50)]);
        // Concurrency only: no rate limit, and never the unlimited path.
        let l = p.limits(free, read);
        assert_eq!((l.concurrency(), l.per_key()), (Some(10), &[][..]));
        assert!(!p.cell(free, read).unwrap().is_unlimited());
        assert!(p.cell(free, ai).unwrap().single.is_none());
        let l = p.limits(pro, ai);
        assert_eq!((l.concurrency(), l.account_concurrency()), (None, Some(20)));
        assert!(p.limits(pro, read).concurrency().is_none());
        assert!(p.cell(pro, read).unwrap().single.is_some());
        // A custom limit cannot set concurrency.
        let e = err(r#"
categories = ["read", "write"]
[tiers.free]
read = "1/hour"
write = "1/hour"
[keys]
"k" = "free"
[overrides."k"]
read = { requests = "2/hour", concurrency = 3 }
"#);
        assert!(e.message().contains("cannot set `concurrency`"), "{e}");
        let e = err(r#"
categories = ["read", "write"]
[tiers.free]
read = "1/hour"
write = "1/hour"
[tiers.free.per_account]
raed = { concurrency = 3 }
"#);
        assert_eq!(e.entry(), "tiers.free.per_account.raed.concurrency", "{e}");
    }

    #[test]
    fn errors_carry_entry_and_line() {
        let e = err(&GOOD.replace("write = \"20/hour\"", "write = \"0/hour\""));
        assert_eq!((e.entry(), e.line()), ("tiers.free.write", Some(6)));
        assert!(e.message().contains("at least 1"));

        let e = err(&GOOD.replace("category = \"write\"", "category = \"gpu\""));
        assert_eq!((e.entry(), e.line()), ("routes[0]", Some(12)));

        let e = err(&GOOD.replace("category = \"write\"\n", ""));
        assert!(e.message().contains("no category"), "{e}");

        let e = err(&GOOD.replace("\"k1\" = \"pro\"", "\"k1\" = \"gold\""));
        assert_eq!(e.line(), Some(19));
        assert!(e.message().contains("unknown tier `gold`"));

        // Duplicate tier: the TOML parser refuses it, with its line.
        let e = err(&format!("{GOOD}\n[tiers.free]\nread = \"1/h\"\n"));
        assert!(
            e.message().contains("duplicate") || e.message().contains("redefin"),
            "{e}"
        );
        assert!(e.line().is_some());

        let e = err(&format!(
            "{GOOD}\n[[grpc]]\nservice = \"a.B\"\ncategory = \"gpu\"\n"
        ));
        assert_eq!((e.entry(), e.line()), ("grpc[0]", Some(21)), "{e}");
        let e = err(&format!(
            "{GOOD}\n[[grpc]]\nservice = \"a.B/C\"\ncategory = \"read\"\n"
        ));
        assert_eq!(e.entry(), "grpc[0]");

        let e = err(&GOOD.replace("cost = 5", "cots = 5"));
        assert!(e.message().contains("unknown field"), "{e}");
        assert_eq!(e.line(), Some(16));

        let e = err(&GOOD.replace("[\"read\", \"write\"]", "[\"read\", \"write\", \"read\"]"));
        assert_eq!((e.entry(), e.line()), ("categories[2]", Some(2)));
    }

    #[test]
    fn errors_never_print_a_key() {
        let secret = "sk-live-very-secret-key";
        let cases = [
            // A duplicate key (the TOML parser's own error).
            format!("{GOOD}\"{secret}\" = \"free\"\n\"{secret}\" = \"pro\"\n"),
            // A duplicate override table.
            format!(
                "{GOOD}\n[overrides.\"{secret}\"]\nread = \"x2\"\n[overrides.\"{secret}\"]\nread = \"x3\"\n"
            ),
            // An unknown tier, a bad override, a key no request can send.
            format!("{GOOD}\"{secret}\" = \"gold\"\n"),
            format!("{GOOD}\n[overrides.\"{secret}\"]\nread = \"lots\"\n"),
            format!("{GOOD}\"{secret} with spaces\" = \"pro\"\n"),
            format!(
                "{GOOD}\n[[boosts]]\nkey = \"{secret} x\"\nadjust = \"x2\"\nstart = \"1\"\nend = \"2\"\n"
            ),
            // A table the loader does not know (a typo of [keys]).
            format!("{GOOD}\n[kyes]\n\"{secret}\" = \"free\"\n\"{secret}\" = \"free\"\n"),
            // Inline at the top level, with a syntax error.
            format!("keys = {{ \"{secret}\" = \"free\", \"{secret}\" = \"free\" }}\n{GOOD}"),
            format!("{GOOD}\"{secret}\" = free\n"),
        ];
        for (i, src) in cases.iter().enumerate() {
            let e = err(src);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("very-secret"), "case {i}: {shown}");
            assert!(e.line().is_some(), "case {i}: {shown}");
        }
    }

    #[test]
    fn policies_at_the_edges_are_refused() {
        let cases: [(&str, &str, &str); 8] = [
            (
                "read = \"100/hour\"",
                "read = \"1/18446744073709ms\"",
                "tiers.free.read",
            ),
            (
                "read = \"100/hour\"",
                "read = \"2000000/1s\"",
                "tiers.free.read",
            ),
            (
                "read = \"100/hour\"",
                "read = \"1/hour\"\npriority_reserve = \"1%\"",
                "tiers.free.priority_reserve",
            ),
            ("\"k1\" = \"pro\"", "\"pro demo key\" = \"pro\"", "keys."),
            ("\"k1\" = \"pro\"", "\"clé\" = \"pro\"", "keys."),
            ("\"k1\" = \"pro\"", "\"\" = \"pro\"", "keys."),
            ("cost = 5", "cost = 4294967296", "expected u32"),
            ("cost = 5", "cost = 21", "routes[0]"),
        ];
        for (from, to, entry) in cases {
            let src = GOOD.replace(from, to);
            assert_ne!(src, GOOD);
            let e = err(&src);
            assert!(
                e.entry().starts_with(entry) || e.to_string().contains(entry),
                "{to}: {e}"
            );
            assert!(e.line().is_some(), "{to}: {e}");
        }
        let long = "k".repeat(300);
        let e = err(&GOOD.replace("\"k1\"", &format!("\"{long}\"")));
        assert!(e.message().contains("too long"), "{e}");
        assert!(!e.to_string().contains(&long));
        for date in ["2026-02-31", "2026-04-31", "2027-02-29"] {
            let src = format!(
                "{GOOD}\n[[boosts]]\ntier = \"pro\"\nadjust = \"x2\"\nstart = \"{date}T00:00:00Z\"\nend = \"2030-01-01T00:00:00Z\"\n"
            );
            let e = err(&src);
            assert_eq!(e.entry(), "boosts[0]", "{e}");
        }
        let src = format!(
            "{GOOD}\n[[boosts]]\ntier = \"pro\"\nadjust = \"x2\"\nstart = \"999999999-01-01T00:00:00Z\"\nend = \"999999999\"\n"
        );
        assert_eq!(err(&src).entry(), "boosts[0]");
    }
}
