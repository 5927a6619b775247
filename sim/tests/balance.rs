//! Fair share in the simulator: three processes converge to 100 of 300 balanced channels each,
//! make no move while the fleet is steady, a fourth that joins takes about 75 (each by a graceful
//! handover) without oscillation, and after a crash the survivors share the dead one's channels,
//! within one of 100 each, over several seeds (two unless `PGIPLOCK_BALANCE_SEEDS` says more).

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::LockEvent;
use pgiplock_sim::{Action, ActionSpec, FaultKind, FaultRates, FaultSpec, Observed, Scenario, World};

const CHANNELS: usize = 300;
const LEAVE: Duration = Duration::from_secs(10);
const JOIN: Duration = Duration::from_secs(60);
const CRASH: Duration = Duration::from_secs(150);
const END: Duration = Duration::from_secs(240);
/// Sampling step of the convergence checks.
const STEP: Duration = Duration::from_millis(100);

fn scenario() -> Scenario {
    Scenario {
        processes: 4,
        channels: CHANNELS,
        balance: true,
        duration: END + Duration::from_secs(10),
        warmup: Duration::ZERO,
        lease_ttl: Duration::from_secs(2),
        acquire_interval: Duration::from_secs(2),
        publish_rate: 0.0,
        fault_rates: FaultRates::default(),
        restart_delay: None,
        // All four start; process 3 stops gracefully at LEAVE and joins again at JOIN; process 0
        // crashes at CRASH and stays down.
        faults: vec![
            FaultSpec {
                at: LEAVE,
                kind: FaultKind::Stop,
                process: Some(3),
            },
            FaultSpec {
                at: CRASH,
                kind: FaultKind::Crash,
                process: Some(0),
            },
        ],
        actions: vec![ActionSpec {
            at: JOIN,
            action: Action::Start,
            process: Some(3),
        }],
        ..Scenario::default()
    }
}

/// Channels each of `live` holds now.
fn held(world: &World, live: &[usize]) -> BTreeMap<usize, usize> {
    let mut out: BTreeMap<usize, usize> = live.iter().map(|p| (*p, 0)).collect();
    for i in 0..CHANNELS {
        for p in world.holders(i) {
            if let Some(n) = out.get_mut(&p) {
                *n += 1;
            }
        }
    }
    out
}

fn fair(counts: &BTreeMap<usize, usize>) -> bool {
    let share = CHANNELS / counts.len();
    counts.values().sum::<usize>() == CHANNELS && counts.values().all(|n| n.abs_diff(share) <= 1)
}

/// Runs until `until`, sampling; returns when the fleet of `live` first was fair (`None` if
/// never).
fn converge(world: &mut World, live: &[usize], until: Duration) -> Option<Duration> {
    let mut at = Duration::from_micros(world.now().as_micros());
    let mut first = None;
    while at + STEP < until {
        at += STEP;
        world.run_until(at).expect("the run passes every checker");
        if fair(&held(world, live)) {
            first.get_or_insert(at);
        }
    }
    first
}

/// Acquisitions in `[from, to)`.
fn acquisitions(world: &World, from: Duration, to: Duration) -> usize {
    world
        .observations()
        .iter()
        .filter(|o| {
            let at = Duration::from_micros(o.at.as_micros());
            at >= from
                && at < to
                && matches!(
                    o.event,
                    Observed::Lock {
                        event: LockEvent::Acquired { .. },
                        ..
                    }
                )
        })
        .count()
}

#[test]
fn balanced_fleets_converge_stay_put_and_share_a_crashed_members_channels() {
    // Two seeds by default; `PGIPLOCK_BALANCE_SEEDS=N` runs seeds 1..=N.
    let n = std::env::var("PGIPLOCK_BALANCE_SEEDS").map_or(2, |v| v.parse().unwrap_or(2));
    let seeds: Vec<u64> = (1..=n).collect();
    for seed in seeds {
        let mut world = World::new(scenario(), seed).expect("a valid scenario");
        world.record();
        // Four, then three after one leaves.
        let _ = converge(&mut world, &[0, 1, 2, 3], LEAVE);
        let three = converge(&mut world, &[0, 1, 2], JOIN).unwrap_or_else(|| {
            panic!(
                "seed {seed}: three processes never held 100 ± 1 each: {:?}",
                held(&world, &[0, 1, 2, 3])
            )
        });
        assert!(
            fair(&held(&world, &[0, 1, 2])),
            "seed {seed}: fair at the end of the phase"
        );
        // Steady: no move from a second after convergence to the join.
        let steady = acquisitions(&world, three + Duration::from_secs(1), JOIN);
        assert_eq!(steady, 0, "seed {seed}: {steady} acquisitions in a steady fleet");

        // A fourth joins.
        let four = converge(&mut world, &[0, 1, 2, 3], CRASH).unwrap_or_else(|| {
            panic!(
                "seed {seed}: four never held 75 ± 1 each: {:?}",
                held(&world, &[0, 1, 2, 3])
            )
        });
        assert!(
            fair(&held(&world, &[0, 1, 2, 3])),
            "seed {seed}: fair after {four:?} but not until the crash: {:?}, {} acquisitions after",
            held(&world, &[0, 1, 2, 3]),
            acquisitions(&world, four, CRASH)
        );
        let moved = acquisitions(&world, JOIN, CRASH);
        assert!(
            (74..=90).contains(&moved),
            "seed {seed}: {moved} acquisitions for a joiner's 75 channels"
        );
        let after_join = acquisitions(&world, four + Duration::from_secs(1), CRASH);
        assert_eq!(
            after_join, 0,
            "seed {seed}: {after_join} moves after the join converged"
        );
        // Every move was a graceful handover: the joiner's 75 and nothing replayed.
        let replays = world
            .observations()
            .iter()
            .filter(|o| matches!(o.event, Observed::Delivered { replay: true, .. }))
            .count();
        assert_eq!(replays, 0, "seed {seed}");

        // Process 0 crashes: the survivors share its channels.
        let survivors = [1, 2, 3];
        let crash = converge(&mut world, &survivors, END).unwrap_or_else(|| {
            panic!(
                "seed {seed}: survivors never held 100 ± 1 each: {:?}",
                held(&world, &survivors)
            )
        });
        assert!(fair(&held(&world, &survivors)), "seed {seed}: fair at the end");
        let after_crash = acquisitions(&world, crash + Duration::from_secs(1), END);
        assert_eq!(
            after_crash, 0,
            "seed {seed}: {after_crash} moves after the crash converged"
        );
        println!(
            "seed {seed}: a 4th leaves, 3 x {CHANNELS} fair after {:.1} s; it joins again: {moved} moved, fair after {:.1} s; \
             a crash: fair after {:.1} s ({} acquisitions)",
            (three - LEAVE).as_secs_f64(),
            (four - JOIN).as_secs_f64(),
            (crash - CRASH).as_secs_f64(),
            acquisitions(&world, CRASH, END)
        );
        world.finish().expect("the run passes every checker");
    }
}

/// A member that holds nothing renews nothing: when its attempts are held back by its share,
/// it must still ask for fresh counts, or it never learns that a place came free. Three
/// processes, two channels (a share of 0, two places of 1): the holder of one channel is cut
/// off silently for longer than the server takes to drop it; its lease runs out after the ttl,
/// and the member without a channel must take it then, not only when the server drops the cut
/// session (the liveness checker's bound is the ttl's).
#[test]
fn a_member_without_channels_takes_a_silently_cut_members_channel_after_the_ttl() {
    let cut_at = Duration::from_secs(120);
    let scenario = Scenario {
        processes: 3,
        channels: 2,
        balance: true,
        duration: Duration::from_secs(600),
        warmup: Duration::ZERO,
        publish_rate: 0.0,
        fault_rates: FaultRates::default(),
        restart_delay: None,
        cut_duration: Duration::from_secs(400),
        server_keepalive_detect: Duration::from_secs(300),
        server_retransmit_detect: Duration::from_secs(300),
        faults: vec![FaultSpec {
            at: cut_at,
            kind: FaultKind::Cut,
            process: None,
        }],
        ..Scenario::default()
    };
    let ttl = scenario.lease_ttl;
    for seed in 1..=3 {
        let mut world = World::new(scenario.clone(), seed).expect("a valid scenario");
        world.record();
        world
            .run_until(cut_at + Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let live: Vec<usize> = (0..3).collect();
        let before = held(&world, &live);
        let idle: Vec<usize> = before.iter().filter(|(_, n)| **n == 0).map(|(p, _)| *p).collect();
        assert_eq!(idle.len(), 1, "seed {seed}: one member holds nothing: {before:?}");
        // Well after the ttl, long before the server drops the cut session.
        world
            .run_until(cut_at + ttl * 4)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let after = held(&world, &live);
        assert_eq!(
            after.get(&idle[0]),
            Some(&1),
            "seed {seed}: the member that held nothing took the cut member's channel: {before:?} -> {after:?}"
        );
    }
}
