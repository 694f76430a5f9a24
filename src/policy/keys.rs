//! The `[keys]` table: each listed key's tier, account and organisation, found by the
//! key's [`KeyId`] and compared by its full text.
//!
//! Built once with the policy and never changed, so it is a plain open
//! addressing table whose slots hold everything a lookup reads: the key's
//! id, its text (when short, as most API keys are) and its entry. Finding
//! a listed key reads one slot, usually one or two adjacent cache lines:
//! with many keys listed, each further memory access a request makes is
//! likely a cache miss.

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

/// One slot: a key's id and what a request needs of its entry, in one
/// cache line (the text of a key up to [`INLINE_KEY`] bytes included). A
/// key's organisation is kept beside the slots (few keys have one): the
/// slot says whether to look.
#[derive(Debug)]
#[repr(C, align(64))]
pub(super) struct Slot {
    id: u64,
    account: u64,
    tier: TierId,
    has_account: bool,
    has_org: bool,
    key: KeyText,
}

impl Slot {
    fn new(id: u64, key: &str, entry: ListedKey) -> Self {
        Slot {
            id,
            account: entry.account.map_or(0, KeyId::as_u64),
            tier: entry.tier,
            has_account: entry.account.is_some(),
            has_org: entry.org.is_some(),
            key: KeyText::new(key),
        }
    }

    /// The key's text.
    pub(super) fn key(&self) -> &str {
        self.key.as_str()
    }
}

/// The listed keys, by id (linear probing, at most half full: most
/// lookups read one slot).
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    slots: Box<[Option<Slot>]>,
    /// Each slot's organisation, when any key has one (else empty).
    orgs: Box<[u64]>,
}

impl KeyTable {
    /// A table with room for `n` keys.
    pub(super) fn with_capacity(n: usize) -> Self {
        let mut slots: Vec<Option<Slot>> = Vec::new();
        if n > 0 {
            slots.resize_with(2 * n + 1, || None);
        }
        KeyTable {
            slots: slots.into_boxed_slice(),
            orgs: Box::default(),
        }
    }

    /// Lists `key` with its entry; `false` (and nothing changed) if it is
    /// listed already. At most the capacity's keys.
    pub(super) fn insert(&mut self, key: &str, entry: ListedKey) -> bool {
        let id = KeyId::of(key).as_u64();
        let mut i = self.home(id);
        while let Some(slot) = &self.slots[i] {
            if slot.id == id && slot.key.is(key.as_bytes()) {
                return false;
            }
            i = self.next(i);
        }
        self.slots[i] = Some(Slot::new(id, key, entry));
        if let Some(org) = entry.org {
            if self.orgs.is_empty() {
                self.orgs = vec![0; self.slots.len()].into_boxed_slice();
            }
            self.orgs[i] = org.as_u64();
        }
        true
    }

    /// The entry of the key in slot `i`.
    #[inline]
    fn entry(&self, i: usize, slot: &Slot) -> ListedKey {
        ListedKey {
            tier: slot.tier,
            account: slot.has_account.then(|| KeyId::from_raw(slot.account)),
            org: match slot.has_org {
                true => self.orgs.get(i).map(|o| KeyId::from_raw(*o)),
                false => None,
            },
        }
    }

    /// Where a key of id `id` is looked for first (the id's high bits
    /// scaled to the table: any size, no division).
    #[inline]
    fn home(&self, id: u64) -> usize {
        ((u128::from(id) * self.slots.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The entry of `key`, whose id is `id`, if it is listed.
    #[inline]
    pub(super) fn find(&self, id: u64, key: &[u8]) -> Option<ListedKey> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(id);
        // A free slot ends the run: the table always has one.
        while let Some(slot) = &self.slots[i] {
            if slot.id == id && slot.key.is(key) {
                return Some(self.entry(i, slot));
            }
            i = self.next(i);
        }
        None
    }

    /// Every key listed, with its entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, ListedKey)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.key(), self.entry(i, s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 64);
        assert_eq!(std::mem::align_of::<Option<Slot>>(), 64);
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
