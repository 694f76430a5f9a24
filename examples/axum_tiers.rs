//! The demo API server: the spec's plans and categories on an axum router.
//!
//! ```sh
//! cargo run --example axum_tiers
//! curl -i -H 'X-API-Key: free-demo-key' http://127.0.0.1:3000/v1/account
//! ```
//!
//! `BIND` (default `127.0.0.1:3000`) and `POLICY` (default
//! `examples/policy.toml`) configure it. `ADMIN_TOKEN` mounts the admin API
//! at `/admin/v1`; `USAGE_LOG` appends one JSON line per admitted request
//! to that file (the usage feed); `REDIS_URL` (with `--features redis`) shares limits and
//! admin changes across instances (`REDIS_BATCHES=1`: spent from batches); `--features watch` reloads `$POLICY`
//! when it changes. Demo keys: `free-demo-key`,
//! `pro-demo-key`, `enterprise-demo-key`.
//!
//! `GET /v1/endpoints?work_ms=N` (0 to 10,000) stands for a saturated
//! dependency: it holds one of `$WORKERS` (default 8) permits for N ms,
//! waiting for one first, as a request waits for a database pool. With a
//! policy that has an `[overload]` table (`POLICY=examples/overload.toml`)
//! the layer sheds load by tier when the service is past its capacity.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tierlimit::{
    ApiKey, Extractor, Policy, RateLimitLayer,
    backend::Backend,
    extract::{Identity, Rejection, RequestRef},
    feed::{JsonLines, UsageFeed},
};

/// The demo's extractor: API keys, and a batch's cost from `X-Batch-Size`
/// or `?size=` (1 to 100; anything else is a 400 that says so).
pub(crate) type DemoExtractor = fn(&RequestRef<'_>, &Policy) -> Result<Identity, Rejection>;

pub(crate) fn demo_extractor(req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
    let mut id = ApiKey::new().extract(req, policy)?;
    // A client may say how many tokens it expects to use: the layer
    // reserves that many (else 1) and settles the rest when the answer
    // is over.
    if let Some(v) = req.headers.get("x-max-tokens") {
        let n = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|n| (1..=8192).contains(n))
            .ok_or(Rejection::InvalidCost(
                "X-Max-Tokens must be a number of tokens from 1 to 8192",
            ))?;
        id = id.with_tokens(n);
    }
    // Only the batch route reads a batch size; everywhere else the route's
    // cost stands and these inputs are ignored.
    if req.uri.path() != "/v1/batch" {
        return Ok(id);
    }
    let from_query = || {
        req.uri
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix("size="))
    };
    let size = match req.headers.get("x-batch-size") {
        Some(v) => Some(v.to_str().unwrap_or("")),
        None => from_query(),
    };
    match size {
        None => Ok(id),
        // The count multiplies the route's cost; it never replaces it.
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .map(|n| id.with_cost(n))
            .ok_or(Rejection::InvalidCost(
                "the batch size (X-Batch-Size or ?size=) must be a number from 1 to 100",
            )),
    }
}

/// The demo's layer on any backend.
#[allow(dead_code)] // the tests use it
pub(crate) fn limits<B: Backend>(policy: Policy, backend: B) -> RateLimitLayer<DemoExtractor, B> {
    limits_with_feed(policy, backend, None)
}

/// The demo's layer on any backend, sending usage events to `feed`.
pub(crate) fn limits_with_feed<B: Backend>(
    policy: Policy,
    backend: B,
    feed: Option<UsageFeed>,
) -> RateLimitLayer<DemoExtractor, B> {
    let builder = RateLimitLayer::builder(policy)
        .extractor(demo_extractor as DemoExtractor)
        .backend(backend);
    match feed {
        Some(feed) => builder.usage_feed(feed).build(),
        None => builder.build(),
    }
}

/// With `USAGE_LOG` set, the usage feed: one JSON line per admitted
/// request appended to that file.
#[allow(dead_code)]
fn usage_log() -> Result<Option<UsageFeed>, Box<dyn std::error::Error>> {
    let Some(path) = std::env::var_os("USAGE_LOG").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let feed = UsageFeed::new(JsonLines::append(&path)?, 10_000)?;
    tracing::info!(path = %std::path::Path::new(&path).display(), "usage feed");
    Ok(Some(feed))
}

/// The demo's routes behind one rate-limit layer, `/healthz` outside it.
#[allow(dead_code)] // the tests use it
pub(crate) fn app<E: Extractor, B: Backend>(limits: RateLimitLayer<E, B>) -> Router {
    app_with_admin(limits, None)
}

/// The same, with the admin service at `/admin/v1` (outside the limits)
/// when an admin token is given; without one those routes do not exist.
pub(crate) fn app_with_admin<E: Extractor, B: Backend>(
    limits: RateLimitLayer<E, B>,
    admin_token: Option<&str>,
) -> Router {
    let admin = admin_token.map(|t| limits.admin_service().token("admin", t));
    let workers = Workers::from_env();
    let api = Router::new()
        .route("/v1/account", get(account).patch(update_account))
        .route("/v1/clusters", get(list_clusters).post(create_cluster))
        .route(
            "/v1/endpoints",
            get(move |uri: axum::http::Uri| list_endpoints(uri, workers.clone()))
                .post(create_endpoint),
        )
        .route("/v1/ai/completions", post(completion))
        .route("/v1/training/jobs", post(create_training_job))
        .route("/v1/batch", post(batch))
        .route_service("/v1/rate_limit", limits.usage_service())
        .layer(limits);
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .merge(api);
    let app = match admin {
        Some(admin) => app.nest_service("/admin/v1", admin),
        None => app,
    };
    // Prometheus text at /metrics (not limited), with `--features metrics`.
    #[cfg(feature = "metrics")]
    let app = match METRICS.get() {
        Some(handle) => {
            let handle = handle.clone();
            app.route("/metrics", get(move || std::future::ready(handle.render())))
        }
        None => app,
    };
    app
}

#[cfg(feature = "metrics")]
static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the Prometheus recorder once; call before building the app.
#[cfg(feature = "metrics")]
pub(crate) fn install_metrics() {
    METRICS.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("one metrics recorder per process")
    });
}

async fn account() -> Json<Value> {
    Json(json!({ "id": "acct_demo", "plan": "see X-RateLimit-Limit" }))
}
async fn update_account() -> Json<Value> {
    Json(json!({ "id": "acct_demo", "updated": true }))
}
/// `?delay_ms=N` (0 to 10,000): how long a slow demo route waits before
/// answering, so that concurrency limits can be seen with curl.
fn delay_of(uri: &axum::http::Uri) -> Result<std::time::Duration, (StatusCode, Json<Value>)> {
    let Some(v) = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
    else {
        return Ok(std::time::Duration::ZERO);
    };
    match v.parse::<u64>() {
        Ok(ms) if ms <= 10_000 => Ok(std::time::Duration::from_millis(ms)),
        _ => Err((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "delay_ms must be a number of milliseconds from 0 to 10000" })),
        )),
    }
}

async fn list_clusters(uri: axum::http::Uri) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    tokio::time::sleep(delay_of(&uri)?).await;
    Ok(Json(
        json!({ "clusters": [{ "id": "gpu-a100-1", "gpus": 8 }] }),
    ))
}
async fn create_cluster() -> Json<Value> {
    Json(json!({ "id": "gpu-h100-2", "status": "provisioning" }))
}
/// The demo's saturated dependency: `$WORKERS` permits (default 8), each
/// held for a request's `work_ms`.
#[derive(Clone)]
struct Workers(std::sync::Arc<tokio::sync::Semaphore>);

impl Workers {
    fn from_env() -> Self {
        let n = std::env::var("WORKERS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=10_000).contains(n))
            .unwrap_or(8);
        Workers(std::sync::Arc::new(tokio::sync::Semaphore::new(n)))
    }
}

/// `?work_ms=N` (0 to 10,000): the milliseconds of work a request needs
/// from one of the workers.
fn work_of(
    uri: &axum::http::Uri,
) -> Result<Option<std::time::Duration>, (StatusCode, Json<Value>)> {
    let Some(v) = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("work_ms=")))
    else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(ms) if ms <= 10_000 => Ok(Some(std::time::Duration::from_millis(ms))),
        _ => Err((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "work_ms must be a number of milliseconds from 0 to 10000" })),
        )),
    }
}

async fn list_endpoints(
    uri: axum::http::Uri,
    workers: Workers,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    if let Some(work) = work_of(&uri)? {
        // Wait for a worker (FIFO), then hold it for the work.
        let _permit = workers
            .0
            .acquire()
            .await
            .expect("the semaphore is never closed");
        tokio::time::sleep(work).await;
    }
    Ok(Json(
        json!({ "endpoints": [{ "id": "ep_1", "model": "llama" }] }),
    ))
}
async fn create_endpoint() -> Json<Value> {
    Json(json!({ "id": "ep_2", "status": "deploying" }))
}
/// The demo model's request: `{"prompt": "...", "max_tokens": N, "stream": false}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    stream: bool,
}

fn default_max_tokens() -> u32 {
    16
}

/// A 400 for a body the demo model cannot take.
fn bad_completion(detail: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = json!({
        "type": "urn:tierlimit-demo:problem:invalid-completion",
        "title": "Bad Request",
        "status": 400,
        "detail": detail,
    });
    (
        StatusCode::BAD_REQUEST,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

/// A fake model: "generates" `max_tokens` tokens. Usage is the prompt's
/// whitespace-separated words (input) plus `max_tokens` (output), reported
/// to the layer's [`TokenMeter`] apart (as OpenAI reports `usage`:
/// `prompt_tokens` and `completion_tokens`); with `"stream": true`, as
/// server-sent events, one per chunk of up to 16 tokens, reporting each
/// chunk as it goes, then `[DONE]`. A client that goes away mid-stream is
/// charged for the chunks sent until then.
async fn completion(
    meter: Option<axum::Extension<tierlimit::meter::TokenMeter>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad_completion(format!(
                "the body must be JSON {{\"prompt\": \"...\", \"max_tokens\": 1-4096, \"stream\": false}}: {e}"
            ));
        }
    };
    if !(1..=4096).contains(&req.max_tokens) {
        return bad_completion("max_tokens must be from 1 to 4096".into());
    }
    let meter = meter.map(|axum::Extension(m)| m);
    let prompt_tokens = req.prompt.split_whitespace().count() as u64;
    let n = u64::from(req.max_tokens);
    if !req.stream {
        if let Some(m) = &meter {
            m.add_input(prompt_tokens);
            m.add_output(n);
        }
        let text = vec!["tok"; req.max_tokens as usize].join(" ");
        return Json(json!({
            "object": "text_completion",
            "choices": [{ "text": text, "finish_reason": "length" }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            },
        }))
        .into_response();
    }
    // Streaming: the stream holds the meter, so the request settles when
    // the stream ends or is dropped.
    if let Some(m) = &meter {
        m.add_input(prompt_tokens);
    }
    let chunks = n.div_ceil(16);
    let events = futures_util::stream::unfold(0u64, move |i| {
        let meter = meter.clone();
        async move {
            if i > chunks {
                return None;
            }
            let event = if i == chunks {
                axum::response::sse::Event::default().data("[DONE]")
            } else {
                let size = (n - i * 16).min(16);
                if let Some(m) = &meter {
                    m.add_output(size);
                }
                let text = vec!["tok"; size as usize].join(" ");
                let mut chunk =
                    json!({ "object": "text_completion.chunk", "choices": [{ "text": text }] });
                if i + 1 == chunks {
                    chunk["usage"] = json!({
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": n,
                        "total_tokens": prompt_tokens + n,
                    });
                }
                axum::response::sse::Event::default().data(chunk.to_string())
            };
            // A real model takes time per chunk: yield between them.
            tokio::task::yield_now().await;
            Some((Ok::<_, std::convert::Infallible>(event), i + 1))
        }
    });
    axum::response::sse::Sse::new(events).into_response()
}
async fn batch() -> Json<Value> {
    Json(json!({ "status": "accepted" }))
}
async fn create_training_job(
    uri: axum::http::Uri,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    tokio::time::sleep(delay_of(&uri)?).await;
    Ok(Json(json!({ "id": "job_1", "status": "queued" })))
}

/// How long a client may take to send a request's headers before the
/// connection is closed (slow-header clients hold a connection otherwise).
pub(crate) const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[allow(dead_code)] // the tests include this file for `app`
#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `RUST_LOG=tierlimit=debug` shows refusals; the default shows the
    // Redis backend's WARN/INFO state changes.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error's own words (a policy error names the entry and line).
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[allow(dead_code)]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let bind: SocketAddr = std::env::var("BIND")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()
        .map_err(|e| format!("BIND is not an address: {e}"))?;
    let policy_path = std::env::var("POLICY").unwrap_or_else(|_| "examples/policy.toml".into());
    let load = || {
        Policy::from_toml_file(&policy_path)
            .map_err(|e| format!("the policy file {policy_path} is invalid: {e}"))
    };
    #[cfg(feature = "metrics")]
    install_metrics();
    // With ADMIN_TOKEN set, the admin API is at /admin/v1; without it,
    // those routes do not exist.
    let admin_token = std::env::var("ADMIN_TOKEN").ok().filter(|t| !t.is_empty());

    // With `--features redis` and REDIS_URL set, every instance shares one
    // limit through Redis. Instances must hash keys alike: the key secret
    // comes from TIERLIMIT_KEY_SECRET, or a demo secret (not for production).
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        if std::env::var_os(tierlimit::key::KEY_SECRET_ENV).is_none() {
            tracing::warn!("TIERLIMIT_KEY_SECRET is not set; using the demo secret");
            tierlimit::set_key_secret(b"tierlimit-demo-secret-not-for-production")?;
        }
        // Key hashes depend on the secret: load the policy after setting it.
        let policy = load()?;
        let mut builder = tierlimit::RedisBackend::builder(url.as_str());
        // REDIS_BATCHES=1: a hot key's checks are spent from batches taken
        // from Redis, with no round trip each (never over the limits).
        if std::env::var("REDIS_BATCHES").is_ok_and(|v| v == "1") {
            builder = builder.batches(tierlimit::backend::Batches::new());
        }
        let backend = builder.connect().await?;
        let layer = limits_with_feed(policy, backend.clone(), usage_log()?);
        // Operator changes (the admin API's) reach every instance on this
        // Redis, and survive restarts.
        layer.share_operator_state(&backend).await?;
        let _watching = watch_policy(&layer, &policy_path);
        let app = app_with_admin(layer, admin_token.as_deref());
        let name = format!("redis {url}");
        let serving = serve(bind, &policy_path, &name, app);
        return tokio::select! {
            served = serving => served,
            _ = tokio::signal::ctrl_c() => {
                // Units held in batches go back to Redis before the exit.
                backend.return_batches().await;
                Ok(())
            }
        };
    }
    let policy = load()?;
    let mut memory = tierlimit::MemoryBackend::builder();
    if let Ok(n) = std::env::var("MAX_KEYS") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("MAX_KEYS is not a number: {n}"))?;
        memory = memory.max_keys(n);
    }
    let layer = limits_with_feed(policy, memory.build(), usage_log()?);
    let _watching = watch_policy(&layer, &policy_path);
    serve(
        bind,
        &policy_path,
        "memory",
        app_with_admin(layer, admin_token.as_deref()),
    )
    .await
}

/// Follows `$POLICY`: reloaded when it changes (with `--features watch`).
#[cfg(feature = "watch")]
fn watch_policy<E, B>(
    layer: &RateLimitLayer<E, B>,
    path: &str,
) -> Option<tierlimit::watch::PolicyWatcher> {
    match layer.policy_handle().watch(path) {
        Ok(w) => {
            tracing::info!(path, "watching the policy file");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path, error = %e, "the policy file is not watched");
            None
        }
    }
}

#[cfg(not(feature = "watch"))]
fn watch_policy<E, B>(_: &RateLimitLayer<E, B>, _: &str) -> Option<()> {
    tracing::info!("the policy file is not watched (build with --features watch to follow it)");
    None
}

#[allow(dead_code)]
async fn serve(
    bind: SocketAddr,
    policy_path: &str,
    backend: &str,
    app: Router,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    println!(
        "tierlimit demo on http://{addr} (policy {policy_path}, limits in {backend}); try: curl -i -H 'X-API-Key: free-demo-key' http://{addr}/v1/account"
    );
    serve_connections(listener, app, HEADER_READ_TIMEOUT).await;
    Ok(())
}

/// Serves `app` with the production settings `axum::serve` does not
/// expose: a header-read timeout, and the peer address as axum's
/// `ConnectInfo` (for per-IP limits). Runs until the task is dropped.
pub(crate) async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: wait a little, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            // A client that goes away is not an error worth reporting.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
