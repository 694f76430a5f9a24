//! Async key lookups belong in an authentication layer that runs first.
//!
//! tierlimit's extractors are synchronous (no allocation, no await on the
//! hot path). When an API key's tier lives in a database, look it up in
//! your auth middleware, put a [`tierlimit::extract::Identity`] into the request's
//! extensions, and let [`tierlimit::FromExtension`] pick it up.
//!
//! ```sh
//! cargo run --example auth_first
//! curl -i -H 'Authorization: Bearer sk_live_pro_42' http://127.0.0.1:3001/v1/account
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tierlimit::{FromExtension, Policy, RateLimitLayer, extract::Identity, policy::TierId};

/// Stands in for a database: key → (account id, tier).
#[derive(Clone)]
struct Accounts {
    by_key: Arc<HashMap<&'static str, (&'static str, TierId)>>,
}

impl Accounts {
    async fn lookup(&self, key: &str) -> Option<(&'static str, TierId)> {
        tokio::task::yield_now().await; // a real lookup awaits the database
        self.by_key.get(key).copied()
    }
}

/// Authenticates, then hands the limiter an identity: the account (so all
/// of an account's keys share one limit) and its tier.
async fn authenticate(State(accounts): State<Accounts>, mut req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(key) = key else {
        return (StatusCode::UNAUTHORIZED, "send Authorization: Bearer <key>").into_response();
    };
    let Some((account, tier)) = accounts.lookup(&key).await else {
        return (StatusCode::UNAUTHORIZED, "unknown key").into_response();
    };
    req.extensions_mut()
        .insert(Identity::new(account).with_tier(tier));
    next.run(req).await
}

/// The app: the auth layer is added last, so it runs first.
fn app(policy: Policy) -> Router {
    let pro = policy.tier("pro").expect("the demo policy has a pro tier");
    let free = policy
        .tier("free")
        .expect("the demo policy has a free tier");
    let accounts = Accounts {
        by_key: Arc::new(HashMap::from([
            ("sk_live_pro_42", ("acct_42", pro)),
            ("sk_live_free_7", ("acct_7", free)),
        ])),
    };
    let limits = RateLimitLayer::builder(policy)
        .extractor(FromExtension)
        .build();
    Router::new()
        .route("/v1/account", get(|| async { "{\"id\":\"acct\"}" }))
        .layer(limits)
        .layer(middleware::from_fn_with_state(accounts, authenticate))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::from_toml_file("examples/policy.toml")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("auth-first demo on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app(policy).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
