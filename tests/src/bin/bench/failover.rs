//! Graceful handover (SIGTERM to the holder → the next `acquired`) and crash failover
//! (SIGKILL → the next `acquired`) with real `pgiplock worker` processes, each trial next to
//! floor-probe trials run just before it.

use std::time::Duration;

use pgiplock_tests::{now_us, unique_channel, unique_hex, Fleet, Protocol, TestSchema, WorkerOpts};

use crate::probe::Probe;
use crate::{progress, BoxError};

/// How the holder is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGTERM: the worker releases, then exits.
    Stop,
    /// SIGKILL: the process dies holding.
    Crash,
}

/// One fleet's settings and the number of trials.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The server.
    pub url: String,
    /// Protocol of every worker.
    pub protocol: Protocol,
    /// Workers besides the holder.
    pub standbys: usize,
    /// `--acquire-interval`, `None` for the default.
    pub acquire_interval: Option<Duration>,
    /// The fault of every trial.
    pub fault: Fault,
    /// Faults (each then replaced by a fresh worker).
    pub trials: usize,
    /// Probe trials before each fault.
    pub probes_per_trial: usize,
    /// Extra arguments of every worker (e.g. `--wake-jitter=0s`).
    pub worker_args: Vec<String>,
}

/// Latencies of one fleet, milliseconds, and what the fleet's checkers saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Fault → next `acquired`, per trial.
    pub latency_ms: Vec<f64>,
    /// The floor probe's trials, interleaved with the faults.
    pub probe_ms: Vec<f64>,
    /// Microseconds with two or more workers reporting themselves holder, over the run.
    pub split_brain_us: i64,
}

impl Setup {
    /// The longest a standby waits between attempts with these settings (the worker's
    /// defaults when unset): the phase of each fault is spread over it.
    fn retry_bound(&self) -> Duration {
        let interval = self.acquire_interval.unwrap_or(Duration::from_secs(30));
        match self.protocol {
            // Standbys also retry at the lease's expiry (ttl 10 s by default).
            Protocol::Lease => interval.min(Duration::from_secs(10)),
            _ => interval,
        }
    }
}

/// Runs `setup.trials` faults on one fleet of `1 + setup.standbys` workers.
pub async fn run(setup: &Setup) -> Result<Outcome, BoxError> {
    let schema = TestSchema::named(&setup.url, &format!("bench_{}", unique_hex()));
    let mut opts = WorkerOpts::new(&setup.url, &unique_channel(), Some(schema.name()), setup.protocol);
    if let Some(interval) = setup.acquire_interval {
        opts = opts.acquire_interval(interval);
    }
    opts.extra_args.extend(setup.worker_args.iter().cloned());
    let retry = setup.retry_bound();
    // Bound on every wait: a crash may wait a whole retry period, a busy machine some more.
    let wait = retry * 2 + Duration::from_secs(30);
    let mut probe = Probe::setup(&setup.url).await?;
    let mut fleet = Fleet::new(opts);
    let holder = fleet.spawn();
    fleet.wait_ready(holder, wait).await;
    fleet.wait_holder(wait).await;
    fleet.spawn_many(setup.standbys);
    fleet.wait_all_ready(wait).await;
    let started_us = now_us();
    let mut out = Outcome::default();
    for round in 0..setup.trials {
        // Spread the fault's phase against the standbys' retry timers (golden-ratio steps), so
        // that a crash meets them at every point of their period, not just after a takeover.
        let settle = match setup.fault {
            Fault::Stop => Duration::from_millis(300),
            Fault::Crash => Duration::from_millis(500) + retry.mul_f64((round as f64 * 0.618_034).fract()),
        };
        tokio::time::sleep(settle).await;
        out.probe_ms.extend(probe.trials(setup.probes_per_trial).await?);
        let (holder, _, _) = fleet.wait_holder(wait).await;
        let t0 = now_us();
        match setup.fault {
            Fault::Stop => fleet.worker(holder).terminate(),
            Fault::Crash => fleet.worker(holder).kill(),
        }
        let (_, t_acquired, _) = fleet.wait_acquired_after(t0, &[holder], wait).await;
        let latency = (t_acquired - t0) as f64 / 1000.0;
        progress(&format!(
            "  {} {:?} {} standbys, trial {}/{}: {latency:.2} ms",
            setup.protocol,
            setup.fault,
            setup.standbys,
            round + 1,
            setup.trials
        ));
        out.latency_ms.push(latency);
        fleet.wait_exit(holder, wait).await;
        let replacement = fleet.spawn();
        fleet.wait_ready(replacement, wait).await;
    }
    out.split_brain_us = fleet.coverage(started_us, now_us()).1;
    if out.split_brain_us > 0 {
        // Name the overlapping tenures: a worker stamps `t_us` when it prints, so on a busy
        // machine one holder's end may be stamped after the next holder's start.
        let intervals = fleet.intervals();
        for (i, a) in intervals.iter().enumerate() {
            for b in intervals[i + 1..]
                .iter()
                .filter(|b| b.worker != a.worker && a.overlaps(b))
            {
                progress(&format!("  two holders: {a:?} and {b:?}"));
            }
        }
    }
    fleet.shutdown(wait).await;
    Ok(out)
}
