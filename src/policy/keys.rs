//! The `[keys]` table: each listed key's tier, account and organisation, found by the
//! key's [`KeyId`] and compared by its full text.
//!
//! Built once with the policy and never changed, so it is a plain open
//! addressing index of small places (id, tier, where the rest is) beside
//! the entries (the key's text, when short as most API keys are, and its
//! account). See [`KeyTable`] for why the tier sits in the index.

use std::fmt;

use super::TierId;
use crate::key::KeyId;

/// The longest key kept in its slot.
pub(super) const INLINE_KEY: usize = 38;

/// A listed key's text: in its slot when it is short, else on the heap.
enum KeyText {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<str>),
}

impl KeyText {
    fn new(key: &str) -> Self {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                KeyText::Inline { len, bytes }
            }
            _ => KeyText::Heap(key.into()),
        }
    }

    /// Whether this is `key`'s text.
    #[inline]
    fn is(&self, key: &[u8]) -> bool {
        match self {
            KeyText::Inline { len, bytes } => bytes.get(..usize::from(*len)) == Some(key),
            KeyText::Heap(text) => text.as_bytes() == key,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Made from a `&str`: always UTF-8.
            KeyText::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            KeyText::Heap(text) => text,
        }
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.write_str("KeyText(..)")
    }
}

/// What the policy says of a listed key: its tier, and the account and
/// organisation it belongs to, if any ([`Policy::key_entry`](super::Policy::key_entry)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListedKey {
    /// The key's tier.
    pub tier: TierId,
    /// Its account (`None`: the key is its own account).
    pub account: Option<KeyId>,
    /// Its organisation (`None`: the account is its own organisation).
    pub org: Option<KeyId>,
}

impl ListedKey {
    /// A key of `tier`, in no account or organisation.
    pub const fn new(tier: TierId) -> Self {
        ListedKey {
            tier,
            account: None,
            org: None,
        }
    }

    /// The same key in `account` (`None`: none).
    #[must_use]
    pub const fn in_account(mut self, account: Option<KeyId>) -> Self {
        self.account = account;
        self
    }

    /// The same key in organisation `org` (`None`: none).
    #[must_use]
    pub const fn in_org(mut self, org: Option<KeyId>) -> Self {
        self.org = org;
        self
    }
}

/// A listed key's text and account, found through its [`Probe`].
#[derive(Debug)]
pub(super) struct Slot {
    account: u64,
    key: KeyText,
}

impl Slot {
    /// The key's text.
    pub(super) fn key(&self) -> &str {
        self.key.as_str()
    }
}

/// One place in the index: a key's id, its tier, and where its entry is
/// (16 bytes, four to a cache line).
#[derive(Clone, Copy, Debug)]
struct Probe {
    id: u64,
    /// `entries` index + 1 (0: a free place).
    entry: u32,
    tier: TierId,
    has_account: bool,
    has_org: bool,
}

/// The listed keys, by id: an index of small places (linear probing, at
/// most half full: most lookups read one) that holds each key's tier, and
/// the entries (text and account) beside it.
///
/// A lookup reads the index, then the entry to compare the key's full
/// text. With many keys listed both are likely cache misses, but the
/// second does not hold the request up: the tier came from the index, so
/// the processor goes on (predicting that the text matches, as it almost
/// always does) while the comparison's line arrives, and the backend's
/// own miss overlaps it.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    index: Box<[Probe]>,
    entries: Vec<Slot>,
    /// Each entry's organisation, when any key has one (else empty).
    orgs: Vec<u64>,
}

impl KeyTable {
    /// A table with room for `n` keys.
    pub(super) fn with_capacity(n: usize) -> Self {
        let index = if n > 0 {
            let free = Probe {
                id: 0,
                entry: 0,
                tier: TierId(0),
                has_account: false,
                has_org: false,
            };
            vec![free; 2 * n + 1].into_boxed_slice()
        } else {
            Box::default()
        };
        KeyTable {
            index,
            entries: Vec::with_capacity(n),
            orgs: Vec::new(),
        }
    }

    /// Lists `key` with its entry; `false` (and nothing changed) if it is
    /// listed already. At most the capacity's keys.
    pub(super) fn insert(&mut self, key: &str, entry: ListedKey) -> bool {
        let id = KeyId::of(key).as_u64();
        let mut i = self.home(id);
        while self.index[i].entry != 0 {
            let p = self.index[i];
            if p.id == id && self.entries[p.entry as usize - 1].key.is(key.as_bytes()) {
                return false;
            }
            i = self.next(i);
        }
        let Ok(at) = u32::try_from(self.entries.len() + 1) else {
            return false;
        };
        self.entries.push(Slot {
            account: entry.account.map_or(0, KeyId::as_u64),
            key: KeyText::new(key),
        });
        self.index[i] = Probe {
            id,
            entry: at,
            tier: entry.tier,
            has_account: entry.account.is_some(),
            has_org: entry.org.is_some(),
        };
        if let Some(org) = entry.org {
            self.orgs.resize(self.entries.len(), 0);
            self.orgs[at as usize - 1] = org.as_u64();
        }
        true
    }

    /// The entry of the key placed at `p`, whose slot is `slot`.
    #[inline]
    fn entry(&self, p: &Probe, slot: &Slot) -> ListedKey {
        ListedKey {
            tier: p.tier,
            account: p.has_account.then(|| KeyId::from_raw(slot.account)),
            org: match p.has_org {
                true => self
                    .orgs
                    .get(p.entry as usize - 1)
                    .map(|o| KeyId::from_raw(*o)),
                false => None,
            },
        }
    }

    /// Where a key of id `id` is looked for first (the id's high bits
    /// scaled to the index: any size, no division).
    #[inline]
    fn home(&self, id: u64) -> usize {
        ((u128::from(id) * self.index.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.index.len() { 0 } else { i + 1 }
    }

    /// The entry of `key`, whose id is `id`, if it is listed.
    #[inline]
    pub(super) fn find(&self, id: u64, key: &[u8]) -> Option<ListedKey> {
        if self.index.is_empty() {
            return None;
        }
        let mut i = self.home(id);
        // A free place ends the run: the index always has one.
        loop {
            let p = &self.index[i];
            if p.entry == 0 {
                return None;
            }
            if p.id == id
                && let Some(slot) = self.entries.get(p.entry as usize - 1)
                && slot.key.is(key)
            {
                return Some(self.entry(p, slot));
            }
            i = self.next(i);
        }
    }

    /// Every key listed, with its entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, ListedKey)> + '_ {
        self.index.iter().filter(|p| p.entry != 0).filter_map(|p| {
            let slot = self.entries.get(p.entry as usize - 1)?;
            Some((slot.key(), self.entry(p, slot)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_places_fit_a_cache_line() {
        assert_eq!(std::mem::size_of::<Probe>(), 16);
    }

    #[test]
    fn a_key_is_listed_once() {
        let mut t = KeyTable::with_capacity(3);
        assert!(t.insert("k", ListedKey::new(TierId(0))));
        assert!(!t.insert("k", ListedKey::new(TierId(1))), "listed twice");
        assert!(t.insert("k2", ListedKey::new(TierId(1))));
        assert_eq!(
            t.find(KeyId::of("k").as_u64(), b"k"),
            Some(ListedKey::new(TierId(0)))
        );
        let acme = ListedKey::new(TierId(1))
            .in_account(Some(KeyId::of_account("team")))
            .in_org(Some(KeyId::of_org("acme")));
        assert!(t.insert("k3", acme));
        assert_eq!(t.find(KeyId::of("k3").as_u64(), b"k3"), Some(acme));
        assert_eq!(
            t.find(KeyId::of("k").as_u64(), b"k"),
            Some(ListedKey::new(TierId(0))),
            "a key without an organisation has none"
        );
        assert_eq!(t.iter().count(), 3);
    }
}
