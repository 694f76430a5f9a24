//! The key secret of the test binaries and of the benches that start a
//! `redis-server`: one value everywhere, set before any key is hashed.
//! Setting it again is a no-op; it fails if another secret is in force
//! (here: a key was hashed first, with a random one). Without the
//! `redis` feature too: a test that checks Redis and memory alike sets
//! it the same way.

/// Every test binary and bench that sets a key secret sets this one.
pub const SECRET: &[u8] = b"tierlimit-test-secret-0123456789";

/// Sets [`SECRET`] as the key secret.
pub fn init_secret() {
    tierlimit::set_key_secret(SECRET).expect("one secret per test binary");
}
