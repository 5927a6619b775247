//! The bench binary still runs: one tiny graceful-handover measurement and the memory
//! measurement on ten channels, each printing its table (the figures themselves are the
//! bench's business, not the test's).

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
