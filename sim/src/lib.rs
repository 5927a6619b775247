//! A deterministic fleet simulator for `pgiplock`: many processes, each running the real
//! [`pgiplock_core::Session`] (one connection's lifecycle and its [`pgiplock_core::Lock`]s,
//! driven as the `io` crate drives it), a model of the PostgreSQL server ([`db::SimDb`]), a
//! network per process that can be silently cut, injected faults, and the metrics of the design
//! (failover latency, loss window, lost and duplicated messages, split-brain time, database
//! load).
//!
//! Deterministic: one `u64` seed drives everything (through [`pgiplock_core::SplitMix64`]
//! streams derived from it), time is virtual, collections that affect output are ordered. The
//! same seed and scenario give the same trace hash and byte-identical output.
//!
//! ```
//! use pgiplock_sim::{run, Scenario};
//! use std::time::Duration;
//!
//! let mut scenario = Scenario::default();
//! scenario.processes = 3;
//! scenario.duration = Duration::from_secs(600);
//! let report = run(&scenario, 7).unwrap();
//! assert_eq!(report.split_brain_s, 0.0);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod actions;
pub mod check;
mod checkers;
pub mod db;
mod engine;
pub mod explore;
mod faults;
mod host;
mod indexed_heap;
pub mod metrics;
mod net;
mod process;
pub mod replication;
pub mod scenario;
mod session_map;
mod trace;
pub mod world;

pub use metrics::{LatencyStats, MessageCounts, Report};
pub use replication::{FailoverReport, Replication, ReplicationMode};
pub use scenario::{
    Action, ActionSpec, FaultKind, FaultRates, FaultSpec, FaultTarget, Mutant, Scenario, ScenarioError,
};
pub use world::{derive_seed, run, CheckFailure, Observation, Observed, SimError, World};
