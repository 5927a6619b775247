//! One simulation run. A [`World`] composes the parts, each in its own module:
//!
//! - `engine`: the event queue, virtual time and the run loop;
//! - `process`: the simulated processes, each driving the real [`pgiplock_core::Session`] (its
//!   connection's lifecycle and its locks) as the `io` crate's driver does;
//! - `net`: the links (which faults cut), the messages both ways, and the server's end: its
//!   connections, dead-peer detection, the database model ([`crate::db::SimDb`]) and the
//!   publisher;
//! - `faults`: the fault schedule and injection;
//! - `actions`: the scenario's scheduled steps on one process (a release, an attempt, a cut until
//!   a heal, a start);
//! - `checkers`: the invariants and bounds checked after every event;
//! - `trace`: the trace hash and the trace lines;
//! - [`crate::metrics`]: what the report measures.

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::{
    ChannelName, LockConfig, LockEvent, SessionConfig, SessionOp, SessionOutput, SplitMix64, Timestamp,
};

use crate::checkers::Checkers;
use crate::db::SimDb;
use crate::engine::{Engine, Event};
use crate::faults::Faults;
use crate::host::Host;
use crate::metrics::{Metrics, Report};
use crate::net::{Link, Server};
use crate::process::{session_config, Proc};
use crate::scenario::{ActionSpec, FaultSpec, Scenario, ScenarioError};
use crate::trace::Trace;

pub use crate::checkers::CheckFailure;

/// Why a run did not produce a report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is not usable.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// A checker failed.
    #[error(transparent)]
    Check(#[from] CheckFailure),
}

/// Derives an independent seed for a named stream (process, incarnation, lock) from the world seed.
pub fn derive_seed(seed: u64, stream: u64, a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
    let x = r.next_u64() ^ a.wrapping_mul(0xE703_7ED1_A0B4_28DB);
    let mut r = SplitMix64::new(x);
    let y = r.next_u64() ^ b.wrapping_mul(0x8EBC_6AF0_9C88_C6E3);
    SplitMix64::new(y).next_u64()
}

// The random streams, one per consumer, so that one part's draws never shift another's.
pub(crate) const STREAM_LOCK: u64 = 1;
pub(crate) const STREAM_PROC: u64 = 2;
pub(crate) const STREAM_FAULTS: u64 = 3;
pub(crate) const STREAM_SERVER: u64 = 4;
const STREAM_START: u64 = 5;
pub(crate) const STREAM_SESSION: u64 = 6;

/// What one process saw, in a recorded run (see [`World::record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Virtual (global) time.
    pub at: Timestamp,
    /// The process.
    pub process: usize,
    /// What happened.
    pub event: Observed,
}

/// One entry of a process's log in a recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Observed {
    /// The process started: a new incarnation with a new core session.
    Started,
    /// The process ended (it exited after a stop, or crashed): its locks are gone with it.
    Ended,
    /// The session asked to run an operation (whether or not the link carried it).
    Request(SessionOp),
    /// An event of the process's lock on channel `lock`.
    Lock {
        /// The channel's index.
        lock: usize,
        /// The event.
        event: LockEvent,
    },
    /// A notification of channel `lock` handed to the application.
    Delivered {
        /// The channel's index.
        lock: usize,
        /// Its payload.
        payload: String,
        /// Flagged as a replay (the previous holder may have delivered it too).
        replay: bool,
    },
}

/// One simulation run. Build with [`World::new`], then [`World::run`]; or, to look at the world
/// along the way, [`World::run_until`] and [`World::finish`].
///
/// ```
/// use pgiplock_sim::{Action, ActionSpec, Observed, Scenario, World};
/// use std::time::Duration;
///
/// let mut scenario = Scenario::default();
/// scenario.processes = 2;
/// scenario.duration = Duration::from_secs(60);
/// scenario.fault_rates = Default::default();
/// // The holder releases at 30 s and stays a standby; the other process takes over.
/// let at = Duration::from_secs(30);
/// scenario.actions.push(ActionSpec { at, action: Action::Release, process: None });
/// let mut world = World::new(scenario, 7).unwrap();
/// world.record();
/// world.run_until(Duration::from_secs(29)).unwrap();
/// let first = world.holders(0);
/// assert_eq!(first.len(), 1);
/// world.finish().unwrap();
/// let second = world.holders(0);
/// assert_eq!(second.len(), 1);
/// assert_ne!(first, second);
/// let released = world.observations().iter().any(|o| o.process == first[0]
///     && o.event == Observed::Lock { lock: 0, event: pgiplock_core::LockEvent::Released });
/// assert!(released);
/// ```
pub struct World {
    pub(crate) seed: u64,
    pub(crate) scenario: Scenario,
    pub(crate) config: LockConfig,
    /// Every process's session settings.
    pub(crate) session_config: SessionConfig,
    pub(crate) channels: Vec<ChannelName>,
    /// Channel name -> index in `channels`.
    pub(crate) channel_indexes: BTreeMap<ChannelName, usize>,
    pub(crate) end: Timestamp,
    pub(crate) warmup: Timestamp,
    pub(crate) publish_until: Timestamp,
    pub(crate) engine: Engine,
    pub(crate) procs: Vec<Proc>,
    pub(crate) alive_count: usize,
    /// Per process, its link to the server.
    pub(crate) links: Vec<Link>,
    pub(crate) server: Server,
    /// The clients' CPU, when the scenario gives them costs.
    pub(crate) host: Option<Host>,
    pub(crate) faults: Faults,
    pub(crate) checkers: Checkers,
    pub(crate) metrics: Metrics,
    pub(crate) trace: Trace,
    /// `Some` only for a recorded run.
    pub(crate) observations: Option<Vec<Observation>>,
    /// The first checker failure; the world does not run on after it.
    pub(crate) failure: Option<SimError>,
    /// The replica and its failovers (`None` without replication).
    pub(crate) replica: Option<crate::replication::Replica>,
    /// The buffer a process's session outputs are drained into (reused by every input).
    pub(crate) outputs: Vec<SessionOutput>,
    /// The property checks' state, when the scenario asks for them.
    pub(crate) property: Option<Box<crate::check::track::Tracker>>,
}

impl World {
    /// A world for `scenario`, driven by `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Result<World, SimError> {
        scenario.validate()?;
        let config = scenario.lock_config();
        let channels = (0..scenario.channels)
            .map(|i| ChannelName::new(&format!("ch{i}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        let end = Timestamp::ZERO + scenario.duration;
        let warmup = Timestamp::ZERO + scenario.warmup.min(scenario.duration);
        let publish_until = end.saturating_sub(Duration::from_secs(5)).max(warmup);
        let faults = Faults::new(&scenario, seed, publish_until);
        let procs = (0..scenario.processes)
            .map(|p| Proc::new(seed, p, scenario.drift))
            .collect();
        let links = (0..scenario.processes).map(|_| Link::new()).collect();
        let checkers = Checkers::new(&scenario);
        let server = Server::new(seed, scenario.terminate_permitted);
        let metrics = Metrics::new(scenario.processes, warmup, end);
        let session_config = session_config(scenario.connect_timeout, scenario.setup_timeout);
        let channel_indexes = channels.iter().cloned().enumerate().map(|(i, c)| (c, i)).collect();
        let mut world = World {
            seed,
            config,
            session_config,
            channels,
            channel_indexes,
            end,
            warmup,
            publish_until,
            engine: Engine::new(),
            procs,
            alive_count: 0,
            links,
            server,
            host: Host::of(&scenario),
            faults,
            checkers,
            metrics,
            trace: Trace::new(),
            observations: None,
            failure: None,
            replica: None,
            outputs: Vec::new(),
            property: scenario
                .property_checks
                .then(|| Box::new(crate::check::track::Tracker::new(&scenario))),
            scenario,
        };
        world.engine.set_lane_delay(Some(world.scenario.net_delay));
        let mut start_rng = SplitMix64::new(derive_seed(seed, STREAM_START, 0, 0));
        for p in 0..world.procs.len() {
            // Processes start within the first second, in a seeded order.
            let at = Timestamp::from_micros(start_rng.below_inclusive(1_000_000));
            world.engine.schedule(at, Event::ProcStart { p });
        }
        for index in 0..world.faults.specs.len() {
            let at = Timestamp::ZERO + world.faults.specs[index].at;
            world.engine.schedule(at, Event::Fault { index });
        }
        for index in 0..world.scenario.actions.len() {
            let at = Timestamp::ZERO + world.scenario.actions[index].at;
            world.engine.schedule(at, Event::Action { index });
        }
        if world.scenario.publish_rate > 0.0 {
            world.engine.schedule(warmup, Event::Publish);
        }
        world.replication_start();
        Ok(world)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Runs to the end of the scenario, checking invariants after every event.
    pub fn run(mut self) -> Result<Report, SimError> {
        self.run_judged()
    }

    /// Like [`World::run`], also returning one line per event and per lock event (long).
    pub fn run_traced(mut self) -> (Result<Report, SimError>, Vec<String>) {
        self.trace.keep_lines();
        let result = self.run_judged();
        (result, self.trace.take_lines())
    }

    /// Runs every event up to `until` from the start (at most the scenario's end), checking
    /// invariants after each; later events stay queued, so that calling it again (or
    /// [`World::finish`]) goes on exactly as one [`World::run`] would. After a checker failure
    /// it returns that failure again.
    pub fn run_until(&mut self, until: Duration) -> Result<(), SimError> {
        self.run_to(Timestamp::ZERO + until)
    }

    /// Runs to the end of the scenario; the report. The world stays readable afterwards.
    pub fn finish(&mut self) -> Result<Report, SimError> {
        self.run_judged()
    }

    /// Runs to the end, then gives the property checks' verdict (when the scenario asks for
    /// them); a failure is kept like a checker's.
    fn run_judged(&mut self) -> Result<Report, SimError> {
        let report = self.run_inner()?;
        if let Err(failure) = self.property_verdict(&report) {
            let error = SimError::from(failure);
            self.failure = Some(error.clone());
            return Err(error);
        }
        Ok(report)
    }

    /// The failover latencies the property checks recorded (empty unless the scenario asks
    /// for them), with their fault kinds.
    pub(crate) fn property_failovers(&self) -> &[(crate::scenario::FaultKind, Duration)] {
        self.property.as_deref().map_or(&[], |t| &t.failovers)
    }

    /// Schedules one more action, as if the scenario listed it (its time is clamped to the
    /// current one), for a test that picks it from what it saw so far.
    pub fn add_action(&mut self, spec: ActionSpec) -> Result<(), ScenarioError> {
        if spec.process.is_some_and(|p| p >= self.procs.len()) {
            return Err(ScenarioError::Invalid(
                "an action names a process index beyond the fleet".to_owned(),
            ));
        }
        let at = (Timestamp::ZERO + spec.at).max(self.engine.now);
        let index = self.scenario.actions.len();
        self.scenario.actions.push(spec);
        self.engine.schedule(at, Event::Action { index });
        Ok(())
    }

    /// Schedules one more fault, as if the scenario listed it (its time is clamped to the
    /// current one).
    pub fn add_fault(&mut self, spec: FaultSpec) -> Result<(), ScenarioError> {
        if spec.process.is_some_and(|p| p >= self.procs.len()) {
            return Err(ScenarioError::Invalid(
                "a fault names a process index beyond the fleet".to_owned(),
            ));
        }
        let at = (Timestamp::ZERO + spec.at).max(self.engine.now);
        let index = self.faults.specs.len();
        self.scenario.faults.push(spec.clone());
        self.faults.specs.push(spec);
        self.engine.schedule(at, Event::Fault { index });
        Ok(())
    }

    /// The time of the last event run.
    pub fn now(&self) -> Timestamp {
        self.engine.now
    }

    /// The scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    /// Channel `i` (`ch{i}`), the data channel being channel 0.
    pub fn channel(&self, i: usize) -> Option<&ChannelName> {
        self.channels.get(i)
    }

    /// The index of the channel named `name` (a map lookup, not a scan: a fleet may have
    /// thousands of channels).
    pub fn channel_index(&self, name: &str) -> Option<usize> {
        self.channel_indexes.get(name).copied()
    }

    /// The running processes whose lock on channel `i` is in a holder phase, in index order.
    pub fn holders(&self, i: usize) -> Vec<usize> {
        self.checkers
            .believers
            .get(i)
            .map(|set| set.iter().copied().filter(|&p| self.procs[p].alive()).collect())
            .unwrap_or_default()
    }

    /// The database model, as it stands.
    pub fn db(&self) -> &SimDb {
        &self.server.db
    }

    /// From now on, keeps a log of what each process sees: starts and ends, the operations its
    /// session sends, its lock events and deliveries ([`World::observations`]). Off by default,
    /// so that an ordinary run builds none of it; it changes nothing else.
    pub fn record(&mut self) {
        self.observations.get_or_insert_with(Vec::new);
    }

    /// The log kept since [`World::record`], in event order (empty when not recording).
    pub fn observations(&self) -> &[Observation] {
        self.observations.as_deref().unwrap_or_default()
    }

    /// Adds an entry to the log if one is kept; `event` is called only then.
    pub(crate) fn observe(&mut self, process: usize, event: impl FnOnce() -> Observed) {
        if let Some(log) = self.observations.as_mut() {
            log.push(Observation {
                at: self.engine.now,
                process,
                event: event(),
            });
        }
    }
}

/// Runs `scenario` with `seed` to completion.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, SimError> {
    World::new(scenario.clone(), seed)?.run()
}
