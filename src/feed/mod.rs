//! The usage feed: one [`UsageEvent`] per admitted request, for billing.
//!
//! Give a layer a [`UsageFeed`] ([`RateLimitLayerBuilder::usage_feed`](crate::RateLimitLayerBuilder::usage_feed))
//! and every request it admits becomes exactly one event when it is over:
//! when its response body ends, fails or is dropped (a client that goes
//! away mid-stream), or when its response future is dropped before a
//! response (a timeout, a cancelled call). A metered request's event
//! leaves with its token settlement, so it carries the tokens settled and
//! whether its response refunded it.
//!
//! Between the request path and the [`UsageSink`] sits a bounded queue:
//! the response never waits for the sink. When the queue is full, the
//! event is dropped and counted ([`UsageFeed::dropped`], and the
//! `tierlimit_usage_events_dropped_total` metric), never silently. The
//! sink runs on a thread of its own (`tierlimit-usage`), so it may block
//! (a file, a socket) and the layer needs no async runtime.
//!
//! Not billed (no event): every answer the layer gives itself — requests
//! refused (429), rejected (400, 401), answered 503 (the backend could not
//! decide, or the request was shed under overload) — exempt routes, calls
//! dropped while their check was still under way (never admitted), and
//! Envoy's front (it decides requests it does not serve). Requests in
//! unlimited cells are billed. Shadow-mode passes get an event marked
//! `shadow`, with nothing counted.
//!
//! Built-in sinks: [`JsonLines`] (a file, one JSON object a line) and,
//! with the `redis` feature, [`RedisStream`] (`XADD … MAXLEN ~ N`).
//!
//! ```
//! use tierlimit::feed::{JsonLines, UsageFeed};
//! use tierlimit::{Policy, RateLimitLayer};
//! # let dir = std::env::temp_dir().join(format!("tierlimit-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("usage.jsonl");
//! # let policy = Policy::from_toml_str("categories = [\"read\", \"write\"]\n[tiers.t]\nread = \"1/s\"\nwrite = \"1/s\"").unwrap();
//!
//! let feed = UsageFeed::new(JsonLines::append(&path)?, 10_000)?;
//! let layer = RateLimitLayer::builder(policy).usage_feed(feed.clone()).build();
//! // … serve; at shutdown, make sure everything queued is written:
//! feed.flush();
//! # let _ = layer;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

mod event;
mod jsonl;
mod record;
#[cfg(feature = "redis")]
mod redis;

pub use event::{End, UsageEvent};
pub use jsonl::JsonLines;
pub(crate) use record::{Start, Usage};
#[cfg(feature = "redis")]
pub use redis::RedisStream;

/// Where usage events go: called on the feed's own thread with the events
/// queued since the last call (at most [`MAX_BATCH`]), in the order their
/// requests were settled. It may block; the request path never waits for
/// it (events arriving meanwhile queue up, and beyond the queue's
/// capacity are dropped and counted).
///
/// An error counts the batch's events as failed
/// (`tierlimit_usage_events_failed_total`) and is logged; the sink is
/// called again with the next batch.
///
/// A closure is a sink:
///
/// ```
/// use tierlimit::feed::{UsageEvent, UsageFeed};
///
/// let feed = UsageFeed::new(
///     |events: &[UsageEvent]| {
///         for e in events {
///             println!("{} {} {}", e.tier, e.category, e.requests);
///         }
///         Ok(())
///     },
///     1024,
/// )?;
/// # let _ = feed;
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait UsageSink: Send + 'static {
    /// Writes `events`, durably enough for the sink's purpose (a file
    /// sink flushes).
    fn write(&mut self, events: &[UsageEvent]) -> io::Result<()>;
}

impl<F> UsageSink for F
where
    F: FnMut(&[UsageEvent]) -> io::Result<()> + Send + 'static,
{
    fn write(&mut self, events: &[UsageEvent]) -> io::Result<()> {
        self(events)
    }
}

/// The most events handed to a sink in one call.
pub const MAX_BATCH: usize = 512;

/// A bounded queue of usage events and the thread that drains it into a
/// [`UsageSink`]. Cheap to clone (every clone is the same feed); the
/// thread ends once every clone, the layers holding it and the requests
/// in flight are gone, after writing what was queued.
#[derive(Clone)]
pub struct UsageFeed {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<Msg>,
    counts: Arc<Counts>,
}

/// What the feed counted (each also a metric with the `metrics` feature).
#[derive(Default)]
struct Counts {
    dropped: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
}

enum Msg {
    Event(Box<UsageEvent>),
    /// Answer once everything queued before it was handed to the sink.
    Flush(SyncSender<()>),
}

impl fmt::Debug for UsageFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageFeed")
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .field("failed", &self.failed())
            .finish_non_exhaustive()
    }
}

impl UsageFeed {
    /// A feed of at most `capacity` queued events (at least 1) drained
    /// into `sink` by a thread of its own, started here. The error is the
    /// system's refusal to start a thread.
    pub fn new(sink: impl UsageSink, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let counts = Arc::new(Counts::default());
        let drained = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("tierlimit-usage".into())
            .spawn(move || drain(rx, sink, &drained))?;
        Ok(UsageFeed {
            inner: Arc::new(Inner { tx, counts }),
        })
    }

    /// Events dropped because the queue was full (the sink fell behind).
    pub fn dropped(&self) -> u64 {
        self.inner.counts.dropped.load(Ordering::Relaxed)
    }

    /// Events the sink wrote.
    pub fn written(&self) -> u64 {
        self.inner.counts.written.load(Ordering::Relaxed)
    }

    /// Events the sink failed to write (its error was logged).
    pub fn failed(&self) -> u64 {
        self.inner.counts.failed.load(Ordering::Relaxed)
    }

    /// Blocks until every event queued before the call has been handed to
    /// the sink (written or failed), for a clean shutdown. It waits for
    /// the sink, however long it blocks: never call it on the request
    /// path (in async code, from `spawn_blocking`).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.inner.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Queues `event`, or drops and counts it if the queue is full. Never
    /// blocks.
    pub(crate) fn send(&self, event: Box<UsageEvent>) {
        match self.inner.tx.try_send(Msg::Event(event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.inner.counts.dropped.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::usage_dropped();
            }
        }
    }
}

/// The feed's thread: batches of what is queued, handed to the sink.
fn drain(rx: Receiver<Msg>, mut sink: impl UsageSink, counts: &Counts) {
    let mut batch = Vec::with_capacity(64);
    let mut waiters = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(*e),
                Msg::Flush(w) => waiters.push(w),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            write(&mut sink, &batch, counts);
            batch.clear();
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// One batch into the sink, counted.
fn write(sink: &mut impl UsageSink, batch: &[UsageEvent], counts: &Counts) {
    let n = batch.len() as u64;
    match sink.write(batch) {
        Ok(()) => {
            counts.written.fetch_add(n, Ordering::Relaxed);
            crate::telemetry::usage_written(n);
        }
        Err(e) => {
            counts.failed.fetch_add(n, Ordering::Relaxed);
            crate::telemetry::usage_failed(n);
            tracing::warn!(error = %e, events = n, "usage events not written");
        }
    }
}

/// Microseconds, saturated (an event's duration).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
