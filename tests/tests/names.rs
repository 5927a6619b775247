//! Bad input is refused by the worker with exit code 2 and a clear message; odd but valid
//! channel and schema names work end to end.

use std::process::Command;
use std::time::Duration;

use pgiplock_tests::*;

/// Runs `pgiplock worker` with `args` appended and returns (exit code, stdout, stderr).
fn run_worker(args: &[&str]) -> (Option<i32>, String, String) {
    let url = database_url();
    let output = Command::new(worker_binary())
        .arg("worker")
        .args(["--database-url", url.as_str()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the worker: {e}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_refused_with_exit_code_2_and_a_clear_message() {
    let long_channel = "x".repeat(51);
    let long_utf8_channel = "✓".repeat(17); // 17 characters, 51 bytes
    let long_schema = "s".repeat(64);
    // (what, arguments, any of these fragments must appear in stderr, case-insensitive)
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        ("empty channel", vec!["--channel", ""], vec!["empty"]),
        (
            "channel over 50 bytes",
            vec!["--channel", &long_channel],
            vec!["50", "63"],
        ),
        (
            "UTF-8 channel over 50 bytes",
            vec!["--channel", &long_utf8_channel],
            vec!["50", "63"],
        ),
        (
            "channel with the reserved prefix",
            vec!["--channel", "__PgIpLock__:x"],
            vec!["prefix", "reserved"],
        ),
        (
            "zero acquire interval",
            vec!["--channel", "c", "--acquire-interval", "0s"],
            vec!["zero", "greater than"],
        ),
        (
            "zero acquire interval in ms",
            vec!["--channel", "c", "--acquire-interval", "0ms"],
            vec!["zero", "greater than"],
        ),
        (
            "absurd acquire interval",
            vec!["--channel", "c", "--acquire-interval", "100000000s"],
            vec!["exceeds", "maximum", "too large", "overflow", "range"],
        ),
        (
            "unparsable interval",
            vec!["--channel", "c", "--acquire-interval", "soon"],
            vec!["duration", "invalid"],
        ),
        (
            "zero lease ttl",
            vec!["--channel", "c", "--lease-ttl", "0s"],
            vec!["zero", "greater than"],
        ),
        (
            "zero shutdown timeout",
            vec!["--channel", "c", "--shutdown-timeout", "0s"],
            vec!["zero", "greater than"],
        ),
        (
            "bad protocol",
            vec!["--channel", "c", "--protocol", "paxos"],
            vec!["protocol", "paxos"],
        ),
        (
            "schema over 63 bytes",
            vec!["--channel", "c", "--schema", &long_schema],
            vec!["63"],
        ),
        ("empty schema", vec!["--channel", "c", "--schema", ""], vec!["empty"]),
    ];
    let mut failures = Vec::new();
    for (what, args, fragments) in &cases {
        let (code, stdout, stderr) = run_worker(args);
        let lower = stderr.to_lowercase();
        let clear = fragments.iter().any(|f| lower.contains(&f.to_lowercase()));
        eprintln!("{what}: exit {code:?}: {}", stderr.trim());
        if code != Some(2) || !clear || !stdout.is_empty() {
            failures.push(format!(
                "{what} ({args:?}): exit {code:?}, stdout {stdout:?}, stderr {stderr:?} (expected exit 2 and one of {fragments:?})"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "bad input not refused properly:\n{}",
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
