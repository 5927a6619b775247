//! Fleets of locks on one channel against the simulator's database model: handover, crash,
//! expiry, fencing, split brain; as hand-written cases and as properties over generated faults.
//!
//! Two drivers, one database model ([`SimDb`]): the simulator's own [`pgiplock_sim::World`] for
//! generated scenarios of the faults it knows (stop, crash, cut, terminate, server restart), and
//! the stepped [`fleet::Fleet`] where a test needs an input at a chosen moment (release, attempt,
//! heal) or fixed latencies. Both check S2 (one believer, Lease), S3 (no delivery outside a
//! tenure) and S4 (tokens only rise) after every event.
//!
//! Property cases default to a few dozen each; set `PROPTEST_CASES` for more.

mod fleet;

use std::time::Duration;

use pgiplock_sim::{FaultKind, FaultSpec, Scenario, SimError};
use proptest::prelude::*;

use fleet::*;
use pgiplock_core::*;
use pgiplock_sim::db::{DbConfig, SimDb};

fn started(protocol: Protocol, n: usize, seed: u64) -> Fleet {
    started_on(protocol, n, seed, DbConfig::default())
}

fn started_on(protocol: Protocol, n: usize, seed: u64, db: DbConfig) -> Fleet {
    let mut w = Fleet::with_db(fast_config(protocol), n, seed, db);
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
    let mut w = Fleet::new(fast_config(Protocol::Lease), 1, 1);
    let t0 = w.now;
    w.input(0, Input::Start);
    assert_eq!(w.nodes[0].requests, vec![DbOp::Acquire]);
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders() == vec![0]));
    // request + reply latency, no waiting
    assert_eq!(w.now.saturating_duration_since(t0), Duration::from_millis(2));
}

/// Messages published throughout a graceful release reach exactly one process each.
fn lossless_handover(protocol: Protocol, n: usize, seed: u64, latency: Latency) {
    let mut w = Fleet::new(fast_config(protocol), n, seed);
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
        let mut w = Fleet::new(fast_config(protocol), 1, 9);
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
    let statements_before = w.db.statements();
    w.run_for(Duration::from_millis(50));
    assert!(w.db.statements() - statements_before < 20);
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
    let db = DbConfig {
        terminate_permitted: false,
    };
    let mut w = started_on(Protocol::Lease, 2, 8, db);
    let first = w.holders()[0];
    let second = 1 - first;
    w.cut(first);
    assert!(w.run_until(Duration::from_secs(10), |w| w.holders() == vec![second]));
    w.run_for(Duration::from_millis(10));
    let warnings = |w: &Fleet| {
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
    let row = w.db.lease_row(CHANNEL).expect("lease row");
    assert_eq!(row.token, *all.iter().max().unwrap());
}

#[test]
fn old_token_renew_and_release_change_nothing() {
    let mut db = SimDb::new(DbConfig::default());
    let channel = ChannelName::new(CHANNEL).unwrap();
    let (a, _) = db.open_session("app-a");
    db.listen(a, channel.lock_channel()).unwrap();
    let ttl = Duration::from_secs(2);
    let t = Timestamp::from_millis(1_000);
    db.advance_to(t);
    let run = |db: &mut SimDb, op: DbOp| db.execute(a, Protocol::Lease, &channel, ttl, &op);
    let reply = run(&mut db, DbOp::Acquire);
    assert!(matches!(
        reply,
        Ok(Reply::Acquire(AcquireReply {
            acquired: true,
            token: Some(FenceToken(1)),
            ..
        }))
    ));
    // Release and re-acquire: token 2.
    run(
        &mut db,
        DbOp::Release {
            token: Some(FenceToken(1)),
        },
    )
    .unwrap();
    let reply = run(&mut db, DbOp::Acquire);
    assert!(matches!(
        reply,
        Ok(Reply::Acquire(AcquireReply {
            token: Some(FenceToken(2)),
            ..
        }))
    ));
    db.take_notifications(a);
    let before = db.lease_row(CHANNEL).unwrap().clone();
    db.advance_to(t + Duration::from_secs(1));
    let old = Some(FenceToken(1));
    assert_eq!(
        run(&mut db, DbOp::Renew { token: old }),
        Ok(Reply::Renew { owned: false })
    );
    assert_eq!(
        run(&mut db, DbOp::Release { token: old }),
        Ok(Reply::Release { released: false })
    );
    assert!(db.take_notifications(a).is_empty());
    assert_eq!(db.lease_row(CHANNEL), Some(&before));
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
    let mut w = Fleet::new(config, 2, 17);
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
    let mut w = Fleet::new(fast_config(Protocol::Classic), 2, 19);
    w.start_all();
    assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
    let holder = w.holders()[0];
    w.cut(holder);
    w.run_for(Duration::from_secs(10));
    // Nobody holds: the row names a live session.
    assert!(w.holders().is_empty());
    assert!(w.db.classic_owner(w.channel.lock_channel()).is_some());
}

/// Found by `fleet_graceful_handover_is_exactly_once`: a message that reached the releasing
/// holder after its own drain marker but before the drain was confirmed was dropped, and lost
/// when that same process won the next term (the others dropped theirs on its `acquired`).
#[test]
fn message_after_own_drain_marker_is_kept_for_the_next_term() {
    let mut w = Fleet::new(fast_config(Protocol::Lease), 3, 4520312713436666002);
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
    let mut w = Fleet::new(fast_config(Protocol::Lease), 2, 0);
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
        let mut w = Fleet::new(config, 2, 23);
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

#[test]
fn deadlines_are_strictly_after_every_tick() {
    for seed in 0..20 {
        let mut w = Fleet::new(fast_config(Protocol::Lease), 3, seed);
        w.start_all();
        // Every lock's checker asserts the deadline after every input, ticks included.
        w.run_for(Duration::from_secs(5));
        let h = w.holders()[0];
        w.input(h, Input::Release);
        w.run_for(Duration::from_secs(5));
    }
}

// ----- properties: generated faults through the stepped fleet -----

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone)]
enum Fault {
    Wait(u64),
    Release(usize),
    Stop(usize),
    TryAcquire(usize),
    Crash(usize),
    Cut(usize),
    Heal(usize),
    Restart(usize),
    Publish(u8),
}

fn fault(graceful_only: bool) -> BoxedStrategy<Fault> {
    let node = 0usize..5;
    if graceful_only {
        prop_oneof![
            6 => (1u64..3_000).prop_map(Fault::Wait),
            2 => node.clone().prop_map(Fault::Release),
            1 => node.clone().prop_map(Fault::TryAcquire),
            4 => any::<u8>().prop_map(Fault::Publish),
        ]
        .boxed()
    } else {
        prop_oneof![
            6 => (1u64..3_000).prop_map(Fault::Wait),
            2 => node.clone().prop_map(Fault::Release),
            1 => node.clone().prop_map(Fault::Stop),
            1 => node.clone().prop_map(Fault::TryAcquire),
            1 => node.clone().prop_map(Fault::Crash),
            1 => node.clone().prop_map(Fault::Cut),
            1 => node.clone().prop_map(Fault::Heal),
            1 => node.clone().prop_map(Fault::Restart),
            3 => any::<u8>().prop_map(Fault::Publish),
        ]
        .boxed()
    }
}

fn latency() -> impl Strategy<Value = Latency> {
    (1u64..3_000, 1u64..3_000, 1u64..3_000, 1u64..20_000).prop_map(|(req, rep, notify, connect)| Latency {
        request: Duration::from_micros(req),
        reply: Duration::from_micros(rep),
        notify: Duration::from_micros(notify),
        connect: Duration::from_micros(connect),
    })
}

/// Runs a fleet through `faults`; the world checks S2 (when on), S3 and S4 after every step.
fn run_fleet(protocol: Protocol, n: usize, seed: u64, latency: Latency, faults: &[Fault]) -> Fleet {
    let config = fast_config(protocol);
    let mut w = Fleet::new(config.clone(), n, seed);
    w.latency = latency;
    w.start_all();
    let mut published = 0u64;
    for (i, f) in faults.iter().enumerate() {
        match *f {
            Fault::Wait(ms) => w.run_for(Duration::from_millis(ms)),
            Fault::Release(node) => w.input(node % n, Input::Release),
            Fault::Stop(node) => w.input(node % n, Input::Stop),
            Fault::TryAcquire(node) => w.input(node % n, Input::TryAcquire),
            Fault::Crash(node) => w.crash(node % n),
            Fault::Cut(node) => w.cut(node % n),
            Fault::Heal(node) => w.heal(node % n),
            Fault::Restart(node) => {
                if w.nodes[node % n].lock.is_none() {
                    w.restart(node % n, config.clone(), seed ^ i as u64);
                }
            }
            Fault::Publish(burst) => {
                // A burst of messages spread over a few milliseconds.
                for k in 0..u64::from(burst % 8) {
                    let at = w.now + Duration::from_micros(700 * k);
                    w.publish_at(at, &format!("m{published}"));
                    published += 1;
                }
            }
        }
    }
    w.run_for(Duration::from_secs(10));
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    /// S2 (one believer), S3, S4 under Lease with any faults; S3 and S4 under Classic.
    #[test]
    fn fleet_safety(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        faults in prop::collection::vec(fault(false), 1..40),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let w = run_fleet(protocol, n, seed, latency, &faults);
        // Delivered messages are a subset of the published ones, never invented, and none twice
        // (at most once across every fault here: crashes, cuts, stops, releases).
        let mut all = w.all_delivered();
        for p in &all {
            prop_assert!(w.published.contains(p));
        }
        let delivered = all.len();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), delivered, "duplicates");
        // Liveness (L2, L3): ten seconds after the last fault, a process that is alive, connected
        // and not stopped holds the lock. Under Classic only without silent cuts: a cut holder's
        // session blocks its row for as long as the server keeps it (the weakness Lease fixes).
        let cuts = faults.iter().any(|f| matches!(f, Fault::Cut(_)));
        let eligible: Vec<usize> = (0..n)
            .filter(|&i| !w.nodes[i].cut && w.nodes[i].lock.as_ref().is_some_and(|l| !l.state().stopping))
            .collect();
        if !eligible.is_empty() && (lease || !cuts) {
            let holders = w.holders();
            prop_assert_eq!(holders.len(), 1, "no holder among {:?}", eligible);
            prop_assert!(eligible.contains(&holders[0]));
        }
    }

    /// With graceful releases only and a holder in place before publishing starts, every message
    /// is delivered exactly once (lossless handover), whatever the latencies. (Under Classic
    /// without explicit `TryAcquire`s, see below.)
    #[test]
    fn fleet_graceful_handover_is_exactly_once(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        faults in prop::collection::vec(fault(true), 1..40),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let config = fast_config(protocol);
        let mut w = Fleet::new(config, n, seed);
        w.latency = latency;
        // Classic has no split brain without faults either.
        w.check_s2 = true;
        w.start_all();
        prop_assert!(w.run_until(Duration::from_secs(1), |w| w.holders().len() == 1));
        let mut published = 0u64;
        for f in &faults {
            match *f {
                Fault::Wait(ms) => w.run_for(Duration::from_millis(ms)),
                Fault::Release(node) => w.input(node % n, Input::Release),
                // Classic announces no new term, so a releaser keeps nothing for the next one
                // (at most once): a releaser that asks again at once may win and lose what
                // followed its marker. Without explicit attempts a standby always wins first.
                Fault::TryAcquire(node) if lease => w.input(node % n, Input::TryAcquire),
                Fault::Publish(burst) => {
                    for k in 0..u64::from(burst % 8) {
                        let at = w.now + Duration::from_micros(700 * k);
                        w.publish_at(at, &format!("m{published}"));
                        published += 1;
                    }
                }
                _ => {}
            }
        }
        w.run_for(Duration::from_secs(10));
        prop_assert_eq!(w.holders().len(), 1);
        let mut all = w.all_delivered();
        let delivered = all.len();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), delivered, "duplicates");
        prop_assert_eq!(delivered as u64, published, "lost messages");
    }
}

// ----- properties: generated scenarios through the simulator's World -----

fn fault_kind() -> impl Strategy<Value = FaultKind> {
    prop_oneof![
        3 => Just(FaultKind::Stop),
        3 => Just(FaultKind::Crash),
        2 => Just(FaultKind::Cut),
        2 => Just(FaultKind::Terminate),
        1 => Just(FaultKind::ServerRestart),
    ]
}

/// A short fleet with quick timings, a steady publisher and the given faults (all after the
/// warmup); what the drivers of both kinds check, the World checks after every event.
fn world_scenario(protocol: Protocol, processes: usize, net_delay_us: u64, query_us: u64) -> Scenario {
    Scenario {
        protocol,
        processes,
        duration: Duration::from_secs(150),
        warmup: Duration::from_secs(10),
        acquire_interval: Duration::from_secs(5),
        lease_ttl: Duration::from_secs(5),
        request_timeout: Duration::from_secs(2),
        publish_rate: 20.0,
        net_delay: Duration::from_micros(net_delay_us),
        query_min: Duration::from_micros(query_us),
        query_mean: Duration::from_micros(query_us * 3),
        query_max: Duration::from_micros(query_us * 20),
        fault_rates: pgiplock_sim::FaultRates::default(),
        restart_delay: Some(Duration::from_secs(5)),
        cut_duration: Duration::from_secs(20),
        server_down: Duration::from_secs(3),
        ..Scenario::default()
    }
}

fn run_world(scenario: &Scenario, seed: u64) -> Result<pgiplock_sim::Report, TestCaseError> {
    pgiplock_sim::run(scenario, seed).map_err(|e: SimError| {
        TestCaseError::fail(format!(
            "seed {seed}: {e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
            scenario.to_cli_args()
        ))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]

    /// Any faults the simulator knows: every checker of the World holds after every event (S1,
    /// S2 under Lease, S3, S4, liveness after the last fault), and no message is delivered twice
    /// unless two processes believed at once (Classic's split brain, which S2 does not forbid).
    #[test]
    fn world_fleet_safety_and_liveness(
        lease in any::<bool>(),
        processes in 2usize..=5,
        seed in any::<u64>(),
        net_delay_us in 10u64..3_000,
        query_us in 50u64..2_000,
        faults in prop::collection::vec((10u64..130, fault_kind(), prop::option::of(0usize..5)), 1..12),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let mut s = world_scenario(protocol, processes, net_delay_us, query_us);
        s.faults = faults
            .iter()
            .map(|&(at, kind, process)| FaultSpec {
                at: Duration::from_secs(at),
                kind,
                process: process.map(|p| p % processes),
            })
            .collect();
        let r = run_world(&s, seed)?;
        prop_assert!(r.duplicates == 0 || r.split_brain_s > 0.0, "duplicates without split brain: {}", r.table());
    }

    /// Graceful stops of the holder only, spaced wider than a restart: every message is
    /// delivered exactly once and every stop is a failover.
    #[test]
    fn world_graceful_stops_are_exactly_once(
        lease in any::<bool>(),
        processes in 2usize..=5,
        seed in any::<u64>(),
        net_delay_us in 10u64..3_000,
        query_us in 50u64..2_000,
        gaps in prop::collection::vec(10u64..30, 1..5),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let mut s = world_scenario(protocol, processes, net_delay_us, query_us);
        let mut at = 10;
        for gap in &gaps {
            at += gap;
            s.faults.push(FaultSpec { at: Duration::from_secs(at), kind: FaultKind::Stop, process: None });
        }
        let r = run_world(&s, seed)?;
        prop_assert_eq!(r.lost_messages, 0, "lost: {}", r.table());
        prop_assert_eq!(r.duplicates, 0, "duplicates: {}", r.table());
        let stops = r.failover.get(FaultKind::Stop.as_str()).map_or(0, |l| l.count);
        prop_assert_eq!(stops, gaps.len(), "failovers: {}", r.table());
    }
}
