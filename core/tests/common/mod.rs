//! Shared helpers of the core's tests: short timings and output filters.
#![allow(dead_code)]

use std::time::Duration;

use pgiplock_core::*;

/// The channel the tests' locks compete for.
pub const CHANNEL: &str = "jobs";

/// A config with short timings for tests.
pub fn fast_config(protocol: Protocol) -> LockConfig {
    let mut c = LockConfig::new(protocol);
    c.acquire_interval = Duration::from_secs(3);
    c.lease_ttl = Duration::from_secs(2);
    c.renew_interval = Duration::from_millis(400);
    c.fence_margin = Duration::from_millis(300);
    c.request_timeout = Duration::from_secs(1);
    c.wake_jitter = Duration::from_millis(10);
    c.shutdown_timeout = Duration::from_secs(1);
    c.marker_wait = Duration::from_millis(200);
    if protocol == Protocol::Classic {
        c.renew_interval = Duration::from_secs(1);
    }
    c
}

/// [`fast_config`] with the drain marker committed before the release
/// (`drain_in_release` off), the two-step handover earlier versions speak.
pub fn two_step_config(protocol: Protocol) -> LockConfig {
    let mut c = fast_config(protocol);
    c.drain_in_release = false;
    c
}

/// Drains all outputs of a lock.
pub fn drain(lock: &mut Lock) -> Vec<Output> {
    let mut out = Vec::new();
    while let Some(o) = lock.poll_output() {
        out.push(o);
    }
    out
}

/// The only request among `outputs`.
pub fn request(outputs: &[Output]) -> DbRequest {
    let reqs: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Request(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reqs.len(), 1, "expected one request in {outputs:?}");
    reqs[0].clone()
}

/// Events among `outputs`.
pub fn events(outputs: &[Output]) -> Vec<LockEvent> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// Payloads delivered as replays among `outputs`.
pub fn replayed(outputs: &[Output]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Deliver { payload, replay: true } => Some(payload.clone()),
            _ => None,
        })
        .collect()
}

/// Delivered payloads among `outputs`.
pub fn delivered(outputs: &[Output]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Deliver { payload, .. } => Some(payload.clone()),
            _ => None,
        })
        .collect()
}
