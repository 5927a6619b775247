//! Replays the committed corpus through the targets on stable Rust, and keeps the seed corpus in
//! step with its generator (`PGIPLOCK_WRITE_CORPUS=1` rewrites the seed files).

use std::fs;
use std::path::{Path, PathBuf};

use pgiplock_fuzz::{corpus, lock_events, names, scenario};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

/// Every file of `corpus/<target>`, sorted by name.
fn files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = files(target);
    assert!(files.len() >= 20, "corpus/{target} has only {} files", files.len());
    for (path, bytes) in files {
        // Name the file when it fails.
        let result = std::panic::catch_unwind(|| run(&bytes));
        assert!(result.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
fn replay_lock_events_corpus() {
    replay("lock_events", lock_events);
}

#[test]
fn replay_names_corpus() {
    replay("names", names);
}

#[test]
fn replay_scenario_corpus() {
    replay("scenario", scenario);
}

fn seeds_on_disk(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = corpus_dir(target);
    let write = std::env::var_os("PGIPLOCK_WRITE_CORPUS").is_some();
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed_{name}"));
        if write {
            fs::create_dir_all(&dir).expect("create corpus directory");
            fs::write(&path, &bytes).expect("write seed");
        } else {
            let on_disk = fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is out of date: run PGIPLOCK_WRITE_CORPUS=1 cargo test -p pgiplock-fuzz",
                path.display()
            );
        }
    }
}

#[test]
fn seed_corpus_is_committed() {
    seeds_on_disk("lock_events", corpus::lock_events());
    seeds_on_disk("names", corpus::names());
    seeds_on_disk("scenario", corpus::scenario());
}

#[test]
fn step_encoding_round_trips() {
    // The hand-made seeds decode to what they were built from: the encoder and the decoder agree,
    // so the seeds mean what their names say.
    use pgiplock_fuzz::lock_events::{decode, encode};
    for (name, bytes) in corpus::lock_events() {
        if name.starts_with("random_") {
            continue;
        }
        let (config, seed, steps) = decode(&bytes);
        let raw: Vec<(u8, _)> = bytes_deltas(&bytes)
            .into_iter()
            .zip(steps.iter().map(|(_, s)| s.clone()))
            .collect();
        assert_eq!(encode(config, seed, &raw), bytes, "{name}");
    }
}

/// The raw delta bytes of an encoded input, by re-walking it with the decoder.
fn bytes_deltas(bytes: &[u8]) -> Vec<u8> {
    use pgiplock_fuzz::lock_events::Step;
    use pgiplock_fuzz::Reader;
    let mut r = Reader::new(bytes);
    r.byte();
    r.u64();
    let mut deltas = Vec::new();
    while !r.is_empty() {
        deltas.push(r.byte());
        let _: Step = Step::decode(&mut r);
    }
    deltas
}

#[test]
fn hand_made_seeds_reach_their_states() {
    use pgiplock_fuzz::lock_events::{decode, decode_config, StepDriver};
    let run = |name: &str| {
        let (_, bytes) = corpus::lock_events()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no seed {name}"));
        let (config, seed, steps) = decode(&bytes);
        let mut driver = StepDriver::new(decode_config(config), seed);
        for (delta, step) in &steps {
            driver.step(*delta, step);
        }
        driver
    };
    assert_eq!(run("lease_hold_and_renew").delivered(), 6);
    assert!(run("lease_hold_and_renew").lock.state().phase.is_holder());
    // Buffered after the drain marker, delivered first on winning, then live.
    assert_eq!(run("lease_standby_handover").delivered(), 5);
    assert!(run("lease_standby_handover").lock.state().phase.is_holder());
    // Delivers up to its own drain marker, then re-acquires a full interval later.
    let released = run("lease_graceful_release");
    assert_eq!(released.delivered(), 3 + 1);
    assert!(released.lock.state().phase.is_holder());
    // The release as the drain point: delivers up to its own release marker, says so, then
    // re-acquires a full interval later and delivers what followed the marker.
    let released = run("lease_release_as_drain_point");
    assert_eq!(released.delivered(), 3 + 1);
    assert!(released.lock.state().phase.is_holder());
    assert_eq!(run("lease_self_fence").delivered(), 0);
    assert!(!run("lease_self_fence").lock.state().phase.is_holder());
    assert!(!run("lease_superseded").lock.state().phase.is_holder());
    assert_eq!(
        run("stop_during_attempt").lock.state().phase,
        pgiplock_core::Phase::Stopped
    );
    assert_eq!(
        run("signal_while_holding").lock.state().phase,
        pgiplock_core::Phase::Stopped
    );
    assert_eq!(run("stop_unanswered").lock.state().phase, pgiplock_core::Phase::Stopped);
    // A holder whose session ended attempts again only once its lease has expired (standbys
    // that listened throughout hold the replay), so 20 ms later it is still a standby.
    assert!(!run("old_sessions_and_late_replies").lock.state().phase.is_holder());
    // Likewise after its session was reset for a request timeout.
    assert!(!run("lease_request_timeout").lock.state().phase.is_holder());
    assert_eq!(run("tiny_buffer_overflow").delivered(), 2);
    assert_eq!(run("classic_hold_and_superseded").delivered(), 1);
    assert_eq!(run("defaults_hold_long").delivered(), 20);
    // Stood down: delivered up to its drain marker, then no attempt of its own; competing
    // again wins and delivers.
    let stood_down = run("lease_stand_down");
    assert_eq!(stood_down.delivered(), 2);
    assert!(!stood_down.lock.state().phase.is_holder());
    let competing = run("lease_stand_down_and_compete");
    assert!(competing.lock.state().phase.is_holder());
    assert_eq!(competing.delivered(), 3);
    assert!(!run("lease_standby_stands_down").lock.state().phase.is_holder());
}

/// A small deterministic fuzz on stable Rust: the corpus files with seeded random byte flips,
/// insertions and truncations. `PGIPLOCK_FUZZ_ITERATIONS` sets how many (default 300).
#[test]
fn mutated_corpus_on_stable() {
    let iterations: usize = std::env::var("PGIPLOCK_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut rng = pgiplock_core::SplitMix64::new(0x5eed_f00d);
    let seeds = corpus::lock_events();
    let names_seeds = corpus::names();
    for i in 0..iterations {
        let (_, base) = &seeds[i % seeds.len()];
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below_inclusive(7) {
            let at = rng.below_inclusive(bytes.len() as u64) as usize;
            match rng.below_inclusive(3) {
                0 if at < bytes.len() => bytes[at] = rng.next_u64() as u8,
                1 => bytes.insert(at, rng.next_u64() as u8),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        let result = std::panic::catch_unwind(|| lock_events(&bytes));
        assert!(result.is_ok(), "lock_events fails on {bytes:?}");
        let (_, name) = &names_seeds[i % names_seeds.len()];
        let mut name = name.clone();
        name.insert(rng.below_inclusive(name.len() as u64) as usize, rng.next_u64() as u8);
        let result = std::panic::catch_unwind(|| names(&name));
        assert!(result.is_ok(), "names fails on {name:?}");
    }
}
