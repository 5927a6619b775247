//! Fair share across the fleet (Lease, `--balance`): real `pgiplock worker` processes, each
//! competing for the same 300 channels in one balance group on one session.
//!
//! Expected: three workers converge to 100 channels each (±1); a fourth that joins takes about
//! 75 channels, each by a graceful handover, while a publisher sends numbered messages on every
//! channel: nothing lost, nothing delivered twice; a worker killed with SIGKILL leaves its
//! channels to the three survivors, each again within one of 100.
//!
//! Prints what it measured (`cargo test -p pgiplock-tests --test balance -- --nocapture`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgiplock_tests::*;

const CHANNELS: usize = 300;
const STARTUP: Duration = Duration::from_secs(60);
/// Bound on each convergence.
const CONVERGE: Duration = Duration::from_secs(120);
const TTL: Duration = Duration::from_secs(2);

/// Channels each live worker holds, from its events: acquisitions minus drains and losses.
fn held_per_worker(events: &[Event], live: &[usize]) -> BTreeMap<usize, i64> {
    let mut held: BTreeMap<usize, i64> = live.iter().map(|w| (*w, 0)).collect();
    for e in events {
        let Some(count) = held.get_mut(&e.worker) else { continue };
        match e.kind {
            EventKind::Acquired { .. } => *count += 1,
            EventKind::Drained | EventKind::Lost { .. } => *count -= 1,
            _ => {}
        }
    }
    held
}

/// Waits until the `live` workers hold every channel, each within one of `CHANNELS / live`.
async fn converged(fleet: &Fleet, live: &[usize], what: &str) -> BTreeMap<usize, i64> {
    let share = (CHANNELS / live.len()) as i64;
    fleet
        .timeline()
        .wait_for(what, CONVERGE, |events| {
            let held = held_per_worker(events, live);
            let total: i64 = held.values().sum();
            let fair = held.values().all(|n| (*n - share).abs() <= 1);
            (fair && total == CHANNELS as i64).then_some(held)
        })
        .await
}

/// Publishes `<channel index>:<n>` round-robin over `channels`, every `period`, until stopped.
struct Publishing {
    stop: tokio::sync::watch::Sender<bool>,
    published: Arc<Mutex<Vec<(String, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publishing {
    async fn start(channels: Vec<String>, period: Duration) -> Publishing {
        let publisher = Publisher::connect(&database_url()).await;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let published = Arc::new(Mutex::new(Vec::new()));
        let log = published.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0usize;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                let i = n % channels.len();
                let payload = format!("{i}:{n}");
                publisher.publish(&channels[i], &payload).await;
                log.lock().unwrap_or_else(|e| e.into_inner()).push((payload, now_us()));
                n += 1;
            }
        });
        Publishing { stop, published, task }
    }

    async fn stop(self) -> Vec<(String, i64)> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_then_four_workers_share_three_hundred_channels_and_survivors_share_a_crashed_ones() {
    let _heavy = heavy_guard().await;
    let schema = TestSchema::new();
    let prefix = format!("bal_{}_", unique_hex());
    let channels: Vec<String> = (0..CHANNELS).map(|i| format!("{prefix}{i}")).collect();
    let mut opts = worker_opts(&schema, pgiplock::Protocol::Lease)
        .lease_ttl(TTL)
        .acquire_interval(Duration::from_secs(2));
    opts.channel = channels[0].clone();
    for channel in &channels[1..] {
        opts.extra_args.extend(["--channel".to_owned(), channel.clone()]);
    }
    opts.extra_args.extend(["--balance".to_owned(), "fleet".to_owned()]);
    let mut fleet = Fleet::new(opts);

    // Three workers, started together.
    let first = fleet.spawn_many(3);
    fleet.wait_all_ready(STARTUP).await;
    let started = now_us();
    let three = converged(&fleet, &first, "3 workers holding 100 ± 1 each").await;
    let three_ms = ms(started, now_us());
    println!("3 workers x {CHANNELS} channels: {three:?} after {three_ms:.0} ms");

    // A fourth joins while messages flow on every channel.
    let publishing = Publishing::start(channels.clone(), Duration::from_millis(2)).await;
    let before_join = fleet.events().len();
    let joined_at = now_us();
    let fourth = fleet.spawn();
    fleet.wait_ready(fourth, STARTUP).await;
    let all: Vec<usize> = first.iter().copied().chain([fourth]).collect();
    let four = converged(&fleet, &all, "4 workers holding 75 ± 1 each").await;
    let four_ms = ms(joined_at, now_us());
    let published = publishing.stop().await;
    assert!(!published.is_empty(), "something published");
    // Every published message reaches a holder (bounded wait).
    let delivered_all = |events: &[Event]| {
        let delivered: std::collections::BTreeSet<&str> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Message { payload, .. } => Some(payload.as_str()),
                _ => None,
            })
            .collect();
        published
            .iter()
            .all(|(p, _)| delivered.contains(p.as_str()))
            .then_some(())
    };
    let _ = fleet
        .timeline()
        .try_wait_for(Duration::from_secs(30), delivered_all)
        .await;
    let lost = fleet.lost_messages(&published);
    let events = fleet.events();
    let moved = events[before_join..]
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Acquired { .. }))
        .count();
    let duplicates = fleet.duplicates();
    println!(
        "a fourth joins: {four:?} after {four_ms:.0} ms, {moved} channels moved; {} messages published, \
         {} lost, {} duplicated",
        published.len(),
        lost.len(),
        duplicates.len()
    );
    assert!(
        lost.is_empty(),
        "lost {} messages: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(
        duplicates.is_empty(),
        "duplicated: {:?}",
        &duplicates[..duplicates.len().min(20)]
    );
    assert!(
        (70..=100).contains(&moved),
        "{moved} channels moved for a fourth worker's 75"
    );
    let replays = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Message { replay: true, .. }))
        .count();
    assert_eq!(replays, 0, "graceful handovers replay nothing");

    // SIGKILL one: its channels go to the survivors.
    let victim = first[0];
    fleet.worker(victim).kill();
    fleet.wait_exit(victim, Duration::from_secs(10)).await;
    let killed_at = now_us();
    let survivors: Vec<usize> = all.iter().copied().filter(|w| *w != victim).collect();
    let after = converged(&fleet, &survivors, "3 survivors holding 100 ± 1 each").await;
    println!("w{victim} killed: {after:?} after {:.0} ms", ms(killed_at, now_us()));
    fleet.shutdown(Duration::from_secs(30)).await;
}
