//! A hostile review of input and output token limits: exactness under
//! concurrency (memory, Redis, Cluster, two instances), settlement edges,
//! headers, faults and the loader; the defects it found (counts that
//! wrapped, a debt past the arithmetic's range, per-organisation token
//! limits dropped, metrics, the draft fields) are tests of their fixes.
//! Requests go through a real server on 127.0.0.1:0 and a real client
//! (one streaming test polls its body in process, frame by frame). Every
//! backend runs on a fake clock: nothing sleeps to let time pass.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tierlimit::backend::Backend;
use tierlimit::extract::{Identity, Rejection, RequestRef};
use tierlimit::meter::{TokenMeter, TokenUsage};
use tierlimit::{ApiKey, Extractor, HeaderOptions, Policy, RateLimitLayer};
use tower::ServiceExt;

fn setup() {
    #[cfg(feature = "redis")]
    common::redis::init_secret();
}

type Ex = fn(&RequestRef<'_>, &Policy) -> Result<Identity, Rejection>;

/// API keys, and an estimate from `x-est`.
fn ex(req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
    let mut id = ApiKey::new().extract(req, policy)?;
    if let Some(v) = req.headers.get("x-est") {
        id = id.with_tokens(v.to_str().unwrap().parse().unwrap());
    }
    Ok(id)
}

/// Requests parked in handlers until the test lets them go.
#[derive(Clone)]
struct Gate {
    entered: Arc<AtomicU64>,
    open: Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            entered: Arc::default(),
            open: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

fn num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name).map(|v| v.to_str().unwrap().parse().unwrap())
}

/// `/ai`: reports what its request headers say (`x-in`, `x-out`, `x-add`,
/// a second `x-out2`; `x-ext-in`/`x-ext-out`/`x-ext-total` as a response
/// `TokenUsage`), answers `x-status`, waits at the gate with `x-wait`.
/// Its body is the meter's usage. `/usage` is the usage service.
fn router<B: Backend>(layer: RateLimitLayer<Ex, B>, gate: Gate) -> Router {
    let usage = layer.usage_service();
    Router::new()
        .route(
            "/ai",
            axum::routing::any(move |req: Request<Body>| {
                let gate = gate.clone();
                async move {
                    let h = req.headers().clone();
                    let meter = req.extensions().get::<TokenMeter>().cloned();
                    if h.contains_key("x-wait") {
                        gate.entered.fetch_add(1, Ordering::SeqCst);
                        gate.open.acquire().await.unwrap().forget();
                    }
                    if let Some(m) = &meter {
                        if let Some(n) = num(&h, "x-in") {
                            m.add_input(n);
                        }
                        if let Some(n) = num(&h, "x-out") {
                            m.add_output(n);
                        }
                        if let Some(n) = num(&h, "x-out2") {
                            m.add_output(n);
                        }
                        if let Some(n) = num(&h, "x-add") {
                            m.add(n);
                        }
                    }
                    let used = meter.as_ref().map(|m| m.usage()).unwrap_or_default();
                    let status = num(&h, "x-status").map_or(200, |s| s as u16);
                    let mut res = Response::new(Body::from(
                        json!({"input": used.input, "output": used.output, "unsplit": used.unsplit})
                            .to_string(),
                    ));
                    *res.status_mut() = StatusCode::from_u16(status).unwrap();
                    let ext = (
                        num(&h, "x-ext-in"),
                        num(&h, "x-ext-out"),
                        num(&h, "x-ext-total"),
                    );
                    match ext {
                        (None, None, None) => {}
                        (i, o, None) => {
                            res.extensions_mut()
                                .insert(TokenUsage::split(i.unwrap_or(0), o.unwrap_or(0)));
                        }
                        (_, _, Some(t)) => {
                            res.extensions_mut().insert(TokenUsage(t));
                        }
                    }
                    res
                }
            }),
        )
        .route_service("/usage", usage)
        .layer(layer)
}

/// `router` of `layer` served on 127.0.0.1:0, with a client of it.
async fn app<B: Backend>(layer: RateLimitLayer<Ex, B>, gate: Gate) -> App {
    App::serve(router(layer, gate)).await
}

/// An app served on loopback, and a client of it (clones share both).
#[derive(Clone)]
struct App {
    server: Arc<common::Server>,
    client: reqwest::Client,
}

impl App {
    async fn serve(router: Router) -> Self {
        App {
            server: Arc::new(common::serve(router).await),
            client: common::client(),
        }
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn h(&self, name: &str) -> Option<u64> {
        num(&self.headers, name)
    }
    fn text(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn call(app: &App, key: &str, hs: &[(&str, u64)]) -> Answer {
    let mut req = app
        .client
        .post(app.server.url("/ai"))
        .header("x-api-key", key);
    for (k, v) in hs {
        req = req.header(*k, v.to_string());
    }
    let res = req.send().await.unwrap();
    Answer {
        status: res.status(),
        headers: res.headers().clone(),
        body: res.bytes().await.unwrap(),
    }
}

/// The usage endpoint's `ai` entry for `key`.
async fn usage(app: &App, key: &str) -> Value {
    let url = app.server.url("/usage");
    let res = app.client.get(url).header("x-api-key", key).send().await;
    let v: Value = res.unwrap().json().await.unwrap();
    v["categories"]["ai"].clone()
}

/// What the usage endpoint says is left of the limit of `unit` counted
/// per `per`.
async fn left(app: &App, key: &str, unit: &str, per: &str) -> u64 {
    let ai = usage(app, key).await;
    ai["limits"]
        .as_array()
        .unwrap_or_else(|| panic!("{ai}"))
        .iter()
        .find(|l| l["unit"] == unit && l["per"] == per)
        .unwrap_or_else(|| panic!("no {unit} per {per}: {ai}"))["remaining"]
        .as_u64()
        .unwrap()
}

/// Waits (bounded, yielding) until `left` reaches `want` (settlements land
/// on Redis's I/O thread a moment later); returns the last value.
async fn left_eventually(app: &App, key: &str, unit: &str, per: &str, want: u64) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..3_000 {
        last = left(app, key, unit, per).await;
        if last == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    last
}

/// Per key 100 input / 50 output an hour; per account 150 / 80. Intervals
/// of 24 s and more: a Redis key never expires in real time during a test.
const POLICY: &str = r#"
categories = ["ai"]
[defaults]
read = "ai"
write = "ai"
[tiers.t]
ai = { requests = "1000/hour", input_tokens = "100/hour", output_tokens = "50/hour" }
[tiers.t.per_account]
ai = { input_tokens = "150/hour", output_tokens = "80/hour" }
[[routes]]
path = "/usage"
exempt = true
[keys]
"k1" = { tier = "t", account = "acme" }
"k2" = { tier = "t", account = "acme" }
"#;

fn layer<B: Backend>(policy: &str, backend: B) -> RateLimitLayer<Ex, B> {
    RateLimitLayer::builder(Policy::from_toml_str(policy).unwrap())
        .extractor(ex as Ex)
        .backend(backend)
        .build()
}

// ---------------------------------------------------------------------
// 1. Exactness under concurrency, all backends, two instances.
// ---------------------------------------------------------------------

/// 48 concurrent requests (estimate 7 input) over two keys of one account
/// and over `apps` (instances): every admitted request is parked in its
/// handler until all have been decided, so admission alone is measured:
/// the account's 150 input tokens admit exactly 21 (and no key more than
/// its 100: 14). Then each reports 5 input and 3 output: the buckets end
/// at exactly the limit minus what was reported.
async fn concurrent_admission_is_exact(apps: Vec<App>, gates: Vec<Gate>) {
    let refused = Arc::new(AtomicU64::new(0));
    let per_key = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = Vec::new();
    for i in 0..48usize {
        let app = apps[i % apps.len()].clone();
        let refused = Arc::clone(&refused);
        let per_key = Arc::clone(&per_key);
        tasks.push(tokio::spawn(async move {
            let key = if i % 4 < 2 { "k1" } else { "k2" };
            let a = call(
                &app,
                key,
                &[("x-est", 7), ("x-wait", 1), ("x-in", 5), ("x-out", 3)],
            )
            .await;
            match a.status {
                StatusCode::OK => {
                    per_key[usize::from(key == "k2")].fetch_add(1, Ordering::SeqCst);
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                s => panic!("unexpected {s}: {:?}", a.body),
            }
        }));
    }
    let entered = || {
        gates
            .iter()
            .map(|g| g.entered.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if entered() + refused.load(Ordering::SeqCst) == 48 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let admitted = entered();
    assert_eq!(admitted + refused.load(Ordering::SeqCst), 48);
    for g in &gates {
        g.open.add_permits(48);
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (a1, a2) = (
        per_key[0].load(Ordering::SeqCst),
        per_key[1].load(Ordering::SeqCst),
    );
    assert_eq!(
        admitted, 21,
        "150 / 7 admitted on the account ({a1} + {a2})"
    );
    assert!(a1 <= 14 && a2 <= 14, "no key past 100 / 7: {a1}, {a2}");
    // Settled: 5 input and 3 output each.
    let app = &apps[0];
    let acct_in = left_eventually(app, "k1", "input tokens", "account", 150 - 21 * 5).await;
    assert_eq!(acct_in, 150 - 21 * 5);
    let acct_out = left_eventually(app, "k1", "output tokens", "account", 80 - 21 * 3).await;
    assert_eq!(acct_out, 80 - 21 * 3);
    let k1_in = left_eventually(app, "k1", "input tokens", "key", 100 - a1 * 5).await;
    assert_eq!(k1_in, 100 - a1 * 5);
    let k2_out = left_eventually(app, "k2", "output tokens", "key", 50 - a2 * 3).await;
    assert_eq!(k2_out, 50 - a2 * 3);
    // Refused requests charged nothing: the request limit counted the 21.
    assert_eq!(left(app, "k1", "requests", "key").await, 1000 - a1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_is_exact_on_memory() {
    setup();
    let gate = Gate::default();
    let app = app(layer(POLICY, common::fake_memory()), gate.clone()).await;
    concurrent_admission_is_exact(vec![app], vec![gate]).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_is_exact_on_redis_two_instances() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let server = common::redis::RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let (g1, g2) = (Gate::default(), Gate::default());
    let b1 = common::redis::fake_clock_backend(&server, &clock).await;
    let b2 = common::redis::fake_clock_backend(&server, &clock).await;
    let apps = vec![
        app(layer(POLICY, b1), g1.clone()).await,
        app(layer(POLICY, b2), g2.clone()).await,
    ];
    concurrent_admission_is_exact(apps, vec![g1, g2]).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_is_exact_on_cluster_two_instances() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let cluster = common::redis::RedisCluster::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let (g1, g2) = (Gate::default(), Gate::default());
    let b1 = common::redis::fake_clock_cluster_backend(&cluster, &clock).await;
    let b2 = common::redis::fake_clock_cluster_backend(&cluster, &clock).await;
    let apps = vec![
        app(layer(POLICY, b1), g1.clone()).await,
        app(layer(POLICY, b2), g2.clone()).await,
    ];
    concurrent_admission_is_exact(apps, vec![g1, g2]).await;
}

// ---------------------------------------------------------------------
// 2. Settlement edges.
// ---------------------------------------------------------------------

/// Input only, output only, both, neither, more input than estimated, a
/// response extension: each kind settles to exactly what was reported.
async fn settlement_edges(app: App) {
    let mut used_in = 0;
    let mut used_out = 0;
    let cases: [&[(&str, u64)]; 6] = [
        &[("x-est", 10), ("x-in", 4)],                  // input only
        &[("x-est", 10), ("x-out", 6)],                 // output only
        &[("x-est", 3), ("x-in", 9), ("x-out", 2)],     // more input than estimated
        &[("x-est", 5)],                                // neither
        &[("x-ext-in", 2), ("x-ext-out", 1)],           // a response extension
        &[("x-est", 2), ("x-in", 1), ("x-ext-out", 4)], // both ways
    ];
    let adds = [(4, 0), (0, 6), (9, 2), (0, 0), (2, 1), (1, 4)];
    for (hs, (i, o)) in cases.iter().zip(adds) {
        let a = call(&app, "k1", hs).await;
        assert_eq!(a.status, StatusCode::OK, "{hs:?}");
        used_in += i;
        used_out += o;
        assert_eq!(
            left_eventually(&app, "k1", "input tokens", "key", 100 - used_in).await,
            100 - used_in,
            "{hs:?}"
        );
        assert_eq!(
            left_eventually(&app, "k1", "output tokens", "key", 50 - used_out).await,
            50 - used_out,
            "{hs:?}"
        );
        assert_eq!(
            left(&app, "k1", "output tokens", "account").await,
            80 - used_out,
            "{hs:?}"
        );
    }
}

#[tokio::test]
async fn settlement_edges_on_memory() {
    setup();
    settlement_edges(app(layer(POLICY, common::fake_memory()), Gate::default()).await).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_edges_on_redis_cluster() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_cluster, _clock, backend) = common::redis::cluster_on_fake_clock().await;
    settlement_edges(app(layer(POLICY, backend), Gate::default()).await).await;
}

/// An estimate above the input burst is a 400 that names input tokens
/// (never an endless 429); an estimate above the *output* burst is fine
/// (output limits reserve 1).
#[tokio::test]
async fn estimate_above_input_burst_is_400() {
    setup();
    let app = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    let a = call(&app, "k1", &[("x-est", 101)]).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let p = a.json();
    assert_eq!(p["type"], "urn:tierlimit:problem:cost-exceeds-limit", "{p}");
    assert_eq!(p["unit"], "input tokens", "{p}");
    let a = call(&app, "k1", &[("x-est", 100)]).await;
    assert_eq!(a.status, StatusCode::OK);
    // The per-account input burst of 150 is above the key's: 100 fits both.
    assert_eq!(left(&app, "k1", "input tokens", "account").await, 150);
}

/// A request refused by an output limit (a debt) charges nothing anywhere:
/// not the input limits, not the request limit, not the other key's.
#[tokio::test]
async fn refused_by_output_charges_nothing() {
    setup();
    let app = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    // 60 output on a 50 burst: 10 in debt on the key, 20 left on the account.
    assert_eq!(
        call(&app, "k1", &[("x-out", 60)]).await.status,
        StatusCode::OK
    );
    assert_eq!(left(&app, "k1", "output tokens", "key").await, 0);
    let before = usage(&app, "k1").await;
    for _ in 0..5 {
        let a = call(&app, "k1", &[("x-est", 9), ("x-in", 9)]).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.h("x-ratelimit-limit-output-tokens"), Some(50));
        // 11 × 72 s = 792 s: the debt and this request's 1.
        assert_eq!(a.h("retry-after"), Some(792));
        assert_eq!(a.json()["unit"], "output tokens");
    }
    let after = usage(&app, "k1").await;
    let rem = |v: &Value| -> Vec<(Value, Value, Value)> {
        v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["unit"].clone(), l["per"].clone(), l["remaining"].clone()))
            .collect()
    };
    assert_eq!(rem(&before), rem(&after), "nothing charged");
    // The other key of the account still has its own output room.
    assert_eq!(
        call(&app, "k2", &[("x-out", 1)]).await.status,
        StatusCode::OK
    );
}

/// A 5xx with `refund_on`: the request is given back; the tokens it
/// reported stay charged, those it reserved and did not use go back.
#[tokio::test]
async fn refund_on_5xx_settles_tokens_as_reported() {
    setup();
    let policy = POLICY.replace(
        "ai = { requests = \"1000/hour\", input_tokens",
        "ai = { requests = \"1000/hour\", refund_on = [\"5xx\"], input_tokens",
    );
    let app = app(layer(&policy, common::fake_memory()), Gate::default()).await;
    let a = call(
        &app,
        "k1",
        &[("x-est", 20), ("x-in", 3), ("x-out", 4), ("x-status", 503)],
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(left(&app, "k1", "requests", "key").await, 1000);
    assert_eq!(left(&app, "k1", "input tokens", "key").await, 97);
    assert_eq!(left(&app, "k1", "output tokens", "key").await, 46);
}

/// A stream that reports output after the head, dropped mid-way by the
/// client: settled once, with what was reported until then.
#[tokio::test]
async fn stream_reporting_after_the_head_settles_once() {
    setup();
    let l = layer(POLICY, common::fake_memory());
    let usage_svc = l.usage_service();
    let app = Router::new()
        .route(
            "/ai",
            axum::routing::post(
                |axum::Extension(m): axum::Extension<TokenMeter>| async move {
                    m.add_input(2);
                    let s = futures_util::stream::unfold(0u32, move |i| {
                        let m = m.clone();
                        async move {
                            m.add_output(3);
                            Some((
                                Ok::<_, std::convert::Infallible>(Bytes::from(format!("{i}"))),
                                i + 1,
                            ))
                        }
                    });
                    Body::from_stream(s)
                },
            ),
        )
        .route_service("/usage", usage_svc)
        .layer(l);
    // The stream is polled here, in process, frame by frame (a server
    // would run ahead of the client); the usage is read through a real
    // server of the same app (clones share the layer's backend).
    let served = App::serve(app.clone()).await;
    let req = Request::post("/ai")
        .header("x-api-key", "k1")
        .body(Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    for _ in 0..4 {
        body.frame().await.unwrap().unwrap();
    }
    // Four chunks polled: 4 × 3 output reported. Nothing settled yet.
    assert_eq!(left(&served, "k1", "output tokens", "key").await, 49);
    drop(body);
    assert_eq!(left(&served, "k1", "output tokens", "key").await, 50 - 12);
    assert_eq!(left(&served, "k1", "input tokens", "key").await, 98);
}

/// A total without a kind (`TokenUsage(n)`, the form before input and
/// output were told apart) in a cell with input and output limits only
/// counts in none of them: as documented, but it means a handler still on
/// the old form is never charged — its whole reservation comes back.
#[tokio::test]
async fn unsplit_total_counts_in_no_input_or_output_limit() {
    setup();
    let app = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    let a = call(&app, "k1", &[("x-est", 40), ("x-ext-total", 500)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(left(&app, "k1", "input tokens", "key").await, 100);
    assert_eq!(left(&app, "k1", "output tokens", "key").await, 50);
}

// ---------------------------------------------------------------------
// Defects: overflow of reported counts.
// ---------------------------------------------------------------------

/// Reporting `u64::MAX` output tokens leaves the key in debt (refused);
/// reporting one more after it wraps the meter's counter to 0 and the
/// whole debt disappears: the next request is admitted with a full output
/// bucket. `TokenMeter::add_output` (and `add_input`, `add`) use a plain
/// `fetch_add` (src/meter.rs:247, 253, 259), which wraps; `TokenUsage::total`
/// saturates, the counters do not.
#[tokio::test]
async fn reported_counts_saturate_and_never_forgive_a_debt() {
    setup();
    let app = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    let a = call(&app, "k1", &[("x-out", u64::MAX), ("x-out2", 2)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json()["output"].as_u64(),
        Some(u64::MAX),
        "u64::MAX + 2 output tokens reported: the count must saturate, not wrap to 1"
    );
    let next = call(&app, "k1", &[]).await;
    assert_eq!(
        next.status,
        StatusCode::TOO_MANY_REQUESTS,
        "an astronomical output debt was forgiven: {}",
        left(&app, "k1", "output tokens", "key").await
    );
}

/// A large input report (1e9 tokens on a 100/hour limit: a debt past
/// u64::MAX nanoseconds, which the memory backend saturates to a TAT of
/// u64::MAX) then a request with an estimate above 1: the memory
/// backend's GCRA adds to the saturated TAT without checking and panics
/// (`attempt to add with overflow` in src/backend/memory/gcra.rs:123,
/// `tat + add + reserve * t`; also `tat.max(now) + t + add` at :131). In a
/// release build the sum wraps instead and the request is admitted with
/// the debt erased. Should: refused (429), no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_input_debt_refuses_without_a_panic() {
    setup();
    let app = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    let a = call(&app, "k1", &[("x-est", 1), ("x-in", 1_000_000_000)]).await;
    assert_eq!(a.status, StatusCode::OK);
    let next = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "k1", &[("x-est", 2)]).await.status }
    })
    .await;
    match next {
        Ok(s) => assert_eq!(s, StatusCode::TOO_MANY_REQUESTS),
        Err(e) => panic!("the check panicked (overflow on a saturated TAT): {e}"),
    }
}

/// The same astronomical output debt on Redis: memory refuses the next
/// request for centuries; Redis must too (the backends are one contract).
/// The settle script multiplies `units * t` in Lua doubles and stores
/// the TAT with `string.format('%d', tat)` (src/backend/redis/gcra.lua,
/// `gcra_store`; settle.lua:39), which cannot represent it: the debt is
/// lost and the next request is admitted.
#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_debt_is_kept_on_redis_as_in_memory() {
    setup();
    if !common::redis::ready() {
        return;
    }
    // Memory: refused.
    let mem = app(layer(POLICY, common::fake_memory()), Gate::default()).await;
    assert_eq!(
        call(&mem, "k1", &[("x-out", u64::MAX)]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&mem, "k1", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Redis: the same.
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    let app = app(layer(POLICY, backend), Gate::default()).await;
    assert_eq!(
        call(&app, "k1", &[("x-out", u64::MAX)]).await.status,
        StatusCode::OK
    );
    let left = left_eventually(&app, "k1", "output tokens", "key", 0).await;
    let next = call(&app, "k1", &[]).await;
    assert_eq!(
        next.status,
        StatusCode::TOO_MANY_REQUESTS,
        "memory refuses; Redis forgot the debt (output left: {left})"
    );
}

// ---------------------------------------------------------------------
// 3. Headers.
// ---------------------------------------------------------------------

/// Token headers only where the policy has such limits; values right
/// after a debt; the refusal's Reset is the real wait.
#[tokio::test]
async fn token_headers_only_where_used_and_exact_after_debt() {
    setup();
    const NOW: u64 = 1_900_000_000;
    let l = RateLimitLayer::builder(Policy::from_toml_str(POLICY).unwrap())
        .extractor(ex as Ex)
        .backend(common::fake_memory())
        .unix_clock(|| NOW)
        .build();
    let app = app(l, Gate::default()).await;
    let a = call(&app, "k1", &[("x-est", 4), ("x-out", 49)]).await;
    assert_eq!(a.h("x-ratelimit-remaining-input-tokens"), Some(96));
    assert_eq!(a.h("x-ratelimit-remaining-output-tokens"), Some(49));
    assert_eq!(a.h("x-ratelimit-limit-tokens"), None);
    // Settled: 49 output on the key (1 left), 49 on the account (31 left).
    let a = call(&app, "k1", &[("x-out", 1)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.h("x-ratelimit-remaining-output-tokens"), Some(0));
    assert_eq!(a.h("x-ratelimit-remaining-input-tokens"), Some(99));
    let a = call(&app, "k1", &[]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    // Full after 50 × 72 s; this request conforms after 72 s.
    assert_eq!(a.h("retry-after"), Some(72));
    assert_eq!(a.h("x-ratelimit-reset-output-tokens"), Some(NOW + 3600));
    assert_eq!(a.h("x-ratelimit-reset"), Some(NOW + 3600));
}

/// A refusal by the output limit: `RateLimit-Policy` lists the request
/// limits, and the draft `RateLimit` field, which would have to name one
/// of them, is left out (it named the request limit with the output
/// limit's numbers).
#[tokio::test]
async fn a_token_limits_refusal_writes_no_misnamed_draft_ratelimit_field() {
    setup();
    let l = RateLimitLayer::builder(Policy::from_toml_str(POLICY).unwrap())
        .extractor(ex as Ex)
        .backend(common::fake_memory())
        .headers(HeaderOptions::default().ietf_draft(true))
        .build();
    let app = app(l, Gate::default()).await;
    assert_eq!(
        call(&app, "k1", &[("x-out", 80)]).await.status,
        StatusCode::OK
    );
    let a = call(&app, "k1", &[]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        a.text("ratelimit-policy")
            .is_some_and(|p| p.contains(";q=1000;"))
    );
    assert_eq!(a.text("ratelimit"), None, "no field naming another limit");
}

/// A cell with token limits only: `RateLimit-Policy: "t.ai";q=0;w=0` — a
/// quota of zero, which the draft reads as "nothing allowed", on a
/// request that was admitted. `quota_headers` pushes a limit of 0 when a
/// cell has no request limit (src/view.rs:207-214); `write_rate` writes it.
#[tokio::test]
async fn a_tokens_only_cell_writes_no_draft_quota_of_zero() {
    setup();
    let policy = POLICY.replace(
        "ai = { requests = \"1000/hour\", input_tokens",
        "ai = { input_tokens",
    );
    let l = RateLimitLayer::builder(Policy::from_toml_str(&policy).unwrap())
        .extractor(ex as Ex)
        .backend(common::fake_memory())
        .headers(HeaderOptions::default().ietf_draft(true))
        .build();
    let app = app(l, Gate::default()).await;
    let a = call(&app, "k1", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    let p = a.text("ratelimit-policy").unwrap_or_default();
    assert!(
        !p.contains("q=0"),
        "an admitted request's RateLimit-Policy says a quota of 0: {p} (RateLimit: {:?})",
        a.text("ratelimit")
    );
}

// ---------------------------------------------------------------------
// 5. Loader.
// ---------------------------------------------------------------------

/// `[tiers.T.per_org]` is request-only: `tokens`, `refund_on` and
/// `concurrency` are refused there, naming the entry. `input_tokens` and
/// `output_tokens` are not: the policy loads and the organisation's
/// output limit is silently dropped (src/policy/file/sections.rs:155
/// checks `cell.tokens`, not `cell.input_tokens` / `cell.output_tokens`).
#[test]
fn per_org_input_and_output_tokens_are_refused_at_load() {
    let text = r#"
categories = ["ai"]
[defaults]
read = "ai"
write = "ai"
[tiers.t]
ai = "100/hour"
[tiers.t.per_org]
ai = { requests = "1000/hour", output_tokens = "10/hour" }
"#;
    let tokens = text.replace("output_tokens", "tokens");
    let e = Policy::from_toml_str(&tokens).unwrap_err().to_string();
    assert!(e.contains("tiers.t.per_org.ai"), "{e}");
    match Policy::from_toml_str(text) {
        Err(e) => assert!(e.to_string().contains("tiers.t.per_org.ai"), "{e}"),
        Ok(p) => {
            let (t, ai) = (p.tier("t").unwrap(), p.category("ai").unwrap());
            panic!(
                "loaded, and the organisation's output limit is gone: {:?}",
                p.limits(t, ai)
            );
        }
    }
}

/// Input and output limits count towards MAX_LIMITS (naming the entry);
/// calendar periods and lists load; a custom limit that tries to set them
/// is refused with a message that says a multiplier scales them.
#[test]
fn loader_counts_and_messages() {
    let ok = r#"
categories = ["ai"]
[defaults]
read = "ai"
write = "ai"
[tiers.t]
ai = { requests = ["10/minute", "100/hour"], input_tokens = ["100/minute", "1000/day"], output_tokens = { limit = "500/day", period = "calendar" } }
[tiers.t.per_account]
ai = { input_tokens = "5000/day", output_tokens = "2000/day", concurrency = 2 }
"#;
    let p = Policy::from_toml_str(ok).unwrap();
    let (t, ai) = (p.tier("t").unwrap(), p.category("ai").unwrap());
    let l = p.limits(t, ai);
    assert_eq!(l.input_tokens().len(), 2);
    assert_eq!(l.output_tokens().len(), 1);
    assert!(l.output_tokens()[0].period().is_calendar());
    let nine = ok.replace(
        "ai = { input_tokens = \"5000/day\"",
        "ai = { requests = [\"1/second\", \"2/minute\", \"3/hour\"], input_tokens = \"5000/day\"",
    );
    let e = Policy::from_toml_str(&nine).unwrap_err().to_string();
    assert!(e.contains("tiers.t."), "{e}");
    assert!(e.contains("more than 8 limits"), "{e}");
    let custom = format!(
        "{ok}\n[custom_limits.\"some-key-0001\"]\nai = {{ requests = \"5/minute\", output_tokens = \"9/day\" }}\n"
    );
    let e = Policy::from_toml_str(&custom).unwrap_err().to_string();
    assert!(
        e.contains("cannot set `input_tokens` or `output_tokens`"),
        "{e}"
    );
    assert!(!e.contains("some-key-0001"), "the key is echoed: {e}");
}

// ---------------------------------------------------------------------
// 6. Usage feed and usage endpoint agree.
// ---------------------------------------------------------------------

/// Sums per account of the feed's input and output equal what the usage
/// endpoint shows as used, over a mix of reports.
#[tokio::test]
async fn feed_sums_equal_usage_endpoint() {
    setup();
    let (seen, sink) = common::feed::collecting();
    let feed = tierlimit::feed::UsageFeed::new(sink, 100).unwrap();
    let l = RateLimitLayer::builder(Policy::from_toml_str(POLICY).unwrap())
        .extractor(ex as Ex)
        .backend(common::fake_memory())
        .usage_feed(feed.clone())
        .build();
    let app = app(l, Gate::default()).await;
    let calls: [(&str, &[(&str, u64)]); 6] = [
        ("k1", &[("x-est", 10), ("x-in", 4), ("x-out", 7)]),
        ("k2", &[("x-in", 11)]),
        ("k1", &[("x-out", 5)]),
        ("k2", &[("x-est", 3), ("x-ext-in", 2), ("x-ext-out", 9)]),
        ("k1", &[]),
        ("k2", &[("x-est", 3), ("x-in", 1), ("x-status", 500)]),
    ];
    for (key, hs) in calls {
        assert!(
            call(&app, key, hs).await.status.is_success()
                || hs.iter().any(|(k, _)| *k == "x-status")
        );
    }
    // Six ai events plus the usage reads are exempt (no event).
    common::feed::written(&feed, 6).await;
    let events = seen.lock().unwrap().clone();
    let ai: Vec<_> = events.iter().filter(|e| e.category == "ai").collect();
    assert_eq!(ai.len(), 6);
    let sum_in: u64 = ai.iter().map(|e| e.input_tokens.unwrap()).sum();
    let sum_out: u64 = ai.iter().map(|e| e.output_tokens.unwrap()).sum();
    assert_eq!(
        150 - left(&app, "k1", "input tokens", "account").await,
        sum_in
    );
    assert_eq!(
        80 - left(&app, "k1", "output tokens", "account").await,
        sum_out
    );
}

// ---------------------------------------------------------------------
// 4. Redis faults during settlement.
// ---------------------------------------------------------------------

/// A settlement while Redis is frozen, killed, restarted or flushed: no
/// panic, no 500; every answer is a 200 or a 429 (the fallback policy).
#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_faults_during_settlement_never_500() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let mut server = common::redis::RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let backend = tierlimit::RedisBackend::builder(server.url())
        .fake_clock(clock.clone())
        .timeout(std::time::Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let gate = Gate::default();
    let policy = format!("{POLICY}\n\"f-stop\" = \"t\"\n\"f-kill\" = \"t\"\n\"f-flush\" = \"t\"\n");
    let app = app(layer(&policy, backend), gate.clone()).await;
    let ok = |s: StatusCode| s == StatusCode::OK || s == StatusCode::TOO_MANY_REQUESTS;
    for fault in ["stop", "kill", "flush"] {
        let key = format!("f-{fault}");
        let parked = tokio::spawn({
            let (app, key) = (app.clone(), key.clone());
            async move {
                call(
                    &app,
                    &key,
                    &[("x-wait", 1), ("x-est", 5), ("x-in", 30), ("x-out", 60)],
                )
                .await
                .status
            }
        });
        while gate.entered.load(Ordering::SeqCst) == 0 {
            assert!(
                !parked.is_finished(),
                "{fault}: the parked request was answered early"
            );
            tokio::task::yield_now().await;
        }
        gate.entered.store(0, Ordering::SeqCst);
        match fault {
            "stop" => server.stop_process(),
            "kill" => server.kill(),
            _ => {
                server.cli(&["FLUSHALL"]);
            }
        }
        gate.open.add_permits(1);
        let s = parked.await.expect("no panic");
        assert!(ok(s), "{fault}: {s}");
        for _ in 0..3 {
            let s = call(&app, &key, &[("x-out", 1)]).await.status;
            assert!(ok(s), "{fault}: {s}");
        }
        match fault {
            "stop" => server.resume(),
            "kill" => server.restart(),
            _ => {}
        }
        for _ in 0..3 {
            let s = call(&app, &key, &[("x-out", 1)]).await.status;
            assert!(ok(s), "{fault} then back: {s}");
        }
        let _ = usage(&app, &key).await;
    }
}

// ---------------------------------------------------------------------
// Metrics.
// ---------------------------------------------------------------------

/// `tierlimit_tokens_charged_total` ("tokens charged beyond the
/// estimates") and `tierlimit_tokens_refunded_total` ("tokens of
/// estimates given back") compare the request's *total* with its
/// estimate (src/meter.rs:379-388), but an input/output cell reserves the
/// estimate as input and 1 as output. One request, estimate 10, reporting
/// 2 input and 400 output: 8 input tokens are given back and the output
/// is charged 399 beyond its reservation. The counters say 392 charged and
/// 0 refunded.
#[cfg(feature = "metrics")]
#[tokio::test]
async fn token_metrics_follow_the_input_output_split() {
    setup();
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map(|h| {
            let _ = RECORDER.set(h);
        })
        .ok();
    let handle = RECORDER.get().expect("one recorder for this binary");
    let policy = POLICY
        .replace("[tiers.t]", "[tiers.m]")
        .replace("[tiers.t.per_account]", "[tiers.m.per_account]")
        .replace("tier = \"t\"", "tier = \"m\"");
    let app = app(layer(&policy, common::fake_memory()), Gate::default()).await;
    let a = call(&app, "k1", &[("x-est", 10), ("x-in", 2), ("x-out", 400)]).await;
    assert_eq!(a.status, StatusCode::OK);
    let text = handle.render();
    let sample = |name: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(name) && l.contains("tier=\"m\"") && l.contains("category=\"ai\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    let (charged, refunded) = (
        sample("tierlimit_tokens_charged_total"),
        sample("tierlimit_tokens_refunded_total"),
    );
    assert_eq!(
        (charged, refunded),
        (399.0, 8.0),
        "charged beyond reservations / estimates given back"
    );
}

#[cfg(feature = "metrics")]
static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

// ---------------------------------------------------------------------
// Calendar output limits.
// ---------------------------------------------------------------------

const CALENDAR: &str = r#"
categories = ["ai"]
[defaults]
read = "ai"
write = "ai"
[tiers.t]
ai = { requests = "1000/hour", input_tokens = "100/hour", output_tokens = { limit = "20/day", period = "calendar" } }
[[routes]]
path = "/usage"
exempt = true
[keys]
"k1" = "t"
"#;

/// A calendar output limit: a debt past it refuses until the day ends
/// (Retry-After = the seconds to midnight UTC), a refund gives back the
/// reserved 1, and a refusal charges nothing.
async fn calendar_output<B: Backend>(backend: B) {
    const NOW: u64 = 1_900_000_000; // 22,400 s before midnight UTC
    let l = RateLimitLayer::builder(Policy::from_toml_str(CALENDAR).unwrap())
        .extractor(ex as Ex)
        .backend(backend)
        .unix_clock(|| NOW)
        .build();
    let app = app(l, Gate::default()).await;
    // Nothing reported: the reserved 1 comes back.
    assert_eq!(call(&app, "k1", &[]).await.status, StatusCode::OK);
    assert_eq!(
        left_eventually(&app, "k1", "output tokens", "key", 20).await,
        20
    );
    // 30 of 20: in debt for the rest of the day.
    let a = call(&app, "k1", &[("x-out", 30)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.h("x-ratelimit-remaining-output-tokens"), Some(19));
    assert_eq!(
        left_eventually(&app, "k1", "output tokens", "key", 0).await,
        0
    );
    for _ in 0..3 {
        let a = call(&app, "k1", &[("x-est", 5)]).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.h("retry-after"), Some(22_400));
        assert_eq!(a.h("x-ratelimit-reset-output-tokens"), Some(NOW + 22_400));
        assert_eq!(a.json()["unit"], "output tokens");
    }
    assert_eq!(left(&app, "k1", "input tokens", "key").await, 100);
}

#[tokio::test]
async fn calendar_output_limit_on_memory() {
    setup();
    calendar_output(common::fake_memory()).await;
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_output_limit_on_redis() {
    setup();
    if !common::redis::ready() {
        return;
    }
    let (_server, _clock, backend) = common::redis::single_node_on_fake_clock().await;
    calendar_output(backend).await;
}
