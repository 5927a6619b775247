//! The session handle: one PostgreSQL connection, reconnected on loss, shared by many locks.
//!
//! The connection's lifecycle and every lock's state live in `pgiplock-core`'s
//! [`Session`](pgiplock_core::Session) state machine, driven by one task ([`crate::driver`]);
//! this module is the handle that services hold, and the options of a session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use pgiplock_core::{ChannelName, LockCall, LockConfig, LockKey, SchemaName, SessionConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Config, Socket};

use crate::driver::{self, CallWaiter};
use crate::lock::{self as lock_mod, LockOptions, LockShared, PgIpLock};
use crate::Error;

/// How a [`Session`] connects. Start from [`SessionOptions::new`] and chain the setters.
///
/// ```
/// use pgiplock::SessionOptions;
/// use std::time::Duration;
/// let options = SessionOptions::new()
///     .connect_timeout(Duration::from_secs(3))
///     .wait_for_server(Duration::from_secs(60));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct SessionOptions {
    core: SessionConfig,
    wait_for_server: Duration,
    wait_for_writable: Duration,
}

/// How long a first connection keeps trying when it reaches only standbys (a failover in
/// progress), by default.
pub const DEFAULT_WAIT_FOR_WRITABLE: Duration = Duration::from_secs(60);

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            core: SessionConfig::default(),
            wait_for_server: Duration::ZERO,
            wait_for_writable: DEFAULT_WAIT_FOR_WRITABLE,
        }
    }
}

impl SessionOptions {
    /// The defaults: connect timeout 5 s, setup timeout 5 s, reconnect backoff 100 ms doubling
    /// to 5 s, and [`Session::connect`] failing on the first failed attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds one whole connection attempt: TCP connect (every host of a multi-host string),
    /// TLS, startup, authentication and the identity query (default 5 s). It applies to the
    /// first connection and to every reconnection; an attempt still unfinished then is dropped
    /// and retried after backoff.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.core.connect_timeout = timeout;
        self
    }

    /// Bounds each setup statement on a connection (schema bootstrap, `LISTEN`); one unanswered
    /// this long resets the connection (default 5 s).
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.core.setup_timeout = timeout;
        self
    }

    /// Longest delay between reconnection attempts (default 5 s; delays start at 100 ms and
    /// double, each drawn in `[d / 2, d]`).
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.core.backoff_max = max;
        self
    }

    /// How long the connection stays open after a `Lease` lock released at its stop (its
    /// `destroy`, or the session's `close`) named a successor: until that successor's
    /// `acquired` marker arrives, at most `linger` (default 50 ms; zero closes at once). The
    /// exit of a backend costs the server milliseconds of CPU that the successor's acquisition
    /// would otherwise share on a small host. A release that named nobody waits for nothing;
    /// [`Session::close`] returns after the wait.
    pub fn handover_linger(mut self, linger: Duration) -> Self {
        self.core.handover_linger = linger;
        self
    }

    /// For services that start before their database: [`Session::connect`] keeps retrying (with
    /// backoff) for up to `limit` before it fails with the last attempt's error (default zero:
    /// the first failed attempt fails `connect`).
    pub fn wait_for_server(mut self, limit: Duration) -> Self {
        self.wait_for_server = limit;
        self
    }

    /// How long [`Session::connect`] keeps retrying (with the reconnect backoff) while every
    /// server it reaches is a standby in recovery or refuses writes, as during a failover
    /// between a primary's crash and a replica's promotion (default 60 s; at least the
    /// [`wait_for_server`](Self::wait_for_server) limit). It then fails with
    /// [`Error::NotWritable`] naming the host. A server that cannot be reached at all is
    /// governed by `wait_for_server` alone.
    pub fn wait_for_writable(mut self, limit: Duration) -> Self {
        self.wait_for_writable = limit;
        self
    }

    pub(crate) fn writable_limit(&self) -> Duration {
        self.wait_for_writable.max(self.wait_for_server)
    }

    pub(crate) fn core(&self) -> SessionConfig {
        self.core.clone()
    }

    pub(crate) fn wait_limit(&self) -> Duration {
        self.wait_for_server
    }

    fn validate(&self) -> Result<(), Error> {
        let floor = Duration::from_millis(10);
        for (name, value) in [
            ("connect_timeout", self.core.connect_timeout),
            ("setup_timeout", self.core.setup_timeout),
            ("max_backoff", self.core.backoff_max),
        ] {
            if value < floor {
                return Err(Error::InvalidSessionOptions {
                    name,
                    value,
                    min: floor,
                });
            }
        }
        Ok(())
    }
}

/// API calls and lifecycle messages into the session task.
pub(crate) enum Command {
    Register {
        key: LockKey,
        shared: Arc<LockShared>,
        /// Boxed: the largest variant by far, and commands are queued.
        config: Box<LockConfig>,
        seed: u64,
    },
    Call {
        key: LockKey,
        request: LockCall,
        waiter: CallWaiter,
    },
    /// Every handle of the lock is gone.
    Abandon {
        key: LockKey,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What the handles and the session task share.
#[derive(Debug, Default)]
pub(crate) struct SessionShared {
    pub(crate) app: String,
    pub(crate) pid: Option<i32>,
    /// Why the session task ended abnormally (a panic), once it did.
    pub(crate) ended: Option<String>,
    /// The session task is over (normally or not) and `ended` is final.
    pub(crate) finished: bool,
    /// Every lock of the session, to tell them if the task ends.
    pub(crate) locks: BTreeMap<u64, Weak<LockShared>>,
    /// Channels with a live lock: one session is one holder identity, so it can hold a channel
    /// once.
    pub(crate) channels: BTreeSet<ChannelName>,
}

pub(crate) struct SessionInner {
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) shared: Arc<Mutex<SessionShared>>,
    pub(crate) abort: tokio::task::AbortHandle,
    /// Signalled once the task is over and `shared.finished` is set.
    pub(crate) finished: Arc<tokio::sync::Notify>,
}

pub(crate) fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking user callback must not wedge the session: the data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every session of the process, weak: what [`Shutdown`](crate::Shutdown) closes.
static SESSIONS: Mutex<Vec<Weak<SessionInner>>> = Mutex::new(Vec::new());

/// The sessions of this process that are still referenced.
pub(crate) fn live_sessions() -> Vec<Session> {
    guard(&SESSIONS)
        .iter()
        .filter_map(Weak::upgrade)
        .map(|inner| Session { inner })
        .collect()
}

/// One PostgreSQL connection shared by many locks, reconnected with backoff when lost.
/// Cheap to clone; all clones are the same session.
///
/// Every connection gets a fresh, unique `application_name` (`pgiplock-<32 hex>`): it is the
/// holder identity written into the lock tables and checked against `pg_stat_activity`, so a
/// name set in the configuration is replaced. Unless the configuration sets them, connections
/// use TCP keepalives after 10 s idle (every 5 s, 3 probes) and `tcp_user_timeout` 15 s: a
/// backstop only, the session's own deadlines detect a dead connection first (see
/// [`SessionOptions`]). A lost connection is reopened with capped, jittered backoff; every lock
/// learns the loss (a holder reports [`LockMessage::Lost`](crate::LockMessage::Lost)) and
/// competes again on the new connection.
///
/// Dropping the last handle of the session (every `Session` clone and every lock of it) stops
/// every lock in the background (a held lock is released, bounded by its shutdown timeout) and
/// closes the connection, as long as the tokio runtime keeps running.
///
/// Do not point it at a transaction-pooling PgBouncer: `LISTEN` and the session identity need
/// a real session. A server-side `idle_session_timeout` shorter than the renew interval
/// would end the session between renewals.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = guard(&self.inner.shared);
        f.debug_struct("Session")
            .field("app", &shared.app)
            .field("pid", &shared.pid)
            .finish()
    }
}

impl Session {
    /// Connects without TLS with the default [`SessionOptions`] and starts the session task.
    pub async fn connect(config: Config) -> Result<Session, Error> {
        Self::connect_with(config, tokio_postgres::NoTls, SessionOptions::default()).await
    }

    /// Connects with `tls` (used again for every reconnection) and starts the session task.
    pub async fn connect_with_tls<T>(config: Config, tls: T) -> Result<Session, Error>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        Self::connect_with(config, tls, SessionOptions::default()).await
    }

    /// Connects with `tls` and `options`. Resolves once the first connection is up; fails with
    /// [`Error::Connect`] or [`Error::ConnectTimeout`] when the first attempt fails (or, with
    /// [`SessionOptions::wait_for_server`], when every attempt within that limit failed).
    pub async fn connect_with<T>(config: Config, tls: T, options: SessionOptions) -> Result<Session, Error>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        options.validate()?;
        let (commands, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(SessionShared::default()));
        let (first_tx, first_rx) = oneshot::channel();
        let finished = Arc::new(tokio::sync::Notify::new());
        let abort = driver::spawn(config, tls, &options, rx, shared.clone(), first_tx, finished.clone());
        let session = Session {
            inner: Arc::new(SessionInner {
                commands,
                shared,
                abort,
                finished,
            }),
        };
        {
            let mut sessions = guard(&SESSIONS);
            sessions.retain(|s| s.strong_count() > 0);
            sessions.push(Arc::downgrade(&session.inner));
        }
        match first_rx.await {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(session.ended_error_after_task().await),
        }
    }

    /// The `application_name` of the current (or last) connection: this session's holder
    /// identity in the lock tables.
    pub fn app_name(&self) -> String {
        guard(&self.inner.shared).app.clone()
    }

    /// The backend pid of the current connection, if connected.
    pub fn backend_pid(&self) -> Option<i32> {
        guard(&self.inner.shared).pid
    }

    /// A lock on `channel`. Validates the channel, schema and options; nothing reaches the
    /// database until [`PgIpLock::init`] or [`PgIpLock::acquire`].
    pub fn lock(&self, channel: &str, options: LockOptions) -> Result<PgIpLock, Error> {
        static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let channel = ChannelName::new(channel)?;
        let config = options.to_config()?;
        let schema: SchemaName = options.schema_name()?;
        let key = LockKey(NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let shared = Arc::new(LockShared::new(
            key,
            channel.clone(),
            schema,
            options.protocol_value(),
            config.shutdown_timeout,
        ));
        {
            let mut session = guard(&self.inner.shared);
            if let Some(cause) = &session.ended {
                return Err(Error::SessionEnded { cause: cause.clone() });
            }
            if !session.channels.insert(channel.clone()) {
                return Err(Error::DuplicateLock {
                    channel: channel.as_str().to_owned(),
                });
            }
            session.locks.insert(key.0, Arc::downgrade(&shared));
        }
        let registered = self.send(Command::Register {
            key,
            shared: shared.clone(),
            config: Box::new(config),
            seed: options.seed_value(),
        });
        if let Err(e) = registered {
            let mut session = guard(&self.inner.shared);
            session.channels.remove(channel.as_str());
            session.locks.remove(&key.0);
            return Err(e);
        }
        let lock = PgIpLock::new(shared, self.clone());
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

    /// Ends the session task abruptly, as a panic would (for tests of what handles report).
    #[doc(hidden)]
    pub fn abort_task(&self) {
        self.inner.abort.abort();
    }

    pub(crate) fn send(&self, command: Command) -> Result<(), Error> {
        self.inner.commands.send(command).map_err(|_| self.ended_error())
    }

    /// The error of a call whose answer went with the task: waits (briefly) until the task's
    /// end is recorded, so that a panic is named rather than reported as a plain close.
    pub(crate) async fn ended_error_after_task(&self) -> Error {
        let notified = self.inner.finished.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !guard(&self.inner.shared).finished {
            // Bounded: the watcher records the end right after the task.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
        self.ended_error()
    }

    /// The error a call gets once the task is gone.
    pub(crate) fn ended_error(&self) -> Error {
        match &guard(&self.inner.shared).ended {
            Some(cause) => Error::SessionEnded { cause: cause.clone() },
            None => Error::Closed,
        }
    }

    pub(crate) fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
