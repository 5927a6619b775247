//! A user's property test of their own settings: a fleet of 3 to 6 processes, a 1-5 s acquire
//! interval, a 3-10 s lease, 1-5 notifications per second, and the faults they expect (up to
//! 30 crashes, 20 graceful stops, 10 silent disconnects and 10 server-side terminations per
//! hour). Prints the summary, or the smallest failing scenario with the command that replays
//! it (and exits 1).
//!
//! Environment: `PGIPLOCK_CHECK_CASES` sets the number of cases (default 8),
//! `PGIPLOCK_CHECK_SEED` the first seed (default 1), `PGIPLOCK_CHECK_PROTOCOL` the protocol
//! (`lease`, the default, or `classic`).

use std::process::ExitCode;
use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::check::Spec;
use pgiplock_sim::FaultKind;

fn env<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v:?} does not parse")),
        Err(_) => Ok(default),
    }
}

fn main() -> ExitCode {
    let settings = || -> Result<(u64, u64, Protocol), String> {
        let protocol = env("PGIPLOCK_CHECK_PROTOCOL", "lease".to_owned())?;
        let protocol = protocol.parse::<Protocol>().map_err(|e| e.to_string())?;
        Ok((
            env("PGIPLOCK_CHECK_CASES", 8)?,
            env("PGIPLOCK_CHECK_SEED", 1)?,
            protocol,
        ))
    };
    let (cases, seed, protocol) = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };

    let s = Duration::from_secs;
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
    match spec.check(cases, seed) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
