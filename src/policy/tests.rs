//! The policy's own tests: building, classifying, errors, the key table.

use super::*;

fn base() -> PolicyBuilder {
    Policy::builder().categories(["read", "write"]).tier(
        Tier::new("free")
            .limit("read", Limit::per_hour(100))
            .limit("write", Limit::per_hour(20)),
    )
}

#[test]
fn builds_and_classifies() {
    let p = base()
        .route(Route::new("/v1/w/*", "write").method("get"))
        .route(Route::exempt("/healthz"))
        .build()
        .unwrap();
    let read = p.category("read").unwrap();
    let write = p.category("write").unwrap();
    assert_eq!(
        p.classify(&Method::GET, "/x"),
        Target::Category {
            category: read,
            cost: 1
        }
    );
    assert_eq!(
        p.classify(&Method::HEAD, "/x"),
        Target::Category {
            category: read,
            cost: 1
        }
    );
    assert_eq!(
        p.classify(&Method::DELETE, "/x"),
        Target::Category {
            category: write,
            cost: 1
        }
    );
    assert_eq!(
        p.classify(&Method::GET, "/v1/w/a"),
        Target::Category {
            category: write,
            cost: 1
        }
    );
    assert_eq!(p.classify(&Method::GET, "/healthz"), Target::Exempt);
}

/// The request path's classification reads the path only when a route
/// needs it: never under a policy without routes, once under one with.
#[test]
fn classifies_reading_the_path_only_for_routes() {
    let calls = std::cell::Cell::new(0);
    let path = || {
        calls.set(calls.get() + 1);
        "/healthz"
    };
    let plain = base().build().unwrap();
    let read = plain.category("read").unwrap();
    assert_eq!(
        plain.classify_lazily(&Method::GET, path),
        Target::Category {
            category: read,
            cost: 1
        }
    );
    assert_eq!(calls.get(), 0);

    let routed = base().route(Route::exempt("/healthz")).build().unwrap();
    assert_eq!(routed.classify_lazily(&Method::GET, path), Target::Exempt);
    assert_eq!(calls.get(), 1);
}

#[test]
fn errors_name_the_entry() {
    let e = base().tier(Tier::new("free")).build().unwrap_err();
    assert_eq!(e.entry(), "tiers.free");
    assert!(e.message().contains("declared twice"));

    let e = base()
        .tier(Tier::new("pro").limit("read", Limit::per_hour(1)))
        .build()
        .unwrap_err();
    assert_eq!(e.entry(), "tiers.pro");
    assert!(e.message().contains("no rule for category `write`"));

    let e = base()
        .tier(Tier::new("pro").limit("gpu", Limit::per_hour(1)))
        .build()
        .unwrap_err();
    assert_eq!(e.entry(), "tiers.pro.gpu");

    let e = base().route(Route::new("/a", "nope")).build().unwrap_err();
    assert_eq!(e.entry(), "routes[0]");
    assert!(e.message().contains("unknown category `nope`"));

    let e = base()
        .route(Route::new("/a", "write").cost(21))
        .build()
        .unwrap_err();
    assert!(e.message().contains("could never succeed"), "{e}");

    let e = base().key("k", "gold").build().unwrap_err();
    assert!(e.message().contains("unknown tier `gold`"));
    assert!(!e.to_string().contains("\"k\""), "never print the key: {e}");

    let e = base()
        .key("k", "free")
        .key("k", "free")
        .build()
        .unwrap_err();
    assert!(e.message().contains("twice"));

    let e = base()
        .unknown_keys(KeyRule::Tier("gold".into()))
        .build()
        .unwrap_err();
    assert_eq!(e.entry(), "defaults.unknown_key");

    let e = Policy::builder()
        .categories(["a", "a"])
        .build()
        .unwrap_err();
    assert_eq!(e.entry(), "categories[1]");
}

#[test]
fn an_unreadable_file_keeps_its_io_error() {
    use std::error::Error;
    let e = Policy::from_toml_file("/nonexistent/tierlimit/policy.toml").unwrap_err();
    let io = e
        .source()
        .expect("the cause")
        .downcast_ref::<std::io::Error>();
    assert_eq!(
        io.map(std::io::Error::kind),
        Some(std::io::ErrorKind::NotFound)
    );
    assert!(e.to_string().contains("cannot read the policy file"));
}

#[test]
fn key_table_compares_full_text() {
    let p = base().key("alpha", "free").build().unwrap();
    let free = p.tier("free");
    assert_eq!(p.key_tier("alpha", KeyId::of("alpha")), free);
    assert_eq!(p.key_tier("beta", KeyId::of("beta")), None);
    // A forged id cannot borrow another key's tier.
    assert_eq!(p.key_tier("beta", KeyId::of("alpha")), None);
}

/// The base policy with `keys` listed in tier `free`.
fn listing(keys: &[String]) -> Policy {
    keys.iter()
        .fold(base(), |b, k| b.key(k.as_str(), "free"))
        .build()
        .unwrap()
}

#[test]
fn keys_kept_in_the_row_and_on_the_heap_compare_their_whole_text() {
    // Around the longest key kept in a table row: each one finds its own
    // tier, and neither its prefix nor a longer key does.
    use super::keys::INLINE_KEY;
    let keys: Vec<String> = [1, INLINE_KEY - 1, INLINE_KEY, INLINE_KEY + 1, 256]
        .iter()
        .map(|&n| "k".repeat(n - 1) + "x")
        .collect();
    let p = listing(&keys);
    let free = p.tier("free");
    for k in &keys {
        assert_eq!(p.key_tier(k, KeyId::of(k)), free, "{} bytes", k.len());
        let shorter = &k[..k.len() - 1];
        assert_eq!(p.key_tier(shorter, KeyId::of(k)), None);
        let longer = format!("{k}y");
        assert_eq!(p.key_tier(&longer, KeyId::of(k)), None);
        let changed = format!("{}y", &k[..k.len() - 1]);
        assert_eq!(p.key_tier(&changed, KeyId::of(k)), None);
    }
    let mut listed: Vec<&str> = p.listed_keys().map(|(k, _)| k).collect();
    listed.sort_unstable();
    let mut want: Vec<&str> = keys.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(listed, want);
}

#[test]
fn a_full_key_table_finds_every_key_and_no_other() {
    // Many keys, so that probe runs wrap around the table's end.
    let keys: Vec<String> = (0..2_000).map(|i| format!("key-{i:05}")).collect();
    let p = listing(&keys);
    let free = p.tier("free");
    for k in &keys {
        assert_eq!(p.key_tier(k, KeyId::of(k)), free);
    }
    for i in 2_000..4_000 {
        let k = format!("key-{i:05}");
        assert_eq!(p.key_tier(&k, KeyId::of(&k)), None);
    }
    assert_eq!(p.listed_keys().count(), keys.len());
    // No key listed at all: nothing is found.
    let empty = base().build().unwrap();
    assert_eq!(empty.key_tier("key-00000", KeyId::of("key-00000")), None);
    assert_eq!(empty.listed_keys().count(), 0);
}
