//! The session, inputs by hand: connection phases and their deadlines, backoff, setup, routing,
//! calls, and the cross-lock rules (reset, re-bootstrap, read-only, abandon, close); plus a
//! property test that no input sequence leaves any phase waiting past its bound.

use std::time::Duration;

use pgiplock_core::*;
use proptest::prelude::*;

const KEY: LockKey = LockKey(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn lock_config() -> LockConfig {
    let mut c = LockConfig::new(Protocol::Lease);
    c.lease_ttl = ms(3_000);
    c.renew_interval = ms(600);
    c.fence_margin = ms(300);
    c.acquire_interval = ms(1_000);
    c.request_timeout = ms(1_000);
    c
}

/// A session, a hand-made clock, and everything it asked for so far.
struct Rig {
    session: Session,
    now: Timestamp,
    out: Vec<SessionOutput>,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_config(SessionConfig::default())
    }

    fn with_config(config: SessionConfig) -> Rig {
        let mut session = Session::new(config, 3);
        session
            .add_lock(
                KEY,
                ChannelName::new("jobs").unwrap(),
                SchemaName::new("locks").unwrap(),
                lock_config(),
                5,
            )
            .unwrap();
        Rig {
            session,
            now: Timestamp::from_millis(1_000),
            out: Vec::new(),
        }
    }

    fn at(&mut self, now: Timestamp, input: SessionInput) -> Vec<SessionOutput> {
        self.now = self.now.max(now);
        self.session.handle_input(self.now, input);
        let mut out = Vec::new();
        while let Some(o) = self.session.poll_output() {
            out.push(o);
        }
        if let Some(at) = self.session.poll_timeout() {
            assert!(at > self.now, "deadline {at:?} not after {:?}", self.now);
        }
        self.out.extend(out.iter().cloned());
        out
    }

    fn after(&mut self, d: Duration, input: SessionInput) -> Vec<SessionOutput> {
        let now = self.now + d;
        self.at(now, input)
    }

    /// Ticks at the next deadline.
    fn tick(&mut self) -> Vec<SessionOutput> {
        let at = self.session.poll_timeout().expect("a deadline");
        self.at(at, SessionInput::Tick)
    }

    fn call(&mut self, call: u64, request: LockCall) -> Vec<SessionOutput> {
        self.after(
            Duration::ZERO,
            SessionInput::Call {
                call: CallId(call),
                lock: KEY,
                request,
            },
        )
    }

    fn reply(&mut self, req: &SessionRequest, result: Result<OpReply, DbError>) -> Vec<SessionOutput> {
        self.after(ms(1), SessionInput::Reply { id: req.id, result })
    }

    /// Connects (answering the first `Connect`) and sets the lock up; returns the connection.
    fn up(&mut self) -> SessionId {
        let out = self.call(1, LockCall::Init);
        let out = if out.is_empty() { self.tick() } else { out };
        let session = connect_of(&out).expect("a connect");
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
        assert!(out.contains(&SessionOutput::CallDone {
            call: CallId(1),
            result: Ok(CallReply::Done)
        }));
        // The lock attempts after its wake jitter (spread after a reconnect).
        if request(&out, "acquire").is_none() {
            let out = self.tick();
            assert!(request(&out, "acquire").is_some(), "{out:?}");
        }
        session
    }
}

fn connect_of(out: &[SessionOutput]) -> Option<SessionId> {
    out.iter().find_map(|o| match o {
        SessionOutput::Connect { session } => Some(*session),
        _ => None,
    })
}

fn request(out: &[SessionOutput], name: &str) -> Option<SessionRequest> {
    out.iter().find_map(|o| match o {
        SessionOutput::Execute(r) if r.op.name() == name => Some(r.clone()),
        _ => None,
    })
}

fn has_event(out: &[SessionOutput], pred: impl Fn(&SessionEvent) -> bool) -> bool {
    out.iter().any(|o| matches!(o, SessionOutput::Event(e) if pred(e)))
}

fn acquired(token: u64) -> Result<OpReply, DbError> {
    Ok(OpReply::Lock(Reply::Acquire(AcquireReply {
        acquired: true,
        token: Some(FenceToken(token)),
        lease_remaining: None,
        stale_holder: None,
        ..AcquireReply::locked()
    })))
}

#[test]
fn init_connects_bootstraps_listens_then_competes() {
    let mut rig = Rig::new();
    assert_eq!(rig.session.state().phase, ConnPhase::Down);
    rig.up();
    assert_eq!(rig.session.state().phase, ConnPhase::Up);
    let acquire = request(&rig.out, "acquire").expect("the lock attempts once ready");
    let out = rig.reply(&acquire, acquired(1));
    assert!(out.contains(&SessionOutput::Lock {
        lock: KEY,
        event: LockEvent::Acquired {
            token: Some(FenceToken(1))
        }
    }));
}

#[test]
fn a_silent_connect_is_abandoned_at_its_deadline_and_retried_with_backoff() {
    let mut rig = Rig::new();
    let out = rig.call(1, LockCall::Init);
    let first = connect_of(&out).expect("connects at once");
    let started = rig.now;
    // Nothing answers: the attempt is abandoned at the connect timeout, and `init` fails then.
    let out = rig.tick();
    assert_eq!(rig.now, started + SessionConfig::default().connect_timeout);
    assert!(out.contains(&SessionOutput::AbortConnect { session: first }));
    assert!(out.iter().any(|o| matches!(
        o,
        SessionOutput::CallDone {
            call: CallId(1),
            result: Err(CallError::Disconnected { .. })
        }
    )));
    assert!(has_event(
        &out,
        |e| matches!(e, SessionEvent::ConnectFailed { session, .. } if *session == first)
    ));
    assert_eq!(rig.session.state().phase, ConnPhase::Down);
    // Every later delay stays within [min / 2, max] and the backoff doubles up to the cap.
    let mut delays = Vec::new();
    for _ in 0..10 {
        let down_at = rig.now;
        let out = rig.tick();
        let session = connect_of(&out).expect("a new attempt");
        delays.push(rig.now.saturating_duration_since(down_at));
        let out = rig.after(
            ms(5),
            SessionInput::ConnectFailed {
                session,
                cause: "refused".into(),
            },
        );
        assert!(has_event(&out, |e| matches!(e, SessionEvent::ConnectFailed { .. })));
    }
    let config = SessionConfig::default();
    assert!(delays
        .iter()
        .all(|d| *d >= config.backoff_min / 2 && *d <= config.backoff_max));
    assert!(*delays.last().unwrap() >= config.backoff_max / 2, "{delays:?}");
}

#[test]
fn a_setup_statement_unanswered_resets_the_connection() {
    let mut rig = Rig::new();
    let out = rig.call(1, LockCall::Init);
    let session = connect_of(&out).unwrap();
    let out = rig.after(
        ms(1),
        SessionInput::Connected {
            session,
            app: "a".into(),
            pid: 1,
        },
    );
    assert!(request(&out, "bootstrap").is_some());
    assert_eq!(rig.session.state().phase, ConnPhase::Preparing);
    let sent = rig.now;
    let out = rig.tick();
    assert_eq!(rig.now, sent + SessionConfig::default().setup_timeout);
    assert!(out.contains(&SessionOutput::Disconnect { session }));
    assert!(has_event(&out, |e| matches!(
        e,
        SessionEvent::Down {
            reason: DownReason::SetupTimeout,
            ..
        }
    )));
    // `init` still waits: the next connection sets the lock up.
    let out = rig.tick();
    let next = connect_of(&out).expect("reconnects");
    let out = rig.after(
        ms(1),
        SessionInput::Connected {
            session: next,
            app: "b".into(),
            pid: 2,
        },
    );
    assert!(request(&out, "bootstrap").is_some());
}

#[test]
fn a_dropped_schema_is_bootstrapped_again_and_standbys_attempt_soon() {
    let mut rig = Rig::new();
    rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    let missing = DbError::server("42P01", "relation \"locks.lease\" does not exist");
    let out = rig.reply(&acquire, Err(missing));
    assert!(has_event(&out, |e| matches!(e, SessionEvent::SchemaMissing { .. })));
    let bootstrap = request(&out, "bootstrap").expect("bootstraps again at once");
    let out = rig.reply(&bootstrap, Ok(OpReply::Done));
    assert!(request(&out, "acquire").is_none());
    // The next attempt comes within the wake jitter, not after a whole retry interval.
    let before = rig.now;
    let out = rig.tick();
    assert!(request(&out, "acquire").is_some());
    assert!(rig.now.saturating_duration_since(before) <= lock_config().wake_jitter);
}

#[test]
fn a_read_only_server_is_reported_and_left() {
    let mut rig = Rig::new();
    let session = rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    let refused = DbError::server("25006", "cannot execute INSERT in a read-only transaction");
    let out = rig.reply(&acquire, Err(refused));
    assert!(has_event(&out, |e| matches!(e, SessionEvent::ReadOnly { .. })));
    assert!(out.contains(&SessionOutput::Lock {
        lock: KEY,
        event: LockEvent::Warning(Warning::ServerReadOnly)
    }));
    assert!(out.contains(&SessionOutput::Disconnect { session }));
    assert!(has_event(&out, |e| matches!(
        e,
        SessionEvent::Down {
            reason: DownReason::ReadOnly,
            ..
        }
    )));
}

#[test]
fn a_request_timeout_resets_the_connection_for_every_lock() {
    let mut rig = Rig::new();
    let session = rig.up();
    assert!(request(&rig.out, "acquire").is_some());
    // No reply: the lock's request timeout resets the shared connection.
    let out = rig.tick();
    assert!(out.contains(&SessionOutput::Disconnect { session }));
    assert!(has_event(&out, |e| matches!(
        e,
        SessionEvent::Down {
            reason: DownReason::RequestTimeout,
            ..
        }
    )));
}

#[test]
fn notifications_reach_only_their_lock_and_only_when_ready() {
    let mut rig = Rig::new();
    let session = rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    rig.reply(&acquire, acquired(1));
    let note = |channel: &str| SessionInput::Notification {
        session,
        channel: channel.into(),
        payload: "7".into(),
        pid: 55,
    };
    let out = rig.after(ms(1), note("jobs"));
    assert!(out.contains(&SessionOutput::Deliver {
        lock: KEY,
        payload: "7".into(),
        replay: false,
    }));
    assert!(rig.after(ms(1), note("other")).is_empty());
    // A notification of an older connection is ignored.
    let stale = SessionInput::Notification {
        session: SessionId(session.0 + 100),
        channel: "jobs".into(),
        payload: "8".into(),
        pid: 55,
    };
    assert!(rig.after(ms(1), stale).is_empty());
}

#[test]
fn an_abandoned_holder_is_released_and_removed() {
    let mut rig = Rig::new();
    rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    rig.reply(&acquire, acquired(1));
    let out = rig.after(ms(1), SessionInput::Abandon { lock: KEY });
    // The release is the drain point: its reply alone does not end the delivery, its own marker
    // does (or marker_wait).
    let release = request(&out, "release").expect("releases at once");
    let out = rig.reply(&release, Ok(OpReply::Lock(Reply::Release { released: true })));
    assert!(!out.contains(&SessionOutput::LockRemoved { lock: KEY }));
    let out = rig.tick();
    assert!(
        request(&out, "drained").is_none(),
        "its marker never came: no word of it"
    );
    assert!(out.contains(&SessionOutput::LockRemoved { lock: KEY }));
    assert!(rig.session.lock(KEY).is_none());
    // Its channels stay listened until the successor confirms (or the linger's bound).
    assert!(request(&out, "unlisten").is_none());
    let out = rig.tick();
    assert!(request(&out, "unlisten").is_some(), "{out:?}");
}

/// A lock-channel notification on the rig's channel.
fn marker(session: SessionId, payload: &str, pid: i32) -> SessionInput {
    SessionInput::Notification {
        session,
        channel: "__PgIpLock__:jobs".into(),
        payload: payload.into(),
        pid,
    }
}

/// Holds the rig's lock (token 1) and stops it by `stop`, answering its release (the drain
/// point); `before_reply`: notifications fed just before the release's reply, by default our
/// own release marker naming backend 200 as the successor. Returns the release reply's outputs.
fn release_held(rig: &mut Rig, stop: SessionInput, before_reply: &[SessionInput]) -> Vec<SessionOutput> {
    let acquire = request(&rig.out, "acquire").unwrap();
    rig.reply(&acquire, acquired(1));
    let out = rig.after(ms(1), stop);
    let release = request(&out, "release").expect("releases at once");
    let session = rig.session.state().session.expect("a session");
    let own = [marker(session, "released:1:200", 100)];
    let before_reply = if before_reply.is_empty() {
        &own[..]
    } else {
        before_reply
    };
    for input in before_reply {
        rig.after(Duration::ZERO, input.clone());
    }
    let mut out = rig.reply(&release, Ok(OpReply::Lock(Reply::Release { released: true })));
    // Its own marker came back: it says so, for its successor to report the term, and the lock
    // is removed once that word is committed.
    let drained = request(&out, "drained").expect("says it drained");
    assert!(!out.contains(&SessionOutput::LockRemoved { lock: KEY }), "{out:?}");
    out.extend(rig.reply(&drained, Ok(OpReply::Lock(Reply::Drained))));
    out
}

#[test]
fn a_released_lock_listens_until_the_named_successor_confirms() {
    let mut rig = Rig::new();
    let session = rig.up();
    let out = release_held(&mut rig, SessionInput::Abandon { lock: KEY }, &[]);
    assert!(out.contains(&SessionOutput::LockRemoved { lock: KEY }));
    assert!(request(&out, "unlisten").is_none());
    // Our own release marker names backend 200: still waiting.
    let out = rig.after(ms(1), marker(session, "released:1:200", 100));
    assert!(request(&out, "unlisten").is_none(), "{out:?}");
    // Our own `acquired` could not come now, and another backend's does: the wait ends.
    let out = rig.after(ms(1), marker(session, "acquired:2", 200));
    let unlisten = request(&out, "unlisten").expect("then unlistens");
    rig.reply(&unlisten, Ok(OpReply::Done));
    // Nothing is left to wait for.
    assert_eq!(rig.session.poll_timeout(), None);
}

#[test]
fn close_after_a_release_closes_the_connection_once_the_successor_confirms() {
    let mut rig = Rig::new();
    let session = rig.up();
    let out = release_held(&mut rig, SessionInput::Close { call: CallId(9) }, &[]);
    assert!(out.contains(&SessionOutput::LockRemoved { lock: KEY }));
    assert!(!out.contains(&SessionOutput::Disconnect { session }), "{out:?}");
    assert_eq!(rig.session.state().phase, ConnPhase::Up);
    // Another lock's channel and a forged claim from our own backend change nothing.
    let other = SessionInput::Notification {
        session,
        channel: "__PgIpLock__:other".into(),
        payload: "acquired:2".into(),
        pid: 200,
    };
    let out = rig.after(ms(1), other);
    assert!(!out.contains(&SessionOutput::Disconnect { session }));
    let out = rig.after(ms(1), marker(session, "acquired:2", 100));
    assert!(!out.contains(&SessionOutput::Disconnect { session }));
    let out = rig.after(ms(1), marker(session, "acquired:2", 200));
    assert!(out.contains(&SessionOutput::Disconnect { session }), "{out:?}");
    // No unlisten: the connection closes instead.
    assert!(request(&out, "unlisten").is_none());
    assert_eq!(out.last(), Some(&SessionOutput::Closed));
}

#[test]
fn close_after_a_release_waits_for_a_silent_successor_only_the_linger() {
    let mut rig = Rig::new();
    let session = rig.up();
    let out = release_held(&mut rig, SessionInput::Close { call: CallId(9) }, &[]);
    assert!(!out.contains(&SessionOutput::Disconnect { session }));
    let released_at = rig.now;
    let out = rig.tick();
    assert_eq!(rig.now, released_at + SessionConfig::default().handover_linger);
    assert!(out.contains(&SessionOutput::Disconnect { session }), "{out:?}");
    assert!(out.contains(&SessionOutput::CallDone {
        call: CallId(9),
        result: Ok(CallReply::Done)
    }));
}

#[test]
fn a_release_that_named_nobody_closes_at_once() {
    let mut rig = Rig::new();
    let session = rig.up();
    // Our own marker names no successor; it may come before the release's reply.
    let early = [marker(session, "released:1", 100)];
    let out = release_held(&mut rig, SessionInput::Close { call: CallId(9) }, &early);
    assert!(out.contains(&SessionOutput::Disconnect { session }), "{out:?}");
    assert_eq!(out.last(), Some(&SessionOutput::Closed));
}

#[test]
fn a_zero_linger_closes_at_once() {
    let mut config = SessionConfig::default();
    config.handover_linger = Duration::ZERO;
    let mut rig = Rig::with_config(config);
    let session = rig.up();
    let out = release_held(&mut rig, SessionInput::Close { call: CallId(9) }, &[]);
    assert!(out.contains(&SessionOutput::Disconnect { session }), "{out:?}");
}

#[test]
fn a_lock_added_again_during_the_linger_keeps_its_channel_listened() {
    let mut rig = Rig::new();
    let session = rig.up();
    release_held(&mut rig, SessionInput::Abandon { lock: KEY }, &[]);
    rig.session
        .add_lock(
            LockKey(2),
            ChannelName::new("jobs").unwrap(),
            SchemaName::new("locks").unwrap(),
            lock_config(),
            6,
        )
        .unwrap();
    let out = rig.after(
        ms(1),
        SessionInput::Call {
            call: CallId(20),
            lock: LockKey(2),
            request: LockCall::Init,
        },
    );
    let listen = request(&out, "listen").expect("the new lock listens");
    rig.reply(&listen, Ok(OpReply::Done));
    let out = rig.after(ms(1), marker(session, "acquired:2", 200));
    assert!(request(&out, "unlisten").is_none(), "{out:?}");
}

#[test]
fn close_stops_every_lock_then_the_connection() {
    let mut rig = Rig::new();
    let session = rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    rig.reply(&acquire, Ok(OpReply::Lock(Reply::Acquire(AcquireReply::locked()))));
    let out = rig.after(ms(1), SessionInput::Close { call: CallId(9) });
    assert!(out.contains(&SessionOutput::LockRemoved { lock: KEY }));
    assert!(out.contains(&SessionOutput::Disconnect { session }));
    assert!(out.contains(&SessionOutput::CallDone {
        call: CallId(9),
        result: Ok(CallReply::Done)
    }));
    assert_eq!(out.last(), Some(&SessionOutput::Closed));
    assert_eq!(rig.session.state().phase, ConnPhase::Closed);
    assert_eq!(rig.session.poll_timeout(), None);
    // Calls after the close fail cleanly.
    let out = rig.call(10, LockCall::Init);
    assert!(matches!(
        out.as_slice(),
        [SessionOutput::CallDone {
            result: Err(CallError::Closed),
            ..
        }]
    ));
}

#[test]
fn acquire_while_disconnected_answers_false_at_once() {
    let mut rig = Rig::new();
    let out = rig.call(1, LockCall::Acquire);
    assert!(out.contains(&SessionOutput::CallDone {
        call: CallId(1),
        result: Ok(CallReply::Acquired(false))
    }));
}

#[test]
fn duplicate_channels_and_keys_are_refused() {
    let mut rig = Rig::new();
    let again = rig.session.add_lock(
        LockKey(2),
        ChannelName::new("jobs").unwrap(),
        SchemaName::new("locks").unwrap(),
        lock_config(),
        1,
    );
    assert_eq!(again, Err(AddLockError::DuplicateChannel("jobs".into())));
    let again = rig.session.add_lock(
        KEY,
        ChannelName::new("other").unwrap(),
        SchemaName::new("locks").unwrap(),
        lock_config(),
        1,
    );
    assert_eq!(again, Err(AddLockError::DuplicateKey(KEY)));
}

// ----- any input sequence: no phase waits past its bound -----

#[derive(Debug, Clone)]
enum Step {
    Wait(u64),
    Tick,
    ConnectOk,
    ConnectFail,
    Close,
    ReplyOldest(u8),
    DropOldest,
    Notify(u8),
    Call(u8),
    Abandon,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..8_000).prop_map(Step::Wait),
        2 => Just(Step::Tick),
        3 => Just(Step::ConnectOk),
        1 => Just(Step::ConnectFail),
        1 => Just(Step::Close),
        6 => (0u8..8).prop_map(Step::ReplyOldest),
        1 => Just(Step::DropOldest),
        2 => (0u8..6).prop_map(Step::Notify),
        3 => (0u8..4).prop_map(Step::Call),
        1 => Just(Step::Abandon),
    ]
}

fn reply_for(req: &SessionRequest, pick: u8) -> Result<OpReply, DbError> {
    match &req.op {
        SessionOp::Lock { op, .. } => match (op, pick) {
            (_, 6) => Err(DbError::server("42P01", "missing")),
            (_, 7) => Err(DbError::server("25006", "read-only")),
            (DbOp::Acquire, p) if p % 2 == 0 => acquired(u64::from(p) + 1),
            (DbOp::Acquire, _) => Ok(OpReply::Lock(Reply::Acquire(AcquireReply::locked()))),
            (DbOp::Renew { .. }, p) => Ok(OpReply::Lock(Reply::Renew { owned: p != 5 })),
            (DbOp::Drain { .. }, _) => Ok(OpReply::Lock(Reply::Drained)),
            (DbOp::Release { .. }, _) => Ok(OpReply::Lock(Reply::Release { released: true })),
            (_, _) => Ok(OpReply::Lock(Reply::Terminate(TerminateOutcome::Gone))),
        },
        _ if pick == 7 => Err(DbError::server("25006", "read-only")),
        _ if pick == 5 => Err(DbError::PermissionDenied("no".into())),
        _ => Ok(OpReply::Done),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_phase_waits_past_its_bound(steps in proptest::collection::vec(step(), 1..120)) {
        let mut session = Session::new(SessionConfig::default(), 11);
        let config = session.config().clone();
        for k in 0..2u64 {
            session.add_lock(
                LockKey(k),
                ChannelName::new(&format!("ch{k}")).unwrap(),
                SchemaName::new("locks").unwrap(),
                lock_config(),
                k,
            ).unwrap();
        }
        let mut now = Timestamp::from_millis(1);
        let mut pending: Vec<SessionRequest> = Vec::new();
        let mut connecting: Option<SessionId> = None;
        let mut current: Option<SessionId> = None;
        let mut calls = 0u64;
        let mut open_calls = std::collections::BTreeSet::new();
        for step in steps {
            let input = match step {
                Step::Wait(d) => {
                    // Never sleep past the next deadline: the driver wakes for it.
                    let target = now + ms(d);
                    now = session.poll_timeout().map_or(target, |at| at.min(target));
                    SessionInput::Tick
                }
                Step::Tick => SessionInput::Tick,
                Step::ConnectOk => match connecting.take() {
                    Some(s) => SessionInput::Connected { session: s, app: format!("a{}", s.0), pid: 7 },
                    None => SessionInput::Tick,
                },
                Step::ConnectFail => match connecting.take() {
                    Some(s) => SessionInput::ConnectFailed { session: s, cause: "refused".into() },
                    None => match current {
                        Some(s) => SessionInput::Closed { session: s, error: None },
                        None => SessionInput::Tick,
                    },
                },
                Step::Close => { calls += 1; open_calls.insert(calls); SessionInput::Close { call: CallId(calls) } }
                Step::ReplyOldest(pick) => {
                    if pending.is_empty() { SessionInput::Tick } else {
                        let req = pending.remove(0);
                        SessionInput::Reply { id: req.id, result: reply_for(&req, pick) }
                    }
                }
                Step::DropOldest => { if !pending.is_empty() { pending.remove(0); } SessionInput::Tick }
                Step::Notify(n) => SessionInput::Notification {
                    session: current.unwrap_or(SessionId(0)),
                    channel: if n % 2 == 0 { format!("ch{}", n % 3) } else { format!("__PgIpLock__:ch{}", n % 3) },
                    payload: ["1", "released:3", "acquired:9", "draining:2", "x", "5"][n as usize % 6].into(),
                    pid: 1,
                },
                Step::Call(c) => {
                    calls += 1;
                    open_calls.insert(calls);
                    let request = [LockCall::Init, LockCall::Acquire, LockCall::Release, LockCall::Destroy { signal: None }][c as usize % 4];
                    SessionInput::Call { call: CallId(calls), lock: LockKey(u64::from(c) % 2), request }
                }
                Step::Abandon => SessionInput::Abandon { lock: LockKey(1) },
            };
            session.handle_input(now, input);
            while let Some(out) = session.poll_output() {
                match out {
                    SessionOutput::Connect { session } => connecting = Some(session),
                    SessionOutput::AbortConnect { session } if connecting == Some(session) => connecting = None,
                    SessionOutput::Event(SessionEvent::Up { session, .. }) => current = Some(session),
                    SessionOutput::Event(SessionEvent::Down { .. }) => { current = None; pending.clear(); }
                    SessionOutput::Disconnect { session } if current == Some(session) => { current = None; pending.clear(); }
                    SessionOutput::Execute(req) => pending.push(req),
                    SessionOutput::CallDone { call, .. } => { prop_assert!(open_calls.remove(&call.0), "call {:?} answered twice or never made", call); }
                    _ => {}
                }
            }
            // Every deadline lies in the future, and every phase is within its bound.
            if let Some(at) = session.poll_timeout() {
                prop_assert!(at > now);
            }
            let state = session.state();
            let in_phase = now.saturating_duration_since(state.since);
            match state.phase {
                ConnPhase::Connecting => prop_assert!(in_phase <= config.connect_timeout),
                ConnPhase::Down if !state.closing => {
                    prop_assert!(state.reconnect_at.is_some(), "down with no reconnect scheduled");
                    prop_assert!(in_phase <= config.backoff_max);
                }
                _ => {}
            }
            if let Some(sent) = state.oldest_setup {
                prop_assert!(now.saturating_duration_since(sent) <= config.setup_timeout);
            }
            for (_, lock) in session.locks() {
                let lock_state = lock.state();
                if lock_state.session.is_some() {
                    prop_assert_eq!(lock_state.session, session.current());
                }
            }
        }
    }
}

#[test]
fn an_acquire_refused_as_read_only_fails_the_call_so() {
    let mut rig = Rig::new();
    rig.up();
    let retry = request(&rig.out, "acquire").unwrap();
    rig.reply(&retry, Ok(OpReply::Lock(Reply::Acquire(AcquireReply::locked()))));
    let out = rig.call(2, LockCall::Acquire);
    let attempt = request(&out, "acquire").expect("attempts now");
    let out = rig.reply(&attempt, Err(DbError::server("25006", "read-only")));
    assert!(out.contains(&SessionOutput::CallDone {
        call: CallId(2),
        result: Err(CallError::ReadOnly)
    }));
}

#[test]
fn a_holder_whose_table_vanished_steps_down_at_once() {
    let mut rig = Rig::new();
    rig.up();
    let acquire = request(&rig.out, "acquire").unwrap();
    rig.reply(&acquire, acquired(1));
    let out = rig.tick();
    let renew = request(&out, "renew").expect("renews");
    let out = rig.reply(
        &renew,
        Err(DbError::server("42883", "function locks.lease_renew does not exist")),
    );
    assert!(out.contains(&SessionOutput::Lock {
        lock: KEY,
        event: LockEvent::Lost {
            reason: LostReason::Superseded
        }
    }));
    assert!(request(&out, "bootstrap").is_some());
}

#[test]
fn a_new_timeline_at_a_reconnect_is_reported_once_and_the_same_server_is_not() {
    let mut rig = Rig::new();
    let first = rig.up();
    let primary = ServerIdentity {
        system_id: Some(42),
        timeline: 1,
    };
    let out = rig.after(
        ms(1),
        SessionInput::Identified {
            session: first,
            server: primary,
        },
    );
    assert!(
        !has_event(&out, |e| matches!(e, SessionEvent::ServerChanged { .. })),
        "{out:?}"
    );
    assert_eq!(rig.session.server(), Some(&primary));

    // The connection drops; the next one reaches the same cluster on the next timeline.
    rig.after(
        ms(1),
        SessionInput::Closed {
            session: first,
            error: None,
        },
    );
    let out = rig.tick();
    let second = connect_of(&out).expect("a reconnect");
    rig.after(
        ms(2),
        SessionInput::Connected {
            session: second,
            app: "app-1".into(),
            pid: 101,
        },
    );
    // An identity for a connection that is not the current one changes nothing.
    let stale = rig.after(
        ms(1),
        SessionInput::Identified {
            session: first,
            server: ServerIdentity {
                system_id: Some(42),
                timeline: 9,
            },
        },
    );
    assert!(!has_event(&stale, |e| matches!(e, SessionEvent::ServerChanged { .. })));
    let promoted = ServerIdentity {
        system_id: Some(42),
        timeline: 2,
    };
    let out = rig.after(
        ms(1),
        SessionInput::Identified {
            session: second,
            server: promoted,
        },
    );
    assert!(out.contains(&SessionOutput::Event(SessionEvent::ServerChanged {
        session: second,
        previous: primary,
        current: promoted,
    })));
    assert_eq!(rig.session.server(), Some(&promoted));
    let again = rig.after(
        ms(1),
        SessionInput::Identified {
            session: second,
            server: promoted,
        },
    );
    assert!(!has_event(&again, |e| matches!(e, SessionEvent::ServerChanged { .. })));
}
