//! Late answers are harmless: a Redis that stalls (`CLIENT PAUSE WRITE`,
//! or a frozen process) runs what queued when it resumes, after its
//! callers gave up. Through real servers, a real client and a real
//! `redis-server` that the tests pause, freeze, restart and flush:
//!
//! - a check whose answer timed out leaves no concurrency lease behind,
//!   and, run late, counts in Redis the request the fallback admitted (so
//!   the fleet's count stays whole: nothing is admitted twice over);
//! - a calendar check run late counts in Redis like a rolling one;
//! - an admin change answered 503 never takes effect;
//! - instances agree with Redis after it lost its data;
//! - usage-feed entries sent to a stalled Redis fail, are never sent
//!   again, and land at most once.

#![cfg(feature = "redis")]

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::time::Duration;

use common::redis::{NOT_STALLED, RedisServer, ready};
use serde_json::{Value, json};
use tierlimit::RedisBackend;

const TOKEN: &str = "admin-token-for-tests-0123456789";

/// How a test stalls Redis, and lets it run again.
#[derive(Clone, Copy, Debug)]
enum Stall {
    /// `CLIENT PAUSE … WRITE`: scripts wait, read-only commands run.
    PauseWrites,
    /// SIGSTOP: nothing runs; what clients send waits in their sockets.
    Freeze,
}

impl Stall {
    fn start(self, server: &RedisServer) {
        match self {
            Stall::PauseWrites => {
                let ok = server.cli(&["CLIENT", "PAUSE", "60000", "WRITE"]);
                assert_eq!(ok.as_deref(), Some("OK"));
            }
            Stall::Freeze => server.stop_process(),
        }
    }

    fn end(self, server: &RedisServer) {
        match self {
            Stall::PauseWrites => {
                assert_eq!(server.cli(&["CLIENT", "UNPAUSE"]).as_deref(), Some("OK"));
            }
            Stall::Freeze => server.resume(),
        }
    }
}

/// Polls `probe` until it holds (bounded: 10 s).
async fn until(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    for _ in 0..1000 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 10 s");
}

/// The leases Redis holds, over every lease set.
fn leases_in_redis(server: &RedisServer) -> u64 {
    let sets = server
        .cli(&["--scan", "--pattern", "*:c:*"])
        .unwrap_or_default();
    sets.lines()
        .filter(|k| !k.is_empty())
        .map(|k| server.cli(&["ZCARD", k]).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// `GET /v1/data` as the test's key: status and `X-Concurrency-Remaining`.
async fn read(s: &common::Server) -> (u16, Option<u32>) {
    let (status, left, _) = common::read_late_key(s).await;
    (status, left)
}

async fn lease_left_behind(stall: Stall) {
    common::redis::init_secret();
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .timeout(NOT_STALLED)
        // Every check goes to Redis (none around it while degraded).
        .trip_after(1_000_000)
        .connect()
        .await
        .unwrap();
    let s = common::serve_late_key(backend).await;
    // Through Redis: its scripts are loaded, and the lease comes back.
    assert_eq!(read(&s).await, (200, Some(1)));
    until("the first lease is released", async || {
        leases_in_redis(&server) == 0
    })
    .await;
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    stall.start(&server);
    // The checks time out; the fallback answers them.
    for _ in 0..2 {
        assert_eq!(read(&s).await.0, 200);
    }
    stall.end(&server);
    // Redis runs the two queued checks, which take their leases; the
    // releases queued behind them on the same connection run in the same
    // read of that socket.
    until("Redis ran the queued checks", async || {
        server.command_calls("evalsha") >= 2
    })
    .await;
    assert_eq!(leases_in_redis(&server), 0, "{stall:?}: nobody holds these");
    // The key has its whole concurrency limit again; and Redis counted the
    // two requests the fallback admitted (their checks ran late), so the
    // fleet's count has them: 1,000 an hour, less the first request, those
    // two and this one. (Were late checks dropped, every timeout would be
    // an admission Redis never hears of: a burst on a loaded machine then
    // admits more than the limit across instances.)
    assert_eq!(
        common::read_late_key(&s).await,
        (200, Some(1), Some(996)),
        "{stall:?}: the key's whole concurrency limit, and every admission counted"
    );
    assert_eq!(leases_in_redis(&server), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_late_by_a_paused_redis_leave_no_lease_behind() {
    if !ready() {
        return;
    }
    lease_left_behind(Stall::PauseWrites).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_late_by_a_frozen_redis_leave_no_lease_behind() {
    if !ready() {
        return;
    }
    lease_left_behind(Stall::Freeze).await;
}

/// A calendar day of 5 (London) on a fixed Unix time, on `backend`.
async fn calendar_instance(backend: RedisBackend) -> common::Server {
    let policy = tierlimit::Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[defaults]
time_zone = "Europe/London"
[tiers.free]
read = { requests = "5/day", period = "calendar" }
write = "1/second"
[keys]
"calendar-late-key" = "free"
"#,
    )
    .unwrap();
    // 2026-03-29 00:30 in London: the day has 23 hours left, less 30 min.
    let layer = tierlimit::RateLimitLayer::builder(policy)
        .backend(backend)
        .unix_clock(|| 1_774_744_200)
        .build();
    let app = axum::Router::new()
        .route("/v1/account", axum::routing::get(|| async { "{}" }))
        .layer(layer);
    common::serve(app).await
}

/// A calendar check whose answer timed out runs late and counts in Redis
/// the request the fallback admitted: the day's count stays whole.
async fn calendar_check_run_late(stall: Stall) {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .timeout(NOT_STALLED)
        .trip_after(1_000_000)
        .connect()
        .await
        .unwrap();
    let s = calendar_instance(backend).await;
    let c = common::client();
    let url = s.url("/v1/account");
    let remaining = async || {
        let res = common::call(&c, "GET", &url, "calendar-late-key").await;
        (
            res.status().as_u16(),
            common::header(&res, "x-ratelimit-remaining"),
        )
    };
    assert_eq!(remaining().await, (200, Some(4)));
    server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
    stall.start(&server);
    for _ in 0..2 {
        assert_eq!(remaining().await.0, 200, "{stall:?}: the fallback admits");
    }
    stall.end(&server);
    until("Redis ran the queued checks", async || {
        server.command_calls("evalsha") >= 2
    })
    .await;
    // 5, less the first request, the two the fallback admitted (counted
    // late) and this one.
    assert_eq!(remaining().await, (200, Some(1)), "{stall:?}");
    assert_eq!(remaining().await, (200, Some(0)));
    assert_eq!(
        remaining().await.0,
        429,
        "{stall:?}: no more than the day's 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_checks_run_late_by_a_paused_redis_count_in_their_period() {
    if !ready() {
        return;
    }
    calendar_check_run_late(Stall::PauseWrites).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_checks_run_late_by_a_frozen_redis_count_in_their_period() {
    if !ready() {
        return;
    }
    calendar_check_run_late(Stall::Freeze).await;
}

/// A demo instance on `server`, sharing operator state through it.
async fn instance(server: &RedisServer) -> common::Server {
    common::redis::init_secret();
    let builder = RedisBackend::builder(server.url());
    let layer = common::redis::sharing_operator_state(builder, NOT_STALLED, |b| {
        demo::limits(common::spec_policy(), b)
    })
    .await;
    common::serve(demo::app_with_admin(layer, Some(TOKEN))).await
}

/// `PUT /admin/v1/keys` of `key` in tier pro: the status and the body.
async fn provision(s: &common::Server, key: &str) -> (u16, Value) {
    let res = common::client()
        .put(s.url("/admin/v1/keys"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .json(&json!({ "key": key, "tier": "pro" }))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn admin_answered_503(stall: Stall) {
    let server = RedisServer::start();
    let (a, b) = (instance(&server).await, instance(&server).await);
    stall.start(&server);
    let (code, body) = provision(&a, "sk-late-change-0001").await;
    assert_eq!(code, 503, "{stall:?}: {body}");
    assert!(body["detail"].as_str().unwrap().contains("nothing changed"));
    stall.end(&server);
    // A later change through A: its calls run after the queued one on the
    // same connection, so once it is answered, the queued one has run.
    assert_eq!(provision(&a, "sk-after-0002").await.0, 200);
    until("B accepts the later key", async || {
        common::status(&b, "sk-after-0002").await == 200
    })
    .await;
    for (name, s) in [("A", &a), ("B", &b)] {
        assert_eq!(
            common::status(s, "sk-late-change-0001").await,
            401,
            "{stall:?}: {name} admits a key whose change was answered 503"
        );
    }
    let fields = server
        .cli(&["HLEN", "tierlimit:{admin}:state"])
        .unwrap_or_default();
    assert_eq!(fields, "1", "only the later change is in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_answered_503_while_redis_pauses_writes_never_takes_effect() {
    if !ready() {
        return;
    }
    admin_answered_503(Stall::PauseWrites).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_answered_503_while_redis_is_frozen_never_takes_effect() {
    if !ready() {
        return;
    }
    admin_answered_503(Stall::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_agree_with_redis_after_it_loses_its_data() {
    if !ready() {
        return;
    }
    let mut server = RedisServer::start();
    let (a, b) = (instance(&server).await, instance(&server).await);
    assert_eq!(provision(&a, "sk-before-loss-01").await.0, 200);
    until("B accepts the first key", async || {
        common::status(&b, "sk-before-loss-01").await == 200
    })
    .await;
    // Redis restarts empty (no persistence); A provisions another key,
    // which is version 1 again, of a new state.
    server.restart();
    until("A provisions after the restart", async || {
        provision(&a, "sk-after-loss-002").await.0 == 200
    })
    .await;
    until("B accepts the second key", async || {
        common::status(&b, "sk-after-loss-002").await == 200
    })
    .await;
    // Both follow what Redis holds: the first key was lost with it.
    for (name, s) in [("A", &a), ("B", &b)] {
        until(&format!("{name} forgets the lost key"), async || {
            common::status(s, "sk-before-loss-01").await == 401
        })
        .await;
        assert_eq!(common::status(s, "sk-after-loss-002").await, 200, "{name}");
    }
    // A flush: every instance follows it too.
    server.cli(&["FLUSHALL"]).unwrap();
    for (name, s) in [("A", &a), ("B", &b)] {
        until(&format!("{name} follows the flush"), async || {
            common::status(s, "sk-after-loss-002").await == 401
        })
        .await;
    }
}

/// `POST /admin/v1/boosts` (pro's read for an hour), with an
/// `Idempotency-Key`: the status and the body.
async fn boost(s: &common::Server, idempotency: &str, adjust: &str) -> (u16, Value) {
    // One start for every try of the test (a retry repeats its request).
    static NOW: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let now = *NOW.get_or_init(common::unix_now);
    common::boosts::post(s, TOKEN, idempotency, adjust, now).await
}

/// The boosts an instance lists.
async fn boosts(s: &common::Server) -> Vec<Value> {
    common::boosts::list(s, TOKEN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boost_retried_under_its_idempotency_key_is_added_once() {
    if !ready() {
        return;
    }
    let server = RedisServer::start();
    let (a, b) = (instance(&server).await, instance(&server).await);
    // The first try is answered 503 (nothing changed); the client retries.
    Stall::PauseWrites.start(&server);
    assert_eq!(boost(&a, "retry-me-1", "x2").await.0, 503);
    Stall::PauseWrites.end(&server);
    let (code, first) = boost(&a, "retry-me-1", "x2").await;
    assert_eq!(code, 201, "{first}");
    // Its answer was lost, say: the retry, through either instance, finds
    // the same boost and adds nothing.
    let (code, again) = boost(&a, "retry-me-1", "x2").await;
    assert_eq!((code, &again), (201, &first));
    until("B has the boost", async || boosts(&b).await.len() == 1).await;
    let (code, via_b) = boost(&b, "retry-me-1", "x2").await;
    assert_eq!((code, &via_b["id"]), (201, &first["id"]));
    assert_eq!(boosts(&a).await.len(), 1);
    assert_eq!(boosts(&b).await.len(), 1);
    // The key reused for another boost is refused; a new key adds one.
    let (code, reused) = boost(&a, "retry-me-1", "x3").await;
    assert_eq!(code, 422, "{reused}");
    assert_eq!(boost(&a, "retry-me-2", "x3").await.0, 201);
    assert_eq!(boosts(&a).await.len(), 2);
    // A malformed key is a 400.
    assert_eq!(boost(&a, "bad key with spaces", "x2").await.0, 400);
}

/// Usage-feed entries sent to a stalled Redis: the responses never wait;
/// the batch times out and counts as failed, is never sent again, and, if
/// Redis runs it late, its entries land once (a record of requests that
/// were served). The limiter's own state is in memory: the stall is the
/// feed's alone.
async fn usage_entries_run_late(stall: Stall) {
    use tierlimit::feed::{RedisStream, UsageFeed};
    let server = RedisServer::start();
    let sink = RedisStream::new(&server.url(), "usage", 1000)
        .unwrap()
        .timeout(NOT_STALLED);
    let feed = UsageFeed::new(sink, 100).unwrap();
    let layer = demo::limits_with_feed(
        common::spec_policy(),
        common::fake_memory(),
        Some(feed.clone()),
    );
    let s = common::serve(demo::app(layer)).await;
    let xlen = || {
        server
            .cli(&["XLEN", "usage"])
            .and_then(|n| n.parse::<u64>().ok())
    };
    // One event written, so the sink's connection is up before the stall.
    assert_eq!(common::status(&s, "pro-demo-key").await, 200);
    until("the first entry", async || feed.written() == 1).await;
    stall.start(&server);
    for _ in 0..3 {
        assert_eq!(common::status(&s, "pro-demo-key").await, 200);
    }
    until("the stalled batches fail", async || feed.failed() == 3).await;
    stall.end(&server);
    assert_eq!(common::status(&s, "pro-demo-key").await, 200);
    until("the next entry", async || feed.written() == 2).await;
    let f = feed.clone();
    tokio::task::spawn_blocking(move || f.flush())
        .await
        .unwrap();
    // Run late or not at all, never twice: 2 written, at most 3 late.
    let n = xlen().expect("XLEN answers");
    assert!((2..=5).contains(&n), "{n} entries");
    assert_eq!((feed.written(), feed.failed(), feed.dropped()), (2, 3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_entries_sent_to_a_paused_redis_fail_and_land_at_most_once() {
    if !ready() {
        return;
    }
    usage_entries_run_late(Stall::PauseWrites).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_entries_sent_to_a_frozen_redis_fail_and_land_at_most_once() {
    if !ready() {
        return;
    }
    usage_entries_run_late(Stall::Freeze).await;
}
