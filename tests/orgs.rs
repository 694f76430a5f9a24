//! Organisations: a third owner above accounts. An organisation's limits
//! bind across all its accounts' keys, all or nothing with the per-key and
//! per-account ones, while another organisation is unaffected — through a
//! real axum server and HTTP client, a real tonic server and client, on
//! memory and on a real Redis (single node and Cluster) shared by two
//! servers; keys from `[keys]` and from the admin API.

mod common;

/// The hostile review's attacks, on this file's fixtures.
#[path = "orgs/attack.rs"]
mod attack;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{call, client, header, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tierlimit::backend::Backend;
use tierlimit::{ApiKey, HeaderOptions, Policy, RateLimitLayer};

/// Each key 3 writes an hour, each account (team) 4, each organisation 5.
const ORG_POLICY: &str = r#"
categories = ["read", "write"]

[tiers.pro]
read = "1000/hour"
write = "3/hour"

[tiers.pro.per_account]
write = "4/hour"

[tiers.pro.per_org]
write = "5/hour"

[keys]
"acme-a-1" = { tier = "pro", account = "team-a", org = "acme" }
"acme-a-2" = { tier = "pro", account = "team-a", org = "acme" }
"acme-b-1" = { tier = "pro", account = "team-b", org = "acme" }
"acme-b-2" = { tier = "pro", account = "team-b", org = "acme" }
"globex-1" = { tier = "pro", account = "team-g", org = "globex" }
"solo" = "pro"
"#;

const ACME: [&str; 4] = ["acme-a-1", "acme-a-2", "acme-b-1", "acme-b-2"];

const TOKEN: &str = "admin-token-for-org-tests-0123456789";

/// The key secret every test of this binary hashes with (Redis's tests
/// need one, set before any key is hashed).
fn secret() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    #[cfg(feature = "redis")]
    ONCE.call_once(common::redis::init_secret);
    #[cfg(not(feature = "redis"))]
    ONCE.call_once(|| {});
}

fn policy() -> Policy {
    secret();
    Policy::from_toml_str(ORG_POLICY).unwrap()
}

/// The app every test serves: `POST /v1/write` (category write) and the
/// usage endpoint behind the layer, the admin API beside it.
fn app<B: Backend>(layer: RateLimitLayer<ApiKey, B>) -> axum::Router {
    let admin =
        axum::Router::new().nest_service("/admin/v1", layer.admin_service().token("ops", TOKEN));
    axum::Router::new()
        .route("/v1/write", axum::routing::post(|| async { "{}" }))
        .route_service("/v1/rate_limit", layer.usage_service())
        .layer(layer)
        .merge(admin)
}

async fn memory_server() -> common::Server {
    let layer = RateLimitLayer::builder(policy())
        .backend(common::fake_memory())
        .headers(HeaderOptions::default().ietf_draft(true))
        .build();
    serve(app(layer)).await
}

async fn write(c: &reqwest::Client, s: &common::Server, key: &str) -> reqwest::Response {
    call(c, "POST", &s.url("/v1/write"), key).await
}

fn policy_header(res: &reqwest::Response) -> &str {
    res.headers()
        .get("ratelimit-policy")
        .map_or("", |v| v.to_str().unwrap())
}

/// `X-RateLimit-Limit` and `-Remaining` of a response.
fn limit_and_left(res: &reqwest::Response) -> (Option<u64>, Option<u64>) {
    (
        header(res, "x-ratelimit-limit"),
        header(res, "x-ratelimit-remaining"),
    )
}

/// `key`'s `write` limits as the usage endpoint of `s` lists them: whom
/// each is counted per, and its `field` (`limit` or `remaining`).
async fn usage_limits(s: &common::Server, key: &str, field: &str) -> Vec<(String, u64)> {
    let usage: Value = call(&client(), "GET", &s.url("/v1/rate_limit"), key)
        .await
        .json()
        .await
        .unwrap();
    usage["categories"]["write"]["limits"]
        .as_array()
        .unwrap_or_else(|| panic!("{usage}"))
        .iter()
        .map(|l| {
            (
                l["per"].as_str().unwrap().to_owned(),
                l[field].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_org_limit_binds_across_its_accounts_and_another_org_is_unaffected() {
    let s = memory_server().await;
    let c = client();
    // acme-a-1: its own 3 bind first.
    for left in [2, 1, 0] {
        let res = write(&c, &s, "acme-a-1").await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(left));
    }
    // acme-a-2, same team: the team's 4th; the team binds (0 left).
    let res = write(&c, &s, "acme-a-2").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(limit_and_left(&res), (Some(4), Some(0)));
    // acme-b-1, another team of acme: the org's 5th; the org binds.
    let res = write(&c, &s, "acme-b-1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(limit_and_left(&res), (Some(5), Some(0)));
    // acme-b-2: its key and its team have room, the org has none.
    let res = write(&c, &s, "acme-b-2").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limit_and_left(&res), (Some(5), Some(0)));
    assert_eq!(header(&res, "retry-after"), Some(720), "an hour / 5");
    assert_eq!(
        policy_header(&res),
        "\"pro.write\";q=3;w=3600, \"pro.write.account\";q=4;w=3600, \"pro.write.org\";q=5;w=3600"
    );
    // The refusal took nothing: acme-b-2's own usage shows its 3 and its
    // team's 3 left (b-1 took one), the org's none.
    assert_eq!(
        usage_limits(&s, "acme-b-2", "remaining").await,
        [("key".into(), 3), ("account".into(), 3), ("org".into(), 0)]
    );
    // Another organisation, and a key in none (its own), are unaffected.
    for key in ["globex-1", "solo"] {
        let res = write(&c, &s, key).await;
        assert_eq!(res.status(), StatusCode::OK, "{key}");
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(2), "{key}");
    }
    // Reads have no org limit: acme still reads.
    let res = call(&c, "GET", &s.url("/v1/rate_limit"), "acme-b-2").await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// `tasks` tasks, each writing `tries` times as one of `keys` (by task
/// number) against `urls` (by task number): the admitted count per key.
async fn hammer(
    urls: &[String],
    keys: &'static [&'static str],
    tasks: usize,
    tries: usize,
) -> Vec<u32> {
    let c = client();
    let admitted: Arc<Vec<AtomicU32>> = Arc::new(keys.iter().map(|_| AtomicU32::new(0)).collect());
    let mut running = Vec::new();
    for t in 0..tasks {
        let (c, admitted) = (c.clone(), Arc::clone(&admitted));
        let url = format!("{}/v1/write", urls[t % urls.len()]);
        let k = (t / urls.len()) % keys.len();
        running.push(tokio::spawn(async move {
            for _ in 0..tries {
                let res = c
                    .post(&url)
                    .header("x-api-key", keys[k])
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    200 => {
                        admitted[k].fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {}
                    other => panic!("unexpected {other}"),
                }
            }
        }));
    }
    for t in running {
        t.await.unwrap();
    }
    admitted.iter().map(|n| n.load(Ordering::Relaxed)).collect()
}

/// Exactly the org's 5 of many concurrent tries, each key within its 3 and
/// each team within its 4.
fn assert_org_exact(per_key: &[u32]) {
    assert_eq!(per_key.iter().sum::<u32>(), 5, "the org's 5: {per_key:?}");
    assert!(per_key.iter().all(|n| *n <= 3), "{per_key:?}");
    assert!(
        per_key[0] + per_key[1] <= 4 && per_key[2] + per_key[3] <= 4,
        "{per_key:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_org_limit_is_exact_under_concurrency_in_memory() {
    let s = memory_server().await;
    let per_key = hammer(&[s.url("")], &ACME, 32, 4).await;
    assert_org_exact(&per_key);
    let res = write(&client(), &s, "globex-1").await;
    assert_eq!(res.status(), StatusCode::OK, "globex is its own org");
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, ready};
    use governor::clock::FakeRelativeClock;

    /// Two servers sharing one Redis through the backends `make` connects.
    async fn across_two_servers(make: impl AsyncFn() -> tierlimit::RedisBackend) {
        let mut servers = Vec::new();
        for _ in 0..2 {
            let layer = RateLimitLayer::builder(policy())
                .backend(make().await)
                .build();
            servers.push(serve(app(layer)).await);
        }
        let urls: Vec<String> = servers.iter().map(|s| s.url("")).collect();
        let per_key = hammer(&urls, &ACME, 32, 4).await;
        assert_org_exact(&per_key);
        let res = write(&client(), &servers[1], "globex-1").await;
        assert_eq!(res.status(), StatusCode::OK, "globex is its own org");
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(2));
    }

    #[tokio::test]
    async fn redis_passes_the_owners_table() {
        if !ready() {
            return;
        }
        secret();
        let (_server, clock, backend) = common::redis::single_node_on_fake_clock().await;
        common::conformance::owners::run_owners(&backend, |d| clock.advance(d)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_passes_the_owners_table_in_one_slot() {
        if !ready() {
            return;
        }
        secret();
        let (_cluster, clock, backend) = common::redis::cluster_on_fake_clock().await;
        common::conformance::owners::run_owners(&backend, |d| clock.advance(d)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_org_limit_is_exact_across_two_servers_on_redis() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        across_two_servers(async || common::redis::fake_clock_backend(&server, &clock).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_org_limit_is_exact_across_two_servers_on_a_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        let clock = FakeRelativeClock::default();
        across_two_servers(async || {
            common::redis::fake_clock_cluster_backend(&cluster, &clock).await
        })
        .await;
    }
}

#[tokio::test]
async fn the_admin_api_provisions_keys_in_an_org() {
    let s = memory_server().await;
    let c = client();
    let put = |key: &'static str, body: Value| {
        let c = c.clone();
        let url = s.url("/admin/v1/keys");
        async move {
            let res = c
                .put(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (
                status,
                res.json::<Value>().await.unwrap_or(Value::Null),
                key,
            )
        }
    };
    // Two new keys of globex, in another team: they share globex's 5 with
    // globex-1.
    for key in ["globex-new-1", "globex-new-2"] {
        let (status, body, _) = put(
            key,
            json!({ "key": key, "tier": "pro", "account": "team-h", "org": "globex" }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["org"], "globex", "{body}");
    }
    let mut admitted = 0;
    for key in [
        "globex-1",
        "globex-1",
        "globex-1",
        "globex-new-1",
        "globex-new-1",
        "globex-new-2",
    ] {
        admitted += u32::from(write(&c, &s, key).await.status() == StatusCode::OK);
    }
    assert_eq!(admitted, 5, "globex's 5, over three keys and two teams");
    // A bad org is refused, naming the field; nothing changes.
    let (status, body, _) = put(
        "globex-new-3",
        json!({ "key": "globex-new-3", "tier": "pro", "org": "" }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("field `org`"), "{body}");
    let res = write(&c, &s, "globex-new-3").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "not provisioned");
}

#[tokio::test]
async fn an_org_refusal_over_grpc_is_resource_exhausted() {
    secret();
    let policy = Policy::from_toml_str(&format!(
        "{ORG_POLICY}\n[[grpc]]\nservice = \"grpc.health.v1.Health\"\ncategory = \"write\"\n"
    ))
    .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .build();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let routes = tonic::service::Routes::new(health);
    let s = common::serve_grpc(layer, routes).await;
    let channel = common::grpc_channel(s.addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut codes = Vec::new();
    for key in [
        "acme-a-1", "acme-a-1", "acme-a-2", "acme-b-1", "acme-b-2", "acme-b-2",
    ] {
        codes.push(match health.check(common::health_check(key)).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => {
                let limit = status.metadata().get("x-ratelimit-limit").unwrap();
                assert_eq!(limit.to_str().unwrap(), "5", "the org's limit binds");
                status.code()
            }
        });
    }
    use tonic::Code::{Ok as Admitted, ResourceExhausted as Refused};
    assert_eq!(
        codes,
        [Admitted, Admitted, Admitted, Admitted, Admitted, Refused]
    );
}

#[test]
fn org_mistakes_are_refused_naming_the_entry() {
    secret();
    let cases = [
        (
            "[tiers.pro.per_org]\nwrite = { requests = \"5/hour\", tokens = \"100/hour\" }\n",
            "tiers.pro.per_org.write",
            "request limits only",
        ),
        (
            "[tiers.pro.per_org]\nwrite = \"unlimited\"\n",
            "tiers.pro.per_org.write",
            "cannot be unlimited",
        ),
        (
            "[tiers.pro.per_org]\nwirte = \"5/hour\"\n",
            "tiers.pro.per_org.wirte",
            "unknown category",
        ),
        (
            "[tiers.pro.per_org]\nwrite = \"0/hour\"\n",
            "tiers.pro.per_org.write",
            "",
        ),
        (
            "[keys]\n\"k-1\" = { tier = \"pro\", org = \"\" }\n",
            "keys.",
            "an organisation is a name of 1 to 256 bytes",
        ),
        (
            "[keys]\n\"k-1\" = { tier = \"pro\", orgg = \"acme\" }\n",
            "keys.",
            "unknown field `orgg`",
        ),
        (
            "[keys]\n\"k-1\" = { tier = \"pro\", account = \"t\", org = \"x\" }\n\"k-2\" = { tier = \"pro\", account = \"t\", org = \"y\" }\n",
            "keys.",
            "account `t` is in organisation `x` for another key",
        ),
        (
            "[keys]\n\"k-1\" = { tier = \"pro\", account = \"t\" }\n\"k-2\" = { tier = \"pro\", account = \"t\", org = \"y\" }\n",
            "keys.",
            "account `t` is in no organisation for another key",
        ),
    ];
    for (extra, entry, says) in cases {
        let src = format!(
            "categories = [\"read\", \"write\"]\n[tiers.pro]\nread = \"10/hour\"\nwrite = \"10/hour\"\n{extra}"
        );
        let e = Policy::from_toml_str(&src).expect_err(extra);
        assert!(e.entry().starts_with(entry), "{extra}: {e}");
        assert!(e.to_string().contains(says), "{extra}: {e}");
    }
}

/// Custom limits and boosts of an account or an organisation, from the
/// policy file: acme's organisation limit raised to 100, team-a's own
/// account limit set to 6, team-b's account boosted to 20, and globex
/// boosted x2 (every limit its keys have).
const OWNER_ADJUSTMENTS: &str = r#"
[org_limits."acme"]
write = "100/hour"

[account_limits."team-a"]
write = "6/hour"

[[boosts]]
account = "team-b"
category = "write"
adjust = "20/hour"
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"

[[boosts]]
org = "globex"
adjust = "x2"
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
"#;

/// (admitted, the refusal's `X-RateLimit-Limit`) of `n` writes as `key`.
async fn writes(
    c: &reqwest::Client,
    s: &common::Server,
    key: &str,
    n: usize,
) -> (u32, Option<u64>) {
    let (mut admitted, mut refused_by) = (0, None);
    for _ in 0..n {
        let res = write(c, s, key).await;
        match res.status() {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused_by = header(&res, "x-ratelimit-limit"),
            other => panic!("{key}: unexpected {other}"),
        }
    }
    (admitted, refused_by)
}

#[tokio::test]
async fn custom_limits_and_boosts_target_an_account_or_an_org() {
    secret();
    let policy = Policy::from_toml_str(&format!("{ORG_POLICY}\n{OWNER_ADJUSTMENTS}")).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        // 2026-09-01: inside the boosts' year.
        .unix_clock(|| 1_788_220_800)
        .build();
    let s = serve(app(layer)).await;
    let c = client();
    // team-a: its own 6 (not the tier's 4), each key within its 3; the
    // org's 100 never binds.
    assert_eq!(writes(&c, &s, "acme-a-1", 4).await, (3, Some(3)));
    assert_eq!(writes(&c, &s, "acme-a-2", 4).await, (3, Some(3)));
    // team-b, boosted to 20: each key its 3 (the tier's 4 would refuse
    // b-2's second).
    assert_eq!(writes(&c, &s, "acme-b-1", 3).await, (3, None));
    assert_eq!(writes(&c, &s, "acme-b-2", 4).await, (3, Some(3)));
    // globex, x2: its key's 6, then refused by the key's doubled limit.
    assert_eq!(writes(&c, &s, "globex-1", 7).await, (6, Some(6)));
    // A key in no account or organisation keeps the tier's limits.
    assert_eq!(writes(&c, &s, "solo", 4).await, (3, Some(3)));
    // The usage endpoint shows the limits that apply to team-a's keys.
    assert_eq!(
        usage_limits(&s, "acme-a-1", "limit").await,
        [
            ("key".into(), 3),
            ("account".into(), 6),
            ("org".into(), 100)
        ]
    );
}

#[test]
fn owner_adjustment_mistakes_are_refused_naming_the_entry() {
    secret();
    let cases = [
        (
            "[org_limits.\"acme\"]\nwrite = { tokens = \"5/hour\" }\n",
            "org_limits.\"acme\".write",
            "request limits only",
        ),
        (
            "[account_limits.\"team-a\"]\nwirte = \"5/hour\"\n",
            "account_limits.\"team-a\".wirte",
            "unknown category",
        ),
        (
            "[account_limits.\"\"]\nwrite = \"5/hour\"\n",
            "account_limits.\"\".write",
            "an account is a name of 1 to 256 bytes",
        ),
        (
            "[[boosts]]\norg = \"acme\"\naccount = \"team-a\"\nadjust = \"x2\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2027-01-01T00:00:00Z\"\n",
            "boosts[0]",
            "one of `key`, `tier`, `account` or `org`",
        ),
    ];
    for (extra, entry, says) in cases {
        let e = Policy::from_toml_str(&format!("{ORG_POLICY}\n{extra}")).expect_err(extra);
        assert_eq!(e.entry(), entry, "{extra}: {e}");
        assert!(e.to_string().contains(says), "{extra}: {e}");
    }
}

/// An admin request as `TOKEN`: the status and the body.
async fn admin(s: &common::Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    let res = client()
        .request(method.parse().unwrap(), s.url(&format!("/admin/v1{path}")))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Through the admin API: team-a's own account limit set to 6 and acme's
/// organisation limit to 100, globex boosted x2; a bad body is refused.
async fn adjust_owners_through_the_admin_api(s: &common::Server) {
    for body in [
        json!({ "account": "team-a", "category": "write", "limit": "6/hour" }),
        json!({ "org": "acme", "category": "write", "limit": "100/hour" }),
    ] {
        let (status, shown) = admin(s, "PUT", "/limits", body.clone()).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["limit"], body["limit"], "{shown}");
    }
    let boost = json!({ "org": "globex", "adjust": "x2",
                        "start": 1_767_225_600u64, "end": 1_798_761_600u64 });
    let (status, shown) = admin(s, "POST", "/boosts", boost).await;
    assert_eq!(status, 201, "{shown}");
    assert_eq!(shown["org"], "globex", "{shown}");
    for (bad, says) in [
        (
            json!({ "org": "acme", "category": "write", "limit": { "tokens": "5/hour" } }),
            "request limits only",
        ),
        (
            json!({ "account": "a", "org": "b", "category": "write", "limit": "5/hour" }),
            "one of",
        ),
        (
            json!({ "account": "", "category": "write", "limit": "5/hour" }),
            "field `account`",
        ),
    ] {
        let (status, shown) = admin(s, "PUT", "/limits", bad).await;
        assert_eq!(status, 400, "{shown}");
        assert!(shown.to_string().contains(says), "{shown}");
    }
}

#[tokio::test]
async fn the_admin_api_sets_account_and_org_limits_and_boosts() {
    let layer = RateLimitLayer::builder(policy())
        .backend(common::fake_memory())
        .unix_clock(|| 1_788_220_800)
        .build();
    let s = serve(app(layer)).await;
    let c = client();
    adjust_owners_through_the_admin_api(&s).await;
    assert_eq!(writes(&c, &s, "acme-a-1", 4).await, (3, Some(3)));
    assert_eq!(writes(&c, &s, "acme-a-2", 4).await, (3, Some(3)));
    assert_eq!(writes(&c, &s, "globex-1", 7).await, (6, Some(6)));
    // team-b keeps its tier's 4.
    assert_eq!(writes(&c, &s, "acme-b-1", 3).await, (3, None));
    assert_eq!(writes(&c, &s, "acme-b-2", 2).await, (1, Some(4)));
    // The account limit removed: team-a is back to its tier's 4, which it
    // has used past.
    let body = json!({ "account": "team-a", "category": "write" });
    assert_eq!(admin(&s, "DELETE", "/limits", body).await.0, 200);
    let res = write(&c, &s, "acme-a-1").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[cfg(all(feature = "redis", feature = "test-util"))]
mod shared {
    use super::*;
    use common::redis::{RedisServer, ready};

    /// An instance on `server` sharing operator state through it.
    async fn instance(server: &RedisServer) -> common::Server {
        let builder = tierlimit::RedisBackend::builder(server.url());
        let layer = common::redis::sharing_operator_state(builder, Duration::from_secs(2), |b| {
            RateLimitLayer::builder(policy())
                .backend(b)
                .unix_clock(|| 1_788_220_800)
                .build()
        })
        .await;
        serve(app(layer)).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn account_and_org_adjustments_through_one_instance_reach_the_other() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let a = instance(&server).await;
        let b = instance(&server).await;
        adjust_owners_through_the_admin_api(&a).await;
        // B learns of them from the store (it polls it every 200 ms; a
        // bounded wait for the change to arrive, not for time to pass).
        let c = client();
        let usage = async || -> Vec<u64> {
            let limits = usage_limits(&b, "acme-a-1", "limit").await;
            limits.into_iter().map(|(_, n)| n).collect()
        };
        let mut seen = usage().await;
        for _ in 0..500 {
            if seen == [3, 6, 100] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen = usage().await;
        }
        assert_eq!(seen, [3, 6, 100], "B applies team-a's and acme's limits");
        assert_eq!(
            writes(&c, &b, "globex-1", 7).await,
            (6, Some(6)),
            "and the boost"
        );
        // A third instance started now has them at start.
        let third = instance(&server).await;
        assert_eq!(writes(&c, &third, "acme-a-1", 4).await, (3, Some(3)));
    }
}

#[tokio::test]
async fn a_resolver_gives_keys_an_org() {
    use tierlimit::key::KeyId;
    use tierlimit::policy::ListedKey;
    let policy = policy();
    let pro = policy.tier("pro").unwrap();
    // Keys `org_<org>_<team>_<n>`, resolved at run time (not listed).
    let keys = ApiKey::new().resolve_listed(move |key| {
        let mut parts = key.strip_prefix("org_")?.split('_');
        let (org, team) = (parts.next()?, parts.next()?);
        Some(
            ListedKey::new(pro)
                .in_account(Some(KeyId::of_account(&format!("{org}/{team}"))))
                .in_org(Some(KeyId::of_org(org))),
        )
    });
    let layer = RateLimitLayer::builder(policy)
        .extractor(keys)
        .backend(common::fake_memory())
        .build();
    let s = serve(app(layer)).await;
    let c = client();
    let mut admitted = 0;
    for key in [
        "org_initech_a_1",
        "org_initech_a_2",
        "org_initech_b_1",
        "org_initech_b_2",
    ] {
        for _ in 0..3 {
            admitted += u32::from(write(&c, &s, key).await.status() == StatusCode::OK);
        }
    }
    assert_eq!(admitted, 5, "initech's 5, over two resolved teams");
    let res = write(&c, &s, "org_umbrella_a_1").await;
    assert_eq!(res.status(), StatusCode::OK, "another organisation");
}
