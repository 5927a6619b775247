//! The lock state machine.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{LockConfig, Protocol, MAX_SETTING};
use crate::event::{Input, LockEvent, LostReason, Output, SignalKind, Warning};
use crate::name::ChannelName;
use crate::proto::{
    AcquireReply, DbError, DbOp, DbRequest, FenceToken, Marker, PreviousTerm, Progress, Reply, RequestId, SessionId,
    TerminateOutcome,
};
use crate::replay::Replay;
use crate::rng::SplitMix64;
use crate::time::{duration_micros, Timestamp};

/// Where a lock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Not holding: waiting for a session, a release notification or the retry timer (or not
    /// started at all).
    Standby,
    /// Holding: delivering the channel's notifications.
    Holding,
    /// Holding and asked to release: delivering up to its own drain marker.
    Draining,
    /// The release statement is in flight (after reporting `Released`, or for a term won while
    /// stopping, which is never reported). Delivers nothing; buffers what follows its own drain
    /// marker, in case it wins the next term.
    Releasing,
    /// Stopped for good.
    Stopped,
}

impl Phase {
    /// Whether the lock believes it holds the channel (and may deliver).
    pub fn is_holder(self) -> bool {
        matches!(self, Phase::Holding | Phase::Draining)
    }
}

/// The timers a lock may arm; at most one deadline each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// Standby: next acquisition attempt.
    Retry,
    /// Holder: next renewal (Lease) or ownership check (Classic).
    Renew,
    /// Holder (Lease): self-fence unless a renewal is confirmed first.
    Fence,
    /// A request went unanswered for too long.
    RequestTimeout,
    /// Draining holder: stop waiting for its own drain marker.
    MarkerWait,
    /// Stop: give up waiting for the release.
    Shutdown,
}

const TIMERS: [TimerKind; 6] = [
    TimerKind::Retry,
    TimerKind::Renew,
    TimerKind::Fence,
    TimerKind::RequestTimeout,
    TimerKind::MarkerWait,
    TimerKind::Shutdown,
];

/// A read-only view for checkers and status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    /// The phase.
    pub phase: Phase,
    /// The current term's token, while holding (Lease).
    pub token: Option<FenceToken>,
    /// The session the lock is using, if one is up.
    pub session: Option<SessionId>,
    /// Whether the lock competes on its own (after `Start`, until `Stop`).
    pub started: bool,
    /// Whether a stop is in progress or done.
    pub stopping: bool,
    /// The operation of the request in flight.
    pub pending: Option<&'static str>,
    /// Messages buffered for a handover.
    pub buffered: usize,
    /// Messages kept for replay at a takeover (`Lease` standbys).
    pub replay_buffered: usize,
    /// Lock-channel markers ignored so far because the term's holder did not send them.
    pub ignored_markers: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    id: RequestId,
    op: DbOp,
    sent_at: Timestamp,
}

#[derive(Debug, Clone, Copy)]
struct Term {
    token: Option<FenceToken>,
    /// Send time of the newest confirmed acquisition or renewal: the lease runs from here.
    confirmed_sent: Timestamp,
    /// Number of the next progress marker (`Lease`; the `acquired` marker is 0).
    next_seq: u64,
    /// The newest of this term's own markers seen in our own stream: everything before it has
    /// been delivered.
    seen: Option<u64>,
}

impl Term {
    fn new(token: Option<FenceToken>, confirmed_sent: Timestamp) -> Term {
        Term {
            token,
            confirmed_sent,
            next_seq: 1,
            seen: None,
        }
    }
}

/// How far a lock-channel marker can be believed, judged by its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Ours: our own term's token from our own backend.
    Own,
    /// From the backend that the lock table named for the marker's term.
    Holder,
    /// A term the table named, or our own, but from another backend: forged.
    Forged,
    /// Older than the newest term the table named.
    Stale,
    /// Nothing to judge it by (a newer term, `Classic`, or no word from the table yet).
    Unverified,
}

/// Where a lock stands, with what only that phase knows. [`Phase`] is its public outline.
#[derive(Debug, Clone)]
enum Stage {
    Standby(Standby),
    Holding(Term, Holding),
    Draining(Term, Drain),
    /// The term is the one being released (for a term won while stopping, never reported).
    Releasing(Term, Releasing),
    /// Won a released term (`Lease`) whose holder's release was its own drain point: waiting
    /// for that holder's `drained` marker before reporting it. Outwardly a standby.
    Confirming(Term, Box<Confirming>),
    Stopped,
}

impl Stage {
    fn phase(&self) -> Phase {
        match self {
            Stage::Standby(_) | Stage::Confirming(..) => Phase::Standby,
            Stage::Holding(..) => Phase::Holding,
            Stage::Draining(..) => Phase::Draining,
            Stage::Releasing(..) => Phase::Releasing,
            Stage::Stopped => Phase::Stopped,
        }
    }

    fn term(&self) -> Option<&Term> {
        match self {
            Stage::Holding(term, _)
            | Stage::Draining(term, _)
            | Stage::Releasing(term, _)
            | Stage::Confirming(term, _) => Some(term),
            Stage::Standby(_) | Stage::Stopped => None,
        }
    }

    fn handover(&self) -> Option<&Handover> {
        match self {
            Stage::Standby(standby) => standby.handover.as_deref(),
            Stage::Confirming(_, confirming) => confirming.standby.handover.as_deref(),
            Stage::Draining(_, drain) => drain.handover.as_deref(),
            Stage::Releasing(_, releasing) => releasing.handover.as_deref(),
            Stage::Holding(..) | Stage::Stopped => None,
        }
    }
}

/// Not holding.
#[derive(Debug, Clone, Default)]
struct Standby {
    /// What arrived since a peer's drain or release marker (or an `acquired` marker during our
    /// attempt), kept in case we win the next term.
    handover: Option<Box<Handover>>,
    /// `TryAcquire` calls waiting for an answer.
    attempt_waiters: u32,
    /// An attempt fell due (`Start`, the retry timer) while another request was in flight.
    attempt_due: bool,
    /// A release notification arrived while an acquisition was in flight.
    woken: bool,
    /// The successor that release named (`Lease`), for the wake after the attempt.
    woken_successor: Option<i32>,
    /// An `acquired:<t>` marker that arrived while our own acquisition was in flight: it may be
    /// our own (its reply decides) or a peer's.
    acquired_during_attempt: Option<FenceToken>,
}

/// Holding, delivering.
#[derive(Debug, Clone, Copy, Default)]
struct Holding {
    /// `Release` came while a request was in flight: drain as soon as it ends.
    release_requested: bool,
    /// A renewal fell due while another request was in flight: send it as soon as that ends.
    renew_due: bool,
}

/// Holding, delivering up to its own drain marker.
#[derive(Debug, Clone, Default)]
struct Drain {
    /// `Some` once our own drain marker arrived: what follows it is the next holder's, buffered
    /// in case that is us again.
    handover: Option<Box<Handover>>,
    /// The drain statement's reply arrived.
    confirmed: bool,
    /// The release is the drain point ([`LockConfig::drain_in_release`]): it is in flight, and
    /// its own marker ends the delivery.
    merged: bool,
    /// `merged`: the release's outcome, once its reply came (`None` inside: released).
    reply: Option<Option<LostReason>>,
}

/// A won term waiting for its predecessor's `drained` marker.
#[derive(Debug, Clone)]
struct Confirming {
    /// The standby's state at the win (its waiters, its handover buffer).
    standby: Standby,
    /// The released term, as the table had it: its `drained` marker comes from its holder.
    previous: PreviousTerm,
}

/// The release statement is in flight.
#[derive(Debug, Clone, Default)]
struct Releasing {
    /// What followed our own drain marker; `None` when waiting for it timed out, or when the
    /// next term began.
    handover: Option<Box<Handover>>,
    /// The term was reported (`Acquired`, then `Drained`): its release outcome is reported too.
    /// A term won while stopping is given back without a word.
    reported: bool,
    /// Our own release marker ended our delivery (the release was the drain point): once the
    /// release ends, say so with a `drained` marker.
    proof: bool,
    /// Stopping, with only that `drained` marker in flight (`Some`: whether the release was
    /// confirmed): the stop ends with its reply (or the shutdown bound), so that the connection
    /// outlives it.
    word_in_flight: Option<bool>,
}

/// Messages received after a drain, release or `acquired` marker, kept for a handover.
#[derive(Debug, Clone, Default)]
struct Handover {
    messages: VecDeque<String>,
    /// A release marker arrived since the buffer began: under `Classic`, a failed attempt after
    /// it means another standby won, so the buffer is theirs.
    released: bool,
    /// Messages dropped from the front since the buffer began (for the overflow warning).
    dropped: u64,
}

impl Handover {
    /// Appends `payload`, dropping the oldest beyond `limit`; returns the count to warn about
    /// when it reaches a power of two.
    fn push(&mut self, payload: String, limit: usize) -> Option<u64> {
        let mut warn = None;
        if self.messages.len() >= limit {
            self.messages.pop_front();
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                warn = Some(self.dropped);
            }
        }
        self.messages.push_back(payload);
        warn
    }
}

/// One lock on one channel: a deterministic state machine.
///
/// Feed inputs with [`handle_input`](Lock::handle_input), then drain
/// [`poll_output`](Lock::poll_output) to `None`, then sleep until
/// [`poll_timeout`](Lock::poll_timeout) and feed [`Input::Tick`].
///
/// ```
/// use pgiplock_core::*;
///
/// let channel = ChannelName::new("jobs").unwrap();
/// let mut lock = Lock::new(channel, LockConfig::new(Protocol::Lease), 42);
/// let t0 = Timestamp::from_millis(0);
/// lock.handle_input(t0, Input::SessionUp(SessionId(1)));
/// lock.handle_input(t0, Input::Start);
/// let Some(Output::Request(req)) = lock.poll_output() else { panic!() };
/// assert_eq!(req.op, DbOp::Acquire);
/// let reply = AcquireReply::won(Some(FenceToken(1)));
/// lock.handle_input(Timestamp::from_millis(2), Input::DbResult { id: req.id, result: Ok(Reply::Acquire(reply)) });
/// assert_eq!(lock.poll_output(), Some(Output::Event(LockEvent::Acquired { token: Some(FenceToken(1)) })));
/// assert!(lock.state().phase.is_holder());
/// // The next thing to do is to renew, two seconds after the acquisition was sent.
/// assert_eq!(lock.poll_timeout(), Some((Timestamp::from_millis(2_000), TimerKind::Renew)));
/// ```
#[derive(Debug, Clone)]
pub struct Lock {
    channel: ChannelName,
    /// Shared between the locks of a session that have the same settings.
    config: std::sync::Arc<LockConfig>,
    rng: SplitMix64,
    now: Timestamp,
    stage: Stage,
    started: bool,
    stopping: bool,
    session: Option<SessionId>,
    pending: Option<Pending>,
    next_request: u64,
    timers: [Option<Timestamp>; TIMERS.len()],
    outputs: VecDeque<Output>,
    warned_terminate: bool,
    /// The term for which a newer term's marker was last warned about (once per term).
    warned_marker: Option<FenceToken>,
    /// Newest session ever seen: a `SessionUp` of an older or equal id is a replay.
    newest_session: Option<SessionId>,
    /// Our release statement was sent and its marker (the term's token) has not arrived yet:
    /// that marker must not wake us as if a peer had released. It outlives the phase that sent
    /// it (the reply may come first), until the marker arrives or the session ends.
    own_release: Option<Option<FenceToken>>,
    /// What a `Lease` standby kept for replay at a takeover (`None` while delivering, without a
    /// session, under `Classic`, or with replay turned off).
    /// Boxed: a holder has none, and a session has thousands of locks.
    replay: Option<Box<Replay>>,
    /// The newest term the lock table named to us, with its holder's backend pid.
    holder_known: Option<(FenceToken, i32)>,
    /// Our session's backend pid, as the table reported it when we won.
    own_pid: Option<i32>,
    /// Markers ignored because their sender is not their term's holder.
    ignored_markers: u64,
    /// `Lease`: our term ended with its session, so our next session heard nothing of the
    /// stream in between; standbys that listened throughout hold the replay. Automatic
    /// attempts wait until our lease has expired (then theirs, retrying at the expiry, come
    /// first).
    defer_until: Option<Timestamp>,
    /// The newest claimed term (an `acquired` marker) that postponed our attempts.
    postponed_for: Option<FenceToken>,
    /// `StandDown` came and no `Start` since: a term won on its own is released at once.
    stood_down: bool,
    /// The backend pid of the holder that refused our last attempt (`Lease`), for the crash
    /// watch; cleared by a won attempt, a session's end and [`Input::HolderGone`].
    refused_by: Option<i32>,
    /// The session's crash watch waits on `refused_by`: no periodic attempts meanwhile.
    watched: bool,
    /// When the lease that refused our last attempt expires, as the server reported it.
    refused_until: Option<Timestamp>,
    /// The deadline of the ordinary retry last scheduled (a watch cancels that one, not a wake).
    periodic_retry: Option<Timestamp>,
    /// The backend pid of our session ([`Input::BackendPid`]): a release naming it makes us the
    /// successor.
    backend_pid: Option<i32>,
    /// `Lease`: the newest terms whose release marker we saw, with their senders.
    release_seen: Seen,
    /// `Lease`: the newest terms whose drain point we saw proven (a drain marker before the
    /// release, or a `drained` marker after it), with their senders.
    drain_seen: Seen,
}

/// The last few (term, sender) pairs of one kind of marker: a forger's marker of the same term
/// from another backend does not push the holder's out.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    pairs: [Option<(FenceToken, i32)>; 4],
    next: u8,
}

impl Seen {
    fn push(&mut self, pair: (FenceToken, i32)) {
        if !self.contains(pair) {
            self.pairs[usize::from(self.next)] = Some(pair);
            self.next = (self.next + 1) % 4;
        }
    }

    fn contains(&self, pair: (FenceToken, i32)) -> bool {
        self.pairs.contains(&Some(pair))
    }
}

impl Lock {
    /// A lock for `channel` with `config`; `seed` drives its jitter. The config should have
    /// passed [`LockConfig::validate`]; out-of-range values are clamped, never a panic.
    pub fn new(channel: ChannelName, config: LockConfig, seed: u64) -> Self {
        Lock::with_config(channel, std::sync::Arc::new(clamp_config(config)), seed)
    }

    /// A lock whose settings, already clamped, it may share with other locks.
    pub(crate) fn with_config(channel: ChannelName, config: std::sync::Arc<LockConfig>, seed: u64) -> Self {
        Lock {
            channel,
            config,
            rng: SplitMix64::new(seed),
            now: Timestamp::ZERO,
            stage: Stage::Standby(Standby::default()),
            started: false,
            stopping: false,
            session: None,
            pending: None,
            next_request: 1,
            timers: [None; TIMERS.len()],
            outputs: VecDeque::new(),
            warned_terminate: false,
            warned_marker: None,
            newest_session: None,
            own_release: None,
            replay: None,
            holder_known: None,
            own_pid: None,
            ignored_markers: 0,
            defer_until: None,
            postponed_for: None,
            stood_down: false,
            refused_by: None,
            watched: false,
            refused_until: None,
            periodic_retry: None,
            backend_pid: None,
            release_seen: Seen::default(),
            drain_seen: Seen::default(),
        }
    }

    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The configuration in force (out-of-range values clamped).
    pub fn config(&self) -> &LockConfig {
        &self.config
    }

    /// A snapshot of the state.
    pub fn state(&self) -> LockState {
        LockState {
            phase: self.phase(),
            token: self.token(),
            session: self.session,
            started: self.started,
            stopping: self.stopping,
            pending: self.pending.as_ref().map(|p| p.op.name()),
            buffered: self.stage.handover().map_or(0, |handover| handover.messages.len()),
            replay_buffered: self.replay.as_ref().map_or(0, |r| r.len()),
            ignored_markers: self.ignored_markers,
        }
    }

    /// Whether a request of the lock awaits its reply (as [`state`](Lock::state)'s `pending`
    /// reports, without building the rest).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Lock-channel markers ignored so far because the term's holder did not send them (as
    /// [`state`](Lock::state) reports, without building the rest).
    pub fn ignored_markers(&self) -> u64 {
        self.ignored_markers
    }

    /// The next deadline and what it is for; `None` when nothing is scheduled.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Timestamp, TimerKind)> {
        TIMERS
            .iter()
            .zip(self.timers.iter())
            .filter_map(|(k, t)| t.map(|t| (t, *k)))
            .min()
    }

    /// The next output, or `None` when all are drained.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        let output = self.outputs.pop_front();
        if output.is_none() && self.outputs.capacity() > 0 {
            // Drained: a session of thousands of locks would otherwise keep room for a few
            // outputs in every idle one.
            self.outputs = VecDeque::new();
        }
        output
    }

    /// Feeds one input at time `now`. Never fails; time that goes backwards is clamped.
    pub fn handle_input(&mut self, now: Timestamp, input: Input) {
        self.now = self.now.max(now);
        // Deadlines are checked against the input's time, not only on ticks: a notification
        // that arrives after the fence deadline must not be delivered.
        self.fire_due_timers();
        match input {
            Input::Tick => {}
            Input::Start => self.on_start(),
            Input::Wake => {
                if self.phase() == Phase::Standby && self.can_compete() {
                    self.schedule_wake();
                }
            }
            Input::FireEarly(kind) => {
                if matches!(kind, TimerKind::Renew | TimerKind::Retry) && self.timer(kind).is_some() {
                    self.disarm(kind);
                    self.on_timer(kind);
                }
            }
            Input::Watched(watched) => self.on_watched(watched),
            Input::HolderGone => {
                self.watched = false;
                self.refused_by = None;
                if self.phase() == Phase::Standby && self.can_compete() {
                    self.arm_earlier(TimerKind::Retry, self.now);
                }
            }
            Input::HolderReleased => {
                self.refused_by = None;
                self.on_watched(false);
            }
            Input::TryAcquire => self.on_try_acquire(),
            Input::Release => self.on_release(),
            Input::StandDown => self.on_stand_down(),
            Input::Stop => self.on_stop(None),
            Input::Signal(kind) => self.on_stop(Some(kind)),
            Input::BackendPid(pid) => self.backend_pid = Some(pid),
            Input::SessionUp(session) => self.on_session_up(session),
            Input::SessionDown(session) => {
                if self.session == Some(session) {
                    self.on_session_down(LostReason::SessionLost);
                }
            }
            Input::DbResult { id, result } => self.on_db_result(id, result),
            Input::Notification {
                session,
                channel,
                payload,
                pid,
            } => {
                if self.session == Some(session) {
                    self.on_notification(&channel, payload, pid);
                }
            }
        }
        self.after_input();
        // Whatever the input made due now (a zero wake jitter, a renewal whose reply came late)
        // happens now, so that every deadline left is strictly in the future.
        for _ in 0..8 {
            if !self.poll_timeout().is_some_and(|(at, _)| at <= self.now) {
                break;
            }
            self.fire_due_timers();
            self.after_input();
        }
    }

    // ----- timers -----

    fn timer(&self, kind: TimerKind) -> Option<Timestamp> {
        self.timers[kind as usize]
    }

    fn arm(&mut self, kind: TimerKind, at: Timestamp) {
        self.timers[kind as usize] = Some(at);
    }

    fn arm_earlier(&mut self, kind: TimerKind, at: Timestamp) {
        let at = self.timer(kind).map_or(at, |t| t.min(at));
        self.arm(kind, at);
    }

    fn disarm(&mut self, kind: TimerKind) {
        self.timers[kind as usize] = None;
    }

    fn fire_due_timers(&mut self) {
        // Each firing disarms its timer; handlers re-arm strictly later than `now` or not at all,
        // so this terminates; the bound is a guard, not a expected path.
        for _ in 0..64 {
            let Some((at, kind)) = self.poll_timeout() else { return };
            if at > self.now {
                return;
            }
            self.disarm(kind);
            self.on_timer(kind);
        }
    }

    fn on_timer(&mut self, kind: TimerKind) {
        match kind {
            TimerKind::Retry => {
                if self.phase() == Phase::Standby && self.can_compete() {
                    if let Some(until) = self.defer_until.filter(|until| *until > self.now) {
                        self.arm(TimerKind::Retry, until);
                    } else if self.pending.is_none() {
                        self.send(DbOp::Acquire);
                    } else if !self.acquire_in_flight() {
                        // Attempt as soon as the request in flight ends (an attempt in flight
                        // schedules the next one itself).
                        if let Some(standby) = self.standby_mut() {
                            standby.attempt_due = true;
                        }
                    }
                }
            }
            TimerKind::Renew => {
                if self.phase() == Phase::Holding {
                    if self.pending.is_none() {
                        let op = self.renew_op();
                        self.send(op);
                    } else if let Some(holding) = self.holding_mut() {
                        // Renew as soon as the request in flight ends, not a whole interval
                        // later: with tight timings that would fence the holder.
                        holding.renew_due = true;
                    }
                }
            }
            TimerKind::Fence => {
                if self.phase().is_holder() {
                    self.lose(LostReason::LeaseExpired);
                }
            }
            TimerKind::RequestTimeout => {
                if let (Some(_), Some(session)) = (self.pending.take(), self.session) {
                    self.outputs.push_back(Output::ResetSession(session));
                    self.on_session_down(LostReason::RequestTimeout);
                }
            }
            TimerKind::MarkerWait => {
                if self.phase() == Phase::Draining {
                    self.end_drain();
                } else if matches!(self.stage, Stage::Confirming(..)) {
                    // No `drained` marker in time: replay from what the log can prove.
                    self.confirm();
                }
            }
            TimerKind::Shutdown => {
                if let Some(released) = self.word_in_flight() {
                    self.finish_stop(released);
                } else if self.confirming() {
                    // Won, never reported, and no word came in time: the row stays ours until
                    // its lease expires.
                    self.finish_stop(false);
                } else if self.phase() != Phase::Stopped {
                    let was_holder = self.phase().is_holder();
                    if was_holder {
                        // The application believed it held: its tenure ends here, and says why.
                        self.emit(LockEvent::Lost {
                            reason: LostReason::ReleaseUnconfirmed,
                        });
                    } else if matches!(self.stage, Stage::Releasing(_, Releasing { reported: true, .. })) {
                        // Drained, but the release was not confirmed in time: say so.
                        self.emit(LockEvent::ReleaseFailed {
                            reason: LostReason::ReleaseUnconfirmed,
                        });
                    }
                    self.finish_stop(!was_holder && self.phase() != Phase::Releasing);
                }
            }
        }
    }

    // ----- helpers -----

    fn can_compete(&self) -> bool {
        self.started && !self.stopping && self.session.is_some() && !self.confirming()
    }

    /// Whether a won term waits for its predecessor's `drained` marker.
    fn confirming(&self) -> bool {
        matches!(self.stage, Stage::Confirming(..))
    }

    /// The phase (what [`state`](Lock::state) reports, without building the rest).
    pub fn phase(&self) -> Phase {
        self.stage.phase()
    }

    /// Whether an acquisition attempt of this lock is in flight.
    pub fn attempting(&self) -> bool {
        self.acquire_in_flight()
    }

    /// The session the lock is using, if one is up (as [`state`](Lock::state) reports).
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    fn token(&self) -> Option<FenceToken> {
        self.stage.term().and_then(|t| t.token)
    }

    /// The next renewal; under `Lease` it carries the term's next progress marker.
    fn renew_op(&mut self) -> DbOp {
        let token = self.token();
        let lease = self.config.protocol == Protocol::Lease;
        let progress = match &mut self.stage {
            Stage::Holding(term, _) | Stage::Draining(term, _) if lease => {
                let progress = Progress {
                    seq: term.next_seq,
                    ack: term.seen,
                };
                term.next_seq = term.next_seq.saturating_add(1);
                Some(progress)
            }
            _ => None,
        };
        DbOp::Renew { token, progress }
    }

    fn replay_enabled(&self) -> bool {
        self.config.protocol == Protocol::Lease && self.config.replay_limit > 0
    }

    /// Starts a replay log that begins where our own term stopped delivering.
    fn replay_after_own(&mut self) {
        if self.replay_enabled() && self.session.is_some() {
            self.replay = Some(Box::new(Replay::after_own(self.token(), self.own_pid)));
        }
    }

    /// Judges a lock-channel marker of `token` by its sender `pid` (`Lease`).
    fn trust(&self, token: Option<FenceToken>, pid: i32) -> Trust {
        let Some(token) = token.filter(|_| self.config.protocol == Protocol::Lease) else {
            return Trust::Unverified;
        };
        let own = self.token().or(self.own_release.flatten());
        if own == Some(token) {
            return match self.own_pid {
                Some(own_pid) if own_pid != pid => Trust::Forged,
                _ => Trust::Own,
            };
        }
        match self.holder_known {
            Some((known, holder)) if known == token => {
                if holder == pid {
                    Trust::Holder
                } else {
                    Trust::Forged
                }
            }
            Some((known, _)) if token < known => Trust::Stale,
            _ => Trust::Unverified,
        }
    }

    /// The table named `token`'s holder backend `pid`: trust its markers, and let the replay log
    /// forget what that holder provably delivered.
    fn learn_holder(&mut self, token: FenceToken, pid: i32) {
        self.table_named(token, pid);
        if let Some(replay) = &mut self.replay {
            replay.compact(token, pid);
        }
    }

    /// The table's newest word on the channel's term and holder. Replies come one at a time, so
    /// it is never older than what an earlier reply said; on one row tokens only rise, so an
    /// older token means the schema was dropped and the row began again at 1: what was known
    /// of the dropped row's terms (and claims beyond them) says nothing about the new one's.
    fn table_named(&mut self, token: FenceToken, pid: i32) {
        if self.holder_known.is_some_and(|(known, _)| known > token) {
            self.postponed_for = None;
        }
        self.holder_known = Some((token, pid));
    }

    /// Whether an unverified marker's term can follow the newest one the table named (the
    /// next token at most), and, for an `acquired` claim, has not already postponed our attempts.
    fn plausible(&self, marker: Marker, token: Option<FenceToken>) -> bool {
        let Some(token) = token.filter(|_| self.config.protocol == Protocol::Lease) else {
            return true;
        };
        let next = self
            .holder_known
            .map_or(true, |(known, _)| token.0 <= known.0.saturating_add(1));
        let fresh =
            !matches!(marker, Marker::Acquired(_)) || self.postponed_for.map_or(true, |postponed| token > postponed);
        next && fresh
    }

    fn count_ignored(&mut self, pid: i32) {
        self.ignored_markers += 1;
        if self.ignored_markers.is_power_of_two() {
            let count = self.ignored_markers;
            self.emit(LockEvent::Warning(Warning::IgnoredMarkers { pid, count }));
        }
    }

    fn standby_mut(&mut self) -> Option<&mut Standby> {
        match &mut self.stage {
            Stage::Standby(standby) => Some(standby),
            _ => None,
        }
    }

    fn holding_mut(&mut self) -> Option<&mut Holding> {
        match &mut self.stage {
            Stage::Holding(_, holding) => Some(holding),
            _ => None,
        }
    }

    /// Draining and still delivering until its own drain point: its release marker when the
    /// release is the drain point (`merged`), else its drain marker.
    fn awaits_own_marker(&self, merged: bool) -> bool {
        matches!(&self.stage, Stage::Draining(_, drain) if drain.merged == merged && drain.handover.is_none())
    }

    fn drain_mut(&mut self) -> Option<&mut Drain> {
        match &mut self.stage {
            Stage::Draining(_, drain) => Some(drain),
            _ => None,
        }
    }

    /// Moves the stage out, leaving `Stopped` until the caller puts the next one in.
    fn take_stage(&mut self) -> Stage {
        std::mem::replace(&mut self.stage, Stage::Stopped)
    }

    fn send(&mut self, op: DbOp) {
        let Some(session) = self.session else { return };
        debug_assert!(self.pending.is_none(), "one request at a time");
        let id = RequestId(self.next_request);
        self.next_request = self.next_request.saturating_add(1);
        match op {
            DbOp::Release { token } => self.own_release = Some(token),
            DbOp::Acquire => {
                if let Some(standby) = self.standby_mut() {
                    standby.attempt_due = false;
                }
            }
            _ => {}
        }
        self.pending = Some(Pending {
            id,
            op: op.clone(),
            sent_at: self.now,
        });
        self.arm(TimerKind::RequestTimeout, self.now + self.config.request_timeout);
        self.outputs.push_back(Output::Request(DbRequest { id, session, op }));
    }

    fn emit(&mut self, event: LockEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Answers the standby's `TryAcquire` calls (only a standby has any).
    fn answer_waiters(&mut self, acquired: bool) {
        let waiters = self
            .standby_mut()
            .map_or(0, |standby| std::mem::take(&mut standby.attempt_waiters));
        self.answer(waiters, acquired);
    }

    fn answer(&mut self, waiters: u32, acquired: bool) {
        for _ in 0..waiters {
            self.outputs.push_back(Output::AttemptDone { acquired });
        }
    }

    /// A uniform delay in `[0, max]`.
    fn jitter(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.rng.below_inclusive(duration_micros(max)))
    }

    /// Delay until the next attempt of a standby.
    fn retry_delay(&mut self, lease_remaining: Option<Duration>) -> Duration {
        let interval = duration_micros(self.config.acquire_interval);
        let spread = (interval as f64 * self.config.retry_jitter.clamp(0.0, 0.9)) as u64;
        let base = Duration::from_micros(interval - self.rng.below_inclusive(spread));
        match (self.config.protocol, lease_remaining) {
            (Protocol::Lease, Some(remaining)) => {
                // Retry right after the current lease would expire: the server measured
                // `remaining` before replying, so local now + remaining is at or after expiry.
                // Saturating: `remaining` comes from the server and may be anything.
                let at_expiry = remaining
                    .saturating_add(self.jitter(self.config.wake_jitter))
                    .saturating_add(Duration::from_millis(1));
                base.min(at_expiry)
            }
            _ => base,
        }
    }

    /// The holder the session's crash watch should wait on for this lock: the backend pid of
    /// the holder that refused its last attempt, while it is a started `Lease` standby with
    /// `crash_watch` on.
    pub fn watch_holder(&self) -> Option<i32> {
        if !self.config.watches_crashes() || self.phase() != Phase::Standby || !self.can_compete() {
            return None;
        }
        self.refused_by.filter(|pid| Some(*pid) != self.own_pid)
    }

    /// Whether the session's crash watch currently waits on this lock's holder.
    pub fn is_watched(&self) -> bool {
        self.watched
    }

    fn on_watched(&mut self, watched: bool) {
        if self.watched == watched {
            return;
        }
        self.watched = watched;
        // Watched: the ordinary retry is not needed (a wake still is). Unwatched: the ordinary
        // schedule again, from what the last refusal said.
        if watched && self.timer(TimerKind::Retry).is_some() && self.timer(TimerKind::Retry) == self.periodic_retry {
            self.disarm(TimerKind::Retry);
        }
        if !watched && self.phase() == Phase::Standby && self.timer(TimerKind::Retry).is_none() {
            let remaining = self.refused_until.map(|at| at.saturating_duration_since(self.now));
            self.schedule_retry(remaining);
        }
    }

    fn schedule_retry(&mut self, lease_remaining: Option<Duration>) {
        if let Some(remaining) = lease_remaining {
            self.refused_until = Some(self.now + remaining);
        }
        if self.watched && self.config.watches_crashes() {
            return;
        }
        if self.started && !self.stopping {
            let delay = self.retry_delay(lease_remaining);
            self.arm(TimerKind::Retry, self.now + delay);
            self.periodic_retry = Some(self.now + delay);
        }
    }

    fn schedule_wake(&mut self) {
        self.schedule_wake_after(None);
    }

    /// The attempt after a peer's release that named `successor` (`Lease`): at once if it named
    /// our backend; after one `wake_jitter` plus the jitter if it named another (whose
    /// `acquired` marker then cancels it, or, when that successor cannot take it, we do); after
    /// the jitter alone when it named none.
    fn schedule_wake_after(&mut self, successor: Option<i32>) {
        if self.started && !self.stopping {
            let jitter = self.config.wake_jitter;
            let delay = match successor {
                Some(pid) if Some(pid) == self.backend_pid => Duration::ZERO,
                Some(_) => jitter.saturating_add(self.jitter(jitter)),
                None => self.jitter(jitter),
            };
            self.arm_earlier(TimerKind::Retry, self.now + delay);
        }
    }

    fn fence_deadline(&self, sent: Timestamp) -> Timestamp {
        sent + self.config.lease_ttl.saturating_sub(self.config.fence_margin)
    }

    fn clear_holder_timers(&mut self) {
        self.disarm(TimerKind::Renew);
        self.disarm(TimerKind::Fence);
        self.disarm(TimerKind::MarkerWait);
    }

    /// Involuntary end of a term.
    fn lose(&mut self, reason: LostReason) {
        if !self.phase().is_holder() {
            return;
        }
        self.emit(LockEvent::Lost { reason });
        self.clear_holder_timers();
        if self.stopping {
            self.finish_stop(false);
        } else {
            // We delivered everything up to here and nothing after: a replay log from here on
            // holds exactly what this term left undelivered.
            self.replay_after_own();
            // The term, its pending drain or renewal and any buffer go with the holder's stage.
            self.stage = Stage::Standby(Standby::default());
            self.schedule_retry(None);
        }
    }

    fn finish_stop(&mut self, released: bool) {
        let waiters = match self.take_stage() {
            Stage::Standby(standby) => standby.attempt_waiters,
            _ => 0,
        };
        self.started = false;
        self.stopping = true;
        self.replay = None;
        self.timers = [None; TIMERS.len()];
        self.answer(waiters, false);
        self.emit(LockEvent::Stopped { released });
    }

    fn become_holder(&mut self, token: Option<FenceToken>, sent_at: Timestamp, previous: Option<PreviousTerm>) {
        let term = Term::new(token, sent_at);
        let standby = match std::mem::replace(&mut self.stage, Stage::Holding(term, Holding::default())) {
            Stage::Standby(standby) => standby,
            Stage::Confirming(_, confirming) => confirming.standby,
            _ => Standby::default(),
        };
        self.disarm(TimerKind::Retry);
        self.disarm(TimerKind::MarkerWait);
        self.emit(LockEvent::Acquired { token });
        // Without the table's word on the previous term (an old server's reply), the handover
        // buffer decides, as before replay existed.
        let replay = self
            .replay
            .take()
            .filter(|_| previous.is_some() || standby.handover.is_none());
        if let Some(replay) = replay {
            // `Lease`: the table says which term came before and who held it, and the log says
            // where that holder's delivery provably ended (its drain marker, or its newest
            // acknowledged progress marker): deliver from there on, flagged where the previous
            // holder may have delivered it too. The handover buffer is a subset of the log.
            let replayed = replay.take(previous, token, self.own_pid);
            if replayed.missing > 0 {
                self.emit(LockEvent::Gap {
                    missing: replayed.missing,
                });
            }
            for (payload, replay) in replayed.messages {
                self.outputs.push_back(Output::Deliver { payload, replay });
            }
        } else {
            // Messages after the previous holder's marker are this term's: hand them over first.
            for payload in standby.handover.map(|handover| handover.messages).unwrap_or_default() {
                self.outputs.push_back(Output::Deliver { payload, replay: false });
            }
        }
        self.arm(TimerKind::Renew, (sent_at + self.config.renew_interval).max(self.now));
        if self.config.protocol == Protocol::Lease {
            self.arm(TimerKind::Fence, self.fence_deadline(sent_at));
        }
        self.answer(standby.attempt_waiters, true);
        if self.stood_down && standby.attempt_waiters == 0 {
            // Won by an attempt that was in flight when the lock stood down: give it back, as
            // soon as no request is in flight (the reply may have asked for one, such as
            // terminating a stale holder).
            if let Some(holding) = self.holding_mut() {
                holding.release_requested = true;
            }
        }
    }

    fn start_drain(&mut self) {
        // Without a replay log a successor could not make up for a holder that stopped waiting
        // for its release marker before the release committed: drain first then.
        let merged = self.config.drain_in_release && self.replay_enabled();
        if let Stage::Holding(term, _) = self.stage {
            self.stage = Stage::Draining(
                term,
                Drain {
                    merged,
                    ..Drain::default()
                },
            );
        }
        self.disarm(TimerKind::Renew);
        let token = self.token();
        if merged {
            // The release is the drain point: deliver up to its marker, for `marker_wait` at
            // most from now (a successor, which can win only after the release commits, waits
            // as long from its win for our `drained` marker, so it never reports the term
            // while we still deliver).
            self.arm(TimerKind::MarkerWait, self.now + self.config.marker_wait);
            self.send(DbOp::Release { token });
        } else {
            self.send(DbOp::Drain { token });
        }
    }

    /// Won a term (`Lease`: after the table said so): report it, or first wait for the
    /// previous holder's `drained` marker when its release was its own drain point and that
    /// marker has not come yet.
    fn win(&mut self, token: Option<FenceToken>, sent_at: Timestamp, previous: Option<PreviousTerm>) {
        let awaited = previous.filter(|previous| {
            let Some(pid) = previous.holder_pid else { return false };
            self.config.protocol == Protocol::Lease
                && previous.released
                && self.release_seen.contains((previous.token, pid))
                && !self.drain_seen.contains((previous.token, pid))
        });
        let Some(previous) = awaited else {
            self.become_holder(token, sent_at, previous);
            return;
        };
        let standby = match self.take_stage() {
            Stage::Standby(standby) => standby,
            _ => Standby::default(),
        };
        self.stage = Stage::Confirming(Term::new(token, sent_at), Box::new(Confirming { standby, previous }));
        self.disarm(TimerKind::Retry);
        let until = (self.now + self.config.marker_wait).min(self.fence_deadline(sent_at));
        self.arm(TimerKind::MarkerWait, until.max(self.now));
    }

    /// The won term's predecessor said it delivered up to its release (or waiting for that
    /// ended): report the term, unless its lease is already too old to use.
    fn confirm(&mut self) {
        self.disarm(TimerKind::MarkerWait);
        let Stage::Confirming(term, confirming) = self.take_stage() else {
            return;
        };
        let previous = confirming.previous;
        self.stage = Stage::Standby(confirming.standby);
        if self.fence_deadline(term.confirmed_sent) > self.now {
            self.become_holder(term.token, term.confirmed_sent, Some(previous));
        } else {
            // Leave it to expire, as an acquisition answered too late.
            self.answer_waiters(false);
            self.schedule_retry(None);
        }
        if self.stopping && self.phase() == Phase::Holding {
            // Stopped while it waited: a holder's stop (within the stop's shutdown bound),
            // delivering what it won first, so that the next holder, which starts after our
            // `acquired` marker, misses nothing.
            self.on_release();
        }
    }

    /// The drain marker arrived (or waiting for it timed out): stop delivering, report the
    /// release, then release.
    fn end_drain(&mut self) {
        self.disarm(TimerKind::MarkerWait);
        self.disarm(TimerKind::Fence);
        // From our own drain marker on, the stream belongs to the next holder, which may be us
        // again: it is buffered like any standby's (since the marker). When waiting for the
        // marker timed out we do not know where it is, so we keep nothing rather than risk
        // duplicates.
        let mut outcome = None;
        self.stage = match self.take_stage() {
            Stage::Draining(term, drain) => {
                outcome = drain.reply;
                Stage::Releasing(
                    term,
                    Releasing {
                        proof: drain.merged && drain.handover.is_some(),
                        handover: drain.handover,
                        reported: true,
                        word_in_flight: None,
                    },
                )
            }
            other => other,
        };
        self.emit(LockEvent::Drained);
        if self.replay.is_none() {
            // Waiting for our own drain marker timed out: we delivered up to here.
            self.replay_after_own();
        }
        if let Some(outcome) = outcome {
            // The release was the drain point and its reply came first.
            self.release_done(outcome);
        } else if self.pending.is_none() {
            let token = self.token();
            self.send(DbOp::Release { token });
        }
    }

    /// The release ended: confirmed (`unconfirmed` is `None`) or not, and why not. A reported
    /// term says which: `Released` only after the server confirmed it.
    fn release_done(&mut self, unconfirmed: Option<LostReason>) {
        let released = unconfirmed.is_none();
        let (mut handover, reported, proof) = match self.take_stage() {
            Stage::Releasing(term, releasing) => (
                releasing.handover,
                releasing.reported,
                term.token.filter(|_| releasing.proof),
            ),
            _ => (None, false, None),
        };
        if reported {
            match unconfirmed {
                None => self.emit(LockEvent::Released),
                Some(reason) => self.emit(LockEvent::ReleaseFailed { reason }),
            }
        }
        if let Some(token) = proof.filter(|_| self.pending.is_none() && self.session.is_some()) {
            // Our own release marker came back (so the release committed) after everything we
            // delivered: the successor waits for this word before it reports the term.
            self.send(DbOp::Drained { token });
            if self.stopping {
                self.stage = Stage::Releasing(
                    Term::new(Some(token), self.now),
                    Releasing {
                        word_in_flight: Some(released),
                        ..Releasing::default()
                    },
                );
                return;
            }
        }
        if !released {
            // Nothing was deleted or cleared, so no release marker of ours is coming; and the
            // row was no longer ours: another term began, what we buffered is its holder's.
            self.own_release = None;
            handover = None;
        }
        if self.stopping {
            self.finish_stop(released);
        } else {
            self.stage = Stage::Standby(Standby {
                handover,
                ..Standby::default()
            });
            // Our own release notification must not wake us: wait a full interval.
            self.schedule_retry(None);
        }
    }

    /// The `drained` marker of a stop's release ended (sent or not): the stop is done.
    fn proof_done(&mut self) {
        if let Some(released) = self.word_in_flight() {
            self.finish_stop(released);
        }
    }

    /// Stopping with only the release's `drained` marker in flight: whether the release was
    /// confirmed.
    fn word_in_flight(&self) -> Option<bool> {
        match self.stage {
            Stage::Releasing(_, Releasing { word_in_flight, .. }) => word_in_flight,
            _ => None,
        }
    }

    // ----- inputs -----

    fn on_start(&mut self) {
        if self.stopping || self.started {
            return;
        }
        self.started = true;
        self.stood_down = false;
        if self.phase() == Phase::Standby && self.session.is_some() && !self.confirming() {
            if self.pending.is_none() {
                self.send(DbOp::Acquire);
            } else if !self.acquire_in_flight() {
                if let Some(standby) = self.standby_mut() {
                    standby.attempt_due = true;
                }
            }
        }
    }

    fn on_try_acquire(&mut self) {
        if self.phase().is_holder() {
            self.outputs.push_back(Output::AttemptDone { acquired: true });
            return;
        }
        if self.stopping || self.session.is_none() || self.phase() != Phase::Standby {
            self.outputs.push_back(Output::AttemptDone { acquired: false });
            return;
        }
        if let Stage::Confirming(_, confirming) = &mut self.stage {
            // Won already: answered when the term is reported.
            confirming.standby.attempt_waiters += 1;
            return;
        }
        if let Some(standby) = self.standby_mut() {
            standby.attempt_waiters += 1;
        }
        if self.pending.is_none() {
            self.send(DbOp::Acquire);
        }
    }

    fn on_release(&mut self) {
        if self.phase() != Phase::Holding {
            return;
        }
        if self.pending.is_none() {
            self.start_drain();
        } else if let Some(holding) = self.holding_mut() {
            holding.release_requested = true;
        }
    }

    fn on_stand_down(&mut self) {
        if self.stopping {
            return;
        }
        self.stood_down = true;
        self.started = false;
        self.disarm(TimerKind::Retry);
        if let Some(standby) = self.standby_mut() {
            standby.attempt_due = false;
        }
        self.on_release();
    }

    fn on_stop(&mut self, _signal: Option<SignalKind>) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.started = false;
        self.disarm(TimerKind::Retry);
        if let Stage::Confirming(_, confirming) = &mut self.stage {
            // Won, not reported yet: what followed the previous holder's release is ours to
            // deliver (the next holder starts after our `acquired` marker), so the term is
            // reported once confirmed, then released as any holder's at a stop.
            let waiters = std::mem::take(&mut confirming.standby.attempt_waiters);
            self.answer(waiters, false);
            self.arm(TimerKind::Shutdown, self.now + self.config.shutdown_timeout);
            return;
        }
        match self.phase() {
            Phase::Holding | Phase::Draining | Phase::Releasing if self.session.is_some() => {
                self.arm(TimerKind::Shutdown, self.now + self.config.shutdown_timeout);
                if self.phase() == Phase::Holding {
                    self.on_release();
                }
            }
            Phase::Holding | Phase::Draining => self.lose(LostReason::SessionLost),
            Phase::Stopped => {}
            Phase::Standby if self.session.is_some() && self.acquire_in_flight() => {
                // The attempt may succeed: wait for its answer so that a row we just won is
                // released, not left to block the others (forever under Classic while the
                // session lives).
                self.arm(TimerKind::Shutdown, self.now + self.config.shutdown_timeout);
            }
            Phase::Standby if self.session.is_some() && self.word_pending() => {
                // An earlier release's `drained` word is in flight: its successor waits for it,
                // so the connection must outlive it.
                self.arm(TimerKind::Shutdown, self.now + self.config.shutdown_timeout);
            }
            Phase::Standby | Phase::Releasing => self.finish_stop(true),
        }
    }

    fn acquire_in_flight(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.op == DbOp::Acquire)
    }

    /// Whether a released term's `drained` word awaits its reply.
    fn word_pending(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| matches!(p.op, DbOp::Drained { .. }))
    }

    fn on_session_up(&mut self, session: SessionId) {
        if self.phase() == Phase::Stopped {
            return;
        }
        // Ids only grow: an older or equal one is a replay of a session that is gone or current.
        if self.newest_session.is_some_and(|newest| newest >= session) {
            return;
        }
        self.newest_session = Some(session);
        if self.session.is_some() {
            self.on_session_down(LostReason::SessionLost);
        }
        self.session = Some(session);
        if self.replay_enabled() && self.phase() == Phase::Standby {
            // A new session hears only what is committed from now on.
            self.replay = Some(Box::new(Replay::listening()));
        }
        self.own_pid = None;
        if self.started && self.phase() == Phase::Standby {
            // After a server restart every process reconnects at once: spread the attempts.
            let delay = self.jitter(self.config.wake_jitter);
            self.arm(TimerKind::Retry, self.now + delay);
        }
    }

    fn on_session_down(&mut self, reason: LostReason) {
        // A won term (reported or still confirming) is ours until its lease expires.
        if let (Protocol::Lease, Stage::Holding(term, _) | Stage::Draining(term, _) | Stage::Confirming(term, _)) =
            (self.config.protocol, &self.stage)
        {
            let expiry = term.confirmed_sent + self.config.lease_ttl + self.config.wake_jitter;
            self.defer_until = Some(expiry + Duration::from_millis(1));
        }
        if let Stage::Confirming(_, confirming) = &self.stage {
            // Never reported: a standby again, its waiters answered below.
            let attempt_waiters = confirming.standby.attempt_waiters;
            self.disarm(TimerKind::MarkerWait);
            self.stage = Stage::Standby(Standby {
                attempt_waiters,
                ..Standby::default()
            });
        }
        self.session = None;
        self.refused_by = None;
        self.replay = None;
        self.pending = None;
        self.disarm(TimerKind::RequestTimeout);
        self.disarm(TimerKind::Retry);
        self.own_release = None;
        self.answer_waiters(false);
        // A standby forgets its buffer and its attempt; a holder's and a releasing lock's data
        // go with their stage below.
        if let Some(standby) = self.standby_mut() {
            *standby = Standby::default();
        }
        match self.phase() {
            _ if self.word_in_flight().is_some() => self.proof_done(),
            Phase::Holding | Phase::Draining => self.lose(reason),
            Phase::Releasing => self.release_done(Some(reason)),
            Phase::Standby | Phase::Stopped => {}
        }
    }

    fn on_db_result(&mut self, id: RequestId, result: Result<Reply, DbError>) {
        if self.pending.as_ref().map(|p| p.id) != Some(id) {
            return; // a late reply of an earlier request or session
        }
        let Some(pending) = self.pending.take() else { return };
        self.disarm(TimerKind::RequestTimeout);
        if let Err(DbError::SessionLost) = result {
            // The driver follows with SessionDown, which decides; until then carry on as after
            // any failure, so that a driver that does not follow cannot leave the lock stuck.
            self.on_request_failed(pending.op, DbError::SessionLost);
            return;
        }
        match (pending.op, result) {
            (DbOp::Acquire, Ok(Reply::Acquire(reply))) => self.on_acquire_reply(reply, pending.sent_at),
            (DbOp::Renew { .. }, Ok(Reply::Renew { owned })) => self.on_renew_reply(owned, pending.sent_at),
            (DbOp::Drain { .. }, Ok(Reply::Drained)) => {
                if let Some(drain) = self.drain_mut() {
                    drain.confirmed = true;
                    if drain.handover.is_some() {
                        self.end_drain();
                    } else {
                        self.arm(TimerKind::MarkerWait, self.now + self.config.marker_wait);
                    }
                }
            }
            (DbOp::Release { .. }, Ok(Reply::Release { released })) => {
                // Not released: the row was no longer this term's.
                let outcome = (!released).then_some(LostReason::Superseded);
                if self.phase() == Phase::Releasing {
                    self.release_done(outcome);
                } else if let Some(drain) = self.drain_mut().filter(|drain| drain.merged) {
                    // The release is the drain point: its marker ends the delivery (it reached
                    // our connection before this reply, but may be fed after it); without a
                    // release no marker comes.
                    drain.reply = Some(outcome);
                    if !released {
                        self.end_drain();
                    }
                }
            }
            (DbOp::Drained { .. }, Ok(Reply::Drained)) => self.proof_done(),
            (DbOp::TerminateStale { pid, .. }, Ok(Reply::Terminate(outcome))) => {
                if outcome == TerminateOutcome::NotPermitted {
                    self.warn_terminate(pid);
                }
            }
            (DbOp::TerminateStale { pid, .. }, Err(DbError::PermissionDenied(_))) => self.warn_terminate(pid),
            (op, Ok(reply)) => {
                let error = DbError::Failed(format!("reply {reply:?} does not answer {}", op.name()));
                self.on_request_failed(op, error);
            }
            (op, Err(error)) => self.on_request_failed(op, error),
        }
    }

    fn warn_terminate(&mut self, pid: i32) {
        if !std::mem::replace(&mut self.warned_terminate, true) {
            self.emit(LockEvent::Warning(Warning::TerminateNotPermitted { pid }));
        }
    }

    fn on_request_failed(&mut self, op: DbOp, error: DbError) {
        let name = op.name();
        let error_missing = error.is_schema_missing();
        let error_lost = error == DbError::SessionLost;
        if error != DbError::SessionLost {
            self.emit(LockEvent::Warning(Warning::RequestFailed { op: name, error }));
        }
        match op {
            DbOp::Acquire => {
                self.answer_waiters(false);
                if let Some(standby) = self.standby_mut() {
                    standby.handover = None;
                    standby.acquired_during_attempt = None;
                }
                if self.phase() == Phase::Stopped {
                    return;
                }
                self.schedule_retry(None);
            }
            DbOp::Renew { .. } if self.phase() == Phase::Holding && error_missing => {
                // The lock table is gone (dropped under the fleet): so is the row naming us.
                self.lose(LostReason::Superseded);
            }
            DbOp::Renew { .. } => {
                // Lease: the fence deadline decides; Classic: check again next period.
                if self.phase() == Phase::Holding {
                    self.arm(TimerKind::Renew, self.now + self.config.renew_interval);
                }
            }
            DbOp::Drain { .. } => {
                if self.phase() == Phase::Draining {
                    self.end_drain();
                }
            }
            DbOp::Release { .. } => {
                let reason = if error_lost {
                    LostReason::SessionLost
                } else {
                    LostReason::ReleaseUnconfirmed
                };
                if self.phase() == Phase::Releasing {
                    self.release_done(Some(reason));
                } else if let Some(drain) = self.drain_mut().filter(|drain| drain.merged) {
                    drain.reply = Some(Some(reason));
                    self.end_drain();
                }
            }
            DbOp::Drained { .. } => self.proof_done(),
            DbOp::TerminateStale { .. } => {}
        }
    }

    fn on_acquire_reply(&mut self, reply: AcquireReply, sent_at: Timestamp) {
        let acquired_marker = self
            .standby_mut()
            .and_then(|standby| standby.acquired_during_attempt.take());
        match (reply.acquired, reply.token, reply.holder_token, reply.holder_pid) {
            (true, Some(token), _, Some(pid)) => {
                // Our own term: no compaction, the log is about to be replayed whole.
                self.own_pid = Some(pid);
                self.table_named(token, pid);
            }
            (true, _, _, pid) => self.own_pid = pid,
            (false, _, Some(token), Some(pid)) => self.learn_holder(token, pid),
            (false, ..) => {}
        }
        self.refused_by = match (reply.acquired, reply.holder_token, reply.holder_pid) {
            (false, Some(_), Some(pid)) => Some(pid),
            _ => None,
        };
        if reply.acquired && (self.stopping || self.phase() == Phase::Stopped) {
            // Won while stopping: give it back at once, without ever reporting it.
            self.answer_waiters(false);
            if self.phase() == Phase::Standby {
                self.stage = Stage::Releasing(Term::new(reply.token, sent_at), Releasing::default());
            }
            self.send(DbOp::Release { token: reply.token });
            if self.phase() == Phase::Stopped {
                // Best effort, nobody waits for it: no timeout may reset the shared session.
                self.disarm(TimerKind::RequestTimeout);
            }
            return;
        }
        let usable = self.config.protocol == Protocol::Classic || self.fence_deadline(sent_at) > self.now;
        if reply.acquired && self.phase() == Phase::Standby && usable {
            if acquired_marker.is_some_and(|marker| Some(marker) != reply.token) {
                // Another term began after our buffer did: what we buffered was its holder's.
                if let Some(standby) = self.standby_mut() {
                    standby.handover = None;
                }
            }
            self.win(reply.token, sent_at, reply.previous);
            if let Some(stale) = reply.stale_holder {
                self.send(DbOp::TerminateStale {
                    pid: stale.pid,
                    app: stale.app,
                });
            }
            return;
        }
        // Not acquired, or acquired too late to be of use (the lease would already be fenced):
        // leave it to expire.
        self.answer_waiters(false);
        let classic = self.config.protocol == Protocol::Classic;
        let Some(standby) = self.standby_mut() else { return };
        // A peer's `acquired` marker cancels any wake, as does the wake itself once taken.
        let woken = std::mem::take(&mut standby.woken);
        let successor = standby.woken_successor.take();
        if acquired_marker.is_some() {
            // A peer won while we were asking: the stream is its.
            standby.handover = None;
            self.schedule_retry(reply.lease_remaining);
        } else if woken {
            self.schedule_wake_after(successor);
        } else {
            // The holder may still be between its drain marker and its release: keep the buffer.
            // Under `Lease` a winner's `acquired` marker drops it; under `Classic` (no such
            // marker) a failed attempt after the release marker means another standby won.
            if classic && standby.handover.as_ref().is_some_and(|handover| handover.released) {
                standby.handover = None;
            }
            self.schedule_retry(reply.lease_remaining);
        }
    }

    fn on_renew_reply(&mut self, owned: bool, sent_at: Timestamp) {
        if !self.phase().is_holder() {
            return;
        }
        if !owned {
            self.lose(LostReason::Superseded);
            return;
        }
        if let Stage::Holding(term, _) | Stage::Draining(term, _) = &mut self.stage {
            term.confirmed_sent = term.confirmed_sent.max(sent_at);
            let sent = term.confirmed_sent;
            if self.config.protocol == Protocol::Lease {
                self.arm(TimerKind::Fence, self.fence_deadline(sent));
            }
        }
        if let Stage::Holding(_, holding) = self.stage {
            if !holding.release_requested && !holding.renew_due {
                self.arm(TimerKind::Renew, (sent_at + self.config.renew_interval).max(self.now));
            }
        }
    }

    fn on_notification(&mut self, channel: &str, payload: String, pid: i32) {
        if channel == self.channel.as_str() {
            self.on_data(payload);
        } else if let Some(marker) = Marker::read(self.config.protocol, &self.channel, channel, &payload) {
            let successor = match self.config.protocol {
                Protocol::Lease => Marker::successor(&payload),
                Protocol::Classic => None,
            };
            self.on_marker(marker, pid, successor);
        }
    }

    fn on_data(&mut self, payload: String) {
        let limit = self.config.handover_buffer.max(1);
        let delivering = matches!(
            self.stage,
            Stage::Holding(..) | Stage::Draining(_, Drain { handover: None, .. })
        );
        if !delivering {
            if let Some(replay) = &mut self.replay {
                let dropped = replay.push_data(payload.clone(), self.config.replay_limit, self.config.replay_bytes);
                if let Some(dropped) = dropped {
                    self.emit(LockEvent::Warning(Warning::ReplayOverflow { dropped }));
                }
            }
        }
        let dropped = match &mut self.stage {
            Stage::Holding(..) | Stage::Draining(_, Drain { handover: None, .. }) => {
                self.outputs.push_back(Output::Deliver { payload, replay: false });
                None
            }
            // After a drain marker (a standby's, or our own while draining or releasing).
            Stage::Standby(Standby {
                handover: Some(handover),
                ..
            })
            | Stage::Draining(
                _,
                Drain {
                    handover: Some(handover),
                    ..
                },
            )
            | Stage::Releasing(
                _,
                Releasing {
                    handover: Some(handover),
                    ..
                },
            ) => handover.push(payload, limit),
            Stage::Confirming(_, confirming) => match &mut confirming.standby.handover {
                Some(handover) => handover.push(payload, limit),
                None => None,
            },
            _ => None,
        };
        if let Some(dropped) = dropped {
            self.emit(LockEvent::Warning(Warning::HandoverBufferOverflow { dropped }));
        }
    }

    fn is_own(&self, token: Option<FenceToken>) -> bool {
        match self.config.protocol {
            Protocol::Classic => true,
            Protocol::Lease => token.is_some() && token == self.token(),
        }
    }

    fn is_own_release(&self, token: Option<FenceToken>) -> bool {
        match (self.own_release, self.config.protocol) {
            (Some(_), Protocol::Classic) => true,
            (Some(own), Protocol::Lease) => own.is_some() && own == token,
            (None, _) => false,
        }
    }

    /// A lock-channel marker from backend `pid`; `successor`: the standby a release named.
    fn on_marker(&mut self, marker: Marker, pid: i32, successor: Option<i32>) {
        let token = match marker {
            Marker::Draining(token) | Marker::Released(token) => token,
            Marker::Acquired(token) | Marker::Progress(token, _) | Marker::Drained(token) => Some(token),
        };
        let trust = self.trust(token, pid);
        match trust {
            Trust::Forged => {
                // Anyone who can connect can NOTIFY: a marker of a known term that its holder's
                // backend did not send changes nothing. The log keeps it, never trusted: after a
                // schema drop the new row's term of the same token is a real one, and the table
                // may name its backend at our win (its absence would prove the log began later).
                self.count_ignored(pid);
                if let Some(replay) = &mut self.replay {
                    replay.push_mark(pid, marker);
                }
                return;
            }
            Trust::Own => {
                if let (
                    Stage::Holding(term, _) | Stage::Draining(term, _) | Stage::Confirming(term, _),
                    Marker::Acquired(_) | Marker::Progress(..),
                ) = (&mut self.stage, marker)
                {
                    // Our own marker came back: everything before it has been delivered.
                    let seq = match marker {
                        Marker::Progress(_, progress) => progress.seq,
                        _ => 0,
                    };
                    term.seen = term.seen.max(Some(seq));
                }
            }
            Trust::Holder | Trust::Stale | Trust::Unverified => {}
        }
        if self.config.protocol == Protocol::Lease {
            // Where each term's delivery ended, as its sender said: a win of that term's
            // successor may wait for its `drained` marker.
            match (marker, token) {
                (Marker::Released(_), Some(token)) => self.release_seen.push((token, pid)),
                (Marker::Draining(_) | Marker::Drained(_), Some(token)) => self.drain_seen.push((token, pid)),
                _ => {}
            }
        }
        if let Some(replay) = &mut self.replay {
            replay.push_mark(pid, marker);
            if trust == Trust::Holder && !matches!(marker, Marker::Released(_)) {
                if let (Some(token), Some((_, holder))) = (token, self.holder_known) {
                    replay.compact(token, holder);
                }
            }
        }
        if let Stage::Confirming(_, confirming) = &self.stage {
            let previous = confirming.previous;
            if marker == Marker::Drained(previous.token) && Some(pid) == previous.holder_pid {
                self.confirm();
            }
            return;
        }
        if matches!(marker, Marker::Drained(_)) {
            return;
        }
        if matches!(marker, Marker::Progress(..)) || trust == Trust::Stale {
            return;
        }
        if trust == Trust::Unverified && self.phase() == Phase::Standby && !self.plausible(marker, token) {
            // Terms follow each other one token at a time, and the table named the current one:
            // a claim far beyond it is noise, and must not cancel or postpone anything (a
            // forger repeating it would otherwise keep every standby from ever attempting).
            if let Some(pid) = token.map(|_| pid) {
                self.count_ignored(pid);
            }
            return;
        }
        if let Marker::Released(token) = marker {
            if matches!(self.phase(), Phase::Releasing | Phase::Standby) && self.is_own_release(token) {
                // Our own release: it must not wake us (we just gave the lock up), but it does
                // end the term in the stream.
                self.own_release = None;
                let classic = self.config.protocol == Protocol::Classic;
                if let Stage::Standby(Standby { handover, .. }) | Stage::Releasing(_, Releasing { handover, .. }) =
                    &mut self.stage
                {
                    if classic {
                        // We attempt again only after a full interval, and Classic announces no
                        // new term: by then a standby has likely won and delivered what we
                        // buffered, and if it crashed since, we could not tell. At most once:
                        // drop it.
                        *handover = None;
                    } else if let Some(handover) = handover {
                        handover.released = true;
                    }
                }
                return;
            }
        }
        match (self.phase(), marker) {
            (Phase::Draining, Marker::Released(token))
                if self.is_own_release(token) && self.awaits_own_marker(true) =>
            {
                // Our own release, the drain point: everything before it is delivered, what
                // follows is the next holder's (buffered in case that is us again).
                self.own_release = None;
                if let Some(drain) = self.drain_mut() {
                    drain.handover = Some(Box::default());
                }
                self.replay_after_own();
                self.end_drain();
            }
            (Phase::Draining, Marker::Draining(token)) if self.is_own(token) && self.awaits_own_marker(false) => {
                let confirmed = self.drain_mut().is_some_and(|drain| {
                    drain.handover = Some(Box::default());
                    drain.confirmed
                });
                // From our own drain marker on the stream is the next holder's.
                self.replay_after_own();
                if confirmed {
                    self.end_drain();
                }
            }
            // A marker of a newer term while we hold. Anyone who can connect can NOTIFY the lock
            // channel, so a marker proves nothing: the table decides, at the next renewal (which
            // reports `Superseded` if the row is no longer this term's). Under `Lease` a newer
            // term cannot even exist while this one's lease is valid (this session is alive, it
            // delivers this very notification, and the lease expires only after we fence
            // ourselves), so such a marker is forged, or clocks drift beyond the bound.
            (
                Phase::Holding | Phase::Draining,
                Marker::Acquired(token) | Marker::Draining(Some(token)) | Marker::Released(Some(token)),
            ) if self.token().is_some_and(|own| own < token) => {
                let own = self.token();
                if self.warned_marker != own {
                    self.warned_marker = own;
                    self.emit(LockEvent::Warning(Warning::UnconfirmedMarker { token }));
                }
            }
            (Phase::Releasing, Marker::Acquired(token)) if self.token().is_none_or_below(token) => {
                // The next holder's term began (its marker outran our release reply): what we
                // buffered since our drain marker is its to deliver.
                if let Stage::Releasing(_, releasing) = &mut self.stage {
                    releasing.handover = None;
                }
            }
            (Phase::Standby, Marker::Draining(_)) => {
                // Everything after this point belongs to the next holder.
                if let Some(standby) = self.standby_mut() {
                    standby.handover = Some(Box::default());
                    standby.acquired_during_attempt = None;
                }
            }
            (Phase::Standby, Marker::Released(_)) => {
                let in_flight = self.acquire_in_flight();
                if let Some(standby) = self.standby_mut() {
                    if standby.handover.is_none() {
                        standby.acquired_during_attempt = None;
                    }
                    standby.handover.get_or_insert_with(Box::default).released = true;
                }
                self.emit(LockEvent::PeerReleased);
                if in_flight {
                    if let Some(standby) = self.standby_mut() {
                        standby.woken = true;
                        standby.woken_successor = successor;
                    }
                } else {
                    self.schedule_wake_after(successor);
                }
            }
            (Phase::Standby, Marker::Acquired(token)) if self.acquire_in_flight() => {
                // Possibly our own acquisition, committed before its reply reached us: the reply
                // tells (dropping the buffer now would lose the handover).
                if let Some(standby) = self.standby_mut() {
                    standby.woken = false;
                    if standby.acquired_during_attempt.is_some_and(|seen| seen != token) {
                        // Two terms began during one attempt: the buffer may hold the other
                        // term's messages. At most once: drop it.
                        standby.handover = None;
                    } else if standby.handover.is_none() {
                        // A takeover without a handover (crash, expiry): if this term is ours,
                        // what follows its marker is ours to deliver, even before the reply
                        // arrives.
                        standby.handover = Some(Box::default());
                    }
                    let newest = standby.acquired_during_attempt.map_or(token, |t| t.max(token));
                    standby.acquired_during_attempt = Some(newest);
                }
            }
            (Phase::Standby, Marker::Acquired(token)) => {
                // Someone won: no point in attempting now, and the stream is theirs. Once per
                // claimed term: a repeated claim postpones nothing more.
                self.postponed_for = Some(token);
                if let Some(standby) = self.standby_mut() {
                    standby.handover = None;
                    standby.woken = false;
                    standby.woken_successor = None;
                }
                if self.can_compete() && self.pending.is_none() {
                    let ttl = self.config.lease_ttl;
                    self.schedule_retry(Some(ttl));
                }
            }
            _ => {}
        }
    }

    fn after_input(&mut self) {
        if self.pending.is_none() {
            match &mut self.stage {
                Stage::Holding(
                    _,
                    Holding {
                        release_requested: true,
                        ..
                    },
                ) => self.start_drain(),
                Stage::Holding(_, holding) if holding.renew_due => {
                    holding.renew_due = false;
                    let op = self.renew_op();
                    self.send(op);
                }
                Stage::Releasing(_, releasing) if releasing.word_in_flight.is_none() => {
                    let token = self.token();
                    self.send(DbOp::Release { token });
                }
                Stage::Standby(standby)
                    if (standby.attempt_waiters > 0 || standby.attempt_due)
                        && self.session.is_some()
                        && !self.stopping =>
                {
                    // A `TryAcquire`, `Start` or retry that came while another request was in
                    // flight.
                    self.send(DbOp::Acquire);
                }
                _ => {}
            }
        }
        if self.phase() == Phase::Standby
            && self.stopping
            && !self.acquire_in_flight()
            && !self.word_pending()
            && !self.confirming()
        {
            // A stop that waited for an attempt's answer: nothing is held, so it is done.
            self.finish_stop(true);
        }
        if self.phase() == Phase::Standby
            && self.can_compete()
            && self.pending.is_none()
            && self.timer(TimerKind::Retry).is_none()
        {
            self.schedule_retry(None);
        }
    }
}

/// Clamps every setting into a range the state machine can run with: positive durations of at
/// least a microsecond (so every re-armed deadline lies strictly in the future), at most
/// [`MAX_SETTING`], a jitter fraction within `0.0..=0.9` and a buffer of at least one message.
pub(crate) fn clamp_config(mut config: LockConfig) -> LockConfig {
    let positive = |d: Duration| d.clamp(Duration::from_micros(1), MAX_SETTING);
    config.acquire_interval = positive(config.acquire_interval);
    config.renew_interval = positive(config.renew_interval);
    config.request_timeout = positive(config.request_timeout);
    config.shutdown_timeout = positive(config.shutdown_timeout);
    config.marker_wait = positive(config.marker_wait);
    config.crash_watch_refresh = positive(config.crash_watch_refresh);
    config.lease_ttl = positive(config.lease_ttl);
    config.wake_jitter = config.wake_jitter.min(MAX_SETTING);
    config.fence_margin = config.fence_margin.min(MAX_SETTING);
    config.retry_jitter = if config.retry_jitter.is_nan() {
        0.0
    } else {
        config.retry_jitter.clamp(0.0, 0.9)
    };
    config.handover_buffer = config.handover_buffer.max(1);
    config
}

trait TokenExt {
    fn is_none_or_below(&self, token: FenceToken) -> bool;
}

impl TokenExt for Option<FenceToken> {
    /// `true` when there is no own token or it is older than `token`.
    fn is_none_or_below(&self, token: FenceToken) -> bool {
        self.map_or(true, |own| own < token)
    }
}
