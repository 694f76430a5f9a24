//! The layer answers in the inner service's own body type (`AnswerBody`):
//! an allowed response's body leaves the layer as it came, and a refusal
//! or rejection is a readable problem document in the same type, for
//! every body type the crate supports and for any other body behind
//! `ResponseBody`. And a policy update is seen at once by requests on every
//! worker thread (the per-thread view cache).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use governor::clock::FakeRelativeClock;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full};
use tierlimit::{
    MemoryBackend, Policy, RateLimitLayer,
    response::{AnswerBody, ResponseBody},
};
use tower::{Layer, Service, ServiceExt};

const KEY: &str = "bodies-test-key-001";

fn policy() -> Policy {
    Policy::from_toml_str(&format!(
        "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"1/hour\"\nwrite = \"1/hour\"\n[keys]\n\"{KEY}\" = \"free\"\n"
    ))
    .unwrap()
}

fn request(key: Option<&str>) -> Request<()> {
    let mut req = Request::get("/v1/account");
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    req.body(()).unwrap()
}

/// One request through `svc`, with `key` in `X-API-Key` if any.
async fn send<S>(svc: &mut S, key: Option<&str>) -> S::Response
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(request(key)).await.unwrap()
}

/// Runs: allowed (the inner body untouched), refused (429), rejected (401),
/// each body read back through the body type `B`.
async fn exercise<B>(make: fn(&'static str) -> B)
where
    B: AnswerBody + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let layer = RateLimitLayer::builder(policy())
        .backend(
            MemoryBackend::builder()
                .clock(FakeRelativeClock::default())
                .build(),
        )
        .build();
    let inner = tower::service_fn(move |_req: Request<()>| async move {
        Ok::<_, Infallible>(Response::new(make("inner body")))
    });
    let mut svc = layer.layer(inner);
    let text = |res: Response<B>| async move {
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };

    let res = send(&mut svc, Some(KEY)).await;
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
    assert_eq!(text(res).await, (StatusCode::OK, "inner body".to_owned()));

    let res = send(&mut svc, Some(KEY)).await;
    let (status, body) = text(res).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        problem["type"].as_str().unwrap().ends_with("rate-limited"),
        "{body}"
    );

    let res = send(&mut svc, None).await;
    let (status, body) = text(res).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("missing-api-key"), "{body}");
}

#[tokio::test]
async fn every_supported_body_type_passes_through_and_carries_refusals() {
    exercise::<axum::body::Body>(axum::body::Body::from).await;
    exercise::<String>(str::to_owned).await;
    exercise::<Full<Bytes>>(|s| Full::new(Bytes::from_static(s.as_bytes()))).await;
    exercise::<http_body_util::combinators::BoxBody<Bytes, Infallible>>(|s| {
        Full::new(Bytes::from_static(s.as_bytes())).boxed()
    })
    .await;
    exercise::<http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>>(|s| {
        Full::new(Bytes::from_static(s.as_bytes())).boxed_unsync()
    })
    .await;
    exercise::<tonic::body::Body>(|s| {
        tonic::body::Body::new(Full::new(Bytes::from_static(s.as_bytes())))
    })
    .await;
    exercise::<ResponseBody<Full<Bytes>>>(|s| {
        ResponseBody::new(Full::new(Bytes::from_static(s.as_bytes())))
    })
    .await;
}

/// A body type the crate knows nothing of, behind `ResponseBody`.
#[tokio::test]
async fn any_other_body_works_behind_response_body() {
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let mut svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(policy()))
        .map_response(|res: Response<Empty<Bytes>>| res.map(ResponseBody::new))
        .service(inner);
    let res = send(&mut svc, Some(KEY)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.body().is_end_stream());
    let res = send(&mut svc, Some(KEY)).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        !res.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty()
    );
}

/// Requests spread over both worker threads see a policy update at once:
/// no thread keeps serving the old limits from its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_update_is_seen_at_once_on_every_worker_thread() {
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::builder(policy())
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    let handle = layer.policy_handle();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let svc = layer.layer(inner);
    // Each round: a new limit of `n` per hour for a fresh key, then 4n
    // requests from 8 tasks on both threads; exactly n are allowed, so no
    // request was judged by an older policy (the old limits were 1/hour or
    // a smaller n).
    for (round, n) in [(0u32, 5u32), (1, 50), (2, 7), (3, 200)] {
        let key = format!("bodies-update-key-{round}");
        let limit = tierlimit::Limit::per_hour(n);
        handle
            .update(|b| {
                b.set_key_tier(&key, "free").custom_limit(
                    key.as_str(),
                    "read",
                    tierlimit::policy::Adjust::Set(tierlimit::policy::Rule::Limited(limit)),
                )
            })
            .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let mut svc = svc.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let mut allowed = 0u32;
                    for _ in 0..n / 2 {
                        let res = send(&mut svc, Some(&key)).await;
                        allowed += u32::from(res.status() == StatusCode::OK);
                        tokio::task::yield_now().await;
                    }
                    allowed
                })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap();
        }
        assert_eq!(allowed, n, "round {round}: limit {n}");
        clock.advance(Duration::from_millis(1));
    }
}
