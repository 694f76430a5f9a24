//! A client that honours the server's rate-limit hints.
//!
//! ```sh
//! cargo run --example axum_tiers &                          # the demo server
//! cargo run --features client --example client_backoff
//! ```
//!
//! Sends `$REQUESTS` (default 103) reads with the free key to `$URL`
//! (default `http://127.0.0.1:3000/v1/account`) through
//! `tierlimit::client::RetryLayer`, printing each response's remaining
//! quota and each wait it honoured. The free tier allows 100 reads at once,
//! then one every 36 s: the 101st waits for the server's `Retry-After`.
//! Waits above `$MAX_WAIT` seconds (default 40) are not slept on.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tierlimit::client::RetryLayer;
use tower::{Layer, Service, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("URL").unwrap_or_else(|_| "http://127.0.0.1:3000/v1/account".into());
    let requests: u32 = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(103);
    let max_wait: u64 = std::env::var("MAX_WAIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);

    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut client = RetryLayer::new()
        .max_wait(Duration::from_secs(max_wait))
        .layer(http);

    for i in 1..=requests {
        let req = http::Request::get(url.as_str())
            .header("x-api-key", "free-demo-key")
            .body(Full::new(Bytes::new()))?;
        let started = Instant::now();
        let res = client.ready().await?.call(req).await?;
        let waited = started.elapsed();
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        print!(
            "#{i:>3} {} remaining {}/{}",
            res.status().as_u16(),
            header("x-ratelimit-remaining"),
            header("x-ratelimit-limit"),
        );
        if waited > Duration::from_millis(500) {
            print!("  (honoured a wait of {:.1} s)", waited.as_secs_f64());
        }
        if res.status() == 429 {
            print!(
                "  (gave up: the server asks for {} s, above the {max_wait} s bound)",
                header("retry-after")
            );
        }
        println!();
    }
    Ok(())
}
