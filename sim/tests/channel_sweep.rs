//! Load against channels and processes: the sweep's channel dimension, and what it shows.
//! Under Lease a process batches the renewals and attempts of all its locks, so its idle load
//! stays about flat as channels grow; under Classic every lock speaks for itself (as Node
//! does), so the load grows with the channels.

use std::time::Duration;

use pgiplock_core::Protocol;
use pgiplock_sim::explore::{grid, sweep, sweep_csv};
use pgiplock_sim::{FaultRates, Scenario};

fn quiet(protocol: Protocol) -> Scenario {
    Scenario {
        protocol,
        duration: Duration::from_secs(600),
        warmup: Duration::from_secs(60),
        fault_rates: FaultRates::default(),
        publish_rate: 0.0,
        ..Scenario::default()
    }
}

fn per_process(protocol: Protocol, processes: &[usize], channels: &[usize]) -> Vec<(usize, usize, f64)> {
    let base = quiet(protocol);
    let scenarios = grid(&base, &[protocol], &[base.acquire_interval], &[], processes, channels);
    assert_eq!(scenarios.len(), processes.len() * channels.len());
    sweep(&scenarios, 1, false)
        .expect("every point runs")
        .into_iter()
        .map(|p| {
            (
                p.scenario.processes,
                p.scenario.channels,
                p.report.statements_per_s_per_process_mean,
            )
        })
        .collect()
}

#[test]
fn lease_load_per_process_stays_flat_as_channels_grow() {
    let points = per_process(Protocol::Lease, &[2, 4], &[1, 64]);
    for &n in &[2, 4] {
        let at = |ch: usize| points.iter().find(|p| p.0 == n && p.1 == ch).expect("point").2;
        let (one, many) = (at(1), at(64));
        assert!(one > 0.0, "an idle fleet still renews: {points:?}");
        // One statement carries a batch: 64 channels cost about what one does.
        assert!(
            many < 1.5 * one,
            "{n} processes: {one} per process at 1 channel, {many} at 64: {points:?}"
        );
    }
}

#[test]
fn classic_load_per_process_grows_with_channels() {
    let points = per_process(Protocol::Classic, &[2], &[1, 16]);
    let (one, many) = (points[0].2, points[1].2);
    assert_eq!((points[0].1, points[1].1), (1, 16));
    assert!(
        many > 8.0 * one,
        "one statement per lock: {one} at 1 channel, {many} at 16: {points:?}"
    );
}

#[test]
fn the_csv_names_the_channel_count_of_each_row() {
    let base = quiet(Protocol::Lease);
    let scenarios = grid(&base, &[Protocol::Lease], &[base.acquire_interval], &[], &[2], &[1, 8]);
    let csv = sweep_csv(&sweep(&scenarios, 1, false).expect("runs"));
    let mut lines = csv.lines();
    assert!(
        lines.next().unwrap().starts_with("protocol,processes,channels,"),
        "{csv}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(
        rows[0].starts_with("lease,2,1,") && rows[1].starts_with("lease,2,8,"),
        "{csv}"
    );
}
