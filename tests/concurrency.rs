//! Concurrency limits (issue 14) through real servers and real clients:
//! exactly N in flight at once on memory, Redis and Redis Cluster (two
//! instances sharing one limit), leases freed by a client that goes away,
//! by a handler panic caught by an outer layer, by a body that ends, and by
//! a gRPC stream the client cancels; the leases of a crashed instance
//! expire after their TTL, and a long request's renewal keeps them.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod grpc_demo;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing;
use serde_json::Value;
use tierlimit::{MemoryBackend, Policy, RateLimitLayer, backend::Backend};
use tokio::sync::watch;

/// Concurrency limits in every form: per key with a rate limit, alone,
/// and per account.
const POLICY: &str = r#"
categories = ["read", "write", "ai", "training"]

[tiers.free]
read = { requests = "1000/hour", concurrency = 5 }
write = "1000/hour"
ai = { requests = "1000/hour", concurrency = 1 }
training = { concurrency = 1 }

[tiers.pro]
read = "1000/hour"
write = "1000/hour"
ai = "1000/hour"
training = "unlimited"

[tiers.pro.per_account]
read = { concurrency = 3 }

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

[[grpc]]
service = "demo.v1.Inference"
category = "ai"

[keys]
"free-demo-key" = "free"
"free-other" = "free"
"acme-1" = { tier = "pro", account = "acme" }
"acme-2" = { tier = "pro", account = "acme" }
"#;

/// The policy, with the Redis tests' key secret set first (keys are
/// hashed when a policy is built; every test of this binary hashes alike).
fn policy() -> Policy {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
    Policy::from_toml_str(POLICY).unwrap()
}

/// Handlers that wait until the test opens the gate.
#[derive(Clone)]
struct Gate {
    open: watch::Sender<bool>,
    entered: Arc<AtomicUsize>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            open: watch::channel(false).0,
            entered: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn wait(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A test app: `GET /v1/clusters` waits for the gate, `GET /v1/stream`
/// answers at once with a body that ends when the gate opens, `GET
/// /v1/panic` panics (caught by `CatchPanicLayer` outside the limits).
fn gated_app<B: Backend>(layer: RateLimitLayer<tierlimit::ApiKey, B>, gate: &Gate) -> Router {
    let (g1, g2) = (gate.clone(), gate.clone());
    let api = Router::new()
        .route(
            "/v1/clusters",
            routing::get(move || {
                let g = g1.clone();
                async move {
                    g.wait().await;
                    "done"
                }
            }),
        )
        .route(
            "/v1/stream",
            routing::get(move || {
                let g = g2.clone();
                async move {
                    let chunks = futures_util::stream::unfold(0, move |i| {
                        let g = g.clone();
                        async move {
                            match i {
                                0 => Some((Ok::<_, std::io::Error>("first\n"), 1)),
                                1 => {
                                    g.wait().await;
                                    Some((Ok("last\n"), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    Body::from_stream(chunks)
                }
            }),
        )
        .route(
            "/v1/panic",
            routing::get(|| async {
                if true {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
        .route_service("/v1/rate_limit", layer.usage_service())
        .layer(layer);
    api.layer(tower_http::catch_panic::CatchPanicLayer::new())
}

/// The layer on a memory backend.
fn memory_layer() -> RateLimitLayer {
    RateLimitLayer::builder(policy())
        .backend(MemoryBackend::new())
        .build()
}

/// A gated app on a memory backend, served.
async fn gated_server() -> (common::Server, Gate) {
    let gate = Gate::new();
    let s = common::serve(gated_app(memory_layer(), &gate)).await;
    (s, gate)
}

/// `GET url` as `key`.
async fn get(url: impl reqwest::IntoUrl, key: &str) -> reqwest::Response {
    common::client()
        .get(url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

/// `POST url` as `key`.
async fn post(url: impl reqwest::IntoUrl, key: &str) -> reqwest::Response {
    common::client()
        .post(url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

/// The `category`'s usage for `key` through the usage endpoint.
async fn usage(url: &str, key: &str, category: &str) -> Value {
    let res = get(format!("{url}/v1/rate_limit"), key).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["categories"][category].clone()
}

/// Requests of `category` in flight for `key`, once they equal `want`
/// (releases happen when the server sees a body end or a connection
/// close: wait for that event, boundedly).
async fn in_flight_once(url: &str, key: &str, category: &str, want: u64) -> u64 {
    let mut n = u64::MAX;
    for _ in 0..500 {
        n = usage(url, key, category).await["concurrency"]["in_flight"]
            .as_u64()
            .expect("a concurrency limit in the usage");
        if n == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    n
}

/// 50 concurrent slow requests of one key, spread over `urls` (instances
/// sharing one limit of 5): exactly 5 are admitted and held, 45 are
/// refused for concurrency at once; when the 5 end, their leases are free.
async fn fifty_against_five(urls: &[String], gate: &Gate) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..50 {
        let url = format!("{}/v1/clusters", urls[i % urls.len()]);
        set.spawn(async move {
            let res = get(url, "free-demo-key").await;
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body = res.text().await.unwrap();
            (status, headers, body)
        });
    }
    // The 45 refusals come back while the admitted 5 wait at the gate; if
    // more than 5 were admitted, fewer than 45 could come back.
    let mut refused = 0;
    while refused < 45 {
        let next = tokio::time::timeout(Duration::from_secs(30), set.join_next())
            .await
            .expect("45 refusals while 5 requests are held")
            .unwrap()
            .unwrap();
        let (status, headers, body) = next;
        assert_eq!(status, 429, "only refusals before the gate opens: {body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            problem["type"], "urn:tierlimit:problem:concurrency-limited",
            "{problem}"
        );
        assert_eq!(problem["limit"], 5);
        assert_eq!(problem["in_flight"], 5);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(headers["x-concurrency-limit"], "5");
        assert_eq!(headers["x-concurrency-remaining"], "0");
        refused += 1;
    }
    assert_eq!(gate.entered.load(Ordering::SeqCst), 5, "5 handlers running");
    assert_eq!(
        in_flight_once(&urls[0], "free-demo-key", "read", 5).await,
        5
    );
    // A refusal for concurrency took no rate: 5 of 1000 are spent.
    let read = usage(&urls[0], "free-demo-key", "read").await;
    assert_eq!(read["remaining"], 995, "{read}");
    // Another key has its own 5.
    let other = usage(&urls[1 % urls.len()], "free-other", "read").await;
    assert_eq!(other["concurrency"]["in_flight"], 0, "{other}");
    gate.open();
    let mut ok = 0;
    while let Some(done) = set.join_next().await {
        let (status, headers, body) = done.unwrap();
        assert_eq!((status, body.as_str()), (200, "done"));
        assert_eq!(headers["x-concurrency-limit"], "5");
        ok += 1;
    }
    assert_eq!(ok, 5);
    assert_eq!(
        in_flight_once(&urls[0], "free-demo-key", "read", 0).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_five_of_fifty_at_once_on_memory() {
    // Two servers sharing one layer (one backend): two instances in one
    // process.
    let layer = memory_layer();
    let gate = Gate::new();
    let a = common::serve(gated_app(layer.clone(), &gate)).await;
    let b = common::serve(gated_app(layer, &gate)).await;
    fifty_against_five(&[a.url(""), b.url("")], &gate).await;
}

#[tokio::test]
async fn a_lease_is_held_until_the_body_ends() {
    let (s, gate) = gated_server().await;
    let mut held = Vec::new();
    for left in (0..5).rev() {
        let res = get(s.url("/v1/stream"), "free-demo-key").await;
        // The head is out, the body is not over: the lease is still held.
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-concurrency-remaining"], left.to_string());
        held.push(res);
    }
    let res = get(s.url("/v1/stream"), "free-demo-key").await;
    assert_eq!(res.status(), 429);
    gate.open();
    for res in held {
        assert_eq!(res.text().await.unwrap(), "first\nlast\n");
    }
    assert_eq!(
        in_flight_once(&s.url(""), "free-demo-key", "read", 0).await,
        0
    );
}

#[tokio::test]
async fn a_handler_panic_caught_outside_frees_its_lease() {
    let (s, _gate) = gated_server().await;
    // Ten panics in a row under a limit of 5: each one's lease comes back,
    // so every one reaches the handler (a 500 from CatchPanicLayer, never
    // a 429).
    for _ in 0..10 {
        let res = get(s.url("/v1/panic"), "free-demo-key").await;
        assert_eq!(res.status(), 500);
    }
    assert_eq!(
        in_flight_once(&s.url(""), "free-demo-key", "read", 0).await,
        0
    );
}

/// Through the demo server, as with curl: slow requests hold leases;
/// clients that go away free them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_frees_the_leases_of_clients_that_go_away() {
    let layer = demo::limits(policy(), MemoryBackend::new());
    let s = common::serve(demo::app(layer)).await;
    let url = s.url("");
    let c = common::client();
    // Five slow requests (ten seconds each) hold all five leases.
    let mut slow = Vec::new();
    for _ in 0..5 {
        let (c, url) = (c.clone(), url.clone());
        slow.push(tokio::spawn(async move {
            c.get(format!("{url}/v1/clusters?delay_ms=10000"))
                .header("x-api-key", "free-demo-key")
                .send()
                .await
        }));
    }
    assert_eq!(in_flight_once(&url, "free-demo-key", "read", 5).await, 5);
    let res = get(format!("{url}/v1/clusters"), "free-demo-key").await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tierlimit:problem:concurrency-limited");
    assert_eq!(problem["per"], "key");
    // A bad delay is the client's mistake, and holds nothing.
    let res = get(format!("{url}/v1/clusters?delay_ms=99999"), "free-other").await;
    assert_eq!(res.status(), 400);
    // The five clients go away: their connections close, the server drops
    // their requests, and the leases come back.
    for t in &slow {
        t.abort();
    }
    for t in slow {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    assert_eq!(in_flight_once(&url, "free-demo-key", "read", 0).await, 0);
    let res = get(format!("{url}/v1/clusters?delay_ms=0"), "free-demo-key").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-concurrency-limit"], "5");
    assert_eq!(res.headers()["x-concurrency-remaining"], "4");
    assert!(res.headers().contains_key("x-ratelimit-limit"));
    // Training has a concurrency limit only: no rate-limit headers.
    let c2 = c.clone();
    let url2 = url.clone();
    let job = tokio::spawn(async move {
        c2.post(format!("{url2}/v1/training/jobs?delay_ms=10000"))
            .header("x-api-key", "free-demo-key")
            .send()
            .await
    });
    assert_eq!(
        in_flight_once(&url, "free-demo-key", "training", 1).await,
        1
    );
    let res = post(format!("{url}/v1/training/jobs"), "free-demo-key").await;
    assert_eq!(res.status(), 429);
    assert!(!res.headers().contains_key("x-ratelimit-limit"));
    assert_eq!(res.headers()["x-concurrency-limit"], "1");
    job.abort();
    assert!(job.await.unwrap_err().is_cancelled());
    assert_eq!(
        in_flight_once(&url, "free-demo-key", "training", 0).await,
        0
    );
    let res = post(
        format!("{url}/v1/training/jobs?delay_ms=0"),
        "free-demo-key",
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("x-ratelimit-limit"));
    assert_eq!(res.headers()["x-concurrency-remaining"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_shares_its_concurrency_across_keys() {
    let (s, gate) = gated_server().await;
    let mut held = Vec::new();
    for key in ["acme-1", "acme-2", "acme-1"] {
        let url = s.url("/v1/clusters");
        held.push(tokio::spawn(async move { get(url, key).await }));
    }
    assert_eq!(in_flight_once(&s.url(""), "acme-2", "read", 3).await, 3);
    let res = get(s.url("/v1/clusters"), "acme-2").await;
    assert_eq!(res.status(), 429);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["per"], "account", "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("per account"),
        "{problem}"
    );
    gate.open();
    for h in held {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    assert_eq!(in_flight_once(&s.url(""), "acme-1", "read", 0).await, 0);
}

/// The free tier's one `ai` lease, over gRPC: a server stream holds it
/// until the client cancels it; a unary call holds it until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_holds_its_lease_until_the_client_cancels() {
    use tonic::Code;
    use tonic::transport::Channel;
    let layer = memory_layer();
    let usage =
        common::serve(Router::new().route_service("/v1/rate_limit", layer.usage_service())).await;
    let usage_url = usage.url("");
    let server = common::serve_grpc(layer, grpc_demo::grpc_routes().await).await;
    let addr = server.addr;
    let channel = async |window: Option<u32>| {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(window)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    };
    let request = |max_tokens: u32| {
        let mut req = tonic::Request::new(grpc_demo::inference::CompleteRequest {
            prompt: "a b".into(),
            max_tokens,
        });
        req.metadata_mut()
            .insert("x-api-key", "free-demo-key".parse().unwrap());
        req
    };
    // Unary calls: each holds the lease while it runs, then frees it.
    for _ in 0..3 {
        let res = grpc_demo::inference::complete(channel(None).await.unwrap(), request(8))
            .await
            .unwrap();
        assert_eq!(res.metadata().get("x-concurrency-limit").unwrap(), "1");
        assert_eq!(
            in_flight_once(&usage_url, "free-demo-key", "ai", 0).await,
            0
        );
    }
    // A long stream the client reads slowly (a 1 KiB window): it holds the
    // lease past its head.
    let res =
        grpc_demo::inference::complete_stream(channel(Some(1024)).await.unwrap(), request(4096))
            .await
            .unwrap();
    assert_eq!(res.metadata().get("x-concurrency-remaining").unwrap(), "0");
    let mut stream = res.into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(
        in_flight_once(&usage_url, "free-demo-key", "ai", 1).await,
        1
    );
    let status = grpc_demo::inference::complete(channel(None).await.unwrap(), request(8))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("concurrency limit reached"),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "1000"
    );
    // The client cancels the stream: the lease comes back.
    drop(stream);
    assert_eq!(
        in_flight_once(&usage_url, "free-demo-key", "ai", 0).await,
        0
    );
    let res = grpc_demo::inference::complete(channel(None).await.unwrap(), request(8)).await;
    assert!(res.is_ok(), "{res:?}");
    drop((server, usage));
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use common::redis::{RedisCluster, RedisServer, ready};
    use governor::clock::FakeRelativeClock;
    use tierlimit::RedisBackend;
    use tierlimit::backend::{Check, Lease};

    /// Two servers, each with its own backend from `builder`.
    async fn two_instances(builder: impl Fn() -> tierlimit::backend::RedisBackendBuilder) {
        let gate = Gate::new();
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..2 {
            let backend = builder()
                .timeout(Duration::from_secs(2))
                .connect()
                .await
                .unwrap();
            let layer = RateLimitLayer::builder(policy()).backend(backend).build();
            let s = common::serve(gated_app(layer, &gate)).await;
            urls.push(s.url(""));
            servers.push(s);
        }
        fifty_against_five(&urls, &gate).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exactly_five_of_fifty_at_once_across_two_instances_single_node() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        two_instances(|| RedisBackend::builder(server.url())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exactly_five_of_fifty_at_once_across_two_instances_cluster() {
        if !ready() {
            return;
        }
        let cluster = RedisCluster::start();
        two_instances(|| RedisBackend::cluster(cluster.urls())).await;
    }

    fn check(lease: &Lease, id: u64) -> Check<'_> {
        Check {
            owner: 7,
            known: true,
            charges: &[],
            tokens: 0,
            split: tierlimit::backend::TokenSplit::NONE,
            leases: std::slice::from_ref(lease),
            lease_id: id,
            describe: true,
        }
    }

    const LEASE: Lease = Lease {
        bucket: 0x5107,
        max: 2,
        per_account: false,
    };

    async fn backend(server: &RedisServer, clock: &FakeRelativeClock) -> RedisBackend {
        RedisBackend::builder(server.url())
            .fake_clock(clock.clone())
            .lease_ttl(Duration::from_secs(60))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap()
    }

    /// Two instances; A holds both of the lease's slots (ids 1 and 2).
    async fn a_holds_both(
        server: &RedisServer,
        clock: &FakeRelativeClock,
    ) -> (RedisBackend, RedisBackend) {
        let a = backend(server, clock).await;
        let b = backend(server, clock).await;
        assert!(a.check(&check(&LEASE, 1)).await.unwrap().allowed);
        assert!(a.check(&check(&LEASE, 2)).await.unwrap().allowed);
        (a, b)
    }

    #[tokio::test]
    async fn a_crashed_instances_leases_expire_after_the_ttl() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let (a, b) = a_holds_both(&server, &clock).await;
        assert_eq!(a.leases_held(), 2);
        // Instance A stops without releasing anything (a crash).
        drop(a);
        let d = b.check(&check(&LEASE, 3)).await.unwrap();
        assert!(d.is_concurrency_refusal(), "{d:?}");
        clock.advance(Duration::from_secs(59));
        let d = b.check(&check(&LEASE, 4)).await.unwrap();
        assert!(d.is_concurrency_refusal(), "still within the TTL: {d:?}");
        clock.advance(Duration::from_secs(2));
        let d = b.check(&check(&LEASE, 5)).await.unwrap();
        assert!(d.allowed, "A's leases expired: {d:?}");
        assert_eq!(d.lease.unwrap().remaining, 1, "both of A's are gone");
    }

    #[tokio::test]
    async fn a_long_request_renews_its_leases() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let (a, b) = a_holds_both(&server, &clock).await;
        // Renewed before the TTL runs out (the backend does this every
        // third of the TTL; here by hand, on the fake clock).
        clock.advance(Duration::from_secs(50));
        assert_eq!(a.renew_leases().await, 2);
        clock.advance(Duration::from_secs(50));
        let d = b.check(&check(&LEASE, 3)).await.unwrap();
        assert!(d.is_concurrency_refusal(), "renewed, still held: {d:?}");
        // Released once: the renewals stop, and the slot is free at once.
        a.release(7, &[LEASE], 1);
        a.release(7, &[LEASE], 1);
        assert_eq!(
            common::conformance::held_once(&b, 7, &LEASE, 1).await,
            1,
            "one release, however often it is called"
        );
        assert_eq!(a.leases_held(), 1);
        let d = b.check(&check(&LEASE, 4)).await.unwrap();
        assert!(d.allowed, "{d:?}");
    }

    #[tokio::test]
    async fn a_check_dropped_before_it_answers_releases_what_it_took() {
        if !ready() {
            return;
        }
        let server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let a = backend(&server, &clock).await;
        for id in 1..=20 {
            // Released while (or before) its check is under way: the
            // lease is released as soon as the check takes it.
            let fut = a.check(&check(&LEASE, id));
            a.release(7, &[LEASE], id);
            drop(fut);
        }
        assert_eq!(common::conformance::held_once(&a, 7, &LEASE, 0).await, 0);
        for _ in 0..100 {
            if a.leases_held() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(a.leases_held(), 0);
    }

    #[tokio::test]
    async fn leases_fall_back_to_memory_while_redis_is_down() {
        if !ready() {
            return;
        }
        let mut server = RedisServer::start();
        let clock = FakeRelativeClock::default();
        let a = RedisBackend::builder(server.url())
            .fake_clock(clock.clone())
            .timeout(Duration::from_millis(200))
            .fallback_share(0.5)
            .connect()
            .await
            .unwrap();
        let lease = Lease { max: 4, ..LEASE };
        server.kill();
        // This instance's share of 4 is 2, in memory.
        assert!(a.check(&check(&lease, 1)).await.unwrap().allowed);
        assert!(a.check(&check(&lease, 2)).await.unwrap().allowed);
        let d = a.check(&check(&lease, 3)).await.unwrap();
        assert!(d.is_concurrency_refusal(), "{d:?}");
        assert_eq!(d.lease.unwrap().limit, 2);
        a.release(7, &[lease], 1);
        let d = a.check(&check(&lease, 4)).await.unwrap();
        assert!(d.allowed, "the fallback lease came back: {d:?}");
    }
}
