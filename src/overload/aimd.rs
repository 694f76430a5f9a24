//! The adaptive capacity's rule: AIMD on the latency of admitted requests
//! against a target, one step per window of samples.
//!
//! Additive increase, multiplicative decrease, as TCP's congestion window
//! and Netflix's concurrency-limits `AIMDLimit` (with its latency
//! threshold as the drop signal), after a slow start as TCP's: until the
//! first window over the target, each window that closes with its mean
//! latency at or under the target, and the capacity in use (its peak in
//! flight at least nine tenths of it, or requests shed since the last
//! window: demand it does not admit), doubles the capacity; after it,
//! such a window adds one. A window whose mean is
//! over the target sets the capacity to nine tenths of what was really in
//! flight (the smaller of the capacity and the window's peak), so a
//! capacity far above the real concurrency falls to it in one step. Never
//! below the floor nor above the ceiling. A window counts only requests
//! admitted after the capacity last moved, so each step is judged by the
//! latency of the capacity it set, not by the queue the one before left
//! (without this, one overload cuts the capacity window after window while
//! that queue drains, far below what the service takes). Time is passed in, so the rule
//! runs as well on a fake clock as on the real one.

use std::time::Duration;

/// Samples a window needs before it may close early (at one window
/// length).
const MIN_SAMPLES: u32 = 8;
/// A window with fewer samples closes after this many window lengths.
const SLOW_WINDOWS: u64 = 10;
/// The shortest window.
const MIN_WINDOW: Duration = Duration::from_millis(10);
/// The multiplicative decrease, in tenths.
const BACKOFF_TENTHS: u64 = 9;

/// An adaptive capacity and its current window of samples.
#[derive(Clone, Debug)]
pub(crate) struct Aimd {
    target: u64,
    window: u64,
    min: u32,
    max: u32,
    capacity: u32,
    start: u64,
    samples: u32,
    sum: u64,
    peak: u32,
    reported: u32,
    step: f64,
    /// Doubling, until the first window over the target.
    slow_start: bool,
    /// When the capacity last moved: requests admitted before are not
    /// counted.
    moved: u64,
}

/// A window's verdict: the capacity after it, and whether it moved far
/// enough from the last report to be reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) capacity: u32,
    pub(crate) mean: Duration,
    pub(crate) report: Option<u32>,
}

impl Aimd {
    /// Starting at `initial`, within `[min, max]`, aiming for `target`;
    /// `now` in nanoseconds of the caller's clock. A move of more than
    /// `step` (a fraction) of the last reported capacity is reported.
    pub(crate) fn new(
        target: Duration,
        min: u32,
        max: u32,
        initial: u32,
        step: f64,
        now: u64,
    ) -> Self {
        let capacity = initial.clamp(min, max);
        Aimd {
            target: nanos(target),
            window: nanos(target.max(MIN_WINDOW)),
            min,
            max,
            capacity,
            start: now,
            samples: 0,
            sum: 0,
            peak: 0,
            reported: capacity,
            step,
            slow_start: true,
            moved: now,
        }
    }

    /// New bounds and target (a policy reloaded): the capacity stays where
    /// it is, within the new bounds.
    pub(crate) fn reconfigure(&mut self, target: Duration, min: u32, max: u32, step: f64) {
        self.target = nanos(target);
        self.window = nanos(target.max(MIN_WINDOW));
        self.min = min;
        self.max = max;
        self.step = step;
        self.capacity = self.capacity.clamp(min, max);
    }

    /// The window open, and the capacity unmoved, since `t` (tests).
    #[cfg(test)]
    pub(crate) fn open_since(&mut self, t: u64) {
        self.start = t;
        self.moved = t;
    }

    /// The target latency.
    pub(crate) fn target(&self) -> Duration {
        Duration::from_nanos(self.target)
    }

    /// The capacity now.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// An admitted request took `latency`, and `in_flight` requests
    /// (itself included) were in flight when it ended, at `now`. When the
    /// window closes, the step it took.
    pub(crate) fn sample(
        &mut self,
        now: u64,
        latency: Duration,
        in_flight: u32,
        pressed: bool,
    ) -> Option<Step> {
        if now.saturating_sub(nanos(latency)) < self.moved {
            // Admitted under an earlier capacity.
            return None;
        }
        if self.samples == 0
            && now.saturating_sub(self.start) >= self.window.saturating_mul(SLOW_WINDOWS)
        {
            // The window closed empty (a quiet spell): nothing to judge,
            // and this sample opens the next one. Else one sample after a
            // pause would close a window alone, and one slow request cut
            // the capacity to its floor.
            self.start = now;
        }
        self.samples += 1;
        self.sum = self.sum.saturating_add(nanos(latency));
        self.peak = self.peak.max(in_flight);
        let elapsed = now.saturating_sub(self.start);
        let full = self.samples >= MIN_SAMPLES && elapsed >= self.window;
        let slow = elapsed >= self.window.saturating_mul(SLOW_WINDOWS);
        if !(full || slow) {
            return None;
        }
        let mean = self.sum / u64::from(self.samples);
        let used = self.capacity.min(self.peak.max(1));
        let capacity = if mean > self.target {
            self.slow_start = false;
            let cut = u64::from(used) * BACKOFF_TENTHS / 10;
            u32::try_from(cut).unwrap_or(u32::MAX).max(self.min)
        } else if pressed || u64::from(self.peak) * 10 >= u64::from(self.capacity) * 9 {
            let more = if self.slow_start { self.capacity } else { 1 };
            self.capacity.saturating_add(more).min(self.max)
        } else {
            self.capacity
        };
        if capacity != self.capacity {
            self.moved = now;
        }
        self.capacity = capacity;
        self.start = now;
        self.samples = 0;
        self.sum = 0;
        self.peak = 0;
        let moved = f64::from(capacity.abs_diff(self.reported));
        let report = (moved > self.step * f64::from(self.reported)).then(|| {
            self.reported = capacity;
            capacity
        });
        Some(Step {
            capacity,
            mean: Duration::from_nanos(mean),
            report,
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Windows of `n` samples each, `every` apart, at `latency`, with
    /// `in_flight` in flight; the capacity after each window.
    fn run(
        a: &mut Aimd,
        now: &mut u64,
        windows: usize,
        latency: u64,
        in_flight: impl Fn(u32) -> u32,
    ) -> Vec<u32> {
        let mut after = Vec::new();
        while after.len() < windows {
            *now += 10 * MS;
            let flight = in_flight(a.capacity());
            if let Some(step) = a.sample(*now, Duration::from_millis(latency), flight, false) {
                after.push(step.capacity);
            }
        }
        after
    }

    #[test]
    fn it_doubles_until_latency_first_passes_the_target_then_rises_one_a_window() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 4, 1_000, 4, 0.1, now);
        let after = run(&mut a, &mut now, 4, 20, |cap| cap);
        assert_eq!(after, [8, 16, 32, 64]);
        // Over the target once: 9/10 of 64, then one a window.
        let after = run(&mut a, &mut now, 1, 80, |cap| cap);
        assert_eq!(after, [57]);
        let after = run(&mut a, &mut now, 5, 20, |cap| cap);
        assert_eq!(after, [58, 59, 60, 61, 62]);
    }

    #[test]
    fn an_unused_capacity_does_not_rise() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 4, 100, 40, 0.1, now);
        // 10 in flight of 40: under half, so nothing shows the capacity
        // would hold more.
        let after = run(&mut a, &mut now, 3, 20, |_| 10);
        assert_eq!(after, [40, 40, 40]);
    }

    #[test]
    fn it_falls_to_nine_tenths_of_what_was_in_flight_when_latency_passes_the_target() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 4, 1_000, 1_000, 0.1, now);
        // Started at its ceiling, 84 in flight, 80 ms: straight to 75.
        let after = run(&mut a, &mut now, 1, 80, |_| 84);
        assert_eq!(after, [75]);
        let after = run(&mut a, &mut now, 3, 80, |cap| cap);
        assert_eq!(after, [67, 60, 54]);
    }

    #[test]
    fn a_capacity_whose_requests_are_shed_rises_while_latency_is_under_the_target() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 4, 100, 20, 0.1, now);
        a.slow_start = false;
        // Half the capacity in flight (a tier shed at 0.5 fills it), its
        // requests shed beyond: demand the capacity does not admit.
        let mut after = Vec::new();
        while after.len() < 3 {
            now += 10 * MS;
            let half = a.capacity() / 2;
            if let Some(step) = a.sample(now, Duration::from_millis(20), half, true) {
                after.push(step.capacity);
            }
        }
        assert_eq!(after, [21, 22, 23]);
    }

    #[test]
    fn it_never_leaves_its_bounds() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 4, 12, 8, 0.1, now);
        let down = run(&mut a, &mut now, 40, 500, |cap| cap);
        assert!(down.iter().all(|&c| (4..=12).contains(&c)), "{down:?}");
        assert_eq!(*down.last().unwrap(), 4);
        let up = run(&mut a, &mut now, 40, 1, |cap| cap);
        assert!(up.iter().all(|&c| (4..=12).contains(&c)), "{up:?}");
        assert_eq!(*up.last().unwrap(), 12);
    }

    #[test]
    fn a_window_closes_on_time_and_samples_not_on_one_slow_sample() {
        let mut a = Aimd::new(Duration::from_millis(50), 4, 100, 20, 0.1, 0);
        // Seven samples past the window: not enough to close it.
        for i in 1..=7 {
            assert_eq!(
                a.sample(60 * MS + i, Duration::from_millis(500), 20, false),
                None
            );
        }
        // The eighth closes it, over the target: down.
        let step = a
            .sample(61 * MS, Duration::from_millis(500), 20, false)
            .unwrap();
        assert_eq!(step.capacity, 18);
        assert_eq!(step.mean, Duration::from_millis(500));
        // A lone sample closes a window only after ten window lengths.
        assert_eq!(
            a.sample(61 * MS + 499 * MS, Duration::from_millis(1), 1, false),
            None
        );
        assert!(
            a.sample(61 * MS + 500 * MS, Duration::from_millis(1), 1, false)
                .is_some()
        );
    }

    #[test]
    fn one_sample_after_a_quiet_spell_does_not_close_a_window_alone() {
        let mut a = Aimd::new(Duration::from_millis(50), 4, 100, 40, 0.1, 0);
        // An hour without a request, then one far over the target.
        let hour = 3_600_000 * MS;
        assert_eq!(a.sample(hour, Duration::from_millis(500), 1, false), None);
        assert_eq!(a.capacity(), 40);
        // Its window closes as any other: on enough samples, or late.
        assert!(
            a.sample(hour + 500 * MS, Duration::from_millis(500), 1, false)
                .is_some()
        );
        assert_eq!(a.capacity(), 4);
    }

    #[test]
    fn moves_past_the_step_are_reported_once() {
        let mut now = 0;
        let mut a = Aimd::new(Duration::from_millis(50), 1, 1_000, 100, 0.1, now);
        // Past the slow start: one window over the target (100 → 90).
        for _ in 0..MIN_SAMPLES {
            now += 10 * MS;
            a.sample(now, Duration::from_millis(80), 100, false);
        }
        assert_eq!(a.capacity(), 90);
        a.reported = 100;
        let mut reports = Vec::new();
        for _ in 0..30 {
            now += 100 * MS;
            for _ in 0..MIN_SAMPLES {
                if let Some(s) = a.sample(now, Duration::from_millis(10), a.capacity(), false)
                    && let Some(r) = s.report
                {
                    reports.push(r);
                }
            }
        }
        // 90 → 120 one at a time: reported at 111 (past 10% of 100), then
        // at 123 is not reached; 120 is not past 10% of 111.
        assert_eq!(a.capacity(), 120);
        assert_eq!(reports, [111]);
    }

    #[test]
    fn a_reload_keeps_the_capacity_within_the_new_bounds() {
        let mut a = Aimd::new(Duration::from_millis(50), 4, 100, 60, 0.1, 0);
        a.reconfigure(Duration::from_millis(20), 4, 30, 0.1);
        assert_eq!(a.capacity(), 30);
        a.reconfigure(Duration::from_millis(20), 40, 90, 0.1);
        assert_eq!(a.capacity(), 40);
    }
}
