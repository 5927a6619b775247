//! Property-testing your own settings: give the ranges of your fleet's timings, size, channels,
//! publish rate, network and fault mix ([`Spec`]); the simulator draws many scenarios and
//! seeds from them, runs every checker on each, and returns a [`Summary`] with the
//! distributions it measured or the smallest failing scenario it found ([`Counterexample`]),
//! with the command that replays it.
//!
//! ```
//! use std::time::Duration;
//! use pgiplock_core::Protocol;
//! use pgiplock_sim::check::Spec;
//! use pgiplock_sim::FaultKind;
//!
//! let s = Duration::from_secs;
//! let mut spec = Spec::new(Protocol::Lease);
//! spec.processes = 3..=6;
//! spec.acquire_interval = s(1)..=s(5);
//! spec.lease_ttl = s(3)..=s(10);
//! spec.publish_rate = 1.0..=5.0;
//! spec.duration = s(300)..=s(300);
//! spec.fault_rates.insert(FaultKind::Crash, 0.0..=30.0);
//! spec.fault_rates.insert(FaultKind::Cut, 0.0..=20.0);
//! match spec.check(2, 1) {
//!     Ok(summary) => println!("{summary}"),
//!     Err(error) => panic!("{error}"), // names the check, the seed and the replay command
//! }
//! ```
//!
//! The same ranges as a `proptest` strategy (feature `proptest`, on by default), where
//! proptest draws and shrinks the cases:
//!
//! ```
//! # #[cfg(feature = "proptest")] {
//! use proptest::prelude::*;
//! use pgiplock_sim::check::Spec;
//!
//! let spec = Spec::new(pgiplock_core::Protocol::Lease);
//! let strategy = spec.strategy().expect("valid ranges");
//! proptest!(ProptestConfig::with_cases(2), |(case in strategy)| {
//!     case.check()?; // a failure becomes the test's failure, with its replay command
//! });
//! # }
//! ```
//!
//! # What is checked
//!
//! Every case runs with [`Scenario::property_checks`] on, so that the replay command
//! (`pgiplock-sim run --seed N ... --property-checks true`) fails exactly as the case did. The
//! world checks after every event, and at the end of the run:
//!
//! | check | what it asks |
//! |---|---|
//! | `S1` | a channel's row names at most one live owner session |
//! | `S2` | under Lease, never two processes in a holder phase, **whatever the declared drift**: a fence margin too small for it fails here. A believer whose session the server already ended without telling it (a partitioned holder whose backend was terminated) is measured as `split_brain_session_ended_s` instead, unless [`Scenario::strict_s2`]: only its self-fencing bounds that overlap. Under Classic S2 is not promised (a silently vanished holder may still believe while a standby took over): the split-brain time is reported in the [`Summary`], never failed |
//! | `S3` | nothing is delivered by a lock that does not hold (delivery within tenure) |
//! | `S4` | fencing tokens rise per channel |
//! | `D1` | under Lease, no message delivered twice without the replay flag |
//! | `D2` | no replay after a graceful release the winner heard, none under Classic |
//! | `D1-graceful` | when the only faults are graceful stops, no message is delivered twice |
//! | `lost` | no message is lost that its holder heard, nor one that the standby winning the next term heard on the connection it won on, after the old holder's drain marker if that one released (Lease with replay on, unless that term reported a `Gap` or began on a fresh row, the first after a schema drop, which has no predecessor to replay from; Classic only after a release the server confirmed, by a winner that listened since before the drain marker) |
//! | `failover` | every failover completes within [`Scenario::liveness_bound`] of the last disturbance before it |
//! | `liveness` | after the last disturbance someone holds within the same bound |
//! | `load` | lock statements per second stay within [`load_bound`] |
//! | `phase-bound`, `deadline`, `steps` | no session waits past a deadline, no busy loop, the event limit |
//!
//! Messages a process never heard (published while no live process listened) may be lost under
//! both protocols; the summary counts them per fault kind.
//!
//! # Cases, seeds and shrinking
//!
//! Case `i` of [`Spec::check`] uses seed `first_seed + i`: the seed draws the scenario from the
//! ranges (each fault kind at the low end of its range one time in four, so that cases with
//! fewer kinds occur) and then drives the run. A failing case is shrunk deterministically with
//! the same seed: fewer processes, a shorter run, fewer fault kinds and lower rates, fewer
//! channels, fewer drawn stand-downs ([`Spec::stand_downs`]), each kept only if the same check
//! still fails, within [`Spec::shrink_runs`] runs.
//!
//! # Proof that the checks bite
//!
//! `tests/mutants.rs` runs this API against a holder that ignores its self-fence
//! ([`crate::Mutant::SkipFence`], S2), a fence margin below the declared drift (S2) and a standby
//! that delivers before it holds ([`crate::Mutant::StandbyDelivers`], S3), expecting a
//! counterexample each time whose replay fails the same way.

pub(crate) mod track;

#[cfg(feature = "proptest")]
mod strategy;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use pgiplock_core::{Protocol, SplitMix64, Timestamp};

use crate::metrics::{LatencyStats, MessageCounts, Report};
use crate::scenario::{format_duration, Action, ActionSpec, FaultKind, FaultRates, Scenario, ScenarioError};
use crate::world::{derive_seed, SimError, World};

/// The random stream that draws a case's scenario from its seed.
const STREAM_CASE: u64 = 7;

/// The relative slack of [`load_bound`] over the formula.
pub const LOAD_SLACK: f64 = 1.25;

/// The absolute slack of [`load_bound`], statements per second.
pub const LOAD_SLACK_PER_S: f64 = 0.1;

/// The settings a fleet runs with, as ranges: every case draws one value of each. A fixed
/// value is a range of one (`5..=5`). What no range covers comes from [`Spec::base`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Spec {
    /// Everything the ranges do not set (query latencies, dead-peer detection, restart delay,
    /// warmup, ...). [`Spec::new`] starts from [`Scenario::default`] with a 10 s warmup, no
    /// drawn faults and 30 s silent disconnects.
    pub base: Scenario,
    /// The protocols to try; each case picks one.
    pub protocols: Vec<Protocol>,
    /// Fleet size.
    pub processes: RangeInclusive<usize>,
    /// Channels (locks) per process.
    pub channels: RangeInclusive<usize>,
    /// Virtual time of one case (the warmup included).
    pub duration: RangeInclusive<Duration>,
    /// The standbys' retry interval.
    pub acquire_interval: RangeInclusive<Duration>,
    /// Lease length (Lease).
    pub lease_ttl: RangeInclusive<Duration>,
    /// Renewal (Lease) or ownership-check (Classic) interval; `None`: derived from the ttl
    /// (`ttl / 5` under Lease) or the core's default.
    pub renew_interval: Option<RangeInclusive<Duration>>,
    /// Self-fencing margin (Lease); `None`: `ttl / 10`.
    pub fence_margin: Option<RangeInclusive<Duration>>,
    /// How long a request may go unanswered before the session is reset.
    pub request_timeout: RangeInclusive<Duration>,
    /// Notifications per second on the first channel.
    pub publish_rate: RangeInclusive<f64>,
    /// One-way network delay.
    pub net_delay: RangeInclusive<Duration>,
    /// Clock-rate drift bound: every process's clock runs at a rate in `1 ± drift`.
    pub drift: RangeInclusive<f64>,
    /// Faults per hour of each kind; kinds not listed keep the base's rate.
    pub fault_rates: BTreeMap<FaultKind, RangeInclusive<f64>>,
    /// How long a silent disconnect lasts.
    pub cut_duration: RangeInclusive<Duration>,
    /// Stand-downs per case: each takes a drawn process out of the competition at a drawn time
    /// after the warmup (`stand_down`: a holder hands over gracefully, a standby stops
    /// attempting) and lets it compete again after [`Spec::stand_down_pause`].
    pub stand_downs: RangeInclusive<usize>,
    /// How long a stood-down process stays out before it competes again.
    pub stand_down_pause: RangeInclusive<Duration>,
    /// Most runs one shrink may take.
    pub shrink_runs: u32,
}

impl Spec {
    /// The library's default timings for `protocol` (30 s acquire interval, 10 s lease), 3 to 5
    /// processes on one channel, 1 notification per second, 10 minutes per case, and a fault
    /// mix of up to 20 stops, 20 crashes, 10 silent disconnects (of 30 s) and 10 server-side
    /// terminations per hour on the holder.
    pub fn new(protocol: Protocol) -> Spec {
        let base = Scenario {
            protocol,
            duration: Duration::from_secs(600),
            warmup: Duration::from_secs(10),
            fault_rates: FaultRates::default(),
            cut_duration: Duration::from_secs(30),
            max_steps: 20_000_000,
            ..Scenario::default()
        };
        let fixed = |d: Duration| d..=d;
        Spec {
            protocols: vec![protocol],
            processes: 3..=5,
            channels: base.channels..=base.channels,
            duration: fixed(base.duration),
            acquire_interval: fixed(base.acquire_interval),
            lease_ttl: fixed(base.lease_ttl),
            renew_interval: None,
            fence_margin: None,
            request_timeout: fixed(base.request_timeout),
            publish_rate: base.publish_rate..=base.publish_rate,
            net_delay: fixed(base.net_delay),
            drift: base.drift..=base.drift,
            fault_rates: [
                (FaultKind::Stop, 0.0..=20.0),
                (FaultKind::Crash, 0.0..=20.0),
                (FaultKind::Cut, 0.0..=10.0),
                (FaultKind::Terminate, 0.0..=10.0),
            ]
            .into_iter()
            .collect(),
            cut_duration: fixed(base.cut_duration),
            stand_downs: 0..=0,
            stand_down_pause: Duration::from_secs(5)..=Duration::from_secs(60),
            shrink_runs: 40,
            base,
        }
    }

    /// Checks the ranges: none empty, every setting usable at its extremes (the corners where
    /// the lease's timings are tightest included).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.protocols.is_empty() {
            return Err(SpecError::Invalid(
                "protocols: at least one protocol is needed".to_owned(),
            ));
        }
        fn ordered<T: PartialOrd + fmt::Debug>(name: &'static str, r: &RangeInclusive<T>) -> Result<(), SpecError> {
            // Incomparable (NaN) ends are refused too.
            if !matches!(r.start().partial_cmp(r.end()), Some(Ordering::Less | Ordering::Equal)) {
                return Err(SpecError::EmptyRange {
                    name,
                    range: format!("{:?}..={:?}", r.start(), r.end()),
                });
            }
            Ok(())
        }
        ordered("processes", &self.processes)?;
        ordered("channels", &self.channels)?;
        ordered("duration", &self.duration)?;
        ordered("acquire_interval", &self.acquire_interval)?;
        ordered("lease_ttl", &self.lease_ttl)?;
        if let Some(r) = &self.renew_interval {
            ordered("renew_interval", r)?;
        }
        if let Some(r) = &self.fence_margin {
            ordered("fence_margin", r)?;
        }
        ordered("request_timeout", &self.request_timeout)?;
        ordered("publish_rate", &self.publish_rate)?;
        ordered("net_delay", &self.net_delay)?;
        ordered("drift", &self.drift)?;
        ordered("cut_duration", &self.cut_duration)?;
        ordered("stand_downs", &self.stand_downs)?;
        ordered("stand_down_pause", &self.stand_down_pause)?;
        for (kind, r) in &self.fault_rates {
            ordered(kind.as_str(), r)?;
        }
        let floor = self.base.warmup + Duration::from_secs(30);
        if *self.duration.start() < floor {
            return Err(SpecError::Invalid(format!(
                "duration: at least the warmup plus 30s ({}) is needed to measure anything",
                format_duration(floor)
            )));
        }
        // The lease's constraints (margin < ttl, renew < ttl - margin) are tightest at the
        // shortest ttl with the longest renew interval and margin; the others at either end.
        let corners: [(&'static str, Draw); 3] = [
            ("the low end of every range", self.corner(Corner::Low)),
            ("the high end of every range", self.corner(Corner::High)),
            (
                "the shortest lease ttl with the longest renew interval and fence margin",
                self.corner(Corner::TightLease),
            ),
        ];
        for protocol in &self.protocols {
            for (corner, draw) in &corners {
                let mut draw = draw.clone();
                draw.protocol = *protocol;
                self.scenario(&draw)
                    .validate()
                    .map_err(|error| SpecError::Scenario { corner, error })?;
            }
        }
        Ok(())
    }

    /// The case of seed `seed`: its scenario drawn from the ranges by the seed.
    pub fn case(&self, seed: u64) -> Result<Case, SpecError> {
        self.validate()?;
        Ok(self.case_unchecked(seed))
    }

    fn case_unchecked(&self, seed: u64) -> Case {
        let mut r = SplitMix64::new(derive_seed(seed, STREAM_CASE, 0, 0));
        let protocol = self.protocols[r.below_inclusive(self.protocols.len() as u64 - 1) as usize];
        let count = |r: &mut SplitMix64, range: &RangeInclusive<usize>| {
            range.start() + r.below_inclusive((range.end() - range.start()) as u64) as usize
        };
        let processes = count(&mut r, &self.processes);
        let channels = count(&mut r, &self.channels);
        let draw = Draw {
            protocol,
            processes,
            channels,
            duration: draw_duration(&mut r, &self.duration),
            acquire_interval: draw_duration(&mut r, &self.acquire_interval),
            lease_ttl: draw_duration(&mut r, &self.lease_ttl),
            renew_interval: self.renew_interval.as_ref().map(|x| draw_duration(&mut r, x)),
            fence_margin: self.fence_margin.as_ref().map(|x| draw_duration(&mut r, x)),
            request_timeout: draw_duration(&mut r, &self.request_timeout),
            publish_rate: draw_f64(&mut r, &self.publish_rate, 100.0),
            net_delay: draw_duration(&mut r, &self.net_delay),
            drift: draw_f64(&mut r, &self.drift, 1e6),
            cut_duration: draw_duration(&mut r, &self.cut_duration),
            fault_rates: self
                .fault_rates
                .iter()
                .map(|(kind, range)| {
                    // One time in four at the low end: cases with fewer kinds of fault.
                    let rate = if r.below_inclusive(3) == 0 {
                        *range.start()
                    } else {
                        draw_f64(&mut r, range, 100.0)
                    };
                    (*kind, rate)
                })
                .collect(),
            actions: Vec::new(),
        };
        // Drawn last, and only when asked for: the other draws of a seed stay what they were.
        let mut draw = draw;
        if *self.stand_downs.end() > 0 {
            let n = count(&mut r, &self.stand_downs);
            let from = self.base.warmup.min(draw.duration);
            let window = from..=draw.duration.max(from);
            for _ in 0..n {
                let at = draw_duration(&mut r, &window);
                let process = r.below_inclusive(draw.processes.max(1) as u64 - 1) as usize;
                let pause = draw_duration(&mut r, &self.stand_down_pause);
                draw.actions.push(ActionSpec {
                    at,
                    action: Action::StandDown,
                    process: Some(process),
                });
                draw.actions.push(ActionSpec {
                    at: at + pause,
                    action: Action::Compete,
                    process: Some(process),
                });
            }
        }
        Case {
            seed,
            scenario: self.scenario(&draw),
        }
    }

    /// The scenario of one draw: the base with the drawn values and the property checks on.
    fn scenario(&self, d: &Draw) -> Scenario {
        let mut s = self.base.clone();
        s.protocol = d.protocol;
        s.processes = d.processes;
        s.channels = d.channels;
        s.duration = d.duration;
        s.acquire_interval = d.acquire_interval;
        s.lease_ttl = d.lease_ttl;
        s.renew_interval = d.renew_interval.or(s.renew_interval);
        s.fence_margin = d.fence_margin.or(s.fence_margin);
        s.request_timeout = d.request_timeout;
        s.publish_rate = d.publish_rate;
        s.net_delay = d.net_delay;
        s.drift = d.drift;
        s.cut_duration = d.cut_duration;
        for (kind, rate) in &d.fault_rates {
            *s.fault_rates.of_mut(*kind) = *rate;
        }
        s.actions.extend(d.actions.iter().cloned());
        s.property_checks = true;
        s
    }

    fn corner(&self, corner: Corner) -> Draw {
        fn pick<T: Copy>(r: &RangeInclusive<T>, high: bool) -> T {
            if high {
                *r.end()
            } else {
                *r.start()
            }
        }
        let high = corner != Corner::Low;
        let ttl_high = corner == Corner::High;
        Draw {
            protocol: self.protocols[0],
            processes: pick(&self.processes, high),
            channels: pick(&self.channels, high),
            duration: pick(&self.duration, high),
            acquire_interval: pick(&self.acquire_interval, high),
            lease_ttl: pick(&self.lease_ttl, ttl_high),
            renew_interval: self.renew_interval.as_ref().map(|r| pick(r, high)),
            fence_margin: self.fence_margin.as_ref().map(|r| pick(r, high)),
            request_timeout: pick(&self.request_timeout, high),
            publish_rate: pick(&self.publish_rate, high),
            net_delay: pick(&self.net_delay, high),
            drift: pick(&self.drift, high),
            cut_duration: pick(&self.cut_duration, high),
            fault_rates: self.fault_rates.iter().map(|(k, r)| (*k, pick(r, high))).collect(),
            actions: Vec::new(),
        }
    }

    /// Runs `cases` cases, seeds `first_seed`, `first_seed + 1`, ...: the summary of them all,
    /// or the first failure found, shrunk.
    pub fn check(&self, cases: u64, first_seed: u64) -> Result<Summary, CheckError> {
        self.validate()?;
        let mut summary = Summary::new(first_seed);
        for i in 0..cases {
            let case = self.case_unchecked(first_seed.wrapping_add(i));
            match case.run() {
                Ok(run) => summary.add(&case, &run),
                Err(SimError::Check(failure)) => {
                    let counterexample = self.shrink(case, failure, i + 1);
                    return Err(CheckError::Failed(Box::new(counterexample)));
                }
                Err(SimError::Scenario(error)) => {
                    return Err(CheckError::Spec(SpecError::Case { seed: case.seed, error }));
                }
            }
        }
        summary.finish();
        Ok(summary)
    }

    /// A smaller scenario that still fails the same check, from `case` (which failed with
    /// `failure`), with the same seed.
    fn shrink(&self, case: Case, failure: crate::CheckFailure, cases_run: u64) -> Counterexample {
        let original = case.scenario.clone();
        let mut current = case.scenario;
        let mut failure = failure;
        let mut steps = 0;
        let mut runs = 0;
        'outer: while runs < self.shrink_runs {
            for candidate in self.smaller(&current, failure.at) {
                if runs >= self.shrink_runs {
                    break 'outer;
                }
                runs += 1;
                if let Err(SimError::Check(f)) = crate::world::run(&candidate, case.seed) {
                    if f.checker == failure.checker {
                        current = candidate;
                        failure = f;
                        steps += 1;
                        continue 'outer;
                    }
                }
            }
            break;
        }
        Counterexample {
            checker: failure.checker,
            message: failure.message,
            at: failure.at,
            seed: case.seed,
            scenario: current,
            original,
            shrink_steps: steps,
            shrink_runs: runs,
            cases_run,
        }
    }

    /// Smaller variants of `s`, the boldest first: fewer processes, a shorter run (ending soon
    /// after the failure at `at`, or shorter by half), each fault kind dropped to the low end of
    /// its range or its rate halved towards it, fewer channels.
    fn smaller(&self, s: &Scenario, at: Timestamp) -> Vec<Scenario> {
        let mut out = Vec::new();
        let lo = *self.processes.start();
        for n in [lo, (s.processes + lo) / 2, s.processes.saturating_sub(1)] {
            if n >= lo.max(1) && n < s.processes && !out.iter().any(|c: &Scenario| c.processes == n) {
                out.push(Scenario {
                    processes: n,
                    ..s.clone()
                });
            }
        }
        let floor = self.base.warmup + Duration::from_secs(30);
        let after_failure = Duration::from_secs(at.as_micros() / 1_000_000 + 10);
        let half = Duration::from_secs((s.duration.as_secs() / 2).max(1));
        for d in [after_failure, half] {
            let d = d.max(floor);
            if d < s.duration && !out.iter().any(|c| c.duration == d && c.processes == s.processes) {
                out.push(Scenario {
                    duration: d,
                    ..s.clone()
                });
            }
        }
        for (kind, range) in &self.fault_rates {
            let rate = s.fault_rates.of(*kind);
            let low = *range.start();
            for candidate in [low, low + (rate - low) / 2.0] {
                let candidate = (candidate * 100.0).round() / 100.0;
                if candidate >= low && candidate < rate {
                    let mut c = s.clone();
                    *c.fault_rates.of_mut(*kind) = candidate;
                    out.push(c);
                }
            }
        }
        let lo = *self.channels.start();
        for n in [lo, s.channels.saturating_sub(1)] {
            if n >= lo.max(1) && n < s.channels && !out.iter().any(|c| c.channels == n) {
                out.push(Scenario {
                    channels: n,
                    ..s.clone()
                });
            }
        }
        // Fewer stand-downs: each one with its return to the competition, then all of them
        // (the base's own actions stay).
        let drawn: Vec<usize> = (self.base.actions.len()..s.actions.len()).step_by(2).collect();
        for &i in drawn.iter().rev() {
            let mut c = s.clone();
            c.actions.drain(i..(i + 2).min(c.actions.len()));
            out.push(c);
        }
        if drawn.len() > 1 {
            let mut c = s.clone();
            c.actions.truncate(self.base.actions.len());
            out.push(c);
        }
        out
    }
}

/// One drawn value per range.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Draw {
    pub(crate) protocol: Protocol,
    pub(crate) processes: usize,
    pub(crate) channels: usize,
    pub(crate) duration: Duration,
    pub(crate) acquire_interval: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) renew_interval: Option<Duration>,
    pub(crate) fence_margin: Option<Duration>,
    pub(crate) request_timeout: Duration,
    pub(crate) publish_rate: f64,
    pub(crate) net_delay: Duration,
    pub(crate) drift: f64,
    pub(crate) cut_duration: Duration,
    pub(crate) fault_rates: Vec<(FaultKind, f64)>,
    /// Drawn stand-downs, each followed by its `compete`.
    pub(crate) actions: Vec<ActionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corner {
    Low,
    High,
    TightLease,
}

/// Whole milliseconds when both ends are (the replay command stays readable), else
/// microseconds.
fn draw_duration(r: &mut SplitMix64, range: &RangeInclusive<Duration>) -> Duration {
    let (lo, hi) = (range.start().as_micros() as u64, range.end().as_micros() as u64);
    let unit = if lo % 1000 == 0 && hi % 1000 == 0 { 1000 } else { 1 };
    Duration::from_micros((lo / unit + r.below_inclusive(hi / unit - lo / unit)) * unit)
}

/// Rounded to `1 / per` (rates to hundredths, drift to millionths), within the range.
fn draw_f64(r: &mut SplitMix64, range: &RangeInclusive<f64>, per: f64) -> f64 {
    let (lo, hi) = (*range.start(), *range.end());
    let x = lo + r.unit() * (hi - lo);
    ((x * per).round() / per).clamp(lo, hi)
}

/// The lock statements per second a run's timings and faults imply (L4), with its slack: what
/// the `load` check holds the run's `statements_per_s` to. The faults are those the run
/// injected (`report.faults` over `report.virtual_time_s`), not their expected rates, so that a
/// short case with more faults than its rates predict is held to what it went through.
///
/// ```text
/// retry     = acquire_interval × (1 − retry_jitter)          the shortest retry interval
///             (Lease: min(acquire_interval, lease_ttl) × (1 − retry_jitter), as a standby
///              also retries when the lease it saw would expire)
/// idle      = channels × (1 / renew_interval + (processes − 1) / retry)
/// setup     = 1 + 3 × channels                               a reconnect: the bootstrap, two
///                                                            LISTENs and one attempt per lock
/// per_fault = 2 × setup + processes × channels               stop, crash, cut, terminate and
///                                                            the connection faults: the target
///                                                            reconnects, every standby wakes
///           = 2 × processes × setup                          server restart, schema drop
///           = processes × setup × (6 + read_only_duration / 5 s)   read-only: every process
///                                                            reconnects under the backoff
///           = 0                                              forge (a foreign session's)
/// actions   = (stand_down and compete actions) × (processes × channels + 2 × channels)
/// faults    = (Σ faults_of_kind × per_fault + actions) / measured seconds
/// bound     = LOAD_SLACK × (idle + faults) + LOAD_SLACK_PER_S
/// ```
pub fn load_bound(s: &Scenario, report: &Report) -> f64 {
    let c = s.lock_config();
    let n = s.processes as f64;
    let ch = s.channels as f64;
    let retry = match s.protocol {
        Protocol::Lease => c.acquire_interval.min(c.lease_ttl),
        Protocol::Classic => c.acquire_interval,
    }
    .as_secs_f64()
        * (1.0 - c.retry_jitter);
    let idle = ch * (1.0 / c.renew_interval.as_secs_f64() + (n - 1.0) / retry.max(1e-6));
    let setup = 1.0 + 3.0 * ch;
    let statements: f64 = FaultKind::ALL
        .into_iter()
        .map(|kind| {
            let per_fault = match kind {
                FaultKind::ServerRestart | FaultKind::SchemaDrop => 2.0 * n * setup,
                FaultKind::ReadOnly => n * setup * (6.0 + s.read_only_duration.as_secs_f64() / 5.0),
                FaultKind::Forge => 0.0,
                _ => 2.0 * setup + n * ch,
            };
            report.faults.get(kind.as_str()).copied().unwrap_or(0) as f64 * per_fault
        })
        .sum();
    // A stand-down hands over like a stop (every standby wakes and attempts) and its return
    // attempts once per lock; counted whenever they fall.
    let actions = s.actions.len() as f64 * (n * ch + 2.0 * ch);
    let faults = (statements + actions) / report.virtual_time_s.max(1.0);
    LOAD_SLACK * (idle + faults) + LOAD_SLACK_PER_S
}

/// One case: a seed and the scenario it drew (with the property checks on).
#[derive(Clone, PartialEq)]
pub struct Case {
    /// The seed: it drew the scenario and drives the run.
    pub seed: u64,
    /// The scenario.
    pub scenario: Scenario,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("seed", &self.seed)
            .field("replay", &self.command())
            .finish()
    }
}

/// A finished case: its report and the failovers it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRun {
    /// The run's report.
    pub report: Report,
    /// Every failover measured, with the kind of the fault that began it.
    pub failovers: Vec<(FaultKind, Duration)>,
}

impl Case {
    /// Runs the case with every check; a failure as a counterexample (not shrunk: under
    /// `proptest`, proptest shrinks).
    pub fn check(&self) -> Result<CaseRun, Box<Counterexample>> {
        self.run().map_err(|error| {
            Box::new(match error {
                SimError::Check(f) => Counterexample {
                    checker: f.checker,
                    message: f.message,
                    at: f.at,
                    seed: self.seed,
                    scenario: self.scenario.clone(),
                    original: self.scenario.clone(),
                    shrink_steps: 0,
                    shrink_runs: 0,
                    cases_run: 1,
                },
                other => Counterexample {
                    checker: "scenario",
                    message: other.to_string(),
                    at: Timestamp::ZERO,
                    seed: self.seed,
                    scenario: self.scenario.clone(),
                    original: self.scenario.clone(),
                    shrink_steps: 0,
                    shrink_runs: 0,
                    cases_run: 1,
                },
            })
        })
    }

    fn run(&self) -> Result<CaseRun, SimError> {
        let mut world = World::new(self.scenario.clone(), self.seed)?;
        let report = world.finish()?;
        Ok(CaseRun {
            report,
            failovers: world.property_failovers().to_vec(),
        })
    }

    /// The command that runs this case: `pgiplock-sim run --seed N ...`.
    pub fn command(&self) -> String {
        replay_command(self.seed, &self.scenario)
    }
}

fn replay_command(seed: u64, scenario: &Scenario) -> String {
    let args = scenario.to_cli_args();
    if args.is_empty() {
        format!("pgiplock-sim run --seed {seed}")
    } else {
        format!("pgiplock-sim run --seed {seed} {args}")
    }
}

/// The smallest failing scenario found: the failed check, the seed, and how to replay it.
#[derive(Debug, Clone, PartialEq)]
pub struct Counterexample {
    /// The check that failed (see the [module documentation](self)): `S2`, `lost`, ...
    pub checker: &'static str,
    /// What it saw.
    pub message: String,
    /// Virtual time of the failure.
    pub at: Timestamp,
    /// The seed of the failing case.
    pub seed: u64,
    /// The smallest scenario found that fails the same check with this seed.
    pub scenario: Scenario,
    /// The scenario the case first drew.
    pub original: Scenario,
    /// Shrinking steps kept, and runs tried.
    pub shrink_steps: u32,
    /// Runs the shrinking tried.
    pub shrink_runs: u32,
    /// Cases run until this one failed (it included).
    pub cases_run: u64,
}

impl Counterexample {
    /// The one-line command that replays the failure: `pgiplock-sim run --seed N ...`.
    pub fn command(&self) -> String {
        replay_command(self.seed, &self.scenario)
    }

    /// Runs the shrunk scenario again in this process (what [`Counterexample::command`] runs).
    pub fn replay(&self) -> Result<Report, SimError> {
        crate::world::run(&self.scenario, self.seed)
    }
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "check {} failed at {} (seed {}, case {} run; shrunk in {} steps over {} runs): {}",
            self.checker, self.at, self.seed, self.cases_run, self.shrink_steps, self.shrink_runs, self.message
        )?;
        writeln!(f, "scenario: {}", self.scenario.summary())?;
        write!(f, "replay with: {}", self.command())
    }
}

/// Ranges that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A range whose start lies after its end (or is NaN).
    #[error("{name}: the range {range} is empty (its start lies after its end)")]
    EmptyRange {
        /// The setting.
        name: &'static str,
        /// The range as given.
        range: String,
    },
    /// A setting that cannot be used at one corner of the ranges.
    #[error("the settings at {corner} are not usable: {error}")]
    Scenario {
        /// Which corner.
        corner: &'static str,
        /// Why.
        error: ScenarioError,
    },
    /// A drawn case that cannot be used.
    #[error("case seed {seed}: {error}")]
    Case {
        /// Its seed.
        seed: u64,
        /// Why.
        error: ScenarioError,
    },
    /// Anything else.
    #[error("{0}")]
    Invalid(String),
}

/// Why [`Spec::check`] returned no summary.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The ranges are not usable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A check failed: the smallest failing scenario found.
    #[error("{0}")]
    Failed(Box<Counterexample>),
}

impl CheckError {
    /// The counterexample, when a check failed.
    pub fn counterexample(&self) -> Option<&Counterexample> {
        match self {
            CheckError::Failed(c) => Some(c),
            CheckError::Spec(_) => None,
        }
    }
}

/// The spread of a measure over the cases.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Distribution {
    /// Samples.
    pub count: usize,
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Distribution {
    /// The distribution of `samples` (NaN sorts last; there are none in a report).
    pub fn of(samples: &[f64]) -> Distribution {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        if s.is_empty() {
            return Distribution::default();
        }
        let pick = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Distribution {
            count: s.len(),
            min: s[0],
            p50: pick(0.5),
            p90: pick(0.9),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// What the cases measured, when every check passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Cases run.
    pub cases: u64,
    /// The seeds: `first_seed .. first_seed + cases`.
    pub first_seed: u64,
    /// Cases per protocol.
    pub protocols: BTreeMap<String, u64>,
    /// Events simulated, over all cases.
    pub events: u64,
    /// Measured virtual time (after each warmup), seconds, over all cases.
    pub virtual_time_s: f64,
    /// Faults injected per kind, over all cases.
    pub faults: BTreeMap<String, u64>,
    /// Failover latency per fault kind, over all cases.
    pub failover: BTreeMap<String, LatencyStats>,
    /// Failovers still waiting at the end of their case.
    pub unresolved_failovers: usize,
    /// Messages per fault kind of the terms they were committed in, over all cases (see
    /// [`Report::messages_by_fault`]).
    pub messages_by_fault: BTreeMap<String, MessageCounts>,
    /// `Gap` events and the messages they reported missing.
    pub gap_events: u64,
    /// The sum of their `missing`.
    pub gap_missing: u64,
    /// Lock statements per second per case.
    pub load_per_s: Distribution,
    /// Per case, the load over its [`load_bound`].
    pub load_over_bound: Distribution,
    /// Per Lease case, split-brain time, seconds (S2 failed none of them).
    pub lease_split_brain_s: Distribution,
    /// Per Classic case, split-brain time, seconds: Classic does not promise S2, so this is
    /// reported, not checked.
    pub classic_split_brain_s: Distribution,
    /// Per case, the loss window (no live holder that can receive), seconds.
    pub loss_window_s: Distribution,
    samples: Samples,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Samples {
    failovers: BTreeMap<FaultKind, Vec<Duration>>,
    load: Vec<f64>,
    load_ratio: Vec<f64>,
    lease_split: Vec<f64>,
    classic_split: Vec<f64>,
    loss_window: Vec<f64>,
}

impl Summary {
    fn new(first_seed: u64) -> Summary {
        Summary {
            cases: 0,
            first_seed,
            protocols: BTreeMap::new(),
            events: 0,
            virtual_time_s: 0.0,
            faults: BTreeMap::new(),
            failover: BTreeMap::new(),
            unresolved_failovers: 0,
            messages_by_fault: BTreeMap::new(),
            gap_events: 0,
            gap_missing: 0,
            load_per_s: Distribution::default(),
            load_over_bound: Distribution::default(),
            lease_split_brain_s: Distribution::default(),
            classic_split_brain_s: Distribution::default(),
            loss_window_s: Distribution::default(),
            samples: Samples::default(),
        }
    }

    fn add(&mut self, case: &Case, run: &CaseRun) {
        let r = &run.report;
        self.cases += 1;
        *self.protocols.entry(r.protocol.clone()).or_insert(0) += 1;
        self.events += r.events;
        self.virtual_time_s += r.virtual_time_s;
        for (kind, n) in &r.faults {
            *self.faults.entry(kind.clone()).or_insert(0) += n;
        }
        for (kind, latency) in &run.failovers {
            self.samples.failovers.entry(*kind).or_default().push(*latency);
        }
        self.unresolved_failovers += r.unresolved_failovers;
        for (kind, m) in &r.messages_by_fault {
            let sum = self.messages_by_fault.entry(kind.clone()).or_default();
            sum.published += m.published;
            sum.lost += m.lost;
            sum.duplicated += m.duplicated;
            sum.replayed += m.replayed;
            sum.flagged_duplicates += m.flagged_duplicates;
            sum.unflagged_duplicates += m.unflagged_duplicates;
        }
        self.gap_events += r.gap_events;
        self.gap_missing += r.gap_missing;
        self.samples.load.push(r.statements_per_s);
        self.samples
            .load_ratio
            .push(r.statements_per_s / load_bound(&case.scenario, r));
        match case.scenario.protocol {
            Protocol::Lease => self.samples.lease_split.push(r.split_brain_s),
            Protocol::Classic => self.samples.classic_split.push(r.split_brain_s),
        }
        self.samples.loss_window.push(r.loss_window_s);
    }

    fn finish(&mut self) {
        self.failover = self
            .samples
            .failovers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), LatencyStats::of(v)))
            .collect();
        self.load_per_s = Distribution::of(&self.samples.load);
        self.load_over_bound = Distribution::of(&self.samples.load_ratio);
        self.lease_split_brain_s = Distribution::of(&self.samples.lease_split);
        self.classic_split_brain_s = Distribution::of(&self.samples.classic_split);
        self.loss_window_s = Distribution::of(&self.samples.loss_window);
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cases == 0 {
            return writeln!(f, "0 cases: nothing was checked");
        }
        let protocols: Vec<String> = self.protocols.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        writeln!(
            f,
            "{} cases (seeds {}..={}; {}), {} events, {:.0} s measured: every check passed",
            self.cases,
            self.first_seed,
            self.first_seed.wrapping_add(self.cases.saturating_sub(1)),
            protocols.join(" "),
            self.events,
            self.virtual_time_s
        )?;
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        writeln!(f, "faults            {}", faults.join(" "))?;
        writeln!(
            f,
            "{:<17} {:>6} {:>8} {:>8} {:>8}",
            "failover", "count", "p50 s", "p90 s", "max s"
        )?;
        for (kind, s) in &self.failover {
            writeln!(
                f,
                "{:<17} {:>6} {:>8.3} {:>8.3} {:>8.3}",
                kind, s.count, s.p50_s, s.p90_s, s.max_s
            )?;
        }
        writeln!(f, "unresolved        {}", self.unresolved_failovers)?;
        writeln!(
            f,
            "{:<17} {:>9} {:>6} {:>6} {:>8} {:>9} {:>8}",
            "messages after", "published", "lost", "dup", "flagged", "unflagged", "replayed"
        )?;
        for (kind, m) in &self.messages_by_fault {
            writeln!(
                f,
                "{:<17} {:>9} {:>6} {:>6} {:>8} {:>9} {:>8}",
                kind, m.published, m.lost, m.duplicated, m.flagged_duplicates, m.unflagged_duplicates, m.replayed
            )?;
        }
        writeln!(
            f,
            "gaps              {} (missing {})",
            self.gap_events, self.gap_missing
        )?;
        let dist = |d: &Distribution| {
            format!(
                "p50 {:.3}, p90 {:.3}, max {:.3} (min {:.3}, mean {:.3}, {} cases)",
                d.p50, d.p90, d.max, d.min, d.mean, d.count
            )
        };
        writeln!(f, "statements/s      {}", dist(&self.load_per_s))?;
        writeln!(f, "load / bound      {}", dist(&self.load_over_bound))?;
        writeln!(f, "loss window s     {}", dist(&self.loss_window_s))?;
        if self.lease_split_brain_s.count > 0 {
            writeln!(f, "split brain s     lease: {}", dist(&self.lease_split_brain_s))?;
        }
        if self.classic_split_brain_s.count > 0 {
            writeln!(
                f,
                "split brain s     classic (not promised): {}",
                dist(&self.classic_split_brain_s)
            )?;
        }
        Ok(())
    }
}
