//! A replicated server in the simulator (`pgiplock_sim::replication`): a primary whose replica
//! applies its commits after a lag (async) or with them (sync), crash + promote on the next
//! timeline with a read-only window before the promotion (the address already leads to the
//! standby), and what the fleet keeps across it:
//!
//! - async, a lost tail of acquisitions: every token after the promotion is above every token
//!   before (S4 runs across the whole run), because tokens carry the timeline; the promoted
//!   server hands the replicated row over no earlier than its lease's end (the old-timeline
//!   rule, the one-ttl cap not binding here); no split brain;
//! - sync: nothing lost;
//! - a partition (`old_primary_up`): under async two holders, one per server, until the old
//!   primary is stopped (bounded by its remaining up-time); under sync the old holder's
//!   renewals wait for the lost standby and it fences itself first;
//! - a promotion that does not bump the timeline (a checkers-only switch) makes tokens go back,
//!   and S4 catches it;
//! - the run is deterministic, and a scenario without replication is untouched (the
//!   determinism and output tests of the other files).

mod common;

use std::time::Duration;

use common::*;
use pgiplock_core::{FenceToken, Protocol};
use pgiplock_sim::{FaultKind, ReplicationMode, Scenario, SimError};

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Five Lease processes for 30 minutes, a failover at 600 s after three handovers in the last
/// seconds before it (within an async lag of 5 s), promoted `promote_after` later.
fn failover_scenario(mode: ReplicationMode, promote_after: Duration) -> Scenario {
    let mut scenario = quiet(Protocol::Lease, 5, s(1800));
    scenario.acquire_interval = s(5);
    scenario.faults = on_holder(FaultKind::Stop, &[596, 597, 598]);
    scenario.replication.mode = mode;
    scenario.replication.lag = s(5);
    scenario.replication.failovers = vec![s(600)];
    scenario.replication.promote_after = promote_after;
    scenario
}

#[test]
fn async_crash_and_promote_tokens_rise_across_a_lost_tail_and_the_old_row_waits_for_its_lease() {
    let seed = seed(1);
    let scenario = failover_scenario(ReplicationMode::Async, s(2));
    let report = run_ok(&scenario, seed);
    let [f] = report.replication.as_slice() else {
        panic!("one failover: {:?}", report.replication)
    };
    assert!(f.lost_acquisitions >= 3, "the handovers within the lag are lost: {f:?}");
    let first = f.first_token_after.expect("a holder after the promotion");
    assert!(first > f.max_token_before, "{f:?}");
    assert_eq!(FenceToken(first).timeline(), 2);
    assert_eq!(f.timeline, 2);
    // The replicated row was still held at the promotion: it is taken over at its lease's end
    // (its holder's session was on the old primary), not at once.
    let expiry = f.replicated_expiry_s.expect("a held replicated row");
    assert!(
        expiry > f.promoted_s,
        "the scenario promotes within the old lease: {f:?}"
    );
    let new_holder = f.promoted_s + f.new_holder_after_promote_s.expect("a new holder");
    assert!(
        new_holder >= expiry,
        "taken over at {new_holder} s, before the lease's end at {expiry} s"
    );
    let bound = scenario.lease_ttl + scenario.acquire_interval;
    assert!(
        new_holder - f.promoted_s <= bound.as_secs_f64(),
        "a new holder within ttl + retry of the promotion: {f:?}"
    );
    assert_eq!(f.split_brain_s, 0.0, "{f:?}");
    assert_eq!(report.split_brain_s, 0.0);
}

#[test]
fn sync_crash_and_promote_loses_nothing() {
    let seed = seed(1);
    let report = run_ok(&failover_scenario(ReplicationMode::Sync, s(2)), seed);
    let [f] = report.replication.as_slice() else {
        panic!("one failover: {:?}", report.replication)
    };
    assert_eq!(f.lost_acquisitions, 0, "{f:?}");
    assert_eq!(f.replicated_token, f.max_token_before);
    assert!(f.first_token_after.is_some_and(|t| t > f.max_token_before), "{f:?}");
    assert_eq!(f.split_brain_s, 0.0);
}

#[test]
fn several_failovers_each_on_the_next_timeline() {
    let seed = seed(2);
    let mut scenario = failover_scenario(ReplicationMode::Async, s(10));
    scenario.replication.failovers = vec![s(600), s(1000), s(1400)];
    let report = run_ok(&scenario, seed);
    assert_eq!(report.replication.len(), 3);
    let mut last = 0;
    for (i, f) in report.replication.iter().enumerate() {
        assert_eq!(f.timeline, i as u64 + 2, "{f:?}");
        let first = f.first_token_after.expect("a holder after each promotion");
        assert!(first > last && first > f.max_token_before, "{f:?}");
        last = first;
    }
}

#[test]
fn a_promotion_on_the_old_timeline_gives_tokens_that_go_back_and_s4_catches_it() {
    let seed = seed(1);
    let mut scenario = failover_scenario(ReplicationMode::Async, s(2));
    scenario.replication.no_timeline_bump = true;
    match pgiplock_sim::run(&scenario, seed) {
        Err(SimError::Check(failure)) => assert_eq!(failure.checker, "S4", "{failure}"),
        other => panic!("S4 must fail when the timeline is not bumped: {other:?}"),
    }
    // The same without the break passes (the test above).
}

#[test]
fn a_replicated_run_is_deterministic() {
    let scenario = failover_scenario(ReplicationMode::Async, s(2));
    let a = run_ok(&scenario, 3);
    let b = run_ok(&scenario, 3);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a, b);
}

#[test]
fn failovers_need_a_replica() {
    let mut scenario = quiet(Protocol::Lease, 2, s(60));
    scenario.replication.failovers = vec![s(30)];
    assert!(scenario.validate().is_err());
    let toml = failover_scenario(ReplicationMode::Async, s(2)).to_toml();
    assert!(toml.contains("[replication]"), "{toml}");
    let back = Scenario::from_toml(&toml).expect("the TOML reads back");
    assert_eq!(
        back.replication,
        failover_scenario(ReplicationMode::Async, s(2)).replication
    );
    assert!(!Scenario::default().to_toml().contains("replication"));
}

#[test]
fn the_command_line_compares_async_and_sync_side_by_side() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgiplock-sim"))
        .args([
            "run",
            "--processes",
            "4",
            "--duration",
            "20m",
            "--replication-lag",
            "5s",
            "--failover-at",
            "10m",
            "--compare-replication",
        ])
        .output()
        .expect("pgiplock-sim runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("replication=async") && text.contains("replication=sync"),
        "{text}"
    );
    let header = text
        .lines()
        .find(|l| l.contains("async") && l.contains("sync") && !l.contains('='));
    assert!(header.is_some(), "a two-column table: {text}");
    assert!(text.contains("tokens after each promotion > before"), "{text}");
}

/// The old primary's clock ran an hour ahead: the replicated row's lease ends an hour after
/// the promotion on the promoted server's clock, and only the one-ttl cap from its first
/// sighting bounds the outage: a new holder no earlier than one ttl after the promotion (the
/// first sighting is at or after it) and within ttl + the retry bound of it.
#[test]
fn a_replicated_lease_far_in_the_future_is_taken_over_one_ttl_after_its_sighting() {
    let seed = seed(1);
    let mut scenario = failover_scenario(ReplicationMode::Async, s(2));
    scenario.replication.clock_skew = s(3600);
    let report = run_ok(&scenario, seed);
    let [f] = report.replication.as_slice() else {
        panic!("one failover: {:?}", report.replication)
    };
    let expiry = f.replicated_expiry_s.expect("a held replicated row");
    assert!(
        expiry > f.promoted_s + 3000.0,
        "the lease runs for most of an hour: {f:?}"
    );
    let after = f.new_holder_after_promote_s.expect("a new holder");
    let ttl = scenario.lease_ttl.as_secs_f64();
    assert!(
        after >= ttl,
        "taken over {after} s after the promotion, before one ttl: {f:?}"
    );
    assert!(
        after <= ttl + scenario.acquire_interval.as_secs_f64() + 1.0,
        "the cap, not the hour, freed it: {f:?}"
    );
    assert!(f.first_token_after.is_some_and(|t| t > f.max_token_before), "{f:?}");
    assert_eq!(f.split_brain_s, 0.0, "{f:?}");
}

/// Connections made while the address leads to the standby (before the promotion) land on a
/// read-only server: the sessions report it and reconnect; nobody holds meanwhile.
#[test]
fn before_the_promotion_the_fleet_meets_a_read_only_standby() {
    let report = run_ok(&failover_scenario(ReplicationMode::Async, s(10)), seed(1));
    let read_only = report.session_events.get("read_only_refused").copied().unwrap_or(0)
        + report.session_events.get("read_only").copied().unwrap_or(0);
    assert!(read_only > 0, "{:?}", report.session_events);
    let f = &report.replication[0];
    assert!(f.new_holder_after_promote_s.is_some_and(|t| t >= 0.0), "{f:?}");
}

/// A partition instead of a crash: the old primary stays up `up` with the holder's connection
/// on it. Three processes, ttl 3 s, promoted 2 s after the failover at 600 s.
fn partition_scenario(mode: ReplicationMode, up: Duration) -> Scenario {
    let mut scenario = quiet(Protocol::Lease, 3, s(1200));
    scenario.lease_ttl = s(3);
    scenario.acquire_interval = s(1);
    scenario.server_down = Duration::from_millis(200);
    scenario.replication.mode = mode;
    scenario.replication.lag = Duration::from_millis(500);
    scenario.replication.failovers = vec![s(600)];
    scenario.replication.promote_after = s(2);
    scenario.replication.old_primary_up = Some(up);
    scenario
}

/// Async: the old primary confirms its holder's renewals, so it believes it holds until the old
/// primary is stopped, while the promoted side has its own holder: the split brain lasts from
/// the new holder's acquisition to the old primary's stop, at most `up - promote_after`.
#[test]
fn async_old_primary_left_up_two_holders_until_it_is_stopped() {
    let up = s(60);
    let scenario = partition_scenario(ReplicationMode::Async, up);
    let report = run_ok(&scenario, seed(1));
    let f = &report.replication[0];
    let bound = (up - scenario.replication.promote_after).as_secs_f64();
    assert!(f.split_brain_s > 0.0, "two holders while the old primary is up: {f:?}");
    assert!(f.split_brain_s <= bound, "at most {bound} s: {f:?}");
    let after = f.new_holder_after_promote_s.expect("a holder on the promoted side");
    assert!(
        (f.split_brain_s - (bound - after)).abs() < 0.5,
        "from the new holder to the old primary's stop: {f:?}"
    );
    assert!(f.first_token_after.is_some_and(|t| FenceToken(t).timeline() == 2));
    assert_eq!(report, run_ok(&scenario, seed(1)), "deterministic with two servers too");
}

/// Sync: the old primary's commits wait for the lost synchronous standby, so its holder's
/// renewals go unanswered and it fences itself (`ttl - fence_margin` after its last confirmed
/// renewal was sent) before the promoted server frees the row: no split brain.
#[test]
fn sync_old_primary_left_up_the_old_holder_fences_itself_first() {
    let scenario = partition_scenario(ReplicationMode::Sync, s(60));
    let report = run_ok(&scenario, seed(1));
    let f = &report.replication[0];
    assert_eq!(f.split_brain_s, 0.0, "{f:?}");
    assert_eq!(report.split_brain_s, 0.0);
    assert!(
        report.lost_reasons.get("lease_expired").copied().unwrap_or(0) >= 1,
        "the old holder fenced itself: {:?}",
        report.lost_reasons
    );
    assert!(f.new_holder_after_promote_s.is_some(), "{f:?}");
}
