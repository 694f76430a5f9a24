//! [`Buckets`]: a shard's `bucket → TAT` table, flat.
//!
//! Bucket ids are already uniform hashes, and with many keys tracked
//! nearly every lookup is a cache miss. A SwissTable (the standard map)
//! reads its control bytes, then the entry they point to: two dependent
//! misses. Here an entry is its slot (linear probing over 16-byte slots,
//! four to a cache line, at most three quarters full), so a lookup is one
//! miss, rarely two. Deletion shifts the rest of a run back (no
//! tombstones), so a table that churns never degrades.

/// Slot keys are bucket ids; 0 marks a free slot, and bucket 0 itself
/// lives beside the slots.
const FREE: u64 = 0;

/// The smallest table made once anything is stored.
const MIN_SLOTS: usize = 16;

/// `bucket → TAT` (or any `u64` per bucket).
#[derive(Default)]
pub(super) struct Buckets {
    /// A power of two long (or empty); `(key, value)`, key [`FREE`] when free.
    slots: Box<[(u64, u64)]>,
    /// Slots in use (bucket 0 not counted).
    used: usize,
    /// Bucket 0's value, if tracked.
    zero: Option<u64>,
}

impl Buckets {
    /// Where `key` is looked for first: its bits mixed (Fibonacci
    /// hashing), the top ones taken.
    #[inline]
    fn home(&self, key: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The slot holding `key` (not 0), if any.
    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        if self.used == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match self.slots[i].0 {
                k if k == key => return Some(i),
                FREE => return None,
                _ => i = (i + 1) & mask,
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.used + usize::from(self.zero.is_some())
    }

    /// Slots allocated (for shrinking).
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    pub(super) fn get(&self, key: &u64) -> Option<&u64> {
        if *key == FREE {
            return self.zero.as_ref();
        }
        self.find(*key).map(|i| &self.slots[i].1)
    }

    #[inline]
    pub(super) fn get_mut(&mut self, key: &u64) -> Option<&mut u64> {
        if *key == FREE {
            return self.zero.as_mut();
        }
        self.find(*key).map(|i| &mut self.slots[i].1)
    }

    #[inline]
    pub(super) fn contains_key(&self, key: &u64) -> bool {
        self.get(key).is_some()
    }

    /// Any one tracked bucket (for one to give way): the first from
    /// `near`'s home on. Callers pass the new bucket (a uniform hash), so
    /// the scan is short on average; always scanning from slot 0 made
    /// evicting a shard's guests one by one quadratic (each eviction empties
    /// the front, so the next scans further).
    pub(super) fn any_key(&self, near: u64) -> Option<u64> {
        if self.zero.is_some() {
            return Some(FREE);
        }
        if self.used == 0 {
            return None;
        }
        let (before, after) = self.slots.split_at(self.home(near));
        after.iter().chain(before).map(|s| s.0).find(|&k| k != FREE)
    }

    /// Stores `value` for `key`; the value it had, if any.
    pub(super) fn insert(&mut self, key: u64, value: u64) -> Option<u64> {
        if key == FREE {
            return self.zero.replace(value);
        }
        if let Some(i) = self.find(key) {
            return Some(std::mem::replace(&mut self.slots[i].1, value));
        }
        if (self.used + 1) * 4 > self.slots.len() * 3 {
            self.resize((self.slots.len() * 2).max(MIN_SLOTS));
        }
        self.place(key, value);
        self.used += 1;
        None
    }

    /// Puts a key known to be absent in the first free slot of its run.
    fn place(&mut self, key: u64, value: u64) {
        let mask = self.mask();
        let mut i = self.home(key);
        while self.slots[i].0 != FREE {
            i = (i + 1) & mask;
        }
        self.slots[i] = (key, value);
    }

    /// `value` for `key`, inserting `default` first if it has none (one
    /// lookup when it has one).
    pub(super) fn or_insert(&mut self, key: u64, default: u64) -> &mut u64 {
        if key == FREE {
            return self.zero.get_or_insert(default);
        }
        let i = match self.find(key) {
            Some(i) => i,
            None => {
                self.insert(key, default);
                self.find(key).expect("inserted above")
            }
        };
        &mut self.slots[i].1
    }

    /// Removes `key`; its value, if it had one.
    pub(super) fn remove(&mut self, key: &u64) -> Option<u64> {
        if *key == FREE {
            return self.zero.take();
        }
        let i = self.find(*key)?;
        let value = self.slots[i].1;
        self.delete(i);
        Some(value)
    }

    /// Frees slot `i`, shifting back the entries after it in its run that
    /// may sit earlier (each stays reachable from its home).
    fn delete(&mut self, mut hole: usize) {
        let mask = self.mask();
        self.slots[hole].0 = FREE;
        self.used -= 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let key = self.slots[j].0;
            if key == FREE {
                return;
            }
            let home = self.home(key);
            // The entry at `j` may move to `hole` unless its home lies
            // cyclically after the hole, up to `j`.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                self.slots[j].0 = FREE;
                hole = j;
            }
        }
    }

    /// Keeps the entries for which `keep` is true, each looked at once.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&u64, &mut u64) -> bool) {
        if let Some(v) = self.zero.as_mut()
            && !keep(&FREE, v)
        {
            self.zero = None;
        }
        if self.used == 0 {
            return;
        }
        let mask = self.mask();
        // Start just after a free slot: no run crosses it, so an entry
        // shifted back by a removal is never one already looked at.
        let start = self
            .slots
            .iter()
            .position(|s| s.0 == FREE)
            .expect("a table is never full");
        let mut left = self.slots.len();
        let mut i = (start + 1) & mask;
        while left > 0 {
            left -= 1;
            let (key, mut v) = self.slots[i];
            if key != FREE && !keep(&key, &mut v) {
                // The slot now holds the next entry of the run (if any):
                // look at it again before moving on; it did not count.
                self.delete(i);
                left += 1;
                if self.slots[i].0 == FREE {
                    left -= 1;
                    i = (i + 1) & mask;
                }
                continue;
            }
            self.slots[i].1 = v;
            i = (i + 1) & mask;
        }
    }

    /// Shrinks the table to fit what it holds.
    pub(super) fn shrink_to_fit(&mut self) {
        let mut n = MIN_SLOTS;
        while self.used * 4 > n * 3 {
            n *= 2;
        }
        if self.used == 0 {
            self.slots = Box::default();
        } else if n < self.slots.len() {
            self.resize(n);
        }
    }

    fn resize(&mut self, n: usize) {
        let old = std::mem::replace(&mut self.slots, vec![(FREE, 0); n].into_boxed_slice());
        for (k, v) in old.iter().copied() {
            if k != FREE {
                self.place(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A random walk of inserts, removes and retains against the standard
    /// map, with keys that collide on their home slot and bucket 0.
    #[test]
    fn matches_the_standard_map() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut flat = Buckets::default();
        let mut std: HashMap<u64, u64> = HashMap::new();
        for step in 0..200_000u64 {
            // Few distinct keys, many sharing low and high bits.
            let key = match rand() % 4 {
                0 => 0,
                1 => rand() % 64,
                2 => (rand() % 64) << 58,
                _ => rand() % 4096,
            };
            match rand() % 10 {
                0..=4 => assert_eq!(flat.insert(key, step), std.insert(key, step)),
                5..=7 => assert_eq!(flat.remove(&key), std.remove(&key)),
                8 => {
                    *flat.or_insert(key, 7) += 1;
                    *std.entry(key).or_insert(7) += 1;
                }
                _ if step % 97 == 0 => {
                    let cut = rand() % 200_000;
                    let mut seen = 0;
                    flat.retain(|_, v| {
                        seen += 1;
                        *v > cut
                    });
                    assert_eq!(seen, std.len(), "each entry looked at once");
                    std.retain(|_, v| *v > cut);
                    if step % 3 == 0 {
                        flat.shrink_to_fit();
                    }
                }
                _ => {}
            }
            assert_eq!(flat.len(), std.len());
            assert_eq!(flat.get(&key), std.get(&key));
        }
        for (k, v) in &std {
            assert_eq!(flat.get(k), Some(v));
        }
        assert_eq!(flat.any_key(0).is_some(), !std.is_empty());
    }
}

#[cfg(test)]
#[path = "flat_attack.rs"]
mod attack;
