//! The backend's own I/O thread and every round trip on it: the backend's
//! scripts, single commands, and [`Link`], through which the rest of the
//! crate (the operator plane's store) runs its own.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Conn, Inner, RedisBackend};

/// Which of the backend's scripts a call runs.
#[derive(Clone, Copy)]
pub(super) enum Script {
    /// A check, all or nothing, or a peek (`check.lua`).
    Check,
    /// Settlement (`settle.lua`).
    Settle,
    /// Leases after admission (`lease.lua`).
    Lease,
    /// Batches taken and given back (`batch.lua`).
    Batch,
}

/// Why a script call gave no answer.
#[derive(Debug)]
pub(crate) enum EvalError {
    Redis(redis::RedisError),
    Timeout,
    /// The I/O thread is gone (the backend is being dropped).
    Lost,
}

impl std::error::Error for EvalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EvalError::Redis(e) => Some(e),
            EvalError::Timeout | EvalError::Lost => None,
        }
    }
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
pub(super) struct IoThread(Option<tokio::runtime::Runtime>);

impl IoThread {
    pub(super) fn start() -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tierlimit-redis")
            .enable_all()
            .build()
            .map(|rt| IoThread(Some(rt)))
    }

    pub(super) fn handle(&self) -> &tokio::runtime::Handle {
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

impl Inner {
    /// Runs one of the backend's scripts once, on its own I/O thread,
    /// bounded by the timeout there: the time measured is Redis's round
    /// trip, never the wait for a busy application runtime to poll the
    /// connection.
    pub(super) async fn invoke<T: redis::FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        script: Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<T, EvalError> {
        self.on_io(self.timeout, move |inner, conn| async move {
            let script = match script {
                Script::Check => &inner.script_check,
                Script::Settle => &inner.script_settle,
                Script::Lease => &inner.script_lease,
                Script::Batch => &inner.script_batch,
            };
            run_script(script, keys, args, &conn).await
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
}

/// Invokes `script` (`EVALSHA`, reloaded on `NOSCRIPT`) on `conn`.
async fn run_script<T: redis::FromRedisValue>(
    script: &redis::Script,
    keys: Vec<String>,
    args: Vec<String>,
    conn: &Conn,
) -> redis::RedisResult<T> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    match conn {
        Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
        Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
    }
}

/// What the backend lends the rest of the crate: its connection and its
/// I/O thread, nothing more. Scripts and commands run as the backend's
/// own do (on the I/O thread, bounded there by the timeout given).
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<Inner>,
}

impl RedisBackend {
    /// A handle to this backend's connection and I/O thread.
    pub(crate) fn link(&self) -> Link {
        Link {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl Link {
    /// The backend's key prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The backend's check timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Runs `script` once, bounded by `timeout` on the I/O thread.
    pub(crate) async fn invoke_script<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &redis::Script,
        keys: Vec<String>,
        args: Vec<String>,
        timeout: Duration,
    ) -> Result<T, EvalError> {
        let script = script.clone();
        self.inner
            .on_io(timeout, move |_, conn| async move {
                run_script(&script, keys, args, &conn).await
            })
            .await
    }

    /// Runs one command, bounded by `timeout` on the I/O thread.
    pub(crate) async fn query<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
        timeout: Duration,
    ) -> Result<T, EvalError> {
        self.inner
            .on_io(timeout, move |_, conn| async move {
                match &*conn {
                    Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
                    Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
                }
            })
            .await
    }

    /// Runs `task` on the backend's own I/O thread.
    pub(crate) fn spawn_io(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.inner.io.handle().spawn(task);
    }
}
