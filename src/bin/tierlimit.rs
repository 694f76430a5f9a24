//! `tierlimit`: checks a policy file before it is deployed, and prints the
//! table it gives (feature `cli`).
//!
//! ```sh
//! tierlimit check policy.toml    # exit 0 if valid; else 1, with the entry and line
//! tierlimit table policy.toml    # tiers × categories, custom limits and boosts in force now
//! tierlimit rls --policy policy.toml --listen 127.0.0.1:8081 [--redis URL]
//!                                # Envoy's rate limit service (feature `envoy`)
//! ```

use std::process::ExitCode;

use tierlimit::policy::{EffectiveLimits, Period};
use tierlimit::{Limit, Policy, key::KeyId};

#[cfg(feature = "envoy")]
#[path = "tierlimit/rls.rs"]
mod rls;

#[cfg(not(feature = "envoy"))]
const USAGE: &str = "usage: tierlimit check POLICY.toml | tierlimit table POLICY.toml";
#[cfg(feature = "envoy")]
const USAGE: &str = concat!(
    "usage: tierlimit check POLICY.toml | tierlimit table POLICY.toml | ",
    "tierlimit rls --policy POLICY.toml --listen ADDR [--redis URL]"
);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    #[cfg(feature = "envoy")]
    if args.first().is_some_and(|c| c == "rls") {
        return match rls::Options::parse(&args[1..]) {
            Err(e) => {
                eprintln!("tierlimit rls: {e}\nusage: {}", rls::USAGE);
                ExitCode::from(2)
            }
            Ok(options) => match rls::run(options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // The error's own words (a policy error names the entry and line).
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        };
    }
    let (command, path) = match args.as_slice() {
        [c, p] if c == "check" || c == "table" => (c.as_str(), p.as_str()),
        [h] if h == "-h" || h == "--help" || h == "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let policy = match Policy::from_toml_file(path) {
        Ok(p) => p,
        Err(e) => {
            // The error names the entry and, from a file, its line.
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        "check" => {
            println!(
                "{path}: valid ({} tiers, {} categories, {} keys{}{}{})",
                policy.tiers().len(),
                policy.categories().len(),
                policy.listed_keys().count(),
                org_note(&policy),
                calendar_note(&policy),
                overload_note(&policy)
            );
        }
        _ => {
            print!("{}", table(&policy, unix_now()));
            if has_calendar(&policy) {
                println!(
                    "\ncalendar periods reset at midnight in {} (weeks on Monday)",
                    policy.calendar().name()
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// `, sheds load (...)` when the policy has an `[overload]` table: the
/// capacity and where each tier is shed.
fn overload_note(policy: &Policy) -> String {
    use tierlimit::policy::Capacity;
    let Some(rules) = policy.overload() else {
        return String::new();
    };
    let capacity = match rules.capacity() {
        Capacity::Fixed(n) => format!("{n} in flight"),
        Capacity::Adaptive => {
            let (min, max, _) = rules.bounds();
            format!(
                "adaptive {min}..{max} in flight, target {} ms",
                rules.target_latency().as_millis()
            )
        }
    };
    let tiers: Vec<String> = policy
        .tiers()
        .map(|t| format!("{} at {}", policy.tier_name(t), rules.shed_fraction(t)))
        .collect();
    format!(", sheds load: {capacity}; {}", tiers.join(", "))
}

/// `, N organisations listed, per-organisation limits in M cells` when the
/// policy has organisations.
fn org_note(policy: &Policy) -> String {
    let orgs: std::collections::HashSet<_> =
        policy.listed_keys().filter_map(|(_, e)| e.org).collect();
    let cells = policy
        .tiers()
        .flat_map(|t| policy.categories().map(move |c| (t, c)))
        .filter(|&(t, c)| !policy.limits(t, c).per_org().is_empty())
        .count();
    if orgs.is_empty() && cells == 0 {
        return String::new();
    }
    format!(
        ", {} organisations listed, per-organisation limits in {cells} cells",
        orgs.len()
    )
}

/// `, calendar periods in ZONE` when the policy has any.
fn calendar_note(policy: &Policy) -> String {
    if has_calendar(policy) {
        format!(", calendar periods in {}", policy.calendar().name())
    } else {
        String::new()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A limit as the policy file writes it (`100/hour`; a calendar period's
/// `5/calendar day`).
fn limit_text(l: &Limit) -> String {
    let unit = match (l.period(), l.per().as_secs()) {
        (Period::CalendarDay, _) => "calendar day".to_owned(),
        (Period::CalendarWeek, _) => "calendar week".to_owned(),
        (Period::CalendarMonth, _) => "calendar month".to_owned(),
        _ if l.per().subsec_nanos() != 0 => format!("{}ms", l.per().as_millis()),
        (_, 1) => "second".to_owned(),
        (_, 60) => "minute".to_owned(),
        (_, 3600) => "hour".to_owned(),
        (_, 86_400) => "day".to_owned(),
        (_, 604_800) => "week".to_owned(),
        (_, 2_592_000) => "month (30 days)".to_owned(),
        _ => format!("{}ms", l.per().as_millis()),
    };
    format!("{}/{unit}", l.max())
}

/// Whether any cell of the policy has a calendar limit.
fn has_calendar(policy: &Policy) -> bool {
    policy.tiers().any(|t| {
        policy.categories().any(|c| {
            let l = policy.limits(t, c);
            [
                l.per_key(),
                l.per_account(),
                l.per_org(),
                l.tokens(),
                l.account_tokens(),
                l.input_tokens(),
                l.output_tokens(),
                l.account_input_tokens(),
                l.account_output_tokens(),
            ]
            .iter()
            .any(|list| list.iter().any(|l| l.period().is_calendar()))
        })
    })
}

fn list(limits: &[Limit]) -> String {
    limits
        .iter()
        .map(limit_text)
        .collect::<Vec<_>>()
        .join(" + ")
}

/// One cell's text: its request limits (or `unlimited`), then tokens,
/// concurrency and per-account limits.
fn cell_text(e: &EffectiveLimits) -> String {
    let mut parts = vec![if e.per_key.is_empty() {
        "unlimited".to_owned()
    } else {
        list(&e.per_key)
    }];
    for (what, limits) in [
        ("tokens", &e.tokens),
        ("input tokens", &e.input_tokens),
        ("output tokens", &e.output_tokens),
    ] {
        if !limits.is_empty() {
            parts.push(format!("{what} {}", list(limits)));
        }
    }
    if let Some(n) = e.concurrency {
        parts.push(format!("{n} at once"));
    }
    let mut account = Vec::new();
    if !e.per_account.is_empty() {
        account.push(list(&e.per_account));
    }
    for (what, limits) in [
        ("tokens", &e.account_tokens),
        ("input tokens", &e.account_input_tokens),
        ("output tokens", &e.account_output_tokens),
    ] {
        if !limits.is_empty() {
            account.push(format!("{what} {}", list(limits)));
        }
    }
    if let Some(n) = e.account_concurrency {
        account.push(format!("{n} at once"));
    }
    if !account.is_empty() {
        parts.push(format!("account: {}", account.join(", ")));
    }
    if !e.per_org.is_empty() {
        parts.push(format!("org: {}", list(&e.per_org)));
    }
    parts.join("; ")
}

/// The effective table at `now`: tiers × categories (tier-wide boosts
/// active now applied), then every listed key whose limits differ from its
/// tier's (custom limits, key boosts), its key redacted.
fn table(policy: &Policy, now: u64) -> String {
    // A key no boost or custom limit names: its tier's limits.
    let nobody = KeyId::from_raw(0x9e37_79b9_7f4a_7c15);
    let categories: Vec<_> = policy.categories().collect();
    let mut rows = vec![
        std::iter::once("tier".to_owned())
            .chain(
                categories
                    .iter()
                    .map(|&c| policy.category_name(c).to_owned()),
            )
            .collect::<Vec<_>>(),
    ];
    for tier in policy.tiers() {
        let mut row = vec![policy.tier_name(tier).to_owned()];
        for &c in &categories {
            let e = policy
                .effective_limits(tier, c, nobody, now)
                .expect("ids from this policy");
            row.push(cell_text(&e));
        }
        rows.push(row);
    }
    let mut out = render(&rows);
    let mut keys: Vec<_> = policy.listed_keys().collect();
    keys.sort_by_key(|(k, _)| *k);
    let mut custom = vec![vec![
        "key".to_owned(),
        "tier".to_owned(),
        "category".to_owned(),
        "limits now".to_owned(),
    ]];
    for (key, entry) in keys {
        let (id, tier) = (KeyId::of(key), entry.tier);
        for &c in &categories {
            let theirs = policy.effective_limits(tier, c, id, now);
            let tiers = policy.effective_limits(tier, c, nobody, now);
            if let Some(e) = theirs.filter(|e| Some(e) != tiers.as_ref()) {
                custom.push(vec![
                    id.redacted().to_string(),
                    policy.tier_name(tier).to_owned(),
                    policy.category_name(c).to_owned(),
                    cell_text(&e),
                ]);
            }
        }
    }
    if custom.len() > 1 {
        out.push_str("\ncustom limits and key boosts in force now:\n");
        out.push_str(&render(&custom));
    }
    out
}

/// Rows as aligned columns.
fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
