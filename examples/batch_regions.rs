//! Batches across regions, simulated: each region's store is a
//! [`Batcher`](tierlimit::backend::batch::Batcher) that takes batches from
//! one global store across an inter-region latency, and serves its
//! region's requests from them. A fake clock drives everything, so the run
//! is deterministic and instant.
//!
//! For each setting it prints what was admitted, what one exact GCRA of
//! the same arrivals allows, the over-admission (spends that do not
//! conform when every region's spends are replayed in time order through
//! an exact GCRA: always 0), the under-admission, and the global round
//! trips per admitted request.
//!
//! ```text
//! cargo run --example batch_regions
//! ```

use std::time::Duration;

use tierlimit::Limit;
use tierlimit::backend::batch::sim::{Run, run};

/// A setting: regions, one-way latency to the global store, the limit,
/// requests a second across all regions, the hold and the share.
struct Setting {
    name: &'static str,
    regions: usize,
    latency_ms: u64,
    limits: Vec<Limit>,
    rate: u64,
    hold_ms: u64,
    share: f64,
}

/// Arrivals for two seconds: each region gets its share of `rate`, with
/// exponential gaps (a fixed seed), the first region twice the others.
fn arrivals(s: &Setting, seed: u64) -> Vec<(u64, usize, u32)> {
    let mut x = seed;
    let mut uniform = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let weights: Vec<u64> = (0..s.regions).map(|r| if r == 0 { 2 } else { 1 }).collect();
    let total: u64 = weights.iter().sum();
    let mut all = Vec::new();
    for (r, w) in weights.iter().enumerate() {
        let mean = 1e9 * total as f64 / (s.rate * w) as f64;
        let mut t = 0.0;
        loop {
            t += -mean * (1.0 - uniform()).ln();
            if t >= 2e9 {
                break;
            }
            all.push((t as u64, r, 1));
        }
    }
    all.sort_by_key(|a| a.0);
    all
}

/// The settings the table shows.
fn settings() -> Vec<Setting> {
    let minute = |n| Limit::per_minute(n);
    vec![
        Setting {
            name: "no batches (share 0)",
            regions: 3,
            latency_ms: 40,
            limits: vec![minute(120_000)],
            rate: 1_500,
            hold_ms: 500,
            share: 0.0,
        },
        Setting {
            name: "3 regions, not binding",
            regions: 3,
            latency_ms: 40,
            limits: vec![minute(120_000)],
            rate: 1_500,
            hold_ms: 500,
            share: 0.1,
        },
        Setting {
            name: "3 regions, hold 100 ms < rtt",
            regions: 3,
            latency_ms: 40,
            limits: vec![minute(120_000)],
            rate: 1_500,
            hold_ms: 100,
            share: 0.1,
        },
        Setting {
            name: "3 regions, binding 2x",
            regions: 3,
            latency_ms: 40,
            limits: vec![Limit::per_second(2_000)],
            rate: 4_000,
            hold_ms: 500,
            share: 0.1,
        },
        Setting {
            name: "5 regions, 80 ms, two limits",
            regions: 5,
            latency_ms: 80,
            limits: vec![minute(300_000), Limit::per_hour(10_000_000)],
            rate: 4_000,
            hold_ms: 500,
            share: 0.1,
        },
        Setting {
            name: "3 regions, 5 ms, hold 50 ms",
            regions: 3,
            latency_ms: 5,
            limits: vec![Limit::per_second(2_000)],
            rate: 1_500,
            hold_ms: 50,
            share: 0.1,
        },
        Setting {
            name: "3 regions, near the limit",
            regions: 3,
            latency_ms: 40,
            limits: vec![Limit::per_second(2_000)],
            rate: 1_900,
            hold_ms: 500,
            share: 0.3,
        },
    ]
}

fn main() {
    let settings = settings();
    println!(
        "{:<30} {:>9} {:>10} {:>6} {:>7} {:>14}",
        "setting", "admitted", "allowance", "over", "under", "rt/admitted"
    );
    for (i, s) in settings.iter().enumerate() {
        let r = Run {
            hold: Duration::from_millis(s.hold_ms),
            max_share: s.share,
            limits: s.limits.clone(),
            latencies: vec![s.latency_ms * 1_000_000; s.regions],
            arrivals: arrivals(s, 0x9E37_79B9 + i as u64),
        };
        let o = run(&r);
        assert_eq!(o.violations, 0, "over-admission in {}", s.name);
        println!(
            "{:<30} {:>9} {:>10} {:>6} {:>7} {:>14.3}",
            s.name,
            o.admitted,
            o.ideal,
            o.violations,
            o.ideal.saturating_sub(o.admitted),
            o.store.takes as f64 / o.requests.max(1) as f64,
        );
    }
}
