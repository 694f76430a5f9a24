//! The fuzz targets' properties (`tests/common/fuzz_props.rs`), replayed on
//! stable: the seed corpus in `fuzz/corpus/` and random inputs shaped like
//! the targets' (proptest). `cargo fuzz` explores further where a nightly
//! toolchain exists (`fuzz/README.md`).

#[allow(dead_code)]
mod fuzz_props;

#[cfg(feature = "client")]
use fuzz_props::client_hints;
use fuzz_props::{policy_loader, request_headers};
use proptest::prelude::*;

/// Every file of a target's seed corpus.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn seed_corpora_replay() {
    for seed in corpus("policy_loader") {
        policy_loader(&seed);
    }
    for seed in corpus("request_headers") {
        request_headers(&seed);
    }
    #[cfg(feature = "client")]
    for seed in corpus("client_hints") {
        client_hints(&seed);
    }
}

/// TOML-ish text built from the policy file's own vocabulary.
fn policy_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("categories = [\"read\", \"write\"]\n".to_owned()),
        Just("[tiers.free]\n".to_owned()),
        Just("[tiers.pro]\n".to_owned()),
        Just("[keys]\n".to_owned()),
        Just("[[boosts]]\n".to_owned()),
        Just("[[routes]]\n".to_owned()),
        Just("[defaults]\n".to_owned()),
        Just("[overrides.\"sk-live-0123456789\"]\n".to_owned()),
        Just("[keys]\n\"sk-live-0123456789\" = \"free\"\n".to_owned()),
        Just("priority_reserve = \"99%\"\n".to_owned()),
        Just("start = \"2026-02-31T00:00:00Z\"\n".to_owned()),
        Just("end = \"999999999\"\n".to_owned()),
        Just("cost = 4294967295\n".to_owned()),
        "(read|write|ai|path|category|tier|adjust) = \"[0-9a-z/*%x.-]{0,16}\"\n",
        "[ -~]{0,24}\n",
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

/// Header-shaped bytes: a flag byte, then values split by 0xff.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(b"Bearer listed-key".to_vec()),
        Just(b"listed-key".to_vec()),
        Just(b"sk-K3Y-unknown-0123".to_vec()),
        "Bearer [!-~]{0,8}K3Y[!-~]{0,300}".prop_map(String::into_bytes),
        Just(b"critical".to_vec()),
        Just(b"4294967295".to_vec()),
        Just(b"0".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
        "[ -~]{0,300}".prop_map(String::into_bytes),
    ];
    (any::<u8>(), prop::collection::vec(value, 0..6)).prop_map(|(flags, values)| {
        let mut out = vec![flags];
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                out.push(0xff);
            }
            out.extend(v.into_iter().filter(|&b| b != 0xff));
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn policy_loader_on_policy_like_text(text in policy_text()) {
        policy_loader(text.as_bytes());
    }

    #[test]
    fn policy_loader_on_any_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        policy_loader(&data);
    }

    #[test]
    fn request_headers_on_hostile_heads(data in header_bytes()) {
        request_headers(&data);
    }

    #[cfg(feature = "client")]
    #[test]
    fn client_hints_on_hostile_answers(data in header_bytes()) {
        client_hints(&data);
    }
}
