#![allow(missing_docs)]
//! The servers `benches/wrk.sh` drives: the benches' bare router, the
//! same router under a no-op layer (any layer's floor) and under no-op
//! layers writing two and four `X-RateLimit-*` fields (the floor under
//! tower_governor's two headers and tierlimit's four), tower_governor and
//! tierlimit (same routes, same quota, key from `X-API-Key`), each with its
//! headers and without them (equal work: no fields written), each on its
//! own loopback port, on one current-thread runtime (wrk gets the other
//! core).
//!
//! `wrk_server serve` prints `NAME=PORT` for each (`bare`, `noop_layer`,
//! `noop_2_fields`, `noop_4_fields`, `tower_governor`, `tierlimit`,
//! `tower_governor_no_headers`, `tierlimit_no_headers`, and
//! `tower_governor_no_headers_again`, a second copy of the same server
//! as a control) on one line and
//! serves until killed; under plain `cargo bench` it
//! does nothing. Quick mode (`cargo bench --bench wrk_server -- --test`, or
//! `cargo test --bench wrk_server`: no `--bench` argument, as criterion
//! decides) starts the same servers, sends each a few requests through a
//! real HTTP client over loopback (what wrk would send), checks the
//! answers, and stops.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;

use support::*;

/// The servers, each on a free loopback port: names, addresses and
/// the tasks serving them.
async fn start() -> Vec<(&'static str, SocketAddr, tokio::task::JoinHandle<()>)> {
    let apps = [
        ("bare", bare()),
        ("noop_layer", noop_layer()),
        ("noop_2_fields", fields_layer(2)),
        ("noop_4_fields", fields_layer(4)),
        ("tower_governor", tower_governor()),
        ("tierlimit", tierlimit(&keys(1))),
        ("tower_governor_no_headers", tower_governor_no_headers()),
        ("tierlimit_no_headers", tierlimit_no_headers(&keys(1))),
        // The control: a second, identical server. Its ratio to the first
        // is what the measurement itself leans by, with no difference in
        // the work.
        (
            "tower_governor_no_headers_again",
            tower_governor_no_headers(),
        ),
    ];
    let mut servers = Vec::new();
    for (name, app) in apps {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        servers.push((name, addr, task));
    }
    servers
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve = args.first().map(String::as_str) == Some("serve");
    let quick = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    if args.iter().any(|a| a == "--list") || !(serve || quick) {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let servers = start().await;
        if serve {
            let line: Vec<String> = servers
                .iter()
                .map(|(name, addr, _)| format!("{name}={}", addr.port()))
                .collect();
            println!("{}", line.join(" "));
            for (_, _, task) in servers {
                task.await.unwrap();
            }
            return;
        }
        // Quick mode: wrk's request (benches/wrk.sh), a few times per server.
        let key = &keys(1)[0];
        let client = reqwest::Client::new();
        for (name, addr, task) in servers {
            for _ in 0..3 {
                let res = client
                    .get(format!("http://{addr}/v1/account"))
                    .header("x-api-key", key)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(res.status(), reqwest::StatusCode::OK, "{name}");
                let fields = res
                    .headers()
                    .keys()
                    .filter(|k| k.as_str().starts_with("x-ratelimit-"))
                    .count();
                let expected = match name {
                    "tierlimit" | "noop_4_fields" => 4,
                    "tower_governor" | "noop_2_fields" => 2,
                    _ => 0,
                };
                assert_eq!(fields, expected, "{name}: rate-limit fields");
                assert_eq!(res.text().await.unwrap(), "{}", "{name}");
            }
            task.abort();
            println!("wrk_server {name}: ok");
        }
    });
}
