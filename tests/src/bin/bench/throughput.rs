//! Throughput and delivery lag: one publisher sends numbered messages carrying their send time
//! (`<seq>:<t_us>`), at a fixed rate (one statement at a time) or flat out (pipelined); a holder
//! `pgiplock worker` (its exclusive subscription, printed as `message` lines) and a
//! `raw-listen` process (a plain tokio-postgres `LISTEN`, printed the same way) receive them
//! side by side. Lag = the receiver's `t_us` − the send time (one host, one wall clock).

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_tests::{now_us, unique_channel, unique_hex, EventKind, Fleet, Protocol, TestSchema, WorkerOpts};
use tokio::process::Command;
use tokio_postgres::NoTls;

use crate::{progress, BoxError};

/// Bound on waits for workers.
const WAIT: Duration = Duration::from_secs(30);
/// Statements in flight when publishing flat out.
pub const PIPELINE: usize = 16;
/// Deliveries are complete when nothing arrived for this long.
const QUIET: Duration = Duration::from_secs(3);

/// What one receiver got.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// Lag of each first delivery, milliseconds.
    pub lag_ms: Vec<f64>,
    /// Distinct messages delivered.
    pub delivered: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
    /// Messages per second: delivered ÷ (last receipt − first send).
    pub rate: f64,
}

/// One run: the publisher and both receivers.
#[derive(Debug)]
pub struct Run {
    /// Messages published.
    pub published: usize,
    /// Achieved publish rate, messages per second.
    pub publish_rate: f64,
    /// The worker holding the lock.
    pub worker: Received,
    /// The raw `LISTEN` client.
    pub raw: Received,
}

fn received(events: &[pgiplock_tests::Event], index: usize, first_send_us: i64) -> Received {
    let mut seen: BTreeMap<u64, f64> = BTreeMap::new();
    let mut duplicates = 0;
    let mut last_us = first_send_us;
    for e in events.iter().filter(|e| e.worker == index) {
        let EventKind::Message { payload, .. } = &e.kind else {
            continue;
        };
        let Some((seq, sent)) = payload.split_once(':') else {
            continue;
        };
        let (Ok(seq), Ok(sent)) = (seq.parse::<u64>(), sent.parse::<i64>()) else {
            continue;
        };
        if seen.insert(seq, (e.t_us - sent) as f64 / 1000.0).is_some() {
            duplicates += 1;
        }
        last_us = last_us.max(e.t_us);
    }
    let span = (last_us - first_send_us) as f64 / 1e6;
    Received {
        delivered: seen.len(),
        rate: if span > 0.0 { seen.len() as f64 / span } else { 0.0 },
        lag_ms: seen.into_values().collect(),
        duplicates,
    }
}

/// Publishes `messages` at `rate` (per second; `None`: as fast as one connection goes) while a
/// `protocol` holder and a raw listener receive them.
pub async fn run(url: &str, protocol: Protocol, rate: Option<f64>, messages: usize) -> Result<Run, BoxError> {
    let schema = TestSchema::named(url, &format!("bench_{}", unique_hex()));
    let channel = unique_channel();
    let mut fleet = Fleet::new(WorkerOpts::new(url, &channel, Some(schema.name()), protocol));
    let holder = fleet.spawn();
    fleet.wait_ready(holder, WAIT).await;
    fleet.wait_holder(WAIT).await;
    let mut raw = Command::new(std::env::current_exe()?);
    raw.args(["raw-listen", "--database-url", url, "--channel", &channel]);
    let raw_index = fleet.spawn_command(raw);
    fleet.wait_ready(raw_index, WAIT).await;

    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let notify = client.prepare("SELECT pg_notify($1, $2)").await?;
    let first_send_us = now_us();
    match rate {
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            for seq in 0..messages {
                tick.tick().await;
                let payload = format!("{seq}:{}", now_us());
                client.execute(&notify, &[&channel, &payload]).await?;
            }
        }
        None => {
            // Flat out: the client pipelines up to PIPELINE statements on its one connection;
            // each message's send time is read as its statement is issued.
            let (client, notify, channel) = (&client, &notify, &channel);
            let mut sends = futures::StreamExt::buffered(
                futures::stream::iter((0..messages).map(|seq| async move {
                    let payload = format!("{seq}:{}", now_us());
                    client.execute(notify, &[channel, &payload]).await
                })),
                PIPELINE,
            );
            while let Some(sent) = futures::StreamExt::next(&mut sends).await {
                sent?;
            }
        }
    }
    let publish_end_us = now_us();
    let publish_rate = messages as f64 / ((publish_end_us - first_send_us) as f64 / 1e6);
    // Wait until both have everything, or nothing new came for a while.
    let count = |fleet: &Fleet| {
        fleet
            .timeline()
            .check(|events| {
                Some(
                    events
                        .iter()
                        .filter(|e| matches!(e.kind, EventKind::Message { .. }))
                        .count(),
                )
            })
            .unwrap_or(0)
    };
    let mut last = (count(&fleet), tokio::time::Instant::now());
    while last.0 < 2 * messages && last.1.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count(&fleet);
        if now != last.0 {
            last = (now, tokio::time::Instant::now());
        }
    }
    let events = fleet.events();
    let run = Run {
        published: messages,
        publish_rate,
        worker: received(&events, holder, first_send_us),
        raw: received(&events, raw_index, first_send_us),
    };
    progress(&format!(
        "  {protocol} at {}: published {messages} at {publish_rate:.0}/s; worker {} delivered at {:.0}/s, raw {} at {:.0}/s",
        rate.map_or("flat out".to_owned(), |r| format!("{r:.0}/s")),
        run.worker.delivered,
        run.worker.rate,
        run.raw.delivered,
        run.raw.rate
    ));
    fleet.shutdown(WAIT).await;
    Ok(run)
}
