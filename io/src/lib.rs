//! `pgiplock`: one active `LISTEN`-er per PostgreSQL channel across a fleet of processes.
//!
//! Every process opens a [`Session`] (one connection), creates a [`PgIpLock`] per channel and
//! subscribes to it. Exactly one process per channel, the holder, receives the channel's
//! notifications; the others are standbys that take over when the holder releases, stops,
//! crashes or silently loses its network. The default [`Protocol::Lease`] keeps a lease on the
//! database clock with strictly increasing [`FenceToken`]s, and the holder fences itself before
//! its lease can expire; [`Protocol::Classic`] speaks the protocol of `@imqueue/pg-pubsub` so
//! that Rust and Node processes can share a lock.
//!
//! The state machines live in `pgiplock-core` (pure, deterministic): its `Session` decides when
//! to connect, how long every phase and request may take, when to reset and reconnect, how to
//! set each lock up and where each reply, notification and timer goes; each `Lock` runs one
//! channel's protocol. The simulator drives the very same code. This crate executes it with
//! tokio and tokio-postgres — one task per session opens connections, runs the operations,
//! feeds back replies, notifications, connection ends and time — and emits `tracing` events for
//! every state change. The lifecycle rules (every wait bounded, dropped handles released, a
//! panicking callback caught, a dropped schema set up again, a read-only server reported) are
//! in the README's "Lifecycle rules".
//!
//! ```no_run
//! use pgiplock::{LockOptions, Session, Shutdown};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config: tokio_postgres::Config = "postgres://postgres@127.0.0.1:5432/test".parse()?;
//! let session = Session::connect(config).await?;
//! let lock = session.lock("jobs", LockOptions::new())?;
//! // Opt in: SIGINT/SIGTERM/SIGABRT cancel `stop`, release every lock, close every session.
//! let stop = CancellationToken::new();
//! let shutdown = tokio::spawn(Shutdown::install(stop.clone())?.wait());
//! lock.init().await?; // creates the schema if needed and starts competing
//! // The work runs only for the term, and is dropped the moment the term ends.
//! lock.run_terms(|term| async move {
//!     println!("holding, fence token {:?}", term.token());
//!     term.ended().await;
//! })
//! .await?;
//! println!("stopped by {:?}", shutdown.await?);
//! # Ok(())
//! # }
//! ```
//!
//! The channel's notifications and every state change come through
//! [`PgIpLock::subscribe`]; [`PgIpLock::state`] is a watch of the state.
//!
//! Not for transaction-pooling proxies (PgBouncer in transaction mode): `LISTEN` and the
//! session's identity need a real session.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod clock;
mod driver;
mod error;
mod lock;
mod metrics;
mod session;
mod signal;
mod sql;
mod term;

pub use error::{ConfigError, DbError, Error, NameError, PgError};
pub use lock::{destroy_all, has_instances, LockMessage, LockOptions, PgIpLock, Subscription};
pub use pgiplock_core::{FenceToken, LostReason, Protocol, SignalKind, Warning};
pub use session::{Session, SessionOptions, DEFAULT_WAIT_FOR_WRITABLE};
pub use signal::{shutdown_on_signal, spawn_signal_handler, Shutdown};
pub use sql::{lock_status, lock_status_on, LockStatus};
pub use term::{LockState, Term};

/// Unstable, for this workspace's test kit only (feature `testkit`, off by default, exempt from
/// semver): the SQL executor and schema bootstrap that sessions run, so that tests can run a
/// protocol's operations on a connection of their own.
#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod testkit {
    pub use crate::sql::{
        await_holder, balance, bootstrap, execute, execute_batch, holder_key, unlisten, warm_up, BatchOp, BatchTarget,
        Target,
    };
}

/// The README's examples, compiled as doc tests so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
