//! A fleet of locks on one channel stepped input by input against the simulator's database model
//! ([`SimDb`]), for tests that need finer control than [`pgiplock_sim::World`] gives: a release
//! or an attempt at a chosen moment, a cut healed at will, fixed latencies per direction.
//!
//! The database semantics are [`SimDb`]'s alone (the model the conformance tests hold against
//! PostgreSQL); this module only carries messages. Every message travels through one queue
//! ordered by `(time, sequence)`; time jumps to the next message or the earliest lock deadline,
//! timers first at equal times. After every input each lock is checked by its own
//! [`LockChecker`] (deadlines, tenure, S3, ...), and the fleet by S2 (one believer, when on) and
//! S4 (tokens only rise across the fleet); a broken rule panics with the node and the time.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::check::LockChecker;
use pgiplock_core::*;
use pgiplock_sim::db::{DbConfig, SimDb};

/// The channel every lock of a fleet competes for.
pub const CHANNEL: &str = "jobs";

/// Latencies of the fleet, fixed per fleet.
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
enum Message {
    /// A request reaches the server.
    Execute {
        node: usize,
        session: SessionId,
        req: DbRequest,
    },
    /// An input reaches a node on a session (reply, notification).
    Input {
        node: usize,
        session: SessionId,
        input: Input,
    },
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
    /// The invariants of this incarnation's lock.
    pub checker: LockChecker,
    /// The current database session (the lock knows it by the same id).
    pub session: Option<SessionId>,
    sessions_opened: u64,
    /// Network silently cut: nothing leaves or arrives.
    pub cut: bool,
    /// Everything the lock reported.
    pub events: Vec<LockEvent>,
    /// Payloads delivered to the application.
    pub delivered: Vec<String>,
    /// Requests sent.
    pub requests: Vec<DbOp>,
}

/// Locks on one channel and one [`SimDb`].
pub struct Fleet {
    /// The clock (the server's too).
    pub now: Timestamp,
    /// The database model.
    pub db: SimDb,
    /// The processes.
    pub nodes: Vec<Node>,
    /// The channel.
    pub channel: ChannelName,
    /// The protocol.
    pub protocol: Protocol,
    /// The lease length every lock uses (the server knows it per request, even after the
    /// process that asked died).
    pub ttl: Duration,
    /// Latencies.
    pub latency: Latency,
    /// Check S2 after every input.
    pub check_s2: bool,
    publisher: SessionId,
    queue: BTreeMap<(Timestamp, u64), Message>,
    seq: u64,
    last_token: u64,
    /// Payloads published.
    pub published: Vec<String>,
    /// Steps taken.
    pub steps: u64,
    /// When set, every input and output, for debugging a failure.
    pub trace: Option<Vec<String>>,
}

impl Fleet {
    /// `n` locks with `config`, seeds derived from `seed`; each gets a session at once.
    pub fn new(config: LockConfig, n: usize, seed: u64) -> Fleet {
        Fleet::with_db(config, n, seed, DbConfig::default())
    }

    /// Like [`Fleet::new`] on a server with `db` settings.
    pub fn with_db(config: LockConfig, n: usize, seed: u64, db: DbConfig) -> Fleet {
        let channel = ChannelName::new(CHANNEL).expect("valid channel");
        let protocol = config.protocol;
        let mut db = SimDb::new(db);
        let (publisher, _) = db.open_session("publisher");
        let mut fleet = Fleet {
            now: Timestamp::from_millis(1_000),
            db,
            nodes: Vec::new(),
            channel: channel.clone(),
            protocol,
            ttl: config.lease_ttl,
            latency: Latency::default(),
            check_s2: protocol == Protocol::Lease,
            publisher,
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
            fleet.nodes.push(Node {
                lock: Some(lock),
                checker: LockChecker::new(),
                session: None,
                sessions_opened: 0,
                cut: false,
                events: Vec::new(),
                delivered: Vec::new(),
                requests: Vec::new(),
            });
            fleet.connect(i);
        }
        fleet
    }

    fn push(&mut self, at: Timestamp, message: Message) {
        self.seq += 1;
        self.queue.insert((at, self.seq), message);
    }

    /// Opens a new session for `node`, listening on the lock's channels, and tells its lock.
    pub fn connect(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.sessions_opened += 1;
        let app = format!("n{node}.{}", n.sessions_opened);
        let (session, _pid) = self.db.open_session(&app);
        for channel in self.channel.listened(self.protocol) {
            self.db.listen(session, channel).expect("session just opened");
        }
        self.nodes[node].session = Some(session);
        self.input(node, Input::SessionUp(session));
    }

    /// Feeds `input` to `node` now, then carries out its outputs and checks the fleet.
    pub fn input(&mut self, node: usize, input: Input) {
        let now = self.now;
        let traced = self.trace.is_some().then(|| input.clone());
        let n = &mut self.nodes[node];
        let Some(lock) = n.lock.as_mut() else {
            return;
        };
        let outputs = match n.checker.handle_input(lock, now, input) {
            Ok(outputs) => outputs,
            Err(violation) => panic!("node {node} at {now:?}: {violation}"),
        };
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("{now:?} node {node} <- {:?}", traced.expect("traced input")));
            for o in &outputs {
                trace.push(format!("{now:?} node {node} -> {o:?}"));
            }
        }
        for output in outputs {
            self.output(node, output);
        }
        if self.check_s2 {
            let holders = self.holders();
            assert!(holders.len() <= 1, "S2: holders {holders:?} at {now:?}");
        }
    }

    fn output(&mut self, node: usize, output: Output) {
        let now = self.now;
        let n = &mut self.nodes[node];
        match output {
            Output::Request(req) => {
                n.requests.push(req.op.clone());
                match n.session {
                    Some(session) if !n.cut && session == req.session => {
                        let at = now + self.latency.request;
                        self.push(at, Message::Execute { node, session, req });
                    }
                    _ => {}
                }
            }
            Output::Event(event) => {
                if let LockEvent::Acquired { token: Some(token) } = &event {
                    assert!(
                        token.0 > self.last_token,
                        "S4: node {node} acquired token {token:?}, not above {}",
                        self.last_token
                    );
                    self.last_token = token.0;
                }
                n.events.push(event);
            }
            Output::Deliver { payload } => n.delivered.push(payload),
            Output::ResetSession(id) if n.session == Some(id) => {
                n.session = None;
                if !n.cut {
                    // The driver closes the connection; the server sees it go.
                    self.db.close_session(id);
                    let at = now + self.latency.connect;
                    self.push(at, Message::Reconnect { node });
                }
            }
            _ => {}
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

    /// Ships every notification committed just now to its listener, in commit order.
    fn fan_out(&mut self) {
        let at = self.now + self.latency.notify;
        for session in self.db.take_notified() {
            let notes = self.db.take_notifications(session);
            let Some(node) = self.nodes.iter().position(|n| n.session == Some(session)) else {
                continue;
            };
            for note in notes {
                let input = Input::Notification {
                    session,
                    channel: note.channel,
                    payload: note.payload,
                };
                self.push(at, Message::Input { node, session, input });
            }
        }
    }

    /// Publishes `payload` on the data channel now.
    pub fn publish(&mut self, payload: &str) {
        self.published.push(payload.to_owned());
        self.db.advance_to(self.now);
        let channel = self.channel.as_str().to_owned();
        self.db
            .notify(self.publisher, &channel, payload)
            .expect("the publisher's session stays up");
        self.fan_out();
    }

    /// Schedules a publication at `at`.
    pub fn publish_at(&mut self, at: Timestamp, payload: &str) {
        let payload = payload.to_owned();
        self.push(at, Message::Publish { payload });
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
        if let Some(session) = n.session.take() {
            if !n.cut {
                self.db.close_session(session);
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
        if let Some(session) = self.nodes[node].session {
            self.db.close_session(session);
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
            Some(session) => {
                self.db.close_session(session);
                self.session_killed(session);
            }
            None => self.connect(node),
        }
    }

    /// Replaces a crashed process by a new one with a new session, started.
    pub fn restart(&mut self, node: usize, config: LockConfig, seed: u64) {
        if let Some(session) = self.nodes[node].session.take() {
            self.db.close_session(session);
        }
        let n = &mut self.nodes[node];
        n.lock = Some(Lock::new(self.channel.clone(), config, seed));
        n.checker = LockChecker::new();
        n.cut = false;
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

    /// One step: the earliest due timer or the next queued message. `false` when idle.
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
        let Some(&key) = self.queue.keys().next() else {
            return true;
        };
        let message = self.queue.remove(&key).expect("queued");
        match message {
            Message::Execute { node, session, req } => {
                self.db.advance_to(self.now);
                let result = self
                    .db
                    .execute(session, self.protocol, &self.channel, self.ttl, &req.op);
                for ended in self.db.take_terminated() {
                    self.session_killed(ended);
                }
                if result == Err(DbError::SessionLost) {
                    // The connection is closed under the driver: it tells the lock.
                    self.session_killed(session);
                }
                self.fan_out();
                let at = self.now + self.latency.reply;
                let input = Input::DbResult { id: req.id, result };
                self.push(at, Message::Input { node, session, input });
            }
            Message::Input { node, session, input } => {
                let n = &self.nodes[node];
                if !n.cut && n.session == Some(session) {
                    self.input(node, input);
                }
            }
            Message::Publish { payload } => self.publish(&payload),
            Message::Reconnect { node } => {
                let n = &self.nodes[node];
                if n.lock.is_some() && !n.cut && n.session.is_none() {
                    self.connect(node);
                }
            }
        }
        true
    }

    /// The server ended `session`; its node, unless cut off, learns it and reconnects.
    fn session_killed(&mut self, session: SessionId) {
        let Some(node) = self.nodes.iter().position(|n| n.session == Some(session)) else {
            return;
        };
        if self.nodes[node].cut {
            return; // nobody can tell it
        }
        self.nodes[node].session = None;
        self.input(node, Input::SessionDown(session));
        let at = self.now + self.latency.connect;
        self.push(at, Message::Reconnect { node });
    }

    /// Runs for `d` of virtual time (or until idle).
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_at().is_some_and(|at| at <= end) {
            self.step();
            assert!(self.steps < 10_000_000, "step limit");
        }
        self.now = self.now.max(end);
    }

    /// Runs until `pred` holds, at most `limit` of virtual time; returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut pred: impl FnMut(&Fleet) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if pred(self) {
                return true;
            }
            match self.next_at() {
                Some(at) if at <= end => {
                    self.step();
                    assert!(self.steps < 10_000_000, "step limit");
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
