//! Configuring and connecting a [`RedisBackend`]: the builder, the failure
//! policy, and why a backend could not be made.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use governor::clock::{Clock, FakeRelativeClock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::deny::DenyCache;
use super::failover::Rebuild;
use super::io::IoThread;
use super::leases::LeaseBook;
use super::{BATCH, CHECK, Conn, Inner, LEASE, RedisBackend, SETTLE};
use crate::backend::MemoryBackend;

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
    batches: Option<super::Batches>,
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
}

impl fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisSetupError::NoSharedKeySecret => f.write_str(
                "instances must hash keys alike: call tierlimit::set_key_secret or set TIERLIMIT_KEY_SECRET before building the policy",
            ),
            RedisSetupError::Redis(e) => write!(f, "redis: {e}"),
            RedisSetupError::Io(e) => write!(f, "the redis I/O thread could not start: {e}"),
        }
    }
}

impl std::error::Error for RedisSetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisSetupError::Redis(e) => Some(e),
            RedisSetupError::Io(e) => Some(e),
            RedisSetupError::NoSharedKeySecret => None,
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
            batches: None,
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

    /// Spends shared limits locally: a hot owner's checks take several
    /// units of its limits from Redis in one call and spend them on this
    /// instance without a round trip, never admitting more than the
    /// limits allow across instances; unspent units go back when a batch
    /// ages out, when its limits change and at
    /// [`return_batches`](RedisBackend::return_batches). A cold owner's
    /// checks are one call each, as without batches. Off by default.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), tierlimit::backend::RedisSetupError> {
    /// use std::time::Duration;
    /// use tierlimit::backend::{Batches, RedisBackend};
    ///
    /// let backend = RedisBackend::builder("redis://127.0.0.1:6379")
    ///     .batches(Batches::new().hold(Duration::from_millis(100)))
    ///     .connect()
    ///     .await?;
    /// # let _ = backend; Ok(()) }
    /// ```
    pub fn batches(mut self, batches: super::Batches) -> Self {
        self.batches = Some(batches);
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
        let io = IoThread::start().map_err(RedisSetupError::Io)?;
        let cluster_client = self.cluster_client()?;
        // The connection is made on the I/O thread, so its tasks live there.
        let connecting = io
            .handle()
            .spawn(self.open(cluster_client.clone(), script.clone()));
        let conn = connecting
            .await
            .map_err(|e| RedisSetupError::Io(std::io::Error::other(e)))??;
        Ok(self.build(conn, cluster_client, script, io))
    }

    /// The connection timeout: the longer of the check timeout and 1 s.
    fn connect_timeout(&self) -> Duration {
        self.timeout.max(Duration::from_secs(1))
    }

    /// redis-rs's own response timeout, a backstop only: the check's
    /// timeout is applied to the round trip by the backend.
    fn response_timeout(&self) -> Duration {
        self.timeout
            .saturating_mul(4)
            .max(Duration::from_millis(500))
    }

    /// The cluster client (on a cluster), kept to rebuild the connection.
    fn cluster_client(&self) -> Result<Option<redis::cluster::ClusterClient>, RedisSetupError> {
        if !self.cluster {
            return Ok(None);
        }
        let client = redis::cluster::ClusterClient::builder(self.urls.clone())
            .connection_timeout(self.connect_timeout())
            .response_timeout(self.response_timeout())
            .retries(1)
            .build()?;
        Ok(Some(client))
    }

    /// Opens the connection (to run on the I/O thread): a cluster's, or a
    /// single node's, with the check script loaded unless lazy.
    fn open(
        &self,
        cluster: Option<redis::cluster::ClusterClient>,
        load: redis::Script,
    ) -> impl Future<Output = redis::RedisResult<Conn>> + Send + 'static {
        let url = self.urls.first().cloned().unwrap_or_default();
        let lazy = self.lazy;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout()))
            .set_response_timeout(Some(self.response_timeout()))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        async move {
            if let Some(client) = cluster {
                return Ok(Conn::Cluster(client.get_async_connection().await?));
            }
            let client = redis::Client::open(url.as_str())?;
            if lazy {
                return Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?));
            }
            let mut conn = ConnectionManager::new_with_config(client, config).await?;
            load.prepare_invoke().load_async(&mut conn).await?;
            Ok(Conn::Single(conn))
        }
    }

    /// The backend, around its connection.
    fn build(
        self,
        conn: Conn,
        cluster: Option<redis::cluster::ClusterClient>,
        script: redis::Script,
        io: IoThread,
    ) -> RedisBackend {
        let fake = self.fake.map(|c| {
            let start = c.now();
            // Fake time starts at a fixed, realistic Unix time in micros.
            (c, start, 1_700_000_000_000_000)
        });
        let inner = Inner {
            conn: arc_swap::ArcSwap::from_pointee(conn),
            rebuild: cluster.map(Rebuild::new),
            script_check: script,
            script_settle: redis::Script::new(SETTLE),
            script_lease: redis::Script::new(LEASE),
            script_batch: redis::Script::new(BATCH),
            prefix: self.prefix,
            timeout: self.timeout,
            failure: self.failure,
            fallback: MemoryBackend::new(),
            retry_interval: self.retry_interval,
            io,
            fallback_share: self.fallback_share,
            in_flight: tokio::sync::Semaphore::new(self.max_in_flight),
            trip_after: self.trip_after,
            consecutive_failures: AtomicU32::new(0),
            degraded: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            deny: DenyCache::default(),
            batching: self.batches.is_some(),
            leases: LeaseBook::new(self.lease_ttl),
            fake,
            start: Instant::now(),
        };
        let inner = Arc::new(inner);
        let batches = self.batches.map(|b| {
            let batcher = super::batch::batcher(&inner, b);
            super::batch::spawn_aging(&inner, &batcher, b.hold);
            batcher
        });
        RedisBackend { inner, batches }
    }
}
