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

#[test]
fn sweep_over_channel_counts_prints_a_row_per_count() {
    let dir = std::env::temp_dir().join(format!("pgiplock-sim-test-chans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("s.csv");
    let out = sim(&[
        "sweep",
        "--protocols",
        "lease",
        "--process-counts",
        "2",
        "--channel-counts",
        "1,3",
        "--duration",
        "5m",
        "--csv",
        csv.to_str().unwrap(),
        "--svg",
        dir.join("s.svg").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.contains(" chans ")), "{table}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(
        rows[0].starts_with("lease,2,1,") && rows[1].starts_with("lease,2,3,"),
        "{text}"
    );
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

/// `tune` explains its recommendation: the paragraph names the fault kind that dominates the
/// loss in the recommendation's report, and its numbers are that report's and those of the
/// next cheaper candidate.
#[test]
fn tune_explains_its_recommendation_with_the_reports_numbers() {
    use pgiplock_core::Protocol;
    use pgiplock_sim::explore;
    use std::time::Duration;

    // Silent disconnects and crashes on a classic fleet: both lose messages, unevenly.
    let flags = [
        "--seed",
        "1",
        "--processes",
        "3",
        "--duration",
        "2h",
        "--publish-rate",
        "5",
        "--crash-rate",
        "6",
        "--cut-rate",
        "1",
        "--stop-rate",
        "2",
        "--terminate-rate",
        "0",
    ];
    let base = Scenario {
        processes: 3,
        duration: Duration::from_secs(2 * 3600),
        publish_rate: 5.0,
        fault_rates: pgiplock_sim::FaultRates {
            crash: 6.0,
            cut: 1.0,
            stop: 2.0,
            terminate: 0.0,
            ..Scenario::default().fault_rates
        },
        ..Scenario::default()
    };
    let candidates = explore::tune_candidates(&base, Some(Protocol::Classic));
    // A load target between the third and the fourth cheapest candidates, so that the
    // recommendation has a cheaper candidate whatever the model's exact figures.
    let open = explore::tune(&candidates, 1, explore::TuneTarget::MaxLoad(f64::MAX)).unwrap();
    let mut loads: Vec<f64> = open.candidates.iter().map(|p| p.report.statements_per_s).collect();
    loads.sort_by(f64::total_cmp);
    assert!(loads[2] < loads[3], "distinct loads: {loads:?}");
    let max_load = (loads[2] + loads[3]) / 2.0;
    let target = explore::TuneTarget::MaxLoad(max_load);
    let expected = explore::tune(&candidates, 1, target).unwrap();
    let best = expected.best.expect("a candidate within the load target");
    let r = &expected.candidates[best].report;

    let max_load_text = max_load.to_string();
    let mut args = vec!["tune", "--only", "classic", "--max-load", max_load_text.as_str()];
    args.extend(flags);
    let out = sim(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let why = stdout
        .lines()
        .find_map(|l| l.strip_prefix("why: "))
        .unwrap_or_else(|| panic!("no explanation:\n{stdout}"));
    let recommended = format!("recommended: protocol classic acquire_interval {}", r.acquire_interval);
    assert!(stdout.contains(&recommended), "{recommended:?} not in\n{stdout}");

    // The dominant fault kind, from the report's per-kind lost messages.
    let (kind, lost) = r
        .messages_by_fault
        .iter()
        .map(|(k, m)| (k.as_str(), m.lost))
        .fold(("", 0), |a, b| if b.1 > a.1 { b } else { a });
    assert!(
        lost > 0 && kind != "none",
        "the scenario loses messages to faults: {r:?}"
    );
    assert!(
        why.contains(&format!(
            "Faults of kind {kind} dominate the loss: {lost} of the {} lost messages",
            r.lost_messages
        )),
        "{why}"
    );
    for other in r.messages_by_fault.keys().filter(|k| k.as_str() != kind) {
        assert!(!why.contains(&format!("kind {other} dominate")), "{why}");
    }
    let stats = &r.failover[kind];
    assert!(
        why.contains(&format!(
            "failovers ({}) took {:.1} s at the median and {:.1} s at most",
            stats.count, stats.p50_s, stats.max_s
        )),
        "{why}"
    );
    // The load, total and per process.
    let load = format!(
        "The load is {:.3} statements/s at the server, {:.3} per process on average",
        r.statements_per_s, r.statements_per_s_per_process_mean
    );
    assert!(why.contains(&load), "{load:?} not in {why}");
    let loss = explore::loss_per_day(r);
    assert!(
        why.contains(&format!("least loss window, {loss:.1} s per day")),
        "{why}"
    );

    // The next cheaper candidate: the most load below the recommendation's.
    let cheaper = expected
        .candidates
        .iter()
        .filter(|p| p.report.statements_per_s < r.statements_per_s)
        .max_by(|a, b| a.report.statements_per_s.total_cmp(&b.report.statements_per_s))
        .expect("a cheaper candidate");
    let c = &cheaper.report;
    let cost = format!(
        "The next cheaper candidate, classic at acquire_interval {}, would cost {:.3} statements/s ({:.3} per process) against {:.3}, with a loss window of {:.1} s per day and {} lost messages against {loss:.1} s and {}",
        c.acquire_interval,
        c.statements_per_s,
        c.statements_per_s_per_process_mean,
        r.statements_per_s,
        explore::loss_per_day(c),
        c.lost_messages,
        r.lost_messages
    );
    assert!(why.contains(&cost), "{cost:?} not in {why}");
}

/// A duration without a unit is refused, as by the `pgiplock` command, with a message that says
/// what to write; in a scenario file too.
#[test]
fn a_duration_without_a_unit_is_refused() {
    for (flag, value) in [
        ("--acquire-interval", "5"),
        ("--duration", "600"),
        ("--restart-delay", "0"),
    ] {
        let out = sim(&["run", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        let expected = format!(
            "error: invalid value '{value}' for '{flag} <DURATION>': `{value}` has no unit: write {value}s or {value}ms"
        );
        assert_eq!(stderr.lines().next(), Some(expected.as_str()), "{stderr}");
    }
    let file = Scenario::from_toml("acquire_interval = \"5\"\n")
        .unwrap_err()
        .to_string();
    assert!(file.contains("`5` has no unit: write 5s or 5ms"), "{file}");
}
