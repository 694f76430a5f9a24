//! The loader's defences: no error prints an API key, whatever the file
//! writes around it; typos in a key's, a custom limit's or a boost's table
//! are refused by name; multipliers too large to apply are refused.

use super::super::super::operator::Adjust;
use super::{GOOD, err, parse};
use crate::policy::Policy;
use crate::policy::file::parse_adjust_json;

/// A multi-line string in `[keys]` whose lines look like table headers
/// must not move the error out of `[keys]`.
#[test]
fn errors_never_print_a_key_after_a_multi_line_string() {
    let secret = "sk-live-very-secret-key";
    let dup = format!("\"{secret}\" = \"free\"\n\"{secret}\" = \"pro\"\n");
    let cases = [
        format!("{GOOD}\"note\" = \"\"\"\n[tiers.free]\n\"\"\"\n{dup}"),
        format!("{GOOD}\"note\" = '''\n[[routes]]\n'''\n{dup}"),
        format!("{GOOD}\"note\" = {{ tier = \"\"\"\n[tiers.pro]\n\"\"\" }}\n{dup}"),
        format!("{GOOD}\"a\".tier = \"\"\"\n[defaults]\n\"\"\"\n{dup}"),
        format!("{GOOD}\"note\" = \"\"\"\n[tiers.free]\n\"\"\"\n\"{secret}\" = free\n"),
    ];
    for (i, src) in cases.iter().enumerate() {
        let e = err(src);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("very-secret"), "case {i}: {shown}");
        assert!(e.entry().starts_with("keys"), "case {i}: {shown}");
        let line = src.lines().position(|l| l.contains(secret)).unwrap() + 1;
        let line = if i == 4 { line } else { line + 1 };
        assert_eq!(e.line(), Some(line), "case {i}: {shown}");
    }
}

/// A typo in a key's table, a custom limit's table or a boost is
/// refused, naming the field and the entry but not the key.
#[test]
fn unknown_fields_of_keys_custom_limits_and_boosts_are_refused() {
    let secret = "sk-live-very-secret-key";
    let boost = "[[boosts]]\ntier = \"pro\"\nadjust = \"x2\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2027-01-01T00:00:00Z\"\n";
    let cases = [
        (
            format!("{GOOD}\"{secret}\" = {{ tier = \"pro\", acount = \"acme\" }}\n"),
            "keys.",
            "acount",
        ),
        (
            format!("{GOOD}\"{secret}\".tier = \"pro\"\n\"{secret}\".acount = \"acme\"\n"),
            "keys.",
            "acount",
        ),
        (
            format!("{GOOD}\n[keys.\"{secret}\"]\ntier = \"pro\"\nacount = \"acme\"\n"),
            "keys.",
            "acount",
        ),
        (
            format!(
                "{GOOD}\n[overrides.\"{secret}\"]\nread = {{ requests = \"2/hour\", tokns = \"5/hour\" }}\n"
            ),
            "custom_limits.",
            "tokns",
        ),
        (
            format!("{GOOD}\n{boost}catgory = \"read\"\n"),
            "boosts[0]",
            "catgory",
        ),
        (
            format!("{GOOD}\n{boost}").replace(
                "adjust = \"x2\"",
                "adjust = { requests = \"5/hour\", tokns = \"9/hour\" }",
            ),
            "boosts[0]",
            "tokns",
        ),
    ];
    for (i, (src, entry, field)) in cases.iter().enumerate() {
        let e = err(src);
        let shown = format!("{e} {e:?}");
        assert!(e.entry().starts_with(entry), "case {i}: {shown}");
        assert!(e.message().contains(field), "case {i}: {shown}");
        assert!(e.line().is_some(), "case {i}: {shown}");
        assert!(!shown.contains("very-secret"), "case {i}: {shown}");
    }
    // The same tables, spelled right, load.
    parse(&format!(
        "{GOOD}\"k2\".tier = \"pro\"\n\"k2\".account = \"acme\"\n"
    ))
    .unwrap();
}

/// A multiplier beyond [`Adjust::MAX_SCALE`] is refused, not capped.
#[test]
fn multipliers_that_overflow_are_refused() {
    for adjust in ["x18446744073709551615", "x1e300", "x4294967296", "x1001"] {
        let e = err(&format!(
            "{GOOD}\n[overrides.\"k1\"]\nread = \"{adjust}\"\n"
        ));
        assert!(e.entry().starts_with("custom_limits."), "{adjust}: {e}");
        assert!(e.message().contains("at most x1000"), "{adjust}: {e}");
        let e = err(&format!(
            "{GOOD}\n[[boosts]]\ntier = \"pro\"\nadjust = \"{adjust}\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2027-01-01T00:00:00Z\"\n"
        ));
        assert_eq!(e.entry(), "boosts[0]", "{adjust}: {e}");
        assert!(e.message().contains("at most x1000"), "{adjust}: {e}");
        let json = serde_json::Value::String(adjust.to_owned());
        assert!(
            parse_adjust_json(&json)
                .unwrap_err()
                .contains("at most x1000")
        );
    }
    parse(&format!("{GOOD}\n[overrides.\"k1\"]\nread = \"x1000\"\n")).unwrap();
}

#[test]
fn a_multiplier_built_in_code_is_held_to_the_same_maximum() {
    for k in [1001.0, f64::INFINITY, f64::NAN, 0.0] {
        let e = parse(GOOD)
            .unwrap()
            .to_builder()
            .custom_limit("k1", "read", Adjust::Scale(k))
            .build()
            .unwrap_err();
        assert!(e.message().contains("at most x1000"), "{k}: {e}");
    }
}

#[test]
fn custom_limits_are_read_under_their_name_and_their_earlier_one() {
    for section in ["custom_limits", "overrides"] {
        let src = format!("{GOOD}\n[{section}.\"k-custom\"]\nread = \"3/hour\"\n");
        let p = Policy::from_toml_str(&src).unwrap_or_else(|e| panic!("[{section}]: {e}"));
        let (tier, read) = (p.tier("pro").unwrap(), p.category("read").unwrap());
        let rule = p.effective_rule(tier, read, crate::key::KeyId::of("k-custom"), 0);
        assert_eq!(rule.to_string(), "3 per hour", "[{section}]");
    }
    // Both at once: one table of custom limits, so a duplicate.
    let src = format!(
        "{GOOD}\n[custom_limits.\"a\"]\nread = \"3/hour\"\n[overrides.\"b\"]\nread = \"3/hour\"\n"
    );
    assert!(Policy::from_toml_str(&src).is_err());
}
