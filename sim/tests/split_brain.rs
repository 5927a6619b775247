//! Where S2 (one believer) breaks: Classic after a takeover of a silently vanished holder, Lease
//! with clock drift beyond what the fence margin covers, and Lease when a partitioned holder's
//! backend is ended by the server (regression seed).

mod common;

use std::time::Duration;

use common::{on_holder, quiet, run_ok};
use pgiplock_core::Protocol;
use pgiplock_sim::explore::swarm_scenario;
use pgiplock_sim::{FaultKind, FaultRates, SimError};

#[test]
fn classic_shows_split_brain_after_a_fast_dead_peer_takeover() {
    let seed = common::seed(8);
    let mut s = quiet(Protocol::Classic, 3, Duration::from_secs(600));
    s.acquire_interval = Duration::from_secs(1);
    s.publish_rate = 5.0;
    // The server gives up on the vanished holder quickly; the holder itself only notices at its
    // next ownership check (30 s) plus the request timeout.
    s.server_retransmit_detect = Duration::from_secs(2);
    s.faults = on_holder(FaultKind::Cut, &[60, 300]);
    s.cut_duration = Duration::from_secs(120);
    let r = run_ok(&s, seed);
    assert!(r.split_brain_s > 1.0, "seed {seed}: {}", r.table());
}

#[test]
fn lease_has_no_split_brain_within_the_drift_bound() {
    let seed = common::seed(9);
    let mut s = quiet(Protocol::Lease, 3, Duration::from_secs(1800));
    s.drift = s.drift_bound() * 0.9;
    s.fault_rates = FaultRates {
        cut: 60.0,
        crash: 10.0,
        stop: 10.0,
        ..FaultRates::default()
    };
    s.cut_duration = Duration::from_secs(30);
    let r = run_ok(&s, seed);
    assert_eq!(r.split_brain_s, 0.0, "seed {seed}: {}", r.table());
}

#[test]
fn lease_split_brain_when_drift_exceeds_the_fence_margin() {
    // A fixed seed: takeovers favour fast clocks, so not every seed puts a slow clock in charge.
    let seed = 1;
    let mut s = quiet(Protocol::Lease, 3, Duration::from_secs(3600));
    // Clocks up to 45 % slow while the margin covers 10 %: a slow holder fences too late.
    s.drift = 0.45;
    s.fault_rates = FaultRates {
        cut: 120.0,
        ..FaultRates::default()
    };
    s.cut_duration = Duration::from_secs(30);
    let r = run_ok(&s, seed);
    assert!(r.split_brain_s > 1.0, "seed {seed}: {}", r.table());
}

/// Swarm seed 63 found it: a holder is partitioned, then an administrator terminates its
/// backend; the lease is free at once (its session is gone), a standby takes over, and the old
/// holder believes until it fences itself. Measured by default, a failure with `strict_s2`.
#[test]
fn regression_partitioned_holder_terminated_by_the_server() {
    let mut s = swarm_scenario(63);
    let r = pgiplock_sim::run(&s, 63).unwrap();
    assert!(r.split_brain_session_ended_s > 0.0, "{}", r.table());
    assert_eq!(r.split_brain_s, r.split_brain_session_ended_s);
    s.strict_s2 = true;
    match pgiplock_sim::run(&s, 63) {
        Err(SimError::Check(f)) => assert_eq!(f.checker, "S2"),
        other => panic!("expected an S2 failure, got {other:?}"),
    }
}

/// Swarm seed 93: both processes were cut off at once for longer than the liveness bound; the
/// checker must not demand a holder that nobody could become.
#[test]
fn regression_everyone_cut_off_is_not_a_liveness_failure() {
    let s = swarm_scenario(93);
    run_ok(&s, 93);
}
