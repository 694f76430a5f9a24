//! The fuzz targets' properties (`tests/common/fuzz_props.rs`), replayed on
//! stable: the seed corpus in `fuzz/corpus/` and random inputs shaped like
//! the targets' (proptest). `cargo fuzz` explores further where a nightly
//! toolchain exists (`fuzz/README.md`).

#[allow(dead_code)]
mod fuzz_props;

#[cfg(feature = "client")]
use fuzz_props::client_hints;
use fuzz_props::{SECRET_KEY, policy_loader, request_headers, written_only_as_a_key};
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
        Just("adjust = \"x18446744073709551615\"\n".to_owned()),
        Just("key = \"sk-live-0123456789\"\n".to_owned()),
        Just("[keys.\"sk-live-0123456789\"]\n".to_owned()),
        key_entry(),
        key_entry(),
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

/// A line of `[keys]` as the loader must survive it: the secret key, plain
/// or as a table (inline, dotted, with a typo), and other keys whose values
/// are multi-line strings (basic and literal) holding lines that look like
/// table headers (`[tiers.free]`, `[[routes]]`).
fn key_entry() -> BoxedStrategy<String> {
    let header = r"\[{1,2}(tiers|routes|grpc|defaults|keys|overrides)(\.[a-z]{1,5})?\]{1,2}";
    let key = SECRET_KEY;
    prop_oneof![
        Just(format!("\"{key}\" = \"free\"\n")),
        Just(format!("\"{key}\" = \"pro\"\n")),
        Just(format!("{key} = \"free\"\n")),
        Just(format!(
            "'{key}' = {{ tier = \"pro\", account = \"acme\" }}\n"
        )),
        Just(format!(
            "\"{key}\" = {{ tier = \"pro\", acount = \"acme\" }}\n"
        )),
        Just(format!("\"{key}\".tier = \"free\"\n")),
        Just(format!("\"{key}\".acount = \"acme\"\n")),
        Just(format!("\"{key}\" = free\n")),
        rx(format!(
            "\"[a-z]{{1,4}}\" = \"\"\"\n{header}\n[a-z =\"]{{0,8}}\n\"\"\"\n"
        )),
        rx(format!(
            "[a-z]{{1,4}} = '''\n{header}\n[a-z =\"]{{0,8}}\n'''\n"
        )),
        rx(format!(
            "[a-z]{{1,4}} = \\{{ tier = \"\"\"\n{header}\n\"\"\" \\}}\n"
        )),
        rx(format!(
            r"[a-z]{{1,4}}\.(tier|account) = '''{}{header}{}'''{}",
            "\n", "\n", "\n"
        )),
    ]
    .boxed()
}

/// The strings a regular expression matches.
fn rx(pattern: String) -> BoxedStrategy<String> {
    proptest::string::string_regex(&pattern).unwrap().boxed()
}

/// A policy whose `[keys]` mixes the secret key with multi-line strings,
/// inline tables and dotted keys, then maybe more sections: the key only
/// ever stands where a key belongs.
fn keys_text() -> impl Strategy<Value = String> {
    let tail = prop_oneof![
        Just(String::new()),
        Just("[tiers.extra]\nread = \"1/s\"\nwrite = \"1/s\"\n".to_owned()),
        Just(format!(
            "[overrides.\"{SECRET_KEY}\"]\nread = \"x18446744073709551615\"\n"
        )),
        Just(format!(
            "[[boosts]]\nkey = \"{SECRET_KEY}\"\nadjust = \"x2\"\nstart = \"1\"\nend = \"2\"\n"
        )),
    ];
    (prop::collection::vec(key_entry(), 1..8), tail).prop_map(|(entries, tail)| {
        format!(
            "categories = [\"read\", \"write\"]\n[tiers.free]\nread = \"1/s\"\nwrite = \"1/s\"\n[tiers.pro]\nread = \"2/s\"\nwrite = \"2/s\"\n[keys]\n{}{tail}",
            entries.concat()
        )
    })
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
    fn policy_loader_never_prints_a_key_among_multi_line_strings(text in keys_text()) {
        // The property checks texts whose key stands only where keys
        // belong; a generated text whose strings swallow it (an unclosed
        // multi-line string before it) is another case, not this one.
        prop_assume!(!text.contains(SECRET_KEY) || written_only_as_a_key(&text, SECRET_KEY));
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

/// The seeds that write the key only where keys belong (`keys_*`,
/// `override_*`) are ones the property checks: a change that made the
/// property skip them would fail here.
#[test]
fn key_seeds_are_checked_by_the_property() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/policy_loader");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("keys_") || name.starts_with("override_") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(written_only_as_a_key(&text, SECRET_KEY), "{name}");
            assert!(tierlimit::Policy::from_toml_str(&text).is_err(), "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked}");
}

/// A value left unfinished in a section that never holds a key (an inline
/// table or array, which TOML lets run on over lines, a multi-line string,
/// a header left open) takes in the lines after it. Whatever key it takes
/// in, in whatever form, no error names it. (The property above cannot
/// see these: it reads the key where TOML's lexer puts it, inside the
/// value.) Every opener before every form of a key.
#[test]
fn no_unfinished_value_names_a_key_it_takes_in() {
    let openers = [
        "tiers = { free = ",
        "tiers = { free = { read = ",
        "[tiers.free]\nread = { requests = ",
        "[tiers.free]\nread = [ ",
        "categories = [ { a = ",
        "[defaults]\nread = { a = ",
        "[shadow]\nall = [ { a = ",
        "[tiers.'']\nfree = { read = ",
        "tiers.\"\".\"\"= { free = ",
        "[tiers.x]\n'''",
        "[tiers.x]\n\"\"\"",
        "[tiers.free",
        "[tiers.free]\nread = \"\"\"",
        "[tiers.free]\nread = '''",
    ];
    let key = SECRET_KEY;
    let forms = [
        format!("[keys]\n\"{key}\" = \"free\""),
        format!("[keys]\n'{key}' = \"pro\""),
        format!("[keys]\n{key} = \"free\""),
        format!("[keys]\n\"{key}\".tier = \"free\""),
        format!("[keys]\n\"{key}\" = {{ tier = \"pro\" }}"),
        format!("keys.\"{key}\" = \"pro\""),
        format!("[keys.\"{key}\"]\ntier = \"pro\""),
        format!("[overrides.\"{key}\"]\nread = \"1/s\""),
        format!("[custom_limits.\"{key}\"]\nread = \"x2\""),
    ];
    for opener in openers {
        for form in &forms {
            for end in ["\n", "\n'''\n", "\n\"\"\"\n", "\n}\n", "\n]\n"] {
                let text = format!("categories = [\"read\"]\n{opener}\n{form}{end}");
                if let Err(e) = tierlimit::Policy::from_toml_str(&text) {
                    let shown = format!("{e} {e:?}");
                    assert!(!shown.contains(key), "{text:?}: {shown}");
                }
            }
        }
    }
}
