//! [`PeerIp`]: the caller's IP address, for anonymous limits, with an
//! explicit trusted-proxy rule.

use std::net::IpAddr;

use super::{Extractor, Identity, IpNet, Rejection, RequestRef};
use crate::key::KeyId;
use crate::policy::{Policy, TierId};

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

    pub(super) fn is_trusted(&self, ip: IpAddr) -> bool {
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
