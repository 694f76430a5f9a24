//! Building a [`Policy`]: the builder, its entries (with the line each
//! was written on, when it came from a file), and validation, one section
//! at a time.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hashbrown::HashTable;
use http::Method;

use super::operator::{CompiledBoost, MAX_UNIX};
use super::route::{CompiledRoute, Pattern};
use super::set::{MAX_CONCURRENCY, MAX_LIMITS, Pool, RefundOn};
use super::{
    Adjust, Boost, BoostTarget, CategoryId, Cell, KeyRow, Limit, Metering, Policy, PolicyInner,
    Rule, Shadow, Target, TierId,
};
use crate::key::{KeyId, hash_str};

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
    /// Where it was written (a file's `routes[i]` or `grpc[i]`, and line).
    origin: Option<Origin>,
}

/// Where a route came from in a policy file.
#[derive(Clone, Debug)]
pub(super) struct Origin {
    pub(super) label: String,
    pub(super) line: Option<usize>,
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
            origin: None,
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
            origin: None,
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

    /// A rule as the policy file states it (for the loader).
    pub(super) fn from_file(
        methods: Vec<String>,
        path: String,
        category: Option<String>,
        cost: u32,
        exempt: bool,
    ) -> Self {
        Route {
            methods,
            path,
            category,
            cost,
            exempt,
            origin: None,
        }
    }

    /// Records where the rule was written.
    pub(super) fn at(mut self, label: String, line: Option<usize>) -> Self {
        self.origin = Some(Origin { label, line });
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
    /// `None`: unlimited.
    rules: Vec<Located<(String, Option<Vec<Limit>>)>>,
    per_account: Vec<Located<(String, Vec<Limit>)>>,
    /// Token limits: (category, limits, per account).
    tokens: Vec<Located<(String, Vec<Limit>, bool)>>,
    refund_on: Option<Located<RefundOn>>,
    refunds: Vec<Located<(String, RefundOn)>>,
    /// Concurrency limits: (category, requests at once, per account).
    concurrency: Vec<Located<(String, u32, bool)>>,
    pool: Located<Pool>,
    line: Option<usize>,
    reserve: Option<Located<u8>>,
}

impl Tier {
    /// A tier named `name` with no rules yet.
    pub fn new(name: impl Into<String>) -> Self {
        Tier {
            name: name.into(),
            rules: Vec::new(),
            per_account: Vec::new(),
            tokens: Vec::new(),
            refund_on: None,
            refunds: Vec::new(),
            concurrency: Vec::new(),
            pool: Located::new(Pool::Key),
            line: None,
            reserve: None,
        }
    }

    /// Limits `category` to `limit`.
    pub fn limit(self, category: impl Into<String>, limit: Limit) -> Self {
        self.rule(category, Rule::Limited(limit))
    }

    /// Limits `category` by every one of `limits` at once (a burst guard
    /// and a sustained budget: `[Limit::per_second(10), Limit::per_hour(1_000)]`).
    /// A request is allowed only if all of them admit it, and a refused
    /// request counts against none of them.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier};
    ///
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(
    ///         Tier::new("free")
    ///             .limits("read", [Limit::per_second(10), Limit::per_hour(100)])
    ///             .limit("write", Limit::per_hour(20)),
    ///     )
    ///     .build()
    ///     .unwrap();
    /// let (free, read) = (policy.tier("free").unwrap(), policy.category("read").unwrap());
    /// assert_eq!(policy.limits(free, read).per_key().len(), 2);
    /// ```
    pub fn limits(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.rules
            .push(Located::new((category.into(), Some(limits))));
        self
    }

    /// Adds limits counted per *account* in `category`, on top of the
    /// per-key ones: every key of an account shares them. (A key without
    /// an account is its own account.)
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let pro = Tier::new("pro")
    ///     .limit("write", Limit::per_hour(100))                 // each key
    ///     .per_account("write", [Limit::per_hour(500)]);         // all of an account's keys
    /// # let _ = pro;
    /// ```
    pub fn per_account(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.per_account
            .push(Located::new((category.into(), limits)));
        self
    }

    /// Meters `category` in tokens: a request is admitted only if every
    /// token limit can cover its estimate
    /// ([`Identity::with_tokens`](crate::Identity::with_tokens), else 1),
    /// which it reserves; the difference with what it reports through its
    /// [`TokenMeter`](crate::TokenMeter) is settled when the response ends.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let free = Tier::new("free")
    ///     .limit("ai", Limit::per_hour(50))
    ///     .tokens("ai", [Limit::per_hour(1_000)]);
    /// # let _ = free;
    /// ```
    pub fn tokens(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.tokens
            .push(Located::new((category.into(), limits, false)));
        self
    }

    /// Token limits counted per account, on top of the per-key ones.
    pub fn per_account_tokens(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.tokens
            .push(Located::new((category.into(), limits, true)));
        self
    }

    /// Refunds requests of every category of the tier whose responses
    /// match (`RefundOn::none().class(5)`: server errors).
    pub fn refund_on(mut self, refund: RefundOn) -> Self {
        self.refund_on = Some(Located::new(refund));
        self
    }

    /// Refunds requests of one category whose responses match (in place of
    /// the tier's [`refund_on`](Self::refund_on)).
    pub fn refund_on_category(mut self, category: impl Into<String>, refund: RefundOn) -> Self {
        self.refunds.push(Located::new((category.into(), refund)));
        self
    }

    /// Limits how many requests of `category` one key (one account in a
    /// pooled tier) may have in flight at once. A request takes a lease at
    /// admission, in the same step as its rate limits, and gives it back
    /// when its response body ends or is dropped; a request over the limit
    /// is refused (429 `concurrency-limited`, `Retry-After: 1`) and counts
    /// against no rate limit.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let free = Tier::new("free")
    ///     .limit("ai", Limit::per_hour(50))
    ///     .concurrency("ai", 2); // at most 2 AI calls at once per key
    /// # let _ = free;
    /// ```
    pub fn concurrency(mut self, category: impl Into<String>, requests: u32) -> Self {
        self.concurrency
            .push(Located::new((category.into(), requests, false)));
        self
    }

    /// Limits how many requests of `category` all of an account's keys
    /// together may have in flight at once.
    pub fn per_account_concurrency(mut self, category: impl Into<String>, requests: u32) -> Self {
        self.concurrency
            .push(Located::new((category.into(), requests, true)));
        self
    }

    /// A concurrency limit written on `line` (for the loader).
    pub(super) fn concurrency_at(
        mut self,
        category: String,
        requests: u32,
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        self.concurrency
            .push(Located::at((category, requests, per_account), line));
        self
    }

    /// Token limits written on `line` (for the loader).
    pub(super) fn tokens_at(
        mut self,
        category: String,
        limits: Vec<Limit>,
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        self.tokens
            .push(Located::at((category, limits, per_account), line));
        self
    }

    /// A refund rule written on `line` (for the loader; `None`: the tier's).
    pub(super) fn refund_at(
        mut self,
        category: Option<String>,
        refund: RefundOn,
        line: Option<usize>,
    ) -> Self {
        match category {
            Some(c) => self.refunds.push(Located::at((c, refund), line)),
            None => self.refund_on = Some(Located::at(refund, line)),
        }
        self
    }

    /// Whose count the tier's limits are kept in (default [`Pool::Key`]):
    /// with [`Pool::Account`], all keys of an account share them, so an
    /// account cannot multiply its plan by creating keys.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Located::new(pool);
        self
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
        self.reserve = Some(Located::new(percent));
        self
    }

    /// Sets the rule for `category`.
    pub fn rule(mut self, category: impl Into<String>, rule: Rule) -> Self {
        let limits = match rule {
            Rule::Limited(l) => Some(vec![l]),
            Rule::Unlimited => None,
        };
        self.rules.push(Located::new((category.into(), limits)));
        self
    }

    /// Records the line the tier's table starts on (for the loader).
    pub(super) fn at(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }

    /// Rules written on `line` (for the loader; `None`: unlimited).
    pub(super) fn rules_at(
        mut self,
        category: String,
        limits: Option<Vec<Limit>>,
        line: Option<usize>,
    ) -> Self {
        self.rules.push(Located::at((category, limits), line));
        self
    }

    /// Per-account limits written on `line` (for the loader).
    pub(super) fn per_account_at(
        mut self,
        category: String,
        limits: Vec<Limit>,
        line: Option<usize>,
    ) -> Self {
        self.per_account.push(Located::at((category, limits), line));
        self
    }

    /// A pool written on `line` (for the loader).
    pub(super) fn pool_at(mut self, pool: Pool, line: Option<usize>) -> Self {
        self.pool = Located::at(pool, line);
        self
    }

    /// A reserve written on `line` (for the loader).
    pub(super) fn priority_reserve_at(mut self, percent: u8, line: Option<usize>) -> Self {
        self.reserve = Some(Located::at(percent, line));
        self
    }
}

/// A builder entry and the line of the policy file it was written on (none
/// for entries made in code).
#[derive(Clone, Debug, Default)]
pub(super) struct Located<T> {
    pub(super) value: T,
    pub(super) line: Option<usize>,
}

impl<T> Located<T> {
    fn new(value: T) -> Self {
        Located { value, line: None }
    }

    fn at(value: T, line: Option<usize>) -> Self {
        Located { value, line }
    }
}

/// An API key's tier, as listed.
#[derive(Clone, Debug)]
struct KeyEntry {
    key: String,
    tier: String,
    account: Option<String>,
}

/// A custom limit for one key in one category (or `*`).
#[derive(Clone, Debug)]
struct Override {
    key: String,
    category: String,
    adjust: Adjust,
}

/// An invalid policy: which entry is wrong, where, and why (and, for a
/// file that could not be read, the I/O error as its
/// [`source`](std::error::Error::source)).
#[derive(Clone, Debug)]
pub struct PolicyError {
    entry: String,
    line: Option<usize>,
    message: String,
    source: Option<Arc<std::io::Error>>,
}

impl PartialEq for PolicyError {
    fn eq(&self, other: &Self) -> bool {
        (&self.entry, self.line, &self.message) == (&other.entry, other.line, &other.message)
    }
}

impl Eq for PolicyError {}

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
            source: None,
        }
    }

    /// The policy file could not be read.
    pub(super) fn unreadable(path: &std::path::Path, e: std::io::Error) -> Self {
        PolicyError {
            entry: path.display().to_string(),
            line: None,
            message: format!("cannot read the policy file: {e}"),
            source: Some(Arc::new(e)),
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

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

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
    categories: Vec<Located<String>>,
    tiers: Vec<Tier>,
    routes: Vec<Route>,
    keys: Vec<Located<KeyEntry>>,
    default_read: Option<Located<String>>,
    default_write: Option<Located<String>>,
    unknown_key: Located<KeyRule>,
    missing_key: Located<KeyRule>,
    overrides: Vec<Located<Override>>,
    boosts: Vec<Boost>,
    shadow: Shadow,
    /// Keys refused whatever `unknown_key` says (revoked by an operator).
    revoked: Vec<String>,
}

impl PolicyBuilder {
    /// A custom limit's category as an error may show it (see
    /// `Names::shown_category`), against the categories declared so far.
    pub(super) fn shown_category<'a>(&self, cat: &'a str) -> &'a str {
        shown_category(cat, self.categories.iter().map(|c| c.value.as_str()))
    }
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
        self.overrides.push(Located::new(Override {
            key: key.into(),
            category: category.into(),
            adjust,
        }));
        self
    }

    /// Removes a key's custom limits (all of them).
    pub fn clear_custom_limits(mut self, key: &str) -> Self {
        self.overrides.retain(|o| o.value.key != key);
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

    /// Removes a key's entry (its tier and account) and its custom limits;
    /// the key is then an unknown key. See [`revoke_key`](Self::revoke_key)
    /// to refuse it outright.
    pub fn remove_key(mut self, key: &str) -> Self {
        self.keys.retain(|k| k.value.key != key);
        self.overrides.retain(|o| o.value.key != key);
        self.boosts
            .retain(|b| !matches!(&b.target, BoostTarget::Key(k) if k == key));
        self
    }

    /// Revokes a key: its entry, custom limits and boosts are removed, and
    /// requests with it are refused with 401 even where the policy accepts
    /// unknown keys (`unknown_key = "<tier>"`). Listing the key again
    /// ([`key`](Self::key)) restores it.
    pub fn revoke_key(mut self, key: &str) -> Self {
        self = self.remove_key(key);
        if !self.revoked.iter().any(|k| k == key) {
            self.revoked.push(key.to_owned());
        }
        self
    }

    /// Removes one custom limit of a key (`"*"`: the one for every
    /// category, not the others).
    pub fn remove_custom_limit(mut self, key: &str, category: &str) -> Self {
        self.overrides
            .retain(|o| !(o.value.key == key && o.value.category == category));
        self
    }

    /// Moves a key to another tier (an upgrade), replacing its entry.
    pub fn set_key_tier(mut self, key: &str, tier: impl Into<String>) -> Self {
        let account = self
            .keys
            .iter()
            .find(|k| k.value.key == key)
            .and_then(|k| k.value.account.clone());
        self.keys.retain(|k| k.value.key != key);
        self.key_at(key.to_owned(), tier.into(), account, None)
    }

    /// Declares the endpoint categories, in order.
    pub fn categories<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.categories
            .extend(names.into_iter().map(|n| Located::new(n.into())));
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
    pub fn key(self, key: impl Into<String>, tier: impl Into<String>) -> Self {
        self.key_at(key.into(), tier.into(), None, None)
    }

    /// Maps an API key to a tier and an account: limits counted per account
    /// (a tier with [`Pool::Account`], or [`Tier::per_account`] limits) are
    /// shared by every key of the account.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier, policy::Pool};
    ///
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(
    ///         Tier::new("pro")
    ///             .pool(Pool::Account)
    ///             .limit("read", Limit::per_hour(1000))
    ///             .limit("write", Limit::per_hour(100)),
    ///     )
    ///     .key_in_account("acme-key-1", "pro", "acme")
    ///     .key_in_account("acme-key-2", "pro", "acme")
    ///     .build()
    ///     .unwrap();
    /// # let _ = policy;
    /// ```
    pub fn key_in_account(
        self,
        key: impl Into<String>,
        tier: impl Into<String>,
        account: impl Into<String>,
    ) -> Self {
        self.key_at(key.into(), tier.into(), Some(account.into()), None)
    }

    /// The categories of requests no route matches: `read` for GET, HEAD
    /// and OPTIONS, `write` for the other methods. Defaults to categories
    /// named `read` and `write`.
    pub fn default_categories(mut self, read: impl Into<String>, write: impl Into<String>) -> Self {
        self.default_read = Some(Located::new(read.into()));
        self.default_write = Some(Located::new(write.into()));
        self
    }

    /// What unknown keys get (default: [`KeyRule::Reject`], a 401).
    pub fn unknown_keys(mut self, rule: KeyRule) -> Self {
        self.unknown_key = Located::new(rule);
        self
    }

    /// What requests without a key get (default: [`KeyRule::Reject`], a
    /// 401). With [`KeyRule::Tier`], they are limited per peer address.
    pub fn missing_keys(mut self, rule: KeyRule) -> Self {
        self.missing_key = Located::new(rule);
        self
    }

    // The loader's methods: the same entries, with the line they were
    // written on.

    pub(super) fn category_at(mut self, name: String, line: Option<usize>) -> Self {
        self.categories.push(Located::at(name, line));
        self
    }

    pub(super) fn has_categories(&self) -> bool {
        !self.categories.is_empty()
    }

    pub(super) fn key_at(
        mut self,
        key: String,
        tier: String,
        account: Option<String>,
        line: Option<usize>,
    ) -> Self {
        self.revoked.retain(|k| *k != key);
        self.keys
            .push(Located::at(KeyEntry { key, tier, account }, line));
        self
    }

    pub(super) fn custom_limit_at(
        mut self,
        key: String,
        category: String,
        adjust: Adjust,
        line: Option<usize>,
    ) -> Self {
        let entry = Override {
            key,
            category,
            adjust,
        };
        self.overrides.push(Located::at(entry, line));
        self
    }

    pub(super) fn default_read_at(mut self, name: String, line: Option<usize>) -> Self {
        self.default_read = Some(Located::at(name, line));
        self
    }

    pub(super) fn default_write_at(mut self, name: String, line: Option<usize>) -> Self {
        self.default_write = Some(Located::at(name, line));
        self
    }

    pub(super) fn unknown_keys_at(mut self, rule: KeyRule, line: Option<usize>) -> Self {
        self.unknown_key = Located::at(rule, line);
        self
    }

    pub(super) fn missing_keys_at(mut self, rule: KeyRule, line: Option<usize>) -> Self {
        self.missing_key = Located::at(rule, line);
        self
    }

    /// Validates everything and builds the policy, one section at a time;
    /// the first mistake is returned, naming its entry.
    pub fn build(self) -> Result<Policy, PolicyError> {
        let categories = self.build_categories()?;
        let (tiers, cells) = self.build_tiers(&categories)?;
        let names = Names {
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
        let mut revoked: HashTable<Box<str>> = HashTable::with_capacity(self.revoked.len());
        for key in &self.revoked {
            let h = KeyId::of(key).as_u64();
            if revoked.find(h, |k| **k == **key).is_none() {
                revoked.insert_unique(h, key.as_str().into(), |k| KeyId::of(k).as_u64());
            }
        }
        let reserves = self.build_reserves(&names)?;
        let (overrides, override_sources) = self.build_overrides(&names)?;
        let boosts = self.build_boosts(&names)?;
        let (shadow_tiers, shadow_categories) = self.build_shadow(&names)?;
        Ok(Policy {
            inner: Arc::new(PolicyInner {
                reserves: reserves.into_boxed_slice(),
                overrides,
                override_sources,
                boosts: boosts.into_boxed_slice(),
                shadow_tiers: shadow_tiers.into_boxed_slice(),
                shadow_categories: shadow_categories.into_boxed_slice(),
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
            if ["pool", "per_account", "priority_reserve", "refund_on"].contains(&name.as_str()) {
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

    fn build_tiers(
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
            // A category's index, or the error naming `entry`.
            let category_id = |cat: &str, entry: &str, line: Option<usize>| {
                categories.iter().position(|c| **c == *cat).ok_or_else(|| {
                    PolicyError::new(
                        entry,
                        line,
                        format!("unknown category `{cat}` (declared: {})", join(categories)),
                    )
                })
            };
            // The entry of a category's `what` (per key or per account).
            let entry_of = |cat: &str, what: &str, per_account: bool| {
                if per_account {
                    format!("tiers.{}.per_account.{cat}.{what}", tier.name)
                } else {
                    format!("tiers.{}.{cat}.{what}", tier.name)
                }
            };
            let mut rules: Vec<Option<Vec<Limit>>> = vec![None; categories.len()];
            let mut set = vec![false; categories.len()];
            for Located {
                value: (cat, limits),
                line,
            } in &tier.rules
            {
                let entry = format!("tiers.{}.{}", tier.name, cat);
                let id = category_id(cat, &entry, *line)?;
                if std::mem::replace(&mut set[id], true) {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!("tier `{}` sets `{cat}` twice", tier.name),
                    ));
                }
                if let Some(limits) = limits {
                    check_list(limits).map_err(|m| PolicyError::new(&entry, *line, m))?;
                }
                rules[id] = limits.clone();
            }
            let mut per_account: Vec<Vec<Limit>> = vec![Vec::new(); categories.len()];
            for Located {
                value: (cat, limits),
                line,
            } in &tier.per_account
            {
                let entry = format!("tiers.{}.per_account.{}", tier.name, cat);
                let id = category_id(cat, &entry, *line)?;
                if !per_account[id].is_empty() {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!("tier `{}` sets per-account `{cat}` twice", tier.name),
                    ));
                }
                check_list(limits).map_err(|m| PolicyError::new(&entry, *line, m))?;
                if rules[id].as_ref().map_or(0, Vec::len) + limits.len() > MAX_LIMITS {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!(
                            "`{cat}` has more than {MAX_LIMITS} limits per key and per account together"
                        ),
                    ));
                }
                per_account[id] = limits.clone();
            }
            let mut tokens: Vec<[Vec<Limit>; 2]> = vec![[Vec::new(), Vec::new()]; categories.len()];
            for Located {
                value: (cat, limits, is_account),
                line,
            } in &tier.tokens
            {
                let entry = entry_of(cat, "tokens", *is_account);
                let id = category_id(cat, &entry, *line)?;
                let slot = &mut tokens[id][usize::from(*is_account)];
                if !slot.is_empty() {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!("tier `{}` sets `{cat}`'s tokens twice", tier.name),
                    ));
                }
                check_list(limits).map_err(|m| PolicyError::new(&entry, *line, m))?;
                *slot = limits.clone();
                let total = rules[id].as_ref().map_or(0, Vec::len)
                    + per_account[id].len()
                    + tokens[id][0].len()
                    + tokens[id][1].len();
                if total > MAX_LIMITS {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!(
                            "`{cat}` has more than {MAX_LIMITS} limits of requests and tokens together"
                        ),
                    ));
                }
            }
            let mut refunds: Vec<RefundOn> = vec![
                tier.refund_on
                    .as_ref()
                    .map_or(RefundOn::none(), |r| r.value);
                categories.len()
            ];
            for Located {
                value: (cat, refund),
                line,
            } in &tier.refunds
            {
                let entry = entry_of(cat, "refund_on", false);
                let id = category_id(cat, &entry, *line)?;
                refunds[id] = *refund;
            }
            let mut concurrency: Vec<[Option<u32>; 2]> = vec![[None, None]; categories.len()];
            for Located {
                value: (cat, n, is_account),
                line,
            } in &tier.concurrency
            {
                let entry = entry_of(cat, "concurrency", *is_account);
                let id = category_id(cat, &entry, *line)?;
                if *n == 0 || *n > MAX_CONCURRENCY {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!(
                            "a concurrency limit is a number of requests from 1 to {MAX_CONCURRENCY}"
                        ),
                    ));
                }
                let slot = &mut concurrency[id][usize::from(*is_account)];
                if slot.is_some() {
                    return Err(PolicyError::new(
                        &entry,
                        *line,
                        format!("tier `{}` sets `{cat}`'s concurrency twice", tier.name),
                    ));
                }
                *slot = Some(*n);
            }
            for (i, rule) in rules.into_iter().enumerate() {
                if !set[i] {
                    return Err(PolicyError::new(
                        &entry,
                        tier.line,
                        format!(
                            "tier `{}` has no rule for category `{}`; give a limit such as \"100/hour\" or \"unlimited\"",
                            tier.name, categories[i]
                        ),
                    ));
                }
                let [key_tokens, account_tokens] = std::mem::take(&mut tokens[i]);
                cells.push(Cell::new(
                    rule.unwrap_or_default(),
                    std::mem::take(&mut per_account[i]),
                    Metering {
                        tokens: key_tokens,
                        account_tokens,
                        refund: refunds[i],
                        concurrency: concurrency[i][0],
                        account_concurrency: concurrency[i][1],
                    },
                    tier.pool.value,
                    &tier.name,
                    &categories[i],
                ));
            }
            tier_names.push(tier.name.as_str().into());
        }
        if tier_names.len() > usize::from(u16::MAX) {
            return Err(PolicyError::new("tiers", None, "too many tiers"));
        }
        Ok((tier_names, cells))
    }

    fn build_routes(&self, names: &Names) -> Result<Vec<CompiledRoute>, PolicyError> {
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let (entry, line) = match &r.origin {
                Some(o) => (o.label.clone(), o.line),
                None => (format!("routes[{i}]"), None),
            };
            let err = |m: String| PolicyError::new(&entry, line, m);
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
                    let category = names.category(cat).ok_or_else(|| {
                        err(format!(
                            "unknown category `{cat}` (declared: {})",
                            join(&names.categories)
                        ))
                    })?;
                    if r.cost == 0 {
                        return Err(err(
                            "cost must be at least 1 (use `exempt = true` for free routes)".into(),
                        ));
                    }
                    for (t, name) in names.tiers.iter().enumerate() {
                        if let Some(l) =
                            names.limits(t, category.index()).find(|l| r.cost > l.max())
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
        Ok(routes)
    }

    fn default_category(
        &self,
        spec: Option<&Located<String>>,
        fallback: &str,
        entry: &str,
        names: &Names,
    ) -> Result<CategoryId, PolicyError> {
        let (name, line) = spec.map_or((fallback, None), |l| (l.value.as_str(), l.line));
        names.category(name).ok_or_else(|| {
            PolicyError::new(
                entry,
                line,
                format!(
                    "category `{name}` for requests no route matches is not declared (declared: {})",
                    join(&names.categories)
                ),
            )
        })
    }

    fn build_keys(&self, names: &Names) -> Result<HashTable<KeyRow>, PolicyError> {
        let mut keys: HashTable<KeyRow> = HashTable::with_capacity(self.keys.len());
        for Located {
            value: KeyEntry { key, tier, account },
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
            let account = match account {
                None => None,
                Some(a) => {
                    if a.is_empty() || a.len() > crate::key::DEFAULT_MAX_KEY_LEN {
                        return Err(PolicyError::new(
                            &entry,
                            *line,
                            "an account is a name of 1 to 256 bytes",
                        ));
                    }
                    Some(KeyId::of_account(a))
                }
            };
            let h = hash_str(key);
            if keys.find(h, |row| *row.key == **key).is_some() {
                return Err(PolicyError::new(&entry, *line, "this key is listed twice"));
            }
            keys.insert_unique(
                h,
                KeyRow {
                    key: key.as_str().into(),
                    tier: t,
                    account,
                },
                |row| hash_str(&row.key),
            );
        }
        Ok(keys)
    }

    fn build_reserves(&self, names: &Names) -> Result<Vec<u8>, PolicyError> {
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

    fn build_overrides(
        &self,
        names: &Names,
    ) -> Result<(Overrides, super::overlay::OverrideSources), PolicyError> {
        let ncat = names.categories.len();
        let mut overrides = Overrides::default();
        let mut sources = super::overlay::OverrideSources::default();
        for Located {
            value:
                Override {
                    key,
                    category: cat,
                    adjust,
                },
            line,
        } in &self.overrides
        {
            let shown = names.shown_category(cat);
            let entry = format!("overrides.\"{}\".{shown}", KeyId::of(key).redacted());
            check_key(key, &entry, *line)?;
            names
                .check_adjust(adjust)
                .map_err(|m| PolicyError::new(&entry, *line, m))?;
            let cells = overrides
                .entry(KeyId::of(key).as_u64())
                .or_insert_with(|| vec![None; ncat].into_boxed_slice());
            let parts = sources.entry(KeyId::of(key).as_u64()).or_insert_with(|| {
                super::overlay::OverrideParts {
                    specific: vec![None; ncat].into_boxed_slice(),
                    star: None,
                }
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

    fn build_boosts(&self, names: &Names) -> Result<Vec<CompiledBoost>, PolicyError> {
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
            names.check_adjust(&b.adjust).map_err(err)?;
            let (key, tier) = match &b.target {
                BoostTarget::Key(k) => {
                    check_key(k, &entry, b.line)?;
                    (Some(KeyId::of(k).as_u64()), None)
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
                key,
                tier,
                category,
                adjust: b.adjust.clone(),
                start: b.start,
                end: b.end,
            });
        }
        Ok(boosts)
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

/// Custom limits by key hash: one optional adjustment per category.
pub(super) type Overrides = HashMap<u64, Box<[Option<Adjust>]>, foldhash::fast::RandomState>;

/// The sections validated first, which the others refer to.
struct Names {
    categories: Vec<Box<str>>,
    tiers: Vec<Box<str>>,
    /// Tier-major: `cells[tier × categories + category]`.
    cells: Vec<Cell>,
}

impl Names {
    fn category(&self, name: &str) -> Option<CategoryId> {
        self.categories
            .iter()
            .position(|c| **c == *name)
            .map(|i| CategoryId(i as u16))
    }

    fn tier(&self, name: &str) -> Option<TierId> {
        self.tiers
            .iter()
            .position(|t| **t == *name)
            .map(|i| TierId(i as u16))
    }

    fn check_adjust(&self, adjust: &Adjust) -> Result<(), String> {
        check_adjust(&self.cells, adjust)
    }

    /// Every limit of a cell (per key, then per account).
    fn limits(&self, tier: usize, category: usize) -> impl Iterator<Item = Limit> + '_ {
        let cell = &self.cells[tier * self.categories.len() + category];
        cell.per_key.iter().chain(cell.per_account.iter()).copied()
    }
}

/// A list given by a custom limit or a boost must fit beside every tier's
/// per-account limits (`cells`: every cell of the policy).
pub(super) fn check_adjust(cells: &[Cell], adjust: &Adjust) -> Result<(), String> {
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
    let too_many = cells.iter().any(|c| {
        requests.map_or(c.per_key.len(), <[Limit]>::len)
            + c.per_account.len()
            + tokens.map_or(c.tokens.len(), <[Limit]>::len)
            + c.account_tokens.len()
            > MAX_LIMITS
    });
    if too_many {
        return Err(format!(
            "with the per-account limits, more than {MAX_LIMITS} limits would apply"
        ));
    }
    Ok(())
}

/// A custom limit's category as an error may show it: as written when it
/// is `*`, declared, or a typo of a declared one; else `?`.
fn shown_category<'a, 'b>(cat: &'a str, mut declared: impl Iterator<Item = &'b str>) -> &'a str {
    let known = cat == "*" || declared.any(|c| c == cat || super::file::near(cat, c));
    if known { cat } else { "?" }
}

impl Names {
    /// A custom limit's category as an error may show it: as written when
    /// it is declared (or `*`) or a typo of a declared one, else `?` —
    /// custom limits grouped under a sub-table put a key where the
    /// category goes, and an error never shows a key.
    fn shown_category<'a>(&self, cat: &'a str) -> &'a str {
        shown_category(cat, self.categories.iter().map(|c| &**c))
    }

    /// A `defaults.unknown_key` / `missing_key` rule: reject, or a tier.
    fn key_rule(
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

/// A list of limits for one cell: not empty, at most [`MAX_LIMITS`], no
/// two with the same window (the smaller would make the other pointless).
fn check_list(limits: &[Limit]) -> Result<(), String> {
    if limits.is_empty() {
        return Err("an empty list of limits; write \"unlimited\" or at least one limit".into());
    }
    if limits.len() > MAX_LIMITS {
        return Err(format!("more than {MAX_LIMITS} limits in one list"));
    }
    for (i, a) in limits.iter().enumerate() {
        if limits[..i].iter().any(|b| b.per() == a.per()) {
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

/// The requests of a burst of `max` that a reserve of `pct` percent keeps
/// for critical requests (rounded up).
pub(crate) fn reserve_of(max: u32, pct: u8) -> u32 {
    (u64::from(max) * u64::from(pct)).div_ceil(100) as u32
}

/// Refuses a key no request could ever present (the same rule as
/// [`ApiKey`](crate::ApiKey)'s), naming the entry but never the key.
fn check_key(key: &str, entry: &str, line: Option<usize>) -> Result<(), PolicyError> {
    match crate::key::key_problem(key, crate::key::DEFAULT_MAX_KEY_LEN) {
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
