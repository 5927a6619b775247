//! Conformance of the simulator's database model (`pgiplock_sim::db::SimDb`) with the real SQL
//! (the library's, through `pgiplock_testkit::sql`) on a real PostgreSQL server.
//!
//! Random sequences of lock operations over a tiny key space (two channels, three sessions with
//! distinct application names, either protocol) are applied step by step to a fresh `SimDb` and
//! to real tokio-postgres sessions in a fresh schema. After every step both worlds must agree on
//! the reply (acquired, token, owned, released, the stale holder's identity, the terminate
//! outcome, the holder's session and token, the previous term with its holder's session and
//! whether it was released; `lease_remaining` only as present/absent), on the lock rows (holder,
//! holder session, token, whether the holder's session is alive) and on the notifications every
//! session received on the lock channels and the Classic drain channels, in order, each with the
//! session that sent it (the server's `process_id`, the model's sender pid), which is what
//! standbys judge markers by. Lease renewals carry progress markers. Under Lease a session also
//! renews or attempts on every channel in one statement (`renew_many`, `acquire_many`, as a
//! session with many locks batches them; the model's `execute_batch`), each channel's renewal
//! naming its own token, and both worlds must agree on every entry's reply.
//!
//! An administrator may drop the lock schema (`DROP SCHEMA ... CASCADE` on the server,
//! `drop_schema` in the model): lock operations then fail as schema missing (the server says
//! 42P01 for a table, 42883 for a function; both are compared as `DbError::is_schema_missing`)
//! until a session bootstraps it again, and what follows (tokens starting again from 1) is
//! compared as before. The server may turn read-only (every session's transactions `READ ONLY`;
//! the model's read-only mode): writes fail as `DbError::is_read_only`. Under Lease the server
//! may be promoted: the model moves to the next timeline and the real schema's `timeline()` is
//! redefined to return it (again after every bootstrap, so a bootstrap is not compared while
//! the server is read-only), so tokens carry the new timeline and rows of the older one are
//! taken over by their rule (at their expiry, but no later than one ttl after the first attempt
//! that saw them; the expiry bookkeeping below follows that sighting).
//!
//! Time: the model's server clock follows the real elapsed time (it is advanced to the moment
//! each real statement is sent). The real server computes an expiry somewhere between sending
//! and receiving the statement that set it, so an acquisition never runs within a guard
//! interval around that uncertain expiry: it waits (really, and the model by the same amount)
//! until the lease is certainly expired. Leases are short (60–200 ms) so that expiry is reached
//! by a real wait.
//!
//! Cases: env `PROPTEST_CASES` (default 24). Server: env `PGIPLOCK_TEST_DATABASE_URL`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use pgiplock::lock_status_on;
use pgiplock_core::{
    quote_ident, ChannelName, DbError, DbOp, FenceToken, Marker, Progress, Protocol, Reply, SchemaName, SessionId,
    Timestamp,
};
use pgiplock_sim::db::{AwaitState, DbConfig, SimDb};
use pgiplock_testkit::sql::{await_holder, bootstrap, execute, execute_batch, unlisten, BatchOp, BatchTarget, Target};
use pgiplock_tests::{connect, database_url, unique_hex, Listener, TestSchema};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use tokio::time::Instant;
use tokio_postgres::Client;

const SLOTS: usize = 3;
const CHANNELS: usize = 2;
/// Lease lengths drawn per case.
const TTLS_MS: [u64; 3] = [60, 120, 200];
/// Uncertainty allowed around a real expiry (statement latency, scheduling).
const GUARD: Duration = Duration::from_millis(30);
/// How many times the case's ttl an `AcquireLong` asks for.
const LONG: u32 = 10;
/// Bound on every wait for the server (a backend to exit, a sentinel to arrive).
const WAIT: Duration = Duration::from_secs(10);

/// Which token a Lease renew, drain or release names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// The token this session last acquired on the channel (1 if none).
    Mine,
    /// One below it: an old term.
    Older,
    /// One above it: a term that does not exist (yet).
    Newer,
    /// The row's current token, whoever holds it.
    Latest,
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Acquire {
        s: usize,
        c: usize,
    },
    /// Lease: an acquisition with a lease `LONG` times the case's ttl (a holder with a long
    /// ttl, or a server clock ahead), which the one-ttl cap of an older timeline's row cuts short.
    AcquireLong {
        s: usize,
        c: usize,
    },
    Renew {
        s: usize,
        c: usize,
        tok: Tok,
    },
    Drain {
        s: usize,
        c: usize,
        tok: Tok,
    },
    /// `drained:<token>` (Lease only; Classic never sends it).
    Drained {
        s: usize,
        c: usize,
        tok: Tok,
    },
    Release {
        s: usize,
        c: usize,
        tok: Tok,
    },
    /// `TerminateStale` of `target`'s backend; `wrong_app` names it with the caller's
    /// application name instead of its own (no such session).
    Terminate {
        s: usize,
        target: usize,
        wrong_app: bool,
    },
    /// The client closes the connection (session end).
    Close {
        s: usize,
    },
    /// A new connection with the slot's application name (after a close or termination).
    Reopen {
        s: usize,
    },
    /// Server time passes beyond the channel's lease expiry.
    Expire {
        c: usize,
    },
    /// An administrator drops the lock schema with everything in it.
    DropSchema,
    /// Slot `s` runs the schema bootstrap batch (as every session does when it connects).
    Bootstrap {
        s: usize,
    },
    /// The server refuses writes from now on (`on`), or accepts them again.
    ReadOnly {
        on: bool,
    },
    /// Lease: slot `s` renews every channel in one statement, channel `c` naming `toks[c]`.
    RenewMany {
        s: usize,
        toks: [Tok; CHANNELS],
    },
    /// Lease: slot `s` attempts every channel in one statement.
    AcquireMany {
        s: usize,
    },
    /// Lease: slot `s` runs the crash watch's wait on `target`'s backend with no time to wait
    /// (`max` 0): gone (a closed slot's old backend), unwatched, released, expired or timeout,
    /// as things stand.
    AwaitHolder {
        s: usize,
        target: usize,
    },
    /// Lease: the server moves to the next timeline, as a promoted replica does (faked on the
    /// real server by redefining the schema's `timeline()`): rows written before are of an
    /// older timeline from now on.
    Promote,
    /// Slot `s` stops listening for channel `c` as a session does when it removes the lock:
    /// the library's `UNLISTEN` batch, which under Lease also deletes the backend's waiter row,
    /// so that no later release names it.
    Unlisten {
        s: usize,
        c: usize,
    },
}

#[derive(Debug, Clone)]
struct Case {
    protocol: Protocol,
    ttl: Duration,
    steps: Vec<Step>,
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        4 => Just(Tok::Mine),
        2 => Just(Tok::Older),
        1 => Just(Tok::Newer),
        1 => Just(Tok::Latest),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let s = 0..SLOTS;
    let c = 0..CHANNELS;
    prop_oneof![
        6 => (s.clone(), c.clone()).prop_map(|(s, c)| Step::Acquire { s, c }),
        2 => (s.clone(), c.clone()).prop_map(|(s, c)| Step::AcquireLong { s, c }),
        3 => (s.clone(), c.clone(), tok()).prop_map(|(s, c, tok)| Step::Renew { s, c, tok }),
        1 => (s.clone(), c.clone(), tok()).prop_map(|(s, c, tok)| Step::Drain { s, c, tok }),
        1 => (s.clone(), c.clone(), tok()).prop_map(|(s, c, tok)| Step::Drained { s, c, tok }),
        3 => (s.clone(), c.clone(), tok()).prop_map(|(s, c, tok)| Step::Release { s, c, tok }),
        2 => (s.clone(), s.clone(), proptest::bool::weighted(0.2))
            .prop_map(|(s, target, wrong_app)| Step::Terminate { s, target, wrong_app }),
        1 => s.clone().prop_map(|s| Step::Close { s }),
        3 => s.clone().prop_map(|s| Step::Reopen { s }),
        2 => c.clone().prop_map(|c| Step::Expire { c }),
        1 => Just(Step::DropSchema),
        2 => s.clone().prop_map(|s| Step::Bootstrap { s }),
        1 => proptest::bool::ANY.prop_map(|on| Step::ReadOnly { on }),
        3 => (s.clone(), tok(), tok()).prop_map(|(s, a, b)| Step::RenewMany { s, toks: [a, b] }),
        3 => s.clone().prop_map(|s| Step::AcquireMany { s }),
        2 => (s.clone(), s.clone()).prop_map(|(s, target)| Step::AwaitHolder { s, target }),
        2 => Just(Step::Promote),
        1 => (s.clone(), c.clone()).prop_map(|(s, c)| Step::Unlisten { s, c }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(Protocol::Classic), Just(Protocol::Lease)],
        0..TTLS_MS.len(),
        proptest::collection::vec(step(), 4..36),
    )
        .prop_map(|(protocol, ttl, steps)| Case {
            protocol,
            ttl: Duration::from_millis(TTLS_MS[ttl]),
            steps,
        })
}

/// A session's identity across both worlds: slot and connection generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Who {
    slot: usize,
    generation: u32,
}

/// A reply with pids mapped to [`Who`] and the remaining lease reduced to present/absent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Acquire {
        acquired: bool,
        token: Option<FenceToken>,
        remaining: bool,
        stale: Option<(Option<Who>, String)>,
        /// The holder's backend: ours when acquired, the current holder's when refused.
        holder: Option<Who>,
        holder_token: Option<FenceToken>,
        /// The previous term when acquired: token, its holder's backend, released.
        previous: Option<(FenceToken, Option<Who>, bool)>,
    },
    Renew {
        owned: bool,
    },
    Drained,
    Release {
        released: bool,
    },
    Terminate(pgiplock_core::TerminateOutcome),
    /// A batched statement's replies, one per channel in order.
    Batch(Vec<Outcome>),
    Error(String),
    /// The crash watch's wait answered this.
    Await(&'static str),
    /// A step that is not an operation (session end, reconnection, waiting) was done.
    Done(&'static str),
    /// The step did not apply (its session is closed, or nothing to do).
    Skipped,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The channels that carry a lock's markers: the lock channel and (Classic) the drain channel.
fn marker_channels(c: &ChannelName) -> [&str; 2] {
    [c.lock_channel(), c.drain_channel()]
}

fn error_kind(e: &DbError) -> String {
    match e {
        DbError::SessionLost => "session lost".to_owned(),
        DbError::PermissionDenied(_) => "permission denied".to_owned(),
        e if e.is_schema_missing() => "schema missing".to_owned(),
        e if e.is_read_only() => "read only".to_owned(),
        other => format!("failed: {other}"),
    }
}

fn outcome(
    result: Result<Reply, DbError>,
    who_of: impl Fn(i32, &str) -> Option<Who>,
    who_of_pid: impl Fn(i32) -> Option<Who>,
) -> Outcome {
    match result {
        Ok(Reply::Acquire(r)) => Outcome::Acquire {
            acquired: r.acquired,
            token: r.token,
            remaining: r.lease_remaining.is_some(),
            stale: r.stale_holder.map(|h| (who_of(h.pid, &h.app), h.app)),
            holder: r.holder_pid.and_then(&who_of_pid),
            holder_token: r.holder_token,
            previous: r
                .previous
                .map(|p| (p.token, p.holder_pid.and_then(&who_of_pid), p.released)),
        },
        Ok(Reply::Renew { owned }) => Outcome::Renew { owned },
        Ok(Reply::Drained) => Outcome::Drained,
        Ok(Reply::Release { released }) => Outcome::Release { released },
        Ok(Reply::Terminate(t)) => Outcome::Terminate(t),
        Ok(other) => Outcome::Error(format!("unexpected reply {other:?}")),
        Err(e) => Outcome::Error(error_kind(&e)),
    }
}

/// The session that had backend `pid` (the newest, should the OS have reused a pid).
fn who_of_pid(pids: &BTreeMap<(i32, String), Who>, pid: i32) -> Option<Who> {
    pids.iter().filter(|((p, _), _)| *p == pid).map(|(_, who)| *who).max()
}

/// A release marker's named successor (a backend pid, different in each world) as the session
/// it names: `released:<t>:<slot>.<generation>`; any other payload as it is.
fn named_by_who(pids: &BTreeMap<(i32, String), Who>, payload: String) -> String {
    match (Marker::successor(&payload), Marker::parse(&payload)) {
        (Some(pid), Some(Marker::Released(Some(token)))) => match who_of_pid(pids, pid) {
            Some(who) => format!("released:{token}:{}.{}", who.slot, who.generation),
            None => format!("released:{token}:unknown"),
        },
        _ => payload,
    }
}

/// A notification as both worlds compare it: channel, payload, and the sending session.
type Heard = (String, String, Option<Who>);

/// One slot in the real world.
struct RealSlot {
    listener: Option<Listener>,
    pid: i32,
    generation: u32,
}

/// One slot in the model.
struct SimSlot {
    session: Option<SessionId>,
    pid: i32,
}

/// Both worlds of one case.
struct Worlds {
    protocol: Protocol,
    ttl: Duration,
    url: String,
    schema: SchemaName,
    channels: Vec<ChannelName>,
    apps: Vec<String>,
    /// Per slot: a private channel for sentinels (see `Listener::drain_until_sentinel`).
    sentinels: Vec<String>,
    observer: Client,
    real: Vec<RealSlot>,
    real_pids: BTreeMap<(i32, String), Who>,
    db: SimDb,
    sim: Vec<SimSlot>,
    sim_pids: BTreeMap<(i32, String), Who>,
    start: Instant,
    /// Per channel: the interval of elapsed time within which the real lease expires.
    expiry: Vec<Option<(Duration, Duration)>>,
    /// Per slot and channel: the token it last acquired.
    tokens: Vec<Vec<Option<u64>>>,
    /// The server refuses writes (every real session is set read-only, new ones too).
    read_only: bool,
    /// Renewals sent so far: numbers their progress markers.
    renewals: u64,
    /// After a `Promote`: the timeline the real schema's `timeline()` is redefined to return.
    promoted: Option<u64>,
    /// First sightings of an older timeline's term so far (for the tally).
    sightings: u64,
    log: Vec<String>,
}

impl Worlds {
    async fn new(case: &Case, schema: &TestSchema) -> Result<Worlds, String> {
        let url = database_url();
        let hex = unique_hex();
        let channels = (0..CHANNELS)
            .map(|c| ChannelName::new(&format!("cf{hex}{c}")).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let schema_name = SchemaName::new(schema.name()).map_err(|e| e.to_string())?;
        let observer = connect(&url).await;
        bootstrap(&observer, case.protocol, &schema_name)
            .await
            .map_err(|e| format!("bootstrap: {e}"))?;
        let mut worlds = Worlds {
            protocol: case.protocol,
            ttl: case.ttl,
            url,
            schema: schema_name,
            channels,
            apps: (0..SLOTS).map(|s| format!("cf{hex}_{s}")).collect(),
            sentinels: (0..SLOTS).map(|s| format!("cf{hex}_sentinel{s}")).collect(),
            observer,
            real: Vec::new(),
            real_pids: BTreeMap::new(),
            db: SimDb::new(DbConfig::default()),
            renewals: 1,
            sim: Vec::new(),
            sim_pids: BTreeMap::new(),
            start: Instant::now(),
            expiry: vec![None; CHANNELS],
            tokens: vec![vec![None; CHANNELS]; SLOTS],
            read_only: false,
            promoted: None,
            sightings: 0,
            log: Vec::new(),
        };
        if case.protocol == Protocol::Lease {
            let sql = format!("SELECT {}.timeline()", quote_ident(worlds.schema.as_str()));
            let row = worlds
                .observer
                .query_one(&sql, &[])
                .await
                .map_err(|e| format!("timeline: {e}"))?;
            let timeline: i64 = row.get(0);
            worlds
                .db
                .set_timeline(u64::try_from(timeline).map_err(|e| e.to_string())?);
        }
        for s in 0..SLOTS {
            worlds.real.push(RealSlot {
                listener: None,
                pid: 0,
                generation: 0,
            });
            worlds.sim.push(SimSlot { session: None, pid: 0 });
            worlds.open(s).await?;
        }
        Ok(worlds)
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn sim_clock(&mut self, at: Duration) {
        self.db.advance_to(Timestamp::from_micros(
            u64::try_from(at.as_micros()).unwrap_or(u64::MAX),
        ));
    }

    fn is_open(&self, s: usize) -> bool {
        self.sim[s].session.is_some()
    }

    /// Opens slot `s` in both worlds: a connection named by the slot's application name that
    /// listens on both lock channels (and its sentinel channel).
    async fn open(&mut self, s: usize) -> Result<(), String> {
        let app = self.apps[s].clone();
        let sep = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}application_name={app}", self.url);
        let mut listen: Vec<&str> = self.channels.iter().flat_map(marker_channels).collect();
        listen.push(&self.sentinels[s]);
        let listener = Listener::connect(&url, &listen).await;
        let row = listener
            .client()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| format!("pg_backend_pid: {e}"))?;
        let pid: i32 = row.get(0);
        if self.read_only {
            set_read_only(listener.client(), true).await?;
        }
        let generation = self.real[s].generation + 1;
        self.real[s] = RealSlot {
            listener: Some(listener),
            pid,
            generation,
        };
        self.real_pids.insert((pid, app.clone()), Who { slot: s, generation });

        let (session, sim_pid) = self.db.open_session(&app);
        for c in self.channels.iter().flat_map(marker_channels) {
            self.db.listen(session, c).map_err(|e| format!("sim listen: {e}"))?;
        }
        self.sim[s] = SimSlot {
            session: Some(session),
            pid: sim_pid,
        };
        self.sim_pids.insert((sim_pid, app), Who { slot: s, generation });
        Ok(())
    }

    /// Waits until backend `pid` is gone from `pg_stat_activity` (the server ends a closed or
    /// terminated backend asynchronously; the model at once).
    async fn wait_backend_gone(&self, pid: i32) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let row = self
                .observer
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .map_err(|e| format!("pg_stat_activity: {e}"))?;
            if row.get::<_, i64>(0) == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("backend {pid} still in pg_stat_activity after {WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Ends slot `s` in the real world (drops its connection) and waits for its backend to go.
    async fn end_real(&mut self, s: usize) -> Result<(), String> {
        drop(self.real[s].listener.take());
        self.wait_backend_gone(self.real[s].pid).await
    }

    fn token(&self, s: usize, c: usize, tok: Tok) -> Option<FenceToken> {
        if self.protocol == Protocol::Classic {
            return None;
        }
        let mine = self.tokens[s][c].unwrap_or(1);
        Some(FenceToken(match tok {
            Tok::Mine => mine,
            Tok::Older => mine.saturating_sub(1),
            Tok::Newer => mine + 1,
            Tok::Latest => self.db.lease_row(self.channels[c].as_str()).map_or(0, |r| r.token),
        }))
    }

    /// Runs `real_op` and `sim_op` (the same operation; only pids differ between the worlds)
    /// for slot `s` on channel `c`; returns the elapsed time before and after the real statement
    /// and both outcomes.
    async fn exec(
        &mut self,
        s: usize,
        c: usize,
        real_op: &DbOp,
        sim_op: &DbOp,
    ) -> Result<(Duration, Duration, Outcome, Outcome), String> {
        let target = Target {
            protocol: self.protocol,
            schema: self.schema.clone(),
            channel: self.channels[c].clone(),
            app: self.apps[s].clone(),
            lease_ttl: self.ttl,
        };
        let listener = self.real[s].listener.as_ref().ok_or("real slot closed")?;
        let before = self.elapsed();
        let real = execute(listener.client(), &target, real_op).await;
        let after = self.elapsed();
        let real = outcome(
            real,
            |pid, app| self.real_pids.get(&(pid, app.to_owned())).copied(),
            |pid| who_of_pid(&self.real_pids, pid),
        );

        self.sim_clock(before);
        let session = self.sim[s].session.ok_or("sim slot closed")?;
        // The real server read its clock somewhere between `before` and `after`. Acquisitions
        // normally keep clear of expiries (see `settle_expiry`), but a statement delayed on a
        // busy machine may still cross one: then the model at `after` is an equally valid
        // reading, and is taken when it is the one that agrees.
        let timing_sensitive = self.protocol == Protocol::Lease && *sim_op == DbOp::Acquire;
        let snapshot = timing_sensitive.then(|| self.db.clone());
        let sim = self
            .db
            .execute(session, self.protocol, &self.channels[c], self.ttl, sim_op);
        let mut sim = outcome(
            sim,
            |pid, app| self.sim_pids.get(&(pid, app.to_owned())).copied(),
            |pid| who_of_pid(&self.sim_pids, pid),
        );
        if let (Some(mut late), true) = (snapshot, sim != real) {
            late.advance_to(Timestamp::from_micros(
                u64::try_from(after.as_micros()).unwrap_or(u64::MAX),
            ));
            let alt = late.execute(session, self.protocol, &self.channels[c], self.ttl, sim_op);
            let alt = outcome(
                alt,
                |pid, app| self.sim_pids.get(&(pid, app.to_owned())).copied(),
                |pid| who_of_pid(&self.sim_pids, pid),
            );
            if alt == real {
                self.log.push(format!(
                    "     (the server read its clock late: model evaluated at {after:?} instead of {before:?})"
                ));
                self.db = late;
                sim = alt;
            }
        }
        Ok((before, after, real, sim))
    }

    /// Runs `op` (per channel, in channel order) for slot `s` on every channel as one statement
    /// in both worlds, as `exec` runs one; returns the elapsed time before and after the real
    /// statement and both outcomes.
    async fn exec_batch(
        &mut self,
        s: usize,
        kind: BatchOp,
        ops: &[DbOp],
    ) -> Result<(Duration, Duration, Outcome, Outcome), String> {
        let targets: Vec<BatchTarget> = ops
            .iter()
            .enumerate()
            .map(|(c, op)| BatchTarget {
                channel: self.channels[c].clone(),
                lease_ttl: self.ttl,
                op: op.clone(),
            })
            .collect();
        let listener = self.real[s].listener.as_ref().ok_or("real slot closed")?;
        let before = self.elapsed();
        let real = execute_batch(listener.client(), &self.schema, &self.apps[s], kind, &targets).await;
        let after = self.elapsed();
        let batch = |result: Result<Vec<Reply>, DbError>, pids: &BTreeMap<(i32, String), Who>| match result {
            Ok(replies) => Outcome::Batch(
                replies
                    .into_iter()
                    .map(|r| {
                        outcome(
                            Ok(r),
                            |pid, app| pids.get(&(pid, app.to_owned())).copied(),
                            |pid| who_of_pid(pids, pid),
                        )
                    })
                    .collect(),
            ),
            Err(e) => Outcome::Error(error_kind(&e)),
        };
        let real = batch(real, &self.real_pids);
        self.sim_clock(before);
        let session = self.sim[s].session.ok_or("sim slot closed")?;
        let entries: Vec<(ChannelName, Duration, DbOp)> = ops
            .iter()
            .enumerate()
            .map(|(c, op)| (self.channels[c].clone(), self.ttl, op.clone()))
            .collect();
        // As in `exec`: attempts may cross an expiry on a busy machine.
        let snapshot = (kind == BatchOp::Acquire).then(|| self.db.clone());
        let mut sim = batch(self.db.execute_batch(session, &entries), &self.sim_pids);
        if let (Some(mut late), true) = (snapshot, sim != real) {
            late.advance_to(Timestamp::from_micros(
                u64::try_from(after.as_micros()).unwrap_or(u64::MAX),
            ));
            let alt = batch(late.execute_batch(session, &entries), &self.sim_pids);
            if alt == real {
                self.log.push(format!(
                    "     (the server read its clock late: model evaluated at {after:?} instead of {before:?})"
                ));
                self.db = late;
                sim = alt;
            }
        }
        Ok((before, after, real, sim))
    }

    /// Runs a batch for slot `s` in both worlds and keeps the expiry bookkeeping per channel.
    async fn batch(&mut self, s: usize, kind: BatchOp, ops: &[DbOp]) -> Result<(Outcome, Outcome), String> {
        let seen = self.sightings();
        let (before, after, real, sim) = self.exec_batch(s, kind, ops).await?;
        self.note_sightings(&seen, before, after);
        if let Outcome::Batch(entries) = &sim {
            for (c, entry) in entries.iter().enumerate() {
                match entry {
                    Outcome::Acquire {
                        acquired: true, token, ..
                    } => {
                        self.expiry[c] = Some((before + self.ttl, after + self.ttl));
                        self.tokens[s][c] = token.map(|t| t.0);
                    }
                    Outcome::Renew { owned: true } => self.expiry[c] = Some((before + self.ttl, after + self.ttl)),
                    _ => {}
                }
            }
        }
        Ok((real, sim))
    }

    /// Runs `op` for slot `s` on channel `c` in both worlds; returns `(real, sim)`.
    async fn op(&mut self, s: usize, c: usize, op: DbOp) -> Result<(Outcome, Outcome), String> {
        let seen = self.sightings();
        let (before, after, real, sim) = self.exec(s, c, &op, &op).await?;
        self.note_sightings(&seen, before, after);
        // Where the real server put the lease's expiry, as far as we can tell from here.
        if self.protocol == Protocol::Lease {
            match &sim {
                Outcome::Acquire {
                    acquired: true, token, ..
                } => {
                    self.expiry[c] = Some((before + self.ttl, after + self.ttl));
                    self.tokens[s][c] = token.map(|t| t.0);
                }
                Outcome::Renew { owned: true } => self.expiry[c] = Some((before + self.ttl, after + self.ttl)),
                Outcome::Release { released: true } => self.expiry[c] = None,
                _ => {}
            }
        }
        Ok((real, sim))
    }

    /// Per channel, the model's sighting of an older timeline's term.
    fn sightings(&self) -> Vec<Option<(u64, Timestamp)>> {
        self.channels
            .iter()
            .map(|c| self.db.lease_row(c.as_str()).and_then(|r| r.seen))
            .collect()
    }

    /// A statement between `before` and `after` recorded a first sighting of an older
    /// timeline's term: the row is free one ttl after it, if not earlier.
    fn note_sightings(&mut self, seen_before: &[Option<(u64, Timestamp)>], before: Duration, after: Duration) {
        for (c, seen) in self.sightings().into_iter().enumerate() {
            if seen.is_some() && seen != seen_before[c] {
                self.sightings += 1;
                if let Some((lo, hi)) = self.expiry[c] {
                    self.expiry[c] = Some((lo.min(before + self.ttl), hi.min(after + self.ttl)));
                }
            }
        }
    }

    /// Waits, in both worlds, until the lease of `c` has certainly expired.
    async fn pass_expiry(&mut self, c: usize) {
        let held = self
            .db
            .lease_row(self.channels[c].as_str())
            .is_some_and(|r| r.holder.is_some());
        if let (true, Some((_, hi))) = (held, self.expiry[c]) {
            tokio::time::sleep_until(self.start + hi + GUARD).await;
        }
    }

    /// Before an acquisition: never decide within the uncertain interval around an expiry.
    async fn settle_expiry(&mut self, c: usize) {
        let held = self
            .db
            .lease_row(self.channels[c].as_str())
            .is_some_and(|r| r.holder.is_some());
        if let (true, Some((lo, hi))) = (held, self.expiry[c]) {
            let now = self.elapsed();
            if now + GUARD >= lo && now <= hi + GUARD {
                tokio::time::sleep_until(self.start + hi + GUARD).await;
            }
        }
    }

    async fn step(&mut self, step: &Step) -> Result<(Outcome, Outcome), String> {
        let skipped = Ok((Outcome::Skipped, Outcome::Skipped));
        match *step {
            Step::Acquire { s, c } => {
                if !self.is_open(s) {
                    return skipped;
                }
                if self.protocol == Protocol::Lease {
                    self.settle_expiry(c).await;
                }
                self.op(s, c, DbOp::Acquire).await
            }
            Step::AcquireLong { s, c } => {
                if !self.is_open(s) || self.protocol != Protocol::Lease {
                    return skipped;
                }
                self.settle_expiry(c).await;
                let ttl = self.ttl;
                self.ttl = ttl * LONG;
                let result = self.op(s, c, DbOp::Acquire).await;
                self.ttl = ttl;
                result
            }
            Step::Renew { s, c, tok } => {
                if !self.is_open(s) {
                    return skipped;
                }
                let token = self.token(s, c, tok);
                // Under Lease a renewal carries a progress marker, committed with it.
                let progress = (self.protocol == Protocol::Lease).then_some(Progress {
                    seq: self.renewals,
                    ack: self.renewals.checked_sub(1),
                });
                self.renewals += 1;
                self.op(s, c, DbOp::Renew { token, progress }).await
            }
            Step::Drain { s, c, tok } => {
                if !self.is_open(s) {
                    return skipped;
                }
                let token = self.token(s, c, tok);
                self.op(s, c, DbOp::Drain { token }).await
            }
            Step::Drained { s, c, tok } => {
                let Some(token) = self.token(s, c, tok).filter(|_| self.is_open(s)) else {
                    return skipped;
                };
                self.op(s, c, DbOp::Drained { token }).await
            }
            Step::Release { s, c, tok } => {
                if !self.is_open(s) {
                    return skipped;
                }
                let token = self.token(s, c, tok);
                self.op(s, c, DbOp::Release { token }).await
            }
            Step::Terminate { s, target, wrong_app } => {
                // A session terminating itself would lose its own reply.
                if !self.is_open(s) || s == target {
                    return skipped;
                }
                let app = if wrong_app {
                    self.apps[s].clone()
                } else {
                    self.apps[target].clone()
                };
                let real_op = DbOp::TerminateStale {
                    pid: self.real[target].pid,
                    app: app.clone(),
                };
                let sim_op = DbOp::TerminateStale {
                    pid: self.sim[target].pid,
                    app,
                };
                let (_, _, real, sim) = self.exec(s, 0, &real_op, &sim_op).await?;
                if matches!(real, Outcome::Terminate(pgiplock_core::TerminateOutcome::Terminated)) {
                    self.end_real(target).await?;
                }
                if matches!(sim, Outcome::Terminate(pgiplock_core::TerminateOutcome::Terminated)) {
                    self.db.take_terminated();
                    self.sim[target].session = None;
                }
                Ok((real, sim))
            }
            Step::Close { s } => {
                if !self.is_open(s) {
                    return skipped;
                }
                self.end_real(s).await?;
                if let Some(session) = self.sim[s].session.take() {
                    self.db.close_session(session);
                }
                Ok((Outcome::Done("closed"), Outcome::Done("closed")))
            }
            Step::Reopen { s } => {
                if self.is_open(s) || self.real[s].listener.is_some() {
                    return skipped;
                }
                self.open(s).await?;
                Ok((Outcome::Done("reopened"), Outcome::Done("reopened")))
            }
            Step::Expire { c } => {
                if self.protocol == Protocol::Classic {
                    return skipped;
                }
                self.pass_expiry(c).await;
                Ok((Outcome::Done("time passed"), Outcome::Done("time passed")))
            }
            Step::DropSchema => {
                // Only the schema this case created (its guard drops it again at the end).
                let sql = format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                    self.schema.as_str().replace('"', "\"\"")
                );
                self.observer
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| format!("drop schema: {e}"))?;
                self.db.drop_schema();
                // The tokens start again with the new tables; no lease is left to expire.
                self.expiry = vec![None; CHANNELS];
                self.tokens = vec![vec![None; CHANNELS]; SLOTS];
                Ok((Outcome::Done("schema dropped"), Outcome::Done("schema dropped")))
            }
            Step::Bootstrap { s } => {
                // A bootstrap puts the real `timeline()` back, which a read-only server refuses.
                if !self.is_open(s) || (self.promoted.is_some() && self.read_only) {
                    return skipped;
                }
                let listener = self.real[s].listener.as_ref().ok_or("real slot closed")?;
                let real = bootstrap(listener.client(), self.protocol, &self.schema).await;
                if real.is_ok() {
                    self.fake_timeline().await?;
                }
                let session = self.sim[s].session.ok_or("sim slot closed")?;
                let sim = self.db.bootstrap(session, self.protocol, &self.schema);
                let done = |r: Result<(), DbError>| match r {
                    Ok(()) => Outcome::Done("bootstrapped"),
                    Err(e) => Outcome::Error(error_kind(&e)),
                };
                Ok((done(real), done(sim)))
            }
            Step::RenewMany { s, toks } => {
                if !self.is_open(s) || self.protocol != Protocol::Lease {
                    return skipped;
                }
                let mut ops = Vec::new();
                for (c, tok) in toks.iter().enumerate() {
                    let token = self.token(s, c, *tok);
                    let progress = Some(Progress {
                        seq: self.renewals,
                        ack: self.renewals.checked_sub(1),
                    });
                    self.renewals += 1;
                    ops.push(DbOp::Renew { token, progress });
                }
                self.batch(s, BatchOp::Renew, &ops).await
            }
            Step::AcquireMany { s } => {
                if !self.is_open(s) || self.protocol != Protocol::Lease {
                    return skipped;
                }
                for c in 0..CHANNELS {
                    self.settle_expiry(c).await;
                }
                self.batch(s, BatchOp::Acquire, &[DbOp::Acquire, DbOp::Acquire]).await
            }
            Step::AwaitHolder { s, target } => {
                if !self.is_open(s) || self.protocol != Protocol::Lease {
                    return skipped;
                }
                // Away from every lease's expiry, so that both worlds see it on the same side.
                for c in 0..CHANNELS {
                    self.settle_expiry(c).await;
                }
                let answer = |r: Result<pgiplock_core::AwaitOutcome, DbError>| match r {
                    Ok(outcome) => Outcome::Await(outcome.as_str()),
                    Err(e) => Outcome::Error(error_kind(&e)),
                };
                let listener = self.real[s].listener.as_ref().ok_or("real slot closed")?;
                let real = await_holder(listener.client(), &self.schema, self.real[target].pid, Duration::ZERO).await;
                let real = answer(real);
                let at = self.elapsed();
                self.sim_clock(at);
                let session = self.sim[s].session.ok_or("sim slot closed")?;
                let now = self.db.now();
                let sim = match self.db.await_begin(session, self.sim[target].pid, now) {
                    Ok(AwaitState::Done(outcome)) => Ok(outcome),
                    Ok(AwaitState::Waiting { .. }) => Err(DbError::Failed("a wait of no time waits".to_owned())),
                    Err(e) => Err(e),
                };
                Ok((real, answer(sim)))
            }
            Step::Unlisten { s, c } => {
                if !self.is_open(s) {
                    return skipped;
                }
                let listener = self.real[s].listener.as_ref().ok_or("real slot closed")?;
                let channel = &self.channels[c];
                let real = unlisten(listener.client(), channel, self.protocol, &self.schema).await;
                let session = self.sim[s].session.ok_or("sim slot closed")?;
                let db = &mut self.db;
                let sim = channel
                    .listened(self.protocol)
                    .try_for_each(|ch| db.unlisten(session, ch));
                if sim.is_ok() && self.protocol == Protocol::Lease {
                    db.forget_waiter(session, channel.as_str());
                }
                let done = |r: Result<(), DbError>| match r {
                    Ok(()) => Outcome::Done("unlistened"),
                    Err(e) => Outcome::Error(error_kind(&e)),
                };
                Ok((done(real), done(sim)))
            }
            Step::Promote => {
                if self.protocol != Protocol::Lease || self.db.schema_dropped() {
                    return skipped;
                }
                self.promoted = Some(self.db.timeline() + 1);
                self.fake_timeline().await?;
                self.db.set_timeline(self.db.timeline() + 1);
                Ok((Outcome::Done("promoted"), Outcome::Done("promoted")))
            }
            Step::ReadOnly { on } => {
                if self.read_only == on {
                    return skipped;
                }
                for slot in &self.real {
                    if let Some(listener) = &slot.listener {
                        set_read_only(listener.client(), on).await?;
                    }
                }
                self.read_only = on;
                self.db.set_read_only(on);
                let done = if on { "read only" } else { "read write" };
                Ok((Outcome::Done(done), Outcome::Done(done)))
            }
        }
    }

    /// After a `Promote`: redefines the real schema's `timeline()` to return the promoted
    /// timeline (again after a bootstrap restored the real one).
    async fn fake_timeline(&self) -> Result<(), String> {
        let Some(timeline) = self.promoted else {
            return Ok(());
        };
        let sql = format!(
            "SET lock_timeout = '10s'; CREATE OR REPLACE FUNCTION {}.timeline() RETURNS bigint LANGUAGE sql AS \
             'SELECT {timeline}::bigint'",
            quote_ident(self.schema.as_str())
        );
        self.observer
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("fake timeline: {e}"))
    }

    /// Every lock row, as `pgiplock status` reads it from the server and as the model holds it
    /// (holder pid mapped to its session; remaining lease not compared).
    async fn rows(&self) -> Result<(Vec<RowState>, Vec<RowState>), String> {
        let status = lock_status_on(&self.observer, self.protocol, &self.schema)
            .await
            .map_err(|e| format!("lock status: {e}"))?;
        let real = status
            .into_iter()
            .map(|r| RowState {
                holder_who: match (r.holder_pid, &r.holder) {
                    (Some(pid), Some(app)) => self.real_pids.get(&(pid, app.clone())).copied(),
                    _ => None,
                },
                channel: r.channel,
                holder: r.holder,
                token: r.token.map(|t| t.0),
                alive: r.holder_alive,
            })
            .collect();
        let mut sim = Vec::new();
        for c in &self.channels {
            let alive = self.db.owner_sessions(self.protocol, c) > 0;
            match self.protocol {
                Protocol::Classic => {
                    if let Some(app) = self.db.classic_owner(c.lock_channel()) {
                        sim.push(RowState {
                            channel: c.as_str().to_owned(),
                            holder: Some(app.to_owned()),
                            holder_who: None,
                            token: None,
                            alive,
                        });
                    }
                }
                Protocol::Lease => {
                    if let Some(row) = self.db.lease_row(c.as_str()) {
                        sim.push(RowState {
                            channel: c.as_str().to_owned(),
                            holder: row.holder.clone(),
                            holder_who: match (row.holder_pid, &row.holder) {
                                (Some(pid), Some(app)) => self.sim_pids.get(&(pid, app.clone())).copied(),
                                _ => None,
                            },
                            token: Some(row.token).filter(|t| *t > 0),
                            alive: alive && row.holder.is_some(),
                        });
                    }
                }
            }
        }
        Ok((real, sim))
    }

    /// The lock-channel notifications each open session received since the last call, in both
    /// worlds: `(slot, real payloads, sim payloads)` per open slot.
    async fn notifications(&mut self) -> Vec<(usize, Vec<Heard>, Vec<Heard>)> {
        let mut out = Vec::new();
        for s in 0..SLOTS {
            let (Some(listener), Some(session)) = (self.real[s].listener.as_mut(), self.sim[s].session) else {
                continue;
            };
            // Everything committed before the sentinel arrives before it (commit order).
            let real = listener
                .drain_until_sentinel_with_senders(&self.sentinels[s], WAIT)
                .await
                .into_iter()
                .map(|(c, p, pid)| (c, named_by_who(&self.real_pids, p), who_of_pid(&self.real_pids, pid)))
                .collect();
            let sim = self
                .db
                .take_notifications(session)
                .into_iter()
                .map(|n| {
                    let payload = named_by_who(&self.sim_pids, n.payload);
                    (n.channel, payload, who_of_pid(&self.sim_pids, n.sender_pid))
                })
                .collect();
            out.push((s, real, sim));
        }
        out
    }

    async fn close(mut self) {
        for s in 0..SLOTS {
            if self.real[s].listener.is_some() {
                // Best effort: the schema guard drops the tables whatever happens here.
                let _ = self.end_real(s).await;
            }
        }
    }
}

/// Makes the session's transactions read-only from now on (as `default_transaction_read_only`
/// does for a whole server), or read-write again.
async fn set_read_only(client: &Client, on: bool) -> Result<(), String> {
    let mode = if on { "READ ONLY" } else { "READ WRITE" };
    client
        .batch_execute(&format!("SET SESSION CHARACTERISTICS AS TRANSACTION {mode}"))
        .await
        .map_err(|e| format!("set {mode}: {e}"))
}

/// One lock row in either world.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowState {
    channel: String,
    holder: Option<String>,
    holder_who: Option<Who>,
    token: Option<u64>,
    /// The holder's session is still in `pg_stat_activity`.
    alive: bool,
}

/// What the cases exercised, for the test's output: outcome kinds and how often they occurred.
type Tally = std::sync::Mutex<BTreeMap<String, u64>>;

fn tally_key(o: &Outcome) -> String {
    match o {
        Outcome::Acquire {
            acquired,
            stale,
            remaining,
            ..
        } => format!(
            "acquire acquired={acquired} stale={} remaining={remaining}",
            stale.is_some()
        ),
        Outcome::Error(e) => format!("error {e}"),
        Outcome::Batch(entries) => format!(
            "batch [{}]",
            entries.iter().map(tally_key).collect::<Vec<_>>().join(", ")
        ),
        other => format!("{other:?}"),
    }
}

/// Runs `case` in both worlds; on agreement, the log of its steps and of what each slot heard.
async fn run_case(case: &Case, tally: &Tally) -> Result<Vec<String>, String> {
    let schema = TestSchema::new();
    let mut worlds = Worlds::new(case, &schema).await?;
    let result = run_steps(&mut worlds, case, tally).await;
    let log = std::mem::take(&mut worlds.log);
    worlds.close().await;
    drop(schema);
    result.map(|()| log.clone()).map_err(|e| {
        format!(
            "{e}\nsteps so far ({:?}, ttl {:?}):\n  {}",
            case.protocol,
            case.ttl,
            log.join("\n  ")
        )
    })
}

async fn run_steps(worlds: &mut Worlds, case: &Case, tally: &Tally) -> Result<(), String> {
    for (i, step) in case.steps.iter().enumerate() {
        let sightings = worlds.sightings;
        let (real, sim) = worlds.step(step).await?;
        let kind = format!("{:?} {}", case.protocol, tally_key(&sim));
        *tally.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default() += 1;
        if worlds.sightings > sightings {
            *tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(format!(
                    "{:?} first sightings of an older timeline's term",
                    case.protocol
                ))
                .or_default() += worlds.sightings - sightings;
        }
        worlds.log.push(format!("{i:>2} {step:?} -> {sim}"));
        if real != sim {
            return Err(format!(
                "step {i} {step:?}: replies differ\n  real: {real}\n  sim:  {sim}"
            ));
        }
        let (real_rows, sim_rows) = worlds.rows().await?;
        if real_rows != sim_rows {
            return Err(format!(
                "step {i} {step:?}: lock rows differ\n  real: {real_rows:?}\n  sim:  {sim_rows:?}"
            ));
        }
        for (s, real, sim) in worlds.notifications().await {
            if real != sim {
                return Err(format!(
                    "step {i} {step:?}: notifications of slot {s} differ\n  real: {real:?}\n  sim:  {sim:?}"
                ));
            }
            if !sim.is_empty() {
                *tally
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(format!("{:?} notifications heard", case.protocol))
                    .or_default() += sim.len() as u64;
                let payloads: Vec<&str> = sim.iter().map(|(_, p, _)| p.as_str()).collect();
                worlds.log.push(format!("     slot {s} heard {payloads:?}"));
            }
        }
    }
    Ok(())
}

/// The runtime each test drives its cases on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

#[test]
fn sim_db_conforms_to_postgres() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let config = Config {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    };
    let runtime = runtime();
    let tally = Tally::default();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| {
        runtime
            .block_on(run_case(&case, &tally))
            .map(drop)
            .map_err(TestCaseError::fail)
    });
    eprintln!("steps compared, by the model's outcome:");
    for (kind, n) in tally.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        eprintln!("  {n:>6}  {kind}");
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            panic!("the model and PostgreSQL disagree: {reason}\nminimal case: {case:#?}")
        }
        Err(e) => panic!("{e}"),
    }
}

/// The promotion path step by step, which random sequences reach rarely: a long lease whose
/// holder's session ends, a promotion, attempts that sight the older timeline's row (one of
/// them on a read-only server, which refuses the sighting's write), the one-ttl cap, the
/// takeover with a token of the new timeline, a renewal, a second promotion.
#[test]
fn sim_db_conforms_to_postgres_across_a_promotion() {
    let runtime = runtime();
    let steps = vec![
        Step::AcquireLong { s: 0, c: 0 },
        Step::AcquireLong { s: 2, c: 1 },
        Step::Close { s: 0 },
        Step::Promote,
        Step::ReadOnly { on: true },
        Step::Acquire { s: 1, c: 0 },
        Step::ReadOnly { on: false },
        Step::Acquire { s: 1, c: 0 },
        Step::Acquire { s: 1, c: 0 },
        Step::AcquireMany { s: 1 },
        Step::Expire { c: 0 },
        Step::Acquire { s: 1, c: 0 },
        Step::Renew {
            s: 1,
            c: 0,
            tok: Tok::Mine,
        },
        Step::Close { s: 2 },
        Step::Promote,
        Step::Bootstrap { s: 1 },
        Step::AcquireMany { s: 1 },
        Step::Expire { c: 1 },
        Step::AcquireMany { s: 1 },
    ];
    let tally = Tally::default();
    for ttl in [Duration::from_millis(120), Duration::from_millis(200)] {
        let case = Case {
            protocol: Protocol::Lease,
            ttl,
            steps: steps.clone(),
        };
        runtime
            .block_on(run_case(&case, &tally))
            .unwrap_or_else(|e| panic!("the model and PostgreSQL disagree: {e}"));
    }
    let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    let sightings = tally
        .get("Lease first sightings of an older timeline's term")
        .copied()
        .unwrap_or(0);
    assert!(
        sightings >= 4,
        "the cases sighted older rows ({sightings}); tally {tally:?}"
    );
}

/// A waiter that stops listening (its lock removed, its session still open) is forgotten in
/// both worlds: the release names the other waiter, and once that one unlistened too, nobody.
#[test]
fn sim_db_conforms_to_postgres_when_waiters_unlisten() {
    let runtime = runtime();
    let release = |s| Step::Release {
        s,
        c: 0,
        tok: Tok::Mine,
    };
    let steps = vec![
        Step::AcquireLong { s: 0, c: 0 },
        Step::Acquire { s: 1, c: 0 },
        Step::Acquire { s: 2, c: 0 },
        Step::Unlisten { s: 1, c: 0 },
        release(0),
        Step::Acquire { s: 0, c: 0 },
        Step::Acquire { s: 1, c: 0 },
        Step::Unlisten { s: 1, c: 0 },
        Step::Unlisten { s: 2, c: 0 },
        release(0),
    ];
    let case = Case {
        protocol: Protocol::Lease,
        ttl: Duration::from_millis(200),
        steps,
    };
    let tally = Tally::default();
    let log = runtime
        .block_on(run_case(&case, &tally))
        .unwrap_or_else(|e| panic!("the model and PostgreSQL disagree: {e}"));
    // What the releasing slot heard: its release markers, with the successor as slot.generation.
    let released: Vec<&str> = log
        .iter()
        .filter(|line| line.starts_with("     slot 0 heard"))
        .flat_map(|line| line.split('"').filter(|p| p.starts_with("released:")))
        .collect();
    assert_eq!(released.len(), 2, "two releases heard: {log:#?}");
    assert!(released[0].ends_with(":2.1"), "the listening waiter named: {log:#?}");
    assert_eq!(released[1].matches(':').count(), 1, "nobody named: {log:#?}");
}
