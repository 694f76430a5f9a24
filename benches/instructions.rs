//! Instruction counts per request, which (unlike wall time on a shared
//! machine) repeat exactly. Runs N requests through one router row; run it
//! under callgrind at two N and divide the difference:
//!
//! ```sh
//! cargo bench --bench instructions --no-run
//! B=$(ls -t target/release/deps/instructions-* | grep -v '\.d$' | head -1)
//! for row in bare noop tierlimit tower_governor tower_rate_tier tierlimit_no_headers tower_governor_no_headers tierlimit_two_limits tierlimit_tokens tierlimit_concurrency; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $row 1000 2>&1 | grep -oP 'Collected : \K\d+')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $row 11000 2>&1 | grep -oP 'Collected : \K\d+')
//!   echo "$row $(( (b - a) / 10000 )) instructions per request"
//! done
//! ```
//!
//! Under plain `cargo bench` (no row named) it does nothing.
#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use axum::Router;
use axum::body::Body;
use http::{HeaderValue, Request, StatusCode};
use support::*;
use tower::{Service, ServiceExt};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [row, n] = args.as_slice() else {
        eprintln!(
            "usage: instructions ROW N (rows: bare noop tierlimit tower_governor tower_rate_tier tierlimit_no_headers tower_governor_no_headers tierlimit_two_limits tierlimit_tokens tierlimit_concurrency)"
        );
        return;
    };
    let n: usize = n.parse().expect("N is a number");
    let one = keys(1);
    let mut svc: Router = match row.as_str() {
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
        assert_eq!(res.status(), StatusCode::OK);
        std::hint::black_box(res);
    }
}
