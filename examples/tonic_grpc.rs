//! The demo gRPC server: the standard health service and `demo.v1.Inference`
//! behind one tierlimit layer.
//!
//! ```sh
//! cargo run --features tonic --example tonic_grpc
//! grpcurl -plaintext -H 'x-api-key: free-demo-key' 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```
//!
//! `BIND` (default `127.0.0.1:50051`) and `POLICY` (default
//! `examples/policy.toml`) configure it; the demo keys are the HTTP demo's.
//! `Health/Check` and `Health/Watch` count as read, `Inference/Complete` as
//! ai. With `MIXED=1` it also serves the HTTP demo routes on the same port.

#[path = "support/inference.rs"]
pub(crate) mod inference;

use std::net::SocketAddr;

use axum::Json;
use axum::routing::{get, post};
use serde_json::json;
use tierlimit::{Extractor, Policy, RateLimitLayer, backend::Backend};

/// The gRPC services, ready to be served by tonic or merged into axum.
pub(crate) async fn grpc_routes() -> tonic::service::Routes {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<inference::InferenceServer>().await;
    tonic::service::Routes::new(health).add_service(inference::InferenceServer)
}

/// One port, one layer: HTTP routes and gRPC services together. The layer
/// answers each request in its own protocol (chosen by `content-type`).
pub(crate) async fn mixed_app<E: Extractor, B: Backend>(
    limits: RateLimitLayer<E, B>,
) -> axum::Router {
    grpc_routes()
        .await
        .into_axum_router()
        .route(
            "/v1/account",
            get(|| async { Json(json!({ "id": "acct_demo" })) }),
        )
        .route(
            "/v1/ai/completions",
            post(|| async { Json(json!({ "text": "hi" })) }),
        )
        .layer(limits)
}

#[allow(dead_code)] // the tests include this file
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bind: SocketAddr = std::env::var("BIND")
        .unwrap_or_else(|_| "127.0.0.1:50051".into())
        .parse()
        .map_err(|e| format!("BIND is not an address: {e}"))?;
    let policy_path = std::env::var("POLICY").unwrap_or_else(|_| "examples/policy.toml".into());
    let policy = Policy::from_toml_file(&policy_path)?;
    let limits = RateLimitLayer::new(policy);

    if std::env::var("MIXED").is_ok_and(|v| v == "1") {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        println!(
            "tierlimit mixed HTTP + gRPC demo on {} (policy {policy_path})",
            listener.local_addr()?
        );
        axum::serve(
            listener,
            mixed_app(limits)
                .await
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await?;
    } else {
        println!("tierlimit gRPC demo on {bind} (policy {policy_path})");
        tonic::transport::Server::builder()
            .layer(limits)
            .add_routes(grpc_routes().await)
            .serve(bind)
            .await?;
    }
    Ok(())
}
