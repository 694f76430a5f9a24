//! `ShouldRateLimit` calls per second, next to the same checks through the
//! HTTP layer: in process (the engine alone: `RateLimitServer::check` and
//! the layer called as a tower service), then over loopback with 64 calls
//! in flight (tonic over 8 HTTP/2 connections, as Envoy's workers open
//! them; axum behind hyper over HTTP/1.1 keep-alive), each on the memory
//! backend and on a real Redis.
//!
//! ```sh
//! cargo bench --all-features --bench envoy
//! ROUNDS=5 CALLS=20000 cargo bench --all-features --bench envoy
//! cargo bench --all-features --bench envoy -- --test   # every row once, quickly
//! ```
//!
//! Every check is allowed (limits too large to refuse), keys rotate over
//! 1,000. Rounds are interleaved (each round runs every row once) and the
//! median is printed. Without `redis-server` the Redis rows are skipped
//! with a message, unless `TIERLIMIT_REQUIRE_REDIS=1` (CI). Quick mode
//! (`--test`, or no `--bench` argument) checks that every row runs and
//! measures nothing.
#![allow(missing_docs)]

#[path = "../tests/common/secret.rs"]
#[allow(dead_code, unreachable_pub)]
mod secret;

#[path = "../tests/common/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod fixture;

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use http::Request;
use tierlimit::backend::Backend;
use tierlimit::envoy::RateLimitServer;
use tierlimit::{Policy, RateLimitLayer};
use tower::ServiceExt;

const IN_FLIGHT: usize = 64;
/// HTTP/2 connections to the rate limit service (Envoy opens one per worker).
const CONNECTIONS: usize = 8;
const KEYS: usize = 1_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn keys() -> Vec<String> {
    (0..KEYS)
        .map(|i| format!("key-{i:08}-abcdefghijklmnop"))
        .collect()
}

/// One tier, limits too large to refuse, every key listed.
fn policy(keys: &[String]) -> Policy {
    let mut toml = String::from(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"1000000000/hour\"\nwrite = \"1000000000/hour\"\n[keys]\n",
    );
    for k in keys {
        toml.push_str(&format!("\"{k}\" = \"free\"\n"));
    }
    Policy::from_toml_str(&toml).unwrap()
}

fn rls_request(key: &str) -> RateLimitRequest {
    let entry = |k: &str, v: &str| Entry {
        key: k.into(),
        value: v.into(),
    };
    RateLimitRequest {
        domain: "api".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                entry("api_key", key),
                entry("method", "GET"),
                entry("path", "/v1/account"),
            ],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    }
}

fn http_request(key: &str) -> Request<Body> {
    Request::get("/v1/account")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap()
}

/// What a row drives: calls `n` times (keys rotating), returns the time.
type Row = Box<dyn Fn(&tokio::runtime::Runtime, usize) -> Duration>;

/// The rows of one backend: in process and over loopback, both fronts.
fn rows<B: Backend + Clone>(
    rt: &tokio::runtime::Runtime,
    backend: B,
    name: &str,
) -> Vec<(String, Row)> {
    let keys: Arc<[String]> = keys().into();
    let layer = RateLimitLayer::builder(policy(&keys))
        .backend(backend)
        .build();
    let rls = RateLimitServer::new(&layer);
    let router = Router::new()
        .route("/v1/account", get(|| async { "{}" }))
        .layer(layer);
    let (grpc, http) = rt.block_on(async {
        (
            serve_rls(rls.clone()).await,
            serve_http(router.clone()).await,
        )
    });
    let mut rows: Vec<(String, Row)> = Vec::new();
    let k = Arc::clone(&keys);
    rows.push((
        format!("in process, RateLimitServer::check, {name}"),
        Box::new(move |rt, n| {
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..n {
                    black_box(rls.check(rls_request(&k[i % KEYS])).await);
                }
            });
            start.elapsed()
        }),
    ));
    let k = Arc::clone(&keys);
    rows.push((
        format!("in process, the HTTP layer, {name}"),
        Box::new(move |rt, n| {
            let start = Instant::now();
            rt.block_on(async {
                for i in 0..n {
                    black_box(
                        router
                            .clone()
                            .oneshot(http_request(&k[i % KEYS]))
                            .await
                            .unwrap(),
                    );
                }
            });
            start.elapsed()
        }),
    ));
    let k = Arc::clone(&keys);
    rows.push((
        format!("loopback, ShouldRateLimit via tonic (8 HTTP/2 conns), {name}"),
        Box::new(move |rt, n| {
            // As Envoy does (a connection per worker): several HTTP/2
            // connections, the calls spread over them.
            let clients: Vec<_> = rt.block_on(async {
                let mut v = Vec::new();
                for _ in 0..CONNECTIONS {
                    let c = RateLimitServiceClient::connect(format!("http://{grpc}"));
                    v.push(c.await.unwrap());
                }
                v
            });
            in_flight(rt, n, |i| {
                let mut c = clients[i % CONNECTIONS].clone();
                let req = rls_request(&k[i % KEYS]);
                async move {
                    black_box(c.should_rate_limit(req).await.unwrap());
                }
            })
        }),
    ));
    let k = Arc::clone(&keys);
    rows.push((
        format!("loopback, the HTTP layer (64 HTTP/1.1 conns), {name}"),
        Box::new(move |rt, n| {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(IN_FLIGHT)
                    .build_http::<Body>();
            in_flight(rt, n, |i| {
                let c = client.clone();
                let mut req = http_request(&k[i % KEYS]);
                *req.uri_mut() = format!("http://{http}/v1/account").parse().unwrap();
                async move {
                    let res = c.request(req).await.unwrap();
                    assert!(res.status().is_success());
                    black_box(res);
                }
            })
        }),
    ));
    rows
}

/// Runs `n` calls made by `call`, `IN_FLIGHT` at a time; the time taken.
fn in_flight<F>(rt: &tokio::runtime::Runtime, n: usize, call: impl Fn(usize) -> F) -> Duration
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            if set.len() >= IN_FLIGHT {
                set.join_next().await.unwrap().unwrap();
            }
            set.spawn(call(i));
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
    start.elapsed()
}

async fn serve_rls<B: Backend>(rls: RateLimitServer<B>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(rls.into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

async fn serve_http(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let quick = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    let (rounds, calls) = if quick {
        println!("quick mode: every row once, nothing measured");
        (1, 64)
    } else {
        (env("ROUNDS", 5), env("CALLS", 20_000))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The key secret before any key is hashed (the policies' keys too).
    let redis = fixture::available().then(|| {
        fixture::init_secret();
        fixture::RedisServer::start()
    });
    let mut all = rows(&rt, tierlimit::MemoryBackend::new(), "memory");
    if let Some(server) = &redis {
        let backend = rt.block_on(async {
            tierlimit::RedisBackend::builder(server.url())
                .timeout(Duration::from_secs(2))
                .connect()
                .await
                .unwrap()
        });
        all.extend(rows(&rt, backend, "Redis"));
    }
    let mut times = vec![Vec::new(); all.len()];
    for round in 0..rounds {
        for j in 0..all.len() {
            let i = (j + round) % all.len();
            let (_, row) = &all[i];
            times[i].push(row(&rt, calls).as_secs_f64() / calls as f64);
        }
    }
    println!("{:<64} {:>12}", "row (median of rounds)", "calls/s");
    for ((name, _), mut t) in all.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        let per = t[t.len() / 2];
        println!("{name:<64} {:>12.0}", 1.0 / per);
    }
}
