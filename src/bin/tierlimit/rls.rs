//! `tierlimit rls`: Envoy's rate limit service on a policy file (feature
//! `envoy`), with the gRPC health service, Prometheus metrics at
//! `/metrics` and the admin API (`ADMIN_TOKEN`) at `/admin/v1` on the same
//! port, and the policy file followed.

use std::net::SocketAddr;

use tierlimit::backend::Backend;
use tierlimit::envoy::{RateLimitServer, RlsService};
use tierlimit::{Policy, RateLimitLayer};

pub(crate) const USAGE: &str = "tierlimit rls --policy POLICY.toml --listen ADDR [--redis URL]";

/// The command's options.
#[derive(Debug)]
pub(crate) struct Options {
    policy: String,
    listen: SocketAddr,
    // Read by a build with `redis` (others refuse `--redis` when parsing).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    redis: Option<String>,
}

impl Options {
    /// `--policy FILE --listen ADDR [--redis URL]`, in any order.
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let (mut policy, mut listen, mut redis) = (None, None, None);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let slot = match flag.as_str() {
                "--policy" => &mut policy,
                "--listen" => &mut listen,
                "--redis" => &mut redis,
                other => return Err(format!("unknown option `{other}`")),
            };
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            if slot.replace(value.clone()).is_some() {
                return Err(format!("{flag} is given twice"));
            }
        }
        let policy = policy.ok_or("--policy is required")?;
        let listen = listen
            .ok_or("--listen is required")?
            .parse()
            .map_err(|e| format!("--listen is not an address (such as 127.0.0.1:8081): {e}"))?;
        if redis.is_some() && !cfg!(feature = "redis") {
            return Err("--redis needs a build with `--features redis`".into());
        }
        Ok(Options {
            policy,
            listen,
            redis,
        })
    }
}

/// Runs the service until the process is stopped.
pub(crate) fn run(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a container's logs are plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The engine's metrics (checks, refusals, shadow-mode passes, backend
    // state), as Prometheus text at /metrics: installed before the layer
    // is built, which registers them.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let result = runtime.block_on(start(options, metrics));
    // Stopped: whatever still runs in the background (the policy file's
    // watcher, the Redis I/O) ends with the process.
    runtime.shutdown_background();
    result
}

type Metrics = metrics_exporter_prometheus::PrometheusHandle;

async fn start(o: Options, metrics: Metrics) -> Result<(), Box<dyn std::error::Error>> {
    // Instances (and the layer in your services) must hash keys alike:
    // the secret comes from TIERLIMIT_KEY_SECRET, read when keys are
    // first hashed; without it, on Redis, the demo's (not for production).
    #[cfg(feature = "redis")]
    if let Some(url) = &o.redis {
        if std::env::var_os(tierlimit::key::KEY_SECRET_ENV).is_none() {
            tracing::warn!("TIERLIMIT_KEY_SECRET is not set; using the demo secret");
            tierlimit::set_key_secret(b"tierlimit-demo-secret-not-for-production")?;
        }
        let policy = load(&o.policy)?;
        let backend = tierlimit::RedisBackend::builder(url.as_str())
            .connect()
            .await?;
        let layer = RateLimitLayer::builder(policy)
            .backend(backend.clone())
            .build();
        // Operator changes reach every instance on this Redis.
        layer.share_operator_state(&backend).await?;
        return serve(layer, &o, &format!("redis {url}"), metrics).await;
    }
    let policy = load(&o.policy)?;
    let mut memory = tierlimit::MemoryBackend::builder();
    if let Ok(n) = std::env::var("MAX_KEYS") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("MAX_KEYS is not a number: {n}"))?;
        memory = memory.max_keys(n);
    }
    serve(
        RateLimitLayer::builder(policy)
            .backend(memory.build())
            .build(),
        &o,
        "memory",
        metrics,
    )
    .await
}

fn load(path: &str) -> Result<Policy, String> {
    Policy::from_toml_file(path).map_err(|e| format!("the policy file {path} is invalid: {e}"))
}

async fn serve<B: Backend>(
    layer: RateLimitLayer<tierlimit::ApiKey, B>,
    o: &Options,
    backend: &str,
    metrics: Metrics,
) -> Result<(), Box<dyn std::error::Error>> {
    let _watching = match layer.policy_handle().watch(&o.policy) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(path = %o.policy, error = %e, "the policy file is not watched");
            None
        }
    };
    let rls = RateLimitServer::new(&layer);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<RlsService<B>>().await;
    let mut router = tonic::service::Routes::new(rls.into_service())
        .add_service(health)
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(metrics.render())),
        );
    // With ADMIN_TOKEN set, the admin API is at /admin/v1 (HTTP/1.1 or 2);
    // without it, those routes do not exist.
    let admin = std::env::var("ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    if let Some(token) = &admin {
        router = router.nest_service("/admin/v1", layer.admin_service().token("admin", token));
    }
    // A path served by nothing: gRPC's UNIMPLEMENTED for gRPC calls, a 404
    // for anything else (an operator's write to an admin API this instance
    // does not serve must not look like it took effect).
    let routes = tonic::service::Routes::from(router.fallback(not_found));
    let listener = tokio::net::TcpListener::bind(o.listen).await?;
    let addr = listener.local_addr()?;
    // One line on stdout, for scripts: where it listens.
    println!(
        "tierlimit rls on {addr} (policy {}, limits in {backend}, metrics at /metrics{})",
        o.policy,
        if admin.is_some() {
            ", admin API at /admin/v1"
        } else {
            ""
        }
    );
    // Answers go out at once (TCP_NODELAY, as tonic's `serve` sets it; an
    // incoming stream made here must say so): Nagle's algorithm would hold
    // a refusal's last frames until the client's delayed ACK, some 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // SIGTERM (how Kubernetes stops a pod) or Ctrl-C: the health service
    // says NOT_SERVING, no connection is accepted any more, the calls in
    // flight are answered, and the command exits with status 0.
    let stopping = async move {
        stop_signal().await;
        tracing::info!("stopping: answering the calls in flight");
        reporter.set_not_serving::<RlsService<B>>().await;
    };
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stopping)
        .await?;
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C).
async fn stop_signal() {
    use std::future::Future;
    use std::task::Poll;
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    #[cfg(unix)]
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    // A signal that cannot be listened to never comes.
    let mut interrupt_gone = false;
    std::future::poll_fn(|cx| {
        if !interrupt_gone && let Poll::Ready(heard) = interrupt.as_mut().poll(cx) {
            if heard.is_ok() {
                return Poll::Ready(());
            }
            interrupt_gone = true;
        }
        #[cfg(unix)]
        if let Some(Poll::Ready(_)) = terminate.as_mut().map(|t| t.poll_recv(cx)) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}

/// What a request no route serves is answered.
async fn not_found(req: http::Request<axum::body::Body>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let status = tonic::Status::unimplemented("no such service or method");
        return status.into_http::<axum::body::Body>().into_response();
    }
    let body = r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"nothing is served at this path (the admin API is at /admin/v1 when ADMIN_TOKEN is set)"}"#;
    (
        http::StatusCode::NOT_FOUND,
        [(http::header::CONTENT_TYPE, "application/problem+json")],
        body,
    )
        .into_response()
}
