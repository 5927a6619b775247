//! The database model alone: the DbOp semantics of both protocols, sessions and NOTIFY order.

use std::time::Duration;

use pgiplock_core::{
    ChannelName, DbError, DbOp, FenceToken, Protocol, Reply, StaleHolder, TerminateOutcome, Timestamp,
};
use pgiplock_sim::db::{DbConfig, SimDb};

const TTL: Duration = Duration::from_secs(10);

fn acquire(db: &mut SimDb, s: pgiplock_core::SessionId, p: Protocol, ch: &ChannelName) -> pgiplock_core::AcquireReply {
    match db.execute(s, p, ch, TTL, &DbOp::Acquire) {
        Ok(Reply::Acquire(r)) => r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn classic_row_is_taken_over_only_when_no_session_has_the_owners_name() {
    let mut db = SimDb::new(DbConfig::default());
    let ch = ChannelName::new("jobs").unwrap();
    let (a, _) = db.open_session("a");
    let (b, _) = db.open_session("b");
    db.listen(b, ch.lock_channel()).unwrap();
    assert!(acquire(&mut db, a, Protocol::Classic, &ch).acquired);
    assert!(
        acquire(&mut db, a, Protocol::Classic, &ch).acquired,
        "own row counts as acquired"
    );
    assert!(!acquire(&mut db, b, Protocol::Classic, &ch).acquired);
    assert_eq!(db.classic_owner(ch.lock_channel()), Some("a"));
    // Another live session with the owner's name still blocks the takeover.
    let (a2, _) = db.open_session("a");
    db.close_session(a);
    assert!(!acquire(&mut db, b, Protocol::Classic, &ch).acquired);
    db.close_session(a2);
    assert!(acquire(&mut db, b, Protocol::Classic, &ch).acquired);
    assert_eq!(
        db.execute(
            b,
            Protocol::Classic,
            &ch,
            TTL,
            &DbOp::Renew {
                token: None,
                progress: None
            }
        ),
        Ok(Reply::Renew { owned: true })
    );
    // Release deletes and notifies '1' at commit, to every listener including the sender.
    let rel = db.execute(b, Protocol::Classic, &ch, TTL, &DbOp::Release { token: None });
    assert_eq!(rel, Ok(Reply::Release { released: true }));
    let notes = db.take_notifications(b);
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].payload, "1");
    assert_eq!(notes[0].channel, ch.lock_channel());
    let again = db.execute(b, Protocol::Classic, &ch, TTL, &DbOp::Release { token: None });
    assert_eq!(again, Ok(Reply::Release { released: false }));
    assert!(db.take_notifications(b).is_empty(), "no trigger without a deleted row");
}

#[test]
fn lease_tokens_rise_and_expiry_is_on_the_server_clock() {
    let mut db = SimDb::new(DbConfig::default());
    let ch = ChannelName::new("jobs").unwrap();
    let (a, pid_a) = db.open_session("a");
    let (b, _) = db.open_session("b");
    let r = acquire(&mut db, a, Protocol::Lease, &ch);
    assert_eq!((r.acquired, r.token), (true, Some(FenceToken(1))));
    db.advance_to(Timestamp::from_millis(4_000));
    let r = acquire(&mut db, b, Protocol::Lease, &ch);
    assert!(!r.acquired);
    assert_eq!(r.lease_remaining, Some(Duration::from_secs(6)));
    // Renew extends from the server's now.
    let renew = db.execute(
        a,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Renew {
            token: Some(FenceToken(1)),
            progress: None,
        },
    );
    assert_eq!(renew, Ok(Reply::Renew { owned: true }));
    let stale_renew = db.execute(
        a,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Renew {
            token: Some(FenceToken(0)),
            progress: None,
        },
    );
    assert_eq!(stale_renew, Ok(Reply::Renew { owned: false }));
    assert_eq!(
        db.lease_row("jobs").unwrap().expires_at,
        Some(Timestamp::from_millis(14_000))
    );
    // Expired while alive: taken over, the stale holder is named, the token rises.
    db.advance_to(Timestamp::from_millis(14_000));
    let r = acquire(&mut db, b, Protocol::Lease, &ch);
    assert_eq!(r.token, Some(FenceToken(2)));
    assert_eq!(
        r.stale_holder,
        Some(StaleHolder {
            pid: pid_a,
            app: "a".into()
        })
    );
    // The old term can neither renew nor release the new one.
    let old = db.execute(
        a,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Release {
            token: Some(FenceToken(1)),
        },
    );
    assert_eq!(old, Ok(Reply::Release { released: false }));
    // TerminateStale ends the old backend.
    let t = db.execute(
        b,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::TerminateStale {
            pid: pid_a,
            app: "a".into(),
        },
    );
    assert_eq!(t, Ok(Reply::Terminate(TerminateOutcome::Terminated)));
    assert!(!db.is_alive(a));
    assert_eq!(db.take_terminated(), vec![a]);
    let t = db.execute(
        b,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::TerminateStale {
            pid: pid_a,
            app: "a".into(),
        },
    );
    assert_eq!(t, Ok(Reply::Terminate(TerminateOutcome::Gone)));
    assert_eq!(
        db.execute(a, Protocol::Lease, &ch, TTL, &DbOp::Acquire),
        Err(DbError::SessionLost)
    );
    // Release clears the row but keeps the token: the next term is 3.
    let rel = db.execute(
        b,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Release {
            token: Some(FenceToken(2)),
        },
    );
    assert_eq!(rel, Ok(Reply::Release { released: true }));
    let (c, _) = db.open_session("c");
    assert_eq!(acquire(&mut db, c, Protocol::Lease, &ch).token, Some(FenceToken(3)));
}

#[test]
fn lease_is_free_at_once_when_the_holders_session_is_gone() {
    let mut db = SimDb::new(DbConfig::default());
    let ch = ChannelName::new("jobs").unwrap();
    let (a, _) = db.open_session("a");
    let (b, _) = db.open_session("b");
    assert!(acquire(&mut db, a, Protocol::Lease, &ch).acquired);
    db.close_session(a);
    let r = acquire(&mut db, b, Protocol::Lease, &ch);
    assert!(r.acquired);
    assert_eq!(r.stale_holder, None);
}

#[test]
fn terminate_not_permitted_is_reported() {
    let mut db = SimDb::new(DbConfig {
        terminate_permitted: false,
    });
    let ch = ChannelName::new("jobs").unwrap();
    let (a, pid_a) = db.open_session("a");
    let (b, _) = db.open_session("b");
    let t = db.execute(
        b,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::TerminateStale {
            pid: pid_a,
            app: "a".into(),
        },
    );
    assert_eq!(t, Ok(Reply::Terminate(TerminateOutcome::NotPermitted)));
    assert!(db.is_alive(a));
}

#[test]
fn notifications_arrive_in_commit_order_to_every_listener() {
    let mut db = SimDb::new(DbConfig::default());
    let ch = ChannelName::new("jobs").unwrap();
    let (a, _) = db.open_session("a");
    let (b, _) = db.open_session("b");
    let (publisher, _) = db.open_session("pub");
    for s in [a, b] {
        db.listen(s, "jobs").unwrap();
        db.listen(s, ch.lock_channel()).unwrap();
    }
    assert!(acquire(&mut db, a, Protocol::Lease, &ch).acquired);
    db.notify(publisher, "jobs", "1").unwrap();
    db.execute(
        a,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Drain {
            token: Some(FenceToken(1)),
        },
    )
    .unwrap();
    db.notify(publisher, "jobs", "2").unwrap();
    let expect = ["acquired:1", "1", "draining:1", "2"];
    for s in [a, b] {
        let got: Vec<String> = db.take_notifications(s).into_iter().map(|n| n.payload).collect();
        assert_eq!(got, expect);
    }
    assert_eq!(db.statements(), 4 + 1 + 2 + 1);
}

/// After a promotion (the model's `set_timeline`), tokens carry the new timeline in their high
/// bits, and a held row of the older timeline whose holder's session is not here is taken over
/// at its expiry but no later than one ttl after its first sighting, as the SQL does
/// (`io/tests/sql_semantics.rs` has the same case on a real server).
#[test]
fn lease_an_older_timeline_row_is_taken_over_one_ttl_after_its_first_sighting() {
    use pgiplock_sim::db::OldTimelineTakeover;
    let mut db = SimDb::new(DbConfig::default());
    let ch = ChannelName::new("jobs").unwrap();
    let (old, _) = db.open_session("old");
    let long = Duration::from_secs(3600);
    let Ok(Reply::Acquire(held)) = db.execute(old, Protocol::Lease, &ch, long, &DbOp::Acquire) else {
        panic!()
    };
    assert_eq!(held.token, Some(FenceToken(1)));
    db.close_session(old);
    db.set_timeline(2);
    let (new, _) = db.open_session("new");
    db.advance_to(Timestamp::from_micros(1_000_000));
    let first = acquire(&mut db, new, Protocol::Lease, &ch);
    assert!(!first.acquired);
    assert_eq!(first.lease_remaining, Some(TTL), "one ttl from the sighting");
    assert_eq!(
        db.lease_row("jobs").unwrap().seen,
        Some((1, Timestamp::from_micros(1_000_000)))
    );
    db.advance_to(Timestamp::from_micros(6_000_000));
    assert_eq!(
        acquire(&mut db, new, Protocol::Lease, &ch).lease_remaining,
        Some(Duration::from_secs(5)),
        "the sighting is not moved by later attempts"
    );
    db.set_old_timeline_takeover(OldTimelineTakeover::Expiry);
    db.advance_to(Timestamp::from_micros(11_000_000));
    assert!(!acquire(&mut db, new, Protocol::Lease, &ch).acquired, "'expiry' waits");
    db.set_old_timeline_takeover(OldTimelineTakeover::Capped);
    let won = acquire(&mut db, new, Protocol::Lease, &ch);
    assert!(won.acquired);
    let token = won.token.unwrap();
    assert_eq!(token.timeline(), 2);
    assert_eq!(token.counter(), 2);
    // A renewal clears the sighting; the new term is on this timeline and waits as any.
    let renewed = db.execute(
        new,
        Protocol::Lease,
        &ch,
        TTL,
        &DbOp::Renew {
            token: Some(token),
            progress: None,
        },
    );
    assert_eq!(renewed, Ok(Reply::Renew { owned: true }));
    assert_eq!(db.lease_row("jobs").unwrap().seen, None);
    // 'session_gone': at once.
    let other = ChannelName::new("other").unwrap();
    let (gone, _) = db.open_session("gone");
    assert!(matches!(
        db.execute(gone, Protocol::Lease, &other, long, &DbOp::Acquire),
        Ok(Reply::Acquire(r)) if r.acquired
    ));
    db.close_session(gone);
    db.set_timeline(3);
    db.set_old_timeline_takeover(OldTimelineTakeover::SessionGone);
    assert!(acquire(&mut db, new, Protocol::Lease, &other).acquired);
}
