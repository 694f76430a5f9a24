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

/// A `[keys]` entry: the key's text, its tier and its account.
#[derive(Debug)]
pub(super) struct KeyRow {
    key: KeyText,
    pub(super) tier: TierId,
    pub(super) account: Option<KeyId>,
}

impl KeyRow {
    pub(super) fn new(key: &str, tier: TierId, account: Option<KeyId>) -> Self {
        KeyRow {
            key: KeyText::new(key),
            tier,
            account,
        }
    }

    /// The key's text.
    pub(super) fn key(&self) -> &str {
        self.key.as_str()
    }
}

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
    fn new(id: u64, row: KeyRow) -> Self {
        Slot {
            id,
            account: row.account.map_or(0, KeyId::as_u64),
            tier: row.tier,
            has_account: row.account.is_some(),
            key: row.key,
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
    len: usize,
}

impl KeyTable {
    /// The table of `rows`, each under its key's id (`id_of`); the keys
    /// must be distinct.
    pub(super) fn new(rows: Vec<KeyRow>, id_of: impl Fn(&str) -> u64) -> Self {
        let len = rows.len();
        if len == 0 {
            return KeyTable::default();
        }
        let mut slots: Vec<Option<Slot>> = Vec::new();
        slots.resize_with(2 * len + 1, || None);
        let mut table = KeyTable {
            slots: slots.into_boxed_slice(),
            len,
        };
        for row in rows {
            let id = id_of(row.key());
            let mut i = table.home(id);
            while table.slots[i].is_some() {
                i = table.next(i);
            }
            table.slots[i] = Some(Slot::new(id, row));
        }
        table
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
        if self.len == 0 {
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
}
