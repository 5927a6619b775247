//! Failover bounds of the design, per fault kind and protocol.

mod common;

use std::time::Duration;

use common::{failover, on_holder, quiet, run_ok};
use pgiplock_core::Protocol;
use pgiplock_sim::{FaultKind, Scenario};

fn with_faults(mut s: Scenario, kind: FaultKind, times: &[u64]) -> Scenario {
    s.faults = on_holder(kind, times);
    // A crashed or stopped holder must not win again by restarting first.
    s.restart_delay = Some(Duration::from_secs(120));
    s
}

#[test]
fn graceful_handover_loses_and_duplicates_nothing() {
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut s = quiet(protocol, 4, Duration::from_secs(900));
        s.publish_rate = 20.0;
        s.faults = on_holder(FaultKind::Stop, &[60, 200, 340, 480, 620]);
        s.restart_delay = Some(Duration::from_secs(5));
        let seed = common::seed(3);
        let r = run_ok(&s, seed);
        let (count, max) = failover(&r, FaultKind::Stop);
        assert_eq!(count, 5, "seed {seed}: {}", r.table());
        assert_eq!(r.lost_messages, 0, "seed {seed}: {}", r.table());
        assert_eq!(r.duplicates, 0, "seed {seed}: {}", r.table());
        // L1: one notification delivery plus one acquisition (plus wake jitter).
        assert!(max < 0.5, "seed {seed}: {}", r.table());
        assert!(r.published > 15_000);
    }
}

#[test]
fn a_release_that_is_its_own_drain_point_hands_over_sooner_and_as_exactly() {
    let run = |drain_in_release: bool| {
        let mut s = quiet(Protocol::Lease, 4, Duration::from_secs(900));
        s.publish_rate = 20.0;
        s.drain_in_release = drain_in_release;
        // A slow network, so that one round trip shows at the millisecond the report rounds to.
        s.net_delay = Duration::from_millis(5);
        s.faults = on_holder(FaultKind::Stop, &[60, 200, 340, 480, 620]);
        s.restart_delay = Some(Duration::from_secs(5));
        let seed = common::seed(3);
        let r = run_ok(&s, seed);
        let what = format!("drain_in_release {drain_in_release}, seed {seed}: {}", r.table());
        assert_eq!(failover(&r, FaultKind::Stop).0, 5, "{what}");
        assert_eq!((r.lost_messages, r.duplicates, r.replayed), (0, 0, 0), "{what}");
        r.failover[FaultKind::Stop.as_str()].p50_s
    };
    let (merged, two_step) = (run(true), run(false));
    println!("stop p50: {merged} s with the release as the drain point, {two_step} s with a drain marker first");
    // One statement (and its notification) less between the stop and the next acquisition.
    assert!(merged < two_step, "{merged} s against {two_step} s");
}

#[test]
fn crash_failover_within_the_retry_bound() {
    let seed = common::seed(4);
    for protocol in [Protocol::Classic, Protocol::Lease] {
        let mut s = quiet(protocol, 5, Duration::from_secs(900));
        s.acquire_interval = Duration::from_secs(5);
        let s = with_faults(s, FaultKind::Crash, &[60, 200, 340, 480]);
        let r = run_ok(&s, seed);
        let (count, max) = failover(&r, FaultKind::Crash);
        assert_eq!(count, 4, "seed {seed}: {}", r.table());
        // L2: the standby retry bound (min(interval, ttl) under Lease) plus slack.
        let bound = s.retry_bound().as_secs_f64() + 1.0;
        assert!(max <= bound, "seed {seed}: {max} > {bound}\n{}", r.table());
        assert_eq!(r.split_brain_s, 0.0);
    }
}

#[test]
fn lease_silent_disconnect_failover_within_ttl_plus_retry() {
    let seed = common::seed(5);
    let mut s = quiet(Protocol::Lease, 5, Duration::from_secs(1200));
    s.faults = on_holder(FaultKind::Cut, &[60, 400, 800]);
    s.cut_duration = Duration::from_secs(120);
    let r = run_ok(&s, seed);
    let (count, max) = failover(&r, FaultKind::Cut);
    assert_eq!(count, 3, "seed {seed}: {}", r.table());
    // L3: ttl plus the standby retry bound plus slack.
    let bound = s.lease_ttl.as_secs_f64() + s.retry_bound().as_secs_f64() + 1.0;
    assert!(max <= bound, "seed {seed}: {max} > {bound}\n{}", r.table());
    assert!(
        max >= s.lease_ttl.as_secs_f64() * 0.5,
        "a cut holder is not detected at once"
    );
    assert_eq!(r.split_brain_s, 0.0, "self-fencing precedes expiry: {}", r.table());
}

#[test]
fn classic_silent_disconnect_is_bounded_only_by_dead_peer_detection() {
    let seed = common::seed(6);
    // With traffic to the vanished client the server gives up after its retransmissions...
    let mut s = quiet(Protocol::Classic, 4, Duration::from_secs(1500));
    s.acquire_interval = Duration::from_secs(1);
    s.faults = on_holder(FaultKind::Cut, &[60]);
    s.cut_duration = Duration::from_secs(3600);
    let r = run_ok(&s, seed);
    let (count, max) = failover(&r, FaultKind::Cut);
    assert_eq!(count, 1, "seed {seed}: {}", r.table());
    let detect = s.server_retransmit_detect.as_secs_f64();
    assert!(
        max >= detect && max <= detect + 3.0,
        "seed {seed}: {max} vs {detect}\n{}",
        r.table()
    );
    assert!(r.lost_messages as f64 >= detect * 0.9, "{}", r.table());

    // ...and with no traffic at all, only after the idle keepalive (about 2 h 11 min).
    let mut s = quiet(Protocol::Classic, 3, Duration::from_secs(8400));
    s.acquire_interval = Duration::from_secs(30);
    s.publish_rate = 0.0;
    s.faults = on_holder(FaultKind::Cut, &[60]);
    s.cut_duration = Duration::from_secs(4 * 3600);
    let r = run_ok(&s, seed);
    let (count, max) = failover(&r, FaultKind::Cut);
    assert_eq!(count, 1, "seed {seed}: {}", r.table());
    let detect = s.server_keepalive_detect.as_secs_f64();
    assert!(
        max >= detect - 60.0 && max <= detect + 31.0,
        "seed {seed}: {max} vs {detect}\n{}",
        r.table()
    );
}

#[test]
fn server_side_termination_and_restart_fail_over() {
    let seed = common::seed(7);
    for protocol in [Protocol::Classic, Protocol::Lease] {
        let mut s = quiet(protocol, 4, Duration::from_secs(900));
        s.acquire_interval = Duration::from_secs(5);
        s.faults = on_holder(FaultKind::Terminate, &[60, 300]);
        s.faults.extend(on_holder(FaultKind::ServerRestart, &[500]));
        let r = run_ok(&s, seed);
        assert_eq!(failover(&r, FaultKind::Terminate).0, 2, "{}", r.table());
        assert_eq!(failover(&r, FaultKind::ServerRestart).0, 1, "{}", r.table());
        assert!(failover(&r, FaultKind::ServerRestart).1 < 5.0 + 15.0, "{}", r.table());
        assert_eq!(r.unresolved_failovers, 0);
    }
}
