//! The invariants of one [`Lock`], checked from the outside after every input.
//!
//! A [`LockChecker`] watches what a driver feeds one lock and what the lock answers, and reports
//! the first broken rule as a [`Violation`]. It reads only the lock's public surface
//! ([`Lock::state`], [`Lock::poll_timeout`]) and the drained outputs, so the property tests, the
//! fuzz target and the fleet tests hold every lock to the same rules:
//!
//! - the next deadline is `None` or strictly after the latest time seen (time that goes back is
//!   clamped by the lock, so "now" is the latest, not the last);
//! - a `Tick` with nothing due produces nothing, moves no deadline and changes no state;
//! - at most one request leaves per input on the lock's current session, with strictly rising
//!   ids, and only on the session the lock had before or after the input;
//! - a tenure runs from `Acquired` to `Lost` or `Drained` in the output stream (a `Drained` is
//!   followed by exactly one `Released` or `ReleaseFailed` before anything else ends): no `Acquired`
//!   inside one, no end outside one, no `Acquired` after `Stopped`;
//! - `Deliver` only inside a tenure (S3);
//! - `Stopped` once, never while holding; afterwards the phase is `Stopped` and no deadline is
//!   left;
//! - no more `AttemptDone` answers than `TryAcquire` inputs;
//! - once drained, the tenure the events announced agrees with `state().phase.is_holder()`.
//!
//! After a violation the checker's view is unreliable: stop there.
//!
//! ```
//! use pgiplock_core::check::{LockChecker, Violation};
//! use pgiplock_core::*;
//!
//! let mut lock = Lock::new(ChannelName::new("jobs").unwrap(), LockConfig::default(), 1);
//! let mut checker = LockChecker::new();
//! let now = Timestamp::from_millis(1);
//! checker.handle_input(&mut lock, now, Input::SessionUp(SessionId(1))).unwrap();
//! let outputs = checker.handle_input(&mut lock, now, Input::Start).unwrap();
//! let Some(Output::Request(req)) = outputs.first() else { panic!("{outputs:?}") };
//! let won = AcquireReply { acquired: true, token: Some(FenceToken(1)), lease_remaining: None, stale_holder: None, ..AcquireReply::locked() };
//! let reply = Input::DbResult { id: req.id, result: Ok(Reply::Acquire(won)) };
//! checker.handle_input(&mut lock, now, reply).unwrap();
//! assert!(checker.holds());
//!
//! // A driver that fabricates outputs (or a lock with a bug) is caught:
//! let seen = checker.observe_input(&lock, now, &Input::Start);
//! let forged = [Output::Event(LockEvent::Acquired { token: Some(FenceToken(2)) })];
//! assert_eq!(checker.check_outputs(seen, &lock, &forged), Err(Violation::AcquiredTwice));
//! ```

use crate::event::{Input, LockEvent, Output};
use crate::lock::{Lock, LockState, Phase, TimerKind};
use crate::proto::{RequestId, SessionId};
use crate::time::Timestamp;

/// The first invariant of one lock found broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The next deadline is not after the latest time seen (a busy loop).
    #[error("deadline {at:?} ({kind:?}) not after {now:?}")]
    DeadlineNotAfterNow {
        /// The deadline.
        at: Timestamp,
        /// Its timer.
        kind: TimerKind,
        /// The latest time seen.
        now: Timestamp,
    },
    /// A `Tick` with nothing due produced outputs.
    #[error("idle tick produced {outputs:?}")]
    IdleTickOutput {
        /// What it produced.
        outputs: Vec<Output>,
    },
    /// A `Tick` with nothing due moved the next deadline.
    #[error("idle tick moved the deadline from {before:?} to {after:?}")]
    IdleTickMovedDeadline {
        /// The deadline before.
        before: Option<(Timestamp, TimerKind)>,
        /// The deadline after.
        after: Option<(Timestamp, TimerKind)>,
    },
    /// A `Tick` with nothing due changed the lock's state.
    #[error("idle tick changed the state from {before:?} to {after:?}")]
    IdleTickChangedState {
        /// The state before.
        before: Box<LockState>,
        /// The state after.
        after: Box<LockState>,
    },
    /// More than one request left on the current session in one input.
    #[error("{count} requests at once on the current session")]
    SeveralRequests {
        /// How many.
        count: usize,
    },
    /// A request id did not rise above the previous one.
    #[error("request id {id:?} not above the previous {previous:?}")]
    RequestIdNotRising {
        /// The new id.
        id: RequestId,
        /// The previous id.
        previous: RequestId,
    },
    /// A request on a session the lock neither had nor has.
    #[error("request on session {session:?}, the lock's were {before:?} and {after:?}")]
    RequestOnForeignSession {
        /// The request's session.
        session: SessionId,
        /// The lock's session before the input.
        before: Option<SessionId>,
        /// The lock's session after it.
        after: Option<SessionId>,
    },
    /// S3: a message delivered outside a tenure.
    #[error("S3: delivered {payload:?} outside a tenure")]
    DeliveredOutsideTenure {
        /// The payload.
        payload: String,
    },
    /// `Acquired` inside a tenure.
    #[error("Acquired twice without Lost or Drained between")]
    AcquiredTwice,
    /// `Acquired` after `Stopped`.
    #[error("Acquired after Stopped")]
    AcquiredAfterStopped,
    /// `Lost` or `Drained` outside a tenure.
    #[error("{event:?} without a tenure")]
    EndWithoutTenure {
        /// The event.
        event: LockEvent,
    },
    /// `Released` or `ReleaseFailed` without a `Drained` before it (or twice for one).
    #[error("{event:?} without a drained tenure before it")]
    ReleaseOutcomeWithoutDrain {
        /// The event.
        event: LockEvent,
    },
    /// `Stopped` inside a tenure.
    #[error("Stopped while holding")]
    StoppedWhileHolding,
    /// `Stopped` after `Drained` with no `Released` or `ReleaseFailed` between.
    #[error("Stopped before the release outcome of a drained tenure")]
    StoppedBeforeReleaseOutcome,
    /// `Stopped` a second time.
    #[error("Stopped twice")]
    StoppedTwice,
    /// More `AttemptDone` answers than `TryAcquire` inputs.
    #[error("{answers} attempt answers for {tries} TryAcquire inputs")]
    MoreAnswersThanAttempts {
        /// `AttemptDone` outputs seen.
        answers: u64,
        /// `TryAcquire` inputs seen.
        tries: u64,
    },
    /// The tenure announced by the events disagrees with the phase.
    #[error("events say holding = {tenure}, phase is {phase:?}")]
    TenureDisagreesWithPhase {
        /// Holding according to the events.
        tenure: bool,
        /// The phase.
        phase: Phase,
    },
    /// After `Stopped`, the phase is not `Stopped`.
    #[error("stopped, yet in phase {phase:?}")]
    NotStoppedAfterStopped {
        /// The phase.
        phase: Phase,
    },
    /// After `Stopped`, a deadline is left.
    #[error("stopped, yet a deadline {at:?} ({kind:?}) is left")]
    DeadlineAfterStopped {
        /// The deadline.
        at: Timestamp,
        /// Its timer.
        kind: TimerKind,
    },
}

/// What [`LockChecker::observe_input`] saw just before an input; hand it to
/// [`LockChecker::check_outputs`].
#[derive(Debug, Clone)]
#[must_use = "pass it to check_outputs once the outputs are drained"]
pub struct InputSeen {
    timeout: Option<(Timestamp, TimerKind)>,
    state: LockState,
    idle_tick: bool,
}

/// Checks the invariants of one lock across its inputs; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct LockChecker {
    clock: Timestamp,
    tenure: bool,
    /// A tenure ended with `Drained`: its release outcome is due.
    drained: bool,
    stopped: bool,
    latest_request: Option<RequestId>,
    tries: u64,
    answers: u64,
    delivered: u64,
}

impl LockChecker {
    /// A checker for a lock that has had no input yet.
    pub fn new() -> Self {
        LockChecker::default()
    }

    /// Feeds `input` to `lock` at `now`, drains its outputs and checks them.
    pub fn handle_input(&mut self, lock: &mut Lock, now: Timestamp, input: Input) -> Result<Vec<Output>, Violation> {
        let seen = self.observe_input(lock, now, &input);
        lock.handle_input(now, input);
        let mut outputs = Vec::new();
        while let Some(output) = lock.poll_output() {
            outputs.push(output);
        }
        self.check_outputs(seen, lock, &outputs)?;
        Ok(outputs)
    }

    /// Records the lock's view just before `input` is fed at `now`.
    pub fn observe_input(&mut self, lock: &Lock, now: Timestamp, input: &Input) -> InputSeen {
        self.clock = self.clock.max(now);
        if *input == Input::TryAcquire {
            self.tries += 1;
        }
        let timeout = lock.poll_timeout();
        InputSeen {
            idle_tick: *input == Input::Tick && timeout.map_or(true, |(at, _)| at > self.clock),
            timeout,
            state: lock.state(),
        }
    }

    /// Checks every output of the input recorded in `seen`, drained to `None`, and the lock after.
    pub fn check_outputs(&mut self, seen: InputSeen, lock: &Lock, outputs: &[Output]) -> Result<(), Violation> {
        let after = lock.state();
        let timeout = lock.poll_timeout();
        if let Some((at, kind)) = timeout {
            if at <= self.clock {
                return Err(Violation::DeadlineNotAfterNow {
                    at,
                    kind,
                    now: self.clock,
                });
            }
        }
        if seen.idle_tick {
            if !outputs.is_empty() {
                return Err(Violation::IdleTickOutput {
                    outputs: outputs.to_vec(),
                });
            }
            if timeout != seen.timeout {
                return Err(Violation::IdleTickMovedDeadline {
                    before: seen.timeout,
                    after: timeout,
                });
            }
            if after != seen.state {
                return Err(Violation::IdleTickChangedState {
                    before: Box::new(seen.state),
                    after: Box::new(after),
                });
            }
        }
        // One request at a time per session: a request on a session replaced within the same
        // input is abandoned, its reply will be ignored.
        let count = outputs
            .iter()
            .filter(|o| matches!(o, Output::Request(r) if Some(r.session) == after.session))
            .count();
        if count > 1 {
            return Err(Violation::SeveralRequests { count });
        }
        for output in outputs {
            self.output(output, &seen.state, &after)?;
        }
        if self.answers > self.tries {
            return Err(Violation::MoreAnswersThanAttempts {
                answers: self.answers,
                tries: self.tries,
            });
        }
        if self.tenure != after.phase.is_holder() {
            return Err(Violation::TenureDisagreesWithPhase {
                tenure: self.tenure,
                phase: after.phase,
            });
        }
        if self.stopped {
            if after.phase != Phase::Stopped {
                return Err(Violation::NotStoppedAfterStopped { phase: after.phase });
            }
            if let Some((at, kind)) = timeout {
                return Err(Violation::DeadlineAfterStopped { at, kind });
            }
        }
        Ok(())
    }

    fn output(&mut self, output: &Output, before: &LockState, after: &LockState) -> Result<(), Violation> {
        match output {
            Output::Request(req) => {
                if let Some(previous) = self.latest_request.filter(|p| *p >= req.id) {
                    return Err(Violation::RequestIdNotRising { id: req.id, previous });
                }
                if Some(req.session) != after.session && Some(req.session) != before.session {
                    return Err(Violation::RequestOnForeignSession {
                        session: req.session,
                        before: before.session,
                        after: after.session,
                    });
                }
                self.latest_request = Some(req.id);
            }
            Output::Deliver { payload, .. } => {
                if !self.tenure {
                    return Err(Violation::DeliveredOutsideTenure {
                        payload: payload.clone(),
                    });
                }
                self.delivered += 1;
            }
            Output::Event(LockEvent::Acquired { .. }) => {
                if self.tenure {
                    return Err(Violation::AcquiredTwice);
                }
                if self.stopped {
                    return Err(Violation::AcquiredAfterStopped);
                }
                self.tenure = true;
            }
            Output::Event(event @ (LockEvent::Lost { .. } | LockEvent::Drained)) => {
                if !self.tenure {
                    return Err(Violation::EndWithoutTenure { event: event.clone() });
                }
                self.tenure = false;
                self.drained = *event == LockEvent::Drained;
            }
            Output::Event(event @ (LockEvent::Released | LockEvent::ReleaseFailed { .. })) => {
                let after_drain = std::mem::take(&mut self.drained);
                if !after_drain {
                    return Err(Violation::ReleaseOutcomeWithoutDrain { event: event.clone() });
                }
            }
            Output::Event(LockEvent::Stopped { .. }) => {
                if self.tenure {
                    return Err(Violation::StoppedWhileHolding);
                }
                if self.drained {
                    return Err(Violation::StoppedBeforeReleaseOutcome);
                }
                if self.stopped {
                    return Err(Violation::StoppedTwice);
                }
                self.stopped = true;
            }
            Output::AttemptDone { .. } => self.answers += 1,
            _ => {}
        }
        Ok(())
    }

    /// Whether the lock holds according to its events (from `Acquired` to `Lost`/`Drained`).
    pub fn holds(&self) -> bool {
        self.tenure
    }

    /// Whether the lock reported `Stopped`.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Messages the lock delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The latest time seen; the lock acts at this time even when an input's is earlier.
    pub fn now(&self) -> Timestamp {
        self.clock
    }
}
