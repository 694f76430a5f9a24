#![allow(missing_docs)]
//! Load shedding under overload, end to end: the demo server
//! (`examples/axum_tiers.rs`) with the overload policy
//! (`examples/overload.toml`), driven past its capacity by closed-loop
//! clients of three tiers, once without the `[overload]` table and once
//! with it. Prints one table per run and the targets.
//!
//! The service: `GET /v1/endpoints?work_ms=20` needs one of 8 workers for
//! 20 ms (about 400 requests a second in all). The load: 64 free, 16 pro
//! and 4 enterprise clients, each sending its next request when the last
//! one is answered but no sooner than its pace after it sent the last (on
//! average; each pause is drawn from 0.5× to 1.5× of it): 50
//! ms for free clients, 100 ms for paying ones (free offers about 1,300 a
//! second, pro 160, enterprise 40: about 1,500 in all, 3.7× the capacity,
//! the paying tiers half of it). A shed client does not back off further:
//! the pressure stays (a real client honouring `Retry-After` would press
//! less). With the paying tiers alone at the whole capacity
//! (`PAID_PACE_MS=50`) no shedding can serve them all at low latency: the
//! table then shows by how much they miss.
//!
//! ```sh
//! cargo bench --bench overload                    # 20 s per run
//! DURATION=5 cargo bench --bench overload         # shorter
//! cargo bench --bench overload -- --test          # CI's quick mode: 1 s per run, no targets
//! ```
//!
//! Knobs (environment): `DURATION` (seconds per run), `FREE`, `PRO`,
//! `ENTERPRISE` (clients), `PACE_MS` (free), `PAID_PACE_MS` (pro and
//! enterprise), `WORK_MS`, `WORKERS`.
//! The server runs on its own runtime (2 threads), the clients on another.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tierlimit::Policy;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The overload policy, with its `[overload]` table or without it.
fn policy(overload: bool) -> Policy {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/overload.toml"
    ))
    .expect("examples/overload.toml");
    let text = if overload {
        text
    } else {
        text.split("\n[overload]").next().unwrap().to_owned()
    };
    Policy::from_toml_str(&text).expect("examples/overload.toml is valid")
}

/// Starts the demo on its own runtime; its address.
fn start(
    policy: Policy,
) -> (
    SocketAddr,
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let layer = demo::limits(policy, tierlimit::MemoryBackend::new());
            let app = demo::app_with_admin(layer, Some("bench-admin"));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tokio::select! {
                () = demo::serve_connections(listener, app, Duration::from_secs(10)) => {}
                _ = stopped => {}
            }
        });
    });
    (rx.recv().unwrap(), thread, stop)
}

/// One tier's clients' results.
#[derive(Default)]
struct Tally {
    ok: u64,
    shed: u64,
    other: u64,
    latencies: Vec<Duration>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.ok + self.shed + self.other
    }

    fn success(&self) -> f64 {
        100.0 * self.ok as f64 / self.total().max(1) as f64
    }

    fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// Closed-loop clients of `key` for `duration`.
async fn clients(
    addr: SocketAddr,
    key: &'static str,
    n: u64,
    pace: Duration,
    work_ms: u64,
    duration: Duration,
) -> Tally {
    let url = format!("http://{addr}/v1/endpoints?work_ms={work_ms}");
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = url.clone();
            // Each client's pace varies at random (0.5× to 1.5×, mean 1×),
            // so the clients do not fall into step and arrive in waves.
            let mut rng = 0x9E37_79B9_7F4A_7C15_u64
                ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                ^ key.len() as u64;
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .no_proxy()
                    .build()
                    .unwrap();
                let mut t = Tally::default();
                while Instant::now() < end {
                    let sent = Instant::now();
                    match client.get(&url).header("X-API-Key", key).send().await {
                        Ok(res) => {
                            let status = res.status().as_u16();
                            let _ = res.bytes().await;
                            match status {
                                200 => {
                                    t.ok += 1;
                                    t.latencies.push(sent.elapsed());
                                }
                                503 => t.shed += 1,
                                _ => t.other += 1,
                            }
                        }
                        Err(_) => t.other += 1,
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let factor = 0.5 + (rng % 1_000) as f64 / 1_000.0;
                    tokio::time::sleep_until((sent + pace.mul_f64(factor)).into()).await;
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.unwrap();
        all.ok += t.ok;
        all.shed += t.shed;
        all.other += t.other;
        all.latencies.extend(t.latencies);
    }
    all
}

/// The latency of one client alone (the unloaded latency): its median.
async fn unloaded(addr: SocketAddr, work_ms: u64, n: usize) -> Duration {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/endpoints?work_ms={work_ms}");
    let mut t = Tally::default();
    for _ in 0..n {
        let sent = Instant::now();
        let res = client
            .get(&url)
            .header("X-API-Key", "enterprise-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let _ = res.bytes().await;
        t.latencies.push(sent.elapsed());
    }
    t.percentile(0.5)
}

/// The demo's overload state (`GET /admin/v1/overload`).
async fn overload_state(client: &reqwest::Client, addr: SocketAddr) -> serde_json::Value {
    client
        .get(format!("http://{addr}/admin/v1/overload"))
        .bearer_auth("bench-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

struct Run {
    name: &'static str,
    tiers: Vec<(&'static str, u64, Tally)>,
    goodput: f64,
    capacity: Option<String>,
}

async fn run(overload: bool, duration: Duration, knobs: &Knobs) -> (Run, Duration) {
    let (addr, thread, stop) = start(policy(overload));
    let base = unloaded(addr, knobs.work_ms, if knobs.quick { 3 } else { 30 }).await;
    let pace = Duration::from_millis(knobs.pace_ms);
    let paid = Duration::from_millis(knobs.paid_pace_ms);
    let started = Instant::now();
    // TIMELINE=1: the capacity and the requests in flight every 250 ms.
    let timeline = (overload && std::env::var_os("TIMELINE").is_some()).then(|| {
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut line = Vec::new();
            while started.elapsed() < duration {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let v = overload_state(&client, addr).await;
                line.push(format!("{}/{}", v["in_flight"], v["capacity"]));
            }
            println!(
                "timeline (in flight/capacity every 250 ms): {}",
                line.join(" ")
            );
        })
    });
    let (free, pro, enterprise) = tokio::join!(
        clients(
            addr,
            "free-demo-key",
            knobs.free,
            pace,
            knobs.work_ms,
            duration
        ),
        clients(
            addr,
            "pro-demo-key",
            knobs.pro,
            paid,
            knobs.work_ms,
            duration
        ),
        clients(
            addr,
            "enterprise-demo-key",
            knobs.enterprise,
            paid,
            knobs.work_ms,
            duration
        ),
    );
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(t) = timeline {
        let _ = t.await;
    }
    let ok = free.ok + pro.ok + enterprise.ok;
    let capacity = if overload {
        let v = overload_state(&reqwest::Client::new(), addr).await;
        Some(format!("capacity at the end: {} in flight", v["capacity"]))
    } else {
        None
    };
    let _ = stop.send(());
    thread.join().unwrap();
    (
        Run {
            name: if overload {
                "with [overload] (adaptive)"
            } else {
                "without [overload]"
            },
            tiers: vec![
                ("free", knobs.free, free),
                ("pro", knobs.pro, pro),
                ("enterprise", knobs.enterprise, enterprise),
            ],
            goodput: ok as f64 / elapsed,
            capacity,
        },
        base,
    )
}

struct Knobs {
    quick: bool,
    free: u64,
    pro: u64,
    enterprise: u64,
    pace_ms: u64,
    paid_pace_ms: u64,
    work_ms: u64,
    workers: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let knobs = Knobs {
        quick,
        free: env_or("FREE", 64),
        pro: env_or("PRO", 16),
        enterprise: env_or("ENTERPRISE", 4),
        pace_ms: env_or("PACE_MS", 50),
        paid_pace_ms: env_or("PAID_PACE_MS", 100),
        work_ms: env_or("WORK_MS", 20),
        workers: env_or("WORKERS", 8),
    };
    // The demo reads its workers from `WORKERS` itself (default 8).
    let duration = Duration::from_secs(if quick { 1 } else { env_or("DURATION", 20) });
    let capacity_rps = knobs.workers as f64 * 1000.0 / knobs.work_ms.max(1) as f64;
    let free_offered = knobs.free as f64 * 1000.0 / knobs.pace_ms.max(1) as f64;
    let paid_offered =
        (knobs.pro + knobs.enterprise) as f64 * 1000.0 / knobs.paid_pace_ms.max(1) as f64;
    let offered = free_offered + paid_offered;
    println!(
        "overload: {} workers × {} ms (capacity ≈ {capacity_rps:.0} requests/s); clients free {} (one request per {} ms at most) / pro {} and enterprise {} (per {} ms): ≈ {offered:.0} offered/s, {:.1}× capacity, paying tiers {:.0}% of capacity; {} s per run",
        knobs.workers,
        knobs.work_ms,
        knobs.free,
        knobs.pace_ms,
        knobs.pro,
        knobs.enterprise,
        knobs.paid_pace_ms,
        offered / capacity_rps,
        100.0 * paid_offered / capacity_rps,
        duration.as_secs()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for overload in [false, true] {
        let (mut r, base) = rt.block_on(run(overload, duration, &knobs));
        println!();
        println!(
            "## {} — unloaded latency {:.1} ms; goodput {:.0} requests/s ({:.0}% of capacity){}",
            r.name,
            base.as_secs_f64() * 1e3,
            r.goodput,
            100.0 * r.goodput / capacity_rps,
            r.capacity
                .as_ref()
                .map_or(String::new(), |c| format!("; {c}"))
        );
        println!();
        println!(
            "| tier | clients | requests | succeeded | shed (503) | other | p50 ms | p99 ms | p99 / unloaded |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (tier, n, t) in &mut r.tiers {
            let (p50, p99) = (t.percentile(0.5), t.percentile(0.99));
            println!(
                "| {tier} | {n} | {} | {:.1}% | {} | {} | {:.1} | {:.1} | {:.1}× |",
                t.total(),
                t.success(),
                t.shed,
                t.other,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                p99.as_secs_f64() / base.as_secs_f64().max(1e-9)
            );
        }
        if overload && !quick {
            // In the run's order: free, pro, enterprise.
            let ent_success = r.tiers[2].2.success();
            let ent_p99 = r.tiers[2].2.percentile(0.99);
            let pro_success = r.tiers[1].2.success();
            let goodput_share = r.goodput / capacity_rps;
            let mark = |ok: bool| if ok { "met" } else { "NOT met" };
            println!();
            println!(
                "targets: enterprise ≥ 99% succeed: {:.1}% ({}); enterprise p99 ≤ 3× unloaded: {:.1}× ({}); pro ≥ 95% succeed: {:.1}% ({}); goodput ≥ 90% of capacity: {:.0}% ({})",
                ent_success,
                mark(ent_success >= 99.0),
                ent_p99.as_secs_f64() / base.as_secs_f64().max(1e-9),
                mark(ent_p99 <= base * 3),
                pro_success,
                mark(pro_success >= 95.0),
                100.0 * goodput_share,
                mark(goodput_share >= 0.9),
            );
        }
        if quick {
            // CI's quick mode: the runs work (answers are 200 or 503).
            let others: u64 = r.tiers.iter().map(|(_, _, t)| t.other).sum();
            let ok: u64 = r.tiers.iter().map(|(_, _, t)| t.ok).sum();
            assert_eq!(others, 0, "every answer is 200 or 503");
            assert!(ok > 0, "some requests succeed");
        }
    }
}
