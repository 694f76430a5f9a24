//! A request's priority: whether it is critical (and may use a tier's
//! priority reserve), from `X-Request-Priority` or its identity, and how
//! much of a limit's burst a request that is not must leave.

use crate::extract::{Priority, Rejection};

/// Whether a request is critical (by its `X-Request-Priority`, else its
/// identity's priority): critical requests may use a tier's reserve.
pub(super) fn critical(headers: &http::HeaderMap, priority: Priority) -> Result<bool, Rejection> {
    let priority = match headers.get(&X_REQUEST_PRIORITY) {
        Some(v) => parse_priority(v.as_bytes()).ok_or(Rejection::InvalidPriority)?,
        None => priority,
    };
    Ok(priority == Priority::Critical)
}

/// The capacity of a limit of burst `max` a request that is not critical
/// must leave, under a reserve of `pct` percent. A custom or scaled limit
/// may be smaller than the tier's: never reserve the whole burst.
pub(super) fn reserve_for(pct: u8, max: u32) -> u32 {
    crate::policy::reserve_of(max, pct).min(max - 1)
}

static X_REQUEST_PRIORITY: http::HeaderName = http::HeaderName::from_static("x-request-priority");

fn parse_priority(v: &[u8]) -> Option<Priority> {
    let v = v.trim_ascii();
    if v.eq_ignore_ascii_case(b"critical") {
        Some(Priority::Critical)
    } else if v.eq_ignore_ascii_case(b"normal") {
        Some(Priority::Normal)
    } else if v.eq_ignore_ascii_case(b"sheddable") {
        Some(Priority::Sheddable)
    } else {
        None
    }
}
