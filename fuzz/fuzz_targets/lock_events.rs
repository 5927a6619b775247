//! libFuzzer entry point: a sequence of `(delta, input)` into one lock, invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgiplock_fuzz::lock_events(data));
