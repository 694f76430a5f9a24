//! [`Usage`]: one request's usage record, from its admission to its one
//! event.
//!
//! Made at admission when the layer has a feed (boxed: only then), carried
//! with the check; a refused request drops it unadmitted (no event). An
//! admitted request's record becomes the opaque hold its response body
//! carries (the response layer's `LeaseGuard`, wrapping the request's own
//! leases if it has any), like a lease: it learns the status when the head
//! passes and the end when the body ends, and emits its event from `Drop`,
//! exactly once. A metered request's record hands its event to the meter,
//! which sends it when it settles (its last clone dropped), with the tokens
//! settled and the refund.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{UsageEvent, UsageFeed};
use crate::feed::End;
use crate::key::KeyId;
use crate::meter::{Settled, TokenMeter, TokenUsage};
use crate::response::{Hold, LeaseGuard};

/// One request's usage record (see the module docs).
pub(crate) struct Usage {
    feed: UsageFeed,
    event: Option<Box<UsageEvent>>,
    started: Instant,
    admitted: bool,
    /// How the body ended (an [`End`] as a number: its body may say so
    /// through a shared reference).
    end: AtomicU8,
    /// The request's leases, released before the event leaves.
    lease: Option<LeaseGuard>,
    /// A metered request's meter: the event leaves when it settles.
    meter: Option<TokenMeter>,
}

/// What a record starts with, at admission.
pub(crate) struct Start<'a> {
    pub(crate) time: Duration,
    pub(crate) key: KeyId,
    pub(crate) account: Option<KeyId>,
    pub(crate) org: Option<KeyId>,
    pub(crate) tier: &'a str,
    pub(crate) category: &'a str,
    pub(crate) method: &'a http::Method,
    pub(crate) path: &'a str,
    /// The request's cost, in units.
    pub(crate) requests: u32,
}

impl fmt::Debug for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Usage")
            .field("admitted", &self.admitted)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Usage {
    /// A record of a request being checked: dropped as it is, no event.
    #[inline(never)]
    pub(crate) fn start(feed: &UsageFeed, s: &Start<'_>) -> Box<Self> {
        let mut event = Box::new(UsageEvent::start(s.time, s.key, s.account));
        event.org = s.org;
        event.tier.push_str(s.tier);
        event.category.push_str(s.category);
        event.route = format!("{} {}", s.method, s.path);
        event.requests = s.requests;
        Box::new(Usage {
            feed: feed.clone(),
            event: Some(event),
            started: Instant::now(),
            admitted: false,
            end: AtomicU8::new(DROPPED),
            lease: None,
            meter: None,
        })
    }

    /// Let through by shadow mode: nothing was counted.
    pub(crate) fn shadow(mut self: Box<Self>) -> Box<Self> {
        if let Some(e) = &mut self.event {
            e.shadow = true;
            e.requests = 0;
        }
        self
    }

    /// The request was admitted: the record, holding its `lease` and
    /// following its `meter`, is what its response body holds.
    pub(crate) fn admit(
        mut self: Box<Self>,
        meter: Option<TokenMeter>,
        lease: Option<LeaseGuard>,
    ) -> LeaseGuard {
        self.admitted = true;
        self.meter = meter;
        self.lease = lease;
        // The same box, unsized: no allocation.
        LeaseGuard::new(self)
    }
}

impl Hold for Usage {
    fn on_response(&mut self, status: StatusCode) {
        if let Some(l) = &mut self.lease {
            l.on_response(status);
        }
        if let Some(e) = &mut self.event {
            e.status = Some(status.as_u16());
        }
    }

    fn on_end(&self, error: bool) {
        if let Some(l) = &self.lease {
            l.on_end(error);
        }
        let end = if error { ERROR } else { COMPLETE };
        self.end.store(end, Ordering::Relaxed);
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        // The leases go back first: the event never holds them up.
        drop(self.lease.take());
        let Some(mut event) = self.event.take() else {
            return;
        };
        if !self.admitted {
            return;
        }
        event.duration = self.started.elapsed();
        event.end = match *self.end.get_mut() {
            COMPLETE => End::Complete,
            ERROR => End::Error,
            _ => End::Dropped,
        };
        let feed = self.feed.clone();
        match self.meter.take() {
            // Sent when the meter settles: this clone, dropped now, may be
            // its last.
            Some(meter) => meter.then(Box::new(Pending { feed, event })),
            None => feed.send(event),
        }
    }
}

const DROPPED: u8 = 0;
const COMPLETE: u8 = 1;
const ERROR: u8 = 2;

/// An event waiting for its meter's settlement.
struct Pending {
    feed: UsageFeed,
    event: Box<UsageEvent>,
}

impl Settled for Pending {
    fn settled(self: Box<Self>, tokens: Option<TokenUsage>, refunded: bool) {
        let Pending { feed, mut event } = *self;
        event.tokens = tokens.map(|t| t.total());
        // Input and output apart when the request told them apart (or
        // reported nothing): a total without a kind has no split.
        if let Some(t) = tokens.filter(|t| t.input > 0 || t.output > 0 || t.unsplit == 0) {
            event.input_tokens = Some(t.input);
            event.output_tokens = Some(t.output);
        }
        if refunded {
            event.refunded = true;
            event.requests = 0;
        }
        feed.send(event);
    }
}
