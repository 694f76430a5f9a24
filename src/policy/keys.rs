//! The `[keys]` table: each listed key's tier and account, found by the
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
    fn is(&self, key: &str) -> bool {
        match self {
            KeyText::Inline { len, bytes } => {
                bytes.get(..usize::from(*len)) == Some(key.as_bytes())
            }
            KeyText::Heap(text) => **text == *key,
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

/// One slot: a key's id and what a request needs of its entry, in one
/// cache line (the text of a key up to [`INLINE_KEY`] bytes included).
#[derive(Debug)]
#[repr(C, align(64))]
pub(super) struct Slot {
    id: u64,
    account: u64,
    tier: TierId,
    has_account: bool,
    key: KeyText,
}

impl Slot {
    fn new(id: u64, key: &str, tier: TierId, account: Option<KeyId>) -> Self {
        Slot {
            id,
            account: account.map_or(0, KeyId::as_u64),
            tier,
            has_account: account.is_some(),
            key: KeyText::new(key),
        }
    }

    /// The entry: the key's tier and account.
    #[inline]
    pub(super) fn entry(&self) -> (TierId, Option<KeyId>) {
        let account = self.has_account.then(|| KeyId::from_raw(self.account));
        (self.tier, account)
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
        }
    }

    /// Lists `key` with its tier and account; `false` (and nothing
    /// changed) if it is listed already. At most the capacity's keys.
    pub(super) fn insert(&mut self, key: &str, tier: TierId, account: Option<KeyId>) -> bool {
        let id = KeyId::of(key).as_u64();
        let mut i = self.home(id);
        while let Some(slot) = &self.slots[i] {
            if slot.id == id && slot.key.is(key) {
                return false;
            }
            i = self.next(i);
        }
        self.slots[i] = Some(Slot::new(id, key, tier, account));
        true
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

    /// The slot of `key`, whose id is `id`, if it is listed.
    #[inline]
    pub(super) fn find(&self, id: u64, key: &str) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(id);
        // A free slot ends the run: the table always has one.
        while let Some(slot) = &self.slots[i] {
            if slot.id == id && slot.key.is(key) {
                return Some(slot);
            }
            i = self.next(i);
        }
        None
    }

    /// Every key listed, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Slot> + '_ {
        self.slots.iter().flatten()
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
        let mut t = KeyTable::with_capacity(2);
        assert!(t.insert("k", TierId(0), None));
        assert!(!t.insert("k", TierId(1), None), "listed twice");
        assert!(t.insert("k2", TierId(1), None));
        assert_eq!(
            t.find(KeyId::of("k").as_u64(), "k").map(Slot::entry),
            Some((TierId(0), None))
        );
        assert_eq!(t.iter().count(), 2);
    }
}
