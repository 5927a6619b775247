//! No message into the void (Lease): a publisher at 1000 messages/s, five real workers, and
//! every kind of failover a standby can see: graceful handovers (SIGTERM), crashes (SIGKILL),
//! silent cuts of the holder's network (a blackholing proxy) and server-side terminations of
//! the holder's backend (`pg_terminate_backend`). Meanwhile a foreign session forges lock-channel
//! markers (`draining`, `released`, `acquired`, `progress`, of the current term and of newer
//! ones).
//!
//! Expected: nothing lost; a graceful handover delivers exactly once (no replay); a takeover's
//! duplicates are flagged as replays and bounded by what was published in the last renew
//! intervals before the fault; holding intervals never overlap; nobody steps down for a forged
//! marker.
//!
//! Counts: env `PGIPLOCK_DELIVERY_ROUNDS` scales every fault count (default 1: 30 graceful, 20
//! crashes, 5 cuts, 5 terminations).

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::quote_ident;
use pgiplock_tests::*;

const STARTUP: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(1);
/// The renew interval that `TTL` implies (ttl / 5): progress markers come at this cadence.
const RENEW: Duration = Duration::from_millis(200);
const FLEET: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Graceful,
    Crash,
    Cut,
    Terminate,
}

/// One failover: what was done to which holder when, and who took over when.
#[derive(Debug)]
struct Failover {
    fault: Fault,
    at_us: i64,
    winner: usize,
    acquired_us: i64,
}

/// Per fault kind: count, replayed per failover, duplicated per failover, takeover ms.
type Row = (usize, Vec<usize>, Vec<usize>, Vec<f64>);

struct Rig {
    fleet: Fleet,
    /// Per worker, the proxy it connects through.
    proxies: BTreeMap<usize, BlackholeProxy>,
    /// Workers that are gone (killed, or stopped).
    gone: Vec<usize>,
    schema: String,
}

impl Rig {
    async fn spawn(&mut self) -> usize {
        let url = database_url();
        let proxy = BlackholeProxy::for_url(&url).await.expect("proxy");
        let mut opts = self.fleet.base().clone();
        opts.database_url = proxy.url(&url);
        let index = self.fleet.spawn_with(opts);
        self.proxies.insert(index, proxy);
        self.fleet.wait_ready(index, STARTUP).await;
        index
    }

    /// The one worker that holds now (waits for one after a failover).
    async fn holder(&self) -> usize {
        let gone = self.gone.clone();
        self.fleet
            .timeline()
            .wait_for("a single holder", STARTUP, |events| {
                let holders: Vec<usize> = holding_intervals(events)
                    .0
                    .into_iter()
                    .filter(|i| i.end == EndKind::Open && !gone.contains(&i.worker))
                    .map(|i| i.worker)
                    .collect();
                (holders.len() == 1).then(|| holders[0])
            })
            .await
    }

    async fn failover(&mut self, fault: Fault, admin: &tokio_postgres::Client) -> Failover {
        let holder = self.holder().await;
        let at_us = now_us();
        match fault {
            Fault::Graceful => self.fleet.worker(holder).terminate(),
            Fault::Crash => self.fleet.worker(holder).kill(),
            Fault::Cut => self.proxies[&holder].cut(),
            Fault::Terminate => {
                let sql = format!(
                    "SELECT pg_terminate_backend(holder_pid) FROM {}.lease WHERE holder IS NOT NULL",
                    quote_ident(&self.schema)
                );
                admin.execute(&sql, &[]).await.expect("terminate the holder's backend");
            }
        }
        let exclude: &[usize] = if fault == Fault::Terminate { &[] } else { &[holder] };
        let (winner, acquired_us, _) = self
            .fleet
            .wait_acquired_after(at_us, exclude, Duration::from_secs(10))
            .await;
        match fault {
            Fault::Graceful | Fault::Crash => {
                self.fleet.wait_exit(holder, Duration::from_secs(5)).await;
                self.gone.push(holder);
                self.spawn().await;
            }
            Fault::Cut => {
                // Its term ended (it fenced itself before the takeover); it goes for good.
                self.fleet.worker(holder).kill();
                self.fleet.wait_exit(holder, Duration::from_secs(5)).await;
                self.gone.push(holder);
                self.proxies.remove(&holder);
                self.spawn().await;
            }
            // It reconnects and stays a standby.
            Fault::Terminate => {}
        }
        Failover {
            fault,
            at_us,
            winner,
            acquired_us,
        }
    }
}

/// Sends forged markers on the lock channel from a session of its own until cancelled.
fn forge(
    url: String,
    schema: String,
    channel: String,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let lock_channel = format!("__PgIpLock__:{channel}");
        let token_sql = format!("SELECT token FROM {}.lease WHERE channel = $1", quote_ident(&schema));
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(40));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return sent,
                _ = tick.tick() => {}
            }
            let token: i64 = match client.query_opt(&token_sql, &[&channel]).await {
                Ok(Some(row)) => row.get(0),
                _ => continue,
            };
            let payload = forged_lease_marker(sent, token);
            if client
                .execute("SELECT pg_notify($1, $2)", &[&lock_channel, &payload])
                .await
                .is_ok()
            {
                sent += 1;
            }
        }
    })
}

fn rounds() -> usize {
    std::env::var("PGIPLOCK_DELIVERY_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_every_failover_a_standby_can_see() {
    let _heavy = heavy_guard().await;
    let url = database_url();
    let schema = TestSchema::on(&url);
    let base = worker_opts(&schema, Protocol::Lease)
        .lease_ttl(TTL)
        .acquire_interval(Duration::from_millis(500));
    let channel = base.channel.clone();
    let mut rig = Rig {
        fleet: Fleet::new(base),
        proxies: BTreeMap::new(),
        gone: Vec::new(),
        schema: schema.name().to_owned(),
    };
    for _ in 0..FLEET {
        rig.spawn().await;
    }
    rig.holder().await;
    let admin = connect(&url).await;
    let stop_forger = tokio_util::sync::CancellationToken::new();
    let forger = forge(
        url.clone(),
        schema.name().to_owned(),
        channel.clone(),
        stop_forger.clone(),
    );
    let stream = Publisher::stream(&url, &channel, Duration::from_millis(1)).await;

    let n = rounds();
    let plan = [
        (Fault::Graceful, 30 * n),
        (Fault::Crash, 20 * n),
        (Fault::Cut, 5 * n),
        (Fault::Terminate, 5 * n),
    ];
    let mut failovers = Vec::new();
    for (fault, count) in plan {
        for _ in 0..count {
            // Let the new holder renew (and acknowledge) a few times before the next fault.
            tokio::time::sleep(RENEW * 3).await;
            failovers.push(rig.failover(fault, &admin).await);
        }
    }
    tokio::time::sleep(RENEW * 3).await;
    let published = stream.stop().await;
    stop_forger.cancel();
    let forged = forger.await.expect("forger");
    let last = published.last().expect("published").0.clone();
    rig.fleet.wait_delivered(&last, Duration::from_secs(10)).await;

    // Nothing lost.
    let lost = rig.fleet.lost_messages(&published);
    assert!(
        lost.is_empty(),
        "{} of {} messages lost: {:?}",
        lost.len(),
        published.len(),
        &lost[..lost.len().min(50)]
    );
    // Tenures never overlap (but a terminated holder may print its loss late), and every event
    // fits.
    rig.fleet.assert_well_formed();
    rig.fleet.assert_no_overlap_but_late_session_loss();

    // Per failover: the winner's replays (flagged) and the duplicates among them.
    let events = rig.fleet.events();
    let mut first_delivery: BTreeMap<String, (usize, i64)> = BTreeMap::new();
    let mut unflagged_duplicates = Vec::new();
    for e in &events {
        if let EventKind::Message { payload, replay } = &e.kind {
            if first_delivery.contains_key(payload) {
                if !replay {
                    unflagged_duplicates.push((payload.clone(), e.worker));
                }
            } else {
                first_delivery.insert(payload.clone(), (e.worker, e.t_us));
            }
        }
    }
    assert!(
        unflagged_duplicates.is_empty(),
        "duplicates not flagged as replays: {unflagged_duplicates:?}"
    );
    let intervals = rig.fleet.intervals();
    let published_at: BTreeMap<&str, i64> = published.iter().map(|(p, t)| (p.as_str(), *t)).collect();
    let mut table: BTreeMap<Fault, Row> = BTreeMap::new();
    for f in &failovers {
        let tenure = intervals
            .iter()
            .find(|i| i.worker == f.winner && i.start_us == f.acquired_us)
            .expect("the winner's tenure");
        let end = tenure.end_us.unwrap_or(i64::MAX);
        let mut replayed = 0;
        let mut duplicated = 0;
        for e in &events {
            if e.worker != f.winner || e.t_us < tenure.start_us || e.t_us > end {
                continue;
            }
            if let EventKind::Message { payload, replay: true } = &e.kind {
                replayed += 1;
                if first_delivery
                    .get(payload)
                    .is_some_and(|(w, t)| *w != f.winner || *t < e.t_us)
                {
                    duplicated += 1;
                    // Bounded: a duplicate was published at most a few renew intervals before
                    // the fault (after the previous holder's newest acknowledged marker).
                    let published = published_at.get(payload.as_str()).copied().unwrap_or(0);
                    let bound = f.at_us - us(RENEW * 3) - 100_000;
                    assert!(
                        published >= bound,
                        "{:?} at {}: duplicate {payload} published {} ms before the fault",
                        f.fault,
                        f.at_us,
                        (f.at_us - published) / 1000
                    );
                }
            }
        }
        if f.fault == Fault::Graceful {
            assert_eq!(replayed, 0, "a graceful handover replays nothing: {f:?}");
        }
        let row = table.entry(f.fault).or_default();
        row.0 += 1;
        row.1.push(replayed);
        row.2.push(duplicated);
        row.3.push(ms(f.at_us, f.acquired_us));
    }
    let ignored = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Warning { kind } if kind == "ignored_markers"))
        .count();
    let step_downs = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Lost { reason } if reason == "superseded"))
        .count();
    assert_eq!(step_downs, 0, "a holder stepped down (superseded)");
    assert!(ignored > 0, "forged markers were not reported as ignored");

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "published {} messages at 1000/s; lost 0; {forged} forged markers sent, {ignored} ignored-marker warnings",
        published.len()
    );
    println!("| fault | n | replayed (median / max) | duplicated (median / max) | takeover ms (median / max) |");
    println!("|---|---|---|---|---|");
    for (fault, (count, mut replayed, mut duplicated, mut takeover)) in table {
        replayed.sort_unstable();
        duplicated.sort_unstable();
        let max_takeover = takeover.iter().copied().fold(0.0, f64::max);
        println!(
            "| {fault:?} | {count} | {} / {} | {} / {} | {:.1} / {:.1} |",
            replayed[replayed.len() / 2],
            replayed[replayed.len() - 1],
            duplicated[duplicated.len() / 2],
            duplicated[duplicated.len() - 1],
            median(&mut takeover),
            max_takeover
        );
    }
    rig.fleet.shutdown(Duration::from_secs(10)).await;
}
