//! The network and the server's end of it: one link per process that a fault can silently cut,
//! the messages each way (FIFO per direction, a fixed one-way delay), the server's connections
//! and its dead-peer detection (keepalive, retransmission timeout), the client's
//! `tcp_user_timeout`, the server executing the sessions' operations on the database model (lock
//! operations, schema bootstrap, `LISTEN`, `UNLISTEN`), its notification fan-out and the
//! publisher.

use std::time::Duration;

use pgiplock_core::{
    AwaitOutcome, DbError, DbOp, OpId, OpReply, Protocol, Reply, SessionId, SessionOp, SessionRequest, SplitMix64,
    Timestamp,
};

use crate::db::{AwaitState, DbConfig, SimDb};
use crate::engine::Event;
use crate::scenario::Scenario;
use crate::session_map::SessionMap;
use crate::world::{derive_seed, World, STREAM_SERVER};

#[derive(Debug, Clone)]
pub(crate) enum ClientMsg {
    Connect {
        attempt: u64,
    },
    Request {
        request: SessionRequest,
    },
    /// The cancel request for the statement running on the connection (the crash watch's wait).
    Cancel,
    Close,
}

#[derive(Debug, Clone)]
pub(crate) enum ServerMsg {
    ConnectOk {
        attempt: u64,
        app: String,
        pid: i32,
    },
    Refused {
        attempt: u64,
        /// For the connection limit (SQLSTATE 53300), not because the server is down.
        limit: bool,
    },
    Reply {
        id: OpId,
        result: Result<OpReply, DbError>,
        /// The schema generation it ran in (for the checkers, not the client).
        generation: u64,
    },
    Notify {
        channel: String,
        payload: String,
        pid: i32,
    },
    /// The server closed the connection (FIN), or answered a dead one (RST).
    Ended,
}

/// One process's link to the server; it outlives the process's incarnations.
pub(crate) struct Link {
    pub(crate) cut: bool,
    /// Incremented at every cut: a message sent in an older epoch was in flight and is lost.
    epoch: u64,
    to_server_last: Timestamp,
    to_client_last: Timestamp,
}

impl Link {
    pub(crate) fn new() -> Link {
        Link {
            cut: false,
            epoch: 0,
            to_server_last: Timestamp::ZERO,
            to_client_last: Timestamp::ZERO,
        }
    }

    /// The current cut's number (the last one's while not cut).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The server's view of one client connection.
pub(crate) struct ServerConn {
    pub(crate) p: usize,
    inc: u32,
    pub(crate) client_closed: bool,
    busy_until: Timestamp,
    last_rx: Timestamp,
    retransmit_armed: bool,
}

/// The number the trace hash folds in for a wait's outcome.
fn outcome_tag(outcome: AwaitOutcome) -> u64 {
    match outcome {
        AwaitOutcome::Gone => 1,
        AwaitOutcome::Expired => 2,
        AwaitOutcome::Released => 3,
        AwaitOutcome::Timeout => 4,
        _ => 5,
    }
}

/// A crash watch's wait in progress on a server connection.
pub(crate) struct Wait {
    id: OpId,
    /// The holder's backend pid.
    pid: i32,
    /// When it answers `timeout`.
    end: Timestamp,
}

/// The PostgreSQL server: the database model, its connections, and the publisher's session.
pub(crate) struct Server {
    pub(crate) db: SimDb,
    /// The crash watch's waits in progress, per server connection.
    pub(crate) waits: std::collections::BTreeMap<SessionId, Wait>,
    pub(crate) up: bool,
    /// Query latencies.
    rng: SplitMix64,
    pub(crate) conns: SessionMap<ServerConn>,
    pub(crate) publisher: Option<SessionId>,
    /// The foreign session that forges lock-channel markers (opened by the first `Forge`).
    pub(crate) forger: Option<SessionId>,
    publisher_busy: Timestamp,
    next_message: u64,
}

impl Server {
    pub(crate) fn new(seed: u64, terminate_permitted: bool) -> Server {
        let mut db = SimDb::new(DbConfig { terminate_permitted });
        let (publisher, _) = db.open_session("publisher");
        Server {
            db,
            up: true,
            rng: SplitMix64::new(derive_seed(seed, STREAM_SERVER, 0, 0)),
            conns: SessionMap::default(),
            waits: std::collections::BTreeMap::new(),
            publisher: Some(publisher),
            forger: None,
            publisher_busy: Timestamp::ZERO,
            next_message: 0,
        }
    }

    fn query_latency(&mut self, s: &Scenario) -> Duration {
        let min = s.query_min.as_micros() as f64;
        let extra = (s.query_mean.as_micros() as f64 - min).max(0.0);
        let draw = -(1.0 - self.rng.unit()).ln() * extra;
        let us = (min + draw).min(s.query_max.as_micros() as f64);
        Duration::from_micros(us as u64) + s.replication.commit_wait()
    }
}

impl World {
    // ----- client side -----

    pub(crate) fn client_send(&mut self, p: usize, session: SessionId, msg: ClientMsg) {
        let now = self.engine.now;
        let one_way = self.scenario.net_delay;
        let link = &mut self.links[p];
        if link.cut {
            self.client_lost(p, session, &msg, now);
            return;
        }
        let at = (now + one_way).max(link.to_server_last);
        link.to_server_last = at;
        let epoch = link.epoch;
        self.engine.schedule(
            at,
            Event::ToServer {
                p,
                epoch,
                sent_at: now,
                session,
                msg,
            },
        );
    }

    /// A client message that the cut link swallowed.
    fn client_lost(&mut self, p: usize, session: SessionId, msg: &ClientMsg, sent_at: Timestamp) {
        match msg {
            ClientMsg::Request { .. } => {
                let inc = self.procs[p].incarnation();
                let at = sent_at + self.scenario.client_user_timeout;
                self.engine
                    .schedule(at.max(self.engine.now), Event::ClientUserTimeout { p, inc, session });
            }
            ClientMsg::Close => {
                if let Some(c) = self.server.conns.get_mut(&session) {
                    c.client_closed = true;
                }
            }
            ClientMsg::Connect { .. } | ClientMsg::Cancel => {}
        }
    }

    /// The client side closes a session (reset, exit): a FIN if the link passes, else a zombie.
    pub(crate) fn client_close(&mut self, p: usize, session: SessionId) {
        if let Some(c) = self.server.conns.get_mut(&session) {
            c.client_closed = true;
        }
        self.client_send(p, session, ClientMsg::Close);
    }

    pub(crate) fn client_recv(
        &mut self,
        p: usize,
        inc: u32,
        epoch: u64,
        sent_at: Timestamp,
        session: SessionId,
        msg: ServerMsg,
    ) {
        if self.links[p].epoch != epoch {
            self.server_lost(session, sent_at);
            return;
        }
        if !self.procs[p].runs(inc) {
            // The socket died with its process: the client's stack answers with a reset.
            if let Some(c) = self.server.conns.get_mut(&session) {
                c.client_closed = true;
                let at = self.engine.now + self.scenario.net_delay;
                self.engine.schedule(at, Event::ServerClose { session });
            }
            return;
        }
        match msg {
            ServerMsg::ConnectOk { attempt, app, pid } => self.connected(p, session, attempt, app, pid),
            ServerMsg::Refused { attempt, limit } => self.refused(p, attempt, limit),
            ServerMsg::Reply { id, result, generation } => self.db_reply(p, session, id, result, generation),
            ServerMsg::Notify { channel, payload, pid } => self.notification(p, session, channel, payload, pid),
            ServerMsg::Ended => self.session_ended(p, session),
        }
    }

    /// The client's unacknowledged data went unanswered for `client_user_timeout`.
    pub(crate) fn client_user_timeout(&mut self, p: usize, inc: u32, session: SessionId) {
        if self.links[p].cut {
            self.session_timed_out(p, inc, session);
        }
    }

    // ----- server side -----

    pub(crate) fn server_recv(&mut self, p: usize, epoch: u64, sent_at: Timestamp, session: SessionId, msg: ClientMsg) {
        if self.links[p].epoch != epoch {
            self.client_lost(p, session, &msg, sent_at);
            return;
        }
        let now = self.engine.now;
        if let Some(c) = self.server.conns.get_mut(&session) {
            c.last_rx = now;
        }
        match msg {
            ClientMsg::Connect { attempt } => {
                let inc = self.procs[p].incarnation();
                if !self.server.up {
                    let refused = ServerMsg::Refused { attempt, limit: false };
                    self.server_send_to(p, inc, SessionId(0), refused);
                    return;
                }
                if self
                    .scenario
                    .max_connections
                    .is_some_and(|max| self.server.db.backends() >= max)
                {
                    self.trace
                        .line(|| format!("  p{p} connect {attempt} refused: too many clients"));
                    let refused = ServerMsg::Refused { attempt, limit: true };
                    self.server_send_to(p, inc, SessionId(0), refused);
                    return;
                }
                if self.faults.take_connect_hang(p) {
                    // The server accepts and the startup never completes: no backend, no answer.
                    self.trace.line(|| format!("  p{p} connect {attempt} hangs"));
                    return;
                }
                let app = format!("p{p}.{inc}.{attempt}");
                let (session, pid) = self.server.db.open_session(&app);
                self.checkers.rows_touched = true;
                self.server.conns.insert(
                    session,
                    ServerConn {
                        p,
                        inc,
                        client_closed: false,
                        busy_until: now,
                        last_rx: now,
                        retransmit_armed: false,
                    },
                );
                self.server_send(session, ServerMsg::ConnectOk { attempt, app, pid });
            }
            ClientMsg::Request { request } => {
                if !self.server.db.is_alive(session) {
                    // The backend is gone: the server's TCP stack answers with a reset.
                    let inc = self.procs[p].incarnation();
                    self.server_send_to(p, inc, session, ServerMsg::Ended);
                    return;
                }
                let latency = self.server.query_latency(&self.scenario);
                let Some(c) = self.server.conns.get_mut(&session) else {
                    return;
                };
                let mut ready = c.busy_until.max(now);
                if let Some(host) = self.host.as_mut() {
                    ready = host.run_statement(ready);
                }
                let at = ready + latency;
                c.busy_until = at;
                self.engine.schedule(at, Event::ServerCommit { p, session, request });
            }
            ClientMsg::Cancel => {
                // The wait ends with the cancel's error (SQLSTATE 57014); anything else has
                // finished already.
                if let Some(wait) = self.server.waits.remove(&session) {
                    let error = DbError::server("57014", "canceling statement due to user request".to_owned());
                    let generation = self.server.db.generation();
                    self.server_send(
                        session,
                        ServerMsg::Reply {
                            id: wait.id,
                            result: Err(error),
                            generation,
                        },
                    );
                }
            }
            ClientMsg::Close => {
                self.server.db.close_session(session);
                self.server.conns.remove(&session);
            }
        }
    }

    /// A crash watch's wait looks at the holder's rows again.
    pub(crate) fn await_wake(&mut self, session: SessionId, id: OpId) {
        let Some(wait) = self.server.waits.get(&session).filter(|w| w.id == id) else {
            return;
        };
        let (pid, end) = (wait.pid, wait.end);
        self.server.db.advance_to(self.engine.now);
        let state = self.server.db.await_step(pid, end);
        self.await_state(session, id, pid, end, state);
    }

    /// Answers a wait that is done, or keeps it and schedules its next look.
    fn await_state(&mut self, session: SessionId, id: OpId, pid: i32, end: Timestamp, state: AwaitState) {
        match state {
            AwaitState::Done(outcome) => {
                self.server.waits.remove(&session);
                self.trace.hash(&[206, outcome_tag(outcome)]);
                let generation = self.server.db.generation();
                self.server_send(
                    session,
                    ServerMsg::Reply {
                        id,
                        result: Ok(OpReply::Await(outcome)),
                        generation,
                    },
                );
            }
            AwaitState::Waiting { wake } => {
                self.server.waits.insert(session, Wait { id, pid, end });
                self.engine.schedule(wake, Event::AwaitWake { session, id });
            }
        }
    }

    /// Sessions ended: a wait on one that held its holder advisory lock answers `gone` at once
    /// (the model's backend leaves `pg_stat_activity` with its locks); a waiting session that
    /// ended takes its wait with it.
    pub(crate) fn waits_gone(&mut self) {
        let ended = self.server.db.take_ended();
        if self.server.waits.is_empty() {
            return;
        }
        for (session, pid, holder_lock) in ended {
            self.server.waits.remove(&session);
            if !holder_lock {
                continue;
            }
            let gone: Vec<(SessionId, OpId)> = self
                .server
                .waits
                .iter()
                .filter(|(_, w)| w.pid == pid)
                .map(|(s, w)| (*s, w.id))
                .collect();
            for (waiting, id) in gone {
                self.server.waits.remove(&waiting);
                self.trace.hash(&[206, outcome_tag(AwaitOutcome::Gone)]);
                let generation = self.server.db.generation();
                self.server_send(
                    waiting,
                    ServerMsg::Reply {
                        id,
                        result: Ok(OpReply::Await(AwaitOutcome::Gone)),
                        generation,
                    },
                );
            }
        }
    }

    /// The server runs one operation of `session` (one transaction, committed at once).
    pub(crate) fn commit(&mut self, p: usize, session: SessionId, request: SessionRequest) {
        if !self.server.db.is_alive(session) {
            return;
        }
        let now = self.engine.now;
        self.server.db.advance_to(now);
        let SessionRequest { id, op, .. } = request;
        let (result, statements) = match &op {
            SessionOp::Lock { lock, target, op } => {
                let result = self
                    .server
                    .db
                    .execute(session, target.protocol, &target.channel, target.lease_ttl, op);
                // S1 looks at the rows again only after a statement that may have changed an
                // owner: not after a renewal, a drain, a refused attempt or an error.
                let rows_unchanged = match (op, &result) {
                    (DbOp::Renew { .. } | DbOp::Drain { .. } | DbOp::Drained { .. }, _) | (_, Err(_)) => true,
                    (DbOp::Acquire, Ok(Reply::Acquire(r))) => !r.acquired,
                    _ => false,
                };
                if !rows_unchanged {
                    self.checkers.rows_touched = true;
                }
                // Process p's lock i is on channel i.
                let li = usize::try_from(lock.0).ok().filter(|li| *li < self.channels.len());
                let acquired = matches!(result, Ok(Reply::Acquire(ref r)) if r.acquired);
                if let Ok(li) = usize::try_from(lock.0) {
                    let generation = self.server.db.generation();
                    match (op, &result) {
                        // D2: where each term's drain marker went into the stream.
                        (DbOp::Drain { token: Some(t) }, Ok(_)) => {
                            self.checkers.drained_at.insert((li, generation, t.0), now);
                        }
                        (DbOp::Release { token: Some(t) }, Ok(Reply::Release { released: true })) => {
                            self.checkers.released_at.insert((li, generation, t.0), now);
                        }
                        (DbOp::Drained { token }, Ok(_)) => {
                            self.checkers.release_drained(li, generation, token.0);
                        }
                        // D2: a term that follows a graceful release replays nothing to a
                        // winner that was listening when the drain marker went out.
                        (DbOp::Acquire, Ok(Reply::Acquire(r))) => {
                            if let (true, Some(token), Some(previous)) = (r.acquired, r.token, r.previous) {
                                self.checkers.term_followed(li, generation, previous, token.0);
                            }
                        }
                        _ => {}
                    }
                }
                self.trace
                    .hash(&[200, p as u64, li.map_or(u64::MAX, |li| li as u64), u64::from(acquired)]);
                if let Some(li) = li {
                    if let Some(row) = self.server.db.lease_row(target.channel.as_str()) {
                        let generation = self.server.db.generation();
                        self.checkers.lease_row(&mut self.metrics, li, row.token, generation);
                    }
                }
                (result.map(OpReply::Lock), 1)
            }
            // One statement for many locks' renewals or attempts, as the io crate's
            // `renew_many` and `acquire_many`.
            SessionOp::RenewMany { entries, .. } | SessionOp::AcquireMany { entries, .. } => {
                self.checkers.rows_touched = true;
                let ops: Vec<_> = entries
                    .iter()
                    .map(|e| (e.target.channel.clone(), e.target.lease_ttl, e.op.clone()))
                    .collect();
                let result = self.server.db.execute_batch(session, &ops);
                if let Ok(replies) = &result {
                    for (entry, reply) in entries.iter().zip(replies) {
                        self.batch_entry_committed(p, entry, reply);
                    }
                }
                (result.map(OpReply::Batch), 1)
            }
            // Fair share, as the io crate's `balance_v1` (one statement).
            SessionOp::Balance {
                group, register, leave, ..
            } => {
                self.trace
                    .hash(&[205, p as u64, u64::from(*leave), register.len() as u64]);
                (
                    self.server
                        .db
                        .balance(session, group, register, *leave)
                        .map(OpReply::Balance),
                    1,
                )
            }
            // As the io crate prepares a session: the schema bootstrap batch (one statement),
            // then `LISTEN` (`UNLISTEN`) on the channels of each lock (`ChannelName::listened`).
            SessionOp::Bootstrap { protocol, schema } => {
                self.checkers.rows_touched = true;
                self.trace.hash(&[201, p as u64]);
                (
                    self.server
                        .db
                        .bootstrap(session, *protocol, schema)
                        .map(|()| OpReply::Done),
                    1,
                )
            }
            SessionOp::Listen { channel, protocol } => {
                self.trace.hash(&[202, p as u64]);
                let db = &mut self.server.db;
                let result = channel.listened(*protocol).try_for_each(|c| db.listen(session, c));
                if result.is_ok() && channel.as_str() == self.channels[0].as_str() {
                    self.procs[p].listening_since = Some((session, now));
                }
                (
                    result.map(|()| OpReply::Done),
                    channel.listened(*protocol).count() as u64,
                )
            }
            SessionOp::ListenMany { channels } => {
                self.trace.hash(&[204, p as u64]);
                let db = &mut self.server.db;
                let result = channels.iter().try_for_each(|(channel, protocol)| {
                    channel.listened(*protocol).try_for_each(|c| db.listen(session, c))
                });
                if result.is_ok() && channels.iter().any(|(c, _)| c.as_str() == self.channels[0].as_str()) {
                    self.procs[p].listening_since = Some((session, now));
                }
                let statements = channels
                    .iter()
                    .map(|(c, protocol)| c.listened(*protocol).count() as u64)
                    .sum();
                (result.map(|()| OpReply::Done), statements)
            }
            SessionOp::Unlisten { channel, protocol, .. } => {
                self.trace.hash(&[203, p as u64]);
                let db = &mut self.server.db;
                let result = channel.listened(*protocol).try_for_each(|c| db.unlisten(session, c));
                // Under Lease the batch also deletes the backend's waiter row (one more statement).
                let lease = *protocol == Protocol::Lease;
                if result.is_ok() && lease {
                    db.forget_waiter(session, channel.as_str());
                }
                (
                    result.map(|()| OpReply::Done),
                    channel.listened(*protocol).count() as u64 + u64::from(lease),
                )
            }
            // The crash watch's wait: answered now, or once its outcome occurs (no reply yet).
            SessionOp::AwaitHolder { pid, max, .. } => {
                let end = now + *max;
                match self.server.db.await_begin(session, *pid, end) {
                    Ok(state) => {
                        self.metrics.statements(p, 1, now);
                        self.await_state(session, id, *pid, end, state);
                        return;
                    }
                    Err(error) => (Err(error), 1),
                }
            }
            other => (
                Err(DbError::Failed(format!("operation {} is not supported", other.name()))),
                1,
            ),
        };
        self.metrics.statements(p, statements, now);
        let setup = matches!(
            op,
            SessionOp::Bootstrap { .. } | SessionOp::Listen { .. } | SessionOp::ListenMany { .. }
        );
        if setup && self.faults.take_setup_reply_loss(p) {
            // The statement ran; its reply never reaches the client.
            self.trace.line(|| format!("  p{p} reply to {} lost", op.name()));
        } else {
            let generation = self.server.db.generation();
            self.server_send(session, ServerMsg::Reply { id, result, generation });
        }
        self.fan_out();
        for ended in self.server.db.take_terminated() {
            self.metrics.stale_terminations += 1;
            self.server_send(ended, ServerMsg::Ended);
            self.server.conns.remove(&ended);
        }
    }

    /// The checkers' bookkeeping of one entry of a committed batch, as for the lock's own
    /// operation.
    fn batch_entry_committed(&mut self, p: usize, entry: &pgiplock_core::BatchEntry, reply: &Reply) {
        let li = usize::try_from(entry.lock.0)
            .ok()
            .filter(|li| *li < self.channels.len());
        let acquired = matches!(reply, Reply::Acquire(r) if r.acquired);
        let generation = self.server.db.generation();
        if let (Some(li), Reply::Acquire(r)) = (li, reply) {
            // D2: a term that follows a graceful release replays nothing to a winner that was
            // listening when the drain marker went out.
            if let (true, Some(token), Some(previous)) = (r.acquired, r.token, r.previous) {
                self.checkers.term_followed(li, generation, previous, token.0);
            }
        }
        self.trace
            .hash(&[200, p as u64, li.map_or(u64::MAX, |li| li as u64), u64::from(acquired)]);
        if let Some(li) = li {
            if let Some(row) = self.server.db.lease_row(entry.target.channel.as_str()) {
                self.checkers.lease_row(&mut self.metrics, li, row.token, generation);
            }
        }
    }

    /// Ships every notification committed just now to its listeners, in commit order.
    pub(crate) fn fan_out(&mut self) {
        for session in self.server.db.take_notified() {
            // The publisher does not listen; nobody else lacks a connection.
            let connected = self.server.conns.contains_key(&session);
            while let Some(n) = self.server.db.pop_notification(session) {
                if connected {
                    self.server_send(
                        session,
                        ServerMsg::Notify {
                            channel: n.channel,
                            payload: n.payload,
                            pid: n.sender_pid,
                        },
                    );
                }
            }
        }
    }

    pub(crate) fn server_send(&mut self, session: SessionId, msg: ServerMsg) {
        let Some(c) = self.server.conns.get(&session) else {
            return;
        };
        let (p, inc, client_closed) = (c.p, c.inc, c.client_closed);
        let link_cut = self.links[p].cut;
        if client_closed && !link_cut {
            // The client's socket is gone: its stack answers with a reset.
            let at = self.engine.now + self.scenario.net_delay * 2;
            self.engine.schedule(at, Event::ServerClose { session });
            return;
        }
        if link_cut {
            self.server_lost(session, self.engine.now);
            return;
        }
        self.server_send_to(p, inc, session, msg);
    }

    fn server_send_to(&mut self, p: usize, inc: u32, session: SessionId, msg: ServerMsg) {
        let now = self.engine.now;
        let link = &mut self.links[p];
        if link.cut {
            return;
        }
        let mut at = (now + self.scenario.net_delay).max(link.to_client_last);
        if let Some(host) = self.host.as_mut() {
            // The process's session sees the message once it has handled it, on a core.
            at = match msg {
                ServerMsg::Notify { .. } => host.run(p, at, host.notify_cost),
                ServerMsg::Reply { .. } => host.run(p, at, host.reply_cost),
                _ => at,
            };
        }
        link.to_client_last = at;
        let epoch = link.epoch;
        self.engine.schedule(
            at,
            Event::ToClient {
                p,
                inc,
                epoch,
                sent_at: now,
                session,
                msg,
            },
        );
    }

    /// The server ends a connection whose client is gone (its reset arrived).
    pub(crate) fn server_close(&mut self, session: SessionId) {
        self.server.db.close_session(session);
        self.server.conns.remove(&session);
    }

    // ----- cuts and dead-peer detection -----

    /// Server data that the cut link swallowed: retransmissions start, and give up after
    /// `server_retransmit_detect`.
    fn server_lost(&mut self, session: SessionId, sent_at: Timestamp) {
        let Some(c) = self.server.conns.get_mut(&session) else {
            return;
        };
        if c.retransmit_armed {
            return;
        }
        c.retransmit_armed = true;
        let epoch = self.links[c.p].epoch;
        let at = (sent_at + self.scenario.server_retransmit_detect).max(self.engine.now);
        self.engine.schedule(at, Event::ServerDeadPeer { session, epoch });
    }

    /// Keepalive or retransmission gave up on `session`, if the cut of `epoch` still holds.
    pub(crate) fn server_dead_peer(&mut self, session: SessionId, epoch: u64) {
        let Some(conn) = self.server.conns.get(&session) else {
            return;
        };
        let link = &self.links[conn.p];
        if link.cut && link.epoch == epoch {
            self.server.db.close_session(session);
            self.server.conns.remove(&session);
            self.metrics.dead_peer_drops += 1;
        }
    }

    /// Cuts process `p`'s link silently, until `duration` later (`None`: until healed).
    pub(crate) fn cut(&mut self, p: usize, duration: Option<Duration>) {
        let link = &mut self.links[p];
        if link.cut {
            return;
        }
        link.cut = true;
        link.epoch += 1;
        let epoch = link.epoch;
        let keepalive = self.scenario.server_keepalive_detect;
        let sessions: Vec<(SessionId, Timestamp)> = self
            .server
            .conns
            .iter()
            .filter(|(_, c)| c.p == p)
            .map(|(s, c)| (*s, c.last_rx))
            .collect();
        for (session, last_rx) in sessions {
            // Idle keepalive probes go unanswered from the last traffic on.
            self.engine.schedule(
                (last_rx + keepalive).max(self.engine.now),
                Event::ServerDeadPeer { session, epoch },
            );
        }
        if let Some(duration) = duration {
            let heal = self.engine.now + duration;
            self.engine.schedule(heal, Event::Heal { p, epoch });
        }
    }

    pub(crate) fn heal(&mut self, p: usize, epoch: u64) {
        let link = &mut self.links[p];
        if !link.cut || link.epoch != epoch {
            return;
        }
        link.cut = false;
        self.checkers.last_disturbance = self.engine.now;
        let keepalive = self.scenario.server_keepalive_detect;
        let rtt = self.scenario.net_delay * 2;
        let sessions: Vec<(SessionId, bool, Timestamp)> = self
            .server
            .conns
            .iter_mut()
            .filter(|(_, c)| c.p == p)
            .map(|(s, c)| {
                c.retransmit_armed = false;
                (s, c.client_closed, c.last_rx)
            })
            .collect();
        for (session, client_closed, last_rx) in sessions {
            if client_closed {
                // The next keepalive probe (or any data) meets the client's reset.
                self.engine.schedule(
                    (last_rx + keepalive).max(self.engine.now + rtt),
                    Event::ServerClose { session },
                );
            }
        }
    }

    // ----- the publisher -----

    pub(crate) fn publish(&mut self) {
        let now = self.engine.now;
        if now >= self.publish_until {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / self.scenario.publish_rate);
        self.engine.schedule(now + period, Event::Publish);
        if self.server.up && self.server.publisher.is_some() {
            let latency = self.server.query_latency(&self.scenario);
            let at = self.server.publisher_busy.max(now + self.scenario.net_delay) + latency;
            self.server.publisher_busy = at;
            let id = self.server.next_message;
            self.server.next_message += 1;
            self.engine.schedule(at, Event::PublishCommit { id });
        }
    }

    pub(crate) fn publish_commit(&mut self, id: u64) {
        let Some(session) = self.server.publisher else { return };
        let now = self.engine.now;
        let channel = self.channels[0].as_str().to_owned();
        self.server.db.advance_to(now);
        if self.server.db.notify(session, &channel, &id.to_string()).is_ok() {
            self.metrics.published(id, now, self.server.db.generation());
            self.fan_out();
        }
    }
}
