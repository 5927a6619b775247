//! No herd (`Lease`): a release wakes every standby, yet the handover costs one release and
//! one winning acquisition at the database; the losers write nothing.

use std::time::Duration;

use pgiplock_core::quote_ident;
use pgiplock_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_costs_one_winning_write_not_one_per_standby() {
    let _heavy = heavy_guard().await;
    let schema = TestSchema::new();
    let opts = worker_opts(&schema, Protocol::Lease).acquire_interval(Duration::from_secs(60));
    let lock_channel = pgiplock_core::ChannelName::new(&opts.channel)
        .expect("channel")
        .lock_channel()
        .to_owned();
    let mut fleet = Fleet::new(opts);
    let standbys = 7;
    fleet.spawn_many(standbys + 1);
    fleet.wait_all_ready(Duration::from_secs(30)).await;
    let (holder, _, token) = fleet.wait_holder(Duration::from_secs(20)).await;

    // Record every committed write to the lease table with a trigger of our own.
    let qs = quote_ident(schema.name());
    let admin = connect(&database_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {qs}.write_log (id bigserial PRIMARY KEY, op text, old_holder text, new_holder text, \
               old_token bigint, new_token bigint);
             CREATE FUNCTION {qs}.log_write() RETURNS trigger LANGUAGE plpgsql AS $fn$
             BEGIN
               INSERT INTO {qs}.write_log (op, old_holder, new_holder, old_token, new_token)
               VALUES (TG_OP, OLD.holder, NEW.holder, OLD.token, NEW.token);
               RETURN NULL;
             END $fn$;
             CREATE TRIGGER log_write AFTER INSERT OR UPDATE OR DELETE ON {qs}.lease
               FOR EACH ROW EXECUTE FUNCTION {qs}.log_write();"
        ))
        .await
        .unwrap_or_else(|e| panic!("installing the write log: {e}"));

    let mut markers = Listener::connect(&database_url(), &[&lock_channel]).await;
    let t_stop = now_us();
    fleet.worker(holder).terminate();
    let (_, t_acquired, next_token) = fleet
        .wait_acquired_after(t_stop, &[holder], Duration::from_secs(5))
        .await;
    assert!(next_token > token);
    // Every woken standby has attempted within its wake jitter (20 ms) plus a round trip;
    // watch well beyond that for a second acquisition.
    let second = fleet
        .timeline()
        .try_wait_for(Duration::from_millis(500), |events| {
            events
                .iter()
                .filter(|e| e.t_us > t_stop && matches!(e.kind, EventKind::Acquired { .. }))
                .nth(1)
                .cloned()
        })
        .await;
    assert!(second.is_none(), "a second acquisition: {second:?}");

    let rows = admin
        .query(
            &format!("SELECT op, old_holder, new_holder, old_token, new_token FROM {qs}.write_log ORDER BY id"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the write log: {e}"));
    let mut releases = 0;
    let mut acquisitions = 0;
    let mut others = Vec::new();
    for row in &rows {
        let (op, old_holder, new_holder, old_token, new_token): (
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let renewal = op == "UPDATE" && old_holder.is_some() && old_holder == new_holder && old_token == new_token;
        if renewal {
            continue;
        }
        if op == "UPDATE" && old_holder.is_some() && new_holder.is_none() && old_token == new_token {
            releases += 1;
        } else if op == "UPDATE" && new_holder.is_some() && new_token > old_token {
            acquisitions += 1;
        } else {
            others.push(format!(
                "{op} {old_holder:?}->{new_holder:?} {old_token:?}->{new_token:?}"
            ));
        }
    }
    eprintln!(
        "[lease] handover with {standbys} standbys woken: {releases} release write(s), {acquisitions} acquisition \
         write(s), {} other write(s), {} writes in all (renewals included); stop -> acquired {:.1} ms",
        others.len(),
        rows.len(),
        ms(t_stop, t_acquired)
    );
    assert_eq!(releases, 1, "one release write");
    assert_eq!(acquisitions, 1, "one winning write");
    assert!(others.is_empty(), "losing standbys wrote: {others:?}");

    // The release named its successor, and the successor won.
    let successor = loop {
        let (_, payload) = markers.next(Duration::from_secs(5)).await.expect("the release marker");
        if payload.starts_with("released:") {
            break pgiplock_core::Marker::successor(&payload);
        }
    };
    let winner: Option<i32> = admin
        .query_one(&format!("SELECT holder_pid FROM {qs}.lease"), &[])
        .await
        .unwrap_or_else(|e| panic!("reading the lease: {e}"))
        .get(0);
    assert!(successor.is_some(), "the release named no successor");
    assert_eq!(successor, winner, "the named successor won");

    fleet.shutdown(Duration::from_secs(15)).await;
    fleet.assert_invariants();
    fleet.assert_no_duplicates();
}
