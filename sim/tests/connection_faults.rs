//! The connection faults: a hanging handshake, a blip while connecting, a lost setup reply, a
//! schema dropped under the fleet and a read-only window. Each must be survived through the core
//! session's own deadlines and recovery, with every checker (the phase bounds included) after
//! every event.

mod common;

use std::time::Duration;

use common::{quiet, run_ok};
use pgiplock_core::Protocol;
use pgiplock_sim::explore::{run_checked, swarm_scenario};
use pgiplock_sim::{FaultKind, FaultRates, Report, Scenario};

/// A small fleet with one connection fault at `per_hour`.
fn with_fault(protocol: Protocol, kind: FaultKind, per_hour: f64) -> Scenario {
    let mut s = quiet(protocol, 4, Duration::from_secs(1800));
    s.acquire_interval = Duration::from_secs(5);
    s.publish_rate = 2.0;
    *s.fault_rates.of_mut(kind) = per_hour;
    s
}

fn session_events(r: &Report, name: &str) -> u64 {
    r.session_events.get(name).copied().unwrap_or(0)
}

fn faults(r: &Report, kind: FaultKind) -> u64 {
    r.faults.get(kind.as_str()).copied().unwrap_or(0)
}

#[test]
fn a_hanging_handshake_ends_at_the_connect_timeout_and_the_process_retries() {
    let seed = common::seed(21);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = with_fault(protocol, FaultKind::ConnectHang, 30.0);
        let r = run_ok(&s, seed);
        let n = faults(&r, FaultKind::ConnectHang);
        assert!(n >= 5, "seed {seed}: {}", r.table());
        // Each hang costs one attempt that only the connect deadline ends.
        assert!(
            session_events(&r, "connect_timeout") >= n - 1,
            "seed {seed}: {}",
            r.table()
        );
        let (count, max) = common::failover(&r, FaultKind::ConnectHang);
        if count > 0 {
            // The terminated holder is replaced by a standby's retry, or it reconnects itself
            // after the connect timeout.
            let bound = s.retry_bound().max(s.connect_timeout).as_secs_f64() + 2.0;
            assert!(max <= bound, "seed {seed}: {max} > {bound}\n{}", r.table());
        }
    }
}

#[test]
fn a_blip_while_connecting_is_survived_through_the_connect_timeout() {
    let seed = common::seed(22);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = with_fault(protocol, FaultKind::ConnectBlip, 30.0);
        let r = run_ok(&s, seed);
        let n = faults(&r, FaultKind::ConnectBlip);
        assert!(n >= 5, "seed {seed}: {}", r.table());
        assert!(
            session_events(&r, "connect_timeout") >= n - 1,
            "seed {seed}: {}",
            r.table()
        );
        assert_eq!(r.unresolved_failovers, 0, "seed {seed}: {}", r.table());
    }
}

#[test]
fn a_lost_setup_reply_resets_the_connection_at_the_setup_timeout() {
    let seed = common::seed(23);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = with_fault(protocol, FaultKind::SetupReplyLoss, 30.0);
        let r = run_ok(&s, seed);
        let n = faults(&r, FaultKind::SetupReplyLoss);
        assert!(n >= 5, "seed {seed}: {}", r.table());
        assert!(
            session_events(&r, "setup_timeout") >= n - 1,
            "seed {seed}: {}",
            r.table()
        );
        assert_eq!(r.unresolved_failovers, 0, "seed {seed}: {}", r.table());
    }
}

#[test]
fn a_dropped_schema_is_bootstrapped_again_and_locking_resumes() {
    let seed = common::seed(24);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut s = with_fault(protocol, FaultKind::SchemaDrop, 20.0);
        s.channels = 2;
        let r = run_ok(&s, seed);
        assert!(faults(&r, FaultKind::SchemaDrop) >= 3, "seed {seed}: {}", r.table());
        assert!(session_events(&r, "schema_missing") >= 3, "seed {seed}: {}", r.table());
        // Tokens restart with the new table (S4 is exempt across a drop), and the lock is held
        // again after every drop.
        assert!(
            r.acquisitions > faults(&r, FaultKind::SchemaDrop),
            "seed {seed}: {}",
            r.table()
        );
        assert!(r.loss_window_pct < 5.0, "seed {seed}: {}", r.table());
    }
}

#[test]
fn a_read_only_window_is_reported_and_left_until_writes_work_again() {
    let seed = common::seed(25);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let s = with_fault(protocol, FaultKind::ReadOnly, 10.0);
        let r = run_ok(&s, seed);
        let n = faults(&r, FaultKind::ReadOnly);
        assert!(n >= 2, "seed {seed}: {}", r.table());
        assert!(
            session_events(&r, "read_only_refused") >= n,
            "seed {seed}: {}",
            r.table()
        );
        assert_eq!(
            session_events(&r, "read_only_refused"),
            session_events(&r, "read_only"),
            "every refusal resets its connection: {}",
            r.table()
        );
        match protocol {
            // The holder's renewal is a write: it loses at each window, and the lock is back
            // after it.
            Protocol::Lease => assert!(r.acquisitions >= n, "seed {seed}: {}", r.table()),
            // The holder's ownership check only reads: it keeps the lock through the window
            // while the standbys' attempts are refused.
            Protocol::Classic => assert!(r.loss_window_s < 1.0, "seed {seed}: {}", r.table()),
        }
    }
}

/// Seed-chosen scenarios with every connection fault on, besides the swarm's own faults.
#[test]
fn swarm_runs_with_every_connection_fault_pass_every_checker() {
    let first = common::seed(500);
    let runs = common::runs(8);
    for i in 0..runs {
        let seed = first.wrapping_add(i);
        let mut s = swarm_scenario(seed);
        s.fault_rates = FaultRates {
            connect_hang: 20.0,
            connect_blip: 20.0,
            setup_reply_loss: 20.0,
            schema_drop: 4.0,
            read_only: 4.0,
            ..s.fault_rates
        };
        if let Err(e) = run_checked(&s, seed, true) {
            panic!(
                "{e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
                s.to_cli_args()
            );
        }
    }
}

/// Fails in core: after a schema drop the token sequence starts again at 1, and a standby's
/// replay log still holds the previous generation's `acquired:1`; when it wins the new row's
/// term 1 (the reply arrives before its own `acquired:1`), `Replay::take` matches that older
/// marker as its own (it compares the token, not the sender pid) and delivers everything after
/// it as live, unflagged, though its holder delivered it already. Reproduce with
/// `pgiplock-sim run --seed 504 ... --strict-d1 true` (the swarm scenario below).
#[test]
fn a_schema_drop_never_makes_a_winner_deliver_unflagged_what_was_delivered() {
    let seed = 504;
    let mut s = swarm_scenario(seed);
    s.fault_rates = FaultRates {
        connect_hang: 20.0,
        connect_blip: 20.0,
        setup_reply_loss: 20.0,
        schema_drop: 4.0,
        read_only: 4.0,
        ..s.fault_rates
    };
    s.strict_d1 = true;
    if let Err(e) = run_checked(&s, seed, false) {
        panic!(
            "{e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
            s.to_cli_args()
        );
    }
}
