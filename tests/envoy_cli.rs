//! `tierlimit rls` (feature `envoy`), run as a process: it listens where
//! it says, answers `ShouldRateLimit`, serves the health service and the
//! admin API on the same port, and refuses bad options and bad policies
//! in words.
#![cfg(feature = "envoy")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::envoy::{OK, RlsProcess, ask1, client, spawn_rls};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml");

/// An admin API request for a boost doubling pro's reads for an hour.
async fn boost_pro_reads(addr: std::net::SocketAddr) -> reqwest::Response {
    let now = common::unix_now();
    common::client()
        .post(format!("http://{addr}/admin/v1/boosts"))
        .bearer_auth("admin-secret")
        .json(
            &serde_json::json!({ "tier": "pro", "category": "read", "adjust": "x2",
                                    "start": now - 1, "end": now + 3600 }),
        )
        .send()
        .await
        .unwrap()
}

/// Starts `tierlimit rls` on 127.0.0.1:0 and reads where it listens.
fn start(policy: &str, admin_token: &str) -> (RlsProcess, std::net::SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tierlimit"));
    command
        .args(["rls", "--policy", policy, "--listen", "127.0.0.1:0"])
        .env("ADMIN_TOKEN", admin_token)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    spawn_rls(command)
}

#[tokio::test]
async fn rls_answers_checks_health_and_the_admin_api_on_one_port() {
    let (_rls, addr) = tokio::task::spawn_blocking(|| start(DEMO, "admin-secret"))
        .await
        .unwrap();
    let mut c = client(addr).await;
    let read = [("api_key", "pro-demo-key"), ("category", "read")];
    let r = ask1(&mut c, &read).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 999);
    // The health service reports the rate limit service.
    let channel = common::grpc_channel(addr).await;
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    // The admin API, over HTTP/1.1 on the same port: a boost for pro's
    // reads doubles them for the next check.
    let res = boost_pro_reads(addr).await;
    assert!(res.status().is_success(), "{}", res.status());
    let r = ask1(&mut c, &read).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(limit.requests_per_unit, 2000);
    let res = common::client()
        .get(format!("http://{addr}/admin/v1/boosts"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "no token, no admin API");
    // The engine's metrics, as Prometheus text, on the same port.
    let text = common::client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let allowed = text
        .lines()
        .find(|l| {
            l.starts_with("tierlimit_requests_total{")
                && l.contains("tier=\"pro\"")
                && l.contains("category=\"read\"")
                && l.contains("outcome=\"allowed\"")
        })
        .unwrap_or_else(|| panic!("no allowed pro reads counted in:\n{text}"));
    assert!(allowed.ends_with(" 2"), "{allowed}");
}

fn fails(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tierlimit"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_options_and_bad_policies_are_refused_in_words() {
    let (code, err) = fails(&["rls", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--policy is required"), "{err}");
    let (code, err) = fails(&["rls", "--policy", DEMO, "--listen", "nowhere"]);
    assert_eq!(code, 2);
    assert!(err.contains("--listen is not an address"), "{err}");
    let (code, err) = fails(&[
        "rls",
        "--policy",
        DEMO,
        "--listen",
        "127.0.0.1:0",
        "--bogus",
        "1",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown option `--bogus`"), "{err}");
    let dir = common::TempDir::new("envoy-cli");
    let bad = dir.join("policy.toml");
    let text = std::fs::read_to_string(DEMO).unwrap() + "\n[envoy]\ncategories = [\"reed\"]\n";
    std::fs::write(&bad, text).unwrap();
    let (code, err) = fails(&[
        "rls",
        "--policy",
        bad.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("envoy.categories") && err.contains("reed"),
        "{err}"
    );
}

#[tokio::test]
async fn an_over_limit_answer_is_sent_at_once() {
    // Envoy waits for the answer (50 ms in the example configuration): an
    // answer held back by Nagle's algorithm until the client's delayed ACK
    // (40 ms on Linux) would come close to that timeout on every refusal.
    let (_rls, addr) = tokio::task::spawn_blocking(|| start(DEMO, ""))
        .await
        .unwrap();
    let mut c = client(addr).await;
    let training = [("api_key", "free-demo-key"), ("category", "training")];
    for _ in 0..5 {
        assert_eq!(ask1(&mut c, &training).await.overall_code, OK);
    }
    let mut took = Vec::new();
    for _ in 0..9 {
        let started = std::time::Instant::now();
        let r = ask1(&mut c, &training).await;
        took.push(started.elapsed());
        assert_eq!(r.overall_code, common::envoy::OVER);
        assert!(!r.raw_body.is_empty());
    }
    // Held back, every refusal would take about 40 ms: the fastest of nine
    // tells, whatever the load on the machine slows down.
    took.sort();
    assert!(
        took[0] < Duration::from_millis(25),
        "the fastest refusal took {:?} ({took:?})",
        took[0]
    );
}

#[tokio::test]
async fn without_admin_token_the_admin_api_is_not_found() {
    // An operator's write to an admin API this instance does not serve must
    // not look like it took effect.
    let (_rls, addr) = tokio::task::spawn_blocking(|| start(DEMO, ""))
        .await
        .unwrap();
    let res = boost_pro_reads(addr).await;
    assert_eq!(res.status(), 404);
    let res = common::client()
        .get(format!("http://{addr}/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    // gRPC callers of a service not served still hear UNIMPLEMENTED.
    let channel = common::grpc_channel(addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, (), _>(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/no.Such/Method"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn sigterm_stops_rls_cleanly() {
    // Kubernetes stops a pod with SIGTERM: the command stops accepting,
    // answers what is in flight, and exits with status 0.
    let (mut rls, addr) = tokio::task::spawn_blocking(|| start(DEMO, ""))
        .await
        .unwrap();
    let mut c = client(addr).await;
    let read = [("api_key", "pro-demo-key"), ("category", "read")];
    assert_eq!(ask1(&mut c, &read).await.overall_code, OK);
    let pid = rls.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = rls.0.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "still running");
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
}
