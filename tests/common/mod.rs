//! Shared fixtures: the spec's policy, a real server on 127.0.0.1:0, and the
//! GCRA conformance table every backend must pass.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
#[cfg(feature = "envoy")]
pub mod envoy;
pub mod feed;
pub mod one;
#[cfg(feature = "redis")]
pub mod redis;
pub mod secret;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tierlimit::Policy;
use tokio::task::JoinHandle;

/// The demo's policy file: the spec's table.
pub fn spec_policy() -> Policy {
    Policy::from_toml_file(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
        .expect("examples/policy.toml is valid")
}

/// A running server; aborted when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// A server running as `task` on `addr`.
    pub fn new(addr: SocketAddr, task: JoinHandle<()>) -> Self {
        Server { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on 127.0.0.1:0 with peer addresses (axum `ConnectInfo`).
pub async fn serve(app: Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server { addr, task }
}

/// A memory backend on a fake clock that stands still (tests that count
/// exactly must not see buckets refill).
pub fn fake_memory() -> tierlimit::MemoryBackend<governor::clock::FakeRelativeClock> {
    tierlimit::MemoryBackend::builder()
        .clock(governor::clock::FakeRelativeClock::default())
        .build()
}

/// Serves gRPC `routes` behind `layer` with tonic on 127.0.0.1:0.
pub async fn serve_grpc<B: tierlimit::backend::Backend>(
    layer: tierlimit::RateLimitLayer<tierlimit::ApiKey, B>,
    routes: tonic::service::Routes,
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(routes)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    Server { addr, task }
}

/// A gRPC channel to `addr` that gives up rather than hang a test.
pub async fn grpc_channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

/// A health check (`grpc.health.v1.Health/Check`, of the whole server)
/// sent as the API key `key`.
pub fn health_check(key: &str) -> tonic::Request<tonic_health::pb::HealthCheckRequest> {
    let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    req
}

/// An HTTP client that gives up rather than hang a test.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// `GET /v1/account` on `s` as `key`: the status.
pub async fn status(s: &Server, key: &str) -> u16 {
    let url = s.url("/v1/account");
    call(&client(), "GET", &url, key).await.status().as_u16()
}

/// One request with an API key.
pub async fn call(c: &reqwest::Client, method: &str, url: &str, key: &str) -> reqwest::Response {
    c.request(method.parse().unwrap(), url)
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
}

/// A response header's number (`X-RateLimit-*`, `Retry-After`), if it has one.
pub fn header(res: &reqwest::Response, name: &str) -> Option<u64> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A policy with every form of issue 12: lists of limits, the table
/// form, a pooled tier, per-account limits, keys with accounts.
pub const MULTI_POLICY: &str = r#"
categories = ["read", "write", "ai", "training"]

[tiers.free]
read = ["2/second", "8/hour"]                 # a burst guard and a budget
write = "20/hour"
ai = { requests = ["2/minute", "5/hour"] }    # the table form
training = "5/day"

[tiers.pro]
pool = "account"                              # shared by an account's keys
read = "100/hour"
write = "6/hour"
ai = "50/hour"
training = "unlimited"

[tiers.team]
read = "100/hour"
write = "3/hour"                              # each key
ai = "50/hour"
training = "unlimited"

[tiers.team.per_account]
write = "5/hour"                              # all of an account's keys

[[routes]]
path = "/v1/rate_limit"
exempt = true

[[routes]]
method = "POST"
path = "/v1/training/jobs"
category = "training"

[[routes]]
path = "/v1/ai/*"
category = "ai"

[keys]
"free-demo-key" = "free"
"acme-key-1" = { tier = "pro", account = "acme" }
"acme-key-2" = { tier = "pro", account = "acme" }
"globex-key" = { tier = "pro", account = "globex" }
"team-a" = { tier = "team", account = "initech" }
"team-b" = { tier = "team", account = "initech" }
"team-solo" = "team"
"#;

/// The late-answer tests' policy: key `late-key`, at most 2 reads at once.
pub const LATE_POLICY: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = { requests = "1000/hour", concurrency = 2 }
write = "1000/hour"

[keys]
"late-key" = "free"
"#;

/// `GET /v1/data` limited by [`LATE_POLICY`] on `backend`, served on 127.0.0.1:0.
#[cfg(feature = "redis")]
pub async fn serve_late_key(backend: tierlimit::RedisBackend) -> Server {
    let layer = tierlimit::RateLimitLayer::builder(Policy::from_toml_str(LATE_POLICY).unwrap())
        .backend(backend)
        .build();
    let app = Router::new()
        .route("/v1/data", axum::routing::get(|| async { "data" }))
        .layer(layer);
    serve(app).await
}

/// `GET /v1/data` as `late-key`: status, `X-Concurrency-Remaining`,
/// `X-RateLimit-Remaining`.
pub async fn read_late_key(s: &Server) -> (u16, Option<u32>, Option<u32>) {
    let res = client()
        .get(s.url("/v1/data"))
        .header("x-api-key", "late-key")
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().parse().unwrap())
    };
    let left = header("x-concurrency-remaining");
    (res.status().as_u16(), left, header("x-ratelimit-remaining"))
}

/// A fresh directory under the system's temporary one, removed on drop:
/// `tierlimit-{name}-{pid}-{n}`.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tierlimit-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The admin API's boosts, as a client calls them.
pub mod boosts {
    use serde_json::{Value, json};

    /// `POST …/admin/v1/boosts` as `token` with an `Idempotency-Key`: pro's
    /// read adjusted by `adjust`, from `now - 1` for an hour. The status
    /// and the body.
    pub async fn post(
        s: &super::Server,
        token: &str,
        idempotency: &str,
        adjust: &str,
        now: u64,
    ) -> (u16, Value) {
        let res = super::client()
            .post(s.url("/admin/v1/boosts"))
            .bearer_auth(token)
            .header("idempotency-key", idempotency)
            .json(
                &json!({ "tier": "pro", "category": "read", "adjust": adjust,
                           "start": now - 1, "end": now + 3600 }),
            )
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// The boosts an instance lists to `token`.
    pub async fn list(s: &super::Server, token: &str) -> Vec<Value> {
        let res = super::client()
            .get(s.url("/admin/v1/boosts"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let v: Value = res.json().await.unwrap();
        v["boosts"].as_array().unwrap().clone()
    }
}

/// Log lines of a test binary, captured through `tracing` (INFO and up).
pub mod logs {
    static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

    struct LogWriter;

    impl std::io::Write for LogWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LOGS.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Installs the capture (once per binary).
    pub fn capture() {
        let _ = tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .try_init();
    }

    /// Everything logged so far.
    pub fn text() -> String {
        String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
    }
}
