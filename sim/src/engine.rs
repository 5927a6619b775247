//! The discrete-event engine: the events, the queue that orders them by `(at, seq)`, and the run
//! loop that feeds each event to its module, then runs the checkers.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use pgiplock_core::{OpId, SessionId, SessionRequest, Timestamp};

use crate::indexed_heap::IndexedHeap;
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
    /// Replication: the primary crashes and the address moves to the replica (failover `index`).
    Failover {
        index: usize,
    },
    /// Replication: the replica of failover `index` is promoted.
    Promote {
        index: usize,
    },
    /// Replication: the old primary that failover `index` left up is stopped.
    OldPrimaryDown {
        index: usize,
    },
    Publish,
    PublishCommit {
        id: u64,
    },
    /// A process has handled the terminate signal (after `client_signal_cost`): it releases.
    Signal {
        p: usize,
        inc: u32,
    },
    /// A crash watch's wait on the server connection `session` looks at the holder's rows
    /// again (the holder's earliest expiry, or the wait's end).
    AwaitWake {
        session: SessionId,
        id: OpId,
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
            Event::Failover { .. } => 19,
            Event::Promote { .. } => 20,
            Event::OldPrimaryDown { .. } => 21,
            Event::Signal { .. } => 22,
            Event::AwaitWake { .. } => 23,
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

/// What the run loop takes next.
enum Due {
    Event(Scheduled),
    Timer { at: Timestamp, p: usize, inc: u32 },
}

impl Due {
    fn at(&self) -> Timestamp {
        match self {
            Due::Event(s) => s.at,
            Due::Timer { at, .. } => *at,
        }
    }
}

/// The event queue, the session timers and virtual time. Events and timers at the same time
/// run in the order they were scheduled (a global sequence number breaks ties).
pub(crate) struct Engine {
    queue: BinaryHeap<Reverse<Scheduled>>,
    /// Events due exactly `lane_delay` after the instant they were scheduled at (the network's
    /// one-way delay: most messages) arrive in `(at, seq)` order, since time never goes back:
    /// they wait in this first-in first-out lane instead of the heap, and the run loop takes
    /// the earlier of the two heads. The order of the events is the same as with the heap alone.
    lane: VecDeque<Scheduled>,
    lane_delay: Option<Duration>,
    slab: Vec<Option<Event>>,
    free_slots: Vec<u32>,
    /// Each process's session timer, kept apart from the event queue so that re-arming it
    /// moves the one entry instead of leaving a stale event behind: an idle standby between
    /// retries costs its next deadline and nothing else. Keyed by `(at, seq)`.
    timers: IndexedHeap<(Timestamp, u64)>,
    /// The incarnation each armed timer belongs to, by process.
    timer_inc: Vec<u32>,
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
            lane: VecDeque::new(),
            lane_delay: None,
            slab: Vec::new(),
            free_slots: Vec::new(),
            timers: IndexedHeap::default(),
            timer_inc: Vec::new(),
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
        let entry = Scheduled {
            at,
            seq: self.seq,
            slot,
        };
        // The lane stays sorted: an event joins it only at or after its last one's time (its
        // sequence number is the largest yet).
        let in_lane =
            self.lane_delay.is_some_and(|d| at == self.now + d) && self.lane.back().map_or(true, |last| last.at <= at);
        if in_lane {
            self.lane.push_back(entry);
        } else {
            self.queue.push(Reverse(entry));
        }
    }

    /// Events scheduled `delay` after the current instant take the lane instead of the heap
    /// (see [`Engine::lane`]); `None`, the default, sends every event to the heap.
    pub(crate) fn set_lane_delay(&mut self, delay: Option<Duration>) {
        self.lane_delay = delay;
    }

    /// Arms process `p`'s session timer (incarnation `inc`) for `at`, replacing the one armed
    /// before; `None` disarms it.
    pub(crate) fn arm(&mut self, p: usize, inc: u32, at: Option<Timestamp>) {
        match at {
            Some(at) => {
                self.seq += 1;
                self.timers.set(p, (at, self.seq));
                if self.timer_inc.len() <= p {
                    self.timer_inc.resize(p + 1, 0);
                }
                self.timer_inc[p] = inc;
            }
            None => {
                self.timers.remove(p);
            }
        }
    }

    /// The earliest event or timer, unless there is none or it lies after `end` (it then stays
    /// queued).
    fn pop_due(&mut self, end: Timestamp) -> Option<Due> {
        let heap = self.queue.peek().map(|Reverse(s)| (s.at, s.seq));
        let lane = self.lane.front().map(|s| (s.at, s.seq));
        let event = match (heap, lane) {
            (Some(h), Some(l)) => Some(h.min(l)),
            (h, l) => h.or(l),
        };
        let timer = self.timers.peek().map(|(key, _)| key);
        let take_timer = match (event, timer) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(e), Some(t)) => t < e,
        };
        if take_timer {
            let ((at, _), p) = self.timers.peek()?;
            if at > end {
                return None;
            }
            self.timers.remove(p);
            let inc = self.timer_inc.get(p).copied().unwrap_or(0);
            return Some(Due::Timer { at, p, inc });
        }
        let (at, _) = event?;
        if at > end {
            return None;
        }
        if event == lane {
            self.lane.pop_front().map(Due::Event)
        } else {
            self.queue.pop().map(|Reverse(next)| Due::Event(next))
        }
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
            let at = next.at();
            self.metrics.advance(
                self.engine.now,
                at,
                self.checkers.available,
                self.checkers.believers[0].len(),
                self.checkers.s2_gap,
            );
            self.engine.now = at;
            let event = match next {
                Due::Timer { p, inc, .. } => Event::SessionTimer { p, inc },
                Due::Event(next) => match self.engine.take(next.slot) {
                    Some(event) => event,
                    None => continue,
                },
            };
            self.trace.hash(&[at.as_micros(), event.tag()]);
            self.trace.line(|| format!("{at:?} {event:?}"));
            self.handle(event);
            self.replicate();
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
        let mut report = self
            .metrics
            .report(&self.scenario, self.seed, self.engine.steps, unresolved, hash);
        report.replication = self.failover_reports();
        Ok(report)
    }

    /// Hands an event to the module it belongs to (to the old primary's connections when a
    /// partition left one up).
    fn handle(&mut self, event: Event) {
        if self.replica.is_some() && self.on_old_primary(&event) {
            return self.handle_on_old_primary(event);
        }
        self.handle_event(event)
    }

    pub(crate) fn handle_event(&mut self, event: Event) {
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
            Event::Failover { index } => self.failover(index),
            Event::Promote { index } => self.promote(index),
            Event::OldPrimaryDown { index } => self.old_primary_down(index),
            Event::Publish => self.publish(),
            Event::PublishCommit { id } => self.publish_commit(id),
            Event::Signal { p, inc } => {
                if self.procs[p].runs(inc) {
                    self.stop_process(p);
                }
            }
            Event::AwaitWake { session, id } => self.await_wake(session, id),
        }
        if self.server.db.has_ended() {
            self.waits_gone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgiplock_core::SplitMix64;
    use std::collections::BTreeMap;

    /// The lane changes nothing about the order: two engines fed the same schedule, one with
    /// the lane for the delay most events use, pop the same events at the same times.
    #[test]
    fn the_lane_keeps_the_order_of_the_heap() {
        let delay = std::time::Duration::from_micros(250);
        let mut rng = SplitMix64::new(9);
        let mut plain = Engine::new();
        let mut laned = Engine::new();
        laned.set_lane_delay(Some(delay));
        let (mut popped, mut in_lane) = (0, 0);
        for step in 0..50_000u64 {
            assert_eq!(plain.now, laned.now);
            let now = plain.now;
            match rng.below_inclusive(9) {
                0..=5 => {
                    // Mostly the lane's delay, sometimes at once, later or much later.
                    let after = match rng.below_inclusive(5) {
                        0..=2 => delay,
                        3 => std::time::Duration::ZERO,
                        _ => std::time::Duration::from_micros(rng.below_inclusive(2_000)),
                    };
                    let id = step;
                    plain.schedule(now + after, Event::PublishCommit { id });
                    laned.schedule(now + after, Event::PublishCommit { id });
                }
                _ => {
                    let end = Timestamp::from_micros(u64::MAX);
                    in_lane += usize::from(laned.lane.front().is_some());
                    let (a, b) = (plain.pop_due(end), laned.pop_due(end));
                    let (Some(Due::Event(a)), Some(Due::Event(b))) = (a, b) else {
                        assert!(plain.queue.is_empty() && laned.queue.is_empty() && laned.lane.is_empty());
                        continue;
                    };
                    assert_eq!((a.at, a.seq), (b.at, b.seq), "step {step}");
                    assert!(a.at >= now, "step {step}: time went back");
                    plain.now = a.at;
                    laned.now = b.at;
                    let (ea, eb) = (plain.take(a.slot), laned.take(b.slot));
                    assert_eq!(format!("{ea:?}"), format!("{eb:?}"), "step {step}");
                    popped += 1;
                }
            }
        }
        assert!(popped > 5_000, "the test popped too few events: {popped}");
        assert!(in_lane > 1_000, "the lane was rarely used: {in_lane}");
    }

    /// Arming, re-arming and disarming at random, the timers pop in the order of a plain map
    /// of each process's one timer, interleaved with queued events by `(at, seq)`.
    #[test]
    fn timers_pop_in_order_and_only_the_one_armed() {
        let mut rng = SplitMix64::new(5);
        let mut engine = Engine::new();
        let mut armed: BTreeMap<usize, (Timestamp, u64)> = BTreeMap::new();
        let mut popped = Vec::new();
        for step in 0..20_000u64 {
            let now = engine.now;
            match rng.below_inclusive(9) {
                0..=5 => {
                    let p = rng.below_inclusive(40) as usize;
                    let at = now + std::time::Duration::from_micros(rng.below_inclusive(1_000));
                    engine.arm(p, 1, Some(at));
                    armed.insert(p, (at, engine.seq));
                }
                6 => {
                    let p = rng.below_inclusive(40) as usize;
                    engine.arm(p, 1, None);
                    armed.remove(&p);
                }
                7 => {
                    let at = now + std::time::Duration::from_micros(rng.below_inclusive(1_000));
                    engine.schedule(at, Event::Publish);
                }
                _ => {
                    let Some(due) = engine.pop_due(Timestamp::from_micros(u64::MAX)) else {
                        continue;
                    };
                    assert!(due.at() >= now, "step {step}: time went back");
                    engine.now = due.at();
                    if let Due::Timer { at, p, .. } = due {
                        let expected = armed.values().min().copied();
                        assert_eq!(armed.remove(&p).map(|(a, _)| a), Some(at), "step {step}");
                        assert_eq!(expected.map(|(a, _)| a), Some(at), "step {step}: not the earliest");
                        popped.push(p);
                    }
                }
            }
        }
        assert!(popped.len() > 1_000, "the test drew too few timers: {}", popped.len());
    }
}
