//! The session batches its `Lease` locks' statements: renewals that fall due together (or
//! within half a renew interval of a renewal going out) go as one `RenewMany`, attempts as one
//! `AcquireMany`; each lock learns its own row's outcome as if it had sent its own statement,
//! and fences itself by its own rule, timed from the batch's send.

use std::time::Duration;

use pgiplock_core::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn lease_config() -> LockConfig {
    let mut c = LockConfig::new(Protocol::Lease);
    c.lease_ttl = ms(3_000);
    c.renew_interval = ms(600);
    c.fence_margin = ms(300);
    c.acquire_interval = ms(1_000);
    c.request_timeout = ms(1_000);
    c
}

/// A session with several locks, a hand-made clock, and what it asked for.
struct Rig {
    session: Session,
    now: Timestamp,
    keys: Vec<LockKey>,
}

impl Rig {
    /// `n` locks on channels `c0`, `c1`, ... (keys 0, 1, ...), in reverse order of their names
    /// so that the batch's channel order is visible.
    fn new(n: u64, config: LockConfig) -> Rig {
        let mut session = Session::new(SessionConfig::default(), 3);
        let schema = SchemaName::new("locks").unwrap();
        let keys: Vec<LockKey> = (0..n).map(LockKey).collect();
        for key in keys.iter().rev() {
            let channel = ChannelName::new(&format!("c{}", key.0)).unwrap();
            session
                .add_lock(*key, channel, schema.clone(), config.clone(), 10 + key.0)
                .unwrap();
        }
        Rig {
            session,
            now: Timestamp::from_millis(1_000),
            keys,
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

    /// Connects and sets every lock up (init, bootstrap, one `LISTEN` each); returns what the
    /// last setup reply made the session do.
    fn up(&mut self) -> Vec<SessionOutput> {
        let mut out = Vec::new();
        for (i, key) in self.keys.clone().into_iter().enumerate() {
            out.extend(self.after(
                Duration::ZERO,
                SessionInput::Call {
                    call: CallId(i as u64 + 1),
                    lock: key,
                    request: LockCall::Init,
                },
            ));
        }
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
        let bootstrap = requests(&out, "bootstrap").pop().expect("a bootstrap");
        let out = self.reply(&bootstrap, Ok(OpReply::Done));
        // Every lock waited for the bootstrap: one statement listens for all of them.
        let listens = if self.keys.len() == 1 {
            requests(&out, "listen")
        } else {
            requests(&out, "listen_many")
        };
        assert_eq!(listens.len(), 1, "{out:?}");
        if let SessionOp::ListenMany { channels } = &listens[0].op {
            assert_eq!(channels.len(), self.keys.len());
        }
        self.reply(&listens[0], Ok(OpReply::Done))
    }

    /// Ticks until the session asks for something; returns that.
    fn next_requests(&mut self) -> Vec<SessionRequest> {
        for _ in 0..100 {
            let out = self.tick();
            let reqs: Vec<SessionRequest> = out
                .iter()
                .filter_map(|o| match o {
                    SessionOutput::Execute(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            if !reqs.is_empty() {
                return reqs;
            }
        }
        panic!("no request after 100 deadlines");
    }

    fn holding(&self) -> Vec<LockKey> {
        self.session
            .locks()
            .filter(|(_, l)| l.state().phase.is_holder())
            .map(|(k, _)| k)
            .collect()
    }
}

fn requests(out: &[SessionOutput], name: &str) -> Vec<SessionRequest> {
    out.iter()
        .filter_map(|o| match o {
            SessionOutput::Execute(r) if r.op.name() == name => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// The locks of a batch, in the batch's order.
fn batch_locks(req: &SessionRequest) -> Vec<LockKey> {
    match &req.op {
        SessionOp::RenewMany { entries, .. } | SessionOp::AcquireMany { entries, .. } => {
            entries.iter().map(|e| e.lock).collect()
        }
        SessionOp::Lock { lock, .. } => vec![*lock],
        other => panic!("not a lock operation: {other:?}"),
    }
}

fn batch_ops(req: &SessionRequest) -> Vec<DbOp> {
    match &req.op {
        SessionOp::RenewMany { entries, .. } | SessionOp::AcquireMany { entries, .. } => {
            entries.iter().map(|e| e.op.clone()).collect()
        }
        SessionOp::Lock { op, .. } => vec![op.clone()],
        other => panic!("not a lock operation: {other:?}"),
    }
}

fn won(token: u64) -> Reply {
    Reply::Acquire(AcquireReply {
        holder_pid: Some(100),
        ..AcquireReply::won(Some(FenceToken(token)))
    })
}

fn refused(remaining: Duration) -> Reply {
    Reply::Acquire(AcquireReply {
        lease_remaining: Some(remaining),
        holder_pid: Some(7),
        holder_token: Some(FenceToken(1)),
        ..AcquireReply::locked()
    })
}

fn lost_events(out: &[SessionOutput]) -> Vec<(LockKey, LostReason)> {
    out.iter()
        .filter_map(|o| match o {
            SessionOutput::Lock {
                lock,
                event: LockEvent::Lost { reason },
            } => Some((*lock, reason.clone())),
            _ => None,
        })
        .collect()
}

/// Sets `n` locks up and lets them all win their first (batched) attempt; returns the time the
/// attempt was sent.
fn all_holding(rig: &mut Rig) -> Timestamp {
    let mut out = rig.up();
    if requests(&out, "acquire_many").is_empty() {
        out = rig.tick();
    }
    let attempt = requests(&out, "acquire_many").pop().expect("one batched attempt");
    let sent = rig.now;
    assert_eq!(batch_locks(&attempt).len(), rig.keys.len());
    let replies = (0..rig.keys.len() as u64).map(|t| won(t + 1)).collect();
    rig.reply(&attempt, Ok(OpReply::Batch(replies)));
    assert_eq!(rig.holding().len(), rig.keys.len());
    sent
}

#[test]
fn attempts_due_together_go_as_one_statement_in_channel_order() {
    let mut rig = Rig::new(5, lease_config());
    let mut out = rig.up();
    if requests(&out, "acquire_many").is_empty() {
        // Each lock attempts after its own wake jitter; the first one due takes the rest along.
        out = rig.tick();
    }
    let statements: Vec<&SessionOutput> = out.iter().filter(|o| matches!(o, SessionOutput::Execute(_))).collect();
    assert_eq!(statements.len(), 1, "{out:?}");
    let attempt = requests(&out, "acquire_many").pop().expect("a batched attempt");
    let SessionOp::AcquireMany { entries, schema } = &attempt.op else {
        unreachable!()
    };
    assert_eq!(schema.as_str(), "locks");
    let channels: Vec<&str> = entries.iter().map(|e| e.target.channel.as_str()).collect();
    assert_eq!(channels, ["c0", "c1", "c2", "c3", "c4"]);
    assert!(batch_ops(&attempt).iter().all(|op| *op == DbOp::Acquire));
    // Every one refused with the same lease left (below the retry bound): their retries, at the
    // lease's expiry plus each one's wake jitter, fall due together again.
    let replies = vec![refused(ms(500)); 5];
    let sent = rig.now;
    let out = rig.reply(&attempt, Ok(OpReply::Batch(replies)));
    assert!(out.iter().all(|o| !matches!(o, SessionOutput::Execute(_))));
    let next = rig.next_requests();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].op.name(), "acquire_many");
    assert_eq!(batch_locks(&next[0]).len(), 5);
    // At the lease's expiry, not before it.
    assert!(rig.now >= sent + ms(500), "{:?}", rig.now);
}

#[test]
fn every_held_lease_is_renewed_by_one_statement_per_interval() {
    let config = lease_config();
    let mut rig = Rig::new(6, config.clone());
    let acquired_at = all_holding(&mut rig);
    let mut sent = acquired_at;
    for round in 0..5u64 {
        let reqs = rig.next_requests();
        assert_eq!(reqs.len(), 1, "round {round}: {reqs:?}");
        let renew = &reqs[0];
        assert_eq!(renew.op.name(), "renew_many");
        assert_eq!(rig.now, sent + config.renew_interval, "round {round}");
        sent = rig.now;
        // Each entry is its own lock's renewal: its own token and progress marker.
        let ops = batch_ops(renew);
        assert_eq!(ops.len(), 6);
        for (key, op) in batch_locks(renew).iter().zip(&ops) {
            let DbOp::Renew { token, progress } = op else {
                panic!("{op:?}")
            };
            assert_eq!(*token, Some(FenceToken(key.0 + 1)));
            assert_eq!(progress.map(|p| p.seq), Some(round + 1));
        }
        let replies = vec![Reply::Renew { owned: true }; 6];
        let out = rig.reply(renew, Ok(OpReply::Batch(replies)));
        assert!(lost_events(&out).is_empty());
    }
    assert_eq!(rig.holding().len(), 6);
}

#[test]
fn a_renewal_due_within_half_an_interval_joins_the_batch_early_and_stays_aligned() {
    let config = lease_config();
    let mut rig = Rig::new(3, config.clone());
    let mut out = rig.up();
    if requests(&out, "acquire_many").is_empty() {
        out = rig.tick();
    }
    let attempt = requests(&out, "acquire_many").pop().unwrap();
    // Lock 0 wins now; locks 1 and 2 find leases that end 200 ms and 450 ms from now.
    let t0 = rig.now;
    rig.reply(
        &attempt,
        Ok(OpReply::Batch(vec![won(1), refused(ms(200)), refused(ms(450))])),
    );
    let reqs = rig.next_requests();
    assert_eq!(batch_locks(&reqs[0]), [LockKey(1)], "too far apart to share an attempt");
    let t1 = rig.now;
    rig.reply(&reqs[0], Ok(OpReply::Lock(won(2))));
    let reqs = rig.next_requests();
    assert_eq!(batch_locks(&reqs[0]), [LockKey(2)]);
    let t2 = rig.now;
    rig.reply(&reqs[0], Ok(OpReply::Lock(won(3))));
    assert!(t1 + config.renew_interval <= t0 + config.renew_interval + config.renew_interval / 2);
    assert!(t2 + config.renew_interval > t0 + config.renew_interval + config.renew_interval / 2);

    // Lock 0's renewal falls due first; lock 1's is within half an interval and goes with it,
    // early; lock 2's is not.
    let reqs = rig.next_requests();
    assert_eq!(rig.now, t0 + config.renew_interval);
    assert_eq!(reqs.len(), 1);
    assert_eq!(batch_locks(&reqs[0]), [LockKey(0), LockKey(1)]);
    assert!(rig.now < t1 + config.renew_interval, "lock 1 renewed early");
    let first = rig.now;
    rig.reply(&reqs[0], Ok(OpReply::Batch(vec![Reply::Renew { owned: true }; 2])));
    // Lock 2's own renewal takes the others along: from then on one statement renews all.
    let reqs = rig.next_requests();
    assert_eq!(rig.now, t2 + config.renew_interval);
    assert_eq!(batch_locks(&reqs[0]), [LockKey(0), LockKey(1), LockKey(2)]);
    assert!(
        rig.now < first + config.renew_interval,
        "locks 0 and 1 early again, never late"
    );
    let aligned = rig.now;
    rig.reply(&reqs[0], Ok(OpReply::Batch(vec![Reply::Renew { owned: true }; 3])));
    for round in 1..4u32 {
        let reqs = rig.next_requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(batch_locks(&reqs[0]).len(), 3);
        // The lease of a lock that went early runs from the batch's send: every renewal is
        // due one interval after the last batch.
        assert_eq!(rig.now, aligned + config.renew_interval * round);
        rig.reply(&reqs[0], Ok(OpReply::Batch(vec![Reply::Renew { owned: true }; 3])));
    }
}

#[test]
fn a_batch_in_which_some_rows_renewed_and_some_did_not() {
    let mut rig = Rig::new(4, lease_config());
    all_holding(&mut rig);
    let renew = rig.next_requests().pop().unwrap();
    assert_eq!(batch_locks(&renew), [LockKey(0), LockKey(1), LockKey(2), LockKey(3)]);
    let replies = vec![
        Reply::Renew { owned: true },
        Reply::Renew { owned: false },
        Reply::Renew { owned: true },
        Reply::Renew { owned: false },
    ];
    let out = rig.reply(&renew, Ok(OpReply::Batch(replies)));
    assert_eq!(
        lost_events(&out),
        [
            (LockKey(1), LostReason::Superseded),
            (LockKey(3), LostReason::Superseded)
        ]
    );
    assert_eq!(rig.holding(), [LockKey(0), LockKey(2)]);
    // The next batch renews only what is still held (the others compete as standbys).
    let reqs = rig.next_requests();
    let renew = reqs
        .iter()
        .find(|r| r.op.name() == "renew_many")
        .expect("a renewal batch");
    assert_eq!(batch_locks(renew), [LockKey(0), LockKey(2)]);
}

#[test]
fn a_failed_batch_fails_every_lock_in_it() {
    let mut rig = Rig::new(3, lease_config());
    all_holding(&mut rig);
    let renew = rig.next_requests().pop().unwrap();
    let missing = DbError::server("42883", "function locks.renew_many does not exist");
    let out = rig.reply(&renew, Err(missing));
    // The schema is bootstrapped again once, and every lock heard of the failure.
    assert_eq!(requests(&out, "bootstrap").len(), 1);
    let warned = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                SessionOutput::Lock {
                    event: LockEvent::Warning(Warning::RequestFailed { op: "renew", .. }),
                    ..
                }
            )
        })
        .count();
    assert_eq!(warned, 3);
}

#[test]
fn a_batch_reply_that_never_comes_fences_every_lock_before_its_lease_ends() {
    let mut config = lease_config();
    // Long enough that the fence, not the request timeout, ends the terms.
    config.request_timeout = ms(10_000);
    let mut rig = Rig::new(5, config.clone());
    all_holding(&mut rig);
    let renew = rig.next_requests().pop().unwrap();
    let confirmed = rig.now;
    rig.reply(&renew, Ok(OpReply::Batch(vec![Reply::Renew { owned: true }; 5])));
    // The next batch goes out and is never answered.
    let reqs = rig.next_requests();
    assert_eq!(reqs[0].op.name(), "renew_many");
    assert_eq!(batch_locks(&reqs[0]).len(), 5);
    let mut lost = Vec::new();
    while lost.len() < 5 {
        let out = rig.tick();
        for (key, reason) in lost_events(&out) {
            assert_eq!(reason, LostReason::LeaseExpired);
            lost.push((key, rig.now));
        }
        assert!(
            rig.now <= confirmed + config.lease_ttl,
            "still holding at {:?}",
            rig.now
        );
    }
    // Each fenced itself at its own rule, timed from the last confirmed batch's send, strictly
    // before the lease the server granted then (which began no earlier) can end.
    for (key, at) in lost {
        assert_eq!(at, confirmed + config.lease_ttl - config.fence_margin, "{key:?}");
        assert!(at < confirmed + config.lease_ttl);
    }
    assert!(rig.holding().is_empty());
}

#[test]
fn a_batch_reply_that_never_comes_times_out_every_lock() {
    let config = lease_config();
    let mut rig = Rig::new(3, config.clone());
    all_holding(&mut rig);
    let reqs = rig.next_requests();
    let sent = rig.now;
    assert_eq!(batch_locks(&reqs[0]).len(), 3);
    let out = rig.tick();
    assert_eq!(rig.now, sent + config.request_timeout);
    let lost = lost_events(&out);
    assert_eq!(lost.len(), 3, "{out:?}");
    assert!(lost.iter().all(|(_, r)| *r == LostReason::RequestTimeout));
    assert!(out.iter().any(|o| matches!(o, SessionOutput::Disconnect { .. })));
}

#[test]
fn a_late_batch_reply_after_a_reset_is_ignored() {
    let config = lease_config();
    let mut rig = Rig::new(2, config);
    all_holding(&mut rig);
    let renew = rig.next_requests().pop().unwrap();
    rig.tick(); // the request timeout resets the connection
    assert!(rig.holding().is_empty());
    let out = rig.reply(&renew, Ok(OpReply::Batch(vec![Reply::Renew { owned: true }; 2])));
    assert!(out.iter().all(|o| !matches!(
        o,
        SessionOutput::Lock {
            event: LockEvent::Acquired { .. },
            ..
        }
    )));
    assert!(rig.holding().is_empty());
}

#[test]
fn a_batch_reply_of_the_wrong_length_fails_every_lock_instead_of_guessing() {
    let mut rig = Rig::new(3, lease_config());
    all_holding(&mut rig);
    let renew = rig.next_requests().pop().unwrap();
    let out = rig.reply(&renew, Ok(OpReply::Batch(vec![Reply::Renew { owned: true }])));
    let failed = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                SessionOutput::Lock {
                    event: LockEvent::Warning(Warning::RequestFailed { .. }),
                    ..
                }
            )
        })
        .count();
    assert_eq!(failed, 3);
}

#[test]
fn locks_set_up_while_a_listen_is_in_flight_listen_together_once_it_is_answered() {
    let mut rig = Rig::new(1, lease_config());
    rig.up();
    let schema = SchemaName::new("locks").unwrap();
    for key in 1..=4u64 {
        let channel = ChannelName::new(&format!("late{key}")).unwrap();
        rig.session
            .add_lock(LockKey(key), channel, schema.clone(), lease_config(), key)
            .unwrap();
    }
    let init = |rig: &mut Rig, key: u64| {
        rig.after(
            Duration::ZERO,
            SessionInput::Call {
                call: CallId(100 + key),
                lock: LockKey(key),
                request: LockCall::Init,
            },
        )
    };
    // The first goes alone; the next three wait for it, then go as one statement.
    let first = requests(&init(&mut rig, 1), "listen").pop().expect("a listen");
    for key in 2..=4 {
        let out = init(&mut rig, key);
        assert!(out.iter().all(|o| !matches!(o, SessionOutput::Execute(_))), "{out:?}");
    }
    let out = rig.reply(&first, Ok(OpReply::Done));
    let many = requests(&out, "listen_many").pop().expect("the rest in one statement");
    let SessionOp::ListenMany { channels } = &many.op else {
        unreachable!()
    };
    let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(names, ["late2", "late3", "late4"]);
    let out = rig.reply(&many, Ok(OpReply::Done));
    for key in 2..=4u64 {
        assert!(out.contains(&SessionOutput::CallDone {
            call: CallId(100 + key),
            result: Ok(CallReply::Done)
        }));
    }
}

#[test]
fn classic_locks_keep_their_own_statements() {
    let mut rig = Rig::new(3, LockConfig::new(Protocol::Classic));
    let out = rig.up();
    let attempts = requests(&out, "acquire");
    assert_eq!(attempts.len(), 3, "{out:?}");
    assert!(requests(&out, "acquire_many").is_empty());
}
