//! Terms as scopes: each acquisition is a [`Term`] whose cancellation token ends with it, and a
//! lock's [`LockState`] as a watch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

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
    inner: Arc<TermInner>,
}

/// The end of a term, and its cancellation token made on first demand: a session may hold
/// thousands of terms whose token nobody asks for, and a token costs about 120 bytes.
#[derive(Debug, Default)]
struct TermInner {
    over: AtomicBool,
    cancel: OnceLock<CancellationToken>,
}

impl Term {
    pub(crate) fn new(token: Option<FenceToken>) -> Self {
        Term {
            token,
            inner: Arc::default(),
        }
    }

    /// The term's fencing token (`Lease`; `None` under `Classic`): pass it to downstream
    /// systems so that they can reject a stale holder's writes.
    pub fn token(&self) -> Option<FenceToken> {
        self.token
    }

    /// The token cancelled when the term ends. Hand a child of it to the term's work.
    pub fn cancellation(&self) -> &CancellationToken {
        let cancel = self.inner.cancel.get_or_init(CancellationToken::new);
        // A term that ended before its token was made hands out a cancelled one. `end` stores
        // `over` before it looks for a token, and this looks at `over` after the token exists:
        // one of the two sees the other, so the token is always cancelled once the term ends.
        if self.inner.over.load(Ordering::SeqCst) {
            cancel.cancel();
        }
        cancel
    }

    /// Whether the term has ended.
    pub fn is_over(&self) -> bool {
        self.inner.over.load(Ordering::SeqCst)
    }

    /// Completes when the term ends (at once if it has).
    pub async fn ended(&self) {
        self.cancellation().cancelled().await;
    }

    pub(crate) fn end(&self) {
        self.inner.over.store(true, Ordering::SeqCst);
        if let Some(cancel) = self.inner.cancel.get() {
            cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_asked_for_before_the_end_is_cancelled_by_it() {
        let term = Term::new(None);
        let token = term.cancellation().clone();
        let clone = term.clone();
        assert!(!term.is_over() && !token.is_cancelled());
        clone.end();
        assert!(term.is_over() && token.is_cancelled());
    }

    #[test]
    fn a_token_asked_for_after_the_end_comes_cancelled() {
        let term = Term::new(None);
        term.end();
        assert!(term.is_over());
        assert!(term.cancellation().is_cancelled());
        assert!(term.clone().cancellation().is_cancelled());
    }

    #[tokio::test]
    async fn ended_completes_for_a_term_ended_before_or_while_waiting() {
        let term = Term::new(None);
        let waiter = tokio::spawn({
            let term = term.clone();
            async move { term.ended().await }
        });
        term.end();
        waiter.await.expect("the waiter ends with the term");
        term.ended().await;
    }
}
