//! The crash watch (Lease): a standby process waits on the holder's session advisory lock on a
//! second connection, so a crashed holder is replaced as soon as the server ends its session,
//! not at its lease expiry; a cut of the standby's link breaks the watch (the ordinary retries
//! take over) until it connects again; a silently cut holder is still bounded by its ttl.

mod common;

use std::time::Duration;

use common::{failover, on_holder, quiet, run_ok};
use pgiplock_core::{DbOp, LockEvent, Protocol, SessionOp, WATCH_LIMIT_BACKOFF};
use pgiplock_sim::{Action, ActionSpec, FaultKind, FaultSpec, Observed, Scenario, World};

fn crashes(crash_watch: bool) -> Scenario {
    let mut s = quiet(Protocol::Lease, 5, Duration::from_secs(900));
    s.crash_watch = crash_watch;
    s.faults = on_holder(FaultKind::Crash, &[60, 200, 340, 480]);
    // A crashed holder must not win again by restarting first.
    s.restart_delay = Some(Duration::from_secs(120));
    s
}

/// When the server ends a crashed holder's session: the crash's close reaches it.
fn server_notices(s: &Scenario) -> f64 {
    (s.crash_close_delay + s.net_delay).as_secs_f64()
}

#[test]
fn a_crashed_holder_is_replaced_when_the_server_ends_its_session() {
    let seed = common::seed(21);
    let on = crashes(true);
    let r = run_ok(&on, seed);
    let (count, max) = failover(&r, FaultKind::Crash);
    assert_eq!(count, 4, "seed {seed}: {}", r.table());
    // The wait's answer, the standby's attempt and its commit: a few round trips and queries.
    let bound = server_notices(&on) + 0.05;
    assert!(max <= bound, "seed {seed}: {max} > {bound}\n{}", r.table());
    assert_eq!(r.split_brain_s, 0.0, "seed {seed}: {}", r.table());
    assert!(
        r.session_events.get("watch_up").copied().unwrap_or(0) > 0,
        "{}",
        r.table()
    );

    // The same scenario without the watch waits for a standby's next retry (whose attempt
    // finds the holder's session gone).
    let off = crashes(false);
    let r = run_ok(&off, seed);
    let (count, max_off) = failover(&r, FaultKind::Crash);
    assert_eq!(count, 4, "seed {seed}: {}", r.table());
    assert!(max_off > bound, "seed {seed}: {max_off} <= {bound}\n{}", r.table());
    assert!(!r.session_events.contains_key("watch_up"), "{}", r.table());
}

/// At the server's connection limit (here one slot per process, then two more): the watch's
/// connections are refused with a typed event and back off for `WATCH_LIMIT_BACKOFF` rather
/// than the acquire interval; every crash is still taken over, by one holder at a time; with
/// room for two watches, standbys watch again and the fleet's own connections are refused less.
#[test]
fn at_the_connection_limit_the_watch_steps_back() {
    let seed = common::seed(23);
    let limited = |extra: usize| {
        let mut s = crashes(true);
        s.max_connections = Some(s.processes + extra);
        s
    };
    let full = limited(0);
    let r = run_ok(&full, seed);
    let (count, _) = failover(&r, FaultKind::Crash);
    assert_eq!(count, 4, "seed {seed}: {}", r.table());
    assert_eq!(r.split_brain_s, 0.0, "seed {seed}: {}", r.table());
    let events = |r: &pgiplock_sim::Report, name: &str| r.session_events.get(name).copied().unwrap_or(0);
    let refused = events(&r, "watch_connection_limit");
    assert!(refused > 0, "seed {seed}: {}", r.table());
    // At most one refusal per session (each process's first, and one per restart) per long
    // backoff: the acquire interval would allow thirty.
    let sessions = (full.processes + full.faults.len()) as u64;
    let bound = sessions * (full.duration.as_secs() / WATCH_LIMIT_BACKOFF.as_secs() + 1);
    assert!(
        refused <= bound,
        "seed {seed}: {refused} refusals > {bound}\n{}",
        r.table()
    );
    let starved = events(&r, "connection_limit");

    let roomy = limited(2);
    let r = run_ok(&roomy, seed);
    let (count, _) = failover(&r, FaultKind::Crash);
    assert_eq!(count, 4, "seed {seed}: {}", r.table());
    assert_eq!(r.split_brain_s, 0.0, "seed {seed}: {}", r.table());
    assert!(events(&r, "watch_up") > 0, "seed {seed}: {}", r.table());
    assert!(
        events(&r, "connection_limit") < starved,
        "seed {seed}: more room, fewer refused listening connections ({starved} before)\n{}",
        r.table()
    );
}

fn fleet() -> Scenario {
    Scenario {
        restart_delay: None,
        acquire_interval: Duration::from_secs(2),
        lease_ttl: Duration::from_secs(3),
        publish_rate: 5.0,
        ..quiet(Protocol::Lease, 2, Duration::from_secs(400))
    }
}

fn micros(s: u64) -> u64 {
    s * 1_000_000
}

/// Acquire attempts process `p` issued in `[from, to)` seconds.
fn attempts(w: &World, p: usize, from: u64, to: u64) -> usize {
    requests(w, p, from, to, |op| {
        matches!(
            op,
            SessionOp::Lock { op: DbOp::Acquire, .. } | SessionOp::AcquireMany { .. }
        )
    })
}

/// Crash watch waits process `p` issued in `[from, to)` seconds.
fn waits(w: &World, p: usize, from: u64, to: u64) -> usize {
    requests(w, p, from, to, |op| matches!(op, SessionOp::AwaitHolder { .. }))
}

fn requests(w: &World, p: usize, from: u64, to: u64, f: impl Fn(&SessionOp) -> bool) -> usize {
    w.observations()
        .iter()
        .filter(|o| o.process == p && (micros(from)..micros(to)).contains(&o.at.as_micros()))
        .filter(|o| matches!(&o.event, Observed::Request(op) if f(op)))
        .count()
}

/// When process `p` first acquired in `[from, to)` seconds, in seconds.
fn acquired_at(w: &World, p: usize, from: u64, to: u64) -> Option<f64> {
    w.observations()
        .iter()
        .filter(|o| o.process == p && (micros(from)..micros(to)).contains(&o.at.as_micros()))
        .find(|o| {
            matches!(
                &o.event,
                Observed::Lock {
                    event: LockEvent::Acquired { .. },
                    ..
                }
            )
        })
        .map(|o| o.at.as_micros() as f64 / 1e6)
}

#[test]
fn a_cut_breaks_the_standbys_watch_its_retries_take_over_and_the_watch_recovers() {
    for seed in 1..=3 {
        let mut w = World::new(fleet(), seed).expect("a valid scenario");
        w.record();
        w.run_until(Duration::from_secs(20)).expect("checkers pass");
        let holders = w.holders(0);
        assert_eq!(holders.len(), 1, "seed {seed}");
        let holder = holders[0];
        let standby = 1 - holder;
        // Watched: it waits on the holder and makes no attempt.
        assert!(waits(&w, standby, 0, 20) > 0, "seed {seed}");
        assert_eq!(attempts(&w, standby, 10, 20), 0, "seed {seed}");
        for (at, action) in [(20, Action::Cut), (200, Action::Heal)] {
            w.add_action(ActionSpec {
                at: Duration::from_secs(at),
                action,
                process: Some(standby),
            })
            .expect("a valid action");
        }
        w.add_fault(FaultSpec {
            at: Duration::from_secs(300),
            kind: FaultKind::Crash,
            process: Some(holder),
        })
        .expect("a valid fault");
        w.run_until(Duration::from_secs(400)).expect("checkers pass");
        let r = w.finish().expect("checkers pass");
        // The cut broke the watch (its wait went unanswered): the ordinary retries came back.
        assert!(
            r.session_events.get("watch_down").copied().unwrap_or(0) > 0,
            "seed {seed}: {}",
            r.table()
        );
        assert!(attempts(&w, standby, 20, 200) > 0, "seed {seed}");
        // After the heal the watch is back, and the standby stops attempting.
        assert!(waits(&w, standby, 200, 300) > 0, "seed {seed}");
        assert_eq!(attempts(&w, standby, 260, 300), 0, "seed {seed}");
        // And it takes over the crashed holder at once, not at its lease expiry.
        let at = acquired_at(&w, standby, 300, 400).expect("the standby took over");
        assert!(at - 300.0 < 0.05, "seed {seed}: acquired at {at}");
    }
}

#[test]
fn a_silently_cut_holder_is_taken_over_at_its_ttl() {
    let seed = common::seed(22);
    let mut s = quiet(Protocol::Lease, 5, Duration::from_secs(1200));
    s.faults = on_holder(FaultKind::Cut, &[60, 400, 800]);
    s.cut_duration = Duration::from_secs(120);
    assert!(s.crash_watch);
    let r = run_ok(&s, seed);
    let (count, max) = failover(&r, FaultKind::Cut);
    assert_eq!(count, 3, "seed {seed}: {}", r.table());
    // The watch answers 'expired' at the lease's expiry, and the standbys attempt then: the
    // ttl bounds it, without the standby retry bound on top.
    let ttl = s.lease_ttl.as_secs_f64();
    assert!(max <= ttl + 0.1, "seed {seed}: {max} > {ttl}\n{}", r.table());
    assert!(max >= ttl * 0.5, "seed {seed}: a cut holder is not detected at once");
    assert_eq!(r.split_brain_s, 0.0, "self-fencing precedes expiry: {}", r.table());
}

#[test]
fn the_watch_keeps_runs_deterministic() {
    let seed = common::seed(23);
    let mut s = crashes(true);
    s.fault_rates.cut = 10.0;
    s.fault_rates.terminate = 10.0;
    s.fault_rates.server_restart = 2.0;
    let a = run_ok(&s, seed);
    let b = run_ok(&s, seed);
    assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
    assert_eq!(a.table(), b.table());
    assert!(
        a.session_events.get("watch_up").copied().unwrap_or(0) > 0,
        "{}",
        a.table()
    );
}
