//! A tier × category cell's header values ([`CellHeaders`]), made once
//! per policy and interned for the life of the process: what every
//! request of the cell copies instead of formatting (its limit, window and
//! the draft's `RateLimit-Policy`), and the quota fields a shed answer
//! writes alone.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::headers::{HeaderOptions, RATELIMIT_POLICY, X_RATELIMIT_LIMIT, X_RATELIMIT_WINDOW};
use crate::limit::Per;
use crate::time::ceil_secs;

/// Header values fixed by a tier × category cell, made once per policy.
#[derive(Debug)]
pub(crate) struct CellHeaders {
    /// The first limit's burst and window (the usual binding limit).
    pub(super) max: u32,
    pub(super) window_secs: u64,
    pub(super) limit: HeaderValue,
    pub(super) window: HeaderValue,
    /// The draft `RateLimit-Policy` value: every limit of the cell,
    /// `"tier.category";q=MAX;w=SECS`, separated by `, `.
    pub(super) policy: HeaderValue,
    /// Where each limit's quoted name lies in `policy` (start, length), by
    /// charge index.
    names: Box<[(u16, u16)]>,
    /// Whether the cell has a request limit for the draft fields to
    /// describe (not a cell with token or concurrency limits only).
    pub(super) quota: bool,
}

/// One limit of a cell, as its headers name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LimitText {
    pub(crate) max: u32,
    pub(crate) window: Duration,
    pub(crate) per: Per,
    pub(crate) period: crate::policy::Period,
}

/// A cell's header values, shared by every request of the cell.
///
/// Usually `Static`: cells are interned for the life of the process, their
/// text in static memory, so a request copies a pointer and clones header
/// values without touching a reference count (no atomic write to memory
/// every core shares). The interner is bounded ([`MAX_INTERNED`] distinct
/// cells, a few hundred bytes each); past it, cells are reference-counted.
#[derive(Clone, Debug)]
pub(crate) enum CellRef {
    Static(&'static CellHeaders),
    Shared(Arc<CellHeaders>),
}

impl std::ops::Deref for CellRef {
    type Target = CellHeaders;
    #[inline]
    fn deref(&self) -> &CellHeaders {
        match self {
            CellRef::Static(c) => c,
            CellRef::Shared(c) => c,
        }
    }
}

/// The most distinct cells interned (tier name, category name, limit,
/// window): far more than any policy's history holds; beyond it, cells are
/// reference-counted and nothing more is kept.
const MAX_INTERNED: usize = 65_536;

type CellKey = (Box<str>, Box<str>, Box<[LimitText]>);

static INTERNED: std::sync::Mutex<
    Option<std::collections::HashMap<CellKey, &'static CellHeaders>>,
> = std::sync::Mutex::new(None);

/// A header value over static text (cloned without a reference count).
fn leak_value(text: String) -> Option<HeaderValue> {
    let text: &'static str = Box::leak(text.into_boxed_str());
    HeaderValue::from_maybe_shared(bytes::Bytes::from_static(text.as_bytes())).ok()
}

impl CellHeaders {
    fn make(tier: &str, category: &str, limits: &[LimitText], leak: bool) -> Option<Self> {
        let value = |text: String| {
            if leak {
                leak_value(text)
            } else {
                HeaderValue::try_from(text).ok()
            }
        };
        let count = |per| limits.iter().filter(|l| l.per == per).count();
        let mut policy = String::new();
        let mut names = Vec::with_capacity(limits.len());
        for l in limits {
            let secs = ceil_secs(l.window);
            // One limit per key: `"tier.category"`; several: by window or period.
            let span = l.period.name().map_or(format!("{secs}s"), str::to_owned);
            let name = match (l.per, count(l.per)) {
                (Per::Key, 1) => format!("\"{tier}.{category}\""),
                (Per::Key, _) => format!("\"{tier}.{category}.{span}\""),
                (per, 1) => format!("\"{tier}.{category}.{}\"", per.name()),
                (per, _) => format!("\"{tier}.{category}.{}.{span}\"", per.name()),
            };
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            names.push((
                u16::try_from(policy.len()).ok()?,
                u16::try_from(name.len()).ok()?,
            ));
            policy.push_str(&name);
            policy.push_str(&format!(";q={};w={secs}", l.max));
        }
        let first = limits.first()?;
        let window_secs = ceil_secs(first.window);
        Some(CellHeaders {
            max: first.max,
            window_secs,
            limit: value(first.max.to_string())?,
            window: value(window_secs.to_string())?,
            policy: value(policy)?,
            names: names.into_boxed_slice(),
            quota: limits.iter().any(|l| l.max > 0),
        })
    }

    /// The cell's header values, interned when the interner has room.
    /// `limits` lists the cell's limits in charge order (per key, then per
    /// account); an unlimited cell passes one limit of 0.
    pub(crate) fn get(tier: &str, category: &str, limits: &[LimitText]) -> CellRef {
        let mut interned = INTERNED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = interned.get_or_insert_with(Default::default);
        let key: CellKey = (tier.into(), category.into(), limits.into());
        if let Some(cell) = table.get(&key) {
            return CellRef::Static(cell);
        }
        if table.len() < MAX_INTERNED
            && let Some(cell) = Self::make(tier, category, limits, true)
        {
            let cell: &'static CellHeaders = Box::leak(Box::new(cell));
            table.insert(key, cell);
            return CellRef::Static(cell);
        }
        drop(interned);
        let cell = Self::make(tier, category, limits, false)
            .expect("tier and category names are checked to be header-safe");
        CellRef::Shared(Arc::new(cell))
    }

    /// The name of the limit at charge `index`, unquoted (`free.read`,
    /// `free.read.60s`): what the draft fields call it, and Envoy's front.
    #[cfg(feature = "envoy")]
    pub(crate) fn limit_name(&self, index: u8) -> &str {
        std::str::from_utf8(self.name(index))
            .unwrap_or_default()
            .trim_matches('"')
    }

    /// The quoted name of the limit at charge `index` (the first's if the
    /// request's limits were not the cell's own).
    pub(super) fn name(&self, index: u8) -> &[u8] {
        let bytes = self.policy.as_bytes();
        let (start, len) = self
            .names
            .get(usize::from(index))
            .or(self.names.first())
            .copied()
            .unwrap_or((0, 0));
        bytes
            .get(usize::from(start)..usize::from(start) + usize::from(len))
            .unwrap_or(bytes)
    }
}

impl CellHeaders {
    /// The fields that describe the cell's quota and not its state
    /// (`X-RateLimit-Limit`, `X-RateLimit-Window`, the draft's
    /// `RateLimit-Policy`): what a shed request's answer carries. It was
    /// never counted, and reading its bucket would cost the backend a round
    /// trip while the service is overloaded.
    pub(crate) fn write_quota(&self, options: HeaderOptions, headers: &mut HeaderMap) {
        if self.max == 0 {
            return; // unlimited: no fields
        }
        if options.x_ratelimit {
            headers.insert(X_RATELIMIT_LIMIT, self.limit.clone());
            headers.insert(X_RATELIMIT_WINDOW, self.window.clone());
        }
        if options.ietf_draft {
            headers.insert(RATELIMIT_POLICY, self.policy.clone());
        }
    }
}
