//! Shared helpers of the simulator's tests.
#![allow(dead_code)]

use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::{FaultKind, FaultRates, FaultSpec, Report, Scenario};

/// The seed from `SIM_SEED`, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The number of runs from `SIM_RUNS`, else `default`.
pub fn runs(default: u64) -> u64 {
    std::env::var("SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small, fault-free fleet: faults are added by each test.
pub fn quiet(protocol: Protocol, processes: usize, duration: Duration) -> Scenario {
    Scenario {
        protocol,
        processes,
        duration,
        warmup: Duration::from_secs(10),
        fault_rates: FaultRates::default(),
        ..Scenario::default()
    }
}

/// `kind` on the holder at each of `times` (seconds).
pub fn on_holder(kind: FaultKind, times: &[u64]) -> Vec<FaultSpec> {
    times
        .iter()
        .map(|t| FaultSpec {
            at: Duration::from_secs(*t),
            kind,
            process: None,
        })
        .collect()
}

/// Runs and panics with the seed and a reproduction command on a checker failure.
pub fn run_ok(scenario: &Scenario, seed: u64) -> Report {
    match pgiplock_sim::run(scenario, seed) {
        Ok(r) => r,
        Err(e) => panic!(
            "seed {seed}: {e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
            scenario.to_cli_args()
        ),
    }
}

/// The failover latencies of `kind`: (count, max seconds).
pub fn failover(report: &Report, kind: FaultKind) -> (usize, f64) {
    report
        .failover
        .get(kind.as_str())
        .map_or((0, 0.0), |s| (s.count, s.max_s))
}
