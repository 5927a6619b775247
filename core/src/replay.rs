//! A `Lease` standby's replay log: the data messages and lock-channel markers it received
//! while not delivering, with each marker's sender, so that the winner of a takeover can tell
//! from the lock table's word (the previous term's token and holder pid) where that holder's
//! delivery provably ended.
//!
//! Every listener sees one stream in commit order, so a marker is a point in it that every
//! standby shares. A holder's progress marker `n` says that it has seen its own marker `ack`,
//! hence delivered everything before it. The log forgets what precedes such a point once the
//! table has named the marker's sender as the term's holder; a marker from any other backend
//! is kept but never trusted.

use std::collections::VecDeque;

use crate::proto::{FenceToken, Marker, PreviousTerm, Progress};

/// One entry of the log.
#[derive(Debug, Clone)]
enum Entry {
    Data(String),
    Mark { pid: i32, marker: Marker },
}

/// What is known of the stream before the log's first entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Base {
    /// Nothing: the log began when the session began listening, or the buffer overflowed.
    #[default]
    Unknown,
    /// Everything before was delivered by the holder of `token` (backend `pid`); after it,
    /// that holder delivered nothing more (`drained`), or may have (`!drained`).
    After {
        token: FenceToken,
        pid: Option<i32>,
        drained: bool,
    },
}

/// A point of the stream up to which a term's holder provably delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    /// Index of the marker in the log; the cut lies right after it.
    index: usize,
    /// The holder delivered nothing after it (its drain marker), rather than possibly more.
    drained: bool,
}

/// What a takeover's winner delivers first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Payloads in stream order, each with "may have been delivered already".
    pub(crate) messages: Vec<(String, bool)>,
    /// Messages that may be missing: dropped by overflow where the cut could not be found.
    pub(crate) missing: u64,
}

/// The log, bounded by message count and payload bytes.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    entries: VecDeque<Entry>,
    messages: usize,
    bytes: usize,
    /// Messages dropped since the log was last cut at a known point.
    dropped: u64,
    base: Base,
}

impl Replay {
    /// An empty log about whose past nothing is known.
    pub(crate) fn listening() -> Replay {
        Replay {
            entries: VecDeque::new(),
            messages: 0,
            bytes: 0,
            dropped: 0,
            base: Base::Unknown,
        }
    }

    /// An empty log that begins where this lock's own term `token` stopped delivering.
    pub(crate) fn after_own(token: Option<FenceToken>, pid: Option<i32>) -> Replay {
        let mut replay = Replay::listening();
        if let Some(token) = token {
            replay.base = Base::After {
                token,
                pid,
                drained: true,
            };
        }
        replay
    }

    /// Messages kept.
    pub(crate) fn len(&self) -> usize {
        self.messages
    }

    /// Appends a data message, dropping the oldest beyond the limits; returns the dropped count
    /// to warn about when it reaches a power of two.
    pub(crate) fn push_data(&mut self, payload: String, limit: usize, max_bytes: usize) -> Option<u64> {
        self.bytes += payload.len();
        self.messages += 1;
        self.entries.push_back(Entry::Data(payload));
        let mut warn = None;
        while self.messages > limit.max(1) || (self.bytes > max_bytes && self.messages > 1) {
            match self.entries.pop_front() {
                Some(Entry::Data(dropped)) => {
                    self.messages -= 1;
                    self.bytes -= dropped.len();
                    self.dropped += 1;
                    self.base = Base::Unknown;
                    if self.dropped.is_power_of_two() {
                        warn = Some(self.dropped);
                    }
                }
                Some(Entry::Mark { .. }) => {}
                None => break,
            }
        }
        warn
    }

    /// Appends a lock-channel marker from backend `pid`.
    pub(crate) fn push_mark(&mut self, pid: i32, marker: Marker) {
        self.entries.push_back(Entry::Mark { pid, marker });
    }

    /// The newest provable cut of term `token` held by backend `pid`: its drain marker (or its
    /// release marker, once its `drained` marker says it saw it), else its
    /// newest marker at or below the newest acknowledgement it sent (its `acquired` marker is
    /// number 0, and everything before it belongs to older terms).
    fn cut(&self, token: FenceToken, pid: i32) -> Option<Cut> {
        let acked = self
            .entries
            .iter()
            .filter_map(|entry| match entry {
                Entry::Mark {
                    pid: from,
                    marker: Marker::Progress(t, Progress { ack: Some(ack), .. }),
                } if *from == pid && *t == token => Some(*ack),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        // A release that was its own drain point counts once its holder said it saw it.
        let proven = self.entries.iter().any(|entry| {
            matches!(entry, Entry::Mark { pid: from, marker: Marker::Drained(t) } if *from == pid && *t == token)
        });
        // The newest such marker wins; the holder's drain marker (or its proven release) is the
        // newest of its term.
        self.entries.iter().enumerate().rev().find_map(|(index, entry)| {
            let Entry::Mark { pid: from, marker } = entry else {
                return None;
            };
            if *from != pid {
                return None;
            }
            match *marker {
                Marker::Draining(Some(t)) if t == token => Some(Cut { index, drained: true }),
                Marker::Released(Some(t)) if t == token && proven => Some(Cut { index, drained: true }),
                Marker::Acquired(t) if t == token => Some(Cut { index, drained: false }),
                Marker::Progress(t, Progress { seq, .. }) if t == token && seq <= acked => {
                    Some(Cut { index, drained: false })
                }
                _ => None,
            }
        })
    }

    /// Forgets what precedes the newest provable cut of the term the table names (token and
    /// holder pid); called whenever the table speaks or that holder's marker arrives.
    pub(crate) fn compact(&mut self, token: FenceToken, pid: i32) {
        let Some(cut) = self.cut(token, pid) else { return };
        for entry in self.entries.drain(..=cut.index) {
            if let Entry::Data(payload) = entry {
                self.messages -= 1;
                self.bytes -= payload.len();
            }
        }
        self.dropped = 0;
        self.base = Base::After {
            token,
            pid: Some(pid),
            drained: cut.drained,
        };
    }

    /// What the winner of term `own` delivers first, given the previous term as the table had it
    /// (`None`: the row is new, or the table did not say). Data after the winner's own `acquired`
    /// marker (already in the log when the reply came late) is live, never a replay.
    pub(crate) fn take(
        self,
        previous: Option<PreviousTerm>,
        own: Option<FenceToken>,
        own_pid: Option<i32>,
    ) -> Replayed {
        // Ours: our token from our backend (tokens start again after a schema drop, and anyone
        // can send `acquired:<n>`).
        let own_mark = self.entries.iter().rposition(|entry| {
            matches!(entry, Entry::Mark { pid, marker: Marker::Acquired(t) }
                if Some(*t) == own && own_pid.map_or(true, |own_pid| own_pid == *pid))
        });
        // The previous holder's release marker: it delivered nothing after it (it stopped at its
        // drain marker before it, or at this very marker), so no flag after it.
        let released_at = previous.and_then(|previous| {
            let holder = previous.holder_pid?;
            self.entries.iter().rposition(|entry| {
                matches!(entry, Entry::Mark { pid, marker: Marker::Released(Some(t)) }
                    if *pid == holder && *t == previous.token)
            })
        });
        let mut out = Replayed::default();
        let (start, mut replay) = match previous {
            None => {
                // A new row: no term before ours, so only what followed our own marker counts.
                (own_mark.map_or(self.entries.len(), |i| i + 1), false)
            }
            Some(previous) => {
                let cut = previous.holder_pid.and_then(|pid| self.cut(previous.token, pid));
                match (cut, self.base) {
                    (Some(cut), _) => (cut.index + 1, !cut.drained),
                    (None, Base::After { token, pid, drained })
                        if token == previous.token && (pid.is_none() || pid == previous.holder_pid) =>
                    {
                        (0, !drained)
                    }
                    // A base newer than the previous term (`token > previous.token`) proves
                    // nothing: on one row tokens only rise, so it means the schema was dropped
                    // and the row began again at 1, and that term may have begun, and
                    // delivered, before the log did. Only its cut or its release tells.
                    (None, _) if previous.released && self.dropped == 0 => {
                        // Released, and no cut of it is here although nothing was dropped: the
                        // log began after its drain marker, so its holder delivered none of
                        // this, unless its release marker is here unproven (the release was the
                        // drain point): what precedes it, it may have delivered.
                        (0, released_at.is_some())
                    }
                    (None, _) => {
                        out.missing = self.dropped;
                        (0, true)
                    }
                }
            }
        };
        for (index, entry) in self.entries.into_iter().enumerate() {
            match entry {
                Entry::Mark { .. } if Some(index) == own_mark || Some(index) == released_at => replay = false,
                Entry::Data(payload) if index >= start => out.messages.push((payload, replay)),
                Entry::Mark { .. } | Entry::Data(_) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: i32 = 10;
    const FORGER: i32 = 99;

    fn t(n: u64) -> FenceToken {
        FenceToken(n)
    }

    fn progress(token: u64, seq: u64, ack: Option<u64>) -> Marker {
        Marker::Progress(t(token), Progress { seq, ack })
    }

    fn data(log: &mut Replay, payloads: &[&str]) {
        for p in payloads {
            log.push_data((*p).to_owned(), 100, 1 << 20);
        }
    }

    fn payloads(r: &Replayed) -> Vec<(&str, bool)> {
        r.messages.iter().map(|(p, r)| (p.as_str(), *r)).collect()
    }

    fn crashed(token: u64) -> Option<PreviousTerm> {
        Some(PreviousTerm {
            token: t(token),
            holder_pid: Some(P),
            released: false,
        })
    }

    #[test]
    fn replays_what_followed_the_newest_acknowledged_marker() {
        let mut log = Replay::listening();
        data(&mut log, &["old"]);
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        log.push_mark(P, progress(5, 1, None));
        data(&mut log, &["b"]);
        log.push_mark(P, progress(5, 2, Some(1)));
        data(&mut log, &["c"]);
        let r = log.clone().take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("b", true), ("c", true)]);
        // Compacting at the table's word keeps exactly that.
        log.compact(t(5), P);
        assert_eq!(log.len(), 2);
        assert_eq!(
            payloads(&log.take(crashed(5), Some(t(6)), None)),
            [("b", true), ("c", true)]
        );
    }

    #[test]
    fn a_forged_acknowledgement_or_drain_moves_no_cut() {
        let mut log = Replay::listening();
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        log.push_mark(FORGER, Marker::Draining(Some(t(5))));
        log.push_mark(FORGER, progress(5, 9, Some(9)));
        data(&mut log, &["b"]);
        log.compact(t(5), P);
        let r = log.take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("a", true), ("b", true)]);
    }

    #[test]
    fn after_a_drain_marker_nothing_is_a_replay() {
        let mut log = Replay::listening();
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        log.push_mark(P, Marker::Draining(Some(t(5))));
        data(&mut log, &["b"]);
        log.push_mark(P, Marker::Released(Some(t(5))));
        data(&mut log, &["c"]);
        log.push_mark(7, Marker::Acquired(t(6)));
        data(&mut log, &["d"]);
        let previous = Some(PreviousTerm {
            token: t(5),
            holder_pid: Some(P),
            released: true,
        });
        let r = log.take(previous, Some(t(6)), None);
        assert_eq!(payloads(&r), [("b", false), ("c", false), ("d", false)]);
    }

    #[test]
    fn a_release_is_a_cut_once_its_holder_says_it_drained() {
        let mut log = Replay::listening();
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        log.push_mark(P, Marker::Released(Some(t(5))));
        data(&mut log, &["b"]);
        let previous = Some(PreviousTerm {
            token: t(5),
            holder_pid: Some(P),
            released: true,
        });
        // Without the holder's word, the release proves nothing: from its `acquired` marker on,
        // flagged up to the release (after it the holder delivered nothing).
        assert_eq!(
            payloads(&log.clone().take(previous, Some(t(6)), None)),
            [("a", true), ("b", false)]
        );
        // A forged word, or one of another term, neither.
        log.push_mark(FORGER, Marker::Drained(t(5)));
        log.push_mark(P, Marker::Drained(t(4)));
        assert_eq!(
            payloads(&log.clone().take(previous, Some(t(6)), None)),
            [("a", true), ("b", false)]
        );
        log.push_mark(P, Marker::Drained(t(5)));
        data(&mut log, &["c"]);
        assert_eq!(
            payloads(&log.clone().take(previous, Some(t(6)), None)),
            [("b", false), ("c", false)]
        );
        // Compacting at the table's word keeps exactly that.
        log.compact(t(5), P);
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn overflow_past_the_cut_is_a_gap() {
        let mut log = Replay::listening();
        log.push_mark(P, Marker::Acquired(t(5)));
        for i in 0..5 {
            log.push_data(i.to_string(), 3, 1 << 20);
        }
        let r = log.take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("2", true), ("3", true), ("4", true)]);
        assert_eq!(r.missing, 2);
    }

    #[test]
    fn overflow_before_a_later_cut_is_no_gap() {
        let mut log = Replay::listening();
        for i in 0..5 {
            log.push_data(i.to_string(), 3, 1 << 20);
        }
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        let r = log.take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("a", true)]);
        assert_eq!(r.missing, 0);
    }

    #[test]
    fn a_log_after_its_own_term_replays_nothing_twice() {
        let mut log = Replay::after_own(Some(t(5)), Some(P));
        data(&mut log, &["a"]);
        let r = log.take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("a", false)]);
    }

    #[test]
    fn our_own_acquired_marker_ends_the_replay() {
        let mut log = Replay::listening();
        log.push_mark(P, Marker::Acquired(t(5)));
        data(&mut log, &["a"]);
        log.push_mark(3, Marker::Acquired(t(6)));
        data(&mut log, &["b"]);
        let r = log.take(crashed(5), Some(t(6)), None);
        assert_eq!(payloads(&r), [("a", true), ("b", false)]);
        let mut fresh = Replay::listening();
        data(&mut fresh, &["x"]);
        fresh.push_mark(3, Marker::Acquired(t(1)));
        data(&mut fresh, &["y"]);
        assert_eq!(payloads(&fresh.take(None, Some(t(1)), None)), [("y", false)]);
    }

    #[test]
    fn a_log_that_began_after_a_graceful_release_replays_nothing() {
        let mut log = Replay::listening();
        data(&mut log, &["a"]);
        let released = Some(PreviousTerm {
            token: t(5),
            holder_pid: Some(P),
            released: true,
        });
        assert_eq!(payloads(&log.clone().take(released, Some(t(6)), None)), [("a", false)]);
        // Unless something was dropped: then the drain marker may have gone with it.
        let mut small = Replay::listening();
        small.push_mark(P, Marker::Draining(Some(t(5))));
        for i in 0..3 {
            small.push_data(i.to_string(), 1, 1 << 20);
        }
        let r = small.take(released, Some(t(6)), None);
        assert_eq!((payloads(&r), r.missing), (vec![("2", true)], 2));
    }

    #[test]
    fn a_log_after_a_term_of_a_dropped_table_proves_nothing_about_the_new_rows_term() {
        // Our term 3 ended when the schema was dropped; term 1 of the new row (backend 7) had
        // begun before that, and has acknowledged only its `acquired` marker, which is not here.
        let mut log = Replay::after_own(Some(t(3)), Some(P));
        data(&mut log, &["a", "b"]);
        log.push_mark(7, progress(1, 1, Some(0)));
        data(&mut log, &["c"]);
        log.compact(t(1), 7);
        let new_row = PreviousTerm {
            token: t(1),
            holder_pid: Some(7),
            released: false,
        };
        let r = log.clone().take(Some(new_row), Some(t(2)), Some(P));
        assert_eq!(payloads(&r), [("a", true), ("b", true), ("c", true)]);
        assert_eq!(r.missing, 0);
        // Had it released before our log began, none of it would be its.
        let released = Some(PreviousTerm {
            released: true,
            ..new_row
        });
        let r = log.take(released, Some(t(2)), Some(P));
        assert_eq!(payloads(&r), [("a", false), ("b", false), ("c", false)]);
    }

    #[test]
    fn byte_limit_drops_the_oldest() {
        let mut log = Replay::listening();
        log.push_data("aaaa".into(), 100, 6);
        log.push_data("bbbb".into(), 100, 6);
        assert_eq!(log.len(), 1);
        // A single message larger than the limit is kept rather than lost.
        log.push_data("cccccccc".into(), 100, 6);
        assert_eq!(log.len(), 1);
    }
}
