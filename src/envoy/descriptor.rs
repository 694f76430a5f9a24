//! One descriptor read: its entries by the policy's descriptor keys
//! ([`Read`]), where it goes ([`Read::target`]), and who is calling
//! ([`Descriptors`], the front's extractor, over the layer's own [`ApiKey`]).

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use http::{HeaderValue, Method, Request};

use super::answer::Mistake;
use crate::extract::{ApiKey, Extractor, Identity, PeerIp, Rejection, RequestRef};
use crate::key::{DEFAULT_MAX_KEY_LEN, KeyId};
use crate::policy::{CategoryId, DescriptorKeys, Policy, Target, TierId};

/// The longest account name, tier name, category name or method read.
const MAX_NAME: usize = 256;
/// The longest `api_key` entry read: a key of the longest length the
/// layer reads, after `Bearer ` and some spaces (`Authorization` copied as
/// it is). The layer's own rules then judge the key itself.
const MAX_KEY_ENTRY: usize = DEFAULT_MAX_KEY_LEN + 64;
/// The longest path classified (Envoy's `:path`, query included).
const MAX_PATH: usize = 8192;

/// A descriptor's entries, by the policy's descriptor keys; entries with
/// other keys are not read (they are another rate limit service's).
#[derive(Default)]
pub(super) struct Read<'a> {
    api_key: Option<&'a str>,
    tier: Option<&'a str>,
    account: Option<&'a str>,
    org: Option<&'a str>,
    category: Option<&'a str>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    remote: Option<&'a str>,
}

impl<'a> Read<'a> {
    /// Reads `d`'s entries; an entry given twice is a mistake.
    pub(super) fn new(d: &'a RateLimitDescriptor, keys: &DescriptorKeys) -> Result<Self, Mistake> {
        let mut r = Read::default();
        for e in &d.entries {
            let slot = match e.key.as_str() {
                k if k == keys.api_key => &mut r.api_key,
                k if k == keys.tier => &mut r.tier,
                k if k == keys.account => &mut r.account,
                k if k == keys.org => &mut r.org,
                k if k == keys.category => &mut r.category,
                k if k == keys.method => &mut r.method,
                k if k == keys.path => &mut r.path,
                k if k == keys.remote_address => &mut r.remote,
                _ => continue,
            };
            if slot.replace(e.value.as_str()).is_some() {
                return Err(Mistake::new(
                    "duplicate-entry",
                    format!("the descriptor has more than one `{}` entry", e.key),
                ));
            }
        }
        Ok(r)
    }

    /// Where the request goes: the category it names, else its method and
    /// path classified by the policy's routes (an exempt route is
    /// `Target::Exempt`).
    pub(super) fn target(&self, policy: &Policy, keys: &DescriptorKeys) -> Result<Target, Mistake> {
        if let Some(name) = self.category {
            let category = policy.category(name).ok_or_else(|| {
                Mistake::new(
                    "unknown-category",
                    format!("unknown category `{}`", shorten(name)),
                )
            })?;
            return Ok(Target::Category { category, cost: 1 });
        }
        let (Some(method), Some(path)) = (self.method, self.path) else {
            return Err(Mistake::new(
                "missing-category",
                format!(
                    "the descriptor names no category: give a `{}` entry, or `{}` and `{}`",
                    keys.category, keys.method, keys.path
                ),
            ));
        };
        let method = Method::from_bytes(method.as_bytes())
            .ok()
            .filter(|_| method.len() <= MAX_NAME)
            .ok_or_else(|| Mistake::new("invalid-method", "the method is not an HTTP method"))?;
        if path.len() > MAX_PATH {
            return Err(Mistake::new(
                "invalid-path",
                format!("the path is longer than {MAX_PATH} bytes"),
            ));
        }
        // Envoy's `:path` carries the query; routes match the path alone.
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        Ok(policy.classify(&method, path))
    }

    /// Whether Envoy may check `category` under this policy.
    pub(super) fn served(policy: &Policy, category: CategoryId) -> Result<(), Mistake> {
        if policy.envoy().serves(category) {
            return Ok(());
        }
        Err(Mistake::new(
            "category-not-served",
            format!(
                "category `{}` is not checked through Envoy (it has token or concurrency limits, or `envoy.categories` leaves it out)",
                policy.category_name(category)
            ),
        ))
    }

    /// The request admission reads: its method, the key as the layer reads
    /// it, and what the descriptor says of the caller (`Given`).
    pub(super) fn request(&self, policy: &Policy, cost: u32) -> Result<Request<()>, Mistake> {
        let tier = match self.tier {
            None => None,
            Some(name) => Some(policy.tier(name).ok_or_else(|| {
                Mistake::new("unknown-tier", format!("unknown tier `{}`", shorten(name)))
            })?),
        };
        if let Some(a) = self.account
            && (a.is_empty() || a.len() > MAX_NAME)
        {
            return Err(Mistake::new(
                "invalid-account",
                format!("an account is 1 to {MAX_NAME} bytes"),
            ));
        }
        if let Some(o) = self.org
            && (o.is_empty() || o.len() > MAX_NAME)
        {
            return Err(Mistake::new(
                "invalid-org",
                format!("an organisation is 1 to {MAX_NAME} bytes"),
            ));
        }
        let mut req = Request::new(());
        if let Some(key) = self.api_key {
            // The layer's own key rules apply to the key (its length once
            // `Bearer ` and spaces are taken off, printable ASCII); a value
            // no header could carry is malformed already, and so is one
            // longer than any key and its prefix could be.
            let value = HeaderValue::from_str(key)
                .ok()
                .filter(|_| key.len() <= MAX_KEY_ENTRY)
                .ok_or_else(|| {
                    Mistake::rejected(Rejection::MalformedKey(
                        "the API key must be printable ASCII without spaces, at most 256 bytes",
                    ))
                })?;
            // An `Authorization` header copied as it is (`Bearer <key>`)
            // is read as the layer reads that header; a key alone, as
            // `X-API-Key`.
            let bearer = key
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
            let name = if bearer {
                http::header::AUTHORIZATION
            } else {
                http::HeaderName::from_static("x-api-key")
            };
            req.headers_mut().insert(name, value);
        }
        let remote = self.remote.and_then(|r| r.trim().parse::<IpAddr>().ok());
        if let Some(ip) = remote {
            // The peer address, where `PeerIp` reads it.
            req.extensions_mut().insert(SocketAddr::new(ip, 0));
        }
        req.extensions_mut().insert(Given {
            tier,
            account: self.account.map(KeyId::of_account),
            org: self.org.map(KeyId::of_org),
            cost,
        });
        Ok(req)
    }
}

/// `s`, cut to a length an answer may repeat.
fn shorten(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a descriptor says of its caller beyond the key.
#[derive(Clone, Copy, Debug)]
struct Given {
    tier: Option<TierId>,
    account: Option<KeyId>,
    org: Option<KeyId>,
    cost: u32,
}

/// The front's extractor: the key as the layer's [`ApiKey`] reads and
/// resolves it (the `[keys]` table, the operators' keys, revocations);
/// without a key, the account a tier was given for, or the client's
/// address under the `missing_key` tier; then the tier and account the
/// descriptor names, and its cost.
#[derive(Debug, Default)]
pub(super) struct Descriptors {
    keys: ApiKey,
    peer: PeerIp,
}

impl Extractor for Descriptors {
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
        let given = req
            .extensions
            .get::<Given>()
            .copied()
            .ok_or(Rejection::MissingKey)?;
        let id = match self.keys.extract(req, policy) {
            Err(Rejection::MissingKey) => match (given.account, given.tier) {
                // Envoy vouches for the account: it is the caller.
                (Some(account), Some(_)) => Identity::from_key_id(account),
                _ if policy.missing_key_tier().is_some() => self.peer.extract(req, policy)?,
                _ => return Err(Rejection::MissingKey),
            },
            other => other?,
        };
        let id = match given.tier {
            Some(tier) => id.with_tier(tier),
            None => id,
        };
        // An account the descriptor names comes with its own organisation
        // (the descriptor's, or none), never the listed key's: an account
        // is in one organisation.
        let id = match (given.account, given.org) {
            (Some(account), org) => id.with_account_id(account).in_org(org),
            (None, Some(org)) => id.with_org_id(org),
            (None, None) => id,
        };
        Ok(id.with_cost(given.cost))
    }
}
