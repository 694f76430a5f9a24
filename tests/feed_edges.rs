//! The usage feed at its edges: a blocked sink never holds up a response
//! and what it cannot take is dropped and counted; shadow-mode passes are
//! marked; a call dropped before its response is one event.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::get;
use tierlimit::feed::{End, UsageEvent, UsageFeed};
use tierlimit::{Policy, RateLimitLayer};

use common::feed::{collecting, written};
use common::{client, serve};

/// Keys in a limited tier, and the hanging route's.
const POLICY: &str = r#"
categories = ["read", "write"]
[tiers.solo]
read = "1000/hour"
write = "3/hour"
[keys]
"solo-key" = "solo"
"#;

/// One key secret for the binary, before any key is hashed.
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

/// A sink that signals when it is entered, then waits for its release.
fn blocked_sink(
    entered: std::sync::mpsc::Sender<()>,
    release: Arc<std::sync::Barrier>,
    seen: Arc<AtomicU64>,
) -> impl FnMut(&[UsageEvent]) -> std::io::Result<()> + Send + 'static {
    let mut first = true;
    move |events: &[UsageEvent]| {
        seen.fetch_add(events.len() as u64, Ordering::Relaxed);
        if std::mem::take(&mut first) {
            let _ = entered.send(());
            release.wait();
        }
        Ok(())
    }
}

#[cfg(feature = "metrics")]
#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

/// The demo's `tierlimit_usage_events_dropped_total` now.
#[cfg(feature = "metrics")]
async fn dropped_metric(c: &reqwest::Client, server: &common::Server) -> u64 {
    let text = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tierlimit_usage_events_dropped_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_sink_holds_up_no_response_and_drops_are_counted() {
    setup();
    demo::install_metrics();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let release = Arc::new(std::sync::Barrier::new(2));
    let seen = Arc::new(AtomicU64::new(0));
    let sink = blocked_sink(entered_tx, Arc::clone(&release), Arc::clone(&seen));
    let feed = UsageFeed::new(sink, 2).unwrap();
    let layer = demo::limits_with_feed(
        common::spec_policy(),
        common::fake_memory(),
        Some(feed.clone()),
    );
    let server = serve(demo::app(layer)).await;
    let c = client();
    let before = dropped_metric(&c, &server).await;
    let ok = |c: &reqwest::Client| {
        c.get(server.url("/v1/account"))
            .header("x-api-key", "pro-demo-key")
            .send()
    };
    // The first event reaches the sink, which blocks.
    assert_eq!(ok(&c).await.unwrap().status(), 200);
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    // 40 more, all served while the sink stays blocked: 2 queue, 38 drop.
    for _ in 0..40 {
        assert_eq!(ok(&c).await.unwrap().status(), 200);
    }
    let mut dropped = 0;
    for _ in 0..20_000 {
        dropped = feed.dropped();
        if dropped == 38 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(dropped, 38, "the queue holds 2 while the sink is blocked");
    assert_eq!(
        dropped_metric(&c, &server).await - before,
        38,
        "and the metric says so"
    );
    assert_eq!(feed.written(), 0);
    // Released: the one it held and the two queued are written.
    tokio::task::spawn_blocking(move || release.wait())
        .await
        .unwrap();
    let f = feed.clone();
    tokio::task::spawn_blocking(move || f.flush())
        .await
        .unwrap();
    assert_eq!((feed.written(), seen.load(Ordering::Relaxed)), (3, 3));
}

/// Shadow mode lets refusals through: each still one event, marked, with
/// nothing counted.
#[tokio::test]
async fn shadow_passes_are_marked_and_count_nothing() {
    setup();
    let (seen, sink) = collecting();
    let feed = UsageFeed::new(sink, 100).unwrap();
    let policy = Policy::from_toml_str(
        "categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/hour\"\nwrite = \"1/hour\"\n[shadow]\ntiers = [\"t\"]\n[keys]\n\"k\" = \"t\"\n",
    )
    .unwrap();
    let server = serve_ok(policy, &feed).await;
    let c = client();
    for _ in 0..3 {
        let res = common::call(&c, "GET", &server.url("/v1/ok"), "k").await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(written(&feed, 3).await, 3);
    let events = seen.lock().unwrap().clone();
    let shadow: Vec<_> = events.iter().map(|e| (e.shadow, e.requests)).collect();
    assert_eq!(shadow, [(false, 1), (true, 0), (true, 0)]);
    assert!(events.iter().all(|e| e.status == Some(200)));
}

/// A call dropped before its response (a timeout, a client gone while
/// the handler runs) is one event, with no status; a rejection none.
#[tokio::test]
async fn a_call_dropped_before_its_response_is_one_event_without_a_status() {
    use tower::ServiceExt;
    setup();
    let (seen, sink) = collecting();
    let feed = UsageFeed::new(sink, 100).unwrap();
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .usage_feed(feed.clone())
        .build();
    let app = Router::new()
        .route("/v1/hang", get(std::future::pending::<&'static str>))
        .layer(layer);
    let req = |key: &str| {
        axum::http::Request::get("/v1/hang")
            .header("x-api-key", key)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let mut call = Box::pin(app.clone().oneshot(req("solo-key")));
    assert!(
        futures_util::poll!(call.as_mut()).is_pending(),
        "the handler hangs"
    );
    drop(call);
    let res = app.oneshot(req("nope")).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(written(&feed, 1).await, 1);
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!((e.status, e.end, e.requests), (None, End::Dropped, 1));
    assert_eq!(
        (e.tier.as_str(), e.route.as_str()),
        ("solo", "GET /v1/hang")
    );
}

/// A sink that fails: its events are counted as failed, never as written,
/// and the next batch is tried again.
#[tokio::test]
async fn a_failing_sink_counts_its_events_as_failed() {
    setup();
    let calls = Arc::new(AtomicU64::new(0));
    let tried = Arc::clone(&calls);
    let feed = UsageFeed::new(
        move |_: &[UsageEvent]| {
            tried.fetch_add(1, Ordering::Relaxed);
            Err(std::io::Error::other("billing is down"))
        },
        100,
    )
    .unwrap();
    let server = serve_ok(Policy::from_toml_str(POLICY).unwrap(), &feed).await;
    let c = client();
    for _ in 0..3 {
        let res = common::call(&c, "GET", &server.url("/v1/ok"), "solo-key").await;
        assert_eq!(res.status(), 200, "a failing sink fails no response");
    }
    // The feed's thread hands events on in its own time: wait (bounded,
    // 10 s) for all three to have failed, however loaded the machine.
    for _ in 0..1_000 {
        if feed.failed() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!((feed.failed(), feed.written(), feed.dropped()), (3, 0, 0));
    assert!(calls.load(Ordering::Relaxed) >= 1);
}

/// Over gRPC (tonic), each admitted call is one event, complete once its
/// trailers are sent; a rejected call none.
#[tokio::test]
async fn each_admitted_grpc_call_is_one_event() {
    use tonic_health::pb::health_client::HealthClient;
    setup();
    let (seen, sink) = collecting();
    let feed = UsageFeed::new(sink, 100).unwrap();
    let layer = RateLimitLayer::builder(common::spec_policy())
        .backend(common::fake_memory())
        .usage_feed(feed.clone())
        .build();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = common::serve_grpc(layer, tonic::service::Routes::new(health)).await;
    let mut client = HealthClient::new(common::grpc_channel(server.addr).await);
    let check = common::health_check;
    for _ in 0..3 {
        client.check(check("free-demo-key")).await.unwrap();
    }
    let refused = client.check(check("not-a-key")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(written(&feed, 3).await, 3);
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 3);
    for e in &events {
        assert_eq!(e.route, "POST /grpc.health.v1.Health/Check");
        assert_eq!((e.tier.as_str(), e.category.as_str()), ("free", "read"));
        assert_eq!((e.status, e.end, e.requests), (Some(200), End::Complete, 1));
    }
}

/// `GET /v1/ok` behind a layer of `policy` on a fake clock, feeding `feed`.
async fn serve_ok(policy: Policy, feed: &UsageFeed) -> common::Server {
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .usage_feed(feed.clone())
        .build();
    serve(
        Router::new()
            .route("/v1/ok", get(|| async { "ok" }))
            .layer(layer),
    )
    .await
}
