//! Faults: the schedule (the scenario's own faults plus Poisson arrivals per kind, drawn from the
//! faults' stream), the choice of a target, the injection (stop, crash, cut, terminate, server
//! restart) and the failovers each one starts.

use std::time::Duration;

use pgiplock_core::{SessionId, SplitMix64, Timestamp};

use crate::engine::Event;
use crate::net::ServerMsg;
use crate::scenario::{FaultKind, FaultSpec, FaultTarget, Scenario};
use crate::world::{derive_seed, World, STREAM_FAULTS};

/// A fault hit the process serving the data channel; resolved once another one serves it.
pub(crate) struct PendingFailover {
    kind: FaultKind,
    at: Timestamp,
    holder: (usize, SessionId),
}

pub(crate) struct Faults {
    /// Every fault of the run, in time order.
    pub(crate) specs: Vec<FaultSpec>,
    /// Fault arrivals, then targets.
    rng: SplitMix64,
    pub(crate) pending: Vec<PendingFailover>,
}

impl Faults {
    /// The scenario's faults and, for each kind with a rate, arrivals from the warmup to
    /// `publish_until`.
    pub(crate) fn new(scenario: &Scenario, seed: u64, publish_until: Timestamp) -> Faults {
        let mut rng = SplitMix64::new(derive_seed(seed, STREAM_FAULTS, 0, 0));
        let mut specs = scenario.faults.clone();
        for kind in FaultKind::ALL {
            let per_hour = scenario.fault_rates.of(kind);
            if per_hour <= 0.0 {
                continue;
            }
            let mean = 3600.0 / per_hour;
            let mut t = scenario.warmup.as_secs_f64();
            // Bounded: at most 3600 faults per hour of a bounded duration.
            loop {
                t += -(1.0 - rng.unit()).ln() * mean;
                if t >= publish_until.as_micros() as f64 / 1e6 {
                    break;
                }
                specs.push(FaultSpec {
                    at: Duration::from_secs_f64(t),
                    kind,
                    process: None,
                });
            }
        }
        specs.sort_by_key(|f| (f.at, f.kind));
        Faults {
            specs,
            rng,
            pending: Vec::new(),
        }
    }

    /// Failovers that ended because `holder` now serves the channel: their kinds and latencies.
    pub(crate) fn resolve(&mut self, holder: (usize, SessionId), now: Timestamp) -> Vec<(FaultKind, Duration)> {
        let mut resolved = Vec::new();
        self.pending.retain(|f| {
            if f.holder != holder {
                resolved.push((f.kind, now.saturating_duration_since(f.at)));
                false
            } else {
                true
            }
        });
        resolved
    }
}

impl World {
    fn holder(&self) -> Option<usize> {
        self.checkers.believers[0]
            .iter()
            .copied()
            .find(|p| self.procs[*p].alive())
    }

    pub(crate) fn fault(&mut self, index: usize) {
        let spec = self.faults.specs[index].clone();
        let target = match (spec.process, self.scenario.fault_target) {
            (Some(p), _) => Some(p),
            (None, FaultTarget::Holder) if spec.kind != FaultKind::ServerRestart => {
                self.holder().or_else(|| self.random_alive())
            }
            (None, _) => self.random_alive(),
        };
        let now = self.engine.now;
        // A failover is measured when the fault hits the process that serves the channel.
        let serving = self.serving();
        let hits_server = match spec.kind {
            FaultKind::ServerRestart => serving.is_some(),
            _ => serving.is_some_and(|(sp, _)| Some(sp) == target),
        };
        if let (true, Some(holder)) = (hits_server, serving) {
            if now >= self.warmup {
                self.faults.pending.push(PendingFailover {
                    kind: spec.kind,
                    at: now,
                    holder,
                });
            }
        }
        self.checkers.last_disturbance = now;
        self.metrics.fault(spec.kind);
        self.trace
            .hash(&[300, spec.kind as u64, target.map_or(u64::MAX, |p| p as u64)]);
        self.trace.line(|| format!("  fault {:?} on {target:?}", spec.kind));
        match spec.kind {
            FaultKind::ServerRestart => self.server_restart(),
            kind => {
                let Some(p) = target else { return };
                if !self.procs[p].alive() {
                    return;
                }
                match kind {
                    FaultKind::Stop => self.stop_process(p),
                    FaultKind::Crash => self.crash(p),
                    FaultKind::Cut => self.cut(p),
                    FaultKind::Terminate => self.terminate(p),
                    FaultKind::ServerRestart => {}
                }
            }
        }
    }

    fn random_alive(&mut self) -> Option<usize> {
        let alive: Vec<usize> = (0..self.procs.len()).filter(|p| self.procs[*p].alive()).collect();
        if alive.is_empty() {
            return None;
        }
        let i = self.faults.rng.below_inclusive(alive.len() as u64 - 1) as usize;
        Some(alive[i])
    }

    fn crash(&mut self, p: usize) {
        // The OS closes the sockets: the server sees the end shortly after, unless the link is cut.
        let sessions: Vec<SessionId> = self
            .server
            .conns
            .iter()
            .filter(|(_, c)| c.p == p)
            .map(|(s, _)| *s)
            .collect();
        let cut = self.links[p].cut;
        for session in sessions {
            if let Some(c) = self.server.conns.get_mut(&session) {
                c.client_closed = true;
            }
            if !cut {
                let at = self.engine.now + self.scenario.net_delay + self.scenario.crash_close_delay;
                self.engine.schedule(at, Event::ServerClose { session });
            }
        }
        // Crash: no graceful close of anything.
        self.end_incarnation(p);
        self.schedule_restart(p);
    }

    /// `pg_terminate_backend` on the process's session: the server ends it at once.
    fn terminate(&mut self, p: usize) {
        if let Some(session) = self.procs[p].session() {
            if let Some(pid) = self.server.db.pid(session) {
                self.server_send(session, ServerMsg::Ended);
                self.server.db.terminate_backend(pid);
                self.server.conns.remove(&session);
            }
        }
    }

    fn server_restart(&mut self) {
        let sessions: Vec<SessionId> = self.server.conns.keys().copied().collect();
        for session in sessions {
            self.server_send(session, ServerMsg::Ended);
            self.server.db.close_session(session);
        }
        self.server.conns.clear();
        if let Some(publisher) = self.server.publisher.take() {
            self.server.db.close_session(publisher);
        }
        self.server.up = false;
        self.engine
            .schedule(self.engine.now + self.scenario.server_down, Event::ServerUp);
    }

    /// The restarted server accepts connections again.
    pub(crate) fn server_up(&mut self) {
        self.server.up = true;
        self.checkers.last_disturbance = self.engine.now;
        let (publisher, _) = self.server.db.open_session("publisher");
        self.server.publisher = Some(publisher);
    }
}
