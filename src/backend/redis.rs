//! `RedisBackend`: the same GCRA as the memory backend, as one Lua script
//! per check on Redis's clock, so every instance shares one limit.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, FakeRelativeClock, Reference};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::{
    Adjustment, Backend, BackendError, Charge, Check, Decision, Lease, LeaseState, MAX_LEASES,
    MemoryBackend, decide_all,
};
use crate::limit::{Limit, MAX_LIMITS};

// Every script below starts with `now.lua` (the time: a fake clock's, or
// Redis's `TIME`); those that read or move a rate bucket then with
// `gcra.lua` (GCRA's arithmetic, written once).

/// One request's check against every limit that applies to it, all or
/// nothing, with its leases, in one call; and a bucket's peek. GCRA
/// exactly as governor computes it, in microseconds, on Redis's clock
/// (`TIME`) unless a time is passed (tests). A refusal writes nothing; an
/// allowed request stores the new TATs and expires them when the buckets
/// are full again, so idle keys cost Redis nothing.
const CHECK: &str = concat!(
    include_str!("now.lua"),
    include_str!("gcra.lua"),
    include_str!("check.lua")
);

/// Settlement: debts and refunds on one owner's buckets, in one call.
const SETTLE: &str = concat!(
    include_str!("now.lua"),
    include_str!("gcra.lua"),
    include_str!("settle.lua")
);

/// Concurrency leases after admission: release, renew, peek.
const LEASE: &str = concat!(include_str!("now.lua"), include_str!("lease.lua"));

/// The operators' shared state: write, load, version.
const ADMIN: &str = include_str!("admin.lua");

/// Redis's clock in microseconds, read in the operator state's slot before
/// a write sets its deadline on it.
const ADMIN_CLOCK: &str = "local t = redis.call('TIME') \
    return string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))";

/// What happens to requests while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Limit each instance in memory (the default: the service stays
    /// protected). Each instance enforces its
    /// [`fallback_share`](RedisBackendBuilder::fallback_share) of every
    /// limit on its own, so while Redis is down, at most `instances × share
    /// × limit` more requests are admitted per window than Redis counted.
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

/// The cluster client, kept to rebuild the connection after a failover:
/// redis-rs reconnects to a dead master's address but does not look the
/// topology up again when that address refuses connections.
struct Rebuild {
    client: redis::cluster::ClusterClient,
    running: AtomicBool,
    /// Local micros before which no other rebuild starts.
    not_before: AtomicU64,
}

struct Inner {
    conn: arc_swap::ArcSwap<Conn>,
    rebuild: Option<Rebuild>,
    script_check: redis::Script,
    script_settle: redis::Script,
    script_lease: redis::Script,
    script_admin: redis::Script,
    prefix: String,
    timeout: Duration,
    failure: FailurePolicy,
    fallback: MemoryBackend,
    retry_interval: Duration,
    io: IoThread,
    /// The share of each limit the fallback enforces per instance.
    fallback_share: f64,
    /// Checks waiting on Redis at once; later ones queue here, and the
    /// timeout starts only once a check is sent.
    in_flight: tokio::sync::Semaphore,
    /// Consecutive failed checks that mark the backend degraded.
    trip_after: u32,
    consecutive_failures: AtomicU32,
    degraded: AtomicBool,
    next_probe: AtomicU64,
    deny: DenyCache,
    leases: LeaseBook,
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
/// - [`connect`](RedisBackendBuilder::connect) connects and loads the
///   script before it returns, so the first requests find Redis ready.
/// - At most [`max_in_flight`](RedisBackendBuilder::max_in_flight) checks
///   (default 64) wait on Redis at once; the others queue in the process.
///   The timeout (default 50 ms) bounds the Redis round trip of a check
///   that was sent, never its wait in that queue: local queueing under a
///   burst is not a Redis failure, and a burst of any size on any number
///   of instances admits exactly the limit.
/// - A check that fails or times out gets the [`FailurePolicy`]'s answer.
///   [`trip_after`](RedisBackendBuilder::trip_after) consecutive failures
///   (default 3) mark the backend degraded: for the next
///   `retry_interval` (one second) no request waits on Redis, queued ones
///   included; then one request probes, and the backend returns to Redis by
///   itself. One slow answer trips nothing.
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
    fallback_share: f64,
    max_in_flight: usize,
    trip_after: u32,
    lazy: bool,
    lease_ttl: Duration,
    fake: Option<FakeRelativeClock>,
}

/// Why a [`RedisBackend`] could not be made.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisSetupError {
    /// Keys are hashed with a random per-process secret, so instances
    /// would not share buckets.
    NoSharedKeySecret,
    /// The URL or the first connection failed.
    Redis(redis::RedisError),
    /// The backend's I/O thread could not be started.
    Io(std::io::Error),
    /// The operators' shared state could not be loaded
    /// ([`RateLimitLayer::share_operator_state`](crate::RateLimitLayer::share_operator_state)).
    OperatorState(String),
}

impl fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisSetupError::NoSharedKeySecret => f.write_str(
                "instances must hash keys alike: call tierlimit::set_key_secret or set TIERLIMIT_KEY_SECRET before building the policy",
            ),
            RedisSetupError::Redis(e) => write!(f, "redis: {e}"),
            RedisSetupError::Io(e) => write!(f, "the redis I/O thread could not start: {e}"),
            RedisSetupError::OperatorState(e) => {
                write!(f, "the operators' shared state could not be loaded: {e}")
            }
        }
    }
}

impl std::error::Error for RedisSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisSetupError::Redis(e) => Some(e),
            RedisSetupError::Io(e) => Some(e),
            RedisSetupError::NoSharedKeySecret | RedisSetupError::OperatorState(_) => None,
        }
    }
}

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
            fallback_share: 1.0,
            max_in_flight: 64,
            trip_after: 3,
            lazy: false,
            lease_ttl: Duration::from_secs(60),
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

    /// The Redis key a charge of `owner` is kept under (its hash tag is
    /// the owner: every charge of a check lives in one Cluster slot).
    pub fn charge_key(&self, owner: u64, charge: &Charge) -> String {
        charge_key(&self.inner.prefix, owner, charge.bucket)
    }
}

/// The script's answer to a peek: what a check of one request would
/// answer (its capacity, or the refusal it would get), counting nothing.
fn peeked(limit: &Limit, (allowed, n): (i64, i64)) -> Decision {
    if allowed == 1 {
        Decision::allow(limit, u32::try_from(n).unwrap_or(0))
    } else {
        Decision::refuse(limit, 1, Duration::from_micros(n.max(0).unsigned_abs()))
    }
}

/// A limit's emission interval in the scripts' unit, microseconds (at
/// least 1).
fn interval_us(limit: &Limit) -> u64 {
    (limit.emission_interval_nanos() / 1_000).max(1)
}

/// The key of one charge of a check: the owner is the hash tag, so every
/// charge of a check lives in one Cluster slot (the bucket already mixes
/// in the limit).
fn charge_key(prefix: &str, owner: u64, bucket: u64) -> String {
    format!("{prefix}:{{{owner:016x}}}:m:{bucket:016x}")
}

/// The sorted set of a concurrency bucket's leases (same hash tag as the
/// owner's charges: one Cluster slot).
fn lease_key(prefix: &str, owner: u64, bucket: u64) -> String {
    format!("{prefix}:{{{owner:016x}}}:c:{bucket:016x}")
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

    /// The share of each limit that one instance enforces on its own while
    /// Redis is unreachable, under [`FailurePolicy::Fallback`] (default
    /// 1.0: the whole limit; values are clamped to (0, 1]). With `n`
    /// instances, `1 / n` keeps the whole service within about one limit
    /// per window during an outage (plus what Redis had already counted).
    /// The burst and the rate are both scaled: `0.25` turns 100/hour into
    /// 25/hour per instance.
    pub fn fallback_share(mut self, share: f64) -> Self {
        self.fallback_share = if share.is_finite() && share > 0.0 {
            share.min(1.0)
        } else {
            1.0
        };
        self
    }

    /// The most checks waiting on Redis at once (default 64). Further
    /// checks queue in the process without their timeout running.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// How many consecutive failed checks mark the backend degraded
    /// (default 3; at least 1).
    pub fn trip_after(mut self, failures: u32) -> Self {
        self.trip_after = failures.max(1);
        self
    }

    /// How long a concurrency lease lives in Redis unless renewed
    /// (default 60 s; at least 100 ms). A request in flight renews its
    /// leases every third of this (the backend does, on its I/O thread),
    /// so a long stream keeps them; the leases of an instance that crashed
    /// expire after at most this long, and its customers' slots come back.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(100));
        self
    }

    /// Connects in the background instead of in
    /// [`connect`](Self::connect) (single node only), so a service can
    /// start while Redis is down; its first requests then wait for the
    /// connection, up to the timeout, and fall back if it does not come.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// (Feature `test-util`.) Uses a fake clock instead of Redis's: the script is
    /// given the time instead of reading `TIME`.
    #[cfg(feature = "test-util")]
    pub fn fake_clock(mut self, clock: FakeRelativeClock) -> Self {
        self.fake = Some(clock);
        self
    }

    /// Connects and loads the script, so that the first requests find
    /// Redis ready (unless [`lazy`](Self::lazy)). Fails when Redis cannot
    /// be reached within the connection timeout (the longer of the check
    /// timeout and 1 s).
    pub async fn connect(self) -> Result<RedisBackend, RedisSetupError> {
        if !crate::key::key_secret_is_shared() {
            return Err(RedisSetupError::NoSharedKeySecret);
        }
        let script = redis::Script::new(CHECK);
        let connect_timeout = self.timeout.max(Duration::from_secs(1));
        // redis-rs's own response timeout is a backstop only: the check's
        // timeout is applied to the round trip by the backend.
        let response_timeout = self
            .timeout
            .saturating_mul(4)
            .max(Duration::from_millis(500));
        let io = IoThread::start().map_err(RedisSetupError::Io)?;
        let urls = self.urls.clone();
        let (cluster, lazy) = (self.cluster, self.lazy);
        let load = script.clone();
        // The connection is made on the I/O thread, so its tasks live there.
        let cluster_client = if cluster {
            Some(
                redis::cluster::ClusterClient::builder(urls.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout)
                    .retries(1)
                    .build()?,
            )
        } else {
            None
        };
        let cluster_conn = cluster_client.clone();
        let connecting = io.handle().spawn(async move {
            if let Some(client) = cluster_conn {
                return Ok(Conn::Cluster(client.get_async_connection().await?));
            }
            let client = redis::Client::open(urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            if lazy {
                return Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?));
            }
            let mut conn = ConnectionManager::new_with_config(client, config).await?;
            load.prepare_invoke().load_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(Conn::Single(conn))
        });
        let conn = connecting
            .await
            .map_err(|e| RedisSetupError::Io(std::io::Error::other(e)))??;
        let fallback = MemoryBackend::new();
        let fake = self.fake.map(|c| {
            let start = c.now();
            // Fake time starts at a fixed, realistic Unix time in micros.
            (c, start, 1_700_000_000_000_000)
        });
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn: arc_swap::ArcSwap::from_pointee(conn),
                rebuild: cluster_client.map(|client| Rebuild {
                    client,
                    running: AtomicBool::new(false),
                    not_before: AtomicU64::new(0),
                }),
                script_check: script,
                script_settle: redis::Script::new(SETTLE),
                script_lease: redis::Script::new(LEASE),
                script_admin: redis::Script::new(ADMIN),
                prefix: self.prefix,
                timeout: self.timeout,
                failure: self.failure,
                fallback,
                retry_interval: self.retry_interval,
                io,
                fallback_share: self.fallback_share,
                in_flight: tokio::sync::Semaphore::new(self.max_in_flight),
                trip_after: self.trip_after,
                consecutive_failures: AtomicU32::new(0),
                degraded: AtomicBool::new(false),
                next_probe: AtomicU64::new(0),
                deny: DenyCache::default(),
                leases: LeaseBook::new(self.lease_ttl),
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

    /// Peeks at one bucket (the check script's `peek`).
    async fn eval_peek(
        self: &Arc<Self>,
        key: String,
        limit: &Limit,
    ) -> Result<(i64, i64), EvalError> {
        let args = vec![
            "peek".to_owned(),
            self.script_now(),
            interval_us(limit).to_string(),
            limit.max().to_string(),
        ];
        self.invoke(Script::Check, vec![key], args).await
    }

    /// Runs the check script once (see [`invoke`](Self::invoke)).
    async fn eval_check(self: &Arc<Self>, check: &Check<'_>) -> Result<Vec<i64>, EvalError> {
        let (owner, charges) = (check.owner, check.charges);
        let keys = charges
            .iter()
            .map(|c| charge_key(&self.prefix, owner, c.bucket))
            .chain(
                check
                    .leases
                    .iter()
                    .map(|l| lease_key(&self.prefix, owner, l.bucket)),
            )
            .collect();
        let mut args = Vec::with_capacity(charges.len() * 4 + check.leases.len() + 5);
        args.push("check".to_owned());
        args.push(self.script_now());
        args.push(charges.len().to_string());
        args.push(self.leases.member(check.lease_id));
        args.push(self.leases.ttl_us().to_string());
        for c in charges {
            let t = interval_us(&c.limit);
            args.extend([
                t.to_string(),
                c.limit.max().to_string(),
                c.reserve.to_string(),
                c.cost.max(1).to_string(),
            ]);
        }
        args.extend(check.leases.iter().map(|l| l.max.to_string()));
        self.invoke(Script::Check, keys, args).await
    }

    /// Runs the lease script once for one request's leases.
    async fn eval_lease(
        self: &Arc<Self>,
        mode: &'static str,
        owner: u64,
        leases: &[Lease],
        lease_id: u64,
    ) -> Result<i64, EvalError> {
        let keys = leases
            .iter()
            .map(|l| lease_key(&self.prefix, owner, l.bucket))
            .collect();
        let args = vec![
            mode.to_owned(),
            self.script_now(),
            self.leases.ttl_us().to_string(),
            self.leases.member(lease_id),
        ];
        self.invoke(Script::Lease, keys, args).await
    }

    /// Runs the settlement script once (see [`invoke`](Self::invoke)).
    async fn eval_settle(
        self: &Arc<Self>,
        owner: u64,
        adjustments: &[Adjustment],
    ) -> Result<Vec<i64>, EvalError> {
        let keys = adjustments
            .iter()
            .map(|a| charge_key(&self.prefix, owner, a.bucket))
            .collect();
        let mut args = Vec::with_capacity(adjustments.len() * 3 + 1);
        args.push(self.script_now());
        for a in adjustments {
            let t = interval_us(&a.limit);
            args.extend([
                t.to_string(),
                a.limit.max().to_string(),
                a.units.to_string(),
            ]);
        }
        self.invoke(Script::Settle, keys, args).await
    }

    /// The time the scripts are given: the fake clock's in tests, else
    /// empty (the script reads Redis's `TIME`).
    fn script_now(&self) -> String {
        match &self.fake {
            Some(_) => self.local_micros().to_string(),
            None => String::new(),
        }
    }

    /// Runs a script once, on the backend's own I/O thread, bounded by the
    /// timeout there: the time measured is Redis's round trip, never the
    /// wait for a busy application runtime to poll the connection.
    async fn invoke<T: redis::FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        script: Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<T, EvalError> {
        let timeout = match script {
            Script::Admin => admin_timeout(self),
            _ => self.timeout,
        };
        self.on_io(timeout, move |inner, conn| async move {
            let script = match script {
                Script::Check => &inner.script_check,
                Script::Settle => &inner.script_settle,
                Script::Lease => &inner.script_lease,
                Script::Admin => &inner.script_admin,
            };
            let mut inv = script.prepare_invoke();
            for k in keys {
                inv.key(k);
            }
            for a in args {
                inv.arg(a);
            }
            match &*conn {
                Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
                Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
            }
        })
        .await
    }

    /// Runs one command, as [`invoke`](Self::invoke) runs a script.
    async fn query<T: redis::FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        cmd: redis::Cmd,
        timeout: Duration,
    ) -> Result<T, EvalError> {
        self.on_io(timeout, move |_, conn| async move {
            match &*conn {
                Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
                Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
            }
        })
        .await
    }

    /// Runs `call` on the connection, on the I/O thread, bounded by
    /// `timeout` there.
    async fn on_io<T, F, Fut>(self: &Arc<Self>, timeout: Duration, call: F) -> Result<T, EvalError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>, Arc<Conn>) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<T>> + Send,
    {
        let inner = Arc::clone(self);
        let round_trip = async move {
            let conn = inner.conn.load_full();
            match tokio::time::timeout(timeout, call(Arc::clone(&inner), conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(EvalError::Redis(e)),
                Err(_) => Err(EvalError::Timeout),
            }
        };
        match self.io.handle().spawn(round_trip).await {
            Ok(result) => result,
            Err(_) => Err(EvalError::Lost),
        }
    }

    /// A check of one charge alone (no leases, no tokens): what the deny
    /// cache may answer.
    fn alone<'c>(check: &'c Check<'_>) -> Option<&'c Charge> {
        match check.charges {
            [c] if check.leases.is_empty() && check.tokens == 0 => Some(c),
            _ => None,
        }
    }

    /// The answer to a check of one charge alone that needs no round trip:
    /// one that could never conform (its cost and reserve exceed the
    /// limit), or one of a bucket refused recently (the deny cache),
    /// refused again until the retry delay passes. (Only refusals of requests without a reserve are
    /// cached, and they bind every request: `until` is when one request of
    /// cost 1 and no reserve conforms again, so a larger cost or a reserve
    /// waits that many intervals more.)
    fn denied(&self, check: &Check<'_>, now: u64) -> Option<Decision> {
        let c = Self::alone(check)?;
        if u64::from(c.cost.max(1)) + u64::from(c.reserve) > u64::from(c.limit.max()) {
            // Only the reserve (or less) could ever be left for it.
            return Some(Decision::refuse(&c.limit, c.cost.max(1), c.limit.per()));
        }
        let until = self.deny.get(c.bucket, &c.limit, now)?;
        let extra = u64::from(c.cost.max(1) - 1) + u64::from(c.reserve);
        let retry = until - now + extra * interval_us(&c.limit);
        Some(Decision::refuse(
            &c.limit,
            c.cost.max(1),
            Duration::from_micros(retry),
        ))
    }

    /// Caches Redis's refusal (`retry_us`) of a check of one charge alone.
    fn remember_refusal(&self, check: &Check<'_>, retry_us: u64, now: u64) {
        let Some(c) = Self::alone(check) else {
            return;
        };
        // When one request conforms again: the delay less the extra cost.
        let one = retry_us.saturating_sub(u64::from(c.cost.max(1) - 1) * interval_us(&c.limit));
        if one > 0 && c.reserve == 0 {
            self.deny.put(c.bucket, &c.limit, now + one, now);
        }
    }

    /// A check while Redis is unreachable: the failure policy, applied to
    /// every limit at once.
    fn on_failure_all(&self, check: &Check<'_>) -> Result<Decision, BackendError> {
        self.count_failure();
        match self.failure {
            FailurePolicy::Fallback => {
                let mut shares = [PLACEHOLDER; MAX_LIMITS];
                for (i, c) in check.charges.iter().enumerate().take(MAX_LIMITS) {
                    let share = self.fallback_limit(&c.limit);
                    let cost = c.cost.max(1);
                    if cost > share.max() {
                        // Fits the limit, not this instance's share of it.
                        let mut d = Decision::refuse(&share, cost, self.retry_interval);
                        d.index = i as u8;
                        return Ok(d);
                    }
                    let reserve = self.fallback_reserve(c.reserve, &share);
                    shares[i] = Charge {
                        limit: share,
                        reserve,
                        ..*c
                    };
                }
                let mut leases = [PLACEHOLDER_LEASE; MAX_LEASES];
                for (slot, l) in leases.iter_mut().zip(check.leases) {
                    *slot = Lease {
                        max: self.share_of(l.max),
                        ..*l
                    };
                }
                self.fallback.check_now(&Check {
                    charges: &shares[..check.charges.len().min(MAX_LIMITS)],
                    leases: &leases[..check.leases.len().min(MAX_LEASES)],
                    ..*check
                })
            }
            FailurePolicy::FailOpen => {
                let mut decisions = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
                for (slot, c) in decisions.iter_mut().zip(check.charges) {
                    let left = c.limit.max() - c.cost.max(1).min(c.limit.max());
                    *slot = Decision::allow(&c.limit, left);
                }
                let n = check.charges.len().min(MAX_LIMITS);
                // No lease is taken: nothing limits concurrency either.
                let lease = LeaseState::binding(check.leases.iter().map(|l| LeaseState {
                    limit: l.max,
                    remaining: l.max,
                    refused: false,
                    per_account: l.per_account,
                }));
                Ok(decide_all(&decisions[..n], check.tokens, lease))
            }
            FailurePolicy::FailClosed => Err(BackendError::Unavailable("redis unreachable".into())),
        }
    }

    /// A check succeeded: failures start counting from zero, and a
    /// degraded backend returns to Redis.
    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.degraded.swap(false, Ordering::Relaxed) {
            crate::telemetry::backend_state("redis", true);
            tracing::info!(prefix = %self.prefix, "redis reachable again: shared rate limits resume");
        }
    }

    /// On a cluster, looks the topology up again with a new connection (at
    /// most once per retry interval, in the background on the I/O thread),
    /// so that a replica promoted after a failover is found.
    fn rebuild_cluster(self: &Arc<Self>) {
        let Some(rebuild) = &self.rebuild else {
            return;
        };
        let now = self.local_micros();
        if now < rebuild.not_before.load(Ordering::Relaxed)
            || rebuild.running.swap(true, Ordering::Acquire)
        {
            return;
        }
        rebuild.not_before.store(
            now + self.retry_interval.as_micros() as u64,
            Ordering::Relaxed,
        );
        let inner = Arc::clone(self);
        self.io.handle().spawn(async move {
            let Some(rebuild) = &inner.rebuild else {
                return;
            };
            match rebuild.client.get_async_connection().await {
                Ok(conn) => {
                    inner.conn.store(Arc::new(Conn::Cluster(conn)));
                    tracing::debug!("redis cluster connection rebuilt");
                }
                Err(e) => tracing::debug!(error = %e, "redis cluster connection not rebuilt"),
            }
            rebuild.running.store(false, Ordering::Release);
        });
    }

    /// A check failed: counted, and after `trip_after` in a row (or any
    /// failure of a probe) the backend is degraded until the next probe.
    fn failed(self: &Arc<Self>) {
        self.rebuild_cluster();
        crate::telemetry::backend_error("redis");
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let degraded = self.degraded.load(Ordering::Relaxed);
        if degraded || n >= self.trip_after {
            let next = self.local_micros() + self.retry_interval.as_micros() as u64;
            self.next_probe.store(next, Ordering::Relaxed);
            if !self.degraded.swap(true, Ordering::Relaxed) {
                crate::telemetry::backend_state("redis", false);
                tracing::warn!(
                    prefix = %self.prefix,
                    policy = ?self.failure,
                    failures = n,
                    "redis unreachable: rate limits degraded"
                );
            }
        }
    }

    /// How a check goes now: to Redis, to Redis as the one probe of a
    /// degraded backend, or around it (degraded, not yet time to probe).
    fn route(&self, now: u64) -> Route {
        if !self.degraded.load(Ordering::Relaxed) {
            return Route::Redis;
        }
        let due = self.next_probe.load(Ordering::Relaxed);
        let probe = now >= due
            && self
                .next_probe
                .compare_exchange(
                    due,
                    now + self.retry_interval.as_micros() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if probe { Route::Probe } else { Route::Around }
    }

    /// Counts a check answered by the failure policy, labelled with it.
    fn count_failure(&self) {
        let policy = match self.failure {
            FailurePolicy::Fallback => "fallback",
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
        };
        crate::telemetry::fallback("redis", policy);
    }

    /// A priority reserve scaled to this instance's `share` of its limit
    /// (at least 1 if there was one, never the whole share).
    fn fallback_reserve(&self, reserve: u32, share: &Limit) -> u32 {
        if reserve == 0 {
            return 0;
        }
        let scaled = (f64::from(reserve) * self.fallback_share).ceil() as u32;
        scaled.clamp(1, share.max() - 1)
    }

    /// The limit the fallback enforces: this instance's share of `limit`.
    fn fallback_limit(&self, limit: &Limit) -> Limit {
        if self.fallback_share >= 1.0 {
            return *limit;
        }
        std::num::NonZeroU32::new(self.share_of(limit.max()))
            .and_then(|m| Limit::new(m, limit.per()))
            .unwrap_or(*limit)
    }

    /// This instance's share of `max` (a burst or a concurrency limit):
    /// rounded up, at least 1, at most `max`.
    fn share_of(&self, max: u32) -> u32 {
        if self.fallback_share >= 1.0 {
            return max;
        }
        (f64::from(max) * self.fallback_share)
            .ceil()
            .clamp(1.0, f64::from(max)) as u32
    }
}

/// Which script a call runs.
#[derive(Clone, Copy)]
enum Script {
    /// A check, all or nothing, or a peek (`check.lua`).
    Check,
    /// Settlement (`settle.lua`).
    Settle,
    /// Leases after admission (`lease.lua`).
    Lease,
    /// The operators' shared state (`admin.lua`).
    Admin,
}

/// Why a script call gave no answer.
#[derive(Debug)]
enum EvalError {
    Redis(redis::RedisError),
    Timeout,
    /// The I/O thread is gone (the backend is being dropped).
    Lost,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::Redis(e) => e.fmt(f),
            EvalError::Timeout => f.write_str("timed out"),
            EvalError::Lost => f.write_str("the redis I/O thread stopped"),
        }
    }
}

/// The backend's own single-threaded runtime for Redis I/O: the
/// connection's tasks and every round trip run there, so a saturated
/// application runtime cannot make Redis look slow.
struct IoThread(Option<tokio::runtime::Runtime>);

impl IoThread {
    fn start() -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tierlimit-redis")
            .enable_all()
            .build()
            .map(|rt| IoThread(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Dropping may happen inside an async context: don't block there.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Redis,
    Probe,
    Around,
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

/// A placeholder charge for fixed-size arrays.
const PLACEHOLDER: Charge = Charge {
    bucket: 0,
    limit: Limit::per_second(1),
    cost: 1,
    reserve: 0,
};

/// A placeholder lease for fixed-size arrays.
const PLACEHOLDER_LEASE: Lease = Lease {
    bucket: 0,
    max: 1,
    per_account: false,
};

/// A check, owned (to move into a future or onto the I/O thread).
#[derive(Clone, Copy)]
struct Charges {
    owner: u64,
    known: bool,
    tokens: u8,
    items: [Charge; MAX_LIMITS],
    len: usize,
    leases: [Lease; MAX_LEASES],
    nleases: usize,
    lease_id: u64,
}

impl Charges {
    fn new(check: &Check<'_>) -> Self {
        let mut items = [PLACEHOLDER; MAX_LIMITS];
        let len = check.charges.len().min(MAX_LIMITS);
        items[..len].copy_from_slice(&check.charges[..len]);
        let mut leases = [PLACEHOLDER_LEASE; MAX_LEASES];
        let nleases = check.leases.len().min(MAX_LEASES);
        leases[..nleases].copy_from_slice(&check.leases[..nleases]);
        Charges {
            owner: check.owner,
            known: check.known,
            tokens: check.tokens,
            items,
            len,
            leases,
            nleases,
            lease_id: check.lease_id,
        }
    }

    fn check(&self) -> Check<'_> {
        Check {
            owner: self.owner,
            known: self.known,
            tokens: self.tokens,
            charges: &self.items[..self.len],
            leases: &self.leases[..self.nleases],
            lease_id: self.lease_id,
        }
    }
}

/// Where a check's leases were taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Taken {
    /// Nowhere (no leases, a refusal, or fail-open).
    Nowhere,
    /// In Redis.
    Redis,
    /// In this instance's fallback (Redis was unreachable).
    Fallback,
}

/// The leases this instance holds (to release and renew them), and the
/// checks with leases still under way.
struct LeaseBook {
    ttl: Duration,
    /// This instance's part of every lease id in Redis.
    base: u64,
    entries: Mutex<HashMap<u64, Held>>,
    renewing: AtomicBool,
}

enum Held {
    /// The check is under way; `cancelled`: released before it answered,
    /// so its leases are released as soon as it takes them.
    Pending { cancelled: bool },
    /// Held, in Redis or in the fallback.
    Taken(HeldLeases, Taken),
}

/// One request's leases, as held.
#[derive(Clone, Copy)]
struct HeldLeases {
    owner: u64,
    leases: [Lease; MAX_LEASES],
    len: usize,
    lease_id: u64,
}

impl HeldLeases {
    fn of(c: &Charges) -> Self {
        HeldLeases {
            owner: c.owner,
            leases: c.leases,
            len: c.nleases,
            lease_id: c.lease_id,
        }
    }

    fn leases(&self) -> &[Lease] {
        &self.leases[..self.len.min(MAX_LEASES)]
    }
}

impl LeaseBook {
    fn new(ttl: Duration) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        LeaseBook {
            ttl,
            base: h.finish(),
            entries: Mutex::new(HashMap::new()),
            renewing: AtomicBool::new(false),
        }
    }

    fn ttl_us(&self) -> u64 {
        self.ttl.as_micros().max(1) as u64
    }

    /// A lease's member in Redis: unique across instances.
    fn member(&self, lease_id: u64) -> String {
        format!("{:016x}{lease_id:016x}", self.base)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leases held by this instance now.
    fn held(&self) -> usize {
        self.lock()
            .values()
            .filter(|h| matches!(h, Held::Taken(..)))
            .count()
    }
}

impl RedisBackend {
    /// Checks one request against several limits in one script call, all
    /// or nothing (or through the failure policy), taking its leases if it
    /// has any. Refusals are not cached locally: the binding limit's retry
    /// delay needs every limit's state.
    ///
    /// Leases taken here are held until [`Backend::release`]. Called
    /// through [`Backend::check`], a check with leases runs on the
    /// backend's I/O thread, so that it finishes (and its leases can be
    /// released) even if its caller goes away.
    pub async fn check_async(&self, check: Check<'_>) -> Result<Decision, BackendError> {
        let (result, taken) = self.check_routed(&check).await;
        if !check.leases.is_empty() {
            self.finish_leases(&Charges::new(&check), &result, taken);
        }
        result
    }

    async fn check_routed(&self, check: &Check<'_>) -> (Result<Decision, BackendError>, Taken) {
        let inner = &self.inner;
        for c in check.charges {
            if c.cost > c.limit.max() {
                let e = BackendError::CostExceedsLimit {
                    cost: c.cost,
                    max: c.limit.max(),
                };
                return (Err(e), Taken::Nowhere);
            }
        }
        if check.charges.is_empty() && check.leases.is_empty() {
            let e = BackendError::Unavailable("a check without charges".into());
            return (Err(e), Taken::Nowhere);
        }
        let fallback = |r: Result<Decision, BackendError>| {
            let taken = match &r {
                Ok(d) if d.allowed && inner.failure == FailurePolicy::Fallback => Taken::Fallback,
                _ => Taken::Nowhere,
            };
            (r, taken)
        };
        let now = inner.local_micros();
        // A recent refusal of this bucket: answered here.
        if let Some(d) = inner.denied(check, now) {
            return (Ok(d), Taken::Nowhere);
        }
        let route = inner.route(now);
        if route == Route::Around {
            return fallback(inner.on_failure_all(check));
        }
        let Ok(_permit) = inner.in_flight.acquire().await else {
            return fallback(inner.on_failure_all(check));
        };
        if route == Route::Redis && inner.degraded.load(Ordering::Relaxed) {
            return fallback(inner.on_failure_all(check));
        }
        let (k, m) = (check.charges.len(), check.leases.len());
        match inner.eval_check(check).await {
            Ok(v) if v.len() == k + 1 || v.len() == k + m + 1 => {
                inner.succeeded();
                let status = v[0];
                let mut decisions = [Decision::allow(&Limit::per_second(1), 0); MAX_LIMITS];
                for ((slot, c), &x) in decisions.iter_mut().zip(check.charges).zip(&v[1..]) {
                    let x = u64::try_from(x).unwrap_or(0);
                    *slot = match status {
                        // Remaining after (1) or capacity now (2).
                        1 | 2 => Decision::allow(&c.limit, x as u32),
                        // Admits it, but another limit refuses.
                        _ if x == 0 => Decision::allow(&c.limit, 0),
                        _ => Decision::refuse(&c.limit, c.cost.max(1), Duration::from_micros(x)),
                    };
                }
                let lease = if status == 0 || v.len() != k + m + 1 {
                    None
                } else {
                    LeaseState::binding(check.leases.iter().zip(&v[k + 1..]).map(|(l, &held)| {
                        let held = u32::try_from(held).unwrap_or(u32::MAX);
                        LeaseState {
                            limit: l.max,
                            remaining: l.max.saturating_sub(held),
                            refused: status == 2 && held >= l.max,
                            per_account: l.per_account,
                        }
                    }))
                };
                let mut d = decide_all(&decisions[..k.min(MAX_LIMITS)], check.tokens, lease);
                if status != 1 && d.allowed {
                    d.allowed = false;
                }
                if status == 0 {
                    inner.remember_refusal(check, u64::try_from(v[1]).unwrap_or(0), now);
                }
                let taken = if status == 1 && m > 0 {
                    Taken::Redis
                } else {
                    Taken::Nowhere
                };
                (Ok(d), taken)
            }
            Ok(v) => {
                tracing::warn!(
                    len = v.len(),
                    "redis: unexpected answer from the several-limit script"
                );
                self.release_late(check);
                inner.failed();
                fallback(inner.on_failure_all(check))
            }
            Err(e) => {
                tracing::debug!(error = %e, timeout = ?inner.timeout, "redis check failed");
                self.release_late(check);
                inner.failed();
                fallback(inner.on_failure_all(check))
            }
        }
    }

    /// A check with leases got no answer: the script may still run (a
    /// paused or stalled server runs its queue when it resumes) and take
    /// leases that nobody holds. A release queued behind it on the same
    /// connection frees them the moment it runs (and does nothing if it
    /// never does): a late answer is harmless.
    fn release_late(&self, check: &Check<'_>) {
        if !check.leases.is_empty() {
            self.release_taken(HeldLeases::of(&Charges::new(check)), Taken::Redis);
        }
    }

    /// A check with leases answered: records the leases it took (to
    /// release and renew them), or releases them at once if the request
    /// was released while its check was under way.
    fn finish_leases(&self, c: &Charges, result: &Result<Decision, BackendError>, taken: Taken) {
        let took = matches!(result, Ok(d) if d.allowed) && taken != Taken::Nowhere;
        let mut book = self.inner.leases.lock();
        let prev = book.remove(&c.lease_id);
        if !took {
            return;
        }
        if let Some(Held::Pending { cancelled: true }) = prev {
            drop(book);
            self.release_taken(HeldLeases::of(c), taken);
            return;
        }
        book.insert(c.lease_id, Held::Taken(HeldLeases::of(c), taken));
        drop(book);
        if taken == Taken::Redis {
            self.start_renewing();
        }
    }

    /// Releases leases this instance took.
    fn release_taken(&self, h: HeldLeases, taken: Taken) {
        match taken {
            Taken::Nowhere => {}
            Taken::Fallback => self.inner.fallback.release_now(h.owner, h.leases()),
            Taken::Redis => {
                let inner = Arc::clone(&self.inner);
                self.inner.io.handle().spawn(async move {
                    if let Err(e) = inner
                        .eval_lease("release", h.owner, h.leases(), h.lease_id)
                        .await
                    {
                        // The lease expires by itself after the TTL.
                        crate::telemetry::backend_error("redis");
                        tracing::debug!(error = %e, "redis: a lease was not released; it expires after its TTL");
                    }
                });
            }
        }
    }

    /// Starts the renewal task (once): every third of the lease TTL, the
    /// leases this instance holds in Redis are renewed.
    fn start_renewing(&self) {
        if self.inner.leases.renewing.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let period = (self.inner.leases.ttl / 3).max(Duration::from_millis(10));
        self.inner.io.handle().spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                RedisBackend { inner }.renew_leases().await;
            }
        });
    }

    /// Renews every lease this instance holds in Redis now (their expiry
    /// moves to now + the TTL); returns how many were renewed. The backend
    /// does this by itself every third of the TTL while leases are held.
    pub async fn renew_leases(&self) -> usize {
        let inner = &self.inner;
        if inner.degraded.load(Ordering::Relaxed) {
            return 0;
        }
        let held: Vec<HeldLeases> = inner
            .leases
            .lock()
            .values()
            .filter_map(|h| match h {
                Held::Taken(c, Taken::Redis) => Some(*c),
                _ => None,
            })
            .collect();
        let mut renewed = 0;
        for h in held {
            match inner
                .eval_lease("renew", h.owner, h.leases(), h.lease_id)
                .await
            {
                Ok(n) if n > 0 => renewed += 1,
                Ok(_) => tracing::debug!("redis: a lease had expired before its renewal"),
                Err(e) => tracing::debug!(error = %e, "redis: lease renewal failed"),
            }
        }
        renewed
    }

    /// Leases this instance holds now (in Redis or in its fallback).
    pub fn leases_held(&self) -> usize {
        self.inner.leases.held()
    }

    /// Settles charges after the fact in one script call (see
    /// [`Backend::settle`]). While Redis is unreachable, or if the call
    /// fails, the settlement goes to the fallback (this instance's memory)
    /// and is counted (`tierlimit_settlement_fallbacks_total`): never
    /// dropped.
    pub async fn settle_async(
        &self,
        owner: u64,
        adjustments: &[Adjustment],
    ) -> Result<Decision, BackendError> {
        let inner = &self.inner;
        let adjustments = &adjustments[..adjustments.len().min(MAX_LIMITS)];
        if adjustments.is_empty() {
            return Ok(Decision::allow(&Limit::per_second(1), 1));
        }
        if !inner.degraded.load(Ordering::Relaxed) {
            match inner.eval_settle(owner, adjustments).await {
                Ok(v) if v.len() == adjustments.len() => {
                    inner.succeeded();
                    let states = adjustments.iter().zip(&v).map(|(a, &rem)| {
                        Decision::allow(&a.limit, u32::try_from(rem).unwrap_or(0))
                    });
                    return Ok(Decision::binding(states).expect("at least one"));
                }
                Ok(_) => {
                    tracing::warn!("redis: unexpected answer from the settlement script");
                    inner.failed();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis settlement failed");
                    inner.failed();
                }
            }
        }
        crate::telemetry::settlement_fallback("redis");
        let mut shares = [adjustments[0]; MAX_LIMITS];
        for (s, a) in shares.iter_mut().zip(adjustments) {
            *s = Adjustment {
                limit: inner.fallback_limit(&a.limit),
                ..*a
            };
        }
        Ok(inner
            .fallback
            .settle_now(owner, &shares[..adjustments.len()]))
    }

    /// One charge's capacity now, counting nothing.
    pub async fn peek_async(&self, owner: u64, charge: Charge) -> Result<Decision, BackendError> {
        let inner = &*self.inner;
        let key = charge_key(&inner.prefix, owner, charge.bucket);
        if !inner.degraded.load(Ordering::Relaxed)
            && let Ok(answer) = self.inner.eval_peek(key, &charge.limit).await
        {
            return Ok(peeked(&charge.limit, answer));
        }
        Ok(inner.fallback.peek_now(owner, &charge))
    }
}

/// The operators' shared state in Redis (see `src/plane.rs`).
///
/// A write is two calls in the state's slot: Redis's clock first, then the
/// write with a deadline on that clock, half the admin timeout later. The
/// caller waits the whole timeout for the answer, so a write either runs
/// before its deadline and is answered, or finds itself late when a paused
/// or stalled server finally runs it and changes nothing: an error from
/// [`admin_write`](Self::admin_write) means nothing changed, ever.
impl RedisBackend {
    fn admin_keys(&self) -> Vec<String> {
        let p = &self.inner.prefix;
        vec![
            format!("{p}:{{admin}}:state"),
            format!("{p}:{{admin}}:version"),
            format!("{p}:{{admin}}:epoch"),
        ]
    }

    /// The channel every operator change is published on (its version).
    pub fn admin_channel(&self) -> String {
        format!("{}:{{admin}}:changes", self.inner.prefix)
    }

    async fn admin_write(
        &self,
        fields: Vec<(String, Option<String>)>,
    ) -> Result<(crate::plane::Stamp, crate::plane::Stamp), String> {
        // A read-only script in the state's slot (its node's clock), which
        // a server paused for writes still answers.
        let mut cmd = redis::cmd("EVAL_RO");
        cmd.arg(ADMIN_CLOCK).arg(1).arg(&self.admin_keys()[0]);
        let clock: String = self
            .inner
            .query(cmd, admin_timeout(&self.inner))
            .await
            .map_err(|e| e.to_string())?;
        let clock: u64 = clock
            .parse()
            .map_err(|_| "Redis's clock is not a number".to_owned())?;
        let budget = (admin_timeout(&self.inner) / 2).as_micros() as u64;
        let mut args = vec![
            "write".to_owned(),
            (clock + budget).to_string(),
            self.admin_channel(),
            format!("{:016x}", random_u64()),
        ];
        for (field, value) in fields {
            args.push(field);
            match value {
                Some(v) => {
                    args.push("set".to_owned());
                    args.push(v);
                }
                None => {
                    args.push("del".to_owned());
                    args.push(String::new());
                }
            }
        }
        let answer: String = self.admin(args).await?;
        if answer == "late" {
            return Err("Redis ran the change after its deadline, so it changed nothing".into());
        }
        // `EPOCH VERSION EPOCH VERSION`: before and after (an epoch has no
        // space; the first may be empty).
        let mid = answer
            .match_indices(' ')
            .nth(1)
            .map(|(i, _)| i)
            .ok_or_else(|| "a write's answer that is not two stamps".to_owned())?;
        let before = crate::plane::Stamp::parse(&answer[..mid])?;
        let after = crate::plane::Stamp::parse(&answer[mid + 1..])?;
        Ok((before, after))
    }

    async fn admin_load(&self) -> Result<crate::plane::Loaded, String> {
        let all: Vec<String> = self.admin(vec!["load".to_owned()]).await?;
        let mut it = all.into_iter();
        let stamp = crate::plane::Stamp::parse(&it.next().unwrap_or_default())?;
        let mut fields = Vec::new();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            fields.push((f, v));
        }
        Ok((stamp, fields))
    }

    async fn admin_version(&self) -> Result<crate::plane::Stamp, String> {
        crate::plane::Stamp::parse(&self.admin::<String>(vec!["version".to_owned()]).await?)
    }

    /// One call of the admin script.
    async fn admin<T: redis::FromRedisValue + Send + 'static>(
        &self,
        args: Vec<String>,
    ) -> Result<T, String> {
        self.inner
            .invoke(Script::Admin, self.admin_keys(), args)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs `task` on the backend's own I/O thread.
    pub(crate) fn spawn_io(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.inner.io.handle().spawn(task);
    }
}

/// How long an operator change's calls wait for Redis: changes are rare
/// and may move a whole state.
fn admin_timeout(inner: &Inner) -> Duration {
    inner.timeout.max(Duration::from_secs(1))
}

/// 64 random bits (an epoch for a new operator state).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

impl crate::plane::StateStore for RedisBackend {
    fn write(
        &self,
        fields: Vec<(String, Option<String>)>,
    ) -> crate::plane::BoxFuture<Result<(crate::plane::Stamp, crate::plane::Stamp), String>> {
        let this = self.clone();
        Box::pin(async move { this.admin_write(fields).await })
    }

    fn load(&self) -> crate::plane::BoxFuture<Result<crate::plane::Loaded, String>> {
        let this = self.clone();
        Box::pin(async move { this.admin_load().await })
    }

    fn version(&self) -> crate::plane::BoxFuture<Result<crate::plane::Stamp, String>> {
        let this = self.clone();
        Box::pin(async move { this.admin_version().await })
    }
}

impl Backend for RedisBackend {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, BackendError>> + Send>>;

    fn check(&self, check: &Check<'_>) -> Self::Future {
        let this = self.clone();
        let charges = Charges::new(check);
        if check.leases.is_empty() {
            return Box::pin(async move { this.check_async(charges.check()).await });
        }
        // A check with leases runs on the I/O thread: it finishes, and
        // its leases are recorded (or released), even if this future is
        // dropped; `release` meanwhile finds it pending.
        self.inner
            .leases
            .lock()
            .insert(check.lease_id, Held::Pending { cancelled: false });
        let task = self
            .inner
            .io
            .handle()
            .spawn(async move { this.check_async(charges.check()).await });
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(BackendError::Unavailable(Box::new(e))))
        })
    }

    fn peek(&self, owner: u64, charge: &Charge) -> Self::Future {
        let this = self.clone();
        let charge = *charge;
        Box::pin(async move { this.peek_async(owner, charge).await })
    }

    /// Runs on the backend's own I/O thread: the settlement proceeds even
    /// if the returned future is dropped (the layer settles from a `Drop`).
    fn settle(&self, owner: u64, adjustments: &[Adjustment]) -> Self::Future {
        let this = self.clone();
        let n = adjustments.len().min(MAX_LIMITS);
        let mut items = [Adjustment {
            bucket: 0,
            limit: Limit::per_second(1),
            units: 0,
        }; MAX_LIMITS];
        items[..n].copy_from_slice(&adjustments[..n]);
        let task = self
            .inner
            .io
            .handle()
            .spawn(async move { this.settle_async(owner, &items[..n]).await });
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(BackendError::Unavailable(Box::new(e))))
        })
    }

    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        let mut book = self.inner.leases.lock();
        match book.get_mut(&lease_id) {
            Some(Held::Pending { cancelled }) => *cancelled = true,
            Some(Held::Taken(..)) => {
                if let Some(Held::Taken(c, taken)) = book.remove(&lease_id) {
                    drop(book);
                    self.release_taken(c, taken);
                }
            }
            None => {
                // Not taken through `check` (or released already).
                tracing::trace!(owner, leases = leases.len(), "redis: no such lease");
            }
        }
    }

    fn peek_lease(&self, owner: u64, lease: &Lease) -> Self::Future {
        let this = self.clone();
        let lease = *lease;
        Box::pin(async move {
            let inner = &this.inner;
            if !inner.degraded.load(Ordering::Relaxed)
                && let Ok(held) = inner
                    .eval_lease("peek", owner, std::slice::from_ref(&lease), 0)
                    .await
            {
                return Ok(Decision::leases_only(LeaseState {
                    limit: lease.max,
                    remaining: lease
                        .max
                        .saturating_sub(u32::try_from(held).unwrap_or(u32::MAX)),
                    refused: false,
                    per_account: lease.per_account,
                }));
            }
            Ok(inner.fallback.peek_lease_now(owner, &lease))
        })
    }
}
