//! The crash watch, inputs by hand: a standby refused by another process's holder waits on that
//! holder over a second connection, sends no periodic attempt while it waits, attempts at once
//! when the wait says the holder is gone, and falls back to its ordinary retries whenever the
//! watch is not running.

use std::time::Duration;

use pgiplock_core::*;

const KEY: LockKey = LockKey(1);
const HOLDER_PID: i32 = 77;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn lock_config(crash_watch: bool) -> LockConfig {
    let mut c = LockConfig::new(Protocol::Lease);
    c.lease_ttl = ms(3_000);
    c.renew_interval = ms(600);
    c.fence_margin = ms(300);
    c.acquire_interval = ms(1_000);
    c.request_timeout = ms(1_000);
    c.crash_watch = crash_watch;
    c.crash_watch_refresh = ms(20_000);
    c
}

struct Rig {
    session: Session,
    now: Timestamp,
}

impl Rig {
    fn new(crash_watch: bool) -> Rig {
        let mut session = Session::new(SessionConfig::default(), 3);
        session
            .add_lock(
                KEY,
                ChannelName::new("jobs").unwrap(),
                SchemaName::new("locks").unwrap(),
                lock_config(crash_watch),
                5,
            )
            .unwrap();
        Rig {
            session,
            now: Timestamp::from_millis(1_000),
        }
    }

    fn at(&mut self, now: Timestamp, input: SessionInput) -> Vec<SessionOutput> {
        self.now = self.now.max(now);
        self.session.handle_input(self.now, input);
        let out: Vec<SessionOutput> = std::iter::from_fn(|| self.session.poll_output()).collect();
        if let Some(at) = self.session.poll_timeout() {
            assert!(at > self.now, "deadline {at:?} not after {:?}", self.now);
        }
        out
    }

    fn after(&mut self, d: Duration, input: SessionInput) -> Vec<SessionOutput> {
        let now = self.now + d;
        self.at(now, input)
    }

    fn tick(&mut self) -> Vec<SessionOutput> {
        let at = self.session.poll_timeout().expect("a deadline");
        self.at(at, SessionInput::Tick)
    }

    fn reply(&mut self, req: &SessionRequest, result: Result<OpReply, DbError>) -> Vec<SessionOutput> {
        self.after(ms(1), SessionInput::Reply { id: req.id, result })
    }

    /// Connects, sets the lock up and returns its first attempt.
    fn up(&mut self) -> SessionRequest {
        let out = self.after(
            Duration::ZERO,
            SessionInput::Call {
                call: CallId(1),
                lock: KEY,
                request: LockCall::Init,
            },
        );
        let out = if out.is_empty() { self.tick() } else { out };
        let session = out
            .iter()
            .find_map(|o| match o {
                SessionOutput::Connect { session } => Some(*session),
                _ => None,
            })
            .expect("a connect");
        let out = self.after(
            ms(2),
            SessionInput::Connected {
                session,
                app: "app-1".into(),
                pid: 100,
            },
        );
        let bootstrap = request(&out, "bootstrap").expect("a bootstrap");
        let out = self.reply(&bootstrap, Ok(OpReply::Done));
        let listen = request(&out, "listen").expect("a listen");
        let out = self.reply(&listen, Ok(OpReply::Done));
        match request(&out, "acquire") {
            Some(attempt) => attempt,
            None => request(&self.tick(), "acquire").expect("an attempt"),
        }
    }

    /// Refuses `attempt`: another process's holder, its lease 2.5 s from its end.
    fn refuse(&mut self, attempt: &SessionRequest) -> Vec<SessionOutput> {
        self.reply(attempt, refused())
    }

    /// Sets up, refuses the first attempt, opens the watch connection; returns it and the wait.
    fn watching(&mut self) -> (SessionId, SessionRequest) {
        let attempt = self.up();
        let out = self.refuse(&attempt);
        let watch = watch_connect(&out).expect("the watch connects");
        let out = self.after(ms(1), SessionInput::WatchConnected { session: watch });
        let wait = request(&out, "await_holder").expect("a wait");
        assert_eq!(wait.session, watch, "the wait runs on the watch connection");
        (watch, wait)
    }
}

fn refused() -> Result<OpReply, DbError> {
    Ok(OpReply::Lock(Reply::Acquire(AcquireReply {
        lease_remaining: Some(ms(2_500)),
        holder_pid: Some(HOLDER_PID),
        holder_token: Some(FenceToken(3)),
        ..AcquireReply::locked()
    })))
}

fn request(out: &[SessionOutput], name: &str) -> Option<SessionRequest> {
    out.iter().find_map(|o| match o {
        SessionOutput::Execute(r) if r.op.name() == name => Some(r.clone()),
        _ => None,
    })
}

fn watch_connect(out: &[SessionOutput]) -> Option<SessionId> {
    out.iter().find_map(|o| match o {
        SessionOutput::WatchConnect { session } => Some(*session),
        _ => None,
    })
}

/// Ticks through every deadline up to `until`, collecting the outputs.
fn run_for(rig: &mut Rig, d: Duration) -> Vec<SessionOutput> {
    let until = rig.now + d;
    run_until(rig, until)
}

fn run_until(rig: &mut Rig, until: Timestamp) -> Vec<SessionOutput> {
    let mut all = Vec::new();
    while let Some(at) = rig.session.poll_timeout().filter(|at| *at <= until) {
        all.extend(rig.at(at, SessionInput::Tick));
    }
    all
}

fn attempts(out: &[SessionOutput]) -> usize {
    out.iter()
        .filter(|o| matches!(o, SessionOutput::Execute(r) if r.op.name() == "acquire"))
        .count()
}

#[test]
fn a_refused_standby_waits_on_its_holder_and_attempts_at_once_when_it_is_gone() {
    let mut rig = Rig::new(true);
    let (_, wait) = rig.watching();
    let SessionOp::AwaitHolder { schema, pid, max } = &wait.op else {
        panic!()
    };
    assert_eq!((schema.as_str(), *pid, *max), ("locks", HOLDER_PID, ms(20_000)));
    assert!(rig.session.lock(KEY).unwrap().is_watched());
    // While the wait runs, no attempt goes out: not at the lease's end, not at the interval.
    let quiet = run_for(&mut rig, ms(15_000));
    assert_eq!(attempts(&quiet), 0, "{quiet:?}");
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Gone)));
    assert_eq!(attempts(&out), 1, "the holder is gone: attempt now, {out:?}");
    assert!(!rig.session.lock(KEY).unwrap().is_watched());
}

/// `released`: the release's own marker wakes the standbys (its named successor first), so the
/// watch's answer sends no attempt; the standby is no longer watched and has its ordinary retry
/// back, and the watch does not wait on that holder again.
#[test]
fn a_released_holder_leaves_the_wake_to_the_release_marker() {
    let mut rig = Rig::new(true);
    let (_, wait) = rig.watching();
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Released)));
    assert_eq!(attempts(&out), 0, "{out:?}");
    assert!(
        request(&out, "await_holder").is_none(),
        "no new wait on a holder that holds nothing"
    );
    assert!(!rig.session.lock(KEY).unwrap().is_watched());
    let later = run_for(&mut rig, ms(3_000));
    assert_eq!(attempts(&later), 1, "the ordinary retry is back: {later:?}");
}

#[test]
fn a_wait_that_times_out_is_issued_again() {
    let mut rig = Rig::new(true);
    let (watch, wait) = rig.watching();
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Timeout)));
    let again = request(&out, "await_holder").expect("the wait again");
    assert_eq!((again.session, &again.op), (watch, &wait.op));
    assert_eq!(attempts(&out), 0);
}

#[test]
fn an_unanswered_wait_resets_the_watch_and_the_standby_retries_on_its_own() {
    let mut rig = Rig::new(true);
    let (watch, _wait) = rig.watching();
    // The wait's bound (20 s) plus the request timeout (1 s), then the watch gives up.
    let out = run_for(&mut rig, ms(21_100));
    assert!(
        out.contains(&SessionOutput::WatchDisconnect { session: watch }),
        "{out:?}"
    );
    assert!(out.iter().any(|o| matches!(
        o,
        SessionOutput::Event(SessionEvent::WatchDown {
            reason: WatchFailure::Timeout,
            ..
        })
    )));
    assert!(!rig.session.lock(KEY).unwrap().is_watched());
    // The lease it was refused by has long expired: it attempts within its wake jitter.
    let later = run_for(&mut rig, ms(100));
    let after_reset: Vec<SessionOutput> = out
        .iter()
        .skip_while(|o| !matches!(o, SessionOutput::WatchDisconnect { .. }))
        .chain(later.iter())
        .cloned()
        .collect();
    assert_eq!(attempts(&after_reset), 1, "ordinary retries again: {after_reset:?}");
}

#[test]
fn a_closed_watch_connection_falls_back_to_retries_and_reconnects_after_the_interval() {
    let mut rig = Rig::new(true);
    let (watch, _wait) = rig.watching();
    let out = rig.after(
        ms(5),
        SessionInput::WatchClosed {
            session: watch,
            error: Some("terminated".into()),
        },
    );
    assert!(out.iter().any(|o| matches!(
        o,
        SessionOutput::Event(SessionEvent::WatchDown {
            reason: WatchFailure::Closed(_),
            ..
        })
    )));
    assert!(!rig.session.lock(KEY).unwrap().is_watched());
    // Falls back: the next attempt at the lease's end, before the acquire interval.
    let start = rig.now;
    let out = run_until(&mut rig, start + ms(2_600));
    let attempt = request(&out, "acquire").expect("an attempt at the lease's end");
    // Refused again by the same holder: after the backoff (the acquire interval) the watch
    // connects again.
    let early = watch_connect(&out);
    let out = rig.refuse(&attempt);
    let reconnect = early
        .or_else(|| watch_connect(&out))
        .or_else(|| watch_connect(&run_until(&mut rig, start + ms(5_000))));
    assert!(reconnect.is_some_and(|s| s != watch));
}

#[test]
fn an_unwatchable_holder_leaves_the_standby_to_its_retries() {
    let mut rig = Rig::new(true);
    let (_, wait) = rig.watching();
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Unwatched)));
    assert!(request(&out, "await_holder").is_none());
    assert!(!rig.session.lock(KEY).unwrap().is_watched());
    let later = run_for(&mut rig, ms(2_600));
    assert_eq!(attempts(&later), 1, "{later:?}");
}

#[test]
fn the_connection_limit_is_reported_as_such() {
    let mut rig = Rig::new(true);
    let attempt = rig.up();
    let out = rig.refuse(&attempt);
    let watch = watch_connect(&out).unwrap();
    let out = rig.after(
        ms(1),
        SessionInput::WatchConnectFailed {
            session: watch,
            cause: "too many connections".into(),
            connection_limit: true,
        },
    );
    assert!(out.iter().any(|o| matches!(
        o,
        SessionOutput::Event(SessionEvent::WatchDown {
            reason: WatchFailure::ConnectionLimit(_),
            ..
        })
    )));
    let refused_at = rig.now;
    // Refused attempts at every lease end meanwhile; the watch stays off for the long backoff
    // (not the acquire interval of 1 s), then connects again.
    let (at, again) = refuse_until(&mut rig, refused_at + WATCH_LIMIT_BACKOFF * 2).expect("the watch connects again");
    assert!(again != watch);
    let waited = at.saturating_duration_since(refused_at);
    assert!(
        waited >= WATCH_LIMIT_BACKOFF && waited < WATCH_LIMIT_BACKOFF + ms(5_000),
        "connected again after {waited:?}"
    );
}

/// A standby that takes over has nothing left to watch: its watch connection stays open for
/// `WATCH_IDLE_CLOSE` (so that a handover's moment without a holder does not cost a reconnect)
/// and then closes, freeing its server slot.
#[test]
fn a_watch_with_nothing_to_watch_closes_after_its_idle_bound() {
    let mut rig = Rig::new(true);
    let (watch, wait) = rig.watching();
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Gone)));
    // From here the standby knows no live holder: nothing to watch.
    let idle_since = rig.now;
    let attempt = request(&out, "acquire").expect("an attempt at once");
    let won = Ok(OpReply::Lock(Reply::Acquire(AcquireReply::won(Some(FenceToken(2))))));
    let mut out = rig.reply(&attempt, won);
    assert!(rig.session.lock(KEY).unwrap().phase().is_holder());
    // The holder's renewals are answered; the watch's connection closes at its idle bound.
    let closed_at = loop {
        if out.contains(&SessionOutput::WatchDisconnect { session: watch }) {
            break rig.now;
        }
        assert!(
            rig.now < idle_since + WATCH_IDLE_CLOSE * 2,
            "the idle watch never closed"
        );
        out = match request(&out, "renew") {
            Some(renew) => rig.reply(&renew, Ok(OpReply::Lock(Reply::Renew { owned: true }))),
            None => rig.tick(),
        };
    };
    let idle = closed_at.saturating_duration_since(idle_since);
    assert!(
        idle >= WATCH_IDLE_CLOSE && idle < WATCH_IDLE_CLOSE + ms(1_000),
        "closed after {idle:?}"
    );
    assert!(rig.session.lock(KEY).unwrap().phase().is_holder());
}

/// Ticks through the deadlines up to `until`, refusing every attempt; the instant and session
/// of the first watch connection on the way.
fn refuse_until(rig: &mut Rig, until: Timestamp) -> Option<(Timestamp, SessionId)> {
    loop {
        let at = rig.session.poll_timeout().filter(|at| *at <= until)?;
        let mut out = rig.at(at, SessionInput::Tick);
        if let Some(attempt) = request(&out, "acquire") {
            out.extend(rig.refuse(&attempt));
        }
        if let Some(watch) = watch_connect(&out) {
            return Some((rig.now, watch));
        }
    }
}

#[test]
fn without_crash_watch_nothing_changes() {
    let mut rig = Rig::new(false);
    let attempt = rig.up();
    let out = rig.refuse(&attempt);
    assert!(watch_connect(&out).is_none());
    let later = run_for(&mut rig, ms(2_600));
    assert!(watch_connect(&later).is_none());
    assert_eq!(attempts(&later), 1);
}

/// Without its main connection the process cannot take over: the wait is cancelled and the
/// watch's connection closed, so that it holds no server slot the reconnection may need; the
/// watch connects again once the main connection is back and the holder still refuses.
#[test]
fn losing_the_main_connection_cancels_the_wait_and_closes_the_watch() {
    let mut rig = Rig::new(true);
    let (watch, wait) = rig.watching();
    let main = rig.session.current().unwrap();
    let out = rig.after(
        ms(1),
        SessionInput::Closed {
            session: main,
            error: None,
        },
    );
    let cancel = out
        .iter()
        .position(|o| *o == SessionOutput::WatchCancel { session: watch });
    let close = out
        .iter()
        .position(|o| *o == SessionOutput::WatchDisconnect { session: watch });
    assert!(cancel.is_some() && close > cancel, "cancelled, then closed: {out:?}");
    // The cancelled wait's reply is ignored.
    let out = rig.reply(&wait, Ok(OpReply::Await(AwaitOutcome::Gone)));
    assert_eq!(attempts(&out), 0);
    assert!(
        watch_connect(&out).is_none(),
        "no watch without the main connection: {out:?}"
    );
}
