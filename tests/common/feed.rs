//! The usage feed's test helpers: waiting for its sink, collecting events.

use std::sync::Arc;

use tierlimit::feed::{UsageEvent, UsageFeed};

/// Waits (bounded) until the feed has written `want` events; then every
/// one queued is in the sink.
pub async fn written(feed: &UsageFeed, want: u64) -> u64 {
    for _ in 0..20_000 {
        if feed.written() >= want {
            break;
        }
        tokio::task::yield_now().await;
    }
    let f = feed.clone();
    tokio::task::spawn_blocking(move || f.flush())
        .await
        .unwrap();
    feed.written()
}

/// Events a sink collected.
pub type Seen = Arc<std::sync::Mutex<Vec<UsageEvent>>>;

/// Events collected by a sink into a shared list.
pub fn collecting() -> (
    Seen,
    impl FnMut(&[UsageEvent]) -> std::io::Result<()> + Send + 'static,
) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = Arc::clone(&seen);
    (seen, move |events: &[UsageEvent]| {
        into.lock().unwrap().extend_from_slice(events);
        Ok(())
    })
}
