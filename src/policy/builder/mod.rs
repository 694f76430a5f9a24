//! Building a [`Policy`](crate::Policy): the builder, its entries (with the line each
//! was written on, when it came from a file), and validation, one section
//! at a time.
//!
//! - `mod.rs`: [`PolicyBuilder`] and its entries;
//! - `build.rs`: [`PolicyBuilder::build`], categories, revocations, shadow mode;
//! - `tier.rs`: [`Tier`]; `tiers.rs`: the `[tiers.*]` sections (one loop
//!   for every kind of a tier's entries);
//! - `routes.rs`: [`Route`] and the routes; `keys.rs`: the key table;
//! - `overrides.rs`: priority reserves, custom limits and boosts;
//! - `names.rs`: the names the sections refer to, and the checks of names
//!   and lists; `error.rs`: [`PolicyError`].

mod build;
mod error;
mod keys;
mod names;
mod overrides;
mod routes;
mod tier;
mod tiers;

pub use error::PolicyError;
pub(crate) use overrides::reserve_of;
pub(super) use overrides::{Overrides, check_adjust};
pub use routes::Route;
pub use tier::Tier;

use crate::limit::Per;
use crate::policy::{Adjust, Boost, BoostTarget, Shadow};

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

/// An API key's tier, account and organisation, as listed.
#[derive(Clone, Debug)]
struct KeyEntry {
    key: String,
    tier: String,
    account: Option<String>,
    org: Option<String>,
}

/// A key's entry as a file writes it: its tier, account and organisation.
pub(in crate::policy) struct KeySpec {
    pub(in crate::policy) tier: String,
    pub(in crate::policy) account: Option<String>,
    pub(in crate::policy) org: Option<String>,
}

impl KeySpec {
    fn new(tier: String, account: Option<String>) -> Self {
        KeySpec {
            tier,
            account,
            org: None,
        }
    }
}

/// A custom limit for one key, account or organisation (`per`, named
/// `key`) in one category (or `*`).
#[derive(Clone, Debug)]
struct Override {
    key: String,
    per: Per,
    category: String,
    adjust: Adjust,
}

/// Builds a [`Policy`](crate::Policy) in code. Every mistake is reported by
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
    envoy: Option<Located<super::EnvoySettings>>,
    overload: Option<Located<super::OverloadSettings>>,
    /// Keys refused whatever `unknown_key` says (revoked by an operator).
    revoked: Vec<String>,
    /// The time zone calendar limits reset in (`None`: UTC).
    time_zone: Option<Located<String>>,
}

impl PolicyBuilder {
    /// A custom limit's category as an error may show it (see
    /// `Names::shown_category`), against the categories declared so far.
    pub(super) fn shown_category<'a>(&self, cat: &'a str) -> &'a str {
        names::shown_category(cat, self.categories.iter().map(|c| c.value.as_str()))
    }
}

impl PolicyBuilder {
    /// A custom limit for one API key in one category (`"*"`: every
    /// category). It takes precedence over the key's tier limit.
    pub fn custom_limit(
        self,
        key: impl Into<String>,
        category: impl Into<String>,
        adjust: Adjust,
    ) -> Self {
        self.custom_limit_at(key.into(), Per::Key, category.into(), adjust, None)
    }

    /// A custom limit for every key of one account in one category (`"*"`:
    /// every category): a limit or list replaces the account's own limits
    /// (per-account limits, shared by its keys, even where its tier has
    /// none); `"x5"` multiplies every limit its keys have.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier, policy::{Adjust, Rule}};
    ///
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(Tier::new("pro").limit("read", Limit::per_hour(1000)).limit("write", Limit::per_hour(100)))
    ///     .key_in_account("acme-key-1", "pro", "acme")
    ///     .account_limit("acme", "write", Adjust::Set(Rule::Limited(Limit::per_hour(5000))))
    ///     .build()
    ///     .unwrap();
    /// # let _ = policy;
    /// ```
    pub fn account_limit(
        self,
        account: impl Into<String>,
        category: impl Into<String>,
        adjust: Adjust,
    ) -> Self {
        self.custom_limit_at(account.into(), Per::Account, category.into(), adjust, None)
    }

    /// A custom limit for every key of one organisation in one category
    /// (`"*"`: every category): a limit or list replaces the organisation's
    /// own (per-organisation) request limits; `"x5"` multiplies every limit
    /// its keys have.
    pub fn org_limit(
        self,
        org: impl Into<String>,
        category: impl Into<String>,
        adjust: Adjust,
    ) -> Self {
        self.custom_limit_at(org.into(), Per::Org, category.into(), adjust, None)
    }

    /// Removes a key's custom limits (all of them).
    pub fn clear_custom_limits(mut self, key: &str) -> Self {
        self.overrides
            .retain(|o| !(o.value.per == Per::Key && o.value.key == key));
        self
    }

    /// Adds a temporary boost.
    pub fn boost(mut self, boost: Boost) -> Self {
        self.boosts.push(boost);
        self
    }

    /// Sets what Envoy's rate limit service reads and answers (the
    /// `[envoy]` table; see [`EnvoySettings`](super::EnvoySettings)).
    pub fn envoy(mut self, settings: super::EnvoySettings) -> Self {
        self.envoy = Some(Located::new(settings));
        self
    }

    pub(super) fn envoy_at(mut self, settings: super::EnvoySettings, line: Option<usize>) -> Self {
        self.envoy = Some(Located::at(settings, line));
        self
    }

    /// Sheds load when the service behind the layer is past its capacity
    /// (the `[overload]` table; see
    /// [`OverloadSettings`](super::OverloadSettings)).
    pub fn overload(mut self, settings: super::OverloadSettings) -> Self {
        self.overload = Some(Located::new(settings));
        self
    }

    pub(super) fn overload_at(
        mut self,
        settings: super::OverloadSettings,
        line: Option<usize>,
    ) -> Self {
        self.overload = Some(Located::at(settings, line));
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
        self.overrides.retain(|o| {
            !(o.value.per == Per::Key && o.value.key == key && o.value.category == category)
        });
        self
    }

    /// Moves a key to another tier (an upgrade), replacing its entry.
    pub fn set_key_tier(mut self, key: &str, tier: impl Into<String>) -> Self {
        let (account, org) = self
            .keys
            .iter()
            .find(|k| k.value.key == key)
            .map_or((None, None), |k| {
                (k.value.account.clone(), k.value.org.clone())
            });
        self.keys.retain(|k| k.value.key != key);
        let spec = KeySpec {
            org,
            ..KeySpec::new(tier.into(), account)
        };
        self.key_at(key.to_owned(), spec, None)
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
        self.key_at(key.into(), KeySpec::new(tier.into(), None), None)
    }

    /// Maps an API key to a tier and an account: limits counted per account
    /// (a tier with [`Pool::Account`](crate::policy::Pool::Account), or [`Tier::per_account`] limits) are
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
        self.key_at(
            key.into(),
            KeySpec::new(tier.into(), Some(account.into())),
            None,
        )
    }

    /// Maps an API key to a tier, an account and an organisation: limits
    /// counted per organisation ([`Tier::per_org`]) are shared by every key
    /// of every account of it, on top of the per-key and per-account ones.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier};
    ///
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(
    ///         Tier::new("pro")
    ///             .limit("read", Limit::per_hour(1000))
    ///             .limit("write", Limit::per_hour(200))
    ///             .per_org("write", [Limit::per_hour(1000)]),
    ///     )
    ///     .key_in_org("acme-a-1", "pro", "team-a", "acme")
    ///     .key_in_org("acme-b-1", "pro", "team-b", "acme")
    ///     .build()
    ///     .unwrap();
    /// # let _ = policy;
    /// ```
    pub fn key_in_org(
        self,
        key: impl Into<String>,
        tier: impl Into<String>,
        account: impl Into<String>,
        org: impl Into<String>,
    ) -> Self {
        let spec = KeySpec {
            org: Some(org.into()),
            ..KeySpec::new(tier.into(), Some(account.into()))
        };
        self.key_at(key.into(), spec, None)
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

    /// The time zone calendar limits reset in: an IANA name such as
    /// `"Europe/London"` (default: UTC). [`build`](Self::build) refuses a
    /// zone it does not know.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier};
    /// use tierlimit::policy::Period;
    ///
    /// let day = Limit::per_day(5).with_period(Period::CalendarDay).unwrap();
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(Tier::new("free").limit("read", day).limit("write", day))
    ///     .time_zone("Europe/London")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(policy.calendar().name(), "Europe/London");
    /// ```
    pub fn time_zone(mut self, name: impl Into<String>) -> Self {
        self.time_zone = Some(Located::new(name.into()));
        self
    }

    // The loader's methods: the same entries, with the line they were
    // written on.

    pub(super) fn time_zone_at(mut self, name: String, line: Option<usize>) -> Self {
        self.time_zone = Some(Located::at(name, line));
        self
    }

    pub(super) fn category_at(mut self, name: String, line: Option<usize>) -> Self {
        self.categories.push(Located::at(name, line));
        self
    }

    pub(super) fn has_categories(&self) -> bool {
        !self.categories.is_empty()
    }

    pub(super) fn key_at(mut self, key: String, spec: KeySpec, line: Option<usize>) -> Self {
        self.revoked.retain(|k| *k != key);
        let KeySpec { tier, account, org } = spec;
        self.keys.push(Located::at(
            KeyEntry {
                key,
                tier,
                account,
                org,
            },
            line,
        ));
        self
    }

    pub(super) fn custom_limit_at(
        mut self,
        key: String,
        per: Per,
        category: String,
        adjust: Adjust,
        line: Option<usize>,
    ) -> Self {
        let entry = Override {
            key,
            per,
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
}
