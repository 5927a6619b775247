//! The sans-IO core of `pgiplock`: one lock per `LISTEN` channel as a deterministic state
//! machine.
//!
//! This crate is pure: it performs no I/O, reads no clock and draws no ambient randomness. Time
//! arrives as a [`Timestamp`] with every input, jitter comes from a seed given at construction,
//! and database work leaves as typed [`DbRequest`]s whose replies come back as inputs. The same
//! inputs in the same order always give the same outputs, which is what lets the simulator and
//! the property tests drive the very code that services run.
//!
//! The driver loop (the `pgiplock` crate's is the real one):
//!
//! ```
//! use pgiplock_core::*;
//!
//! let mut lock = Lock::new(ChannelName::new("jobs").unwrap(), LockConfig::default(), 1);
//! let mut now = Timestamp::ZERO;
//! lock.handle_input(now, Input::SessionUp(SessionId(1)));
//! lock.handle_input(now, Input::Start);
//! for _ in 0..3 {
//!     while let Some(output) = lock.poll_output() {
//!         match output {
//!             Output::Request(req) => { /* run req.op on req.session, answer with DbResult */ }
//!             Output::Event(event) => { /* report */ }
//!             Output::Deliver { payload, replay } => { /* hand to the application */ }
//!             Output::ResetSession(_) | Output::AttemptDone { .. } => {}
//!             _ => {}
//!         }
//!     }
//!     // Sleep until the next deadline (or an input arrives), then tick.
//!     if let Some((deadline, _why)) = lock.poll_timeout() {
//!         now = deadline;
//!     }
//!     lock.handle_input(now, Input::Tick);
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod balance;
pub mod check;
mod config;
mod duration;
mod event;
mod lock;
mod name;
mod proto;
mod replay;
mod rng;
mod session;
mod time;
pub mod watch;

pub use balance::{BalanceCounts, MAX_FREE_LISTED};
pub use config::{ConfigError, LockConfig, Protocol, MAX_SETTING, MIN_INTERVAL, MIN_LEASE_TTL};
pub use duration::{parse_duration, DurationError, MAX_DURATION};
pub use event::{Input, LockEvent, LostReason, Output, SignalKind, Warning};
pub use lock::{Lock, LockState, Phase, TimerKind};
pub use name::{
    quote_ident, AppName, ChannelName, NameError, SchemaName, DRAIN_CHANNEL_PREFIX, LOCK_CHANNEL_PREFIX,
    MAX_CHANNEL_BYTES, MAX_IDENTIFIER_BYTES,
};
pub use proto::{
    AcquireReply, DbError, DbOp, DbRequest, FenceToken, Marker, PreviousTerm, Progress, Reply, RequestId, SessionId,
    StaleHolder, TerminateOutcome, TOKEN_COUNTER_BITS,
};
pub use rng::SplitMix64;
pub use session::{
    AddLockError, BatchEntry, CallError, CallId, CallReply, ConnPhase, DownReason, LockCall, LockKey, LockTarget, OpId,
    OpReply, ServerIdentity, Session, SessionConfig, SessionEvent, SessionInput, SessionOp, SessionOutput,
    SessionRequest, SessionState, WATCH_IDLE_CLOSE, WATCH_LIMIT_BACKOFF,
};
pub use time::Timestamp;
pub use watch::{AwaitOutcome, WatchFailure};
