//! Standing down and competing again (`Action::StandDown`, `Action::Compete`): the holder that
//! stands down hands over gracefully and makes no attempt until it competes again; a fleet that
//! stands down entirely holds nothing and that is not a liveness failure; competing again holds.

use std::time::Duration;

use pgiplock_core::{DbOp, LockEvent, Protocol, SessionOp};
use pgiplock_sim::{Action, ActionSpec, FaultRates, Observed, Scenario, World};

fn fleet(protocol: Protocol) -> Scenario {
    Scenario {
        protocol,
        processes: 3,
        duration: Duration::from_secs(120),
        warmup: Duration::from_secs(2),
        acquire_interval: Duration::from_secs(2),
        lease_ttl: Duration::from_secs(3),
        publish_rate: 5.0,
        fault_rates: FaultRates::default(),
        restart_delay: None,
        ..Scenario::default()
    }
}

fn act(w: &mut World, at: u64, action: Action, process: usize) {
    w.add_action(ActionSpec {
        at: Duration::from_secs(at),
        action,
        process: Some(process),
    })
    .expect("a valid action");
}

/// Acquire attempts process `p` sent in `[from, to)` seconds of virtual time.
fn attempts(w: &World, p: usize, from: u64, to: u64) -> usize {
    w.observations()
        .iter()
        .filter(|o| o.process == p && (from * 1_000_000..to * 1_000_000).contains(&o.at.as_micros()))
        .filter(|o| matches!(&o.event, Observed::Request(SessionOp::Lock { op: DbOp::Acquire, .. })))
        .count()
}

fn acquired(w: &World, p: usize, from: u64, to: u64) -> bool {
    w.observations().iter().any(|o| {
        o.process == p
            && (from * 1_000_000..to * 1_000_000).contains(&o.at.as_micros())
            && matches!(
                &o.event,
                Observed::Lock {
                    event: LockEvent::Acquired { .. },
                    ..
                }
            )
    })
}

#[test]
fn a_stood_down_holder_hands_over_and_stays_out_until_it_competes() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        for seed in 1..=4 {
            let mut w = World::new(fleet(protocol), seed).expect("valid scenario");
            w.record();
            w.run_until(Duration::from_secs(20)).expect("no checker fails");
            let first = w.holders(0);
            assert_eq!(first.len(), 1, "{protocol} seed {seed}: one holder before");
            let holder = first[0];
            act(&mut w, 21, Action::StandDown, holder);
            act(&mut w, 60, Action::Compete, holder);
            w.run_until(Duration::from_secs(30)).expect("no checker fails");
            let second = w.holders(0);
            assert_eq!(second.len(), 1, "{protocol} seed {seed}: someone took over");
            assert_ne!(second[0], holder, "{protocol} seed {seed}: the stood-down holder left");
            // Standing down, it makes no attempt at all (its lock does not compete).
            w.run_until(Duration::from_secs(59)).expect("no checker fails");
            assert_eq!(
                attempts(&w, holder, 22, 59),
                0,
                "{protocol} seed {seed}: an attempt while stood down"
            );
            // Everyone else stands down too: nobody holds, and that is not a liveness failure.
            for p in 0..3 {
                if p != holder {
                    act(&mut w, 61, Action::StandDown, p);
                }
            }
            w.run_until(Duration::from_secs(70)).expect("no checker fails");
            let report = w.finish().expect("no checker fails, liveness included");
            assert!(
                acquired(&w, holder, 60, 120),
                "{protocol} seed {seed}: the process that competes again holds again"
            );
            assert_eq!(report.duplicates, 0, "{protocol} seed {seed}: graceful handovers only");
        }
    }
}

/// The whole fleet stood down for longer than the liveness bound holds nothing, and the
/// checker accepts it; one process competing again holds within the bound.
#[test]
fn a_fleet_that_stood_down_is_not_a_liveness_failure() {
    let mut scenario = fleet(Protocol::Lease);
    scenario.duration = Duration::from_secs(30) + scenario.liveness_bound() * 2;
    let mut w = World::new(scenario.clone(), 3).expect("valid scenario");
    w.record();
    for p in 0..3 {
        act(&mut w, 10, Action::StandDown, p);
    }
    let compete_at = 10 + scenario.liveness_bound().as_secs() * 3 / 2;
    act(&mut w, compete_at, Action::Compete, 1);
    w.run_until(Duration::from_secs(compete_at - 1))
        .expect("no liveness failure while all stood down");
    assert!(w.holders(0).is_empty(), "nobody holds while every process stood down");
    w.finish().expect("no checker fails");
    assert!(
        acquired(&w, 1, compete_at, u64::MAX / 1_000_000),
        "the process that competes again holds"
    );
}
