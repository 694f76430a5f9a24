//! Adversarial tests of [`Buckets`]: keys aimed at chosen home slots
//! (runs that wrap, deletions inside long runs, `retain` on wrapped
//! runs), checked against the standard map and the table's invariants.

use super::*;
use std::collections::HashMap;

const PHI: u64 = 0x9e37_79b9_7f4a_7c15;

fn inv(a: u64) -> u64 {
    // Newton iteration for the inverse mod 2^64 of an odd number.
    let mut x = a;
    for _ in 0..6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
    }
    assert_eq!(a.wrapping_mul(x), 1);
    x
}

/// The key whose mixed bits are `product`.
fn key_of(product: u64) -> u64 {
    product.wrapping_mul(inv(PHI))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Structural invariants of the table.
fn check(b: &Buckets) {
    let n = b.slots.len();
    if n == 0 {
        assert_eq!(b.used, 0);
        return;
    }
    assert!(n.is_power_of_two() && n >= MIN_SLOTS);
    let occ = b.slots.iter().filter(|s| s.0 != FREE).count();
    assert_eq!(occ, b.used, "used count");
    assert!(b.used * 4 <= n * 3, "load");
    let mask = n - 1;
    for j in 0..n {
        let k = b.slots[j].0;
        if k == FREE {
            continue;
        }
        let h = b.home(k);
        let mut i = h;
        while i != j {
            assert_ne!(
                b.slots[i].0, FREE,
                "gap between home {h} and slot {j} of key {k:#x}"
            );
            i = (i + 1) & mask;
        }
        // unique
        assert_eq!(b.find(k), Some(j));
    }
}

fn same(b: &Buckets, m: &HashMap<u64, u64>) {
    check(b);
    assert_eq!(b.len(), m.len());
    for (k, v) in m {
        assert_eq!(b.get(k), Some(v), "key {k:#x} lost");
    }
    let mut seen = 0;
    if let Some(v) = b.zero {
        assert_eq!(m.get(&0), Some(&v));
        seen += 1;
    }
    for s in b.slots.iter() {
        if s.0 != FREE {
            assert_eq!(m.get(&s.0), Some(&s.1), "phantom {:#x}", s.0);
            seen += 1;
        }
    }
    assert_eq!(seen, m.len());
}

#[test]
fn inverse_gives_home() {
    let mut b = Buckets::default();
    b.insert(1, 1);
    for h in 0..16u64 {
        let k = key_of((h << 60) | 12345);
        assert_eq!(b.home(k), h as usize);
    }
}

/// A run of 12 keys all homed at the last slot (wrapping), deleting
/// each position in turn.
#[test]
fn wrapped_run_deletes() {
    for del in 0..12 {
        for home in [15u64, 14, 13, 0, 7] {
            let mut b = Buckets::default();
            let mut m = HashMap::new();
            let keys: Vec<u64> = (0..12).map(|i| key_of((home << 60) | (i + 1))).collect();
            for (i, &k) in keys.iter().enumerate() {
                b.insert(k, i as u64);
                m.insert(k, i as u64);
            }
            assert_eq!(b.slots.len(), 16);
            same(&b, &m);
            assert_eq!(b.remove(&keys[del]), m.remove(&keys[del]));
            same(&b, &m);
            // delete all the rest in a scrambled order
            for j in (0..12).rev() {
                let k = keys[(j * 5 + del) % 12];
                assert_eq!(b.remove(&k), m.remove(&k));
                same(&b, &m);
            }
        }
    }
}

/// Mixed homes (two interleaved runs that wrap).
#[test]
fn interleaved_runs_wrap() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..20_000 {
        let mut b = Buckets::default();
        let mut m = HashMap::new();
        let n = 1 + (rng.next() % 12) as usize;
        for _ in 0..n {
            let home = [15u64, 14, 0, 1, 13][(rng.next() % 5) as usize];
            let k = key_of((home << 60) | (rng.next() >> 4));
            if k == 0 {
                continue;
            }
            let v = rng.next();
            assert_eq!(b.insert(k, v), m.insert(k, v));
        }
        same(&b, &m);
        // retain every other entry in slot order / by random
        let mode = rng.next() % 3;
        let mut calls = HashMap::new();
        let mut idx = 0u64;
        b.retain(|k, v| {
            *calls.entry(*k).or_insert(0) += 1;
            idx += 1;
            *v = v.wrapping_add(1);
            match mode {
                0 => idx.is_multiple_of(2),
                1 => *k & 1 == 0,
                _ => false,
            }
        });
        assert_eq!(calls.len(), m.len());
        assert!(
            calls.values().all(|&c| c == 1),
            "predicate once each: {calls:?}"
        );
        // replay with the std map: which were kept?
        let kept: Vec<u64> = b.slots.iter().filter(|s| s.0 != 0).map(|s| s.0).collect();
        match mode {
            1 => m.retain(|k, _| k & 1 == 0),
            2 => m.clear(),
            _ => m.retain(|k, _| kept.contains(k)),
        }
        for v in m.values_mut() {
            *v = v.wrapping_add(1);
        }
        same(&b, &m);
    }
}

#[test]
fn extremes_and_get_mut() {
    let mut b = Buckets::default();
    let mut m = HashMap::new();
    for k in [
        0u64,
        u64::MAX,
        1,
        u64::MAX - 1,
        1 << 63,
        key_of(0),
        key_of(u64::MAX),
        key_of(1 << 63),
    ] {
        b.insert(k, k ^ 5);
        m.insert(k, k ^ 5);
        same(&b, &m);
    }
    for k in [0u64, u64::MAX, 1 << 63, key_of(u64::MAX)] {
        *b.get_mut(&k).unwrap() += 3;
        *m.get_mut(&k).unwrap() += 3;
        *b.or_insert(k, 99) += 1;
        *m.entry(k).or_insert(99) += 1;
    }
    same(&b, &m);
    assert_eq!(b.remove(&0), m.remove(&0));
    assert_eq!(b.remove(&0), None);
    assert_eq!(b.get(&0), None);
    same(&b, &m);
    b.retain(|_, _| false);
    m.clear();
    same(&b, &m);
    b.shrink_to_fit();
    assert_eq!(b.capacity(), 0);
    assert_eq!(b.get(&5), None);
    assert_eq!(b.remove(&5), None);
    assert_eq!(b.any_key(7), None);
    b.retain(|_, _| panic!("empty"));
    assert_eq!(b.insert(5, 1), None);
    assert_eq!(b.get(&5), Some(&1));
    // zero only, after shrink
    let mut z = Buckets::default();
    z.insert(0, 1);
    z.shrink_to_fit();
    assert_eq!(z.get(&0), Some(&1));
    assert_eq!(z.any_key(7), Some(0));
    assert_eq!(z.len(), 1);
}

/// Random model test with adversarial key generators, many seeds.
#[test]
fn model_adversarial() {
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut b = Buckets::default();
        let mut m: HashMap<u64, u64> = HashMap::new();
        let mut pool: Vec<u64> = Vec::new();
        for step in 0..60_000u64 {
            let key = match rng.next() % 8 {
                0 => 0,
                1 => u64::MAX,
                // same home at every size up to 2^20: the top 20 mixed bits fixed
                2 => key_of((0xFFFFFu64 << 44) | (rng.next() % 512)),
                3 => key_of(rng.next() % 512),
                4 => key_of((rng.next() % 4) << 62 | (rng.next() % 256)),
                5 if !pool.is_empty() => pool[(rng.next() as usize) % pool.len()],
                _ => rng.next() % 2048,
            };
            if pool.len() < 5000 {
                pool.push(key);
            }
            match rng.next() % 16 {
                0..=5 => assert_eq!(b.insert(key, step), m.insert(key, step)),
                6..=10 => assert_eq!(b.remove(&key), m.remove(&key)),
                11 => {
                    *b.or_insert(key, 7) += 1;
                    *m.entry(key).or_insert(7) += 1;
                }
                12 => {
                    if let Some(v) = b.get_mut(&key) {
                        *v ^= 0xff;
                    }
                    if let Some(v) = m.get_mut(&key) {
                        *v ^= 0xff;
                    }
                }
                13 if step % 50 == 0 => {
                    let cut = rng.next() % (step + 1);
                    let parity = rng.next() & 1;
                    let mut calls: HashMap<u64, u32> = HashMap::new();
                    b.retain(|k, v| {
                        *calls.entry(*k).or_insert(0) += 1;
                        *v = v.wrapping_add(10);
                        *v > cut || (*k & 1) == parity
                    });
                    assert_eq!(calls.len(), m.len(), "seed {seed} step {step}");
                    assert!(calls.values().all(|&c| c == 1));
                    m.retain(|k, v| {
                        *v = v.wrapping_add(10);
                        *v > cut || (*k & 1) == parity
                    });
                    same(&b, &m);
                    if rng.next().is_multiple_of(2) {
                        b.shrink_to_fit();
                        same(&b, &m);
                    }
                }
                14 if step % 500 == 0 => {
                    // mass delete then regrow
                    let keys: Vec<u64> = m.keys().copied().collect();
                    for k in keys.iter().skip(1) {
                        assert_eq!(b.remove(k), m.remove(k));
                    }
                    b.shrink_to_fit();
                    same(&b, &m);
                }
                15 => {
                    assert_eq!(b.any_key(key).is_some(), !m.is_empty());
                    if let Some(k) = b.any_key(key) {
                        assert!(m.contains_key(&k));
                    }
                }
                _ => {}
            }
            assert_eq!(b.len(), m.len());
            assert_eq!(b.get(&key), m.get(&key));
            if step % 997 == 0 {
                same(&b, &m);
            }
        }
        same(&b, &m);
    }
}

/// Exhaustive: every subset of keys in a 16-slot table with homes
/// chosen near the end, removed by every retain mask.
#[test]
fn retain_every_mask_small() {
    let homes = [14u64, 15, 15, 0, 15, 1, 14, 0, 15];
    let keys: Vec<u64> = homes
        .iter()
        .enumerate()
        .map(|(i, h)| key_of((h << 60) | (i as u64 + 1)))
        .collect();
    for order in 0..20u64 {
        let mut ks = keys.clone();
        let mut r = Rng(order + 7);
        for i in (1..ks.len()).rev() {
            ks.swap(i, (r.next() % (i as u64 + 1)) as usize);
        }
        for mask in 0..(1u32 << ks.len()) {
            let mut b = Buckets::default();
            let mut m = HashMap::new();
            for (i, &k) in ks.iter().enumerate() {
                b.insert(k, i as u64);
                m.insert(k, i as u64);
            }
            let mut calls = 0;
            b.retain(|_, v| {
                calls += 1;
                *v += 100;
                mask & (1 << (*v - 100)) != 0
            });
            assert_eq!(calls, ks.len());
            m.retain(|_, v| {
                *v += 100;
                mask & (1 << (*v - 100)) != 0
            });
            same(&b, &m);
        }
    }
}
