//! Property tests: random input sequences into one lock, and random fleets against the
//! in-memory database.
//!
//! Cases default to 256 per property; set `PROPTEST_CASES` for more.

mod harness;

use std::time::Duration;

use harness::*;
use pgiplock_core::check::LockChecker;
use pgiplock_core::*;
use proptest::prelude::*;

// ----- one lock, any input -----

/// Which request id a reply carries: the latest request's, or one near it (late or bogus).
#[derive(Debug, Clone)]
enum IdChoice {
    Latest,
    Offset(i8),
}

/// Which session an input names: the latest announced, or a fixed small id (old or future).
#[derive(Debug, Clone)]
enum SessionChoice {
    Latest,
    Fixed(u64),
}

#[derive(Debug, Clone)]
enum Step {
    Tick,
    Start,
    TryAcquire,
    Release,
    Stop,
    Signal,
    SessionUp(u64),
    SessionUpNext,
    SessionDown(SessionChoice),
    Result(IdChoice, Result<Reply, DbError>),
    Data(SessionChoice, String),
    Marker(SessionChoice, String),
    OtherChannel(SessionChoice),
}

fn token() -> impl Strategy<Value = Option<FenceToken>> {
    prop_oneof![Just(None), (0u64..6).prop_map(|t| Some(FenceToken(t)))]
}

fn reply() -> impl Strategy<Value = Result<Reply, DbError>> {
    let stale = prop_oneof![
        3 => Just(None),
        1 => (0i32..3).prop_map(|pid| Some(StaleHolder { pid, app: format!("app-{pid}") })),
    ];
    let remaining = prop_oneof![
        Just(None),
        (0u64..5_000).prop_map(|ms| Some(Duration::from_millis(ms))),
        Just(Some(Duration::MAX)),
    ];
    prop_oneof![
        4 => (any::<bool>(), token(), remaining, stale).prop_map(|(acquired, token, lease_remaining, stale_holder)| {
            Ok(Reply::Acquire(AcquireReply { acquired, token, lease_remaining, stale_holder }))
        }),
        3 => any::<bool>().prop_map(|owned| Ok(Reply::Renew { owned })),
        2 => Just(Ok(Reply::Drained)),
        2 => any::<bool>().prop_map(|released| Ok(Reply::Release { released })),
        1 => prop_oneof![
            Just(TerminateOutcome::Terminated),
            Just(TerminateOutcome::Gone),
            Just(TerminateOutcome::NotPermitted)
        ]
        .prop_map(|o| Ok(Reply::Terminate(o))),
        1 => Just(Err(DbError::SessionLost)),
        1 => Just(Err(DbError::PermissionDenied("denied".into()))),
        1 => Just(Err(DbError::Failed("failed".into()))),
    ]
}

fn session_choice() -> impl Strategy<Value = SessionChoice> {
    prop_oneof![4 => Just(SessionChoice::Latest), 1 => (0u64..4).prop_map(SessionChoice::Fixed)]
}

fn marker_payload() -> impl Strategy<Value = String> {
    prop_oneof![
        token().prop_map(|t| Marker::Draining(t).payload()),
        token().prop_map(|t| Marker::Released(t).payload()),
        (0u64..6).prop_map(|t| Marker::Acquired(FenceToken(t)).payload()),
        "[a-z:0-9]{0,12}",
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let id = prop_oneof![4 => Just(IdChoice::Latest), 1 => (-3i8..3).prop_map(IdChoice::Offset)];
    prop_oneof![
        4 => Just(Step::Tick),
        2 => Just(Step::Start),
        1 => Just(Step::TryAcquire),
        1 => Just(Step::Release),
        1 => prop_oneof![Just(Step::Stop), Just(Step::Signal)],
        1 => (0u64..5).prop_map(Step::SessionUp),
        1 => Just(Step::SessionUpNext),
        1 => session_choice().prop_map(Step::SessionDown),
        6 => (id, reply()).prop_map(|(id, r)| Step::Result(id, r)),
        3 => (session_choice(), "[a-c]{1,2}").prop_map(|(s, p)| Step::Data(s, p)),
        3 => (session_choice(), marker_payload()).prop_map(|(s, p)| Step::Marker(s, p)),
        1 => session_choice().prop_map(Step::OtherChannel),
    ]
}

/// Time step in microseconds: mostly small, sometimes seconds, sometimes backwards.
fn delta() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..2_000,
        3 => 0i64..3_000_000,
        1 => -1_000_000i64..0,
    ]
}

/// Turns generated steps into inputs (the session and request ids they name depend on what the
/// lock did so far) and feeds them through the core's checker.
struct Driver {
    lock: Lock,
    checker: LockChecker,
    now: Timestamp,
    latest_request: Option<RequestId>,
    latest_session: u64,
}

impl Driver {
    fn new(config: LockConfig, seed: u64) -> Driver {
        Driver {
            lock: Lock::new(ChannelName::new(CHANNEL).unwrap(), config, seed),
            checker: LockChecker::new(),
            now: Timestamp::from_millis(5_000),
            latest_request: None,
            latest_session: 0,
        }
    }

    fn session(&self, choice: &SessionChoice) -> SessionId {
        match choice {
            SessionChoice::Latest => SessionId(self.latest_session),
            SessionChoice::Fixed(id) => SessionId(*id),
        }
    }

    fn input_of(&mut self, step: &Step) -> Input {
        let lock_channel = self.lock.channel().lock_channel().to_owned();
        match step {
            Step::Tick => Input::Tick,
            Step::Start => Input::Start,
            Step::TryAcquire => Input::TryAcquire,
            Step::Release => Input::Release,
            Step::Stop => Input::Stop,
            Step::Signal => Input::Signal(SignalKind::Terminate),
            Step::SessionUp(id) => Input::SessionUp(SessionId(*id)),
            Step::SessionUpNext => {
                self.latest_session += 1;
                Input::SessionUp(SessionId(self.latest_session))
            }
            Step::SessionDown(s) => Input::SessionDown(self.session(s)),
            Step::Result(id, result) => {
                let latest = self.latest_request.map_or(0, |r| r.0);
                let id = match id {
                    IdChoice::Latest => latest,
                    // Ahead of the latest: an id never sent (far ahead, so that it cannot be
                    // one the lock emits during this very input).
                    IdChoice::Offset(o) if *o > 0 => latest.saturating_add(1_000_000 * o.unsigned_abs() as u64),
                    IdChoice::Offset(o) => latest.saturating_sub(u64::from(o.unsigned_abs())),
                };
                Input::DbResult {
                    id: RequestId(id),
                    result: result.clone(),
                }
            }
            Step::Data(s, payload) => Input::Notification {
                session: self.session(s),
                channel: CHANNEL.to_owned(),
                payload: payload.clone(),
            },
            Step::Marker(s, payload) => Input::Notification {
                session: self.session(s),
                channel: lock_channel,
                payload: payload.clone(),
            },
            Step::OtherChannel(s) => Input::Notification {
                session: self.session(s),
                channel: "elsewhere".to_owned(),
                payload: "1".to_owned(),
            },
        }
    }

    fn step(&mut self, delta_us: i64, step: &Step) -> Result<(), TestCaseError> {
        self.now = Timestamp::from_micros(self.now.as_micros().saturating_add_signed(delta_us));
        let input = self.input_of(step);
        let shown = format!("{input:?}");
        let outputs = self
            .checker
            .handle_input(&mut self.lock, self.now, input)
            .map_err(|v| TestCaseError::fail(format!("{v} (after {shown} at {:?})", self.now)))?;
        let latest = outputs.iter().rev().find_map(|o| match o {
            Output::Request(r) => Some(r.id),
            _ => None,
        });
        self.latest_request = latest.or(self.latest_request);
        Ok(())
    }
}

fn config() -> impl Strategy<Value = LockConfig> {
    (
        prop_oneof![Just(Protocol::Lease), Just(Protocol::Classic)],
        any::<bool>(),
        0u64..4,
    )
        .prop_map(|(protocol, fast, weird)| {
            let mut c = if fast {
                fast_config(protocol)
            } else {
                LockConfig::new(protocol)
            };
            match weird {
                // Settings validate() refuses: clamped, never a panic or a busy loop.
                1 => {
                    c.wake_jitter = Duration::ZERO;
                    c.request_timeout = Duration::ZERO;
                    c.handover_buffer = 0;
                }
                2 => {
                    c.handover_buffer = 2;
                    c.fence_margin = c.lease_ttl;
                }
                _ => {}
            }
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn one_lock_any_input(config in config(), seed in any::<u64>(), steps in prop::collection::vec((delta(), step()), 1..120)) {
        let mut driver = Driver::new(config, seed);
        for (delta, step) in &steps {
            driver.step(*delta, step)?;
        }
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ----- a fleet against the in-memory database -----

#[derive(Debug, Clone)]
enum Fault {
    Wait(u64),
    Release(usize),
    Stop(usize),
    TryAcquire(usize),
    Crash(usize),
    Cut(usize),
    Heal(usize),
    Restart(usize),
    Publish(u8),
}

fn fault(graceful_only: bool) -> BoxedStrategy<Fault> {
    let node = 0usize..5;
    if graceful_only {
        prop_oneof![
            6 => (1u64..3_000).prop_map(Fault::Wait),
            2 => node.clone().prop_map(Fault::Release),
            1 => node.clone().prop_map(Fault::TryAcquire),
            4 => any::<u8>().prop_map(Fault::Publish),
        ]
        .boxed()
    } else {
        prop_oneof![
            6 => (1u64..3_000).prop_map(Fault::Wait),
            2 => node.clone().prop_map(Fault::Release),
            1 => node.clone().prop_map(Fault::Stop),
            1 => node.clone().prop_map(Fault::TryAcquire),
            1 => node.clone().prop_map(Fault::Crash),
            1 => node.clone().prop_map(Fault::Cut),
            1 => node.clone().prop_map(Fault::Heal),
            1 => node.clone().prop_map(Fault::Restart),
            3 => any::<u8>().prop_map(Fault::Publish),
        ]
        .boxed()
    }
}

fn latency() -> impl Strategy<Value = Latency> {
    (1u64..3_000, 1u64..3_000, 1u64..3_000, 1u64..20_000).prop_map(|(req, rep, notify, connect)| Latency {
        request: Duration::from_micros(req),
        reply: Duration::from_micros(rep),
        notify: Duration::from_micros(notify),
        connect: Duration::from_micros(connect),
    })
}

/// Runs a fleet through `faults`; the world checks S2 (when on), S3 and S4 after every step.
fn run_fleet(protocol: Protocol, n: usize, seed: u64, latency: Latency, faults: &[Fault]) -> World {
    let config = fast_config(protocol);
    let mut w = World::new(config.clone(), n, seed);
    w.latency = latency;
    w.start_all();
    let mut published = 0u64;
    for (i, f) in faults.iter().enumerate() {
        match *f {
            Fault::Wait(ms) => w.run_for(Duration::from_millis(ms)),
            Fault::Release(node) => w.input(node % n, Input::Release),
            Fault::Stop(node) => w.input(node % n, Input::Stop),
            Fault::TryAcquire(node) => w.input(node % n, Input::TryAcquire),
            Fault::Crash(node) => w.crash(node % n),
            Fault::Cut(node) => w.cut(node % n),
            Fault::Heal(node) => w.heal(node % n),
            Fault::Restart(node) => {
                if w.nodes[node % n].lock.is_none() {
                    w.restart(node % n, config.clone(), seed ^ i as u64);
                }
            }
            Fault::Publish(burst) => {
                // A burst of messages spread over a few milliseconds.
                for k in 0..u64::from(burst % 8) {
                    let at = w.now + Duration::from_micros(700 * k);
                    w.publish_at(at, &format!("m{published}"));
                    published += 1;
                }
            }
        }
    }
    w.run_for(Duration::from_secs(10));
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// S2 (one believer), S3, S4 under Lease with any faults; S3 and S4 under Classic.
    #[test]
    fn fleet_safety(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        faults in prop::collection::vec(fault(false), 1..40),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let w = run_fleet(protocol, n, seed, latency, &faults);
        // Delivered messages are a subset of the published ones, never invented, and none twice
        // (at most once across every fault here: crashes, cuts, stops, releases).
        let mut all = w.all_delivered();
        for p in &all {
            prop_assert!(w.published.contains(p));
        }
        let delivered = all.len();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), delivered, "duplicates");
        // Liveness (L2, L3): ten seconds after the last fault, a process that is alive, connected
        // and not stopped holds the lock. Under Classic only without silent cuts: a cut holder's
        // session blocks its row for as long as the server keeps it (the weakness Lease fixes).
        let cuts = faults.iter().any(|f| matches!(f, Fault::Cut(_)));
        let eligible: Vec<usize> = (0..n)
            .filter(|&i| !w.nodes[i].cut && w.nodes[i].lock.as_ref().is_some_and(|l| !l.state().stopping))
            .collect();
        if !eligible.is_empty() && (lease || !cuts) {
            let holders = w.holders();
            prop_assert_eq!(holders.len(), 1, "no holder among {:?}", eligible);
            prop_assert!(eligible.contains(&holders[0]));
        }
    }

    /// With graceful releases only and a holder in place before publishing starts, every message
    /// is delivered exactly once (lossless handover), whatever the latencies. (Under Classic
    /// without explicit `TryAcquire`s, see below.)
    #[test]
    fn fleet_graceful_handover_is_exactly_once(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        faults in prop::collection::vec(fault(true), 1..40),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let config = fast_config(protocol);
        let mut w = World::new(config, n, seed);
        w.latency = latency;
        // Classic has no split brain without faults either.
        w.check_s2 = true;
        w.start_all();
        prop_assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
        let mut published = 0u64;
        for f in &faults {
            match *f {
                Fault::Wait(ms) => w.run_for(Duration::from_millis(ms)),
                Fault::Release(node) => w.input(node % n, Input::Release),
                // Classic announces no new term, so a releaser keeps nothing for the next one
                // (at most once): a releaser that asks again at once may win and lose what
                // followed its marker. Without explicit attempts a standby always wins first.
                Fault::TryAcquire(node) if lease => w.input(node % n, Input::TryAcquire),
                Fault::Publish(burst) => {
                    for k in 0..u64::from(burst % 8) {
                        let at = w.now + Duration::from_micros(700 * k);
                        w.publish_at(at, &format!("m{published}"));
                        published += 1;
                    }
                }
                _ => {}
            }
        }
        w.run_for(Duration::from_secs(10));
        prop_assert_eq!(w.holders().len(), 1);
        let mut all = w.all_delivered();
        let delivered = all.len();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), delivered, "duplicates");
        prop_assert_eq!(delivered as u64, published, "lost messages");
    }
}
