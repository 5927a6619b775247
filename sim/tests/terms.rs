//! Terms end before the next one starts: under `Lease`, the core event that ends a process's
//! term — `Lost` (self-fence, supersession, session lost, request timeout), `Drained` (a
//! release reached its marker), `Stopped`, or the end of the process, which takes its session
//! with it — is what cancels the io `Term`'s token, and it must come in global virtual time
//! strictly before any other process's `Acquired` on that channel.
//!
//! Checked from every process's log ([`World::record`]) over several seeds of a fleet with
//! crashes, silent cuts and graceful stops on the holder (at fixed times, so that each kind
//! hits a holder) and drawn at random on any process. `SIM_SEED` and `SIM_RUNS` pick the seeds.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::{LockEvent, Protocol, Timestamp};
use pgiplock_sim::{FaultKind, FaultRates, FaultSpec, Observation, Observed, Scenario, World};

/// A term boundary of one process, in the log's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Boundary {
    at: Timestamp,
    process: usize,
    /// The channel; `None` for the end of the process (every channel's term ends).
    channel: Option<usize>,
    starts: bool,
}

/// The term boundaries in a log: `Acquired` starts a term; `Lost`, `Drained`, `Stopped` and the
/// process's end end it.
fn boundaries(log: &[Observation]) -> Vec<Boundary> {
    log.iter()
        .filter_map(|o| {
            let (channel, starts) = match &o.event {
                Observed::Lock {
                    lock,
                    event: LockEvent::Acquired { .. },
                } => (Some(*lock), true),
                Observed::Lock {
                    lock,
                    event: LockEvent::Lost { .. } | LockEvent::Drained | LockEvent::Stopped { .. },
                } => (Some(*lock), false),
                Observed::Ended => (None, false),
                _ => return None,
            };
            Some(Boundary {
                at: o.at,
                process: o.process,
                channel,
                starts,
            })
        })
        .collect()
}

/// A term that had not ended, in virtual time, before another process's term began.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Overlap {
    channel: usize,
    /// The process whose term was still open (or ended at that very instant).
    holder: usize,
    held_since: Timestamp,
    /// When it ended, if it had (at the very instant of the next start).
    ended: Option<Timestamp>,
    /// The process that started a term, and when.
    next: usize,
    at: Timestamp,
}

/// What the check saw: terms started, and how many of them followed another process's term on
/// the same channel (the handovers and takeovers the property is about).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Checked {
    terms: usize,
    successions: usize,
}

/// Every term start against every other process's term on its channel: that term must have
/// ended strictly earlier in virtual time.
fn check_terms(boundaries: &[Boundary]) -> Result<Checked, Overlap> {
    // (channel, process) -> when its open term began.
    let mut open: BTreeMap<(usize, usize), Timestamp> = BTreeMap::new();
    // (channel, process) -> when its last term began and ended.
    let mut ended: BTreeMap<(usize, usize), (Timestamp, Timestamp)> = BTreeMap::new();
    // channel -> the process of its latest term.
    let mut latest: BTreeMap<usize, usize> = BTreeMap::new();
    let mut checked = Checked::default();
    for b in boundaries {
        match (b.channel, b.starts) {
            (Some(channel), true) => {
                for (&(ch, holder), &held_since) in &open {
                    if ch == channel && holder != b.process {
                        return Err(Overlap {
                            channel,
                            holder,
                            held_since,
                            ended: None,
                            next: b.process,
                            at: b.at,
                        });
                    }
                }
                for (&(ch, holder), &(held_since, end)) in &ended {
                    if ch == channel && holder != b.process && end >= b.at {
                        return Err(Overlap {
                            channel,
                            holder,
                            held_since,
                            ended: Some(end),
                            next: b.process,
                            at: b.at,
                        });
                    }
                }
                open.insert((channel, b.process), b.at);
                checked.terms += 1;
                if latest.insert(channel, b.process).is_some_and(|p| p != b.process) {
                    checked.successions += 1;
                }
            }
            (Some(channel), false) => {
                if let Some(since) = open.remove(&(channel, b.process)) {
                    ended.insert((channel, b.process), (since, b.at));
                }
            }
            (None, _) => {
                let gone: Vec<(usize, usize)> = open.keys().filter(|(_, p)| *p == b.process).copied().collect();
                for key in gone {
                    if let Some(since) = open.remove(&key) {
                        ended.insert(key, (since, b.at));
                    }
                }
            }
        }
    }
    Ok(checked)
}

/// A fleet of three on two channels for two virtual minutes: a crash, a cut and a stop of the
/// holder at fixed times, more of each drawn from the seed on any process, restarts after 1 s.
fn faulty_fleet() -> Scenario {
    let on_holder = |secs: u64, kind: FaultKind| FaultSpec {
        at: Duration::from_secs(secs),
        kind,
        process: None,
    };
    Scenario {
        protocol: Protocol::Lease,
        processes: 3,
        channels: 2,
        duration: Duration::from_secs(120),
        warmup: Duration::from_secs(5),
        acquire_interval: Duration::from_secs(3),
        lease_ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        publish_rate: 20.0,
        fault_rates: FaultRates {
            crash: 30.0,
            cut: 30.0,
            stop: 30.0,
            ..FaultRates::default()
        },
        faults: vec![
            on_holder(20, FaultKind::Crash),
            on_holder(45, FaultKind::Cut),
            on_holder(70, FaultKind::Stop),
            on_holder(95, FaultKind::Crash),
        ],
        restart_delay: Some(Duration::from_secs(1)),
        cut_duration: Duration::from_secs(6),
        ..Scenario::default()
    }
}

#[test]
fn a_term_ends_before_another_process_starts_one() {
    let scenario = faulty_fleet();
    let first = common::seed(0x7e4d_0001);
    let mut successions = 0;
    for seed in first..first + common::runs(6) {
        let mut world = World::new(scenario.clone(), seed).expect("valid scenario");
        world.record();
        if let Err(e) = world.finish() {
            panic!(
                "seed {seed}: {e}\nreproduce with: pgiplock-sim run --seed {seed} {}",
                scenario.to_cli_args()
            );
        }
        let log = boundaries(world.observations());
        match check_terms(&log) {
            Ok(checked) => {
                // Every fixed fault hits a holder, so terms change hands at least that often.
                assert!(
                    checked.successions >= scenario.faults.len(),
                    "seed {seed}: only {checked:?} (reproduce with: pgiplock-sim run --seed {seed} {})",
                    scenario.to_cli_args()
                );
                successions += checked.successions;
            }
            Err(overlap) => panic!(
                "seed {seed}: a term had not ended before the next began: {overlap:?}\n\
                 reproduce with: pgiplock-sim run --seed {seed} {}",
                scenario.to_cli_args()
            ),
        }
    }
    assert!(successions > 0);
}

// ----- the check itself -----

fn ms(n: u64) -> Timestamp {
    Timestamp::from_millis(n)
}

fn start(at: u64, process: usize, channel: usize) -> Boundary {
    Boundary {
        at: ms(at),
        process,
        channel: Some(channel),
        starts: true,
    }
}

fn end(at: u64, process: usize, channel: usize) -> Boundary {
    Boundary {
        at: ms(at),
        process,
        channel: Some(channel),
        starts: false,
    }
}

fn process_ended(at: u64, process: usize) -> Boundary {
    Boundary {
        at: ms(at),
        process,
        channel: None,
        starts: false,
    }
}

#[test]
fn the_check_accepts_terms_that_end_before_the_next() {
    let log = [
        start(10, 0, 0),
        start(11, 1, 1),
        end(20, 0, 0),
        start(21, 1, 0),
        process_ended(30, 1),
        start(31, 2, 0),
        start(32, 0, 1),
        // The same process again: no other process's term is involved.
        end(40, 2, 0),
        start(40, 2, 0),
    ];
    assert_eq!(
        check_terms(&log),
        Ok(Checked {
            terms: 6,
            successions: 3
        })
    );
}

#[test]
fn the_check_finds_a_planted_overlap() {
    let log = [start(10, 0, 0), start(15, 1, 0), end(20, 0, 0)];
    assert_eq!(
        check_terms(&log),
        Err(Overlap {
            channel: 0,
            holder: 0,
            held_since: ms(10),
            ended: None,
            next: 1,
            at: ms(15),
        })
    );
}

#[test]
fn the_check_finds_an_end_at_the_instant_of_the_next_start() {
    let log = [start(10, 0, 0), end(20, 0, 0), start(20, 1, 0)];
    assert!(matches!(check_terms(&log), Err(Overlap { ended: Some(t), .. }) if t == ms(20)));
}

#[test]
fn the_check_ends_every_term_of_a_process_that_ended_and_only_its_own() {
    let ended_then_taken = [start(10, 0, 0), start(11, 0, 1), process_ended(20, 0), start(25, 1, 1)];
    assert!(check_terms(&ended_then_taken).is_ok());
    let another_ended = [start(10, 0, 0), process_ended(20, 2), start(25, 1, 0)];
    assert!(matches!(
        check_terms(&another_ended),
        Err(Overlap { holder: 0, next: 1, .. })
    ));
}

#[test]
fn the_log_gives_the_boundaries() {
    let mut world = World::new(
        Scenario {
            duration: Duration::from_secs(30),
            ..faulty_fleet()
        },
        7,
    )
    .expect("valid scenario");
    world.record();
    world.finish().expect("a clean run");
    let log = boundaries(world.observations());
    let acquired = world
        .observations()
        .iter()
        .filter(|o| {
            matches!(
                o.event,
                Observed::Lock {
                    event: LockEvent::Acquired { .. },
                    ..
                }
            )
        })
        .count();
    assert!(acquired >= 2, "both channels get a holder");
    assert_eq!(log.iter().filter(|b| b.starts).count(), acquired);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at), "in virtual time order");
}

#[test]
fn the_check_finds_an_overlap_planted_in_a_real_log() {
    let mut world = World::new(faulty_fleet(), common::seed(0x7e4d_0001)).expect("valid scenario");
    world.record();
    world.finish().expect("a clean run");
    let mut log = boundaries(world.observations());
    assert!(check_terms(&log).is_ok());
    // The first start that follows another process's term on its channel, and the end of that
    // term: move the end to just after the start, as if the token were cancelled too late.
    let mut latest: BTreeMap<usize, usize> = BTreeMap::new();
    let (next, previous) = log
        .iter()
        .enumerate()
        .find_map(|(i, b)| {
            let channel = b.channel.filter(|_| b.starts)?;
            let previous = latest.insert(channel, b.process).filter(|p| *p != b.process);
            previous.map(|p| (i, (channel, p)))
        })
        .expect("a succession");
    let (channel, holder) = previous;
    let end_at = log[..next]
        .iter()
        .rposition(|b| b.process == holder && !b.starts && b.channel.map_or(true, |c| c == channel))
        .expect("the previous term's end");
    let mut moved = log.remove(end_at);
    moved.at = log[next - 1].at;
    log.insert(next, moved);
    assert!(
        matches!(check_terms(&log), Err(Overlap { holder: h, channel: c, .. }) if h == holder && c == channel),
        "{:?}",
        check_terms(&log)
    );
}
