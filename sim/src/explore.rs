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

/// The cartesian product of the given settings on `base` (Lease ttls apply to Lease only; no
/// channel counts: the base's).
pub fn grid(
    base: &Scenario,
    protocols: &[Protocol],
    intervals: &[Duration],
    ttls: &[Duration],
    processes: &[usize],
    channels: &[usize],
) -> Vec<Scenario> {
    let base_channels = [base.channels];
    let channels = if channels.is_empty() {
        &base_channels[..]
    } else {
        channels
    };
    let mut out = Vec::new();
    for &protocol in protocols {
        for (&n, &ch) in processes.iter().flat_map(|n| channels.iter().map(move |ch| (n, ch))) {
            for &interval in intervals {
                let ttls: Vec<Option<Duration>> = match protocol {
                    Protocol::Lease if !ttls.is_empty() => ttls.iter().copied().map(Some).collect(),
                    _ => vec![None],
                };
                for ttl in ttls {
                    let mut s = base.clone();
                    s.protocol = protocol;
                    s.processes = n;
                    s.channels = ch;
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
        "{:<8} {:>5} {:>5} {:>8} {:>5} {:>9} {:>9} {:>10} {:>7} {:>6} {:>4} {:>7} {:>11} {:>11} {:>13} {:>11}",
        "protocol",
        "procs",
        "chans",
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
            "{:<8} {:>5} {:>5} {:>8} {:>5} {:>9.3} {:>9.3} {:>10.1} {:>7.3} {:>6} {:>4} {:>7.1} {:>11} {:>11} {:>13} {:>11}",
            r.protocol,
            r.processes,
            p.scenario.channels,
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
        "protocol,processes,channels,acquire_interval_s,lease_ttl_s,statements_per_s,statements_per_s_per_process,loss_window_s,loss_window_pct,longest_outage_s,published,lost_messages,duplicates,split_brain_s,stop_p50_s,stop_max_s,crash_p50_s,crash_max_s,cut_p50_s,cut_max_s,terminate_p50_s,terminate_max_s,events,trace_hash\n",
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
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.protocol,
            r.processes,
            p.scenario.channels,
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
            &[],
        ));
    }
    if protocol != Some(Protocol::Classic) {
        out.extend(grid(
            base,
            &[Protocol::Lease],
            &secs(&[30]),
            &secs(&[2, 3, 5, 10, 20, 30, 60]),
            &[base.processes],
            &[],
        ));
    }
    out
}

/// The loss window of a run scaled to a day, seconds: what the tuner's loss target bounds.
pub fn loss_per_day(report: &Report) -> f64 {
    report.loss_window_s * 86_400.0 / report.virtual_time_s.max(1.0)
}

/// Runs the candidates and picks the one that meets `target` best.
pub fn tune(candidates: &[Scenario], seed: u64, target: TuneTarget) -> Result<TuneResult, ExploreError> {
    let points = sweep(candidates, seed, false)?;
    let loss_per_day = |p: &SweepPoint| loss_per_day(&p.report);
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

/// How much of a run's loss one fault kind accounts for (see [`dominant_fault`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LossShare {
    /// By lost messages: `lost` of the run's `total` lost messages were published in terms a
    /// fault of this kind ended ([`Report::messages_by_fault`]).
    Messages {
        /// Lost messages attributed to the kind.
        lost: u64,
        /// Lost messages of the run.
        total: u64,
    },
    /// No message was lost: by failover time, estimated as failovers times their median
    /// ([`Report::failover`] keeps no sum).
    Failovers {
        /// Failovers after faults of the kind.
        count: usize,
        /// Their median, seconds.
        p50_s: f64,
        /// Their longest, seconds.
        max_s: f64,
    },
}

/// The fault kind that dominates a run's loss, and by how much.
#[derive(Debug, Clone, PartialEq)]
pub struct DominantFault {
    /// The kind (`FaultKind::as_str`), or `none` for messages lost in terms no fault ended.
    pub kind: String,
    /// Its share.
    pub share: LossShare,
}

/// The fault kind most of `report`'s lost messages are attributed to; when none was lost, the
/// kind whose failovers took the longest in all (count times median); `None` when neither
/// happened. Ties go to the kind first in name order.
pub fn dominant_fault(report: &Report) -> Option<DominantFault> {
    let mut by_messages: Option<(&String, u64)> = None;
    for (kind, counts) in &report.messages_by_fault {
        if counts.lost > by_messages.map_or(0, |(_, lost)| lost) {
            by_messages = Some((kind, counts.lost));
        }
    }
    if let Some((kind, lost)) = by_messages {
        return Some(DominantFault {
            kind: kind.clone(),
            share: LossShare::Messages {
                lost,
                total: report.lost_messages,
            },
        });
    }
    let mut by_time: Option<(&String, f64)> = None;
    for (kind, stats) in &report.failover {
        let total = stats.count as f64 * stats.p50_s;
        if total > by_time.map_or(0.0, |(_, t)| t) {
            by_time = Some((kind, total));
        }
    }
    by_time.map(|(kind, _)| {
        let stats = &report.failover[kind];
        DominantFault {
            kind: kind.clone(),
            share: LossShare::Failovers {
                count: stats.count,
                p50_s: stats.p50_s,
                max_s: stats.max_s,
            },
        }
    })
}

/// The candidate of `result` with the most load below the load of candidate `of`: the next
/// cheaper setting (ties go to the earlier candidate).
pub fn next_cheaper(result: &TuneResult, of: usize) -> Option<usize> {
    let load = result.candidates.get(of)?.report.statements_per_s;
    let mut best: Option<usize> = None;
    for (i, p) in result.candidates.iter().enumerate() {
        let l = p.report.statements_per_s;
        if l < load && best.map_or(true, |b| l > result.candidates[b].report.statements_per_s) {
            best = Some(i);
        }
    }
    best
}

/// A candidate's setting in words: `classic at acquire_interval 5s`, `lease at acquire_interval
/// 30s, lease_ttl 10s`.
pub fn candidate_label(scenario: &Scenario) -> String {
    let interval = format_duration(scenario.acquire_interval);
    match scenario.protocol {
        Protocol::Lease => format!(
            "lease at acquire_interval {interval}, lease_ttl {}",
            format_duration(scenario.lock_config().lease_ttl)
        ),
        Protocol::Classic => format!("classic at acquire_interval {interval}"),
    }
}

/// Whether `report` meets `target`.
fn meets(report: &Report, target: TuneTarget) -> bool {
    match target {
        TuneTarget::MaxLossPerDay(max) => loss_per_day(report) <= max.as_secs_f64(),
        TuneTarget::MaxLoad(max) => report.statements_per_s <= max,
    }
}

/// One paragraph that explains the tuner's recommendation: why it wins, which fault kind
/// dominates its loss ([`dominant_fault`]), what its load is (statements per second at the
/// server, in total and per process), and what the next cheaper candidate ([`next_cheaper`])
/// would cost against it. `None` when no candidate met the target.
pub fn explain_tune(result: &TuneResult, target: TuneTarget) -> Option<String> {
    let best = result.best?;
    let p = result.candidates.get(best)?;
    let r = &p.report;
    let loss = loss_per_day(r);
    let mut out = String::new();
    let _ = match target {
        TuneTarget::MaxLossPerDay(max) => write!(
            out,
            "{} is the candidate with the least load whose loss window, {loss:.1} s per day, stays within {} per day.",
            candidate_label(&p.scenario),
            format_duration(max)
        ),
        TuneTarget::MaxLoad(max) => write!(
            out,
            "{} is the candidate with the least loss window, {loss:.1} s per day, whose load stays within {max} statements/s.",
            candidate_label(&p.scenario)
        ),
    };
    let _ = match dominant_fault(r) {
        Some(DominantFault {
            kind,
            share: LossShare::Messages { lost, total },
        }) if kind == "none" => write!(
            out,
            " Most lost messages, {lost} of the {total}, were published in terms that no fault ended."
        ),
        Some(DominantFault {
            kind,
            share: LossShare::Messages { lost, total },
        }) => {
            let pct = 100.0 * lost as f64 / total.max(1) as f64;
            let _ = write!(
                out,
                " Faults of kind {kind} dominate the loss: {lost} of the {total} lost messages ({pct:.0}%) were published in terms a {kind} fault ended"
            );
            match r.failover.get(&kind) {
                Some(s) => write!(
                    out,
                    ", and its failovers ({}) took {:.1} s at the median and {:.1} s at most.",
                    s.count, s.p50_s, s.max_s
                ),
                None => write!(out, "."),
            }
        }
        Some(DominantFault {
            kind,
            share: LossShare::Failovers { count, p50_s, max_s },
        }) => write!(
            out,
            " No message was lost; faults of kind {kind} dominate the loss window: their failovers ({count}) took {p50_s:.1} s at the median and {max_s:.1} s at most, about {:.1} s of the run's {:.1} s.",
            count as f64 * p50_s,
            r.loss_window_s
        ),
        None => write!(out, " Nothing was lost and no failover happened."),
    };
    let _ = write!(
        out,
        " The load is {:.3} statements/s at the server, {:.3} per process on average (the busiest {:.3}).",
        r.statements_per_s, r.statements_per_s_per_process_mean, r.statements_per_s_per_process_max
    );
    let _ = match next_cheaper(result, best) {
        Some(j) => {
            let c = &result.candidates[j];
            let cr = &c.report;
            write!(
                out,
                " The next cheaper candidate, {}, would cost {:.3} statements/s ({:.3} per process) against {:.3}, with a loss window of {:.1} s per day and {} lost messages against {loss:.1} s and {}{}.",
                candidate_label(&c.scenario),
                cr.statements_per_s,
                cr.statements_per_s_per_process_mean,
                r.statements_per_s,
                loss_per_day(cr),
                cr.lost_messages,
                r.lost_messages,
                if meets(cr, target) { "" } else { ": it misses the target" }
            )
        }
        None => write!(out, " No candidate is cheaper."),
    };
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LatencyStats, MessageCounts};

    /// A real report of a short run, with its per-kind figures replaced.
    fn report(lost: &[(&str, u64)], failovers: &[(&str, usize, f64)]) -> Report {
        let s = Scenario {
            processes: 2,
            duration: Duration::from_secs(600),
            ..Scenario::default()
        };
        let mut r = run(&s, 1).expect("a short run");
        r.messages_by_fault = lost
            .iter()
            .map(|&(k, n)| {
                let counts = MessageCounts {
                    published: n,
                    lost: n,
                    ..MessageCounts::default()
                };
                (k.to_owned(), counts)
            })
            .collect();
        r.lost_messages = lost.iter().map(|(_, n)| n).sum();
        r.failover = failovers
            .iter()
            .map(|&(k, count, p50_s)| {
                let stats = LatencyStats {
                    count,
                    p50_s,
                    p90_s: p50_s,
                    max_s: p50_s * 2.0,
                };
                (k.to_owned(), stats)
            })
            .collect();
        r
    }

    #[test]
    fn the_kind_with_the_most_lost_messages_dominates() {
        let r = report(&[("crash", 3), ("cut", 9), ("stop", 0)], &[("crash", 40, 10.0)]);
        let d = dominant_fault(&r).expect("a dominant kind");
        assert_eq!(d.kind, "cut");
        assert_eq!(d.share, LossShare::Messages { lost: 9, total: 12 });
        // A tie goes to the kind first in name order.
        let r = report(&[("terminate", 5), ("crash", 5)], &[]);
        assert_eq!(dominant_fault(&r).map(|d| d.kind), Some("crash".to_owned()));
    }

    #[test]
    fn without_lost_messages_the_longest_failovers_dominate() {
        // 3 x 10 s of crashes against 20 x 1 s of stops.
        let r = report(&[("none", 0)], &[("crash", 3, 10.0), ("stop", 20, 1.0)]);
        let d = dominant_fault(&r).expect("a dominant kind");
        assert_eq!(d.kind, "crash");
        assert_eq!(
            d.share,
            LossShare::Failovers {
                count: 3,
                p50_s: 10.0,
                max_s: 20.0
            }
        );
        assert_eq!(dominant_fault(&report(&[], &[("stop", 4, 0.0)])), None);
    }

    #[test]
    fn the_next_cheaper_candidate_has_the_most_load_below() {
        let point = |load: f64| {
            let mut r = report(&[], &[]);
            r.statements_per_s = load;
            SweepPoint {
                scenario: Scenario::default(),
                report: r,
            }
        };
        let result = TuneResult {
            candidates: vec![point(5.0), point(1.0), point(3.0), point(3.0), point(0.5)],
            best: Some(0),
        };
        assert_eq!(next_cheaper(&result, 0), Some(2));
        assert_eq!(next_cheaper(&result, 2), Some(1));
        assert_eq!(next_cheaper(&result, 4), None);
        let why = explain_tune(&result, TuneTarget::MaxLoad(10.0)).expect("a paragraph");
        assert!(why.contains("would cost 3.000 statements/s"), "{why}");
        assert!(why.contains("Nothing was lost and no failover happened."), "{why}");
        let none = TuneResult { best: None, ..result };
        assert_eq!(explain_tune(&none, TuneTarget::MaxLoad(10.0)), None);
    }
}
