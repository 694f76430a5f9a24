//! Load shedding by tier and priority when the service behind the layer is
//! past its capacity (the policy's `[overload]` table).
//!
//! [`Overload`] counts the requests in flight through one layer (every
//! clone of its service shares it: the capacity is per instance) and holds
//! the capacity, fixed or adapted by [`aimd`] to the latency of admitted
//! requests. Admission asks it for a [`Slot`] after identifying the caller
//! and before charging anything: a request of a tier whose fraction of the
//! capacity is taken is shed, and a shed request has consumed nothing.
//! The slot is held until the inner service's response head (or until the
//! request is refused by its limits, or its future dropped), and its
//! latency feeds the adaptive rule.
//!
//! A policy without `[overload]` never reaches this module: admission
//! checks `Policy::overload` and moves on.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::policy::{Capacity, OverloadRules};

mod aimd;

use aimd::Aimd;

/// One layer's load: requests in flight, the capacity, and the adaptive
/// rule when the capacity adapts.
pub(crate) struct Overload {
    in_flight: AtomicU32,
    /// Whether a request was shed since the adaptive rule's last window:
    /// demand beyond what the capacity admits.
    pressed: std::sync::atomic::AtomicBool,
    capacity: AtomicU32,
    /// The address of the rules in force (0: none yet), read per request to
    /// tell a reloaded `[overload]` table; `rules` keeps them alive, so the
    /// address is never another table's.
    configured: AtomicUsize,
    state: Mutex<State>,
    base: Instant,
    #[cfg(feature = "metrics")]
    gauges: std::sync::OnceLock<(metrics::Gauge, metrics::Gauge)>,
}

#[derive(Default)]
struct State {
    rules: Option<Arc<OverloadRules>>,
    aimd: Option<Aimd>,
}

impl fmt::Debug for Overload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overload")
            .field("in_flight", &self.in_flight())
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Overload {
    fn default() -> Self {
        Overload::new()
    }
}

impl Overload {
    pub(crate) fn new() -> Self {
        Overload {
            in_flight: AtomicU32::new(0),
            pressed: std::sync::atomic::AtomicBool::new(false),
            capacity: AtomicU32::new(0),
            configured: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            base: Instant::now(),
            #[cfg(feature = "metrics")]
            gauges: std::sync::OnceLock::new(),
        }
    }

    /// Requests in flight through the layer now (admitted under an
    /// `[overload]` table, not yet answered).
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The capacity now (0 before any request under an `[overload]`
    /// table).
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A slot for a request that starts being shed at `shed_at`
    /// millionths of the capacity, or `None`: shed. Exact under
    /// contention: a request is admitted only while fewer than that
    /// fraction of the capacity are in flight, counted atomically.
    #[inline]
    pub(crate) fn enter(
        self: &Arc<Self>,
        rules: &Arc<OverloadRules>,
        shed_at: u32,
    ) -> Option<Slot> {
        self.configure_once(rules);
        let capacity = u64::from(self.capacity.load(Ordering::Relaxed));
        let bound = capacity * u64::from(shed_at);
        let mut n = self.in_flight.load(Ordering::Relaxed);
        loop {
            if u64::from(n) * u64::from(crate::policy::SHED_FULL) >= bound {
                if !self.pressed.load(Ordering::Relaxed) {
                    self.pressed.store(true, Ordering::Relaxed);
                }
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        #[cfg(feature = "metrics")]
        self.gauges().1.increment(1.0);
        Some(Slot {
            state: Arc::clone(self),
            started: if matches!(rules.capacity(), Capacity::Adaptive) {
                self.now().max(1)
            } else {
                0
            },
        })
    }

    /// Takes `rules` unless they are the table in force already.
    #[inline]
    fn configure_once(&self, rules: &Arc<OverloadRules>) {
        if self.configured.load(Ordering::Acquire) != Arc::as_ptr(rules) as usize {
            self.configure(rules);
        }
    }

    /// Takes a new `[overload]` table: a fixed capacity is set; an adaptive
    /// one starts at its initial value, or (reloaded) keeps its value
    /// within the new bounds.
    #[cold]
    fn configure(&self, rules: &Arc<OverloadRules>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.rules.as_ref().is_some_and(|r| Arc::ptr_eq(r, rules)) {
            return;
        }
        let (min, max, initial) = rules.bounds();
        let capacity = match rules.capacity() {
            Capacity::Fixed(n) => {
                state.aimd = None;
                n
            }
            Capacity::Adaptive => {
                let (target, step) = (rules.target_latency(), rules.report_step());
                match &mut state.aimd {
                    Some(a) => a.reconfigure(target, min, max, step),
                    None => {
                        state.aimd = Some(Aimd::new(target, min, max, initial, step, self.now()))
                    }
                }
                state.aimd.as_ref().map_or(initial, Aimd::capacity)
            }
        };
        self.capacity.store(capacity, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.gauges().0.set(f64::from(capacity));
        state.rules = Some(Arc::clone(rules));
        self.configured
            .store(Arc::as_ptr(rules) as usize, Ordering::Release);
    }

    /// Nanoseconds since this layer was built.
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// An admitted request's latency (`dropped`: a floor of it, of a
    /// request given up while the inner service worked), for the adaptive
    /// rule. A sample that
    /// finds the rule busy (another sample under way) is dropped: the
    /// request path never waits for a lock.
    fn sample(&self, started: u64, dropped: bool) {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            // A panic under the lock (in a subscriber or recorder, say)
            // leaves the state whole: every write to it is one field.
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let Some(aimd) = state.aimd.as_mut() else {
            return;
        };
        let now = self.now();
        let latency = Duration::from_nanos(now.saturating_sub(started));
        if dropped && latency <= aimd.target() {
            // Given up early: its latency is unknown, not short.
            return;
        }
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let pressed = self.pressed.load(Ordering::Relaxed);
        let Some(step) = aimd.sample(now, latency, in_flight, pressed) else {
            return;
        };
        self.pressed.store(false, Ordering::Relaxed);
        let before = self.capacity.swap(step.capacity, Ordering::Relaxed);
        // What others' code sees (the recorder, the subscriber) runs with
        // the lock released.
        drop(state);
        #[cfg(feature = "metrics")]
        if before != step.capacity {
            self.gauges().0.set(f64::from(step.capacity));
        }
        if let Some(capacity) = step.report {
            crate::telemetry::capacity_moved(before, capacity, step.mean);
        }
    }

    #[cfg(feature = "metrics")]
    fn gauges(&self) -> &(metrics::Gauge, metrics::Gauge) {
        self.gauges.get_or_init(crate::telemetry::overload_gauges)
    }
}

/// A request in flight under the capacity: given back when dropped.
/// [`finish`](Slot::finish) (the inner service answered) also feeds the
/// adaptive rule its latency; a future dropped while the inner service
/// worked feeds it how long it ran if that is past the target (a floor of
/// its latency); a refusal feeds it nothing.
pub(crate) struct Slot {
    state: Arc<Overload>,
    /// When it was admitted, then when its inner call started
    /// (nanoseconds of the state's clock; 0 under a fixed capacity, which
    /// takes no samples), with [`CALLING`] set while the inner service
    /// works on it. One word: the response future of every request, with
    /// or without an `[overload]` table, carries an `Option<Slot>`.
    started: u64,
}

/// In [`Slot::started`]: the inner service is being called and has not
/// answered (dropped now, the request was given up past its start). The
/// clock's nanoseconds never reach it (292 years).
const CALLING: u64 = 1 << 63;

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl Slot {
    /// The inner call starts (at once after a check answered at once).
    #[inline]
    pub(crate) fn calling(mut self) -> Self {
        if self.started != 0 {
            self.started |= CALLING;
        }
        self
    }

    /// The inner call starts now (after a backend check that needed a
    /// round trip): the latency the adaptive rule samples is the inner
    /// service's, from here, not the backend's too.
    #[inline]
    pub(crate) fn restart(&mut self) {
        if self.started != 0 {
            self.started = self.state.now().max(1) | CALLING;
        }
    }

    /// The inner service answered (its response head): the latency is a
    /// sample, and the slot is given back.
    #[inline]
    pub(crate) fn finish(mut self) {
        let started = self.started & !CALLING;
        if started != 0 {
            self.state.sample(started, false);
        }
        self.started = 0;
    }
}

impl Drop for Slot {
    #[inline]
    fn drop(&mut self) {
        if self.started & CALLING != 0 {
            // Dropped while the inner service worked (the caller gave up,
            // a timeout outside the layer, a panic): how long it ran is a
            // floor of its latency, a sample when already past the target.
            // Without it, callers that all give up before an overloaded
            // service answers would never let the capacity fall.
            self.state.sample(self.started & !CALLING, true);
        }
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        #[cfg(feature = "metrics")]
        self.state.gauges().1.decrement(1.0);
    }
}

/// The overload state as the usage endpoint and the admin API show it:
/// `None` when the policy has no `[overload]` table.
pub(crate) fn report(policy: &crate::policy::Policy, o: &Overload) -> Option<serde_json::Value> {
    let rules = policy.overload_arc()?;
    // A table no request has seen yet (the first, or one reloaded): taken
    // now, as the next request would, so the capacity shown is the one in
    // force and not the last table's.
    o.configure_once(rules);
    let (min, max, _) = rules.bounds();
    let capacity = o.capacity();
    let mut v = serde_json::json!({
        "capacity": capacity,
        "in_flight": o.in_flight(),
        "adaptive": rules.capacity() == Capacity::Adaptive,
    });
    if rules.capacity() == Capacity::Adaptive {
        v["target_latency_ms"] = serde_json::json!(rules.target_latency().as_secs_f64() * 1e3);
        v["min_capacity"] = serde_json::json!(min);
        v["max_capacity"] = serde_json::json!(max);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limit;
    use crate::policy::{OverloadSettings, Policy, Tier};

    fn rules(capacity: Capacity) -> Arc<OverloadRules> {
        let mut s = OverloadSettings::new(capacity).shed_at("free", 0.5);
        if capacity == Capacity::Adaptive {
            s = s
                .target_latency(Duration::from_millis(50))
                .initial_capacity(10);
        }
        let policy = Policy::builder()
            .categories(["read", "write"])
            .tier(
                Tier::new("free")
                    .limit("read", Limit::per_hour(1))
                    .limit("write", Limit::per_hour(1)),
            )
            .tier(
                Tier::new("pro")
                    .limit("read", Limit::per_hour(1))
                    .limit("write", Limit::per_hour(1)),
            )
            .overload(s)
            .build()
            .unwrap();
        Arc::clone(policy.overload_arc().unwrap())
    }

    #[test]
    fn a_panic_under_the_state_lock_does_not_stop_the_adaptive_rule() {
        // A layer built 10 s ago, its table taken.
        let o = Arc::new(Overload {
            base: Instant::now() - Duration::from_secs(10),
            ..Overload::new()
        });
        let r = rules(Capacity::Adaptive);
        drop(o.enter(&r, crate::policy::SHED_FULL));
        assert_eq!(o.capacity(), 10);
        // A tracing subscriber or metrics recorder that panics while the
        // rule reports a move poisons the state's lock.
        let poison = Arc::clone(&o);
        let _ = std::thread::spawn(move || {
            let _held = poison.state.lock().unwrap();
            panic!("a subscriber panicked");
        })
        .join();
        assert!(o.state.is_poisoned());
        // The window opened 300 ms ago (past one window of 50 ms, not yet
        // a quiet spell of ten), counted from now: however long the steps
        // above took on a loaded machine.
        let opened = o.now() - 300_000_000;
        o.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .aimd
            .as_mut()
            .unwrap()
            .open_since(opened);
        // Eight requests admitted when it opened, answered now (300 ms,
        // far over the 50 ms target): the window closes, the capacity
        // falls.
        for _ in 0..8 {
            o.in_flight.fetch_add(1, Ordering::AcqRel);
            Slot {
                state: Arc::clone(&o),
                started: opened,
            }
            .finish();
        }
        assert!(o.capacity() < 10, "{}", o.capacity());
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_slot_is_two_words_in_every_response_future() {
        // Carried (as `None`) by the future of every request, `[overload]`
        // table or not.
        assert_eq!(
            std::mem::size_of::<Option<Slot>>(),
            std::mem::size_of::<(Arc<Overload>, u64)>()
        );
    }

    #[test]
    fn a_tier_is_shed_at_its_fraction_and_its_slots_come_back() {
        let o = Arc::new(Overload::new());
        let r = rules(Capacity::Fixed(10));
        let free = r.shed_at(crate::policy::TierId(0));
        assert_eq!(free, 500_000);
        let held: Vec<Slot> = (0..5)
            .map(|_| o.enter(&r, free).expect("under half"))
            .collect();
        assert!(
            o.enter(&r, free).is_none(),
            "5 of 10 in flight: free is shed"
        );
        let more: Vec<Slot> = (0..5)
            .map(|_| {
                o.enter(&r, crate::policy::SHED_FULL)
                    .expect("under the capacity")
            })
            .collect();
        assert!(
            o.enter(&r, crate::policy::SHED_FULL).is_none(),
            "10 of 10: everything is shed"
        );
        assert_eq!(o.in_flight(), 10);
        drop(held);
        drop(more);
        assert_eq!(o.in_flight(), 0);
        assert!(o.enter(&r, free).is_some());
    }

    #[test]
    fn exact_under_contention() {
        let o = Arc::new(Overload::new());
        let r = rules(Capacity::Fixed(64));
        let admitted = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter_map(|_| o.enter(&r, crate::policy::SHED_FULL))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            tasks
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        });
        let n: usize = admitted.iter().map(Vec::len).sum();
        assert_eq!(n, 64);
        assert_eq!(o.in_flight(), 64);
        drop(admitted);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_reloaded_table_is_taken_and_an_adaptive_capacity_starts_at_its_initial_value() {
        let o = Arc::new(Overload::new());
        let fixed = rules(Capacity::Fixed(3));
        drop(o.enter(&fixed, crate::policy::SHED_FULL));
        assert_eq!(o.capacity(), 3);
        let adaptive = rules(Capacity::Adaptive);
        let slot = o.enter(&adaptive, 1000).unwrap();
        assert_eq!(o.capacity(), 10);
        slot.finish();
        assert_eq!(o.in_flight(), 0);
    }
}
