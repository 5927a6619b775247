//! The CLI: scenario files, reproduction commands on checker failures, the sweep's outputs.

use std::process::Command;

use pgiplock_sim::scenario::parse_fault;
use pgiplock_sim::{FaultKind, Scenario};

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
        .args(args)
        .env_remove("SIM_SEED")
        .env_remove("SIM_CHECK_DETERMINISM")
        .output()
        .unwrap()
}

#[test]
fn toml_round_trip_and_defaults() {
    let mut s = Scenario::default();
    s.faults.push(parse_fault("cut@2h@holder").unwrap());
    s.faults.push(parse_fault("crash@90s@3").unwrap());
    let back = Scenario::from_toml(&s.to_toml()).unwrap();
    assert_eq!(back, s);
    let partial = Scenario::from_toml("protocol = \"classic\"\nacquire_interval = \"5s\"\n").unwrap();
    assert_eq!(partial.acquire_interval, std::time::Duration::from_secs(5));
    assert_eq!(partial.processes, Scenario::default().processes);
    assert!(Scenario::from_toml("no_such_field = 1").is_err());
    // Timings below the core's floors are refused with the setting and the floor named.
    let tiny = Scenario::from_toml("lease_ttl = \"50ms\"\n").unwrap_err().to_string();
    assert_eq!(
        tiny,
        "invalid lock configuration: lease_ttl of 50ms is below the minimum of 100ms"
    );
    let tiny = Scenario::from_toml("acquire_interval = \"5ms\"\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        tiny,
        "invalid lock configuration: acquire_interval of 5ms is below the minimum of 10ms"
    );
    assert_eq!(s.faults[1].kind, FaultKind::Crash);
    assert_eq!(s.faults[1].process, Some(3));
}

#[test]
fn a_checker_failure_prints_seed_and_reproduction_command() {
    let out = sim(&["run", "--seed", "42", "--processes", "3", "--max-steps", "50"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seed 42"), "{err}");
    let repro = err.lines().find_map(|l| l.strip_prefix("reproduce with: ")).unwrap();
    assert_eq!(repro, "pgiplock-sim run --seed 42 --processes 3 --max-steps 50");
    // The command reproduces the same failure.
    let args: Vec<&str> = repro.split(' ').skip(1).collect();
    let again = sim(&args);
    assert_eq!(again.stderr, out.stderr);
}

#[test]
fn sweep_writes_csv_and_svg() {
    let dir = std::env::temp_dir().join(format!("pgiplock-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("s.csv");
    let svg = dir.join("s.svg");
    let out = sim(&[
        "sweep",
        "--processes",
        "3",
        "--duration",
        "30m",
        "--intervals",
        "2s,10s",
        "--ttls",
        "3s",
        "--csv",
        csv.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 1 + 4, "{text}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("classic") && chart.contains("lease"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Flags that take a duration or `none` parse (and reach the scenario line).
#[test]
fn optional_duration_flags_parse() {
    for (flag, value, shown) in [
        ("--renew-interval", "1s", "renew=1s"),
        ("--fence-margin", "500ms", "margin=500ms"),
        ("--restart-delay", "2s", "restart-delay"),
        ("--restart-delay", "none", "seed=1"),
    ] {
        let out = sim(&[
            "run",
            "--seed",
            "1",
            "--processes",
            "2",
            "--duration",
            "1m",
            flag,
            value,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flag} {value}: {stderr}");
        let first = stdout.lines().next().unwrap_or_default();
        assert!(first.contains(shown), "{flag} {value}: first line {first:?}");
    }
}
