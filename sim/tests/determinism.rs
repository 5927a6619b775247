//! Same seed and scenario: same trace and byte-identical output; another seed: another trace.

mod common;

use std::process::Command;
use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::explore::{run_checked, swarm_scenario};
use pgiplock_sim::{FaultRates, Scenario};

fn scenario(protocol: Protocol) -> Scenario {
    Scenario {
        protocol,
        processes: 5,
        duration: Duration::from_secs(1800),
        fault_rates: FaultRates {
            stop: 10.0,
            crash: 10.0,
            cut: 10.0,
            terminate: 10.0,
            server_restart: 2.0,
            ..FaultRates::default()
        },
        cut_duration: Duration::from_secs(60),
        ..Scenario::default()
    }
}

#[test]
fn same_seed_same_report_and_trace() {
    let seed = common::seed(11);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = scenario(protocol);
        let a = common::run_ok(&s, seed);
        let b = common::run_ok(&s, seed);
        assert_eq!(a, b, "seed {seed}");
        assert_eq!(a.table(), b.table());
        // run_checked runs twice itself and compares.
        run_checked(&s, seed, true).unwrap();
    }
}

#[test]
fn different_seeds_differ() {
    let s = scenario(Protocol::Lease);
    let a = common::run_ok(&s, 1);
    let b = common::run_ok(&s, 2);
    assert_ne!(a.trace_hash, b.trace_hash);
    assert_ne!(swarm_scenario(1), swarm_scenario(2));
}

/// Runs the simulator's command line twice with `args`; both outputs must be the same bytes.
fn run_twice(args: &[&str]) -> String {
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
            .args(args)
            .env_remove("SIM_SEED")
            .output()
            .unwrap()
    };
    let a = run();
    let b = run();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    String::from_utf8(a.stdout).unwrap()
}

#[test]
fn cli_output_is_byte_identical_and_starts_with_the_seed() {
    let text = run_twice(&[
        "run",
        "--seed",
        "5",
        "--processes",
        "4",
        "--duration",
        "20m",
        "--cut-rate",
        "10",
        "--json",
    ]);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("seed=5 scenario: protocol=lease processes=4"),
        "{first}"
    );
    let json = text.lines().last().unwrap();
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(value["seed"], 5);
}

#[test]
fn connection_faults_give_byte_identical_output() {
    let text = run_twice(&[
        "run",
        "--seed",
        "9",
        "--processes",
        "4",
        "--duration",
        "20m",
        "--channels",
        "2",
        "--connect-hang-rate",
        "20",
        "--connect-blip-rate",
        "20",
        "--setup-reply-loss-rate",
        "20",
        "--schema-drop-rate",
        "6",
        "--read-only-rate",
        "6",
        "--json",
    ]);
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("connect_hang:20/h") && first.contains("read_only:6/h"),
        "{first}"
    );
    let mut s = Scenario {
        processes: 4,
        channels: 2,
        duration: Duration::from_secs(1200),
        ..Scenario::default()
    };
    s.fault_rates.connect_hang = 20.0;
    s.fault_rates.schema_drop = 6.0;
    run_checked(&s, 9, true).unwrap();
}
