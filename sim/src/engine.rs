//! The discrete-event engine: the events, the queue that orders them by `(at, seq)`, and the run
//! loop that feeds each event to its module, then runs the checkers.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use pgiplock_core::{SessionId, SessionRequest, Timestamp};

use crate::metrics::Report;
use crate::net::{ClientMsg, ServerMsg};
use crate::world::{SimError, World};

/// Everything that can happen at a point of virtual time. The trace prints these with `Debug`.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    ProcStart {
        p: usize,
    },
    /// The deadline the process's session asked for (`poll_timeout`).
    SessionTimer {
        p: usize,
        inc: u32,
    },
    ToServer {
        p: usize,
        epoch: u64,
        sent_at: Timestamp,
        session: SessionId,
        msg: ClientMsg,
    },
    ServerCommit {
        p: usize,
        session: SessionId,
        request: SessionRequest,
    },
    ToClient {
        p: usize,
        inc: u32,
        epoch: u64,
        sent_at: Timestamp,
        session: SessionId,
        msg: ServerMsg,
    },
    ServerClose {
        session: SessionId,
    },
    ServerDeadPeer {
        session: SessionId,
        epoch: u64,
    },
    ClientUserTimeout {
        p: usize,
        inc: u32,
        session: SessionId,
    },
    Fault {
        index: usize,
    },
    Heal {
        p: usize,
        epoch: u64,
    },
    ServerUp,
    /// A connect blip: the link drops everything for `blip_duration`.
    Blip {
        p: usize,
    },
    /// The read-only window ends.
    ReadOnlyEnd,
    /// The scenario's action `index`.
    Action {
        index: usize,
    },
    Publish,
    PublishCommit {
        id: u64,
    },
}

impl Event {
    /// The number the trace hash folds in for this kind of event.
    pub(crate) fn tag(&self) -> u64 {
        match self {
            Event::ProcStart { .. } => 1,
            Event::SessionTimer { .. } => 2,
            Event::ToServer { .. } => 5,
            Event::ServerCommit { .. } => 6,
            Event::ToClient { .. } => 7,
            Event::ServerClose { .. } => 8,
            Event::ServerDeadPeer { .. } => 9,
            Event::ClientUserTimeout { .. } => 10,
            Event::Fault { .. } => 11,
            Event::Heal { .. } => 12,
            Event::ServerUp => 13,
            Event::Publish => 14,
            Event::PublishCommit { .. } => 15,
            Event::Blip { .. } => 16,
            Event::ReadOnlyEnd => 17,
            Event::Action { .. } => 18,
        }
    }
}

/// The heap moves 24-byte entries; the events wait in a slab whose slots are reused (compact
/// and allocation-free).
pub(crate) struct Scheduled {
    pub(crate) at: Timestamp,
    seq: u64,
    pub(crate) slot: u32,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The event queue and virtual time. Events at the same time run in the order they were
/// scheduled (a global sequence number breaks ties).
pub(crate) struct Engine {
    queue: BinaryHeap<Reverse<Scheduled>>,
    slab: Vec<Option<Event>>,
    free_slots: Vec<u32>,
    seq: u64,
    /// Events run so far.
    pub(crate) steps: u64,
    /// The current virtual (global) time.
    pub(crate) now: Timestamp,
}

impl Engine {
    pub(crate) fn new() -> Engine {
        Engine {
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free_slots: Vec::new(),
            seq: 0,
            steps: 0,
            now: Timestamp::ZERO,
        }
    }

    pub(crate) fn schedule(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slab[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slab.push(Some(event));
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            slot,
        }));
    }

    /// The earliest entry, unless the queue is empty or that entry lies after `end` (it then
    /// stays queued).
    fn pop_due(&mut self, end: Timestamp) -> Option<Scheduled> {
        if self.queue.peek()?.0.at > end {
            return None;
        }
        self.queue.pop().map(|Reverse(next)| next)
    }

    /// The event waiting in `slot`.
    fn peek(&self, slot: u32) -> Option<&Event> {
        self.slab.get(slot as usize).and_then(Option::as_ref)
    }

    /// Takes the event out of `slot` and frees the slot.
    fn take(&mut self, slot: u32) -> Option<Event> {
        let event = self.slab.get_mut(slot as usize).and_then(Option::take)?;
        self.free_slots.push(slot);
        Some(event)
    }
}

impl World {
    /// The run loop: one event at a time, then every checker, up to `until` (at most the end);
    /// events after it stay queued for the next call. A failure is kept: the world does not run
    /// on after it.
    pub(crate) fn run_to(&mut self, until: Timestamp) -> Result<(), SimError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        let result = self.run_events(until.min(self.end));
        if let Err(failure) = &result {
            self.failure = Some(failure.clone());
        }
        result
    }

    fn run_events(&mut self, until: Timestamp) -> Result<(), SimError> {
        while let Some(next) = self.engine.pop_due(until) {
            self.engine.steps += 1;
            if self.engine.steps > self.scenario.max_steps {
                return Err(self
                    .fail("steps", format!("more than {} events", self.scenario.max_steps))
                    .into());
            }
            self.metrics.advance(
                self.engine.now,
                next.at,
                self.checkers.available,
                self.checkers.believers[0].len(),
                self.checkers.s2_gap,
            );
            self.engine.now = next.at;
            let tag = self.engine.peek(next.slot).map_or(0, Event::tag);
            self.trace.hash(&[next.at.as_micros(), tag]);
            if let Some(event) = self.engine.peek(next.slot) {
                self.trace.line(|| format!("{:?} {:?}", next.at, event));
            }
            let Some(event) = self.engine.take(next.slot) else {
                continue;
            };
            self.handle(event);
            self.check()?;
        }
        Ok(())
    }

    /// Runs to the end of the scenario; the report.
    pub(crate) fn run_inner(&mut self) -> Result<Report, SimError> {
        self.run_to(self.end)?;
        self.metrics.advance(
            self.engine.now,
            self.end,
            self.checkers.available,
            self.checkers.believers[0].len(),
            self.checkers.s2_gap,
        );
        self.engine.now = self.end;
        let unresolved = self.faults.pending.len();
        let hash = self.trace.digest();
        Ok(self
            .metrics
            .report(&self.scenario, self.seed, self.engine.steps, unresolved, hash))
    }

    /// Hands an event to the module it belongs to.
    fn handle(&mut self, event: Event) {
        match event {
            Event::ProcStart { p } => self.start_process(p),
            Event::SessionTimer { p, inc } => self.session_timer(p, inc),
            Event::ToServer {
                p,
                epoch,
                sent_at,
                session,
                msg,
            } => self.server_recv(p, epoch, sent_at, session, msg),
            Event::ServerCommit { p, session, request } => self.commit(p, session, request),
            Event::ToClient {
                p,
                inc,
                epoch,
                sent_at,
                session,
                msg,
            } => self.client_recv(p, inc, epoch, sent_at, session, msg),
            Event::ServerClose { session } => self.server_close(session),
            Event::ServerDeadPeer { session, epoch } => self.server_dead_peer(session, epoch),
            Event::ClientUserTimeout { p, inc, session } => self.client_user_timeout(p, inc, session),
            Event::Fault { index } => self.fault(index),
            Event::Heal { p, epoch } => self.heal(p, epoch),
            Event::ServerUp => self.server_up(),
            Event::Blip { p } => self.blip(p),
            Event::ReadOnlyEnd => self.read_only_end(),
            Event::Action { index } => self.action(index),
            Event::Publish => self.publish(),
            Event::PublishCommit { id } => self.publish_commit(id),
        }
    }
}
