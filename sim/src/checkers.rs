//! The checkers, run after every event: S1 (one owner row per channel), S2 (at most one
//! believer per channel, for Lease with drift within bound), S3 (no delivery while not holding),
//! S4 (fence tokens only rise), liveness (after a disturbance, someone serves within a bound)
//! and the step limit.

use std::collections::BTreeSet;
use std::time::Duration;

use pgiplock_core::{Protocol, SessionId, Timestamp};

use crate::metrics::Metrics;
use crate::scenario::Scenario;
use crate::world::World;

/// A checker found a broken invariant or bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checker {checker} failed at {at}: {message}")]
pub struct CheckFailure {
    /// Which checker (`S1`, `S2`, `S3`, `S4`, `liveness`, `steps`).
    pub checker: &'static str,
    /// Virtual time of the failure.
    pub at: Timestamp,
    /// What was seen.
    pub message: String,
}

/// What the checkers track between events.
pub(crate) struct Checkers {
    /// Per channel: processes whose lock believes it holds.
    pub(crate) believers: Vec<BTreeSet<usize>>,
    /// Per channel: the highest fence token acquired so far.
    max_token: Vec<u64>,
    /// Per channel: the lease row's token at the last commit.
    lease_token: Vec<u64>,
    /// The last fault or heal: the liveness bound counts from here.
    pub(crate) last_disturbance: Timestamp,
    last_available: Timestamp,
    /// Someone serves the data channel (as of the last check).
    pub(crate) available: bool,
    check_s2: bool,
    /// A commit or a new session happened since the last S1 check.
    pub(crate) rows_touched: bool,
    /// Channel 0 has two believers only because one's session ended without it knowing.
    pub(crate) s2_gap: bool,
    liveness_bound: Duration,
}

impl Checkers {
    pub(crate) fn new(scenario: &Scenario) -> Checkers {
        Checkers {
            believers: vec![BTreeSet::new(); scenario.channels],
            max_token: vec![0; scenario.channels],
            lease_token: vec![0; scenario.channels],
            last_disturbance: Timestamp::ZERO,
            last_available: Timestamp::ZERO,
            available: false,
            check_s2: scenario.protocol == Protocol::Lease && scenario.drift < scenario.drift_bound(),
            rows_touched: false,
            s2_gap: false,
            liveness_bound: scenario.liveness_bound(),
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

    /// Process `p` is gone: none of its locks believes anything.
    pub(crate) fn forget(&mut self, p: usize) {
        for set in &mut self.believers {
            set.remove(&p);
        }
    }

    /// S4: process `p` acquired channel `li` with fence token `t`.
    pub(crate) fn token_acquired(&mut self, metrics: &mut Metrics, p: usize, li: usize, t: u64) {
        if t <= self.max_token[li] {
            metrics.s4_violations.push(format!(
                "token {t} acquired after {} on channel {li} by process {p}",
                self.max_token[li]
            ));
        }
        self.max_token[li] = self.max_token[li].max(t);
    }

    /// S4: after a commit, channel `li`'s lease row carries `token`.
    pub(crate) fn lease_row(&mut self, metrics: &mut Metrics, li: usize, token: u64) {
        if token < self.lease_token[li] {
            metrics.s4_violations.push(format!(
                "lease row token went back from {} to {}",
                self.lease_token[li], token
            ));
        }
        self.lease_token[li] = token;
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
            let session = proc.lock_session(0)?;
            let ok = proc.alive()
                && !self.links[p].cut
                && proc.session() == Some(session)
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
            for (kind, latency) in self.faults.resolve(holder, now) {
                self.metrics.failover(kind, latency);
            }
        }
        if !self.metrics.s4_violations.is_empty() {
            return Err(self.fail("S4", self.metrics.s4_violations[0].clone()));
        }
        if self.metrics.s3_violations > 0 {
            return Err(self.fail("S3", "a lock delivered a message while not holding".to_owned()));
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
                    // Uninformed: the client still has the connection up, the server ended it.
                    let uninformed = session.is_some_and(|s| !self.server.db.is_alive(s) && proc.session() == Some(s));
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
                    "; all but one have a session the server ended without telling them"
                } else {
                    ""
                };
                return Err(self.fail(
                    "S2",
                    format!("processes {set:?} all believe they hold channel {li} (Lease, drift within bound){why}"),
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
        if !self.checkers.available && self.alive_count > 0 && self.server.up && outage > bound {
            // Only a process that can reach the server can be asked to hold (checked on this
            // rare path only: it scans the fleet).
            if !self
                .procs
                .iter()
                .zip(&self.links)
                .any(|(proc, link)| proc.alive() && !link.cut)
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
