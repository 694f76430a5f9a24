use std::io::Write;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::decision::Decision;
use crate::time::{ceil_secs, retry_secs, unix_now};

pub(crate) static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub(crate) static X_RATELIMIT_REMAINING: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining");
pub(crate) static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub(crate) static X_RATELIMIT_WINDOW: HeaderName = HeaderName::from_static("x-ratelimit-window");
pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

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
}

impl Default for HeaderOptions {
    fn default() -> Self {
        HeaderOptions {
            x_ratelimit: true,
            ietf_draft: false,
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

/// A header value for an integer, allocation-free when small.
#[inline]
pub(crate) fn int(n: u64) -> HeaderValue {
    match SMALL_INTS.get(n as usize) {
        Some(v) if n < SMALL as u64 => v.clone(),
        _ => HeaderValue::from(n),
    }
}

/// Header values fixed by a tier × category cell, made once per policy.
#[derive(Debug)]
pub(crate) struct CellHeaders {
    max: u32,
    window_secs: u64,
    limit: HeaderValue,
    window: HeaderValue,
    /// The draft `RateLimit-Policy` value, `"tier.category";q=MAX;w=SECS`.
    policy: HeaderValue,
    /// The length of its `"tier.category"` name.
    name_len: usize,
}

impl CellHeaders {
    pub(crate) fn new(tier: &str, category: &str, max: u32, window: Duration) -> Self {
        let window_secs = ceil_secs(window);
        let name = format!("\"{tier}.{category}\"");
        CellHeaders {
            max,
            window_secs,
            limit: HeaderValue::from(max),
            window: HeaderValue::from(window_secs),
            policy: HeaderValue::try_from(format!("{name};q={max};w={window_secs}"))
                .expect("tier and category names are checked to be header-safe"),
            name_len: name.len(),
        }
    }
}

/// Everything needed to write the headers of one decision.
#[derive(Clone, Debug)]
pub(crate) struct HeaderPlan {
    pub(crate) decision: Decision,
    pub(crate) cell: Arc<CellHeaders>,
    pub(crate) options: HeaderOptions,
}

impl HeaderPlan {
    /// Writes the headers into `headers` (HTTP headers or gRPC metadata).
    pub(crate) fn write(&self, headers: &mut HeaderMap) {
        let d = &self.decision;
        let reset = ceil_secs(d.reset_after);
        let cell = &*self.cell;
        if self.options.x_ratelimit {
            let limit = if d.limit == cell.max {
                cell.limit.clone()
            } else {
                int(u64::from(d.limit))
            };
            headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
            headers.insert(X_RATELIMIT_REMAINING.clone(), int(u64::from(d.remaining)));
            headers.insert(
                X_RATELIMIT_RESET.clone(),
                HeaderValue::from(ceil_secs(unix_now() + d.reset_after)),
            );
            let window = ceil_secs(d.window);
            let window = if window == cell.window_secs {
                cell.window.clone()
            } else {
                int(window)
            };
            headers.insert(X_RATELIMIT_WINDOW.clone(), window);
        }
        if self.options.ietf_draft {
            headers.insert(RATELIMIT_POLICY.clone(), cell.policy.clone());
            let name = &cell.policy.as_bytes()[..cell.name_len];
            let mut buf = Vec::with_capacity(name.len() + 32);
            buf.extend_from_slice(name);
            // Writing into a Vec cannot fail.
            let _ = write!(buf, ";r={};t={reset}", d.remaining);
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)) {
                headers.insert(RATELIMIT.clone(), v);
            }
        }
        if let Some(retry) = d.retry_after {
            headers.insert(http::header::RETRY_AFTER, int(retry_secs(retry)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ints_are_exact() {
        for n in [0u64, 1, 9, 10, 99, 100, 4095, 4096, 4097, 10_000, u64::MAX] {
            assert_eq!(int(n).to_str().unwrap(), n.to_string());
        }
    }
}
