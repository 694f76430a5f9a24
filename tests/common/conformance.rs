//! The GCRA conformance table. Every backend runs it unchanged: give it a
//! backend and a way to move that backend's clock forward.

use std::time::Duration;

use tierlimit::{Backend, BackendError, Decision, KeyId, Limit, Subject};

/// One step: move the clock, check `cost` for `key`, expect an outcome.
pub struct Step {
    pub advance_ms: u64,
    pub key: &'static str,
    pub cost: u32,
    pub expect: Expect,
}

pub enum Expect {
    /// Allowed, leaving `remaining`, full again after `reset_ms`.
    Allow { remaining: u32, reset_ms: u64 },
    /// Refused, `remaining` now, full after `reset_ms`, conforming after `retry_ms`.
    Deny {
        remaining: u32,
        reset_ms: u64,
        retry_ms: u64,
    },
    /// The cost can never fit.
    CostTooHigh,
}

const fn allow(
    advance_ms: u64,
    key: &'static str,
    cost: u32,
    remaining: u32,
    reset_ms: u64,
) -> Step {
    Step {
        advance_ms,
        key,
        cost,
        expect: Expect::Allow {
            remaining,
            reset_ms,
        },
    }
}

const fn deny(
    advance_ms: u64,
    key: &'static str,
    cost: u32,
    remaining: u32,
    reset_ms: u64,
    retry_ms: u64,
) -> Step {
    Step {
        advance_ms,
        key,
        cost,
        expect: Expect::Deny {
            remaining,
            reset_ms,
            retry_ms,
        },
    }
}

/// The limit the table is written for: 10 per 10 s (one every second).
pub fn limit() -> Limit {
    Limit::new(10.try_into().unwrap(), Duration::from_secs(10)).unwrap()
}

/// Times are cumulative from the first step; T = 1 s, burst 10.
pub fn table() -> Vec<Step> {
    let mut t = vec![allow(0, "a", 1, 9, 1_000)];
    // The rest of the burst at the same instant.
    for left in (0..9).rev() {
        t.push(allow(0, "a", 1, left, u64::from(10 - left) * 1_000));
    }
    t.extend([
        // Empty: the 11th is refused until one interval has passed.
        deny(0, "a", 1, 0, 10_000, 1_000),
        deny(500, "a", 1, 0, 9_500, 500),
        // A refusal wrote nothing: exactly at T it conforms.
        allow(500, "a", 1, 0, 10_000),
        // Another key is independent.
        allow(0, "b", 1, 9, 1_000),
        // Three intervals later, a cost of 3 fits exactly.
        allow(3_000, "a", 3, 0, 10_000),
        deny(0, "a", 1, 0, 10_000, 1_000),
        // Half an interval later: still nothing whole.
        deny(500, "a", 2, 0, 9_500, 1_500),
        // Full again after the window: the whole burst at once.
        allow(9_500, "a", 10, 0, 10_000),
        // Well after: full.
        allow(20_000, "a", 1, 9, 1_000),
        allow(0, "a", 5, 4, 6_000),
        // 4 left, 5 asked: refused, capacity reported, nothing taken.
        deny(0, "a", 5, 4, 6_000, 1_000),
        allow(0, "a", 4, 0, 10_000),
        // 1.5 intervals later one whole request is back (rounded down).
        // (An allowed request's reset is reported to the interval, rounded
        // up: 10 s here where the exact value is 9.5 s; a refusal's is exact.)
        allow(1_500, "a", 1, 0, 10_000),
        deny(0, "a", 1, 0, 9_500, 500),
        // Costs above the limit can never succeed.
        Step {
            advance_ms: 0,
            key: "a",
            cost: 11,
            expect: Expect::CostTooHigh,
        },
    ]);
    t
}

fn subject(key: &str, cost: u32) -> Subject {
    let cell = Subject::new(KeyId::of(key), 7);
    Subject { cost, ..cell }
}

/// Runs the table; `advance` moves the backend's clock.
pub async fn run<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    let limit = limit();
    for (i, step) in table().into_iter().enumerate() {
        if step.advance_ms > 0 {
            advance(Duration::from_millis(step.advance_ms));
        }
        let got = backend.check(&subject(step.key, step.cost), &limit).await;
        let ctx = format!("step {i} (key {}, cost {})", step.key, step.cost);
        match (step.expect, got) {
            (
                Expect::Allow {
                    remaining,
                    reset_ms,
                },
                Ok(d),
            ) => {
                let want = Decision {
                    index: 0,
                    allowed: true,
                    limit: 10,
                    remaining,
                    reset_after: Duration::from_millis(reset_ms),
                    retry_after: None,
                    window: Duration::from_secs(10),
                };
                assert_eq!(d, want, "{ctx}");
            }
            (
                Expect::Deny {
                    remaining,
                    reset_ms,
                    retry_ms,
                },
                Ok(d),
            ) => {
                let want = Decision {
                    index: 0,
                    allowed: false,
                    limit: 10,
                    remaining,
                    reset_after: Duration::from_millis(reset_ms),
                    retry_after: Some(Duration::from_millis(retry_ms)),
                    window: Duration::from_secs(10),
                };
                assert_eq!(d, want, "{ctx}");
            }
            (Expect::CostTooHigh, Err(BackendError::CostExceedsLimit { cost, max })) => {
                assert_eq!((cost, max), (step.cost, 10), "{ctx}");
            }
            (_, got) => panic!("{ctx}: unexpected {got:?}"),
        }
    }
}
