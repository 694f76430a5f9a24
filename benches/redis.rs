//! Checks per second against a real Redis, 64 checks in flight, next to
//! `redis-benchmark` running the same script with 64 clients in the same
//! run: the physical limit of this machine's Redis.
//!
//! With batches on, the same 64 in flight on one hot key (and on 100,000
//! keys), the script calls per admitted check (`INFO commandstats`), and
//! one check at a time next to the memory backend's.
//!
//! ```sh
//! cargo bench --features redis --bench redis
//! cargo bench --features redis --bench redis -- --test   # once, quickly
//! ```
//!
//! Without `redis-server` it prints why and measures nothing, unless
//! `TIERLIMIT_REQUIRE_REDIS=1` (CI), which makes that a failure.
#![allow(missing_docs)]

#[path = "../tests/common/secret.rs"]
#[allow(dead_code, unreachable_pub)]
mod secret;

#[path = "../tests/common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod fixture;

#[path = "../tests/common/one.rs"]
mod one;
use one::CheckOne;

use std::hint::black_box;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tierlimit::backend::Subject;
use tierlimit::{Limit, RedisBackend, key::KeyId};

const IN_FLIGHT: usize = 64;
const KEYS: u64 = 100_000;

/// The script `RedisBackend` runs for a check, built as
/// `src/backend/redis/mod.rs` builds it: the preludes (the time, GCRA,
/// calendar periods), then the check itself. The bench checks below that Redis already holds this
/// exact text, loaded by the backend.
const CHECK: &str = concat!(
    include_str!("../src/backend/redis/now.lua"),
    include_str!("../src/backend/redis/gcra.lua"),
    include_str!("../src/backend/redis/calendar.lua"),
    include_str!("../src/backend/redis/check.lua")
);

/// Criterion's test mode (`cargo bench -- --test`, or `cargo test`, which
/// passes no `--bench`): each function once, and a short `redis-benchmark`.
fn quick() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench")
}

fn bench(c: &mut Criterion) {
    if !fixture::available() {
        return;
    }
    fixture::init_secret();
    let server = fixture::RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = rt.block_on(async {
        RedisBackend::builder(server.url())
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    });
    let limit = Limit::per_hour(1_000_000_000);
    let subject = |i: u64| Subject::new(KeyId::from_raw(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 1);
    // Warm up: loads the script, fills some keys.
    rt.block_on(async {
        for i in 0..1000 {
            assert!(
                backend
                    .check_one(&subject(i), &limit)
                    .await
                    .unwrap()
                    .allowed
            );
        }
    });

    // The physical limit: redis-benchmark, 64 clients, the same script
    // (one EVALSHA per check, Redis's clock, random keys).
    // The backend loaded its script when it connected: the text here must
    // be the same one, or the comparison measures something else.
    let sha = server
        .cli(&["EVAL", "return redis.sha1hex(ARGV[1])", "0", CHECK])
        .unwrap();
    assert_eq!(
        server.cli(&["SCRIPT", "EXISTS", &sha]).as_deref(),
        Some("1"),
        "benches/redis.rs's CHECK is not the script RedisBackend loaded: \
         build it as src/backend/redis/mod.rs builds it (preludes, order)"
    );
    let requests: u64 = if quick() { 2_000 } else { 200_000 };
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .args([
            "-c",
            &IN_FLIGHT.to_string(),
            "-n",
            &requests.to_string(),
            "-r",
            &KEYS.to_string(),
            "-q",
        ])
        .args([
            "EVALSHA",
            &sha,
            "1",
            "tierlimit:{__rand_int__}",
            // As RedisBackend's check of one charge: 'check', now (empty:
            // Redis's TIME), 1 charge, no lease (id, TTL), then the
            // charge's interval (us), max, reserve, cost.
            "check",
            "",
            "1",
            "",
            "0",
            "3",
            "1000000000",
            "0",
            "1",
        ])
        .output()
        .expect("redis-benchmark runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .split("requests per second")
        .next()
        .and_then(|s| s.rsplit(':').next())
        .map(str::trim)
        .unwrap_or("?")
        .to_owned();
    // The script really ran, without errors.
    let calls = server.command_calls("evalsha");
    assert!(calls >= requests, "only {calls} EVALSHA calls: {text}");
    let stats = server.cli(&["INFO", "commandstats"]).unwrap_or_default();
    let evalsha = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or_default();
    // One failure is expected: the warm-up's first EVALSHA (NOSCRIPT).
    let failed: u64 = evalsha
        .split("failed_calls=")
        .nth(1)
        .and_then(|n| n.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(failed <= 1, "script errors: {evalsha}");
    println!("redis-benchmark, same script, {IN_FLIGHT} clients: {rps} checks per second");

    let batched = rt.block_on(fixture::batched_on_the_real_clock(&server));
    script_calls_of_a_hot_key(&rt, &server, &batched, &limit);

    let mut group = c.benchmark_group("redis checks, 64 in flight");
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    group.measurement_time(Duration::from_secs(5));
    let mut n = 0u64;
    group.bench_function("tierlimit RedisBackend", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = Vec::with_capacity(IN_FLIGHT);
                for _ in 0..IN_FLIGHT {
                    n = n.wrapping_add(7919);
                    tasks.push(backend.check_one(&subject(n % KEYS), &limit));
                }
                for d in futures_util::future::join_all(tasks).await {
                    black_box(d.unwrap());
                }
            })
        })
    });
    let hot = subject(0);
    for (name, b) in [
        ("one hot key", &backend),
        ("one hot key, batches", &batched),
    ] {
        group.bench_function(format!("tierlimit RedisBackend, {name}"), |bench| {
            bench.iter(|| in_flight(&rt, b, |_| hot, &limit))
        });
    }
    group.bench_function("tierlimit RedisBackend, 100,000 keys, batches", |bench| {
        bench.iter(|| {
            in_flight(
                &rt,
                &batched,
                |_| {
                    n = n.wrapping_add(7919);
                    subject(n % KEYS)
                },
                &limit,
            )
        })
    });
    group.finish();

    // One check at a time: what an admitted request waits for.
    let memory = tierlimit::MemoryBackend::new();
    let mut group = c.benchmark_group("one check at a time");
    group.bench_function("memory backend", |bench| {
        bench.iter(|| {
            rt.block_on(async { black_box(memory.check_one(&hot, &limit).await.unwrap()) })
        })
    });
    group.bench_function("RedisBackend, batches, one hot key", |bench| {
        bench.iter(|| {
            rt.block_on(async { black_box(batched.check_one(&hot, &limit).await.unwrap()) })
        })
    });
    group.bench_function("RedisBackend, one hot key", |bench| {
        bench.iter(|| {
            rt.block_on(async { black_box(backend.check_one(&hot, &limit).await.unwrap()) })
        })
    });
    group.finish();
}

/// `IN_FLIGHT` checks at once on `backend`, of the subjects `pick` names.
fn in_flight(
    rt: &tokio::runtime::Runtime,
    backend: &RedisBackend,
    mut pick: impl FnMut(usize) -> Subject,
    limit: &Limit,
) {
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(IN_FLIGHT);
        for i in 0..IN_FLIGHT {
            tasks.push(backend.check_one(&pick(i), limit));
        }
        for d in futures_util::future::join_all(tasks).await {
            assert!(black_box(d.unwrap()).allowed);
        }
    })
}

/// Script calls per admitted request for one hot key with batches on
/// (`INFO commandstats` around a fixed number of checks, 64 in flight).
fn script_calls_of_a_hot_key(
    rt: &tokio::runtime::Runtime,
    server: &fixture::RedisServer,
    batched: &RedisBackend,
    limit: &Limit,
) {
    let hot = Subject::new(KeyId::from_raw(0x5eed), 1);
    let rounds = if quick() { 50 } else { 2_000 };
    server.cli(&["CONFIG", "RESETSTAT"]);
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        in_flight(rt, batched, |_| hot, limit);
    }
    let elapsed = started.elapsed();
    let checks = (rounds * IN_FLIGHT) as f64;
    let calls = server.command_calls("evalsha") as f64;
    println!(
        "batches, one hot key, {IN_FLIGHT} in flight: {:.0} admitted checks per second, {:.4} script calls per admitted check",
        checks / elapsed.as_secs_f64(),
        calls / checks
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
