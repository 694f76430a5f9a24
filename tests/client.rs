//! The client retry layer against the crate's own HTTP and gRPC services,
//! on a paused tokio clock (the limiter's clock follows it, so waits are
//! exact and instant).
#![cfg(feature = "client")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use governor::clock::Clock;
use governor::nanos::Nanos;
use http::{Request, Response, StatusCode};
use tierlimit::client::RetryLayer;
use tierlimit::{MemoryBackend, Policy, RateLimitLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// A governor clock that follows tokio's (paused) time.
#[derive(Clone, Debug)]
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

fn policy() -> Policy {
    Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[tiers.t]
read = "2/10s"
write = "1/hour"
[[grpc]]
service = "grpc.health.v1.Health"
category = "read"
[keys]
"k" = "t"
"#,
    )
    .unwrap()
}

/// A layer enforcing `policy` on a memory backend that follows tokio's clock.
fn tokio_clock_layer(
    policy: Policy,
) -> RateLimitLayer<tierlimit::ApiKey, MemoryBackend<TokioClock>> {
    RateLimitLayer::builder(policy)
        .backend(
            MemoryBackend::builder()
                .clock(TokioClock {
                    start: Instant::now(),
                })
                .build(),
        )
        .build()
}

fn limited_router() -> Router {
    let layer = tokio_clock_layer(policy());
    Router::new()
        .route("/r", get(|| async { "ok" }))
        .layer(layer)
}

fn get_r() -> Request<Body> {
    Request::get("/r")
        .header("x-api-key", "k")
        .body(Body::empty())
        .unwrap()
}

/// `GET /r` as key `k` through `client`, once it is ready.
async fn send<S>(client: &mut S) -> S::Response
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    ServiceExt::<Request<Body>>::ready(client)
        .await
        .unwrap()
        .call(get_r())
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn http_429_waits_exactly_the_retry_after() {
    let mut client = RetryLayer::new().layer(limited_router());
    for _ in 0..2 {
        assert_eq!(send(&mut client).await.status(), 200);
    }
    let start = Instant::now();
    let res = send(&mut client).await;
    assert_eq!(res.status(), StatusCode::OK, "retried after the hint");
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(5),
        "Retry-After: 5 (one every 10 s / 2)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hint_beyond_the_bound_returns_the_servers_answer_at_once() {
    let mut client = RetryLayer::new()
        .max_wait(Duration::from_secs(2))
        .layer(limited_router());
    for _ in 0..2 {
        send(&mut client).await;
    }
    let start = Instant::now();
    let res = send(&mut client).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no sleeping on a 5 s hint with a 2 s bound"
    );
}

/// A server that always refuses without a hint, recording when it is called.
fn always_refusing(
    calls: Arc<Mutex<Vec<Instant>>>,
) -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: Request<Body>| {
        calls.lock().unwrap().push(Instant::now());
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        std::future::ready(Ok(res))
    })
}

/// One request with an empty body, through `client` once it is ready.
async fn send_empty<S>(client: &mut S) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let ready = client.ready().await.unwrap();
    ready.call(Request::new(Body::empty())).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn without_hints_full_jitter_and_the_attempt_bound() {
    for _ in 0..20 {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut client = RetryLayer::new()
            .max_attempts(5)
            .backoff(Duration::from_millis(100), Duration::from_millis(300))
            .layer(always_refusing(Arc::clone(&calls)));
        let res = send_empty(&mut client).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 5, "max_attempts");
        for (retry, pair) in calls.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let ceiling = Duration::from_millis(100 << retry).min(Duration::from_millis(300));
            // (tokio's timer rounds a sleep up to the next millisecond.)
            assert!(
                gap <= ceiling,
                "retry {retry}: waited {gap:?}, ceiling {ceiling:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_total_wait_bound_holds() {
    // Random waits whose sum lands within a few milliseconds of the bound,
    // where the timer's rounding up to its tick would carry it over: many
    // layers, each with its own random seed, so such a draw comes up.
    for _ in 0..500 {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut client = RetryLayer::new()
            .max_attempts(50)
            .max_total_wait(Duration::from_secs(1))
            .backoff(Duration::from_millis(400), Duration::from_millis(400))
            .layer(always_refusing(Arc::clone(&calls)));
        let start = Instant::now();
        send_empty(&mut client).await;
        let slept = start.elapsed();
        assert!(slept <= Duration::from_secs(1), "slept {slept:?}");
        assert!(calls.lock().unwrap().len() < 50);
    }
}

#[tokio::test(start_paused = true)]
async fn bodies_of_unknown_size_are_not_replayed() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut client = RetryLayer::new().layer(always_refusing(Arc::clone(&calls)));
    let stream =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"chunk"))]);
    let req = Request::post("/r").body(Body::from_stream(stream)).unwrap();
    let res = client.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "a streaming body is sent once"
    );
}

type GrpcServer = tierlimit::layer::RateLimit<
    tonic::service::Routes,
    tierlimit::ApiKey,
    MemoryBackend<TokioClock>,
>;

/// The crate's gRPC service (health, limited) behind a retrying client.
fn grpc_client(
    retry: RetryLayer,
) -> tonic_health::pb::health_client::HealthClient<tierlimit::client::Retry<GrpcServer>> {
    let layer = tokio_clock_layer(policy());
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tower::Layer::layer(&layer, tonic::service::Routes::new(health));
    tonic_health::pb::health_client::HealthClient::with_origin(
        retry.layer(server),
        "http://localhost".parse().unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn grpc_resource_exhausted_waits_the_pushback() {
    use tonic_health::pb::HealthCheckRequest;

    let mut health = grpc_client(RetryLayer::new());
    let check = || {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.metadata_mut().insert("x-api-key", "k".parse().unwrap());
        // A unary call: its body may be buffered for a retry.
        req.extensions_mut().insert(tierlimit::client::Replayable);
        req
    };
    health.check(check()).await.unwrap();
    health.check(check()).await.unwrap();
    let start = Instant::now();
    let res = health.check(check()).await;
    assert!(
        res.is_ok(),
        "retried after the pushback ({:?} later): {res:?}",
        start.elapsed()
    );
    assert_eq!(start.elapsed(), Duration::from_secs(5));

    // With a bound below the hint, the caller gets RESOURCE_EXHAUSTED at once.
    let mut health = grpc_client(RetryLayer::new().max_wait(Duration::from_secs(1)));
    health.check(check()).await.unwrap();
    health.check(check()).await.unwrap();
    let start = Instant::now();
    let status = health.check(check()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// With several limits, the hint is when *every* limit admits: the client
/// waits for the guard once (5 s), and does not waste a retry when only
/// the guard would have room but the hourly budget is spent.
#[tokio::test(start_paused = true)]
async fn with_several_limits_the_client_waits_for_all_of_them() {
    let policy = Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[tiers.t]
read = ["2/10s", "3/hour"]
write = "1/hour"
[keys]
"k" = "t"
"#,
    )
    .unwrap();
    let layer = tokio_clock_layer(policy);
    let router = Router::new()
        .route("/r", get(|| async { "ok" }))
        .layer(layer);
    let mut client = RetryLayer::new().layer(router);
    for _ in 0..2 {
        assert_eq!(send(&mut client).await.status(), StatusCode::OK);
    }
    let start = Instant::now();
    assert_eq!(
        send(&mut client).await.status(),
        StatusCode::OK,
        "retried once"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(5), "the guard's hint");
    // The budget (3 per hour) is spent: its wait, not the guard's, is the
    // hint, and it is beyond the client's bound: answered at once.
    let start = Instant::now();
    let res = send(&mut client).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        res.headers()["retry-after"],
        "1195",
        "1200 s − the 5 s waited"
    );
    assert_eq!(res.headers()["x-ratelimit-limit"], "3");
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// A refusal for tokens (a debt left by a response that used more than it
/// reserved) is honoured like any other: the client waits the hint once.
#[tokio::test(start_paused = true)]
async fn a_token_refusal_is_waited_out_like_any_other() {
    let policy = Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[tiers.t]
read = { requests = "100/hour", tokens = "10/10s" }
write = "1/hour"
[keys]
"k" = "t"
"#,
    )
    .unwrap();
    let layer = tokio_clock_layer(policy);
    // Every answer used 15 tokens: 14 more than the 1 reserved.
    let router = Router::new()
        .route(
            "/r",
            get(
                |axum::Extension(meter): axum::Extension<tierlimit::meter::TokenMeter>| async move {
                    meter.add(15);
                    "ok"
                },
            ),
        )
        .layer(layer);
    let mut client = RetryLayer::new().layer(router);
    assert_eq!(send(&mut client).await.status(), StatusCode::OK);
    // In debt by 5 tokens: the next token comes 6 s later (15 s of tokens
    // used, 9 s of burst).
    let start = Instant::now();
    let res = send(&mut client).await;
    assert_eq!(res.status(), StatusCode::OK, "retried after the hint");
    assert_eq!(start.elapsed(), Duration::from_secs(6));
}

/// A policy like [`policy`], with an overload capacity of one request in
/// flight and a shed caller told to wait 2 s.
fn overload_policy() -> Policy {
    let text = r#"
categories = ["read", "write"]
[tiers.t]
read = "1000/second"
write = "1000/second"
[keys]
"k" = "t"
[overload]
capacity = 1
retry_after = "2s"
"#;
    Policy::from_toml_str(text).unwrap()
}

/// `/r` (at once) and `/hold` (answers after 1.5 s), behind one layer with
/// a capacity of one, and the gRPC health service beside them.
fn overloaded_router() -> Router {
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::service::Routes::new(health)
        .into_axum_router()
        .route("/r", get(|| async { "ok" }))
        .route(
            "/hold",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                "held"
            }),
        )
        .layer(tokio_clock_layer(overload_policy()))
}

/// Holds the only place for 1.5 s (paused time).
fn hold(router: &Router) -> tokio::task::JoinHandle<()> {
    let router = router.clone();
    tokio::spawn(async move {
        let req = Request::get("/hold")
            .header("x-api-key", "k")
            .body(Body::empty())
            .unwrap();
        let res = router.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
    })
}

#[tokio::test(start_paused = true)]
async fn http_503_shed_waits_the_retry_after() {
    let router = overloaded_router();
    let held = hold(&router);
    tokio::task::yield_now().await;
    // Without the retry layer: shed, 503 with Retry-After.
    let res = router.clone().oneshot(get_r()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "2");
    // With it: the 503 is waited out (2 s), and the retry goes through.
    let mut client = RetryLayer::new().layer(router);
    let start = Instant::now();
    assert_eq!(send(&mut client).await.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    held.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_503_without_retry_after_is_not_retried() {
    let calls = Arc::new(Mutex::new(0u32));
    let counted = Arc::clone(&calls);
    let server = tower::service_fn(move |_req: Request<Body>| {
        *counted.lock().unwrap() += 1;
        async {
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Body::empty())
                    .unwrap(),
            )
        }
    });
    let mut client = RetryLayer::new().layer(server);
    assert_eq!(
        send(&mut client).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        *calls.lock().unwrap(),
        1,
        "the server may have done the work"
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_unavailable_shed_waits_the_pushback() {
    use tonic_health::pb::HealthCheckRequest;

    let router = overloaded_router();
    let held = hold(&router);
    tokio::task::yield_now().await;
    let mut health = tonic_health::pb::health_client::HealthClient::with_origin(
        RetryLayer::new().layer(router),
        "http://localhost".parse().unwrap(),
    );
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert("x-api-key", "k".parse().unwrap());
    req.extensions_mut().insert(tierlimit::client::Replayable);
    let start = Instant::now();
    let res = health.check(req).await;
    assert!(res.is_ok(), "retried after the pushback: {res:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    held.await.unwrap();
}
