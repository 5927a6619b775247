//! A simulated process: its incarnation, its clock, its locks (each the real `Lock`) and its
//! connection to the server.
//!
//! The process drives its locks as the `io` crate does: feed one input, drain the outputs, re-arm
//! one timer from `poll_timeout`. Its connection lifecycle (connect attempt, connect timeout,
//! reconnect backoff, `SessionUp`/`SessionDown` to every lock, reset) sits together in one
//! section below, behind the few calls the network and the faults make (`connected`, `refused`,
//! `session_ended`, `session_timed_out`, `db_reply`, `notification`) and the few it makes of
//! them (`client_send`, `client_close`).

use std::time::Duration;

use pgiplock_core::{
    DbError, FenceToken, Input, Lock, LockEvent, Output, Phase, Reply, RequestId, SessionId, SignalKind, SplitMix64,
    Timestamp,
};

use crate::engine::Event;
use crate::net::ClientMsg;
use crate::world::{derive_seed, World, STREAM_LOCK, STREAM_PROC};

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

pub(crate) struct Proc {
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
}

impl Proc {
    /// Process `p` before its first start, its clock rate drawn from its own stream.
    pub(crate) fn new(seed: u64, p: usize, drift: f64) -> Proc {
        let mut rng = SplitMix64::new(derive_seed(seed, STREAM_PROC, p as u64, 0));
        let drift_ppm = (drift * 1e6) as u64;
        let rate_ppm = rng.below_inclusive(2 * drift_ppm) as i64 - drift_ppm as i64;
        Proc {
            alive: false,
            stopping: false,
            incarnation: 0,
            rate_ppm,
            rng,
            locks: Vec::new(),
            conn: Conn::Down,
            next_attempt: 1,
            backoff: Duration::from_millis(100),
        }
    }

    pub(crate) fn alive(&self) -> bool {
        self.alive
    }

    /// Counts starts; an event for an older incarnation finds the process gone.
    pub(crate) fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Alive, and still incarnation `inc`.
    pub(crate) fn runs(&self, inc: u32) -> bool {
        self.alive && self.incarnation == inc
    }

    /// The session the process's connection is up on.
    pub(crate) fn session(&self) -> Option<SessionId> {
        match self.conn {
            Conn::Up { session } => Some(session),
            _ => None,
        }
    }

    /// The session lock `li` believes it works on.
    pub(crate) fn lock_session(&self, li: usize) -> Option<SessionId> {
        self.locks.get(li).and_then(|s| s.lock.state().session)
    }

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

/// Work an event leaves for the processes, run in order before the checkers look.
pub(crate) enum Work {
    Input { p: usize, lock: usize, input: Input },
    Reset { p: usize, session: SessionId },
}

impl World {
    // ----- lifecycle -----

    pub(crate) fn start_process(&mut self, p: usize) {
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
        self.engine.schedule(self.engine.now, Event::ConnectAttempt { p, inc });
    }

    /// A graceful stop: every lock gets the terminate signal; the process exits once all stopped.
    pub(crate) fn stop_process(&mut self, p: usize) {
        self.procs[p].stopping = true;
        for lock in 0..self.procs[p].locks.len() {
            self.work.push_back(Work::Input {
                p,
                lock,
                input: Input::Signal(SignalKind::Terminate),
            });
        }
    }

    /// A graceful exit after every lock stopped.
    fn exit_process(&mut self, p: usize) {
        if !self.procs[p].alive {
            return;
        }
        let session = self.end_incarnation(p);
        if let Some(session) = session {
            self.client_close(p, session);
        }
        // Sessions still connecting or left behind are closed by the OS with the process.
        let mine: Vec<SessionId> = self
            .server
            .conns
            .iter()
            .filter(|(_, c)| c.p == p && !c.client_closed)
            .map(|(s, _)| *s)
            .collect();
        for session in mine {
            self.client_close(p, session);
        }
        self.schedule_restart(p);
    }

    /// Drops the process's state (exit or crash) without closing anything; returns the session
    /// its connection was up on.
    pub(crate) fn end_incarnation(&mut self, p: usize) -> Option<SessionId> {
        let proc = &mut self.procs[p];
        proc.alive = false;
        proc.stopping = false;
        proc.locks.clear();
        let conn = std::mem::replace(&mut proc.conn, Conn::Down);
        self.alive_count -= 1;
        self.checkers.forget(p);
        match conn {
            Conn::Up { session } => Some(session),
            _ => None,
        }
    }

    pub(crate) fn schedule_restart(&mut self, p: usize) {
        if let Some(delay) = self.scenario.restart_delay {
            self.engine.schedule(self.engine.now + delay, Event::ProcStart { p });
        }
    }

    // ----- connection lifecycle (what a core session state machine would own) -----

    pub(crate) fn connect_attempt(&mut self, p: usize, inc: u32) {
        let proc = &mut self.procs[p];
        if !proc.alive || proc.incarnation != inc || proc.conn != Conn::Down {
            return;
        }
        let attempt = proc.next_attempt;
        proc.next_attempt += 1;
        proc.conn = Conn::Connecting { attempt };
        self.client_send(p, SessionId(0), ClientMsg::Connect { attempt });
        let at = self.engine.now + self.scenario.connect_timeout;
        self.engine.schedule(at, Event::ConnectTimeout { p, inc, attempt });
    }

    pub(crate) fn connect_timeout(&mut self, p: usize, inc: u32, attempt: u64) {
        let proc = &self.procs[p];
        if proc.runs(inc) && proc.conn == (Conn::Connecting { attempt }) {
            self.connection_failed(p);
        }
    }

    /// The server accepted connect `attempt` on `session`.
    pub(crate) fn connected(&mut self, p: usize, session: SessionId, attempt: u64) {
        let proc = &mut self.procs[p];
        if proc.conn == (Conn::Connecting { attempt }) {
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

    /// The server refused connect `attempt` (it is down).
    pub(crate) fn refused(&mut self, p: usize, attempt: u64) {
        if self.procs[p].conn == (Conn::Connecting { attempt }) {
            self.connection_failed(p);
        }
    }

    /// The server ended `session` (FIN or RST).
    pub(crate) fn session_ended(&mut self, p: usize, session: SessionId) {
        if self.procs[p].conn == (Conn::Up { session }) {
            self.session_down(p, session);
        }
    }

    /// The client's TCP stack gave up on `session` (`tcp_user_timeout`).
    pub(crate) fn session_timed_out(&mut self, p: usize, inc: u32, session: SessionId) {
        let proc = &self.procs[p];
        if proc.runs(inc) && proc.conn == (Conn::Up { session }) {
            self.work.push_back(Work::Reset { p, session });
        }
    }

    /// A reply to lock `lock`'s request `id`.
    pub(crate) fn db_reply(
        &mut self,
        p: usize,
        session: SessionId,
        lock: usize,
        id: RequestId,
        result: Result<Reply, DbError>,
    ) {
        if self.procs[p].conn == (Conn::Up { session }) {
            self.work.push_back(Work::Input {
                p,
                lock,
                input: Input::DbResult { id, result },
            });
        }
    }

    /// A notification, routed by channel to its lock.
    pub(crate) fn notification(&mut self, p: usize, session: SessionId, channel: String, payload: String) {
        if self.procs[p].conn == (Conn::Up { session }) {
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

    /// The client resets `session` (a lock asked, or the TCP stack gave up): close it, tell
    /// every lock, reconnect.
    fn reset_session(&mut self, p: usize, session: SessionId) {
        if self.procs[p].conn == (Conn::Up { session }) {
            self.client_close(p, session);
            self.session_down(p, session);
        }
    }

    fn session_down(&mut self, p: usize, session: SessionId) {
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
        self.engine
            .schedule(self.engine.now + delay, Event::ConnectAttempt { p, inc });
    }

    // ----- driving the locks -----

    pub(crate) fn lock_timer(&mut self, p: usize, inc: u32, lock: usize) {
        let proc = &mut self.procs[p];
        if proc.runs(inc) && proc.locks[lock].armed == Some(self.engine.now) {
            proc.locks[lock].armed = None;
            self.work.push_back(Work::Input {
                p,
                lock,
                input: Input::Tick,
            });
        }
    }

    pub(crate) fn run_work(&mut self) {
        while let Some(work) = self.work.pop_front() {
            match work {
                Work::Input { p, lock, input } => self.drive(p, lock, input),
                Work::Reset { p, session } => self.reset_session(p, session),
            }
        }
    }

    /// Feeds one input to one lock and carries out everything it asks for.
    fn drive(&mut self, p: usize, li: usize, input: Input) {
        let now = self.engine.now;
        let proc = &mut self.procs[p];
        if !proc.alive || li >= proc.locks.len() {
            return;
        }
        let local = proc.local(now);
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
        let global = deadline.map(|(local_at, _)| proc.global_at(local_at, now));
        if global != proc.locks[li].armed {
            proc.locks[li].armed = global;
            if let Some(at) = global {
                self.engine.schedule(at, Event::LockTimer { p, inc, lock: li });
            }
        }
        self.checkers.set_believer(li, p, phase.is_holder());
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
                self.trace.hash(&[100, p as u64, li as u64, token.map_or(0, |t| t.0)]);
                if let Some(FenceToken(t)) = token {
                    self.checkers.token_acquired(&mut self.metrics, p, li, *t);
                }
                if li == 0 {
                    self.metrics.acquisitions += 1;
                }
            }
            LockEvent::Lost { reason } => {
                slot.believes = false;
                self.trace.hash(&[101, p as u64, li as u64]);
                if li == 0 {
                    self.metrics.lost(reason.as_str());
                }
            }
            LockEvent::Released | LockEvent::Stopped { .. } => {
                slot.believes = false;
                self.trace.hash(&[102, p as u64, li as u64]);
            }
            _ => {}
        }
        self.trace.line(|| format!("  p{p} lock{li}: {event:?}"));
    }
}
