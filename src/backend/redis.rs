//! `RedisBackend`: the same GCRA as the memory backend, as one Lua script
//! per check on Redis's clock, so every instance shares one limit.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, FakeRelativeClock, Reference};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::{Backend, BackendError, Decision, MemoryBackend, Subject};
use crate::policy::Limit;

/// GCRA exactly as governor computes it, in microseconds, on Redis's clock
/// (`TIME`) unless a time is passed (tests). A refusal writes nothing; an
/// allowed request stores the new TAT and expires it when the bucket is
/// full again, so idle keys cost Redis nothing.
const GCRA: &str = include_str!("gcra.lua");

/// What happens to requests while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Limit each instance in memory, with the same policy (the default:
    /// the service stays protected, each instance enforcing the full limit
    /// on its own).
    #[default]
    Fallback,
    /// Let every request through, unlimited.
    FailOpen,
    /// Refuse every limited request with 503.
    FailClosed,
}

/// The backend's connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Checks go to Redis.
    Connected,
    /// Redis is unreachable; the [`FailurePolicy`] applies.
    Degraded,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Inner {
    conn: Conn,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    failure: FailurePolicy,
    fallback: MemoryBackend,
    retry_interval: Duration,
    /// Degraded since, in micros of the local clock; 0 when connected.
    degraded: AtomicBool,
    next_probe: AtomicU64,
    deny: DenyCache,
    fake: Option<(
        FakeRelativeClock,
        <FakeRelativeClock as Clock>::Instant,
        u64,
    )>,
    start: Instant,
}

/// Shares one limit across instances through Redis (feature `redis`).
///
/// - One atomic script per check (`EVALSHA`, reloaded on `NOSCRIPT`), on
///   Redis's own clock, with governor's arithmetic.
/// - Keys are `PREFIX:{HASH}`: the braces are a hash tag, so each bucket
///   lives in one Redis Cluster slot. They expire when full again.
/// - After a refusal, that bucket's requests are refused on this instance
///   until the retry delay passes, without a round trip, with the same
///   headers.
/// - Every check is bounded by a timeout (default 50 ms). A failed check
///   marks the backend degraded: for the next second (`retry_interval`) no
///   request waits on Redis, the [`FailurePolicy`] answers instead; then one
///   request probes again, and the backend returns to Redis by itself.
///
/// Instances share buckets only if they hash keys alike: set the same
/// [`set_key_secret`](crate::set_key_secret) (or `TIERLIMIT_KEY_SECRET`) on
/// all of them; [`RedisBackendBuilder::connect`] refuses to start without.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Configures a [`RedisBackend`].
#[must_use]
#[derive(Debug)]
pub struct RedisBackendBuilder {
    urls: Vec<String>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    failure: FailurePolicy,
    retry_interval: Duration,
    fake: Option<FakeRelativeClock>,
}

/// Why a [`RedisBackend`] could not be made.
#[derive(Debug)]
pub enum RedisSetupError {
    /// Keys are hashed with a random per-process secret, so instances
    /// would not share buckets.
    NoSharedKeySecret,
    /// The URL or the first connection failed.
    Redis(redis::RedisError),
}

impl fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisSetupError::NoSharedKeySecret => f.write_str(
                "instances must hash keys alike: call tierlimit::set_key_secret or set TIERLIMIT_KEY_SECRET before building the policy",
            ),
            RedisSetupError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

impl std::error::Error for RedisSetupError {}

impl From<redis::RedisError> for RedisSetupError {
    fn from(e: redis::RedisError) -> Self {
        RedisSetupError::Redis(e)
    }
}

impl RedisBackend {
    /// A single Redis node, e.g. `redis://127.0.0.1:6379`.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder {
            urls: vec![url.into()],
            cluster: false,
            prefix: "tierlimit".into(),
            timeout: Duration::from_millis(50),
            failure: FailurePolicy::Fallback,
            retry_interval: Duration::from_secs(1),
            fake: None,
        }
    }

    /// A Redis Cluster, from one or more of its nodes.
    pub fn cluster<I, S>(nodes: I) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut b = Self::builder(String::new());
        b.urls = nodes.into_iter().map(Into::into).collect();
        b.cluster = true;
        b
    }

    /// Whether checks go to Redis now.
    pub fn state(&self) -> BackendState {
        if self.inner.degraded.load(Ordering::Relaxed) {
            BackendState::Degraded
        } else {
            BackendState::Connected
        }
    }

    /// The Redis key a subject's bucket is stored under.
    pub fn redis_key(&self, subject: &Subject, limit: &Limit) -> String {
        redis_key(&self.inner.prefix, subject, limit)
    }
}

fn redis_key(prefix: &str, subject: &Subject, limit: &Limit) -> String {
    // The limit is part of the key so that a changed limit starts afresh
    // rather than reading a TAT computed for another interval.
    format!(
        "{prefix}:{{{:016x}}}:{}:{}",
        subject.bucket(),
        limit.max(),
        limit.per().as_millis()
    )
}

impl RedisBackendBuilder {
    /// The key prefix (default `tierlimit`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a check may wait on Redis (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What requests get while Redis is unreachable (default
    /// [`FailurePolicy::Fallback`]).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure = policy;
        self
    }

    /// How long a degraded backend waits before trying Redis again
    /// (default one second).
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Uses a fake clock instead of Redis's (for tests): the script is
    /// given the time instead of reading `TIME`.
    pub fn fake_clock(mut self, clock: FakeRelativeClock) -> Self {
        self.fake = Some(clock);
        self
    }

    /// Connects. A single node is connected lazily, so a service that starts
    /// while Redis is down still serves, through its failure policy.
    pub async fn connect(self) -> Result<RedisBackend, RedisSetupError> {
        if !crate::key::key_secret_is_shared() {
            return Err(RedisSetupError::NoSharedKeySecret);
        }
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(self.timeout.max(Duration::from_millis(100)))
                .response_timeout(self.timeout)
                .retries(1)
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(100))))
                .set_response_timeout(Some(self.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
        let fallback = MemoryBackend::new();
        let fake = self.fake.map(|c| {
            let start = c.now();
            // Fake time starts at a fixed, realistic Unix time in micros.
            (c, start, 1_700_000_000_000_000)
        });
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn,
                script: redis::Script::new(GCRA),
                prefix: self.prefix,
                timeout: self.timeout,
                failure: self.failure,
                fallback,
                retry_interval: self.retry_interval,
                degraded: AtomicBool::new(false),
                next_probe: AtomicU64::new(0),
                deny: DenyCache::default(),
                fake,
                start: Instant::now(),
            }),
        })
    }
}

impl Inner {
    /// Local monotonic micros (the fake clock's, in tests).
    fn local_micros(&self) -> u64 {
        match &self.fake {
            Some((clock, start, base)) => {
                base + u64::from(clock.now().duration_since(*start)) / 1_000
            }
            None => self.start.elapsed().as_micros() as u64,
        }
    }

    async fn eval(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
        reserve: u32,
        peek: bool,
    ) -> redis::RedisResult<(i64, i64)> {
        let t = (limit.emission_interval_nanos() / 1_000).max(1);
        let now = match &self.fake {
            Some(_) => self.local_micros().to_string(),
            None => String::new(),
        };
        let mut inv = self.script.key(key);
        inv.arg(t)
            .arg(limit.max())
            .arg(cost)
            .arg(now)
            .arg(reserve)
            .arg(if peek { "1" } else { "0" });
        match &self.conn {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    fn mark(&self, ok: bool) {
        let was = self.degraded.swap(!ok, Ordering::Relaxed);
        if was == ok {
            crate::telemetry::backend_state("redis", ok);
        }
        if !ok {
            crate::telemetry::backend_error("redis");
        }
        if was && ok {
            tracing::info!(prefix = %self.prefix, "redis reachable again: shared rate limits resume");
        } else if !was && !ok {
            tracing::warn!(prefix = %self.prefix, policy = ?self.failure, "redis unreachable: rate limits degraded");
        }
        if !ok {
            let next = self.local_micros() + self.retry_interval.as_micros() as u64;
            self.next_probe.store(next, Ordering::Relaxed);
        }
    }

    fn on_failure(&self, subject: &Subject, limit: &Limit) -> Result<Decision, BackendError> {
        let policy = match self.failure {
            FailurePolicy::Fallback => "fallback",
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
        };
        crate::telemetry::fallback("redis", policy);
        match self.failure {
            FailurePolicy::Fallback => self.fallback.check_now(subject, limit),
            FailurePolicy::FailOpen => Ok(Decision::allow(
                limit,
                limit.max() - subject.cost.min(limit.max()),
            )),
            FailurePolicy::FailClosed => Err(BackendError::Unavailable("redis unreachable".into())),
        }
    }
}

/// Refusals remembered locally until their retry delay passes.
#[derive(Default)]
struct DenyCache {
    shards: [Mutex<HashMap<(u64, Limit), u64>>; 16],
}

const DENY_CACHE_MAX: usize = 16_384;

impl DenyCache {
    fn shard(&self, bucket: u64) -> &Mutex<HashMap<(u64, Limit), u64>> {
        &self.shards[(bucket >> 40) as usize % 16]
    }

    /// The time (local micros) one request of this bucket conforms again.
    fn get(&self, bucket: u64, limit: &Limit, now: u64) -> Option<u64> {
        let mut map = self
            .shard(bucket)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get(&(bucket, *limit)) {
            Some(&until) if until > now => Some(until),
            Some(_) => {
                map.remove(&(bucket, *limit));
                None
            }
            None => None,
        }
    }

    fn put(&self, bucket: u64, limit: &Limit, until: u64, now: u64) {
        let mut map = self
            .shard(bucket)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= DENY_CACHE_MAX / 16 {
            map.retain(|_, u| *u > now);
            if map.len() >= DENY_CACHE_MAX / 16 {
                return;
            }
        }
        map.insert((bucket, *limit), until);
    }
}

impl RedisBackend {
    /// Checks one request against Redis (or the deny cache, or the failure
    /// policy).
    pub async fn check_async(
        &self,
        subject: Subject,
        limit: Limit,
    ) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let cost = subject.cost.max(1);
        if cost > limit.max() {
            return Err(BackendError::CostExceedsLimit {
                cost,
                max: limit.max(),
            });
        }
        let t_us = (limit.emission_interval_nanos() / 1_000).max(1);
        let bucket = subject.bucket();
        let now = inner.local_micros();
        // 1. A recent refusal: answered here. (Only refusals of requests
        // without a reserve are cached, and they bind every request.)
        if let Some(until) = inner.deny.get(bucket, &limit, now) {
            let retry = until - now + u64::from(cost - 1) * t_us;
            return Ok(Decision::deny(&limit, cost, Duration::from_micros(retry)));
        }
        // 2. Degraded and not yet time to probe: no waiting on Redis.
        if inner.degraded.load(Ordering::Relaxed) {
            let due = inner.next_probe.load(Ordering::Relaxed);
            let probe = now >= due
                && inner
                    .next_probe
                    .compare_exchange(
                        due,
                        now + inner.retry_interval.as_micros() as u64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok();
            if !probe {
                return inner.on_failure(&subject, &limit);
            }
        }
        // 3. Redis, bounded by the timeout.
        if u64::from(cost) + u64::from(subject.reserve) > u64::from(limit.max()) {
            // Only the reserve (or less) could ever be left for it.
            return Ok(Decision::deny(&limit, cost, limit.per()));
        }
        let key = redis_key(&inner.prefix, &subject, &limit);
        let eval = inner.eval(&key, &limit, cost, subject.reserve, false);
        match tokio::time::timeout(inner.timeout, eval).await {
            Ok(Ok((allowed, value))) => {
                inner.mark(true);
                let value = u64::try_from(value).unwrap_or(0);
                if allowed == 1 {
                    Ok(Decision::allow(&limit, value as u32))
                } else {
                    let retry = Duration::from_micros(value);
                    // When one request conforms again: the refusal's delay
                    // less what the extra cost added.
                    let one = value.saturating_sub(u64::from(cost - 1) * t_us);
                    if one > 0 && subject.reserve == 0 {
                        inner.deny.put(bucket, &limit, now + one, now);
                    }
                    Ok(Decision::deny(&limit, cost, retry))
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis check failed");
                inner.mark(false);
                inner.on_failure(&subject, &limit)
            }
            Err(_) => {
                tracing::debug!(timeout = ?inner.timeout, "redis check timed out");
                inner.mark(false);
                inner.on_failure(&subject, &limit)
            }
        }
    }
}

impl RedisBackend {
    /// A subject's capacity now, counting nothing. While Redis is
    /// unreachable, the fallback's view (or a full bucket) is reported.
    pub async fn peek_async(
        &self,
        subject: Subject,
        limit: Limit,
    ) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let key = redis_key(&inner.prefix, &subject, &limit);
        if !inner.degraded.load(Ordering::Relaxed)
            && let Ok(Ok((_, rem))) =
                tokio::time::timeout(inner.timeout, inner.eval(&key, &limit, 1, 0, true)).await
        {
            return Ok(Decision::allow(&limit, u32::try_from(rem).unwrap_or(0)));
        }
        Ok(inner.fallback.peek_now(&subject, &limit))
    }
}

impl Backend for RedisBackend {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;

    fn check(&self, subject: &Subject, limit: &Limit) -> Self::Future {
        let this = self.clone();
        let (subject, limit) = (*subject, *limit);
        Box::pin(async move { this.check_async(subject, limit).await })
    }

    fn peek(&self, subject: &Subject, limit: &Limit) -> Self::Future {
        let this = self.clone();
        let (subject, limit) = (*subject, *limit);
        Box::pin(async move { this.peek_async(subject, limit).await })
    }
}
