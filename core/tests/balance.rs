//! Fair share on one session: the session asks for its group's counts alongside the group's
//! statements, releases what exceeds its share by the ordinary graceful release, and keeps
//! attempts beyond its allowance from going out at all.

use std::time::Duration;

use pgiplock_core::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn balanced_config() -> LockConfig {
    let mut c = LockConfig::new(Protocol::Lease);
    c.lease_ttl = ms(3_000);
    c.renew_interval = ms(600);
    c.fence_margin = ms(300);
    c.acquire_interval = ms(1_000);
    c.request_timeout = ms(1_000);
    c.balance = Some("fleet".into());
    c
}

struct Rig {
    session: Session,
    now: Timestamp,
    keys: Vec<LockKey>,
}

impl Rig {
    fn new(n: u64) -> Rig {
        let mut session = Session::new(SessionConfig::default(), 5);
        let schema = SchemaName::new("locks").unwrap();
        let keys: Vec<LockKey> = (0..n).map(LockKey).collect();
        for key in &keys {
            let channel = ChannelName::new(&format!("c{:02}", key.0)).unwrap();
            session
                .add_lock(*key, channel, schema.clone(), balanced_config(), 10 + key.0)
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

    /// Connects and sets every lock up; returns what the last setup reply made it do.
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
        let mut listens = requests(&out, "listen_many");
        listens.extend(requests(&out, "listen"));
        let listen = listens.pop().expect("one listen");
        self.reply(&listen, Ok(OpReply::Done))
    }

    fn phase_count(&self, phase: Phase) -> usize {
        self.session.locks().filter(|(_, l)| l.phase() == phase).count()
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

fn won(token: u64) -> Reply {
    Reply::Acquire(AcquireReply {
        holder_pid: Some(100),
        ..AcquireReply::won(Some(FenceToken(token)))
    })
}

fn counts(channels: u64, members: &[u64], own: usize) -> OpReply {
    OpReply::Balance(BalanceCounts {
        channels,
        members: members.to_vec(),
        own: Some(own),
        free: Vec::new(),
    })
}

/// Sets 10 balanced locks up, lets them all win, and answers the counts query the attempt
/// brought along with `reply`; returns what that answer made the session do.
fn all_won_then(rig: &mut Rig, reply: OpReply) -> Vec<SessionOutput> {
    let mut out = rig.up();
    if requests(&out, "acquire_many").is_empty() {
        out = rig.tick();
    }
    let attempt = requests(&out, "acquire_many").pop().expect("one batched attempt");
    let balance = requests(&out, "balance")
        .pop()
        .expect("counts asked with the first attempt");
    let SessionOp::Balance {
        group,
        register,
        leave,
        schema,
    } = &balance.op
    else {
        unreachable!()
    };
    assert_eq!((group.as_str(), schema.as_str(), *leave), ("fleet", "locks", false));
    assert_eq!(register.len(), 10, "every channel recorded with the first counts query");
    let replies = (0..10).map(|t| won(t + 1)).collect();
    rig.reply(&attempt, Ok(OpReply::Batch(replies)));
    assert_eq!(rig.phase_count(Phase::Holding), 10);
    rig.reply(&balance, Ok(reply))
}

#[test]
fn counts_showing_a_second_member_release_down_to_quota_plus_one_by_graceful_release() {
    let mut rig = Rig::new(10);
    let out = all_won_then(&mut rig, counts(10, &[10, 0], 0));
    // q = 5: down to 6, each by its release, which is its drain point: delivering until its
    // own release marker comes back.
    let releases = requests(&out, "release");
    assert_eq!(releases.len(), 4, "{out:?}");
    assert!(requests(&out, "drain").is_empty(), "{out:?}");
    assert_eq!(rig.phase_count(Phase::Holding), 6);
    assert_eq!(rig.phase_count(Phase::Draining), 4);
}

#[test]
fn fair_counts_release_nothing() {
    let mut rig = Rig::new(10);
    let out = all_won_then(&mut rig, counts(20, &[10, 10], 1));
    assert!(requests(&out, "drain").is_empty(), "{out:?}");
    assert_eq!(rig.phase_count(Phase::Holding), 10);
}

#[test]
fn attempts_beyond_the_allowance_are_not_sent_and_retry_later() {
    let mut rig = Rig::new(10);
    let mut out = rig.up();
    if requests(&out, "acquire_many").is_empty() {
        out = rig.tick();
    }
    let attempt = requests(&out, "acquire_many").pop().expect("one batched attempt");
    let balance = requests(&out, "balance").pop().expect("a counts query");
    // The table: another member holds all 10; we win none.
    let refused = Reply::Acquire(AcquireReply {
        lease_remaining: Some(ms(2_000)),
        holder_pid: Some(7),
        holder_token: Some(FenceToken(1)),
        ..AcquireReply::locked()
    });
    rig.reply(&attempt, Ok(OpReply::Batch(vec![refused; 10])));
    // Two members, 10 channels: q = 5 and the other is above it, so we may take five at most.
    rig.reply(&balance, Ok(counts(10, &[0, 10], 0)));
    // Attempts fall due over the retry window; every one the session sends wins.
    let mut token = 20;
    let mut sent = 0;
    for _ in 0..200 {
        let out = rig.tick();
        for r in requests(&out, "balance") {
            rig.reply(&r, Ok(counts(10, &[0, 10], 0)));
        }
        for r in requests(&out, "renew_many") {
            let SessionOp::RenewMany { entries, .. } = &r.op else {
                unreachable!()
            };
            let replies = vec![Reply::Renew { owned: true }; entries.len()];
            rig.reply(&r, Ok(OpReply::Batch(replies)));
        }
        for r in requests(&out, "renew") {
            rig.reply(&r, Ok(OpReply::Lock(Reply::Renew { owned: true })));
        }
        for r in requests(&out, "acquire_many") {
            let SessionOp::AcquireMany { entries, .. } = &r.op else {
                unreachable!()
            };
            sent += entries.len();
            let replies = entries
                .iter()
                .map(|_| {
                    token += 1;
                    won(token)
                })
                .collect();
            rig.reply(&r, Ok(OpReply::Batch(replies)));
        }
        for r in requests(&out, "acquire") {
            sent += 1;
            token += 1;
            rig.reply(&r, Ok(OpReply::Lock(won(token))));
        }
        assert!(rig.phase_count(Phase::Holding) <= 5, "beyond the allowance");
        assert!(requests(&out, "drain").is_empty(), "{out:?}");
    }
    // Two members, 10 channels: q = 5 and the other above it, so five at most, and the five
    // held back never went out again.
    assert_eq!(rig.phase_count(Phase::Holding), 5);
    assert_eq!(sent, 5, "attempts sent after the counts");
}

#[test]
fn the_last_lock_of_a_group_leaves_it() {
    let mut rig = Rig::new(1);
    let mut out = rig.up();
    out.extend(rig.after(
        ms(1),
        SessionInput::Call {
            call: CallId(100),
            lock: LockKey(0),
            request: LockCall::Destroy { signal: None },
        },
    ));
    // Answer whatever is in flight (an attempt: refused) until the lock is gone.
    for _ in 0..20 {
        if out
            .iter()
            .any(|o| matches!(o, SessionOutput::Execute(r) if matches!(&r.op, SessionOp::Balance { leave: true, .. })))
        {
            return;
        }
        let mut next = Vec::new();
        for r in requests(&out, "acquire") {
            next.extend(rig.reply(&r, Ok(OpReply::Lock(Reply::Acquire(AcquireReply::locked())))));
        }
        if next.is_empty() {
            next = rig.tick();
        }
        out = next;
    }
    panic!("the session never told the table it left the group");
}

#[test]
fn classic_refuses_balance() {
    let mut c = LockConfig::new(Protocol::Classic);
    c.balance = Some("fleet".into());
    assert_eq!(c.validate(), Err(ConfigError::BalanceNeedsLease));
    let mut c = balanced_config();
    c.balance = Some(String::new());
    assert!(matches!(c.validate(), Err(ConfigError::BadBalanceGroup(_))));
    c.balance = Some("x".repeat(64));
    assert!(matches!(c.validate(), Err(ConfigError::BadBalanceGroup(_))));
    assert_eq!(balanced_config().validate(), Ok(()));
}
