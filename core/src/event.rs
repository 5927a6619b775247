//! Inputs a lock consumes and outputs it produces.

use crate::proto::{DbError, DbRequest, FenceToken, Reply, RequestId, SessionId};

/// An OS signal that asks the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalKind {
    /// SIGINT.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGABRT.
    Abort,
}

/// Everything that can happen to a lock. Time arrives beside it in
/// [`Lock::handle_input`](crate::Lock::handle_input).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// Time passed; due timers fire.
    Tick,
    /// API `init`: start competing for the lock (retrying on its own).
    Start,
    /// API `acquire`: attempt now; answered by [`Output::AttemptDone`].
    TryAcquire,
    /// API `release`: give the lock up and stay a standby.
    Release,
    /// API `stand_down`: stop competing but stay set up (listening, buffering as a standby):
    /// release if holding, make no attempt on its own until the next `Start`. An explicit
    /// `TryAcquire` still attempts; a term won by an attempt already in flight is released at
    /// once.
    StandDown,
    /// API `destroy`: release if held, then stop for good (bounded by `shutdown_timeout`).
    Stop,
    /// An OS signal: same as `Stop`, logged with the signal.
    Signal(SignalKind),
    /// Something that blocked attempts was repaired (the session bootstrapped a dropped schema
    /// again): a started standby attempts after the wake jitter instead of at its next retry.
    Wake,
    /// The session batches requests of its locks: fire the lock's `Renew` or `Retry` timer now,
    /// ahead of its deadline, so that its renewal or attempt joins a statement that goes out
    /// now with others. A renewal may go early, never late (its lease is then timed from this
    /// earlier send); an attempt going early at worst finds the lease still held. Ignored for
    /// other timers, and when the timer is not armed.
    FireEarly(crate::lock::TimerKind),
    /// The session's crash watch waits (`true`) or no longer waits (`false`) on the holder this
    /// `Lease` standby was last refused by ([`Lock::watch_holder`](crate::Lock::watch_holder)).
    /// While watched, the standby makes no periodic attempt: the watch tells it when the holder
    /// is gone. Unwatched, its ordinary retry schedule applies again.
    Watched(bool),
    /// The crash watch saw the holder's session end (or its lease expire): a started standby
    /// attempts now.
    HolderGone,
    /// The crash watch saw the holder hold no lease any more (a release, or its row taken or
    /// dropped): the standby is no longer watched and keeps its schedule; a release's own
    /// marker wakes it (the named successor at once, the others after their delay), so the
    /// watch does not wake every standby of a release at once.
    HolderReleased,
    /// The backend pid of the lock's database session, before its
    /// [`SessionUp`](Input::SessionUp) (the [`Session`](crate::Session) feeds it). A `Lease`
    /// release marker that names this pid as the successor makes this standby attempt at once;
    /// a lock never told its pid is never the named successor.
    BackendPid(i32),
    /// A database session is ready: connected, schema present, listening on the data and lock
    /// channels.
    SessionUp(SessionId),
    /// The session ended (closed, reset, or server gone).
    SessionDown(SessionId),
    /// The reply to a [`DbRequest`].
    DbResult {
        /// The request's id.
        id: RequestId,
        /// Its outcome.
        result: Result<Reply, DbError>,
    },
    /// A notification received on the lock's session (data channel or lock channel; others
    /// are ignored).
    Notification {
        /// The session it arrived on.
        session: SessionId,
        /// Channel name.
        channel: String,
        /// Payload.
        payload: String,
        /// The backend pid of the session that sent it (`Notification::process_id`): the
        /// server sets it, so nobody can forge it. Markers count only from the holder's
        /// backend.
        pid: i32,
    },
}

/// Why a holder stopped holding without being asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The database session ended.
    SessionLost,
    /// No renewal was confirmed in time: the holder fenced itself before the lease could expire.
    LeaseExpired,
    /// The row names another holder or a newer term.
    Superseded,
    /// A database request went unanswered for `request_timeout`.
    RequestTimeout,
    /// A release was asked for but could not be confirmed (the statement failed, or did not
    /// finish within the shutdown timeout).
    ReleaseUnconfirmed,
}

impl LostReason {
    /// A stable snake_case name (used in the worker's JSON).
    pub fn as_str(&self) -> &'static str {
        match self {
            LostReason::SessionLost => "session_lost",
            LostReason::LeaseExpired => "lease_expired",
            LostReason::Superseded => "superseded",
            LostReason::RequestTimeout => "request_timeout",
            LostReason::ReleaseUnconfirmed => "release_unconfirmed",
        }
    }
}

/// Something the application may want to know; worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// A stale holder's backend could not be terminated (reported once per lock).
    TerminateNotPermitted {
        /// Its backend pid.
        pid: i32,
    },
    /// The handover buffer overflowed; the oldest messages were dropped.
    HandoverBufferOverflow {
        /// Messages dropped so far in this wait.
        dropped: u64,
    },
    /// A lock-channel marker claimed a newer term while this one holds. The table decides (the
    /// next renewal), not the marker: anyone who can connect can send one. Reported once per
    /// term.
    UnconfirmedMarker {
        /// The token the marker claimed.
        token: FenceToken,
    },
    /// The server refused a write as read-only (SQLSTATE 25006): a hot standby or
    /// `default_transaction_read_only`. The session is reset to look for a writable host.
    ServerReadOnly,
    /// Lock-channel markers were ignored because they did not come from the backend that the
    /// lock table names for their term (anyone who can connect can `NOTIFY`). Reported when
    /// the count reaches a power of two.
    IgnoredMarkers {
        /// The sender of the latest one.
        pid: i32,
        /// How many this lock has ignored so far.
        count: u64,
    },
    /// The replay buffer overflowed; the oldest messages were dropped (reported when the
    /// count reaches a power of two). If this lock wins a takeover and needed them, a
    /// [`LockEvent::Gap`] follows.
    ReplayOverflow {
        /// Messages dropped so far since the buffer was last trimmed.
        dropped: u64,
    },
    /// A database request failed; the lock carries on.
    RequestFailed {
        /// The operation's name.
        op: &'static str,
        /// The error.
        error: DbError,
    },
}

impl Warning {
    /// A stable snake_case name (used in the worker's JSON).
    pub fn as_str(&self) -> &'static str {
        match self {
            Warning::TerminateNotPermitted { .. } => "terminate_not_permitted",
            Warning::HandoverBufferOverflow { .. } => "handover_buffer_overflow",
            Warning::ServerReadOnly => "server_read_only",
            Warning::IgnoredMarkers { .. } => "ignored_markers",
            Warning::ReplayOverflow { .. } => "replay_overflow",
            Warning::UnconfirmedMarker { .. } => "unconfirmed_marker",
            Warning::RequestFailed { .. } => "request_failed",
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::TerminateNotPermitted { pid } => {
                write!(f, "not permitted to terminate the stale holder's backend (pid {pid})")
            }
            Warning::HandoverBufferOverflow { dropped } => {
                write!(f, "handover buffer overflowed; {dropped} oldest messages dropped")
            }
            Warning::ServerReadOnly => write!(
                f,
                "the server refused a lock write as read-only (SQLSTATE 25006); reconnecting to look for a writable host"
            ),
            Warning::RequestFailed { op, error } => write!(f, "{op} failed: {error}"),
            Warning::IgnoredMarkers { pid, count } => write!(
                f,
                "ignored {count} lock-channel markers not sent by the term's holder (latest from backend pid {pid})"
            ),
            Warning::ReplayOverflow { dropped } => {
                write!(f, "replay buffer overflowed; {dropped} oldest messages dropped")
            }
            Warning::UnconfirmedMarker { token } => write!(
                f,
                "a lock-channel marker claimed a newer term ({token}) while this one holds; ignored until the table says so"
            ),
        }
    }
}

/// A change of the lock's state, reported to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockEvent {
    /// This process holds the lock and receives the channel's notifications.
    Acquired {
        /// The term's fencing token (`Lease`).
        token: Option<FenceToken>,
    },
    /// This process stopped holding involuntarily.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// A voluntary release reached its drain marker: the tenure ends here, nothing more is
    /// delivered, and the release statement follows (`Released` or `ReleaseFailed` report how it
    /// ended).
    Drained,
    /// The server confirmed the release (after `Drained`).
    Released,
    /// The release (after `Drained`) was not confirmed: the row was no longer this term's
    /// (`Superseded`), the session ended (`SessionLost`, `RequestTimeout`), or the statement
    /// failed or did not finish within the shutdown timeout (`ReleaseUnconfirmed`). Under `Lease`
    /// the lease then ends at its expiry (or with the session).
    ReleaseFailed {
        /// Why.
        reason: LostReason,
    },
    /// Another holder released the lock (its release notification arrived).
    PeerReleased,
    /// This term began with a takeover, and messages it should have replayed were gone (the
    /// replay buffer overflowed): up to `missing` messages of the previous term may never have
    /// been delivered. Reported right after `Acquired`, before the replay.
    Gap {
        /// How many messages were dropped.
        missing: u64,
    },
    /// The lock stopped for good (after `Stop` or a signal).
    Stopped {
        /// Whether a held lock was released before stopping (`true` when none was held).
        released: bool,
    },
    /// Advisory.
    Warning(Warning),
}

/// What the driver must do or report. Drain with
/// [`Lock::poll_output`](crate::Lock::poll_output) after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Execute a database request.
    Request(DbRequest),
    /// Report a state change.
    Event(LockEvent),
    /// Hand this notification of the data channel to the application.
    Deliver {
        /// Its payload.
        payload: String,
        /// Replayed at a takeover: the previous holder may have delivered it already (it
        /// followed that holder's last acknowledged progress marker). Deduplicate on a message
        /// id if it matters.
        replay: bool,
    },
    /// The session looks dead (a request went unanswered): close it and open a new one.
    ResetSession(SessionId),
    /// Answer to [`Input::TryAcquire`].
    AttemptDone {
        /// Whether the lock is held now.
        acquired: bool,
    },
}
