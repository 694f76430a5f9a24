//! A real `redis-server` per test, on a free loopback port, stopped when
//! dropped. Without `redis-server` the tests print why and skip, unless
//! `TIERLIMIT_REQUIRE_REDIS=1` (CI), which turns the skip into a failure.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// `common::secret`; a bench that includes this file by path includes
// `secret.rs` beside it.
pub use super::secret::init_secret;

/// Whether Redis tests can run here (see [`available`]); sets the secret.
pub fn ready() -> bool {
    let found = available();
    if found {
        init_secret();
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether Redis tests can run here; panics when CI requires them.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("TIERLIMIT_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
            panic!("TIERLIMIT_REQUIRE_REDIS=1 but no redis-server on PATH");
        }
        eprintln!("SKIPPED: no redis-server on PATH (install redis-server to run the Redis tests)");
    }
    found
}

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone server.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server on a free port, with a few fresh ports if the
    /// first is taken between finding it and the server binding it (the
    /// burst tests open thousands of client ports). A cluster node also
    /// gets its bus port chosen free (by default it is the port + 10000,
    /// which may be taken, or past 65535).
    fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("tierlimit-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            if extra.contains(&"--cluster-enabled") {
                args.extend(["--cluster-port".to_owned(), free_port().to_string()]);
            }
            let mut server = RedisServer {
                port,
                dir,
                child: None,
                args,
            };
            if server.try_spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server on {} did not start",
            self.port
        );
    }

    /// Starts the process and waits (bounded) until it answers; on failure
    /// the process is stopped.
    fn try_spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).as_deref() != Some("PONG") {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()));
            if exited || Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `redis-cli` against this server; its trimmed output.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Calls to a command since the last `CONFIG RESETSTAT`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server process (SIGSTOP): connections stay open, and
    /// what clients send waits in the socket until [`resume`](Self::resume).
    pub fn stop_process(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server run again (SIGCONT): it runs what queued.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three masters made into a cluster with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each; a replica takes over
    /// about a second after its master stops answering.
    pub fn start_with_replicas(replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    if replicas > 0 { "1000" } else { "2000" },
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(&[]);
        cluster
    }

    /// Waits (bounded) until every live node reports the cluster ok.
    pub fn wait_ok(&self, dead: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, n) in self.nodes.iter().enumerate() {
            if dead.contains(&i) {
                continue;
            }
            while !n
                .cli(&["CLUSTER", "INFO"])
                .unwrap_or_default()
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits (bounded) until the cluster has failed node `dead` over: the
    /// others mark it failed, and all of them report the cluster ok.
    pub fn wait_failover(&self, dead: usize) {
        let port = format!(":{}@", self.nodes[dead].port);
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, n) in self.nodes.iter().enumerate() {
            if i == dead {
                continue;
            }
            loop {
                let nodes = n.cli(&["CLUSTER", "NODES"]).unwrap_or_default();
                let failed = nodes
                    .lines()
                    .any(|l| l.contains(&port) && l.contains(",fail") && !l.contains("fail?"));
                let ok = n
                    .cli(&["CLUSTER", "INFO"])
                    .unwrap_or_default()
                    .contains("cluster_state:ok");
                if failed && ok {
                    break;
                }
                assert!(Instant::now() < deadline, "no failover: {nodes}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The index of the master that holds `key`.
    pub fn master_of(&self, key: &str) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.cli(&["ROLE"]).is_some_and(|r| r.starts_with("master"))
                && n.cli(&["EXISTS", key]).as_deref() == Some("1")
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A batched backend on `server` on the real clock, as code that counts
/// admissions exactly builds it: with a 2 s timeout, not the default
/// 50 ms. A round trip past the timeout is answered by the failure policy
/// (the fallback, with the whole limit, admits): on a loaded machine (the
/// whole suite on two cores) a Redis call does take 50 ms now and then,
/// and a test would count the failure policy's admissions, not the
/// batches'.
pub async fn batched_on_the_real_clock(server: &RedisServer) -> tierlimit::RedisBackend {
    tierlimit::RedisBackend::builder(server.url())
        .timeout(Duration::from_secs(2))
        .batches(tierlimit::backend::Batches::new())
        .connect()
        .await
        .unwrap()
}

/// A backend on `server` that reads `clock` instead of Redis's `TIME`.
#[cfg(feature = "test-util")]
pub async fn fake_clock_backend(
    server: &RedisServer,
    clock: &governor::clock::FakeRelativeClock,
) -> tierlimit::RedisBackend {
    on_fake_clock(tierlimit::RedisBackend::builder(server.url()), clock).await
}

/// A backend on `cluster` that reads `clock` instead of Redis's `TIME`.
#[cfg(feature = "test-util")]
pub async fn fake_clock_cluster_backend(
    cluster: &RedisCluster,
    clock: &governor::clock::FakeRelativeClock,
) -> tierlimit::RedisBackend {
    on_fake_clock(tierlimit::RedisBackend::cluster(cluster.urls()), clock).await
}

/// A backend on the Redis `builder` names that reads `clock` instead of
/// Redis's `TIME`.
#[cfg(feature = "test-util")]
async fn on_fake_clock(
    builder: tierlimit::backend::RedisBackendBuilder,
    clock: &governor::clock::FakeRelativeClock,
) -> tierlimit::RedisBackend {
    builder
        .fake_clock(clock.clone())
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

/// A fresh single node, a fake clock and a backend reading it; keep the
/// server bound for as long as the backend is used.
#[cfg(feature = "test-util")]
pub async fn single_node_on_fake_clock() -> (
    RedisServer,
    governor::clock::FakeRelativeClock,
    tierlimit::RedisBackend,
) {
    let server = RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let backend = fake_clock_backend(&server, &clock).await;
    (server, clock, backend)
}

/// A fresh single node, a fake clock and a backend reading it with
/// batches on.
#[cfg(feature = "test-util")]
pub async fn batched_single_node_on_fake_clock() -> (
    RedisServer,
    governor::clock::FakeRelativeClock,
    tierlimit::RedisBackend,
) {
    let server = RedisServer::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let builder =
        tierlimit::RedisBackend::builder(server.url()).batches(tierlimit::backend::Batches::new());
    let backend = on_fake_clock(builder, &clock).await;
    (server, clock, backend)
}

/// A fresh cluster, a fake clock and a backend reading it; keep the
/// cluster bound for as long as the backend is used.
#[cfg(feature = "test-util")]
pub async fn cluster_on_fake_clock() -> (
    RedisCluster,
    governor::clock::FakeRelativeClock,
    tierlimit::RedisBackend,
) {
    let cluster = RedisCluster::start();
    let clock = governor::clock::FakeRelativeClock::default();
    let backend = fake_clock_cluster_backend(&cluster, &clock).await;
    (cluster, clock, backend)
}

/// The timeout of a backend whose checks must time out only while Redis is
/// stalled (paused or frozen until the test ends the stall): far above a
/// round trip on a loaded two-core machine (50 ms now and then), so that a
/// check after the stall is never answered by the fallback instead.
pub const NOT_STALLED: Duration = Duration::from_secs(1);

/// The layer `build` makes on a backend on the Redis `builder` names (giving
/// up after `timeout`), sharing operator state through that Redis.
pub async fn sharing_operator_state<E>(
    builder: tierlimit::backend::RedisBackendBuilder,
    timeout: Duration,
    build: impl FnOnce(tierlimit::RedisBackend) -> tierlimit::RateLimitLayer<E, tierlimit::RedisBackend>,
) -> tierlimit::RateLimitLayer<E, tierlimit::RedisBackend> {
    let backend = builder.timeout(timeout).connect().await.unwrap();
    let layer = build(backend.clone());
    layer.share_operator_state(&backend).await.unwrap();
    layer
}
