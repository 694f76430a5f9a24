//! Envoy's rate limit service, served and asked: a real tonic server on
//! 127.0.0.1:0 and a real tonic client from the same Envoy types.

use std::net::SocketAddr;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use governor::clock::FakeRelativeClock;
use tierlimit::envoy::RateLimitServer;
use tierlimit::{ApiKey, MemoryBackend, Policy, RateLimitLayer};
use tonic::transport::Channel;

pub const OK: i32 = Code::Ok as i32;
pub const OVER: i32 = Code::OverLimit as i32;

/// `tierlimit rls` run as a process, killed when dropped.
pub struct RlsProcess(pub std::process::Child);

impl Drop for RlsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` (`tierlimit rls … --listen 127.0.0.1:0`) and reads
/// where it listens from its first line, `tierlimit rls on ADDR (…)`.
/// Blocks until the line comes: from async code, on a blocking thread.
pub fn spawn_rls(mut command: std::process::Command) -> (RlsProcess, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let rls = RlsProcess(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("tierlimit rls on ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (rls, addr)
}

/// Serves `server` on 127.0.0.1:0; aborted when dropped.
pub async fn serve<B: tierlimit::backend::Backend>(server: RateLimitServer<B>) -> super::Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    super::Server::new(addr, task)
}

pub async fn client(addr: SocketAddr) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(super::grpc_channel(addr).await)
}

pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

pub fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "api".into(),
        descriptors,
        hits_addend: 0,
    }
}

pub async fn ask(
    c: &mut RateLimitServiceClient<Channel>,
    r: RateLimitRequest,
) -> RateLimitResponse {
    c.should_rate_limit(r)
        .await
        .expect("never a gRPC error")
        .into_inner()
}

/// One descriptor: `entries`.
pub async fn ask1(
    c: &mut RateLimitServiceClient<Channel>,
    entries: &[(&str, &str)],
) -> RateLimitResponse {
    ask(c, request(vec![descriptor(entries)])).await
}

pub fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

pub fn reset_secs(r: &RateLimitResponse, i: usize) -> i64 {
    r.statuses[i].duration_until_reset.unwrap().seconds
}

/// The name of why a descriptor is over (its status's limit name).
pub fn why(r: &RateLimitResponse, i: usize) -> &str {
    &r.statuses[i].current_limit.as_ref().unwrap().name
}

/// Unix time the headers are written at (a fixed clock: exact resets).
pub const NOW: u64 = 1_700_000_000;

pub const POLICY: &str = r#"
categories = ["read", "write", "ai"]

[tiers.free]
read = "3/minute"
write = "1/minute"
ai = { requests = "10/minute", tokens = "100/minute" }

[tiers.pro]
read = "100/minute"
write = ["10/30s", "100/hour"]
ai = "unlimited"

[[routes]]
path = "/healthz"
exempt = true

[[routes]]
method = "POST"
path = "/v1/batch"
category = "read"
cost = 2

[keys]
"free-key" = "free"
"pro-key" = "pro"
"#;

pub type Layer = RateLimitLayer<ApiKey, MemoryBackend<FakeRelativeClock>>;

/// The service of `policy` on a fake clock, served on loopback, and a
/// client of it (the server stops when its handle drops).
pub async fn rls(
    policy: &str,
) -> (
    FakeRelativeClock,
    super::Server,
    RateLimitServiceClient<Channel>,
) {
    rls_with(policy, tierlimit::HeaderOptions::default()).await
}

/// [`rls`], its layer writing the header fields `headers` selects.
pub async fn rls_with(
    policy: &str,
    headers: tierlimit::HeaderOptions,
) -> (
    FakeRelativeClock,
    super::Server,
    RateLimitServiceClient<Channel>,
) {
    let clock = FakeRelativeClock::default();
    let s = serve(RateLimitServer::new(&layer_with(policy, &clock, headers))).await;
    let c = client(s.addr).await;
    (clock, s, c)
}

pub fn layer(policy: &str, clock: &FakeRelativeClock) -> Layer {
    layer_with(policy, clock, tierlimit::HeaderOptions::default())
}

/// [`layer`], writing the header fields `headers` selects.
pub fn layer_with(
    policy: &str,
    clock: &FakeRelativeClock,
    headers: tierlimit::HeaderOptions,
) -> Layer {
    RateLimitLayer::builder(Policy::from_toml_str(policy).unwrap())
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .headers(headers)
        .unix_clock(|| NOW)
        .build()
}
