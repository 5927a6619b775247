//! The property-testing API (`pgiplock_sim::check`) as a user runs it under `cargo test`: the
//! example's settings pass, the proptest strategy plugs in, bad ranges are typed errors, cases
//! are deterministic per seed, and the printed command replays a case exactly (the real
//! binary's trace hash equals the in-process run's).
//!
//! `PGIPLOCK_CHECK_CASES` (default 4) sets the number of cases of the long-running tests and
//! `PGIPLOCK_CHECK_SEED` (default 1) their first seed: `PGIPLOCK_CHECK_CASES=500 cargo test -p
//! pgiplock-sim --test check` searches longer.

use std::process::Command;
use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::check::{load_bound, CheckError, Spec, SpecError, LOAD_SLACK, LOAD_SLACK_PER_S};
use pgiplock_sim::{Action, FaultKind, FaultRates, Scenario};
#[cfg(feature = "proptest")]
use proptest::prelude::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn cases() -> u64 {
    env("PGIPLOCK_CHECK_CASES", 4)
}

fn first_seed() -> u64 {
    env("PGIPLOCK_CHECK_SEED", 1)
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The settings of `examples/my_settings.rs`.
fn my_settings(protocol: Protocol) -> Spec {
    let mut spec = Spec::new(protocol);
    spec.processes = 3..=6;
    spec.acquire_interval = s(1)..=s(5);
    spec.lease_ttl = s(3)..=s(10);
    spec.publish_rate = 1.0..=5.0;
    spec.duration = s(600)..=s(600);
    spec.fault_rates.insert(FaultKind::Crash, 0.0..=30.0);
    spec.fault_rates.insert(FaultKind::Stop, 0.0..=20.0);
    spec.fault_rates.insert(FaultKind::Cut, 0.0..=10.0);
    spec.fault_rates.insert(FaultKind::Terminate, 0.0..=10.0);
    spec
}

fn ok_summary(spec: &Spec, cases: u64, seed: u64) -> pgiplock_sim::check::Summary {
    match spec.check(cases, seed) {
        Ok(summary) => summary,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn my_lease_settings_pass_every_check() {
    let n = cases();
    let summary = ok_summary(&my_settings(Protocol::Lease), n, first_seed());
    assert_eq!(summary.cases, n);
    assert_eq!(summary.protocols.get("lease"), Some(&n));
    // The cases did meet faults, failovers and messages: the checks had something to check.
    assert!(summary.faults.values().sum::<u64>() > 0, "{summary}");
    assert!(
        summary.failover.values().map(|s| s.count).sum::<usize>() > 0,
        "{summary}"
    );
    assert!(summary.messages_by_fault.values().map(|m| m.published).sum::<u64>() > 0);
    assert_eq!(summary.lease_split_brain_s.max, 0.0, "{summary}");
    assert!(summary.load_over_bound.max <= 1.0, "{summary}");
}

#[test]
fn my_classic_settings_pass_and_report_split_brain_instead_of_failing() {
    let mut spec = my_settings(Protocol::Classic);
    // A server that gives up on a vanished client fast: a standby takes over while the cut
    // holder still believes (Classic has no self-fencing), which S2 does not fail under Classic.
    spec.base.server_retransmit_detect = s(2);
    spec.fault_rates.insert(FaultKind::Cut, 30.0..=60.0);
    spec.base.cut_duration = s(120);
    spec.cut_duration = s(120)..=s(120);
    let summary = ok_summary(&spec, cases().max(2), first_seed());
    assert_eq!(summary.lease_split_brain_s.count, 0);
    assert!(summary.classic_split_brain_s.max > 0.0, "{summary}");
}

/// Stand-downs drawn into the cases: each case takes some processes out of the competition and
/// back, and every check still holds (a stood-down holder hands over gracefully; a fleet whose
/// every process stood down is not a liveness failure).
#[test]
fn cases_with_stand_downs_pass_every_check() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut spec = my_settings(protocol);
        spec.stand_downs = 2..=4;
        spec.stand_down_pause = s(5)..=s(60);
        let case = spec.case(first_seed()).unwrap();
        let stand_downs = case
            .scenario
            .actions
            .iter()
            .filter(|a| a.action == Action::StandDown)
            .count();
        assert!(
            (2..=4).contains(&stand_downs),
            "{protocol}: {:?}",
            case.scenario.actions
        );
        let summary = ok_summary(&spec, cases().div_ceil(2), first_seed());
        assert!(summary.load_over_bound.max <= 1.0, "{protocol}: {summary}");
    }
    // With none asked for, the cases draw exactly what they drew before: no actions.
    assert!(my_settings(Protocol::Lease)
        .case(7)
        .unwrap()
        .scenario
        .actions
        .is_empty());
}

#[cfg(feature = "proptest")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(env("PGIPLOCK_CHECK_CASES", 3) as u32))]

    /// The same settings through proptest, which draws (and would shrink) the cases.
    #[test]
    fn my_settings_as_a_proptest(case in my_settings(Protocol::Lease).strategy().expect("valid ranges")) {
        let run = case.check()?;
        prop_assert!(run.report.published > 0);
    }
}

#[test]
fn bad_ranges_are_typed_errors() {
    let base = Spec::new(Protocol::Lease);
    let mut spec = base.clone();
    #[allow(clippy::reversed_empty_ranges)]
    {
        spec.processes = 5..=3;
    }
    assert!(matches!(
        spec.validate(),
        Err(SpecError::EmptyRange { name: "processes", .. })
    ));
    #[cfg(feature = "proptest")]
    assert!(spec.strategy().is_err());
    assert!(matches!(spec.check(1, 1), Err(CheckError::Spec(_))));

    let mut spec = base.clone();
    spec.fault_rates.insert(FaultKind::Crash, f64::NAN..=1.0);
    assert!(matches!(
        spec.validate(),
        Err(SpecError::EmptyRange { name: "crash", .. })
    ));

    // Valid on their own, but the shortest ttl with the longest margin is not usable.
    let mut spec = base.clone();
    spec.lease_ttl = s(2)..=s(10);
    spec.fence_margin = Some(Duration::from_millis(500)..=s(3));
    let error = spec.validate().unwrap_err();
    assert!(matches!(error, SpecError::Scenario { .. }), "{error}");
    assert!(error.to_string().contains("fence_margin"), "{error}");

    let mut spec = base.clone();
    spec.duration = s(20)..=s(20);
    assert!(matches!(spec.validate(), Err(SpecError::Invalid(_))));

    let mut spec = base.clone();
    spec.processes = 0..=3;
    assert!(matches!(spec.validate(), Err(SpecError::Scenario { .. })));

    let mut spec = base;
    spec.protocols.clear();
    assert!(matches!(spec.case(1), Err(SpecError::Invalid(_))));
}

#[test]
fn cases_and_summaries_are_deterministic_per_seed() {
    let spec = my_settings(Protocol::Lease);
    assert_eq!(spec.case(5).unwrap(), spec.case(5).unwrap());
    assert_ne!(spec.case(5).unwrap(), spec.case(6).unwrap());
    assert_eq!(ok_summary(&spec, 0, 1).to_string(), "0 cases: nothing was checked\n");
    let a = ok_summary(&spec, 2, 11);
    let b = ok_summary(&spec, 2, 11);
    assert_eq!(a, b);
    assert_eq!(a.to_string(), b.to_string());
}

/// Every field a spec varies reaches the command line: the binary, given the printed command,
/// runs the very same scenario (the same trace hash).
#[test]
fn the_printed_command_replays_the_case_exactly() {
    let mut spec = Spec::new(Protocol::Lease);
    spec.protocols = vec![Protocol::Lease, Protocol::Classic];
    spec.processes = 2..=5;
    spec.channels = 1..=3;
    spec.duration = s(60)..=s(180);
    spec.acquire_interval = Duration::from_millis(300)..=s(5);
    spec.lease_ttl = Duration::from_millis(800)..=s(6);
    spec.renew_interval = Some(Duration::from_millis(50)..=Duration::from_millis(150));
    spec.fence_margin = Some(Duration::from_millis(50)..=Duration::from_millis(200));
    spec.request_timeout = Duration::from_millis(500)..=s(3);
    spec.publish_rate = 0.5..=8.0;
    spec.net_delay = Duration::from_micros(100)..=Duration::from_millis(5);
    spec.drift = 0.0..=0.01;
    spec.cut_duration = s(1)..=s(40);
    for kind in FaultKind::ALL {
        spec.fault_rates.insert(kind, 10.0..=60.0);
    }
    // Drawn stand-downs replay too (as `--action stand_down@...` and `compete`).
    spec.stand_downs = 1..=3;
    spec.stand_down_pause = s(1)..=s(20);
    for seed in [3, 4, 5] {
        let case = spec.case(seed).unwrap();
        let run = case.check().unwrap_or_else(|c| panic!("{c}"));
        let command = case.command();
        assert!(command.contains("--action stand_down@"), "{command}");
        assert!(command.contains("--action compete@"), "{command}");
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
            .args(&args)
            .arg("--json")
            .env_remove("SIM_SEED")
            .env_remove("SIM_CHECK_DETERMINISM")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
        assert_eq!(json["trace_hash"], run.report.trace_hash.as_str(), "{command}");
        assert_eq!(json["events"], run.report.events, "{command}");
    }
}

/// The load bound is the documented formula, and a quiet fleet's load is close below it.
#[test]
fn the_load_bound_is_what_the_timings_imply() {
    let scenario = Scenario {
        processes: 5,
        duration: s(600),
        warmup: s(10),
        acquire_interval: s(2),
        lease_ttl: s(3),
        publish_rate: 2.0,
        fault_rates: FaultRates::default(),
        property_checks: true,
        // The formula's standbys poll; with the crash watch they wait instead (below).
        crash_watch: false,
        ..Scenario::default()
    };
    let report = pgiplock_sim::run(&scenario, 1).unwrap();
    // renew 3 s / 5 = 600 ms; retries at least min(2 s, 3 s) × 0.8 = 1.6 s apart.
    let idle = 1.0 / 0.6 + 4.0 / 1.6;
    let bound = load_bound(&scenario, &report);
    assert!((bound - (LOAD_SLACK * idle + LOAD_SLACK_PER_S)).abs() < 1e-9, "{bound}");
    let measured = report.statements_per_s;
    assert!(
        measured <= bound && measured > 0.6 * bound,
        "{measured} against {bound}"
    );
    // With the crash watch the standbys send one wait per `crash_watch_refresh` instead of
    // their attempts: the holder's renewals are most of the load.
    let watched = Scenario {
        crash_watch: true,
        ..scenario
    };
    let report = pgiplock_sim::run(&watched, 1).unwrap();
    let measured_watched = report.statements_per_s;
    assert!(
        measured_watched <= bound && measured_watched < 0.6 * measured,
        "{measured_watched} against {measured} without the watch"
    );
}
