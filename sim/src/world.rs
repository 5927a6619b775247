//! The discrete-event engine: processes running the real [`Lock`], their network links, the
//! database model, the publisher, the fault injector, the metrics and the checkers.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

use pgiplock_core::{
    ChannelName, DbError, DbRequest, FenceToken, Input, Lock, LockConfig, LockEvent, Output, Phase, Protocol, Reply,
    RequestId, SessionId, SignalKind, SplitMix64, Timestamp,
};

use crate::db::{DbConfig, SimDb};
use crate::metrics::{Metrics, Report};
use crate::scenario::{FaultKind, FaultSpec, FaultTarget, Scenario, ScenarioError};

/// A checker found a broken invariant or bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checker {checker} failed at {at}: {message}")]
pub struct CheckFailure {
    /// Which checker (`S1`, `S2`, `S3`, `S4`, `liveness`, `steps`).
    pub checker: &'static str,
    /// Virtual time of the failure.
    pub at: Timestamp,
    /// What was seen.
    pub message: String,
}

/// Why a run did not produce a report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is not usable.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// A checker failed.
    #[error(transparent)]
    Check(#[from] CheckFailure),
}

/// Derives an independent seed for a named stream (process, incarnation, lock) from the world seed.
pub fn derive_seed(seed: u64, stream: u64, a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
    let x = r.next_u64() ^ a.wrapping_mul(0xE703_7ED1_A0B4_28DB);
    let mut r = SplitMix64::new(x);
    let y = r.next_u64() ^ b.wrapping_mul(0x8EBC_6AF0_9C88_C6E3);
    SplitMix64::new(y).next_u64()
}

const STREAM_LOCK: u64 = 1;
const STREAM_PROC: u64 = 2;
const STREAM_FAULTS: u64 = 3;
const STREAM_SERVER: u64 = 4;
const STREAM_START: u64 = 5;

#[derive(Debug, Clone)]
enum ClientMsg {
    Connect { attempt: u64 },
    Request { lock: usize, request: DbRequest },
    Close,
}

#[derive(Debug, Clone)]
enum ServerMsg {
    ConnectOk {
        attempt: u64,
    },
    Refused {
        attempt: u64,
    },
    Reply {
        lock: usize,
        id: RequestId,
        result: Result<Reply, DbError>,
    },
    Notify {
        channel: String,
        payload: String,
    },
    /// The server closed the connection (FIN), or answered a dead one (RST).
    Ended,
}

#[derive(Debug, Clone)]
enum Event {
    ProcStart {
        p: usize,
    },
    LockTimer {
        p: usize,
        inc: u32,
        lock: usize,
    },
    ConnectAttempt {
        p: usize,
        inc: u32,
    },
    ConnectTimeout {
        p: usize,
        inc: u32,
        attempt: u64,
    },
    ToServer {
        p: usize,
        epoch: u64,
        sent_at: Timestamp,
        session: SessionId,
        msg: ClientMsg,
    },
    ServerCommit {
        p: usize,
        session: SessionId,
        lock: usize,
        request: DbRequest,
    },
    ToClient {
        p: usize,
        inc: u32,
        epoch: u64,
        sent_at: Timestamp,
        session: SessionId,
        msg: ServerMsg,
    },
    ServerClose {
        session: SessionId,
    },
    ServerDeadPeer {
        session: SessionId,
        epoch: u64,
    },
    ClientUserTimeout {
        p: usize,
        inc: u32,
        session: SessionId,
    },
    Fault {
        index: usize,
    },
    Heal {
        p: usize,
        epoch: u64,
    },
    ServerUp,
    Publish,
    PublishCommit {
        id: u64,
    },
}

impl Event {
    fn tag(&self) -> u64 {
        match self {
            Event::ProcStart { .. } => 1,
            Event::LockTimer { .. } => 2,
            Event::ConnectAttempt { .. } => 3,
            Event::ConnectTimeout { .. } => 4,
            Event::ToServer { .. } => 5,
            Event::ServerCommit { .. } => 6,
            Event::ToClient { .. } => 7,
            Event::ServerClose { .. } => 8,
            Event::ServerDeadPeer { .. } => 9,
            Event::ClientUserTimeout { .. } => 10,
            Event::Fault { .. } => 11,
            Event::Heal { .. } => 12,
            Event::ServerUp => 13,
            Event::Publish => 14,
            Event::PublishCommit { .. } => 15,
        }
    }
}

/// The heap moves 24-byte entries; the events wait in a slab whose slots are reused (compact
/// and allocation-free).
struct Scheduled {
    at: Timestamp,
    seq: u64,
    slot: u32,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct LockSlot {
    lock: Lock,
    /// The global time of the one timer event armed for this lock.
    armed: Option<Timestamp>,
    /// From the lock's events: Acquired sets it, Lost/Released/Stopped clear it.
    believes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Down,
    Connecting { attempt: u64 },
    Up { session: SessionId },
}

struct Link {
    cut: bool,
    /// Incremented at every cut: a message sent in an older epoch was in flight and is lost.
    epoch: u64,
    to_server_last: Timestamp,
    to_client_last: Timestamp,
}

struct Proc {
    alive: bool,
    stopping: bool,
    incarnation: u32,
    /// Clock rate in parts per million above (or below) real time.
    rate_ppm: i64,
    rng: SplitMix64,
    locks: Vec<LockSlot>,
    conn: Conn,
    next_attempt: u64,
    backoff: Duration,
    link: Link,
}

impl Proc {
    fn local(&self, t: Timestamp) -> Timestamp {
        let g = t.as_micros() as i128;
        let l = g + g * self.rate_ppm as i128 / 1_000_000;
        Timestamp::from_micros(l.max(0) as u64)
    }

    /// The first global time at which the local clock reads at least `local`.
    fn global_at(&self, local: Timestamp, now: Timestamp) -> Timestamp {
        let l = local.as_micros() as u128;
        let rate = (1_000_000i64 + self.rate_ppm) as u128;
        let mut g = Timestamp::from_micros(u64::try_from((l * 1_000_000).div_ceil(rate)).unwrap_or(u64::MAX));
        for _ in 0..4 {
            if self.local(g) >= local {
                break;
            }
            g = Timestamp::from_micros(g.as_micros().saturating_add(1));
        }
        g.max(Timestamp::from_micros(now.as_micros() + 1))
    }
}

struct ServerConn {
    p: usize,
    inc: u32,
    client_closed: bool,
    busy_until: Timestamp,
    last_rx: Timestamp,
    retransmit_armed: bool,
}

enum Work {
    Input { p: usize, lock: usize, input: Input },
    Reset { p: usize, session: SessionId },
}

struct PendingFailover {
    kind: FaultKind,
    at: Timestamp,
    holder: (usize, SessionId),
}

/// One simulation run. Build with [`World::new`], then [`World::run`].
pub struct World {
    seed: u64,
    scenario: Scenario,
    config: LockConfig,
    channels: Vec<ChannelName>,
    now: Timestamp,
    end: Timestamp,
    warmup: Timestamp,
    publish_until: Timestamp,
    queue: BinaryHeap<Reverse<Scheduled>>,
    slab: Vec<Option<Event>>,
    free_slots: Vec<u32>,
    seq: u64,
    steps: u64,
    db: SimDb,
    server_up: bool,
    server_rng: SplitMix64,
    fault_rng: SplitMix64,
    procs: Vec<Proc>,
    server_conns: BTreeMap<SessionId, ServerConn>,
    publisher: Option<SessionId>,
    publisher_busy: Timestamp,
    next_message: u64,
    faults: Vec<FaultSpec>,
    work: VecDeque<Work>,
    /// Per channel: processes whose lock believes it holds.
    believers: Vec<BTreeSet<usize>>,
    max_token: Vec<u64>,
    lease_token: Vec<u64>,
    pending_failovers: Vec<PendingFailover>,
    last_disturbance: Timestamp,
    last_available: Timestamp,
    available: bool,
    alive_count: usize,
    check_s2: bool,
    /// A commit or a new session happened since the last S1 check.
    rows_touched: bool,
    /// Channel 0 has two believers only because one's session ended without it knowing.
    s2_gap: bool,
    liveness_bound: Duration,
    metrics: Metrics,
    trace_hash: u64,
    trace: Option<Vec<String>>,
}

impl World {
    /// A world for `scenario`, driven by `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Result<World, SimError> {
        scenario.validate()?;
        let config = scenario.lock_config();
        let channels = (0..scenario.channels)
            .map(|i| ChannelName::new(&format!("ch{i}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        let end = Timestamp::ZERO + scenario.duration;
        let warmup = Timestamp::ZERO + scenario.warmup.min(scenario.duration);
        let publish_until = end.saturating_sub(Duration::from_secs(5)).max(warmup);
        let mut fault_rng = SplitMix64::new(derive_seed(seed, STREAM_FAULTS, 0, 0));
        let mut faults = scenario.faults.clone();
        for kind in FaultKind::ALL {
            let per_hour = scenario.fault_rates.of(kind);
            if per_hour <= 0.0 {
                continue;
            }
            let mean = 3600.0 / per_hour;
            let mut t = scenario.warmup.as_secs_f64();
            // Bounded: at most 3600 faults per hour of a bounded duration.
            loop {
                t += -(1.0 - fault_rng.unit()).ln() * mean;
                if t >= publish_until.as_micros() as f64 / 1e6 {
                    break;
                }
                faults.push(FaultSpec {
                    at: Duration::from_secs_f64(t),
                    kind,
                    process: None,
                });
            }
        }
        faults.sort_by_key(|f| (f.at, f.kind));
        let mut procs = Vec::with_capacity(scenario.processes);
        for p in 0..scenario.processes {
            let mut rng = SplitMix64::new(derive_seed(seed, STREAM_PROC, p as u64, 0));
            let drift_ppm = (scenario.drift * 1e6) as u64;
            let rate_ppm = rng.below_inclusive(2 * drift_ppm) as i64 - drift_ppm as i64;
            procs.push(Proc {
                alive: false,
                stopping: false,
                incarnation: 0,
                rate_ppm,
                rng,
                locks: Vec::new(),
                conn: Conn::Down,
                next_attempt: 1,
                backoff: Duration::from_millis(100),
                link: Link {
                    cut: false,
                    epoch: 0,
                    to_server_last: Timestamp::ZERO,
                    to_client_last: Timestamp::ZERO,
                },
            });
        }
        let check_s2 = scenario.protocol == Protocol::Lease && scenario.drift < scenario.drift_bound();
        let liveness_bound = scenario.liveness_bound();
        let mut db = SimDb::new(DbConfig {
            terminate_permitted: scenario.terminate_permitted,
        });
        let (publisher, _) = db.open_session("publisher");
        let metrics = Metrics::new(scenario.processes, warmup, end);
        let mut world = World {
            seed,
            config,
            channels,
            now: Timestamp::ZERO,
            end,
            warmup,
            publish_until,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free_slots: Vec::new(),
            seq: 0,
            steps: 0,
            db,
            server_up: true,
            server_rng: SplitMix64::new(derive_seed(seed, STREAM_SERVER, 0, 0)),
            fault_rng,
            procs,
            server_conns: BTreeMap::new(),
            publisher: Some(publisher),
            publisher_busy: Timestamp::ZERO,
            next_message: 0,
            faults,
            work: VecDeque::new(),
            believers: vec![BTreeSet::new(); scenario.channels],
            max_token: vec![0; scenario.channels],
            lease_token: vec![0; scenario.channels],
            pending_failovers: Vec::new(),
            last_disturbance: Timestamp::ZERO,
            last_available: Timestamp::ZERO,
            available: false,
            alive_count: 0,
            check_s2,
            rows_touched: false,
            s2_gap: false,
            liveness_bound,
            metrics,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: None,
            scenario,
        };
        let mut start_rng = SplitMix64::new(derive_seed(seed, STREAM_START, 0, 0));
        for p in 0..world.procs.len() {
            // Processes start within the first second, in a seeded order.
            let at = Timestamp::from_micros(start_rng.below_inclusive(1_000_000));
            world.schedule(at, Event::ProcStart { p });
        }
        for index in 0..world.faults.len() {
            let at = Timestamp::ZERO + world.faults[index].at;
            world.schedule(at, Event::Fault { index });
        }
        if world.scenario.publish_rate > 0.0 {
            world.schedule(warmup, Event::Publish);
        }
        Ok(world)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Runs to the end of the scenario, checking invariants after every event.
    pub fn run(mut self) -> Result<Report, SimError> {
        self.run_inner()
    }

    /// Like [`World::run`], also returning one line per event and per lock event (long).
    pub fn run_traced(mut self) -> (Result<Report, SimError>, Vec<String>) {
        self.trace = Some(Vec::new());
        let result = self.run_inner();
        (result, self.trace.take().unwrap_or_default())
    }

    fn run_inner(&mut self) -> Result<Report, SimError> {
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at > self.end {
                break;
            }
            self.steps += 1;
            if self.steps > self.scenario.max_steps {
                return Err(self
                    .fail("steps", format!("more than {} events", self.scenario.max_steps))
                    .into());
            }
            self.metrics
                .advance(self.now, next.at, self.available, self.believers[0].len(), self.s2_gap);
            self.now = next.at;
            let tag = self
                .slab
                .get(next.slot as usize)
                .and_then(Option::as_ref)
                .map_or(0, Event::tag);
            self.hash(&[next.at.as_micros(), tag]);
            if let Some(trace) = self.trace.as_mut() {
                if let Some(Some(event)) = self.slab.get(next.slot as usize) {
                    trace.push(format!("{:?} {:?}", next.at, event));
                }
            }
            let Some(event) = self.slab.get_mut(next.slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free_slots.push(next.slot);
            self.handle(event);
            self.run_work();
            self.check()?;
        }
        self.metrics
            .advance(self.now, self.end, self.available, self.believers[0].len(), self.s2_gap);
        self.now = self.end;
        let unresolved = self.pending_failovers.len();
        let hash = self.trace_hash;
        Ok(self
            .metrics
            .report(&self.scenario, self.seed, self.steps, unresolved, hash))
    }

    // ----- engine -----

    fn schedule(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slab.push(Some(event));
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            slot,
        }));
    }

    fn hash(&mut self, words: &[u64]) {
        for w in words {
            for b in w.to_le_bytes() {
                self.trace_hash ^= u64::from(b);
                self.trace_hash = self.trace_hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }

    fn fail(&self, checker: &'static str, message: String) -> CheckFailure {
        CheckFailure {
            checker,
            at: self.now,
            message,
        }
    }

    fn query_latency(&mut self) -> Duration {
        let s = &self.scenario;
        let min = s.query_min.as_micros() as f64;
        let extra = (s.query_mean.as_micros() as f64 - min).max(0.0);
        let draw = -(1.0 - self.server_rng.unit()).ln() * extra;
        let us = (min + draw).min(s.query_max.as_micros() as f64);
        Duration::from_micros(us as u64)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ProcStart { p } => self.start_process(p),
            Event::LockTimer { p, inc, lock } => {
                let proc = &mut self.procs[p];
                if proc.alive && proc.incarnation == inc && proc.locks[lock].armed == Some(self.now) {
                    proc.locks[lock].armed = None;
                    self.work.push_back(Work::Input {
                        p,
                        lock,
                        input: Input::Tick,
                    });
                }
            }
            Event::ConnectAttempt { p, inc } => self.connect_attempt(p, inc),
            Event::ConnectTimeout { p, inc, attempt } => {
                let proc = &self.procs[p];
                if proc.alive && proc.incarnation == inc && proc.conn == (Conn::Connecting { attempt }) {
                    self.connection_failed(p);
                }
            }
            Event::ToServer {
                p,
                epoch,
                sent_at,
                session,
                msg,
            } => self.server_recv(p, epoch, sent_at, session, msg),
            Event::ServerCommit {
                p,
                session,
                lock,
                request,
            } => self.commit(p, session, lock, request),
            Event::ToClient {
                p,
                inc,
                epoch,
                sent_at,
                session,
                msg,
            } => self.client_recv(p, inc, epoch, sent_at, session, msg),
            Event::ServerClose { session } => {
                self.db.close_session(session);
                self.server_conns.remove(&session);
            }
            Event::ServerDeadPeer { session, epoch } => {
                let Some(conn) = self.server_conns.get(&session) else {
                    return;
                };
                let link = &self.procs[conn.p].link;
                if link.cut && link.epoch == epoch {
                    self.db.close_session(session);
                    self.server_conns.remove(&session);
                    self.metrics.dead_peer_drops += 1;
                }
            }
            Event::ClientUserTimeout { p, inc, session } => {
                let proc = &self.procs[p];
                if proc.alive && proc.incarnation == inc && proc.link.cut && proc.conn == (Conn::Up { session }) {
                    self.work.push_back(Work::Reset { p, session });
                }
            }
            Event::Fault { index } => self.fault(index),
            Event::Heal { p, epoch } => self.heal(p, epoch),
            Event::ServerUp => {
                self.server_up = true;
                self.last_disturbance = self.now;
                let (publisher, _) = self.db.open_session("publisher");
                self.publisher = Some(publisher);
            }
            Event::Publish => self.publish(),
            Event::PublishCommit { id } => {
                let Some(session) = self.publisher else { return };
                let channel = self.channels[0].as_str().to_owned();
                self.db.advance_to(self.now);
                if self.db.notify(session, &channel, &id.to_string()).is_ok() {
                    self.metrics.published(id, self.now);
                    self.fan_out();
                }
            }
        }
    }

    fn run_work(&mut self) {
        while let Some(work) = self.work.pop_front() {
            match work {
                Work::Input { p, lock, input } => self.drive(p, lock, input),
                Work::Reset { p, session } => {
                    if self.procs[p].conn == (Conn::Up { session }) {
                        self.client_close(p, session);
                        self.procs[p].conn = Conn::Down;
                        for lock in 0..self.procs[p].locks.len() {
                            self.work.push_back(Work::Input {
                                p,
                                lock,
                                input: Input::SessionDown(session),
                            });
                        }
                        self.schedule_reconnect(p);
                    }
                }
            }
        }
    }

    /// Feeds one input to one lock and carries out everything it asks for.
    fn drive(&mut self, p: usize, li: usize, input: Input) {
        let proc = &mut self.procs[p];
        if !proc.alive || li >= proc.locks.len() {
            return;
        }
        let local = proc.local(self.now);
        let slot = &mut proc.locks[li];
        slot.lock.handle_input(local, input);
        let mut outputs = Vec::new();
        while let Some(output) = slot.lock.poll_output() {
            outputs.push(output);
        }
        let deadline = slot.lock.poll_timeout();
        let phase = slot.lock.state().phase;
        let inc = proc.incarnation;
        for output in outputs {
            self.output(p, li, output);
        }
        // One timer per lock, re-armed from poll_timeout after every input.
        let proc = &mut self.procs[p];
        let global = deadline.map(|(local_at, _)| proc.global_at(local_at, self.now));
        if global != proc.locks[li].armed {
            proc.locks[li].armed = global;
            if let Some(at) = global {
                self.schedule(at, Event::LockTimer { p, inc, lock: li });
            }
        }
        if phase.is_holder() {
            self.believers[li].insert(p);
        } else {
            self.believers[li].remove(&p);
        }
        let proc = &self.procs[p];
        if proc.stopping && proc.locks.iter().all(|s| s.lock.state().phase == Phase::Stopped) {
            self.exit_process(p);
        }
    }

    fn output(&mut self, p: usize, li: usize, output: Output) {
        match output {
            Output::Request(request) => {
                let session = request.session;
                if self.procs[p].conn == (Conn::Up { session }) {
                    self.client_send(p, session, ClientMsg::Request { lock: li, request });
                }
            }
            Output::Event(event) => self.lock_event(p, li, event),
            Output::Deliver { payload } => {
                if !self.procs[p].locks[li].believes {
                    self.metrics.s3_violations += 1;
                }
                if li == 0 {
                    if let Ok(id) = payload.parse::<u64>() {
                        self.metrics.delivered(id, p);
                    }
                }
            }
            Output::ResetSession(session) => self.work.push_front(Work::Reset { p, session }),
            _ => {}
        }
    }

    fn lock_event(&mut self, p: usize, li: usize, event: LockEvent) {
        let slot = &mut self.procs[p].locks[li];
        match &event {
            LockEvent::Acquired { token } => {
                slot.believes = true;
                self.hash(&[100, p as u64, li as u64, token.map_or(0, |t| t.0)]);
                if let Some(FenceToken(t)) = token {
                    if *t <= self.max_token[li] {
                        self.metrics.s4_violations.push(format!(
                            "token {t} acquired after {} on channel {li} by process {p}",
                            self.max_token[li]
                        ));
                    }
                    self.max_token[li] = self.max_token[li].max(*t);
                }
                if li == 0 {
                    self.metrics.acquisitions += 1;
                }
            }
            LockEvent::Lost { reason } => {
                slot.believes = false;
                self.hash(&[101, p as u64, li as u64]);
                if li == 0 {
                    self.metrics.lost(reason.as_str());
                }
            }
            LockEvent::Released | LockEvent::Stopped { .. } => {
                slot.believes = false;
                self.hash(&[102, p as u64, li as u64]);
            }
            _ => {}
        }
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("  p{p} lock{li}: {event:?}"));
        }
    }

    // ----- processes -----

    fn start_process(&mut self, p: usize) {
        let seed = self.seed;
        let proc = &mut self.procs[p];
        if proc.alive {
            return;
        }
        proc.incarnation += 1;
        proc.alive = true;
        proc.stopping = false;
        proc.conn = Conn::Down;
        proc.backoff = Duration::from_millis(100);
        let inc = proc.incarnation;
        proc.locks = self
            .channels
            .iter()
            .enumerate()
            .map(|(li, ch)| LockSlot {
                lock: Lock::new(
                    ch.clone(),
                    self.config.clone(),
                    derive_seed(seed, STREAM_LOCK, p as u64, (u64::from(inc) << 8) | li as u64),
                ),
                armed: None,
                believes: false,
            })
            .collect();
        self.alive_count += 1;
        for lock in 0..self.channels.len() {
            self.work.push_back(Work::Input {
                p,
                lock,
                input: Input::Start,
            });
        }
        self.schedule(self.now, Event::ConnectAttempt { p, inc });
    }

    /// A graceful exit after every lock stopped, or a crash.
    fn exit_process(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        if !proc.alive {
            return;
        }
        proc.alive = false;
        proc.stopping = false;
        proc.locks.clear();
        let conn = std::mem::replace(&mut proc.conn, Conn::Down);
        self.alive_count -= 1;
        for set in &mut self.believers {
            set.remove(&p);
        }
        if let Conn::Up { session } = conn {
            self.client_close(p, session);
        }
        // Sessions still connecting or left behind are closed by the OS with the process.
        let mine: Vec<SessionId> = self
            .server_conns
            .iter()
            .filter(|(_, c)| c.p == p && !c.client_closed)
            .map(|(s, _)| *s)
            .collect();
        for session in mine {
            self.client_close(p, session);
        }
        if let Some(delay) = self.scenario.restart_delay {
            self.schedule(self.now + delay, Event::ProcStart { p });
        }
    }

    fn connect_attempt(&mut self, p: usize, inc: u32) {
        let proc = &mut self.procs[p];
        if !proc.alive || proc.incarnation != inc || proc.conn != Conn::Down {
            return;
        }
        let attempt = proc.next_attempt;
        proc.next_attempt += 1;
        proc.conn = Conn::Connecting { attempt };
        self.client_send(p, SessionId(0), ClientMsg::Connect { attempt });
        let at = self.now + self.scenario.connect_timeout;
        self.schedule(at, Event::ConnectTimeout { p, inc, attempt });
    }

    fn connection_failed(&mut self, p: usize) {
        self.procs[p].conn = Conn::Down;
        self.schedule_reconnect(p);
    }

    /// Reconnect backoff: 100 ms doubling to 5 s, each delay drawn in `[d/2, d]`.
    fn schedule_reconnect(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        let d = proc.backoff.as_micros() as u64;
        let delay = Duration::from_micros(d / 2 + proc.rng.below_inclusive(d / 2));
        proc.backoff = (proc.backoff * 2).min(Duration::from_secs(5));
        let inc = proc.incarnation;
        self.schedule(self.now + delay, Event::ConnectAttempt { p, inc });
    }

    // ----- network -----

    fn client_send(&mut self, p: usize, session: SessionId, msg: ClientMsg) {
        let now = self.now;
        let one_way = self.scenario.net_delay;
        let proc = &mut self.procs[p];
        if proc.link.cut {
            self.client_lost(p, session, &msg, now);
            return;
        }
        let at = (now + one_way).max(proc.link.to_server_last);
        proc.link.to_server_last = at;
        let epoch = proc.link.epoch;
        self.schedule(
            at,
            Event::ToServer {
                p,
                epoch,
                sent_at: now,
                session,
                msg,
            },
        );
    }

    /// A client message that the cut link swallowed.
    fn client_lost(&mut self, p: usize, session: SessionId, msg: &ClientMsg, sent_at: Timestamp) {
        match msg {
            ClientMsg::Request { .. } => {
                let inc = self.procs[p].incarnation;
                let at = sent_at + self.scenario.client_user_timeout;
                self.schedule(at.max(self.now), Event::ClientUserTimeout { p, inc, session });
            }
            ClientMsg::Close => {
                if let Some(c) = self.server_conns.get_mut(&session) {
                    c.client_closed = true;
                }
            }
            ClientMsg::Connect { .. } => {}
        }
    }

    /// The client side closes a session (reset, exit): a FIN if the link passes, else a zombie.
    fn client_close(&mut self, p: usize, session: SessionId) {
        if let Some(c) = self.server_conns.get_mut(&session) {
            c.client_closed = true;
        }
        self.client_send(p, session, ClientMsg::Close);
    }

    fn server_recv(&mut self, p: usize, epoch: u64, sent_at: Timestamp, session: SessionId, msg: ClientMsg) {
        if self.procs[p].link.epoch != epoch {
            self.client_lost(p, session, &msg, sent_at);
            return;
        }
        if let Some(c) = self.server_conns.get_mut(&session) {
            c.last_rx = self.now;
        }
        match msg {
            ClientMsg::Connect { attempt } => {
                let inc = self.procs[p].incarnation;
                if !self.server_up {
                    self.server_send_to(p, inc, SessionId(0), ServerMsg::Refused { attempt });
                    return;
                }
                let app = format!("p{p}.{inc}.{attempt}");
                let (session, _pid) = self.db.open_session(&app);
                self.rows_touched = true;
                for ch in &self.channels {
                    let _ = self.db.listen(session, ch.as_str());
                    let _ = self.db.listen(session, ch.lock_channel());
                }
                // As the io crate prepares a session: one schema bootstrap batch, then LISTEN on
                // the data and lock channels of every lock.
                self.metrics.statements(p, 1 + 2 * self.channels.len() as u64, self.now);
                self.server_conns.insert(
                    session,
                    ServerConn {
                        p,
                        inc,
                        client_closed: false,
                        busy_until: self.now,
                        last_rx: self.now,
                        retransmit_armed: false,
                    },
                );
                self.server_send(session, ServerMsg::ConnectOk { attempt });
            }
            ClientMsg::Request { lock, request } => {
                if !self.db.is_alive(session) {
                    // The backend is gone: the server's TCP stack answers with a reset.
                    let inc = self.procs[p].incarnation;
                    self.server_send_to(p, inc, session, ServerMsg::Ended);
                    return;
                }
                let latency = self.query_latency();
                let Some(c) = self.server_conns.get_mut(&session) else {
                    return;
                };
                let at = c.busy_until.max(self.now) + latency;
                c.busy_until = at;
                self.schedule(
                    at,
                    Event::ServerCommit {
                        p,
                        session,
                        lock,
                        request,
                    },
                );
            }
            ClientMsg::Close => {
                self.db.close_session(session);
                self.server_conns.remove(&session);
            }
        }
    }

    fn commit(&mut self, p: usize, session: SessionId, li: usize, request: DbRequest) {
        if !self.db.is_alive(session) {
            return;
        }
        self.rows_touched = true;
        self.db.advance_to(self.now);
        let channel = self.channels[li].clone();
        let result = self.db.execute(
            session,
            self.scenario.protocol,
            &channel,
            self.config.lease_ttl,
            &request.op,
        );
        self.metrics.statements(p, 1, self.now);
        self.hash(&[
            200,
            p as u64,
            li as u64,
            u64::from(matches!(result, Ok(Reply::Acquire(ref r)) if r.acquired)),
        ]);
        if let Some(row) = self.db.lease_row(self.channels[li].as_str()) {
            if row.token < self.lease_token[li] {
                self.metrics.s4_violations.push(format!(
                    "lease row token went back from {} to {}",
                    self.lease_token[li], row.token
                ));
            }
            self.lease_token[li] = row.token;
        }
        self.server_send(
            session,
            ServerMsg::Reply {
                lock: li,
                id: request.id,
                result,
            },
        );
        self.fan_out();
        for ended in self.db.take_terminated() {
            self.metrics.stale_terminations += 1;
            self.server_send(ended, ServerMsg::Ended);
            self.server_conns.remove(&ended);
        }
    }

    /// Ships every notification committed just now to its listeners, in commit order.
    fn fan_out(&mut self) {
        for session in self.db.take_notified() {
            let notes = self.db.take_notifications(session);
            if !self.server_conns.contains_key(&session) {
                continue; // the publisher does not listen; nobody else lacks a connection
            }
            for n in notes {
                self.server_send(
                    session,
                    ServerMsg::Notify {
                        channel: n.channel,
                        payload: n.payload,
                    },
                );
            }
        }
    }

    fn server_send(&mut self, session: SessionId, msg: ServerMsg) {
        let Some(c) = self.server_conns.get(&session) else {
            return;
        };
        let (p, inc, client_closed) = (c.p, c.inc, c.client_closed);
        let link_cut = self.procs[p].link.cut;
        if client_closed && !link_cut {
            // The client's socket is gone: its stack answers with a reset.
            let at = self.now + self.scenario.net_delay * 2;
            self.schedule(at, Event::ServerClose { session });
            return;
        }
        if link_cut {
            self.server_lost(session, self.now);
            return;
        }
        self.server_send_to(p, inc, session, msg);
    }

    fn server_send_to(&mut self, p: usize, inc: u32, session: SessionId, msg: ServerMsg) {
        let now = self.now;
        let link = &mut self.procs[p].link;
        if link.cut {
            return;
        }
        let at = (now + self.scenario.net_delay).max(link.to_client_last);
        link.to_client_last = at;
        let epoch = link.epoch;
        self.schedule(
            at,
            Event::ToClient {
                p,
                inc,
                epoch,
                sent_at: now,
                session,
                msg,
            },
        );
    }

    /// Server data that the cut link swallowed: retransmissions start, and give up after
    /// `server_retransmit_detect`.
    fn server_lost(&mut self, session: SessionId, sent_at: Timestamp) {
        let Some(c) = self.server_conns.get_mut(&session) else {
            return;
        };
        if c.retransmit_armed {
            return;
        }
        c.retransmit_armed = true;
        let epoch = self.procs[c.p].link.epoch;
        let at = (sent_at + self.scenario.server_retransmit_detect).max(self.now);
        self.schedule(at, Event::ServerDeadPeer { session, epoch });
    }

    fn client_recv(&mut self, p: usize, inc: u32, epoch: u64, sent_at: Timestamp, session: SessionId, msg: ServerMsg) {
        if self.procs[p].link.epoch != epoch {
            self.server_lost(session, sent_at);
            return;
        }
        let proc = &self.procs[p];
        if !proc.alive || proc.incarnation != inc {
            // The socket died with its process: the client's stack answers with a reset.
            if let Some(c) = self.server_conns.get_mut(&session) {
                c.client_closed = true;
                let at = self.now + self.scenario.net_delay;
                self.schedule(at, Event::ServerClose { session });
            }
            return;
        }
        match msg {
            ServerMsg::ConnectOk { attempt } => {
                if proc.conn == (Conn::Connecting { attempt }) {
                    let proc = &mut self.procs[p];
                    proc.conn = Conn::Up { session };
                    proc.backoff = Duration::from_millis(100);
                    for lock in 0..proc.locks.len() {
                        self.work.push_back(Work::Input {
                            p,
                            lock,
                            input: Input::SessionUp(session),
                        });
                    }
                } else {
                    self.client_close(p, session);
                }
            }
            ServerMsg::Refused { attempt } => {
                if proc.conn == (Conn::Connecting { attempt }) {
                    self.connection_failed(p);
                }
            }
            ServerMsg::Reply { lock, id, result } => {
                if proc.conn == (Conn::Up { session }) {
                    self.work.push_back(Work::Input {
                        p,
                        lock,
                        input: Input::DbResult { id, result },
                    });
                }
            }
            ServerMsg::Notify { channel, payload } => {
                if proc.conn == (Conn::Up { session }) {
                    let lock = self
                        .channels
                        .iter()
                        .position(|c| c.as_str() == channel || c.lock_channel() == channel);
                    if let Some(lock) = lock {
                        self.work.push_back(Work::Input {
                            p,
                            lock,
                            input: Input::Notification {
                                session,
                                channel,
                                payload,
                            },
                        });
                    }
                }
            }
            ServerMsg::Ended => {
                if proc.conn == (Conn::Up { session }) {
                    self.procs[p].conn = Conn::Down;
                    for lock in 0..self.procs[p].locks.len() {
                        self.work.push_back(Work::Input {
                            p,
                            lock,
                            input: Input::SessionDown(session),
                        });
                    }
                    self.schedule_reconnect(p);
                }
            }
        }
    }

    fn publish(&mut self) {
        if self.now >= self.publish_until {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / self.scenario.publish_rate);
        self.schedule(self.now + period, Event::Publish);
        if self.server_up && self.publisher.is_some() {
            let latency = self.query_latency();
            let at = self.publisher_busy.max(self.now + self.scenario.net_delay) + latency;
            self.publisher_busy = at;
            let id = self.next_message;
            self.next_message += 1;
            self.schedule(at, Event::PublishCommit { id });
        }
    }

    // ----- faults -----

    fn holder(&self) -> Option<usize> {
        self.believers[0].iter().copied().find(|p| self.procs[*p].alive)
    }

    fn fault(&mut self, index: usize) {
        let spec = self.faults[index].clone();
        let target = match (spec.process, self.scenario.fault_target) {
            (Some(p), _) => Some(p),
            (None, FaultTarget::Holder) if spec.kind != FaultKind::ServerRestart => {
                self.holder().or_else(|| self.random_alive())
            }
            (None, _) => self.random_alive(),
        };
        // A failover is measured when the fault hits the process that serves the channel.
        let serving = self.serving();
        let hits_server = match spec.kind {
            FaultKind::ServerRestart => serving.is_some(),
            _ => serving.is_some_and(|(sp, _)| Some(sp) == target),
        };
        if let (true, Some(holder)) = (hits_server, serving) {
            if self.now >= self.warmup {
                self.pending_failovers.push(PendingFailover {
                    kind: spec.kind,
                    at: self.now,
                    holder,
                });
            }
        }
        self.last_disturbance = self.now;
        self.metrics.fault(spec.kind);
        self.hash(&[300, spec.kind as u64, target.map_or(u64::MAX, |p| p as u64)]);
        if let Some(trace) = self.trace.as_mut() {
            trace.push(format!("  fault {:?} on {target:?}", spec.kind));
        }
        match spec.kind {
            FaultKind::ServerRestart => self.server_restart(),
            kind => {
                let Some(p) = target else { return };
                if !self.procs[p].alive {
                    return;
                }
                match kind {
                    FaultKind::Stop => {
                        self.procs[p].stopping = true;
                        for lock in 0..self.procs[p].locks.len() {
                            self.work.push_back(Work::Input {
                                p,
                                lock,
                                input: Input::Signal(SignalKind::Terminate),
                            });
                        }
                    }
                    FaultKind::Crash => self.crash(p),
                    FaultKind::Cut => self.cut(p),
                    FaultKind::Terminate => {
                        if let Conn::Up { session } = self.procs[p].conn {
                            if let Some(pid) = self.db.pid(session) {
                                self.server_send(session, ServerMsg::Ended);
                                self.db.terminate_backend(pid);
                                self.server_conns.remove(&session);
                            }
                        }
                    }
                    FaultKind::ServerRestart => {}
                }
            }
        }
    }

    fn random_alive(&mut self) -> Option<usize> {
        let alive: Vec<usize> = (0..self.procs.len()).filter(|p| self.procs[*p].alive).collect();
        if alive.is_empty() {
            return None;
        }
        let i = self.fault_rng.below_inclusive(alive.len() as u64 - 1) as usize;
        Some(alive[i])
    }

    fn crash(&mut self, p: usize) {
        // The OS closes the sockets: the server sees the end shortly after, unless the link is cut.
        let sessions: Vec<SessionId> = self
            .server_conns
            .iter()
            .filter(|(_, c)| c.p == p)
            .map(|(s, _)| *s)
            .collect();
        let cut = self.procs[p].link.cut;
        for session in sessions {
            if let Some(c) = self.server_conns.get_mut(&session) {
                c.client_closed = true;
            }
            if !cut {
                let at = self.now + self.scenario.net_delay + self.scenario.crash_close_delay;
                self.schedule(at, Event::ServerClose { session });
            }
        }
        let proc = &mut self.procs[p];
        proc.conn = Conn::Down;
        proc.stopping = false;
        // Crash: no graceful close of anything.
        proc.alive = false;
        proc.locks.clear();
        self.alive_count -= 1;
        for set in &mut self.believers {
            set.remove(&p);
        }
        if let Some(delay) = self.scenario.restart_delay {
            self.schedule(self.now + delay, Event::ProcStart { p });
        }
    }

    fn cut(&mut self, p: usize) {
        let link = &mut self.procs[p].link;
        if link.cut {
            return;
        }
        link.cut = true;
        link.epoch += 1;
        let epoch = link.epoch;
        let keepalive = self.scenario.server_keepalive_detect;
        let sessions: Vec<(SessionId, Timestamp)> = self
            .server_conns
            .iter()
            .filter(|(_, c)| c.p == p)
            .map(|(s, c)| (*s, c.last_rx))
            .collect();
        for (session, last_rx) in sessions {
            // Idle keepalive probes go unanswered from the last traffic on.
            self.schedule(
                (last_rx + keepalive).max(self.now),
                Event::ServerDeadPeer { session, epoch },
            );
        }
        let heal = self.now + self.scenario.cut_duration;
        self.schedule(heal, Event::Heal { p, epoch });
    }

    fn heal(&mut self, p: usize, epoch: u64) {
        let link = &mut self.procs[p].link;
        if !link.cut || link.epoch != epoch {
            return;
        }
        link.cut = false;
        self.last_disturbance = self.now;
        let keepalive = self.scenario.server_keepalive_detect;
        let rtt = self.scenario.net_delay * 2;
        let sessions: Vec<(SessionId, bool, Timestamp)> = self
            .server_conns
            .iter_mut()
            .filter(|(_, c)| c.p == p)
            .map(|(s, c)| {
                c.retransmit_armed = false;
                (*s, c.client_closed, c.last_rx)
            })
            .collect();
        for (session, client_closed, last_rx) in sessions {
            if client_closed {
                // The next keepalive probe (or any data) meets the client's reset.
                self.schedule(
                    (last_rx + keepalive).max(self.now + rtt),
                    Event::ServerClose { session },
                );
            }
        }
    }

    fn server_restart(&mut self) {
        let sessions: Vec<SessionId> = self.server_conns.keys().copied().collect();
        for session in sessions {
            self.server_send(session, ServerMsg::Ended);
            self.db.close_session(session);
        }
        self.server_conns.clear();
        if let Some(publisher) = self.publisher.take() {
            self.db.close_session(publisher);
        }
        self.server_up = false;
        self.schedule(self.now + self.scenario.server_down, Event::ServerUp);
    }

    // ----- checkers -----

    /// The process (and session) that holds the data channel and can receive its notifications.
    fn serving(&self) -> Option<(usize, SessionId)> {
        if !self.server_up {
            return None;
        }
        self.believers[0].iter().find_map(|&p| {
            let proc = &self.procs[p];
            let session = proc.locks.first()?.lock.state().session?;
            let ok = proc.alive
                && !proc.link.cut
                && proc.conn == (Conn::Up { session })
                && self.server_conns.get(&session).is_some_and(|c| !c.client_closed)
                && self.db.is_alive(session);
            ok.then_some((p, session))
        })
    }

    fn check(&mut self) -> Result<(), CheckFailure> {
        let serving = self.serving();
        self.available = serving.is_some();
        if let Some(holder) = serving {
            self.last_available = self.now;
            let now = self.now;
            let mut resolved = Vec::new();
            self.pending_failovers.retain(|f| {
                if f.holder != holder {
                    resolved.push((f.kind, now.saturating_duration_since(f.at)));
                    false
                } else {
                    true
                }
            });
            for (kind, latency) in resolved {
                self.metrics.failover(kind, latency);
            }
        }
        if !self.metrics.s4_violations.is_empty() {
            return Err(self.fail("S4", self.metrics.s4_violations[0].clone()));
        }
        if self.metrics.s3_violations > 0 {
            return Err(self.fail("S3", "a lock delivered a message while not holding".to_owned()));
        }
        self.s2_gap = false;
        for li in 0..self.believers.len() {
            if self.believers[li].len() < 2 {
                continue;
            }
            // A believer whose session the server already ended (terminated or dropped as a
            // dead peer while it was partitioned) cannot know it yet: the design lets a standby
            // take over at once, so S2 then rests on that holder's self-fencing alone.
            let informed = self.believers[li]
                .iter()
                .filter(|&&p| {
                    let proc = &self.procs[p];
                    let session = proc.locks.get(li).and_then(|s| s.lock.state().session);
                    // Uninformed: the client still has the connection up, the server ended it.
                    let uninformed =
                        session.is_some_and(|s| !self.db.is_alive(s) && proc.conn == (Conn::Up { session: s }));
                    !uninformed
                })
                .count();
            let gap = informed <= 1;
            if li == 0 {
                self.s2_gap = gap;
            }
            if self.check_s2 && (!gap || self.scenario.strict_s2) {
                let set = &self.believers[li];
                let why = if gap {
                    "; all but one have a session the server ended without telling them"
                } else {
                    ""
                };
                return Err(self.fail(
                    "S2",
                    format!("processes {set:?} all believe they hold channel {li} (Lease, drift within bound){why}"),
                ));
            }
        }
        // S1: each channel's row names one owner, and at most one live session is that owner.
        // Rows change only at commits and owners appear only with new sessions: check then.
        if std::mem::take(&mut self.rows_touched) {
            for channel in &self.channels {
                let owners = self.db.owner_sessions(self.scenario.protocol, channel);
                if owners > 1 {
                    return Err(self.fail("S1", format!("{owners} live sessions own channel {channel}")));
                }
            }
        }
        let outage = self
            .now
            .saturating_duration_since(self.last_disturbance.max(self.last_available));
        if !self.available && self.alive_count > 0 && self.server_up && outage > self.liveness_bound {
            // Only a process that can reach the server can be asked to hold (checked on this
            // rare path only: it scans the fleet).
            if !self.procs.iter().any(|p| p.alive && !p.link.cut) {
                self.last_disturbance = self.now;
                return Ok(());
            }
            return Err(self.fail(
                "liveness",
                format!(
                    "no live process held the lock for {outage:?} after the last fault (bound {:?})",
                    self.liveness_bound
                ),
            ));
        }
        Ok(())
    }
}

/// Runs `scenario` with `seed` to completion.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Report, SimError> {
    World::new(scenario.clone(), seed)?.run()
}
