//! The client side (feature `client`): [`RetryLayer`], a tower layer for
//! HTTP and gRPC clients (a tonic `Channel`, a hyper-util client) that
//! honours rate-limit hints.
//!
//! - **HTTP 429**: waits `Retry-After` (seconds), else until
//!   `X-RateLimit-Reset` (Unix seconds).
//! - **gRPC `RESOURCE_EXHAUSTED`** (a trailers-only answer): waits
//!   `grpc-retry-pushback-ms`, else `google.rpc.RetryInfo`'s delay from
//!   `grpc-status-details-bin`.
//! - **HTTP 503 with `Retry-After`**, **gRPC `UNAVAILABLE` with
//!   `grpc-retry-pushback-ms` or `RetryInfo`**: a server over its capacity
//!   shedding load (the layer's `[overload]` table) asks to be retried
//!   later; waits what it asks. A 503 or `UNAVAILABLE` without such a hint
//!   is returned as it came (the server may have done the work).
//! - **No hint**: exponential backoff with full jitter: a random wait in
//!   `[0, min(cap, base × 2ⁿ))` before retry `n + 1`.
//! - **Bounds**: at most `max_attempts` attempts in all, no single wait above
//!   `max_wait`, and no more than `max_total_wait` slept in all (a wait is
//!   counted with the timer's one-millisecond tick, so one that would end
//!   within a millisecond of the bound is not begun). A hint beyond a bound
//!   is not slept on: the server's answer is returned at once.
//! - **Only replayable requests are retried**: the body is kept for a
//!   retry only when its size is known and at most 64 KiB (see
//!   [`ReplayBody`]), or when the request carries the [`Replayable`]
//!   extension. tonic encodes even unary messages as a body of unknown size,
//!   so mark unary gRPC calls:
//!   `request.extensions_mut().insert(Replayable)`. Anything else is sent
//!   once. A refused request was not processed by the server, so replaying
//!   it is safe for any method.
//!
//! Waits use `tokio::time`, so tests run on a paused clock.
//!
//! ```
//! use std::time::Duration;
//! use tierlimit::client::RetryLayer;
//!
//! let layer = RetryLayer::new()
//!     .max_attempts(5)
//!     .max_total_wait(Duration::from_secs(30));
//! # let _ = layer;
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::response::AnswerBody;

/// The largest body kept for replay.
pub const MAX_REPLAY_BYTES: u64 = 64 * 1024;

/// The retry bounds and backoff of a [`RetryLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct RetryLayer {
    max_attempts: u32,
    max_wait: Duration,
    max_total_wait: Duration,
    base: Duration,
    cap: Duration,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// 4 attempts, waits of at most 60 s each and 120 s in all, backoff from
    /// 100 ms up to 10 s.
    pub const fn new() -> Self {
        RetryLayer {
            max_attempts: 4,
            max_wait: Duration::from_secs(60),
            max_total_wait: Duration::from_secs(120),
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }

    /// Attempts in all, the first included (at least 1).
    pub const fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = if n == 0 { 1 } else { n };
        self
    }

    /// The longest single wait honoured.
    pub const fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// The longest total wait across retries.
    pub const fn max_total_wait(mut self, d: Duration) -> Self {
        self.max_total_wait = d;
        self
    }

    /// The backoff's first ceiling and its cap, when the server gives no hint.
    pub const fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            policy: *self,
            rng: Arc::new(AtomicU64::new(seed())),
        }
    }
}

fn seed() -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::RandomState::default().hash_one(0x5eed_u64) | 1
}

/// The service made by [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: RetryLayer,
    rng: Arc<AtomicU64>,
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Marks a request whose body may be buffered for a retry even though its
/// size is unknown (a unary gRPC call). Never use it on a streaming call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Replayable;

/// A request body that can be kept for a retry: rebuilt from its bytes
/// with [`AnswerBody::from_answer`], the one "body from bytes" the crate
/// has (the layer builds its answers with it too). Every `Send` body type
/// that is an [`AnswerBody`] is one.
pub trait ReplayBody: AnswerBody + Send + 'static {}

impl<B: AnswerBody + Send + 'static> ReplayBody for B {}

/// What a response head says about retrying, as [`Retry`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryHint {
    /// Not a rate-limit refusal.
    NotRefused,
    /// Refused (HTTP 429 or gRPC `RESOURCE_EXHAUSTED`), with the wait the
    /// server asks for, if it says: `Retry-After`, else the time until
    /// `X-RateLimit-Reset`; `grpc-retry-pushback-ms`, else the
    /// `google.rpc.RetryInfo` in `grpc-status-details-bin`.
    Refused(Option<Duration>),
    /// Shed: the server is over its capacity and asks to be retried after
    /// this delay (HTTP 503 with `Retry-After`; gRPC `UNAVAILABLE` with
    /// `grpc-retry-pushback-ms`, else `RetryInfo`).
    Shed(Duration),
}

/// Reads a response head for a rate-limit refusal and the server's hint,
/// for clients that schedule their own retries. Never panics, whatever the
/// server sent.
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use std::time::Duration;
/// use tierlimit::client::{RetryHint, retry_hint};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "36".parse().unwrap());
/// assert_eq!(
///     retry_hint(StatusCode::TOO_MANY_REQUESTS, &headers),
///     RetryHint::Refused(Some(Duration::from_secs(36)))
/// );
/// assert_eq!(retry_hint(StatusCode::OK, &HeaderMap::new()), RetryHint::NotRefused);
/// ```
pub fn retry_hint(status: StatusCode, headers: &HeaderMap) -> RetryHint {
    let num = |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    if status == StatusCode::TOO_MANY_REQUESTS {
        if let Some(s) = num("retry-after") {
            return RetryHint::Refused(Some(Duration::from_secs(s)));
        }
        if let Some(reset) = num("x-ratelimit-reset") {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            return RetryHint::Refused(Some(Duration::from_secs(reset).saturating_sub(now)));
        }
        return RetryHint::Refused(None);
    }
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"8")
    {
        if let Some(ms) = num("grpc-retry-pushback-ms") {
            return RetryHint::Refused(Some(Duration::from_millis(ms)));
        }
        let info = headers
            .get("grpc-status-details-bin")
            .and_then(|v| crate::proto::decode_bin(v.as_bytes()))
            .and_then(|b| crate::proto::retry_delay(&b));
        return RetryHint::Refused(info);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE
        && let Some(s) = num("retry-after")
    {
        return RetryHint::Shed(Duration::from_secs(s));
    }
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
    {
        if let Some(ms) = num("grpc-retry-pushback-ms") {
            return RetryHint::Shed(Duration::from_millis(ms));
        }
        if let Some(d) = headers
            .get("grpc-status-details-bin")
            .and_then(|v| crate::proto::decode_bin(v.as_bytes()))
            .and_then(|b| crate::proto::retry_delay(&b))
        {
            return RetryHint::Shed(d);
        }
    }
    RetryHint::NotRefused
}

impl<S, B, ResBody> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: ReplayBody,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service takes this attempt; a clone takes the retries.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let mut svc = self.inner.clone();
        let policy = self.policy;
        let rng = Arc::clone(&self.rng);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let replay = policy.max_attempts > 1
                && (parts.extensions.get::<Replayable>().is_some()
                    || body
                        .size_hint()
                        .upper()
                        .is_some_and(|n| n <= MAX_REPLAY_BYTES));
            if !replay {
                return ready.call(Request::from_parts(parts, body)).await;
            }
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                // The body failed while buffering: send what the caller
                // gave, empty, and let the server say what it thinks.
                Err(_) => Bytes::new(),
            };
            let rebuild = |parts: &http::request::Parts| {
                let mut req = Request::new(B::from_answer(bytes.clone()));
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                *req.extensions_mut() = parts.extensions.clone();
                req
            };
            let mut res = ready.call(rebuild(&parts)).await?;
            let mut waited = Duration::ZERO;
            for retry in 0..policy.max_attempts - 1 {
                let hint = match retry_hint(res.status(), res.headers()) {
                    RetryHint::NotRefused => return Ok(res),
                    RetryHint::Refused(hint) => hint,
                    RetryHint::Shed(delay) => Some(delay),
                };
                let wait = hint.unwrap_or_else(|| jitter(&rng, policy, retry));
                // The timer wakes up to one tick after the instant asked
                // for, so a wait is counted with that tick: the time slept
                // in all then stays within the bound.
                if wait > policy.max_wait || waited + wait + TIMER_TICK > policy.max_total_wait {
                    tracing::debug!(?wait, "rate-limit hint beyond the retry bounds; giving up");
                    return Ok(res);
                }
                tracing::debug!(
                    ?wait,
                    retry = retry + 1,
                    "rate limited; waiting before retrying"
                );
                let slept_from = tokio::time::Instant::now();
                tokio::time::sleep(wait).await;
                waited += slept_from.elapsed();
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                res = svc.call(rebuild(&parts)).await?;
            }
            Ok(res)
        })
    }
}

/// `tokio::time`'s resolution: a sleep ends on the first tick at or after
/// its deadline.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Full jitter: uniform in `[0, min(cap, base × 2^retry))`.
fn jitter(rng: &AtomicU64, policy: RetryLayer, retry: u32) -> Duration {
    let ceiling = policy
        .base
        .checked_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
        .unwrap_or(policy.cap)
        .min(policy.cap);
    // xorshift64*
    let mut x = rng.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng.store(x, Ordering::Relaxed);
    let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let nanos = ceiling.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(r % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let rng = AtomicU64::new(seed());
        let p = RetryLayer::new().backoff(Duration::from_millis(100), Duration::from_secs(1));
        for retry in 0..10 {
            let ceiling = Duration::from_millis(100 * (1 << retry)).min(Duration::from_secs(1));
            for _ in 0..1000 {
                assert!(jitter(&rng, p, retry) < ceiling);
            }
        }
    }
}
