//! Fleets of locks on one channel, run on the simulator's own event loop ([`World`]): handover,
//! crash, expiry, fencing, split brain; as hand-written cases and as properties over generated
//! faults and actions.
//!
//! Every process drives the core `Session` as the `io` crate does, against the database model
//! ([`pgiplock_sim::db::SimDb`]). A case picks its moments with the scenario's actions (a
//! graceful release or an attempt through the session, a cut until a heal, a start) and faults,
//! added up front or, after [`World::run_until`], from what it saw so far; latencies are fixed by
//! setting `query_min = query_mean = query_max`. The World checks S1, S2 (Lease), S3, S4, the
//! phase bounds, the deadlines and liveness after every event; the cases read each process's
//! log ([`World::record`]) for the rest: the tenures its lock announced, S2 under Classic too,
//! what it delivered, what it asked the server.
//!
//! Property cases default to a few dozen each; set `PROPTEST_CASES` for more.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use pgiplock_core::*;
use pgiplock_sim::db::{DbConfig, SimDb};
use pgiplock_sim::{Action, ActionSpec, FaultKind, FaultRates, FaultSpec, Observed, Report, Scenario, SimError, World};
use proptest::prelude::*;

// ----- the fleet and its log -----

/// Short timings (a 2 s lease, 3 s retries, 1 s request timeout), no drawn faults, no restarts,
/// no clock drift, fixed latencies: 1 ms each way on the network, statements instantaneous.
/// Publishing (when on) starts at the 2 s warmup.
fn fleet(protocol: Protocol, processes: usize, duration: Duration) -> Scenario {
    Scenario {
        protocol,
        processes,
        duration,
        warmup: Duration::from_secs(2),
        acquire_interval: Duration::from_secs(3),
        lease_ttl: Duration::from_secs(2),
        renew_interval: Some(match protocol {
            Protocol::Lease => Duration::from_millis(400),
            Protocol::Classic => Duration::from_secs(1),
        }),
        fence_margin: Some(Duration::from_millis(300)),
        request_timeout: Duration::from_secs(1),
        publish_rate: 0.0,
        net_delay: Duration::from_millis(1),
        query_min: Duration::ZERO,
        query_mean: Duration::ZERO,
        query_max: Duration::ZERO,
        drift: 0.0,
        fault_rates: FaultRates::default(),
        restart_delay: None,
        ..Scenario::default()
    }
}

/// A world for `scenario` that keeps every process's log.
fn world(scenario: Scenario, seed: u64) -> World {
    let mut w = World::new(scenario, seed).expect("valid scenario");
    w.record();
    w
}

/// Panics with the seed and a reproduction command on a checker failure.
fn ok<T>(w: &World, result: Result<T, SimError>) -> T {
    result.unwrap_or_else(|e| {
        panic!(
            "seed {}: {e}\nreproduce with: pgiplock-sim run --seed {} {}",
            w.seed(),
            w.seed(),
            w.scenario().to_cli_args()
        )
    })
}

/// Runs the world to `at` (from the start).
fn run_until(w: &mut World, at: Duration) {
    let result = w.run_until(at);
    ok(w, result);
}

/// Runs the world to its end; its log is checked for well-formed tenures.
fn finish(w: &mut World) -> Report {
    let result = w.finish();
    let report = ok(w, result);
    check_tenures(w);
    report
}

/// A publishing rate the publisher keeps up with (its statements take `query_mean_us` each),
/// at most `rate`: a backlog would commit messages after the end.
fn sustainable(rate: f64, query_mean_us: u64) -> f64 {
    rate.min(500_000.0 / query_mean_us.max(1) as f64)
}

/// Runs `scenario` to its end.
fn run(scenario: Scenario, seed: u64) -> (World, Report) {
    let mut w = world(scenario, seed);
    let report = finish(&mut w);
    (w, report)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn at(t: Timestamp) -> Duration {
    Duration::from_micros(t.as_micros())
}

fn action(at: Duration, action: Action, process: Option<usize>) -> ActionSpec {
    ActionSpec { at, action, process }
}

fn fault(at: Duration, kind: FaultKind, process: Option<usize>) -> FaultSpec {
    FaultSpec { at, kind, process }
}

/// Process `p`'s lock events on the data channel, with their times.
fn events(w: &World, p: usize) -> Vec<(Timestamp, LockEvent)> {
    w.observations()
        .iter()
        .filter(|o| o.process == p)
        .filter_map(|o| match &o.event {
            Observed::Lock { lock: 0, event } => Some((o.at, event.clone())),
            _ => None,
        })
        .collect()
}

fn has(w: &World, p: usize, pred: impl Fn(&LockEvent) -> bool) -> bool {
    events(w, p).iter().any(|(_, e)| pred(e))
}

/// Every `Acquired` on the data channel: time, process, token.
fn acquisitions(w: &World) -> Vec<(Timestamp, usize, Option<FenceToken>)> {
    w.observations()
        .iter()
        .filter_map(|o| match &o.event {
            Observed::Lock {
                lock: 0,
                event: LockEvent::Acquired { token },
            } => Some((o.at, o.process, *token)),
            _ => None,
        })
        .collect()
}

/// The first acquisition after `t`.
fn first_acquisition_after(w: &World, t: Timestamp) -> Option<(Timestamp, usize)> {
    acquisitions(w)
        .into_iter()
        .find(|(a, _, _)| *a > t)
        .map(|(a, p, _)| (a, p))
}

/// The lock operations process `p`'s session sent, with their times.
fn lock_ops(w: &World, p: usize) -> Vec<(Timestamp, DbOp)> {
    w.observations()
        .iter()
        .filter(|o| o.process == p)
        .filter_map(|o| match &o.event {
            Observed::Request(SessionOp::Lock { op, .. }) => Some((o.at, op.clone())),
            _ => None,
        })
        .collect()
}

/// The message ids process `p` delivered, in order.
fn delivered(w: &World, p: usize) -> Vec<u64> {
    w.observations()
        .iter()
        .filter(|o| o.process == p)
        .filter_map(|o| match &o.event {
            Observed::Delivered { lock: 0, payload, .. } => Some(payload.parse().expect("the publisher's ids")),
            _ => None,
        })
        .collect()
}

/// Exactly once: every published message delivered, none twice, none invented, each process in
/// publication order.
fn assert_exactly_once(w: &World, r: &Report, what: &str) {
    assert!(r.published > 0, "{what}: nothing published");
    assert_eq!(r.lost_messages, 0, "{what}: lost messages\n{}", r.table());
    assert_eq!(r.duplicates, 0, "{what}: duplicates\n{}", r.table());
    assert_no_invention_and_in_order(w, r, what);
}

fn assert_no_invention_and_in_order(w: &World, r: &Report, what: &str) {
    for p in 0..w.scenario().processes {
        let ids = delivered(w, p);
        assert!(ids.iter().all(|id| *id < r.published), "{what}: invented messages");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{what}: process {p} out of order");
    }
}

/// How long two or more processes' locks believed at once (from the tenures their events
/// announced); and when that first happened.
fn overlap(w: &World) -> (Duration, Option<Timestamp>) {
    let mut believers = BTreeSet::new();
    let mut total = Duration::ZERO;
    let mut first = None;
    let mut last = Timestamp::ZERO;
    for o in w.observations() {
        if believers.len() >= 2 {
            total += o.at.saturating_duration_since(last);
        }
        last = o.at;
        match &o.event {
            Observed::Lock {
                lock: 0,
                event: LockEvent::Acquired { .. },
            } => {
                believers.insert(o.process);
                if believers.len() >= 2 {
                    first.get_or_insert(o.at);
                }
            }
            Observed::Lock {
                lock: 0,
                event: LockEvent::Lost { .. } | LockEvent::Drained | LockEvent::Stopped { .. },
            }
            | Observed::Ended => {
                believers.remove(&o.process);
            }
            _ => {}
        }
    }
    if believers.len() >= 2 {
        total += w.now().saturating_duration_since(last);
    }
    (total, first)
}

/// S2 from the events, for either protocol: never two believers at once.
fn assert_one_believer(w: &World, what: &str) {
    let (total, first) = overlap(w);
    assert_eq!(total, Duration::ZERO, "{what}: two believers from {first:?}");
}

/// The tenures each incarnation's lock announced are well formed: `Acquired` only outside a
/// tenure, `Lost` and `Drained` only inside one, a `Drained` followed by exactly one `Released`
/// or `ReleaseFailed` before anything else ends, deliveries only inside a tenure, `Stopped`
/// once and never while holding, nothing acquired after it.
fn check_tenures(w: &World) {
    #[derive(Default)]
    struct Tenure {
        holding: bool,
        draining: bool,
        stopped: bool,
    }
    let mut state: Vec<Tenure> = (0..w.scenario().processes).map(|_| Tenure::default()).collect();
    for o in w.observations() {
        let t = &mut state[o.process];
        let fail = |why: &str| panic!("process {} at {:?}: {why} ({:?})", o.process, o.at, o.event);
        match &o.event {
            Observed::Started | Observed::Ended => *t = Tenure::default(),
            Observed::Delivered { lock: 0, .. } if !t.holding => fail("delivered outside a tenure"),
            Observed::Lock { lock: 0, event } => match event {
                LockEvent::Acquired { .. } if t.holding || t.stopped => fail("acquired inside a tenure or stopped"),
                LockEvent::Acquired { .. } => t.holding = true,
                LockEvent::Lost { .. } | LockEvent::Drained if !t.holding || t.draining => {
                    fail("a tenure ended outside one, or before its release's outcome")
                }
                LockEvent::Lost { .. } => t.holding = false,
                LockEvent::Drained => {
                    t.holding = false;
                    t.draining = true;
                }
                LockEvent::Released | LockEvent::ReleaseFailed { .. } if !t.draining => {
                    fail("a release's outcome without a drain")
                }
                LockEvent::Released | LockEvent::ReleaseFailed { .. } => t.draining = false,
                LockEvent::Stopped { .. } if t.stopped || t.holding => fail("stopped twice or while holding"),
                LockEvent::Stopped { .. } => t.stopped = true,
                _ => {}
            },
            _ => {}
        }
    }
}

// ----- hand-written cases -----

#[test]
fn exactly_one_holder_among_n() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        for n in 2..=5 {
            let what = format!("{protocol:?} n={n}");
            let (w, _) = run(fleet(protocol, n, Duration::from_secs(12)), n as u64);
            // Held from the first acquisition to the end, by one process, without flapping.
            assert_eq!(acquisitions(&w).len(), 1, "{what}: one acquisition");
            assert_eq!(w.holders(0).len(), 1, "{what}");
            assert_one_believer(&w, &what);
            for p in 0..n {
                assert!(!has(&w, p, |e| matches!(e, LockEvent::Lost { .. })), "{what}");
            }
        }
    }
}

#[test]
fn start_attempts_at_once() {
    let (w, _) = run(fleet(Protocol::Lease, 1, Duration::from_secs(3)), 1);
    let log = w.observations();
    let started = log.iter().find(|o| o.event == Observed::Started).expect("started").at;
    let ops = lock_ops(&w, 0);
    assert_eq!(ops[0].1, DbOp::Acquire, "the first lock operation is an attempt");
    let (acquired, _) = first_acquisition_after(&w, Timestamp::ZERO).expect("acquired");
    // Connect, bootstrap and LISTEN (a round trip each), then the attempt within the wake
    // jitter (20 ms; it spreads a fleet reconnecting at once), not after an acquire interval.
    let rtt = ms(2);
    let setup = rtt * 3;
    let waited = ops[0].0.saturating_duration_since(started).saturating_sub(setup);
    assert!(waited <= LockConfig::new(Protocol::Lease).wake_jitter, "{waited:?}");
    assert_eq!(acquired.saturating_duration_since(ops[0].0), rtt);
}

/// Messages published throughout a graceful release reach exactly one process each.
fn lossless_handover(protocol: Protocol, n: usize, seed: u64, net_delay: Duration, query: (u64, u64, u64)) {
    let what = format!("{protocol:?} n={n} seed={seed} net_delay={net_delay:?} query={query:?}");
    // A message every 500 µs from 2 s to 3 s, the holder's release in the middle.
    let mut s = fleet(protocol, n, Duration::from_secs(8));
    s.publish_rate = sustainable(2000.0, query.1);
    s.net_delay = net_delay;
    s.query_min = Duration::from_micros(query.0);
    s.query_mean = Duration::from_micros(query.1);
    s.query_max = Duration::from_micros(query.2);
    let mut w = world(s, seed);
    run_until(&mut w, ms(2_000));
    let holder = w.holders(0);
    assert_eq!(holder.len(), 1, "{what}");
    let holder = holder[0];
    w.add_action(action(ms(2_500), Action::Release, Some(holder))).unwrap();
    let r = finish(&mut w);
    assert_eq!(w.holders(0).len(), 1, "{what}: someone took over");
    assert_exactly_once(&w, &r, &what);
    assert_one_believer(&w, &what);
    assert!(has(&w, holder, |e| e == &LockEvent::Released), "{what}");
    // The release woke the standbys; one whose refused attempt already named the next term
    // ignores the older term's release marker (stale), so not necessarily all of them.
    assert!(
        (0..n)
            .filter(|&p| p != holder)
            .any(|p| has(&w, p, |e| e == &LockEvent::PeerReleased)),
        "{what}"
    );
    // The releaser's own marker did not wake it.
    assert!(!has(&w, holder, |e| e == &LockEvent::PeerReleased), "{what}");
}

#[test]
fn graceful_handover_loses_and_duplicates_nothing() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        for n in 2..=5 {
            for seed in 0..2 {
                lossless_handover(protocol, n, seed, ms(1), (0, 0, 0));
            }
        }
    }
}

#[test]
fn graceful_handover_with_varied_latencies() {
    // Statements slower than the network, faster, and drawn at random (so that commits, replies
    // and notifications interleave differently across the processes' connections).
    let latencies = [
        (Duration::from_micros(100), (3_000, 3_000, 3_000)),
        (Duration::from_millis(3), (100, 100, 100)),
        (Duration::from_micros(300), (50, 1_500, 6_000)),
    ];
    for (net_delay, query) in latencies {
        for protocol in [Protocol::Lease, Protocol::Classic] {
            for seed in 0..4 {
                lossless_handover(protocol, 3, seed, net_delay, query);
            }
        }
    }
}

#[test]
fn single_process_release_and_reacquire() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        // A message every 10 ms from 2 s to 4 s; the release at 2.05 s.
        let mut s = fleet(protocol, 1, Duration::from_secs(9));
        s.publish_rate = 100.0;
        s.actions.push(action(ms(2_050), Action::Release, Some(0)));
        let (w, r) = run(s, 9);
        let what = format!("{protocol:?}");
        assert_eq!(w.holders(0), vec![0], "{what}: re-acquired after a full interval");
        let (again, _) = first_acquisition_after(&w, Timestamp::from_millis(2_050)).expect("re-acquired");
        assert!(again >= Timestamp::from_millis(2_050 + 2_400), "{what}: at {again:?}");
        assert_eq!(r.published, 200);
        assert_eq!(r.duplicates, 0, "{what}");
        assert_no_invention_and_in_order(&w, &r, &what);
        match protocol {
            // Lease: what came after its own drain marker is delivered when it wins again.
            Protocol::Lease => assert_eq!(r.lost_messages, 0, "{what}"),
            // Classic announces no new term, so the releaser keeps nothing (at most once).
            _ => assert!(r.lost_messages > 0, "{what}"),
        }
    }
}

#[test]
fn release_wakes_standbys_within_wake_jitter() {
    let mut s = fleet(Protocol::Lease, 4, Duration::from_secs(4));
    s.actions.push(action(ms(2_000), Action::Release, None));
    let (w, _) = run(s, 3);
    let t0 = Timestamp::from_millis(2_000);
    let (took, holder) = first_acquisition_after(&w, t0).expect("taken over");
    let releaser = acquisitions(&w)[0].1;
    assert_ne!(holder, releaser);
    // drain + marker + release + notification + jitter (<= 20 ms) + acquisition: far below an
    // acquire interval.
    assert!(took.saturating_duration_since(t0) < ms(40), "{took:?}");
    // Herd-free: the first winner's `acquired` cancels the others' wakes; those that already
    // attempted lost. Few statements in the 50 ms after the release.
    let window = |t: Timestamp| t > t0 && t <= t0 + ms(50);
    let statements: usize = (0..4)
        .map(|p| lock_ops(&w, p).iter().filter(|(t, _)| window(*t)).count())
        .sum();
    assert!(statements < 20, "{statements} statements");
}

#[test]
fn crash_takeover_classic_and_lease() {
    for protocol in [Protocol::Classic, Protocol::Lease] {
        let mut s = fleet(protocol, 3, Duration::from_secs(10));
        s.faults.push(fault(ms(2_000), FaultKind::Crash, None));
        let retry = s.retry_bound();
        let (w, _) = run(s, 5);
        let crashed = acquisitions(&w)[0].1;
        let (took, holder) = first_acquisition_after(&w, Timestamp::from_millis(2_000)).expect("taken over");
        // Within the standby retry bound, plus the attempt itself.
        let took = took.saturating_duration_since(Timestamp::from_millis(2_000));
        assert!(took <= retry + ms(10), "{protocol:?}: {took:?}");
        assert_ne!(holder, crashed);
        assert_eq!(w.holders(0), vec![holder], "{protocol:?}");
    }
}

#[test]
fn lease_expiry_takeover_terminates_stale_holder() {
    let mut s = fleet(Protocol::Lease, 2, Duration::from_secs(8));
    s.actions.push(action(ms(2_000), Action::Cut, None));
    let (w, _) = run(s, 7);
    let holder = acquisitions(&w)[0].1;
    let standby = 1 - holder;
    let (took, who) = first_acquisition_after(&w, Timestamp::from_millis(2_000)).expect("taken over");
    assert_eq!(who, standby);
    // ttl (2 s) plus at most the lease_remaining retry: about ttl.
    let took = took.saturating_duration_since(Timestamp::from_millis(2_000));
    assert!(took <= ms(2_100), "{took:?}");
    // The stale holder fenced itself before anyone took over (S2 checked at every event).
    assert!(has(&w, holder, |e| matches!(
        e,
        LockEvent::Lost {
            reason: LostReason::LeaseExpired | LostReason::RequestTimeout
        }
    )));
    assert!(lock_ops(&w, standby)
        .iter()
        .any(|(_, op)| matches!(op, DbOp::TerminateStale { .. })));
    assert!(!has(&w, standby, |e| matches!(
        e,
        LockEvent::Warning(Warning::TerminateNotPermitted { .. })
    )));
}

#[test]
fn terminate_not_permitted_is_warned_once() {
    // The holder's link is cut for 4 s every 10 s: the other one takes over from a live holder
    // it may not terminate, then the cut one comes back as a standby. Back and forth five times:
    // each lock warns once at most, however often it takes over.
    let mut s = fleet(Protocol::Lease, 2, Duration::from_secs(56));
    s.terminate_permitted = false;
    s.cut_duration = Duration::from_secs(4);
    for round in 0..5 {
        s.faults.push(fault(ms(2_000 + 10_000 * round), FaultKind::Cut, None));
    }
    let (w, _) = run(s, 8);
    let holders: Vec<usize> = acquisitions(&w).iter().map(|(_, p, _)| *p).collect();
    assert_eq!(holders.len(), 6, "{holders:?}");
    assert!(holders.windows(2).all(|h| h[0] != h[1]), "alternating: {holders:?}");
    for p in 0..2 {
        let warnings = events(&w, p)
            .iter()
            .filter(|(_, e)| matches!(e, LockEvent::Warning(Warning::TerminateNotPermitted { .. })))
            .count();
        assert_eq!(warnings, 1, "process {p}");
    }
}

#[test]
fn tokens_strictly_increase_across_terms() {
    // Every 5 s the holder releases, crashes or is cut; the crashed restart and the cut heal in
    // 3 s, so that there is always a standby.
    let mut s = fleet(Protocol::Lease, 3, Duration::from_secs(64));
    s.restart_delay = Some(Duration::from_secs(3));
    s.cut_duration = Duration::from_secs(3);
    for round in 0..12u64 {
        let t = ms(2_000 + 5_000 * round);
        match round % 3 {
            0 => s.actions.push(action(t, Action::Release, None)),
            1 => s.faults.push(fault(t, FaultKind::Crash, None)),
            _ => s.faults.push(fault(t, FaultKind::Cut, None)),
        }
    }
    let (w, _) = run(s, 11);
    // The World's S4 checker asserted global strict increase at every Acquired; the log and the
    // row agree.
    let tokens: Vec<u64> = acquisitions(&w)
        .iter()
        .map(|(_, _, t)| t.expect("Lease tokens").0)
        .collect();
    assert!(tokens.len() >= 13, "{tokens:?}");
    assert!(tokens.windows(2).all(|t| t[0] < t[1]), "{tokens:?}");
    let row = w.db().lease_row("ch0").expect("lease row");
    assert_eq!(row.token, *tokens.last().unwrap());
}

#[test]
fn old_token_renew_and_release_change_nothing() {
    let mut db = SimDb::new(DbConfig::default());
    let channel = ChannelName::new("jobs").unwrap();
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
    let before = db.lease_row("jobs").unwrap().clone();
    db.advance_to(t + Duration::from_secs(1));
    let old = Some(FenceToken(1));
    assert_eq!(
        run(
            &mut db,
            DbOp::Renew {
                token: old,
                progress: None
            }
        ),
        Ok(Reply::Renew { owned: false })
    );
    assert_eq!(
        run(&mut db, DbOp::Release { token: old }),
        Ok(Reply::Release { released: false })
    );
    assert!(db.take_notifications(a).is_empty());
    assert_eq!(db.lease_row("jobs"), Some(&before));
}

#[test]
fn stop_releases_and_reports_stopped() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut w = world(fleet(protocol, 3, Duration::from_secs(4)), 13);
        // Let the standbys' first attempts come back (a stop waits for an attempt in flight).
        run_until(&mut w, ms(2_000));
        let holder = w.holders(0)[0];
        let standby = (holder + 1) % 3;
        w.add_fault(fault(ms(2_000), FaultKind::Stop, Some(holder))).unwrap();
        w.add_fault(fault(ms(2_000), FaultKind::Stop, Some(standby))).unwrap();
        let r = finish(&mut w);
        let what = format!("{protocol:?}");
        // The standby stops at once, having nothing to release.
        let ev = events(&w, standby);
        assert_eq!(
            ev.last(),
            Some(&(Timestamp::from_millis(2_000), LockEvent::Stopped { released: true }))
        );
        let ev: Vec<LockEvent> = events(&w, holder).into_iter().map(|(_, e)| e).collect();
        let released = ev.iter().position(|e| e == &LockEvent::Released).expect("released");
        let stopped = ev
            .iter()
            .position(|e| e == &LockEvent::Stopped { released: true })
            .expect("stopped");
        assert!(released < stopped, "{what}");
        // The remaining process took over; the stop was a failover.
        let rest = (holder + 2) % 3;
        assert_eq!(w.holders(0), vec![rest], "{what}");
        assert_eq!(common::failover(&r, FaultKind::Stop).0, 1, "{what}");
    }
}

#[test]
fn stop_is_bounded_when_the_database_does_not_answer() {
    // A request timeout beyond the shutdown timeout (and so a lease long enough for it).
    let mut s = fleet(Protocol::Lease, 2, Duration::from_secs(6));
    s.lease_ttl = Duration::from_secs(10);
    s.renew_interval = Some(Duration::from_secs(2));
    s.fence_margin = Some(Duration::from_secs(1));
    s.request_timeout = Duration::from_secs(5);
    let t0 = ms(2_000);
    s.actions.push(action(t0, Action::Cut, None));
    s.faults
        .push(fault(t0 + Duration::from_micros(1), FaultKind::Stop, None));
    let (w, _) = run(s, 17);
    let holder = acquisitions(&w)[0].1;
    let ev = events(&w, holder);
    let (stopped_at, _) = ev.last().expect("events");
    let stop = Timestamp::ZERO + t0 + Duration::from_micros(1);
    // The shutdown timeout (1 s), not the request timeout.
    assert_eq!(stopped_at.saturating_duration_since(stop), Duration::from_secs(1));
    // The release is the drain point: its marker never comes, so the delivery ends after
    // marker_wait, and the release stays unconfirmed.
    let drained = ev.iter().find(|(_, e)| e == &LockEvent::Drained).expect("drained");
    assert_eq!(drained.0.saturating_duration_since(stop), Duration::from_millis(500));
    let tail: Vec<&LockEvent> = ev[ev.len() - 2..].iter().map(|(_, e)| e).collect();
    assert_eq!(
        tail,
        [
            &LockEvent::ReleaseFailed {
                reason: LostReason::ReleaseUnconfirmed
            },
            &LockEvent::Stopped { released: false }
        ]
    );
}

#[test]
fn classic_cut_holder_blocks_takeover() {
    // The Classic protocol's weakness: a silently cut holder's session stays alive on the server,
    // so nobody can take over (the holder itself steps down when its check times out).
    let mut s = fleet(Protocol::Classic, 2, Duration::from_secs(12));
    s.actions.push(action(ms(2_000), Action::Cut, None));
    let (w, _) = run(s, 19);
    let holder = acquisitions(&w)[0].1;
    assert_eq!(acquisitions(&w).len(), 1);
    assert!(has(&w, holder, |e| matches!(e, LockEvent::Lost { .. })));
    // Nobody holds: the row names a live session.
    assert!(w.holders(0).is_empty());
    let channel = w.channel(0).unwrap().clone();
    assert!(w.db().classic_owner(channel.lock_channel()).is_some());
}

/// Found by the stepped fleet's `fleet_graceful_handover_is_exactly_once`: a message that
/// reached the releasing holder after its own drain marker but before the drain was confirmed
/// was dropped, and lost when that same process won the next term (the others dropped theirs on
/// its `acquired`). Here the releaser asks again 6 ms after its release, while messages keep
/// coming every 700 µs, under several latencies; it must win the next term and lose nothing.
/// The two others stand down first (they still listen and buffer): the release would otherwise
/// name one of them, which attempts at once and wins.
#[test]
fn message_after_own_drain_marker_is_kept_for_the_next_term() {
    let latencies = [
        (Duration::from_micros(10), (2_900, 2_900, 2_900)),
        (Duration::from_micros(500), (50, 1_000, 5_000)),
        (Duration::from_millis(1), (0, 0, 0)),
    ];
    let mut won = 0;
    for (net_delay, (min, mean, max)) in latencies {
        for seed in 0..4 {
            let mut s = fleet(Protocol::Lease, 3, Duration::from_secs(8));
            s.publish_rate = sustainable(1_400.0, mean);
            s.net_delay = net_delay;
            s.query_min = Duration::from_micros(min);
            s.query_mean = Duration::from_micros(mean);
            s.query_max = Duration::from_micros(max);
            let mut w = world(s, seed);
            run_until(&mut w, ms(2_100));
            let holder = w.holders(0)[0];
            for other in (0..3).filter(|p| *p != holder) {
                w.add_action(action(ms(2_100), Action::StandDown, Some(other))).unwrap();
            }
            w.add_action(action(ms(2_100), Action::Release, Some(holder))).unwrap();
            w.add_action(action(ms(2_106), Action::Acquire, Some(holder))).unwrap();
            let r = finish(&mut w);
            let what = format!("seed {seed} net_delay {net_delay:?} query {min}/{mean}/{max} µs");
            let next = first_acquisition_after(&w, Timestamp::from_millis(2_100)).expect("next term");
            if next.1 == holder {
                won += 1;
            }
            assert_exactly_once(&w, &r, &what);
        }
    }
    // The case is about the releaser winning again: most of these runs must be that case.
    assert!(won >= 6, "the releaser won the next term in only {won} runs");
}

/// Found by the stepped fleet's `fleet_safety`: a holder cut off and then crashed, its
/// acquisition committed but not yet answered, leaves a live session on the server; the
/// standby takes over once the lease expires and terminates the stale backend.
#[test]
fn cut_then_crashed_holder_is_taken_over_after_the_lease() {
    let s = fleet(Protocol::Lease, 2, Duration::from_secs(8));
    // A first run finds when the first holder's winning attempt commits (1 ms before its reply).
    let (w, _) = run(s.clone(), 0);
    let (acquired, first, _) = acquisitions(&w)[0];
    let between = at(acquired) - Duration::from_micros(500);
    // The same run, with the cut and the crash between that commit and its reply.
    let mut s = s;
    s.actions.push(action(between, Action::Cut, Some(first)));
    s.faults
        .push(fault(between + Duration::from_micros(1), FaultKind::Crash, Some(first)));
    let (w, _) = run(s, 0);
    let other = 1 - first;
    assert!(
        acquisitions(&w).iter().all(|(_, p, _)| *p == other),
        "the reply never arrived"
    );
    let (took, _) = first_acquisition_after(&w, Timestamp::ZERO).expect("taken over");
    assert!(
        took.saturating_duration_since(acquired) <= ms(2_100 + 3_600),
        "{took:?}"
    );
    assert_eq!(w.holders(0), vec![other]);
    assert!(lock_ops(&w, other)
        .iter()
        .any(|(_, op)| matches!(op, DbOp::TerminateStale { .. })));
}

/// The server drops a holder's session while the holder's side stays half-open (what its TCP
/// stack does after keepalive gives up; here a cut link, then its backend terminated) at `drop`.
/// With `crash_watch` (Lease) the standby's wait answers `gone` at the termination and it
/// attempts at once; without, it attempts at its own schedule.
fn server_drop(protocol: Protocol, drop: Duration, crash_watch: bool) -> (World, Report) {
    let mut s = fleet(protocol, 2, Duration::from_secs(42));
    s.crash_watch = crash_watch;
    if protocol == Protocol::Classic {
        s.renew_interval = Some(Duration::from_secs(30));
    }
    s.actions.push(action(drop, Action::Cut, None));
    s.faults
        .push(fault(drop + Duration::from_micros(1), FaultKind::Terminate, None));
    run(s, 23)
}

/// Classic: the row's owner is gone from `pg_stat_activity`, a standby takes over at its next
/// retry, while the old holder believes it holds until its next ownership check fails: two
/// believers (S2 broken). Lease, same fault: a standby waiting for the lease to expire finds the
/// old holder fenced already, so there is never a second believer (the World checks S2 after
/// every event). A standby attempt that lands between the drop and the old holder's fence
/// takes over at once, the owner's session being gone: the gap the World exempts from S2 and
/// reports as the old holder's session ended unknown to it.
#[test]
fn server_dropped_holder_classic_split_brain_lease_none() {
    let (w, r) = server_drop(Protocol::Classic, ms(2_000), false);
    let holder = acquisitions(&w)[0].1;
    let (overlap_time, _) = overlap(&w);
    assert!(overlap_time > Duration::from_secs(10), "{overlap_time:?}");
    assert!(r.split_brain_s > 10.0);
    assert_eq!(w.holders(0), vec![1 - holder], "Classic: the standby holds in the end");

    // Lease: the drop lands just after a standby attempt, before the holder's next renewal; the
    // standby's next attempt is at the lease's expiry, after the old holder fenced itself
    // (without the crash watch, which would have the standby attempt at the drop: below).
    let (quiet, _) = server_drop(Protocol::Lease, Duration::from_secs(41), false);
    let holder = acquisitions(&quiet)[0].1;
    let standby = 1 - holder;
    let (attempt, _) = *lock_ops(&quiet, standby)
        .iter()
        .find(|(t, op)| *t > Timestamp::from_millis(2_000) && *op == DbOp::Acquire)
        .expect("a standby attempt");
    let drop = at(attempt) + ms(3);
    let renewed_between = lock_ops(&quiet, holder)
        .iter()
        .any(|(t, op)| *t > attempt && *t <= Timestamp::ZERO + drop && matches!(op, DbOp::Renew { .. }));
    assert!(!renewed_between, "the drop must precede the holder's next renewal");
    let (w, r) = server_drop(Protocol::Lease, drop, false);
    assert_eq!(overlap(&w).0, Duration::ZERO);
    assert_eq!(r.split_brain_s, 0.0);
    assert!(has(&w, holder, |e| matches!(
        e,
        LockEvent::Lost {
            reason: LostReason::LeaseExpired | LostReason::RequestTimeout
        }
    )));
    assert_eq!(w.holders(0), vec![standby], "Lease: the standby holds in the end");

    // Lease, the drop earlier in the renewal period: the standby's attempt finds the session
    // gone; the overlap is all of the exempted kind.
    let (w, r) = server_drop(Protocol::Lease, ms(2_000), false);
    assert!(overlap(&w).0 > Duration::ZERO);
    assert_eq!(r.split_brain_s, r.split_brain_session_ended_s);
    assert_eq!(w.holders(0), vec![standby]);

    // Lease with the crash watch, the drop just after a standby attempt: the wait answers
    // `gone` at the termination and the standby takes over at once, while the cut holder still
    // believes until it fences itself: the overlap is all of the exempted kind too.
    let (w, r) = server_drop(Protocol::Lease, drop, true);
    assert!(overlap(&w).0 > Duration::ZERO);
    assert_eq!(r.split_brain_s, r.split_brain_session_ended_s);
    assert_eq!(w.holders(0), vec![standby]);
}

#[test]
fn deadlines_are_strictly_after_every_tick() {
    // The World's deadline checker fails a run whose session asks, after a tick, for a
    // deadline not after it; the phase bounds and the step limit catch a stuck one.
    for seed in 0..20 {
        let mut s = fleet(Protocol::Lease, 3, Duration::from_secs(10));
        s.actions.push(action(ms(5_000), Action::Release, None));
        s.max_steps = 100_000;
        run(s, seed);
    }
}

// ----- properties: generated actions and faults -----

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One generated step: an action or a fault on a process, after a pause.
#[derive(Debug, Clone, Copy)]
enum Step {
    Act(Action),
    Fault(FaultKind),
}

fn step(graceful_only: bool) -> BoxedStrategy<Step> {
    if graceful_only {
        prop_oneof![
            3 => Just(Step::Act(Action::Release)),
            1 => Just(Step::Act(Action::Acquire)),
        ]
        .boxed()
    } else {
        prop_oneof![
            3 => Just(Step::Act(Action::Release)),
            1 => Just(Step::Fault(FaultKind::Stop)),
            1 => Just(Step::Act(Action::Acquire)),
            1 => Just(Step::Fault(FaultKind::Crash)),
            1 => Just(Step::Act(Action::Cut)),
            1 => Just(Step::Act(Action::Heal)),
            1 => Just(Step::Act(Action::Start)),
        ]
        .boxed()
    }
}

/// Network delay and statement times (min, mean, max), in µs.
fn latency() -> impl Strategy<Value = (u64, (u64, u64, u64))> {
    (1u64..3_000, 0u64..1_000, 0u64..2_000, 0u64..5_000)
        .prop_map(|(net, min, extra, tail)| (net, (min, min + extra, min + extra + tail)))
}

/// A generated fleet: steps (pause in ms, step, process) from 2 s on, then a quiet tail of
/// `tail` in which the publisher goes on for all but the last 5 s.
fn generated(
    protocol: Protocol,
    n: usize,
    latency: (u64, (u64, u64, u64)),
    publish_rate: f64,
    steps: &[(u64, Step, usize)],
    tail: Duration,
) -> Scenario {
    let mut s = fleet(protocol, n, Duration::ZERO);
    s.publish_rate = sustainable(publish_rate, latency.1 .1);
    s.net_delay = Duration::from_micros(latency.0);
    s.query_min = Duration::from_micros(latency.1 .0);
    s.query_mean = Duration::from_micros(latency.1 .1);
    s.query_max = Duration::from_micros(latency.1 .2);
    let mut t = ms(2_000);
    for &(pause, step, p) in steps {
        t += ms(pause);
        let p = Some(p % n);
        match step {
            Step::Act(a) => s.actions.push(action(t, a, p)),
            Step::Fault(kind) => s.faults.push(fault(t, kind, p)),
        }
    }
    s.duration = t + tail;
    s
}

/// The process cut off at the end (a `Cut` without a later `Heal`).
fn cut_at_end(s: &Scenario, p: usize) -> bool {
    s.actions
        .iter()
        .rev()
        .find(|a| a.process == Some(p) && matches!(a.action, Action::Cut | Action::Heal))
        .is_some_and(|a| a.action == Action::Cut)
}

fn running_at_end(w: &World, p: usize) -> bool {
    w.observations()
        .iter()
        .rev()
        .find(|o| o.process == p && matches!(o.event, Observed::Started | Observed::Ended))
        .is_some_and(|o| o.event == Observed::Started)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(20), ..ProptestConfig::default() })]

    /// Releases, stops, attempts, crashes, cuts, heals and restarts at generated moments: the
    /// World's checkers hold after every event (S1, S2 under Lease, S3, S4, phase bounds,
    /// deadlines, liveness); no message is delivered twice or invented (at most once across
    /// every fault here); and 20 s after the last step a process that runs and can reach the
    /// server holds the lock (under Classic only without silent cuts: a cut holder's session
    /// blocks its row for as long as the server keeps it, the weakness Lease fixes).
    #[test]
    fn fleet_safety(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        publish_rate in 0.0f64..200.0,
        steps in prop::collection::vec((1u64..3_000, step(false), 0usize..5), 1..30),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let s = generated(protocol, n, latency, publish_rate, &steps, Duration::from_secs(20));
        let mut w = world(s.clone(), seed);
        let result = w.finish();
        let r = result.map_err(|e| TestCaseError::fail(format!(
            "seed {seed}: {e}\nreproduce with: pgiplock-sim run --seed {seed} {}", s.to_cli_args())))?;
        check_tenures(&w);
        prop_assert_eq!(r.unflagged_duplicates, 0, "unflagged duplicates: {}", r.table());
        assert_no_invention_and_in_order(&w, &r, "fleet_safety");
        let cuts = s.actions.iter().any(|a| a.action == Action::Cut);
        let eligible: Vec<usize> = (0..n).filter(|&p| running_at_end(&w, p) && !cut_at_end(&s, p)).collect();
        if !eligible.is_empty() && (lease || !cuts) {
            let holders = w.holders(0);
            prop_assert_eq!(holders.len(), 1, "no holder among {:?}", eligible);
            prop_assert!(eligible.contains(&holders[0]));
        }
    }

    /// With graceful releases and attempts only (from 2 s on, when a holder is in place and the
    /// publisher starts), every message is delivered exactly once (lossless handover) and never
    /// two processes believe at once, whatever the latencies. (Under Classic without attempts:
    /// Classic announces no new term, so a releaser keeps nothing for the next one, at most
    /// once; a releaser that asks again at once may win and lose what followed its marker.
    /// Without attempts a standby always wins first.)
    #[test]
    fn fleet_graceful_handover_is_exactly_once(
        lease in any::<bool>(),
        n in 2usize..=5,
        seed in any::<u64>(),
        latency in latency(),
        publish_rate in 20.0f64..300.0,
        steps in prop::collection::vec((1u64..2_000, step(true), 0usize..5), 1..30),
    ) {
        let protocol = if lease { Protocol::Lease } else { Protocol::Classic };
        let steps: Vec<_> = steps
            .into_iter()
            .filter(|(_, step, _)| lease || !matches!(step, Step::Act(Action::Acquire)))
            .collect();
        let s = generated(protocol, n, latency, publish_rate, &steps, Duration::from_secs(10));
        let mut w = world(s.clone(), seed);
        let result = w.finish();
        let r = result.map_err(|e| TestCaseError::fail(format!(
            "seed {seed}: {e}\nreproduce with: pgiplock-sim run --seed {seed} {}", s.to_cli_args())))?;
        check_tenures(&w);
        prop_assert_eq!(w.holders(0).len(), 1);
        prop_assert_eq!(overlap(&w).0, Duration::ZERO, "two believers");
        prop_assert_eq!(r.duplicates, 0, "duplicates: {}", r.table());
        prop_assert_eq!(r.lost_messages, 0, "lost: {}", r.table());
        assert_no_invention_and_in_order(&w, &r, "fleet_graceful_handover_is_exactly_once");
    }
}

// ----- properties: generated faults over longer runs -----

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
/// warmup); the World checks everything after every event.
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
        fault_rates: FaultRates::default(),
        restart_delay: Some(Duration::from_secs(5)),
        cut_duration: Duration::from_secs(20),
        server_down: Duration::from_secs(3),
        ..Scenario::default()
    }
}

fn run_world(scenario: &Scenario, seed: u64) -> Result<Report, TestCaseError> {
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
        prop_assert!(r.unflagged_duplicates == 0 || r.split_brain_s > 0.0, "unflagged duplicates without split brain: {}", r.table());
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
