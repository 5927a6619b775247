//! Handover and failover of real worker processes: graceful stop (SIGTERM), crash (SIGKILL),
//! and a backend terminated by the server (`pg_terminate_backend`), under both protocols.

use std::time::Duration;

use pgiplock_tests::*;

const STARTUP: Duration = Duration::from_secs(20);

/// Waits until the fleet has a holder and checks, over a short window, that nobody else
/// acquires: exactly one holder.
async fn exactly_one_holder(fleet: &Fleet) -> (usize, i64, Option<u64>) {
    fleet.wait_all_ready(STARTUP).await;
    let holder = fleet.wait_holder(STARTUP).await;
    let second = fleet
        .timeline()
        .try_wait_for(Duration::from_millis(500), |events| {
            let acquired = events
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Acquired { .. }))
                .count();
            (acquired > 1).then_some(acquired)
        })
        .await;
    assert!(
        second.is_none(),
        "more than one acquisition with a stable fleet\n{}",
        fleet.timeline().dump()
    );
    assert_eq!(fleet.holders(), vec![holder.0], "exactly one holder");
    holder
}

async fn sigterm_handover(protocol: Protocol) {
    let schema = TestSchema::new();
    // A 60 s retry interval (and the 10 s default lease) means any quick takeover was driven
    // by the release notification, not by a retry.
    let mut fleet = Fleet::new(worker_opts(&schema, protocol).acquire_interval(Duration::from_secs(60)));
    fleet.spawn_many(5);
    let (holder, _, _) = exactly_one_holder(&fleet).await;

    let channel = fleet.base().channel.clone();
    // A steady stream of messages across the handover: the old holder must deliver everything
    // before its release marker, the new one everything after it.
    let stream = Publisher::stream(&database_url(), &channel, Duration::from_millis(2)).await;
    fleet
        .timeline()
        .wait_for("the holder delivers 20 messages", STARTUP, |events| {
            let n = events
                .iter()
                .filter(|e| e.worker == holder && matches!(e.kind, EventKind::Message { .. }))
                .count();
            (n >= 20).then_some(())
        })
        .await;

    let t_stop = now_us();
    fleet.worker(holder).terminate();
    let released = fleet
        .wait_event(holder, t_stop, "released", Duration::from_secs(5), |k| {
            *k == EventKind::Released
        })
        .await;
    let (next, t_acquired, _) = fleet
        .wait_acquired_after(t_stop, &[holder], Duration::from_secs(5))
        .await;
    let (code, _) = fleet.wait_exit(holder, Duration::from_secs(5)).await;
    assert_eq!(code, Some(0), "a worker stopped by SIGTERM exits 0");
    let handover = ms(t_stop, t_acquired);
    assert!(
        handover < 3000.0,
        "graceful handover took {handover} ms: not driven by the release notification"
    );

    // Let the new holder deliver a message published after its acquisition, then stop.
    let after = stream.count() as u64 + 20;
    fleet
        .timeline()
        .wait_for("the new holder delivers 20 more", Duration::from_secs(5), |events| {
            events
                .iter()
                .any(|e| {
                    e.worker == next
                        && matches!(&e.kind, EventKind::Message { payload, .. } if payload_index(payload) > after)
                })
                .then_some(())
        })
        .await;
    let published = stream.stop().await;
    let last = published.last().map(|(p, _)| p.clone()).unwrap_or_default();
    fleet.wait_delivered(&last, Duration::from_secs(5)).await;
    let lost = fleet.lost_messages(&published);
    eprintln!(
        "[{protocol}] SIGTERM handover: stop -> acquired {handover:.1} ms, released -> acquired {:.1} ms; \
         {} published, {} lost {:?}, {} duplicated; delivered per worker {:?}",
        ms(released.t_us, t_acquired),
        published.len(),
        lost.len(),
        lost,
        fleet.duplicates().len(),
        fleet.deliveries_per_worker()
    );
    // Lossless graceful handover (DESIGN.md section 3): nothing lost, nothing twice.
    assert!(
        lost.is_empty(),
        "messages lost across a graceful handover: {lost:?}\n{}",
        fleet.timeline().dump()
    );
    fleet.assert_invariants();
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
    // Exactly once: a graceful handover replays nothing.
    fleet.assert_no_duplicates();
}

/// Lets the new holder `next` deliver a message published after this call, stops the stream
/// and waits until its last message was delivered; returns what was published.
async fn settle(fleet: &Fleet, stream: MessageStream, next: usize) -> Vec<(String, i64)> {
    let after = stream.count() as u64 + 5;
    fleet
        .timeline()
        .wait_for("the new holder delivers", Duration::from_secs(10), |events| {
            events
                .iter()
                .any(|e| {
                    e.worker == next
                        && matches!(&e.kind, EventKind::Message { payload, .. } if payload_index(payload) > after)
                })
                .then_some(())
        })
        .await;
    let published = stream.stop().await;
    if let Some((last, _)) = published.last() {
        fleet.wait_delivered(last, Duration::from_secs(10)).await;
    }
    published
}

fn payload_index(payload: &str) -> u64 {
    payload.trim_start_matches('m').parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_workers_one_holder_sigterm_hands_over_by_notification_classic() {
    sigterm_handover(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_workers_one_holder_sigterm_hands_over_by_notification_lease() {
    sigterm_handover(Protocol::Lease).await;
}

async fn sigkill_failover(protocol: Protocol) {
    let schema = TestSchema::new();
    let interval = Duration::from_secs(1);
    let mut fleet = Fleet::new(worker_opts(&schema, protocol).acquire_interval(interval));
    fleet.spawn_many(3);
    let (holder, _, _) = exactly_one_holder(&fleet).await;

    let stream = Publisher::stream(&database_url(), &fleet.base().channel, Duration::from_millis(5)).await;
    fleet
        .wait_event(holder, 0, "a delivered message", STARTUP, |k| {
            matches!(k, EventKind::Message { .. })
        })
        .await;

    let t_kill = now_us();
    fleet.worker(holder).kill();
    let (_, signal) = fleet.wait_exit(holder, Duration::from_secs(5)).await;
    assert_eq!(signal, Some(libc::SIGKILL));
    let bound = interval + Duration::from_secs(3);
    let (next, t_acquired, _) = fleet.wait_acquired_after(t_kill, &[holder], bound).await;
    let published = settle(&fleet, stream, next).await;
    let (no_holder, _) = fleet.coverage(t_kill, t_acquired);
    eprintln!(
        "[{protocol}] SIGKILL failover: kill -> w{next} acquired {:.1} ms (retry interval {interval:?}); \
         no holder for {:.1} ms; {} published, {} lost, {} duplicated",
        ms(t_kill, t_acquired),
        no_holder as f64 / 1000.0,
        published.len(),
        fleet.lost_messages(&published).len(),
        fleet.duplicates().len()
    );
    fleet.assert_invariants();
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_holder_fails_over_within_interval_classic() {
    sigkill_failover(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_holder_fails_over_within_interval_lease() {
    sigkill_failover(Protocol::Lease).await;
}

async fn terminated_backend_recovers(protocol: Protocol) {
    let schema = TestSchema::new();
    let interval = Duration::from_secs(1);
    let mut fleet = Fleet::new(worker_opts(&schema, protocol).acquire_interval(interval));
    fleet.spawn_many(3);
    let (holder, _, _) = exactly_one_holder(&fleet).await;
    let app = fleet.wait_ready(holder, STARTUP).await;

    let admin = connect(&database_url()).await;
    let t_term = now_us();
    let terminated = terminate_app(&admin, &app).await;
    assert_eq!(terminated, 1, "the holder's session {app:?} is in pg_stat_activity");
    let lost = fleet
        .wait_event(holder, t_term, "lost", Duration::from_secs(10), |k| {
            matches!(k, EventKind::Lost { .. })
        })
        .await;
    let (next, t_acquired, _) = fleet.wait_acquired_after(t_term, &[], Duration::from_secs(15)).await;
    eprintln!(
        "[{protocol}] pg_terminate_backend of the holder: lost after {:.1} ms ({:?}), w{next} acquired after {:.1} ms",
        ms(t_term, lost.t_us),
        lost.kind,
        ms(t_term, t_acquired)
    );
    // The terminated worker reconnects and competes again: every worker is still alive.
    for w in fleet.workers() {
        assert!(!w.has_exited(), "w{} exited after its backend was terminated", w.index);
    }
    fleet.assert_invariants();
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_terminate_backend_of_holder_recovers_classic() {
    terminated_backend_recovers(Protocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_terminate_backend_of_holder_recovers_lease() {
    terminated_backend_recovers(Protocol::Lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_releases_like_sigterm() {
    let schema = TestSchema::new();
    let mut fleet = Fleet::new(worker_opts(&schema, Protocol::Lease).acquire_interval(Duration::from_secs(60)));
    fleet.spawn_many(2);
    let (holder, _, token) = exactly_one_holder(&fleet).await;
    let t_stop = now_us();
    fleet.worker(holder).signal(libc::SIGINT);
    fleet
        .wait_event(holder, t_stop, "released", Duration::from_secs(5), |k| {
            *k == EventKind::Released
        })
        .await;
    let (_, t_acquired, next_token) = fleet
        .wait_acquired_after(t_stop, &[holder], Duration::from_secs(3))
        .await;
    assert!(next_token > token);
    assert_eq!(fleet.wait_exit(holder, Duration::from_secs(5)).await, (Some(0), None));
    eprintln!(
        "[lease] SIGINT handover: stop -> acquired {:.1} ms",
        ms(t_stop, t_acquired)
    );
    fleet.shutdown(Duration::from_secs(10)).await;
    fleet.assert_invariants();
}
