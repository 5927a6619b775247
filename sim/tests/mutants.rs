//! The property checks bite: deliberately broken processes and configurations, run through the
//! property-testing API, give a counterexample every time, with the expected failing check, and
//! the replay of the shrunk scenario (in process and through the printed command) fails the
//! same way. The same settings without the break pass.
//!
//! - a holder that skips self-fencing ([`Mutant::SkipFence`]): S2;
//! - a fence margin below the declared clock drift (a configuration, no mutant): S2;
//! - a standby that delivers before confirming ([`Mutant::StandbyDelivers`]): S3.
//!
//! `PGIPLOCK_CHECK_SEED` (default 1) sets the first seed of every search.

use std::process::Command;
use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::check::{Counterexample, Spec};
use pgiplock_sim::{FaultKind, Mutant, Scenario, SimError};

/// The first seed: `PGIPLOCK_CHECK_SEED`, else 1.
fn first_seed() -> u64 {
    std::env::var("PGIPLOCK_CHECK_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1)
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A Lease fleet with short timings and silent disconnects of the holder (where fencing
/// matters), crashes and graceful stops.
fn fleet() -> Spec {
    let mut spec = Spec::new(Protocol::Lease);
    spec.processes = 3..=6;
    spec.acquire_interval = s(1)..=s(5);
    spec.lease_ttl = s(3)..=s(10);
    spec.publish_rate = 1.0..=5.0;
    spec.duration = s(300)..=s(600);
    spec.fault_rates.insert(FaultKind::Cut, 10.0..=30.0);
    spec.fault_rates.insert(FaultKind::Crash, 0.0..=20.0);
    spec.fault_rates.insert(FaultKind::Stop, 0.0..=20.0);
    spec.fault_rates.insert(FaultKind::Terminate, 0.0..=5.0);
    spec
}

/// The settings must fail `checker` within `cases` cases; the counterexample's replays fail the
/// same way.
fn expect_counterexample(spec: &Spec, cases: u64, checker: &str) -> Counterexample {
    let c = match spec.check(cases, first_seed()) {
        Err(e) => match e.counterexample() {
            Some(c) => c.clone(),
            None => panic!("expected a counterexample, got {e}"),
        },
        Ok(summary) => panic!("expected {checker} to fail, every check passed:\n{summary}"),
    };
    assert_eq!(c.checker, checker, "{c}");
    // Shrunk within the ranges, never beyond them.
    assert!(spec.processes.contains(&c.scenario.processes), "{c}");
    assert!(c.scenario.processes <= c.original.processes && c.scenario.duration <= c.original.duration);
    // In process.
    match c.replay() {
        Err(SimError::Check(f)) => assert_eq!((f.checker, f.at), (c.checker, c.at), "{c}"),
        other => panic!("the replay of {c} gave {other:?}"),
    }
    // The printed command, through the binary.
    let command = c.command();
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
        .args(&args)
        .env_remove("SIM_SEED")
        .env_remove("SIM_CHECK_DETERMINISM")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{command} passed");
    let expected = format!("checker {} failed at {}", c.checker, c.at);
    assert!(stderr.contains(&expected), "{command}: {stderr}");
    c
}

#[test]
fn a_holder_that_skips_self_fencing_is_caught() {
    let mut spec = fleet();
    spec.base.mutant = Some(Mutant::SkipFence);
    let c = expect_counterexample(&spec, 10, "S2");
    assert!(c.command().contains("--mutant skip-fence"), "{c}");
}

#[test]
fn a_fence_margin_below_the_drift_is_caught() {
    let mut spec = fleet();
    // Clocks up to 30-50 % slow, while a 100-300 ms margin on a 3-10 s lease covers 1-10 %.
    spec.drift = 0.3..=0.5;
    spec.fence_margin = Some(ms(100)..=ms(300));
    let c = expect_counterexample(&spec, 20, "S2");
    assert!(c.scenario.drift > c.scenario.drift_bound(), "{c}");
    assert!(!c.command().contains("--mutant"), "{c}");
}

#[test]
fn a_standby_that_delivers_before_confirming_is_caught() {
    let mut spec = fleet();
    spec.base.mutant = Some(Mutant::StandbyDelivers);
    let c = expect_counterexample(&spec, 3, "S3");
    assert!(c.command().contains("--mutant standby-delivers"), "{c}");
    // Nothing but the mutant is needed: the shrink dropped every fault kind it could.
    assert_eq!(c.scenario.fault_rates.cut, 10.0, "{c}");
    assert_eq!(c.scenario.fault_rates.crash, 0.0, "{c}");
}

/// With stand-downs drawn into the cases the mutant is still caught, and the shrink drops the
/// stand-downs it does not need (all of them: the mutant alone fails S3).
#[test]
fn a_standby_that_delivers_is_caught_among_stand_downs_and_they_shrink_away() {
    let mut spec = fleet();
    spec.base.mutant = Some(Mutant::StandbyDelivers);
    spec.stand_downs = 2..=3;
    let c = expect_counterexample(&spec, 3, "S3");
    assert!(c.original.actions.len() >= 4, "{c}");
    assert!(c.scenario.actions.is_empty(), "{c}");
}

/// The same fleets, seeds and case counts without the breaks pass: the counterexamples above
/// come from the mutants and from the drift beyond the margin.
#[test]
fn the_unbroken_fleets_pass() {
    if let Err(e) = fleet().check(10, first_seed()) {
        panic!("{e}");
    }
    let mut spec = fleet();
    spec.fence_margin = Some(ms(100)..=ms(300));
    if let Err(e) = spec.check(20, first_seed()) {
        panic!("{e}");
    }
    let mut spec = fleet();
    spec.stand_downs = 2..=3;
    if let Err(e) = spec.check(3, first_seed()) {
        panic!("{e}");
    }
}

/// A mutant cannot come from a scenario file, and the command line's flag for it is hidden.
#[test]
fn mutants_cannot_be_switched_on_by_accident() {
    assert_eq!(Scenario::default().mutant, None);
    assert!(Scenario::from_toml("mutant = \"skip-fence\"\n").is_err());
    let s = Scenario {
        mutant: Some(Mutant::SkipFence),
        ..Scenario::default()
    };
    assert!(!s.to_toml().contains("mutant"));
    assert!(s.summary().contains("MUTANT=skip-fence"));
    let help = Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains("mutant"));
}

/// Through the proptest strategy too: proptest finds the skipped fence and shrinks the case
/// (here within a bounded number of steps); the failure message names the check and the
/// command, and the minimal case's command replays it.
#[cfg(feature = "proptest")]
#[test]
fn proptest_finds_the_skipped_fence_too() {
    use proptest::test_runner::{Config, TestError, TestRng, TestRunner};
    let mut spec = fleet();
    spec.base.mutant = Some(Mutant::SkipFence);
    let config = Config {
        cases: 20,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let strategy = spec.strategy().expect("valid ranges");
    match runner.run(&strategy, |case| {
        case.check()?;
        Ok(())
    }) {
        Err(TestError::Fail(reason, case)) => {
            let reason = reason.to_string();
            assert!(reason.contains("check S2 failed"), "{reason}");
            assert!(reason.contains("--mutant skip-fence"), "{reason}");
            let c = case.check().expect_err("the minimal case fails");
            assert_eq!(c.checker, "S2");
        }
        other => panic!("expected the strategy to find S2, got {other:?}"),
    }
}
