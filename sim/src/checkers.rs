//! The checkers, run after every event: S1 (one owner row per channel), S2 (at most one
//! believer per channel, for Lease with drift within bound), S3 (no delivery while not holding),
//! S4 (fence tokens only rise, within one generation of the lock schema), D1 (Lease: no message
//! delivered twice without the replay flag), D2 (no replay after a graceful handover, none
//! under Classic), phase bounds (no
//! session waits in a phase past its deadline), deadlines (after a tick the session's next
//! deadline lies after it: no busy loop), liveness (after a disturbance, someone serves
//! within a bound) and the step limit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use pgiplock_core::{ConnPhase, PreviousTerm, Protocol, SessionId, Timestamp};

use crate::indexed_heap::IndexedHeap;
use crate::metrics::Metrics;
use crate::scenario::Scenario;
use crate::world::World;

/// A checker found a broken invariant or bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checker {checker} failed at {at}: {message}")]
pub struct CheckFailure {
    /// Which checker (`S1`, `S2`, `S3`, `S4`, `D1`, `D2`, `phase-bound`, `deadline`, `liveness`, `steps`).
    pub checker: &'static str,
    /// Virtual time of the failure.
    pub at: Timestamp,
    /// What was seen.
    pub message: String,
}

/// A wait of a session that has a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Wait {
    /// A connection attempt (bounded by `connect_timeout`).
    Connecting,
    /// A setup statement in flight (bounded by `setup_timeout`).
    Setup,
    /// Down, waiting to reconnect (bounded by `backoff_max`).
    Down,
    /// Lock `li`'s request in flight (bounded by its `request_timeout`).
    Request(usize),
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::Connecting => f.write_str("connecting"),
            Wait::Setup => f.write_str("a setup statement in flight"),
            Wait::Down => f.write_str("down, waiting to reconnect,"),
            Wait::Request(li) => write!(f, "lock {li}'s request in flight"),
        }
    }
}

/// The earliest deadline of one process's waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PhaseBound {
    /// The first global time at which the process's clock passes the deadline.
    at: Timestamp,
    wait: Wait,
    /// Local time the wait began, and its bound.
    since: Timestamp,
    bound: Duration,
}

/// What the checkers track between events.
pub(crate) struct Checkers {
    /// Per channel: processes whose lock believes it holds.
    pub(crate) believers: Vec<BTreeSet<usize>>,
    /// Per channel: the schema generation and the highest fence token acquired in it so far.
    max_token: Vec<(u64, u64)>,
    /// Per channel: the schema generation and the lease row's token at the last commit.
    lease_token: Vec<(u64, u64)>,
    /// Per process: its earliest phase bound; and all of them, ordered.
    phase_bound: Vec<Option<PhaseBound>>,
    /// Each process's earliest phase bound, keyed `(at, p)`.
    phase_bounds: IndexedHeap<(Timestamp, usize)>,
    /// The last fault or heal: the liveness bound counts from here.
    pub(crate) last_disturbance: Timestamp,
    last_available: Timestamp,
    /// Someone serves the data channel (as of the last check).
    pub(crate) available: bool,
    check_s2: bool,
    /// A commit or a new session happened since the last S1 check.
    pub(crate) rows_touched: bool,
    /// The event being handled runs on an old primary a partition left up: S4 follows the
    /// server the address leads to (the old side's tokens are of the older timeline, below).
    pub(crate) on_old_primary: bool,
    /// Channel 0 has two believers only because one's session ended without it knowing.
    pub(crate) s2_gap: bool,
    liveness_bound: Duration,
    /// Terms (channel, schema generation, token) whose acquisition found the previous term
    /// released, with the time its drain marker committed: a winner listening since before
    /// then must replay nothing (D2).
    pub(crate) after_release: BTreeMap<(usize, u64, u64), Timestamp>,
    /// When each term's drain marker committed (channel, schema generation, token); for a
    /// release that is its own drain point, when the release committed, entered once its
    /// holder's `drained` marker committed.
    pub(crate) drained_at: BTreeMap<(usize, u64, u64), Timestamp>,
    /// When each term's release committed, for its `drained` marker to prove.
    pub(crate) released_at: BTreeMap<(usize, u64, u64), Timestamp>,
    /// Released terms whose successor won before the holder's `drained` marker committed:
    /// the successor's token.
    pub(crate) awaiting_drained: BTreeMap<(usize, u64, u64), u64>,
    /// D1 applies: Lease with drift within the fence margin's bound (two believers cannot
    /// both receive), so no message is delivered twice without the replay flag.
    pub(crate) check_d1: bool,
    /// A process whose session, after a tick at local time `.1`, still asked for a deadline at
    /// `.2`, not after it.
    pub(crate) stuck_deadline: Option<(usize, Timestamp, Timestamp)>,
}

impl Checkers {
    /// D2: term `token` of channel `li` began after `previous` (released or not).
    pub(crate) fn term_followed(&mut self, li: usize, generation: u64, previous: PreviousTerm, token: u64) {
        if !previous.released {
            return;
        }
        let key = (li, generation, previous.token.0);
        match self.drained_at.get(&key) {
            Some(&at) => {
                self.after_release.insert((li, generation, token), at);
            }
            None if self.released_at.contains_key(&key) => {
                self.awaiting_drained.insert(key, token);
            }
            None => {}
        }
    }

    /// D2: the holder of term `token` said it delivered up to its release.
    pub(crate) fn release_drained(&mut self, li: usize, generation: u64, token: u64) {
        let key = (li, generation, token);
        let Some(&at) = self.released_at.get(&key) else { return };
        self.drained_at.insert(key, at);
        if let Some(next) = self.awaiting_drained.remove(&key) {
            self.after_release.insert((li, generation, next), at);
        }
    }

    pub(crate) fn new(scenario: &Scenario) -> Checkers {
        Checkers {
            believers: vec![BTreeSet::new(); scenario.channels],
            max_token: vec![(0, 0); scenario.channels],
            lease_token: vec![(0, 0); scenario.channels],
            phase_bound: vec![None; scenario.processes],
            phase_bounds: IndexedHeap::default(),
            last_disturbance: Timestamp::ZERO,
            last_available: Timestamp::ZERO,
            available: false,
            // The property checks hold the declared drift to S2 whatever the fence margin covers.
            check_s2: scenario.protocol == Protocol::Lease
                && (scenario.drift < scenario.drift_bound() || scenario.property_checks),
            after_release: BTreeMap::new(),
            drained_at: BTreeMap::new(),
            released_at: BTreeMap::new(),
            awaiting_drained: BTreeMap::new(),
            check_d1: scenario.protocol == Protocol::Lease
                && (scenario.drift < scenario.drift_bound() || scenario.property_checks),
            rows_touched: false,
            on_old_primary: false,
            s2_gap: false,
            liveness_bound: scenario.liveness_bound(),
            stuck_deadline: None,
        }
    }

    /// Process `p`'s lock on channel `li` believes it holds, or not.
    pub(crate) fn set_believer(&mut self, li: usize, p: usize, holds: bool) {
        if holds {
            self.believers[li].insert(p);
        } else {
            self.believers[li].remove(&p);
        }
    }

    /// Process `p` is gone: none of its locks believes anything, none of its waits counts.
    pub(crate) fn forget(&mut self, p: usize) {
        for set in &mut self.believers {
            set.remove(&p);
        }
        self.set_phase_bound(p, None);
    }

    /// S4: process `p` acquired channel `li` with fence token `t`, committed in schema
    /// generation `generation`. Tokens of different generations are not compared: a dropped
    /// schema takes the token sequence with it (as PostgreSQL does after `DROP SCHEMA`), which
    /// is S4's one stated exemption.
    pub(crate) fn token_acquired(&mut self, metrics: &mut Metrics, p: usize, li: usize, t: u64, generation: u64) {
        if self.on_old_primary {
            return; // the other side of a partition: its own, older, token sequence
        }
        let (max_generation, max) = self.max_token[li];
        if generation < max_generation {
            return; // a term of a dropped schema, reported late
        }
        if generation == max_generation && t <= max {
            metrics
                .s4_violations
                .push(format!("token {t} acquired after {max} on channel {li} by process {p}"));
        }
        let max = if generation == max_generation { max.max(t) } else { t };
        self.max_token[li] = (generation, max);
    }

    /// The highest fence token acquired on channel `li` so far.
    pub(crate) fn max_token_of(&self, li: usize) -> u64 {
        self.max_token.get(li).map_or(0, |(_, t)| *t)
    }

    /// A promoted replica's tables replaced the rows: a row's token may be below the last one
    /// seen (the tail lost); acquired tokens must still rise (`max_token` is kept).
    pub(crate) fn rows_replaced(&mut self) {
        for (_, token) in &mut self.lease_token {
            *token = 0;
        }
        self.rows_touched = true;
    }

    /// S4: after a commit in schema generation `generation`, channel `li`'s lease row carries
    /// `token`.
    pub(crate) fn lease_row(&mut self, metrics: &mut Metrics, li: usize, token: u64, generation: u64) {
        if self.on_old_primary {
            return;
        }
        let (last_generation, last) = self.lease_token[li];
        if generation == last_generation && token < last {
            metrics
                .s4_violations
                .push(format!("lease row token went back from {last} to {token}"));
        }
        self.lease_token[li] = (generation, token);
    }

    fn set_phase_bound(&mut self, p: usize, bound: Option<PhaseBound>) {
        let Some(slot) = self.phase_bound.get_mut(p) else {
            return;
        };
        if *slot == bound {
            return;
        }
        match bound {
            Some(new) => self.phase_bounds.set(p, (new.at, p)),
            None => {
                self.phase_bounds.remove(p);
            }
        }
        *slot = bound;
    }
}

impl World {
    pub(crate) fn fail(&self, checker: &'static str, message: String) -> CheckFailure {
        CheckFailure {
            checker,
            at: self.engine.now,
            message,
        }
    }

    /// The process (and session) that holds the data channel and can receive its notifications.
    pub(crate) fn serving(&self) -> Option<(usize, SessionId)> {
        if !self.server.up {
            return None;
        }
        self.checkers.believers[0].iter().find_map(|&p| {
            let proc = &self.procs[p];
            // The cheap tests first: the lock's session is a lookup in the core's lock table.
            if !proc.alive() || self.links[p].cut {
                return None;
            }
            let session = proc.lock_session(0)?;
            let ok = proc.session() == Some(session)
                && self.server.conns.get(&session).is_some_and(|c| !c.client_closed)
                && self.server.db.is_alive(session);
            ok.then_some((p, session))
        })
    }

    pub(crate) fn check(&mut self) -> Result<(), CheckFailure> {
        let now = self.engine.now;
        let serving = self.serving();
        self.checkers.available = serving.is_some();
        if let Some(holder) = serving {
            self.checkers.last_available = now;
            // Nearly always no fault waits for a new holder: no vector to build and drop.
            if !self.faults.pending.is_empty() {
                for (kind, latency) in self.faults.resolve(holder, now) {
                    self.metrics.failover(kind, latency);
                    if let Some(tracker) = self.property.as_deref_mut() {
                        tracker.failover(kind, latency, now, self.checkers.last_disturbance);
                    }
                }
            }
        }
        if let Some(((at, p), _)) = self.checkers.phase_bounds.peek() {
            if at < now {
                if let Some(b) = self.checkers.phase_bound[p] {
                    return Err(self.fail(
                        "phase-bound",
                        format!(
                            "process {p}: {} since {:?} on its clock, past its bound of {:?}",
                            b.wait, b.since, b.bound
                        ),
                    ));
                }
            }
        }
        if let Some((p, tick, at)) = self.checkers.stuck_deadline {
            return Err(self.fail(
                "deadline",
                format!("process {p}: after a tick at {tick:?} its session's next deadline is {at:?}, not after it"),
            ));
        }
        if !self.metrics.s4_violations.is_empty() {
            return Err(self.fail("S4", self.metrics.s4_violations[0].clone()));
        }
        // S3 before D1 and D2: a delivery outside tenure is the cause of the duplicate it makes.
        if self.metrics.s3_violations > 0 {
            return Err(self.fail("S3", "a lock delivered a message while not holding".to_owned()));
        }
        if let Some(message) = &self.metrics.d1_violation {
            return Err(self.fail("D1", message.clone()));
        }
        if let Some(message) = &self.metrics.d2_violation {
            return Err(self.fail("D2", message.clone()));
        }
        if let Some(failure) = self.property_failure() {
            return Err(failure);
        }
        self.checkers.s2_gap = false;
        for li in 0..self.checkers.believers.len() {
            if self.checkers.believers[li].len() < 2 {
                continue;
            }
            // A believer whose session the server already ended (terminated or dropped as a
            // dead peer while it was partitioned) cannot know it yet: the design lets a standby
            // take over at once, so S2 then rests on that holder's self-fencing alone.
            let informed = self.checkers.believers[li]
                .iter()
                .filter(|&&p| {
                    let proc = &self.procs[p];
                    let session = proc.lock_session(li);
                    // Uninformed: the client still has the connection up, the server ended it;
                    // or the term's row went with a dropped schema.
                    let uninformed = session.is_some_and(|s| !self.server.db.is_alive(s) && proc.session() == Some(s))
                        || proc.term_generation(li) < self.server.db.generation();
                    !uninformed
                })
                .count();
            let gap = informed <= 1;
            if li == 0 {
                self.checkers.s2_gap = gap;
            }
            if self.checkers.check_s2 && (!gap || self.scenario.strict_s2) {
                let set = &self.checkers.believers[li];
                let why = if gap {
                    "; all but one have a session the server ended (or a schema it dropped) without telling them"
                } else {
                    ""
                };
                return Err(self.fail(
                    "S2",
                    format!(
                        "processes {set:?} all believe they hold channel {li} (Lease, drift {} where the fence margin covers {:.6}){why}",
                        self.scenario.drift,
                        self.scenario.drift_bound()
                    ),
                ));
            }
        }
        // S1: each channel's row names one owner, and at most one live session is that owner.
        // Rows change only at commits and owners appear only with new sessions: check then.
        if std::mem::take(&mut self.checkers.rows_touched) {
            for channel in &self.channels {
                let owners = self.server.db.owner_sessions(self.scenario.protocol, channel);
                if owners > 1 {
                    return Err(self.fail("S1", format!("{owners} live sessions own channel {channel}")));
                }
            }
        }
        let outage = now.saturating_duration_since(self.checkers.last_disturbance.max(self.checkers.last_available));
        let bound = self.checkers.liveness_bound;
        // Nobody can hold while the server is down or refuses writes: the bound counts from the
        // end of that.
        let writable = self.server.up && !self.server.db.read_only();
        if !self.checkers.available && self.alive_count > 0 && writable && outage > bound {
            // Only a process that can reach the server can be asked to hold (checked on this
            // rare path only: it scans the fleet).
            if !self
                .procs
                .iter()
                .zip(&self.links)
                .any(|(proc, link)| proc.alive() && !link.cut && !proc.stood_down)
            {
                self.checkers.last_disturbance = now;
                return Ok(());
            }
            return Err(self.fail(
                "liveness",
                format!("no live process held the lock for {outage:?} after the last fault (bound {bound:?})"),
            ));
        }
        Ok(())
    }
}

impl World {
    /// Recomputes process `p`'s earliest phase bound from its session's state (after an input).
    /// Every wait of a session has a deadline: connecting `connect_timeout`, a setup statement
    /// `setup_timeout`, down (not closing) `backoff_max`, a lock's request its `request_timeout`,
    /// all on the process's own clock. The check after every event then fails if a deadline
    /// passed before the current instant without the session moving on.
    pub(crate) fn phase_bounds_of(&mut self, p: usize) {
        let proc = &self.procs[p];
        let bound = proc.core().and_then(|session| {
            let state = session.state();
            let mut earliest: Option<PhaseBound> = None;
            let mut consider = |wait: Wait, since: Timestamp, bound: Duration| {
                let b = PhaseBound {
                    at: proc.first_global(since + bound),
                    wait,
                    since,
                    bound,
                };
                if earliest.map_or(true, |e| (b.at, b.wait) < (e.at, e.wait)) {
                    earliest = Some(b);
                }
            };
            match state.phase {
                ConnPhase::Connecting => consider(Wait::Connecting, state.since, self.scenario.connect_timeout),
                ConnPhase::Down if !state.closing => consider(Wait::Down, state.since, self.session_config.backoff_max),
                _ => {}
            }
            if let Some(sent) = state.oldest_setup {
                consider(Wait::Setup, sent, self.scenario.setup_timeout);
            }
            // The session's locks in key order, the lock of channel `li` under key `li`.
            for (key, lock) in session.locks() {
                let Ok(li) = usize::try_from(key.0) else { continue };
                if li >= self.channels.len() || !lock.has_pending() {
                    continue;
                }
                if let Some(sent) = proc.request_sent(li) {
                    consider(Wait::Request(li), sent, self.config.request_timeout);
                }
            }
            earliest
        });
        self.checkers.set_phase_bound(p, bound);
    }
}
