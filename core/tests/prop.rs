//! Property tests: random input sequences into one lock, every invariant checked by
//! [`pgiplock_core::check::LockChecker`] after each input. (Fleets of locks against the
//! simulator's database model: `sim/tests/fleet_prop.rs`.)
//!
//! Cases default to 256; set `PROPTEST_CASES` for more.

mod common;

use std::time::Duration;

use common::*;
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
    StandDown,
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
            Ok(Reply::Acquire(AcquireReply { acquired, token, lease_remaining, stale_holder, ..AcquireReply::locked() }))
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
        1 => Just(Step::StandDown),
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
            Step::StandDown => Input::StandDown,
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
                pid: 1,
            },
            // A Classic drain marker travels on the drain channel; other payloads there are strays.
            Step::Marker(s, payload) => Input::Notification {
                session: self.session(s),
                channel: Marker::parse(payload).map_or(lock_channel, |m| {
                    m.channel(self.lock.config().protocol, self.lock.channel()).to_owned()
                }),
                payload: payload.clone(),
                pid: 1,
            },
            Step::OtherChannel(s) => Input::Notification {
                session: self.session(s),
                channel: "elsewhere".to_owned(),
                payload: "1".to_owned(),
                pid: 1,
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
