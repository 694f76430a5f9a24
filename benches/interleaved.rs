//! The issue's comparison, robust to a noisy machine: every row in one
//! process, rounds interleaved (each round runs every row once, in a
//! rotating order), medians over the rounds. Prints the added cost per
//! request over the bare router and its ratio to tower_governor's, then
//! the multi-threaded hot-key throughput.
//!
//! ```sh
//! cargo bench --bench interleaved            # 201 rounds of 2,000 requests
//! ROUNDS=5 PER_ROUND=10000 cargo bench --bench interleaved
//! cargo bench --bench interleaved -- --test   # quick mode: every row once
//! PROCESSES=10 cargo bench --bench interleaved   # ten processes, summarised
//! EVICT=512 ONLY="1 key" cargo bench --bench interleaved   # from cold caches
//! ```
//!
//! One process's figures move with where its code and heap happen to lie
//! (on a shared VM, ±40 ns per request between two runs of one binary):
//! `PROCESSES=N` runs the whole bench in N processes one after another
//! and prints, per row, the median over the processes of each one's ratio
//! and paired difference, with their range and, from six processes on, an
//! interval holding the median over layouts with 95% confidence (see
//! `interval`). Each process after the first
//! moves its heap first (see `shift_heap`), so that the median is taken
//! over layouts. Quick mode runs two.
//!
//! Quick mode (`-- --test`, or `cargo test --bench interleaved`: no
//! `--bench` argument, as criterion decides) runs every row and prints the
//! tables from one round of a few requests, with 1,000 keys standing in for
//! 100,000: it checks that everything runs, and measures nothing.

use std::hint::black_box;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use http::{HeaderValue, Request, StatusCode};
use tower::{Service, ServiceExt};

#[path = "support/mod.rs"]
mod support;

use support::*;

/// The rows every table keeps first: the bare router, the no-op layer
/// (the floor) and the no-op layers writing two and four fields.
const FLOORS: usize = 4;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `name`'s value, a whole number `ok` accepts; 0 when unset. Any other
/// value stops the bench, saying what it must be (`what`).
fn env_checked(name: &str, ok: impl Fn(usize) -> bool, what: &str) -> usize {
    std::env::var(name).map_or(0, |v| {
        v.parse::<usize>()
            .ok()
            .filter(|n| ok(*n))
            .unwrap_or_else(|| panic!("{name}={v}: {what}"))
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `EVICT=KiB`: the size of a buffer written through after every request
/// of the single-thread table (not the multi-thread one), which pushes
/// the path's data, and through the shared levels its code, out of the
/// caches it is larger than, as a server's kernel and network stack do
/// between two requests (end to end, 60% of a server's time is in the
/// kernel): what each row costs from colder caches. Every row writes it
/// alike, so the floor holds it. Unset: 0, nothing written.
fn evict_kib() -> usize {
    env_checked(
        "EVICT",
        |k| k.checked_mul(1024).is_some(),
        "a whole number of KiB",
    )
}

thread_local! {
    static EVICT: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0; evict_kib() * 1024]);
}

fn evict() {
    EVICT.with_borrow_mut(|buf| {
        for line in buf.chunks_mut(64) {
            line[0] = line[0].wrapping_add(1);
        }
        black_box(buf);
    });
}

/// Runs `n` requests through `router`, cycling through `keys`; ns/request.
fn run(rt: &tokio::runtime::Runtime, router: &mut Router, keys: &[HeaderValue], n: usize) -> f64 {
    let start = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let req = request(&keys[i % keys.len()]);
            ServiceExt::<Request<Body>>::ready(&mut *router)
                .await
                .unwrap();
            black_box(router.call(req).await.unwrap());
            evict();
        }
    });
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let quick = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    if quick && std::env::var_os(CHILD).is_none() {
        check_interval();
    }
    let child = std::env::var_os(CHILD).is_some();
    let processes = env("PROCESSES", if quick { 2 } else { 1 });
    if processes > 1 && !child {
        return across_processes(&args, processes);
    }
    let shift = shift_heap();
    let (rounds, per_round, many) = if quick {
        println!("quick mode: every row once, nothing measured");
        (1, 32, 1_000)
    } else {
        (env("ROUNDS", 201), env("PER_ROUND", 2_000), 100_000)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let one = keys(1);
    let many = keys(many);
    let one_hv = header_values(&one);
    let many_hv = header_values(&many);

    let mut rows: Vec<(&str, Router, &[HeaderValue])> = vec![
        ("bare router", bare(), &one_hv),
        ("no-op layer holding an Arc", noop_layer(), &one_hv),
        ("no-op layer writing 2 fields", fields_layer(2), &one_hv),
        ("no-op layer writing 4 fields", fields_layer(4), &one_hv),
        ("tower_governor, 1 key", tower_governor(), &one_hv),
        ("tower_governor, 100k keys", tower_governor(), &many_hv),
        ("tower-rate-tier, 1 key", tower_rate_tier(&one), &one_hv),
        (
            "tower-rate-tier, 100k keys",
            tower_rate_tier(&many),
            &many_hv,
        ),
        ("tierlimit, 1 key", tierlimit(&one), &one_hv),
        ("tierlimit, 100k keys", tierlimit(&many), &many_hv),
        ("tierlimit, 1 guest", tierlimit_guests(), &one_hv),
        ("tierlimit, 100k guests", tierlimit_guests(), &many_hv),
        (
            "tower_governor, 1 key, no headers",
            tower_governor_no_headers(),
            &one_hv,
        ),
        (
            "tower_governor, 100k keys, no headers",
            tower_governor_no_headers(),
            &many_hv,
        ),
        (
            "tierlimit, 1 key, no headers",
            tierlimit_no_headers(&one),
            &one_hv,
        ),
        (
            "tierlimit, 100k keys, no headers",
            tierlimit_no_headers(&many),
            &many_hv,
        ),
        (
            "tierlimit, 1 guest, no headers",
            tierlimit_guests_no_headers(),
            &one_hv,
        ),
        (
            "tierlimit, 100k guests, no headers",
            tierlimit_guests_no_headers(),
            &many_hv,
        ),
        ("tierlimit, exempt route", tierlimit_exempt(&one), &one_hv),
        (
            "tierlimit, 1 key, two limits",
            tierlimit_two_limits(&one),
            &one_hv,
        ),
        ("tierlimit, 1 key, tokens", tierlimit_tokens(&one), &one_hv),
        (
            "tierlimit, 1 key, concurrency",
            tierlimit_concurrency(&one),
            &one_hv,
        ),
    ];
    // `ONLY=text`: the rows whose name holds it, beside the bare router,
    // the floors and tower_governor's rows, which every ratio is taken
    // against (for a profiler, or a comparison of builds).
    if let Ok(only) = std::env::var("ONLY") {
        let mut i = 0;
        rows.retain(|r| {
            i += 1;
            i <= FLOORS || r.0.starts_with("tower_governor") || r.0.contains(&only)
        });
    }
    for (name, router, keys) in &mut rows {
        let res = rt
            .block_on(router.clone().oneshot(request(&keys[0])))
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{name}");
        assert_eq!(
            res.headers().contains_key("x-ratelimit-remaining"),
            !(*name == "bare router"
                || *name == "no-op layer holding an Arc"
                || name.ends_with("no headers")
                || name.ends_with("exempt route")),
            "{name}"
        );
        // Every key tracked, caches warm.
        run(&rt, router, keys, keys.len().max(per_round));
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for k in 0..rows.len() {
            let i = (k + round) % rows.len();
            let (_, router, keys) = &mut rows[i];
            times[i].push(run(&rt, router, keys, per_round));
        }
    }
    let medians: Vec<f64> = times.iter().cloned().map(median).collect();
    let bare = medians[0];
    let index = |name: &str| rows.iter().position(|r| r.0 == name);
    // Row `i`'s time less row `p`'s in each round, then their median.
    let paired = |i: usize, p: usize| {
        median(
            (0..times[i].len())
                .map(|r| times[i][r] - times[p][r])
                .collect(),
        )
    };
    let added = |name: &str| index(name).map_or(f64::NAN, |i| medians[i] - bare);
    println!(
        "\n{rounds} interleaved rounds of {per_round} requests per row; medians (ns per request)\n"
    );
    if shift > 0 {
        println!("heap moved by {shift} bytes (the process's layout; see `shift_heap`)\n");
    }
    let evict = evict_kib();
    if evict > 0 {
        println!(
            "{evict} KiB written through after every request (EVICT; not in the multi-thread table)\n"
        );
    }
    let floor = added("no-op layer holding an Arc");
    println!(
        "| row | per request | added over bare | above the no-op floor | added / tower_governor's | above floor / tower_governor's | over tower_governor's, paired |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    // The tower_governor row a row is compared with: same key count, same
    // headers on or off.
    let peer_of = |name: &str| match (name.ends_with("no headers"), name.contains("100k")) {
        (true, false) => "tower_governor, 1 key, no headers",
        (true, true) => "tower_governor, 100k keys, no headers",
        (false, true) => "tower_governor, 100k keys",
        (false, false) => "tower_governor, 1 key",
    };
    for (i, (name, _, _)) in rows.iter().enumerate() {
        let peer = peer_of(name);
        let tg = added(peer);
        let a = medians[i] - bare;
        if i < FLOORS {
            println!("| {name} | {:.0} | +{a:.0} | — | — | — | — |", medians[i]);
            continue;
        }
        let paired = index(peer).map_or(f64::NAN, |p| paired(i, p));
        println!(
            "| {name} | {:.0} | +{a:.0} | +{:.0} | {:.2}× | {:.2}× | {paired:+.0} |",
            medians[i],
            a - floor,
            a / tg,
            (a - floor) / (tg - floor)
        );
        if child {
            let ratio = (a - floor) / (tg - floor);
            println!("{RECORD}\t{name}\t{ratio}\t{paired}");
        }
    }

    // At equal work: tierlimit's four fields less what two more fields
    // cost any layer (the 4-field no-op layer over the 2-field one, paired
    // by round), beside tower_governor's two.
    let extra = match (
        index("no-op layer writing 4 fields"),
        index("no-op layer writing 2 fields"),
    ) {
        (Some(four), Some(two)) => paired(four, two),
        _ => f64::NAN,
    };
    println!("\nTwo more fields cost any layer {extra:+.0} ns (paired). With that taken out:\n");
    println!("| row | above the no-op floor, less two fields | / tower_governor's |");
    println!("|---|---:|---:|");
    for name in [
        "tierlimit, 1 key",
        "tierlimit, 100k keys",
        "tierlimit, 1 guest",
        "tierlimit, 100k guests",
    ] {
        if index(name).is_none() {
            continue;
        }
        let a = added(name) - floor - extra;
        let tg = added(peer_of(name)) - floor;
        println!("| {name} | +{a:.0} | {:.2}× |", a / tg);
        if child {
            println!(
                "{RECORD}\t{name}, less two fields\t{}\t{}",
                a / tg,
                f64::NAN
            );
        }
    }

    // With `ONLY`, the multi-thread table only on `MT=1`.
    if std::env::var_os("ONLY").is_none() || std::env::var_os("MT").is_some() {
        let (rounds, requests) = if quick {
            (1, 64)
        } else {
            (env("MT_ROUNDS", 9), env("MT_REQUESTS", 80_000))
        };
        multi_thread(&one_hv, rounds, requests, child);
    }
}

/// Set in the processes [`across_processes`] starts.
const CHILD: &str = "TIERLIMIT_INTERLEAVED_CHILD";
/// Marks a child's machine-readable line: row, ratio to tower_governor's
/// (above the floor; requests/s for the multi-thread rows), paired ns.
const RECORD: &str = "@row";

/// Set in each child: bytes allocated (and kept) before anything else, so
/// that the main thread's later small heap objects lie at other offsets in
/// their pages.
const SHIFT: &str = "TIERLIMIT_INTERLEAVED_HEAP_SHIFT";

/// Process `p`'s heap shift: whole cache lines, spread over a page (the
/// offsets that decide which L1 set a line falls in), 0 for the first;
/// the 64 offsets repeat from the 65th process on.
fn heap_shift(p: usize) -> usize {
    (p * 37 % 64) * 64
}

/// Moves the heap by about [`SHIFT`] bytes (a child's), before the runtime
/// and the routers are built. Where objects lie in their pages decides
/// which of them share a set of an 8-way L1 data cache; a row can gain or
/// lose tens of nanoseconds from that alone, in every round of one
/// process. The stack moves by itself (the kernel starts it at a random
/// offset); the heap does not.
///
/// Only what the allocator cuts from the main arena moves: the main
/// thread's objects below its `mmap` threshold (128 KiB). The 100,000-key
/// tables are `mmap`ed, page-aligned, and the multi-thread runtime's
/// workers have arenas of their own. Varied across processes, the median
/// over them is taken over those layouts, not one.
fn shift_heap() -> usize {
    let shift = env_checked(
        SHIFT,
        |s| s < 4096 && s % 64 == 0,
        "whole cache lines, under a page",
    );
    if shift > 0 {
        std::mem::forget(black_box(Vec::<u8>::with_capacity(shift)));
    }
    shift
}

/// Runs the bench in `n` processes one after another (never at once: they
/// would share the cores) and summarises each row over them.
fn across_processes(args: &[String], n: usize) {
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for p in 0..n {
        let out = std::process::Command::new(&exe)
            .args(args)
            .env(CHILD, "1")
            .env(SHIFT, heap_shift(p).to_string())
            .output()
            .expect("a child process of the bench");
        assert!(out.status.success(), "process {p} failed: {out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [RECORD, name, ratio, paired] = f[..] else {
                continue;
            };
            let (ratio, paired) = (ratio.parse().unwrap(), paired.parse().unwrap());
            match rows.iter_mut().find(|r| r.0 == name) {
                Some(r) => {
                    r.1.push(ratio);
                    r.2.push(paired);
                }
                None => rows.push((name.to_owned(), vec![ratio], vec![paired])),
            }
        }
    }
    assert!(!rows.is_empty(), "the children printed no rows");
    let range = |v: &[f64], f: &dyn Fn(f64) -> String| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{} | {} – {}", f(median(v.to_vec())), f(lo), f(hi))
    };
    println!(
        "\n{n} processes; per row, the median over them, the range and an interval holding the median over layouts with 95% confidence (6 to 1,000 processes)\n"
    );
    println!(
        "| row | above floor / tower_governor's | range | 95% interval | over tower_governor's, paired (ns) | range | 95% interval | processes at or under tower_governor's |"
    );
    println!("|---|---:|---|---|---:|---|---|---:|");
    for (name, ratio, paired) in rows.iter().filter(|r| !r.0.starts_with("tower_governor")) {
        // A row without a figure (NaN: no paired column) in some process
        // is summarised over the processes that have one.
        let measured =
            |v: &[f64]| -> Vec<f64> { v.iter().copied().filter(|x| !x.is_nan()).collect() };
        let (ratio, paired) = (&measured(ratio), &measured(paired));
        if ratio.is_empty() {
            continue;
        }
        // Requests/s: higher is better; everything else, lower.
        let mt = name.contains("hot key");
        let under = ratio
            .iter()
            .filter(|&&r| if mt { r >= 1.0 } else { r <= 1.0 })
            .count();
        let paired = if paired.is_empty() {
            "— | — | —".to_owned()
        } else {
            let ns = |x: f64| format!("{x:+.0}");
            format!("{} | {}", range(paired, &ns), interval(paired, &ns))
        };
        let times = |x: f64| format!("{x:.2}×");
        println!(
            "| {name} | {} | {} | {paired} | {under} of {} |",
            range(ratio, &times),
            interval(ratio, &times),
            ratio.len()
        );
    }
}

/// A distribution-free 95% interval for the median of `v` (one value per
/// process, each process its own layout): the order statistics
/// `x(k)`, `x(n+1-k)` for the largest `k` with P(Binomial(n, ½) < k) ≤
/// 2.5%, which covers the median at least 95% of the time. Fewer than 6
/// values have none ("—"), nor more than 1,000 (2ⁿ overflows a float from
/// 1,024 on).
fn interval(v: &[f64], f: &dyn Fn(f64) -> String) -> String {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n > 1000 {
        return "—".to_owned();
    }
    // P(B < k) for B ~ Binomial(n, ½), k = 1, 2, …
    let mut below = 0.0;
    let mut choose = 1.0; // C(n, k - 1)
    let mut k = 0;
    for j in 0..n {
        below += choose / 2f64.powi(n as i32);
        if below > 0.025 {
            break;
        }
        k = j + 1;
        choose = choose * (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return "—".to_owned();
    }
    format!("{} – {}", f(v[k - 1]), f(v[n - k]))
}

/// `interval` on values whose answer is known: the order statistics a
/// binomial table gives (n = 6: the 1st and 6th; 10: 2nd and 9th; 16: 4th
/// and 13th; 101: 41st and 61st), none below 6 values, any order in.
fn check_interval() {
    let of = |n: usize| -> String {
        let v: Vec<f64> = (1..=n).rev().map(|i| i as f64).collect();
        interval(&v, &|x| format!("{x}"))
    };
    assert_eq!(of(5), "—");
    assert_eq!(of(6), "1 – 6");
    assert_eq!(of(10), "2 – 9");
    assert_eq!(of(16), "4 – 13");
    assert_eq!(of(101), "41 – 61");
    assert_eq!(of(1001), "—");
}

/// One hot key on a multi-thread runtime with both cores: 8 tasks each send
/// their share of requests through clones of one router; requests/s.
fn multi_thread(one: &[HeaderValue], rounds: usize, total: usize, child: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let rows: Vec<(&str, Router)> = vec![
        ("bare router", bare()),
        ("tower_governor, 1 hot key", tower_governor()),
        ("tierlimit, 1 hot key", tierlimit(&keys(1))),
    ];
    const TASKS: usize = 8;
    let go = |router: &Router| -> f64 {
        let start = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut router = router.clone();
                    let key = one[0].clone();
                    tokio::spawn(async move {
                        for _ in 0..total / TASKS {
                            let req = request(&key);
                            ServiceExt::<Request<Body>>::ready(&mut router)
                                .await
                                .unwrap();
                            let res = router.call(req).await.unwrap();
                            assert_eq!(res.status(), StatusCode::OK);
                            black_box(res);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        total as f64 / start.elapsed().as_secs_f64()
    };
    for (_, r) in &rows {
        go(r); // warm up
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for k in 0..rows.len() {
            let i = (k + round) % rows.len();
            rates[i].push(go(&rows[i].1));
        }
    }
    let medians: Vec<f64> = rates.into_iter().map(median).collect();
    println!(
        "\nMulti-thread runtime (2 workers, {TASKS} tasks, one hot key), {rounds} interleaved rounds of {total} requests; medians\n"
    );
    println!("| row | requests/s | vs tower_governor |");
    println!("|---|---:|---:|");
    for (i, (name, _)) in rows.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.2}× |",
            medians[i],
            medians[i] / medians[1]
        );
        if child && i > 1 {
            println!(
                "{RECORD}\t{name}\t{}\t{}",
                medians[i] / medians[1],
                f64::NAN
            );
        }
    }
}
