//! `tierlimit rls` run as a process on a policy published as Kubernetes
//! publishes a ConfigMap (`..data` swapped to a new directory): a valid
//! new policy applies to the next checks, an invalid one is logged (plain
//! text, as a container's logs are collected) and the policy in force stays.
#![cfg(feature = "envoy")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::envoy::{OK, ask1, client, spawn_rls};

fn policy(read: u32) -> String {
    format!(
        "categories = [\"read\", \"write\"]\n\
         [tiers.free]\nread = \"{read}/hour\"\nwrite = \"10/hour\"\n\
         [keys]\n\"free-key\" = \"free\"\n"
    )
}

/// Publishes `text` in a new timestamped directory and swaps `..data` to
/// it, as the kubelet does.
fn publish(dir: &Path, stamp: &str, text: &str) {
    let version = dir.join(stamp);
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("policy.toml"), text).unwrap();
    std::os::unix::fs::symlink(stamp, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

/// The limit a check of free reads is answered under.
async fn limit(
    c: &mut envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
) -> u32 {
    let r = ask1(c, &[("api_key", "free-key"), ("category", "read")]).await;
    assert_eq!(r.overall_code, OK);
    r.statuses[0]
        .current_limit
        .clone()
        .unwrap()
        .requests_per_unit
}

#[tokio::test]
async fn a_configmap_swap_reaches_a_running_rls_and_a_bad_one_is_logged() {
    let tmp = common::TempDir::new("envoy-reload");
    let dir = tmp.join(".");
    publish(&dir, "..v1", &policy(10));
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    let log = dir.join("rls.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tierlimit"));
    command
        .args(["rls", "--policy", dir.join("policy.toml").to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("ADMIN_TOKEN")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let (_rls, addr) = tokio::task::spawn_blocking(move || spawn_rls(command))
        .await
        .unwrap();
    let mut c = client(addr).await;
    assert_eq!(limit(&mut c).await, 10);
    publish(&dir, "..v2", &policy(20));
    // The watcher's event arrives when it does: ask until it has (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while limit(&mut c).await != 20 {
        assert!(Instant::now() < deadline, "the new policy never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&dir, "..v3", "categories = [\"read\"\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("policy file invalid") {
            break text;
        }
        assert!(Instant::now() < deadline, "nothing logged:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(limit(&mut c).await, 20, "the policy in force stays");
    // Logs collected from a pipe or a file (a container's) are plain text:
    // no terminal colour codes.
    let line = text.lines().find(|l| l.contains("policy file invalid"));
    assert!(line.is_some_and(|l| l.contains("ERROR")), "{line:?}");
    assert!(!text.contains('\x1b'), "colour codes in {text:?}");
}
