//! Faults: the schedule (the scenario's own faults plus Poisson arrivals per kind, drawn from the
//! faults' stream), the choice of a target, the injection (stop, crash, cut, terminate, server
//! restart; a connect handshake that hangs, a blip while connecting, a lost setup reply, the
//! schema dropped, a read-only window) and the failovers each one starts.

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

/// Faults that wait for a process's next connection to strike.
#[derive(Debug, Clone, Default)]
pub(crate) struct Armed {
    /// Connect attempts whose startup the server leaves unanswered.
    connect_hangs: u32,
    /// Cut the link this long after the next connect attempt starts.
    blip_after: Option<Duration>,
    /// Drop the reply to this setup statement (0: the bootstrap, then each `LISTEN`) of the
    /// next connection.
    setup_reply_loss: Option<u32>,
}

pub(crate) struct Faults {
    /// Every fault of the run, in time order.
    pub(crate) specs: Vec<FaultSpec>,
    /// Fault arrivals, then targets.
    rng: SplitMix64,
    pub(crate) pending: Vec<PendingFailover>,
    /// Per process.
    armed: Vec<Armed>,
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
            armed: vec![Armed::default(); scenario.processes],
        }
    }

    /// Whether process `p`'s connect attempt arriving now must hang (then it is used up).
    pub(crate) fn take_connect_hang(&mut self, p: usize) -> bool {
        let Some(armed) = self.armed.get_mut(p) else {
            return false;
        };
        let hang = armed.connect_hangs > 0;
        armed.connect_hangs = armed.connect_hangs.saturating_sub(1);
        hang
    }

    /// How long after the connect attempt starting now process `p`'s link blips, if armed.
    pub(crate) fn take_blip(&mut self, p: usize) -> Option<Duration> {
        self.armed.get_mut(p)?.blip_after.take()
    }

    /// Whether the reply to process `p`'s setup statement committed now is lost.
    pub(crate) fn take_setup_reply_loss(&mut self, p: usize) -> bool {
        let Some(armed) = self.armed.get_mut(p) else {
            return false;
        };
        match armed.setup_reply_loss {
            Some(0) => {
                armed.setup_reply_loss = None;
                true
            }
            Some(n) => {
                armed.setup_reply_loss = Some(n - 1);
                false
            }
            None => false,
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
    /// The running process whose lock on the data channel believes it holds.
    pub(crate) fn holder(&self) -> Option<usize> {
        self.checkers.believers[0]
            .iter()
            .copied()
            .find(|p| self.procs[*p].alive())
    }

    pub(crate) fn fault(&mut self, index: usize) {
        let spec = self.faults.specs[index].clone();
        let target = match (spec.process, self.scenario.fault_target) {
            (Some(p), _) => Some(p),
            (None, _) if spec.kind.server_wide() => None,
            (None, FaultTarget::Holder) => self.holder().or_else(|| self.random_alive()),
            (None, FaultTarget::Any) => self.random_alive(),
        };
        let now = self.engine.now;
        // A failover is measured when the fault hits the process that serves the channel.
        let serving = self.serving();
        // A dropped schema or a read-only window need not end the holder's tenure (it may not
        // touch the server meanwhile): their cost is measured by the loss window only.
        let hits_server = match spec.kind {
            FaultKind::ServerRestart => serving.is_some(),
            FaultKind::SchemaDrop | FaultKind::ReadOnly | FaultKind::Forge => false,
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
        self.metrics.fault(spec.kind, now, hits_server);
        self.trace
            .hash(&[300, spec.kind as u64, target.map_or(u64::MAX, |p| p as u64)]);
        self.trace.line(|| format!("  fault {:?} on {target:?}", spec.kind));
        match spec.kind {
            FaultKind::ServerRestart => self.server_restart(),
            FaultKind::SchemaDrop => self.schema_drop(),
            FaultKind::ReadOnly => self.read_only_start(),
            FaultKind::Forge => self.forge(),
            kind => {
                let Some(p) = target else { return };
                if !self.procs[p].alive() {
                    return;
                }
                match kind {
                    FaultKind::Stop => match self.host.as_mut().filter(|h| !h.signal_cost.is_zero()) {
                        Some(host) => {
                            let cost = host.signal_cost;
                            let done = host.wait(p, now, cost);
                            let inc = self.procs[p].incarnation();
                            self.engine.schedule(done, Event::Signal { p, inc });
                        }
                        None => self.stop_process(p),
                    },
                    FaultKind::Crash => self.crash(p),
                    FaultKind::Cut => self.cut(p, Some(self.scenario.cut_duration)),
                    FaultKind::Terminate => self.terminate(p),
                    FaultKind::ConnectHang => {
                        self.faults.armed[p].connect_hangs += 1;
                        self.terminate(p);
                    }
                    FaultKind::ConnectBlip => {
                        // Within the attempt's round trip: the connect or its answer is lost.
                        let rtt = self.scenario.net_delay.as_micros() as u64 * 2;
                        let after = Duration::from_micros(self.faults.rng.below_inclusive(rtt));
                        self.faults.armed[p].blip_after = Some(after);
                        self.terminate(p);
                    }
                    FaultKind::SetupReplyLoss => {
                        let which = self.faults.rng.below_inclusive(self.channels.len() as u64);
                        self.faults.armed[p].setup_reply_loss = Some(which as u32);
                        self.terminate(p);
                    }
                    FaultKind::ServerRestart | FaultKind::SchemaDrop | FaultKind::ReadOnly | FaultKind::Forge => {}
                }
            }
        }
    }

    /// Process `p` started a connection attempt: a blip armed for it strikes now.
    pub(crate) fn connect_sent(&mut self, p: usize) {
        if let Some(after) = self.faults.take_blip(p) {
            self.engine.schedule(self.engine.now + after, Event::Blip { p });
        }
    }

    /// The blip of a connection attempt: the link drops everything for `blip_duration`.
    pub(crate) fn blip(&mut self, p: usize) {
        self.trace.line(|| format!("  p{p} link blips"));
        self.cut(p, Some(self.scenario.blip_duration));
    }

    /// An administrator drops the lock schema under the running fleet.
    fn schema_drop(&mut self) {
        self.server.db.drop_schema();
        self.checkers.rows_touched = true;
    }

    /// A foreign session (opened on first use, with its own backend pid, listening nowhere)
    /// sends forged markers on the data channel's lock channel, each in its own transaction:
    /// `draining`, `released`, `acquired`, `drained` and a `progress` marker acknowledging far
    /// ahead, with the current term's token and with the next one, and a `drained` word for the
    /// term before (the one a successor may be waiting to hear it for).
    fn forge(&mut self) {
        if !self.server.up {
            return;
        }
        let session = match self.server.forger {
            Some(session) => session,
            None => {
                let (session, _) = self.server.db.open_session("forger");
                self.server.forger = Some(session);
                session
            }
        };
        let channel = &self.channels[0];
        let token = self.server.db.lease_row(channel.as_str()).map_or(0, |row| row.token);
        let lock_channel = channel.lock_channel().to_owned();
        // Far beyond any real marker number: a believed acknowledgement would cut everything.
        let n = 1u64 << 20;
        self.server.db.advance_to(self.engine.now);
        let before = token.checked_sub(1).map(|t| format!("drained:{t}"));
        for t in [token, token + 1] {
            for payload in [
                format!("draining:{t}"),
                format!("released:{t}"),
                format!("acquired:{t}"),
                format!("drained:{t}"),
                format!("progress:{t}:{n}:{n}"),
            ]
            .into_iter()
            .chain(before.clone().filter(|_| t == token))
            {
                if self.server.db.notify(session, &lock_channel, &payload).is_ok() {
                    self.metrics.forged_notifications += 1;
                }
                self.fan_out();
            }
        }
    }

    /// The server refuses writes for `read_only_duration`.
    fn read_only_start(&mut self) {
        if !self.server.db.read_only() {
            self.server.db.set_read_only(true);
            let end = self.engine.now + self.scenario.read_only_duration;
            self.engine.schedule(end, Event::ReadOnlyEnd);
        }
    }

    /// The read-only window ends.
    pub(crate) fn read_only_end(&mut self) {
        self.server.db.set_read_only(false);
        self.checkers.last_disturbance = self.engine.now;
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

    pub(crate) fn server_restart(&mut self) {
        let sessions: Vec<SessionId> = self.server.conns.keys().copied().collect();
        for session in sessions {
            self.server_send(session, ServerMsg::Ended);
            self.server.db.close_session(session);
        }
        self.server.conns.clear();
        if let Some(publisher) = self.server.publisher.take() {
            self.server.db.close_session(publisher);
        }
        if let Some(forger) = self.server.forger.take() {
            self.server.db.close_session(forger);
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
