//! Bad input is refused by the worker with exit code 2 and a clear message; odd but valid
//! channel and schema names work end to end.

use std::process::Command;
use std::time::Duration;

use pgiplock_tests::*;

/// Runs `pgiplock worker` with `args` appended and returns (exit code, stdout, stderr).
fn run_worker(url: &str, args: &[String]) -> (Option<i32>, String, String) {
    let output = Command::new(worker_binary())
        .arg("worker")
        .args(["--database-url", url])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the worker: {e}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every bad input, with the fragments its message must contain (case-insensitive).
fn bad_inputs() -> Vec<(&'static str, Vec<String>, Vec<&'static str>)> {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("empty channel", args(&["--channel", ""]), vec!["channel", "empty"]),
        (
            "channel over 50 bytes",
            args(&["--channel", &"x".repeat(51)]),
            vec!["channel", "50 bytes"],
        ),
        (
            "UTF-8 channel over 50 bytes (17 characters)",
            args(&["--channel", &"✓".repeat(17)]),
            vec!["channel", "50 bytes"],
        ),
        (
            "channel with the reserved prefix",
            args(&["--channel", "__PgIpLock__:x"]),
            vec!["channel", "reserved prefix"],
        ),
        (
            "zero acquire interval",
            args(&["--channel", "c", "--acquire-interval", "0s"]),
            vec!["acquire", "greater than zero"],
        ),
        (
            "zero acquire interval in ms",
            args(&["--channel", "c", "--acquire-interval", "0ms"]),
            vec!["acquire", "greater than zero"],
        ),
        (
            "absurd acquire interval",
            args(&["--channel", "c", "--acquire-interval", "100000000s"]),
            vec!["acquire", "maximum"],
        ),
        (
            "unparsable interval",
            args(&["--channel", "c", "--acquire-interval", "soon"]),
            vec!["acquire-interval", "duration"],
        ),
        (
            "zero lease ttl",
            args(&["--channel", "c", "--lease-ttl", "0s"]),
            vec!["lease", "greater than zero"],
        ),
        (
            "absurd lease ttl",
            args(&["--channel", "c", "--lease-ttl", "100000000s"]),
            vec!["lease", "maximum"],
        ),
        (
            "zero shutdown timeout",
            args(&["--channel", "c", "--shutdown-timeout", "0s"]),
            vec!["shutdown", "greater than zero"],
        ),
        (
            "bad protocol",
            args(&["--channel", "c", "--protocol", "paxos"]),
            vec!["protocol", "paxos"],
        ),
        (
            "schema over 63 bytes",
            args(&["--channel", "c", "--schema", &"s".repeat(64)]),
            vec!["schema", "63 bytes"],
        ),
        (
            "empty schema",
            args(&["--channel", "c", "--schema", ""]),
            vec!["schema", "empty"],
        ),
    ]
}

/// Runs every bad input against `url`; returns the failures.
fn refuse_all(url: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (what, args, fragments) in bad_inputs() {
        let (code, stdout, stderr) = run_worker(url, &args);
        let lower = stderr.to_lowercase();
        let clear = fragments.iter().all(|f| lower.contains(&f.to_lowercase()));
        eprintln!("{what}: exit {code:?}: {}", stderr.trim());
        if code != Some(2) || !clear || !stdout.is_empty() {
            failures.push(format!(
                "{what} ({args:?}): exit {code:?}, stdout {stdout:?}, stderr {stderr:?} \
                 (expected exit 2 and a message naming {fragments:?})"
            ));
        }
    }
    failures
}

#[test]
fn bad_input_is_refused_with_exit_code_2_and_a_clear_message() {
    let failures = refuse_all(&database_url());
    assert!(
        failures.is_empty(),
        "bad input not refused properly:\n{}",
        failures.join("\n")
    );
}

#[test]
fn bad_input_is_refused_before_connecting() {
    // Nothing listens on port 1: a worker that validated its input first still says why the
    // input is bad, rather than failing to connect.
    let failures = refuse_all("postgres://postgres@127.0.0.1:1/nowhere");
    assert!(
        failures.is_empty(),
        "bad input not refused before connecting:\n{}",
        failures.join("\n")
    );
}

/// One worker per odd channel name holds its lock and receives a message published on it.
async fn odd_names_work(protocol: Protocol) {
    let hex = unique_hex();
    let channels = [
        format!("quote \"{hex}\" and 'single'"),
        format!("with space {hex}"),
        format!("UPPER_{hex}"),
        format!("ünïcødé ✓ {hex}"),
        format!("x;DROP TABLE t--{hex}"),
        // exactly 50 bytes: the longest channel whose lock channel fits in 63 bytes
        format!("{hex}{}", "y".repeat(50 - hex.len())),
    ];
    assert_eq!(channels[5].len(), 50);
    // Odd schema names too: quotes, spaces, upper case and UTF-8.
    let schema = TestSchema::named(&database_url(), &format!("T \"odd\" ✓ {hex}"));
    let plain_schema = TestSchema::new();
    let publisher = Publisher::connect(&database_url()).await;
    let mut fleets = Vec::new();
    for (i, channel) in channels.iter().enumerate() {
        let schema = if i % 2 == 0 { &schema } else { &plain_schema };
        let mut fleet = Fleet::new(WorkerOpts::new(&database_url(), channel, Some(schema.name()), protocol));
        fleet.spawn();
        fleets.push(fleet);
    }
    for (fleet, channel) in fleets.iter().zip(&channels) {
        fleet.wait_holder(Duration::from_secs(20)).await;
        let payload = format!("payload for {channel} 'q' \"dq\" ✓");
        publisher.publish(channel, &payload).await;
        let worker = fleet.wait_delivered(&payload, Duration::from_secs(10)).await;
        assert_eq!(worker, 0);
        let events = fleet.events();
        assert!(
            events.iter().all(|e| !matches!(e.kind, EventKind::Unparsed { .. })),
            "every stdout line is a documented event: {events:?}"
        );
    }
    for fleet in &fleets {
        fleet.shutdown(Duration::from_secs(10)).await;
        fleet.assert_invariants();
        for w in fleet.workers() {
            assert!(
                !w.stderr().contains("ERROR"),
                "w{} logged an error:\n{}",
                w.index,
                w.stderr()
            );
        }
    }
    eprintln!("[{protocol}] {} odd channel names held and delivered", channels.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_names_work_end_to_end_classic() {
    odd_names_work(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_names_work_end_to_end_lease() {
    odd_names_work(Protocol::Lease).await;
}
