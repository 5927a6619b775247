//! Seed-chosen scenarios with every checker: a handful by default, more with `SIM_RUNS`, from
//! `SIM_SEED` on.

mod common;

use pgiplock_sim::explore::swarm_scenario;

#[test]
fn swarm_runs_pass_every_checker() {
    let first = common::seed(1);
    let runs = common::runs(6);
    let twice = std::env::var("SIM_CHECK_DETERMINISM").is_ok_and(|v| !v.is_empty() && v != "0");
    for i in 0..runs {
        let seed = first.wrapping_add(i);
        let scenario = swarm_scenario(seed);
        if let Err(e) = pgiplock_sim::explore::run_checked(&scenario, seed, twice) {
            panic!("{e}\nreproduce with: pgiplock-sim swarm --seed {seed} --runs 1");
        }
    }
}
