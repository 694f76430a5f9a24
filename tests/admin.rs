//! The operator plane (issue 15) through real servers and a real client:
//! the admin API's keys, custom limits, boosts and usage checks; its
//! authorization and bad bodies; keys never in answers or logs; admin
//! changes over gRPC; the policy file watched under load; and, on a
//! private Redis, changes made through one instance enforced by the others
//! and by one started afterwards.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::time::Duration;

use serde_json::{Value, json};
use tierlimit::{MemoryBackend, Policy};

const TOKEN: &str = "admin-token-for-tests-0123456789";
/// A key no file lists; its text must never come back.
const NEW_KEY: &str = "sk-provisioned-7f3a9c1e5b";

fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
    common::logs::capture();
}

fn logs() -> String {
    common::logs::text()
}

/// The demo app with the admin API, on the spec's policy and memory.
async fn demo_server() -> common::Server {
    setup();
    let layer = demo::limits(common::spec_policy(), MemoryBackend::new());
    common::serve(demo::app_with_admin(layer, Some(TOKEN))).await
}

/// An admin request; returns the status and the body (JSON or text).
async fn admin(
    s: &common::Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let c = common::client();
    let mut req = c.request(method.parse().unwrap(), s.url(&format!("/admin/v1{path}")));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = format!("{:?}", res.headers());
    let text = res.text().await.unwrap();
    assert!(
        !text.contains(NEW_KEY) && !headers.contains(NEW_KEY),
        "a key came back: {text}"
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn ok(s: &common::Server, method: &str, path: &str, body: Value) -> Value {
    let (status, v) = admin(s, method, path, Some(TOKEN), Some(body)).await;
    assert!(
        status == 200 || status == 201,
        "{method} {path}: {status} {v}"
    );
    v
}

/// `PUT /keys`: `key` in `tier`, which must succeed.
async fn put_key(s: &common::Server, key: &str, tier: &str) -> Value {
    ok(s, "PUT", "/keys", json!({ "key": key, "tier": tier })).await
}

/// The new key's `write` limited to 3 an hour, which must succeed.
async fn limit_new_key_writes(s: &common::Server) -> Value {
    ok(
        s,
        "PUT",
        "/limits",
        json!({ "key": NEW_KEY, "category": "write", "limit": "3/hour" }),
    )
    .await
}

/// A boost of the new key's `read`, active for an hour from now.
async fn boost_new_key(s: &common::Server, adjust: &str) -> Value {
    let now = common::unix_now();
    let body = json!({ "key": NEW_KEY, "category": "read", "adjust": adjust, "start": now - 1, "end": now + 3600 });
    ok(s, "POST", "/boosts", body).await
}

/// A request with one header (`name: value`) and a raw body.
async fn send(
    method: reqwest::Method,
    url: String,
    header: (&str, String),
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    common::client()
        .request(method, url)
        .header(header.0, header.1)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// `method /v1/account` as `key`: its status and `X-RateLimit-Limit`.
async fn account(s: &common::Server, method: reqwest::Method, key: &str) -> (u16, Option<u64>) {
    let res = send(
        method,
        s.url("/v1/account"),
        ("x-api-key", key.to_owned()),
        "",
    )
    .await;
    let limit = res
        .headers()
        .get("x-ratelimit-limit")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (res.status().as_u16(), limit)
}

/// `GET /v1/account` (read) as `key`: its status and `X-RateLimit-Limit`.
async fn read(s: &common::Server, key: &str) -> (u16, Option<u64>) {
    account(s, reqwest::Method::GET, key).await
}

/// `PATCH /v1/account` (write) as `key`: its `X-RateLimit-Limit`.
async fn write_limit(s: &common::Server, key: &str) -> Option<u64> {
    let (status, limit) = account(s, reqwest::Method::PATCH, key).await;
    assert_eq!(status, 200);
    limit
}

#[tokio::test]
async fn admin_requests_need_a_token_and_bad_bodies_name_the_field() {
    let s = demo_server().await;
    let put = json!({ "key": NEW_KEY, "tier": "pro" });
    // No token, not a bearer token, a wrong token.
    let (status, v) = admin(&s, "PUT", "/keys", None, Some(put.clone())).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["type"], "urn:tierlimit:problem:admin-unauthorized");
    let res = send(
        reqwest::Method::PUT,
        s.url("/admin/v1/keys"),
        ("authorization", format!("Basic {TOKEN}")),
        put.to_string(),
    )
    .await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let (status, _) = admin(
        &s,
        "PUT",
        "/keys",
        Some("admin-token-for-tests-012345678X"),
        Some(put.clone()),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = admin(&s, "PUT", "/keys", Some(""), Some(put.clone())).await;
    assert!(status == 401 || status == 403);
    // Nothing was provisioned by those.
    assert_eq!(read(&s, NEW_KEY).await.0, 401);

    // Bad bodies: a 400 naming the field, never the key.
    for (method, path, body, says) in [
        (
            "PUT",
            "/keys",
            json!({ "key": NEW_KEY }),
            "field `tier` is missing",
        ),
        (
            "PUT",
            "/keys",
            json!({ "key": NEW_KEY, "tier": "gold" }),
            "field `tier`: unknown tier `gold`",
        ),
        (
            "PUT",
            "/keys",
            json!({ "key": "has a space", "tier": "pro" }),
            "field `key`",
        ),
        (
            "PUT",
            "/keys",
            json!({ "key": 7, "tier": "pro" }),
            "field `key` must be a string",
        ),
        (
            "PUT",
            "/keys",
            json!({ "key": NEW_KEY, "tier": "pro", "plan": "x" }),
            "unknown field `plan`",
        ),
        (
            "PUT",
            "/keys",
            json!({ "key": NEW_KEY, "tier": "pro", "account": "" }),
            "field `account`",
        ),
        (
            "PUT",
            "/limits",
            json!({ "key": NEW_KEY, "category": "write", "limit": "3/fortnight" }),
            "field `limit`",
        ),
        (
            "PUT",
            "/limits",
            json!({ "key": NEW_KEY, "category": "writes", "limit": "3/hour" }),
            "field `category`: unknown category `writes`",
        ),
        (
            "PUT",
            "/limits",
            json!({ "key": NEW_KEY, "category": "write" }),
            "field `limit` is missing",
        ),
        (
            "POST",
            "/boosts",
            json!({ "tier": "pro", "adjust": "x2", "start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z" }),
            "field `end`: a boost ends after it starts",
        ),
        (
            "POST",
            "/boosts",
            json!({ "tier": "pro", "adjust": "x2", "start": 0, "end": 10 }),
            "already ended",
        ),
        (
            "POST",
            "/boosts",
            json!({ "tier": "pro", "adjust": "x2", "start": "yesterday", "end": 10 }),
            "field `start`",
        ),
        (
            "POST",
            "/boosts",
            json!({ "key": NEW_KEY, "tier": "pro", "adjust": "x2", "start": 0, "end": 4102444800u64 }),
            "one of `key`, `tier`, `account` or `org`",
        ),
        (
            "POST",
            "/boosts",
            json!({ "tier": "pro", "start": 0, "end": 4102444800u64 }),
            "field `adjust` is missing",
        ),
        ("POST", "/usage", json!({}), "field `key` is missing"),
    ] {
        let (status, v) = admin(&s, method, path, Some(TOKEN), Some(body)).await;
        assert_eq!(status, 400, "{method} {path}: {v}");
        assert_eq!(v["type"], "urn:tierlimit:problem:admin-bad-request");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{method} {path}: {detail}");
    }
    // Not JSON, not an object, too large.
    for (body, status) in [
        ("{\"key\": ".to_owned(), 400),
        ("[1, 2]".to_owned(), 400),
        (format!("{{\"key\": \"{}\"}}", "a".repeat(70_000)), 413),
    ] {
        let bearer = ("authorization", format!("Bearer {TOKEN}"));
        let res = send(reqwest::Method::PUT, s.url("/admin/v1/keys"), bearer, body).await;
        assert_eq!(res.status().as_u16(), status);
    }
    // Unknown resources and methods.
    assert_eq!(admin(&s, "GET", "/nope", Some(TOKEN), None).await.0, 404);
    let bearer = ("authorization", format!("Bearer {TOKEN}"));
    let res = send(
        reqwest::Method::PATCH,
        s.url("/admin/v1/keys"),
        bearer,
        put.to_string(),
    )
    .await;
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "PUT, DELETE");
    assert_eq!(
        admin(&s, "DELETE", "/boosts/0123456789abcdef", Some(TOKEN), None)
            .await
            .0,
        404
    );
    // Without an admin token the demo has no admin routes at all.
    let plain = common::serve(demo::app(demo::limits(
        common::spec_policy(),
        MemoryBackend::new(),
    )))
    .await;
    // (As any unknown route of the demo: found by no route, after the
    // layer has identified the caller.)
    let key = ("x-api-key", "free-demo-key".to_owned());
    let res = send(
        reqwest::Method::PUT,
        plain.url("/admin/v1/keys"),
        key,
        put.to_string(),
    )
    .await;
    let status = res.status();
    assert_eq!(status, 404, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn keys_limits_boosts_and_usage_through_the_admin_api() {
    let s = demo_server().await;
    // Provision a key in free; then upgrade it to pro.
    assert_eq!(read(&s, NEW_KEY).await.0, 401);
    let v = put_key(&s, NEW_KEY, "free").await;
    assert_eq!(v["tier"], "free");
    assert!(v["key"].as_str().unwrap().starts_with("key:"), "{v}");
    assert_eq!(read(&s, NEW_KEY).await, (200, Some(100)));
    ok(
        &s,
        "PUT",
        "/keys",
        json!({ "key": NEW_KEY, "tier": "pro", "account": "acme" }),
    )
    .await;
    assert_eq!(read(&s, NEW_KEY).await, (200, Some(1000)));
    // A custom limit on write (the resource's name, `custom-limits`; the
    // rest of this test uses its short one, `limits`), then every category
    // x5, then removed.
    ok(
        &s,
        "PUT",
        "/custom-limits",
        json!({ "key": NEW_KEY, "category": "write", "limit": "3/hour" }),
    )
    .await;
    assert_eq!(write_limit(&s, NEW_KEY).await, Some(3));
    assert_eq!(
        read(&s, NEW_KEY).await.1,
        Some(1000),
        "other categories untouched"
    );
    ok(
        &s,
        "PUT",
        "/limits",
        json!({ "key": NEW_KEY, "category": "*", "limit": "x5" }),
    )
    .await;
    assert_eq!(read(&s, NEW_KEY).await.1, Some(5000));
    ok(
        &s,
        "DELETE",
        "/limits",
        json!({ "key": NEW_KEY, "category": "write" }),
    )
    .await;
    ok(
        &s,
        "DELETE",
        "/limits",
        json!({ "key": NEW_KEY, "category": "*" }),
    )
    .await;
    assert_eq!(write_limit(&s, NEW_KEY).await, Some(200));
    // A list is a custom limit too.
    ok(
        &s,
        "PUT",
        "/limits",
        json!({ "key": NEW_KEY, "category": "write", "limit": ["2/second", "7/hour"] }),
    )
    .await;
    assert_eq!(write_limit(&s, NEW_KEY).await, Some(2));
    ok(
        &s,
        "DELETE",
        "/limits",
        json!({ "key": NEW_KEY, "category": "write" }),
    )
    .await;
    // A boost for the key, active now: listed (key redacted), then removed.
    let v = boost_new_key(&s, "x2").await;
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(read(&s, NEW_KEY).await.1, Some(2000));
    let (_, list) = admin(&s, "GET", "/boosts", Some(TOKEN), None).await;
    let boosts = list["boosts"].as_array().unwrap();
    assert_eq!(boosts.len(), 1, "{list}");
    assert_eq!(boosts[0]["id"], id.as_str());
    assert_eq!(boosts[0]["adjust"], "x2");
    // A tier boost with RFC 3339 times, in the future: listed, not active.
    ok(
        &s,
        "POST",
        "/boosts",
        json!({ "tier": "free", "adjust": "unlimited", "start": "2099-01-01T00:00:00Z", "end": "2099-01-02T00:00:00Z" }),
    )
    .await;
    assert_eq!(read(&s, "free-demo-key").await.1, Some(100));
    ok(&s, "DELETE", &format!("/boosts/{id}"), json!({})).await;
    assert_eq!(read(&s, NEW_KEY).await.1, Some(1000));
    let (_, list) = admin(&s, "GET", "/boosts", Some(TOKEN), None).await;
    assert_eq!(list["boosts"].as_array().unwrap().len(), 1);
    // Usage, counting nothing.
    let before = ok(&s, "POST", "/usage", json!({ "key": NEW_KEY })).await;
    let after = ok(&s, "POST", "/usage", json!({ "key": NEW_KEY })).await;
    assert_eq!(before["tier"], "pro");
    assert_eq!(
        before["categories"]["read"]["remaining"],
        after["categories"]["read"]["remaining"]
    );
    let (status, _) = admin(
        &s,
        "POST",
        "/usage",
        Some(TOKEN),
        Some(json!({ "key": "not-listed-key" })),
    )
    .await;
    assert_eq!(status, 404);
    // Revoked: a 401, and a 404 for its usage.
    ok(&s, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
    assert_eq!(read(&s, NEW_KEY).await.0, 401);
    let (status, _) = admin(
        &s,
        "POST",
        "/usage",
        Some(TOKEN),
        Some(json!({ "key": NEW_KEY })),
    )
    .await;
    assert_eq!(status, 404);
    // A key of the file revoked, then provisioned again.
    ok(&s, "DELETE", "/keys", json!({ "key": "free-demo-key" })).await;
    assert_eq!(read(&s, "free-demo-key").await.0, 401);
    put_key(&s, "free-demo-key", "free").await;
    assert_eq!(read(&s, "free-demo-key").await.0, 200);
    // The audit trail: who, what, the key redacted — never its text.
    let logs = logs();
    assert!(logs.contains("tierlimit::audit"), "{logs}");
    assert!(
        logs.contains("who=\"admin\"") || logs.contains("who=admin"),
        "{logs}"
    );
    assert!(
        logs.contains("action=\"revoke_key\"") || logs.contains("action=revoke_key"),
        "{logs}"
    );
    assert!(!logs.contains(NEW_KEY), "a key in the logs");
}

#[tokio::test]
async fn unknown_keys_accepted_as_guests_stay_refused_once_revoked() {
    setup();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap()
            .replacen("unknown_key = \"reject\"", "unknown_key = \"free\"", 1);
    let layer = demo::limits(Policy::from_toml_str(&text).unwrap(), MemoryBackend::new());
    let s = common::serve(demo::app_with_admin(layer, Some(TOKEN))).await;
    assert_eq!(read(&s, NEW_KEY).await.0, 200, "a guest");
    ok(&s, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
    assert_eq!(read(&s, NEW_KEY).await.0, 401, "revoked, not a guest");
}

/// Admin changes apply to gRPC callers as well: the same layer.
#[tokio::test]
async fn a_key_revoked_through_the_admin_api_is_unauthenticated_over_grpc() {
    setup();
    let layer = tierlimit::RateLimitLayer::builder(common::spec_policy())
        .backend(MemoryBackend::new())
        .build();
    let s = common::serve(
        axum::Router::new().nest_service("/admin/v1", layer.admin_service().token("ops", TOKEN)),
    )
    .await;
    let health = tonic::service::Routes::new(tonic_health::server::health_reporter().1);
    let server = common::serve_grpc(layer.clone(), health).await;
    let addr = server.addr;
    let check = async |key: &str| {
        let channel = common::grpc_channel(addr).await;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(common::health_check(key))
            .await
            .map(drop)
            .map_err(|s| s.code())
    };
    assert_eq!(check(NEW_KEY).await, Err(tonic::Code::Unauthenticated));
    put_key(&s, NEW_KEY, "free").await;
    assert_eq!(check(NEW_KEY).await, Ok(()));
    ok(&s, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
    assert_eq!(check(NEW_KEY).await, Err(tonic::Code::Unauthenticated));
    drop(server);
}

#[cfg(feature = "watch")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_file_is_watched_atomically_and_a_broken_file_changes_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    setup();
    let original =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap();
    let dir = std::env::temp_dir().join(format!("tierlimit-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, &original).unwrap();
    let layer = demo::limits(Policy::from_toml_file(&path).unwrap(), MemoryBackend::new());
    let handle = layer.policy_handle();
    let watcher = handle.watch(&path).unwrap();
    let s = common::serve(demo::app_with_admin(layer, Some(TOKEN))).await;
    // An admin change, layered over the file: it must survive reloads.
    put_key(&s, NEW_KEY, "pro").await;
    // Under load: every answer is the whole old table or the whole new one
    // (free reads 100 → 7 and writes 20 → 3, in one file).
    let stop = Arc::new(AtomicBool::new(false));
    let url = s.url("");
    let load = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let c = common::client();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let res = c
                    .get(format!("{url}/v1/rate_limit"))
                    .header("x-api-key", "free-demo-key")
                    .send()
                    .await
                    .unwrap();
                let v: Value = res.json().await.unwrap();
                let pair = (
                    v["categories"]["read"]["limit"].as_u64().unwrap(),
                    v["categories"]["write"]["limit"].as_u64().unwrap(),
                );
                seen.push(pair);
            }
            seen
        })
    };
    let changed = original
        .replacen("read = \"100/hour\"", "read = \"7/hour\"", 1)
        .replacen("write = \"20/hour\"", "write = \"3/hour\"", 1);
    std::fs::write(&path, &changed).unwrap();
    let mut reloads = 0;
    for _ in 0..1_000 {
        reloads = watcher.reloads();
        if reloads >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reloads, 1, "the change was reloaded once");
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    assert!(!seen.is_empty());
    for pair in &seen {
        assert!(
            *pair == (100, 20) || *pair == (7, 3),
            "a mixed policy: {pair:?}"
        );
    }
    assert_eq!(read(&s, "free-demo-key").await.1, Some(7));
    assert_eq!(
        read(&s, NEW_KEY).await.1,
        Some(1000),
        "the admin's key survived"
    );
    // A broken file: logged with its entry and line; nothing changes.
    std::fs::write(
        &path,
        changed.replacen("read = \"7/hour\"", "read = \"7/fortnight\"", 1),
    )
    .unwrap();
    let mut errors = 0;
    for _ in 0..1_000 {
        errors = watcher.errors();
        if errors >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(errors, 1);
    let e = watcher.last_error().unwrap();
    assert!(e.contains("tiers.free.read") && e.contains("line"), "{e}");
    assert_eq!(read(&s, "free-demo-key").await.1, Some(7));
    assert_eq!(watcher.reloads(), 1);
    assert!(logs().contains("policy file invalid"));
    drop(watcher);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, ready};
    use tierlimit::RedisBackend;

    /// A demo instance on `server`, sharing operator state through it.
    async fn instance(server: &RedisServer) -> common::Server {
        instance_on(RedisBackend::builder(server.url())).await
    }

    /// A demo instance on the Redis `builder` names, sharing operator
    /// state through it.
    async fn instance_on(builder: tierlimit::backend::RedisBackendBuilder) -> common::Server {
        let layer = common::redis::sharing_operator_state(builder, Duration::from_secs(2), |b| {
            demo::limits(common::spec_policy(), b)
        })
        .await;
        common::serve(demo::app_with_admin(layer, Some(TOKEN))).await
    }

    /// Polls `probe` until it gives `want` (bounded: the instances poll
    /// the store every 200 ms); the time it took, for the record.
    async fn until<T: PartialEq + std::fmt::Debug>(
        what: &str,
        want: T,
        mut probe: impl AsyncFnMut() -> T,
    ) -> Duration {
        let start = std::time::Instant::now();
        let mut got = probe().await;
        for _ in 0..500 {
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            got = probe().await;
        }
        assert_eq!(got, want, "{what}");
        let took = start.elapsed();
        println!("{what}: applied after {took:?}");
        took
    }

    /// Every one of `servers` refuses the (revoked) new key, soon.
    async fn refused_everywhere(servers: &[(&str, &common::Server)]) {
        for (name, s) in servers {
            let what = format!("{name} refuses the revoked key");
            until(&what, 401, async || read(s, NEW_KEY).await.0).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn changes_through_one_instance_reach_the_others_and_new_ones() {
        if !ready() {
            return;
        }
        setup();
        let server = RedisServer::start();
        let a = instance(&server).await;
        let b = instance(&server).await;
        // Provisioned through A: B accepts the key.
        put_key(&a, NEW_KEY, "pro").await;
        until("B accepts the new key", (200, Some(1000)), async || {
            read(&b, NEW_KEY).await
        })
        .await;
        // A custom limit and a boost set through A: B enforces them.
        limit_new_key_writes(&a).await;
        until("B enforces the custom limit", Some(3), async || {
            write_limit(&b, NEW_KEY).await
        })
        .await;
        let boost = boost_new_key(&a, "x3").await;
        until("B enforces the boost", (200, Some(3000)), async || {
            read(&b, NEW_KEY).await
        })
        .await;
        // B lists the boost A granted.
        let (_, list) = admin(&b, "GET", "/boosts", Some(TOKEN), None).await;
        assert_eq!(list["boosts"][0]["id"], boost["id"]);
        // Every change was published on the admin channel (from the
        // write script: Redis counts the commands scripts call).
        assert!(server.command_calls("publish") >= 3, "published");
        // A third instance, started now, has all of it at start.
        let c = instance(&server).await;
        assert_eq!(read(&c, NEW_KEY).await, (200, Some(3000)));
        assert_eq!(write_limit(&c, NEW_KEY).await, Some(3));
        // Revoked through B: a 401 on every instance.
        ok(&b, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
        refused_everywhere(&[("A", &a), ("B", &b), ("C", &c)]).await;
        // Its boost went with it.
        let (_, list) = admin(&c, "GET", "/boosts", Some(TOKEN), None).await;
        assert_eq!(list["boosts"].as_array().unwrap().len(), 0, "{list}");
        // Every instance restarted: the state is in Redis.
        drop((a, b, c));
        let d = instance(&server).await;
        assert_eq!(read(&d, NEW_KEY).await.0, 401);
        put_key(&d, NEW_KEY, "free").await;
        assert_eq!(read(&d, NEW_KEY).await, (200, Some(100)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn changes_reach_every_instance_on_a_cluster() {
        if !ready() {
            return;
        }
        setup();
        let cluster = RedisCluster::start();
        let a = instance_on(RedisBackend::cluster(cluster.urls())).await;
        let b = instance_on(RedisBackend::cluster(cluster.urls())).await;
        put_key(&a, NEW_KEY, "pro").await;
        limit_new_key_writes(&a).await;
        until(
            "B on the cluster accepts the key",
            (200, Some(1000)),
            async || read(&b, NEW_KEY).await,
        )
        .await;
        until(
            "B on the cluster enforces the custom limit",
            Some(3),
            async || write_limit(&b, NEW_KEY).await,
        )
        .await;
        let c = instance_on(RedisBackend::cluster(cluster.urls())).await;
        assert_eq!(write_limit(&c, NEW_KEY).await, Some(3));
        ok(&c, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
        refused_everywhere(&[("A", &a), ("B", &b), ("C", &c)]).await;
    }

    /// A key revoked in the tests below; its text must never reach Redis.
    const REVOKED_KEY: &str = "sk-revoked-2b8d4e6f0a";

    /// Everything Redis holds, as text: every key's name and its contents
    /// (hashes' fields and values, strings, lists, sets, sorted sets).
    fn redis_dump(server: &RedisServer) -> String {
        let names = server.cli(&["--scan"]).unwrap();
        let mut dump = String::new();
        for name in names.lines().filter(|n| !n.is_empty()) {
            let kind = server.cli(&["TYPE", name]).unwrap();
            let contents = match kind.trim() {
                "hash" => server.cli(&["HGETALL", name]),
                "string" => server.cli(&["GET", name]),
                "list" => server.cli(&["LRANGE", name, "0", "-1"]),
                "set" => server.cli(&["SMEMBERS", name]),
                "zset" => server.cli(&["ZRANGE", name, "0", "-1", "WITHSCORES"]),
                other => Some(format!("({other})")),
            };
            dump.push_str(&format!(
                "{name} {kind}\n{}\n",
                contents.unwrap_or_default()
            ));
        }
        dump
    }

    /// Asserts no raw key is anywhere in Redis.
    fn no_raw_key_in(server: &RedisServer) {
        let dump = redis_dump(server);
        assert!(dump.contains("{admin}:state"), "the state is there: {dump}");
        for key in [NEW_KEY, REVOKED_KEY, "free-demo-key"] {
            assert!(
                !dump.contains(key),
                "`{key}` is in Redis in plain text:\n{dump}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn operator_state_holds_no_raw_key_and_another_instance_enforces_it() {
        if !ready() {
            return;
        }
        setup();
        let server = RedisServer::start();
        let a = instance(&server).await;
        put_key(&a, NEW_KEY, "pro").await;
        limit_new_key_writes(&a).await;
        boost_new_key(&a, "x3").await;
        // A provisioned key revoked, and a key of the file revoked.
        put_key(&a, REVOKED_KEY, "free").await;
        ok(&a, "DELETE", "/keys", json!({ "key": REVOKED_KEY })).await;
        ok(&a, "DELETE", "/keys", json!({ "key": "free-demo-key" })).await;
        // Requests through A leave their buckets in Redis too.
        assert_eq!(read(&a, NEW_KEY).await, (200, Some(3000)));
        no_raw_key_in(&server);
        // A second instance, started now, enforces all of it.
        let b = instance(&server).await;
        assert_eq!(read(&b, NEW_KEY).await, (200, Some(3000)));
        assert_eq!(write_limit(&b, NEW_KEY).await, Some(3));
        assert_eq!(read(&b, REVOKED_KEY).await.0, 401);
        assert_eq!(read(&b, "free-demo-key").await.0, 401);
        let (_, list) = admin(&b, "GET", "/boosts", Some(TOKEN), None).await;
        assert_eq!(list["boosts"].as_array().unwrap().len(), 1, "{list}");
        assert!(
            list["boosts"][0]["key"]
                .as_str()
                .unwrap()
                .starts_with("key:")
        );
        no_raw_key_in(&server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_state_with_raw_keys_is_rewritten_hashed_when_an_instance_starts() {
        if !ready() {
            return;
        }
        setup();
        let server = RedisServer::start();
        // The previous version's fields: raw keys in names and values.
        let now = common::unix_now();
        let boost = json!({ "key": NEW_KEY, "tier": null, "category": "read", "adjust": "x3", "start": now - 1, "end": now + 3600 });
        let fields = [
            (
                json!(["key", NEW_KEY]),
                json!({ "tier": "pro", "account": null }),
            ),
            (
                json!(["limit", NEW_KEY, "write"]),
                json!({ "limit": "3/hour" }),
            ),
            (json!(["boost", "00000000000000aa"]), boost),
            (json!(["key", REVOKED_KEY]), json!({ "revoked": true })),
            (json!(["key", "free-demo-key"]), json!({ "revoked": true })),
        ];
        for (field, value) in &fields {
            let (field, value) = (field.to_string(), value.to_string());
            let state = "tierlimit:{admin}:state";
            server.cli(&["HSET", state, &field, &value]).unwrap();
        }
        server
            .cli(&["SET", "tierlimit:{admin}:version", "5"])
            .unwrap();
        let a = instance(&server).await;
        // In force from the first request.
        assert_eq!(read(&a, NEW_KEY).await, (200, Some(3000)));
        assert_eq!(write_limit(&a, NEW_KEY).await, Some(3));
        assert_eq!(read(&a, REVOKED_KEY).await.0, 401);
        assert_eq!(read(&a, "free-demo-key").await.0, 401);
        let (_, list) = admin(&a, "GET", "/boosts", Some(TOKEN), None).await;
        assert_eq!(list["boosts"][0]["id"], "00000000000000aa", "{list}");
        // Rewritten: one field each, none of them a raw key.
        let count = server.cli(&["HLEN", "tierlimit:{admin}:state"]).unwrap();
        assert_eq!(count.trim(), "5");
        no_raw_key_in(&server);
        // Another instance reads the rewritten state.
        let b = instance(&server).await;
        assert_eq!(read(&b, NEW_KEY).await.1, Some(3000));
        assert_eq!(write_limit(&b, NEW_KEY).await, Some(3));
        assert_eq!(read(&b, REVOKED_KEY).await.0, 401);
        // Changes after the rewrite replace the rewritten fields.
        ok(&b, "DELETE", "/keys", json!({ "key": NEW_KEY })).await;
        refused_everywhere(&[("A", &a), ("B", &b)]).await;
        let count = server.cli(&["HLEN", "tierlimit:{admin}:state"]).unwrap();
        assert_eq!(count.trim(), "3", "the key's limit and boost went with it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ended_boosts_leave_the_shared_store_by_themselves() {
        if !ready() {
            return;
        }
        setup();
        let server = RedisServer::start();
        let unix = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(common::unix_now()));
        let u = std::sync::Arc::clone(&unix);
        let layer = common::redis::sharing_operator_state(
            RedisBackend::builder(server.url()),
            Duration::from_secs(2),
            |backend| {
                tierlimit::RateLimitLayer::builder(common::spec_policy())
                    .extractor(demo::demo_extractor as demo::DemoExtractor)
                    .backend(backend)
                    .unix_clock(move || u.load(std::sync::atomic::Ordering::Relaxed))
                    .build()
            },
        )
        .await;
        let s = common::serve(demo::app_with_admin(layer, Some(TOKEN))).await;
        let now = unix.load(std::sync::atomic::Ordering::Relaxed);
        ok(
            &s,
            "POST",
            "/boosts",
            json!({ "tier": "free", "adjust": "x2", "start": now, "end": now + 100 }),
        )
        .await;
        assert_eq!(read(&s, "free-demo-key").await.1, Some(200));
        let fields = || server.cli(&["HLEN", "tierlimit:{admin}:state"]).unwrap();
        assert_eq!(fields().trim(), "1");
        // The boost ends: the instance removes it from Redis by itself.
        unix.store(now + 101, std::sync::atomic::Ordering::Relaxed);
        until("the ended boost leaves Redis", "0".to_owned(), async || {
            fields().trim().to_owned()
        })
        .await;
        assert_eq!(read(&s, "free-demo-key").await.1, Some(100));
    }
}

#[tokio::test]
async fn two_authorization_headers_are_a_400_whichever_token_is_valid() {
    let s = demo_server().await;
    let put = json!({ "key": NEW_KEY, "tier": "pro" }).to_string();
    let valid = format!("Bearer {TOKEN}");
    let wrong = "Bearer admin-token-for-tests-012345678X".to_owned();
    let mut answers = Vec::new();
    for pair in [
        [valid.clone(), wrong.clone()],
        [wrong.clone(), valid.clone()],
        [valid.clone(), valid.clone()],
        [wrong.clone(), wrong.clone()],
    ] {
        let res = common::client()
            .put(s.url("/admin/v1/keys"))
            .header("authorization", &pair[0])
            .header("authorization", &pair[1])
            .header("content-type", "application/json")
            .body(put.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{pair:?}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{pair:?}"
        );
        let problem: Value = res.json().await.unwrap();
        assert_eq!(
            problem["type"], "urn:tierlimit:problem:admin-ambiguous-credentials",
            "{problem}"
        );
        assert!(
            problem["detail"].as_str().unwrap().contains("ambiguous"),
            "{problem}"
        );
        answers.push(problem);
    }
    // The same answer whichever (if any) of the two is valid: nothing is
    // told about either token.
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    // Nothing was provisioned; one header still works.
    assert_eq!(read(&s, NEW_KEY).await.0, 401);
    put_key(&s, NEW_KEY, "pro").await;
    assert_eq!(read(&s, NEW_KEY).await.0, 200);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    setup();
    // A short timeout so the test does not wait 10 s; it asserts only the
    // answer, never how long it took.
    let layer = demo::limits(common::spec_policy(), MemoryBackend::new());
    let admin = layer
        .admin_service()
        .token("admin", TOKEN)
        .body_timeout(Duration::from_millis(50));
    let s = common::serve(demo::app(layer).nest_service("/admin/v1", admin)).await;

    // Headers and part of a body, then nothing more: Content-Length
    // promises 1,000 bytes.
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "PUT /admin/v1/keys HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"key\": \"{NEW_KEY}\", ",
        s.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        // Until the whole problem document has come (or the connection
        // closes).
        while !String::from_utf8_lossy(&buf).contains("\"}") {
            let n = tcp.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(buf).unwrap()
    })
    .await
    .expect("an answer within 10 s");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.contains("urn:tierlimit:problem:admin-request-timeout"),
        "{answer}"
    );
    assert!(!answer.contains(NEW_KEY), "{answer}");
    drop(tcp);
    // Nothing changed; a body sent at once is read as before.
    assert_eq!(read(&s, NEW_KEY).await.0, 401);
    put_key(&s, NEW_KEY, "pro").await;
    assert_eq!(read(&s, NEW_KEY).await.0, 200);
}
