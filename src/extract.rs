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
use std::net::{IpAddr, SocketAddr};

use http::{Extensions, HeaderMap, Method, Uri, header};
pub use ipnet::IpNet;

use crate::key::KeyId;
use crate::policy::{Policy, TierId};

/// A borrowed view of a request's head, handed to extractors.
#[derive(Clone, Copy, Debug)]
pub struct RequestRef<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The headers (gRPC metadata are headers too).
    pub headers: &'a HeaderMap,
    /// The extensions (peer address, identities from earlier layers).
    pub extensions: &'a Extensions,
}

impl<'a> RequestRef<'a> {
    /// A view of `req`'s head.
    pub fn new<B>(req: &'a http::Request<B>) -> Self {
        RequestRef {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// The connection's peer address, from axum's `ConnectInfo` or tonic's
    /// `TcpConnectInfo`, or a bare [`SocketAddr`] extension.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "axum")]
        if let Some(ci) = self
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
        {
            return Some(ci.0);
        }
        #[cfg(feature = "tonic")]
        if let Some(ci) = self
            .extensions
            .get::<tonic::transport::server::TcpConnectInfo>()
        {
            return ci.remote_addr();
        }
        self.extensions.get::<SocketAddr>().copied()
    }
}

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
/// use tierlimit::Identity;
///
/// let id = Identity::new("user-42");
/// assert_eq!(id.tier(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    key: KeyId,
    account: Option<KeyId>,
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
    /// use tierlimit::Identity;
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
    /// through its [`TokenMeter`](crate::TokenMeter) settles the
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
/// use tierlimit::{Identity, Policy, Rejection, RequestRef};
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

pub use crate::key::DEFAULT_MAX_KEY_LEN;
use crate::key::key_problem;

static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

type TierFn = dyn Fn(&str) -> Option<(TierId, Option<KeyId>)> + Send + Sync;

/// The API key from `Authorization: Bearer <key>` or `X-API-Key: <key>`
/// (in gRPC: the `authorization` or `x-api-key` metadata).
///
/// The key's tier comes from the policy's `[keys]` table, else from the
/// resolver given to [`tiers`](Self::tiers), else the policy's rule for
/// unknown keys applies. Keys are at most 256 bytes by default, visible
/// ASCII, no spaces; anything else is a 400 that says what is wrong.
#[must_use]
pub struct ApiKey {
    max_len: usize,
    resolver: Option<Box<TierFn>>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("max_len", &self.max_len)
            .field("resolver", &self.resolver.is_some())
            .finish()
    }
}

impl Default for ApiKey {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiKey {
    /// Reads keys from `Authorization: Bearer` or `X-API-Key`.
    pub fn new() -> Self {
        ApiKey {
            max_len: DEFAULT_MAX_KEY_LEN,
            resolver: None,
        }
    }

    /// The longest key accepted (default 256 bytes).
    pub fn max_len(mut self, max: usize) -> Self {
        self.max_len = max;
        self
    }

    /// Resolves keys the policy's table does not list (for example keys
    /// with a tier prefix, `pk_live_pro_…`). Runs on every such request, so
    /// keep it fast; look tiers up once with [`Policy::tier`].
    pub fn tiers<F>(mut self, resolver: F) -> Self
    where
        F: Fn(&str) -> Option<TierId> + Send + Sync + 'static,
    {
        self.resolver = Some(Box::new(move |key| resolver(key).map(|t| (t, None))));
        self
    }

    /// Like [`tiers`](Self::tiers), and the key's account too (`None`: the
    /// key is its own account), for limits shared by an account's keys.
    ///
    /// ```
    /// use tierlimit::{ApiKey, KeyId, TierId};
    ///
    /// # let pro: TierId = tierlimit::Policy::from_toml_str("categories=[\"read\", \"write\"]\n[tiers.pro]\nread=\"1/s\"\nwrite=\"1/s\"").unwrap().tier("pro").unwrap();
    /// // Keys look like `acct_<account>_<secret>`.
    /// let keys = ApiKey::new().resolve(move |key| {
    ///     let account = key.strip_prefix("acct_")?.split('_').next()?;
    ///     Some((pro, Some(KeyId::of_account(account))))
    /// });
    /// # let _ = keys;
    /// ```
    pub fn resolve<F>(mut self, resolver: F) -> Self
    where
        F: Fn(&str) -> Option<(TierId, Option<KeyId>)> + Send + Sync + 'static,
    {
        self.resolver = Some(Box::new(resolver));
        self
    }

    /// The raw key of a request, validated, without resolving a tier.
    pub fn read<'r>(&self, headers: &'r HeaderMap) -> Result<&'r str, Rejection> {
        // The common case in one pass over the key: one `X-API-Key` value,
        // no `Authorization`, the key printable ASCII without spaces.
        // Anything else takes the full path below, whose errors are the
        // contract.
        if !headers.contains_key(header::AUTHORIZATION) {
            let mut values = headers.get_all(&X_API_KEY).iter();
            if let (Some(value), None) = (values.next(), values.next())
                && let Some(key) = plain_key(value.as_bytes(), self.max_len)
            {
                return Ok(key);
            }
        }
        self.read_checked(headers)
    }

    fn read_checked<'r>(&self, headers: &'r HeaderMap) -> Result<&'r str, Rejection> {
        const NOT_ASCII: Rejection =
            Rejection::MalformedKey("the API key must be printable ASCII without spaces");
        let mut found: Option<&str> = None;
        for value in headers.get_all(header::AUTHORIZATION) {
            let v = value.to_str().map_err(|_| NOT_ASCII)?;
            let rest = match v.get(..7) {
                Some(p) if p.eq_ignore_ascii_case("bearer ") => &v[7..],
                _ => {
                    return Err(Rejection::MalformedKey(
                        "the Authorization header must be `Bearer <key>`",
                    ));
                }
            };
            if found.replace(rest.trim_ascii()).is_some() {
                return Err(Rejection::MalformedKey("more than one API key was sent"));
            }
        }
        for value in headers.get_all(&X_API_KEY) {
            let v = value.to_str().map_err(|_| NOT_ASCII)?;
            if found.replace(v.trim_ascii()).is_some() {
                return Err(Rejection::MalformedKey("more than one API key was sent"));
            }
        }
        let Some(key) = found else {
            return Err(Rejection::MissingKey);
        };
        match key_problem(key, self.max_len) {
            None => Ok(key),
            Some(why) => Err(Rejection::MalformedKey(why)),
        }
    }
}

/// `value` as a key when it is one as it stands: within `max_len` once
/// trimmed of spaces and tabs, every byte of it printable ASCII without
/// spaces, and nothing around it but spaces and tabs. Written without early
/// exits, so the compiler checks many bytes at a time.
#[inline]
fn plain_key(value: &[u8], max_len: usize) -> Option<&str> {
    let start = value
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &value[start..];
    let end = rest.len()
        - rest
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    let key = &rest[..end];
    let graphic = key.iter().fold(true, |ok, &b| ok & (b > b' ') & (b < 0x7f));
    if key.is_empty() || key.len() > max_len || !graphic {
        return None;
    }
    // Printable ASCII is UTF-8: this cannot fail.
    std::str::from_utf8(key).ok()
}

impl Extractor for ApiKey {
    #[inline]
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
        let key = self.read(req.headers)?;
        let id = KeyId::of(key);
        if policy.has_revocations() && policy.is_revoked(key, id) {
            return Err(Rejection::UnknownKey);
        }
        let (tier, account) = match policy
            .key_entry(key, id)
            .or_else(|| self.resolver.as_ref().and_then(|r| r(key)))
        {
            Some((t, a)) => (Some(t), a),
            None => (None, None),
        };
        Ok(Identity {
            key: id,
            account,
            tier,
            cost: None,
            tokens: None,
            priority: Priority::Normal,
            known: tier.is_some(),
        })
    }
}

/// The caller's IP address, for anonymous limits.
///
/// By default the connection's peer address is used and forwarding
/// headers are ignored. Behind proxies, name them with
/// [`trust_proxies`](Self::trust_proxies): when the peer is one of them, the
/// client is the rightmost `X-Forwarded-For` entry that is *not* a trusted
/// proxy (the leftmost entry is whatever the client wrote, so it is never
/// believed).
///
/// ```
/// use tierlimit::PeerIp;
///
/// let behind_lb = PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
/// # let _ = behind_lb;
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct PeerIp {
    trusted: Vec<IpNet>,
    tier: Option<TierId>,
}

impl PeerIp {
    /// The connection's peer address; no proxy trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts these proxy networks' `X-Forwarded-For`.
    pub fn trust_proxies(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted.extend(nets);
        self
    }

    /// Gives every caller this tier (otherwise the policy's `missing_key`
    /// tier applies).
    pub fn tier(mut self, tier: TierId) -> Self {
        self.tier = Some(tier);
        self
    }

    /// The client address of a request, following trusted proxies.
    pub fn client_ip(&self, req: &RequestRef<'_>) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Walk X-Forwarded-For from the right, skipping trusted hops.
        for value in req.headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(s) = value.to_str() else {
                return Some(client);
            };
            for hop in s.rsplit(',') {
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    return Some(client);
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return Some(ip);
                }
            }
        }
        Some(client)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 peer (`::ffff:10.0.0.1`) is its IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

impl Extractor for PeerIp {
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
        let ip = self.client_ip(req).ok_or(Rejection::NoPeerAddress)?;
        // Anonymous callers are never known, whatever their tier.
        let mut id = Identity::from_key_id(KeyId::of_ip(ip));
        id.tier = self.tier.or_else(|| policy.missing_key_tier());
        Ok(id)
    }
}

/// An [`Identity`] placed in the request's extensions by an earlier layer
/// (your authentication). A request without one is [`Rejection::MissingKey`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FromExtension;

impl Extractor for FromExtension {
    #[inline]
    fn extract(&self, req: &RequestRef<'_>, _: &Policy) -> Result<Identity, Rejection> {
        req.extensions
            .get::<Identity>()
            .map(|id| id.known())
            .ok_or(Rejection::MissingKey)
    }
}

/// One identity for every request: a global limit under `tier`.
#[derive(Clone, Copy, Debug)]
pub struct GlobalKey {
    tier: TierId,
}

impl GlobalKey {
    /// Every request counts as the same caller in `tier`.
    pub const fn new(tier: TierId) -> Self {
        GlobalKey { tier }
    }
}

impl Extractor for GlobalKey {
    #[inline]
    fn extract(&self, _: &RequestRef<'_>, _: &Policy) -> Result<Identity, Rejection> {
        Ok(Identity::from_key_id(KeyId::GLOBAL).with_tier(self.tier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    fn policy() -> Policy {
        Policy::from_toml_str(
            r#"
categories = ["read", "write"]
[tiers.free]
read = "10/s"
write = "10/s"
[keys]
"k-free" = "free"
"#,
        )
        .unwrap()
    }

    fn req(headers: &[(&str, &[u8])]) -> Request<()> {
        let mut r = Request::new(());
        for (k, v) in headers {
            r.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        r
    }

    #[test]
    fn api_key_sources_and_errors() {
        let p = policy();
        let x = ApiKey::new();
        let ok = |r: &Request<()>| x.extract(&RequestRef::new(r), &p);
        let id = ok(&req(&[("authorization", b"Bearer k-free")])).unwrap();
        assert_eq!(id.key(), KeyId::of("k-free"));
        assert_eq!(id.tier(), p.tier("free"));
        let id = ok(&req(&[("x-api-key", b"  k-free ")])).unwrap();
        assert_eq!(id.tier(), p.tier("free"));
        let id = ok(&req(&[("authorization", b"bearer other")])).unwrap();
        assert_eq!(id.tier(), None);

        assert_eq!(ok(&req(&[])).unwrap_err(), Rejection::MissingKey);
        assert!(matches!(
            ok(&req(&[("authorization", b"Basic abc")])),
            Err(Rejection::MalformedKey(_))
        ));
        assert!(matches!(
            ok(&req(&[("x-api-key", b"")])),
            Err(Rejection::MalformedKey(_))
        ));
        assert!(matches!(
            ok(&req(&[("x-api-key", b"\xff\xfe")])),
            Err(Rejection::MalformedKey(_))
        ));
        assert!(matches!(
            ok(&req(&[("x-api-key", b"a b")])),
            Err(Rejection::MalformedKey(_))
        ));
        let long = vec![b'a'; 257];
        assert!(matches!(
            ok(&req(&[("x-api-key", &long)])),
            Err(Rejection::MalformedKey(_))
        ));
        assert!(matches!(
            ok(&req(&[("x-api-key", b"a"), ("authorization", b"Bearer b")])),
            Err(Rejection::MalformedKey(_))
        ));
    }

    #[test]
    fn resolver_is_consulted_after_the_table() {
        let p = policy();
        let free = p.tier("free").unwrap();
        let x = ApiKey::new().tiers(move |k| k.starts_with("pk_free_").then_some(free));
        let r = req(&[("x-api-key", b"pk_free_123")]);
        assert_eq!(
            x.extract(&RequestRef::new(&r), &p).unwrap().tier(),
            Some(free)
        );
    }

    #[test]
    fn peer_ip_trusts_only_named_proxies() {
        let with = |peer: &str, xff: &[&[u8]]| {
            let mut r = req(&xff
                .iter()
                .map(|v| ("x-forwarded-for", *v))
                .collect::<Vec<_>>());
            r.extensions_mut()
                .insert(peer.parse::<SocketAddr>().unwrap());
            r
        };
        let plain = PeerIp::new();
        let r = with("203.0.113.9:1000", &[b"1.2.3.4"]);
        assert_eq!(
            plain.client_ip(&RequestRef::new(&r)),
            Some("203.0.113.9".parse().unwrap())
        );

        let lb = PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
        // The client forged a leftmost entry; the proxy appended the real one.
        let r = with("10.0.0.2:1000", &[b"6.6.6.6, 198.51.100.7, 10.0.0.3"]);
        assert_eq!(
            lb.client_ip(&RequestRef::new(&r)),
            Some("198.51.100.7".parse().unwrap())
        );
        // Untrusted peer: forwarding headers ignored.
        let r = with("198.51.100.1:1000", &[b"6.6.6.6"]);
        assert_eq!(
            lb.client_ip(&RequestRef::new(&r)),
            Some("198.51.100.1".parse().unwrap())
        );
        // Garbage stops the walk at the last good hop.
        let r = with("10.0.0.2:1000", &[b"nonsense"]);
        assert_eq!(
            lb.client_ip(&RequestRef::new(&r)),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(plain.client_ip(&RequestRef::new(&req(&[]))), None);
    }

    #[test]
    fn trusted_networks_are_ipnet_values() {
        let lb = PeerIp::new().trust_proxies([
            "192.168.0.0/16".parse::<IpNet>().unwrap(),
            IpNet::from("::1".parse::<IpAddr>().unwrap()),
        ]);
        assert!(lb.is_trusted("192.168.4.5".parse().unwrap()));
        // An IPv4-mapped IPv6 peer is its IPv4 address.
        assert!(lb.is_trusted("::ffff:192.168.4.5".parse().unwrap()));
        assert!(!lb.is_trusted("192.169.0.1".parse().unwrap()));
        assert!(lb.is_trusted("::1".parse().unwrap()));
        assert!(!lb.is_trusted("::2".parse().unwrap()));
    }
}
