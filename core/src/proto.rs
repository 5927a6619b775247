//! Typed database operations and their replies: the contract between the core and whatever
//! executes them (`pgiplock`'s SQL, the simulator's model).

use std::fmt;
use std::time::Duration;

use crate::{ChannelName, Protocol};

/// A fencing token: strictly increasing per channel, forever (`Lease` only).
///
/// Downstream systems can reject writes carrying a token lower than one they have seen.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FenceToken(pub u64);

impl fmt::Debug for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Bits of a [`FenceToken`] below its timeline: the counter of acquisitions.
pub const TOKEN_COUNTER_BITS: u32 = 40;

impl FenceToken {
    /// The PostgreSQL timeline the token was issued on: `(token >> 40) + 1`. A token is
    /// `(timeline - 1) << 40 | counter`, so a server that never failed over (timeline 1) issues
    /// 1, 2, 3, … as ever, and every token issued after a promotion (a new timeline) is
    /// greater than every token issued before it, even when asynchronous replication lost the
    /// last ones. Limits: timelines up to 2^23 and 2^40 acquisitions per timeline (a counter
    /// that overflows carries into the timeline bits: still increasing).
    ///
    /// ```
    /// use pgiplock_core::FenceToken;
    /// assert_eq!(FenceToken(7).timeline(), 1);
    /// assert_eq!(FenceToken((1 << 40) | 8).timeline(), 2);
    /// assert_eq!(FenceToken((1 << 40) | 8).counter(), 8);
    /// assert!(FenceToken((1 << 40) | 1) > FenceToken(1_000_000));
    /// ```
    pub fn timeline(self) -> u64 {
        (self.0 >> TOKEN_COUNTER_BITS) + 1
    }

    /// The counter part of the token (see [`timeline`](Self::timeline)).
    pub fn counter(self) -> u64 {
        self.0 & ((1 << TOKEN_COUNTER_BITS) - 1)
    }
}

/// Identifies one database request of one lock; replies carry it back.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RequestId(pub u64);

/// Identifies one database session (connection) of the driver. A new connection gets a new,
/// larger id; replies and notifications of an older one are ignored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SessionId(pub u64);

/// One database operation. The executor knows the lock's channel, protocol and lease ttl
/// (from [`Lock`](crate::Lock)) and its session's application name and backend pid.
///
/// Semantics, which the SQL of `pgiplock` and the simulator's model both implement:
///
/// **Classic** (table `lock(channel, app)`, keyed by the *lock channel*). The lock channel
/// `__PgIpLock__:<channel>` carries only what a Node holder of `@imqueue/pg-pubsub` puts there,
/// the trigger's `'1'`: Node standbys read *any* notification on it as a release and attempt.
/// - `Acquire`: insert `(lock_channel, app)`; on conflict the row is taken over only if no
///   session in `pg_stat_activity` has `application_name = row.app`, else "locked"
///   (not acquired). Token: none.
///   A row that already names `app` (this very session) counts as acquired.
/// - `Renew`: reads the row; `owned` iff `row.app = app`.
/// - `Drain`: sends `'draining'` on the *drain channel* `__PgIpDrain_:<channel>`, which only
///   our Classic sessions listen to. It is ordered with the data messages and the release in
///   every listener's stream all the same: notifications of different transactions reach each
///   listener in commit order, whatever their channels.
/// - `Release`: deletes the row where `app = app`; at commit the trigger sends `'1'` on the lock
///   channel. `released` iff a row was deleted.
///
/// **Lease** (table `lease(channel, holder, holder_pid, token, expires_at)`, keyed by the user
/// channel; rows are never deleted, so tokens never go back):
/// - `Acquire`: the lease is free when there is no row, `holder` is null, `expires_at <= now()`,
///   no session has both `pid = holder_pid` and `application_name = holder`, or `holder = app`
///   (this very session). If free:
///   `holder = app`, `holder_pid = own pid`, `token = token + 1` (1 for a new row),
///   `expires_at = now() + ttl`, and `'acquired:<token>'` is sent on the lock channel; the reply
///   names the previous holder as `stale_holder` when its session was still alive, and the
///   previous term (`previous`: its token, its holder's pid, whether it was released) when
///   there was one. If not free: nothing is written; the reply gives the remaining lease and
///   the current term's token and holder pid (`holder_token`, `holder_pid`). When acquired,
///   `holder_pid` is this session's own backend pid.
/// - `Renew { token, progress }`: `expires_at = now() + ttl` where `holder = app and token =
///   token`; `owned` iff a row matched. When it matched and `progress` is given, the same
///   transaction sends `'progress:<token>:<seq>[:<ack>]'` on the lock channel (see
///   [`Marker::Progress`]).
/// - `Drain { token }`: sends `'draining:<token>'` on the lock channel (no drain channel).
/// - `Drained { token }`: sends `'drained:<token>'` on the lock channel: the holder of `token`
///   saw its own release marker, so it delivered everything before it (a release that is its
///   own drain point, [`LockConfig::drain_in_release`](crate::LockConfig::drain_in_release)).
/// - `Release { token }`: clears `holder` and `expires_at` where `holder = app and token =
///   token` (`holder_pid` stays, so the next winner learns who sent this term's markers), and
///   sends `'released:<token>'` on the lock channel; `released` iff matched.
/// - `TerminateStale`: `pg_terminate_backend(pid)` if a session with that pid and application
///   name still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DbOp {
    /// Try to become the holder.
    Acquire,
    /// Extend the lease (`Lease`) or confirm ownership (`Classic`).
    Renew {
        /// The term being renewed (`None` under `Classic`).
        token: Option<FenceToken>,
        /// The progress marker to commit with the renewal (`Lease`; `None` under `Classic`).
        progress: Option<Progress>,
    },
    /// Put the drain marker into every listener's stream: the holder delivers up to it, the next
    /// holder from it on.
    Drain {
        /// The term being ended (`None` under `Classic`).
        token: Option<FenceToken>,
    },
    /// Give the lock up and wake the standbys.
    Release {
        /// The term being released (`None` under `Classic`).
        token: Option<FenceToken>,
    },
    /// Say that the released term `token` delivered everything before its release marker
    /// (`Lease`, after a release that was its own drain point).
    Drained {
        /// The released term.
        token: FenceToken,
    },
    /// Terminate the backend of a holder whose lease was taken over while it was alive.
    TerminateStale {
        /// Its backend pid.
        pid: i32,
        /// Its application name.
        app: String,
    },
}

impl DbOp {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            DbOp::Acquire => "acquire",
            DbOp::Renew { .. } => "renew",
            DbOp::Drain { .. } => "drain",
            DbOp::Release { .. } => "release",
            DbOp::Drained { .. } => "drained",
            DbOp::TerminateStale { .. } => "terminate_stale",
        }
    }
}

/// A progress marker of a holding term: the renewal that carries it puts
/// `progress:<token>:<seq>[:<ack>]` into every listener's stream.
///
/// `seq` numbers the term's markers (the `acquired` marker is 0, renewals count from 1); `ack`
/// is the newest of the term's own markers that the holder has seen in its own stream, so every
/// notification before that marker has reached the holder's application. A standby may forget
/// what it kept from before marker `ack` of that term; what follows is what it replays if the
/// term ends without a handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Progress {
    /// This marker's number within the term (1, 2, ...).
    pub seq: u64,
    /// The newest own marker the holder has seen (0 is the `acquired` marker), if any.
    pub ack: Option<u64>,
}

/// The term before the one an acquisition began, as the lock table had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PreviousTerm {
    /// Its token.
    pub token: FenceToken,
    /// Its holder's backend pid (the sender of its markers), when the row named one.
    pub holder_pid: Option<i32>,
    /// Whether it was released (a graceful end) rather than taken over.
    pub released: bool,
}

/// A holder whose lease expired while its session was still alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleHolder {
    /// Backend pid.
    pub pid: i32,
    /// Application name.
    pub app: String,
}

/// Reply to [`DbOp::Acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireReply {
    /// Whether this session is now the holder.
    pub acquired: bool,
    /// The new term's token when acquired (`Lease`).
    pub token: Option<FenceToken>,
    /// Time left on the current holder's lease when not acquired, measured by the server
    /// (`Lease`); lets a standby retry at expiry without comparing clocks.
    pub lease_remaining: Option<Duration>,
    /// The previous holder, when it was taken over while its session was alive.
    pub stale_holder: Option<StaleHolder>,
    /// The holder's backend pid: this session's own when acquired, the current holder's when
    /// not (`Lease`). Markers of that term come from this backend and no other.
    pub holder_pid: Option<i32>,
    /// The current holder's token when not acquired (`Lease`).
    pub holder_token: Option<FenceToken>,
    /// When acquired: the term before this one, if the row had one (`Lease`).
    pub previous: Option<PreviousTerm>,
}

impl AcquireReply {
    /// "Not acquired", with no lease information (Classic's "locked").
    pub fn locked() -> Self {
        AcquireReply {
            acquired: false,
            token: None,
            lease_remaining: None,
            stale_holder: None,
            holder_pid: None,
            holder_token: None,
            previous: None,
        }
    }

    /// "Acquired", with `token` and nothing else known (Classic's reply; a start for tests and
    /// models, which fill in the rest).
    pub fn won(token: Option<FenceToken>) -> Self {
        AcquireReply {
            acquired: true,
            token,
            ..AcquireReply::locked()
        }
    }
}

/// What [`DbOp::TerminateStale`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateOutcome {
    /// The backend was signalled to terminate.
    Terminated,
    /// No such session any more.
    Gone,
    /// This role may not terminate it.
    NotPermitted,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// Reply to `Acquire`.
    Acquire(AcquireReply),
    /// Reply to `Renew`.
    Renew {
        /// Whether the row (and term) is still this session's.
        owned: bool,
    },
    /// Reply to `Drain`: the marker is committed.
    Drained,
    /// Reply to `Release`.
    Release {
        /// Whether a row of this session's term was released.
        released: bool,
    },
    /// Reply to `TerminateStale`.
    Terminate(TerminateOutcome),
}

/// A failed request, as data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The session ended before the reply arrived.
    #[error("database session lost")]
    SessionLost,
    /// The role lacks a privilege the operation needs (SQLSTATE 42501); the server's message.
    #[error("{0} (SQLSTATE 42501)")]
    PermissionDenied(String),
    /// The server refused the statement: its SQLSTATE and message.
    #[error("{message} (SQLSTATE {code})")]
    Server {
        /// The five-character SQLSTATE, for example `42P01`.
        code: String,
        /// The server's message.
        message: String,
    },
    /// A client-side failure without a SQLSTATE (an unexpected reply, a decoding error).
    #[error("{0}")]
    Failed(String),
}

impl DbError {
    /// A server error with `code` (SQLSTATE) and `message`; 42501 becomes
    /// [`DbError::PermissionDenied`].
    pub fn server(code: &str, message: impl Into<String>) -> DbError {
        let message = message.into();
        if code == SQLSTATE_INSUFFICIENT_PRIVILEGE {
            DbError::PermissionDenied(message)
        } else {
            DbError::Server {
                code: code.to_owned(),
                message,
            }
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::PermissionDenied(_) => Some(SQLSTATE_INSUFFICIENT_PRIVILEGE),
            DbError::Server { code, .. } => Some(code),
            DbError::SessionLost | DbError::Failed(_) => None,
        }
    }

    /// The lock schema, table or function is missing (SQLSTATE 3F000, 42P01 or 42883): somebody
    /// dropped it, and bootstrapping again repairs it.
    pub fn is_schema_missing(&self) -> bool {
        matches!(self.sqlstate(), Some("3F000" | "42P01" | "42883"))
    }

    /// The server refuses writes (SQLSTATE 25006): a hot standby, or
    /// `default_transaction_read_only`.
    pub fn is_read_only(&self) -> bool {
        self.sqlstate() == Some("25006")
    }
}

/// SQLSTATE of `insufficient_privilege`.
const SQLSTATE_INSUFFICIENT_PRIVILEGE: &str = "42501";

/// A request the driver must execute and answer with
/// [`Input::DbResult`](crate::Input::DbResult).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbRequest {
    /// Echo this id in the reply.
    pub id: RequestId,
    /// Run on this session; if it is gone, reply [`DbError::SessionLost`] or nothing.
    pub session: SessionId,
    /// The operation.
    pub op: DbOp,
}

/// A notification on the lock channel, as the core understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// The holder of `token` stops delivering at this point of the stream.
    Draining(Option<FenceToken>),
    /// The holder of `token` released the lock.
    Released(Option<FenceToken>),
    /// A new term began (`Lease`).
    Acquired(FenceToken),
    /// The holder of `token` has delivered everything before its marker `ack` (`Lease`).
    Progress(FenceToken, Progress),
    /// The holder of `token` delivered everything before its release marker (`Lease`): a
    /// release that was its own drain point is proven by this marker, which follows it.
    Drained(FenceToken),
}

impl Marker {
    /// The payload that carries this marker: `'1'` for a Classic release (the trigger's payload,
    /// as `@imqueue/pg-pubsub` sends it), `draining[:<token>]`, `released:<token>`,
    /// `acquired:<token>` otherwise.
    ///
    /// ```
    /// use pgiplock_core::{FenceToken, Marker, Progress};
    /// assert_eq!(Marker::Released(None).payload(), "1");
    /// assert_eq!(Marker::Released(Some(FenceToken(7))).payload(), "released:7");
    /// assert_eq!(Marker::parse("draining:7"), Some(Marker::Draining(Some(FenceToken(7)))));
    /// let p = Marker::Progress(FenceToken(7), Progress { seq: 3, ack: Some(2) });
    /// assert_eq!(p.payload(), "progress:7:3:2");
    /// assert_eq!(Marker::parse("progress:7:3:2"), Some(p));
    /// assert_eq!(Marker::parse("progress:7:x"), None);
    /// assert_eq!(Marker::parse("drained:7"), Some(Marker::Drained(FenceToken(7))));
    /// assert_eq!(Marker::Drained(FenceToken(7)).payload(), "drained:7");
    /// ```
    pub fn payload(&self) -> String {
        match self {
            Marker::Draining(None) => "draining".to_owned(),
            Marker::Draining(Some(t)) => format!("draining:{t}"),
            Marker::Released(None) => "1".to_owned(),
            Marker::Released(Some(t)) => format!("released:{t}"),
            Marker::Acquired(t) => format!("acquired:{t}"),
            Marker::Drained(t) => format!("drained:{t}"),
            Marker::Progress(t, Progress { seq, ack: None }) => format!("progress:{t}:{seq}"),
            Marker::Progress(t, Progress { seq, ack: Some(ack) }) => format!("progress:{t}:{seq}:{ack}"),
        }
    }

    /// The channel this marker travels on under `protocol`: a `Classic` drain marker on the drain
    /// channel, everything else on the lock channel.
    ///
    /// ```
    /// use pgiplock_core::{ChannelName, FenceToken, Marker, Protocol};
    /// let c = ChannelName::new("jobs").unwrap();
    /// assert_eq!(Marker::Draining(None).channel(Protocol::Classic, &c), "__PgIpDrain_:jobs");
    /// assert_eq!(Marker::Released(None).channel(Protocol::Classic, &c), "__PgIpLock__:jobs");
    /// assert_eq!(Marker::Draining(Some(FenceToken(3))).channel(Protocol::Lease, &c), "__PgIpLock__:jobs");
    /// ```
    pub fn channel<'c>(&self, protocol: Protocol, channel: &'c ChannelName) -> &'c str {
        match (protocol, self) {
            (Protocol::Classic, Marker::Draining(_)) => channel.drain_channel(),
            _ => channel.lock_channel(),
        }
    }

    /// Reads a notification on `on` as a marker of the lock on `channel` under `protocol`, or
    /// `None` when it is none (data, another lock's channel, a stray payload on the drain
    /// channel). Under `Classic` every lock-channel payload is a release, as Node reads it, and
    /// only `'draining'` on the drain channel is a drain marker; under `Lease` see
    /// [`parse`](Marker::parse).
    ///
    /// ```
    /// use pgiplock_core::{ChannelName, Marker, Protocol};
    /// let c = ChannelName::new("jobs").unwrap();
    /// let classic = |on, payload| Marker::read(Protocol::Classic, &c, on, payload);
    /// assert_eq!(classic("__PgIpLock__:jobs", "draining"), Some(Marker::Released(None)));
    /// assert_eq!(classic("__PgIpDrain_:jobs", "draining"), Some(Marker::Draining(None)));
    /// assert_eq!(classic("__PgIpDrain_:jobs", "1"), None);
    /// assert_eq!(classic("jobs", "1"), None);
    /// ```
    pub fn read(protocol: Protocol, channel: &ChannelName, on: &str, payload: &str) -> Option<Marker> {
        match protocol {
            Protocol::Classic if on == channel.lock_channel() => Some(Marker::Released(None)),
            Protocol::Classic if on == channel.drain_channel() => {
                (payload == "draining").then_some(Marker::Draining(None))
            }
            Protocol::Lease if on == channel.lock_channel() => Marker::parse(payload),
            _ => None,
        }
    }

    /// The payload of a `Lease` release that names its successor: `released:<token>:<pid>`,
    /// the backend pid of the standby the release transaction chose to attempt first (the
    /// longest-waiting live one). [`parse`](Marker::parse) reads it as
    /// `Released(Some(token))`, [`successor`](Marker::successor) reads the pid.
    ///
    /// ```
    /// use pgiplock_core::{FenceToken, Marker};
    /// let p = Marker::release_payload(FenceToken(7), Some(4242));
    /// assert_eq!(p, "released:7:4242");
    /// assert_eq!(Marker::parse(&p), Some(Marker::Released(Some(FenceToken(7)))));
    /// assert_eq!(Marker::successor(&p), Some(4242));
    /// assert_eq!(Marker::release_payload(FenceToken(7), None), "released:7");
    /// assert_eq!(Marker::successor("released:7"), None);
    /// assert_eq!(Marker::parse("released:7:x"), None);
    /// ```
    pub fn release_payload(token: FenceToken, successor: Option<i32>) -> String {
        match successor {
            Some(pid) => format!("released:{token}:{pid}"),
            None => format!("released:{token}"),
        }
    }

    /// The successor a `Lease` release payload names ([`release_payload`](Marker::release_payload)).
    pub fn successor(payload: &str) -> Option<i32> {
        let rest = payload.strip_prefix("released:")?;
        let (token, pid) = rest.split_once(':')?;
        token.parse::<u64>().ok()?;
        pid.parse::<i32>().ok()
    }

    /// Parses a lock-channel payload. Any payload that is not one of ours is a release, as in
    /// `@imqueue/pg-pubsub`, whose standbys treat every notification as "lock released".
    pub fn parse(payload: &str) -> Option<Marker> {
        let token = |s: &str| s.parse::<u64>().ok().map(FenceToken);
        if payload == "draining" {
            return Some(Marker::Draining(None));
        }
        if let Some(rest) = payload.strip_prefix("draining:") {
            return token(rest).map(|t| Marker::Draining(Some(t)));
        }
        if let Some(rest) = payload.strip_prefix("released:") {
            let (t, successor) = match rest.split_once(':') {
                Some((t, pid)) => (t, Some(pid)),
                None => (rest, None),
            };
            if successor.is_some_and(|pid| pid.parse::<i32>().is_err()) {
                return None;
            }
            return token(t).map(|t| Marker::Released(Some(t)));
        }
        if let Some(rest) = payload.strip_prefix("acquired:") {
            return token(rest).map(Marker::Acquired);
        }
        if let Some(rest) = payload.strip_prefix("drained:") {
            return token(rest).map(Marker::Drained);
        }
        if let Some(rest) = payload.strip_prefix("progress:") {
            let number = |s: &str| s.parse::<u64>().ok();
            let mut parts = rest.split(':');
            let (t, seq, ack) = (parts.next(), parts.next(), parts.next());
            if parts.next().is_some() {
                return None;
            }
            let seq = number(seq?)?;
            let ack = match ack {
                Some(ack) => Some(number(ack)?),
                None => None,
            };
            return token(t?).map(|t| Marker::Progress(t, Progress { seq, ack }));
        }
        Some(Marker::Released(None))
    }
}
