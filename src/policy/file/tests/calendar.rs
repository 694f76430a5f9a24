//! Calendar periods in the file: `period = "calendar"` on a cell or on one
//! limit, `[defaults] time_zone`, and their mistakes, each naming its entry.

use super::{err, parse};
use crate::policy::{Limit, Period};

const CALENDAR: &str = r#"
categories = ["read", "write", "training", "ai"]
[defaults]
time_zone = "Europe/London"
[tiers.free]
read = ["10/second", { limit = "1000/day", period = "calendar" }, "5000/week"]
training = { requests = "5/day", period = "calendar" }
ai = { requests = "50/hour", tokens = { limit = "2000000/month", period = "calendar" } }
write = "10/second"
"#;

fn calendar(s: &str) -> Limit {
    Limit::parse_calendar(s).unwrap()
}

#[test]
fn calendar_limits_mix_with_rolling_ones() {
    let p = parse(CALENDAR).unwrap();
    assert_eq!(p.calendar().name(), "Europe/London");
    let free = p.tier("free").unwrap();
    let read = p.limits(free, p.category("read").unwrap());
    assert_eq!(
        read.per_key(),
        [
            Limit::per_second(10),
            calendar("1000/day"),
            Limit::parse("5000/week").unwrap()
        ]
    );
    assert_eq!(read.per_key()[2].period(), Period::Rolling);
    let training = p.limits(free, p.category("training").unwrap());
    assert_eq!(training.per_key(), [calendar("5/day")]);
    assert_eq!(training.per_key()[0].period(), Period::CalendarDay);
    let ai = p.limits(free, p.category("ai").unwrap());
    assert_eq!(ai.per_key(), [Limit::per_hour(50)]);
    assert_eq!(ai.tokens()[0].period(), Period::CalendarMonth);
    // A cell's period applies to its tokens too; a limit's own overrides it.
    let p = parse(&CALENDAR.replace(
        "ai = { requests = \"50/hour\", tokens",
        "ai = { period = \"calendar\", requests = { limit = \"50/hour\", period = \"rolling\" }, tokens",
    ))
    .unwrap();
    let ai = p.limits(free, p.category("ai").unwrap());
    assert_eq!(ai.per_key()[0].period(), Period::Rolling);
    // UTC unless set; a rolling and a calendar day may share a list.
    let p = parse(
        &CALENDAR
            .replace("time_zone = \"Europe/London\"", "")
            .replace("\"5000/week\"", "\"1000/day\""),
    )
    .unwrap();
    assert_eq!(p.calendar().name(), "UTC");
}

#[test]
fn calendar_mistakes_name_their_entry() {
    let e = err(&CALENDAR.replace("\"Europe/London\"", "\"Europe/Atlantis\""));
    assert_eq!(
        (e.entry(), e.line()),
        ("defaults.time_zone", Some(4)),
        "{e}"
    );
    assert!(
        e.message().contains("unknown time zone `Europe/Atlantis`"),
        "{e}"
    );

    let e = err(&CALENDAR.replace("period = \"calendar\" }\nai", "period = \"monthly\" }\nai"));
    assert_eq!(
        (e.entry(), e.line()),
        ("tiers.free.training", Some(7)),
        "{e}"
    );
    assert!(e.message().contains("unknown period `monthly`"), "{e}");

    let e = err(&CALENDAR.replace("\"5/day\", period", "\"5/2h\", period"));
    assert_eq!(e.entry(), "tiers.free.training", "{e}");
    assert!(e.message().contains("one day, week or month") && e.message().contains("5/2h"));

    let e = err(&CALENDAR.replace("\"2000000/month\"", "\"2000000/30d\""));
    assert_eq!((e.entry(), e.line()), ("tiers.free.ai", Some(8)), "{e}");
    assert!(
        e.message().contains("tokens:") && e.message().contains("2000000/30d"),
        "{e}"
    );

    let e = err(&CALENDAR.replace(
        "{ limit = \"1000/day\", period",
        "{ limt = \"1000/day\", period",
    ));
    assert_eq!(e.entry(), "tiers.free.read", "{e}");
    assert!(e.message().contains("`limit` and `period`"), "{e}");

    let e = err(&CALENDAR.replace("period = \"calendar\" }\nai", "period = 7 }\nai"));
    assert!(e.message().contains("\"rolling\" or \"calendar\""), "{e}");

    // The same window counted the same way twice is refused.
    let e = err(&CALENDAR.replace(
        "\"5000/week\"",
        "{ limit = \"9/day\", period = \"calendar\" }",
    ));
    assert!(e.message().contains("same window"), "{e}");
}

#[test]
fn the_builder_refuses_an_unknown_time_zone() {
    let day = Limit::per_day(5).with_period(Period::CalendarDay).unwrap();
    let e = crate::Policy::builder()
        .categories(["read", "write"])
        .tier(crate::Tier::new("t").limit("read", day).limit("write", day))
        .time_zone("Nowhere/Special")
        .build()
        .unwrap_err();
    assert_eq!(e.entry(), "defaults.time_zone");
}

#[test]
fn a_custom_limit_may_be_a_calendar_limit() {
    let p = parse(&format!(
        "{CALENDAR}[keys]\n\"k1\" = \"free\"\n[custom_limits.\"k1\"]\ntraining = {{ limit = \"50/day\", period = \"calendar\" }}\n"
    ))
    .unwrap();
    let (free, training) = (p.tier("free").unwrap(), p.category("training").unwrap());
    let cell = p.cell(free, training).unwrap();
    let a = p.effective(cell, free, training, crate::key::KeyId::of("k1"), 0);
    assert_eq!(a.per_key.as_slice(), [calendar("50/day")]);
}
