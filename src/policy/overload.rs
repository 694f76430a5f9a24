//! The policy's `[overload]` table: a capacity for the service behind the
//! layer and the fraction of it at which each tier starts being shed
//! ([`OverloadSettings`]), validated when the policy is built and compiled
//! into [`OverloadRules`].
//!
//! The policy only holds this data; what counts requests in flight, adapts
//! the capacity and sheds is `crate::overload`.

use std::time::Duration;

use super::PolicyError;

/// How many requests in flight the service behind the layer can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// A fixed number of requests in flight (at least 1).
    Fixed(u32),
    /// Adapted to the latency of admitted requests against
    /// [`OverloadSettings::target_latency`]: additive increase while the
    /// latency stays under the target and the capacity is in use,
    /// multiplicative decrease when it passes the target.
    Adaptive,
}

/// The policy's `[overload]` table: tier-aware load shedding when the
/// service itself is past its capacity.
///
/// ```
/// use std::time::Duration;
/// use tierlimit::{Limit, Policy, Tier};
/// use tierlimit::policy::{Capacity, OverloadSettings};
///
/// let policy = Policy::builder()
///     .categories(["read", "write"])
///     .tier(Tier::new("free").limit("read", Limit::per_hour(100)).limit("write", Limit::per_hour(20)))
///     .tier(Tier::new("pro").limit("read", Limit::per_hour(1_000)).limit("write", Limit::per_hour(200)))
///     .overload(
///         OverloadSettings::new(Capacity::Adaptive)
///             .target_latency(Duration::from_millis(50))
///             .shed_at("free", 0.5)
///             .shed_at("pro", 0.8),
///     )
///     .build()
///     .unwrap();
/// let rules = policy.overload().unwrap();
/// assert_eq!(rules.capacity(), Capacity::Adaptive);
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct OverloadSettings {
    pub(crate) capacity: Capacity,
    pub(crate) target_latency: Option<Duration>,
    pub(crate) min_capacity: Option<u32>,
    pub(crate) max_capacity: Option<u32>,
    pub(crate) initial_capacity: Option<u32>,
    pub(crate) shed_at: Vec<(String, f64)>,
    pub(crate) shed_exempt_routes: bool,
    pub(crate) shed_unlimited: bool,
    pub(crate) retry_after: Duration,
    pub(crate) report_step: f64,
}

/// The default floor of an adaptive capacity.
pub const DEFAULT_MIN_CAPACITY: u32 = 4;
/// The default ceiling of an adaptive capacity.
pub const DEFAULT_MAX_CAPACITY: u32 = 1_000;

impl OverloadSettings {
    /// A capacity, every tier shed only at the full capacity, exempt routes
    /// and unlimited categories shed too, `Retry-After: 1`.
    pub fn new(capacity: Capacity) -> Self {
        OverloadSettings {
            capacity,
            target_latency: None,
            min_capacity: None,
            max_capacity: None,
            initial_capacity: None,
            shed_at: Vec::new(),
            shed_exempt_routes: true,
            shed_unlimited: true,
            retry_after: Duration::from_secs(1),
            report_step: 0.1,
        }
    }

    /// What an adaptive capacity aims for: the latency of admitted
    /// requests, from the inner call to the response head (required with
    /// [`Capacity::Adaptive`]).
    pub fn target_latency(mut self, target: Duration) -> Self {
        self.target_latency = Some(target);
        self
    }

    /// The floor of an adaptive capacity (default
    /// [`DEFAULT_MIN_CAPACITY`]).
    pub fn min_capacity(mut self, n: u32) -> Self {
        self.min_capacity = Some(n);
        self
    }

    /// The ceiling of an adaptive capacity (default
    /// [`DEFAULT_MAX_CAPACITY`]).
    pub fn max_capacity(mut self, n: u32) -> Self {
        self.max_capacity = Some(n);
        self
    }

    /// Where an adaptive capacity starts (default: its floor). It doubles
    /// from there each window while latency stays under the target (a slow
    /// start, as TCP's), until latency first passes it.
    pub fn initial_capacity(mut self, n: u32) -> Self {
        self.initial_capacity = Some(n);
        self
    }

    /// The fraction of the capacity, in (0, 1], at which `tier`'s requests
    /// start being shed (default 1: only at the full capacity). Requests
    /// marked critical (`X-Request-Priority: critical`) are shed only at
    /// the full capacity, whatever their tier.
    pub fn shed_at(mut self, tier: impl Into<String>, fraction: f64) -> Self {
        let tier = tier.into();
        self.shed_at.retain(|(t, _)| *t != tier);
        self.shed_at.push((tier, fraction));
        self
    }

    /// Whether exempt routes (which need no key) are shed too, at the full
    /// capacity (default `true`).
    pub fn shed_exempt_routes(mut self, yes: bool) -> Self {
        self.shed_exempt_routes = yes;
        self
    }

    /// Whether requests of unlimited categories are shed too, at their
    /// tier's fraction (default `true`).
    pub fn shed_unlimited(mut self, yes: bool) -> Self {
        self.shed_unlimited = yes;
        self
    }

    /// The delay a shed request is told to wait before retrying
    /// (`Retry-After`, `grpc-retry-pushback-ms`; default 1 s, at most
    /// an hour).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = delay;
        self
    }

    /// How far (a fraction of the last reported value) an adaptive
    /// capacity moves before a tracing event reports it (default 0.1).
    pub fn report_step(mut self, step: f64) -> Self {
        self.report_step = step;
        self
    }
}

/// The `[overload]` table, compiled: what admission reads per request.
#[derive(Clone, Debug)]
pub struct OverloadRules {
    capacity: Capacity,
    /// By tier: the fraction at which it starts being shed, in millionths
    /// (exact to one request at the largest capacity, 1,000,000).
    shed_at: Box<[u32]>,
    target: Duration,
    min: u32,
    max: u32,
    initial: u32,
    shed_exempt_routes: bool,
    shed_unlimited: bool,
    retry_after: Duration,
    report_step: f64,
}

/// The full capacity, in millionths: fine enough that a fraction of the
/// largest capacity accepted is kept to the request.
pub(crate) const FULL: u32 = 1_000_000;

impl OverloadRules {
    /// The capacity: fixed or adaptive.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// The fraction of the capacity at which `tier` starts being shed, in
    /// millionths (1,000,000: at the full capacity).
    #[inline]
    pub fn shed_at(&self, tier: super::TierId) -> u32 {
        self.shed_at.get(tier.index()).copied().unwrap_or(FULL)
    }

    /// The fraction of the capacity at which `tier` starts being shed, as
    /// written (1.0: at the full capacity).
    pub fn shed_fraction(&self, tier: super::TierId) -> f64 {
        f64::from(self.shed_at(tier)) / f64::from(FULL)
    }

    /// The latency an adaptive capacity aims for.
    pub fn target_latency(&self) -> Duration {
        self.target
    }

    /// The floor and ceiling of the capacity (both the number for a fixed
    /// one), and where it starts.
    pub fn bounds(&self) -> (u32, u32, u32) {
        (self.min, self.max, self.initial)
    }

    /// Whether exempt routes are shed (at the full capacity).
    pub fn sheds_exempt_routes(&self) -> bool {
        self.shed_exempt_routes
    }

    /// Whether unlimited categories are shed (at their tier's fraction).
    pub fn sheds_unlimited(&self) -> bool {
        self.shed_unlimited
    }

    /// What a shed request is told to wait.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The relative move of an adaptive capacity that a tracing event
    /// reports.
    pub fn report_step(&self) -> f64 {
        self.report_step
    }
}

/// The longest `retry_after` accepted.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The largest capacity accepted (requests in flight).
const MAX_CAPACITY: u32 = 1_000_000;

/// Validates `settings` against the policy's tiers, naming the entry at
/// fault (`line`: where the table starts in a file).
pub(super) fn compile(
    settings: &OverloadSettings,
    line: Option<usize>,
    tiers: &[Box<str>],
) -> Result<OverloadRules, PolicyError> {
    let err = |entry: &str, m: String| PolicyError::new(format!("overload.{entry}"), line, m);
    let count = |entry: &str, n: u32| {
        if n == 0 || n > MAX_CAPACITY {
            Err(err(
                entry,
                format!("a capacity is 1 to {MAX_CAPACITY} requests in flight, not {n}"),
            ))
        } else {
            Ok(n)
        }
    };
    let (target, min, max, initial) = match settings.capacity {
        Capacity::Fixed(n) => {
            let n = count("capacity", n)?;
            for (entry, set) in [
                ("target_latency", settings.target_latency.is_some()),
                ("min_capacity", settings.min_capacity.is_some()),
                ("max_capacity", settings.max_capacity.is_some()),
                ("initial_capacity", settings.initial_capacity.is_some()),
            ] {
                if set {
                    return Err(err(
                        entry,
                        format!(
                            "`{entry}` is for an adaptive capacity; this one is fixed at {n} (write `capacity = \"adaptive\"`, or remove `{entry}`)"
                        ),
                    ));
                }
            }
            (Duration::ZERO, n, n, n)
        }
        Capacity::Adaptive => {
            let Some(target) = settings.target_latency else {
                return Err(err(
                    "target_latency",
                    "an adaptive capacity needs a target latency (for example `target_latency = \"50ms\"`)".into(),
                ));
            };
            if target < Duration::from_millis(1) || target > Duration::from_secs(60) {
                return Err(err(
                    "target_latency",
                    format!("a target latency is 1 ms to 60 s, not {target:?}"),
                ));
            }
            let min = count(
                "min_capacity",
                settings.min_capacity.unwrap_or(DEFAULT_MIN_CAPACITY),
            )?;
            let max = count(
                "max_capacity",
                settings
                    .max_capacity
                    .unwrap_or(DEFAULT_MAX_CAPACITY.max(min)),
            )?;
            if min > max {
                return Err(err(
                    "min_capacity",
                    format!("the floor ({min}) is above the ceiling (max_capacity = {max})"),
                ));
            }
            let initial = count("initial_capacity", settings.initial_capacity.unwrap_or(min))?;
            if !(min..=max).contains(&initial) {
                return Err(err(
                    "initial_capacity",
                    format!(
                        "the capacity starts between its floor ({min}) and ceiling ({max}), not at {initial}"
                    ),
                ));
            }
            (target, min, max, initial)
        }
    };
    let mut shed_at = vec![FULL; tiers.len()];
    for (tier, fraction) in &settings.shed_at {
        let entry = format!("shed_at.{tier}");
        let Some(t) = tiers.iter().position(|t| **t == **tier) else {
            let declared: Vec<&str> = tiers.iter().map(|t| &**t).collect();
            return Err(err(
                &entry,
                format!("unknown tier `{tier}` (declared: {})", declared.join(", ")),
            ));
        };
        if !(fraction.is_finite() && *fraction > 0.0 && *fraction <= 1.0) {
            return Err(err(
                &entry,
                format!(
                    "a tier starts being shed at a fraction of the capacity in (0, 1], not {fraction}"
                ),
            ));
        }
        // In millionths, never 0 (a tier is admitted while nothing is in
        // flight).
        shed_at[t] = ((fraction * f64::from(FULL)).round() as u32).clamp(1, FULL);
    }
    if settings.retry_after < Duration::from_millis(1) || settings.retry_after > MAX_RETRY_AFTER {
        return Err(err(
            "retry_after",
            format!(
                "a shed request's retry delay is 1 ms to 1 hour, not {:?}",
                settings.retry_after
            ),
        ));
    }
    let step = settings.report_step;
    if !(step.is_finite() && step > 0.0 && step <= 10.0) {
        return Err(err(
            "report_step",
            format!(
                "a report step is a fraction of the capacity above 0 (0.1: a move of 10%), not {step}"
            ),
        ));
    }
    Ok(OverloadRules {
        capacity: settings.capacity,
        shed_at: shed_at.into_boxed_slice(),
        target,
        min,
        max,
        initial,
        shed_exempt_routes: settings.shed_exempt_routes,
        shed_unlimited: settings.shed_unlimited,
        retry_after: settings.retry_after,
        report_step: step,
    })
}
