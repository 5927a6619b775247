//! The bench binary still runs: every measurement once, as small as it goes (one standby, one
//! trial, one-second windows, a short warm-up), each printing its table with a row of figures
//! (the figures themselves are the bench's business, not the test's). The idle and
//! many-channel measurements start their own throwaway clusters.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .env("PGIPLOCK_TEST_DATABASE_URL", pgiplock_tests::database_url())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the bench: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn handover_smoke() {
    let out = bench(&[
        "handover",
        "--protocols",
        "lease",
        "--standbys",
        "1",
        "--trials",
        "2",
        "--probes",
        "1",
    ]);
    assert!(out.contains("## Graceful handover"), "{out}");
    assert!(out.contains("| lease | 1 | 2 |"), "{out}");
}

#[test]
fn memory_smoke() {
    let out = bench(&["memory", "--memory-trials", "1", "--channels", "10"]);
    assert!(out.contains("| worker holding 1 lock | 1 |"), "{out}");
    assert!(out.contains("one session holding 10 Lease locks"), "{out}");
    assert!(out.contains("`size_of::<pgiplock_core::Lock>()`"), "{out}");
}

#[test]
fn crash_smoke() {
    let out = bench(&[
        "crash",
        "--protocols",
        "lease",
        "--crash-intervals",
        "1s",
        "--trials",
        "1",
        "--crash-standbys",
        "1",
        "--probes",
        "1",
    ]);
    assert!(out.contains("## Crash failover"), "{out}");
    assert!(out.contains("| lease | 1s | 1 |"), "{out}");
}

#[test]
fn idle_smoke() {
    let out = bench(&[
        "idle",
        "--protocols",
        "lease",
        "--window",
        "1s",
        "--warmup",
        "1s",
        "--idle-standbys",
        "1",
    ]);
    assert!(out.contains("## Idle load"), "{out}");
    assert!(out.contains("| lease | holder (alone) |"), "{out}");
    assert!(out.contains("| lease | each standby |"), "{out}");
}

#[test]
fn scale_smoke() {
    let out = bench(&[
        "scale",
        "--scale-channels",
        "10",
        "--scale-window",
        "1s",
        "--warmup",
        "1s",
    ]);
    assert!(out.contains("## Many channels in one process"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("| 10 |"))
        .unwrap_or_else(|| panic!("no row for 10 channels:\n{out}"));
    // The time to hold every channel comes from the holder's own report.
    assert!(!row.contains("no `held` line"), "{row}");
}

#[test]
fn throughput_smoke() {
    let out = bench(&[
        "throughput",
        "--protocols",
        "lease",
        "--rates",
        "max",
        "--messages",
        "200",
    ]);
    assert!(out.contains("## Throughput and delivery lag"), "{out}");
    assert!(out.contains("| worker (holder) | 200 of 200 |"), "{out}");
    assert!(out.contains("| floor: raw LISTEN | 200 of 200 |"), "{out}");
}

#[test]
fn sim_smoke() {
    let out = bench(&[
        "sim",
        "--sim-trials",
        "1",
        "--sim-processes",
        "10",
        "--sim-duration",
        "10s",
        "--sim-default-duration",
        "10m",
        "--probe-draws",
        "1",
    ]);
    assert!(out.contains("## Simulator"), "{out}");
    assert!(
        out.contains("| default scenario (10 processes, 600s virtual) |"),
        "{out}"
    );
    assert!(
        out.contains("| 10 processes, Classic, 1 s interval, 10s virtual |"),
        "{out}"
    );
}

#[test]
fn probe_smoke() {
    let out = bench(&["probe", "--trials", "1", "--probes", "3"]);
    assert!(out.contains("## Floor probe"), "{out}");
    assert!(out.contains("| 3 |"), "{out}");
}
