//! Many runs at once: sweeps over timings (with CSV and an SVG chart), the tuner, seed-chosen
//! swarm scenarios, and the run-twice determinism check.

use std::fmt::Write as _;
use std::time::Duration;

use pgiplock_core::{Protocol, SplitMix64};

use crate::metrics::Report;
use crate::scenario::{format_duration, FaultKind, FaultRates, FaultTarget, Scenario};
use crate::world::{derive_seed, run, SimError};

/// A run-twice mismatch, or a run failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExploreError {
    /// One run failed.
    #[error("seed {seed}: {error}")]
    Run {
        /// The seed of the failing run.
        seed: u64,
        /// The scenario of the failing run.
        scenario: Box<Scenario>,
        /// What failed.
        error: SimError,
    },
    /// Two runs of the same seed and scenario differed.
    #[error("seed {seed}: two runs differ (trace {first} vs {second})")]
    Nondeterministic {
        /// The seed.
        seed: u64,
        /// Trace hash of the first run.
        first: String,
        /// Trace hash of the second run.
        second: String,
    },
    /// Writing an output file failed.
    #[error("cannot write {path}: {message}")]
    Output {
        /// The file.
        path: String,
        /// The error.
        message: String,
    },
}

/// Runs `scenario` with `seed`; with `twice`, runs it again and compares the reports.
pub fn run_checked(scenario: &Scenario, seed: u64, twice: bool) -> Result<Report, ExploreError> {
    let wrap = |error| ExploreError::Run {
        seed,
        scenario: Box::new(scenario.clone()),
        error,
    };
    let first = run(scenario, seed).map_err(wrap)?;
    if twice {
        let second = run(scenario, seed).map_err(wrap)?;
        if first != second {
            return Err(ExploreError::Nondeterministic {
                seed,
                first: first.trace_hash,
                second: second.trace_hash,
            });
        }
    }
    Ok(first)
}

/// One point of a sweep: the setting and its report.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// The scenario run.
    pub scenario: Scenario,
    /// What it gave.
    pub report: Report,
}

/// The settings of the default sweep: Classic over acquire intervals, Lease over ttls (and one
/// shorter interval), all on `base`.
pub fn default_sweep(base: &Scenario) -> Vec<Scenario> {
    let mut out = Vec::new();
    for secs in [1, 5, 30, 120] {
        let mut s = base.clone();
        s.protocol = Protocol::Classic;
        s.acquire_interval = Duration::from_secs(secs);
        out.push(s);
    }
    for (interval, ttl) in [(5, 10), (30, 3), (30, 10), (30, 30)] {
        let mut s = base.clone();
        s.protocol = Protocol::Lease;
        s.acquire_interval = Duration::from_secs(interval);
        s.lease_ttl = Duration::from_secs(ttl);
        out.push(s);
    }
    out
}

/// The cartesian product of the given settings on `base` (Lease ttls apply to Lease only).
pub fn grid(
    base: &Scenario,
    protocols: &[Protocol],
    intervals: &[Duration],
    ttls: &[Duration],
    processes: &[usize],
) -> Vec<Scenario> {
    let mut out = Vec::new();
    for &protocol in protocols {
        for &n in processes {
            for &interval in intervals {
                let ttls: Vec<Option<Duration>> = match protocol {
                    Protocol::Lease if !ttls.is_empty() => ttls.iter().copied().map(Some).collect(),
                    _ => vec![None],
                };
                for ttl in ttls {
                    let mut s = base.clone();
                    s.protocol = protocol;
                    s.processes = n;
                    s.acquire_interval = interval;
                    if let Some(ttl) = ttl {
                        s.lease_ttl = ttl;
                    }
                    out.push(s);
                }
            }
        }
    }
    out
}

/// Runs every scenario with the same seed (common random numbers: the same fault times).
pub fn sweep(scenarios: &[Scenario], seed: u64, twice: bool) -> Result<Vec<SweepPoint>, ExploreError> {
    scenarios
        .iter()
        .map(|s| {
            Ok(SweepPoint {
                scenario: s.clone(),
                report: run_checked(s, seed, twice)?,
            })
        })
        .collect()
}

fn failover_cell(r: &Report, kind: FaultKind) -> String {
    match r.failover.get(kind.as_str()) {
        Some(s) => format!("{:.1}/{:.1}", s.p50_s, s.max_s),
        None => "-".to_owned(),
    }
}

/// The trade-off table of a sweep.
pub fn sweep_table(points: &[SweepPoint]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>5} {:>8} {:>5} {:>9} {:>9} {:>10} {:>7} {:>6} {:>4} {:>7} {:>11} {:>11} {:>13} {:>11}",
        "protocol",
        "procs",
        "interval",
        "ttl",
        "stmt/s",
        "stmt/s/p",
        "loss s",
        "loss %",
        "lost",
        "dup",
        "split s",
        "stop p50/mx",
        "crash p50/mx",
        "cut p50/max",
        "term p50/mx"
    );
    for p in points {
        let r = &p.report;
        let _ = writeln!(
            out,
            "{:<8} {:>5} {:>8} {:>5} {:>9.3} {:>9.3} {:>10.1} {:>7.3} {:>6} {:>4} {:>7.1} {:>11} {:>11} {:>13} {:>11}",
            r.protocol,
            r.processes,
            r.acquire_interval,
            r.lease_ttl,
            r.statements_per_s,
            r.statements_per_s_per_process_mean,
            r.loss_window_s,
            r.loss_window_pct,
            r.lost_messages,
            r.duplicates,
            r.split_brain_s,
            failover_cell(r, FaultKind::Stop),
            failover_cell(r, FaultKind::Crash),
            failover_cell(r, FaultKind::Cut),
            failover_cell(r, FaultKind::Terminate),
        );
    }
    out
}

/// What became of the messages per fault kind, one row per point of a sweep: lost, duplicated
/// and replayed messages (`lost/dup/replayed`) of the terms that the holder-hitting faults of
/// each kind ended, and the duplicates without the replay flag.
pub fn messages_table(points: &[SweepPoint]) -> String {
    let kinds = [FaultKind::Stop, FaultKind::Crash, FaultKind::Cut, FaultKind::Terminate];
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<8} {:>8} {:>5} {:>9}",
        "protocol", "interval", "ttl", "published"
    );
    for kind in kinds {
        let _ = write!(out, " {:>14}", format!("{kind} l/d/r"));
    }
    let _ = writeln!(out, " {:>14} {:>9}", "none l/d/r", "unflagged");
    for p in points {
        let r = &p.report;
        let _ = write!(
            out,
            "{:<8} {:>8} {:>5} {:>9}",
            r.protocol, r.acquire_interval, r.lease_ttl, r.published
        );
        let cell = |name: &str| match r.messages_by_fault.get(name) {
            Some(m) => format!("{}/{}/{}", m.lost, m.duplicated, m.replayed),
            None => "-".to_owned(),
        };
        for kind in kinds {
            let _ = write!(out, " {:>14}", cell(kind.as_str()));
        }
        let _ = writeln!(out, " {:>14} {:>9}", cell("none"), r.unflagged_duplicates);
    }
    out
}

/// The sweep as CSV, one row per setting.
pub fn sweep_csv(points: &[SweepPoint]) -> String {
    let mut out = String::from(
        "protocol,processes,acquire_interval_s,lease_ttl_s,statements_per_s,statements_per_s_per_process,loss_window_s,loss_window_pct,longest_outage_s,published,lost_messages,duplicates,split_brain_s,stop_p50_s,stop_max_s,crash_p50_s,crash_max_s,cut_p50_s,cut_max_s,terminate_p50_s,terminate_max_s,events,trace_hash\n",
    );
    for p in points {
        let r = &p.report;
        let c = p.scenario.lock_config();
        let ttl = match p.scenario.protocol {
            Protocol::Lease => format!("{}", c.lease_ttl.as_secs_f64()),
            Protocol::Classic => String::new(),
        };
        let lat = |k: FaultKind| match r.failover.get(k.as_str()) {
            Some(s) => format!("{},{}", s.p50_s, s.max_s),
            None => ",".to_owned(),
        };
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.protocol,
            r.processes,
            p.scenario.acquire_interval.as_secs_f64(),
            ttl,
            r.statements_per_s,
            r.statements_per_s_per_process_mean,
            r.loss_window_s,
            r.loss_window_pct,
            r.longest_outage_s,
            r.published,
            r.lost_messages,
            r.duplicates,
            r.split_brain_s,
            lat(FaultKind::Stop),
            lat(FaultKind::Crash),
            lat(FaultKind::Cut),
            lat(FaultKind::Terminate),
            r.events,
            r.trace_hash
        );
    }
    out
}

/// Writes an SVG chart of loss window against database load, one series per protocol.
pub fn sweep_svg(points: &[SweepPoint], path: &std::path::Path) -> Result<(), ExploreError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| ExploreError::Output {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let floor = 0.1;
    let xs: Vec<f64> = points.iter().map(|p| p.report.statements_per_s.max(0.01)).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.report.loss_window_s.max(floor)).collect();
    let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
    let (x0, x1) = (fold(&xs, f64::min, f64::MAX) / 2.0, fold(&xs, f64::max, 0.0) * 2.0);
    let (y0, y1) = (fold(&ys, f64::min, f64::MAX) / 2.0, fold(&ys, f64::max, 0.0) * 2.0);
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("pgiplock: loss window vs database load", ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("lock statements per second at the server (total)")
        .y_desc("loss window, seconds (log)")
        .draw()
        .map_err(|e| err(&e))?;
    for (protocol, color) in [(Protocol::Classic, RED), (Protocol::Lease, BLUE)] {
        let mut series: Vec<(f64, f64, String)> = points
            .iter()
            .zip(xs.iter().zip(&ys))
            .filter(|(p, _)| p.scenario.protocol == protocol)
            .map(|(p, (x, y))| {
                let label = match protocol {
                    Protocol::Classic => format!("i={}", format_duration(p.scenario.acquire_interval)),
                    Protocol::Lease => format!(
                        "i={} ttl={}",
                        format_duration(p.scenario.acquire_interval),
                        format_duration(p.scenario.lease_ttl)
                    ),
                };
                (*x, *y, label)
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(series.iter().map(|(x, y, _)| (*x, *y)), color))
            .map_err(|e| err(&e))?
            .label(protocol.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(PointSeries::of_element(
                series.iter().map(|(x, y, l)| (*x, *y, l.clone())),
                4,
                color.filled(),
                &|(x, y, label), size, style| {
                    EmptyElement::at((x, y))
                        + Circle::new((0, 0), size, style)
                        + Text::new(label, (6, -14), ("sans-serif", 12))
                },
            ))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// What the tuner optimises for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TuneTarget {
    /// Keep the loss window at or below this per day; minimise load.
    MaxLossPerDay(Duration),
    /// Keep lock statements per second at or below this; minimise the loss window.
    MaxLoad(f64),
}

/// The tuner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneResult {
    /// Every candidate run.
    pub candidates: Vec<SweepPoint>,
    /// Index of the recommended candidate, if any meets the target.
    pub best: Option<usize>,
}

/// Candidate settings for the tuner on `base` (both protocols unless `protocol` is given).
pub fn tune_candidates(base: &Scenario, protocol: Option<Protocol>) -> Vec<Scenario> {
    let secs = |v: &[u64]| v.iter().map(|s| Duration::from_secs(*s)).collect::<Vec<_>>();
    let mut out = Vec::new();
    if protocol != Some(Protocol::Lease) {
        out.extend(grid(
            base,
            &[Protocol::Classic],
            &secs(&[1, 2, 5, 10, 30, 60, 120]),
            &[],
            &[base.processes],
        ));
    }
    if protocol != Some(Protocol::Classic) {
        out.extend(grid(
            base,
            &[Protocol::Lease],
            &secs(&[30]),
            &secs(&[2, 3, 5, 10, 20, 30, 60]),
            &[base.processes],
        ));
    }
    out
}

/// Runs the candidates and picks the one that meets `target` best.
pub fn tune(candidates: &[Scenario], seed: u64, target: TuneTarget) -> Result<TuneResult, ExploreError> {
    let points = sweep(candidates, seed, false)?;
    let day = 86_400.0;
    let loss_per_day = |p: &SweepPoint| p.report.loss_window_s * day / p.report.virtual_time_s.max(1.0);
    let mut best: Option<usize> = None;
    for (i, p) in points.iter().enumerate() {
        let (ok, key) = match target {
            TuneTarget::MaxLossPerDay(max) => (loss_per_day(p) <= max.as_secs_f64(), p.report.statements_per_s),
            TuneTarget::MaxLoad(max) => (p.report.statements_per_s <= max, loss_per_day(p)),
        };
        let better = |b: usize| {
            let other = match target {
                TuneTarget::MaxLossPerDay(_) => points[b].report.statements_per_s,
                TuneTarget::MaxLoad(_) => loss_per_day(&points[b]),
            };
            key < other
        };
        if ok && best.map_or(true, better) {
            best = Some(i);
        }
    }
    Ok(TuneResult {
        candidates: points,
        best,
    })
}

/// A scenario chosen by the seed (swarm testing): protocol, fleet, timings, faults (the
/// connection faults included: hanging handshakes, blips while connecting, lost setup replies,
/// schema drops, read-only windows), drift.
/// Short runs with many faults, so that the checkers see many situations.
pub fn swarm_scenario(seed: u64) -> Scenario {
    let mut r = SplitMix64::new(derive_seed(seed, 99, 0, 0));
    let pick = |r: &mut SplitMix64, v: &[u64]| v[r.below_inclusive(v.len() as u64 - 1) as usize];
    let mut s = Scenario {
        protocol: if r.below_inclusive(1) == 0 {
            Protocol::Lease
        } else {
            Protocol::Classic
        },
        processes: 2 + r.below_inclusive(6) as usize,
        channels: 1 + r.below_inclusive(2) as usize,
        duration: Duration::from_secs(pick(&mut r, &[600, 1200, 1800])),
        warmup: Duration::from_secs(10),
        acquire_interval: Duration::from_millis(pick(&mut r, &[200, 1000, 5000, 30_000])),
        lease_ttl: Duration::from_millis(pick(&mut r, &[500, 2000, 10_000])),
        publish_rate: pick(&mut r, &[0, 1, 5]) as f64,
        query_mean: Duration::from_micros(pick(&mut r, &[500, 2000, 20_000])),
        query_max: Duration::from_millis(pick(&mut r, &[50, 300])),
        server_keepalive_detect: Duration::from_secs(pick(&mut r, &[30, 120, 7875])),
        server_retransmit_detect: Duration::from_secs(pick(&mut r, &[5, 60, 924])),
        client_user_timeout: Duration::from_secs(pick(&mut r, &[2, 15])),
        terminate_permitted: r.below_inclusive(3) != 0,
        fault_target: if r.below_inclusive(1) == 0 {
            FaultTarget::Holder
        } else {
            FaultTarget::Any
        },
        fault_rates: FaultRates {
            stop: pick(&mut r, &[0, 10, 40]) as f64,
            crash: pick(&mut r, &[0, 10, 40]) as f64,
            cut: pick(&mut r, &[0, 10, 40]) as f64,
            terminate: pick(&mut r, &[0, 10, 40]) as f64,
            server_restart: pick(&mut r, &[0, 2, 10]) as f64,
            ..FaultRates::default()
        },
        restart_delay: Some(Duration::from_millis(pick(&mut r, &[0, 1000, 10_000]))),
        cut_duration: Duration::from_secs(pick(&mut r, &[1, 20, 120])),
        server_down: Duration::from_secs(pick(&mut r, &[1, 5])),
        max_steps: 20_000_000,
        ..Scenario::default()
    };
    // Drift stays within the bound the fence margin covers, so S2 is checked under Lease.
    let bound = match s.protocol {
        Protocol::Lease => s.drift_bound().min(0.1),
        Protocol::Classic => 0.001,
    };
    s.drift = bound * pick(&mut r, &[0, 10, 50]) as f64 / 100.0;
    // The connection faults from a stream of their own, so that the choices above stay what
    // they were for every seed (regression seeds keep their scenario's shape).
    let mut r = SplitMix64::new(derive_seed(seed, 98, 0, 0));
    s.fault_rates.connect_hang = pick(&mut r, &[0, 0, 10, 40]) as f64;
    s.fault_rates.connect_blip = pick(&mut r, &[0, 0, 10, 40]) as f64;
    s.fault_rates.setup_reply_loss = pick(&mut r, &[0, 0, 10, 40]) as f64;
    s.fault_rates.schema_drop = pick(&mut r, &[0, 0, 2, 10]) as f64;
    s.fault_rates.read_only = pick(&mut r, &[0, 0, 2, 10]) as f64;
    s.blip_duration = Duration::from_millis(pick(&mut r, &[200, 2000, 8000]));
    s.read_only_duration = Duration::from_secs(pick(&mut r, &[1, 20, 90]));
    s.setup_timeout = Duration::from_millis(pick(&mut r, &[500, 5000]));
    s.connect_timeout = Duration::from_millis(pick(&mut r, &[500, 5000]));
    s
}

/// Runs `runs` swarm scenarios from `first_seed` on, with every checker.
pub fn swarm(first_seed: u64, runs: u64, twice: bool) -> Result<Vec<(u64, Report)>, ExploreError> {
    (0..runs)
        .map(|i| {
            let seed = first_seed.wrapping_add(i);
            let scenario = swarm_scenario(seed);
            run_checked(&scenario, seed, twice).map(|r| (seed, r))
        })
        .collect()
}
