//! A primary with one streaming replica, and its failovers: the replica applies the primary's
//! committed lock tables after a lag (asynchronous) or with every commit (synchronous, each
//! statement waiting `sync_commit_wait` more); at each failover the primary crashes (every
//! session ends), the virtual IP points at the replica, which answers read-only (a standby in
//! recovery) until it is promoted `promote_after` later, on the next timeline, with the tables it
//! had applied: the asynchronous tail is lost. Tokens carry the timeline in their high bits, as
//! the SQL issues them, so S4 (checked across the whole run, failovers included) holds; the
//! report measures each failover (the tail lost, the first token after, the time to a new holder,
//! the split brain until the next one).
//!
//! With `old_primary_up` the failover is a partition instead of a crash: the old primary stays
//! up for that long, and the holder's connection stays on it (an old client keeps talking to
//! it); everyone else's sessions end and reconnect to the address, which leads to the replica.
//! Under async the old primary confirms its holder's renewals, so two processes believe they
//! hold until it is stopped; under sync its commits wait for the lost synchronous standby, so
//! the old holder's renewals go unanswered and it fences itself.
//!
//! Off by default (`Replication::mode = none`): nothing here runs, and a run is byte-identical
//! to one of a build without it.

use std::collections::VecDeque;
use std::time::Duration;

use pgiplock_core::Timestamp;
use serde::{Deserialize, Serialize};

use crate::db::ReplicatedTables;
use crate::engine::Event;
use crate::net::{ClientMsg, Server, ServerMsg};
use crate::scenario::dur;
use crate::world::World;
use pgiplock_core::{DbOp, Protocol, SessionId, SessionOp};

/// How the primary replicates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// A lone server (the default): no replica, no failover.
    #[default]
    None,
    /// The replica applies each commit `lag` after it; a crash loses what it had not applied.
    Async,
    /// Every commit waits for the replica: nothing is lost, each statement takes longer.
    Sync,
}

impl ReplicationMode {
    /// `none`, `async` or `sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::None => "none",
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
        }
    }
}

impl std::fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReplicationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(ReplicationMode::None),
            "async" => Ok(ReplicationMode::Async),
            "sync" => Ok(ReplicationMode::Sync),
            other => Err(format!("unknown replication mode {other:?} (none, async or sync)")),
        }
    }
}

/// The server's replication and its failovers ([module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Replication {
    /// `none` (default), `async` or `sync`.
    pub mode: ReplicationMode,
    /// Async: how long after a commit the replica has applied it (default 1 s).
    #[serde(with = "dur")]
    pub lag: Duration,
    /// Sync: what each statement waits more for the replica's confirmation (default 1 ms).
    #[serde(with = "dur")]
    pub sync_commit_wait: Duration,
    /// When the primary crashes and the replica takes over, from the start (default: none).
    #[serde(with = "dur::many")]
    pub failovers: Vec<Duration>,
    /// From the crash to the promotion: meanwhile the address leads to the replica, which
    /// refuses writes (default 10 s; it refuses connections for the scenario's `server_down`
    /// first).
    #[serde(with = "dur")]
    pub promote_after: Duration,
    /// How far the old primary's clock ran ahead of the replica's (default 0): the replicated
    /// leases' expiries, written on the old clock, end this much later on the promoted server,
    /// which only the one-ttl cap of an older timeline's row bounds.
    #[serde(with = "dur")]
    pub clock_skew: Duration,
    /// A partition instead of a crash: the old primary stays up this long after each failover,
    /// its holder still connected to it (default: none, the primary crashes).
    #[serde(with = "dur::opt")]
    pub old_primary_up: Option<Duration>,
    /// Testing the checkers only: the promoted replica stays on the old timeline (tokens then
    /// go back when the tail was lost, which S4 must catch). Never read from or written to TOML.
    #[serde(skip)]
    pub no_timeline_bump: bool,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            mode: ReplicationMode::None,
            lag: Duration::from_secs(1),
            sync_commit_wait: Duration::from_millis(1),
            failovers: Vec::new(),
            promote_after: Duration::from_secs(10),
            clock_skew: Duration::ZERO,
            old_primary_up: None,
            no_timeline_bump: false,
        }
    }
}

impl Replication {
    /// Whether this is the lone server of the default.
    pub fn is_none(&self) -> bool {
        self.mode == ReplicationMode::None
    }

    /// What each statement waits for the replica.
    pub(crate) fn commit_wait(&self) -> Duration {
        match self.mode {
            ReplicationMode::Sync => self.sync_commit_wait,
            _ => Duration::ZERO,
        }
    }

    /// How long after a commit the replica has it.
    fn apply_lag(&self) -> Duration {
        match self.mode {
            ReplicationMode::Async => self.lag,
            _ => Duration::ZERO,
        }
    }

    /// The settings that are invalid together.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.is_none() && !self.failovers.is_empty() {
            return Err("failovers need a replica: set the replication mode to async or sync".to_owned());
        }
        if self.failovers.len() > 1000 {
            return Err("at most 1000 failovers".to_owned());
        }
        let day = Duration::from_secs(86_400);
        if self.lag > day || self.promote_after > day || self.clock_skew > day {
            return Err("replication lag, promote_after and clock_skew must be at most 1 d".to_owned());
        }
        Ok(())
    }
}

/// What one failover did, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverReport {
    /// When the primary crashed, seconds from the start.
    pub crash_s: f64,
    /// When the replica was promoted, seconds from the start.
    pub promoted_s: f64,
    /// The timeline the promoted server writes on.
    pub timeline: u64,
    /// The highest token acquired on the data channel before the crash.
    pub max_token_before: u64,
    /// The data channel's row token the replica had applied at the crash.
    pub replicated_token: u64,
    /// Acquisitions the crash lost (committed, never applied by the replica).
    pub lost_acquisitions: u64,
    /// When the lease of the data channel's row, as the replica had it, expires (a held row),
    /// seconds from the start: an older timeline's row is free then, or one ttl after the
    /// promoted server first sighted it, whichever is first.
    pub replicated_expiry_s: Option<f64>,
    /// The first token acquired on the data channel after the promotion.
    pub first_token_after: Option<u64>,
    /// From the promotion to a new holder of the data channel, seconds.
    pub new_holder_after_promote_s: Option<f64>,
    /// Time with two or more processes believing they hold the data channel, from this crash to
    /// the next one (or the end), seconds.
    pub split_brain_s: f64,
}

/// The replica's state and the failovers so far.
pub(crate) struct Replica {
    /// Commits the replica has not applied yet: when, and the tables after them.
    pending: VecDeque<(Timestamp, ReplicatedTables)>,
    /// What the replica has applied.
    applied: ReplicatedTables,
    /// The tables last queued (to queue only changes).
    last: ReplicatedTables,
    failovers: Vec<FailoverReport>,
    /// The open failover's split-brain counter at its crash.
    split_brain_at_crash_us: u64,
    /// The data channel's highest token at the crash (to see the first one after).
    token_at_crash: u64,
    /// Nobody has believed it holds the data channel at some moment since the crash (so the
    /// next believer is a new term, also under Classic, which has no tokens).
    vacant_since_crash: bool,
    /// When the open failover's replica is promoted.
    promote_at: Timestamp,
    /// Who believed it held the data channel at the crash.
    believers_at_crash: std::collections::BTreeSet<usize>,
    /// The old primary left up by a partition, with its holder's connection.
    old: Option<OldPrimary>,
}

/// An old primary that a partition left up: its server (database and connections) and the
/// holder whose connection stayed on it.
pub(crate) struct OldPrimary {
    server: Server,
    holder: usize,
    /// The failover that left it up.
    index: usize,
}

fn secs(t: Timestamp) -> f64 {
    (t.as_micros() as f64 / 1e3).round() / 1e3
}

impl World {
    /// Builds the replica and schedules the failovers, when the scenario has replication.
    pub(crate) fn replication_start(&mut self) {
        if self.scenario.replication.is_none() {
            return;
        }
        let tables = self.server.db.replicated_tables();
        self.replica = Some(Replica {
            pending: VecDeque::new(),
            applied: tables.clone(),
            last: tables,
            failovers: Vec::new(),
            split_brain_at_crash_us: 0,
            token_at_crash: 0,
            vacant_since_crash: false,
            promote_at: Timestamp::ZERO,
            believers_at_crash: std::collections::BTreeSet::new(),
            old: None,
        });
        for (index, at) in self.scenario.replication.failovers.clone().into_iter().enumerate() {
            self.engine.schedule(Timestamp::ZERO + at, Event::Failover { index });
        }
    }

    /// After every event: the primary's committed tables go to the replica, which applies what
    /// is older than the lag; the open failover learns its first token after the promotion.
    pub(crate) fn replicate(&mut self) {
        if self.replica.is_none() {
            return;
        }
        let now = self.engine.now;
        let lag = self.scenario.replication.apply_lag();
        let max_token = self.checkers.max_token_of(0);
        let split_brain = self.metrics.split_brain_us();
        let believers = &self.checkers.believers[0];
        let believed = !believers.is_empty();
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let newcomer = believers.iter().any(|p| !replica.believers_at_crash.contains(p));
        let tables = self.server.db.replicated_tables();
        if tables != replica.last {
            replica.last = tables.clone();
            replica.pending.push_back((now, tables));
        }
        while replica.pending.front().is_some_and(|(at, _)| *at + lag <= now) {
            if let Some((_, tables)) = replica.pending.pop_front() {
                replica.applied = tables;
            }
        }
        if let Some(open) = replica.failovers.last_mut() {
            replica.vacant_since_crash |= !believed;
            let new_term = max_token != replica.token_at_crash;
            if open.first_token_after.is_none() && new_term {
                open.first_token_after = Some(max_token);
            }
            let held_again = believed && (new_term || replica.vacant_since_crash || newcomer);
            if open.new_holder_after_promote_s.is_none() && now >= replica.promote_at && held_again {
                open.new_holder_after_promote_s = Some(round3(secs(now) - open.promoted_s));
            }
            open.split_brain_s = round3((split_brain - replica.split_brain_at_crash_us) as f64 / 1e6);
        }
    }

    /// The primary crashes: every session ends, the server is down for `server_down`, then
    /// answers read-only with the tables the replica had applied, until the promotion.
    pub(crate) fn failover(&mut self, index: usize) {
        let now = self.engine.now;
        self.replicate();
        let max_token = self.checkers.max_token_of(0);
        let split_brain = self.metrics.split_brain_us();
        let promote_at = now + self.scenario.replication.promote_after;
        let data_channel = self.channels[0].as_str().to_owned();
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let mut tables = replica.applied.clone();
        tables.shift_expiries(self.scenario.replication.clock_skew);
        let replicated_token = tables.lease_token(&data_channel);
        let replicated_expiry = tables
            .lease_row(&data_channel)
            .filter(|r| r.holder.is_some())
            .and_then(|r| r.expires_at)
            .map(secs);
        replica.pending.clear();
        replica.split_brain_at_crash_us = split_brain;
        replica.token_at_crash = max_token;
        replica.vacant_since_crash = false;
        replica.believers_at_crash = self.checkers.believers[0].clone();
        replica.promote_at = promote_at;
        replica.failovers.push(FailoverReport {
            crash_s: secs(now),
            promoted_s: secs(promote_at),
            timeline: 0,
            max_token_before: max_token,
            replicated_token,
            lost_acquisitions: max_token.saturating_sub(replicated_token),
            replicated_expiry_s: replicated_expiry,
            first_token_after: None,
            new_holder_after_promote_s: None,
            split_brain_s: 0.0,
        });
        self.trace.hash(&[400, index as u64]);
        self.trace.line(|| format!("  failover {index}: the primary crashes"));
        let holder = self.serving();
        if let (Some(up), Some((holder, _))) = (self.scenario.replication.old_primary_up, holder) {
            self.leave_old_primary_up(index, holder, up);
        }
        self.server_restart();
        self.server.db.restore_replicated_tables(tables);
        self.server.db.set_read_only(true);
        self.checkers.rows_replaced();
        self.checkers.last_disturbance = now;
        self.engine.schedule(promote_at, Event::Promote { index });
    }

    /// The replica is promoted: writable, on the next timeline.
    pub(crate) fn promote(&mut self, index: usize) {
        if !self.scenario.replication.no_timeline_bump {
            let next = self.server.db.timeline() + 1;
            self.server.db.set_timeline(next);
        }
        self.server.db.set_read_only(false);
        self.checkers.last_disturbance = self.engine.now;
        let timeline = self.server.db.timeline();
        if let Some(open) = self.replica.as_mut().and_then(|r| r.failovers.last_mut()) {
            open.timeline = timeline;
        }
        self.trace.hash(&[401, index as u64, timeline]);
        self.trace
            .line(|| format!("  failover {index}: the replica is promoted to timeline {timeline}"));
    }

    /// A partition: the old primary (a copy of the server as it stands) keeps the holder's
    /// connections; the server the address leads to forgets them without telling the holder.
    fn leave_old_primary_up(&mut self, index: usize, holder: usize, up: Duration) {
        // An old primary already left up by an earlier failover is stopped first.
        if let Some(earlier) = self.replica.as_ref().and_then(|r| r.old.as_ref()).map(|o| o.index) {
            self.old_primary_down(earlier);
        }
        let mut old = Server::new(self.seed, self.scenario.terminate_permitted);
        old.db = self.server.db.clone();
        old.publisher = None;
        let sessions: Vec<SessionId> = self
            .server
            .conns
            .iter()
            .filter(|(_, c)| c.p == holder)
            .map(|(s, _)| *s)
            .collect();
        for session in sessions {
            if let Some(conn) = self.server.conns.remove(&session) {
                old.conns.insert(session, conn);
            }
            self.server.db.close_session(session);
        }
        self.trace.hash(&[402, index as u64, holder as u64]);
        self.trace
            .line(|| format!("  failover {index}: the old primary stays up with p{holder}'s connection"));
        if let Some(replica) = self.replica.as_mut() {
            replica.old = Some(OldPrimary {
                server: old,
                holder,
                index,
            });
        }
        self.engine
            .schedule(self.engine.now + up, Event::OldPrimaryDown { index });
    }

    /// Whether `event` belongs to the old primary's connections.
    pub(crate) fn on_old_primary(&self, event: &Event) -> bool {
        let Some(old) = self.replica.as_ref().and_then(|r| r.old.as_ref()) else {
            return false;
        };
        let session = match event {
            Event::ToServer {
                msg: ClientMsg::Connect { .. },
                ..
            } => return false,
            Event::ToServer { session, .. }
            | Event::ServerCommit { session, .. }
            | Event::ToClient { session, .. }
            | Event::ServerClose { session }
            | Event::ServerDeadPeer { session, .. }
            | Event::ClientUserTimeout { session, .. }
            | Event::AwaitWake { session, .. } => session,
            _ => return false,
        };
        old.server.conns.contains_key(session)
    }

    /// Runs `event` against the old primary: the server is swapped for it meanwhile. Under sync
    /// replication a statement that writes waits for the lost synchronous standby, forever;
    /// reads (Classic's ownership check, `LISTEN`, a bootstrap with nothing to create) answer.
    pub(crate) fn handle_on_old_primary(&mut self, event: Event) {
        if let Event::ServerCommit { request, .. } = &event {
            if self.scenario.replication.mode == ReplicationMode::Sync && writes(&request.op) {
                return;
            }
        }
        self.swap_old_primary();
        self.checkers.on_old_primary = true;
        self.handle_event(event);
        self.checkers.on_old_primary = false;
        self.swap_old_primary();
    }

    fn swap_old_primary(&mut self) {
        if let Some(old) = self.replica.as_mut().and_then(|r| r.old.as_mut()) {
            std::mem::swap(&mut self.server, &mut old.server);
        }
    }

    /// The old primary that failover `index` left up is stopped (an operator, a failover
    /// manager): its sessions end.
    pub(crate) fn old_primary_down(&mut self, index: usize) {
        let current = self.replica.as_ref().and_then(|r| r.old.as_ref()).map(|o| o.index);
        if current != Some(index) {
            return;
        }
        self.trace.hash(&[403, index as u64]);
        self.swap_old_primary();
        let sessions: Vec<SessionId> = self.server.conns.keys().copied().collect();
        for session in sessions {
            self.server_send(session, ServerMsg::Ended);
            self.server.db.close_session(session);
        }
        self.server.conns.clear();
        self.swap_old_primary();
        let holder = self.replica.as_mut().and_then(|r| r.old.take()).map_or(0, |o| o.holder);
        self.trace
            .line(|| format!("  failover {index}: the old primary stops (p{holder} was on it)"));
        self.checkers.last_disturbance = self.engine.now;
    }

    /// The failovers so far (empty without replication).
    pub(crate) fn failover_reports(&self) -> Vec<FailoverReport> {
        self.replica.as_ref().map(|r| r.failovers.clone()).unwrap_or_default()
    }
}

/// Whether a statement writes (and so, on a primary with synchronous replication, waits for
/// the standby at commit). An attempt writes only when it takes the lock or records a sighting:
/// counted as writing, since the old primary's rows are its own timeline's and free rows are
/// what an attempt there would find worth taking.
fn writes(op: &SessionOp) -> bool {
    match op {
        SessionOp::Lock { target, op, .. } => !matches!(
            (target.protocol, op),
            (Protocol::Classic, DbOp::Renew { .. })
                | (_, DbOp::Drain { .. } | DbOp::Drained { .. })
                | (_, DbOp::TerminateStale { .. })
        ),
        SessionOp::RenewMany { .. } | SessionOp::AcquireMany { .. } => true,
        _ => false,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
