//! The crash watch: a session's wait on one holder's session, over a second connection.
//!
//! Every `Lease` session holds a session advisory lock keyed by its schema and its own backend
//! pid from its bootstrap on. A [`Session`](crate::Session) whose standbys were refused by a
//! holder of another process waits for that advisory lock on a dedicated connection (never the
//! listening one, whose notifications must keep flowing) with a bounded statement
//! ([`SessionOp::AwaitHolder`](crate::SessionOp::AwaitHolder)): when the holder's session ends
//! the server releases the lock, the wait returns [`AwaitOutcome::Gone`] and the standbys whose
//! holder it was attempt at once, instead of at the lease's expiry.
//!
//! One wait per process: the holder of the most waiting standbys is watched; standbys of other
//! holders keep their ordinary retry schedule, as do all of them whenever the watch is not
//! running (its connection cannot be opened, is down, or the holder is not watchable). While a
//! standby's holder is watched, the standby sends no periodic attempt. A silent holder (cut off
//! without its session ending) is still bounded by its lease: the wait returns
//! [`AwaitOutcome::Expired`] at the lease's expiry.
//!
//! This module holds the bookkeeping (who refused which lock, which holder to watch, the watch
//! connection's state); [`Session`](crate::Session) drives it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::name::SchemaName;
use crate::proto::SessionId;
use crate::session::{LockKey, OpId};
use crate::time::Timestamp;

/// What one wait of the crash watch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AwaitOutcome {
    /// The holder's session ended (its advisory lock was released during the wait, or it had
    /// ended before the wait looked).
    Gone,
    /// The holder's earliest lease expired (a silent holder: its lease bounds it as before).
    Expired,
    /// The holder holds no lease in the schema any more.
    Released,
    /// Nothing happened within the wait's bound: it is issued again.
    Timeout,
    /// The holder's session is alive but holds no advisory lock (an older version): its
    /// standbys keep their ordinary retries.
    Unwatched,
}

impl AwaitOutcome {
    /// The word the wait function answers.
    pub fn as_str(self) -> &'static str {
        match self {
            AwaitOutcome::Gone => "gone",
            AwaitOutcome::Expired => "expired",
            AwaitOutcome::Released => "released",
            AwaitOutcome::Timeout => "timeout",
            AwaitOutcome::Unwatched => "unwatched",
        }
    }

    /// The outcome of a word of the wait function.
    pub fn parse(word: &str) -> Option<AwaitOutcome> {
        [
            AwaitOutcome::Gone,
            AwaitOutcome::Expired,
            AwaitOutcome::Released,
            AwaitOutcome::Timeout,
            AwaitOutcome::Unwatched,
        ]
        .into_iter()
        .find(|o| o.as_str() == word)
    }

    /// Whether the standbys of the watched holder should attempt now.
    pub fn frees(self) -> bool {
        matches!(
            self,
            AwaitOutcome::Gone | AwaitOutcome::Expired | AwaitOutcome::Released
        )
    }
}

/// Why the crash watch stopped running; its standbys fall back to their ordinary retries until
/// it runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchFailure {
    /// The server refused the second connection for its connection limit (SQLSTATE 53300).
    ConnectionLimit(String),
    /// The second connection could not be opened.
    ConnectFailed(String),
    /// The second connection ended.
    Closed(Option<String>),
    /// A wait was not answered within its bound and the request timeout.
    Timeout,
    /// A wait failed.
    Failed(String),
}

/// A holder's session as the watch knows it: the schema of its lease rows and its backend pid.
pub(crate) type Holder = (SchemaName, i32);

pub(crate) enum WatchLink {
    /// No connection; connect when there is a holder to watch.
    Idle,
    /// No connection; not before `retry_at`.
    Down {
        retry_at: Timestamp,
    },
    Connecting {
        session: SessionId,
        deadline: Timestamp,
    },
    Up {
        session: SessionId,
    },
}

pub(crate) struct Wait {
    pub(crate) id: OpId,
    pub(crate) holder: Holder,
    pub(crate) deadline: Timestamp,
}

/// The crash watch's state.
pub(crate) struct Watch {
    pub(crate) link: WatchLink,
    pub(crate) wait: Option<Wait>,
    /// Each watchable holder's waiting locks.
    pub(crate) holders: BTreeMap<Holder, BTreeSet<LockKey>>,
    /// Each waiting lock's holder.
    pub(crate) holder_of: BTreeMap<LockKey, Holder>,
    /// The locks told `Watched(true)`.
    pub(crate) watched: BTreeSet<LockKey>,
    /// Holders whose wait answered `unwatched`.
    pub(crate) unwatchable: BTreeSet<Holder>,
    /// While the connection is up with nothing to watch: when it closes (it holds a server
    /// slot that the fleet's own connections may need).
    pub(crate) idle_until: Option<Timestamp>,
}

impl Watch {
    pub(crate) fn new() -> Self {
        Watch {
            link: WatchLink::Idle,
            wait: None,
            holders: BTreeMap::new(),
            holder_of: BTreeMap::new(),
            watched: BTreeSet::new(),
            unwatchable: BTreeSet::new(),
            idle_until: None,
        }
    }

    /// Records `key`'s holder (`None`: it waits on none).
    pub(crate) fn note(&mut self, key: LockKey, holder: Option<Holder>) {
        if self.holder_of.get(&key) == holder.as_ref() {
            return;
        }
        if let Some(old) = self.holder_of.remove(&key) {
            if let Some(keys) = self.holders.get_mut(&old) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.holders.remove(&old);
                    self.unwatchable.remove(&old);
                }
            }
        }
        if let Some(holder) = holder {
            self.holders.entry(holder.clone()).or_default().insert(key);
            self.holder_of.insert(key, holder);
        }
    }

    /// The holder to watch: the one with the most waiting locks (the first in order on a tie),
    /// never `own` (this session's own backend), never one found unwatchable.
    pub(crate) fn choose(&self, own: Option<i32>) -> Option<Holder> {
        let mut best: Option<(&Holder, usize)> = None;
        for (holder, keys) in &self.holders {
            if Some(holder.1) == own || self.unwatchable.contains(holder) {
                continue;
            }
            if best.map_or(true, |(_, n)| keys.len() > n) {
                best = Some((holder, keys.len()));
            }
        }
        best.map(|(holder, _)| holder.clone())
    }

    /// The next deadline of the watch.
    pub(crate) fn deadline(&self) -> Option<Timestamp> {
        let link = match &self.link {
            WatchLink::Down { retry_at } => Some(*retry_at),
            WatchLink::Connecting { deadline, .. } => Some(*deadline),
            WatchLink::Up { .. } => self.idle_until,
            _ => None,
        };
        let wait = self.wait.as_ref().map(|w| w.deadline);
        match (link, wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The watch connection, if one is open or being opened.
    pub(crate) fn session(&self) -> Option<SessionId> {
        match &self.link {
            WatchLink::Connecting { session, .. } | WatchLink::Up { session } => Some(*session),
            _ => None,
        }
    }
}

/// The bound of one wait and its answer's deadline beyond it.
pub(crate) fn wait_bounds(refresh: Duration, request_timeout: Duration) -> (Duration, Duration) {
    (refresh, refresh.saturating_add(request_timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> SchemaName {
        SchemaName::new("s").unwrap()
    }

    #[test]
    fn the_holder_of_most_waiting_locks_is_chosen_never_our_own_or_an_unwatchable_one() {
        let mut watch = Watch::new();
        watch.note(LockKey(1), Some((schema(), 10)));
        watch.note(LockKey(2), Some((schema(), 20)));
        watch.note(LockKey(3), Some((schema(), 20)));
        assert_eq!(watch.choose(None), Some((schema(), 20)));
        assert_eq!(watch.choose(Some(20)), Some((schema(), 10)));
        watch.unwatchable.insert((schema(), 20));
        assert_eq!(watch.choose(None), Some((schema(), 10)));
        watch.note(LockKey(2), None);
        watch.note(LockKey(3), Some((schema(), 10)));
        // The holder without locks is forgotten, its unwatchable mark too.
        assert!(watch.unwatchable.is_empty());
        assert_eq!(watch.holders.len(), 1);
        assert_eq!(watch.choose(None), Some((schema(), 10)));
    }

    #[test]
    fn outcomes_round_trip_their_words() {
        for word in ["gone", "expired", "released", "timeout", "unwatched"] {
            assert_eq!(AwaitOutcome::parse(word).unwrap().as_str(), word);
        }
        assert_eq!(AwaitOutcome::parse("other"), None);
    }
}
