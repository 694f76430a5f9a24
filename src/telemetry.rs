//! Metrics (feature `metrics`, through the `metrics` facade) and tracing
//! events. Labels never contain an API key: only tier, category, reason and
//! backend names.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `tierlimit_requests_total` | counter | `tier`, `category`, `outcome` = `allowed` / `refused` / `shadow_refused` |
//! | `tierlimit_rejections_total` | counter | `reason` (`missing-api-key`, `malformed-api-key`, `unknown-api-key`, `invalid-cost`, `invalid-priority`, `cost-exceeds-limit`) |
//! | `tierlimit_unavailable_total` | counter | — : requests answered 503 (gRPC `UNAVAILABLE`), the backend could not decide |
//! | `tierlimit_backend_errors_total` | counter | `backend` |
//! | `tierlimit_fallback_total` | counter | `backend`, `policy` |
//! | `tierlimit_backend_state` | gauge (1 connected, 0 degraded) | `backend` |
//! | `tierlimit_check_duration_seconds` | histogram | — |
//! | `tierlimit_tracked_keys` | gauge | — |
//! | `tierlimit_tokens_charged_total` | counter | `tier`, `category`: tokens used beyond the estimates |
//! | `tierlimit_tokens_refunded_total` | counter | `tier`, `category`: tokens of estimates given back |
//! | `tierlimit_refunds_total` | counter | `tier`, `category`: requests refunded by their response (`refund_on`) |
//! | `tierlimit_settlement_fallbacks_total` | counter | `backend`: settlements made by the fallback while Redis was unreachable |
//! | `tierlimit_refusals_total` | counter | `tier`, `category`, `reason` = `rate` / `tokens` / `concurrency`: refusals by the limit that refused |
//! | `tierlimit_leases_held` | gauge | `tier`, `category`: concurrency leases held by requests in flight on this instance |
//! | `tierlimit_admin_changes_total` | counter | `action`, `who`: changes made through the admin service |
//! | `tierlimit_usage_events_dropped_total` | counter | — : usage events dropped because the feed's queue was full |
//! | `tierlimit_usage_events_written_total` | counter | — : usage events the feed's sink wrote |
//! | `tierlimit_usage_events_failed_total` | counter | — : usage events the feed's sink failed to write |
//!
//! Install the recorder (an exporter) before the first request: handles
//! are made on first use and cached, and every metric is described (help
//! text and unit, [`METRICS`]) to the recorder the first time any is made;
//! [`describe`] does it at once.

/// What kind of metric it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (rendered as a summary or a histogram by the exporter).
    Histogram,
}

/// One metric the crate exports: its name, kind, unit and help text.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct MetricInfo {
    /// Its name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its unit, if it has one (`"seconds"`).
    pub unit: Option<&'static str>,
    /// Its help text.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    unit: Option<&'static str>,
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        unit,
        help,
    }
}

/// Every metric the crate exports (the table above), the source of the
/// help texts and of what dashboards may name.
pub const METRICS: &[MetricInfo] = &[
    metric(
        "tierlimit_requests_total",
        MetricKind::Counter,
        None,
        "Limited requests by tier, category and outcome (allowed, refused, shadow_refused).",
    ),
    metric(
        "tierlimit_rejections_total",
        MetricKind::Counter,
        None,
        "Requests rejected for a client mistake (400 or 401: no key, a malformed or unknown one, an invalid cost or priority, a cost no limit could admit), by reason.",
    ),
    metric(
        "tierlimit_unavailable_total",
        MetricKind::Counter,
        None,
        "Requests answered 503 (gRPC UNAVAILABLE): the backend could not decide (fail-closed, or a backend's error).",
    ),
    metric(
        "tierlimit_backend_errors_total",
        MetricKind::Counter,
        None,
        "Backend checks that failed or timed out, by backend.",
    ),
    metric(
        "tierlimit_fallback_total",
        MetricKind::Counter,
        None,
        "Checks answered by the failure policy while the backend was unreachable, by backend and policy.",
    ),
    metric(
        "tierlimit_backend_state",
        MetricKind::Gauge,
        None,
        "Whether checks go to the backend (1) or the failure policy applies (0, degraded), by backend.",
    ),
    metric(
        "tierlimit_check_duration_seconds",
        MetricKind::Histogram,
        Some("seconds"),
        "Time a limit check took, from the request's identification to the backend's answer.",
    ),
    metric(
        "tierlimit_tracked_keys",
        MetricKind::Gauge,
        None,
        "Buckets tracked in this process's memory backend.",
    ),
    metric(
        "tierlimit_tokens_charged_total",
        MetricKind::Counter,
        None,
        "Tokens used beyond the requests' estimates (debts), by tier and category.",
    ),
    metric(
        "tierlimit_tokens_refunded_total",
        MetricKind::Counter,
        None,
        "Tokens of the requests' estimates given back (unused), by tier and category.",
    ),
    metric(
        "tierlimit_refunds_total",
        MetricKind::Counter,
        None,
        "Requests refunded by their response's status (refund_on), by tier and category.",
    ),
    metric(
        "tierlimit_settlement_fallbacks_total",
        MetricKind::Counter,
        None,
        "Settlements made by the fallback while the backend was unreachable, by backend.",
    ),
    metric(
        "tierlimit_refusals_total",
        MetricKind::Counter,
        None,
        "Refusals by tier, category and the kind of limit that refused (rate, tokens, concurrency).",
    ),
    metric(
        "tierlimit_leases_held",
        MetricKind::Gauge,
        None,
        "Concurrency leases held by requests in flight on this instance, by tier and category.",
    ),
    metric(
        "tierlimit_shed_total",
        MetricKind::Counter,
        None,
        "Requests shed (503, gRPC UNAVAILABLE) because the service was past its capacity, by tier and category (exempt routes: tier \"none\", category \"exempt\").",
    ),
    metric(
        "tierlimit_overload_capacity",
        MetricKind::Gauge,
        None,
        "The capacity of the service behind the layer, in requests in flight, on this instance (fixed, or adapted to latency).",
    ),
    metric(
        "tierlimit_overload_in_flight",
        MetricKind::Gauge,
        None,
        "Requests in flight through the layer on this instance, counted against the overload capacity.",
    ),
    metric(
        "tierlimit_admin_changes_total",
        MetricKind::Counter,
        None,
        "Changes made through the admin service, by action and by the admin token's name.",
    ),
    metric(
        "tierlimit_usage_events_dropped_total",
        MetricKind::Counter,
        None,
        "Usage events dropped because the usage feed's queue was full (its sink fell behind).",
    ),
    metric(
        "tierlimit_usage_events_written_total",
        MetricKind::Counter,
        None,
        "Usage events the usage feed's sink wrote.",
    ),
    metric(
        "tierlimit_usage_events_failed_total",
        MetricKind::Counter,
        None,
        "Usage events the usage feed's sink failed to write.",
    ),
];

/// Describes every metric ([`METRICS`]) to the installed recorder: help
/// text and unit. The crate does this by itself the first time it makes a
/// metric; call it at start-up to have the descriptions before any traffic.
/// Without the `metrics` feature it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    for m in METRICS {
        let unit = match m.unit {
            Some("seconds") => Some(metrics::Unit::Seconds),
            _ => None,
        };
        match (m.kind, unit) {
            (MetricKind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, m.help),
            (MetricKind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (MetricKind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (MetricKind::Histogram, Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// [`describe`], once per process (before the first metric is made).
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn describe_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(describe);
}

/// A cell's (tier × category) request counters, made on first use.
#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct CellMetrics {
    pub(crate) allowed: metrics::Counter,
    pub(crate) refused: metrics::Counter,
    pub(crate) shadow: metrics::Counter,
    pub(crate) shed: metrics::Counter,
    refused_rate: metrics::Counter,
    refused_tokens: metrics::Counter,
    refused_concurrency: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl CellMetrics {
    pub(crate) fn new(tier: &str, category: &str) -> Self {
        describe_once();
        let c = |outcome: &'static str| {
            metrics::counter!(
                "tierlimit_requests_total",
                "tier" => tier.to_owned(),
                "category" => category.to_owned(),
                "outcome" => outcome
            )
        };
        let r = |reason: &'static str| {
            metrics::counter!(
                "tierlimit_refusals_total",
                "tier" => tier.to_owned(),
                "category" => category.to_owned(),
                "reason" => reason
            )
        };
        CellMetrics {
            allowed: c("allowed"),
            refused: c("refused"),
            shadow: c("shadow_refused"),
            shed: metrics::counter!(
                "tierlimit_shed_total",
                "tier" => tier.to_owned(),
                "category" => category.to_owned()
            ),
            refused_rate: r("rate"),
            refused_tokens: r("tokens"),
            refused_concurrency: r("concurrency"),
        }
    }

    /// The refusal counter of the limit that refused `d`.
    pub(crate) fn refusal(&self, d: &crate::decision::Decision) -> &metrics::Counter {
        if d.is_concurrency_refusal() {
            &self.refused_concurrency
        } else if d.is_tokens() {
            &self.refused_tokens
        } else {
            &self.refused_rate
        }
    }
}

/// A metered cell's token and refund counters.
#[cfg(feature = "metrics")]
#[derive(Clone, Debug)]
pub(crate) struct TokenCounters {
    /// Tokens charged beyond the estimates (debts).
    pub(crate) charged: metrics::Counter,
    /// Tokens of estimates given back (unused).
    pub(crate) refunded: metrics::Counter,
    /// Requests refunded by their response (`refund_on`).
    pub(crate) refunds: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl TokenCounters {
    pub(crate) fn new(tier: &str, category: &str) -> Self {
        describe_once();
        let c = |name: &'static str| metrics::counter!(name, "tier" => tier.to_owned(), "category" => category.to_owned());
        TokenCounters {
            charged: c("tierlimit_tokens_charged_total"),
            refunded: c("tierlimit_tokens_refunded_total"),
            refunds: c("tierlimit_refunds_total"),
        }
    }
}

/// A request rejected for a client mistake (400 or 401).
#[inline]
pub(crate) fn rejection(_reason: &'static str) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_rejections_total", "reason" => _reason).increment(1);
    }
}

/// A request answered 503: the backend could not decide.
#[inline]
pub(crate) fn unavailable() {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_unavailable_total").increment(1);
    }
}

/// A backend failure (an error or a timeout).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn backend_error(_backend: &'static str) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_backend_errors_total", "backend" => _backend).increment(1);
    }
}

/// A request answered by the failure policy instead of the backend.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn fallback(_backend: &'static str, _policy: &'static str) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_fallback_total", "backend" => _backend, "policy" => _policy)
            .increment(1);
    }
}

/// A settlement the backend could not make (Redis unreachable), made by
/// the fallback instead.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn settlement_fallback(_backend: &'static str) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_settlement_fallbacks_total", "backend" => _backend)
            .increment(1);
    }
}

/// The backend's state: connected or degraded.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn backend_state(_backend: &'static str, _connected: bool) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::gauge!("tierlimit_backend_state", "backend" => _backend).set(if _connected {
            1.0
        } else {
            0.0
        });
    }
}

/// Keys tracked in memory, up or down.
#[inline]
pub(crate) fn tracked_keys(_delta: f64) {
    #[cfg(feature = "metrics")]
    {
        static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
        GAUGE
            .get_or_init(|| {
                describe_once();
                metrics::gauge!("tierlimit_tracked_keys")
            })
            .increment(_delta);
    }
}

/// How long a check took.
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn check_duration(elapsed: std::time::Duration) {
    static HIST: std::sync::OnceLock<metrics::Histogram> = std::sync::OnceLock::new();
    HIST.get_or_init(|| {
        describe_once();
        metrics::histogram!("tierlimit_check_duration_seconds")
    })
    .record(elapsed.as_secs_f64());
}

/// A usage event dropped: the feed's queue was full.
#[inline]
pub(crate) fn usage_dropped() {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_usage_events_dropped_total").increment(1);
    }
}

/// `_n` usage events written by the feed's sink.
pub(crate) fn usage_written(_n: u64) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_usage_events_written_total").increment(_n);
    }
}

/// `_n` usage events the feed's sink failed to write.
pub(crate) fn usage_failed(_n: u64) {
    #[cfg(feature = "metrics")]
    {
        describe_once();
        metrics::counter!("tierlimit_usage_events_failed_total").increment(_n);
    }
}

/// The overload capacity's and the requests in flight's gauges.
#[cfg(feature = "metrics")]
pub(crate) fn overload_gauges() -> (metrics::Gauge, metrics::Gauge) {
    describe_once();
    (
        metrics::gauge!("tierlimit_overload_capacity"),
        metrics::gauge!("tierlimit_overload_in_flight"),
    )
}

/// A request of an exempt route shed (it has no tier or category).
#[inline]
pub(crate) fn shed_exempt() {
    #[cfg(feature = "metrics")]
    {
        static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
        COUNTER
            .get_or_init(|| {
                describe_once();
                metrics::counter!("tierlimit_shed_total", "tier" => "none", "category" => "exempt")
            })
            .increment(1);
    }
}

/// The adaptive overload capacity moved past its report step.
pub(crate) fn capacity_moved(before: u32, after: u32, mean: std::time::Duration) {
    tracing::info!(
        target: "tierlimit::overload",
        before,
        capacity = after,
        mean_latency_ms = mean.as_secs_f64() * 1e3,
        "overload capacity moved"
    );
}
