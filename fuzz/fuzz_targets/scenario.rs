//! libFuzzer entry point: whole scenarios through the simulator and its checkers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgiplock_fuzz::scenario(data));
