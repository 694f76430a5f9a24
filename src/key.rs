//! Compact identities for rate-limited callers.

use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{LazyLock, OnceLock};

use foldhash::quality::FixedState;

/// The secret every [`KeyId`] is hashed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seed {
    value: u64,
    /// Set from a configured secret, so other instances can share it.
    shared: bool,
}

static SEED: OnceLock<Seed> = OnceLock::new();

/// 64 unpredictable bits, for ids (a boost's, an operator state's epoch):
/// the standard library's randomly seeded hasher over the time now.
pub(crate) fn random_u64() -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// The environment variable [`set_key_secret`] falls back to.
pub const KEY_SECRET_ENV: &str = "TIERLIMIT_KEY_SECRET";

fn derive(secret: &[u8]) -> u64 {
    FixedState::with_seed(0x7469_6572_6c69_6d74).hash_one(secret)
}

fn seed() -> Seed {
    *SEED.get_or_init(|| match std::env::var(KEY_SECRET_ENV) {
        Ok(s) if !s.is_empty() => Seed {
            value: derive(s.as_bytes()),
            shared: true,
        },
        _ => Seed {
            value: foldhash::quality::RandomState::default().hash_one(0u64),
            shared: false,
        },
    })
}

/// The hasher every [`KeyId`] is computed with: foldhash keyed by a secret
/// seed, so an outsider cannot aim keys at a collision.
static HASHER: LazyLock<FixedState> = LazyLock::new(|| FixedState::with_seed(seed().value));

/// Sets the secret that keys are hashed with.
///
/// Without one, each process draws a random secret: fine for the memory
/// backend, but instances that share limits through Redis must hash a key
/// to the same bucket, so they need the same secret. Call this before any
/// policy is built or key is hashed, or set `TIERLIMIT_KEY_SECRET`. Use at
/// least 16 random bytes; the secret keeps keys from being recovered from
/// Redis.
///
/// # Errors
///
/// If keys were already hashed with another secret.
pub fn set_key_secret(secret: &[u8]) -> Result<(), KeySecretError> {
    let wanted = Seed {
        value: derive(secret),
        shared: true,
    };
    let got = *SEED.get_or_init(|| wanted);
    if got == wanted {
        Ok(())
    } else {
        Err(KeySecretError)
    }
}

/// Whether keys are hashed with a configured (shareable) secret.
pub fn key_secret_is_shared() -> bool {
    seed().shared
}

/// Keys were hashed before [`set_key_secret`] was called, with another secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySecretError;

impl fmt::Display for KeySecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("keys were already hashed with another secret: set the key secret before building a policy")
    }
}

impl std::error::Error for KeySecretError {}

/// A 64-bit, per-process seeded hash of a caller's identity (an API key, a
/// peer address, an authenticated user id).
///
/// Rate-limit state is stored under this hash, never under the key's text:
/// it takes eight bytes per tracked key and no allocation per request.
///
/// # Collisions
///
/// Two different keys share a bucket only if their 64-bit hashes collide.
/// With `n` keys tracked at once the chance of any collision is at most
/// `n² / 2⁶⁵` (about 3 × 10⁻⁸ for a million keys). A collision can only make
/// two callers share one limit (stricter, never looser), and it never
/// grants a tier: tier lookups compare the key's full text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(u64);

impl KeyId {
    /// The identity shared by every request under a global limit.
    pub const GLOBAL: KeyId = KeyId(0x9e37_79b9_7f4a_7c15);

    /// Hashes a textual key (an API key, a user id).
    #[inline]
    pub fn of(key: &str) -> Self {
        Self::of_bytes(key.as_bytes())
    }

    /// The same hash of a key's bytes (`str`'s `Hash`: the bytes, then
    /// `0xff`), for the request path, which reads keys as bytes.
    #[inline]
    pub(crate) fn of_bytes(key: &[u8]) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = HASHER.build_hasher();
        h.write(key);
        h.write_u8(0xff);
        KeyId(h.finish())
    }

    /// Hashes an account name (apart from keys: an account named like a
    /// key never shares its buckets).
    #[inline]
    pub fn of_account(account: &str) -> Self {
        KeyId(HASHER.hash_one((0x5Au8, account)))
    }

    /// Hashes an organisation's name (apart from keys and accounts: an
    /// organisation named like an account never shares its buckets).
    #[inline]
    pub fn of_org(org: &str) -> Self {
        KeyId(HASHER.hash_one((0x6Fu8, org)))
    }

    /// Hashes a peer address.
    #[inline]
    pub fn of_ip(ip: IpAddr) -> Self {
        // Map IPv4-mapped IPv6 addresses to IPv4 so one client has one key.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        KeyId(HASHER.hash_one((0xA5u8, ip)))
    }

    /// Builds an identity from a hash computed elsewhere (for example, a
    /// user id that is already a random 64-bit number).
    #[inline]
    pub const fn from_raw(raw: u64) -> Self {
        KeyId(raw)
    }

    /// The raw 64-bit value.
    #[inline]
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// A short, non-reversible label for logs and error details: the first
    /// 48 bits of the hash in hex. Never the key itself.
    pub fn redacted(self) -> Redacted {
        Redacted(self.0 >> 16)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.redacted())
    }
}

/// The hasher of a [`KeyDigest`]'s second half: foldhash keyed by a seed
/// derived from the key secret apart from [`KeyId`]'s (one secret, two
/// independent keyed hashes).
static CHECK_HASHER: LazyLock<FixedState> = LazyLock::new(|| {
    FixedState::with_seed(FixedState::with_seed(0x6b65_7964_6967_6573).hash_one(seed().value))
});

/// A 128-bit keyed digest of an API key: what the operator plane keeps of a
/// key provisioned or revoked through the admin API (in memory and in the
/// shared store), instead of its text. Its first half is the key's
/// [`KeyId`]; its second, `check`, a second foldhash of the key keyed by a
/// seed derived from the same secret apart from the first. A request's key
/// is compared with a digest by its `KeyId` first (no extra work for every
/// other key), then by `check`.
///
/// # Collisions
///
/// Two different keys have one digest only if both 64-bit halves collide.
/// With `n` digests held, the chance that any two keys share one is at most
/// `n² / 2¹²⁹` (about 1.5 × 10⁻²⁷ for a million keys); the chance that one
/// key presented matches another's digest by chance is at most `n / 2¹²⁸`
/// per request. foldhash is a keyed hash, not a cryptographic one: these
/// bounds hold for keys chosen without knowledge of the key secret, which
/// must stay secret (as it must for the buckets anyway).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct KeyDigest {
    pub(crate) id: u64,
    pub(crate) check: u64,
}

impl KeyDigest {
    /// The digest of `key`.
    pub(crate) fn of(key: &str) -> Self {
        KeyDigest {
            id: KeyId::of(key).as_u64(),
            check: Self::check_of(key),
        }
    }

    /// The digest of an account's or organisation's `name` whose id is
    /// `id` (its hash in that owner's domain), `tag` keeping its second
    /// half apart from a key's of the same text.
    pub(crate) fn of_owner(id: KeyId, tag: u8, name: &str) -> Self {
        KeyDigest {
            id: id.as_u64(),
            check: CHECK_HASHER.hash_one((tag, name)),
        }
    }

    /// The second half of `key`'s digest (computed only once its
    /// [`KeyId`] matched a digest's).
    #[inline]
    pub(crate) fn check_of(key: &str) -> u64 {
        CHECK_HASHER.hash_one(key)
    }

    /// The key's [`KeyId`].
    pub(crate) fn key_id(self) -> KeyId {
        KeyId(self.id)
    }

    /// 32 lowercase hex digits (what the shared store keeps).
    pub(crate) fn hex(self) -> String {
        format!("{:016x}{:016x}", self.id, self.check)
    }

    /// Reads [`hex`](Self::hex)'s form back.
    pub(crate) fn parse_hex(s: &str) -> Option<Self> {
        let lower = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if s.len() != 32 || !s.bytes().all(lower) {
            return None;
        }
        Some(KeyDigest {
            id: u64::from_str_radix(&s[..16], 16).ok()?,
            check: u64::from_str_radix(&s[16..], 16).ok()?,
        })
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", self.key_id().redacted())
    }
}

/// A printable, redacted form of a [`KeyId`] (12 hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redacted(u64);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key:{:012x}", self.0)
    }
}

/// Hashes a string with the process seed (used for scopes and key tables).
pub(crate) fn hash_str(s: &str) -> u64 {
    HASHER.hash_one(s)
}

/// The default longest API key accepted.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;

/// Why a key could never be read from a request (`None`: it can): empty,
/// longer than `max_len`, or not printable ASCII without spaces. The
/// policy's key tables are checked with the same rule.
pub(crate) fn key_problem(key: &str, max_len: usize) -> Option<&'static str> {
    if key.is_empty() {
        Some("the API key is empty")
    } else if key.len() > max_len {
        Some("the API key is too long")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("the API key must be printable ASCII without spaces")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_id_different_key_different_id() {
        assert_eq!(KeyId::of("abc"), KeyId::of("abc"));
        assert_ne!(KeyId::of("abc"), KeyId::of("abd"));
    }

    #[test]
    fn mapped_ipv6_equals_ipv4() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(KeyId::of_ip(v4), KeyId::of_ip(v6));
        assert_ne!(KeyId::of_ip(v4), KeyId::of("192.0.2.1"));
    }

    #[test]
    fn a_digest_is_its_key_id_and_an_independent_check() {
        let d = KeyDigest::of("sk-abc");
        assert_eq!(d.key_id(), KeyId::of("sk-abc"));
        assert_ne!(d.check, d.id);
        assert_eq!(d.check, KeyDigest::check_of("sk-abc"));
        assert_ne!(d, KeyDigest::of("sk-abd"));
        let hex = d.hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(KeyDigest::parse_hex(&hex), Some(d));
        assert_eq!(KeyDigest::parse_hex("sk-abc"), None);
        assert_eq!(KeyDigest::parse_hex(&hex.to_uppercase()), None);
    }

    #[test]
    fn redacted_never_shows_key() {
        let shown = KeyId::of("secret-key-123").redacted().to_string();
        assert!(shown.starts_with("key:"));
        assert!(!shown.contains("secret"));
        assert_eq!(shown.len(), 16);
    }
}
