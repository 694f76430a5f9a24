//! The usage feed through a real axum server and a real client: one event
//! per admitted request (refused and rejected ones none; cancelled streams,
//! refunds and unlimited tiers one each), whose sums per account are what
//! the usage endpoint reports, on memory and on Redis (into a Redis
//! Stream). Blocked sinks, shadow mode and dropped calls:
//! `tests/feed_edges.rs`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use serde_json::Value;
use tierlimit::feed::{JsonLines, UsageFeed};
use tierlimit::meter::TokenMeter;
use tierlimit::{Policy, RateLimitLayer};

use common::feed::written;
use common::{client, serve};

const POLICY: &str = r#"
categories = ["read", "write", "ai"]
[tiers.pro]
pool = "account"
refund_on = ["5xx"]
read = "1000/hour"
write = "3/hour"
ai = { requests = "1000/hour", tokens = "100000000/3650d" }
[tiers.solo]
refund_on = ["5xx"]
read = "1000/hour"
write = "3/hour"
ai = { requests = "1000/hour", tokens = "100000000/3650d" }
[tiers.ent]
read = "unlimited"
write = "unlimited"
ai = "unlimited"
[[routes]]
path = "/usage"
exempt = true
[[routes]]
path = "/v1/ai/*"
category = "ai"
[keys]
"acme-key-1" = { tier = "pro", account = "acme", org = "acme-group" }
"acme-key-2" = { tier = "pro", account = "acme", org = "acme-group" }
"solo-key" = "solo"
"ent-key" = "ent"
"#;

/// A temporary directory, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tierlimit-feed-{name}-{}-{}",
            std::process::id(),
            common::unix_now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Routes for every kind of outcome: a plain read, a status of choice
/// (5xx refunded), a write, and a stream of 20 chunks reporting 10 tokens
/// each; the usage endpoint on an exempt route.
fn app<B: tierlimit::backend::Backend>(layer: RateLimitLayer<tierlimit::ApiKey, B>) -> Router {
    use axum::response::sse::{Event, Sse};
    Router::new()
        .route_service("/usage", layer.usage_service())
        .route("/v1/ok", get(|| async { "ok" }))
        .route(
            "/status/{code}",
            get(
                |axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    axum::http::StatusCode::from_u16(code).unwrap()
                },
            ),
        )
        .route("/v1/write", post(|| async { "written" }))
        .route(
            "/v1/ai/stream",
            post(|meter: Option<axum::Extension<TokenMeter>>, headers: axum::http::HeaderMap| async move {
                // `x-endless`: until the client goes away (the server's
                // write fails and it drops the body), else 20 events.
                let endless = headers.contains_key("x-endless");
                let meter = meter.map(|m| m.0);
                let events = futures_util::stream::unfold(0u32, move |i| {
                    let meter = meter.clone();
                    async move {
                        if i == 20 && !endless {
                            return None;
                        }
                        if let Some(m) = &meter {
                            m.add(10);
                        }
                        tokio::task::yield_now().await;
                        let event = Event::default().data("tok ".repeat(250));
                        Some((Ok::<_, std::convert::Infallible>(event), i + 1))
                    }
                });
                Sse::new(events)
            }),
        )
        .layer(layer)
}

/// One client's traffic as `key`: reads, refunded 5xx, counted 404s,
/// writes beyond the limit, streams read to the end and streams cut off
/// after their first event. The statuses it got.
async fn traffic(c: reqwest::Client, server: Arc<common::Server>, key: &'static str) -> Vec<u16> {
    let mut statuses = Vec::new();
    let get = |path: String| c.get(server.url(&path)).header("x-api-key", key).send();
    for path in ["/v1/ok"; 5] {
        statuses.push(get(path.into()).await.unwrap().status().as_u16());
    }
    for code in [500, 503, 500, 404, 404] {
        let res = get(format!("/status/{code}")).await.unwrap();
        statuses.push(res.status().as_u16());
    }
    for _ in 0..5 {
        let res = c
            .post(server.url("/v1/write"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    for i in 0..4 {
        let mut req = c.post(server.url("/v1/ai/stream")).header("x-api-key", key);
        if i % 2 == 0 {
            req = req.header("x-endless", "1");
        }
        let mut res = req.send().await.unwrap();
        statuses.push(res.status().as_u16());
        if i % 2 == 0 {
            // One event, then away: the server drops the stream.
            let _ = res.chunk().await.unwrap();
            drop(res);
        } else {
            while res.chunk().await.unwrap().is_some() {}
        }
    }
    statuses
}

fn read_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the usage endpoint says `key` has used in `category`: requests
/// (limit − remaining) and tokens.
async fn used(c: &reqwest::Client, server: &common::Server, key: &str) -> Value {
    c.get(server.url("/usage"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Every kind of traffic from four keys at once, and two rejections: the
/// number of requests admitted.
async fn run_traffic(c: &reqwest::Client, server: &Arc<common::Server>) -> u64 {
    let mut tasks = Vec::new();
    for key in ["acme-key-1", "acme-key-2", "solo-key", "ent-key"] {
        tasks.push(tokio::spawn(traffic(c.clone(), Arc::clone(server), key)));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    // Rejected: no key, an unknown key.
    let res = c.get(server.url("/v1/ok")).send().await.unwrap();
    statuses.push(res.status().as_u16());
    let res = c
        .get(server.url("/v1/ok"))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    statuses.push(res.status().as_u16());
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let rejected = statuses.iter().filter(|s| **s == 401).count();
    // acme's two keys share 3 writes of 10, solo has 3 of 5; ent is unlimited.
    assert_eq!(refused, 7 + 2, "{statuses:?}");
    assert_eq!(rejected, 2);
    (statuses.len() - refused - rejected) as u64
}

/// What the events add up to, per account (a key without one is its own)
/// and category: (requests, tokens).
fn sums(events: &[Value]) -> BTreeMap<(String, String), (u64, u64)> {
    let mut sums: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for e in events {
        let owner = match &e["account"] {
            Value::String(a) => a.clone(),
            _ => e["key"].as_str().unwrap().to_owned(),
        };
        let s = sums
            .entry((owner, e["category"].as_str().unwrap().to_owned()))
            .or_default();
        s.0 += e["requests"].as_u64().unwrap();
        s.1 += e["tokens"].as_u64().unwrap_or(0);
    }
    sums
}

/// What the usage endpoint says `key`'s owner used in `category`:
/// (requests, tokens), each its limit less what remains.
async fn shown(
    c: &reqwest::Client,
    server: &common::Server,
    key: &str,
    category: &str,
) -> (u64, u64) {
    let usage = used(c, server, key).await;
    let used_of = |v: &Value| v["limit"].as_u64().unwrap() - v["remaining"].as_u64().unwrap();
    let shown = &usage["categories"][category];
    let tokens = if category == "ai" {
        used_of(&shown["tokens"])
    } else {
        0
    };
    (used_of(shown), tokens)
}

/// The events' sums per account are what the usage endpoint reports
/// (waiting, bounded, for settlements a backend applies on its own thread).
async fn check_sums(c: &reqwest::Client, server: &common::Server, events: &[Value]) {
    let sums = sums(events);
    let account = |e: &Value| e["account"].as_str().unwrap_or("").to_owned();
    let acme = events
        .iter()
        .find(|e| e["tier"] == "pro")
        .map(account)
        .unwrap();
    // Every event names its organisation: acme's keys their group's, the
    // solo key none.
    let org = |e: &Value| e["org"].as_str().map(str::to_owned);
    let group = events.iter().find(|e| e["tier"] == "pro").and_then(org);
    assert_eq!(group.as_ref().map(String::len), Some(16), "{events:?}");
    for e in events {
        let want = if e["tier"] == "pro" {
            group.clone()
        } else {
            None
        };
        assert_eq!(org(e), want, "{e}");
    }
    let solo = events.iter().find(|e| e["tier"] == "solo").unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for (owner, key) in [(acme, "acme-key-1"), (solo, "solo-key")] {
        for category in ["read", "write", "ai"] {
            let sum = sums
                .get(&(owner.clone(), category.to_owned()))
                .copied()
                .unwrap_or_default();
            let mut now = (0, 0);
            for _ in 0..2_000 {
                now = shown(c, server, key, category).await;
                if now == sum {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(sum, now, "{key} {category}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_per_admitted_request_whose_sums_are_the_usage_endpoints() {
    setup();
    let dir = TempDir::new("sums");
    let path = dir.0.join("usage.jsonl");
    let feed = UsageFeed::new(JsonLines::append(&path).unwrap(), 10_000).unwrap();
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(common::fake_memory())
        .usage_feed(feed.clone())
        .build();
    let server = Arc::new(serve(app(layer)).await);
    let c = client();
    let admitted = run_traffic(&c, &server).await;
    assert_eq!(written(&feed, admitted).await, admitted, "one event each");
    assert_eq!((feed.dropped(), feed.failed()), (0, 0));

    let events = read_events(&path);
    assert_eq!(events.len() as u64, admitted);
    let text = std::fs::read_to_string(&path).unwrap();
    for key in ["acme-key-1", "solo-key", "ent-key"] {
        assert!(!text.contains(key), "the feed never holds a key");
    }
    check_event_kinds(&events);
    check_sums(&c, &server, &events).await;
}

/// One key secret for the binary, before any key is hashed (the Redis
/// test needs the fixture's).
fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

/// The same traffic on the Redis backend (its checks resolved by the
/// response future), into a Redis Stream on the same server, read back
/// with `XRANGE`.
#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_stream_holds_one_entry_per_admitted_request() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (redis, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    let sink = tierlimit::feed::RedisStream::new(&redis.url(), "billing:usage", 100_000).unwrap();
    let feed = UsageFeed::new(sink, 10_000).unwrap();
    let policy = Policy::from_toml_str(POLICY).unwrap();
    let layer = RateLimitLayer::builder(policy)
        .backend(backend)
        .usage_feed(feed.clone())
        .build();
    let server = Arc::new(serve(app(layer)).await);
    let c = client();
    let admitted = run_traffic(&c, &server).await;
    assert_eq!(written(&feed, admitted).await, admitted, "one entry each");
    assert_eq!((feed.dropped(), feed.failed()), (0, 0));
    let url = redis.url();
    let entries = tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("XRANGE")
            .arg("billing:usage")
            .arg("-")
            .arg("+")
            .query::<Vec<(String, Vec<String>)>>(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(entries.len() as u64, admitted);
    let events: Vec<Value> = entries
        .iter()
        .map(|(_, fields)| entry_json(fields))
        .collect();
    check_event_kinds(&events);
    check_sums(&c, &server, &events).await;
}

/// A stream entry's fields as the JSON Lines sink writes them (an empty
/// value is null; numbers and booleans typed).
#[cfg(all(feature = "redis", feature = "test-util"))]
fn entry_json(fields: &[String]) -> Value {
    let mut o = serde_json::Map::new();
    for pair in fields.chunks(2) {
        let (k, v) = (pair[0].as_str(), pair[1].as_str());
        let number = [
            "status",
            "requests",
            "tokens",
            "input_tokens",
            "output_tokens",
            "duration_us",
        ];
        let value = if v.is_empty() {
            Value::Null
        } else if k == "refunded" || k == "shadow" {
            Value::Bool(v.parse().unwrap())
        } else if number.contains(&k) {
            Value::from(v.parse::<u64>().unwrap())
        } else {
            Value::from(v)
        };
        o.insert(k.to_owned(), value);
    }
    Value::Object(o)
}

/// The events say how each request went: refunds, cut-off streams,
/// unlimited requests.
fn check_event_kinds(events: &[Value]) {
    let count = |f: &dyn Fn(&Value) -> bool| events.iter().filter(|e| f(e)).count();
    // 3 keys × 3 server errors: refunded, nothing billed.
    let refunded = count(&|e| e["refunded"] == true);
    assert_eq!(refunded, 9);
    assert_eq!(
        count(&|e| e["refunded"] == true
            && e["requests"] == 0
            && e["status"].as_u64().unwrap() >= 500),
        9
    );
    // 4 keys × 2 streams cut off after one event, 2 read to the end.
    let streams = |end: &'static str| {
        move |e: &Value| e["route"] == "POST /v1/ai/stream" && e["end"] == end && e["status"] == 200
    };
    let ends: Vec<_> = events
        .iter()
        .filter(|e| e["route"] == "POST /v1/ai/stream")
        .map(|e| format!("{} {} {}", e["end"], e["status"], e["tokens"]))
        .collect();
    assert_eq!(count(&streams("dropped")), 8, "{ends:?}");
    assert_eq!(count(&streams("complete")), 8);
    for e in events
        .iter()
        .filter(|e| streams("complete")(e) && e["tier"] != "ent")
    {
        assert_eq!(e["tokens"], 200, "{e}");
    }
    for e in events
        .iter()
        .filter(|e| streams("dropped")(e) && e["tier"] != "ent")
    {
        let t = e["tokens"].as_u64().unwrap();
        assert!(
            t >= 10 && t % 10 == 0,
            "a cut-off stream is billed what it reported: {e}"
        );
    }
    // Every other response was read whole by the client: complete, even
    // those the server never polled again once they said they had ended.
    let others = events.iter().filter(|e| e["route"] != "POST /v1/ai/stream");
    for e in others {
        assert_eq!(e["end"], "complete", "{e}");
    }
    // Unlimited: billed all the same, one unit each.
    let ent: Vec<_> = events.iter().filter(|e| e["tier"] == "ent").collect();
    assert_eq!(ent.len(), 5 + 5 + 5 + 4);
    assert!(
        ent.iter()
            .all(|e| e["requests"] == 1 && e["tokens"].is_null())
    );
    for e in events {
        assert!(e["input_tokens"].is_null() && e["output_tokens"].is_null());
        assert_eq!(e["key"].as_str().unwrap().len(), 16, "a key id: {e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert!(e["duration_us"].is_u64());
    }
}
