//! The loader's tests: what loads, and every error it names.

use super::*;
use crate::policy::{Limit, Policy, PolicyError, Pool, Rule};

mod calendar;
mod hardening;
mod io_tokens;

const GOOD: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = "100/hour"
write = "20/hour"

[tiers.pro]
read = "1000/hour"
write = "unlimited"

[[routes]]
method = ["POST", "PUT"]
path = "/v1/jobs"
category = "write"
cost = 5

[keys]
"k1" = "pro"
"#;

#[test]
fn grpc_rules_by_service_and_method() {
    let p = parse(&format!(
        "{GOOD}\n[[grpc]]\nservice = \"grpc.health.v1.Health\"\ncategory = \"read\"\n[[grpc]]\nservice = \"demo.v1.Jobs\"\nmethod = \"Submit\"\ncategory = \"write\"\ncost = 2\n"
    ))
    .unwrap();
    let read = p.category("read").unwrap();
    let write = p.category("write").unwrap();
    let post = http::Method::POST;
    use crate::policy::Target::Category;
    assert_eq!(
        p.classify(&post, "/grpc.health.v1.Health/Check"),
        Category {
            category: read,
            cost: 1
        }
    );
    assert_eq!(
        p.classify(&post, "/grpc.health.v1.Health/Watch"),
        Category {
            category: read,
            cost: 1
        }
    );
    assert_eq!(
        p.classify(&post, "/demo.v1.Jobs/Submit"),
        Category {
            category: write,
            cost: 2
        }
    );
    // Unmatched gRPC methods are POSTs: the default write category.
    assert_eq!(
        p.classify(&post, "/demo.v1.Jobs/List"),
        Category {
            category: write,
            cost: 1
        }
    );
}

#[test]
fn parses_in_file_order() {
    let p = parse(GOOD).unwrap();
    assert_eq!(p.tier("free").unwrap().index(), 0);
    assert_eq!(p.tier("pro").unwrap().index(), 1);
    assert_eq!(
        p.rule(p.tier("pro").unwrap(), p.category("write").unwrap()),
        Rule::Unlimited
    );
}

fn err(src: &str) -> PolicyError {
    parse(src).unwrap_err()
}

const LISTS: &str = r#"
categories = ["read", "write"]

[tiers.free]
read = ["10/second", "100/hour"]
write = { requests = "20/hour" }

[tiers.pro]
pool = "account"
read = "1000/hour"
write = "unlimited"

[tiers.pro.per_account]
write = ["5/second", "500/hour"]

[keys]
"k1" = "free"
"k2" = { tier = "pro", account = "acme" }
"#;

#[test]
fn lists_tables_pools_and_accounts() {
    let p = parse(LISTS).unwrap();
    let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
    let (read, write) = (p.category("read").unwrap(), p.category("write").unwrap());
    let l = p.limits(free, read);
    assert_eq!(l.per_key(), [Limit::per_second(10), Limit::per_hour(100)]);
    assert!(l.per_account().is_empty());
    assert_eq!(l.pool(), Pool::Key);
    assert_eq!(p.limits(free, write).per_key(), [Limit::per_hour(20)]);
    assert_eq!(p.rule(free, read), Rule::Limited(Limit::per_second(10)));
    let l = p.limits(pro, write);
    assert!(l.per_key().is_empty(), "unlimited per key");
    assert_eq!(
        l.per_account(),
        [Limit::per_second(5), Limit::per_hour(500)]
    );
    assert_eq!(l.pool(), Pool::Account);
    let k2 = crate::key::KeyId::of("k2");
    assert_eq!(
        p.key_entry("k2", k2),
        Some(
            crate::policy::ListedKey::new(pro)
                .in_account(Some(crate::key::KeyId::of_account("acme")))
        )
    );
    assert_eq!(
        p.key_entry("k1", crate::key::KeyId::of("k1")),
        Some(crate::policy::ListedKey::new(free))
    );
}

const TOKENS: &str = r#"
categories = ["read", "ai"]
[defaults]
write = "ai"
[tiers.free]
refund_on = ["5xx", "304"]
read = "100/hour"
ai = { requests = "50/hour", tokens = "1000/hour", refund_on = ["5xx"] }
[tiers.pro]
read = "1000/hour"
ai = { tokens = ["20000/minute", "500000/day"] }
[tiers.pro.per_account]
ai = { tokens = "1000000/day" }
[overrides."k1"]
ai = { tokens = "5000/hour" }
[[boosts]]
tier = "pro"
category = "ai"
adjust = "x2"
start = "2026-01-01T00:00:00Z"
end = "2027-01-01T00:00:00Z"
[keys]
"k1" = "free"
"k2" = "pro"
"#;

#[test]
fn tokens_and_refunds_by_category() {
    let p = parse(TOKENS).unwrap();
    let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
    let (read, ai) = (p.category("read").unwrap(), p.category("ai").unwrap());
    let l = p.limits(free, ai);
    assert_eq!(l.per_key(), [Limit::per_hour(50)]);
    assert_eq!(l.tokens(), [Limit::per_hour(1000)]);
    // The category's refund rule replaces the tier's.
    assert!(l.refund_on().matches(502) && !l.refund_on().matches(304));
    assert!(p.limits(free, read).refund_on().matches(304));
    let l = p.limits(pro, ai);
    assert!(l.per_key().is_empty(), "tokens only: requests unlimited");
    assert_eq!(l.tokens().len(), 2);
    assert_eq!(l.account_tokens(), [Limit::per_day(1_000_000)]);
}

#[test]
fn a_custom_limit_replaces_the_token_limits_only() {
    let p = parse(TOKENS).unwrap();
    let (free, ai) = (p.tier("free").unwrap(), p.category("ai").unwrap());
    let cell = p.cell(free, ai).unwrap();
    let k1 = crate::key::KeyId::of("k1");
    let a = p.effective(cell, free, ai, k1, 0);
    assert_eq!(a.per_key.as_slice(), [Limit::per_hour(50)]);
    assert_eq!(a.tokens.as_slice(), [Limit::per_hour(5000)]);
}

#[test]
fn a_boost_scales_token_limits_per_key_and_per_account() {
    let p = parse(TOKENS).unwrap();
    let (pro, ai) = (p.tier("pro").unwrap(), p.category("ai").unwrap());
    let cell = p.cell(pro, ai).unwrap();
    let k2 = crate::key::KeyId::of("k2");
    let a = p.effective(cell, pro, ai, k2, 1_790_000_000);
    assert_eq!(
        a.tokens.as_slice(),
        [Limit::per_minute(40_000), Limit::per_day(1_000_000)]
    );
    assert_eq!(a.account_tokens.as_slice(), [Limit::per_day(2_000_000)]);
}

#[test]
fn bad_token_refund_and_concurrency_cells_are_refused_by_name() {
    for (bad, message) in [
        ("ai = { tokens = \"unlimited\" }", "leave `tokens` out"),
        ("ai = { tokens = [] }", "empty list"),
        (
            "ai = { requests = \"5/hour\", refund_on = [\"6xx\"] }",
            "not a status",
        ),
        (
            "ai = { requests = \"5/hour\", refund_on = \"5xx\" }",
            "as a list",
        ),
        (
            "ai = { }",
            "needs `requests`, `tokens`, `input_tokens`, `output_tokens` or `concurrency`",
        ),
        (
            "ai = { requests = \"5/hour\", concurrency = 0 }",
            "from 1 to",
        ),
        (
            "ai = { requests = \"5/hour\", concurrency = -3 }",
            "from 1 to",
        ),
        (
            "ai = { requests = \"5/hour\", concurrency = 2.5 }",
            "from 1 to",
        ),
        (
            "ai = { requests = \"5/hour\", concurrency = \"2\" }",
            "from 1 to",
        ),
        (
            "ai = { requests = \"5/hour\", concurrency = 1000001 }",
            "from 1 to 1000000",
        ),
        (
            "ai = { requests = \"5/hour\", concurency = 2 }",
            "unknown field `concurency`",
        ),
    ] {
        let e = err(&TOKENS.replace(
            "ai = { requests = \"50/hour\", tokens = \"1000/hour\", refund_on = [\"5xx\"] }",
            bad,
        ));
        assert_eq!(e.entry(), "tiers.free.ai", "{bad}: {e}");
        assert!(e.message().contains(message), "{bad}: {e}");
    }
}

#[test]
fn bad_lists_and_accounts_are_refused_by_name() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "read = [\"10/second\", \"100/hour\"]",
            "read = []",
            "tiers.free.read",
            "empty list",
        ),
        (
            "read = [\"10/second\", \"100/hour\"]",
            "read = [\"10/second\", \"20/1s\"]",
            "tiers.free.read",
            "same window",
        ),
        (
            "read = [\"10/second\", \"100/hour\"]",
            "read = [\"1/1s\", \"2/2s\", \"3/3s\", \"4/4s\", \"5/5s\", \"6/6s\", \"7/7s\", \"8/8s\", \"9/9s\"]",
            "tiers.free.read",
            "more than 8",
        ),
        (
            "read = [\"10/second\", \"100/hour\"]",
            "read = [\"10/second\", 5]",
            "tiers.free.read",
            "a list such as",
        ),
        (
            "write = { requests = \"20/hour\" }",
            "write = { request = \"20/hour\" }",
            "tiers.free.write",
            "unknown field `request`",
        ),
        (
            "pool = \"account\"",
            "pool = \"org\"",
            "tiers.pro.pool",
            "unknown pool",
        ),
        (
            "write = [\"5/second\", \"500/hour\"]",
            "gpu = \"5/second\"",
            "tiers.pro.per_account.gpu",
            "unknown category",
        ),
        (
            "write = [\"5/second\", \"500/hour\"]",
            "write = \"unlimited\"",
            "tiers.pro.per_account.write",
            "cannot be unlimited",
        ),
        (
            "{ tier = \"pro\", account = \"acme\" }",
            "{ tier = \"pro\", account = \"\" }",
            "keys.",
            "an account",
        ),
    ];
    for (from, to, entry, message) in cases {
        let src = LISTS.replace(from, to);
        assert_ne!(src, LISTS, "{from}");
        let e = err(&src);
        assert!(e.entry().starts_with(entry), "{to}: {e}");
        assert!(e.message().contains(message), "{to}: {e}");
        assert!(e.line().is_some(), "{to}: {e}");
    }
}

#[test]
fn lists_bound_route_costs_reserves_and_custom_limits() {
    // A route cost above any limit of a list could never succeed.
    let e = err(&format!(
        "{LISTS}\n[[routes]]\npath = \"/bulk\"\ncategory = \"read\"\ncost = 11\n"
    ));
    assert!(e.message().contains("limit of 10"), "{e}");
    // So is a reserve that leaves a list's smallest burst nothing.
    let e = err(&LISTS.replace(
        "read = [\"10/second\", \"100/hour\"]",
        "read = [\"1/second\", \"100/hour\"]\npriority_reserve = \"10%\"",
    ));
    assert!(e.message().contains("limit of 1 "), "{e}");
    // A custom limit's list must fit beside the per-account limits.
    let e = err(&format!(
        "{LISTS}\n[overrides.\"k2\"]\nwrite = [\"1/1s\", \"2/2s\", \"3/3s\", \"4/4s\", \"5/5s\", \"6/6s\", \"7/7s\"]\n"
    ));
    assert!(e.message().contains("per-account"), "{e}");
    // Names a tier table reads itself cannot be categories.
    let e = err(&LISTS.replace("[\"read\", \"write\"]", "[\"read\", \"write\", \"pool\"]"));
    assert!(e.message().contains("reserved"), "{e}");
}

#[test]
fn concurrency_limits_per_key_and_per_account() {
    let p = Policy::from_toml_str(
        r#"
categories = ["read", "write", "ai"]
[tiers.free]
ai = { requests = "50/hour", concurrency = 2 }
read = { concurrency = 10 }
write = "1/hour"
[tiers.pro]
ai = "500/hour"
read = "1000/hour"
write = "1/hour"
[tiers.pro.per_account]
ai = { concurrency = 20 }
"#,
    )
    .unwrap();
    let (free, pro) = (p.tier("free").unwrap(), p.tier("pro").unwrap());
    let (read, ai) = (p.category("read").unwrap(), p.category("ai").unwrap());
    let l = p.limits(free, ai);
    assert_eq!((l.concurrency(), l.account_concurrency()), (Some(2), None));
    assert_eq!(l.per_key(), [Limit::per_hour(50)]);
    // Concurrency only: no rate limit, and never the unlimited path.
    let l = p.limits(free, read);
    assert_eq!((l.concurrency(), l.per_key()), (Some(10), &[][..]));
    assert!(!p.cell(free, read).unwrap().is_unlimited());
    assert!(p.cell(free, ai).unwrap().leased);
    let l = p.limits(pro, ai);
    assert_eq!((l.concurrency(), l.account_concurrency()), (None, Some(20)));
    assert!(p.limits(pro, read).concurrency().is_none());
    assert!(!p.cell(pro, read).unwrap().leased);
    // A custom limit cannot set concurrency.
    let e = err(r#"
categories = ["read", "write"]
[tiers.free]
read = "1/hour"
write = "1/hour"
[keys]
"k" = "free"
[overrides."k"]
read = { requests = "2/hour", concurrency = 3 }
"#);
    assert!(e.message().contains("cannot set `concurrency`"), "{e}");
    let e = err(r#"
categories = ["read", "write"]
[tiers.free]
read = "1/hour"
write = "1/hour"
[tiers.free.per_account]
raed = { concurrency = 3 }
"#);
    assert_eq!(e.entry(), "tiers.free.per_account.raed.concurrency", "{e}");
}

#[test]
fn errors_carry_entry_and_line() {
    let e = err(&GOOD.replace("write = \"20/hour\"", "write = \"0/hour\""));
    assert_eq!((e.entry(), e.line()), ("tiers.free.write", Some(6)));
    assert!(e.message().contains("at least 1"));

    let e = err(&GOOD.replace("category = \"write\"", "category = \"gpu\""));
    assert_eq!((e.entry(), e.line()), ("routes[0]", Some(12)));

    let e = err(&GOOD.replace("category = \"write\"\n", ""));
    assert!(e.message().contains("no category"), "{e}");

    let e = err(&GOOD.replace("\"k1\" = \"pro\"", "\"k1\" = \"gold\""));
    assert_eq!(e.line(), Some(19));
    assert!(e.message().contains("unknown tier `gold`"));

    // Duplicate tier: the TOML parser refuses it, with its line.
    let e = err(&format!("{GOOD}\n[tiers.free]\nread = \"1/h\"\n"));
    assert!(
        e.message().contains("duplicate") || e.message().contains("redefin"),
        "{e}"
    );
    assert!(e.line().is_some());

    let e = err(&format!(
        "{GOOD}\n[[grpc]]\nservice = \"a.B\"\ncategory = \"gpu\"\n"
    ));
    assert_eq!((e.entry(), e.line()), ("grpc[0]", Some(21)), "{e}");
    let e = err(&format!(
        "{GOOD}\n[[grpc]]\nservice = \"a.B/C\"\ncategory = \"read\"\n"
    ));
    assert_eq!(e.entry(), "grpc[0]");

    let e = err(&GOOD.replace("cost = 5", "cots = 5"));
    assert!(e.message().contains("unknown field"), "{e}");
    assert_eq!(e.line(), Some(16));

    let e = err(&GOOD.replace("[\"read\", \"write\"]", "[\"read\", \"write\", \"read\"]"));
    assert_eq!((e.entry(), e.line()), ("categories[2]", Some(2)));
}

#[test]
fn errors_never_print_a_key() {
    let secret = "sk-live-very-secret-key";
    let cases = [
        // A duplicate key (the TOML parser's own error).
        format!("{GOOD}\"{secret}\" = \"free\"\n\"{secret}\" = \"pro\"\n"),
        // A duplicate override table.
        format!(
            "{GOOD}\n[overrides.\"{secret}\"]\nread = \"x2\"\n[overrides.\"{secret}\"]\nread = \"x3\"\n"
        ),
        // An unknown tier, a bad override, a key no request can send.
        format!("{GOOD}\"{secret}\" = \"gold\"\n"),
        format!("{GOOD}\n[overrides.\"{secret}\"]\nread = \"lots\"\n"),
        format!("{GOOD}\"{secret} with spaces\" = \"pro\"\n"),
        format!(
            "{GOOD}\n[[boosts]]\nkey = \"{secret} x\"\nadjust = \"x2\"\nstart = \"1\"\nend = \"2\"\n"
        ),
        // A table the loader does not know (a typo of [keys]).
        format!("{GOOD}\n[kyes]\n\"{secret}\" = \"free\"\n\"{secret}\" = \"free\"\n"),
        // Inline at the top level, with a syntax error.
        format!("keys = {{ \"{secret}\" = \"free\", \"{secret}\" = \"free\" }}\n{GOOD}"),
        format!("{GOOD}\"{secret}\" = free\n"),
    ];
    for (i, src) in cases.iter().enumerate() {
        let e = err(src);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("very-secret"), "case {i}: {shown}");
        assert!(e.line().is_some(), "case {i}: {shown}");
    }
}

#[test]
fn policies_at_the_edges_are_refused() {
    let cases: [(&str, &str, &str); 8] = [
        (
            "read = \"100/hour\"",
            "read = \"1/18446744073709ms\"",
            "tiers.free.read",
        ),
        (
            "read = \"100/hour\"",
            "read = \"2000000/1s\"",
            "tiers.free.read",
        ),
        (
            "read = \"100/hour\"",
            "read = \"1/hour\"\npriority_reserve = \"1%\"",
            "tiers.free.priority_reserve",
        ),
        ("\"k1\" = \"pro\"", "\"pro demo key\" = \"pro\"", "keys."),
        ("\"k1\" = \"pro\"", "\"clé\" = \"pro\"", "keys."),
        ("\"k1\" = \"pro\"", "\"\" = \"pro\"", "keys."),
        ("cost = 5", "cost = 4294967296", "expected u32"),
        ("cost = 5", "cost = 21", "routes[0]"),
    ];
    for (from, to, entry) in cases {
        let src = GOOD.replace(from, to);
        assert_ne!(src, GOOD);
        let e = err(&src);
        assert!(
            e.entry().starts_with(entry) || e.to_string().contains(entry),
            "{to}: {e}"
        );
        assert!(e.line().is_some(), "{to}: {e}");
    }
    let long = "k".repeat(300);
    let e = err(&GOOD.replace("\"k1\"", &format!("\"{long}\"")));
    assert!(e.message().contains("too long"), "{e}");
    assert!(!e.to_string().contains(&long));
    for date in ["2026-02-31", "2026-04-31", "2027-02-29"] {
        let src = format!(
            "{GOOD}\n[[boosts]]\ntier = \"pro\"\nadjust = \"x2\"\nstart = \"{date}T00:00:00Z\"\nend = \"2030-01-01T00:00:00Z\"\n"
        );
        let e = err(&src);
        assert_eq!(e.entry(), "boosts[0]", "{e}");
    }
    let src = format!(
        "{GOOD}\n[[boosts]]\ntier = \"pro\"\nadjust = \"x2\"\nstart = \"999999999-01-01T00:00:00Z\"\nend = \"999999999\"\n"
    );
    assert_eq!(err(&src).entry(), "boosts[0]");
}

#[test]
fn each_cell_carries_its_own_tiers_reserve() {
    // The request path reads a tier's reserve from the cell it has in
    // hand: every cell of a tier, and only of that tier, carries it.
    let p = Policy::from_toml_str(
        r#"
categories = ["read", "write", "ai"]
[tiers.free]
read = "10/second"
write = "10/second"
ai = "10/second"
[tiers.pro]
read = "100/second"
write = "100/second"
ai = "100/second"
priority_reserve = "20%"
[tiers.team]
read = "100/second"
write = "100/second"
ai = "100/second"
priority_reserve = "5%"
"#,
    )
    .unwrap();
    for (tier, pct) in [("free", 0), ("pro", 20), ("team", 5)] {
        let t = p.tier(tier).unwrap();
        assert_eq!(p.priority_reserve(t), pct, "{tier}");
        for category in ["read", "write", "ai"] {
            let c = p.category(category).unwrap();
            assert_eq!(p.cell(t, c).unwrap().reserve, pct, "{tier}.{category}");
        }
    }
}
