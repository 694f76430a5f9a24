#![allow(missing_docs)]
//! The servers `benches/wrk.sh` drives: the benches' bare router, the
//! same router under a no-op layer (any layer's floor), tower_governor and
//! tierlimit (same routes, same quota, key from `X-API-Key`, headers on),
//! each on its own loopback port, on one current-thread runtime (wrk gets
//! the other core).
//!
//! `wrk_server serve` prints `bare=PORT noop_layer=PORT tower_governor=PORT
//! tierlimit=PORT` and serves until killed; under plain `cargo bench` it
//! does nothing.

#[path = "support/mod.rs"]
mod support;

use support::*;

fn main() {
    if std::env::args().nth(1).as_deref() != Some("serve") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let apps = [
            ("bare", bare()),
            ("noop_layer", noop_layer()),
            ("tower_governor", tower_governor()),
            ("tierlimit", tierlimit(&keys(1))),
        ];
        let mut line = Vec::new();
        let mut servers = Vec::new();
        for (name, app) in apps {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            line.push(format!("{name}={}", listener.local_addr().unwrap().port()));
            servers.push(tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            }));
        }
        println!("{}", line.join(" "));
        for s in servers {
            s.await.unwrap();
        }
    });
}
