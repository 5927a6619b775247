//! The session: one database connection's whole life and every lock that uses it.
//!
//! A [`Session`] is to its [`Lock`]s what quinn-proto's `Endpoint` is to its connections: it owns
//! the connection's lifecycle (Down → Connecting → Preparing → Up → Down, with a deadline on
//! every phase and capped, jittered reconnect backoff), prepares each lock on each connection
//! (bootstrap of its schema once per connection, `LISTEN` of its channels), routes replies,
//! notifications and timers to locks through indexes (a map by channel, one ordered timer set),
//! turns API calls into lock inputs and completes them with [`SessionOutput::CallDone`], and
//! applies the cross-lock rules: a lock that asks for a reset resets the connection for all, a
//! missing schema is bootstrapped again, a read-only server is reported and left.
//!
//! Like the lock it is pure: the driver opens connections and runs operations when told to, and
//! feeds back what happened with the time.
//!
//! ```
//! use pgiplock_core::*;
//!
//! let mut session = Session::new(SessionConfig::default(), 7);
//! let key = LockKey(1);
//! let channel = ChannelName::new("jobs").unwrap();
//! let schema = SchemaName::new("locks").unwrap();
//! session.add_lock(key, channel, schema, LockConfig::default(), 1).unwrap();
//! let t0 = Timestamp::ZERO;
//! session.handle_input(t0, SessionInput::Call { call: CallId(1), lock: key, request: LockCall::Init });
//! session.handle_input(t0, SessionInput::Tick);
//! // The driver is asked to open a connection...
//! let Some(SessionOutput::Connect { session: id }) = session.poll_output() else { panic!() };
//! session.handle_input(t0, SessionInput::Connected { session: id, app: "app-1".into(), pid: 42 });
//! // ...and, once it is up, to bootstrap the schema, then to listen.
//! let next_request = |session: &mut Session| loop {
//!     match session.poll_output() {
//!         Some(SessionOutput::Execute(request)) => break request,
//!         Some(_) => continue,
//!         None => panic!("no request"),
//!     }
//! };
//! let bootstrap = next_request(&mut session);
//! assert!(matches!(bootstrap.op, SessionOp::Bootstrap { .. }));
//! assert_eq!(session.state().phase, ConnPhase::Preparing);
//! session.handle_input(t0, SessionInput::Reply { id: bootstrap.id, result: Ok(OpReply::Done) });
//! let listen = next_request(&mut session);
//! assert!(matches!(listen.op, SessionOp::Listen { .. }));
//! session.handle_input(t0, SessionInput::Reply { id: listen.id, result: Ok(OpReply::Done) });
//! // `init` is answered; the lock competes from now on.
//! assert!(std::iter::from_fn(|| session.poll_output()).any(|o| matches!(
//!     o,
//!     SessionOutput::CallDone { call: CallId(1), result: Ok(CallReply::Done) }
//! )));
//! assert_eq!(session.state().phase, ConnPhase::Up);
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::balance::BalanceCounts;
use crate::config::{LockConfig, Protocol};
use crate::event::{Input, LockEvent, LostReason, Output, SignalKind, Warning};
use crate::lock::{Lock, Phase, TimerKind};
use crate::name::{ChannelName, SchemaName};
use crate::proto::{AcquireReply, DbError, DbOp, Marker, Reply, RequestId, SessionId};
use crate::rng::SplitMix64;
use crate::time::{duration_micros, Timestamp};
use crate::watch::{wait_bounds, AwaitOutcome, Holder, Wait, Watch, WatchFailure, WatchLink};

/// Identifies a lock within its session; chosen by the driver when it adds the lock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct LockKey(pub u64);

/// Identifies one API call; chosen by the driver, echoed in [`SessionOutput::CallDone`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CallId(pub u64);

/// Identifies one operation the session asked the driver to run; echoed in
/// [`SessionInput::Reply`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct OpId(pub u64);

/// Timings of a session's connection. Every wait of a session is bounded by one of them (or by
/// the lock's own `request_timeout` and `shutdown_timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Bounds one whole connection attempt: TCP connect, TLS, startup, authentication and the
    /// identity query. An attempt still unfinished then is abandoned and retried after backoff.
    pub connect_timeout: Duration,
    /// Bounds each setup statement (schema bootstrap, `LISTEN`, `UNLISTEN`) on a connection; one
    /// unanswered this long resets the connection.
    pub setup_timeout: Duration,
    /// First reconnect delay; it doubles after every failed attempt up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay. Each delay is drawn uniformly in `[d / 2, d]` (equal jitter), so
    /// that a fleet does not reconnect in lockstep after a server restart. A connection that
    /// stays up this long resets the backoff to `backoff_min`.
    pub backoff_max: Duration,
    /// How long a connection stays open after a `Lease` lock stopped with a release that named
    /// a successor, waiting for the successor's `acquired` marker before it is closed (or, with
    /// the session still open, the lock's channels unlistened). A backend's exit takes
    /// milliseconds of server CPU, which a successor's winning statement would otherwise share
    /// on a small host; waiting for it moves that cost past the handover. A release that named
    /// nobody waits for nothing. `Duration::ZERO` closes at once.
    pub handover_linger: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            connect_timeout: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            handover_linger: Duration::from_millis(50),
        }
    }
}

impl SessionConfig {
    /// Clamps every timing to at least a millisecond and `backoff_max` to at least
    /// `backoff_min`, so that every deadline lies in the future.
    fn clamped(mut self) -> Self {
        let floor = |d: Duration| d.clamp(Duration::from_millis(1), crate::config::MAX_SETTING);
        self.connect_timeout = floor(self.connect_timeout);
        self.setup_timeout = floor(self.setup_timeout);
        self.backoff_min = floor(self.backoff_min);
        self.backoff_max = floor(self.backoff_max).max(self.backoff_min);
        self.handover_linger = self.handover_linger.min(crate::config::MAX_SETTING);
        self
    }
}

/// An API call on one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockCall {
    /// Set the lock up on the connection (bootstrap, `LISTEN`) and start competing. Completes
    /// once the lock is ready on a connection, or fails with the setup error, or with
    /// [`CallError::Disconnected`] when the connection attempt in progress fails (the lock keeps
    /// competing in the background).
    Init,
    /// One attempt now; completes with [`CallReply::Acquired`].
    Acquire,
    /// Give the lock up and stay a standby; completes once the server confirmed the release (or
    /// at once if not held, or when the term ends otherwise), or fails with
    /// [`CallError::ReleaseFailed`].
    Release,
    /// Stop competing but stay set up on the connection: release if held (completes as
    /// `Release` does), then make no attempt until the next `Init`.
    StandDown,
    /// Release if held and stop for good; completes once stopped (bounded by the lock's
    /// `shutdown_timeout`).
    Destroy {
        /// The OS signal that asked for it, if any (logged).
        signal: Option<SignalKind>,
    },
}

/// A successful call's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallReply {
    /// The call completed.
    Done,
    /// Answer to [`LockCall::Acquire`]: whether the lock is held now.
    Acquired(bool),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// Setting up the lock's schema failed.
    #[error("cannot set up lock schema {schema}: {error}")]
    Bootstrap {
        /// The schema.
        schema: String,
        /// What the server said.
        error: DbError,
    },
    /// The server refuses writes (a hot standby or `default_transaction_read_only`).
    #[error("the server is read-only (SQLSTATE 25006): locks need a writable primary")]
    ReadOnly,
    /// The session is not connected: the connection attempt failed.
    #[error("not connected to PostgreSQL: {cause}")]
    Disconnected {
        /// Why the last attempt failed.
        cause: String,
    },
    /// A release reached its drain marker (nothing more was delivered) but the server did not
    /// confirm it: see [`LockEvent::ReleaseFailed`].
    #[error("the release was not confirmed: {}", reason.as_str())]
    ReleaseFailed {
        /// Why.
        reason: LostReason,
    },
    /// No such lock (destroyed, or never added).
    #[error("the lock was destroyed")]
    NoSuchLock,
    /// The session is closing or closed.
    #[error("the session is closed")]
    Closed,
}

/// What an operation the session asked for returned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpReply {
    /// A setup statement (bootstrap, `LISTEN`, `UNLISTEN`) completed.
    Done,
    /// A lock operation's reply.
    Lock(Reply),
    /// The reply to [`SessionOp::RenewMany`] or [`SessionOp::AcquireMany`]: one reply per
    /// entry, in the entries' order.
    Batch(Vec<Reply>),
    /// The reply to [`SessionOp::Balance`]: the group's counts as the table has them.
    Balance(BalanceCounts),
    /// The reply to [`SessionOp::AwaitHolder`].
    Await(AwaitOutcome),
}

/// One lock's part of a batched statement ([`SessionOp::RenewMany`],
/// [`SessionOp::AcquireMany`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// The lock's key (for an executor's own bookkeeping).
    pub lock: LockKey,
    /// The lock it is for.
    pub target: Arc<LockTarget>,
    /// Its operation: a [`DbOp::Renew`] in a `RenewMany`, [`DbOp::Acquire`] in an
    /// `AcquireMany`.
    pub op: DbOp,
}

/// Everything an executor needs to run a lock's operation, beside the connection's
/// `application_name` and backend pid, which it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockTarget {
    /// The lock's protocol.
    pub protocol: Protocol,
    /// The schema of its table.
    pub schema: SchemaName,
    /// Its channel.
    pub channel: ChannelName,
    /// The lease length (`Lease`).
    pub lease_ttl: Duration,
}

/// One operation on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionOp {
    /// Create or check the lock schema of `protocol` (idempotent; safe from many sessions).
    Bootstrap {
        /// The protocol whose tables and functions to create.
        protocol: Protocol,
        /// The schema.
        schema: SchemaName,
    },
    /// `LISTEN` on the channels of a lock ([`ChannelName::listened`]: the channel, its lock
    /// channel and, under `Classic`, its drain channel).
    Listen {
        /// The channel.
        channel: ChannelName,
        /// The lock's protocol, which decides the channels.
        protocol: Protocol,
    },
    /// `LISTEN` on the channels of several locks in one statement (a multi-statement batch),
    /// as [`SessionOp::Listen`] does for each; the session sends locks that want setting up
    /// while a `LISTEN` is in flight together once it is answered.
    ListenMany {
        /// Each lock's channel and protocol.
        channels: Vec<(ChannelName, Protocol)>,
    },
    /// `UNLISTEN` the channels of a lock. Under `Lease` the backend also stops waiting for the
    /// channel: its row in `schema`'s waiter table goes (best effort, like the row itself), so
    /// that no release names as its successor a backend that no longer hears the marker.
    Unlisten {
        /// The channel.
        channel: ChannelName,
        /// The lock's protocol, which decides the channels.
        protocol: Protocol,
        /// The schema of the lock's table.
        schema: SchemaName,
    },
    /// A lock's operation (semantics on [`DbOp`]).
    Lock {
        /// The lock's key (for an executor's own bookkeeping).
        lock: LockKey,
        /// The lock it is for (shared, so that an operation costs no copy of its names).
        target: Arc<LockTarget>,
        /// The operation.
        op: DbOp,
    },
    /// The renewals of several `Lease` locks whose tables are in `schema`, as one statement
    /// (one transaction): each entry is exactly its [`DbOp::Renew`], conditional on its own row's
    /// holder and token, its progress marker sent from this backend when its row was renewed;
    /// one entry renewing nothing does not stop the others. Entries are sorted by channel, so
    /// that concurrent batches take row locks in one order. Answer with [`OpReply::Batch`]: one
    /// [`Reply::Renew`] per entry, in order.
    RenewMany {
        /// The schema of every entry's table.
        schema: SchemaName,
        /// The renewals, at least two.
        entries: Vec<BatchEntry>,
    },
    /// The acquisition attempts of several `Lease` locks whose tables are in `schema`, as one
    /// statement (one transaction): each entry is exactly its [`DbOp::Acquire`]. Sorted by
    /// channel. Answer with [`OpReply::Batch`]: one [`Reply::Acquire`] per entry, in order.
    AcquireMany {
        /// The schema of every entry's table.
        schema: SchemaName,
        /// The attempts, at least two.
        entries: Vec<BatchEntry>,
    },
    /// Fair share ([`LockConfig::balance`]): in one transaction, record this session (its
    /// `application_name` and backend pid) as a member of `group` in `schema`, or forget it when
    /// `leave`; add `register` to the group's channels (kept, like lease rows); forget members
    /// whose session is gone from `pg_stat_activity`; then answer [`OpReply::Balance`] with the
    /// group's channel count and, per live member in `application_name` order, the channels of
    /// the group whose lease it holds (holder and holder pid its own, unexpired), marking this
    /// session's place. Sent alongside the renewals and attempts of the group's locks, at most
    /// once per half renew interval.
    Balance {
        /// The schema of the group's lock table.
        schema: SchemaName,
        /// The group's name.
        group: String,
        /// Channels of the group to record (the first time on each connection).
        register: Vec<ChannelName>,
        /// This session no longer competes in the group.
        leave: bool,
    },
    /// The crash watch's wait, sent only on the watch connection ([`SessionOutput::WatchConnect`]):
    /// block until the session of backend `pid` no longer holds its advisory lock of `schema`
    /// ([`AwaitOutcome::Gone`]), its earliest lease in `schema` expires (`Expired`), it holds no
    /// lease there (`Released`), or `max` passes (`Timeout`); `Gone` at once if there is no
    /// such session, `Unwatched` if it is alive but holds no such advisory lock. Answer with
    /// [`OpReply::Await`].
    AwaitHolder {
        /// The schema of the holder's lease rows (and of its advisory lock's key).
        schema: SchemaName,
        /// The holder's backend pid.
        pid: i32,
        /// The longest wait.
        max: Duration,
    },
}

impl SessionOp {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            SessionOp::Bootstrap { .. } => "bootstrap",
            SessionOp::Listen { .. } => "listen",
            SessionOp::ListenMany { .. } => "listen_many",
            SessionOp::Unlisten { .. } => "unlisten",
            SessionOp::Lock { op, .. } => op.name(),
            SessionOp::RenewMany { .. } => "renew_many",
            SessionOp::AcquireMany { .. } => "acquire_many",
            SessionOp::Balance { .. } => "balance",
            SessionOp::AwaitHolder { .. } => "await_holder",
        }
    }
}

/// An operation to run; answer with [`SessionInput::Reply`] (or nothing, if the connection is
/// gone: the session has already forgotten it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRequest {
    /// Echo this id in the reply.
    pub id: OpId,
    /// Run on this connection.
    pub session: SessionId,
    /// The operation.
    pub op: SessionOp,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// The connection closed or failed (the driver's words, if any).
    Closed(Option<String>),
    /// A lock's request went unanswered for its `request_timeout`.
    RequestTimeout,
    /// A setup statement went unanswered for `setup_timeout`.
    SetupTimeout,
    /// The server refused a write as read-only: look for a writable host.
    ReadOnly,
    /// The session was closed.
    Shutdown,
}

impl DownReason {
    /// A stable snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            DownReason::Closed(_) => "closed",
            DownReason::RequestTimeout => "request_timeout",
            DownReason::SetupTimeout => "setup_timeout",
            DownReason::ReadOnly => "read_only",
            DownReason::Shutdown => "shutdown",
        }
    }
}

/// Which server a connection reached, as it reports itself at connect: the database cluster
/// (`pg_control_system()`'s system identifier, which a streaming replica shares with its
/// primary) and the timeline it writes on (a promotion starts a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerIdentity {
    /// The system identifier, if the role may read it.
    pub system_id: Option<u64>,
    /// The timeline the server writes on.
    pub timeline: u32,
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.system_id {
            Some(id) => write!(f, "system {id}, timeline {}", self.timeline),
            None => write!(f, "timeline {}", self.timeline),
        }
    }
}

/// A change of the connection, worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A connection is up: its `application_name` (this session's holder identity) and pid.
    Up {
        /// The connection.
        session: SessionId,
        /// Its `application_name`.
        app: String,
        /// Its backend pid.
        pid: i32,
    },
    /// The connection ended; a reconnection follows after `retry_in` (none while closing).
    Down {
        /// The connection.
        session: SessionId,
        /// Why.
        reason: DownReason,
        /// Delay before the next attempt.
        retry_in: Option<Duration>,
    },
    /// The crash watch's connection is up ([`crate::watch`]).
    WatchUp {
        /// The watch connection.
        session: SessionId,
    },
    /// The crash watch stopped: its standbys fall back to their ordinary retries; the watch
    /// connects again after `retry_in`.
    WatchDown {
        /// Why.
        reason: WatchFailure,
        /// Delay before the watch connects again.
        retry_in: Duration,
    },
    /// A connection attempt failed or timed out; the next follows after `retry_in`.
    ConnectFailed {
        /// The attempt.
        session: SessionId,
        /// Why.
        cause: String,
        /// Delay before the next attempt (none while closing).
        retry_in: Option<Duration>,
    },
    /// The server refused a write as read-only (SQLSTATE 25006): the connection is reset, and
    /// with a multi-host connection string (`target_session_attrs=read-write`) the next one looks
    /// for a writable host.
    ReadOnly {
        /// The connection.
        session: SessionId,
        /// The operation that was refused.
        op: &'static str,
    },
    /// This connection's server is not the one the previous connection reached: a failover
    /// (a higher timeline: a replica was promoted), another cluster (a different system
    /// identifier), or a server restored from an older backup (a lower timeline). Locks carry
    /// on; a `Lease` row written on the older timeline is taken over only when its lease
    /// expires (its holder's session lived on the other server).
    ServerChanged {
        /// The connection.
        session: SessionId,
        /// What the previous connection reported.
        previous: ServerIdentity,
        /// What this one reports.
        current: ServerIdentity,
    },
    /// The lock schema vanished (dropped under a running fleet): bootstrapping it again.
    SchemaMissing {
        /// The schema.
        schema: SchemaName,
        /// What the server said.
        error: DbError,
    },
    /// Setting up a schema failed.
    BootstrapFailed {
        /// The schema.
        schema: SchemaName,
        /// What the server said.
        error: DbError,
    },
}

/// Everything that can happen to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionInput {
    /// Time passed; due timers fire.
    Tick,
    /// The connection attempt `session` completed: authenticated, identity known.
    Connected {
        /// The attempt, from [`SessionOutput::Connect`].
        session: SessionId,
        /// The connection's `application_name`: the holder identity.
        app: String,
        /// Its backend pid.
        pid: i32,
    },
    /// What the connection `session` reported about its server (optional: a driver that sends
    /// none gets no [`SessionEvent::ServerChanged`]). Send it right after `Connected`.
    Identified {
        /// The connection.
        session: SessionId,
        /// Its server.
        server: ServerIdentity,
    },
    /// The connection attempt `session` failed.
    ConnectFailed {
        /// The attempt.
        session: SessionId,
        /// Why, in words.
        cause: String,
    },
    /// The connection ended (closed by the server, a network error, the driver's socket gone).
    Closed {
        /// The connection.
        session: SessionId,
        /// Why, if known.
        error: Option<String>,
    },
    /// The crash watch's connection `session` ([`SessionOutput::WatchConnect`]) is up.
    WatchConnected {
        /// The attempt.
        session: SessionId,
    },
    /// The crash watch's connection attempt `session` failed.
    WatchConnectFailed {
        /// The attempt.
        session: SessionId,
        /// Why, in words.
        cause: String,
        /// The server refused it for its connection limit (SQLSTATE 53300).
        connection_limit: bool,
    },
    /// The crash watch's connection `session` ended.
    WatchClosed {
        /// The connection.
        session: SessionId,
        /// Why, if known.
        error: Option<String>,
    },
    /// The reply to a [`SessionRequest`].
    Reply {
        /// The request's id.
        id: OpId,
        /// Its outcome.
        result: Result<OpReply, DbError>,
    },
    /// A notification arrived on connection `session`.
    Notification {
        /// The connection.
        session: SessionId,
        /// The channel.
        channel: String,
        /// The payload.
        payload: String,
        /// The backend pid of the session that sent it.
        pid: i32,
    },
    /// An API call.
    Call {
        /// Echoed in [`SessionOutput::CallDone`].
        call: CallId,
        /// The lock.
        lock: LockKey,
        /// What is asked.
        request: LockCall,
    },
    /// Every handle of the lock is gone: stop it in the background (a held lock is released,
    /// bounded by its `shutdown_timeout`), then remove it.
    Abandon {
        /// The lock.
        lock: LockKey,
    },
    /// Close the session: stop every lock (each bounded by its `shutdown_timeout`), then the
    /// connection; completes with `CallDone` and then [`SessionOutput::Closed`].
    Close {
        /// Echoed in `CallDone`.
        call: CallId,
    },
}

/// What the driver must do or report. Drain with [`Session::poll_output`] after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionOutput {
    /// Open a connection; answer with `Connected` or `ConnectFailed` carrying this id.
    Connect {
        /// The attempt's (and, once up, the connection's) id.
        session: SessionId,
    },
    /// Abandon the connection attempt `session` (its deadline passed, or the session closes).
    AbortConnect {
        /// The attempt.
        session: SessionId,
    },
    /// Close the connection `session` (reset or shutdown); no `Closed` input is needed.
    Disconnect {
        /// The connection.
        session: SessionId,
    },
    /// Run an operation.
    Execute(SessionRequest),
    /// Open the crash watch's second connection (same settings as the session's, its own
    /// `application_name`); answer with `WatchConnected`, `WatchConnectFailed`, and
    /// `WatchClosed` when it ends. Only [`SessionOp::AwaitHolder`] runs on it.
    WatchConnect {
        /// The attempt's (and, once up, the connection's) id.
        session: SessionId,
    },
    /// Cancel the statement running on the watch connection `session` (its reply is no
    /// longer wanted).
    WatchCancel {
        /// The watch connection.
        session: SessionId,
    },
    /// Close (or abandon the attempt of) the watch connection `session`; no input is needed.
    WatchDisconnect {
        /// The watch connection.
        session: SessionId,
    },
    /// A lock's state changed.
    Lock {
        /// The lock.
        lock: LockKey,
        /// What happened.
        event: LockEvent,
    },
    /// Hand this notification of the lock's channel to the application.
    Deliver {
        /// The lock.
        lock: LockKey,
        /// The payload.
        payload: String,
        /// Replayed at a takeover: the previous holder may have delivered it already.
        replay: bool,
    },
    /// An API call completed.
    CallDone {
        /// The call.
        call: CallId,
        /// Its result.
        result: Result<CallReply, CallError>,
    },
    /// The lock stopped and is gone from the session.
    LockRemoved {
        /// The lock.
        lock: LockKey,
    },
    /// The connection changed.
    Event(SessionEvent),
    /// The session is closed: nothing more will happen.
    Closed,
}

/// The connection's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnPhase {
    /// No connection; waiting for the reconnect delay.
    Down,
    /// A connection attempt is in progress.
    Connecting,
    /// Connected; setup statements are in flight.
    Preparing,
    /// Connected, nothing being set up.
    Up,
    /// Closed for good.
    Closed,
}

/// A read-only view for checkers and status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The phase.
    pub phase: ConnPhase,
    /// Since when (the phase's start).
    pub since: Timestamp,
    /// The connection (or attempt), if any.
    pub session: Option<SessionId>,
    /// The send time of the oldest setup statement in flight.
    pub oldest_setup: Option<Timestamp>,
    /// The next reconnect attempt, while down.
    pub reconnect_at: Option<Timestamp>,
    /// Whether the session is closing or closed.
    pub closing: bool,
    /// Locks in the session.
    pub locks: usize,
}

/// Why [`Session::add_lock`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddLockError {
    /// The key is in use.
    #[error("lock key {0:?} is in use")]
    DuplicateKey(LockKey),
    /// The session has a lock on this channel already (one session is one holder identity).
    #[error("this session already has a lock on channel {0:?}")]
    DuplicateChannel(String),
    /// The session is closing.
    #[error("the session is closed")]
    Closed,
}

/// How far a lock is set up on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prep {
    /// Nothing done on this connection.
    None,
    /// Waiting for its schema's bootstrap.
    Bootstrapping,
    /// `LISTEN` in flight.
    Listening,
    /// Listening; the lock has `SessionUp`.
    Ready,
}

struct Entry {
    lock: Lock,
    target: Arc<LockTarget>,
    prep: Prep,
    /// Set up on every new connection: `Init` was called or a call waits for the setup.
    wanted: bool,
    /// A setup ever succeeded (then `Acquire` need not wait for one).
    initialised: bool,
    init_calls: Vec<CallId>,
    early_acquires: Vec<CallId>,
    acquire_calls: VecDeque<CallId>,
    release_calls: Vec<CallId>,
    destroy_calls: Vec<CallId>,
    /// The deadline this lock has in the timer set, and what it is for.
    armed: Option<(Timestamp, TimerKind)>,
    /// The reply being fed was refused as read-only: an `Acquire` call it answers fails so.
    refused_read_only: bool,
    /// The lock's stop released its term, confirmed (`Released` while stopping).
    released_at_stop: bool,
    /// While stopping: the handover needs no wait (our own release marker named nobody, or
    /// another backend's `acquired` marker already arrived).
    handed_over: bool,
}

/// A stopped lock's channel, still listened until the successor its release named confirms.
struct Linger {
    channel: ChannelName,
    protocol: Protocol,
    schema: SchemaName,
    until: Timestamp,
}

#[derive(Debug, Clone)]
enum Route {
    Lock {
        key: LockKey,
        id: RequestId,
    },
    /// A batched statement: each entry's lock and request, in the reply's order; `None` for a
    /// lock removed since.
    Batch {
        entries: Vec<Option<(LockKey, RequestId)>>,
    },
    Bootstrap {
        schema_key: (Protocol, SchemaName),
    },
    Listen {
        key: LockKey,
    },
    ListenMany {
        keys: Vec<LockKey>,
    },
    Unlisten,
    /// A group's counts query; `register` the locks whose channels it records.
    Balance {
        group: GroupKey,
        register: Vec<LockKey>,
    },
    /// The crash watch's wait.
    Await,
}

/// A balance group: the schema of its table and its name.
type GroupKey = (SchemaName, String);

/// What a session knows of one balance group it competes in.
struct Group {
    /// Its locks on this session.
    locks: BTreeSet<LockKey>,
    /// Those whose channel the table recorded on the current connection.
    registered: BTreeSet<LockKey>,
    /// What the table said last.
    counts: Option<BalanceCounts>,
    /// The counts query in flight.
    asking: Option<OpId>,
    /// When the last counts query went out.
    asked_at: Option<Timestamp>,
    /// The shortest renew interval of its locks: the counts are asked at most every half of it.
    renew_interval: Duration,
    /// Locks whose channel is likely free: a release was heard, or the counts listed it free,
    /// since the table last answered one of their attempts. Their attempts go first.
    known_free: BTreeSet<LockKey>,
}

struct Conn {
    session: SessionId,
    bootstrapped: BTreeSet<(Protocol, SchemaName)>,
    bootstrapping: BTreeMap<(Protocol, SchemaName), OpId>,
    /// Setup statements in flight and when they were sent (ids grow with time).
    setup: BTreeMap<OpId, Timestamp>,
    up_since: Timestamp,
    read_only_reported: bool,
    /// Locks waiting for their `LISTEN`: sent together when none is in flight.
    listen_queue: Vec<LockKey>,
    /// The `LISTEN` statement in flight.
    listen_in_flight: Option<OpId>,
}

enum Link {
    Down { retry_at: Option<Timestamp> },
    Connecting { session: SessionId, deadline: Timestamp },
    Up(Conn),
    Closed,
}

/// One connection's lifecycle and all its locks: a deterministic state machine.
///
/// Feed inputs with [`handle_input`](Session::handle_input), drain
/// [`poll_output`](Session::poll_output) to `None`, sleep until
/// [`poll_timeout`](Session::poll_timeout) and feed [`SessionInput::Tick`].
pub struct Session {
    config: SessionConfig,
    rng: SplitMix64,
    now: Timestamp,
    link: Link,
    since: Timestamp,
    backoff: Duration,
    next_session: u64,
    next_op: u64,
    /// Boxed: a B-tree node holds eleven values, so unboxed a session with one lock would
    /// carry room for ten more.
    locks: BTreeMap<LockKey, Box<Entry>>,
    /// Channel → lock (its lock and drain channels strip to it).
    by_channel: BTreeMap<ChannelName, LockKey>,
    /// Every lock's next deadline.
    timers: BTreeSet<(Timestamp, LockKey)>,
    ops: BTreeMap<OpId, Route>,
    outputs: VecDeque<SessionOutput>,
    closing: Option<Vec<CallId>>,
    /// A lock asked for the connection to be reset.
    reset: Option<(SessionId, DownReason)>,
    /// Locks that stopped during the current input: removed after it.
    stopped: Vec<LockKey>,
    /// `Lease` renewals and attempts the locks asked for during the current input, by kind and
    /// schema: each group goes out as one statement at the input's end.
    batches: BTreeMap<(BatchKind, SchemaName), Vec<Batched>>,
    /// The distinct settings of the locks added so far, shared by them.
    configs: Vec<Arc<LockConfig>>,
    /// The longest window within which any lock's renewal or attempt joins a batch: the timer
    /// scan of a batch stops there.
    horizon: Duration,
    /// The server the latest identified connection reached.
    server: Option<ServerIdentity>,
    /// The balance groups of its locks.
    groups: BTreeMap<GroupKey, Group>,
    /// The crash watch.
    watch: Watch,
    /// The backend pid of the current connection.
    own_pid: Option<i32>,
    /// Released locks' channels waiting for their successors ([`SessionConfig::handover_linger`]).
    lingers: Vec<Linger>,
}

/// One lock's request waiting for its batch: the lock, its request id and the operation.
type Batched = (LockKey, RequestId, DbOp);

/// What a batch carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BatchKind {
    Renew,
    Acquire,
}

/// How early a lock's renewal joins a batch going out now: half its renew interval. Going early
/// is safe (the lease is timed from the earlier send), and after one batch the renewals of a
/// session fall due together, so it holds every lease with one statement per interval.
fn renew_window(config: &LockConfig) -> Duration {
    config.renew_interval / 2
}

/// How early a standby's attempt joins a batch going out now: a tenth of its retry bound. A
/// standby retries at the lease's expiry as the server reported it, and leases renewed in one
/// batch expire together, so their attempts fall due within the wake jitter of each other.
fn retry_window(config: &LockConfig) -> Duration {
    config.acquire_interval.min(config.lease_ttl) / 10
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session with `config`; `seed` drives its reconnect jitter. It connects at its first
    /// input.
    pub fn new(config: SessionConfig, seed: u64) -> Self {
        let config = config.clamped();
        Session {
            backoff: config.backoff_min,
            config,
            rng: SplitMix64::new(seed),
            now: Timestamp::ZERO,
            link: Link::Down {
                retry_at: Some(Timestamp::ZERO),
            },
            since: Timestamp::ZERO,
            next_session: 1,
            next_op: 1,
            locks: BTreeMap::new(),
            by_channel: BTreeMap::new(),
            timers: BTreeSet::new(),
            ops: BTreeMap::new(),
            outputs: VecDeque::new(),
            closing: None,
            reset: None,
            stopped: Vec::new(),
            batches: BTreeMap::new(),
            horizon: Duration::ZERO,
            configs: Vec::new(),
            server: None,
            groups: BTreeMap::new(),
            watch: Watch::new(),
            own_pid: None,
            lingers: Vec::new(),
        }
    }

    /// The configuration in force (clamped).
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The server the latest identified connection reached ([`SessionInput::Identified`]).
    pub fn server(&self) -> Option<&ServerIdentity> {
        self.server.as_ref()
    }

    /// Adds a lock on `channel`, its table in `schema`; `seed` drives its jitter. Nothing
    /// reaches the database until a call needs it.
    pub fn add_lock(
        &mut self,
        key: LockKey,
        channel: ChannelName,
        schema: SchemaName,
        config: LockConfig,
        seed: u64,
    ) -> Result<(), AddLockError> {
        if self.closing.is_some() {
            return Err(AddLockError::Closed);
        }
        if self.locks.contains_key(&key) {
            return Err(AddLockError::DuplicateKey(key));
        }
        if self.by_channel.contains_key(channel.as_str()) {
            return Err(AddLockError::DuplicateChannel(channel.as_str().to_owned()));
        }
        self.by_channel.insert(channel.clone(), key);
        // Locks with the same settings share one copy (a session has few distinct ones).
        let config = crate::lock::clamp_config(config);
        let config = match self.configs.iter().find(|c| ***c == config) {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(config);
                self.configs.push(shared.clone());
                shared
            }
        };
        let lock = Lock::with_config(channel.clone(), config, seed);
        self.horizon = self
            .horizon
            .max(renew_window(lock.config()))
            .max(retry_window(lock.config()));
        if let Some(name) = lock
            .config()
            .balance
            .clone()
            .filter(|_| lock.config().protocol == Protocol::Lease)
        {
            let renew_interval = lock.config().renew_interval;
            let group = self.groups.entry((schema.clone(), name)).or_insert_with(|| Group {
                locks: BTreeSet::new(),
                registered: BTreeSet::new(),
                counts: None,
                asking: None,
                asked_at: None,
                renew_interval,
                known_free: BTreeSet::new(),
            });
            group.locks.insert(key);
            group.renew_interval = group.renew_interval.min(renew_interval);
        }
        let target = Arc::new(LockTarget {
            protocol: lock.config().protocol,
            schema,
            channel,
            lease_ttl: lock.config().lease_ttl,
        });
        self.locks.insert(
            key,
            Box::new(Entry {
                lock,
                target,
                prep: Prep::None,
                wanted: false,
                initialised: false,
                init_calls: Vec::new(),
                early_acquires: Vec::new(),
                acquire_calls: VecDeque::new(),
                release_calls: Vec::new(),
                destroy_calls: Vec::new(),
                armed: None,
                refused_read_only: false,
                released_at_stop: false,
                handed_over: false,
            }),
        );
        Ok(())
    }

    /// The lock of `key`, for checkers (read-only).
    pub fn lock(&self, key: LockKey) -> Option<&Lock> {
        self.locks.get(&key).map(|e| &e.lock)
    }

    /// The lock whose data, lock or drain channel is `channel` (a map lookup).
    pub fn lock_of_channel(&self, channel: &str) -> Option<LockKey> {
        // A channel name never begins with a reserved prefix: stripped, the lock and drain
        // channels name their lock's own channel.
        let name = channel
            .strip_prefix(crate::name::LOCK_CHANNEL_PREFIX)
            .or_else(|| channel.strip_prefix(crate::name::DRAIN_CHANNEL_PREFIX))
            .unwrap_or(channel);
        self.by_channel.get(name).copied()
    }

    /// Every lock, by key.
    pub fn locks(&self) -> impl Iterator<Item = (LockKey, &Lock)> + '_ {
        self.locks.iter().map(|(k, e)| (*k, &e.lock))
    }

    /// The current connection, if one is up.
    pub fn current(&self) -> Option<SessionId> {
        match &self.link {
            Link::Up(conn) => Some(conn.session),
            _ => None,
        }
    }

    /// A snapshot of the connection's state.
    pub fn state(&self) -> SessionState {
        let (phase, session, oldest_setup, reconnect_at) = match &self.link {
            Link::Down { retry_at } => (ConnPhase::Down, None, None, *retry_at),
            Link::Connecting { session, .. } => (ConnPhase::Connecting, Some(*session), None, None),
            Link::Up(conn) => {
                let oldest = conn.setup.values().next().copied();
                let phase = if oldest.is_some() {
                    ConnPhase::Preparing
                } else {
                    ConnPhase::Up
                };
                (phase, Some(conn.session), oldest, None)
            }
            Link::Closed => (ConnPhase::Closed, None, None, None),
        };
        SessionState {
            phase,
            since: self.since,
            session,
            oldest_setup,
            reconnect_at,
            closing: self.closing.is_some() || matches!(self.link, Link::Closed),
            locks: self.locks.len(),
        }
    }

    /// The next deadline; `None` when nothing is scheduled.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let link = match &self.link {
            Link::Down { retry_at } => *retry_at,
            Link::Connecting { deadline, .. } => Some(*deadline),
            Link::Up(conn) => conn.setup.values().next().map(|sent| *sent + self.config.setup_timeout),
            Link::Closed => None,
        };
        let lock = self.timers.iter().next().map(|(at, _)| *at);
        let linger = self.lingers.iter().map(|l| l.until).min();
        [link, lock, self.watch.deadline(), linger].into_iter().flatten().min()
    }

    /// The next output, or `None` when all are drained.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<SessionOutput> {
        self.outputs.pop_front()
    }

    /// Feeds one input at time `now`. Never fails; time that goes backwards is clamped.
    pub fn handle_input(&mut self, now: Timestamp, input: SessionInput) {
        self.now = self.now.max(now);
        // Deadlines are checked against the input's time first: a reply that arrives after its
        // connection's deadline finds the connection already reset.
        self.fire_due();
        match input {
            SessionInput::Tick => {}
            SessionInput::Connected { session, app, pid } => self.on_connected(session, app, pid),
            SessionInput::Identified { session, server } => self.on_identified(session, server),
            SessionInput::ConnectFailed { session, cause } => {
                if matches!(self.link, Link::Connecting { session: s, .. } if s == session) {
                    self.connect_failed(session, cause);
                }
            }
            SessionInput::Closed { session, error } => {
                if self.current() == Some(session) {
                    self.lose_connection(DownReason::Closed(error), false);
                }
            }
            SessionInput::Reply { id, result } => self.on_reply(id, result),
            SessionInput::WatchConnected { session } => self.on_watch_connected(session),
            SessionInput::WatchConnectFailed {
                session,
                cause,
                connection_limit,
            } => {
                if matches!(self.watch.link, WatchLink::Connecting { session: s, .. } if s == session) {
                    let reason = if connection_limit {
                        WatchFailure::ConnectionLimit(cause)
                    } else {
                        WatchFailure::ConnectFailed(cause)
                    };
                    self.watch_down(reason, false);
                }
            }
            SessionInput::WatchClosed { session, error } => {
                if matches!(self.watch.link, WatchLink::Up { session: s } if s == session) {
                    self.watch_down(WatchFailure::Closed(error), false);
                }
            }
            SessionInput::Notification {
                session,
                channel,
                payload,
                pid,
            } => self.on_notification(session, channel, payload, pid),
            SessionInput::Call { call, lock, request } => self.on_call(call, lock, request),
            SessionInput::Abandon { lock } => {
                if self.locks.contains_key(&lock) {
                    self.feed(lock, Input::Stop);
                }
            }
            SessionInput::Close { call } => self.on_close(call),
        }
        self.settle();
        self.update_watch();
        self.flush_listens();
        self.flush_batches();
    }

    // ----- time -----

    fn fire_due(&mut self) {
        match &self.link {
            Link::Down { retry_at: Some(at) } if *at <= self.now => self.start_connecting(),
            Link::Connecting { session, deadline } if *deadline <= self.now => {
                let session = *session;
                self.outputs.push_back(SessionOutput::AbortConnect { session });
                let cause = format!(
                    "no answer within the connect timeout of {:?}",
                    self.config.connect_timeout
                );
                self.connect_failed(session, cause);
            }
            Link::Up(conn) => {
                let late = conn
                    .setup
                    .values()
                    .next()
                    .is_some_and(|sent| *sent + self.config.setup_timeout <= self.now);
                if late {
                    self.lose_connection(DownReason::SetupTimeout, true);
                }
            }
            _ => {}
        }
        self.watch_fire_due();
        if self.lingers.iter().any(|l| l.until <= self.now) {
            let now = self.now;
            self.end_lingers(|l| l.until <= now);
        }
        // Every lock fed here re-arms strictly later than now (the lock guarantees it), so this
        // ends; the bound guards against a bug, not an expected path.
        for _ in 0..=self.locks.len() {
            match self.timers.first() {
                Some(&(at, key)) if at <= self.now => self.feed(key, Input::Tick),
                _ => break,
            }
        }
    }

    /// Runs what the input made due and applies the cross-lock consequences until nothing is
    /// left to do.
    fn settle(&mut self) {
        // Each round resets a connection (at most once per connection), removes locks or fires
        // timers that are due; the bound is a guard against a bug, not an expected path.
        for _ in 0..16 {
            self.fire_due();
            if let Some((session, reason)) = self.reset.take() {
                if self.current() == Some(session) {
                    self.lose_connection(reason, true);
                    continue;
                }
            }
            if !self.stopped.is_empty() {
                for key in std::mem::take(&mut self.stopped) {
                    self.remove_lock(key);
                }
                continue;
            }
            if self.closing.is_some()
                && self.locks.is_empty()
                && self.lingers.is_empty()
                && !matches!(self.link, Link::Closed)
            {
                self.finish_close();
                continue;
            }
            if !self.poll_timeout().is_some_and(|at| at <= self.now) {
                return;
            }
        }
    }

    // ----- the connection -----

    fn new_session_id(&mut self) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        id
    }

    fn enter(&mut self, link: Link) {
        self.link = link;
        self.since = self.now;
    }

    fn start_connecting(&mut self) {
        if self.closing.is_some() {
            self.enter(Link::Down { retry_at: None });
            return;
        }
        let session = self.new_session_id();
        let deadline = self.now + self.config.connect_timeout;
        self.enter(Link::Connecting { session, deadline });
        self.outputs.push_back(SessionOutput::Connect { session });
    }

    /// The next reconnect delay (equal jitter), doubling the backoff.
    fn next_backoff(&mut self) -> Duration {
        let d = duration_micros(self.backoff);
        let delay = Duration::from_micros(d / 2 + self.rng.below_inclusive(d - d / 2));
        self.backoff = (self.backoff * 2).min(self.config.backoff_max);
        delay
    }

    fn schedule_reconnect(&mut self) -> Option<Duration> {
        if self.closing.is_some() {
            self.enter(Link::Down { retry_at: None });
            return None;
        }
        let delay = self.next_backoff();
        self.enter(Link::Down {
            retry_at: Some(self.now + delay),
        });
        Some(delay)
    }

    fn connect_failed(&mut self, session: SessionId, cause: String) {
        let retry_in = self.schedule_reconnect();
        // A caller of `init` waits for one attempt, not for the server to come back.
        let keys: Vec<LockKey> = self.locks.keys().copied().collect();
        for key in keys {
            self.fail_setup_calls(key, &CallError::Disconnected { cause: cause.clone() });
        }
        self.outputs
            .push_back(SessionOutput::Event(SessionEvent::ConnectFailed {
                session,
                cause,
                retry_in,
            }));
    }

    fn on_connected(&mut self, session: SessionId, app: String, pid: i32) {
        match self.link {
            Link::Connecting { session: s, .. } if s == session => {}
            _ => {
                // A late or foreign attempt: close it.
                self.outputs.push_back(SessionOutput::Disconnect { session });
                return;
            }
        }
        self.enter(Link::Up(Conn {
            session,
            bootstrapped: BTreeSet::new(),
            bootstrapping: BTreeMap::new(),
            setup: BTreeMap::new(),
            up_since: self.now,
            read_only_reported: false,
            listen_queue: Vec::new(),
            listen_in_flight: None,
        }));
        // A new backend: the table knows none of its channels as ours yet.
        for group in self.groups.values_mut() {
            group.registered.clear();
            group.asking = None;
            group.asked_at = None;
        }
        self.own_pid = Some(pid);
        self.outputs
            .push_back(SessionOutput::Event(SessionEvent::Up { session, app, pid }));
        if self.closing.is_some() {
            self.lose_connection(DownReason::Shutdown, true);
            return;
        }
        let keys: Vec<LockKey> = self.locks.iter().filter(|(_, e)| e.wanted).map(|(k, _)| *k).collect();
        for key in keys {
            self.prepare(key);
        }
    }

    /// Records the server of the current connection and reports a change from the last one.
    fn on_identified(&mut self, session: SessionId, server: ServerIdentity) {
        if self.current() != Some(session) {
            return;
        }
        if let Some(previous) = self.server.replace(server) {
            if previous != server {
                self.outputs
                    .push_back(SessionOutput::Event(SessionEvent::ServerChanged {
                        session,
                        previous,
                        current: server,
                    }));
            }
        }
    }

    /// Drops the current connection: every lock learns `SessionDown`, and a reconnection is
    /// scheduled. `tell_driver`: the driver still has it open and must close it.
    fn lose_connection(&mut self, reason: DownReason, tell_driver: bool) {
        let Link::Up(conn) = &self.link else { return };
        let session = conn.session;
        let stable = self.now.saturating_duration_since(conn.up_since) >= self.config.backoff_max;
        if stable {
            self.backoff = self.config.backoff_min;
        }
        if tell_driver {
            self.outputs.push_back(SessionOutput::Disconnect { session });
        }
        // Late replies of this connection find no route and are ignored.
        self.ops.clear();
        self.lingers.clear();
        let retry_in = self.schedule_reconnect();
        self.outputs.push_back(SessionOutput::Event(SessionEvent::Down {
            session,
            reason,
            retry_in,
        }));
        let keys: Vec<LockKey> = self.locks.keys().copied().collect();
        for key in keys {
            if let Some(entry) = self.locks.get_mut(&key) {
                entry.prep = Prep::None;
            }
            self.feed(key, Input::SessionDown(session));
            // Calls that waited for this connection's setup wait for the next one; acquires
            // that cannot be attempted now answer at once.
            if let Some(entry) = self.locks.get_mut(&key) {
                let early: Vec<CallId> = entry.early_acquires.drain(..).collect();
                for call in early {
                    self.done(call, Ok(CallReply::Acquired(false)));
                }
            }
        }
    }

    fn on_close(&mut self, call: CallId) {
        if matches!(self.link, Link::Closed) {
            self.done(call, Ok(CallReply::Done));
            return;
        }
        self.closing.get_or_insert_with(Vec::new).push(call);
        match self.link {
            Link::Connecting { session, .. } => {
                self.outputs.push_back(SessionOutput::AbortConnect { session });
                self.enter(Link::Down { retry_at: None });
            }
            Link::Down { .. } => self.enter(Link::Down { retry_at: None }),
            _ => {}
        }
        let keys: Vec<LockKey> = self.locks.keys().copied().collect();
        for key in keys {
            self.feed(key, Input::Stop);
        }
    }

    fn finish_close(&mut self) {
        if let Link::Up(_) = self.link {
            self.lose_connection(DownReason::Shutdown, true);
        }
        if let Link::Connecting { session, .. } = self.link {
            self.outputs.push_back(SessionOutput::AbortConnect { session });
        }
        self.enter(Link::Closed);
        for call in self.closing.take().unwrap_or_default() {
            self.done(call, Ok(CallReply::Done));
        }
        // Keep `closing` set so that nothing reopens it.
        self.closing = Some(Vec::new());
        self.outputs.push_back(SessionOutput::Closed);
    }

    // ----- setup -----

    fn execute(&mut self, session: SessionId, op: SessionOp, route: Route) -> OpId {
        let id = OpId(self.next_op);
        self.next_op += 1;
        let setup = !matches!(route, Route::Lock { .. });
        self.ops.insert(id, route);
        if setup {
            if let Link::Up(conn) = &mut self.link {
                conn.setup.insert(id, self.now);
            }
        }
        self.outputs
            .push_back(SessionOutput::Execute(SessionRequest { id, session, op }));
        id
    }

    /// Bootstraps the lock's schema (once per connection) and `LISTEN`s its channels; the lock
    /// gets `SessionUp` when that is done.
    fn prepare(&mut self, key: LockKey) {
        let Link::Up(conn) = &self.link else { return };
        let Some(entry) = self.locks.get_mut(&key) else { return };
        if entry.prep != Prep::None || entry.lock.state().phase == Phase::Stopped {
            return;
        }
        let schema_key = (entry.target.protocol, entry.target.schema.clone());
        if conn.bootstrapped.contains(&schema_key) {
            self.listen(key);
            return;
        }
        entry.prep = Prep::Bootstrapping;
        if !conn.bootstrapping.contains_key(&schema_key) {
            self.bootstrap(schema_key);
        }
    }

    fn bootstrap(&mut self, schema_key: (Protocol, SchemaName)) {
        let Some(session) = self.current() else { return };
        let op = SessionOp::Bootstrap {
            protocol: schema_key.0,
            schema: schema_key.1.clone(),
        };
        let id = self.execute(
            session,
            op,
            Route::Bootstrap {
                schema_key: schema_key.clone(),
            },
        );
        if let Link::Up(conn) = &mut self.link {
            conn.bootstrapping.insert(schema_key, id);
        }
    }

    /// Queues the lock's `LISTEN`: one statement at a time carries every lock that wants one,
    /// so that setting up thousands of locks costs a few statements, not one each (their
    /// replies would arrive one by one, and the last long after the setup timeout of the first).
    fn listen(&mut self, key: LockKey) {
        let Link::Up(conn) = &mut self.link else { return };
        let Some(entry) = self.locks.get_mut(&key) else { return };
        entry.prep = Prep::Listening;
        conn.listen_queue.push(key);
    }

    /// Sends the queued `LISTEN`s as one statement, unless one is in flight.
    fn flush_listens(&mut self) {
        let Some(session) = self.current() else { return };
        let Link::Up(conn) = &mut self.link else { return };
        if conn.listen_in_flight.is_some() || conn.listen_queue.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut conn.listen_queue);
        let keys: Vec<LockKey> = queued
            .into_iter()
            .filter(|k| self.locks.get(k).is_some_and(|e| e.prep == Prep::Listening))
            .collect();
        let channel_of = |session: &Session, key: &LockKey| {
            session
                .locks
                .get(key)
                .map(|e| (e.target.channel.clone(), e.target.protocol))
        };
        let id = match keys.as_slice() {
            [] => return,
            [key] => {
                let Some((channel, protocol)) = channel_of(self, key) else {
                    return;
                };
                let route = Route::Listen { key: *key };
                self.execute(session, SessionOp::Listen { channel, protocol }, route)
            }
            _ => {
                let channels = keys.iter().filter_map(|k| channel_of(self, k)).collect();
                self.execute(session, SessionOp::ListenMany { channels }, Route::ListenMany { keys })
            }
        };
        if let Link::Up(conn) = &mut self.link {
            conn.listen_in_flight = Some(id);
        }
    }

    /// The locks of one schema that are at `prep` on the current connection.
    fn locks_in(&self, schema_key: &(Protocol, SchemaName), prep: Prep) -> Vec<LockKey> {
        self.locks
            .iter()
            .filter(|(_, e)| e.prep == prep && e.target.protocol == schema_key.0 && e.target.schema == schema_key.1)
            .map(|(k, _)| *k)
            .collect()
    }

    fn on_bootstrapped(&mut self, schema_key: (Protocol, SchemaName), result: Result<(), DbError>) {
        let Link::Up(conn) = &mut self.link else { return };
        conn.bootstrapping.remove(&schema_key);
        if result.is_ok() {
            conn.bootstrapped.insert(schema_key.clone());
        }
        let session = conn.session;
        let waiting = self.locks_in(&schema_key, Prep::Bootstrapping);
        match result {
            Ok(()) => {
                for key in waiting {
                    self.listen(key);
                }
                // Locks already listening whose requests found the schema missing: attempt again
                // soon instead of at their next retry.
                for key in self.locks_in(&schema_key, Prep::Ready) {
                    self.feed(key, Input::Wake);
                }
            }
            Err(error) => {
                let read_only = error.is_read_only();
                self.outputs
                    .push_back(SessionOutput::Event(SessionEvent::BootstrapFailed {
                        schema: schema_key.1.clone(),
                        error: error.clone(),
                    }));
                for key in waiting {
                    self.setup_failed(
                        key,
                        CallError::Bootstrap {
                            schema: schema_key.1.as_str().to_owned(),
                            error: error.clone(),
                        },
                    );
                }
                if read_only {
                    self.read_only(session, "bootstrap");
                }
            }
        }
    }

    fn setup_failed(&mut self, key: LockKey, error: CallError) {
        if let Some(entry) = self.locks.get_mut(&key) {
            entry.prep = Prep::None;
        }
        self.fail_setup_calls(key, &error);
    }

    /// Fails the calls waiting for the lock's setup (`init`, and `acquire` before the first one).
    fn fail_setup_calls(&mut self, key: LockKey, error: &CallError) {
        let Some(entry) = self.locks.get_mut(&key) else { return };
        let calls: Vec<CallId> = entry
            .init_calls
            .drain(..)
            .chain(entry.early_acquires.drain(..))
            .collect();
        for call in calls {
            self.done(call, Err(error.clone()));
        }
    }

    fn on_listened(&mut self, key: LockKey, result: Result<(), DbError>) {
        let Some(session) = self.current() else { return };
        let Some(entry) = self.locks.get_mut(&key) else { return };
        if entry.prep != Prep::Listening {
            return;
        }
        match result {
            Ok(()) => {
                entry.prep = Prep::Ready;
                entry.initialised = true;
                let inits: Vec<CallId> = entry.init_calls.drain(..).collect();
                let early: Vec<CallId> = entry.early_acquires.drain(..).collect();
                entry.acquire_calls.extend(early.iter().copied());
                for call in inits {
                    self.done(call, Ok(CallReply::Done));
                }
                if let Some(pid) = self.own_pid {
                    self.feed(key, Input::BackendPid(pid));
                }
                self.feed(key, Input::SessionUp(session));
                for _ in early {
                    self.feed(key, Input::TryAcquire);
                }
            }
            Err(error) => {
                let schema = entry.target.schema.as_str().to_owned();
                self.setup_failed(key, CallError::Bootstrap { schema, error });
            }
        }
    }

    /// The server refused a write as read-only: report it once per connection and reset, so
    /// that a multi-host connection string moves on to a writable host.
    fn read_only(&mut self, session: SessionId, op: &'static str) {
        if let Link::Up(conn) = &mut self.link {
            if conn.session == session && !std::mem::replace(&mut conn.read_only_reported, true) {
                self.outputs
                    .push_back(SessionOutput::Event(SessionEvent::ReadOnly { session, op }));
            }
        }
        if self.reset.is_none() {
            self.reset = Some((session, DownReason::ReadOnly));
        }
    }

    // ----- replies and notifications -----

    fn on_reply(&mut self, id: OpId, result: Result<OpReply, DbError>) {
        let Some(route) = self.ops.remove(&id) else {
            return; // a late reply of an earlier connection
        };
        if let Link::Up(conn) = &mut self.link {
            conn.setup.remove(&id);
        }
        let done = |result: Result<OpReply, DbError>| result.map(|_| ());
        match route {
            Route::Bootstrap { schema_key } => self.on_bootstrapped(schema_key, done(result)),
            Route::Listen { key } => {
                self.listen_answered(id);
                self.on_listened(key, done(result));
            }
            Route::ListenMany { keys } => {
                self.listen_answered(id);
                let result = done(result);
                for key in keys {
                    self.on_listened(key, result.clone());
                }
            }
            Route::Unlisten => {}
            Route::Await => self.on_await_reply(id, result),
            Route::Balance { group, register } => self.on_balance_counts(id, group, register, result),
            Route::Lock { key, id } => {
                let result = match result {
                    Ok(OpReply::Lock(reply)) => Ok(reply),
                    Ok(_) => Err(DbError::Failed("a setup or batch reply to a lock operation".to_owned())),
                    Err(error) => Err(error),
                };
                self.lock_reply(key, id, result);
            }
            Route::Batch { entries } => {
                // Each lock learns its own row's outcome as if it had sent its own statement; a
                // failed statement failed for every lock in it.
                let replies: Vec<Result<Reply, DbError>> = match result {
                    Ok(OpReply::Batch(replies)) if replies.len() == entries.len() => {
                        replies.into_iter().map(Ok).collect()
                    }
                    Ok(_) => {
                        let error = DbError::Failed("a batch reply without one row per entry".to_owned());
                        vec![Err(error); entries.len()]
                    }
                    Err(error) => vec![Err(error); entries.len()],
                };
                for (slot, result) in entries.into_iter().zip(replies) {
                    if let Some((key, id)) = slot {
                        self.lock_reply(key, id, result);
                    }
                }
            }
        }
    }

    fn listen_answered(&mut self, id: OpId) {
        if let Link::Up(conn) = &mut self.link {
            if conn.listen_in_flight == Some(id) {
                conn.listen_in_flight = None;
            }
        }
    }

    /// Feeds a lock the outcome of its request.
    fn lock_reply(&mut self, key: LockKey, id: RequestId, result: Result<Reply, DbError>) {
        if matches!(result, Ok(Reply::Acquire(_))) && !self.groups.is_empty() {
            self.note_table_answered(key);
        }
        if let Err(error) = &result {
            self.on_lock_error(key, error);
        }
        self.feed(key, Input::DbResult { id, result });
        if let Some(entry) = self.locks.get_mut(&key) {
            entry.refused_read_only = false;
        }
    }

    // ----- batches -----

    /// Sends what the locks asked for during this input: every `Lease` renewal (attempt) of a
    /// schema in one statement, joined first by the locks of that schema whose renewal (attempt)
    /// falls due within their window; a group of one goes out as the lock's own operation.
    fn flush_batches(&mut self) {
        if self.batches.is_empty() {
            return;
        }
        let Some(session) = self.current() else {
            // The connection went within this input: its locks learnt `SessionDown`.
            self.batches.clear();
            return;
        };
        let horizon = self.now + self.horizon;
        // Timers are ordered: the scan visits only the locks due within the longest window.
        let due: Vec<(Timestamp, LockKey)> = self
            .timers
            .range((self.now, LockKey(0))..=(horizon, LockKey(u64::MAX)))
            .copied()
            .collect();
        for (at, key) in due {
            let Some(entry) = self.locks.get(&key) else { continue };
            if entry.target.protocol != Protocol::Lease || entry.prep != Prep::Ready {
                continue;
            }
            let (batch, window) = match entry.armed {
                Some((_, TimerKind::Renew)) => (BatchKind::Renew, renew_window(entry.lock.config())),
                Some((_, TimerKind::Retry)) => (BatchKind::Acquire, retry_window(entry.lock.config())),
                _ => continue,
            };
            if at > self.now + window || !self.batches.contains_key(&(batch, entry.target.schema.clone())) {
                continue;
            }
            let kind = match batch {
                BatchKind::Renew => TimerKind::Renew,
                BatchKind::Acquire => TimerKind::Retry,
            };
            self.feed(key, Input::FireEarly(kind));
        }
        let refused = self.balance_attempts();
        let mut touched: BTreeSet<GroupKey> = BTreeSet::new();
        // A group whose every attempt was held back asks for fresh counts all the same: without
        // them a member that holds nothing (so renews nothing) would judge by the counts it had
        // last, and never see that a place came free.
        for (key, _, _) in &refused {
            if let Some(entry) = self.locks.get(key) {
                if let Some(name) = entry.lock.config().balance.as_ref() {
                    touched.insert((entry.target.schema.clone(), name.clone()));
                }
            }
        }
        for ((kind, schema), mut items) in std::mem::take(&mut self.batches) {
            // The counts of each group that sends something go along with it.
            for (key, _, _) in &items {
                if let Some(name) = self.locks.get(key).and_then(|e| e.lock.config().balance.as_ref()) {
                    if !touched.iter().any(|(s, n)| s == &schema && n == name) {
                        touched.insert((schema.clone(), name.clone()));
                    }
                }
            }
            let target = |session: &Session, key: LockKey| session.locks.get(&key).map(|e| e.target.clone());
            if let [(key, id, op)] = items.as_slice() {
                let Some(target) = target(self, *key) else { continue };
                let op = SessionOp::Lock {
                    lock: *key,
                    target,
                    op: op.clone(),
                };
                let route = Route::Lock { key: *key, id: *id };
                self.execute(session, op, route);
                continue;
            }
            let mut entries = Vec::with_capacity(items.len());
            let mut route = Vec::with_capacity(items.len());
            for (key, id, op) in items.drain(..) {
                if let Some(target) = target(self, key) {
                    entries.push(BatchEntry { lock: key, target, op });
                    route.push((key, id));
                }
            }
            // One order for every session: concurrent batches lock rows without deadlocks.
            let mut order: Vec<usize> = (0..entries.len()).collect();
            order.sort_by(|a, b| {
                entries[*a]
                    .target
                    .channel
                    .as_str()
                    .cmp(entries[*b].target.channel.as_str())
            });
            let entries: Vec<BatchEntry> = order.iter().map(|i| entries[*i].clone()).collect();
            let route: Vec<Option<(LockKey, RequestId)>> = order.iter().map(|i| Some(route[*i])).collect();
            let op = match kind {
                BatchKind::Renew => SessionOp::RenewMany { schema, entries },
                BatchKind::Acquire => SessionOp::AcquireMany { schema, entries },
            };
            self.execute(session, op, Route::Batch { entries: route });
        }
        for group in touched {
            self.ask_counts(session, group);
        }
        for (key, id, retry) in refused {
            // Not sent: the table would have let it win a channel beyond its fair share. It
            // retries when fresher counts may allow it.
            let reply = AcquireReply {
                lease_remaining: Some(retry),
                ..AcquireReply::locked()
            };
            self.feed(
                key,
                Input::DbResult {
                    id,
                    result: Ok(Reply::Acquire(reply)),
                },
            );
        }
        if !self.batches.is_empty() {
            // A refused attempt asked for nothing at once; this guards the invariant that a
            // request never waits for the next input.
            self.flush_batches();
        }
    }

    // ----- fair share -----

    /// Takes out of the attempt batches those of balanced locks beyond their group's
    /// allowance ([`BalanceCounts::allowance`]); returns them with the delay after which each
    /// retries. An attempt an `acquire()` call waits for is always sent.
    fn balance_attempts(&mut self) -> Vec<(LockKey, RequestId, Duration)> {
        let mut refused = Vec::new();
        if self.groups.is_empty() {
            return refused;
        }
        let group_of = |locks: &BTreeMap<LockKey, Box<Entry>>, schema: &SchemaName, key: &LockKey| {
            let name = locks.get(key)?.lock.config().balance.as_ref()?;
            Some((schema.clone(), name.clone()))
        };
        // Each group's attempts in this input: in flight already from their locks' view.
        let mut this_input: BTreeMap<GroupKey, u64> = BTreeMap::new();
        for ((kind, schema), items) in &self.batches {
            if *kind == BatchKind::Acquire {
                for (key, _, _) in items {
                    if let Some(group_key) = group_of(&self.locks, schema, key) {
                        *this_input.entry(group_key).or_default() += 1;
                    }
                }
            }
        }
        // What each group may still attempt: its allowance given what it holds or is winning.
        let mut allowances: BTreeMap<GroupKey, u64> = BTreeMap::new();
        for (group_key, attempts) in this_input {
            let Some(group) = self.groups.get(&group_key) else {
                continue;
            };
            let Some(counts) = &group.counts else { continue };
            let (mut held, mut in_flight) = (0u64, 0u64);
            for entry in group.locks.iter().filter_map(|k| self.locks.get(k)) {
                held += u64::from(entry.lock.phase() == Phase::Holding);
                in_flight += u64::from(entry.lock.attempting());
            }
            let owned = held + in_flight.saturating_sub(attempts);
            allowances.insert(group_key, counts.allowance(owned));
        }
        for ((kind, schema), items) in self.batches.iter_mut() {
            if *kind != BatchKind::Acquire {
                continue;
            }
            // The attempts that count against an allowance, in the order they may go: first
            // those of channels known to be free (a release heard and not asked since), then the
            // rest; each class in an order of this session's own draw, so that the members of a
            // group do not all try the same channels first.
            let mut candidates: Vec<(bool, u64, usize)> = Vec::new();
            for (i, (key, _, _)) in items.iter().enumerate() {
                let Some(group_key) = group_of(&self.locks, schema, key) else {
                    continue;
                };
                if !allowances.contains_key(&group_key) {
                    continue;
                }
                let explicit = self.locks.get(key).is_some_and(|e| !e.acquire_calls.is_empty());
                let known_free = self.groups.get(&group_key).is_some_and(|g| g.known_free.contains(key));
                let rank = if explicit { 0 } else { self.rng.next_u64() | 1 };
                candidates.push((!known_free, rank, i));
            }
            candidates.sort_unstable();
            let mut keep = vec![true; items.len()];
            for (_, rank, i) in candidates {
                let (key, id, _) = &items[i];
                let Some(group_key) = group_of(&self.locks, schema, key) else {
                    continue;
                };
                let Some(allowance) = allowances.get_mut(&group_key) else {
                    continue;
                };
                // An attempt an `acquire()` call waits for always goes.
                if rank == 0 || *allowance > 0 {
                    *allowance = allowance.saturating_sub(1);
                    continue;
                }
                let retry = self
                    .groups
                    .get(&group_key)
                    .map_or(Duration::from_secs(1), |g| g.renew_interval);
                refused.push((*key, *id, retry));
                keep[i] = false;
            }
            let mut keep = keep.into_iter();
            items.retain(|_| keep.next().unwrap_or(true));
        }
        self.batches.retain(|_, items| !items.is_empty());
        refused
    }

    /// Asks for `group`'s counts alongside the statement that just went out, unless a query is
    /// in flight or one went out within half a renew interval (and no channel waits to be
    /// recorded).
    fn ask_counts(&mut self, session: SessionId, group_key: GroupKey) {
        let Some(group) = self.groups.get(&group_key) else {
            return;
        };
        let register: Vec<LockKey> = group
            .locks
            .iter()
            .filter(|k| !group.registered.contains(k))
            .filter(|k| self.locks.get(k).is_some_and(|e| e.prep == Prep::Ready))
            .copied()
            .collect();
        let fresh = group
            .asked_at
            .is_some_and(|at| self.now.saturating_duration_since(at) < group.renew_interval / 2);
        if group.asking.is_some() || (fresh && register.is_empty()) {
            return;
        }
        let channels = register
            .iter()
            .filter_map(|k| self.locks.get(k))
            .map(|e| e.target.channel.clone())
            .collect();
        let op = SessionOp::Balance {
            schema: group_key.0.clone(),
            group: group_key.1.clone(),
            register: channels,
            leave: false,
        };
        let route = Route::Balance {
            group: group_key.clone(),
            register,
        };
        let id = self.execute(session, op, route);
        if let Some(group) = self.groups.get_mut(&group_key) {
            group.asking = Some(id);
            group.asked_at = Some(self.now);
        }
    }

    /// The table's counts of a group: remember them and release what exceeds the fair share
    /// ([`BalanceCounts::to_release`]), by the ordinary graceful release (drain marker first).
    fn on_balance_counts(
        &mut self,
        id: OpId,
        group_key: GroupKey,
        register: Vec<LockKey>,
        result: Result<OpReply, DbError>,
    ) {
        let Some(group) = self.groups.get_mut(&group_key) else {
            return;
        };
        if group.asking == Some(id) {
            group.asking = None;
        }
        let counts = match result {
            Ok(OpReply::Balance(counts)) => counts,
            // Without counts the group competes as it did; the next statement asks again.
            _ => return,
        };
        group.registered.extend(register);
        // What the table reports free goes first among the attempts.
        for channel in &counts.free {
            if let Some(key) = self.by_channel.get(channel.as_str()) {
                if group.locks.contains(key) {
                    group.known_free.insert(*key);
                }
            }
        }
        group.counts = Some(counts.clone());
        let holding: Vec<LockKey> = group
            .locks
            .iter()
            .filter(|k| self.locks.get(k).is_some_and(|e| e.lock.phase() == Phase::Holding))
            .copied()
            .collect();
        let give = usize::try_from(counts.to_release(holding.len() as u64)).unwrap_or(usize::MAX);
        // The last channels by key: a stable choice, so repeated counts pick the same ones.
        for key in holding.into_iter().rev().take(give) {
            self.feed(key, Input::Release);
        }
    }

    fn group_of_lock(&self, key: LockKey) -> Option<GroupKey> {
        let entry = self.locks.get(&key)?;
        let name = entry.lock.config().balance.as_ref()?;
        Some((entry.target.schema.clone(), name.clone()))
    }

    /// A release of `key`'s channel was heard: its attempt goes first.
    fn note_peer_released(&mut self, key: LockKey) {
        if let Some(group) = self.group_of_lock(key).and_then(|g| self.groups.get_mut(&g)) {
            group.known_free.insert(key);
        }
    }

    /// The table answered an attempt of `key`: what it knew of the channel is now the table's.
    fn note_table_answered(&mut self, key: LockKey) {
        if let Some(group) = self.group_of_lock(key).and_then(|g| self.groups.get_mut(&g)) {
            group.known_free.remove(&key);
        }
    }

    /// `key` left `group`: the last lock of a group tells the table this session left it.
    fn leave_group(&mut self, group_key: GroupKey, key: LockKey) {
        let Some(group) = self.groups.get_mut(&group_key) else {
            return;
        };
        group.locks.remove(&key);
        group.registered.remove(&key);
        group.known_free.remove(&key);
        if !group.locks.is_empty() {
            return;
        }
        self.groups.remove(&group_key);
        if let Some(session) = self.current() {
            let op = SessionOp::Balance {
                schema: group_key.0.clone(),
                group: group_key.1.clone(),
                register: Vec::new(),
                leave: true,
            };
            self.execute(
                session,
                op,
                Route::Balance {
                    group: group_key,
                    register: Vec::new(),
                },
            );
        }
    }

    fn on_lock_error(&mut self, key: LockKey, error: &DbError) {
        let Some(session) = self.current() else { return };
        let Some(entry) = self.locks.get(&key) else { return };
        if error.is_schema_missing() {
            let schema_key = (entry.target.protocol, entry.target.schema.clone());
            let Link::Up(conn) = &mut self.link else { return };
            conn.bootstrapped.remove(&schema_key);
            if !conn.bootstrapping.contains_key(&schema_key) {
                self.outputs
                    .push_back(SessionOutput::Event(SessionEvent::SchemaMissing {
                        schema: schema_key.1.clone(),
                        error: error.clone(),
                    }));
                self.bootstrap(schema_key);
            }
        } else if error.is_read_only() {
            if let Some(entry) = self.locks.get_mut(&key) {
                entry.refused_read_only = true;
            }
            self.outputs.push_back(SessionOutput::Lock {
                lock: key,
                event: LockEvent::Warning(Warning::ServerReadOnly),
            });
            self.read_only(session, "lock operation");
        }
    }

    fn on_notification(&mut self, session: SessionId, channel: String, payload: String, pid: i32) {
        if self.current() != Some(session) {
            return;
        }
        if !self.lingers.is_empty() {
            let own = self.own_pid;
            self.end_lingers(|l| handed_over(l.protocol, &l.channel, &channel, &payload, pid, own));
        }
        let Some(key) = self.lock_of_channel(&channel) else {
            return;
        };
        let own = self.own_pid;
        if let Some(entry) = self.locks.get_mut(&key) {
            if entry.lock.state().stopping
                && handed_over(
                    entry.target.protocol,
                    &entry.target.channel,
                    &channel,
                    &payload,
                    pid,
                    own,
                )
            {
                entry.handed_over = true;
            }
        }
        if self.locks.get(&key).is_some_and(|e| e.prep == Prep::Ready) {
            self.feed(
                key,
                Input::Notification {
                    session,
                    channel,
                    payload,
                    pid,
                },
            );
        }
    }

    // ----- calls -----

    fn done(&mut self, call: CallId, result: Result<CallReply, CallError>) {
        self.outputs.push_back(SessionOutput::CallDone { call, result });
    }

    fn on_call(&mut self, call: CallId, key: LockKey, request: LockCall) {
        if !self.locks.contains_key(&key) {
            let error = if self.closing.is_some() {
                CallError::Closed
            } else {
                CallError::NoSuchLock
            };
            let result = match request {
                LockCall::Release | LockCall::StandDown | LockCall::Destroy { .. } => Ok(CallReply::Done),
                LockCall::Init | LockCall::Acquire => Err(error),
            };
            self.done(call, result);
            return;
        }
        let up = self.current().is_some();
        let Some(entry) = self.locks.get_mut(&key) else { return };
        match request {
            LockCall::Init => {
                if self.closing.is_some() || entry.lock.state().stopping {
                    self.done(call, Err(CallError::Closed));
                    return;
                }
                entry.wanted = true;
                if entry.prep == Prep::Ready {
                    self.done(call, Ok(CallReply::Done));
                } else {
                    // Up: set it up now; connecting or waiting to reconnect: at the next
                    // connection, or fail with the next attempt's error.
                    entry.init_calls.push(call);
                    self.prepare(key);
                }
                self.feed(key, Input::Start);
            }
            LockCall::Acquire => {
                if entry.prep == Prep::Ready {
                    entry.acquire_calls.push_back(call);
                    self.feed(key, Input::TryAcquire);
                } else if up {
                    entry.wanted = true;
                    entry.early_acquires.push(call);
                    self.prepare(key);
                } else {
                    self.done(call, Ok(CallReply::Acquired(false)));
                }
            }
            LockCall::Release => {
                if entry.lock.state().phase.is_holder() {
                    entry.release_calls.push(call);
                    self.feed(key, Input::Release);
                } else {
                    self.done(call, Ok(CallReply::Done));
                }
            }
            LockCall::StandDown => {
                if entry.lock.state().phase.is_holder() {
                    entry.release_calls.push(call);
                    self.feed(key, Input::StandDown);
                } else {
                    self.feed(key, Input::StandDown);
                    self.done(call, Ok(CallReply::Done));
                }
            }
            LockCall::Destroy { signal } => {
                entry.destroy_calls.push(call);
                let input = signal.map_or(Input::Stop, Input::Signal);
                self.feed(key, input);
            }
        }
    }

    // ----- locks -----

    /// Feeds one input to one lock and carries out what it asks for.
    fn feed(&mut self, key: LockKey, input: Input) {
        let Some(entry) = self.locks.get_mut(&key) else { return };
        entry.lock.handle_input(self.now, input);
        self.drain(key);
        self.rearm(key);
        self.note_holder(key);
    }

    fn rearm(&mut self, key: LockKey) {
        let Some(entry) = self.locks.get_mut(&key) else { return };
        let next = entry.lock.poll_timeout();
        if next != entry.armed {
            if let Some((old, _)) = entry.armed {
                self.timers.remove(&(old, key));
            }
            if let Some((at, _)) = next {
                self.timers.insert((at, key));
            }
            entry.armed = next;
        }
    }

    fn drain(&mut self, key: LockKey) {
        loop {
            let Some(entry) = self.locks.get_mut(&key) else { return };
            let Some(output) = entry.lock.poll_output() else { return };
            self.on_lock_output(key, output);
        }
    }

    fn on_lock_output(&mut self, key: LockKey, output: Output) {
        match output {
            Output::Request(request) => {
                let Some(session) = self.current().filter(|s| *s == request.session) else {
                    // The lock already got (or is about to get) SessionDown for that session.
                    return;
                };
                let Some(entry) = self.locks.get(&key) else { return };
                let batch = match (&request.op, entry.target.protocol) {
                    (DbOp::Renew { .. }, Protocol::Lease) => Some(BatchKind::Renew),
                    (DbOp::Acquire, Protocol::Lease) => Some(BatchKind::Acquire),
                    _ => None,
                };
                if let Some(kind) = batch {
                    // Sent at the end of this input, with every other one of its kind: the lock
                    // timed its request from now, which is when the batch goes.
                    let schema = entry.target.schema.clone();
                    self.batches
                        .entry((kind, schema))
                        .or_default()
                        .push((key, request.id, request.op));
                    return;
                }
                let op = SessionOp::Lock {
                    lock: key,
                    target: entry.target.clone(),
                    op: request.op,
                };
                self.execute(session, op, Route::Lock { key, id: request.id });
            }
            Output::ResetSession(session) => {
                if self.reset.is_none() {
                    self.reset = Some((session, DownReason::RequestTimeout));
                }
            }
            Output::Deliver { payload, replay } => self.outputs.push_back(SessionOutput::Deliver {
                lock: key,
                payload,
                replay,
            }),
            Output::AttemptDone { acquired } => {
                let Some(entry) = self.locks.get_mut(&key) else { return };
                let refused = entry.refused_read_only && !acquired;
                if let Some(call) = entry.acquire_calls.pop_front() {
                    let result = if refused {
                        Err(CallError::ReadOnly)
                    } else {
                        Ok(CallReply::Acquired(acquired))
                    };
                    self.done(call, result);
                }
            }
            Output::Event(event) => self.on_lock_event(key, event),
        }
    }

    fn on_lock_event(&mut self, key: LockKey, event: LockEvent) {
        if event == LockEvent::PeerReleased && !self.groups.is_empty() {
            self.note_peer_released(key);
        }
        let Some(entry) = self.locks.get_mut(&key) else { return };
        // A release call completes when the release is confirmed or failed (or the term ended
        // otherwise); a destroy call when the lock stopped.
        let (finished, result): (Vec<CallId>, Result<CallReply, CallError>) = match &event {
            LockEvent::Lost { .. } | LockEvent::Released => {
                entry.released_at_stop = event == LockEvent::Released && entry.lock.state().stopping;
                (entry.release_calls.drain(..).collect(), Ok(CallReply::Done))
            }
            LockEvent::ReleaseFailed { reason } => (
                entry.release_calls.drain(..).collect(),
                Err(CallError::ReleaseFailed { reason: reason.clone() }),
            ),
            LockEvent::Stopped { .. } => {
                self.stopped.push(key);
                let calls = entry
                    .release_calls
                    .drain(..)
                    .chain(entry.destroy_calls.drain(..))
                    .collect();
                (calls, Ok(CallReply::Done))
            }
            _ => (Vec::new(), Ok(CallReply::Done)),
        };
        self.outputs.push_back(SessionOutput::Lock { lock: key, event });
        for call in finished {
            self.done(call, result.clone());
        }
    }

    /// Ends the lingers `done` picks: their channels are unlistened unless a lock listens on
    /// them again, or the session is closing (its connection closes next).
    fn end_lingers(&mut self, done: impl Fn(&Linger) -> bool) {
        let (ended, kept): (Vec<Linger>, Vec<Linger>) = std::mem::take(&mut self.lingers).into_iter().partition(done);
        self.lingers = kept;
        if self.closing.is_some() {
            return;
        }
        let Some(session) = self.current() else { return };
        for linger in ended {
            if self.by_channel.contains_key(linger.channel.as_str()) {
                continue;
            }
            let op = SessionOp::Unlisten {
                channel: linger.channel,
                protocol: linger.protocol,
                schema: linger.schema,
            };
            self.execute(session, op, Route::Unlisten);
        }
    }

    fn remove_lock(&mut self, key: LockKey) {
        let Some(mut entry) = self.locks.remove(&key) else {
            return;
        };
        if let Some((at, _)) = entry.armed.take() {
            self.timers.remove(&(at, key));
        }
        self.watch.note(key, None);
        self.watch.watched.remove(&key);
        self.by_channel.remove(entry.target.channel.as_str());
        if let Some(name) = entry.lock.config().balance.clone() {
            self.leave_group((entry.target.schema.clone(), name), key);
        }
        let mut gone = Vec::new();
        self.ops.retain(|id, route| {
            let keep = !matches!(route, Route::Lock { key: k, .. } | Route::Listen { key: k } if *k == key);
            if !keep {
                gone.push(*id);
            }
            keep
        });
        for route in self.ops.values_mut() {
            if let Route::Batch { entries } = route {
                for slot in entries.iter_mut() {
                    if slot.is_some_and(|(k, _)| k == key) {
                        *slot = None;
                    }
                }
            }
        }
        if let Link::Up(conn) = &mut self.link {
            for id in gone {
                conn.setup.remove(&id);
                if conn.listen_in_flight == Some(id) {
                    // Its reply finds no route now: the queue must not wait for it.
                    conn.listen_in_flight = None;
                }
            }
        }
        if matches!(entry.prep, Prep::Listening | Prep::Ready) {
            if let Some(session) = self.current() {
                let channel = entry.target.channel.clone();
                let protocol = entry.target.protocol;
                let schema = entry.target.schema.clone();
                let linger = self.config.handover_linger;
                if entry.released_at_stop && protocol == Protocol::Lease && !entry.handed_over && !linger.is_zero() {
                    // Its successor's `acquired` marker comes on this channel: until then (or the
                    // bound) the connection stays open and listening.
                    self.lingers.push(Linger {
                        channel,
                        protocol,
                        schema,
                        until: self.now + linger,
                    });
                } else {
                    let op = SessionOp::Unlisten {
                        channel,
                        protocol,
                        schema,
                    };
                    self.execute(session, op, Route::Unlisten);
                }
            }
        }
        let calls: Vec<(CallId, Result<CallReply, CallError>)> = entry
            .init_calls
            .drain(..)
            .map(|c| (c, Err(CallError::Closed)))
            .chain(
                entry
                    .early_acquires
                    .drain(..)
                    .chain(entry.acquire_calls.drain(..))
                    .map(|c| (c, Ok(CallReply::Acquired(false)))),
            )
            .chain(
                entry
                    .release_calls
                    .drain(..)
                    .chain(entry.destroy_calls.drain(..))
                    .map(|c| (c, Ok(CallReply::Done))),
            )
            .collect();
        for (call, result) in calls {
            self.done(call, result);
        }
        self.outputs.push_back(SessionOutput::LockRemoved { lock: key });
    }
}

// ----- the crash watch -----

impl Session {
    /// Records which holder `key` waits on after an input (a map lookup when nothing changed).
    fn note_holder(&mut self, key: LockKey) {
        let Some(entry) = self.locks.get(&key) else { return };
        let holder = entry
            .lock
            .watch_holder()
            .filter(|_| matches!(entry.prep, Prep::Ready))
            .map(|pid| (entry.target.schema.clone(), pid));
        self.watch.note(key, holder);
    }

    /// The delay before the watch connects again after a failure: the shortest acquire
    /// interval of the watching locks (their ordinary retries cover the gap).
    fn watch_backoff(&self) -> Duration {
        self.configs
            .iter()
            .filter(|c| c.watches_crashes())
            .map(|c| c.acquire_interval)
            .min()
            .unwrap_or(Duration::from_secs(30))
    }

    /// Closes the watch's connection (or its attempt) and forgets its wait. A wait in flight is
    /// cancelled first: a closed client does not end a blocked statement on the server, which
    /// would keep its slot until the wait's bound.
    fn close_watch(&mut self) {
        self.watch.idle_until = None;
        let Some(session) = self.watch.session() else { return };
        if let Some(wait) = self.watch.wait.take() {
            self.ops.remove(&wait.id);
            self.outputs.push_back(SessionOutput::WatchCancel { session });
        }
        self.outputs.push_back(SessionOutput::WatchDisconnect { session });
        self.watch.link = WatchLink::Idle;
    }

    fn watch_fire_due(&mut self) {
        if matches!(self.watch.link, WatchLink::Up { .. }) && self.watch.idle_until.is_some_and(|at| at <= self.now) {
            self.close_watch();
        }
        match self.watch.link {
            WatchLink::Down { retry_at } if retry_at <= self.now => self.watch.link = WatchLink::Idle,
            WatchLink::Connecting { deadline, .. } if deadline <= self.now => {
                let cause = format!(
                    "no answer within the connect timeout of {:?}",
                    self.config.connect_timeout
                );
                self.watch_down(WatchFailure::ConnectFailed(cause), true);
            }
            _ => {}
        }
        if self.watch.wait.as_ref().is_some_and(|w| w.deadline <= self.now) {
            self.watch_down(WatchFailure::Timeout, true);
        }
    }

    /// The watch stopped: forget its wait, close its connection if `tell_driver`, connect again
    /// after the backoff; the watched locks get their ordinary retries back (at the next
    /// [`update_watch`](Session::update_watch)).
    fn watch_down(&mut self, reason: WatchFailure, tell_driver: bool) {
        if let Some(wait) = self.watch.wait.take() {
            self.ops.remove(&wait.id);
        }
        if let (true, Some(session)) = (tell_driver, self.watch.session()) {
            self.outputs.push_back(SessionOutput::WatchDisconnect { session });
        }
        let retry_in = match reason {
            // The server is full: another try soon would take a slot that a process's own
            // listening connection may need (after a restart, say).
            WatchFailure::ConnectionLimit(_) => self.watch_backoff().max(WATCH_LIMIT_BACKOFF),
            _ => self.watch_backoff(),
        };
        self.watch.link = WatchLink::Down {
            retry_at: self.now + retry_in,
        };
        self.outputs
            .push_back(SessionOutput::Event(SessionEvent::WatchDown { reason, retry_in }));
    }

    fn on_watch_connected(&mut self, session: SessionId) {
        match self.watch.link {
            WatchLink::Connecting { session: s, .. } if s == session => {
                self.watch.link = WatchLink::Up { session };
                self.outputs
                    .push_back(SessionOutput::Event(SessionEvent::WatchUp { session }));
            }
            _ => self.outputs.push_back(SessionOutput::WatchDisconnect { session }),
        }
    }

    fn on_await_reply(&mut self, id: OpId, result: Result<OpReply, DbError>) {
        let Some(wait) = self.watch.wait.take_if_id(id) else {
            return;
        };
        match result {
            Ok(OpReply::Await(outcome)) if outcome.frees() => {
                let keys: Vec<LockKey> = self
                    .watch
                    .holders
                    .get(&wait.holder)
                    .map(|keys| keys.iter().copied().collect())
                    .unwrap_or_default();
                // A release is followed by its marker, which wakes its successor first: waking
                // every watching standby at once here would undo that.
                let input = match outcome {
                    AwaitOutcome::Released => Input::HolderReleased,
                    _ => Input::HolderGone,
                };
                for key in keys {
                    self.watch.watched.remove(&key);
                    self.feed(key, input.clone());
                }
            }
            Ok(OpReply::Await(AwaitOutcome::Timeout)) => {}
            Ok(OpReply::Await(_)) => {
                self.watch.unwatchable.insert(wait.holder);
            }
            // A cancel meant for the wait before this one: issue it again.
            Err(DbError::Server { code, .. }) if code == SQLSTATE_QUERY_CANCELED => {}
            Ok(other) => self.watch_down(WatchFailure::Failed(format!("unexpected reply {other:?}")), true),
            Err(error) => self.watch_down(WatchFailure::Failed(error.to_string()), true),
        }
    }

    /// Chooses the holder to watch, opens the watch connection, issues, cancels and re-issues
    /// the wait, and tells the locks whether their holder is watched.
    fn update_watch(&mut self) {
        if self.closing.is_some() || matches!(self.link, Link::Closed) {
            if let Some(session) = self.watch.session() {
                self.outputs.push_back(SessionOutput::WatchDisconnect { session });
            }
            if let Some(wait) = self.watch.wait.take() {
                self.ops.remove(&wait.id);
            }
            self.watch.link = WatchLink::Idle;
        }
        let main = self.current();
        if main.is_none() {
            // Without its listening connection the process cannot take over: the watch's
            // connection would only hold a server slot, which the reconnection may need.
            self.close_watch();
        }
        let desired = main.and_then(|_| self.watch.choose(self.own_pid));
        let nothing_to_watch = desired.is_none();
        if self.closing.is_none() {
            match self.watch.link {
                WatchLink::Idle if desired.is_some() => {
                    let session = self.new_session_id();
                    self.watch.link = WatchLink::Connecting {
                        session,
                        deadline: self.now + self.config.connect_timeout,
                    };
                    self.outputs.push_back(SessionOutput::WatchConnect { session });
                }
                WatchLink::Up { session } => {
                    if self
                        .watch
                        .wait
                        .as_ref()
                        .is_some_and(|w| Some(&w.holder) != desired.as_ref())
                    {
                        if let Some(wait) = self.watch.wait.take() {
                            self.ops.remove(&wait.id);
                        }
                        self.outputs.push_back(SessionOutput::WatchCancel { session });
                    }
                    if let (None, Some(holder)) = (&self.watch.wait, desired) {
                        self.issue_wait(session, holder);
                    }
                }
                _ => {}
            }
        }
        // Nothing to watch (this process holds every lock it waits on, or its standbys know no
        // live holder): the connection closes after `WATCH_IDLE_CLOSE`, which outlasts a
        // handover's moment without a holder.
        if matches!(self.watch.link, WatchLink::Up { .. }) && nothing_to_watch {
            self.watch.idle_until.get_or_insert(self.now + WATCH_IDLE_CLOSE);
        } else {
            self.watch.idle_until = None;
        }
        let now_watched: BTreeSet<LockKey> = self
            .watch
            .wait
            .as_ref()
            .and_then(|w| self.watch.holders.get(&w.holder))
            .cloned()
            .unwrap_or_default();
        if now_watched != self.watch.watched {
            let before = std::mem::replace(&mut self.watch.watched, now_watched.clone());
            for key in before.difference(&now_watched) {
                self.feed(*key, Input::Watched(false));
            }
            for key in now_watched.difference(&before) {
                self.feed(*key, Input::Watched(true));
            }
        }
    }

    fn issue_wait(&mut self, session: SessionId, holder: Holder) {
        let Some(config) = self
            .watch
            .holders
            .get(&holder)
            .and_then(|keys| keys.iter().next())
            .and_then(|key| self.locks.get(key))
            .map(|entry| entry.lock.config().clone())
        else {
            return;
        };
        let (max, answer_within) = wait_bounds(config.crash_watch_refresh, config.request_timeout);
        let id = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(id, Route::Await);
        let op = SessionOp::AwaitHolder {
            schema: holder.0.clone(),
            pid: holder.1,
            max,
        };
        self.outputs
            .push_back(SessionOutput::Execute(SessionRequest { id, session, op }));
        self.watch.wait = Some(Wait {
            id,
            holder,
            deadline: self.now + answer_within,
        });
    }
}

/// SQLSTATE of a statement cancelled on request.
const SQLSTATE_QUERY_CANCELED: &str = "57014";

/// The crash watch's wait before it connects again after the server refused its connection for
/// the connection limit (the longer of this and the ordinary watch backoff): at the limit the
/// watch's connections compete with the fleet's own listening connections for the slots.
pub const WATCH_LIMIT_BACKOFF: Duration = Duration::from_secs(600);

/// How long the crash watch's connection stays open with nothing to watch (the process holds
/// every lock it waits on, or knows no live holder) before it closes, freeing its server slot.
pub const WATCH_IDLE_CLOSE: Duration = Duration::from_secs(60);

trait TakeIfId {
    fn take_if_id(&mut self, id: OpId) -> Option<Wait>;
}

impl TakeIfId for Option<Wait> {
    fn take_if_id(&mut self, id: OpId) -> Option<Wait> {
        if self.as_ref().is_some_and(|w| w.id == id) {
            self.take()
        } else {
            None
        }
    }
}

/// Whether a notification on `on` ends the wait of `channel`'s released lock for its successor:
/// another backend's `acquired` marker, or our own release marker naming no successor.
fn handed_over(protocol: Protocol, channel: &ChannelName, on: &str, payload: &str, pid: i32, own: Option<i32>) -> bool {
    match Marker::read(protocol, channel, on, payload) {
        Some(Marker::Acquired(_)) => Some(pid) != own,
        Some(Marker::Released(_)) => Some(pid) == own && Marker::successor(payload).is_none(),
        _ => false,
    }
}
