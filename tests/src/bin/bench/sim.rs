//! The simulator's events per second: `pgiplock_sim::run` on its default scenario and on a
//! large fleet (the scenarios of `pgiplock-sim bench`), each trial right after a CPU probe (a
//! fixed SplitMix64 loop) whose rate shows how much of the machine the trial had.

use std::time::Duration;

use pgiplock_core::SplitMix64;
use pgiplock_sim::{FaultRates, Scenario};
use tokio::time::Instant;

use crate::BoxError;

/// Iterations of the CPU probe unless told otherwise (`--probe-draws`, in millions).
pub const PROBE_ITERATIONS: u64 = 200_000_000;

/// What to run: the trials, the large fleet, and the sizes of the default run and the probe.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Trials of each run.
    pub trials: usize,
    /// Processes of the large run.
    pub processes: usize,
    /// Virtual time of the large run.
    pub duration: Duration,
    /// Virtual time of the default scenario's run (`None`: the scenario's own).
    pub default_duration: Option<Duration>,
    /// Iterations of the CPU probe before each trial.
    pub probe_iterations: u64,
}

/// One scenario's trials.
#[derive(Debug, Clone)]
pub struct SimRun {
    /// What was run.
    pub label: String,
    /// Events of one run (the same every trial: the run is deterministic).
    pub events: u64,
    /// Events per second of wall time, per trial.
    pub events_per_s: Vec<f64>,
    /// CPU probe iterations per second, the trial before each run.
    pub probe_per_s: Vec<f64>,
}

/// Millions of SplitMix64 draws per second on this thread.
fn cpu_probe(iterations: u64) -> f64 {
    let mut rng = SplitMix64::new(1);
    let start = Instant::now();
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc ^= rng.next_u64();
    }
    std::hint::black_box(acc);
    iterations as f64 / start.elapsed().as_secs_f64()
}

fn trials(label: String, scenario: &Scenario, options: &SimOptions) -> Result<SimRun, BoxError> {
    let mut run = SimRun {
        label,
        events: 0,
        events_per_s: Vec::new(),
        probe_per_s: Vec::new(),
    };
    for _ in 0..options.trials {
        run.probe_per_s.push(cpu_probe(options.probe_iterations.max(1)));
        let start = Instant::now();
        let report = pgiplock_sim::run(scenario, 1)?;
        let wall = start.elapsed().as_secs_f64();
        run.events = report.events;
        run.events_per_s.push(report.events as f64 / wall);
        crate::progress(&format!(
            "  {}: {} events in {wall:.2} s = {:.0} events/s",
            run.label,
            report.events,
            report.events as f64 / wall
        ));
    }
    Ok(run)
}

/// The default scenario and `processes` Classic processes at a 1 s interval for `duration`
/// (as `pgiplock-sim bench`), `trials` each, seed 1.
pub fn measure(options: &SimOptions) -> Result<Vec<SimRun>, BoxError> {
    let (processes, duration) = (options.processes, options.duration);
    let mut base = Scenario::default();
    if let Some(d) = options.default_duration {
        base.duration = d;
    }
    let default_run = trials(
        format!(
            "default scenario ({} processes, {:?} virtual)",
            base.processes, base.duration
        ),
        &base,
        options,
    )?;
    let big = Scenario {
        protocol: pgiplock_core::Protocol::Classic,
        processes,
        duration,
        acquire_interval: Duration::from_secs(1),
        publish_rate: 0.1,
        fault_rates: FaultRates {
            stop: 1.0,
            crash: 1.0,
            cut: 0.5,
            terminate: 0.5,
            ..FaultRates::default()
        },
        ..Scenario::default()
    };
    let big_run = trials(
        format!("{processes} processes, Classic, 1 s interval, {duration:?} virtual"),
        &big,
        options,
    )?;
    Ok(vec![default_run, big_run])
}
