//! Batches (`tierlimit::backend::batch`): the soundness model on a
//! simulated store, and the batcher over the memory backend on a fake
//! clock; the Redis backend with batches on, against real servers.

#[cfg(all(feature = "redis", feature = "test-util"))]
#[path = "batch/attack.rs"]
mod attack;
#[cfg(all(feature = "redis", feature = "test-util"))]
#[path = "batch/faults.rs"]
mod faults;
#[path = "batch/memory.rs"]
mod memory;
#[cfg(all(feature = "redis", feature = "test-util"))]
#[path = "batch/oracle.rs"]
mod oracle;
#[path = "batch/props.rs"]
mod props;
#[cfg(all(feature = "redis", feature = "test-util"))]
#[path = "batch/redis.rs"]
mod redis;

#[cfg(all(feature = "redis", feature = "test-util"))]
mod common;

#[cfg(all(feature = "redis", feature = "test-util", feature = "tonic"))]
#[allow(dead_code)]
#[path = "../examples/tonic_grpc.rs"]
mod grpc_demo;

/// Every test of this binary hashes keys with the secret the Redis tests
/// need (one secret per process, whichever test hashes first). Without
/// the Redis features (and so `common`), nothing needs it.
fn secret() {
    #[cfg(all(feature = "redis", feature = "test-util"))]
    let _ = tierlimit::set_key_secret(common::secret::SECRET);
}
