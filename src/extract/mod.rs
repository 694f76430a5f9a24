//! Who is calling: extractors turn a request into an [`Identity`].
//!
//! An [`Extractor`] reads a request's head (never its body), synchronously
//! and without allocating, and returns the caller's [`Identity`] or a
//! [`Rejection`] that becomes a clear 400 or 401 (gRPC `INVALID_ARGUMENT` or
//! `UNAUTHENTICATED`). Closures are extractors too.
//!
//! Built in: [`ApiKey`] (`Authorization: Bearer` or `X-API-Key`, the same
//! keys in gRPC metadata), [`PeerIp`] (with an explicit trusted-proxy rule),
//! [`FromExtension`] (an identity an earlier auth layer put in the request's
//! extensions) and [`GlobalKey`] (one limit for everyone).
//!
//! # Async key lookups
//!
//! Extractors are synchronous on purpose: a database lookup of an API key
//! belongs in an authentication layer that runs *before* this one and puts
//! an [`Identity`] into the request's extensions, where [`FromExtension`]
//! finds it. See `examples/auth_first.rs`.

use std::fmt;

pub use ipnet::IpNet;

use crate::key::KeyId;
use crate::policy::{ListedKey, Policy, TierId, Who};

mod api_key;
mod extension;
mod peer_ip;
mod request;
#[cfg(test)]
mod tests;

pub use crate::key::DEFAULT_MAX_KEY_LEN;
pub use api_key::ApiKey;
pub use extension::{FromExtension, GlobalKey};
pub use peer_ip::PeerIp;
pub use request::RequestRef;
pub(crate) use request::is_grpc;

/// A request's declared priority (`X-Request-Priority`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// May be refused first.
    Sheddable,
    /// The default.
    #[default]
    Normal,
    /// May use capacity reserved for critical requests.
    Critical,
}

/// Who the caller is, as far as limits are concerned.
///
/// Put one into a request's extensions from an authentication layer and
/// [`FromExtension`] will use it:
///
/// ```
/// use tierlimit::extract::Identity;
///
/// let id = Identity::new("user-42");
/// assert_eq!(id.tier(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    key: KeyId,
    account: Option<KeyId>,
    org: Option<KeyId>,
    tier: Option<TierId>,
    cost: Option<u32>,
    tokens: Option<u32>,
    priority: Priority,
    known: bool,
}

impl Identity {
    /// The identity of a textual key (hashed at once; the text is not kept).
    pub fn new(key: &str) -> Self {
        Self::from_key_id(KeyId::of(key))
    }

    /// The identity of an already hashed key.
    pub const fn from_key_id(key: KeyId) -> Self {
        Identity {
            key,
            account: None,
            org: None,
            tier: None,
            cost: None,
            tokens: None,
            priority: Priority::Normal,
            known: false,
        }
    }

    /// Sets the caller's tier (otherwise the policy decides). An identity
    /// with a tier is [known](Self::is_known).
    #[must_use]
    pub const fn with_tier(mut self, tier: TierId) -> Self {
        self.tier = Some(tier);
        self.known = true;
        self
    }

    /// Sets the caller's account: limits counted per account (a tier with
    /// `pool = "account"`, or `per_account` limits) are shared by every
    /// key of it. Without one, a key is its own account.
    ///
    /// ```
    /// use tierlimit::extract::Identity;
    ///
    /// let a = Identity::new("acme-key-1").with_account("acme");
    /// let b = Identity::new("acme-key-2").with_account("acme");
    /// assert_eq!(a.account(), b.account());
    /// assert_ne!(a.key(), b.key());
    /// ```
    #[must_use]
    pub fn with_account(self, account: &str) -> Self {
        self.with_account_id(KeyId::of_account(account))
    }

    /// Sets the caller's account by an id hashed elsewhere
    /// ([`KeyId::of_account`], or [`KeyId::from_raw`] of an account number).
    #[must_use]
    pub const fn with_account_id(mut self, account: KeyId) -> Self {
        self.account = Some(account);
        self
    }

    /// The account, if one was set.
    pub const fn account(&self) -> Option<KeyId> {
        self.account
    }

    /// The id per-account limits are counted under: the account, else
    /// the key itself.
    #[inline]
    pub const fn account_or_key(&self) -> KeyId {
        match self.account {
            Some(a) => a,
            None => self.key,
        }
    }

    /// Sets the caller's organisation: limits counted per organisation
    /// (`per_org` limits) are shared by every key of every account of it.
    /// Without one, an account (or a key without an account) is its own
    /// organisation.
    ///
    /// ```
    /// use tierlimit::extract::Identity;
    ///
    /// let a = Identity::new("k1").with_account("team-a").with_org("acme");
    /// let b = Identity::new("k2").with_account("team-b").with_org("acme");
    /// assert_eq!(a.org(), b.org());
    /// assert_ne!(a.account(), b.account());
    /// ```
    #[must_use]
    pub fn with_org(self, org: &str) -> Self {
        self.with_org_id(KeyId::of_org(org))
    }

    /// Sets the caller's organisation by an id hashed elsewhere
    /// ([`KeyId::of_org`], or [`KeyId::from_raw`] of an organisation number).
    #[must_use]
    pub const fn with_org_id(mut self, org: KeyId) -> Self {
        self.org = Some(org);
        self
    }

    /// The same identity in organisation `org` (`None`: none).
    #[cfg(feature = "envoy")]
    pub(crate) const fn in_org(mut self, org: Option<KeyId>) -> Self {
        self.org = org;
        self
    }

    /// The organisation, if one was set.
    pub const fn org(&self) -> Option<KeyId> {
        self.org
    }

    /// The id per-organisation limits are counted under: the organisation,
    /// else the account, else the key itself.
    #[inline]
    pub const fn org_or_account(&self) -> KeyId {
        match self.org {
            Some(o) => o,
            None => self.account_or_key(),
        }
    }

    /// The identity of key `key` as the policy lists it (`None`: not
    /// listed, no tier).
    #[inline]
    pub(crate) const fn listed(key: KeyId, entry: Option<ListedKey>) -> Self {
        let mut id = Self::from_key_id(key);
        if let Some(e) = entry {
            id.tier = Some(e.tier);
            id.known = true;
            id.account = e.account;
            id.org = e.org;
        }
        id
    }

    /// Whom custom limits and boosts are looked up for.
    #[inline]
    pub(crate) const fn who(&self) -> Who {
        Who {
            key: self.key.as_u64(),
            account: match self.account {
                Some(a) => Some(a.as_u64()),
                None => None,
            },
            org: match self.org {
                Some(o) => Some(o.as_u64()),
                None => None,
            },
        }
    }

    /// Marks the caller as known (authenticated) without naming a tier.
    /// [`FromExtension`] does this for identities an auth layer put in
    /// the request.
    #[must_use]
    pub const fn known(mut self) -> Self {
        self.known = true;
        self
    }

    /// Whether the caller is known to the policy: a listed key, a key the
    /// resolver gave a tier, or an identity from an authentication layer.
    /// Under a key spray, known callers always keep their own buckets;
    /// unknown and anonymous callers give way first (see
    /// [`MemoryBackend`](crate::MemoryBackend)).
    pub const fn is_known(&self) -> bool {
        self.known
    }

    /// Sets how many units this request counts (a batch's size). The
    /// route's cost is a floor the caller cannot lower: the request takes
    /// `route cost × count` (a batch of 10 on a route of cost 2 takes 20).
    /// A count of 0 is a 400.
    #[must_use]
    pub const fn with_cost(mut self, cost: u32) -> Self {
        self.cost = Some(cost);
        self
    }

    /// Sets this request's estimate of the tokens it will use (for
    /// categories with token limits; without one, the estimate is 1). The
    /// estimate is reserved at admission; what the response reports
    /// through its [`TokenMeter`](crate::meter::TokenMeter) settles the
    /// difference. An estimate above a token limit's burst could never be
    /// admitted: a 400, like a cost above a request limit.
    #[must_use]
    pub const fn with_tokens(mut self, estimate: u32) -> Self {
        self.tokens = Some(estimate);
        self
    }

    /// The token estimate, if set.
    pub const fn tokens(&self) -> Option<u32> {
        self.tokens
    }

    /// Sets this request's priority.
    #[must_use]
    pub const fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The key.
    pub const fn key(&self) -> KeyId {
        self.key
    }

    /// The tier, if known.
    pub const fn tier(&self) -> Option<TierId> {
        self.tier
    }

    /// The cost, if set.
    pub const fn cost(&self) -> Option<u32> {
        self.cost
    }

    /// The priority.
    pub const fn priority(&self) -> Priority {
        self.priority
    }
}

/// Why a request was refused before any limit was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// No credential was sent: 401 / `UNAUTHENTICATED`.
    MissingKey,
    /// A credential was sent but cannot be read: 400 / `INVALID_ARGUMENT`.
    MalformedKey(&'static str),
    /// The key is not known to the policy: 401 / `UNAUTHENTICATED`.
    UnknownKey,
    /// The request's cost is not acceptable: 400 / `INVALID_ARGUMENT`.
    InvalidCost(&'static str),
    /// `X-Request-Priority` is not `critical`, `normal` or `sheddable`:
    /// 400 / `INVALID_ARGUMENT`.
    InvalidPriority,
    /// The peer address needed to identify the caller is not available
    /// (the server was not started with connect info): 500-free, a 401.
    NoPeerAddress,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::MissingKey => f.write_str(
                "no API key: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            ),
            Rejection::MalformedKey(why) => write!(f, "malformed API key: {why}"),
            Rejection::UnknownKey => f.write_str("unknown API key"),
            Rejection::InvalidCost(why) => write!(f, "invalid request cost: {why}"),
            Rejection::InvalidPriority => {
                f.write_str("X-Request-Priority must be `critical`, `normal` or `sheddable`")
            }
            Rejection::NoPeerAddress => {
                f.write_str("the caller cannot be identified: no API key and no peer address")
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// Turns a request into the caller's [`Identity`].
///
/// Implemented by closures `Fn(&RequestRef<'_>, &Policy) -> Result<Identity, Rejection>`:
///
/// ```
/// use tierlimit::{Policy, extract::{Identity, Rejection, RequestRef}};
///
/// let by_tenant = |req: &RequestRef<'_>, _: &Policy| {
///     req.headers
///         .get("x-tenant")
///         .and_then(|v| v.to_str().ok())
///         .map(Identity::new)
///         .ok_or(Rejection::MissingKey)
/// };
/// # fn takes<E: tierlimit::Extractor>(_: E) {}
/// takes(by_tenant);
/// ```
pub trait Extractor: Send + Sync + 'static {
    /// Identifies the caller. `policy` is the policy in force, for key → tier
    /// lookups.
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection>;
}

impl<F> Extractor for F
where
    F: Fn(&RequestRef<'_>, &Policy) -> Result<Identity, Rejection> + Send + Sync + 'static,
{
    #[inline]
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
        self(req, policy)
    }
}
