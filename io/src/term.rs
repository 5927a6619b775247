//! Terms as scopes: each acquisition is a [`Term`] whose cancellation token ends with it, and a
//! lock's [`LockState`] as a watch.

use pgiplock_core::FenceToken;
use tokio_util::sync::CancellationToken;

/// A lock's state, as [`PgIpLock::state`](crate::PgIpLock::state) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockState {
    /// Not holding: competing (after `init`), or not yet started.
    Standby,
    /// Holding the lock in a term with this fencing token (`Lease`; `None` under `Classic`).
    Holding {
        /// The term's fencing token.
        token: Option<FenceToken>,
    },
    /// A voluntary release passed its drain marker: the term is over and nothing more is
    /// delivered; the server's confirmation is pending.
    Releasing,
    /// Connected and listening but not competing ([`PgIpLock::stand_down`](crate::PgIpLock::stand_down)):
    /// no attempt is made until [`PgIpLock::compete`](crate::PgIpLock::compete).
    StoodDown,
    /// The lock is destroyed or its session is gone; no state follows.
    Stopped,
}

impl LockState {
    /// Whether this process holds the lock in this state.
    pub fn is_holding(&self) -> bool {
        matches!(self, LockState::Holding { .. })
    }
}

/// One term of holding a lock: from its acquisition to the moment it ends.
///
/// The term's [`cancellation`](Term::cancellation) token is cancelled when the term ends, by
/// loss, release (at the drain marker, before the release statement runs), supersession,
/// the lock's destruction or the end of its session. It is cancelled by the session's task as
/// soon as the core reports the end, which is before another process can hold the channel: a
/// `Lease` holder fences itself before its lease can expire, and a release or a closed session
/// ends the term before the server lets anyone else in. Work tied to the term should stop when
/// it fires; [`PgIpLock::run_while_holding`](crate::PgIpLock::run_while_holding) does that for a
/// future.
///
/// Cheap to clone; all clones are the same term.
#[derive(Debug, Clone)]
pub struct Term {
    token: Option<FenceToken>,
    cancel: CancellationToken,
}

impl Term {
    pub(crate) fn new(token: Option<FenceToken>) -> Self {
        Term {
            token,
            cancel: CancellationToken::new(),
        }
    }

    /// The term's fencing token (`Lease`; `None` under `Classic`): pass it to downstream
    /// systems so that they can reject a stale holder's writes.
    pub fn token(&self) -> Option<FenceToken> {
        self.token
    }

    /// The token cancelled when the term ends. Hand a child of it to the term's work.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the term has ended.
    pub fn is_over(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the term ends (at once if it has).
    pub async fn ended(&self) {
        self.cancel.cancelled().await;
    }

    pub(crate) fn end(&self) {
        self.cancel.cancel();
    }
}
