//! Fencing tokens (`Lease`): strictly increasing across many handovers of every kind, and an
//! old term can neither renew nor release a newer one.

use std::collections::BTreeMap;
use std::time::Duration;

use pgiplock_core::quote_ident;
use pgiplock_tests::*;
use tokio_postgres::Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_over_fifty_mixed_handovers() {
    let _heavy = heavy_guard().await;
    let schema = TestSchema::new();
    let interval = Duration::from_millis(300);
    let mut fleet = Fleet::new(worker_opts(&schema, Protocol::Lease).acquire_interval(interval));
    let channel = fleet.base().channel.clone();
    fleet.spawn_many(3);
    let admin = connect(&database_url()).await;
    let holder_pid_sql = format!(
        "SELECT holder_pid FROM {}.lease WHERE channel = $1 AND holder IS NOT NULL",
        quote_ident(schema.name())
    );

    let t_begin = now_us();
    let (mut holder, _, mut token) = fleet.wait_holder(Duration::from_secs(20)).await;
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..50 {
        let fault = ["sigterm", "sigkill", "pg_terminate_backend"][i % 3];
        let t_fault = now_us();
        match fault {
            "sigterm" => fleet.worker(holder).terminate(),
            "sigkill" => fleet.worker(holder).kill(),
            _ => {
                let row = admin
                    .query_one(&holder_pid_sql, &[&channel])
                    .await
                    .unwrap_or_else(|e| panic!("holder of {channel:?}: {e}"));
                let pid: i32 = row.get(0);
                let done = admin
                    .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .unwrap_or_else(|e| panic!("pg_terminate_backend({pid}): {e}"));
                assert!(done.get::<_, bool>(0), "the holder's backend {pid} was terminated");
            }
        }
        let (next, t_next, next_token) = fleet.wait_acquired_after(t_fault, &[], Duration::from_secs(15)).await;
        if fault != "pg_terminate_backend" {
            // Keep three workers competing; started after the handover so that a standby's
            // retry, not a newcomer's first attempt, is what is measured.
            fleet.spawn();
        }
        assert!(
            next_token > token,
            "handover {i} ({fault}): token {next_token:?} after {token:?}\n{}",
            fleet.timeline().dump()
        );
        times.entry(fault).or_default().push(ms(t_fault, t_next));
        holder = next;
        token = next_token;
    }
    let total = ms(t_begin, now_us());

    // Across the whole run, in time order, every acquisition carries a larger token.
    let mut acquisitions: Vec<(i64, usize, Option<u64>)> = fleet
        .events()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Acquired { token } => Some((e.t_us, e.worker, token)),
            _ => None,
        })
        .collect();
    acquisitions.sort();
    assert!(acquisitions.len() >= 51);
    for pair in acquisitions.windows(2) {
        assert!(
            pair[0].2.is_some() && pair[1].2 > pair[0].2,
            "tokens do not strictly increase: {pair:?}"
        );
    }
    for (fault, list) in &times {
        let mean = list.iter().sum::<f64>() / list.len() as f64;
        let max = list.iter().cloned().fold(0.0, f64::max);
        eprintln!(
            "[lease] {fault}: {} handovers, fault -> next acquisition mean {mean:.1} ms, max {max:.1} ms (retry {interval:?})",
            list.len()
        );
    }
    eprintln!(
        "[lease] 50 mixed handovers in {total:.0} ms; tokens {:?}..{:?}; {} workers started",
        acquisitions.first().and_then(|a| a.2),
        acquisitions.last().and_then(|a| a.2),
        fleet.workers().len()
    );
    fleet.assert_invariants();
    fleet.shutdown(Duration::from_secs(15)).await;
    fleet.assert_invariants();
}

/// Acquisition result: (acquired, token, remaining_us, stale_pid, stale_app).
type AcquireRow = (bool, Option<i64>, Option<i64>, Option<i32>, Option<String>);

struct LeaseSql {
    schema: String,
    channel: String,
    lock_channel: String,
}

impl LeaseSql {
    async fn acquire(&self, client: &Client, app: &str, ttl: Duration) -> AcquireRow {
        let sql = format!(
            "SELECT acquired, token, remaining_us, stale_pid, stale_app FROM {}.acquire_v2($1, $2, $3, $4)",
            quote_ident(&self.schema)
        );
        let row = client
            .query_one(&sql, &[&self.channel, &self.lock_channel, &app, &us(ttl)])
            .await
            .unwrap_or_else(|e| panic!("acquire: {e}"));
        (
            row.get::<_, Option<bool>>(0).unwrap_or(false),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
        )
    }

    async fn renew(&self, client: &Client, app: &str, token: i64, ttl: Duration) -> bool {
        let sql = format!(
            "SELECT {}.renew_v2($1, $2, $3, $4, $5, NULL, NULL)",
            quote_ident(&self.schema)
        );
        let row = client
            .query_one(&sql, &[&self.channel, &self.lock_channel, &app, &token, &us(ttl)])
            .await
            .unwrap_or_else(|e| panic!("renew: {e}"));
        row.get::<_, Option<bool>>(0).unwrap_or(false)
    }

    async fn release(&self, client: &Client, app: &str, token: i64) -> bool {
        let sql = format!("SELECT {}.release_v2($1, $2, $3, $4)", quote_ident(&self.schema));
        let row = client
            .query_one(&sql, &[&self.channel, &self.lock_channel, &app, &token])
            .await
            .unwrap_or_else(|e| panic!("release: {e}"));
        row.get::<_, Option<bool>>(0).unwrap_or(false)
    }

    /// (holder, holder_pid, token, expires_at as text) of the row.
    async fn row(&self, client: &Client) -> (Option<String>, Option<i32>, i64, Option<String>) {
        let sql = format!(
            "SELECT holder, holder_pid, token, expires_at::text FROM {}.lease WHERE channel = $1",
            quote_ident(&self.schema)
        );
        let row = client
            .query_one(&sql, &[&self.channel])
            .await
            .unwrap_or_else(|e| panic!("lease row: {e}"));
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }
}

fn with_app_name(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap_or_else(|e| panic!("pg_backend_pid: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_or_release_with_an_old_token_changes_nothing() {
    let url = database_url();
    let schema = TestSchema::new();
    // Let a worker bootstrap the lease schema (tables and functions), then leave.
    let mut bootstrap = Fleet::new(worker_opts(&schema, Protocol::Lease));
    bootstrap.spawn();
    bootstrap.wait_holder(Duration::from_secs(20)).await;
    bootstrap.shutdown(Duration::from_secs(10)).await;
    bootstrap.assert_invariants();

    let channel = unique_channel();
    let lease = LeaseSql {
        schema: schema.name().to_owned(),
        lock_channel: format!("__PgIpLock__:{channel}"),
        channel,
    };
    let (app_a, app_b) = (format!("pa_{}", unique_hex()), format!("pb_{}", unique_hex()));
    let a = connect(&with_app_name(&url, &app_a)).await;
    let b = connect(&with_app_name(&url, &app_b)).await;
    let mut listener = Listener::connect(&url, &[&lease.lock_channel]).await;
    let long = Duration::from_secs(60);

    // A holds a short lease; once it expired, B takes over while A's session lives.
    let (acquired, ta, _, _, _) = lease.acquire(&a, &app_a, Duration::from_millis(100)).await;
    assert!(acquired);
    let ta = ta.expect("token of A");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (tb, stale_pid, stale_app) = loop {
        let (acquired, token, remaining, stale_pid, stale_app) = lease.acquire(&b, &app_b, long).await;
        if acquired {
            break (token.expect("token of B"), stale_pid, stale_app);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never took over the expired lease"
        );
        // Retry when the server says the lease ends (as a standby does), never before.
        tokio::time::sleep(Duration::from_micros(remaining.unwrap_or(10_000).max(1_000) as u64)).await;
    };
    assert!(tb > ta, "takeover token {tb} > {ta}");
    assert_eq!(
        stale_pid,
        Some(backend_pid(&a).await),
        "the takeover names A's live backend"
    );
    assert_eq!(stale_app.as_deref(), Some(app_a.as_str()));

    let before = lease.row(&b).await;
    listener
        .drain_until_sentinel(&lease.lock_channel, Duration::from_secs(5))
        .await;
    assert!(!lease.renew(&a, &app_a, ta, long).await, "A's late renew of term {ta}");
    assert!(!lease.release(&a, &app_a, ta).await, "A's late release of term {ta}");
    assert_eq!(lease.row(&b).await, before, "old-term renew/release changed the lease");
    let notes = listener
        .drain_until_sentinel(&lease.lock_channel, Duration::from_secs(5))
        .await;
    assert!(notes.is_empty(), "old-term release notified: {notes:?}");

    // Same identity, old term: A holds again (term tc); its term-ta messages still do nothing,
    // nor do B's term-tb ones.
    assert!(lease.release(&b, &app_b, tb).await, "B releases its own term");
    let notes = listener
        .drain_until_sentinel(&lease.lock_channel, Duration::from_secs(5))
        .await;
    assert_eq!(notes, vec![(lease.lock_channel.clone(), format!("released:{tb}"))]);
    let (acquired, tc, _, _, _) = lease.acquire(&a, &app_a, long).await;
    assert!(acquired);
    let tc = tc.expect("token of A's second term");
    assert!(tc > tb);
    let notes = listener
        .drain_until_sentinel(&lease.lock_channel, Duration::from_secs(5))
        .await;
    assert_eq!(notes, vec![(lease.lock_channel.clone(), format!("acquired:{tc}"))]);
    let before = lease.row(&a).await;
    assert!(
        !lease.renew(&a, &app_a, ta, long).await,
        "A renews with its older token"
    );
    assert!(!lease.release(&a, &app_a, ta).await, "A releases with its older token");
    assert!(!lease.renew(&b, &app_b, tb, long).await, "B renews a released term");
    assert!(!lease.release(&b, &app_b, tb).await, "B releases a released term");
    assert_eq!(lease.row(&a).await, before, "old-term renew/release changed the lease");
    let notes = listener
        .drain_until_sentinel(&lease.lock_channel, Duration::from_secs(5))
        .await;
    assert!(notes.is_empty(), "old-term release notified: {notes:?}");

    // The current term still works.
    assert!(lease.renew(&a, &app_a, tc, long).await);
    assert!(lease.release(&a, &app_a, tc).await);
    eprintln!("[lease] tokens: A {ta}, B took over with {tb}, A again {tc}; old-term renew/release refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_term_was_taken_reports_lost_at_its_next_renewal() {
    let schema = TestSchema::new();
    let ttl = Duration::from_secs(3); // renews every 600 ms
    let mut fleet = Fleet::new(
        worker_opts(&schema, Protocol::Lease)
            .lease_ttl(ttl)
            .acquire_interval(Duration::from_secs(1)),
    );
    fleet.spawn();
    let (holder, _, token) = fleet.wait_holder(Duration::from_secs(20)).await;
    let token = token.expect("a Lease token");

    // Another term begins behind the holder's back, without any notification (as if its
    // notification were lost): only the renewal can tell.
    let admin = connect(&database_url()).await;
    let t_taken = now_us();
    let updated = admin
        .execute(
            &format!(
                "UPDATE {}.lease SET holder = 'intruder', holder_pid = NULL, token = token + 1 WHERE channel = $1",
                quote_ident(schema.name())
            ),
            &[&fleet.base().channel],
        )
        .await
        .unwrap_or_else(|e| panic!("taking the term: {e}"));
    assert_eq!(updated, 1);
    let lost = fleet
        .wait_event(holder, t_taken, "lost", ttl, |k| matches!(k, EventKind::Lost { .. }))
        .await;
    assert_eq!(
        lost.kind,
        EventKind::Lost {
            reason: "superseded".into()
        }
    );
    // The intruder has no session: the worker takes the lease back with a newer token.
    let (_, t_again, again) = fleet.wait_acquired_after(lost.t_us, &[], Duration::from_secs(10)).await;
    assert!(
        again > Some(token + 1),
        "token {again:?} after the intruder's {}",
        token + 1
    );
    eprintln!(
        "[lease] term taken behind the holder's back: lost (superseded) after {:.1} ms, re-acquired with {again:?} after {:.1} ms",
        ms(t_taken, lost.t_us),
        ms(t_taken, t_again)
    );
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
}
