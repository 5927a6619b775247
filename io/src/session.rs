//! A session: one PostgreSQL connection, reconnected on loss, driving many locks.
//!
//! One tokio task owns the connection's client and every lock's core by `&mut`. Its loop
//! drains the cores' outputs (never awaiting inside), arms one timer for the earliest deadline,
//! then waits for exactly one input: an API command, a notification or the end of the
//! connection, a finished database request, a finished connection attempt, or the timer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pgiplock_core::{
    AppName, ChannelName, DbError, Input, Lock, LockConfig, LockEvent, Output, Phase, Protocol, Reply, RequestId,
    SchemaName, SessionId, SignalKind, SplitMix64, Warning,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, Socket};

use crate::clock::Clock;
use crate::lock::{self as lock_mod, LockMessage, LockOptions, LockShared, PgIpLock};
use crate::sql::{self, Target};
use crate::Error;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connection events handled in a row before an API command gets a turn.
const EVENT_BURST: u32 = 256;

/// Something the connection reported on its own.
enum ConnEvent {
    Notification { channel: String, payload: String },
    Closed(Option<tokio_postgres::Error>),
}

/// A live connection: the client, the task polling the connection, and its events.
struct Established {
    client: Arc<Client>,
    app: String,
    pid: i32,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: JoinHandle<()>,
}

type Connector =
    Arc<dyn Fn(Config) -> BoxFuture<'static, Result<Established, tokio_postgres::Error>> + Send + Sync + 'static>;

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
            let (client, mut connection) = config.connect(tls).await?;
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
            let pid = match client.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) => row.try_get::<_, i32>(0),
                Err(e) => Err(e),
            };
            match pid {
                Ok(pid) => Ok(Established {
                    client,
                    app,
                    pid,
                    events,
                    poller,
                }),
                Err(e) => {
                    poller.abort();
                    Err(e)
                }
            }
        }
        .boxed()
    })
}

/// The connection settings of one attempt: a fresh unique `application_name` (the holder
/// identity) and keepalive/timeout backstops unless the user chose their own.
fn attempt_config(user: &Config) -> Config {
    let app = format!("pgiplock-{}", uuid::Uuid::new_v4().simple());
    debug_assert!(AppName::new(&app).is_ok());
    let mut config = user.clone();
    config.application_name(&app);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
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
    config
}

/// API calls into the session task.
pub(crate) enum Command {
    Register {
        shared: Arc<LockShared>,
        config: LockConfig,
        seed: u64,
    },
    Init {
        key: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Acquire {
        key: u64,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    Release {
        key: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Destroy {
        key: u64,
        signal: Option<SignalKind>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug, Default)]
struct ConnInfo {
    app: String,
    pid: Option<i32>,
}

struct SessionInner {
    commands: mpsc::UnboundedSender<Command>,
    info: Arc<Mutex<ConnInfo>>,
    /// Channels with a live lock in this session: one session is one holder identity, so it can
    /// hold a channel once.
    channels: Arc<Mutex<BTreeSet<String>>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One PostgreSQL connection shared by many locks, reconnected with backoff when lost.
/// Cheap to clone; all clones are the same session.
///
/// Every connection gets a fresh, unique `application_name` (`pgiplock-<32 hex>`): it is the
/// holder identity written into the lock tables and checked against `pg_stat_activity`, so a
/// name set in the configuration is replaced. Unless the configuration sets them, connections
/// use `connect_timeout` 5 s, TCP keepalives after 10 s idle (every 5 s, 3 probes) and
/// `tcp_user_timeout` 15 s: a backstop only, the lock's own timers detect a dead session first.
/// A lost connection is reopened with capped exponential backoff (100 ms doubling to 5 s,
/// jittered); every lock learns the loss (a holder reports [`LockMessage::Lost`]) and competes
/// again on the new connection.
///
/// Do not point it at a transaction-pooling PgBouncer: `LISTEN` and the session identity need
/// a real session. A server-side `idle_session_timeout` shorter than the renew interval
/// would end the session between renewals.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = guard(&self.inner.info);
        f.debug_struct("Session")
            .field("app", &info.app)
            .field("pid", &info.pid)
            .finish()
    }
}

impl Session {
    /// Connects without TLS and starts the session task.
    pub async fn connect(config: Config) -> Result<Session, Error> {
        Self::connect_with_tls(config, tokio_postgres::NoTls).await
    }

    /// Connects with `tls` (used again for every reconnection) and starts the session task.
    pub async fn connect_with_tls<T>(config: Config, tls: T) -> Result<Session, Error>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let connector = connector(tls);
        let attempt = attempt_config(&config);
        let established = connector(attempt).await.map_err(Error::Connect)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let info = Arc::new(Mutex::new(ConnInfo {
            app: established.app.clone(),
            pid: Some(established.pid),
        }));
        let channels = Arc::new(Mutex::new(BTreeSet::new()));
        tracing::info!(app = %established.app, pid = established.pid, "connected");
        let driver = Driver::new(config, connector, rx, info.clone(), channels.clone(), established);
        tokio::spawn(driver.run());
        Ok(Session {
            inner: Arc::new(SessionInner {
                commands,
                info,
                channels,
            }),
        })
    }

    /// The `application_name` of the current (or last) connection: this session's holder
    /// identity in the lock tables.
    pub fn app_name(&self) -> String {
        guard(&self.inner.info).app.clone()
    }

    /// The backend pid of the current connection, if connected.
    pub fn backend_pid(&self) -> Option<i32> {
        guard(&self.inner.info).pid
    }

    /// A lock on `channel`. Validates the channel, schema and options; nothing reaches the
    /// database until [`PgIpLock::init`] or [`PgIpLock::acquire`].
    pub fn lock(&self, channel: &str, options: LockOptions) -> Result<PgIpLock, Error> {
        static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let channel = ChannelName::new(channel)?;
        let config = options.to_config()?;
        let schema = options.schema_name()?;
        if !guard(&self.inner.channels).insert(channel.as_str().to_owned()) {
            return Err(Error::DuplicateLock {
                channel: channel.as_str().to_owned(),
            });
        }
        let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = Arc::new(LockShared::new(
            key,
            channel.clone(),
            schema,
            options.protocol_value(),
            config.shutdown_timeout,
        ));
        let registered = self.send(Command::Register {
            shared: shared.clone(),
            config,
            seed: options.seed_value(),
        });
        if let Err(e) = registered {
            guard(&self.inner.channels).remove(channel.as_str());
            return Err(e);
        }
        let lock = PgIpLock {
            shared,
            session: self.clone(),
        };
        lock_mod::register(&lock);
        Ok(lock)
    }

    /// Destroys this session's locks (each bounded by its shutdown timeout) and closes the
    /// connection. Idempotent.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.send(Command::Close { reply }).is_ok() {
            let _ = done.await;
        }
        lock_mod::unregister_session(self);
    }

    pub(crate) fn send(&self, command: Command) -> Result<(), Error> {
        self.inner.commands.send(command).map_err(|_| Error::Closed)
    }

    pub(crate) fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// What a finished background request reports.
enum Done {
    Op {
        key: u64,
        id: RequestId,
        result: Result<Reply, DbError>,
    },
    Prepared {
        key: u64,
        session: SessionId,
        result: Result<(), DbError>,
    },
    Other,
}

struct Conn {
    session: SessionId,
    client: Arc<Client>,
    app: String,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    poller: Option<JoinHandle<()>>,
    bootstrapped: BTreeSet<(Protocol, SchemaName)>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A silently cut connection would otherwise linger until TCP gives up.
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
    }
}

struct Entry {
    core: Lock,
    shared: Arc<LockShared>,
    lease_ttl: Duration,
    /// The session this lock got `SessionUp` for.
    ready: Option<SessionId>,
    /// The session a schema bootstrap + `LISTEN` is in flight on.
    preparing: Option<SessionId>,
    /// Whether a preparation ever succeeded (then `acquire` need not wait for one).
    initialised: bool,
    init_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    /// `acquire` calls waiting for the first preparation.
    early_attempts: Vec<oneshot::Sender<Result<bool, Error>>>,
    attempts: VecDeque<oneshot::Sender<Result<bool, Error>>>,
    release_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    destroy_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    stopped: bool,
}

struct Driver {
    user_config: Config,
    connector: Connector,
    commands: mpsc::UnboundedReceiver<Command>,
    info: Arc<Mutex<ConnInfo>>,
    channels: Arc<Mutex<BTreeSet<String>>>,
    clock: Clock,
    rng: SplitMix64,
    locks: BTreeMap<u64, Entry>,
    conn: Option<Conn>,
    next_session: u64,
    connecting: Option<BoxFuture<'static, Result<Established, tokio_postgres::Error>>>,
    reconnect_at: Option<Instant>,
    backoff: Duration,
    queries: FuturesUnordered<BoxFuture<'static, Done>>,
    reset: Option<SessionId>,
    closing: Option<Vec<oneshot::Sender<()>>>,
    /// Connection events taken in a row (see [`EVENT_BURST`]).
    event_streak: u32,
}

enum Wake {
    Command(Option<Command>),
    Conn(Option<ConnEvent>),
    Query(Done),
    Connected(Result<Established, tokio_postgres::Error>),
    Timer,
}

impl Driver {
    fn new(
        user_config: Config,
        connector: Connector,
        commands: mpsc::UnboundedReceiver<Command>,
        info: Arc<Mutex<ConnInfo>>,
        channels: Arc<Mutex<BTreeSet<String>>>,
        established: Established,
    ) -> Self {
        let mut driver = Driver {
            user_config,
            connector,
            commands,
            info,
            channels,
            clock: Clock::start(),
            rng: SplitMix64::new(lock_mod::random_u64()),
            locks: BTreeMap::new(),
            conn: None,
            next_session: 1,
            connecting: None,
            reconnect_at: None,
            backoff: BACKOFF_MIN,
            queries: FuturesUnordered::new(),
            reset: None,
            closing: None,
            event_streak: 0,
        };
        driver.on_connected(established);
        driver
    }

    async fn run(mut self) {
        loop {
            self.tick_due();
            self.drain_all();
            if self.closing.is_some() && self.locks.is_empty() {
                break;
            }
            let deadline = self.next_deadline();
            // Biased, connection events first: tokio-postgres completes a request only at
            // ReadyForQuery, after the notifications the server sent at its commit, so taking
            // every queued notification before any reply replays the server's order (a lock's
            // own `acquired:` marker and the messages around it come before its reply). Due
            // timers cannot starve: every iteration ticks them against the clock first. After a
            // long burst of events, API commands get one turn (still before replies), so a
            // flood of notifications cannot hold up `destroy` or a signal.
            let wake = if self.event_streak < EVENT_BURST {
                tokio::select! {
                    biased;
                    event = recv_event(&mut self.conn) => Wake::Conn(event),
                    Some(done) = self.queries.next(), if !self.queries.is_empty() => Wake::Query(done),
                    command = self.commands.recv(), if self.closing.is_none() => Wake::Command(command),
                    result = poll_connecting(&mut self.connecting), if self.connecting.is_some() => Wake::Connected(result),
                    () = sleep_until(deadline) => Wake::Timer,
                }
            } else {
                tokio::select! {
                    biased;
                    command = self.commands.recv(), if self.closing.is_none() => Wake::Command(command),
                    event = recv_event(&mut self.conn) => Wake::Conn(event),
                    Some(done) = self.queries.next(), if !self.queries.is_empty() => Wake::Query(done),
                    result = poll_connecting(&mut self.connecting), if self.connecting.is_some() => Wake::Connected(result),
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
                    self.begin_close();
                }
                Wake::Conn(Some(ConnEvent::Notification { channel, payload })) => {
                    self.on_notification(channel, payload)
                }
                Wake::Conn(Some(ConnEvent::Closed(error))) => {
                    let why = error.map_or_else(|| "closed by the server".to_owned(), |e| e.to_string());
                    self.lose_connection(&why);
                }
                Wake::Conn(None) => self.lose_connection("connection task ended"),
                Wake::Query(done) => self.on_done(done),
                Wake::Connected(Ok(established)) => {
                    self.connecting = None;
                    tracing::info!(app = %established.app, pid = established.pid, "reconnected");
                    self.on_connected(established);
                }
                Wake::Connected(Err(e)) => {
                    self.connecting = None;
                    tracing::warn!(error = %e, "reconnection failed");
                    self.schedule_reconnect();
                }
                Wake::Timer => {}
            }
        }
        // Refuse further commands before confirming the close.
        self.commands.close();
        for reply in self.closing.take().unwrap_or_default() {
            let _ = reply.send(());
        }
        guard(&self.info).pid = None;
        // Dropping the client ends the connection gracefully (Terminate); give the poller a
        // moment to flush it.
        if let Some(mut conn) = self.conn.take() {
            let poller = conn.poller.take();
            drop(conn);
            if let Some(poller) = poller {
                let _ = tokio::time::timeout(Duration::from_secs(1), poller).await;
            }
        }
    }
}

async fn recv_event(conn: &mut Option<Conn>) -> Option<ConnEvent> {
    match conn {
        Some(conn) => conn.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll_connecting(
    connecting: &mut Option<BoxFuture<'static, Result<Established, tokio_postgres::Error>>>,
) -> Result<Established, tokio_postgres::Error> {
    match connecting {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// Feeds one input to one lock. Its outputs are drained by [`Driver::drain_all`] before the
    /// loop waits again.
    fn feed(&mut self, key: u64, input: Input) {
        let now = self.clock.now();
        if let Some(entry) = self.locks.get_mut(&key) {
            entry.core.handle_input(now, input);
        }
        self.drain_lock(key);
    }

    /// Ticks every lock whose deadline has passed by the clock (not only by the sleep).
    fn tick_due(&mut self) {
        let now = self.clock.now();
        let due: Vec<u64> = self
            .locks
            .iter()
            .filter(|(_, e)| e.core.poll_timeout().is_some_and(|(at, _)| at <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.feed(key, Input::Tick);
        }
        if self.reconnect_at.is_some_and(|at| at <= Instant::now()) {
            self.reconnect_at = None;
            self.start_connecting();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let locks = self
            .locks
            .values()
            .filter_map(|e| e.core.poll_timeout())
            .map(|(at, _)| self.clock.instant(at));
        locks.chain(self.reconnect_at).min()
    }

    /// Drains every lock and applies the cross-lock consequences (session resets, removal of
    /// stopped locks) until nothing is left to do.
    fn drain_all(&mut self) {
        // Each round either finishes or drops a connection (which happens at most once per
        // session) or removes locks; the bound is a guard.
        for _ in 0..16 {
            let keys: Vec<u64> = self.locks.keys().copied().collect();
            for key in keys {
                self.drain_lock(key);
            }
            if let Some(session) = self.reset.take() {
                if self.conn.as_ref().is_some_and(|c| c.session == session) {
                    self.lose_connection("a request went unanswered; resetting the session");
                    continue;
                }
            }
            let stopped: Vec<u64> = self.locks.iter().filter(|(_, e)| e.stopped).map(|(k, _)| *k).collect();
            if stopped.is_empty() {
                return;
            }
            for key in stopped {
                self.remove_lock(key);
            }
        }
    }

    fn drain_lock(&mut self, key: u64) {
        loop {
            let Some(entry) = self.locks.get_mut(&key) else { return };
            let Some(output) = entry.core.poll_output() else { return };
            self.on_output(key, output);
        }
    }

    fn on_output(&mut self, key: u64, output: Output) {
        let Some(entry) = self.locks.get_mut(&key) else { return };
        match output {
            Output::Request(request) => {
                let Some(conn) = self.conn.as_ref().filter(|c| c.session == request.session) else {
                    // The lock already got (or is about to get) SessionDown for that session.
                    return;
                };
                let client = conn.client.clone();
                let target = Target {
                    protocol: entry.shared.protocol,
                    schema: entry.shared.schema.clone(),
                    channel: entry.shared.channel.clone(),
                    app: conn.app.clone(),
                    lease_ttl: entry.lease_ttl,
                };
                let id = request.id;
                let op = request.op;
                tracing::trace!(channel = %target.channel, op = op.name(), "request");
                self.queries.push(
                    async move {
                        let result = sql::execute(&client, &target, &op).await;
                        Done::Op { key, id, result }
                    }
                    .boxed(),
                );
            }
            Output::ResetSession(session) => self.reset = Some(session),
            Output::Deliver { payload } => entry.shared.broadcast(LockMessage::Message { payload }),
            Output::AttemptDone { acquired } => {
                if let Some(reply) = entry.attempts.pop_front() {
                    let _ = reply.send(Ok(acquired));
                }
            }
            Output::Event(event) => on_event(entry, event),
            _ => {}
        }
    }

    fn remove_lock(&mut self, key: u64) {
        let Some(mut entry) = self.locks.remove(&key) else {
            return;
        };
        let channel = entry.shared.channel.clone();
        if let Some(conn) = self.conn.as_ref() {
            let client = conn.client.clone();
            let channel = channel.clone();
            self.queries.push(
                async move {
                    let _ = sql::unlisten(&client, &channel).await;
                    Done::Other
                }
                .boxed(),
            );
        }
        guard(&self.channels).remove(channel.as_str());
        entry.shared.set_holding(false, None);
        entry.shared.mark_stopped();
        for reply in entry.init_waiters.drain(..) {
            let _ = reply.send(Err(Error::Closed));
        }
        for reply in entry.early_attempts.drain(..).chain(entry.attempts.drain(..)) {
            let _ = reply.send(Ok(false));
        }
        for reply in entry.release_waiters.drain(..).chain(entry.destroy_waiters.drain(..)) {
            let _ = reply.send(Ok(()));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Register { shared, config, seed } => {
                let key = shared.key;
                let lease_ttl = config.lease_ttl;
                let core = Lock::new(shared.channel.clone(), config, seed);
                self.locks.insert(
                    key,
                    Entry {
                        core,
                        shared,
                        lease_ttl,
                        ready: None,
                        preparing: None,
                        initialised: false,
                        init_waiters: Vec::new(),
                        early_attempts: Vec::new(),
                        attempts: VecDeque::new(),
                        release_waiters: Vec::new(),
                        destroy_waiters: Vec::new(),
                        stopped: false,
                    },
                );
            }
            Command::Init { key, reply } => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    let _ = reply.send(Err(Error::Closed));
                    return;
                };
                let current = self.conn.as_ref().map(|c| c.session);
                if entry.ready.is_some() && entry.ready == current {
                    let _ = reply.send(Ok(()));
                } else {
                    entry.init_waiters.push(reply);
                    self.start_prepare(key);
                }
                self.feed(key, Input::Start);
            }
            Command::Acquire { key, reply } => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    let _ = reply.send(Err(Error::Closed));
                    return;
                };
                if entry.initialised {
                    entry.attempts.push_back(reply);
                    self.feed(key, Input::TryAcquire);
                } else {
                    entry.early_attempts.push(reply);
                    self.start_prepare(key);
                }
            }
            Command::Release { key, reply } => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    let _ = reply.send(Ok(()));
                    return;
                };
                match entry.core.state().phase {
                    Phase::Holding | Phase::Draining => {
                        entry.release_waiters.push(reply);
                        self.feed(key, Input::Release);
                    }
                    _ => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            Command::Destroy { key, signal, reply } => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    let _ = reply.send(Ok(()));
                    return;
                };
                entry.destroy_waiters.push(reply);
                let input = signal.map_or(Input::Stop, Input::Signal);
                if let Some(kind) = signal {
                    tracing::info!(channel = %entry.shared.channel, signal = ?kind, "stopping on signal");
                }
                self.feed(key, input);
            }
            Command::Close { reply } => {
                self.begin_close();
                if let Some(waiters) = self.closing.as_mut() {
                    waiters.push(reply);
                }
            }
        }
    }

    fn begin_close(&mut self) {
        if self.closing.is_none() {
            self.closing = Some(Vec::new());
        }
        self.reconnect_at = None;
        self.connecting = None;
        let keys: Vec<u64> = self.locks.keys().copied().collect();
        for key in keys {
            self.feed(key, Input::Stop);
        }
    }

    fn on_notification(&mut self, channel: String, payload: String) {
        let Some(session) = self.conn.as_ref().map(|c| c.session) else {
            return;
        };
        let keys: Vec<u64> = self
            .locks
            .iter()
            .filter(|(_, e)| e.shared.channel.as_str() == channel || e.shared.channel.lock_channel() == channel)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.feed(
                key,
                Input::Notification {
                    session,
                    channel: channel.clone(),
                    payload: payload.clone(),
                },
            );
        }
    }

    fn on_connected(&mut self, established: Established) {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        self.backoff = BACKOFF_MIN;
        {
            let mut info = guard(&self.info);
            info.app = established.app.clone();
            info.pid = Some(established.pid);
        }
        self.conn = Some(Conn {
            session,
            client: established.client,
            app: established.app,
            events: established.events,
            poller: Some(established.poller),
            bootstrapped: BTreeSet::new(),
        });
        // Only locks that were initialised or are waiting to be: a lock nobody has used yet
        // touches the database only when it is first used.
        let keys: Vec<u64> = self
            .locks
            .iter()
            .filter(|(_, e)| e.initialised || !e.init_waiters.is_empty() || !e.early_attempts.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.start_prepare(key);
        }
    }

    /// Drops the current connection: every lock learns `SessionDown` (a holder reports
    /// `Lost`), and a reconnection is scheduled.
    fn lose_connection(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else { return };
        let session = conn.session;
        tracing::warn!(app = %conn.app, reason = why, "database session lost");
        drop(conn);
        guard(&self.info).pid = None;
        let keys: Vec<u64> = self.locks.keys().copied().collect();
        for key in keys {
            if let Some(entry) = self.locks.get_mut(&key) {
                entry.ready = None;
                entry.preparing = None;
            }
            self.feed(key, Input::SessionDown(session));
        }
        if self.closing.is_none() {
            self.schedule_reconnect();
        }
    }

    fn schedule_reconnect(&mut self) {
        if self.closing.is_some() {
            return;
        }
        // Equal jitter: half the backoff fixed, half random, so a fleet does not reconnect in
        // lockstep after a server restart.
        let micros = u64::try_from(self.backoff.as_micros()).unwrap_or(u64::MAX);
        let delay = Duration::from_micros(micros / 2 + self.rng.below_inclusive(micros / 2));
        self.reconnect_at = Some(Instant::now() + delay);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn start_connecting(&mut self) {
        if self.connecting.is_some() || self.conn.is_some() || self.closing.is_some() {
            return;
        }
        let config = attempt_config(&self.user_config);
        self.connecting = Some((self.connector)(config));
    }

    /// Bootstraps the lock's schema (once per session) and `LISTEN`s its channels; the lock
    /// gets `SessionUp` when that is done.
    fn start_prepare(&mut self, key: u64) {
        let Some(conn) = self.conn.as_ref() else { return };
        let Some(entry) = self.locks.get_mut(&key) else { return };
        // Already prepared (callers answer their waiters themselves) or on its way.
        if entry.stopped || entry.preparing == Some(conn.session) || entry.ready == Some(conn.session) {
            return;
        }
        entry.preparing = Some(conn.session);
        let key_schema = (entry.shared.protocol, entry.shared.schema.clone());
        let bootstrap = (!conn.bootstrapped.contains(&key_schema)).then_some(key_schema);
        let client = conn.client.clone();
        let session = conn.session;
        let channel = entry.shared.channel.clone();
        self.queries.push(
            async move {
                let result = async {
                    if let Some((protocol, schema)) = bootstrap {
                        sql::bootstrap(&client, protocol, &schema).await?;
                    }
                    sql::listen(&client, &channel).await
                }
                .await;
                Done::Prepared { key, session, result }
            }
            .boxed(),
        );
    }

    fn on_done(&mut self, done: Done) {
        match done {
            // A `SessionLost` reply is ignored by the core: the connection's end arrives as its
            // own event.
            Done::Op { key, id, result } => self.feed(key, Input::DbResult { id, result }),
            Done::Prepared { key, session, result } => self.on_prepared(key, session, result),
            Done::Other => {}
        }
    }

    fn on_prepared(&mut self, key: u64, session: SessionId, result: Result<(), DbError>) {
        let current = self.conn.as_ref().map(|c| c.session);
        let Some(entry) = self.locks.get_mut(&key) else { return };
        if entry.preparing == Some(session) {
            entry.preparing = None;
        }
        if current != Some(session) || entry.stopped {
            return; // a preparation of an earlier connection
        }
        match result {
            Ok(()) => {
                let key_schema = (entry.shared.protocol, entry.shared.schema.clone());
                if let Some(conn) = self.conn.as_mut() {
                    conn.bootstrapped.insert(key_schema);
                }
                let Some(entry) = self.locks.get_mut(&key) else { return };
                entry.ready = Some(session);
                entry.initialised = true;
                tracing::debug!(channel = %entry.shared.channel, schema = %entry.shared.schema, "lock ready on session");
                finish_prepare_waiters(entry, Ok(()));
                let early = std::mem::take(&mut entry.early_attempts);
                let attempts = early.len();
                entry.attempts.extend(early);
                self.feed(key, Input::SessionUp(session));
                for _ in 0..attempts {
                    self.feed(key, Input::TryAcquire);
                }
            }
            Err(DbError::SessionLost) => {}
            Err(error) => {
                tracing::error!(channel = %entry.shared.channel, schema = %entry.shared.schema, error = %error, "lock schema setup failed");
                let schema = entry.shared.schema.as_str().to_owned();
                finish_prepare_waiters(
                    entry,
                    Err(Error::Bootstrap {
                        schema: schema.clone(),
                        error: error.clone(),
                    }),
                );
                for reply in entry.early_attempts.drain(..) {
                    let _ = reply.send(Err(Error::Bootstrap {
                        schema: schema.clone(),
                        error: error.clone(),
                    }));
                }
            }
        }
    }
}

fn finish_prepare_waiters(entry: &mut Entry, result: Result<(), Error>) {
    match result {
        Ok(()) => {
            for reply in entry.init_waiters.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        Err(Error::Bootstrap { schema, error }) => {
            for reply in entry.init_waiters.drain(..) {
                let _ = reply.send(Err(Error::Bootstrap {
                    schema: schema.clone(),
                    error: error.clone(),
                }));
            }
        }
        Err(_) => {
            for reply in entry.init_waiters.drain(..) {
                let _ = reply.send(Err(Error::Closed));
            }
        }
    }
}

/// Reports one event: the lock's watch state, its subscribers, its handlers, and the log.
fn on_event(entry: &mut Entry, event: LockEvent) {
    let channel = entry.shared.channel.as_str();
    match event {
        LockEvent::Acquired { token } => {
            entry.shared.set_holding(true, token);
            match token {
                Some(t) => tracing::info!(channel = %channel, token = t.0, "lock acquired"),
                None => tracing::info!(channel = %channel, "lock acquired"),
            }
            entry.shared.broadcast(LockMessage::Acquired { token });
        }
        LockEvent::Lost { reason } => {
            entry.shared.set_holding(false, None);
            tracing::info!(channel = %channel, reason = reason.as_str(), "lock lost");
            entry.shared.broadcast(LockMessage::Lost { reason });
            for reply in entry.release_waiters.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::Released => {
            entry.shared.set_holding(false, None);
            tracing::info!(channel = %channel, "lock released");
            entry.shared.broadcast(LockMessage::Released);
            for reply in entry.release_waiters.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::PeerReleased => {
            tracing::debug!(channel = %channel, "peer released the lock");
            for handler in entry.shared.release_handlers() {
                handler(channel);
            }
        }
        LockEvent::Stopped { released } => {
            entry.shared.set_holding(false, None);
            tracing::info!(channel = %channel, released, "lock stopped");
            entry.shared.broadcast(LockMessage::Stopped);
            entry.stopped = true;
            for reply in entry.release_waiters.drain(..) {
                let _ = reply.send(Ok(()));
            }
        }
        LockEvent::Warning(warning) => match warning {
            Warning::TerminateNotPermitted { pid } => {
                tracing::warn!(channel = %channel, pid, "not permitted to terminate the stale holder's backend")
            }
            Warning::HandoverBufferOverflow { dropped } => {
                tracing::warn!(channel = %channel, dropped, "handover buffer overflowed; oldest messages dropped")
            }
            Warning::RequestFailed { op, error } => {
                tracing::warn!(channel = %channel, op, error = %error, "request failed")
            }
            other => tracing::warn!(channel = %channel, warning = ?other, "lock warning"),
        },
        other => tracing::debug!(channel = %channel, event = ?other, "lock event"),
    }
}
