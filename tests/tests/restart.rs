//! A server restart (throwaway cluster): every session dies; afterwards some worker holds again
//! and no two ever held at once.

use std::sync::Arc;
use std::time::Duration;

use pgiplock_testkit::cluster::TempCluster;
use pgiplock_tests::*;

async fn survives_restart(protocol: Protocol) {
    let _heavy = heavy_guard().await;
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .expect("cluster start task")
        .unwrap_or_else(|e| panic!("cannot start a throwaway cluster: {e}"));
    let cluster = Arc::new(cluster);
    let url = cluster.url();
    let schema = TestSchema::on(&url);
    let mut fleet = Fleet::new(
        WorkerOpts::new(&url, &unique_channel(), Some(schema.name()), protocol)
            .acquire_interval(Duration::from_secs(1)),
    );
    fleet.spawn_many(3);
    fleet.wait_all_ready(Duration::from_secs(20)).await;
    let (holder, _, _) = fleet.wait_holder(Duration::from_secs(20)).await;

    let t_restart = now_us();
    let restarting = cluster.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .expect("restart task")
        .unwrap_or_else(|e| panic!("restart failed: {e}"));
    let t_up = now_us();
    let lost = fleet
        .wait_event(holder, t_restart, "lost", Duration::from_secs(20), |k| {
            matches!(k, EventKind::Lost { .. })
        })
        .await;
    let (next, t_acquired, _) = fleet.wait_acquired_after(t_restart, &[], Duration::from_secs(30)).await;
    assert!(
        t_acquired >= lost.t_us,
        "the old holder reported its loss before anyone acquired"
    );

    // The new holder receives notifications: publish and wait for its delivery.
    let publisher = Publisher::connect(&url).await;
    let payload = format!("after restart {}", unique_hex());
    publisher.publish(&fleet.base().channel, &payload).await;
    let deliverer = fleet.wait_delivered(&payload, Duration::from_secs(10)).await;
    assert_eq!(deliverer, next);
    eprintln!(
        "[{protocol}] server restart: pg_ctl restart took {:.1} ms; holder lost after {:.1} ms ({:?}); \
         w{next} acquired {:.1} ms after the restart began, {:.1} ms after pg_ctl returned",
        ms(t_restart, t_up),
        ms(t_restart, lost.t_us),
        lost.kind,
        ms(t_restart, t_acquired),
        ms(t_up, t_acquired)
    );
    for w in fleet.workers() {
        assert!(!w.has_exited(), "w{} exited across the restart", w.index);
    }
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
    drop(schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_some_worker_holds_again_classic() {
    survives_restart(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_some_worker_holds_again_lease() {
    survives_restart(Protocol::Lease).await;
}
