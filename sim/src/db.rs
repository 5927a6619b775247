//! A model of the PostgreSQL server as the lock sees it: the Classic and Lease tables, sessions
//! as `pg_stat_activity` shows them, `LISTEN`/`NOTIFY` delivered at commit in commit order,
//! statement accounting, and two server states a fleet must survive: the lock schema dropped
//! (lock operations fail with SQLSTATE 42P01 until a session bootstraps it again, with empty
//! tables) and a read-only server (writes fail with SQLSTATE 25006).
//!
//! Every [`SimDb::execute`] is one transaction that commits at once: the caller (the simulator's
//! event loop, or a conformance test) decides *when* it runs by advancing the server clock first.
//! The semantics are exactly those documented on [`DbOp`].
//!
//! ```
//! use pgiplock_core::{ChannelName, DbOp, Protocol, Reply};
//! use pgiplock_sim::db::{DbConfig, SimDb};
//! use std::time::Duration;
//!
//! let mut db = SimDb::new(DbConfig::default());
//! let channel = ChannelName::new("jobs").unwrap();
//! let (a, _) = db.open_session("app-a");
//! let (b, _) = db.open_session("app-b");
//! db.listen(b, channel.lock_channel()).unwrap();
//! let ttl = Duration::from_secs(10);
//! let Ok(Reply::Acquire(r)) = db.execute(a, Protocol::Lease, &channel, ttl, &DbOp::Acquire) else { panic!() };
//! assert!(r.acquired);
//! let Ok(Reply::Acquire(r)) = db.execute(b, Protocol::Lease, &channel, ttl, &DbOp::Acquire) else { panic!() };
//! assert!(!r.acquired);
//! assert_eq!(r.lease_remaining, Some(ttl));
//! // b heard a's acquisition at commit.
//! assert_eq!(db.take_notifications(b)[0].payload, "acquired:1");
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::session_map::SessionMap;
use pgiplock_core::{
    AcquireReply, AwaitOutcome, BalanceCounts, ChannelName, DbError, DbOp, FenceToken, Marker, PreviousTerm, Protocol,
    Reply, SessionId, StaleHolder, TerminateOutcome, Timestamp, MAX_FREE_LISTED,
};

/// Server-wide settings of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbConfig {
    /// Whether `pg_terminate_backend` on another lock session is allowed (same role).
    pub terminate_permitted: bool,
}

impl Default for DbConfig {
    fn default() -> Self {
        DbConfig {
            terminate_permitted: true,
        }
    }
}

/// A notification as a listening session receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Channel name.
    pub channel: String,
    /// Payload.
    pub payload: String,
    /// Backend pid of the sending session.
    pub sender_pid: i32,
}

/// One row of the Lease table (`lease(channel, holder, holder_pid, token, expires_at)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Application name of the holder; `None` after a release.
    pub holder: Option<String>,
    /// Backend pid of the holder.
    pub holder_pid: Option<i32>,
    /// The newest term's token; never goes back.
    pub token: u64,
    /// Expiry on the server clock.
    pub expires_at: Option<Timestamp>,
    /// The first sighting of a term of an older timeline on this server (`seen_token`,
    /// `seen_at`): the one-ttl cap of its takeover counts from it, while the row still has
    /// that token. Cleared by a renewal.
    pub seen: Option<(u64, Timestamp)>,
}

/// The lock tables as a replica applies them: what a promoted replica starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedTables {
    lease: BTreeMap<String, LeaseRow>,
    classic: BTreeMap<String, String>,
    schema_dropped: bool,
    generation: u64,
}

impl ReplicatedTables {
    /// The token of a user channel's Lease row (0 without one).
    pub fn lease_token(&self, channel: &str) -> u64 {
        self.lease.get(channel).map_or(0, |r| r.token)
    }

    /// A user channel's Lease row.
    pub fn lease_row(&self, channel: &str) -> Option<&LeaseRow> {
        self.lease.get(channel)
    }

    /// Every lease's expiry `by` later (written on a clock that ran `by` ahead of this one).
    pub fn shift_expiries(&mut self, by: Duration) {
        for row in self.lease.values_mut() {
            row.expires_at = row.expires_at.map(|e| e + by);
        }
    }
}

/// When a held row of an older timeline, whose holder's session is not on this server, may be
/// taken over (`pgiplock.old_timeline_takeover`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OldTimelineTakeover {
    /// At its replicated expiry, but no later than one ttl after its first sighting here (the
    /// default).
    #[default]
    Capped,
    /// At its replicated expiry only (`'expiry'`).
    Expiry,
    /// As any other row: at once, its session not being here (`'session_gone'`).
    SessionGone,
}

/// A backend as `pg_stat_activity` shows it, plus its `LISTEN` set and notification inbox.
#[derive(Debug, Clone)]
struct Backend {
    /// Shared, so that a statement can hold it while it changes the tables.
    app: std::sync::Arc<str>,
    pid: i32,
    listening: BTreeSet<String>,
    inbox: VecDeque<Notification>,
    statements: u64,
    /// It holds its `Lease` holder advisory lock (taken by the warm-up after the bootstrap),
    /// until the session ends.
    holder_lock: bool,
}

/// Where a crash watch's wait ([`SimDb::await_begin`], [`SimDb::await_step`]) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwaitState {
    /// It answers this.
    Done(AwaitOutcome),
    /// It waits on the holder's advisory lock until `wake` (the holder's earliest expiry or the
    /// wait's end, whichever is first), or until the holder's session ends (`Gone`).
    Waiting {
        /// When it looks at the holder's rows again.
        wake: Timestamp,
    },
}

/// The database server model. See the module documentation.
#[derive(Debug, Clone)]
pub struct SimDb {
    config: DbConfig,
    now: Timestamp,
    next_session: u64,
    next_pid: i32,
    sessions: SessionMap<Backend>,
    /// Indexes of `pg_stat_activity` (application names may repeat, pids do not).
    apps: BTreeMap<String, u32>,
    pids: BTreeMap<i32, SessionId>,
    listeners: BTreeMap<String, BTreeSet<SessionId>>,
    /// Classic: lock channel -> app.
    classic: BTreeMap<String, String>,
    /// Lease: user channel -> row.
    lease: BTreeMap<String, LeaseRow>,
    statements: u64,
    /// Sessions ended by `pg_terminate_backend`, for the caller to tell their clients.
    terminated: Vec<SessionId>,
    /// Sessions whose inbox went from empty to non-empty since the last take.
    notified: Vec<SessionId>,
    /// The lock schema is gone (`DROP SCHEMA ... CASCADE`) until the next bootstrap.
    schema_dropped: bool,
    /// Schema drops so far: tokens of different generations are not comparable.
    generation: u64,
    /// Writes fail with SQLSTATE 25006.
    read_only: bool,
    /// The timeline the server writes on (1 until a promotion): the high bits of the tokens it
    /// issues.
    timeline: u64,
    old_timeline_takeover: OldTimelineTakeover,
    /// Lease: per channel, its refused standbys (application name -> backend pid and the time
    /// of its first refusal from that backend), for a release to name its successor.
    waiters: BTreeMap<String, BTreeMap<String, (i32, Timestamp)>>,
    /// Fair share: per balance group, its members (application name -> backend pid).
    balance_members: BTreeMap<String, BTreeMap<String, i32>>,
    /// Fair share: per balance group, its channels.
    balance_channels: BTreeMap<String, BTreeSet<String>>,
    /// Sessions ended since the last take, with their pid and whether they held their holder
    /// advisory lock (the crash watch's waits on them answer `gone`).
    ended: Vec<(SessionId, i32, bool)>,
}

impl SimDb {
    /// An empty server whose clock reads zero.
    pub fn new(config: DbConfig) -> Self {
        SimDb {
            config,
            now: Timestamp::ZERO,
            next_session: 1,
            next_pid: 1000,
            sessions: SessionMap::default(),
            apps: BTreeMap::new(),
            pids: BTreeMap::new(),
            listeners: BTreeMap::new(),
            classic: BTreeMap::new(),
            lease: BTreeMap::new(),
            statements: 0,
            terminated: Vec::new(),
            notified: Vec::new(),
            schema_dropped: false,
            generation: 0,
            read_only: false,
            timeline: 1,
            old_timeline_takeover: OldTimelineTakeover::default(),
            waiters: BTreeMap::new(),
            balance_members: BTreeMap::new(),
            balance_channels: BTreeMap::new(),
            ended: Vec::new(),
        }
    }

    /// The lock tables as they stand (what a replica receives of the commits so far).
    pub fn replicated_tables(&self) -> ReplicatedTables {
        ReplicatedTables {
            lease: self.lease.clone(),
            classic: self.classic.clone(),
            schema_dropped: self.schema_dropped,
            generation: self.generation,
        }
    }

    /// Replaces the lock tables with a replica's (a promotion: what it had not applied is
    /// lost). Sessions are the caller's business (a crash has ended them).
    pub fn restore_replicated_tables(&mut self, tables: ReplicatedTables) {
        self.lease = tables.lease;
        self.classic = tables.classic;
        self.schema_dropped = tables.schema_dropped;
        self.generation = tables.generation;
    }

    /// The timeline the server writes on.
    pub fn timeline(&self) -> u64 {
        self.timeline
    }

    /// Puts the server on `timeline` (a promotion starts the next one): tokens issued from now
    /// on carry it, and rows of earlier timelines are taken over by their own rule.
    pub fn set_timeline(&mut self, timeline: u64) {
        self.timeline = timeline.max(1);
    }

    /// The server-wide `pgiplock.old_timeline_takeover` of the model.
    pub fn set_old_timeline_takeover(&mut self, rule: OldTimelineTakeover) {
        self.old_timeline_takeover = rule;
    }

    /// The token after `prev` on the current timeline, as the SQL `next_token` issues it:
    /// `(timeline - 1) << 40 | counter`, never below `prev + 1`.
    pub fn next_token(&self, prev: u64) -> u64 {
        let bits = pgiplock_core::TOKEN_COUNTER_BITS;
        let mask = (1u64 << bits) - 1;
        (prev + 1).max(((self.timeline - 1) << bits) + (prev & mask) + 1)
    }

    /// Whether `token` was issued on an older timeline and such rows wait for their lease (the
    /// SQL `older_timeline`).
    fn older_timeline(&self, token: u64) -> bool {
        self.old_timeline_takeover != OldTimelineTakeover::SessionGone
            && (token >> pgiplock_core::TOKEN_COUNTER_BITS) + 1 < self.timeline
    }

    /// The server clock (`now()` in SQL).
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Moves the server clock forward to `t` (never backwards).
    pub fn advance_to(&mut self, t: Timestamp) {
        self.now = self.now.max(t);
    }

    /// Opens a session with `application_name = app`; returns its id and backend pid.
    pub fn open_session(&mut self, app: &str) -> (SessionId, i32) {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let pid = self.next_pid;
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        *self.apps.entry(app.to_owned()).or_insert(0) += 1;
        self.pids.insert(pid, id);
        self.sessions.insert(
            id,
            Backend {
                app: std::sync::Arc::from(app),
                pid,
                listening: BTreeSet::new(),
                inbox: VecDeque::new(),
                statements: 0,
                holder_lock: false,
            },
        );
        (id, pid)
    }

    /// Ends a session (client closed, or the server gave up on it). Returns whether it existed.
    pub fn close_session(&mut self, session: SessionId) -> bool {
        let Some(backend) = self.sessions.remove(&session) else {
            return false;
        };
        if let Some(count) = self.apps.get_mut(&*backend.app) {
            *count -= 1;
            if *count == 0 {
                self.apps.remove(&*backend.app);
            }
        }
        self.pids.remove(&backend.pid);
        self.ended.push((session, backend.pid, backend.holder_lock));
        for channel in &backend.listening {
            if let Some(set) = self.listeners.get_mut(channel) {
                set.remove(&session);
            }
        }
        true
    }

    /// Server-side `pg_terminate_backend(pid)` by an administrator; returns the ended session.
    pub fn terminate_backend(&mut self, pid: i32) -> Option<SessionId> {
        let id = *self.pids.get(&pid)?;
        self.close_session(id);
        Some(id)
    }

    /// Sessions ended by [`DbOp::TerminateStale`] since the last call; their clients must be told.
    pub fn take_terminated(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.terminated)
    }

    /// Whether the session appears in `pg_stat_activity`.
    pub fn is_alive(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// The backend pid of a live session.
    pub fn pid(&self, session: SessionId) -> Option<i32> {
        self.sessions.get(&session).map(|b| b.pid)
    }

    /// The application name of a live session.
    pub fn app(&self, session: SessionId) -> Option<&str> {
        self.sessions.get(&session).map(|b| &*b.app)
    }

    /// Live sessions, in id order.
    pub fn sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    /// `LISTEN channel` on a session (one statement).
    pub fn listen(&mut self, session: SessionId, channel: &str) -> Result<(), DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        backend.listening.insert(channel.to_owned());
        self.listeners.entry(channel.to_owned()).or_default().insert(session);
        Ok(())
    }

    /// `UNLISTEN channel` on a session (one statement).
    pub fn unlisten(&mut self, session: SessionId, channel: &str) -> Result<(), DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        backend.listening.remove(channel);
        if let Some(set) = self.listeners.get_mut(channel) {
            set.remove(&session);
        }
        Ok(())
    }

    /// Live backends (the sessions a connection limit counts).
    pub fn backends(&self) -> usize {
        self.pids.len()
    }

    /// The backend of `session` stops waiting for `channel` (the `Lease` `UNLISTEN` batch): its
    /// waiter row goes, so that no release names it. A read-only server keeps it (the delete
    /// fails there, and the batch ignores that).
    pub fn forget_waiter(&mut self, session: SessionId, channel: &str) {
        if self.read_only {
            return;
        }
        let Some(pid) = self.sessions.get(&session).map(|s| s.pid) else {
            return;
        };
        if let Some(waiters) = self.waiters.get_mut(channel) {
            waiters.retain(|_, (p, _)| *p != pid);
            if waiters.is_empty() {
                self.waiters.remove(channel);
            }
        }
    }

    /// The schema bootstrap batch of `protocol` (one statement): creates the schema, its tables
    /// and functions if they are missing, else changes nothing. On a read-only server it succeeds
    /// only if there is nothing to create.
    pub fn bootstrap(
        &mut self,
        session: SessionId,
        protocol: Protocol,
        schema: &pgiplock_core::SchemaName,
    ) -> Result<(), DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        if self.schema_dropped {
            if self.read_only {
                return Err(DbError::server(
                    "25006",
                    format!("cannot execute CREATE SCHEMA {schema} in a read-only transaction"),
                ));
            }
            self.schema_dropped = false;
        }
        // The warm-up that follows a `Lease` bootstrap takes the session's holder advisory lock
        // (it works on a read-only server too).
        if protocol == Protocol::Lease {
            if let Some(backend) = self.sessions.get_mut(&session) {
                backend.holder_lock = true;
            }
        }
        Ok(())
    }

    /// Sessions ended since the last call: (session, pid, held its holder advisory lock).
    pub fn take_ended(&mut self) -> Vec<(SessionId, i32, bool)> {
        std::mem::take(&mut self.ended)
    }

    /// Whether sessions ended since the last [`take_ended`](SimDb::take_ended).
    pub fn has_ended(&self) -> bool {
        !self.ended.is_empty()
    }

    /// Whether the live session of backend `pid` holds its holder advisory lock.
    pub fn holds_holder_lock(&self, pid: i32) -> bool {
        self.pids
            .get(&pid)
            .and_then(|s| self.sessions.get(s))
            .is_some_and(|b| b.holder_lock)
    }

    /// `CALL await_holder(key, pid, max)` on `session` (one statement), as the io crate's
    /// procedure: `gone` at once if backend `pid` has no session, `unwatched` if its session
    /// holds no holder advisory lock (the server answers that after a bounded poll of 1 s, which
    /// the model leaves out), else the first look at its rows ([`await_step`](SimDb::await_step))
    /// with the wait ending at `end`.
    pub fn await_begin(&mut self, session: SessionId, pid: i32, end: Timestamp) -> Result<AwaitState, DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        if self.schema_dropped {
            return Err(DbError::server(
                "42883",
                "procedure await_holder(integer, integer, bigint) does not exist".to_owned(),
            ));
        }
        if !self.pids.contains_key(&pid) {
            return Ok(AwaitState::Done(AwaitOutcome::Gone));
        }
        if !self.holds_holder_lock(pid) {
            return Ok(AwaitState::Done(AwaitOutcome::Unwatched));
        }
        Ok(self.await_step(pid, end))
    }

    /// One turn of the wait's loop, as the procedure's: `gone` if the holder's session ended
    /// (its advisory lock went with it); `released` if backend `pid` holds no lease row
    /// (`holder IS NOT NULL`); `expired` once the earliest expiry of its rows passed; `timeout`
    /// at `end`; else it waits again until the earliest of those.
    pub fn await_step(&self, pid: i32, end: Timestamp) -> AwaitState {
        if !self.holds_holder_lock(pid) {
            return AwaitState::Done(AwaitOutcome::Gone);
        }
        let expiry = self
            .lease
            .values()
            .filter(|r| r.holder_pid == Some(pid) && r.holder.is_some())
            .filter_map(|r| r.expires_at)
            .min();
        let now = self.now;
        match expiry {
            None => AwaitState::Done(AwaitOutcome::Released),
            Some(at) if at <= now => AwaitState::Done(AwaitOutcome::Expired),
            Some(_) if now >= end => AwaitState::Done(AwaitOutcome::Timeout),
            Some(at) => AwaitState::Waiting { wake: at.min(end) },
        }
    }

    /// `DROP SCHEMA ... CASCADE` by an administrator: every lock row is gone (tokens start again
    /// from 1 after the next bootstrap), and lock operations that use the schema (all but a drain
    /// and Classic's stale-backend termination) fail with SQLSTATE 42P01 until then.
    pub fn drop_schema(&mut self) {
        self.schema_dropped = true;
        self.generation += 1;
        self.classic.clear();
        self.lease.clear();
        self.waiters.clear();
        self.balance_members.clear();
        self.balance_channels.clear();
    }

    /// Whether the lock schema is dropped (and not bootstrapped since).
    pub fn schema_dropped(&self) -> bool {
        self.schema_dropped
    }

    /// Schema drops so far; fencing tokens restart with each.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the server refuse writes (`default_transaction_read_only`, a demoted primary), or
    /// accept them again.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// `NOTIFY channel, payload` in its own transaction (one statement).
    pub fn notify(&mut self, session: SessionId, channel: &str, payload: &str) -> Result<(), DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        let pid = backend.pid;
        self.deliver(pid, channel, payload);
        Ok(())
    }

    /// Notifications delivered to `session` and not yet taken, in commit order.
    pub fn take_notifications(&mut self, session: SessionId) -> Vec<Notification> {
        self.sessions
            .get_mut(&session)
            .map(|b| b.inbox.drain(..).collect())
            .unwrap_or_default()
    }

    /// The oldest notification delivered to `session` and not yet taken.
    pub fn pop_notification(&mut self, session: SessionId) -> Option<Notification> {
        self.sessions.get_mut(&session)?.inbox.pop_front()
    }

    /// Sessions that received notifications since the last call, in the order of their first one.
    pub fn take_notified(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.notified)
    }

    /// Whether `session` has notifications waiting.
    pub fn has_notifications(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|b| !b.inbox.is_empty())
    }

    /// Statements executed so far, all sessions.
    pub fn statements(&self) -> u64 {
        self.statements
    }

    /// Statements executed so far by a live session.
    pub fn session_statements(&self, session: SessionId) -> u64 {
        self.sessions.get(&session).map_or(0, |b| b.statements)
    }

    /// The Lease row of a user channel.
    pub fn lease_row(&self, channel: &str) -> Option<&LeaseRow> {
        self.lease.get(channel)
    }

    /// The Classic row's owner (`app`) of a lock channel.
    pub fn classic_owner(&self, lock_channel: &str) -> Option<&str> {
        self.classic.get(lock_channel).map(String::as_str)
    }

    /// How many live sessions are the owner the channel's row names (S1: at most one).
    pub fn owner_sessions(&self, protocol: Protocol, channel: &ChannelName) -> usize {
        match protocol {
            Protocol::Classic => self
                .classic
                .get(channel.lock_channel())
                .map_or(0, |app| self.apps.get(app).copied().unwrap_or(0) as usize),
            Protocol::Lease => match self.lease.get(channel.as_str()) {
                Some(LeaseRow {
                    holder: Some(h),
                    holder_pid: Some(p),
                    ..
                }) => usize::from(self.session_of(*p, h).is_some()),
                _ => 0,
            },
        }
    }

    /// Runs one lock operation for `session` as one committed transaction at the server clock.
    pub fn execute(
        &mut self,
        session: SessionId,
        protocol: Protocol,
        channel: &ChannelName,
        ttl: Duration,
        op: &DbOp,
    ) -> Result<Reply, DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        let app = backend.app.clone();
        let pid = backend.pid;
        // A drain is a plain `NOTIFY`, and Classic terminates a stale backend with a plain
        // `pg_terminate_backend`: neither needs the schema.
        let needs_schema = !matches!(
            (protocol, op),
            (_, DbOp::Drain { .. } | DbOp::Drained { .. }) | (Protocol::Classic, DbOp::TerminateStale { .. })
        );
        if self.schema_dropped && needs_schema {
            let table = match protocol {
                Protocol::Classic => "lock",
                Protocol::Lease => "lease",
            };
            return Err(DbError::server(
                "42P01",
                format!("relation \"{}.{table}\" does not exist", protocol.default_schema()),
            ));
        }
        // Classic's ownership check is a plain SELECT, terminating a stale backend writes
        // nothing, and a drain is a `NOTIFY`, which a read-only transaction may send (as the
        // publisher's do); Lease's acquire function writes only when it takes the lock (checked
        // there); everything else writes.
        let writes = !matches!(
            (protocol, op),
            (
                _,
                DbOp::TerminateStale { .. } | DbOp::Drain { .. } | DbOp::Drained { .. }
            ) | (Protocol::Classic, DbOp::Renew { .. })
                | (Protocol::Lease, DbOp::Acquire)
        );
        if self.read_only && writes {
            return Err(DbError::server(
                "25006",
                format!("cannot execute {} in a read-only transaction", op.name()),
            ));
        }
        match protocol {
            Protocol::Classic => Ok(self.execute_classic(pid, &app, channel, op)),
            Protocol::Lease => self.execute_lease(pid, &app, channel, ttl, op),
        }
    }

    /// Runs the `Lease` operations of many locks of `session` as one statement and one committed
    /// transaction at the server clock, as `renew_many` and `acquire_many` do: every entry
    /// exactly as [`execute`](SimDb::execute) runs it alone, in the given order (every row
    /// sees the same `now()`), its notifications delivered at the commit in that order; one
    /// reply per entry. Each entry is `(channel, lease ttl, op)`; `op` must be `DbOp::Renew` or
    /// `DbOp::Acquire`.
    ///
    /// A failure fails the whole statement, with nothing written: the conditions that fail an
    /// entry (a dropped schema, a read-only server, a lost session) hold for the whole
    /// statement and fail its first entry that writes, or its first entry at all, before
    /// anything is written.
    pub fn execute_batch(
        &mut self,
        session: SessionId,
        entries: &[(ChannelName, Duration, DbOp)],
    ) -> Result<Vec<Reply>, DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        let app = backend.app.clone();
        let pid = backend.pid;
        if self.schema_dropped {
            return Err(DbError::server(
                "42P01",
                format!("relation \"{}.lease\" does not exist", Protocol::Lease.default_schema()),
            ));
        }
        if let Some((_, _, op)) = entries
            .iter()
            .find(|(_, _, op)| !matches!(op, DbOp::Renew { .. } | DbOp::Acquire))
        {
            return Err(DbError::Failed(format!("{} in a batch", op.name())));
        }
        let renews = entries.iter().any(|(_, _, op)| matches!(op, DbOp::Renew { .. }));
        if self.read_only && renews {
            return Err(DbError::server(
                "25006",
                "cannot execute UPDATE in a read-only transaction".to_owned(),
            ));
        }
        let mut replies = Vec::with_capacity(entries.len());
        for (channel, ttl, op) in entries {
            replies.push(self.execute_lease(pid, &app, channel, *ttl, op)?);
        }
        Ok(replies)
    }

    /// Fair share, as the io crate's `balance_v1` runs it (one statement, one transaction):
    /// records `session` as a member of `group` (or forgets it, `leave`) and `register` as the
    /// group's channels, forgets members whose session is gone, and returns the group's channel
    /// count and, per live member in bytewise application-name order, the channels of the group
    /// whose unexpired lease it holds under its own name and pid.
    pub fn balance(
        &mut self,
        session: SessionId,
        group: &str,
        register: &[ChannelName],
        leave: bool,
    ) -> Result<BalanceCounts, DbError> {
        let backend = self.sessions.get_mut(&session).ok_or(DbError::SessionLost)?;
        backend.statements += 1;
        self.statements += 1;
        let app = backend.app.to_string();
        let pid = backend.pid;
        if self.schema_dropped {
            return Err(DbError::server(
                "42P01",
                format!(
                    "relation \"{}.balance_member\" does not exist",
                    Protocol::Lease.default_schema()
                ),
            ));
        }
        if self.read_only {
            return Err(DbError::server(
                "25006",
                "cannot execute INSERT in a read-only transaction".to_owned(),
            ));
        }
        let members = self.balance_members.entry(group.to_owned()).or_default();
        if leave {
            members.remove(&app);
        } else {
            members.insert(app.clone(), pid);
            let channels = self.balance_channels.entry(group.to_owned()).or_default();
            for channel in register {
                channels.insert(channel.as_str().to_owned());
            }
        }
        let mut members = self.balance_members.remove(group).unwrap_or_default();
        members.retain(|member, pid| self.session_of(*pid, member).is_some());
        let channels = self.balance_channels.get(group);
        let now = self.now;
        let mut counts = BalanceCounts {
            channels: channels.map_or(0, |c| c.len() as u64),
            ..BalanceCounts::default()
        };
        // Per holder: the group's channels whose unexpired lease it holds; and the channels
        // nobody holds (no live holder with an unexpired lease), in channel order.
        let mut held: BTreeMap<(&str, i32), u64> = BTreeMap::new();
        for channel in channels.into_iter().flatten() {
            let mut taken = false;
            if let Some(LeaseRow {
                holder: Some(holder),
                holder_pid: Some(holder_pid),
                expires_at: Some(expires_at),
                ..
            }) = self.lease.get(channel)
            {
                if *expires_at > now {
                    *held.entry((holder.as_str(), *holder_pid)).or_default() += 1;
                    taken = self.session_of(*holder_pid, holder).is_some();
                }
            }
            if !taken && counts.free.len() < MAX_FREE_LISTED {
                counts.free.push(channel.clone());
            }
        }
        // BTreeMap<String, _> orders bytewise, as `ORDER BY app COLLATE "C"`.
        for (i, (member, member_pid)) in members.iter().enumerate() {
            counts
                .members
                .push(held.get(&(member.as_str(), *member_pid)).copied().unwrap_or(0));
            if *member == app {
                counts.own = Some(i);
            }
        }
        self.balance_members.insert(group.to_owned(), members);
        Ok(counts)
    }

    fn app_is_live(&self, app: &str) -> bool {
        self.apps.contains_key(app)
    }

    fn session_of(&self, pid: i32, app: &str) -> Option<SessionId> {
        let id = *self.pids.get(&pid)?;
        (&*self.sessions.get(&id)?.app == app).then_some(id)
    }

    fn execute_classic(&mut self, pid: i32, app: &str, channel: &ChannelName, op: &DbOp) -> Reply {
        let key = channel.lock_channel();
        match op {
            DbOp::Acquire => {
                let acquired = match self.classic.get(key) {
                    None => true,
                    Some(owner) if owner == app => true,
                    // deadlock_check: LOCKED while any session still has the owner's name.
                    Some(owner) => !self.app_is_live(owner),
                };
                if acquired {
                    match self.classic.get_mut(key) {
                        Some(owner) if owner == app => {}
                        Some(owner) => app.clone_into(owner),
                        None => {
                            self.classic.insert(key.to_owned(), app.to_owned());
                        }
                    }
                    Reply::Acquire(AcquireReply::won(None))
                } else {
                    Reply::Acquire(AcquireReply::locked())
                }
            }
            DbOp::Renew { .. } => Reply::Renew {
                owned: self.classic.get(key).is_some_and(|owner| owner == app),
            },
            DbOp::Drain { .. } => {
                // On the drain channel, which Node does not listen to.
                let marker = Marker::Draining(None);
                self.deliver(pid, marker.channel(Protocol::Classic, channel), &marker.payload());
                Reply::Drained
            }
            DbOp::Release { .. } => {
                let released = self.classic.get(key).is_some_and(|owner| owner == app);
                if released {
                    self.classic.remove(key);
                    // The deferred trigger fires at commit for the deleted row only.
                    self.deliver(pid, key, &Marker::Released(None).payload());
                }
                Reply::Release { released }
            }
            DbOp::TerminateStale {
                pid: target,
                app: target_app,
            } => Reply::Terminate(self.terminate_stale(*target, target_app)),
            _ => Reply::Drained,
        }
    }

    fn execute_lease(
        &mut self,
        pid: i32,
        app: &str,
        channel: &ChannelName,
        ttl: Duration,
        op: &DbOp,
    ) -> Result<Reply, DbError> {
        let key = channel.as_str();
        let lock_channel = channel.lock_channel();
        let now = self.now;
        match op {
            DbOp::Acquire => {
                let row = self.lease.get(key);
                let holder_live = |db: &SimDb, row: &LeaseRow| match (&row.holder, row.holder_pid) {
                    (Some(h), Some(p)) => db.session_of(p, h).is_some(),
                    _ => false,
                };
                // `Some(free_at)` when a holder other than us is not yet replaceable; a first
                // sighting of an older timeline's term is recorded (a write) on the way.
                let mut sighting = None;
                let (blocked_until, stale) = match row {
                    None => (None, None),
                    Some(r) if r.holder.is_none() => (None, None),
                    Some(r) if r.holder.as_deref() == Some(app) => (None, None),
                    Some(r) if r.expires_at.map_or(true, |e| e <= now) => {
                        let stale = match (&r.holder, r.holder_pid) {
                            (Some(h), Some(p)) if holder_live(self, r) => Some(StaleHolder { pid: p, app: h.clone() }),
                            _ => None,
                        };
                        (None, stale)
                    }
                    Some(r) if holder_live(self, r) => (r.expires_at, None),
                    Some(r) if self.older_timeline(r.token) => {
                        let seen_at = match r.seen {
                            Some((t, at)) if t == r.token => at,
                            _ => {
                                sighting = Some((r.token, now));
                                now
                            }
                        };
                        let expires = r.expires_at.unwrap_or(now);
                        let free_at = match self.old_timeline_takeover {
                            OldTimelineTakeover::Expiry => expires,
                            _ => expires.min(seen_at + ttl),
                        };
                        (Some(free_at).filter(|f| *f > now), None)
                    }
                    Some(_) => (None, None),
                };
                // Both a sighting and a takeover run the locked path (SELECT ... FOR UPDATE).
                if self.read_only && (sighting.is_some() || blocked_until.is_none()) {
                    return Err(DbError::server(
                        "25006",
                        "cannot execute UPDATE in a read-only transaction".to_owned(),
                    ));
                }
                if let (Some(seen), Some(r)) = (sighting, self.lease.get_mut(key)) {
                    r.seen = Some(seen);
                }
                if blocked_until.is_some() && !self.read_only {
                    // The refused standby records itself as a waiter (once per backend).
                    let waiters = self.waiters.entry(key.to_owned()).or_default();
                    if waiters.get(app).map(|(p, _)| *p) != Some(pid) {
                        waiters.insert(app.to_owned(), (pid, now));
                    }
                }
                let row = self.lease.get(key);
                if let Some(free_at) = blocked_until {
                    return Ok(Reply::Acquire(AcquireReply {
                        lease_remaining: Some(free_at.saturating_duration_since(now)),
                        holder_token: row.map(|r| FenceToken(r.token)),
                        holder_pid: row.and_then(|r| r.holder_pid),
                        ..AcquireReply::locked()
                    }));
                }
                // The term before ours, for the winner's replay (the row keeps its holder's pid
                // after a release).
                let previous = row.filter(|r| r.token > 0).map(|r| PreviousTerm {
                    token: FenceToken(r.token),
                    holder_pid: r.holder_pid,
                    released: r.holder.is_none(),
                });
                let token = self.next_token(row.map_or(0, |r| r.token));
                let new_row = LeaseRow {
                    holder: Some(app.to_owned()),
                    holder_pid: Some(pid),
                    token,
                    expires_at: Some(now + ttl),
                    // Kept, as the SQL keeps it: it names the old token, so it no longer counts.
                    seen: row.and_then(|r| r.seen),
                };
                match self.lease.get_mut(key) {
                    Some(row) => *row = new_row,
                    None => {
                        self.lease.insert(key.to_owned(), new_row);
                    }
                }
                if let Some(waiters) = self.waiters.get_mut(key) {
                    waiters.remove(app);
                }
                self.deliver(pid, lock_channel, &Marker::Acquired(FenceToken(token)).payload());
                Ok(Reply::Acquire(AcquireReply {
                    stale_holder: stale,
                    holder_pid: Some(pid),
                    previous,
                    ..AcquireReply::won(Some(FenceToken(token)))
                }))
            }
            DbOp::Renew { token, progress } => {
                let owned = match (self.lease.get_mut(key), token) {
                    (Some(row), Some(t)) if row.holder.as_deref() == Some(app) && row.token == t.0 => {
                        row.expires_at = Some(now + ttl);
                        row.seen = None;
                        true
                    }
                    _ => false,
                };
                if let (true, Some(token), Some(progress)) = (owned, token, progress) {
                    self.deliver(pid, lock_channel, &Marker::Progress(*token, *progress).payload());
                }
                Ok(Reply::Renew { owned })
            }
            DbOp::Drain { token } => {
                self.deliver(pid, lock_channel, &Marker::Draining(*token).payload());
                Ok(Reply::Drained)
            }
            DbOp::Drained { token } => {
                self.deliver(pid, lock_channel, &Marker::Drained(*token).payload());
                Ok(Reply::Drained)
            }
            DbOp::Release { token } => {
                let released = match (self.lease.get_mut(key), token) {
                    (Some(row), Some(t)) if row.holder.as_deref() == Some(app) && row.token == t.0 => {
                        // The pid stays: the next winner learns who sent this term's markers.
                        row.holder = None;
                        row.expires_at = None;
                        true
                    }
                    _ => false,
                };
                if let (true, Some(token)) = (released, token) {
                    let successor = self.successor(key, app);
                    self.deliver(pid, lock_channel, &Marker::release_payload(*token, successor));
                }
                Ok(Reply::Release { released })
            }
            DbOp::TerminateStale {
                pid: target,
                app: target_app,
            } => Ok(Reply::Terminate(self.terminate_stale(*target, target_app))),
            _ => Err(DbError::Failed(format!("unsupported operation {}", op.name()))),
        }
    }

    /// The successor a `Lease` release of `channel` by `app` names, as `release_v2` picks it:
    /// waiters whose session is gone are forgotten, then the one refused first (ties by
    /// application name, bytewise) other than `app`.
    fn successor(&mut self, channel: &str, app: &str) -> Option<i32> {
        let mut waiters = self.waiters.remove(channel)?;
        waiters.retain(|waiter, (pid, _)| self.session_of(*pid, waiter).is_some());
        let next = waiters
            .iter()
            .filter(|(waiter, _)| waiter.as_str() != app)
            .min_by(|(a, (_, at_a)), (b, (_, at_b))| at_a.cmp(at_b).then_with(|| a.as_bytes().cmp(b.as_bytes())))
            .map(|(_, (pid, _))| *pid);
        if !waiters.is_empty() {
            self.waiters.insert(channel.to_owned(), waiters);
        }
        next
    }

    fn terminate_stale(&mut self, pid: i32, app: &str) -> TerminateOutcome {
        let Some(id) = self.session_of(pid, app) else {
            return TerminateOutcome::Gone;
        };
        if !self.config.terminate_permitted {
            return TerminateOutcome::NotPermitted;
        }
        self.close_session(id);
        self.terminated.push(id);
        TerminateOutcome::Terminated
    }

    /// Commit-time delivery to every live session listening on `channel`, the sender included.
    fn deliver(&mut self, sender_pid: i32, channel: &str, payload: &str) {
        let Some(listeners) = self.listeners.get(channel) else {
            return;
        };
        for id in listeners {
            if let Some(backend) = self.sessions.get_mut(id) {
                if backend.inbox.is_empty() {
                    self.notified.push(*id);
                }
                backend.inbox.push_back(Notification {
                    channel: channel.to_owned(),
                    payload: payload.to_owned(),
                    sender_pid,
                });
            }
        }
    }
}
