//! The values of a policy file: limits, cells (`{ requests = …, tokens =
//! … }`), refund rules and adjustments (custom limits, boosts), from the
//! file's TOML or the admin API's JSON.

use super::super::{Adjust, Limit, RefundOn, Rule};

/// A custom limit as written: `"x5"`, `"500/hour"`, `"unlimited"`, or a
/// list of limits (plain or as `{ requests = … }`).
pub(super) fn parse_adjust(v: &toml::Value) -> Result<Adjust, String> {
    match v {
        toml::Value::String(s) => Adjust::parse(s),
        toml::Value::Table(_) => {
            let spec = parse_cell(v)?;
            if spec.refund.is_some() {
                return Err("a custom limit cannot set `refund_on`; set it on the tier".into());
            }
            if spec.concurrency.is_some() {
                return Err(
                    "a custom limit or boost cannot set `concurrency`; set it on the tier".into(),
                );
            }
            if spec.input_tokens.is_some() || spec.output_tokens.is_some() {
                return Err(
                    "a custom limit or boost cannot set `input_tokens` or `output_tokens`; set them on the tier (a multiplier such as \"x2\" scales them)"
                        .into(),
                );
            }
            if spec.requests.is_none() && spec.tokens.is_none() {
                return Err("a custom limit needs `requests` or `tokens`".into());
            }
            Ok(Adjust::Table {
                requests: spec.requests.map(Option::unwrap_or_default),
                tokens: spec.tokens,
            })
        }
        other => match parse_limits(other, false)? {
            Some(limits) => Ok(Adjust::SetAll(limits)),
            None => Ok(Adjust::Set(Rule::Unlimited)),
        },
    }
}

/// A custom limit or a boost's adjustment as JSON (the admin API): the
/// same forms as in the file — `"x5"`, `"500/hour"`, `"unlimited"`, a list
/// of limits, or `{ "requests": …, "tokens": … }`.
pub(crate) fn parse_adjust_json(v: &serde_json::Value) -> Result<Adjust, String> {
    fn to_toml(v: &serde_json::Value) -> Result<toml::Value, String> {
        use serde_json::Value as J;
        Ok(match v {
            J::String(s) => toml::Value::String(s.clone()),
            J::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => return Err(format!("{n} is not a whole number")),
            },
            J::Array(items) => {
                toml::Value::Array(items.iter().map(to_toml).collect::<Result<_, _>>()?)
            }
            J::Object(map) => toml::Value::Table(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), to_toml(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            J::Bool(_) | J::Null => return Err(HOW.to_owned()),
        })
    }
    parse_adjust(&to_toml(v)?)
}

const HOW: &str = "write a limit such as \"100/hour\", a list such as [\"10/second\", \"100/hour\"], or \"unlimited\"";

const HOW_ONE: &str =
    "write a limit such as \"100/hour\" or { limit = \"5/day\", period = \"calendar\" }";

/// Limits as written: `"100/hour"`, `"unlimited"`,
/// `["10/second", "100/hour"]` or `{ limit = "5/day", period = "calendar" }`
/// (`None`: unlimited). `calendar`: the cell's `period` is `"calendar"`,
/// which a limit's own `period` overrides.
fn parse_limits(v: &toml::Value, calendar: bool) -> Result<Option<Vec<Limit>>, String> {
    use toml::Value;
    match v {
        Value::String(s) if s.trim().eq_ignore_ascii_case("unlimited") => Ok(None),
        Value::String(_) | Value::Table(_) => Ok(Some(vec![parse_limit(v, calendar)?])),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(format!("an empty list; {HOW}"));
            }
            items
                .iter()
                .map(|i| parse_limit(i, calendar))
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        _ => Err(HOW.to_owned()),
    }
}

/// One limit: `"100/hour"` or `{ limit = "5/day", period = "calendar" }`.
fn parse_limit(v: &toml::Value, calendar: bool) -> Result<Limit, String> {
    use toml::Value;
    let (text, calendar) = match v {
        Value::String(s) => (s.as_str(), calendar),
        Value::Table(t) => {
            if t.keys().any(|k| k != "limit" && k != "period") {
                return Err(format!(
                    "a limit's table has `limit` and `period` only; {HOW_ONE}"
                ));
            }
            let text = t
                .get("limit")
                .and_then(Value::as_str)
                .ok_or_else(|| HOW_ONE.to_owned())?;
            let calendar = match t.get("period") {
                Some(p) => parse_period(p)?,
                None => calendar,
            };
            (text, calendar)
        }
        _ => return Err(HOW.to_owned()),
    };
    if calendar {
        Limit::parse_calendar(text)
    } else {
        Limit::parse(text)
    }
}

/// `period = "rolling"` (the default) or `"calendar"`: whether it is.
fn parse_period(v: &toml::Value) -> Result<bool, String> {
    match v.as_str().map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("calendar") => Ok(true),
        Some(p) if p.eq_ignore_ascii_case("rolling") => Ok(false),
        Some(p) => Err(format!(
            "unknown period `{p}` (expected \"rolling\" or \"calendar\")"
        )),
        None => Err("write period as \"rolling\" or \"calendar\"".to_owned()),
    }
}

/// A cell as written: limits (`"100/hour"`, a list) or the table form
/// `{ requests = …, tokens = …, refund_on = […] }`.
#[derive(Default)]
pub(super) struct CellSpec {
    /// `None`: not given; `Some(None)`: unlimited.
    pub(super) requests: Option<Option<Vec<Limit>>>,
    pub(super) tokens: Option<Vec<Limit>>,
    /// Input-token limits (`input_tokens`).
    pub(super) input_tokens: Option<Vec<Limit>>,
    /// Output-token limits (`output_tokens`).
    pub(super) output_tokens: Option<Vec<Limit>>,
    pub(super) refund: Option<RefundOn>,
    /// Requests in flight at once.
    pub(super) concurrency: Option<u32>,
}

pub(super) fn parse_cell(v: &toml::Value) -> Result<CellSpec, String> {
    use toml::Value;
    let Value::Table(t) = v else {
        return Ok(CellSpec {
            requests: Some(parse_limits(v, false)?),
            ..CellSpec::default()
        });
    };
    const FIELDS: [&str; 7] = [
        "requests",
        "tokens",
        "input_tokens",
        "output_tokens",
        "refund_on",
        "concurrency",
        "period",
    ];
    if let Some(k) = t.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        // A lone limit's table (`{ limit = "5/day", period = "calendar" }`).
        if k == "limit" {
            return Ok(CellSpec {
                requests: Some(parse_limits(v, false)?),
                ..CellSpec::default()
            });
        }
        // Named only when it is a typo of one (`concurency`): the field
        // may be an API key written in the wrong place.
        if FIELDS.iter().any(|f| super::sections::near(k, f)) {
            return Err(format!("unknown field `{k}` (expected {EXPECTED})"));
        }
        return Err(format!("an unknown field (expected {EXPECTED})"));
    }
    let calendar = t
        .get("period")
        .map(parse_period)
        .transpose()?
        .unwrap_or(false);
    let mut spec = CellSpec::default();
    if let Some(r) = t.get("requests") {
        spec.requests = Some(match r {
            Value::String(_) | Value::Array(_) | Value::Table(_) => parse_limits(r, calendar)?,
            _ => return Err(HOW.to_owned()),
        });
    }
    spec.tokens = token_limits(t, "tokens", calendar)?;
    spec.input_tokens = token_limits(t, "input_tokens", calendar)?;
    spec.output_tokens = token_limits(t, "output_tokens", calendar)?;
    if let Some(r) = t.get("refund_on") {
        spec.refund = Some(parse_refund(r)?);
    }
    if let Some(c) = t.get("concurrency") {
        let how = || {
            format!(
                "concurrency: write the number of requests that may be in flight at once, from 1 to {}",
                crate::policy::MAX_CONCURRENCY
            )
        };
        let n = c.as_integer().ok_or_else(how)?;
        let n = u32::try_from(n)
            .ok()
            .filter(|n| (1..=crate::policy::MAX_CONCURRENCY).contains(n))
            .ok_or_else(how)?;
        spec.concurrency = Some(n);
    }
    if spec.requests.is_none()
        && spec.tokens.is_none()
        && spec.input_tokens.is_none()
        && spec.output_tokens.is_none()
        && spec.concurrency.is_none()
    {
        return Err(
            "a table of limits needs `requests`, `tokens`, `input_tokens`, `output_tokens` or `concurrency`"
                .to_owned(),
        );
    }
    Ok(spec)
}

/// The fields a cell's table may have, as an error lists them.
const EXPECTED: &str =
    "`requests`, `tokens`, `input_tokens`, `output_tokens`, `concurrency`, `refund_on` or `period`";

/// A cell's token limits of one kind (`tokens`, `input_tokens`,
/// `output_tokens`), if given: the same forms as `requests`, but never
/// unlimited.
fn token_limits(
    t: &toml::Table,
    field: &str,
    calendar: bool,
) -> Result<Option<Vec<Limit>>, String> {
    let Some(v) = t.get(field) else {
        return Ok(None);
    };
    match parse_limits(v, calendar).map_err(|m| format!("{field}: {m}"))? {
        Some(limits) => Ok(Some(limits)),
        None => Err(format!(
            "{field}: leave `{field}` out rather than \"unlimited\""
        )),
    }
}

/// `refund_on = ["5xx", "304"]`.
pub(super) fn parse_refund(v: &toml::Value) -> Result<RefundOn, String> {
    let how = "write refund_on as a list such as [\"5xx\", \"304\"]";
    let items = v.as_array().ok_or(how)?;
    let items: Vec<&str> = items
        .iter()
        .map(|i| i.as_str().ok_or(how))
        .collect::<Result<_, _>>()?;
    RefundOn::parse(items)
}
