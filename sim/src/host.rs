//! The clients' costs: what a process spends handling a notification, a reply or a signal before
//! the statement it causes leaves, and the cores the fleet's processes share.
//!
//! A notification, a reply and a statement take CPU time on one of the cores; a signal takes
//! time of the process alone (its wake-up and shutdown path, measured as a latency), so it
//! delays the process but holds no core.
//!
//! Arithmetic, not events: when the server sends a message, its arrival time is known (the
//! one-way delay is constant), so the time its handling ends is computed there and the message
//! is delivered to the process's session then. Jobs take a core in the order they are booked,
//! which is their arrival order because every link has the same delay; a process handles its
//! own jobs one at a time (one session task), and `cores` processes at most run at once. With
//! no costs set the world has no `Host` and nothing changes.
//!
//! The server may share the host (as on one machine with the fleet): `server_statement_cost` is
//! a backend's CPU time per statement, on the same cores, before the statement's own latency.

use std::time::Duration;

use pgiplock_core::Timestamp;

use crate::scenario::Scenario;

/// The host CPU shared by the simulated clients.
pub(crate) struct Host {
    /// When each core is free again; empty: a core per process (no contention).
    cores: Vec<Timestamp>,
    /// When each process has handled its last booked job.
    busy_until: Vec<Timestamp>,
    pub(crate) notify_cost: Duration,
    pub(crate) reply_cost: Duration,
    pub(crate) signal_cost: Duration,
    pub(crate) statement_cost: Duration,
}

impl Host {
    /// The host of `scenario`, or `None` when it sets no client cost.
    pub(crate) fn of(scenario: &Scenario) -> Option<Host> {
        let costs = [
            scenario.client_notify_cost,
            scenario.client_reply_cost,
            scenario.client_signal_cost,
            scenario.server_statement_cost,
        ];
        if costs.iter().all(Duration::is_zero) {
            return None;
        }
        Some(Host {
            cores: vec![Timestamp::ZERO; scenario.host_cores],
            busy_until: vec![Timestamp::ZERO; scenario.processes],
            notify_cost: scenario.client_notify_cost,
            reply_cost: scenario.client_reply_cost,
            signal_cost: scenario.client_signal_cost,
            statement_cost: scenario.server_statement_cost,
        })
    }

    /// Books a job of process `p` that becomes ready at `ready` and needs `cost` of CPU; the
    /// time it is done. It starts once the process finished its previous job and a core is
    /// free (the one free first).
    pub(crate) fn run(&mut self, p: usize, ready: Timestamp, cost: Duration) -> Timestamp {
        if cost.is_zero() {
            return ready;
        }
        let own = self.busy_until.get(p).copied().unwrap_or(Timestamp::ZERO);
        let done = self.on_a_core(ready.max(own), cost);
        if let Some(own) = self.busy_until.get_mut(p) {
            *own = done;
        }
        done
    }

    /// Books a statement's CPU at the server's backend that is ready to run it at `ready` (its
    /// previous statement done): the time its CPU work is done.
    pub(crate) fn run_statement(&mut self, ready: Timestamp) -> Timestamp {
        if self.statement_cost.is_zero() {
            return ready;
        }
        self.on_a_core(ready, self.statement_cost)
    }

    /// Process `p` waits `delay` on its own, on no core (a wake-up of its threads), once it is
    /// ready at `ready` and done with its previous job: the time it is done.
    pub(crate) fn wait(&mut self, p: usize, ready: Timestamp, delay: Duration) -> Timestamp {
        if delay.is_zero() {
            return ready;
        }
        let own = self.busy_until.get(p).copied().unwrap_or(Timestamp::ZERO);
        let done = ready.max(own) + delay;
        if let Some(own) = self.busy_until.get_mut(p) {
            *own = done;
        }
        done
    }

    /// A job on the core free first, not before `ready`: the time it is done.
    fn on_a_core(&mut self, ready: Timestamp, cost: Duration) -> Timestamp {
        let mut start = ready;
        let core = self
            .cores
            .iter()
            .enumerate()
            .min_by_key(|(i, free)| (**free, *i))
            .map(|(i, _)| i);
        if let Some(core) = core {
            start = start.max(self.cores[core]);
        }
        let done = start + cost;
        if let Some(core) = core {
            self.cores[core] = done;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cores: usize, processes: usize) -> Host {
        let s = Scenario {
            processes,
            host_cores: cores,
            client_notify_cost: Duration::from_millis(1),
            ..Scenario::default()
        };
        Host::of(&s).expect("a cost is set")
    }

    #[test]
    fn k_jobs_at_once_on_c_cores_end_at_ceil_i_over_c_costs() {
        let cost = Duration::from_millis(1);
        for cores in 1..=4 {
            let mut h = host(cores, 9);
            let t = Timestamp::from_micros(5_000);
            for p in 0..9 {
                let i = p as u32 + 1;
                assert_eq!(
                    h.run(p, t, cost),
                    t + cost * i.div_ceil(cores as u32),
                    "cores {cores}, job {i}"
                );
            }
        }
    }

    #[test]
    fn a_process_handles_its_jobs_one_at_a_time_and_no_cores_means_one_each() {
        let cost = Duration::from_millis(2);
        let mut h = host(0, 3);
        let t = Timestamp::from_micros(1_000);
        assert_eq!(h.run(0, t, cost), t + cost);
        assert_eq!(h.run(1, t, cost), t + cost);
        assert_eq!(h.run(0, t, cost), t + cost * 2);
        // Ready after the process is idle again: no wait.
        let later = Timestamp::from_micros(100_000);
        assert_eq!(h.run(0, later, cost), later + cost);
        assert_eq!(h.run(2, later, Duration::ZERO), later);
    }

    #[test]
    fn statements_share_the_cores_with_the_clients() {
        let mut s = Scenario {
            processes: 2,
            host_cores: 1,
            client_notify_cost: Duration::from_millis(1),
            server_statement_cost: Duration::from_millis(2),
            ..Scenario::default()
        };
        let mut h = Host::of(&s).expect("a cost is set");
        let t = Timestamp::from_micros(0);
        assert_eq!(h.run(0, t, Duration::from_millis(1)), t + Duration::from_millis(1));
        assert_eq!(h.run_statement(t), t + Duration::from_millis(3));
        assert_eq!(h.run(1, t, Duration::from_millis(1)), t + Duration::from_millis(4));
        s.host_cores = 0;
        let mut h = Host::of(&s).expect("a cost is set");
        assert_eq!(h.run_statement(t), t + Duration::from_millis(2));
    }

    #[test]
    fn a_wait_holds_the_process_but_no_core() {
        let mut h = host(1, 2);
        let t = Timestamp::from_micros(0);
        let ms = Duration::from_millis;
        assert_eq!(h.wait(0, t, ms(5)), t + ms(5));
        // The other process has the one core at once; process 0 queues behind its own wait.
        assert_eq!(h.run(1, t, ms(1)), t + ms(1));
        assert_eq!(h.run(0, t, ms(1)), t + ms(6));
    }

    #[test]
    fn no_cost_no_host() {
        assert!(Host::of(&Scenario::default()).is_none());
    }
}
