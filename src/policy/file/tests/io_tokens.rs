//! Input and output token limits in a policy file: the forms `tokens`
//! takes, per key and per account, and every mistake refused by name.

use super::*;
use crate::policy::Period;

const IO: &str = r#"
categories = ["read", "ai"]
[defaults]
write = "ai"

[tiers.free]
read = "100/hour"
ai = { requests = "50/hour", input_tokens = "2000/hour", output_tokens = ["10/second", "500/hour"] }

[tiers.pro]
pool = "account"
read = "1000/hour"
ai = { requests = "500/hour", tokens = "100000/day", output_tokens = { limit = "100000/month", period = "calendar" } }

[tiers.pro.per_account]
ai = { input_tokens = "50000/hour", output_tokens = "20000/hour" }

[[boosts]]
tier = "pro"
category = "ai"
adjust = "x2"
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
"#;

#[test]
fn input_and_output_tokens_take_every_form_tokens_takes() {
    let p = parse(IO).unwrap();
    let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
    let ai = p.category("ai").unwrap();
    let l = p.limits(free, ai);
    assert_eq!(l.per_key(), [Limit::per_hour(50)]);
    assert!(l.tokens().is_empty());
    assert_eq!(l.input_tokens(), [Limit::per_hour(2000)]);
    assert_eq!(
        l.output_tokens(),
        [Limit::per_second(10), Limit::per_hour(500)]
    );
    assert!(l.account_input_tokens().is_empty() && l.account_output_tokens().is_empty());
    let l = p.limits(pro, ai);
    assert_eq!(l.tokens(), [Limit::per_day(100_000)]);
    assert!(l.input_tokens().is_empty());
    assert_eq!(l.output_tokens()[0].period(), Period::CalendarMonth);
    assert_eq!(l.account_input_tokens(), [Limit::per_hour(50_000)]);
    assert_eq!(l.account_output_tokens(), [Limit::per_hour(20_000)]);
    // A cell with input or output limits only is metered all the same.
    assert!(p.cell(free, ai).unwrap().metered);
}

#[test]
fn a_boost_scales_input_and_output_token_limits() {
    let p = parse(IO).unwrap();
    let (pro, ai) = (p.tier("pro").unwrap(), p.category("ai").unwrap());
    let k = crate::key::KeyId::of("k");
    let e = p.effective_limits(pro, ai, k, 1_790_000_000).unwrap();
    assert_eq!(e.account_input_tokens, [Limit::per_hour(100_000)]);
    assert_eq!(e.account_output_tokens, [Limit::per_hour(40_000)]);
    assert_eq!(e.output_tokens[0].max(), 200_000);
    // Before the boost: the tier's.
    let e = p.effective_limits(pro, ai, k, 0).unwrap();
    assert_eq!(e.account_input_tokens, [Limit::per_hour(50_000)]);
}

#[test]
fn bad_input_and_output_token_entries_are_refused_by_name() {
    let free_ai = "ai = { requests = \"50/hour\", input_tokens = \"2000/hour\", output_tokens = [\"10/second\", \"500/hour\"] }";
    for (bad, message) in [
        (
            "ai = { input_tokens = \"unlimited\" }",
            "input_tokens: leave `input_tokens` out",
        ),
        (
            "ai = { output_tokens = [] }",
            "output_tokens: an empty list",
        ),
        ("ai = { output_tokens = \"5/fortnight\" }", "output_tokens:"),
        ("ai = { output_tokens = 5 }", "output_tokens:"),
        (
            "ai = { input_tokens = { limit = \"5/day\", period = \"monthly\" } }",
            "input_tokens: unknown period",
        ),
        (
            "ai = { requests = \"5/hour\", input_token = \"5/hour\" }",
            "unknown field `input_token`",
        ),
        (
            "ai = { requests = [\"1/second\", \"2/minute\", \"3/hour\"], tokens = [\"1/second\", \"2/minute\"], input_tokens = [\"1/second\", \"2/minute\"], output_tokens = [\"1/second\", \"2/minute\"] }",
            "more than 8 limits",
        ),
    ] {
        let e = err(&IO.replace(free_ai, bad));
        let entry = if message.contains("more than") {
            "tiers.free.ai.output_tokens"
        } else {
            "tiers.free.ai"
        };
        assert_eq!(e.entry(), entry, "{bad}: {e}");
        assert!(e.message().contains(message), "{bad}: {e}");
        assert!(e.line().is_some(), "{bad}: {e}");
    }
    // Per account, the entry names the per-account table.
    let e = err(&IO.replace(
        "ai = { input_tokens = \"50000/hour\", output_tokens = \"20000/hour\" }",
        "ai = { output_tokens = \"0/hour\" }",
    ));
    assert_eq!(e.entry(), "tiers.pro.per_account.ai", "{e}");
    // A custom limit cannot replace them (a multiplier scales them).
    let e = err(&format!(
        "{IO}\n[overrides.\"k1\"]\nai = {{ output_tokens = \"5/hour\" }}\n[keys]\n\"k1\" = \"free\"\n"
    ));
    assert!(
        e.message()
            .contains("cannot set `input_tokens` or `output_tokens`"),
        "{e}"
    );
}

#[test]
fn the_builder_names_input_and_output_entries() {
    use crate::policy::Tier;
    let build = |tier: Tier| {
        Policy::builder()
            .categories(["read", "write", "ai"])
            .tier(
                tier.limit("ai", Limit::per_hour(5))
                    .unlimited("read")
                    .unlimited("write"),
            )
            .build()
    };
    let p = build(
        Tier::new("free")
            .input_tokens("ai", [Limit::per_hour(100)])
            .per_account_output_tokens("ai", [Limit::per_hour(50)]),
    )
    .unwrap();
    let l = p.limits(p.tier("free").unwrap(), p.category("ai").unwrap());
    assert_eq!(l.input_tokens(), [Limit::per_hour(100)]);
    assert_eq!(l.account_output_tokens(), [Limit::per_hour(50)]);
    let e = build(
        Tier::new("free")
            .output_tokens("ai", [Limit::per_hour(100)])
            .output_tokens("ai", [Limit::per_hour(10)]),
    )
    .unwrap_err();
    assert_eq!(e.entry(), "tiers.free.ai.output_tokens", "{e}");
    assert!(e.message().contains("output tokens twice"), "{e}");
    let e = build(Tier::new("free").input_tokens("nope", [Limit::per_hour(1)])).unwrap_err();
    assert_eq!(e.entry(), "tiers.free.nope.input_tokens", "{e}");
}
