//! [`ApiKey`]: the caller's API key from `Authorization: Bearer` or
//! `X-API-Key` (or the same gRPC metadata).

use std::fmt;

use http::{HeaderMap, header};

use super::{Extractor, Identity, Rejection, RequestRef};
use crate::key::{DEFAULT_MAX_KEY_LEN, KeyId, key_problem};
use crate::policy::{ListedKey, Policy, TierId};

/// The key header's name, as `HeaderName` keeps it (lowercase).
const X_API_KEY_NAME: &str = "x-api-key";
static X_API_KEY: http::HeaderName = http::HeaderName::from_static(X_API_KEY_NAME);

type TierFn = dyn Fn(&str) -> Option<ListedKey> + Send + Sync;

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
        self.resolver = Some(Box::new(move |key| resolver(key).map(ListedKey::new)));
        self
    }

    /// Like [`tiers`](Self::tiers), and the key's account too (`None`: the
    /// key is its own account), for limits shared by an account's keys.
    ///
    /// ```
    /// use tierlimit::{ApiKey, key::KeyId, policy::TierId};
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
        self.resolver = Some(Box::new(move |key| {
            resolver(key).map(|(t, account)| ListedKey::new(t).in_account(account))
        }));
        self
    }

    /// Like [`resolve`](Self::resolve), with the key's organisation too: a
    /// [`ListedKey`] as a `[keys]` entry gives it. Keep to one
    /// organisation per account (see [`Identity::with_org`](crate::extract::Identity::with_org)).
    ///
    /// ```
    /// use tierlimit::{ApiKey, key::KeyId, policy::{ListedKey, TierId}};
    ///
    /// # let pro: TierId = tierlimit::Policy::from_toml_str("categories=[\"read\", \"write\"]\n[tiers.pro]\nread=\"1/s\"\nwrite=\"1/s\"").unwrap().tier("pro").unwrap();
    /// // Keys look like `org_<org>_<team>_<secret>`.
    /// let keys = ApiKey::new().resolve_listed(move |key| {
    ///     let mut parts = key.strip_prefix("org_")?.split('_');
    ///     let (org, team) = (parts.next()?, parts.next()?);
    ///     Some(
    ///         ListedKey::new(pro)
    ///             .in_account(Some(KeyId::of_account(&format!("{org}/{team}"))))
    ///             .in_org(Some(KeyId::of_org(org))),
    ///     )
    /// });
    /// # let _ = keys;
    /// ```
    pub fn resolve_listed<F>(mut self, resolver: F) -> Self
    where
        F: Fn(&str) -> Option<ListedKey> + Send + Sync + 'static,
    {
        self.resolver = Some(Box::new(resolver));
        self
    }

    /// The raw key of a request, validated, without resolving a tier.
    pub fn read<'r>(&self, headers: &'r HeaderMap) -> Result<&'r str, Rejection> {
        as_text(self.read_raw(headers)?)
    }

    /// [`read`](Self::read)'s key as bytes (printable ASCII, checked), as
    /// the request path reads it: no second pass to make it a `str`.
    #[inline]
    fn read_raw<'r>(&self, headers: &'r HeaderMap) -> Result<&'r [u8], Rejection> {
        // The common case in one pass over the key: one `X-API-Key` value,
        // no `Authorization`, the key printable ASCII without spaces.
        // Anything else takes the full path below, whose errors are the
        // contract.
        let one = if headers.len() <= SCAN_MAX {
            one_key_by_scan(headers)
        } else if headers.contains_key(header::AUTHORIZATION) {
            None
        } else {
            let mut values = headers.get_all(&X_API_KEY).iter();
            match (values.next(), values.next()) {
                (Some(value), None) => Some(value),
                _ => None,
            }
        };
        if let Some(value) = one
            && let Some(key) = plain_key(value.as_bytes(), self.max_len)
        {
            return Ok(key);
        }
        self.read_checked(headers).map(str::as_bytes)
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

/// Header maps up to this many values are scanned once for the key rather
/// than looked up twice (each lookup hashes a name).
const SCAN_MAX: usize = 16;

/// The one `X-API-Key` value of a small map with no `Authorization`
/// header (`None`: anything else, for the full path to answer).
#[inline]
fn one_key_by_scan(headers: &HeaderMap) -> Option<&http::HeaderValue> {
    let mut found = None;
    for (name, value) in headers {
        if *name == header::AUTHORIZATION {
            return None;
        }
        // Compared as text of a known length: no call to `memcmp`.
        if name.as_str() == X_API_KEY_NAME && found.replace(value).is_some() {
            return None;
        }
    }
    found
}

/// `value` as a key when it is one as it stands: within `max_len` once
/// trimmed of spaces and tabs, every byte of it printable ASCII without
/// spaces, and nothing around it but spaces and tabs. Written without early
/// exits, so the compiler checks many bytes at a time.
#[inline]
fn plain_key(value: &[u8], max_len: usize) -> Option<&[u8]> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    // Usually nothing is around it: the whole value is the key, and no
    // bytes are counted one at a time for spaces and tabs it has not.
    let key = if value.first().is_some_and(blank) || value.last().is_some_and(blank) {
        std::hint::cold_path();
        let start = value.iter().take_while(|b| blank(b)).count();
        let rest = &value[start..];
        &rest[..rest.len() - rest.iter().rev().take_while(|b| blank(b)).count()]
    } else {
        value
    };
    if key.is_empty() || key.len() > max_len || !graphic(key) {
        return None;
    }
    Some(key)
}

/// Whether every byte is printable ASCII other than the space (`!` to
/// `~`), eight bytes at a time: a byte-by-byte loop cost about four
/// instructions a byte on the path of every request.
#[inline]
fn graphic(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    /// Nonzero when any byte of `x` is below `!` (exact: a borrow can only
    /// flag a byte above one that is flagged already) or above `~` (its
    /// high bit set, by itself or once one is added).
    #[inline]
    fn outside(x: u64) -> u64 {
        let below = x.wrapping_sub(ONES * 0x21) & !x & HIGH;
        let above = (x.wrapping_add(ONES) | x) & HIGH;
        below | above
    }
    // The last eight bytes cover the tail (some of them twice).
    let Some(last) = bytes.last_chunk::<8>() else {
        return bytes.iter().all(u8::is_ascii_graphic);
    };
    let (chunks, _) = bytes.as_chunks::<8>();
    let bad = chunks
        .iter()
        .fold(outside(u64::from_le_bytes(*last)), |bad, c| {
            bad | outside(u64::from_le_bytes(*c))
        });
    bad == 0
}

/// A key read as bytes (printable ASCII, so UTF-8) as text.
#[inline]
fn as_text(key: &[u8]) -> Result<&str, Rejection> {
    std::str::from_utf8(key)
        .map_err(|_| Rejection::MalformedKey("the API key must be printable ASCII without spaces"))
}

impl Extractor for ApiKey {
    #[inline]
    fn extract(&self, req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
        let key = self.read_raw(req.headers)?;
        let id = KeyId::of_bytes(key);
        if policy.has_revocations() && policy.is_revoked(as_text(key)?, id) {
            std::hint::cold_path();
            return Err(Rejection::UnknownKey);
        }
        let entry = match (policy.key_entry_bytes(key, id), &self.resolver) {
            (Some(entry), _) => Some(entry),
            (None, Some(resolve)) => resolve(as_text(key)?),
            (None, None) => None,
        };
        Ok(Identity::listed(id, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::{graphic, plain_key};

    #[test]
    fn a_plain_key_is_the_trimmed_value_when_that_is_a_key() {
        // The reference: trim spaces and tabs, then judge what is left.
        fn trimmed_then_judged(value: &[u8], max_len: usize) -> Option<&[u8]> {
            let blank = |b: &u8| *b == b' ' || *b == b'\t';
            let start = value.iter().position(|b| !blank(b)).unwrap_or(value.len());
            let end = value
                .iter()
                .rposition(|b| !blank(b))
                .map_or(start, |i| i + 1);
            let key = &value[start..end.max(start)];
            (!key.is_empty() && key.len() <= max_len && key.iter().all(u8::is_ascii_graphic))
                .then_some(key)
        }
        let max_len = 12;
        for len in 0..=16 {
            for pad in ["", " ", "\t", "  \t"] {
                for inner in [None, Some(b' '), Some(b'\t'), Some(0x7f), Some(0xc3)] {
                    let mut key = vec![b'k'; len];
                    if let (Some(b), true) = (inner, len > 2) {
                        key[len / 2] = b;
                    }
                    let value = [pad.as_bytes(), &key, pad.as_bytes()].concat();
                    for v in [&value[..], &key[..]] {
                        assert_eq!(
                            plain_key(v, max_len),
                            trimmed_then_judged(v, max_len),
                            "{v:?}"
                        );
                    }
                }
            }
        }
    }

    fn naive(bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b.is_ascii_graphic())
    }

    #[test]
    fn every_byte_value_at_every_place_is_judged_as_one_at_a_time() {
        for len in 0..=26 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut key = vec![b'k'; len];
                    key[at] = b;
                    assert_eq!(graphic(&key), naive(&key), "{b:#04x} at {at} of {len}");
                    // Beside a neighbour at both edges of the range (a
                    // borrow or carry must not hide or invent one).
                    for n in [b'!', b'~', 0x20, 0x7f, 0x80, 0xff, 0x00] {
                        if at + 1 < len {
                            key[at + 1] = n;
                            assert_eq!(graphic(&key), naive(&key), "{b:#04x},{n:#04x} at {at}");
                            key[at + 1] = b'k';
                        }
                    }
                }
            }
        }
    }
}
