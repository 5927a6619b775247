//! Twenty workers started at once on a fresh schema: the bootstrap is serialised, one worker
//! holds, nobody logs an error.

use std::time::Duration;

use pgiplock_tests::*;

async fn twenty_at_once(protocol: Protocol) {
    let _heavy = heavy_guard().await;
    let schema = TestSchema::new();
    let mut fleet = Fleet::new(worker_opts(&schema, protocol).acquire_interval(Duration::from_secs(2)));
    let t_start = now_us();
    fleet.spawn_many(20);
    fleet.wait_all_ready(Duration::from_secs(60)).await;
    let (holder, t_acquired, _) = fleet.wait_holder(Duration::from_secs(30)).await;
    let t_ready = fleet
        .events()
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Ready { .. }))
        .map(|e| e.t_us)
        .max()
        .unwrap_or(t_start);
    // Every standby retries within 2 s: watch one full retry round for a second acquisition.
    let second = fleet
        .timeline()
        .try_wait_for(Duration::from_millis(2500), |events| {
            events
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Acquired { .. }))
                .nth(1)
                .cloned()
        })
        .await;
    assert!(
        second.is_none(),
        "a second acquisition: {second:?}\n{}",
        fleet.timeline().dump()
    );
    assert_eq!(fleet.holders(), vec![holder]);
    let stderr = fleet.stderr_all();
    // Not even a warning: a failed request during a crowded start would show as one.
    for bad in [
        "ERROR",
        "WARN",
        "already exists",
        "duplicate key",
        "tuple concurrently updated",
        "deadlock",
    ] {
        assert!(!stderr.contains(bad), "a worker's stderr contains {bad:?}:\n{stderr}");
    }
    eprintln!(
        "[{protocol}] 20 workers at once: all ready after {:.1} ms, first acquisition after {:.1} ms",
        ms(t_start, t_ready),
        ms(t_start, t_acquired)
    );
    fleet.shutdown(Duration::from_secs(20)).await;
    fleet.assert_invariants();
    for e in fleet.events() {
        if let EventKind::Exited { code, signal } = e.kind {
            assert_eq!(
                (code, signal),
                (Some(0), None),
                "w{} did not exit cleanly on SIGTERM",
                e.worker
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_workers_at_once_on_a_fresh_schema_classic() {
    twenty_at_once(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_workers_at_once_on_a_fresh_schema_lease() {
    twenty_at_once(Protocol::Lease).await;
}
