//! Token metering and refunds: what a request reserved at admission is
//! settled once its response is over.
//!
//! A metered request (its category has token limits, or refunds) gets a
//! [`TokenMeter`] in its request extensions. The handler reports what it
//! used, as often as it likes (a stream reports per chunk); the layer
//! settles when the last clone of the meter is gone: the handler's, the
//! stream's that it moved into the response body, and the layer's own,
//! which it keeps until the response head has been seen (to read a
//! [`TokenUsage`](struct@TokenUsage) response extension and the status, for `refund_on`).
//! A client that goes away drops the body, and with it the stream's meter:
//! it is charged for what was reported until then. Settlement runs once,
//! from a `Drop`, and never blocks: the memory backend settles in place,
//! Redis on its own I/O thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::backend::{Adjustment, Backend, Charge, Lease, TokenSplit};
use crate::policy::{Limit, MAX_LIMITS, PeriodBounds, RefundOn};

/// Where what is left of a request after its response goes — token
/// settlements and lease releases: the layer's backend, type-erased (held
/// by meters and lease guards).
pub(crate) trait ErasedBackend: Send + Sync {
    fn settle(&self, owner: u64, adjustments: &[Adjustment]);
    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64);
}

impl<B: Backend> ErasedBackend for B {
    fn settle(&self, owner: u64, adjustments: &[Adjustment]) {
        // The backend proceeds without being polled (its contract).
        drop(Backend::settle(self, owner, adjustments));
    }

    fn release(&self, owner: u64, leases: &[Lease], lease_id: u64) {
        Backend::release(self, owner, leases, lease_id);
    }
}

/// What runs once a meter has settled (the usage feed's event): the
/// tokens settled (`None` in a category without token limits) and whether
/// the response refunded the request.
pub(crate) trait Settled: Send + Sync {
    fn settled(self: Box<Self>, tokens: Option<TokenUsage>, refunded: bool);
}

/// What a token limit counts: every token a request reports, or only its
/// input (prompt) or output (completion) tokens.
///
/// ```toml
/// [tiers.free]
/// ai = { requests = "50/hour", tokens = "100000/day", input_tokens = "20000/hour", output_tokens = "5000/hour" }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// `tokens`: input, output and tokens reported without a kind.
    Total,
    /// `input_tokens`: what a request reports as input.
    Input,
    /// `output_tokens`: what a request reports as output.
    Output,
}

impl TokenKind {
    /// The unit a refusal's body and the usage report name: `"tokens"`,
    /// `"input tokens"`, `"output tokens"`.
    pub fn unit(self) -> &'static str {
        match self {
            TokenKind::Total => "tokens",
            TokenKind::Input => "input tokens",
            TokenKind::Output => "output tokens",
        }
    }
}

/// What a metered request was charged at admission, to settle later.
#[derive(Clone)]
pub(crate) struct Seed {
    pub(crate) owner: u64,
    /// Request charges first, then `tokens` token charges (of all
    /// tokens, then input, then output ones, as `split` says).
    pub(crate) charges: [Charge; MAX_LIMITS],
    pub(crate) len: u8,
    pub(crate) tokens: u8,
    pub(crate) split: TokenSplit,
    pub(crate) estimate: u32,
    /// The responses that refund the request.
    pub(crate) refund: RefundOn,
    pub(crate) sink: Arc<dyn ErasedBackend>,
    #[cfg(feature = "metrics")]
    pub(crate) counters: Option<crate::telemetry::TokenCounters>,
}

/// Reports what a request used, in tokens (for categories with token
/// limits), from a handler or a stream; the layer puts one in every
/// metered request's extensions.
///
/// The request reserved its estimate at admission
/// ([`Identity::with_tokens`](crate::extract::Identity::with_tokens), else 1). When
/// the response is over — the last clone of this meter dropped — the layer
/// charges the difference: a refund if less was used, a debt if more
/// (later requests wait until it is paid). Clone it into a response stream
/// to keep metering until the stream ends; a client that disconnects is
/// charged for what was reported until then.
///
/// Report input (prompt) and output (completion) tokens apart with
/// [`add_input`](Self::add_input) and [`add_output`](Self::add_output):
/// `tokens` limits count both, `input_tokens` and `output_tokens` limits
/// each their own. What [`add`](Self::add) reports has no kind: `tokens`
/// limits count it, input and output limits do not.
///
/// ```
/// use axum::{Extension, Json};
/// use tierlimit::meter::TokenMeter;
///
/// async fn complete(Extension(meter): Extension<TokenMeter>) -> Json<u64> {
///     let (prompt, completion) = (12, 30); // what the model used
///     meter.add_input(prompt);
///     meter.add_output(completion);
///     Json(meter.used())
/// }
/// # let _ = complete;
/// ```
#[derive(Clone)]
pub struct TokenMeter {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tokens reported without a kind.
    used: AtomicU64,
    input: AtomicU64,
    output: AtomicU64,
    refund: AtomicBool,
    /// Whether the admission counted the request (set when it is allowed;
    /// a refusal or a shadow-mode pass counted nothing to settle).
    charged: AtomicBool,
    seed: Seed,
    /// Runs after the settlement (set by the usage feed's record, once).
    then: OnceLock<Box<dyn Settled>>,
}

impl fmt::Debug for TokenMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMeter")
            .field("estimate", &self.inner.seed.estimate)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

/// The largest debt a settlement counts, in bursts of its limit: a
/// response that reports more tokens than this leaves its key refused for
/// this many windows (at most a limit's ten-year window each), not
/// longer.
pub const MAX_DEBT_WINDOWS: i64 = 10;

/// A response extension for the simple case: the tokens a response used,
/// read by the layer when the response head passes (added to what the
/// handler reported through its [`TokenMeter`]): input and output apart
/// ([`split`](Self::split)), or a total without a kind ([`new`](Self::new),
/// which `tokens` limits count but input and output limits do not). It is
/// also what a usage event's settled tokens are.
///
/// ```
/// use tierlimit::meter::TokenUsage;
///
/// let usage = TokenUsage::split(12, 30);
/// assert_eq!((usage.input, usage.output, usage.total()), (12, 30, 42));
/// assert_eq!(TokenUsage::new(42).total(), 42);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenUsage {
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
    /// Tokens reported without a kind.
    pub unsplit: u64,
}

impl TokenUsage {
    /// `tokens` used, without a kind (counted by `tokens` limits only).
    pub const fn new(tokens: u64) -> Self {
        TokenUsage {
            input: 0,
            output: 0,
            unsplit: tokens,
        }
    }

    /// `input` and `output` tokens used.
    pub const fn split(input: u64, output: u64) -> Self {
        TokenUsage {
            input,
            output,
            unsplit: 0,
        }
    }

    /// Every token: what `tokens` limits count.
    pub const fn total(&self) -> u64 {
        self.input
            .saturating_add(self.output)
            .saturating_add(self.unsplit)
    }

    /// The tokens a limit of `kind` counts.
    pub const fn of(&self, kind: TokenKind) -> u64 {
        match kind {
            TokenKind::Total => self.total(),
            TokenKind::Input => self.input,
            TokenKind::Output => self.output,
        }
    }
}

/// `TokenUsage(n)`: `n` tokens without a kind, as [`TokenUsage::new`] (the
/// form before input and output tokens were told apart).
#[allow(non_snake_case)]
pub const fn TokenUsage(tokens: u64) -> TokenUsage {
    TokenUsage::new(tokens)
}

impl TokenMeter {
    /// A meter for a request being admitted; it settles nothing unless
    /// [`charged`](Self::charged) is called.
    pub(crate) fn new(seed: Seed) -> Self {
        TokenMeter {
            inner: Arc::new(Inner {
                used: AtomicU64::new(0),
                input: AtomicU64::new(0),
                output: AtomicU64::new(0),
                refund: AtomicBool::new(false),
                charged: AtomicBool::new(false),
                seed,
                then: OnceLock::new(),
            }),
        }
    }

    /// The backend counted the request: settle it when it is over.
    pub(crate) fn charged(&self) {
        self.inner.charged.store(true, Ordering::Relaxed);
    }

    /// Reports `tokens` more used, without a kind: `tokens` limits count
    /// them, input and output limits do not (callable any number of times).
    pub fn add(&self, tokens: u64) {
        saturating_add(&self.inner.used, tokens);
    }

    /// Reports `tokens` more input (prompt) tokens used: `tokens` and
    /// `input_tokens` limits count them.
    pub fn add_input(&self, tokens: u64) {
        saturating_add(&self.inner.input, tokens);
    }

    /// Reports `tokens` more output (completion) tokens used: `tokens` and
    /// `output_tokens` limits count them.
    pub fn add_output(&self, tokens: u64) {
        saturating_add(&self.inner.output, tokens);
    }

    /// Adds what `usage` reports.
    pub fn add_usage(&self, usage: TokenUsage) {
        if usage.unsplit > 0 {
            self.add(usage.unsplit);
        }
        if usage.input > 0 {
            self.add_input(usage.input);
        }
        if usage.output > 0 {
            self.add_output(usage.output);
        }
    }

    /// Every token reported so far, of any kind.
    pub fn used(&self) -> u64 {
        self.usage().total()
    }

    /// The tokens reported so far, by kind.
    pub fn usage(&self) -> TokenUsage {
        let i = &self.inner;
        TokenUsage {
            input: i.input.load(Ordering::Relaxed),
            output: i.output.load(Ordering::Relaxed),
            unsplit: i.used.load(Ordering::Relaxed),
        }
    }

    /// The tokens reserved at admission.
    pub fn estimate(&self) -> u32 {
        self.inner.seed.estimate
    }

    /// The limit of the charge at `index`.
    pub(crate) fn limit_of(&self, index: u8) -> Option<Limit> {
        let seed = &self.inner.seed;
        seed.charges[..usize::from(seed.len).min(MAX_LIMITS)]
            .get(usize::from(index))
            .map(|c| c.limit)
    }

    /// Runs `f` once this meter has settled (after its last clone is
    /// dropped); a second one is ignored.
    pub(crate) fn then(&self, f: Box<dyn Settled>) {
        let _ = self.inner.then.set(f);
    }

    /// What the layer does when the response head passes: adds a
    /// [`TokenUsage`](struct@TokenUsage) extension's count, and marks the request refunded if
    /// its status matches the policy's `refund_on`.
    pub(crate) fn on_response(&self, status: http::StatusCode, extensions: &http::Extensions) {
        if let Some(usage) = extensions.get::<TokenUsage>() {
            self.add_usage(*usage);
        }
        if self.inner.seed.refund.matches(status.as_u16()) {
            self.inner.refund.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let charged = *self.charged.get_mut();
        let used = TokenUsage {
            input: *self.input.get_mut(),
            output: *self.output.get_mut(),
            unsplit: *self.used.get_mut(),
        };
        let refund = charged && *self.refund.get_mut();
        if charged {
            self.settle(used, refund);
        }
        if let Some(then) = self.then.take() {
            let tokens = (self.seed.tokens > 0).then_some(if charged {
                used
            } else {
                TokenUsage::default()
            });
            then.settled(tokens, refund);
        }
    }
}

impl Inner {
    /// The settlement of a charged request that used `used` tokens: each
    /// token charge settles the tokens of its kind against what it
    /// reserved.
    fn settle(&self, used: TokenUsage, refund: bool) {
        let seed = &self.seed;
        let len = usize::from(seed.len).min(MAX_LIMITS);
        let tokens = usize::from(seed.tokens).min(len);
        let mut adjustments = [Adjustment {
            bucket: 0,
            limit: Limit::per_second(1),
            units: 0,
            period: PeriodBounds::ROLLING,
        }; MAX_LIMITS];
        let mut n = 0;
        for (i, c) in seed.charges[..len].iter().enumerate() {
            let units = if let Some(kind) = seed.split.kind(i, len, tokens) {
                let debt = i64::try_from(used.of(kind)).unwrap_or(i64::MAX) - i64::from(c.cost);
                // A debt beyond `MAX_DEBT_WINDOWS` of the limit's bursts is
                // counted as that many: refused for that many windows, on
                // every backend alike (Redis's script arithmetic is a
                // double's, the memory backend's a u64 of nanoseconds).
                debt.min(i64::from(c.limit.max()) * MAX_DEBT_WINDOWS)
            } else if refund {
                -i64::from(c.cost)
            } else {
                0
            };
            if units != 0 {
                adjustments[n] = Adjustment {
                    bucket: c.bucket,
                    limit: c.limit,
                    units,
                    period: c.period,
                };
                n += 1;
            }
        }
        #[cfg(feature = "metrics")]
        if let Some(m) = &seed.counters {
            if tokens > 0 {
                // What was reserved of each kind against what was used:
                // all tokens (when limited), else input tokens (the
                // estimate) and output tokens (1).
                let estimate = u64::from(seed.estimate);
                let split = seed.split;
                let io = usize::from(split.input) + usize::from(split.output);
                let kinds = if tokens > io {
                    [Some((used.total(), estimate)), None]
                } else {
                    [
                        (split.input > 0).then_some((used.input, estimate)),
                        (split.output > 0).then_some((used.output, 1)),
                    ]
                };
                for (used, reserved) in kinds.into_iter().flatten() {
                    if used > reserved {
                        m.charged.increment(used - reserved);
                    } else if reserved > used {
                        m.refunded.increment(reserved - used);
                    }
                }
            }
            if refund {
                m.refunds.increment(1);
            }
        }
        if n > 0 {
            seed.sink.settle(seed.owner, &adjustments[..n]);
        }
    }
}

/// Adds `n` to `counter`, stopping at `u64::MAX` (a count reported past it
/// stays the largest there is: a debt is never forgiven by a wrap).
fn saturating_add(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}
