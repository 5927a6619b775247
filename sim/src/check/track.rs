//! What the property checks of a run need beyond the World's own checkers: per message of the
//! data channel, who heard it and how often it was delivered; the failovers with the last
//! disturbance before each; and the verdict at the end of the run. Kept only when the scenario
//! asks for it (`Scenario::property_checks`), so that an ordinary run pays nothing.

use std::time::Duration;

use pgiplock_core::{Protocol, SessionId, Timestamp};

use crate::checkers::CheckFailure;
use crate::metrics::Report;
use crate::scenario::{Action, FaultKind, Scenario};
use crate::world::World;

/// Why a message had to be delivered by someone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Its holder heard it on the connection its term works on.
    HeardByHolder,
    /// The standby that won the next term heard it, on the connection it won on (after the
    /// previous holder's drain marker, if that one released).
    HeardByWinner,
}

/// One message someone had to deliver.
#[derive(Debug, Clone, Copy)]
struct Debt {
    id: u64,
    process: usize,
    heard_at: Timestamp,
    why: Owed,
}

/// The per-run state of the property checks.
pub(crate) struct Tracker {
    /// The only faults (and actions) are graceful: no message may be delivered twice (D1).
    graceful_only: bool,
    /// Lease with replay on: the winner of a takeover replays what it heard (D2).
    replays: bool,
    protocol: Protocol,
    liveness_bound: Duration,
    /// Per message id: deliveries of it (any process, flagged or not).
    delivered: Vec<u8>,
    /// Per process: `(server session, message id, when)` heard while not holding, since the
    /// last acquisition of the data channel by anyone.
    heard: Vec<Vec<(SessionId, u64, Timestamp)>>,
    /// Messages someone had to deliver.
    owed: Vec<Debt>,
    /// Where the debts of the latest term begin in `owed`, and its holder (a `Gap` right
    /// after its `Acquired` cancels them).
    latest_term: Option<(usize, usize)>,
    /// When the latest term's holder reached its drain marker, while its release is not yet
    /// confirmed.
    drained: Option<Timestamp>,
    /// When the latest term's holder reached its drain marker, if the server then confirmed its
    /// release (Classic: a successor that listened since before buffered what followed the
    /// release marker).
    released: Option<Timestamp>,
    /// Every measured failover: its fault kind and latency.
    pub(crate) failovers: Vec<(FaultKind, Duration)>,
    /// The first failure found along the way.
    violation: Option<(&'static str, String)>,
}

impl Tracker {
    pub(crate) fn new(scenario: &Scenario) -> Tracker {
        let graceful = |k: FaultKind| matches!(k, FaultKind::Stop | FaultKind::Forge);
        let graceful_only = FaultKind::ALL
            .into_iter()
            .all(|k| graceful(k) || scenario.fault_rates.of(k) <= 0.0)
            && scenario.faults.iter().all(|f| graceful(f.kind))
            && scenario
                .actions
                .iter()
                .all(|a| matches!(a.action, Action::Release | Action::Acquire | Action::Start));
        Tracker {
            graceful_only,
            replays: scenario.protocol == Protocol::Lease && scenario.replay_limit != Some(0),
            protocol: scenario.protocol,
            liveness_bound: scenario.liveness_bound(),
            delivered: Vec::new(),
            heard: vec![Vec::new(); scenario.processes],
            owed: Vec::new(),
            latest_term: None,
            drained: None,
            released: None,
            failovers: Vec::new(),
            violation: None,
        }
    }

    /// Process `p` heard message `id` on server session `session` at `at`, holding the data
    /// channel (on that session) or not.
    pub(crate) fn heard(&mut self, p: usize, session: SessionId, id: u64, at: Timestamp, holding: bool) {
        if holding {
            self.owed.push(Debt {
                id,
                process: p,
                heard_at: at,
                why: Owed::HeardByHolder,
            });
        } else if let Some(list) = self.heard.get_mut(p) {
            list.push((session, id, at));
        }
    }

    /// Message `id` was handed to an application.
    pub(crate) fn delivered(&mut self, id: u64) {
        let i = id as usize;
        if self.delivered.len() <= i {
            self.delivered.resize(i + 1, 0);
        }
        self.delivered[i] = self.delivered[i].saturating_add(1);
        if self.delivered[i] == 2 && self.graceful_only && self.violation.is_none() {
            self.violation = Some((
                "D1-graceful",
                format!("message {id} delivered twice although every fault was a graceful stop"),
            ));
        }
    }

    /// Process `p` acquired the data channel on server session `session` (`None`: not on its
    /// current connection, or a term that replays nothing), which has listened since
    /// `listening_since`; `same_generation`: of the schema its heard messages were committed in
    /// (a term on a row made after a schema drop has no predecessor to replay from).
    pub(crate) fn acquired(
        &mut self,
        p: usize,
        session: Option<SessionId>,
        listening_since: Option<Timestamp>,
        same_generation: impl Fn(u64) -> bool,
    ) {
        // What the winner owes of what it heard: after a release, only what followed the drain
        // marker (what came before was the old holder's to deliver: a holder that missed it,
        // say in a short cut, lost it, and a replay after a graceful release would break D2);
        // after an involuntary end (Lease), everything since the previous acquisition.
        let owed_after = match self.protocol {
            Protocol::Lease if self.replays => Some(self.drained.unwrap_or(Timestamp::ZERO)),
            Protocol::Lease => None,
            // Only a standby that heard the release marker buffered what followed it.
            Protocol::Classic => match (self.released, listening_since) {
                (Some(drained), Some(since)) if since < drained => Some(drained),
                _ => None,
            },
        };
        let start = self.owed.len();
        if let (Some(after), Some(session), Some(list)) = (owed_after, session, self.heard.get(p)) {
            for &(s, id, at) in list {
                if s == session && at > after && same_generation(id) {
                    self.owed.push(Debt {
                        id,
                        process: p,
                        heard_at: at,
                        why: Owed::HeardByWinner,
                    });
                }
            }
        }
        // Only the first term after a message was heard owes it: later ones replay from their
        // own predecessor's progress.
        for list in &mut self.heard {
            list.clear();
        }
        self.latest_term = Some((p, start));
        self.drained = None;
        self.released = None;
    }

    /// Process `p`'s new term reported a `Gap`: what it owed may be missing.
    pub(crate) fn gap(&mut self, p: usize) {
        if let Some((holder, start)) = self.latest_term {
            if holder == p {
                self.owed.truncate(start);
            }
        }
    }

    /// The holder reached its drain marker at `at`.
    pub(crate) fn drained(&mut self, at: Timestamp) {
        self.drained = Some(at);
    }

    /// The holder's release was confirmed by the server.
    pub(crate) fn released(&mut self) {
        self.released = self.drained;
    }

    /// A failover after a fault of `kind` ended at `now` after `latency`; `last_disturbance`:
    /// the last fault or heal before it (the bound counts from whichever came later).
    pub(crate) fn failover(&mut self, kind: FaultKind, latency: Duration, now: Timestamp, last_disturbance: Timestamp) {
        self.failovers.push((kind, latency));
        let since = now.saturating_sub(latency).max(last_disturbance);
        let took = now.saturating_duration_since(since);
        if took > self.liveness_bound && self.violation.is_none() {
            self.violation = Some((
                "failover",
                format!(
                    "a failover after a {kind} fault took {took:?} after the last disturbance (bound {:?})",
                    self.liveness_bound
                ),
            ));
        }
    }

    /// The first failure found along the way, once.
    pub(crate) fn take_violation(&mut self) -> Option<(&'static str, String)> {
        self.violation.take()
    }

    /// The first message someone had to deliver and nobody did.
    fn first_lost(&self) -> Option<Debt> {
        self.owed
            .iter()
            .find(|d| self.delivered.get(d.id as usize).copied().unwrap_or(0) == 0)
            .copied()
    }
}

impl World {
    /// The property checks of the finished run: the failures found along the way (the check
    /// after every event reports those at once), a lost message, and the load bound.
    pub(crate) fn property_verdict(&mut self, report: &Report) -> Result<(), CheckFailure> {
        let Some(tracker) = self.property.as_deref_mut() else {
            return Ok(());
        };
        if let Some((checker, message)) = tracker.take_violation() {
            return Err(self.fail(checker, message));
        }
        if let Some(debt) = tracker.first_lost() {
            let who = match debt.why {
                Owed::HeardByHolder => "which held the lock then",
                Owed::HeardByWinner => "which won the next term on that connection without a Gap",
            };
            return Err(self.fail(
                "lost",
                format!(
                    "message {} was delivered by nobody, although process {} heard it at {:?}, {who}",
                    debt.id, debt.process, debt.heard_at
                ),
            ));
        }
        let bound = crate::check::load_bound(&self.scenario, report);
        if report.statements_per_s > bound {
            return Err(self.fail(
                "load",
                format!(
                    "{:.3} lock statements/s at the server, above the {bound:.3} the timings imply",
                    report.statements_per_s
                ),
            ));
        }
        Ok(())
    }

    /// A failure the property checks found since the last event, if any.
    pub(crate) fn property_failure(&mut self) -> Option<CheckFailure> {
        let (checker, message) = self.property.as_deref_mut()?.take_violation()?;
        Some(self.fail(checker, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::FaultRates;

    fn tracker(protocol: Protocol, rates: FaultRates) -> Tracker {
        let scenario = Scenario {
            protocol,
            processes: 3,
            fault_rates: rates,
            ..Scenario::default()
        };
        Tracker::new(&scenario)
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_micros(secs * 1_000_000)
    }

    const S1: SessionId = SessionId(1);
    const S2: SessionId = SessionId(2);

    #[test]
    fn a_message_its_holder_heard_must_be_delivered() {
        let mut t = tracker(Protocol::Classic, FaultRates::default());
        t.heard(0, S1, 7, at(1), true);
        assert_eq!(t.first_lost().map(|d| (d.id, d.why)), Some((7, Owed::HeardByHolder)));
        t.delivered(7);
        assert!(t.first_lost().is_none());
    }

    #[test]
    fn the_next_lease_winner_owes_what_it_heard_on_the_connection_it_won_on() {
        let same = |_| true;
        // Won on the connection it heard it on: owed.
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        t.heard(1, S1, 7, at(1), false);
        t.acquired(1, Some(S1), None, same);
        assert_eq!(t.first_lost().map(|d| (d.id, d.why)), Some((7, Owed::HeardByWinner)));
        // Unless its term reported a Gap.
        t.gap(1);
        assert!(t.first_lost().is_none());
        // Won on another connection (it reconnected since): not owed.
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        t.heard(1, S1, 7, at(1), false);
        t.acquired(1, Some(S2), None, same);
        assert!(t.first_lost().is_none());
        // Someone else won first: only the first term after it was heard owes it.
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        t.heard(1, S1, 7, at(1), false);
        t.acquired(2, Some(S2), None, same);
        t.acquired(1, Some(S1), None, same);
        assert!(t.first_lost().is_none());
        // A message of an older schema generation: not owed.
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        t.heard(1, S1, 7, at(1), false);
        t.acquired(1, Some(S1), None, |_| false);
        assert!(t.first_lost().is_none());
    }

    #[test]
    fn after_a_lease_release_the_winner_owes_only_what_followed_the_drain_marker() {
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        t.heard(1, S1, 7, at(1), false);
        t.heard(1, S1, 8, at(4), false);
        t.drained(at(3));
        t.acquired(1, Some(S1), Some(at(0)), |_| true);
        let owed: Vec<u64> = t.owed.iter().map(|d| d.id).collect();
        assert_eq!(owed, [8]);
    }

    #[test]
    fn a_classic_winner_owes_only_after_a_confirmed_release_it_listened_through() {
        let mut t = tracker(Protocol::Classic, FaultRates::default());
        // No release: a takeover after a crash replays nothing under Classic.
        t.heard(1, S1, 7, at(1), false);
        t.acquired(1, Some(S1), Some(at(0)), |_| true);
        assert!(t.first_lost().is_none());
        // A release drained at 3 s and confirmed, the winner listening since 2 s: owed.
        t.heard(2, S2, 8, at(4), false);
        t.drained(at(3));
        t.released();
        t.acquired(2, Some(S2), Some(at(2)), |_| true);
        assert_eq!(t.first_lost().map(|d| d.id), Some(8));
        // A winner that began listening after the drain marker never buffered: not owed.
        let mut t = tracker(Protocol::Classic, FaultRates::default());
        t.drained(at(3));
        t.released();
        t.heard(2, S2, 8, at(4), false);
        t.acquired(2, Some(S2), Some(at(4)), |_| true);
        assert!(t.first_lost().is_none());
        // A release the server did not confirm: not owed.
        let mut t = tracker(Protocol::Classic, FaultRates::default());
        t.drained(at(3));
        t.heard(2, S2, 8, at(4), false);
        t.acquired(2, Some(S2), Some(at(2)), |_| true);
        assert!(t.first_lost().is_none());
    }

    #[test]
    fn a_duplicate_fails_only_when_every_fault_is_graceful() {
        let graceful = FaultRates {
            stop: 10.0,
            forge: 5.0,
            ..FaultRates::default()
        };
        let mut t = tracker(Protocol::Lease, graceful);
        t.delivered(3);
        assert!(t.take_violation().is_none());
        t.delivered(3);
        assert_eq!(t.take_violation().map(|v| v.0), Some("D1-graceful"));
        let mixed = FaultRates {
            stop: 10.0,
            crash: 1.0,
            ..FaultRates::default()
        };
        let mut t = tracker(Protocol::Lease, mixed);
        t.delivered(3);
        t.delivered(3);
        assert!(t.take_violation().is_none());
    }

    #[test]
    fn a_failover_counts_from_its_last_disturbance() {
        let mut t = tracker(Protocol::Lease, FaultRates::default());
        let bound = t.liveness_bound;
        let end = at(10_000);
        // Long after the fault, but soon after a later disturbance: within the bound.
        t.failover(FaultKind::Cut, bound * 3, end, end.saturating_sub(bound / 2));
        assert!(t.take_violation().is_none());
        t.failover(FaultKind::Cut, bound * 3, end, Timestamp::ZERO);
        assert_eq!(t.take_violation().map(|v| v.0), Some("failover"));
        assert_eq!(t.failovers.len(), 2);
    }
}
