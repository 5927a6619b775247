//! One simulation run. A [`World`] composes the parts, each in its own module:
//!
//! - `engine`: the event queue, virtual time and the run loop;
//! - `process`: the simulated processes, each driving the real [`pgiplock_core::Session`] (its
//!   connection's lifecycle and its locks) as the `io` crate's driver does;
//! - `net`: the links (which faults cut), the messages both ways, and the server's end: its
//!   connections, dead-peer detection, the database model ([`crate::db::SimDb`]) and the
//!   publisher;
//! - `faults`: the fault schedule and injection;
//! - `checkers`: the invariants and bounds checked after every event;
//! - `trace`: the trace hash and the trace lines;
//! - [`crate::metrics`]: what the report measures.

use std::time::Duration;

use pgiplock_core::{ChannelName, LockConfig, SessionConfig, SplitMix64, Timestamp};

use crate::checkers::Checkers;
use crate::engine::{Engine, Event};
use crate::faults::Faults;
use crate::metrics::{Metrics, Report};
use crate::net::{Link, Server};
use crate::process::{session_config, Proc};
use crate::scenario::{Scenario, ScenarioError};
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

/// One simulation run. Build with [`World::new`], then [`World::run`].
pub struct World {
    pub(crate) seed: u64,
    pub(crate) scenario: Scenario,
    pub(crate) config: LockConfig,
    /// Every process's session settings.
    pub(crate) session_config: SessionConfig,
    pub(crate) channels: Vec<ChannelName>,
    pub(crate) end: Timestamp,
    pub(crate) warmup: Timestamp,
    pub(crate) publish_until: Timestamp,
    pub(crate) engine: Engine,
    pub(crate) procs: Vec<Proc>,
    pub(crate) alive_count: usize,
    /// Per process, its link to the server.
    pub(crate) links: Vec<Link>,
    pub(crate) server: Server,
    pub(crate) faults: Faults,
    pub(crate) checkers: Checkers,
    pub(crate) metrics: Metrics,
    pub(crate) trace: Trace,
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
        let mut world = World {
            seed,
            config,
            session_config,
            channels,
            end,
            warmup,
            publish_until,
            engine: Engine::new(),
            procs,
            alive_count: 0,
            links,
            server,
            faults,
            checkers,
            metrics,
            trace: Trace::new(),
            scenario,
        };
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
        if world.scenario.publish_rate > 0.0 {
            world.engine.schedule(warmup, Event::Publish);
        }
        Ok(world)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Runs to the end of the scenario, checking invariants after every event.
    pub fn run(mut self) -> Result<Report, SimError> {
        self.run_inner()
    }

    /// Like [`World::run`], also returning one line per event and per lock event (long).
    pub fn run_traced(mut self) -> (Result<Report, SimError>, Vec<String>) {
        self.trace.keep_lines();
        let result = self.run_inner();
        (result, self.trace.take_lines())
    }
}

/// Runs `scenario` with `seed` to completion.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, SimError> {
    World::new(scenario.clone(), seed)?.run()
}
