//! Refusals remembered locally until their retry delay passes, so a
//! refused bucket's requests are answered without a round trip.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::limit::Limit;

/// Refusals remembered locally until their retry delay passes.
#[derive(Default)]
pub(super) struct DenyCache {
    shards: [Mutex<HashMap<(u64, Limit), u64>>; 16],
}

const DENY_CACHE_MAX: usize = 16_384;

impl DenyCache {
    fn shard(&self, bucket: u64) -> &Mutex<HashMap<(u64, Limit), u64>> {
        &self.shards[(bucket >> 40) as usize % 16]
    }

    /// The time (local micros) one request of this bucket conforms again.
    pub(super) fn get(&self, bucket: u64, limit: &Limit, now: u64) -> Option<u64> {
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

    pub(super) fn put(&self, bucket: u64, limit: &Limit, until: u64, now: u64) {
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
