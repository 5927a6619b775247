//! Terms as scopes and state as a watch, against a real server with two sessions: a term's
//! cancellation token fires when the term ends (release, loss, supersession, session end),
//! before the other session reports `Acquired`.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockMessage, LockState, LostReason, PgIpLock, Protocol, Session, Subscription, Term};

/// Two sessions competing for one channel, and the admin connection.
struct Pair {
    _cleanup: SchemaGuard,
    schema: String,
    channel: String,
    sessions: [Session; 2],
    locks: [PgIpLock; 2],
    subs: [Subscription; 2],
}

impl Pair {
    async fn new(prefix: &str) -> Pair {
        let schema = unique(prefix);
        let channel = unique("Jobs");
        let sessions = [session().await, session().await];
        let locks = [
            sessions[0].lock(&channel, options(Protocol::Lease, &schema)).unwrap(),
            sessions[1].lock(&channel, options(Protocol::Lease, &schema)).unwrap(),
        ];
        let subs = [locks[0].subscribe(), locks[1].subscribe()];
        Pair {
            _cleanup: SchemaGuard::new(&schema),
            schema,
            channel,
            sessions,
            locks,
            subs,
        }
    }

    /// Starts both (the first one first, so that it is the holder) and returns the holder's
    /// term, as `next_term` reports it.
    async fn start(&mut self) -> Term {
        self.locks[0].init().await.unwrap();
        let term = tokio::time::timeout(WAIT, self.locks[0].next_term())
            .await
            .expect("no term")
            .expect("next_term");
        self.locks[1].init().await.unwrap();
        assert!(!term.is_over());
        assert_eq!(term.token(), self.locks[0].token());
        assert!(term.token().is_some());
        let current = self.locks[0].term().expect("a current term");
        assert_eq!(current.token(), term.token());
        term
    }

    /// Waits for the standby's `Acquired` and checks that the holder's term was over by then.
    async fn standby_takes_over(&mut self, term: &Term) {
        next_matching(&mut self.subs[1], "standby acquired", is_acquired).await;
        assert!(
            term.is_over(),
            "the old term's token was not cancelled before the other session acquired"
        );
        let new = self.locks[1].term().expect("the new holder's term");
        assert!(new.token() > term.token());
        assert!(!new.is_over());
    }

    async fn close(self) {
        for s in &self.sessions {
            s.close().await;
        }
    }
}

async fn ended_within(term: &Term) {
    tokio::time::timeout(WAIT, term.ended())
        .await
        .expect("the term did not end");
}

#[tokio::test]
async fn release_ends_the_term_before_the_standby_acquires() {
    let mut pair = Pair::new("t_term_rel").await;
    let term = pair.start().await;
    let mut state = pair.locks[0].state();
    assert!(state.borrow_and_update().is_holding());
    pair.locks[0].release().await.unwrap();
    assert!(term.is_over());
    assert!(pair.locks[0].term().is_none());
    pair.standby_takes_over(&term).await;
    pair.close().await;
}

#[tokio::test]
async fn closing_the_session_ends_the_term_before_the_standby_acquires() {
    let mut pair = Pair::new("t_term_close").await;
    let term = pair.start().await;
    let mut state = pair.locks[0].state();
    pair.sessions[0].close().await;
    assert!(term.is_over());
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == LockState::Stopped))
        .await
        .expect("not stopped")
        .expect("watch");
    pair.standby_takes_over(&term).await;
    pair.close().await;
}

#[tokio::test]
async fn an_aborted_session_ends_the_term_before_the_standby_acquires() {
    let mut pair = Pair::new("t_term_abort").await;
    let term = pair.start().await;
    pair.sessions[0].abort_task();
    ended_within(&term).await;
    pair.standby_takes_over(&term).await;
    let mut state = pair.locks[0].state();
    tokio::time::timeout(WAIT, state.wait_for(|s| *s == LockState::Stopped))
        .await
        .expect("not stopped")
        .expect("watch");
    assert!(matches!(
        pair.locks[0].next_term().await,
        Err(pgiplock::Error::SessionEnded { .. })
    ));
    pair.close().await;
}

#[tokio::test]
async fn a_terminated_backend_ends_the_term() {
    let mut pair = Pair::new("t_term_kill").await;
    let term = pair.start().await;
    let pid = pair.sessions[0].backend_pid().expect("connected");
    let admin = admin().await;
    let terminated: bool = admin
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    ended_within(&term).await;
    let lost = next_matching(&mut pair.subs[0], "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
    assert!(matches!(lost, LockMessage::Lost { .. }));
    // Whoever wins next, its term is a new one with a higher token.
    let mut a = pair.locks[0].state();
    let mut b = pair.locks[1].state();
    let next = tokio::time::timeout(WAIT, async {
        loop {
            a.borrow_and_update();
            b.borrow_and_update();
            for lock in &pair.locks {
                if let Some(t) = lock.term() {
                    return t;
                }
            }
            tokio::select! {
                _ = a.changed() => {}
                _ = b.changed() => {}
            }
        }
    })
    .await
    .expect("nobody acquired after the termination");
    assert!(next.token() > term.token());
    pair.close().await;
}

#[tokio::test]
async fn a_superseded_term_ends() {
    let mut pair = Pair::new("t_term_sup").await;
    let term = pair.start().await;
    // Another owner takes the row over behind the holder's back, with a higher token.
    let admin = admin().await;
    let table = format!("{}.lease", pgiplock_core::quote_ident(&pair.schema));
    admin
        .client
        .execute(
            &format!(
                "UPDATE {table} SET holder = 'someone-else', holder_pid = NULL, token = token + 1, \
                 expires_at = now() + interval '1 hour' WHERE channel = $1"
            ),
            &[&pair.channel],
        )
        .await
        .unwrap();
    ended_within(&term).await;
    let lost = next_matching(&mut pair.subs[0], "lost", |m| matches!(m, LockMessage::Lost { .. })).await;
    assert_eq!(
        lost,
        LockMessage::Lost {
            reason: LostReason::Superseded
        }
    );
    assert!(pair.locks[0].term().is_none());
    pair.close().await;
}

#[tokio::test]
async fn run_while_holding_drops_the_work_when_the_term_ends() {
    let mut pair = Pair::new("t_term_run").await;
    let term = pair.start().await;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let holder = pair.locks[0].clone();
    let run = tokio::spawn(async move {
        holder
            .run_while_holding(|term| async move {
                let _ = started_tx.send(term.token());
                std::future::pending::<()>().await;
            })
            .await
    });
    let token = tokio::time::timeout(WAIT, started)
        .await
        .expect("work not started")
        .unwrap();
    assert_eq!(token, term.token());
    pair.locks[0].release().await.unwrap();
    let outcome = tokio::time::timeout(WAIT, run)
        .await
        .expect("work not dropped")
        .unwrap();
    assert!(matches!(outcome, Ok(None)), "{outcome:?}");
    pair.standby_takes_over(&term).await;
    pair.close().await;
}

#[tokio::test]
async fn run_while_holding_releases_when_the_work_completes() {
    let mut pair = Pair::new("t_term_done").await;
    let term = pair.start().await;
    let outcome = tokio::time::timeout(
        WAIT,
        pair.locks[0].run_while_holding(|term| async move { term.token() }),
    )
    .await
    .expect("work not finished");
    assert_eq!(outcome.unwrap(), Some(term.token()));
    assert!(term.is_over());
    pair.standby_takes_over(&term).await;
    pair.close().await;
}

#[tokio::test]
async fn run_terms_runs_each_term_and_returns_when_the_lock_stops() {
    let mut pair = Pair::new("t_term_loop").await;
    let first = pair.start().await;
    let (tx, mut terms) = tokio::sync::mpsc::unbounded_channel();
    let holder = pair.locks[0].clone();
    let run = tokio::spawn(async move {
        holder
            .run_terms(move |term| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(term.token());
                    term.ended().await;
                }
            })
            .await
    });
    let seen = tokio::time::timeout(WAIT, terms.recv())
        .await
        .expect("no term")
        .unwrap();
    assert_eq!(seen, first.token());
    pair.locks[0].destroy().await.unwrap();
    let outcome = tokio::time::timeout(WAIT, run)
        .await
        .expect("run_terms did not return")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    pair.standby_takes_over(&first).await;
    pair.close().await;
}

#[tokio::test]
async fn a_late_watcher_sees_the_current_state_at_once() {
    let mut pair = Pair::new("t_term_watch").await;
    let term = pair.start().await;
    let state = pair.locks[0].state();
    assert_eq!(*state.borrow(), LockState::Holding { token: term.token() });
    let standby = pair.locks[1].state();
    assert_eq!(*standby.borrow(), LockState::Standby);
    pair.locks[0].release().await.unwrap();
    pair.standby_takes_over(&term).await;
    // A watcher created after the handover starts from it.
    let late = pair.locks[1].state();
    assert!(late.borrow().is_holding());
    assert!(!pair.locks[0].state().borrow().is_holding());
    let mut stopped = pair.locks[1].state();
    pair.locks[1].destroy().await.unwrap();
    tokio::time::timeout(WAIT, stopped.wait_for(|s| *s == LockState::Stopped))
        .await
        .expect("not stopped")
        .expect("watch");
    assert_eq!(*pair.locks[1].state().borrow(), LockState::Stopped);
    pair.close().await;
}

/// Whether `lock` acquires within `window` (a bounded observation: proving that something does
/// not happen takes a window longer than the retry interval).
async fn acquires_within(lock: &PgIpLock, window: Duration) -> bool {
    let mut state = lock.state();
    let acquired = tokio::time::timeout(window, state.wait_for(|s| s.is_holding()))
        .await
        .is_ok();
    acquired
}

/// Longer than the standbys' acquire interval (2 s) and their wake jitter.
const NO_ATTEMPT_WINDOW: Duration = Duration::from_millis(3_000);

#[tokio::test]
async fn a_stood_down_lock_does_not_acquire_again_until_it_competes() {
    let mut pair = Pair::new("t_stand_down").await;
    // Alone first: a plain release re-acquires within the interval; a stand-down does not.
    pair.locks[0].init().await.unwrap();
    let term = tokio::time::timeout(WAIT, pair.locks[0].next_term())
        .await
        .expect("no term")
        .unwrap();
    pair.locks[0].stand_down().await.unwrap();
    assert!(term.is_over());
    assert_eq!(*pair.locks[0].state().borrow(), LockState::StoodDown);
    let rows = pgiplock::lock_status(config(), Protocol::Lease, Some(&pair.schema))
        .await
        .unwrap();
    assert_eq!(rows.iter().find(|r| r.channel == pair.channel).unwrap().holder, None);
    assert!(
        !acquires_within(&pair.locks[0], NO_ATTEMPT_WINDOW).await,
        "a stood-down lock acquired"
    );
    // Competing again acquires.
    pair.locks[0].compete().await.unwrap();
    let second = tokio::time::timeout(WAIT, pair.locks[0].next_term())
        .await
        .expect("no term after compete")
        .unwrap();
    assert!(second.token() > term.token());

    // With a peer: standing down hands over, and when the peer goes the stood-down lock stays
    // out even though nobody holds the channel.
    pair.locks[1].init().await.unwrap();
    pair.locks[0].stand_down().await.unwrap();
    pair.standby_takes_over(&second).await;
    pair.locks[1].destroy().await.unwrap();
    assert!(
        !acquires_within(&pair.locks[0], NO_ATTEMPT_WINDOW).await,
        "a stood-down lock acquired"
    );
    assert_eq!(*pair.locks[0].state().borrow(), LockState::StoodDown);
    // It kept listening all along: competing again takes the free channel at once.
    pair.locks[0].compete().await.unwrap();
    assert!(acquires_within(&pair.locks[0], WAIT).await);
    assert!(pair.locks[0].state().borrow().is_holding());
    pair.close().await;
}
