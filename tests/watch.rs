//! The policy file watcher (`PolicyHandle::watch`) through real files: a
//! broken file is reported once, a file at rest is not read, and the ways
//! deployments replace a file (in place, an atomic rename, a symlink
//! retargeted, a Kubernetes ConfigMap's `..data` swap, removed and written
//! again) are all followed.
//!
//! No test waits for time to pass: each waits, bounded, for a counter of a
//! watcher to move.
#![cfg(all(feature = "watch", unix))]

mod common;

use common::{TempDir, logs};

use std::path::Path;
use std::time::{Duration, Instant};

use tierlimit::{Policy, PolicyHandle, RateLimitLayer, watch::PolicyWatcher};

/// A policy whose free tier may read `read` times an hour.
fn policy(read: u32) -> String {
    format!(
        "categories = [\"read\", \"write\"]\n\n[tiers.free]\nread = \"{read}/hour\"\nwrite = \"5/hour\"\n\n[keys]\n\"k\" = \"free\"\n"
    )
}

/// A policy with an error on line 5 (`tiers.free.read`).
const BROKEN: &str = "categories = [\"read\", \"write\"]\n\n[tiers.free]\n\
                      write = \"5/hour\"\nread = \"7/fortnight\"\n\n[keys]\n\"k\" = \"free\"\n";

/// A directory of its own under the system's temporary directory; removed
/// when dropped.
/// A layer on the policy at `path` (read now), and its handle.
fn layer_on(path: &Path) -> PolicyHandle {
    let layer = RateLimitLayer::new(Policy::from_toml_file(path).unwrap());
    layer.policy_handle()
}

/// The free tier's read limit in force.
fn free_reads(handle: &PolicyHandle) -> u32 {
    let policy = handle.current();
    let (tier, category) = (
        policy.tier("free").unwrap(),
        policy.category("read").unwrap(),
    );
    policy.limits(tier, category).per_key()[0].max()
}

/// Waits, up to 10 s, until `count` reaches `at_least`; returns its value.
fn wait_for(what: &str, at_least: u64, count: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = count();
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n}, not {at_least}, after 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_reloads(w: &PolicyWatcher, at_least: u64) -> u64 {
    wait_for("reloads", at_least, || w.reloads())
}

fn wait_errors(w: &PolicyWatcher, at_least: u64) -> u64 {
    wait_for("errors", at_least, || w.errors())
}

fn wait_reads(w: &PolicyWatcher, at_least: u64) -> u64 {
    wait_for("reads", at_least, || w.reads())
}

/// Replaces `path` the way deployment tools do: a whole new file renamed
/// over it.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Points the symlink `link` at `target` atomically (`ln -sfn`): a new
/// link renamed over the old one.
fn retarget(link: &Path, target: &Path) {
    let tmp = link.with_extension("link-tmp");
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Log lines that report `path` invalid.
fn invalid_logged(path: &Path) -> usize {
    let path = path.display().to_string();
    logs::text()
        .lines()
        .filter(|l| l.contains("policy file invalid") && l.contains(&path))
        .count()
}

#[test]
fn a_broken_file_is_reported_once_until_its_content_changes() {
    logs::capture();
    let dir = TempDir::new("broken");
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy(10)).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();

    std::fs::write(&path, BROKEN).unwrap();
    assert_eq!(wait_errors(&watcher, 1), 1);
    let e = watcher.last_error().unwrap();
    assert!(e.contains("tiers.free.read") && e.contains("line"), "{e}");
    // Saved again unchanged (an editor's `:w`): read, and not reported
    // again.
    let reads = watcher.reads();
    std::fs::write(&path, BROKEN).unwrap();
    wait_reads(&watcher, reads + 1);
    // A valid file then: the policy in force changes, and nothing else
    // was reported in between.
    std::fs::write(&path, policy(20)).unwrap();
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    assert_eq!(watcher.errors(), 1, "the broken file was reported once");
    assert_eq!(invalid_logged(&path), 1, "and logged once");
}

#[test]
fn a_file_at_rest_is_not_read_again() {
    let dir = TempDir::new("rest");
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy(10)).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();
    // A second watcher on a file in the same directory: its changes, each
    // waited for, let the first watcher's own reads of a broken file come
    // back to it if they ever do.
    let other_path = dir.join("other.toml");
    std::fs::write(&other_path, policy(1)).unwrap();
    let other = layer_on(&other_path);
    let other_watcher = other.watch(&other_path).unwrap();

    std::fs::write(&path, BROKEN).unwrap();
    wait_errors(&watcher, 1);
    for n in 1..=5 {
        // Read by someone else too (a sidecar, `cat`): not a change.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), BROKEN);
        std::fs::write(&other_path, policy(n as u32 + 1)).unwrap();
        wait_reloads(&other_watcher, n);
    }
    assert_eq!(free_reads(&other), 6);
    assert_eq!(watcher.errors(), 1, "the broken file was reported once");
    assert!(watcher.reads() <= 2, "read {} times", watcher.reads());

    std::fs::write(&path, policy(20)).unwrap();
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    assert_eq!(watcher.errors(), 1);
    assert!(watcher.reads() <= 3, "read {} times", watcher.reads());
    assert!(other_watcher.reads() <= 6, "{}", other_watcher.reads());
    assert_eq!(other_watcher.errors(), 0);
}

#[test]
fn a_configmap_data_swap_is_followed() {
    let dir = TempDir::new("configmap");
    // The kubelet's layout: `..data` -> a timestamped directory, and the
    // file a symlink through `..data`.
    let publish = |stamp: &str, read: u32| {
        let version = dir.join(stamp);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("policy.toml"), policy(read)).unwrap();
        version
    };
    let first = publish("..2026_12_04_10_00_00.000000001", 10);
    std::os::unix::fs::symlink("..2026_12_04_10_00_00.000000001", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    let path = dir.join("policy.toml");
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();
    assert_eq!(free_reads(&handle), 10);

    // An update: a new directory, `..data_tmp` -> it renamed over
    // `..data`, the old directory removed.
    let update = |stamp: &str, read: u32, old: &Path| {
        let version = publish(stamp, read);
        std::os::unix::fs::symlink(stamp, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(old).unwrap();
        version
    };
    let second = update("..2026_12_04_10_05_00.000000002", 20, &first);
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    // And the next one: the watcher follows past the removed directory.
    update("..2026_12_04_10_10_00.000000003", 30, &second);
    assert_eq!(wait_reloads(&watcher, 2), 2);
    assert_eq!(free_reads(&handle), 30);
    assert_eq!(watcher.errors(), 0);
}

#[test]
fn an_atomic_rename_over_the_file_is_followed() {
    let dir = TempDir::new("rename");
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy(10)).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();

    write_atomically(&path, &policy(20));
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    write_atomically(&path, &policy(30));
    assert_eq!(wait_reloads(&watcher, 2), 2);
    assert_eq!(free_reads(&handle), 30);
    assert_eq!(watcher.errors(), 0);
}

#[test]
fn a_retargeted_symlink_and_its_new_target_are_followed() {
    let dir = TempDir::new("symlink");
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    std::fs::write(&a, policy(10)).unwrap();
    std::fs::write(&b, policy(20)).unwrap();
    let path = dir.join("policy.toml");
    std::os::unix::fs::symlink("a.toml", &path).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();

    retarget(&path, Path::new("b.toml"));
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    // The new target edited in place: followed too.
    std::fs::write(&b, policy(30)).unwrap();
    assert_eq!(wait_reloads(&watcher, 2), 2);
    assert_eq!(free_reads(&handle), 30);
    assert_eq!(watcher.errors(), 0);
}

#[test]
fn a_symlink_into_another_directory_is_followed() {
    let (dir, elsewhere) = (TempDir::new("link-dir"), TempDir::new("target-dir"));
    let target = elsewhere.join("policy.toml");
    std::fs::write(&target, policy(10)).unwrap();
    let path = dir.join("policy.toml");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();

    // Replaced in its own directory, by a rename, as editors do.
    write_atomically(&target, &policy(20));
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    std::fs::write(&target, policy(30)).unwrap();
    assert_eq!(wait_reloads(&watcher, 2), 2);
    assert_eq!(free_reads(&handle), 30);
}

#[test]
fn a_removed_then_recreated_file_is_followed() {
    let dir = TempDir::new("recreate");
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy(10)).unwrap();
    let handle = layer_on(&path);
    let watcher = handle.watch(&path).unwrap();

    std::fs::remove_file(&path).unwrap();
    // The removal is seen (the file read, and found missing): the policy
    // in force stays.
    wait_reads(&watcher, 1);
    assert_eq!(free_reads(&handle), 10);
    std::fs::write(&path, policy(20)).unwrap();
    assert_eq!(wait_reloads(&watcher, 1), 1);
    assert_eq!(free_reads(&handle), 20);
    assert_eq!(watcher.errors(), 0);
}
