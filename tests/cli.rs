//! The `tierlimit` command (feature `cli`): `check` on good and broken
//! policy files, `table` with custom limits and boosts in force now.
#![cfg(feature = "cli")]

use std::process::{Command, Output};

fn tierlimit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tierlimit"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A file in a fresh temporary directory.
fn file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tierlimit-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, contents).unwrap();
    path
}

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml");

#[test]
fn check_accepts_the_demo_policy() {
    let o = tierlimit(&["check", DEMO]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("valid (3 tiers, 4 categories, 3 keys)"),
        "{out}"
    );
}

#[test]
fn check_counts_organisations() {
    let policy = r#"
categories = ["read", "write"]
[tiers.pro]
read = "1000/hour"
write = "200/hour"
[tiers.pro.per_org]
write = "2000/hour"
[keys]
"acme-key-1" = { tier = "pro", account = "team-a", org = "acme" }
"acme-key-2" = { tier = "pro", account = "team-b", org = "acme" }
"globex-key" = { tier = "pro", org = "globex" }
"solo-key" = "pro"
"#;
    let path = file("orgs", policy);
    let o = tierlimit(&["check", path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(
            "valid (1 tiers, 2 categories, 4 keys, 2 organisations listed, per-organisation limits in 1 cells)"
        ),
        "{out}"
    );
}

#[test]
fn check_names_the_entry_and_line_of_the_first_error() {
    let demo = std::fs::read_to_string(DEMO).unwrap();
    for (name, broken, says) in [
        (
            "unit",
            demo.replacen("write = \"20/hour\"", "write = \"20/fortnight\"", 1),
            "tiers.free.write",
        ),
        (
            "tier",
            demo.replacen(
                "\"pro-demo-key\" = \"pro\"",
                "\"pro-demo-key\" = \"gold\"",
                1,
            ),
            "unknown tier `gold`",
        ),
        ("toml", format!("{demo}\n[tiers.free\n"), "line"),
    ] {
        let path = file(name, &broken);
        let o = tierlimit(&["check", path.to_str().unwrap()]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {out}{err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(err.contains("line"), "{name}: no line in {err}");
        // A key's text is never printed, even in a key's own error.
        assert!(!err.contains("pro-demo-key"), "{name}: {err}");
    }
    let o = tierlimit(&["check", "/nonexistent/policy.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("/nonexistent/policy.toml"));
    let o = tierlimit(&["lint", DEMO]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("usage"));
}

#[test]
fn table_shows_the_tiers_custom_limits_and_boosts_in_force_now() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let policy = format!(
        r#"
categories = ["read", "write", "ai"]
[tiers.free]
read = ["10/second", "100/hour"]
write = "20/hour"
ai = {{ requests = "50/hour", tokens = "1000/hour", input_tokens = "800/hour", output_tokens = "400/hour", concurrency = 2 }}
[tiers.pro]
read = "1000/hour"
write = "200/hour"
ai = "500/hour"
[tiers.pro.per_account]
write = "500/hour"
[tiers.pro.per_org]
write = "2000/hour"
[keys]
"secret-key-one" = "free"
"secret-key-two" = {{ tier = "pro", account = "acme" }}
[overrides."secret-key-one"]
write = "3/hour"
[[boosts]]
tier = "pro"
category = "ai"
adjust = "x2"
start = "{}"
end = "{}"
[[boosts]]
key = "secret-key-two"
category = "read"
adjust = "unlimited"
start = "2099-01-01T00:00:00Z"
end = "2099-01-02T00:00:00Z"
"#,
        now - 60,
        now + 3600
    );
    let path = file("table", &policy);
    let o = tierlimit(&["table", path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line = |start: &str| {
        out.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no `{start}` line:\n{out}"))
            .to_owned()
    };
    let free = line("free");
    assert!(free.contains("10/second + 100/hour"), "{out}");
    assert!(
        free.contains(
            "50/hour; tokens 1000/hour; input tokens 800/hour; output tokens 400/hour; 2 at once"
        ),
        "{out}"
    );
    let pro = line("pro");
    assert!(pro.contains("1000/hour"), "{out}");
    assert!(
        pro.contains("200/hour; account: 500/hour; org: 2000/hour"),
        "{out}"
    );
    // The tier boost active now doubles pro's ai (500 → 1000).
    let columns: Vec<&str> = pro.split("  ").filter(|c| !c.trim().is_empty()).collect();
    assert_eq!(columns.last().map(|c| c.trim()), Some("1000/hour"), "{out}");
    // The key's custom limit, its key redacted; the future boost is not in
    // force.
    assert!(
        out.contains("custom limits and key boosts in force now"),
        "{out}"
    );
    let custom: Vec<&str> = out.lines().filter(|l| l.starts_with("key:")).collect();
    assert_eq!(custom.len(), 1, "{out}");
    assert!(
        custom[0].contains("free") && custom[0].contains("write") && custom[0].contains("3/hour"),
        "{out}"
    );
    assert!(!out.contains("secret-key"), "{out}");
}

#[test]
fn check_refuses_hardened_cases_without_printing_a_key() {
    let demo = std::fs::read_to_string(DEMO).unwrap();
    let secret = "sk-live-cli-secret-0123";
    let keys = |lines: &str| demo.replacen("\n[keys]\n", &format!("\n[keys]\n{lines}"), 1);
    for (name, broken, says, line) in [
        (
            // A multi-line string whose line looks like a table header, then
            // a key listed twice.
            "multiline",
            keys(&format!(
                "\"note\" = \"\"\"\n[tiers.free]\n\"\"\"\n\"{secret}\" = \"free\"\n\"{secret}\" = \"pro\"\n"
            )),
            "duplicate key",
            5,
        ),
        (
            "acount",
            keys(&format!(
                "\"{secret}\" = {{ tier = \"pro\", acount = \"acme\" }}\n"
            )),
            "unknown field `acount`",
            1,
        ),
        (
            "multiplier",
            format!("{demo}\n[custom_limits.\"{secret}\"]\nread = \"x18446744073709551615\"\n"),
            "at most x1000",
            0,
        ),
    ] {
        assert_ne!(broken, demo, "{name}");
        let path = file(name, &broken);
        let o = tierlimit(&["check", path.to_str().unwrap()]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {out}{err}");
        assert!(err.contains(says), "{name}: {err}");
        let entry = if name == "multiplier" {
            "custom_limits.\"key:"
        } else {
            "keys.\"key:"
        };
        assert!(err.contains(entry), "{name}: {err}");
        let at = if line == 0 {
            broken.lines().count()
        } else {
            broken.lines().position(|l| l == "[keys]").unwrap() + 1 + line
        };
        assert!(
            err.contains(&format!("line {at}")),
            "{name}: line {at}? {err}"
        );
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{name}: {err}"
        );
    }
}

const CALENDAR: &str = r#"
categories = ["read", "write", "training", "ai"]
[defaults]
time_zone = "Europe/London"
[tiers.free]
read = ["10/second", "5000/week"]
write = "100/month"
training = { requests = "5/day", period = "calendar" }
ai = { requests = "50/hour", tokens = { limit = "2000000/month", period = "calendar" } }
"#;

#[test]
fn check_and_table_show_calendar_periods() {
    let path = file("calendar", CALENDAR);
    let o = tierlimit(&["check", path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("calendar periods in Europe/London"), "{out}");
    let o = tierlimit(&["table", path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("5/calendar day"), "{out}");
    assert!(out.contains("tokens 2000000/calendar month"), "{out}");
    assert!(out.contains("10/second + 5000/week"), "{out}");
    assert!(out.contains("100/month (30 days)"), "{out}");
    assert!(out.contains("reset at midnight in Europe/London"), "{out}");
    // A bad zone and a calendar window that is not a day, week or month.
    for (broken, says) in [
        (
            CALENDAR.replace("Europe/London", "Europe/Lodnon"),
            "defaults.time_zone",
        ),
        (
            CALENDAR.replace("\"5/day\", period", "\"5/12h\", period"),
            "tiers.free.training",
        ),
    ] {
        let path = file("calendar-broken", &broken);
        let o = tierlimit(&["check", path.to_str().unwrap()]);
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn check_shows_the_overload_table_and_refuses_a_bad_one_naming_it() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/overload.toml");
    let o = tierlimit(&["check", shipped]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(
            "sheds load: adaptive 8..256 in flight, target 40 ms; free at 0.5, pro at 0.8, enterprise at 1"
        ),
        "{out}"
    );
    let text_of = std::fs::read_to_string(shipped).unwrap();
    let path = file(
        "overload-broken",
        &text_of.replace("free = 0.5", "free = 1.5"),
    );
    let o = tierlimit(&["check", path.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("overload.shed_at.free"), "{err}");
}
