//! Policies: tiers × categories → limits, routes → categories, keys → tiers.
//!
//! A [`Policy`] is built once (in code with [`Policy::builder`], or from
//! TOML with [`Policy::from_toml_str`] / [`Policy::from_toml_file`]),
//! validated as a whole, and then read on every request without hashing a
//! single tier or category name: both are interned to small indices
//! ([`TierId`], [`CategoryId`]) when the policy is built.
//!
//! # The TOML format
//!
//! ```toml
//! # Endpoint categories, in order.
//! categories = ["read", "write", "ai", "training"]
//!
//! [defaults]
//! read = "read"            # category of GET/HEAD/OPTIONS no route matches
//! write = "write"          # category of every other unmatched method
//! unknown_key = "reject"   # 401, or the name of a tier for unknown keys
//! missing_key = "reject"   # 401, or a tier for anonymous callers (keyed by peer IP)
//!
//! [tiers.free]
//! read = "100/hour"
//! write = "20/hour"
//! ai = "50/hour"
//! training = "5/day"       # or "unlimited"
//!
//! [[routes]]               # first match wins; unmatched requests use the defaults
//! method = "POST"          # optional: one method or a list
//! path = "/v1/training/jobs"
//! category = "training"
//! cost = 1                 # optional, default 1
//!
//! [[routes]]
//! path = "/healthz"
//! exempt = true            # not limited, no key needed
//!
//! [keys]
//! "free-demo-key" = "free"
//! ```
//!
//! Every tier must give a rule for every category. Limits are written
//! `MAX/WINDOW`: `100/hour`, `1,000/h`, `10/30s`, `5/day`.

mod file;
mod limit;
mod operator;
mod route;

use std::fmt;
use std::sync::Arc;

use std::collections::HashMap;

use hashbrown::HashTable;
use http::Method;

use crate::response::SlotHeaders;

use crate::key::{KeyId, hash_str};

pub use limit::{Limit, Rule};
pub use operator::{Adjust, Boost, BoostTarget, Shadow};
use operator::{CompiledBoost, more_generous};
pub use route::Target;
use route::{CompiledRoute, Pattern};

/// A plan tier (`free`, `pro`, …), interned to an index when the policy is
/// built. Obtain one with [`Policy::tier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierId(pub(crate) u16);

/// An endpoint category (`read`, `write`, `ai`, …), interned to an index when
/// the policy is built. Obtain one with [`Policy::category`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CategoryId(pub(crate) u16);

impl TierId {
    /// The tier's position in its policy.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl CategoryId {
    /// The category's position in its policy.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// What to do with a caller whose key is unknown, or who sent none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KeyRule {
    /// Answer 401 (gRPC `UNAUTHENTICATED`).
    #[default]
    Reject,
    /// Limit the caller under this tier. For missing keys, the caller is
    /// identified by its peer address.
    Tier(String),
}

/// A route rule: requests whose method and path match go to a category (or
/// are exempt).
///
/// Path patterns: literal segments, `{name}` or `:name` for one segment, and
/// a final `*` for the rest of the path. gRPC methods are paths too:
/// `/package.Service/Method`, or `/package.Service/*` for a whole service.
///
/// ```
/// use tierlimit::Route;
///
/// let jobs = Route::new("/v1/training/jobs", "training").method("POST");
/// let ai = Route::new("/v1/ai/*", "ai").cost(2);
/// let health = Route::exempt("/healthz");
/// # let _ = (jobs, ai, health);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Route {
    methods: Vec<String>,
    path: String,
    category: Option<String>,
    cost: u32,
    exempt: bool,
    line: Option<usize>,
    label: Option<String>,
}

impl Route {
    /// Requests to `path` (any method) count against `category`.
    pub fn new(path: impl Into<String>, category: impl Into<String>) -> Self {
        Route {
            methods: Vec::new(),
            path: path.into(),
            category: Some(category.into()),
            cost: 1,
            exempt: false,
            line: None,
            label: None,
        }
    }

    /// Requests to `path` are not limited, need no key and get no headers.
    pub fn exempt(path: impl Into<String>) -> Self {
        Route {
            methods: Vec::new(),
            path: path.into(),
            category: None,
            cost: 1,
            exempt: true,
            line: None,
            label: None,
        }
    }

    /// gRPC calls to `service` (a fully qualified name such as
    /// `grpc.health.v1.Health`), or only to its `method`, count against
    /// `category`. gRPC calls no rule matches are POSTs, so they fall in the
    /// default write category.
    ///
    /// ```
    /// use tierlimit::Route;
    ///
    /// let health = Route::grpc("grpc.health.v1.Health", None, "read");
    /// let submit = Route::grpc("demo.v1.Jobs", Some("Submit"), "training");
    /// # let _ = (health, submit);
    /// ```
    pub fn grpc(service: &str, method: Option<&str>, category: impl Into<String>) -> Self {
        let path = format!("/{service}/{}", method.unwrap_or("*"));
        Route::new(path, category).method("POST")
    }

    /// Restricts the rule to one method (call again to add more).
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.methods.push(method.into());
        self
    }

    /// How many units one request takes (default 1). A batch endpoint that
    /// does ten operations per request can cost 10.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }
}

/// A tier's rules, one per category, for [`PolicyBuilder::tier`].
///
/// ```
/// use tierlimit::{Limit, Tier};
///
/// let free = Tier::new("free")
///     .limit("read", Limit::per_hour(100))
///     .limit("training", Limit::per_day(5));
/// let enterprise = Tier::new("enterprise").unlimited("training");
/// # let _ = (free, enterprise);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Tier {
    name: String,
    rules: Vec<(String, Rule, Option<usize>)>,
    line: Option<usize>,
    reserve: Option<(u8, Option<usize>)>,
}

impl Tier {
    /// A tier named `name` with no rules yet.
    pub fn new(name: impl Into<String>) -> Self {
        Tier {
            name: name.into(),
            rules: Vec::new(),
            line: None,
            reserve: None,
        }
    }

    /// Limits `category` to `limit`.
    pub fn limit(self, category: impl Into<String>, limit: Limit) -> Self {
        self.rule(category, Rule::Limited(limit))
    }

    /// Leaves `category` unlimited.
    pub fn unlimited(self, category: impl Into<String>) -> Self {
        self.rule(category, Rule::Unlimited)
    }

    /// Reserves `percent` of every category's burst for requests that
    /// declare `X-Request-Priority: critical`: normal and sheddable requests
    /// are refused once only the reserve is left. Without a reserve, the
    /// tier ignores the header.
    pub fn priority_reserve(mut self, percent: u8) -> Self {
        self.reserve = Some((percent, None));
        self
    }

    /// Sets the rule for `category`.
    pub fn rule(mut self, category: impl Into<String>, rule: Rule) -> Self {
        self.rules.push((category.into(), rule, None));
        self
    }
}

/// An invalid policy: which entry is wrong, where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    entry: String,
    line: Option<usize>,
    message: String,
}

impl PolicyError {
    pub(crate) fn new(
        entry: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            entry: entry.into(),
            line,
            message: message.into(),
        }
    }

    /// The offending entry, as a TOML path (`tiers.free.read`, `routes[2]`).
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The line in the policy file, when the policy came from one.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy entry `{}`", self.entry)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Builds a [`Policy`] in code. Every mistake is reported by
/// [`build`](Self::build), naming the entry.
///
/// ```
/// use tierlimit::{Limit, Policy, Route, Tier};
///
/// let policy = Policy::builder()
///     .categories(["read", "write"])
///     .tier(Tier::new("free").limit("read", Limit::per_hour(100)).limit("write", Limit::per_hour(20)))
///     .route(Route::exempt("/healthz"))
///     .key("free-demo-key", "free")
///     .build()
///     .unwrap();
/// assert_eq!(policy.tier_name(policy.tier("free").unwrap()), "free");
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct PolicyBuilder {
    categories: Vec<(String, Option<usize>)>,
    tiers: Vec<Tier>,
    routes: Vec<Route>,
    keys: Vec<(String, String, Option<usize>)>,
    default_read: Option<(String, Option<usize>)>,
    default_write: Option<(String, Option<usize>)>,
    unknown_key: (KeyRule, Option<usize>),
    missing_key: (KeyRule, Option<usize>),
    overrides: Vec<(String, String, Adjust, Option<usize>)>,
    boosts: Vec<Boost>,
    shadow: Shadow,
}

impl PolicyBuilder {
    /// A custom limit for one API key in one category (`"*"`: every
    /// category). It takes precedence over the key's tier limit.
    pub fn custom_limit(
        mut self,
        key: impl Into<String>,
        category: impl Into<String>,
        adjust: Adjust,
    ) -> Self {
        self.overrides
            .push((key.into(), category.into(), adjust, None));
        self
    }

    /// Removes a key's custom limits (all of them).
    pub fn clear_custom_limits(mut self, key: &str) -> Self {
        self.overrides.retain(|(k, ..)| k != key);
        self
    }

    /// Adds a temporary boost.
    pub fn boost(mut self, boost: Boost) -> Self {
        self.boosts.push(boost);
        self
    }

    /// Sets where shadow mode applies.
    pub fn shadow(mut self, shadow: Shadow) -> Self {
        self.shadow = shadow;
        self
    }

    /// Moves a key to another tier (an upgrade), replacing its entry.
    pub fn set_key_tier(mut self, key: &str, tier: impl Into<String>) -> Self {
        self.keys.retain(|(k, ..)| k != key);
        self.keys.push((key.to_owned(), tier.into(), None));
        self
    }

    /// Declares the endpoint categories, in order.
    pub fn categories<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.categories
            .extend(names.into_iter().map(|n| (n.into(), None)));
        self
    }

    /// Adds a tier.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tiers.push(tier);
        self
    }

    /// Adds a route rule; rules are tried in the order they were added.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Maps an API key to a tier.
    pub fn key(mut self, key: impl Into<String>, tier: impl Into<String>) -> Self {
        self.keys.push((key.into(), tier.into(), None));
        self
    }

    /// The categories of requests no route matches: `read` for GET, HEAD
    /// and OPTIONS, `write` for the other methods. Defaults to categories
    /// named `read` and `write`.
    pub fn default_categories(mut self, read: impl Into<String>, write: impl Into<String>) -> Self {
        self.default_read = Some((read.into(), None));
        self.default_write = Some((write.into(), None));
        self
    }

    /// What unknown keys get (default: [`KeyRule::Reject`], a 401).
    pub fn unknown_keys(mut self, rule: KeyRule) -> Self {
        self.unknown_key = (rule, None);
        self
    }

    /// What requests without a key get (default: [`KeyRule::Reject`], a
    /// 401). With [`KeyRule::Tier`], they are limited per peer address.
    pub fn missing_keys(mut self, rule: KeyRule) -> Self {
        self.missing_key = (rule, None);
        self
    }

    /// Validates everything and builds the policy.
    pub fn build(self) -> Result<Policy, PolicyError> {
        // Categories.
        if self.categories.is_empty() {
            return Err(PolicyError::new(
                "categories",
                None,
                "at least one category is needed",
            ));
        }
        let mut categories: Vec<Box<str>> = Vec::with_capacity(self.categories.len());
        for (i, (name, line)) in self.categories.iter().enumerate() {
            check_name(name).map_err(|m| PolicyError::new(format!("categories[{i}]"), *line, m))?;
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
        let category_id = |name: &str| {
            categories
                .iter()
                .position(|c| **c == *name)
                .map(|i| CategoryId(i as u16))
        };

        // Tiers.
        if self.tiers.is_empty() {
            return Err(PolicyError::new(
                "tiers",
                None,
                "at least one tier is needed",
            ));
        }
        let mut tier_names: Vec<Box<str>> = Vec::with_capacity(self.tiers.len());
        let mut slots: Vec<Slot> = Vec::with_capacity(self.tiers.len() * categories.len());
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
            let mut rules: Vec<Option<Rule>> = vec![None; categories.len()];
            for (cat, rule, line) in &tier.rules {
                let entry = format!("tiers.{}.{}", tier.name, cat);
                let id = category_id(cat).ok_or_else(|| {
                    PolicyError::new(
                        &entry,
                        *line,
                        format!("unknown category `{cat}` (declared: {})", join(&categories)),
                    )
                })?;
                if rules[id.index()].replace(*rule).is_some() {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!("tier `{}` sets `{cat}` twice", tier.name),
                    ));
                }
            }
            for (i, rule) in rules.into_iter().enumerate() {
                let rule = rule.ok_or_else(|| {
                    PolicyError::new(
                        &entry,
                        tier.line,
                        format!(
                            "tier `{}` has no rule for category `{}`; give a limit such as \"100/hour\" or \"unlimited\"",
                            tier.name, categories[i]
                        ),
                    )
                })?;
                slots.push(Slot::new(rule, &tier.name, &categories[i]));
            }
            tier_names.push(tier.name.as_str().into());
        }
        if tier_names.len() > usize::from(u16::MAX) {
            return Err(PolicyError::new("tiers", None, "too many tiers"));
        }
        let tier_id = |name: &str| {
            tier_names
                .iter()
                .position(|t| **t == *name)
                .map(|i| TierId(i as u16))
        };
        let ncat = categories.len();

        // Routes.
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let entry = r.label.clone().unwrap_or_else(|| format!("routes[{i}]"));
            let err = |m: String| PolicyError::new(&entry, r.line, m);
            let pattern = Pattern::parse(&r.path).map_err(err)?;
            let methods = if r.methods.is_empty() {
                None
            } else {
                let mut ms = Vec::with_capacity(r.methods.len());
                for m in &r.methods {
                    let m = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| err(format!("`{m}` is not an HTTP method")))?;
                    ms.push(m);
                }
                Some(ms.into_boxed_slice())
            };
            let target = match (&r.category, r.exempt) {
                (Some(_), true) => {
                    return Err(err(format!(
                        "route `{}` is exempt and also names a category; choose one",
                        r.path
                    )));
                }
                (None, true) => Target::Exempt,
                (None, false) => {
                    return Err(err(format!(
                        "route `{}` has no category; name one, or mark it `exempt = true`",
                        r.path
                    )));
                }
                (Some(cat), false) => {
                    let category = category_id(cat).ok_or_else(|| {
                        err(format!(
                            "unknown category `{cat}` (declared: {})",
                            join(&categories)
                        ))
                    })?;
                    if r.cost == 0 {
                        return Err(err(
                            "cost must be at least 1 (use `exempt = true` for free routes)".into(),
                        ));
                    }
                    for (t, name) in tier_names.iter().enumerate() {
                        if let Rule::Limited(l) = slots[t * ncat + category.index()].rule
                            && r.cost > l.max()
                        {
                            return Err(err(format!(
                                "cost {} is larger than tier `{name}`'s `{cat}` limit of {}, so such requests could never succeed",
                                r.cost,
                                l.max()
                            )));
                        }
                    }
                    Target::Category {
                        category,
                        cost: r.cost,
                    }
                }
            };
            routes.push(CompiledRoute {
                methods,
                pattern,
                target,
            });
        }

        // Default categories.
        let default_cat = |spec: &Option<(String, Option<usize>)>, fallback: &str, entry: &str| {
            let (name, line) = spec
                .as_ref()
                .map_or((fallback, None), |(n, l)| (n.as_str(), *l));
            category_id(name).ok_or_else(|| {
                PolicyError::new(
                    entry,
                    line,
                    format!(
                        "category `{name}` for requests no route matches is not declared (declared: {})",
                        join(&categories)
                    ),
                )
            })
        };
        let default_read = default_cat(&self.default_read, "read", "defaults.read")?;
        let default_write = default_cat(&self.default_write, "write", "defaults.write")?;

        // Key rules.
        let key_fallback = |(rule, line): &(KeyRule, Option<usize>), entry: &str| match rule {
            KeyRule::Reject => Ok(None),
            KeyRule::Tier(t) => tier_id(t).map(Some).ok_or_else(|| {
                PolicyError::new(
                    entry,
                    *line,
                    format!("unknown tier `{t}` (declared: {})", join(&tier_names)),
                )
            }),
        };
        let unknown_key = key_fallback(&self.unknown_key, "defaults.unknown_key")?;
        let missing_key = key_fallback(&self.missing_key, "defaults.missing_key")?;

        // Keys.
        let mut keys: HashTable<(Box<str>, TierId)> = HashTable::with_capacity(self.keys.len());
        for (key, tier, line) in &self.keys {
            let entry = format!("keys.\"{}\"", KeyId::of(key).redacted());
            check_key(key, &entry, *line)?;
            let t = tier_id(tier).ok_or_else(|| {
                PolicyError::new(
                    &entry,
                    *line,
                    format!("unknown tier `{tier}` (declared: {})", join(&tier_names)),
                )
            })?;
            let h = hash_str(key);
            if keys.find(h, |(k, _)| **k == **key).is_some() {
                return Err(PolicyError::new(&entry, *line, "this key is listed twice"));
            }
            keys.insert_unique(h, (key.as_str().into(), t), |(k, _)| hash_str(k));
        }

        // Priority reserves.
        let mut reserves = Vec::with_capacity(self.tiers.len());
        for tier in &self.tiers {
            let pct = match tier.reserve {
                None => 0,
                Some((p, line)) if p >= 100 => {
                    return Err(PolicyError::new(
                        format!("tiers.{}.priority_reserve", tier.name),
                        line.or(tier.line),
                        format!(
                            "a reserve of {p}% leaves nothing for normal requests; use 1 to 99"
                        ),
                    ));
                }
                Some((p, line)) => {
                    // Every limited cell of the tier must leave normal
                    // requests at least one request of its burst.
                    let t = tier_id(&tier.name).map_or(0, TierId::index);
                    for (c, cat) in categories.iter().enumerate() {
                        if let Rule::Limited(l) = slots[t * ncat + c].rule
                            && reserve_of(l.max(), p) >= l.max()
                        {
                            return Err(PolicyError::new(
                                format!("tiers.{}.priority_reserve", tier.name),
                                line.or(tier.line),
                                format!(
                                    "a reserve of {p}% of `{cat}`'s limit of {} leaves nothing for normal requests; raise the limit or lower the reserve",
                                    l.max()
                                ),
                            ));
                        }
                    }
                    p
                }
            };
            reserves.push(pct);
        }

        // Custom limits per key.
        let mut overrides: HashMap<u64, Box<[Option<Adjust>]>, foldhash::fast::RandomState> =
            HashMap::default();
        for (key, cat, adjust, line) in &self.overrides {
            let entry = format!("overrides.\"{}\".{cat}", KeyId::of(key).redacted());
            check_key(key, &entry, *line)?;
            let cells = overrides
                .entry(KeyId::of(key).as_u64())
                .or_insert_with(|| vec![None; ncat].into_boxed_slice());
            if cat == "*" {
                for c in cells.iter_mut().filter(|c| c.is_none()) {
                    *c = Some(*adjust);
                }
            } else {
                let id = category_id(cat).ok_or_else(|| {
                    PolicyError::new(
                        &entry,
                        *line,
                        format!("unknown category `{cat}` (declared: {})", join(&categories)),
                    )
                })?;
                cells[id.index()] = Some(*adjust);
            }
        }

        // Boosts.
        let mut boosts = Vec::with_capacity(self.boosts.len());
        for (i, b) in self.boosts.iter().enumerate() {
            let entry = format!("boosts[{i}]");
            if b.start >= b.end {
                return Err(PolicyError::new(
                    &entry,
                    b.line,
                    "a boost must start before it ends",
                ));
            }
            if b.end > operator::MAX_UNIX {
                return Err(PolicyError::new(
                    &entry,
                    b.line,
                    "a boost must end by the end of year 9999",
                ));
            }
            let (key, tier) = match &b.target {
                BoostTarget::Key(k) => {
                    check_key(k, &entry, b.line)?;
                    (Some(KeyId::of(k).as_u64()), None)
                }
                BoostTarget::Tier(t) => (
                    None,
                    Some(tier_id(t).ok_or_else(|| {
                        PolicyError::new(
                            &entry,
                            b.line,
                            format!("unknown tier `{t}` (declared: {})", join(&tier_names)),
                        )
                    })?),
                ),
            };
            let category = match &b.category {
                None => None,
                Some(c) => Some(category_id(c).ok_or_else(|| {
                    PolicyError::new(
                        &entry,
                        b.line,
                        format!("unknown category `{c}` (declared: {})", join(&categories)),
                    )
                })?),
            };
            boosts.push(CompiledBoost {
                key,
                tier,
                category,
                adjust: b.adjust,
                start: b.start,
                end: b.end,
            });
        }

        // Shadow mode.
        let mut shadow_tiers = vec![self.shadow.all; tier_names.len()];
        for t in &self.shadow.tiers {
            let id = tier_id(t).ok_or_else(|| {
                PolicyError::new(
                    "shadow.tiers",
                    None,
                    format!("unknown tier `{t}` (declared: {})", join(&tier_names)),
                )
            })?;
            shadow_tiers[id.index()] = true;
        }
        let mut shadow_categories = vec![false; ncat];
        for c in &self.shadow.categories {
            let id = category_id(c).ok_or_else(|| {
                PolicyError::new(
                    "shadow.categories",
                    None,
                    format!("unknown category `{c}` (declared: {})", join(&categories)),
                )
            })?;
            shadow_categories[id.index()] = true;
        }

        Ok(Policy {
            inner: Arc::new(PolicyInner {
                reserves: reserves.into_boxed_slice(),
                overrides,
                boosts: boosts.into_boxed_slice(),
                shadow_tiers: shadow_tiers.into_boxed_slice(),
                shadow_categories: shadow_categories.into_boxed_slice(),
                source: self.clone(),
                tiers: tier_names.into_boxed_slice(),
                categories: categories.into_boxed_slice(),
                slots: slots.into_boxed_slice(),
                routes: routes.into_boxed_slice(),
                default_read,
                default_write,
                keys,
                unknown_key,
                missing_key,
            }),
        })
    }
}

/// The requests of a burst of `max` that a reserve of `pct` percent keeps
/// for critical requests (rounded up).
pub(crate) fn reserve_of(max: u32, pct: u8) -> u32 {
    (u64::from(max) * u64::from(pct)).div_ceil(100) as u32
}

/// Refuses a key no request could ever present (the same rule as
/// [`ApiKey`](crate::ApiKey)'s), naming the entry but never the key.
fn check_key(key: &str, entry: &str, line: Option<usize>) -> Result<(), PolicyError> {
    match crate::extract::key_problem(key, crate::extract::DEFAULT_MAX_KEY_LEN) {
        None => Ok(()),
        Some(why) => Err(PolicyError::new(
            entry,
            line,
            format!("{why}, so no request could ever present it"),
        )),
    }
}

fn check_name(name: &str) -> Result<(), String> {
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

fn join(names: &[Box<str>]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One cell of the tier × category table, with everything the hot path
/// needs precomputed.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) rule: Rule,
    /// Separates this cell's buckets from every other cell's in a backend
    /// (a hash of the tier and category names, stable in one process).
    pub(crate) scope: u64,
    pub(crate) headers: Arc<SlotHeaders>,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: std::sync::OnceLock<crate::telemetry::SlotMetrics>,
}

impl Slot {
    fn new(rule: Rule, tier: &str, category: &str) -> Self {
        let (max, window) = match rule {
            Rule::Limited(l) => (l.max(), l.per()),
            Rule::Unlimited => (0, std::time::Duration::ZERO),
        };
        Slot {
            rule,
            scope: hash_str(&format!("{tier}\0{category}")),
            headers: Arc::new(SlotHeaders::new(tier, category, max, window)),
            #[cfg(feature = "metrics")]
            metrics: std::sync::OnceLock::new(),
        }
    }
}

#[derive(Debug)]
struct PolicyInner {
    tiers: Box<[Box<str>]>,
    categories: Box<[Box<str>]>,
    slots: Box<[Slot]>,
    routes: Box<[CompiledRoute]>,
    default_read: CategoryId,
    default_write: CategoryId,
    keys: HashTable<(Box<str>, TierId)>,
    unknown_key: Option<TierId>,
    missing_key: Option<TierId>,
    reserves: Box<[u8]>,
    overrides: HashMap<u64, Box<[Option<Adjust>]>, foldhash::fast::RandomState>,
    boosts: Box<[CompiledBoost]>,
    shadow_tiers: Box<[bool]>,
    shadow_categories: Box<[bool]>,
    source: PolicyBuilder,
}

/// A validated rate-limit policy. Cheap to clone (one `Arc`).
///
/// ```
/// let policy = tierlimit::Policy::from_toml_str(r#"
///     categories = ["read", "write"]
///     [tiers.free]
///     read = "100/hour"
///     write = "20/hour"
/// "#).unwrap();
/// let free = policy.tier("free").unwrap();
/// let read = policy.category("read").unwrap();
/// assert_eq!(policy.rule(free, read).to_string(), "100 per hour");
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

impl Policy {
    /// Starts a policy in code.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// Parses and validates a TOML policy.
    pub fn from_toml_str(source: &str) -> Result<Policy, PolicyError> {
        file::parse(source)
    }

    /// Reads, parses and validates a TOML policy file.
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let source = std::fs::read_to_string(path).map_err(|e| {
            PolicyError::new(
                path.display().to_string(),
                None,
                format!("cannot read the policy file: {e}"),
            )
        })?;
        file::parse(&source)
    }

    /// The tier named `name`.
    pub fn tier(&self, name: &str) -> Option<TierId> {
        self.inner
            .tiers
            .iter()
            .position(|t| **t == *name)
            .map(|i| TierId(i as u16))
    }

    /// The category named `name`.
    pub fn category(&self, name: &str) -> Option<CategoryId> {
        self.inner
            .categories
            .iter()
            .position(|c| **c == *name)
            .map(|i| CategoryId(i as u16))
    }

    /// Every tier, in declaration order.
    pub fn tiers(&self) -> impl ExactSizeIterator<Item = TierId> + '_ {
        (0..self.inner.tiers.len()).map(|i| TierId(i as u16))
    }

    /// Every category, in declaration order.
    pub fn categories(&self) -> impl ExactSizeIterator<Item = CategoryId> + '_ {
        (0..self.inner.categories.len()).map(|i| CategoryId(i as u16))
    }

    /// A tier's name. Ids from another policy may name another tier; an id
    /// out of range gives `"?"`.
    pub fn tier_name(&self, tier: TierId) -> &str {
        self.inner.tiers.get(tier.index()).map_or("?", |t| t)
    }

    /// A category's name (see [`tier_name`](Self::tier_name)).
    pub fn category_name(&self, category: CategoryId) -> &str {
        self.inner
            .categories
            .get(category.index())
            .map_or("?", |c| c)
    }

    /// The rule of one tier in one category. Ids out of range give
    /// [`Rule::Unlimited`] only if no slot exists; prefer ids from this policy.
    pub fn rule(&self, tier: TierId, category: CategoryId) -> Rule {
        self.slot(tier, category)
            .map_or(Rule::Unlimited, |s| s.rule)
    }

    pub(crate) fn slot(&self, tier: TierId, category: CategoryId) -> Option<&Slot> {
        if category.index() >= self.inner.categories.len() {
            return None;
        }
        self.inner
            .slots
            .get(tier.index() * self.inner.categories.len() + category.index())
    }

    /// Where a request goes: the first matching route, else the default
    /// category for its method.
    pub fn classify(&self, method: &Method, path: &str) -> Target {
        for r in self.inner.routes.iter() {
            if r.matches(method, path) {
                return r.target;
            }
        }
        let category =
            if *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS {
                self.inner.default_read
            } else {
                self.inner.default_write
            };
        Target::Category { category, cost: 1 }
    }

    /// The tier the policy's key table gives `key`, comparing the full text.
    /// `id` must be `KeyId::of(key)`.
    #[inline]
    pub fn key_tier(&self, key: &str, id: KeyId) -> Option<TierId> {
        self.inner
            .keys
            .find(id.as_u64(), |(k, _)| **k == *key)
            .map(|(_, t)| *t)
    }

    /// The rule that applies to `key` in a tier and category at `now_unix`
    /// (seconds): the tier's rule, then the key's custom limit (which takes
    /// precedence), then the most generous active boost for the key or its
    /// tier, if it is more generous.
    pub fn effective_rule(
        &self,
        tier: TierId,
        category: CategoryId,
        key: KeyId,
        now_unix: u64,
    ) -> Rule {
        let mut rule = self.rule(tier, category);
        if let Some(cells) = self.inner.overrides.get(&key.as_u64())
            && let Some(Some(adjust)) = cells.get(category.index())
        {
            rule = adjust.apply(rule);
        }
        let base = rule;
        for b in self.inner.boosts.iter() {
            if b.applies(key.as_u64(), tier, category, now_unix) {
                let boosted = b.adjust.apply(base);
                if more_generous(boosted, rule) {
                    rule = boosted;
                }
            }
        }
        rule
    }

    /// Whether any custom limit or boost exists (else the tier rule is final).
    #[inline]
    pub(crate) fn has_adjustments(&self) -> bool {
        !self.inner.overrides.is_empty() || !self.inner.boosts.is_empty()
    }

    /// Whether the policy has boosts (which need the time of day).
    #[inline]
    pub(crate) fn has_boosts(&self) -> bool {
        !self.inner.boosts.is_empty()
    }

    /// The share of each burst a tier reserves for critical requests, in
    /// percent (0: the tier ignores `X-Request-Priority`).
    pub fn priority_reserve(&self, tier: TierId) -> u8 {
        self.inner.reserves.get(tier.index()).copied().unwrap_or(0)
    }

    /// Whether shadow mode applies to a tier and category.
    pub fn is_shadow(&self, tier: TierId, category: CategoryId) -> bool {
        self.inner
            .shadow_tiers
            .get(tier.index())
            .copied()
            .unwrap_or(false)
            || self
                .inner
                .shadow_categories
                .get(category.index())
                .copied()
                .unwrap_or(false)
    }

    /// This policy's definition, to change and build again (for run-time
    /// edits through a [`PolicyHandle`](crate::PolicyHandle)).
    pub fn to_builder(&self) -> PolicyBuilder {
        self.inner.source.clone()
    }

    /// The counters of a tier × category cell (made on first use).
    #[cfg(feature = "metrics")]
    pub(crate) fn slot_metrics(
        &self,
        tier: TierId,
        category: CategoryId,
    ) -> Option<&crate::telemetry::SlotMetrics> {
        let slot = self.slot(tier, category)?;
        Some(slot.metrics.get_or_init(|| {
            crate::telemetry::SlotMetrics::new(self.tier_name(tier), self.category_name(category))
        }))
    }

    /// The tier for keys the policy does not know, if they are accepted.
    pub fn unknown_key_tier(&self) -> Option<TierId> {
        self.inner.unknown_key
    }

    /// The tier for requests without a key (limited per peer address), if
    /// they are accepted.
    pub fn missing_key_tier(&self) -> Option<TierId> {
        self.inner.missing_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PolicyBuilder {
        Policy::builder().categories(["read", "write"]).tier(
            Tier::new("free")
                .limit("read", Limit::per_hour(100))
                .limit("write", Limit::per_hour(20)),
        )
    }

    #[test]
    fn builds_and_classifies() {
        let p = base()
            .route(Route::new("/v1/w/*", "write").method("get"))
            .route(Route::exempt("/healthz"))
            .build()
            .unwrap();
        let read = p.category("read").unwrap();
        let write = p.category("write").unwrap();
        assert_eq!(
            p.classify(&Method::GET, "/x"),
            Target::Category {
                category: read,
                cost: 1
            }
        );
        assert_eq!(
            p.classify(&Method::HEAD, "/x"),
            Target::Category {
                category: read,
                cost: 1
            }
        );
        assert_eq!(
            p.classify(&Method::DELETE, "/x"),
            Target::Category {
                category: write,
                cost: 1
            }
        );
        assert_eq!(
            p.classify(&Method::GET, "/v1/w/a"),
            Target::Category {
                category: write,
                cost: 1
            }
        );
        assert_eq!(p.classify(&Method::GET, "/healthz"), Target::Exempt);
    }

    #[test]
    fn errors_name_the_entry() {
        let e = base().tier(Tier::new("free")).build().unwrap_err();
        assert_eq!(e.entry(), "tiers.free");
        assert!(e.message().contains("declared twice"));

        let e = base()
            .tier(Tier::new("pro").limit("read", Limit::per_hour(1)))
            .build()
            .unwrap_err();
        assert_eq!(e.entry(), "tiers.pro");
        assert!(e.message().contains("no rule for category `write`"));

        let e = base()
            .tier(Tier::new("pro").limit("gpu", Limit::per_hour(1)))
            .build()
            .unwrap_err();
        assert_eq!(e.entry(), "tiers.pro.gpu");

        let e = base().route(Route::new("/a", "nope")).build().unwrap_err();
        assert_eq!(e.entry(), "routes[0]");
        assert!(e.message().contains("unknown category `nope`"));

        let e = base()
            .route(Route::new("/a", "write").cost(21))
            .build()
            .unwrap_err();
        assert!(e.message().contains("could never succeed"), "{e}");

        let e = base().key("k", "gold").build().unwrap_err();
        assert!(e.message().contains("unknown tier `gold`"));
        assert!(!e.to_string().contains("\"k\""), "never print the key: {e}");

        let e = base()
            .key("k", "free")
            .key("k", "free")
            .build()
            .unwrap_err();
        assert!(e.message().contains("twice"));

        let e = base()
            .unknown_keys(KeyRule::Tier("gold".into()))
            .build()
            .unwrap_err();
        assert_eq!(e.entry(), "defaults.unknown_key");

        let e = Policy::builder()
            .categories(["a", "a"])
            .build()
            .unwrap_err();
        assert_eq!(e.entry(), "categories[1]");
    }

    #[test]
    fn key_table_compares_full_text() {
        let p = base().key("alpha", "free").build().unwrap();
        let free = p.tier("free");
        assert_eq!(p.key_tier("alpha", KeyId::of("alpha")), free);
        assert_eq!(p.key_tier("beta", KeyId::of("beta")), None);
        // A forged id cannot borrow another key's tier.
        assert_eq!(p.key_tier("beta", KeyId::of("alpha")), None);
    }
}
