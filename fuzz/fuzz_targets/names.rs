//! libFuzzer entry point: name validation, identifier quoting and lock-channel payloads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgiplock_fuzz::names(data));
