//! Several limits per category, all or nothing, and limits shared by an
//! account's keys: black-box through the demo server (a policy file with
//! the new forms, loaded as `$POLICY` is), a real HTTP client, a fake clock.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{MULTI_POLICY, call, client, header, serve};
use governor::clock::FakeRelativeClock;
use reqwest::StatusCode;
use serde_json::Value;
use tierlimit::{HeaderOptions, MemoryBackend, Policy, RateLimitLayer};

/// The policy, read from a file as the demo reads `$POLICY`.
fn policy_from_file() -> Policy {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tierlimit-multi-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, MULTI_POLICY).unwrap();
    let policy = Policy::from_toml_file(&path).expect("the multi policy is valid");
    let _ = std::fs::remove_dir_all(&dir);
    policy
}

async fn demo_server(headers: HeaderOptions) -> (common::Server, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::builder().clock(clock.clone()).build();
    let layer = RateLimitLayer::builder(policy_from_file())
        .extractor(demo::demo_extractor as demo::DemoExtractor)
        .backend(backend)
        .headers(headers)
        .build();
    (serve(demo::app(layer)).await, clock)
}

fn text<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

/// (limit, remaining, window) of the X-RateLimit headers.
fn named(res: &reqwest::Response) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        header(res, "x-ratelimit-limit"),
        header(res, "x-ratelimit-remaining"),
        header(res, "x-ratelimit-window"),
    )
}

#[tokio::test]
async fn headers_name_the_binding_limit_and_retry_after_is_when_every_limit_admits() {
    let (server, clock) = demo_server(HeaderOptions::default()).await;
    let c = client();
    let url = server.url("/v1/account");
    let read = || call(&c, "GET", &url, "free-demo-key");
    // t = 0: the 2/second guard has the fewest left.
    let res = read().await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(named(&res), (Some(2), Some(1), Some(1)));
    let res = read().await;
    assert_eq!(named(&res), (Some(2), Some(0), Some(1)));
    // The guard refuses (the budget would admit): retry in half a second,
    // rounded up to 1; the problem body names the guard's window.
    let res = read().await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(named(&res), (Some(2), Some(0), Some(1)));
    assert_eq!(header(&res, "retry-after"), Some(1));
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["limit"].as_u64(), body["window_seconds"].as_u64()),
        (Some(2), Some(1)),
        "{body}"
    );
    for _ in 0..2 {
        // t = 1 s, 2 s: two more each time (the budget: 8 → 4).
        clock.advance(Duration::from_secs(1));
        assert_eq!(read().await.status(), StatusCode::OK);
        let res = read().await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-limit"), Some(2));
    }
    // t = 3 s: both have 1 left, then both 0: the tie goes to the longer
    // window, the hourly budget.
    clock.advance(Duration::from_secs(1));
    let res = read().await;
    assert_eq!(named(&res), (Some(8), Some(1), Some(3600)));
    let res = read().await;
    assert_eq!(named(&res), (Some(8), Some(0), Some(3600)));
    // Both refuse; the budget's wait is the longer, and it is when both
    // admit: the 9th request conforms at 8 × 450 s − 7 × 450 s = 450 s,
    // 447 s from now.
    let res = read().await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(named(&res), (Some(8), Some(0), Some(3600)));
    assert_eq!(header(&res, "retry-after"), Some(447));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["window_seconds"].as_u64(), Some(3600), "{body}");
    assert_eq!(body["retry_after_seconds"].as_u64(), Some(447), "{body}");
    // A second later the guard would admit, the budget still refuses, and
    // the refusals took nothing from the guard: the usage endpoint shows
    // it full (2) while the budget is empty.
    clock.advance(Duration::from_secs(1));
    let res = read().await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some(446));
    let usage: Value = call(&c, "GET", &server.url("/v1/rate_limit"), "free-demo-key")
        .await
        .json()
        .await
        .unwrap();
    let read = &usage["categories"]["read"];
    assert_eq!(read["limit"], 8, "{usage}");
    assert_eq!(read["remaining"], 0, "{usage}");
    let limits = read["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 2, "{usage}");
    assert_eq!(
        (
            &limits[0]["limit"],
            &limits[0]["window"],
            &limits[0]["remaining"]
        ),
        (&Value::from(2), &Value::from(1), &Value::from(2)),
        "{usage}"
    );
    assert_eq!(
        (
            &limits[1]["limit"],
            &limits[1]["window"],
            &limits[1]["remaining"]
        ),
        (&Value::from(8), &Value::from(3600), &Value::from(0)),
        "{usage}"
    );
    // The table form lists both of ai's limits too; one-limit categories
    // list their one.
    let ai = usage["categories"]["ai"]["limits"].as_array().unwrap();
    assert_eq!(ai.len(), 2, "{usage}");
    let write = usage["categories"]["write"]["limits"].as_array().unwrap();
    assert_eq!(write.len(), 1, "{usage}");
    assert_eq!(usage["categories"]["write"]["remaining"], 20, "{usage}");
}

#[tokio::test]
async fn draft_fields_list_every_policy_and_name_the_binding_one() {
    let (server, _clock) = demo_server(HeaderOptions::default().ietf_draft(true)).await;
    let c = client();
    let res = call(&c, "GET", &server.url("/v1/account"), "free-demo-key").await;
    assert_eq!(
        text(&res, "ratelimit-policy"),
        "\"free.read.1s\";q=2;w=1, \"free.read.3600s\";q=8;w=3600"
    );
    assert_eq!(text(&res, "ratelimit"), "\"free.read.1s\";r=1;t=1");
    // A one-limit category keeps its plain name.
    let res = call(&c, "POST", &server.url("/v1/clusters"), "free-demo-key").await;
    assert_eq!(text(&res, "ratelimit-policy"), "\"free.write\";q=20;w=3600");
    // Per-account limits are named apart.
    let res = call(&c, "POST", &server.url("/v1/clusters"), "team-a").await;
    assert_eq!(
        text(&res, "ratelimit-policy"),
        "\"team.write\";q=3;w=3600, \"team.write.account\";q=5;w=3600"
    );
    // After one write: 2 of the key's 3 left, 4 of the account's 5.
    assert_eq!(text(&res, "ratelimit"), "\"team.write\";r=2;t=1200");
}

#[tokio::test]
async fn keys_of_a_pooled_account_share_its_limits_and_other_accounts_are_unaffected() {
    let (server, _clock) = demo_server(HeaderOptions::default()).await;
    let c = client();
    let url = server.url("/v1/clusters");
    // acme's two keys take 6 writes together.
    for (i, key) in ["acme-key-1", "acme-key-2"]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let res = call(&c, "POST", &url, key).await;
        assert_eq!(res.status(), StatusCode::OK, "write {}", i + 1);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(5 - i as u64));
    }
    for key in ["acme-key-1", "acme-key-2"] {
        let res = call(&c, "POST", &url, key).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS, "{key}");
        assert_eq!(header(&res, "retry-after"), Some(600));
    }
    // globex has its own 6.
    for _ in 0..6 {
        assert_eq!(
            call(&c, "POST", &url, "globex-key").await.status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        call(&c, "POST", &url, "globex-key").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // The usage endpoint shows acme's shared count from either key.
    let usage: Value = call(&c, "GET", &server.url("/v1/rate_limit"), "acme-key-2")
        .await
        .json()
        .await
        .unwrap();
    let write = &usage["categories"]["write"];
    assert_eq!(write["remaining"], 0, "{usage}");
    assert_eq!(write["limits"][0]["per"], "account", "{usage}");
}

#[tokio::test]
async fn per_account_limits_bind_on_top_of_per_key_limits() {
    let (server, _clock) = demo_server(HeaderOptions::default()).await;
    let c = client();
    let url = server.url("/v1/clusters");
    // team-a: its own 3 per hour bind first (the account has 5).
    for left in [2, 1, 0] {
        let res = call(&c, "POST", &url, "team-a").await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(named(&res), (Some(3), Some(left), Some(3600)));
    }
    let res = call(&c, "POST", &url, "team-a").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "x-ratelimit-limit"), Some(3));
    // team-b, same account: 2 left of the account's 5 (its own 3 are
    // untouched); the account binds once it has fewer left.
    let res = call(&c, "POST", &url, "team-b").await;
    assert_eq!(named(&res), (Some(5), Some(1), Some(3600)));
    let res = call(&c, "POST", &url, "team-b").await;
    assert_eq!(named(&res), (Some(5), Some(0), Some(3600)));
    let res = call(&c, "POST", &url, "team-b").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(named(&res), (Some(5), Some(0), Some(3600)));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["limit"], 5, "{body}");
    // team-b's own limit kept what the refusal did not take: 1 of 3.
    let usage: Value = call(&c, "GET", &server.url("/v1/rate_limit"), "team-b")
        .await
        .json()
        .await
        .unwrap();
    let limits = usage["categories"]["write"]["limits"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        (&limits[0]["per"], &limits[0]["remaining"]),
        (&Value::from("key"), &Value::from(1)),
        "{usage}"
    );
    assert_eq!(
        (&limits[1]["per"], &limits[1]["remaining"]),
        (&Value::from("account"), &Value::from(0)),
        "{usage}"
    );
    // A key without an account is its own account.
    for _ in 0..3 {
        assert_eq!(
            call(&c, "POST", &url, "team-solo").await.status(),
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_keys_of_one_account_share_exactly_under_concurrency() {
    let (server, _clock) = demo_server(HeaderOptions::default()).await;
    let c = client();
    let allowed = Arc::new(AtomicU32::new(0));
    let per_key = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let (c, allowed, per_key) = (c.clone(), Arc::clone(&allowed), Arc::clone(&per_key));
        let url = server.url("/v1/clusters");
        tasks.push(tokio::spawn(async move {
            let (key, slot) = if t % 2 == 0 {
                ("team-a", 0)
            } else {
                ("team-b", 1)
            };
            for _ in 0..4 {
                let res = call(&c, "POST", &url, key).await;
                match res.status() {
                    StatusCode::OK => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                        per_key[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("unexpected {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The account's 5 in total; neither key above its own 3.
    assert_eq!(allowed.load(Ordering::Relaxed), 5, "128 tries");
    for (i, n) in per_key.iter().enumerate() {
        assert!(n.load(Ordering::Relaxed) <= 3, "key {i}: {n:?}");
    }
    // Another account's key is unaffected.
    let res = call(&c, "POST", &server.url("/v1/clusters"), "team-solo").await;
    assert_eq!(named(&res), (Some(3), Some(2), Some(3600)));
}

/// A server for `policy` on a fake clock, its Unix time fixed at `unix`.
async fn server_for(
    policy: Policy,
    unix: u64,
) -> (
    common::Server,
    RateLimitLayer<tierlimit::ApiKey, MemoryBackend<FakeRelativeClock>>,
) {
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::builder(policy)
        .backend(MemoryBackend::builder().clock(clock).build())
        .unix_clock(move || unix)
        .build();
    let app = axum::Router::new()
        .route(
            "/v1/account",
            axum::routing::get(|| async { "{}" }).post(|| async { "{}" }),
        )
        .route_service("/v1/rate_limit", layer.usage_service())
        .layer(layer.clone());
    (serve(app).await, layer)
}

/// `MULTI_POLICY` with extra TOML appended (sections after `[keys]`).
fn with(extra: &str) -> Policy {
    Policy::from_toml_str(&format!("{MULTI_POLICY}\n{extra}")).unwrap()
}

async fn usage_limits(
    c: &reqwest::Client,
    server: &common::Server,
    key: &str,
    cat: &str,
) -> Vec<(u64, u64)> {
    let usage: Value = call(c, "GET", &server.url("/v1/rate_limit"), key)
        .await
        .json()
        .await
        .unwrap();
    usage["categories"][cat]["limits"]
        .as_array()
        .unwrap_or_else(|| panic!("{usage}"))
        .iter()
        .map(|l| (l["limit"].as_u64().unwrap(), l["window"].as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn custom_limits_and_boosts_take_lists_and_scale_every_limit() {
    let policy = with(
        r#"
[overrides."free-demo-key"]
write = ["1/second", "3/hour"]     # a list replaces the key's limits
read = "x2"                        # a multiplier scales every limit

[[boosts]]
tier = "team"
category = "write"
adjust = "x3"                      # per key and per account
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
"#,
    );
    let now = 1_790_000_000; // inside the boost
    let (server, _layer) = server_for(policy, now).await;
    let c = client();
    assert_eq!(
        usage_limits(&c, &server, "free-demo-key", "read").await,
        [(4, 1), (16, 3600)]
    );
    assert_eq!(
        usage_limits(&c, &server, "free-demo-key", "write").await,
        [(1, 1), (3, 3600)]
    );
    let res = call(&c, "POST", &server.url("/v1/account"), "free-demo-key").await;
    assert_eq!(named(&res), (Some(1), Some(0), Some(1)));
    let res = call(&c, "POST", &server.url("/v1/account"), "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        usage_limits(&c, &server, "team-a", "write").await,
        [(9, 3600), (15, 3600)]
    );
    // Outside the boost, the tier's limits.
    let (server, _layer) = server_for(with(""), 1_900_000_000).await;
    assert_eq!(
        usage_limits(&c, &server, "team-a", "write").await,
        [(3, 3600), (5, 3600)]
    );
}

#[tokio::test]
async fn a_priority_reserve_applies_to_every_limit() {
    // 50%: the guard keeps 1 of 2, the budget 4 of 8 for critical requests.
    let policy = Policy::from_toml_str(&MULTI_POLICY.replace(
        "[tiers.free]\n",
        "[tiers.free]\npriority_reserve = \"50%\"\n",
    ))
    .unwrap();
    let (server, _layer) = server_for(policy, 1_790_000_000).await;
    let c = client();
    let url = server.url("/v1/account");
    let res = call(&c, "GET", &url, "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::OK);
    // The guard binds, reported as the 1 a normal request may use.
    assert_eq!(named(&res), (Some(1), Some(0), Some(1)));
    let res = call(&c, "GET", &url, "free-demo-key").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let critical = c
        .get(&url)
        .header("X-API-Key", "free-demo-key")
        .header("X-Request-Priority", "critical")
        .send()
        .await
        .unwrap();
    assert_eq!(
        critical.status(),
        StatusCode::OK,
        "the reserve is the critical one's"
    );
    assert_eq!(named(&critical), (Some(2), Some(0), Some(1)));
}

#[tokio::test]
async fn shadow_mode_and_live_reload_work_with_lists() {
    let (server, layer) = server_for(with("[shadow]\ntiers = [\"free\"]\n"), 1_790_000_000).await;
    let c = client();
    let url = server.url("/v1/account");
    for _ in 0..3 {
        assert_eq!(
            call(&c, "GET", &url, "free-demo-key").await.status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        layer.shadow_refusals(),
        1,
        "the third would have been refused by the guard"
    );
    // Live: the read list becomes one limit, and back.
    let handle = layer.policy_handle();
    handle
        .update(|b| {
            b.tier(
                tierlimit::Tier::new("solo")
                    .limit("read", tierlimit::Limit::per_hour(7))
                    .limit("write", tierlimit::Limit::per_hour(7))
                    .limit("ai", tierlimit::Limit::per_hour(7))
                    .unlimited("training"),
            )
            .set_key_tier("free-demo-key", "solo")
        })
        .unwrap();
    let res = call(&c, "GET", &url, "free-demo-key").await;
    assert_eq!(named(&res), (Some(7), Some(6), Some(3600)));
    handle.replace(with(""));
    let res = call(&c, "GET", &url, "free-demo-key").await;
    assert_eq!(
        header(&res, "x-ratelimit-window"),
        Some(1),
        "the guard again"
    );
}

#[tokio::test]
async fn accounts_from_an_auth_layer_and_from_a_resolver() {
    let policy = policy_from_file();
    let pro = policy.tier("pro").unwrap();
    let c = client();
    // 1. An auth layer that knows the account: users 1 and 2 of org 9.
    let layer = RateLimitLayer::builder(policy.clone())
        .extractor(tierlimit::FromExtension)
        .backend(common::fake_memory())
        .build();
    let app = axum::Router::new()
        .route("/v1/account", axum::routing::post(|| async { "{}" }))
        .layer(layer)
        .layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
                let user = req.headers()["x-user"].to_str().unwrap().to_owned();
                let org = req.headers()["x-org"].to_str().unwrap().to_owned();
                req.extensions_mut().insert(
                    tierlimit::extract::Identity::new(&user)
                        .with_tier(pro)
                        .with_account(&org),
                );
                next.run(req).await
            },
        ));
    let server = serve(app).await;
    let post = |user: &'static str, org: &'static str| {
        c.post(server.url("/v1/account"))
            .header("x-user", user)
            .header("x-org", org)
            .send()
    };
    for i in 0..6 {
        let user = if i % 2 == 0 { "u1" } else { "u2" };
        assert_eq!(post(user, "org-9").await.unwrap().status(), StatusCode::OK);
    }
    // pro's 6 writes per hour are org 9's, whichever user asks.
    assert_eq!(
        post("u3", "org-9").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(post("u1", "org-10").await.unwrap().status(), StatusCode::OK);

    // 2. A resolver for keys the table does not list: `org_<account>_<n>`.
    let resolver = tierlimit::ApiKey::new().resolve(move |key| {
        let account = key.strip_prefix("org_")?.split('_').next()?;
        Some((pro, Some(tierlimit::key::KeyId::of_account(account))))
    });
    let layer = RateLimitLayer::builder(policy)
        .extractor(resolver)
        .backend(common::fake_memory())
        .build();
    let app = axum::Router::new()
        .route("/v1/account", axum::routing::post(|| async { "{}" }))
        .layer(layer);
    let server = serve(app).await;
    let url = server.url("/v1/account");
    for i in 0..6 {
        let key = if i % 2 == 0 {
            "org_umbrella_1"
        } else {
            "org_umbrella_2"
        };
        let res = call(&c, "POST", &url, key).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "x-ratelimit-remaining"), Some(5 - i));
    }
    let res = call(&c, "POST", &url, "org_umbrella_3").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        call(&c, "POST", &url, "org_wayne_1").await.status(),
        StatusCode::OK
    );
    // Unknown keys the resolver does not take stay unknown.
    assert_eq!(
        call(&c, "POST", &url, "nobody").await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_cost_above_any_limit_of_the_list_can_never_succeed() {
    let (server, _clock) = demo_server(HeaderOptions::default()).await;
    let c = client();
    // team's writes: 3 per key, 5 per account. A batch of 4 fits the
    // account's limit but never the key's: a 400 naming the limit of 3.
    let res = c
        .post(server.url("/v1/batch"))
        .header("X-API-Key", "team-a")
        .header("X-Batch-Size", "4")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:tierlimit:problem:cost-exceeds-limit");
    assert_eq!(
        (body["cost"].as_u64(), body["limit"].as_u64()),
        (Some(4), Some(3))
    );
    // A batch of 3 fits both, and takes 3 from each.
    let res = c
        .post(server.url("/v1/batch"))
        .header("X-API-Key", "team-a")
        .header("X-Batch-Size", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(named(&res), (Some(3), Some(0), Some(3600)));
    let res = call(&c, "POST", &server.url("/v1/clusters"), "team-b").await;
    assert_eq!(
        named(&res),
        (Some(5), Some(1), Some(3600)),
        "the account had 2 left"
    );
}
