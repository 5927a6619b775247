//! The session task: executes what `pgiplock-core`'s [`Session`](pgiplock_core::Session) asks
//! for and feeds back what happened.
//!
//! One task owns the core session (and through it every lock) by `&mut`. Its loop drains the
//! core's outputs (never awaiting inside), arms one timer for the core's deadline, then waits for
//! exactly one input: a notification or the end of the connection, a finished database
//! operation, a finished connection attempt, an API command, or the timer. Every decision —
//! when to connect, how long to wait, when to reset, what to run — is the core's.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pgiplock_core::{
    AppName, CallError, CallId, CallReply, DbError, DbOp, LockEvent, LockKey, OpId, OpReply, Reply, ServerIdentity,
    SessionEvent, SessionId, SessionInput, SessionOp, SessionOutput, SessionRequest, Warning,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, Socket};

use crate::clock::Clock;
use crate::lock::{LockMessage, LockShared};
use crate::session::{guard, Command, SessionOptions, SessionShared};
use crate::sql::{self, Target};
use crate::term::LockState;
use crate::Error;

/// Connection events handled in a row before an API command gets a turn.
const EVENT_BURST: u32 = 256;

/// Something the connection reported on its own.
enum ConnEvent {
    Notification { channel: String, payload: String, pid: i32 },
    Closed(Option<tokio_postgres::Error>),
}

/// A live connection: the client, the task polling the connection, and its events.
struct Established {
    client: Arc<Client>,
    app: String,
    pid: i32,
    /// Its server's identity, when it could be read.
    server: Option<ServerIdentity>,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: JoinHandle<()>,
}

/// Why a connection attempt failed.
enum ConnectFailure {
    /// The driver's error (unreachable, refused, authentication, ...).
    Postgres(tokio_postgres::Error),
    /// The server answered but is a standby in recovery or refuses writes; the words name it.
    NotWritable(String),
}

type Connector = Arc<dyn Fn(Config) -> BoxFuture<'static, Result<Established, ConnectFailure>> + Send + Sync + 'static>;

/// Sends a cancel request for the statement running on a connection (the crash watch's wait).
type Canceller = Arc<dyn Fn(tokio_postgres::CancelToken) -> BoxFuture<'static, ()> + Send + Sync + 'static>;

fn canceller<T>(tls: T) -> Canceller
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |token: tokio_postgres::CancelToken| {
        let tls = tls.clone();
        async move {
            if let Err(e) = token.cancel_query(tls).await {
                tracing::debug!(error = %e, "cancelling the crash watch's wait failed");
            }
        }
        .boxed()
    })
}

/// The identity query of every connection: backend pid, whether the server is in recovery, its
/// address, its timeline (the first eight hex digits of its current WAL file's
/// name, which any role may read; a standby has none) and its system identifier.
const IDENTITY_SQL: &str = "SELECT pg_backend_pid(), pg_is_in_recovery(), \
     COALESCE(host(inet_server_addr()) || ':' || inet_server_port(), 'the unix socket'), \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END";

/// Best effort: `pg_control_system()` may be revoked from the role.
const SYSTEM_ID_SQL: &str = "SELECT system_identifier FROM pg_control_system()";

/// Runs the identity queries: `Ok(Err(reason))` when the server is a standby. A primary that
/// refuses writes (`default_transaction_read_only`) is left to its first refused write
/// (SQLSTATE 25006), which the core reports and leaves.
async fn identify(client: &Client) -> Result<Result<(i32, Option<ServerIdentity>), String>, tokio_postgres::Error> {
    let row = client.query_one(IDENTITY_SQL, &[]).await?;
    let pid: i32 = row.try_get(0)?;
    let in_recovery: bool = row.try_get(1)?;
    let host: String = row.try_get(2)?;
    if in_recovery {
        return Ok(Err(format!(
            "{host} is a standby in recovery (pg_is_in_recovery()): locks need a writable primary"
        )));
    }
    let timeline: Option<i64> = row.try_get(3)?;
    let system_id = match client.query_one(SYSTEM_ID_SQL, &[]).await {
        Ok(row) => row
            .try_get::<_, i64>(0)
            .ok()
            .map(|id| u64::from_ne_bytes(id.to_ne_bytes())),
        Err(e) if e.as_db_error().is_some() => None,
        Err(e) => return Err(e),
    };
    let server = timeline
        .and_then(|t| u32::try_from(t).ok())
        .map(|timeline| ServerIdentity { system_id, timeline });
    Ok(Ok((pid, server)))
}

fn connector<T>(tls: T) -> Connector
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |config: Config| {
        let tls = tls.clone();
        async move {
            let app = config.get_application_name().unwrap_or_default().to_owned();
            let (client, mut connection) = match config.connect(tls).await {
                Ok(connected) => connected,
                // The words are in the error's source: its own message is "error connecting to server".
                Err(e) if crate::error::describe(&e).contains("does not allow writes") => {
                    // tokio-postgres's target_session_attrs=read-write check, over every host.
                    return Err(ConnectFailure::NotWritable(format!(
                        "no writable server among {}: every host reached was a standby or read-only",
                        hosts_of(&config)
                    )));
                }
                Err(e) => return Err(ConnectFailure::Postgres(e)),
            };
            let (tx, events) = mpsc::unbounded_channel();
            // Notifications only come out of `poll_message`; spawning the connection the usual
            // way would drop them. Its end becomes an event too, never silence.
            let poller = tokio::spawn(async move {
                loop {
                    match futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            let event = ConnEvent::Notification {
                                channel: n.channel().to_owned(),
                                payload: n.payload().to_owned(),
                                pid: n.process_id(),
                            };
                            if tx.send(event).is_err() {
                                return;
                            }
                        }
                        Some(Ok(AsyncMessage::Notice(notice))) => {
                            tracing::debug!(message = notice.message(), "server notice");
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let _ = tx.send(ConnEvent::Closed(Some(e)));
                            return;
                        }
                        None => {
                            let _ = tx.send(ConnEvent::Closed(None));
                            return;
                        }
                    }
                }
            });
            let client = Arc::new(client);
            match identify(&client).await {
                Ok(Ok((pid, server))) => Ok(Established {
                    client,
                    app,
                    pid,
                    server,
                    events,
                    poller,
                }),
                Ok(Err(not_writable)) => {
                    // Never wait on a standby: close and let the core retry with backoff.
                    poller.abort();
                    Err(ConnectFailure::NotWritable(not_writable))
                }
                Err(e) => {
                    poller.abort();
                    Err(ConnectFailure::Postgres(e))
                }
            }
        }
        .boxed()
    })
}

/// The connection settings of one attempt: a fresh unique `application_name` (the holder
/// identity) and keepalive/timeout backstops unless the user chose their own.
fn attempt_config(user: &Config, connect_timeout: Duration) -> Config {
    let app = format!("pgiplock-{}", uuid::Uuid::new_v4().simple());
    debug_assert!(AppName::new(&app).is_ok());
    let mut config = user.clone();
    config.application_name(&app);
    if config.get_connect_timeout().is_none() {
        // Per host, so that a multi-host string gets to its next host; the whole attempt is
        // bounded by the session's connect timeout.
        config.connect_timeout(connect_timeout);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(15));
    }
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        // tokio-postgres's default of two hours is no backstop at all.
        config.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_hosts().len() > 1 && config.get_target_session_attrs() == TargetSessionAttrs::Any {
        // Locks need a writable server: with several hosts, look for it (as libpq's
        // target_session_attrs=read-write does) rather than settle on the first standby.
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    config
}

/// `host:port, host:port` of a configuration, for messages.
fn hosts_of(config: &Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or_else(|| ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a call's answer goes.
pub(crate) enum CallWaiter {
    Unit(oneshot::Sender<Result<(), Error>>),
    Bool(oneshot::Sender<Result<bool, Error>>),
}

impl CallWaiter {
    fn answer(self, result: Result<CallReply, CallError>) {
        let result = result.map_err(Error::from);
        match self {
            CallWaiter::Unit(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
            CallWaiter::Bool(tx) => {
                let _ = tx.send(result.map(|r| matches!(r, CallReply::Acquired(true))));
            }
        }
    }
}

/// Starts the session task for `config` and a watcher that tells every handle if the task ends
/// abnormally. `first` learns the outcome of the first connection.
pub(crate) fn spawn<T>(
    config: Config,
    tls: T,
    options: &SessionOptions,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Mutex<SessionShared>>,
    first: oneshot::Sender<Result<(), Error>>,
    finished: Arc<tokio::sync::Notify>,
) -> tokio::task::AbortHandle
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let clock = Clock::start();
    let core_config = options.core();
    let connect_timeout = core_config.connect_timeout;
    let driver = Driver {
        core: pgiplock_core::Session::new(core_config, crate::lock::random_u64()),
        clock,
        user_config: config,
        connector: connector(tls.clone()),
        canceller: canceller(tls),
        watch: None,
        watch_connecting: None,
        connect_timeout,
        commands,
        shared: shared.clone(),
        locks: BTreeMap::new(),
        calls: BTreeMap::new(),
        next_call: 1,
        conn: None,
        connecting: None,
        queries: FuturesUnordered::new(),
        first: Some(first),
        first_deadline: Instant::now() + options.wait_limit(),
        writable_deadline: Instant::now() + options.writable_limit(),
        last_connect_error: None,
        not_writable: None,
        close_replies: Vec::new(),
        commands_open: true,
        closed: false,
        event_streak: 0,
        connections: 0,
        peer_released: BTreeMap::new(),
        lease_ends: BTreeMap::new(),
        failover_from: BTreeMap::new(),
    };
    let task = tokio::spawn(driver.run());
    let abort = task.abort_handle();
    tokio::spawn(async move {
        if let Err(e) = task.await {
            let cause = if e.is_panic() {
                let panic = e.into_panic();
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                format!("the session task panicked: {text}")
            } else {
                "the session task was cancelled".to_owned()
            };
            tracing::error!(cause = %cause, "session task ended; every lock of the session reports it");
            let locks: Vec<Arc<LockShared>> = {
                let mut shared = guard(&shared);
                shared.ended = Some(cause.clone());
                shared.pid = None;
                shared.locks.values().filter_map(|l| l.upgrade()).collect()
            };
            for lock in locks {
                lock.end(&cause);
            }
        }
        // Calls whose answer went with the task wait for this before they name the cause.
        guard(&shared).finished = true;
        finished.notify_waiters();
    });
    abort
}

/// A connection the driver holds open.
struct Conn {
    session: SessionId,
    client: Arc<Client>,
    app: String,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: Option<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A silently cut connection would otherwise linger until TCP gives up.
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
    }
}

type Attempt = (SessionId, BoxFuture<'static, Result<Established, ConnectFailure>>);

struct Driver {
    core: pgiplock_core::Session,
    clock: Clock,
    user_config: Config,
    connector: Connector,
    canceller: Canceller,
    /// The crash watch's connection (never used for anything but its wait).
    watch: Option<Conn>,
    watch_connecting: Option<Attempt>,
    connect_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Mutex<SessionShared>>,
    locks: BTreeMap<LockKey, Arc<LockShared>>,
    calls: BTreeMap<CallId, CallWaiter>,
    next_call: u64,
    conn: Option<Conn>,
    connecting: Option<Attempt>,
    queries: FuturesUnordered<BoxFuture<'static, QueryDone>>,
    /// Waits for the first connection's outcome ([`Session::connect`](crate::Session::connect)).
    first: Option<oneshot::Sender<Result<(), Error>>>,
    first_deadline: Instant,
    /// How long the first connection keeps trying while it finds only standbys.
    writable_deadline: Instant,
    last_connect_error: Option<tokio_postgres::Error>,
    /// The last attempt reached a server that was not writable (its words).
    not_writable: Option<String>,
    close_replies: Vec<oneshot::Sender<()>>,
    /// Some handle can still send commands (the channel has not reported its end).
    commands_open: bool,
    closed: bool,
    /// Connection events taken in a row (see [`EVENT_BURST`]).
    event_streak: u32,
    /// Connections established so far (for the reconnect metric).
    connections: u64,
    /// When each standby last heard a peer's release (for the handover metric).
    peer_released: BTreeMap<LockKey, Instant>,
    /// When the current holder's lease ends, as the server last told each standby (for the
    /// failover metric).
    lease_ends: BTreeMap<LockKey, Instant>,
    /// Since when each lock's winning attempt had known the previous holder gone (set at the
    /// reply, recorded at `Acquired`).
    failover_from: BTreeMap<LockKey, Instant>,
}

/// A finished request: its id, its outcome and, for an `Acquire` (or a batch of them), which
/// locks sent it when (for the failover metric).
type QueryDone = (OpId, Result<OpReply, DbError>, Option<(Vec<LockKey>, Instant)>);

impl Drop for Driver {
    fn drop(&mut self) {
        // Also when the task is aborted or panics: every term ends before the connection
        // (owned by the poller, aborted after this) closes and lets another holder in.
        for lock in self.locks.values() {
            lock.end_term();
        }
    }
}

enum Wake {
    Command(Option<Command>),
    Conn(Option<ConnEvent>),
    Query(QueryDone),
    Connected(Result<Established, ConnectFailure>),
    WatchConn(Option<ConnEvent>),
    WatchConnected(Result<Established, ConnectFailure>),
    Timer,
}

impl Driver {
    async fn run(mut self) {
        // The core connects at its first input.
        self.feed(SessionInput::Tick);
        while !self.closed {
            let deadline = self.core.poll_timeout().map(|at| self.clock.instant(at));
            // Biased, connection events first: tokio-postgres completes a request only at
            // ReadyForQuery, after the notifications the server sent at its commit, so taking
            // every queued notification before any reply replays the server's order (a lock's
            // own `acquired:` marker and the messages around it come before its reply). After a
            // long burst of events, API commands get one turn (still before replies), so a
            // flood of notifications cannot hold up `destroy` or a signal.
            let accept_commands = self.commands_open;
            let wake = if self.event_streak < EVENT_BURST {
                tokio::select! {
                    biased;
                    event = recv_event(&mut self.conn) => Wake::Conn(event),
                    Some(done) = self.queries.next(), if !self.queries.is_empty() => Wake::Query(done),
                    command = self.commands.recv(), if accept_commands => Wake::Command(command),
                    result = poll_connecting(&mut self.connecting), if self.connecting.is_some() => Wake::Connected(result),
                    event = recv_event(&mut self.watch) => Wake::WatchConn(event),
                    result = poll_connecting(&mut self.watch_connecting), if self.watch_connecting.is_some() => Wake::WatchConnected(result),
                    () = sleep_until(deadline) => Wake::Timer,
                }
            } else {
                tokio::select! {
                    biased;
                    command = self.commands.recv(), if accept_commands => Wake::Command(command),
                    event = recv_event(&mut self.conn) => Wake::Conn(event),
                    Some(done) = self.queries.next(), if !self.queries.is_empty() => Wake::Query(done),
                    result = poll_connecting(&mut self.connecting), if self.connecting.is_some() => Wake::Connected(result),
                    event = recv_event(&mut self.watch) => Wake::WatchConn(event),
                    result = poll_connecting(&mut self.watch_connecting), if self.watch_connecting.is_some() => Wake::WatchConnected(result),
                    () = sleep_until(deadline) => Wake::Timer,
                }
            };
            self.event_streak = match wake {
                Wake::Conn(_) => self.event_streak + 1,
                _ => 0,
            };
            match wake {
                Wake::Command(Some(command)) => self.on_command(command),
                Wake::Command(None) => {
                    // Every handle is gone: nobody can reach these locks any more.
                    self.commands_open = false;
                    let call = self.call_id();
                    self.feed(SessionInput::Close { call });
                }
                Wake::Conn(Some(ConnEvent::Notification { channel, payload, pid })) => {
                    if let Some(session) = self.conn.as_ref().map(|c| c.session) {
                        // Markers travel on the lock's own channels (`__PgIpLock__:`, `__PgIpDrain_:`).
                        let marker = channel
                            .starts_with("__PgIp")
                            .then(|| self.core.lock_of_channel(&channel))
                            .flatten();
                        self.feed(SessionInput::Notification {
                            session,
                            channel,
                            payload,
                            pid,
                        });
                        if let Some(key) = marker {
                            self.record_ignored_markers(key);
                        }
                    }
                }
                Wake::Conn(event) => {
                    let error = match event {
                        Some(ConnEvent::Closed(Some(e))) => Some(crate::error::describe(&e)),
                        Some(ConnEvent::Closed(None)) => Some("closed by the server".to_owned()),
                        _ => Some("connection task ended".to_owned()),
                    };
                    if let Some(conn) = self.conn.take() {
                        self.feed(SessionInput::Closed {
                            session: conn.session,
                            error,
                        });
                    }
                }
                Wake::Query((id, result, acquire)) => {
                    if let Some((keys, sent)) = acquire {
                        match &result {
                            Ok(OpReply::Batch(replies)) => {
                                for (key, reply) in keys.iter().zip(replies) {
                                    self.note_acquire_reply(*key, sent, &Ok(OpReply::Lock(reply.clone())));
                                }
                            }
                            _ => {
                                for key in keys {
                                    self.note_acquire_reply(key, sent, &result);
                                }
                            }
                        }
                    }
                    self.feed(SessionInput::Reply { id, result });
                }
                Wake::Connected(result) => {
                    let Some((session, _)) = self.connecting.take() else {
                        continue;
                    };
                    match result {
                        Ok(established) => {
                            let (app, pid, server) = (established.app.clone(), established.pid, established.server);
                            self.conn = Some(Conn {
                                session,
                                client: established.client,
                                app: established.app,
                                events: established.events,
                                poller: Some(established.poller),
                            });
                            self.feed(SessionInput::Connected { session, app, pid });
                            if let Some(server) = server {
                                self.feed(SessionInput::Identified { session, server });
                            }
                        }
                        Err(ConnectFailure::Postgres(e)) => {
                            let cause = crate::error::describe(&e);
                            self.last_connect_error = Some(e);
                            self.not_writable = None;
                            self.feed(SessionInput::ConnectFailed { session, cause });
                        }
                        Err(ConnectFailure::NotWritable(cause)) => {
                            tracing::warn!(attempt = session.0, cause = %cause, "not a writable server; disconnected, trying again");
                            self.last_connect_error = None;
                            self.not_writable = Some(cause.clone());
                            self.feed(SessionInput::ConnectFailed { session, cause });
                        }
                    }
                }
                Wake::WatchConn(Some(ConnEvent::Notification { .. })) => {}
                Wake::WatchConn(event) => {
                    let error = match event {
                        Some(ConnEvent::Closed(Some(e))) => Some(crate::error::describe(&e)),
                        _ => Some("closed by the server".to_owned()),
                    };
                    if let Some(conn) = self.watch.take() {
                        tracing::debug!(error = ?error, "the crash watch's connection ended");
                        self.feed(SessionInput::WatchClosed {
                            session: conn.session,
                            error,
                        });
                    }
                }
                Wake::WatchConnected(result) => {
                    let Some((session, _)) = self.watch_connecting.take() else {
                        continue;
                    };
                    match result {
                        Ok(established) => {
                            self.watch = Some(Conn {
                                session,
                                client: established.client,
                                app: established.app,
                                events: established.events,
                                poller: Some(established.poller),
                            });
                            self.feed(SessionInput::WatchConnected { session });
                        }
                        Err(failure) => {
                            let (cause, connection_limit) = match failure {
                                ConnectFailure::Postgres(e) => (
                                    crate::error::describe(&e),
                                    e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
                                ),
                                ConnectFailure::NotWritable(cause) => (cause, false),
                            };
                            self.feed(SessionInput::WatchConnectFailed {
                                session,
                                cause,
                                connection_limit,
                            });
                        }
                    }
                }
                Wake::Timer => self.feed(SessionInput::Tick),
            }
        }
        // Refuse further commands before confirming the close, and answer those still queued.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Register { shared, .. } => self.refuse(&shared),
                Command::Call { waiter, .. } => waiter.answer(Err(CallError::Closed)),
                Command::Close { reply } => self.close_replies.push(reply),
                Command::Abandon { .. } => {}
            }
        }
        for reply in self.close_replies.drain(..) {
            let _ = reply.send(());
        }
        guard(&self.shared).pid = None;
        for (_, lock) in std::mem::take(&mut self.locks) {
            lock.mark_stopped();
        }
    }

    /// A lock the session cannot take (it is closing): it ends at once for its handles.
    fn refuse(&self, shared: &LockShared) {
        {
            let mut session = guard(&self.shared);
            session.channels.remove(shared.channel.as_str());
            session.locks.remove(&shared.key.0);
        }
        shared.set_state(LockState::Stopped, "stopped");
        shared.broadcast(LockMessage::Stopped);
        shared.mark_stopped();
    }

    /// The ignored-marker count of the lock a marker was for (only its count can have moved).
    fn record_ignored_markers(&self, key: LockKey) {
        if let (Some(lock), Some(shared)) = (self.core.lock(key), self.locks.get(&key)) {
            metrics::counter!(crate::metrics::IGNORED_MARKERS, "channel" => shared.channel.as_str().to_owned())
                .absolute(lock.ignored_markers());
        }
    }

    fn call_id(&mut self) -> CallId {
        let id = CallId(self.next_call);
        self.next_call += 1;
        id
    }

    /// Feeds one input to the core at the clock's time and carries out everything it asks for.
    fn feed(&mut self, input: SessionInput) {
        let now = self.clock.now();
        self.core.handle_input(now, input);
        while let Some(output) = self.core.poll_output() {
            self.on_output(output);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Register {
                key,
                shared,
                config,
                seed,
            } => {
                let added = self
                    .core
                    .add_lock(key, shared.channel.clone(), shared.schema.clone(), *config, seed);
                match added {
                    Ok(()) => {
                        self.locks.insert(key, shared);
                    }
                    Err(e) => {
                        tracing::warn!(channel = %shared.channel, error = %e, "lock not added");
                        self.refuse(&shared);
                    }
                }
            }
            Command::Call { key, request, waiter } => {
                let call = self.call_id();
                self.calls.insert(call, waiter);
                if let Some(lock) = self.locks.get(&key) {
                    match request {
                        pgiplock_core::LockCall::StandDown => {
                            tracing::info!(channel = %lock.channel, "standing down: no attempts until compete");
                            lock.set_stood_down(true);
                            // What it knew of the holder will be stale by the time it competes.
                            self.peer_released.remove(&key);
                            self.lease_ends.remove(&key);
                        }
                        pgiplock_core::LockCall::Init => lock.set_stood_down(false),
                        _ => {}
                    }
                }
                if let pgiplock_core::LockCall::Destroy { signal: Some(kind) } = request {
                    if let Some(lock) = self.locks.get(&key) {
                        tracing::info!(channel = %lock.channel, signal = ?kind, "stopping on signal");
                    }
                }
                self.feed(SessionInput::Call {
                    call,
                    lock: key,
                    request,
                });
            }
            Command::Abandon { key } => {
                if let Some(lock) = self.locks.get(&key) {
                    tracing::debug!(channel = %lock.channel, "every handle dropped; stopping the lock");
                }
                self.feed(SessionInput::Abandon { lock: key });
            }
            Command::Close { reply } => {
                self.close_replies.push(reply);
                let call = self.call_id();
                self.feed(SessionInput::Close { call });
            }
        }
    }

    fn on_output(&mut self, output: SessionOutput) {
        match output {
            SessionOutput::Connect { session } => {
                let config = attempt_config(&self.user_config, self.connect_timeout);
                tracing::debug!(attempt = session.0, "connecting");
                self.connecting = Some((session, (self.connector)(config)));
            }
            SessionOutput::AbortConnect { session } => {
                if self.connecting.as_ref().is_some_and(|(s, _)| *s == session) {
                    // Dropping the attempt closes its socket.
                    self.connecting = None;
                }
            }
            SessionOutput::Disconnect { session } => {
                if self.conn.as_ref().is_some_and(|c| c.session == session) {
                    self.conn = None;
                }
            }
            SessionOutput::WatchConnect { session } => {
                let mut config = attempt_config(&self.user_config, self.connect_timeout);
                if let Some(conn) = &self.conn {
                    // The session's own name with a suffix: an operator sees whose watch it is.
                    config.application_name(format!("{}/watch", conn.app));
                }
                tracing::debug!(attempt = session.0, "connecting the crash watch");
                self.watch_connecting = Some((session, (self.connector)(config)));
            }
            SessionOutput::WatchCancel { session } => {
                if let Some(watch) = self.watch.as_ref().filter(|w| w.session == session) {
                    tokio::spawn((self.canceller)(watch.client.cancel_token()));
                }
            }
            SessionOutput::WatchDisconnect { session } => {
                if self.watch.as_ref().is_some_and(|w| w.session == session) {
                    self.watch = None;
                }
                if self.watch_connecting.as_ref().is_some_and(|(s, _)| *s == session) {
                    self.watch_connecting = None;
                }
            }
            SessionOutput::Event(SessionEvent::WatchDown { reason, retry_in }) => match &reason {
                pgiplock_core::WatchFailure::ConnectionLimit(cause) => tracing::warn!(
                    cause = %cause,
                    retry_in = ?retry_in,
                    "the crash watch's connection was refused for the connection limit; standbys fall back to lease expiry"
                ),
                other => tracing::info!(
                    reason = ?other,
                    retry_in = ?retry_in,
                    "the crash watch stopped; standbys fall back to lease expiry"
                ),
            },
            SessionOutput::Execute(request) => self.execute(request),
            SessionOutput::Lock { lock, event } => self.on_lock_event(lock, event),
            SessionOutput::Deliver { lock, payload, replay } => {
                if let Some(lock) = self.locks.get(&lock) {
                    metrics::counter!(crate::metrics::MESSAGES, "channel" => lock.channel.as_str().to_owned(), "replay" => if replay { "true" } else { "false" })
                        .increment(1);
                    lock.broadcast(LockMessage::Message { payload, replay });
                }
            }
            SessionOutput::CallDone { call, result } => {
                if let Some(waiter) = self.calls.remove(&call) {
                    waiter.answer(result);
                }
            }
            SessionOutput::LockRemoved { lock } => {
                if let Some(shared) = self.locks.remove(&lock) {
                    let mut session = guard(&self.shared);
                    session.channels.remove(shared.channel.as_str());
                    session.locks.remove(&lock.0);
                    drop(session);
                    shared.mark_stopped();
                }
            }
            SessionOutput::Event(event) => self.on_session_event(event),
            SessionOutput::Closed => {
                self.closed = true;
                self.conn = None;
                self.connecting = None;
                self.watch = None;
                self.watch_connecting = None;
            }
            other => tracing::debug!(output = ?other, "session output"),
        }
    }

    fn execute(&mut self, request: SessionRequest) {
        let watch = self.watch.as_ref().filter(|c| c.session == request.session);
        let Some(conn) = self.conn.as_ref().filter(|c| c.session == request.session).or(watch) else {
            // The core already forgot it (the connection is gone).
            return;
        };
        let client = conn.client.clone();
        let app = conn.app.clone();
        let id = request.id;
        tracing::trace!(op = request.op.name(), "request");
        let op_name = match &request.op {
            SessionOp::Lock { op, .. } => op.name(),
            other => other.name(),
        };
        let sent = Instant::now();
        let acquire = match &request.op {
            SessionOp::Lock {
                lock,
                op: DbOp::Acquire,
                ..
            } => Some((vec![*lock], sent)),
            SessionOp::AcquireMany { entries, .. } => Some((entries.iter().map(|e| e.lock).collect(), sent)),
            _ => None,
        };
        self.queries.push(
            async move {
                let result = match request.op {
                    SessionOp::Bootstrap { protocol, schema } => {
                        sql::bootstrap(&client, protocol, &schema).await.map(|()| OpReply::Done)
                    }
                    SessionOp::Listen { channel, protocol } => {
                        sql::listen(&client, &channel, protocol).await.map(|()| OpReply::Done)
                    }
                    SessionOp::ListenMany { channels } => {
                        sql::listen_many(&client, &channels).await.map(|()| OpReply::Done)
                    }
                    SessionOp::Unlisten {
                        channel,
                        protocol,
                        schema,
                    } => sql::unlisten(&client, &channel, protocol, &schema)
                        .await
                        .map(|()| OpReply::Done),
                    SessionOp::Lock { target, op, .. } => {
                        let target = Target {
                            protocol: target.protocol,
                            schema: target.schema.clone(),
                            channel: target.channel.clone(),
                            app,
                            lease_ttl: target.lease_ttl,
                        };
                        sql::execute(&client, &target, &op).await.map(OpReply::Lock)
                    }
                    SessionOp::RenewMany { schema, entries } => {
                        let entries = batch_targets(&entries);
                        sql::execute_batch(&client, &schema, &app, sql::BatchOp::Renew, &entries)
                            .await
                            .map(OpReply::Batch)
                    }
                    SessionOp::AcquireMany { schema, entries } => {
                        let entries = batch_targets(&entries);
                        sql::execute_batch(&client, &schema, &app, sql::BatchOp::Acquire, &entries)
                            .await
                            .map(OpReply::Batch)
                    }
                    SessionOp::Balance {
                        schema,
                        group,
                        register,
                        leave,
                    } => sql::balance(&client, &schema, &app, &group, &register, leave)
                        .await
                        .map(OpReply::Balance),
                    SessionOp::AwaitHolder { schema, pid, max } => {
                        sql::await_holder(&client, &schema, pid, max).await.map(OpReply::Await)
                    }
                    other => Err(DbError::Failed(format!("operation {} is not supported", other.name()))),
                };
                metrics::histogram!(crate::metrics::REQUEST_SECONDS, "op" => op_name)
                    .record(sent.elapsed().as_secs_f64());
                (id, result, acquire)
            }
            .boxed(),
        );
    }

    /// What an `Acquire` reply tells the failover metric, before the core sees it. Refused: the
    /// holder's lease ends `lease_remaining` from now, and a release heard before this attempt
    /// was sent was someone else's to win. Won: a takeover (the previous term was not released)
    /// counts from the lease's end as last reported, or from this attempt if it was sent before
    /// that (the holder's session was gone); the end of a released term from its release
    /// notification, when this process heard it.
    fn note_acquire_reply(&mut self, key: LockKey, sent: Instant, result: &Result<OpReply, DbError>) {
        let Ok(OpReply::Lock(Reply::Acquire(reply))) = result else {
            return;
        };
        if !reply.acquired {
            self.failover_from.remove(&key);
            if self.peer_released.get(&key).is_some_and(|heard| *heard < sent) {
                self.peer_released.remove(&key);
            }
            match reply.lease_remaining {
                // Checked: the duration comes from the server and may be anything.
                Some(remaining) => match Instant::now().checked_add(remaining) {
                    Some(end) => self.lease_ends.insert(key, end),
                    None => self.lease_ends.remove(&key),
                },
                None => self.lease_ends.remove(&key),
            };
            return;
        }
        let lease_end = self.lease_ends.remove(&key);
        let from = match reply.previous {
            Some(previous) if !previous.released => Some(lease_end.map_or(sent, |end| end.min(sent))),
            // Released, or `Classic`, whose reply names no previous term.
            _ => self.peer_released.get(&key).copied(),
        };
        match from {
            Some(from) => self.failover_from.insert(key, from),
            None => self.failover_from.remove(&key),
        };
    }

    fn on_session_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Up { session, app, pid } => {
                tracing::info!(app = %app, pid, connection = session.0, "connected");
                metrics::counter!(crate::metrics::CONNECTIONS).increment(1);
                if self.connections > 0 {
                    metrics::counter!(crate::metrics::RECONNECTS).increment(1);
                }
                self.connections += 1;
                {
                    let mut shared = guard(&self.shared);
                    shared.app = app;
                    shared.pid = Some(pid);
                }
                if let Some(first) = self.first.take() {
                    let _ = first.send(Ok(()));
                }
            }
            SessionEvent::Down {
                session,
                reason,
                retry_in,
            } => {
                let why = match &reason {
                    pgiplock_core::DownReason::Closed(Some(text)) => text.clone(),
                    other => other.as_str().to_owned(),
                };
                tracing::warn!(connection = session.0, reason = %why, retry_in = ?retry_in, "database session lost");
                metrics::counter!(crate::metrics::SESSIONS_LOST, "reason" => reason.as_str()).increment(1);
                guard(&self.shared).pid = None;
            }
            SessionEvent::ConnectFailed {
                session,
                cause,
                retry_in,
            } => {
                tracing::warn!(attempt = session.0, cause = %cause, retry_in = ?retry_in, "connection attempt failed");
                // A standby may be a failover in progress: wait longer for a writable server.
                let deadline = match self.not_writable {
                    Some(_) => self.writable_deadline,
                    None => self.first_deadline,
                };
                let give_up = retry_in.map_or(true, |d| Instant::now() + d > deadline);
                if give_up {
                    if let Some(first) = self.first.take() {
                        let error = match (self.last_connect_error.take(), self.not_writable.take()) {
                            (_, Some(cause)) => Error::NotWritable { cause },
                            (Some(e), None) if !cause.starts_with("no answer within") => Error::Connect(e),
                            _ => Error::ConnectTimeout {
                                timeout: self.connect_timeout,
                            },
                        };
                        let _ = first.send(Err(error));
                        // Nobody holds a handle yet: end the task.
                        let call = self.call_id();
                        self.feed(SessionInput::Close { call });
                    }
                }
                self.last_connect_error = None;
            }
            SessionEvent::ReadOnly { session, op } => {
                tracing::error!(
                    connection = session.0,
                    op,
                    "the server is read-only (SQLSTATE 25006): locks need a writable primary; reconnecting \
                     (use a multi-host connection string with target_session_attrs=read-write to find one)"
                );
            }
            SessionEvent::ServerChanged {
                session,
                previous,
                current,
            } => {
                let what = if previous.system_id != current.system_id {
                    "another database cluster"
                } else if current.timeline > previous.timeline {
                    "a failover (a replica was promoted)"
                } else {
                    "a server on an older timeline (restored from a backup?)"
                };
                tracing::warn!(
                    connection = session.0,
                    previous = %previous,
                    current = %current,
                    "the server changed: {what}; lease rows of the older timeline are taken over only when their lease expires"
                );
            }
            SessionEvent::SchemaMissing { schema, error } => {
                tracing::warn!(schema = %schema, error = %error, "lock schema missing; bootstrapping it again");
            }
            SessionEvent::BootstrapFailed { schema, error } => {
                tracing::error!(schema = %schema, error = %error, "lock schema setup failed");
            }
            other => tracing::debug!(event = ?other, "session event"),
        }
    }

    /// Reports one lock event: the lock's watch state, its subscribers, its handlers, and the
    /// log.
    fn on_lock_event(&mut self, key: LockKey, event: LockEvent) {
        let Some(lock) = self.locks.get(&key) else { return };
        let channel = lock.channel.as_str();
        match event {
            LockEvent::Acquired { token } => {
                if let Some(heard) = self.peer_released.remove(&key) {
                    metrics::histogram!(crate::metrics::HANDOVER_SECONDS, "channel" => channel.to_owned())
                        .record(heard.elapsed().as_secs_f64());
                }
                self.lease_ends.remove(&key);
                if let Some(from) = self.failover_from.remove(&key) {
                    metrics::histogram!(crate::metrics::FAILOVER_SECONDS, "channel" => channel.to_owned())
                        .record(from.elapsed().as_secs_f64());
                }
                lock.set_state(LockState::Holding { token }, "replaced");
                match token {
                    Some(t) => tracing::info!(channel = %channel, token = t.0, "lock acquired"),
                    None => tracing::info!(channel = %channel, "lock acquired"),
                }
                lock.broadcast(LockMessage::Acquired { token });
            }
            LockEvent::Lost { reason } => {
                lock.set_state(LockState::Standby, reason.as_str());
                tracing::info!(channel = %channel, reason = reason.as_str(), "lock lost");
                lock.broadcast(LockMessage::Lost { reason });
            }
            LockEvent::Drained => {
                lock.set_state(LockState::Releasing, "released");
                tracing::info!(channel = %channel, "lock drained; releasing");
                lock.broadcast(LockMessage::Drained);
            }
            LockEvent::Released => {
                lock.set_state(LockState::Standby, "released");
                tracing::info!(channel = %channel, "lock released");
                lock.broadcast(LockMessage::Released);
            }
            LockEvent::ReleaseFailed { reason } => {
                lock.set_state(LockState::Standby, "released");
                tracing::warn!(channel = %channel, reason = reason.as_str(), "release not confirmed");
                lock.broadcast(LockMessage::ReleaseFailed { reason });
            }
            LockEvent::PeerReleased => {
                tracing::debug!(channel = %channel, "peer released the lock");
                self.peer_released.insert(key, Instant::now());
                for handler in lock.release_handlers() {
                    // A user callback cannot take the session down with it.
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| handler(channel)));
                    if outcome.is_err() {
                        tracing::error!(channel = %channel, "an on_release handler panicked; the session carries on");
                    }
                }
            }
            LockEvent::Stopped { released } => {
                lock.set_state(LockState::Stopped, "stopped");
                tracing::info!(channel = %channel, released, "lock stopped");
                lock.broadcast(LockMessage::Stopped);
            }
            LockEvent::Warning(warning) => {
                match &warning {
                    Warning::ServerReadOnly => tracing::error!(channel = %channel, warning = %warning, "lock warning"),
                    _ => tracing::warn!(channel = %channel, warning = %warning, "lock warning"),
                }
                lock.broadcast(LockMessage::Warning(warning));
            }
            LockEvent::Gap { missing } => {
                tracing::error!(channel = %channel, missing, "takeover replay incomplete: the replay buffer overflowed");
                metrics::counter!(crate::metrics::GAP_MESSAGES, "channel" => channel.to_owned()).increment(missing);
                lock.broadcast(LockMessage::Gap { missing });
            }
            other => tracing::debug!(channel = %channel, event = ?other, "lock event"),
        }
    }
}

fn batch_targets(entries: &[pgiplock_core::BatchEntry]) -> Vec<sql::BatchTarget> {
    entries
        .iter()
        .map(|e| sql::BatchTarget {
            channel: e.target.channel.clone(),
            lease_ttl: e.target.lease_ttl,
            op: e.op.clone(),
        })
        .collect()
}

async fn recv_event(conn: &mut Option<Conn>) -> Option<ConnEvent> {
    match conn {
        Some(conn) => conn.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll_connecting(connecting: &mut Option<Attempt>) -> Result<Established, ConnectFailure> {
    match connecting {
        Some((_, attempt)) => attempt.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
