//! The policy's `[envoy]` table: how Envoy's rate limit service reads a
//! request's descriptors ([`EnvoySettings`], [`DescriptorKeys`]), validated
//! when the policy is built and compiled into [`EnvoyRules`].
//!
//! The policy only holds this data; the service that reads it is
//! `tierlimit::envoy` (feature `envoy`).

use super::{CategoryId, Cell, PolicyError};

/// The descriptor entry keys Envoy's rate limit service reads
/// (`[envoy.descriptor_keys]`). Each names the `key` of a descriptor
/// entry, as Envoy's `rate_limits` actions write it.
///
/// ```
/// use tierlimit::policy::DescriptorKeys;
///
/// let mut keys = DescriptorKeys::default();
/// assert_eq!(keys.api_key, "api_key");
/// keys.category = "kind".into();
/// ```
///
/// Marked non-exhaustive: start from the defaults and change fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DescriptorKeys {
    /// The caller's API key, resolved as the `[keys]` table and the
    /// operators' keys say (default `api_key`).
    pub api_key: String,
    /// A tier named directly, for callers Envoy authenticated (default
    /// `tier`).
    pub tier: String,
    /// The caller's account (default `account`).
    pub account: String,
    /// The caller's organisation (default `org`).
    pub org: String,
    /// A category named directly (default `category`).
    pub category: String,
    /// The request's method, classified with `path` by the policy's routes
    /// (default `method`).
    pub method: String,
    /// The request's path (default `path`).
    pub path: String,
    /// The client's address, for the `missing_key` tier (default
    /// `remote_address`, what Envoy's `remote_address` action writes).
    pub remote_address: String,
}

impl Default for DescriptorKeys {
    fn default() -> Self {
        DescriptorKeys {
            api_key: "api_key".into(),
            tier: "tier".into(),
            account: "account".into(),
            org: "org".into(),
            category: "category".into(),
            method: "method".into(),
            path: "path".into(),
            remote_address: "remote_address".into(),
        }
    }
}

impl DescriptorKeys {
    /// Each key with its entry name in the policy file.
    fn named(&self) -> [(&'static str, &str); 8] {
        [
            ("api_key", &self.api_key),
            ("tier", &self.tier),
            ("account", &self.account),
            ("org", &self.org),
            ("category", &self.category),
            ("method", &self.method),
            ("path", &self.path),
            ("remote_address", &self.remote_address),
        ]
    }
}

/// The policy's `[envoy]` table: what Envoy's rate limit service answers.
///
/// ```
/// use tierlimit::{Limit, Policy, Tier};
/// use tierlimit::policy::EnvoySettings;
///
/// let policy = Policy::builder()
///     .categories(["read", "write"])
///     .tier(Tier::new("free").limit("read", Limit::per_hour(100)).limit("write", Limit::per_hour(20)))
///     .envoy(EnvoySettings::new().domain("api").categories(["read", "write"]))
///     .build()
///     .unwrap();
/// assert_eq!(policy.envoy().domain(), Some("api"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct EnvoySettings {
    pub(crate) domain: Option<String>,
    pub(crate) categories: Option<Vec<String>>,
    pub(crate) keys: DescriptorKeys,
}

impl EnvoySettings {
    /// Every domain answered, every category served, the default keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers only requests of this domain (others are refused with a
    /// status that says so).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The categories Envoy may check (default: every category). None of
    /// them may have token or concurrency limits: a rate limit service is
    /// asked once, before the request, and never hears of its end.
    pub fn categories<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.categories = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// The descriptor entry keys read.
    pub fn descriptor_keys(mut self, keys: DescriptorKeys) -> Self {
        self.keys = keys;
        self
    }
}

/// The `[envoy]` table, compiled: what the rate limit service reads per
/// request.
#[derive(Clone, Debug, Default)]
pub struct EnvoyRules {
    domain: Option<Box<str>>,
    /// By category: whether Envoy may check it.
    served: Box<[bool]>,
    keys: DescriptorKeys,
}

impl EnvoyRules {
    /// The one domain answered, if the policy names one.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Whether Envoy may check `category`.
    pub fn serves(&self, category: CategoryId) -> bool {
        self.served.get(category.index()).copied().unwrap_or(false)
    }

    /// The descriptor entry keys read.
    pub fn descriptor_keys(&self) -> &DescriptorKeys {
        &self.keys
    }
}

/// The longest descriptor key name accepted.
const MAX_KEY_NAME: usize = 128;

/// Validates `settings` (`None`: no `[envoy]` table) against the policy's
/// categories, tiers and cells (tier-major), naming the entry at fault.
pub(super) fn compile(
    settings: Option<(&EnvoySettings, Option<usize>)>,
    categories: &[Box<str>],
    tiers: &[Box<str>],
    cells: &[Cell],
) -> Result<EnvoyRules, PolicyError> {
    // A category Envoy cannot hold: one with token or concurrency limits
    // in some tier (that tier's index).
    let unfit = |c: usize| {
        cells
            .iter()
            .skip(c)
            .step_by(categories.len().max(1))
            .position(|cell| cell.metered || cell.leased)
    };
    let Some((s, line)) = settings else {
        // No `[envoy]` table: every category Envoy can hold is served.
        let served = (0..categories.len()).map(|c| unfit(c).is_none()).collect();
        return Ok(EnvoyRules {
            domain: None,
            served,
            keys: DescriptorKeys::default(),
        });
    };
    let err = |entry: &str, m: String| PolicyError::new(format!("envoy.{entry}"), line, m);
    if let Some(d) = &s.domain
        && (d.is_empty() || d.len() > MAX_KEY_NAME)
    {
        return Err(err(
            "domain",
            format!("a domain is 1 to {MAX_KEY_NAME} bytes"),
        ));
    }
    let named = s.keys.named();
    for (i, (entry, key)) in named.iter().enumerate() {
        let entry = format!("descriptor_keys.{entry}");
        if key.is_empty() || key.len() > MAX_KEY_NAME {
            return Err(err(
                &entry,
                format!("a descriptor key is 1 to {MAX_KEY_NAME} bytes"),
            ));
        }
        if let Some((other, _)) = named[..i].iter().find(|(_, k)| k == key) {
            return Err(err(
                &entry,
                format!("`{key}` is already the key of `descriptor_keys.{other}`"),
            ));
        }
    }
    let mut served = vec![s.categories.is_none(); categories.len()];
    for name in s.categories.iter().flatten() {
        let Some(c) = categories.iter().position(|c| **c == **name) else {
            return Err(err("categories", format!("unknown category `{name}`")));
        };
        served[c] = true;
    }
    for (c, name) in categories.iter().enumerate() {
        if served[c]
            && let Some(tier) = unfit(c)
        {
            return Err(err(
                "categories",
                format!(
                    "category `{name}` has token or concurrency limits (tiers.{}.{name}), which Envoy's rate limit service cannot hold: it is asked once, before a request, and never hears of its end; list the categories Envoy checks in `envoy.categories`",
                    tiers.get(tier).map_or("?", |t| &**t)
                ),
            ));
        }
    }
    Ok(EnvoyRules {
        domain: s.domain.as_deref().map(Into::into),
        served: served.into_boxed_slice(),
        keys: s.keys.clone(),
    })
}
