//! `cargo +nightly fuzz run client_hints`: the property `client_hints` of
//! `tests/fuzz_props`, which `tests/fuzz_replay.rs` also runs on stable.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_props/mod.rs"]
mod fuzz_props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::client_hints(data));
