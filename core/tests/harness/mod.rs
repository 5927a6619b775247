//! A deterministic test world: a hand-made clock, a tiny in-memory database that implements the
//! semantics documented on [`DbOp`] for both protocols, and a few locks driven against it.
//!
//! Every message travels through one event queue ordered by `(time, sequence)`, so runs are
//! reproducible; time jumps to the next event or the earliest lock deadline. Checkers run after
//! every step: S2 (one believer, `Lease` only), S3 (no delivery outside tenure, tracked from the
//! events themselves) and S4 (tokens only rise).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgiplock_core::*;

/// The channel every lock of a world competes for.
pub const CHANNEL: &str = "jobs";

/// One lock row of the `Lease` table.
#[derive(Debug, Clone, Default)]
pub struct LeaseRow {
    /// Holder application name.
    pub holder: Option<String>,
    /// Holder backend pid.
    pub holder_pid: Option<i32>,
    /// Last token handed out.
    pub token: u64,
    /// Expiry on the server clock.
    pub expires_at: Option<Timestamp>,
}

/// One server session (backend).
#[derive(Debug, Clone)]
pub struct DbSession {
    /// `application_name`.
    pub app: String,
    /// Backend pid.
    pub pid: i32,
    /// Still in `pg_stat_activity`.
    pub alive: bool,
    /// Channels it listens on.
    pub listening: BTreeSet<String>,
}

/// The in-memory database: both lock tables, the sessions, and NOTIFY in commit order.
#[derive(Debug, Default)]
pub struct Db {
    /// Classic table `lock(channel, app)`, keyed by lock channel.
    pub classic: BTreeMap<String, String>,
    /// Lease table, keyed by user channel.
    pub lease: BTreeMap<String, LeaseRow>,
    /// Sessions by key.
    pub sessions: BTreeMap<u64, DbSession>,
    /// `pg_terminate_backend` is refused.
    pub terminate_not_permitted: bool,
    /// Statements executed.
    pub statements: u64,
    next_key: u64,
}

/// What a statement committed: the reply and the notifications `(channel, payload)`.
pub struct Commit {
    /// The reply.
    pub reply: Result<Reply, DbError>,
    /// Notifications in commit order.
    pub notifications: Vec<(String, String)>,
    /// A backend that was terminated.
    pub terminated: Option<u64>,
}

impl Db {
    /// Opens a session listening on `channel` and its lock channel; returns its key.
    pub fn connect(&mut self, channel: &ChannelName) -> u64 {
        self.next_key += 1;
        let key = self.next_key;
        self.sessions.insert(
            key,
            DbSession {
                app: format!("app-{key}"),
                pid: 1000 + key as i32,
                alive: true,
                listening: [channel.as_str().to_owned(), channel.lock_channel().to_owned()].into(),
            },
        );
        key
    }

    /// Ends a session (the server notices).
    pub fn disconnect(&mut self, key: u64) {
        if let Some(s) = self.sessions.get_mut(&key) {
            s.alive = false;
        }
    }

    fn alive_app(&self, app: &str) -> bool {
        self.sessions.values().any(|s| s.alive && s.app == app)
    }

    fn alive_backend(&self, pid: i32, app: &str) -> Option<u64> {
        self.sessions
            .iter()
            .find(|(_, s)| s.alive && s.pid == pid && s.app == app)
            .map(|(k, _)| *k)
    }

    /// Executes `op` for `session` at server time `now`.
    pub fn execute(
        &mut self,
        now: Timestamp,
        session: u64,
        channel: &ChannelName,
        protocol: Protocol,
        ttl: Duration,
        op: &DbOp,
    ) -> Commit {
        self.statements += 1;
        let mut commit = Commit {
            reply: Err(DbError::SessionLost),
            notifications: Vec::new(),
            terminated: None,
        };
        let Some(me) = self.sessions.get(&session).filter(|s| s.alive).cloned() else {
            return commit;
        };
        let lock_channel = channel.lock_channel().to_owned();
        let mut notify = |payload: String| commit.notifications.push((lock_channel.clone(), payload));
        let reply = match (protocol, op) {
            (Protocol::Classic, DbOp::Acquire) => {
                let key = channel.lock_channel().to_owned();
                let free = match self.classic.get(&key) {
                    None => true,
                    Some(app) => app == &me.app || !self.alive_app(app),
                };
                if free {
                    self.classic.insert(key, me.app.clone());
                    Reply::Acquire(AcquireReply {
                        acquired: true,
                        token: None,
                        lease_remaining: None,
                        stale_holder: None,
                    })
                } else {
                    Reply::Acquire(AcquireReply::locked())
                }
            }
            (Protocol::Classic, DbOp::Renew { .. }) => Reply::Renew {
                owned: self.classic.get(channel.lock_channel()) == Some(&me.app),
            },
            (Protocol::Classic, DbOp::Drain { .. }) => {
                notify(Marker::Draining(None).payload());
                Reply::Drained
            }
            (Protocol::Classic, DbOp::Release { .. }) => {
                let owned = self.classic.get(channel.lock_channel()) == Some(&me.app);
                if owned {
                    self.classic.remove(channel.lock_channel());
                    notify(Marker::Released(None).payload());
                }
                Reply::Release { released: owned }
            }
            (Protocol::Lease, DbOp::Acquire) => {
                let row = self.lease.entry(channel.as_str().to_owned()).or_default().clone();
                let holder_alive = match (&row.holder, row.holder_pid) {
                    (Some(app), Some(pid)) => self.alive_backend(pid, app).is_some(),
                    _ => false,
                };
                let free = row.holder.is_none()
                    || !row.expires_at.is_some_and(|e| e > now)
                    || !holder_alive
                    || row.holder.as_deref() == Some(me.app.as_str());
                if free {
                    let stale_holder = match (&row.holder, row.holder_pid) {
                        (Some(app), Some(pid)) if holder_alive && app != &me.app => {
                            Some(StaleHolder { pid, app: app.clone() })
                        }
                        _ => None,
                    };
                    let token = row.token + 1;
                    self.lease.insert(
                        channel.as_str().to_owned(),
                        LeaseRow {
                            holder: Some(me.app.clone()),
                            holder_pid: Some(me.pid),
                            token,
                            expires_at: Some(now + ttl),
                        },
                    );
                    notify(Marker::Acquired(FenceToken(token)).payload());
                    Reply::Acquire(AcquireReply {
                        acquired: true,
                        token: Some(FenceToken(token)),
                        lease_remaining: None,
                        stale_holder,
                    })
                } else {
                    Reply::Acquire(AcquireReply {
                        acquired: false,
                        token: None,
                        lease_remaining: row.expires_at.map(|e| e.saturating_duration_since(now)),
                        stale_holder: None,
                    })
                }
            }
            (Protocol::Lease, DbOp::Renew { token }) => {
                let row = self.lease.get_mut(channel.as_str());
                let owned = match row {
                    Some(row)
                        if row.holder.as_deref() == Some(me.app.as_str()) && token.map(|t| t.0) == Some(row.token) =>
                    {
                        row.expires_at = Some(now + ttl);
                        true
                    }
                    _ => false,
                };
                Reply::Renew { owned }
            }
            (Protocol::Lease, DbOp::Drain { token }) => {
                notify(Marker::Draining(*token).payload());
                Reply::Drained
            }
            (Protocol::Lease, DbOp::Release { token }) => {
                let row = self.lease.get_mut(channel.as_str());
                let released = match row {
                    Some(row)
                        if row.holder.as_deref() == Some(me.app.as_str()) && token.map(|t| t.0) == Some(row.token) =>
                    {
                        row.holder = None;
                        row.holder_pid = None;
                        row.expires_at = None;
                        true
                    }
                    _ => false,
                };
                if released {
                    notify(Marker::Released(*token).payload());
                }
                Reply::Release { released }
            }
            (_, DbOp::TerminateStale { pid, app }) => match self.alive_backend(*pid, app) {
                None => Reply::Terminate(TerminateOutcome::Gone),
                Some(_) if self.terminate_not_permitted => Reply::Terminate(TerminateOutcome::NotPermitted),
                Some(key) => {
                    self.disconnect(key);
                    commit.terminated = Some(key);
                    Reply::Terminate(TerminateOutcome::Terminated)
                }
            },
            (_, op) => {
                return Commit {
                    reply: Err(DbError::Failed(format!("unknown op {op:?}"))),
                    notifications: Vec::new(),
                    terminated: None,
                }
            }
        };
        commit.reply = Ok(reply);
        commit
    }

    /// Sessions listening on `channel`, alive, in key order.
    pub fn listeners(&self, channel: &str) -> Vec<u64> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.alive && s.listening.contains(channel))
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Latencies of the world, fixed per world.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Client to server.
    pub request: Duration,
    /// Server to client (reply).
    pub reply: Duration,
    /// Commit to delivery of a notification.
    pub notify: Duration,
    /// Reconnection.
    pub connect: Duration,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            request: Duration::from_millis(1),
            reply: Duration::from_millis(1),
            notify: Duration::from_millis(1),
            connect: Duration::from_millis(5),
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    /// A request reaches the server.
    Execute { node: usize, key: u64, req: DbRequest },
    /// An input reaches a node (reply, notification, session up/down).
    Input { node: usize, key: u64, input: Input },
    /// A message is published on the data channel.
    Publish { payload: String },
    /// A node reconnects.
    Reconnect { node: usize },
}

/// One process with one lock.
#[derive(Debug)]
pub struct Node {
    /// The lock (`None` after a crash).
    pub lock: Option<Lock>,
    /// Current session: the core's id and the database's key.
    pub session: Option<(SessionId, u64)>,
    next_session: u64,
    /// Network silently cut: nothing leaves or arrives.
    pub cut: bool,
    /// Everything the lock reported.
    pub events: Vec<LockEvent>,
    /// Payloads delivered to the application.
    pub delivered: Vec<String>,
    /// `AttemptDone` answers.
    pub attempts: Vec<bool>,
    /// Believed holder according to the events (S3 checker).
    pub tenure: bool,
    /// Requests sent (op names).
    pub requests: Vec<DbOp>,
    /// Session resets asked for.
    pub resets: u32,
}

/// A world of locks on one channel and one database.
pub struct World {
    /// The clock.
    pub now: Timestamp,
    /// The database.
    pub db: Db,
    /// The processes.
    pub nodes: Vec<Node>,
    /// The channel.
    pub channel: ChannelName,
    /// The protocol.
    pub protocol: Protocol,
    /// The lease length every lock of this world uses (the executor knows it per lock, even
    /// after the process that asked died).
    pub ttl: Duration,
    /// Latencies.
    pub latency: Latency,
    /// Check S2 after every step.
    pub check_s2: bool,
    queue: BTreeMap<(Timestamp, u64), Event>,
    seq: u64,
    last_token: u64,
    /// Payloads published.
    pub published: Vec<String>,
    /// Steps taken.
    pub steps: u64,
    /// When set, every input and output, for debugging a failure.
    pub trace: Option<Vec<String>>,
}

impl World {
    /// `n` locks with `config`, seeds derived from `seed`; each gets a session at once.
    pub fn new(config: LockConfig, n: usize, seed: u64) -> World {
        let channel = ChannelName::new(CHANNEL).expect("valid channel");
        let protocol = config.protocol;
        let mut world = World {
            now: Timestamp::from_millis(1_000),
            db: Db::default(),
            nodes: Vec::new(),
            channel: channel.clone(),
            protocol,
            ttl: config.lease_ttl,
            latency: Latency::default(),
            check_s2: protocol == Protocol::Lease,
            queue: BTreeMap::new(),
            seq: 0,
            last_token: 0,
            published: Vec::new(),
            steps: 0,
            trace: None,
        };
        for i in 0..n {
            let lock = Lock::new(
                channel.clone(),
                config.clone(),
                seed.wrapping_mul(31).wrapping_add(i as u64),
            );
            world.nodes.push(Node {
                lock: Some(lock),
                session: None,
                next_session: 1,
                cut: false,
                events: Vec::new(),
                delivered: Vec::new(),
                attempts: Vec::new(),
                tenure: false,
                requests: Vec::new(),
                resets: 0,
            });
            world.connect(i);
        }
        world
    }

    fn push(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Opens a new session for `node` and tells its lock.
    pub fn connect(&mut self, node: usize) {
        let key = self.db.connect(&self.channel);
        let n = &mut self.nodes[node];
        let id = SessionId(n.next_session);
        n.next_session += 1;
        n.session = Some((id, key));
        self.input(node, Input::SessionUp(id));
    }

    /// Feeds `input` to `node` now, then handles its outputs and runs the checkers.
    pub fn input(&mut self, node: usize, input: Input) {
        let now = self.now;
        let traced = self.trace.is_some().then(|| input.clone());
        let Some(lock) = self.nodes[node].lock.as_mut() else {
            return;
        };
        lock.handle_input(now, input);
        let mut outputs = Vec::new();
        while let Some(output) = lock.poll_output() {
            outputs.push(output);
        }
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("{now:?} node {node} <- {:?}", traced.expect("traced input")));
            for o in &outputs {
                trace.push(format!("{now:?} node {node} -> {o:?}"));
            }
        }
        if let Some((at, kind)) = lock.poll_timeout() {
            assert!(at > now, "node {node}: deadline {at:?} ({kind:?}) not after {now:?}");
        }
        for output in outputs {
            self.output(node, output);
        }
        self.check();
    }

    fn output(&mut self, node: usize, output: Output) {
        let now = self.now;
        let n = &mut self.nodes[node];
        match output {
            Output::Request(req) => {
                n.requests.push(req.op.clone());
                let Some((id, key)) = n.session else { return };
                if n.cut || id != req.session {
                    return;
                }
                let at = now + self.latency.request;
                self.push(at, Event::Execute { node, key, req });
            }
            Output::Event(event) => {
                match &event {
                    LockEvent::Acquired { token } => {
                        assert!(!n.tenure, "node {node}: Acquired twice without Lost/Released");
                        n.tenure = true;
                        if let Some(token) = token {
                            assert!(
                                token.0 > self.last_token,
                                "S4: token {token:?} not above {}",
                                self.last_token
                            );
                            self.last_token = token.0;
                        }
                    }
                    LockEvent::Lost { .. } | LockEvent::Released => {
                        assert!(n.tenure, "node {node}: {event:?} without tenure");
                        n.tenure = false;
                    }
                    LockEvent::Stopped { .. } => assert!(!n.tenure, "node {node}: Stopped while holding"),
                    _ => {}
                }
                n.events.push(event);
            }
            Output::Deliver { payload } => {
                assert!(n.tenure, "S3: node {node} delivered {payload:?} outside its tenure");
                n.delivered.push(payload);
            }
            Output::ResetSession(id) => {
                n.resets += 1;
                if n.session.map(|(s, _)| s) == Some(id) {
                    let (_, key) = n.session.take().expect("session");
                    if !n.cut {
                        // The driver closes the connection; the server sees it go.
                        self.db.disconnect(key);
                        let at = now + self.latency.connect;
                        self.push(at, Event::Reconnect { node });
                    }
                }
            }
            Output::AttemptDone { acquired } => n.attempts.push(acquired),
            _ => {}
        }
    }

    fn check(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(lock) = &n.lock {
                assert_eq!(
                    lock.state().phase.is_holder(),
                    n.tenure,
                    "node {i}: phase {:?} disagrees with reported tenure",
                    lock.state().phase
                );
            }
        }
        if self.check_s2 {
            let holders = self.holders();
            assert!(holders.len() <= 1, "S2: holders {holders:?} at {:?}", self.now);
        }
    }

    /// Nodes whose lock is in a holder phase.
    pub fn holders(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].lock.as_ref().is_some_and(|l| l.state().phase.is_holder()))
            .collect()
    }

    /// The lock of `node`.
    pub fn lock(&self, node: usize) -> &Lock {
        self.nodes[node].lock.as_ref().expect("node not crashed")
    }

    /// Delivers notifications of a commit to every listening session.
    fn fan_out(&mut self, notifications: Vec<(String, String)>) {
        let at = self.now + self.latency.notify;
        for (channel, payload) in notifications {
            for key in self.db.listeners(&channel) {
                let Some(node) = self.nodes.iter().position(|n| n.session.map(|(_, k)| k) == Some(key)) else {
                    continue;
                };
                let Some((session, _)) = self.nodes[node].session else {
                    continue;
                };
                let input = Input::Notification {
                    session,
                    channel: channel.clone(),
                    payload: payload.clone(),
                };
                self.push(at, Event::Input { node, key, input });
            }
        }
    }

    /// Publishes `payload` on the data channel now.
    pub fn publish(&mut self, payload: &str) {
        self.published.push(payload.to_owned());
        let channel = self.channel.as_str().to_owned();
        self.fan_out(vec![(channel, payload.to_owned())]);
    }

    /// Schedules a publication at `at`.
    pub fn publish_at(&mut self, at: Timestamp, payload: &str) {
        self.push(
            at,
            Event::Publish {
                payload: payload.to_owned(),
            },
        );
    }

    /// `Start` on every node.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.input(i, Input::Start);
        }
    }

    /// The process dies: its lock is gone and, once the server notices, its session too.
    pub fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.lock = None;
        n.tenure = false;
        if let Some((_, key)) = n.session.take() {
            if !n.cut {
                self.db.disconnect(key);
            }
        }
    }

    /// Cuts the node's network silently: its session stays alive on the server.
    pub fn cut(&mut self, node: usize) {
        self.nodes[node].cut = true;
    }

    /// The server ends the node's session (its dead-peer detection fired) while the node's
    /// side of the connection stays half-open: the node hears nothing, its requests get no reply.
    pub fn server_drop(&mut self, node: usize) {
        self.nodes[node].cut = true;
        if let Some((_, key)) = self.nodes[node].session {
            self.db.disconnect(key);
        }
    }

    /// Heals a cut network. What was sent during the cut is gone, which a TCP connection
    /// cannot survive: the old connection is closed (both sides learn it) and a new one opened.
    pub fn heal(&mut self, node: usize) {
        if !self.nodes[node].cut {
            return;
        }
        self.nodes[node].cut = false;
        if self.nodes[node].lock.is_none() {
            return;
        }
        match self.nodes[node].session {
            Some((_, key)) => {
                self.db.disconnect(key);
                self.session_killed(key);
            }
            None => self.connect(node),
        }
    }

    /// Replaces a crashed process by a new one with a new session, started.
    pub fn restart(&mut self, node: usize, config: LockConfig, seed: u64) {
        if let Some((_, key)) = self.nodes[node].session.take() {
            self.db.disconnect(key);
        }
        let n = &mut self.nodes[node];
        n.lock = Some(Lock::new(self.channel.clone(), config, seed));
        n.cut = false;
        n.tenure = false;
        self.connect(node);
        self.input(node, Input::Start);
    }

    /// The earliest moment something happens.
    fn next_at(&self) -> Option<Timestamp> {
        let queued = self.queue.keys().next().map(|(at, _)| *at);
        let timers = self
            .nodes
            .iter()
            .filter_map(|n| n.lock.as_ref().and_then(|l| l.poll_timeout()).map(|(at, _)| at))
            .min();
        match (queued, timers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One step: the next queued event or the earliest due timer. `false` when idle.
    pub fn step(&mut self) -> bool {
        let Some(at) = self.next_at() else { return false };
        self.steps += 1;
        self.now = self.now.max(at);
        // Timers first at equal times: a fence due at t must win over a reply arriving at t.
        let due = (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .lock
                .as_ref()
                .and_then(|l| l.poll_timeout())
                .is_some_and(|(t, _)| t <= self.now)
        });
        if let Some(node) = due {
            self.input(node, Input::Tick);
            return true;
        }
        let Some((&k, _)) = self.queue.iter().next() else {
            return true;
        };
        let event = self.queue.remove(&k).expect("queued");
        match event {
            Event::Execute { node, key, req } => {
                let ttl = self.ttl;
                let commit = self
                    .db
                    .execute(self.now, key, &self.channel, self.protocol, ttl, &req.op);
                if let Some(killed) = commit.terminated {
                    self.session_killed(killed);
                }
                if commit.reply == Err(DbError::SessionLost) {
                    // The connection is closed under the driver: it tells the lock.
                    self.session_killed(key);
                }
                self.fan_out(commit.notifications);
                let at = self.now + self.latency.reply;
                self.push(
                    at,
                    Event::Input {
                        node,
                        key,
                        input: Input::DbResult {
                            id: req.id,
                            result: commit.reply,
                        },
                    },
                );
            }
            Event::Input { node, key, input } => {
                let n = &self.nodes[node];
                if n.cut || n.session.map(|(_, k)| k) != Some(key) {
                    return true;
                }
                self.input(node, input);
            }
            Event::Publish { payload } => self.publish(&payload),
            Event::Reconnect { node } => {
                if self.nodes[node].lock.is_some() && !self.nodes[node].cut && self.nodes[node].session.is_none() {
                    self.connect(node);
                }
            }
        }
        true
    }

    fn session_killed(&mut self, key: u64) {
        let Some(node) = self.nodes.iter().position(|n| n.session.map(|(_, k)| k) == Some(key)) else {
            return;
        };
        if self.nodes[node].cut {
            return; // nobody can tell it
        }
        let (id, _) = self.nodes[node].session.take().expect("session");
        self.input(node, Input::SessionDown(id));
        let at = self.now + self.latency.connect;
        self.push(at, Event::Reconnect { node });
    }

    /// Runs until `until` (inclusive) or idle.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_at().is_some_and(|at| at <= end) {
            self.step();
            assert!(self.steps < 10_000_000, "step limit");
        }
        self.now = self.now.max(end);
    }

    /// Runs until `pred` holds, at most `limit` of virtual time; returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut pred: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if pred(self) {
                return true;
            }
            match self.next_at() {
                Some(at) if at <= end => {
                    self.step();
                }
                _ => {
                    self.now = self.now.max(end);
                    return pred(self);
                }
            }
        }
    }

    /// Everything delivered by any node, in node order.
    pub fn all_delivered(&self) -> Vec<String> {
        self.nodes.iter().flat_map(|n| n.delivered.iter().cloned()).collect()
    }

    /// Tokens of `node`'s `Acquired` events.
    pub fn tokens(&self, node: usize) -> Vec<Option<FenceToken>> {
        self.nodes[node]
            .events
            .iter()
            .filter_map(|e| match e {
                LockEvent::Acquired { token } => Some(*token),
                _ => None,
            })
            .collect()
    }
}

/// A config with short timings for tests.
pub fn fast_config(protocol: Protocol) -> LockConfig {
    let mut c = LockConfig::new(protocol);
    c.acquire_interval = Duration::from_secs(3);
    c.lease_ttl = Duration::from_secs(2);
    c.renew_interval = Duration::from_millis(400);
    c.fence_margin = Duration::from_millis(300);
    c.request_timeout = Duration::from_secs(1);
    c.wake_jitter = Duration::from_millis(10);
    c.shutdown_timeout = Duration::from_secs(1);
    c.marker_wait = Duration::from_millis(200);
    if protocol == Protocol::Classic {
        c.renew_interval = Duration::from_secs(1);
    }
    c
}

/// Drains all outputs of a lock.
pub fn drain(lock: &mut Lock) -> Vec<Output> {
    let mut out = Vec::new();
    while let Some(o) = lock.poll_output() {
        out.push(o);
    }
    out
}

/// The only request among `outputs`.
pub fn request(outputs: &[Output]) -> DbRequest {
    let reqs: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::Request(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reqs.len(), 1, "expected one request in {outputs:?}");
    reqs[0].clone()
}

/// Events among `outputs`.
pub fn events(outputs: &[Output]) -> Vec<LockEvent> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// Delivered payloads among `outputs`.
pub fn delivered(outputs: &[Output]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Deliver { payload } => Some(payload.clone()),
            _ => None,
        })
        .collect()
}
