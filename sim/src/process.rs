//! A simulated process: its incarnation, its clock, and its one `pgiplock_core::Session` (which
//! owns the connection's lifecycle and every lock).
//!
//! The process drives its session exactly as the `io` crate's driver does: feed one input at
//! the process's local time, drain every output and carry it out (open a connection, run an
//! operation, close), re-arm one timer from `poll_timeout`. The network and the server answer
//! through the few calls below (`connected`, `refused`, `session_ended`, `session_timed_out`,
//! `db_reply`, `notification`); the process talks to them through `client_send` and
//! `client_close`. Every decision — when to connect, how long to wait, when to reset, what to
//! run — is the core's.

use std::time::Duration;

use pgiplock_core::{
    CallId, ChannelName, ConnPhase, FenceToken, LockCall, LockEvent, LockKey, LostReason, OpId, OpReply, Protocol,
    SchemaName, Session, SessionConfig, SessionEvent, SessionId, SessionInput, SessionOp, SessionOutput, SplitMix64,
    Timestamp, WatchFailure,
};

use crate::engine::Event;
use crate::net::ClientMsg;
use crate::scenario::Mutant;
use crate::world::{derive_seed, Observed, World, STREAM_LOCK, STREAM_PROC, STREAM_SESSION};

/// One lock of the process, as the application sees it.
#[derive(Clone, Default)]
struct LockView {
    /// From the lock's events: Acquired sets it, Lost/Drained/Stopped clear it.
    believes: bool,
    /// The schema generation of the server when the current term's acquisition committed.
    term_generation: u64,
    /// Local send time of the lock's newest request (its `request_timeout` counts from here).
    request_sent: Option<Timestamp>,
    /// The current term followed a graceful release whose drain marker committed then: if the
    /// process listened since before, it must replay nothing (D2).
    after_release: Option<Timestamp>,
    /// The current term reported a `Gap` (its log lost what it needed: a replay is allowed).
    gap: bool,
    /// The lock's `ignored_markers` as last read.
    ignored_markers: u64,
    /// `Mutant::SkipFence`: the lock fenced itself and the process ignored it.
    zombie: bool,
    /// What the believers checker was last told of this lock (it starts with nobody).
    in_checker: bool,
}

pub(crate) struct Proc {
    alive: bool,
    stopping: bool,
    /// Its locks stood down (a `StandDown` action, until `Compete` or a restart): it does not
    /// compete, so liveness does not count on it.
    pub(crate) stood_down: bool,
    incarnation: u32,
    /// Clock rate in parts per million above (or below) real time.
    rate_ppm: i64,
    /// The core session of the current incarnation (`None` while not running).
    session: Option<Session>,
    /// Per lock, indexed by `LockKey`.
    locks: Vec<LockView>,
    /// The global time of the one timer event armed for the session.
    armed: Option<Timestamp>,
    /// The connection attempt in progress (the core's id).
    connecting: Option<SessionId>,
    /// The connection that is up: the core's id and the server's.
    conn: Option<(SessionId, SessionId)>,
    /// The crash watch's connection attempt in progress (the core's id).
    watch_connecting: Option<SessionId>,
    /// The crash watch's connection that is up: the core's id and the server's.
    watch_conn: Option<(SessionId, SessionId)>,
    next_call: u64,
    /// The server connection that LISTENs the data channel, and since when (D2).
    pub(crate) listening_since: Option<(SessionId, Timestamp)>,
    /// The schema generation of the reply being fed (for the terms it begins).
    reply_generation: Option<u64>,
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
            stood_down: false,
            incarnation: 0,
            rate_ppm,
            session: None,
            locks: Vec::new(),
            armed: None,
            connecting: None,
            watch_connecting: None,
            watch_conn: None,
            conn: None,
            next_call: 1,
            listening_since: None,
            reply_generation: None,
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

    /// The core session, while the process runs.
    pub(crate) fn core(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// The server's id of the connection the process's session is up on
    /// (`Session::current()`).
    pub(crate) fn session(&self) -> Option<SessionId> {
        let current = self.session.as_ref()?.current()?;
        self.conn.filter(|(core, _)| *core == current).map(|(_, server)| server)
    }

    /// The server's id of the connection lock `li` believes it works on, if that is the
    /// process's current connection (an older one has no server id any more).
    pub(crate) fn lock_session(&self, li: usize) -> Option<SessionId> {
        let lock = self.session.as_ref()?.lock(LockKey(li as u64))?;
        let core = lock.session()?;
        self.conn.filter(|(c, _)| *c == core).map(|(_, server)| server)
    }

    /// The schema generation lock `li`'s current term began in.
    pub(crate) fn term_generation(&self, li: usize) -> u64 {
        self.locks.get(li).map_or(0, |l| l.term_generation)
    }

    /// Local send time of lock `li`'s newest request.
    pub(crate) fn request_sent(&self, li: usize) -> Option<Timestamp> {
        self.locks.get(li).and_then(|l| l.request_sent)
    }

    pub(crate) fn local(&self, t: Timestamp) -> Timestamp {
        if self.rate_ppm == 0 {
            return t;
        }
        // In 64 bits while the product fits (about 200 virtual days at the largest drift).
        let g = t.as_micros();
        let fast = i64::try_from(g).ok().and_then(|g| {
            g.checked_mul(self.rate_ppm)
                .and_then(|skew| g.checked_add(skew / 1_000_000))
        });
        let l = match fast {
            Some(l) => i128::from(l),
            None => {
                let g = i128::from(g);
                g + g * i128::from(self.rate_ppm) / 1_000_000
            }
        };
        Timestamp::from_micros(u64::try_from(l.max(0)).unwrap_or(u64::MAX))
    }

    /// The first global time at which the local clock reads at least `local`.
    pub(crate) fn first_global(&self, local: Timestamp) -> Timestamp {
        if self.rate_ppm == 0 {
            return local;
        }
        let l = local.as_micros();
        let rate = (1_000_000i64 + self.rate_ppm) as u64;
        let estimate = match l.checked_mul(1_000_000) {
            Some(scaled) => scaled.div_ceil(rate),
            None => u64::try_from((u128::from(l) * 1_000_000).div_ceil(u128::from(rate))).unwrap_or(u64::MAX),
        };
        let mut g = Timestamp::from_micros(estimate);
        for _ in 0..4 {
            if self.local(g) >= local {
                break;
            }
            g = Timestamp::from_micros(g.as_micros().saturating_add(1));
        }
        g
    }

    /// [`Proc::first_global`], but strictly after `now`.
    fn global_at(&self, local: Timestamp, now: Timestamp) -> Timestamp {
        self.first_global(local)
            .max(Timestamp::from_micros(now.as_micros() + 1))
    }
}

/// The session settings of every process of a scenario (the backoff is the core's default).
pub(crate) fn session_config(connect_timeout: Duration, setup_timeout: Duration) -> SessionConfig {
    let mut config = SessionConfig::default();
    config.connect_timeout = connect_timeout;
    config.setup_timeout = setup_timeout;
    config
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
        proc.stood_down = false;
        proc.connecting = None;
        proc.conn = None;
        proc.watch_connecting = None;
        proc.watch_conn = None;
        proc.armed = None;
        self.engine.arm(p, 0, None);
        proc.next_call = 1;
        let inc = proc.incarnation;
        let mut session = Session::new(
            self.session_config.clone(),
            derive_seed(seed, STREAM_SESSION, p as u64, u64::from(inc)),
        );
        let schema = SchemaName::new(self.scenario.protocol.default_schema()).ok();
        for (li, channel) in self.channels.iter().enumerate() {
            // The first 256 channels keep the seeds they always had; beyond, the incarnation
            // moves up so that channel and incarnation never collide.
            let stream = if li < 256 {
                (u64::from(inc) << 8) | li as u64
            } else {
                (u64::from(inc) << 32) | li as u64
            };
            let lock_seed = derive_seed(seed, STREAM_LOCK, p as u64, stream);
            let added = schema.clone().map(|schema| {
                session.add_lock(
                    LockKey(li as u64),
                    ChannelName::clone(channel),
                    schema,
                    self.config.clone(),
                    lock_seed,
                )
            });
            debug_assert!(matches!(added, Some(Ok(()))));
        }
        proc.session = Some(session);
        proc.locks = vec![LockView::default(); self.channels.len()];
        self.alive_count += 1;
        self.observe(p, || Observed::Started);
        // As the worker starts: `init` on every lock (the session connects at its first input).
        for li in 0..self.channels.len() {
            self.call(p, li, LockCall::Init);
        }
    }

    /// A graceful stop, as the worker stops on the terminate signal: `close` on the session,
    /// which stops every lock, waits for a released lock's successor (at most the handover
    /// linger), then closes the connection; the process exits once it is closed.
    pub(crate) fn stop_process(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        proc.stopping = true;
        let call = CallId(proc.next_call);
        proc.next_call += 1;
        self.drive(p, SessionInput::Close { call });
    }

    /// An API call on lock `li` of process `p`.
    pub(crate) fn call(&mut self, p: usize, li: usize, request: LockCall) {
        let proc = &mut self.procs[p];
        let call = CallId(proc.next_call);
        proc.next_call += 1;
        self.drive(
            p,
            SessionInput::Call {
                call,
                lock: LockKey(li as u64),
                request,
            },
        );
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

    /// Drops the process's state (exit or crash: the core session with it) without closing
    /// anything; returns the server's id of the connection that was up.
    pub(crate) fn end_incarnation(&mut self, p: usize) -> Option<SessionId> {
        let proc = &mut self.procs[p];
        proc.alive = false;
        proc.stopping = false;
        proc.session = None;
        proc.locks.clear();
        proc.armed = None;
        self.engine.arm(p, 0, None);
        proc.connecting = None;
        proc.watch_connecting = None;
        proc.watch_conn = None;
        let conn = proc.conn.take();
        self.alive_count -= 1;
        self.checkers.forget(p);
        self.observe(p, || Observed::Ended);
        conn.map(|(_, server)| server)
    }

    pub(crate) fn schedule_restart(&mut self, p: usize) {
        if let Some(delay) = self.scenario.restart_delay {
            self.engine.schedule(self.engine.now + delay, Event::ProcStart { p });
        }
    }

    // ----- what the network and the server report -----

    /// The server accepted connect `attempt` on `session`.
    pub(crate) fn connected(&mut self, p: usize, session: SessionId, attempt: u64, app: String, pid: i32) {
        let proc = &mut self.procs[p];
        let core = SessionId(attempt);
        if proc.connecting == Some(core) {
            proc.connecting = None;
            proc.conn = Some((core, session));
            self.drive(
                p,
                SessionInput::Connected {
                    session: core,
                    app,
                    pid,
                },
            );
        } else if proc.watch_connecting == Some(core) {
            proc.watch_connecting = None;
            proc.watch_conn = Some((core, session));
            self.drive(p, SessionInput::WatchConnected { session: core });
        } else {
            // The attempt was abandoned: its socket is gone.
            self.client_close(p, session);
        }
    }

    /// The server refused connect `attempt`: it is down, or (`limit`) at its connection limit.
    pub(crate) fn refused(&mut self, p: usize, attempt: u64, limit: bool) {
        let core = SessionId(attempt);
        let cause = if limit {
            "sorry, too many clients already (SQLSTATE 53300)"
        } else {
            "connection refused"
        };
        if self.procs[p].connecting == Some(core) {
            self.procs[p].connecting = None;
            self.drive(
                p,
                SessionInput::ConnectFailed {
                    session: core,
                    cause: cause.to_owned(),
                },
            );
        } else if self.procs[p].watch_connecting == Some(core) {
            self.procs[p].watch_connecting = None;
            self.drive(
                p,
                SessionInput::WatchConnectFailed {
                    session: core,
                    cause: cause.to_owned(),
                    connection_limit: limit,
                },
            );
        }
    }

    /// The server ended `session` (FIN or RST).
    pub(crate) fn session_ended(&mut self, p: usize, session: SessionId) {
        if let Some(core) = self.take_conn(p, session) {
            self.drive(
                p,
                SessionInput::Closed {
                    session: core,
                    error: Some("closed by the server".to_owned()),
                },
            );
        } else if let Some(core) = self.take_watch_conn(p, session) {
            self.drive(
                p,
                SessionInput::WatchClosed {
                    session: core,
                    error: Some("closed by the server".to_owned()),
                },
            );
        }
    }

    /// The client's TCP stack gave up on `session` (`tcp_user_timeout`): the socket fails.
    pub(crate) fn session_timed_out(&mut self, p: usize, inc: u32, session: SessionId) {
        if !self.procs[p].runs(inc) {
            return;
        }
        if let Some(core) = self.take_conn(p, session) {
            self.client_close(p, session);
            self.drive(
                p,
                SessionInput::Closed {
                    session: core,
                    error: Some("tcp_user_timeout".to_owned()),
                },
            );
        } else if let Some(core) = self.take_watch_conn(p, session) {
            self.client_close(p, session);
            self.drive(
                p,
                SessionInput::WatchClosed {
                    session: core,
                    error: Some("tcp_user_timeout".to_owned()),
                },
            );
        }
    }

    /// Forgets the watch connection if it is `session`; returns the core's id of it.
    fn take_watch_conn(&mut self, p: usize, session: SessionId) -> Option<SessionId> {
        let proc = &mut self.procs[p];
        let (core, server) = proc.watch_conn?;
        if server != session {
            return None;
        }
        proc.watch_conn = None;
        Some(core)
    }

    /// Forgets the connection if it is `session`; returns the core's id of it.
    fn take_conn(&mut self, p: usize, session: SessionId) -> Option<SessionId> {
        let proc = &mut self.procs[p];
        let (core, server) = proc.conn?;
        if server != session {
            return None;
        }
        proc.conn = None;
        Some(core)
    }

    /// The reply to operation `id`, run in schema generation `generation`.
    pub(crate) fn db_reply(
        &mut self,
        p: usize,
        session: SessionId,
        id: OpId,
        result: Result<OpReply, pgiplock_core::DbError>,
        generation: u64,
    ) {
        if self.procs[p].watch_conn.is_some_and(|(_, server)| server == session) {
            self.drive(p, SessionInput::Reply { id, result });
        } else if self.procs[p].conn.is_some_and(|(_, server)| server == session) {
            self.procs[p].reply_generation = Some(generation);
            self.drive(p, SessionInput::Reply { id, result });
            self.procs[p].reply_generation = None;
        }
    }

    /// A notification on `session`, from backend `pid`.
    pub(crate) fn notification(&mut self, p: usize, session: SessionId, channel: String, payload: String, pid: i32) {
        let Some((core, server)) = self.procs[p].conn else {
            return;
        };
        if server != session {
            return;
        }
        if self.property.is_some() && self.channels[0].as_str() == channel {
            if let Ok(id) = payload.parse::<u64>() {
                let holding = self.checkers.believers[0].contains(&p) && self.procs[p].lock_session(0) == Some(session);
                let now = self.engine.now;
                if let Some(tracker) = self.property.as_deref_mut() {
                    tracker.heard(p, session, id, now, holding);
                }
            }
        }
        let mutant = self.scenario.mutant.map(|m| (m, channel.clone(), payload.clone()));
        self.drive(
            p,
            SessionInput::Notification {
                session: core,
                channel,
                payload,
                pid,
            },
        );
        if let Some((mutant, channel, payload)) = mutant {
            self.mutant_hears(p, mutant, &channel, payload);
        }
    }

    /// A mutant process hands a data channel's notification to the application where the real
    /// driver would not (see [`Mutant`]).
    fn mutant_hears(&mut self, p: usize, mutant: Mutant, channel: &str, payload: String) {
        let Some(li) = self.channel_index(channel) else {
            return;
        };
        let proc = &self.procs[p];
        let Some(view) = proc.locks.get(li) else { return };
        let deliver = match mutant {
            Mutant::SkipFence => view.zombie,
            Mutant::StandbyDelivers => !view.believes,
        };
        if deliver && proc.alive {
            let local = proc.local(self.engine.now);
            let lock = LockKey(li as u64);
            self.output(
                p,
                local,
                SessionOutput::Deliver {
                    lock,
                    payload,
                    replay: false,
                },
            );
        }
    }

    // ----- driving the session -----

    /// The process's timer: due if it is still the one armed.
    pub(crate) fn session_timer(&mut self, p: usize, inc: u32) {
        let proc = &mut self.procs[p];
        if proc.runs(inc) && proc.armed == Some(self.engine.now) {
            proc.armed = None;
            self.drive(p, SessionInput::Tick);
        }
    }

    /// Feeds one input to the process's session at its local time, carries out everything it
    /// asks for, and re-arms the one timer.
    fn drive(&mut self, p: usize, input: SessionInput) {
        let now = self.engine.now;
        let proc = &mut self.procs[p];
        if !proc.alive {
            return;
        }
        let local = proc.local(now);
        let Some(session) = proc.session.as_mut() else { return };
        let tick = input == SessionInput::Tick;
        session.handle_input(local, input);
        // One buffer for every drive: the outputs of most inputs are one or two.
        let mut outputs = std::mem::take(&mut self.outputs);
        while let Some(output) = session.poll_output() {
            outputs.push(output);
        }
        for output in outputs.drain(..) {
            self.output(p, local, output);
        }
        self.outputs = outputs;
        let proc = &mut self.procs[p];
        let Some(session) = proc.session.as_ref() else { return };
        // One timer per process, re-armed from poll_timeout after every input.
        let deadline = session.poll_timeout();
        if let Some(at) = deadline.filter(|at| tick && *at <= local) {
            // A deadline that does not move past a tick is a busy loop.
            self.checkers.stuck_deadline.get_or_insert((p, local, at));
        }
        let global = deadline.map(|local_at| proc.global_at(local_at, now));
        if global != proc.armed {
            proc.armed = global;
            self.engine.arm(p, proc.incarnation, global);
        }
        // Every lock, walked in key order beside the session's own (no lookup per lock), and
        // the checker told only of a change: a process of a thousand channels pays for the
        // walk, not for a thousand set operations per input.
        let mut locks = session.locks().peekable();
        for li in 0..self.channels.len() {
            let key = LockKey(li as u64);
            while locks.next_if(|(k, _)| *k < key).is_some() {}
            let lock = locks.next_if(|(k, _)| *k == key).map(|(_, l)| l);
            let view = proc.locks.get_mut(li);
            let zombie = view.as_ref().is_some_and(|l| l.zombie);
            let holds = lock.is_some_and(|l| l.phase().is_holder()) || zombie;
            let ignored = lock.map_or(0, |l| l.ignored_markers());
            match view {
                Some(view) => {
                    if view.in_checker != holds {
                        self.checkers.set_believer(li, p, holds);
                        view.in_checker = holds;
                    }
                    self.metrics.ignored_markers += ignored.saturating_sub(view.ignored_markers);
                    view.ignored_markers = ignored;
                }
                None => self.checkers.set_believer(li, p, holds),
            }
        }
        drop(locks);
        self.phase_bounds_of(p);
        let proc = &self.procs[p];
        if proc.stopping
            && proc
                .session
                .as_ref()
                .is_some_and(|s| s.state().phase == ConnPhase::Closed)
        {
            self.exit_process(p);
        }
    }

    fn output(&mut self, p: usize, local: Timestamp, output: SessionOutput) {
        match output {
            SessionOutput::Connect { session } => {
                self.procs[p].connecting = Some(session);
                self.client_send(p, SessionId(0), ClientMsg::Connect { attempt: session.0 });
                self.connect_sent(p);
            }
            SessionOutput::AbortConnect { session } => {
                // Dropping the attempt closes its socket; a late answer finds it gone.
                let proc = &mut self.procs[p];
                if proc.connecting == Some(session) {
                    proc.connecting = None;
                }
            }
            SessionOutput::Disconnect { session } => {
                let proc = &mut self.procs[p];
                if let Some((core, server)) = proc.conn {
                    if core == session {
                        proc.conn = None;
                        self.client_close(p, server);
                    }
                }
            }
            SessionOutput::WatchConnect { session } => {
                self.procs[p].watch_connecting = Some(session);
                self.client_send(p, SessionId(0), ClientMsg::Connect { attempt: session.0 });
            }
            SessionOutput::WatchCancel { session } => {
                if let Some((core, server)) = self.procs[p].watch_conn {
                    if core == session {
                        self.client_send(p, server, ClientMsg::Cancel);
                    }
                }
            }
            SessionOutput::WatchDisconnect { session } => {
                let proc = &mut self.procs[p];
                if proc.watch_connecting == Some(session) {
                    proc.watch_connecting = None;
                }
                if let Some((core, server)) = proc.watch_conn {
                    if core == session {
                        proc.watch_conn = None;
                        self.client_close(p, server);
                    }
                }
            }
            SessionOutput::Execute(request) if matches!(request.op, SessionOp::AwaitHolder { .. }) => {
                self.observe(p, || Observed::Request(request.op.clone()));
                let Some((core, server)) = self.procs[p].watch_conn else {
                    return;
                };
                if core == request.session {
                    self.client_send(p, server, ClientMsg::Request { request });
                }
            }
            SessionOutput::Execute(request) => {
                self.observe(p, || Observed::Request(request.op.clone()));
                let proc = &mut self.procs[p];
                let Some((core, server)) = proc.conn else { return };
                if core != request.session {
                    return; // the core already forgot it
                }
                if let SessionOp::Lock { lock, .. } = &request.op {
                    if let Some(view) = usize::try_from(lock.0).ok().and_then(|li| proc.locks.get_mut(li)) {
                        view.request_sent = Some(local);
                    }
                }
                if let SessionOp::RenewMany { entries, .. } | SessionOp::AcquireMany { entries, .. } = &request.op {
                    for entry in entries {
                        let li = usize::try_from(entry.lock.0).ok();
                        if let Some(view) = li.and_then(|li| proc.locks.get_mut(li)) {
                            view.request_sent = Some(local);
                        }
                    }
                }
                self.client_send(p, server, ClientMsg::Request { request });
            }
            SessionOutput::Lock { lock, event } => self.lock_event(p, lock.0 as usize, event),
            SessionOutput::Deliver { lock, payload, replay } => {
                let li = lock.0 as usize;
                let view = self.procs[p].locks.get(li);
                if !view.is_some_and(|l| l.believes) {
                    self.metrics.s3_violations += 1;
                }
                // Graceful: the previous term was released and this process listened (on the
                // connection it still has) since before its drain marker, with nothing dropped.
                let proc = &self.procs[p];
                let graceful = view.is_some_and(|l| {
                    let listened = proc.listening_since.filter(|(s, _)| Some(*s) == proc.session());
                    match (l.after_release, listened) {
                        (Some(drained), Some((_, since))) => since < drained && !l.gap,
                        _ => false,
                    }
                });
                if replay
                    && (graceful || self.scenario.protocol == Protocol::Classic)
                    && self.metrics.d2_violation.is_none()
                {
                    let why = if graceful {
                        "after a graceful release"
                    } else {
                        "under Classic"
                    };
                    self.metrics.d2_violation = Some(format!("process {p} replayed {payload:?} on channel {li} {why}"));
                }
                self.observe(p, || Observed::Delivered {
                    lock: li,
                    payload: payload.clone(),
                    replay,
                });
                if li == 0 {
                    if let Ok(id) = payload.parse::<u64>() {
                        let proc = &self.procs[p];
                        let db = &self.server.db;
                        let uninformed = proc
                            .lock_session(li)
                            .is_some_and(|s| !db.is_alive(s) && proc.session() == Some(s))
                            || proc.term_generation(li) < db.generation();
                        // A term on a row made after a schema drop has no previous term to
                        // replay from: what it delivers of an older generation is exempt (the
                        // token sequence went with the table), unless `strict_d1`.
                        let across_drop =
                            !self.scenario.strict_d1 && proc.term_generation(li) > self.metrics.generation_of(id);
                        let uninformed = uninformed || across_drop;
                        let twice = self.metrics.delivered(id, p, replay, uninformed);
                        if let Some(tracker) = self.property.as_deref_mut() {
                            tracker.delivered(id);
                        }
                        if twice && self.checkers.check_d1 && self.metrics.d1_violation.is_none() {
                            self.metrics.d1_violation = Some(format!(
                                "message {id} delivered twice without the replay flag (now by process {p})"
                            ));
                        }
                    }
                }
            }
            SessionOutput::Event(event) => {
                let name = match &event {
                    SessionEvent::ConnectFailed { cause, .. } if cause.starts_with("no answer") => {
                        Some("connect_timeout")
                    }
                    SessionEvent::ConnectFailed { cause, .. } if cause.contains("too many clients") => {
                        Some("connection_limit")
                    }
                    SessionEvent::ConnectFailed { .. } => Some("connect_failed"),
                    SessionEvent::Down { reason, .. } => Some(reason.as_str()),
                    SessionEvent::ReadOnly { .. } => Some("read_only_refused"),
                    SessionEvent::SchemaMissing { .. } => Some("schema_missing"),
                    SessionEvent::BootstrapFailed { .. } => Some("bootstrap_failed"),
                    SessionEvent::WatchUp { .. } => Some("watch_up"),
                    SessionEvent::WatchDown {
                        reason: WatchFailure::ConnectionLimit(_),
                        ..
                    } => Some("watch_connection_limit"),
                    SessionEvent::WatchDown { .. } => Some("watch_down"),
                    _ => None,
                };
                if let Some(name) = name {
                    self.metrics.session_event(name, self.engine.now);
                }
                self.trace.line(|| format!("  p{p} session: {event:?}"));
            }
            SessionOutput::LockRemoved { lock } => {
                self.trace.line(|| format!("  p{p} lock{} removed", lock.0));
            }
            SessionOutput::CallDone { .. } | SessionOutput::Closed => {}
            other => self.trace.line(|| format!("  p{p} session output: {other:?}")),
        }
    }

    fn lock_event(&mut self, p: usize, li: usize, event: LockEvent) {
        let generation = self.procs[p].reply_generation.unwrap_or(self.server.db.generation());
        if let (0, Some(tracker)) = (li, self.property.as_deref_mut()) {
            match &event {
                LockEvent::Acquired { token } => {
                    let metrics = &self.metrics;
                    // A fresh row (the first term, or the first after a schema drop) has no
                    // predecessor to replay from.
                    let replays = *token != Some(FenceToken(1));
                    let proc = &self.procs[p];
                    let session = proc.lock_session(0).filter(|_| replays);
                    let since = proc
                        .listening_since
                        .filter(|(s, _)| Some(*s) == session)
                        .map(|(_, since)| since);
                    tracker.acquired(p, session, since, |id| metrics.generation_of(id) == generation);
                }
                LockEvent::Gap { .. } => tracker.gap(p),
                LockEvent::Drained => tracker.drained(self.engine.now),
                LockEvent::Released => tracker.released(),
                _ => {}
            }
        }
        let skip_fence = self.scenario.mutant == Some(Mutant::SkipFence);
        let Some(view) = self.procs[p].locks.get_mut(li) else {
            return;
        };
        match &event {
            LockEvent::Lost {
                reason: LostReason::LeaseExpired,
            } if skip_fence => {
                // The mutant ignores the self-fence: it goes on believing (and delivering).
                view.zombie = true;
                self.trace.hash(&[104, p as u64, li as u64]);
            }
            LockEvent::Acquired { token } => {
                view.believes = true;
                view.zombie = false;
                view.term_generation = generation;
                view.after_release =
                    token.and_then(|t| self.checkers.after_release.get(&(li, generation, t.0)).copied());
                view.gap = false;
                self.trace.hash(&[100, p as u64, li as u64, token.map_or(0, |t| t.0)]);
                if let Some(FenceToken(t)) = token {
                    self.checkers.token_acquired(&mut self.metrics, p, li, *t, generation);
                }
                if li == 0 {
                    self.metrics.acquisitions += 1;
                    self.metrics.term_started(self.engine.now);
                }
            }
            LockEvent::Lost { reason } => {
                view.believes = false;
                self.trace.hash(&[101, p as u64, li as u64]);
                if li == 0 {
                    self.metrics.lost(reason.as_str());
                }
            }
            // The tenure ends at the drain marker; the release's outcome follows.
            LockEvent::Drained | LockEvent::Stopped { .. } => {
                view.believes = false;
                self.trace.hash(&[102, p as u64, li as u64]);
            }
            LockEvent::Gap { missing } => {
                view.gap = true;
                if li == 0 {
                    self.metrics.gap_events += 1;
                    self.metrics.gap_missing += missing;
                }
            }
            LockEvent::Released | LockEvent::ReleaseFailed { .. } => {
                self.trace.hash(&[103, p as u64, li as u64]);
            }
            _ => {}
        }
        self.trace.line(|| format!("  p{p} lock{li}: {event:?}"));
        self.observe(p, || Observed::Lock { lock: li, event });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock conversions in 128 bits, as they were before the 64-bit fast path.
    fn local_wide(rate_ppm: i64, t: Timestamp) -> Timestamp {
        let g = t.as_micros() as i128;
        let l = g + g * rate_ppm as i128 / 1_000_000;
        Timestamp::from_micros(l.max(0) as u64)
    }

    fn first_global_wide(rate_ppm: i64, local: Timestamp) -> Timestamp {
        let l = local.as_micros() as u128;
        let rate = (1_000_000i64 + rate_ppm) as u128;
        let mut g = Timestamp::from_micros(u64::try_from((l * 1_000_000).div_ceil(rate)).unwrap_or(u64::MAX));
        for _ in 0..4 {
            if local_wide(rate_ppm, g) >= local {
                break;
            }
            g = Timestamp::from_micros(g.as_micros().saturating_add(1));
        }
        g
    }

    #[test]
    fn clock_conversions_match_the_wide_arithmetic() {
        let mut rng = SplitMix64::new(11);
        for drift in [0.0, 1e-6, 0.001, 0.05, 0.5] {
            for p in 0..8 {
                let proc = Proc::new(rng.next_u64(), p, drift);
                for _ in 0..2_000 {
                    // Up to a year, then a few times near the top of the range.
                    let t = Timestamp::from_micros(rng.below_inclusive(31_536_000_000_000));
                    assert_eq!(
                        proc.local(t),
                        local_wide(proc.rate_ppm, t),
                        "rate {} at {t:?}",
                        proc.rate_ppm
                    );
                    let g = proc.first_global(t);
                    assert_eq!(
                        g,
                        first_global_wide(proc.rate_ppm, t),
                        "rate {} at {t:?}",
                        proc.rate_ppm
                    );
                    assert!(proc.local(g) >= t, "rate {} at {t:?}", proc.rate_ppm);
                }
                for t in [u64::MAX / 2, u64::MAX / 1_000, 1 << 50] {
                    let t = Timestamp::from_micros(t);
                    assert_eq!(
                        proc.local(t),
                        local_wide(proc.rate_ppm, t),
                        "rate {} at {t:?}",
                        proc.rate_ppm
                    );
                }
            }
        }
    }
}
