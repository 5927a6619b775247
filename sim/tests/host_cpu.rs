//! The clients' CPU costs (`client_notify_cost`, `client_reply_cost`, `client_signal_cost`), the
//! server's (`server_statement_cost`) and the cores they share (`host_cores`): k standbys woken at once on C cores send their attempts
//! ceil(i / C) costs after the notification, the signal delays the release by its cost, zero
//! costs leave every run as it was, and runs with costs stay deterministic.

mod common;

use std::time::Duration;

use pgiplock_core::{DbOp, LockEvent, Protocol, SessionOp, Timestamp};
use pgiplock_sim::{Action, ActionSpec, FaultKind, FaultRates, FaultSpec, Observed, Scenario, World};

const STANDBYS: usize = 9;

/// Classic, one holder and nine standbys, statements slow enough (50 ms at the server) that the
/// standbys have handled the drain marker long before the release notification arrives.
fn fleet(cost: Duration, cores: usize) -> Scenario {
    let mut s = common::quiet(Protocol::Classic, STANDBYS + 1, Duration::from_secs(40));
    s.acquire_interval = Duration::from_secs(120);
    s.publish_rate = 0.0;
    s.drift = 0.0;
    s.query_min = Duration::from_millis(50);
    s.query_mean = Duration::from_millis(50);
    s.query_max = Duration::from_millis(50);
    s.client_notify_cost = cost;
    s.host_cores = cores;
    s.actions = vec![ActionSpec {
        at: Duration::from_secs(20),
        action: Action::Release,
        process: None,
    }];
    s
}

/// The holder's `Released` (its reply arrives with the release notification, handled at no
/// cost) and the times the standbys' attempts left after it, sorted.
fn release_and_attempts(s: &Scenario) -> (Timestamp, Vec<Duration>) {
    let mut world = World::new(s.clone(), 3).unwrap();
    world.record();
    world.finish().unwrap();
    let obs = world.observations();
    let released = obs
        .iter()
        .find(|o| {
            o.at >= Timestamp::from_micros(20_000_000)
                && o.event
                    == Observed::Lock {
                        lock: 0,
                        event: LockEvent::Released,
                    }
        })
        .expect("the holder released");
    let holder = released.process;
    let window = released.at + Duration::from_millis(100);
    let mut attempts: Vec<Duration> = obs
        .iter()
        .filter(|o| o.process != holder && o.at >= released.at && o.at <= window)
        .filter(|o| matches!(&o.event, Observed::Request(SessionOp::Lock { op: DbOp::Acquire, .. })))
        .map(|o| o.at.saturating_duration_since(released.at))
        .collect();
    attempts.sort();
    (released.at, attempts)
}

#[test]
fn k_woken_standbys_on_c_cores_attempt_ceil_i_over_c_costs_after_the_notification() {
    let cost = Duration::from_millis(3);
    // Without a cost every standby attempts the moment the notification arrives.
    let (_, instant) = release_and_attempts(&fleet(Duration::ZERO, 2));
    assert_eq!(instant, vec![Duration::ZERO; STANDBYS]);
    for cores in [0, 1, 2, 3, 4] {
        let (_, attempts) = release_and_attempts(&fleet(cost, cores));
        // The holder hears its own release notification too: it takes one of the ten places
        // in the queue, whichever the server's fan-out gave it.
        let rounds = |place: usize| match cores {
            0 => 1,
            c => place.div_ceil(c) as u32,
        };
        let matches_a_place = (1..=STANDBYS + 1).any(|holder_place| {
            let expected: Vec<Duration> = (1..=STANDBYS + 1)
                .filter(|place| *place != holder_place)
                .map(|place| cost * rounds(place))
                .collect();
            expected == attempts
        });
        assert!(
            matches_a_place,
            "{cores} cores: the attempts left {attempts:?} after the release"
        );
    }
}

#[test]
fn the_signal_cost_delays_the_first_statement_of_the_release() {
    let mut s = common::quiet(Protocol::Lease, 3, Duration::from_secs(40));
    s.drift = 0.0;
    s.faults = vec![FaultSpec {
        at: Duration::from_secs(20),
        kind: FaultKind::Stop,
        process: None,
    }];
    let drain_after = |signal: Duration| {
        let mut s = s.clone();
        s.client_signal_cost = signal;
        s.host_cores = 1;
        let mut world = World::new(s, 5).unwrap();
        world.record();
        world.finish().unwrap();
        let stop = Timestamp::from_micros(20_000_000);
        world
            .observations()
            .iter()
            .find(|o| {
                o.at >= stop
                    && matches!(
                        &o.event,
                        Observed::Request(SessionOp::Lock {
                            op: DbOp::Drain { .. } | DbOp::Release { .. },
                            ..
                        })
                    )
            })
            .map(|o| o.at.saturating_duration_since(stop))
            .expect("the holder releases, its drain point")
    };
    assert_eq!(drain_after(Duration::ZERO), Duration::ZERO);
    assert_eq!(drain_after(Duration::from_micros(2_500)), Duration::from_micros(2_500));
}

/// The determinism test's scenario.
fn busy(protocol: Protocol) -> Scenario {
    Scenario {
        protocol,
        processes: 5,
        duration: Duration::from_secs(1800),
        fault_rates: FaultRates {
            stop: 10.0,
            crash: 10.0,
            cut: 10.0,
            terminate: 10.0,
            server_restart: 2.0,
            ..FaultRates::default()
        },
        cut_duration: Duration::from_secs(60),
        ..Scenario::default()
    }
}

#[test]
fn zero_costs_reproduce_the_runs_without_the_model() {
    // Trace hashes of seed 11 from before the client costs existed (and the crash watch: off);
    // Lease's pinned again when releases began to name a successor (it was 75f0d79b52704cd2,
    // then ef08c940f129d415) and when a stopping session began to wait for its successor's
    // `acquired` marker before it closes its connection (6614da9cf0b73e82), and when the
    // release became its own drain point, proven by a `drained` marker, and a stopping process
    // began to exit once its session closed rather than once its locks were removed.
    for (protocol, hash) in [
        (Protocol::Lease, "387b6b15cdc9a4c5"),
        (Protocol::Classic, "77ed5182d68e47e3"),
    ] {
        for cores in [0, 1, 2] {
            let mut s = busy(protocol);
            s.crash_watch = false;
            s.host_cores = cores;
            assert_eq!(common::run_ok(&s, 11).trace_hash, hash, "{protocol}, {cores} cores");
        }
    }
    // With the crash watch (the default), the core count changes nothing either.
    let hashes: Vec<String> = [0, 1, 2]
        .into_iter()
        .map(|cores| {
            let mut s = busy(Protocol::Lease);
            s.host_cores = cores;
            common::run_ok(&s, 11).trace_hash
        })
        .collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
}

#[test]
fn runs_with_costs_are_deterministic_and_differ_from_runs_without() {
    let seed = common::seed(11);
    for protocol in [Protocol::Lease, Protocol::Classic] {
        let mut s = busy(protocol);
        s.client_notify_cost = Duration::from_micros(700);
        s.client_reply_cost = Duration::from_micros(300);
        s.client_signal_cost = Duration::from_millis(2);
        s.server_statement_cost = Duration::from_micros(200);
        s.host_cores = 2;
        let a = common::run_ok(&s, seed);
        let b = common::run_ok(&s, seed);
        assert_eq!(a, b, "{protocol}, seed {seed}");
        assert_eq!(a.table(), b.table());
        assert_ne!(a.trace_hash, common::run_ok(&busy(protocol), seed).trace_hash);
        // The scenario as flags and as TOML carries the costs.
        let back = Scenario::from_toml(&s.to_toml()).unwrap();
        assert_eq!(back, s);
        let flags = s.to_cli_args();
        for flag in [
            "--client-notify-cost 700us",
            "--client-reply-cost 300us",
            "--client-signal-cost 2ms",
            "--server-statement-cost 200us",
            "--host-cores 2",
        ] {
            assert!(flags.contains(flag), "{flag} missing from {flags}");
        }
    }
}
