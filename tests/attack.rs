//! Attacks on the late-answer, admin, watcher and loader changes, through
//! real parts: real `redis-server` processes (paused, frozen, restarted
//! from a snapshot), real axum servers on 127.0.0.1, real HTTP clients and
//! raw sockets, real files in temporary directories.
//!
//! No test waits for time to pass: each waits, bounded, for something it
//! can observe (a counter, an answer, Redis's command statistics).

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use std::time::Duration;

/// Every test of this binary hashes keys with the tests' secret
/// (`common::secret`), set first whichever test runs first (a key hashed
/// before it is set would fix a random one).
fn secret() {
    let _ = tierlimit::set_key_secret(common::secret::SECRET);
}

/// Whether Redis tests can run here; sets the secret.
#[cfg(feature = "redis")]
fn redis_ready() -> bool {
    secret();
    common::redis::available()
}

/// Polls `probe` until it holds (bounded: 10 s); whether it did.
async fn eventually(mut probe: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// The admin API over a memory backend: credentials, bodies, idempotency.
mod admin_http {
    use super::*;
    use axum::Router;
    use serde_json::Value;
    use tierlimit::RateLimitLayer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(super) const TOKEN: &str = "attack-admin-token-0123456789abcdef";
    const OTHER: &str = "attack-other-token-0123456789abcdef";

    async fn admin_server() -> common::Server {
        secret();
        let layer = RateLimitLayer::new(common::spec_policy());
        let admin = layer
            .admin_service()
            .token("ops", TOKEN)
            .token("ops2", OTHER)
            .body_timeout(Duration::from_millis(300));
        common::serve(Router::new().nest_service("/admin/v1", admin)).await
    }

    /// Sends raw bytes, half-closes nothing, and reads the status line of
    /// the first answer (bounded: 10 s).
    async fn raw(s: &common::Server, request: &[u8]) -> u16 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = c.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an answer within 10 s");
        let text = String::from_utf8_lossy(&buf);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {text:?}"))
    }

    fn put_key_request(auth: &[&str], content_length: usize, body: &str) -> Vec<u8> {
        let mut r = String::from("PUT /admin/v1/keys HTTP/1.1\r\nhost: x\r\n");
        for a in auth {
            r.push_str(&format!("authorization: {a}\r\n"));
        }
        r.push_str("content-type: application/json\r\n");
        r.push_str(&format!("content-length: {content_length}\r\n\r\n{body}"));
        r.into_bytes()
    }

    async fn boosts(s: &common::Server, token: &str) -> Vec<Value> {
        common::boosts::list(s, token).await
    }

    /// A boost of pro's read (one start for every try in this binary: a
    /// retry repeats its request).
    async fn boost(s: &common::Server, token: &str, idem: &str, adjust: &str) -> (u16, Value) {
        static NOW: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let now = *NOW.get_or_init(common::unix_now);
        common::boosts::post(s, token, idem, adjust, now).await
    }

    #[tokio::test]
    async fn two_authorization_headers_in_every_combination_are_a_400() {
        let s = admin_server().await;
        let body = r#"{"key":"sk-two-auth-000001","tier":"pro"}"#;
        let good = format!("Bearer {TOKEN}");
        let other = format!("Bearer {OTHER}");
        let combos: [[&str; 2]; 6] = [
            [&good, &good],
            [&good, "Bearer wrong"],
            ["Bearer wrong", &good],
            ["", &good],
            [&good, &other],
            ["Basic Zm9vOmJhcg==", &good],
        ];
        for combo in combos {
            let code = raw(&s, &put_key_request(&combo, body.len(), body)).await;
            assert_eq!(code, 400, "{combo:?}");
        }
        // One header that lists two credentials is one wrong credential.
        let joined = format!("{good}, {good}");
        let code = raw(&s, &put_key_request(&[&joined], body.len(), body)).await;
        assert_eq!(code, 403);
        // Nothing was provisioned by any of them.
        let code = raw(&s, &put_key_request(&[&good], body.len(), body)).await;
        assert_eq!(code, 200);
    }

    #[tokio::test]
    async fn a_body_that_never_arrives_or_is_too_large_changes_nothing() {
        let s = admin_server().await;
        let good = format!("Bearer {TOKEN}");
        let body = r#"{"key":"sk-dripped-00001","tier":"pro"}"#;
        // Headers and half the body, then nothing: a 408.
        let half = &body[..body.len() / 2];
        let code = raw(&s, &put_key_request(&[&good], body.len(), half)).await;
        assert_eq!(code, 408);
        // A Content-Length far past the limit, with a small body: refused
        // without waiting for bytes that never come (413), or at the
        // deadline (408).
        let code = raw(&s, &put_key_request(&[&good], 1 << 40, body)).await;
        assert!(code == 413 || code == 408, "{code}");
        // A whole body past the limit: 413.
        let big = format!(
            r#"{{"key":"sk-dripped-00001","tier":"pro","pad":"{}"}}"#,
            "a".repeat(70_000)
        );
        let code = raw(&s, &put_key_request(&[&good], big.len(), &big)).await;
        assert_eq!(code, 413);
        // Chunked, never finished: a 408.
        let chunked = format!(
            "PUT /admin/v1/keys HTTP/1.1\r\nhost: x\r\nauthorization: {good}\r\n\
             transfer-encoding: chunked\r\n\r\n5\r\n{{\"key\r\n"
        );
        assert_eq!(raw(&s, chunked.as_bytes()).await, 408);
    }

    #[tokio::test]
    async fn hostile_idempotency_keys_are_refused_and_tokens_do_not_share_them() {
        let s = admin_server().await;
        for bad in ["", " ", "a b", &"k".repeat(256)] {
            let (code, body) = boost(&s, TOKEN, bad, "x2").await;
            assert_eq!(code, 400, "{bad:?}: {body}");
        }
        // Obsolete text (bytes above 0x7f) in the header: a 400.
        let mut r = format!(
            "POST /admin/v1/boosts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
             content-type: application/json\r\nidempotency-key: caf"
        )
        .into_bytes();
        r.extend_from_slice(b"\xe9\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(raw(&s, &r).await, 400);
        // Two Idempotency-Key headers: a 400.
        let mut r = format!(
            "POST /admin/v1/boosts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
             idempotency-key: a\r\nidempotency-key: a\r\ncontent-length: 2\r\n\r\n{{}}"
        )
        .into_bytes();
        r.truncate(r.len());
        assert_eq!(raw(&s, &r).await, 400);
        // The same key from two operators: two boosts, neither refused.
        let (a, first) = boost(&s, TOKEN, "shared-key", "x2").await;
        let (b, second) = boost(&s, OTHER, "shared-key", "x3").await;
        assert_eq!((a, b), (201, 201), "{first} {second}");
        assert_ne!(first["id"], second["id"]);
        assert_eq!(boosts(&s, TOKEN).await.len(), 2);
    }

    #[tokio::test]
    async fn a_boost_retried_after_it_was_deleted_is_not_added_again() {
        let s = admin_server().await;
        let (code, first) = boost(&s, TOKEN, "once-only", "x2").await;
        assert_eq!(code, 201);
        let id = first["id"].as_str().unwrap();
        let res = common::client()
            .delete(s.url(&format!("/admin/v1/boosts/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(boosts(&s, TOKEN).await.is_empty());
        // The first POST's answer was lost; its retry arrives late.
        let (code, again) = boost(&s, TOKEN, "once-only", "x2").await;
        assert!(
            boosts(&s, TOKEN).await.is_empty(),
            "the retry ({code} {again}) re-added a boost an operator deleted"
        );
        assert_eq!(code, 409, "{again}");
        assert_eq!(again["type"], "urn:tierlimit:problem:admin-boost-removed");
    }
}

/// The policy loader's errors never show a key.
mod loader {
    use tierlimit::Policy;

    const HEAD: &str =
        "categories = [\"read\", \"write\"]\n\n[tiers.free]\nread = \"1/s\"\nwrite = \"1/s\"\n\n";

    /// Each file's error, with the secret marker it must not show.
    fn leaks(cases: &[&str]) -> Vec<String> {
        super::secret();
        let mut out = Vec::new();
        for (i, body) in cases.iter().enumerate() {
            let file = format!("{HEAD}{body}");
            match Policy::from_toml_str(&file) {
                Ok(_) => out.push(format!("case {i}: accepted:\n{body}")),
                Err(e) => {
                    let shown = format!("{e} | {e:?} | {}", e.entry());
                    if shown.contains("SECRET") {
                        out.push(format!("case {i}: {shown}"));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn no_error_of_a_hostile_file_shows_a_key() {
        let cases = [
            // A multi-line string whose lines look like a header.
            "[keys]\n\"sk-SECRET-01\" = \"\"\"\n[tiers.free]\nread = \"x\"\n\"\"\"\n",
            // Keys grouped under a sub-table (a plausible layout).
            "[keys.team_a]\n\"sk-SECRET-02\" = \"free\"\n",
            // An unknown tier, a duplicate, escapes and unicode.
            "[keys]\n\"sk-SECRET-03\" = \"gold\"\n",
            "[keys]\n\"sk-SECRET-04\" = \"free\"\n\"sk-SECRET-04\" = \"free\"\n",
            "[keys]\n\"sk-\\u00e9SECRET-05\\n\\\"\" = \"gold\"\n",
            "[keys]\n'sk-SECRET-06\"' = { tier = \"free\", acount = \"a\" }\n",
            // A bare (unquoted) value and trailing garbage.
            "[keys]\nsk-SECRET-07 = free\n",
            "[keys]\n\"sk-SECRET-08\" = \"free\" \"x\"\n",
            // A typo of [keys], and keys as a root inline table / dotted keys.
            "[kyes]\n\"sk-SECRET-09\" = \"free\"\n",
            "[keys]\n\"sk-SECRET-10\" = { tier = \"free\", \"sk-SECRET-10\" = 1 }\n",
            // Overrides and boosts.
            "[overrides.\"sk-SECRET-11\"]\nreed = \"x2\"\n",
            "[overrides.\"sk-SECRET-12\"]\nread = \"x1001\"\n",
            "[[boosts]]\nkey = \"sk-SECRET-13\"\nadjust = \"x1000.5\"\nstart = 0\nend = 1\n",
            "[[boosts]]\nkey = \"sk-SECRET-14\"\nadjust = \"x2\"\nstart = 0\nend = 1\nbogus = 1\n",
            // A key value that is not a string.
            "[keys]\n\"sk-SECRET-15\" = 12\n",
            "[keys]\n\"sk-SECRET-16\" = [\"free\"]\n",
            // A key as a cell's field.
            "[overrides.\"sk-SECRET-19\"]\nread = { \"sk-SECRET-19\" = 1 }\n",
            // An unterminated string holding a key.
            "[keys]\n\"sk-SECRET-17 = \"free\"\n",
        ];
        let found = leaks(&cases);
        assert!(found.is_empty(), "{}", found.join("\n---\n"));
    }

    #[test]
    fn no_error_of_overrides_in_a_sub_table_shows_a_key() {
        let cases = [
            "[overrides.team_a]\n\"sk-SECRET-18\" = \"x2\"\n",
            "[overrides.team_b.\"sk-SECRET-20\"]\nread = \"x2\"\n",
        ];
        let found = leaks(&cases);
        assert!(found.is_empty(), "{}", found.join("\n---\n"));
    }

    #[test]
    fn multipliers_above_x1000_are_refused_in_every_spelling() {
        for m in [
            "x1001",
            "x1000.0001",
            "x1e4",
            "X1001",
            "x 1001",
            "×1001",
            "x+1001",
        ] {
            for body in [
                format!("[overrides.\"k\"]\nread = \"{m}\"\n"),
                format!("[[boosts]]\ntier = \"free\"\nadjust = \"{m}\"\nstart = 0\nend = 1\n"),
            ] {
                let file = format!("{HEAD}[keys]\n\"k\" = \"free\"\n{body}");
                assert!(
                    Policy::from_toml_str(&file).is_err(),
                    "{m} accepted:\n{body}"
                );
            }
        }
    }
}

/// The policy watcher, through real files.
#[cfg(all(feature = "watch", unix))]
mod watch_attacks {
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::common::TempDir;
    use tierlimit::{Policy, PolicyHandle, RateLimitLayer, watch::PolicyWatcher};

    fn policy(read: u32) -> String {
        format!(
            "categories = [\"read\", \"write\"]\n\n[tiers.free]\nread = \"{read}/hour\"\nwrite = \"5/hour\"\n\n[keys]\n\"k\" = \"free\"\n"
        )
    }

    fn layer_on(path: &Path) -> PolicyHandle {
        secret();
        RateLimitLayer::new(Policy::from_toml_file(path).unwrap()).policy_handle()
    }

    fn free_reads(handle: &PolicyHandle) -> u32 {
        let p = handle.current();
        let (t, c) = (p.tier("free").unwrap(), p.category("read").unwrap());
        p.limits(t, c).per_key()[0].max()
    }

    /// Waits (bounded: 10 s) until `probe` holds; whether it did.
    fn within(probe: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if probe() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn wait_reads(w: &PolicyWatcher, n: u64) {
        assert!(within(|| w.reads() >= n), "reads {} < {n}", w.reads());
    }

    #[test]
    fn a_file_changed_before_the_watch_began_is_applied_when_saved_again() {
        let dir = TempDir::new("before");
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy(10)).unwrap();
        let handle = layer_on(&path);
        // A deployment updates the file between the load and the watch.
        std::fs::write(&path, policy(20)).unwrap();
        let watcher = handle.watch(&path).unwrap();
        // Saved again (unchanged on disk): the watcher reads it, and the
        // policy in force must now be the file's.
        std::fs::write(&path, policy(20)).unwrap();
        wait_reads(&watcher, 1);
        assert!(
            within(|| free_reads(&handle) == 20),
            "the file says 20, the policy in force stays {}",
            free_reads(&handle)
        );
    }

    #[test]
    fn a_symlink_loop_then_a_real_file_is_followed() {
        let dir = TempDir::new("loop");
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy(10)).unwrap();
        let handle = layer_on(&path);
        let watcher = handle.watch(&path).unwrap();
        // Replaced by a loop (a → b → a, the file a link to a).
        std::os::unix::fs::symlink(dir.join("b"), dir.join("a")).unwrap();
        std::os::unix::fs::symlink(dir.join("a"), dir.join("b")).unwrap();
        let tmp = dir.join("policy.link");
        std::os::unix::fs::symlink(dir.join("a"), &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_reads(&watcher, 1);
        assert_eq!(free_reads(&handle), 10);
        // A self-loop too.
        std::os::unix::fs::symlink(&path, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let reads = watcher.reads();
        std::fs::write(dir.join("..nudge"), "").unwrap();
        wait_reads(&watcher, reads + 1);
        // Then a real file again.
        let tmp = dir.join("policy.tmp");
        std::fs::write(&tmp, policy(30)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(within(|| free_reads(&handle) == 30));
        assert_eq!(watcher.errors(), 0);
    }

    #[test]
    fn configmap_swaps_in_quick_succession_end_at_the_last() {
        let dir = TempDir::new("swaps");
        let publish = |stamp: &str, read: u32| {
            let version = dir.join(stamp);
            std::fs::create_dir(&version).unwrap();
            std::fs::write(version.join("policy.toml"), policy(read)).unwrap();
            version
        };
        let mut old = publish("..v0", 10);
        std::os::unix::fs::symlink("..v0", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
        let path = dir.join("policy.toml");
        let handle = layer_on(&path);
        let watcher = handle.watch(&path).unwrap();
        for i in 1..=6u32 {
            let stamp = format!("..v{i}");
            let version = publish(&stamp, 10 + i);
            // Odd swaps remove the old directory before the swap (the
            // link dangles a moment), even ones after it.
            if i % 2 == 1 {
                std::fs::remove_dir_all(&old).unwrap();
            }
            std::os::unix::fs::symlink(&stamp, dir.join("..data_tmp")).unwrap();
            std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
            if i % 2 == 0 {
                std::fs::remove_dir_all(&old).unwrap();
            }
            old = version;
        }
        assert!(
            within(|| free_reads(&handle) == 16),
            "in force: {}",
            free_reads(&handle)
        );
        // And one more, after things settled.
        let version = publish("..v7", 17);
        std::os::unix::fs::symlink("..v7", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(&old).unwrap();
        let _ = version;
        assert!(within(|| free_reads(&handle) == 17));
        assert_eq!(watcher.errors(), 0);
    }

    #[test]
    fn a_directory_removed_and_created_again_is_followed() {
        let root = TempDir::new("dirgone");
        let dir = root.join("conf");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("policy.toml");
        std::fs::write(&path, policy(10)).unwrap();
        let handle = layer_on(&path);
        let watcher = handle.watch(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&path, policy(20)).unwrap();
        // Written again, to be sure an event comes after the directory is back.
        std::fs::write(&path, policy(21)).unwrap();
        assert!(
            within(|| free_reads(&handle) == 21),
            "in force: {} (reads {})",
            free_reads(&handle),
            watcher.reads()
        );
    }
}

/// Late Redis answers and the shared operator state, against real
/// `redis-server` processes.
#[cfg(feature = "redis")]
mod redis_attacks {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use common::read_late_key;
    use common::redis::RedisServer;
    use serde_json::json;
    use tierlimit::RedisBackend;

    const TOKEN: &str = admin_http::TOKEN;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lazy_backend_whose_redis_came_up_late_counts_each_admission_once() {
        if !redis_ready() {
            return;
        }
        // Redis is down when the service starts (a lazy connection).
        let mut server = RedisServer::start();
        server.kill();
        let backend = RedisBackend::builder(server.url())
            .timeout(common::redis::NOT_STALLED)
            .trip_after(1_000_000)
            .lazy(true)
            .connect()
            .await
            .unwrap();
        server.restart();
        let s = common::serve_late_key(backend).await;
        // Through Redis once it is up (the connection is made on demand).
        assert!(
            eventually(async || {
                read_late_key(&s).await.0 == 200
                    && server
                        .cli(&["--scan", "--pattern", "*"])
                        .is_some_and(|k| !k.is_empty())
            })
            .await
        );
        let before = read_late_key(&s).await.2.unwrap();
        server.cli(&["CONFIG", "RESETSTAT"]).unwrap();
        assert_eq!(
            server
                .cli(&["CLIENT", "PAUSE", "60000", "WRITE"])
                .as_deref(),
            Some("OK")
        );
        for _ in 0..2 {
            assert_eq!(read_late_key(&s).await.0, 200);
        }
        assert_eq!(server.cli(&["CLIENT", "UNPAUSE"]).as_deref(), Some("OK"));
        assert!(
            eventually(async || server.command_calls("evalsha") >= 2).await,
            "Redis ran the queued checks"
        );
        // The two late checks count in Redis the requests the fallback
        // admitted (each once), and this one: three in all.
        let (code, _, after) = read_late_key(&s).await;
        assert_eq!(code, 200);
        assert_eq!(
            after,
            Some(before - 3),
            "every admission counted in Redis exactly once"
        );
    }

    /// A TCP proxy to Redis that can cut an instance off (its connections
    /// dropped, new ones closed at once) and let it back.
    struct Proxy {
        port: u16,
        blocked: Arc<AtomicBool>,
        conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        async fn to(upstream: u16) -> Proxy {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let blocked = Arc::new(AtomicBool::new(false));
            let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
            let (b, c) = (Arc::clone(&blocked), Arc::clone(&conns));
            let task = tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if b.load(Ordering::SeqCst) {
                        continue;
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut up) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    c.lock().unwrap().push(conn.abort_handle());
                }
            });
            Proxy {
                port,
                blocked,
                conns,
                task,
            }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        fn block(&self) {
            self.blocked.store(true, Ordering::SeqCst);
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }

        fn unblock(&self) {
            self.blocked.store(false, Ordering::SeqCst);
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
            self.block();
        }
    }

    async fn instance(url: String) -> common::Server {
        let builder = RedisBackend::builder(url);
        let layer =
            common::redis::sharing_operator_state(builder, common::redis::NOT_STALLED, |b| {
                demo::limits(common::spec_policy(), b)
            })
            .await;
        common::serve(demo::app_with_admin(layer, Some(TOKEN))).await
    }

    async fn provision(s: &common::Server, key: &str) -> u16 {
        common::client()
            .put(s.url("/admin/v1/keys"))
            .bearer_auth(TOKEN)
            .json(&json!({ "key": key, "tier": "pro" }))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_that_missed_a_restore_from_a_snapshot_follows_redis() {
        if !redis_ready() {
            return;
        }
        let mut server = RedisServer::start();
        let proxy = Proxy::to(server.port).await;
        let a = instance(server.url()).await;
        let b = instance(proxy.url()).await;
        assert_eq!(provision(&a, "sk-snap-first-01").await, 200);
        assert_eq!(server.cli(&["SAVE"]).as_deref(), Some("OK"));
        assert_eq!(provision(&a, "sk-snap-lost-002").await, 200);
        assert!(eventually(async || common::status(&b, "sk-snap-lost-002").await == 200).await);
        // B is cut off while Redis comes back from the snapshot (a restore,
        // or a failover to a replica that lagged): the second key is lost.
        proxy.block();
        server.restart();
        assert_eq!(
            server.cli(&["HLEN", "tierlimit:{admin}:state"]).as_deref(),
            Some("1")
        );
        assert!(eventually(async || provision(&a, "sk-snap-after-03").await == 200).await);
        proxy.unblock();
        // Redis holds the first and the third key; every instance must
        // follow it.
        for (name, s) in [("A", &a), ("B", &b)] {
            assert!(
                eventually(async || common::status(s, "sk-snap-after-03").await == 200).await,
                "{name} never took the key written after the restore"
            );
            assert!(
                eventually(async || common::status(s, "sk-snap-lost-002").await == 401).await,
                "{name} still admits a key Redis lost"
            );
            assert_eq!(common::status(s, "sk-snap-first-01").await, 200, "{name}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_from_two_instances_during_a_pause_both_land_everywhere() {
        if !redis_ready() {
            return;
        }
        let server = RedisServer::start();
        let (a, b) = (instance(server.url()).await, instance(server.url()).await);
        // Redis pauses writes for less than the writes' deadline: both
        // changes wait, then run, and are answered.
        assert_eq!(
            server.cli(&["CLIENT", "PAUSE", "300", "WRITE"]).as_deref(),
            Some("OK")
        );
        let (x, y) = tokio::join!(
            provision(&a, "sk-pause-from-a1"),
            provision(&b, "sk-pause-from-b2")
        );
        // Each is answered 200 (it ran) or 503 (it never will).
        let landed: Vec<&str> = [(x, "sk-pause-from-a1"), (y, "sk-pause-from-b2")]
            .into_iter()
            .filter(|(c, _)| {
                assert!(*c == 200 || *c == 503, "{c}");
                *c == 200
            })
            .map(|(_, k)| k)
            .collect();
        for s in [&a, &b] {
            for k in ["sk-pause-from-a1", "sk-pause-from-b2"] {
                let want = if landed.contains(&k) { 200 } else { 401 };
                assert!(
                    eventually(async || common::status(s, k).await == want).await,
                    "{k}: want {want}"
                );
            }
        }
        let fields = server.cli(&["HLEN", "tierlimit:{admin}:state"]).unwrap();
        assert_eq!(fields, landed.len().to_string());
    }
}
