//! The memory backend as a [`BatchStore`]: takes and give-backs in the
//! owner's shard, under its one lock, on the same buckets as its checks of
//! several charges (never governor's limiters of checks alone: a bucket
//! batched through [`Batcher`](crate::backend::batch::Batcher) lives in
//! one place).

use std::future::{Ready, ready};
use std::sync::PoisonError;

use governor::clock::Clock;

use super::MemoryBackend;
use crate::backend::batch::{BatchStore, GiveBack, Take, Taken, step};
use crate::backend::{BackendError, Check};
use crate::limit::MAX_LIMITS;

impl<C> MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A take in one step (see [`BatchStore::take`]): a batch of up to
    /// `want` requests' worth, else a normal check in the owner's shard.
    pub fn take_now(&self, take: &Take<'_>) -> Result<Taken, BackendError> {
        let inner = &*self.inner;
        let charges = &take.charges[..take.charges.len().min(MAX_LIMITS)];
        super::fits(charges)?;
        self.maintain(false);
        let now = self.elapsed();
        let store = &inner.multi;
        let mut guard = store
            .shard(take.owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let maps = &mut *guard;
        let mut read = store.read(maps, charges, take.known, &inner.budget);
        let rolling = charges.iter().all(|c| !c.limit.period().is_calendar());
        if rolling
            && let Some(mut tats) = read.own_tats(charges.len(), now)
            && let Some(grant) = step::grant(take, &mut tats, now)
        {
            read.write(maps, charges, &tats, take.known);
            return Ok(Taken::Granted(grant));
        }
        read.cancel(&inner.budget);
        drop(read);
        let check = Check {
            charges,
            ..take.check()
        };
        Ok(Taken::Checked(self.check_locked(maps, &check, now)))
    }

    /// A give-back in the owner's shard (see [`BatchStore::give_back`]).
    pub fn give_back_now(&self, back: &GiveBack<'_>) {
        let mut guard = self
            .inner
            .multi
            .shard(back.owner)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, c) in back.charges.iter().enumerate().take(MAX_LIMITS) {
            let Some(tat) = guard.get(c.bucket) else {
                continue;
            };
            if let Some(next) = step::given_back(back, i, tat) {
                let known = guard.known.contains_key(&c.bucket);
                guard.set(c.bucket, next, known);
            }
        }
    }
}

impl<C> BatchStore for MemoryBackend<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    type Future = Ready<Result<Taken, BackendError>>;

    fn take(&self, take: &Take<'_>) -> Self::Future {
        ready(self.take_now(take))
    }

    fn give_back(&self, back: &GiveBack<'_>) {
        self.give_back_now(back);
    }
}
