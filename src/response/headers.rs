use std::cell::RefCell;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::decision::{Decision, LeaseState};
use crate::meter::TokenKind;
use crate::policy::Limit;
use crate::time::{ceil_secs, retry_secs};

use super::cell::CellRef;

// Constants, not statics: a constant name is built where it is inserted,
// where cloning a static one copied its enum through the stack in pieces
// of other sizes than were written, stalling each field's insertion on
// store forwarding (about 90 ns a request with the four fields).
pub(crate) const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub(crate) const X_RATELIMIT_REMAINING: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining");
pub(crate) const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub(crate) const X_RATELIMIT_WINDOW: HeaderName = HeaderName::from_static("x-ratelimit-window");
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const X_RATELIMIT_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
const X_RATELIMIT_RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const X_RATELIMIT_LIMIT_INPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-input-tokens");
const X_RATELIMIT_REMAINING_INPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-input-tokens");
const X_RATELIMIT_RESET_INPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-input-tokens");
const X_RATELIMIT_LIMIT_OUTPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-output-tokens");
const X_RATELIMIT_REMAINING_OUTPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-output-tokens");
const X_RATELIMIT_RESET_OUTPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-output-tokens");

/// `X-RateLimit-{Limit,Remaining,Reset}-Tokens` and the input and output
/// ones, by [`TokenKind`] (all, input, output).
static TOKEN_HEADERS: [[HeaderName; 3]; 3] = [
    [
        X_RATELIMIT_LIMIT_TOKENS,
        X_RATELIMIT_REMAINING_TOKENS,
        X_RATELIMIT_RESET_TOKENS,
    ],
    [
        X_RATELIMIT_LIMIT_INPUT_TOKENS,
        X_RATELIMIT_REMAINING_INPUT_TOKENS,
        X_RATELIMIT_RESET_INPUT_TOKENS,
    ],
    [
        X_RATELIMIT_LIMIT_OUTPUT_TOKENS,
        X_RATELIMIT_REMAINING_OUTPUT_TOKENS,
        X_RATELIMIT_RESET_OUTPUT_TOKENS,
    ],
];
const X_CONCURRENCY_LIMIT: HeaderName = HeaderName::from_static("x-concurrency-limit");
const X_CONCURRENCY_REMAINING: HeaderName = HeaderName::from_static("x-concurrency-remaining");

/// Which rate-limit header fields are written.
///
/// By default `X-RateLimit-Limit`, `-Remaining`, `-Reset` (Unix seconds)
/// and `-Window` (seconds) on every limited response, and `Retry-After`
/// (seconds, at least 1) on refusals. The IETF draft fields (`RateLimit`
/// and `RateLimit-Policy`, draft-ietf-httpapi-ratelimit-headers-11 syntax:
/// `"free.read";q=100;w=3600` and `"free.read";r=99;t=36`) are opt-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct HeaderOptions {
    pub(crate) x_ratelimit: bool,
    pub(crate) ietf_draft: bool,
    /// Whether every admitted request's decision is described (a header
    /// plan made) even when no field is written: Envoy's rate limit
    /// service reports each descriptor's limit whatever the fields, and a
    /// layer with a usage feed carries every admitted request's record.
    pub(crate) describe: bool,
}

impl Default for HeaderOptions {
    fn default() -> Self {
        HeaderOptions {
            x_ratelimit: true,
            ietf_draft: false,
            describe: false,
        }
    }
}

impl HeaderOptions {
    /// Writes the `X-RateLimit-*` fields (default on).
    pub fn x_ratelimit(mut self, on: bool) -> Self {
        self.x_ratelimit = on;
        self
    }

    /// Writes the IETF draft `RateLimit` and `RateLimit-Policy` fields
    /// (default off).
    pub fn ietf_draft(mut self, on: bool) -> Self {
        self.ietf_draft = on;
        self
    }
}

/// Integers 0..=4096 as static header values: most limits, remainders,
/// windows and delays, written without allocating.
const SMALL: usize = 4097;
static SMALL_INTS: LazyLock<Box<[HeaderValue]>> = LazyLock::new(|| {
    let mut text = String::new();
    let mut ends = Vec::with_capacity(SMALL);
    for i in 0..SMALL {
        text.push_str(&i.to_string());
        ends.push(text.len());
    }
    let text: &'static str = Box::leak(text.into_boxed_str());
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let v = HeaderValue::from_static(&text[start..end]);
            start = end;
            v
        })
        .collect()
});

/// A header value for an integer, without allocating: from the static
/// table when small, else cut from this thread's [`Arena`].
#[inline]
pub(crate) fn int(n: u64) -> HeaderValue {
    if n < SMALL as u64
        && let Some(v) = SMALL_INTS.get(n as usize)
    {
        return v.clone();
    }
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    value(Arena::with(|arena| arena.cut(&[digits]))).unwrap_or_else(|| HeaderValue::from(n))
}

/// Text the arena cut, as a header value (`None` if it is not one).
///
/// The arena hands out [`Bytes`] (four words, no padding), made header
/// values only here: an `Option<HeaderValue>` handed back through the
/// thread-local's closure was copied with its padding in pieces of other
/// sizes than were written, which stalls the loads on store forwarding.
#[inline]
fn value(text: Option<Bytes>) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(text?).ok()
}

/// How much text one arena chunk holds: a few hundred values.
const CHUNK: usize = 4096;
/// More than one response's values: below this much room, the arena tries
/// to take its chunk back before cutting more.
const SLACK: usize = 512;

/// Per-request header text (integers beyond the static table, the draft
/// `RateLimit` field) cut from one buffer per thread.
///
/// Each value shares the chunk (a reference count, no allocation). When
/// the chunk is used up and every value cut from it is gone (a response's
/// headers are dropped once written out), the same memory is taken back
/// for the next values: the steady state allocates nothing. Only when
/// values from a full chunk are still alive (responses held somewhere) is
/// a new chunk allocated: two allocations per few hundred values.
struct Arena {
    buf: BytesMut,
    /// The last `X-RateLimit-Reset` value made on this thread, checked
    /// once: the same second is written by many requests in a row.
    /// Dropped before the chunk is taken back, so it never pins one.
    reset: Option<(u64, HeaderValue)>,
}

thread_local! {
    static ARENA: RefCell<Arena> = RefCell::new(Arena { buf: BytesMut::new(), reset: None });
}

impl Arena {
    /// Runs `f` on this thread's arena; `None` when the arena is gone
    /// (thread teardown) or busy, for the caller to fall back on.
    #[inline]
    fn with<T>(f: impl FnOnce(&mut Arena) -> T) -> Option<T> {
        ARENA
            .try_with(|arena| Some(f(&mut *arena.try_borrow_mut().ok()?)))
            .ok()
            .flatten()
    }

    /// The concatenation of `parts`, cut from the chunk.
    fn cut(&mut self, parts: &[&[u8]]) -> Bytes {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // Near the end of the chunk, take it back as soon as every value
        // cut from it is gone: before the next request's first value,
        // while there is still room for this request's other values.
        if self.buf.capacity() < SLACK.max(len) {
            self.reset = None;
            let reclaimed = self.buf.try_reclaim(CHUNK.max(len));
            if !reclaimed && self.buf.capacity() < len {
                self.buf = BytesMut::with_capacity(CHUNK.max(len));
            }
        }
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        self.buf.split().freeze()
    }

    /// The `X-RateLimit-Reset` value for Unix second `secs`: cut and
    /// checked (as a header value) once per second, then shared.
    fn reset(&mut self, secs: u64) -> Option<&HeaderValue> {
        if !matches!(&self.reset, Some((s, _)) if *s == secs) {
            let mut digits = itoa::Buffer::new();
            let v = value(Some(self.cut(&[digits.format(secs).as_bytes()])))?;
            self.reset = Some((secs, v));
        }
        self.reset.as_ref().map(|(_, v)| v)
    }
}

/// Writes a reset field (`name`: Unix seconds `secs`, the same for many
/// requests in a row), inserted where the arena lends the shared value:
/// a value handed back out of the thread-local's closure would be copied
/// with its padding (see [`value`]).
fn insert_reset(headers: &mut HeaderMap, name: HeaderName, secs: u64) {
    let mut name = Some(name);
    Arena::with(|arena| {
        if let Some(v) = arena.reset(secs)
            && let Some(name) = name.take()
        {
            headers.insert(name, v.clone());
        }
    });
    // Past the arena (busy, or at a thread's teardown).
    if let Some(name) = name {
        headers.insert(name, int(secs));
    }
}

/// The headers of one decision, worked out when the decision is made: an
/// admitted request carries this through its response future (small: it
/// moves with the future), and [`write`](Self::write) only copies values.
#[derive(Debug)]
pub(crate) struct HeaderPlan {
    cell: CellRef,
    /// `X-RateLimit-Reset`: Unix seconds when the bucket is full again.
    reset_at: u64,
    limit: u32,
    remaining: u32,
    /// `X-RateLimit-Window`, in seconds.
    window: u32,
    /// The draft's `t`: seconds until the bucket is full again.
    reset_in: u32,
    /// `Retry-After` in seconds (0: none).
    retry: u32,
    /// The token headers of a metered request, by kind (all, input,
    /// output); [`TokenHeaders::NONE`] where the cell has no such limit.
    tokens: [TokenHeaders; 3],
    lease: Option<LeaseState>,
    /// The charge the decision describes (the draft field's name).
    index: u8,
    /// Whether a rate limit is described (not concurrency limits only:
    /// a lease's decision with no window).
    rate: bool,
    /// Whether the decision is a token limit's, which the draft's
    /// `RateLimit-Policy` (request limits) does not name.
    token_bound: bool,
    options: HeaderOptions,
}

/// `X-RateLimit-*-Tokens` of a metered request.
#[derive(Clone, Copy, Debug)]
struct TokenHeaders {
    /// The burst; 0: no such limit (a limit's burst is at least 1).
    limit: u32,
    remaining: u32,
    /// Unix seconds (a `u32`, as `reset_in`: the plan rides in every
    /// admitted request's future, and small moves are inline copies).
    reset_at: u32,
}

impl TokenHeaders {
    /// No token limit of a kind: nothing to write.
    const NONE: TokenHeaders = TokenHeaders {
        limit: 0,
        remaining: 0,
        reset_at: 0,
    };
}

impl HeaderOptions {
    /// Whether the headers written need the Unix time.
    #[inline]
    pub(crate) fn need_time(self) -> bool {
        self.x_ratelimit || self.ietf_draft
    }

    /// Whether an admitted request needs a header plan (fields to write,
    /// or a decision to describe).
    #[inline]
    pub(crate) fn need_plan(self) -> bool {
        self.need_time() || self.describe
    }
}

/// Seconds as the headers write them (saturated: no header needs more than
/// 136 years).
fn secs32(secs: u64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// What a plan says of its binding limit, for Envoy's front: its name (as
/// the draft fields call it) and the numbers the headers write.
#[cfg(feature = "envoy")]
#[derive(Debug)]
pub(crate) struct Described<'a> {
    pub(crate) name: &'a str,
    pub(crate) limit: u32,
    pub(crate) remaining: u32,
    /// `X-RateLimit-Window`, in seconds.
    pub(crate) window: u32,
    /// Seconds until the bucket is full again (rounded up).
    pub(crate) reset_in: u32,
    /// `Retry-After` in seconds (0: none).
    pub(crate) retry: u32,
    /// Whether a rate limit is described (not concurrency limits only).
    pub(crate) rate: bool,
}

#[cfg(feature = "envoy")]
impl HeaderPlan {
    /// The cell whose limits the plan describes.
    pub(crate) fn cell(&self) -> &CellRef {
        &self.cell
    }

    /// The binding limit, as the headers describe it.
    pub(crate) fn described(&self) -> Described<'_> {
        Described {
            name: self.cell.limit_name(self.index),
            limit: self.limit,
            remaining: self.remaining,
            window: self.window,
            reset_in: self.reset_in,
            retry: self.retry,
            rate: self.rate,
        }
    }
}

impl HeaderPlan {
    /// The headers of decision `d` of a request of `cell` at Unix time
    /// `now`; `token_limits` are the limits `d.tokens`, `d.input_tokens`
    /// and `d.output_tokens` describe (a metered request's charges at
    /// their indexes).
    #[inline]
    pub(crate) fn new(
        d: &Decision,
        cell: CellRef,
        options: HeaderOptions,
        now: Duration,
        token_limits: [Option<Limit>; 3],
    ) -> Self {
        let shown = d.shown(now);
        let mut tokens = [TokenHeaders::NONE; 3];
        if options.x_ratelimit && token_limits != [None; 3] {
            tokens = Self::all_token_headers(d, &token_limits, now);
        }
        HeaderPlan {
            cell,
            reset_at: shown.reset,
            limit: shown.limit,
            remaining: shown.remaining,
            window: secs32(shown.window),
            reset_in: secs32(ceil_secs(d.reset_after)),
            retry: d.retry_after.map_or(0, |r| secs32(retry_secs(r))),
            tokens,
            lease: d.lease,
            index: d.index,
            rate: !(d.lease.is_some() && d.window.is_zero()),
            token_bound: options.ietf_draft
                && [d.tokens, d.input_tokens, d.output_tokens]
                    .iter()
                    .any(|t| t.is_some_and(|t| t.index == d.index)),
            options,
        }
    }

    /// The binding token limit's headers of each kind: the decision itself
    /// when that limit binds it, else its charge's state at admission (out
    /// of line: most requests have none).
    #[cold]
    #[inline(never)]
    fn all_token_headers(
        d: &Decision,
        limits: &[Option<Limit>; 3],
        now: Duration,
    ) -> [TokenHeaders; 3] {
        let kinds = [TokenKind::Total, TokenKind::Input, TokenKind::Output];
        kinds.map(|kind| {
            let (Some(t), Some(limit)) = (d.tokens_of(kind), limits[kind as usize]) else {
                return TokenHeaders::NONE;
            };
            let shown = if t.index == d.index {
                d.shown(now)
            } else {
                Decision::allow(&limit, t.remaining).shown(now)
            };
            TokenHeaders {
                limit: shown.limit,
                remaining: shown.remaining,
                reset_at: secs32(shown.reset),
            }
        })
    }

    /// The token headers of a metered request (out of line: most requests
    /// have none).
    #[cold]
    #[inline(never)]
    fn write_tokens(tokens: &[TokenHeaders; 3], headers: &mut HeaderMap) {
        for (t, [limit, remaining, reset]) in tokens.iter().zip(&TOKEN_HEADERS) {
            if t.limit > 0 {
                headers.insert(limit.clone(), int(u64::from(t.limit)));
                headers.insert(remaining.clone(), int(u64::from(t.remaining)));
                insert_reset(headers, reset.clone(), u64::from(t.reset_at));
            }
        }
    }

    /// The concurrency headers of a request under a concurrency limit
    /// (out of line: most requests have none).
    #[cold]
    #[inline(never)]
    fn write_lease(l: &LeaseState, headers: &mut HeaderMap) {
        headers.insert(X_CONCURRENCY_LIMIT, int(u64::from(l.limit)));
        headers.insert(X_CONCURRENCY_REMAINING, int(u64::from(l.remaining)));
    }

    /// Writes the headers into `headers` (HTTP headers or gRPC metadata).
    pub(crate) fn write(&self, headers: &mut HeaderMap) {
        if let Some(l) = &self.lease {
            Self::write_lease(l, headers);
        }
        if self.rate {
            self.write_rate(headers);
        }
        if self.retry > 0 {
            headers.insert(http::header::RETRY_AFTER, int(u64::from(self.retry)));
        }
    }

    /// The rate limit's fields.
    #[inline]
    fn write_rate(&self, headers: &mut HeaderMap) {
        let cell = &*self.cell;
        if self.options.x_ratelimit {
            let limit = if self.limit == cell.max {
                cell.limit.clone()
            } else {
                int(u64::from(self.limit))
            };
            headers.insert(X_RATELIMIT_LIMIT, limit);
            headers.insert(X_RATELIMIT_REMAINING, int(u64::from(self.remaining)));
            insert_reset(headers, X_RATELIMIT_RESET, self.reset_at);
            let window = if u64::from(self.window) == cell.window_secs {
                cell.window.clone()
            } else {
                int(u64::from(self.window))
            };
            headers.insert(X_RATELIMIT_WINDOW, window);
        }
        if self.options.ietf_draft && cell.quota {
            headers.insert(RATELIMIT_POLICY, cell.policy.clone());
        }
        if self.options.ietf_draft && cell.quota && !self.token_bound {
            let name = cell.name(self.index);
            let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
            let (r, t) = (r.format(self.remaining), t.format(self.reset_in));
            let parts = [name, b";r=", r.as_bytes(), b";t=", t.as_bytes()];
            // (Past the arena, at a thread's teardown: allocated.)
            let v = value(Arena::with(|arena| arena.cut(&parts)))
                .or_else(|| HeaderValue::from_bytes(&parts.concat()).ok());
            if let Some(v) = v {
                headers.insert(RATELIMIT, v);
            }
        }
        if self.tokens.iter().any(|t| t.limit > 0) {
            Self::write_tokens(&self.tokens, headers);
        }
    }
}

#[cfg(test)]
#[path = "headers_tests.rs"]
mod tests;
