//! One lock, inputs by hand: every rule of the state machine.

mod common;

use std::time::Duration;

use common::*;
use pgiplock_core::*;

const S1: SessionId = SessionId(1);
/// The sender of notifications in tests that do not care who sent them.
const PEER_PID: i32 = 4242;
/// Our own backend pid, as the table reports it when we win.
const OWN_PID: i32 = 1111;

/// One lock and a hand-made clock.
struct Solo {
    lock: Lock,
    now: Timestamp,
}

impl Solo {
    fn new(protocol: Protocol) -> Solo {
        Solo::with(fast_config(protocol), 7)
    }

    /// A lock that commits its drain marker before its release (`drain_in_release` off).
    fn two_step(protocol: Protocol) -> Solo {
        Solo::with(two_step_config(protocol), 7)
    }

    fn with(config: LockConfig, seed: u64) -> Solo {
        let lock = Lock::new(ChannelName::new(CHANNEL).unwrap(), config, seed);
        Solo {
            lock,
            now: Timestamp::from_millis(10_000),
        }
    }

    fn at(&mut self, now: Timestamp, input: Input) -> Vec<Output> {
        self.now = now;
        self.lock.handle_input(now, input);
        let out = drain(&mut self.lock);
        if let Some((at, _)) = self.lock.poll_timeout() {
            assert!(at > self.now.max(now));
        }
        out
    }

    fn after(&mut self, ms: u64, input: Input) -> Vec<Output> {
        let now = self.now + Duration::from_millis(ms);
        self.at(now, input)
    }

    fn reply(&mut self, ms: u64, req: &DbRequest, reply: Reply) -> Vec<Output> {
        self.after(
            ms,
            Input::DbResult {
                id: req.id,
                result: Ok(reply),
            },
        )
    }

    fn data(&mut self, payload: &str) -> Vec<Output> {
        self.after(
            0,
            Input::Notification {
                session: S1,
                channel: CHANNEL.to_owned(),
                payload: payload.to_owned(),
                pid: PEER_PID,
            },
        )
    }

    fn marker(&mut self, marker: Marker) -> Vec<Output> {
        let channel = marker
            .channel(self.lock.config().protocol, self.lock.channel())
            .to_owned();
        self.after(
            0,
            Input::Notification {
                session: S1,
                channel,
                payload: marker.payload(),
                pid: PEER_PID,
            },
        )
    }

    /// A lock-channel marker sent by backend `pid`.
    fn marker_from(&mut self, pid: i32, marker: Marker) -> Vec<Output> {
        let channel = marker
            .channel(self.lock.config().protocol, self.lock.channel())
            .to_owned();
        self.after(
            0,
            Input::Notification {
                session: S1,
                channel,
                payload: marker.payload(),
                pid,
            },
        )
    }

    fn timeout(&self) -> (Timestamp, TimerKind) {
        self.lock.poll_timeout().expect("a deadline")
    }

    /// Session up, Start, the attempt request (not answered).
    fn attempt(&mut self) -> DbRequest {
        self.after(0, Input::SessionUp(S1));
        request(&self.after(0, Input::Start))
    }

    /// Session up, Start, acquired with `token`.
    fn holding(&mut self, token: Option<FenceToken>) -> Vec<Output> {
        let req = self.attempt();
        assert_eq!(req.op, DbOp::Acquire);
        let out = self.reply(1, &req, acquired(token));
        assert!(self.lock.state().phase.is_holder());
        out
    }

    fn phase(&self) -> Phase {
        self.lock.state().phase
    }
}

fn acquired(token: Option<FenceToken>) -> Reply {
    Reply::Acquire(AcquireReply {
        acquired: true,
        token,
        lease_remaining: None,
        stale_holder: None,
        ..AcquireReply::locked()
    })
}

/// Acquired `token`, after the term `previous` that `PEER_PID` held and released or lost.
fn acquired_after(token: u64, previous: u64, released: bool) -> Reply {
    Reply::Acquire(AcquireReply {
        holder_pid: Some(OWN_PID),
        previous: Some(PreviousTerm {
            token: FenceToken(previous),
            holder_pid: Some(PEER_PID),
            released,
        }),
        ..AcquireReply::won(Some(FenceToken(token)))
    })
}

/// Not acquired: `PEER_PID` holds `token`, for `remaining`.
fn held_by_peer(token: u64, remaining: Duration) -> Reply {
    Reply::Acquire(AcquireReply {
        lease_remaining: Some(remaining),
        holder_pid: Some(PEER_PID),
        holder_token: Some(FenceToken(token)),
        ..AcquireReply::locked()
    })
}

fn locked(remaining: Option<Duration>) -> Reply {
    Reply::Acquire(AcquireReply {
        acquired: false,
        token: None,
        lease_remaining: remaining,
        stale_holder: None,
        ..AcquireReply::locked()
    })
}

const T1: Option<FenceToken> = Some(FenceToken(1));

#[test]
fn start_attempts_at_once_or_when_the_session_comes_up() {
    let mut s = Solo::new(Protocol::Lease);
    assert!(s.after(0, Input::Start).is_empty(), "no session yet");
    let out = s.after(5, Input::SessionUp(S1));
    // Either at once (zero jitter) or within wake_jitter.
    if out.is_empty() {
        let (at, kind) = s.timeout();
        assert_eq!(kind, TimerKind::Retry);
        assert!(at <= s.now + Duration::from_millis(10));
        assert_eq!(request(&s.at(at, Input::Tick)).op, DbOp::Acquire);
    } else {
        assert_eq!(request(&out).op, DbOp::Acquire);
    }
}

#[test]
fn standby_retries_within_the_interval_jittered_below_it() {
    for seed in 0..50 {
        let mut s = Solo::with(fast_config(Protocol::Classic), seed);
        let req = s.attempt();
        s.reply(1, &req, locked(None));
        let (at, kind) = s.timeout();
        assert_eq!(kind, TimerKind::Retry);
        let delay = at.saturating_duration_since(s.now);
        // acquire_interval 3 s, retry_jitter 0.2
        assert!(
            delay <= Duration::from_secs(3) && delay >= Duration::from_millis(2_400),
            "{delay:?}"
        );
        let req = request(&s.at(at, Input::Tick));
        assert_eq!(req.op, DbOp::Acquire);
    }
}

#[test]
fn lease_standby_retries_right_after_the_reported_lease_remaining() {
    for seed in 0..20 {
        let mut s = Solo::with(fast_config(Protocol::Lease), seed);
        let req = s.attempt();
        s.reply(1, &req, locked(Some(Duration::from_millis(700))));
        let (at, _) = s.timeout();
        let delay = at.saturating_duration_since(s.now);
        assert!(
            delay > Duration::from_millis(700) && delay <= Duration::from_millis(711),
            "{delay:?}"
        );
    }
    // An absurd remaining time from the server is capped by the interval, never a panic.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::MAX)));
    assert!(s.timeout().0 <= s.now + Duration::from_secs(3));
}

#[test]
fn release_marker_wakes_within_wake_jitter_and_acquired_marker_cancels_it() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut s = Solo::new(protocol);
        let req = s.attempt();
        s.reply(1, &req, locked(Some(Duration::from_secs(2))));
        let out = s.marker(Marker::Released(Some(FenceToken(4))));
        assert_eq!(events(&out), vec![LockEvent::PeerReleased]);
        let (at, kind) = s.timeout();
        assert_eq!(kind, TimerKind::Retry);
        assert!(at <= s.now + Duration::from_millis(10));
        if protocol == Protocol::Lease {
            // A peer won first: no pointless attempt; retry around the new lease's expiry.
            s.marker(Marker::Acquired(FenceToken(5)));
            let (later, _) = s.timeout();
            assert!(later >= s.now + Duration::from_secs(2));
        }
    }
}

/// A `Lease` release names the standby that waited longest, by backend pid: that standby
/// attempts at once; any other waits one wake jitter more than its jitter, so that the
/// successor's `acquired` marker comes first (and cancels it), or, when the successor cannot
/// take it, attempts all the same. A forged release naming us changes nothing.
#[test]
fn the_named_successor_attempts_at_once_the_others_a_wake_jitter_later() {
    let jitter = fast_config(Protocol::Lease).wake_jitter;
    let release = |s: &mut Solo, pid: i32, successor: i32| {
        let channel = s.lock.channel().lock_channel().to_owned();
        s.after(
            0,
            Input::Notification {
                session: S1,
                channel,
                payload: Marker::release_payload(FenceToken(4), Some(successor)),
                pid,
            },
        )
    };
    let holder_said = || {
        Reply::Acquire(AcquireReply {
            lease_remaining: Some(Duration::from_secs(2)),
            holder_pid: Some(PEER_PID),
            holder_token: Some(FenceToken(4)),
            ..AcquireReply::locked()
        })
    };
    for seed in 0..8 {
        // Named: the attempt goes out with the release's notification.
        let mut s = Solo::with(fast_config(Protocol::Lease), seed);
        s.after(0, Input::BackendPid(OWN_PID));
        let req = s.attempt();
        s.reply(1, &req, holder_said());
        let forged = release(&mut s, FORGER_PID, OWN_PID);
        assert!(requests(&forged).is_empty(), "a forged release woke us: {forged:?}");
        let out = release(&mut s, PEER_PID, OWN_PID);
        assert!(events(&out).contains(&LockEvent::PeerReleased));
        assert_eq!(requests(&out), vec![DbOp::Acquire], "the successor attempts at once");

        // Another named: between one and two wake jitters; the successor's win cancels it.
        let mut s = Solo::with(fast_config(Protocol::Lease), seed);
        s.after(0, Input::BackendPid(OWN_PID));
        let req = s.attempt();
        s.reply(1, &req, holder_said());
        let out = release(&mut s, PEER_PID, OWN_PID + 1);
        assert!(requests(&out).is_empty());
        let (at, kind) = s.timeout();
        assert_eq!(kind, TimerKind::Retry);
        assert!(
            at >= s.now + jitter && at <= s.now + jitter * 2,
            "{at:?} against {:?}",
            s.now
        );
        s.marker(Marker::Acquired(FenceToken(5)));
        assert!(
            s.timeout().0 >= s.now + Duration::from_secs(2),
            "the successor's win cancels it"
        );

        // Never told its pid: never the successor.
        let mut s = Solo::with(fast_config(Protocol::Lease), seed);
        let req = s.attempt();
        s.reply(1, &req, holder_said());
        let out = release(&mut s, PEER_PID, OWN_PID);
        assert!(requests(&out).is_empty());
        assert!(s.timeout().0 >= s.now + jitter);
    }
}

#[test]
fn release_marker_during_an_attempt_wakes_after_it() {
    let mut s = Solo::new(Protocol::Classic);
    let req = s.attempt();
    s.marker(Marker::Released(None));
    // The attempt may have run before the release: try again soon, not after an interval.
    s.reply(1, &req, locked(None));
    assert!(s.timeout().0 <= s.now + Duration::from_millis(10));
}

#[test]
fn graceful_release_drains_then_reports_released_once_confirmed() {
    for (protocol, token) in [(Protocol::Lease, T1), (Protocol::Classic, None)] {
        let mut s = Solo::two_step(protocol);
        s.holding(token);
        let drain_req = request(&s.after(10, Input::Release));
        assert_eq!(drain_req.op, DbOp::Drain { token });
        assert_eq!(s.phase(), Phase::Draining);
        // Still delivering until its own marker.
        assert_eq!(delivered(&s.data("a")), vec!["a"]);
        assert!(s.reply(1, &drain_req, Reply::Drained).is_empty());
        assert_eq!(delivered(&s.data("b")), vec!["b"]);
        // A marker of another (older) term is not ours.
        if protocol == Protocol::Lease {
            s.marker(Marker::Draining(Some(FenceToken(0))));
            assert_eq!(delivered(&s.data("c")), vec!["c"]);
        }
        let out = s.marker(Marker::Draining(token));
        // Drained is reported, then the release statement is sent: the tenure ends first.
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], Output::Event(LockEvent::Drained));
        let Output::Request(release) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(release.op, DbOp::Release { token });
        assert_eq!(s.phase(), Phase::Releasing);
        assert!(delivered(&s.data("d")).is_empty());
        assert_eq!(s.lock.state().buffered, 1, "kept for the next term, maybe ours");
        // Released only once the server confirmed it.
        let out = s.reply(1, release, Reply::Release { released: true });
        assert_eq!(events(&out), vec![LockEvent::Released], "{out:?}");
        assert_eq!(s.phase(), Phase::Standby);
        // Our own release marker does not wake us: a full interval.
        let out = s.marker(Marker::Released(token));
        assert!(events(&out).is_empty(), "{out:?}");
        assert!(s.timeout().0 >= s.now + Duration::from_millis(2_000));
        // Lease keeps the buffer until a new term's marker; Classic, which has none, drops it.
        let kept = if protocol == Protocol::Lease { 1 } else { 0 };
        assert_eq!(s.lock.state().buffered, kept);
    }
}

#[test]
fn drain_marker_before_the_drain_reply_and_marker_wait() {
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Release));
    assert!(s.marker(Marker::Draining(T1)).is_empty());
    assert!(delivered(&s.data("late")).is_empty(), "after its marker: not ours");
    let out = s.reply(1, &drain_req, Reply::Drained);
    assert_eq!(out[0], Output::Event(LockEvent::Drained));

    // The marker never comes: after marker_wait the release proceeds anyway.
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Release));
    s.reply(1, &drain_req, Reply::Drained);
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::MarkerWait);
    let out = s.at(at, Input::Tick);
    assert_eq!(out[0], Output::Event(LockEvent::Drained));
    assert_eq!(
        s.lock.state().buffered,
        0,
        "position of the marker unknown: buffer nothing"
    );
}

#[test]
fn standby_buffers_after_a_drain_marker_and_delivers_first_when_it_wins() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    s.data("before"); // the holder's
    s.marker(Marker::Draining(Some(FenceToken(3))));
    s.data("x1");
    // A retry of ours runs before the holder's release: the buffer survives the failure.
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    s.reply(1, &req, locked(Some(Duration::from_millis(1_500))));
    s.data("x2");
    s.marker(Marker::Released(Some(FenceToken(3))));
    s.data("x3");
    assert_eq!(s.lock.state().buffered, 3);
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    // Our own `acquired` marker arrives before the reply: it must not drop the buffer.
    s.marker(Marker::Acquired(FenceToken(4)));
    s.data("x4");
    let out = s.reply(1, &req, acquired_after(4, 3, true));
    assert_eq!(
        out[0],
        Output::Event(LockEvent::Acquired {
            token: Some(FenceToken(4))
        })
    );
    assert_eq!(delivered(&out), vec!["x1", "x2", "x3", "x4"]);
    assert_eq!(replayed(&out), Vec::<String>::new(), "a handover replays nothing");
    assert_eq!(delivered(&s.data("x5")), vec!["x5"]);
}

/// A takeover without a handover (the holder crashed): our own `acquired` marker arrives before
/// the reply, and the messages after it are this term's, not lost.
#[test]
fn takeover_delivers_what_follows_its_own_acquired_marker() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.data("before"); // published before the first term (a new row): nobody's to deliver
    s.marker(Marker::Acquired(FenceToken(1)));
    s.data("y1");
    let out = s.reply(1, &req, acquired(Some(FenceToken(1))));
    assert_eq!(delivered(&out), vec!["y1"]);

    // After a crashed term that left no marker here, what came before ours is replayed.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.data("before");
    s.marker_from(OWN_PID, Marker::Acquired(FenceToken(5)));
    s.data("y1");
    let out = s.reply(1, &req, acquired_after(5, 4, false));
    assert_eq!(delivered(&out), vec!["before", "y1"]);
    assert_eq!(replayed(&out), vec!["before"]);

    // The marker was a peer's: what followed it is the peer's.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.marker(Marker::Acquired(FenceToken(5)));
    s.data("peer's");
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    assert_eq!(s.lock.state().buffered, 0);

    // Two terms began during one attempt, the first a peer's that crashed: its messages are
    // replayed, ours follow live.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.marker(Marker::Acquired(FenceToken(5)));
    s.data("z1");
    s.marker_from(OWN_PID, Marker::Acquired(FenceToken(6)));
    s.data("z2");
    let out = s.reply(1, &req, acquired_after(6, 5, false));
    assert_eq!(delivered(&out), vec!["z1", "z2"]);
    assert_eq!(replayed(&out), vec!["z1"]);
}

#[test]
fn standby_drops_its_buffer_when_another_wins() {
    // Lease: the winner's marker.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    s.marker(Marker::Released(Some(FenceToken(3))));
    s.data("x1");
    s.marker(Marker::Acquired(FenceToken(4)));
    assert_eq!(s.lock.state().buffered, 0);
    s.data("x2");
    assert_eq!(s.lock.state().buffered, 0);

    // Lease, the winner's marker arrives while our own attempt is in flight.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    s.marker(Marker::Released(Some(FenceToken(3))));
    s.data("x1");
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    s.marker(Marker::Acquired(FenceToken(4)));
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    assert_eq!(s.lock.state().buffered, 0);
    assert!(
        s.timeout().0 > s.now + Duration::from_secs(1),
        "no wake after a peer won"
    );

    // Lease: we win a later term than the marker seen: the buffer was the peer's.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    s.marker(Marker::Released(Some(FenceToken(3))));
    s.data("x1");
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    s.marker(Marker::Acquired(FenceToken(4)));
    let out = s.reply(1, &req, acquired(Some(FenceToken(5))));
    assert!(delivered(&out).is_empty());

    // Classic: a failed attempt after the release marker.
    let mut s = Solo::new(Protocol::Classic);
    let req = s.attempt();
    s.reply(1, &req, locked(None));
    s.marker(Marker::Released(None));
    s.data("x1");
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    s.reply(1, &req, locked(None));
    assert_eq!(s.lock.state().buffered, 0);
}

/// Ticks through every deadline before `until`, failing every request at once.
fn fail_requests_until(s: &mut Solo, until: Timestamp) {
    while let Some((at, _)) = s.lock.poll_timeout() {
        if at >= until {
            break;
        }
        for o in s.at(at, Input::Tick) {
            if let Output::Request(r) = o {
                s.after(
                    1,
                    Input::DbResult {
                        id: r.id,
                        result: Err(DbError::Failed("boom".into())),
                    },
                );
            }
        }
    }
}

#[test]
fn lease_holder_fences_itself_at_sent_plus_ttl_minus_margin() {
    for confirmed_renewal in [false, true] {
        let mut s = Solo::new(Protocol::Lease);
        let req = s.attempt();
        let mut sent = s.now;
        s.reply(5, &req, acquired(T1));
        if confirmed_renewal {
            // A renewal answered late still counts from when it was sent.
            let (at, kind) = s.timeout();
            assert_eq!(kind, TimerKind::Renew);
            assert_eq!(at, sent + Duration::from_millis(400));
            let renew = request(&s.at(at, Input::Tick));
            sent = at;
            s.reply(300, &renew, Reply::Renew { owned: true });
        }
        // ttl 2 s - margin 300 ms
        let fence = sent + Duration::from_millis(1_700);
        fail_requests_until(&mut s, fence - Duration::from_micros(1));
        assert!(s.at(fence - Duration::from_micros(1), Input::Tick).is_empty());
        assert!(s.phase().is_holder());
        let out = s.at(
            fence,
            Input::Notification {
                session: S1,
                channel: CHANNEL.into(),
                payload: "too late".into(),
                pid: PEER_PID,
            },
        );
        assert!(
            delivered(&out).is_empty(),
            "a notification at the deadline is not delivered"
        );
        assert_eq!(
            events(&out)[0],
            LockEvent::Lost {
                reason: LostReason::LeaseExpired
            }
        );
        assert_eq!(s.phase(), Phase::Standby);
    }
}

#[test]
fn acquisition_answered_after_its_fence_deadline_is_not_used() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    let out = s.reply(1_800, &req, acquired(T1));
    assert!(events(&out).is_empty());
    assert!(!s.phase().is_holder());
}

#[test]
fn a_newer_term_marker_is_checked_against_the_table_not_believed() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(Some(FenceToken(3)));
    assert!(s.marker(Marker::Acquired(FenceToken(3))).is_empty(), "our own");
    assert!(s.marker(Marker::Acquired(FenceToken(2))).is_empty(), "an old one");
    // Anyone can NOTIFY: a newer term's marker is reported once and changes nothing.
    let out = s.marker(Marker::Acquired(FenceToken(4)));
    assert_eq!(
        events(&out),
        vec![LockEvent::Warning(Warning::UnconfirmedMarker { token: FenceToken(4) })]
    );
    assert!(
        events(&s.marker(Marker::Released(Some(FenceToken(9))))).is_empty(),
        "warned once per term"
    );
    assert!(events(&s.marker(Marker::Draining(Some(FenceToken(9))))).is_empty());
    assert!(s.phase().is_holder());
    assert_eq!(delivered(&s.data("still ours")), vec!["still ours"]);
    // The next renewal asks the table; a row no longer ours ends the term.
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Renew);
    let renew = request(&s.at(at, Input::Tick));
    let out = s.reply(1, &renew, Reply::Renew { owned: false });
    assert_eq!(
        events(&out),
        vec![LockEvent::Lost {
            reason: LostReason::Superseded
        }]
    );
}

#[test]
fn session_down_loses_and_old_sessions_are_ignored() {
    let mut s = Solo::new(Protocol::Classic);
    s.holding(None);
    // Another session's events do nothing.
    assert!(s.after(1, Input::SessionDown(SessionId(0))).is_empty());
    assert!(s.after(1, Input::SessionUp(SessionId(0))).is_empty());
    let out = s.after(
        1,
        Input::Notification {
            session: SessionId(0),
            channel: CHANNEL.into(),
            payload: "old".into(),
            pid: PEER_PID,
        },
    );
    assert!(out.is_empty());
    let out = s.after(1, Input::SessionDown(S1));
    assert_eq!(
        events(&out),
        vec![LockEvent::Lost {
            reason: LostReason::SessionLost
        }]
    );
    // The gone session cannot come back; a newer one can.
    assert!(s.after(1, Input::SessionUp(S1)).is_empty());
    assert_eq!(s.lock.state().session, None);
    s.after(1, Input::SessionUp(SessionId(2)));
    assert_eq!(s.lock.state().session, Some(SessionId(2)));
}

#[test]
fn newer_session_replaces_the_current_one() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let out = s.after(1, Input::SessionUp(SessionId(2)));
    assert_eq!(
        events(&out),
        vec![LockEvent::Lost {
            reason: LostReason::SessionLost
        }]
    );
    assert_eq!(s.lock.state().session, Some(SessionId(2)));
}

#[test]
fn unanswered_request_resets_the_session_and_loses() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let (at, _) = s.timeout();
    let renew = request(&s.at(at, Input::Tick));
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::RequestTimeout);
    assert_eq!(at, s.now + Duration::from_secs(1));
    let out = s.at(at, Input::Tick);
    assert_eq!(
        out,
        vec![
            Output::ResetSession(S1),
            Output::Event(LockEvent::Lost {
                reason: LostReason::RequestTimeout
            })
        ]
    );
    // Its late reply is ignored.
    assert!(s.reply(1, &renew, Reply::Renew { owned: true }).is_empty());
    assert!(!s.phase().is_holder());
}

#[test]
fn late_replies_with_wrong_ids_are_ignored() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    let out = s.after(
        1,
        Input::DbResult {
            id: RequestId(req.id.0 + 100),
            result: Ok(acquired(T1)),
        },
    );
    assert!(out.is_empty());
    assert_eq!(s.lock.state().pending, Some("acquire"));
    assert_eq!(s.phase(), Phase::Standby);
}

#[test]
fn stop_as_standby_and_as_holder() {
    let mut s = Solo::two_step(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(None));
    let out = s.after(1, Input::Stop);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
    assert_eq!(s.phase(), Phase::Stopped);
    assert_eq!(s.lock.poll_timeout(), None);
    // Nothing revives it.
    assert!(s.after(1, Input::Start).is_empty());
    assert!(s.after(1, Input::SessionUp(SessionId(5))).is_empty());

    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(1, Input::Signal(SignalKind::Interrupt)));
    s.reply(1, &drain_req, Reply::Drained);
    let out = s.marker(Marker::Draining(T1));
    let release = request(&out);
    let out = s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(
        events(&out),
        vec![LockEvent::Released, LockEvent::Stopped { released: true }]
    );
}

#[test]
fn an_unconfirmed_release_says_what_happened() {
    // The row was no longer this term's.
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Release));
    s.reply(1, &drain_req, Reply::Drained);
    let release = request(&s.marker(Marker::Draining(T1)));
    let out = s.reply(1, &release, Reply::Release { released: false });
    assert_eq!(
        events(&out),
        vec![LockEvent::ReleaseFailed {
            reason: LostReason::Superseded
        }]
    );
    // The statement failed.
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Release));
    s.reply(1, &drain_req, Reply::Drained);
    let release = request(&s.marker(Marker::Draining(T1)));
    let out = s.after(
        1,
        Input::DbResult {
            id: release.id,
            result: Err(DbError::Failed("boom".into())),
        },
    );
    assert!(events(&out).contains(&LockEvent::ReleaseFailed {
        reason: LostReason::ReleaseUnconfirmed
    }));
    // A stop whose release does not finish within the shutdown timeout.
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Stop));
    s.reply(1, &drain_req, Reply::Drained);
    request(&s.marker(Marker::Draining(T1)));
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Shutdown);
    let out = s.at(at, Input::Tick);
    assert_eq!(
        events(&out),
        vec![
            LockEvent::ReleaseFailed {
                reason: LostReason::ReleaseUnconfirmed
            },
            LockEvent::Stopped { released: false }
        ]
    );
    // The session ends while the release is in flight.
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(10, Input::Release));
    s.reply(1, &drain_req, Reply::Drained);
    request(&s.marker(Marker::Draining(T1)));
    let out = s.after(1, Input::SessionDown(S1));
    assert_eq!(
        events(&out),
        vec![LockEvent::ReleaseFailed {
            reason: LostReason::SessionLost
        }]
    );
}

#[test]
fn stop_during_an_attempt_that_wins_releases_the_row() {
    for (protocol, token) in [(Protocol::Lease, T1), (Protocol::Classic, None)] {
        let mut s = Solo::new(protocol);
        let req = s.attempt();
        assert!(s.after(1, Input::Stop).is_empty(), "waits for the attempt");
        let out = s.reply(1, &req, acquired(token));
        // Never reported as held; released at once.
        assert!(events(&out).is_empty(), "{out:?}");
        let release = request(&out);
        assert_eq!(release.op, DbOp::Release { token });
        let out = s.reply(1, &release, Reply::Release { released: true });
        assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
    }
    // And when the attempt loses, the stop completes then.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.after(1, Input::Stop);
    let out = s.reply(1, &req, locked(None));
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
}

#[test]
fn try_acquire_is_answered() {
    let mut s = Solo::new(Protocol::Lease);
    s.after(0, Input::SessionUp(S1));
    let req = request(&s.after(0, Input::TryAcquire));
    let out = s.reply(1, &req, acquired(T1));
    assert!(out.contains(&Output::AttemptDone { acquired: true }));
    assert!(s
        .after(0, Input::TryAcquire)
        .contains(&Output::AttemptDone { acquired: true }));

    // No session: answered false at once.
    let mut s = Solo::new(Protocol::Lease);
    assert_eq!(
        s.after(0, Input::TryAcquire),
        vec![Output::AttemptDone { acquired: false }]
    );
}

#[test]
fn try_acquire_behind_another_request_is_sent_when_it_ends() {
    // A holder that took over a live stale holder sends TerminateStale, then loses its term
    // while that is still in flight: a TryAcquire meanwhile must still get an answer.
    // The request timeout outlasts the fence, so the term ends by fencing while it is in flight.
    let mut config = fast_config(Protocol::Lease);
    config.request_timeout = Duration::from_secs(5);
    let mut s = Solo::with(config, 7);
    s.after(0, Input::SessionUp(S1));
    let req = request(&s.after(0, Input::TryAcquire));
    let reply = Reply::Acquire(AcquireReply {
        acquired: true,
        token: T1,
        lease_remaining: None,
        stale_holder: Some(StaleHolder {
            pid: 7,
            app: "old".into(),
        }),
        ..AcquireReply::locked()
    });
    let out = s.reply(1, &req, reply);
    let terminate = request(&out);
    assert!(matches!(terminate.op, DbOp::TerminateStale { pid: 7, .. }));
    let renew_or_fence = s.timeout();
    assert_eq!(renew_or_fence.1, TimerKind::Renew);
    // The renewal waits behind the terminate; the fence deadline ends the term.
    assert!(s.at(renew_or_fence.0, Input::Tick).is_empty());
    let (fence, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Fence);
    s.at(fence, Input::Tick);
    assert!(!s.phase().is_holder());
    assert!(s.after(0, Input::TryAcquire).is_empty());
    let out = s.reply(1, &terminate, Reply::Terminate(TerminateOutcome::Gone));
    let attempt = request(&out);
    assert_eq!(attempt.op, DbOp::Acquire);
    let out = s.reply(1, &attempt, locked(Some(Duration::from_secs(1))));
    assert_eq!(out, vec![Output::AttemptDone { acquired: false }]);
}

#[test]
fn renewal_due_behind_another_request_is_sent_when_it_ends() {
    let mut config = fast_config(Protocol::Lease);
    // Tight: renew 1.5 s, fence at 1.6 s. Deferring the renewal by a whole interval would fence.
    config.lease_ttl = Duration::from_secs(2);
    config.fence_margin = Duration::from_millis(400);
    config.renew_interval = Duration::from_millis(1_500);
    config.request_timeout = Duration::from_secs(5);
    config.validate().unwrap();
    let mut s = Solo::with(config, 3);
    let req = s.attempt();
    let reply = Reply::Acquire(AcquireReply {
        acquired: true,
        token: T1,
        lease_remaining: None,
        stale_holder: Some(StaleHolder {
            pid: 7,
            app: "old".into(),
        }),
        ..AcquireReply::locked()
    });
    let terminate = request(&s.reply(0, &req, reply));
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Renew);
    assert!(s.at(at, Input::Tick).is_empty(), "terminate still in flight");
    let out = s.reply(50, &terminate, Reply::Terminate(TerminateOutcome::Terminated));
    let renew = request(&out);
    assert_eq!(
        renew.op,
        DbOp::Renew {
            token: T1,
            progress: Some(Progress { seq: 1, ack: None })
        }
    );
    s.reply(10, &renew, Reply::Renew { owned: true });
    assert!(s.phase().is_holder());
}

#[test]
fn terminate_not_permitted_is_warned_once_per_lock() {
    let mut s = Solo::new(Protocol::Lease);
    let mut warnings = 0;
    for round in 0..3u64 {
        if round == 0 {
            s.after(0, Input::SessionUp(S1));
        }
        let req = request(&s.after(0, Input::TryAcquire));
        let reply = Reply::Acquire(AcquireReply {
            acquired: true,
            token: Some(FenceToken(round + 1)),
            lease_remaining: None,
            stale_holder: Some(StaleHolder {
                pid: 7,
                app: "old".into(),
            }),
            ..AcquireReply::locked()
        });
        let terminate = request(&s.reply(1, &req, reply));
        let result = if round == 1 {
            Err(DbError::PermissionDenied("no".into()))
        } else {
            Ok(Reply::Terminate(TerminateOutcome::NotPermitted))
        };
        let out = s.after(
            1,
            Input::DbResult {
                id: terminate.id,
                result,
            },
        );
        warnings += events(&out)
            .iter()
            .filter(|e| matches!(e, LockEvent::Warning(Warning::TerminateNotPermitted { pid: 7 })))
            .count();
        // End the term so that the next round can acquire: the next renewal finds the row gone.
        let (at, _) = s.timeout();
        let renew = request(&s.at(at, Input::Tick));
        s.reply(1, &renew, Reply::Renew { owned: false });
        assert!(!s.phase().is_holder());
    }
    assert_eq!(warnings, 1);
}

#[test]
fn tick_with_nothing_due_does_nothing() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let before = (s.lock.state(), s.lock.poll_timeout());
    let (at, _) = s.timeout();
    for ms in [0, 1, 100, 399] {
        let t = s.now + Duration::from_millis(ms);
        if t < at {
            assert!(s.at(t, Input::Tick).is_empty());
            assert_eq!((s.lock.state(), s.lock.poll_timeout()), before);
        }
    }
    // Idle: nothing at all scheduled, nothing done.
    let mut idle = Solo::new(Protocol::Lease);
    assert!(idle.after(1_000, Input::Tick).is_empty());
    assert_eq!(idle.lock.poll_timeout(), None);
}

#[test]
fn time_going_backwards_is_clamped() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    let t = s.now;
    // Acquired "before" it was sent: treated as now.
    s.at(
        Timestamp::ZERO,
        Input::DbResult {
            id: req.id,
            result: Ok(acquired(T1)),
        },
    );
    assert!(s.phase().is_holder());
    let (at, kind) = s.lock.poll_timeout().unwrap();
    assert_eq!((at, kind), (t + Duration::from_millis(400), TimerKind::Renew));
    // A tick in the past fires nothing.
    let out = s.at(Timestamp::from_millis(1), Input::Tick);
    assert!(out.is_empty());
    assert!(s.phase().is_holder());
}

#[test]
fn zero_and_absurd_settings_are_clamped_not_a_busy_loop() {
    let mut config = LockConfig::new(Protocol::Lease);
    config.acquire_interval = Duration::ZERO;
    config.renew_interval = Duration::ZERO;
    config.request_timeout = Duration::from_nanos(1);
    config.lease_ttl = Duration::MAX;
    config.fence_margin = Duration::MAX;
    config.wake_jitter = Duration::MAX;
    config.shutdown_timeout = Duration::ZERO;
    config.marker_wait = Duration::ZERO;
    config.retry_jitter = f64::NAN;
    config.handover_buffer = 0;
    assert!(config.validate().is_err());
    let mut s = Solo::with(config, 1);
    s.attempt();
    for i in 0..100 {
        let (at, _) = s.timeout();
        let out = s.at(at, Input::Tick);
        for o in out {
            if let Output::Request(r) = &o {
                let result = if i % 2 == 0 {
                    Ok(acquired(Some(FenceToken(i))))
                } else {
                    Ok(locked(None))
                };
                s.after(0, Input::DbResult { id: r.id, result });
            }
            if let Output::ResetSession(_) = o {
                s.after(0, Input::SessionUp(SessionId(100 + i)));
            }
        }
    }
}

#[test]
fn handover_buffer_overflow_drops_the_oldest_and_warns() {
    let mut config = fast_config(Protocol::Lease);
    config.handover_buffer = 4;
    config.replay_limit = 0; // the handover buffer alone
    let mut s = Solo::with(config, 1);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    s.marker(Marker::Draining(Some(FenceToken(1))));
    let mut warnings = Vec::new();
    for i in 0..10 {
        for e in events(&s.data(&format!("m{i}"))) {
            warnings.push(e);
        }
    }
    assert_eq!(s.lock.state().buffered, 4);
    assert_eq!(
        warnings,
        [1, 2, 4]
            .iter()
            .map(|&dropped| LockEvent::Warning(Warning::HandoverBufferOverflow { dropped }))
            .collect::<Vec<_>>()
    );
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    let out = s.reply(1, &req, acquired(Some(FenceToken(2))));
    assert_eq!(delivered(&out), vec!["m6", "m7", "m8", "m9"]);
}

#[test]
fn releaser_drops_its_buffer_when_a_peer_term_begins_before_its_release_reply() {
    let mut s = Solo::two_step(Protocol::Lease);
    s.holding(T1);
    let drain_req = request(&s.after(1, Input::Release));
    s.reply(1, &drain_req, Reply::Drained);
    let out = s.marker(Marker::Draining(T1));
    let release = request(&out);
    s.data("after-marker");
    assert_eq!(s.lock.state().buffered, 1);
    // Our release committed, a peer won, and its marker arrives before our release reply.
    s.marker(Marker::Released(T1));
    s.marker(Marker::Acquired(FenceToken(2)));
    assert_eq!(s.lock.state().buffered, 0);
    s.data("peer's");
    s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(s.lock.state().buffered, 0);
    // Much later the peer dies and we win: nothing of its term is delivered again.
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    let out = s.reply(1, &req, acquired(Some(FenceToken(3))));
    assert!(delivered(&out).is_empty(), "{out:?}");
}

#[test]
fn newer_term_drain_or_release_markers_do_not_end_a_holding_term() {
    for marker in [
        Marker::Draining(Some(FenceToken(5))),
        Marker::Released(Some(FenceToken(5))),
    ] {
        let mut s = Solo::new(Protocol::Lease);
        s.holding(Some(FenceToken(4)));
        assert!(
            s.marker(Marker::Released(Some(FenceToken(3)))).is_empty(),
            "an older term"
        );
        let out = s.marker(marker);
        assert_eq!(
            events(&out),
            vec![LockEvent::Warning(Warning::UnconfirmedMarker { token: FenceToken(5) })]
        );
        assert!(s.phase().is_holder(), "the table decides, not a marker");
    }
}

#[test]
fn start_or_retry_behind_another_request_attempts_when_it_ends() {
    // A holder that took over a live stale holder loses its term while TerminateStale is in
    // flight; Start and the retry timer then wait for it, not for another interval.
    // The request timeout outlasts the fence, so the term ends by fencing while it is in flight.
    let mut config = fast_config(Protocol::Lease);
    config.request_timeout = Duration::from_secs(5);
    let mut s = Solo::with(config, 7);
    s.after(0, Input::SessionUp(S1));
    let req = request(&s.after(0, Input::TryAcquire));
    let reply = Reply::Acquire(AcquireReply {
        acquired: true,
        token: T1,
        lease_remaining: None,
        stale_holder: Some(StaleHolder {
            pid: 7,
            app: "old".into(),
        }),
        ..AcquireReply::locked()
    });
    let terminate = request(&s.reply(1, &req, reply));
    // The renewal waits behind the terminate; the fence deadline ends the term.
    let (renew, _) = s.timeout();
    s.at(renew, Input::Tick);
    let (fence, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Fence);
    s.at(fence, Input::Tick);
    assert!(!s.phase().is_holder());
    assert!(s.after(1, Input::Start).is_empty(), "terminate still in flight");
    let out = s.reply(1, &terminate, Reply::Terminate(TerminateOutcome::Terminated));
    assert_eq!(request(&out).op, DbOp::Acquire);
}

/// The server answers a renewal with "not owned" (the token is no longer the row's).
#[test]
fn renewal_not_owned_reports_superseded() {
    let t = Timestamp::from_millis(1_000);
    let mut lock = Lock::new(ChannelName::new(CHANNEL).unwrap(), fast_config(Protocol::Lease), 1);
    lock.handle_input(t, Input::SessionUp(SessionId(1)));
    lock.handle_input(t, Input::Start);
    let req = request(&drain(&mut lock));
    let reply = AcquireReply {
        acquired: true,
        token: Some(FenceToken(3)),
        lease_remaining: None,
        stale_holder: None,
        ..AcquireReply::locked()
    };
    lock.handle_input(
        t,
        Input::DbResult {
            id: req.id,
            result: Ok(Reply::Acquire(reply)),
        },
    );
    drain(&mut lock);
    let (at, kind) = lock.poll_timeout().unwrap();
    assert_eq!(kind, TimerKind::Renew);
    lock.handle_input(at, Input::Tick);
    let req = request(&drain(&mut lock));
    assert_eq!(
        req.op,
        DbOp::Renew {
            token: Some(FenceToken(3)),
            progress: Some(Progress { seq: 1, ack: None })
        }
    );
    lock.handle_input(
        at,
        Input::DbResult {
            id: req.id,
            result: Ok(Reply::Renew { owned: false }),
        },
    );
    assert_eq!(
        events(&drain(&mut lock)),
        vec![LockEvent::Lost {
            reason: LostReason::Superseded
        }]
    );
}

// ----- markers judged by their sender; progress markers and the takeover replay (Lease) -----

const FORGER_PID: i32 = 6666;

fn progress(token: u64, seq: u64, ack: Option<u64>) -> Marker {
    Marker::Progress(FenceToken(token), Progress { seq, ack })
}

/// A standby that the table told `PEER_PID` holds term 5.
fn standby_of_term_5() -> Solo {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, held_by_peer(5, Duration::from_secs(2)));
    s
}

/// Lets the standby's retry fall due and wins term 6 after term 5 (released or not).
fn win_term_6(s: &mut Solo, released: bool) -> Vec<Output> {
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let req = request(&s.at(at, Input::Tick));
    s.reply(1, &req, acquired_after(6, 5, released))
}

#[test]
fn a_holder_acknowledges_its_own_markers_in_its_renewals() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            holder_pid: Some(OWN_PID),
            ..AcquireReply::won(T1)
        }),
    );
    let renew = |s: &mut Solo| {
        let (at, kind) = s.timeout();
        assert_eq!(kind, TimerKind::Renew);
        let req = request(&s.at(at, Input::Tick));
        s.reply(1, &req, Reply::Renew { owned: true });
        req.op
    };
    // Nothing of its own seen yet.
    assert_eq!(
        renew(&mut s),
        DbOp::Renew {
            token: T1,
            progress: Some(Progress { seq: 1, ack: None })
        }
    );
    // Its acquired marker comes back: marker 0 acknowledged. A forged "marker 9" of its term
    // from another backend counts for nothing.
    s.marker_from(OWN_PID, Marker::Acquired(FenceToken(1)));
    s.marker_from(FORGER_PID, progress(1, 9, None));
    assert_eq!(
        renew(&mut s),
        DbOp::Renew {
            token: T1,
            progress: Some(Progress { seq: 2, ack: Some(0) })
        }
    );
    s.marker_from(OWN_PID, progress(1, 1, None));
    assert_eq!(
        renew(&mut s),
        DbOp::Renew {
            token: T1,
            progress: Some(Progress { seq: 3, ack: Some(1) })
        }
    );
    assert_eq!(s.lock.state().ignored_markers, 1);
    // Classic renewals carry nothing.
    let mut c = Solo::new(Protocol::Classic);
    c.holding(None);
    let (at, _) = c.timeout();
    let req = request(&c.at(at, Input::Tick));
    assert_eq!(
        req.op,
        DbOp::Renew {
            token: None,
            progress: None
        }
    );
}

#[test]
fn a_draining_holder_ends_only_at_its_own_drain_marker() {
    let mut s = Solo::two_step(Protocol::Lease);
    let req = s.attempt();
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            holder_pid: Some(OWN_PID),
            ..AcquireReply::won(T1)
        }),
    );
    let drain = request(&s.after(1, Input::Release));
    assert_eq!(drain.op, DbOp::Drain { token: T1 });
    s.reply(1, &drain, Reply::Drained);
    // A forged drain marker of our own term: ignored, we keep delivering.
    s.marker_from(FORGER_PID, Marker::Draining(T1));
    assert_eq!(delivered(&s.data("still ours")), vec!["still ours"]);
    let out = s.marker_from(OWN_PID, Marker::Draining(T1));
    assert!(events(&out).contains(&LockEvent::Drained), "{out:?}");
    assert!(delivered(&s.data("the next holder's")).is_empty());
}

#[test]
fn forged_markers_of_the_known_term_change_nothing_for_a_standby() {
    let mut s = standby_of_term_5();
    let retry = s.timeout();
    let mut warnings = Vec::new();
    for marker in [
        Marker::Draining(Some(FenceToken(5))),
        Marker::Released(Some(FenceToken(5))),
        Marker::Acquired(FenceToken(5)),
        progress(5, 3, Some(3)),
    ] {
        let out = s.marker_from(FORGER_PID, marker);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Request(_))),
            "no attempt for a forged {marker:?}: {out:?}"
        );
        warnings.extend(events(&out));
    }
    assert_eq!(s.timeout(), retry, "the retry schedule is untouched");
    assert_eq!(s.lock.state().ignored_markers, 4);
    assert_eq!(s.lock.state().buffered, 0, "no handover buffer began");
    assert_eq!(
        warnings,
        [1, 2, 4]
            .iter()
            .map(|&count| LockEvent::Warning(Warning::IgnoredMarkers { pid: FORGER_PID, count }))
            .collect::<Vec<_>>()
    );
    // The holder's own release still wakes it.
    let out = s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(5))));
    assert!(events(&out).contains(&LockEvent::PeerReleased));
}

#[test]
fn a_takeover_replays_what_followed_the_holders_newest_acknowledged_marker() {
    let mut s = standby_of_term_5();
    s.data("before term 5's marker 1");
    s.marker_from(PEER_PID, progress(5, 1, None));
    s.data("a");
    s.marker_from(PEER_PID, progress(5, 2, Some(1)));
    // The standby forgot what the holder acknowledged.
    assert_eq!(s.lock.state().replay_buffered, 1);
    s.data("b");
    // A forger's claims move nothing.
    s.marker_from(FORGER_PID, Marker::Draining(Some(FenceToken(5))));
    s.marker_from(FORGER_PID, progress(5, 3, Some(3)));
    s.data("c");
    // The holder crashed; our retry at its expiry wins.
    let out = win_term_6(&mut s, false);
    assert_eq!(delivered(&out), vec!["a", "b", "c"]);
    assert_eq!(replayed(&out), vec!["a", "b", "c"]);
    assert_eq!(delivered(&s.data("live")), vec!["live"]);
    assert!(replayed(&s.data("live 2")).is_empty());
}

#[test]
fn a_takeover_after_the_holders_drain_marker_is_exactly_once() {
    let mut s = standby_of_term_5();
    s.marker_from(PEER_PID, progress(5, 1, None));
    s.data("a");
    s.marker_from(PEER_PID, progress(5, 2, Some(1)));
    s.data("b");
    s.marker_from(PEER_PID, Marker::Draining(Some(FenceToken(5))));
    s.data("c");
    // The holder crashed between its drain marker and its release: what it did not deliver
    // follows its drain marker, and none of it is a duplicate.
    let out = win_term_6(&mut s, false);
    assert_eq!(delivered(&out), vec!["c"]);
    assert!(replayed(&out).is_empty());
}

#[test]
fn replay_overflow_is_a_gap_with_the_count() {
    let mut config = fast_config(Protocol::Lease);
    config.replay_limit = 3;
    let mut s = Solo::with(config, 1);
    let req = s.attempt();
    s.reply(1, &req, held_by_peer(5, Duration::from_secs(2)));
    s.marker_from(PEER_PID, progress(5, 1, None));
    let mut warnings = Vec::new();
    for i in 0..8 {
        warnings.extend(events(&s.data(&format!("m{i}"))));
    }
    assert_eq!(
        warnings,
        [1, 2, 4]
            .iter()
            .map(|&dropped| LockEvent::Warning(Warning::ReplayOverflow { dropped }))
            .collect::<Vec<_>>()
    );
    let out = win_term_6(&mut s, false);
    let evs = events(&out);
    assert_eq!(
        evs[0],
        LockEvent::Acquired {
            token: Some(FenceToken(6))
        }
    );
    assert_eq!(evs[1], LockEvent::Gap { missing: 5 });
    assert_eq!(replayed(&out), vec!["m5", "m6", "m7"]);
}

#[test]
fn replay_off_or_classic_keeps_at_most_once() {
    let mut config = fast_config(Protocol::Lease);
    config.replay_limit = 0;
    let mut s = Solo::with(config, 1);
    let req = s.attempt();
    s.reply(1, &req, held_by_peer(5, Duration::from_secs(2)));
    s.data("a");
    let out = win_term_6(&mut s, false);
    assert!(delivered(&out).is_empty(), "{out:?}");
    assert_eq!(s.lock.state().replay_buffered, 0);
}

#[test]
fn a_fenced_holder_that_wins_again_replays_nothing_twice() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            holder_pid: Some(OWN_PID),
            ..AcquireReply::won(Some(FenceToken(5)))
        }),
    );
    s.data("delivered");
    // Every renewal fails (the server refuses it): it fences itself, its session still up.
    let mut lost = false;
    for _ in 0..20 {
        let (at, _) = s.timeout();
        let out = s.at(at, Input::Tick);
        lost |= events(&out).iter().any(|e| matches!(e, LockEvent::Lost { .. }));
        if let Some(Output::Request(req)) = out.iter().find(|o| matches!(o, Output::Request(_))) {
            if req.op == DbOp::Acquire {
                break;
            }
            let failed = Input::DbResult {
                id: req.id,
                result: Err(DbError::server("57014", "canceling statement")),
            };
            lost |= events(&s.after(1, failed))
                .iter()
                .any(|e| matches!(e, LockEvent::Lost { .. }));
        }
        if lost {
            break;
        }
    }
    assert!(lost, "fenced");
    s.data("after the fence");
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let req = request(&s.at(at, Input::Tick));
    let reply = Reply::Acquire(AcquireReply {
        holder_pid: Some(OWN_PID),
        previous: Some(PreviousTerm {
            token: FenceToken(5),
            holder_pid: Some(OWN_PID),
            released: false,
        }),
        ..AcquireReply::won(Some(FenceToken(6)))
    });
    let out = s.reply(1, &req, reply);
    assert_eq!(delivered(&out), vec!["after the fence"]);
    assert!(replayed(&out).is_empty());
}

#[test]
fn a_handover_whose_own_marker_came_before_the_reply_keeps_what_followed_the_drain() {
    let mut s = standby_of_term_5();
    s.marker_from(PEER_PID, Marker::Draining(Some(FenceToken(5))));
    s.data("after the drain");
    s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(5))));
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    // Our own `acquired` marker outruns the reply.
    s.marker_from(OWN_PID, Marker::Acquired(FenceToken(6)));
    s.data("ours");
    let out = s.reply(1, &req, acquired_after(6, 5, true));
    assert_eq!(delivered(&out), vec!["after the drain", "ours"]);
    assert!(replayed(&out).is_empty());
}

/// A holder whose session ended heard nothing until its next session listened: standbys that
/// listened throughout hold the replay, so its own attempts wait for its lease to expire.
#[test]
fn a_holder_that_lost_its_session_defers_its_attempts_to_its_lease_expiry() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1); // acquisition sent at 0 ms, confirmed: the lease runs to about 10 s
    s.after(100, Input::SessionDown(S1));
    let out = s.after(10, Input::SessionUp(SessionId(2)));
    assert!(!out.iter().any(|o| matches!(o, Output::Request(_))), "{out:?}");
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let out = s.at(at, Input::Tick);
    if out.iter().any(|o| matches!(o, Output::Request(_))) {
        assert!(
            at >= Timestamp::from_millis(10_000),
            "attempted at {at:?}, before its lease expired"
        );
    } else {
        let (at, _) = s.timeout();
        assert!(at >= Timestamp::from_millis(10_000), "rescheduled at {at:?}");
        let req = request(&s.at(at, Input::Tick));
        assert_eq!(req.op, DbOp::Acquire);
    }
}

#[test]
fn repeated_or_far_fetched_claims_never_keep_a_standby_from_attempting() {
    let mut s = standby_of_term_5();
    let (retry, _) = s.timeout();
    // Far beyond the table's term: ignored.
    s.marker_from(FORGER_PID, Marker::Acquired(FenceToken(1005)));
    assert_eq!(s.timeout().0, retry);
    // The next term, claimed again and again: it postpones once.
    s.marker_from(FORGER_PID, Marker::Acquired(FenceToken(6)));
    let (postponed, _) = s.timeout();
    for _ in 0..5 {
        s.after(100, Input::Tick);
        s.marker_from(FORGER_PID, Marker::Acquired(FenceToken(6)));
        assert_eq!(s.timeout().0, postponed, "postponed only once");
    }
    let req = request(&s.at(postponed, Input::Tick));
    assert_eq!(req.op, DbOp::Acquire);
}

/// A standby that never heard from the table believes a term's drain and release from the
/// backend that announced the term (regression: the `acquired` claim's once-only postponement
/// made it ignore the release of that very term).
#[test]
fn a_standby_without_the_tables_word_is_woken_by_the_announced_terms_release() {
    let mut s = Solo::new(Protocol::Lease);
    s.after(0, Input::SessionUp(S1));
    s.marker_from(PEER_PID, Marker::Acquired(FenceToken(1)));
    s.marker_from(PEER_PID, Marker::Draining(Some(FenceToken(1))));
    let out = s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(1))));
    assert!(events(&out).contains(&LockEvent::PeerReleased), "{out:?}");
    assert_eq!(s.lock.state().ignored_markers, 0);
}

fn no_retry_armed(s: &Solo) -> bool {
    s.lock.poll_timeout().map_or(true, |(_, kind)| kind != TimerKind::Retry)
}

fn requests(outputs: &[Output]) -> Vec<DbOp> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Request(r) => Some(r.op.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn stand_down_as_holder_releases_then_makes_no_attempt_until_start() {
    for (protocol, token) in [(Protocol::Lease, T1), (Protocol::Classic, None)] {
        let mut s = Solo::two_step(protocol);
        s.holding(token);
        // Like a release: drain, report Drained at the marker, then release.
        let drain_req = request(&s.after(10, Input::StandDown));
        assert_eq!(drain_req.op, DbOp::Drain { token });
        assert!(s.reply(1, &drain_req, Reply::Drained).is_empty());
        let out = s.marker(Marker::Draining(token));
        assert_eq!(events(&out), vec![LockEvent::Drained]);
        let release = request(&out);
        assert_eq!(release.op, DbOp::Release { token });
        let out = s.reply(1, &release, Reply::Release { released: true });
        assert_eq!(events(&out), vec![LockEvent::Released]);
        assert_eq!(s.phase(), Phase::Standby);
        assert!(!s.lock.state().started);
        // No retry, whatever wakes a standby: a peer's release, a new session, time.
        assert!(no_retry_armed(&s), "{:?}", s.lock.poll_timeout());
        s.marker(Marker::Released(Some(FenceToken(9))));
        assert!(no_retry_armed(&s));
        let out = s.after(60_000, Input::Tick);
        assert!(requests(&out).is_empty(), "{out:?}");
        let out = s.after(0, Input::SessionUp(SessionId(2)));
        assert!(requests(&out).is_empty(), "{out:?}");
        assert!(no_retry_armed(&s));
        // Still listening: it keeps buffering as a standby, and `Start` competes again at once.
        let out = s.after(0, Input::Start);
        assert_eq!(requests(&out), vec![DbOp::Acquire]);
        assert!(s.lock.state().started);
    }
}

#[test]
fn stand_down_as_standby_disarms_the_retry() {
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, locked(Some(Duration::from_secs(2))));
    assert_eq!(s.timeout().1, TimerKind::Retry);
    assert!(s.after(0, Input::StandDown).is_empty());
    assert!(no_retry_armed(&s));
    assert!(requests(&s.after(30_000, Input::Tick)).is_empty());
    // An explicit attempt still runs.
    let out = s.after(0, Input::TryAcquire);
    assert_eq!(requests(&out), vec![DbOp::Acquire]);
}

#[test]
fn stand_down_during_an_attempt_that_wins_gives_the_term_back() {
    for (protocol, token) in [(Protocol::Lease, T1), (Protocol::Classic, None)] {
        let mut s = Solo::two_step(protocol);
        let req = s.attempt();
        assert!(s.after(1, Input::StandDown).is_empty(), "waits for the attempt");
        let out = s.reply(1, &req, acquired(token));
        // The term is reported (it began) and its release starts at once.
        assert_eq!(events(&out), vec![LockEvent::Acquired { token }]);
        assert_eq!(requests(&out), vec![DbOp::Drain { token }]);
        assert_eq!(s.phase(), Phase::Draining);
    }
}

#[test]
fn stand_down_after_stop_does_nothing() {
    let mut s = Solo::new(Protocol::Lease);
    s.after(0, Input::SessionUp(S1));
    let out = s.after(0, Input::Stop);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
    assert!(s.after(0, Input::StandDown).is_empty());
    assert!(s.after(0, Input::Start).is_empty());
    assert_eq!(s.phase(), Phase::Stopped);
}

/// Regression (found by the property test): a term won while standing down whose reply asks to
/// terminate a stale holder drains only once the terminate request has ended, one request at a
/// time.
#[test]
fn stand_down_during_a_takeover_of_a_stale_holder_drains_after_the_terminate() {
    let mut s = Solo::two_step(Protocol::Lease);
    let req = s.attempt();
    s.after(1, Input::StandDown);
    let reply = Reply::Acquire(AcquireReply {
        acquired: true,
        token: T1,
        lease_remaining: None,
        stale_holder: Some(StaleHolder {
            pid: 7,
            app: "old".into(),
        }),
        ..AcquireReply::locked()
    });
    let out = s.reply(1, &req, reply);
    assert_eq!(events(&out), vec![LockEvent::Acquired { token: T1 }]);
    let terminate = request(&out);
    assert!(matches!(terminate.op, DbOp::TerminateStale { pid: 7, .. }));
    assert_eq!(requests(&out).len(), 1, "{out:?}");
    let out = s.reply(1, &terminate, Reply::Terminate(TerminateOutcome::Terminated));
    assert_eq!(requests(&out), vec![DbOp::Drain { token: T1 }]);
}

/// The backend of a term on a row made after `DROP SCHEMA ... CASCADE`.
const NEW_ROW_PID: i32 = 2222;

/// A holder of term 3 whose schema was dropped under it: a standby made a new table and won its
/// row (token 1, announced while we still held), and our next renewal finds the row not ours.
/// Then what the new row's holder delivered arrives, and its first progress marker (it has
/// acknowledged only its `acquired` marker, which came before our log began).
fn superseded_by_a_new_row() -> Solo {
    let mut s = Solo::two_step(Protocol::Lease);
    let req = s.attempt();
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            holder_pid: Some(OWN_PID),
            ..AcquireReply::won(Some(FenceToken(3)))
        }),
    );
    assert_eq!(delivered(&s.data("254")), vec!["254"]);
    s.marker_from(NEW_ROW_PID, Marker::Acquired(FenceToken(1)));
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Renew);
    let renew = request(&s.at(at, Input::Tick));
    let out = s.reply(1, &renew, Reply::Renew { owned: false });
    assert_eq!(
        events(&out),
        vec![LockEvent::Lost {
            reason: LostReason::Superseded
        }]
    );
    assert!(delivered(&s.data("255")).is_empty());
    assert!(delivered(&s.data("256")).is_empty());
    s.marker_from(NEW_ROW_PID, progress(1, 1, Some(0)));
    s
}

/// The new row's holder crashed: we win its term 2 with the table's word on term 1.
fn win_the_new_rows_term_2(s: &mut Solo) -> Vec<Output> {
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let req = request(&s.at(at, Input::Tick));
    let reply = Reply::Acquire(AcquireReply {
        holder_pid: Some(OWN_PID),
        previous: Some(PreviousTerm {
            token: FenceToken(1),
            holder_pid: Some(NEW_ROW_PID),
            released: false,
        }),
        ..AcquireReply::won(Some(FenceToken(2)))
    });
    s.reply(1, &req, reply)
}

#[test]
fn a_takeover_on_a_row_made_after_a_schema_drop_flags_what_its_first_holder_may_have_delivered() {
    // Our log began where our term 3 ended, but term 1 of the new row began before that: its
    // holder may have delivered all of it, so all of it is a replay (tokens 3 and 1 belong to
    // different tables and say nothing about which term ended first).
    let mut s = superseded_by_a_new_row();
    s.data("259");
    let out = win_the_new_rows_term_2(&mut s);
    assert_eq!(delivered(&out), vec!["255", "256", "259"]);
    assert_eq!(replayed(&out), vec!["255", "256", "259"]);
    assert!(!events(&out).iter().any(|e| matches!(e, LockEvent::Gap { .. })));
    assert!(replayed(&s.data("live")).is_empty());
}

#[test]
fn a_takeover_on_a_new_row_after_the_table_named_its_holder_flags_it_too() {
    // As above, with a refused attempt in between that names the new row's term 1.
    let mut s = superseded_by_a_new_row();
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let req = request(&s.at(at, Input::Tick));
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            lease_remaining: Some(Duration::from_secs(1)),
            holder_pid: Some(NEW_ROW_PID),
            holder_token: Some(FenceToken(1)),
            ..AcquireReply::locked()
        }),
    );
    s.data("259");
    let out = win_the_new_rows_term_2(&mut s);
    assert_eq!(replayed(&out), vec!["255", "256", "259"]);
}

#[test]
fn a_standby_believes_the_new_rows_holder_once_the_table_names_it() {
    // The table named term 5 of the old row; the schema is dropped and the new row's term 1 is
    // named next. Its holder's markers are its, not stale: they compact the log, and its release
    // wakes us for a lossless handover.
    let mut s = standby_of_term_5();
    let (at, _) = s.timeout();
    let req = request(&s.at(at, Input::Tick));
    s.reply(
        1,
        &req,
        Reply::Acquire(AcquireReply {
            lease_remaining: Some(Duration::from_secs(1)),
            holder_pid: Some(NEW_ROW_PID),
            holder_token: Some(FenceToken(1)),
            ..AcquireReply::locked()
        }),
    );
    s.data("acknowledged");
    s.marker_from(NEW_ROW_PID, progress(1, 1, None));
    assert_eq!(s.lock.state().replay_buffered, 1);
    s.marker_from(NEW_ROW_PID, progress(1, 2, Some(1)));
    assert_eq!(s.lock.state().replay_buffered, 0);
    // A forger's copy of the new row's release is still ignored.
    let forged = s.marker_from(FORGER_PID, Marker::Released(Some(FenceToken(1))));
    assert!(!events(&forged).contains(&LockEvent::PeerReleased));
    s.data("drained by its holder");
    s.marker_from(NEW_ROW_PID, Marker::Draining(Some(FenceToken(1))));
    s.data("after the drain");
    let out = s.marker_from(NEW_ROW_PID, Marker::Released(Some(FenceToken(1))));
    assert!(events(&out).contains(&LockEvent::PeerReleased), "{out:?}");
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    assert!(at <= s.now + Duration::from_millis(10), "woken within wake_jitter");
    let req = request(&s.at(at, Input::Tick));
    let reply = Reply::Acquire(AcquireReply {
        holder_pid: Some(OWN_PID),
        previous: Some(PreviousTerm {
            token: FenceToken(1),
            holder_pid: Some(NEW_ROW_PID),
            released: true,
        }),
        ..AcquireReply::won(Some(FenceToken(2)))
    });
    let out = s.reply(1, &req, reply);
    assert_eq!(delivered(&out), vec!["after the drain"]);
    assert!(replayed(&out).is_empty());
}

#[test]
fn a_new_rows_markers_under_a_known_token_are_kept_for_the_table_to_judge_at_the_win() {
    // The table named term 2 of the old row (`PEER_PID`); the schema is dropped and, before the
    // table says a word more, the new row reaches term 2 too, held by another backend. Its
    // markers look forged and change nothing, but the log keeps them: at our win the table
    // names that backend, and its drain marker is where delivery goes on, exactly once.
    let mut s = Solo::new(Protocol::Lease);
    let req = s.attempt();
    s.reply(1, &req, held_by_peer(2, Duration::from_secs(2)));
    s.data("before the drop");
    s.marker_from(FORGER_PID, Marker::Acquired(FenceToken(1)));
    let claimed = s.marker_from(NEW_ROW_PID, Marker::Acquired(FenceToken(2)));
    assert!(events(&claimed)
        .iter()
        .any(|e| matches!(e, LockEvent::Warning(Warning::IgnoredMarkers { .. }))));
    s.data("delivered by the new row's term 2");
    s.marker_from(NEW_ROW_PID, Marker::Draining(Some(FenceToken(2))));
    s.data("after its drain");
    s.marker_from(NEW_ROW_PID, Marker::Released(Some(FenceToken(2))));
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    let req = request(&s.at(at, Input::Tick));
    let reply = Reply::Acquire(AcquireReply {
        holder_pid: Some(OWN_PID),
        previous: Some(PreviousTerm {
            token: FenceToken(2),
            holder_pid: Some(NEW_ROW_PID),
            released: true,
        }),
        ..AcquireReply::won(Some(FenceToken(3)))
    });
    let out = s.reply(1, &req, reply);
    assert_eq!(delivered(&out), vec!["after its drain"]);
    assert!(replayed(&out).is_empty());
}

// ----- the release as its own drain point (Lease with `drain_in_release`, the default) -----

#[test]
fn a_release_that_is_its_own_drain_point_delivers_up_to_its_marker_then_says_so() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    assert_eq!(release.op, DbOp::Release { token: T1 });
    assert_eq!(s.phase(), Phase::Draining);
    // Still delivering until its own release marker.
    assert_eq!(delivered(&s.data("a")), vec!["a"]);
    // A release marker of another term is not ours, and a drain marker (which it does not
    // send) ends nothing.
    s.marker(Marker::Released(Some(FenceToken(0))));
    assert!(events(&s.marker(Marker::Draining(T1))).is_empty());
    assert_eq!(delivered(&s.data("b")), vec!["b"]);
    let out = s.marker(Marker::Released(T1));
    assert_eq!(events(&out), vec![LockEvent::Drained]);
    assert!(requests(&out).is_empty(), "the release is in flight already");
    assert_eq!(s.phase(), Phase::Releasing);
    assert!(delivered(&s.data("c")).is_empty(), "after its marker: not ours");
    assert_eq!(s.lock.state().buffered, 1, "kept for the next term, maybe ours");
    let out = s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(events(&out), vec![LockEvent::Released]);
    assert_eq!(requests(&out), vec![DbOp::Drained { token: FenceToken(1) }]);
    assert_eq!(s.phase(), Phase::Standby);
}

#[test]
fn a_release_reply_before_its_own_marker_waits_for_the_marker() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    assert!(events(&s.reply(1, &release, Reply::Release { released: true })).is_empty());
    assert_eq!(delivered(&s.data("a")), vec!["a"], "its marker is still to come");
    let out = s.marker(Marker::Released(T1));
    assert_eq!(events(&out), vec![LockEvent::Drained, LockEvent::Released]);
    assert_eq!(requests(&out), vec![DbOp::Drained { token: FenceToken(1) }]);
}

#[test]
fn a_release_whose_marker_does_not_come_ends_the_delivery_without_a_word() {
    // The marker never comes: the delivery ends `marker_wait` after the release was sent.
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    let sent = s.now;
    let (at, kind) = s.timeout();
    assert_eq!((at, kind), (sent + Duration::from_millis(200), TimerKind::MarkerWait));
    let out = s.at(at, Input::Tick);
    assert_eq!(events(&out), vec![LockEvent::Drained]);
    assert_eq!(
        s.lock.state().buffered,
        0,
        "position of the marker unknown: buffer nothing"
    );
    let out = s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(events(&out), vec![LockEvent::Released]);
    assert!(requests(&out).is_empty(), "it did not see its marker: no `drained`");
    // A release that matched no row sends no marker: the delivery ends at once.
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    let out = s.reply(1, &release, Reply::Release { released: false });
    assert_eq!(
        events(&out),
        vec![
            LockEvent::Drained,
            LockEvent::ReleaseFailed {
                reason: LostReason::Superseded
            }
        ]
    );
    assert!(requests(&out).is_empty());
    // A failed statement.
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    let out = s.after(
        1,
        Input::DbResult {
            id: release.id,
            result: Err(DbError::Failed("boom".into())),
        },
    );
    let ev = events(&out);
    assert_eq!(
        ev[0],
        LockEvent::Warning(Warning::RequestFailed {
            op: "release",
            error: DbError::Failed("boom".into())
        })
    );
    assert_eq!(
        ev[1..],
        [
            LockEvent::Drained,
            LockEvent::ReleaseFailed {
                reason: LostReason::ReleaseUnconfirmed
            }
        ]
    );
    // The session ends first: the term is lost, as any holder's.
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    request(&s.after(10, Input::Release));
    let out = s.after(1, Input::SessionDown(S1));
    assert_eq!(
        events(&out),
        vec![LockEvent::Lost {
            reason: LostReason::SessionLost
        }]
    );
}

#[test]
fn a_stop_ends_once_its_drained_marker_is_sent() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(1, Input::Signal(SignalKind::Terminate)));
    s.marker(Marker::Released(T1));
    let out = s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(events(&out), vec![LockEvent::Released]);
    let drained = request(&out);
    assert_eq!(drained.op, DbOp::Drained { token: FenceToken(1) });
    assert_eq!(s.phase(), Phase::Releasing, "the connection must outlive the marker");
    let out = s.reply(1, &drained, Reply::Drained);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
    assert_eq!(s.lock.poll_timeout(), None);
    // Unanswered, the shutdown bound ends it, released all the same.
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(1, Input::Stop));
    s.marker(Marker::Released(T1));
    s.reply(1, &release, Reply::Release { released: true });
    let (at, kind) = s.timeout();
    assert!(
        matches!(kind, TimerKind::Shutdown | TimerKind::RequestTimeout),
        "{kind:?}"
    );
    let out = s.at(at, Input::Tick);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
}

#[test]
fn a_stop_while_an_earlier_releases_word_is_in_flight_waits_for_it() {
    let mut s = Solo::new(Protocol::Lease);
    s.holding(T1);
    let release = request(&s.after(10, Input::Release));
    s.marker(Marker::Released(T1));
    let drained = request(&s.reply(1, &release, Reply::Release { released: true }));
    assert_eq!(drained.op, DbOp::Drained { token: FenceToken(1) });
    assert_eq!(s.phase(), Phase::Standby);
    assert!(
        events(&s.after(1, Input::Stop)).is_empty(),
        "the word is still in flight"
    );
    let out = s.reply(1, &drained, Reply::Drained);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
}

/// A standby of term 5 that saw its holder acknowledge marker 1, then release (the drain point).
fn standby_after_a_release_of_term_5() -> Solo {
    let mut s = standby_of_term_5();
    s.marker_from(PEER_PID, progress(5, 1, None));
    s.data("a");
    s.marker_from(PEER_PID, progress(5, 2, Some(1)));
    s.data("b");
    s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(5))));
    s.data("c");
    s
}

#[test]
fn a_successor_reports_the_term_once_its_predecessor_says_it_drained() {
    let mut s = standby_after_a_release_of_term_5();
    let out = win_term_6(&mut s, true);
    assert!(
        events(&out).is_empty(),
        "not reported before the holder's word: {out:?}"
    );
    assert_eq!(s.phase(), Phase::Standby);
    assert!(delivered(&s.data("d")).is_empty());
    // A forged word, or one of another term, changes nothing.
    assert!(s.marker_from(FORGER_PID, Marker::Drained(FenceToken(5))).is_empty());
    assert!(s.marker_from(PEER_PID, Marker::Drained(FenceToken(4))).is_empty());
    // Nor does a start while it waits, nor a retry falling due.
    assert!(requests(&s.after(1, Input::Start)).is_empty());
    assert!(requests(&s.after(1, Input::FireEarly(TimerKind::Retry))).is_empty());
    let out = s.marker_from(PEER_PID, Marker::Drained(FenceToken(5)));
    assert_eq!(
        events(&out),
        vec![LockEvent::Acquired {
            token: Some(FenceToken(6))
        }]
    );
    assert_eq!(delivered(&out), vec!["c", "d"]);
    assert!(replayed(&out).is_empty(), "exactly once");
    assert_eq!(s.phase(), Phase::Holding);
}

#[test]
fn without_its_predecessors_word_a_successor_replays_after_marker_wait() {
    let mut s = standby_after_a_release_of_term_5();
    win_term_6(&mut s, true);
    let won = s.now;
    let (at, kind) = s.timeout();
    assert_eq!((at, kind), (won + Duration::from_millis(200), TimerKind::MarkerWait));
    let out = s.at(at, Input::Tick);
    assert_eq!(
        events(&out),
        vec![LockEvent::Acquired {
            token: Some(FenceToken(6))
        }]
    );
    // From the holder's newest acknowledged marker on, flagged up to its release marker: at
    // least once.
    assert_eq!(delivered(&out), vec!["a", "b", "c"]);
    assert_eq!(replayed(&out), vec!["a", "b"]);
}

#[test]
fn a_word_before_the_win_or_a_drain_marker_first_is_not_waited_for() {
    let mut s = standby_after_a_release_of_term_5();
    s.marker_from(PEER_PID, Marker::Drained(FenceToken(5)));
    s.data("d");
    let out = win_term_6(&mut s, true);
    assert_eq!(
        events(&out),
        vec![LockEvent::Acquired {
            token: Some(FenceToken(6))
        }]
    );
    assert_eq!(delivered(&out), vec!["c", "d"]);
    assert!(replayed(&out).is_empty());
    // A holder that committed its drain marker before its release (`drain_in_release` off).
    let mut s = standby_of_term_5();
    s.data("a");
    s.marker_from(PEER_PID, Marker::Draining(Some(FenceToken(5))));
    s.data("b");
    s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(5))));
    s.data("c");
    let out = win_term_6(&mut s, true);
    assert_eq!(
        events(&out),
        vec![LockEvent::Acquired {
            token: Some(FenceToken(6))
        }]
    );
    assert_eq!(delivered(&out), vec!["b", "c"]);
}

#[test]
fn a_successor_stopped_while_it_waits_delivers_what_it_won_then_releases() {
    let mut s = standby_after_a_release_of_term_5();
    win_term_6(&mut s, true);
    let out = s.after(1, Input::Stop);
    assert!(out.is_empty(), "waits for the word: {out:?}");
    // What followed the release is this term's (the next holder starts after our `acquired`
    // marker): delivered once the word comes, then released as at any holder's stop.
    let out = s.marker_from(PEER_PID, Marker::Drained(FenceToken(5)));
    assert_eq!(
        events(&out),
        vec![LockEvent::Acquired {
            token: Some(FenceToken(6))
        }]
    );
    assert_eq!(delivered(&out), vec!["c"]);
    let release = request(&out);
    assert_eq!(
        release.op,
        DbOp::Release {
            token: Some(FenceToken(6))
        }
    );
    let out = s.marker_from(OWN_PID, Marker::Released(Some(FenceToken(6))));
    assert_eq!(events(&out), vec![LockEvent::Drained]);
    let out = s.reply(1, &release, Reply::Release { released: true });
    assert_eq!(events(&out), vec![LockEvent::Released]);
    let drained = request(&out);
    let out = s.reply(1, &drained, Reply::Drained);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: true }]);
    // No word before the stop's bound: stopped, the row left to its lease.
    let mut config = fast_config(Protocol::Lease);
    config.marker_wait = Duration::from_secs(5);
    let mut s = Solo::with(config, 7);
    let req = s.attempt();
    s.reply(1, &req, held_by_peer(5, Duration::from_secs(2)));
    s.marker_from(PEER_PID, Marker::Released(Some(FenceToken(5))));
    win_term_6(&mut s, true);
    assert!(s.after(1, Input::Stop).is_empty());
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Shutdown);
    let out = s.at(at, Input::Tick);
    assert_eq!(events(&out), vec![LockEvent::Stopped { released: false }]);
}

#[test]
fn a_successor_cut_off_while_it_waits_never_reports_the_term() {
    // Its session ends: a standby again, attempting only after the won lease expires.
    let mut s = standby_after_a_release_of_term_5();
    win_term_6(&mut s, true);
    let won = s.now;
    assert!(events(&s.after(1, Input::SessionDown(S1))).is_empty());
    assert_eq!(s.phase(), Phase::Standby);
    let out = s.after(1, Input::SessionUp(SessionId(2)));
    assert!(requests(&out).is_empty());
    let (at, _) = s.timeout();
    assert!(
        requests(&s.at(at, Input::Tick)).is_empty(),
        "not before the won lease's expiry"
    );
    let (at, kind) = s.timeout();
    assert_eq!(kind, TimerKind::Retry);
    assert!(at >= won + Duration::from_secs(2), "{at:?}");
    // A `try_acquire` while it waits is answered with the term.
    let mut s = standby_after_a_release_of_term_5();
    win_term_6(&mut s, true);
    assert!(s.after(0, Input::TryAcquire).is_empty());
    let out = s.marker_from(PEER_PID, Marker::Drained(FenceToken(5)));
    assert!(out.contains(&Output::AttemptDone { acquired: true }), "{out:?}");
}
