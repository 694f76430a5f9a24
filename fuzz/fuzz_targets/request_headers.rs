//! `cargo +nightly fuzz run request_headers`: the property `request_headers` of
//! `tests/fuzz_props`, which `tests/fuzz_replay.rs` also runs on stable.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/fuzz_props/mod.rs"]
mod fuzz_props;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_props::request_headers(data));
