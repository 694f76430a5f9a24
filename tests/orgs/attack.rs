//! Organisations under attack: a hostile review's attacks, each a test.
//! Shared limits stay one bucket whatever a key's or account's boost
//! says; an account is in one organisation (refused at load and by the
//! admin API otherwise); an owner change starts the key's buckets afresh
//! at most once (the documented bound); names, persistence, Redis faults,
//! loader edges, reserves and costs hold.

use std::time::Duration;

use super::{ORG_POLICY, admin, app, common, secret, usage_limits, writes};
use common::{call, client, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tierlimit::{Policy, RateLimitLayer};

fn policy(src: &str) -> Policy {
    secret();
    Policy::from_toml_str(src).unwrap_or_else(|e| panic!("{e}"))
}

async fn memory_server(src: &str) -> common::Server {
    let layer = RateLimitLayer::builder(policy(src))
        .backend(common::fake_memory())
        // 2026-09-01: inside every boost window below.
        .unix_clock(|| 1_788_220_800)
        .build();
    serve(app(layer)).await
}

async fn write(s: &common::Server, key: &str) -> reqwest::Response {
    super::write(&client(), s, key).await
}

/// How many of `n` writes as `key` are admitted (any status but 200/429
/// fails the test).
async fn admitted(s: &common::Server, key: &str, n: usize) -> u32 {
    writes(&client(), s, key, n).await.0
}

// ---------------------------------------------------------------------
// 1. An organisation's limit stays shared by keys whose limits were
//    scaled (a key or account boost / multiplier): a bucket's id mixes in
//    its limit (`limit_bucket`), so a multiplier must never reach a
//    limit a wider owner shares.
// ---------------------------------------------------------------------

/// The organisation policy with acme-b-1 boosted x2 through 2026.
fn key_boosted() -> String {
    format!(
        "{ORG_POLICY}\n[[boosts]]\nkey = \"acme-b-1\"\nadjust = \"x2\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2027-01-01T00:00:00Z\"\n"
    )
}

/// A key boosted x2 (its own 3 → 6) still shares its team's 4 and its
/// organisation's 5 with every other key: a shared limit is one bucket,
/// which a key's multiplier leaves alone.
#[tokio::test]
async fn a_key_boost_leaves_its_shared_limits_shared() {
    let src = key_boosted();
    let s = memory_server(&src).await;
    let boosted = admitted(&s, "acme-b-1", 10).await;
    assert_eq!(boosted, 4, "the boosted key: its team's 4 bind");
    let others = admitted(&s, "acme-a-1", 3).await
        + admitted(&s, "acme-a-2", 3).await
        + admitted(&s, "acme-b-2", 3).await;
    assert_eq!(
        boosted + others,
        5,
        "the org's 5 (boosted key {boosted}, others {others})"
    );
}

/// An account boosted x2 (its keys 6, the team 8) still shares its
/// organisation's 5 with the other team.
#[tokio::test]
async fn an_account_boost_leaves_the_org_limit_shared() {
    let src = format!(
        "{ORG_POLICY}\n[[boosts]]\naccount = \"team-b\"\nadjust = \"x2\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2027-01-01T00:00:00Z\"\n"
    );
    let s = memory_server(&src).await;
    let team_b = admitted(&s, "acme-b-1", 10).await + admitted(&s, "acme-b-2", 10).await;
    let team_a = admitted(&s, "acme-a-1", 10).await + admitted(&s, "acme-a-2", 10).await;
    let total = team_a + team_b;
    assert_eq!(
        (total, team_b),
        (5, 5),
        "the org's 5, all team-b's (team-a {team_a})"
    );
}

/// The same with a permanent account custom limit "x2".
#[tokio::test]
async fn an_account_multiplier_leaves_the_org_limit_shared() {
    let src = format!("{ORG_POLICY}\n[account_limits.\"team-b\"]\nwrite = \"x2\"\n");
    let s = memory_server(&src).await;
    let team_b = admitted(&s, "acme-b-1", 10).await + admitted(&s, "acme-b-2", 10).await;
    let team_a = admitted(&s, "acme-a-1", 10).await + admitted(&s, "acme-a-2", 10).await;
    let total = team_a + team_b;
    assert_eq!(
        (total, team_b),
        (5, 5),
        "the org's 5, all team-b's (team-a {team_a})"
    );
}

/// An org custom limit whose whole burst a tier's priority reserve would
/// keep: accepted at load (as a key's custom limit is), and the reserve
/// is clamped at run time to leave normal requests one (`reserve_for`).
#[tokio::test]
async fn an_org_limit_below_the_priority_reserve_is_clamped() {
    let src = r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "100/hour"
priority_reserve = "50%"
[tiers.pro.per_org]
write = "10/hour"
[keys]
"k" = { tier = "pro", org = "acme" }
[org_limits."acme"]
write = "1/hour"
"#;
    let s = memory_server(src).await;
    assert_eq!(admitted(&s, "k", 2).await, 1);
}

/// The tier's priority reserve applies to its per-org limits: of the
/// org's 4, normal requests get 2, critical ones the other 2.
#[tokio::test]
async fn the_priority_reserve_applies_to_org_limits() {
    let src = r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "100/hour"
priority_reserve = "50%"
[tiers.pro.per_org]
write = "4/hour"
[keys]
"k-1" = { tier = "pro", org = "acme" }
"k-2" = { tier = "pro", account = "t", org = "acme" }
"#;
    let s = memory_server(src).await;
    let normal = admitted(&s, "k-1", 3).await + admitted(&s, "k-2", 3).await;
    let mut critical = 0;
    for key in ["k-1", "k-2", "k-1"] {
        let res = client()
            .post(s.url("/v1/write"))
            .header("x-api-key", key)
            .header("x-request-priority", "critical")
            .send()
            .await
            .unwrap();
        critical += u32::from(res.status() == StatusCode::OK);
    }
    assert_eq!((normal, critical), (2, 2));
}

// ---------------------------------------------------------------------
// 2. An account is in one organisation: its buckets live under the
//    organisation's (the check's owner), so an account split between two
//    would be counted twice. The loader and the admin API refuse a split.
// ---------------------------------------------------------------------

/// Per key 100, per account 4, per org 100: only the account limit can
/// bind. "shared" has three keys, all in org x.
const SHARED: &str = r#"
categories = ["read", "write"]

[tiers.pro]
read = "1000/hour"
write = "100/hour"

[tiers.pro.per_account]
write = "4/hour"

[tiers.pro.per_org]
write = "100/hour"

[keys]
"k-x" = { tier = "pro", account = "shared", org = "org-x" }
"k-y" = { tier = "pro", account = "shared", org = "org-x" }
"k-z" = { tier = "pro", account = "shared", org = "org-x" }
"#;

async fn account_split(s: &common::Server) {
    let by_x = admitted(s, "k-x", 6).await;
    let by_y = admitted(s, "k-y", 6).await;
    let by_z = admitted(s, "k-z", 6).await;
    let total = by_x + by_y + by_z;
    assert_eq!(
        total, 4,
        "account `shared` allows 4 writes an hour; admitted {total} (k-x {by_x}, k-y {by_y}, k-z {by_z})"
    );
}

/// An account's keys share its 4 (in memory).
#[tokio::test]
async fn an_accounts_keys_share_its_limit_in_memory() {
    let s = memory_server(SHARED).await;
    account_split(&s).await;
}

/// The loader refuses an account in two organisations, or in one and in
/// none, naming the entry.
#[test]
fn an_account_in_two_orgs_is_refused_at_load() {
    secret();
    for (second, says) in [
        (
            "org = \"org-y\"",
            "is in organisation `org-x` for another key",
        ),
        (
            "tier = \"pro\"",
            "is in organisation `org-x` for another key",
        ),
    ] {
        let second = if second.starts_with("org") {
            format!("{{ tier = \"pro\", account = \"shared\", {second} }}")
        } else {
            "{ tier = \"pro\", account = \"shared\" }".to_owned()
        };
        let src = SHARED.replace(
            "\"k-y\" = { tier = \"pro\", account = \"shared\", org = \"org-x\" }",
            &format!("\"k-y\" = {second}"),
        );
        let e = Policy::from_toml_str(&src).expect_err(&src);
        assert!(e.entry().starts_with("keys."), "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
}

/// The admin API refuses a key that would split an account: against the
/// file's keys (change the file), and against keys provisioned through
/// it unless `move_account` moves them all at once — after which the
/// account's limit is shared by all of them, in the one organisation.
#[tokio::test]
async fn the_admin_api_keeps_an_account_in_one_org() {
    let s = memory_server(SHARED).await;
    let put = async |body: Value| admin(&s, "PUT", "/keys", body).await;
    let (st, body) =
        put(json!({ "key": "k-new", "tier": "pro", "account": "shared", "org": "org-y" })).await;
    assert_eq!(st, 409, "{body}");
    assert!(body.to_string().contains("policy file"), "{body}");
    let (st, body) =
        put(json!({ "key": "k-new", "tier": "pro", "account": "shared", "org": "org-x" })).await;
    assert_eq!(st, 200, "the same organisation: {body}");
    // Keys provisioned in team-z, in no organisation; the second asks for one.
    let (st, body) = put(json!({ "key": "z-1", "tier": "pro", "account": "team-z" })).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) =
        put(json!({ "key": "z-2", "tier": "pro", "account": "team-z", "org": "org-z" })).await;
    assert_eq!(st, 409, "{body}");
    assert!(body.to_string().contains("move_account"), "{body}");
    let (st, body) = put(json!({ "key": "z-2", "tier": "pro", "account": "team-z", "org": "org-z", "move_account": true })).await;
    assert_eq!(st, 200, "{body}");
    // Both now in org-z: team-z's 4 shared by both keys, in one bucket.
    let a = admitted(&s, "z-1", 6).await;
    let b = admitted(&s, "z-2", 6).await;
    assert_eq!(a + b, 4, "team-z: 4 an hour; admitted {a} + {b}");
    let (st, body) =
        put(json!({ "key": "z-3", "tier": "pro", "account": "team-z", "move_account": "yes" }))
            .await;
    assert_eq!(st, 400, "{body}");
}

// ---------------------------------------------------------------------
// 3. Owner changes: moving a key to another org, or an org/account
//    custom limit that adds a level to a cell without it, changes the
//    owner (memory shard / Redis hash tag) of the key's and account's
//    buckets, which start afresh — at most one fresh burst per limit per
//    change (the documented bound), never more.
// ---------------------------------------------------------------------

/// Per key 3, no account or org limits in the tier.
const PER_KEY_ONLY: &str = r#"
categories = ["read", "write"]

[tiers.pro]
read = "1000/hour"
write = "3/hour"

[keys]
"acme-a-1" = { tier = "pro", account = "team-a", org = "acme" }
"#;

/// An operator caps organisation acme at 100 writes an hour: acme's key,
/// which has used its own 3 of 3, moves from its own check (owner: the
/// key) to the org's shard / hash tag — at most one fresh burst.
#[tokio::test]
async fn adding_an_org_limit_gives_a_key_at_most_one_fresh_burst() {
    let s = memory_server(PER_KEY_ONLY).await;
    assert_eq!(admitted(&s, "acme-a-1", 3).await, 3);
    assert_eq!(admitted(&s, "acme-a-1", 1).await, 0, "its 3 are used");
    let (st, body) = admin(
        &s,
        "PUT",
        "/limits",
        json!({ "org": "acme", "category": "write", "limit": "100/hour" }),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let again = admitted(&s, "acme-a-1", 6).await;
    assert!(again <= 3, "at most one fresh burst of 3; got {again}");
}

/// The same for an account's custom limit (an account's per-account
/// limits, even in a tier that has none).
#[tokio::test]
async fn adding_an_account_limit_gives_a_key_at_most_one_fresh_burst() {
    let s = memory_server(PER_KEY_ONLY).await;
    assert_eq!(admitted(&s, "acme-a-1", 4).await, 3);
    let (st, body) = admin(
        &s,
        "PUT",
        "/limits",
        json!({ "account": "team-a", "category": "write", "limit": "100/hour" }),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let again = admitted(&s, "acme-a-1", 6).await;
    assert!(again <= 3, "at most one fresh burst of 3; got {again}");
}

/// Moving a key to another account and organisation (admin PUT): at most
/// one fresh burst of its own limit.
#[tokio::test]
async fn moving_a_key_to_another_org_gives_it_at_most_one_fresh_burst() {
    let s = memory_server(ORG_POLICY).await;
    assert_eq!(admitted(&s, "acme-a-1", 4).await, 3);
    let (st, body) = admin(
        &s,
        "PUT",
        "/keys",
        json!({ "key": "acme-a-1", "tier": "pro", "account": "team-new", "org": "globex" }),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let again = admitted(&s, "acme-a-1", 6).await;
    assert!(again <= 3, "at most one fresh burst of 3; got {again}");
}

// ---------------------------------------------------------------------
// 4. Hash-domain separation: an account named like an org, or like a
//    key; custom limits aimed at one must not reach the other.
// ---------------------------------------------------------------------

#[tokio::test]
async fn an_account_named_like_an_org_or_a_key_shares_nothing() {
    // Every level 3 an hour: if any two of key "acme", account "acme" and
    // org "acme" shared a bucket, one request would take 2 of it.
    let src = r#"
categories = ["read", "write"]

[tiers.pro]
read = "1000/hour"
write = "3/hour"

[tiers.pro.per_account]
write = "3/hour"

[tiers.pro.per_org]
write = "3/hour"

[keys]
"acme" = { tier = "pro", account = "acme", org = "acme" }
"k-org" = { tier = "pro", account = "other", org = "acme" }
"k-solo" = { tier = "pro", account = "x", org = "y" }

[account_limits."k-solo"]
write = "1/hour"

[org_limits."x"]
write = "1/hour"

[custom_limits."y"]
write = "1/hour"
"#;
    let s = memory_server(src).await;
    assert_eq!(
        admitted(&s, "acme", 5).await,
        3,
        "key, account and org acme apart"
    );
    assert_eq!(admitted(&s, "k-org", 5).await, 0, "org acme used");
    // Custom limits of an account named like the key, an org named like
    // its account, a key named like its org: none reach k-solo.
    assert_eq!(admitted(&s, "k-solo", 5).await, 3);
}

// ---------------------------------------------------------------------
// 5. Admin API edges.
// ---------------------------------------------------------------------

#[tokio::test]
async fn admin_names_edges() {
    let s = memory_server(ORG_POLICY).await;
    let long = "o".repeat(257);
    let max = "o".repeat(256);
    for (body, want) in [
        (json!({ "key": "n-1", "tier": "pro", "org": long }), 400),
        (json!({ "key": "n-1", "tier": "pro", "org": max }), 200),
        (json!({ "key": "n-2", "tier": "pro", "org": "" }), 400),
        (json!({ "key": "n-3", "tier": "pro", "org": 5 }), 400),
        (
            json!({ "key": "n-4", "tier": "pro", "org": "a\"b\nc\u{0}d" }),
            200,
        ),
        (
            json!({ "key": "n-5", "tier": "pro", "org": "ünïcødé-🦀" }),
            200,
        ),
        (json!({ "key": "n-6", "tier": "pro", "org": null }), 200),
        (json!({ "key": "n-7", "tier": "pro", "orgs": "acme" }), 400),
    ] {
        let (st, shown) = admin(&s, "PUT", "/keys", body.clone()).await;
        assert_eq!(st, want, "{body} → {shown}");
    }
    for (body, want) in [
        (
            json!({ "key": "acme-a-1", "org": "acme", "category": "write", "limit": "1/hour" }),
            400,
        ),
        (
            json!({ "org": "acme", "account": null, "category": "write", "limit": "1/hour" }),
            400,
        ),
        (
            json!({ "org": "o".repeat(257), "category": "write", "limit": "1/hour" }),
            400,
        ),
        (
            json!({ "org": "a\"b\nc", "category": "write", "limit": "1/hour" }),
            200,
        ),
        (
            json!({ "org": "acme", "category": "write", "limit": { "tokens": "1/hour" } }),
            400,
        ),
        (
            json!({ "org": "acme", "category": "*", "limit": "unlimited" }),
            200,
        ),
        (
            json!({ "org": "acme", "category": "write", "limit": "x0" }),
            400,
        ),
        (
            json!({ "org": "acme", "category": "write", "limit": "x1001" }),
            400,
        ),
    ] {
        let (st, shown) = admin(&s, "PUT", "/limits", body.clone()).await;
        assert_eq!(st, want, "{body} → {shown}");
    }
    // The org limit was set to unlimited for `*`: acme keys still have
    // their per-key and per-account limits.
    assert_eq!(admitted(&s, "acme-a-1", 5).await, 3);
    assert_eq!(admitted(&s, "acme-a-2", 5).await, 1, "team-a's 4th");
    for (body, want) in [
        (
            json!({ "org": "acme", "key": "acme-a-1", "adjust": "x2", "start": 1_767_225_600u64, "end": 1_798_761_600u64 }),
            400,
        ),
        (
            json!({ "org": "acme", "tier": "pro", "adjust": "x2", "start": 1_767_225_600u64, "end": 1_798_761_600u64 }),
            400,
        ),
        (
            json!({ "org": "", "adjust": "x2", "start": 1_767_225_600u64, "end": 1_798_761_600u64 }),
            400,
        ),
        (
            json!({ "org": "acme", "adjust": { "tokens": "5/hour" }, "start": 1_767_225_600u64, "end": 1_798_761_600u64 }),
            400,
        ),
    ] {
        let (st, shown) = admin(&s, "POST", "/boosts", body.clone()).await;
        assert_eq!(st, want, "{body} → {shown}");
    }
}

/// An org limit from the policy file removed through the admin API.
#[tokio::test]
async fn removing_a_file_org_limit() {
    let src = format!("{ORG_POLICY}\n[org_limits.\"acme\"]\nwrite = \"1/hour\"\n");
    let s = memory_server(&src).await;
    assert_eq!(
        admitted(&s, "acme-a-1", 3).await,
        1,
        "the file's org limit of 1"
    );
    let (st, body) = admin(
        &s,
        "DELETE",
        "/limits",
        json!({ "org": "acme", "category": "write" }),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Back to the tier's 5 (the removed limit's bucket is another one,
    // as any limit change); a-1 has 2 of its own 3 left.
    assert_eq!(admitted(&s, "acme-a-1", 5).await, 2);
}

// ---------------------------------------------------------------------
// 6. Loader edges.
// ---------------------------------------------------------------------

#[test]
fn loader_edges() {
    secret();
    let base = "categories = [\"read\", \"write\"]\n[tiers.pro]\nread = \"10/hour\"\n";
    // 3 + 3 + 3 = 9 limits: more than MAX_LIMITS (8).
    let nine = format!(
        "{base}write = [\"1/second\", \"10/minute\", \"100/hour\"]\n[tiers.pro.per_account]\nwrite = [\"2/second\", \"20/minute\", \"200/hour\"]\n[tiers.pro.per_org]\nwrite = [\"3/second\", \"30/minute\", \"300/hour\"]\n"
    );
    let e = Policy::from_toml_str(&nine).expect_err("9 limits");
    assert!(e.entry().contains("write"), "{e}");
    // 8 exactly is fine.
    let eight = format!(
        "{base}write = [\"1/second\", \"10/minute\", \"100/hour\"]\n[tiers.pro.per_account]\nwrite = [\"2/second\", \"20/minute\", \"200/hour\"]\n[tiers.pro.per_org]\nwrite = [\"3/second\", \"300/hour\"]\n"
    );
    Policy::from_toml_str(&eight).unwrap_or_else(|e| panic!("8 limits: {e}"));
    // Calendar period per org.
    let cal = format!(
        "{base}write = \"10/hour\"\n[tiers.pro.per_org]\nwrite = {{ requests = \"5/day\", period = \"calendar\" }}\n"
    );
    Policy::from_toml_str(&cal).unwrap_or_else(|e| panic!("calendar: {e}"));
    // A priority reserve that leaves nothing of the org's burst.
    let reserve = format!(
        "{base}write = \"10/hour\"\npriority_reserve = \"50%\"\n[tiers.pro.per_org]\nwrite = \"1/hour\"\n"
    );
    let e = Policy::from_toml_str(&reserve).expect_err("reserve");
    assert!(e.entry().contains("priority_reserve"), "{e}");
    // An org custom limit that would make 9 limits.
    let too_many = format!(
        "{nine_ok}\n[org_limits.\"acme\"]\nwrite = [\"1/second\", \"2/minute\", \"3/hour\", \"4/day\"]\n",
        nine_ok = eight
    );
    let e = Policy::from_toml_str(&too_many).expect_err("org list of 4 beside 6");
    assert!(e.entry().starts_with("org_limits"), "{e}");
}

/// A route cost above the org's burst: the loader refuses it; an org
/// custom limit below the cost made through the admin API gives a 400
/// naming the cost, not a 429 forever or a 500.
#[tokio::test]
async fn a_cost_above_the_org_burst_is_a_400() {
    let src = |org: &str| {
        format!(
            r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "100/hour"
[tiers.pro.per_org]
write = "{org}"
[[routes]]
path = "/v1/write"
category = "write"
cost = 3
[keys]
"k" = {{ tier = "pro", org = "acme" }}
"#
        )
    };
    secret();
    let e = Policy::from_toml_str(&src("2/hour")).expect_err("cost 3 > org burst 2");
    assert_eq!(e.entry(), "routes[0]", "{e}");
    let s = memory_server(&src("3/hour")).await;
    let (st, body) = admin(
        &s,
        "PUT",
        "/limits",
        json!({ "org": "acme", "category": "write", "limit": "2/hour" }),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let res = write(&s, "k").await;
    assert_eq!(
        res.status(),
        StatusCode::BAD_REQUEST,
        "{:?}",
        res.text().await
    );
}

/// Calendar org limits with a per-key limit: the org's 5 a day binds
/// across two keys; no 500.
#[tokio::test]
async fn calendar_org_limits() {
    let src = r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "4/hour"
[tiers.pro.per_org]
write = { requests = "5/day", period = "calendar" }
[keys]
"c-1" = { tier = "pro", org = "cal" }
"c-2" = { tier = "pro", account = "t", org = "cal" }
"#;
    let s = memory_server(src).await;
    let a = admitted(&s, "c-1", 6).await;
    let b = admitted(&s, "c-2", 6).await;
    assert_eq!((a, b), (4, 1));
    let usage: Value = call(&client(), "GET", &s.url("/v1/rate_limit"), "c-2")
        .await
        .json()
        .await
        .unwrap();
    let org = &usage["categories"]["write"]["limits"][1];
    assert_eq!(org["per"], "org", "{usage}");
    assert_eq!(org["remaining"], 0, "{usage}");
}

// ---------------------------------------------------------------------
// Redis: the same attacks across two instances, and faults.
// ---------------------------------------------------------------------

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, ready};
    use governor::clock::FakeRelativeClock;
    use tierlimit::backend::FailurePolicy;

    async fn redis_server(src: &str, backend: tierlimit::RedisBackend) -> common::Server {
        let layer = RateLimitLayer::builder(policy(src))
            .backend(backend)
            .unix_clock(|| 1_788_220_800)
            .build();
        serve(app(layer)).await
    }

    /// An instance of `src` on `server`, on a clock that stands still.
    async fn on_node(server: &RedisServer, src: &str) -> common::Server {
        let clock = FakeRelativeClock::default();
        redis_server(src, common::redis::fake_clock_backend(server, &clock).await).await
    }

    /// An instance of `src` on `cluster`, on a clock that stands still.
    async fn on_cluster(cluster: &RedisCluster, src: &str) -> common::Server {
        let clock = FakeRelativeClock::default();
        let backend = common::redis::fake_clock_cluster_backend(cluster, &clock).await;
        redis_server(src, backend).await
    }

    /// An account's keys share its 4 on Redis.
    #[tokio::test]
    async fn an_accounts_keys_share_its_limit_on_redis() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let s = on_node(&server, SHARED).await;
        account_split(&s).await;
    }

    /// And on a Cluster (every bucket under the organisation's slot).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_accounts_keys_share_its_limit_on_a_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let s = on_cluster(&cluster, SHARED).await;
        account_split(&s).await;
    }

    /// On Redis, across two instances: a key boost leaves the shared
    /// limits shared.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_boost_leaves_its_shared_limits_shared_on_redis() {
        if !ready() {
            return;
        }
        let src = key_boosted();
        let server = RedisServer::start();
        let a = on_node(&server, &src).await;
        let b = on_node(&server, &src).await;
        let boosted = admitted(&a, "acme-b-1", 10).await;
        let others = admitted(&b, "acme-a-1", 3).await
            + admitted(&b, "acme-a-2", 3).await
            + admitted(&b, "acme-b-2", 3).await;
        assert_eq!((boosted, boosted + others), (4, 5), "others {others}");
    }

    /// On Redis: an org limit added moves acme's per-key buckets from the
    /// key's hash tag to the org's: at most one fresh burst.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adding_an_org_limit_gives_a_key_at_most_one_fresh_burst_on_redis() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let s = on_node(&server, PER_KEY_ONLY).await;
        assert_eq!(admitted(&s, "acme-a-1", 4).await, 3);
        let (st, body) = admin(
            &s,
            "PUT",
            "/limits",
            json!({ "org": "acme", "category": "write", "limit": "100/hour" }),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        let again = admitted(&s, "acme-a-1", 6).await;
        assert!(again <= 3, "at most one fresh burst of 3; got {again}");
    }

    /// Keys in an org but in no account (each its own account), hammered
    /// through two instances: exactly the org's 5.
    const NO_ACCOUNT: &str = r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "3/hour"
[tiers.pro.per_account]
write = "2/hour"
[tiers.pro.per_org]
write = "5/hour"
[keys]
"n-1" = { tier = "pro", org = "noacct" }
"n-2" = { tier = "pro", org = "noacct" }
"n-3" = { tier = "pro", org = "noacct" }
"n-4" = { tier = "pro", org = "noacct" }
"#;

    async fn hammer_no_account(a: common::Server, b: common::Server) {
        let keys = ["n-1", "n-2", "n-3", "n-4"];
        let mut tasks = Vec::new();
        for t in 0..32 {
            let url = if t % 2 == 0 {
                a.url("/v1/write")
            } else {
                b.url("/v1/write")
            };
            let key = keys[(t / 2) % 4];
            tasks.push(tokio::spawn(async move {
                let c = client();
                let mut ok = 0u32;
                for _ in 0..4 {
                    let res = c.post(&url).header("x-api-key", key).send().await.unwrap();
                    match res.status().as_u16() {
                        200 => ok += 1,
                        429 => {}
                        other => panic!("unexpected {other}"),
                    }
                }
                (key, ok)
            }));
        }
        let mut per_key = std::collections::BTreeMap::new();
        for t in tasks {
            let (k, n) = t.await.unwrap();
            *per_key.entry(k).or_insert(0) += n;
        }
        let total: u32 = per_key.values().sum();
        assert_eq!(total, 5, "{per_key:?}");
        assert!(per_key.values().all(|n| *n <= 2), "{per_key:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn org_without_accounts_exact_across_two_instances_on_redis() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let a = on_node(&server, NO_ACCOUNT).await;
        let b = on_node(&server, NO_ACCOUNT).await;
        hammer_no_account(a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn org_without_accounts_exact_across_two_instances_on_a_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let a = on_cluster(&cluster, NO_ACCOUNT).await;
        let b = on_cluster(&cluster, NO_ACCOUNT).await;
        hammer_no_account(a, b).await;
    }

    /// Org-limited traffic while Redis is paused, killed, restarted and
    /// flushed: never a 500 or a panic; fail-closed answers 503.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_faults_under_org_traffic() {
        if !ready() {
            return;
        }
        let mut server = RedisServer::start();
        for failure in [
            FailurePolicy::Fallback,
            FailurePolicy::FailOpen,
            FailurePolicy::FailClosed,
        ] {
            let backend = tierlimit::RedisBackend::builder(server.url())
                .timeout(Duration::from_millis(200))
                .retry_interval(Duration::from_millis(100))
                .failure_policy(failure)
                .connect()
                .await
                .unwrap();
            let s = redis_server(ORG_POLICY, backend).await;
            let ok_statuses: &[u16] = match failure {
                FailurePolicy::FailClosed => &[200, 429, 503],
                _ => &[200, 429],
            };
            let check = async |what: &str| {
                for key in ["acme-a-1", "acme-b-1"] {
                    let res = write(&s, key).await;
                    let st = res.status().as_u16();
                    assert!(
                        ok_statuses.contains(&st),
                        "{failure:?} {what}: {key}: {st} {:?}",
                        res.text().await
                    );
                }
            };
            check("up").await;
            server.stop_process();
            check("paused").await;
            server.resume();
            check("resumed").await;
            server.cli(&["FLUSHALL"]);
            check("flushed").await;
            server.kill();
            check("killed").await;
            server.restart();
            check("restarted").await;
        }
    }

    /// An org boost and an org limit made through one instance, read back
    /// by a fresh instance from the store (`from_fields`), and a removal
    /// of the file's org limit likewise.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn org_adjustments_round_trip_through_the_store() {
        if !ready() {
            return;
        }
        let src = format!("{ORG_POLICY}\n[org_limits.\"acme\"]\nwrite = \"1/hour\"\n");
        let server = RedisServer::start();
        let instance = async || {
            let builder = tierlimit::RedisBackend::builder(server.url());
            let layer =
                common::redis::sharing_operator_state(builder, Duration::from_secs(2), |b| {
                    RateLimitLayer::builder(policy(&src))
                        .backend(b)
                        .unix_clock(|| 1_788_220_800)
                        .build()
                })
                .await;
            serve(app(layer)).await
        };
        let a = instance().await;
        // Remove the file's org limit of acme; boost org "we\"ird\n" x2;
        // an org limit for globex-like name with a quote.
        let (st, b) = admin(
            &a,
            "DELETE",
            "/limits",
            json!({ "org": "acme", "category": "write" }),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        let (st, b) = admin(
            &a,
            "POST",
            "/boosts",
            json!({ "org": "acme", "adjust": "x2", "start": 1_767_225_600u64, "end": 1_798_761_600u64 }),
        )
        .await;
        assert_eq!(st, 201, "{b}");
        let (st, b) = admin(
            &a,
            "PUT",
            "/limits",
            json!({ "account": "te\"am\n-b", "category": "write", "limit": "1/hour" }),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        let fresh = instance().await;
        assert_eq!(
            usage_limits(&fresh, "acme-a-1", "limit").await,
            [("key".into(), 6), ("account".into(), 8), ("org".into(), 10)],
            "the file's org limit removed, the org boost x2 applied"
        );
        let (st, list) = admin(&fresh, "GET", "/boosts", Value::Null).await;
        assert_eq!(st, 200);
        assert!(list.to_string().contains("\"org\":\"acme\""), "{list}");
    }
}
