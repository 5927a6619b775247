//! Several locks against the in-memory database: handover, crash, expiry, fencing.

mod harness;

use std::time::Duration;

use harness::*;
use pgiplock_core::*;

fn started(protocol: Protocol, n: usize, seed: u64) -> World {
    let mut w = World::new(fast_config(protocol), n, seed);
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    w
}

#[test]
fn exactly_one_holder_among_n() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        for n in 2..=5 {
            let mut w = started(protocol, n, n as u64);
            // Stays so for many renewal periods.
            for _ in 0..100 {
                w.run_for(Duration::from_millis(100));
                assert_eq!(w.holders().len(), 1, "{protocol:?} n={n}");
            }
            let acquired: usize = w
                .nodes
                .iter()
                .map(|n| {
                    n.events
                        .iter()
                        .filter(|e| matches!(e, LockEvent::Acquired { .. }))
                        .count()
                })
                .sum();
            assert_eq!(acquired, 1, "{protocol:?} n={n}: one acquisition, no flapping");
        }
    }
}

#[test]
fn start_attempts_at_once() {
    let mut w = World::new(fast_config(Protocol::Lease), 1, 1);
    let t0 = w.now;
    w.input(0, Input::Start);
    assert_eq!(w.nodes[0].requests, vec![DbOp::Acquire]);
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders() == vec![0]));
    // request + reply latency, no waiting
    assert_eq!(w.now.saturating_duration_since(t0), Duration::from_millis(2));
}

/// Messages published throughout a graceful release reach exactly one process each.
fn lossless_handover(protocol: Protocol, n: usize, seed: u64, latency: Latency) {
    let mut w = World::new(fast_config(protocol), n, seed);
    w.latency = latency;
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    let holder = w.holders()[0];
    // A message every 500 µs for 400 ms, with the release in the middle.
    let start = w.now;
    for i in 0..800u64 {
        w.publish_at(start + Duration::from_micros(500 * i), &format!("m{i}"));
    }
    w.run_for(Duration::from_millis(100));
    w.input(holder, Input::Release);
    w.run_for(Duration::from_millis(500));
    let holders = w.holders();
    assert_eq!(holders.len(), 1, "{protocol:?}: someone took over");
    let mut all = w.all_delivered();
    assert_eq!(all.len(), 800, "{protocol:?}: lost or duplicated messages");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 800, "{protocol:?}: duplicates");
    // Each process delivered in publication order.
    for node in &w.nodes {
        let idx: Vec<u64> = node.delivered.iter().map(|p| p[1..].parse().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "{protocol:?}: out of order");
    }
    assert!(w.nodes[holder].events.contains(&LockEvent::Released));
    for (i, node) in w.nodes.iter().enumerate() {
        if i != holder {
            assert!(node.events.contains(&LockEvent::PeerReleased));
        }
    }
    // The releaser's own marker did not wake it.
    assert!(!w.nodes[holder].events.contains(&LockEvent::PeerReleased));
}

#[test]
fn graceful_handover_loses_and_duplicates_nothing() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        for n in 2..=5 {
            for seed in 0..5 {
                lossless_handover(protocol, n, seed, Latency::default());
            }
        }
    }
}

#[test]
fn graceful_handover_with_slow_notifications() {
    // Notifications slower than replies: a node's own `acquired`/`released` markers arrive after
    // the replies; and faster: before them.
    for notify in [Duration::from_micros(100), Duration::from_millis(3)] {
        let latency = Latency {
            notify,
            ..Latency::default()
        };
        for protocol in [Protocol::Lease, Protocol::Classic] {
            for seed in 0..5 {
                lossless_handover(protocol, 3, seed, latency);
            }
        }
    }
}

#[test]
fn single_process_release_and_reacquire() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut w = World::new(fast_config(protocol), 1, 9);
        w.start_all();
        assert!(w.run_until(Duration::from_secs(1), |w| w.holders() == vec![0]));
        let start = w.now;
        for i in 0..200u64 {
            w.publish_at(start + Duration::from_millis(10 * i), &format!("m{i}"));
        }
        w.run_for(Duration::from_millis(50));
        w.input(0, Input::Release);
        w.run_for(Duration::from_secs(5));
        assert_eq!(w.holders(), vec![0], "{protocol:?}: re-acquired after a full interval");
        let mut all = w.all_delivered();
        let delivered = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), delivered, "{protocol:?}: no duplicates");
        match protocol {
            // Lease: what came after its own drain marker is delivered when it wins again.
            Protocol::Lease => assert_eq!(delivered, 200),
            // Classic announces no new term, so the releaser keeps nothing (at most once).
            _ => assert!(delivered < 200),
        }
    }
}

#[test]
fn release_wakes_standbys_within_wake_jitter() {
    let mut w = started(Protocol::Lease, 4, 3);
    let holder = w.holders()[0];
    w.input(holder, Input::Release);
    let t0 = w.now;
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1
        && w.holders()[0] != holder));
    // drain + marker + release + notification + jitter (<= 10 ms) + acquisition: far below an
    // acquire interval.
    assert!(w.now.saturating_duration_since(t0) < Duration::from_millis(30));
    // Herd-free: the first winner's `acquired` cancels the others' wakes; those that already
    // attempted lost. Fewer acquisitions than standbys after the release.
    let statements_before = w.db.statements;
    w.run_for(Duration::from_millis(50));
    assert!(w.db.statements - statements_before < 20);
}

#[test]
fn crash_takeover_classic_and_lease() {
    for protocol in [Protocol::Classic, Protocol::Lease] {
        let mut w = started(protocol, 3, 5);
        let holder = w.holders()[0];
        w.crash(holder);
        let t0 = w.now;
        assert!(
            w.run_until(Duration::from_secs(10), |w| w.holders().len() == 1),
            "{protocol:?}"
        );
        let took = w.now.saturating_duration_since(t0);
        // Within the standby retry bound (acquire_interval), plus the attempt itself.
        assert!(took <= Duration::from_millis(3_010), "{protocol:?}: {took:?}");
        assert!(!w.holders().contains(&holder));
    }
}

#[test]
fn lease_expiry_takeover_terminates_stale_holder() {
    let mut w = started(Protocol::Lease, 2, 7);
    w.db.terminate_not_permitted = false;
    let holder = w.holders()[0];
    let standby = 1 - holder;
    w.cut(holder);
    let t0 = w.now;
    assert!(w.run_until(Duration::from_secs(10), |w| w.holders() == vec![standby]));
    let took = w.now.saturating_duration_since(t0);
    // ttl (2 s) plus at most the lease_remaining retry: about ttl.
    assert!(took <= Duration::from_millis(2_100), "{took:?}");
    // The stale holder fenced itself before anyone took over (S2 checked at every step).
    assert!(w.nodes[holder].events.iter().any(|e| matches!(
        e,
        LockEvent::Lost {
            reason: LostReason::LeaseExpired | LostReason::RequestTimeout
        }
    )));
    assert!(w.nodes[standby]
        .requests
        .iter()
        .any(|op| matches!(op, DbOp::TerminateStale { .. })));
    assert!(!w.nodes[standby]
        .events
        .iter()
        .any(|e| matches!(e, LockEvent::Warning(Warning::TerminateNotPermitted { .. }))));
}

#[test]
fn terminate_not_permitted_is_warned_once() {
    let mut w = started(Protocol::Lease, 2, 8);
    w.db.terminate_not_permitted = true;
    let first = w.holders()[0];
    let second = 1 - first;
    w.cut(first);
    assert!(w.run_until(Duration::from_secs(10), |w| w.holders() == vec![second]));
    w.run_for(Duration::from_millis(10));
    let warnings = |w: &World| {
        w.nodes[second]
            .events
            .iter()
            .filter(|e| matches!(e, LockEvent::Warning(Warning::TerminateNotPermitted { .. })))
            .count()
    };
    assert_eq!(warnings(&w), 1);
    // The takeover proceeded all the same. Now back and forth: each lock warns once at most,
    // however often it takes over from a live holder it may not terminate.
    let mut holder = second;
    for _ in 0..4 {
        let other = 1 - holder;
        w.heal(other);
        assert!(w.run_until(Duration::from_secs(1), |w| w.lock(other).state().session.is_some()));
        w.cut(holder);
        assert!(w.run_until(Duration::from_secs(10), |w| w.holders() == vec![other]));
        w.run_for(Duration::from_millis(10));
        holder = other;
    }
    for node in &w.nodes {
        let count = node
            .events
            .iter()
            .filter(|e| matches!(e, LockEvent::Warning(Warning::TerminateNotPermitted { .. })))
            .count();
        assert_eq!(count, 1);
    }
}

#[test]
fn tokens_strictly_increase_across_terms() {
    let mut w = started(Protocol::Lease, 3, 11);
    for round in 0..12 {
        let holder = w.holders()[0];
        match round % 3 {
            0 => w.input(holder, Input::Release),
            1 => w.crash(holder),
            _ => w.cut(holder),
        }
        assert!(w.run_until(Duration::from_secs(10), |w| w.holders().len() == 1
            && w.holders()[0] != holder));
        if round % 3 != 0 {
            // Replace the dead process so that there is always a standby.
            w.restart(holder, fast_config(Protocol::Lease), round);
        }
    }
    // The world's checker asserted global strict increase at every Acquired; the row agrees.
    let all: Vec<u64> = (0..w.nodes.len())
        .flat_map(|i| w.tokens(i))
        .flatten()
        .map(|t| t.0)
        .collect();
    assert!(all.len() >= 13);
    let row = &w.db.lease[CHANNEL];
    assert_eq!(row.token, *all.iter().max().unwrap());
}

#[test]
fn old_token_renew_and_release_change_nothing() {
    let mut db = Db::default();
    let channel = ChannelName::new(CHANNEL).unwrap();
    let a = db.connect(&channel);
    let ttl = Duration::from_secs(2);
    let t = Timestamp::from_millis(1_000);
    let c = db.execute(t, a, &channel, Protocol::Lease, ttl, &DbOp::Acquire);
    assert!(matches!(
        c.reply,
        Ok(Reply::Acquire(AcquireReply {
            acquired: true,
            token: Some(FenceToken(1)),
            ..
        }))
    ));
    // Release and re-acquire: token 2.
    db.execute(
        t,
        a,
        &channel,
        Protocol::Lease,
        ttl,
        &DbOp::Release {
            token: Some(FenceToken(1)),
        },
    );
    let c = db.execute(t, a, &channel, Protocol::Lease, ttl, &DbOp::Acquire);
    assert!(matches!(
        c.reply,
        Ok(Reply::Acquire(AcquireReply {
            token: Some(FenceToken(2)),
            ..
        }))
    ));
    let before = db.lease[CHANNEL].clone();
    let later = t + Duration::from_secs(1);
    let c = db.execute(
        later,
        a,
        &channel,
        Protocol::Lease,
        ttl,
        &DbOp::Renew {
            token: Some(FenceToken(1)),
        },
    );
    assert_eq!(c.reply, Ok(Reply::Renew { owned: false }));
    let c = db.execute(
        later,
        a,
        &channel,
        Protocol::Lease,
        ttl,
        &DbOp::Release {
            token: Some(FenceToken(1)),
        },
    );
    assert_eq!(c.reply, Ok(Reply::Release { released: false }));
    assert!(c.notifications.is_empty());
    let after = &db.lease[CHANNEL];
    assert_eq!(
        (after.token, after.expires_at, &after.holder),
        (before.token, before.expires_at, &before.holder)
    );

    // And a lock whose renewal comes back "not owned" reports Superseded.
    let mut lock = Lock::new(channel.clone(), fast_config(Protocol::Lease), 1);
    lock.handle_input(t, Input::SessionUp(SessionId(1)));
    lock.handle_input(t, Input::Start);
    let req = request(&drain(&mut lock));
    let reply = AcquireReply {
        acquired: true,
        token: Some(FenceToken(3)),
        lease_remaining: None,
        stale_holder: None,
    };
    lock.handle_input(
        t,
        Input::DbResult {
            id: req.id,
            result: Ok(Reply::Acquire(reply)),
        },
    );
    drain(&mut lock);
    let (at, kind) = lock.poll_timeout().unwrap();
    assert_eq!(kind, TimerKind::Renew);
    lock.handle_input(at, Input::Tick);
    let req = request(&drain(&mut lock));
    assert_eq!(
        req.op,
        DbOp::Renew {
            token: Some(FenceToken(3))
        }
    );
    lock.handle_input(
        at,
        Input::DbResult {
            id: req.id,
            result: Ok(Reply::Renew { owned: false }),
        },
    );
    assert_eq!(
        events(&drain(&mut lock)),
        vec![LockEvent::Lost {
            reason: LostReason::Superseded
        }]
    );
}

#[test]
fn stop_releases_and_reports_stopped() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut w = started(protocol, 3, 13);
        let holder = w.holders()[0];
        let standby = (holder + 1) % 3;
        // Let the standbys' first attempts come back (a stop waits for an attempt in flight).
        w.run_for(Duration::from_millis(10));
        w.input(holder, Input::Signal(SignalKind::Terminate));
        w.input(standby, Input::Stop);
        assert_eq!(
            w.nodes[standby].events.last(),
            Some(&LockEvent::Stopped { released: true })
        );
        w.run_for(Duration::from_millis(100));
        let ev = &w.nodes[holder].events;
        let released = ev.iter().position(|e| e == &LockEvent::Released).expect("released");
        let stopped = ev
            .iter()
            .position(|e| e == &LockEvent::Stopped { released: true })
            .expect("stopped");
        assert!(released < stopped);
        // The remaining process took over.
        let rest = (holder + 2) % 3;
        assert_eq!(w.holders(), vec![rest], "{protocol:?}");
    }
}

#[test]
fn stop_is_bounded_when_the_database_does_not_answer() {
    let mut config = fast_config(Protocol::Lease);
    config.request_timeout = Duration::from_secs(5);
    let mut w = World::new(config, 2, 17);
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    let holder = w.holders()[0];
    w.cut(holder);
    let t0 = w.now;
    w.input(holder, Input::Stop);
    assert!(w.run_until(Duration::from_secs(5), |w| w.nodes[holder]
        .events
        .iter()
        .any(|e| matches!(e, LockEvent::Stopped { .. }))));
    assert_eq!(w.now.saturating_duration_since(t0), Duration::from_secs(1));
    let ev = &w.nodes[holder].events;
    assert_eq!(
        &ev[ev.len() - 2..],
        &[
            LockEvent::Lost {
                reason: LostReason::ReleaseUnconfirmed
            },
            LockEvent::Stopped { released: false }
        ]
    );
}

#[test]
fn classic_cut_holder_blocks_takeover() {
    // The Classic protocol's weakness: a silently cut holder's session stays alive on the server,
    // so nobody can take over (the holder itself steps down when its check times out).
    let mut w = World::new(fast_config(Protocol::Classic), 2, 19);
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    let holder = w.holders()[0];
    w.cut(holder);
    w.run_for(Duration::from_secs(10));
    // Nobody holds: the row names a live session.
    assert!(w.holders().is_empty());
    assert!(w.db.classic.contains_key(w.channel.lock_channel()));
}

/// Found by `fleet_graceful_handover_is_exactly_once`: a message that reached the releasing
/// holder after its own drain marker but before the drain was confirmed was dropped, and lost
/// when that same process won the next term (the others dropped theirs on its `acquired`).
#[test]
fn message_after_own_drain_marker_is_kept_for_the_next_term() {
    let mut w = World::new(fast_config(Protocol::Lease), 3, 4520312713436666002);
    w.latency = Latency {
        request: Duration::from_micros(12),
        reply: Duration::from_micros(2964),
        notify: Duration::from_micros(1092),
        connect: Duration::from_micros(1),
    };
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    let holder = w.holders()[0];
    w.run_for(Duration::from_millis(100));
    w.trace = Some(Vec::new());
    w.input(holder, Input::Release);
    w.publish_at(w.now, "m0");
    w.publish_at(w.now + Duration::from_micros(700), "m1");
    w.run_for(Duration::from_millis(6));
    // The releaser asks again at once and wins the next term.
    w.input(holder, Input::TryAcquire);
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.holders(), vec![holder]);
    let mut all = w.all_delivered();
    all.sort();
    assert_eq!(all, vec!["m0", "m1"], "{:#?}", w.trace);
}

/// Found by `fleet_safety`: a holder cut off and then crashed leaves a live session on the
/// server; the standby takes over once the lease expires and terminates the stale backend.
#[test]
fn cut_then_crashed_holder_is_taken_over_after_the_lease() {
    let mut w = World::new(fast_config(Protocol::Lease), 2, 0);
    w.latency = Latency {
        request: Duration::from_micros(1),
        reply: Duration::from_micros(1),
        notify: Duration::from_micros(1),
        connect: Duration::from_micros(1),
    };
    w.start_all();
    // Node 0's acquisition is already on its way when its network goes and the process dies.
    w.cut(0);
    w.crash(0);
    assert!(w.run_until(Duration::from_secs(5), |w| w.holders() == vec![1]));
    assert!(w.nodes[1]
        .requests
        .iter()
        .any(|op| matches!(op, DbOp::TerminateStale { .. })));
}

/// The server drops a holder's session while the holder's side stays half-open (what its TCP
/// stack does after keepalive gives up). Classic: the row's owner is gone from
/// `pg_stat_activity`, a standby takes over at its next retry, while the old holder believes it
/// holds until its next ownership check fails: two believers (S2 broken). Lease, same fault: the
/// old holder fences itself before its lease expires, so there is never a second believer.
#[test]
fn server_dropped_holder_classic_split_brain_lease_none() {
    for protocol in [Protocol::Classic, Protocol::Lease] {
        let mut config = fast_config(protocol);
        config.acquire_interval = Duration::from_secs(3);
        if protocol == Protocol::Classic {
            config.renew_interval = Duration::from_secs(30);
        }
        let mut w = World::new(config, 2, 23);
        w.check_s2 = false;
        w.start_all();
        assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
        let holder = w.holders()[0];
        w.server_drop(holder);
        let mut overlap = Duration::ZERO;
        let end = w.now + Duration::from_secs(40);
        let mut last = w.now;
        loop {
            let two = w.holders().len() > 1;
            if w.now >= end || !w.step() {
                break;
            }
            if two {
                overlap += w.now.saturating_duration_since(last);
            }
            last = w.now;
        }
        match protocol {
            Protocol::Classic => assert!(overlap > Duration::from_secs(10), "{overlap:?}"),
            _ => assert_eq!(overlap, Duration::ZERO),
        }
        assert_eq!(
            w.holders(),
            vec![1 - holder],
            "{protocol:?}: the standby holds in the end"
        );
    }
}
