//! The `lock_events` target: a sequence of `(delta, input)` into one lock, with every invariant
//! of the state machine checked after each input.
//!
//! Byte format (every byte string decodes; missing bytes read as zero):
//!
//! ```text
//! header: config (1 byte) seed (8 bytes, little endian)
//!   config bit 0: Classic (else Lease); bit 1: default timings (else short test timings);
//!   bits 2-3: 1 = zero jitter/timeout and empty buffer (clamped by the lock), 2 = a buffer of
//!   two messages, 3 = fence_margin = lease_ttl (a lease is never usable).
//! steps:  delta (1 byte) op (1 byte) arguments (0-3 bytes)
//!   delta 0..=127: d * 100 µs; 128..=239: (d - 127) * 50 ms; 240..=255: (d - 239) * 100 ms back.
//!   op % 14: see [`Step::decode`].
//! ```

use std::time::Duration;

use pgiplock_core::check::LockChecker;
use pgiplock_core::{
    AcquireReply, ChannelName, DbError, FenceToken, Input, Lock, LockConfig, Marker, Output, Protocol, Reply,
    RequestId, SessionId, SignalKind, StaleHolder, TerminateOutcome, Timestamp,
};

use crate::bytes::Reader;

/// The channel of the fuzzed lock.
pub const CHANNEL: &str = "jobs";

/// Most steps decoded from one input: bounds the run time of a fuzz case.
pub const MAX_STEPS: usize = 2_000;

/// Which session an input names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionChoice {
    /// The latest announced with [`Step::SessionUpNext`].
    Latest,
    /// A fixed small id (old, current or future).
    Fixed(u64),
}

impl SessionChoice {
    fn decode(b: u8) -> Self {
        if b % 8 < 5 {
            SessionChoice::Latest
        } else {
            SessionChoice::Fixed(u64::from(b / 8 % 5))
        }
    }

    fn encode(self) -> u8 {
        match self {
            SessionChoice::Latest => 0,
            SessionChoice::Fixed(id) => 5 + (id % 5) as u8 * 8,
        }
    }
}

/// Which request a reply answers: the latest sent, or one a little off (late or bogus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdChoice {
    /// The latest request's id.
    Latest,
    /// An earlier id (-3..=-1: late replies) or one never sent (1..=3).
    Offset(i8),
}

impl IdChoice {
    fn decode(b: u8) -> Self {
        if b % 8 < 5 {
            IdChoice::Latest
        } else {
            IdChoice::Offset((b / 8 % 7) as i8 - 3)
        }
    }

    fn encode(self) -> u8 {
        match self {
            IdChoice::Latest => 0,
            IdChoice::Offset(o) => 5 + ((o.clamp(-3, 3) + 3) as u8) * 8,
        }
    }
}

/// One decoded input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `Input::Tick`.
    Tick,
    /// `Input::Start` (also how a lock that stood down competes again).
    Start,
    /// `Input::TryAcquire`.
    TryAcquire,
    /// `Input::Release`.
    Release,
    /// `Input::Stop`.
    Stop,
    /// `Input::Signal`.
    Signal,
    /// `Input::SessionUp` with a fixed id (0..5).
    SessionUp(u64),
    /// `Input::SessionUp` with the next new id.
    SessionUpNext,
    /// `Input::SessionDown`.
    SessionDown(SessionChoice),
    /// `Input::DbResult`.
    Result(IdChoice, Result<Reply, DbError>),
    /// A notification on the data channel (payload `m<n>`).
    Data(SessionChoice, u8),
    /// A notification on the lock channel.
    Marker(SessionChoice, String),
    /// A notification on an unrelated channel.
    OtherChannel(SessionChoice),
    /// `Input::StandDown`: stop competing, staying set up, until the next `Start`.
    StandDown,
}

fn token_of(b: u8) -> Option<FenceToken> {
    match b % 7 {
        0 => None,
        n => Some(FenceToken(u64::from(n - 1))),
    }
}

fn token_byte(t: Option<FenceToken>) -> u8 {
    t.map_or(0, |t| (t.0 % 6) as u8 + 1)
}

impl Step {
    /// Decodes one step (after its delta byte).
    pub fn decode(r: &mut Reader<'_>) -> Step {
        match r.byte() % 14 {
            0 => Step::Tick,
            1 => Step::Start,
            2 => Step::TryAcquire,
            3 => Step::Release,
            4 => Step::Stop,
            5 => Step::Signal,
            6 => Step::SessionUp(u64::from(r.byte() % 5)),
            7 => Step::SessionUpNext,
            8 => Step::SessionDown(SessionChoice::decode(r.byte())),
            9 => {
                let id = IdChoice::decode(r.byte());
                Step::Result(id, decode_result(r))
            }
            10 => Step::Data(SessionChoice::decode(r.byte()), r.byte()),
            11 => {
                let session = SessionChoice::decode(r.byte());
                let kind = r.byte();
                let token = token_of(r.byte());
                let payload = match kind % 5 {
                    0 => Marker::Draining(token).payload(),
                    1 => Marker::Released(token).payload(),
                    2 => Marker::Acquired(token.unwrap_or(FenceToken(0))).payload(),
                    3 => "1".to_owned(),
                    _ if kind % 10 == 9 => Marker::Drained(token.unwrap_or(FenceToken(0))).payload(),
                    _ => format!("x:{}", token_byte(token)),
                };
                Step::Marker(session, payload)
            }
            12 => Step::OtherChannel(SessionChoice::decode(r.byte())),
            _ => Step::StandDown,
        }
    }

    /// Encodes this step (after its delta byte); `decode(encode(s)) == s` for the steps the
    /// decoder can produce.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Step::Tick => out.push(0),
            Step::Start => out.push(1),
            Step::TryAcquire => out.push(2),
            Step::Release => out.push(3),
            Step::Stop => out.push(4),
            Step::Signal => out.push(5),
            Step::SessionUp(id) => out.extend([6, (id % 5) as u8]),
            Step::SessionUpNext => out.push(7),
            Step::SessionDown(s) => out.extend([8, s.encode()]),
            Step::Result(id, result) => {
                out.extend([9, id.encode()]);
                encode_result(result, out);
            }
            Step::Data(s, n) => out.extend([10, s.encode(), *n]),
            Step::Marker(s, payload) => {
                let (kind, token) = match Marker::parse(payload) {
                    Some(Marker::Draining(t)) => (0, t),
                    Some(Marker::Released(None)) if payload == "1" => (3, None),
                    Some(Marker::Released(t)) => (1, t),
                    Some(Marker::Acquired(t)) => (2, Some(t)),
                    Some(Marker::Drained(t)) => (9, Some(t)),
                    // The decoder never makes these.
                    Some(Marker::Progress(..)) | None => (4, None),
                };
                out.extend([11, s.encode(), kind, token_byte(token)]);
            }
            Step::OtherChannel(s) => out.extend([12, s.encode()]),
            Step::StandDown => out.push(13),
        }
    }
}

fn decode_result(r: &mut Reader<'_>) -> Result<Reply, DbError> {
    let kind = r.byte() % 10;
    let arg = r.byte();
    match kind {
        0 | 8 | 9 => {
            let lease_remaining = match arg >> 4 & 3 {
                0 => None,
                1 => Some(Duration::from_millis(u64::from(r.byte()) * 20)),
                2 => Some(Duration::MAX),
                _ => Some(Duration::ZERO),
            };
            Ok(Reply::Acquire(AcquireReply {
                acquired: kind != 0 || arg & 1 == 1,
                token: token_of(arg >> 1 & 7),
                lease_remaining,
                stale_holder: (arg & 0x40 != 0).then(|| StaleHolder {
                    pid: i32::from(arg & 3),
                    app: format!("app-{}", arg & 3),
                }),
                ..AcquireReply::locked()
            }))
        }
        1 => Ok(Reply::Renew { owned: arg & 1 == 1 }),
        2 => Ok(Reply::Drained),
        3 => Ok(Reply::Release { released: arg & 1 == 1 }),
        4 => Ok(Reply::Terminate(match arg % 3 {
            0 => TerminateOutcome::Terminated,
            1 => TerminateOutcome::Gone,
            _ => TerminateOutcome::NotPermitted,
        })),
        5 => Err(DbError::SessionLost),
        6 => Err(DbError::PermissionDenied("denied".into())),
        _ => Err(DbError::Failed("failed".into())),
    }
}

fn encode_result(result: &Result<Reply, DbError>, out: &mut Vec<u8>) {
    match result {
        Ok(Reply::Acquire(a)) => {
            let (remaining_bits, extra) = match a.lease_remaining {
                None => (0, None),
                Some(d) if d == Duration::MAX => (2, None),
                Some(d) if d.is_zero() => (3, None),
                Some(d) => (1, Some((d.as_millis() / 20).min(255) as u8)),
            };
            let stale = a.stale_holder.as_ref().map_or(0, |s| 0x40 | (s.pid & 3) as u8);
            let arg = u8::from(a.acquired) | token_byte(a.token) << 1 | remaining_bits << 4 | stale;
            out.extend([0, arg]);
            out.extend(extra);
        }
        Ok(Reply::Renew { owned }) => out.extend([1, u8::from(*owned)]),
        Ok(Reply::Drained) => out.extend([2, 0]),
        Ok(Reply::Release { released }) => out.extend([3, u8::from(*released)]),
        Ok(Reply::Terminate(o)) => out.extend([
            4,
            match o {
                TerminateOutcome::Terminated => 0,
                TerminateOutcome::Gone => 1,
                TerminateOutcome::NotPermitted => 2,
            },
        ]),
        Err(DbError::SessionLost) => out.extend([5, 0]),
        Err(DbError::PermissionDenied(_)) => out.extend([6, 0]),
        _ => out.extend([7, 0]),
    }
}

/// Decodes a time step in microseconds (negative: the clock goes back).
pub fn decode_delta(b: u8) -> i64 {
    match b {
        0..=127 => i64::from(b) * 100,
        128..=239 => i64::from(b - 127) * 50_000,
        _ => -i64::from(b - 239) * 100_000,
    }
}

/// The config selected by the header byte.
pub fn decode_config(b: u8) -> LockConfig {
    let protocol = if b & 1 == 1 { Protocol::Classic } else { Protocol::Lease };
    let mut c = LockConfig::new(protocol);
    if b & 2 == 0 {
        c.acquire_interval = Duration::from_secs(3);
        c.lease_ttl = Duration::from_secs(2);
        c.renew_interval = Duration::from_millis(400);
        c.fence_margin = Duration::from_millis(300);
        c.request_timeout = Duration::from_secs(1);
        c.wake_jitter = Duration::from_millis(10);
        c.marker_wait = Duration::from_millis(200);
    }
    match (b >> 2) & 3 {
        1 => {
            c.wake_jitter = Duration::ZERO;
            c.request_timeout = Duration::ZERO;
            c.handover_buffer = 0;
        }
        2 => c.handover_buffer = 2,
        3 => {
            // A lease that is fenced the moment it is won: never usable, never a panic.
            c.fence_margin = c.lease_ttl;
        }
        _ => {}
    }
    if b & 16 != 0 {
        c.drain_in_release = false;
    }
    c
}

/// Decodes the whole input: config byte, seed, steps.
pub fn decode(data: &[u8]) -> (u8, u64, Vec<(i64, Step)>) {
    let mut r = Reader::new(data);
    let config = r.byte();
    let seed = r.u64();
    let mut steps = Vec::new();
    while !r.is_empty() && steps.len() < MAX_STEPS {
        let delta = decode_delta(r.byte());
        steps.push((delta, Step::decode(&mut r)));
    }
    (config, seed, steps)
}

/// Encodes an input; `delta` bytes are raw (see [`decode_delta`]).
pub fn encode(config: u8, seed: u64, steps: &[(u8, Step)]) -> Vec<u8> {
    let mut out = vec![config];
    out.extend(seed.to_le_bytes());
    for (delta, step) in steps {
        out.push(*delta);
        step.encode(&mut out);
    }
    out
}

/// Feeds decoded steps into one lock through [`LockChecker`], which checks every invariant of
/// the state machine after each input (see [`pgiplock_core::check`]); panics on the first one
/// broken.
#[derive(Debug)]
pub struct StepDriver {
    /// The lock under test.
    pub lock: Lock,
    /// The checker watching it.
    pub checker: LockChecker,
    /// The driver's clock (may go back).
    pub now: Timestamp,
    latest_request: Option<RequestId>,
    latest_session: u64,
}

impl StepDriver {
    /// A lock on [`CHANNEL`] with `config` and `seed`.
    pub fn new(config: LockConfig, seed: u64) -> Self {
        let channel = ChannelName::new(CHANNEL).expect("valid channel name");
        StepDriver {
            lock: Lock::new(channel, config, seed),
            checker: LockChecker::new(),
            now: Timestamp::from_millis(5_000),
            latest_request: None,
            latest_session: 0,
        }
    }

    /// Messages delivered so far.
    pub fn delivered(&self) -> u64 {
        self.checker.delivered()
    }

    fn session(&self, choice: SessionChoice) -> SessionId {
        match choice {
            SessionChoice::Latest => SessionId(self.latest_session),
            SessionChoice::Fixed(id) => SessionId(id),
        }
    }

    fn input_of(&mut self, step: &Step) -> Input {
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
            Step::SessionDown(s) => Input::SessionDown(self.session(*s)),
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
            Step::Data(s, n) => Input::Notification {
                session: self.session(*s),
                channel: CHANNEL.to_owned(),
                payload: format!("m{n}"),
                pid: 1,
            },
            // A Classic drain marker travels on the drain channel; other payloads there are strays.
            Step::Marker(s, payload) => Input::Notification {
                session: self.session(*s),
                channel: Marker::parse(payload)
                    .map_or(self.lock.channel().lock_channel(), |m| {
                        m.channel(self.lock.config().protocol, self.lock.channel())
                    })
                    .to_owned(),
                payload: payload.clone(),
                pid: 1,
            },
            Step::OtherChannel(s) => Input::Notification {
                session: self.session(*s),
                channel: "elsewhere".to_owned(),
                payload: "1".to_owned(),
                pid: 1,
            },
        }
    }

    /// Feeds one step `delta_us` after the previous one; panics when an invariant breaks.
    pub fn step(&mut self, delta_us: i64, step: &Step) {
        self.now = Timestamp::from_micros(self.now.as_micros().saturating_add_signed(delta_us));
        let input = self.input_of(step);
        let shown = format!("{input:?}");
        match self.checker.handle_input(&mut self.lock, self.now, input) {
            Ok(outputs) => {
                let latest = outputs.iter().rev().find_map(|o| match o {
                    Output::Request(r) => Some(r.id),
                    _ => None,
                });
                self.latest_request = latest.or(self.latest_request);
            }
            Err(violation) => panic!("{violation} (after {shown} at {:?})", self.now),
        }
    }
}

/// Runs the target on fuzzer bytes; panics when an invariant breaks.
///
/// ```
/// pgiplock_fuzz::lock_events(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 1]);
/// ```
pub fn lock_events(data: &[u8]) {
    let (config, seed, steps) = decode(data);
    let mut driver = StepDriver::new(decode_config(config), seed);
    for (delta, step) in &steps {
        driver.step(*delta, step);
    }
}
