//! Instruction counts per request, which (unlike wall time on a shared
//! machine) repeat exactly. Runs N requests through one router row; run it
//! under callgrind at two N and divide the difference:
//!
//! ```sh
//! cargo bench --bench instructions --no-run
//! B=$(ls -t ${CARGO_TARGET_DIR:-target}/release/deps/instructions-* | grep -v '\.d$' | head -1)
//! for row in bare noop tierlimit tower_governor tower_rate_tier tierlimit_no_headers tower_governor_no_headers tierlimit_guests tierlimit_guests_no_headers tierlimit_two_limits tierlimit_tokens tierlimit_concurrency; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $row 1000 2>&1 | grep -oP 'Collected : \K\d+')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $row 11000 2>&1 | grep -oP 'Collected : \K\d+')
//!   echo "$row $(( (b - a) / 10000 )) instructions per request"
//! done
//! ```
//!
//! With `--cache-sim=yes` callgrind also models the processor's caches, and
//! `Collected` lists `Ir Dr Dw I1mr D1mr D1mw …`: the same difference gives
//! the L1 instruction and data misses per request (docs/benchmarks.md has
//! the loop), that is, how much code and memory a request touches.
//!
//! Under plain `cargo bench` (no row named) it does nothing. In quick mode
//! (`cargo bench --bench instructions -- --test`, or `cargo test --bench
//! instructions`: no `--bench` argument, as criterion decides) it runs every
//! row natively, a few requests each, and fails if any request does.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use axum::Router;
use axum::body::Body;
use http::{HeaderValue, Request, StatusCode};
use support::*;
use tower::{Service, ServiceExt};

const ROWS: &[&str] = &[
    "bare",
    "noop",
    "tierlimit",
    "tower_governor",
    "tower_rate_tier",
    "tierlimit_no_headers",
    "tower_governor_no_headers",
    "tierlimit_guests",
    "tierlimit_guests_no_headers",
    "tierlimit_two_limits",
    "tierlimit_tokens",
    "tierlimit_concurrency",
];

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<String> = all
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    if let [row, n] = args.as_slice() {
        let n: usize = n.parse().expect("N is a number");
        run(row, n);
        return;
    }
    if all.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let quick = all.iter().any(|a| a == "--test") || !all.iter().any(|a| a == "--bench");
    if quick {
        for row in ROWS {
            run(row, 3);
            println!("instructions {row}: ok");
        }
        return;
    }
    eprintln!("usage: instructions ROW N (rows: {})", ROWS.join(" "));
}

/// Builds the row's router and sends it `n` requests, each answered 200.
fn run(row: &str, n: usize) {
    let one = keys(1);
    let mut svc: Router = match row {
        "bare" => bare(),
        "noop" => bare().layer(tower::util::MapResponseLayer::new(
            |r: axum::response::Response| r,
        )),
        "tierlimit" => tierlimit(&one),
        "tower_governor" => tower_governor(),
        "tower_rate_tier" => tower_rate_tier(&one),
        "tierlimit_no_headers" => tierlimit_no_headers(&one),
        "tierlimit_two_limits" => tierlimit_two_limits(&one),
        "tierlimit_tokens" => tierlimit_tokens(&one),
        "tierlimit_concurrency" => tierlimit_concurrency(&one),
        "tower_governor_no_headers" => tower_governor_no_headers(),
        "tierlimit_guests" => tierlimit_guests(),
        "tierlimit_guests_no_headers" => tierlimit_guests_no_headers(),
        other => panic!("unknown row {other}"),
    };
    let key: HeaderValue = one[0].parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for _ in 0..n {
        let req = request(&key);
        let res = rt.block_on(async {
            ServiceExt::<Request<Body>>::ready(&mut svc).await.unwrap();
            svc.call(req).await.unwrap()
        });
        assert_eq!(res.status(), StatusCode::OK, "{row}");
        std::hint::black_box(res);
    }
}
